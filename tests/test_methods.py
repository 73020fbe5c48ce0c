"""Every method against the float64 brute-force oracle, over the model zoo and the axes grid.

The default tier runs covering subsets of the grids (tests/tiers.py): every model, method
and axes layout, each method with every trace / diagonal choice and both x2 modes; the
full tier (NTK_FULL_TESTS=1) runs all of them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import ntk_compiler as nc
import oracle
from models import ZOO, mlp
from oracle import assert_matches, oracle_ntk
import tiers
from tiers import representative

RTOL_F64 = 1e-10
RTOL_F32 = 1e-4  # float32 rounding of O(100)-term sums of O(1) products

TRACE = {2: [(), (-1,), (0, 1)], 3: [(), (-1,), (1, 2)]}
DIAGONAL = [(), (1,), (0,)]
METHODS = ["jacobian", "ntk_vp"]  # structured has its own grid in test_structured.py


def _grid():
  for model in ZOO:
    for trace in TRACE[model.out_ndim]:
      for diag in DIAGONAL:
        if set(a % model.out_ndim for a in trace) & set(diag):
          continue
        for method in METHODS:
          for with_x2 in (True, False):
            yield pytest.param(model, trace, diag, method, with_x2, id=(
                f"{model.name}-t{trace}-d{diag}-{method}-{'x2' if with_x2 else 'no_x2'}"))


def _features(model, trace, diag, method, with_x2):
  return [("model", model.name), ("axes", model.out_ndim, trace, diag), ("method", method),
          ("x2", method, with_x2)]


@functools.lru_cache(maxsize=8)  # bounded: every live NTK function keeps its programs
def _compiled(model, method, trace, diag, batch_independent):
  """One NTK function per configuration, so hypothesis' draws reuse its compilations."""
  return nc.compile_ntk(model.f, method=method, trace_axes=trace, diagonal_axes=diag,
                        batch_independent=batch_independent)


@functools.lru_cache(maxsize=16)
def _jitted(f):
  return jax.jit(f)


@functools.lru_cache(maxsize=64)
def _full_kernel(model, seed, n1, n2, with_x2, dtype):
  """The oracle's full kernels of one draw, shared by every axes layout and method.

  f is jitted only so that draws of one shape reuse a compiled Jacobian; the oracle still
  takes full Jacobians of f by reverse mode and contracts them."""
  params, x1, x2 = model.draw(seed, n1, n2, dtype)
  return oracle.full_kernel(_jitted(model.f), params, x1, x2 if with_x2 else None)


def _expected(model, seed, n1, n2, with_x2, trace, diag, dtype):
  """`oracle.oracle_ntk`, from the cached full kernels."""
  fulls, tree = _full_kernel(model, seed, n1, n2, with_x2, dtype)
  return oracle.apply_layouts(fulls, tree, trace, diag)


def _check(model, method, trace, diag, seed, n1, n2, with_x2, batch_independent,
           dtype=jnp.float64, rtol=RTOL_F64):
  if 0 in {a % model.out_ndim for a in trace + diag}:
    n2 = n1  # traced / diagonal batch axes need equal batches
  params, x1, x2 = model.draw(seed, n1, n2, dtype)
  x2 = x2 if with_x2 else None
  ntk_fn = _compiled(model, method, trace, diag, batch_independent)
  kernel = ntk_fn(params, x1, x2)
  expected = _expected(model, seed, n1, n2, with_x2, trace, diag, dtype)
  assert_matches(kernel, expected, rtol)


@pytest.mark.parametrize("model, trace, diag, method, with_x2",
                         representative(_grid(), _features))
@tiers.examples(2)
@given(seed=st.integers(0, 2**16), independent=st.booleans())
def test_matches_oracle_float64(model, trace, diag, method, with_x2, seed, independent):
  _check(model, method, trace, diag, seed, 3, 2, with_x2,
         batch_independent=independent and model.batch_independent)


def _models_and_methods(features):
  """Every model with every method; the default tier a subset that covers `features`."""
  return representative(
      [pytest.param(model, method, id=f"{model.name}-{method}")
       for model in ZOO for method in METHODS + ["structured", "auto"]], features)


@pytest.mark.parametrize("model, method", _models_and_methods(
    lambda model, method: [("model", model.name), ("method", method)]))
@tiers.examples(2)
@given(seed=st.integers(0, 2**16), n1=st.sampled_from([1, 2, 4]),
       n2=st.sampled_from([1, 3]), with_x2=st.booleans())
def test_matches_oracle_batch_sizes(model, method, seed, n1, n2, with_x2):
  _check(model, method, (-1,), (), seed, n1, n2, with_x2,
         batch_independent=model.batch_independent)


@pytest.mark.parametrize("model, method", _models_and_methods(
    lambda model, method: [method]))
@tiers.examples(2)
@given(seed=st.integers(0, 2**16), with_x2=st.booleans())
def test_matches_oracle_float32(model, method, seed, with_x2):
  _check(model, method, (-1,), (), seed, 3, 2, with_x2,
         batch_independent=model.batch_independent, dtype=jnp.float32, rtol=RTOL_F32)


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp", "structured"])
def test_symmetric_kernel_is_symmetric(method):
  model = mlp()
  params, x1, _ = model.draw(0, 4, 4, jnp.float64)
  kernel = np.asarray(nc.compile_ntk(model.f, method=method, trace_axes=())(params, x1))
  np.testing.assert_allclose(kernel, kernel.transpose(1, 0, 3, 2), rtol=1e-12)


def test_batch_mixing_model_needs_no_promise():
  """A model whose examples interact gets the exact kernel by default."""
  model = [m for m in ZOO if not m.batch_independent][0]
  params, x1, x2 = model.draw(1, 4, 3, jnp.float64)
  kernel = nc.compile_ntk(model.f, trace_axes=())(params, x1, x2)
  assert_matches(kernel, oracle_ntk(model.f, params, x1, x2, ()), RTOL_F64)

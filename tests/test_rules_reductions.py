"""Reduction rules: factor vs jax.jacfwd and declared structure, via check_rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax import lax

from ntk_compiler import rules
from ntk_compiler.check import check_rule
from ntk_compiler.rules import EqnInfo
from ntk_compiler.rules import reductions
from ntk_compiler.structure import Structure
from rule_helpers import check as _check, rule_result as _rule_result, normal as _normal

SEEDS = st.integers(0, 2**16)
# Axis sizes, in axis order; few sets, so that examples share compilations.
SHAPES = st.sampled_from([(2, 5, 4, 3), (3, 4, 6, 2)])


def test_registered():
  assert rules._DEFAULT[lax.reduce_sum_p] is reductions.reduce_sum_rule
  assert rules._DEFAULT[lax.reduce_window_sum_p] is reductions.reduce_window_sum_rule
  assert rules._DEFAULT[lax.cumsum_p] is reductions.cumsum_rule


# ---------------------------------------------------------------------------- reduce_sum


@pytest.mark.parametrize("rank,axes", [
    (1, (0,)), (2, (1,)), (2, (0, 1)), (3, (0, 2)), (4, (1, 2)), (4, (0, 1, 2, 3)),
    (4, (3,))])
@given(shape=SHAPES, seed=SEEDS)
def test_reduce_sum(rank, axes, shape, seed):
  x = _normal(seed, shape[:rank])
  check = _check(lax.reduce_sum_p, lambda a: jnp.sum(a, axis=axes), x)
  kept = [d for d in range(rank) if d not in axes]
  assert check.structure == Structure(trace=tuple(enumerate(kept)), w_tiled=axes)


@given(shape=SHAPES, seed=SEEDS)
def test_mean_is_reduce_sum(shape, seed):
  check = _check(lax.reduce_sum_p, lambda a: jnp.mean(a, axis=(1, 2)), _normal(seed, shape))
  assert check.structure == Structure(trace=((0, 0), (1, 3)), w_tiled=(1, 2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_reduce_sum_factor_is_scalar_one(dtype):
  result = _rule_result(lax.reduce_sum_p, lambda a: a.sum(0), jnp.ones((3, 2), dtype))
  factor = result.factor(jnp.ones((3, 2), dtype))
  assert factor.shape == () and factor.dtype == dtype and factor == 1
  assert result.reads == ()


# ---------------------------------------------------------------------------- reduce_window_sum


def _window_sum(window, strides, padding, base=None, dilation=None):
  return lambda a: lax.reduce_window(a, 0., lax.add, window, strides, padding,
                                     base_dilation=base, window_dilation=dilation)


# (window dimensions, strides, padding, base dilation, window dilation), NHWC-like rank 4.
WINDOW_CASES = {
    "pool_2x2": ((1, 2, 2, 1), (1, 2, 2, 1), "VALID", None, None),
    "same_3x3": ((1, 3, 3, 1), (1, 1, 1, 1), "SAME", None, None),
    "overlapping_stride": ((1, 3, 2, 1), (1, 2, 1, 1), "VALID", None, None),
    "explicit_padding": ((1, 2, 3, 1), (1, 1, 2, 1), ((0, 0), (1, 2), (2, 0), (0, 0)),
                         None, None),
    "base_dilation": ((1, 2, 2, 1), (1, 1, 1, 1), ((0, 0), (1, 0), (0, 1), (0, 0)),
                      (1, 2, 1, 1), None),
    "window_dilation": ((1, 2, 2, 1), (1, 1, 2, 1), "VALID", None, (1, 2, 1, 1)),
    "all_dilations": ((1, 2, 2, 1), (1, 2, 1, 1), ((0, 0), (1, 1), (0, 2), (0, 0)),
                      (1, 2, 2, 1), (1, 1, 2, 1)),
    "nchw_pool": ((1, 1, 2, 2), (1, 1, 2, 2), "VALID", None, None),
    "batch_and_channel": ((2, 2, 1, 1), (1, 2, 1, 1), "VALID", None, None),
    "trivial_window": ((1, 1, 1, 1), (1, 1, 1, 1), "VALID", None, None),
    "unit_window_padded": ((1, 1, 1, 1), (1, 2, 1, 1), ((0, 0), (1, 0), (0, 0), (0, 0)),
                           None, None),
}


def _trivial_axes(window, strides, padding, base):
  if isinstance(padding, str):
    padding = [(0, 0) if w == 1 else None for w in window]
  base = base or (1,) * len(window)
  return tuple(d for d in range(len(window))
               if (window[d], strides[d], padding[d], base[d]) == (1, 1, (0, 0), 1))


@pytest.mark.parametrize("name", WINDOW_CASES)
@given(shape=SHAPES, seed=SEEDS)
def test_reduce_window_sum(name, shape, seed):
  window, strides, padding, base, dilation = WINDOW_CASES[name]
  fn = _window_sum(window, strides, padding, base, dilation)
  check = _check(lax.reduce_window_sum_p, fn, _normal(seed, shape))
  trivial = _trivial_axes(window, strides, padding, base)
  assert check.structure == Structure(trace=tuple((d, d) for d in trivial))


@pytest.mark.parametrize("rank", [1, 3])
@given(shape=SHAPES, seed=SEEDS)
def test_reduce_window_sum_ranks(rank, shape, seed):
  window, strides = (3, 2, 1)[:rank], (2, 1, 1)[:rank]
  check = _check(lax.reduce_window_sum_p, _window_sum(window, strides, "SAME"),
                 _normal(seed, shape[1:1 + rank]))
  assert check.structure == Structure(trace=((2, 2),) if rank == 3 else ())


@given(shape=SHAPES, seed=SEEDS)
def test_average_pool(shape, seed):
  """Average pooling is reduce_window_sum followed by a division."""
  fn = lambda a: _window_sum((1, 2, 2, 1), (1, 2, 2, 1), "VALID")(a) / 4.  # noqa: E731
  check = _check(lax.reduce_window_sum_p, fn, _normal(seed, shape))
  assert check.structure == Structure(trace=((0, 0), (3, 3)))


def _flax_avg_pool(inputs, window_shape, strides=None, padding="VALID"):
  """flax.linen.avg_pool as flax writes it (flax is not a test dependency)."""
  strides = strides or (1,) * len(window_shape)
  dims, strides = (1,) + window_shape + (1,), (1,) + strides + (1,)
  if not isinstance(padding, str):
    padding = ((0, 0),) + tuple(padding) + ((0, 0),)
  y = jax.lax.reduce_window(inputs, 0., jax.lax.add, dims, strides, padding)
  return y / np.prod(window_shape)


@pytest.mark.parametrize("window,strides,padding", [
    ((2, 2), (2, 2), "VALID"), ((3, 3), (1, 1), "SAME"), ((2, 3), (1, 2), ((1, 0), (1, 1)))])
@given(shape=SHAPES, seed=SEEDS)
def test_flax_style_avg_pool(window, strides, padding, shape, seed):
  fn = lambda a: _flax_avg_pool(a, window, strides, padding)  # noqa: E731
  jaxpr = jax.make_jaxpr(fn)(jnp.zeros(shape))
  assert [e.primitive for e in jaxpr.eqns][0] is lax.reduce_window_sum_p
  check = _check(lax.reduce_window_sum_p, fn, _normal(seed, shape))
  assert check.structure == Structure(trace=((0, 0), (3, 3)))


def test_generic_reduce_window_is_not_reduce_window_sum():
  """An add written as a lambda, or a non-zero init, gives the generic reduce_window,
  which this rule does not cover."""
  x = jnp.ones((2, 4, 4, 3))
  for fn in (lambda a: lax.reduce_window(a, 0., lambda u, v: u + v, (1, 2, 2, 1),
                                         (1, 2, 2, 1), "VALID"),
             lambda a: lax.reduce_window(a, 1., lax.add, (1, 2, 2, 1), (1, 2, 2, 1),
                                         "VALID")):
    prims = [e.primitive for e in jax.make_jaxpr(fn)(x).jaxpr.eqns]
    assert lax.reduce_window_sum_p not in prims


def test_reduce_window_sum_factor():
  """Window of 2, stride 2, one pad on the left: rows are [1 0 0 0 0], [0 1 1 0 0], ..."""
  x = jnp.ones((5,))
  fn = _window_sum((2,), (2,), ((1, 0),))
  result = _rule_result(lax.reduce_window_sum_p, fn, x)
  expected = np.array([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]])
  np.testing.assert_array_equal(result.factor(x), expected)
  assert result.reads == ()


# ---------------------------------------------------------------------------- cumsum


@pytest.mark.parametrize("rank,axis", [(1, 0), (2, 0), (2, 1), (4, 1), (4, 3)])
@pytest.mark.parametrize("reverse", [False, True])
@given(shape=SHAPES, seed=SEEDS)
def test_cumsum(rank, axis, reverse, shape, seed):
  fn = lambda a: lax.cumsum(a, axis, reverse=reverse)  # noqa: E731
  check = _check(lax.cumsum_p, fn, _normal(seed, shape[:rank]))
  assert check.structure == Structure(trace=tuple((d, d) for d in range(rank) if d != axis))


@pytest.mark.parametrize("reverse", [False, True])
def test_cumsum_factor(reverse):
  x = jnp.ones((3,))
  result = _rule_result(lax.cumsum_p, lambda a: lax.cumsum(a, 0, reverse=reverse), x)
  lower = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]])
  np.testing.assert_array_equal(result.factor(x), lower.T if reverse else lower)
  assert result.reads == ()


@pytest.mark.parametrize("prim,fn", [
    (lax.reduce_sum_p, lambda a: a.sum((0, 2))),
    (lax.reduce_window_sum_p, _window_sum((1, 2, 2, 1), (1, 1, 2, 1), "SAME")),
    (lax.cumsum_p, lambda a: lax.cumsum(a, 1))])
@given(shape=SHAPES, seed=SEEDS)
def test_float32(prim, fn, shape, seed):
  x = _normal(seed, shape, jnp.float32)
  assert _rule_result(prim, fn, x).factor(x).dtype == jnp.float32
  assert _check(prim, fn, x).structure is not None

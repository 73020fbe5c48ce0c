"""Structural rules: factor vs jax.jacfwd and declared structure, via check_rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax import lax

from ntk_compiler import rules
from ntk_compiler.check import check_rule
from ntk_compiler.rules import EqnInfo
from ntk_compiler.rules import structural as sr
from ntk_compiler.structure import Structure
import tiers
from rule_helpers import check as _check, rule_result as _rule_result, normal as _normal

SEEDS = st.integers(0, 2**16)
SIZES = st.sampled_from([2, 3, 4])


def _sizes(data, rank):
  return data.draw(st.tuples(*[SIZES] * rank))


def test_registered():
  expected = {
      lax.broadcast_in_dim_p: sr.broadcast_in_dim_rule, lax.reshape_p: sr.reshape_rule,
      lax.transpose_p: sr.transpose_rule, lax.squeeze_p: sr.squeeze_rule,
      lax.rev_p: sr.rev_rule, lax.concatenate_p: sr.concatenate_rule,
      lax.pad_p: sr.pad_rule, lax.slice_p: sr.slice_rule}
  for prim, rule in expected.items():
    assert rules._DEFAULT[prim] is rule, prim


@pytest.mark.parametrize("w_shape,y_shape,dims,expected", [
    ((3,), (2, 3), (1,), Structure(trace=((1, 0),), tiled=(0,))),
    ((3,), (3, 2), (0,), Structure(trace=((0, 0),), tiled=(1,))),
    ((1, 3), (4, 3), (0, 1), Structure(trace=((1, 1),), tiled=(0,), w_tiled=(0,))),
    ((2, 1), (2, 5, 4), (0, 2), Structure(trace=((0, 0),), tiled=(1, 2), w_tiled=(1,))),
    ((), (2, 3), (), Structure(tiled=(0, 1))),
    ((2, 1, 3), (2, 4, 3), (0, 1, 2),
     Structure(trace=((0, 0), (2, 2)), tiled=(1,), w_tiled=(1,))),
    ((1, 3), (1, 2, 3), (0, 2), Structure(trace=((0, 0), (2, 1)), tiled=(1,)))])
@given(seed=SEEDS)
def test_broadcast_in_dim(w_shape, y_shape, dims, expected, seed):
  fn = lambda a: lax.broadcast_in_dim(a, y_shape, dims)  # noqa: E731
  assert _check(lax.broadcast_in_dim_p, fn, _normal(seed, w_shape)).structure == expected


@pytest.mark.parametrize("w_shape,y_shape", [
    ((2, 3), (1, 2, 1, 3)), ((2, 1, 3), (2, 3)), ((1, 4), (4, 1)), ((1,), ()),
    ((), (1, 1)), ((1, 2, 1), (2,))])
@given(seed=SEEDS)
def test_reshape_unit_axes(w_shape, y_shape, seed):
  fn = lambda a: lax.reshape(a, y_shape)  # noqa: E731
  check = _check(lax.reshape_p, fn, _normal(seed, w_shape))
  assert check.structure is not None and not check.structure.diagonal
  assert len(check.structure.trace) == sum(n != 1 for n in w_shape)


@pytest.mark.parametrize("w_shape,y_shape", [
    ((2, 3), (3, 2)), ((2, 3), (6,)), ((6,), (2, 3)), ((2, 1, 3), (3, 2)),
    ((4,), (2, 2, 1))])
@given(seed=SEEDS)
def test_reshape_general_rebases(w_shape, y_shape, seed):
  fn = lambda a: lax.reshape(a, y_shape)  # noqa: E731
  w = _normal(seed, w_shape)
  assert _rule_result(lax.reshape_p, fn, w).rebase
  _check(lax.reshape_p, fn, w)  # the Jacobian is a permutation matrix


def test_reshape_with_dimensions_declines():
  fn = lambda a: lax.reshape(a, (3, 2), dimensions=(1, 0))  # noqa: E731
  assert _rule_result(lax.reshape_p, fn, jnp.ones((2, 3))) is None


@given(data=st.data(), seed=SEEDS)
def test_transpose(data, seed):
  shape = data.draw(st.sampled_from([(2, 3), (2, 3, 4), (1, 3, 2)]))
  perm = tuple(data.draw(st.permutations(range(len(shape)))))
  fn = lambda a: lax.transpose_p.bind(a, permutation=perm)  # noqa: E731  (keeps identity)
  check = _check(lax.transpose_p, fn, _normal(seed, shape))
  assert check.structure == Structure(trace=tuple(enumerate(perm)))


@pytest.mark.parametrize("w_shape,dims", [
    ((1, 3), (0,)), ((2, 1, 3), (1,)), ((1, 2, 1), (0, 2)), ((1,), (0,))])
@given(seed=SEEDS)
def test_squeeze(w_shape, dims, seed):
  fn = lambda a: lax.squeeze(a, dims)  # noqa: E731
  check = _check(lax.squeeze_p, fn, _normal(seed, w_shape))
  assert check.structure.w_tiled == dims
  assert len(check.structure.trace) == len(w_shape) - len(dims)


@pytest.mark.parametrize("dims", [(0,), (1,), (0, 2), (0, 1, 2)])
@given(data=st.data(), seed=SEEDS)
def test_rev(dims, data, seed):
  shape = _sizes(data, 3)
  fn = lambda a: lax.rev(a, dims)  # noqa: E731
  check = _check(lax.rev_p, fn, _normal(seed, shape))
  kept = tuple((a, a) for a in range(3) if a not in dims)
  assert check.structure == Structure(trace=kept)


@pytest.mark.parametrize("dimension", [0, 1])
@pytest.mark.parametrize("argnum", [0, 1, 2])
@given(data=st.data(), seed=SEEDS)
def test_concatenate(dimension, argnum, data, seed):
  other = data.draw(SIZES)
  lengths = data.draw(st.tuples(*[st.sampled_from([1, 2, 3])] * 3))
  shapes = [(n, other) if dimension == 0 else (other, n) for n in lengths]
  args = [_normal(seed + k, s) for k, s in enumerate(shapes)]
  fn = lambda a, b, c: lax.concatenate([a, b, c], dimension)  # noqa: E731
  check = _check(lax.concatenate_p, fn, *args, argnum=argnum)
  assert check.structure == Structure(trace=((1 - dimension, 1 - dimension),))


PAD_CONFIGS = [
    ((1, 2, 0), (0, 0, 0)),
    ((0, 0, 0), (-1, 1, 0)),
    ((0, -1, 1), (2, 0, 2)),
    ((-1, -1, 1), (1, 0, 0)),
    ((0, 0, 0), (0, 0, 3)),
    ((1, 0, 1), (0, 0, 0), (-1, 2, 0))]


# The default tier: interior, negative and edge padding each once; the full tier all.
PAD_TIERED = tiers.representative(
    [pytest.param(c, id=str(c)) for c in PAD_CONFIGS],
    lambda config: {"interior" if any(c[2] for c in config) else "no_interior",
                    "negative" if any(min(c[:2]) < 0 for c in config) else "no_negative"})


@pytest.mark.parametrize("config", PAD_TIERED)
@given(data=st.data(), seed=SEEDS)
def test_pad_operand(config, data, seed):
  w = _normal(seed, _sizes(data, len(config)))
  fn = lambda a, v: lax.pad(a, v, config)  # noqa: E731
  check = _check(lax.pad_p, fn, w, jnp.asarray(0.5), argnum=0)
  kept = tuple((a, a) for a, c in enumerate(config) if c == (0, 0, 0))
  assert check.structure == Structure(trace=kept)


@pytest.mark.parametrize("config", PAD_TIERED)
@given(data=st.data(), seed=SEEDS)
def test_pad_value(config, data, seed):
  w = _normal(seed, _sizes(data, len(config)))
  fn = lambda a, v: lax.pad(a, v, config)  # noqa: E731
  check = _check(lax.pad_p, fn, w, jnp.asarray(0.5), argnum=1)
  assert check.structure == Structure()


SLICES = {
    "full": lambda n: (0, n, 1), "tail": lambda n: (1, n, 1),
    "head": lambda n: (0, n - 1, 1), "stride2": lambda n: (0, n, 2),
    "mid_stride": lambda n: (1, n, 2), "stride3": lambda n: (0, n, 3)}


@pytest.mark.parametrize("kinds", [
    ("full", "tail"), ("head", "full"), ("stride2", "full"), ("mid_stride", "head"),
    ("stride3", "stride2", "full"), ("tail", "full", "head")])
@given(data=st.data(), seed=SEEDS)
def test_slice(kinds, data, seed):
  shape = _sizes(data, len(kinds))
  start, limit, strides = zip(*(SLICES[k](n) for k, n in zip(kinds, shape)))
  strides = None if set(strides) == {1} else strides
  fn = lambda a: lax.slice(a, start, limit, strides)  # noqa: E731
  check = _check(lax.slice_p, fn, _normal(seed, shape))
  kept = tuple((a, a) for a, k in enumerate(kinds) if k == "full")
  assert check.structure == Structure(trace=kept)


def test_slice_factor_is_compact():
  fn = lambda a: lax.slice(a, (0, 1), (4, 5), (2, 1))  # noqa: E731
  result = _rule_result(lax.slice_p, fn, jnp.ones((4, 5)))
  assert result.reads == ()
  # Two (y_len, w_len) selections, y axes first: (2, 4) rows x (4, 5) columns.
  assert result.factor().shape == (2, 4, 4, 5)


def test_non_float_declines():
  ints = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
  assert _rule_result(lax.transpose_p, lambda a: a.T, ints) is None
  assert _rule_result(lax.slice_p, lambda a: a[1:], ints) is None


@pytest.mark.parametrize("shape,sections,axis", [
    ((2, 5), [1, 3], 1), ((6, 3), 3, 0), ((2, 4, 6), [2], 2), ((4,), [1, 2, 3], 0)])
@given(seed=SEEDS)
def test_split(shape, sections, axis, seed):
  """Each output of split is a selection along the axis; every output is checked."""
  check = _check(lax.split_p, lambda w: jnp.split(w, sections, axis=axis),
                 _normal(seed, shape))
  others = tuple((a, a) for a in range(len(shape)) if a != axis)
  assert check.structure == Structure(trace=others)

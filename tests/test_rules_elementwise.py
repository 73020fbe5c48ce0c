"""Elementwise rules: factor vs jax.jacfwd and declared structure, via check_rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax import lax
from jax.extend.core import primitives as prims

from ntk_compiler import rules
from ntk_compiler.check import check_rule
from ntk_compiler.rules import EqnInfo
from ntk_compiler.rules import elementwise as ew
from ntk_compiler.structure import Structure
import tiers
from rule_helpers import check as _check, rule_result as _rule_result, normal as _normal

SHAPES = st.sampled_from([(3,), (2, 3), (2, 1, 4)])
SEEDS = st.integers(0, 2**16)

BINARY = {
    "mul": (lax.mul_p, lambda a, b: a * b),
    "div": (lax.div_p, lambda a, b: a / b),
    "add": (lax.add_p, lambda a, b: a + b),
    "sub": (lax.sub_p, lambda a, b: a - b),
}


def _away_from_zero(seed, shape):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(1.0, 2.0, shape) * rng.choice([-1.0, 1.0], shape))


def _all_pairs(ndim):
  return tuple((a, a) for a in range(ndim))


def test_registered():
  expected = {
      lax.mul_p: ew.mul_rule, lax.div_p: ew.div_rule, lax.add_p: ew.add_rule,
      lax.sub_p: ew.sub_rule, prims.add_jaxvals_p: ew.add_any_rule,
      lax.neg_p: ew.neg_rule, lax.convert_element_type_p: ew.convert_element_type_rule,
      prims.copy_p: ew.copy_rule, lax.reduce_precision_p: ew.reduce_precision_rule,
      lax.select_n_p: ew.select_n_rule}
  for prim, rule in expected.items():
    assert rules._DEFAULT[prim] is rule, prim


# The default tier: each (primitive, operand) and each layout once; the full tier all.
@pytest.mark.parametrize("name,argnum,layout", tiers.representative(
    [(name, argnum, layout)
     for name, argnum in [("mul", 0), ("mul", 1), ("div", 0), ("add", 0), ("add", 1),
                          ("sub", 0), ("sub", 1)]
     for layout in ["same", "other_scalar", "w_scalar", "scalars", "w_bcast", "other_bcast"]],
    lambda name, argnum, layout: [(name, argnum), layout]))
@given(shape=SHAPES, seed=SEEDS)
def test_binary(name, argnum, layout, shape, seed):
  prim, fn = BINARY[name]
  unit = tuple(1 if a == 0 else n for a, n in enumerate(shape))  # size 1 on axis 0
  w_shape = {"w_scalar": (), "scalars": (), "w_bcast": unit}.get(layout, shape)
  o_shape = {"other_scalar": (), "scalars": (), "other_bcast": unit}.get(layout, shape)
  w, other = _normal(seed, w_shape), _away_from_zero(seed + 1, o_shape)
  args = (w, other) if argnum == 0 else (other, w)
  check = _check(prim, fn, *args, argnum=argnum)
  y_shape = jnp.broadcast_shapes(w_shape, o_shape)
  # Per y axis: w full & other varying -> diagonal; w full -> trace; w broadcast &
  # other varying -> free; w broadcast -> tiled. (Size-1 axes never vary.)
  varies = lambda a: (name in ("mul", "div") and len(o_shape) == len(y_shape)
                      and o_shape[a] == y_shape[a] > 1)
  w_full = lambda a: len(w_shape) == len(y_shape) and w_shape[a] == y_shape[a]
  axes = range(len(y_shape))
  expected = Structure(
      trace=tuple((a, a) for a in axes if w_full(a) and not varies(a)),
      diagonal=tuple((a, a) for a in axes if w_full(a) and varies(a)),
      tiled=tuple(a for a in axes if not w_full(a) and not varies(a)),
      w_tiled=tuple(a for a in range(len(w_shape)) if not w_full(a)))
  assert check.structure == expected


@pytest.mark.parametrize("prim,fn", [
    (lax.mul_p, lambda a: a * 2.5), (lax.mul_p, lambda a: 2.5 * a),
    (lax.div_p, lambda a: a / 4.0), (lax.add_p, lambda a: 1.0 + a),
    (lax.sub_p, lambda a: 1.0 - a), (lax.sub_p, lambda a: a - 1.0)])
@given(shape=SHAPES, seed=SEEDS)
def test_binary_with_literal(prim, fn, shape, seed):
  check = _check(prim, fn, _normal(seed, shape))
  assert check.structure == Structure(trace=_all_pairs(len(shape)))


@given(shape=SHAPES, seed=SEEDS)
def test_div_denominator_declines(shape, seed):
  args = _normal(seed, shape), _away_from_zero(seed, shape)
  assert _rule_result(lax.div_p, BINARY["div"][1], *args, argnum=1) is (
      rules.NONLINEAR_OPERAND)
  assert _check(lax.div_p, BINARY["div"][1], *args, argnum=1).structure is None


def test_non_float_declines():
  ints = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
  assert _rule_result(lax.mul_p, lambda a, b: a * b, ints, ints) is None
  assert _rule_result(lax.add_p, lambda a, b: a + b, ints, ints) is None
  to_int = lambda a: lax.convert_element_type(a, jnp.int32)
  assert _rule_result(lax.convert_element_type_p, to_int, jnp.ones(3)) is None
  to_float = lambda a: lax.convert_element_type(a, jnp.float64)
  assert _rule_result(lax.convert_element_type_p, to_float, ints) is None


@pytest.mark.parametrize("prim,fn,sign", [
    (lax.neg_p, lambda a: -a, -1.0),
    (lax.convert_element_type_p, lambda a: lax.convert_element_type(a, jnp.float32), 1.0),
    (prims.copy_p, prims.copy_p.bind, 1.0),
    (lax.reduce_precision_p, lambda a: lax.reduce_precision(a, 8, 23), 1.0)])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@given(shape=SHAPES, seed=SEEDS)
def test_identity_like(prim, fn, sign, dtype, shape, seed):
  if prim is lax.convert_element_type_p and dtype == jnp.float32:
    fn = lambda a: lax.convert_element_type(a, jnp.float64)  # noqa: E731
  check = _check(prim, fn, _normal(seed, shape, dtype))
  assert check.structure == Structure(trace=_all_pairs(len(shape)))
  result = _rule_result(prim, fn, _normal(seed, shape, dtype))
  assert result.reads == () and float(result.factor(None)) == sign


@pytest.mark.parametrize("argnum", [0, 1])
@given(shape=SHAPES, seed=SEEDS)
def test_add_any(argnum, shape, seed):
  args = _normal(seed, shape), _normal(seed + 1, shape)
  check = _check(prims.add_jaxvals_p, prims.add_jaxvals_p.bind, *args, argnum=argnum)
  assert check.structure == Structure(trace=_all_pairs(len(shape)))


def _select_args(seed, shape, pred_dtype, cases, pred_shape=None):
  rng = np.random.default_rng(seed)
  pred_shape = shape if pred_shape is None else pred_shape
  pred = rng.integers(0, cases, pred_shape)
  pred = jnp.asarray(pred.astype(bool) if pred_dtype == jnp.bool_ else pred, pred_dtype)
  return (pred,) + tuple(_normal(seed + k, shape) for k in range(1, cases + 1))


@pytest.mark.parametrize("pred_dtype,cases,argnum", [
    (jnp.bool_, 2, 1), (jnp.bool_, 2, 2),
    (jnp.int32, 3, 1), (jnp.int32, 3, 2), (jnp.int32, 3, 3)])
@given(shape=SHAPES, seed=SEEDS)
def test_select_n(pred_dtype, cases, argnum, shape, seed):
  args = _select_args(seed, shape, pred_dtype, cases)
  check = _check(lax.select_n_p, lax.select_n, *args, argnum=argnum)
  # Size-1 axes cannot vary: they are traced, the others diagonal.
  unit = tuple(a for a, n in enumerate(shape) if n == 1)
  assert check.structure == Structure(
      trace=tuple((a, a) for a in unit),
      diagonal=tuple((a, a) for a in range(len(shape)) if a not in unit))
  result = _rule_result(lax.select_n_p, lax.select_n, *args, argnum=argnum)
  mask = np.asarray(args[0]).astype(np.int32) == argnum - 1
  np.testing.assert_array_equal(result.factor(*args),
                                np.squeeze(mask, unit).astype(np.float64))


@pytest.mark.parametrize("argnum", [1, 2, 3])
@given(shape=SHAPES, seed=SEEDS)
def test_select_n_scalar_predicate(argnum, shape, seed):
  args = _select_args(seed, shape, jnp.int32, 3, pred_shape=())
  check = _check(lax.select_n_p, lax.select_n, *args, argnum=argnum)
  assert check.structure == Structure(trace=_all_pairs(len(shape)))


@pytest.mark.parametrize("pred_dtype,cases", [(jnp.bool_, 2), (jnp.int32, 3)])
def test_select_n_predicate_declines(pred_dtype, cases):
  args = _select_args(0, (2, 3), pred_dtype, cases)
  assert _rule_result(lax.select_n_p, lax.select_n, *args, argnum=0) is None

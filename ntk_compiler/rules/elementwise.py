"""Rules for the elementwise primitives that are linear in an operand.

`mul`, `div` (numerator), `add`, `sub`, `add_any`, `select_n` (cases) and the unary
identities (`neg`, `convert_element_type`, `copy`, `reduce_precision`). Binary ops may
pair an array with a scalar (`mul a 2.0:f32[]`); both orders are handled.

Complex values: a view's factors compose complex-linear maps (the engine pairs the real
parts of the two sides' complex products). A real parameter enters them through a cast
to complex or `complex(re, im)` (factors 1 and 1j); the real-valued maps of a complex
operand (`real`, `imag`, a complex -> real cast) and `conj` are not complex-linear: the
cotangent is taken at their operand (NOT_COMPLEX_LINEAR), which is no larger.

`device_put` is left out: it has several operands and outputs (one per array put).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as prims

from ntk_compiler.rules import (NONLINEAR_OPERAND, NOT_COMPLEX_LINEAR, EqnInfo, Rule,
                                RuleResult, register_rule)
from ntk_compiler.structure import Structure


def _is_float(aval) -> bool:
  """Real or complex floating point."""
  return jnp.issubdtype(aval.dtype, jnp.inexact)


def _is_complex(aval) -> bool:
  return jnp.issubdtype(aval.dtype, jnp.complexfloating)


def _floats(eqn: EqnInfo, operand: int) -> bool:
  return _is_float(eqn.in_avals[operand]) and _is_float(eqn.out_aval)


def _pairs(ndim: int):
  return tuple((a, a) for a in range(ndim))


def _scaled(eqn: EqnInfo, operand: int, coef: Callable, coef_shape: tuple,
            reads: tuple[int, ...]) -> RuleResult:
  """y = coef * w elementwise, with size-1 (or rank-0) broadcasting of coef and w.

  Per y axis a: w and coef both full -> diagonal; w full, coef constant -> trace;
  w broadcast (size 1), coef full -> a free y axis; both constant -> tiled. w's size-1
  axes are w_tiled.
  """
  y_shape = tuple(eqn.out_aval.shape)
  w_shape = tuple(eqn.in_avals[operand].shape)
  ndim = len(y_shape)
  # A 0-sized axis counts as varying: the factor keeps it (empty), none is squeezed.
  varies = lambda shape, a: len(shape) == ndim and shape[a] == y_shape[a] != 1
  w_full = lambda a: len(w_shape) == ndim and w_shape[a] == y_shape[a]
  trace, diagonal, tiled, free = [], [], [], []
  for a in range(ndim):
    if w_full(a):
      (diagonal if varies(coef_shape, a) else trace).append((a, a))
    else:
      (free if varies(coef_shape, a) else tiled).append(a)
  w_tiled = tuple(a for a in range(len(w_shape)) if not w_full(a))
  structure = Structure(trace=tuple(trace), diagonal=tuple(diagonal), tiled=tuple(tiled),
                        w_tiled=w_tiled)
  keep = free + [a for a, _ in diagonal]  # the factor's axes, in factor order
  dtype = eqn.out_aval.dtype

  def factor(*ops):
    c = jnp.asarray(coef(*ops), dtype)
    if c.ndim == 0:
      return jnp.broadcast_to(c, tuple(y_shape[a] for a in keep))
    c = jnp.broadcast_to(c, tuple(y_shape[a] if a in keep else c.shape[a]
                                  for a in range(ndim)))
    drop = tuple(a for a in range(ndim) if a not in keep)
    return jnp.transpose(jnp.squeeze(c, drop) if drop else c,
                         tuple(sorted(keep).index(a) for a in keep))
  return RuleResult(structure, factor, reads)


def _constant(value: float) -> Callable:
  return lambda *ops: value


def def_identity(primitive, sign: float = 1.0) -> Rule:
  """Registers the rule of a unary primitive with y = sign * w (float operands only).

  Args:
    primitive: the JAX Primitive, e.g. `jax.lax.neg_p`.
    sign: the constant scale, 1.0 or -1.0.

  Returns:
    The registered rule: every axis traced, with the scalar `sign` as factor.
    (This module registers `neg` as `def_identity(lax.neg_p, -1.0)`.)
  """
  @register_rule(primitive)
  def rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
    if not _floats(eqn, operand):
      return None
    if _is_complex(eqn.in_avals[operand]) and not _is_complex(eqn.out_aval):
      return NOT_COMPLEX_LINEAR  # a complex -> real cast takes the real part
    return _scaled(eqn, operand, _constant(sign), (), ())
  return rule


neg_rule = def_identity(lax.neg_p, -1.0)
convert_element_type_rule = def_identity(lax.convert_element_type_p)
copy_rule = def_identity(prims.copy_p)
reduce_precision_rule = def_identity(lax.reduce_precision_p)


def def_additive(primitive, signs: tuple[float, float]) -> Rule:
  """Registers the rule of y = signs[0] * w0 + signs[1] * w1 (add, sub, add_any)."""
  @register_rule(primitive)
  def rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
    if not _floats(eqn, operand):
      return None
    return _scaled(eqn, operand, _constant(signs[operand]), (), ())
  return rule


add_rule = def_additive(lax.add_p, (1.0, 1.0))
sub_rule = def_additive(lax.sub_p, (1.0, -1.0))
add_any_rule = def_additive(prims.add_jaxvals_p, (1.0, 1.0))


@register_rule(lax.mul_p)
def mul_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """The other operand is the factor: diagonal, traced if it is a scalar."""
  if not _floats(eqn, operand):
    return None
  other = 1 - operand
  return _scaled(eqn, operand, lambda *ops: ops[other],
                 eqn.in_avals[other].shape, (other,))


@register_rule(lax.div_p)
def div_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """The numerator only, with factor 1 / denominator; the denominator is not linear."""
  if not _floats(eqn, operand):
    return None
  if operand == 1:
    return NONLINEAR_OPERAND
  return _scaled(eqn, operand, lambda *ops: 1 / jnp.asarray(ops[1]),
                 eqn.in_avals[1].shape, (1,))


@register_rule(lax.select_n_p)
def select_n_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """Case k is kept where the predicate equals k (False/True for cases 0/1)."""
  if operand == 0 or not _floats(eqn, operand):
    return None
  case = operand - 1

  def mask(*ops):
    return jnp.asarray(ops[0]).astype(jnp.int32) == case
  return _scaled(eqn, operand, mask, eqn.in_avals[0].shape, (0,))


@register_rule(lax.complex_p)
def complex_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """y = re + 1j * im: the real operands enter a complex view with factors 1 and 1j."""
  if not _floats(eqn, operand):
    return None
  return _scaled(eqn, operand, _constant((1.0, 1j)[operand]), (), ())


def def_not_complex_linear(primitive) -> Rule:
  """Registers the rule of a map that is linear over the reals but not complex-linear
  in a complex operand (`real`, `imag`, `conj`): the cotangent is taken at the operand."""
  @register_rule(primitive)
  def rule(eqn: EqnInfo, operand: int):
    return NOT_COMPLEX_LINEAR if _is_complex(eqn.in_avals[operand]) else None
  return rule


real_rule = def_not_complex_linear(lax.real_p)
imag_rule = def_not_complex_linear(lax.imag_p)
conj_rule = def_not_complex_linear(lax.conj_p)

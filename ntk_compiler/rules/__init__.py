"""Per-primitive structure rules, keyed by the `Primitive` object.

A rule is called for one operand of one equation that a parameter flows into:

    rule(eqn: EqnInfo, operand: int) -> RuleResult | None

and returns the `Structure` of ∂y/∂(that operand) with a function computing the compact
factor, or None when it has nothing better than a dense Jacobian for this case (the
engine then takes the cotangent at the operand itself: exact, just slower).

The rule modules (one per primitive family) register into the default registry on
import; users add their own with `register_rule`, or pass `rules=` to `compile_ntk`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ntk_compiler import compat
from ntk_compiler.structure import Structure


@dataclasses.dataclass(frozen=True)
class EqnInfo:
  """What a rule sees of an equation: its primitive, params and abstract values."""
  primitive: Any
  params: Mapping[str, Any]
  in_avals: tuple[Any, ...]
  out_avals: tuple[Any, ...]

  @property
  def out_aval(self):
    return self.out_avals[0]


@dataclasses.dataclass(frozen=True)
class RuleResult:
  """A rule's answer for one operand w of y = prim(...).

  Attributes:
    structure: the `Structure` of ∂y/∂w.
    factor: `factor(*operands) -> array` of `structure.factor_shape(y.shape, w.shape)`;
      it is given every operand's value (w's included) and may read those in `reads`.
    reads: indices of the operands whose values the factor depends on. () means the
      factor depends on shapes and params only (a selection matrix, a constant).
    rebase: for bijections of entries that labels cannot express (a general reshape):
      no structure or factor; the engine re-indexes the parameter instead.
    dense: the factor is a dense Jacobian block (exact, checkable, but no cheaper than
      the cotangent at the operand): the engine stops the view before this equation.
    one_hot: for a selection (gather, dynamic_slice, scatter-add): the factor is 0/1
      with at most one 1 along this factor axis, and `factor` returns the integer
      position of that 1 instead (an array of the factor's shape without this axis;
      -1 for none). The engine then compares positions where it would multiply
      one-hot matrices: the embedding term Σ [id1 = id2] ⟨ct1, ct2⟩.
  """
  structure: Structure | None
  factor: Callable[..., Any] | None
  reads: tuple[int, ...] = ()
  rebase: bool = False
  dense: bool = False
  one_hot: int | None = None


Rule = Callable[[EqnInfo, int], "RuleResult | None"]


class _NonlinearOperand:
  def __repr__(self):
    return "NONLINEAR_OPERAND"


# What a rule returns for an operand the primitive is nonlinear in (div's denominator):
# the engine takes the cotangent there, which loses nothing and is not a fallback.
NONLINEAR_OPERAND = _NonlinearOperand()


def _nonlinear_primitives() -> frozenset:
  names = ["tanh", "exp", "exp2", "log", "log1p", "expm1", "logistic", "sin", "cos",
           "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh",
           "atanh", "sqrt", "rsqrt", "cbrt", "pow", "integer_pow", "square", "max",
           "min", "abs", "sign", "erf", "erfc", "erf_inv", "lgamma", "digamma", "floor",
           "ceil", "round", "rem", "clamp", "nextafter", "is_finite", "reduce_max",
           "reduce_min", "reduce_prod", "argmax", "argmin", "sort", "cumprod", "cummax",
           "cummin", "cumlogsumexp", "reduce_window_max", "reduce_window_min",
           "select_and_gather_add", "logaddexp", "polygamma", "igamma",
           "bessel_i0e", "bessel_i1e", "top_k"]
  from jax import lax
  return frozenset(getattr(lax, f"{n}_p") for n in names if hasattr(lax, f"{n}_p"))


# Primitives nonlinear in every operand: a parameter's view ends before them with no
# loss (the cotangent at their input is all there is), not as a dense fallback.
NONLINEAR = _nonlinear_primitives()

_DEFAULT: dict[Any, Rule] = {}


def _check_primitive(primitive) -> None:
  if not isinstance(primitive, compat.Primitive):
    raise TypeError(
        f"rules are keyed by JAX Primitive objects (e.g. jax.lax.mul_p), got "
        f"{primitive!r} of type {type(primitive).__name__}.")


def register_rule(primitive: compat.Primitive) -> Callable[[Rule], Rule]:
  """Registers a structure rule for `primitive` in the default registry.

  Args:
    primitive: the JAX `Primitive` object (e.g. `jax.lax.dot_general_p`), never its
      name: names drift between JAX releases.

  Returns:
    A decorator that registers `rule(eqn: EqnInfo, operand: int) -> RuleResult | None`
    and returns it unchanged.

  Raises:
    TypeError: `primitive` is not a JAX Primitive.

  Example:
    >>> import jax, ntk_compiler as nc
    >>> from ntk_compiler.rules import RuleResult
    >>> @nc.register_rule(jax.lax.neg_p)
    ... def neg_rule(eqn, operand):
    ...   ndim = len(eqn.out_aval.shape)
    ...   pairs = tuple((a, a) for a in range(ndim))
    ...   return RuleResult(nc.Structure(trace=pairs), lambda *ops: -1.0)
  """
  _check_primitive(primitive)

  def register(rule: Rule) -> Rule:
    _DEFAULT[primitive] = rule
    return rule
  return register


def registry(overlay: Mapping[Any, Rule] | None = None) -> dict[Any, Rule]:
  """The default rules with `overlay` on top; a fresh dict the caller may change.

  Raises:
    TypeError: a key of `overlay` is not a Primitive, or a value is not callable.
  """
  _load_default_rules()
  rules = dict(_DEFAULT)
  for primitive, rule in (overlay or {}).items():
    _check_primitive(primitive)
    if rule is not None and not callable(rule):
      raise TypeError(f"the rule for {primitive} in rules= must be callable or None "
                      f"(None switches the default rule off), got {rule!r}.")
    rules[primitive] = rule
  return {p: r for p, r in rules.items() if r is not None}


_LOADED = False


def _load_default_rules() -> None:
  global _LOADED
  if not _LOADED:
    _LOADED = True
    from ntk_compiler.rules import (  # noqa: F401  (registration on import)
        elementwise, linear, reductions, selection, structural)

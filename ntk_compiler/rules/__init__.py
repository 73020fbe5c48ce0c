"""Per-primitive structure rules, keyed by the `Primitive` object.

A rule is called for one operand of one equation that a parameter flows into:

    rule(eqn: EqnInfo, operand: int) -> RuleResult | None

and returns the `Structure` of ∂y/∂(that operand) with a function computing the compact
factor, or None when it has nothing better than a dense Jacobian for this case (the
engine then takes the cotangent at the operand itself: exact, just slower), or a
`CutBefore` when the cotangent at the operand is all there is, with no loss and not a
fallback: NONLINEAR_OPERAND (div's denominator), NOT_COMPLEX_LINEAR (`real`, `imag`,
`irfft` of a complex operand: a view's factors compose complex-linear maps).

The rule modules (one per primitive family) register the built-in rules on import.
Users add their own with `register_rule` (undone by `unregister_rule`; `rules_overlay`
registers some for a `with` block only), or pass `rules=` to `compile_ntk`. A user's
rule wins over the built-in rule and over the built-in set of nonlinear primitives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping
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
    grows: y is w placed into a larger array, zeros elsewhere (pad, a window written
      by scatter or dynamic_update_slice): a view that already carries a per-example
      factor stops before this equation, where its cotangent is smaller and holds the
      same numbers.
  """
  structure: Structure | None
  factor: Callable[..., Any] | None
  reads: tuple[int, ...] = ()
  rebase: bool = False
  dense: bool = False
  one_hot: int | None = None
  grows: bool = False


Rule = Callable[[EqnInfo, int], "RuleResult | None"]


class CutBefore:
  """A rule's answer for an operand whose cotangent is taken before the equation, with
  no loss and not as a fallback; `reason` (formatted with `operand`) says why."""

  def __init__(self, name: str, reason: str):
    self.name, self.reason = name, reason

  def __repr__(self):
    return self.name


# What a rule returns for an operand the primitive is nonlinear in (div's denominator):
# the engine takes the cotangent there, which loses nothing and is not a fallback.
NONLINEAR_OPERAND = CutBefore("NONLINEAR_OPERAND", "nonlinear in operand {operand}")
# What a rule returns for a complex operand of a real-valued linear map (real, imag,
# conj, irfft, a complex -> real cast): a view's factors compose complex-linear maps
# only, so the cotangent is taken at the complex operand, a value of the same size.
NOT_COMPLEX_LINEAR = CutBefore(
    "NOT_COMPLEX_LINEAR", "not complex-linear in operand {operand}: the cotangent is "
    "taken at the complex value")


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

# The rules in effect: the built-in ones, each replaced by the latest user registration.
_DEFAULT: dict[Any, Rule] = {}
# The rules the modules of this package register at their import.
_BUILTIN: dict[Any, Rule] = {}
# Per primitive, the user's registrations, latest last (None: the rule switched off).
_USER: dict[Any, list[Rule | None]] = {}
_BUILTIN_MODULES = frozenset(
    f"{__name__}.{m}" for m in ("elementwise", "linear", "reductions", "selection",
                                "structural"))


def _check_primitive(primitive) -> None:
  if not isinstance(primitive, compat.Primitive):
    raise TypeError(
        f"rules are keyed by JAX Primitive objects (e.g. jax.lax.mul_p), got "
        f"{primitive!r} of type {type(primitive).__name__}.")


def _check_rule(primitive, rule, where: str) -> None:
  if rule is not None and not callable(rule):
    raise TypeError(f"the rule for {primitive} in {where} must be callable or None "
                    f"(None switches the default rule off), got {rule!r}.")


def _registered_by_package() -> bool:
  """Whether the nearest module-level code on the stack is a built-in rule module's:
  its registrations at import are the built-in rules; any other caller's are the
  user's (even through a family factory such as `def_identity`)."""
  frame = sys._getframe(2)
  while frame is not None and frame.f_code.co_name != "<module>":
    frame = frame.f_back
  return frame is not None and frame.f_globals.get("__name__") in _BUILTIN_MODULES


def _refresh(primitive) -> None:
  stack = _USER.get(primitive)
  rule = stack[-1] if stack else _BUILTIN.get(primitive)
  if rule is None:
    _DEFAULT.pop(primitive, None)
  else:
    _DEFAULT[primitive] = rule


def register_rule(primitive: compat.Primitive) -> Callable[[Rule], Rule]:
  """Registers a structure rule for `primitive` in the default registry.

  A user's rule wins over the built-in one for the same primitive (and over the
  built-in set of nonlinear primitives, e.g. `jax.lax.sin_p`). It applies to NTK
  functions compiled after the registration; `unregister_rule` undoes it, and
  `rules_overlay` registers rules for a `with` block only.

  Args:
    primitive: the JAX `Primitive` object (e.g. `jax.lax.dot_general_p`), never its
      name: names drift between JAX releases.

  Returns:
    A decorator that registers `rule(eqn: EqnInfo, operand: int) -> RuleResult | None`
    and returns it unchanged.

  Raises:
    TypeError: `primitive` is not a JAX Primitive, or the rule is not callable.

  Example:
    >>> import jax, ntk_compiler as nc
    >>> from ntk_compiler.rules import RuleResult
    >>> @nc.register_rule(jax.lax.neg_p)
    ... def neg_rule(eqn, operand):
    ...   ndim = len(eqn.out_aval.shape)
    ...   pairs = tuple((a, a) for a in range(ndim))
    ...   return RuleResult(nc.Structure(trace=pairs), lambda *ops: -1.0)
    >>> nc.unregister_rule(jax.lax.neg_p) is neg_rule
    True
  """
  _check_primitive(primitive)
  builtin = _registered_by_package()

  def register(rule: Rule) -> Rule:
    if not callable(rule):
      raise TypeError(f"register_rule({primitive}) needs a rule function, got "
                      f"{rule!r}; use rules_overlay({{{primitive}: None}}) to switch a "
                      "rule off.")
    if builtin:
      _BUILTIN[primitive] = rule
    else:
      _USER.setdefault(primitive, []).append(rule)
    _refresh(primitive)
    return rule
  return register


def unregister_rule(primitive: compat.Primitive) -> Rule | None:
  """Undoes the latest `register_rule(primitive)`: the rule registered before it (the
  built-in one, or none) is in effect again for NTK functions compiled afterwards.

  Args:
    primitive: the JAX `Primitive` object the rule was registered for.

  Returns:
    The rule removed.

  Raises:
    TypeError: `primitive` is not a JAX Primitive.
    ValueError: no user rule is registered for `primitive` (built-in rules stay; pass
      `rules={primitive: None}` to `compile_ntk` to switch one off).

  Example:
    >>> import jax, ntk_compiler as nc
    >>> rule = nc.register_rule(jax.lax.neg_p)(lambda eqn, operand: None)
    >>> nc.unregister_rule(jax.lax.neg_p) is rule
    True
  """
  _check_primitive(primitive)
  stack = _USER.get(primitive)
  if not stack:
    raise ValueError(
        f"unregister_rule({primitive}): no rule registered with register_rule for it "
        "(built-in rules cannot be unregistered; pass rules={primitive: None} to "
        "compile_ntk to switch one off for one NTK function).")
  rule = stack.pop()
  if not stack:
    del _USER[primitive]
  _refresh(primitive)
  return rule


@contextlib.contextmanager
def rules_overlay(rules: Mapping[Any, Rule | None]) -> Iterator[None]:
  """Registers `rules` for the duration of a `with` block, then restores the registry.

  Args:
    rules: a mapping from Primitive objects to rules; a value of None switches the
      rule for that primitive off inside the block (dense fallback or, for the
      built-in nonlinear primitives, the cut before them).

  Raises:
    TypeError: a key is not a Primitive, a value neither callable nor None, or
      `rules` not a mapping.

  Example:
    >>> import jax, ntk_compiler as nc
    >>> with nc.rules_overlay({jax.lax.neg_p: None}):
    ...   ntk_fn = nc.compile_ntk(lambda p, x: -(x @ p))   # uses no neg rule
  """
  items = _checked_items(rules, "rules_overlay")
  for primitive, rule in items:
    _USER.setdefault(primitive, []).append(rule)
    _refresh(primitive)
  try:
    yield
  finally:
    for primitive, rule in reversed(items):
      stack = _USER[primitive]
      for i in range(len(stack) - 1, -1, -1):  # this block's entry, even if others
        if stack[i] is rule:                   # registered on top of it meanwhile
          del stack[i]
          break
      if not stack:
        del _USER[primitive]
      _refresh(primitive)


def _checked_items(rules, where: str) -> list:
  if not isinstance(rules, Mapping):
    raise TypeError(f"{where} takes a mapping {{primitive: rule}} (e.g. "
                    f"{{jax.lax.sin_p: my_rule}}), got {type(rules).__name__}.")
  items = list(rules.items())
  for primitive, rule in items:
    _check_primitive(primitive)
    _check_rule(primitive, rule, where)
  return items


def is_builtin(primitive, rule) -> bool:
  """Whether `rule` is the rule this package registers for `primitive` (not a user's)."""
  _load_default_rules()
  return rule is not None and _BUILTIN.get(primitive) is rule


def registry(overlay: Mapping[Any, Rule] | None = None) -> dict[Any, Rule]:
  """The default rules with `overlay` on top; a fresh dict the caller may change.

  Raises:
    TypeError: a key of `overlay` is not a Primitive, or a value is not callable.
  """
  _load_default_rules()
  rules = dict(_DEFAULT)
  for primitive, rule in _checked_items(overlay or {}, "rules="):
    rules[primitive] = rule
  return {p: r for p, r in rules.items() if r is not None}


_LOADED = False


def _load_default_rules() -> None:
  global _LOADED
  if not _LOADED:
    _LOADED = True
    from ntk_compiler.rules import (  # noqa: F401  (registration on import)
        elementwise, linear, reductions, selection, structural)

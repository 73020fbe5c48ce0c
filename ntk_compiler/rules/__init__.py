"""Per-primitive structure rules, keyed by the `Primitive` object.

The registry is filled by the rule modules (one per primitive family) as the structured
engine grows; users add their own with `register_rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ntk_compiler import compat

Rule = Callable[..., Any]

_DEFAULT: dict[compat.Primitive, Rule] = {}


def register_rule(primitive: compat.Primitive) -> Callable[[Rule], Rule]:
  """Registers a structure rule for `primitive` in the default registry.

  Args:
    primitive: the JAX `Primitive` object (e.g. `jax.lax.dot_general_p`), never its
      name: names drift between JAX releases.

  Returns:
    A decorator that registers the rule and returns it unchanged.

  Raises:
    TypeError: `primitive` is not a JAX Primitive.
  """
  if not isinstance(primitive, compat.Primitive):
    raise TypeError(
        f"register_rule needs a JAX Primitive object (e.g. jax.lax.mul_p), got "
        f"{primitive!r} of type {type(primitive).__name__}.")

  def register(rule: Rule) -> Rule:
    _DEFAULT[primitive] = rule
    return rule
  return register


def registry(overlay: Mapping[compat.Primitive, Rule] | None = None
             ) -> dict[compat.Primitive, Rule]:
  """The default rules with `overlay` on top; a fresh dict the caller may change."""
  rules = dict(_DEFAULT)
  rules.update(overlay or {})
  return rules

"""The one place that touches version-dependent JAX internals.

Supported: JAX 0.10.2 up to the newest release. Everything else in the package uses
public APIs only and reaches jaxpr internals through the helpers here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
from jax.extend import core as jex_core

Jaxpr = jex_core.Jaxpr
JaxprEqn = jex_core.JaxprEqn
Literal = jex_core.Literal
Primitive = jex_core.Primitive
Var = jex_core.Var


def open_jaxpr(j: Any) -> Any:
  """The open `Jaxpr` inside a `ClosedJaxpr` (an alias of `Jaxpr` since JAX 0.11)."""
  inner = getattr(j, "jaxpr", j)
  return inner


def sub_jaxprs(eqn: Any) -> Iterator[Any]:
  """The open jaxprs held in an equation's params (call bodies, branches, loops)."""
  for sub in jex_core.jaxprs_in_params(eqn.params):
    yield open_jaxpr(sub)


def trip_count(eqn: Any) -> int:
  """How many times an equation runs its body: `scan`'s length, else 1."""
  if eqn.primitive is jax.lax.scan_p:
    return int(eqn.params["length"])
  return 1


def bind_eqn(eqn: Any, invals: list) -> list:
  """Applies an equation's primitive to `invals`, as `jax.core.eval_jaxpr` does."""
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def read_atom(env: dict, atom: Any) -> Any:
  return atom.val if isinstance(atom, Literal) else env[atom]


def _call_primitives() -> dict:
  from jax.extend.core import primitives as p
  table = {p.jit_p: "jaxpr", p.closed_call_p: "call_jaxpr", p.remat_p: "jaxpr",
           p.call_p: "call_jaxpr"}
  return table


_CALLS: dict | None = None


def call_body(eqn: Any) -> tuple[Any, list] | None:
  """(open jaxpr, consts) of a call-like equation we may inline (jit, closed_call,
  remat / checkpoint, call); None for any other equation."""
  global _CALLS
  if _CALLS is None:
    _CALLS = _call_primitives()
  key = _CALLS.get(eqn.primitive)
  if key is None or key not in eqn.params:
    return None
  body = eqn.params[key]
  inner = open_jaxpr(body)
  if len(inner.invars) != len(eqn.invars) or len(inner.outvars) != len(eqn.outvars):
    return None
  return inner, list(getattr(body, "consts", None) or [])


def custom_derivative_primitives() -> frozenset:
  """Calls with user-defined derivatives (custom_jvp / custom_vjp), kept opaque."""
  from jax.extend.core import primitives as p
  names = ("custom_jvp_call_p", "custom_vjp_call_p", "custom_vjp_call_jaxpr_p")
  return frozenset(getattr(p, n) for n in names if hasattr(p, n))


def custom_vjp_primitives() -> frozenset:
  """Calls with a user-defined VJP: JAX cannot differentiate them in forward mode."""
  from jax.extend.core import primitives as p
  names = ("custom_vjp_call_p", "custom_vjp_call_jaxpr_p")
  return frozenset(getattr(p, n) for n in names if hasattr(p, n))


def scan_layout(eqn: Any) -> tuple[int, int] | None:
  """(num_consts, num_carry) of a `scan` equation, or None if its params say neither.

  JAX 0.12 dropped `num_consts` / `num_carry` for `ft_in` = (consts, carry, xs)."""
  params = eqn.params
  if "num_consts" in params:
    return int(params["num_consts"]), int(params["num_carry"])
  layout = params.get("ft_in")
  parts = layout.unpack() if hasattr(layout, "unpack") else layout  # a FlatTree
  if not isinstance(parts, tuple) or len(parts) != 3:
    return None
  if sum(len(part) for part in parts) != len(eqn.invars):
    return None
  return len(parts[0]), len(parts[1])


def stop_gradient_primitive() -> Any:
  """The primitive `lax.stop_gradient` binds (its home module moves between releases)."""
  closed = jax.make_jaxpr(jax.lax.stop_gradient)(1.0)
  (eqn,) = open_jaxpr(closed).eqns
  return eqn.primitive

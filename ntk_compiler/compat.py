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

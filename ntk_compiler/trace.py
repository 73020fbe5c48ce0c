"""f -> a jaxpr over the parameter leaves and the inputs (whole batch or one example)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from ntk_compiler import compat


@dataclasses.dataclass(frozen=True)
class Program:
  """f's jaxpr; invars are the parameter leaves, then the input leaves."""
  jaxpr: Any
  consts: list
  num_params: int
  out_tree: Any


def trace_program(f, params, x, per_example: bool) -> Program:
  """Traces f at the signature of (params, x); per example: x without its batch axis."""
  p_leaves, p_tree = jax.tree_util.tree_flatten(params)
  x_leaves, x_tree = jax.tree_util.tree_flatten(x)
  out_tree = []

  def flat(*args):
    p = jax.tree_util.tree_unflatten(p_tree, args[:len(p_leaves)])
    xs = jax.tree_util.tree_unflatten(x_tree, args[len(p_leaves):])
    if per_example:
      xs = jax.tree_util.tree_map(lambda a: a[None], xs)
    out = f(p, xs)
    if per_example:
      out = jax.tree_util.tree_map(lambda o: o[0], out)
    leaves, tree = jax.tree_util.tree_flatten(out)
    out_tree.append(tree)
    return leaves

  def abstract(a, drop_batch):
    shape = jax.numpy.shape(a)[1:] if drop_batch else jax.numpy.shape(a)
    return jax.ShapeDtypeStruct(shape, jax.numpy.result_type(a))

  avals = ([abstract(a, False) for a in p_leaves]
           + [abstract(a, per_example) for a in x_leaves])
  closed = jax.make_jaxpr(flat)(*avals)
  return Program(compat.open_jaxpr(closed), list(closed.consts), len(p_leaves),
                 out_tree[0])

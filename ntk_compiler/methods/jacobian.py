"""Jacobian contraction: Jacobians by reverse mode, contracted leaf by leaf."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ntk_compiler.methods.common import Problem, per_example, widen


def jacobians(problem: Problem, x) -> list:
  """∂f(x)/∂params: one params-shaped pytree per output leaf, leaves out_shape + w_shape."""
  if problem.batch_independent:
    single = jax.jacrev(per_example(problem.f))
    jac = jax.vmap(single, in_axes=(None, 0))(problem.params, x)
  else:
    jac = jax.jacrev(problem.f)(problem.params, x)
  return problem.out_tree.flatten_up_to(widen(jac))


def jacobian_ntk(problem: Problem) -> list[jax.Array]:
  """The NTK of every output leaf by Jacobian contraction."""
  with jax.named_scope("ntk/jacobian"):
    jac1 = jacobians(problem, problem.x1)
    jac2 = jac1 if problem.symmetric else jacobians(problem, problem.x2)
  return contract(problem, jac1, jac2)


def contract(problem: Problem, jac1: list, jac2: list) -> list[jax.Array]:
  """The kernels from the Jacobians of both sides (as `jacobians` returns them): tiles
  (ntk_compiler/scale.py) contract a block's Jacobians, computed once, with others."""
  kernels = []
  for k, layout in enumerate(problem.layouts):
    shape1 = problem.shapes1[k]
    side1, side2, result = layout.indices()
    first = layout.num_indices
    with jax.named_scope("ntk/contract"):
      terms = []
      for w1, w2 in zip(jax.tree_util.tree_leaves(jac1[k]),
                        jax.tree_util.tree_leaves(jac2[k])):
        w_idx = list(range(first, first + w1.ndim - layout.ndim))
        terms.append(jnp.einsum(w1, side1 + w_idx, w2, side2 + w_idx, result))
      kernels.append(sum(terms[1:], terms[0]) / layout.trace_size(shape1))
  return kernels

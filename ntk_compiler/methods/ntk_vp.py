"""NTK-vector products: Θ·v = JVP_x1(VJP_x2(v)) over a basis of x2's output space.

No Jacobian is contracted: each basis vector's cotangent in parameter space is pushed
forward through f at x1, giving one column of the kernel. Through custom_vjp functions
(no forward mode in JAX) the push forward is the transpose of x1's VJP.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ntk_compiler.methods.common import (Problem, apply_layout, per_example, pushforward,
                                         widen)


def _basis(shape, dtype) -> jax.Array:
  size = 1
  for d in shape:
    size *= d
  return jnp.eye(size, dtype=dtype).reshape((size,) + tuple(shape))


def _param_cotangents(problem: Problem, k: int, out2) -> tuple:
  """VJPs of every basis vector of output leaf k at x2, stacked on one leading axis."""
  leaves2 = jax.tree_util.tree_leaves(out2)
  shape2 = problem.shapes2[k]

  def one_hot_tree(v, like):
    cts = [v if j == k else jnp.zeros(l.shape, l.dtype) for j, l in enumerate(like)]
    return problem.out_tree.unflatten(cts)

  if problem.batch_independent:
    single = per_example(problem.f)

    def example_cotangents(xj):
      out, vjp = jax.vjp(lambda p: single(p, xj), problem.params)
      like = jax.tree_util.tree_leaves(out)
      basis = _basis(shape2[1:], like[k].dtype)
      return jax.vmap(lambda v: vjp(one_hot_tree(v, like))[0])(basis)

    cts = jax.vmap(example_cotangents)(problem.second)
    lead = 2  # (example, basis vector)
  else:
    _, vjp = jax.vjp(lambda p: problem.f(p, problem.second), problem.params)
    basis = _basis(shape2, leaves2[k].dtype)
    cts = jax.vmap(lambda v: vjp(one_hot_tree(v, leaves2))[0])(basis)
    lead = 1  # basis vector
  return jax.tree_util.tree_map(
      lambda c: c.reshape((math.prod(c.shape[:lead]),) + c.shape[lead:]), cts)


def ntk_vp_ntk(problem: Problem) -> list[jax.Array]:
  """The NTK of every output leaf by NTK-vector products."""
  with jax.named_scope("ntk/ntk_vp"):
    out1, jvp1 = pushforward(problem.f, problem.params, problem.x1, problem.transpose_vjp)
    out2 = out1 if problem.symmetric else jax.eval_shape(
        problem.f, problem.params, problem.second)
    return [_push_one(problem, jvp1, k, _param_cotangents(problem, k, out2))
            for k in range(len(problem.layouts))]


def param_cotangents(problem: Problem) -> list:
  """x2's cotangents in parameter space, one stack per output leaf: what tiles
  (ntk_compiler/scale.py) compute once per block of x2 and push forward at each block
  of x1 (`push_forward`)."""
  out2 = jax.eval_shape(problem.f, problem.params, problem.second)
  return [_param_cotangents(problem, k, out2) for k in range(len(problem.layouts))]


def push_forward(problem: Problem, cts: list) -> list[jax.Array]:
  """The kernels from x2's cotangents (`param_cotangents`), pushed forward at x1."""
  _, jvp1 = pushforward(problem.f, problem.params, problem.x1, problem.transpose_vjp)
  return [_push_one(problem, jvp1, k, c) for k, c in enumerate(cts)]


def _push_one(problem: Problem, jvp1, k: int, cts) -> jax.Array:
  """Output leaf k's kernel: each of x2's cotangents pushed forward at x1."""
  layout, shape1, shape2 = problem.layouts[k], problem.shapes1[k], problem.shapes2[k]
  columns = jax.vmap(lambda ct: jax.tree_util.tree_leaves(jvp1(ct))[k])(cts)
  # Each entry is one JVP, summed over the parameters in f's own dtype; only the
  # trace below is accumulated in float32 for float16 / bfloat16 models.
  full = widen(columns).reshape(shape2 + shape1)
  full = jnp.moveaxis(full, tuple(range(len(shape2))),
                      tuple(range(len(shape1), len(shape1) + len(shape2))))
  return apply_layout(full, layout, shape1)

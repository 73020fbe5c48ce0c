"""The judge: brute-force full Jacobians, contracted, traced and diagonalised by definition.

Independent of the package: full Jacobians of f over the whole batch (so examples may
mix), one (outputs x parameters) matrix, one matrix product, then the kernel layout of
`neural_tangents.empirical_ntk_fn` written out entry by entry.
"""

import math

import jax
import numpy as np


def full_kernel(f, params, x1, x2=None, mode="rev"):
  """Per output leaf: Θ with shape out1 + out2, in float64 numpy.

  mode="fwd" builds the Jacobians with jax.jacfwd (for f that reverse mode cannot
  differentiate, such as a while_loop over parameters)."""
  x2 = x1 if x2 is None else x2
  jac_fn = {"rev": jax.jacrev, "fwd": jax.jacfwd}[mode]
  def matrices(x):
    jac = jac_fn(f)(params, x)
    out = jax.eval_shape(f, params, x)
    leaves, tree = jax.tree_util.tree_flatten(out)
    per_leaf = tree.flatten_up_to(jac)
    mats = []
    for o, jt in zip(leaves, per_leaf):
      blocks = [np.asarray(j, np.float64).reshape(
                    math.prod(o.shape), math.prod(np.shape(j)[len(o.shape):]))
                for j in jax.tree_util.tree_leaves(jt)]
      mats.append((np.concatenate(blocks, axis=1), o.shape))
    return mats, tree
  m1, tree = matrices(x1)
  m2, _ = matrices(x2)
  return [(a @ b.T).reshape(s1 + s2) for (a, s1), (b, s2) in zip(m1, m2)], tree


def apply_layout(full, shape1, shape2, trace_axes, diagonal_axes):
  ndim = len(shape1)
  trace = sorted({a % ndim for a in trace_axes})
  diag = {a % ndim for a in diagonal_axes}
  res_axes = []
  for a in range(ndim):
    if a in diag:
      res_axes.append(("d", a))
    elif a not in trace:
      res_axes += [("1", a), ("2", a)]
  res_shape = [shape2[a] if k == "2" else shape1[a] for k, a in res_axes]
  tr_shape = [shape1[a] for a in trace]
  out = np.zeros(res_shape)
  for r in np.ndindex(*res_shape):
    i1, i2 = [None] * ndim, [None] * ndim
    for (k, a), v in zip(res_axes, r):
      if k in "d1":
        i1[a] = v
      if k in "d2":
        i2[a] = v
    total = 0.0
    for t in np.ndindex(*tr_shape):
      for a, v in zip(trace, t):
        i1[a] = i2[a] = v
      total += full[tuple(i1) + tuple(i2)]
    out[r] = total / math.prod(tr_shape)
  return out


def oracle_ntk(f, params, x1, x2=None, trace_axes=(-1,), diagonal_axes=(), mode="rev"):
  """Θ(x1, x2) by brute force, as a pytree of float64 numpy arrays."""
  fulls, tree = full_kernel(f, params, x1, x2, mode)
  return apply_layouts(fulls, tree, trace_axes, diagonal_axes)


def apply_layouts(fulls, tree, trace_axes, diagonal_axes):
  """`apply_layout` on every full kernel of `full_kernel`, as the output pytree."""
  kernels = []
  for full in fulls:
    ndim = full.ndim // 2
    kernels.append(apply_layout(full, full.shape[:ndim], full.shape[ndim:],
                                trace_axes, diagonal_axes))
  return tree.unflatten(kernels)


def assert_matches(kernel, expected, rtol):
  """max |kernel - expected| <= rtol * max |expected|, leaf by leaf, shapes equal."""
  k_leaves, k_tree = jax.tree_util.tree_flatten(kernel)
  e_leaves, e_tree = jax.tree_util.tree_flatten(expected)
  assert k_tree == e_tree, (k_tree, e_tree)
  for k, e in zip(k_leaves, e_leaves):
    k = np.asarray(k, np.float64)
    assert k.shape == e.shape, (k.shape, e.shape)
    scale = max(np.max(np.abs(e), initial=0.0), np.finfo(np.float64).tiny)
    err = np.max(np.abs(k - e)) if e.size else 0.0
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol:.0e} x {scale:.3e}"

"""What every method is given, and helpers they share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ntk_compiler.axes import Layout


@dataclasses.dataclass(frozen=True)
class Problem:
  """One NTK evaluation: f, its arguments and the kernel layout of each output leaf.

  Attributes:
    f: the model, `f(params, x)`.
    params: the parameter pytree.
    x1: the first inputs.
    x2: the second inputs, or None for Θ(x1, x1).
    out_tree: treedef of f's output.
    shapes1: shape of each output leaf for x1.
    shapes2: shape of each output leaf for x2.
    layouts: the kernel layout of each output leaf.
    batch_independent: whether f treats examples (axis 0) independently.
    transpose_vjp: f calls a custom_vjp function, through which JAX has no forward
      mode: J(x1)·u is taken as the transpose of x1's VJP (`pushforward`).
  """
  f: Callable[..., Any]
  params: Any
  x1: Any
  x2: Any
  out_tree: Any
  shapes1: tuple[tuple[int, ...], ...]
  shapes2: tuple[tuple[int, ...], ...]
  layouts: tuple[Layout, ...]
  batch_independent: bool
  transpose_vjp: bool = False

  @property
  def symmetric(self) -> bool:
    return self.x2 is None

  @property
  def second(self) -> Any:
    return self.x1 if self.x2 is None else self.x2


def per_example(f: Callable[..., Any]) -> Callable[..., Any]:
  """f on one example: adds the batch axis to x and drops it from the output."""
  def single(params, xi):
    x = jax.tree_util.tree_map(lambda a: a[None], xi)
    return jax.tree_util.tree_map(lambda o: o[0], f(params, x))
  return single


def apply_layout(full: jax.Array, layout: Layout, shape: tuple[int, ...]) -> jax.Array:
  """Traces and diagonalises a full kernel of shape out1 + out2 into `layout`."""
  side1, side2, result = layout.indices()
  kernel = jnp.einsum(full, side1 + side2, result)
  return kernel / layout.trace_size(shape)


def widen(tree: Any) -> Any:
  """Floating arrays narrower than float32 (float16, bfloat16) cast to float32, so the
  kernel's sums accumulate in float32; others unchanged."""
  def cast(a):
    dtype = jnp.result_type(a)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
      return a.astype(jnp.float32)
    return a
  return jax.tree_util.tree_map(cast, tree)


def pushforward(f, params, x, transpose_vjp: bool = False):
  """f(params, x) and the linear map u ↦ J(x)·u on parameter tangents.

  Forward mode (`jax.linearize`), or with `transpose_vjp` the transpose of the VJP:
  JAX has no forward mode through custom_vjp functions, but a backward pass is linear
  in its cotangent, so the VJP transposes (one VJP's residuals, then about a JVP's work
  per tangent). One that does not transpose (not linear in its cotangent, or a while
  loop) fails here, in `jax.linear_transpose`.
  """
  if not transpose_vjp:
    return jax.linearize(lambda p: f(p, x), params)
  out, pullback = jax.vjp(lambda p: f(p, x), params)
  transposed = jax.linear_transpose(pullback, out)
  return out, lambda u: transposed((u,))[0]

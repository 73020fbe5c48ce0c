"""The `Structure` of a primitive's Jacobian ∂y/∂w, and its compact factor.

A rule describes, for one operand w of one primitive y = prim(..., w, ...), how the dense
Jacobian ∂y/∂w (shape y.shape + w.shape) is built from a small factor array:

- trace, pairs (y axis, w axis): constant-block diagonal. ∂y/∂w = I ⊗ A along the pair,
  the same block A at every position (the output-feature axis of W in x @ W).
- diagonal, pairs (y axis, w axis): block diagonal. y[k] depends on w[k] only, through a
  block that varies with k (elementwise mul, dot_general batch dims, depthwise conv).
- tiled, y axes: y is constant along them (a broadcast).
- w_tiled, w axes: ∂y/∂w is constant along them (a sum over w's axis).

The factor holds what is left: its axes are the free y axes (in order), then one axis per
diagonal pair (in order), then the free w axes (in order). A Jacobian with no free axes
has a scalar factor (a transpose: 1; a scaling: the scale).

Symmetry (Θ(x, x) = Θ(x, x)ᵀ) is a property of a pair of uses, not of one rule: the
engine computes each unordered pair once when x2 is omitted and mirrors it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Pairs = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Structure:
  """How ∂y/∂w is structured; see the module docstring. Frozen and hashable."""
  trace: Pairs = ()
  diagonal: Pairs = ()
  tiled: tuple[int, ...] = ()
  w_tiled: tuple[int, ...] = ()

  def __post_init__(self):
    for name in ("trace", "diagonal"):
      object.__setattr__(self, name, tuple((int(a), int(b)) for a, b in getattr(self, name)))
    for name in ("tiled", "w_tiled"):
      object.__setattr__(self, name, tuple(int(a) for a in getattr(self, name)))

  def y_free(self, y_ndim: int) -> tuple[int, ...]:
    taken = {a for a, _ in self.trace + self.diagonal} | set(self.tiled)
    return tuple(a for a in range(y_ndim) if a not in taken)

  def w_free(self, w_ndim: int) -> tuple[int, ...]:
    taken = {b for _, b in self.trace + self.diagonal} | set(self.w_tiled)
    return tuple(b for b in range(w_ndim) if b not in taken)

  def factor_shape(self, y_shape: Sequence[int], w_shape: Sequence[int]) -> tuple[int, ...]:
    return (tuple(y_shape[a] for a in self.y_free(len(y_shape)))
            + tuple(y_shape[a] for a, _ in self.diagonal)
            + tuple(w_shape[b] for b in self.w_free(len(w_shape))))

  def validate(self, y_shape: Sequence[int], w_shape: Sequence[int], where: str) -> None:
    """Raises ValueError if the structure does not fit these shapes."""
    y_axes = [a for a, _ in self.trace + self.diagonal] + list(self.tiled)
    w_axes = [b for _, b in self.trace + self.diagonal] + list(self.w_tiled)
    for axes, n, side in ((y_axes, len(y_shape), "output"), (w_axes, len(w_shape), "operand")):
      if len(set(axes)) != len(axes) or any(not 0 <= a < n for a in axes):
        raise ValueError(
            f"{where}: {self} names an {side} axis twice or out of range for an "
            f"{side} of rank {n}.")
    for a, b in self.trace + self.diagonal:
      if y_shape[a] != w_shape[b]:
        raise ValueError(
            f"{where}: {self} pairs output axis {a} (size {y_shape[a]}) with operand "
            f"axis {b} (size {w_shape[b]}); paired axes must have equal sizes.")

  def labels(self, w_labels: Sequence[int], y_ndim: int,
             fresh: Callable[[], int]) -> tuple[list[int], list[int]]:
    """Einsum labels of y's axes and of the factor's axes, given the labels of w's axes.

    Paired y axes take their w axis's label; every other y axis gets a `fresh()` one.
    """
    y_labels = [None] * y_ndim
    for a, b in self.trace + self.diagonal:
      y_labels[a] = w_labels[b]
    for a in range(y_ndim):
      if y_labels[a] is None:
        y_labels[a] = fresh()
    factor_labels = ([y_labels[a] for a in self.y_free(y_ndim)]
                     + [w_labels[b] for _, b in self.diagonal]
                     + [w_labels[b] for b in self.w_free(len(w_labels))])
    return y_labels, factor_labels

  def expand(self, factor: jax.Array, y_shape: Sequence[int],
             w_shape: Sequence[int]) -> jax.Array:
    """The dense Jacobian ∂y/∂w, shape y_shape + w_shape, that this structure and factor mean."""
    y_ndim, w_ndim = len(y_shape), len(w_shape)
    w_labels = list(range(w_ndim))
    y_labels = list(range(w_ndim, w_ndim + y_ndim))
    operands = []
    factor_labels = ([y_labels[a] for a in self.y_free(y_ndim)]
                     + [w_labels[b] for _, b in self.diagonal]
                     + [w_labels[b] for b in self.w_free(w_ndim)])
    operands += [jnp.asarray(factor), factor_labels]
    for a, b in self.trace + self.diagonal:
      operands += [jnp.eye(y_shape[a], dtype=jnp.result_type(factor)), [y_labels[a], b]]
    for a in self.tiled:
      operands += [jnp.ones(y_shape[a], jnp.result_type(factor)), [y_labels[a]]]
    for b in self.w_tiled:
      operands += [jnp.ones(w_shape[b], jnp.result_type(factor)), [b]]
    return jnp.einsum(*operands, y_labels + w_labels,
                      precision=jax.lax.Precision.HIGHEST)


def structure_violations(jac: np.ndarray, structure: Structure, y_ndim: int,
                         atol: float) -> list[str]:
  """What in a dense Jacobian (y axes then w axes) contradicts `structure`; [] if nothing.

  Checked independently of any factor: zero off the diagonal of every trace / diagonal
  pair, equal blocks along every trace pair, and constancy along tiled and w_tiled axes.
  """
  jac = np.asarray(jac, np.float64)
  problems = []
  for kind, pairs in (("trace", structure.trace), ("diagonal", structure.diagonal)):
    for a, b in pairs:
      n = jac.shape[a]
      moved = np.moveaxis(jac, (a, y_ndim + b), (0, 1))
      off = moved * (1 - np.eye(n)).reshape((n, n) + (1,) * (moved.ndim - 2))
      if np.max(np.abs(off), initial=0) > atol:
        problems.append(f"{kind} pair (y axis {a}, w axis {b}) has non-zero "
                        "off-diagonal entries")
      if kind == "trace":
        diag = np.stack([moved[i, i] for i in range(n)])
        if np.max(np.abs(diag - diag[:1]), initial=0) > atol:
          problems.append(f"trace pair (y axis {a}, w axis {b}) has blocks that vary "
                          "along the diagonal")
  for name, axes, offset in (("tiled", structure.tiled, 0),
                             ("w_tiled", structure.w_tiled, y_ndim)):
    for a in axes:
      moved = np.moveaxis(jac, offset + a, 0)
      if np.max(np.abs(moved - moved[:1]), initial=0) > atol:
        problems.append(f"{name} axis {a}: the Jacobian is not constant along it")
  return problems


def one_hot_factor(positions: jax.Array, axis: int, size: int, dtype) -> jax.Array:
  """A one-hot factor as an array: a `size`-long axis inserted at `axis`, with a 1 at
  each entry of `positions` (none where a position is outside [0, size))."""
  hot = jax.nn.one_hot(positions, size, dtype=dtype)
  return jnp.moveaxis(hot, -1, axis)


def selection_matrix(rows: int, cols: int, pairs: itertools.chain | list,
                     dtype) -> jax.Array:
  """A (rows, cols) 0/1 matrix with ones at the given (row, col) pairs."""
  m = np.zeros((rows, cols), np.dtype(dtype) if dtype != jnp.bfloat16 else np.float32)
  for r, c in pairs:
    m[r, c] = 1
  return jnp.asarray(m, dtype)

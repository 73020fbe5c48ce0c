"""`trace_axes` / `diagonal_axes`: validation and the kernel's output layout.

The layout is that of `neural_tangents.empirical_ntk_fn`: for each output axis in order,
a traced axis vanishes (and the kernel is divided by its size), a diagonal axis appears
once, and every other axis appears as an adjacent (x1, x2) pair.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence

Axes = tuple[int, ...]


def normalize_axes(axes: int | Sequence[int], name: str) -> Axes:
  """Turns a user's `trace_axes`/`diagonal_axes` value into a tuple of ints."""
  if isinstance(axes, bool):
    raise TypeError(f"{name} must be an int or a sequence of ints, got {axes!r}.")
  if hasattr(axes, "__index__"):  # an int, or a NumPy / JAX integer scalar
    try:
      return (operator.index(axes),)
    except TypeError:
      pass  # an integer array with a dimension: a sequence, read below
  try:
    items = tuple(axes)
  except TypeError:
    raise TypeError(
        f"{name} must be an int or a sequence of ints, got {axes!r}.") from None
  for a in items:
    if isinstance(a, bool) or not hasattr(a, "__index__"):
      raise TypeError(
          f"{name} must be an int or a sequence of ints, got {axes!r}: "
          f"{a!r} is not an int.")
  items = tuple(operator.index(a) for a in items)
  if len(set(items)) != len(items):
    raise ValueError(f"{name}={items} names an axis twice; name each axis once.")
  return items


def check_disjoint(trace_axes: Axes, diagonal_axes: Axes) -> None:
  both = sorted(set(trace_axes) & set(diagonal_axes))
  if both:
    raise ValueError(
        f"axis {both[0]} is in both trace_axes={trace_axes} and "
        f"diagonal_axes={diagonal_axes}; an axis can be traced or kept diagonal, "
        "not both.")


def _canonical(axes: Axes, ndim: int, name: str, shape: tuple[int, ...]) -> Axes:
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{name}={axes} is out of range for an output of rank {ndim} "
          f"(shape {shape}); allowed axes are {-ndim}..{ndim - 1}.")
    if a < 0 and a % ndim == 0:
      raise ValueError(
          f"{name}={axes}: axis {a} is axis 0 of an output of shape {shape}, its batch "
          "axis, and negative axes count from the end of the per-example axes only. "
          "For an output with no axis past the batch pass trace_axes=() (an (N1, N2) "
          f"kernel); to {'trace' if name == 'trace_axes' else 'keep the diagonal of'} "
          "the batch axis itself, name it as 0.")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(
        f"{name}={axes} names the same axis twice for an output of rank {ndim} "
        f"(shape {shape}); name each axis once.")
  return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each output axis of f goes in the kernel, for one output leaf.

  Attributes:
    ndim: rank of the output leaf (batch axis included).
    trace: traced axes, non-negative and sorted.
    diagonal: diagonal axes, non-negative and sorted.
  """
  ndim: int
  trace: Axes
  diagonal: Axes

  @classmethod
  def make(cls, trace_axes: Axes, diagonal_axes: Axes,
           shape: tuple[int, ...]) -> Layout:
    ndim = len(shape)
    trace = _canonical(trace_axes, ndim, "trace_axes", shape)
    diagonal = _canonical(diagonal_axes, ndim, "diagonal_axes", shape)
    both = sorted(set(trace) & set(diagonal))
    if both:
      raise ValueError(
          f"trace_axes={trace_axes} and diagonal_axes={diagonal_axes} both name "
          f"axis {both[0]} of an output of rank {ndim}; an axis can be traced or "
          "kept diagonal, not both.")
    return cls(ndim, trace, diagonal)

  def indices(self, first: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Einsum sublists (side 1, side 2, result) over the output axes.

    Indices are consecutive ints starting at `first`; the caller may use any
    int from `first + self.num_indices` on for its own axes.
    """
    side1, side2, result = [], [], []
    i = first
    for axis in range(self.ndim):
      if axis in self.trace or axis in self.diagonal:
        side1.append(i)
        side2.append(i)
        if axis in self.diagonal:
          result.append(i)
        i += 1
      else:
        side1.append(i)
        side2.append(i + 1)
        result += [i, i + 1]
        i += 2
    return side1, side2, result

  def mirror_perm(self) -> tuple[int, ...]:
    """The kernel-axis permutation that swaps x1 and x2 (transposes every pair)."""
    perm, pos = [], 0
    for axis in range(self.ndim):
      if axis in self.diagonal:
        perm.append(pos)
        pos += 1
      elif axis not in self.trace:
        perm += [pos + 1, pos]
        pos += 2
    return tuple(perm)

  @property
  def num_indices(self) -> int:
    return 2 * self.ndim - len(self.trace) - len(self.diagonal)

  def trace_size(self, shape: tuple[int, ...]) -> int:
    return math.prod(shape[a] for a in self.trace)

  def kernel_shape(self, shape1: tuple[int, ...],
                   shape2: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for axis in range(self.ndim):
      if axis in self.diagonal:
        out.append(shape1[axis])
      elif axis not in self.trace:
        out += [shape1[axis], shape2[axis]]
    return tuple(out)

  def check_compatible(self, shape1: tuple[int, ...], shape2: tuple[int, ...],
                       where: str) -> None:
    """x1's and x2's outputs must agree on every traced and diagonal axis."""
    if len(shape1) != len(shape2):
      raise ValueError(
          f"{where}: f(params, x1) has shape {shape1} but f(params, x2) has shape "
          f"{shape2}; the outputs for x1 and x2 must have the same rank.")
    for axis in self.trace + self.diagonal:
      if shape1[axis] != shape2[axis]:
        kind = "traced" if axis in self.trace else "diagonal"
        raise ValueError(
            f"{where}: axis {axis} is {kind} (trace_axes/diagonal_axes) but "
            f"f(params, x1) has size {shape1[axis]} there and f(params, x2) has "
            f"size {shape2[axis]}; traced and diagonal axes must have equal sizes "
            "for x1 and x2.")

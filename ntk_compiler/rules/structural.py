"""Rules for the primitives that move entries: broadcast, tile, reshape, transpose,
squeeze, rev, concatenate, pad and slice.

Their Jacobians are 0/1. Axes an op leaves alone are traced; each axis it moves entries
along is free on both sides, with a small (y_len, w_len) 0/1 matrix per axis and their
outer product as factor. Factors depend on shapes and params only (`reads=()`).
`expand_dims` has no primitive of its own (it traces to `broadcast_in_dim`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from ntk_compiler.rules import EqnInfo, RuleResult, register_rule
from ntk_compiler.structure import Structure


def _is_float(aval) -> bool:  # real or complex: entries move the same way
  return jnp.issubdtype(aval.dtype, jnp.inexact)


def _grows(eqn: EqnInfo, operand: int) -> bool:
  return math.prod(eqn.out_aval.shape) > math.prod(eqn.in_avals[operand].shape)


def _one(eqn: EqnInfo, structure: Structure) -> RuleResult:
  dtype = eqn.out_aval.dtype
  return RuleResult(structure, lambda *ops: jnp.asarray(1, dtype))


def _placement(rows: int, cols: int, positions: Sequence[int]) -> np.ndarray:
  """(rows, cols) 0/1: column j has a one at row positions[j] if that is in range."""
  m = np.zeros((rows, cols))
  for j, i in enumerate(positions):
    if 0 <= i < rows:
      m[i, j] = 1
  return m


def _outer(mats: Sequence[np.ndarray]) -> np.ndarray:
  """Outer product of (r_k, c_k) matrices with axes (r_1, ..., r_n, c_1, ..., c_n)."""
  out = functools.reduce(np.multiply.outer, mats, np.ones(()))
  n = len(mats)
  return out.transpose(tuple(range(0, 2 * n, 2)) + tuple(range(1, 2 * n, 2)))


def _moved(eqn: EqnInfo, mats: dict[int, np.ndarray]) -> RuleResult:
  """Rank-preserving moves: axes in `mats` are free with their matrix, the rest trace."""
  ndim = len(eqn.out_aval.shape)
  structure = Structure(trace=tuple((a, a) for a in range(ndim) if a not in mats))
  factor = _outer([mats[a] for a in sorted(mats)])
  dtype = eqn.out_aval.dtype
  return RuleResult(structure, lambda *ops: jnp.asarray(factor, dtype))


@register_rule(lax.broadcast_in_dim_p)
def broadcast_in_dim_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """Mapped axes of equal size trace; new and expanded axes are tiled."""
  if operand != 0 or not _is_float(eqn.in_avals[0]):
    return None
  w_shape, y_shape = eqn.in_avals[0].shape, eqn.out_aval.shape
  dims = eqn.params["broadcast_dimensions"]
  trace = tuple((d, b) for b, d in enumerate(dims) if w_shape[b] == y_shape[d])
  w_tiled = tuple(b for b, d in enumerate(dims) if w_shape[b] != y_shape[d])
  kept = {a for a, _ in trace}
  tiled = tuple(a for a in range(len(y_shape)) if a not in kept)
  return _one(eqn, Structure(trace=trace, tiled=tiled, w_tiled=w_tiled))


@register_rule(lax.tile_p)
def tile_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """Untiled axes trace; a tiled axis of size 1 is tiled (y constant along it); any
  other tiled axis is free on both sides with a (reps * n, n) 0/1 matrix."""
  if operand != 0 or not _is_float(eqn.in_avals[0]):
    return None
  w_shape, y_shape = eqn.in_avals[0].shape, eqn.out_aval.shape
  reps = tuple(eqn.params["reps"])
  trace, tiled, mats = [], [], []
  for a, (n, r) in enumerate(zip(w_shape, reps)):
    if r == 1:
      trace.append((a, a))
    elif n == 1:
      tiled.append(a)
    else:
      mats.append(_placement(n, y_shape[a], [j % n for j in range(y_shape[a])]).T)
  structure = Structure(trace=tuple(trace), tiled=tuple(tiled), w_tiled=tuple(tiled))
  factor = _outer(mats)
  dtype = eqn.out_aval.dtype
  return RuleResult(structure, lambda *ops: jnp.asarray(factor, dtype))


@register_rule(lax.reshape_p)
def reshape_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """Adding or removing unit axes traces the others; any other reshape is a rebase."""
  if (operand != 0 or not _is_float(eqn.in_avals[0])
      or eqn.params.get("dimensions") is not None):
    return None
  w_shape, y_shape = eqn.in_avals[0].shape, eqn.out_aval.shape
  w_axes = [b for b, n in enumerate(w_shape) if n != 1]
  y_axes = [a for a, n in enumerate(y_shape) if n != 1]
  if [w_shape[b] for b in w_axes] != [y_shape[a] for a in y_axes]:
    return RuleResult(None, None, rebase=True)
  return _one(eqn, Structure(
      trace=tuple(zip(y_axes, w_axes)),
      tiled=tuple(a for a, n in enumerate(y_shape) if n == 1),
      w_tiled=tuple(b for b, n in enumerate(w_shape) if n == 1)))


@register_rule(lax.transpose_p)
def transpose_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """y axis i is w axis permutation[i]."""
  if not _is_float(eqn.in_avals[0]):
    return None
  perm = eqn.params["permutation"]
  return _one(eqn, Structure(trace=tuple((i, p) for i, p in enumerate(perm))))


@register_rule(lax.squeeze_p)
def squeeze_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """Kept axes trace in order; the removed unit axes are w_tiled."""
  if not _is_float(eqn.in_avals[0]):
    return None
  ndim = len(eqn.in_avals[0].shape)
  dropped = sorted(d % ndim for d in eqn.params["dimensions"])
  kept = [b for b in range(ndim) if b not in dropped]
  return _one(eqn, Structure(trace=tuple(enumerate(kept)), w_tiled=tuple(dropped)))


@register_rule(lax.rev_p)
def rev_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """Each reversed axis an anti-identity; the others trace."""
  if not _is_float(eqn.in_avals[0]):
    return None
  shape = eqn.out_aval.shape
  return _moved(eqn, {a: np.eye(shape[a])[::-1] for a in eqn.params["dimensions"]})


@register_rule(lax.concatenate_p)
def concatenate_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """Operand k lands at its offset along `dimension`; the other axes trace."""
  if not _is_float(eqn.in_avals[operand]):
    return None
  d = eqn.params["dimension"]
  offset = sum(aval.shape[d] for aval in eqn.in_avals[:operand])
  n = eqn.in_avals[operand].shape[d]
  return _moved(eqn, {d: _placement(eqn.out_aval.shape[d], n, range(offset, offset + n))})


def _pad_matrices(eqn: EqnInfo) -> dict[int, np.ndarray]:
  mats = {}
  for a, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
    lo, hi, interior = int(lo), int(hi), int(interior)
    if (lo, hi, interior) != (0, 0, 0):
      n, step = eqn.in_avals[0].shape[a], interior + 1
      mats[a] = _placement(eqn.out_aval.shape[a], n, range(lo, lo + n * step, step))
  return mats


@register_rule(lax.pad_p)
def pad_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """Operand: a placement per padded axis. Padding value: the mask of padded entries."""
  if not _is_float(eqn.in_avals[operand]):
    return None
  mats = _pad_matrices(eqn)
  if operand == 0:
    return dataclasses.replace(_moved(eqn, mats), grows=_grows(eqn, 0))
  y_shape = eqn.out_aval.shape
  kept = [mats[a].sum(1) if a in mats else np.ones(n) for a, n in enumerate(y_shape)]
  mask = 1 - functools.reduce(np.multiply.outer, kept, np.ones(()))
  dtype = eqn.out_aval.dtype
  return RuleResult(Structure(), lambda *ops: jnp.asarray(mask, dtype))


@register_rule(lax.slice_p)
def slice_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """A selection per sliced axis; the others trace."""
  if not _is_float(eqn.in_avals[0]):
    return None
  w_shape, y_shape = eqn.in_avals[0].shape, eqn.out_aval.shape
  strides = eqn.params.get("strides") or (1,) * len(w_shape)
  mats = {}
  for a, (start, limit, step) in enumerate(
      zip(eqn.params["start_indices"], eqn.params["limit_indices"], strides)):
    if (start, limit, step) != (0, w_shape[a], 1):
      rows = [start + i * step for i in range(y_shape[a])]
      mats[a] = _placement(w_shape[a], y_shape[a], rows).T
  return _moved(eqn, mats)


@register_rule(lax.split_p)
def split_rule(eqn: EqnInfo, operand: int) -> tuple[RuleResult, ...] | None:
  """One selection per output along the split axis; the other axes trace."""
  if not _is_float(eqn.in_avals[0]):
    return None
  axis, n = eqn.params["axis"], eqn.in_avals[0].shape[eqn.params["axis"]]
  results, start = [], 0
  for out in eqn.out_avals:
    size = out.shape[axis]
    one = dataclasses.replace(eqn, out_avals=(out,))
    mats = {axis: _placement(n, size, range(start, start + size)).T}
    results.append(_moved(one, mats))
    start += size
  return tuple(results)

"""Rules for the primitives that select entries by index: `gather` (embedding lookups,
`jnp.take`, fancy indexing), `dynamic_slice`, `dynamic_update_slice` and `scatter-add`.

Their Jacobians are 0/1 selections that depend on index values. Axes they copy whole are
traced; along the one indexed axis the factor is one-hot, returned as integer positions
(`RuleResult.one_hot`), so that the engine compares positions (the embedding term
Σ [id1_t = id2_t'] ⟨ct1_t, ct2_t'⟩) instead of forming |y| × |w| blocks. Slices along
several axes at once get a dense factor of per-axis one-hot matrices (small: slice ×
operand along those axes only). Index operands are integers and take no rule.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from ntk_compiler.rules import EqnInfo, RuleResult, register_rule
from ntk_compiler.structure import Structure


def _is_float(aval) -> bool:  # real or complex: entries move the same way
  return jnp.issubdtype(aval.dtype, jnp.inexact)


def _one(dtype):
  return lambda *ops: jnp.asarray(1, dtype)


def _starts(indices, component: int, sizes, windows, index_map, mode):
  """The start along index component `component` of each window, as the primitive
  applies it: clamped (CLIP, PROMISE_IN_BOUNDS: XLA clamps), or -1 for a window out of
  bounds along any component (FILL_OR_DROP: nothing selected)."""
  indices = jnp.asarray(indices).astype(jnp.int32)
  d = index_map[component]
  start = indices[..., component]
  if lax.GatherScatterMode.from_any(mode) != lax.GatherScatterMode.FILL_OR_DROP:
    return jnp.clip(start, 0, sizes[d] - windows[d])
  valid = jnp.ones(start.shape, bool)
  for c, e in enumerate(index_map):
    valid &= (indices[..., c] >= 0) & (indices[..., c] <= sizes[e] - windows[e])
  return jnp.where(valid, start, -1)


def _window(start, length: int, axis: int):
  """start + j along a new axis at `axis` (j < length), keeping -1 (nothing) as -1."""
  pos = start[..., None] + jnp.arange(length)
  pos = jnp.where(start[..., None] < 0, -1, pos)
  return jnp.moveaxis(pos, -1, axis)


def _indexed_axis(sizes, windows, index_map, skip):
  """The one operand axis that indices move a window along (None if not exactly one)."""
  moved = [d for d in index_map if windows[d] < sizes[d]]
  others_whole = all(windows[d] == sizes[d] for d in range(len(sizes))
                     if d not in moved and d not in skip)
  return moved[0] if len(moved) == 1 and others_whole else None


def _window_positions(starts, axis_sizes, window_sizes, axes):
  """Per axis in `axes`: the operand positions of a window of dynamic_slice."""
  return [jnp.arange(window_sizes[a]) + jnp.clip(
      jnp.asarray(starts[a]).astype(jnp.int32), 0, axis_sizes[a] - window_sizes[a])
          for a in axes]


def _outer_selection(positions, row_sizes, col_sizes, rows_first: bool, dtype):
  """Π_a one-hot matrices as one array with all row axes, then all column axes.

  rows_first: positions index the rows (entry j of axis a is row positions[a][j]),
  else the columns."""
  r = len(positions)
  out = jnp.ones((), dtype)
  for i, (pos, nr, nc) in enumerate(zip(positions, row_sizes, col_sizes)):
    if rows_first:   # (nr, nc) with a 1 at (pos[j], j)
      m = (jnp.arange(nr)[:, None] == pos[None, :]).astype(dtype)
    else:            # (nr, nc) with a 1 at (j, pos[j])
      m = (pos[:, None] == jnp.arange(nc)[None, :]).astype(dtype)
    shape = [1] * (2 * r)
    shape[i], shape[r + i] = nr, nc
    out = out * m.reshape(shape)
  return out


@register_rule(lax.gather_p)
def gather_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """y[b..., o...] = w[ids[b] + o_a, o...]: the axes copied whole trace, batching axes
  (from vmap) are diagonal, and the factor is one-hot from the remaining y axes (the
  index batch, the window) to the indexed axis of w."""
  if operand != 0 or not _is_float(eqn.in_avals[0]):
    return None
  dn = eqn.params["dimension_numbers"]
  w_shape, y_ndim = eqn.in_avals[0].shape, len(eqn.out_aval.shape)
  windows, index_map = eqn.params["slice_sizes"], tuple(dn.start_index_map)
  w_batch = tuple(getattr(dn, "operand_batching_dims", ()))
  i_batch = tuple(getattr(dn, "start_indices_batching_dims", ()))
  a = _indexed_axis(w_shape, windows, index_map, w_batch)
  collapsed = tuple(dn.collapsed_slice_dims)
  if a is None and not w_batch:
    return _point_lookup(eqn)
  if a is None or any(d != a for d in collapsed):
    return None
  kept = [d for d in range(len(w_shape)) if d not in collapsed and d not in w_batch]
  y_of = dict(zip(kept, dn.offset_dims))            # operand axis -> y axis
  y_batch = [y for y in range(y_ndim) if y not in dn.offset_dims]  # index batch order
  diagonal = tuple((y_batch[i], d) for i, d in zip(i_batch, w_batch))
  trace = tuple((y_of[d], d) for d in kept if d != a)
  structure = Structure(trace=trace, diagonal=diagonal)
  y_free = structure.y_free(y_ndim)
  mode, component = eqn.params["mode"], index_map.index(a)
  window_axis = None if a in collapsed else y_free.index(y_of[a])
  # Positions: y_free axes (y order), then the diagonal axes (pair order).
  order = [y_batch.index(y) if y in y_batch else None for y in y_free]

  def positions(w, indices):
    start = _starts(indices, component, w_shape, windows, index_map, mode)
    batch_order = [i for i in order if i is not None] + [i for i, _ in
                                                          zip(i_batch, w_batch)]
    start = jnp.transpose(start, batch_order)
    if window_axis is None:
      return start
    return _window(start, windows[a], window_axis)
  return RuleResult(structure, positions, reads=(1,), one_hot=len(y_free) + len(diagonal))


def _point_lookup(eqn: EqnInfo) -> RuleResult | None:
  """y[b..., o...] = w[i0_b, i1_b, ..., o...] (`table[i, j]`): the axes copied whole
  trace; the factor is Π_a [i_a,b = v_a], an outer product of one-hot vectors over the
  indexed axes of w only (none over the axes copied whole)."""
  dn = eqn.params["dimension_numbers"]
  w_shape, y_ndim = eqn.in_avals[0].shape, len(eqn.out_aval.shape)
  windows, index_map = eqn.params["slice_sizes"], tuple(dn.start_index_map)
  collapsed = tuple(dn.collapsed_slice_dims)
  if sorted(collapsed) != sorted(index_map) or any(windows[d] != 1 for d in collapsed):
    return None
  if any(windows[d] != w_shape[d] for d in range(len(w_shape)) if d not in collapsed):
    return None
  kept = [d for d in range(len(w_shape)) if d not in collapsed]
  structure = Structure(trace=tuple(zip(dn.offset_dims, kept)))
  if structure.y_free(y_ndim) != tuple(y for y in range(y_ndim)
                                       if y not in dn.offset_dims):
    return None
  free = structure.w_free(len(w_shape))  # the indexed axes, ascending
  mode, dtype = eqn.params["mode"], eqn.out_aval.dtype

  def factor(w, indices):
    out = jnp.ones((), dtype)
    for k, d in enumerate(free):
      start = _starts(indices, index_map.index(d), w_shape, windows, index_map, mode)
      hot = jnp.asarray(start[..., None] == jnp.arange(w_shape[d]), dtype)
      out = out[..., None] * hot.reshape(hot.shape[:-1] + (1,) * k + hot.shape[-1:])
    return out
  return RuleResult(structure, factor, reads=(1,))


@register_rule(lax.dynamic_slice_p)
def dynamic_slice_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """Whole axes trace; a window along one axis is one-hot (positions start + j)."""
  if operand != 0 or not _is_float(eqn.in_avals[0]):
    return None
  w_shape = eqn.in_avals[0].shape
  sizes = eqn.params["slice_sizes"]
  cut = [d for d in range(len(w_shape)) if sizes[d] != w_shape[d]]
  structure = Structure(trace=tuple((d, d) for d in range(len(w_shape)) if d not in cut))
  dtype = eqn.out_aval.dtype
  reads = tuple(range(1, len(eqn.in_avals)))
  if not cut:
    return RuleResult(structure, _one(dtype))
  if len(cut) == 1:
    def positions(w, *starts):
      return _window_positions(starts, w_shape, sizes, cut)[0]
    return RuleResult(structure, positions, reads=reads, one_hot=1)

  def factor(w, *starts):
    pos = _window_positions(starts, w_shape, sizes, cut)
    return _outer_selection(pos, [sizes[a] for a in cut], [w_shape[a] for a in cut],
                            rows_first=False, dtype=dtype)
  return RuleResult(structure, factor, reads=reads)


@register_rule(lax.dynamic_update_slice_p)
def dynamic_update_slice_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """y = w with a window replaced by u. For w: diagonal, 0 inside the window. For u:
  whole axes trace; along one windowed axis a one-hot placement (row start + j)."""
  if operand > 1 or not _is_float(eqn.in_avals[operand]):
    return None
  return _growing(eqn, operand, _dynamic_update_slice(eqn, operand))


def _growing(eqn: EqnInfo, operand: int, result: RuleResult | None) -> RuleResult | None:
  """`result`, marked `grows` where the operand is written into a larger array (the
  update of a window; the array written into keeps its size)."""
  if result is None or math.prod(eqn.out_aval.shape) <= math.prod(
      eqn.in_avals[operand].shape):
    return result
  return dataclasses.replace(result, grows=True)


def _dynamic_update_slice(eqn: EqnInfo, operand: int) -> RuleResult:
  y_shape = eqn.out_aval.shape
  u_shape = eqn.in_avals[1].shape
  dtype = eqn.out_aval.dtype
  reads = tuple(range(2, len(eqn.in_avals)))
  if operand == 0:
    def keep(w, u, *starts):
      return lax.dynamic_update_slice(jnp.ones(y_shape, dtype), jnp.zeros(u_shape, dtype),
                                      starts)
    return RuleResult(Structure(diagonal=tuple((d, d) for d in range(len(y_shape)))),
                      keep, reads=reads)
  cut = [d for d in range(len(y_shape)) if u_shape[d] != y_shape[d]]
  structure = Structure(trace=tuple((d, d) for d in range(len(y_shape)) if d not in cut))
  if not cut:
    return RuleResult(structure, _one(dtype))
  if len(cut) == 1:
    def positions(w, u, *starts):
      return _window_positions(starts, y_shape, u_shape, cut)[0]
    return RuleResult(structure, positions, reads=reads, one_hot=0)

  def factor(w, u, *starts):
    pos = _window_positions(starts, y_shape, u_shape, cut)
    return _outer_selection(pos, [y_shape[a] for a in cut], [u_shape[a] for a in cut],
                            rows_first=True, dtype=dtype)
  return RuleResult(structure, factor, reads=reads)


def _scatter_rule(eqn: EqnInfo, operand: int, add: bool) -> RuleResult | None:
  """y = w with windows of u written (scatter) or added (scatter-add) at the indices."""
  if operand == 1 or not _is_float(eqn.in_avals[operand]):
    return None
  y_shape = eqn.out_aval.shape
  dtype = eqn.out_aval.dtype
  params = dict(eqn.params)
  every = tuple((d, d) for d in range(len(y_shape)))
  if operand == 0 and add:
    return RuleResult(Structure(trace=every), _one(dtype))
  if operand == 0:  # kept where no window is written
    def keep(w, indices, u):
      return lax.scatter_p.bind(jnp.ones_like(w), indices, jnp.zeros_like(u), **params)
    return RuleResult(Structure(diagonal=every), keep, reads=(1,))
  dn = params["dimension_numbers"]
  u_shape = eqn.in_avals[2].shape
  u_window = tuple(dn.update_window_dims)
  inserted = tuple(dn.inserted_window_dims)
  index_map = tuple(dn.scatter_dims_to_operand_dims)
  y_batch_dims = tuple(getattr(dn, "operand_batching_dims", ()))
  i_batch = tuple(getattr(dn, "scatter_indices_batching_dims", ()))
  if u_window == tuple(range(len(u_shape))) == tuple(range(len(y_shape))):
    return _one_window(eqn, u_shape, index_map)
  if not (add or params.get("unique_indices")):
    return None  # overwrites: which duplicate wins is unspecified
  windowed = [d for d in range(len(y_shape)) if d not in inserted and d not in y_batch_dims]
  u_of = dict(zip(windowed, u_window))               # y axis -> u window axis
  windows = [1 if d in inserted or d in y_batch_dims else u_shape[u_of[d]]
             for d in range(len(y_shape))]
  a = _indexed_axis(y_shape, windows, index_map, y_batch_dims)
  if a is None or any(d != a for d in inserted):
    return None
  u_scatter = [b for b in range(len(u_shape)) if b not in u_window]  # index batch order
  diagonal = tuple((d, u_scatter[i]) for d, i in zip(y_batch_dims, i_batch))
  trace = tuple((d, u_of[d]) for d in windowed if d != a)
  structure = Structure(trace=trace, diagonal=diagonal)
  w_free = structure.w_free(len(u_shape))
  mode, component = params["mode"], index_map.index(a)
  # Positions: the diagonal axes (pair order), then w_free axes (u order).
  batch_order = [u_scatter.index(b) for _, b in diagonal] + [
      u_scatter.index(b) for b in w_free if b in u_scatter]
  window_axis = None if a in inserted else len(diagonal) + w_free.index(u_of[a])

  def positions(w, indices, u):
    start = _starts(indices, component, y_shape, windows, index_map, mode)
    start = jnp.transpose(start, batch_order)
    return start if window_axis is None else _window(start, windows[a], window_axis)
  return RuleResult(structure, positions, reads=(1,), one_hot=0)


def _one_window(eqn: EqnInfo, u_shape, index_map) -> RuleResult | None:
  """One window u written into y at one start (`out.at[:, :m1, :m2].set(u)`, as
  dynamic_update_slice): whole axes trace; the windowed axes, all indexed, get one-hot
  placements (none where FILL_OR_DROP drops the window)."""
  y_shape, dtype = eqn.out_aval.shape, eqn.out_aval.dtype
  mode = eqn.params["mode"]
  cut = [d for d in range(len(y_shape)) if u_shape[d] != y_shape[d]]
  if any(d not in index_map for d in cut):
    return None
  structure = Structure(trace=tuple((d, d) for d in range(len(y_shape)) if d not in cut))
  if not cut:
    return RuleResult(structure, _one(dtype))

  def placements(indices):
    return [_window(_starts(indices, index_map.index(d), y_shape, u_shape, index_map,
                            mode), u_shape[d], 0) for d in cut]
  if len(cut) == 1:
    return RuleResult(structure, lambda w, indices, u: placements(indices)[0],
                      reads=(1,), one_hot=0)

  def factor(w, indices, u):
    return _outer_selection(placements(indices), [y_shape[d] for d in cut],
                            [u_shape[d] for d in cut], rows_first=True, dtype=dtype)
  return RuleResult(structure, factor, reads=(1,))


@register_rule(lax.scatter_add_p)
def scatter_add_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """Identity in w; for u the copied axes trace, batching axes are diagonal, and the
  factor is one-hot from the indexed axis of y to u's remaining axes."""
  return _growing(eqn, operand, _scatter_rule(eqn, operand, add=True))


@register_rule(lax.scatter_p)
def scatter_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """As scatter-add for u (when the indices are unique); for w a diagonal 0/1 mask."""
  return _growing(eqn, operand, _scatter_rule(eqn, operand, add=False))

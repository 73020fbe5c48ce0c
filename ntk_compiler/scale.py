"""Scale: kernels in tiles under a memory budget, on every device, into any array; Θ·v.

A tile is the kernel of (a block of x1, a block of x2), computed by the NTK function's
own per-signature program. Tiling by examples is exact only for a per-example f (the
plan's batch decision): a model that mixes examples (a batch mean, batch norm in
training mode) is computed in one piece, with a warning when its estimate exceeds the
budget. With x2 omitted only the tiles on and above the diagonal are computed and the
others are mirrored. Tiles shard over devices with `jax.shard_map` (x1's block split by
examples across a `jax.sharding.Mesh`); each block's side (cotangents, Jacobians) is
computed once, split by examples over the mesh, and all-gathered in the tiles that
need it (`reuse` decides, `_Blocks` runs it). Inputs are laid out with
`jax.make_array_from_callback` and results read from each process's addressable
shards, so the same code runs on several hosts after `jax.distributed.initialize()`;
without out= the processes' rows are gathered (`multihost_utils.process_allgather`)
so every process returns the whole kernel.

The memory model is an estimate from shapes (per-example activation, output and
parameter sizes, per method); it sizes the blocks and is reported by `estimate()`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ntk_compiler import compat

# Share of a device's memory (or of host RAM, for CPU devices) the default budget takes.
DEVICE_FRACTION = 0.75
HOST_FRACTION = 0.5

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(value: Any, name: str = "max_memory") -> int | None:
  """A byte count from an int, a float or a string such as "2GB", "512MiB" or "1.5 GB".

  None stays None (the default budget). Decimal units (kB, MB, GB, TB) are powers of
  1000, binary ones (KiB, MiB, GiB, TiB, and K, M, G, T alone) powers of 1024.
  """
  if value is None:
    return None
  if isinstance(value, bool):
    raise TypeError(f"{name} must be a number of bytes or a string like '2GB', "
                    f"got {value!r}.")
  if isinstance(value, (int, np.integer, float, np.floating)):
    if not value > 0:
      raise ValueError(f"{name}={value!r} must be positive.")
    return int(value)
  if isinstance(value, str):
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit:
      raise ValueError(
          f"{name}={value!r} is not a size: write a number of bytes or a number with "
          "a unit, e.g. '2GB', '512MiB', '1.5GiB'.")
    amount = float(match.group(1)) * unit
    if not amount > 0:
      raise ValueError(f"{name}={value!r} must be positive.")
    return int(amount)
  raise TypeError(f"{name} must be a number of bytes or a string like '2GB', got a "
                  f"{type(value).__name__}.")


def default_budget(devices) -> int:
  """The default memory budget per device: a share of the smallest device's memory
  (`memory_stats()['bytes_limit']`), or of the host's RAM for devices that report none
  (CPU)."""
  limits = []
  for device in devices:
    try:
      stats = device.memory_stats()
    except Exception:  # some backends do not implement it
      stats = None
    if stats and stats.get("bytes_limit"):
      limits.append(int(stats["bytes_limit"] * DEVICE_FRACTION))
  if limits:
    return min(limits)
  try:
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    ram = 8 * 2**30
  return int(ram * HOST_FRACTION)


# --- devices ----------------------------------------------------------------------------

def check_devices(devices) -> Any:
  """`devices=` as given to compile_ntk: None, a non-empty sequence of devices or a
  Mesh."""
  if devices is None or isinstance(devices, Mesh):
    return devices
  try:
    items = tuple(devices)
  except TypeError:
    raise TypeError("devices must be None, a sequence of jax devices or a "
                    f"jax.sharding.Mesh, got a {type(devices).__name__}.") from None
  if not items or not all(hasattr(d, "platform") and hasattr(d, "id") for d in items):
    raise TypeError("devices must be None, a non-empty sequence of jax devices "
                    "(e.g. jax.local_devices()[:2]) or a jax.sharding.Mesh, got "
                    f"{devices!r}.")
  return items


def mesh_of(devices) -> Mesh:
  """The mesh the tiles shard over: the given Mesh, or a 1-D mesh over the devices
  (all local devices by default)."""
  if isinstance(devices, Mesh):
    return devices
  items = jax.local_devices() if devices is None else list(devices)
  return Mesh(np.array(items), ("ntk_examples",))


# --- the memory model -------------------------------------------------------------------

def _size(shape) -> int:
  return math.prod(shape)


def _elements(jaxpr) -> int:
  """Elements of every value a jaxpr computes (sub-jaxprs times their trip count)."""
  total = 0
  for eqn in compat.open_jaxpr(jaxpr).eqns:
    total += sum(_size(getattr(v.aval, "shape", ())) for v in eqn.outvars)
    subs = list(compat.sub_jaxprs(eqn))
    if subs:
      total += compat.trip_count(eqn) * max(_elements(s) for s in subs)
  return total


def _abstract(tree):
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Per-example sizes (elements) the memory model needs, and the kernel's itemsize."""
  n1: int
  n2: int
  act1: float   # values f computes per example of x1 (all of them when not per-example)
  act2: float
  out1: int     # output entries per example, all leaves
  out2: int
  pair: int     # kernel entries per pair of examples, all leaves (per example: diagonal)
  params: int
  item: int     # bytes of one kernel entry
  inputs1: float  # input bytes per example
  inputs2: float
  materialised: int = 0  # entries of the leaves the structured plan materialises
  leaves: int = 1  # parameter leaves (the structured method sums one term per leaf)


def sizes(plan) -> Sizes:
  """The per-example sizes of a plan's problem."""
  problem = plan.problem
  leaves = jax.tree_util.tree_leaves(problem.params)
  chosen = getattr(getattr(plan, "estimate", None), "materialise", ()) or ()
  materialised = sum(_size(jnp.shape(leaves[i])) for i in chosen if i < len(leaves))
  return _sizes(problem.f, problem.params, problem.x1, problem.x2, problem.layouts,
                problem.shapes1, problem.shapes2, problem.batch_independent,
                [o.dtype for o in plan.outputs], materialised)


def _sizes(f, params, x1, x2, layouts, shapes1, shapes2, per_ex, dtypes,
           materialised) -> Sizes:
  n1 = shapes1[0][0] if shapes1 else 0
  n2 = shapes2[0][0] if shapes2 else 0

  def act(x, n):
    closed = jax.make_jaxpr(f)(*_abstract((params, x)))
    return _elements(closed) / max(n, 1) if per_ex else _elements(closed)

  def input_bytes(x, n):
    total = sum(_size(jnp.shape(a)) * jnp.result_type(a).itemsize
                for a in jax.tree_util.tree_leaves(x))
    return total / max(n, 1)

  act1 = act(x1, n1) if layouts else 0
  act2 = act1 if x2 is None else (act(x2, n2) if layouts else 0)
  one = lambda s: (1,) + tuple(s[1:])
  pair = sum(_size(l.kernel_shape(one(s1), one(s2)))
             for l, s1, s2 in zip(layouts, shapes1, shapes2))
  params_size = sum(_size(jnp.shape(w)) for w in jax.tree_util.tree_leaves(params))
  item = max([jnp.dtype(d).itemsize for d in dtypes] or [4])
  x2 = x1 if x2 is None else x2
  return Sizes(n1, n2, act1, act2, sum(_size(s[1:]) for s in shapes1),
               sum(_size(s[1:]) for s in shapes2), pair, params_size, max(item, 4),
               input_bytes(x1, n1), input_bytes(x2, n2), materialised,
               len(jax.tree_util.tree_leaves(params)))


def quick_bound(ntk_fn, params, x1, x2) -> int:
  """An upper bound of a call's peak bytes without planning it (f traced once per
  side): the largest of the methods' estimates, f taken as per-example, every
  parameter materialised."""
  from ntk_compiler import axes as axes_lib
  out1 = jax.tree_util.tree_leaves(jax.eval_shape(ntk_fn.f, params, x1))
  out2 = out1 if x2 is None else jax.tree_util.tree_leaves(
      jax.eval_shape(ntk_fn.f, params, x2))
  layouts = [axes_lib.Layout.make(ntk_fn.trace_axes, ntk_fn.diagonal_axes, o.shape)
             for o in out1]
  shapes1, shapes2 = [o.shape for o in out1], [o.shape for o in out2]
  params_size = sum(_size(jnp.shape(w)) for w in jax.tree_util.tree_leaves(params))
  s = _sizes(ntk_fn.f, params, x1, x2, layouts, shapes1, shapes2, True,
             [jnp.promote_types(o.dtype, jnp.float32) for o in out1], params_size)
  return max(peak_bytes(m, s, s.n1, s.n2) for m in ("jacobian", "ntk_vp", "structured"))


def peak_bytes(method: str, s: Sizes, b1: int, b2: int, symmetric: bool = False,
               diagonal: bool = False) -> int:
  """Estimated peak bytes of one tile of b1 x b2 examples (per example: `diagonal` tiles
  pair example n of x1 with example n of x2 only).

  Per method, from the sizes of what each holds at its peak:
    jacobian: per-example Jacobians (b·O·P per side), the reverse pass vmapped over the
      O outputs (b·O·A), the kernel tile;
    ntk_vp: x1's linearisation (b1·A), x2's cotangents in parameter space (b2·O·P),
      the forward pass vmapped over them (b2·O·b1·A) and the full (b1·O, b2·O) block;
    structured: cotangents and factors (b·(O+1)·A per side), materialised leaves'
      per-example Jacobians, and the pairwise contractions (one kernel tile per
      parameter leaf, and two more).
  Checked against XLA's own memory analysis of compiled programs (3x512 MLP):
  from 1.2x to 3x above it.
  """
  pairs = b1 if diagonal else b1 * b2
  tile = pairs * s.pair
  inputs = b1 * s.inputs1 + b2 * s.inputs2
  sides = [(b1, s.out1, s.act1)] + ([] if symmetric else [(b2, s.out2, s.act2)])
  if method == "jacobian":
    per_side = sum(b * o * (s.params + a) + b * a for b, o, a in sides)
    elems = per_side + 2 * tile
  elif method == "ntk_vp":
    full = pairs * s.out1 * s.out2
    elems = (b1 * s.act1 + b2 * s.out2 * (s.params + s.act2)
             + (b1 if diagonal else b1 * b2) * s.out2 * s.act1 + full + tile)
  else:
    per_side = sum(b * (o + 1) * a + b * o * s.materialised for b, o, a in sides)
    elems = per_side + (s.leaves + 2) * tile  # XLA may hold every leaf's term at once
  return int((elems + s.params) * s.item + inputs)


# --- tiling -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tiling:
  """How a kernel is split: blocks of examples and the tiles computed.

  Attributes:
    block1, block2: examples per block of x1 and x2 (the whole batch when not split).
    tiles: how many tiles are computed (with x2 omitted: the upper ones only).
    mode: "pairs" (axis 0 is paired: a grid of tiles), "diagonal" (axis 0 is a
      diagonal axis: one tile per block) or "trace" (axis 0 traced: the mean over the
      diagonal tiles), or "whole" (not split: f mixes examples).
    devices: how many devices each tile is sharded over.
  """
  block1: int
  block2: int
  tiles: int
  mode: str
  devices: int
  symmetric: bool

  @property
  def split(self) -> bool:
    return self.tiles > 1


def axis0_mode(plan) -> str:
  layouts = plan.problem.layouts
  if not plan.problem.batch_independent:
    return "whole"
  if layouts and 0 in layouts[0].diagonal:
    return "diagonal"
  if layouts and 0 in layouts[0].trace:
    return "trace"
  return "pairs"


def count_tiles(mode: str, n1: int, n2: int, b1: int, b2: int, symmetric: bool) -> int:
  t1, t2 = -(-n1 // b1) if n1 else 0, -(-n2 // b2) if n2 else 0
  if mode in ("diagonal", "trace"):
    return t1
  if mode == "whole":
    return 1
  return t1 * (t1 + 1) // 2 if symmetric else t1 * t2


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def choose_tiling(plan, s: Sizes, budget: int, block_size: int | None,
                  num_devices: int) -> Tiling:
  """Blocks as large as fit in `budget` bytes per device (or `block_size`)."""
  mode = axis0_mode(plan)
  symmetric = plan.problem.symmetric
  n1, n2 = s.n1, s.n2
  if mode == "whole":
    return Tiling(n1, n2, 1, mode, 1, symmetric)
  diagonal = mode != "pairs"
  d = num_devices

  def fits(b):
    b1, b2 = min(b, n1), min(b, n2)
    local = -(-b1 // d)
    whole = b >= max(n1, n2) and d == 1  # in one piece x2 omitted is symmetric
    # Split with the structured method on one device, half the budget goes to the
    # blocks' cotangents kept for reuse (_Sides).
    room = budget if whole or plan.method != "structured" or d > 1 else budget // 2
    return peak_bytes(plan.method, s, local, b2 if not diagonal else local,
                      symmetric=symmetric and whole, diagonal=diagonal) <= room

  big = max(n1, n2, 1)
  if block_size is not None:
    b = block_size
  elif fits(big):
    b = big
  else:
    lo, hi = 1, big  # largest b that fits, by bisection (peak grows with b)
    while lo < hi:
      mid = (lo + hi + 1) // 2
      lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    b = lo
    if not fits(b):
      warnings.warn(
          f"max_memory: even one example per tile is estimated at "
          f"{_fmt(peak_bytes(plan.method, s, 1, 1, diagonal=diagonal))}, over the "
          f"budget of {_fmt(budget)}; computing one example per tile anyway. Raise "
          "max_memory or pick a method that holds less (method='structured').",
          ResourceWarning, stacklevel=4)
  if (block_size is None and symmetric and mode == "pairs" and b < n1
      and plan.method == "structured" and d == 1):
    # Each block's cotangents are computed once (_Sides): more, smaller tiles cost
    # little and skip more of the mirrored lower triangle.
    b = min(b, -(-n1 // max(1, min(MIN_SYMMETRIC_BLOCKS, n1 // MIN_BLOCK))))
  b1 = _balanced(n1, b, d)
  b2 = b1 if diagonal or symmetric else _balanced(n2, b, 1)
  return Tiling(b1, b2, count_tiles(mode, n1, n2, b1, b2, symmetric), mode, d, symmetric)


# With x2 omitted, a split kernel (structured method) takes at least this many blocks,
# of at least MIN_BLOCK examples each.
MIN_SYMMETRIC_BLOCKS = 4
MIN_BLOCK = 512


def _balanced(n: int, b: int, d: int) -> int:
  """Blocks of at most ~b examples, as even as possible, a multiple of d."""
  n = max(n, 1)
  blocks = -(-n // max(1, min(b, n)))
  return _round_up(-(-n // blocks), d)


def _fmt(n: float) -> str:
  for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{int(n)} B"


# --- estimates --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ScaleEstimate:
  """What a call would cost, before anything runs.

  Attributes:
    method: the method the plan picked.
    flops: estimated FLOPs of the whole call (all tiles).
    flops_per_tile: estimated FLOPs of one full tile.
    peak_bytes: estimated peak bytes of the call in one piece.
    peak_bytes_per_tile: estimated peak bytes of one tile, per device.
    kernel_bytes: bytes of the kernel(s) returned.
    budget: the memory budget per device (bytes).
    tiling: the `Tiling` the call would use.
    reuse: for a split kernel, whether each block's side (cotangents, Jacobians) is
      computed once and kept for the tiles that need them, or recomputed per tile,
      and why ("" when there is nothing to keep).
  """
  method: str
  flops: float
  flops_per_tile: float
  peak_bytes: int
  peak_bytes_per_tile: int
  kernel_bytes: int
  budget: int
  tiling: Tiling
  reuse: str = ""

  @property
  def fits(self) -> bool:
    """Whether the call fits the budget in one piece."""
    return self.peak_bytes <= self.budget

  def __str__(self) -> str:
    t = self.tiling
    how = ("in one piece" if not t.split else
           f"{t.tiles} tiles of {t.block1} x {t.block2} examples ({t.mode}"
           + (", upper tiles mirrored" if t.symmetric and t.mode == "pairs" else "")
           + ")")
    if t.mode == "whole":
      how += " (f mixes examples: not split)"
    return (f"scale: method {self.method}, ~{self.flops:.3g} FLOPs in total, peak "
            f"~{_fmt(self.peak_bytes)} in one piece, budget {_fmt(self.budget)} per "
            f"device; {how} on {t.devices} device(s), ~{_fmt(self.peak_bytes_per_tile)}"
            f" and ~{self.flops_per_tile:.3g} FLOPs per tile; kernel "
            f"{_fmt(self.kernel_bytes)}" + (f"; {self.reuse}" if self.reuse else ""))


def _block_shapes(x, b):
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct((b,) + tuple(jnp.shape(a)[1:]), jnp.result_type(a)),
      x)


def estimate(ntk_fn, params, x1, x2=None, plan=None) -> ScaleEstimate:
  """FLOPs and peak bytes of `ntk_fn(params, x1, x2)`, per tile and in total, with the
  tiling it would use (`NTKFunction.estimate`)."""
  plan = ntk_fn.plan(params, x1, x2) if plan is None else plan
  s = sizes(plan)
  mesh = mesh_of(ntk_fn.devices) if _splits(plan) else None
  if ntk_fn.devices is None and mesh is not None:
    # Not asked for devices: a call that needs no tiles runs on one, like any jitted
    # function; one that does is sharded over every local device.
    one = choose_tiling(plan, s, ntk_fn.max_memory or default_budget(
        jax.local_devices()[:1]), ntk_fn.block_size, 1)
    if not one.split:
      mesh = None
  ndev = mesh.devices.size if mesh is not None else 1
  budget = ntk_fn.max_memory or default_budget(
      mesh.devices.flat if mesh is not None else jax.local_devices()[:1])
  tiling = choose_tiling(plan, s, budget, ntk_fn.block_size, ndev)
  flops = dict(getattr(plan.estimate, "flops", {}) or {})
  total = float(flops.get(plan.method, 0.0))
  diag = tiling.mode in ("diagonal", "trace")
  whole = peak_bytes(plan.method, s, s.n1, s.n2, symmetric=plan.problem.symmetric,
                     diagonal=diag)
  local = -(-tiling.block1 // tiling.devices)
  per_tile = whole if not tiling.split and tiling.devices == 1 else peak_bytes(
      plan.method, s, local, local if diag else tiling.block2, diagonal=diag)
  if tiling.split:
    pairs_total = s.n1 if diag else s.n1 * s.n2
    pairs_tile = tiling.block1 if diag else tiling.block1 * tiling.block2
    flops_tile = total * pairs_tile / max(pairs_total, 1)
    total = flops_tile * (tiling.tiles if not plan.problem.symmetric or diag else
                          (count_tiles("pairs", s.n1, s.n2, tiling.block1,
                                       tiling.block2, False) + tiling.tiles) / 2)
  else:
    flops_tile = total
  kernel = sum(_size(o.layout.kernel_shape(o.shape1, o.shape2))
               * jnp.dtype(o.dtype).itemsize for o in plan.outputs)
  why = reuse(ntk_fn, plan, tiling, run_mesh(ntk_fn, tiling))[1] if tiling.split else ""
  return ScaleEstimate(plan.method, total, flops_tile, whole, per_tile, kernel, budget,
                       tiling, why)


def _splits(plan) -> bool:
  return axis0_mode(plan) != "whole"


# --- progress ---------------------------------------------------------------------------

class Progress:
  """Reports tiles done: a callback `progress(done, total, elapsed)`, a tqdm bar or a
  plain line on a terminal (progress=True, or None on a terminal), or nothing."""

  def __init__(self, progress, total: int):
    self.total, self.start = total, time.perf_counter()
    self.callback = self.bar = None
    self.line = False
    if callable(progress):
      self.callback = progress
      return
    if progress is None:
      progress = total > 1 and sys.stderr.isatty()
    if not progress:
      return
    self.bar = self._tqdm(total)
    self.line = self.bar is None

  @staticmethod
  def _tqdm(total: int):
    """A tqdm bar if tqdm is installed (pip install "ntk_compiler[progress]")."""
    try:
      import tqdm
    except ImportError:
      return None
    return tqdm.tqdm(total=total, unit="tile", desc="ntk")

  def update(self, done: int) -> None:
    elapsed = time.perf_counter() - self.start
    if self.callback is not None:
      self.callback(done, self.total, elapsed)
    elif self.bar is not None:
      self.bar.update(1)
    elif self.line:
      left = elapsed / done * (self.total - done) if done else float("nan")
      end = "\n" if done == self.total else ""
      sys.stderr.write(f"\rntk: {done}/{self.total} tiles, {elapsed:.1f} s elapsed, "
                       f"~{left:.1f} s left{end}")
      sys.stderr.flush()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def check_progress(progress) -> Any:
  if progress is None or isinstance(progress, bool) or callable(progress):
    return progress
  raise TypeError("progress must be None (a bar on a terminal only), True, False or a "
                  f"callable progress(done, total, elapsed), got {progress!r}.")


# --- out= -------------------------------------------------------------------------------

def _outputs(plan, out):
  """Per output leaf, the writable host array the kernel goes into."""
  shapes = [(o.layout.kernel_shape(o.shape1, o.shape2), np.dtype(o.dtype))
            for o in plan.outputs]
  if out is None:
    return [np.zeros(shape, dtype) for shape, dtype in shapes], None
  if isinstance(out, np.ndarray):
    leaves = [out]
    if plan.out_tree.num_leaves != 1:
      raise ValueError(
          f"out= is one array but f returns {plan.out_tree.num_leaves} output leaves; "
          f"pass a pytree of arrays shaped like the kernels ({plan.out_tree}).")
  else:
    leaves, tree = jax.tree_util.tree_flatten(out)
    if tree != plan.out_tree:
      raise ValueError(f"out= has pytree structure {tree} but the kernels have "
                       f"{plan.out_tree}; pass one array per output leaf of f.")
  for i, (leaf, (shape, dtype)) in enumerate(zip(leaves, shapes)):
    where = "out" if len(leaves) == 1 else f"out leaf {i}"
    if not isinstance(leaf, np.ndarray):
      raise TypeError(
          f"{where} is a {type(leaf).__name__}; out= takes writable NumPy arrays "
          "(np.empty, or np.lib.format.open_memmap for a .npy on disk). JAX arrays are "
          "immutable.")
    if tuple(leaf.shape) != tuple(shape):
      raise ValueError(f"{where} has shape {leaf.shape} but the kernel has shape "
                       f"{tuple(shape)}.")
    if leaf.dtype != dtype:
      raise ValueError(f"{where} has dtype {leaf.dtype} but the kernel has dtype "
                       f"{dtype}; allocate it with dtype={dtype}.")
    if not leaf.flags.writeable:
      raise ValueError(f"{where} is read-only; pass a writable array (a memmap opened "
                       "with mode 'w+' or 'r+').")
  return leaves, out


# --- running tiles ----------------------------------------------------------------------

def _host(x):
  return jax.tree_util.tree_map(np.asarray, x)


def _block(x, start: int, stop: int, size: int):
  """Examples start:stop of x, padded to `size` by repeating the last one (tiles are
  per example: the padded rows are computed and dropped)."""
  def one(a):
    part = a[start:stop]
    if stop - start < size:
      pad = np.repeat(part[-1:], size - (stop - start), axis=0)
      part = np.concatenate([part, pad], axis=0)
    return part
  return jax.tree_util.tree_map(one, x)


class _Runner:
  """Compiled tile programs, on one device or sharded over a mesh."""

  def __init__(self, ntk_fn, params, mesh: Mesh | None, mode: str):
    self.ntk_fn, self.mesh, self.mode = ntk_fn, mesh, mode
    # The compiled tile programs, kept per NTK function (they hold no arrays).
    self.cache: dict = ntk_fn.__dict__.setdefault("_scale_cache", {}).setdefault(
        ("runner", _mesh_key(mesh), mode), {})
    self.host_params = params
    self.params = jax.device_put(params) if mesh is None else self._put(params, P())
    self.local_params = None

  def _put(self, tree, spec):
    sharding = NamedSharding(self.mesh, spec)
    def one(a):
      a = np.asarray(a)
      return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
    return jax.tree_util.tree_map(one, tree)

  def _program(self, symmetric: bool, sharded: bool):
    key = (symmetric, sharded)
    if key in self.cache:
      return self.cache[key]
    compute = self.ntk_fn._compute
    if not sharded:
      program = jax.jit(lambda p, a, b: compute(p, a, None if symmetric else b))
    else:
      axis, mode = self.mesh.axis_names, self.mode

      def local(p, a, b):
        kernels = compute(p, a, b)
        if mode == "trace":  # equal shards: the mean of the shards' means
          kernels = jax.tree_util.tree_map(lambda k: jax.lax.pmean(k, axis), kernels)
        return kernels

      paired = mode in ("diagonal", "trace")
      program = jax.jit(jax.shard_map(
          local, mesh=self.mesh, in_specs=(P(), P(axis), P(axis) if paired else P()),
          out_specs=P() if mode == "trace" else P(axis), check_vma=False))
    self.cache[key] = program
    return program

  def tile(self, xa, xb, symmetric: bool):
    """The kernels of one tile (a list, one per output leaf), still on the device(s).

    Sharded, x2's block is passed whole (a block against itself is not symmetric once
    x1's rows are split); a block that does not split evenly (the last one of a traced
    batch axis, which is not padded) runs on one device."""
    batch = jax.tree_util.tree_leaves(xa)[0].shape[0]
    size = 1 if self.mesh is None else self.mesh.devices.size
    if self.mesh is None or batch % size:
      if self.mesh is not None and self.local_params is None:
        self.local_params = jax.device_put(self.host_params)
      params = self.params if self.mesh is None else self.local_params
      b = None if symmetric else jax.device_put(xb)
      kernels = self._program(symmetric, False)(params, jax.device_put(xa), b)
    else:
      axis = self.mesh.axis_names
      paired = self.mode in ("diagonal", "trace")
      kernels = self._program(False, True)(self.params, self._put(xa, P(axis)),
                                           self._put(xb, P(axis) if paired else P()))
    return jax.tree_util.tree_leaves(kernels)


class _Blocks:
  """Tiles from per-block values computed once and kept.

  A block's *side* is what a tile needs of it that does not depend on the other block:
  structured, its cotangents and factors; jacobian, its per-example Jacobians; ntk_vp,
  as x2, its cotangents in parameter space (as x1 it is only the inputs: f is
  linearised at them in each tile, one forward pass against the tile's b2·O JVPs).
  Sides are kept (up to `capacity` blocks, least recently used dropped) for every tile
  that needs them, and each tile is one contraction. `order` sorts the tiles so that
  kept sides are used again: rows of tiles in a snake (the last columns of a row are
  the first of the next), or columns first where only x2's side is worth keeping.
  `evaluations` counts the sides computed (tests check the reuse with it).
  """

  columns_first = False  # ntk_vp: only x2's side is kept, so tiles go column by column

  def __init__(self, ntk_fn, plan, params, budget: int, tile_bytes: int,
               extra: bool = False, mesh: Mesh | None = None):
    self.plan, self.problem, self.mesh = plan, plan.problem, mesh
    self.params = _place(params, mesh)
    self.precision = ntk_fn.precision
    self.cache: dict = {}
    self.budget, self.tile_bytes = budget, tile_bytes
    # extra: the tile's estimate already holds two sides; capacity counts the others.
    self.extra = extra
    self.capacity = None
    self.evaluations = 0
    self._side, self._pair = {}, {}
    # Where the compiled programs come from: this object, or a template made from
    # the abstract problem and kept per NTK function, so later calls with the same
    # signature compile nothing (`_blocks`).
    self.programs = self
    self.dtypes = [plan.outputs[i].dtype for i in plan.kept]

  def _source(self, which: int) -> int:
    """x1's (1) or x2's (2) data: with x2 omitted both sides read x1."""
    return 2 if which == 2 and self.problem.x2 is not None else 1

  def _side_fn(self, which: int):
    """(params, x block) -> the side, or None for a side that is the inputs."""
    raise NotImplementedError

  def _contract(self, s1, s2, b1: int, b2: int, symmetric: bool) -> list:
    raise NotImplementedError

  def side(self, which: int, start: int, x):
    fn = self.programs._side_fn(which)
    if fn is None:
      return self._inputs(x)
    key = (which if self._kind_differs() else 0, self._source(which), start)
    if key in self.cache:
      self.cache[key] = self.cache.pop(key)  # most recently used last
      return self.cache[key]
    if self.capacity is None:
      nbytes = self.programs.side_bytes(which, _rows(x))[1]
      room = int(max(0, self.budget - self.tile_bytes) // max(nbytes, 1))
      self.capacity = 2 + room if self.extra else max(2, room)
    if self.mesh is None:
      value = fn(self.params, jax.device_put(x))
    else:  # each device computes the side of its examples only
      value = self.programs._sharded_side(which)(self.params, self._inputs(x))
    self.evaluations += 1
    self.cache[key] = value
    while len(self.cache) > self.capacity:
      self.cache.pop(next(iter(self.cache)))
    return value

  def _kind_differs(self) -> bool:
    """Whether x1's and x2's sides are different things (then keyed apart)."""
    return False

  # --- several devices: sides sharded by examples, all-gathered in each tile ---

  def _devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.devices.size

  def _inputs(self, x):
    """A block of inputs on the device, or split by examples over the mesh."""
    if self.mesh is None:
      return jax.device_put(x)
    return _put(self.mesh, x, P(self.mesh.axis_names))

  def _template(self, which: int):
    return self.problem.x1 if self._source(which) == 1 else self.problem.second

  def layout(self, which: int):
    """(treedef, per leaf: split by examples?) of a block's side, or None when a leaf
    neither grows with the examples along its first axis nor stays the same (then the
    side cannot be sharded by examples). Found from the side's shapes at two block
    sizes (nothing runs)."""
    key = ("layout", which if self._kind_differs() else 0, self._source(which))
    if key not in self._side:
      fn = self._side_fn(which)
      x = self._template(which)
      if fn is None:
        fn = lambda p, xb: (p, xb)
      one, two = (jax.eval_shape(fn, self.params, _block_shapes(x, n)) for n in (1, 2))
      leaves, tree = jax.tree_util.tree_flatten(one)
      split = []
      for a, b in zip(leaves, jax.tree_util.tree_leaves(two)):
        if a.shape == b.shape:
          split.append(False)
        elif a.ndim and a.shape[1:] == b.shape[1:] and b.shape[0] == 2 * a.shape[0]:
          split.append(True)
        else:
          self._side[key] = None
          return None
      self._side[key] = (tree, split)
    return self._side[key]

  def side_bytes(self, which: int, rows: int) -> tuple[int, int]:
    """(bytes of a block's whole side, bytes each device keeps of it): the same on one
    device; sharded, the split leaves divided among the devices."""
    fn = self._side_fn(which)
    shapes = jax.eval_shape(fn, self.params, _block_shapes(self._template(which), rows))
    sizes = [_size(a.shape) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(shapes)]
    whole = sum(sizes)
    if self.mesh is None:
      return whole, whole
    _, split = self.layout(which)
    d = self._devices()
    return whole, sum(-(-n // d) if s else n for n, s in zip(sizes, split))

  def _specs(self, which: int):
    tree, split = self.layout(which)
    axis = self.mesh.axis_names
    return tree.unflatten([P(axis) if s else P() for s in split])

  def _sharded_side(self, which: int):
    key = ("sharded", which if self._kind_differs() else 0, self._source(which))
    if key not in self._side:
      self._side[key] = jax.jit(jax.shard_map(
          self._side_fn(which), mesh=self.mesh,
          in_specs=(P(), P(self.mesh.axis_names)), out_specs=self._specs(which),
          check_vma=False))
    return self._side[key]

  def _sharded_pair(self, b1: int, b2: int):
    """The tile program on the mesh: x1's side split by examples (each device its
    rows), x2's side all-gathered (`lax.all_gather`) so every device contracts its
    rows with the whole block; the tile comes out split by rows."""
    key = ("sharded", b1, b2)
    if key not in self._pair:
      axis = self.mesh.axis_names
      _, split2 = self.layout(2)

      def local(s1, s2):
        leaves, tree = jax.tree_util.tree_flatten(s2)
        s2 = tree.unflatten([jax.lax.all_gather(a, axis, tiled=True) if s else a
                             for a, s in zip(leaves, split2)])
        with _precision(self.precision):
          kernels = self._contract(s1, s2, b1, b2, False)
        return [kernel.astype(dtype) for kernel, dtype in zip(kernels, self.dtypes)]
      self._pair[key] = jax.jit(jax.shard_map(
          local, mesh=self.mesh, in_specs=(self._specs(1), self._specs(2)),
          out_specs=P(axis), check_vma=False))
    return self._pair[key]

  def _pad(self, x):
    """x2's block padded (its last example repeated) to a multiple of the devices."""
    rows = _rows(x)
    size = _round_up(rows, self._devices())
    return x if size == rows else _block(x, 0, rows, size)

  def side_share(self, b1: int, b2: int) -> float:
    """FLOPs of one x2 block's side over those of a tile's contraction, from XLA's
    cost analysis of the two programs as lowered (nothing compiles or runs)."""
    xb = _block_shapes(self.problem.second, b2)
    xa = _block_shapes(self.problem.x1, b1)
    fn = self._side_fn(2)
    s2 = jax.eval_shape(fn, self.params, xb)
    s1 = (self.params, xa) if self._side_fn(1) is None else jax.eval_shape(
        self._side_fn(1), self.params, xa)
    side = _flops(fn.lower(self.params, xb))
    pair = _flops(self._pair_fn(False).lower(s1, s2, b1, b2))
    return side / pair if pair else float("inf")

  def _pair_fn(self, symmetric: bool):
    if symmetric not in self._pair:
      def fn(s1, s2, b1, b2):
        with _precision(self.precision):
          kernels = self._contract(s1, s2, b1, b2, symmetric)
        return [kernel.astype(dtype) for kernel, dtype in zip(kernels, self.dtypes)]
      self._pair[symmetric] = jax.jit(fn, static_argnums=(2, 3))
    return self._pair[symmetric]

  def _shapes(self, b1: int, b2: int):
    return ([(b1,) + tuple(s[1:]) for s in self.problem.shapes1],
            [(b2,) + tuple(s[1:]) for s in self.problem.shapes2])

  def order(self, jobs: list) -> list:
    """The tiles (i, j) in the order that reuses kept sides most."""
    if self.columns_first:
      return sorted(jobs, key=lambda ij: (ij[1], ij[0]))
    rows: dict = {}
    for i, j in jobs:
      rows.setdefault(i, []).append((i, j))
    ordered = []
    for r, i in enumerate(sorted(rows)):
      ordered += rows[i] if r % 2 == 0 else rows[i][::-1]
    return ordered

  def tile(self, xa, xb, symmetric: bool, i: int, j: int):
    if self.mesh is not None:
      xb = self._pad(xb)
    s1 = self.side(1, i, xa)
    s2 = s1 if symmetric else self.side(2, j, xb)
    if self.mesh is not None:  # a diagonal tile too: x1's rows against the whole block
      return self.programs._sharded_pair(_rows(xa) // self._devices(), _rows(xb))(s1, s2)
    return self.programs._pair_fn(symmetric)(s1, s2, _rows(xa), _rows(xb))


def _place(params, mesh):
  """The parameters on the device, or replicated over the mesh (abstract ones, for
  decisions that run nothing, as they are)."""
  if any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree_util.tree_leaves(params)):
    return params
  return jax.device_put(params) if mesh is None else _put(mesh, params, P())


def _flops(lowered) -> float:
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def _rows(x) -> int:
  return jax.tree_util.tree_leaves(x)[0].shape[0]


class _Sides(_Blocks):
  """The structured method's sides: each block's cotangents and factors (`emit.Side`)."""

  def __init__(self, ntk_fn, plan, params, budget: int, tile_bytes: int, mesh=None):
    # Sharded, the tile's estimate holds its two sides (as for jacobian / ntk_vp);
    # on one device choose_tiling leaves half the budget to the kept sides.
    super().__init__(ntk_fn, plan, jax.tree_util.tree_leaves(params), budget,
                     tile_bytes, extra=mesh is not None, mesh=mesh)
    from ntk_compiler import emit
    self.emit = emit
    self.engine1, self.engine2 = plan.engine, plan.engine2 or plan.engine

  def _side_fn(self, which: int):
    which = self._source(which)
    if which not in self._side:
      engine = self.engine1 if which == 1 else self.engine2

      def fn(params, x):
        with _precision(self.precision):
          side = self.emit.side(engine, params, jax.tree_util.tree_leaves(x), True)
        return side.cts, side.factors
      self._side[which] = jax.jit(fn)
    return self._side[which]

  def _contract(self, s1, s2, b1, b2, symmetric):
    materialise = getattr(self.plan.estimate, "materialise", frozenset())
    shapes1, shapes2 = self._shapes(b1, b2)
    return self.emit.contract_kernels(
        self.engine1, self.engine2, self.emit.Side(*s1), self.emit.Side(*s2), symmetric,
        self.problem.layouts, shapes1, shapes2, True, materialise)


class _Jacobians(_Blocks):
  """The jacobian method's sides: each block's per-example Jacobians."""

  def __init__(self, ntk_fn, plan, params, budget: int, tile_bytes: int, mesh=None):
    super().__init__(ntk_fn, plan, params, budget, tile_bytes, extra=True, mesh=mesh)

  def _side_fn(self, which: int):
    if "jac" not in self._side:
      from ntk_compiler.methods import jacobian
      problem = self.problem

      def fn(params, x):
        with _precision(self.precision):
          return jacobian.jacobians(dataclasses.replace(problem, params=params), x)
      self._side["jac"] = jax.jit(fn)
    return self._side["jac"]

  def _contract(self, s1, s2, b1, b2, symmetric):
    from ntk_compiler.methods import jacobian
    shapes1, shapes2 = self._shapes(b1, b2)
    sub = dataclasses.replace(self.problem, shapes1=tuple(map(tuple, shapes1)),
                              shapes2=tuple(map(tuple, shapes2)))
    return jacobian.contract(sub, s1, s2)


class _Cotangents(_Blocks):
  """The ntk_vp method's sides: x2's blocks' cotangents in parameter space (x1's blocks
  are linearised in each tile: one forward pass, against the tile's b2·O JVPs)."""

  columns_first = True

  def __init__(self, ntk_fn, plan, params, budget: int, tile_bytes: int, mesh=None):
    super().__init__(ntk_fn, plan, params, budget, tile_bytes, extra=True, mesh=mesh)

  def _kind_differs(self) -> bool:
    return True

  def _side_fn(self, which: int):
    if which == 1:
      return None
    if "cts" not in self._side:
      from ntk_compiler.methods import ntk_vp
      problem = self.problem

      def fn(params, x):
        b = jax.tree_util.tree_leaves(x)[0].shape[0]
        sub = dataclasses.replace(problem, params=params, x2=x, shapes2=tuple(
            (b,) + tuple(s[1:]) for s in problem.shapes2))
        with _precision(self.precision):
          return ntk_vp.param_cotangents(sub)
      self._side["cts"] = jax.jit(fn)
    return self._side["cts"]

  def tile(self, xa, xb, symmetric: bool, i: int, j: int):
    if self.mesh is not None:
      xb = self._pad(xb)
      return self.programs._sharded_pair(_rows(xa) // self._devices(), _rows(xb))(
          (self.params, self._inputs(xa)), self.side(2, j, xb))
    s2 = self.side(2, j, xb)
    return self.programs._pair_fn(False)((self.params, jax.device_put(xa)), s2, _rows(xa),
                                _rows(xb))

  def _contract(self, s1, s2, b1, b2, symmetric):
    from ntk_compiler.methods import ntk_vp
    params, xa = s1
    shapes1, shapes2 = self._shapes(b1, b2)
    sub = dataclasses.replace(self.problem, params=params, x1=xa, x2=xa,
                              shapes1=tuple(map(tuple, shapes1)),
                              shapes2=tuple(map(tuple, shapes2)))
    return ntk_vp.push_forward(sub, s2)


def _precision(precision):
  import contextlib
  return (contextlib.nullcontext() if precision == "default"
          else jax.default_matmul_precision(precision))


def _pieces(kernel) -> list:
  """(index within the tile, host array) of each piece of a tile this process holds:
  the whole tile when it is addressable here, else this host's shards."""
  if not isinstance(kernel, jax.Array) or kernel.is_fully_addressable:
    piece = np.asarray(kernel)
    return [(tuple(slice(0, n) for n in piece.shape), piece)]
  seen, pieces = set(), []
  for shard in kernel.addressable_shards:
    index = tuple(slice(s.start or 0, s.stop if s.stop is not None else n)
                  for s, n in zip(shard.index, kernel.shape))
    key = tuple((s.start, s.stop) for s in index)
    if key not in seen:
      seen.add(key)
      pieces.append((index, np.asarray(shard.data)))
  return pieces


def _write(dest, offsets, valid, kernel, perm=None) -> None:
  """Writes the valid part of a tile into dest at `offsets` (its leading axes; the
  others whole), permuted by `perm` (the mirror of a tile) if given."""
  for index, piece in _pieces(kernel):
    src, dst = [], []
    for axis, s in enumerate(index):
      start, stop = s.start, s.start + piece.shape[axis]
      if axis < len(offsets):
        stop = min(stop, valid[axis])
        if stop <= start:
          break
        src.append(slice(0, stop - start))
        dst.append(slice(offsets[axis] + start, offsets[axis] + stop))
      else:
        src.append(slice(None))
        dst.append(slice(start, stop))
    else:
      part = piece[tuple(src)]
      if perm is not None:
        part, dst = np.transpose(part, perm), [dst[p] for p in perm]
      dest[tuple(dst)] = part.astype(dest.dtype, copy=False)


def compute(ntk_fn, params, x1, x2=None, out=None, plan=None, est=None) -> Any:
  """The kernel(s) in tiles, under the NTK function's budget, on its devices, into
  `out` (NumPy arrays, or new ones): what `NTKFunction.__call__` runs when the call
  does not fit in one piece, or out=, block_size= or several devices ask for it."""
  plan = ntk_fn.plan(params, x1, x2) if plan is None else plan
  est = estimate(ntk_fn, params, x1, x2, plan=plan) if est is None else est
  tiling = est.tiling
  dests, given = _outputs(plan, out)
  if tiling.mode == "whole" and not est.fits:
    _warn_whole(plan, est)
  if (plan.method == "structured" and plan.engine is None and tiling.split
      and jax.tree_util.tree_leaves(params)):
    plan = ntk_fn.plan(params, x1, x2)  # the structured plans were dropped from the cache
  kept = plan.kept
  live = [dests[i] for i in kept]
  for i, d in enumerate(dests):
    if i not in kept:
      d[...] = 0
  mesh = run_mesh(ntk_fn, tiling)
  # Traced, every process sums the whole mean; whole (f mixes examples), every
  # process computes the whole kernel on its own device: nothing to gather.
  gather = (given is None and tiling.mode in ("pairs", "diagonal") and mesh is not None
            and _spans_processes(mesh))
  if gather:
    _check_host_memory(est, mesh)
  if kept and tiling.tiles:
    _run_tiles(ntk_fn, params, x1, x2, plan, tiling, live,
               Progress(ntk_fn.progress, tiling.tiles))
    for dest in live:
      if isinstance(dest, np.memmap):
        _release(dest)
    if gather:
      _gather_processes(live)
  return given if given is not None else plan.out_tree.unflatten(dests)


# Across processes, the kernels are gathered this many bytes (all processes' pieces
# together) at a time.
GATHER_BYTES = 64 * 2**20


def host_budget() -> int:
  """The host memory a kernel returned without out= may take: a share of the RAM."""
  try:
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    ram = 8 * 2**30
  return int(ram * HOST_FRACTION)


def _check_host_memory(est, mesh) -> None:
  """A call spanning processes without out= returns the whole kernel on every
  process: refused before any tile runs when it would not fit the host's share."""
  processes = len({d.process_index for d in mesh.devices.flat})
  need = est.kernel_bytes + min(est.kernel_bytes, GATHER_BYTES)
  if need > host_budget():
    raise MemoryError(
        f"devices= spans {processes} processes and out= is not given, so every process "
        f"would hold the whole kernel ({_fmt(est.kernel_bytes)}), over this host's "
        f"share of memory ({_fmt(host_budget())}, HOST_FRACTION of the RAM). Pass out= "
        "a memmap of one .npy on a filesystem every host sees, opened in every process "
        "(docs/scale.md, 'Devices and hosts'): each process then writes its own rows.")


def _gather_processes(dests) -> None:
  """Every process's rows made whole on every process: each process wrote the rows
  its devices computed (and their mirrors) and left the others zero, so the kernel
  is the sum over processes of their arrays, gathered in chunks of rows with
  `multihost_utils.process_allgather` (exact: each entry is written by one process)."""
  from jax.experimental import multihost_utils
  processes = jax.process_count()
  for dest in dests:
    if not dest.size:
      continue
    rows = dest.reshape(dest.shape[0], -1) if dest.ndim else dest.reshape(1, 1)
    step = max(1, GATHER_BYTES // max(1, rows[0].nbytes * processes))
    for r in range(0, rows.shape[0], step):
      parts = multihost_utils.process_allgather(np.ascontiguousarray(rows[r:r + step]))
      rows[r:r + step] = np.asarray(parts).sum(axis=0, dtype=dest.dtype)


def _spans_processes(mesh: Mesh) -> bool:
  return any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def _warn_whole(plan, est) -> None:
  warnings.warn(
      f"f mixes the examples of a batch ({plan.batch.reason}), so its kernel cannot be "
      f"split by examples; it is computed in one piece, estimated at "
      f"{_fmt(est.peak_bytes)} against a budget of {_fmt(est.budget)}. If it runs out "
      "of memory, call it on fewer examples, or make f per-example "
      "(batch_independent=True if it is).", ResourceWarning, stacklevel=4)


def _run_tiles(ntk_fn, params, x1, x2, plan, tiling: Tiling, dests, reporter) -> None:
  mode, symmetric = tiling.mode, plan.problem.symmetric
  mesh = run_mesh(ntk_fn, tiling)
  if mode == "whole":
    runner = _Runner(ntk_fn, params, None, mode)
    kernels = runner.tile(x1, x2 if x2 is not None else x1, symmetric)
    for d, k in zip(dests, kernels):
      d[...] = np.asarray(k)
    reporter.update(1)
    reporter.close()
    return
  blocks = _blocks(ntk_fn, plan, params, tiling, mesh)
  if blocks is None:
    runner = _Runner(ntk_fn, params, mesh, mode)
  h1 = _host(x1)
  h2 = h1 if x2 is None else _host(x2)
  n1, n2, b1, b2 = tiling_sizes(plan, tiling)
  layouts = plan.problem.layouts
  jobs = []
  for i in range(0, n1, b1):
    if mode in ("diagonal", "trace"):
      jobs.append((i, i))
      continue
    for j in range(i if symmetric else 0, n2, b2):
      jobs.append((i, j))
  if blocks is not None:
    jobs = blocks.order(jobs)
  final = dests
  if mode == "trace":
    # The mean over blocks is summed on the host and written once at the end: with
    # several processes writing one file, each writes the same whole value.
    dests = [np.zeros(d.shape, d.dtype) for d in final]
  pending, done, written = None, 0, {}
  try:
    for i, j in jobs:
      stop1, stop2 = min(i + b1, n1), min(j + b2, n2)
      # A traced batch axis averages over the block: its last block is not padded.
      pad1 = stop1 - i if mode == "trace" else b1
      pad2 = stop2 - j if mode == "trace" else (b1 if mode != "pairs" else b2)
      xa, xb = _block(h1, i, stop1, pad1), _block(h2, j, stop2, pad2)
      if blocks is not None:
        kernels = blocks.tile(xa, xb, symmetric and i == j, i, j)
      else:
        kernels = runner.tile(xa, xb, symmetric and i == j)
      if pending is not None:
        _store(pending, dests, layouts, mode, symmetric, n1, written)
        done += 1
        reporter.update(done)
      pending = (kernels, i, stop1, j, stop2)
    if pending is not None:
      _store(pending, dests, layouts, mode, symmetric, n1, written)
      done += 1
      reporter.update(done)
    if mode == "trace":
      for dest, total in zip(final, dests):
        dest[...] = total
  finally:
    reporter.close()


_KINDS = {"structured": _Sides, "jacobian": _Jacobians, "ntk_vp": _Cotangents}
_SIDE_NAMES = {"structured": "cotangents and factors",
               "jacobian": "per-example Jacobians",
               "ntk_vp": "cotangents in parameter space (x2's)"}


def run_mesh(ntk_fn, tiling: Tiling) -> Mesh | None:
  """The mesh the tiles run on: None for one device (unless a Mesh was given)."""
  if tiling.devices > 1 or isinstance(ntk_fn.devices, Mesh):
    return mesh_of(ntk_fn.devices)
  return None


def _budget(ntk_fn, mesh) -> int:
  return ntk_fn.max_memory or default_budget(
      mesh.devices.flat if mesh is not None else jax.local_devices()[:1])


def _tile_bytes(plan, tiling: Tiling, mesh) -> int:
  local = tiling.block1 // (1 if mesh is None else mesh.devices.size)
  diagonal = tiling.mode != "pairs"
  return peak_bytes(plan.method, sizes(plan), local,
                    local if diagonal else tiling.block2, diagonal=diagonal)


def reuse(ntk_fn, plan, tiling: Tiling, mesh) -> tuple[type | None, str]:
  """Whether the tiles keep each block's side (the `_Blocks` kind, or None: each tile
  computes its own in one program), and a line saying so and why (estimate(),
  explain()). Decided once per signature, from shapes and XLA's FLOP counts of the
  lowered programs (nothing compiles or runs).

  Kept on one device: structured (every layout), jacobian and ntk_vp (a grid of
  tiles: with axis 0 diagonal or traced each block is in one tile only) where one
  block's side costs at least REUSE_MIN_SIDE_SHARE of a tile's contraction. On a mesh
  (a grid of tiles), each block's side is computed once split by examples over the
  devices and all-gathered in each tile that needs it, when every leaf of a side
  splits by examples, one block's whole side plus two blocks' shards fit the
  budget per device, and computing a side costs at least MESH_MIN_FLOPS_PER_BYTE
  (for the devices' platform) per byte of it (else recomputing beats all-gathering);
  jacobian and ntk_vp also need the cost share, per device (the side each device
  recomputes in a tile, x2's whole block, against its rows of the contraction)."""
  kind = _KINDS.get(plan.method)
  if kind is None or tiling.mode == "whole" or (
      plan.method == "structured" and getattr(plan, "engine", None) is None):
    return None, ""
  if tiling.mode != "pairs" and (kind is not _Sides or mesh is not None):
    return None, ""  # each block is in one tile: nothing to keep
  cache = ntk_fn.__dict__.setdefault("_scale_cache", {})
  key = ("reuse", _reuse_key(plan, tiling, mesh))
  if key not in cache:
    cache[key] = _measure(ntk_fn, plan, kind, tiling, mesh)
  facts = cache[key]
  what = _SIDE_NAMES[plan.method]
  recompute = f"each tile recomputes its blocks' {what}"
  if facts.get("unsplit"):
    return None, f"{recompute}: a side does not split by examples over the devices"
  if facts.get("whole", 0) + 2 * facts.get("shard", 0) > facts["budget"]:
    return None, (f"{recompute}: one block's, all-gathered ({_fmt(facts['whole'])}), "
                  f"and two blocks' shards exceed the budget per device "
                  f"({_fmt(facts['budget'])})")
  intensity, platform = facts.get("intensity"), facts.get("platform")
  least = MESH_MIN_FLOPS_PER_BYTE.get(platform, MESH_MIN_FLOPS_PER_BYTE[None])
  if intensity is not None and intensity < least:
    return None, (f"{recompute}: computing one block's costs {intensity:.3g} FLOPs per "
                  f"byte of it, under MESH_MIN_FLOPS_PER_BYTE for {platform} "
                  f"({least:g}): recomputing it beats all-gathering it")
  share = facts.get("share")
  if share is not None and share < REUSE_MIN_SIDE_SHARE:
    return None, (f"{recompute}: one block's costs {share:.2g}x a tile's contraction"
                  f"{' per device' if mesh is not None else ''} (under "
                  f"REUSE_MIN_SIDE_SHARE = {REUSE_MIN_SIDE_SHARE}, where one program "
                  "per tile measured faster)")
  how = (f"each block's {what} computed once and kept for the tiles that need them"
         if mesh is None else
         f"each block's {what} computed once, split over the {mesh.devices.size} "
         "devices, and all-gathered in each tile that needs them")
  return kind, how


def _mesh_key(mesh):
  return None if mesh is None else (mesh.axis_names, mesh.devices.shape,
                                    tuple(d.id for d in mesh.devices.flat))


def _reuse_key(plan, tiling: Tiling, mesh):
  problem = plan.problem
  return (plan.method, tiling, _signature(problem.params), _signature(problem.x1),
          _signature(problem.second), _mesh_key(mesh))


def _measure(ntk_fn, plan, kind, tiling: Tiling, mesh) -> dict:
  """The facts `reuse` decides from: budget, side bytes (sharded), cost share."""
  budget = _budget(ntk_fn, mesh)
  facts = {"budget": budget}
  params = _abstract(plan.problem.params)
  blocks = kind(ntk_fn, plan, params, budget, _tile_bytes(plan, tiling, mesh),
                mesh=mesh)
  d = 1 if mesh is None else mesh.devices.size
  b2 = _round_up(tiling.block2, d)
  if mesh is not None:
    if blocks.layout(1) is None or blocks.layout(2) is None:
      return dict(facts, unsplit=True)
    facts["whole"], facts["shard"] = blocks.side_bytes(2, b2)
    side = _flops(blocks._side_fn(2).lower(
        blocks.params, _block_shapes(blocks._template(2), b2)))
    facts["intensity"] = side / max(facts["whole"], 1)
    facts["platform"] = mesh.devices.flat[0].platform
  if kind is not _Sides:
    facts["share"] = blocks.side_share(tiling.block1 // d, b2)
  return facts


# On a mesh, a kept side is all-gathered in every tile that needs it instead of being
# recomputed there: that pays only when computing it costs more FLOPs per byte of it
# than the device's FLOP rate over its all-gather bandwidth. Rough balances (not
# measured on multi-accelerator machines): a GPU at ~60 TFLOP/s in float32 over
# ~450 GB/s of NVLink; CPU devices copy at ~10 GB/s per core against ~50-100
# GFLOP/s. Per-example Jacobians (and ntk_vp's cotangents) of an MLP cost about 1
# FLOP per byte: recomputed; a conv net's, and the structured method's cotangents of
# wide layers (~100 on a 3x256 MLP), more.
MESH_MIN_FLOPS_PER_BYTE = {"cpu": 8.0, "gpu": 128.0, "tpu": 128.0, None: 128.0}


def _blocks(ntk_fn, plan, params, tiling: Tiling, mesh) -> _Blocks | None:
  """The runner that keeps each block's side for the tiles that need it (`reuse`
  decides), or None: each tile in one program (`_Runner`)."""
  kind, _ = reuse(ntk_fn, plan, tiling, mesh)
  if kind is None:
    return None
  budget, tile_bytes = _budget(ntk_fn, mesh), _tile_bytes(plan, tiling, mesh)
  blocks = kind(ntk_fn, plan, params, budget, tile_bytes, mesh=mesh)
  cache = ntk_fn.__dict__.setdefault("_scale_cache", {})
  key = ("programs", kind.__name__, _reuse_key(plan, tiling, mesh))
  if key not in cache:  # programs that hold no arrays of this call
    cache[key] = kind(ntk_fn, _abstract_plan(plan), _abstract(params), budget,
                      tile_bytes, mesh=mesh)
  blocks.programs = cache[key]
  return blocks


def _abstract_plan(plan):
  """The plan with its problem's arrays replaced by their shapes (engines kept)."""
  problem = plan.problem
  return dataclasses.replace(plan, problem=dataclasses.replace(
      problem, params=_abstract(problem.params), x1=_abstract(problem.x1),
      x2=None if problem.x2 is None else _abstract(problem.x2)))


# jacobian and ntk_vp keep blocks' sides only where computing a side costs at least
# this share of a tile's contraction (XLA's FLOP counts of the two programs): kept
# sides are a second program per tile and lose the fusion of one program (measured
# on a 3x256 MLP, jacobian, blocks of 22, side 9 % of the tile: 1.6x slower kept; on
# the benchmark CNN, blocks of 13, side 15x the tile: 0.63x the time).
REUSE_MIN_SIDE_SHARE = 0.5


def tiling_sizes(plan, tiling):
  n1 = plan.problem.shapes1[0][0]
  n2 = plan.problem.shapes2[0][0]
  return n1, n2, tiling.block1, tiling.block2


# A memmap's written pages are flushed and dropped from the process (they stay in the
# file and the page cache) every this many bytes, so its resident memory stays small.
RELEASE_BYTES = 64 * 2**20


def _release(dest) -> None:
  """Flushes a memmap and drops its pages from this process's resident memory."""
  import mmap
  base = dest
  while base is not None and getattr(base, "_mmap", None) is None:
    base = base.base if isinstance(base, np.ndarray) else None
  handle = getattr(base, "_mmap", None)
  if handle is None or not hasattr(handle, "madvise"):
    return
  dest.flush()
  try:
    handle.madvise(mmap.MADV_DONTNEED)
  except (OSError, ValueError, AttributeError):  # not on this platform: only flushed
    pass


def _store(pending, dests, layouts, mode, symmetric, n1, written=None) -> None:
  kernels, i, stop1, j, stop2 = pending
  for k, (dest, layout, kernel) in enumerate(zip(dests, layouts, kernels)):
    if written is not None and isinstance(dest, np.memmap):
      written[k] = written.get(k, 0) + kernel.size * dest.itemsize * (
          2 if symmetric and i != j else 1)
      if written[k] >= RELEASE_BYTES:
        _release(dest)
        written[k] = 0
    if mode == "trace":  # the mean over examples, block by block
      ((_, piece),) = _pieces(kernel)[:1]
      dest += piece.astype(dest.dtype) * ((stop1 - i) / n1)
    elif mode == "diagonal":
      _write(dest, (i,), (stop1 - i,), kernel)
    else:
      _write(dest, (i, j), (stop1 - i, stop2 - j), kernel)
      if symmetric and i != j:
        _write(dest, (i, j), (stop1 - i, stop2 - j), kernel, layout.mirror_perm())


# --- deciding whether to tile -----------------------------------------------------------

def _signature(tree):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple(_leaf_signature(a) for a in leaves)


def _leaf_signature(a):
  """(shape, dtype) of an argument leaf: read off arrays directly (every call of an
  NTK function computes its key: 20-70 µs per call with jnp.result_type per leaf)."""
  if isinstance(a, (jax.Array, np.ndarray)):
    return a.shape, a.dtype
  return jnp.shape(a), jnp.result_type(a)


def _is_traced(*trees) -> bool:
  return any(isinstance(a, jax.core.Tracer)
             for t in trees for a in jax.tree_util.tree_leaves(t))


def _signature_key(params, x1, x2):
  return (_signature(params), _signature(x1), None if x2 is None else _signature(x2))


def _light(plan):
  """The plan without arrays (kept per signature, it must not hold the arguments)."""
  problem = dataclasses.replace(
      plan.problem, params=_abstract(plan.problem.params), x1=_abstract(plan.problem.x1),
      x2=None if plan.problem.x2 is None else _abstract(plan.problem.x2))
  return dataclasses.replace(plan, problem=problem, engine=None, engine2=None)


def cached_estimate(ntk_fn, params, x1, x2):
  """(plan without arrays, estimate) for this signature, computed once per NTK
  function."""
  cache = ntk_fn.__dict__.setdefault("_scale_cache", {})
  key = ("estimate", _signature_key(params, x1, x2))
  if key not in cache:
    plan = ntk_fn.plan(params, x1, x2)
    cache[key] = (_light(plan), estimate(ntk_fn, params, x1, x2, plan=plan))
  return cache[key]


_BUDGETS: dict = {}


def _fits_quickly(ntk_fn, params, x1, x2) -> bool:
  """Whether the call surely fits the budget in one piece on one device (no plan)."""
  cache = ntk_fn.__dict__.setdefault("_scale_cache", {})
  key = ("quick", _signature_key(params, x1, x2))
  if key not in cache:
    try:
      bound = quick_bound(ntk_fn, params, x1, x2)
    except Exception:  # bad arguments: the one-piece path raises the proper error
      bound = 0
    budget = ntk_fn.max_memory
    if budget is None:
      device = jax.local_devices()[0]
      if device not in _BUDGETS:
        _BUDGETS[device] = default_budget([device])
      budget = _BUDGETS[device]
    cache[key] = bound <= budget
  return cache[key]


def call(ntk_fn, params, x1, x2=None, out=None):
  """`ntk_fn(params, x1, x2, out=...)`: in one piece by the NTK function's own jitted
  program, on one device, when that fits the budget of one device (the result is then
  a JAX array, as from any jitted function), else in tiles over every local device
  (NumPy arrays on the host, or `out`). `block_size=`, `devices=` and `out=` always
  take the tiled path (NumPy, or `out`)."""
  if _is_traced(params, x1, x2):
    if out is not None:
      raise TypeError("out= needs concrete arrays: it writes the kernel tile by tile "
                      "on the host, which cannot happen under jax.jit / vmap / grad.")
    return ntk_fn._jitted(params, x1, x2)
  explicit = (out is not None or ntk_fn.block_size is not None
              or ntk_fn.devices is not None)
  if not explicit and _fits_quickly(ntk_fn, params, x1, x2):
    return ntk_fn._jitted(params, x1, x2)
  plan, est = cached_estimate(ntk_fn, params, x1, x2)
  in_one_piece = est.fits or est.tiling.mode == "whole"
  if not explicit and est.tiling.devices == 1 and in_one_piece:
    if not est.fits:
      _warn_whole(plan, est)
    return ntk_fn._jitted(params, x1, x2)
  return compute(ntk_fn, params, x1, x2, out, plan=plan, est=est)


# --- Θ·v --------------------------------------------------------------------------------

def _vector_leaves(plan, v, name="v"):
  """v's leaves, checked against the x2 side of each kernel (traced axes left out)."""
  want = [tuple(n for a, n in enumerate(o.shape2) if a not in o.layout.trace)
          for o in plan.outputs]
  if plan.out_tree.num_leaves == 1 and not isinstance(v, (list, tuple, dict)):
    leaves = [v]
  else:
    leaves, tree = jax.tree_util.tree_flatten(v)
    if tree != plan.out_tree:
      raise ValueError(f"{name} has pytree structure {tree} but f's output has "
                       f"{plan.out_tree}; pass one array per output leaf.")
  for i, (leaf, shape, o) in enumerate(zip(leaves, want, plan.outputs)):
    if tuple(jnp.shape(leaf)) != shape:
      traced = f" (traced axes {o.layout.trace} left out)" if o.layout.trace else ""
      raise ValueError(
          f"{name}{'' if len(want) == 1 else f' leaf {i}'} has shape "
          f"{tuple(jnp.shape(leaf))}; it must be shaped like f(params, x2)"
          f"{traced}: {shape}.")
  return leaves


def _masks(shape, axes):
  """One-hot masks over `axes` of an array of `shape`: (m,) + shape broadcastable."""
  sub = [shape[a] for a in axes]
  m = _size(sub)
  eye = jnp.eye(m).reshape([m] + sub)
  full = [1] * len(shape)
  for a in axes:
    full[a] = shape[a]
  return eye.reshape([m] + full)


def _leaf_fn(f, k):
  return lambda p, x: jax.tree_util.tree_leaves(f(p, x))[k]


def _cotangents(fk, params, x2, v_full, axes):
  """Σ_x2 J2ᵀ (v masked to each index of `axes`): one VJP per index, stacked."""
  out, vjp = jax.vjp(lambda p: fk(p, x2), params)
  masks = _masks(out.shape, axes)
  return jax.vmap(lambda m: vjp((v_full * m).astype(out.dtype))[0])(masks)


def _push(fk, params, x1, u, axes, shape1):
  """Σ_s (J1 u_s) masked to index s of `axes`: shape1."""
  _, jvp = jax.linearize(lambda p: fk(p, x1), params)
  ys = jax.vmap(jvp)(u)
  masks = _masks(shape1, axes)
  return jnp.sum(ys * masks.astype(ys.dtype), axis=0)


def _full_v(vk, layout, shape):
  """v with the traced axes put back (broadcast): shaped like the output leaf."""
  for a in layout.trace:
    vk = jnp.expand_dims(vk, a)
  return jnp.broadcast_to(vk, shape)


def _finish(y, layout, shape):
  """The traced axes summed out and divided by their size."""
  if layout.trace:
    y = jnp.sum(y, axis=layout.trace) / layout.trace_size(shape)
  return y


def matvec(ntk_fn, params, x1, x2, v):
  """Θ(x1, x2)·v without the kernel (`NTKFunction.matvec`)."""
  if _is_traced(params, x1, x2, v):
    plan, est = ntk_fn.plan(params, x1, x2), None
  else:  # planned once per signature
    plan, est = cached_estimate(ntk_fn, params, x1, x2)
  vs = _vector_leaves(plan, v)
  problem = dataclasses.replace(plan.problem, params=params, x1=x1, x2=x2)
  outs = [jnp.zeros(tuple(n for a, n in enumerate(o.shape1) if a not in o.layout.trace),
                    o.dtype) for o in plan.outputs]
  if not problem.layouts or not jax.tree_util.tree_leaves(params):
    return plan.out_tree.unflatten(outs)
  mesh = None
  if est is not None and (est.tiling.devices > 1 or isinstance(ntk_fn.devices, Mesh)):
    mesh = mesh_of(ntk_fn.devices)
  programs = ntk_fn.__dict__.setdefault("_scale_cache", {}).setdefault(
      ("matvec", _signature_key(params, x1, x2),
       None if _is_traced(params, x1, x2, v) else "concrete"), {})
  for k, i in enumerate(plan.kept):
    o = plan.outputs[i]
    with _precision(ntk_fn.precision):
      y = _matvec_leaf(problem, k, o, jnp.asarray(vs[i]), est, mesh, programs)
    outs[i] = y.astype(o.dtype)
  return plan.out_tree.unflatten(outs)


def _put(mesh, tree, spec):
  """Host arrays laid out over `mesh` (every process passes the same values)."""
  sharding = NamedSharding(mesh, spec)
  def one(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
  return jax.tree_util.tree_map(one, tree)


def _padded(a, start, stop, size):
  """Rows start:stop of a host array, padded with zeros to `size` rows."""
  part = a[start:stop]
  if stop - start < size:
    part = np.concatenate([part, np.zeros((size - (stop - start),) + part.shape[1:],
                                          part.dtype)])
  return part


def _matvec_leaf(problem, k, o, vk, est, mesh, cache):
  """Θ·v for output leaf k. Per example: in blocks of examples (the kernel's tiling),
  each block split over `mesh` when there is one. Programs are kept in `cache` (one
  per signature), so repeated products (Lanczos, CG) compile once."""
  layout, shape1, shape2 = o.layout, o.shape1, o.shape2
  fk = _leaf_fn(problem.f, k)
  axes = tuple(sorted(layout.trace + layout.diagonal))
  x1, x2, params = problem.x1, problem.second, problem.params
  v_full = _full_v(vk, layout, shape2)
  def jitted(name, make):
    if (name, k) not in cache:
      cache[(name, k)] = make()
    return cache[(name, k)]

  if not problem.batch_independent or est is None:
    run = jitted("whole", lambda: jax.jit(lambda p, a, b, vf: _push(
        fk, p, a, _cotangents(fk, p, b, vf, axes), axes, shape1)))
    return _finish(run(params, x1, x2, v_full), layout, shape1)
  b = est.tiling.block1
  h1, h2, hv = _host(x1), _host(x2), np.asarray(v_full)
  n1, n2 = shape1[0], shape2[0]
  spec = P(mesh.axis_names) if mesh is not None else None
  put = (lambda t, sp: _put(mesh, t, sp)) if mesh is not None else (
      lambda t, sp: jax.device_put(t))
  p_dev = put(params, P())

  def sharded(fn, in_specs, out_specs):
    """fn over the mesh; a result split by examples is gathered on every device (so
    every process, on several hosts, can read the whole block)."""
    if mesh is None:
      return jax.jit(fn)
    if out_specs != P():
      axis_names = mesh.axis_names
      gathered = lambda *args: jax.lax.all_gather(fn(*args), axis_names, tiled=True)
    else:
      gathered = fn
    return jax.jit(jax.shard_map(gathered, mesh=mesh, in_specs=in_specs,
                                 out_specs=P(), check_vma=False))

  if 0 in axes:
    # Only pairs (x1[n], x2[n]) count: per example, vmapped over a block's examples.
    single = lambda p, x: fk(p, jax.tree_util.tree_map(lambda a: a[None], x))[0]
    rest = tuple(a - 1 for a in axes if a)

    def pairs(p, xa, xb, vb):
      def one(x1n, x2n, vn):
        u = _cotangents(single, p, x2n, vn, rest)
        return _push(single, p, x1n, u, rest, shape1[1:])
      return jax.vmap(one)(xa, xb, vb)

    run = jitted("pairs", lambda: sharded(pairs, (P(), spec, spec, spec), spec))
    rows = []
    for i in range(0, n1, b):
      stop = min(i + b, n1)
      y = run(p_dev, put(_block(h1, i, stop, b), spec), put(_block(h2, i, stop, b), spec),
              put(_padded(hv, i, stop, b), spec))
      rows.append(np.asarray(y)[:stop - i])
    return _finish(jnp.asarray(np.concatenate(rows)), layout, shape1)
  # u = Σ over x2's blocks of one VJP each (a padded row has a zero cotangent); then one
  # JVP per block of x1 (Θ·v is linear in v).
  axis = mesh.axis_names if mesh is not None else None

  def vjp_block(p, xb, vb):
    u = _cotangents(fk, p, xb, vb, axes)
    return u if mesh is None else jax.lax.psum(u, axis)

  local = b if mesh is None else b // mesh.devices.size
  run_vjp = jitted("vjp", lambda: sharded(vjp_block, (P(), spec, spec), P()))
  u = None
  for j in range(0, n2, b):
    stop = min(j + b, n2)
    part = run_vjp(p_dev, put(_block(h2, j, stop, b), spec),
                   put(_padded(hv, j, stop, b), spec))
    u = part if u is None else jax.tree_util.tree_map(jnp.add, u, part)
  push = jitted("jvp", lambda: sharded(
      lambda p, xa, uu: _push(fk, p, xa, uu, axes, (local,) + tuple(shape1[1:])),
      (P(), spec, P()), spec))
  rows = []
  for i in range(0, n1, b):
    stop = min(i + b, n1)
    rows.append(np.asarray(push(p_dev, put(_block(h1, i, stop, b), spec), u))[:stop - i])
  return _finish(jnp.asarray(np.concatenate(rows)), layout, shape1)

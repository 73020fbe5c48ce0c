"""Random programs f(params, x) for fuzzing every NTK method against the float64 oracle.

`programs()` is a hypothesis strategy. A drawn `Program` is built op by op on an
activation h of shape (N,) + feat, from the primitives that have rules:

- dense layers over the last or another axis, batched (dot_general batch dims), with
  weights new or shared with other uses through views (scaled, negated, transposed,
  reshaped, sliced, cast to float32 / float16), products of two uses, bias, scale,
  sub / neg / div, select, nonlinearities (also custom_jvp ones), casts;
- transpose, reshape (merge and split), broadcast, concatenate, pad (negative and
  interior too), slice, split, rev, reductions (sum, mean, max), cumsum, convolutions
  (1-d with stride, dilation, groups; 2-d), windowed sums;
- gather from constant ids, embedding lookups of integer inputs, `jnp.take` of weights,
  dynamic_slice at constant and per-example (vmapped) indices;
- lax.scan (an RNN over the sequence axis, stacked layer weights), fori_loop (a while
  loop), cond / switch (literal, parameter and per-example predicates), custom_vjp;
- with some probability, ops that mix the batch: batch means, arrays built from N,
  position tables over the batch (parameter and constant), a squeeze that drops the
  batch axis at N = 1, cumsum / rev over the batch, a Gram matrix, a cond on the batch.

x1 and x2 have independent N (0 and 1 included), and may differ in the length of one
per-example axis (a token sequence) where the program allows it: every per-example axis
carries a pair of sizes (x1's, x2's), and ops that need one size (a weight over that
axis) are drawn only where the two agree. Sizes come from small finite sets, so the
number of distinct compiled shapes stays bounded.

`check(program)` runs every method (and `explain()`) and compares each kernel with the
oracle; where the arguments are invalid (layouts that x1 and x2 cannot share) it
requires a clear library error instead: a ValueError / TypeError / NotImplementedError
raised by ntk_compiler's own code with a message. A crash inside JAX is a failure.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from jax import lax

import ntk_compiler as nc
import oracle

METHODS = ("structured", "jacobian", "ntk_vp", "auto")
# (rtol, atol) by the lowest precision a program computes in: |K - oracle| <= rtol *
# max|oracle| + atol. atol (~1000 eps) only matters where the oracle is ~0 by
# cancellation (a batch mean at N = 1), where rounding leaves ~eps-sized entries.
TOLERANCE = {"float64": (1e-10, 1e-13), "float32": (1e-5, 1e-4), "float16": (1e-2, 1e-2)}
MAX_SIZE = 6    # every per-example axis
MAX_ELEMS = 24  # per example
Pair = tuple[int, int]  # an axis's size for x1 and for x2


@jax.custom_vjp
def half_grad(h):
  """The identity, whose custom backward pass halves the cotangent."""
  return h


half_grad.defvjp(lambda h: (h, None), lambda _, g: (0.5 * g,))


@dataclasses.dataclass
class Program:
  """A drawn program: f, its parameters and inputs (from `seed`), and how to call it.

  `lines` is pseudo-code of f, printed when a check fails."""
  f: Callable[[Any, Any], Any]
  params: dict[str, tuple[tuple[int, ...], Any]]   # name -> (shape, dtype)
  inputs1: dict[str, tuple[tuple[int, ...], Any]]  # "x" / "ids" -> (shape, dtype)
  inputs2: dict[str, tuple[tuple[int, ...], Any]] | None  # None: x2 omitted
  lines: list[str]
  flags: frozenset
  trace_axes: Any
  diagonal_axes: Any
  batch_independent: bool | None
  seed: int

  def arguments(self):
    """(params, x1, x2) drawn from the seed; x2 is None for a symmetric call."""
    rng = np.random.default_rng(self.seed)
    params = {}
    for name, (shape, dtype) in self.params.items():
      scale = 1 / math.sqrt(max(shape[0], 1)) if len(shape) > 1 else 0.5
      params[name] = jnp.asarray(scale * rng.normal(size=shape), dtype)
    return params, _inputs(rng, self.inputs1), (
        None if self.inputs2 is None else _inputs(rng, self.inputs2))

  def _repr_pretty_(self, printer, cycle):  # how hypothesis prints a failing example
    printer.text(repr(self))

  def __repr__(self):
    def spec(inputs):
      return ", ".join(f"{k}: {s} {np.dtype(d).name}" for k, (s, d) in inputs.items())
    params = ", ".join(f"{k}: {s}" + ("" if d == jnp.float64 else f" {np.dtype(d).name}")
                       for k, (s, d) in self.params.items())
    return "\n".join(
        ["Program(", f"  x1: {spec(self.inputs1)}",
         "  x2: " + ("None" if self.inputs2 is None else spec(self.inputs2)),
         f"  params: {params}"] + [f"  {line}" for line in self.lines]
        + [f"  trace_axes={self.trace_axes!r}, diagonal_axes={self.diagonal_axes!r}, "
           f"batch_independent={self.batch_independent}, seed={self.seed}, "
           f"flags={sorted(self.flags)})"])

  @property
  def tolerance(self) -> tuple[float, float]:
    return TOLERANCE["float16" if "f16" in self.flags else
                "float32" if "f32" in self.flags else "float64"]


def _inputs(rng, spec):
  out = {}
  for name, (shape, dtype) in spec.items():
    if name == "ids":
      vocab = VOCAB
      out[name] = jnp.asarray(rng.integers(-vocab, vocab, size=shape), dtype)
    else:
      out[name] = jnp.asarray(rng.normal(size=shape), dtype)
  return out["x"] if list(out) == ["x"] else out


VOCAB = 4


class _Builder:
  """Draws ops on h: `feat` holds each per-example axis's sizes (x1's, x2's)."""

  def __init__(self, draw, n: Pair, mixing: bool):
    self.draw = draw
    self.n = n
    self.mixing = mixing
    self.feat: list[Pair] = []
    self.params: dict[str, tuple[tuple[int, ...], Any]] = {}
    self.steps: list[Callable] = []
    self.lines: list[str] = []
    self.flags: set[str] = set()

  def pick(self, options):
    return self.draw(st.sampled_from(list(options)))

  def known(self, i: int) -> bool:
    return self.feat[i][0] == self.feat[i][1]

  def size(self, i: int) -> int:
    assert self.known(i)
    return self.feat[i][0]

  def fits(self, feat) -> bool:
    big = [max(p) for p in feat]
    return 1 <= len(feat) <= 3 and max(big) <= MAX_SIZE and math.prod(big) <= MAX_ELEMS

  def emit(self, line: str, fn: Callable, feat=None) -> None:
    self.lines.append(line)
    self.steps.append(fn)
    if feat is not None:
      self.feat = [tuple(p) for p in feat]

  def param(self, shape, dtype=jnp.float64) -> str:
    name = f"p{len(self.params)}"
    self.params[name] = (tuple(shape), dtype)
    return name

  def weight(self, shape) -> tuple[str, Callable]:
    """A new parameter of `shape`, or a view of an existing one (shared leaf)."""
    shape = tuple(shape)
    options = [("new", None)]
    for name, (s, dtype) in self.params.items():
      if dtype != jnp.float64:
        continue
      if s == shape:
        options += [(v, name) for v in ("same", "scaled", "negated", "cast32", "cast16")]
      if len(s) == 2 and s[::-1] == shape:
        options.append(("transposed", name))
      if s != shape and math.prod(s) == math.prod(shape):
        options.append(("reshaped", name))
      if len(s) == len(shape) and s != shape and all(a >= b for a, b in zip(s, shape)):
        options.append(("sliced", name))
    kind, name = self.pick(options)
    if kind == "new":
      dtype = self.pick([jnp.float64] * 7 + [jnp.float32])
      if dtype == jnp.float32:
        self.flags.add("f32")
      name = self.param(shape, dtype)
      return f"p[{name!r}]", lambda p: p[name]
    ref = f"p[{name!r}]"
    if kind == "cast32":
      self.flags.add("f32")
    if kind == "cast16":
      self.flags.add("f16")
    slices = tuple(slice(0, n) for n in shape)
    return {
        "same": (ref, lambda p: p[name]),
        "scaled": (f"1.5 * {ref}", lambda p: 1.5 * p[name]),
        "negated": (f"-{ref}", lambda p: -p[name]),
        "cast32": (f"{ref}.astype(float32)", lambda p: p[name].astype(jnp.float32)),
        "cast16": (f"{ref}.astype(float16)", lambda p: p[name].astype(jnp.float16)),
        "transposed": (f"{ref}.T", lambda p: p[name].T),
        "reshaped": (f"{ref}.reshape{shape}", lambda p: p[name].reshape(shape)),
        "sliced": (f"{ref}[{', '.join(f':{n}' for n in shape)}]",
                   lambda p: p[name][slices]),
    }[kind]

  def axis_index(self, i: int) -> tuple:
    """h[idx] with `idx` selecting axis i of feat: (slice(None),) * (i + 1)."""
    return (slice(None),) * (i + 1)


# ----------------------------------------------------------------------------- inputs

def _input_stage(draw, b: _Builder, symmetric: bool):
  """Draws the inputs, emits h = (a function of them); returns x1's and x2's specs."""
  kind = b.pick(["vector", "sequence", "tokens", "tokens_x", "image"])
  vary = not symmetric and kind != "vector" and kind != "image" and b.pick([False, True])
  t1 = b.pick([2, 3, 1, 0])
  t2 = b.pick([t for t in (1, 3, 2, 0) if t != t1]) if vary else t1
  f = b.pick([3, 2, 1, 4])
  id_dtypes = b.pick([(jnp.int32, jnp.int32), (jnp.int64, jnp.int32),
                      (jnp.int32, jnp.int64)])
  if kind == "vector":
    specs = [{"x": ((n, f), jnp.float64)} for n in b.n]
    b.emit("h = x", lambda p, h, ins: ins["x"], [(f, f)])
  elif kind == "image":
    hh, ww, c = b.pick([2, 3]), b.pick([3, 2]), b.pick([1, 2])
    specs = [{"x": ((n, hh, ww, c), jnp.float64)} for n in b.n]
    b.emit("h = x", lambda p, h, ins: ins["x"], [(hh, hh), (ww, ww), (c, c)])
  elif kind == "sequence":
    specs = [{"x": ((n, t, f), jnp.float64)} for n, t in zip(b.n, (t1, t2))]
    b.emit("h = x", lambda p, h, ins: ins["x"], [(t1, t2), (f, f)])
  else:
    text, table = b.weight((VOCAB, f))
    mode = b.pick(["index", "take_clip", "take_fill"])
    look = {"index": lambda e, i: e[i],
            "take_clip": lambda e, i: jnp.take(e, i, axis=0, mode="clip"),
            "take_fill": lambda e, i: jnp.take(e, i, axis=0, mode="fill",
                                               fill_value=0)}[mode]
    specs = [{"ids": ((n, t), d)} for n, t, d in zip(b.n, (t1, t2), id_dtypes)]
    if kind == "tokens":
      b.emit(f"h = lookup[{mode}]({text}, ids)",
             lambda p, h, ins: look(table(p), ins["ids"]), [(t1, t2), (f, f)])
    else:
      for spec, n, t in zip(specs, b.n, (t1, t2)):
        spec["x"] = ((n, t, f), jnp.float64)
      b.emit(f"h = x + lookup[{mode}]({text}, ids)",
             lambda p, h, ins: ins["x"] + look(table(p), ins["ids"]),
             [(t1, t2), (f, f)])
  return specs[0], None if symmetric else specs[1]


def _example_index(ins, k: int):
  """A per-example integer in [0, k), from the inputs (no derivative flows)."""
  if "ids" in ins:
    return (ins["ids"].sum(axis=1) % k).astype(jnp.int32)
  x = ins["x"]
  return ((x > 0).sum(axis=tuple(range(1, x.ndim))) % k).astype(jnp.int32)


# -------------------------------------------------------------------------------- ops

OUTS = [2, 3, 1, 4, 2, 3, 0]


def _dense(b: _Builder):
  f, out = b.size(-1), b.pick(OUTS)
  text, w = b.weight((f, out))
  form = b.pick(["matmul", "lhs"])
  fn = ((lambda p, h, ins: h @ w(p)) if form == "matmul" else
        (lambda p, h, ins: jnp.einsum("fo,...f->...o", w(p), h)))
  b.emit(f"h = h @ {text}" + ("" if form == "matmul" else "  # weight as lhs"), fn,
         b.feat[:-1] + [(out, out)])


def _dense_axis(b: _Builder):
  i = b.pick([i for i in range(len(b.feat) - 1) if b.known(i)])
  out = b.pick(OUTS)
  text, w = b.weight((b.size(i), out))
  fn = lambda p, h, ins: jnp.moveaxis(jnp.tensordot(h, w(p), axes=[[i + 1], [0]]), -1,
                                      i + 1)
  b.emit(f"h = contract axis {i + 1} of h with {text}", fn,
         b.feat[:i] + [(out, out)] + b.feat[i + 1:])


def _batched_dense(b: _Builder):
  a, f, out = b.size(-2), b.size(-1), b.pick(OUTS)
  text, w = b.weight((a, f, out))
  b.emit(f"h = einsum('...af,afo->...ao', h, {text})",
         lambda p, h, ins: jnp.einsum("...af,afo->...ao", h, w(p)),
         b.feat[:-1] + [(out, out)])


def _bias(b: _Builder):
  full = all(b.known(i) for i in range(len(b.feat))) and b.pick([False, True])
  shape = tuple(p[0] for p in b.feat) if full else (b.size(-1),)
  text, w = b.weight(shape)
  b.emit(f"h = h + {text}", lambda p, h, ins: h + w(p))


def _scale(b: _Builder):
  f = b.size(-1)
  shape = b.pick([(f,), (1, f)] if len(b.feat) >= 2 else [(f,)])
  text, w = b.weight(shape)
  b.emit(f"h = h * {text}", lambda p, h, ins: h * w(p))


def _product(b: _Builder):
  f, out = b.size(-1), b.pick(OUTS)
  t1, w1 = b.weight((f, out))
  t2, w2 = b.weight((f, out))
  act = b.pick(["linear", "tanh"])
  g = jnp.tanh if act == "tanh" else (lambda v: v)
  b.emit(f"h = {act}(h @ {t1}) * (h @ {t2})",
         lambda p, h, ins: g(h @ w1(p)) * (h @ w2(p)), b.feat[:-1] + [(out, out)])


ACTIVATIONS = {
    "tanh": jnp.tanh, "relu": jax.nn.relu, "sin": jnp.sin, "sigmoid": jax.nn.sigmoid,
    "gelu": jax.nn.gelu, "softplus": jax.nn.softplus, "square": lambda h: h ** 2,
    "sqrt1p": lambda h: jnp.sqrt(1 + h * h), "gauss": lambda h: jnp.exp(-h * h),
    "abs": jnp.abs, "max0": lambda h: jnp.maximum(h, 0.25 * h),
}


def _act(b: _Builder):
  name = b.pick(list(ACTIVATIONS))
  act = ACTIVATIONS[name]
  b.emit(f"h = {name}(h)", lambda p, h, ins: act(h))


def _div(b: _Builder):
  form = b.pick(["const", "param", "both"])
  if form == "const":
    b.emit("h = h / 2.5", lambda p, h, ins: h / 2.5)
    return
  text, w = b.weight((b.size(-1),))
  if form == "param":
    b.emit(f"h = h / (1 + {text}**2)", lambda p, h, ins: h / (1 + w(p) ** 2))
  else:
    b.emit(f"h = (h * {text}) / (1 + h**2)",
           lambda p, h, ins: (h * w(p)) / (1 + h ** 2))


def _sub(b: _Builder):
  if b.pick(["neg", "sub"]) == "neg" or not b.known(len(b.feat) - 1):
    b.emit("h = -h", lambda p, h, ins: -h)
    return
  f = b.size(-1)
  text, w = b.weight((f, f))
  b.emit(f"h = h - 0.5 * (h @ {text})", lambda p, h, ins: h - 0.5 * (h @ w(p)))


def _where(b: _Builder):
  f = b.size(-1)
  mask = np.arange(f) % 2 == 0
  b.emit(f"h = where({mask.tolist()}, h, -0.5 * h)",
         lambda p, h, ins: jnp.where(mask, h, -0.5 * h))


def _cast(b: _Builder):
  kind = b.pick(["f32_back", "f32", "f16_back"])
  b.flags.add("f16" if kind == "f16_back" else "f32")
  fn = {"f32_back": lambda h: h.astype(jnp.float32).astype(jnp.float64),
        "f32": lambda h: h.astype(jnp.float32),
        "f16_back": lambda h: h.astype(jnp.float16).astype(jnp.float64)}[kind]
  b.emit(f"h = cast[{kind}](h)", lambda p, h, ins: fn(h))


def _transpose(b: _Builder):
  perm = b.draw(st.permutations(range(len(b.feat))))
  full = (0,) + tuple(a + 1 for a in perm)
  b.emit(f"h = h.transpose{full}", lambda p, h, ins: h.transpose(full),
         [b.feat[a] for a in perm])


def _merge(b: _Builder):
  a, c = b.feat[-2], b.feat[-1]
  b.emit("h = h.reshape(h.shape[:-2] + (-1,))",
         lambda p, h, ins: h.reshape(h.shape[:-2] + (h.shape[-2] * h.shape[-1],)),
         b.feat[:-2] + [(a[0] * c[0], a[1] * c[1])])


def _split_axis(b: _Builder):
  f = b.size(-1)
  a = next(d for d in (2, 3) if f % d == 0)
  b.emit(f"h = h.reshape(h.shape[:-1] + ({a}, {f // a}))",
         lambda p, h, ins: h.reshape(h.shape[:-1] + (a, f // a)),
         b.feat[:-1] + [(a, a), (f // a, f // a)])


def _expand(b: _Builder):
  k = b.pick([2, 3, 1])
  if b.pick(["param", "broadcast"]) == "param":
    text, w = b.weight((k,))
    b.emit(f"h = h[..., None] * {text}", lambda p, h, ins: h[..., None] * w(p),
           b.feat + [(k, k)])
  else:
    b.emit(f"h = broadcast_to(h[..., None], h.shape + ({k},))",
           lambda p, h, ins: jnp.broadcast_to(h[..., None], h.shape + (k,)),
           b.feat + [(k, k)])


def _concat(b: _Builder):
  f = b.size(-1)
  kind = b.pick((["prefix"] if f else []) + ["dense", "param"])
  k = b.pick([1, 2]) if kind != "prefix" else b.pick(range(1, f + 1))
  if kind == "prefix":
    text, g = f"h[..., :{k}]", lambda p, h: h[..., :k]
  elif kind == "dense":
    wt, w = b.weight((f, k))
    text, g = f"h @ {wt}", lambda p, h: h @ w(p)
  else:
    wt, w = b.weight((k,))
    text, g = f"broadcast({wt})", lambda p, h: jnp.broadcast_to(w(p), h.shape[:-1] + (k,))
  b.emit(f"h = concatenate([h, {text}], -1)",
         lambda p, h, ins: jnp.concatenate([h, g(p, h)], axis=-1),
         b.feat[:-1] + [(f + k, f + k)])


PADS = [(1, 0, 0), (0, 2, 0), (1, 1, 1), (0, 0, 1), (-1, 1, 0), (2, -1, 0)]


def _pad_size(n, lo, hi, interior):
  return n + lo + hi + max(n - 1, 0) * interior


def _pad(b: _Builder):
  i = b.pick(range(len(b.feat)))
  lo, hi, interior = b.pick([c for c in PADS if min(c) >= 0 or min(b.feat[i]) >= 2])
  new = tuple(_pad_size(n, lo, hi, interior) for n in b.feat[i])
  config = [(0, 0, 0)] * (len(b.feat) + 1)
  config[i + 1] = (lo, hi, interior)
  b.emit(f"h = pad(h, axis {i + 1}, {(lo, hi, interior)})",
         lambda p, h, ins: lax.pad(h, jnp.zeros((), h.dtype), config),
         b.feat[:i] + [new] + b.feat[i + 1:])


def _slice(b: _Builder):
  i = b.pick(range(len(b.feat)))
  start, stride = b.pick([0, 1, 2]), b.pick([1, 2])
  idx = b.axis_index(i) + (slice(start, None, stride),)
  new = tuple(len(range(start, n, stride)) for n in b.feat[i])
  b.emit(f"h = h[{', '.join([':'] * (i + 1))}, {start}::{stride}]",
         lambda p, h, ins: h[idx], b.feat[:i] + [new] + b.feat[i + 1:])


def _rotate(b: _Builder):
  i = b.pick([i for i in range(len(b.feat)) if b.known(i) and b.size(i) >= 2])
  k = b.pick(range(1, b.size(i)))

  def fn(p, h, ins):
    first, second = jnp.split(h, [k], axis=i + 1)
    return jnp.concatenate([second, first], axis=i + 1)
  b.emit(f"h = rotate axis {i + 1} by split at {k} and concatenate", fn)


def _rev(b: _Builder):
  i = b.pick(range(len(b.feat)))
  b.emit(f"h = rev(h, axis {i + 1})", lambda p, h, ins: jnp.flip(h, axis=i + 1))


def _cumsum(b: _Builder):
  i, reverse = b.pick(range(len(b.feat))), b.pick([False, True])
  b.emit(f"h = cumsum(h, axis {i + 1}, reverse={reverse})",
         lambda p, h, ins: lax.cumsum(h, axis=i + 1, reverse=reverse))


def _reduce(b: _Builder):
  i = b.pick(range(len(b.feat)))
  kinds = ["sum"] + (["mean", "max"] if min(b.feat[i]) >= 1 else [])
  kind = b.pick(kinds)
  fn = {"sum": jnp.sum, "mean": jnp.mean, "max": jnp.max}[kind]
  b.emit(f"h = h.{kind}(axis {i + 1})", lambda p, h, ins: fn(h, axis=i + 1),
         b.feat[:i] + b.feat[i + 1:])


def _sum_broadcast(b: _Builder):
  i = b.pick(range(len(b.feat)))
  b.emit(f"h = 0.5 * h + h.sum(axis {i + 1}, keepdims=True)",
         lambda p, h, ins: 0.5 * h + h.sum(axis=i + 1, keepdims=True))


def _promoted(*arrays):
  """lax.conv_general_dilated wants operands of one dtype (jnp ops promote)."""
  dtype = jnp.result_type(*arrays)
  return tuple(a.astype(dtype) for a in arrays)


def _conv_size(n, k, stride, dilation, padding):
  span = (k - 1) * dilation + 1
  if padding == "SAME":
    return -(-n // stride)
  return (n - span) // stride + 1


def _conv1d(b: _Builder):
  c, spatial = b.size(-1), b.feat[-2]
  k, stride, dilation = b.pick([2, 1, 3]), b.pick([1, 2]), b.pick([1, 2])
  padding = b.pick(["SAME", "VALID"] if min(spatial) >= (k - 1) * dilation + 1
                   else ["SAME"])
  groups = b.pick([1, c] if c > 1 else [1])
  cout = groups * b.pick([1, 2])
  text, w = b.weight((k, c // groups, cout))
  new = tuple(_conv_size(n, k, stride, dilation, padding) for n in spatial)

  def fn(p, h, ins):
    lead = h.shape[:-2]
    h, kernel = _promoted(h, w(p))
    y = lax.conv_general_dilated(
        h.reshape((math.prod(lead),) + h.shape[-2:]), kernel, (stride,), padding,
        rhs_dilation=(dilation,), feature_group_count=groups,
        dimension_numbers=("NWC", "WIO", "NWC"))
    return y.reshape(lead + y.shape[1:])
  b.emit(f"h = conv1d(h, {text}, stride={stride}, {padding}, dilation={dilation}, "
         f"groups={groups})", fn, b.feat[:-2] + [new, (cout, cout)])


def _conv2d(b: _Builder):
  (hh, _), (ww, _), (c, _) = b.feat
  k, padding = b.pick([2, 1]), b.pick(["SAME", "VALID"])
  cout = b.pick([2, 1, 3])
  text, w = b.weight((k, k, c, cout))
  new = [(_conv_size(n, k, 1, 1, padding),) * 2 for n in (hh, ww)]
  b.emit(f"h = conv2d(h, {text}, {padding})",
         lambda p, h, ins: lax.conv_general_dilated(
             *_promoted(h, w(p)), (1, 1), padding,
             dimension_numbers=("NHWC", "HWIO", "NHWC")),
         new + [(cout, cout)])


def _window_sum(b: _Builder):
  i = b.pick(range(len(b.feat)))
  padding = b.pick(["SAME", "VALID"] if min(b.feat[i]) >= 2 else ["SAME"])
  dims = [1] * (len(b.feat) + 1)
  dims[i + 1] = 2
  new = tuple(n if padding == "SAME" else n - 1 for n in b.feat[i])
  b.emit(f"h = window_sum(h, axis {i + 1}, window 2, {padding})",
         lambda p, h, ins: lax.reduce_window(h, 0.0, lax.add, dims, (1,) * len(dims),
                                             padding),
         b.feat[:i] + [new] + b.feat[i + 1:])


def _gather_const(b: _Builder):
  f = b.size(-1)
  k = b.pick([2, 1, 3])
  ids = np.asarray(b.draw(st.lists(st.integers(-f, f - 1), min_size=k, max_size=k)))
  b.emit(f"h = h[..., {ids.tolist()}]", lambda p, h, ins: h[..., ids],
         b.feat[:-1] + [(k, k)])


def _take_weight(b: _Builder):
  f, out, rows = b.size(-1), b.pick(OUTS), b.pick([3, 5])
  mode = b.pick(["clip", "fill"])
  ids = np.asarray(b.draw(st.lists(st.integers(0, rows), min_size=f, max_size=f)))
  text, w = b.weight((rows, out))
  b.emit(f"h = h @ take({text}, {ids.tolist()}, axis=0, mode={mode})",
         lambda p, h, ins: h @ jnp.take(w(p), ids, axis=0, mode=mode,
                                        **({"fill_value": 0} if mode == "fill" else {})),
         b.feat[:-1] + [(out, out)])


def _dynamic_weight(b: _Builder):
  f, out, k = b.size(-1), b.pick(OUTS), b.pick([2, 3])
  kind = b.pick(["per_example", "constant"])
  if kind == "constant":
    text, w = b.weight((f + 1, out))
    b.emit(f"h = h @ dynamic_slice({text}, start 1, size {f}, axis 0)",
           lambda p, h, ins: h @ lax.dynamic_slice_in_dim(w(p), 1, f, 0),
           b.feat[:-1] + [(out, out)])
    return
  text, w = b.weight((k, f, out))

  def fn(p, h, ins):
    index = _example_index(ins, k)
    return jax.vmap(lambda hn, i: hn @ lax.dynamic_index_in_dim(w(p), i, 0, False))(
        h, index)
  b.emit(f"h[n] = h[n] @ {text}[index(x[n])]  # per-example dynamic_slice", fn,
         b.feat[:-1] + [(out, out)])


def _scan_rnn(b: _Builder):
  f, hidden = b.size(-1), b.pick([2, 3])
  tw, w = b.weight((f, hidden))
  tu, u = b.weight((hidden, hidden))
  reverse = b.pick([False, True])

  def fn(p, h, ins):
    def step(c, xt):  # (the carry keeps its dtype: float32 weights may promote)
      c = jnp.tanh(xt @ w(p) + c @ u(p)).astype(c.dtype)
      return c, c
    init = jnp.zeros((h.shape[0], hidden), jnp.result_type(h, w(p), u(p)))
    _, ys = lax.scan(step, init, jnp.moveaxis(h, 1, 0), reverse=reverse)
    return jnp.moveaxis(ys, 0, 1)
  b.emit(f"h = scan over axis 1 (reverse={reverse}): c = tanh(h_t @ {tw} + c @ {tu})",
         fn, [b.feat[0], (hidden, hidden)])


def _scan_layers(b: _Builder):
  f, depth = b.size(-1), b.pick([2, 1, 3])
  tw, w = b.weight((depth, f, f))
  tb, bias = b.weight((depth, f))

  def fn(p, h, ins):
    def layer(h, wb):
      return jnp.tanh(h @ wb[0] + wb[1]).astype(h.dtype), None
    return lax.scan(layer, h, (w(p), bias(p)))[0]
  b.emit(f"h = scan over layers: h = tanh(h @ {tw}[l] + {tb}[l])", fn)


def _fori(b: _Builder):
  f = b.size(-1)
  text, w = b.weight((f, f))
  b.emit(f"h = fori_loop(0, 2, h = tanh(h @ {text}) + 0.5 * h)",
         lambda p, h, ins: lax.fori_loop(
             0, 2, lambda i, h: (jnp.tanh(h @ w(p)) + 0.5 * h).astype(h.dtype), h))


def _cond(b: _Builder):
  f, out = b.size(-1), b.pick(OUTS)
  t1, w1 = b.weight((f, out))
  t2, w2 = b.weight((f, out))
  kinds = ["literal", "param", "example"] + (["batch"] if b.mixing else [])
  kind, literal = b.pick(kinds), b.pick([True, False])
  dtype = lambda p, h: jnp.result_type(h, w1(p), w2(p))  # branches agree on it
  first = lambda p, h: jnp.tanh(h @ w1(p)).astype(dtype(p, h))
  second = lambda p, h: ((h @ w2(p)) * 2).astype(dtype(p, h))
  line = f"cond[{kind}](tanh(h @ {t1}), (h @ {t2}) * 2)"
  if kind == "example":
    def fn(p, h, ins):
      pred = _example_index(ins, 2)
      return jax.vmap(lambda i, hn: lax.cond(i > 0, lambda v: first(p, v),
                                             lambda v: second(p, v), hn))(pred, h)
  else:
    if kind == "batch":
      b.flags.add("mixes")
    pred = {"literal": lambda p, h: literal,
            "param": lambda p, h: w1(p).sum() > 0,
            "batch": lambda p, h: h.sum() > 0}[kind]
    fn = lambda p, h, ins: lax.cond(pred(p, h), lambda v: first(p, v),
                                    lambda v: second(p, v), h)
  b.emit(f"h = {line}", fn, b.feat[:-1] + [(out, out)])


def _switch(b: _Builder):
  f, out = b.size(-1), b.pick(OUTS)
  t1, w1 = b.weight((f, out))
  t2, w2 = b.weight((f, out))
  branches = [lambda p, v: jnp.tanh(v @ w1(p)), lambda p, v: jnp.sin(v @ w2(p)) * 2,
              lambda p, v: v @ w1(p) + v @ w2(p)]

  def fn(p, h, ins):
    index = _example_index(ins, 3)
    dtype = jnp.result_type(h, w1(p), w2(p))  # branches agree on it
    return jax.vmap(lambda i, hn: lax.switch(
        i, [lambda v, g=g: g(p, v).astype(dtype) for g in branches], hn))(index, h)
  b.emit(f"h[n] = switch(index(x[n]), tanh(h @ {t1}), 2 sin(h @ {t2}), "
         f"h @ {t1} + h @ {t2})", fn, b.feat[:-1] + [(out, out)])


def _custom_vjp(b: _Builder):
  b.flags.add("custom_vjp")
  b.emit("h = half_grad(h)  # custom_vjp", lambda p, h, ins: half_grad(h))


def _pos_tokens(b: _Builder):
  rows = max(b.feat[0])
  text, w = b.weight((rows,) + tuple(p[0] for p in b.feat[1:]))
  b.emit(f"h = h + {text}[:h.shape[1]]  # position table over axis 1",
         lambda p, h, ins: h + w(p)[:h.shape[1]])


# Ops that mix the batch.

def _batch_mean(b: _Builder):
  # Not h - h.mean(0): equal examples (repeated token ids) would cancel to ±eps, where
  # a later max / relu has a kink and the derivative is not defined.
  b.emit("h = h - 0.5 * h.mean(0)", lambda p, h, ins: h - 0.5 * h.mean(axis=0))


def _batch_size_array(b: _Builder):
  if b.pick(["array", "ones"]) == "array":
    b.emit("h = h / jnp.array([N])",
           lambda p, h, ins: h / jnp.array([h.shape[0]], h.dtype))
  else:
    b.emit("h = h * (np.ones((1, F)) / N)",
           lambda p, h, ins: h * (np.ones((1, h.shape[-1])) / max(h.shape[0], 1)))


def _batch_table(b: _Builder):
  rows = max(b.n) + b.pick([0, 1])
  if b.pick(["param", "const"]) == "param":
    text, w = b.weight((rows,) + tuple(p[0] for p in b.feat))
    b.emit(f"h = h * {text}[:N]  # a per-position table over the batch",
           lambda p, h, ins: h * w(p)[:h.shape[0]])
  else:
    table = np.linspace(0.5, 1.5, rows)
    b.emit(f"h = h * linspace(0.5, 1.5, {rows})[:N, None]",
           lambda p, h, ins: h * table[:h.shape[0]].reshape(
               (h.shape[0],) + (1,) * (h.ndim - 1)))


def _squeeze(b: _Builder):
  b.emit("h = squeeze(h[..., :1])[..., None]  # drops the batch axis at N = 1",
         lambda p, h, ins: jnp.squeeze(h[..., :1])[..., None], [(1, 1)])
  b.flags.add("squeeze")


def _batch_scan(b: _Builder):
  if b.pick(["cumsum", "rev"]) == "cumsum":
    b.emit("h = cumsum(h, axis 0)", lambda p, h, ins: jnp.cumsum(h, axis=0))
  else:
    b.emit("h = h[::-1]", lambda p, h, ins: h[::-1])


def _gram(b: _Builder):
  b.emit("h = h + 0.1 * (h @ h.T) @ h", lambda p, h, ins: h + 0.1 * (h @ h.T) @ h)


def _known_last(b):
  return b.known(len(b.feat) - 1)


def _rank(b):
  return len(b.feat)


OPS: dict[str, tuple[Callable[[_Builder], bool], Callable[[_Builder], None]]] = {
    "dense": (_known_last, _dense),
    "act": (lambda b: True, _act),
    "bias": (_known_last, _bias),
    "scale": (_known_last, _scale),
    "product": (_known_last, _product),
    "div": (_known_last, _div),
    "sub": (lambda b: True, _sub),
    "where": (_known_last, _where),
    "cast": (lambda b: True, _cast),
    "transpose": (lambda b: _rank(b) >= 2, _transpose),
    "merge": (lambda b: _rank(b) >= 2 and b.fits(
        b.feat[:-2] + [(b.feat[-2][0] * b.feat[-1][0], b.feat[-2][1] * b.feat[-1][1])]),
        _merge),
    "split_axis": (lambda b: _known_last(b) and b.size(-1) in (4, 6) and _rank(b) < 3,
                   _split_axis),
    "expand": (lambda b: _rank(b) < 3 and b.fits(b.feat + [(3, 3)]), _expand),
    "concat": (lambda b: _known_last(b) and b.size(-1) <= MAX_SIZE - 2 and b.fits(
        b.feat[:-1] + [(b.size(-1) + 2,) * 2]), _concat),
    "pad": (lambda b: all(max(p) <= 2 for p in b.feat) and b.fits(
        [(p[0] * 2 + 2, p[1] * 2 + 2) for p in b.feat]), _pad),
    "slice": (lambda b: True, _slice),
    "rotate": (lambda b: any(b.known(i) and b.size(i) >= 2 for i in range(_rank(b))),
               _rotate),
    "rev": (lambda b: True, _rev),
    "cumsum": (lambda b: True, _cumsum),
    "reduce": (lambda b: _rank(b) >= 2, _reduce),
    "sum_broadcast": (lambda b: True, _sum_broadcast),
    "dense_axis": (lambda b: any(b.known(i) for i in range(_rank(b) - 1)), _dense_axis),
    "batched_dense": (lambda b: _rank(b) >= 2 and _known_last(b) and b.known(_rank(b) - 2),
                      _batched_dense),
    "conv1d": (lambda b: _rank(b) >= 2 and _known_last(b) and b.size(-1) >= 1,
               _conv1d),
    "conv2d": (lambda b: _rank(b) == 3 and all(b.known(i) for i in range(3))
               and min(b.size(i) for i in range(3)) >= 1, _conv2d),
    "window_sum": (lambda b: True, _window_sum),
    "gather_const": (lambda b: _known_last(b) and b.size(-1) >= 1, _gather_const),
    "take_weight": (_known_last, _take_weight),
    "dynamic_weight": (_known_last, _dynamic_weight),
    "scan_rnn": (lambda b: _rank(b) == 2 and _known_last(b), _scan_rnn),
    "scan_layers": (_known_last, _scan_layers),
    "fori": (_known_last, _fori),
    "cond": (_known_last, _cond),
    "switch": (_known_last, _switch),
    "custom_vjp": (lambda b: True, _custom_vjp),
    "pos_tokens": (lambda b: _rank(b) >= 2 and all(b.known(i) for i in range(1, _rank(b))),
                   _pos_tokens),
}

MIXING_OPS = {
    "batch_mean": (lambda b: True, _batch_mean),
    "batch_size_array": (lambda b: True, _batch_size_array),
    "batch_table": (lambda b: all(b.known(i) for i in range(_rank(b))), _batch_table),
    "squeeze": (lambda b: _rank(b) == 1 and 1 not in b.n and b.feat[0][0] >= 1,
                _squeeze),
    "batch_scan": (lambda b: True, _batch_scan),
    "gram": (lambda b: _rank(b) == 1, _gram),
}


def _op(draw, b: _Builder) -> None:
  table = dict(OPS)
  if b.mixing:
    table.update(MIXING_OPS)
  names = [name for name, (ok, _) in table.items() if ok(b)]
  name = b.pick(names)
  if name in MIXING_OPS and name != "squeeze":
    b.flags.add("mixes")
  table[name][1](b)


# ------------------------------------------------------------------------------- head

def _head(b: _Builder) -> int:
  """Emits the output; returns the highest output rank."""
  while len(b.feat) > 2:
    i = b.pick(range(len(b.feat)))
    b.emit(f"h = h.sum(axis {i + 1})", lambda p, h, ins, i=i: h.sum(axis=i + 1),
           b.feat[:i] + b.feat[i + 1:])
  kinds = ["dense", "pool", "multi", "scalar"] if _known_last(b) else ["pool", "scalar"]
  kind = b.pick(kinds)
  out = b.pick([2, 3, 1])
  tail = b.pick(["float64"] * 5 + ["float32"])
  cast = (lambda y: y.astype(jnp.float32)) if tail == "float32" else (lambda y: y)
  if tail == "float32":
    b.flags.add("f32")
  pool_axes = lambda h: tuple(range(1, h.ndim))
  dense_text, pool_text = "", ""
  if kind in ("dense", "multi"):
    dense_text, w = b.weight((b.size(-1), out))
  if kind in ("pool", "multi"):
    pool_text, v = b.weight((out,))
  if kind == "dense":
    line, fn, rank = f"return h @ {dense_text}", lambda p, h: h @ w(p), len(b.feat) + 1
  elif kind == "pool":
    line, fn, rank = (f"return h.sum(per-example axes)[:, None] * {pool_text}",
                      lambda p, h: h.sum(axis=pool_axes(h))[:, None] * v(p), 2)
  elif kind == "scalar":
    line, fn, rank = ("return h.sum(per-example axes)  # (N,)",
                      lambda p, h: h.sum(axis=pool_axes(h)), 1)
  else:
    line = f"return {{'a': h @ {dense_text}, 'b': [h.sum(...)[:, None] * {pool_text}]}}"
    fn = lambda p, h: {"a": h @ w(p), "b": [h.sum(axis=pool_axes(h))[:, None] * v(p)]}
    rank = len(b.feat) + 1
  b.emit(line + ("" if tail == "float64" else "  # cast to float32"),
         lambda p, h, ins: jax.tree_util.tree_map(cast, fn(p, h)))
  return rank


def _layout(draw, rank: int):
  """trace_axes and diagonal_axes: the default, or a random choice for each axis."""
  if draw(st.sampled_from([False, True, True])):
    roles = [draw(st.sampled_from(["pair", "trace", "diag", "pair"])) for _ in range(rank)]
    signs = [draw(st.booleans()) for _ in range(rank)]
    name = lambda a: a - rank if signs[a] and a > 0 else a
    trace = tuple(name(a) for a, r in enumerate(roles) if r == "trace")
    diag = tuple(name(a) for a, r in enumerate(roles) if r == "diag")
    as_int = lambda t: t[0] if len(t) == 1 and draw(st.booleans()) else t
    return as_int(trace), as_int(diag)
  return (-1,), ()


@st.composite
def programs(draw, max_ops: int = 6, mixing: float = 0.25) -> Program:
  """A random program with its inputs, layout and batch_independent argument."""
  n1 = draw(st.sampled_from([2, 3, 1, 2, 3, 1, 0]))
  symmetric = draw(st.sampled_from([False, False, True]))
  n2 = n1 if symmetric else draw(st.sampled_from([3, 2, 1, 3, 2, 1, 0]))
  mixes = draw(st.floats(0, 1)) < mixing
  b = _Builder(draw, (n1, n2), mixes)
  inputs1, inputs2 = _input_stage(draw, b, symmetric)
  for _ in range(draw(st.integers(1, max_ops))):
    _op(draw, b)
  rank = _head(b)
  trace, diag = _layout(draw, rank)
  independent = draw(st.sampled_from([None] * 6 + [False, True]))
  if independent and ({"mixes", "squeeze"} & b.flags):
    independent = None
  steps = list(b.steps)

  def f(params, x):
    ins = x if isinstance(x, dict) else {"x": x}
    h = None
    for step in steps:
      h = step(params, h, ins)
    return h
  return Program(f, dict(b.params), inputs1, inputs2, list(b.lines), frozenset(b.flags),
                 trace, diag, independent, draw(st.integers(0, 2**16)))


# ------------------------------------------------------------------------------ check

@dataclasses.dataclass
class Expected:
  """What a call must give: `kernel` (oracle values), or an error (`error` says why)."""
  kernel: Any = None
  error: str | None = None
  either: bool = False  # an ambiguous request: a clear error or the kernel both pass
  nan_ok: bool = False  # a trace over a 0-sized axis: 0/0 entries may be NaN or 0


def _axes(a):
  return (a,) if isinstance(a, int) else tuple(a)


def _leaf_layout(trace, diag, shape1, shape2):
  """(error or None, ambiguous?, kernel shape, traced size 0?) for one output leaf."""
  ndim = len(shape1)
  if len(shape2) != ndim:
    return f"output ranks differ: {shape1} and {shape2}", False, None, False
  for a in trace + diag:
    if not -ndim <= a < ndim:
      return f"axis {a} out of range for rank {ndim}", False, None, False
  tr, dg = [a % ndim for a in trace], [a % ndim for a in diag]
  ambiguous = (len(set(tr)) < len(tr) or len(set(dg)) < len(dg) or bool(set(tr) & set(dg))
               or any(a < 0 and a % ndim == 0 for a in trace + diag))
  for a in set(tr) | set(dg):
    if shape1[a] != shape2[a]:
      return (f"axis {a} is traced or diagonal but has sizes {shape1[a]} and "
              f"{shape2[a]}", False, None, False)
  shape = []
  for a in range(ndim):
    if a in dg:
      shape.append(shape1[a])
    elif a not in tr:
      shape += [shape1[a], shape2[a]]
  return None, ambiguous, tuple(shape), math.prod(shape1[a] for a in set(tr)) == 0


def expected(f, params, x1, x2, trace_axes, diagonal_axes, jit=True) -> Expected:
  """The oracle's kernel, or why the arguments are invalid (jit=False: f run op by op)."""
  wrap = jax.jit if jit else (lambda g: g)
  out1 = jax.eval_shape(f, params, x1)
  out2 = out1 if x2 is None else jax.eval_shape(f, params, x2)
  leaves1, tree1 = jax.tree_util.tree_flatten(out1)
  leaves2, tree2 = jax.tree_util.tree_flatten(out2)
  if tree1 != tree2:
    return Expected(error=f"f returns different pytrees: {tree1}, {tree2}")
  trace, diag = _axes(trace_axes), _axes(diagonal_axes)
  kernels, either, nan_ok = [], False, False
  for l1, l2 in zip(leaves1, leaves2):
    error, ambiguous, shape, empty_trace = _leaf_layout(trace, diag, l1.shape, l2.shape)
    if error is not None:
      return Expected(error=error)
    # A traced axis of size 0 asks for means over no entries: NaN, 0 or an error.
    either |= ambiguous or empty_trace
    nan_ok |= empty_trace
    kernels.append(np.zeros(shape))
  # The oracle's Jacobians cannot be reshaped for a 0-sized output: those kernels are
  # zeros. jit only makes the oracle's reverse-mode Jacobians faster (one dispatch).
  nonempty = [k for k, (l1, l2) in enumerate(zip(leaves1, leaves2))
              if l1.size and l2.size]
  if not jax.tree_util.tree_leaves(params):  # nothing to differentiate: zeros
    return Expected(tree1.unflatten(kernels), either=either, nan_ok=nan_ok)
  if len(nonempty) == len(leaves1):
    kernels = jax.tree_util.tree_leaves(
        oracle.oracle_ntk(wrap(f), params, x1, x2, trace, diag))
  for k in nonempty if len(nonempty) < len(leaves1) else ():
    leaf = wrap(lambda p, x, k=k: jax.tree_util.tree_leaves(f(p, x))[k])
    kernels[k] = oracle.oracle_ntk(leaf, params, x1, x2, trace, diag)
  return Expected(tree1.unflatten(kernels), either=either, nan_ok=nan_ok)


def _upstream(f, params, x1, x2, trace_axes, diagonal_axes, method, batch_independent,
              kernel, want, tolerance, problem, log) -> str | None:
  """A kernel that disagrees with the oracle: None if that is JAX's doing and the
  library notices it, else the problem.

  On JAX 0.10.2 XLA differentiates some programs wrongly under jit (e.g. a batch mean, a
  matmul and a max reduction: jit(jacrev(f)) != jacrev(f) == jacfwd(f) op by op). Every
  method runs under jit, so no method can be exact there; what the library owes is to
  notice: validate=True must raise. Judged only where JAX's own jit(jacrev(f)) is wrong."""
  if not any(_misdifferentiated(f, params, x) for x in (x1, x2) if x is not None):
    return problem
  eager = expected(f, params, x1, x2, trace_axes, diagonal_axes, jit=False)
  if not eager.error and _compare(kernel, eager, tolerance) is None:
    return None  # right after all; the jit oracle was what JAX got wrong
  try:
    nc.compile_ntk(f, method=method, trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                   batch_independent=batch_independent, validate=True)(params, x1, x2)
  except nc.ValidationError:
    log["upstream"] = log.get("upstream", 0) + 1
    return None
  return f"{problem}; JAX differentiates f wrongly under jit, and validate=True missed it"


def _misdifferentiated(f, params, x) -> bool:
  """Whether jit(jacrev(f)) differs from jacrev(f) run op by op, beyond rounding."""
  eager, jitted = jax.jacrev(f)(params, x), jax.jit(jax.jacrev(f))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(a), initial=0.0), np.finfo(np.float64).tiny)
    if a.size and np.max(np.abs(a - b)) > 1e-6 * scale:
      return True
  return False


def _is_library_error(e: BaseException) -> bool:
  """A clear error raised by ntk_compiler itself (not a crash inside JAX)."""
  if not isinstance(e, (ValueError, TypeError, NotImplementedError)) or not str(e):
    return False
  frames = traceback.extract_tb(e.__traceback__)
  return bool(frames) and "/ntk_compiler/" in frames[-1].filename


def _describe(e: BaseException) -> str:
  frames = traceback.extract_tb(e.__traceback__)[-3:]
  where = " <- ".join(f"{fr.filename.split('/site-packages/')[-1]}:{fr.lineno}"
                      for fr in reversed(frames))
  return f"{type(e).__name__}: {str(e)[:300]} [at {where}]"


def _compare(kernel, want: Expected, tolerance: tuple[float, float]) -> str | None:
  rtol, atol = tolerance
  k_leaves, k_tree = jax.tree_util.tree_flatten(kernel)
  e_leaves, e_tree = jax.tree_util.tree_flatten(want.kernel)
  if k_tree != e_tree:
    return f"kernel pytree {k_tree}, expected {e_tree}"
  for k, e in zip(k_leaves, e_leaves):
    k = np.asarray(k, np.float64)
    if k.shape != e.shape:
      return f"kernel shape {k.shape}, expected {e.shape}"
    if want.nan_ok:
      k = np.nan_to_num(k, nan=0.0)
    if not np.all(np.isfinite(k)):
      return "kernel has non-finite entries"
    scale = max(np.max(np.abs(e)) if e.size else 0.0, np.finfo(np.float64).tiny)
    err = np.max(np.abs(k - e)) if e.size else 0.0
    if not err <= rtol * scale + atol:
      return (f"rel. error {err / scale:.3e} > {rtol:.0e} (max |oracle| {scale:.3e}, "
              f"max error {err:.3e})")
  return None


def check(program: Program, methods=METHODS, log: dict | None = None) -> list[str]:
  """Runs every method on a drawn program; returns the failures (empty: all good).

  `log`, if given, receives per method (and for the oracle) the seconds spent and the
  outcome ("kernel" or the error raised)."""
  params, x1, x2 = program.arguments()
  return check_call(program.f, params, x1, x2, trace_axes=program.trace_axes,
                    diagonal_axes=program.diagonal_axes,
                    batch_independent=program.batch_independent, tolerance=program.tolerance,
                    methods=methods, log=log)


def check_call(f, params, x1, x2=None, *, trace_axes=(-1,), diagonal_axes=(),
               batch_independent=None, tolerance=TOLERANCE["float64"],
               methods=METHODS, log: dict | None = None) -> list[str]:
  """Every method's `compile_ntk(f, ...)(params, x1, x2)` against the oracle.

  Returns the failures: a wrong kernel, a crash that is not a clear library error, a
  library error for valid arguments, a kernel for invalid arguments, kernels of
  different dtypes."""
  log = {} if log is None else log
  filtering = jax.config.jax_traceback_filtering
  jax.config.update("jax_traceback_filtering", "off")
  try:
    start = time.perf_counter()
    want = expected(f, params, x1, x2, trace_axes, diagonal_axes)
    log["oracle"] = (time.perf_counter() - start, want.error or "kernel")
    failures, dtypes = [], {}
    for method in methods:
      start = time.perf_counter()
      try:
        ntk_fn = nc.compile_ntk(f, method=method, trace_axes=trace_axes,
                                diagonal_axes=diagonal_axes,
                                batch_independent=batch_independent)
        kernel = jax.block_until_ready(ntk_fn(params, x1, x2))
        if method == "auto":
          str(ntk_fn.explain(params, x1, x2))
      except Exception as e:  # noqa: BLE001  (judged below)
        log[method] = (time.perf_counter() - start, _describe(e))
        if not _is_library_error(e):
          failures.append(f"{method}: crashed: {_describe(e)}")
        elif not (want.error or want.either):
          failures.append(f"{method}: refused valid arguments: {_describe(e)}")
        continue
      log[method] = (time.perf_counter() - start, "kernel")
      if want.error:
        failures.append(f"{method}: returned a kernel, but should raise: {want.error}")
        continue
      problem = _compare(kernel, want, tolerance)
      if problem:
        problem = _upstream(f, params, x1, x2, trace_axes, diagonal_axes, method,
                            batch_independent, kernel, want, tolerance, problem, log)
      if problem:
        failures.append(f"{method}: {problem}")
      dtypes[method] = {str(jnp.result_type(k)) for k in jax.tree_util.tree_leaves(kernel)}
    if len({frozenset(d) for d in dtypes.values()}) > 1:
      failures.append(f"kernel dtypes differ between methods: {dtypes}")
    return failures
  finally:
    jax.config.update("jax_traceback_filtering", filtering)

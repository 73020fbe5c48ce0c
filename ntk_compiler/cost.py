"""FLOPs of programs and of candidate NTK computations, from shapes alone."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from jax import lax

from ntk_compiler import compat


def _size(aval) -> int:
  return math.prod(getattr(aval, "shape", ()))


def eqn_flops(eqn) -> int:
  """Approximate FLOPs of one equation, not counting its sub-jaxprs."""
  out = sum(_size(v.aval) for v in eqn.outvars)
  if eqn.primitive is lax.dot_general_p:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    return 2 * out * math.prod(lhs_shape[d] for d in lhs_contract)
  if eqn.primitive is lax.conv_general_dilated_p:
    rhs_shape = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = math.prod(rhs_shape) // rhs_shape[out_feature_dim]
    return 2 * out * per_output // eqn.params["batch_group_count"]
  return out


def family(eqn) -> str:
  """The primitive family whose rate an equation runs at: "dot", "conv" or "other"."""
  if eqn.primitive is lax.dot_general_p:
    return "dot"
  if eqn.primitive is lax.conv_general_dilated_p:
    return "conv"
  return "other"


def jaxpr_family_flops(jaxpr) -> dict[str, int]:
  """Approximate FLOPs of one evaluation of a jaxpr by primitive family (`family`),
  sub-jaxprs included."""
  total = {"dot": 0, "conv": 0, "other": 0}
  for eqn in compat.open_jaxpr(jaxpr).eqns:
    subs = list(compat.sub_jaxprs(eqn))
    if subs:
      # Branches: count the dearest; loops: count every trip we know of.
      inner = max((jaxpr_family_flops(s) for s in subs), key=lambda d: sum(d.values()))
      for k, v in inner.items():
        total[k] += compat.trip_count(eqn) * v
    else:
      total[family(eqn)] += eqn_flops(eqn)
  return total


def loop_reads(jaxpr, num_inputs: int) -> dict[int, int]:
  """{input index: trips}: how many times a loop body reads each of the first
  `num_inputs` inputs of `jaxpr` (the parameters), for inputs a `scan` body reads
  (through calls too). A reverse pass adds each such input's cotangent once per trip:
  per example and output entry under vmap(jacrev), an array the size of the input
  read and written every step."""
  found: dict[int, int] = {}

  def walk(jaxpr, index: dict, trips: int) -> None:
    jaxpr = compat.open_jaxpr(jaxpr)
    for eqn in jaxpr.eqns:
      subs = list(compat.sub_jaxprs(eqn))
      if not subs:
        continue
      inner_trips = trips * compat.trip_count(eqn)
      for sub in subs:
        if len(sub.invars) != len(eqn.invars):
          continue  # a body whose inputs are not the equation's (while's cond / body)
        inner = {v: index[a] for v, a in zip(sub.invars, eqn.invars)
                 if not isinstance(a, compat.Literal) and a in index}
        if inner_trips > 1:
          for i in inner.values():
            found[i] = max(found.get(i, 1), inner_trips)
        walk(sub, inner, inner_trips)

  jaxpr = compat.open_jaxpr(jaxpr)
  walk(jaxpr, {v: i for i, v in enumerate(jaxpr.invars[:num_inputs])}, 1)
  return found


def jaxpr_flops(jaxpr) -> int:
  """Approximate FLOPs of one evaluation of a jaxpr, sub-jaxprs included."""
  return sum(jaxpr_family_flops(jaxpr).values())


def jaxpr_bytes(jaxpr) -> int:
  """Approximate bytes one evaluation of a jaxpr writes (every equation's outputs,
  sub-jaxprs included): its memory traffic, up to the reads of those values."""
  total = 0
  for eqn in compat.open_jaxpr(jaxpr).eqns:
    subs = list(compat.sub_jaxprs(eqn))
    if subs:
      total += compat.trip_count(eqn) * max(jaxpr_bytes(s) for s in subs)
    else:
      total += sum(_size(v.aval) * getattr(getattr(v.aval, "dtype", None), "itemsize", 4)
                   for v in eqn.outvars)
  return total


def einsum_flops(operand_labels, result, sizes) -> int:
  """FLOPs of an einsum along the contraction order `jnp.einsum` would pick."""
  import opt_einsum  # a dependency of jax

  symbol = {l: opt_einsum.get_symbol(i) for i, l in enumerate(
      dict.fromkeys(l for labels in operand_labels for l in labels))}
  expr = ",".join("".join(symbol[l] for l in labels) for labels in operand_labels)
  expr += "->" + "".join(symbol[l] for l in result)
  shapes = [tuple(sizes[l] for l in labels) for labels in operand_labels]
  if len(shapes) == 1:
    return math.prod(shapes[0])
  _, info = opt_einsum.contract_path(expr, *shapes, shapes=True, optimize="auto")
  return int(info.opt_cost)


# The machine: how fast this backend runs dense contractions and moves memory.

@dataclasses.dataclass(frozen=True)
class Machine:
  """Rates of one backend, for turning FLOPs and bytes into estimated seconds.

  Attributes:
    backend: the JAX platform ("cpu", "gpu", "tpu").
    flops_per_s: float32 matrix-product throughput (the "dot" family, and the
      contractions the NTK methods add).
    bytes_per_s: memory throughput of a large elementwise operation (read + write).
    conv_flops_per_s: throughput of a 3x3 convolution over a batch (forward passes and
      activation cotangents).
    conv_grad_flops_per_s: throughput of per-example convolution weight gradients
      (vmap of a VJP: what Jacobian methods compute for a conv layer).
    pair_flops_per_s: throughput of a pairwise structured term over tokens (an einsum
      of two sides' cotangents and per-example factors, batched over example pairs,
      small matrices): slower per FLOP than one large matrix product.
    trace_pair_flops_per_s: the same for a term whose output axes are all traced (the
      two sides' Grams, over the factors and over the cotangents, multiplied and
      summed): no output pairs, 2-3x the rate of an untraced term on a CPU.
    measured: True when measured on this machine (a micro-benchmark, cached on disk),
      False for the built-in defaults (NTK_COMPILER_CALIBRATE=0).
  """
  backend: str
  flops_per_s: float
  bytes_per_s: float
  conv_flops_per_s: float
  conv_grad_flops_per_s: float
  pair_flops_per_s: float
  trace_pair_flops_per_s: float
  measured: bool

  def seconds(self, flops: float, nbytes: float = 0.0, conv: float = 0.0,
              conv_grad: float = 0.0, pair: float = 0.0, trace_pair: float = 0.0
              ) -> float:
    """A roofline-style estimate: compute time per family plus memory-traffic time."""
    return (flops / self.flops_per_s + conv / self.conv_flops_per_s
            + conv_grad / self.conv_grad_flops_per_s + pair / self.pair_flops_per_s
            + trace_pair / self.trace_pair_flops_per_s + nbytes / self.bytes_per_s)


# Conservative rates when calibration is off (dot, bytes, conv, per-example conv grad,
# pairwise terms, traced pairwise terms).
_DEFAULTS = {"cpu": (5e10, 1e10, 3e10, 1e10, 2e10, 4e10),
             "gpu": (2e13, 1e12, 1e13, 5e12, 5e12, 5e12),
             "tpu": (5e13, 5e11, 3e13, 1e13, 1e13, 1e13)}
_MACHINES: dict = {}


def machine(backend: str | None = None) -> Machine:
  """The rates of `backend` (default: JAX's default backend), measured once.

  A short micro-benchmark (a 1024² float32 matmul, a 64 MB elementwise update, a 3x3
  convolution, its per-example weight gradients and a pairwise term: ~2 s on a CPU,
  compilation included) runs the first time a backend is met; its result is cached in memory and
  on disk ($NTK_COMPILER_CACHE, else $XDG_CACHE_HOME/ntk_compiler, else
  ~/.cache/ntk_compiler), keyed by the device kind, core count and JAX version, unless
  other processes used more than BUSY_SHARE of the CPU time while it ran (Linux): then
  the rates serve this process only and the next one measures again. The
  environment variable NTK_COMPILER_CALIBRATE=0 uses built-in defaults instead.
  """
  import jax

  backend = backend or jax.default_backend()
  if backend in _MACHINES:
    return _MACHINES[backend]
  result = Machine(backend, *_DEFAULTS.get(backend, _DEFAULTS["cpu"]), measured=False)
  if os.environ.get("NTK_COMPILER_CALIBRATE", "1") != "0":
    result = _cached(backend) or _calibrate(backend)
  _MACHINES[backend] = result
  return result


_RATES = ("flops_per_s", "bytes_per_s", "conv_flops_per_s", "conv_grad_flops_per_s",
          "pair_flops_per_s", "trace_pair_flops_per_s")


def _cache_file(backend: str) -> str:
  import jax

  root = os.environ.get("NTK_COMPILER_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ntk_compiler")
  device = jax.devices(backend)[0]
  kind = "".join(c if c.isalnum() else "_" for c in str(device.device_kind))
  cores = os.cpu_count() if backend == "cpu" else jax.device_count(backend)
  return os.path.join(root, f"machine-{backend}-{kind}-{cores}-jax{jax.__version__}.json")


def _cached(backend: str) -> Machine | None:
  try:
    with open(_cache_file(backend)) as f:
      data = json.load(f)
    return Machine(backend, *(float(data[k]) for k in _RATES), measured=True)
  except (OSError, ValueError, KeyError, TypeError):
    return None


# Calibration results are not cached when other processes used more than this share
# of the machine's CPU time while they were measured.
BUSY_SHARE = 0.2


def _cpu_ticks() -> tuple[int, int, int] | None:
  """(ticks of every CPU, of them idle, of this process) from /proc (Linux)."""
  try:
    with open("/proc/stat") as f:
      ticks = [int(v) for v in f.readline().split()[1:8]]
    with open("/proc/self/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return sum(ticks), ticks[3] + ticks[4], int(fields[11]) + int(fields[12])
  except (OSError, ValueError, IndexError):
    return None


def _others_share(before, after) -> float | None:
  """The share of all CPU time between two `_cpu_ticks` that other processes used."""
  if before is None or after is None or after[0] <= before[0]:
    return None
  total, idle, own = (a - b for a, b in zip(after, before))
  return max(total - idle - own, 0) / total


def _calibrate(backend: str) -> Machine:
  """Measures the rates of `backend` (best of a few runs each)."""
  import jax
  import jax.numpy as jnp

  device = jax.devices(backend)[0]
  put = lambda a: jax.device_put(a, device)
  before = _cpu_ticks()
  n, m = 1024, 1 << 24
  a, v = put(jnp.ones((n, n), jnp.float32)), put(jnp.ones((m,), jnp.float32))
  rates = {"flops_per_s": 2 * n ** 3 / _best_time(jax.jit(lambda a: a @ a), a),
           "bytes_per_s": 2 * 4 * m / _best_time(jax.jit(lambda v: v * 0.5 + 1.0), v)}
  b, hw, c = 16, 16, 32
  x = put(jnp.ones((b, hw, hw, c), jnp.float32))
  w = put(jnp.ones((3, 3, c, c), jnp.float32)) / (9 * c)
  conv = lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  flops = 2 * b * hw * hw * 9 * c * c
  rates["conv_flops_per_s"] = flops / _best_time(jax.jit(lambda x: conv(x, w)), x)

  outputs = 10
  cts = put(jnp.ones((b, outputs, 1, hw, hw, c), jnp.float32))

  def weight_grads(x, cts):  # per example and output: ∂<y, ct>/∂w, as jacrev under
    def one(xi, ci):         # vmap computes a conv layer's Jacobian
      _, vjp = jax.vjp(lambda w: conv(xi[None], w), w)
      return jax.vmap(lambda ct: vjp(ct)[0])(ci)
    return jax.vmap(one)(x, cts)
  grads = jax.jit(weight_grads)
  rates["conv_grad_flops_per_s"] = outputs * flops / _best_time(
      lambda args: grads(*args), (x, cts))
  rates["pair_flops_per_s"] = _pair_rate(put)
  rates["trace_pair_flops_per_s"] = _trace_pair_rate(put)
  result = Machine(backend, *(rates[k] for k in _RATES), measured=True)
  busy = _others_share(before, _cpu_ticks())
  if busy is not None and busy > BUSY_SHARE:
    # Rates measured beside other work are used by this process only: cached, one
    # taken during a test run had the matmul rate 2.7x low (72 against 197 GFLOP/s)
    # for every later process.
    return result
  try:
    path = _cache_file(backend)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(rates, f)
  except OSError:
    pass  # an unwritable cache only costs a re-measurement in the next process
  return result


def _pair_rate(put) -> float:
  """FLOP/s of a typical pairwise term: a weight applied per token, 8 examples a side,
  16 tokens, 64 x 64 weight, 10 outputs (an einsum over both sides' factors and
  cotangents, in the order `jnp.einsum` picks)."""
  import jax
  import jax.numpy as jnp

  n, t, d, o = 8, 16, 64, 10
  h = put(jnp.ones((n, t, d), jnp.float32))
  ct = put(jnp.ones((n, o, t, d), jnp.float32))
  spec = "nsi,mti,nasj,mbtj->nmab"
  term = jax.jit(lambda h, ct: jnp.einsum(spec, h, h, ct, ct))
  flops = einsum_flops([tuple("nsi"), tuple("mti"), tuple("nasj"), tuple("mbtj")],
                       list("nmab"), dict(n=n, m=n, s=t, t=t, i=d, j=d, a=o, b=o))
  return flops / _best_time(lambda args: term(*args), (h, ct))


def _trace_pair_rate(put) -> float:
  """FLOP/s of the same term with its outputs traced, contracted as emit does: the
  factors' Gram and the cotangents' Gram per pair of examples, multiplied, summed."""
  import jax
  import jax.numpy as jnp

  n, t, d, o = 8, 16, 64, 10
  h = put(jnp.ones((n, t, d), jnp.float32))
  ct = put(jnp.ones((n, o, t, d), jnp.float32))
  term = jax.jit(lambda h, ct: jnp.einsum(
      "nmst,nmst->nm", jnp.einsum("nsi,mti->nmst", h, h),
      jnp.einsum("nasj,matj->nmst", ct, ct)))
  flops = 2 * n * n * t * t * (d + o * d + 1)
  return flops / _best_time(lambda args: term(*args), (h, ct))


def _best_time(fn, arg, repeats: int = 5) -> float:
  fn(arg).block_until_ready()  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn(arg).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return max(best, 1e-9)

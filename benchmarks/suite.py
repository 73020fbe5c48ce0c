"""The benchmark suite: every NTK method of ours next to two plain-JAX baselines.

    .venv/bin/python benchmarks/suite.py [--only cnn-n16,mlp-w512-n16:trace] [--repeats 5]
        [--json PATH] [--quick] [--anchors ../shared/anchors/results] [--same-x]

One process, one model after another (benchmarks/models.py). For each row (a model and a
kernel, "trace" or "full") the candidates are our four methods (`compile_ntk(f,
method=m)`, batch independence left to the analysis) and two baselines written plainly
here: `vmap(jacrev)` + einsum ("jacrev") and NTK-vector products, a JVP of a VJP vmapped
over a basis of the output space ("vp-base"). Each candidate is lowered (for ours: traced
and planned) and compiled, timed separately ("first call" = lower + compile), checked
against XLA's buffer sizes, run once (warm-up: its time, the resident-memory growth and
its kernel, compared with the jacrev baseline's), then all candidates run in interleaved
rounds (the order rotating) and the median is reported. Between two calls the harness
waits, untimed, until the process is idle and stops handing memory back (`_settle`), and
a candidate under a second is called once, untimed, before its timed call
(`PRECALL_BELOW_MS`): a call timed while XLA still unmaps the previous call's buffers,
or on pages the system took back after it, measures that candidate's neighbour. Achieved GFLOP/s use XLA's FLOP
count of the compiled program (a loop body counted once) and are set against this
machine's float32 matmul rate, measured at startup.

The summary prints speed-ups over the jacrev baseline, what "auto" chose, auto against
the fastest of our methods (the issue's "within 10 %"), auto's first call against the
jacobian method's (at most 3x), and with --anchors the speed-ups over the anchors' own
jacrev baseline reached by neural-tangents' structured path and torch.func
(../shared/anchors/results). Two more rows time only the first call: an MLP with 8 linear
diamonds (auto vs jacobian) and the plan of a 50-block residual stack.

Ratios, not absolute times, are what to compare across machines; on a busy machine even
they drift (±15 %).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ntk_compiler as nc  # noqa: E402
from ntk_compiler import cost  # noqa: E402
from benchmarks import models  # noqa: E402

OURS = ("auto", "structured", "jacobian", "ntk_vp")
BASELINES = ("jacrev", "vp-base")
ROWS = (("mlp-w512-n16", "trace"), ("mlp-w512-n16", "full"),
        ("mlp-w512-n64", "trace"), ("mlp-w512-n64", "full"),
        ("mlp-w2048-n16", "full"), ("mlp-w2048-n64", "full"),
        ("cnn-n16", "trace"), ("resnet-n16", "trace"), ("resnet-n16", "full"),
        ("transformer-n8", "trace"), ("transformer-n8", "full"),
        ("vit-n8", "trace"), ("vit-n8", "full"),
        ("embedding-n32", "full"), ("rnn-n32", "full"))
FIRST_CALL_ROWS = ("diamonds", "residual-stack-50")
# The done criterion: auto's speed-up over the jacrev baseline on these rows.
GOALS = {("mlp-w512-n16", "full"): 150, ("mlp-w512-n64", "trace"): 200,
         ("mlp-w2048-n16", "full"): 250, ("cnn-n16", "trace"): 3,
         ("resnet-n16", "trace"): 3.5, ("transformer-n8", "trace"): 4.5,
         ("transformer-n8", "full"): 4}
AUTO_SLACK = 1.10       # auto within 10 % of the fastest of ours
FIRST_CALL_RATIO = 3.0  # auto's first call at most 3x the jacobian method's
SLOW_S = 2.0            # rows where a call takes longer run at most 3 rounds
# A candidate whose call takes less than this is called once, untimed, before each timed
# call. The call after a large one pays for it: after the jacrev baseline of the MLP
# W=512 N=64 row (2.7 GB of fresh pages per call), the next call of a 12-13 ms program
# took 15-146 ms (12-135 ms of it system time: page faults, unmapping), even after
# waiting 2-50 ms for the process to go idle; the call after that one 11-33 ms in 11 of
# 12 tries. Each candidate's timed call so measures its own work, baselines' as ours;
# calls of a second or more pay the same at most a few percent.
PRECALL_BELOW_MS = 1000.0
# Such a candidate is then timed this many times in a row each round (the median is
# over all of them): a 6 ms program's single calls spread over 5.9-10.6 ms in one run.
TIMED_PER_ROUND = 3


# --- the baselines, written plainly -------------------------------------------------------

def jacrev_baseline(f, trace: bool):
  """Per-example Jacobians by vmap(jacrev), contracted by einsum (the common recipe)."""
  def one(params, x):
    return f(params, jax.tree_util.tree_map(lambda a: a[None], x))[0]
  jacobians = jax.vmap(jax.jacrev(one), (None, 0))

  def ntk(params, x1, x2):
    leaves1 = jax.tree_util.tree_leaves(jacobians(params, x1))
    leaves2 = jax.tree_util.tree_leaves(jacobians(params, x2))
    flat = lambda j: j.reshape(j.shape[0], j.shape[1], -1)
    spec = "nap,map->nm" if trace else "nap,mbp->nmab"
    kernel = sum(jnp.einsum(spec, flat(a), flat(b)) for a, b in zip(leaves1, leaves2))
    return kernel / leaves1[0].shape[1] if trace else kernel  # traced: mean, as ours
  return ntk


def vp_baseline(f, trace: bool):
  """NTK-vector products: for each basis covector e of x2's outputs, J(x1) (J(x2)ᵀ e),
  a JVP of a VJP, vmapped over the basis."""
  def ntk(params, x1, x2):
    out2, pullback = jax.vjp(lambda p: f(p, x2), params)
    n2, o = out2.shape
    basis = jnp.eye(n2 * o, dtype=out2.dtype).reshape(n2 * o, n2, o)

    def column(covector):
      (tangent,) = pullback(covector)
      return jax.jvp(lambda p: f(p, x1), (params,), (tangent,))[1]
    kernel = jax.vmap(column)(basis).reshape(n2, o, -1, o).transpose(2, 0, 3, 1)
    return jnp.trace(kernel, axis1=2, axis2=3) / o if trace else kernel
  return ntk


# --- measuring ---------------------------------------------------------------------------

def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
  """The growth of the resident set inside the block, in bytes (None off Linux)."""

  def __enter__(self):
    try:  # resets the high-water mark VmHWM to the current resident set
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      self.base = _rss()
    except OSError:
      self.base = None
    self.growth = None
    return self

  def __exit__(self, *exc):
    if self.base is not None:
      with open("/proc/self/status") as f:
        peak = next((int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:")), None)
      self.growth = None if peak is None else max(0, peak - self.base)
    return False


def _available_bytes() -> float:
  """Memory a candidate may use: the device's limit, or on CPU most of MemAvailable."""
  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    return float(stats.get("bytes_limit", float("inf")))
  try:
    with open("/proc/meminfo") as f:
      kb = next(int(l.split()[1]) for l in f if l.startswith("MemAvailable:"))
    return 0.75 * kb * 1024
  except (OSError, StopIteration):
    return float("inf")


def _memory(compiled) -> dict:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # not every backend reports it
    return {}
  if stats is None:
    return {}
  return {"temp_bytes": int(stats.temp_size_in_bytes),
          "output_bytes": int(stats.output_size_in_bytes),
          "argument_bytes": int(stats.argument_size_in_bytes)}


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def _block(x):
  return jax.block_until_ready(x)


def _error(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def matmul_peak(size: int, repeats: int = 5) -> float:
  """This machine's float32 matmul rate in GFLOP/s (best of `repeats`)."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((size, size)), jnp.float32) for _ in range(2))
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, precision="highest"))
  _block(matmul(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    _block(matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e9


class Candidate:
  """One way to compute a row's kernel: compiled once, then called in the rounds."""

  def __init__(self, name, lower, args, ntk_fn=None):
    self.name, self.lower, self.args, self.ntk_fn = name, lower, args, ntk_fn
    self.compiled, self.kernel, self.times = None, None, []
    self.record = {}

  def prepare(self, limit: float, plan_args) -> None:
    """Lowers and compiles (timed), reads XLA's analyses, runs once; errors recorded."""
    r = self.record
    try:
      start = time.perf_counter()
      lowered = self.lower()
      lowered_at = time.perf_counter()
      # Two of ours with one program (auto and the method it chose) differ only by noise.
      r["program"] = hashlib.sha256(lowered.as_text().encode()).hexdigest()[:16]
      compiled = lowered.compile()
      done = time.perf_counter()
      r.update(lower_s=lowered_at - start, compile_s=done - lowered_at,
               first_call_s=done - start)
      if self.ntk_fn is not None:  # after the timing: a plan cache must not help it
        try:
          r["chose"] = self.ntk_fn.plan(*plan_args).method
        except Exception as e:  # noqa: BLE001
          r["chose"] = f"? ({_error(e)})"
      r.update(_memory(compiled))
      r["flops"] = _flops(compiled)
      need = r.get("temp_bytes", 0) + r.get("output_bytes", 0)
      if need > min(limit, _available_bytes()):
        r["skipped"] = (f"needs {need / 2**30:.1f} GiB (XLA's buffers) > "
                        f"{min(limit, _available_bytes()) / 2**30:.1f} GiB allowed")
        return
      with PeakRSS() as peak:
        start = time.perf_counter()
        self.kernel = np.asarray(_block(compiled(*self.args)))
        r["first_run_ms"] = (time.perf_counter() - start) * 1e3
      _settle()
      r["rss_growth_bytes"] = peak.growth
      self.compiled = compiled
    except Exception as e:  # noqa: BLE001 (an OOM or any failure: record, go on)
      r["error"] = _error(e)
      self.compiled = None

  def run(self) -> None:
    try:
      short = self.record.get("first_run_ms", math.inf) < PRECALL_BELOW_MS
      if short:
        _block(self.compiled(*self.args))  # untimed: see PRECALL_BELOW_MS
      for _ in range(TIMED_PER_ROUND if short else 1):
        _settle()
        start = time.perf_counter()
        _block(self.compiled(*self.args))
        self.times.append(time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001
      self.record["error"] = _error(e)
      self.compiled = None
    _settle()


def _resident_pages() -> int | None:
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1])
  except OSError:  # not Linux: nothing to wait for
    return None


def _settle(poll_s: float = 0.002, busy_share: float = 0.2, limit_s: float = 5.0) -> None:
  """Waits (untimed) until the process is idle and stops giving memory back.

  XLA unmaps a call's buffers after the call returns, on its own threads: after the
  jacrev baseline of the MLP W=2048 row (~5 GB of per-example Jacobians) resident
  memory falls for ~0.4 s, and a call timed in that window runs behind the unmapping
  (every page fault waits on it): 413-741 ms instead of 37-42 ms, sys time 0.36-0.47 s.
  Resident memory alone misses part of it (one large munmap holds it level until it
  ends), so the process's CPU time counts too: each timed call starts after a poll in
  which resident memory did not fall and the process's threads used under
  `busy_share` of a core. The polls are short: an idle process lets XLA's worker
  threads park, and waking them is timed too (15 ms of waiting before every call made
  neural-tangents' structured path 1.1-1.7x slower on the small models).
  """
  start, last = time.perf_counter(), _resident_pages()
  while last is not None and time.perf_counter() - start < limit_s:
    cpu, wall = time.process_time(), time.perf_counter()
    time.sleep(poll_s)
    now = _resident_pages()
    idle = time.process_time() - cpu < busy_share * (time.perf_counter() - wall)
    if now >= last and idle:
      return
    last = now


def _ours(model, method, kernel, same_x):
  trace_axes = (-1,) if kernel == "trace" else ()
  ntk_fn = nc.compile_ntk(model.f, method=method, trace_axes=trace_axes)
  args = (model.params, model.x1, None if same_x else model.x2)
  return Candidate(method, lambda: ntk_fn.lower(*args), args, ntk_fn)


def _baseline(model, name, kernel, same_x):
  build = jacrev_baseline if name == "jacrev" else vp_baseline
  fn = jax.jit(build(model.f, kernel == "trace"))
  args = (model.params, model.x1, model.x1 if same_x else model.x2)

  def lower():  # f's own products at float32, as ours ("highest") computes them
    with jax.default_matmul_precision("highest"):
      return fn.lower(*args)
  return Candidate(name, lower, args)


def _warm_tracing(model) -> None:
  """Traces f and its gradient once, so the first candidate does not pay JAX's caches."""
  loss = lambda p: jnp.sum(model.f(p, model.x1))
  jax.make_jaxpr(jax.grad(loss))(model.params)


def run_row(name, kernel, model, options, peak) -> dict:
  """Times every candidate on one row; returns its record."""
  print(f"\n== {name} [{kernel}]: {model.description}", flush=True)
  _warm_tracing(model)
  same_x = options.same_x
  candidates = ([_ours(model, m, kernel, same_x) for m in options.methods] +
                [_baseline(model, b, kernel, same_x) for b in options.baselines])
  for c in candidates:
    c.prepare(options.mem_limit, c.args)
  ready = [c for c in candidates if c.compiled is not None]
  slowest = max((c.record["first_run_ms"] for c in ready), default=0) / 1e3
  rounds = options.repeats if slowest < SLOW_S else min(options.repeats, 3)
  for i in range(rounds):
    shift = i % max(len(ready), 1)
    for c in ready[shift:] + ready[:shift]:
      if c.compiled is not None:
        c.run()
  reference = next((c for c in candidates if c.kernel is not None and c.name == "jacrev"),
                   next((c for c in candidates if c.kernel is not None), None))
  for c in candidates:
    r = c.record
    if c.times and "error" not in r:
      r["times_ms"] = [t * 1e3 for t in c.times]
      r["median_ms"] = float(np.median(r["times_ms"]))
      if r.get("flops"):
        r["gflops"] = r["flops"] / (r["median_ms"] / 1e3) / 1e9
        r["peak_fraction"] = r["gflops"] / peak
    if c.kernel is not None and reference is not None:
      scale = float(np.max(np.abs(reference.kernel))) or 1.0
      r["max_rel_diff"] = float(np.max(np.abs(c.kernel - reference.kernel))) / scale
      r["diff_against"] = reference.name
  row = {"model": name, "kernel": kernel, "description": model.description,
         "n_params": int(sum(np.size(p) for p in jax.tree_util.tree_leaves(model.params))),
         "rounds": rounds, "methods": {c.name: c.record for c in candidates}}
  row["summary"] = summarise(row)
  _print_row(row)
  del candidates, ready, reference
  _release()
  return row


def first_call_row(name, model, options) -> dict:
  """Plan time of auto, and first calls (lower + compile) of auto and jacobian."""
  print(f"\n== {name} [first call]: {model.description}", flush=True)
  _warm_tracing(model)
  row = {"model": name, "description": model.description, "methods": {}}
  try:
    ntk_fn = nc.compile_ntk(model.f, method="auto", trace_axes=())
    start = time.perf_counter()
    row["auto_plan"] = ntk_fn.plan(model.params, model.x1,
                                   None if options.same_x else model.x2).method
    row["plan_s"] = time.perf_counter() - start
  except Exception as e:  # noqa: BLE001
    row["plan_error"] = _error(e)
  kernels = {}
  for method in ("auto", "jacobian"):
    c = _ours(model, method, "full", options.same_x)
    c.prepare(options.mem_limit, c.args)
    for _ in range(3 if c.compiled is not None else 0):
      c.run()
    if c.times:
      c.record["median_ms"] = float(np.median(c.times)) * 1e3
    kernels[method] = c.kernel
    row["methods"][method] = c.record
  if all(k is not None for k in kernels.values()):
    ref = kernels["jacobian"]
    row["max_rel_diff"] = float(np.max(np.abs(kernels["auto"] - ref)) /
                                (float(np.max(np.abs(ref))) or 1.0))
  firsts = [row["methods"][m].get("first_call_s") for m in ("auto", "jacobian")]
  if None not in firsts:
    row["first_call_ratio"] = firsts[0] / firsts[1]
  _print_first_call(row)
  _release()
  return row


def _release() -> None:
  gc.collect()
  jax.clear_caches()


# --- summaries and printing ----------------------------------------------------------------

def _median(row, method):
  return row["methods"].get(method, {}).get("median_ms")


def summarise(row) -> dict:
  """Speed-ups over jacrev, auto's choice, auto vs the fastest of ours, first-call ratio."""
  base = _median(row, "jacrev")
  s = {"speedup": {m: base / t for m in row["methods"]
                   if (t := _median(row, m)) and base}}
  auto = row["methods"].get("auto", {})
  s["auto_chose"] = auto.get("chose")
  # Auto against the fastest of ours by the best round of each (the least disturbed by
  # the machine's noise); where auto lowers to the very program of the method it chose,
  # the two are one candidate, timed by the better of their best rounds.
  best = {m: min(r["times_ms"]) for m in OURS
          if (r := row["methods"].get(m, {})).get("times_ms")}
  chose = auto.get("chose")
  if "auto" in best and chose in best and auto.get("program") and (
      auto["program"] == row["methods"][chose].get("program")):
    best["auto"] = best[chose] = min(best["auto"], best[chose])
    s["auto_same_program_as"] = chose
  if "auto" in best:
    fastest = min(best, key=best.get)
    s["fastest_ours"] = fastest
    s["auto_over_fastest"] = best["auto"] / best[fastest]
  jac = row["methods"].get("jacobian", {}).get("first_call_s")
  if auto.get("first_call_s") and jac:
    s["first_call_ratio"] = auto["first_call_s"] / jac
  return s


def _fmt_ms(v):
  return "-" if v is None else f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _fmt_x(v):
  return "-" if v is None else f"{v:.2g}" if v < 10 else f"{v:.0f}"


def _mb(v):
  return "-" if v is None else f"{v / 2**20:.0f}"


def _print_row(row) -> None:
  print(f"  {'method':10s} {'median ms':>10s} {'first s':>8s} {'run1 ms':>9s} "
        f"{'XLA MB':>7s} {'RSS+ MB':>7s} {'GFLOP/s':>8s} {'%peak':>6s} {'x jacrev':>8s} "
        f"{'rel.diff':>8s}")
  speedup = row["summary"]["speedup"]
  against = {r.get("diff_against") for r in row["methods"].values()} - {None, "jacrev"}
  if against:  # the jacrev baseline did not run: kernels compared with another's
    print(f"  (rel.diff against {against.pop()}'s kernel)")
  for name, r in row["methods"].items():
    if "error" in r or "skipped" in r:
      print(f"  {name:10s} {'ERROR ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']}")
      continue
    xla = r.get("temp_bytes", 0) + r.get("output_bytes", 0) if "temp_bytes" in r else None
    gflops = r.get("gflops")
    rate = "-" if gflops is None else f"{gflops:.1f}"
    share = "-" if gflops is None else f"{100 * r['peak_fraction']:.0f}"
    chose = f"  (chose {r.get('chose')})" if name == "auto" else ""
    print(f"  {name:10s} {_fmt_ms(r.get('median_ms')):>10s} {r['first_call_s']:8.2f} "
          f"{_fmt_ms(r.get('first_run_ms')):>9s} {_mb(xla):>7s} "
          f"{_mb(r.get('rss_growth_bytes')):>7s} "
          f"{rate:>8s} {share:>6s} "
          f"{_fmt_x(speedup.get(name)):>8s} {r.get('max_rel_diff', float('nan')):8.1e}"
          f"{chose}", flush=True)


def _print_first_call(row) -> None:
  if "plan_s" in row:
    print(f"  plan (auto): {row['plan_s']:.2f} s, chose {row['auto_plan']}")
  else:
    print(f"  plan (auto): ERROR {row.get('plan_error')}")
  for m, r in row["methods"].items():
    if "error" in r or "skipped" in r:
      print(f"  {m:10s} {r.get('error') or 'skipped: ' + r['skipped']}")
    else:
      print(f"  {m:10s} first call {r['first_call_s']:7.2f} s (lower {r['lower_s']:.2f} + "
            f"compile {r['compile_s']:.2f})  run {_fmt_ms(r.get('median_ms'))} ms")
  if "first_call_ratio" in row:
    ok = row["first_call_ratio"] <= FIRST_CALL_RATIO
    print(f"  auto / jacobian first call: {row['first_call_ratio']:.2f}x "
          f"({'ok' if ok else 'NOT'} <= {FIRST_CALL_RATIO:g}x); "
          f"max rel. diff {row.get('max_rel_diff', float('nan')):.1e}", flush=True)


def load_anchors(directory) -> dict:
  """{(setting, kernel): {method: median ms}} from the anchors' results/*.json."""
  table = {}
  for path in sorted(Path(directory).glob("*.json")):
    with open(path) as f:
      results = json.load(f).get("results", {})
    for setting, res in results.items():
      for kernel in ("trace", "full"):
        for method, r in res.get(kernel, {}).items():
          if r.get("median_ms") is not None:
            table.setdefault((setting, kernel), {}).setdefault(method, r["median_ms"])
  return table


def anchor_speedups(anchors, setting, kernel) -> dict:
  """NT structured and torch.func over the anchors' own jacrev baseline (plain JAX)."""
  times = anchors.get((setting, kernel), {})
  base = times.get("jax-jacrev-contract")
  out = {}
  for key, method in (("nt_structured", "NT-SD"), ("torch_func", "torch.func-jacrev")):
    if base and times.get(method):
      out[key] = base / times[method]
  return out


def print_summary(rows, first_calls, anchors, quick=False) -> list[str]:
  """The markdown table of all rows and the done-criterion checks; returns failures."""
  head = ["row", "kernel", "jacrev ms", "auto ms", "auto chose", "auto x", "structured x",
          "jacobian x", "ntk_vp x", "vp-base x", "auto / fastest", "first call auto / jac"]
  if anchors is not None:
    head += ["NT-SD x", "torch.func x"]
  head += ["goal x"]
  if rows:
    print("\nSpeed-ups (x) over the jacrev baseline, medians from one run (auto / "
          "fastest: best rounds; [= m]: auto lowered to m's very program):\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
  failures = []
  for row in rows:
    s = row["summary"]
    x = s["speedup"]
    fastest = s.get("auto_over_fastest")
    cells = [row["model"], row["kernel"], _fmt_ms(_median(row, "jacrev")),
             _fmt_ms(_median(row, "auto")), s.get("auto_chose") or "-",
             *(_fmt_x(x.get(m)) for m in (*OURS, "vp-base")),
             "-" if fastest is None else f"{fastest:.2f} ({s['fastest_ours']})"
             + (f" [= {s['auto_same_program_as']}]" if s.get("auto_same_program_as")
                else ""),
             "-" if "first_call_ratio" not in s else f"{s['first_call_ratio']:.2f}"]
    key = (row["model"], row["kernel"])
    if anchors is not None:
      a = row.get("anchors", {})
      cells += [_fmt_x(a.get("nt_structured")), _fmt_x(a.get("torch_func"))]
    cells += [_fmt_x(GOALS.get(key))]
    print("| " + " | ".join(cells) + " |")
    failures += _row_failures(row, key, quick)
  for row in first_calls:
    ratio = row.get("first_call_ratio")
    if ratio is not None and ratio > FIRST_CALL_RATIO:
      failures.append(f"{row['model']}: auto's first call {ratio:.1f}x jacobian's")
  print("\nFirst calls (lower + compile):" if first_calls else "")
  for row in first_calls:
    m = row["methods"]
    plan = f"plan {row['plan_s']:.2f} s" if "plan_s" in row else "plan failed"
    print(f"  {row['model']}: {plan}; auto {m['auto'].get('first_call_s', float('nan')):.2f}"
          f" s, jacobian {m['jacobian'].get('first_call_s', float('nan')):.2f} s")
  print("\nDone-criterion checks (issue 9)" + (
      " (--quick: tiny models timed mostly by dispatch; the speed goals are left out):"
      if quick else ":"))
  for line in failures or ["all met"]:
    print(f"  - {line}")
  return failures


def _row_failures(row, key, quick) -> list[str]:
  s, name = row["summary"], f"{row['model']} [{row['kernel']}]"
  out = []
  if s.get("auto_over_fastest", 1) > AUTO_SLACK:
    out.append(f"{name}: auto {s['auto_over_fastest']:.2f}x the time of "
               f"{s['fastest_ours']} (not within 10 %)")
  auto_x = s["speedup"].get("auto")
  if auto_x is not None and auto_x < 1:
    out.append(f"{name}: auto slower than the jacrev baseline ({auto_x:.2f}x)")
  if s.get("first_call_ratio", 0) > FIRST_CALL_RATIO:
    out.append(f"{name}: auto's first call {s['first_call_ratio']:.1f}x jacobian's")
  goal = GOALS.get(key)
  if goal is not None and not quick:
    anchors = row.get("anchors", {})
    bar = max([goal, *anchors.values()])
    if auto_x is None or auto_x < bar:
      out.append(f"{name}: auto {_fmt_x(auto_x)}x over jacrev, goal {_fmt_x(bar)}x "
                 f"(the issue's {goal:g}x and the anchors')")
  return out


# --- the command line ---------------------------------------------------------------------

def _select(only: str | None):
  """The rows and first-call rows `--only` names (model, or model:kernel)."""
  if not only:
    return list(ROWS), list(FIRST_CALL_ROWS)
  wanted = [w.strip() for w in only.split(",") if w.strip()]
  known = {m for m, _ in ROWS} | set(FIRST_CALL_ROWS)
  for w in wanted:
    if w.split(":")[0] not in known:
      raise SystemExit(f"--only: unknown row {w!r}; rows: {', '.join(sorted(known))} "
                       "(a model, or model:trace / model:full)")
  rows = [(m, k) for m, k in ROWS if m in wanted or f"{m}:{k}" in wanted]
  return rows, [m for m in FIRST_CALL_ROWS if m in wanted]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", help="comma-separated rows: a model (both kernels) or "
                 "model:trace / model:full; default all")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed rounds per row (default 5, with --quick 2; rows with a call "
                 f"over {SLOW_S:g} s run at most 3)")
  p.add_argument("--json", help="where to write the results (default: a file in the "
                 "system's temporary directory, printed at the end)")
  p.add_argument("--quick", action="store_true",
                 help="tiny sizes of every model: checks that the suite runs (minutes)")
  p.add_argument("--anchors", help="the anchors' results directory (e.g. "
                 "../shared/anchors/results): adds NT structured and torch.func columns")
  p.add_argument("--methods", default=",".join(OURS), help="ours to run (default all)")
  p.add_argument("--baselines", default=",".join(BASELINES),
                 help="baselines to run (default jacrev,vp-base; jacrev is the reference)")
  p.add_argument("--same-x", action="store_true",
                 help="x2 omitted (ours) / x2 = x1 (baselines) instead of two batches")
  p.add_argument("--mem-limit-gb", type=float, default=12.0,
                 help="skip a candidate whose XLA buffers exceed this (default 12; also at "
                 "most 3/4 of the memory available when it runs)")
  args = p.parse_args(argv)
  args.methods = [m for m in args.methods.split(",") if m]
  args.baselines = [b for b in args.baselines.split(",") if b]
  for m in args.methods:
    if m not in OURS:
      p.error(f"--methods: {m!r} is not one of {', '.join(OURS)}")
  for b in args.baselines:
    if b not in BASELINES:
      p.error(f"--baselines: {b!r} is not one of {', '.join(BASELINES)}")
  if args.repeats is None:
    args.repeats = 2 if args.quick else 5
  if args.repeats < 1:
    p.error("--repeats must be at least 1")
  args.mem_limit = args.mem_limit_gb * 2**30
  return args


def main(argv=None) -> dict:
  """Runs the suite; returns the results written to JSON."""
  options = parse_args(argv)
  rows, first_call_names = _select(options.only)
  anchors = None
  if options.anchors and not options.quick:
    anchors = load_anchors(options.anchors)
  elif options.anchors:
    print("--anchors ignored with --quick (the sizes differ)")
  device = jax.devices()[0]
  peak = matmul_peak(256 if options.quick else 1024 if device.platform == "cpu" else 4096)
  meta = {"jax": jax.__version__, "ntk_compiler": nc.__version__,
          "python": platform.python_version(), "device": device.device_kind,
          "platform": device.platform, "cpus": os.cpu_count(), "machine": platform.machine(),
          "matmul_peak_gflops": peak, "quick": options.quick, "repeats": options.repeats,
          "same_x": options.same_x, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  print(f"JAX {meta['jax']} on {device.platform} ({device.device_kind}, {os.cpu_count()} "
        f"CPUs); float32 matmul peak {peak:.1f} GFLOP/s", flush=True)
  # The cost model's rates are measured once per machine (then read from a disk cache):
  # measured here, so no row's first call includes it.
  rates = cost.machine()
  meta["cost_model_rates"] = dataclasses.asdict(rates)
  print(f"cost model rates ({'measured' if rates.measured else 'defaults'}): "
        + ", ".join(f"{k} {v:.3g}" for k, v in dataclasses.asdict(rates).items()
                    if isinstance(v, float)), flush=True)
  start = time.perf_counter()
  results, first_calls = [], []
  for name, kernel in rows:
    try:
      row = run_row(name, kernel, models.build(name, options.quick), options, peak)
    except Exception as e:  # noqa: BLE001 (building the model failed: go on)
      print(f"  ERROR {_error(e)}", flush=True)
      row = {"model": name, "kernel": kernel, "error": _error(e)}
      results.append(row)
      continue
    setting = models.anchor_setting(name)
    if anchors is not None and setting:
      row["anchors"] = anchor_speedups(anchors, setting, kernel)
    results.append(row)
  for name in first_call_names:
    try:
      first_calls.append(first_call_row(name, models.build(name, options.quick), options))
    except Exception as e:  # noqa: BLE001
      print(f"  ERROR {_error(e)}", flush=True)
      first_calls.append({"model": name, "error": _error(e), "methods": {}})
  meta["wall_s"] = time.perf_counter() - start
  done = [r for r in results if "summary" in r]
  failures = print_summary(done, [r for r in first_calls if "error" not in r], anchors,
                           options.quick)
  out = {"meta": meta, "rows": results, "first_call": first_calls, "checks": failures}
  path = options.json or os.path.join(
      tempfile.gettempdir(), f"ntk-benchmarks-{time.strftime('%Y%m%d-%H%M%S')}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"\n{meta['wall_s']:.0f} s; results written to {path}")
  return out


if __name__ == "__main__":
  main()

"""Scale benchmarks: tiles under a budget, streaming to disk, the jacobian method.

    .venv/bin/python benchmarks/bench_scale.py
        [--part symmetric|stream|jacobian|reuse|all] [--n N] [--memory 2GB]
        [--path kernel.npy]

Each part runs in a fresh subprocess, so its peak resident memory (`resource.getrusage`,
ru_maxrss: the high-water mark of the process) is its own; "growth" is that peak minus
the resident memory after JAX, the model and the inputs were set up.

- symmetric: the 4096 x 4096 kernel (trace over 10 outputs) of a 3-layer width-512 MLP
  under max_memory="2GB", x2 omitted (upper tiles, mirrored) and x2 passed as a separate
  copy of x1; time of each (the first call, compiles included, then the median of
  three warm calls, the two interleaved) and the ratio.
- stream: the 20 000 x 20 000 kernel of the same MLP written tile by tile into a .npy
  memmap (numpy.lib.format.open_memmap) under max_memory="1GB", with the process's
  peak RSS.
- jacobian: method="jacobian" at N = 1024 on a 3x256 MLP (per-example Jacobians ~6 GB)
  under max_memory="1GB": time and peak memory growth.
- reuse: methods jacobian and ntk_vp, at N = 512 on the 3x256 MLP and N = 256 on the
  benchmark suite's CNN, under max_memory="1GB", x2 omitted and given: each block's
  Jacobians / cotangents computed once and kept for the tiles that need them (the
  default), against every tile computing its own (the runner switched off), warm
  calls; time ratio and the sides computed.

Run it on a quiet machine: timings of concurrent jobs mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_s() -> float:
  """CPU seconds of this process (user + system, all threads): less moved by other
  jobs on the machine than wall time, though not immune (shared caches, spinning
  threads)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _mlp(width: int, depth: int = 3, inputs: int = 32, outputs: int = 10):
  import jax
  import jax.numpy as jnp
  import numpy as np

  def f(params, x):
    for w, b in params[:-1]:
      x = jnp.tanh(x @ w + b)
    w, b = params[-1]
    return x @ w + b

  sizes = [inputs] + [width] * depth + [outputs]
  rng = np.random.default_rng(0)
  params = [(jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
             jnp.zeros(b, jnp.float32)) for a, b in zip(sizes[:-1], sizes[1:])]
  return f, params


def _inputs(n: int, dim: int = 32):
  import jax.numpy as jnp
  import numpy as np
  return jnp.asarray(np.random.default_rng(1).normal(size=(n, dim)), jnp.float32)


WARM_ROUNDS = 3  # warm calls of each, interleaved; the median is reported


def part_symmetric(n: int, memory: str) -> dict:
  import jax
  import numpy as np
  import ntk_compiler as nc
  f, params = _mlp(512)
  x = _inputs(n)
  copy = jax.numpy.array(x, copy=True)
  ntk = nc.compile_ntk(f, method="structured", max_memory=memory, progress=False)
  est_sym, est_copy = ntk.estimate(params, x), ntk.estimate(params, x, copy)
  base = _rss_mb()
  result = {"n": n, "max_memory": memory, "estimate_symmetric": str(est_sym),
            "estimate_copy": str(est_copy)}
  kernels, times, cpus = {}, {}, {}
  calls = (("symmetric", None), ("copy", copy))
  for rnd in range(1 + WARM_ROUNDS):  # the first round compiles; rounds interleaved
    for name, x2 in calls:
      start, cpu = time.perf_counter(), _cpu_s()
      # np.asarray waits for it: a call that fits in one piece returns a JAX array
      # while it still runs.
      kernels[name] = np.asarray(ntk(params, x, x2))
      times.setdefault(name, []).append(time.perf_counter() - start)
      cpus.setdefault(name, []).append(_cpu_s() - cpu)
  for name, _ in calls:
    result[f"{name}_first_s"] = times[name][0]
    result[f"{name}_warm_s"] = float(np.median(times[name][1:]))
    result[f"{name}_warm_cpu_s"] = float(np.median(cpus[name][1:]))
  result["ratio_warm"] = result["symmetric_warm_s"] / result["copy_warm_s"]
  result["ratio_warm_cpu"] = result["symmetric_warm_cpu_s"] / result["copy_warm_cpu_s"]
  result["ratio_first"] = result["symmetric_first_s"] / result["copy_first_s"]
  result["max_abs_diff"] = float(np.abs(kernels["symmetric"] - kernels["copy"]).max())
  result["peak_rss_mb"], result["peak_growth_mb"] = _peak_mb(), _peak_mb() - base
  return result


def part_stream(n: int, memory: str, path: str | None) -> dict:
  import numpy as np
  import ntk_compiler as nc
  f, params = _mlp(512)
  x = _inputs(n)
  ntk = nc.compile_ntk(f, method="structured", max_memory=memory, progress=False)
  est = ntk.estimate(params, x)
  with tempfile.TemporaryDirectory() as tmp:
    target = path or os.path.join(tmp, "kernel.npy")
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32, shape=(n, n))
    base = _rss_mb()
    start = time.perf_counter()
    ntk(params, x, out=out)
    out.flush()
    seconds = time.perf_counter() - start
    check = np.asarray(ntk(params, x[:64]))  # a corner, computed in one piece
    diff = float(np.abs(np.asarray(out[:64, :64]) - check).max())
    del out
  return {"n": n, "max_memory": memory, "estimate": str(est), "seconds": seconds,
          "corner_max_abs_diff": diff, "peak_rss_mb": _peak_mb(),
          "peak_growth_mb": _peak_mb() - base}


def part_jacobian(n: int, memory: str) -> dict:
  import ntk_compiler as nc
  f, params = _mlp(256)
  x = _inputs(n)
  ntk = nc.compile_ntk(f, method="jacobian", max_memory=memory, progress=False)
  est = ntk.estimate(params, x)
  base = _rss_mb()
  start = time.perf_counter()
  kernel = ntk(params, x)
  seconds = time.perf_counter() - start
  return {"n": n, "max_memory": memory, "estimate": str(est), "seconds": seconds,
          "shape": list(kernel.shape), "peak_rss_mb": _peak_mb(),
          "peak_growth_mb": _peak_mb() - base}


def _cnn(n: int):
  """The benchmark suite's CNN (3 SAME 3x3 convs 32/64/64 on 16x16x3, mean, Dense(10))."""
  if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
  from benchmarks import models
  model = models.cnn(n=n)
  return model.f, model.params, model.x1


def part_reuse(n: int, memory: str) -> dict:
  import jax.numpy as jnp
  import numpy as np
  import ntk_compiler as nc
  from ntk_compiler import scale
  made, original = [], scale._blocks

  def recording(*args, **kwargs):
    made.append(original(*args, **kwargs))
    return made[-1]
  f, params = _mlp(256)
  zoo = {"mlp": (f, params, _inputs(n)), "cnn": _cnn(n // 2)}
  result = {"n_mlp": n, "n_cnn": n // 2, "max_memory": memory}
  for model, (f, params, x) in zoo.items():
    x2 = jnp.asarray(x) * 0.5
    for method in ("jacobian", "ntk_vp"):
      for label, second in (("omitted", None), ("given", x2)):
        ntk = nc.compile_ntk(f, method=method, max_memory=memory, progress=False)
        name = f"{model}_{method}_{label}"
        tiling = ntk.estimate(params, x, second).tiling
        result[f"{name}_tiling"] = f"{tiling.tiles} tiles of {tiling.block1}"
        kernels = {}
        for how, runner in (("reuse", recording), ("recompute", lambda *a, **k: None)):
          scale._blocks = runner
          try:
            ntk(params, x, second)  # compiles
            made.clear()
            start, cpu = time.perf_counter(), _cpu_s()
            kernels[how] = ntk(params, x, second)
            result[f"{name}_{how}_s"] = time.perf_counter() - start
            result[f"{name}_{how}_cpu_s"] = _cpu_s() - cpu
          finally:
            scale._blocks = original
          if how == "reuse":
            result[f"{name}_sides_computed"] = made[-1].evaluations
        result[f"{name}_ratio"] = (result[f"{name}_reuse_s"]
                                   / result[f"{name}_recompute_s"])
        result[f"{name}_max_abs_diff"] = float(
            np.abs(kernels["reuse"] - kernels["recompute"]).max())
        print(json.dumps({k: v for k, v in result.items() if k.startswith(name)}),
              file=sys.stderr, flush=True)  # as it goes: a long run shows progress
  return result


# The stream's budget is 1GB: the process must stay under 2 GB resident in all, and at
# max_memory="2GB" the tiles' buffers alone take it to ~1.9 GB (the symmetric part).
PARTS = {"symmetric": (4096, "2GB"), "stream": (20000, "1GB"), "jacobian": (1024, "1GB"),
         "reuse": (512, "1GB")}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", default="all", choices=[*PARTS, "all"])
  parser.add_argument("--n", type=int, help="examples (default: the issue's)")
  parser.add_argument("--memory", help="max_memory (default: the issue's)")
  parser.add_argument("--path",
                      help="stream: where to write the .npy (default: a temp file)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    n, memory = PARTS[args.part]
    n, memory = args.n or n, args.memory or memory
    if args.part == "symmetric":
      result = part_symmetric(n, memory)
    elif args.part == "stream":
      result = part_stream(n, memory, args.path)
    elif args.part == "reuse":
      result = part_reuse(n, memory)
    else:
      result = part_jacobian(n, memory)
    print(json.dumps(result))
    return
  parts = list(PARTS) if args.part == "all" else [args.part]
  for part in parts:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--part", part]
    for flag in ("n", "memory", "path"):
      if getattr(args, flag) is not None:
        cmd += [f"--{flag}", str(getattr(args, flag))]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT)
    if done.returncode:
      print(f"{part}: failed\n{done.stderr[-3000:]}")
      continue
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"== {part}")
    for key, value in result.items():
      print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")


if __name__ == "__main__":
  main()

"""How fast the structured NTK of a suite model can get on this machine: its floor.

The structured method cannot skip some work. For the ResNet-style trace kernel (N
examples per side, K outputs, x2 given): per side, one backward pass per (example,
output) row through every convolution but the stem (a transposed convolution of N*K
images; the last one as one convolution of N images with K*C output channels, as
stacking runs it, whichever is faster), each convolution weight's per-example gradient
(patches times cotangents, one batched matmul per layer; the last convolution's without
the K rows, as stacking's pooled head allows), and the forward pass. For the wide MLP's
full kernel: the two backward matmuls of all N*K rows of both sides through the square
weights, and the forward matmuls (each weight read from memory, as the program streams
them). Each operation is timed alone at the model's shapes; the sum is the floor: what
the kernel would take if everything else (masks, re-layouts, Grams, the head) were
free. Printed beside the jacrev baseline and ours, timed in the same run: jacrev /
floor is the largest speed-up over the baseline within reach of a program built from
XLA's convolutions and matmuls on this backend.

  python benchmarks/floor.py            # both rows, ~30 s
  python benchmarks/floor.py --quick    # tiny sizes: checks that it runs
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

if __package__ in (None, ""):  # run as a script: the repository root, as suite.py does
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import models, suite  # noqa: E402
from ntk_compiler import compile_ntk  # noqa: E402

HIGHEST = lax.Precision.HIGHEST
NHWC = ("NHWC", "HWIO", "NHWC")


def median_ms(fn, *args, reps: int = 20, cycle: tuple = ()) -> float:
  """Median milliseconds of jit(fn)(*args); with `cycle`, the calls go round the
  argument tuples in it instead (weights the program streams from memory: a call after
  another weight's finds its own out of the caches, as in the model)."""
  fn = jax.jit(fn)
  calls = list(cycle) or [args]
  for a in calls:
    jax.block_until_ready(fn(*a))
  times = []
  for i in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*calls[i % len(calls)]))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def _random(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC,
                                  precision=HIGHEST)


def _batched_matmul(a, b):
  return jnp.einsum("iap,ipc->iac", a, b, precision=HIGHEST)


def resnet_floor(n=16, outputs=models.OUT, channels=32, image=16, blocks=2) -> dict:
  """Per operation of one side: (how many, milliseconds each)."""
  pixels, taps = image * image, 9 * channels
  rows = n * outputs
  image_in = _random((n, image, image, channels))
  kernel = _random((3, 3, channels, channels))
  backward_rows = median_ms(_conv, _random((rows, image, image, channels)), kernel)
  return {
      "forward stem conv": (1, median_ms(_conv, _random((n, image, image, 3)),
                                         _random((3, 3, 3, channels)))),
      "forward conv": (2 * blocks, median_ms(_conv, image_in, kernel)),
      "backward conv, N*K rows": (2 * blocks - 1, backward_rows),
      "backward conv, stacked (K*C channels)": (1, min(backward_rows, median_ms(
          _conv, image_in, _random((3, 3, channels, outputs * channels))))),
      "weight gradient, N*K rows": (2 * blocks - 1, median_ms(
          _batched_matmul, _random((n, taps, pixels)),
          _random((n, pixels, outputs * channels)))),
      "weight gradient, pooled head (no rows)": (1, median_ms(
          _batched_matmul, _random((n, taps, pixels)), _random((n, pixels, channels)))),
      "stem weight gradient, N*K rows": (1, median_ms(
          _batched_matmul, _random((n, 27, pixels)),
          _random((n, pixels, outputs * channels)))),
  }


def mlp_floor(n=16, outputs=models.OUT, width=2048, depth=3) -> dict:
  """Per operation of the merged sides: (how many, milliseconds each)."""
  rows = 2 * n * outputs  # both sides' rows in one matmul, as the program runs them
  # The model's square weights in turn: each call reads its weight from memory, as the
  # program does (16 MB each at width 2048: 0.2-0.3 ms more per matmul than from cache).
  squares = [_random((width, width), seed) for seed in range(1, max(2, depth - 1) + 1)]
  matmul = lambda a, b: jnp.matmul(a, b, precision=HIGHEST)
  timed = lambda m: median_ms(matmul, cycle=[(_random((m, width)), w) for w in squares])
  return {
      "forward matmul (both sides)": (depth - 1, timed(2 * n)),
      "backward matmul, all rows": (depth - 1, timed(rows)),
  }


def measure(name: str, kind: str, floor_fn, sides: int, reps: int,
            quick: bool = False) -> dict:
  """The floor of row (name, kind) from `floor_fn` at the model's sizes, ours and the
  jacrev baseline timed interleaved; printed, and returned."""
  builder, sizes, _ = models.MODELS[name]
  sizes = models.QUICK[name] if quick else sizes
  ops = floor_fn(**sizes)
  m = builder(**sizes)
  trace = kind == "trace"
  ours = compile_ntk(m.f, trace_axes=(-1,) if trace else ())
  base = jax.jit(suite.jacrev_baseline(m.f, trace))
  args = (m.params, m.x1, m.x2)
  jax.block_until_ready(ours(*args))
  jax.block_until_ready(base(*args))
  times = {"ours": [], "jacrev": []}
  for _ in range(reps):  # interleaved, as the suite times them
    # As the suite: wait until the baseline's gigabytes are handed back, then one
    # untimed call of ours (suite.PRECALL_BELOW_MS).
    suite._settle()
    jax.block_until_ready(ours(*args))
    for label, fn, calls in (("ours", ours, suite.TIMED_PER_ROUND), ("jacrev", base, 1)):
      for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[label].append(time.perf_counter() - start)
  ours_ms, base_ms = (float(np.median(times[k])) * 1e3 for k in ("ours", "jacrev"))
  floor = sides * sum(count * ms for count, ms in ops.values())
  print(f"\n== {name} [{kind}]")
  for op, (count, ms) in ops.items():
    print(f"  {op:42s} {count} x {ms:7.2f} ms" + (f" x {sides} sides" if sides > 1 else ""))
  print(f"  floor {floor:.1f} ms, ours {ours_ms:.1f} ms, jacrev {base_ms:.1f} ms: "
        f"jacrev / floor {base_ms / floor:.2f}x (the most within reach), "
        f"jacrev / ours {base_ms / ours_ms:.2f}x, ours / floor {ours_ms / floor:.2f}")
  return {"ops": ops, "floor_ms": floor, "ours_ms": ours_ms, "jacrev_ms": base_ms}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", choices=("resnet", "mlp"), help="one row (default both)")
  p.add_argument("--reps", type=int, default=10, help="rounds of ours and jacrev")
  p.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
  a = p.parse_args(argv)
  out = {}
  if a.only in (None, "resnet"):
    out["resnet"] = measure("resnet-n16", "trace", resnet_floor, sides=2, reps=a.reps,
                            quick=a.quick)
  if a.only in (None, "mlp"):
    out["mlp"] = measure("mlp-w2048-n16", "full", mlp_floor, sides=1,
                         reps=max(3, a.reps // 3), quick=a.quick)
  return out


if __name__ == "__main__":
  main()

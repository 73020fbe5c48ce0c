"""Command line: `python -m ntk_compiler demo`."""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ntk_compiler.api import compile_ntk


def mlp(key, width=256, depth=3, inputs=32, outputs=10, n=16):
  """A relu MLP (f, params, x) with `n` random inputs: the demo's and benchmarks' model."""
  sizes = [inputs] + [width] * depth + [outputs]
  keys = jax.random.split(key, len(sizes))
  params = [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

  def f(params, x):
    for layer in params[:-1]:
      x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]
  return f, params, jax.random.normal(keys[-1], (n, inputs))


def _time(fn, *args, repeats=5):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  compiled = time.perf_counter() - start
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append(time.perf_counter() - start)
  return out, compiled, min(runs)


def demo(args) -> None:
  f, params, x = mlp(jax.random.PRNGKey(args.seed))
  print(f"MLP 32-256-256-256-10 (relu), {x.shape[0]} examples, "
        f"JAX {jax.__version__} on {jax.devices()[0].platform}")
  reference = None
  for method in ("jacobian", "ntk_vp", "structured", "auto"):
    ntk_fn = compile_ntk(f, method=method, trace_axes=(), batch_independent=True)
    theta, first, best = _time(ntk_fn, params, x)
    chosen = ntk_fn.plan(params, x).method
    reference = theta if reference is None else reference
    diff = float(jnp.max(jnp.abs(theta - reference)) / jnp.max(jnp.abs(reference)))
    print(f"  {method:10s} -> {chosen:10s} kernel {tuple(theta.shape)}  "
          f"first call {first * 1e3:8.1f} ms  run {best * 1e3:8.2f} ms  "
          f"max rel. diff vs jacobian {diff:.1e}")
  print("Θ(x0, x1) =")
  print(np.array2string(np.asarray(reference[0, 1]), precision=3, suppress_small=True))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ntk_compiler")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("demo", help="the NTK of a small built-in MLP with every method")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(run=demo)
  args = parser.parse_args(argv)
  args.run(args)


if __name__ == "__main__":
  main()

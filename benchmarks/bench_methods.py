"""Methods side by side on the reference models; prints times and ratios from one run.

    python benchmarks/bench_methods.py [--methods jacobian,ntk_vp] [--models mlp,rnn]
                                       [--repeats 5]

Every method is timed in this process on the same inputs: the ratios, not the absolute
times, are what to compare across machines.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import ntk_compiler as nc
from ntk_compiler import cli


def mlp(key):
  return cli.mlp(key, width=512, depth=3, inputs=64, outputs=10, n=32)


def cnn(key, channels=32, image=16, outputs=10, n=16):
  k = jax.random.split(key, 4)
  params = {"c1": jax.random.normal(k[0], (3, 3, 3, channels)) / 3,
            "c2": jax.random.normal(k[1], (3, 3, channels, channels)) / (3 * channels ** .5),
            "w": jax.random.normal(k[2], (channels, outputs)) / channels ** .5}

  def f(params, x):
    dn = ("NHWC", "HWIO", "NHWC")
    y = jax.nn.relu(jax.lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME",
                                                 dimension_numbers=dn))
    y = jax.nn.relu(jax.lax.conv_general_dilated(y, params["c2"], (2, 2), "SAME",
                                                 dimension_numbers=dn))
    return y.mean(axis=(1, 2)) @ params["w"]
  return f, params, jax.random.normal(k[3], (n, image, image, 3))


def embedding(key, vocab=10000, dim=128, tokens=16, hidden=128, outputs=10, n=32):
  """Token + position embeddings, a tanh layer per token, mean pooling, readout."""
  k = jax.random.split(key, 5)
  params = {"embed": jax.random.normal(k[0], (vocab, dim)),
            "pos": jax.random.normal(k[1], (tokens, dim)),
            "w1": jax.random.normal(k[2], (dim, hidden)) / dim ** .5,
            "w2": jax.random.normal(k[3], (hidden, outputs)) / hidden ** .5}

  def f(params, x):
    h = params["embed"][x] + params["pos"]
    return jnp.tanh(h @ params["w1"]).mean(axis=1) @ params["w2"]
  return f, params, jax.random.randint(k[4], (n, tokens), 0, vocab)


def rnn(key, steps=64, hidden=256, inputs=32, outputs=10, n=32):
  """A tanh RNN under lax.scan; the last hidden state is read out."""
  k = jax.random.split(key, 5)
  params = {"wx": jax.random.normal(k[0], (inputs, hidden)) / inputs ** .5,
            "wh": jax.random.normal(k[1], (hidden, hidden)) / hidden ** .5,
            "b": jnp.zeros((hidden,)),
            "wo": jax.random.normal(k[2], (hidden, outputs)) / hidden ** .5}

  def f(params, x):
    def step(h, xt):
      return jnp.tanh(h @ params["wh"] + xt @ params["wx"] + params["b"]), None
    h0 = jnp.zeros((x.shape[0], hidden), x.dtype)
    h, _ = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    return h @ params["wo"]
  return f, params, jax.random.normal(k[3], (n, steps, inputs))


MODELS = {  # name: (description, model)
    "mlp": ("mlp 3x512, O=10, N=32, full kernel", mlp),
    "cnn": ("cnn 2 conv x32ch 16x16, O=10, N=16, full kernel", cnn),
    "embedding": ("embedding V=10000 D=128, 16 tokens, O=10, N=32, full kernel", embedding),
    "rnn": ("scan rnn 64 steps, hidden 256, O=10, N=32, full kernel", rnn)}


def bench(fn, args, repeats):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append(time.perf_counter() - start)
  return out, first, float(np.median(runs))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--methods", default="jacobian,ntk_vp,structured,auto")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--models", default=",".join(MODELS),
                      help="comma-separated names from: " + ", ".join(MODELS))
  args = parser.parse_args()
  methods = args.methods.split(",")
  print(f"JAX {jax.__version__}, {jax.devices()[0].device_kind}")
  for name in args.models.split(","):
    description, make = MODELS[name]
    f, params, x = make(jax.random.PRNGKey(0))
    print(f"\n{description}")
    times, compiles, reference = {}, {}, None
    for method in methods:
      ntk_fn = nc.compile_ntk(f, method=method, trace_axes=(), batch_independent=True)
      theta, first, run = bench(ntk_fn, (params, x), args.repeats)
      reference = theta if reference is None else reference
      err = float(jnp.max(jnp.abs(theta - reference)) / jnp.max(jnp.abs(reference)))
      times[method], compiles[method] = run, first - run
      print(f"  {method:10s} compile+run {first * 1e3:9.1f} ms   run {run * 1e3:9.2f} ms"
            f"   max rel. diff vs {methods[0]} {err:.1e}")
    base = methods[0]
    for method in methods[1:]:
      print(f"  {base} / {method}: {times[base] / times[method]:.2f}x run time, "
            f"{compiles[method] / compiles[base]:.2f}x the compile time of {base}")


if __name__ == "__main__":
  main()

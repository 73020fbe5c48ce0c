"""The eigen-spectrum and condition number of the NTK at initialisation, across
architectures.

For each architecture the empirical NTK Θ₀(X, X) of n digits (scikit-learn's 8×8
images, outputs traced) is computed at initialisation and diagonalised. Gradient descent
on the squared error moves the network along Θ₀'s eigenvectors at speeds proportional to
the eigenvalues, so the spectrum says which functions are learnt fast, and the condition
number λmax / λmin how long the slowest direction takes at the largest stable step.
The plot (ntk_spectrum.png) shows each architecture's eigenvalues divided by its largest.

    python examples/ntk_spectrum.py              # 256 digits
    python examples/ntk_spectrum.py --small      # a few seconds

Needs scikit-learn and matplotlib: pip install -e ".[examples]".
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import ntk_compiler as nc


def digits(n: int):
  """n standardised digits as (n, 8, 8, 1) images."""
  from sklearn.datasets import load_digits
  data = load_digits().data[:n].astype(np.float32) / 16.0
  data = (data - data.mean(0)) / (data.std(0) + 0.1)
  return jnp.asarray(data.reshape(n, 8, 8, 1))


def _normal(rng, shape, fan_in, gain=1.0):
  """He-style weights, float32 (the scale applied in NumPy, before the cast)."""
  return jnp.asarray(rng.normal(size=shape) * gain / np.sqrt(fan_in), jnp.float32)


def mlp(depth: int, width: int, activation):
  def f(params, x):
    h = x.reshape(x.shape[0], -1)
    for w in params[:-1]:
      h = activation(h @ w)
    return h @ params[-1]

  def init(rng):
    sizes = [64] + [width] * depth + [10]
    return [_normal(rng, (a, b), a, np.sqrt(2.0)) for a, b in zip(sizes[:-1], sizes[1:])]
  return f, init


def cnn(channels: int, pool: bool):
  dims = ("NHWC", "HWIO", "NHWC")

  def f(params, x):
    h = x
    for w in params[:-1]:
      h = jax.nn.relu(jax.lax.conv_general_dilated(h, w, (1, 1), "SAME",
                                                   dimension_numbers=dims))
    h = h.mean(axis=(1, 2)) if pool else h.reshape(h.shape[0], -1)
    return h @ params[-1]

  def init(rng):
    return [_normal(rng, (3, 3, 1, channels), 9, np.sqrt(2.0)),
            _normal(rng, (3, 3, channels, channels), 9 * channels, np.sqrt(2.0)),
            _normal(rng, (channels if pool else 64 * channels, 10),
                    channels if pool else 64 * channels)]
  return f, init


def architectures(width: int, channels: int) -> dict:
  return {
      f"MLP relu, 2 × {width}": mlp(2, width, jax.nn.relu),
      f"MLP tanh, 2 × {width}": mlp(2, width, jnp.tanh),
      f"MLP relu, 6 × {width}": mlp(6, width, jax.nn.relu),
      f"CNN, 2 conv × {channels}, flatten": cnn(channels, pool=False),
      f"CNN, 2 conv × {channels}, mean pool": cnn(channels, pool=True),
  }


def spectrum(f, params, x):
  """Θ₀(x, x)'s eigenvalues, largest first (float64), and how Θ₀ was computed."""
  ntk_fn = nc.compile_ntk(f)
  theta = np.asarray(ntk_fn(params, x), np.float64)
  eigenvalues = np.linalg.eigvalsh((theta + theta.T) / 2)[::-1]
  return eigenvalues, ntk_fn.plan(params, x).method


def plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, eigenvalues in results.items():
    positive = np.maximum(eigenvalues, 1e-16 * eigenvalues[0])
    ax.semilogy(np.arange(1, len(positive) + 1), positive / positive[0], label=name)
  ax.set_xlabel("eigenvalue index (largest first)")
  ax.set_ylabel("λ_i / λ_max")
  ax.set_title("NTK spectrum at initialisation, 8×8 digits")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--small", action="store_true", help="a few-second run")
  parser.add_argument("--n", type=int, default=None, help="number of digits")
  parser.add_argument("--out", default=".", help="directory for ntk_spectrum.png")
  args = parser.parse_args(argv)
  n = args.n or (24 if args.small else 256)
  width, channels = (32, 4) if args.small else (512, 16)
  x = digits(n)
  results, rows = {}, []
  for name, (f, init) in architectures(width, channels).items():
    params = init(np.random.default_rng(0))
    start = time.perf_counter()
    eigenvalues, method = spectrum(f, params, x)
    seconds = time.perf_counter() - start
    results[name] = eigenvalues
    count = sum(int(np.prod(w.shape)) for w in jax.tree_util.tree_leaves(params))
    rows.append((name, count, eigenvalues[0], eigenvalues[-1],
                 eigenvalues[0] / max(eigenvalues[-1], 1e-300),
                 eigenvalues.sum() ** 2 / (eigenvalues ** 2).sum(), method, seconds))
  print(f"NTK at initialisation of {n} digits (outputs traced), eigenvalues of Θ₀(X, X):")
  print(f"{'architecture':<32} {'params':>8} {'λmax':>9} {'λmin':>9} {'λmax/λmin':>10} "
        f"{'eff. rank':>9}  method")
  for name, count, top, bottom, condition, rank, method, seconds in rows:
    print(f"{name:<32} {count:>8,} {top:>9.3g} {bottom:>9.3g} {condition:>10.3g} "
          f"{rank:>9.1f}  {method} ({seconds:.2f} s)")
  print("eff. rank: (Σλ)² / Σλ², how many directions carry the kernel's weight.")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "ntk_spectrum.png"
  plot(results, path)
  print(f"plot: {path}")
  return {"spectra": results, "plot": path}


if __name__ == "__main__":
  main()

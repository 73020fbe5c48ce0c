"""How much the empirical NTK moves during training, for networks of several widths.

MLPs of increasing width (NTK parameterisation, the same learning rate for all) are
trained by full-batch gradient descent on scikit-learn's 8×8 digits. Every few steps the
empirical NTK Θ_t of a fixed probe set of digits is computed and compared with Θ₀:

    kernel distance  d(Θ₀, Θ_t) = 1 - ⟨Θ₀, Θ_t⟩ / (|Θ₀| |Θ_t|)   (Frobenius; 0: same direction)
    relative change  |Θ_t - Θ₀| / |Θ₀|

In the infinite-width limit the kernel stays put (the "lazy" regime); at finite width it
moves, less the wider the network. The plot (kernel_distance.png) shows both measures
against the training step, one line per width.

    python examples/kernel_distance.py            # widths 64, 256, 1024; 400 steps
    python examples/kernel_distance.py --small    # a few seconds

Needs scikit-learn and matplotlib: pip install -e ".[examples]".
"""

from __future__ import annotations

import argparse
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import ntk_compiler as nc


def digits(n_train: int, n_probe: int):
  from sklearn.datasets import load_digits
  data = load_digits()
  x = data.data.astype(np.float32) / 16.0
  x = (x - x.mean(0)) / (x.std(0) + 0.1)
  y = np.eye(10, dtype=np.float32)[data.target] - 0.1
  return x[:n_train], y[:n_train], x[-n_probe:]


def mlp(params, x):
  """A relu MLP in the NTK parameterisation (W·h/√fan_in): one learning rate fits all
  widths, and the kernel has a limit as the width grows."""
  for w in params[:-1]:
    x = jax.nn.relu(x @ w / math.sqrt(x.shape[-1]))
  return x @ params[-1] / math.sqrt(x.shape[-1])


def init(seed: int, width: int):
  rng = np.random.default_rng(seed)
  sizes = [64, width, width, 10]
  return [jnp.asarray(rng.normal(size=(a, b)), jnp.float32)
          for a, b in zip(sizes[:-1], sizes[1:])]


def kernel_distance(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(1.0 - np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def track(width: int, x, y, probe, lr: float, steps: int, every: int) -> dict:
  """Trains one width; returns the steps, kernel distances, relative changes, losses."""
  ntk_fn = nc.compile_ntk(mlp)
  loss = lambda p: 0.5 * jnp.mean(jnp.sum((mlp(p, x) - y) ** 2, axis=-1))

  @jax.jit
  def advance(params):  # `every` steps of gradient descent
    step = lambda p, _: (jax.tree_util.tree_map(lambda w, g: w - lr * g, p,
                                                jax.grad(loss)(p)), None)
    return jax.lax.scan(step, params, None, length=every)[0]

  params = init(0, width)
  theta0 = ntk_fn(params, probe)
  out = {"step": [0], "distance": [0.0], "change": [0.0], "loss": [float(loss(params))]}
  for t in range(every, steps + 1, every):
    params = advance(params)
    theta = ntk_fn(params, probe)
    out["step"].append(t)
    out["distance"].append(kernel_distance(theta0, theta))
    out["change"].append(float(jnp.linalg.norm(theta - theta0) / jnp.linalg.norm(theta0)))
    out["loss"].append(float(loss(params)))
  return out


def plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for width, r in results.items():
    # log scale: the distances span orders of magnitude (step 0, distance 0, left out)
    left.semilogy(r["step"][1:], r["distance"][1:], marker="o", ms=3,
                  label=f"width {width}")
    right.plot(r["step"], r["change"], marker="o", ms=3, label=f"width {width}")
  left.set_title("kernel distance 1 - ⟨Θ₀, Θ_t⟩ / |Θ₀||Θ_t|")
  right.set_title("relative change |Θ_t - Θ₀| / |Θ₀|")
  for ax in (left, right):
    ax.set_xlabel("gradient-descent step")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--small", action="store_true", help="a few-second run")
  parser.add_argument("--out", default=".", help="directory for kernel_distance.png")
  parser.add_argument("--lr", type=float, default=1.0, help="learning rate")
  args = parser.parse_args(argv)
  widths = (16, 64) if args.small else (64, 256, 1024)
  n_train, n_probe = (48, 12) if args.small else (512, 64)
  steps, every = (8, 4) if args.small else (400, 40)
  x, y, probe = digits(n_train, n_probe)
  results = {w: track(w, x, y, probe, args.lr, steps, every) for w in widths}
  print(f"NTK of {n_probe} probe digits during {steps} steps of gradient descent on "
        f"{n_train} digits (learning rate {args.lr}):")
  print(f"{'width':>6} {'loss start':>11} {'loss end':>9} {'kernel distance':>16} "
        f"{'relative change':>16}")
  for width, r in results.items():
    print(f"{width:>6} {r['loss'][0]:>11.4f} {r['loss'][-1]:>9.4f} "
          f"{r['distance'][-1]:>16.2e} {r['change'][-1]:>16.3f}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "kernel_distance.png"
  plot(results, path)
  print(f"plot: {path}")
  return {"results": results, "plot": path}


if __name__ == "__main__":
  main()

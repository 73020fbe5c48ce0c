"""NTK kernel regression on scikit-learn's 8×8 digits, against the trained network.

A wide MLP in the NTK parameterisation is trained by full-batch gradient descent on the
squared error. Its empirical NTK at initialisation, Θ₀, predicts what that training
does while the network stays close to its linearisation:

    f_t(x) = f₀(x) + Θ₀(x, X) Θ₀(X, X)⁻¹ (I - exp(-η t Θ₀(X, X) / n)) (Y - f₀(X))

(X, Y the n training examples and one-hot targets, η the learning rate, t the step), and
kernel regression is its t → ∞ limit. The script prints the test accuracy of the trained
network, of the linearised prediction at the same step and of kernel regression, and how
far the network's test outputs are from the linearised ones.

    python examples/kernel_regression_digits.py            # 1000 training digits, width 512
    python examples/kernel_regression_digits.py --small    # a few seconds

Needs scikit-learn (its bundled digits: no download): pip install -e ".[examples]".
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import ntk_compiler as nc


def load_digits(n_train: int, n_test: int, seed: int = 0):
  """Standardised 64-pixel digits and one-hot targets (centred), split at random."""
  from sklearn.datasets import load_digits as sklearn_digits
  digits = sklearn_digits()
  order = np.random.default_rng(seed).permutation(len(digits.target))
  x = digits.data[order].astype(np.float32) / 16.0
  x = (x - x.mean(0)) / (x.std(0) + 0.1)
  y = np.eye(10, dtype=np.float32)[digits.target[order]] - 0.1
  train, test = slice(0, n_train), slice(n_train, n_train + n_test)
  return x[train], y[train], x[test], y[test]


def mlp(params, x):
  """A relu MLP in the NTK parameterisation: each layer is W·h/√fan_in + b/10."""
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] / math.sqrt(x.shape[-1]) + layer["b"] / 10)
  return x @ params[-1]["w"] / math.sqrt(x.shape[-1]) + params[-1]["b"] / 10


def init(seed: int, sizes):
  rng = np.random.default_rng(seed)
  return [{"w": jnp.asarray(rng.normal(size=(a, b)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=b), jnp.float32)}
          for a, b in zip(sizes[:-1], sizes[1:])]


def train(params, x, y, lr: float, steps: int):
  """Full-batch gradient descent on ½·mean over examples of |f(x) - y|²."""
  loss = lambda p: 0.5 * jnp.mean(jnp.sum((mlp(p, x) - y) ** 2, axis=-1))

  @jax.jit
  def run(params):
    step = lambda p, _: (jax.tree_util.tree_map(lambda w, g: w - lr * g, p,
                                                jax.grad(loss)(p)), None)
    return jax.lax.scan(step, params, None, length=steps)[0]
  return run(params)


def linearised(theta_train, theta_test, residual, lr: float, steps: int | None):
  """f - f₀ on the test set by the kernel: at step `steps` of gradient descent, or
  (steps None) kernel regression. Float64, through the eigenbasis of Θ₀(X, X)."""
  n = theta_train.shape[0]
  eigenvalues, vectors = np.linalg.eigh(np.asarray(theta_train, np.float64))
  eigenvalues = np.maximum(eigenvalues, 1e-12 * eigenvalues.max())
  if steps is None:
    gain = 1.0 / eigenvalues
  else:  # Σ over steps of GD on the linear model: (1 - (1 - η λ / n)^t) / λ
    gain = (1.0 - (1.0 - lr * eigenvalues / n) ** steps) / eigenvalues
  coefficients = vectors @ (gain[:, None] * (vectors.T @ np.asarray(residual, np.float64)))
  return np.asarray(theta_test, np.float64) @ coefficients


def accuracy(outputs, y) -> float:
  return float(np.mean(np.argmax(outputs, -1) == np.argmax(y, -1)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--small", action="store_true", help="a few-second run")
  parser.add_argument("--train", type=int, default=None, help="training digits")
  parser.add_argument("--width", type=int, default=None, help="hidden width")
  parser.add_argument("--steps", type=int, default=None, help="gradient-descent steps")
  args = parser.parse_args(argv)
  n_train = args.train or (60 if args.small else 1000)
  width = args.width or (64 if args.small else 512)
  steps = args.steps or (30 if args.small else 1000)
  n_test = 40 if args.small else 500

  x, y, x_test, y_test = load_digits(n_train, n_test)
  params = init(0, [64, width, width, 10])
  # The NTK with the outputs traced (the default trace_axes=(-1,)): Θ(x, x') is the mean
  # over the 10 outputs; for a wide network Θ is this times the identity on outputs.
  ntk_fn = nc.compile_ntk(mlp)
  start = time.perf_counter()
  theta_train = ntk_fn(params, x)              # (n_train, n_train)
  theta_test = ntk_fn(params, x_test, x)       # (n_test, n_train)
  kernel_time = time.perf_counter() - start
  print(f"MLP 64-{width}-{width}-10, {n_train} training and {n_test} test digits; NTK by "
        f"{ntk_fn.plan(params, x).method} in {kernel_time:.2f} s")

  lr = float(n_train / np.linalg.eigvalsh(np.asarray(theta_train, np.float64)).max())
  predict = jax.jit(mlp)
  f0, f0_test = predict(params, x), predict(params, x_test)
  trained = train(params, x, y, lr, steps)
  net_test = np.asarray(predict(trained, x_test))
  lin_test = np.asarray(f0_test) + linearised(theta_train, theta_test, y - f0, lr, steps)
  ridge_test = np.asarray(f0_test) + linearised(theta_train, theta_test, y - f0, lr, None)
  gap = float(np.linalg.norm(net_test - lin_test) / np.linalg.norm(net_test - f0_test))
  results = {"trained network": accuracy(net_test, y_test),
             f"NTK, linearised at step {steps}": accuracy(lin_test, y_test),
             "NTK kernel regression (t → ∞)": accuracy(ridge_test, y_test)}
  print(f"{steps} steps of gradient descent, learning rate {lr:.3g} (= n / λmax(Θ₀)):")
  for name, value in results.items():
    print(f"  test accuracy, {name:<34} {value:.3f}")
  print(f"  |f_net - f_lin| / |f_net - f₀| on the test set: {gap:.3f} (0 = the network "
        "moved exactly as its linearisation)")
  return {"accuracy": results, "relative_gap": gap, "kernel_seconds": kernel_time}


if __name__ == "__main__":
  main()

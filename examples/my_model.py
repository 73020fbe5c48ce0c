"""A model file for the command line: `python -m ntk_compiler explain examples/my_model.py:make`.

The command line imports this file and calls the function named after the colon; it
returns (f, params, x1), or (f, params, x1, x2) for a kernel between two batches.
"""

import jax
import jax.numpy as jnp
import numpy as np


def cnn(params, x):
  """A small convolutional network: (N, 8, 8, 1) images -> (N, 10) logits."""
  dims = ("NHWC", "HWIO", "NHWC")
  h = jax.lax.conv_general_dilated(x, params["conv1"], (1, 1), "SAME",
                                   dimension_numbers=dims)
  h = jax.nn.relu(h)
  h = jax.lax.conv_general_dilated(h, params["conv2"], (2, 2), "SAME",
                                   dimension_numbers=dims)
  h = jax.nn.relu(h).reshape(x.shape[0], -1)
  return h @ params["dense"] + params["bias"]


def init(seed=0, channels=8):
  """He-style random weights (NumPy's generator: no JAX program to compile)."""
  rng = np.random.default_rng(seed)
  normal = lambda shape, fan_in: jnp.asarray(rng.normal(size=shape) / np.sqrt(fan_in),
                                             jnp.float32)
  return {"conv1": normal((3, 3, 1, channels), 9),
          "conv2": normal((3, 3, channels, channels), 9 * channels),
          "dense": normal((4 * 4 * channels, 10), 16 * channels),
          "bias": jnp.zeros(10)}


def make():
  """The kernel of 6 images with themselves."""
  rng = np.random.default_rng(1)
  return cnn, init(), jnp.asarray(rng.normal(size=(6, 8, 8, 1)), jnp.float32)


def make_pair():
  """The kernel between 6 and 4 images."""
  f, params, x1 = make()
  x2 = np.random.default_rng(2).normal(size=(4, 8, 8, 1))
  return f, params, x1, jnp.asarray(x2, jnp.float32)

"""The test zoo: small models, each with its parameters and inputs drawn from a seed."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Model:
  name: str
  f: Callable[[Any, Any], Any]
  init: Callable[[jax.Array, Any], Any]       # (key, dtype) -> params
  inputs: Callable[[jax.Array, int, Any], Any]  # (key, n, dtype) -> x
  out_ndim: int
  batch_independent: bool = True

  def draw(self, seed, n1, n2, dtype):
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return self.init(k0, dtype), self.inputs(k1, n1, dtype), self.inputs(k2, n2, dtype)


def _normal(key, shape, dtype, scale=1.0):
  return scale * jax.random.normal(key, shape, dtype)


def _dense_init(key, sizes, dtype):
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": _normal(k, (a, b), dtype, a ** -0.5), "b": _normal(k, (b,), dtype, 0.1)}
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp(act=jnp.tanh, sizes=(3, 7, 5, 4)):
  def f(params, x):
    for layer in params[:-1]:
      x = act(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]
  return Model(f"mlp_{getattr(act, '__name__', 'act')}", f,
               lambda k, dt: _dense_init(k, sizes, dt),
               lambda k, n, dt: _normal(k, (n, sizes[0]), dt), out_ndim=2)


def _avg_pool(x, window, stride):
  dims, strides = (1, window, window, 1), (1, stride, stride, 1)
  total = lax.reduce_window(x, 0.0, lax.add, dims, strides, "VALID")
  return total / (window * window)


def cnn():
  """Strided SAME conv, VALID conv with dilation, average and max pooling, dense head."""
  def f(params, x):
    y = lax.conv_general_dilated(x, params["c1"], (2, 2), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.relu(y + params["b1"])
    y = _avg_pool(y, 2, 1)
    y = lax.conv_general_dilated(y, params["c2"], (1, 1), "VALID", rhs_dilation=(1, 1),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jnp.tanh(y)
    y = lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "VALID")
    y = y.reshape(y.shape[0], -1)
    return y @ params["w"]

  def init(key, dtype):
    k = jax.random.split(key, 4)
    return {"c1": _normal(k[0], (3, 3, 2, 4), dtype, 0.3),
            "b1": _normal(k[1], (4,), dtype, 0.1),
            "c2": _normal(k[2], (2, 2, 4, 3), dtype, 0.3),
            "w": _normal(k[3], (3 * 2 * 2, 3), dtype, 0.3)}
  return Model("cnn", f, init, lambda k, n, dt: _normal(k, (n, 10, 10, 2), dt), out_ndim=2)


def pytree_params():
  """Params as a dict of lists (and a tuple), inputs as a dict."""
  def f(params, x):
    h = jnp.tanh(x["a"] @ params["enc"][0] + params["enc"][1])
    h = h * jax.nn.sigmoid(x["b"] @ params["gate"][0])
    return h @ params["head"][0]

  def init(key, dtype):
    k = jax.random.split(key, 4)
    return {"enc": [_normal(k[0], (3, 6), dtype, 0.5), _normal(k[1], (6,), dtype, 0.1)],
            "gate": (_normal(k[2], (2, 6), dtype),),
            "head": [_normal(k[3], (6, 3), dtype, 0.4)]}

  def inputs(key, n, dtype):
    ka, kb = jax.random.split(key)
    return {"a": _normal(ka, (n, 3), dtype), "b": _normal(kb, (n, 2), dtype)}
  return Model("pytree_params", f, init, inputs, out_ndim=2)


def sequence(time=4):
  """f → (N, T, O): per-token layers and a causal running mean across tokens."""
  def f(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    h = jnp.cumsum(h, axis=1) / jnp.arange(1, x.shape[1] + 1, dtype=h.dtype)[:, None]
    return h @ params["w2"]

  def init(key, dtype):
    k = jax.random.split(key, 3)
    return {"w1": _normal(k[0], (3, 5), dtype, 0.6), "b1": _normal(k[1], (5,), dtype, 0.1),
            "w2": _normal(k[2], (5, 3), dtype, 0.5)}
  return Model("sequence", f, init, lambda k, n, dt: _normal(k, (n, time, 3), dt),
               out_ndim=3)


def batch_mixing():
  """Normalises with the batch's own mean and variance: examples interact."""
  def f(params, x):
    h = x @ params["w1"]
    h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1.0)
    return jnp.tanh(h) @ params["w2"]

  def init(key, dtype):
    k = jax.random.split(key)
    return {"w1": _normal(k[0], (3, 5), dtype, 0.6), "w2": _normal(k[1], (5, 2), dtype)}
  return Model("batch_mixing", f, init, lambda k, n, dt: _normal(k, (n, 3), dt),
               out_ndim=2, batch_independent=False)


def multi_output():
  """A pytree of outputs: one kernel per output leaf."""
  def f(params, x):
    h = jnp.tanh(x @ params["w"])
    return {"logits": h @ params["a"], "aux": [h @ params["b"]]}

  def init(key, dtype):
    k = jax.random.split(key, 3)
    return {"w": _normal(k[0], (3, 4), dtype), "a": _normal(k[1], (4, 2), dtype),
            "b": _normal(k[2], (4, 3), dtype)}
  return Model("multi_output", f, init, lambda k, n, dt: _normal(k, (n, 3), dt),
               out_ndim=2)


ZOO = [mlp(jnp.tanh), mlp(jax.nn.relu), mlp(jax.nn.gelu), cnn(), pytree_params(),
       sequence(), batch_mixing(), multi_output()]

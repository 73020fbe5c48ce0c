"""Models with control flow and user derivative rules: scan (RNN, stacked layers,
`lax.map`, nested, reversed), cond / switch, while with a fixed trip count, checkpoint,
custom_vjp and custom_jvp (also applied directly to a parameter).

Each is small and draws its parameters and inputs from a seed, like `models.py`.
"""

import jax
import jax.numpy as jnp
from jax import lax

from models import Model
from models_structured import _model, _params


def stacked_layers():
  """A loop over layers with stacked weights (scan over the leading axis of w, b)."""
  def f(p, x):
    def layer(h, wb):
      w, b = wb
      return jnp.tanh(h @ w + b), None
    h, _ = lax.scan(layer, x, (p["w"], p["b"]))
    return h @ p["out"]
  return _model("stacked_layers", f,
                {"w": ((3, 4, 4), 0.5), "b": ((3, 4), 0.1), "out": ((4, 2), 0.5)}, (4,))


def map_over_time():
  """lax.map over a time axis, then a sum."""
  def f(p, x):
    ys = lax.map(lambda xt: jnp.tanh(xt @ p["w"]) @ p["v"], jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1).sum(axis=1)
  return _model("map_over_time", f, {"w": ((3, 4), 0.5), "v": ((4, 2), 0.5)}, (3, 3))


def nested_scans():
  """A scan inside a scan body, both closing over the weights; the outer reversed."""
  def f(p, x):
    def outer(h, _):
      def inner(g, _):
        return jnp.tanh(g @ p["w"]), g.sum(axis=-1)
      g, s = lax.scan(inner, h, None, length=2)
      return g @ p["v"], s
    h, s = lax.scan(outer, x, None, length=3, reverse=True)
    return h + jnp.moveaxis(s, -1, 0)[:, :, :1].sum(axis=1) * p["u"]
  return _model("nested_scans", f, {"w": ((3, 3), 0.5), "v": ((3, 3), 0.5),
                                    "u": ((3,), 0.5)}, (3,))


def gru_like():
  """A gated recurrence (products of per-step values) with a checkpointed step."""
  def f(p, x):
    @jax.checkpoint
    def step(h, xt):
      z = jax.nn.sigmoid(xt @ p["wz"] + h @ p["uz"])
      c = jnp.tanh(xt @ p["wc"] + (z * h) @ p["uc"])
      h = (1 - z) * h + z * c
      return h, h
    _, hs = lax.scan(step, jnp.zeros((x.shape[0], 3), x.dtype), jnp.swapaxes(x, 0, 1))
    return hs[-1] @ p["out"]
  return _model("gru_like", f, {"wz": ((2, 3), 0.5), "uz": ((3, 3), 0.5),
                                "wc": ((2, 3), 0.5), "uc": ((3, 3), 0.5),
                                "out": ((3, 2), 0.5)}, (4, 2))


def switch_layers():
  """lax.switch on an index computed from the input (per example), and a cond."""
  def f(p, x):
    index = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0).astype(jnp.int32)
    def one(i, xi):
      return lax.switch(i, [lambda h: jnp.tanh(h @ p["a"]),
                            lambda h: jnp.sin(h @ p["b"]) * 2,
                            lambda h: h @ p["a"] + h @ p["b"]], xi)
    h = jax.vmap(one)(index, x)
    h = lax.cond(True, lambda h: jnp.tanh(h @ p["c"]), lambda h: h, h)
    return h @ p["v"]
  return _model("switch_layers", f, {"a": ((3, 4), 0.5), "b": ((3, 4), 0.5),
                                     "c": ((4, 4), 0.5), "v": ((4, 2), 0.5)}, (3,))


def cond_on_batch():
  """cond on a statistic of the whole batch (so examples mix: whole-batch mode), and a
  cond on a parameter: the weights are followed into both branches."""
  def f(p, x):
    h = lax.cond(x.sum() > 0, lambda h: jnp.tanh(h @ p["a"]), lambda h: h @ p["b"] * 2, x)
    h = lax.cond(p["gate"].sum() > 0, lambda h: h @ p["c"], lambda h: jnp.sin(h), h)
    return h @ p["v"]
  return Model("cond_on_batch", f, lambda k, dt: _params(
      k, dt, a=((3, 4), 0.5), b=((3, 4), 0.5), c=((4, 4), 0.5), v=((4, 2), 0.5),
      gate=((2,), 1.0)), lambda k, n, dt: jax.random.normal(k, (n, 3), dt), 2,
      batch_independent=False)


def while_fixed_trips():
  """A while loop over layers whose trip count is fixed (rewritten as a scan)."""
  def f(p, x):
    def body(c):
      i, h = c
      return i + 1, jnp.tanh(h @ p["w"][i])
    _, h = lax.while_loop(lambda c: c[0] < 3, body, (0, x))
    return h @ p["v"]
  return _model("while_fixed_trips", f, {"w": ((3, 4, 4), 0.5), "v": ((4, 2), 0.5)}, (4,))


@jax.custom_vjp
def _scaled_grad(w):
  return w


_scaled_grad.defvjp(lambda w: (w, None), lambda _, g: (0.5 * g,))


@jax.custom_jvp
def _soft_clip(w):
  return jnp.tanh(w)


_soft_clip.defjvp(lambda primals, tangents: (
    jnp.tanh(primals[0]), tangents[0] * (1 - jnp.tanh(primals[0]) ** 2) * 0.9))


def custom_gradients():
  """custom_vjp applied directly to a weight (its backward halves the gradient), a
  custom_jvp of a weight with a user rule, and jax.nn.gelu (custom_jvp inside)."""
  def f(p, x):
    h = jax.nn.gelu(x @ _scaled_grad(p["w"]))
    return jnp.tanh(h @ _soft_clip(p["u"])) @ p["v"]
  return _model("custom_gradients", f, {"w": ((3, 4), 0.5), "u": ((4, 4), 0.5),
                                        "v": ((4, 2), 0.5)}, (3,))


ZOO = [stacked_layers(), map_over_time(), nested_scans(), gru_like(), switch_layers(),
       cond_on_batch(), while_fixed_trips(), custom_gradients()]

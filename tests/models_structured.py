"""More models for the structured engine: convolutions, pooling, a ResNet block, attention,
and parameters used through transposes, casts, reshapes, ties, calls and closures.

Each is small (widths 3-8, a few examples) and draws its parameters and inputs from a
seed, like the zoo in `models.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from models import Model

NHWC = ("NHWC", "HWIO", "NHWC")


def _normal(key, shape, dtype, scale=1.0):
  return scale * jax.random.normal(key, shape, dtype)


def _params(key, dtype, **shapes):
  """{name: N(0, scale^2) array} from {name: (shape, scale)}."""
  keys = jax.random.split(key, len(shapes))
  return {name: _normal(k, shape, dtype, scale)
          for k, (name, (shape, scale)) in zip(keys, sorted(shapes.items()))}


def _vectors(shape):
  return lambda k, n, dt: _normal(k, (n,) + shape, dt)


def _model(name, f, shapes, in_shape, out_ndim=2, batch_independent=True):
  return Model(name, f, lambda k, dt: _params(k, dt, **shapes), _vectors(in_shape),
               out_ndim, batch_independent)


def _flatten(y):
  return y.reshape(y.shape[0], -1)


# ------------------------------------------------------------------------- convolutions

def conv_strided_same():
  def f(p, x):
    y = lax.conv_general_dilated(x, p["c"], (2, 2), "SAME", dimension_numbers=NHWC)
    return _flatten(jnp.tanh(y + p["b"])) @ p["w"]
  return _model("conv_strided_same", f,
                {"c": ((3, 3, 2, 4), 0.4), "b": ((4,), 0.1), "w": ((36, 3), 0.2)},
                (6, 6, 2))


def conv_explicit_padding():
  """VALID then explicit asymmetric padding with unequal strides."""
  def f(p, x):
    y = lax.conv_general_dilated(x, p["c1"], (1, 1), "VALID", dimension_numbers=NHWC)
    y = jax.nn.relu(y)
    y = lax.conv_general_dilated(y, p["c2"], (2, 1), ((1, 2), (0, 1)),
                                 dimension_numbers=NHWC)
    return _flatten(y) @ p["w"]
  return _model("conv_explicit_padding", f,
                {"c1": ((2, 2, 2, 3), 0.4), "c2": ((3, 2, 3, 2), 0.4), "w": ((24, 3), 0.2)},
                (6, 5, 2))


def conv_rhs_dilation():
  def f(p, x):
    y = lax.conv_general_dilated(x, p["c"], (1, 1), "SAME", rhs_dilation=(2, 2),
                                 dimension_numbers=NHWC)
    y = lax.conv_general_dilated(jnp.tanh(y), p["c2"], (1, 1), "VALID",
                                 rhs_dilation=(2, 1), dimension_numbers=NHWC)
    return _flatten(y) @ p["w"]
  return _model("conv_rhs_dilation", f,
                {"c": ((3, 3, 2, 3), 0.4), "c2": ((2, 2, 3, 2), 0.4), "w": ((32, 3), 0.2)},
                (6, 5, 2))


def conv_grouped():
  """feature_group_count=2: 4 input channels in 2 groups, 6 output features."""
  def f(p, x):
    y = lax.conv_general_dilated(x, p["c"], (1, 1), "SAME", feature_group_count=2,
                                 dimension_numbers=NHWC)
    return _flatten(jnp.tanh(y)) @ p["w"]
  return _model("conv_grouped", f, {"c": ((3, 3, 2, 6), 0.4), "w": ((6 * 16, 3), 0.1)},
                (4, 4, 4))


def conv_depthwise():
  """feature_group_count = input channels, channel multiplier 2, then a 1x1 conv."""
  def f(p, x):
    y = lax.conv_general_dilated(x, p["dw"], (1, 1), "SAME", feature_group_count=3,
                                 dimension_numbers=NHWC)
    y = jax.nn.relu(y)
    y = lax.conv_general_dilated(y, p["pw"], (1, 1), "VALID", dimension_numbers=NHWC)
    return _flatten(y) @ p["w"]
  return _model("conv_depthwise", f,
                {"dw": ((3, 3, 1, 6), 0.4), "pw": ((1, 1, 6, 2), 0.4), "w": ((32, 3), 0.2)},
                (4, 4, 3))


def conv_nchw():
  """NCHW inputs and OIHW kernels."""
  def f(p, x):
    y = lax.conv_general_dilated(x, p["c"], (1, 2), ((1, 1), (1, 1)),
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
    y = jnp.tanh(y + p["b"][:, None, None])
    return _flatten(y) @ p["w"]
  return _model("conv_nchw", f,
                {"c": ((4, 2, 3, 3), 0.4), "b": ((4,), 0.1), "w": ((4 * 5 * 3, 3), 0.1)},
                (2, 5, 5))


def conv1d_sequence():
  """A 1-D conv keeps its spatial axis in the output: f → (N, W, O)."""
  def f(p, x):
    y = lax.conv_general_dilated(x, p["c"], (1,), "SAME",
                                 dimension_numbers=("NWC", "WIO", "NWC"))
    return jnp.tanh(y + p["b"]) @ p["w"]
  return _model("conv1d_sequence", f,
                {"c": ((3, 3, 4), 0.5), "b": ((4,), 0.1), "w": ((4, 3), 0.5)},
                (5, 3), out_ndim=3)



def conv_transpose():
  """A transposed conv (lhs dilation, SAME) then a conv with lhs_dilation and padding."""
  def f(p, x):
    y = jnp.tanh(lax.conv_transpose(x, p["c"], (2, 2), "SAME", dimension_numbers=NHWC))
    y = lax.conv_general_dilated(y, p["c2"], (1, 1), ((0, 0), (1, 0)), lhs_dilation=(2, 1),
                                 dimension_numbers=NHWC)
    return _flatten(y) @ p["w"]
  return _model("conv_transpose", f,
                {"c": ((3, 3, 2, 3), 0.4), "c2": ((2, 2, 3, 2), 0.4), "w": ((120, 3), 0.1)},
                (3, 3, 2))


def conv_param_lhs():
  """The parameter is the conv's lhs (a learned image); each example is a kernel."""
  def f(p, x):
    kernel = jnp.moveaxis(x, 0, -1)  # (kh, kw, C, N)
    y = lax.conv_general_dilated(p["img"], kernel, (1, 1), "VALID", dimension_numbers=NHWC)
    return _flatten(jnp.tanh(jnp.moveaxis(y[0], -1, 0))) @ p["w"]
  return _model("conv_param_lhs", f, {"img": ((1, 4, 4, 2), 1.0), "w": ((9, 2), 0.3)},
                (2, 2, 2))

def _avg_pool_lax(y, window, stride, padding="VALID"):
  dims, strides = (1, window, window, 1), (1, stride, stride, 1)
  return lax.reduce_window(y, 0.0, lax.add, dims, strides, padding) / (window * window)


def _avg_pool_flax(y, window, strides, padding):
  """flax.linen.avg_pool with count_include_pad=False: the window sum divided by the
  number of entries each window covers (a constant array)."""
  dims, strd = (1,) + window + (1,), (1,) + strides + (1,)
  if not isinstance(padding, str):
    padding = ((0, 0),) + tuple(padding) + ((0, 0),)
  total = jax.lax.reduce_window(y, 0.0, jax.lax.add, dims, strd, padding)
  ones = jnp.ones((1,) + y.shape[1:3] + (1,), y.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strd, padding)
  return total / count


def avg_pools():
  def f(p, x):
    y = lax.conv_general_dilated(x, p["c"], (1, 1), "SAME", dimension_numbers=NHWC)
    y = _avg_pool_lax(jnp.tanh(y), 2, 1)
    y = _avg_pool_flax(y, (2, 2), (2, 2), "SAME")
    y = _avg_pool_flax(y, (3, 2), (1, 1), ((1, 1), (0, 1)))
    return _flatten(y) @ p["w"]
  return _model("avg_pools", f, {"c": ((3, 3, 2, 3), 0.4), "w": ((27, 2), 0.3)},
                (6, 6, 2))


# --------------------------------------------------------------------- ResNet, attention

def _channel_norm(y, eps=1e-3):
  mean = y.mean(-1, keepdims=True)
  var = ((y - mean) ** 2).mean(-1, keepdims=True)
  return (y - mean) / jnp.sqrt(var + eps)


def resnet_block():
  """conv -> channel norm (scale, bias) -> relu -> conv -> + skip -> relu -> pool -> head."""
  def f(p, x):
    h = lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME", dimension_numbers=NHWC)
    h = jax.nn.relu(_channel_norm(h) * p["g"] + p["b"])
    h = lax.conv_general_dilated(h, p["c2"], (1, 1), "SAME", dimension_numbers=NHWC)
    y = jax.nn.relu(h + x)
    return y.mean((1, 2)) @ p["w"]
  return _model("resnet_block", f,
                {"c1": ((3, 3, 4, 4), 0.3), "g": ((4,), 0.2), "b": ((4,), 0.1),
                 "c2": ((3, 3, 4, 4), 0.3), "w": ((4, 3), 0.5)},
                (5, 5, 4))


def _layer_norm(h, g, b, eps=1e-3):
  return _channel_norm(h, eps) * (1.0 + g) + b


def transformer(heads=1, causal=False, time=3, dim=4):
  """A pre-LN block on (N, T, D): attention from one fused qkv weight (softmax, optional
  causal mask), gelu MLP, residuals; then a per-token head → (N, T, O)."""
  dh = dim // heads
  mask = np.tril(np.ones((time, time), bool))

  def attention(p, h):
    q, k, v = jnp.split(h @ p["qkv"], 3, axis=-1)
    split = lambda a: a.reshape(a.shape[:2] + (heads, dh))
    s = jnp.einsum("nthd,nshd->nhts", split(q), split(k)) / np.sqrt(dh)
    if causal:
      s = jnp.where(mask, s, -1e9)
    a = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("nhts,nshd->nthd", a, split(v)).reshape(h.shape) @ p["wo"]

  def f(p, x):
    x = x + attention(p, _layer_norm(x, p["g1"], p["b1"]))
    h = jax.nn.gelu(_layer_norm(x, p["g2"], p["b2"]) @ p["w1"])
    x = x + h @ p["w2"]
    return x @ p["out"]

  s = dim ** -0.5
  shapes = {"qkv": ((dim, 3 * dim), s), "wo": ((dim, dim), s), "g1": ((dim,), 0.1),
            "b1": ((dim,), 0.1), "g2": ((dim,), 0.1), "b2": ((dim,), 0.1),
            "w1": ((dim, 5), s), "w2": ((5, dim), 0.5), "out": ((dim, 3), s)}
  name = f"transformer_{heads}head" + ("_causal" if causal else "")
  return _model(name, f, shapes, (time, dim), out_ndim=3)



def cls_token():
  """A learned token broadcast over the batch and concatenated before the inputs'
  tokens, learned positions, then the token's and the mean of the others' heads."""
  def f(p, x):
    h = x @ p["emb"] + p["pos"]
    cls = jnp.broadcast_to(p["cls"], (x.shape[0], 1, h.shape[-1]))
    h = jnp.tanh(jnp.concatenate([cls, h], axis=1) @ p["w"])
    return h[:, 0] @ p["head"] + h[:, 1:].mean(1) @ p["head"]
  return _model("cls_token", f, {"emb": ((3, 4), 0.5), "pos": ((3, 4), 0.3),
                                 "cls": ((4,), 0.5), "w": ((4, 4), 0.5),
                                 "head": ((4, 2), 0.5)}, (3, 3))


def rnn_scan():
  """A tanh RNN under lax.scan: the weights are followed into the step, stacked."""
  def f(p, x):
    def step(h, xt):
      h = jnp.tanh(h @ p["wh"] + xt @ p["wx"] + p["b"])
      return h, h @ p["wo"]
    _, ys = lax.scan(step, jnp.zeros((x.shape[0], 4), x.dtype), jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1)
  return _model("rnn_scan", f, {"wh": ((4, 4), 0.5), "wx": ((3, 4), 0.5), "b": ((4,), 0.1),
                                "wo": ((4, 2), 0.5)}, (3, 3), out_ndim=3)

# ---------------------------------------------------------- parameters used indirectly

def tied():
  """One square weight in two layers, and `x @ v` then `h @ v.T`."""
  def f(p, x):
    h = jnp.tanh(x @ p["v"])
    h = jnp.tanh(h @ p["t"] + p["b"])
    h = jnp.tanh(h @ p["t"])
    return h @ p["v"].T @ p["w"]
  return _model("tied", f, {"v": ((3, 5), 0.5), "t": ((5, 5), 0.5), "b": ((5,), 0.1),
                            "w": ((3, 2), 0.5)}, (3,))


def transformed_weights():
  """Weights used after w.T, 0.5 * w, w / 3, -w and a reshape."""
  def f(p, x):
    h = jnp.tanh(x @ p["wt"].T)
    h = jnp.tanh(h @ (0.5 * p["ws"]) + p["b"] / 3)
    h = jnp.tanh(h @ (p["wd"] / 3))
    h = jnp.tanh(h @ -p["wn"])
    return h @ p["wr"].reshape(4, 3)
  return _model("transformed_weights", f,
                {"wt": ((5, 3), 0.5), "ws": ((5, 4), 0.8), "b": ((4,), 0.1),
                 "wd": ((4, 4), 1.0), "wn": ((4, 4), 0.5), "wr": ((2, 6), 0.5)}, (3,))


def cast_float32():
  """`x @ w.astype(float32)` in a float64 model. The cotangent at w's float32 copy is
  rounded to float32 by reverse mode (the oracle) but not by the structured engine,
  which contracts around the cast: the two agree to float32 precision only."""
  def f(p, x):
    h = jnp.tanh(x @ p["w1"].astype(jnp.float32))
    return h @ p["w2"]
  return _model("cast_float32", f, {"w1": ((3, 5), 0.6), "w2": ((5, 2), 0.5)}, (3,))


def cast_bfloat16():
  """A bfloat16 layer between float64 ones: activations and weights cast down and back."""
  def f(p, x):
    h = jnp.tanh(x @ p["w1"])
    h = h.astype(jnp.bfloat16) @ p["w2"].astype(jnp.bfloat16)
    return jnp.tanh(h.astype(x.dtype)) @ p["w3"]
  return _model("cast_bfloat16", f,
                {"w1": ((3, 5), 0.6), "w2": ((5, 4), 0.5), "w3": ((4, 2), 0.5)}, (3,))


def lora():
  """`x @ (a @ b)` and `x @ (w + a2 @ b2)`: weights built from two parameters."""
  def f(p, x):
    h = jnp.tanh(x @ (p["a"] @ p["b"]))
    return h @ (p["w"] + p["a2"] @ p["b2"])
  return _model("lora", f,
                {"a": ((3, 2), 0.6), "b": ((2, 5), 0.6), "w": ((5, 3), 0.4),
                 "a2": ((5, 2), 0.3), "b2": ((2, 3), 0.3)}, (3,))


def token_bias():
  """(N, T, D) tokens: a bias broadcast over tokens and a per-token weight."""
  def f(p, x):
    h = jnp.tanh(x @ p["w"] + p["b"])
    h = h * p["pos"] + p["tb"][None, :, None]
    return h @ p["o"]
  return _model("token_bias", f,
                {"w": ((3, 5), 0.6), "b": ((5,), 0.1), "pos": ((4, 5), 1.0),
                 "tb": ((4,), 0.2), "o": ((5, 2), 0.5)}, (4, 3), out_ndim=3)


def closed_over_constants():
  """A fixed projection matrix and a 0/1 mask captured by f."""
  rng = np.random.default_rng(7)
  proj = rng.normal(size=(3, 4)) / 2
  mask = (rng.uniform(size=(4, 5)) < 0.6).astype(np.float64)

  def f(p, x):
    h = jnp.tanh((x @ proj) @ (p["w"] * mask))
    return (h * mask[0]) @ p["v"]
  return _model("closed_over_constants", f, {"w": ((4, 5), 0.6), "v": ((5, 2), 0.5)},
                (3,))


def einsum_layers():
  def f(p, x):
    h = jnp.tanh(jnp.einsum("ntd,de->nte", x, p["w"]))
    h = jnp.tanh(jnp.einsum("nte,hef->nthf", h, p["heads"]))
    h = jnp.einsum("nthf,hf,t->nth", h, p["mix"], p["time"])
    return jnp.einsum("nth,ho->nto", h, p["out"])
  return _model("einsum_layers", f,
                {"w": ((3, 4), 0.6), "heads": ((2, 4, 3), 0.5), "mix": ((2, 3), 0.5),
                 "time": ((4,), 1.0), "out": ((2, 3), 0.7)}, (4, 3), out_ndim=3)


def remat():
  layer = lambda w, b, h: jnp.tanh(h @ w + b)

  def f(p, x):
    h = jax.checkpoint(layer)(p["w1"], p["b1"], x)
    h = jax.remat(layer, prevent_cse=False)(p["w2"], p["b2"], h)
    return h @ p["w3"]
  return _model("remat", f, {"w1": ((3, 5), 0.6), "b1": ((5,), 0.1), "w2": ((5, 4), 0.5),
                             "b2": ((4,), 0.1), "w3": ((4, 2), 0.5)}, (3,))


def inner_jit():
  @jax.jit
  def layer(w, b, h):
    return jnp.tanh(h @ w + b)

  def f(p, x):
    h = layer(p["w1"], p["b1"], x)
    h = jax.jit(lambda q, h: layer(q["w2"], q["b2"], h) @ q["w3"])(p, h)
    return h
  return _model("inner_jit", f, {"w1": ((3, 5), 0.6), "b1": ((5,), 0.1),
                                 "w2": ((5, 4), 0.5), "b2": ((4,), 0.1),
                                 "w3": ((4, 2), 0.5)}, (3,))


def temperature():
  """A learned scalar: logits scaled by it and divided by a learned temperature."""
  def f(p, x):
    h = jnp.tanh(x @ p["w"]) * p["gain"]
    return jax.nn.softmax((h @ p["v"]) / p["temp"], axis=-1)

  def init(key, dtype):
    params = _params(key, dtype, w=((3, 5), 0.6), v=((5, 3), 0.6), gain=((), 0.3))
    params["temp"] = jnp.asarray(1.3, dtype) + params["gain"] ** 2
    return params
  return Model("temperature", f, init, _vectors((3,)), out_ndim=2)



def control_flow():
  """lax.cond and lax.fori_loop around layers."""
  def f(p, x):
    h = lax.cond(True, jnp.tanh, jnp.sin, x @ p["w"])
    h = lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ p["u"]), h)
    return h @ p["v"]
  return _model("control_flow", f, {"w": ((3, 4), 0.5), "u": ((4, 4), 0.5),
                                    "v": ((4, 2), 0.5)}, (3,))


def stop_gradient_unused():
  """A weight also used under stop_gradient, a frozen leaf and a leaf f never reads."""
  def f(p, x):
    h = jnp.tanh(x @ (p["w"] + lax.stop_gradient(p["w"])))
    return h @ p["v"] + jnp.sum(lax.stop_gradient(p["frozen"]))
  return _model("stop_gradient_unused", f,
                {"w": ((3, 4), 0.5), "v": ((4, 2), 0.5), "frozen": ((2,), 1.0),
                 "unused": ((3,), 1.0)}, (3,))

ZOO = [conv_strided_same(), conv_explicit_padding(), conv_rhs_dilation(), conv_grouped(),
       conv_depthwise(), conv_nchw(), conv1d_sequence(), conv_transpose(), conv_param_lhs(),
       avg_pools(), resnet_block(), transformer(1), transformer(2, causal=True),
       cls_token(), rnn_scan(), tied(), transformed_weights(), cast_float32(),
       cast_bfloat16(), lora(), token_bias(), closed_over_constants(), einsum_layers(),
       remat(), inner_jit(), temperature(), control_flow(), stop_gradient_unused()]

# Relative tolerances where a model computes in lower precision (1e-10 elsewhere). Reverse
# mode (the oracle) rounds the cotangent at a cast weight to the cast's precision; the
# engine contracts around the cast in float64. float32: unit roundoff 2^-24 = 6e-8, worst
# seen 1.6e-7. bfloat16: unit roundoff 2^-8 = 3.9e-3, worst seen 6e-3 (both over 6 seeds
# x 5 layouts x batch_independent x x2 given / omitted).
RTOL = {"cast_float32": 1e-6, "cast_bfloat16": 2e-2}

"""The benchmark suite's models: f(params, x) -> (N, 10), with parameters and two batches.

The first four families have the architectures of the performance issue's table and of the
anchor runs in ../shared/anchors (same layers, widths, shapes and batch sizes), so their
ratios over the jacrev baseline can be set side by side; the values of the parameters are
this module's own (seeded, He-style scales). Every builder takes its sizes as keywords;
`QUICK` holds tiny sizes for `suite.py --quick` and the smoke test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

OUT = 10  # outputs of every model
_DN = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class Model:
  """One benchmark model: f(params, x), its parameters and two distinct input batches."""
  description: str
  f: Callable[[Any, Any], jax.Array]
  params: Any
  x1: Any
  x2: Any


class _Init:
  """Seeded float32 parameters: dense / conv weights scaled by their fan-in."""

  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)

  def normal(self, shape, scale):
    return jnp.asarray(self.rng.standard_normal(shape) * scale, jnp.float32)

  def dense(self, fan_in, fan_out, gain=2.0):
    return self.normal((fan_in, fan_out), np.sqrt(gain / fan_in))

  def conv(self, cin, cout, size=3, gain=2.0):
    return self.normal((size, size, cin, cout), np.sqrt(gain / (size * size * cin)))

  def bias(self, size):
    return self.normal((size,), 0.1)


def _inputs(shape, n):
  """Two different float32 batches of n inputs."""
  return tuple(jnp.asarray(np.random.default_rng(seed).standard_normal((n,) + shape),
                           jnp.float32) for seed in (1, 2))


def _conv(x, w, b, stride=1):
  y = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_DN)
  return y + b


def mlp(width=512, n=16, depth=3, inputs=64):
  """64 -> [Dense(W) + ReLU] x depth -> Dense(10)."""
  init = _Init(0)
  sizes = [inputs] + [width] * depth + [OUT]
  params = [{"w": init.dense(a, b, 2.0 if i < depth else 1.0), "b": init.bias(b)}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]

  def f(params, x):
    for layer in params[:-1]:
      x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]
  return Model(f"MLP {inputs}->[Dense({width})+ReLU]x{depth}->Dense(10), N={n}", f, params,
               *_inputs((inputs,), n))


def cnn(channels=(32, 64, 64), image=16, n=16):
  """[3x3 SAME conv + ReLU] per channel count on image x image x 3, global mean, Dense(10)."""
  init = _Init(0)
  cins = (3,) + tuple(channels[:-1])
  params = {"convs": [{"w": init.conv(a, b), "b": init.bias(b)}
                      for a, b in zip(cins, channels)],
            "out": {"w": init.dense(channels[-1], OUT, 1.0), "b": init.bias(OUT)}}

  def f(params, x):
    for layer in params["convs"]:
      x = jax.nn.relu(_conv(x, layer["w"], layer["b"]))
    return x.mean(axis=(1, 2)) @ params["out"]["w"] + params["out"]["b"]
  return Model(f"CNN {image}x{image}x3 -> 3x3 SAME convs {tuple(channels)} + ReLU -> "
               f"global mean -> Dense(10), N={n}", f, params, *_inputs((image, image, 3), n))


def resnet(channels=32, blocks=2, image=16, n=16):
  """A 3x3 conv stem, residual blocks x + conv(relu(conv(relu(x)))), ReLU, mean, Dense."""
  init = _Init(0)
  params = {"stem": {"w": init.conv(3, channels), "b": init.bias(channels)},
            "blocks": [[{"w": init.conv(channels, channels, gain=2.0 if j == 0 else 0.5),
                         "b": init.bias(channels)} for j in range(2)]
                       for _ in range(blocks)],
            "out": {"w": init.dense(channels, OUT, 1.0), "b": init.bias(OUT)}}

  def f(params, x):
    h = jax.nn.relu(_conv(x, params["stem"]["w"], params["stem"]["b"]))
    for first, second in params["blocks"]:
      r = _conv(jax.nn.relu(h), first["w"], first["b"])
      h = h + _conv(jax.nn.relu(r), second["w"], second["b"])
    h = jax.nn.relu(h).mean(axis=(1, 2))
    return h @ params["out"]["w"] + params["out"]["b"]
  return Model(f"ResNet-style: 3x3 conv stem ({channels} ch) + {blocks} residual blocks of "
               f"two 3x3 convs, {image}x{image}x3, N={n}", f, params,
               *_inputs((image, image, 3), n))


def _layer_norm_params(init, dim):
  return {"g": 1.0 + init.normal((dim,), 0.1), "b": init.bias(dim)}


def _layer_norm(x, p, eps=1e-5):
  mean = x.mean(axis=-1, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * p["g"] + p["b"]


def _block_params(init, dim, hidden):
  dense = lambda a, b: {"w": init.dense(a, b, 1.0), "b": init.bias(b)}
  return {"ln1": _layer_norm_params(init, dim), "qkv": dense(dim, 3 * dim),
          "proj": dense(dim, dim), "ln2": _layer_norm_params(init, dim),
          "mlp1": dense(dim, hidden), "mlp2": dense(hidden, dim)}


def _attention(h, heads):
  n, s, d = h.shape[0], h.shape[1], h.shape[2] // 3
  q, k, v = (t.reshape(n, s, heads, d // heads) for t in jnp.split(h, 3, axis=-1))
  logits = jnp.einsum("nshd,nthd->nhst", q, k) / np.sqrt(d // heads)
  logits = logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  weights = jnp.exp(logits)
  weights = weights / weights.sum(axis=-1, keepdims=True)
  return jnp.einsum("nhst,nthd->nshd", weights, v).reshape(n, s, d)


def _block(x, p, heads):
  """A pre-LN transformer block: x + attention(LN(x)), then + MLP(LN(.)) with tanh-GELU."""
  dense = lambda h, layer: h @ layer["w"] + layer["b"]
  x = x + dense(_attention(dense(_layer_norm(x, p["ln1"]), p["qkv"]), heads), p["proj"])
  h = jax.nn.gelu(dense(_layer_norm(x, p["ln2"]), p["mlp1"]), approximate=True)
  return x + dense(h, p["mlp2"])


def transformer(tokens=16, dim=64, heads=4, hidden=256, n=8):
  """One pre-LN block on tokens x dim inputs, mean over tokens, Dense(10)."""
  init = _Init(0)
  params = {"block": _block_params(init, dim, hidden),
            "out": {"w": init.dense(dim, OUT, 1.0), "b": init.bias(OUT)}}

  def f(params, x):
    h = _block(x, params["block"], heads).mean(axis=1)
    return h @ params["out"]["w"] + params["out"]["b"]
  return Model(f"transformer block (pre-LN) {tokens} tokens x {dim}, {heads} heads, "
               f"MLP {hidden} tanh-GELU, mean, Dense(10), N={n}", f, params,
               *_inputs((tokens, dim), n))


def vit(image=16, patch=4, dim=64, heads=4, hidden=128, blocks=2, n=8):
  """Patch embedding (strided conv), a class token tiled over the batch, position
  embeddings, pre-LN blocks, a final layer norm, Dense(10) on the class token."""
  init = _Init(0)
  tokens = (image // patch) ** 2 + 1
  params = {"patch": {"w": init.conv(3, dim, size=patch, gain=1.0), "b": init.bias(dim)},
            "cls": init.normal((1, 1, dim), 0.02), "pos": init.normal((tokens, dim), 0.02),
            "blocks": [_block_params(init, dim, hidden) for _ in range(blocks)],
            "ln": _layer_norm_params(init, dim),
            "out": {"w": init.dense(dim, OUT, 1.0), "b": init.bias(OUT)}}

  def f(params, x):
    p = params["patch"]
    h = jax.lax.conv_general_dilated(x, p["w"], (patch, patch), "VALID",
                                     dimension_numbers=_DN) + p["b"]
    h = h.reshape(x.shape[0], -1, dim)
    cls = jnp.tile(params["cls"], (x.shape[0], 1, 1))
    h = jnp.concatenate([cls, h], axis=1) + params["pos"]
    for block in params["blocks"]:
      h = _block(h, block, heads)
    h = _layer_norm(h[:, 0], params["ln"])
    return h @ params["out"]["w"] + params["out"]["b"]
  return Model(f"ViT-style {image}x{image}x3, {patch}x{patch} patches -> {dim}, class "
               f"token, {blocks} pre-LN blocks ({heads} heads, MLP {hidden}), N={n}",
               f, params, *_inputs((image, image, 3), n))


def embedding(vocab=10000, dim=128, tokens=16, hidden=128, n=32):
  """Token + position embeddings, a tanh layer per token, mean over tokens, Dense(10)."""
  init = _Init(0)
  params = {"embed": init.normal((vocab, dim), 1.0), "pos": init.normal((tokens, dim), 1.0),
            "w1": init.dense(dim, hidden, 1.0), "w2": init.dense(hidden, OUT, 1.0)}

  def f(params, x):
    h = params["embed"][x] + params["pos"]
    return jnp.tanh(h @ params["w1"]).mean(axis=1) @ params["w2"]
  x1, x2 = (jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (n, tokens)))
            for seed in (1, 2))
  return Model(f"embedding V={vocab} D={dim}, {tokens} tokens, tanh({hidden}), mean, "
               f"Dense(10), N={n}", f, params, x1, x2)


def rnn(steps=64, hidden=256, inputs=32, n=32):
  """A tanh RNN under lax.scan over the steps; the last hidden state is read out."""
  init = _Init(0)
  params = {"wx": init.dense(inputs, hidden, 1.0), "wh": init.dense(hidden, hidden, 1.0),
            "b": init.bias(hidden), "wo": init.dense(hidden, OUT, 1.0)}

  def f(params, x):
    def step(h, xt):
      return jnp.tanh(h @ params["wh"] + xt @ params["wx"] + params["b"]), None
    h0 = jnp.zeros((x.shape[0], hidden), x.dtype)
    h, _ = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    return h @ params["wo"]
  return Model(f"scan RNN {steps} steps, hidden {hidden}, inputs {inputs}, N={n}", f,
               params, *_inputs((steps, inputs), n))


def diamonds(count=8, width=128, n=8, inputs=64):
  """An MLP with `count` linear diamonds h = h + flip(h) between two hidden layers: the
  first layer's weights reach the output along 2**count paths."""
  init = _Init(0)
  params = {"w0": init.dense(inputs, width), "b0": init.bias(width),
            "w1": init.dense(width, width), "b1": init.bias(width),
            "w2": init.dense(width, OUT, 1.0)}

  def f(params, x):
    h = jax.nn.relu(x @ params["w0"] + params["b0"])
    for _ in range(count):
      h = h + jnp.flip(h, -1)
    h = jax.nn.relu(h @ params["w1"] + params["b1"])
    return h @ params["w2"]
  return Model(f"MLP with {count} linear diamonds h + flip(h), width {width}, N={n}", f,
               params, *_inputs((inputs,), n))


def residual_stack(blocks=50, width=64, n=8, inputs=64):
  """`blocks` residual blocks h + relu(h @ w + b) between a Dense input and readout."""
  init = _Init(0)
  params = {"in": init.dense(inputs, width),
            "blocks": [{"w": init.dense(width, width, 0.1), "b": init.bias(width)}
                       for _ in range(blocks)],
            "out": init.dense(width, OUT, 1.0)}

  def f(params, x):
    h = x @ params["in"]
    for block in params["blocks"]:
      h = h + jax.nn.relu(h @ block["w"] + block["b"])
    return h @ params["out"]
  return Model(f"residual MLP stack, {blocks} blocks of width {width}, N={n}", f, params,
               *_inputs((inputs,), n))


# name: (builder, its sizes, the anchor setting with the same architecture or None)
MODELS = {
    "mlp-w512-n16": (mlp, dict(width=512, n=16), "fcn-w512-n16"),
    "mlp-w512-n64": (mlp, dict(width=512, n=64), "fcn-w512-n64"),
    "mlp-w2048-n16": (mlp, dict(width=2048, n=16), "fcn-w2048-n16"),
    "mlp-w2048-n64": (mlp, dict(width=2048, n=64), "fcn-w2048-n64"),
    "cnn-n16": (cnn, dict(n=16), "cnn-n16"),
    "resnet-n16": (resnet, dict(n=16), "resnet-n16"),
    "transformer-n8": (transformer, dict(n=8), "transformer-n8"),
    "vit-n8": (vit, dict(n=8), None),
    "embedding-n32": (embedding, dict(n=32), None),
    "rnn-n32": (rnn, dict(n=32), None),
    "diamonds": (diamonds, dict(), None),
    "residual-stack-50": (residual_stack, dict(), None),
}

# Tiny sizes (--quick, the smoke test): seconds per model.
QUICK = {
    "mlp-w512-n16": dict(width=32, n=4), "mlp-w512-n64": dict(width=32, n=8),
    "mlp-w2048-n16": dict(width=64, n=4), "mlp-w2048-n64": dict(width=64, n=8),
    "cnn-n16": dict(channels=(4, 8, 8), image=6, n=4),
    "resnet-n16": dict(channels=4, image=6, n=4),
    "transformer-n8": dict(tokens=4, dim=8, heads=2, hidden=16, n=3),
    "vit-n8": dict(image=8, dim=8, heads=2, hidden=16, blocks=1, n=3),
    "embedding-n32": dict(vocab=50, dim=8, tokens=4, hidden=8, n=4),
    "rnn-n32": dict(steps=5, hidden=8, inputs=4, n=4),
    "diamonds": dict(count=3, width=16, n=4),
    "residual-stack-50": dict(blocks=6, width=8, n=4),
}


def build(name: str, quick: bool = False) -> Model:
  """The model `name` (a key of MODELS), at its tiny size with `quick`."""
  builder, sizes, _ = MODELS[name]
  return builder(**(QUICK[name] if quick else sizes))


def anchor_setting(name: str) -> str | None:
  """The anchor runs' setting with this model's architecture and size, if any."""
  return MODELS[name][2]

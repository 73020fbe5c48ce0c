"""Flax (NNX and Linen) and Equinox models: method="structured" against the float64
oracle, and `explain()` shows the weights of their Linear / Dense / Conv layers taken
through the structure rules, with no dense fallback anywhere.

Per library: an MLP (Flax: with BatchNorm on running statistics, and Dropout off), a CNN
(convolution, pooling, dense head), a bag of embeddings of integer tokens with a dense
head, and an attention block (multi-head self-attention, residual, LayerNorm). The
models are written as each library's documentation shows, parameters split from the
rest as the library does it. A library's models are skipped where it is not installed
(`pip install -e ".[examples]"` installs both). Widths are up to 8, with 3 and 2
examples.
"""

import dataclasses
import functools
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import pytest

import ntk_compiler as nc
import oracle
import tiers

F64 = jnp.float64
RTOL_F64 = 1e-10
# flax.nnx.MultiHeadAttention calls jax.nn.dot_product_attention, which takes the
# softmax in float32 whatever the input dtype: every method, and the oracle, round there
# (errors of about 5e-10 measured).
RTOL_SOFTMAX_F32 = 1e-6
VOCAB = 11


@dataclasses.dataclass(frozen=True)
class LibModel:
  name: str
  library: str                 # the module the model needs
  build: Callable[[], tuple]   # () -> (f, params, x1, x2)
  rtol: float = RTOL_F64


def _vectors(seed, *shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, F64)


def _tokens(seed, *shape):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, VOCAB)


# ---------------------------------------------------------------------------- Flax NNX

def _nnx(module_fn, x1, x2):
  from flax import nnx
  model = module_fn(nnx, dict(param_dtype=F64, rngs=nnx.Rngs(0)))
  model.eval()  # BatchNorm on its running statistics, Dropout off
  # The NTK is over the nnx.Params; the rest of the state (BatchNorm's statistics, RNG
  # counts) is held fixed.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return (lambda p, x: nnx.merge(graphdef, p, rest)(x)), params, x1, x2


def nnx_mlp():
  """With BatchNorm (running statistics) and Dropout (off), as in evaluation."""
  def module(nnx, kw):
    class MLP(nnx.Module):
      def __init__(self):
        self.hidden = nnx.Linear(3, 8, **kw)
        self.norm = nnx.BatchNorm(8, **kw)
        self.dropout = nnx.Dropout(0.5, rngs=kw["rngs"])
        self.out = nnx.Linear(8, 2, **kw)

      def __call__(self, x):
        return self.out(self.dropout(jnp.tanh(self.norm(self.hidden(x)))))
    return MLP()
  return _nnx(module, _vectors(1, 3, 3), _vectors(2, 2, 3))


def nnx_cnn():
  def module(nnx, kw):
    class CNN(nnx.Module):
      def __init__(self):
        self.conv = nnx.Conv(2, 4, (3, 3), **kw)
        self.out = nnx.Linear(36, 3, **kw)

      def __call__(self, x):
        y = nnx.avg_pool(nnx.relu(self.conv(x)), (2, 2), (2, 2))
        return self.out(y.reshape(y.shape[0], -1))
    return CNN()
  return _nnx(module, _vectors(1, 3, 6, 6, 2), _vectors(2, 2, 6, 6, 2))


def nnx_embed():
  def module(nnx, kw):
    class Bag(nnx.Module):
      def __init__(self):
        self.embed = nnx.Embed(VOCAB, 6, **kw)
        self.out = nnx.Linear(6, 3, **kw)

      def __call__(self, tokens):
        return self.out(jnp.tanh(self.embed(tokens)).mean(axis=1))
    return Bag()
  return _nnx(module, _tokens(1, 3, 5), _tokens(2, 2, 5))


def nnx_attention():
  def module(nnx, kw):
    class Block(nnx.Module):
      def __init__(self):
        self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=8,
                                                decode=False, **kw)
        self.norm = nnx.LayerNorm(8, **kw)
        self.out = nnx.Linear(8, 2, **kw)

      def __call__(self, x):
        y = self.norm(x + self.attention(x))
        return self.out(y.mean(axis=1))
    return Block()
  return _nnx(module, _vectors(1, 3, 5, 8), _vectors(2, 2, 5, 8))


# --------------------------------------------------------------------------- Flax Linen

def _linen(module_fn, x1, x2):
  import flax.linen as nn
  model = module_fn(nn)
  variables = model.init(jax.random.PRNGKey(0), x1)
  if set(variables) == {"params"}:
    return (lambda p, x: model.apply(p, x)), variables, x1, x2
  # The NTK is over "params"; other collections (batch_stats) are held fixed.
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  return (lambda p, x: model.apply({"params": p, **rest}, x)), params, x1, x2


def linen_mlp():
  """With BatchNorm on its running statistics, as in evaluation."""
  def module(nn):
    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.Dense(8, param_dtype=F64)(x)
        x = nn.BatchNorm(use_running_average=True, param_dtype=F64)(x)
        return nn.Dense(2, param_dtype=F64)(jnp.tanh(x))
    return MLP()
  return _linen(module, _vectors(1, 3, 3), _vectors(2, 2, 3))


def linen_cnn():
  def module(nn):
    class CNN(nn.Module):
      @nn.compact
      def __call__(self, x):
        y = nn.relu(nn.Conv(4, (3, 3), strides=2, param_dtype=F64)(x))
        y = nn.relu(nn.Conv(3, (2, 2), padding="VALID", param_dtype=F64)(y))
        return nn.Dense(3, param_dtype=F64)(y.reshape(y.shape[0], -1))
    return CNN()
  return _linen(module, _vectors(1, 3, 6, 6, 2), _vectors(2, 2, 6, 6, 2))


def linen_embed():
  def module(nn):
    class Bag(nn.Module):
      @nn.compact
      def __call__(self, tokens):
        y = jnp.tanh(nn.Embed(VOCAB, 6, param_dtype=F64)(tokens)).mean(axis=1)
        return nn.Dense(3, param_dtype=F64)(y)
    return Bag()
  return _linen(module, _tokens(1, 3, 5), _tokens(2, 2, 5))


def linen_attention():
  def module(nn):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, x):
        y = nn.MultiHeadDotProductAttention(num_heads=2, param_dtype=F64)(x, x)
        y = nn.LayerNorm(param_dtype=F64)(x + y)
        return nn.Dense(2, param_dtype=F64)(y.mean(axis=1))
    return Block()
  return _linen(module, _vectors(1, 3, 5, 8), _vectors(2, 2, 5, 8))


# ----------------------------------------------------------------------------- Equinox

def _eqx(module_fn, x1, x2):
  import equinox as eqx
  model = module_fn(eqx, jax.random.split(jax.random.PRNGKey(0), 3))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  # An Equinox model maps one example; vmap maps the batch.
  return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params, x1, x2


def eqx_mlp():
  def module(eqx, keys):
    return eqx.nn.MLP(3, 2, 8, 2, activation=jnp.tanh, key=keys[0], dtype=F64)
  return _eqx(module, _vectors(1, 3, 3), _vectors(2, 2, 3))


def eqx_cnn():
  def module(eqx, keys):
    class CNN(eqx.Module):
      conv: eqx.nn.Conv2d
      pool: eqx.nn.AvgPool2d
      out: eqx.nn.Linear

      def __init__(self):
        self.conv = eqx.nn.Conv2d(2, 4, 3, padding=1, key=keys[0], dtype=F64)
        self.pool = eqx.nn.AvgPool2d(2, 2)
        self.out = eqx.nn.Linear(36, 3, key=keys[1], dtype=F64)

      def __call__(self, x):  # x: (channels, height, width)
        return self.out(self.pool(jax.nn.relu(self.conv(x))).reshape(-1))
    return CNN()
  return _eqx(module, _vectors(1, 3, 2, 6, 6), _vectors(2, 2, 2, 6, 6))


def eqx_embed():
  def module(eqx, keys):
    class Bag(eqx.Module):
      embed: eqx.nn.Embedding
      out: eqx.nn.Linear

      def __init__(self):
        self.embed = eqx.nn.Embedding(VOCAB, 6, key=keys[0], dtype=F64)
        self.out = eqx.nn.Linear(6, 3, key=keys[1], dtype=F64)

      def __call__(self, tokens):  # tokens: (length,)
        return self.out(jnp.tanh(jax.vmap(self.embed)(tokens)).mean(axis=0))
    return Bag()
  return _eqx(module, _tokens(1, 3, 5), _tokens(2, 2, 5))


def eqx_attention():
  def module(eqx, keys):
    class Block(eqx.Module):
      attention: eqx.nn.MultiheadAttention
      norm: eqx.nn.LayerNorm
      out: eqx.nn.Linear

      def __init__(self):
        self.attention = eqx.nn.MultiheadAttention(2, 8, key=keys[0], dtype=F64)
        self.norm = eqx.nn.LayerNorm(8, dtype=F64)
        self.out = eqx.nn.Linear(8, 2, key=keys[1], dtype=F64)

      def __call__(self, x):  # x: (length, features)
        y = jax.vmap(self.norm)(x + self.attention(x, x, x))
        return self.out(y.mean(axis=0))
    return Block()
  return _eqx(module, _vectors(1, 3, 5, 8), _vectors(2, 2, 5, 8))


MODELS = [
    LibModel("nnx_mlp", "flax", nnx_mlp),
    LibModel("nnx_cnn", "flax", nnx_cnn),
    LibModel("nnx_embed", "flax", nnx_embed),
    LibModel("nnx_attention", "flax", nnx_attention, rtol=RTOL_SOFTMAX_F32),
    LibModel("linen_mlp", "flax", linen_mlp),
    LibModel("linen_cnn", "flax", linen_cnn),
    LibModel("linen_embed", "flax", linen_embed),
    LibModel("linen_attention", "flax", linen_attention),
    LibModel("eqx_mlp", "equinox", eqx_mlp),
    LibModel("eqx_cnn", "equinox", eqx_cnn),
    LibModel("eqx_embed", "equinox", eqx_embed),
    LibModel("eqx_attention", "equinox", eqx_attention),
]


def _cases():
  for model in MODELS:
    for with_x2 in (True, False):
      name = f"{model.name}-{'x2' if with_x2 else 'no_x2'}"
      yield pytest.param(model, with_x2, id=name)


@functools.lru_cache(maxsize=None)
def _built(model):
  pytest.importorskip(model.library)
  f, params, x1, x2 = model.build()
  return f, params, x1, x2, nc.compile_ntk(f, method="structured")


# ------------------------------------------------------------------- against the oracle

# The default tier runs each library and each kind of model (MLP, CNN, embedding,
# attention) once, with x2 given and omitted; the full tier every model both ways.
@pytest.mark.parametrize("model, with_x2", tiers.representative(
    _cases(), lambda model, with_x2: [model.name.split("_")[0], model.name.split("_")[1],
                                      with_x2]))
def test_matches_oracle(model, with_x2):
  f, params, x1, x2, ntk_fn = _built(model)
  x2 = x2 if with_x2 else None
  kernel = ntk_fn(params, x1, x2)
  # f jitted so the oracle's full Jacobians are not taken op by op.
  expected = oracle.oracle_ntk(jax.jit(f), params, x1, x2)
  assert kernel.shape == (x1.shape[0], (x1 if x2 is None else x2).shape[0])
  oracle.assert_matches(kernel, expected, model.rtol)


# --------------------------------------------------------------- explain(): structure

_LINEAR_RULES = {"dot_general", "conv_general_dilated"}


def _is_embedding(path):
  return "embed" in path.lower()


def _is_layer_weight(leaf):
  """A Linear / Dense / Conv weight: a kernel or weight matrix, not an embedding table
  (nor a LayerNorm weight or a bias, of rank 1 or named otherwise)."""
  return (len(leaf.shape) >= 2 and re.search(r"\b(kernel|weight)\b", leaf.path)
          and not _is_embedding(leaf.path))


@pytest.mark.parametrize("model", tiers.representative(
    MODELS, lambda model: model.name.split("_")), ids=lambda m: m.name)
def test_explain_structured(model):
  """No dense fallback, and every Linear / Dense / Conv weight goes through the rule of
  its dot_general or convolution."""
  _, params, x1, _, ntk_fn = _built(model)
  explanation = ntk_fn.explain(params, x1)
  assert explanation.method == "structured"
  assert explanation.batch_independent, explanation.batch
  assert explanation.fallbacks == []
  weights = [leaf for leaf in explanation.leaves if _is_layer_weight(leaf)]
  assert weights
  for leaf in weights:
    rules = {rule for use in leaf.uses for rule, _, _ in use.factors}
    assert leaf.uses and rules & _LINEAR_RULES, leaf

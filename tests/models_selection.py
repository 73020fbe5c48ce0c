"""Models whose parameters are selected by index: embeddings (integer token inputs),
`jnp.take`, fancy indexing, `dynamic_slice`, `dynamic_update_slice` and scatter-add.

Each is small and draws its parameters and inputs from a seed, like `models.py`.
"""

import jax
import jax.numpy as jnp
from jax import lax

from models import Model
from models_structured import _params

VOCAB, TOKENS, DIM = 7, 5, 3


def _tokens(shape=(TOKENS,), high=VOCAB, low=0):
  return lambda k, n, dt: jax.random.randint(k, (n,) + shape, low, high)


def _model(name, f, shapes, inputs, out_ndim=2):
  return Model(name, f, lambda k, dt: _params(k, dt, **shapes), inputs, out_ndim)


def embedding_mean():
  """Bag of embeddings, then a linear readout: the embedding term Σ [id1 = id2] ⟨.,.⟩."""
  def f(p, x):
    return p["embed"][x].mean(axis=1) @ p["w"]
  return _model("embedding_mean", f, {"embed": ((VOCAB, DIM), 1.0), "w": ((DIM, 2), 0.5)},
                _tokens())


def embedding_mlp():
  """Token + position embeddings, a tanh layer per token, mean pooling (the benchmark's
  shape)."""
  def f(p, x):
    h = p["embed"][x] + p["pos"]
    return jnp.tanh(h @ p["w1"]).mean(axis=1) @ p["w2"]
  return _model("embedding_mlp", f,
                {"embed": ((VOCAB, DIM), 1.0), "pos": ((TOKENS, DIM), 0.5),
                 "w1": ((DIM, 4), 0.5), "w2": ((4, 2), 0.5)}, _tokens())


def tied_embedding():
  """The table is looked up (gather) and reused as the output projection (matmul)."""
  def f(p, x):
    h = jnp.tanh(jnp.take(p["embed"], x, axis=0).sum(axis=1) @ p["w"])
    return h @ p["embed"].T
  return _model("tied_embedding", f, {"embed": ((VOCAB, DIM), 1.0), "w": ((DIM, DIM), 0.5)},
                _tokens())


def take_constant_ids():
  """Columns picked by constant ids (fill mode: out-of-range ids give zeros), and a
  clipped lookup with negative and too-large ids from the input."""
  ids = jnp.array([0, 2, 2, 5, 1])

  def f(p, x):
    cols = jnp.take(p["w"], ids, axis=1, mode="fill", fill_value=0)   # (3, 5); id 5: out
    rows = jnp.take(p["embed"], x, axis=0, mode="clip")              # (N, T, 3)
    return jnp.tanh(rows @ cols).sum(axis=1)
  return _model("take_constant_ids", f, {"w": ((DIM, 5), 0.5), "embed": ((VOCAB, DIM), 1.0)},
                _tokens(low=-2, high=VOCAB + 2))


def multi_index():
  """Fancy indexing with two batch axes of ids per example, and a second table."""
  def f(p, x):
    a = p["embed"][x]                       # (N, 2, 3, DIM)
    b = p["other"][(x + 1) % VOCAB]
    return (a * b).sum(axis=(1, 2)) @ p["w"] + a.sum(axis=(1, 2)) @ p["w"]
  return _model("multi_index", f,
                {"embed": ((VOCAB, DIM), 1.0), "other": ((VOCAB, DIM), 1.0),
                 "w": ((DIM, 2), 0.5)}, _tokens((2, 3)))


def dynamic_position():
  """A window of a position table at a per-example offset (dynamic_slice, clamped at the
  end), and the rows of a stacked weight picked by a per-example index."""
  def f(p, x):
    start = x[:, 0] % 6
    pos = jax.vmap(lambda s: lax.dynamic_slice_in_dim(p["pos"], s, TOKENS, 0))(start)
    layer = jax.vmap(lambda s: lax.dynamic_index_in_dim(p["stack"], s % 2, 0, False))(start)
    h = jnp.tanh(p["embed"][x] + pos)                                   # (N, T, DIM)
    return jnp.einsum("ntd,nde->ne", h, layer)
  return _model("dynamic_position", f,
                {"pos": ((8, DIM), 0.5), "stack": ((2, DIM, 2), 0.5),
                 "embed": ((VOCAB, DIM), 1.0)}, _tokens())


def dynamic_block():
  """dynamic_slice along two axes at once (a dense product of one-hot factors)."""
  def f(p, x):
    i = jnp.argmax(jnp.arange(3))  # an index computed in f: 2
    block = lax.dynamic_slice(p["w"], (i, i + 1), (2, 3))
    return jnp.einsum("ij,nt->ni", block, p["embed"][x][..., 0])
  return _model("dynamic_block", f, {"w": ((5, 6), 0.5), "embed": ((VOCAB, DIM), 1.0)},
                _tokens((3,)))


def update_slice():
  """Parameters written into a buffer (dynamic_update_slice): the update's placement
  and the buffer's kept entries."""
  def f(p, x):
    buffer = jnp.broadcast_to(p["buffer"], (x.shape[0],) + p["buffer"].shape)
    start = x[:, 0] % 4
    y = jax.vmap(lambda b, s: lax.dynamic_update_slice_in_dim(b, p["patch"], s, 0))(
        buffer, start)                                                   # (N, 5, DIM)
    return jnp.tanh(y + p["embed"][x][:, :1]).reshape(x.shape[0], -1) @ p["w"]
  return _model("update_slice", f,
                {"buffer": ((5, DIM), 0.5), "patch": ((2, DIM), 0.5),
                 "embed": ((VOCAB, DIM), 1.0), "w": ((5 * DIM, 2), 0.3)}, _tokens())


def scatter_add():
  """Parameters accumulated at token ids (scatter-add: repeated ids add up; out-of-range
  ids are dropped), on top of a parameter table."""
  def f(p, x):
    def one(ids):
      return p["table"].at[ids].add(p["rows"], mode="drop")              # (VOCAB, DIM)
    y = jax.vmap(one)(x)
    return jnp.tanh(y).reshape(x.shape[0], -1) @ p["w"]
  return _model("scatter_add", f,
                {"table": ((VOCAB, DIM), 0.5), "rows": ((TOKENS, DIM), 1.0),
                 "w": ((VOCAB * DIM, 2), 0.2)}, _tokens(high=VOCAB + 1))


ZOO = [embedding_mean(), embedding_mlp(), tied_embedding(), take_constant_ids(),
       multi_index(), dynamic_position(), dynamic_block(), update_slice(), scatter_add()]

"""Batch independence decided from the jaxpr: proofs and the primitive that breaks one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ntk_compiler import batching, compat

N, T, D, H = 4, 5, 3, 6


def decide(f, params, x) -> batching.Decision:
  """analyse() on f(params, x), with every leaf of x batched on axis 0."""
  p_leaves, p_def = jax.tree.flatten(params)
  x_leaves, x_def = jax.tree.flatten(x)

  def flat(*leaves):
    p = jax.tree.unflatten(p_def, leaves[:len(p_leaves)])
    return jax.tree.leaves(f(p, jax.tree.unflatten(x_def, leaves[len(p_leaves):])))
  jaxpr = jax.make_jaxpr(flat)(*p_leaves, *x_leaves)
  flags = [False] * len(p_leaves) + [True] * len(x_leaves)
  return batching.analyse(compat.open_jaxpr(jaxpr), flags)


def rand(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


X = rand(N, D)
XT = rand(N, T, D, seed=1)
W = {"w1": rand(D, H), "b1": rand(H), "w2": rand(H, 2), "b2": rand(2)}


def mlp(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def cnn(p, x):
  y = lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = jax.nn.relu(y + p["b"])
  y = lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  y = lax.reduce_window(y, 0.0, lax.add, (1, 2, 2, 1), (1, 1, 1, 1), "SAME") / 4
  return y.reshape(y.shape[0], -1) @ p["w"]


def layer_norm(p, x):
  mu = x.mean(-1, keepdims=True)
  sd = jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
  return (x - mu) / sd * p["g"] + p["b"]


def attention(p, x):
  q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
  s = jnp.einsum("ntd,nsd->nts", q, k) / jnp.sqrt(D)
  mask = jnp.tril(jnp.ones((T, T), bool))
  s = jnp.where(mask, s, -1e9)
  return jnp.einsum("nts,nsd->ntd", jax.nn.softmax(s, -1), v)


def embed(p, tokens):
  return p["E"][tokens].mean(1) @ p["w"]


def rnn(p, x):
  def step(h, xt):
    h = jnp.tanh(h @ p["u"] + xt @ p["w"])
    return h, h * 2
  h0 = jnp.zeros((x.shape[0], H))
  h, ys = lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
  return h, jnp.swapaxes(ys, 0, 1)


CNN_P = {"k": rand(3, 3, 2, 4), "b": rand(4), "w": rand(2 * 2 * 4, 3)}
ATTN_P = {"q": rand(D, D), "k": rand(D, D, seed=2), "v": rand(D, D, seed=3)}
RNN_P = {"u": rand(H, H), "w": rand(D, H)}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 10, (N, T)), jnp.int32)

POSITIVE = {
    "mlp": (mlp, W, X),
    "cnn_pooling": (cnn, CNN_P, rand(N, 4, 4, 2)),
    "layer_norm": (layer_norm, {"g": rand(D), "b": rand(D)}, X),
    "attention": (attention, ATTN_P, XT),
    "embedding": (embed, {"E": rand(10, D), "w": rand(D, 2)}, TOKENS),
    "where_clip": (lambda p, x: jnp.where(x > 0, jnp.clip(x, -1, p), 0.0), 0.5, X),
    "jit": (lambda p, x: jax.jit(mlp)(p, x), W, X),
    "checkpoint": (jax.checkpoint(mlp), W, X),
    "relu_gelu": (lambda p, x: jax.nn.relu(x * p) + jax.nn.gelu(x, approximate=False)
                  + jax.nn.gelu(x), 2.0, X),
    "softmax": (lambda p, x: jax.nn.softmax(x @ p, -1), rand(D, H), X),
    "log_softmax": (lambda p, x: jax.nn.log_softmax(x @ p), rand(D, H), X),
    "split": (lambda p, x: jnp.prod(jnp.stack(jnp.split(x @ p, 2, axis=1)), 0),
              rand(D, H), X),
    "scan_time": (rnn, RNN_P, XT),
    "einsum": (lambda p, x: jnp.einsum("nij,njk,kl->nil", x, x, p), rand(D, 2),
               rand(N, D, D)),
    "two_inputs": (lambda p, x: x["a"] * p + x["b"][:, :1], 2.0,
                   {"a": X, "b": rand(N, 2)}),
    "feature_gather": (lambda p, x: x[:, jnp.array([2, 0])] * p, 2.0, X),
    "feature_scatter": (lambda p, x: x.at[:, jnp.array([0, 2])].add(p), 1.0, X),
    "cond_on_params": (lambda p, x: lax.cond(p > 0, jnp.sin, jnp.cos, x), 1.0, X),
    "fori_loop": (lambda p, x: lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p), x),
                  rand(D, D), X),
    "sort_features": (lambda p, x: jnp.sort(x, 1) + jnp.argsort(x, 1) * p, 1.0, X),
    "cumsum_features": (lambda p, x: jnp.cumsum(x, 1) * p, 1.0, X),
    "transpose_back": (lambda p, x: jnp.transpose(x.T * p), 1.0, X),
    "per_example_outer": (lambda p, x: (x[:, :, None] * x[:, None, :]).reshape(
        x.shape[0], -1) + p, 0.0, X),
    "take_along_axis": (lambda p, x: jnp.take_along_axis(x, jnp.argsort(x, 1), 1) * p,
                        1.0, X),
    "custom_vjp": (lambda p, x: _twice(x) * p, 1.0, X),
    "while_loop": (lambda p, x: lax.while_loop(lambda c: c[0] < 3,
                                               lambda c: (c[0] + 1, c[1] * p), (0, x))[1],
                   2.0, X),
    "stack_tile": (lambda p, x: jnp.tile(jnp.stack([x, x * p], 1), (1, 2, 1)), 2.0, X),
}


@jax.custom_vjp
def _twice(x):
  return 2 * x


_twice.defvjp(lambda x: (2 * x, None), lambda _, g: (2 * g,))


def _rows(x, i):
  return jax.tree.map(lambda leaf: leaf[i:i + 1], x)


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_independent(name):
  f, p, x = POSITIVE[name]
  d = decide(f, p, x)
  assert d.independent, d.reason
  assert d.reason.startswith("proven")
  # The proof's claim, checked on values: each row is f of its own example.
  full = jax.tree.leaves(f(p, x))
  for i in range(N):
    for a, b in zip(full, jax.tree.leaves(f(p, _rows(x, i)))):
      np.testing.assert_allclose(a[i:i + 1], b, rtol=1e-10, atol=1e-10)


NEGATIVE = {
    "batch_norm": (lambda p, x: (x - x.mean(0)) / x.std(0) * p, lax.reduce_sum_p),
    "center": (lambda p, x: x - x.mean(0), lax.reduce_sum_p),
    "cumsum_batch": (lambda p, x: jnp.cumsum(x, 0), lax.cumsum_p),
    "sort_batch": (lambda p, x: jnp.sort(x, 0), lax.sort_p),
    "concat_batch": (lambda p, x: jnp.concatenate([x, jnp.zeros((2, D))], 0),
                     lax.concatenate_p),
    "position_constant": (lambda p, x: x + jnp.arange(float(N * D)).reshape(N, D),
                          lax.add_p),
    "merge_reshape": (lambda p, x: x.reshape(N // 2, 2 * D), lax.reshape_p),
    "dot_over_batch": (lambda p, x: x @ (x.T @ x), lax.dot_general_p),
    "reverse": (lambda p, x: x[::-1], lax.rev_p),
    "roll": (lambda p, x: jnp.roll(x, 1, 0), None),
    "outer_over_examples": (lambda p, x: jnp.einsum("nd,md->nm", x, x),
                            lax.dot_general_p),
    "slice_batch": (lambda p, x: x[1:], lax.slice_p),
    "pool_over_batch": (lambda p, x: lax.reduce_window(
        x, 0.0, lax.add, (2, 1), (1, 1), "SAME"), lax.reduce_window_sum_p),
    "scan_over_batch": (lambda p, x: lax.scan(lambda c, r: (c + r, c), jnp.zeros(D), x)[1],
                        lax.scan_p),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_mixes(name):
  f, prim = NEGATIVE[name]
  d = decide(f, 1.0, X)
  assert not d.independent
  if prim is not None:
    assert str(prim) in d.reason, d.reason


def test_squeezing_the_batch_axis_mixes():
  """At N = 1 a squeeze may take the batch axis with it: the output has no row axis."""
  d = decide(lambda p, x: jnp.squeeze(x[:, :1]) * p, 1.0, X[:1])
  assert not d.independent and str(lax.squeeze_p) in d.reason, d.reason
  assert decide(lambda p, x: jnp.squeeze(x[:, :1], 1) * p, 1.0, X[:1]).independent


def test_position_constant_closure():
  c = np.arange(N * D, dtype=np.float64).reshape(N, D)
  d = decide(lambda p, x: x * c, 1.0, X)
  assert not d.independent and str(lax.mul_p) in d.reason, d.reason
  row = np.arange(D, dtype=np.float64)
  assert decide(lambda p, x: x * row, 1.0, X).independent


def test_embedding_gradient_scatters_over_examples():
  f = lambda E, t: jnp.zeros((N, D)) + E.at[t[:, 0]].add(1.0)[:N]
  d = decide(f, rand(10, D), TOKENS)
  assert not d.independent and str(lax.scatter_add_p) in d.reason, d.reason


def test_output_ignores_x():
  d = decide(lambda p, x: (x * 2, jnp.zeros((N, D)) + p), 1.0, X)
  assert not d.independent and "output 1 does not depend on the batch" in d.reason


def test_output_batch_on_axis_1():
  d = decide(lambda p, x: x.T * p, 1.0, X)
  assert not d.independent and "axis 1, not 0" in d.reason
  d = decide(lambda p, x: jnp.swapaxes(rnn(p, x)[1], 0, 1), RNN_P, XT)
  assert not d.independent and "axis 1, not 0" in d.reason


def test_unknown_primitive_is_not_independent():
  """A primitive without a rule here and without a JAX batching rule: not proven."""
  opaque_p = compat.Primitive("opaque_rows")
  opaque_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
  d = decide(lambda p, x: opaque_p.bind(x) * p, 1.0, X)
  assert not d.independent and "JAX's batching rule" in d.reason, d.reason


def test_primitive_known_by_its_jax_batching_rule():
  """cholesky has no rule here: JAX's batching rule proves it per-example."""
  spd = rand(N, D, D) @ jnp.swapaxes(rand(N, D, D), 1, 2) + 3 * jnp.eye(D)
  assert decide(lambda p, x: jnp.linalg.cholesky(x) * p, 1.0, spd).independent
  square = rand(N, N, N) @ jnp.swapaxes(rand(N, N, N), 1, 2) + 3 * jnp.eye(N)
  chol = lambda a: lax.linalg.cholesky(a, symmetrize_input=False)
  d = decide(lambda p, x: chol(jnp.swapaxes(x, 0, 1)) * p, 1.0, square)
  assert not d.independent and "cholesky" in d.reason, d.reason  # batch on a row axis


def test_nested_reason_names_the_inner_equation():
  d = decide(lambda p, x: jax.jit(lambda y: y - y.sum(0))(x), 1.0, X)
  assert not d.independent
  assert str(lax.reduce_sum_p) in d.reason and "(eqn 0/" in d.reason, d.reason


def test_carry_that_changes_axis_mixes():
  f = lambda p, x: lax.fori_loop(0, 2, lambda i, h: h.T, jnp.ones((N, N)) * x[:, :1])
  assert not decide(f, 1.0, X).independent


def test_bad_flags():
  j = jax.make_jaxpr(lambda a, b: a * b)(1.0, X)
  with pytest.raises(ValueError, match="one per invar"):
    batching.analyse(j.jaxpr, [True])
  with pytest.raises(ValueError, match="invar 0 is a scalar"):
    batching.analyse(j.jaxpr, [True, True])


def test_docstring_example_runs():
  import doctest
  assert doctest.testmod(batching, raise_on_error=True).attempted > 0

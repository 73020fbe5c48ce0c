"""The per-example path is taken only where it is exact (issue 8, cases 2 to 4).

The per-example path evaluates f at batch size 1 (`f(params, x[i:i+1])[0]` for row i),
so a model may only take it when the program at N = 1 computes, per example, what the
program at N computes per row. Each case: every method against the float64 oracle,
and explain() saying why the whole batch was differentiated at once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import ntk_compiler as nc
from ntk_compiler import batching, trace
from oracle import assert_matches, oracle_ntk

RTOL = 1e-10
METHODS = ["auto", "structured", "jacobian", "ntk_vp"]
D, H, O = 3, 5, 2


def rand(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


PARAMS = {"w": rand(D, H), "v": rand(H, O, seed=1)}
X1, X2 = rand(4, D, seed=2), rand(3, D, seed=3)


def squeeze_at_one(p, x):
  """Per-example for N >= 2; at N = 1 the squeeze also drops the batch axis."""
  return jnp.squeeze(jnp.tanh(x @ p["w"])[:, :1])[..., None] * p["v"][0]


def batch_size_in_an_array(p, x):
  return jnp.tanh(x @ p["w"]) @ p["v"] / jnp.array([x.shape[0]])


def batch_size_in_a_numpy_constant(p, x):
  return jnp.tanh(x @ p["w"]) @ p["v"] * np.ones((1, O)) / x.shape[0]


def batch_size_folded_into_a_constant(p, x):
  return jnp.tanh(x @ p["w"]) @ p["v"] * (np.ones((1, O)) / x.shape[0])


def per_position_table(p, x):
  """A table of positions: row i of x meets row i of the table."""
  return jnp.tanh((x * p["table"][:x.shape[0]]) @ p["w"]) @ p["v"]


def python_branch_on_n(p, x):
  return jnp.tanh(x @ p["w"]) @ p["v"] * (2.0 if x.shape[0] > 1 else 1.0)


def power_of_n(p, x):
  return (jnp.tanh(x @ p["w"]) @ p["v"]) ** x.shape[0]


def loop_of_n_steps(p, x):
  step = lambda i, h: jnp.tanh(h @ p["w"][:, :D])
  return lax.fori_loop(0, x.shape[0], step, x) @ p["w"] @ p["v"]


def sum_of_an_n_sized_constant(p, x):
  return jnp.tanh(x @ p["w"]) * jnp.ones((x.shape[0], H)).sum(0)


def traceable_at_n_only(p, x):
  return jnp.tanh(x @ p["w"]).reshape(x.shape[0] // 2 * 2, -1) @ p["v"]


TABLE = {"table": rand(4, D, seed=4), **PARAMS}
LONG_TABLE = {"table": rand(6, D, seed=5), **PARAMS}

# name: (f, params, x2 or None, what explain() must say about the batch decision).
# Cases 2 to 4 of the issue, with every method.
CASES = {
    "squeeze_at_one": (squeeze_at_one, PARAMS, X2, "squeeze"),
    "array_constant": (batch_size_in_an_array, PARAMS, X2, "constant"),
    "numpy_constant": (batch_size_in_a_numpy_constant, PARAMS, X2, "batch size"),
    # Exactly N rows: the old analysis crashed tracing f at N + 1.
    "table_of_n_rows": (per_position_table, TABLE, X2, "position-dependent"),
    "traceable_at_n_only": (traceable_at_n_only, PARAMS, None,
                            "could not be traced at batch size 1"),
}
# More ways for the batch size to reach a value, with the default method.
MORE = {
    "folded_constant": (batch_size_folded_into_a_constant, PARAMS, X2, "constant"),
    "longer_table": (per_position_table, LONG_TABLE, X2, "position-dependent"),
    "python_branch": (python_branch_on_n, PARAMS, X2, "batch size 1"),
    "power_of_n": (power_of_n, PARAMS, X2, "integer_pow"),
    "loop_of_n_steps": (loop_of_n_steps, PARAMS, X2, "length"),
    "sum_over_n_ones": (sum_of_an_n_sized_constant, PARAMS, X2, "reduce_sum"),
}


def _check_whole_batch(f, params, x2, why, method):
  ntk_fn = nc.compile_ntk(f, method=method)
  explanation = ntk_fn.explain(params, X1, x2)
  assert not explanation.batch_independent, explanation.batch
  assert why in explanation.batch.reason, explanation.batch.reason
  assert why in str(explanation), "explain() must print the reason"
  assert_matches(ntk_fn(params, X1, x2), oracle_ntk(f, params, X1, x2), RTOL)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_kernel_on_the_whole_batch_path(name, method):
  _check_whole_batch(*CASES[name], method)


@pytest.mark.parametrize("name", sorted(MORE))
def test_batch_size_in_a_value(name):
  _check_whole_batch(*MORE[name], "auto")


@pytest.mark.parametrize("method", METHODS)
def test_squeeze_model_without_x2(method):
  ntk_fn = nc.compile_ntk(squeeze_at_one, method=method, trace_axes=())
  assert_matches(ntk_fn(PARAMS, X1), oracle_ntk(squeeze_at_one, PARAMS, X1, None, ()),
                 RTOL)


def test_squeeze_reason_names_the_equation_and_both_sizes():
  reason = nc.compile_ntk(squeeze_at_one).explain(PARAMS, X1).batch.reason
  assert "squeeze (eqn" in reason and "batch size 4" in reason, reason
  assert "(1,)" in reason and "(0, 1)" in reason, reason


def test_per_example_models_keep_the_fast_path():
  """What the proof must accept: a zero state of N rows, a constant equal at every
  batch size, a bias broadcast to N rows."""
  def f(p, x):
    h = jnp.zeros((x.shape[0], H)) + jnp.tanh(x @ p["w"]) * np.full((1, H), 0.5)
    return jax.nn.relu(h) @ p["v"] + jnp.broadcast_to(p["v"][0], (x.shape[0], O))
  for method in METHODS:
    ntk_fn = nc.compile_ntk(f, method=method)
    explanation = ntk_fn.explain(PARAMS, X1, X2)
    assert explanation.batch_independent, explanation.batch
    assert "batch sizes 4 and 1" in explanation.batch.reason
    assert_matches(ntk_fn(PARAMS, X1, X2), oracle_ntk(f, PARAMS, X1, X2), RTOL)


# batching.infer directly: the decision and its reason, without computing kernels.

def decide(f, params, x) -> batching.Decision:
  def trace_at(n):
    shaped = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n,) + a.shape[1:], a.dtype), x)
    return trace.trace_program(f, params, shaped, per_example=False)
  return batching.infer(trace_at, len(jax.tree.leaves(params)),
                        jax.tree.leaves(x)[0].shape[0])


W = rand(D, H)


@pytest.mark.parametrize("f, why", [
    (lambda p, x: (x @ p)[:, x.shape[0]:x.shape[0] + 1], "limit_indices"),
    (lambda p, x: (x @ p) * jnp.arange(x.shape[0])[:, None], "iota"),
    (lambda p, x: (x @ p)[:, None, :] * jnp.ones((1, x.shape[0], 1)),
     "batched on different axes [0, 1]"),
    (lambda p, x: (x @ p)[:, :x.shape[0]].sum(1), "batch size on axes [0, 1]"),
    (lambda p, x: (x @ p) * jnp.ones((x.shape[0], H)).cumsum(0), "cumsum"),
    (lambda p, x: (x @ p) * jnp.eye(x.shape[0], H), "position-dependent"),
    (lambda p, x: x @ p + np.arange(x.shape[0] * H).reshape(-1, H), "position-dep"),
    (lambda p, x: x @ p + np.full((1, H), x.shape[0]), "constant 0"),
    (lambda p, x: lax.top_k(x @ p, x.shape[0])[0], "batch size"),
    (lambda p, x: jnp.tanh(x @ p) * x.shape[0], "mul (eqn"),
], ids=["slice_at_n", "iota", "second_n_axis", "slice_to_n", "cumsum_constant",
        "eye", "numpy_table", "numpy_full", "top_n", "scalar_literal"])
def test_values_built_from_the_batch_size(f, why):
  d = decide(f, W, X1)
  assert not d.independent and why in d.reason, d.reason


@pytest.mark.parametrize("f", [
    lambda p, x: jnp.tanh(x @ p),
    lambda p, x: jnp.zeros((x.shape[0], H)) + x @ p,
    lambda p, x: jnp.zeros((x.shape[0], H)) + p.sum(),  # per example, ignoring x
    lambda p, x: lax.scan(lambda h, xt: (jnp.tanh(h + xt @ p), h),
                          jnp.zeros((x.shape[0], H)), x[None])[0],
    lambda p, x: (x @ p)[:, :2] * np.ones(2),
], ids=["mlp", "zeros_plus", "constant_rows", "scan_zero_state", "equal_constant"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_per_example_at_every_batch_size(f, n):
  d = decide(f, W, X1[:n])
  assert d.independent, d.reason
  assert f"batch sizes {max(n, 2)} and 1" in d.reason


def _jit_scale(c):
  return lambda y: jax.jit(lambda z: z * c(z))(y)


@pytest.mark.parametrize("f, independent", [
    (lambda p, x: _jit_scale(lambda z: np.arange(5.0))(x @ p), True),
    (lambda p, x: _jit_scale(lambda z: np.full(5, z.shape[0]))(x @ p), False),
    (lambda p, x: lax.cond(p.sum() > 0, _jit_scale(lambda z: np.arange(5.0)),
                           lambda y: y, x @ p), True),
    (lambda p, x: lax.cond(p.sum() > 0, lambda y: y * np.full(5, y.shape[0]),
                           lambda y: y, x @ p), False),
    (lambda p, x: lax.scan(lambda h, t: (h * np.full(5, x.shape[0]) + t, None), x @ p,
                           jnp.arange(3.0))[0], False),
    (lambda p, x: lax.while_loop(lambda c: c[0] < x.shape[0],
                                 lambda c: (c[0] + 1, jnp.tanh(c[1])), (0, x @ p))[1],
     False),
    (lambda p, x: (x @ p) * jax.random.bernoulli(jax.random.PRNGKey(0), 0.5, (5,)), True),
    (lambda p, x: (x @ p) * jax.random.bernoulli(jax.random.PRNGKey(0), 0.5,
                                                  (x.shape[0], 5)), False),
], ids=["jit_constant", "jit_constant_of_n", "cond_constant", "cond_constant_of_n",
        "scan_constant_of_n", "while_n_steps", "dropout_per_feature",
        "dropout_per_position"])
def test_bodies_are_compared_too(f, independent):
  d = decide(f, W, X1)
  assert d.independent == independent, d.reason


def _two():
  return np.float64(2.0)


def test_a_callback_must_be_the_same_function():
  """Unlike custom derivative rules, a callback's function is compared: a closure over
  N is a new function at each batch size."""
  def f(callback):
    out = jax.ShapeDtypeStruct((), jnp.float64)
    return lambda p, x: (x @ p) * jax.pure_callback(callback(x.shape[0]), out)
  d = decide(f(lambda n: lambda: np.float64(n)), W, X1)
  assert not d.independent and "pure_callback" in d.reason, d.reason
  assert decide(f(lambda n: _two), W, X1).independent


def test_a_failed_trace_is_not_proven():
  def trace_at(n):
    if n == 2:
      raise TypeError("mul got incompatible shapes")
    return jax.make_jaxpr(lambda w, x: x @ w)(W, jnp.ones((n, D)))
  d = batching.infer(trace_at, 1, 1)
  assert not d.independent
  assert "batch size 2" in d.reason and "TypeError: mul got incompatible" in d.reason


def test_an_analysis_failure_is_not_proven():
  d = batching.infer(lambda n: object(), 1, 3)
  assert not d.independent and "batch analysis failed" in d.reason, d.reason


def test_batch_mixing_reason_wins_over_a_program_difference():
  """x - x.mean(0) divides by N (so the programs differ), but the mixing is the cause."""
  d = decide(lambda p, x: x @ p - (x @ p).mean(0), W, X1)
  assert not d.independent and str(lax.reduce_sum_p) in d.reason, d.reason


def test_constants_are_compared_by_value_shape_and_dtype():
  same = lambda a, b: batching._same_value(a, b)
  assert same(np.ones((1, 2)), np.ones((1, 2)))
  assert same(np.array([np.nan]), np.array([np.nan]))
  assert not same(np.ones((1, 2)), np.ones((2, 1)))
  assert not same(np.ones(2, np.float32), np.ones(2, np.float64))
  assert not same(np.array([4]), np.array([1]))


# Random compositions: whatever is proven per-example must be, row by row.

_N = lambda h: h.shape[0]
_LAYERS = [
    lambda h, p: jnp.tanh(h @ p),
    lambda h, p: h * np.arange(1.0, D + 1),
    lambda h, p: h / _N(h),
    lambda h, p: h - h.mean(0),
    lambda h, p: h - h.mean(1, keepdims=True),
    lambda h, p: h + jnp.zeros((_N(h), D)),
    lambda h, p: h * jnp.ones((_N(h), D)).sum(0),
    lambda h, p: jnp.squeeze(h[:, :1])[..., None] * jnp.ones(D),
    lambda h, p: h[:, ::-1],
    lambda h, p: h[::-1],
    lambda h, p: jnp.roll(h, _N(h), 1),
    lambda h, p: jnp.cumsum(h, 1),
    lambda h, p: jnp.cumsum(h, 0),
    lambda h, p: h * (jnp.arange(_N(h)) < 100)[:, None],
    lambda h, p: h * jnp.array([_N(h)]),
    lambda h, p: lax.fori_loop(0, 2, lambda i, c: jnp.tanh(c @ p), h),
    lambda h, p: lax.fori_loop(0, _N(h), lambda i, c: jnp.tanh(c @ p), h),
    lambda h, p: h ** min(_N(h), 2),
    lambda h, p: h.reshape(-1, D),
    lambda h, p: jax.nn.softmax(h, 0),
    lambda h, p: jax.nn.softmax(h, 1),
    lambda h, p: h * (2.0 if _N(h) > 1 else 1.0),
    lambda h, p: jnp.pad(h, ((1, 0), (0, 0)))[:_N(h)],
    lambda h, p: h + jnp.broadcast_to(p[0], (_N(h), D)),
    lambda h, p: h * jnp.linspace(0.0, 1.0, _N(h) + D)[-D:],
]


def test_proven_means_each_row_is_f_of_its_example():
  rng = np.random.default_rng(8)
  w = rand(D, D, seed=6)
  proven = 0
  for _ in range(60):
    layers = [_LAYERS[i] for i in rng.integers(len(_LAYERS), size=rng.integers(1, 4))]
    def f(p, x, layers=layers):
      for layer in layers:
        x = layer(x, p)
      return x
    x = rand(int(rng.choice([1, 2, 3])), D, seed=int(rng.integers(100)))
    if not decide(f, w, x).independent:
      continue
    proven += 1
    rows = jnp.concatenate([f(w, x[i:i + 1]) for i in range(x.shape[0])])
    np.testing.assert_allclose(rows, f(w, x), rtol=1e-12, atol=1e-12)
  assert proven >= 10  # the draw exercises the positive side too

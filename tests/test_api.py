"""The public API: output shapes, compilation once per signature, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_compiler as nc


def dense(params, x):
  return jnp.tanh(x @ params["w"]) @ params["v"]


def seq(params, x):  # (N, T, I) -> (N, T, O)
  return jnp.tanh(x @ params["w"]) @ params["v"]


PARAMS = {"w": jnp.ones((3, 4)) * 0.1, "v": jnp.ones((4, 2))}
X = jnp.arange(15.0).reshape(5, 3) / 10
XSEQ = jnp.arange(5 * 6 * 3.0).reshape(5, 6, 3) / 50


@pytest.mark.parametrize("f, x, trace, diag, shape", [
    (dense, X, (-1,), (), (5, 4)),
    (dense, X, (), (), (5, 4, 2, 2)),
    (dense, X, (), (0,), (5, 2, 2)),
    (dense, X, (), (1,), (5, 4, 2)),
    (seq, XSEQ, (-1,), (1,), (5, 4, 6)),
    (seq, XSEQ, (1, 2), (), (5, 4)),
    (seq, XSEQ, (), (1,), (5, 4, 6, 2, 2)),
    (seq, XSEQ, (0, -1), (), (6, 6)),
    (seq, XSEQ, (), (0, 2), (5, 6, 6, 2)),
])
def test_output_layout(f, x, trace, diag, shape):
  x2 = x[:4] if 0 not in trace + diag else x
  kernel = nc.compile_ntk(f, trace_axes=trace, diagonal_axes=diag)(PARAMS, x, x2)
  assert kernel.shape == shape


def test_pytree_outputs_give_one_kernel_per_leaf():
  f = lambda p, x: {"a": dense(p, x), "b": [x @ p["w"]]}
  kernel = nc.compile_ntk(f)(PARAMS, X)
  assert jax.tree_util.tree_structure(kernel) == jax.tree_util.tree_structure(
      {"a": 0, "b": [0]})
  assert kernel["a"].shape == (5, 5) and kernel["b"][0].shape == (5, 5)


def test_compiles_once_per_signature():
  traces = []
  def f(params, x):
    traces.append(None)
    return dense(params, x)
  ntk_fn = nc.compile_ntk(f, method="jacobian")
  ntk_fn(PARAMS, X)
  count = len(traces)
  ntk_fn(jax.tree_util.tree_map(lambda a: a * 2, PARAMS), X + 1)
  assert len(traces) == count
  ntk_fn(PARAMS, X[:3])  # a new shape compiles again
  assert len(traces) > count


def test_works_under_jit():
  ntk_fn = nc.compile_ntk(dense)
  expected = ntk_fn(PARAMS, X, X[:2])
  got = jax.jit(lambda p, a, b: ntk_fn(p, a, b))(PARAMS, X, X[:2])
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_params_without_leaves_give_zero_kernel():
  kernel = nc.compile_ntk(lambda p, x: x * 2.0, method="jacobian")({}, X)
  np.testing.assert_array_equal(kernel, np.zeros((5, 5)))


# Errors: each names the argument at fault and says what is allowed.

def test_unknown_method():
  with pytest.raises(ValueError, match=r"method='fast' is not one of 'auto', "
                     r"'structured', 'jacobian', 'ntk_vp'"):
    nc.compile_ntk(dense, method="fast")


def test_f_not_callable():
  with pytest.raises(TypeError, match="f must be a callable"):
    nc.compile_ntk(3)


@pytest.mark.parametrize("name", ["trace_axes", "diagonal_axes"])
def test_axes_of_wrong_type(name):
  with pytest.raises(TypeError, match=f"{name} must be an int or a sequence of ints"):
    nc.compile_ntk(dense, **{name: (0.5,)})
  with pytest.raises(TypeError, match=f"{name} must be an int or a sequence of ints"):
    nc.compile_ntk(dense, **{name: "ab"})


def test_axis_named_twice():
  with pytest.raises(ValueError, match=r"trace_axes=\(1, 1\) names an axis twice"):
    nc.compile_ntk(dense, trace_axes=(1, 1))
  with pytest.raises(ValueError, match=r"trace_axes=\(1, -1\) names the same axis twice"):
    nc.compile_ntk(dense, trace_axes=(1, -1))(PARAMS, X)


@pytest.mark.parametrize("name", ["trace_axes", "diagonal_axes"])
def test_axes_out_of_range(name):
  other = {"trace_axes": ()} if name == "diagonal_axes" else {}
  ntk_fn = nc.compile_ntk(dense, **{name: (2,)}, **other)
  with pytest.raises(ValueError, match=rf"{name}=\(2,\) is out of range for an output of "
                     r"rank 2 \(shape \(5, 2\)\); allowed axes are -2..1"):
    ntk_fn(PARAMS, X)


def test_axis_both_traced_and_diagonal():
  with pytest.raises(ValueError, match=r"axis 1 is in both trace_axes=\(1,\) and "
                     r"diagonal_axes=\(1,\)"):
    nc.compile_ntk(dense, trace_axes=(1,), diagonal_axes=(1,))
  ntk_fn = nc.compile_ntk(dense, trace_axes=(-1,), diagonal_axes=(1,))
  with pytest.raises(ValueError, match=r"both name axis 1"):
    ntk_fn(PARAMS, X)


@pytest.mark.parametrize("trace, diag, axis, kind", [
    ((0,), (), 0, "traced"), ((), (0,), 0, "diagonal")])
def test_x1_x2_differ_on_traced_or_diagonal_axis(trace, diag, axis, kind):
  ntk_fn = nc.compile_ntk(dense, trace_axes=trace, diagonal_axes=diag)
  with pytest.raises(ValueError, match=rf"axis {axis} is {kind} .* f\(params, x1\) has "
                     r"size 5 there and f\(params, x2\) has size 3"):
    ntk_fn(PARAMS, X, X[:3])


def test_x1_x2_outputs_of_different_rank():
  f = lambda p, x: dense(p, x) if x.ndim == 2 else seq(p, x)
  with pytest.raises(ValueError, match="must have the same rank"):
    nc.compile_ntk(f)(PARAMS, X, XSEQ)


@pytest.mark.parametrize("bad", [jnp.ones((3, 4), jnp.int32), np.ones((3, 4), bool),
                                 jnp.ones((3, 4), jnp.complex64)])
def test_non_float_params(bad):
  with pytest.raises(TypeError, match=rf"params\['w'\] has dtype {jnp.result_type(bad)}; "
                     "every parameter leaf must be a real floating-point array"):
    nc.compile_ntk(dense)({"w": bad, "v": PARAMS["v"]}, X)


def test_batch_independent_type():
  with pytest.raises(TypeError, match="batch_independent must be True, False or None"):
    nc.compile_ntk(dense, batch_independent="yes")


def test_scalar_input():
  with pytest.raises(ValueError, match=r"x1 is a scalar; every input leaf needs the batch"):
    nc.compile_ntk(lambda p, x: p * x)(jnp.ones(()), jnp.ones(()))


def test_inputs_with_different_batches():
  with pytest.raises(ValueError, match=r"x1\['b'\] has 4 examples on axis 0 but other "
                     "leaves of x1 have 5"):
    nc.compile_ntk(lambda p, x: x["a"] @ p["w"])(
        PARAMS, {"a": X, "b": jnp.ones((4, 3))})


def test_x1_x2_different_trees():
  with pytest.raises(ValueError, match="x1 and x2 must have the same pytree structure"):
    nc.compile_ntk(lambda p, x: jax.tree_util.tree_leaves(x)[0] @ p["w"])(
        PARAMS, (X,), [X])


def test_scalar_or_integer_output():
  with pytest.raises(ValueError, match=r"f\(params, x1\) is a scalar"):
    nc.compile_ntk(lambda p, x: jnp.sum(dense(p, x)))(PARAMS, X)
  with pytest.raises(TypeError, match=r"f\(params, x1\) has dtype int(32|64); the NTK "
                     "needs real floating-point outputs"):
    nc.compile_ntk(lambda p, x: jnp.argmax(dense(p, x), axis=1))(PARAMS, X)


def test_batch_independent_output_must_keep_batch():
  ntk_fn = nc.compile_ntk(lambda p, x: dense(p, x).T, batch_independent=True)
  with pytest.raises(ValueError, match="does not keep the batch of 5 examples on axis 0"):
    ntk_fn(PARAMS, X)


# Batch independence: inferred from the jaxpr unless the user says.

def test_per_example_model_is_inferred_batch_independent():
  ntk_fn = nc.compile_ntk(dense)
  explanation = ntk_fn.explain(PARAMS, X)
  assert explanation.batch_independent
  assert "proven" in explanation.batch.reason
  assert ntk_fn.plan(PARAMS, X).problem.batch_independent


def test_batch_mixing_model_is_inferred_dependent():
  f = lambda p, x: dense(p, x - x.mean(0))
  explanation = nc.compile_ntk(f).explain(PARAMS, X)
  assert not explanation.batch_independent
  assert str(jax.lax.reduce_sum_p) in explanation.batch.reason


def test_batch_size_in_a_value_is_not_per_example():
  f = lambda p, x: dense(p, x) / x.shape[0]
  explanation = nc.compile_ntk(f).explain(PARAMS, X)
  assert not explanation.batch_independent
  assert "batch size" in explanation.batch.reason


def test_user_override_wins():
  for value in (True, False):
    explanation = nc.compile_ntk(dense, batch_independent=value).explain(PARAMS, X)
    assert explanation.batch_independent is value
    assert explanation.batch.reason == "as given by batch_independent"

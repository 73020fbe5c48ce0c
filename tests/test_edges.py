"""Edges where a kernel used to be silently wrong or crash deep inside JAX (issue 8):
x1 and x2 with other per-example shapes, empty batches / axes / leaves, dtypes and
precision, scalar outputs, and the messages of bad input. Each against the oracle."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_compiler as nc
from oracle import assert_matches, oracle_ntk
from tiers import full

METHODS = ["auto", "structured", "jacobian", "ntk_vp"]
KEY = jax.random.PRNGKey(0)


def _normal(shape, seed):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _check(f, params, x1, x2=None, rtol=1e-10, methods=METHODS, **layout):
  expected = oracle_ntk(f, params, x1, x2, **layout)
  for method in methods:
    kernel = nc.compile_ntk(f, method=method, **layout)(params, x1, x2)
    assert_matches(kernel, expected, rtol)


# Case 1: each side runs the program of its own signature.

def bag(p, x):  # (N, T, 2) -> (N, 3): the sum over T has T-dependent structure
  return jax.nn.relu(x @ p["w"]).sum(1) @ p["v"]


def embeddings(p, tokens):  # bag of embeddings, any number of tokens
  return jnp.tanh(p["E"][tokens].mean(1)) @ p["v"]


def conv_gap(p, x):  # SAME conv, global average pool: any image size
  y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.tanh(y).mean((1, 2)) @ p["v"]


def strided_conv_sum(p, x):  # a strided SAME conv over a sequence of any length, summed
  y = jax.lax.conv_general_dilated(x, p["k"], (2,), "SAME",
                                   dimension_numbers=("NWC", "WIO", "NWC"))
  return y.sum(1) * p["v"]


@pytest.mark.parametrize("f, params, x1, x2", [
    (bag, {"w": _normal((2, 6), 1), "v": _normal((6, 3), 2)},
     _normal((4, 5, 2), 3), _normal((3, 1, 2), 4)),
    pytest.param(bag, {"w": _normal((2, 6), 1), "v": _normal((6, 3), 2)},
                 _normal((2, 3, 2), 3), _normal((3, 4, 2), 4),  # do not broadcast
                 marks=full),
    pytest.param(embeddings, {"E": _normal((11, 4), 5), "v": _normal((4, 3), 6)},
                 jnp.array([[1, 2, 3, 4, 5], [0, 7, 7, 2, 1]]),
                 jnp.array([[3], [10], [1]]), marks=full),
    (conv_gap, {"k": _normal((3, 3, 2, 4), 7), "v": _normal((4, 3), 8)},
     _normal((2, 5, 5, 2), 9), _normal((3, 1, 1, 2), 10)),
    (strided_conv_sum, {"k": _normal((2, 3, 1), 11), "v": _normal((2,), 12)},
     _normal((2, 4, 3), 13), jnp.zeros((3, 0, 3))),
], ids=["bag-5-vs-1", "bag-3-vs-4", "embeddings-5-vs-1", "conv-5x5-vs-1x1",
        "strided-conv-4-vs-0"])
@pytest.mark.parametrize("layout", [{}, pytest.param({"trace_axes": ()}, marks=full)],
                         ids=["trace", "full"])
def test_x2_with_other_per_example_shapes(f, params, x1, x2, layout):
  _check(f, params, x1, x2, **layout)


def test_x2_plan_is_built_per_side():
  params = {"w": _normal((2, 6), 1), "v": _normal((6, 3), 2)}
  plan = nc.compile_ntk(bag, method="structured").plan(
      params, _normal((4, 5, 2), 3), _normal((3, 1, 2), 4))
  assert plan.problem.batch_independent and plan.engine2 is not None


# Case 6: edge shapes.

def mlp(p, x):
  return jnp.tanh(x @ p["w"]) @ p["v"]


MLP = {"w": _normal((3, 4), 1), "v": _normal((4, 2), 2)}


@pytest.mark.parametrize("x1, x2", [
    (jnp.ones((0, 3)), None), (jnp.ones((2, 3)), jnp.ones((0, 3))),
    pytest.param(jnp.ones((0, 3)), jnp.ones((0, 3)), marks=full)],
    ids=["x1", "x2", "both"])
@pytest.mark.parametrize("layout", [{}, pytest.param({"trace_axes": ()}, marks=full),
                                    {"trace_axes": (), "diagonal_axes": (1,)}],
                         ids=["trace", "full", "diagonal"])
def test_no_examples(x1, x2, layout):
  _check(mlp, MLP, x1, x2, **layout)


def test_no_examples_explain():
  text = str(nc.compile_ntk(mlp).explain(MLP, jnp.ones((0, 3))))
  assert "method" in text


@full
def test_output_with_a_zero_sized_axis():
  f = lambda p, x: {"empty": jnp.tanh(x @ p["w"]) @ p["z"], "full": mlp(p, x)}
  params = {**MLP, "z": jnp.ones((4, 0))}
  _check(f, params, _normal((3, 3), 3), _normal((2, 3), 4), trace_axes=())


def test_traced_axis_of_size_zero_is_an_error():
  f = lambda p, x: jnp.tanh(x @ p["w"]) @ p["z"]
  with pytest.raises(ValueError, match="traced axis 1 has size 0"):
    nc.compile_ntk(f)({"w": MLP["w"], "z": jnp.ones((4, 0))}, jnp.ones((2, 3)))


@pytest.mark.parametrize("f", [
    lambda p, x: mlp(p, x) + jnp.sum(p["z"]),
    lambda p, x: mlp(p, x) + jnp.flip(p["z"], 0).sum(0)[:2],
    pytest.param(lambda p, x: jnp.concatenate(
        [mlp(p, x), jnp.flip(x[:, :0] @ p["z"], 1)], 1), marks=full),
], ids=["sum", "flip", "flip-mid"])
def test_zero_sized_parameter_leaves(f):
  params = {**MLP, "z": jnp.ones((0, 3))}
  _check(f, params, _normal((3, 3), 3), _normal((2, 3), 4), trace_axes=())


@pytest.mark.parametrize("d1, d2", [(jnp.int8, jnp.uint32),
                                    pytest.param(jnp.int32, jnp.int64, marks=full),
                                    pytest.param(jnp.uint8, jnp.int16, marks=full)])
def test_token_ids_of_different_integer_dtypes(d1, d2):
  params = {"E": _normal((11, 4), 5), "v": _normal((4, 3), 6)}
  x1 = jnp.array([[1, 2], [3, 4]], d1)
  x2 = jnp.array([[1, 5], [6, 4], [0, 0]], d2)
  _check(embeddings, params, x1, x2, trace_axes=())


# Case 8: quiet surprises.

@pytest.mark.full
def test_scalar_outputs_with_the_default_trace_axes():
  f = lambda p, x: mlp(p, x)[:, 0]  # (N,)
  with pytest.raises(ValueError, match=r"axis -1 is axis 0 .* its batch axis.*"
                                       r"trace_axes=\(\)"):
    nc.compile_ntk(f)(MLP, jnp.ones((3, 3)))
  _check(f, MLP, _normal((3, 3), 3), _normal((2, 3), 4), trace_axes=())
  _check(f, MLP, _normal((3, 3), 3), trace_axes=(0,))  # named as 0: traced on purpose


@pytest.mark.parametrize("dtype", [jnp.float16, pytest.param(jnp.bfloat16, marks=full)])
@pytest.mark.parametrize("n", [pytest.param(1, marks=full), 3, pytest.param(40, marks=full)])
def test_half_precision_models_give_float32_kernels(dtype, n):
  params = jax.tree_util.tree_map(lambda a: (a / 2).astype(dtype), MLP)
  x = _normal((n, 3), 3).astype(dtype)
  kernels = {m: nc.compile_ntk(mlp, method=m, trace_axes=())(params, x)
             for m in METHODS}
  expected = oracle_ntk(mlp, params, x, trace_axes=())
  for method, kernel in kernels.items():
    assert kernel.dtype == jnp.float32, method
    # The model itself runs in half precision: agreement to its rounding.
    assert_matches(kernel, expected, 2e-2)


def test_kernel_dtype_follows_the_output():
  x = _normal((3, 3), 3)
  for method in METHODS:
    assert nc.compile_ntk(mlp, method=method)(MLP, x).dtype == jnp.float64
    params32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), MLP)
    kernel = nc.compile_ntk(mlp, method=method)(params32, x.astype(jnp.float32))
    assert kernel.dtype == jnp.float32


@pytest.mark.parametrize("precision", ["highest", "high", "default"])
@pytest.mark.parametrize("method", ["structured", pytest.param("jacobian", marks=full),
                                    "ntk_vp"])
def test_precision_reaches_every_contraction(method, precision):
  ntk_fn = nc.compile_ntk(mlp, method=method, precision=precision)
  text = ntk_fn.lower(MLP, jnp.ones((2, 3))).as_text()
  dots = re.findall(r"stablehlo\.(?:dot_general|convolution)[^\n]*", text)
  assert dots
  tag = precision.upper()
  assert all(f"precision = [{tag}, {tag}]" in d for d in dots), dots


# Case 9: clear messages.

@pytest.mark.parametrize("call, error, message", [
    (lambda: nc.compile_ntk(mlp)(MLP, jnp.ones((3,))), ValueError,
     r"shape \(2,\): it does not keep the batch of 3 examples on axis 0.*x\[None\]"),
    (lambda: nc.compile_ntk(lambda p, x: None)(MLP, jnp.ones((2, 3))), ValueError,
     r"f\(params, x1\) returned None, with no array in it"),
    (lambda: nc.compile_ntk(mlp, rules=[jax.lax.sin_p]), TypeError,
     r"rules must be a mapping \{Primitive: rule\}.*got a list"),
    (lambda: nc.compile_ntk(mlp, precision="fp32"), ValueError,
     r"precision='fp32' is not one of 'highest', 'high', 'default'"),
])
def test_messages(call, error, message):
  with pytest.raises(error, match=message):
    call()


def test_rule_returning_something_else_is_named():
  f = lambda p, x: jnp.tanh(-(x @ p["w"])) @ p["v"]
  ntk_fn = nc.compile_ntk(f, method="structured", rules={jax.lax.neg_p: lambda e, o: 3})
  with pytest.raises(TypeError, match=r"rule for neg returned int 3; a rule returns a "
                                      r"RuleResult"):
    ntk_fn(MLP, jnp.ones((2, 3)))


@pytest.mark.parametrize("axes", [np.int64(-1), pytest.param(jnp.array(-1), marks=full),
                                  pytest.param((np.int64(-1),), marks=full),
                                  np.array([-1])])
def test_numpy_integer_axes(axes):
  kernel = nc.compile_ntk(mlp, trace_axes=axes)(MLP, jnp.ones((2, 3)))
  assert kernel.shape == (2, 2)

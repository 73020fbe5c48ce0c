"""Backward convolutions before a pooled head, stacked over the output rows
(ntk_compiler/stacking.py): which convolutions qualify (explain()'s "side:" lines) and
exactness against the float64 oracle, with x2 given and omitted, traced or not, in tiles;
and the forms that must not be stacked, still exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax import lax

import ntk_compiler as nc
import oracle
import tiers

NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "OIHW", "NCHW")


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape))


def _conv(x, w, stride=1, dn=NHWC, groups=1):
  return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=dn,
                                  feature_group_count=groups)


def _params(cin=3, mid=4, out=5, classes=3, dn=NHWC):
  shape = (lambda i, o: (3, 3, i, o)) if dn == NHWC else (lambda i, o: (o, i, 3, 3))
  return {"w1": _normal(1, shape(cin, mid), 0.5), "b1": _normal(2, (mid,), 0.1),
          "w2": _normal(3, shape(mid, out), 0.3), "b2": _normal(4, (out,), 0.1),
          "head": _normal(5, (out, classes), 0.5), "c": _normal(6, (classes,), 0.1)}


def cnn(p, x):
  """Two convs, ReLU, a global mean, a Dense head: the benchmark's CNN in small."""
  h = jax.nn.relu(_conv(x, p["w1"]) + p["b1"])
  h = jax.nn.relu(_conv(h, p["w2"]) + p["b2"])
  return h.mean(axis=(1, 2)) @ p["head"] + p["c"]


def residual_nchw(p, x):
  """NCHW, a strided first conv, a residual add and SiLU (a call) before a sum pool,
  the head a product with a scaled weight and a second output from the same pool."""
  h = _conv(x, p["w1"], stride=2, dn=NCHW) + p["b1"][:, None, None]
  y = _conv(jax.nn.relu(h), p["w2"], dn=NCHW) + h[:, :1] * 0.5
  pooled = jax.nn.silu(y * y).sum(axis=(2, 3))
  return {"logits": pooled @ (2.0 * p["head"]) + p["c"], "sum": pooled.sum(axis=1) / 3}


def _kernels(f, params, x1, x2, **kwargs):
  ntk = nc.compile_ntk(f, method="structured", **kwargs)
  return ntk, ntk(params, x1, x2)


@pytest.mark.parametrize("x2_given", [True, False])
@pytest.mark.parametrize("trace_axes", [(-1,), ()])
def test_stacked_cnn_matches_the_oracle(x2_given, trace_axes):
  params = _params(mid=5)
  x1, x2 = _normal(7, (3, 6, 6, 3)), (_normal(8, (2, 6, 6, 3)) if x2_given else None)
  ntk, kernel = _kernels(cnn, params, x1, x2, trace_axes=trace_axes)
  (side,) = ntk.explain(params, x1, x2).sides
  assert "one convolution per example for all 3 output rows" in side
  assert "(3 x 5 channels)" in side
  expected = oracle.oracle_ntk(cnn, params, x1, x2, trace_axes=trace_axes)
  oracle.assert_matches(kernel, expected, 1e-10)


def test_stacked_in_tiles():
  params, x1, x2 = _params(), _normal(7, (5, 6, 6, 3)), _normal(8, (3, 6, 6, 3))
  ntk, kernel = _kernels(cnn, params, x1, x2, block_size=2, max_memory="1GB")
  assert ntk.explain(params, x1, x2).sides
  oracle.assert_matches(kernel, oracle.oracle_ntk(cnn, params, x1, x2), 1e-10)


def test_stacked_nchw_residual_two_outputs():
  params = _params(dn=NCHW)
  x1, x2 = _normal(7, (3, 3, 8, 8)), _normal(8, (2, 3, 8, 8))
  ntk, kernel = _kernels(residual_nchw, params, x1, x2, trace_axes=())
  (side,) = ntk.explain(params, x1, x2).sides
  assert "all 4 output rows" in side  # 3 logits and the sum, one basis over both
  expected = oracle.oracle_ntk(residual_nchw, params, x1, x2, trace_axes=())
  oracle.assert_matches(kernel, expected, 1e-10)


def _partial_pool(p, x):  # a spatial axis kept: the cotangent varies along it
  h = jax.nn.relu(_conv(x, p["w1"]) + p["b1"])
  return jnp.tanh(_conv(h, p["w2"])).mean(axis=1).reshape(x.shape[0], -1) @ jnp.tile(
      p["head"], (6, 1))


def _nonlinear_head(p, x):  # the pooled value's cotangent depends on the example
  h = jax.nn.relu(_conv(x, p["w1"]) + p["b1"])
  return jnp.tanh(jax.nn.relu(_conv(h, p["w2"])).mean(axis=(1, 2))) @ p["head"]


def _fan_out(p, x):  # the conv's output read twice on the way: not one chain
  h = jax.nn.relu(_conv(x, p["w1"]) + p["b1"])
  y = _conv(h, p["w2"])
  return (y.mean(axis=(1, 2)) + jnp.max(y, axis=(1, 2))) @ p["head"]


def _grouped(p, x):  # a grouped convolution stays as it is
  h = jax.nn.relu(_conv(x, p["w1"]) + p["b1"])
  y = _conv(h, p["w2"][:, :, :2, :4], groups=2)
  return jax.nn.relu(y).mean(axis=(1, 2)) @ p["head"][:4]


def _per_example_kernel(p, x):  # the kernel depends on the input
  h = jax.nn.relu(_conv(x, p["w1"]) + p["b1"])
  w = p["w2"] * jnp.tanh(x.mean())
  return jax.nn.relu(_conv(h, w)).mean(axis=(1, 2)) @ p["head"]


@pytest.mark.parametrize("f", [_partial_pool, _nonlinear_head, _fan_out, _grouped,
                               _per_example_kernel])
def test_not_stacked_and_exact(f):
  params, x1, x2 = _params(), _normal(7, (3, 6, 6, 3)), _normal(8, (2, 6, 6, 3))
  ntk, kernel = _kernels(f, params, x1, x2, trace_axes=())
  assert ntk.explain(params, x1, x2).sides == ()
  oracle.assert_matches(kernel, oracle.oracle_ntk(f, params, x1, x2, trace_axes=()),
                        1e-10)


def test_stacked_side_is_one_convolution_per_example():
  """The emitted program: the convolution before the pool is transposed once per
  example with K x C_in output channels, not once per (example, output row)."""
  params, x1 = _params(mid=4, classes=3), _normal(7, (3, 6, 6, 3))
  text = str(nc.compile_ntk(cnn, method="structured").jaxpr(params, x1))
  assert "f64[3,6,6,12] = conv_general_dilated" in text  # 3 rows x 4 input channels
  assert "f64[9,6,6,4] = conv_general_dilated" not in text  # 3 examples x 3 rows


_ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "silu": jax.nn.silu,
                "square": lambda y: y * y, "scale": lambda y: 0.5 * y - 1.0}


@tiers.examples(3, 12)
@given(spatial=st.sampled_from([1, 2]), stride=st.sampled_from([1, 2]),
       dilation=st.sampled_from([1, 2]), padding=st.sampled_from(["SAME", "VALID"]),
       chain=st.lists(st.sampled_from(sorted(_ACTIVATIONS)), max_size=3),
       bias=st.booleans(), mean=st.booleans(), x2_given=st.booleans(),
       trace=st.booleans(), seed=st.integers(0, 2**16))
def test_random_stacked_convolutions_match_the_oracle(spatial, stride, dilation, padding,
                                                      chain, bias, mean, x2_given, trace,
                                                      seed):
  """Random convolutions before a pooled head (1-D or 2-D, strides, dilations,
  padding, elementwise chains, bias, sum or mean pool, traced or not): stacked, and
  exact against the oracle."""
  dn = ("NWC", "WIO", "NWC") if spatial == 1 else NHWC
  rng = np.random.default_rng(seed)
  params = {"w1": jnp.asarray(rng.normal(size=(3,) * spatial + (2, 3)) * 0.5),
            "w2": jnp.asarray(rng.normal(size=(2,) * spatial + (3, 4)) * 0.5),
            "b": jnp.asarray(rng.normal(size=(4,)) * 0.1),
            "head": jnp.asarray(rng.normal(size=(4, 3)))}
  axes = tuple(range(1, 1 + spatial))

  def f(p, x):
    h = jnp.tanh(lax.conv_general_dilated(x, p["w1"], (1,) * spatial, "SAME",
                                          dimension_numbers=dn))
    y = lax.conv_general_dilated(h, p["w2"], (stride,) * spatial, padding,
                                 rhs_dilation=(dilation,) * spatial, dimension_numbers=dn)
    y = y + p["b"] if bias else y
    for name in chain:
      y = _ACTIVATIONS[name](y)
    pooled = y.mean(axis=axes) if mean else y.sum(axis=axes)
    return pooled @ p["head"]

  shape = (5,) * spatial + (2,)
  x1 = jnp.asarray(rng.normal(size=(3,) + shape))
  x2 = jnp.asarray(rng.normal(size=(2,) + shape)) if x2_given else None
  trace_axes = (-1,) if trace else ()
  ntk, kernel = _kernels(f, params, x1, x2, trace_axes=trace_axes)
  assert len(ntk.explain(params, x1, x2).sides) == 1
  oracle.assert_matches(kernel, oracle.oracle_ntk(f, params, x1, x2,
                                                  trace_axes=trace_axes), 1e-10)


def _flax_cnn():
  nn = pytest.importorskip("flax.linen")

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3))(x))
      x = nn.gelu(nn.Conv(5, (3, 3))(x))  # tanh-GELU: its input fans out (a region)
      return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))
  model, x = CNN(), _normal(7, (3, 6, 6, 3))
  return (lambda p, x: model.apply(p, x)), model.init(jax.random.PRNGKey(0), x), x


def _equinox_cnn():
  eqx = pytest.importorskip("equinox")
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  layers = (eqx.nn.Conv2d(3, 4, 3, padding=1, key=keys[0]),
            eqx.nn.Conv2d(4, 5, 3, padding=1, key=keys[1]), eqx.nn.Linear(5, 3, key=keys[2]))
  params, static = eqx.partition(layers, eqx.is_array)

  def f(p, x):
    c1, c2, head = eqx.combine(p, static)
    # vmapped per example: the conv's output is reshaped [1, C, H, W] <-> [1, 1, C, H, W]
    # and relu's rule is batched (a zero broadcast to the example's shape)
    one = lambda xi: head(jax.nn.relu(c2(jax.nn.relu(c1(xi)))).mean(axis=(1, 2)))
    return jax.vmap(one)(x)
  return f, params, _normal(7, (3, 3, 6, 6))


@pytest.mark.parametrize("build", [_flax_cnn, _equinox_cnn])
def test_library_cnns_are_stacked(build):
  f, params, x1 = build()
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
  x2 = x1[:2] * 0.5
  ntk, kernel = _kernels(f, params, x1, x2, trace_axes=())
  explanation = ntk.explain(params, x1, x2)
  assert len(explanation.sides) == 1
  # The last conv's weight is followed through the activation (its own rule, diagonal)
  # and past the pool: a pooling head.
  assert any("reduce_sum" in use.steps for leaf in explanation.leaves
             if len(leaf.shape) == 4 for use in leaf.uses)
  oracle.assert_matches(kernel, oracle.oracle_ntk(f, params, x1, x2, trace_axes=()),
                        1e-10)


def two_branches(p, x):
  """Two convolutions, each before its own pool and head, the heads summed; the second
  kernel a product of two leaves (its cotangent flows through the stacked conv's
  kernel too)."""
  h = jax.nn.relu(_conv(x, p["w1"]) + p["b1"])
  a = jax.nn.relu(_conv(h, p["w2"])).mean(axis=(1, 2)) @ p["head"]
  b = jnp.tanh(_conv(h, p["w2"] * p["b2"])).sum(axis=(1, 2)) @ p["head"]
  return a + 0.5 * b


@pytest.mark.parametrize("x2_given", [True, False])
def test_two_stacked_convolutions_in_one_program(x2_given):
  params = _params()
  x1, x2 = _normal(7, (3, 6, 6, 3)), (_normal(8, (2, 6, 6, 3)) if x2_given else None)
  ntk, kernel = _kernels(two_branches, params, x1, x2, trace_axes=())
  assert len(ntk.explain(params, x1, x2).sides) == 2
  oracle.assert_matches(kernel, oracle.oracle_ntk(two_branches, params, x1, x2,
                                                  trace_axes=()), 1e-10)


def test_a_convolution_of_the_input_alone_is_not_stacked():
  """No cut lies below the input: its backward pass is not computed at all."""
  def f(p, x):
    return jax.nn.relu(_conv(x, p["w1"]) + p["b1"]).mean(axis=(1, 2)) @ p["head"][:4]
  params, x1 = _params(), _normal(7, (3, 6, 6, 3))
  ntk, kernel = _kernels(f, params, x1, None, trace_axes=())
  assert ntk.explain(params, x1).sides == ()
  oracle.assert_matches(kernel, oracle.oracle_ntk(f, params, x1, None, trace_axes=()),
                        1e-10)

"""Random small programs drawn from the rule set, structured NTK against the oracle.

A program is 2-5 layers on an (N, F) activation, each drawn from dense layers (plain,
transposed, scaled, cast weights), bias adds, products with a parameter vector,
nonlinearities, and the structural and linear primitives that have rules (reshape and
transpose, slice, pad, concatenate, rev, cumsum, reduce_sum and broadcast, select_n,
conv), followed by a dense head to (N, O).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st
from jax import lax

import ntk_compiler as nc
import oracle
import tiers

RTOL_F64 = 1e-10
# A float32 cast rounds the oracle's reverse-mode cotangent at the cast weight to float32
# (eps 6e-8); the engine contracts around the cast in float64.
RTOL_CAST = 1e-6

WIDTHS = [2, 3, 4, 6]
KINDS = ["dense", "dense_t", "dense_scaled", "dense_div", "dense_cast", "dense_reshape",
         "bias", "scale", "tanh", "relu", "sin", "reshape_transpose", "slice", "pad",
         "concat", "split", "rev", "cumsum", "sum_broadcast", "where", "conv"]


def _split(width):
  """width = a * b with a the smallest factor > 1 (a = 1 for a prime)."""
  a = next((d for d in range(2, width) if width % d == 0), 1)
  return a, width // a


def _layer(kind, arg, width):
  """(param shapes, apply(p, h), output width) of one layer on an (N, width) input."""
  if kind in ("dense", "dense_scaled", "dense_div", "dense_cast"):
    transform = {"dense": lambda w: w, "dense_scaled": lambda w: arg["c"] * w,
                 "dense_div": lambda w: w / arg["c"],
                 "dense_cast": lambda w: w.astype(jnp.float32)}[kind]
    return {"w": (width, arg["out"])}, lambda p, h: h @ transform(p["w"]), arg["out"]
  if kind == "dense_reshape":
    shape = (width, arg["out"])
    return ({"w": (width * arg["out"],)}, lambda p, h: h @ p["w"].reshape(shape),
            arg["out"])
  if kind == "dense_t":
    return {"w": (arg["out"], width)}, lambda p, h: h @ p["w"].T, arg["out"]
  if kind == "bias":
    return {"b": (width,)}, lambda p, h: h + p["b"], width
  if kind == "scale":
    return {"s": (width,)}, lambda p, h: h * p["s"], width
  if kind in ("tanh", "relu", "sin"):
    act = {"tanh": jnp.tanh, "relu": jax.nn.relu, "sin": jnp.sin}[kind]
    return {}, lambda p, h: act(h), width
  if kind == "reshape_transpose":
    a, b = _split(width)
    return {}, lambda p, h: h.reshape(-1, a, b).transpose(0, 2, 1).reshape(-1, width), width
  if kind == "slice":
    start, stride = min(arg["start"], width - 1), arg["stride"]
    return {}, lambda p, h: h[:, start::stride], len(range(start, width, stride))
  if kind == "pad":
    lo, hi, interior = arg["pad"]
    return ({}, lambda p, h: lax.pad(h, jnp.zeros((), h.dtype), ((0, 0, 0), (lo, hi, interior))),
            width + lo + hi + max(width - 1, 0) * interior)
  if kind == "concat":
    k = min(arg["start"] + 1, width)
    return {}, lambda p, h: jnp.concatenate([h, h[:, :k]], axis=1), width + k
  if kind == "split":  # rotate the features: split in two, concatenate swapped
    k = min(arg["start"] + 1, width - 1)
    if k < 1:
      return {}, lambda p, h: h, width

    def rotate(p, h):
      a, b = jnp.split(h, [k], axis=1)
      return jnp.concatenate([b, a], axis=1)
    return {}, rotate, width
  if kind == "rev":
    return {}, lambda p, h: h[:, ::-1], width
  if kind == "cumsum":
    return {}, lambda p, h: lax.cumsum(h, axis=1, reverse=arg["reverse"]), width
  if kind == "sum_broadcast":
    return {}, lambda p, h: 0.5 * h + jnp.sum(h, axis=1)[:, None], width
  if kind == "where":
    mask = np.arange(width) % 2 == 0
    return {}, lambda p, h: jnp.where(mask, h, -0.5 * h), width
  if kind == "conv":
    a, b = _split(width)
    k, stride, padding, c = arg["k"], arg["stride"], arg["padding"], arg["out"]
    if padding == "VALID" and a < k:
      padding = "SAME"
    spatial = -(-a // stride) if padding == "SAME" else (a - k) // stride + 1

    def conv(p, h):
      y = lax.conv_general_dilated(h.reshape(-1, a, b), p["c"], (stride,), padding,
                                   dimension_numbers=("NWC", "WIO", "NWC"))
      return y.reshape(-1, spatial * c)
    return {"c": (k, b, c)}, conv, spatial * c
  raise ValueError(kind)


_ARGS = st.fixed_dictionaries({
    "out": st.sampled_from([2, 3, 5]), "c": st.sampled_from([0.5, -2.0, 3.0]),
    "start": st.integers(0, 2), "stride": st.sampled_from([1, 2]),
    "pad": st.sampled_from([(1, 0, 0), (0, 2, 0), (1, 1, 1), (-1, 1, 0)]),
    "reverse": st.booleans(), "k": st.sampled_from([1, 2, 3]),
    "padding": st.sampled_from(["SAME", "VALID"])})


@st.composite
def programs(draw):
  layers = draw(st.lists(st.tuples(st.sampled_from(KINDS), _ARGS), min_size=2, max_size=5))
  return layers, draw(st.sampled_from(WIDTHS)), draw(st.sampled_from([1, 2, 3]))


def build(layers, in_width, out_width):
  """f(params, x) of a drawn program, and the shapes of its parameters."""
  shapes, applies, width = {}, [], in_width
  for i, (kind, arg) in enumerate(layers):
    layer_shapes, apply, width = _layer(kind, arg, width)
    shapes.update({f"{i}{name}": shape for name, shape in layer_shapes.items()})
    applies.append((str(i), apply))
  shapes["head"] = (width, out_width)

  def f(params, x):
    h = x
    for i, apply in applies:
      h = apply({k[1:]: v for k, v in params.items() if k[0] == i}, h)
    return h @ params["head"]
  return f, shapes


def _params(key, shapes):
  keys = jax.random.split(key, len(shapes))
  return {name: jax.random.normal(k, shape, jnp.float64) / math.sqrt(min(shape[0], 6))
          for k, (name, shape) in zip(keys, sorted(shapes.items()))}


LAYOUTS = [((), ()), ((-1,), ()), ((), (0,)), ((0, 1), ()), ((), (1,))]


@tiers.examples(1, 20)
@given(program=programs(), seed=st.integers(0, 2**16), layout=st.sampled_from(LAYOUTS),
       independent=st.booleans())
def test_random_program_matches_oracle(program, seed, layout, independent):
  layers, in_width, out_width = program
  f, shapes = build(layers, in_width, out_width)
  trace, diag = layout
  n1, n2 = (3, 3) if 0 in trace + diag else (3, 2)
  kp, k1, k2 = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = _params(kp, shapes)
  x1 = jax.random.normal(k1, (n1, in_width), jnp.float64)
  x2 = jax.random.normal(k2, (n2, in_width), jnp.float64)
  rtol = RTOL_CAST if any(kind == "dense_cast" for kind, _ in layers) else RTOL_F64
  ntk_fn = nc.compile_ntk(f, method="structured", trace_axes=trace, diagonal_axes=diag,
                          batch_independent=independent)
  for second in (x2, None):
    expected = oracle.oracle_ntk(f, params, x1, second, trace, diag)
    oracle.assert_matches(ntk_fn(params, x1, second), expected, rtol)

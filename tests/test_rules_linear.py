"""dot_general and conv rules: factor vs jax.jacfwd and declared structure, via check_rule."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax import lax

from ntk_compiler import rules
from ntk_compiler.check import check_rule
from ntk_compiler.rules import EqnInfo
from ntk_compiler.rules import linear
from ntk_compiler.structure import Structure
import tiers
from rule_helpers import check as _check, rule_result as _rule_result, normal as _normal

SEEDS = st.integers(0, 2**16)
# Sizes of the letters of a case in sorted order; few sets, so examples share compiles.
SIZES = st.sampled_from([(2, 3, 1, 2, 3), (3, 1, 2, 2, 4)])
DOT = lax.dot_general_p
CONV = lax.conv_general_dilated_p


def test_registered():
  assert rules._DEFAULT[DOT] is linear.dot_general_rule
  assert rules._DEFAULT[CONV] is linear.conv_rule


# ---------------------------------------------------------------------------- dot_general

# (lhs axes, rhs axes, ((lhs contract, rhs contract), (lhs batch, rhs batch))); letters
# name sizes, so equal letters get equal sizes.
DOT_CASES = [
    ("ab", "bc", (((1,), (0,)), ((), ()))),                   # matmul
    ("nab", "nbc", (((2,), (1,)), ((0,), (0,)))),             # batched matmul
    ("anb", "bcn", (((2,), (0,)), ((1,), (2,)))),             # batch axes not leading
    ("abc", "cdb", (((1, 2), (2, 0)), ((), ()))),             # two contracting, out of order
    ("nmab", "mbnc", (((3,), (1,)), ((0, 1), (2, 0)))),       # two batch axes, permuted
    ("a", "a", (((0,), (0,)), ((), ()))),                     # inner product
    ("a", "c", (((), ()), ((), ()))),                         # outer product
    ("na", "nc", (((), ()), ((0,), (0,)))),                   # batched outer product
]


def _dot_structure(w_axes, o_axes, dims, operand):
  """The structure the rule should declare, worked out from the letters."""
  (lc, rc), (lb, rb) = dims
  contract, batch = (rc, rb) if operand == 1 else (lc, lb)
  o_contract, o_batch = (lc, lb) if operand == 1 else (rc, rb)
  w_free = [d for d in range(len(w_axes)) if d not in contract + batch]
  n_other_free = len(o_axes) - len(o_contract) - len(o_batch)
  start = len(batch) + (n_other_free if operand == 1 else 0)
  return Structure(trace=tuple((start + i, d) for i, d in enumerate(w_free)),
                   diagonal=tuple(enumerate(batch)))


@pytest.mark.parametrize("lhs,rhs,dims", DOT_CASES)
@pytest.mark.parametrize("argnum", [0, 1])
@given(data=st.data(), seed=SEEDS)
def test_dot_general(lhs, rhs, dims, argnum, data, seed):
  sizes = dict(zip(sorted(set(lhs + rhs)), data.draw(SIZES, label="sizes")))
  x = _normal(seed, [sizes[c] for c in lhs])
  w = _normal(seed + 1, [sizes[c] for c in rhs])
  fn = lambda a, b: lax.dot_general(a, b, dims)  # noqa: E731
  check = _check(DOT, fn, x, w, argnum=argnum)
  w_axes, o_axes = (rhs, lhs) if argnum == 1 else (lhs, rhs)
  assert check.structure == _dot_structure(w_axes, o_axes, dims, argnum)


@given(seed=SEEDS)
def test_dot_general_from_jnp(seed):
  x, w = _normal(seed, (2, 3, 4)), _normal(seed + 1, (4, 5))
  check = _check(DOT, lambda a, b: jnp.einsum("nij,jk->nik", a, b), x, w, argnum=1)
  assert check.structure == Structure(trace=((2, 1),))
  check = _check(DOT, lambda a, b: a @ b, x, w, argnum=0)
  assert check.structure == Structure(trace=((0, 0), (1, 1)))


# ---------------------------------------------------------------------------- conv


def _conv_shapes(specs, spatial, filt, n, cin, cout):
  """lhs and kernel shapes for dimension-number strings like ('NHWC', 'HWIO', ...)."""
  lhs_spec, rhs_spec, _ = specs
  sp = [c for c in lhs_spec if c not in "NC"]
  lhs = {"N": n, "C": cin, **dict(zip(sp, spatial))}
  rhs = {"O": cout, **dict(zip([c for c in rhs_spec if c not in "OI"], filt))}
  return tuple(lhs[c] for c in lhs_spec), rhs


NHWC, NCHW = ("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW")
NWC, NCW = ("NWC", "WIO", "NWC"), ("NCW", "OIW", "NCW")
NDHWC, NCDHW = ("NDHWC", "DHWIO", "NDHWC"), ("NCDHW", "OIDHW", "NCDHW")
ODD = ("HNWC", "OHWI", "CWNH")

# (dimension numbers, filter shape, feature groups, conv keyword arguments); "dw" is
# depthwise: one group per input channel.
CONV_CASES = {
    "nhwc_same_stride": (NHWC, (3, 3), 1, dict(window_strides=(1, 2), padding="SAME")),
    "nchw_valid_rhs_dilation": (NCHW, (2, 3), 1, dict(window_strides=(2, 1),
                                                      padding="VALID", rhs_dilation=(1, 2))),
    "nhwc_transposed": (NHWC, (3, 2), 1,
                        dict(window_strides=(2, 1), padding=((2, 2), (0, 1)),
                             lhs_dilation=(2, 1), rhs_dilation=(1, 2))),
    "1d_nwc_same": (NWC, (3,), 1, dict(window_strides=(2,), padding="SAME")),
    "3d_ndhwc_valid": (NDHWC, (2, 1, 2), 1, dict(window_strides=(1, 2, 1), padding="VALID")),
    "odd_layouts": (ODD, (2, 3), 1, dict(window_strides=(2, 1), padding=((0, 1), (1, 1)))),
    "grouped_nhwc": (NHWC, (3, 3), 2, dict(window_strides=(2, 2), padding="SAME")),
    "grouped_3d_ncdhw": (NCDHW, (2, 2, 1), 2, dict(window_strides=(1, 1, 2), padding="SAME",
                                                   rhs_dilation=(1, 2, 1))),
    "depthwise_nchw_transposed": (NCHW, (2, 3), "dw",
                                  dict(window_strides=(2, 1), padding=((1, 1), (2, 0)),
                                       lhs_dilation=(2, 1), rhs_dilation=(1, 2))),
    "depthwise_1d_mixed_layouts": (("NCW", "WIO", "NWC"), (2,), "dw",
                                   dict(window_strides=(1,), padding="VALID",
                                        rhs_dilation=(2,))),
}


# (spatial, batch, output channels per group, input channels per group or depthwise
# input channels). Each compile costs more than a check, so the per-case tests take one
# set per case (alternating) and draw values only; the others draw the set.
SIZE_SETS = [(4, 1, 2, 1, 3), (5, 2, 1, 2, 2)]
CASE_SIZES = {name: SIZE_SETS[i % 2] for i, name in enumerate(CONV_CASES)}


def _conv_setup(case, sizes, seed, dtype=jnp.float64):
  specs, filt, groups, kwargs = case
  spatial, n, per_group, cin_g, cin_dw = sizes
  if groups == "dw":
    g = cin = cin_dw
    cin_g, cout = 1, cin * per_group
  else:
    g, cin, cout = groups, groups * cin_g, groups * per_group
  x_shape, rhs = _conv_shapes(specs, (spatial,) * len(filt), filt, n, cin, cout)
  rhs["I"] = cin_g
  w_shape = tuple(rhs[c] for c in specs[1])
  fn = lambda x, w: lax.conv_general_dilated(  # noqa: E731
      x, w, dimension_numbers=specs, feature_group_count=g, **kwargs)
  return fn, _normal(seed, x_shape, dtype), _normal(seed + 1, w_shape, dtype), g


def _jit_factor(rule):
  """The rule with its factor under jit, as the engine runs it (one compile, not many)."""
  def jitted(eqn, operand):
    result = rule(eqn, operand)
    return result and dataclasses.replace(result, factor=jax.jit(result.factor))
  return jitted


def _check_conv(fn, x, w, argnum):
  return check_rule(CONV, fn, x, w, argnum=argnum, rule=_jit_factor(linear.conv_rule))


# The default tier: one case per kind of convolution (plain, transposed, grouped,
# depthwise, 3-d); the full tier every layout and padding.
CONV_DEFAULT_TIER = {"nhwc_same_stride", "nhwc_transposed", "grouped_3d_ncdhw",
                     "depthwise_1d_mixed_layouts", "3d_ndhwc_valid"}
CONV_TIERED = tiers.representative(list(CONV_CASES),
                                   lambda name: {name} & CONV_DEFAULT_TIER)


@pytest.mark.parametrize("name", CONV_TIERED)
@given(seed=SEEDS)
def test_conv_kernel(name, seed):
  fn, x, w, g = _conv_setup(CONV_CASES[name], CASE_SIZES[name], seed)
  _, rhs_spec, out_spec = CONV_CASES[name][0]
  pair = ((out_spec.index("C"), rhs_spec.index("O")),)
  expected = Structure(trace=pair) if g == 1 else Structure(diagonal=pair)
  assert _check_conv(fn, x, w, argnum=1).structure == expected


@pytest.mark.parametrize("name", CONV_TIERED)
@given(seed=SEEDS)
def test_conv_input(name, seed):
  fn, x, w, _ = _conv_setup(CONV_CASES[name], CASE_SIZES[name], seed)
  lhs_spec, _, out_spec = CONV_CASES[name][0]
  expected = Structure(trace=((out_spec.index("N"), lhs_spec.index("N")),))
  assert _check_conv(fn, x, w, argnum=0).structure == expected


@pytest.mark.parametrize("argnum", [0, 1])
@given(seed=SEEDS)
def test_conv_factor_shapes(argnum, seed):
  """Factor axes: y free axes ascending, then w free axes ascending."""
  x, w = _normal(seed, (2, 5, 4, 3)), _normal(seed + 1, (3, 2, 3, 6))
  fn = lambda x, w: lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  result = _rule_result(CONV, fn, x, w, argnum=argnum)
  factor = result.factor(x, w)
  if argnum == 1:  # (n, h', w') x (h, w, i): the patches
    assert factor.shape == (2, 3, 3, 3, 2, 3) and result.reads == (0,)
    np.testing.assert_array_equal(factor[1, 2, 1], x[1, 2:5, 1:3, :])
  else:  # (h', w', o) x (h, w, c)
    assert factor.shape == (3, 3, 6, 5, 4, 3) and result.reads == (1,)
    np.testing.assert_array_equal(factor[1, 0, 4, 1:4, 0:2, :], w[..., 4])
    assert not np.any(factor[1, 0, 4, 0]) and not np.any(factor[1, 0, 4, :, 2:])


@pytest.mark.parametrize("argnum", [0, 1])
@given(seed=SEEDS)
def test_conv_factor_under_jit_and_vmap(argnum, seed):
  fn = lambda x, w: lax.conv_general_dilated(  # noqa: E731
      x, w, (2, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"),
      feature_group_count=2)
  xs, ws = _normal(seed, (3, 1, 4, 4, 5)), _normal(seed + 1, (3, 4, 2, 3, 2))
  result = _rule_result(CONV, fn, xs[0], ws[0], argnum=argnum)
  batched = jax.jit(jax.vmap(result.factor))(xs, ws)
  for k in range(3):
    np.testing.assert_allclose(batched[k], result.factor(xs[k], ws[k]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("argnum", [0, 1])
@given(sizes=st.sampled_from(SIZE_SETS), seed=SEEDS)
def test_conv_float32(argnum, sizes, seed):
  fn, x, w, _ = _conv_setup(CONV_CASES["grouped_nhwc"], sizes, seed, jnp.float32)
  result = _rule_result(CONV, fn, x, w, argnum=argnum)
  assert result.factor(x, w).dtype == jnp.float32
  assert _check(CONV, fn, x, w, argnum=argnum).structure is not None


@pytest.mark.parametrize("argnum", [0, 1])
@given(seed=SEEDS)
def test_conv_preferred_element_type(argnum, seed):
  x, w = _normal(seed, (2, 4, 4, 2), jnp.float32), _normal(seed + 1, (2, 2, 2, 3), jnp.float32)
  fn = lambda x, w: lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.float64)
  result = _rule_result(CONV, fn, x, w, argnum=argnum)
  assert result.factor(x, w).dtype == jnp.float64
  assert _check(CONV, fn, x, w, argnum=argnum).structure is not None


@pytest.mark.parametrize("dn,batch_groups", [(NCW, 2), (NWC, 3)])
@given(seed=SEEDS)
def test_conv_batch_groups(dn, batch_groups, seed):
  """The kernel's out feature selects a batch slice of the lhs (diagonal); as the lhs,
  the batch axis shrinks, so the rule declines (dense fallback)."""
  x_shape = tuple({"N": 2 * batch_groups, "C": 3, "W": 5}[c] for c in dn[0])
  w_shape = tuple({"O": 2 * batch_groups, "I": 3, "W": 2}[c] for c in dn[1])
  x, w = _normal(seed, x_shape), _normal(seed + 1, w_shape)
  fn = lambda x, w: lax.conv_general_dilated(  # noqa: E731
      x, w, (1,), ((1, 0),), dimension_numbers=dn, batch_group_count=batch_groups)
  pair = ((dn[2].index("C"), dn[1].index("O")),)
  assert _check(CONV, fn, x, w, argnum=1).structure == Structure(diagonal=pair)
  assert _rule_result(CONV, fn, x, w, argnum=0) is None
  assert _check(CONV, fn, x, w, argnum=0).structure is None


@given(seed=SEEDS)
def test_conv_kernel_factor_is_compact(seed):
  """The depthwise kernel factor is (y spatial/batch) x Cout x (kernel spatial), not the
  dense |y| x |w| Jacobian."""
  x, w = _normal(seed, (2, 6, 6, 4)), _normal(seed + 1, (3, 3, 1, 8))
  fn = lambda x, w: lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=4)
  factor = _rule_result(CONV, fn, x, w, argnum=1).factor(x, w)
  assert factor.shape == (2, 6, 6, 8, 3, 3, 1)
  assert factor.size < math.prod((2, 6, 6, 8)) * w.size

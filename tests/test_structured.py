"""method="structured" against the float64 oracle over both zoos and the axes grid, and
`explain()` checks that the intended structure fired."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax import lax

import models
import models_structured
import models_control
import models_selection
import ntk_compiler as nc
import oracle
from models import mlp
import tiers

RTOL_F64 = 1e-10
RTOL_F32 = 1e-4  # as test_methods.py: float32 rounding of O(100)-term sums

ALL = models.ZOO + models_structured.ZOO + models_selection.ZOO + models_control.ZOO
# Models JAX cannot reverse-differentiate as written: the oracle uses forward mode.
FORWARD_ORACLE = {"while_fixed_trips"}
BY_NAME = {m.name: m for m in ALL}
assert len(BY_NAME) == len(ALL), "model names must be unique"

TRACE = {2: [(), (-1,), (0, 1)], 3: [(), (-1,), (1, 2)]}
DIAGONAL = [(), (1,), (0,)]

# Tiers (tests/tiers.py). The full tier runs every model in every layout once, with x2
# given and omitted alternating along the layouts and from one model to the next: each
# model sees both, and each (layout, x2) pair occurs across the models; the two
# transformers (one code path, several seconds per compilation) split the layouts between
# them. HYPOTHESIS_PROFILE=thorough runs the whole product. The default tier runs a subset
# that touches every primitive of the zoo, every layout and both x2 modes, cheap models
# first.
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
SPLIT_LAYOUTS = {"transformer_1head": 0, "transformer_2head_causal": 1}
SLOW = {"transformer_1head": 6, "transformer_2head_causal": 6, "resnet_block": 4, "cnn": 4}

# Cases that expose an engine bug: (model, trace, diagonal, with_x2) -> reason.
KNOWN_BUGS = {}


def _axes(model):
  for trace in TRACE[model.out_ndim]:
    for diag in DIAGONAL:
      if not {a % model.out_ndim for a in trace} & set(diag):
        yield trace, diag


def _grid():
  for index, model in enumerate(ALL):
    layouts = list(_axes(model))
    if not THOROUGH and model.name in SPLIT_LAYOUTS:
      layouts = layouts[SPLIT_LAYOUTS[model.name]::2]
    for k, (trace, diag) in enumerate(layouts):
      for with_x2 in (True, False):
        if not (THOROUGH or (k + index) % 2 == with_x2):
          continue
        reason = KNOWN_BUGS.get((model.name, trace, diag, with_x2))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(model, trace, diag, with_x2, marks=marks,
                           id=f"{model.name}-t{trace}-d{diag}-{'x2' if with_x2 else 'no_x2'}")


def _features(model, trace, diag, with_x2):
  return ([("primitive", name) for name in tiers.primitives(model)] +
          [("axes", model.out_ndim, trace, diag), ("x2", with_x2),
           ("batch_independent", model.batch_independent)])


def _cost(model, trace, diag, with_x2):
  return SLOW.get(model.name, 1)


@functools.lru_cache(maxsize=8)
def _compiled(model, trace, diag, batch_independent):
  """One NTK function per configuration, so hypothesis' draws reuse its compilations."""
  return nc.compile_ntk(model.f, method="structured", trace_axes=trace, diagonal_axes=diag,
                        batch_independent=batch_independent)


@functools.lru_cache(maxsize=16)
def _jitted(f):
  return jax.jit(f)


@functools.lru_cache(maxsize=64)
def _full_kernel(model, seed, n1, n2, with_x2, dtype):
  """The oracle's full kernels, shared by every axes configuration of a draw.

  f is jitted only so that repeated draws of one shape reuse a compiled Jacobian; the
  oracle still takes full Jacobians of f by reverse mode and contracts them.
  """
  params, x1, x2 = model.draw(seed, n1, n2, dtype)
  mode = "fwd" if model.name in FORWARD_ORACLE else "rev"
  return oracle.full_kernel(_jitted(model.f), params, x1, x2 if with_x2 else None, mode=mode)


def _expected(model, seed, n1, n2, with_x2, trace, diag, dtype=jnp.float64):
  """`oracle.oracle_ntk`, from the cached full kernels."""
  fulls, tree = _full_kernel(model, seed, n1, n2, with_x2, dtype)
  return oracle.apply_layouts(fulls, tree, trace, diag)


def _rtol(model, default=RTOL_F64):
  return max(default, models_structured.RTOL.get(model.name, 0.0))


def _check(model, trace, diag, seed, n1, n2, with_x2, batch_independent,
           dtype=jnp.float64, rtol=RTOL_F64):
  if 0 in {a % model.out_ndim for a in trace + diag}:
    n2 = n1  # traced / diagonal batch axes need equal batches
  params, x1, x2 = model.draw(seed, n1, n2, dtype)
  ntk_fn = _compiled(model, trace, diag, batch_independent)
  kernel = ntk_fn(params, x1, x2 if with_x2 else None)
  expected = _expected(model, seed, n1, n2, with_x2, trace, diag, dtype)
  oracle.assert_matches(kernel, expected, _rtol(model, rtol))


# ------------------------------------------------------------------- against the oracle

@pytest.mark.parametrize("model, trace, diag, with_x2",
                         tiers.representative(_grid(), _features, _cost))
@tiers.examples(2)
@given(seed=st.integers(0, 2**16), independent=st.booleans())
def test_matches_oracle(model, trace, diag, with_x2, seed, independent):
  _check(model, trace, diag, seed, 3, 2, with_x2,
         batch_independent=independent and model.batch_independent)


FLOAT32 = ["mlp_tanh", "cnn", "sequence", "multi_output", "conv_depthwise", "avg_pools",
           "tied", "lora", "einsum_layers", "cast_bfloat16", "embedding_mlp", "gru_like"]


FLOAT32_DEFAULT_TIER = {"mlp_tanh", "cast_bfloat16", "embedding_mlp"}


@pytest.mark.parametrize("model", tiers.representative(
    [BY_NAME[n] for n in FLOAT32], lambda m: {m.name} & FLOAT32_DEFAULT_TIER),
    ids=lambda m: m.name)
@tiers.examples(2)
@given(seed=st.integers(0, 2**16), with_x2=st.booleans())
def test_matches_oracle_float32(model, seed, with_x2):
  _check(model, (-1,), (), seed, 3, 2, with_x2, model.batch_independent,
         dtype=jnp.float32, rtol=RTOL_F32)


# --------------------------------------------------------------- explain(): structure

def _explain(f, params, x, **kwargs):
  kwargs.setdefault("batch_independent", True)
  return nc.compile_ntk(f, method="structured", **kwargs).explain(params, x)


def _leaf(explanation, path):
  (leaf,) = [l for l in explanation.leaves if l.path == path]
  return leaf


def _factor_rules(use):
  return [rule for rule, _, _ in use.factors]


def _structured_factors(use):
  """The factors that carry axes (scalars such as a transpose's 1 left out)."""
  return [f for f in use.factors if f[1]]


def test_mlp_weights_are_structured():
  model = mlp()
  params, x, _ = model.draw(0, 3, 2, jnp.float64)
  explanation = _explain(model.f, params, x)
  assert explanation.method == "structured"
  assert explanation.fallbacks == []
  for i in range(3):
    (use,) = _leaf(explanation, f"[{i}]['w']").uses
    assert "dot_general" in use.steps
    assert "dot_general" in _factor_rules(use)
    assert not use.dense
    (use,) = _leaf(explanation, f"[{i}]['b']").uses
    assert "add" in use.steps and not use.dense


# Each transform of a weight w before `x @ w`, with the raw parameter's shape.
TRANSFORMS = {
    "transpose": (lambda w: w.T, (5, 3)),
    "mul": (lambda w: 0.5 * w, (3, 5)),
    "div": (lambda w: w / 3, (3, 5)),
    "neg": (lambda w: -w, (3, 5)),
    "convert_element_type": (lambda w: w.astype(jnp.float32), (3, 5)),
    "reshape": (lambda w: w.reshape(3, 5), (15,)),
}


def _transformed(transform, shape):
  def f(p, x):
    return jnp.tanh(x @ transform(p["w"])) @ p["v"]
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w": jax.random.normal(k[0], shape, jnp.float64) * 0.5,
            "v": jax.random.normal(k[1], (5, 2), jnp.float64) * 0.5}
  return f, params, jax.random.normal(k[2], (3, 3), jnp.float64)


@pytest.mark.parametrize("prim", list(TRANSFORMS))
def test_transformed_weight_as_structured_as_plain(prim):
  """A transposed / scaled / negated / cast / reshaped weight composes that primitive
  into its view, then dot_general: no dense fallback, the same factor as `x @ w`."""
  f, params, x = _transformed(*TRANSFORMS[prim])
  plain_f, plain_params, _ = _transformed(lambda w: w, (3, 5))
  explanation = _explain(f, params, x, trace_axes=())
  plain = _leaf(_explain(plain_f, plain_params, x, trace_axes=()), "['w']")
  assert explanation.fallbacks == []
  (use,) = _leaf(explanation, "['w']").uses
  assert use.steps == (prim, "dot_general")
  assert not use.dense
  assert _structured_factors(use) == _structured_factors(plain.uses[0])
  assert _structured_factors(use)[0][0] == "dot_general"
  assert _leaf(explanation, "['w']").contraction == plain.contraction
  rtol = 1e-6 if prim == "convert_element_type" else RTOL_F64  # see models_structured.RTOL
  for x2 in (None, x[:2]):
    kernel = nc.compile_ntk(f, method="structured", trace_axes=())(params, x, x2)
    oracle.assert_matches(kernel, oracle.oracle_ntk(f, params, x, x2, ()), rtol)


@pytest.mark.parametrize("name", ["transformed_weights", "cast_float32", "lora",
                                  "closed_over_constants", "remat", "inner_jit",
                                  "einsum_layers", "token_bias"])
def test_indirect_weights_have_no_dense_fallback(name):
  """Weights reached through casts, products, closures, remat and inner jit stay
  structured: every weight has a dot_general factor and nothing falls back."""
  model = BY_NAME[name]
  params, x, _ = model.draw(0, 3, 2, jnp.float64)
  explanation = _explain(model.f, params, x)
  assert explanation.fallbacks == []
  for leaf in explanation.leaves:
    if len(leaf.shape) >= 2:
      assert all("dot_general" in _factor_rules(u) for u in leaf.uses), leaf


@pytest.mark.parametrize("name, leaves", tiers.representative([
    ("cnn", ["['c1']", "['c2']"]),
    ("conv_strided_same", ["['c']"]),
    ("conv_explicit_padding", ["['c1']", "['c2']"]),
    ("conv_rhs_dilation", ["['c']", "['c2']"]),
    ("conv_grouped", ["['c']"]),
    ("conv_depthwise", ["['dw']", "['pw']"]),
    ("conv_nchw", ["['c']"]),
    ("conv1d_sequence", ["['c']"]),
    ("conv_transpose", ["['c']", "['c2']"]),
    ("resnet_block", ["['c1']", "['c2']"]),
], lambda name, leaves: {name} & {"cnn", "conv_grouped", "conv_transpose",
                                   "resnet_block"}))
def test_conv_kernels_have_a_conv_factor(name, leaves):
  model = BY_NAME[name]
  params, x, _ = model.draw(0, 3, 2, jnp.float64)
  explanation = _explain(model.f, params, x)
  assert explanation.fallbacks == []
  for path in leaves:
    for use in _leaf(explanation, path).uses:
      assert use.steps[0] == "conv_general_dilated"
      assert "conv_general_dilated" in _factor_rules(use)


def test_tied_weights_have_two_uses():
  model = BY_NAME["tied"]
  params, x, _ = model.draw(0, 3, 2, jnp.float64)
  explanation = _explain(model.f, params, x)
  assert explanation.fallbacks == []
  t, v = _leaf(explanation, "['t']"), _leaf(explanation, "['v']")
  assert len(t.uses) == 2 and len(v.uses) == 2
  assert all(u.steps[0] == "dot_general" for u in t.uses)
  assert sorted(u.steps[0] for u in v.uses) == ["dot_general", "transpose"]


def test_scalar_parameter_has_a_use():
  model = BY_NAME["temperature"]
  params, x, _ = model.draw(0, 3, 2, jnp.float64)
  explanation = _explain(model.f, params, x)
  assert _leaf(explanation, "['gain']").shape == ()
  assert _leaf(explanation, "['gain']").uses[0].steps[0] == "mul"
  assert len(_leaf(explanation, "['temp']").uses) == 1


def test_temperature_in_a_denominator_is_not_a_fallback():
  """div's denominator is nonlinear: the view ends there, like before tanh, and a
  learned temperature passes strict=True."""
  model = BY_NAME["temperature"]
  params, x1, x2 = model.draw(0, 3, 2, jnp.float64)
  assert _explain(model.f, params, x1).fallbacks == []
  ntk_fn = nc.compile_ntk(model.f, method="structured", strict=True)
  oracle.assert_matches(ntk_fn(params, x1, x2), oracle.oracle_ntk(model.f, params, x1, x2),
                        RTOL_F64)


def test_scan_and_unread_parameters():
  """The RNN's weights are followed into the scan body (no fallback); a leaf used only
  under stop_gradient and a leaf f never reads have no uses and no term."""
  model = BY_NAME["rnn_scan"]
  params, x, _ = model.draw(0, 3, 2, jnp.float64)
  explanation = _explain(model.f, params, x)
  assert explanation.fallbacks == []
  (use,) = _leaf(explanation, "['wh']").uses
  assert use.steps[0] == "dot_general" and "before tanh" in use.reason
  assert use.cut_shape == (3, 1, 4)  # stacked over the 3 steps of (1, 4) values
  model = BY_NAME["stop_gradient_unused"]
  params, x, _ = model.draw(0, 3, 2, jnp.float64)
  explanation = _explain(model.f, params, x)
  assert explanation.fallbacks == []
  for path in ("['unused']", "['frozen']"):
    leaf = _leaf(explanation, path)
    assert leaf.uses == () and leaf.contraction == "unused"
  assert any("dot_general" in _factor_rules(u) for u in _leaf(explanation, "['w']").uses)


def test_lora_factors_chain_two_contractions():
  model = BY_NAME["lora"]
  params, x, _ = model.draw(0, 3, 2, jnp.float64)
  explanation = _explain(model.f, params, x)
  for path in ("['a']", "['b']", "['a2']", "['b2']"):
    (use,) = _leaf(explanation, path).uses
    factors = _structured_factors(use)
    assert [rule for rule, _, _ in factors] == ["dot_general", "dot_general"]
    assert [batched for _, _, batched in factors] == [False, True]  # b (or a), then x


# ------------------------------------------------------------- strict, rule overlays

def _gathered(p, x):
  """w enters a gather along two axes at once; with the gather's rule switched off
  (`NO_GATHER_RULE`) that is a dense fallback."""
  rows, cols = jnp.array([[1, 0, 3, 2]] * 3).T, jnp.array([[0, 2, 1]] * 4)
  return jnp.tanh(x @ p["w"][rows, cols]) @ p["v"]


NO_GATHER_RULE = {lax.gather_p: None}


def _gather_params():
  k = jax.random.split(jax.random.PRNGKey(1), 3)
  return ({"w": jax.random.normal(k[0], (4, 3), jnp.float64),
           "v": jax.random.normal(k[1], (3, 2), jnp.float64)},
          jax.random.normal(k[2], (3, 4), jnp.float64))


def test_missing_rule_is_a_reported_dense_fallback():
  params, x = _gather_params()
  explanation = _explain(_gathered, params, x, rules=NO_GATHER_RULE)
  assert explanation.fallbacks == [("['w']", "before gather: no rule for it")]
  kernel = nc.compile_ntk(_gathered, method="structured", rules=NO_GATHER_RULE)(params, x)
  oracle.assert_matches(kernel, oracle.oracle_ntk(_gathered, params, x), RTOL_F64)
  # With its rule (a two-axis gather: an outer product of one-hot factors), no fallback.
  assert not _explain(_gathered, params, x).fallbacks


def test_strict_raises_naming_the_parameter():
  params, x = _gather_params()
  ntk_fn = nc.compile_ntk(_gathered, method="structured", strict=True,
                          rules=NO_GATHER_RULE)
  with pytest.raises(NotImplementedError, match=r"params\['w'\].*gather"):
    ntk_fn(params, x)


@pytest.mark.full
def test_strict_accepts_nonlinear_stops_and_structured_models():
  """sort / cumprod are nonlinear: the view stops before them without a fallback."""
  params, x = _gather_params()
  for f in (lambda p, x: jnp.tanh(x @ jnp.sort(p["w"], axis=0)) @ p["v"],
            lambda p, x: jnp.tanh(x @ lax.cumprod(p["w"], axis=0)) @ p["v"]):
    kernel = nc.compile_ntk(f, method="structured", strict=True)(params, x)
    oracle.assert_matches(kernel, oracle.oracle_ntk(f, params, x), RTOL_F64)
  model = mlp()
  params, x1, x2 = model.draw(0, 3, 2, jnp.float64)
  ntk_fn = nc.compile_ntk(model.f, method="structured", strict=True, trace_axes=())
  oracle.assert_matches(ntk_fn(params, x1, x2),
                        oracle.oracle_ntk(model.f, params, x1, x2, ()), RTOL_F64)


@pytest.mark.parametrize("name, prim, with_x2", tiers.representative(
    [pytest.param(name, prim, with_x2, id=f"{name}-{'x2' if with_x2 else 'no_x2'}")
     for name, prim in [("mlp_tanh", lax.dot_general_p), ("cnn", lax.conv_general_dilated_p),
                        ("transformed_weights", lax.transpose_p)]
     for with_x2 in (True, False)],
    lambda name, prim, with_x2: [name, with_x2]))
def test_rule_switched_off_falls_back_exactly(name, prim, with_x2):
  model = BY_NAME[name]
  params, x1, x2 = model.draw(0, 3, 2, jnp.float64)
  x2 = x2 if with_x2 else None
  ntk_fn = nc.compile_ntk(model.f, method="structured", trace_axes=(),
                          batch_independent=True, rules={prim: None})
  fallbacks = ntk_fn.explain(params, x1).fallbacks
  assert fallbacks and all(f"before {prim}: no rule for it" == r for _, r in fallbacks)
  assert _explain(model.f, params, x1).fallbacks == []  # the default is untouched
  oracle.assert_matches(ntk_fn(params, x1, x2),
                        oracle.oracle_ntk(model.f, params, x1, x2, ()), RTOL_F64)


def test_auto_picks_structured_for_a_wide_mlp():
  model = mlp(jnp.tanh, sizes=(3, 64, 64, 64))
  ntk_fn = nc.compile_ntk(model.f, method="auto", trace_axes=(), batch_independent=True)
  params, x1, x2 = model.draw(0, 8, 8, jnp.float64)
  assert ntk_fn.plan(params, x1).method == "structured"
  assert ntk_fn.plan(params, x1, x2).method == "structured"
  params, x1, _ = model.draw(0, 2, 2, jnp.float64)  # small enough for the oracle
  assert ntk_fn.plan(params, x1).method == "structured"
  oracle.assert_matches(ntk_fn(params, x1),
                        oracle.oracle_ntk(model.f, params, x1, None, ()), RTOL_F64)


def test_symmetric_and_jittable():
  model = BY_NAME["tied"]
  params, x1, _ = model.draw(3, 4, 4, jnp.float64)
  ntk_fn = nc.compile_ntk(model.f, method="structured", trace_axes=())
  kernel = np.asarray(jax.jit(ntk_fn)(params, x1))
  np.testing.assert_allclose(kernel, kernel.transpose(1, 0, 3, 2), rtol=1e-12)
  oracle.assert_matches(kernel, oracle.oracle_ntk(model.f, params, x1, None, ()), RTOL_F64)

"""validate=True / verify(): wrong user rules and wrong kernels are caught; check_rule at
random points; unregister_rule / rules_overlay restore the registry; user rules win
over the built-in nonlinear set; JAX 0.10.2's vmap-of-VJP bug (issue 8, cases 5 and 7)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import ntk_compiler as nc
from ntk_compiler import rules
from ntk_compiler.rules import RuleResult, elementwise
from ntk_compiler.structure import Structure
from oracle import assert_matches, oracle_ntk
from tiers import full


def normal(seed, shape, dtype=jnp.float64):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


@pytest.fixture(autouse=True)
def _no_leaked_rules():
  """Every test leaves the registry as it found it."""
  before = dict(rules.registry()), {p: list(s) for p, s in rules._USER.items()}
  yield
  assert (dict(rules.registry()), rules._USER) == before, "user rules leaked"


def mlp(p, x):
  return jnp.tanh(x * p["s"] @ p["w"]) @ p["v"]


P = {"s": normal(0, (3,)), "w": normal(1, (3, 5)), "v": normal(2, (5, 2))}
X1, X2 = normal(3, (4, 3)), normal(4, (3, 3))


def scaled(rule, by):
  """`rule` with every factor multiplied by `by`: a wrong factor, right structure."""
  def wrong(eqn, operand):
    result = rule(eqn, operand)
    if not isinstance(result, RuleResult) or result.factor is None:
      return result
    return dataclasses.replace(result, factor=lambda *ops: by * result.factor(*ops))
  return wrong


def traced_mul(eqn, operand):
  """A wrong structure for x * s: 'traced' (one block for all entries), factor s[0]."""
  ndim = len(eqn.out_aval.shape)
  if len(eqn.in_avals[operand].shape) != ndim:
    return None
  other = 1 - operand
  return RuleResult(Structure(trace=tuple((a, a) for a in range(ndim))),
                    lambda *ops: jnp.ravel(jnp.asarray(ops[other]))[0], reads=(other,))


# ---------------------------------------------------------------------------------
# validate=True and verify().

@pytest.mark.parametrize("method", ["structured", pytest.param("jacobian", marks=full),
                                    pytest.param("ntk_vp", marks=full)])
def test_right_kernel_passes(method):
  ntk_fn = nc.compile_ntk(mlp, method=method, validate=True)
  assert_matches(ntk_fn(P, X1, X2), oracle_ntk(mlp, P, X1, X2), 1e-10)
  report = ntk_fn.verify(P, X1, X2)
  assert report.ok and report.relative_error <= report.tolerance
  assert report.tolerance == pytest.approx(np.sqrt(np.finfo(np.float64).eps))
  assert report.probes == 2  # the traced output axis: one probe per index


def test_wrong_factor_raises_and_is_measured():
  wrong = {lax.mul_p: scaled(elementwise.mul_rule, 1.01)}
  ntk_fn = nc.compile_ntk(mlp, method="structured", rules=wrong, validate=True)
  with pytest.raises(nc.ValidationError, match=r"user rule for mul \(operand 1.*"
                     r"the factor is wrong") as e:
    ntk_fn(P, X1, X2)
  assert "disagrees with jvp∘vjp" in str(e.value)
  report = ntk_fn.verify(P, X1, X2)
  assert not report.ok
  assert [(r.primitive, r.operand, r.ok) for r in report.rules] == [(lax.mul_p, 1, False)]
  assert report.relative_error > 1e-3  # s's term is scaled by 1.01² = 1.0201
  plain = nc.compile_ntk(mlp, method="structured", rules=wrong)  # silently wrong
  with pytest.raises(AssertionError):
    assert_matches(plain(P, X1, X2), oracle_ntk(mlp, P, X1, X2), 1e-6)


def test_wrong_structure_raises():
  ntk_fn = nc.compile_ntk(mlp, method="structured", rules={lax.mul_p: traced_mul},
                          validate=True)
  with pytest.raises(nc.ValidationError, match=r"mul \(operand 1.*"
                     r"declared structure is wrong: the Jacobian contradicts"):
    ntk_fn(P, X1, X2)


def test_wrong_structure_at_degenerate_operands_found_at_random_ones():
  """With all-ones inputs the traced claim holds at the real operands (and the kernel
  is right there): only the random operand values expose the rule."""
  ones = jnp.ones((4, 3))
  ntk_fn = nc.compile_ntk(mlp, method="structured", rules={lax.mul_p: traced_mul})
  report = ntk_fn.verify(P, ones)
  assert report.relative_error <= report.tolerance
  (bad,) = report.rules
  assert not bad.ok and "at random operand values" in bad.error
  with pytest.raises(nc.ValidationError, match="random operand values"):
    nc.compile_ntk(mlp, method="structured", rules={lax.mul_p: traced_mul},
                   validate=True)(P, ones)


def test_right_user_rule_passes_and_builtin_rules_are_not_rechecked():
  right = {lax.mul_p: scaled(elementwise.mul_rule, 1.0)}
  ntk_fn = nc.compile_ntk(mlp, method="structured", rules=right, validate=True)
  assert_matches(ntk_fn(P, X1, X2), oracle_ntk(mlp, P, X1, X2), 1e-10)
  report = ntk_fn.verify(P, X1, X2)
  assert [r.primitive for r in report.rules] == [lax.mul_p] and report.ok
  assert nc.compile_ntk(mlp, method="structured").verify(P, X1, X2).rules == ()


@pytest.mark.parametrize("trace_axes,diagonal_axes", [
    ((), ()), pytest.param((-1,), (), marks=full), pytest.param((), (-1,), marks=full),
    pytest.param((0,), (), marks=full), ((), (0,)), pytest.param((0, 1), (), marks=full)])
def test_wrong_kernel_caught_in_every_layout(trace_axes, diagonal_axes):
  """A kernel corrupted after the fact (an upstream bug's stand-in) is caught, with
  traced and diagonal axes, including the batch axis."""
  x2 = None if 0 in trace_axes + diagonal_axes else X2
  ntk_fn = nc.compile_ntk(mlp, method="jacobian", trace_axes=trace_axes,
                          diagonal_axes=diagonal_axes, validate=True)
  right = ntk_fn._jitted
  assert ntk_fn.verify(P, X1, x2).ok
  ntk_fn._jitted = lambda *args: jax.tree_util.tree_map(lambda k: k * 1.01, right(*args))
  report = ntk_fn.verify(P, X1, x2)
  assert report.relative_error == pytest.approx(0.01 / 1.01, rel=1e-6)
  with pytest.raises(nc.ValidationError, match=r"disagrees with jvp∘vjp by 9\.9\de-03"
                     r"[^\n]*(?s:.*)method='ntk_vp'"):
    ntk_fn(P, X1, x2)


def test_pytree_outputs_checked_leaf_by_leaf():
  f = lambda p, x: {"a": mlp(p, x), "b": jnp.sin(x @ p["w"])}
  ntk_fn = nc.compile_ntk(f, method="jacobian", trace_axes=(), validate=True)
  right = ntk_fn._jitted
  ntk_fn(P, X1, X2)
  ntk_fn._jitted = lambda *args: {**right(*args), "b": right(*args)["b"] * 1.01}
  report = ntk_fn.verify(P, X1, X2)
  assert report.leaf_errors[0] < 1e-12 < 1e-3 < report.leaf_errors[1]


def test_custom_vjp_model_is_checked_through_its_vjp():
  """No forward mode through custom_vjp: the check transposes the x1 VJP instead."""
  @jax.custom_vjp
  def sin(x):
    return jnp.sin(x)
  sin.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda c, g: (g * c,))
  f = lambda p, x: sin(x @ p["w"]) @ p["v"]
  report = nc.compile_ntk(f, method="jacobian").verify(P, X1, X2)
  assert report.ok and report.relative_error < 1e-12


def test_signature_checked_once_and_tracers_refused():
  ntk_fn = nc.compile_ntk(mlp, method="structured", validate=True)
  with pytest.raises(TypeError, match="validate=True.*tracers.*outside"):
    jax.jit(ntk_fn)(P, X1)
  with pytest.raises(TypeError, match="verify.*tracers"):
    jax.jit(ntk_fn.verify)(P, X1)
  expected = ntk_fn(P, X1)  # validated here, outside jit ...
  np.testing.assert_allclose(jax.jit(ntk_fn)(P, X1), expected, rtol=1e-12)  # ... then fine


def test_float32_tolerance():
  p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), P)
  report = nc.compile_ntk(mlp, method="structured").verify(p32, X1.astype(jnp.float32))
  assert report.tolerance == pytest.approx(np.sqrt(np.finfo(np.float32).eps))
  assert report.ok


# ---------------------------------------------------------------------------------
# User rules over the built-in nonlinear set; unregister_rule; rules_overlay.

def sin_rule(eqn, operand):
  """y = sin(w): diagonal on every axis, factor cos(w)."""
  ndim = len(eqn.out_aval.shape)
  pairs = tuple((a, a) for a in range(ndim))
  return RuleResult(Structure(diagonal=pairs), lambda w: jnp.cos(w), reads=(0,))


def sin_model(p, x):
  return jnp.sin(p["w"]) * x @ p["v"]


def test_user_rule_wins_over_nonlinear_set():
  p = {"w": normal(5, (3,)), "v": normal(6, (3, 2))}
  assert lax.sin_p in rules.NONLINEAR
  expected = oracle_ntk(sin_model, p, X1, X2)
  with nc.rules_overlay({lax.sin_p: sin_rule}):
    ntk_fn = nc.compile_ntk(sin_model, method="structured", validate=True)
  steps = [u.view.steps for u in ntk_fn.plan(p, X1, X2).engine.uses_of(1)]  # leaf 1: "w"
  assert any("sin" in s for s in steps), steps
  assert_matches(ntk_fn(p, X1, X2), expected, 1e-10)
  wrong = {lax.sin_p: lambda eqn, k: dataclasses.replace(
      sin_rule(eqn, k), factor=jnp.sin)}
  with pytest.raises(nc.ValidationError, match="user rule for sin"):
    nc.compile_ntk(sin_model, method="structured", rules=wrong, validate=True)(p, X1, X2)
  without = nc.compile_ntk(sin_model, method="structured")  # the nonlinear cut again
  assert not any("sin" in u.view.steps for u in without.plan(p, X1, X2).engine.uses_of(1))


def test_register_and_unregister_restore_the_builtin_rule():
  builtin = rules.registry()[lax.neg_p]
  assert rules.is_builtin(lax.neg_p, builtin)
  first = nc.register_rule(lax.neg_p)(lambda eqn, k: None)
  second = nc.register_rule(lax.neg_p)(lambda eqn, k: None)
  assert rules.registry()[lax.neg_p] is second
  assert not rules.is_builtin(lax.neg_p, second)
  assert nc.unregister_rule(lax.neg_p) is second
  assert rules.registry()[lax.neg_p] is first
  assert nc.unregister_rule(lax.neg_p) is first
  assert rules.registry()[lax.neg_p] is builtin
  with pytest.raises(ValueError, match="no rule registered with register_rule"):
    nc.unregister_rule(lax.neg_p)
  with pytest.raises(TypeError, match="needs a rule function"):
    nc.register_rule(lax.neg_p)(None)
  assert lax.neg_p not in rules._USER


def test_register_sin_and_unregister():
  nc.register_rule(lax.sin_p)(sin_rule)
  try:
    assert rules.registry()[lax.sin_p] is sin_rule
  finally:
    nc.unregister_rule(lax.sin_p)
  assert lax.sin_p not in rules.registry()


def test_rules_overlay_nests_switches_off_and_restores_on_error():
  builtin = rules.registry()[lax.neg_p]
  rule = lambda eqn, k: None
  with pytest.raises(RuntimeError):
    with nc.rules_overlay({lax.neg_p: None, lax.sin_p: sin_rule}):
      assert lax.neg_p not in rules.registry()
      assert rules.registry()[lax.sin_p] is sin_rule
      with nc.rules_overlay({lax.neg_p: rule}):
        assert rules.registry()[lax.neg_p] is rule
      assert lax.neg_p not in rules.registry()
      raise RuntimeError
  assert rules.registry()[lax.neg_p] is builtin and lax.sin_p not in rules.registry()
  with pytest.raises(TypeError, match="mapping"):
    with nc.rules_overlay([(lax.neg_p, rule)]):
      pass
  with pytest.raises(TypeError, match="Primitive"):
    with nc.rules_overlay({"neg": rule}):
      pass


# ---------------------------------------------------------------------------------
# check_rule draws random operand values.

def test_check_rule_random_points_catch_a_wrong_structure_at_ones():
  fn = lambda x, s: x * s
  ones = jnp.ones((2, 3))
  check = nc.check_rule(lax.mul_p, fn, ones, ones, argnum=1, rule=traced_mul, points=0)
  assert check.structure.trace  # passes at the degenerate point alone
  with pytest.raises(nc.RuleCheckError, match="declared structure is wrong.*seed 0"):
    nc.check_rule(lax.mul_p, fn, ones, ones, argnum=1, rule=traced_mul)
  right = nc.check_rule(lax.mul_p, fn, ones, ones, argnum=1, seed=3)
  assert right.max_error < 1e-12


def test_check_rule_names_a_wrong_factor():
  with pytest.raises(nc.RuleCheckError, match="the factor is wrong"):
    nc.check_rule(lax.mul_p, lambda x, s: x * s, normal(0, (2, 3)), normal(1, (2, 3)),
                  argnum=1, rule=scaled(elementwise.mul_rule, 1.01))


# ---------------------------------------------------------------------------------
# Case 7: JAX 0.10.2's vmap of a VJP through jnp.split inside lax.scan.

H = 4


def gated_rnn(p, x):
  """A gated RNN whose step splits one matmul into its gates, as Flax's
  OptimizedLSTMCell does."""
  def step(carry, xt):
    c, h = carry
    z = jnp.concatenate([xt, h], -1) @ p["w"]
    i, g, o = jnp.split(z, 3, axis=-1)
    c = jax.nn.sigmoid(i) * jnp.tanh(g) + c
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (c, h), h
  zeros = jnp.zeros((x.shape[0], H), x.dtype)
  (_, h), _ = lax.scan(step, (zeros, zeros), jnp.swapaxes(x, 0, 1))
  return h @ p["v"]


def test_upstream_vmap_of_vjp_bug_is_caught():
  p = {"w": normal(7, (2 + H, 3 * H)) / 2, "v": normal(8, (H, 2))}
  x = normal(9, (3, 5, 2))
  rev, fwd = jax.jacrev(gated_rnn)(p, x), jax.jacfwd(gated_rnn)(p, x)
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree_util.tree_leaves(rev), jax.tree_util.tree_leaves(fwd)))
  if gap < 1e-10:
    pytest.skip(f"this JAX ({jax.__version__}) differentiates the model right "
                f"(jacrev vs jacfwd: {gap:.1e}): nothing to catch")
  ntk_fn = nc.compile_ntk(gated_rnn, method="jacobian", batch_independent=False,
                          validate=True)
  with pytest.raises(nc.ValidationError, match="disagrees with jvp∘vjp.*split"):
    ntk_fn(p, x)


def test_a_vmap_of_vjp_bug_is_caught(monkeypatch):
  """The same class of bug, simulated where JAX is not affected: a `jax.vmap` that gets
  mapped VJPs wrong by 1%. The structured whole-batch path vmaps the VJP over the
  output basis; the check, with no vmap, is unaffected and names the likely cause."""
  p = {"w": normal(7, (2 + H, 3 * H)) / 2, "v": normal(8, (H, 2))}
  x = normal(9, (3, 5, 2))
  real = jax.vmap

  def buggy(fun, *args, **kwargs):
    mapped = real(fun, *args, **kwargs)
    return lambda *a, **k: jax.tree_util.tree_map(lambda t: t * 1.01, mapped(*a, **k))

  monkeypatch.setattr(jax, "vmap", buggy)
  ntk_fn = nc.compile_ntk(gated_rnn, method="structured", batch_independent=False,
                          validate=True)
  with pytest.raises(nc.ValidationError, match=r"disagrees with jvp∘vjp by .*"
                     r"jnp\.split inside lax\.scan.*method='ntk_vp'"):
    ntk_fn(p, x)


@full
def test_user_rule_inside_a_scan_checked_at_its_first_step():
  from ntk_compiler.rules import linear
  p = {"w": normal(7, (2 + H, 3 * H)) / 2, "v": normal(8, (H, 2))}
  x = normal(9, (3, 5, 2))
  right = {lax.dot_general_p: scaled(linear.dot_general_rule, 1.0)}
  report = nc.compile_ntk(gated_rnn, method="structured", batch_independent=False,
                          rules=right).verify(p, x)
  assert report.ok
  assert any(len(r.path) == 2 for r in report.rules)  # an equation of the scan body
  wrong = {lax.dot_general_p: scaled(linear.dot_general_rule, 1.01)}
  with pytest.raises(nc.ValidationError, match=r"dot_general \(operand 1, equation at "
                     r"eqns\[\d+\]\[\d+\]"):
    nc.compile_ntk(gated_rnn, method="structured", batch_independent=False,
                   rules=wrong, validate=True)(p, x)


def test_empty_kernels_and_empty_leaves():
  f = lambda p, x: {"a": mlp(p, x), "b": (x @ p["w"])[:, :0]}
  ntk_fn = nc.compile_ntk(f, method="structured", trace_axes=(), validate=True)
  kernel = ntk_fn(P, X1, X2)
  assert kernel["b"].shape == (4, 3, 0, 0)
  assert ntk_fn.verify(P, X1, X2).leaf_errors[1] == 0.0
  empty = jnp.zeros((0, 3))
  assert nc.compile_ntk(mlp, validate=True)(P, empty, X2).shape == (0, 3)
  assert nc.compile_ntk(mlp).verify(P, empty).ok


def test_rule_on_a_huge_equation_is_skipped_with_a_reason(monkeypatch):
  from ntk_compiler import validate
  monkeypatch.setattr(validate, "MAX_JACOBIAN", 5)  # mul: 3 x 3 per example
  wrong = {lax.mul_p: scaled(elementwise.mul_rule, 1.01)}
  report = nc.compile_ntk(mlp, method="structured", rules=wrong).verify(P, X1, X2)
  (r,) = report.rules
  assert r.ok and "dense Jacobian would have" in r.skipped
  assert not report.ok and report.relative_error > 1e-3  # the kernel check still sees it


def test_user_rule_in_both_cond_branches():
  """The branch taken is checked at its operands, the other at random values only."""
  def f(p, x):
    flag = jnp.ones(()) > 0  # the same for every example
    h = lax.cond(flag, lambda h: h * p["s"], lambda h: h * 2 * p["s"], x)
    return jnp.tanh(h @ p["w"]) @ p["v"]
  right = {lax.mul_p: scaled(elementwise.mul_rule, 1.0)}
  ntk_fn = nc.compile_ntk(f, method="structured", batch_independent=True, rules=right)
  report = ntk_fn.verify(P, X1, X2)
  assert report.ok
  assert {r.path[1] for r in report.rules if len(r.path) > 2} == {0, 1}  # both branches
  wrong = {lax.mul_p: scaled(elementwise.mul_rule, 1.01)}
  bad = nc.compile_ntk(f, method="structured", batch_independent=True,
                       rules=wrong).verify(P, X1, X2)
  assert {r.path[1] for r in bad.rules if not r.ok and len(r.path) > 2} == {0, 1}

"""Control flow and custom derivatives under method="structured": what `explain()`
reports fired (scan step axes, cond branches, while rewrites, user rules), that a scan
weight is one use whatever the length, and exactness against the oracle. The models
themselves run the full oracle grid in test_structured.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import models_control
import ntk_compiler as nc
import oracle
import tiers
from models_structured import rnn_scan

BY_NAME = {m.name: m for m in models_control.ZOO}


def _explain(model, n=3, **kwargs):
  params, x, _ = model.draw(0, n, 2, jnp.float64)
  kwargs.setdefault("batch_independent", model.batch_independent)
  return nc.compile_ntk(model.f, method="structured", **kwargs).explain(params, x)


def _uses(explanation, path):
  (leaf,) = [l for l in explanation.leaves if l.path == path]
  return leaf.uses


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_no_dense_fallback(name):
  explanation = _explain(BY_NAME[name])
  assert explanation.method == "structured"
  assert explanation.fallbacks == []


def test_stacked_weights_step_with_the_scan():
  """Weights scanned over (a loop over layers) are one use each, whose cotangent and
  factor are stacked over the layers: the layer axis is the parameter's own axis."""
  explanation = _explain(BY_NAME["stacked_layers"])
  (use,) = _uses(explanation, "['w']")
  assert use.steps == ("dot_general", "add") and "before tanh" in use.reason
  assert use.cut_shape == (3, 1, 4)
  (factor,) = [f for f in use.factors if f[0] == "dot_general"]
  assert factor[1][0] == 3 and factor[2]  # stacked over the layers, per example


def test_closed_over_weight_is_one_use_at_any_length():
  """An RNN weight used at every step is one use with a step axis: the NTK program does
  not grow with the number of steps (no unrolling, no T² terms)."""
  model = rnn_scan()
  sizes = []
  for steps in (2, 16):
    params, _, _ = model.draw(0, 3, 2, jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, steps, 3), jnp.float64)
    ntk_fn = nc.compile_ntk(model.f, method="structured", trace_axes=())
    explanation = ntk_fn.explain(params, x)
    (use,) = _uses(explanation, "['wh']")
    assert use.cut_shape[0] == steps
    sizes.append(len(ntk_fn.jaxpr(params, x).eqns))
  # The same program up to the contraction order the cost model picks for each length
  # (unrolled, 16 steps would give ~8 times the equations of 2).
  assert abs(sizes[1] - sizes[0]) <= 0.2 * sizes[0]


def test_nested_scans_stack_both_steps():
  (use,) = _uses(_explain(BY_NAME["nested_scans"]), "['w']")
  assert use.cut_shape[:2] == (3, 2)


def test_cond_branches_are_followed():
  """A weight used in both branches of a cond has a use in each branch."""
  explanation = _explain(BY_NAME["cond_on_batch"])
  assert not explanation.batch_independent
  for path in ("['a']", "['b']"):
    (use,) = _uses(explanation, path)
    assert "dot_general" in use.steps
  (use,) = _uses(explanation, "['c']")
  assert use.reason == "at an output of a cond branch"
  assert _uses(explanation, "['gate']") == ()  # only read by a comparison


def test_while_rewritten_and_reported():
  explanation = _explain(BY_NAME["while_fixed_trips"])
  assert any("while -> scan of length 3" in note for note in explanation.loops)
  (use,) = _uses(explanation, "['w']")
  # w[i] at step i: a one-hot selection along w's axis 0, then the matmul.
  assert use.steps[0] == "dynamic_slice" and "dot_general" in use.steps


@pytest.mark.full
def test_custom_derivatives_use_the_user_rules():
  """custom_vjp on a weight and custom_jvp: the view stops before them (not a
  fallback) and the user's rules give the derivative: the kernel differs from the one
  of the same model without custom rules, and matches the oracle (reverse mode uses
  the same rules)."""
  model = BY_NAME["custom_gradients"]
  explanation = _explain(model, strict=True)
  (use,) = _uses(explanation, "['w']")
  assert "own derivative rule" in use.reason
  params, x1, x2 = model.draw(0, 3, 2, jnp.float64)
  ntk_fn = nc.compile_ntk(model.f, method="structured", strict=True)
  kernel = ntk_fn(params, x1, x2)
  oracle.assert_matches(kernel, oracle.oracle_ntk(model.f, params, x1, x2), 1e-10)

  def plain(p, x):
    h = jax.nn.gelu(x @ p["w"])
    return jnp.tanh(h @ jnp.tanh(p["u"])) @ p["v"]
  plain_kernel = nc.compile_ntk(plain, method="structured")(params, x1, x2)
  np.testing.assert_allclose(model.f(params, x1), plain(params, x1), rtol=1e-12)
  assert not np.allclose(kernel, plain_kernel, rtol=1e-3)


@pytest.mark.full  # tests/test_loops.py covers the rewrite in the quick tier
@pytest.mark.parametrize("with_x2", [True, False])
def test_all_methods_agree_on_a_while_model(with_x2):
  model = BY_NAME["while_fixed_trips"]
  params, x1, x2 = model.draw(1, 3, 2, jnp.float64)
  x2 = x2 if with_x2 else None
  expected = oracle.oracle_ntk(model.f, params, x1, x2, mode="fwd")
  for method in ("structured", "jacobian", "ntk_vp", "auto"):
    oracle.assert_matches(nc.compile_ntk(model.f, method=method)(params, x1, x2),
                          expected, 1e-10)


def test_scan_carry_parameter_is_exact():
  """A parameter that enters a scan's carry (an initial state) is cut before the scan,
  where its cotangent is all there is (not a dense fallback); the kernel is exact."""
  def f(p, x):
    h, _ = lax.scan(lambda h, xt: (jnp.tanh(h + xt @ p["w"]), None),
                    jnp.broadcast_to(p["h0"], (x.shape[0], 4)), jnp.swapaxes(x, 0, 1))
    return h @ p["v"]
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w": jax.random.normal(k[0], (3, 4), jnp.float64),
            "h0": jax.random.normal(k[1], (4,), jnp.float64),
            "v": jax.random.normal(k[2], (4, 2), jnp.float64)}
  x = jax.random.normal(k[3], (3, 5, 3), jnp.float64)
  ntk_fn = nc.compile_ntk(f, method="structured", strict=True)
  (use,) = _uses(ntk_fn.explain(params, x), "['h0']")
  assert use.reason == "before scan: enters its carry" and not use.dense
  oracle.assert_matches(ntk_fn(params, x), oracle.oracle_ntk(f, params, x), 1e-10)


@jax.custom_vjp
def _clipped_grad(h):
  return h


_clipped_grad.defvjp(lambda h: (h, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))


def test_ntk_vp_through_custom_vjp():
  """No forward mode through custom_vjp: ntk_vp pushes tangents forward by transposing
  x1's VJP (the custom backward pass is linear in its cotangent), exact against the
  oracle, whose Jacobian rows are those VJPs; auto keeps ntk_vp among its candidates."""
  model = BY_NAME["custom_gradients"]
  params, x1, x2 = model.draw(0, 5, 4, jnp.float64)
  ntk_fn = nc.compile_ntk(model.f, method="ntk_vp")
  assert ntk_fn.plan(params, x1, x2).problem.transpose_vjp
  tiled = nc.compile_ntk(model.f, method="ntk_vp", block_size=2, max_memory="1GB")
  for b in (x2, None):
    want = oracle.oracle_ntk(model.f, params, x1, b)
    oracle.assert_matches(ntk_fn(params, x1, b), want, 1e-10)
    oracle.assert_matches(tiled(params, x1, b), want, 1e-10)  # x2's cotangents per block
  plan = nc.compile_ntk(model.f, method="auto").plan(params, x1)
  assert "ntk_vp" in plan.estimate.seconds and "excluded" not in plan.reason


@jax.custom_vjp
def _looped_grad(h):
  return h


_looped_grad.defvjp(lambda h: (h, None), lambda _, g: (lax.while_loop(
    lambda c: jnp.max(jnp.abs(c)) > 1.0, lambda c: 0.5 * c, g),))


@pytest.mark.parametrize("grad", [_clipped_grad, _looped_grad], ids=["clip", "while"])
def test_ntk_vp_refuses_a_backward_pass_that_does_not_transpose(grad):
  """A custom_vjp whose backward pass clips the cotangent (not linear) or runs a while
  loop (no transpose in JAX) has no transpose: ntk_vp says so by name before running
  anything, and auto leaves ntk_vp out."""
  def f(p, x):
    return grad(jnp.tanh(x @ p["w"])) @ p["v"]
  params = {"w": jnp.ones((3, 4)) / 3, "v": jnp.ones((4, 2)) / 4}
  x = jnp.arange(6.0).reshape(2, 3) / 6
  with pytest.raises(NotImplementedError, match="ntk_vp.*custom_vjp.*linear in its cot"):
    nc.compile_ntk(f, method="ntk_vp")(params, x)
  plan = nc.compile_ntk(f, method="auto").plan(params, x)
  assert plan.method != "ntk_vp" and "ntk_vp excluded" in plan.reason
"""Batch facts of issue 12, round three: take_along_axis in 2-D (the size-1 gather JAX
emits at batch size 1), constants through scatters, batching rules that copy operands,
and custom_jvp calls inside loop and branch bodies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import batching as jax_batching
from jax.interpreters import mlir

import ntk_compiler as nc
from ntk_compiler import batching, compat, trace
from oracle import assert_matches, oracle_ntk
from tiers import full

RTOL = 1e-10


def rand(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def decide(f, params, x):
  """batching.infer on f at x's batch size (and at 1), as compile_ntk runs it."""
  def trace_at(n):
    shaped = jax.ShapeDtypeStruct((n,) + x.shape[1:], x.dtype)
    return trace.trace_program(f, params, shaped, per_example=False)
  return batching.infer(trace_at, len(jax.tree.leaves(params)), x.shape[0])


def check(f, params, x1, x2=None, per_example=True, method="structured"):
  """The kernel against the oracle, explain()'s batch decision, and no dense fallback."""
  ntk_fn = nc.compile_ntk(f, method=method)
  e = ntk_fn.explain(params, x1)
  assert e.batch_independent == per_example, e.batch.reason
  if method == "structured":
    for leaf in e.leaves:
      assert not any(u.fallback or u.dense for u in leaf.uses), (leaf.path, leaf.uses)
  assert_matches(ntk_fn(params, x1, x2), oracle_ntk(f, params, x1, x2), RTOL)
  return e


# take_along_axis with an index of rank 2 or more. At batch size 1 JAX gathers the
# size-1 batch axis as a window and reshapes the indices (1, T, K) -> (T, K, 1),
# dropping the batch axis while it appends the index vector axis; the analysis reads
# that back into the batching gather the program at N has.

def _sorted_rows(p, x):
  h = x @ p
  return jnp.take_along_axis(h, jnp.argsort(h, 1), 1)


def _sorted_tokens(p, x):  # (N, T, D), sorted along the features of each token
  h = x @ p
  return jnp.take_along_axis(h, jnp.argsort(h, 2), 2)


def _top2(p, x):
  h = jnp.tanh(x @ p)
  return jnp.take_along_axis(h, lax.top_k(x, 2)[1], 1)


def _table_rows(p, x):  # a parameter table, each example's own index rows
  ids = (jnp.abs(x[..., 1]) * 5).astype(jnp.int32) % 6
  t = jnp.broadcast_to(p, (x.shape[0],) + p.shape)
  return jnp.take_along_axis(t, ids[:, None, :2].repeat(5, 1), axis=2).reshape(
      x.shape[0], -1)


ALONG = {
    "sorted_rows": (_sorted_rows, rand(3, 3), rand(4, 3, seed=1)),
    "sorted_tokens": (_sorted_tokens, rand(3, 3), rand(4, 5, 3, seed=1)),
    "top2": (_top2, rand(3, 3), rand(4, 3, seed=1)),
    "table_rows": (_table_rows, rand(5, 6), rand(4, 3, 3, seed=1)),
}


@pytest.mark.parametrize("name", sorted(ALONG))
def test_take_along_axis_is_per_example(name):
  f, p, x = ALONG[name]
  d = decide(f, p, x)
  assert d.independent, d.reason
  assert "same program at batch sizes 4 and 1" in d.reason


def test_take_along_axis_mixing_stays_whole_batch():
  """Sorting along the batch axis, or by an order shared by the batch, mixes."""
  along_batch = lambda p, x: jnp.take_along_axis(x @ p, jnp.argsort(x @ p, 0), 0)
  by_batch_order = lambda p, x: jnp.take_along_axis(
      x @ p, jnp.broadcast_to(jnp.argsort((x @ p).sum(0)), x.shape), 1)
  for f in (along_batch, by_batch_order):
    d = decide(f, rand(3, 3), rand(4, 3, seed=1))
    assert not d.independent, d.reason


def test_two_d_size_one_gather_in_batching_form():
  """The rewritten program at batch size 1 computes the same array, with the index
  reshape kept (now appending the index vector axis only) and the gather batching."""
  f = lambda x: jnp.take_along_axis(x, jnp.argsort(x, 1), 1)
  x = rand(1, 5)
  closed = jax.make_jaxpr(f)(x)
  canonical = batching._canonical_trace(closed)
  assert canonical is not closed
  body = lambda j: compat.open_jaxpr(j.eqns[-1].params["jaxpr"])
  gather, = [e for e in body(canonical.jaxpr).eqns if e.primitive is lax.gather_p]
  dn = gather.params["dimension_numbers"]
  assert dn.offset_dims == () and dn.operand_batching_dims == (0,)
  reshapes = lambda j: [e for e in body(j).eqns if e.primitive is lax.reshape_p]
  assert [tuple(e.outvars[0].aval.shape) for e in reshapes(canonical.jaxpr)] == [(1, 5, 1)]
  assert [tuple(e.outvars[0].aval.shape) for e in reshapes(closed.jaxpr)] == [(5, 1)]
  out = jax.core.eval_jaxpr(canonical.jaxpr, canonical.consts, x)
  np.testing.assert_array_equal(out[0], f(x))


@full
@pytest.mark.parametrize("name", ["sorted_rows", "table_rows"])
def test_take_along_axis_against_the_oracle(name):
  f, p, x = ALONG[name]
  g = lambda p, x: jnp.tanh(f(p, x))
  e = check(g, p, x, rand(2, *x.shape[1:], seed=2))
  assert "proven" in e.batch.reason


# An unbatched scatter keeps the axes its operand and updates are constant along (a
# stage buffer of a Runge-Kutta step, filled one stage at a time).

def test_scatter_keeps_constant_axes():
  def f(p, x):
    k = jnp.zeros((x.shape[0], 3, x.shape[1]))
    k = k.at[:, 1].set(jnp.broadcast_to(jnp.tanh(p), x.shape))  # constant rows
    return x + k.sum(1)
  d = decide(f, rand(3), rand(4, 3, seed=1))
  assert d.independent, d.reason

  def g(p, x):  # rows that differ: a position-dependent constant
    k = jnp.zeros((x.shape[0], 3, x.shape[1]))
    k = k.at[:, 1].set(jnp.arange(x.shape[0] * 3.0).reshape(x.shape) * p)
    return x + k.sum(1)
  d = decide(g, rand(3), rand(4, 3, seed=1))
  assert not d.independent, d.reason


# A primitive whose batching rule passes its operands through `jnp.array` (copies), and
# takes an unbatched operand broadcast over the batch (as Equinox's select_if_vmap).

pick_p = Primitive("test_pick_first")
pick_p.def_impl(lambda a, b: a)
pick_p.def_abstract_eval(lambda a, b: a)
mlir.register_lowering(pick_p, mlir.lower_fun(lambda a, b: a, multiple_results=False))


def _pick_batch(args, dims):
  (a, b), (da, db) = args, dims
  size = a.shape[da] if da is not None else b.shape[db]
  a = jnp.moveaxis(a, da, 0) if da is not None else jnp.broadcast_to(a, (size,) + a.shape)
  b = jnp.moveaxis(b, db, 0) if db is not None else jnp.broadcast_to(b, (size,) + b.shape)
  return pick_p.bind(jnp.array(a), jnp.array(b)), 0


jax_batching.primitive_batchers[pick_p] = _pick_batch


def test_batching_rule_with_copies_and_a_broadcast_operand():
  f = lambda p, x: pick_p.bind(jnp.tanh(x * p), jnp.broadcast_to(p, x.shape))
  d = decide(f, rand(3), rand(4, 3, seed=1))
  assert d.independent, d.reason
  g = lambda p, x: pick_p.bind(jnp.tanh(x * p[0]), p)  # rows of p that differ
  d = decide(g, rand(4, 3), rand(4, 3, seed=1))
  assert not d.independent, d.reason
  assert "test_pick_first" in d.reason, d.reason


# custom_jvp calls inside scan, cond and while bodies: followed through their JVP rule's
# tangent program as at top level (the loop or branch rebuilt around the rewritten
# bodies), so a parameter's view goes through the JVP's contractions; the reversed
# matmul's JVP negates its derivative (following its primal body would be wrong).

from test_coverage import custom_matmul, reversed_matmul  # noqa: E402


def scan_model(p, x):  # x: (N, T, D)
  def cell(h, xt):
    h = jnp.tanh(custom_matmul(xt, p["w"]) + reversed_matmul(h, p["r"]))
    return h, h
  h0 = jnp.zeros((x.shape[0], p["r"].shape[0]))
  h, _ = lax.scan(cell, h0, jnp.swapaxes(x, 0, 1))
  return h @ p["o"]


def cond_model(p, x):
  h = jnp.tanh(x @ p["w"])
  h = lax.cond(p["o"][0, 0] > -100.0, lambda h: reversed_matmul(h, p["r"]),
               lambda h: h @ p["r"], h)
  return jnp.tanh(h) @ p["o"]


def while_model(p, x):  # a trip count the tracer cannot see: a while, not a scan
  n = (jnp.abs(p["o"][0, 0]) < 100.0).astype(jnp.int32) * 3
  h = lax.fori_loop(0, n, lambda i, h: jnp.tanh(reversed_matmul(h, p["r"])),
                    jnp.tanh(x @ p["w"]))
  return h @ p["o"]


JVP_LOOPS = {"w": rand(3, 4), "r": rand(4, 4, seed=1) / 2, "o": rand(4, 2, seed=2)}


def _uses(e, name):
  leaf, = [leaf for leaf in e.leaves if name in leaf.path]
  return leaf.uses


@full
def test_custom_jvp_in_scan_body():
  e = check(scan_model, JVP_LOOPS, rand(3, 5, 3, seed=3), rand(2, 5, 3, seed=4))
  assert all("dot_general" in u.steps for u in _uses(e, "'w'")), _uses(e, "'w'")
  assert any("neg" in u.steps for u in _uses(e, "'r'")), _uses(e, "'r'")


@full
def test_custom_jvp_in_cond_branch():
  e = check(cond_model, JVP_LOOPS, rand(3, 3, seed=3), rand(2, 3, seed=4))
  assert any("neg" in u.steps for u in _uses(e, "'r'")), _uses(e, "'r'")


@pytest.mark.parametrize("model", [scan_model, cond_model, while_model])
def test_loops_rebuilt_with_the_same_values_and_jvp(model):
  """The rewritten program (loops and branches rebuilt) computes f's value and its
  JVP in the parameters, the custom rules' one."""
  from ntk_compiler.rules import custom_jvp, registry
  x = rand(3, 5, 3, seed=3) if model is scan_model else rand(3, 3, seed=3)
  program = trace.trace_program(model, JVP_LOOPS, x, per_example=False)
  n = program.num_params
  new = custom_jvp.follow_linear_jvps(program.jaxpr, program.consts, n, registry())
  assert new is not None
  leaves = jax.tree.leaves(JVP_LOOPS)
  tangents = [rand(*np.shape(a), seed=7 + i) for i, a in enumerate(leaves)]
  run = lambda j, c: lambda *p: jax.core.eval_jaxpr(j, c, *p, x)
  want = jax.jvp(run(program.jaxpr, program.consts), leaves, tangents)
  got = jax.jvp(run(*new), leaves, tangents)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
  def calls(j):
    """(custom_jvp calls, those whose float operands are all stop_gradient's: the
    primal F(stop_gradient(x)) of a rewritten call), in j and its bodies."""
    stopped = {v for e in j.eqns if e.primitive is compat.stop_gradient_primitive()
               for v in e.outvars}
    found = [e for e in j.eqns if e.primitive is custom_jvp.CUSTOM_JVP_CALL]
    ok = [e for e in found if all(a in stopped for a in e.invars
                                  if jnp.issubdtype(a.aval.dtype, jnp.inexact))]
    inner = [calls(b) for e in j.eqns for b in compat.sub_jaxprs(e)]
    return (len(found) + sum(a for a, _ in inner), len(ok) + sum(b for _, b in inner))
  before, after = calls(program.jaxpr), calls(new[0])
  assert before[0] > 0 and before[1] == 0, before
  assert after[0] == after[1] > 0, after


# A while that loops while any example's condition holds, each example kept by a
# carried predicate m (Equinox's while_loop under vmap, which diffrax runs), written by
# hand: cond any(c(carry)) & (step < max); body m' = m & c(new), x' = select(m, new, x).

def _step(w, t, y):
  dt = 0.1 + 0.05 * jnp.tanh(jnp.sum(y * y, -1))  # steps past t = 1 still move y
  return t + dt, y + dt[:, None] * jnp.tanh(y @ w)


def masked_loop(w, y0, *, mask_y=True, c_body=lambda t: t < 1.0, and_m=True,
                start=None, mix=False, counter_out=False, cond_extra=None, c_old=False,
                where=False):
  n = y0.shape[0]
  c = lambda t: t < 1.0
  t0 = jnp.zeros(n) if start is None else start

  def cond(s):
    step, m, t, y = s
    out = jnp.any(c(t)) & (step < 40)
    return out if cond_extra is None else out & cond_extra(s)

  def body(s):
    step, m, t, y = s
    t_new, y_new = _step(w, t, y)
    if mix:
      y_new = y_new + 0.01 * jnp.mean(y, 0)
    m_new = (m & c_body(t if c_old else t_new)) if and_m else c_body(t_new)
    if where:  # as written by hand
      return (step + 1, m_new, jnp.where(m, t_new, t),
              jnp.where(m[:, None], y_new, y) if mask_y else y_new)
    t = lax.select(m, t_new, t)  # as JAX's vmap of Equinox's select writes it
    y = lax.select(lax.broadcast_in_dim(m, y.shape, (0,)), y_new, y) if mask_y else y_new
    return step + 1, m_new, t, y
  step, _, _, y = lax.while_loop(cond, body, (0, c(t0), t0, y0))
  return (y, step) if counter_out else y


def _loop_model(**kw):
  def f(p, x):
    out = masked_loop(p["w"], x, **kw)
    if kw.get("counter_out"):
      return out[0] @ p["o"] * out[1]
    return out @ p["o"]
  return f


MASKED = {"w": rand(3, 3) / 2, "o": rand(3, 2, seed=1)}
X_STEPS = rand(4, 3, seed=2) * jnp.array([[0.1], [1.0], [3.0], [6.0]])


@pytest.mark.parametrize("where", [False, True])
def test_masked_while_is_per_example(where):
  f = _loop_model(where=where)
  d = decide(f, MASKED, X_STEPS)
  assert d.independent, d.reason
  whole = f(MASKED, X_STEPS)
  for i in range(X_STEPS.shape[0]):  # what the proof says: each row is its own loop's
    np.testing.assert_array_equal(f(MASKED, X_STEPS[i:i + 1])[0], whole[i])


MASKED_MIXING = {
    "carry_not_masked": dict(mask_y=False),
    "other_condition_in_body": dict(c_body=lambda t: t < 2.0),
    "predicate_not_kept": dict(and_m=False),
    "condition_per_example_at_start": dict(start=jnp.array([0.0, 0.5, 0.9, 0.2])),
    "body_reads_batch_mean": dict(mix=True),
    "step_count_returned": dict(counter_out=True),
    "condition_reads_batch": dict(cond_extra=lambda s: jnp.sum(s[3]) < 100.0),
    "predicate_of_old_values": dict(c_old=True),
    "where_carry_not_masked": dict(where=True, mask_y=False),
    "where_other_condition_in_body": dict(where=True, c_body=lambda t: t < 2.0),
}


@pytest.mark.parametrize("name", sorted(MASKED_MIXING))
def test_masked_while_that_mixes(name):
  d = decide(_loop_model(**MASKED_MIXING[name]), MASKED, X_STEPS)
  assert not d.independent, d.reason


def test_masked_while_unsound_forms_differ_per_example():
  """Two of the forms refused above: rows of the batch differ from each example's own
  loop (so refusing them is needed, not only cautious)."""
  for name in ("carry_not_masked", "other_condition_in_body"):
    f = _loop_model(**MASKED_MIXING[name])
    whole = f(MASKED, X_STEPS)
    rows = jnp.concatenate([f(MASKED, X_STEPS[i:i + 1]) for i in range(4)])
    assert not np.allclose(rows, whole), name


def _eqx_loop(kind):
  eqxi = pytest.importorskip("equinox.internal")

  def one(w, y0):
    def body(s):
      t, y = _step(w, s[0][None], s[1][None])
      return t[0], y[0]
    return eqxi.while_loop(lambda s: s[0] < 1.0, body, (0.0, y0), max_steps=40,
                           kind=kind)[1]
  return lambda p, x: jax.vmap(lambda xi: one(p["w"], xi) @ p["o"])(x)


@pytest.mark.parametrize("kind", ["lax", "checkpointed"])
def test_equinox_while_loop_is_per_example(kind):
  f = _eqx_loop(kind)
  d = decide(f, MASKED, X_STEPS)
  assert d.independent, d.reason
  whole = f(MASKED, X_STEPS)
  for i in range(X_STEPS.shape[0]):
    np.testing.assert_array_equal(f(MASKED, X_STEPS[i:i + 1])[0], whole[i])


@full
def test_equinox_checkpointed_while_loop_against_the_oracle():
  e = check(_eqx_loop("checkpointed"), MASKED, X_STEPS[1:], method="jacobian")
  assert "proven" in e.batch.reason, e.batch.reason


# diffrax: adaptive solves vmapped over the examples. With a solver that does not reuse
# its last stage (Heun) and throw=False, Equinox's while_loop is the masked while above:
# per-example, proven. Tsit5 (first same as last) recomputes its first stage for every
# example when any example's step was rejected (unvmap_any in the body), and throw=True
# checks the result over the whole batch: whole batch, exact; per-example and exact
# when the user says so (docs/custom_rules.md).

def _diffrax_model(solver="Tsit5", throw=True, rtol=1e-8):
  diffrax = pytest.importorskip("diffrax")
  term = diffrax.ODETerm(lambda t, y, w: jnp.tanh(y @ w))
  controller = (diffrax.ConstantStepSize() if rtol is None else
                diffrax.PIDController(rtol=rtol, atol=rtol))

  def solve(w, y0):
    return diffrax.diffeqsolve(term, getattr(diffrax, solver)(), 0.0, 1.0, 0.1, y0,
                               args=w, stepsize_controller=controller, max_steps=128,
                               throw=throw).ys[-1]
  return jax.jit(lambda p, x: jax.vmap(lambda xi: solve(p["w"], xi) @ p["o"])(x))


DIFFRAX = {"w": rand(3, 3) / 2, "o": rand(3, 2, seed=1)}


@full
def test_diffrax_adaptive_solve_per_example():
  f = _diffrax_model("Heun", throw=False, rtol=1e-3)
  x = X_STEPS[1:]  # 9, 7 and 8 steps
  e = check(f, DIFFRAX, x, method="jacobian")
  assert "proven" in e.batch.reason, e.batch.reason
  for g in (_diffrax_model("Midpoint", throw=False, rtol=1e-3),
            _diffrax_model("Tsit5", rtol=None)):  # any solver at a constant step
    d = decide(g, DIFFRAX, x)
    assert d.independent, d.reason


@full
def test_diffrax_solve():
  f = _diffrax_model()
  x1, x2 = 2 * rand(3, 3, seed=2), rand(2, 3, seed=3)
  want = oracle_ntk(f, DIFFRAX, x1, x2)
  for batch_independent in (None, True):
    ntk_fn = nc.compile_ntk(f, method="jacobian", batch_independent=batch_independent)
    e = ntk_fn.explain(DIFFRAX, x1)
    if batch_independent is None:
      assert not e.batch_independent
      assert "while" in e.batch.reason, e.batch.reason
    else:
      assert e.batch_independent
    assert_matches(ntk_fn(DIFFRAX, x1, x2), want, RTOL)

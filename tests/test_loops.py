"""`while` loops with a trip count fixed at trace time become `scan`s (loops.py)."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import primitives as prims

import ntk_compiler as nc
from ntk_compiler import compat, loops
from oracle import assert_matches, oracle_ntk
import tiers

RTOL_F64 = 1e-10

W = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)) / 2)
X = jnp.asarray(np.random.default_rng(1).normal(size=(3,)))


def _prims(jaxpr):
  """Every primitive in a jaxpr, sub-jaxprs included."""
  jaxpr = compat.open_jaxpr(jaxpr)
  for eqn in jaxpr.eqns:
    yield eqn.primitive
    for sub in compat.sub_jaxprs(eqn):
      yield from _prims(sub)


def _scan_lengths(jaxpr):
  jaxpr = compat.open_jaxpr(jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive is lax.scan_p:
      yield eqn.params["length"]
    for sub in compat.sub_jaxprs(eqn):
      yield from _scan_lengths(sub)


def _rewrite(f, *args):
  """f's jaxpr rewritten, checked to compute f's values with f's avals."""
  closed = jax.make_jaxpr(f)(*args)
  new, notes = loops.fix_trip_counts(closed, ["w", "x"])
  old_j, new_j = compat.open_jaxpr(closed), compat.open_jaxpr(new)
  assert [v.aval for v in new_j.invars] == [v.aval for v in old_j.invars]
  assert [v.aval for v in new_j.outvars] == [v.aval for v in old_j.outvars]
  got = jax.core.eval_jaxpr(new_j, new.consts, *args)
  for g, e in zip(got, jax.tree_util.tree_leaves(f(*args))):
    np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)
  return new, notes


def _layer(w, h):
  return jnp.tanh(h @ w)


# Loops whose trip count is known at trace time: (f, trip count).
FIXED = {
    "while_literal": (lambda w, x: lax.while_loop(
        lambda c: c[0] < 4, lambda c: (c[0] + 1, _layer(w, c[1])), (0, x))[1], 4),
    "fori_traced_bound": (lambda w, x: lax.fori_loop(
        0, jnp.int32(5), lambda i, h: _layer(w, h) * i, x), 5),
    "computed_bound": (lambda w, x: lax.fori_loop(
        1, jnp.asarray(3) * 2, lambda i, h: _layer(w, h), x), 5),
    "bound_from_constant": (lambda w, x: lax.fori_loop(
        0, jnp.array([2, 7, 9])[1], lambda i, h: _layer(w, h), x), 7),
    "float_counter": (lambda w, x: lax.while_loop(
        lambda c: c[0] < 1.0, lambda c: (c[0] + 0.25, _layer(w, c[1])), (0.0, x))[1], 4),
    "countdown_step_2": (lambda w, x: lax.while_loop(
        lambda c: c[0] > 0, lambda c: (c[0] - 2, _layer(w, c[1])), (9, x))[1], 5),
    "zero_trips": (lambda w, x: lax.while_loop(
        lambda c: c[0] < 0, lambda c: (c[0] + 1, _layer(w, c[1])), (0, x))[1], 0),
}


@pytest.mark.parametrize("name", FIXED)
def test_fixed_trip_count_becomes_scan(name):
  f, trips = FIXED[name]
  new, notes = _rewrite(f, W, X)
  assert lax.while_p not in set(_prims(new))
  assert list(_scan_lengths(new)) == [trips]
  assert len(notes) == 1 and notes[0].endswith(f"while -> scan of length {trips}")


# Loops whose trip count depends on the inputs: (f, the inputs named in the note).
DEPENDENT = {
    "state_in_cond": (lambda w, x: lax.while_loop(
        lambda h: jnp.sum(h) < 10.0, lambda h: h + jnp.abs(w[0]) + 1.0, x), "w, x"),
    "bound_from_input": (lambda w, x: lax.fori_loop(
        0, jnp.argmax(x) + 1, lambda i, h: _layer(w, h), x), "x"),
    "counter_step_from_param": (lambda w, x: lax.while_loop(
        lambda c: c[0] < 4, lambda c: (c[0] + (w[0, 0] > -9).astype(int),
                                        _layer(w, c[1])), (0, x))[1], "w"),
}


@pytest.mark.parametrize("name", DEPENDENT)
def test_input_dependent_trip_count_is_kept(name):
  f, names = DEPENDENT[name]
  new, notes = _rewrite(f, W, X)
  assert lax.while_p in set(_prims(new))
  assert notes == [f"eqn {_while_index(f)}: while kept (its trip count depends on "
                   f"{names})"]


def _while_index(f):
  eqns = compat.open_jaxpr(jax.make_jaxpr(f)(W, X)).eqns
  return [e.primitive for e in eqns].index(lax.while_p)


def _fori(w, h):
  return lax.fori_loop(0, jnp.int32(3), lambda i, h: _layer(w, h), h)


NESTED = {
    "jit": lambda w, x: jax.jit(_fori)(w, x),
    "jit_bound_passed_in": lambda w, x: jax.jit(
        lambda w, x, n: lax.fori_loop(0, n, lambda i, h: _layer(w, h), x))(w, x, 3),
    "remat": lambda w, x: jax.checkpoint(_fori)(w, x),
    "scan_body": lambda w, x: lax.scan(
        lambda h, _: (_fori(w, h), h.sum()), x, None, length=2),
    "cond_branch": lambda w, x: lax.cond(x[0] > 0, _fori, lambda w, h: -h, w, x),
    "while_in_while": lambda w, x: lax.fori_loop(
        0, jnp.int32(2), lambda i, h: _fori(w, h), x),
}


# The equation holding the loop stays in the rewritten jaxpr.
HOLDER = {"jit": prims.jit_p, "jit_bound_passed_in": prims.jit_p,
          "remat": prims.remat_p, "scan_body": lax.scan_p, "cond_branch": lax.cond_p}


@pytest.mark.parametrize("name", NESTED)
def test_nested_loops_become_scans(name):
  new, notes = _rewrite(NESTED[name], W, X)
  assert lax.while_p not in set(_prims(new))
  assert HOLDER.get(name, lax.scan_p) in set(_prims(new))
  assert 3 in _scan_lengths(new)
  assert all("-> scan of length" in n for n in notes), notes


def test_notes_say_where():
  f = lambda w, x: jax.jit(_fori)(w, x) + lax.fori_loop(
      0, jnp.argmax(x), lambda i, h: h * w[0], x)
  _, notes = _rewrite(f, W, X)
  assert notes[0] == "eqn 0 (jit) > eqn 0: while -> scan of length 3", notes
  assert notes[1].endswith("while kept (its trip count depends on x)"), notes


def test_custom_jvp_body_is_kept():
  @jax.custom_jvp
  def act(h):
    return lax.fori_loop(0, jnp.int32(2), lambda i, h: jnp.sin(h), h)
  act.defjvp(lambda p, t: (act(p[0]), jnp.cos(p[0]) * t[0]))
  new, notes = _rewrite(lambda w, x: act(x @ w), W, X)
  assert lax.while_p in set(_prims(new))
  assert len(notes) == 1 and "custom_jvp_call is kept" in notes[0], notes


def test_runaway_counter_is_kept(monkeypatch):
  monkeypatch.setattr(loops, "_MAX_TRIPS", 100)
  f = lambda w, x: lax.fori_loop(0, jnp.int32(1000), lambda i, h: _layer(w, h), x)
  new, notes = _rewrite(f, W, X)
  assert lax.while_p in set(_prims(new))
  assert notes[0].endswith("while kept (still running after 100 steps)"), notes


def test_unchanged_without_a_loop_to_rewrite():
  closed = jax.make_jaxpr(_layer)(W, X)
  assert loops.fix_trip_counts(closed) == (closed, [])
  closed = jax.make_jaxpr(DEPENDENT["bound_from_input"][0])(W, X)
  new, notes = loops.fix_trip_counts(closed)
  assert new is closed and len(notes) == 1, notes
  assert notes[0].endswith(": while kept (its trip count depends on input #1)")


def test_reverse_differentiable_under_jit_with_closed_over_tracer():
  @jax.jit
  def outer(s, w, x):
    g = loops.reverse_differentiable(
        lambda w, x: lax.fori_loop(0, jnp.int32(3), lambda i, h: h * w * s, x))
    return jax.grad(g)(w, x), g(w, x)
  grad, value = outer(2.0, 1.5, 1.0)
  np.testing.assert_allclose([grad, value], [3 * 1.5**2 * 8, 1.5**3 * 8])


def test_docstring_examples():
  assert doctest.testmod(loops).failed == 0


# End to end: a parameter used in a while_loop body, through every NTK method.

DEPTH = 3


def deep(params, x):
  """x: (N, 4) -> (N, 2); DEPTH tanh layers applied by a while_loop over the layers."""
  def body(c):
    i, h = c
    return i + 1, jnp.tanh(h @ params["w"][i] + params["b"])
  _, h = lax.while_loop(lambda c: c[0] < DEPTH, body, (0, x))
  return h @ params["v"]


def _draw(seed, n1, n2):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  params = {"w": jax.random.normal(keys[0], (DEPTH, 4, 4)) / 2,
            "b": jax.random.normal(keys[1], (4,)),
            "v": jax.random.normal(keys[2], (4, 2))}
  return (params, jax.random.normal(keys[3], (n1, 4)),
          jax.random.normal(keys[4], (n2, 4)))


@pytest.mark.full
def test_jacrev_fails_on_while_and_works_after_rewrite():
  params, x, _ = _draw(0, 3, 2)
  with pytest.raises(ValueError, match="[Rr]everse-mode differentiation"):
    jax.jacrev(deep)(params, x)
  g = loops.reverse_differentiable(deep)
  assert g.notes(params, x) == ["eqn 0: while -> scan of length 3"]
  assert g.notes({**params, "w": params["w"][:2]}, x) == [
      "eqn 0: while -> scan of length 3"]
  kept = loops.reverse_differentiable(lambda p, x: lax.fori_loop(
      0, (p["v"][0, 0] > 0) + 1, lambda i, h: h * 2, x))
  assert [n.split(": ", 1)[1] for n in kept.notes(params, x)] == [
      "while kept (its trip count depends on args[0]['v'])"]
  got, expected = jax.jacrev(g)(params, x), jax.jacfwd(deep)(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def _while_grid():
  """methods x x2 x trace x batch independence; the default tier covers each method,
  each choice of x2, trace and independence, and each method with both traces."""
  return tiers.representative(
      [pytest.param(method, with_x2, trace, independent,
                    id=f"{method}-{'x2' if with_x2 else 'no_x2'}-"
                       f"{'traced' if trace else 'full'}-"
                       f"{'per_example' if independent else 'inferred'}")
       for method in ["structured", "jacobian", "ntk_vp"] for with_x2 in (True, False)
       for trace in [(-1,), ()] for independent in (None, True)],
      lambda method, with_x2, trace, independent: [
          (method, trace), ("x2", with_x2), ("independent", independent)])


@pytest.mark.parametrize("method, with_x2, trace, independent", _while_grid())
def test_ntk_of_while_model_matches_oracle(method, with_x2, trace, independent):
  params, x1, x2 = _draw(1, 3, 2)
  x2 = x2 if with_x2 else None
  ntk_fn = nc.compile_ntk(loops.reverse_differentiable(deep), method=method,
                          trace_axes=trace, batch_independent=independent)
  expected = oracle_ntk(deep, params, x1, x2, trace, mode="fwd")
  assert_matches(ntk_fn(params, x1, x2), expected, RTOL_F64)

"""Selection rules (gather, dynamic_slice, dynamic_update_slice, scatter, scatter-add):
one-hot factors against jax.jacfwd and the declared structure, via check_rule, and the
embedding term computed by comparing positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax import lax

import ntk_compiler as nc
import oracle
import tiers
from ntk_compiler import rules
from ntk_compiler.rules import selection as sel
from ntk_compiler.structure import Structure

SEEDS = st.integers(0, 2**16)


def _normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


def _ids(seed, shape, low, high):
  return jax.random.randint(jax.random.PRNGKey(seed + 1), shape, low, high)


def test_registered():
  expected = {lax.gather_p: sel.gather_rule, lax.dynamic_slice_p: sel.dynamic_slice_rule,
              lax.dynamic_update_slice_p: sel.dynamic_update_slice_rule,
              lax.scatter_add_p: sel.scatter_add_rule, lax.scatter_p: sel.scatter_rule}
  rules.registry()
  for prim, rule in expected.items():
    assert rules._DEFAULT[prim] is rule, prim


# (name, primitive, fn, args(seed), argnum, expected structure). Ids are drawn partly out
# of range: negative ids index from the end in jnp, clip / fill / drop modes differ.
def _cases():
  table = lambda s: _normal(s, (7, 3))
  yield ("index", lax.gather_p, lambda e, t: e[t],
         lambda s: (table(s), _ids(s, (4,), -7, 7)), 0, Structure(trace=((1, 1),)))
  yield ("index_2d", lax.gather_p, lambda e, t: e[t],
         lambda s: (table(s), _ids(s, (2, 3), 0, 7)), 0, Structure(trace=((2, 1),)))
  yield ("take_fill", lax.gather_p, lambda e, t: jnp.take(e, t, axis=0, mode="fill"),
         lambda s: (table(s), _ids(s, (5,), -9, 9)), 0, Structure(trace=((1, 1),)))
  yield ("take_clip_axis1", lax.gather_p,
         lambda e, t: jnp.take(e, t, axis=1, mode="clip"),
         lambda s: (table(s), _ids(s, (4,), -2, 5)), 0, Structure(trace=((0, 0),)))
  yield ("vmapped_window", lax.gather_p,
         lambda e, t: jax.vmap(lambda i: lax.dynamic_slice_in_dim(e, i, 4, 0))(t),
         lambda s: (table(s), _ids(s, (3,), -2, 9)), 0, Structure(trace=((2, 1),)))
  yield ("vmapped_operand", lax.gather_p,
         lambda b, t: jax.vmap(lambda e, i: lax.dynamic_slice_in_dim(e, i, 2, 0))(b, t),
         lambda s: (_normal(s, (3, 5, 2)), _ids(s, (3,), 0, 6)), 0,
         Structure(trace=((2, 2),), diagonal=((0, 0),)))
  yield ("dynamic_slice", lax.dynamic_slice_p,
         lambda e, i: lax.dynamic_slice_in_dim(e, i, 3, 0),
         lambda s: (table(s), _ids(s, (), -1, 9)), 0, Structure(trace=((1, 1),)))
  yield ("dynamic_slice_2axes", lax.dynamic_slice_p,
         lambda e, i: lax.dynamic_slice(e, (i, i), (2, 2)),
         lambda s: (table(s), _ids(s, (), 0, 3)), 0, Structure())
  yield ("update_slice_operand", lax.dynamic_update_slice_p,
         lambda e, u, i: lax.dynamic_update_slice_in_dim(e, u, i, 0),
         lambda s: (table(s), _normal(s + 2, (2, 3)), _ids(s, (), 0, 9)), 0,
         Structure(diagonal=((0, 0), (1, 1))))
  yield ("update_slice_update", lax.dynamic_update_slice_p,
         lambda e, u, i: lax.dynamic_update_slice_in_dim(e, u, i, 0),
         lambda s: (table(s), _normal(s + 2, (2, 3)), _ids(s, (), 0, 9)), 1,
         Structure(trace=((1, 1),)))
  yield ("update_slice_2axes", lax.dynamic_update_slice_p,
         lambda e, u, i: lax.dynamic_update_slice(e, u, (i, 1)),
         lambda s: (table(s), _normal(s + 2, (2, 2)), _ids(s, (), 0, 9)), 1, Structure())
  yield ("scatter_add_update", lax.scatter_add_p, lambda e, u, t: e.at[t].add(u),
         lambda s: (table(s), _normal(s + 2, (5, 3)), _ids(s, (5,), -7, 7)), 1,
         Structure(trace=((1, 1),)))
  yield ("scatter_add_drop", lax.scatter_add_p,
         lambda e, u, t: e.at[t].add(u, mode="drop"),
         lambda s: (table(s), _normal(s + 2, (5, 3)), _ids(s, (5,), 0, 10)), 1,
         Structure(trace=((1, 1),)))
  yield ("scatter_add_operand", lax.scatter_add_p, lambda e, u, t: e.at[t].add(u),
         lambda s: (table(s), _normal(s + 2, (5, 3)), _ids(s, (5,), 0, 7)), 0,
         Structure(trace=((0, 0), (1, 1))))
  yield ("vmapped_scatter_add", lax.scatter_add_p,
         lambda e, u, t: jax.vmap(lambda u, i: e.at[i].add(u))(u, t),
         lambda s: (table(s), _normal(s + 2, (4, 3)), _ids(s, (4,), 0, 7)), 1,
         Structure(trace=((2, 1),), diagonal=((0, 0),)))
  yield ("vmapped_update_slice", lax.scatter_p,
         lambda b, u, t: jax.vmap(
             lambda b, u, i: lax.dynamic_update_slice_in_dim(b, u, i, 0))(b, u, t),
         lambda s: (_normal(s, (3, 5, 2)), _normal(s + 2, (3, 2, 2)), _ids(s, (3,), -1, 6)),
         1, Structure(trace=((2, 2),), diagonal=((0, 0),)))
  yield ("vmapped_update_slice_operand", lax.scatter_p,
         lambda b, u, t: jax.vmap(
             lambda b, u, i: lax.dynamic_update_slice_in_dim(b, u, i, 0))(b, u, t),
         lambda s: (_normal(s, (3, 5, 2)), _normal(s + 2, (3, 2, 2)), _ids(s, (3,), -1, 6)),
         0, Structure(diagonal=((0, 0), (1, 1), (2, 2))))


CASES = list(_cases())


# The default tier: each primitive with each operand it is checked for; the full tier
# every case.
@pytest.mark.parametrize("name, prim, fn, args, argnum, expected", tiers.representative(
    [pytest.param(*c, id=c[0]) for c in CASES],
    lambda name, prim, fn, args, argnum, expected: [(prim, argnum)]))
@given(seed=SEEDS)
def test_selection_rule(name, prim, fn, args, argnum, expected, seed):
  check = nc.check_rule(prim, fn, *args(seed), argnum=argnum)
  assert check.structure == expected


def test_gather_positions_are_one_hot():
  """The gather factor is integer positions (one-hot along the table axis), clamped in
  clip mode and -1 (nothing) out of range in fill mode."""
  table, ids = _normal(0, (7, 3)), jnp.array([0, 6, 9, -1])
  for mode, expected in (("clip", [0, 6, 6, 0]), ("fill", [0, 6, -1, -1])):
    jaxpr = jax.make_jaxpr(lambda e, t: lax.gather(
        e, t[:, None], lax.GatherDimensionNumbers((1,), (0,), (0,)), (1, 3),
        mode=mode))(table, ids)
    (eqn,) = [e for e in jaxpr.jaxpr.eqns if e.primitive is lax.gather_p]
    info = rules.EqnInfo(eqn.primitive, eqn.params, tuple(v.aval for v in eqn.invars),
                         tuple(v.aval for v in eqn.outvars))
    result = sel.gather_rule(info, 0)
    assert result.one_hot == 1
    np.testing.assert_array_equal(result.factor(table, ids[:, None]), expected)


def test_declines_what_it_cannot_express():
  """Overwriting scatters with possibly repeated ids: no rule (dense fallback, exact).
  (Two indexed axes at once in a gather have a rule: tests/test_coverage.py.)"""
  e = _normal(0, (7, 3))
  u = _normal(1, (2, 3))
  assert nc.check_rule(lax.scatter_p, lambda e, u, t: e.at[t].set(u), e, u,
                       jnp.array([1, 1]), argnum=1).structure is None


# ------------------------------------------------------------------ the embedding term

def _embedding(vocab, tokens=6, dim=4, out=3):
  def f(p, x):
    return jnp.tanh(p["embed"][x] @ p["w"]).mean(axis=1)
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"embed": jax.random.normal(k[0], (vocab, dim), jnp.float64),
            "w": jax.random.normal(k[1], (dim, out), jnp.float64) / 2}
  return (f, params, jax.random.randint(k[2], (5, tokens), 0, vocab),
          jax.random.randint(k[3], (4, tokens), 0, vocab))


@pytest.mark.parametrize("with_x2", [True, False])
def test_embedding_term_compares_ids(with_x2):
  """A large vocabulary: the table's term is contracted pairwise, comparing token ids
  (no vocabulary-sized Jacobians), and matches the oracle."""
  f, params, x1, x2 = _embedding(vocab=500)
  x2 = x2 if with_x2 else None
  ntk_fn = nc.compile_ntk(f, method="structured", trace_axes=())
  explanation = ntk_fn.explain(params, x1, x2)
  (leaf,) = [l for l in explanation.leaves if l.path == "['embed']"]
  assert leaf.contraction == "pairwise"
  (use,) = leaf.uses
  assert use.steps[0] == "gather" and not use.dense
  assert ("gather one-hot", (1, 6, 500), True) in use.factors
  full, _ = oracle.full_kernel(f, params, x1, x2)
  expected = oracle.apply_layout(full[0], (5, 3), ((5 if x2 is None else 4), 3), (), ())
  oracle.assert_matches(ntk_fn(params, x1, x2), expected, 1e-10)


@pytest.mark.parametrize("batch_independent", [True, False])
def test_embedding_materialised_by_scatter(batch_independent):
  """A small vocabulary: the table's per-example gradients are materialised by
  scatter-adding cotangents at the ids; per example and over the whole batch."""
  f, params, x1, x2 = _embedding(vocab=3, tokens=8, dim=2)
  ntk_fn = nc.compile_ntk(f, method="structured", trace_axes=(),
                          batch_independent=batch_independent)
  (leaf,) = [l for l in ntk_fn.explain(params, x1, x2).leaves if l.path == "['embed']"]
  assert leaf.contraction == "materialised"
  full, _ = oracle.full_kernel(f, params, x1, x2)
  expected = oracle.apply_layout(full[0], (5, 3), (4, 3), (), ())
  oracle.assert_matches(ntk_fn(params, x1, x2), expected, 1e-10)

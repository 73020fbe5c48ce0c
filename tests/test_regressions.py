"""One test per failure the fuzzer (tests/test_fuzz.py) found, shrunk to a small program.

Each runs every method against the float64 oracle through `fuzz_programs.check_call`
(a wrong kernel, a crash inside JAX, or a library error for valid arguments fails), and
names in its docstring what failed and where.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fuzz_programs
from tiers import full


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _assert_exact(f, params, x1, x2=None, **kwargs):
  failures = fuzz_programs.check_call(f, params, x1, x2, **kwargs)
  assert not failures, "\n".join(failures)


def _empty_mul(p, x):
  return (x[:, 1:] * p["w"]) @ p["w"].reshape(0, 2)


def _empty_tokens_scaled(p, x):
  return (p["embed"][x] * p["s"]).sum(axis=(1, 2))[:, None] * p["v"]


def _empty_switch(p, x):
  index = (x > 0).sum(axis=1) % 3
  branches = [lambda v: jnp.tanh(v @ p["a"]), lambda v: 2 * jnp.sin(v @ p["b"]),
              lambda v: v @ p["a"] + v @ p["b"]]
  return jax.vmap(lambda i, v: lax.switch(i, branches, v))(index, x) @ p["c"]


@pytest.mark.parametrize("f, params, x1, x2", [
    (_empty_mul, {"w": jnp.zeros((0,))}, _normal(0, (2, 1)), _normal(1, (3, 1))),
    pytest.param(_empty_tokens_scaled,
                 {"embed": _normal(0, (4, 3)), "s": _normal(1, (3,)), "v": _normal(2, (2,))},
                 jnp.zeros((2, 0), jnp.int32), None, marks=full),
    pytest.param(_empty_switch, {"a": jnp.zeros((3, 0)), "b": jnp.zeros((3, 0)),
                                 "c": jnp.zeros((0, 2))}, _normal(0, (2, 3)), None,
                 marks=full),
], ids=["mul", "tokens_scaled", "switch"])
def test_mul_with_zero_sized_axis(f, params, x1, x2):
  """A product whose output has a 0-sized axis (a 0-sized parameter, an empty token
  list, 0-width branch weights): the structured factor of mul squeezed that axis as if
  it had size 1 ("cannot select an axis to squeeze out"; rules/elementwise.py)."""
  _assert_exact(f, params, x1, x2)


@pytest.mark.parametrize("lengths", [(0, 1), pytest.param((2, 0), marks=full)])
def test_embedding_of_empty_and_nonempty_token_lists(lengths):
  """Token ids of length 0 on one side and not on the other: JAX emits no gather for
  empty ids, so one side's plan has no use of the table while the other's has one, and
  structured crashed in an einsum of a missing gradient (emit.contract_leaf: sum([]) is
  the int 0)."""
  def f(p, x):
    h = p["embed"][x]
    h = h.reshape(h.shape[0], h.shape[1] * h.shape[2])
    return h.sum(axis=1)[:, None] * p["v"]
  params = {"embed": _normal(0, (4, 3)), "v": _normal(1, (2,))}
  rng = np.random.default_rng(2)
  x1, x2 = (jnp.asarray(rng.integers(-4, 4, (n, t)), jnp.int32)
            for n, t in zip((2, 3), lengths))
  _assert_exact(f, params, x1, x2)


@full
def test_max_after_a_batch_mean_under_jit():
  """JAX 0.10.2's XLA differentiates this f wrongly under jit (jacrev(jit(f)) differs from
  jacrev(f) and jacfwd(f) by ~0.5 in the max reduction's cotangent; JAX 0.12 is right).
  Every method runs under jit, so there no method can be exact; check_call then demands
  that validate=True notices (nc.ValidationError). On an unaffected JAX every method must
  match the oracle. Found by the full-tier fuzzer as a 2e-2 error in every method."""
  def f(p, ids):
    h = p["p0"][ids].transpose(0, 2, 1)
    h = h - 0.5 * h.mean(0)
    h = h @ lax.dynamic_slice_in_dim(p["p1"], 1, 1, 0)
    return h.max(axis=2) @ p["p2"]
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  params = {"p0": jax.random.normal(keys[0], (4, 3)),
            "p1": jax.random.normal(keys[1], (2, 2)),
            "p2": jax.random.normal(keys[2], (3, 3))}
  _assert_exact(f, params, jnp.array([[1], [3], [-2]], jnp.int32), trace_axes=())

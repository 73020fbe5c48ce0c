"""One test per failure the fuzzer (tests/test_fuzz.py) found, shrunk to a small program.

Each runs every method against the float64 oracle through `fuzz_programs.check_call`
(a wrong kernel, a crash inside JAX, or a library error for valid arguments fails), and
names in its docstring what failed and where.
"""

import jax.numpy as jnp
import numpy as np

import fuzz_programs


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _assert_exact(f, params, x1, x2=None, **kwargs):
  failures = fuzz_programs.check_call(f, params, x1, x2, **kwargs)
  assert not failures, "\n".join(failures)


def test_mul_by_zero_sized_parameter():
  """A 0-sized parameter times an activation with a 0-sized axis: the structured factor
  of mul squeezed that axis as if it had size 1 ("cannot select an axis to squeeze out";
  rules/elementwise.py)."""
  def f(p, x):
    return (x[:, 1:] * p["w"]) @ p["w"].reshape(0, 2)
  _assert_exact(f, {"w": jnp.zeros((0,))}, _normal(0, (2, 1)), _normal(1, (3, 1)))


def test_embedding_of_empty_and_nonempty_token_lists():
  """Token ids of length 0 for x1 and 1 for x2: JAX emits no gather for the empty ids, so
  x1's plan has no use of the table while x2's has one, and structured crashed in an
  einsum of a missing gradient (emit.contract_leaf: sum([]) is the int 0)."""
  def f(p, x):
    h = p["embed"][x]
    h = h.reshape(h.shape[0], h.shape[1] * h.shape[2])
    return h.sum(axis=1)[:, None] * p["v"]
  params = {"embed": _normal(0, (4, 3)), "v": _normal(1, (2,))}
  _assert_exact(f, params, jnp.zeros((2, 0), jnp.int32), jnp.array([[1], [3], [-2]]))

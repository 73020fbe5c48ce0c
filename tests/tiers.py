"""The two test tiers.

The default tier (`python -m pytest`) runs in a few minutes and still touches every module,
method and rule family; the full tier (`NTK_FULL_TESTS=1 python -m pytest`, what CI runs)
adds the whole grids and the thorough hypothesis profile. A test marked `full` runs only in
the full tier (tests/conftest.py skips it otherwise); `representative` marks all but a
covering subset of a parametrized grid `full`.
"""

import functools
import os

import hypothesis
import jax
import jax.numpy as jnp
import pytest

FULL = os.environ.get("NTK_FULL_TESTS") == "1"
full = pytest.mark.full


def examples(default, full_tier=None):
  """hypothesis settings: `default` examples in the default tier, `full_tier` in the full
  (None: as its profile says)."""
  if FULL and full_tier is None:
    return lambda test: test
  return hypothesis.settings(max_examples=full_tier if FULL else default)


def _values(param):
  return param.values if hasattr(param, "values") else (
      param if isinstance(param, tuple) else (param,))


def representative(params, features, cost=None):
  """Marks `full` every param of a grid but a subset that covers all of its features.

  params: the grid, as `pytest.param`s or plain values / tuples of values.
  features: (values...) -> an iterable of hashable features of one param, e.g.
    `lambda model, method: [model.name, method]`, or with tags
    `[("model", model.name), ("method", method)]` where values of two kinds could coincide.

  cost: (values...) -> a positive number, the param's relative run time (default 1).

  The subset is chosen greedily and deterministically: the param that covers the most
  features not yet covered per unit of cost comes next (the earliest among equals), until
  every feature of the grid is covered. The kept params carry their own marks; the rest
  also get `full`. Returns the list of `pytest.param`s, in the grid's order.
  """
  params = [p if isinstance(p, type(pytest.param())) else pytest.param(*_values(p))
            for p in params]
  wanted = [set(features(*p.values)) for p in params]
  costs = [cost(*p.values) if cost else 1.0 for p in params]
  uncovered = set().union(*wanted)
  kept = set()
  while uncovered:
    best = max(range(len(params)),
               key=lambda i: (len(wanted[i] & uncovered) / costs[i], -i))
    kept.add(best)
    uncovered -= wanted[best]
  return [p if i in kept else pytest.param(*p.values, marks=[*p.marks, full], id=p.id)
          for i, p in enumerate(params)]


def _jaxprs(value):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(getattr(value, "jaxpr", None), "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _jaxprs(v)


def _primitive_names(jaxpr, names):
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in _jaxprs(value):
        _primitive_names(sub, names)
  return names


@functools.lru_cache(maxsize=None)
def primitives(model):
  """The names of the primitives in a zoo model's jaxpr, sub-jaxprs included: the rule
  families a run of the model touches. Traced on abstract values (nothing compiles)."""
  params, x = jax.eval_shape(lambda: model.draw(0, 2, 2, jnp.float64)[:2])
  return frozenset(_primitive_names(jax.make_jaxpr(model.f)(params, x).jaxpr, set()))

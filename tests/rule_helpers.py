"""Shared helpers of the per-rule tests."""

import jax
import jax.numpy as jnp
import numpy as np

from ntk_compiler import rules
from ntk_compiler.check import check_rule
from ntk_compiler.rules import EqnInfo


def normal(seed, shape, dtype=jnp.float64):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def check(prim, fn, *args, argnum=0):
  """check_rule with the registered rule for `prim`."""
  return check_rule(prim, fn, *args, argnum=argnum, rule=rules.registry()[prim])


def rule_result(prim, fn, *args, argnum=0):
  """The registered rule's answer for the `prim` equation that args[argnum] enters."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  target = jaxpr.invars[argnum]
  eqn, = [e for e in jaxpr.eqns if e.primitive is prim and target in e.invars]
  info = EqnInfo(prim, dict(eqn.params), tuple(v.aval for v in eqn.invars),
                 tuple(v.aval for v in eqn.outvars))
  return rules.registry()[prim](info, eqn.invars.index(target))

"""`check_rule`: a rule's factor against autodiff, its structure against the dense Jacobian."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_compiler import compat
from ntk_compiler import rules as rules_lib
from ntk_compiler.structure import Structure, one_hot_factor, structure_violations


class RuleCheckError(AssertionError):
  """A rule's factor or declared structure disagrees with autodiff."""


@dataclasses.dataclass(frozen=True)
class RuleCheck:
  """What `check_rule` verified: the structure, and the largest error it saw."""
  primitive: Any
  operand: int
  structure: Structure | None
  max_error: float


def check_rule(primitive: Any, fn: Callable[..., Any], *args: Any, argnum: int = 0,
               rule=None, rules: Mapping | None = None,
               atol: float | None = None, points: int = 2, seed: int = 0) -> RuleCheck:
  """Verifies the rule for `primitive` against `jax.jacfwd`, where `fn` applies it.

  Traces `fn(*args)`, finds the one equation of `primitive` that `args[argnum]` flows
  into directly, and at the operand values `fn` gives it checks that (1) the rule's
  factor, expanded by its declared `Structure`, equals the dense Jacobian of that
  equation's output with respect to that operand, and (2) the dense Jacobian itself has
  the declared structure (zero off-diagonal on trace and diagonal pairs, equal blocks
  along trace pairs, constant along tiled axes), independently of the factor. It then
  checks both again at `points` random values of the equation's floating-point
  operands (integer and boolean operands keep theirs): a special point such as all
  ones can hide a wrong structure (equal blocks where the rule claims them). Complex
  Jacobians are compared whole (real and imaginary parts; `jax.jacfwd` is taken as
  holomorphic for a complex operand), and random complex operands have both parts.

  Args:
    primitive: the JAX Primitive, e.g. `jax.lax.dot_general_p`.
    fn: a function applying `primitive` once to `args[argnum]` (other operands may be
      computed from the other args, or be constants).
    *args: arrays to call `fn` with.
    argnum: which argument plays the parameter.
    rule: the rule to check; default: the one registered (with `rules` overlaid).
    rules: an overlay of rules, as for `compile_ntk(rules=...)`.
    atol: absolute tolerance; default: 100 ulps of the output dtype times the largest
      Jacobian entry.
    points: how many random operand values to check at besides `fn`'s own.
    seed: the seed of those random values (the same seed, the same values).

  Returns:
    A `RuleCheck`; its structure is None when the rule declines (dense fallback).

  Raises:
    KeyError: no rule for `primitive`.
    ValueError: `args[argnum]` does not flow into exactly one `primitive` equation.
    RuleCheckError: the factor has the wrong shape or value, or the Jacobian violates
      the declared structure.

  Example:
    >>> import jax, jax.numpy as jnp, ntk_compiler as nc
    >>> check = nc.check_rule(jax.lax.dot_general_p, lambda x, w: x @ w,
    ...                       jnp.ones((2, 3)), jnp.ones((3, 4)), argnum=1)
    >>> check.structure.trace
    ((1, 1),)
  """
  if rule is None:
    table = rules_lib.registry(rules)
    if primitive not in table:
      raise KeyError(f"no rule is registered for primitive {primitive}; register one "
                     "with nc.register_rule or pass rule=.")
    rule = table[primitive]
  closed = jax.make_jaxpr(fn)(*args)
  jaxpr = compat.open_jaxpr(closed)
  found = []

  def run(jaxpr, consts, invals, targets):  # finds the eqns `targets` flow into
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, invals))
    for eqn in jaxpr.eqns:
      vals = [compat.read_atom(env, v) for v in eqn.invars]
      hits = [i for i, v in enumerate(eqn.invars) if any(v is t for t in targets)]
      body = compat.call_body(eqn)
      if body is not None:  # jit, checkpoint: look inside
        inner, inner_consts = body
        outs = run(inner, inner_consts, vals, [inner.invars[i] for i in hits])
      else:
        if eqn.primitive is primitive:
          found.extend((eqn, vals, i) for i in hits)
        outs = compat.bind_eqn(eqn, vals)
      env.update(zip(eqn.outvars, outs))
    return [compat.read_atom(env, v) for v in jaxpr.outvars]

  run(jaxpr, closed.consts, list(args), [jaxpr.invars[argnum]])
  if len(found) != 1:
    raise ValueError(f"check_rule needs args[{argnum}] to flow directly into exactly one "
                     f"{primitive} equation of fn; found {len(found)}.")
  return check_points(*found[0], rule, atol, points, seed)


def check_points(eqn, invals: list, operand: int, rule, atol: float | None = None,
                 points: int = 2, seed: int = 0) -> RuleCheck:
  """`check_eqn` at `invals`, then at `points` random operand values (`random_operands`).

  Raises:
    RuleCheckError: as `check_eqn`; the message says at which values it failed.
  """
  checks = [check_eqn(eqn, invals, operand, rule, atol)]
  for k in range(points):
    values = random_operands(eqn, invals, seed + k)
    try:
      checks.append(check_eqn(eqn, values, operand, rule, atol))
    except RuleCheckError as e:
      raise RuleCheckError(f"{e} (at random operand values, seed {seed + k}; the "
                           "operand values given passed)") from None
  return dataclasses.replace(checks[0], max_error=max(c.max_error for c in checks))


def random_operands(eqn, invals: list, seed: int) -> list:
  """`invals` with every floating-point operand replaced by standard normal values
  (complex operands: independent standard normal real and imaginary parts)."""
  rng = np.random.default_rng(seed)
  out = []
  for var, value in zip(eqn.invars, invals):
    aval = var.aval
    if jnp.issubdtype(aval.dtype, jnp.inexact):
      value = rng.normal(size=aval.shape)
      if jnp.issubdtype(aval.dtype, jnp.complexfloating):
        value = value + 1j * rng.normal(size=aval.shape)
      value = jnp.asarray(value, aval.dtype)
    out.append(value)
  return out


def check_eqn(eqn, invals: list, operand: int, rule, atol: float | None = None
              ) -> RuleCheck:
  """`check_rule` for one equation of a jaxpr and its operand values.

  A multi-output primitive's rule returns one result per output; each is checked
  against the Jacobian of its own output, and the check reports the first structure.
  """
  primitive = eqn.primitive
  info = rules_lib.EqnInfo(primitive, dict(eqn.params),
                           tuple(v.aval for v in eqn.invars),
                           tuple(v.aval for v in eqn.outvars))
  result = rule(info, operand)
  if result is None or isinstance(result, rules_lib.CutBefore):
    return RuleCheck(primitive, operand, None, 0.0)
  results = result if primitive.multiple_results else (result,)
  if len(results) != len(eqn.outvars):
    raise RuleCheckError(f"rule for {primitive} returned {len(results)} results for "
                         f"{len(eqn.outvars)} outputs; return one per output.")
  checks = []
  for j, res in enumerate(results):
    where = f"rule for {primitive} (operand {operand}" + (
        f", output {j})" if primitive.multiple_results else ")")
    checks.append(_check_output(eqn, invals, operand, j, res, atol, where))
  return RuleCheck(primitive, operand, checks[0][0], max(c[1] for c in checks))


def _check_output(eqn, invals, operand, j, result, atol, where):
  """(structure, error) of one output's rule result, or RuleCheckError."""
  w = jnp.asarray(invals[operand])

  def y_of(w_value):
    ops = list(invals)
    ops[operand] = w_value
    return compat.bind_eqn(eqn, ops)[j]

  out = y_of(w)
  jac = _jacobian(y_of, w, out, where)
  eps = float(jnp.finfo(out.dtype).eps)
  scale = max(1.0, float(np.max(np.abs(jac), initial=0)))
  atol = 100 * eps * scale if atol is None else atol
  if result is None:
    raise RuleCheckError(f"{where}: declined one output of several; decline the "
                         "operand (return None) instead.")
  if result.rebase:
    _check_bijection(jac, out.shape, w.shape, where, atol)
    return None, 0.0
  structure = result.structure
  structure.validate(out.shape, w.shape, where)
  # The structure first, on the Jacobian alone: a wrong one is named as such.
  problems = list(dict.fromkeys(  # a complex Jacobian: both parts have the structure
      p for part in _parts(jac) for p in structure_violations(part, structure, out.ndim,
                                                              atol)))
  if problems:
    raise RuleCheckError(f"{where}: the declared structure is wrong: the Jacobian "
                         f"contradicts {structure}: " + "; ".join(problems))
  factor = jnp.asarray(result.factor(*invals))
  expected_shape = structure.factor_shape(out.shape, w.shape)
  if result.one_hot is not None:
    axis = result.one_hot
    if (not 0 <= axis < len(expected_shape)
        or not jnp.issubdtype(factor.dtype, jnp.integer)):
      raise RuleCheckError(f"{where}: one_hot={axis} needs integer positions and an "
                           f"axis of the factor shape {expected_shape}.")
    factor = one_hot_factor(factor, axis, expected_shape[axis], out.dtype)
  if factor.shape != expected_shape:
    raise RuleCheckError(f"{where}: factor has shape {factor.shape}, but {structure} "
                         f"for output {out.shape} and operand {w.shape} needs "
                         f"{expected_shape}.")
  dense = _wide(structure.expand(factor, out.shape, w.shape))
  error = float(np.max(np.abs(dense - jac), initial=0))
  if error > atol:
    raise RuleCheckError(f"{where}: the factor is wrong: expanded by {structure} it "
                         f"differs from jax.jacfwd by {error:.3e} (tolerance "
                         f"{atol:.1e}).")
  return structure, error


def _wide(array) -> np.ndarray:
  """float64, or complex128 for a complex array (its imaginary part kept)."""
  array = np.asarray(array)
  return array.astype(np.complex128 if np.iscomplexobj(array) else np.float64)


def _parts(jac: np.ndarray) -> list[np.ndarray]:
  return [jac.real, jac.imag] if np.iscomplexobj(jac) else [jac]


def _jacobian(y_of, w, out, where: str) -> np.ndarray:
  """The dense Jacobian ∂y/∂w (complex where y is): jacfwd, holomorphic for complex w."""
  if not jnp.iscomplexobj(w):
    return _wide(jax.jacfwd(y_of)(w))
  if not jnp.iscomplexobj(out):
    raise RuleCheckError(f"{where}: a real output of a complex operand is not "
                         "complex-linear in it; the rule should return "
                         "NOT_COMPLEX_LINEAR (the cotangent is taken at the operand).")
  return _wide(jax.jacfwd(y_of, holomorphic=True)(w))


def _check_bijection(jac, y_shape, w_shape, where, atol) -> None:
  m = jac.reshape(int(np.prod(y_shape)), int(np.prod(w_shape)))
  ok = (m.shape[0] == m.shape[1] and np.all((np.abs(m) <= atol) | (np.abs(m - 1) <= atol))
        and np.allclose(m.sum(0), 1, atol=atol) and np.allclose(m.sum(1), 1, atol=atol))
  if not ok:
    raise RuleCheckError(f"{where}: declared a re-indexing (rebase) but its Jacobian is "
                         "not a permutation matrix.")

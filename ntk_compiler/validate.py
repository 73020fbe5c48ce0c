"""`compile_ntk(validate=True)` and `NTKFunction.verify`: checks that share no code
with the kernel.

Two checks, once per input signature:

1. Every user rule the structured plan used (registered with `register_rule` or passed
   as `rules=`; the built-in rules have their own tests) is checked with `check_rule`'s
   machinery: its factor against `jax.jacfwd` and its declared `Structure` on the dense
   Jacobian, at the operand values of that equation in this call and at random values.
2. The kernel against autodiff: for a random v shaped like f(params, x2),
   Θ·v = J1 (J2ᵀ v) is one VJP at x2 and one JVP at x1 (a JAX `linearize`), with no
   vmap, no structure rules and no kernel layout code. A traced or diagonal output axis
   keeps only the entries with equal x1 and x2 indices there, so each index of those
   axes is probed on its own: Π (their sizes) VJP/JVP pairs in a loop.

The tolerance is stated from the output dtype, not tuned: √eps, half its significant
digits (1.5e-8 for float64, 3.5e-4 for float32).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_compiler import check as check_lib
from ntk_compiler import compat
from ntk_compiler import planner
from ntk_compiler import rules as rules_lib
from ntk_compiler.methods.common import pushforward

Path = tuple

# The largest dense Jacobian (entries) a rule is checked on; beyond, the kernel check
# alone covers the rule's use (a float64 Jacobian of 2^24 entries takes 128 MiB).
MAX_JACOBIAN = 2 ** 24


class ValidationError(AssertionError):
  """`validate=True` found a wrong user rule or a kernel that disagrees with autodiff.

  Attributes:
    verification: the `Verification` report behind the error.
  """

  def __init__(self, message: str, verification: Verification):
    super().__init__(message)
    self.verification = verification


@dataclasses.dataclass(frozen=True)
class RuleReport:
  """One user rule checked at one equation of the plan.

  Attributes:
    primitive: the primitive of the equation.
    operand: the operand the parameter flows into.
    path: the equation's position in f's jaxpr (indices into nested bodies).
    error: None if the rule passed, else `check_rule`'s message (factor or structure).
    max_error: the largest |expanded factor − jax.jacfwd| seen (0 if it failed, NaN
      if not checked).
    skipped: why the rule was not checked here ("" if it was): a dense Jacobian of
      more than `MAX_JACOBIAN` entries. The kernel check still covers its use.
  """
  primitive: Any
  operand: int
  path: Path
  error: str | None
  max_error: float
  skipped: str = ""

  @property
  def ok(self) -> bool:
    return self.error is None


@dataclasses.dataclass(frozen=True)
class Verification:
  """What `NTKFunction.verify` measured.

  Attributes:
    relative_error: max over output leaves of max|Θ·v − J1 J2ᵀ v| / max|J1 J2ᵀ v|.
    leaf_errors: the same per output leaf, in flattening order.
    tolerance: √eps of the output dtype; `ok` needs relative_error <= tolerance.
    rules: one `RuleReport` per (user rule, equation, operand) the plan used.
    method: the method that computed the kernel.
    probes: the number of VJP/JVP pairs the kernel check took.
  """
  relative_error: float
  leaf_errors: tuple[float, ...]
  tolerance: float
  rules: tuple[RuleReport, ...]
  method: str
  probes: int

  @property
  def ok(self) -> bool:
    return self.relative_error <= self.tolerance and all(r.ok for r in self.rules)

  def message(self) -> str:
    """Why `ok` is False ("" when it is True)."""
    lines = [f"the user rule for {r.primitive} (operand {r.operand}, equation at "
             f"{_where(r.path)} of f's jaxpr) is wrong: {r.error.rstrip('.')}. Fix "
             "the rule (nc.check_rule reproduces this) or remove it "
             "(nc.unregister_rule, or rules={primitive: None})."
             for r in self.rules if not r.ok]
    if self.relative_error > self.tolerance:
      lines.append(
          f"the kernel (method={self.method!r}) disagrees with jvp∘vjp by "
          f"{self.relative_error:.2e} relative (tolerance {self.tolerance:.1e}, "
          "√eps of the output dtype): for a random v, Θ·v from the kernel differs "
          "from J(x1) J(x2)ᵀ v computed with one VJP and one JVP. "
          + ("The wrong user rule above explains it." if lines else
             "Likely causes: an autodiff bug upstream, such as JAX 0.10.2's vmap of a "
             "VJP through jnp.split inside lax.scan (the whole-batch path vmaps the VJP "
             "over the output basis); or a custom_vjp whose backward pass is not "
             "linear in its cotangent. Try method='ntk_vp' (forward mode over the "
             "outputs), or batch_independent=True if f treats examples independently "
             "(no vmap over the whole batch's outputs)."))
    return "\n".join(lines)


def _where(path: Path) -> str:
  return "eqns" + "".join(f"[{p}]" for p in path)


_VALIDATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def validate_once(ntk_fn, params, x1, x2, kernel) -> None:
  """`compile_ntk(validate=True)`: verifies the first call of each signature.

  Raises:
    ValidationError: a wrong user rule, or the kernel disagrees with jvp∘vjp.
    TypeError: a new signature reached under a JAX transformation (tracers), where
      nothing can be checked.
  """
  seen = _VALIDATED.setdefault(ntk_fn, set())
  key = _signature(params, x1, x2)
  if key in seen:
    return
  refuse_tracers("compile_ntk(..., validate=True)", params, x1, x2)
  report = verify(ntk_fn, params, x1, x2, kernel)
  if not report.ok:
    raise ValidationError("validate=True: " + report.message(), report)
  seen.add(key)


def verify(ntk_fn, params, x1, x2, kernel, seed: int = 0) -> Verification:
  """Checks the user rules `ntk_fn` uses at these arguments, and its `kernel` there."""
  refuse_tracers("NTKFunction.verify", params, x1, x2)
  plan = planner.plan(ntk_fn, params, x1, x2)
  reports = []
  if plan.method == "structured" and plan.kept:
    for engine, x in ((plan.engine, x1), (plan.engine2, x2)):
      if engine is not None:
        reports += check_user_rules(engine, ntk_fn.rules, params, x,
                                    plan.problem.batch_independent, seed)
  problem = plan.problem  # its f returns the output leaves whose kernel has entries
  kernels = jax.tree_util.tree_leaves(kernel)
  errors, probes, tolerance = kernel_errors(
      problem.f, params, x1, x2, [kernels[i] for i in plan.kept], problem.layouts,
      problem.shapes1, problem.shapes2, seed)
  leaf_errors = dict(zip(plan.kept, errors))
  return Verification(max(errors, default=0.0),
                      tuple(leaf_errors.get(i, 0.0) for i in range(len(kernels))),
                      tolerance, tuple(reports), plan.method, probes)


def _signature(params, x1, x2):
  sig = lambda t: (jax.tree_util.tree_structure(t), tuple(
      (jnp.shape(a), jnp.result_type(a)) for a in jax.tree_util.tree_leaves(t)))
  return sig(params), sig(x1), None if x2 is None else sig(x2)


def refuse_tracers(what: str, *trees) -> None:
  """TypeError if any leaf of `trees` is a tracer: checks need concrete values."""
  if any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(trees)):
    raise TypeError(
        f"{what} needs concrete arrays, but it was called under a JAX transformation "
        "(jax.jit, vmap, grad: its arguments are tracers), where no check can run. "
        "Call the NTK function once outside the transformation with arguments of "
        "this signature (shapes and dtypes): it is validated once per signature, "
        "and later calls under jit with that signature then pass. Or pass "
        "validate=False.")


# ---------------------------------------------------------------------------------
# 1. User rules.

def check_user_rules(engine, rules, params, x, per_example: bool,
                     seed: int = 0) -> list[RuleReport]:
  """Checks every user rule `engine` used, at the real operands and random ones."""
  targets = _user_rule_targets(engine, rules)
  if not targets:
    return []
  leaves = jax.tree_util.tree_leaves(params)
  inputs = jax.tree_util.tree_leaves(x)
  if per_example:
    inputs = [a[0] for a in inputs]
  values = _operand_values(engine.jaxpr, engine.consts, leaves + inputs, set(targets))
  reports = []
  for path, (eqn, operands) in targets.items():
    rule = rules[eqn.primitive]
    for operand in sorted(operands):
      invals = values.get(path)
      size = math.prod(eqn.invars[operand].aval.shape) * sum(
          math.prod(v.aval.shape) for v in eqn.outvars)
      if size > MAX_JACOBIAN:
        reports.append(RuleReport(
            eqn.primitive, operand, path, None, math.nan,
            f"its dense Jacobian would have {size:.2e} entries (more than "
            f"{MAX_JACOBIAN:.1e}); check the rule with nc.check_rule on smaller shapes"))
        continue
      try:
        if invals is None:  # a cond branch not taken here: random values only
          base = [np.zeros(v.aval.shape, v.aval.dtype) for v in eqn.invars]
          check = check_lib.check_points(
              eqn, check_lib.random_operands(eqn, base, seed), operand, rule,
              points=1, seed=seed + 1)
        else:
          check = check_lib.check_points(eqn, invals, operand, rule, points=2,
                                         seed=seed)
        reports.append(RuleReport(eqn.primitive, operand, path, None, check.max_error))
      except check_lib.RuleCheckError as e:
        reports.append(RuleReport(eqn.primitive, operand, path, str(e), 0.0))
  return reports


def _user_rule_targets(engine, rules) -> dict:
  """path -> (eqn, operands) of each equation where the plan composed a user rule: a
  factor (engine.factors), or a re-indexing (rebase), which leaves no factor."""
  targets = {}
  for path, eqn in _equations(engine.jaxpr, ()):
    rule = rules.get(eqn.primitive)
    if rule is None or rules_lib.is_builtin(eqn.primitive, rule):
      continue
    operands = {operand for _, operand in engine.factors.get(path, ())}
    operands |= _rebase_operands(eqn, rule)
    if operands:
      targets[path] = (eqn, operands)
  return targets


def _rebase_operands(eqn, rule) -> set:
  info = rules_lib.EqnInfo(eqn.primitive, dict(eqn.params),
                           tuple(v.aval for v in eqn.invars),
                           tuple(v.aval for v in eqn.outvars))
  found = set()
  for k, v in enumerate(eqn.invars):
    if not jnp.issubdtype(v.aval.dtype, jnp.inexact):
      continue
    answer = rule(info, k)
    answers = answer if isinstance(answer, (tuple, list)) else (answer,)
    if any(isinstance(a, rules_lib.RuleResult) and a.rebase for a in answers):
      found.add(k)
  return found


def _equations(jaxpr, prefix: Path):
  """(path, eqn) of every equation, with the analysis's paths: call and scan bodies
  under the call's path, branch b of a cond under its path + (b,)."""
  for i, eqn in enumerate(jaxpr.eqns):
    path = prefix + (i,)
    yield path, eqn
    body = compat.call_body(eqn)
    if body is not None:
      yield from _equations(body[0], path)
    elif eqn.primitive is jax.lax.scan_p and compat.scan_layout(eqn) is not None:
      yield from _equations(compat.open_jaxpr(eqn.params["jaxpr"]), path)
    elif eqn.primitive is jax.lax.cond_p:
      for b, branch in enumerate(eqn.params["branches"]):
        yield from _equations(compat.open_jaxpr(branch), path + (b,))


def _operand_values(jaxpr, consts, args, targets: set) -> dict:
  """path -> operand values of the equations at `targets`, evaluating f's jaxpr: inside
  a scan body those of its first step, inside a cond those of the branch taken."""
  found: dict = {}

  def run(jaxpr, consts, invals, prefix):
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, invals))
    for i, eqn in enumerate(jaxpr.eqns):
      path = prefix + (i,)
      vals = [compat.read_atom(env, a) for a in eqn.invars]
      if path in targets:
        found[path] = vals
      inside = any(t[:len(path)] == path and len(t) > len(path) for t in targets)
      body = compat.call_body(eqn)
      if inside and body is not None:
        outs = run(body[0], body[1], vals, path)
      else:
        if inside:
          _first_step(eqn, vals, path, run)
        outs = compat.bind_eqn(eqn, vals)
      env.update(zip(eqn.outvars, outs))
    return [compat.read_atom(env, v) for v in jaxpr.outvars]

  run(jaxpr, consts, list(args), ())
  return found


def _first_step(eqn, vals, path, run) -> None:
  """Runs the body of a scan (its first step) or of the cond branch taken."""
  if eqn.primitive is jax.lax.scan_p and compat.scan_layout(eqn) is not None:
    num_consts, num_carry = compat.scan_layout(eqn)
    body = eqn.params["jaxpr"]
    if int(eqn.params["length"]) == 0:
      return
    first = -1 if eqn.params["reverse"] else 0
    xs = [x[first] for x in vals[num_consts + num_carry:]]
    run(compat.open_jaxpr(body), list(getattr(body, "consts", [])),
        vals[:num_consts + num_carry] + xs, path)
  elif eqn.primitive is jax.lax.cond_p:
    branches = eqn.params["branches"]
    b = int(np.clip(int(vals[0]), 0, len(branches) - 1))
    run(compat.open_jaxpr(branches[b]), list(getattr(branches[b], "consts", [])),
        vals[1:], path + (b,))


# ---------------------------------------------------------------------------------
# 2. The kernel against jvp∘vjp.

def kernel_errors(f, params, x1, x2, kernels, layouts, shapes1, shapes2,
                  seed: int = 0) -> tuple[list[float], int, float]:
  """(relative error per output leaf, probes, tolerance) of `kernels` against J1 J2ᵀ v.

  For a leaf whose traced and diagonal axes C have sizes S, and a random r shaped like
  f(params, x2)'s leaf without its traced axes: probe c ∈ S is v_c = r on the entries
  whose C index is c (r broadcast along the traced axes), 0 elsewhere (and on every
  other leaf); u_c = J1 J2ᵀ v_c, read where x1's C index is c, summed over the traced
  axes, and over all probes, equals (Π traced sizes) · Σ_{x2 axes} Θ r.
  """
  x2 = x1 if x2 is None else x2
  out2 = jax.eval_shape(f, params, x2)
  leaves2 = jax.tree_util.tree_leaves(out2)
  dtype = jnp.result_type(*[l.dtype for l in leaves2]) if leaves2 else jnp.float32
  tolerance = math.sqrt(float(jnp.finfo(dtype).eps))
  rng = np.random.default_rng(seed)
  rs = [jnp.asarray(rng.normal(size=_reduced_shape(l, s2)), leaf.dtype)
        for l, s2, leaf in zip(layouts, shapes2, leaves2)]
  probes = sum(math.prod(s2[a] for a in l.trace + l.diagonal)
               for l, s2 in zip(layouts, shapes2))
  if not layouts or not jax.tree_util.tree_leaves(params):
    return [0.0] * len(layouts), 0, tolerance
  measured = _jvp_vjp(f, tuple(layouts), tuple(map(tuple, shapes2)),
                      _uses_custom_vjp(f, params, x1))(params, x1, x2, rs)
  errors = []
  for kernel, layout, r, s2, u in zip(kernels, layouts, rs, shapes2, measured):
    expected = _kernel_times(np.asarray(kernel, np.float64), layout,
                             np.asarray(r, np.float64)) * layout.trace_size(s2)
    u = np.asarray(u, np.float64)
    scale = max(np.max(np.abs(expected), initial=0.0), np.max(np.abs(u), initial=0.0))
    diff = np.max(np.abs(u - expected), initial=0.0)
    errors.append(float(diff / scale) if scale > 0 else 0.0)
  return errors, probes, tolerance


def _reduced_shape(layout, shape) -> tuple[int, ...]:
  return tuple(1 if a in layout.trace else n for a, n in enumerate(shape))


def _kernel_times(kernel, layout, r) -> np.ndarray:
  """Σ over x2's axes of Θ r (diagonal axes kept aligned), in x1's non-traced axes."""
  side1, side2, result = layout.indices()
  keep = [a for a in range(layout.ndim) if a not in layout.trace]
  r = r.reshape([r.shape[a] for a in keep])
  return np.einsum(kernel, result, r, [side2[a] for a in keep], [side1[a] for a in keep])


def _jvp_vjp(f, layouts, shapes2, transpose_vjp: bool):
  """A jitted (params, x1, x2, rs) -> per leaf Σ_c (J1 J2ᵀ v_c) read at c."""

  def run(params, x1, x2, rs):
    out2, pullback2 = jax.vjp(lambda p: f(p, x2), params)
    out1, jvp1 = pushforward(f, params, x1, transpose_vjp)
    leaves2, tree2 = jax.tree_util.tree_flatten(out2)
    results = []
    for k, (layout, s2, r) in enumerate(zip(layouts, shapes2, rs)):
      axes = layout.trace + layout.diagonal
      sizes = [s2[a] for a in axes]
      s1 = jax.tree_util.tree_leaves(out1)[k].shape

      def mask(shape, idx):
        m = jnp.ones(shape, bool)
        for a, i in zip(axes, idx):
          m = m & (jax.lax.broadcasted_iota(jnp.int32, shape, a) == i)
        return m

      def probe(c, acc, k=k, s1=s1, s2=s2, r=r, sizes=sizes):
        idx = jnp.unravel_index(c, sizes) if sizes else ()
        v = [jnp.zeros(l.shape, l.dtype) for l in leaves2]
        v[k] = jnp.where(mask(s2, idx), jnp.broadcast_to(r, s2), 0).astype(r.dtype)
        (g,) = pullback2(tree2.unflatten(v))
        u = jax.tree_util.tree_leaves(jvp1(g))[k]
        u = jnp.where(mask(s1, idx), u, 0)
        return acc + jnp.sum(u, axis=layout.trace)

      zero = jnp.zeros([n for a, n in enumerate(s1) if a not in layout.trace],
                       leaves2[k].dtype)
      results.append(jax.lax.fori_loop(0, math.prod(sizes), probe, zero))
    return results

  return jax.jit(run)


def _uses_custom_vjp(f, params, x) -> bool:
  return planner.calls_custom_vjp(compat.open_jaxpr(jax.make_jaxpr(f)(params, x)))

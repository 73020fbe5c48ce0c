"""`custom_jvp` calls followed through their JVP rule's tangent program.

A `custom_jvp_call` carries two programs: the primal body and the user's JVP rule. Its
derivative is the JVP rule's, not the body's (a gradient-reversal layer's body is the
identity, its JVP negates), so following the body would be unsound. When the JVP rule's
tangent output is linear in the tangents (JAX can transpose it), the call is replaced by

    y = stop_gradient(F(x)) + T(stop_gradient(x), x - stop_gradient(x))

with F the primal and T the tangent program: the same value (the tangent input is zero),
and the same derivative, T's (exact, to every order the engine uses: the first). The
structure rules then follow a parameter's view through T like any other program. Calls
inside call bodies (jit) are inlined; inside scan, cond and while bodies the loop or
branch is rebuilt (`lax.scan`, `lax.switch`, `lax.while_loop`) around the rewritten
bodies, with the same operands, params and outputs. Calls
that map an array elementwise (relu, gelu, softmax: every operand the output's shape)
are left opaque, as the analysis keeps them (their own derivative is used, with no
loss); so are calls whose JVP is not linear in the tangents, and every call when the
user registered a rule for `custom_jvp_call` itself.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import source_info_util
from jax.extend.core import primitives as prims

from ntk_compiler import compat

CUSTOM_JVP_CALL = getattr(prims, "custom_jvp_call_p", None)


def follow_linear_jvps(jaxpr, consts: list, num_params: int, rules) -> tuple | None:
  """(jaxpr, consts) of the program with every custom_jvp call that a parameter reaches
  and whose JVP is linear in the tangents replaced as the module docstring says (call
  bodies holding one are inlined); None if there is no such call (nothing changes).

  Args:
    jaxpr: the open jaxpr of f (invars: the parameter leaves, then the inputs).
    consts: its constants.
    num_params: how many leading invars are parameter leaves.
    rules: the rule registry in effect (a rule for custom_jvp_call wins).
  """
  if CUSTOM_JVP_CALL is None or CUSTOM_JVP_CALL in rules:
    return None
  rewriter = _Rewriter()
  in_dep = [i < num_params for i in range(len(jaxpr.invars))]
  if not rewriter.reaches(jaxpr, in_dep):
    return None

  def rewritten(*args):
    return rewriter.run(jaxpr, consts, list(args), in_dep)

  avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in jaxpr.invars]
  closed = jax.make_jaxpr(rewritten)(*avals)
  return compat.open_jaxpr(closed), list(closed.consts)


def _dep(atom, dep: dict) -> bool:
  return not isinstance(atom, compat.Literal) and dep.get(atom, False)


class _Rewriter:
  """One rewrite: which calls are candidates (decided once per equation)."""

  def __init__(self):
    self.decided: dict[int, tuple] = {}  # id(eqn) -> (eqn, candidate?)
    self.inside: dict[tuple, tuple] = {}  # (id(eqn), dep) -> (eqn, reaches a candidate?)

  def candidate(self, eqn) -> bool:
    """A custom_jvp call, not elementwise (those stay opaque, with no loss), with a JVP
    linear in the tangents."""
    if eqn.primitive is not CUSTOM_JVP_CALL:
      return False
    if id(eqn) not in self.decided:
      shapes = {tuple(v.aval.shape) for v in eqn.outvars}
      elementwise = len(eqn.outvars) == 1 and all(
          tuple(a.aval.shape) in shapes | {()} for a in eqn.invars)
      self.decided[id(eqn)] = (eqn, not elementwise and _linear_jvp(eqn))
    return self.decided[id(eqn)][1]

  def reaches(self, jaxpr, in_dep) -> bool:
    """Whether a parameter (in_dep) flows into a candidate, here or in call bodies."""
    dep = dict(zip(jaxpr.invars, in_dep))
    for eqn in jaxpr.eqns:
      ops = [_dep(a, dep) for a in eqn.invars]
      if any(ops):
        if self.candidate(eqn):
          return True
        body = compat.call_body(eqn)
        if body is not None and self.reaches(body[0], ops):
          return True
        if self.reaches_inside(eqn, ops):
          return True
      for v in eqn.outvars:
        dep[v] = any(ops)
    return False

  def reaches_inside(self, eqn, ops) -> bool:
    """Whether a parameter flows into a candidate in a scan, cond or while body (every
    body input taken to depend on it when any operand does, except a cond's index)."""
    if eqn.primitive not in _LOOPS or (eqn.primitive is lax.scan_p
                                       and compat.scan_layout(eqn) is None):
      return False
    dep = any(ops) if eqn.primitive is not lax.cond_p else any(ops[1:])
    if (id(eqn), dep) not in self.inside:
      found = dep and any(self.reaches(compat.open_jaxpr(b), [True] * len(
          compat.open_jaxpr(b).invars)) for b in _bodies(eqn))
      self.inside[(id(eqn), dep)] = (eqn, found)
    return self.inside[(id(eqn), dep)][1]

  def body_fn(self, body):
    """The closed jaxpr `body` as a function, its candidates replaced."""
    jaxpr = compat.open_jaxpr(body)
    consts = list(getattr(body, "consts", None) or [])
    return lambda *args: self.run(jaxpr, consts, list(args), [True] * len(args))

  def rebuilt(self, eqn, vals: list) -> list:
    """`eqn` (scan, cond or while) run again by its public API, bodies rewritten."""
    p = eqn.params
    if eqn.primitive is lax.scan_p:
      nc, ncar = compat.scan_layout(eqn)
      body = self.body_fn(p["jaxpr"])
      consts, init, xs = vals[:nc], vals[nc:nc + ncar], vals[nc + ncar:]

      def step(carry, x):
        outs = body(*consts, *carry, *x)
        return outs[:ncar], outs[ncar:]
      carry, ys = lax.scan(step, init, xs, length=p["length"], reverse=p["reverse"],
                           unroll=p["unroll"])
      return list(carry) + list(ys)
    if eqn.primitive is lax.cond_p:
      return list(lax.switch(vals[0], [self.body_fn(b) for b in p["branches"]],
                             *vals[1:]))
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond, body = self.body_fn(p["cond_jaxpr"]), self.body_fn(p["body_jaxpr"])
    cconsts, bconsts = vals[:nc], vals[nc:nc + nb]
    return list(lax.while_loop(lambda c: cond(*cconsts, *c)[0],
                               lambda c: list(body(*bconsts, *c)), vals[nc + nb:]))

  def run(self, jaxpr, consts, args, in_dep):
    """Evaluates `jaxpr` (under tracing), replacing the candidates."""
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    dep = dict(zip(jaxpr.invars, in_dep))
    for eqn in jaxpr.eqns:
      vals = [compat.read_atom(env, a) for a in eqn.invars]
      ops = [_dep(a, dep) for a in eqn.invars]
      body = compat.call_body(eqn) if any(ops) else None
      if body is not None and not self.candidate(eqn) and self.reaches(body[0], ops):
        outs = self.run(body[0], body[1], vals, ops)  # inlined: it holds a candidate
      elif any(ops) and self.reaches_inside(eqn, ops):
        with _source(eqn):
          outs = self.rebuilt(eqn, vals)
      else:
        with _source(eqn):  # explain() keeps pointing at the user's lines
          outs = (_followed(eqn, vals) if any(ops) and self.candidate(eqn)
                  else compat.bind_eqn(eqn, vals))
      env.update(zip(eqn.outvars, outs))
      for v in eqn.outvars:
        dep[v] = any(ops)
    return [compat.read_atom(env, v) for v in jaxpr.outvars]


_LOOPS = (lax.scan_p, lax.cond_p, lax.while_p)


def _bodies(eqn) -> list:
  """The closed jaxprs of a scan, cond or while."""
  p = eqn.params
  if eqn.primitive is lax.scan_p:
    return [p["jaxpr"]]
  if eqn.primitive is lax.cond_p:
    return list(p["branches"])
  return [p["cond_jaxpr"], p["body_jaxpr"]]


def _source(eqn):
  """The equation's source line and name stack for what is traced in the block."""
  info = getattr(eqn, "source_info", None)
  if info is None:
    return contextlib.nullcontext()
  return source_info_util.user_context(getattr(info, "traceback", None),
                                       name_stack=getattr(info, "name_stack", None))


def _inexact(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _tangent_fn(eqn, primals: list):
  """(float operand indices, g) with g(*float operands) = the call on `primals` with
  those operands replaced."""
  floats = [i for i, p in enumerate(primals) if _inexact(p)]

  def g(*values):
    ops = list(primals)
    for i, v in zip(floats, values):
      ops[i] = v
    return compat.bind_eqn(eqn, ops)
  return floats, g


def _followed(eqn, vals: list) -> list:
  """stop_gradient(F(x)) + T(stop_gradient(x), x - stop_gradient(x)), per output."""
  primals = [jax.lax.stop_gradient(v) if _inexact(v) else v for v in vals]
  floats, g = _tangent_fn(eqn, primals)
  ys, dys = jax.jvp(g, [primals[i] for i in floats],
                    [vals[i] - primals[i] for i in floats])
  return [jax.lax.stop_gradient(y) + dy if _inexact(y) else y for y, dy in zip(ys, dys)]


def _linear_jvp(eqn) -> bool:
  """Whether the call's tangent outputs are linear in its tangent inputs: JAX can
  transpose the JVP rule's tangent program (at the call's shapes and dtypes)."""
  avals = [jax.ShapeDtypeStruct(a.aval.shape, a.aval.dtype) for a in eqn.invars]

  def transposed(*primals):
    floats, g = _tangent_fn(eqn, list(primals))
    tangent_map = lambda *ts: jax.jvp(g, [primals[i] for i in floats], list(ts))[1]
    cts = [jnp.zeros(v.aval.shape, v.aval.dtype) for v in eqn.outvars]
    return jax.linear_transpose(tangent_map, *[avals[i] for i in floats])(cts)
  try:
    jax.make_jaxpr(transposed)(*avals)
  except Exception:  # noqa: BLE001 (any failure: JAX cannot transpose it: not linear)
    return False
  return True

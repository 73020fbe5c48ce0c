"""`while` loops with a trip count fixed at trace time, rewritten as `scan`.

JAX cannot reverse-differentiate `lax.while_loop`, so a parameter used in a loop body
breaks `jax.vjp` / `jax.jacrev`, and with them every NTK method. Many such loops run a
fixed number of times (`lax.fori_loop` with traced-but-constant bounds, a
`while_loop(lambda c: c[0] < n, ...)` over layers or steps). `fix_trip_counts` finds the
carry slots that decide when the loop stops (those the cond reads, closed under the
body's updates); when their initial values and everything they read are known at trace
time (literals, constants, arithmetic on those), it runs that counter loop on its own,
concretely, and replaces the `while` by a `scan` of that length over the same body.

The rewrite re-traces the jaxpr with `jax.make_jaxpr`, binding every equation again, so
it is built from public APIs. Equations holding a loop are rebuilt: `jit` with `jax.jit`,
`remat` with `jax.checkpoint`, `scan` with `lax.scan`, `cond` with `lax.switch`;
`closed_call` is inlined. `custom_jvp` / `custom_vjp` bodies are left: their derivative
is the user's rule, so a loop inside is never reverse-differentiated. Alongside, small
values computed from constants only are evaluated at trace time: that is how bounds are
learnt (the jaxpr itself is not constant-folded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as prims

from ntk_compiler import compat

_MAX_TRIPS = 10**7  # a counter loop still running after this many steps is left alone
_FOLD_SIZE = 1024  # fold constant results up to this many elements (bounds, counters)


def fix_trip_counts(closed_jaxpr: Any, names: Sequence[str] | None = None
                    ) -> tuple[Any, list[str]]:
  """Rewrites each `while` whose trip count is known at trace time as a `scan`.

  Args:
    closed_jaxpr: a closed jaxpr, as `jax.make_jaxpr` returns.
    names: how the notes name the jaxpr's inputs (default "input #i").

  Returns:
    (jaxpr, notes): a closed jaxpr with the same input and output avals computing the
    same values (`closed_jaxpr` itself when no `while` was rewritten); and one note
    per `while` found, saying where it is and the scan length or why it was kept.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> f = lambda w, x: jax.lax.fori_loop(0, jnp.int32(3), lambda i, h: h * w, x)
    >>> jaxpr, notes = fix_trip_counts(jax.make_jaxpr(f)(2.0, 1.0))
    >>> notes
    ['eqn 0: while -> scan of length 3']
  """
  jaxpr, consts = _open(closed_jaxpr)
  if not _has_while(jaxpr):
    return closed_jaxpr, []
  names = list(names) if names is not None else [
      f"input #{i}" for i in range(len(jaxpr.invars))]
  rw = _Rewriter(names)
  n = len(jaxpr.invars)
  avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype,
                                weak_type=getattr(v.aval, "weak_type", False))
           for v in jaxpr.invars]
  new = jax.make_jaxpr(lambda *a: rw.eval(
      jaxpr, consts, a, [None] * n, [frozenset([i]) for i in range(n)], ""))(*avals)
  return (new if rw.changed else closed_jaxpr), list(rw.notes.values())


def reverse_differentiable(f: Callable[..., Any]) -> Callable[..., Any]:
  """`f` with its fixed-trip-count `while` loops as `scan`s, for `jax.vjp` / `jacrev`.

  Args:
    f: any JAX function of arrays (pytrees allowed).

  Returns:
    A function computing the same values as `f`. Per signature of its arguments
    (structure, shapes, dtypes) it traces `f`, applies `fix_trip_counts` and evaluates
    the result; `g.notes(*args)` gives `fix_trip_counts`' notes for a signature
    (inputs named by their path in `args`, e.g. "args[0]['w']").

  Example:
    >>> import jax, jax.numpy as jnp
    >>> f = lambda w, x: jax.lax.fori_loop(0, jnp.int32(3), lambda i, h: h * w, x)
    >>> g = reverse_differentiable(f)
    >>> float(jax.grad(g)(2.0, 1.0))
    12.0
  """
  cache = {}

  def rewrite(args):
    paths, tree = jax.tree_util.tree_flatten_with_path(args)
    leaves = [a for _, a in paths]
    avals = tuple(jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in leaves)
    if (tree, avals) in cache:
      return leaves, cache[tree, avals]
    closed, shape = jax.make_jaxpr(lambda *a: f(*tree.unflatten(a)), return_shape=True)(
        *avals)
    new, notes = fix_trip_counts(
        closed, ["args" + jax.tree_util.keystr(p) for p, _ in paths])
    entry = (None if new is closed else _open(new), notes,
             jax.tree_util.tree_structure(shape))
    if not any(map(_traced, closed.consts)):  # f closes over no tracer of an outer trace
      cache[tree, avals] = entry
    return leaves, entry

  def g(*args):
    leaves, (jaxpr, _, out_tree) = rewrite(args)
    if jaxpr is None:  # no loop was rewritten
      return f(*args)
    return out_tree.unflatten(jax.core.eval_jaxpr(*jaxpr, *leaves))

  g.notes = lambda *args: list(rewrite(args)[1][1])
  return g


def _open(j) -> tuple[Any, list]:
  # A ClosedJaxpr up to JAX 0.10, a Jaxpr carrying its consts since 0.11.
  return compat.open_jaxpr(j), list(getattr(j, "consts", None) or [])


def _traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _has_while(jaxpr) -> bool:
  return any(e.primitive is lax.while_p or any(map(_has_while, compat.sub_jaxprs(e)))
             for e in jaxpr.eqns)


def _live(jaxpr, outs: Sequence[int]) -> tuple[list, set]:
  """The equations `outvars[outs]` need, in order, and every var they read."""
  live = {v for v in (jaxpr.outvars[i] for i in outs)
          if not isinstance(v, compat.Literal)}
  eqns = []
  for eqn in reversed(jaxpr.eqns):
    if any(v in live for v in eqn.outvars):
      eqns.append(eqn)
      live.update(v for v in eqn.invars if not isinstance(v, compat.Literal))
  return eqns[::-1], live


def _reads(jaxpr, out: int) -> list[int]:
  live = _live(jaxpr, [out])[1]
  return [i for i, v in enumerate(jaxpr.invars) if v in live]


def _eval_live(jaxpr, consts, args, outs):
  """`outvars[outs]` of a jaxpr; args it does not read may be None."""
  eqns, live = _live(jaxpr, outs)
  env = dict(zip(jaxpr.constvars, consts))
  env.update((v, a) for v, a in zip(jaxpr.invars, args) if v in live)
  for eqn in eqns:
    env.update(zip(eqn.outvars, compat.bind_eqn(
        eqn, [compat.read_atom(env, a) for a in eqn.invars])))
  return [compat.read_atom(env, jaxpr.outvars[i]) for i in outs]


def _fold(eqn, known: list) -> list:
  """An equation's results when its operands are known and the results small."""
  unknown = [None] * len(eqn.outvars)
  if (any(k is None for k in known) or eqn.effects
      or any(v.aval.size > _FOLD_SIZE for v in eqn.outvars)):
    return unknown
  try:
    with jax.ensure_compile_time_eval():  # evaluate now, even while tracing
      return compat.bind_eqn(eqn, known)
  except Exception:  # pylint: disable=broad-except
    return unknown  # e.g. no eager rule: only the trip counts it feeds stay unknown


def _count(cond, body, nc, nb, known, slots) -> int | None:
  """Runs the counter slots of a `while` on their known values; its trip count."""
  def carry(vals):
    full = list(known[nc + nb:])
    for s, v in zip(slots, vals):
      full[s] = v
    return full

  def keep_going(state):
    k, vals = state
    ok, = _eval_live(*cond, known[:nc] + carry(vals), [0])
    return lax.bitwise_and(ok, k < _MAX_TRIPS)

  def step(state):
    k, vals = state
    return k + 1, tuple(_eval_live(*body, known[nc:nc + nb] + carry(vals), slots))

  with jax.ensure_compile_time_eval():
    k = int(jax.jit(lambda v: lax.while_loop(keep_going, step, (0, v))[0])(
        tuple(known[nc + nb + s] for s in slots)))
  return k if k < _MAX_TRIPS else None


class _Rewriter:
  """Re-evaluates a jaxpr under tracing, turning fixed-trip-count `while`s into `scan`s.

  Alongside each (traced) value it tracks its concrete value when that is known at
  trace time, else None, and its taint: the indices of the top-level inputs it depends
  on (for the notes)."""

  def __init__(self, names: list[str]):
    self.names = names
    self.notes: dict[str, str] = {}  # by place: a body may be traced twice
    self.changed = False

  def eval(self, jaxpr, consts, args, known, taints, where):
    env = dict(zip(jaxpr.constvars, consts))
    kn = {v: None if _traced(c) else c for v, c in env.items()}
    tnt = dict.fromkeys(jaxpr.constvars, frozenset())
    for d, xs in ((env, args), (kn, known), (tnt, taints)):
      d.update(zip(jaxpr.invars, xs))
    for k, eqn in enumerate(jaxpr.eqns):
      vals = [compat.read_atom(env, a) for a in eqn.invars]
      kns = [compat.read_atom(kn, a) for a in eqn.invars]
      ts = [frozenset() if isinstance(a, compat.Literal) else tnt[a] for a in eqn.invars]
      env.update(zip(eqn.outvars, self.eqn(eqn, vals, kns, ts, f"{where}eqn {k}")))
      kn.update(zip(eqn.outvars, _fold(eqn, kns)))
      tnt.update(dict.fromkeys(eqn.outvars, frozenset().union(*ts)))
    return [compat.read_atom(env, a) for a in jaxpr.outvars]

  def eqn(self, eqn, vals, kns, ts, where):
    if eqn.primitive is lax.while_p:
      return self.while_loop(eqn, vals, kns, ts, where)
    if not any(map(_has_while, compat.sub_jaxprs(eqn))):
      return compat.bind_eqn(eqn, vals)
    name = eqn.primitive.name
    inner = f"{where} ({name}) > "
    if eqn.primitive is lax.scan_p and compat.scan_layout(eqn) is not None:
      nc, ncarry = compat.scan_layout(eqn)
      body, p = _open(eqn.params["jaxpr"]), eqn.params
      kns = kns[:nc] + [None] * (len(vals) - nc)  # carry and xs vary
      ts = [frozenset().union(*ts)] * len(vals)

      def step(c, x):
        out = self.eval(*body, vals[:nc] + list(c) + list(x), kns, ts, inner)
        return tuple(out[:ncarry]), tuple(out[ncarry:])
      c, ys = lax.scan(step, tuple(vals[nc:nc + ncarry]), tuple(vals[nc + ncarry:]),
                       length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
      return list(c) + list(ys)
    if eqn.primitive is lax.cond_p:
      fns = [lambda *a, b=_open(b): self.eval(*b, a, kns[1:], ts[1:], inner)
             for b in eqn.params["branches"]]
      return list(lax.switch(vals[0], fns, *vals[1:]))
    call = compat.call_body(eqn)
    if call is None:
      self.notes[where] = (f"{where}: a while inside {name} is kept (a user-defined "
                           "derivative rule, or an unknown call)")
      return compat.bind_eqn(eqn, vals)
    run = lambda *a: self.eval(*call, a, kns, ts, inner)
    if eqn.primitive is prims.remat_p:
      run = jax.checkpoint(run, prevent_cse=eqn.params.get("prevent_cse", True),
                           policy=eqn.params.get("policy"))
    elif eqn.primitive is prims.jit_p:
      run.__name__ = str(eqn.params.get("name", "jit"))
      run = jax.jit(run, inline=bool(eqn.params.get("inline", False)))
    return list(run(*vals))  # closed_call, call: inlined

  def while_loop(self, eqn, vals, kns, ts, where):
    nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    cond, body = _open(eqn.params["cond_jaxpr"]), _open(eqn.params["body_jaxpr"])
    # The operands (cond consts, body consts, carry) that decide the trip count: read by
    # the cond, closed under the body's updates of the carry slots read.
    reads, todo = set(), [i if i < nc else i + nb for i in _reads(cond[0], 0)]
    while todo:
      i = todo.pop()
      if i not in reads:
        reads.add(i)
        if i >= nc + nb:  # body invar j is operand nc + j
          todo.extend(nc + j for j in _reads(body[0], i - nc - nb))
    unknown = [ts[i] for i in sorted(reads) if kns[i] is None]
    slots = sorted(i - nc - nb for i in reads if i >= nc + nb)
    n = None if unknown else _count(cond, body, nc, nb, kns, slots)
    if n is None:
      deps = sorted(frozenset().union(*unknown))
      why = ("its trip count depends on " + ", ".join(self.names[i] for i in deps)
             if deps else "its trip count is not known at trace time" if unknown
             else f"still running after {_MAX_TRIPS} steps")
      self.notes[where] = f"{where}: while kept ({why})"
      return compat.bind_eqn(eqn, vals)
    self.notes[where] = f"{where}: while -> scan of length {n}"
    self.changed = True
    ts = [frozenset().union(*ts)] * (len(vals) - nc)
    kns = kns[nc:nc + nb] + [None] * (len(vals) - nc - nb)

    def step(c, _):
      return tuple(self.eval(*body, vals[nc:nc + nb] + list(c), kns, ts,
                             f"{where} (while) > ")), None
    return list(lax.scan(step, tuple(vals[nc + nb:]), None, length=n)[0])

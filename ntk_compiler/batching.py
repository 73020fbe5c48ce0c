"""Is f(params, x) batch independent along axis 0 of x? A static pass over its jaxprs.

Every value gets a `State`: unbatched (it does not depend on the batch; `const` lists
the axes it is known to be constant along), batched on axis k (row i along k depends on
example i only, by the same computation for every i), or mixed (examples meet; the
reason names the equation). A rule per primitive maps operand states to output states
and raises `_Mixes` when the equation lets examples meet. An unbatched value may stand
in for a batched one on axis k only where it is constant along k (a broadcast bias,
a causal mask): anything else is a position-dependent constant. Control flow is walked
recursively; loop carries are iterated to a fixed point. The analysis is sound, not
complete: a value it cannot follow counts as mixed.

The rules here are for the primitives whose facts need more than "per-example or not"
(which axes a constant is constant along, reductions, indexing, control flow). Any
other primitive's fact is derived from JAX's own batching rule (`_derived`): where
`jax.vmap` of the primitive over the batch axis traces back to the very equation, the
equation is per-example, since that is what vmap computes. So a primitive added to JAX
or a user's primitive with a batching rule needs no entry here. The lookup
`x[arange(N), ids]` (each example's own row) is followed through positions (`State`).
Loops: a while whose condition is batched (JAX's vmap of a data-dependent trip count,
`_batched_while`), and one that loops while any example's condition holds with each
example kept by a carried predicate (Equinox's `while_loop` under vmap, as diffrax runs
it: `_masked_while`, which compares computations by value numbers, `State.key`).
Equinox's own primitives are read when Equinox is imported (`_library_rules`).

What is proven (`infer`). The per-example path computes row i of f(params, x) at batch
size N as f(params, x[i:i+1])[0]: it runs f at N (ntk_vp's linearisation, shapes) and
at 1 (every per-example Jacobian, VJP and structured plan). So f is traced at
n = max(N, 2) and at 1, and "independent" needs all of:

1. Both traces succeed. A trace that raises (f that only works at even N) means "not
   proven", with the size and the error in the reason; the analysis never raises.
2. The two traces are one program up to the batch size (`_align`), equation by
   equation and in every sub-jaxpr: the same primitives; equal literals and constants
   (closed-over arrays included: `/ jnp.array([N])`, `np.ones(O) / N`); equal params
   (a callback's function included), except entries of shape-like params
   (`_SHAPE_PARAMS`) that are n in one and 1 in the other; every intermediate's shape
   equal except on axes of size n versus 1.
   This catches a squeeze whose `dimensions` grow at N = 1, Python branches on N, and
   `x ** N` or a loop of N steps. Two sizes are enough: they are the only sizes the
   per-example path runs, so a value that depends on N but agrees at n and 1 computes
   the same thing at both; and n >= 2 tells the batch size apart from a size-1 axis.
   (A third trace at n + 1, as the pass once had, proves nothing more, costs another
   make_jaxpr, and runs f at a size the user never passed, where it may fail: a table
   of exactly N rows, `x * W[:x.shape[0]]`.)
3. The propagation proves independence on both traces, told which axes of every
   value have the batch size (`_sized`): a batched value must have it on its batch
   axis only; an unbatched value with such an axis (`jnp.zeros((N, H))`) counts as
   batched there when it is constant along it (a sum over it is a sum over the batch:
   it counts N) and as mixed otherwise (`jnp.arange(N)`, a table sliced to N rows).

Then the program at N = 1 computes, per example, what the program at N computes per
row, and the per-example path is exact at N. The decision is for this N (and 1) only.

Not compared, and trusted: custom derivative rules (the functions in custom_jvp /
custom_vjp params) are taken to be as batch independent as the primal body they wrap.
A gather that JAX specialises for a size-1 batch (`jnp.take_along_axis` at N = 1: the
index's batch axis reshaped out, with the index vector axis appended for an index of
rank 2 or more, the operand's gathered as a window of size 1) is compared and analysed
in the batching form it has at N (`_canonical_trace`), which computes the same array.
Not proven although per-example: other programs that JAX specialises for a size-1 axis
take the whole-batch path.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr as _ClosedJaxpr
from jax.extend.core import primitives as _prims

from ntk_compiler import compat


@dataclasses.dataclass(frozen=True)
class Decision:
  """Whether every output of f carries the batch on axis 0, elementwise in the examples.

  Attributes:
    independent: True only when the pass proves it.
    reason: why: the primitive and equation path (`eqn 3/1` = equation 1 in the body of
      equation 3) where examples meet, or what was proven.
  """
  independent: bool
  reason: str


@dataclasses.dataclass(frozen=True)
class State:
  """What one value depends on: the batch axis, or None; or the reason it is mixed.

  Three facts about values serve the lookup `x[..., jnp.arange(N), ...]` (Flax's
  `nn.RNN(seq_lengths=...)` picks each example's last carry so), whose index is not
  per-example but is the example's own position: `pos` (unbatched: the value is the
  position along this axis, an iota), `never` (every entry is False), and `index` (a
  batched index vector along the last axis whose entries are per-example ('b') or the
  position along the batch axis ('p'); only a gather may read it).
  """
  axis: int | None = None
  # Unbatched: the axes the value is constant along. Batched: {axis} where the value is
  # the same for every example (a constant broadcast over the batch, `_sized`); only
  # `_masked_while` reads it, and loop carries drop it (`_fresh`).
  const: frozenset = frozenset()
  mixed: str | None = None
  pos: int | None = None  # unbatched only: value[i...] = i[pos]
  never: bool = False  # every entry is False
  index: tuple | None = None  # batched only: 'b' / 'p' per entry of the last axis
  origin: str | None = None  # for messages: the equation positions come from
  # A value number: values with equal keys are equal (`_keyed`). Not part of the
  # state: loop carries and joins drop it.
  key: int | None = dataclasses.field(default=None, compare=False)


UNBATCHED = State()


class _Mixes(Exception):
  """Raised by a rule: this equation lets examples meet (the message says how)."""


Rule = Callable[[Any, list, Callable], list]
_RULES: dict[Any, Rule] = {}


def _prim(name: str):
  return getattr(_prims, f"{name}_p", None) or getattr(lax, f"{name}_p", None)


def _register(names: Sequence[str]) -> Callable[[Rule], Rule]:
  """Registers a rule for every primitive of `names` this JAX version has."""
  def register(rule: Rule) -> Rule:
    for name in names:
      if (p := _prim(name)) is not None:
        _RULES[p] = rule
    return rule
  return register


def analyse(jaxpr, batched_invars: Sequence[bool]) -> Decision:
  """Decides whether `jaxpr` maps batched inputs to per-example output rows.

  Args:
    jaxpr: an open jaxpr, e.g. `compat.open_jaxpr(jax.make_jaxpr(flat_f)(*leaves))`,
      whose invars are the parameter leaves, then the input leaves.
    batched_invars: one flag per invar: True where it carries the batch on axis 0.

  Returns:
    A `Decision`: independent when every outvar carries the batch on axis 0 and row n
    of every output depends on row n of the batched inputs only, by the same
    computation for every n. An output that ignores the batch is not independent.

  Raises:
    ValueError: `batched_invars` does not match the invars, or flags a scalar.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ntk_compiler import batching
    >>> f = lambda w, x: jnp.tanh(x @ w)
    >>> j = jax.make_jaxpr(f)(jnp.ones((3, 2)), jnp.ones((4, 3)))
    >>> batching.analyse(j.jaxpr, [False, True]).independent
    True
    >>> batching.analyse(jax.make_jaxpr(lambda w, x: x - x.mean(0))(
    ...     jnp.ones(()), jnp.ones((4, 3))).jaxpr, [False, True]).independent
    False
  """
  return _analyse(compat.open_jaxpr(jaxpr), batched_invars, None)


def _analyse(jaxpr, batched_invars: Sequence[bool], sizes: dict | None,
             traced=None) -> Decision:
  _TABLES.keys, _TABLES.constants = {}, {}
  if traced is not None:
    _constants(traced)
  _library_rules()
  flags = [bool(b) for b in batched_invars]
  if len(flags) != len(jaxpr.invars):
    raise ValueError(f"batched_invars has {len(flags)} flags for a jaxpr with "
                     f"{len(jaxpr.invars)} invars; give one per invar.")
  batched = [(i, tuple(v.aval.shape)) for i, (v, b) in enumerate(zip(jaxpr.invars, flags))
             if b]
  for i, shape in batched:
    if not shape:
      raise ValueError(f"invar {i} is a scalar: it cannot carry the batch on axis 0.")
  batch_sizes = {shape[0] for _, shape in batched}
  if len(batch_sizes) > 1:
    return Decision(False, "batched inputs disagree on the batch size: "
                           f"{sorted(batch_sizes)}")
  return _verdict(_walk(jaxpr, _inputs(flags), (), sizes))


def _inputs(flags: list[bool]) -> list[State]:
  """f's inputs: batched on axis 0 or not, each its own value number."""
  return [State(0 if b else None, key=_intern(("input", i)))
          for i, b in enumerate(flags)]


def _verdict(outs: list[State]) -> Decision:
  for k, s in enumerate(outs):
    if s.mixed is not None:
      return Decision(False, f"output {k}: {s.mixed}")
    if s.index is not None:
      return Decision(False, f"output {k} holds positions along the batch axis")
    if s.axis is None:
      return Decision(False, f"output {k} does not depend on the batch")
    if s.axis != 0:
      return Decision(False, f"output {k} carries the batch on axis {s.axis}, not 0")
  return Decision(True, f"proven: all {len(outs)} outputs carry the batch on axis 0, "
                        "each row computed from its own example")


def _walk(jaxpr, in_states: Sequence[State], prefix: tuple,
          sizes: dict | None) -> list[State]:
  """The states of `jaxpr`'s outvars; constvars are unbatched. With `sizes` (from
  `_align`), every equation's outputs are also checked against the axes that have the
  batch size (`_sized`)."""
  known = _constant_keys()
  env: dict = {v: State(key=known[id(v)] if id(v) in known else
                        _intern(("constvar", id(v)))) for v in jaxpr.constvars}
  for v, s in zip(jaxpr.invars, in_states):
    env[v] = s
  read = lambda a: (_literal(a) if isinstance(a, compat.Literal)
                    else env.get(a, UNBATCHED))
  for i, eqn in enumerate(jaxpr.eqns):
    path = prefix + (i,)
    ins = [State(mixed=f"{_where(eqn, path)} uses the batch size as a value")
           if sizes is not None and (path, "literal", j) in sizes else read(a)
           for j, a in enumerate(eqn.invars)]
    outs = _keyed(eqn, ins, _apply(eqn, ins, path, sizes))
    for v, s in zip(eqn.outvars, outs):
      if sizes is not None:
        axes = sizes.get((prefix, v))
        s = dataclasses.replace(_sized(_relabel(eqn, s, v, axes), axes,
                                       _where(eqn, path)), key=s.key)
      env[v] = s
  return [read(v) for v in jaxpr.outvars]


# Value numbers (`State.key`): an equation's outputs get a key from its primitive, its
# params and its operands' keys, so two values with the same key were computed the same
# way from the same values, and are equal (primitives are deterministic; equations with
# effects get none). Identities (copy, stop_gradient, a conversion to the same dtype)
# keep their operand's key; a call's outputs have the keys its body gives them. Loop
# carries have none. Keys are interned as small integers, afresh for each analysis (and
# per thread).

_TABLES = threading.local()  # keys: structure -> key; constants: id(constvar) -> key
_STATEFUL = frozenset(p for p in (_prim("rng_uniform"),) if p is not None)  # no key


def _constant_keys() -> dict:
  """id(constvar) -> the key of its value, where known (`_constants`)."""
  if not hasattr(_TABLES, "constants"):
    _TABLES.keys, _TABLES.constants = {}, {}
  return _TABLES.constants


def _constants(closed) -> None:
  """Gives the constvars of a closed jaxpr the value numbers of their values."""
  jaxpr, consts = _parts(closed)
  consts = consts or []
  if len(consts) != len(jaxpr.constvars):
    return
  for v, c in zip(jaxpr.constvars, consts):
    try:
      _constant_keys()[id(v)] = _intern(("constant", _hashable(c)))
    except TypeError:
      pass


def _intern(structure) -> int:
  _constant_keys()  # the tables of this thread, created on first use
  keys = _TABLES.keys
  return keys.setdefault(structure, len(keys))


def _literal(a) -> State:
  value = np.asarray(a.val)
  never = value.dtype == np.bool_ and not value.any()
  return State(never=bool(never), key=_intern(
      ("literal", str(value.dtype), value.shape, value.tobytes())))


def _hashable(v):
  if _is_jaxpr(v) or callable(v):
    return ("object", id(v))
  if isinstance(v, (tuple, list)):
    return (type(v).__name__,) + tuple(map(_hashable, v))
  if isinstance(v, dict):
    return ("dict",) + tuple(sorted((k, _hashable(x)) for k, x in v.items()))
  if isinstance(v, (np.ndarray, jax.Array)):
    a = np.asarray(v)
    return ("array", str(a.dtype), a.shape, a.tobytes())
  if isinstance(v, (float, complex, np.inexact)):
    return ("number", type(v).__name__, repr(v))
  hash(v)
  return v


def _keyed(eqn, ins: list[State], outs: list[State]) -> list[State]:
  """`outs` with their value numbers (see above)."""
  if eqn.effects or eqn.primitive in _STATEFUL or any(s.key is None for s in ins):
    return outs
  if eqn.primitive in _VALUE_IDENTITIES and len(ins) == 1 and len(outs) == 1 and (
      eqn.invars[0].aval.dtype == eqn.outvars[0].aval.dtype
      and _shape(eqn.invars[0]) == _shape(eqn.outvars[0])):
    return [dataclasses.replace(outs[0], key=ins[0].key)]
  try:
    params = _hashable(eqn.params)
  except TypeError:
    return outs
  operands = tuple(s.key for s in ins)
  return [o if o.key is not None else dataclasses.replace(
      o, key=_intern((eqn.primitive, params, operands, j))) for j, o in enumerate(outs)]


def _relabel(eqn, s: State, v, axes) -> State:
  """At batch size 1 a reshape that adds or drops unit axes cannot tell which unit
  axis the batch went to ((3, 1) -> (3, 1, 1)); the trace at N tells (`axes`), and the
  data is the same whichever unit axis is called the batch axis."""
  if (eqn.primitive is lax.reshape_p and s.axis is not None
      and isinstance(axes, frozenset) and len(axes) == 1):
    (j,), shape = axes, _shape(v)
    if shape[s.axis] == 1 and shape[j] == 1:
      return State(j)
  return s


def _where(eqn, path: tuple) -> str:
  return f"{eqn.primitive} (eqn {'/'.join(map(str, path))})"


def _apply(eqn, ins: list[State], path: tuple, sizes: dict | None) -> list[State]:
  n = len(eqn.outvars)
  where = _where(eqn, path)
  if (eqn.primitive is lax.select_n_p and len(ins) == 3 and ins[0].never
      and _shape(eqn.invars[1]) == _shape(eqn.outvars[0])):
    return [dataclasses.replace(ins[1], key=None)]  # the predicate is False everywhere:
    # case 0, whatever case 1 is
  rule = _RULES.get(eqn.primitive)
  if rule is None and (compat.call_body(eqn) is not None or eqn.primitive in _CUSTOM):
    rule = _call  # walked even with mixed operands: its outputs that do not read them
    # (a loop's trip count passed along with the results) keep their states
  mixed = next((s for s in ins if s.mixed is not None), None)
  if mixed is not None and rule is not _call:
    return [mixed] * n
  if any(s.index is not None for s in ins) and eqn.primitive is not lax.gather_p:
    return [State(mixed=f"{where} uses positions along the batch axis other than as "
                        "the index of a gather")] * n
  if rule is None:
    if all(s.axis is None for s in ins):
      return [UNBATCHED] * n
    rule = _derived
  sub = lambda jaxpr, states, sized=True: _walk(jaxpr, states, path,
                                                 sizes if sized else None)
  try:
    outs = rule(eqn, ins, sub)
    if rule is not _call:  # only a call's outputs are values its body computed
      outs = [dataclasses.replace(o, key=None) for o in outs]
  except _Mixes as e:
    return [State(mixed=f"{where} {e}")] * n
  except (KeyError, AttributeError, IndexError, TypeError, ValueError) as e:
    return [State(mixed=f"{where}: its batching rule failed ({type(e).__name__}: {e})")] * n
  assert len(outs) == n, where
  origin = next((s.origin for s in ins if s.origin), None)
  if origin:  # positions that lose their meaning here: say where they came from
    outs = [dataclasses.replace(o, origin=o.origin or origin)
            if o.mixed is None and o.axis is None else o for o in outs]
  return list(outs)


def _sized(s: State, axes: frozenset | str | None, where: str) -> State:
  """`s`, checked against the axes of the value that have the batch size.

  A batched value must have the batch size on its batch axis only (a second such axis
  pairs each example with all the others). An unbatched value with an axis of the
  batch size (`jnp.zeros((N, H))`) counts as batched there when it is constant along
  it (every row the same, so a reduction over it is one over the batch), and as mixed
  otherwise (`jnp.arange(N)`, a table sliced to N rows: a position-dependent constant).
  """
  if s.mixed is not None:
    return s
  if axes is None:
    return State(mixed=f"{where}: its output was not compared between batch sizes")
  if isinstance(axes, str):
    return State(mixed=f"{where}: {axes}")
  if s.axis is not None:
    if axes != {s.axis}:
      return State(mixed=f"{where} gives a value with the batch size on axes "
                         f"{sorted(axes)}, not only on its batch axis {s.axis}")
    return s
  if not axes:
    return s
  if len(axes) > 1:
    return State(mixed=f"{where} builds a value with the batch size on several axes "
                       f"{sorted(axes)}")
  k, = axes
  if s.pos == k:  # the position along the batch axis: only a gather may use it (`index`)
    return s if s.origin else dataclasses.replace(s, origin=where)
  if k not in s.const:
    source = f": positions from {s.origin}" if s.origin else ""
    return State(mixed=f"{where} builds a value from the batch size that varies along "
                       f"its axis {k} (a position-dependent constant{source})")
  return State(k, never=s.never, const=frozenset({k}))  # batched, and equal along k


_VALUE_IDENTITIES = frozenset(p for p in (
    _prim("copy"), _prim("convert_element_type"), compat.stop_gradient_primitive())
                                if p is not None)


# Helpers shared by the rules.

def _shape(atom) -> tuple[int, ...]:
  return tuple(atom.aval.shape)


def _const_on(s: State, shape: tuple, a: int) -> bool:
  """An unbatched value that is the same at every position of axis `a`."""
  return s.axis is None and s.mixed is None and (not shape or shape[a] == 1 or a in s.const)


def _plain(eqn) -> list[State]:
  return [UNBATCHED] * len(eqn.outvars)


def _common_axis(eqn, ins, operands: Sequence[int]) -> int | None:
  """The batch axis shared by `operands` (same shapes); unbatched ones must be constant
  along it. None when all are unbatched."""
  axes = {ins[i].axis for i in operands if ins[i].axis is not None}
  if len(axes) > 1:
    raise _Mixes(f"combines values batched on different axes {sorted(axes)}")
  if not axes:
    return None
  k, = axes
  sizes = {_shape(eqn.invars[i])[k] for i in operands if ins[i].axis == k}
  if len(sizes) > 1:
    raise _Mixes(f"combines batch axes of sizes {sorted(sizes)}")
  for i in operands:
    shape = _shape(eqn.invars[i])
    if ins[i].axis is None and not _const_on(ins[i], shape, k):
      raise _Mixes(f"combines the batch axis {k} with a constant of shape {shape} "
                   "that varies along it (a position-dependent constant)")
  return k


def _common_const(eqn, ins, operands: Sequence[int], ndim: int) -> frozenset:
  return frozenset(a for a in range(ndim) if all(
      _const_on(ins[i], _shape(eqn.invars[i]), a) for i in operands))


def _map_const(s: State, shape: tuple, where: Callable[[int], int | None]) -> frozenset:
  axes = (a for a in range(len(shape)) if a in s.const or shape[a] == 1)
  return frozenset(b for b in map(where, axes) if b is not None)


def _is_zero(atom) -> bool:
  if not isinstance(atom, compat.Literal) or _shape(atom):
    return False
  try:
    return bool(np.asarray(atom.val) == 0)
  except Exception:  # noqa: BLE001 - not a number
    return False


# Elementwise and identity-like primitives.

_ELEMENTWISE = (
    "add", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2", "nextafter",
    "neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p",
    "log2", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan",
    "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "square",
    "integer_pow", "abs", "erf", "erfc", "erf_inv", "lgamma", "digamma", "polygamma",
    "igamma", "igammac", "igamma_grad_a", "zeta", "bessel_i0e", "bessel_i1e",
    "regularized_incomplete_beta", "one_minus_square", "logaddexp", "select_n", "clamp",
    "convert_element_type", "bitcast_convert_type", "reduce_precision", "copy",
    "stop_gradient", "add_jaxvals", "real", "imag", "complex", "conj", "eq", "ne", "lt",
    "le", "gt", "ge", "eq_to", "lt_to", "le_to", "and", "or", "not", "xor", "shift_left",
    "shift_right_arithmetic", "shift_right_logical", "population_count", "clz", "mulhi",
    "sharding_constraint")


@_register(_ELEMENTWISE)
def _elementwise(eqn, ins, sub):
  out = _shape(eqn.outvars[0])
  if (eqn.primitive is lax.lt_p and ins[0].pos is not None and ins[1] == UNBATCHED
      and _is_zero(eqn.invars[1])):  # a position is never negative
    return [State(const=frozenset(range(len(out))), never=True)]
  if eqn.primitive is lax.convert_element_type_p and ins[0].pos is not None:
    dtype = np.dtype(eqn.outvars[0].aval.dtype)
    if np.issubdtype(dtype, np.integer) and np.iinfo(dtype).max >= out[ins[0].pos] - 1:
      return [ins[0]]  # the positions, in another integer type that holds them
  if any(len(_shape(x)) not in (0, len(out)) for x in eqn.invars):
    raise _Mixes("has operands of unexpected rank")
  ops = range(len(ins))
  never = _never(eqn, ins)
  k = _common_axis(eqn, ins, ops)
  if k is None:
    return [State(const=_common_const(eqn, ins, ops, len(out)), never=never)] * len(
        eqn.outvars)
  if any(_shape(x)[k] != out[k] for x, s in zip(eqn.invars, ins) if s.axis == k):
    raise _Mixes(f"broadcasts the batch axis {k}")
  return [State(k, never=never)] * len(eqn.outvars)


def _never(eqn, ins) -> bool:
  """Whether a boolean result is False everywhere: `and` with an operand that is,
  `or` or a select of operands that all are, a copy of one."""
  if eqn.outvars[0].aval.dtype != np.bool_:
    return False
  p = eqn.primitive
  if p is lax.and_p:
    return any(s.never for s in ins)
  if p is lax.or_p or p in _VALUE_IDENTITIES:
    return all(s.never for s in ins)
  if p is lax.select_n_p:
    return all(s.never for s in ins[1:])
  return False


@_register(("device_put", "optimization_barrier"))
def _identity(eqn, ins, sub):
  if len(ins) != len(eqn.outvars):
    raise _Mixes("has as many outputs as operands only in known versions")
  return list(ins)


@_register(("iota",))
def _iota(eqn, ins, sub):
  ndim, d = len(_shape(eqn.outvars[0])), eqn.params["dimension"]
  return [State(const=frozenset(range(ndim)) - {d}, pos=d)]


# Structural primitives.

@_register(("broadcast_in_dim",))
def _broadcast_in_dim(eqn, ins, sub):
  if len(ins) != 1:
    raise _Mixes("has dynamic shape operands")
  s, shape, out = ins[0], _shape(eqn.invars[0]), _shape(eqn.outvars[0])
  dims = tuple(eqn.params["broadcast_dimensions"])
  if s.axis is None:
    new = frozenset(range(len(out))) - set(dims)
    pos = dims[s.pos] if s.pos is not None and out[dims[s.pos]] == shape[s.pos] else None
    const = new | _map_const(s, shape, lambda a: dims[a])
    return [State(const=const - {pos}, pos=pos, never=s.never)]
  k = dims[s.axis]
  if out[k] != shape[s.axis]:
    raise _Mixes(f"expands the batch axis {s.axis} from size {shape[s.axis]}")
  return [State(k, never=s.never)]


def _reshape_axis(shape: tuple, out: tuple, a: int) -> int | None:
  """The output axis that reshape keeps axis `a` as (same size, same row-major prefix)."""
  prefix = math.prod(shape[:a])
  for j, n in enumerate(out):
    if n == shape[a] and math.prod(out[:j]) == prefix:
      return j
  return None


@_register(("reshape",))
def _reshape(eqn, ins, sub):
  if len(ins) != 1 or eqn.params.get("dimensions") is not None:
    raise _Mixes("reorders or has dynamic shape operands")
  s, shape, out = ins[0], _shape(eqn.invars[0]), _shape(eqn.outvars[0])
  if s.axis is None:
    return [State(const=_map_const(s, shape, lambda a: _reshape_axis(shape, out, a)))]
  j = _reshape_axis(shape, out, s.axis)
  if j is None:
    raise _Mixes(f"merges or splits the batch axis {s.axis}: {shape} -> {out}")
  return [State(j)]


@_register(("squeeze",))
def _squeeze(eqn, ins, sub):
  s, shape, dims = ins[0], _shape(eqn.invars[0]), tuple(eqn.params["dimensions"])
  where = lambda a: None if a in dims else a - sum(d < a for d in dims)
  if s.axis is None:
    return [State(const=_map_const(s, shape, where))]
  if s.axis in dims:
    raise _Mixes(f"squeezes the batch axis {s.axis}")
  return [State(where(s.axis))]


@_register(("transpose",))
def _transpose(eqn, ins, sub):
  s, perm = ins[0], tuple(eqn.params["permutation"])
  if s.axis is None:
    return [State(const=_map_const(s, _shape(eqn.invars[0]), perm.index))]
  return [State(perm.index(s.axis))]


def _untouched(eqn, ins, touched: Callable[[int], bool], what: str) -> list[State]:
  """Operand 0 keeps its axes; the batch axis must not be `touched`."""
  s = ins[0]
  if any(t.axis is not None for t in ins[1:]):
    raise _Mixes("takes a batched index or fill value")
  if s.axis is None:
    return [State(const=frozenset(a for a in s.const if not touched(a)))] * len(
        eqn.outvars)
  if touched(s.axis):
    raise _Mixes(f"{what} along the batch axis {s.axis}")
  return [State(s.axis)] * len(eqn.outvars)


@_register(("slice",))
def _slice(eqn, ins, sub):
  p, shape = eqn.params, _shape(eqn.invars[0])
  strides = p["strides"] or (1,) * len(shape)
  full = lambda a: (p["start_indices"][a], p["limit_indices"][a], strides[a]) == (
      0, shape[a], 1)
  return _untouched(eqn, ins, lambda a: not full(a), "slices")


@_register(("pad",))
def _pad(eqn, ins, sub):
  config = eqn.params["padding_config"]
  return _untouched(eqn, ins, lambda a: tuple(config[a]) != (0, 0, 0), "pads")


@_register(("rev",))
def _rev(eqn, ins, sub):
  return _untouched(eqn, ins, lambda a: a in eqn.params["dimensions"], "reverses")


@_register(("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"))
def _cumulative(eqn, ins, sub):
  return _untouched(eqn, ins, lambda a: a == eqn.params["axis"], "accumulates")


@_register(("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
            "reduce_or", "reduce_xor", "argmax", "argmin"))
def _reduction(eqn, ins, sub):
  s, shape, axes = ins[0], _shape(eqn.invars[0]), tuple(eqn.params["axes"])
  where = lambda a: None if a in axes else a - sum(d < a for d in axes)
  if s.axis is None:
    return [State(const=_map_const(s, shape, where))]
  if s.axis in axes:
    raise _Mixes(f"reduces over the batch axis {s.axis}")
  return [State(where(s.axis))]


@_register(("reduce",))
def _reduce(eqn, ins, sub):
  n, dims = len(eqn.outvars), tuple(eqn.params["dimensions"])
  if any(s.axis is not None for s in ins[n:]):
    raise _Mixes("has a batched initial value")
  k = _common_axis(eqn, ins, range(n))
  if k is None:
    return _plain(eqn)
  if k in dims:
    raise _Mixes(f"reduces over the batch axis {k}")
  return [State(k - sum(d < k for d in dims))] * n


@_register(("sort",))
def _sort(eqn, ins, sub):
  k = _common_axis(eqn, ins, range(len(ins)))
  if k is None:
    return _plain(eqn)
  if k == eqn.params["dimension"]:
    raise _Mixes(f"sorts along the batch axis {k}")
  return [State(k)] * len(eqn.outvars)


@_register(("top_k",))
def _top_k(eqn, ins, sub):
  last = len(_shape(eqn.invars[0])) - 1
  axis = eqn.params.get("axis", last)
  return _untouched(eqn, ins, lambda a: a == axis % (last + 1), "selects the top k")


@_register(("split",))
def _split(eqn, ins, sub):
  return _untouched(eqn, ins, lambda a: a == eqn.params["axis"], "splits")


@_register(("stack",))
def _stack(eqn, ins, sub):
  axis = eqn.params["axis"]
  where = lambda a: a + (a >= axis)
  k = _common_axis(eqn, ins, range(len(ins)))
  if k is None:
    ndim = len(_shape(eqn.invars[0]))
    return [State(const=frozenset(map(where, _common_const(eqn, ins, range(len(ins)),
                                                           ndim))))]
  return [State(where(k))]


@_register(("unstack",))
def _unstack(eqn, ins, sub):
  axis = eqn.params["axis"]
  s, shape = ins[0], _shape(eqn.invars[0])
  where = lambda a: None if a == axis else a - (a > axis)
  if s.axis is None:
    return [State(const=_map_const(s, shape, where))] * len(eqn.outvars)
  if s.axis == axis:
    raise _Mixes(f"unstacks the batch axis {axis}")
  return [State(where(s.axis))] * len(eqn.outvars)


@_register(("tile",))
def _tile(eqn, ins, sub):
  """Tiling keeps every axis a value is constant along constant (a size-1 axis
  tiled included: the ViT's class token `jnp.tile(cls, (N, 1, 1))`)."""
  s, shape, reps = ins[0], _shape(eqn.invars[0]), eqn.params["reps"]
  if s.axis is None:
    return [State(const=_map_const(s, shape, lambda a: a))]
  if reps[s.axis] != 1:
    raise _Mixes(f"tiles along the batch axis {s.axis}")
  return [State(s.axis)]


@_register(("concatenate",))
def _concatenate(eqn, ins, sub):
  index = _index_vector(eqn, ins)
  if index is not None:
    return [index]
  k = _common_axis(eqn, ins, range(len(ins)))
  if k is None:
    return _plain(eqn)
  if k == eqn.params["dimension"]:
    raise _Mixes(f"concatenates along the batch axis {k}")
  return [State(k)]


def _index_vector(eqn, ins) -> State | None:
  """Per-example indices and positions along the batch axis k, side by side along
  the last axis: an index vector of per-example ('b') and position ('p') entries."""
  d = eqn.params["dimension"]
  if d != len(_shape(eqn.outvars[0])) - 1 or not any(s.pos is not None for s in ins):
    return None
  axes = {s.axis if s.axis is not None else s.pos for s in ins}
  if len(axes) != 1 or None in axes or d in axes:
    return None
  k, = axes
  entries = []
  for s, v in zip(ins, eqn.invars):
    if s.index is not None or (s.axis is None and s.pos != k):
      return None
    entries += ["p" if s.axis is None else "b"] * _shape(v)[d]
  return State(k, index=tuple(entries))


@_register(("dynamic_slice",))
def _dynamic_slice(eqn, ins, sub):
  sizes, shape = eqn.params["slice_sizes"], _shape(eqn.invars[0])
  return _untouched(eqn, ins, lambda a: sizes[a] != shape[a], "slices")


@_register(("dynamic_update_slice",))
def _dynamic_update_slice(eqn, ins, sub):
  if any(s.axis is not None for s in ins[2:]):
    raise _Mixes("takes a batched start index")
  k = _common_axis(eqn, ins, (0, 1))
  if k is None:
    return _plain(eqn)
  if _shape(eqn.invars[1])[k] != _shape(eqn.invars[0])[k]:
    raise _Mixes(f"updates part of the batch axis {k}")
  return [State(k)]


# Windowed primitives: the window must leave the batch axis alone.

_WINDOWED = {"reduce_window_sum": 1, "reduce_window_max": 1, "reduce_window_min": 1,
             "select_and_scatter_add": 2, "select_and_gather_add": 2,
             "select_and_scatter": 2}
_WINDOW_OPERANDS = {_prim(n): k for n, k in _WINDOWED.items()}  # the rest: inits


@_register(tuple(_WINDOWED) + ("reduce_window",))
def _window(eqn, ins, sub):
  n = _WINDOW_OPERANDS.get(eqn.primitive, len(eqn.outvars))
  if any(s.axis is not None for s in ins[n:]):
    raise _Mixes("has a batched initial value")
  k = _common_axis(eqn, ins, range(n))
  if k is None:
    return _plain(eqn)
  p = eqn.params
  trivial = (p["window_dimensions"][k] == 1 and p["window_strides"][k] == 1
             and tuple(p["padding"][k]) == (0, 0)
             and all(p[d][k] == 1 for d in ("base_dilation", "window_dilation") if d in p))
  if not trivial:
    raise _Mixes(f"slides a window along the batch axis {k}")
  return [State(k)] * len(eqn.outvars)


# Contractions.

@_register(("dot_general",))
def _dot_general(eqn, ins, sub):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  (lhs, rhs), (ls, rs) = ins[:2], (_shape(eqn.invars[0]), _shape(eqn.invars[1]))
  lfree = [a for a in range(len(ls)) if a not in lc and a not in lb]
  rfree = [a for a in range(len(rs)) if a not in rc and a not in rb]
  if lhs.axis is None and rhs.axis is None:
    const = {i for i, (a, b) in enumerate(zip(lb, rb))
             if _const_on(lhs, ls, a) and _const_on(rhs, rs, b)}
    const |= {len(lb) + i for i, a in enumerate(lfree) if _const_on(lhs, ls, a)}
    const |= {len(lb) + len(lfree) + i for i, b in enumerate(rfree)
              if _const_on(rhs, rs, b)}
    return [State(const=frozenset(const))]
  sides = ((lhs, lc, lb, lfree, rhs, rs, rb, len(lb)),
           (rhs, rc, rb, rfree, lhs, ls, lb, len(lb) + len(lfree)))
  for s, contract, batch, free, other, other_shape, other_batch, offset in sides:
    if s.axis is None:
      continue
    k = s.axis
    if k in contract:
      raise _Mixes(f"contracts the batch axis {k}")
    if k in batch:
      i = batch.index(k)
      if other.axis == other_batch[i] or _const_on(other, other_shape, other_batch[i]):
        return [State(i)]
      raise _Mixes(f"pairs the batch axis {k} with an axis of the other operand that "
                   "is neither batched nor constant")
    if other.axis is not None:
      raise _Mixes("multiplies two batched operands along different axes "
                   "(an outer product over examples)")
    return [State(offset + free.index(k))]
  raise AssertionError("unreachable")


@_register(("conv_general_dilated",))
def _conv(eqn, ins, sub):
  lhs, rhs = ins
  if lhs.axis is None and rhs.axis is None:
    return _plain(eqn)
  dn = eqn.params["dimension_numbers"]
  if rhs.axis is not None:
    raise _Mixes("has a kernel that depends on the batch")
  if lhs.axis != dn.lhs_spec[0]:
    raise _Mixes(f"convolves along the batch axis {lhs.axis}")
  if eqn.params["batch_group_count"] != 1:
    raise _Mixes("groups the batch (batch_group_count > 1)")
  return [State(dn.out_spec[0])]


@_register(("triangular_solve",))
def _triangular_solve(eqn, ins, sub):
  """a x = b (left_side) or x a = b: b's columns (left) or rows (right) are solved
  independently; leading axes are batch axes of both."""
  (a, b), nd = ins, len(_shape(eqn.invars[1]))
  if a.axis is None and b.axis is None:
    return _plain(eqn)
  k = b.axis if b.axis is not None else a.axis
  if k < nd - 2:
    return [State(_common_axis(eqn, ins, (0, 1)))]
  if k == (nd - 1 if eqn.params["left_side"] else nd - 2) and a.axis is None:
    return [State(k)]
  raise _Mixes(f"solves along the batch axis {k}")


# Indexing.

@_register(("gather",))
def _gather(eqn, ins, sub):
  (op, idx), dn = ins, eqn.params["dimension_numbers"]
  os_, is_, out = _shape(eqn.invars[0]), _shape(eqn.invars[1]), _shape(eqn.outvars[0])
  batch_pos = [j for j in range(len(out)) if j not in dn.offset_dims]
  if idx.index is not None:
    return [_positional_gather(eqn, op, idx, batch_pos)]
  if op.axis is None and idx.axis is None:
    return _plain(eqn)
  if idx.axis is not None:  # E[tokens], or both batched on paired batching dims
    k = idx.axis
    if k == len(is_) - 1:
      raise _Mixes("indexes with the batch axis as the index vector")
    if k in dn.start_indices_batching_dims:
      ob = dn.operand_batching_dims[dn.start_indices_batching_dims.index(k)]
      if op.axis != ob and not _const_on(op, os_, ob):
        raise _Mixes(f"pairs batched indices with operand axis {ob}, which varies")
    elif op.axis is not None:
      raise _Mixes("gathers from a batched operand at batched indices")
    return [State(batch_pos[k])]
  k = op.axis  # x[:, idx]: the batch axis must pass through whole
  if k in dn.operand_batching_dims:
    ib = dn.start_indices_batching_dims[dn.operand_batching_dims.index(k)]
    if not _const_on(idx, is_, ib):
      raise _Mixes(f"pairs the batch axis {k} with indices that vary along it")
    return [State(batch_pos[ib])]
  if (k in dn.collapsed_slice_dims or k in dn.start_index_map
      or eqn.params["slice_sizes"][k] != os_[k]):
    raise _Mixes(f"selects along the batch axis {k}")
  window = [a for a in range(len(os_))
            if a not in dn.collapsed_slice_dims and a not in dn.operand_batching_dims]
  return [State(dn.offset_dims[window.index(k)])]


def _positional_gather(eqn, op: State, idx: State, batch_pos: list) -> State:
  """x[..., arange(N), ...]: row i of a gather whose index vector holds the position i
  along the batch axis (the 'p' entry) picks row i of x along x's batch axis, and
  reads example i's own indices for the other axes ('b' entries): per-example."""
  dn = eqn.params["dimension_numbers"]
  os_, is_ = _shape(eqn.invars[0]), _shape(eqn.invars[1])
  p = [j for j, e in enumerate(idx.index) if e == "p"]
  if (len(p) != 1 or idx.axis == len(is_) - 1 or len(idx.index) != is_[-1]
      or tuple(getattr(dn, "operand_batching_dims", ())) or op.axis is None):
    raise _Mixes("indexes by positions along the batch axis in a way the pass cannot "
                 "follow")
  a = dn.start_index_map[p[0]]
  if op.axis != a or a not in dn.collapsed_slice_dims or eqn.params["slice_sizes"][a] != 1:
    raise _Mixes("indexes an axis other than the batch axis by positions along it")
  return State(batch_pos[idx.axis])


@_register(("scatter", "scatter_add", "scatter_sub", "scatter_mul", "scatter_min",
            "scatter_max"))
def _scatter(eqn, ins, sub):
  (op, idx, upd), dn = ins, eqn.params["dimension_numbers"]
  os_, is_, us = (_shape(x) for x in eqn.invars)
  if all(s.axis is None for s in ins):
    return [State(const=_scatter_const(eqn, ins))]
  scatter_pos = [j for j in range(len(us)) if j not in dn.update_window_dims]
  if idx.axis is not None:  # only per-example scatters on paired batching dims
    kb = idx.axis
    if kb not in dn.scatter_indices_batching_dims:
      raise _Mixes("scatters batched indices into shared positions")
    ob = dn.operand_batching_dims[dn.scatter_indices_batching_dims.index(kb)]
    u = scatter_pos[kb]
    if ((op.axis == ob or _const_on(op, os_, ob))
        and (upd.axis == u or _const_on(upd, us, u))):
      return [State(ob)]
    raise _Mixes("scatters at batched indices into a value not batched alike")
  window = [a for a in range(len(os_))
            if a not in dn.inserted_window_dims and a not in dn.operand_batching_dims]
  if op.axis is not None:
    k = op.axis
  elif upd.axis in dn.update_window_dims:
    k = window[list(dn.update_window_dims).index(upd.axis)]
  else:
    raise _Mixes("scatters batched updates into shared positions")
  if k not in window or k in dn.scatter_dims_to_operand_dims:
    raise _Mixes(f"scatters along the batch axis {k}")
  u = dn.update_window_dims[window.index(k)]
  if us[u] != os_[k]:
    raise _Mixes(f"updates part of the batch axis {k}")
  if not ((op.axis == k or _const_on(op, os_, k)) and (upd.axis == u or _const_on(upd, us, u))):
    raise _Mixes(f"combines the batch axis {k} with a value that varies along it")
  return [State(k)]


def _scatter_const(eqn, ins) -> frozenset:
  """The axes an unbatched scatter's result is constant along: operand axes that no
  index moves along (each window starts at 0 there) and that windows span whole,
  where operand and updates are both constant (a stage buffer `jnp.zeros((N, S, D))`
  filled one stage at a time with values constant along the batch axis)."""
  (op, _, upd), dn = ins, eqn.params["dimension_numbers"]
  os_, us = _shape(eqn.invars[0]), _shape(eqn.invars[2])
  window = [a for a in range(len(os_))
            if a not in dn.inserted_window_dims and a not in dn.operand_batching_dims]
  const = set()
  for a, u in zip(window, dn.update_window_dims):
    if (a not in dn.scatter_dims_to_operand_dims and us[u] == os_[a]
        and _const_on(op, os_, a) and _const_on(upd, us, u)):
      const.add(a)
  return frozenset(const)


# Primitives without a rule here: the fact JAX's own batching rule proves.

def _derived(eqn, ins, sub):
  """The batch fact of a primitive this module has no rule for, from JAX's batching rule.

  With p the primitive and θ the equation's params, `jax.vmap(p_θ)` over the batch axis
  of each batched operand (the unbatched ones passed whole) is traced at the shapes of
  the operands: if JAX's batching rule turns it into this very equation (p, θ, operand
  and output shapes, nothing else), the equation computes p_θ of each example on its
  own, with the batch on the vmap's output axis. That holds at batch size N and at 1
  alike, and θ is the same in both programs (`_align` compares every param but the
  shape-like ones, which this derivation refuses), so row i of the program at N is the
  program at 1 on example i. The trust is JAX's: a batching rule is what `jax.vmap`
  runs. Anything else (no batching rule, a rule that moves axes or rewrites the
  equation, params that hold sizes) is not proven.
  """
  if any(key in _SHAPE_PARAMS for key in eqn.params):
    raise _Mixes("has no batch rule here, and size params that JAX's batching rule "
                 "cannot be checked against")
  in_axes = [s.axis for s in ins]
  out_ndim = {len(_shape(v)) for v in eqn.outvars}
  first = next(a for a in in_axes if a is not None)
  candidates = [first] + [k for k in range(max(out_ndim)) if k != first]
  for k in candidates:
    if all(k < d for d in out_ndim) and _vmap_reproduces(eqn, in_axes, k):
      return [State(k)] * len(eqn.outvars)
  # An unbatched operand constant along the batch axis is a batched one whose rows are
  # all equal (`x` of `select(p, y, x)` broadcast over the batch): vmap it too.
  size = _shape(eqn.invars[in_axes.index(first)])[first]
  joined = [first if a is None and len(_shape(v)) > first and _shape(v)[first] == size
            and _const_on(s, _shape(v), first) else a
            for a, s, v in zip(in_axes, ins, eqn.invars)]
  if joined != in_axes and all(first < d for d in out_ndim) and _vmap_reproduces(
      eqn, joined, first):
    return [State(first)] * len(eqn.outvars)
  raise _Mixes("has no batch rule here, and JAX's batching rule for it does not "
               "reproduce the equation (it has none, or moves or rewrites the batch)")


def _vmap_reproduces(eqn, in_axes: list, out_axis: int) -> bool:
  """Whether `jax.vmap` of `eqn`'s primitive and params (batched operands on `in_axes`,
  None for the unbatched; every output on `out_axis`) traces to `eqn` itself: one
  equation, same primitive, same params, operands and outputs of the same avals."""
  def per_example(aval, axis):
    shape = tuple(aval.shape)
    if axis is not None:
      shape = shape[:axis] + shape[axis + 1:]
    return jax.ShapeDtypeStruct(shape, aval.dtype)
  prim = eqn.primitive
  try:
    params = prim.get_bind_params(eqn.params)
  except Exception:  # noqa: BLE001 - a primitive bound only with its own machinery
    return False
  bind = lambda *ops: prim.bind(*ops, **params)
  args = [jax.ShapeDtypeStruct(tuple(v.aval.shape), v.aval.dtype) for v in eqn.invars]
  try:
    per = [per_example(v.aval, a) for v, a in zip(eqn.invars, in_axes)]
    jax.eval_shape(bind, *per)  # p at the per-example shapes must be defined
    traced = jax.make_jaxpr(jax.vmap(bind, in_axes=tuple(in_axes),
                                     out_axes=out_axis))(*args)
  except Exception:  # noqa: BLE001 - no batching rule, or one that refuses
    return False
  if getattr(traced, "consts", None):
    return False
  jaxpr = _without_copies(compat.open_jaxpr(traced))
  while len(jaxpr.eqns) == 1 and (body := compat.call_body(jaxpr.eqns[0])) is not None:
    e = jaxpr.eqns[0]  # a wrapper (lax.fft is a jit): its body, operands passed through
    if (body[1] or list(e.invars) != list(jaxpr.invars)
        or list(e.outvars) != list(jaxpr.outvars)):
      return False
    jaxpr = body[0]
  if len(jaxpr.eqns) != 1:
    return False
  (e,) = jaxpr.eqns
  outs = list(jaxpr.outvars)
  return (e.primitive is prim and list(e.invars) == list(jaxpr.invars)
          and list(e.outvars) == outs and len(outs) == len(eqn.outvars)
          and all(_same_aval(a.aval, b.aval) for a, b in zip(e.invars, eqn.invars))
          and all(_same_aval(a.aval, b.aval) for a, b in zip(e.outvars, eqn.outvars))
          and e.params.keys() == eqn.params.keys()
          and all(_same_param(k, e.params[k], eqn.params[k], -1, False)
                  for k in e.params))


def _without_copies(jaxpr):
  """`jaxpr` with its `copy` equations dropped, each read of a copy reading what it
  copies (a batching rule that passes operands through `jnp.array`)."""
  if not any(e.primitive is _COPY for e in jaxpr.eqns):
    return jaxpr
  alias: dict = {}
  see = lambda a: a if isinstance(a, compat.Literal) else alias.get(a, a)
  eqns = []
  for e in jaxpr.eqns:
    if e.primitive is _COPY and len(e.invars) == 1:
      alias[e.outvars[0]] = see(e.invars[0])
    else:
      eqns.append(e.replace(invars=[see(a) for a in e.invars]))
  return jaxpr.replace(eqns=eqns, outvars=[see(v) for v in jaxpr.outvars])


_COPY = _prim("copy")


def _same_aval(a, b) -> bool:
  return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype


# Equinox's primitives, when Equinox is imported (it is optional): looked up by their
# objects, registered once (`_library_rules`).

def _library_rules() -> None:
  global _LIBRARY_DONE
  if _LIBRARY_DONE or "equinox" not in sys.modules:
    return
  _LIBRARY_DONE = True
  try:
    internal = importlib.import_module("equinox.internal")
    primitive = importlib.import_module("equinox.internal._primitive")
  except Exception:  # noqa: BLE001 - another layout: no rules, the whole batch
    return
  for name in ("unvmap_any_p", "unvmap_all_p"):
    if (p := getattr(internal, name, None)) is not None:
      _RULES[p] = _unvmap
      _VALUE_ONLY[p] = name[7:10]  # "any" / "all"
  if (p := getattr(internal, "nonbatchable_p", None)) is not None:
    _VALUE_ONLY[p] = "nonbatchable"
  if (p := getattr(internal, "maybe_set_p", None)) is not None:
    _VALUE_ONLY[p] = "maybe_set"
  if (p := getattr(primitive, "_vprim_p", None)) is not None:
    _RULES[p] = _vprim
    _VALUE_ONLY[p] = "vprim"


_LIBRARY_DONE = False
_VALUE_ONLY: dict = {}  # Equinox's primitives, by role


def _unvmap(eqn, ins, sub):
  """Equinox's `unvmap_any` / `unvmap_all`: a reduction over every axis, the batch
  included; per-example only where the operand does not depend on the batch. Of an
  operand that is False everywhere (and not empty), both are False."""
  s, = ins
  if s.axis is not None:
    raise _Mixes("reduces over the batch")
  return [State(never=s.never and math.prod(_shape(eqn.invars[0])) > 0)]


def _vprim(eqn, ins, sub):
  """Equinox's `vprim`: `jax.vmap` of another primitive (`prim`, `params`) over
  `__axis_size`, each operand mapped along its `__batch_axes` entry (None: passed
  whole), every output on axis 0. Per-example where the mapped axes are the batch (or
  constant along it) and the operands passed whole do not depend on the batch: row i
  of the output is then the primitive of row i, as vmap computes it."""
  axes = eqn.params["__batch_axes"]
  if len(axes) != len(ins):
    raise _Mixes("has a layout the pass cannot read")
  batched = False
  for b, s, v in zip(axes, ins, eqn.invars):
    if b is None:
      if s.axis is not None:
        raise _Mixes("takes the whole batch into each of its mapped calls")
    elif s.axis == b:
      batched = True
    elif not _const_on(s, _shape(v), b):
      raise _Mixes(f"maps an axis {b} that is not the batch axis of its operand")
  return [State(0) if batched else State(const=frozenset({0}))] * len(eqn.outvars)


# Calls and control flow.

_CUSTOM = compat.custom_derivative_primitives()


def _call(eqn, ins, sub):
  """jit, closed_call, remat, custom_jvp / custom_vjp: walk the (primal) body."""
  body = compat.call_body(eqn)
  if body is not None:
    _constants(_Trace(*body))
    return sub(body[0], ins)
  bodies = [j for j in compat.sub_jaxprs(eqn)
            if len(j.invars) == len(ins) and len(j.outvars) == len(eqn.outvars)]
  if len(bodies) != 1:
    raise _Mixes("has no body the pass can read")
  for value in eqn.params.values():
    if _is_jaxpr(value) and compat.open_jaxpr(value) is bodies[0]:
      _constants(value)
  return sub(bodies[0], ins)


@_register(("linear_solve",))
def _linear_solve(eqn, ins, sub):
  """custom_linear_solve (`jnp.linalg.solve`): x = solve(b), with matvec(x) = b. Each
  of its functions (matvec, vecmat, solve, transpose_solve: what its value, its
  derivatives and their transposes run) must map b's batching to itself."""
  lengths, jaxprs = tuple(eqn.params["const_lengths"]), tuple(eqn.params["jaxprs"])
  b = ins[sum(lengths):]
  if len(lengths) != len(jaxprs) or len(b) != len(eqn.outvars):
    raise _Mixes("has a layout the pass cannot read")
  start = 0
  for j, n in zip(jaxprs, lengths):
    consts, start = ins[start:start + n], start + n
    if j is None:
      continue
    keyless = [dataclasses.replace(s, key=None) for s in consts + b]  # b: any vector
    for o, s in zip(sub(compat.open_jaxpr(j), keyless), b):
      if o.mixed is not None:
        raise _Mixes(f"has a function where examples meet: {o.mixed}")
      if o.axis != s.axis:
        raise _Mixes("has a function that moves the batch axis of its operand")
  return [State(s.axis) if s.axis is not None else UNBATCHED for s in b]


def _join(a: State, b: State, shape: tuple) -> State:
  """A state that covers both a and b (loop carries, branch outputs)."""
  if a.mixed is not None or b.mixed is not None:
    return a if a.mixed is not None else b
  never = a.never and b.never
  if a.axis is None and b.axis is None:
    return State(const=a.const & b.const, never=never)
  if a.axis is not None and b.axis is not None:
    if a.axis != b.axis:
      raise _Mixes(f"moves the batch axis from {a.axis} to {b.axis} across iterations "
                   "or branches")
    return _fresh(dataclasses.replace(a, never=never))
  s, k = (b, a.axis) if a.axis is not None else (a, b.axis)
  if not _const_on(s, shape, k):
    raise _Mixes(f"joins the batch axis {k} with a constant that varies along it")
  return State(k, never=never)


def _fixed_point(body, consts: list, carry: list, xs: list, shapes: list, sub):
  """Carry states that the body maps into themselves, and the body's outputs there."""
  carry = [_fresh(c) for c in carry]  # not the initial values
  for _ in range(4 * len(carry) + 8):
    outs = sub(body, consts + carry + xs)
    new = [_join(c, o, s) for c, o, s in zip(carry, outs, shapes)]
    if new == carry:
      return carry, outs[len(carry):]
    carry = new
  raise _Mixes("has a loop carry whose batching does not settle")


def _fresh(s: State) -> State:
  """`s` for a value that may differ from the one it came from (a loop carry): no value
  number; a batched one not known to be the same for every example."""
  return dataclasses.replace(s, key=None,
                             const=s.const if s.axis is None else frozenset())


def _drop_leading(s: State) -> State:
  if s.axis is not None:
    return State(s.axis - 1)
  return State(const=frozenset(a - 1 for a in s.const if a > 0))


@_register(("scan",))
def _scan(eqn, ins, sub):
  layout = compat.scan_layout(eqn)
  if layout is None:
    raise _Mixes("has a layout the pass cannot read")
  nc, ncar = layout
  body = compat.open_jaxpr(eqn.params["jaxpr"])
  xs = ins[nc + ncar:]
  if any(s.axis == 0 for s in xs):
    raise _Mixes("scans over the batch axis 0")
  shapes = [_shape(v) for v in eqn.invars[nc:nc + ncar]]
  carry, ys = _fixed_point(body, ins[:nc], ins[nc:nc + ncar],
                           [_drop_leading(s) for s in xs], shapes, sub)
  stacked = [State(s.axis + 1) if s.axis is not None else
             s if s.mixed is not None else State(const=frozenset(a + 1 for a in s.const))
             for s in ys]
  return carry + stacked


@_register(("while",))
def _while(eqn, ins, sub):
  """A scalar condition must not depend on the batch (every example runs the same
  number of steps). A condition with an array value is the while JAX's batching rule
  makes of `jax.vmap` over a `lax.while_loop` whose condition is batched
  (`_batched_while`)."""
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  init = ins[nc + nb:]
  shapes = [_shape(v) for v in eqn.invars[nc + nb:]]
  body, cond = compat.open_jaxpr(p["body_jaxpr"]), compat.open_jaxpr(p["cond_jaxpr"])
  carry, _ = _fixed_point(body, ins[nc:nc + nb], init, [], shapes, sub)
  pred, = sub(cond, ins[:nc] + carry)
  if pred.mixed is not None:
    masked = _masked_while(eqn, ins, carry, sub)
    if masked is not None:
      return masked
    raise _Mixes(f"has a loop condition where examples meet: {pred.mixed}")
  if pred.axis is None:
    return carry
  if not _shape(cond.outvars[0]):
    raise _Mixes("has a loop condition that depends on the batch")
  return _batched_while(eqn, ins, carry, pred.axis, sub)


# A while that loops while any example's condition holds, each example kept by a
# carried predicate of its own (Equinox's `while_loop`, which diffrax runs, under
# `jax.vmap`; or the same written by hand with `jnp.any`):
#
#   cond:  any(c(carry)) [& g(unbatched carries)]
#   body:  m' = m & c(new),  x' = select(m, new_x, x) for every carry x kept per example
#
# where c is per-example, g does not depend on the batch, and m is a carry. Then m
# implies c at the start of every step after the first (the body ANDs it with c of the
# values the step keeps), so an example whose condition is False is kept as it is, and
# stays so (m stays False), whatever the others still do. If c does not depend on the
# example at the start (every example starts at t0), the first step runs for all or
# for none, as it would for each example alone. Carries that do not depend on the batch
# (a step counter shared by all examples) count the same steps at every batch size, so
# the body reads the same values in each step an example takes; only their final
# values (the trip count) depend on the other examples, and are mixed.

def _masked_while(eqn, ins, carry: list, sub) -> list | None:
  """The carries' states if `eqn` has the form above and the proof goes through, None
  if it has another form (see above)."""
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  if any(getattr(p[j], "effects", True) for j in ("cond_jaxpr", "body_jaxpr")):
    return None
  if any(c.mixed is not None for c in carry):
    return None
  body, cond = compat.open_jaxpr(p["body_jaxpr"]), compat.open_jaxpr(p["cond_jaxpr"])
  _constants(p["body_jaxpr"])
  _constants(p["cond_jaxpr"])
  parts = _condition_parts(cond)
  if parts is None:
    return None
  c, others = parts
  probe = cond.replace(outvars=[c] + others)
  c_state, *g_states = sub(probe, ins[:nc] + carry)
  if c_state.mixed is not None or c_state.axis is None:
    return None
  k = c_state.axis
  if any(g.mixed is not None or g.axis is not None for g in g_states):
    raise _Mixes("has a loop condition whose part besides any(...) depends on the batch")
  uniform = [State(const=frozenset({s.axis}), never=s.never)
             if s.axis is not None and s.axis in s.const else _fresh(s)
             for s in ins[:nc] + ins[nc + nb:]]
  start, = sub(probe.replace(outvars=[c]), uniform, sized=False)
  if not (start.mixed is None and start.axis is None
          and (k in start.const or _shape(c)[k] == 1)):
    raise _Mixes("has a condition any(c) where c depends on the example at the loop's "
                 "start (its first step is not each example's own)")
  for jm in range(len(carry)):
    masks = _masks(body, nb, jm, k, carry, _shape(c))
    if masks is None:
      continue
    cprime, new, kept = masks
    keyed = [dataclasses.replace(s, key=_intern(("carry", id(eqn), j)))
             for j, s in enumerate(carry)]
    c_new, *new_states = sub(body.replace(outvars=[cprime] + new),
                             ins[nc:nc + nb] + keyed)
    if c_new.key is None or any(s.key is None for s in new_states):
      continue
    at_new = [dataclasses.replace(s, key=n.key) for s, n in zip(carry, new_states)]
    c_again, = sub(probe.replace(outvars=[c]), ins[:nc] + at_new)
    if c_again.key != c_new.key:
      continue
    return [s if kept[j] else State(mixed=(
        "a loop carry that changes after the example's own loop ends"
        if s.axis is not None else "a loop carry that counts steps taken for every "
        "example")) for j, s in enumerate(carry)]
  raise _Mixes("loops while any example's condition holds, without a carried predicate "
               "m of the same shape with m' = m & condition(new values) that keeps "
               "each example's carries")


def _through(prod: dict, a):
  """`a`, past copies and other identities (Equinox's `nonbatchable`)."""
  while not isinstance(a, compat.Literal) and (e := prod.get(a)) is not None and (
      (e.primitive in _VALUE_IDENTITIES and len(e.invars) == 1
       and e.invars[0].aval.dtype == a.aval.dtype and _shape(e.invars[0]) == _shape(a))
      or _VALUE_ONLY.get(e.primitive) == "nonbatchable"):
    a = e.invars[0]
  return a


def _producers(jaxpr) -> dict:
  return {v: e for e in jaxpr.eqns for v in e.outvars}


def _condition_parts(cond):
  """(c, [g...]) of a condition any(c) & g & ...; None for another form."""
  prod = _producers(cond)
  out = _through(prod, cond.outvars[0])
  e = prod.get(out)
  parts = [out] if e is None or e.primitive is not lax.and_p else [
      _through(prod, a) for a in e.invars]
  anys = [a for a in parts if _is_any(prod.get(a))]
  if len(anys) != 1 or any(isinstance(a, compat.Literal) for a in parts):
    return None
  return prod[anys[0]].invars[0], [a for a in parts if a is not anys[0]]


def _is_any(e) -> bool:
  """any(x) over every axis: Equinox's `unvmap_any`, or `reduce_or` over all axes."""
  if e is None:
    return False
  if _VALUE_ONLY.get(e.primitive) == "any":
    return True
  return (e.primitive is lax.reduce_or_p
          and tuple(sorted(e.params["axes"])) == tuple(range(len(_shape(e.invars[0])))))


def _masks(body, nb: int, jm: int, k: int, carry: list, c_shape: tuple):
  """With carry jm as the predicate m: (c' with m' = m & c', the atoms whose values the
  carries take when m holds, which carries are kept where m is False), or None."""
  prod = _producers(body)
  ins, outs = body.invars[nb:], body.outvars
  m = ins[jm]
  if (carry[jm].axis != k or m.aval.dtype != np.bool_ or _shape(m) != c_shape):
    return None
  e = prod.get(_through(prod, outs[jm]))
  if e is None or e.primitive is not lax.and_p:
    return None
  a, b = (_through(prod, x) for x in e.invars)
  if m not in (a, b) or (a is m and b is m):
    return None
  cprime = b if a is m else a
  new, kept = [], []
  for j, out in enumerate(outs):
    x = _through(prod, out)
    e = prod.get(x)
    if j == jm or x is ins[j]:
      new.append(out)
      kept.append(True)
    elif ((parts := _select_parts(prod, x)) is not None and parts[1] is ins[j]
          and _mask_root(prod, parts[0]) is m and parts[3] == _shape(out)
          and carry[j].axis == k):
      new.append(parts[2])
      kept.append(True)
    elif (e is not None and _VALUE_ONLY.get(e.primitive) == "vprim"
          and _VALUE_ONLY.get(e.params.get("prim")) == "maybe_set"
          and len(e.invars) >= 2 and _through(prod, e.invars[0]) is m
          and _through(prod, e.invars[1]) is ins[j]
          and e.params["__batch_axes"][0] == k and carry[j].axis == k):
      new.append(out)  # Equinox's buffer write: select(m, xs.at[i].set(x), xs)
      kept.append(True)
    else:
      new.append(out)
      kept.append(False)
  return cprime, new, kept


def _select_parts(prod: dict, x):
  """(pred, case 0, case 1, pred's shape) of x = select_n(pred, case 0, case 1), written
  here or in the body of a call (`jnp.where` is a jit), as atoms of this jaxpr (the
  predicate past the broadcasts `_mask_root` follows); None for another form."""
  e = None if isinstance(x, compat.Literal) else prod.get(x)
  if e is None:
    return None
  if e.primitive is lax.select_n_p and len(e.invars) == 3:
    return (e.invars[0], _through(prod, e.invars[1]), e.invars[2],
            _shape(e.invars[0]))
  body = compat.call_body(e)
  if body is None:
    return None
  inner = body[0]
  iprod = _producers(inner)
  parts = _select_parts(iprod, _through(iprod, inner.outvars[list(e.outvars).index(x)]))
  if parts is None:
    return None
  pred, case0, case1, shape = parts
  pred = _mask_root(iprod, pred)
  outer = dict(zip(inner.invars, e.invars))
  if any(a not in outer for a in (pred, case0, case1)):
    return None
  return outer[pred], _through(prod, outer[case0]), outer[case1], shape


def _mask_root(prod: dict, pred):
  """`pred` past copies and broadcasts that keep its axes leading (m[:, None] broadcast
  to a carry's shape): entry (i, ...) of the result is entry i of the root."""
  while True:
    pred = _through(prod, pred)
    e = None if isinstance(pred, compat.Literal) else prod.get(pred)
    if (e is None or e.primitive is not lax.broadcast_in_dim_p
        or tuple(e.params["broadcast_dimensions"]) != tuple(range(len(_shape(
            e.invars[0]))))):
      return pred
    pred = e.invars[0]


def _batched_while(eqn, ins, carry: list, k: int, sub) -> list:
  """A while whose condition gives an array, batched on axis k: the semantics of
  `while_p` (its lowering) are then "loop while any entry is True; each step, keep
  the carry where its entry of the condition is False". The condition's shape is a
  prefix of every carry's shape, its entries broadcast along the rest.

  With every carry batched on k and condition and body per-example (row i along k
  computed from row i of the carries and from unbatched operands), example i's rows
  follow their own loop: they step while its own condition holds, and once it is
  False everywhere they stop changing (so does its condition), whatever the other
  examples still do. Row i of the result is the per-example loop's result, what
  the program at batch size 1 computes. Ordered effects are lowered without the
  per-entry select, so a while with effects is not proven."""
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  if any(getattr(p[j], "effects", True) for j in ("cond_jaxpr", "body_jaxpr")):
    raise _Mixes("has a loop condition that depends on the batch and side effects")
  body, cond = compat.open_jaxpr(p["body_jaxpr"]), compat.open_jaxpr(p["cond_jaxpr"])
  shapes = [_shape(v) for v in eqn.invars[nc + nb:]]
  prefix = _shape(cond.outvars[0])
  if not all(s[:len(prefix)] == prefix for s in shapes):
    raise _Mixes("has a batched loop condition whose shape is not a prefix of its carry")
  try:
    stepped = [_join(c, State(k), s) for c, s in zip(carry, shapes)]
  except _Mixes as e:
    raise _Mixes(f"has a loop condition batched on axis {k} and a carry that is not: "
                 f"{e}") from None
  carry, _ = _fixed_point(body, ins[nc:nc + nb], stepped, [], shapes, sub)
  bad = next((c for c in carry if c.mixed is None and c.axis != k), None)
  if bad is not None:
    raise _Mixes(f"has a loop condition batched on axis {k} and a carry that is not")
  pred, = sub(cond, ins[:nc] + carry)
  if pred.mixed is not None:
    raise _Mixes(f"has a loop condition where examples meet: {pred.mixed}")
  if pred.axis != k:
    raise _Mixes(f"has a loop condition whose batch axis moves from {k}")
  return carry


@_register(("cond",))
def _cond(eqn, ins, sub):
  if ins[0].axis is not None:
    raise _Mixes("chooses a branch by a batched predicate")
  outs = None
  for branch in eqn.params["branches"]:
    states = sub(compat.open_jaxpr(branch), ins[1:])
    outs = states if outs is None else [
        _join(a, b, _shape(v)) for a, b, v in zip(outs, states, eqn.outvars)]
  return outs


# The program the per-example path runs: f at batch size 1, against f at N.

class _Differs(Exception):
  """The two traces are not one program up to the batch size (the message says where)."""


# Params that hold sizes, offsets or strides per axis: the only ones that may change
# with the batch size (from N to 1 exactly). Any other param must be equal in both
# traces: `x ** N` (integer_pow's `y`) or a loop of N steps (scan's `length`) changes
# the computation itself. Where such an entry is not on an axis of the batch size, the
# shape of an output changes too (`x[:, N:]`), or another entry is N + c, not N
# (`x[:, N:N + 1]`), and the comparison fails. Keyed by name: a param renamed by a JAX
# release only makes the comparison stricter (the whole-batch path), never unsound.
_SHAPE_PARAMS = frozenset({
    "shape", "new_sizes", "start_indices", "limit_indices", "strides", "slice_sizes",
    "padding_config", "sizes", "window_dimensions", "window_strides", "padding",
    "base_dilation", "window_dilation", "lhs_dilation", "rhs_dilation", "reps",
    "__axis_size"})  # Equinox's vprim: the size of the axis it maps


def _parts(traced) -> tuple[Any, list | None]:
  """(open jaxpr, its constants or None where unknown) of a trace."""
  jaxpr = compat.open_jaxpr(traced)
  consts = getattr(traced, "consts", None)
  if consts is None:
    consts = getattr(jaxpr, "consts", None)
  return jaxpr, None if consts is None else list(consts)


def _is_jaxpr(x) -> bool:
  return isinstance(x, (compat.Jaxpr, _ClosedJaxpr))


def _same_value(a, b) -> bool:
  """Equal constants: same shape, dtype and values (NaNs equal)."""
  if a is b:
    return True
  try:
    a, b = np.asarray(a), np.asarray(b)
  except Exception:  # e.g. typed PRNG keys: equal only when the same object
    return False
  if a.shape != b.shape or a.dtype != b.dtype:
    return False
  try:
    return bool(np.array_equal(a, b, equal_nan=True))
  except TypeError:
    return bool(np.array_equal(a, b))


def _opaque(x) -> bool:
  """A function in params: custom derivative rules are not compared (see the module
  doc); any other (a callback) must be the same object in both traces."""
  return (callable(x) and not isinstance(x, type)) or hasattr(x, "call_wrapped")


def _same_param(key: str, a, b, n: int, rules: bool) -> bool:
  """Equal params, where entries of a shape param may be n in one and 1 in the other;
  `rules`: functions are custom derivative rules, which are not compared."""
  if isinstance(a, (tuple, list)):
    return (type(a) is type(b) and len(a) == len(b)
            and all(_same_param(key, x, y, n, rules) for x, y in zip(a, b)))
  if isinstance(a, dict):
    return (isinstance(b, dict) and a.keys() == b.keys()
            and all(_same_param(key, a[k], b[k], n, rules) for k in a))
  if rules and _opaque(a) and _opaque(b):
    return True
  if isinstance(a, (np.ndarray, jax.Array)) or isinstance(b, (np.ndarray, jax.Array)):
    return _same_value(a, b)
  if isinstance(a, (float, complex, np.inexact)):  # a NaN fill value equals itself
    return type(a) is type(b) and _same_value(a, b)
  integer = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool)
  if integer(a) and integer(b):
    return a == b or (key in _SHAPE_PARAMS and (a, b) == (n, 1))
  try:
    return type(a) is type(b) and bool(a == b)
  except Exception:
    return False


def _short(x) -> str:
  """A value for a message: small arrays as lists, large ones by their shape."""
  if (isinstance(x, (np.ndarray, np.generic, jax.Array, int, float, complex))
      or hasattr(x, "__array__")):
    try:
      v = np.asarray(x)
      return repr(v.tolist()) if v.size <= 8 else f"an array of shape {v.shape}"
    except Exception:  # noqa: BLE001 - e.g. PRNG keys: fall back to repr
      pass
  text = repr(x)
  return text if len(text) <= 80 else text[:77] + "..."


def _batch_axes(v, w, n: int) -> frozenset | str:
  """The axes of `v` (at batch size n) that are `w`'s (at 1) at the batch size, or why
  the two shapes differ otherwise."""
  a, b = _shape(v), _shape(w)
  if len(a) == len(b) and all(x == y or (x, y) == (n, 1) for x, y in zip(a, b)):
    return frozenset(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
  return (f"its output has shape {a} at batch size {n} but {b} at batch size 1 (a "
          "shape that depends on the batch size other than by the batch axis)")


def _align(big, one, n: int) -> tuple[dict, dict]:
  """Compares f traced at batch size n (`big`) and at 1 (`one`), equation by equation.

  Returns, for each trace, {(jaxpr path, outvar): the axes of the batch size, or why
  its shape differs}; raises `_Differs` where the programs differ otherwise.
  """
  sizes_big, sizes_one = {}, {}
  (ja, ca), (jb, cb) = _parts(big), _parts(one)
  _align_jaxpr(ja, jb, ca, cb, (), n, sizes_big, sizes_one)
  return sizes_big, sizes_one


def _align_jaxpr(a, b, ca, cb, prefix: tuple, n: int, sizes_a: dict, sizes_b: dict):
  at = f" in the body of eqn {'/'.join(map(str, prefix))}" if prefix else ""
  counts = lambda j: (len(j.invars), len(j.constvars), len(j.outvars))
  if counts(a) != counts(b):
    raise _Differs(f"the program{at} has other inputs, constants or outputs at batch "
                   "size 1")
  if a.constvars and (ca is None or cb is None or len(ca) != len(a.constvars)
                      or len(cb) != len(b.constvars)):
    raise _Differs(f"the constants of the program{at} are unknown")
  for k, (x, y) in enumerate(zip(ca or (), cb or ())):
    if not _same_value(x, y):
      raise _Differs(f"constant {k}{at} (shape {np.shape(x)}) is {_short(x)} at batch "
                     f"size {n} but {_short(y)} at batch size 1 (a constant built from "
                     "the batch size)")
  for i, (e, g) in enumerate(zip(a.eqns, b.eqns)):
    _align_eqn(e, g, prefix, i, n, sizes_a, sizes_b)
  if len(a.eqns) != len(b.eqns):
    raise _Differs(f"the program{at} has {len(a.eqns)} equations at batch size {n} but "
                   f"{len(b.eqns)} at batch size 1")
  for x, y in zip(a.outvars, b.outvars):
    _same_atom(x, y, f"an output of the program{at}", n)


def _align_eqn(e, g, prefix: tuple, i: int, n: int, sizes_a: dict, sizes_b: dict):
  where = _where(e, prefix + (i,))
  if e.primitive != g.primitive:
    raise _Differs(f"eqn {'/'.join(map(str, prefix + (i,)))} is {e.primitive} at batch "
                   f"size {n} but {g.primitive} at batch size 1")
  if (len(e.invars), len(e.outvars)) != (len(g.invars), len(g.outvars)):
    raise _Differs(f"{where} has other operands at batch size 1")
  for j, (x, y) in enumerate(zip(e.invars, g.invars)):
    if _batch_size_literals(x, y, n):  # the walk treats it as mixed (`_walk`)
      sizes_a[(prefix + (i,), "literal", j)] = sizes_b[(prefix + (i,), "literal", j)] = n
    else:
      _same_atom(x, y, where, n)
  if e.params.keys() != g.params.keys():
    raise _Differs(f"{where} has other params at batch size 1")
  for key, x in e.params.items():
    y = g.params[key]
    if _is_jaxpr(x) or _is_jaxpr(y) or (isinstance(x, tuple) and any(map(_is_jaxpr, x))):
      _align_bodies(x, y, prefix + (i,), n, sizes_a, sizes_b, where)
    elif not _same_param(key, x, y, n, e.primitive in _CUSTOM):
      raise _Differs(f"{where}: its {key} is {_short(x)} at batch size {n} but "
                     f"{_short(y)} at batch size 1")
  for v, w in zip(e.outvars, g.outvars):
    sizes_a[(prefix, v)] = sizes_b[(prefix, w)] = _batch_axes(v, w, n)


def _align_bodies(x, y, path: tuple, n: int, sizes_a: dict, sizes_b: dict, where: str):
  xs, ys = (list(t) if isinstance(t, tuple) else [t] for t in (x, y))
  if len(xs) != len(ys) or not all(
      (u is None and v is None) or (_is_jaxpr(u) and _is_jaxpr(v)) for u, v in zip(xs, ys)):
    raise _Differs(f"{where} has other bodies at batch size 1")
  for u, v in zip(xs, ys):
    if u is None:
      continue
    (ju, cu), (jv, cv) = _parts(u), _parts(v)
    _align_jaxpr(ju, jv, cu, cv, path, n, sizes_a, sizes_b)


def _batch_size_literals(x, y, n: int) -> bool:
  """Integer scalar literals that are n in one program and 1 in the other (the batch
  size, e.g. `i + N` normalising a negative index into the batch axis)."""
  if not (isinstance(x, compat.Literal) and isinstance(y, compat.Literal)):
    return False
  if _shape(x) or _shape(y) or not np.issubdtype(x.aval.dtype, np.integer):
    return False
  try:
    return (int(x.val), int(y.val)) == (n, 1) and x.aval.dtype == y.aval.dtype
  except Exception:  # noqa: BLE001 - not a number
    return False


def _same_atom(x, y, where: str, n: int) -> None:
  lx, ly = isinstance(x, compat.Literal), isinstance(y, compat.Literal)
  if lx != ly or (lx and not (_shape(x) == _shape(y) and x.aval.dtype == y.aval.dtype
                              and _same_value(x.val, y.val))):
    show = lambda a: _short(a.val) if isinstance(a, compat.Literal) else "a value"
    raise _Differs(f"{where} takes {show(x)} at batch size {n} but {show(y)} at batch "
                   "size 1 (a value built from the batch size)")


def infer(trace_at: Callable[[int], Any], num_params: int, batch: int) -> Decision:
  """Batch independence of f at batch size `batch`, from traces `trace_at(n)`.

  Args:
    trace_at: f traced at batch size n: a `ClosedJaxpr` or a `trace.Program` (a jaxpr
      with its constants) whose invars are the parameter leaves, then the inputs.
    num_params: how many invars are parameter leaves.
    batch: the batch size N f is called with.

  Returns:
    A `Decision`, never an exception: independent only when f is proven per-example
    at max(N, 2) and the program at batch size 1 (the one the per-example path runs)
    is the same program; otherwise the reason says why the whole batch is used.
  """
  n = max(batch, 2)
  traces = {}
  for size in (n, 1):
    try:
      traces[size] = trace_at(size)
    except Exception as e:  # noqa: BLE001 - any failure means "not proven"
      why = (" (what the per-example path runs)" if size == 1 else
             "" if size == batch else " (the analysis needs a batch of at least 2)")
      return Decision(False, f"not proven: f could not be traced at batch size {size}"
                             f"{why}: {type(e).__name__}: {_first_line(e)}")
  try:
    return _decide(traces[n], traces[1], num_params, n)
  except Exception as e:  # noqa: BLE001 - a gap in the analysis is not the user's error
    return Decision(False, f"not proven: the batch analysis failed ({type(e).__name__}: "
                           f"{_first_line(e)})")


def _decide(big, one, num_params: int, n: int) -> Decision:
  _library_rules()
  flags = [i >= num_params for i in range(len(compat.open_jaxpr(big).invars))]
  one = _canonical_trace(one)
  try:
    sizes_big, sizes_one = _align(big, one, n)
  except _Differs as e:
    _TABLES.keys, _TABLES.constants = {}, {}
    outs = _walk(compat.open_jaxpr(big), _inputs(flags),
                 (), None)
    if any(o.mixed is not None for o in outs):
      return _verdict(outs)  # examples meet at N already: the more useful reason
    return Decision(False, f"not proven: f's program at batch size 1 (what the "
                           f"per-example path runs) differs from the one at {n}: {e}")
  decision = _analyse(compat.open_jaxpr(big), flags, sizes_big, big)
  if not decision.independent:
    return decision
  at_one = _analyse(compat.open_jaxpr(one), flags, sizes_one, one)
  if not at_one.independent:
    return Decision(False, f"at batch size 1 (what the per-example path runs): "
                           f"{at_one.reason}")
  return Decision(True, f"{decision.reason}; the same program at batch sizes {n} and 1")


# JAX specialises a gather for a size-1 batch: `jnp.take_along_axis` (Flax's
# flip_sequences, for a reverse RNN with seq_lengths) at batch size 1 reshapes the
# size-1 batch axis out of the indices and gathers that operand axis as a window of
# size 1, where at N it pairs the two axes as batching dims. The two forms compute the
# same array at batch size 1; the trace at 1 is compared and analysed in the batching
# form (`_canonical_trace`), the one the trace at N has.

@dataclasses.dataclass(frozen=True)
class _Trace:
  jaxpr: Any
  consts: list | None


def _canonical_trace(traced):
  """`traced` with every size-1 gather in the batching form; `traced` if none."""
  jaxpr, consts = _parts(traced)
  new = _canonical(jaxpr)
  return traced if new is jaxpr else _Trace(new, consts)


def _canonical_body(body):
  inner = compat.open_jaxpr(body)
  new = _canonical(inner)
  if new is inner:
    return body
  return new if inner is body else body.replace(jaxpr=new)


def _canonical(jaxpr):
  """`jaxpr` (open) with reshape + size-1 window gather pairs as batching gathers."""
  eqns, changed = list(jaxpr.eqns), False
  for i, eqn in enumerate(eqns):
    params = {}
    for key, value in eqn.params.items():
      if _is_jaxpr(value):
        params[key] = _canonical_body(value)
      elif isinstance(value, tuple) and any(map(_is_jaxpr, value)):
        params[key] = tuple(_canonical_body(v) if _is_jaxpr(v) else v for v in value)
    if any(params[k] is not eqn.params[k] if not isinstance(params[k], tuple) else
           any(x is not y for x, y in zip(params[k], eqn.params[k])) for k in params):
      eqns[i] = eqn.replace(params={**eqn.params, **params})
      changed = True
  reads: dict = {}
  for eqn in eqns:
    for a in eqn.invars:
      if not isinstance(a, compat.Literal):
        reads[a] = reads.get(a, 0) + 1
  for v in jaxpr.outvars:
    if not isinstance(v, compat.Literal):
      reads[v] = reads.get(v, 0) + 2
  producer = {v: k for k, eqn in enumerate(eqns) for v in eqn.outvars}
  dropped = set()
  for i, eqn in enumerate(eqns):
    if eqn.primitive is not lax.gather_p or isinstance(eqn.invars[1], compat.Literal):
      continue
    k = producer.get(eqn.invars[1])
    if k is None or eqns[k].primitive is not lax.reshape_p or reads[eqn.invars[1]] != 1:
      continue
    batched = _batching_gather(eqn, eqns[k])
    if batched is not None:
      eqns[i], eqns[k] = batched
      if eqns[k] is None:
        dropped.add(k)
      changed = True
  if not changed:
    return jaxpr
  return jaxpr.replace(eqns=[e for k, e in enumerate(eqns) if k not in dropped])


def _batching_gather(gather, reshape):
  """(gather, reshape) with the size-1 index axis that `reshape` drops paired (as
  batching dims) with the size-1 operand axis gathered as a window of size 1 at the
  same output position; None if the two equations are not of that form.

  `reshape` either only drops that axis (the index vector axis is already there:
  (1, 5, 1) -> (5, 1)), and the gather reads its operand instead (reshape None: not
  needed), or drops it while it appends the index vector axis ((1, 5, 2) -> (5, 2, 1),
  `jnp.take_along_axis` of a 2-D index), and becomes the reshape that only appends it
  ((1, 5, 2) -> (1, 5, 2, 1)). Size-1 axes do not change the row-major order, so the
  index array holds the same entries in either shape."""
  a, b = reshape.invars[0], reshape.outvars[0]
  a_shape, b_shape = _shape(a), _shape(b)
  if reshape.params.get("dimensions") is not None:
    return None
  if len(a_shape) == len(b_shape) + 1:
    i_shape, indices, new_reshape = a_shape, a, None
  elif len(a_shape) == len(b_shape) and b_shape and b_shape[-1] == 1:
    i_shape = a_shape + (1,)
    indices = compat.Var(b.aval.update(shape=i_shape))
    new_reshape = reshape.replace(
        outvars=[indices], params={**reshape.params, "new_sizes": i_shape})
  else:
    return None
  dn, sizes = gather.params["dimension_numbers"], gather.params["slice_sizes"]
  o_shape, out_rank = _shape(gather.invars[0]), len(_shape(gather.outvars[0]))
  window = [d for d in range(len(o_shape))
            if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims]
  for j in range(len(i_shape) - 1):  # the last axis is the index vector
    if i_shape[j] != 1 or i_shape[:j] + i_shape[j + 1:] != b_shape:
      continue
    for p, od in zip(dn.offset_dims, window):
      if o_shape[od] != 1 or sizes[od] != 1 or od in dn.start_index_map:
        continue
      offsets = tuple(q for q in dn.offset_dims if q != p)
      if [q for q in range(out_rank) if q not in offsets][j] != p:
        continue
      pairs = sorted([(x, y + (y >= j)) for x, y in zip(
          dn.operand_batching_dims, dn.start_indices_batching_dims)] + [(od, j)])
      new = dn._replace(offset_dims=offsets,
                        operand_batching_dims=tuple(x for x, _ in pairs),
                        start_indices_batching_dims=tuple(y for _, y in pairs))
      operands = [gather.invars[0], indices] + list(gather.invars[2:])
      return (gather.replace(invars=operands,
                             params={**gather.params, "dimension_numbers": new}),
              new_reshape)
  return None


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else ""

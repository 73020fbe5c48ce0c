"""Follow each parameter leaf to the points where its cotangent is taken.

A parameter leaf flows through the jaxpr as a *view*: an einsum-form linear map
w ↦ v = scale · Σ (Π factors) · w, written with integer labels. Every equation with a
rule for that operand composes its `Structure` into the view (transposes, casts,
broadcasts, scalings, a matmul, a convolution...); the view stops at an edge into an
equation that has no rule, is nonlinear in it, or would add a second per-example factor.
There the engine takes the cotangent ∂f/∂v (a *cut*), and the parameter's NTK term is an
einsum of the two sides' cotangents and factors. Nothing here touches array values: the
plan depends on shapes and dtypes only.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as prims

from ntk_compiler import compat, cost
from ntk_compiler import rules as rules_lib
from ntk_compiler.rules import EqnInfo, RuleResult
from ntk_compiler.structure import Structure

Path = tuple[int, ...]
Edge = tuple  # (path, operand index) into an equation, or ("out", k) into f's outputs


@dataclasses.dataclass(frozen=True, eq=False)
class Factor:
  """A factor array of a view, computed at run time from one equation's operands."""
  id: int
  path: Path
  fn: Callable[..., Any]
  labels: tuple[int, ...]
  batched: bool  # depends on the example (per-example mode: carries the example axis)
  rule: str
  one_hot: int | None = None  # its value: positions of the 1s along this axis of labels


@dataclasses.dataclass(frozen=True, eq=False)
class View:
  """v = scale · einsum(factors, w_base) with labels; w_base = base-transformed leaf."""
  leaf: int
  base: tuple  # (("transpose", perm), ("reshape", shape), ...) taking the leaf to w_base
  base_shape: tuple[int, ...]
  w_labels: tuple[int, ...]
  labels: tuple[int, ...]
  factors: tuple[Factor, ...]
  scale: float
  steps: tuple[str, ...]  # the primitives composed, for explain()
  stack: tuple[int, ...] = ()  # inside scan bodies: the label of each enclosing scan's
                               # steps (its values, cotangents and factors are stacked)

  @property
  def per_example_factors(self) -> int:
    return sum(f.batched for f in self.factors)


@dataclasses.dataclass(frozen=True, eq=False)
class Cut:
  """Where a cotangent is taken: a value, perturbed on the edges listed."""
  id: int
  shape: tuple[int, ...]
  dtype: Any
  edges: frozenset


@dataclasses.dataclass(frozen=True)
class Use:
  """One use of a parameter leaf: its view up to the cut where its cotangent is taken."""
  view: View
  cut: Cut
  reason: str     # why the view stops where it does
  fallback: bool  # stopped by a primitive without a rule (or declined), not by
                  # nonlinearity, a second per-example factor or an output

  @property
  def dense(self) -> bool:
    """A fallback before any structure applied: the Jacobian-contraction cost."""
    return self.fallback and all(not f.labels for f in self.view.factors)


@dataclasses.dataclass
class Plan:
  """What the engine does for one signature: uses of each leaf, cuts, factors."""
  jaxpr: Any
  consts: list
  num_params: int
  leaf_shapes: tuple[tuple[int, ...], ...]
  uses: list[Use]
  cuts: list[Cut]
  factors: dict[Path, list[tuple[Factor, int]]]  # eqn path -> factors computed there
  edge_cuts: dict[Edge, list[int]]                 # edge -> cut ids perturbing it
  inline: set                                      # paths of call equations inlined
  label_sizes: dict[int, int]                      # size of every view label
  scans: dict[Path, tuple[list[int], list[int]]] = dataclasses.field(default_factory=dict)
  # scan eqn path -> (cut ids, factor ids) inside its body: evaluated step by step
  conds: dict[Path, list[tuple[list[int], list[int]]]] = dataclasses.field(
      default_factory=dict)  # cond eqn path -> (cut ids, factor ids) of each branch
  stacked: tuple = ()  # stacking.Stacked: backward convolutions stacked per example

  def uses_of(self, leaf: int) -> list[Use]:
    return [u for u in self.uses if u.view.leaf == leaf]


def plan(jaxpr, consts, num_params: int, x_dependent: bool,
         rules: Mapping[Any, Callable]) -> Plan:
  """Analyses `jaxpr` (invars: the parameter leaves, then the inputs)."""
  builder = _Builder(rules)
  in_views = [[builder.root(i, v.aval.shape)] if i < num_params else []
              for i, v in enumerate(jaxpr.invars)]
  in_dep = [i >= num_params and x_dependent for i in range(len(jaxpr.invars))]
  out_views = builder.walk(jaxpr, in_views, in_dep, [False] * len(jaxpr.constvars), ())
  for k, views in enumerate(out_views):
    for view in views:
      builder.pending.append((((), jaxpr.outvars[k]), view, ("out", k),
                              "at an output of f", False))
  builder.close()

  def inside(path):  # (cut ids, factor ids) within the body at `path`
    under = lambda p: p[:len(path)] == path and len(p) > len(path)
    return ([c.id for c in builder.cuts if any(under(e[0]) for e in c.edges)],
            [f.id for p, fs in builder.factor_sites.items() if under(p) for f, _ in fs])
  scans = {path: inside(path) for path in builder.scans}
  conds = {path: [inside(path + (b,)) for b in range(n)]
           for path, n in builder.conds.items()}
  return Plan(jaxpr, consts, num_params,
              tuple(tuple(v.aval.shape) for v in jaxpr.invars[:num_params]),
              builder.uses, builder.cuts, builder.factor_sites, builder.edge_cuts,
              builder.inline, builder.sizes, scans, conds)


class _Builder:

  def __init__(self, rules):
    self.rules = rules
    self.labels = itertools.count()
    self.ids = itertools.count()
    self.pending = []  # (var key, view, edge, reason)
    self.uses, self.cuts = [], []
    self.factor_sites: dict[Path, list] = {}
    self.edge_cuts: dict[Edge, list[int]] = {}
    self.inline: set = set()
    self.scans: list[Path] = []
    self.conds: dict[Path, int] = {}  # cond eqn path -> number of branches
    self.per_example_depth = 0  # > 0: inside a cond whose index depends on the example
    self.stack_sizes: dict[Path, tuple[int, ...]] = {(): ()}
    self.sizes: dict[int, int] = {}

  def fresh(self) -> int:
    return next(self.labels)

  def _size_labels(self, labels, shape) -> None:
    for l, n in zip(labels, shape):
      self.sizes[l] = int(n)

  def root(self, leaf: int, shape) -> View:
    labels = tuple(self.fresh() for _ in shape)
    self._size_labels(labels, shape)
    return View(leaf, (), tuple(shape), labels, labels, (), 1.0, ())

  def walk(self, jaxpr, in_views, in_dep, const_dep, prefix: Path):
    views: dict = {}
    dep: dict = {}
    for v, vs, d in zip(jaxpr.invars, in_views, in_dep):
      views[v], dep[v] = list(vs), d
    for v, d in zip(jaxpr.constvars, const_dep):
      views[v], dep[v] = [], d

    def read(atom):
      if isinstance(atom, compat.Literal):
        return [], False
      return views.get(atom, []), dep.get(atom, False)

    readers = _readers(jaxpr)
    consumers = {v: len(found) for v, found in readers.items()}
    regions = _Regions(jaxpr, readers, dep)
    for i, eqn in enumerate(jaxpr.eqns):
      path = prefix + (i,)
      op_views, op_dep = zip(*[read(a) for a in eqn.invars]) if eqn.invars else ((), ())
      out_dep = any(op_dep)
      for v in eqn.outvars:
        views[v], dep[v] = regions.deferred.pop(v, []), out_dep
      if not any(op_views):
        continue
      if _carries_derivative(eqn) and any(
          vs and consumers.get(a, 0) > 1 for a, vs in zip(eqn.invars, op_views)):
        # A fan-out: the views of a value read by several equations stop there, as one
        # use per view whose cotangent sums every branch (no uses multiplied per
        # branch, no paths enumerated through diamonds). Roots (the leaves) go on.
        op_views = list(op_views)
        for k, (atom, vs) in enumerate(zip(eqn.invars, op_views)):
          if vs and consumers.get(atom, 0) > 1:
            live = [view for view in vs if view.steps]
            if live:
              live = self._through_region(regions, eqn, k, path, op_dep, views, live)
            for view in live:
              self.pending.append(((prefix, atom), view, (path, k),
                                   f"at a fan-out: read by {consumers[atom]} equations",
                                   False))
            op_views[k] = [view for view in vs if not view.steps]
        if not any(op_views):
          continue
      body = compat.call_body(eqn)
      if body is not None and not _pooled_activation(eqn, readers, dep):
        inner, inner_consts = body
        self.inline.add(path)
        self.stack_sizes[path] = self.stack_sizes[prefix]
        outs = self.walk(inner, list(op_views), list(op_dep),
                         [False] * len(inner.constvars), path)
        for v, vs in zip(eqn.outvars, outs):
          views[v] = vs
        continue
      if eqn.primitive is lax.scan_p and compat.scan_layout(eqn) is not None:
        self._scan(eqn, path, op_views, op_dep, prefix)
        continue
      if eqn.primitive is lax.cond_p and not op_views[0]:
        self._cond(eqn, path, op_views, op_dep, prefix)
        continue
      self._consume(eqn, path, op_views, op_dep, views, prefix, readers, dep)
    return [read(v)[0] for v in jaxpr.outvars]

  def _through_region(self, regions, eqn, k, path, op_dep, views, live):
    """Views of a value that fans out into an elementwise region before a pooling
    head (a composite activation: tanh-GELU, x·sigmoid(x), where(x > 0, x, a·x)): they
    go on to the region's one output through its derivative, a per-example diagonal
    factor computed at `eqn` (the region's equation reading operand `k` first), and
    their cut is taken past the pool. Returns the views that stop here."""
    atom = eqn.invars[k]
    # Views already taken through at an earlier operand of this equation (z * z) are
    # gone from the value's views: they neither go through twice nor stop here.
    live = [view for view in live if any(view is v for v in views[atom])]
    region = regions.of(atom)
    if region is None:
      return live
    exit_var, fn, name = region
    result = _region_linearised(fn, k, exit_var.aval)
    through = []
    for view in live:
      out_view, _ = self._compose(view, result, eqn, k, 0, path, op_dep, second=True,
                                  name=name)
      if out_view is not None:
        through.append(view)
        regions.deferred.setdefault(exit_var, []).append(out_view)
    # Its other readers (inside the region) must not carry these views on.
    views[atom] = [view for view in views[atom] if view not in through]
    return [view for view in live if view not in through]

  def _scan(self, eqn, path, op_views, op_dep, prefix):
    """Follows views into a scan body, where each step's values, factors and
    cotangents are stacked along a step label: a weight used at every step is one
    use with a summed step axis (no unrolling, no T² separate terms). A view of a
    constant gets a fresh step label; one of a scanned-over input steps along its
    leading axis, whose label it already has. Views into the carry are cut before the
    scan; views reaching the body's outputs are cut there, inside, at every step."""
    num_consts, num_carry = compat.scan_layout(eqn)
    length = int(eqn.params["length"])
    inner = compat.open_jaxpr(eqn.params["jaxpr"])
    in_views = []
    for k, (atom, vs) in enumerate(zip(eqn.invars, op_views)):
      if num_consts <= k < num_consts + num_carry:
        for view in vs:
          # A recurrent state: the cotangent at its initial value is all there is.
          self.pending.append(((prefix, atom), view, (path, k),
                               "before scan: enters its carry", False))
        in_views.append([])
      elif k < num_consts:
        step = self.fresh()
        self.sizes[step] = length
        in_views.append([dataclasses.replace(view, stack=view.stack + (step,))
                         for view in vs])
      else:
        in_views.append([dataclasses.replace(view, labels=view.labels[1:],
                                             stack=view.stack + (view.labels[0],))
                         for view in vs])
    carry = list(op_dep[num_consts:num_consts + num_carry])
    while True:  # which carries depend on the example: a fixpoint over the loop
      out = _dependence(inner, list(op_dep[:num_consts]) + carry
                        + list(op_dep[num_consts + num_carry:]))
      new = [c or o for c, o in zip(carry, out[:num_carry])]
      if new == carry:
        break
      carry = new
    in_dep = list(op_dep[:num_consts]) + carry + list(op_dep[num_consts + num_carry:])
    self.scans.append(path)
    self.stack_sizes[path] = self.stack_sizes[prefix] + (length,)
    outs = self.walk(inner, in_views, in_dep, [False] * len(inner.constvars), path)
    for k, vs in enumerate(outs):
      for view in vs:
        self.pending.append(((path, inner.outvars[k]), view, (path + ("out",), k),
                             "at an output of a scan step", False))

  def _cond(self, eqn, path, op_views, op_dep, prefix):
    """Follows views into every branch of a cond / switch (branch b's equations sit
    under path + (b,)); views reaching a branch's outputs are cut there. The branch
    not taken gives zero cotangents, so its terms vanish."""
    branches = eqn.params["branches"]
    self.conds[path] = len(branches)
    for b, branch in enumerate(branches):
      inner = compat.open_jaxpr(branch)
      where = path + (b,)
      self.stack_sizes[where] = self.stack_sizes.get(prefix, ())
      # An example-dependent index makes every value in the branches per-example.
      self.per_example_depth += bool(op_dep[0])
      outs = self.walk(inner, list(op_views[1:]), [d or op_dep[0] for d in op_dep[1:]],
                       [op_dep[0]] * len(inner.constvars), where)
      self.per_example_depth -= bool(op_dep[0])
      for k, vs in enumerate(outs):
        for view in vs:
          self.pending.append(((where, inner.outvars[k]), view, (where + ("out",), k),
                               "at an output of a cond branch", False))

  def _consume(self, eqn, path, op_views, op_dep, views, prefix, readers, dep):
    if eqn.primitive is _STOP_GRADIENT or not any(
        jnp.issubdtype(v.aval.dtype, jnp.inexact) for v in eqn.outvars):
      return  # no derivative flows on (comparisons, integer casts): no contribution
    rule = self.rules.get(eqn.primitive)
    info = EqnInfo(eqn.primitive, eqn.params, tuple(a.aval for a in eqn.invars),
                   tuple(v.aval for v in eqn.outvars))
    for operand, (atom, vs) in enumerate(zip(eqn.invars, op_views)):
      if not vs:
        continue
      results, linear = None, False
      if (rule is None and len(eqn.outvars) == 1
          and _pools(eqn.outvars[0], readers, dep) and _linearisable(eqn, operand)):
        # Before a pooling head (a reduction that shrinks the value): the view goes on
        # through g'(v), a per-example diagonal factor (the chain rule), and its cut
        # is taken past the reduction, where the cotangent is small.
        results, linear = (_linearised(eqn, operand),), True
        stop = (f"before {eqn.primitive} (nonlinear)", False)
      elif rule is None and eqn.primitive in rules_lib.NONLINEAR:  # a user's rule wins
        stop = (f"before {eqn.primitive} (nonlinear)", False)
      elif _elementwise_custom(eqn):
        kind = "elementwise; " if _diagonal_custom(eqn) else ""
        stop = (f"before {eqn.primitive} ({kind}its own derivative rule is used)", False)
      elif rule is None:
        stop = (f"before {eqn.primitive}: no rule for it", True)
      else:
        answer = rule(info, operand)
        results = _per_output(answer, len(eqn.outvars), eqn.primitive)
        stop = ((f"before {eqn.primitive} ({answer.reason.format(operand=operand)})",
                 False) if isinstance(answer, rules_lib.CutBefore) else
                (f"before {eqn.primitive}: its rule declines operand {operand}", True))
        used = [v for v in eqn.outvars if readers.get(v)]
        if results is not None and len(used) > 1:
          # Several outputs read (a split): a fan-out, cut once before it, as for a
          # value read several times.
          results = None
          stop = (f"at a fan-out: {len(used)} outputs of {eqn.primitive} are read", False)
      for view in vs:
        new, why = [], None
        for j, result in enumerate(results or ()):
          out_view, why = self._compose(view, result, eqn, operand, j, path, op_dep,
                                        second=linear)
          if out_view is None:
            break
          new.append(out_view)
        if results is None or len(new) < len(results):
          reason, fallback = stop if why is None else (
              f"before {eqn.primitive}: {why}", False)
          self.pending.append(((prefix, atom), view, (path, operand), reason, fallback))
        else:
          for out, out_view in zip(eqn.outvars, new):
            views[out].append(out_view)

  def _compose(self, view: View, result: RuleResult, eqn, operand, out, path, op_dep,
               second: bool = False, name: str | None = None):
    """The view of output `out` of `eqn`, or (None, why not). `second`: a second
    per-example factor is allowed (a linearised nonlinearity before a pooling head)."""
    y_shape = tuple(eqn.outvars[out].aval.shape)
    name = name or str(eqn.primitive)
    if result.rebase:
      return self._rebase(view, y_shape, name)
    if result.dense:
      return None, "its rule has only a dense block (the cotangent here is cheaper)"
    if result.grows and view.per_example_factors:
      return None, "it places the value into a larger array (the cotangent here is smaller)"
    structure = result.structure
    w_shape = tuple(eqn.invars[operand].aval.shape)
    structure.validate(y_shape, w_shape, f"rule for {eqn.primitive}")
    batched = any(op_dep[j] for j in result.reads) or self.per_example_depth > 0
    if batched and view.per_example_factors > (1 if second else 0):
      return None, "it would add a second per-example factor"
    if (not batched and view.per_example_factors
        and eqn.primitive in _WEIGHT_CONTRACTIONS
        and math.prod(eqn.invars[operand].aval.shape) <= math.prod(y_shape)):
      # A weight's factor after a per-example one would be applied to the per-example
      # terms of every use; the backward pass applies it once, at this cut.
      return None, "a weight's factor after a per-example one (the backward pass applies it)"
    y_labels, f_labels = structure.labels(view.labels, len(y_shape), self.fresh)
    self._size_labels(y_labels, y_shape)
    factor = Factor(next(self.ids), path, result.factor, view.stack + tuple(f_labels),
                    batched, name,
                    None if result.one_hot is None else len(view.stack) + result.one_hot)
    self.factor_sites.setdefault(path, []).append((factor, operand))
    # Labels summed away with nothing left to carry them multiply by their size.
    scale = view.scale
    gone = set(view.labels) - set(y_labels) - set(f_labels)
    kept = set(view.w_labels).union(*(f.labels for f in view.factors))
    for b in structure.w_tiled:
      if view.labels[b] in gone and view.labels[b] not in kept:
        scale *= w_shape[b]
    return dataclasses.replace(
        view, labels=tuple(y_labels), factors=view.factors + (factor,), scale=scale,
        steps=view.steps + (name,)), None

  def _rebase(self, view: View, y_shape, name):
    pure = (sorted(view.labels) == sorted(view.w_labels)
            and all(not f.labels for f in view.factors))
    if not pure:
      return None, "it re-indexes a view that carries factors"
    perm = tuple(view.w_labels.index(l) for l in view.labels)
    labels = tuple(self.fresh() for _ in y_shape)
    self._size_labels(labels, y_shape)
    base = view.base + (("transpose", perm), ("reshape", tuple(y_shape)))
    return dataclasses.replace(view, base=base, base_shape=tuple(y_shape),
                               w_labels=labels, labels=labels,
                               steps=view.steps + (name,)), None

  def close(self):
    """Groups pending cuts: one cut per (value, edge set), shared by its views."""
    per_value: dict = {}
    for (prefix, atom), view, edge, reason, fallback in self.pending:
      _, per_view = per_value.setdefault((prefix, id(atom)), (atom, {}))
      per_view.setdefault(id(view), (view, set(), reason, fallback))[1].add(edge)
    for (prefix, _), (atom, per_view) in per_value.items():
      groups: dict = {}
      for view, edges, reason, fallback in per_view.values():
        groups.setdefault(frozenset(edges), []).append((view, reason, fallback))
      for edges, members in groups.items():
        shape = self.stack_sizes.get(prefix, ()) + tuple(atom.aval.shape)
        cut = Cut(next(self.ids), shape, atom.aval.dtype, edges)
        self.cuts.append(cut)
        for e in edges:
          self.edge_cuts.setdefault(e, []).append(cut.id)
        self.uses += [Use(view, cut, reason, fallback) for view, reason, fallback in members]


# Views stop before a contraction with a weight (a factor that is the same for every
# example) once they carry a per-example factor, where the cotangent is no larger.
_WEIGHT_CONTRACTIONS = (lax.dot_general_p, lax.conv_general_dilated_p)

_CUSTOM = compat.custom_derivative_primitives()
_STOP_GRADIENT = compat.stop_gradient_primitive()


def _per_output(result, num_outputs: int, primitive):
  """A rule's answer as one result per output, or None if it declines."""
  if result is None or isinstance(result, rules_lib.CutBefore):
    return None
  results = tuple(result) if isinstance(result, (tuple, list)) else (result,)
  for r in results:
    if r is not None and not isinstance(r, rules_lib.RuleResult):
      raise TypeError(
          f"the structure rule for {primitive} returned {type(r).__name__} {r!r:.80}; a "
          "rule returns a RuleResult (one per output of a multi-output primitive), "
          "None to decline, or NONLINEAR_OPERAND.")
  if len(results) != num_outputs or any(r is None for r in results):
    return None
  return results


def _carries_derivative(eqn) -> bool:
  """Whether a derivative flows through `eqn` (not a comparison, integer op or
  stop_gradient)."""
  return eqn.primitive is not _STOP_GRADIENT and any(
      jnp.issubdtype(v.aval.dtype, jnp.inexact) for v in eqn.outvars)


def _readers(jaxpr) -> dict:
  """The equations reading each variable where a derivative flows (an output of the
  jaxpr counts as a reader, None)."""
  found: dict = {}
  for eqn in jaxpr.eqns:
    if _carries_derivative(eqn):
      for a in eqn.invars:
        if not isinstance(a, compat.Literal):
          found.setdefault(a, []).append(eqn)
  for v in jaxpr.outvars:
    if not isinstance(v, compat.Literal):
      found.setdefault(v, []).append(None)
  return found


_SMOOTH = frozenset(getattr(lax, f"{n}_p") for n in (
    "tanh", "exp", "log", "log1p", "expm1", "logistic", "sin", "cos", "sqrt", "rsqrt",
    "square", "integer_pow", "max", "min", "abs", "erf", "sinh", "cosh", "atan")
    if hasattr(lax, f"{n}_p"))
# Elementwise and linear in the operand a pooling head's value passes through.
_POOL_PATH = frozenset(getattr(lax, f"{n}_p") for n in (
    "mul", "div", "add", "sub", "neg", "convert_element_type") if hasattr(lax, f"{n}_p"))
_POOL_SHRINK = 8  # the reduction must shrink the value at least this many times
# Reductions, selections and reshapes a pooling head's value may pass through.
_POOL_SHAPES = frozenset(getattr(lax, f"{n}_p") for n in (
    "reduce_sum", "slice", "squeeze", "reshape") if hasattr(lax, f"{n}_p"))


def _linearisable(eqn, operand: int) -> bool:
  """An elementwise nonlinearity whose derivative in `operand` is a diagonal factor."""
  if len(eqn.outvars) != 1 or not (
      eqn.primitive in _SMOOTH or _diagonal_custom(eqn)
      or compat.call_body(eqn) is not None and _pointwise(eqn, eqn.outvars[0].aval.shape)):
    return False
  shape = eqn.outvars[0].aval.shape
  return (eqn.invars[operand].aval.shape == shape
          and jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating)
          and all(getattr(a.aval, "shape", ()) in (shape, ()) for a in eqn.invars))


def _pooled_activation(eqn, readers: dict, dep: dict) -> bool:
  """A call of an elementwise function (jax.nn.silu is one) before a pooling head:
  linearised whole, as one nonlinearity, instead of inlined."""
  return (len(eqn.outvars) == 1 and _pools(eqn.outvars[0], readers, dep)
          and _linearisable(eqn, 0))


def _pools(var, readers: dict, dep: dict, steps: int = 6) -> bool:
  """Whether `var` flows, through at most `steps` equations each its only reader, into
  a value `_POOL_SHRINK` times smaller or more: a global average pool, a mean over
  tokens, a class token's slice, past elementwise linear equations, reshapes and
  shrinking products with a weight (a transformer MLP's down-projection)."""
  size, pooled = math.prod(var.aval.shape), False
  for _ in range(steps):
    found = readers.get(var, [])
    if len(found) != 1 or found[0] is None or len(found[0].outvars) != 1:
      return False
    eqn, out = found[0], found[0].outvars[0]
    # A product with a weight alone is no pool (an MLP's output layer): the value must
    # be summed or sliced on the way.
    pooled = pooled or eqn.primitive in (lax.reduce_sum_p, lax.slice_p)
    smaller = math.prod(out.aval.shape) < math.prod(var.aval.shape)
    weight = (eqn.primitive is lax.dot_general_p and smaller
              and not any(dep.get(a, True) for a in eqn.invars
                          if a is not var and not isinstance(a, compat.Literal)))
    if not (weight or eqn.primitive in _POOL_SHAPES
            or eqn.primitive in _POOL_PATH and out.aval.shape == var.aval.shape):
      return False
    if pooled and math.prod(out.aval.shape) * _POOL_SHRINK <= size:
      return True
    var = out
  return False


def _linearised(eqn, operand: int) -> RuleResult:
  """∂y/∂w of an elementwise y = g(..., w, ...) at the forward values: the diagonal
  factor g'(w), from the equation's VJP with a cotangent of ones (its Jacobian in
  `operand` is diagonal; a VJP also serves custom_vjp activations)."""
  ndim = len(eqn.outvars[0].aval.shape)
  structure = Structure(diagonal=tuple((a, a) for a in range(ndim)))
  dtype = eqn.outvars[0].aval.dtype

  def factor(*ops):
    ops = [jnp.asarray(o) for o in ops]
    def g(w):
      return compat.bind_eqn(eqn, ops[:operand] + [w] + ops[operand + 1:])[0]
    return _diagonal_of(g, ops[operand], dtype)
  return RuleResult(structure, factor, tuple(range(len(eqn.invars))))


def _diagonal_of(g, w, dtype):
  """The diagonal of the (diagonal) Jacobian of g at w: its VJP of ones."""
  y, pull = jax.vjp(g, w)
  return pull(jnp.ones_like(y))[0].astype(dtype)


# Elementwise primitives an activation is composed of (with the smooth ones and the
# linear ones above); comparisons and select_n for piecewise ones.
_ELEMENTWISE = _SMOOTH | _POOL_PATH | frozenset(
    getattr(lax, f"{n}_p") for n in (
        "integer_pow", "pow", "select_n", "erfc", "sign", "exp2", "tan", "cbrt", "gt",
        "lt", "ge", "le", "eq", "ne", "and", "or", "not", "is_finite")
    if hasattr(lax, f"{n}_p")) | {prims.copy_p}
_REGION_MAX = 32  # equations in one elementwise region


def _pointwise(eqn, shape) -> bool:
  """Whether `eqn` maps arrays of `shape` (and scalars) elementwise to one array of
  `shape`: an elementwise primitive, a custom-derivative activation, or a call whose
  body is made of them."""
  if len(eqn.outvars) != 1 or tuple(eqn.outvars[0].aval.shape) != shape:
    return False
  if any(tuple(getattr(a.aval, "shape", ())) not in (shape, ()) for a in eqn.invars):
    return False
  if eqn.primitive in _ELEMENTWISE or _diagonal_custom(eqn):
    return True
  body = compat.call_body(eqn)
  return body is not None and all(_pointwise(e, shape) for e in body[0].eqns)


class _Regions:
  """The elementwise regions values of one jaxpr fan out into (found on demand), and
  the views waiting at their outputs."""

  def __init__(self, jaxpr, readers, dep):
    self.jaxpr, self.readers, self.dep = jaxpr, readers, dep
    self.deferred: dict = {}  # region output var -> views composed through the region
    self.taken: dict = {}  # z -> indices of its region's equations, in order
    self._found: dict = {}
    self._all_readers = None

  def of(self, z):
    """(output var, y = fn(z), name) of the region `z` fans out into, if it has one
    and the output flows into a pooling head; else None."""
    if z not in self._found:
      self._found[z] = self._find(z)
    return self._found[z]

  def _find(self, z):
    if self._all_readers is None:
      self._all_readers = {}
      for i, eqn in enumerate(self.jaxpr.eqns):
        for a in eqn.invars:
          if not isinstance(a, compat.Literal):
            self._all_readers.setdefault(a, []).append(i)
    shape = tuple(z.aval.shape)
    inside, taken, outside = {z}, [], set()
    heap = sorted(set(self._all_readers.get(z, ())))
    seen = set(heap)
    while heap:  # in equation order: an equation's region inputs are known by then
      i = heapq.heappop(heap)
      eqn = self.jaxpr.eqns[i]
      if (len(taken) < _REGION_MAX and _pointwise(eqn, shape) and all(
          isinstance(a, compat.Literal) or a in inside for a in eqn.invars)):
        taken.append(i)
        inside.add(eqn.outvars[0])
        for r in self._all_readers.get(eqn.outvars[0], ()):
          if r not in seen:
            seen.add(r)
            heapq.heappush(heap, r)
      else:
        outside.update(a for a in eqn.invars
                       if not isinstance(a, compat.Literal) and a in inside)
    outside.update(v for v in self.jaxpr.outvars
                   if not isinstance(v, compat.Literal) and v in inside)
    if len(outside) != 1 or z in outside:
      return None
    y = outside.pop()
    if (not jnp.issubdtype(y.aval.dtype, jnp.floating)
        or not _pools(y, self.readers, self.dep)):
      return None
    eqns = [self.jaxpr.eqns[i] for i in taken]
    self.taken[z] = tuple(taken)

    def fn(value):
      env = {z: value}
      for eqn in eqns:
        outs = compat.bind_eqn(eqn, [compat.read_atom(env, a) for a in eqn.invars])
        env.update(zip(eqn.outvars, outs))
      return env[y]
    names = ", ".join(dict.fromkeys(str(e.primitive) for e in eqns))
    return y, fn, f"elementwise region ({names})"


def _region_linearised(fn, operand: int, aval) -> RuleResult:
  """∂y/∂z of an elementwise region y = fn(z) (z: operand `operand` of the equation
  the factor is computed at): the diagonal factor fn'(z), from a JVP with ones."""
  ndim = len(aval.shape)
  structure = Structure(diagonal=tuple((a, a) for a in range(ndim)))

  def factor(*ops):
    return _diagonal_of(fn, jnp.asarray(ops[operand]), aval.dtype)
  return RuleResult(structure, factor, (operand,))


_DIAGONAL: dict = {}  # id(eqn) -> (eqn, whether its own derivative is diagonal)
_DIAGONAL_KEPT = 512


def _diagonal_custom(eqn) -> bool:
  """A custom-derivative call mapping arrays of one shape to one (relu, a user's
  activation) whose derivative, by its own rule, is diagonal: its VJP program, traced
  at the call's shapes, is made of elementwise equations only. Shapes alone do not
  show it: a custom_jvp cumulative sum keeps them."""
  if not _elementwise_custom(eqn):
    return False
  if id(eqn) not in _DIAGONAL:
    if len(_DIAGONAL) >= _DIAGONAL_KEPT:
      _DIAGONAL.clear()
    _DIAGONAL[id(eqn)] = (eqn, _traced_diagonal(eqn))
  return _DIAGONAL[id(eqn)][1]


def _traced_diagonal(eqn) -> bool:
  out = eqn.outvars[0].aval
  ops = [jax.ShapeDtypeStruct(a.aval.shape, a.aval.dtype) for a in eqn.invars]

  def program(ops, ct):
    y, pull = jax.vjp(lambda *o: compat.bind_eqn(eqn, list(o))[0], *ops)
    return y, pull(ct)
  try:
    traced = jax.make_jaxpr(program)(ops, jax.ShapeDtypeStruct(out.shape, out.dtype))
  except Exception:  # noqa: BLE001 (not differentiable this way: keep it opaque)
    return False
  return _diagonal_program(compat.open_jaxpr(traced), tuple(out.shape))


# Besides the elementwise primitives: what a VJP program adds without mixing elements.
_FILLS = frozenset({lax.broadcast_in_dim_p, prims.add_jaxvals_p, _STOP_GRADIENT})


def _diagonal_program(jaxpr, shape) -> bool:
  """Whether every equation of `jaxpr` (and of its bodies) maps arrays of `shape` and
  scalars elementwise, so that its outputs depend on its inputs element by element.
  Equations of constants alone (a zero broadcast to any shape, as a custom rule under
  vmap makes) depend on no input and pass."""
  constant: set = set()
  for eqn in jaxpr.eqns:
    if all(isinstance(a, compat.Literal) or a in constant for a in eqn.invars) and not (
        list(compat.sub_jaxprs(eqn))):
      constant.update(eqn.outvars)
      continue
    if any(tuple(getattr(a.aval, "shape", ())) not in (shape, ())
           for a in list(eqn.invars) + list(eqn.outvars)):
      return False
    if eqn.primitive in _ELEMENTWISE or eqn.primitive in _FILLS:
      continue
    subs = list(compat.sub_jaxprs(eqn))
    if not subs or not all(_diagonal_program(sub, shape) for sub in subs):
      return False
  return True


def _elementwise_custom(eqn) -> bool:
  """A custom-derivative call that maps an array elementwise (relu, gelu, ...): kept
  opaque so that its own derivative rule is used, and no structure is lost by that."""
  if eqn.primitive not in _CUSTOM or len(eqn.outvars) != 1:
    return False
  shape = eqn.outvars[0].aval.shape
  return all(a.aval.shape in (shape, ()) for a in eqn.invars)


def dependence(jaxpr, in_dep: list[bool]) -> dict:
  """Which variables of `jaxpr` depend on the inputs marked (conservatively: an
  equation's outputs depend on all its inputs; constants on none)."""
  dep = {v: d for v, d in zip(jaxpr.invars, in_dep)}
  dep.update((v, False) for v in jaxpr.constvars)
  for eqn in jaxpr.eqns:
    d = any(dep.get(a, False) for a in eqn.invars if not isinstance(a, compat.Literal))
    for v in eqn.outvars:
      dep[v] = d
  return dep


def _dependence(jaxpr, in_dep: list[bool]) -> list[bool]:
  """Which outputs of `jaxpr` depend on the inputs marked (`dependence`)."""
  dep = dependence(jaxpr, in_dep)
  return [False if isinstance(v, compat.Literal) else dep.get(v, False)
          for v in jaxpr.outvars]


class Labels:
  """Einsum labels of one contraction: consecutive ints handed out on first request."""

  def __init__(self, start: int):
    self._ids: dict = {}
    self._next = itertools.count(start)

  def __call__(self, key) -> int:
    if key not in self._ids:
      self._ids[key] = next(self._next)
    return self._ids[key]


@dataclasses.dataclass(frozen=True)
class Operand:
  """One einsum operand of a use: its cotangent ("ct", cut id), a factor ("factor", id),
  or the comparison of two one-hot factors' positions ("mask", `parts`)."""
  kind: str
  id: int
  labels: tuple[int, ...]
  shape: tuple[int, ...]
  one_hot: int | None = None  # a one-hot factor: the axis its positions select along
  parts: tuple = ()

  @property
  def rest(self) -> tuple[int, ...]:
    """The labels of a one-hot factor's positions (all but the one-hot axis)."""
    return tuple(l for i, l in enumerate(self.labels) if i != self.one_hot)


def operands(plan: Plan, use: Use, side_labels: list[int], out_shape, tag: str,
             labels: Labels, per_example: bool) -> list[Operand]:
  """The cotangent and factors of one side of a use, labelled for a pair contraction.

  The w labels are named by axis position, so both sides of a pair share them; every
  other label is private to its side (`tag`). `side_labels` label the output axes,
  whose sizes are `out_shape`.
  """
  view = use.view
  w_pos = {l: i for i, l in enumerate(view.w_labels)}
  name = lambda l: labels(("w", w_pos[l]) if l in w_pos else (tag, l))
  ops = [Operand("ct", use.cut.id,
                 tuple(side_labels) + tuple(name(l) for l in view.stack + view.labels),
                 tuple(out_shape) + use.cut.shape)]
  for f in view.factors:
    batched = per_example and f.batched
    prefix = tuple(side_labels[:1]) if batched else ()
    shape = (tuple(out_shape[:1]) if batched else ()) + tuple(
        plan.label_sizes[l] for l in f.labels)
    hot = None if f.one_hot is None else len(prefix) + f.one_hot
    ops.append(Operand("factor", f.id, prefix + tuple(name(l) for l in f.labels), shape,
                       hot))
  return ops


def match_one_hots(ops: list[Operand], keep) -> list[Operand]:
  """Two one-hot factors along a label that no other operand (nor `keep`) carries sum
  to Σ_l [p1 = l][p2 = l] = [p1 = p2]: they become one "mask" operand comparing their
  positions (the embedding term: ids compared, no vocabulary-sized arrays)."""
  ops = list(ops)
  while True:
    hots = [o for o in ops if o.one_hot is not None]
    pair = next(((a, b) for a, b in itertools.combinations(hots, 2)
                 if a.labels[a.one_hot] == b.labels[b.one_hot]
                 and a.labels[a.one_hot] not in keep
                 and not any(a.labels[a.one_hot] in o.labels
                             for o in ops if o is not a and o is not b)), None)
    if pair is None:
      return ops
    a, b = pair
    sizes = _sizes([a, b])
    union = tuple(dict.fromkeys(a.rest + b.rest))
    mask = Operand("mask", -1, union, tuple(sizes[l] for l in union), parts=(a, b))
    ops = [o for o in ops if o is not a and o is not b] + [mask]


def scattered_one_hot(ops: list[Operand], out) -> Operand | None:
  """A one-hot factor whose axis is an output label carried by no other operand: the
  contraction of the rest is scatter-added along it instead of multiplied."""
  for o in ops:
    if o.one_hot is not None and o.labels[o.one_hot] in out and not any(
        o.labels[o.one_hot] in p.labels for p in ops if p is not o):
      return o
  return None


def scatter_labels(hot: Operand, out) -> list[int]:
  """The labels of what is scatter-added: `out` without the one-hot axis, then the
  labels of the positions that `out` lacks."""
  axis = hot.labels[hot.one_hot]
  return [l for l in out if l != axis] + [l for l in hot.rest if l not in out]


def summed_groups(ops: list[Operand], out) -> list[list[Operand]]:
  """The operands split into groups connected by labels that are summed (not in
  `out`): the einsum is the product of the groups' einsums."""
  keep = set(out)
  groups: list[list] = []
  for o in ops:
    summed = set(o.labels) - keep
    joined = [g for g in groups if any(summed & set(p.labels) for p in g)]
    merged = [o] + [p for g in joined for p in g]
    groups = [g for g in groups if not any(g is j for j in joined)] + [merged]
  return groups


def without_unit_sums(ops: list[Operand], out) -> list[Operand]:
  """`ops` without their summed axes of size 1 (a per-example row): such an axis
  would join groups that are independent."""
  unit = {l for o in ops for l, n in zip(o.labels, o.shape) if n == 1 and l not in out}
  return [dataclasses.replace(
      o, labels=tuple(l for l in o.labels if l not in unit),
      shape=tuple(n for l, n in zip(o.labels, o.shape) if l not in unit)) if set(
          o.labels) & unit else o for o in ops]


def group_key(group: list[Operand], group_out, tags) -> tuple:
  """A key equal for two groups that compute the same array (emit's memo, and the
  estimate that follows it): operands (side tag, kind, id) in a canonical order,
  labels renamed by first appearance. The key spells out the whole einsum, so equal
  keys mean equal arrays whatever the order; the order only decides how often two
  spellings of one einsum are recognised."""
  order = sorted(range(len(group)), key=lambda i: (
      tags[i], group[i].kind, group[i].id, len(group[i].labels)))
  names: dict = {}
  canon = lambda l: names.setdefault(l, len(names))
  operands = tuple((tags[i], group[i].kind, group[i].id,
                    tuple(canon(l) for l in group[i].labels)) for i in order)
  return operands, tuple(canon(l) for l in group_out)


def contraction_flops(ops: list[Operand], out, grouped: bool = False,
                      tags: list | None = None, seen: set | None = None) -> int:
  """FLOPs of contracting `ops` to the labels `out`, one-hot factors matched or
  scattered where they can be. `grouped`: as the pair terms are emitted, each group
  of operands joined by summed labels contracted on its own and the groups multiplied
  (emit._contract with a memo); one einsum of every operand can take a far worse
  order (a width-512 output layer at 2048 examples: 4.3e11 FLOPs against 5e9). With
  `tags` (each operand's side) and `seen` (the keys of groups already counted), a
  group another term computed is free, as emit's memo makes it."""
  ops = match_one_hots(ops, set(out))
  hot = scattered_one_hot(ops, out)
  if hot is None and grouped and all(o.kind != "mask" and o.one_hot is None
                                     for o in ops):
    sizes = _sizes(ops)
    trimmed = without_unit_sums(ops, out)
    groups = summed_groups(trimmed, out)
    tag_of = {id(o): t for o, t in zip(trimmed, tags)} if tags is not None else None
    if len(groups) > 1 or seen is not None:
      total = (len(groups) - 1) * math.prod(sizes[l] for l in out)
      for g in groups:
        g_out = [l for l in out if any(l in o.labels for o in g)]
        if seen is not None and tag_of is not None:
          key = group_key(g, g_out, [tag_of[id(o)] for o in g])
          if key in seen:
            continue
          seen.add(key)
        total += contraction_flops(g, g_out)
      return total
  if hot is None:
    # Labels only one operand carries (and `out` lacks) are summed in it first, as
    # `jnp.einsum` does: a bias's positions before its cotangents meet.
    sizes = _sizes(ops)
    counts: dict = {}
    for o in ops:
      for l in set(o.labels):
        counts[l] = counts.get(l, 0) + 1
    lone = {l for l, c in counts.items() if c == 1 and l not in out}
    first = sum(math.prod(o.shape) for o in ops if set(o.labels) & lone)
    labels = [tuple(l for l in o.labels if l not in lone) for o in ops]
    return first + cost.einsum_flops(labels, list(out), sizes)
  rest = [o for o in ops if o is not hot]
  inner = scatter_labels(hot, out)
  carried = [l for l in inner if any(l in o.labels for o in rest)]
  sizes = _sizes(ops)
  return (cost.einsum_flops([o.labels for o in rest], carried, sizes)
          + math.prod(sizes[l] for l in inner))


def _sizes(ops: list[Operand]) -> dict[int, int]:
  return {l: n for o in ops for l, n in zip(o.labels, o.shape)}


def materialised_flops(plan1: Plan, plan2: Plan, leaf: int, layout, shape1, shape2,
                       per_example: bool, symmetric: bool) -> int:
  """FLOPs of a leaf's term for one output leaf when each example's gradient is
  materialised first (the pairwise term's: `shared_pair_flops`)."""
  s1, s2, _ = layout.indices()
  uses1, uses2 = plan1.uses_of(leaf), plan2.uses_of(leaf)
  w_size = math.prod(plan1.leaf_shapes[leaf])
  # The Gram of the two sides' gradients: a multiply and an add per term, counted as
  # opt_einsum counts the pairwise einsums (two per term summed)
  materialised = 2 * math.prod(layout.kernel_shape(shape1, shape2)) * layout.trace_size(
      shape1) * w_size
  for plan, uses, side, shape in ((plan1, uses1, s1, shape1), (plan2, uses2, s2, shape2)):
    if symmetric and plan is plan2:
      break
    for u in uses:
      labels = Labels(layout.num_indices)
      ops = operands(plan, u, side, shape, "1", labels, per_example)
      w_out = [labels(("w", i)) for i in range(len(u.view.base_shape))]
      out = list(side) + [l for l in w_out if l in _sizes(ops)]
      materialised += contraction_flops(ops, out)
  return materialised


def shared_pair_flops(plan1: Plan, plan2: Plan, leaves, layout, shape1, shape2,
                      per_example: bool, symmetric: bool, seen: set | None = None) -> int:
  """FLOPs of the pairwise terms of `leaves` for one output leaf as emit computes
  them: a group of operands that another term already contracted (a bias and the
  weight of one layer share their cotangents' Gram) is counted once. `seen`: the
  groups already contracted (by other leaves' terms), updated with these."""
  result = layout.indices()[2]
  tag2 = "1" if symmetric else "2"
  seen = set() if seen is None else seen
  return sum(contraction_flops(ops1 + ops2, result, grouped=True,
                               tags=["1"] * len(ops1) + [tag2] * len(ops2), seen=seen)
             for leaf in leaves
             for ops1, ops2 in _pair_operands(plan1, plan2, leaf, layout, shape1, shape2,
                                              per_example, symmetric))


def _pair_operands(plan1: Plan, plan2: Plan, leaf: int, layout, shape1, shape2,
                   per_example: bool, symmetric: bool):
  """Each pair of uses of `leaf` whose term emit contracts (with x2 omitted, each
  unordered pair once): the two uses' operands, labelled for one einsum."""
  s1, s2, _ = layout.indices()
  uses1, uses2 = plan1.uses_of(leaf), plan2.uses_of(leaf)
  for i, u in enumerate(uses1):
    for j, v in enumerate(uses2):
      if symmetric and j < i:
        continue
      labels = Labels(layout.num_indices)
      yield (operands(plan1, u, s1, shape1, "1", labels, per_example),
             operands(plan2, v, s2, shape2, "2", labels, per_example))


def absent_w_size(view: View, ops: list[Operand], labels: Labels) -> int:
  """Product of the sizes of w axes no operand carries: the Jacobians are constant there."""
  used = set(itertools.chain.from_iterable(o.labels for o in ops))
  return math.prod(n for i, n in enumerate(view.base_shape)
                   if labels(("w", i)) not in used)

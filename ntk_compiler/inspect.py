"""`explain()`: what an NTK function does for one signature, in words, numbers and records.

The report covers only the method that computes the kernel. For structured derivatives it
lists every parameter leaf: each use (the primitives whose rules were composed, the user's
source lines, the factors, where the cotangent is taken and why), the contraction chosen
for the leaf and the cost model's estimates. Dense fallbacks are flagged. Jacobian
contraction and NTK-vector products have no per-leaf plan; the report says what they do.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import textwrap
from collections.abc import Mapping
from typing import Any

METHOD_NAMES = ("jacobian", "ntk_vp", "structured")

DESCRIPTIONS = {
    "structured": (
        "structured derivatives: one forward and one backward pass per side give the "
        "cotangent of f at every cut listed below; each parameter leaf's term contracts "
        "the two sides' cotangents with the compact factors of the rules composed on the "
        "way (∂y/∂w is never formed densely), pairwise per pair of examples or by first "
        "materialising the per-example gradient, whichever the cost model finds cheaper."),
    "jacobian": (
        "Jacobian contraction: the Jacobian of f with respect to every parameter leaf, by "
        "reverse mode (one VJP per output entry, vmapped), at x1 and at x2; each leaf's "
        "two Jacobians are then contracted over its entries and the terms summed. Every "
        "leaf is treated alike, so there is no per-leaf plan; memory holds the Jacobians "
        "(outputs × parameters entries per side)."),
    "ntk_vp": (
        "NTK-vector products: for every basis vector v of x2's output space, "
        "Θ·v = J(x1)·(J(x2)ᵀ·v), one VJP at x2 and one JVP at x1 (jax.linearize), "
        "vmapped over the basis; no Jacobian is formed. The parameters are only seen "
        "through f's VJP and JVP, so there is no per-leaf plan."),
}


@dataclasses.dataclass(frozen=True)
class UseReport:
  """One use of a parameter leaf.

  Attributes:
    steps: the primitives whose rules were composed, in order (e.g. transpose,
      dot_general, add).
    factors: (rule, factor shape, per-example) for each factor of the use.
    cut_shape: shape of the value whose cotangent is taken.
    reason: why the view stops there.
    dense: True when this use fell back to a dense Jacobian (no rule applied).
    fallback: True when the view was stopped by a primitive without a rule (or whose
      rule declined), after some structure may already have applied.
    sources: the user's source lines ("file:line (function)") of the steps composed.
    cut_source: the source line of the primitive where the view stops ("" at an output).
  """
  steps: tuple[str, ...]
  factors: tuple[tuple[str, tuple[int, ...], bool], ...]
  cut_shape: tuple[int, ...]
  reason: str
  dense: bool
  fallback: bool = False
  sources: tuple[str, ...] = ()
  cut_source: str = ""


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """One parameter leaf: its uses and how its term is contracted.

  Attributes:
    path: the leaf's path in params, e.g. `"['dense']['w']"`.
    shape: its shape.
    uses: one `UseReport` per use.
    contraction: "pairwise", "materialised" or "unused".
    flops: the estimated FLOPs of its term (0 when unknown).
    costs: any further per-leaf estimates of the cost model, by name.
  """
  path: str
  shape: tuple[int, ...]
  uses: tuple[UseReport, ...]
  contraction: str  # "pairwise", "materialised" or "unused"
  flops: int
  costs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OutputReport:
  """One output leaf of f and the shape of its kernel."""
  where: str
  shape1: tuple[int, ...]
  shape2: tuple[int, ...]
  kernel_shape: tuple[int, ...]
  trace_axes: tuple[int, ...]
  diagonal_axes: tuple[int, ...]
  dtype: str


@dataclasses.dataclass(frozen=True)
class Explanation:
  """What `ntk_fn` does for one signature of its arguments.

  `print()` it for a readable report; `records()` and `to_dict()` give the same as data.

  Attributes:
    method: the method that computes the kernel ("auto" resolved).
    reason: why that method (as requested, or the cost model's choice).
    batch: the batch decision: `.independent` (per-example fast path) and `.reason`.
    estimates: the estimated FLOPs of each method.
    leaves: one `LeafReport` per parameter leaf (structured derivatives only).
    loops: `while` loops rewritten as scans, or kept (and why).
    costs: every per-method estimate of the cost model, {name: {method: value}}
      (FLOPs, and bytes or seconds where the cost model gives them).
    description: what the method does.
    outputs: one `OutputReport` per output leaf of f.
    requested: the method asked for (e.g. "auto").
    function: the name of f.
    rates: the backend's rates behind the estimated times, when the cost model has them.
    parameters: (path, shape) of every parameter leaf.
    scale: the call's FLOPs, peak bytes and tiling under the memory budget (the text
      of `NTKFunction.estimate`), when known.
    sides: where the sides' backward passes are not one plain VJP vmapped over the
      outputs (a convolution before a pooled head transposed with stacked kernels).
  """
  method: str
  reason: str
  batch: Any  # batching.Decision: per-example or not, and why
  estimates: dict
  leaves: tuple[LeafReport, ...]
  loops: tuple[str, ...] = ()  # while loops rewritten as scans, or kept (and why)
  costs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  description: str = ""
  outputs: tuple[OutputReport, ...] = ()
  requested: str = ""
  function: str = ""
  rates: str = ""  # the backend rates the cost model turned FLOPs and bytes into time
  parameters: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (path, shape) per leaf
  scale: str = ""  # the call's memory estimate and tiling (NTKFunction.estimate)
  sides: tuple[str, ...] = ()  # how the sides' backward passes differ from one VJP

  @property
  def batch_independent(self) -> bool:
    return self.batch.independent

  @property
  def fallbacks(self) -> list[tuple[str, str]]:
    """(leaf path, reason) of every use that fell back to a dense Jacobian."""
    return [(leaf.path, use.reason) for leaf in self.leaves for use in leaf.uses
            if use.dense]

  def records(self) -> list[dict]:
    """One flat dict per use of a parameter leaf (for tables and programs).

    Keys: leaf, shape, contraction, leaf_flops, use, steps, factors, cut_shape,
    reason, dense, fallback, sources, cut_source, and the leaf's further cost
    estimates by name. A leaf without uses gives one record with use None.
    """
    rows = []
    for leaf in self.leaves:
      base = {"leaf": leaf.path, "shape": leaf.shape, "contraction": leaf.contraction,
              "leaf_flops": leaf.flops, **dict(leaf.costs)}
      if not leaf.uses:
        rows.append({**base, "use": None})
      for i, use in enumerate(leaf.uses):
        rows.append({**base, "use": i, **dataclasses.asdict(use)})
    return rows

  def to_dict(self) -> dict:
    """The whole report as plain data (JSON-serialisable)."""
    return _plain({
        "function": self.function, "requested": self.requested, "method": self.method,
        "reason": self.reason, "description": self.description,
        "batch_independent": self.batch.independent, "batch_reason": self.batch.reason,
        "estimates": self.estimates, "costs": self.costs,
        "outputs": [dataclasses.asdict(o) for o in self.outputs],
        "rates": self.rates, "parameters": self.parameters, "loops": list(self.loops),
        "fallbacks": self.fallbacks, "sides": list(self.sides),
        "leaves": [dataclasses.asdict(l) for l in self.leaves]})

  def __str__(self) -> str:
    lines = [f"method: {self.method} ({self.reason})"]
    if self.description:
      lines.append(textwrap.fill(self.description, 88, initial_indent="  ",
                                 subsequent_indent="  "))
    lines.append(f"batch_independent: {self.batch.independent} ({self.batch.reason})")
    if self.parameters:
      count = sum(math.prod(shape) for _, shape in self.parameters)
      lines.append(f"parameters: {len(self.parameters)} leaves, {count:,} entries")
    for o in self.outputs:
      lines.append(f"{o.where}: x1 {o.shape1}, x2 {o.shape2} -> kernel "
                   f"{o.kernel_shape} {o.dtype} (trace_axes {o.trace_axes}, "
                   f"diagonal_axes {o.diagonal_axes})")
    lines += _cost_table(self.costs or {"flops": self.estimates}, self.method)
    if self.rates:
      lines.append(f"  (times at {self.rates})")
    if self.scale:
      lines.append(self.scale)
    lines += [f"loop: {note}" for note in self.loops]
    if self.method == "structured":
      lines.append(_fallback_summary(self))
    lines += [f"side: {note}" for note in self.sides]
    total = sum(leaf.flops for leaf in self.leaves)
    for leaf in self.leaves:
      lines += _leaf_lines(leaf, total)
    return "\n".join(lines)


def _fallback_summary(e: Explanation) -> str:
  dense = e.fallbacks
  partial = [u for l in e.leaves for u in l.uses if u.fallback and not u.dense]
  if not dense and not partial:
    return "fallbacks: none (every use of every parameter is structured)"
  return (f"fallbacks: {len(dense)} use(s) take a dense Jacobian [DENSE FALLBACK], "
          f"{len(partial)} stop early at a primitive without a rule [NO RULE] "
          "(register a rule with nc.register_rule to make them structured)")


def _leaf_lines(leaf: LeafReport, total: int) -> list[str]:
  head = f"params{leaf.path} {leaf.shape}: {leaf.contraction}"
  if leaf.flops:
    share = f" ({100 * leaf.flops / total:.0f}% of the leaves' terms)" if total else ""
    head += f", ~{leaf.flops:.3g} FLOPs{share}"
  # Estimates of the alternative contractions ("pairwise_flops", "materialised_flops"):
  # the cost model's choice between them, and what the other would have cost.
  options = {k[:-len("_flops")]: v for k, v in leaf.costs.items()
             if k.endswith("_flops") and k != "flops"}
  if len(options) < 2:  # no alternatives to compare: shown as they are
    options = {}
  others = {k: v for k, v in leaf.costs.items()
            if not (k.endswith("_flops") and k[:-len("_flops")] in options)}
  if options:
    head += "; cost model: " + " vs ".join(
        f"{name} ~{_fmt(value)} FLOPs" for name, value in options.items())
  if others:
    head += "; " + ", ".join(f"{k} {_fmt(v)}" for k, v in others.items())
  lines = [head]
  for use in leaf.uses:
    chain = " -> ".join(use.steps) or "(the parameter itself)"
    factors = ", ".join(f"{r}{list(s)}{' per example' if b else ''}"
                        for r, s, b in use.factors if s) or "none"
    flag = ("  [DENSE FALLBACK]" if use.dense else
            "  [NO RULE]" if use.fallback else "")
    lines.append(f"  use: {chain}; factors: {factors}; cotangent at "
                 f"{list(use.cut_shape)} {use.reason}{flag}")
    if use.sources:
      lines.append(f"    at {', '.join(use.sources)}")
    if use.cut_source:
      lines.append(f"    stops at {use.cut_source}")
  return lines


def _cost_table(costs: Mapping[str, Mapping[str, Any]], chosen: str) -> list[str]:
  """The per-method estimates as a small table, the chosen method starred."""
  costs = {name: values for name, values in costs.items() if values}
  if not costs:
    return []
  methods = [m for m in METHOD_NAMES if any(m in v for v in costs.values())]
  names = list(costs)
  lines = ["estimated cost (from shapes; * = the method used):",
           "    " + f"{'method':<12}" + "".join(f"{n:>14}" for n in names)]
  for m in methods:
    mark = "*" if m == chosen else " "
    lines.append(f"  {mark} {m:<12}" + "".join(
        f"{_fmt(costs[n].get(m, '-')):>14}" for n in names))
  return lines


def _fmt(value) -> str:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return str(value)
  return f"{value:.3g}"


def _plain(value):
  """Tuples to lists, numpy scalars to numbers, other objects to strings: JSON data."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, set, frozenset)):
    return [_plain(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
    return value.item()
  return str(value)


# ----------------------------------------------------------------- building the report

def explain(ntk_fn, plan, params, x1) -> Explanation:
  """The `Explanation` of `plan` (what `ntk_fn` decided for params, x1, x2)."""
  import jax  # deferred: this module is imported by the package without JAX

  estimate = plan.estimate
  per_method, per_leaf = estimate_fields(estimate)
  flops = dict(getattr(estimate, "flops", None) or {})
  leaves, sides = (), ()
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [jax.tree_util.keystr(p) for p, _ in flat]
  if plan.method == "structured" and plan.engine is not None:
    leaves = leaf_reports(plan.engine, paths, getattr(estimate, "kinds", {}) or {},
                          getattr(estimate, "leaf_flops", {}) or {}, per_leaf)
    sides = side_notes(plan.engine)
  notes = tuple(ntk_fn.f.notes(params, x1)) if hasattr(ntk_fn.f, "notes") else ()
  return Explanation(plan.method, plan.reason, plan.batch, flops, leaves, notes,
                     costs=per_method, description=DESCRIPTIONS.get(plan.method, ""),
                     outputs=output_reports(plan), requested=ntk_fn.method,
                     function=getattr(ntk_fn, "name", None) or function_name(ntk_fn.f),
                     rates=rates(getattr(estimate, "machine", None)),
                     parameters=tuple((p, tuple(jax.numpy.shape(w)))
                                      for p, (_, w) in zip(paths, flat)),
                     sides=sides)


def side_notes(engine) -> tuple[str, ...]:
  """One line per stacked convolution of the engine plan (`Stacked.describe`)."""
  outputs = sum(math.prod(v.aval.shape) for v in engine.jaxpr.outvars)
  notes = []
  for stacked in getattr(engine, "stacked", ()):
    where = source_line(engine.jaxpr.eqns[stacked.conv])
    where = f", at {where}" if where else ""
    notes.append(stacked.describe(engine.jaxpr, outputs) + where)
  return tuple(notes)


def rates(machine) -> str:
  """A backend's rates ("cpu: 1.2e+11 FLOP/s, 2e+10 B/s, measured"), "" when unknown."""
  if machine is None:
    return ""
  parts = [str(getattr(machine, "backend", "")) or "backend"]
  values = []
  for name, unit in (("flops_per_s", "FLOP/s"), ("bytes_per_s", "B/s")):
    value = getattr(machine, name, None)
    if isinstance(value, (int, float)):
      values.append(f"{value:.3g} {unit}")
  measured = getattr(machine, "measured", None)
  if measured is not None:
    values.append("measured here" if measured else "default rates")
  return parts[0] + (": " + ", ".join(values) if values else "")


def estimate_fields(estimate) -> tuple[dict, dict]:
  """The cost model's estimates, whatever fields it has: ({name: {method: value}},
  {name: {leaf index: value}}). `kinds` and `leaf_flops` (the contraction and FLOPs of
  each leaf) are reported on their own and left out here."""
  if estimate is None:
    return {}, {}
  if dataclasses.is_dataclass(estimate):
    items = [(f.name, getattr(estimate, f.name)) for f in dataclasses.fields(estimate)]
  else:
    items = list(vars(estimate).items())
  per_method, per_leaf = {}, {}
  for name, value in items:
    if name.startswith("_") or name in ("kinds", "leaf_flops"):
      continue
    if not isinstance(value, Mapping) or not value:
      continue
    keys = list(value)
    if all(k in METHOD_NAMES for k in keys):
      per_method[name] = {m: value[m] for m in METHOD_NAMES if m in value}
    elif all(isinstance(k, int) for k in keys):
      per_leaf[name] = dict(value)
  return per_method, per_leaf


def output_reports(plan) -> tuple[OutputReport, ...]:
  reports = []
  for o in getattr(plan, "outputs", ()) or ():
    layout = o.layout
    reports.append(OutputReport(
        o.where, tuple(o.shape1), tuple(o.shape2),
        tuple(layout.kernel_shape(o.shape1, o.shape2)), tuple(layout.trace),
        tuple(layout.diagonal), str(getattr(o.dtype, "name", o.dtype))))
  return tuple(reports)


def leaf_reports(plan, paths: list[str], contractions: dict[int, str],
                 flops: dict[int, int],
                 per_leaf: Mapping[str, Mapping[int, Any]] | None = None
                 ) -> tuple[LeafReport, ...]:
  """One `LeafReport` per parameter leaf of an analysis plan."""
  per_leaf = per_leaf or {}
  reports = []
  for leaf, (path, shape) in enumerate(zip(paths, plan.leaf_shapes)):
    uses = tuple(_use_report(plan, u) for u in plan.uses_of(leaf))
    costs = {name: values[leaf] for name, values in per_leaf.items() if leaf in values}
    reports.append(LeafReport(path, tuple(shape), uses,
                              contractions.get(leaf, "unused"), flops.get(leaf, 0), costs))
  return tuple(reports)


def _use_report(plan, u) -> UseReport:
  factors = tuple((f.rule + (" one-hot" if f.one_hot is not None else ""),
                   tuple(plan.label_sizes[l] for l in f.labels), f.batched)
                  for f in u.view.factors)
  sources = tuple(dict.fromkeys(
      s for s in (source_line(eqn_at(plan.jaxpr, f.path)) for f in u.view.factors) if s))
  cut = sorted((source_line(eqn_at(plan.jaxpr, edge[0])) for edge in u.cut.edges
                if edge and _is_path(edge[0])), key=lambda s: (not s, s))
  return UseReport(u.view.steps, factors, u.cut.shape, u.reason, u.dense,
                   bool(u.fallback), sources, cut[0] if cut else "")


def _is_path(path) -> bool:
  return isinstance(path, tuple) and bool(path) and isinstance(path[0], int)


def eqn_at(jaxpr, path):
  """The equation at an analysis path (indices into nested jaxprs: call bodies, scan
  bodies, a cond's branch number then the index in it); the innermost equation reached
  when the path goes on past what can be followed; None for a path out of range."""
  from jax import lax

  from ntk_compiler import compat
  eqn, current, k = None, jaxpr, 0
  while k < len(path) and isinstance(path[k], int) and current is not None:
    if path[k] >= len(current.eqns):
      return None
    eqn = current.eqns[path[k]]
    k += 1
    if k == len(path):
      break
    body = compat.call_body(eqn)
    if body is not None:
      current = body[0]
    elif eqn.primitive is lax.cond_p and isinstance(path[k], int):
      current = compat.open_jaxpr(eqn.params["branches"][path[k]])
      k += 1
    else:
      subs = list(compat.sub_jaxprs(eqn))
      current = subs[0] if len(subs) == 1 else None
  return eqn


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SOURCE = re.compile(r"^(?P<file>.*?):(?P<line>\d+)(?::\d+)? \((?P<fn>.*)\)$")


def source_line(eqn) -> str:
  """"file.py:12 (function)": the user's line that emitted `eqn` ("" when unknown)."""
  if eqn is None or getattr(eqn, "source_info", None) is None:
    return ""
  try:
    from jax.extend import source_info_util
    text = source_info_util.summarize(eqn.source_info)
  except Exception:  # an unknown source_info layout: leave the line out
    return ""
  match = _SOURCE.match(text or "")
  if not match or match["file"] == "unknown":
    return ""
  if os.path.abspath(match["file"]).startswith(_PACKAGE):  # the library's own code
    return ""
  return f"{os.path.basename(match['file'])}:{match['line']} ({match['fn']})"


def function_name(f) -> str:
  """A file-name-safe name for f: its __name__ ("lambda" for lambdas), the wrapped
  function's of a functools.partial, the class name of a callable object."""
  while hasattr(f, "func") and not hasattr(f, "__name__"):  # functools.partial
    f = f.func
  name = getattr(f, "__name__", None) or type(f).__name__
  name = re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")
  return name or "f"


def plan_repr(plan) -> str:
  """A short, readable repr of a planner `Plan` (no parameter arrays)."""
  parts = [f"method={plan.method!r}"]
  if plan.reason:
    parts.append(f"reason={plan.reason!r}")
  if plan.batch is not None:
    parts.append(f"batch_independent={plan.batch.independent}")
  kernels = [tuple(o.layout.kernel_shape(o.shape1, o.shape2)) for o in plan.outputs]
  if kernels:
    parts.append(f"kernels={kernels[0] if len(kernels) == 1 else kernels}")
  flops = getattr(plan.estimate, "flops", None)
  if flops:
    parts.append("flops={" + ", ".join(f"{m}: {_fmt(v)}" for m, v in flops.items()) + "}")
  if plan.engine is not None:
    fallbacks = sum(u.dense for u in plan.engine.uses)
    parts.append(f"leaves={plan.engine.num_params}, uses={len(plan.engine.uses)}, "
                 f"dense_fallbacks={fallbacks}")
  return f"Plan({', '.join(parts)})"

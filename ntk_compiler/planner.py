"""The planner: what an NTK function computes for one signature of its arguments.

`plan()` checks the arguments, decides the batch facts, builds the structured-derivatives
plan of each side and chooses the method from the cost model (ntk_compiler/cost.py). The
order is api -> planner -> (analysis, batching, cost).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from ntk_compiler import analysis, batching, compat, cost, emit, inspect, stacking, trace
from ntk_compiler import axes as axes_lib
from ntk_compiler.methods import Problem
from ntk_compiler.methods.common import pushforward
from ntk_compiler.rules import custom_jvp

@dataclasses.dataclass(frozen=True)
class Plan:
  """What an NTK function decided for one input signature.

  Attributes:
    method: the method that computes the kernel ("auto" resolved).
    problem: f, its arguments and the layout of each output leaf's kernel.
    engine: the structured-derivatives plan (uses, cuts, factors), when one was built.
    engine2: the plan at x2's signature when it differs from x1's (per example: past
      the batch axis), so each side runs the program of its own signature.
  """
  method: str
  problem: Problem
  engine: analysis.Plan | None = None
  engine2: analysis.Plan | None = None
  estimate: Estimate | None = None
  reason: str = ""
  batch: batching.Decision | None = None
  outputs: tuple[Output, ...] = ()
  kept: tuple[int, ...] = ()
  out_tree: Any = None

  def __repr__(self) -> str:  # short: no parameter arrays
    return inspect.plan_repr(self)


@dataclasses.dataclass(frozen=True)
class Output:
  """One output leaf of f: its kernel's layout, both sides' shapes and the kernel dtype."""
  layout: axes_lib.Layout
  shape1: tuple[int, ...]
  shape2: tuple[int, ...]
  dtype: Any
  where: str

  @property
  def nonempty(self) -> bool:
    """Whether the kernel has entries; raises if they would be means over nothing."""
    if not _prod(self.layout.kernel_shape(self.shape1, self.shape2)):
      return False
    if not self.layout.trace_size(self.shape1):
      empty = [a for a in self.layout.trace if not self.shape1[a]]
      raise ValueError(
          f"{self.where}: traced axis {empty[0]} has size 0 (output shape {self.shape1}), "
          "so each kernel entry would be a mean over no entries. Leave that axis out of "
          "trace_axes.")
    return True


def kernel_dtype(*dtypes):
  """The kernel's dtype: the outputs' dtype, at least float32 (float16 / bfloat16
  models get a float32 kernel, accumulated in float32; float64 stays float64)."""
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _select_outputs(f, kept: tuple[int, ...]):
  """f returning only the output leaves `kept`, as a list."""
  def selected(params, x):
    leaves = jax.tree_util.tree_leaves(f(params, x))
    return [leaves[i] for i in kept]
  return selected


def plan(ntk_fn, params, x1, x2) -> Plan:
  """Everything `ntk_fn` decides for these arguments' signature.

  Decided once per signature (pytree structures, shapes and dtypes of params, x1 and
  x2): a later call with the same signature (the jitted computation, `explain()`,
  `dump()`, validation, each tile of a tiled call) reuses the batch proof, the engine
  plans and the estimate, with its own arrays in `problem`.
  """
  key = _signature(params, x1, x2)
  cache = ntk_fn.__dict__.setdefault("_plans", {})
  if key in cache:
    cached = cache[key]
    problem = dataclasses.replace(cached.problem, params=params, x1=x1, x2=x2)
    return dataclasses.replace(cached, problem=problem)
  result = _plan(ntk_fn, params, x1, x2)
  if not any(isinstance(c, jax.core.Tracer) for engine in (result.engine, result.engine2)
             if engine is not None for c in engine.consts):
    # Kept without this call's arrays (tracers under jit); a plan holding f's traced
    # constants is not kept at all.
    bare = dataclasses.replace(result.problem, params=None, x1=None, x2=None)
    cache[key] = dataclasses.replace(result, problem=bare)
  return result


def _signature(params, x1, x2):
  def sig(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((jnp.shape(l), str(jnp.result_type(l))) for l in leaves)
  return sig(params), sig(x1), None if x2 is None else sig(x2)


def _plan(ntk_fn, params, x1, x2) -> Plan:
  _check_params(params)
  n1 = _check_inputs(x1, "x1")
  n2 = n1
  if x2 is not None:
    n2 = _check_inputs(x2, "x2")
    if jax.tree_util.tree_structure(x1) != jax.tree_util.tree_structure(x2):
      raise ValueError(
          "x1 and x2 must have the same pytree structure, got "
          f"{jax.tree_util.tree_structure(x1)} and {jax.tree_util.tree_structure(x2)}.")
  out1 = _output_shapes(ntk_fn.f, params, x1, "x1")
  out2 = out1 if x2 is None else _output_shapes(ntk_fn.f, params, x2, "x2")
  leaves1, out_tree = jax.tree_util.tree_flatten(out1)
  leaves2, tree2 = jax.tree_util.tree_flatten(out2)
  if tree2 != out_tree:
    raise ValueError(
        f"f(params, x1) and f(params, x2) return different pytrees: {out_tree} and "
        f"{tree2}.")
  for name, n, leaves, out in (("x1", n1, leaves1, out1), ("x2", n2, leaves2, out2)):
    for path, leaf in zip(paths(out), leaves):
      if leaf.shape[0] != n:
        raise ValueError(
            f"f(params, {name}){path} has shape {leaf.shape}: it does not keep the "
            f"batch of {n} examples on axis 0 (the size of axis 0 of every leaf of "
            f"{name}). Inputs and outputs carry the batch on axis 0: for a single "
            "example x, pass x[None].")
  batch = batch_decision(ntk_fn, params, x1, n1)
  if x2 is not None and batch.independent and not _same_signature(x1, x2):
    # x2's program may differ (other per-example shapes, another batch size): it
    # needs its own proof, and the per-example path is taken only if both sides have one.
    batch2 = batch_decision(ntk_fn, params, x2, n2)
    if not batch2.independent:
      batch = batching.Decision(False, f"x2: {batch2.reason}")
  outputs = []
  for path, l1, l2 in zip(paths(out1), leaves1, leaves2):
    where = f"output leaf {path}" if path else "output"
    layout = axes_lib.Layout.make(ntk_fn.trace_axes, ntk_fn.diagonal_axes, l1.shape)
    layout.check_compatible(l1.shape, l2.shape, where)
    outputs.append(Output(layout, l1.shape, l2.shape, kernel_dtype(l1.dtype, l2.dtype),
                          where))
  # Leaves whose kernel has no entries are not computed (N = 0, a 0-sized axis).
  kept = tuple(i for i, o in enumerate(outputs) if o.nonempty)
  f = ntk_fn.f if len(kept) == len(outputs) else _select_outputs(ntk_fn.f, kept)
  live = [outputs[i] for i in kept]
  problem = Problem(
      f=f, params=params, x1=x1, x2=x2,
      out_tree=out_tree if f is ntk_fn.f else jax.tree_util.tree_structure(list(kept)),
      shapes1=tuple(o.shape1 for o in live), shapes2=tuple(o.shape2 for o in live),
      layouts=tuple(o.layout for o in live), batch_independent=batch.independent)
  differentiable = bool(live and jax.tree_util.tree_leaves(params))
  engine = engine2 = None
  if ntk_fn.method in ("structured", "auto") and differentiable:
    engine = engine_plan(ntk_fn, f, params, x1, batch.independent)
    if x2 is not None and not _same_signature(x1, x2, per_example=batch.independent):
      engine2 = engine_plan(ntk_fn, f, params, x2, batch.independent)
  estimate = _estimate(problem, engine, engine2)
  forward_ok, forward_why = True, ""
  if ntk_fn.method in ("ntk_vp", "auto") and differentiable:
    jaxpr = (engine.jaxpr if engine is not None else
             trace.trace_program(f, params, x1, per_example=False).jaxpr)
    if calls_custom_vjp(jaxpr):
      # No forward mode through custom_vjp: ntk_vp transposes x1's VJP instead, which
      # needs each custom backward pass to transpose.
      problem = dataclasses.replace(problem, transpose_vjp=True)
      forward_why = _untransposable(f, params, x1)
      forward_ok = not forward_why
  if ntk_fn.method == "ntk_vp" and not forward_ok:
    raise NotImplementedError(
        "method='ntk_vp' pushes tangents forward through f at x1; f calls a custom_vjp "
        "function, through which JAX has no forward mode, and transposing its VJP "
        f"failed ({forward_why}). That needs each custom_vjp backward pass to be linear "
        "in its cotangent and built from operations JAX can transpose (not a while "
        "loop, as in diffrax's and Equinox's checkpointed loops). Use "
        "method='structured', 'jacobian' or 'auto'.")
  if ntk_fn.method == "auto":
    candidates = {m: c for m, c in estimate.seconds.items()
                  if forward_ok or m != "ntk_vp"}
    method = min(candidates, key=candidates.get)
    reason = ("auto: the lowest estimated time (FLOPs and memory traffic at this "
              "backend's measured rates)")
    if method != "structured" and candidates.get("structured", math.inf) <= (
        STRUCTURED_MARGIN * candidates[method]):
      method = "structured"
      reason = (f"auto: structured, estimated within {STRUCTURED_MARGIN:g}x of the "
                "lowest estimated time (FLOPs and memory traffic at this backend's "
                "measured rates; the estimates err by more than that, and where they "
                "were level structured ran faster)")
    reason += "" if forward_ok else (" (ntk_vp excluded: f calls a custom_vjp function "
                                     "whose VJP does not transpose)")
  else:
    method, reason = ntk_fn.method, "as requested"
  return Plan(method, problem, engine, engine2, estimate, reason, batch,
              tuple(outputs), kept, out_tree)

# auto keeps the structured method unless another is estimated this many times
# faster. Where the estimates of structured and jacobian were within 6% (a ViT at 64
# examples: 593 and 586 ms estimated, 341 and 441 ms measured; a scan RNN before its
# loop traffic was counted), structured ran 1.3-3.2x faster: the Jacobian method's
# small batched per-example weight gradients run below the matmul rate it is priced at.
STRUCTURED_MARGIN = 1.25


def batch_decision(ntk_fn, params, x, batch: int) -> batching.Decision:
  if ntk_fn.batch_independent is not None:
    return batching.Decision(ntk_fn.batch_independent, "as given by batch_independent")
  def trace_at(n):
    resized = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((n,) + jnp.shape(a)[1:], jnp.result_type(a)), x)
    # The Program keeps the constants, which the analysis compares between sizes.
    return trace.trace_program(ntk_fn.f, params, resized, per_example=False)
  num_params = len(jax.tree_util.tree_leaves(params))
  return batching.infer(trace_at, num_params, batch)


def _traced(layout) -> bool:
  """Whether every output axis but the batch is traced or diagonal: a pairwise term
  with no pairs of output entries, priced at the traced-term rate."""
  return all(a in layout.trace or a in layout.diagonal for a in range(1, layout.ndim))


def engine_plan(ntk_fn, f, params, x, per_example: bool) -> analysis.Plan:
  program = trace.trace_program(f, params, x, per_example)
  jaxpr, consts = custom_jvp.follow_linear_jvps(
      program.jaxpr, program.consts, program.num_params, ntk_fn.rules) or (
          program.jaxpr, program.consts)
  engine = analysis.plan(jaxpr, consts, program.num_params,
                         x_dependent=True, rules=ntk_fn.rules)
  if per_example:
    engine.stacked = stacking.find(engine)
  if ntk_fn.strict:
    _raise_on_fallbacks(engine, params)
  return engine


_CUSTOM_VJP = compat.custom_vjp_primitives()


def calls_custom_vjp(jaxpr) -> bool:
  """Whether `jaxpr` (or a jaxpr inside it) calls a custom_vjp function."""
  return any(eqn.primitive in _CUSTOM_VJP
             or any(calls_custom_vjp(sub) for sub in compat.sub_jaxprs(eqn))
             for eqn in jaxpr.eqns)


def _untransposable(f, params, x) -> str:
  """"" when x's VJP of f transposes (traced abstractly, nothing runs), else why not."""
  def push(p, xs):
    _, forward = pushforward(f, p, xs, transpose_vjp=True)
    return forward(p)
  try:
    jax.eval_shape(push, params, x)
  except Exception as e:  # JAX's own error says which primitive did not transpose
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
  return ""


def _same_signature(a, b, per_example: bool = False) -> bool:
  """Same shapes and dtypes; per example: the same shapes past the batch axis."""
  first = 1 if per_example else 0
  sig = lambda t: [(jnp.shape(l)[first:], jnp.result_type(l))
                   for l in jax.tree_util.tree_leaves(t)]
  return sig(a) == sig(b)


def _raise_on_fallbacks(engine: analysis.Plan, params) -> None:
  names = paths(params)
  for use in engine.uses:
    if use.dense:
      raise NotImplementedError(
          f"strict=True: params{names[use.view.leaf]} has no structured path: its "
          f"cotangent is taken {use.reason}. Register a rule for that primitive "
          "(nc.register_rule) or pass strict=False to use a dense Jacobian there.")


def _estimate(problem: Problem, engine, engine2) -> Estimate:
  """FLOPs, memory traffic and seconds of every available method, from shapes alone.

  The seconds come from the backend's measured rates (`cost.machine()`): matmul
  FLOP/s and elementwise bytes/s. Per method, for one side of n examples whose output
  has `size` entries, P parameters and a forward pass of F FLOPs (F/n per example):
  - jacobian: the forward, one reverse pass per output entry (its activation and its
    parameter cotangents: ~2 F/n), the per-example Jacobians (size x P) written and
    read, and their contraction;
  - ntk_vp: per entry of x2's output, a reverse pass at x2 and a forward-mode pass at
    x1 (~3 F), with a parameter-sized cotangent each;
  - structured: the forward, one reverse pass per output entry that stops at the
    activations (~F/n: no parameter cotangents), the cotangents at the cuts written
    and read, and each leaf's term, pairwise (at the measured rate of pairwise terms)
    or materialised (matrix products, and the per-example gradients' traffic),
    whichever is sooner.
  """
  methods = ("jacobian", "ntk_vp", "structured")
  rates = cost.machine()
  if not problem.layouts:  # no kernel entries to compute
    zero = {m: 0.0 for m in methods}
    return Estimate(dict(zero), frozenset(), {}, {}, dict(zero), dict(zero))

  def forward(x):
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
        (problem.params, x))
    jaxpr = jax.make_jaxpr(problem.f)(*abstract)
    return cost.jaxpr_family_flops(jaxpr), cost.jaxpr_bytes(jaxpr), jaxpr

  def looped_entries(jaxpr) -> int:
    """Parameter entries whose cotangent a reverse pass adds again on each trip of a
    loop after the first (a scan RNN's weights: once per step)."""
    leaves = jax.tree_util.tree_leaves(problem.params)
    trips = cost.loop_reads(jaxpr, len(leaves))
    return sum((t - 1) * _prod(jnp.shape(leaves[i])) for i, t in trips.items())

  n1, n2 = max(problem.shapes1[0][0], 1), max(problem.shapes2[0][0], 1)
  fam1, fb1, jaxpr1 = forward(problem.x1)
  fam2, fb2, _ = (fam1, fb1, None) if problem.symmetric else forward(problem.x2)
  size1 = sum(_prod(s) for s in problem.shapes1)
  size2 = sum(_prod(s) for s in problem.shapes2)
  sides = [(fam1, fb1, n1, size1)] + ([] if problem.symmetric else [(fam2, fb2, n2, size2)])
  sizes = [size for *_, size in sides]
  # One reverse pass per output entry (per example when f is: the rest of the batch is
  # not differentiated), family by family.
  reverse = {"dot": 0.0, "conv": 0.0, "other": 0.0}
  reverse_bytes = 0.0
  for fam, fb, n, size in sides:
    per = n if problem.batch_independent else 1
    for k in reverse:
      reverse[k] += size * fam[k] / per
    reverse_bytes += 2 * size * fb / per
  forward_flops = sum(sum(fam.values()) for fam, *_ in sides)
  num_params = sum(_prod(jnp.shape(w)) for w in jax.tree_util.tree_leaves(problem.params))
  contraction = sum(
      2 * _prod(l.kernel_shape(s1, s2)) * l.trace_size(s1) * num_params
      for l, s1, s2 in zip(problem.layouts, problem.shapes1, problem.shapes2))
  # The activation cotangents of every method's reverse passes; Jacobian contraction
  # also takes the parameter cotangents (about as many FLOPs again; those of
  # convolutions per example, at that rate).
  activations = dict(flops=forward_flops + reverse["dot"] + reverse["other"],
                     conv=reverse["conv"])
  flops = {"jacobian": forward_flops + 2 * sum(reverse.values()) + contraction,
           "ntk_vp": 3 * size2 * (sum(fam1.values()) + sum(fam2.values()) / (
               n2 if problem.batch_independent else 1))}
  # Per-example Jacobians written and read; under a loop, a looped parameter's
  # per-example cotangent is read and written on every trip (a scan RNN of 64 steps,
  # 32 examples, 10 outputs: 84 MB per step; the Jacobian method ran 2.4-3.2x slower
  # than structured where the estimate without this traffic had them level)
  nbytes = {"jacobian": reverse_bytes + 8 * (num_params + looped_entries(jaxpr1)) * sum(
      sizes),
            "ntk_vp": size2 * (2 * fb2 / (n2 if problem.batch_independent else 1)
                               + 2 * fb1 + 8 * num_params)}
  seconds = {
      "jacobian": rates.seconds(activations["flops"] + reverse["dot"] + contraction,
                                nbytes["jacobian"], conv=activations["conv"],
                                conv_grad=reverse["conv"]),
      "ntk_vp": rates.seconds(flops["ntk_vp"], nbytes["ntk_vp"])}
  materialise, kinds, leaf_flops = set(), {}, {}
  pairwise_flops, materialised_flops = {}, {}
  pairwise_seconds, materialised_seconds = {}, {}
  if engine is not None:
    cut_bytes = sum(8 * _prod(c.shape) for c in engine.cuts) * sum(sizes)
    structured_flops = activations["flops"] + activations["conv"]
    structured_bytes = reverse_bytes + cut_bytes
    pair_flops = 0
    outputs = list(zip(problem.layouts, problem.shapes1, problem.shapes2))
    # Groups of operands the pairwise terms chosen so far contract (emit's memo shares
    # them): a leaf's pairwise cost is what its term adds to those.
    seen = [set() for _ in outputs]

    def pairwise_cost(leaf):
      """(FLOPs on untraced outputs, on traced ones), and the groups seen with it."""
      flops, groups = [0, 0], [set(g) for g in seen]
      for (layout, s1, s2), g in zip(outputs, groups):
        flops[_traced(layout)] += analysis.shared_pair_flops(
            engine, engine2 or engine, [leaf], layout, s1, s2, problem.batch_independent,
            problem.symmetric, seen=g)
      return flops, groups

    # A leaf whose uses carry no factor arrays (a bias added to a value) has the same
    # contraction both ways: pairwise, it shares the cotangents' Gram with the other
    # leaves cut at that value. Those go first, then each leaf is priced by what it adds.
    plain = {leaf: all(not f.labels for u in engine.uses_of(leaf) for f in u.view.factors)
             for leaf in range(engine.num_params)}
    # A materialised term writes each example's gradient and reads it in the Gram
    # (8 bytes an entry), and re-lays gradients out for that Gram: XLA's dot takes one
    # operand contraction-major; untraced, the output axes come apart in the product's
    # order and both sides are copied (profiled: a transformer's qkv weight, 2.3 ms
    # where 8 bytes an entry gave 1.4).
    relaid = sum(_prod(s1) if problem.symmetric else
                 _prod(s2) + (0 if _traced(layout) else _prod(s1))
                 for layout, s1, s2 in outputs)
    for leaf in sorted(range(engine.num_params), key=lambda l: not plain[l]):
      if not engine.uses_of(leaf):
        continue
      mat = sum(analysis.materialised_flops(engine, engine2 or engine, leaf, layout, s1,
                                            s2, problem.batch_independent,
                                            problem.symmetric)
                for layout, s1, s2 in outputs)
      (untraced, traced), groups = pairwise_cost(leaf)
      pair = untraced + traced
      mat_bytes = 8 * _prod(engine.leaf_shapes[leaf]) * (sum(sizes) + relaid)
      pairwise_seconds[leaf] = rates.seconds(0, pair=untraced, trace_pair=traced)
      materialised_seconds[leaf] = rates.seconds(mat, mat_bytes)
      chosen_mat = not plain[leaf] and materialised_seconds[leaf] < pairwise_seconds[leaf]
      if chosen_mat:
        materialise.add(leaf)
      else:
        seen = groups
      kinds[leaf] = "materialised" if chosen_mat else "pairwise"
      pairwise_flops[leaf], materialised_flops[leaf] = pair, mat
      leaf_flops[leaf] = mat if chosen_mat else pair
      structured_flops += leaf_flops[leaf]
      structured_bytes += mat_bytes if chosen_mat else 0
      pair_flops += 0 if chosen_mat else pair
    # The pairwise leaves' terms as emitted: groups shared between leaves (a bias and
    # its weight cut at the same value share the cotangents' Gram) counted once.
    pairwise_leaves = [l for l, kind in kinds.items() if kind == "pairwise"]
    # With x2 omitted, the share of example pairs the program contracts (in blocks,
    # the rest mirrored).
    shared = [0.0, 0.0]  # untraced, traced
    for layout, s1, s2 in outputs:
      shared[_traced(layout)] += analysis.shared_pair_flops(
          engine, engine2 or engine, pairwise_leaves, layout, s1, s2,
          problem.batch_independent, problem.symmetric) * (
              emit.symmetric_pair_share(s1[0] if s1 else 0, layout,
                                        problem.batch_independent)
              if problem.symmetric else 1.0)
    structured_flops += sum(shared) - pair_flops
    pair_flops = sum(shared)
    flops["structured"] = structured_flops
    nbytes["structured"] = structured_bytes
    seconds["structured"] = rates.seconds(
        structured_flops - activations["conv"] - pair_flops, structured_bytes,
        conv=activations["conv"], pair=shared[0], trace_pair=shared[1])
  return Estimate(flops, frozenset(materialise), kinds, leaf_flops, nbytes, seconds,
                  pairwise_flops, materialised_flops, pairwise_seconds,
                  materialised_seconds, rates)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """The cost model's view of one signature.

  Attributes:
    flops: estimated FLOPs of each method.
    materialise: the leaves whose structured term is materialised (ct·∂y/∂w per
      example, then contracted) rather than pairwise.
    kinds: per leaf, "pairwise" or "materialised".
    leaf_flops: per leaf, the FLOPs of the term chosen.
    bytes: estimated memory traffic of each method.
    seconds: estimated seconds of each method on this backend (`machine`'s rates).
    pairwise_flops, materialised_flops: per leaf, both alternatives' FLOPs.
    pairwise_seconds, materialised_seconds: per leaf, both alternatives' estimated
      seconds (the pairwise term at the measured rate of pairwise terms; the
      materialised one at the matmul rate, with its per-example gradients' traffic).
    machine: the backend's rates the seconds come from.
  """
  flops: dict[str, float]
  materialise: frozenset
  kinds: dict[int, str]
  leaf_flops: dict[int, int]
  bytes: dict[str, float] = dataclasses.field(default_factory=dict)
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  pairwise_flops: dict[int, int] = dataclasses.field(default_factory=dict)
  materialised_flops: dict[int, int] = dataclasses.field(default_factory=dict)
  pairwise_seconds: dict[int, float] = dataclasses.field(default_factory=dict)
  materialised_seconds: dict[int, float] = dataclasses.field(default_factory=dict)
  machine: Any = None


def _prod(shape) -> int:
  out = 1
  for d in shape:
    out *= d
  return out


def paths(tree) -> list[str]:
  return [jax.tree_util.keystr(p)
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_params(params) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"params{jax.tree_util.keystr(path)} has dtype {dtype}; every parameter leaf "
          "must be a real floating-point array (float16/bfloat16/float32/float64). "
          "Pass integer or constant arrays through x, or close over them in f.")


def _check_inputs(x, name: str) -> int:
  leaves = jax.tree_util.tree_flatten_with_path(x)[0]
  if not leaves:
    raise ValueError(f"{name} has no array leaves; pass the inputs with the batch on "
                     "axis 0.")
  batch = None
  for path, leaf in leaves:
    shape = jnp.shape(leaf)
    where = f"{name}{jax.tree_util.keystr(path)}"
    if not shape:
      raise ValueError(f"{where} is a scalar; every input leaf needs the batch on "
                       "axis 0.")
    if batch is not None and shape[0] != batch:
      raise ValueError(f"{where} has {shape[0]} examples on axis 0 but other leaves of "
                       f"{name} have {batch}; every leaf must hold the same batch.")
    batch = shape[0]
  return batch


def _output_shapes(f, params, x, name: str):
  out = jax.eval_shape(f, params, x)
  if not jax.tree_util.tree_leaves(out):
    raise ValueError(f"f(params, {name}) returned {out!r}, with no array in it; f must "
                     "return an array or a pytree of arrays (did it forget `return`?).")
  for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
    where = f"f(params, {name}){jax.tree_util.keystr(path)}"
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(f"{where} has dtype {leaf.dtype}; the NTK needs real "
                      "floating-point outputs.")
    if not leaf.shape:
      raise ValueError(f"{where} is a scalar; f must keep the batch on axis 0 of "
                       "every output.")
  return out

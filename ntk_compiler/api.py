"""`compile_ntk` and the NTK function object users hold."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntk_compiler import analysis, batching, emit, inspect, loops, trace
from ntk_compiler import axes as axes_lib
from ntk_compiler import compat, cost
from ntk_compiler import rules as rules_lib
from ntk_compiler import validate as validate_lib
from ntk_compiler.methods import Problem, jacobian_ntk, ntk_vp_ntk

METHODS = ("auto", "structured", "jacobian", "ntk_vp")
PRECISIONS = ("highest", "high", "default")

_IMPLEMENTATIONS = {"jacobian": jacobian_ntk, "ntk_vp": ntk_vp_ntk}


def compile_ntk(
    f: Callable[[Any, Any], Any],
    *,
    method: str = "auto",
    trace_axes: int | Sequence[int] = (-1,),
    diagonal_axes: int | Sequence[int] = (),
    batch_independent: bool | None = None,
    rules: Mapping[Any, Any] | None = None,
    strict: bool = False,
    precision: str = "highest",
    validate: bool = False,
) -> NTKFunction:
  """Compiles the empirical Neural Tangent Kernel of `f`.

  Θ(x1, x2) = Σ_w ∂f(params, x1)/∂w · ∂f(params, x2)/∂wᵀ, summed over every parameter
  leaf w, in the output layout of `neural_tangents.empirical_ntk_fn`.

  Args:
    f: the model, `f(params, x)`. `params` is any pytree of floating-point arrays; `x`
      an array or pytree of arrays with the batch on axis 0; the output an array or a
      pytree of arrays (one kernel per output leaf, in the same tree structure).
    method: "auto" (pick the cheapest method from a cost model), "jacobian" (Jacobian
      contraction), "ntk_vp" (NTK-vector products) or "structured" (structured
      derivatives).
    trace_axes: output axes to trace over; each vanishes from the kernel, which is
      divided by the product of their sizes. Negative axes count from the end.
    diagonal_axes: output axes on which only the diagonal (x1 index = x2 index) is
      kept; each appears once in the kernel.
    batch_independent: whether f treats the examples on axis 0 independently, which
      enables the per-example fast path. None (default) decides it from f's jaxpr:
      per example only where that is proven (`explain()` says what was decided and
      why). True and False override the analysis; False is exact for any f, True is
      only correct when f really is per-example.
    rules: structure rules to use on top of the registered ones, keyed by Primitive
      object (a value of None switches a default rule off).
    strict: with the structured method, raise instead of falling back to a dense
      Jacobian where a parameter reaches a primitive that has no rule.
    precision: the precision of every matrix product and convolution in the NTK
      program that does not set its own (the contractions the library adds, and f's
      own where f leaves it to JAX): "highest" (default: float32 stays float32, also
      on GPUs and TPUs, whose default drops it to TF32 / bfloat16 passes), "high"
      (TF32-like, faster on recent GPUs) or "default" (JAX's setting as it is, e.g.
      `jax_default_matmul_precision`). On CPU all three compute the same. The kernel's
      dtype is that of f's output, at least float32: float16 and bfloat16 models get
      a float32 kernel, accumulated in float32; float64 stays float64.
    validate: check each new signature's kernel before returning it, with code it
      shares nothing with: every user rule the plan used (factor against
      `jax.jacfwd`, declared `Structure` on the dense Jacobian; at the real operands
      and at random ones), and Θ·v for a random v against J(x1) J(x2)ᵀ v from one
      VJP and one JVP (no vmap), one such pair per index of the traced and diagonal
      output axes. Tolerance √eps of the output dtype. Costs that once per
      signature; a signature first met under `jax.jit` (tracers) raises TypeError:
      call once outside jit. `NTKFunction.verify` measures the same on demand.

  Returns:
    An `NTKFunction`; call it as `ntk_fn(params, x1)` or `ntk_fn(params, x1, x2)`.
    For f → (N, O) the kernel is (N1, N2) by default and (N1, N2, O, O) with
    `trace_axes=()`.

  Raises:
    ValueError: unknown `method`, or axes named twice or both traced and diagonal.
    TypeError: `f` not callable, or axes / `batch_independent` of the wrong type.
    NotImplementedError: `strict=True` and a parameter use has no structure rule
      (raised when the kernel is first computed).

  Example:
    >>> import jax, jax.numpy as jnp, ntk_compiler as nc
    >>> f = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
    >>> params = {"w": jnp.ones((3, 8)), "v": jnp.ones((8, 2))}
    >>> nc.compile_ntk(f)(params, jnp.ones((5, 3))).shape
    (5, 5)
  """
  if not callable(f):
    raise TypeError(f"f must be a callable f(params, x), got {type(f).__name__}.")
  if not isinstance(method, str) or method not in METHODS:
    raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, METHODS))}.")
  if not isinstance(precision, str) or precision not in PRECISIONS:
    raise ValueError(f"precision={precision!r} is not one of "
                     f"{', '.join(map(repr, PRECISIONS))}.")
  if rules is not None and not isinstance(rules, Mapping):
    raise TypeError(
        f"rules must be a mapping {{Primitive: rule}} (e.g. {{jax.lax.sin_p: my_rule}}), "
        f"got a {type(rules).__name__}.")
  if batch_independent is not None and not isinstance(batch_independent, bool):
    raise TypeError(
        f"batch_independent must be True, False or None, got {batch_independent!r}.")
  trace = axes_lib.normalize_axes(trace_axes, "trace_axes")
  diagonal = axes_lib.normalize_axes(diagonal_axes, "diagonal_axes")
  axes_lib.check_disjoint(trace, diagonal)
  table = rules_lib.registry(rules)
  return NTKFunction(f, method, trace, diagonal, batch_independent, table,
                     bool(strict), precision, validate=bool(validate))


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


class NTKFunction:
  """The compiled NTK of a model: call it as `ntk_fn(params, x1[, x2])`.

  Reusable; it is jit-compiled once per signature (shapes and dtypes) of its arguments,
  and may itself be called under `jax.jit`.
  """

  def __init__(self, f, method: str, trace_axes: tuple[int, ...],
               diagonal_axes: tuple[int, ...], batch_independent: bool | None,
               rules: Mapping[Any, Any], strict: bool, precision: str = "highest",
               validate: bool = False):
    # while loops with a fixed trip count become scans: reverse-differentiable.
    self.f = loops.reverse_differentiable(f)
    self.rules = rules
    self.strict = strict
    self.method = method
    self.trace_axes = trace_axes
    self.diagonal_axes = diagonal_axes
    self.batch_independent = batch_independent
    self.precision = precision
    self.validate = validate
    self._jitted = jax.jit(self._compute)

  def __repr__(self) -> str:
    return (f"NTKFunction(method={self.method!r}, trace_axes={self.trace_axes}, "
            f"diagonal_axes={self.diagonal_axes}, "
            f"batch_independent={self.batch_independent})")

  def __call__(self, params: Any, x1: Any, x2: Any = None) -> Any:
    """Θ(x1, x2), or Θ(x1, x1) when x2 is omitted: one kernel per output leaf."""
    kernel = self._jitted(params, x1, x2)
    if self.validate:  # raises ValidationError: the kernel is not returned
      validate_lib.validate_once(self, params, x1, x2, kernel)
    return kernel

  def verify(self, params: Any, x1: Any, x2: Any = None,
             seed: int = 0) -> validate_lib.Verification:
    """Measures how far the kernel at these arguments is from autodiff.

    Runs the checks of `compile_ntk(..., validate=True)` without raising: each user
    rule the plan uses against `jax.jacfwd` (at the real operands and at random
    ones), and Θ·v for a random v against J(x1) J(x2)ᵀ v from one VJP and one JVP.

    Args:
      params, x1, x2: as for calling the NTK function (concrete arrays, not tracers).
      seed: the seed of the random v and operand values.

    Returns:
      A `Verification`: `relative_error`, `tolerance` (√eps of the output dtype),
      `ok`, `rules` (one `RuleReport` per user rule use) and `message()`.

    Raises:
      TypeError: called with tracers (under jax.jit, vmap or grad).

    Example:
      >>> import jax.numpy as jnp, ntk_compiler as nc
      >>> ntk_fn = nc.compile_ntk(lambda p, x: jnp.tanh(x @ p))
      >>> report = ntk_fn.verify(jnp.ones((3, 2)) / 3, jnp.arange(12.).reshape(4, 3))
      >>> report.ok
      True
    """
    validate_lib.refuse_tracers("NTKFunction.verify", params, x1, x2)
    kernel = self._jitted(params, x1, x2)
    return validate_lib.verify(self, params, x1, x2, kernel, seed)

  def plan(self, params: Any, x1: Any, x2: Any = None) -> Plan:
    """The method chosen and the problem solved for these arguments' signature."""
    return self._plan(params, x1, x2)

  def explain(self, params: Any, x1: Any, x2: Any = None) -> inspect.Explanation:
    """What this NTK function does for these arguments' signature.

    Returns an `Explanation`: the method (and why), the FLOP estimates of each method,
    and for every parameter leaf its uses (the rules composed, the factors, where the
    cotangent is taken and why, dense fallbacks flagged) and how its term is
    contracted. `print()` it for a readable report.
    """
    plan = self._plan(params, x1, x2)
    engine, estimate = plan.engine, plan.estimate
    leaves = () if engine is None else inspect.leaf_reports(
        engine, _paths(params), estimate.kinds, estimate.leaf_flops)
    notes = tuple(self.f.notes(params, x1))
    return inspect.Explanation(plan.method, plan.reason, plan.batch,
                               dict(estimate.flops), leaves, notes)

  def jaxpr(self, params: Any, x1: Any, x2: Any = None):
    """The NTK program built for these arguments, as a jaxpr."""
    return jax.make_jaxpr(self._compute)(params, x1, x2)

  def lower(self, params: Any, x1: Any, x2: Any = None):
    """JAX's `Lowered` for these arguments: `.as_text()`, `.compile()`, cost analysis."""
    return self._jitted.lower(params, x1, x2)

  def _compute(self, params, x1, x2):
    plan = self._plan(params, x1, x2)
    with _precision(self.precision):
      solved = dict(zip(plan.kept, _solve(plan)))
    kernels = [solved[i].astype(o.dtype) if i in solved else
               jnp.zeros(o.layout.kernel_shape(o.shape1, o.shape2), o.dtype)
               for i, o in enumerate(plan.outputs)]
    return plan.out_tree.unflatten(kernels)

  def _plan(self, params, x1, x2) -> Plan:
    _check_params(params)
    n1 = _check_inputs(x1, "x1")
    n2 = n1
    if x2 is not None:
      n2 = _check_inputs(x2, "x2")
      if jax.tree_util.tree_structure(x1) != jax.tree_util.tree_structure(x2):
        raise ValueError(
            "x1 and x2 must have the same pytree structure, got "
            f"{jax.tree_util.tree_structure(x1)} and {jax.tree_util.tree_structure(x2)}.")
    out1 = _output_shapes(self.f, params, x1, "x1")
    out2 = out1 if x2 is None else _output_shapes(self.f, params, x2, "x2")
    leaves1, out_tree = jax.tree_util.tree_flatten(out1)
    leaves2, tree2 = jax.tree_util.tree_flatten(out2)
    if tree2 != out_tree:
      raise ValueError(
          f"f(params, x1) and f(params, x2) return different pytrees: {out_tree} and "
          f"{tree2}.")
    for name, n, leaves, out in (("x1", n1, leaves1, out1), ("x2", n2, leaves2, out2)):
      for path, leaf in zip(_paths(out), leaves):
        if leaf.shape[0] != n:
          raise ValueError(
              f"f(params, {name}){path} has shape {leaf.shape}: it does not keep the "
              f"batch of {n} examples on axis 0 (the size of axis 0 of every leaf of "
              f"{name}). Inputs and outputs carry the batch on axis 0: for a single "
              "example x, pass x[None].")
    batch = self._batch_decision(params, x1, n1)
    if x2 is not None and batch.independent and not _same_signature(x1, x2):
      # x2's program may differ (other per-example shapes, another batch size): it
      # needs its own proof, and the per-example path is taken only if both sides have one.
      batch2 = self._batch_decision(params, x2, n2)
      if not batch2.independent:
        batch = batching.Decision(False, f"x2: {batch2.reason}")
    outputs = []
    for path, l1, l2 in zip(_paths(out1), leaves1, leaves2):
      where = f"output leaf {path}" if path else "output"
      layout = axes_lib.Layout.make(self.trace_axes, self.diagonal_axes, l1.shape)
      layout.check_compatible(l1.shape, l2.shape, where)
      outputs.append(Output(layout, l1.shape, l2.shape, kernel_dtype(l1.dtype, l2.dtype),
                            where))
    # Leaves whose kernel has no entries are not computed (N = 0, a 0-sized axis).
    kept = tuple(i for i, o in enumerate(outputs) if o.nonempty)
    f = self.f if len(kept) == len(outputs) else _select_outputs(self.f, kept)
    live = [outputs[i] for i in kept]
    problem = Problem(
        f=f, params=params, x1=x1, x2=x2,
        out_tree=out_tree if f is self.f else jax.tree_util.tree_structure(list(kept)),
        shapes1=tuple(o.shape1 for o in live), shapes2=tuple(o.shape2 for o in live),
        layouts=tuple(o.layout for o in live), batch_independent=batch.independent)
    differentiable = bool(live and jax.tree_util.tree_leaves(params))
    engine = engine2 = None
    if self.method in ("structured", "auto") and differentiable:
      engine = self._engine_plan(f, params, x1, batch.independent)
      if x2 is not None and not _same_signature(x1, x2, per_example=batch.independent):
        engine2 = self._engine_plan(f, params, x2, batch.independent)
    estimate = _estimate(problem, engine, engine2)
    forward_ok = True
    if self.method in ("ntk_vp", "auto") and differentiable:
      jaxpr = (engine.jaxpr if engine is not None else
               trace.trace_program(f, params, x1, per_example=False).jaxpr)
      forward_ok = not _calls_custom_vjp(jaxpr)
    if self.method == "ntk_vp" and not forward_ok:
      raise NotImplementedError(
          "method='ntk_vp' differentiates f in forward mode (jax.linearize), which JAX "
          "does not support through custom_vjp functions, and f calls one. Use "
          "method='structured', 'jacobian' or 'auto'.")
    if self.method == "auto":
      candidates = {m: c for m, c in estimate.flops.items()
                    if forward_ok or m != "ntk_vp"}
      method = min(candidates, key=candidates.get)
      reason = "auto: the lowest estimated FLOPs" + (
          "" if forward_ok else " (ntk_vp excluded: f calls a custom_vjp function)")
    else:
      method, reason = self.method, "as requested"
    return Plan(method, problem, engine, engine2, estimate, reason, batch,
                tuple(outputs), kept, out_tree)

  def _batch_decision(self, params, x, batch: int) -> batching.Decision:
    if self.batch_independent is not None:
      return batching.Decision(self.batch_independent, "as given by batch_independent")
    def trace_at(n):
      resized = jax.tree_util.tree_map(
          lambda a: jax.ShapeDtypeStruct((n,) + jnp.shape(a)[1:], jnp.result_type(a)), x)
      # The Program keeps the constants, which the analysis compares between sizes.
      return trace.trace_program(self.f, params, resized, per_example=False)
    num_params = len(jax.tree_util.tree_leaves(params))
    return batching.infer(trace_at, num_params, batch)

  def _engine_plan(self, f, params, x, per_example: bool) -> analysis.Plan:
    program = trace.trace_program(f, params, x, per_example)
    engine = analysis.plan(program.jaxpr, program.consts, program.num_params,
                           x_dependent=True, rules=self.rules)
    if self.strict:
      _raise_on_fallbacks(engine, params)
    return engine


_CUSTOM_VJP = compat.custom_vjp_primitives()


def _calls_custom_vjp(jaxpr) -> bool:
  return any(eqn.primitive in _CUSTOM_VJP
             or any(_calls_custom_vjp(sub) for sub in compat.sub_jaxprs(eqn))
             for eqn in jaxpr.eqns)


def _precision(precision: str):
  """The matmul precision of the NTK program ("default": JAX's own setting)."""
  if precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(precision)


def _same_signature(a, b, per_example: bool = False) -> bool:
  """Same shapes and dtypes; per example: the same shapes past the batch axis."""
  first = 1 if per_example else 0
  sig = lambda t: [(jnp.shape(l)[first:], jnp.result_type(l))
                   for l in jax.tree_util.tree_leaves(t)]
  return sig(a) == sig(b)


def _raise_on_fallbacks(engine: analysis.Plan, params) -> None:
  paths = _paths(params)
  for use in engine.uses:
    if use.dense:
      raise NotImplementedError(
          f"strict=True: params{paths[use.view.leaf]} has no structured path: its "
          f"cotangent is taken {use.reason}. Register a rule for that primitive "
          "(nc.register_rule) or pass strict=False to use a dense Jacobian there.")


def _solve(plan: Plan) -> list[jax.Array]:
  problem = plan.problem
  if not problem.layouts:  # every kernel is empty
    return []
  if not jax.tree_util.tree_leaves(problem.params):  # nothing to differentiate
    return [jnp.zeros(l.kernel_shape(s1, s2))
            for l, s1, s2 in zip(problem.layouts, problem.shapes1, problem.shapes2)]
  if plan.method == "structured":
    leaves = jax.tree_util.tree_leaves
    return emit.structured_ntk(
        plan.engine, plan.engine2, leaves(problem.params), leaves(problem.x1),
        None if problem.symmetric else leaves(problem.x2), problem.layouts,
        problem.shapes1, problem.shapes2, problem.batch_independent,
        plan.estimate.materialise)
  method = _IMPLEMENTATIONS[plan.method]
  if problem.batch_independent and all(
      0 in l.trace + l.diagonal for l in problem.layouts):
    return _paired_examples(problem, method)
  return method(problem)


def _paired_examples(problem: Problem, method) -> list[jax.Array]:
  """Axis 0 traced or diagonal on a per-example f: only pairs (x1[n], x2[n]) count."""
  def one(x1n, x2n):
    expand = lambda t: jax.tree_util.tree_map(lambda a: a[None], t)
    sub = dataclasses.replace(
        problem, x1=expand(x1n), x2=None if problem.symmetric else expand(x2n),
        shapes1=tuple((1,) + s[1:] for s in problem.shapes1),
        shapes2=tuple((1,) + s[1:] for s in problem.shapes2))
    return method(sub)

  per_pair = jax.vmap(one)(problem.x1, problem.second)
  return [k[:, 0] if 0 in layout.diagonal else jnp.mean(k, axis=0)
          for k, layout in zip(per_pair, problem.layouts)]


def _estimate(problem: Problem, engine, engine2) -> Estimate:
  """FLOP estimates of every available method, from shapes alone."""
  def flops(x):
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
        (problem.params, x))
    return cost.jaxpr_flops(jax.make_jaxpr(problem.f)(*abstract))

  if not problem.layouts:  # no kernel entries to compute
    return Estimate({m: 0.0 for m in ("jacobian", "ntk_vp", "structured")},
                    frozenset(), {}, {})
  fp1 = flops(problem.x1)
  fp2 = fp1 if problem.symmetric else flops(problem.x2)
  n1, n2 = max(problem.shapes1[0][0], 1), max(problem.shapes2[0][0], 1)
  per1, per2 = (fp1 / n1, fp2 / n2) if problem.batch_independent else (fp1, fp2)
  size1 = sum(_prod(s) for s in problem.shapes1)
  size2 = sum(_prod(s) for s in problem.shapes2)
  num_params = sum(_prod(jnp.shape(w)) for w in jax.tree_util.tree_leaves(problem.params))
  contraction = sum(
      _prod(l.kernel_shape(s1, s2)) * l.trace_size(s1) * num_params
      for l, s1, s2 in zip(problem.layouts, problem.shapes1, problem.shapes2))
  # One reverse pass per output entry costs ~3 forward passes.
  cotangents = 3 * (size1 * per1 + (0 if problem.symmetric else size2 * per2))
  estimates = {"jacobian": cotangents + contraction, "ntk_vp": 3 * size2 * (fp1 + per2)}
  if engine is None:
    return Estimate(estimates, frozenset(), {}, {})
  materialise, kinds, leaf_flops = set(), {}, {}
  structured = cotangents
  for leaf in range(engine.num_params):
    if not engine.uses_of(leaf):
      continue
    pair = mat = 0
    for layout, s1, s2 in zip(problem.layouts, problem.shapes1, problem.shapes2):
      p, m = analysis.leaf_costs(engine, engine2 or engine, leaf, layout, s1, s2,
                                 problem.batch_independent, problem.symmetric)
      pair, mat = pair + p, mat + m
    if mat < pair:
      materialise.add(leaf)
    kinds[leaf] = "materialised" if mat < pair else "pairwise"
    leaf_flops[leaf] = min(pair, mat)
    structured += min(pair, mat)
  estimates["structured"] = structured
  return Estimate(estimates, frozenset(materialise), kinds, leaf_flops)


@dataclasses.dataclass(frozen=True)
class Estimate:
  flops: dict[str, float]
  materialise: frozenset
  kinds: dict[int, str]
  leaf_flops: dict[int, int]


def _prod(shape) -> int:
  out = 1
  for d in shape:
    out *= d
  return out


def _paths(tree) -> list[str]:
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

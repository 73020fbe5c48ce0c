"""`compile_ntk` and the NTK function object users hold."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntk_compiler import dump as dump_lib
from ntk_compiler import emit, inspect, loops, planner, scale
from ntk_compiler import axes as axes_lib
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
    max_memory: int | str | None = None,
    block_size: int | None = None,
    devices: Any = None,
    progress: Any = None,
) -> NTKFunction:
  """Compiles the empirical Neural Tangent Kernel of `f`.

  Θ(x1, x2) = Σ_w ∂f(params, x1)/∂w · ∂f(params, x2)/∂wᵀ, summed over every parameter
  leaf w, in the output layout of `neural_tangents.empirical_ntk_fn`.

  Args:
    f: the model, `f(params, x)`. `params` is any pytree of floating-point arrays; `x`
      an array or pytree of arrays with the batch on axis 0; the output an array or a
      pytree of arrays (one kernel per output leaf, in the same tree structure).
    method: "auto" (the method with the lowest estimated time; `explain()` shows the
      estimates), "jacobian" (Jacobian contraction), "ntk_vp" (NTK-vector products)
      or "structured" (structured derivatives).
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
    max_memory: the memory budget per device, in bytes or as a string ("2GB",
      "512MiB"); None (default): a share of the device's memory (of the host's RAM
      on CPU). A call estimated above it is computed in tiles of examples (for a
      per-example f; docs/scale.md), with x2 omitted only the upper tiles.
    block_size: examples per tile, instead of sizing tiles from `max_memory`.
    devices: the devices tiles shard over: a sequence of devices or a
      `jax.sharding.Mesh` (every call then takes the tiled path); None (default):
      one device for a call that fits the budget, every local device for one that
      needs tiles.
    progress: tiled runs report tiles done: None (a bar on a terminal only), True,
      False, or a callable `progress(done, total, elapsed_seconds)`.

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
  if block_size is not None and (isinstance(block_size, bool) or not isinstance(
      block_size, int) or block_size < 1):
    raise ValueError(f"block_size must be a positive int or None, got {block_size!r}.")
  ntk_fn = NTKFunction(f, method, trace, diagonal, batch_independent, table,
                       bool(strict), precision, validate=bool(validate))
  ntk_fn.max_memory = scale.parse_bytes(max_memory, "max_memory")
  ntk_fn.block_size = block_size
  ntk_fn.devices = scale.check_devices(devices)
  ntk_fn.progress = scale.check_progress(progress)
  return ntk_fn



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
    self.user_f = f  # as given (self.f: with fixed-trip while loops as scans)
    self.name = inspect.function_name(f)  # names the compiled module and dump files
    self.rules = rules
    self.strict = strict
    self.method = method
    self.trace_axes = trace_axes
    self.diagonal_axes = diagonal_axes
    self.batch_independent = batch_independent
    self.precision = precision
    self.validate = validate
    # Scale (docs/scale.md): compile_ntk sets them from its arguments.
    self.max_memory = self.block_size = self.devices = self.progress = None
    self._jitted = jax.jit(_named(self._compute, f"ntk_{self.name}"))

  def __repr__(self) -> str:
    return (f"NTKFunction({self.name}, method={self.method!r}, "
            f"trace_axes={self.trace_axes}, "
            f"diagonal_axes={self.diagonal_axes}, "
            f"batch_independent={self.batch_independent})")

  def __call__(self, params: Any, x1: Any, x2: Any = None, out: Any = None) -> Any:
    """Θ(x1, x2), or Θ(x1, x1) when x2 is omitted: one kernel per output leaf.

    A call that fits `max_memory` on one device runs there in one piece and returns
    JAX arrays (also with several devices, unless `devices=` is given). A call
    estimated above it, or with `block_size=`, `devices=` or `out=`, runs in tiles
    (sharded over the devices) and returns NumPy arrays on the host; `out=` (a
    writable NumPy array, e.g. `np.lib.format.open_memmap`, or a pytree of them like
    the kernels) receives the kernel tile by tile and is returned. On a Mesh spanning
    several processes, without `out=` every process returns the whole kernel.
    docs/scale.md.
    """
    kernel = scale.call(self, params, x1, x2, out)
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
      params: as for calling the NTK function (concrete arrays, not tracers).
      x1: as for calling the NTK function.
      x2: as for calling the NTK function (None: x1).
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

  def estimate(self, params: Any, x1: Any, x2: Any = None) -> scale.ScaleEstimate:
    """FLOPs and peak bytes of a call, per tile and in total, the tiling it would
    use and whether each block's side is kept for the tiles or recomputed (and why),
    from shapes alone (nothing runs). `print()` it for a one-line summary."""
    return scale.estimate(self, params, x1, x2)

  def matvec(self, params: Any, x1: Any, x2: Any, v: Any) -> Any:
    """Θ(x1, x2)·v without building the kernel (x2 None: Θ(x1, x1)·v).

    v is shaped like f(params, x2) without the traced axes (one array per output
    leaf); the result like f(params, x1) without them: the kernel's x2 axes are
    contracted with v, its diagonal axes kept elementwise. One VJP over x2 and one JVP
    at x1 per index of the traced and diagonal axes, in blocks of examples under
    `max_memory` for a per-example f. docs/scale.md.
    """
    return scale.matvec(self, params, x1, x2, v)

  def plan(self, params: Any, x1: Any, x2: Any = None) -> planner.Plan:
    """The method chosen and the problem solved for these arguments' signature."""
    return planner.plan(self, params, x1, x2)

  def explain(self, params: Any, x1: Any, x2: Any = None) -> inspect.Explanation:
    """What this NTK function does for these arguments' signature.

    Returns an `Explanation` of the method that computes the kernel: which one and
    why, the cost model's estimates for every method (FLOPs, bytes, time), the batch
    decision, each output's kernel shape; for structured derivatives, every parameter
    leaf's uses (the rules composed, the lines of f that made them, the factors, where
    the cotangent is taken and why, dense fallbacks flagged) and how its term is
    contracted. `print()` it for a readable report; `.leaves`, `.records()` and
    `.to_dict()` give the same as data.

    Example:
      >>> import jax.numpy as jnp, ntk_compiler as nc
      >>> ntk_fn = nc.compile_ntk(lambda p, x: jnp.tanh(x @ p), method="structured")
      >>> explanation = ntk_fn.explain(jnp.ones((3, 2)), jnp.ones((4, 3)))
      >>> explanation.method, [leaf.path for leaf in explanation.leaves]
      ('structured', [''])
      >>> explanation.leaves[0].uses[0].steps
      ('dot_general',)
    """
    explanation = inspect.explain(self, planner.plan(self, params, x1, x2), params, x1)
    if any(isinstance(a, jax.core.Tracer)
           for a in jax.tree_util.tree_leaves((params, x1, x2))):
      return explanation
    return dataclasses.replace(explanation, scale=str(self.estimate(params, x1, x2)))

  def dump(self, directory: Any, params: Any, x1: Any,
           x2: Any = None) -> dict[str, Any]:
    """Writes what is built for these arguments into `directory`, as text files named
    after f (for `def mlp`: mlp.jaxpr.txt, mlp.ntk.jaxpr.txt, mlp.stablehlo.mlir,
    mlp.hlo.txt, mlp.cost.txt, mlp.explain.txt, mlp.explain.json): f's jaxpr, the
    NTK program as a jaxpr, as StableHLO and as XLA's optimised HLO, XLA's cost
    analysis and the `explain()` report. The compiled module is `jit_ntk_<f>` (also
    in `XLA_FLAGS=--xla_dump_to=...` dumps). docs/dumps.md tells how to read them.

    Returns:
      {kind: pathlib.Path} for the kinds in `ntk_compiler.dump.KINDS`.
    """
    return dump_lib.dump(self, directory, params, x1, x2)

  def jaxpr(self, params: Any, x1: Any, x2: Any = None):
    """The NTK program built for these arguments, as a jaxpr."""
    return jax.make_jaxpr(self._compute)(params, x1, x2)

  def lower(self, params: Any, x1: Any, x2: Any = None):
    """JAX's `Lowered` for these arguments: `.as_text()`, `.compile()`, cost analysis."""
    return self._jitted.lower(params, x1, x2)

  def _compute(self, params, x1, x2):
    plan = planner.plan(self, params, x1, x2)
    with _precision(self.precision):
      solved = dict(zip(plan.kept, _solve(plan)))
    kernels = [solved[i].astype(o.dtype) if i in solved else
               jnp.zeros(o.layout.kernel_shape(o.shape1, o.shape2), o.dtype)
               for i, o in enumerate(plan.outputs)]
    return plan.out_tree.unflatten(kernels)


def _named(fn, name: str):
  """`fn` under another __name__: jax.jit names the compiled module after it."""
  def named(*args):
    return fn(*args)
  named.__name__ = named.__qualname__ = name
  return named


def _precision(precision: str):
  """The matmul precision of the NTK program ("default": JAX's own setting)."""
  if precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(precision)


def _solve(plan: planner.Plan) -> list[jax.Array]:
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



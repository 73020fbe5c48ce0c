"""Command line: `python -m ntk_compiler` (or `ntk-compiler`) demo / explain / bench / dump.

JAX is imported inside the commands, so `--help` and `--version` answer at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time

MODEL_HELP = """\
MODEL is FILE.py:FUNCTION (FUNCTION defaults to `make`): FUNCTION() takes no arguments
and returns (f, params, x1) or (f, params, x1, x2), with f(params, x) the model, params a
pytree of float arrays and x1, x2 the inputs with the batch on axis 0."""

DESCRIPTION = """\
Finite-width Neural Tangent Kernels of JAX functions:
Θ(x1, x2) = Σ_w ∂f(params, x1)/∂w · ∂f(params, x2)/∂wᵀ.
`python -m ntk_compiler COMMAND --help` gives a command's options.

""" + MODEL_HELP

METHOD_CHOICES = ("auto", "structured", "jacobian", "ntk_vp")


def mlp(key, width=256, depth=3, inputs=32, outputs=10, n=16):
  """A relu MLP (f, params, x) with `n` random inputs: the demo's and benchmarks' model."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  sizes = [inputs] + [width] * depth + [outputs]
  keys = jax.random.split(key, len(sizes))
  params = [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

  def f(params, x):
    for layer in params[:-1]:
      x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]
  return f, params, jax.random.normal(keys[-1], (n, inputs))


# ------------------------------------------------------------------------ the commands

def demo(args) -> int:
  import jax
  import numpy as np

  f, params, x = mlp(jax.random.PRNGKey(args.seed), width=args.width, n=args.examples)
  sizes = [x.shape[1]] + [layer["w"].shape[1] for layer in params]
  count = sum(int(np.prod(w.shape)) for w in jax.tree_util.tree_leaves(params))
  n = x.shape[0]
  print(f"The empirical NTK of a relu MLP {' -> '.join(map(str, sizes))} "
        f"({count:,} parameters) on {n} random inputs;")
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform}, "
        f"{np.dtype(x.dtype).name}.")
  print("Θ(x, x') = Σ_w ∂f(x)/∂w · ∂f(x')/∂wᵀ, here with trace_axes=() (both output")
  print(f"axes kept): shape ({n}, {n}, {sizes[-1]}, {sizes[-1]}) = (example of x1, example "
        "of x2, output i, output j).")
  print()
  results = _run_methods(f, params, x, None, ("jacobian", "ntk_vp", "structured", "auto"),
                         dict(trace_axes=(), batch_independent=True), args.repeats)
  _print_table(results)
  reference = results[0]["kernel"]
  print()
  print("Θ(x_0, x_1): the block of the kernel between examples 0 and 1; entry [i, j] is")
  print("Σ_w ∂f_i(x_0)/∂w · ∂f_j(x_1)/∂w, how much a gradient step on output j at x_1")
  print("moves output i at x_0:")
  print(np.array2string(np.asarray(reference[0, 1]), precision=3, suppress_small=True,
                        max_line_width=100))
  traced = np.trace(np.asarray(reference), axis1=2, axis2=3) / sizes[-1]
  k = min(n, 4)
  print()
  print(f"With the default trace_axes=(-1,) the outputs are averaged: the ({n}, {n}) kernel "
        f"of the examples; its top-left {k}×{k}:")
  print(np.array2string(traced[:k, :k], precision=3, suppress_small=True))
  return 0


def explain(args) -> int:
  ntk_fn, params, x1, x2 = _model(args)
  explanation = ntk_fn.explain(params, x1, x2)
  if args.json:
    print(json.dumps(explanation.to_dict(), indent=1))
  else:
    print(explanation)
  return 0


def bench(args) -> int:
  import jax

  from ntk_compiler.api import compile_ntk

  f, params, x1, x2 = _load(args.model, args.x64)
  options = _options(args)
  methods = tuple(dict.fromkeys(args.methods.split(","))) if args.methods else (
      "jacobian", "ntk_vp", "structured", "auto")
  for m in methods:
    if m not in METHOD_CHOICES:
      raise SystemExit(f"--methods: {m!r} is not one of {', '.join(METHOD_CHOICES)}.")
  plan = compile_ntk(f, method="auto", **options).plan(params, x1, x2)
  flops = dict(getattr(plan.estimate, "flops", {}) or {})
  print(f"{_describe(f, params, x1, x2)}; JAX {jax.__version__} on "
        f"{jax.devices()[0].platform}.")
  print()
  results = _run_methods(f, params, x1, x2, methods, options, args.repeats, flops)
  _print_table(results, flops)
  return 0 if all("error" in r or r["diff"] is None or r["diff"] < 1e-3 for r in results) \
      else 1


def dump(args) -> int:
  ntk_fn, params, x1, x2 = _model(args)
  paths = ntk_fn.dump(args.directory, params, x1, x2)
  print(f"wrote {len(paths)} files for {ntk_fn.name} (the compiled module is "
        f"jit_ntk_{ntk_fn.name}):")
  for kind, path in paths.items():
    print(f"  {path}  ({kind})")
  print("docs/dumps.md tells how to read them.")
  return 0


# ----------------------------------------------------------------------- shared pieces

def _run_methods(f, params, x1, x2, methods, options, repeats, flops=None) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from ntk_compiler.api import compile_ntk
  results, reference = [], None
  for method in methods:
    row = {"method": method}
    try:
      ntk_fn = compile_ntk(f, method=method, **options)
      row["chose"] = ntk_fn.plan(params, x1, x2).method
      kernel, row["first"], row["run"] = _time(ntk_fn, repeats, params, x1, x2)
    except (NotImplementedError, ValueError, TypeError) as e:
      row["error"] = f"{type(e).__name__}: {e}"
      results.append(row)
      continue
    row["kernel"] = kernel
    leaves = jax.tree_util.tree_leaves(kernel)
    if reference is None:
      reference, row["diff"] = leaves, None
    else:
      row["diff"] = max(
          (float(jnp.max(jnp.abs(a - b)) / max(float(jnp.max(jnp.abs(b))), 1e-300))
           for a, b in zip(leaves, reference) if b.size), default=0.0)
    results.append(row)
  results[0]["reference"] = True
  return results


def _time(fn, repeats, *args):
  import jax
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  runs = []
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append(time.perf_counter() - start)
  return out, first, min(runs)


def _print_table(results, flops=None) -> None:
  reference = results[0]
  base = reference.get("run")
  head = (f"{'method':<11} {'ran':<11} {'first call':>11} {'run':>11} {'speed-up':>9}  "
          f"{'max rel. diff':<13}")
  if flops:
    head += f" {'est. FLOPs':>11}"
  print(head)
  for r in results:
    if "error" in r:
      print(f"{r['method']:<11} not available: {r['error']}")
      continue
    diff = "(reference)" if r["diff"] is None else f"{r['diff']:.1e}"
    speed = f"{base / r['run']:.1f}x" if base and r["run"] else "-"
    line = (f"{r['method']:<11} {r['chose']:<11} {r['first'] * 1e3:>8.1f} ms "
            f"{r['run'] * 1e3:>8.2f} ms {speed:>9}  {diff:<13}")
    if flops:
      value = flops.get(r["chose"])
      line += f" {value:>11.3g}" if value is not None else f" {'-':>11}"
    print(line.rstrip())
  name = reference["method"]
  print()
  print("ran: the method that computed the kernel (auto picks one from its cost model);")
  print("first call: tracing, planning, XLA compilation and one run; run: the best of the")
  print(f"later calls; speed-up: {name}'s run time over this one's; max rel. diff:")
  print(f"max |Θ - Θ_{name}| / max |Θ_{name}| (rounding: ~1e-6 in float32).")
  if flops:
    print("est. FLOPs: the cost model's estimate for the method that ran (explain() has the "
          "details).")


def _describe(f, params, x1, x2) -> str:
  import jax
  import numpy as np
  count = sum(int(np.prod(np.shape(w))) for w in jax.tree_util.tree_leaves(params))
  shape = lambda x: [tuple(np.shape(a)) for a in jax.tree_util.tree_leaves(x)]
  text = (f"model {getattr(f, '__name__', type(f).__name__)}: {count:,} parameters, "
          f"x1 {_one(shape(x1))}")
  return text + ("" if x2 is None else f", x2 {_one(shape(x2))}")


def _one(shapes):
  return shapes[0] if len(shapes) == 1 else shapes


def _model(args):
  from ntk_compiler.api import compile_ntk
  f, params, x1, x2 = _load(args.model, args.x64)
  return compile_ntk(f, method=args.method, **_options(args)), params, x1, x2


def _options(args) -> dict:
  independent = {"auto": None, "yes": True, "no": False}[args.batch_independent]
  return dict(trace_axes=args.trace_axes, diagonal_axes=args.diagonal_axes,
              batch_independent=independent, precision=args.precision)


def _load(target: str, x64: bool = False):
  """(f, params, x1, x2) from FILE.py:FUNCTION."""
  path, function = _split_target(target)
  if x64:
    import jax
    jax.config.update("jax_enable_x64", True)
  file = pathlib.Path(path)
  if not file.is_file():
    raise SystemExit(f"MODEL {target!r}: no file {path!r}. Give FILE.py:FUNCTION, e.g. "
                     "examples/models.py:make.")
  name = f"_ntk_model_{file.stem}"
  spec = importlib.util.spec_from_file_location(name, file)
  if spec is None or spec.loader is None:
    raise SystemExit(f"MODEL {target!r}: cannot load {path!r} as a Python module.")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  sys.path.insert(0, str(file.resolve().parent))  # its sibling modules import
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(file.resolve().parent))
  make = getattr(module, function, None)
  if not callable(make):
    defined = sorted(k for k, v in vars(module).items()
                     if callable(v) and not k.startswith("_")
                     and getattr(v, "__module__", None) == name)
    raise SystemExit(f"MODEL {target!r}: {path} defines no function {function!r}"
                     + (f" (its functions: {', '.join(defined)})" if defined else "")
                     + ".")
  made = make()
  if not isinstance(made, (tuple, list)) or len(made) not in (3, 4):
    raise SystemExit(f"MODEL {target!r}: {function}() must return (f, params, x1) or "
                     f"(f, params, x1, x2), got {type(made).__name__}"
                     + (f" of length {len(made)}" if isinstance(made, (tuple, list))
                        else "") + ".")
  f, params, x1, *rest = made
  if not callable(f):
    raise SystemExit(f"MODEL {target!r}: the first value {function}() returns must be "
                     f"the model f(params, x), got {type(f).__name__}.")
  return f, params, x1, (rest[0] if rest else None)


def _split_target(target: str) -> tuple[str, str]:
  path, sep, function = target.rpartition(":")
  if sep and function.isidentifier() and path:
    return path, function
  return target, "make"


def _axes(text: str) -> tuple[int, ...]:
  """'-1' -> (-1,); '0,2' -> (0, 2); '' or 'none' -> ()."""
  text = text.strip()
  if text.lower() in ("", "none", "()"):
    return ()
  try:
    return tuple(int(a) for a in text.strip("()").split(",") if a.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a comma-separated list of axes (e.g. -1 or 0,2; '' for none)")


# ------------------------------------------------------------------------- the parser

def _version() -> str:
  from ntk_compiler import __version__
  return __version__


def parser() -> argparse.ArgumentParser:
  prog = "ntk-compiler" if pathlib.Path(sys.argv[0]).name == "ntk-compiler" else \
      "python -m ntk_compiler"
  top = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
  top.add_argument("--version", action="version", version=f"ntk_compiler {_version()}")
  sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser("demo", help="the NTK of a small built-in MLP with every method",
                     description="The NTK of a built-in relu MLP by every method: the "
                     "times, the agreement between methods and what the numbers are.")
  p.add_argument("--seed", type=int, default=0, help="the random seed (default 0)")
  p.add_argument("--width", type=int, default=256, help="hidden width (default 256)")
  p.add_argument("--examples", type=int, default=16,
                 help="number of random inputs (default 16)")
  p.add_argument("--repeats", type=int, default=5,
                 help="timed runs after the first call (default 5)")
  p.set_defaults(run=demo)

  def model_command(name, help, run):
    p = sub.add_parser(name, help=help,
                       description=help[0].upper() + help[1:] + ".\n\n" + MODEL_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="FILE.py:FUNCTION (see above)")
    p.add_argument("--trace-axes", type=_axes, default=(-1,), metavar="AXES",
                   help="output axes traced over, comma-separated (default -1; "
                   "--trace-axes= for none)")
    p.add_argument("--diagonal-axes", type=_axes, default=(), metavar="AXES",
                   help="output axes kept diagonal, comma-separated (default none)")
    p.add_argument("--batch-independent", choices=("auto", "yes", "no"), default="auto",
                   help="whether f treats examples independently (default: auto, "
                   "proven from the jaxpr)")
    p.add_argument("--precision", choices=("highest", "high", "default"),
                   default="highest", help="matmul precision (default highest)")
    p.add_argument("--x64", action="store_true",
                   help="enable float64 (jax_enable_x64) before calling FUNCTION")
    p.set_defaults(run=run)
    return p

  p = model_command("explain", "what the compiler builds for MODEL", explain)
  p.add_argument("--method", choices=METHOD_CHOICES, default="auto")
  p.add_argument("--json", action="store_true", help="print the report as JSON")
  p = model_command("bench", "time every method on MODEL and compare their kernels",
                    bench)
  p.add_argument("--methods", default="", metavar="M1,M2",
                 help="the methods to run (default jacobian,ntk_vp,structured,auto; the "
                 "first is the reference)")
  p.add_argument("--repeats", type=int, default=5,
                 help="timed runs after the first call (default 5)")
  p = model_command("dump", "write what is built for MODEL into DIRECTORY", dump)
  p.add_argument("directory", metavar="DIRECTORY")
  p.add_argument("--method", choices=METHOD_CHOICES, default="auto")
  return top


def main(argv=None) -> int:
  """Runs the command line; returns the exit status."""
  args = parser().parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())

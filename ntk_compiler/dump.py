"""`NTKFunction.dump`: everything built for one signature, as text files.

For a model function `mlp` the files are

    mlp.jaxpr.txt         f's own jaxpr at (params, x1), with the source line of each step
    mlp.ntk.jaxpr.txt     the NTK program's jaxpr (what XLA is given), with named scopes
    mlp.stablehlo.mlir    the NTK program lowered to StableHLO (module `jit_ntk_mlp`)
    mlp.hlo.txt           XLA's optimised HLO, after compilation
    mlp.cost.txt          XLA's own cost and memory analysis of the compiled program
    mlp.explain.txt       `explain()`'s report
    mlp.explain.json      the same as data

docs/dumps.md explains how to read them.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax

KINDS = ("jaxpr", "ntk_jaxpr", "stablehlo", "hlo", "cost", "explain", "explain_json")
SUFFIXES = {"jaxpr": ".jaxpr.txt", "ntk_jaxpr": ".ntk.jaxpr.txt",
            "stablehlo": ".stablehlo.mlir", "hlo": ".hlo.txt", "cost": ".cost.txt",
            "explain": ".explain.txt", "explain_json": ".explain.json"}


def dump(ntk_fn, directory: str | os.PathLike, params: Any, x1: Any,
         x2: Any = None) -> dict[str, pathlib.Path]:
  """Writes f's jaxpr, the NTK program (jaxpr, StableHLO, optimised HLO), XLA's cost
  analysis and the explain report for this signature into `directory` (created if
  needed; files of the same name are replaced). Returns {kind: path} (see KINDS)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  name = ntk_fn.name
  texts = {}
  user_f = getattr(ntk_fn, "user_f", ntk_fn.f)
  texts["jaxpr"] = jaxpr_text(jax.make_jaxpr(user_f)(params, x1), source_info=True)
  texts["ntk_jaxpr"] = jaxpr_text(ntk_fn.jaxpr(params, x1, x2), name_stack=True)
  lowered = ntk_fn.lower(params, x1, x2)
  texts["stablehlo"] = lowered.as_text()
  compiled = lowered.compile()
  texts["hlo"] = compiled.as_text() or ""
  texts["cost"] = cost_report(compiled)
  explanation = ntk_fn.explain(params, x1, x2)
  texts["explain"] = str(explanation)
  texts["explain_json"] = json.dumps(explanation.to_dict(), indent=1)
  paths = {}
  for kind in KINDS:
    path = directory / f"{name}{SUFFIXES[kind]}"
    path.write_text(texts[kind].rstrip("\n") + "\n", encoding="utf-8")
    paths[kind] = path
  return paths


def jaxpr_text(closed, **options) -> str:
  """A jaxpr as text; `source_info=True` adds each equation's source line, and
  `name_stack=True` its named scope (`ntk/...`) as comments."""
  try:
    return closed.pretty_print(use_color=False, **options)
  except TypeError:  # a JAX without these printing options
    return str(closed)


def cost_report(compiled) -> str:
  """XLA's cost analysis (FLOPs, bytes accessed) and memory analysis of a compiled
  program, as `name: value` lines; what the backend does not report is left out."""
  lines = ["# XLA's own estimates for the compiled NTK program (this backend)"]
  try:
    cost = compiled.cost_analysis()
  except Exception as e:  # not every backend reports it
    cost, note = None, f"# cost analysis unavailable: {type(e).__name__}: {e}"
    lines.append(note)
  if isinstance(cost, (list, tuple)):  # one dict per program in older JAX
    cost = cost[0] if cost else None
  if cost:
    wanted = ("flops", "transcendentals", "bytes accessed", "optimal_seconds")
    for key in wanted:
      if key in cost:
        lines.append(f"{key}: {cost[key]:.6g}")
  try:
    memory = compiled.memory_analysis()
  except Exception:
    memory = None
  if memory is not None:
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes", "alias_size_in_bytes"):
      value = getattr(memory, key, None)
      if value is not None:
        lines.append(f"{key.replace('_in_bytes', '')} (bytes): {value}")
  return "\n".join(lines)

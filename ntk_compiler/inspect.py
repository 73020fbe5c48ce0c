"""`explain()`: what the engine decided for each parameter leaf, in words and numbers."""

from __future__ import annotations

import dataclasses
from typing import Any

from ntk_compiler import analysis


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
  """
  steps: tuple[str, ...]
  factors: tuple[tuple[str, tuple[int, ...], bool], ...]
  cut_shape: tuple[int, ...]
  reason: str
  dense: bool


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """One parameter leaf: its uses and how its term is contracted."""
  path: str
  shape: tuple[int, ...]
  uses: tuple[UseReport, ...]
  contraction: str  # "pairwise", "materialised" or "unused"
  flops: int


@dataclasses.dataclass(frozen=True)
class Explanation:
  """What `ntk_fn` does for one signature of its arguments."""
  method: str
  reason: str
  batch: Any  # batching.Decision: per-example or not, and why
  estimates: dict
  leaves: tuple[LeafReport, ...]
  loops: tuple[str, ...] = ()  # while loops rewritten as scans, or kept (and why)

  @property
  def batch_independent(self) -> bool:
    return self.batch.independent

  @property
  def fallbacks(self) -> list[tuple[str, str]]:
    """(leaf path, reason) of every use that fell back to a dense Jacobian."""
    return [(leaf.path, use.reason) for leaf in self.leaves for use in leaf.uses
            if use.dense]

  def __str__(self) -> str:
    lines = [f"method: {self.method} ({self.reason})",
             f"batch_independent: {self.batch.independent} ({self.batch.reason})"]
    if self.estimates:
      lines.append("estimated FLOPs: " + ", ".join(
          f"{k} {v:.3g}" for k, v in self.estimates.items()))
    lines += [f"loop: {note}" for note in self.loops]
    for leaf in self.leaves:
      lines.append(f"params{leaf.path} {leaf.shape}: {leaf.contraction}"
                   + (f", ~{leaf.flops:.3g} FLOPs" if leaf.flops else ""))
      for use in leaf.uses:
        chain = " -> ".join(use.steps) or "(the parameter itself)"
        factors = ", ".join(f"{r}{list(s)}{' per example' if b else ''}"
                            for r, s, b in use.factors if s) or "none"
        flag = "  [DENSE FALLBACK]" if use.dense else ""
        lines.append(f"  use: {chain}; factors: {factors}; cotangent at "
                     f"{list(use.cut_shape)} {use.reason}{flag}")
    return "\n".join(lines)


def leaf_reports(plan: analysis.Plan, paths: list[str], contractions: dict[int, str],
                 flops: dict[int, int]) -> tuple[LeafReport, ...]:
  reports = []
  for leaf, (path, shape) in enumerate(zip(paths, plan.leaf_shapes)):
    uses = tuple(
        UseReport(u.view.steps,
                  tuple((f.rule + (" one-hot" if f.one_hot is not None else ""),
                         tuple(plan.label_sizes[l] for l in f.labels), f.batched)
                        for f in u.view.factors),
                  u.cut.shape, u.reason, u.dense)
        for u in plan.uses_of(leaf))
    reports.append(LeafReport(path, tuple(shape), uses,
                              contractions.get(leaf, "unused"), flops.get(leaf, 0)))
  return tuple(reports)

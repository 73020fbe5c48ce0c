"""The benchmark suite (benchmarks/suite.py) runs end to end at its tiny sizes.

A smoke test: one row and one first-call row at `--quick` sizes, one round. What it checks
is that every candidate compiles, runs and computes the same kernel as the jacrev baseline,
and that the JSON carries what the summary is built from; never a time.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import floor, models, suite  # noqa: E402
from tiers import full  # noqa: E402


@pytest.mark.full
def test_quick_row_runs_and_candidates_agree(tmp_path, capsys):
  path = tmp_path / "out.json"
  suite.main(["--quick", "--only", "mlp-w512-n16:full,diamonds", "--repeats", "1",
              "--json", str(path)])
  out = json.loads(path.read_text())
  printed = capsys.readouterr().out
  assert "| mlp-w512-n16 | full |" in printed and "Done-criterion checks" in printed
  assert out["meta"]["matmul_peak_gflops"] > 0
  (row,) = out["rows"]
  assert set(row["methods"]) == set(suite.OURS) | set(suite.BASELINES)
  for name, r in row["methods"].items():
    assert "error" not in r and "skipped" not in r, (name, r)
    # one round: a call under a second (all of them here) timed TIMED_PER_ROUND times
    assert r["median_ms"] > 0 and r["first_call_s"] > 0
    assert len(r["times_ms"]) == suite.TIMED_PER_ROUND
    # float32 kernels of a tiny MLP against the jacrev baseline's
    assert r["max_rel_diff"] < 1e-4, (name, r["max_rel_diff"])
  assert row["summary"]["auto_chose"] in ("structured", "jacobian", "ntk_vp")
  assert row["summary"]["speedup"]["jacrev"] == 1
  # auto lowers to the very program of the method it chose: one candidate, timed once
  chose = row["summary"]["auto_chose"]
  assert row["methods"]["auto"]["program"] == row["methods"][chose]["program"]
  assert row["summary"]["auto_same_program_as"] == chose
  (first,) = out["first_call"]
  assert first["model"] == "diamonds" and first["plan_s"] > 0
  assert first["max_rel_diff"] < 1e-4 and first["first_call_ratio"] > 0


@pytest.mark.parametrize("name, trace", [
    ("mlp-w512-n16", True),
    pytest.param("transformer-n8", True, marks=full),
    pytest.param("transformer-n8", False, marks=full)])
def test_baselines_agree_with_each_other(name, trace):
  model = models.build(name, quick=True)
  args = (model.params, model.x1, model.x2)
  jacrev = np.asarray(jax.jit(suite.jacrev_baseline(model.f, trace))(*args))
  vp = np.asarray(jax.jit(suite.vp_baseline(model.f, trace))(*args))
  n1, n2 = model.x1.shape[0], model.x2.shape[0]
  assert jacrev.shape == ((n1, n2) if trace else (n1, n2, models.OUT, models.OUT))
  np.testing.assert_allclose(vp, jacrev, rtol=1e-4, atol=1e-4 * np.abs(jacrev).max())


def test_only_rejects_unknown_rows():
  with pytest.raises(SystemExit, match="unknown row 'mlp'"):
    suite.main(["--quick", "--only", "mlp"])


def test_anchor_speedups_are_over_their_own_jacrev(tmp_path):
  results = {"fcn-w512-n16": {"full": {"jax-jacrev-contract": {"median_ms": 400.0},
                                       "NT-SD": {"median_ms": 4.0}}}}
  (tmp_path / "a.json").write_text(json.dumps({"results": results}))
  torch = {"fcn-w512-n16": {"full": {"torch.func-jacrev": {"median_ms": 200.0},
                                     "torch.func-ntk-vp": {"skipped": "memory"}}}}
  (tmp_path / "b.json").write_text(json.dumps({"results": torch}))
  anchors = suite.load_anchors(tmp_path)
  assert suite.anchor_speedups(anchors, "fcn-w512-n16", "full") == {
      "nt_structured": 100.0, "torch_func": 2.0}
  assert suite.anchor_speedups(anchors, "fcn-w512-n16", "trace") == {}


@full
def test_floor_runs_at_tiny_sizes(capsys):
  """benchmarks/floor.py: each row's operations counted as the model has them (every
  convolution forward, all but the one reading x backward; one backward matmul per
  hidden-to-hidden weight), every time positive."""
  out = floor.main(["--quick", "--reps", "1"])
  resnet, mlp = out["resnet"], out["mlp"]
  model = models.build("resnet-n16", quick=True)
  jaxpr = jax.make_jaxpr(model.f)(model.params, model.x1).jaxpr
  convs = sum(e.primitive is jax.lax.conv_general_dilated_p for e in jaxpr.eqns)
  counts = {op: n for op, (n, _) in resnet["ops"].items()}
  assert sum(n for op, n in counts.items() if op.startswith("forward")) == convs == 5
  assert sum(n for op, n in counts.items() if op.startswith("backward conv")) == convs - 1
  hidden = len(models.build("mlp-w2048-n16", quick=True).params) - 2
  assert sum(n for op, (n, _) in mlp["ops"].items() if op.startswith("backward")) == hidden
  for row in (resnet, mlp):
    assert all(ms > 0 for _, ms in row["ops"].values())
    assert row["floor_ms"] > 0 and row["ours_ms"] > 0 and row["jacrev_ms"] > 0
  assert "jacrev / floor" in capsys.readouterr().out

"""`explain()`: only the method used, the user's source lines, fallbacks flagged, the cost
model's estimates whatever fields it has, and the same report as data."""

import dataclasses
import json

import jax
import jax.numpy as jnp

import ntk_compiler as nc
from ntk_compiler import inspect

PARAMS = {"w": jnp.ones((3, 8)) / 3, "v": jnp.ones((8, 2)) / 8}
X = jnp.arange(15.0).reshape(5, 3) / 15


def model(params, x):
  h = jnp.tanh(x @ params["w"])  # line +1
  return h @ params["v"]         # line +2


LINE = model.__code__.co_firstlineno


def test_structured_report_lists_leaves_with_source_lines():
  explanation = nc.compile_ntk(model, method="structured").explain(PARAMS, X)
  assert explanation.method == "structured" and explanation.function == "model"
  (w,) = [leaf for leaf in explanation.leaves if leaf.path == "['w']"]
  (use,) = w.uses
  assert use.sources == (f"test_inspect.py:{LINE + 1} (model)",)
  assert use.cut_source == f"test_inspect.py:{LINE + 1} (model)"  # stops before tanh
  (v,) = [leaf for leaf in explanation.leaves if leaf.path == "['v']"]
  assert v.uses[0].sources == (f"test_inspect.py:{LINE + 2} (model)",)
  text = str(explanation)
  assert f"at test_inspect.py:{LINE + 1} (model)" in text
  assert "fallbacks: none" in text
  assert "* structured" in text  # the method used, starred in the cost table


def test_other_methods_report_no_per_leaf_plan():
  for method, words in (("jacobian", "Jacobian contraction"),
                        ("ntk_vp", "NTK-vector products")):
    explanation = nc.compile_ntk(model, method=method).explain(PARAMS, X)
    assert explanation.method == method and explanation.leaves == ()
    assert words in explanation.description
    text = str(explanation)
    assert "params['w']" not in text and f"* {method}" in text


def test_auto_reports_only_the_method_it_chose():
  explanation = nc.compile_ntk(model).explain(PARAMS, X)
  assert explanation.requested == "auto"
  assert bool(explanation.leaves) == (explanation.method == "structured")


def test_dense_fallback_is_flagged():
  """With the matmul's rule switched off, both weights fall back to dense Jacobians."""
  ntk_fn = nc.compile_ntk(model, method="structured",
                          rules={jax.lax.dot_general_p: None})
  explanation = ntk_fn.explain(PARAMS, X)
  assert sorted(path for path, _ in explanation.fallbacks) == ["['v']", "['w']"]
  text = str(explanation)
  assert text.count("no rule for it  [DENSE FALLBACK]") == 2
  assert "fallbacks: 2 use(s) take a dense Jacobian" in text


def test_report_as_data():
  explanation = nc.compile_ntk(model, method="structured").explain(PARAMS, X, X[:2])
  rows = explanation.records()
  assert len(rows) == sum(max(len(leaf.uses), 1) for leaf in explanation.leaves)
  assert {r["leaf"] for r in rows} == {"['w']", "['v']"}
  assert all(r["sources"] for r in rows)
  data = json.loads(json.dumps(explanation.to_dict()))
  assert data["method"] == "structured" and data["outputs"][0]["kernel_shape"] == [5, 2]
  assert data["batch_independent"] is True
  assert data["parameters"] == [["['v']", [8, 2]], ["['w']", [3, 8]]]
  assert "parameters: 2 leaves, 40 entries" in str(explanation)


@dataclasses.dataclass(frozen=True)
class _Estimate:
  """A cost model with fields explain() has never seen: it shows them all the same."""
  flops: dict
  joules: dict
  kinds: dict
  leaf_flops: dict
  pairwise_flops: dict
  materialised_flops: dict
  leaf_bytes: dict
  note: str = "not a table"


def test_estimates_are_rendered_whatever_their_fields():
  estimate = _Estimate({"jacobian": 10.0, "structured": 2.0},
                       {"jacobian": 3.0, "structured": 1.0},
                       {0: "pairwise"}, {0: 7}, {0: 7}, {0: 9}, {0: 123})
  per_method, per_leaf = inspect.estimate_fields(estimate)
  assert per_method == {"flops": {"jacobian": 10.0, "structured": 2.0},
                        "joules": {"jacobian": 3.0, "structured": 1.0}}
  assert set(per_leaf) == {"pairwise_flops", "materialised_flops", "leaf_bytes"}
  table = "\n".join(inspect._cost_table(per_method, "structured"))
  assert "joules" in table and "* structured" in table
  leaf = inspect.LeafReport("['w']", (3, 8), (), "pairwise", 7,
                            {k: v[0] for k, v in per_leaf.items()})
  line = inspect._leaf_lines(leaf, 7)[0]
  assert "pairwise ~7 FLOPs vs materialised ~9 FLOPs" in line and "leaf_bytes 123" in line

"""`NTKFunction.dump` and the names it gives: every file for every zoo model, the compiled
module named `jit_ntk_<f>`, in XLA's own dumps too."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import models_control
import models_selection
import models_structured
import ntk_compiler as nc
import tiers
from ntk_compiler import dump as dump_lib
from ntk_compiler import inspect
from tiers import full

ZOO = models.ZOO + models_structured.ZOO + models_control.ZOO + models_selection.ZOO
BY_NAME = {m.name: m for m in ZOO}
ROOT = pathlib.Path(__file__).parent.parent


def _named(model):
  """The zoo model's f under the model's own name, as a user's `def` would be."""
  name = model.name.replace("-", "_")
  f = lambda params, x: model.f(params, x)
  f.__name__ = name
  return f, name


def _check_dump(model, method, with_x2, tmp_path, drawn=None):
  params, x1, x2 = drawn or model.draw(0, 3, 2, jnp.float64)
  x2 = x2 if with_x2 else None
  f, name = _named(model)
  ntk_fn = nc.compile_ntk(f, method=method, batch_independent=model.batch_independent)
  paths = ntk_fn.dump(tmp_path / "dump", params, x1, x2)
  assert set(paths) == set(dump_lib.KINDS)
  for kind, path in paths.items():
    assert path.name == name + dump_lib.SUFFIXES[kind]
    assert path.read_text().strip(), f"{path.name} is empty"
  user = paths["jaxpr"].read_text()
  for eqn in jax.make_jaxpr(f)(params, x1).jaxpr.eqns:
    assert f"= {eqn.primitive}" in user or f"= {eqn.primitive}[" in user
  assert "# " in user  # each step's source line, as a comment
  program = paths["ntk_jaxpr"].read_text()
  assert "{ lambda " in program
  assert paths["stablehlo"].read_text().startswith(f"module @jit_ntk_{name}")
  hlo = paths["hlo"].read_text()
  assert f"HloModule jit_ntk_{name}" in hlo
  report = json.loads(paths["explain_json"].read_text())
  assert report["function"] == name
  assert report["method"] == method or method == "auto"
  assert paths["explain"].read_text().startswith(f"method: {report['method']} (")
  assert "flops" in paths["cost"].read_text()
  if report["method"] == "structured":
    # The named scopes survive into XLA's optimised HLO, as op_name metadata.
    assert "ntk/side1" in hlo and "ntk/contract" in hlo
    assert "[ntk/side1" in program and "[ntk/contract" in program
  return ntk_fn, paths


def _mlp_arguments():
  """The zoo MLP's parameters and inputs, drawn with NumPy (no JAX program to compile)."""
  rng = np.random.default_rng(0)
  sizes = (3, 7, 5, 4)
  params = [{"w": rng.normal(size=(a, b)) / np.sqrt(a), "b": rng.normal(size=b) / 10}
            for a, b in zip(sizes[:-1], sizes[1:])]
  return params, rng.normal(size=(3, 3)), rng.normal(size=(2, 3))


@pytest.mark.parametrize("method, with_x2", [("structured", True), ("jacobian", False)])
def test_dump_writes_every_file(method, with_x2, tmp_path):
  _check_dump(BY_NAME["mlp_tanh"], method, with_x2, tmp_path, _mlp_arguments())


def _covering_subset():
  """Zoo models that together use every primitive of the whole zoo (tiers.py), all in
  the full tier: each dump compiles a program, and the zoo has some 60 models."""
  params = tiers.representative(ZOO, tiers.primitives)
  return [pytest.param(p.values[0], marks=full, id=p.values[0].name) for p in params
          if not any(mark.name == "full" for mark in p.marks)]


@pytest.mark.parametrize("model", _covering_subset())
def test_dump_zoo_models(model, tmp_path):
  _check_dump(model, "auto", True, tmp_path)


def test_dump_replaces_and_creates_directories(tmp_path):
  f = lambda p, x: jnp.tanh(x @ p)
  ntk_fn = nc.compile_ntk(f, method="structured")
  w, x = jnp.ones((3, 2)), jnp.ones((4, 3))
  target = tmp_path / "a" / "b"
  first = ntk_fn.dump(target, w, x)
  second = ntk_fn.dump(str(target), w, x[:2])
  assert first == second
  assert first["jaxpr"].name == "lambda.jaxpr.txt"
  assert "f64[2,3]" in first["jaxpr"].read_text()  # the second signature's


def test_function_names():
  def model(p, x):
    return x @ p

  class Net:
    def __call__(self, p, x):
      return x @ p

  assert inspect.function_name(model) == "model"
  assert inspect.function_name(lambda p, x: x) == "lambda"
  assert inspect.function_name(functools.partial(model)) == "model"
  assert inspect.function_name(Net()) == "Net"
  assert nc.compile_ntk(model).name == "model"
  assert repr(nc.compile_ntk(model)).startswith("NTKFunction(model, method='auto'")
  lowered = nc.compile_ntk(model).lower(jnp.ones((3, 2)), jnp.ones((4, 3)))
  assert lowered.as_text().startswith("module @jit_ntk_model")


def test_plan_repr_is_short():
  params = {"w": jnp.ones((300, 200)), "v": jnp.ones((200, 2))}
  ntk_fn = nc.compile_ntk(lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"])
  text = repr(ntk_fn.plan(params, jnp.ones((5, 300))))
  assert len(text) < 400 and "\n" not in text
  assert text.startswith("Plan(method=") and "kernels=(5, 5)" in text


@full
def test_xla_dump_files_carry_the_name(tmp_path):
  """XLA_FLAGS=--xla_dump_to: the compiled NTK program's files are named after f."""
  script = ("import jax.numpy as jnp, ntk_compiler as nc\n"
            "def my_net(p, x):\n  return jnp.tanh(x @ p)\n"
            "nc.compile_ntk(my_net)(jnp.ones((3, 2)), jnp.ones((4, 3))).block_until_ready()\n")
  env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={tmp_path}"}
  subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=ROOT,
                 timeout=600)
  assert any("jit_ntk_my_net" in p.name for p in tmp_path.iterdir())

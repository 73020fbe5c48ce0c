"""The scripts in examples/ run as a user runs them, on small settings: the quick tier runs
one, the full tier all three, and on larger settings. They need the `examples` extra
(scikit-learn, matplotlib): skipped without."""

import importlib.util
import pathlib

import numpy as np
import pytest

from tiers import full

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def _example(name):
  pytest.importorskip("sklearn", reason="examples need scikit-learn (the examples extra)")
  pytest.importorskip("matplotlib", reason="examples need matplotlib (the examples extra)")
  spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _is_png(path):
  return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kernel_regression_small():
  out = _example("kernel_regression_digits").main(["--small"])
  # Ten classes: chance is 0.1; 60 training digits already do much better.
  assert all(a > 0.5 for a in out["accuracy"].values()), out["accuracy"]
  assert out["relative_gap"] < 0.5


@full
def test_kernel_regression_wider_is_closer_to_linear():
  """The wider the network, the closer training stays to the NTK's prediction."""
  example = _example("kernel_regression_digits")
  narrow = example.main(["--train", "200", "--width", "32", "--steps", "200"])
  wide = example.main(["--train", "200", "--width", "512", "--steps", "200"])
  assert wide["relative_gap"] < narrow["relative_gap"]
  assert all(a > 0.8 for a in wide["accuracy"].values()), wide["accuracy"]


@full  # five architectures, five compilations: the quick tier runs one example
def test_spectrum_small(tmp_path):
  out = _example("ntk_spectrum").main(["--small", "--out", str(tmp_path)])
  assert _is_png(out["plot"])
  for name, eigenvalues in out["spectra"].items():
    assert len(eigenvalues) == 24
    assert np.all(np.diff(eigenvalues) <= 0), name  # largest first
    assert eigenvalues[-1] > 0, name  # Θ₀ is positive definite on 24 distinct digits


@full
def test_spectrum_default(tmp_path):
  out = _example("ntk_spectrum").main(["--n", "64", "--out", str(tmp_path)])
  assert _is_png(out["plot"]) and len(out["spectra"]) == 5


@full
def test_kernel_distance_small(tmp_path):
  out = _example("kernel_distance").main(["--small", "--out", str(tmp_path)])
  assert _is_png(out["plot"])
  narrow, wide = out["results"][16], out["results"][64]
  for r in (narrow, wide):
    assert r["distance"][0] == 0.0 and r["loss"][-1] < r["loss"][0]
  # The lazy regime: the wider network's kernel moves less.
  assert wide["distance"][-1] < narrow["distance"][-1]
  assert wide["change"][-1] < narrow["change"][-1]


@full
def test_kernel_distance_falls_with_width():
  example = _example("kernel_distance")
  x, y, probe = example.digits(128, 16)
  final = [example.track(w, x, y, probe, lr=1.0, steps=40, every=20)["distance"][-1]
           for w in (32, 128, 512)]
  assert final[0] > final[1] > final[2] > 0, final


@full
def test_a_script_runs_from_the_command_line(tmp_path):
  """As the docs say to run it: `python examples/kernel_distance.py --small`."""
  import subprocess
  import sys
  _example("kernel_distance")  # skips without the optional packages
  done = subprocess.run([sys.executable, str(EXAMPLES / "kernel_distance.py"), "--small",
                         "--out", str(tmp_path)], capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr
  assert "kernel distance" in done.stdout and _is_png(tmp_path / "kernel_distance.png")

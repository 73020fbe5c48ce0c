"""Fuzzing: random programs (tests/fuzz_programs.py), every method against the oracle.

Each drawn program runs with method "structured", "jacobian", "ntk_vp" and "auto" (and
`explain()`); every kernel must match the float64 oracle, or, where the arguments are
invalid, the library must raise a clear error of its own. Three budgets:

  default tier (seconds):   pytest tests/test_fuzz.py
  full tier (CI, minutes):  NTK_FULL_TESTS=1 pytest tests/test_fuzz.py
                            (NTK_FUZZ_EXAMPLES=200 for a larger derandomized run)
  long run (by hand, one core, e.g. an hour):
      NTK_FUZZ_MINUTES=60 taskset -c 0 .venv/bin/python -m pytest -q -s \
          tests/test_fuzz.py -k long -p no:cacheprovider
    It runs rounds of fresh random programs until the time is up (NTK_FUZZ_SEED picks
    the first round's seed), shrinks each failure to a small program, keeps going, and
    writes the number of programs tried and every failure to fuzz_report.txt (or
    NTK_FUZZ_REPORT); it fails at the end if any program failed.

Every failure found becomes a test in tests/test_regressions.py.
"""

import gc
import os
import time
import traceback

import jax
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

import fuzz_programs

_QUIET = dict(deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
_TRIED = {"programs": 0}


def _check(program):
  _TRIED["programs"] += 1
  if _TRIED["programs"] % 25 == 0:  # each program compiles its own executables
    jax.clear_caches()
    gc.collect()
  failures = fuzz_programs.check(program)
  assert not failures, f"{program!r}\n" + "\n".join(failures)


@settings(max_examples=3, derandomize=True, **_QUIET)
@given(program=fuzz_programs.programs(max_ops=3))
def test_fuzz_quick(program):
  _check(program)


@pytest.mark.full
@settings(max_examples=int(os.environ.get("NTK_FUZZ_EXAMPLES", "40")), derandomize=True,
          **_QUIET)
@given(program=fuzz_programs.programs())
def test_fuzz_full(program):
  _check(program)


@pytest.mark.skipif(not os.environ.get("NTK_FUZZ_MINUTES"),
                    reason="a long run by hand: set NTK_FUZZ_MINUTES")
def test_fuzz_long():
  budget = 60 * float(os.environ["NTK_FUZZ_MINUTES"])
  report = os.environ.get("NTK_FUZZ_REPORT", "fuzz_report.txt")
  first = int(os.environ.get("NTK_FUZZ_SEED", "0"))
  start, failures, round_ = time.monotonic(), [], first

  def write(done: bool):
    minutes = (time.monotonic() - start) / 60
    with open(report, "w") as out:
      out.write(f"programs tried: {_TRIED['programs']} in {minutes:.1f} min, rounds "
                f"{first}..{round_}, failures: {len(failures)}"
                f"{'' if done else ' (running)'}\n\n")
      out.write("\n\n".join(failures))

  while time.monotonic() - start < budget:
    run = settings(max_examples=20, phases=[Phase.generate, Phase.target, Phase.shrink],
                   **_QUIET)(seed(round_)(given(program=fuzz_programs.programs())(_check)))
    try:
      run()
    except Exception as e:  # noqa: BLE001  (recorded; the run goes on)
      failures.append(f"round {round_}:\n" + "".join(traceback.format_exception(e))[-6000:])
    round_ += 1
    write(done=False)
  write(done=True)
  print(f"\nfuzz: {_TRIED['programs']} programs tried, {len(failures)} failing rounds; "
        f"report in {report}")
  assert not failures, f"{len(failures)} failing rounds; see {report}"

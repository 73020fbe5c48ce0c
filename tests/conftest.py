import gc
import os

import hypothesis
import jax
import pytest

from tiers import FULL

# The cost model's rates are the built-in defaults in tests (auto's choices do not depend
# on the machine's load); tests/test_cost.py measures them.
os.environ.setdefault("NTK_COMPILER_CALIBRATE", "0")
# The oracle and the 1e-10 checks need float64; float32 runs ask for it explicitly.
jax.config.update("jax_enable_x64", True)
# The tests compile thousands of tiny programs, where XLA's optimisation passes cost more
# than they save (a third of the run time). What they check, the NTK programs against the
# oracle, does not depend on them; the benchmarks run XLA as users do.
jax.config.update("jax_disable_most_optimizations", True)

# Hypothesis profiles: "default" (the default tier) draws 1 fixed example per test (the
# model-zoo grids 2, tiers.examples); "full" (the full tier, NTK_FULL_TESTS=1, CI) 3 fixed
# ones, so a CI run is repeatable (fresh draws are the fuzzer's long run's and
# "thorough"'s job); "thorough" (by hand, for hours:
# HYPOTHESIS_PROFILE=thorough) 25, and test_structured.py's whole grid. HYPOTHESIS_PROFILE
# picks a profile explicitly.
_COMMON = dict(deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile("default", max_examples=1, derandomize=True, **_COMMON)
hypothesis.settings.register_profile("full", max_examples=3, derandomize=True,
                                     print_blob=True, **_COMMON)
hypothesis.settings.register_profile("thorough", max_examples=25, database=None,
                                     print_blob=True, **_COMMON)
hypothesis.settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "full" if FULL else "default"))


def pytest_collection_modifyitems(config, items):
  """Skips the tests marked `full` unless NTK_FULL_TESTS=1 (tests/tiers.py)."""
  if FULL:
    return
  skip = pytest.mark.skip(reason="full tier: run with NTK_FULL_TESTS=1")
  for item in items:
    if item.get_closest_marker("full"):
      item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module. Each XLA CPU executable
  holds a few memory mappings, and one process running the whole suite otherwise
  reaches the kernel's limit on them (vm.max_map_count): LLVM then fails to allocate
  and the process crashes inside XLA's compiler."""
  yield
  jax.clear_caches()
  gc.collect()

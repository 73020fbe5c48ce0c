import gc
import os

import hypothesis
import jax
import pytest

from tiers import FULL

# The oracle and the 1e-10 checks need float64; float32 runs ask for it explicitly.
jax.config.update("jax_enable_x64", True)
# The default tier compiles hundreds of tiny programs, where XLA's optimisation passes
# cost more than they save (a third of its run time); the full tier compiles as users do.
if not FULL:
  jax.config.update("jax_disable_most_optimizations", True)

# Hypothesis: a few derandomized examples in the default tier, more (and random ones) in
# the full tier; HYPOTHESIS_PROFILE picks a profile explicitly.
hypothesis.settings.register_profile(
    "default", deadline=None, max_examples=2, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile(
    "thorough", deadline=None, max_examples=25,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "thorough" if FULL else "default"))


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

import gc
import os

import hypothesis
import jax
import pytest

# The oracle and the 1e-10 checks need float64; float32 runs ask for it explicitly.
jax.config.update("jax_enable_x64", True)

hypothesis.settings.register_profile(
    "default", deadline=None, max_examples=3, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile(
    "thorough", deadline=None, max_examples=25,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module. Each XLA CPU executable
  holds a few memory mappings, and one process running the whole suite otherwise
  reaches the kernel's limit on them (vm.max_map_count): LLVM then fails to allocate
  and the process crashes inside XLA's compiler."""
  yield
  jax.clear_caches()
  gc.collect()

import os

import hypothesis
import jax

# The oracle and the 1e-10 checks need float64; float32 runs ask for it explicitly.
jax.config.update("jax_enable_x64", True)

hypothesis.settings.register_profile(
    "default", deadline=None, max_examples=3, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile(
    "thorough", deadline=None, max_examples=25,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

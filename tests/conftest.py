"""Test configuration: strict JAX numerics and deterministic hypothesis."""

import jax
from hypothesis import HealthCheck, settings

# Implicit rank promotion hides broadcasting bugs in kernels; forbid it in tests.
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")

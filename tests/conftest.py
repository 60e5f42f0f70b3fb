"""Test configuration: strict JAX numerics and deterministic hypothesis."""

import os
import tempfile
from pathlib import Path

import jax
from hypothesis import HealthCheck, settings

# The tests never write to the user's compilation cache; they share one of
# their own (between xdist workers too), which saves repeated compiles.
os.environ.setdefault(
    "SUBPIXAL_JAX_CACHE_DIR", str(Path(tempfile.gettempdir()) / "subpixal-jax-tests")
)

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

"""The seed's import path of `subpixal_jax.reference.resample`."""

from subpixal_jax.reference.resample import *  # noqa: F403
from subpixal_jax.reference.resample import __all__  # noqa: F401

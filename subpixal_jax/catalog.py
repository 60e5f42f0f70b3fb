"""The seed's import path of `subpixal_jax.reference.catalog`."""

from subpixal_jax.reference.catalog import *  # noqa: F403
from subpixal_jax.reference.catalog import __all__  # noqa: F401

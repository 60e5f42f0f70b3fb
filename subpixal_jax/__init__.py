"""subpixal_jax: sub-pixel alignment of dithered astronomical images in JAX.

A reimplementation of STScI's ``subpixal`` (Fruchter & Hounsell's method):
every catalog source of every exposure is cross-correlated with four
half-pixel-shifted blots of a drizzled reference, the interlaced maps give
per-source displacements, and a clipped linear fit of those displacements
corrects each exposure's FITS WCS.

The package sets no global JAX configuration; float64 is enabled only inside
the entry points that need it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("subpixal-jax")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]

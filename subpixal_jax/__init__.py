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

from subpixal_jax.align import (
    align_files,
    align_images,
    apply_solution,
    find_linear_fit,
    write_corrections,
)
from subpixal_jax.result import AlignmentResult, ImageFit, IterationResult
from subpixal_jax.wcs import correct_wcs, update_exposure_wcs, update_image_wcs

__all__ = [
    "AlignmentResult",
    "ImageFit",
    "IterationResult",
    "__version__",
    "align_files",
    "align_images",
    "apply_solution",
    "correct_wcs",
    "find_linear_fit",
    "update_exposure_wcs",
    "update_image_wcs",
    "write_corrections",
]

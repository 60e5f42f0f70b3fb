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

#: Public names and the modules that hold them; imported on first use, so
#: that ``subpixal-jax --help``, the input checks and the first progress
#: message come before JAX is loaded.
_PUBLIC = {
    "align_files": "subpixal_jax.align",
    "align_images": "subpixal_jax.align",
    "apply_solution": "subpixal_jax.align",
    "find_linear_fit": "subpixal_jax.align",
    "write_corrections": "subpixal_jax.align",
    "AlignmentResult": "subpixal_jax.io.result",
    "ImageFit": "subpixal_jax.io.result",
    "IterationResult": "subpixal_jax.io.result",
    "AlignOptions": "subpixal_jax.options",
    "correct_wcs": "subpixal_jax.io.wcs",
    "update_exposure_wcs": "subpixal_jax.io.wcs",
    "update_image_wcs": "subpixal_jax.io.wcs",
}

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    msg = f"module 'subpixal_jax' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)

"""The WCS interface the shell needs from a chip, whatever carries it.

FITS chips carry an `astropy.wcs.WCS`; JWST chips a gWCS behind
:class:`subpixal_jax.io.jwst.GWCSAdapter`, which implements this protocol. The
protocol lives here, apart from the gWCS code, so that the pipeline can test
for it without the optional ``jwst`` dependencies.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class SkyWCS(Protocol):
    """The WCS interface the shell needs from a chip (FITS or gWCS).

    Pixel coordinates are 0-based ``(x, y)`` = (column, row) of pixel
    centres; sky coordinates are ICRS degrees; arrays in, float64 arrays out.
    """

    @property
    def pixel_shape(self) -> tuple[int, int] | None:
        """``(nx, ny)`` of the chip, or None if unknown."""
        ...

    def pixel_to_sky(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Map pixels to sky ``(ra, dec)`` through the full WCS."""
        ...

    def sky_to_pixel(self, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        """Map sky ``(ra, dec)`` to pixels (inverse of :meth:`pixel_to_sky`)."""
        ...

    def pixel_scale(self, x=None, y=None) -> float:
        """Local pixel scale in degrees (square root of the pixel area)."""
        ...

    def corrected(self, wcslin, matrix, shift, *, center=None) -> SkyWCS:
        """Return a new WCS with an affine fit in ``wcslin`` pixels applied."""
        ...

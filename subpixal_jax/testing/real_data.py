"""Real HST headers that installed packages ship, for tests and benchmarks."""

from __future__ import annotations

import importlib.resources
import warnings

from astropy.io import fits
from astropy.wcs import WCS

__all__ = ["acs_wfc_wcs"]


def acs_wfc_wcs() -> WCS:
    """Return the real ACS/WFC chip WCS astropy ships (``dist_lookup.fits.gz``).

    TAN-SIP of order 4 with a one-row D2IM table and two NPOL tables, over
    the full 4096x2048 chip (the file's pixels are a 100x100 cutout).

    Returns
    -------
    astropy.wcs.WCS
        The WCS of its first extension, with its lookup tables.
    """
    ref = (
        importlib.resources.files("astropy.wcs.tests") / "data" / "dist_lookup.fits.gz"
    )
    with (
        importlib.resources.as_file(ref) as path,
        fits.open(path) as hdul,
        warnings.catch_warnings(),
    ):
        # its header carries keywords astropy warns about on reading
        warnings.simplefilter("ignore")
        return WCS(hdul[1].header, hdul)

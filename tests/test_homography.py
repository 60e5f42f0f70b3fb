"""Tests of the tiled chip pixel map (`chip_pixmap` through `focal_lattice`)."""

import numpy as np
from astropy.wcs import WCS, DistortionLookupTable

from subpixal_jax.geometry.homography import (
    apply_homography,
    chip_pixmap,
    focal_homography,
)
from subpixal_jax.testing.real_data import acs_wfc_wcs


def _grid_for(w, rot_deg=20.0):
    out = WCS(naxis=2)
    out.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    out.wcs.crval = w.wcs.crval + np.array([0.01, -0.01])
    out.wcs.crpix = [2100.0, 2100.0]
    t = np.radians(rot_deg)
    out.wcs.cd = (
        0.04 / 3600 * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    )
    out.wcs.set()
    return out


def _pix2foc_then(h, chip_wcs, shape):
    """pix2foc at every pixel of a chip, then the homography ``h``."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    fx, fy = chip_wcs.pix2foc(xx.ravel(), yy.ravel(), 0)
    return apply_homography(h, fx, fy).reshape(*shape, 2)


def test_chip_pixmap_tiles_equal_pix2foc_at_every_pixel():
    """Tiles (64 px, the last one cut) = pix2foc + homography pixel by pixel."""
    w = acs_wfc_wcs()
    out = _grid_for(w)
    shape = (70, 4000)  # across tile and NPOL cell borders, not a multiple of 64
    h = focal_homography(w, out, shape)
    assert h is not None
    exact = _pix2foc_then(h, w, shape)
    assert np.abs(chip_pixmap(w, out, shape) - exact).max() < 1e-9  # measured 5e-12


def test_chip_pixmap_two_dimensional_d2im_falls_back_to_pix2foc():
    w = acs_wfc_wcs()
    table = np.random.default_rng(4).normal(0, 0.05, (8, 32)).astype(np.float32)
    w.det2im1 = DistortionLookupTable(table, (1.0, 1.0), (0.0, 0.0), (128.0, 256.0))
    out = _grid_for(w, rot_deg=-35.0)
    shape = (40, 130)
    exact = _pix2foc_then(focal_homography(w, out, shape), w, shape)
    np.testing.assert_array_equal(chip_pixmap(w, out, shape), exact)

"""The absolute tie: the aligned set moved as one onto a reference catalog.

After the relative alignment, the sources of the final drizzled combination
are matched to a reference catalog (e.g. Gaia DR3, propagated to the
observation epoch) with the capture stage's matching, a clipped ``shift`` or
``rscale`` fit weighted by both catalogs' errors is made
(:func:`subpixal_jax.reference.refcat.tie_to_catalog`), and that one correction is
applied to every exposure, so the relative alignment is kept: as a turn of
the sky (exact, :func:`tie_rotation`) and a tiny residual in the fit frame.
"""

from __future__ import annotations

import logging

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from subpixal_jax.geometry.skywcs import SkyWCS
from subpixal_jax.geometry.transform import Affine
from subpixal_jax.io.wcs import correct_wcs, rotate_wcs
from subpixal_jax.options import AlignOptions
from subpixal_jax.pipeline.stages import corrected_wcs
from subpixal_jax.reference.refcat import (
    AbsoluteTie,
    observation_epoch,
    positions_at,
    tie_to_catalog,
)

log = logging.getLogger(__name__)


def exposures_epoch(resample) -> Time | None:
    """Mean observation epoch of the exposures (None if no header has one)."""
    epochs = []
    for exposure in resample.exposures:
        if exposure.path is None:
            continue
        try:
            epochs.append(observation_epoch(fits.getheader(exposure.path)).jyear)
        except (ValueError, KeyError, OSError):
            continue
    return Time(float(np.mean(epochs)), format="jyear") if epochs else None


def aligned_sources(catalog, resample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sky positions (deg) and errors (mas) of the final combination's sources."""
    catalog.set_image(resample.sci, mask=resample.wht <= 0)
    table = catalog.catalog
    order = np.argsort(-np.nan_to_num(np.asarray(table["flux"], float), nan=-np.inf))
    table = table[order]
    xy = np.column_stack([table["x"], table["y"]]).astype(float)
    ra, dec = resample.output_wcs.all_pix2world(xy[:, 0], xy[:, 1], 0)
    scale_mas = 3.6e6 * float(np.mean(proj_plane_pixel_scales(resample.output_wcs)))
    pos_std = (
        np.asarray(table["pos_std"], float) if "pos_std" in table.colnames else None
    )
    errors = None if pos_std is None else np.nan_to_num(pos_std, nan=1.0) * scale_mas
    return ra, dec, errors


def measure_tie(
    catalog, resample, wcslin: WCS, reference_catalog: Table, fitgeom: str
) -> AbsoluteTie:
    """Fit the tie of the current combination to ``reference_catalog`` (not applied).

    The catalog is propagated to the exposures' mean epoch when their headers
    give one (:func:`exposures_epoch`).
    """
    epoch = exposures_epoch(resample)
    refcat = (
        reference_catalog if epoch is None else positions_at(reference_catalog, epoch)
    )
    ra, dec, errors = aligned_sources(catalog, resample)
    tie = tie_to_catalog((ra, dec), refcat, wcslin, errors=errors, fitgeom=fitgeom)
    log.info(
        "absolute tie: %s (%s), %d matches, rms %.1f mas, shift (%.3f, %.3f) px",
        tie.status.name,
        tie.grade.name,
        tie.n_matches,
        tie.rms_mas,
        *tie.shift,
    )
    return tie


def tie_set(
    catalog,
    resample,
    wcslin: WCS,
    reference_catalog: Table,
    options: AlignOptions,
) -> tuple[AbsoluteTie, Affine | None]:
    """Tie the aligned set to ``reference_catalog`` and apply it to every image.

    Returns
    -------
    tie : AbsoluteTie
        The fit, its statistics, status and grade.
    correction : Affine or None
        The correction applied to every exposure (None when the tie failed).
    """
    tie = measure_tie(
        catalog, resample, wcslin, reference_catalog, options.absolute_fitgeom
    )
    if not tie.ok:
        log.warning("absolute tie not applied: %s", tie.reason)
        return tie, None
    affine = Affine(tie.matrix, tie.shift, tie.center)
    rotation, residual = tie_rotation(wcslin, affine, resample.output_shape)
    for i, exposure in enumerate(resample.exposures):
        resample.update_wcs(
            i,
            {
                c.extver: _tied_wcs(c.wcs, wcslin, affine, rotation, residual)
                for c in exposure.chips
            },
        )
    return tie, affine


def _unit(sky: np.ndarray) -> np.ndarray:
    ra, dec = np.deg2rad(sky).T
    return np.column_stack(
        [np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)]
    )


def _sky(v: np.ndarray) -> np.ndarray:
    return np.column_stack(
        [
            np.rad2deg(np.arctan2(v[:, 1], v[:, 0])) % 360.0,
            np.rad2deg(np.arcsin(np.clip(v[:, 2], -1.0, 1.0))),
        ]
    )


def tie_rotation(
    wcslin: WCS, affine: Affine, shape: tuple[int, int]
) -> tuple[np.ndarray, Affine]:
    """Split a tie into a rotation of the sky and what it leaves in the fit frame.

    The rotation is the one closest to the tie over the ``shape`` grid of
    ``wcslin`` (Kabsch; the tie is the correction of
    :func:`~subpixal_jax.io.wcs.correct_wcs`, ``xy ≈ T(uv)``). Turning every
    chip by it (:func:`~subpixal_jax.io.wcs.rotate_wcs`) keeps their mapping
    into each other exactly; the residual (the tie's scale, and the second
    order by which a shift of a tangent plane differs from a turn of the
    sphere) is tiny, so applying it with ``correct_wcs`` changes that mapping
    by far less than the 1e-7 px ``correct_wcs`` alone would.

    Returns
    -------
    rotation : numpy.ndarray, shape (3, 3)
        Acts on unit vectors.
    residual : Affine
        The rest, as a ``correct_wcs`` correction about the tie's centre.
    """
    ny, nx = shape
    xs, ys = np.meshgrid(np.linspace(0, nx - 1, 9), np.linspace(0, ny - 1, 9))
    xy = np.column_stack([xs.ravel(), ys.ravel()])
    c = affine.center
    uv = (xy - c - affine.shift) @ np.linalg.inv(affine.matrix).T + c
    src = _unit(wcslin.wcs_pix2world(xy, 0))
    dst = _unit(wcslin.wcs_pix2world(uv, 0))
    u, _, vt = np.linalg.svd(src.T @ dst)
    flip = np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))])
    rotation = vt.T @ flip @ u.T
    # Where the rotation puts the grid; the residual takes it on to uv.
    turned = wcslin.wcs_world2pix(_sky(src @ rotation.T), 0)
    design = np.column_stack([turned - c, np.ones(len(turned))])
    coef, *_ = np.linalg.lstsq(design, uv - c, rcond=None)
    b_matrix, b_shift = coef[:2].T, coef[2]
    inverse = np.linalg.inv(b_matrix)
    return rotation, Affine(inverse, -inverse @ b_shift, c)


def _tied_wcs(wcs, wcslin, affine, rotation, residual):
    """One chip's WCS after the tie: turned and corrected (gWCS: the affine)."""
    if isinstance(wcs, SkyWCS):
        return corrected_wcs({0: wcs}, wcslin, affine, "general")[0]
    turned = rotate_wcs(wcs, rotation)
    return correct_wcs(
        turned,
        wcslin,
        residual.matrix,
        residual.shift,
        center=residual.center,
        fitgeom="general",
    )

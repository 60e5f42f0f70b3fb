"""The absolute tie: the aligned set moved as one onto a reference catalog.

After the relative alignment, the sources of the final drizzled combination
are matched to a reference catalog (e.g. Gaia DR3, propagated to the
observation epoch) with the capture stage's matching, a clipped ``shift`` or
``rscale`` fit weighted by both catalogs' errors is made
(:func:`subpixal_jax.refcat.tie_to_catalog`), and that one correction is
applied to every exposure, so the relative alignment is kept exactly.
"""

from __future__ import annotations

import logging

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from subpixal_jax.options import AlignOptions
from subpixal_jax.pipeline.stages import corrected_wcs
from subpixal_jax.refcat import (
    AbsoluteTie,
    observation_epoch,
    positions_at,
    tie_to_catalog,
)
from subpixal_jax.transform import Affine

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
    for i, exposure in enumerate(resample.exposures):
        before = {c.extver: c.wcs for c in exposure.chips}
        resample.update_wcs(i, corrected_wcs(before, wcslin, affine, tie.fitgeom))
    return tie, affine

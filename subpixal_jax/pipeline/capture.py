r"""Capture large initial WCS errors by matching catalogs before the sub-pixel loop.

The cross-correlation loop measures offsets only inside a source cutout (the
segment box plus 2 px), so an exposure whose WCS is off by tens or hundreds of
pixels, degrees of rotation or a wrong pixel scale never converges.
:func:`coarse_transform` measures such an error first: it detects the
exposure's own sources on every chip (photutils, through
:class:`~subpixal_jax.reference.catalog.PhotutilsCatalog`), maps them through each
chip's full WCS (SIP, D2IM and NPOL included) into the pixel frame of
``wcslin`` and matches them against a reference catalog in that frame with
:func:`subpixal_jax.reference.matching.match_points`.

Direction
---------
The result is the linear fit of docs/original.md §6.2 in ``wcslin`` pixels,
``xy ≈ M (uv − c) + c + s``, with ``xy`` where the exposure's current WCS
puts its sources and ``uv`` where the reference says they are. It is exactly
what :func:`subpixal_jax.io.wcs.correct_wcs` expects, so::

    new = correct_wcs(chip.wcs, wcslin, res.matrix, res.shift,
                      center=res.center, fitgeom=res.fitgeom)

moves every chip of the exposure onto the reference (tested in
``tests/test_capture.py`` against the simulated truth).

When to run it
--------------
:func:`needs_capture` says whether a found transform is worth applying: it is
when the transform moves some matched source by more than ``threshold``
(default 1 px) in the fit frame. Below that the sub-pixel loop's capture
range (the cutout pad) covers the error, and its own fit is more precise.
A non-OK status means "do not apply": the reason names the numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
from astropy.wcs import WCS
from numpy.typing import ArrayLike

from subpixal_jax.core.linfit import FITGEOM_MIN_POINTS, FitStatus, LinearFit
from subpixal_jax.io.images import Exposure
from subpixal_jax.linearfit import iter_linear_fit
from subpixal_jax.reference.catalog import PhotutilsCatalog
from subpixal_jax.reference.matching import (
    MatchLimits,
    MatchResult,
    MatchStatus,
    SearchOptions,
    TransformSummary,
    match_points,
)

__all__ = [
    "CaptureResult",
    "coarse_transform",
    "detect_exposure_sources",
    "needs_capture",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CaptureResult(TransformSummary):
    """A coarse transform of one exposure onto the reference, in ``wcslin`` pixels.

    ``xy ≈ matrix @ (uv − center) + center + shift`` with ``xy`` the
    exposure's sources as its WCS places them and ``uv`` the reference
    positions: the argument order of :func:`subpixal_jax.io.wcs.correct_wcs`.
    Apply only when ``status`` is OK.

    Attributes
    ----------
    status : MatchStatus
        Outcome of the match.
    reason : str
        Explanation with the numbers.
    matrix : numpy.ndarray, shape (2, 2)
        ``M``.
    shift : numpy.ndarray, shape (2,)
        ``s`` at ``center``, ``wcslin`` pixels.
    center : numpy.ndarray, shape (2,)
        ``c``, 0-based ``wcslin`` pixel (``crpix − 1`` unless given).
    fitgeom : str
        Geometry of the fit (pass it to ``correct_wcs``).
    n_matches : int
        Matched sources in the final fit.
    rms : float
        RMS of the fit residuals, ``wcslin`` pixels.
    significance : float
        Matches over the best alternative or chance
        (:attr:`MatchResult.significance`).
    n_sources : int
        Exposure sources that entered the match.
    n_reference : int
        Reference positions that entered the match.
    max_displacement : float
        Largest ``|T(uv) − uv|`` over the matched reference positions, pixels.
    xy : numpy.ndarray, shape (n_sources, 2)
        The exposure's sources in ``wcslin`` pixels (brightest first).
    match : MatchResult
        The underlying match (its transform maps ``xy`` onto the reference).
    fit : LinearFit or None
        The clipped fit ``xy ≈ T(uv)`` over the matched pairs.
    """

    status: MatchStatus
    reason: str
    matrix: np.ndarray
    shift: np.ndarray
    center: np.ndarray
    fitgeom: str
    n_matches: int
    rms: float
    significance: float
    n_sources: int
    n_reference: int
    max_displacement: float
    xy: np.ndarray
    match: MatchResult
    fit: LinearFit | None = None


def detect_exposure_sources(
    exposure: Exposure,
    wcslin: WCS,
    *,
    max_sources: int | None = 500,
    catalog: PhotutilsCatalog | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Detect an exposure's sources per chip and place them in ``wcslin`` pixels.

    Parameters
    ----------
    exposure : Exposure
        The exposure (:func:`subpixal_jax.io.images.read_exposure`).
    wcslin : astropy.wcs.WCS
        The fit frame.
    max_sources : int or None, optional
        Keep the brightest this many over all chips (None: all).
    catalog : PhotutilsCatalog, optional
        Detector to use (its settings and filters); default
        ``PhotutilsCatalog(threshold_sigma=5, deblend=False,
        centroid='moment')``: a match needs neither split blends nor
        windowed centroids (0.3 px suffice), which were 80% of its time.

    Returns
    -------
    xy : numpy.ndarray, shape (N, 2)
        0-based ``wcslin`` pixel positions through each chip's full WCS,
        brightest first.
    flux : numpy.ndarray, shape (N,)
        Their fluxes in the exposure's units.
    """
    if catalog is None:
        catalog = PhotutilsCatalog(
            threshold_sigma=5.0, deblend=False, centroid="moment"
        )
    xy, flux = [], []
    for chip in exposure.chips:
        catalog.set_image(chip.data, mask=~chip.valid, error=chip.err)
        table = catalog.catalog
        if len(table) == 0:
            continue
        pix = np.column_stack([table["x"], table["y"]]).astype(np.float64)
        sky = chip.wcs.all_pix2world(pix, 0)
        xy.append(wcslin.all_world2pix(sky, 0))
        flux.append(np.asarray(table["flux"], dtype=np.float64))
    if not xy:
        return np.zeros((0, 2)), np.zeros(0)
    xy = np.concatenate(xy)
    flux = np.concatenate(flux)
    order = np.argsort(-flux, kind="stable")[:max_sources]
    log.info("%s: %d sources detected, %d kept", exposure.name, len(flux), len(order))
    return xy[order], flux[order]


def _reference_points(reference_xy, reference_flux) -> np.ndarray:
    """Return the finite reference positions, brightest first when fluxes are given."""
    ref = np.asarray(reference_xy, dtype=np.float64)
    if ref.ndim != 2 or ref.shape[1] != 2:
        msg = f"reference_xy must have shape (M, 2), got {ref.shape}"
        raise ValueError(msg)
    if reference_flux is not None:
        rflux = np.asarray(reference_flux, dtype=np.float64)
        if rflux.shape != (len(ref),):
            msg = f"reference_flux must have shape ({len(ref)},), got {rflux.shape}"
            raise ValueError(msg)
        ref = ref[np.argsort(-np.nan_to_num(rflux, nan=-np.inf), kind="stable")]
    return ref[np.all(np.isfinite(ref), axis=1)]


def _near(ref: np.ndarray, xy: np.ndarray, limits: MatchLimits) -> np.ndarray:
    """Return the reference positions near the exposure.

    Near: within its footprint at the largest scale, widened by the largest
    shift (all of them without a ``max_shift``).
    """
    if limits.max_shift is None or not len(xy):
        return ref
    mid = 0.5 * (xy.min(axis=0) + xy.max(axis=0))
    half = 0.5 * (xy.max(axis=0) - xy.min(axis=0))
    reach = float(np.hypot(*half)) * max(limits.scale_range) + limits.max_shift
    return ref[np.hypot(*(ref - mid).T) <= reach]


def _inverse_fit(match: MatchResult, xy, ref, c, fitgeom):
    """Fit ``xy ≈ T(ref)`` over the matched pairs, clipped (correct_wcs direction).

    Returns the :class:`CaptureResult` fields: status, reason, transform and
    statistics.
    """
    out = {
        "status": match.status,
        "reason": match.reason,
        "matrix": np.eye(2),
        "shift": np.zeros(2),
        "n_matches": match.n_matches,
        "rms": math.nan,
        "max_displacement": math.nan,
        "fit": None,
    }
    if not match.ok:
        return out
    i, j = match.pairs.T
    fit = iter_linear_fit(
        xy[i], ref[j], fitgeom=fitgeom, center=c, nclip=3, sigma=3.0, throw=False
    )
    if int(fit.status) != FitStatus.OK:
        out["status"] = MatchStatus.TOO_FEW_MATCHES
        out["reason"] += f"; the inverse fit failed ({FitStatus(int(fit.status))})"
        return out
    matrix = np.asarray(fit.matrix, dtype=np.float64)
    shift = np.asarray(fit.shift, dtype=np.float64)
    moved = (ref[j] - c) @ matrix.T + c + shift - ref[j]
    out.update(
        matrix=matrix,
        shift=shift,
        n_matches=int(fit.npoints),
        rms=float(fit.rmse),
        max_displacement=float(np.max(np.hypot(*moved.T))),
        fit=fit,
    )
    return out


def coarse_transform(
    exposure: Exposure,
    reference_xy: ArrayLike,
    wcslin: WCS,
    limits: MatchLimits | None = None,
    *,
    reference_flux: ArrayLike | None = None,
    fitgeom: str = "rscale",
    source_xy: ArrayLike | None = None,
    search: SearchOptions | None = None,
) -> CaptureResult:
    r"""Measure a large linear WCS error of an exposure by catalog matching.

    The fit is about ``c = wcslin.wcs.crpix − 1`` (as in the alignment loop).

    Parameters
    ----------
    exposure : Exposure
        The exposure to capture.
    reference_xy : array_like, shape (M, 2)
        The reference catalog in 0-based ``wcslin`` pixels (e.g. the sources
        of the drizzled reference, or an external catalog projected with
        ``wcslin.all_world2pix``). Brightest first, or give
        ``reference_flux``.
    wcslin : astropy.wcs.WCS
        Undistorted TAN frame of the fit.
    limits : MatchLimits, optional
        Match radius, priors and acceptance
        (:class:`~subpixal_jax.reference.matching.MatchLimits`; default 2 px, any
        shift and rotation, scales 0.5-2, 15 matches). With a ``max_shift``,
        reference positions farther than it (plus the footprint at the
        largest scale) from the exposure's sources are left out.
    reference_flux : array_like, shape (M,), optional
        Fluxes (any units) to order the reference brightest first.
    fitgeom : {'shift', 'rshift', 'rscale', 'general'}, optional
        Geometry of the final fit.
    source_xy : array_like, shape (N, 2), optional
        The exposure's sources already in ``wcslin`` pixels (brightest
        first); default :func:`detect_exposure_sources` with its defaults.
    search : SearchOptions, optional
        Triangle search settings
        (:class:`~subpixal_jax.reference.matching.SearchOptions`).

    Returns
    -------
    CaptureResult
        Transform, statistics and status.

    Raises
    ------
    ValueError
        Bad shapes or options (the message names them).
    """
    ref = _reference_points(reference_xy, reference_flux)
    if fitgeom not in FITGEOM_MIN_POINTS:
        msg = f"fitgeom must be one of {tuple(FITGEOM_MIN_POINTS)}, got {fitgeom!r}"
        raise ValueError(msg)
    limits = MatchLimits() if limits is None else limits
    c = np.asarray(wcslin.wcs.crpix, dtype=np.float64) - 1.0
    if source_xy is None:
        xy, _ = detect_exposure_sources(exposure, wcslin)
    else:
        xy = np.asarray(source_xy, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2:
            msg = f"source_xy must have shape (N, 2), got {xy.shape}"
            raise ValueError(msg)
    ref = _near(ref, xy, limits)
    match = match_points(xy, ref, limits, fitgeom=fitgeom, center=c, search=search)
    found = _inverse_fit(match, xy, ref, c, fitgeom)
    log.info("%s: capture %s: %s", exposure.name, found["status"].name, found["reason"])
    return CaptureResult(
        center=c,
        fitgeom=fitgeom,
        significance=match.significance,
        n_sources=len(xy),
        n_reference=len(ref),
        xy=xy,
        match=match,
        **found,
    )


def needs_capture(result: CaptureResult, *, threshold: float = 1.0) -> bool:
    """Whether a capture result should be applied before the sub-pixel loop.

    The rule for the alignment loop: apply the coarse transform when the
    match is OK and it moves some matched source by more than ``threshold``
    ``wcslin`` pixels; otherwise leave the WCS alone (the sub-pixel loop
    captures errors within its cutout pad, 2 px, and fits them better).

    Parameters
    ----------
    result : CaptureResult
        From :func:`coarse_transform`.
    threshold : float, optional
        Displacement in ``wcslin`` pixels above which the transform is
        applied.

    Returns
    -------
    bool
        True to apply the transform.

    Examples
    --------
    >>> import numpy as np
    >>> from subpixal_jax.reference.matching import MatchStatus
    >>> res = CaptureResult(MatchStatus.OK, "", np.eye(2), np.array([0.3, 0.0]),
    ...                     np.zeros(2), "shift", 40, 0.05, 20.0, 50, 60, 0.3,
    ...                     np.zeros((50, 2)), None)
    >>> needs_capture(res)
    False
    """
    if not (math.isfinite(threshold) and threshold >= 0):
        msg = f"threshold must be a non-negative number, got {threshold!r}"
        raise ValueError(msg)
    return bool(result.ok and result.max_displacement > threshold)

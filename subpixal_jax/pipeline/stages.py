"""The stages of one alignment iteration, each callable on its own.

cutouts (:func:`image_cutouts`) -> displacements (:func:`measure_displacements`,
one compiled call per bucket for all images) -> point lists
(:func:`fit_inputs`) -> robust pre-clip (:func:`robust_inliers`) -> clipped
fits (:func:`fit_points`, one vmapped call) -> optional refinement through
the blot (:func:`refine_transforms`) -> joint solve (:func:`joint_corrections`)
-> corrected WCSs (:func:`corrected_wcs`, new objects). :func:`measure_and_fit`
composes them for a set of images.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy import optimize

from subpixal_jax.core.linfit import (
    FITGEOM_MIN_POINTS,
    FitStatus,
    LinearFit,
    fit_batch_arguments,
    iter_fit_kernel,
)
from subpixal_jax.core.measure import measure_batch, refine_batch
from subpixal_jax.core.refine import (
    FLAG_NOT_CONVERGED,
    prefer_refined,
    refine_transform,
)
from subpixal_jax.geometry.cutouts import (
    SourceCutouts,
    build_batches,
    create_cutouts,
    iter_batches,
    reference_points,
)
from subpixal_jax.geometry.skywcs import SkyWCS
from subpixal_jax.geometry.transform import Affine, RefinedFit, fit_affine
from subpixal_jax.io import result as res
from subpixal_jax.io.images import Exposure
from subpixal_jax.io.wcs import correct_wcs
from subpixal_jax.kernel_store import call_stored
from subpixal_jax.options import AlignOptions
from subpixal_jax.pipeline.sharding import shard_batch
from subpixal_jax.status import ImageOutcome, ImageStatus, SourceFlag, refine_flags

log = logging.getLogger(__name__)

#: Systematic floor (fit-frame pixels) added in quadrature to each source's
#: measured position error when weighting the fit. On the simulator the
#: errors of the brightest sources (sigma < 0.005 px) exceed their noise by
#: about 0.003-0.004 px in quadrature, and the floor keeps a few bright
#: sources from outweighing the rest of a small set. Measured on the default
#: simulated set (4 seeds, one pass from the true WCSs): floors of
#: 0.001-0.005 px leave 0.0048-0.0052 px RMS misregistration, 0.01 px 0.0054
#: and the former 0.02 px (with catalog weights) 0.0138; on a 160x320 chip
#: aligned against one other image in two iterations 0.003 px left 0.082 px,
#: 0.005 px 0.011 px. With the Lanczos reference, nine seeds end to end:
#: 0.002 px 0.0050 px RMS, 0.005 px 0.0052 (within the seeds' spread, and
#: small sets need the larger floor).
POSITION_ERROR_FLOOR = 0.005

#: The floor with ``weighting='catalog'``: without it the brightest source's
#: weight ``1/pos_std²`` can exceed the median by 10⁴ and one imperfect
#: measurement then decides the whole fit.
CATALOG_ERROR_FLOOR = 0.02

#: Clipping limit of :func:`robust_inliers`, in scaled median absolute
#: normalised residuals (``weighting='measured'``).
ROBUST_CLIP = 3.0
#: The same for ``weighting='catalog'``, in plain residuals.
CATALOG_CLIP = 4.0

#: Residuals (fit-frame px) that :func:`robust_inliers` never clips, so that
#: noiseless or nearly perfect point lists keep their points.
ROBUST_MIN_DISTANCE = 0.01

#: Point lists are padded to a multiple of this for the vmapped fit.
FIT_POINT_STEP = 256


@dataclasses.dataclass(frozen=True)
class Measured:
    """Displacements of one image's cutouts, in cutout order."""

    dxdy: np.ndarray
    sigma: np.ndarray
    flags: np.ndarray
    blots: list[np.ndarray | None]


class Points(NamedTuple):
    """One image's point lists for the fit (fit-frame pixels, 0-based)."""

    xy: np.ndarray
    uv: np.ndarray
    weight: np.ndarray
    good: np.ndarray


@dataclasses.dataclass(frozen=True)
class CatalogState:
    """The catalog the loop measures: usable source boxes and segmentation."""

    primaries: list
    segmentation: object


def image_cutouts(
    i: int,
    resample,
    catalog_state: CatalogState,
    options: AlignOptions,
    exclude: frozenset[int] | set[int],
) -> list[SourceCutouts]:
    """Cutouts of image ``i`` against a reference without it (and ``exclude``).

    The leave-one-out reference is computed only inside the reference boxes
    the cutouts read (`Resample.leave_out_reader`), not on the full frame.
    """
    exposure: Exposure = resample.exposures[i]
    return create_cutouts(
        catalog_state.primaries,
        catalog_state.segmentation,
        resample.leave_out_reader([i, *exclude]),
        None,
        resample.output_wcs,
        exposure,
        sky=resample.sky[i],
        combine_seg_mask=options.combine_seg_mask,
    )


def _refined(batch, found, interp):
    """Refinement of one batch: displacements, errors and flags as numpy.

    Sources too faint to trust their refinement keep the cross-correlation's
    answer (`prefer_refined`).
    """
    refined = call_stored(refine_batch, batch, found.dxdy, interp=interp)
    flags = np.asarray(refined.flags).astype(np.int64)
    ok = (flags & ~FLAG_NOT_CONVERGED) == 0
    ok &= np.all(np.isfinite(np.asarray(refined.dxdy)), axis=1)
    dxdy, sigma = prefer_refined(found.dxdy, found.sigma, refined)
    dxdy = np.where(ok[:, None], dxdy, np.nan)
    sigma = np.where(ok[:, None], sigma, np.nan)
    failed = np.asarray(found.flags).astype(np.int64) | refine_flags(flags)
    return dxdy, sigma, np.where(ok, 0, failed | SourceFlag.REFINE_FAILED)


def reference_noise_ratios(
    exptimes: Sequence[float],
    indices: Sequence[int],
    exclude: frozenset[int] | set[int],
) -> list[float]:
    """Noise variance of each image's reference relative to the image's own.

    The reference of image ``i`` is the exposure-time weighted drizzle of
    the others (not ``exclude``): its noise variance, in the image's units,
    is about ``t_i / sum(t_j)`` of the image's (exact for Poisson noise).
    It adds to the error of every displacement measured against it.
    """
    out = []
    for i in indices:
        total = sum(t for j, t in enumerate(exptimes) if j != i and j not in exclude)
        out.append(float(exptimes[i]) / total if total > 0 else 0.0)
    return out


def _with_reference_noise(batch, index, owner, reference_noise):
    """``batch`` with its pixel variances scaled by ``1 + ratio`` of each source."""
    factor = np.ones(len(index))
    real = index >= 0
    factor[real] += np.asarray(reference_noise, float)[owner[index[real]]]
    variance = np.asarray(batch.variance)
    return batch._replace(
        variance=(variance * factor[:, None, None]).astype(variance.dtype)
    )


def measure_displacements(
    cutouts: Sequence[Sequence[SourceCutouts]],
    *,
    cc_type: str = "NCC",
    interp: str = "poly5",
    search_radius: int | None = None,
    keep_blots: bool = False,
    refine: bool = False,
    peak_fit: str = "quadratic",
    reference_noise: Sequence[float] | None = None,
) -> list[Measured]:
    """Measure every source of every image in one compiled call per bucket.

    Parameters
    ----------
    cutouts : sequence of sequence of SourceCutouts
        Per image, its source cutouts.
    cc_type, interp, search_radius, peak_fit
        See :class:`~subpixal_jax.options.AlignOptions`.
    keep_blots : bool, optional
        Keep the four blots of every source (memory-hungry; diagnostics).
    refine : bool, optional
        Refine every displacement by least squares through the blot,
        starting from the cross-correlation answer; its errors come from the
        Fisher information. A source whose refinement fails keeps its
        cross-correlation flags plus ``SourceFlag.REFINE_FAILED`` and the
        refinement's own bits.
    reference_noise : sequence of float, optional
        Per image, the noise variance of its reference relative to its own
        (:func:`reference_noise_ratios`); the errors ``sigma`` then count
        both. Default 0 (the exposure's noise only).

    Returns
    -------
    list of Measured
        Per image, the displacements, their errors and
        :class:`~subpixal_jax.status.SourceFlag` bits.
    """
    flat = [c for per_image in cutouts for c in per_image]
    owner = np.concatenate(
        [np.full(len(per_image), i, dtype=int) for i, per_image in enumerate(cutouts)]
        or [np.zeros(0, dtype=int)]
    )
    n = len(flat)
    dxdy = np.full((n, 2), np.nan)
    sigma = np.full((n, 2), np.nan)
    flags = np.zeros(n, dtype=np.int64)
    blots: list[np.ndarray | None] = [None] * n
    with jax.enable_x64(True):
        # One padded batch alive at a time (they are larger than the cutouts).
        for batch, index in iter_batches(flat, owner) if n else []:
            if reference_noise is not None:
                batch = _with_reference_noise(batch, index, owner, reference_noise)
            # One device: a plain transfer; several: split the sources.
            batch = shard_batch(batch)
            found, batch_blots = call_stored(
                measure_batch,
                batch,
                interp=interp,
                cc_type=cc_type,
                search_radius=search_radius,
                peak_fit=peak_fit,
            )
            if refine:
                found_dxdy, found_sigma, found_flags = _refined(batch, found, interp)
            else:
                found_dxdy = np.asarray(found.dxdy)
                found_sigma = np.asarray(found.sigma)
                found_flags = np.asarray(found.flags).astype(np.int64)
            real = index >= 0
            rows = index[real]
            dxdy[rows] = found_dxdy[real]
            sigma[rows] = found_sigma[real]
            flags[rows] = found_flags[real]
            if keep_blots:
                batch_blots = np.asarray(batch_blots)
                for k, row in zip(np.flatnonzero(real), rows, strict=True):
                    ny, nx = flat[row].image.shape
                    blots[row] = batch_blots[k, :, :ny, :nx]
    bad = ~np.all(np.isfinite(dxdy), axis=1)
    flags[bad & (flags == 0)] |= SourceFlag.NOT_FINITE
    return [
        Measured(
            dxdy[owner == i],
            sigma[owner == i],
            flags[owner == i],
            [b for b, s in zip(blots, owner == i, strict=True) if s],
        )
        for i in range(len(cutouts))
    ]


def fit_points(
    points: Sequence[Points], center: np.ndarray, options: AlignOptions
) -> list[LinearFit]:
    """Fit every image's point lists in one vmapped, compiled call.

    Parameters
    ----------
    points : sequence of Points
        Per image: predicted and measured positions, weights and the mask of
        usable points.
    center : ndarray, shape (2,)
        Rotation/scale centre (fit-frame pixels, 0-based).
    options : AlignOptions
        Fit geometry and clipping.

    Returns
    -------
    list of LinearFit
        Per image, the fit as numpy values (``resids`` and ``fitmask`` cut
        back to the image's real point count).
    """
    # Fixed steps of points keep the fit's compiled shapes few: one per 256.
    n_max = max((len(p.xy) for p in points), default=0)
    n_pad = FIT_POINT_STEP * max(1, -(-n_max // FIT_POINT_STEP))
    b = len(points)
    xy = np.zeros((b, n_pad, 2))
    uv = np.zeros((b, n_pad, 2))
    w = np.zeros((b, n_pad))
    mask = np.zeros((b, n_pad), dtype=bool)
    for i, p in enumerate(points):
        m = len(p.xy)
        finite = np.all(np.isfinite(p.xy), axis=1) & np.all(np.isfinite(p.uv), axis=1)
        ok = p.good & finite
        xy[i, :m] = np.where(ok[:, None], p.xy, 0.0)
        uv[i, :m] = np.where(ok[:, None], p.uv, 0.0)
        w[i, :m] = np.where(ok, p.weight, 0.0)
        mask[i, :m] = ok
    with jax.enable_x64(True):
        # The clipping options are traced arguments of the stored kernel: the
        # trial fit (nclip 0) and the clipped ones share one compiled kernel.
        arguments = fit_batch_arguments(
            xy,
            uv,
            w,
            mask,
            np.broadcast_to(center, (b, 2)),
            nclip=options.nclip,
            sigma=options.sigma,
            sigma_stat=options.sigma_stat,
            clip_normalized=options.clip_normalized,
        )
        fit = call_stored(iter_fit_kernel, *arguments, fitgeom=options.fitgeom)
        fields = {k: np.asarray(v) for k, v in fit._asdict().items()}
    per_point = ("resids", "fitmask")
    return [
        LinearFit(
            **{
                k: v[i, : len(p.xy)] if k in per_point else v[i]
                for k, v in fields.items()
            }
        )
        for i, p in enumerate(points)
    ]


def fit_weights(
    cuts: Sequence[SourceCutouts],
    meas: Measured,
    options: AlignOptions,
    pixel_ratio: float = 1.0,
) -> np.ndarray:
    """Per-source fit weights, ``1 / (position variance + floor²)``.

    The position variance is the measurement's own (its ``sigma``: the
    exposure's noise propagated through the peak or the refinement's
    Fisher error), converted to fit-frame pixels by ``pixel_ratio`` (image
    over fit-frame pixel size); a source without one gets weight 0.
    """
    if not options.use_weights:
        return np.ones(len(cuts))
    if options.weighting == "catalog":
        return _catalog_weights(cuts, meas, options)
    sigma = np.asarray(meas.sigma, float) * pixel_ratio
    finite = np.all(np.isfinite(sigma), axis=1)
    variance = np.where(
        finite, np.mean(np.where(finite[:, None], sigma, 0) ** 2, 1), np.inf
    )
    return 1.0 / (variance + POSITION_ERROR_FLOOR**2)


def _catalog_weights(
    cuts: Sequence[SourceCutouts], meas: Measured, options: AlignOptions
) -> np.ndarray:
    """Weights from the catalog's position errors (refined: the Fisher errors)."""
    if options.refine == "sources":
        variance = np.nanmean(meas.sigma**2, axis=1)
        variance = np.where(np.isfinite(variance), variance, np.inf)
    elif any(c.weight is None for c in cuts):
        return np.ones(len(cuts))
    else:
        catalog = np.array([c.weight for c in cuts], dtype=float)
        positive = catalog > 0
        variance = np.where(positive, 1.0 / np.where(positive, catalog, 1.0), np.inf)
    return 1.0 / (variance + CATALOG_ERROR_FLOOR**2)


def residuals(fit: LinearFit, points: Points) -> np.ndarray:
    """``xy - T(uv)`` for every point, ``T`` the fitted transform."""
    return points.xy - fit_affine(fit).apply(points.uv)


def robust_inliers(
    points: Sequence[Points],
    center: np.ndarray,
    options: AlignOptions,
    *,
    passes: int = 3,
    k: float = ROBUST_CLIP,
) -> list[Points]:
    """Drop gross outliers before the (non-robust) clipped fit.

    The tweakwcs-style clipping uses the fit's own RMS, which a few wild
    displacements inflate until nothing is clipped (cosmic rays or blends
    detected in the drizzled image give such points), and which does not
    see a bright source a few of its own errors off. A few passes clip at
    ``k`` times the scaled median absolute residual first; the first pass
    fits unweighted, the others weighted. The clipped fit then runs on the
    survivors.

    With measured weights the residuals are judged in units of each point's
    own error, so that bright and faint sources are judged alike (none
    closer than ``ROBUST_MIN_DISTANCE``), and each pass adds the image's
    excess error (:func:`excess_error`) to every point's: early iterations,
    whose reference is drizzled from misaligned images, then weigh the
    points nearly alike instead of trusting the bright ones' noise alone.
    The returned points carry those weights.
    """
    if not points:
        return list(points)
    trial = dataclasses.replace(options, nclip=0)
    masks = [p.good.copy() for p in points]
    measured = options.weighting == "measured"
    weights = [np.ones(len(p.xy)) for p in points]
    n_params = 2 * FITGEOM_MIN_POINTS[options.fitgeom]
    for _ in range(passes):
        trial_points = [
            p._replace(weight=w, good=mask)
            for p, w, mask in zip(points, weights, masks, strict=True)
        ]
        fits = fit_points(trial_points, center, trial)
        for i, (p, mask, fit) in enumerate(zip(points, masks, fits, strict=True)):
            if int(fit.status) != FitStatus.OK or not mask.any():
                continue
            distance = np.hypot(*residuals(fit, p).T)
            # The first pass judges plain residuals: before the excess error is
            # known, the bright sources' systematic errors look like outliers.
            keep = p.good & _robust_keep(distance, weights[i], mask, k, measured)
            if np.count_nonzero(keep) >= FITGEOM_MIN_POINTS[options.fitgeom]:
                mask[:] = keep
            if measured:
                extra = excess_error(distance, p.weight, mask, n_params)
                weights[i] = p.weight / (1.0 + extra**2 * p.weight)
    return [
        p._replace(weight=w if measured else p.weight, good=mask)
        for p, w, mask in zip(points, weights, masks, strict=True)
    ]


#: Normalised squared residuals above this count as this in
#: :func:`excess_error` (a pull of 3), so that a few wild points do not set
#: every point's error.
_EXCESS_CAP = 9.0
#: Expectation of ``min(chi2, cap)`` for a chi-square with 2 degrees of
#: freedom: ``2 (1 - exp(-cap / 2))``.
_EXCESS_EXPECTATION = 2.0 * (1.0 - np.exp(-_EXCESS_CAP / 2.0))


def excess_error(
    distance: np.ndarray, weight: np.ndarray, mask: np.ndarray, n_params: int
) -> float:
    """Return the error (fit-frame px, per axis) residuals show beyond the weights'.

    The smallest ``s`` for which the kept, weighted points' chi-square, each
    term ``distance² / (1/weight + s²)`` capped at :data:`_EXCESS_CAP`, is
    its expectation (per point that of a 2-degree-of-freedom variable so
    capped, less the fit's ``n_params`` degrees of freedom); 0 when the
    errors already explain the residuals. A sum, not a median: the bright
    sources, few but heavy, carry errors beyond their noise (0.01-0.015 px
    on the simulator where the noise says 0.005) that a median over the
    faint majority would not see; the cap keeps a few wild points (a
    refinement gone astray) from setting it.
    """
    use = mask & (weight > 0)
    n = np.count_nonzero(use)
    if 2 * n <= n_params:
        return 0.0
    expected = _EXCESS_EXPECTATION * (n - n_params / 2.0)
    d2, variance = distance[use] ** 2, 1.0 / weight[use]

    def excess(s: float) -> float:
        return (
            float(np.sum(np.minimum(d2 / (variance + s * s), _EXCESS_CAP))) - expected
        )

    if excess(0.0) <= 0.0:
        return 0.0
    # Here every term is below its expectation's share: a bracket.
    upper = 1.01 * float(np.sqrt(d2.max() * n / expected))
    return float(optimize.brentq(excess, 0.0, upper, xtol=1e-6))


def _robust_keep(distance, weight, mask, k: float, measured: bool) -> np.ndarray:
    """Points within ``k`` scaled median absolute residuals.

    Measured weights: residuals in units of each point's own error, none
    closer than ROBUST_MIN_DISTANCE clipped; catalog weights: plain
    residuals, the scale at least 0.05 px / k (the original pre-clip).
    """
    if measured:
        norm = distance * np.sqrt(weight)
        scale = 1.4826 * float(np.median(norm[mask]))
        return (norm < k * scale) | (distance < ROBUST_MIN_DISTANCE)
    scale = max(1.4826 * float(np.median(distance[mask])), 0.05 / CATALOG_CLIP)
    return distance < CATALOG_CLIP * scale


def fit_inputs(
    cuts: Sequence[SourceCutouts],
    meas: Measured,
    exposure: Exposure,
    wcslin: WCS,
    options: AlignOptions,
) -> Points:
    """Point lists of one image for the fit."""
    if not cuts:
        return Points(
            np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), np.zeros(0, bool)
        )
    xy, uv = reference_points(cuts, meas.dxdy, exposure, wcslin)
    ratio = _image_scale(exposure) / _frame_scale(wcslin)
    return Points(xy, uv, fit_weights(cuts, meas, options, ratio), meas.flags == 0)


def source_measurements(
    cuts: Sequence[SourceCutouts], meas: Measured, points: Points, fit: LinearFit
) -> res.SourceMeasurements:
    """Per-source record of one image's measurements and fit membership."""
    return res.SourceMeasurements(
        src_id=np.array([c.src_id for c in cuts]),
        extver=np.array([c.extver for c in cuts]),
        dxdy=meas.dxdy,
        sigma=meas.sigma,
        flags=meas.flags,
        xy=points.xy,
        uv=points.uv,
        weight=points.weight,
        fitmask=np.asarray(fit.fitmask, dtype=bool),
    )


def fit_outcome(fit: LinearFit, n_good: int, fitgeom: str) -> ImageOutcome:
    """SUCCESS, or FAILED with the reason (counts named)."""
    status = int(fit.status)
    if status == FitStatus.OK:
        return ImageOutcome(ImageStatus.SUCCESS)
    need = FITGEOM_MIN_POINTS[fitgeom]
    if n_good < need:
        reason = f"too few sources ({n_good} usable, {fitgeom} needs {need})"
    else:
        reason = f"fit status {status} with {n_good} usable sources"
    return ImageOutcome(ImageStatus.FAILED, reason)


def refine_transforms(
    cutouts: Sequence[Sequence[SourceCutouts]],
    fits: Sequence[LinearFit],
    outcomes: Sequence[ImageOutcome],
    center: np.ndarray,
    options: AlignOptions,
    reference_noise: Sequence[float] | None = None,
) -> list[RefinedFit | None]:
    """Refine each aligned image's fit through the blot (``refine='transform'``).

    All sources of an image go into one batch; the robust whole-transform
    optimisation of :func:`subpixal_jax.core.refine.refine_transform` starts
    from the clipped fit and uses only the sources the fit kept. The result
    is its own record (None where the image was not fitted or the refinement
    failed), never merged into the fit's fields. ``reference_noise`` (per
    image, :func:`reference_noise_ratios`) adds the reference's noise to the
    pixel variances: without it ``shift_err`` was 1.2x (a reference a third
    as noisy as the image) to 1.4x (as noisy) optimistic.
    """
    ratios = reference_noise if reference_noise is not None else [0.0] * len(fits)
    out: list[RefinedFit | None] = []
    for cuts, fit, outcome, ratio in zip(cutouts, fits, outcomes, ratios, strict=True):
        refined = _refine_one(cuts, fit, center, options, ratio) if outcome.ok else None
        out.append(refined)
    return out


def _refine_one(cuts, fit: LinearFit, center, options, ratio) -> RefinedFit | None:
    ((batch, index),) = build_batches(cuts, np.zeros(len(cuts), int), single=True)
    batch = _with_reference_noise(batch, index, np.zeros(len(cuts), int), [ratio])
    real = index >= 0
    keep = np.zeros(len(index), bool)
    keep[real] = np.asarray(fit.fitmask, bool)[index[real]]
    _, h, w = batch.image.shape
    origin = np.zeros((len(index), 2))
    origin[real] = np.array([cuts[i].ref_blc for i in index[real]], dtype=float)
    with jax.enable_x64(True):
        refined = refine_transform(
            batch.image[None],
            batch.variance[None],
            (batch.image_valid & batch.valid[:, None, None])[None],
            batch.ref[None],
            np.ones((1, *batch.ref.shape), bool),
            batch.pixmap[None, :, 0::2, 0::2][:, :, :h, :w],
            origin[None],
            batch.iscale[None],
            keep[None],
            np.asarray(center, float)[None],
            np.asarray(fit.matrix, float)[None],
            np.asarray(fit.shift, float)[None],
            fitgeom=options.fitgeom,
            interp=options.interp,
        )
    if int(refined.flags[0]) & ~FLAG_NOT_CONVERGED:
        log.warning("transform refinement failed; keeping the clipped fit")
        return None
    affine = Affine(refined.matrix[0], refined.shift[0], center)
    return RefinedFit.from_matrix(
        affine, refined.shift_err[0], refined.covariance[0], options.fitgeom
    )


def joint_corrections(
    indices: Sequence[int],
    outcomes: Sequence[ImageOutcome],
    corrections: Sequence[Affine],
    weights: Sequence[float],
    exclude: frozenset[int] | set[int],
) -> list[Affine]:
    """Turn the measured fits of one 'batch' iteration into joint corrections.

    Image ``i`` is measured against the weighted mean of the other images,
    so its fit ``d_i`` is ``p_i - sum_j w_ij p_j`` to first order, with
    ``p`` the images' own errors (6 affine parameters each, ``M - I`` and
    ``s``) and ``w_ij`` their drizzle weights among the others. Applying the
    fits as they are (the original's Jacobi iteration) converges only
    geometrically, at (n-2)/(n-1) per iteration when one image is held fixed.
    Solving the small linear system for ``p`` instead removes most of the
    error at once; the following iterations correct what the linear model
    misses. Images that are held fixed, skipped or failed keep ``p = 0``; when
    every image moves, the weighted mean correction is fixed at 0 (the
    relative alignment cannot constrain it).

    Parameters
    ----------
    indices : sequence of int
        The measured images.
    outcomes, corrections : sequence
        Per measured image, its outcome and its own fitted transform.
    weights : sequence of float
        Drizzle weight (exposure time) of every image of the set.
    exclude : set of int
        Images left out of the references (failed ones).
    """
    moving = [k for k, outcome in enumerate(outcomes) if outcome.ok]
    if not moving:
        return list(corrections)
    participants = [j for j in range(len(weights)) if j not in exclude]
    unknown = [indices[k] for k in moving]
    column = {img: n for n, img in enumerate(unknown)}
    a = np.eye(len(unknown))
    for row, img in enumerate(unknown):
        others = [j for j in participants if j != img]
        total = sum(weights[j] for j in others)
        for j in others:
            if j in column:
                a[row, column[j]] -= weights[j] / total
    d = np.array(
        [
            np.concatenate(
                [(corrections[k].matrix - np.eye(2)).ravel(), corrections[k].shift]
            )
            for k in moving
        ]
    )
    if len(unknown) == len(participants):
        gauge = np.array([[weights[j] for j in unknown]])
        a = np.vstack([a, gauge])
        d = np.vstack([d, np.zeros((1, d.shape[1]))])
    p = np.linalg.lstsq(a, d, rcond=None)[0]
    out = list(corrections)
    for row, k in enumerate(moving):
        center = corrections[k].center
        out[k] = Affine(np.eye(2) + p[row, :4].reshape(2, 2), p[row, 4:], center)
    return out


def corrected_wcs(
    before: Mapping[int, WCS], wcslin: WCS, correction: Affine, fitgeom: str
) -> dict[int, WCS]:
    """Return new WCS objects of every chip, corrected by ``correction``.

    FITS chips are corrected by :func:`subpixal_jax.io.wcs.correct_wcs` (CRVAL
    and CD; distortion kept); gWCS chips (:class:`subpixal_jax.io.jwst.SkyWCS`)
    get a tangent-plane correction the JWST pipeline reads.
    """
    out = {}
    for ext, wcs in before.items():
        args = (wcslin, correction.matrix, correction.shift)
        if isinstance(wcs, SkyWCS):
            out[ext] = wcs.corrected(*args, center=correction.center)
        else:
            out[ext] = correct_wcs(
                wcs, *args, center=correction.center, fitgeom=fitgeom
            )
    return out


def _frame_scale(wcslin: WCS) -> float:
    return float(np.mean(proj_plane_pixel_scales(wcslin)))


def _image_scale(exposure: Exposure) -> float:
    return float(np.mean(proj_plane_pixel_scales(exposure.chips[0].wcs.celestial)))


def irmse(fit: LinearFit, exposure: Exposure, wcslin: WCS) -> float:
    """Fit RMS converted from fit-frame pixels to image pixels."""
    return float(fit.rmse) * _frame_scale(wcslin) / _image_scale(exposure)


def _wcs_of(exposure: Exposure) -> dict[int, WCS]:
    return {chip.extver: chip.wcs for chip in exposure.chips}


def measure_and_fit(
    indices: Sequence[int],
    resample,
    catalog_state: CatalogState,
    wcslin: WCS,
    options: AlignOptions,
    exclude: frozenset[int] | set[int],
) -> list[res.ImageFit]:
    """Measure, fit and correct the images ``indices`` against their references.

    Returns one :class:`~subpixal_jax.io.result.ImageFit` per image with the
    corrected WCSs as new objects; nothing is applied to ``resample``.
    """
    center = np.asarray(wcslin.wcs.crpix, dtype=float) - 1.0
    cutouts = [
        image_cutouts(i, resample, catalog_state, options, exclude) for i in indices
    ]
    noise = reference_noise_ratios(
        [float(e.exptime) for e in resample.exposures], indices, exclude
    )
    measured = measure_displacements(
        cutouts,
        cc_type=options.cc_type,
        interp=options.interp,
        search_radius=options.search_radius,
        keep_blots=options.keep_diagnostics,
        refine=options.refine == "sources",
        peak_fit=options.peak_fit,
        reference_noise=noise,
    )
    points = robust_inliers(
        [
            fit_inputs(cuts, meas, resample.exposures[i], wcslin, options)
            for i, cuts, meas in zip(indices, cutouts, measured, strict=True)
        ],
        center,
        options,
    )
    fits = fit_points(points, center, options) if points else []
    outcomes = [
        fit_outcome(fit, int(np.count_nonzero(p.good)), options.fitgeom)
        if cuts
        else ImageOutcome(ImageStatus.SKIPPED, "no catalog source overlaps the image")
        for cuts, fit, p in zip(cutouts, fits, points, strict=True)
    ]
    refined = [None] * len(fits)
    if options.refine == "transform":
        refined = refine_transforms(cutouts, fits, outcomes, center, options, noise)
    corrections = [
        r.affine if r is not None else fit_affine(f)
        for f, r in zip(fits, refined, strict=True)
    ]
    if options.joint and options.wcsupdate == "batch":
        weights = [float(e.exptime) for e in resample.exposures]
        corrections = joint_corrections(
            indices, outcomes, corrections, weights, exclude
        )
    # A joint solution mixes the fits of several images, so it is a general
    # matrix even when each fit was not.
    fitgeom = "general" if options.joint else options.fitgeom
    results = []
    for i, cuts, meas, p, fit, outcome, correction, ref in zip(
        indices, cutouts, measured, points, fits, outcomes, corrections, refined,
        strict=True,
    ):  # fmt: skip
        exposure = resample.exposures[i]
        before = _wcs_of(exposure)
        if not cuts:
            results.append(
                res.ImageFit(
                    exposure.name, outcome, None, None, math.nan, before, before
                )
            )
            continue
        after = before
        if outcome.ok:
            after = corrected_wcs(before, wcslin, correction, fitgeom)
        extras = (
            {"cutouts": cuts, "blots": meas.blots} if options.keep_diagnostics else {}
        )
        results.append(
            res.ImageFit(
                exposure.name,
                outcome,
                fit,
                source_measurements(cuts, meas, p, fit),
                irmse(fit, exposure, wcslin),
                before,
                after,
                correction=correction if outcome.ok else None,
                refined=ref,
                extras=extras,
            )
        )
    return results

"""The alignment loop: reference, cutouts, kernels, fit and WCS correction.

Reproduces the iterative loop of the original ``subpixal.align.align_images``
(SPEC §1) with its bugs fixed (SPEC §9): every chip of a multi-chip exposure
contributes to one fit per exposure, ``wcslin`` is honoured, leave-one-out
references are exact and always contain every other image, a failed image is
skipped (and left out of the others' references) instead of aborting the
run, ``irmse`` is the RMS of the fit residuals, nothing is prompted or
written to the current directory, and files are changed only when asked,
atomically, with the old WCS archived.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from subpixal_jax import result as res
from subpixal_jax.core.batch import source_bucket
from subpixal_jax.core.interp import check_kind
from subpixal_jax.core.linfit import FITGEOM_MIN_POINTS, iter_linear_fit_batch
from subpixal_jax.core.measure import measure_batch, refine_batch
from subpixal_jax.core.refine import FLAG_NOT_CONVERGED, refine_transform
from subpixal_jax.cutouts import (
    SourceCutouts,
    build_batches,
    create_cutouts,
    create_primary_cutouts,
    reference_points,
)
from subpixal_jax.errors import AlignmentError
from subpixal_jax.images import Exposure
from subpixal_jax.sharding import shard_batch
from subpixal_jax.wcs import correct_wcs, update_exposure_wcs

log = logging.getLogger(__name__)

FITGEOMS = tuple(FITGEOM_MIN_POINTS)
CC_TYPES = ("CC", "NCC", "ZNCC")
WCSUPDATES = ("batch", "otf")
REFINES = (None, "sources", "transform")
HISTORIES = ("all", "last", None)


@dataclasses.dataclass(frozen=True)
class AlignOptions:
    """Validated options of :func:`align_images` (see there for meanings)."""

    fitgeom: str = "general"
    nclip: int = 3
    sigma: float = 3.0
    sigma_stat: str = "rmse"
    max_iterations: int = 10
    max_full_resamples: int = 1
    eps_shift: float = 0.003
    use_weights: bool = True
    cc_type: str = "NCC"
    interp: str = "poly5"
    wcsupdate: str = "batch"
    combine_seg_mask: bool = True
    history: str | None = "last"
    reference: int | None = None
    search_radius: int | None = None
    keep_diagnostics: bool = False
    cr_reject: bool = False
    joint: bool = True
    refine: str | None = None


def _parse_nmax(nmax) -> tuple[int, int]:
    if isinstance(nmax, bool):
        msg = f"nmax must be an int or a pair of ints, got {nmax!r}"
        raise TypeError(msg)
    if isinstance(nmax, int | np.integer):
        # The second full resample redoes cosmic-ray rejection and the
        # catalog once the first correction has aligned the images (what the
        # original's auto-switch did in practice, SPEC §1.2, §9.3).
        total = int(nmax)
        full = min(2, total)
    else:
        try:
            total, full = (int(v) for v in nmax)
        except (TypeError, ValueError):
            msg = "nmax must be an int or a pair (iterations, full resamples), "
            msg += f"got {nmax!r}"
            raise ValueError(msg) from None
    if total < 1 or full < 1 or full > total:
        msg = f"nmax must satisfy 1 <= full resamples <= iterations, got {nmax!r}"
        raise ValueError(msg)
    return total, full


def _parse_sigma(sigma) -> tuple[float, str]:
    if isinstance(sigma, tuple | list):
        if len(sigma) != 2 or sigma[1] not in ("rmse", "mae", "std"):
            msg = (
                f"sigma must be a number or (value, 'rmse'|'mae'|'std'), got {sigma!r}"
            )
            raise ValueError(msg)
        value, stat = float(sigma[0]), sigma[1]
    else:
        value, stat = float(sigma), "rmse"
    if not value > 0:
        msg = f"sigma must be positive, got {sigma!r}"
        raise ValueError(msg)
    return value, stat


def make_options(
    *,
    fitgeom="general",
    nclip=3,
    sigma=3.0,
    nmax=10,
    eps_shift=0.003,
    use_weights=True,
    cc_type="NCC",
    interp="poly5",
    wcsupdate="batch",
    combine_seg_mask=True,
    history="last",
    reference=None,
    search_radius=None,
    keep_diagnostics=False,
    cr_reject=False,
    joint=True,
    refine=None,
) -> AlignOptions:
    """Validate and normalise alignment options; raise ValueError on bad ones.

    Examples
    --------
    >>> make_options(fitgeom="RScale", nmax=(5, 2)).max_full_resamples
    2
    """
    geom = str(fitgeom).strip().lower()
    if geom not in FITGEOMS:
        msg = f"fitgeom must be one of {FITGEOMS}, got {fitgeom!r}"
        raise ValueError(msg)
    if isinstance(nclip, bool) or not isinstance(nclip, int | np.integer) or nclip < 0:
        msg = f"nclip must be a non-negative int, got {nclip!r}"
        raise ValueError(msg)
    sigma_value, sigma_stat = _parse_sigma(sigma)
    total, full = _parse_nmax(nmax)
    if not (isinstance(eps_shift, int | float) and eps_shift > 0):
        msg = f"eps_shift must be a positive number, got {eps_shift!r}"
        raise ValueError(msg)
    cc = str(cc_type).strip().upper()
    if cc not in CC_TYPES:
        msg = f"cc_type must be one of {CC_TYPES}, got {cc_type!r}"
        raise ValueError(msg)
    update = str(wcsupdate).strip().lower()
    if update not in WCSUPDATES:
        msg = f"wcsupdate must be one of {WCSUPDATES}, got {wcsupdate!r}"
        raise ValueError(msg)
    check_kind(interp, name="interp")
    if refine not in REFINES:
        msg = f"refine must be one of {REFINES}, got {refine!r}"
        raise ValueError(msg)
    if history not in HISTORIES:
        msg = f"history must be one of {HISTORIES}, got {history!r}"
        raise ValueError(msg)
    if search_radius is not None and int(search_radius) < 1:
        msg = f"search_radius must be a positive int or None, got {search_radius!r}"
        raise ValueError(msg)
    return AlignOptions(
        fitgeom=geom,
        nclip=int(nclip),
        sigma=sigma_value,
        sigma_stat=sigma_stat,
        max_iterations=total,
        max_full_resamples=full,
        eps_shift=float(eps_shift),
        use_weights=bool(use_weights),
        cc_type=cc,
        interp=interp,
        wcsupdate=update,
        combine_seg_mask=bool(combine_seg_mask),
        history=history,
        reference=reference,
        search_radius=None if search_radius is None else int(search_radius),
        keep_diagnostics=bool(keep_diagnostics),
        cr_reject=bool(cr_reject),
        joint=bool(joint),
        refine=refine,
    )


# --------------------------------------------------------------------------
# Measurement and fit of a set of images (one compiled pass per bucket)
# --------------------------------------------------------------------------


#: Per-source flag: the least-squares refinement failed for this source.
FLAG_REFINE_FAILED = 1 << 17


@dataclasses.dataclass
class _Measured:
    """Displacements of one image's cutouts, in cutout order."""

    dxdy: np.ndarray
    sigma: np.ndarray
    flags: np.ndarray
    blots: list[np.ndarray | None]


def measure_displacements(
    cutouts: Sequence[Sequence[SourceCutouts]],
    *,
    cc_type: str = "NCC",
    interp: str = "poly5",
    search_radius: int | None = None,
    keep_blots: bool = False,
    refine: bool = False,
) -> list[_Measured]:
    """Measure every source of every image in one compiled call per bucket.

    Parameters
    ----------
    cutouts : sequence of sequence of SourceCutouts
        Per image, its source cutouts.
    cc_type, interp, search_radius
        See :func:`align_images`.
    keep_blots : bool, optional
        Keep the four blots of every source (memory-hungry; diagnostics).
    refine : bool, optional
        Refine every displacement by least squares through the blot,
        starting from the cross-correlation answer; its errors come from the
        Fisher information. A source whose refinement fails keeps its
        cross-correlation flags plus `FLAG_REFINE_FAILED`.

    Returns
    -------
    list of _Measured
        Per image, the displacements, their errors and flags.
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
    if n:
        with jax.enable_x64(True):
            for batch, index in build_batches(flat, owner):
                # One device: a plain transfer; several: split the sources.
                batch = shard_batch(batch)
                found, batch_blots = measure_batch(
                    batch,
                    interp=interp,
                    cc_type=cc_type,
                    search_radius=search_radius,
                )
                real = index >= 0
                rows = index[real]
                found_dxdy = np.asarray(found.dxdy)
                found_sigma = np.asarray(found.sigma)
                found_flags = np.asarray(found.flags).astype(np.int64)
                if refine:
                    refined = refine_batch(batch, found.dxdy, interp=interp)
                    ok = (np.asarray(refined.flags) & ~FLAG_NOT_CONVERGED) == 0
                    ok &= np.all(np.isfinite(np.asarray(refined.dxdy)), axis=1)
                    found_dxdy = np.where(ok[:, None], np.asarray(refined.dxdy), np.nan)
                    found_sigma = np.where(
                        ok[:, None], np.asarray(refined.sigma), np.nan
                    )
                    found_flags = np.where(ok, 0, found_flags | FLAG_REFINE_FAILED)
                dxdy[rows] = found_dxdy[real]
                sigma[rows] = found_sigma[real]
                flags[rows] = found_flags[real]
                if keep_blots:
                    batch_blots = np.asarray(batch_blots)
                    for k, row in zip(np.flatnonzero(real), rows, strict=True):
                        ny, nx = flat[row].image.shape
                        blots[row] = batch_blots[k, :, :ny, :nx]
    bad = ~np.all(np.isfinite(dxdy), axis=1)
    flags[bad & (flags == 0)] |= res.FLAG_NOT_FINITE
    out = []
    for i in range(len(cutouts)):
        sel = owner == i
        out.append(
            _Measured(
                dxdy[sel],
                sigma[sel],
                flags[sel],
                [b for b, s in zip(blots, sel, strict=True) if s],
            )
        )
    return out


def fit_points(
    points: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    center: np.ndarray,
    options: AlignOptions,
) -> list[dict[str, Any]]:
    """Fit every image's point lists in one vmapped, compiled call.

    Parameters
    ----------
    points : sequence of (xy, uv, weight, good)
        Per image: predicted positions, measured positions (fit-frame pixels,
        0-based), weights and the mask of usable points.
    center : ndarray, shape (2,)
        Rotation/scale centre (fit-frame pixels, 0-based).
    options : AlignOptions
        Fit geometry and clipping.

    Returns
    -------
    list of dict
        Per image, the fit fields as numpy values (points cut back to the
        image's real count) plus ``status``.
    """
    n_pad = source_bucket(max((len(p[0]) for p in points), default=0))
    b = len(points)
    xy = np.zeros((b, n_pad, 2))
    uv = np.zeros((b, n_pad, 2))
    w = np.zeros((b, n_pad))
    mask = np.zeros((b, n_pad), dtype=bool)
    for i, (pxy, puv, pw, good) in enumerate(points):
        m = len(pxy)
        ok = good & np.all(np.isfinite(pxy), axis=1) & np.all(np.isfinite(puv), axis=1)
        xy[i, :m] = np.where(ok[:, None], pxy, 0.0)
        uv[i, :m] = np.where(ok[:, None], puv, 0.0)
        w[i, :m] = np.where(ok, pw, 0.0)
        mask[i, :m] = ok
    with jax.enable_x64(True):
        fit = iter_linear_fit_batch(
            xy,
            uv,
            w,
            mask,
            np.broadcast_to(center, (b, 2)),
            fitgeom=options.fitgeom,
            nclip=options.nclip,
            sigma=options.sigma,
            sigma_stat=options.sigma_stat,
        )
        fields = {k: np.asarray(v) for k, v in fit._asdict().items()}
    out = []
    for i, (pxy, *_rest) in enumerate(points):
        m = len(pxy)
        one = {}
        for key, value in fields.items():
            one[key] = value[i, :m] if key in ("resids", "fitmask") else value[i]
        out.append(one)
    return out


#: Systematic floor (reference pixels) added in quadrature to the catalog's
#: position error when weighting the fit: without it the brightest source's
#: weight ``1/pos_std²`` can exceed the median by 10⁴ and one imperfect
#: measurement then decides the whole fit.
POSITION_ERROR_FLOOR = 0.02


def _fit_weights(
    cuts: Sequence[SourceCutouts], meas, options: AlignOptions
) -> np.ndarray:
    """Per-source fit weights, ``1 / (position variance + floor²)``.

    The position variance is the refinement's own (Fisher) error when the
    displacements were refined, otherwise the catalog's ``1/weight``.
    """
    if not options.use_weights:
        return np.ones(len(cuts))
    if options.refine == "sources":
        variance = np.nanmean(meas.sigma**2, axis=1)
        variance = np.where(np.isfinite(variance), variance, np.inf)
    elif any(c.weight is None for c in cuts):
        return np.ones(len(cuts))
    else:
        catalog = np.array([c.weight for c in cuts], dtype=float)
        positive = catalog > 0
        variance = np.where(positive, 1.0 / np.where(positive, catalog, 1.0), np.inf)
    return 1.0 / (variance + POSITION_ERROR_FLOOR**2)


def _residuals(
    fit: dict[str, Any], xy: np.ndarray, uv: np.ndarray, center
) -> np.ndarray:
    """``xy - (M (uv - c) + c + s)`` for every point."""
    model = (uv - center) @ np.asarray(fit["matrix"]).T + center + fit["shift"]
    return xy - model


def _robust_inliers(points, center, options: AlignOptions, *, passes=3, k=4.0):
    """Drop gross outliers before the (non-robust) clipped fit.

    The tweakwcs-style clipping of SPEC §6.4 uses the fit's own RMS, which a
    few wild displacements inflate until nothing is clipped (cosmic rays or
    blends detected in the drizzled image give such points). A few unweighted
    passes clip at ``k`` times the scaled median absolute residual (at least
    0.05 px) first; the clipped fit then runs on the survivors.
    """
    if not points:
        return points
    trial = dataclasses.replace(options, nclip=0)
    masks = [good.copy() for (_, _, _, good) in points]
    for _ in range(passes):
        unweighted = [
            (xy, uv, np.ones(len(xy)), mask)
            for (xy, uv, _, _), mask in zip(points, masks, strict=True)
        ]
        fits = fit_points(unweighted, center, trial)
        for (xy, uv, _, good), mask, fit in zip(points, masks, fits, strict=True):
            if int(fit["status"]) != 0 or not mask.any():
                continue
            norm = np.hypot(*_residuals(fit, xy, uv, center).T)
            scale = max(1.4826 * float(np.median(norm[mask])), 0.05 / k)
            keep = good & (norm < k * scale)
            if np.count_nonzero(keep) >= FITGEOM_MIN_POINTS[options.fitgeom]:
                mask[:] = keep
    return [
        (xy, uv, w, mask) for (xy, uv, w, _), mask in zip(points, masks, strict=True)
    ]


def _fit_inputs(cuts, meas, exposure, wcslin, options):
    """Point lists ``(xy, uv, weight, good)`` of one image for the fit."""
    if not cuts:
        return np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), np.zeros(0, bool)
    xy, uv = reference_points(cuts, meas.dxdy, exposure, wcslin)
    return xy, uv, _fit_weights(cuts, meas, options), meas.flags == 0


def find_linear_fit(
    cutouts: Sequence[SourceCutouts],
    exposure: Exposure,
    wcslin: WCS,
    *,
    fitgeom: str = "general",
    nclip: int = 3,
    sigma=3.0,
    use_weights: bool = True,
    cc_type: str = "NCC",
    interp: str = "poly5",
    refine: str | None = None,
) -> tuple[dict[str, Any], res.SourceMeasurements]:
    """Measure one image's source displacements and fit a linear correction.

    The single-image step of :func:`align_images` (the original's
    ``find_linear_fit``): blots, cross-correlation and peak fit for every
    cutout in one compiled call, point lists in the ``wcslin`` frame (SPEC
    §6.1), robust pre-clipping, then the clipped fit.

    Parameters
    ----------
    cutouts : sequence of SourceCutouts
        The image's source cutouts (all chips), from
        :func:`subpixal_jax.cutouts.create_cutouts`.
    exposure : Exposure
        The image (its chips' current WCSs map the cutouts to the sky).
    wcslin : astropy.wcs.WCS
        Undistorted frame of the fit; the centre is its CRPIX.
    fitgeom, nclip, sigma, use_weights, cc_type, interp, refine
        As in :func:`align_images`.

    Returns
    -------
    fit : dict
        The fit's fields (:class:`subpixal_jax.core.linfit.LinearFit`) as
        numpy values; ``status`` 0 on success.
    sources : SourceMeasurements
        Per-source displacements, flags and point lists.
    """
    options = make_options(
        fitgeom=fitgeom,
        nclip=nclip,
        sigma=sigma,
        use_weights=use_weights,
        cc_type=cc_type,
        interp=interp,
        refine=refine,
    )
    (meas,) = measure_displacements(
        [cutouts], cc_type=cc_type, interp=interp, refine=refine == "sources"
    )
    center = np.asarray(wcslin.wcs.crpix, dtype=float) - 1.0
    points = _robust_inliers(
        [_fit_inputs(cutouts, meas, exposure, wcslin, options)], center, options
    )
    (fit,) = fit_points(points, center, options)
    return fit, _measurements(cutouts, meas, points[0], fit)


def _measurements(cuts, meas, points, fit) -> res.SourceMeasurements:
    xy, uv, weight, _ = points
    return res.SourceMeasurements(
        src_id=np.array([c.src_id for c in cuts]),
        extver=np.array([c.extver for c in cuts]),
        dxdy=meas.dxdy,
        sigma=meas.sigma,
        flags=meas.flags,
        xy=xy,
        uv=uv,
        weight=weight,
        fitmask=np.asarray(fit["fitmask"], dtype=bool),
    )


def _fit_status(fit: dict[str, Any], n_good: int, fitgeom: str) -> str:
    status = int(fit["status"])
    if status == 0:
        return res.SUCCESS
    need = FITGEOM_MIN_POINTS[fitgeom]
    if n_good < need:
        return (
            f"{res.FAILED}: too few sources ({n_good} usable, {fitgeom} needs {need})"
        )
    return f"{res.FAILED}: fit status {status} with {n_good} usable sources"


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


def _image_cutouts(i, resample, catalog_state, ref_wcs, options, exclude):
    exposure: Exposure = resample.exposures[i]
    ref_sci, ref_wht = resample.leave_out([i, *exclude])
    primaries, segmentation = catalog_state
    return create_cutouts(
        primaries,
        segmentation,
        ref_sci,
        ref_wht > 0,
        ref_wcs,
        exposure,
        sky=resample.sky[i],
        combine_seg_mask=options.combine_seg_mask,
    )


def _align_set(
    indices: Sequence[int],
    resample,
    catalog_state,
    wcslin: WCS,
    options: AlignOptions,
    exclude: set[int],
) -> list[res.ImageFit]:
    """Measure, fit and correct the images ``indices`` against their references."""
    ref_wcs = resample.output_wcs
    cutouts = [
        _image_cutouts(i, resample, catalog_state, ref_wcs, options, exclude)
        for i in indices
    ]
    measured = measure_displacements(
        cutouts,
        cc_type=options.cc_type,
        interp=options.interp,
        search_radius=options.search_radius,
        keep_blots=options.keep_diagnostics,
        refine=options.refine == "sources",
    )
    points = [
        _fit_inputs(cuts, meas, resample.exposures[i], wcslin, options)
        for i, cuts, meas in zip(indices, cutouts, measured, strict=True)
    ]
    center = np.asarray(wcslin.wcs.crpix, dtype=float) - 1.0
    points = _robust_inliers(points, center, options)
    fits = fit_points(points, center, options) if points else []

    statuses = [
        _fit_status(fit, int(np.count_nonzero(good)), options.fitgeom)
        if cuts
        else f"{res.SKIPPED}: no catalog source overlaps the image"
        for cuts, fit, (_, _, _, good) in zip(cutouts, fits, points, strict=True)
    ]
    if options.refine == "transform":
        fits = _refine_transforms(cutouts, fits, statuses, center, options)
    corrections = [(fit["matrix"], fit["shift"]) for fit in fits]
    if options.joint and options.wcsupdate == "batch":
        corrections = _joint_corrections(
            indices, statuses, corrections, resample, exclude
        )

    results = []
    for i, cuts, meas, (xy, uv, weight, _), fit, status, (matrix, shift) in zip(
        indices, cutouts, measured, points, fits, statuses, corrections, strict=True
    ):
        exposure = resample.exposures[i]
        before = {chip.extver: chip.wcs for chip in exposure.chips}
        if not cuts:
            results.append(
                res.ImageFit(
                    exposure.name, status, None, None, math.nan, before, before
                )
            )
            continue
        after = before
        if status == res.SUCCESS:
            after = {
                ext: correct_wcs(
                    wcs,
                    wcslin,
                    matrix,
                    shift,
                    center=center,
                    # A joint solution mixes the fits of several images, so it
                    # is a general matrix even when each fit was not.
                    fitgeom="general" if options.joint else options.fitgeom,
                )
                for ext, wcs in before.items()
            }
        sources = _measurements(cuts, meas, (xy, uv, weight, None), fit)
        extras = {}
        if options.keep_diagnostics:
            extras = {"cutouts": cuts, "blots": meas.blots}
        results.append(
            res.ImageFit(
                exposure.name,
                status,
                {k: v for k, v in fit.items() if k not in ("resids", "fitmask")}
                | {"applied_matrix": matrix, "applied_shift": shift},
                sources,
                _irmse(fit, exposure, wcslin),
                before,
                after,
                extras,
            )
        )
    return results


def _same_frame(a: WCS, b: WCS) -> bool:
    return a is b or a.to_header_string() == b.to_header_string()


def _refine_transforms(cutouts, fits, statuses, center, options):
    """Refine each aligned image's fit through the blot (``refine='transform'``).

    All sources of an image go into one batch; the robust whole-transform
    optimisation of :func:`subpixal_jax.core.refine.refine_transform` starts
    from the clipped fit and uses only the sources the fit kept. The refined
    matrix and shift replace the fit's (the fit's statistics are kept).
    """
    out = list(fits)
    for k, (cuts, fit, status) in enumerate(zip(cutouts, fits, statuses, strict=True)):
        if status != res.SUCCESS:
            continue
        ((batch, index),) = build_batches(cuts, np.zeros(len(cuts), int), single=True)
        real = index >= 0
        keep = np.zeros(len(index), bool)
        keep[real] = np.asarray(fit["fitmask"], bool)[index[real]]
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
                np.asarray(fit["matrix"], float)[None],
                np.asarray(fit["shift"], float)[None],
                fitgeom=options.fitgeom,
                interp=options.interp,
            )
        if int(refined.flags[0]) & ~FLAG_NOT_CONVERGED:
            log.warning("transform refinement failed; keeping the clipped fit")
            continue
        matrix = np.asarray(refined.matrix[0])
        # Rotations and scales of the refined matrix (tweakwcs conventions).
        out[k] = dict(fit) | {
            "matrix": matrix,
            "shift": np.asarray(refined.shift[0]),
            "shift_err": np.asarray(refined.shift_err[0]),
            "rot": np.degrees(
                [
                    np.arctan2(-matrix[1, 0], matrix[0, 0]),
                    np.arctan2(matrix[0, 1], matrix[1, 1]),
                ]
            ),
            "scale": np.hypot(matrix[0], matrix[1]),
        }
    return out


def _joint_corrections(indices, statuses, corrections, resample, exclude):
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
    """
    moving = [k for k, st in enumerate(statuses) if st == res.SUCCESS]
    if not moving:
        return corrections
    participants = [j for j in range(len(resample.exposures)) if j not in exclude]
    weight = {j: float(resample.exposures[j].exptime) for j in participants}
    unknown = [indices[k] for k in moving]
    column = {img: n for n, img in enumerate(unknown)}
    a = np.eye(len(unknown))
    for row, img in enumerate(unknown):
        others = [j for j in participants if j != img]
        total = sum(weight[j] for j in others)
        for j in others:
            if j in column:
                a[row, column[j]] -= weight[j] / total
    d = np.array(
        [
            np.concatenate(
                [
                    (np.asarray(corrections[k][0]) - np.eye(2)).ravel(),
                    np.asarray(corrections[k][1]),
                ]
            )
            for k in moving
        ]
    )
    if len(unknown) == len(participants):
        gauge = np.array([[weight[j] for j in unknown]])
        a = np.vstack([a, gauge])
        d = np.vstack([d, np.zeros((1, d.shape[1]))])
    p = np.linalg.lstsq(a, d, rcond=None)[0]
    out = list(corrections)
    for row, k in enumerate(moving):
        out[k] = (np.eye(2) + p[row, :4].reshape(2, 2), p[row, 4:])
    return out


def _irmse(fit, exposure, wcslin) -> float:
    """Fit RMS converted from fit-frame pixels to image pixels."""
    frame_scale = np.mean(proj_plane_pixel_scales(wcslin))
    image_scale = np.mean(proj_plane_pixel_scales(exposure.chips[0].wcs.celestial))
    return float(fit["rmse"]) * float(frame_scale / image_scale)


def _apply(resample, i: int, image: res.ImageFit, totals: dict) -> None:
    """Give image ``i`` its corrected WCS and compose its total correction."""
    if not image.ok:
        return
    resample.update_wcs(i, image.wcs_after)
    matrix = np.asarray(image.fit["applied_matrix"], dtype=float)
    shift = np.asarray(image.fit["applied_shift"], dtype=float)
    old_matrix, old_shift = totals.get(i, (np.eye(2), np.zeros(2)))
    # The corrected WCS is L (T_old T_new)^-1 L^-1 W_0: compose T_old after T_new.
    totals[i] = (old_matrix @ matrix, old_matrix @ shift + old_shift)


def align_images(
    catalog,
    resample,
    wcslin: WCS | None = None,
    *,
    fitgeom: str = "general",
    nclip: int = 3,
    sigma=3.0,
    nmax=10,
    eps_shift: float = 0.003,
    use_weights: bool = True,
    cc_type: str = "NCC",
    wcsupdate: str = "batch",
    combine_seg_mask: bool = True,
    on_iteration: Callable[[res.IterationResult], bool | None] | None = None,
    history: str | None = "last",
    reference: int | None = None,
    interp: str = "poly5",
    search_radius: int | None = None,
    keep_diagnostics: bool = False,
    cr_reject: bool | None = None,
    joint: bool = True,
    refine: str | None = None,
    throw: bool = False,
    progress: bool = False,
) -> res.AlignmentResult:
    """Align images by sub-pixel cross-correlation and correct their WCS.

    Each iteration drizzles the images onto a fixed, undistorted grid, finds
    sources in the combined image, and for every source of every image
    cross-correlates the image cutout with four half-pixel blots of a
    reference drizzled *without* that image. A clipped linear fit of the
    displacements gives each image's WCS correction. The loop stops when
    every image's fitted shift is below ``eps_shift``.

    The images' WCSs are corrected in memory (in ``resample``); files are
    changed only by :func:`align_files` or :func:`write_corrections`.

    Parameters
    ----------
    catalog : ImageCatalog
        Finds sources and their segmentation in the drizzled image
        (e.g. :class:`subpixal_jax.catalog.PhotutilsCatalog`).
    resample : Resample
        Holds the images and drizzles them
        (e.g. :class:`subpixal_jax.resample.DrizzleResample`). It is updated
        in place with the corrected WCSs.
    wcslin : astropy.wcs.WCS, optional
        Undistorted tangent-plane frame of the fit (default: the drizzle
        grid). Honoured, unlike the original (SPEC §9.4).
    fitgeom : {'shift', 'rshift', 'rscale', 'general'}, optional
        Fit geometry.
    nclip : int, optional
        Clipping iterations of the fit.
    sigma : float or (float, {'rmse', 'mae', 'std'}), optional
        Clipping limit in units of the fit statistic.
    nmax : int or (int, int), optional
        Maximum iterations, or (iterations, iterations with a full
        recomputation of sky, cosmic rays and catalog). An int means one
        full resample; later iterations re-drizzle only the images whose WCS
        changed, which is exact (SPEC §9.2, §9.3).
    eps_shift : float, optional
        Convergence threshold on every image's shift (fit-frame pixels).
    use_weights : bool, optional
        Weight sources by the catalog's ``weight`` column.
    cc_type : {'CC', 'NCC', 'ZNCC'}, optional
        Cross-correlation normalisation.
    wcsupdate : {'batch', 'otf'}, optional
        'batch' measures all images against the previous iteration's
        references, then corrects all (Jacobi); 'otf' corrects each image
        before the next is measured (Gauss-Seidel).
    combine_seg_mask : bool, optional
        Keep only the source's own segment in the reference cutouts.
    on_iteration : callable, optional
        Called with each :class:`~subpixal_jax.result.IterationResult`;
        returning False stops the loop (replaces the original's ``input()``
        prompt, ``iterative=True``).
    history : {'all', 'last', None}, optional
        Which iterations to keep in the result.
    reference : int, optional
        Index of an image held fixed as the astrometric reference (the
        others align to it). Default: all images are corrected (relative
        alignment, as the original).
    interp : str, optional
        Blot interpolation kernel.
    search_radius : int, optional
        Restrict the peak search to lags within this many image pixels.
    keep_diagnostics : bool, optional
        Keep cutouts and blots in the history (memory-hungry).
    cr_reject : bool, optional
        Cosmic-ray handling: detect sources in the median of the single
        drizzles (``resample.median_image()``), and redo cosmic-ray rejection
        (``resample.reject_cosmic_rays()``) at every full resample after the
        first, once the images are roughly aligned (rejection against
        misaligned images flags star cores). Default: on when there are at
        least 3 images and the resample supports it.
    joint : bool, optional
        In 'batch' mode, turn the fits of all images into corrections by
        solving jointly for every image's error (each fit measures an image
        against the mean of the others); converges in a few iterations where
        applying the fits as they are (``joint=False``, the original) needs
        many.
    refine : {None, 'sources', 'transform'}, optional
        'sources' refines every displacement by weighted least squares through
        the blot (flux and background profiled out), starting from the
        cross-correlation answer: errors at the Cramér-Rao bound instead of
        the 2x-grid peak fit's ~0.004 px floor, and calibrated per-source
        errors that weight the fit. 'transform' refines each image's fitted
        transform itself through the blot, robustly (Cauchy loss per source),
        after the clipped fit; it needs ``wcslin`` to be the drizzle grid.
    throw : bool, optional
        Raise :class:`~subpixal_jax.errors.AlignmentError` on the first image
        that fails, instead of recording its status and going on.
    progress : bool, optional
        Show a progress bar over iterations.

    Returns
    -------
    AlignmentResult
        Status, history, summary table and the corrected WCSs.
    """
    if cr_reject is None:
        cr_reject = len(resample.exposures) >= 3 and hasattr(resample, "median_image")
    options = make_options(
        fitgeom=fitgeom,
        nclip=nclip,
        sigma=sigma,
        nmax=nmax,
        eps_shift=eps_shift,
        use_weights=use_weights,
        cc_type=cc_type,
        interp=interp,
        wcsupdate=wcsupdate,
        combine_seg_mask=combine_seg_mask,
        history=history,
        reference=reference,
        search_radius=search_radius,
        keep_diagnostics=keep_diagnostics,
        cr_reject=cr_reject,
        joint=joint,
        refine=refine,
    )
    n_images = len(resample.exposures)
    if reference is not None and not 0 <= int(reference) < n_images:
        msg = f"reference must index one of the {n_images} images, got {reference!r}"
        raise ValueError(msg)
    if wcslin is None:
        wcslin = resample.output_wcs
    elif wcslin.has_distortion or wcslin.sip is not None:
        msg = "wcslin must be an undistorted (linear TAN) WCS"
        raise ValueError(msg)
    if options.refine == "transform" and not _same_frame(wcslin, resample.output_wcs):
        msg = "refine='transform' needs wcslin to be the drizzle grid's WCS"
        raise ValueError(msg)
    return _run_loop(catalog, resample, wcslin, options, on_iteration, throw, progress)


def _refresh_catalog(catalog, resample, options: AlignOptions):
    if options.cr_reject and len(resample.exposures) >= 3:
        # Cosmic rays of single exposures survive in the mean drizzle and
        # would be detected as sources; the median of the single drizzles is
        # free of them even before the images are aligned.
        median, covered = resample.median_image()
        catalog.set_image(median, mask=~covered)
    else:
        catalog.set_image(resample.sci, mask=resample.wht <= 0)
    table = catalog.catalog
    segmentation = catalog.segmentation
    primaries = create_primary_cutouts(table, segmentation, ref_valid=resample.wht > 0)
    log.info("catalog: %d sources, %d usable boxes", len(table), len(primaries))
    return primaries, segmentation


def _run_loop(catalog, resample, wcslin, options, on_iteration, throw, progress):
    n_images = len(resample.exposures)
    names = [e.name for e in resample.exposures]
    history: list[res.IterationResult] = []
    summary: list[dict[str, Any]] = []
    excluded: set[int] = set()  # failed images: left out of the others' references
    totals: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    status = "MAX_ITERATIONS"
    previous_max = math.inf
    growing = 0
    n_full = 0
    catalog_state = None
    iterations = range(1, options.max_iterations + 1)
    if progress:
        from tqdm.auto import tqdm

        iterations = tqdm(iterations, desc="align", unit="iter")
    iteration = 0
    for iteration in iterations:
        full = n_full < options.max_full_resamples
        if full:
            if n_full > 0 and options.cr_reject:
                resample.reject_cosmic_rays()
            catalog_state = _refresh_catalog(catalog, resample, options)
            n_full += 1
        todo = [i for i in range(n_images) if i != options.reference]
        if options.wcsupdate == "batch":
            fitted = _align_set(
                todo, resample, catalog_state, wcslin, options, excluded
            )
            for i, image in zip(todo, fitted, strict=True):
                _apply(resample, i, image, totals)
        else:
            fitted = []
            for i in todo:
                (image,) = _align_set(
                    [i], resample, catalog_state, wcslin, options, excluded
                )
                _apply(resample, i, image, totals)
                fitted.append(image)
        by_index = dict(zip(todo, fitted, strict=True))
        images = []
        for i in range(n_images):
            if i in by_index:
                images.append(by_index[i])
            else:
                wcs = {c.extver: c.wcs for c in resample.exposures[i].chips}
                images.append(
                    res.ImageFit(
                        names[i], res.REFERENCE, None, None, math.nan, wcs, wcs
                    )
                )
        for i, image in enumerate(images):
            if image.status.startswith(res.FAILED):
                if throw:
                    msg = f"{image.name}: {image.status}"
                    raise AlignmentError(msg)
                excluded.add(i)
            log.info(
                "iteration %d %s: %s shift=%s",
                iteration,
                image.name,
                image.status,
                image.shift,
            )
            summary.append(res.summary_row(iteration, image))
        step = res.IterationResult(iteration, full, images)
        if options.history == "all":
            history.append(step)
        elif options.history == "last":
            history[:] = [step]
        max_shift = step.max_shift
        if math.isnan(max_shift):
            status = f"{res.FAILED}: no image could be aligned"
            break
        if max_shift < options.eps_shift:
            status = "CONVERGED"
            break
        # Divergence: the largest shift grows markedly twice in a row and is
        # well above the threshold (tiny oscillations around a noise floor
        # just above eps_shift are not divergence).
        grew = max_shift > 1.5 * previous_max and max_shift > 10 * options.eps_shift
        growing = growing + 1 if grew else 0
        previous_max = max_shift
        if growing >= 2:
            status = "DIVERGED"
            break
        if on_iteration is not None and on_iteration(step) is False:
            status = "STOPPED"
            break
    final = [{c.extver: c.wcs for c in e.chips} for e in resample.exposures]
    return res.AlignmentResult(
        status,
        iteration,
        history,
        final,
        names,
        summary,
        corrections=[totals.get(i) for i in range(n_images)],
        wcslin=wcslin,
        center=np.asarray(wcslin.wcs.crpix, dtype=float) - 1.0,
        fitgeom=options.fitgeom,
    )


# --------------------------------------------------------------------------
# Files in, files out
# --------------------------------------------------------------------------


def _check_writing(in_place: bool, output_dir, dry_run: bool) -> Path | None:
    del dry_run  # a dry run may go with either target
    if in_place and output_dir is not None:
        msg = "give either in_place=True or output_dir, not both"
        raise ValueError(msg)
    if output_dir is None:
        return None
    out = Path(output_dir)
    if not out.is_dir():
        msg = f"output_dir must be an existing directory, got {str(out)!r}"
        raise ValueError(msg)
    return out


def write_corrections(
    result: res.AlignmentResult,
    files: Sequence[str | os.PathLike],
    *,
    wcsname: str = "SUBPIXAL",
    output_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
    extname: str = "SCI",
) -> list:
    """Write the corrected WCS of every aligned image into its file.

    Each file is rewritten atomically with its old primary WCS archived under
    an alternate key (:func:`subpixal_jax.wcs.update_exposure_wcs`). Images
    that were never aligned (failed, skipped or the fixed reference) are not
    touched.

    Parameters
    ----------
    result : AlignmentResult
        What :func:`align_images` returned for these files, in this order.
    files : sequence of path
        The images' files.
    wcsname : str, optional
        Name of the new WCS.
    output_dir : path, optional
        Write updated copies here instead of updating the files in place.
    dry_run : bool, optional
        Compute the reports, write nothing.
    extname : str, optional
        EXTNAME of the science extensions.

    Returns
    -------
    list of UpdateReport
        One per written (or, with ``dry_run``, would-be written) file.
    """
    if len(files) != len(result.names):
        msg = f"files has {len(files)} entries but the result has {len(result.names)}"
        raise ValueError(msg)
    reports = []
    for path, correction, final, name in zip(
        files, result.corrections, result.final_wcs, result.names, strict=True
    ):
        if correction is None:
            log.info("%s: not aligned, file left unchanged", name)
            continue
        rows = [
            r
            for r in result.summary
            if r["image"] == name and r["status"] == res.SUCCESS
        ]
        fit_info = {"fitgeom": result.fitgeom} if result.fitgeom else {}
        if rows:
            fit_info["nmatches"] = int(rows[-1]["n_fit"])
        if rows and math.isfinite(rows[-1]["rmse"]):
            fit_info["rmse"] = float(rows[-1]["rmse"])
            fit_info["mae"] = float(rows[-1]["mae"])
        reports.append(
            update_exposure_wcs(
                path,
                {(extname, ext): wcs for ext, wcs in final.items()},
                wcsname=wcsname,
                output=output_dir,
                dry_run=dry_run,
                fit_info=fit_info,
            )
        )
    return reports


def align_files(
    files: Sequence[str | os.PathLike],
    *,
    in_place: bool = False,
    output_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
    wcsname: str = "SUBPIXAL",
    summary: str | os.PathLike | None = None,
    dq_bits: int | str | None = 0,
    cr_reject: bool | None = None,
    pixel_scale: float | None = None,
    catalog=None,
    **align_options,
) -> tuple[res.AlignmentResult, list]:
    """Align FITS files with the default drizzle reference and photutils catalog.

    Reads every file (nothing is written until the alignment is done, and
    only where asked), drizzles them onto one undistorted grid, detects
    sources, runs :func:`align_images` and writes the corrected WCSs.

    Parameters
    ----------
    files : sequence of path
        Exposures: multi-extension FITS with SCI (and ERR, DQ) extensions.
    in_place : bool, optional
        Update the files themselves (old WCS archived, atomic rewrite).
    output_dir : path, optional
        Write updated copies into this existing directory instead.
    dry_run : bool, optional
        Report what would change, write nothing.
    wcsname : str, optional
        Name of the new WCS.
    summary : path, optional
        Write the per-image, per-iteration summary (with the solution in its
        metadata, for :func:`apply_solution`) to this ECSV file.
    dq_bits : int or str, optional
        DQ bits to ignore ("4,8", "~4+8" syntax accepted).
    cr_reject : bool, optional
        Cosmic-ray handling (median catalog, and rejection once aligned);
        default: on with three or more files.
    pixel_scale : float, optional
        Drizzle pixel scale (arcsec); default the first image's.
    catalog : ImageCatalog, optional
        Source finder; default :class:`~subpixal_jax.catalog.PhotutilsCatalog`.
    **align_options
        Passed to :func:`align_images` (``fitgeom``, ``nmax``, ...).

    Returns
    -------
    result : AlignmentResult
        The alignment.
    reports : list of UpdateReport
        What was (or, with ``dry_run``, would be) written; empty when none
        of ``in_place``, ``output_dir`` and ``dry_run`` was given.
    """
    from subpixal_jax.catalog import PhotutilsCatalog
    from subpixal_jax.resample import DrizzleResample

    files = [Path(f) for f in files]
    if not files:
        msg = "files must name at least one FITS file"
        raise ValueError(msg)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        msg = f"files not found: {missing}"
        raise ValueError(msg)
    out = _check_writing(in_place, output_dir, dry_run)
    resample = DrizzleResample(files, dq_bits=dq_bits, pixel_scale=pixel_scale)
    result = align_images(
        catalog if catalog is not None else PhotutilsCatalog(),
        resample,
        cr_reject=cr_reject,
        **align_options,
    )
    if summary is not None:
        result.write_summary(summary)
    reports = []
    if in_place or out is not None or dry_run:
        reports = write_corrections(
            result, files, wcsname=wcsname, output_dir=out, dry_run=dry_run
        )
    return result, reports


def apply_solution(
    solution: str | os.PathLike,
    files: Sequence[str | os.PathLike],
    *,
    wcsname: str = "SUBPIXAL",
    output_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
    extname: str = "SCI",
) -> list:
    """Apply corrections stored in a summary ECSV to files' current WCSs.

    The summary written by :func:`align_files` (or
    :meth:`AlignmentResult.write_summary`) holds each image's total correction
    (matrix and shift about a centre in the fit frame) and the fit frame's
    WCS. Files are matched to images by file name.

    Parameters
    ----------
    solution : path
        The summary ECSV.
    files : sequence of path
        Files to correct (their WCS must be the one the alignment started from).
    wcsname, output_dir, dry_run, extname
        As in :func:`write_corrections`.

    Returns
    -------
    list of UpdateReport
        One per corrected file; files the alignment left unchanged (the fixed
        reference, failed images) are not rewritten.
    """
    from subpixal_jax.images import read_exposure

    wcslin, center, stored = res.read_solution(solution)
    _check_writing(False, output_dir, dry_run)
    missing = [Path(f).name for f in files if Path(f).name not in stored]
    if missing:
        msg = f"{solution} has no correction for {missing}"
        raise ValueError(msg)
    reports = []
    for path in files:
        if stored[Path(path).name] is None:
            log.info("%s: left unchanged by the alignment, not rewritten", path)
            continue
        matrix, shift = stored[Path(path).name]
        exposure = read_exposure(path, extname=extname)
        new = {
            (extname, chip.extver): correct_wcs(
                chip.wcs, wcslin, matrix, shift, center=center, fitgeom="general"
            )
            for chip in exposure.chips
        }
        reports.append(
            update_exposure_wcs(
                path, new, wcsname=wcsname, output=output_dir, dry_run=dry_run
            )
        )
    return reports

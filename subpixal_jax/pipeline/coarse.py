"""The capture stage: large initial offsets found before the sub-pixel loop.

The cross-correlation only sees offsets that fit inside a source's cutout
(the segment box plus a 2-pixel pad). :func:`capture_stage` measures larger
ones by catalog matching (:func:`subpixal_jax.pipeline.capture.coarse_transform`:
each exposure's own sources, mapped through its full WCS into the fit frame,
matched by triangles against an anchor exposure's sources, invariant to
shift, rotation and scale) and applies the found transform to the WCS when it
moves sources by more than a pixel.

With ``capture='auto'`` the stage runs only when the first sub-pixel pass
shows an image it could not measure (:func:`images_to_capture`), so a set
whose offsets are already small pays nothing; ``'always'`` runs it first;
``'off'`` never.

An image the first pass could not measure and the capture could not match
either is FAILED with the capture's reason (:func:`capture_failures`), held
out of the rest of the run with its initial WCS (:func:`with_failures`):
never a silent wrong answer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np
from astropy.wcs import WCS

from subpixal_jax.geometry.transform import Affine
from subpixal_jax.io import result as res
from subpixal_jax.options import AlignOptions
from subpixal_jax.pipeline.capture import (
    CaptureResult,
    coarse_transform,
    detect_exposure_sources,
    needs_capture,
)
from subpixal_jax.pipeline.stages import corrected_wcs
from subpixal_jax.pipeline.state import AlignState, initial_state
from subpixal_jax.reference.matching import MatchLimits
from subpixal_jax.status import ImageOutcome, ImageStatus

log = logging.getLogger(__name__)

#: An image is captured when less than this fraction of its sources survives
#: the first pass's clipped fit (most displacements hit the lag window's edge
#: or disagree).
MIN_KEPT_FRACTION = 0.5
#: ... or when its fit residuals exceed its sources' errors this many times.
MAX_RMSE_RATIO = 10.0
#: ... or when its fit residuals exceed this (fit-frame px, RMS). Measured
#: weights carry each image's excess error, so their ratio stays near 1 and
#: cannot say this; first passes of sets with small errors (up to 1.5 px)
#: left 0.03-0.06 px (measured weights, 256x512 chips), 0.35 px on 128x256
#: chips with 16 sources; offsets beyond the cutouts 0.76-6 px.
MAX_FIRST_PASS_RMSE = 0.3
#: An image whose capture then fails is FAILED when its first pass left fit
#: residuals larger than this
#: (fit-frame px): beyond what the cutouts can measure, not merely noisy (a
#: first pass of a set with small errors measured 0.15-0.6 px; an unrelated
#: field 7.3 px).
MAX_MEASURABLE_RMSE = 1.0


def _first_pass(image: res.ImageFit) -> tuple[bool, float, float, float] | None:
    """``(fitted, kept fraction, fit RMS, RMS / predicted)`` of a first pass.

    None for the fixed reference.
    """
    status = image.status.status
    if status is ImageStatus.REFERENCE:
        return None
    sources = image.sources
    if status is not ImageStatus.SUCCESS or sources is None or not sources.n_sources:
        return False, 0.0, math.inf, math.inf
    kept = np.count_nonzero(sources.fitmask) / sources.n_sources
    rmse = float(image.fit.rmse)
    noise = res.predicted_rms(sources)
    return True, kept, rmse, rmse / noise if noise > 0 else 0.0


def images_to_capture(step: res.IterationResult) -> list[int]:
    """Images the first sub-pixel pass could not measure well.

    An image needs the capture stage when its fit failed, or kept fewer than
    half of its sources, or left residuals far above the sources' errors or
    above :data:`MAX_FIRST_PASS_RMSE`: the signature of an offset larger
    than the cutouts.
    """
    todo = []
    for i, image in enumerate(step.images):
        numbers = _first_pass(image)
        if numbers is None:
            continue
        fitted, kept, rmse, ratio = numbers
        if (
            not fitted
            or kept < MIN_KEPT_FRACTION
            or ratio > MAX_RMSE_RATIO
            or rmse > MAX_FIRST_PASS_RMSE
        ):
            todo.append(i)
    return todo


def unmeasurable(image: res.ImageFit) -> bool:
    """Whether a first pass fitted the image but measured nothing of it.

    The fit left residuals above
    :data:`MAX_MEASURABLE_RMSE` (not merely noisy): such an image, when the
    capture cannot match it either, is FAILED with the capture's reason. An
    image the loop itself could not fit (FAILED, SKIPPED) keeps its own
    outcome and reason.
    """
    numbers = _first_pass(image)
    if numbers is None:
        return False
    fitted, _, rmse, _ = numbers
    # Not the kept fraction: small sets (13-20 sources) keep under half in a
    # sound first pass, and such an image, whose capture fails for want of
    # sources, measured well; only residuals beyond the cutouts' reach say
    # it measured nothing.
    return fitted and rmse > MAX_MEASURABLE_RMSE


def _anchor(options: AlignOptions, exclude: Sequence[int], n: int) -> int:
    if options.reference is not None:
        return options.reference
    return next((i for i in range(n) if i not in exclude), 0)


def capture_stage(
    resample,
    wcslin: WCS,
    options: AlignOptions,
    indices: Sequence[int],
) -> list[CaptureResult | None]:
    """Capture the images ``indices`` against an anchor image, and apply.

    The anchor is the fixed ``reference`` image, or the first image not to
    be captured. Each captured image whose match is good and moves sources
    by more than a pixel gets its corrected WCS (in ``resample``).

    Returns
    -------
    list of CaptureResult or None
        Per image (None: not captured).
    """
    n = len(resample.exposures)
    anchor = _anchor(options, indices, n)
    ref_xy, ref_flux = detect_exposure_sources(resample.exposures[anchor], wcslin)
    out: list[CaptureResult | None] = [None] * n
    limits = MatchLimits(
        min_matches=options.capture_min_matches,
        max_shift=options.capture_max_shift,
        max_rotation=options.capture_max_rotation,
    )
    for i in indices:
        if i == anchor:
            continue
        exposure = resample.exposures[i]
        found = coarse_transform(
            exposure, ref_xy, wcslin, limits, reference_flux=ref_flux
        )
        out[i] = found
        log.info(
            "capture %s against %s: %s, %d matches, shift (%.2f, %.2f) px, "
            "rotation %.4f deg, scale %.6f",
            exposure.name,
            resample.exposures[anchor].name,
            found.status.name,
            found.n_matches,
            *found.shift,
            found.rotation,
            found.scale,
        )
        if not found.ok:
            log.warning("capture of %s: %s", exposure.name, found.reason)
        elif needs_capture(found):
            before = {c.extver: c.wcs for c in exposure.chips}
            affine = Affine(found.matrix, found.shift, found.center)
            resample.update_wcs(i, corrected_wcs(before, wcslin, affine, found.fitgeom))
    return out


def captured_state(
    resample, state: AlignState, captures: Sequence[CaptureResult | None]
) -> AlignState:
    """Return a fresh state after a capture: its corrections start the totals.

    ``state`` is the state the capture started from (the run's first); the
    resampler holds its WCSs plus the applied captures.
    """
    totals = []
    for capture in captures:
        totals.append(
            Affine(capture.matrix, capture.shift, capture.center)
            if applied(capture)
            else None
        )
    fresh = initial_state(resample)
    return dataclasses.replace(
        fresh,
        totals=tuple(totals),
        initial_wcs=state.initial_wcs or fresh.initial_wcs,
        captures=tuple(captures),
    )


def restore_images(
    state: AlignState, source: AlignState, resample, indices: Sequence[int]
) -> AlignState:
    """Return ``state`` with the images ``indices`` where ``source`` has them.

    Their WCSs and total corrections are taken from ``source``, and
    ``resample`` gets those WCSs back. The capture measures an image from
    the WCS it had before the first pass (that pass's correction of an image
    it could not measure may be noise), and an image whose capture then
    applies nothing gets the pass's correction back.
    """
    wcs, totals = list(state.wcs), list(state.totals)
    for i in indices:
        resample.update_wcs(i, dict(source.wcs[i]))
        wcs[i], totals[i] = source.wcs[i], source.totals[i]
    return dataclasses.replace(state, wcs=tuple(wcs), totals=tuple(totals))


def applied(capture: CaptureResult | None) -> bool:
    """Whether a capture found a transform and it moves sources by over a pixel."""
    return capture is not None and capture.ok and needs_capture(capture)


def with_captures(
    state: AlignState, resample, captures: Sequence[CaptureResult | None]
) -> AlignState:
    """Return ``state`` after captures applied mid-run (after the first pass).

    The applied captures are composed into the totals; captured images are
    measured again (no longer excluded); the iteration's largest shift
    becomes at least the largest capture, so the run cannot stop before the
    captured images have been measured at the sub-pixel level; the full
    resamples (catalog, cosmic rays) start again.
    """
    totals = list(state.totals)
    excluded = set(state.excluded)
    moved = []
    for i, capture in enumerate(captures):
        if not applied(capture):
            continue
        affine = Affine(capture.matrix, capture.shift, capture.center)
        totals[i] = (totals[i] or Affine.identity(affine.center)).then(affine)
        excluded.discard(i)
        moved.append(capture.max_displacement)
    shifts = list(state.max_shifts)
    if moved:
        shifts[-1] = max(np.nan_to_num(shifts[-1], nan=0.0), *moved)
    return dataclasses.replace(
        state,
        # The catalog and the cosmic-ray masks of the first pass came from
        # misaligned images (star cores flagged, stars missing from the
        # median): redo both as a fresh run would.
        n_full=0 if moved else state.n_full,
        wcs=tuple({c.extver: c.wcs for c in e.chips} for e in resample.exposures),
        totals=tuple(totals),
        excluded=frozenset(excluded),
        max_shifts=tuple(shifts),
        captures=tuple(captures),
    )


def capture_reason(capture: CaptureResult) -> str:
    """Return the FAILED reason of an image whose capture found no usable match."""
    return (
        f"capture found no match ({capture.status.name}, significance "
        f"{capture.significance:.1f}): {capture.reason}"
    )


def capture_failures(
    captures: Sequence[CaptureResult | None], indices: Sequence[int]
) -> dict[int, ImageOutcome]:
    """Return the images among ``indices`` the capture could not match.

    ``indices``: the images a first pass could not measure (:func:`unmeasurable`).

    Returns
    -------
    dict of int to ImageOutcome
        FAILED outcomes with :func:`capture_reason`, by image index (images
        not captured, e.g. the anchor, are not failures).
    """
    return {
        i: ImageOutcome(ImageStatus.FAILED, capture_reason(captures[i]))
        for i in indices
        if i < len(captures) and captures[i] is not None and not captures[i].ok
    }


def with_failures(
    state: AlignState, resample, failed: dict[int, ImageOutcome]
) -> AlignState:
    """Return ``state`` with the ``failed`` images held out of the rest of the run.

    Each gets back its initial WCS (a first-pass correction of an image that
    could not be measured is not trusted) and no total correction, and is
    left out of the others' references; the full resamples (catalog, cosmic
    rays) start again.
    """
    if not failed:
        return state
    totals = list(state.totals)
    for i, outcome in failed.items():
        log.warning("%s: %s", resample.exposures[i].name, outcome)
        resample.update_wcs(i, dict(state.initial_wcs[i]))
        totals[i] = None
    return dataclasses.replace(
        state,
        # Their pixels are in the catalog and the cosmic-ray masks: redo both.
        n_full=0,
        wcs=tuple({c.extver: c.wcs for c in e.chips} for e in resample.exposures),
        totals=tuple(totals),
        excluded=state.excluded | frozenset(failed),
        failed={**state.failed, **failed},
    )

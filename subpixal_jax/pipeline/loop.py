"""One alignment iteration as a step over :class:`AlignState`, and the driver.

:func:`align_step` takes a state and returns the next one with the record of
the iteration; :func:`stop_reason` decides, from the record of shifts alone,
whether the loop is done; :func:`run` composes the two (what
:func:`subpixal_jax.align_images` calls). 'batch' and 'otf' updates, a fixed
``reference`` image and the full resamples are variations of the step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

from astropy.wcs import WCS

from subpixal_jax.errors import AlignmentError
from subpixal_jax.geometry.cutouts import create_primary_cutouts
from subpixal_jax.geometry.skywcs import SkyWCS
from subpixal_jax.geometry.transform import Affine
from subpixal_jax.io import result as res
from subpixal_jax.options import AlignOptions
from subpixal_jax.pipeline.absolute import tie_set
from subpixal_jax.pipeline.coarse import (
    applied,
    capture_failures,
    capture_stage,
    captured_state,
    images_to_capture,
    restore_images,
    unmeasurable,
    with_captures,
    with_failures,
)
from subpixal_jax.pipeline.stages import CatalogState, measure_and_fit
from subpixal_jax.pipeline.state import (
    AlignState,
    adopt_resample_wcs,
    initial_state,
    snapshot_masks,
    sync_resample,
)
from subpixal_jax.status import ImageOutcome, ImageStatus, RunOutcome, RunStatus

log = logging.getLogger(__name__)


def refresh_catalog(catalog, resample, options: AlignOptions) -> CatalogState:
    """Detect sources in the current combination and cut their primary boxes."""
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
    return CatalogState(primaries, segmentation)


def _full_resample(state: AlignState, catalog, resample, options: AlignOptions):
    """Redo cosmic-ray rejection (after the first) and the catalog."""
    valid = state.valid
    if state.n_full > 0 and options.cr_reject:
        resample.reject_cosmic_rays()
        valid = snapshot_masks(resample)
    catalog_state = refresh_catalog(catalog, resample, options)
    return dataclasses.replace(
        state, n_full=state.n_full + 1, valid=valid, catalog=catalog_state
    )


def _apply(resample, i: int, image: res.ImageFit, totals: list, wcslin) -> None:
    """Give image ``i`` its corrected WCS and compose its total correction.

    When the fit frame is the drizzle grid and the chips are FITS WCSs, the
    resampler moves its cached pixel maps by the correction itself instead of
    evaluating the new WCS again at every pixel (exact to < 1e-6 px).
    """
    if not image.ok:
        return
    c = image.correction
    affine = None
    plain = not any(isinstance(w, SkyWCS) for w in image.wcs_after.values())
    if plain and wcslin is resample.output_wcs:
        affine = (c.matrix, c.shift, c.center)
    resample.update_wcs(i, image.wcs_after, affine=affine)
    before = totals[i] or Affine.identity(c.center)
    totals[i] = before.then(c)


def _measure(state, resample, wcslin, options) -> tuple[list, list]:
    """Measure, fit and apply every moving image ('batch' or 'otf').

    The fixed reference and the images held out as failed are not measured;
    their records carry their outcome.
    """
    todo = [
        i
        for i in range(len(resample.exposures))
        if i != options.reference and i not in state.failed
    ]
    totals = list(state.totals)
    if options.wcsupdate == "batch":
        fitted = measure_and_fit(
            todo, resample, state.catalog, wcslin, options, state.excluded
        )
        for i, image in zip(todo, fitted, strict=True):
            _apply(resample, i, image, totals, wcslin)
    else:
        fitted = []
        for i in todo:
            (image,) = measure_and_fit(
                [i], resample, state.catalog, wcslin, options, state.excluded
            )
            _apply(resample, i, image, totals, wcslin)
            fitted.append(image)
    by_index = dict(zip(todo, fitted, strict=True))
    images = []
    for i, exposure in enumerate(resample.exposures):
        if i in by_index:
            images.append(by_index[i])
            continue
        wcs = {c.extver: c.wcs for c in exposure.chips}
        outcome = state.failed.get(i, ImageOutcome(ImageStatus.REFERENCE))
        images.append(
            res.ImageFit(exposure.name, outcome, None, None, math.nan, wcs, wcs)
        )
    return images, totals


def _kept_history(state: AlignState, step: res.IterationResult, options) -> tuple:
    if options.history == "all":
        return (*state.history, step)
    if options.history == "last":
        return (step,)
    return ()


def align_step(
    state: AlignState,
    catalog,
    resample,
    wcslin: WCS,
    options: AlignOptions,
    *,
    throw: bool = False,
) -> tuple[AlignState, res.IterationResult]:
    """Run one iteration of the alignment from ``state``.

    Parameters
    ----------
    state : AlignState
        Where the run stands (:func:`~subpixal_jax.pipeline.initial_state` for
        a fresh run, or a loaded checkpoint).
    catalog : ImageCatalog
        Source finder, called on full-resample iterations.
    resample : Resample
        The drizzling resampler; brought to ``state`` first, then given the
        corrected WCSs.
    wcslin : astropy.wcs.WCS
        The fit frame.
    options : AlignOptions
        The run's options.
    throw : bool, optional
        Raise :class:`~subpixal_jax.errors.AlignmentError` on a failed image.

    Returns
    -------
    state : AlignState
        The state after this iteration.
    record : IterationResult
        Every image's outcome in this iteration.
    """
    sync_resample(resample, state)
    iteration = state.iteration + 1
    start = time.perf_counter()
    full = state.n_full < options.max_full_resamples
    if full:
        log.info(
            "iteration %d: catalog%s", iteration, " and cosmic rays" * state.n_full
        )
        state = _full_resample(state, catalog, resample, options)
    else:
        resample.use_final_kernel()
    log.info("iteration %d: measuring and fitting", iteration)
    images, totals = _measure(state, resample, wcslin, options)
    excluded = set(state.excluded)
    rows = []
    for i, image in enumerate(images):
        if image.status.status is ImageStatus.FAILED:
            if throw:
                msg = f"{image.name}: {image.status}"
                raise AlignmentError(msg)
            excluded.add(i)
        log.debug(
            "iteration %d %s: %s shift=%s",
            iteration,
            image.name,
            image.status,
            image.shift,
        )
        rows.append(res.summary_row(iteration, image))
    step = res.IterationResult(iteration, full, images)
    log.info(
        "iteration %d done in %.1f s: largest shift %.4f px",
        iteration,
        time.perf_counter() - start,
        step.max_shift,
    )
    new = dataclasses.replace(
        state,
        iteration=iteration,
        totals=tuple(totals),
        excluded=frozenset(excluded),
        max_shifts=(*state.max_shifts, step.max_shift),
        summary=(*state.summary, *rows),
        history=_kept_history(state, step, options),
    )
    return adopt_resample_wcs(new, resample), step


def stop_reason(
    max_shifts: Sequence[float], options: AlignOptions
) -> RunOutcome | None:
    """Why the loop stops after these iterations, or None to go on.

    Parameters
    ----------
    max_shifts : sequence of float
        The largest fitted shift of every iteration so far (NaN: no image
        was aligned).
    options : AlignOptions
        ``eps_shift`` and ``max_iterations``.

    Examples
    --------
    >>> o = AlignOptions(eps_shift=0.01, max_iterations=3)
    >>> stop_reason([0.5, 0.005], o)
    RunOutcome(status=<RunStatus.CONVERGED: 'CONVERGED'>, reason='')
    >>> stop_reason([0.5, 0.2], o) is None
    True
    >>> str(stop_reason([0.1, 0.2, 0.4], o))
    'DIVERGED'
    """
    last = max_shifts[-1]
    if math.isnan(last):
        return RunOutcome(RunStatus.FAILED, "no image could be aligned")
    if last < options.eps_shift:
        return RunOutcome(RunStatus.CONVERGED)
    # Divergence: the largest shift grows markedly twice in a row and is well
    # above the threshold (tiny oscillations around a noise floor just above
    # eps_shift are not divergence).
    growing = 0
    previous = math.inf
    for shift in max_shifts:
        grew = shift > 1.5 * previous and shift > 10 * options.eps_shift
        growing = growing + 1 if grew else 0
        previous = shift
    if growing >= 2:
        return RunOutcome(RunStatus.DIVERGED)
    if len(max_shifts) >= options.max_iterations:
        return RunOutcome(RunStatus.MAX_ITERATIONS)
    return None


def final_outcomes(
    step: res.IterationResult, outcome: RunOutcome, options: AlignOptions
) -> list[ImageOutcome]:
    """Every image's outcome at the end: SUCCESS only when the run converged."""
    if outcome.converged:
        return [image.status for image in step.images]
    out = []
    for image in step.images:
        if image.ok:
            reason = (
                f"run ended {outcome.status.value}; last shift "
                f"{image.shift_norm:.4f} px, eps_shift {options.eps_shift:g} px"
            )
            out.append(ImageOutcome(ImageStatus.NOT_CONVERGED, reason))
        else:
            out.append(image.status)
    return out


def _final_summary(summary, iteration, names, outcomes) -> list[dict]:
    """Return the summary with the last iteration's rows carrying the final outcomes."""
    final = dict(zip(names, outcomes, strict=True))
    return [
        row | {"status": str(final[row["image"]])}
        if row["iteration"] == iteration
        else row
        for row in summary
    ]


def _first_steps(state, catalog, resample, wcslin, options, throw):
    """Run the first iteration, with the capture stage where it is needed.

    'always' captures every moving image before the first iteration; 'auto'
    runs the first iteration and captures the images it could not measure.
    Either way, an image the first iteration fitted but measured nothing of
    (:func:`~subpixal_jax.pipeline.coarse.unmeasurable`) and the capture
    could not match is FAILED (held out of the rest of the run); one that
    was merely noisy goes on, and one the loop could not fit keeps its own
    outcome.
    Returns the state to go on from and the first iteration's record.
    """
    if options.capture == "always":
        todo = [i for i in range(len(resample.exposures)) if i != options.reference]
        state = captured_state(
            resample, state, capture_stage(resample, wcslin, options, todo)
        )
    previous = state
    state, step = align_step(state, catalog, resample, wcslin, options, throw=throw)
    todo = images_to_capture(step)
    if todo and options.capture == "auto":
        log.info(
            "capture stage for %d image(s) the first pass could not measure", len(todo)
        )
        passed, state = state, restore_images(state, previous, resample, todo)
        captures = capture_stage(resample, wcslin, options, todo)
        unmoved = [i for i in todo if not applied(captures[i])]
        state = restore_images(state, passed, resample, unmoved)
        state = with_captures(state, resample, captures)
    failed = capture_failures(
        state.captures, [i for i in todo if unmeasurable(step.images[i])]
    )
    if failed and throw:
        i, outcome = next(iter(failed.items()))
        msg = f"{resample.exposures[i].name}: {outcome}"
        raise AlignmentError(msg)
    return with_failures(state, resample, failed), step


@dataclasses.dataclass(frozen=True)
class RunControl:
    """How a caller watches and steers a :func:`run` (none of it changes the fit).

    Attributes
    ----------
    on_iteration : callable, optional
        Called with each :class:`~subpixal_jax.io.result.IterationResult`;
        returning False stops the run.
    throw : bool
        Raise :class:`~subpixal_jax.errors.AlignmentError` on a failed image.
    progress : bool
        Show a progress bar over iterations.
    checkpoint : callable, optional
        Called with the :class:`AlignState` after every iteration.
    """

    on_iteration: Callable[[res.IterationResult], bool | None] | None = None
    throw: bool = False
    progress: bool = False
    checkpoint: Callable[[AlignState], None] | None = None


def _progress_bar(control: RunControl, options: AlignOptions, state: AlignState):
    if not control.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=options.max_iterations, initial=state.iteration, desc="align", unit="iter"
    )


def run(
    catalog,
    resample,
    wcslin: WCS,
    options: AlignOptions,
    *,
    control: RunControl | None = None,
    state: AlignState | None = None,
    reference_catalog=None,
) -> res.AlignmentResult:
    """Iterate :func:`align_step` until :func:`stop_reason` says stop.

    A fresh run starts with the capture stage where the options ask for it;
    ``state`` resumes a run (a loaded checkpoint); ``control`` holds the
    callback, the progress bar, ``throw`` and the checkpoint hook. With a
    ``reference_catalog`` (a table of
    :func:`~subpixal_jax.reference.refcat.read_reference_catalog`) a converged set is
    tied to it at the end.
    """
    control = control or RunControl()
    throw = control.throw
    fresh = state is None
    state = initial_state(resample) if fresh else state
    bar = _progress_bar(control, options, state)
    step = state.history[-1] if state.history else None
    outcome = stop_reason(state.max_shifts, options) if state.max_shifts else None
    if fresh and options.capture != "off":
        state, step = _first_steps(state, catalog, resample, wcslin, options, throw)
        _after_step(state, bar, control.checkpoint)
        outcome = _callback(
            _stop_on_final_kernel(state, resample, options), step, control.on_iteration
        )
    while outcome is None:
        state, step = align_step(state, catalog, resample, wcslin, options, throw=throw)
        _after_step(state, bar, control.checkpoint)
        outcome = _callback(
            _stop_on_final_kernel(state, resample, options), step, control.on_iteration
        )
    if bar is not None:
        bar.close()
    tie = None
    if reference_catalog is not None and outcome.converged:
        tie, affine = tie_set(catalog, resample, wcslin, reference_catalog, options)
        if affine is not None:
            state = _with_tie(state, affine, resample)
    return _result(state, step, outcome, resample, wcslin, options, tie)


def _stop_on_final_kernel(state, resample, options) -> RunOutcome | None:
    """`stop_reason`, except that a run converges only on the final kernel.

    A set that converges in its catalog iterations (one already aligned,
    say) was measured against the early kernel's reference: the resampler
    switches and one more iteration measures against the final one, unless
    that would pass ``max_iterations``.
    """
    outcome = stop_reason(state.max_shifts, options)
    if (
        outcome is not None
        and outcome.converged
        and len(state.max_shifts) < options.max_iterations
        and resample.use_final_kernel()
    ):
        log.info("converged on the early drizzle kernel: one more iteration")
        return None
    return outcome


def _result(state, step, outcome, resample, wcslin, options, tie):
    """Return the :class:`~subpixal_jax.io.result.AlignmentResult` of a finished run."""
    names = [e.name for e in resample.exposures]
    final = final_outcomes(step, outcome, options) if step is not None else []
    final = [state.failed.get(i, o) for i, o in enumerate(final)]
    summary = _final_summary(state.summary, state.iteration, names, final)
    return res.AlignmentResult(
        outcome,
        state.iteration,
        list(state.history),
        [{c.extver: c.wcs for c in e.chips} for e in resample.exposures],
        names,
        summary,
        corrections=list(state.totals),
        wcslin=wcslin,
        fitgeom=options.fitgeom,
        final_status=final,
        initial_wcs=[dict(w) for w in state.initial_wcs],
        captures=list(state.captures),
        absolute=tie,
    )


def _after_step(state, bar, checkpoint) -> None:
    if bar is not None:
        bar.update(1)
    if checkpoint is not None:
        checkpoint(state)


def _callback(outcome, step, on_iteration):
    """Let the callback stop a run that would go on (or end at the limit)."""
    stoppable = outcome is None or outcome.status is RunStatus.MAX_ITERATIONS
    if stoppable and on_iteration is not None and on_iteration(step) is False:
        return RunOutcome(RunStatus.STOPPED)
    return outcome


def _with_tie(state: AlignState, affine: Affine, resample) -> AlignState:
    """Return the state with the absolute tie composed into every image's total."""
    totals = tuple(
        (total or Affine.identity(affine.center)).then(affine) for total in state.totals
    )
    return adopt_resample_wcs(dataclasses.replace(state, totals=totals), resample)

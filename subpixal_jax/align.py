"""Align images: the public entry points over the pipeline.

:func:`align_images` (the seed's API: a catalog and a resampler) builds the
:class:`~subpixal_jax.options.AlignOptions` and runs the loop of
:mod:`subpixal_jax.pipeline`; :func:`find_linear_fit` is the single-image
measurement and fit; :func:`align_files`, :func:`write_corrections` and
:func:`apply_solution` read and write files. What this does differently from
the original (multi-chip fits, exact leave-one-out references, ``wcslin``
honoured, failed images recorded instead of aborting, nothing written unless
asked) is listed in ``docs/original.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from subpixal_jax.compilation import count_compilations, enable_compilation_cache
from subpixal_jax.core.linfit import LinearFit
from subpixal_jax.geometry.cutouts import SourceCutouts
from subpixal_jax.io import result as res
from subpixal_jax.io.images import Exposure
from subpixal_jax.io.preflight import CheckedInputs, InputError, check_inputs
from subpixal_jax.io.transaction import commit_set, discard, recover
from subpixal_jax.io.wcs import (
    TargetState,
    celestial_frame,
    classify_target,
    convert_wcs_frame,
    correct_wcs,
    prepare_exposure_update,
    update_exposure_wcs,
)
from subpixal_jax.options import AlignOptions
from subpixal_jax.pipeline import loop, stages
from subpixal_jax.pipeline.state import AlignState
from subpixal_jax.pipeline.verdict import WritePolicy, image_reports
from subpixal_jax.reference.refcat import read_reference_catalog

log = logging.getLogger(__name__)

#: Drizzle kernel of :func:`align_files`' reference until its catalog and
#: cosmic-ray passes are done (`FINAL_KERNEL` after them): ~3x faster than
#: 'square', and the final alignment as accurate (default set, nine seeds:
#: 0.00596 against 0.00594 px RMS; see ``DrizzleResample(early_kernel=...)``).
EARLY_KERNEL = "turbo"
#: Drizzle kernel of the reference the last iterations measure against. The
#: square kernel blurs the reference by a pixel footprint whose shape
#: depends on each source's pixel phase, so even an image aligned against
#: an identical copy of itself moves (0.0017 px on the real ACS/HRC copies);
#: the Lanczos kernel interpolates instead: 0.0004 px there, and a perturbed
#: copy is recovered to 0.0004 px instead of 0.0025 px. On the simulator
#: (nine seeds) 0.0060 -> 0.0052 px RMS. Onto a grid coarser than the inputs
#: the resampler uses 'square' instead (`reference.resample.grid_kernel`).
FINAL_KERNEL = "lanczos3"


def find_linear_fit(
    cutouts: Sequence[SourceCutouts],
    exposure: Exposure,
    wcslin: WCS,
    *,
    options: AlignOptions | None = None,
    **kwargs,
) -> tuple[LinearFit, res.SourceMeasurements]:
    """Measure one image's source displacements and fit a linear correction.

    The single-image step of :func:`align_images` (the original's
    ``find_linear_fit``): blots, cross-correlation and peak fit for every
    cutout in one compiled call, point lists in the ``wcslin`` frame, robust
    pre-clipping, then the clipped fit.

    Parameters
    ----------
    cutouts : sequence of SourceCutouts
        The image's source cutouts (all chips), from
        :func:`subpixal_jax.geometry.cutouts.create_cutouts`.
    exposure : Exposure
        The image (its chips' current WCSs map the cutouts to the sky).
    wcslin : astropy.wcs.WCS
        Undistorted frame of the fit; the centre is its CRPIX.
    options : AlignOptions, optional
        The options (``fitgeom``, ``nclip``, ``sigma``, ``use_weights``,
        ``cc_type``, ``interp``, ``refine`` are used); or give them as
        keywords.
    **kwargs
        Options by name, as for :func:`align_images`.

    Returns
    -------
    fit : LinearFit
        The clipped fit as numpy values; ``status`` 0 on success.
    sources : SourceMeasurements
        Per-source displacements, flags and point lists.
    """
    options = options if options is not None else AlignOptions.create(**kwargs)
    (meas,) = stages.measure_displacements(
        [cutouts],
        cc_type=options.cc_type,
        interp=options.interp,
        refine=options.refine == "sources",
        peak_fit=options.peak_fit,
    )
    center = wcslin.wcs.crpix - 1.0
    points = stages.robust_inliers(
        [stages.fit_inputs(cutouts, meas, exposure, wcslin, options)], center, options
    )
    (fit,) = stages.fit_points(points, center, options)
    return fit, stages.source_measurements(cutouts, meas, points[0], fit)


def _same_frame(a: WCS, b: WCS) -> bool:
    return a is b or a.to_header_string() == b.to_header_string()


def _check_frame(wcslin: WCS | None, resample, options: AlignOptions) -> WCS:
    if wcslin is None:
        return resample.output_wcs
    if wcslin.has_distortion or wcslin.sip is not None:
        msg = "wcslin must be an undistorted (linear TAN) WCS"
        raise ValueError(msg)
    if options.refine == "transform" and not _same_frame(wcslin, resample.output_wcs):
        msg = "refine='transform' needs wcslin to be the drizzle grid's WCS"
        raise ValueError(msg)
    return wcslin


def resolve_options(resample, options: AlignOptions) -> AlignOptions:
    """Fill in the options that depend on the images (``cr_reject``, ``reference``)."""
    n_images = len(resample.exposures)
    if options.reference is not None and options.reference >= n_images:
        msg = (
            f"reference must index one of the {n_images} images, "
            f"got {options.reference!r}"
        )
        raise ValueError(msg)
    if options.cr_reject is None:
        return dataclasses.replace(options, cr_reject=n_images >= 3)
    return options


def align_images(  # noqa: PLR0913  # seed signature
    catalog,
    resample,
    wcslin: WCS | None = None,
    *,
    on_iteration: Callable[[res.IterationResult], bool | None] | None = None,
    throw: bool = False,
    progress: bool = False,
    options: AlignOptions | None = None,
    state: AlignState | None = None,
    checkpoint: Callable[[AlignState], None] | None = None,
    reference_catalog=None,
    **kwargs,
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
        (e.g. :class:`subpixal_jax.reference.catalog.PhotutilsCatalog`).
    resample : Resample
        Holds the images and drizzles them
        (e.g. :class:`subpixal_jax.reference.resample.DrizzleResample`). It is updated
        in place with the corrected WCSs.
    wcslin : astropy.wcs.WCS, optional
        Undistorted tangent-plane frame of the fit (default: the drizzle
        grid). Honoured, unlike the original.
    on_iteration : callable, optional
        Called with each :class:`~subpixal_jax.io.result.IterationResult`;
        returning False stops the loop (replaces the original's ``input()``
        prompt, ``iterative=True``).
    throw : bool, optional
        Raise :class:`~subpixal_jax.errors.AlignmentError` on the first image
        that fails, instead of recording its status and going on.
    progress : bool, optional
        Show a progress bar over iterations.
    options : AlignOptions, optional
        All alignment options at once (instead of keywords).
    state : AlignState, optional
        Resume from this state (e.g. :func:`~subpixal_jax.pipeline.load_state`
        of a checkpoint written by ``checkpoint``).
    checkpoint : callable, optional
        Called with the :class:`~subpixal_jax.pipeline.AlignState` after every
        iteration (e.g. ``lambda s: save_state(s, path)``).
    reference_catalog : path or astropy.table.Table, optional
        Tie the converged set to this catalog (RA/Dec in degrees, optional
        errors, proper motions and epoch; Gaia DR3 names accepted): one
        ``absolute_fitgeom`` correction applied to every image, so the
        relative alignment is kept exactly.
    **kwargs
        The options by name (:class:`~subpixal_jax.options.AlignOptions`
        fields, and the seed's ``nmax`` and ``sigma`` forms): ``fitgeom``,
        ``nclip``, ``sigma``, ``nmax`` (an int: that many iterations of which
        the first two are full resamples — catalog and cosmic rays redone once
        aligned; or ``(iterations, full resamples)``), ``eps_shift``,
        ``use_weights``, ``cc_type``, ``wcsupdate``, ``combine_seg_mask``,
        ``history``, ``reference``, ``interp``, ``search_radius``,
        ``keep_diagnostics``, ``cr_reject`` (default on with 3 or more
        images), ``joint``, ``refine``.

    Returns
    -------
    AlignmentResult
        Status, history, summary table and the corrected WCSs.
    """
    if options is None:
        options = AlignOptions.create(**kwargs)
    elif kwargs:
        options = dataclasses.replace(options, **kwargs)
    options = resolve_options(resample, options)
    wcslin = _check_frame(wcslin, resample, options)
    # Kernels compiled by an earlier process are loaded, not compiled again.
    enable_compilation_cache()
    with count_compilations() as compiled:
        result = loop.run(
            catalog,
            resample,
            wcslin,
            options,
            control=loop.RunControl(on_iteration, throw, progress, checkpoint),
            state=state,
            reference_catalog=_reference_table(reference_catalog),
        )
    log.info("%s", compiled)
    return result


def _default_catalog(align_options: dict):
    """Return the source finder :func:`align_files` uses unless given one.

    Windowed centroids cost about 40% of a detection (12 of 30 s on a
    4200² reference with 9000 sources) and change no result of the relative
    alignment: the cutout boxes come from the segments, and the fit's
    positions only need to be good to a fraction of a pixel (default set,
    three seeds: the same misregistration to 1e-4 px). Only the absolute
    tie, which matches the positions to an external catalog, uses them.
    """
    from subpixal_jax.reference.catalog import PhotutilsCatalog

    tie = align_options.get("reference_catalog") is not None
    return PhotutilsCatalog(centroid="win" if tie else "moment")


def _reference_table(reference_catalog):
    """Read a reference catalog given as a path (tables pass through)."""
    if reference_catalog is None or isinstance(reference_catalog, Table):
        return reference_catalog
    return read_reference_catalog(reference_catalog)


# --------------------------------------------------------------------------
# Files in, files out
# --------------------------------------------------------------------------


def _fit_info(result: res.AlignmentResult, name: str) -> dict:
    """Fit keywords for a file's header from its last fitted row."""
    rows = [r for r in result.summary if r["image"] == name and r["n_fit"] > 0]
    info = {"fitgeom": result.fitgeom} if result.fitgeom else {}
    if rows:
        info["nmatches"] = int(rows[-1]["n_fit"])
        if math.isfinite(rows[-1]["rmse"]):
            info["rmse"] = float(rows[-1]["rmse"])
            info["mae"] = float(rows[-1]["mae"])
    return info | _tie_info(result.absolute)


def _tie_info(tie) -> dict:
    """Header keywords of an applied absolute tie (none without one)."""
    if tie is None or not tie.ok:
        return {}
    info = {
        "tie_nmatch": int(tie.n_matches),
        "tie_rms": float(tie.rms_mas),
        "tie_grade": tie.grade.value,
    }
    if tie.catalog:
        info["refcat"] = tie.catalog[:68]
    return info


def _commit(updates: Sequence, *, dry_run: bool, force: bool) -> list:
    """Write a set of prepared updates all together, or none of them.

    ``updates`` are callables ``(dry_run) -> UpdateReport | PendingWrite``:
    a dry run only collects the reports; otherwise every file is first
    written next to its target, then :func:`~subpixal_jax.io.transaction.commit_set`
    renames them all (rolling back on failure).
    """
    if dry_run:
        return [update(True) for update in updates]
    pending = []
    try:
        for update in updates:
            pending.append(update(False))
    except BaseException:
        discard(pending)
        raise
    pending = [p for p in pending if p is not None]
    report = commit_set(pending, force=force)
    log.info("%s", report)
    return [p.info for p in pending]


def _in_file_frames(path, final: dict, extname: str) -> dict:
    """Return the corrected chip WCSs, each in the celestial frame of its file.

    A set that mixes frames is aligned in the grid's frame; each file keeps
    its own (e.g. FK5), converted back exactly.
    """
    out = {}
    for ext, wcs in final.items():
        frame = celestial_frame(WCS(fits.getheader(path, (extname, ext))))
        if not celestial_frame(wcs).is_equivalent_frame(frame):
            wcs = convert_wcs_frame(wcs, frame)
        out[(extname, ext)] = wcs
    return out


def _updater(path, wcs_by_ext, **kwargs):
    """Defer the update of one file: a report (dry run) or a prepared write.

    ``kwargs`` are :func:`~subpixal_jax.io.wcs.prepare_exposure_update`'s
    (``wcsname``, ``output``, ``fit_info``, ``force``).
    """

    def update(dry_run: bool):
        if dry_run:
            return update_exposure_wcs(path, wcs_by_ext, dry_run=True, **kwargs)
        return prepare_exposure_update(path, wcs_by_ext, **kwargs)

    return update


def write_corrections(
    result: res.AlignmentResult,
    files: Sequence[str | os.PathLike],
    *,
    wcsname: str = "SUBPIXAL",
    output_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
    extname: str = "SCI",
    policy: WritePolicy | None = None,
) -> list:
    """Write the corrected WCS of every image whose verdict allows it.

    Only images whose correction passes
    :func:`subpixal_jax.pipeline.verdict.image_reports`
    (converged, enough sources, consistent residuals, significant) are
    written; images never aligned (failed, skipped, the fixed reference) are
    never touched. Each file keeps its old primary WCS under an alternate key,
    and the set is committed all together or not at all
    (:func:`subpixal_jax.io.transaction.commit_set`).

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
    policy : WritePolicy, optional
        Verdict thresholds, ``force`` (write refused corrections and read-only
        files) and ``apply_insignificant``.

    Returns
    -------
    list of UpdateReport
        One per written (or, with ``dry_run``, would-be written) file.

    Raises
    ------
    subpixal_jax.io.transaction.CommitError
        If the set could not be written; its message says exactly which
        files changed (normally none).
    """
    if len(files) != len(result.names):
        msg = f"files has {len(files)} entries but the result has {len(result.names)}"
        raise ValueError(msg)
    policy = policy or WritePolicy()
    updates = []
    for path, verdict, final in zip(
        files, image_reports(result, policy), result.final_wcs, strict=True
    ):
        if not verdict.write:
            log.info("%s: left unchanged (%s)", path, verdict.reason)
            continue
        updates.append(
            _updater(
                path,
                _in_file_frames(path, final, extname),
                wcsname=wcsname,
                output=output_dir,
                fit_info=_fit_info(result, verdict.name),
                force=policy.force,
            )
        )
    return _commit(updates, dry_run=dry_run, force=policy.force)


def align_files(  # noqa: PLR0913  # seed signature (plus keyword-only options)
    files: Sequence[str | os.PathLike],
    *,
    in_place: bool = False,
    output_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
    wcsname: str = "SUBPIXAL",
    summary: str | os.PathLike | None = None,
    dq_bits: int | str | None = 0,
    pixel_scale: float | None = None,
    rotation: float | None = None,
    catalog=None,
    policy: WritePolicy | None = None,
    checked: CheckedInputs | None = None,
    **align_options,
) -> tuple[res.AlignmentResult, list]:
    """Align FITS files with the default drizzle reference and photutils catalog.

    Every input and output place is checked first
    (:func:`subpixal_jax.io.preflight.check_inputs`: unreadable, truncated or
    unsupported files, missing WCS, duplicates, empty images, unwritable
    targets — all reported at once, before any computation); temporary files
    of an interrupted earlier commit are finished or rolled back. Then the
    files are drizzled onto one undistorted grid, sources detected,
    :func:`align_images` run, and the corrections that pass the verdict
    written, all together or not at all.

    Parameters
    ----------
    files : sequence of path
        Exposures: multi-extension FITS with SCI (and ERR, DQ) extensions.
    in_place : bool, optional
        Update the files themselves (old WCS archived, atomic set commit).
    output_dir : path, optional
        Write updated copies into this directory instead (created if its
        parent exists).
    dry_run : bool, optional
        Report what would change, write nothing.
    wcsname : str, optional
        Name of the new WCS.
    summary : path, optional
        Write the per-image, per-iteration summary (with the solution in its
        metadata, for :func:`apply_solution`) to this ECSV file.
    dq_bits : int or str, optional
        DQ bits to ignore ("4,8", "~4+8" syntax accepted).
    pixel_scale : float, optional
        Drizzle pixel scale (arcsec); default the first image's.
    rotation : float, optional
        Orientation of the drizzle grid's y axis (degrees East of North);
        default north up.
    catalog : ImageCatalog, optional
        Source finder; default
        :class:`~subpixal_jax.reference.catalog.PhotutilsCatalog` with moment
        centroids, or windowed ones when ``reference_catalog`` asks for an
        absolute tie.
    policy : WritePolicy, optional
        Which corrections are written (:mod:`subpixal_jax.pipeline.verdict`); its
        ``force`` also allows updating read-only files.
    checked : CheckedInputs, optional
        The result of an earlier :func:`~subpixal_jax.io.preflight.check_inputs`
        of these same arguments (the CLI checks before loading JAX), so the
        files are not checked twice.
    **align_options
        Passed to :func:`align_images`: the options by name (``fitgeom``,
        ``nmax``, ``cr_reject``, ...) or ``options=AlignOptions(...)``, and
        ``on_iteration``, ``progress``, ``throw``.

    Returns
    -------
    result : AlignmentResult
        The alignment.
    reports : list of UpdateReport
        What was (or, with ``dry_run``, would be) written; empty when none
        of ``in_place``, ``output_dir`` and ``dry_run`` was given.
    """
    from subpixal_jax.reference.resample import DrizzleResample

    policy = policy or WritePolicy()
    if in_place and output_dir is not None:
        msg = "give either in_place=True or output_dir, not both"
        raise ValueError(msg)
    checked = checked or check_inputs(
        files,
        in_place=in_place and not dry_run,
        output_dir=output_dir,
        summary=summary,
        wcsname=wcsname,
        force=policy.force,
        dq_bits=dq_bits,
    )
    for note in checked.notes:
        log.warning("%s", note)
    if in_place and not dry_run:
        recovered = recover(checked.paths)
        for path in (*recovered.completed, *recovered.rolled_back):
            log.warning("%s: finished an interrupted earlier commit", path)
    files = list(checked.paths)
    jwst_exposures = _jwst_exposures(files)
    log.info("reading and drizzling %d files", len(files))
    start = time.perf_counter()
    resample = DrizzleResample(
        jwst_exposures or files,
        kernel=FINAL_KERNEL,
        early_kernel=EARLY_KERNEL,
        dq_bits=dq_bits,
        pixel_scale=pixel_scale,
        rotation=rotation or 0.0,
    )
    log.info(
        "drizzle grid %d x %d px ready in %.1f s",
        *resample.output_shape[::-1],
        time.perf_counter() - start,
    )
    result = align_images(
        catalog if catalog is not None else _default_catalog(align_options),
        resample,
        **align_options,
    )
    if summary is not None:
        result.write_summary(summary)
    if not (in_place or output_dir is not None or dry_run):
        return result, []
    if output_dir is not None and not dry_run:
        Path(output_dir).mkdir(exist_ok=True)
    if jwst_exposures:
        return result, _write_jwst(
            result, jwst_exposures, wcsname, output_dir, dry_run, policy
        )
    reports = write_corrections(
        result,
        files,
        wcsname=wcsname,
        output_dir=output_dir,
        dry_run=dry_run,
        policy=policy,
    )
    return result, reports


def _is_jwst(path: Path) -> bool:
    """Tell a JWST data-model file (its gWCS lives in an ASDF extension)."""
    with fits.open(path) as hdul:
        return any(h.name == "ASDF" for h in hdul)


def _jwst_exposures(files: Sequence[Path]) -> list | None:
    """Read the files as JWST exposures (detectors grouped); None for FITS WCS.

    Raises
    ------
    InputError
        If the set mixes JWST (gWCS) files and FITS-WCS files.
    """
    kinds = [_is_jwst(f) for f in files]
    if not any(kinds):
        return None
    if not all(kinds):
        kind = {True: "a JWST file (gWCS)", False: "a FITS-WCS file"}
        raise InputError(
            [
                (str(f), f"{kind[k]}; a run cannot mix JWST files with FITS-WCS files")
                for f, k in zip(files, kinds, strict=True)
            ]
        )
    from subpixal_jax.io.jwst import read_jwst_exposures

    return read_jwst_exposures(files)


def _write_jwst(result, exposures, wcsname, output_dir, dry_run, policy) -> list:
    """Write the corrected gWCS of every JWST exposure whose verdict allows it.

    Every file of every written exposure is committed as one set
    (:func:`subpixal_jax.io.jwst.write_jwst_updates`).
    """
    from subpixal_jax.io.jwst import (
        JWSTUpdate,
        JWSTWriteOptions,
        solution_wcs,
        write_jwst_updates,
    )

    updates = []
    for exposure, verdict, final, solved in zip(
        exposures,
        image_reports(result, policy),
        result.final_wcs,
        solution_wcs(result),
        strict=True,
    ):
        if not verdict.write:
            log.info("%s: left unchanged (%s)", exposure.name, verdict.reason)
            continue
        updates.append(
            JWSTUpdate(
                exposure,
                final if solved is None else solved,
                _fit_info(result, verdict.name),
            )
        )
    return write_jwst_updates(
        updates,
        options=JWSTWriteOptions(wcsname=wcsname),
        output_dir=output_dir,
        dry_run=dry_run,
        force=policy.force,
    )


def apply_solution(
    solution: str | os.PathLike,
    files: Sequence[str | os.PathLike],
    *,
    wcsname: str = "SUBPIXAL",
    output_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
    extname: str = "SCI",
    force: bool = False,
) -> list:
    """Apply corrections stored in a summary ECSV to files' current WCSs.

    The summary written by :func:`align_files` (or
    :meth:`AlignmentResult.write_summary`) holds each image's total correction
    (matrix and shift about a centre in the fit frame), the fit frame's WCS,
    and fingerprints of the WCS each image was fitted from and of the one the
    correction gives. Files are matched to images by file name. Applying is
    idempotent: a file that already carries the corrected WCS is left alone
    (with a message); a file whose WCS is neither is refused unless
    ``force``. The set is written all together or not at all.

    JWST files (gWCS) are grouped into exposures as :func:`align_files`
    groups them and matched to images by exposure name; the correction goes
    into each detector's gWCS as there (:mod:`subpixal_jax.io.jwst`), and the
    fingerprints are those of the exposure's gWCSs, so an exposure's
    detector files are applied together (a subset of them is refused as
    changed unless ``force``).

    Parameters
    ----------
    solution : path
        The summary ECSV.
    files : sequence of path
        Files to correct (their WCS must be the one the alignment started from).
    wcsname, output_dir, dry_run, extname
        As in :func:`write_corrections`.
    force : bool, optional
        Apply to files whose WCS is not the fitted one, and to read-only files.

    Returns
    -------
    list of UpdateReport or JWSTUpdateReport
        One per corrected file; files the alignment left unchanged (the fixed
        reference, failed images) and files already corrected are not
        rewritten.
    """
    from subpixal_jax.io.images import read_exposure

    solved = res.read_solution(solution)
    fingerprints = res.read_fingerprints(solution)
    check_inputs(
        files,
        in_place=output_dir is None and not dry_run,
        output_dir=output_dir,
        wcsname=wcsname,
        force=force,
        min_files=1,
        check_data=False,
    )
    jwst_exposures = _jwst_exposures([Path(f) for f in files])
    if jwst_exposures:
        names = [Path(e.name).name for e in jwst_exposures]
    else:
        names = [Path(f).name for f in files]
    wcslin, center, stored = solved
    missing = [n for n in names if n not in stored]
    if missing:
        msg = f"{solution} has no correction for {missing}"
        raise ValueError(msg)
    if output_dir is not None and not dry_run:
        Path(output_dir).mkdir(exist_ok=True)
    if jwst_exposures:
        return _apply_jwst(
            solved,
            fingerprints,
            jwst_exposures,
            wcsname=wcsname,
            output_dir=output_dir,
            dry_run=dry_run,
            force=force,
        )
    updates = []
    for path in files:
        name = Path(path).name
        if stored[name] is None:
            log.info("%s: left unchanged by the alignment, not rewritten", path)
            continue
        fp = fingerprints.get(name)
        state = None if fp is None else classify_target(path, *fp, extname=extname)
        if not _may_apply(path, state, force):
            continue
        correction = stored[name]
        exposure = read_exposure(path, extname=extname)
        new = {
            (extname, chip.extver): correct_wcs(
                chip.wcs,
                wcslin,
                correction.matrix,
                correction.shift,
                center=center,
                fitgeom="general",
            )
            for chip in exposure.chips
        }
        updates.append(
            _updater(
                path,
                new,
                wcsname=wcsname,
                output=output_dir,
                fit_info=None,
                force=force,
            )
        )
    return _commit(updates, dry_run=dry_run, force=force)


def _apply_jwst(solved, fingerprints, exposures, **write) -> list:
    """Apply a stored solution to JWST exposures (matched by exposure name).

    ``write`` are :func:`subpixal_jax.io.jwst.write_jwst_updates`' ``output_dir``,
    ``dry_run`` and ``force``, and the ``wcsname``. Every corrected file of
    every exposure is committed as one set.
    """
    from subpixal_jax.io.jwst import (
        JWSTUpdate,
        JWSTWriteOptions,
        exposure_target_state,
        write_jwst_updates,
    )

    wcslin, center, stored = solved
    updates = []
    for exposure in exposures:
        name = Path(exposure.name).name
        correction = stored[name]
        if correction is None:
            log.info("%s: left unchanged by the alignment, not rewritten", name)
            continue
        fp = fingerprints.get(name)
        state = None if fp is None else exposure_target_state(exposure, *fp)
        if not _may_apply(name, state, write["force"]):
            continue
        new = {
            chip.extver: chip.wcs.corrected(
                wcslin, correction.matrix, correction.shift, center=center
            )
            for chip in exposure.chips
        }
        updates.append(JWSTUpdate(exposure, new))
    return write_jwst_updates(
        updates,
        options=JWSTWriteOptions(wcsname=write.pop("wcsname")),
        **write,
    )


def _may_apply(path, state: TargetState | None, force: bool) -> bool:
    """Whether a solution may be applied to ``path`` (idempotence check).

    ``state`` is what the file holds (None: the solution has no fingerprint).
    """
    if state is None:
        log.warning("%s: the solution has no WCS fingerprint; applying", path)
        return True
    if state is TargetState.ALREADY_APPLIED:
        log.warning("%s: already carries this solution's WCS; not rewritten", path)
        return False
    if state is TargetState.FOREIGN and not force:
        msg = (
            f"{path}: its WCS is neither the one this solution was fitted from "
            "nor the one it writes (changed since?); use force to apply anyway"
        )
        raise ValueError(msg)
    return True

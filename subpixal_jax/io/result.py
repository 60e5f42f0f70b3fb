"""Typed results of an alignment: per source, per image, per iteration.

Plain data only. Field names follow tweakwcs where a field has a tweakwcs
counterpart (``shift``, ``matrix``, ``rot``, ``scale``, ``skew``, ``rmse``,
``mae``, ``fitmask``, ``resids``) so users can switch between the two.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from subpixal_jax.core.linfit import LinearFit
from subpixal_jax.geometry.skywcs import SkyWCS
from subpixal_jax.geometry.transform import Affine, RefinedFit
from subpixal_jax.status import ImageOutcome, ImageStatus, RunOutcome

#: Text forms of the image statuses (summary tables, ECSV, the CLI).
SUCCESS = ImageStatus.SUCCESS.value
FAILED = ImageStatus.FAILED.value
SKIPPED = ImageStatus.SKIPPED.value
REFERENCE = ImageStatus.REFERENCE.value
NOT_CONVERGED = ImageStatus.NOT_CONVERGED.value


@dataclasses.dataclass(frozen=True)
class SourceMeasurements:
    """Per-source measurements of one image in one iteration.

    Attributes
    ----------
    src_id : ndarray of int, shape (N,)
        Catalog (segment) id of each source.
    extver : ndarray of int, shape (N,)
        Chip (``EXTVER``) the source was measured on.
    dxdy : ndarray of float, shape (N, 2)
        Displacement ``(dx, dy)`` in image pixels: position in the reference
        blot minus position in the image (docs/original.md §4.3). NaN where flagged.
    sigma : ndarray of float, shape (N, 2)
        1-sigma error of ``dxdy`` (image pixels).
    flags : ndarray of int, shape (N,)
        0 for a good measurement, otherwise
        :class:`~subpixal_jax.status.SourceFlag` bits.
    xy : ndarray of float, shape (N, 2)
        Predicted source positions in the fit frame (``wcslin`` pixels, 0-based).
    uv : ndarray of float, shape (N, 2)
        Measured source positions in the fit frame (``wcslin`` pixels, 0-based).
    weight : ndarray of float, shape (N,)
        Fit weight of each source.
    fitmask : ndarray of bool, shape (N,)
        Sources kept by the clipped fit.
    """

    src_id: np.ndarray
    extver: np.ndarray
    dxdy: np.ndarray
    sigma: np.ndarray
    flags: np.ndarray
    xy: np.ndarray
    uv: np.ndarray
    weight: np.ndarray
    fitmask: np.ndarray

    @property
    def n_sources(self) -> int:
        """Number of sources measured (good or flagged)."""
        return int(self.src_id.size)

    @property
    def n_good(self) -> int:
        """Number of sources with an unflagged, finite displacement."""
        return int(np.count_nonzero(self.flags == 0))


@dataclasses.dataclass(frozen=True)
class ImageFit:
    """The outcome for one image in one iteration.

    Attributes
    ----------
    name : str
        The image's file name or label.
    status : ImageOutcome
        SUCCESS, FAILED, SKIPPED, REFERENCE or NOT_CONVERGED, with a reason.
    fit : LinearFit or None
        The clipped linear fit (numpy values; ``resids`` and ``fitmask`` cut to
        the image's sources), or None when no fit was made.
    sources : SourceMeasurements or None
        Per-source measurements, or None when the image had no cutouts.
    irmse : float
        RMS of the fit residuals converted to image pixels (the original's
        ``irmse`` was the RMS of raw displacements).
    wcs_before, wcs_after : dict of int to WCS
        Each chip's WCS before and after this iteration's correction.
    correction : Affine or None
        The correction applied in this iteration (with ``joint`` it is the
        joint solution, not the image's own fit).
    refined : RefinedFit or None
        The transform refined through the blot (``refine='transform'``).
    extras : mapping
        Diagnostics kept when asked for (cutouts, blots).
    """

    name: str
    status: ImageOutcome
    fit: LinearFit | None
    sources: SourceMeasurements | None
    irmse: float
    wcs_before: dict[int, WCS]
    wcs_after: dict[int, WCS]
    correction: Affine | None = None
    refined: RefinedFit | None = None
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the image was aligned in this iteration."""
        return self.status.ok

    @property
    def shift(self) -> np.ndarray:
        """Measured shift ``(dx, dy)`` in fit-frame pixels (NaN without a fit).

        The refined transform's when there is one, else the clipped fit's.
        """
        if self.refined is not None:
            return self.refined.affine.shift
        if self.fit is None:
            return np.full(2, np.nan)
        return np.asarray(self.fit.shift, dtype=float)

    @property
    def shift_norm(self) -> float:
        """Length of the shift this iteration applied (fit-frame px; 0: reference).

        The correction's shift where one was applied, else :attr:`shift`.
        They differ under the joint solution, which leaves out what every
        image measures alike (a common bias the relative alignment cannot
        see): the run converges when the images stop moving, not when that
        bias vanishes.
        """
        if self.status.status is ImageStatus.REFERENCE:
            return 0.0
        if self.correction is not None:
            return float(np.hypot(*self.correction.shift))
        return float(np.hypot(*self.shift))


@dataclasses.dataclass(frozen=True)
class IterationResult:
    """All images of one iteration of the alignment loop.

    Attributes
    ----------
    iteration : int
        1-based iteration number.
    full_resample : bool
        Whether the catalog and sky were recomputed in this iteration.
    images : list of ImageFit
        One entry per input image, in input order.
    """

    iteration: int
    full_resample: bool
    images: list[ImageFit]

    @property
    def max_shift(self) -> float:
        """Largest fitted shift (fit-frame pixels) among aligned images."""
        shifts = [im.shift_norm for im in self.images if im.ok]
        return max(shifts) if shifts else math.nan


#: The record :func:`subpixal_jax.pipeline.align_step` returns.
IterationRecord = IterationResult


@dataclasses.dataclass(frozen=True)
class AlignmentResult:
    """What :func:`subpixal_jax.align_images` returns.

    Attributes
    ----------
    status : RunOutcome
        CONVERGED, MAX_ITERATIONS, STOPPED (by the callback), DIVERGED or
        FAILED, with a reason; compares equal to its text (``"CONVERGED"``).
    n_iterations : int
        Iterations run.
    history : list of IterationResult
        Kept per the ``history`` option (all, the last, or none).
    final_wcs : list of dict of int to WCS
        Each image's corrected chip WCSs after the last iteration.
    names : list of str
        Image names in input order.
    summary : list of dict
        One row per image and iteration (always kept; small).
    corrections : list of Affine or None
        Each image's total correction (None: never corrected).
    wcslin : WCS or None
        The fit frame.
    fitgeom : str
        The fit geometry.
    final_status : list of ImageOutcome
        Each image's outcome at the end of the run: a run that did not
        converge reports its fitted images NOT_CONVERGED, never SUCCESS.
    initial_wcs : list of dict of int to WCS
        Each image's chip WCSs before the alignment.
    captures : list of CaptureResult or None
        The capture stage's result per image (empty when it did not run).
    absolute : AbsoluteTie or None
        The tie to a reference catalog, when one was given (``grade``: a
        :class:`~subpixal_jax.status.TieGrade`; ``to_table`` stores it with
        the catalog name, matches and RMS under ``meta['absolute']``).
    """

    status: RunOutcome
    n_iterations: int
    history: list[IterationResult]
    final_wcs: list[dict[int, WCS]]
    names: list[str]
    summary: list[dict[str, Any]]
    corrections: list[Affine | None] = dataclasses.field(default_factory=list)
    wcslin: WCS | None = None
    fitgeom: str = ""
    final_status: list[ImageOutcome] = dataclasses.field(default_factory=list)
    initial_wcs: list[dict[int, WCS]] = dataclasses.field(default_factory=list)
    captures: list = dataclasses.field(default_factory=list)
    absolute: Any = None

    @property
    def center(self) -> np.ndarray | None:
        """Centre of the corrections (fit-frame pixels, 0-based)."""
        if self.wcslin is None:
            return None
        return np.asarray(self.wcslin.wcs.crpix, dtype=float) - 1.0

    @property
    def converged(self) -> bool:
        """True when every image's shift fell below ``eps_shift``."""
        return self.status.converged

    def to_table(self) -> Table:
        """Return the per-image, per-iteration summary as an astropy Table.

        The metadata holds the run's status and the solution: every image's
        total correction (``matrix``, ``shift`` about ``center`` in the fit
        frame, whose WCS header is ``wcslin``), so that it can be applied
        again later (:func:`subpixal_jax.align.apply_solution`).
        """
        table = Table(rows=self.summary) if self.summary else Table()
        table.meta["status"] = str(self.status)
        table.meta["n_iterations"] = self.n_iterations
        table.meta["fitgeom"] = self.fitgeom
        if self.final_status:
            table.meta["final_status"] = {
                Path(name).name: str(outcome)
                for name, outcome in zip(self.names, self.final_status, strict=True)
            }
        if self.absolute is not None:
            tie = self.absolute
            table.meta["absolute"] = {
                "status": tie.status.name,
                "grade": tie.grade.value,
                "catalog": tie.catalog,
                "reason": tie.reason,
                "n_matches": int(tie.n_matches),
                "rms_mas": float(tie.rms_mas),
                "shift": [float(v) for v in tie.shift],
                "shift_err_mas": [float(v) for v in np.ravel(tie.shift_err_mas)],
            }
        if self.wcslin is not None:
            table.meta["wcslin"] = self.wcslin.to_header_string(relax=True)
            table.meta["center"] = [float(v) for v in self.center]
            # Images never corrected (the fixed reference, or failed ones)
            # are listed with null entries: applying leaves them unchanged.
            table.meta["solution"] = {
                Path(name).name: self._solution_entry(i)
                for i, name in enumerate(self.names)
            }
        return table

    def _solution_entry(self, i: int) -> dict[str, Any]:
        """Return the stored correction of image ``i`` and its WCS fingerprints.

        The fingerprints (of the WCS fitted from and of the corrected one)
        make applying the solution idempotent.
        """
        from subpixal_jax.io.wcs import wcs_fingerprint

        c = self.corrections[i]
        if c is None:
            return {"matrix": None, "shift": None}
        entry = {"matrix": c.matrix.tolist(), "shift": c.shift.tolist()}
        if self.initial_wcs:
            entry["fitted_fingerprint"] = wcs_fingerprint(self.initial_wcs[i])
            entry["result_fingerprint"] = wcs_fingerprint(self.final_wcs[i])
        return entry

    def write_summary(self, path) -> None:
        """Write :meth:`to_table` to ``path`` as ECSV (never to the cwd implicitly).

        A run on gWCS exposures (JWST) stores its gWCSs' fingerprints
        (:func:`subpixal_jax.io.jwst.write_gwcs_summary`).
        """
        if any(
            isinstance(w, SkyWCS) for chips in self.initial_wcs for w in chips.values()
        ):
            from subpixal_jax.io.jwst import write_gwcs_summary

            write_gwcs_summary(self, path)
            return
        self.to_table().write(path, format="ascii.ecsv", overwrite=True)


_NAN2 = (math.nan, math.nan)


def _transform_columns(image: ImageFit) -> dict[str, float]:
    """dx, dy, rotations, scales, skew and errors of the image's transform."""
    if image.refined is not None:
        r = image.refined
        shift, shift_err, rot, scale, skew = (
            r.affine.shift,
            r.shift_err,
            r.rot,
            r.scale,
            r.skew,
        )
        rot_err = math.nan  # the refinement's covariance is of its own parameters
    elif image.fit is not None:
        f = image.fit
        shift, shift_err, rot, scale, skew = (
            f.shift,
            f.shift_err,
            f.rot,
            f.scale,
            f.skew,
        )
        rot_err = float(np.mean(f.rot_err))
    else:
        shift = shift_err = rot = scale = _NAN2
        skew = rot_err = math.nan
    return {
        "dx": float(shift[0]),
        "dy": float(shift[1]),
        "dx_err": float(shift_err[0]),
        "dy_err": float(shift_err[1]),
        "rot_x": float(rot[0]),
        "rot_y": float(rot[1]),
        "rot_err": rot_err,
        "scale_x": float(scale[0]),
        "scale_y": float(scale[1]),
        "skew": float(skew),
    }


def predicted_rms(sources: SourceMeasurements | None) -> float:
    """Return the fit RMS the kept sources' position errors predict (NaN: unknown).

    With weights ``w = 1/σ²`` the weighted mean square residual of a correct
    model is ``n / Σ w``; unit weights carry no error information.
    """
    if sources is None:
        return math.nan
    w = sources.weight[sources.fitmask]
    if w.size == 0 or np.all(w == 1.0):
        return math.nan
    return float(math.sqrt(w.size / np.sum(w)))


def summary_row(iteration: int, image: ImageFit) -> dict[str, Any]:
    """Flatten one image's iteration outcome into a summary-table row."""
    sources = image.sources
    fit = image.fit
    return {
        "iteration": iteration,
        "image": image.name,
        "status": str(image.status),
        "n_sources": 0 if sources is None else sources.n_sources,
        "n_good": 0 if sources is None else sources.n_good,
        "n_fit": int(np.count_nonzero(sources.fitmask)) if sources is not None else 0,
        **_transform_columns(image),
        "rmse": math.nan if fit is None else float(fit.rmse),
        "mae": math.nan if fit is None else float(fit.mae),
        "noise": predicted_rms(sources),
        "irmse": float(image.irmse),
    }


def read_fingerprints(path) -> dict[str, tuple[str, str]]:
    """Per file name, the (fitted, result) WCS fingerprints a summary stores.

    Files without fingerprints (summaries of earlier versions, images never
    corrected) are absent.
    """
    meta = Table.read(path, format="ascii.ecsv").meta
    return {
        name: (v["fitted_fingerprint"], v["result_fingerprint"])
        for name, v in meta.get("solution", {}).items()
        if "fitted_fingerprint" in v
    }


def read_solution(path) -> tuple[WCS, np.ndarray, dict]:
    """Read the solution stored in a summary ECSV.

    Parameters
    ----------
    path : path
        An ECSV written by :meth:`AlignmentResult.write_summary`.

    Returns
    -------
    wcslin : WCS
        The fit frame.
    center : ndarray, shape (2,)
        Centre of the corrections (fit-frame pixels, 0-based).
    corrections : dict
        File name -> Affine, or None for an image the alignment left
        unchanged.

    Raises
    ------
    ValueError
        If the file holds no solution.
    """
    meta = Table.read(path, format="ascii.ecsv").meta
    if "solution" not in meta or "wcslin" not in meta:
        msg = f"{path} holds no alignment solution (no 'solution'/'wcslin' metadata)"
        raise ValueError(msg)
    center = np.asarray(meta["center"], dtype=float)
    corrections = {
        name: None if v["matrix"] is None else Affine(v["matrix"], v["shift"], center)
        for name, v in meta["solution"].items()
    }
    return WCS(meta["wcslin"]), center, corrections

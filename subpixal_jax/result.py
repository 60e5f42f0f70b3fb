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

SUCCESS = "SUCCESS"
FAILED = "FAILED"
SKIPPED = "SKIPPED"
REFERENCE = "REFERENCE"

#: Per-source flag set by the alignment loop (above the kernels' peak flags)
#: for a source whose displacement was not finite.
FLAG_NOT_FINITE = 1 << 16


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
        blot minus position in the image (SPEC §4.3). NaN where flagged.
    sigma : ndarray of float, shape (N, 2)
        1-sigma error of ``dxdy`` (image pixels).
    flags : ndarray of int, shape (N,)
        0 for a good measurement, otherwise bit flags of the peak finder.
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
    status : str
        ``SUCCESS``, ``FAILED: <reason>``, ``SKIPPED: <reason>`` or
        ``REFERENCE`` (held fixed as the astrometric reference).
    fit : mapping or None
        The linear fit (fields of :class:`subpixal_jax.core.linfit.LinearFit`
        as numpy values), or None when no fit was made.
    sources : SourceMeasurements or None
        Per-source measurements, or None when the image had no cutouts.
    irmse : float
        RMS of the fit residuals converted to image pixels (the original's
        ``irmse`` was the RMS of raw displacements, SPEC §9.6).
    wcs_before, wcs_after : dict of int to WCS
        Each chip's WCS before and after this iteration's correction.
    extras : mapping
        Diagnostics kept when ``history`` asks for them (cutouts, blots,
        interlaced cross-correlation maps).
    """

    name: str
    status: str
    fit: Mapping[str, Any] | None
    sources: SourceMeasurements | None
    irmse: float
    wcs_before: dict[int, WCS]
    wcs_after: dict[int, WCS]
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the image was aligned in this iteration."""
        return self.status == SUCCESS

    @property
    def shift(self) -> np.ndarray:
        """Fitted shift ``(dx, dy)`` in fit-frame pixels (NaN without a fit)."""
        if self.fit is None:
            return np.full(2, np.nan)
        return np.asarray(self.fit["shift"], dtype=float)

    @property
    def shift_norm(self) -> float:
        """Length of :attr:`shift` (fit-frame pixels); 0 for the reference."""
        if self.status == REFERENCE:
            return 0.0
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


@dataclasses.dataclass(frozen=True)
class AlignmentResult:
    """What :func:`subpixal_jax.align_images` returns.

    Attributes
    ----------
    status : str
        ``CONVERGED``, ``MAX_ITERATIONS``, ``STOPPED`` (by the callback),
        ``DIVERGED`` or ``FAILED: <reason>``.
    n_iterations : int
        Iterations run.
    history : list of IterationResult
        Kept per the ``history`` argument (all, the last, or none).
    final_wcs : list of dict of int to WCS
        Each image's corrected chip WCSs after the last iteration.
    names : list of str
        Image names in input order.
    summary : list of dict
        One row per image and iteration (always kept; small).
    """

    status: str
    n_iterations: int
    history: list[IterationResult]
    final_wcs: list[dict[int, WCS]]
    names: list[str]
    summary: list[dict[str, Any]]
    corrections: list[tuple[np.ndarray, np.ndarray] | None] = dataclasses.field(
        default_factory=list
    )
    wcslin: WCS | None = None
    center: np.ndarray | None = None
    fitgeom: str = ""

    @property
    def converged(self) -> bool:
        """True when every image's shift fell below ``eps_shift``."""
        return self.status == "CONVERGED"

    def to_table(self) -> Table:
        """Return the per-image, per-iteration summary as an astropy Table.

        The metadata holds the run's status and the solution: every image's
        total correction (``matrix``, ``shift`` about ``center`` in the fit
        frame, whose WCS header is ``wcslin``), so that it can be applied
        again later (:func:`subpixal_jax.align.apply_solution`).
        """
        table = Table(rows=self.summary) if self.summary else Table()
        table.meta["status"] = self.status
        table.meta["n_iterations"] = self.n_iterations
        table.meta["fitgeom"] = self.fitgeom
        if self.wcslin is not None:
            table.meta["wcslin"] = self.wcslin.to_header_string(relax=True)
            table.meta["center"] = [float(v) for v in self.center]
            # Images never corrected (the fixed reference, or failed ones)
            # are listed with null entries: applying leaves them unchanged.
            table.meta["solution"] = {
                Path(name).name: {
                    "matrix": None if c is None else np.asarray(c[0], float).tolist(),
                    "shift": None if c is None else np.asarray(c[1], float).tolist(),
                }
                for name, c in zip(self.names, self.corrections, strict=True)
            }
        return table

    def write_summary(self, path) -> None:
        """Write :meth:`to_table` to ``path`` as ECSV (never to the cwd implicitly)."""
        self.to_table().write(path, format="ascii.ecsv", overwrite=True)


def summary_row(iteration: int, image: ImageFit) -> dict[str, Any]:
    """Flatten one image's iteration outcome into a summary-table row."""
    fit = image.fit or {}
    nan2 = (math.nan, math.nan)
    shift = fit.get("shift", nan2)
    rot = fit.get("rot", nan2)
    scale = fit.get("scale", nan2)
    shift_err = fit.get("shift_err", nan2)
    sources = image.sources
    return {
        "iteration": iteration,
        "image": image.name,
        "status": image.status,
        "n_sources": 0 if sources is None else sources.n_sources,
        "n_good": 0 if sources is None else sources.n_good,
        "n_fit": int(np.count_nonzero(sources.fitmask)) if sources is not None else 0,
        "dx": float(shift[0]),
        "dy": float(shift[1]),
        "dx_err": float(shift_err[0]),
        "dy_err": float(shift_err[1]),
        "rot_x": float(rot[0]),
        "rot_y": float(rot[1]),
        "rot_err": float(np.mean(fit.get("rot_err", math.nan))),
        "scale_x": float(scale[0]),
        "scale_y": float(scale[1]),
        "skew": float(fit.get("skew", math.nan)),
        "rmse": float(fit.get("rmse", math.nan)),
        "mae": float(fit.get("mae", math.nan)),
        "irmse": float(image.irmse),
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
        File name -> (matrix, shift), or None for an image the alignment
        left unchanged.

    Raises
    ------
    ValueError
        If the file holds no solution.
    """
    meta = Table.read(path, format="ascii.ecsv").meta
    if "solution" not in meta or "wcslin" not in meta:
        msg = f"{path} holds no alignment solution (no 'solution'/'wcslin' metadata)"
        raise ValueError(msg)
    corrections = {
        name: None
        if v["matrix"] is None
        else (np.asarray(v["matrix"], dtype=float), np.asarray(v["shift"], dtype=float))
        for name, v in meta["solution"].items()
    }
    return WCS(meta["wcslin"]), np.asarray(meta["center"], dtype=float), corrections

"""Whether an image's correction may be written: a verdict from evidence.

An alignment changes a user's files only where the evidence says the new
WCS is better. Each aligned image passes four tests, in this order:

1. **converged**: the run ended CONVERGED and the image's own last fit
   succeeded (a run that stopped at ``max_iterations``, diverged, or was
   stopped has not shown that its corrections are right);
2. **enough sources**: the final fit kept at least ``min_sources`` sources
   (default: twice the fit geometry's minimum, and at least 6);
3. **consistent residuals**: the fit's RMS is at most ``max_rmse_ratio``
   (default 10) times what the sources' own position errors predict — much
   larger residuals mean the transform does not describe the measurements
   (a wrong capture, a distortion the fit cannot follow). The limit is wide
   because catalog position errors are only roughly calibrated: on the
   simulator a correct fit's weighted RMS is 3–5x the catalog's prediction;
4. **significant**: the total correction is at least ``min_significance``
   (default 3) times its own 1-sigma error in shift or in rotation; a smaller
   correction is reported but not applied unless asked
   (``apply_insignificant``), since writing it would change the file by less
   than its uncertainty.

``force`` writes every aligned image whatever the verdict (the reason is
still reported). Images never corrected (the fixed reference, failed or
skipped images) are never written, with one exception: an absolute tie
moves the whole set, the fixed reference included, so the reference is
written with the others (its verdict follows the tie's own success).
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np

from subpixal_jax.core.linfit import FITGEOM_MIN_POINTS
from subpixal_jax.geometry.transform import Affine
from subpixal_jax.io.result import AlignmentResult
from subpixal_jax.status import ImageOutcome, ImageStatus


class Verdict(enum.Enum):
    """What happens to an image's file."""

    WRITE = "WRITE"
    #: Aligned, but the evidence does not support writing (see the reason).
    REFUSED = "REFUSED"
    #: Aligned and sound, but the correction is below its own noise.
    INSIGNIFICANT = "INSIGNIFICANT"
    #: Never corrected (reference, failed, skipped): nothing to write.
    UNCHANGED = "UNCHANGED"


@dataclasses.dataclass(frozen=True)
class ImageReport:
    """An image's total correction, its errors, and the write verdict.

    Attributes
    ----------
    name : str
        The image.
    outcome : ImageOutcome
        Its final status.
    correction : Affine or None
        Total correction (fit frame).
    dx, dy, dx_err, dy_err : float
        Total shift and its 1-sigma error (fit-frame pixels).
    image_scale : float
        Image pixels per fit-frame pixel.
    mas_per_px : float
        Milliarcseconds per fit-frame pixel.
    rot, rot_err : float
        Total rotation and its 1-sigma error (arcsec).
    scale_ppm : float
        Total scale change (parts per million).
    n_fit : int
        Sources kept by the last fit.
    rmse, noise : float
        The last fit's residual RMS and what the sources' errors predict
        (fit-frame pixels; NaN when unknown).
    significance : float
        The larger of ``|shift| / shift error`` and ``|rot| / rot error``.
    verdict : Verdict
        Whether the file is written.
    reason : str
        Why the file is left as it is (e.g. "the reference, held fixed"), or
        why a correction is written anyway; empty for a plain WRITE.
    """

    name: str
    outcome: ImageOutcome
    correction: Affine | None
    dx: float
    dy: float
    dx_err: float
    dy_err: float
    image_scale: float
    mas_per_px: float
    rot: float
    rot_err: float
    scale_ppm: float
    n_fit: int
    rmse: float
    noise: float
    significance: float
    verdict: Verdict
    reason: str = ""

    @property
    def write(self) -> bool:
        """True when the file is to be written."""
        return self.verdict is Verdict.WRITE


@dataclasses.dataclass(frozen=True)
class WritePolicy:
    """Thresholds of the verdict (see the module docstring)."""

    min_sources: int | None = None
    max_rmse_ratio: float = 10.0
    min_significance: float = 3.0
    apply_insignificant: bool = False
    force: bool = False


def _significance(shift, rot: float, row: dict, rot_err: float) -> float:
    """Larger of |shift|/error and |rot|/error (rotation and error in one unit)."""
    err = np.array([row.get("dx_err", math.nan), row.get("dy_err", math.nan)])
    with np.errstate(divide="ignore", invalid="ignore"):
        shift_sig = float(np.hypot(*(np.asarray(shift) / err)))
        rot_sig = abs(rot) / rot_err if rot_err > 0 else math.nan
    values = [v for v in (shift_sig, rot_sig) if math.isfinite(v)]
    return max(values) if values else math.nan


def _refusal(report_fields: dict, policy: WritePolicy, fitgeom: str) -> str:
    """Why an aligned image fails the first three tests ('' if it passes)."""
    outcome = report_fields["outcome"]
    if outcome.status is not ImageStatus.SUCCESS:
        return f"not written: {outcome}"
    need = policy.min_sources or max(2 * FITGEOM_MIN_POINTS[fitgeom], 6)
    if report_fields["n_fit"] < need:
        return f"not written: {report_fields['n_fit']} sources kept, {need} needed"
    ratio = report_fields["rmse"] / report_fields["noise"]
    if math.isfinite(ratio) and ratio > policy.max_rmse_ratio:
        return (
            f"not written: fit RMS {report_fields['rmse']:.4f} px is {ratio:.1f}x "
            f"what the measured errors predict ({report_fields['noise']:.4f} px)"
        )
    return ""


def _unaligned_reason(outcome: ImageOutcome) -> str:
    """Why an image without a correction is left as it is."""
    if outcome.status is ImageStatus.REFERENCE:
        return "the reference, held fixed"
    return f"not aligned ({outcome})"


def image_reports(
    result: AlignmentResult, policy: WritePolicy | None = None
) -> list[ImageReport]:
    """Each image's total correction and write verdict.

    Parameters
    ----------
    result : AlignmentResult
        A finished alignment.
    policy : WritePolicy, optional
        Thresholds and overrides (default: the documented ones).

    Returns
    -------
    list of ImageReport
        One per image, in input order.
    """
    policy = policy or WritePolicy()
    last = {
        r["image"]: r for r in result.summary if r["iteration"] == result.n_iterations
    }
    with_fit = {r["image"]: r for r in result.summary if r["n_fit"] > 0}
    mas_per_px = 1000.0 * 3600.0 * _frame_scale(result)
    reports = []
    for name, outcome, correction in zip(
        result.names, result.final_status, result.corrections, strict=True
    ):
        row = with_fit.get(name, last.get(name, {}))
        fields = {
            "name": name,
            "outcome": outcome,
            "correction": correction,
            "n_fit": int(row.get("n_fit", 0)),
            "rmse": float(row.get("rmse", math.nan)),
            "noise": float(row.get("noise", math.nan)),
            "dx_err": float(row.get("dx_err", math.nan)),
            "dy_err": float(row.get("dy_err", math.nan)),
            "image_scale": float(row.get("irmse", math.nan) / row.get("rmse", math.nan))
            if row.get("rmse", 0) > 0
            else math.nan,
            "mas_per_px": mas_per_px,
        }
        rot_err = 3600.0 * float(row.get("rot_err", math.nan))
        if correction is None:
            verdict, reason = Verdict.UNCHANGED, _unaligned_reason(outcome)
            fields |= {"dx": 0.0, "dy": 0.0, "rot": 0.0, "scale_ppm": 0.0}
            significance = math.nan
        else:
            parts = correction.describe("rscale")
            fields |= {
                "dx": float(correction.shift[0]),
                "dy": float(correction.shift[1]),
                "rot": 3600.0 * float(parts["proper_rot"]),
                "scale_ppm": 1e6 * (float(parts["mean_scale"]) - 1.0),
            }
            significance = _significance(correction.shift, fields["rot"], row, rot_err)
            verdict, reason = (
                (Verdict.WRITE, "moved by the absolute tie")
                if _tied_reference(result, outcome)
                else _verdict(fields, significance, policy, result.fitgeom)
            )
        reports.append(
            ImageReport(
                **fields,
                rot_err=rot_err,
                significance=significance,
                verdict=verdict,
                reason=reason,
            )
        )
    return reports


def _tied_reference(result: AlignmentResult, outcome: ImageOutcome) -> bool:
    """Tell whether this is the fixed reference, moved with the set by a tie."""
    tie = result.absolute
    return outcome.status is ImageStatus.REFERENCE and tie is not None and tie.ok


def _verdict(fields, significance, policy, fitgeom) -> tuple[Verdict, str]:
    refusal = _refusal(fields, policy, fitgeom)
    if refusal:
        return (
            (Verdict.WRITE, f"forced ({refusal})")
            if policy.force
            else (
                Verdict.REFUSED,
                refusal,
            )
        )
    if significance < policy.min_significance:
        why = f"correction {significance:.1f} sigma < {policy.min_significance:g} sigma"
        if policy.apply_insignificant or policy.force:
            return Verdict.WRITE, f"applied although {why}"
        return Verdict.INSIGNIFICANT, f"not applied: {why} (apply_insignificant)"
    return Verdict.WRITE, ""


def _frame_scale(result: AlignmentResult) -> float:
    """Fit-frame pixel scale in degrees."""
    if result.wcslin is None:
        return math.nan
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(result.wcslin.celestial)))

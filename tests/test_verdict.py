"""The write verdict: from the evidence of a finished run, per image."""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.wcs import WCS

from subpixal_jax.geometry.transform import Affine
from subpixal_jax.io.result import AlignmentResult
from subpixal_jax.pipeline.verdict import Verdict, WritePolicy, image_reports
from subpixal_jax.status import ImageOutcome, ImageStatus, RunOutcome, RunStatus

CENTER = np.array([100.0, 100.0])


def _wcslin():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [101.0, 101.0]
    w.wcs.crval = [10.0, 20.0]
    w.wcs.cdelt = [-0.05 / 3600, 0.05 / 3600]
    return w


def _row(name, **values):
    row = {
        "iteration": 3,
        "image": name,
        "status": "SUCCESS",
        "n_fit": 50,
        "dx": 0.0,
        "dy": 0.0,
        "dx_err": 0.002,
        "dy_err": 0.002,
        "rot_err": 1e-5,
        "rmse": 0.02,
        "noise": 0.02,
        "irmse": 0.02,
    }
    return row | values


def _result(rows, corrections, statuses, run=RunStatus.CONVERGED):
    names = [r["image"] for r in rows]
    return AlignmentResult(
        RunOutcome(run),
        3,
        [],
        [{} for _ in names],
        names,
        rows,
        corrections=corrections,
        wcslin=_wcslin(),
        fitgeom="rscale",
        final_status=[ImageOutcome(s) for s in statuses],
    )


def _shift(dx, dy):
    return Affine(np.eye(2), np.array([dx, dy]), CENTER)


def test_a_sound_correction_is_written_with_its_numbers():
    result = _result(
        [_row("ref.fits"), _row("a.fits")],
        [None, _shift(0.8, -0.3)],
        [ImageStatus.REFERENCE, ImageStatus.SUCCESS],
    )
    ref, a = image_reports(result)
    assert ref.verdict is Verdict.UNCHANGED
    assert ref.reason == "the reference, held fixed"
    assert a.verdict is Verdict.WRITE
    assert a.reason == ""
    assert a.dx == pytest.approx(0.8)
    assert a.dy == pytest.approx(-0.3)
    assert a.significance == pytest.approx(math.hypot(0.8, 0.3) / 0.002)
    assert a.mas_per_px == pytest.approx(50.0)
    assert a.image_scale == pytest.approx(1.0)


def test_not_converged_is_refused_unless_forced():
    result = _result(
        [_row("a.fits", status="NOT_CONVERGED: run ended MAX_ITERATIONS")],
        [_shift(23.0, 1.0)],
        [ImageStatus.NOT_CONVERGED],
        run=RunStatus.MAX_ITERATIONS,
    )
    (a,) = image_reports(result)
    assert a.verdict is Verdict.REFUSED
    assert "NOT_CONVERGED" in a.reason
    (forced,) = image_reports(result, WritePolicy(force=True))
    assert forced.write
    assert forced.reason.startswith("forced")


def test_too_few_sources_and_inconsistent_residuals_are_refused():
    result = _result(
        [_row("few.fits", n_fit=5), _row("bad.fits", rmse=0.5, noise=0.02)],
        [_shift(1.0, 0.0), _shift(1.0, 0.0)],
        [ImageStatus.SUCCESS, ImageStatus.SUCCESS],
    )
    few, bad = image_reports(result)
    assert few.verdict is Verdict.REFUSED
    assert "5 sources kept, 6 needed" in few.reason
    assert bad.verdict is Verdict.REFUSED
    assert "25.0x" in bad.reason


def test_insignificant_correction_is_reported_not_applied():
    result = _result(
        [_row("a.fits", dx_err=0.01, dy_err=0.01)],
        [_shift(0.01, 0.01)],
        [ImageStatus.SUCCESS],
    )
    (a,) = image_reports(result)
    assert a.verdict is Verdict.INSIGNIFICANT
    assert a.significance == pytest.approx(math.sqrt(2))
    (applied,) = image_reports(result, WritePolicy(apply_insignificant=True))
    assert applied.write
    assert "applied although" in applied.reason


def test_rotation_alone_can_be_significant():
    theta = np.deg2rad(10 * 1e-5)  # 10 sigma of a 1e-5 deg error
    matrix = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    result = _result(
        [_row("a.fits")],
        [Affine(matrix, np.zeros(2), CENTER)],
        [ImageStatus.SUCCESS],
    )
    (a,) = image_reports(result)
    assert a.significance == pytest.approx(10.0, rel=1e-6)
    assert a.rot == pytest.approx(10 * 1e-5 * 3600, rel=1e-6)
    assert a.write


def test_the_fixed_reference_moved_by_an_absolute_tie_is_written():
    tie = _shift(2.0, -1.0)
    result = _result(
        [_row("ref.fits", n_fit=0), _row("a.fits")],
        [tie, _shift(0.8, -0.3).then(tie)],
        [ImageStatus.REFERENCE, ImageStatus.SUCCESS],
    )
    untied = image_reports(result)[0]
    assert untied.verdict is Verdict.REFUSED  # a correction with no tie behind it
    tied = dataclasses.replace(result, absolute=SimpleNamespace(ok=True))
    ref, a = image_reports(tied)
    assert ref.verdict is Verdict.WRITE
    assert ref.reason == "moved by the absolute tie"
    assert (ref.dx, ref.dy) == pytest.approx((2.0, -1.0))
    assert a.verdict is Verdict.WRITE
    failed = dataclasses.replace(tied, absolute=SimpleNamespace(ok=False))
    assert image_reports(failed)[0].verdict is Verdict.REFUSED


def test_an_image_without_correction_says_why():
    result = _result(
        [_row("ref.fits"), _row("a.fits")],
        [None, None],
        [ImageStatus.REFERENCE, ImageStatus.FAILED],
    )
    ref, a = image_reports(result)
    assert (ref.verdict, a.verdict) == (Verdict.UNCHANGED, Verdict.UNCHANGED)
    assert ref.reason == "the reference, held fixed"
    assert a.reason == "not aligned (FAILED)"

"""Stored solutions applied to JWST files, and JWST sets written all or nothing.

The solution is built the way the alignment loop builds it (each iteration's
correction composed into the chips' gWCSs, the totals composed as
:class:`~subpixal_jax.geometry.transform.Affine`), without running the loop, so these
tests take seconds; the slow end-to-end test in ``test_jwst_align.py``
applies the summary of a real alignment.
"""

import math
import os
import shutil
import stat

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

pytest.importorskip("gwcs")
datamodels = pytest.importorskip("stdatamodels.jwst.datamodels")

from subpixal_jax.align import apply_solution  # noqa: E402
from subpixal_jax.apps.cli import EXIT_OK, EXIT_USAGE, main  # noqa: E402
from subpixal_jax.geometry.transform import Affine  # noqa: E402
from subpixal_jax.io import jwst  # noqa: E402
from subpixal_jax.io import result as res  # noqa: E402
from subpixal_jax.io.transaction import CommitError  # noqa: E402
from subpixal_jax.simulate_jwst import (  # noqa: E402
    PIXEL_SCALE,
    JWSTSimConfig,
    PointingError,
    simulate_jwst_exposures,
)
from subpixal_jax.status import RunOutcome, RunStatus  # noqa: E402

SHAPE = (64, 64)
PIX_DEG = PIXEL_SCALE / 3600.0


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    config = JWSTSimConfig(
        n_exposures=3,
        errors=(
            PointingError((0.0, 0.0)),
            PointingError((1.2, -0.7), 0.02),
            PointingError((-0.6, 0.9), -0.01),
        ),
        shape=SHAPE,
        n_stars=20,
        n_galaxies=4,
    )
    return simulate_jwst_exposures(
        tmp_path_factory.mktemp("jwst_apply"), config, seed=5
    )


def _wcslin():
    lin = WCS(naxis=2)
    lin.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    lin.wcs.crval = [53.161, -27.782]
    lin.wcs.cd = PIX_DEG * np.array([[-1.0, 0.0], [0.0, 1.0]])
    lin.wcs.crpix = [301.0, 251.0]
    lin.wcs.set()
    return lin


def _step(rot_deg, shift, scale=1.0):
    a = math.radians(rot_deg)
    m = scale * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    return Affine(m, np.asarray(shift, float), np.array([300.0, 250.0]))


#: Per exposure, the corrections of two iterations (None: the reference).
STEPS = [
    None,
    [_step(-0.02, (-1.1, 0.6), 1.00002), _step(0.001, (-0.08, 0.05))],
    [_step(0.01, (0.55, -0.85)), _step(-0.0005, (0.04, -0.03), 0.99999)],
]


def _copy(sim, folder):
    folder.mkdir()
    out = []
    for paths in sim.paths:
        for p in paths:
            shutil.copy(p, folder / p.name)
            out.append(folder / p.name)
    return out


def _solved(files):
    """A result as the loop leaves it: sequential gWCS corrections, totals."""
    lin = _wcslin()
    exposures = jwst.read_jwst_exposures(files)
    initial = [{c.extver: c.wcs for c in e.chips} for e in exposures]
    final, totals = [], []
    for wcs, steps in zip(initial, STEPS, strict=True):
        total = None
        for step in steps or []:
            wcs = {
                k: w.corrected(lin, step.matrix, step.shift, center=step.center)
                for k, w in wcs.items()
            }
            total = (total or Affine.identity(step.center)).then(step)
        final.append(wcs)
        totals.append(total)
    result = res.AlignmentResult(
        status=RunOutcome(RunStatus.CONVERGED),
        n_iterations=2,
        history=[],
        final_wcs=final,
        names=[e.name for e in exposures],
        summary=[],
        corrections=totals,
        wcslin=lin,
        fitgeom="general",
        initial_wcs=initial,
    )
    return exposures, result


def _updates(exposures, result):
    """What align_files writes: the stored totals applied once."""
    pairs = zip(exposures[1:], jwst.solution_wcs(result)[1:], strict=True)
    return [jwst.JWSTUpdate(e, w) for e, w in pairs]


def _px(a: jwst.GWCSAdapter, b: jwst.GWCSAdapter) -> float:
    ny, nx = a.array_shape
    xx, yy = np.meshgrid(np.linspace(-0.5, nx - 0.5, 9), np.linspace(-0.5, ny - 0.5, 9))
    ua, ub = jwst._unit(*a.pixel_to_sky(xx, yy)), jwst._unit(*b.pixel_to_sky(xx, yy))
    return float(np.degrees(np.max(np.linalg.norm(ua - ub, axis=-1))) / PIX_DEG)


def _chips(files):
    return {
        p.name: c.wcs
        for e in jwst.read_jwst_exposures(files)
        for p, c in zip(e.paths.values(), e.chips, strict=True)
    }


def test_apply_equals_the_alignment_write_and_is_idempotent(sim, tmp_path):
    aligned = _copy(sim, tmp_path / "aligned")
    exposures, result = _solved(aligned)
    summary = tmp_path / "solution.ecsv"
    result.write_summary(summary)
    fps = res.read_fingerprints(summary)
    assert sorted(fps) == sorted(e.name for e in exposures[1:])
    updates = _updates(exposures, result)
    written = jwst.write_jwst_updates(updates)
    assert [r.changed for r in written] == [True] * 4

    copies = _copy(sim, tmp_path / "copies")
    before = {p: p.read_bytes() for p in copies}
    reports = apply_solution(summary, copies)
    assert len(reports) == 4
    assert all(r.changed and r.sip_max_error <= 0.02 for r in reports)
    # The reference exposure is not rewritten.
    assert all(p.read_bytes() == before[p] for p in copies[:2])
    ours, theirs = _chips(copies), _chips(aligned)
    assert max(_px(ours[n], theirs[n]) for n in ours) == 0.0
    # The loop's own gWCSs (one correction per iteration) are 6e-9 px away.
    loop = {
        p.name: result.final_wcs[i][k]
        for i, e in enumerate(exposures[1:], start=1)
        for k, p in e.paths.items()
    }
    assert max(_px(ours[n], loop[n]) for n in loop) <= 2e-8
    with datamodels.open(copies[2]) as model:  # a valid data model
        model.validate()
        assert "v2v3corr" in model.meta.wcs.available_frames
        assert len(model.meta.subpixal_jax.wcs_archive) == 1
    # A second apply, and an apply to the aligned files, change nothing.
    stamps = {p: p.stat().st_mtime_ns for p in copies + aligned}
    assert apply_solution(summary, copies) == []
    assert apply_solution(summary, aligned) == []
    assert {p: p.stat().st_mtime_ns for p in copies + aligned} == stamps


def test_apply_refuses_a_changed_gwcs_unless_forced(sim, tmp_path, capsys):
    files = _copy(sim, tmp_path / "files")
    exposures, result = _solved(files)
    summary = tmp_path / "solution.ecsv"
    result.write_summary(summary)
    # Someone else corrected exposure 2 since the fit.
    other = {
        c.extver: c.wcs.with_plane_correction(np.eye(2), [0.05, 0.0])
        for c in exposures[2].chips
    }
    jwst.update_jwst_exposure_wcs(exposures[2], other, wcsname="OTHER")
    before = {p: p.read_bytes() for p in files}
    with pytest.raises(ValueError, match="neither the one"):
        apply_solution(summary, files)
    assert all(p.read_bytes() == b for p, b in before.items())
    # The command line refuses it too, and --force applies it.
    args = ["apply", str(summary), *map(str, files), "--in-place"]
    assert main(args) == EXIT_USAGE
    assert "neither the one" in capsys.readouterr().err
    assert all(p.read_bytes() == b for p, b in before.items())
    assert main([*args, "--force"]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    assert all(line.startswith("wrote ") for line in out)
    assert all(p.read_bytes() == before[p] for p in files[:2])
    # Exposures are matched by name: one the solution lacks is refused.
    table = Table.read(summary, format="ascii.ecsv")
    del table.meta["solution"][exposures[1].name]
    table.write(summary, format="ascii.ecsv", overwrite=True)
    with pytest.raises(ValueError, match="no correction for"):
        apply_solution(summary, files)


@pytest.mark.parametrize("k", [3])
def test_a_read_only_kth_file_leaves_the_set_unchanged(sim, tmp_path, k):
    files = _copy(sim, tmp_path / "files")
    exposures, result = _solved(files)
    targets = [p for e in exposures[1:] for p in e.paths.values()]
    os.chmod(targets[k], stat.S_IRUSR | stat.S_IRGRP)
    before = {p: p.read_bytes() for p in files}
    updates = _updates(exposures, result)
    with pytest.raises(CommitError, match="read-only") as info:
        jwst.write_jwst_updates(updates)
    assert info.value.report.changed == ()
    assert all(p.read_bytes() == b for p, b in before.items())
    assert sorted(os.listdir(files[0].parent)) == sorted(p.name for p in files)
    # force overrides the mode bits (the folder is writable).
    reports = jwst.write_jwst_updates(updates, force=True)
    assert all(r.changed for r in reports)


@pytest.mark.parametrize("k", [2])
def test_a_failing_kth_rename_rolls_the_set_back(sim, tmp_path, monkeypatch, k):
    files = _copy(sim, tmp_path / "files")
    exposures, result = _solved(files)
    before = {p: p.read_bytes() for p in files}
    real = os.replace
    calls = []

    def replace(src, dst):
        # Renames of temporaries onto targets are counted; roll-back renames pass.
        if str(src).endswith(".subpixal-tmp"):
            calls.append(dst)
            if len(calls) == k + 1:
                raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    updates = _updates(exposures, result)
    with pytest.raises(CommitError, match="nothing was changed"):
        jwst.write_jwst_updates(updates)
    assert len(calls) == k + 1
    assert all(p.read_bytes() == b for p, b in before.items())
    assert sorted(os.listdir(files[0].parent)) == sorted(p.name for p in files)

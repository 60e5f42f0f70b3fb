"""Tests of the JWST gWCS layer: adapter, correction, reader and writer."""

import math
import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

pytest.importorskip("gwcs")
datamodels = pytest.importorskip("stdatamodels.jwst.datamodels")

from subpixal_jax.io import jwst  # noqa: E402
from subpixal_jax.io.images import Exposure  # noqa: E402
from subpixal_jax.simulate_jwst import (  # noqa: E402
    PIXEL_SCALE,
    PointingError,
    misregistration,
    nircam_like_gwcs,
    simulate_jwst_exposures,
)

SHAPE = (128, 128)
PIX_DEG = PIXEL_SCALE / 3600.0


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_jwst_exposures(
        tmp_path_factory.mktemp("jwst"),
        n_exposures=2,
        errors=[PointingError((0.0, 0.0)), PointingError((1.2, -0.7), 0.02)],
        shape=SHAPE,
        n_stars=40,
        n_galaxies=10,
        seed=11,
    )


@pytest.fixture
def chip():
    w, info = nircam_like_gwcs(
        "NRCA2", ra_ref=53.16, dec_ref=-27.78, roll_ref=45.0, shape=SHAPE
    )
    return jwst.GWCSAdapter(w, shape=SHAPE, wcsinfo=info), w, info


def _wcslin(pixel_shape=(600, 500)):
    lin = WCS(naxis=2)
    lin.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    lin.wcs.crval = [53.161, -27.782]
    th = math.radians(20.0)
    lin.wcs.cd = PIX_DEG * np.array(
        [[-math.cos(th), math.sin(th)], [math.sin(th), math.cos(th)]]
    )
    lin.wcs.crpix = [301.0, 251.0]
    lin.wcs.set()
    lin.pixel_shape = pixel_shape
    return lin


def _fit(rot_deg=0.03, scale=1.0001, shift=(1.3, -0.8)):
    a = math.radians(rot_deg)
    m = scale * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    return m, np.array(shift), np.array([300.0, 250.0])


def _grid(n=17):
    ny, nx = SHAPE
    return np.meshgrid(np.linspace(-0.5, nx - 0.5, n), np.linspace(-0.5, ny - 0.5, n))


def _px(sky1, sky2):
    """Distance in nominal pixels between two (ra, dec) arrays."""
    u1, u2 = jwst._unit(*sky1), jwst._unit(*sky2)
    return np.degrees(np.linalg.norm(u1 - u2, axis=-1)) / PIX_DEG


# ---------------------------------------------------------------------------
# DQ


def test_dq_flags_are_the_pipeline_table():
    from stdatamodels.jwst.datamodels import dqflags

    assert {k: int(v) for k, v in jwst.JWSTDQ.__members__.items()} == dqflags.pixel
    assert jwst.DEFAULT_DQ_BAD & jwst.JWSTDQ.DO_NOT_USE
    assert not jwst.DEFAULT_DQ_BAD & jwst.JWSTDQ.JUMP_DET


# ---------------------------------------------------------------------------
# Adapter


def test_adapter_round_trip_and_scale(chip):
    a, w, _ = chip
    assert isinstance(a, jwst.SkyWCS)
    xx, yy = _grid()
    ra, dec = a.pixel_to_sky(xx, yy)
    assert ra.shape == xx.shape
    assert ra == pytest.approx(np.asarray(w(xx, yy)[0]), abs=0.0)
    x, y = a.sky_to_pixel(ra, dec)
    assert np.max(np.hypot(x - xx, y - yy)) < 1e-8
    # Off the chip too (cutouts and pixmap nodes reach past the edge).
    x, y = a.sky_to_pixel(*a.pixel_to_sky(np.array([-20.0]), np.array([140.0])))
    assert (x[0], y[0]) == pytest.approx((-20.0, 140.0), abs=1e-8)
    assert a.pixel_scale() * 3600 == pytest.approx(PIXEL_SCALE, rel=2e-3)
    # CD-like matrix: ξ (east) and η (north) per pixel, FITS parity.
    cd = a.pixel_scale_matrix
    assert math.sqrt(abs(np.linalg.det(cd))) == pytest.approx(a.pixel_scale())
    assert np.linalg.det(cd) < 0


def test_adapter_astropy_call_forms(chip):
    a, _, _ = chip
    pts = np.array([[10.0, 20.0], [100.0, 5.0]])
    sky = a.all_pix2world(pts, 0)
    assert sky.shape == (2, 2)
    assert np.allclose(a.all_world2pix(sky, 0), pts, atol=1e-8)
    ra, dec = a.all_pix2world(pts[:, 0] + 1, pts[:, 1] + 1, 1)
    assert np.allclose([ra, dec], sky.T, rtol=0, atol=1e-12)
    x, y = a.all_world2pix(ra, dec, 1, tolerance=1e-9, maxiter=30, quiet=True)
    assert np.allclose([x, y], (pts + 1).T, atol=1e-8)
    b = a.deepcopy()
    assert b.gwcs is not a.gwcs
    assert np.array_equal(b.pixel_to_sky(3.0, 4.0), a.pixel_to_sky(3.0, 4.0))


def test_pixmap_matches_exact_evaluation(chip):
    a, _, _ = chip
    lin = _wcslin()
    pm = a.pixmap(lin)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]].astype(float)
    ex, ey = lin.wcs_world2pix(*a.pixel_to_sky(xx, yy), 0)
    assert pm.shape == (*SHAPE, 2)
    assert np.max(np.hypot(pm[..., 0] - ex, pm[..., 1] - ey)) < 1e-5
    # Half-pixel nodes past the edge (cutouts' grids) too.
    f = a.pixel_map(lin)
    hx, hy = np.array([-2.5, 130.0, 63.25]), np.array([-1.5, 129.5, 7.75])
    gx, gy = f(hx, hy)
    ex, ey = lin.wcs_world2pix(*a.pixel_to_sky(hx, hy), 0)
    assert np.max(np.hypot(gx - ex, gy - ey)) < 1e-5


# ---------------------------------------------------------------------------
# Correction


def test_corrected_applies_the_fit_exactly(chip):
    a, _, _ = chip
    lin = _wcslin()
    m, s, c = _fit()
    new = a.corrected(lin, m, s, center=c)
    assert new.gwcs.available_frames == ["detector", "v2v3", "v2v3corr", "world"]
    assert a.gwcs.available_frames == ["detector", "v2v3", "world"]  # untouched
    xx, yy = _grid()
    # Sky positions move to L(T^-1(L^-1(W(p)))).
    uv = np.stack(lin.wcs_world2pix(*a.pixel_to_sky(xx, yy), 0), axis=-1)
    back = (uv - c - s) @ np.linalg.inv(m).T + c
    expected = lin.wcs_pix2world(back[..., 0], back[..., 1], 0)
    assert np.max(_px(new.pixel_to_sky(xx, yy), expected)) < 1e-7
    # A second correction composes into the same v2v3corr frame.
    twice = new.corrected(lin, m, s, center=c)
    assert twice.gwcs.available_frames == new.gwcs.available_frames
    uv2 = np.stack(lin.wcs_world2pix(*expected, 0), axis=-1)
    back2 = (uv2 - c - s) @ np.linalg.inv(m).T + c
    expected2 = lin.wcs_pix2world(back2[..., 0], back2[..., 1], 0)
    assert np.max(_px(twice.pixel_to_sky(xx, yy), expected2)) < 1e-7
    # The identity changes nothing (to the ~4e-9 px floor of wcslib's
    # L(L^-1(.)) round trip in double precision degrees).
    same = a.corrected(lin, np.eye(2), [0.0, 0.0])
    assert np.max(_px(same.pixel_to_sky(xx, yy), a.pixel_to_sky(xx, yy))) < 1e-8


def test_correction_equals_tweakwcs_jwst_corrector(chip):
    correctors = pytest.importorskip("tweakwcs.correctors")
    a, w, info = chip
    lin = _wcslin()
    m, s, c = _fit()
    xx, yy = _grid()
    ours = a.corrected(lin, m, s, center=c)
    # 1. The same plane transform: the inserted v2v3corr models agree.
    jac, t = jwst.plane_correction(a, lin, m, s, center=c)
    oracle = correctors.JWSTWCSCorrector(w, info)
    oracle.set_correction(matrix=jac, shift=t)
    assert oracle.wcs.available_frames == ours.gwcs.available_frames
    theirs = oracle.wcs(xx, yy, with_bounding_box=False)
    assert np.max(_px(ours.pixel_to_sky(xx, yy), theirs)) < 1e-9
    # ... and tweakwcs accepts our frame as its own when correcting again.
    again = correctors.JWSTWCSCorrector(ours.gwcs, info)
    jac2, t2 = jwst.plane_correction(ours, lin, m, s, center=c)
    again.set_correction(matrix=jac2, shift=t2)
    oracle.set_correction(matrix=jac2, shift=t2)
    twice = ours.corrected(lin, m, s, center=c).pixel_to_sky(xx, yy)
    assert np.max(_px(twice, again.wcs(xx, yy, with_bounding_box=False))) < 1e-9
    assert np.max(_px(twice, oracle.wcs(xx, yy, with_bounding_box=False))) < 1e-9
    # 2. The fit given in the wcslin frame (tweakwcs' convention: the map
    # applied is T^-1, about the origin): tweakwcs linearises the transfer
    # to the detector's plane differently; measured 9e-9 px apart.
    minv = np.linalg.inv(m)
    full = correctors.JWSTWCSCorrector(w, info)
    full.set_correction(
        matrix=minv,
        shift=c - minv @ (c + s),
        ref_tpwcs=correctors.FITSWCSCorrector(lin),
    )
    theirs = full.wcs(xx, yy, with_bounding_box=False)
    assert np.max(_px(ours.pixel_to_sky(xx, yy), theirs)) < 1e-7


def test_corrected_undoes_a_simulated_pointing_error(sim):
    # Fit the exact affine map between header and true positions in a
    # wcslin frame; correcting the header gWCS with it restores the truth.
    lin = _wcslin()
    c = np.asarray(lin.wcs.crpix) - 1.0
    xx, yy = _grid(9)
    xy, uv = [], []
    for det in sim.detectors:
        hdr = jwst.GWCSAdapter(sim.header_wcs[1][det], shape=SHAPE)
        xy.append(np.stack(lin.wcs_world2pix(*hdr.pixel_to_sky(xx, yy), 0), -1))
        true = sim.true_wcs[1][det](xx, yy, with_bounding_box=False)
        uv.append(np.stack(lin.wcs_world2pix(*true, 0), -1))
    xy = np.concatenate([p.reshape(-1, 2) for p in xy])
    uv = np.concatenate([p.reshape(-1, 2) for p in uv])
    # xy ≈ M (uv - c) + c + s
    design = np.column_stack([uv - c, np.ones(len(uv))])
    coef = np.linalg.lstsq(design, xy - c, rcond=None)[0]
    m, s = coef[:2].T, coef[2]
    before = misregistration(sim, 1, sim.header_wcs[1])
    corrected = {}
    with datamodels.open(sim.paths[1][0]) as model:
        info0 = {
            k: getattr(model.meta.wcsinfo, k) for k in ("v2_ref", "v3_ref", "roll_ref")
        }
    for det, path in zip(sim.detectors, sim.paths[1], strict=True):
        with datamodels.open(path) as model:
            info = {k: getattr(model.meta.wcsinfo, k) for k in info0}
        hdr = jwst.GWCSAdapter(sim.header_wcs[1][det], shape=SHAPE, wcsinfo=info)
        corrected[det] = hdr.corrected(lin, m, s, center=c)
    after = misregistration(sim, 1, corrected)
    assert before > 1.0
    assert after < 1e-4


# ---------------------------------------------------------------------------
# Reader


def test_reader_groups_detectors_into_exposures(sim):
    files = [p for ps in sim.paths for p in ps]
    exps = jwst.read_jwst_exposures(files[::-1])
    assert len(exps) == 2
    for e, ps in zip(exps[::-1], sim.paths, strict=True):
        assert isinstance(e, Exposure)
        assert e.name == ps[0].name.split("_nrca1_")[0]
        assert [c.extver for c in e.chips] == [1, 2]
        assert e.detectors == {1: "NRCA1", 2: "NRCA2"}
        assert e.paths == {1: ps[0], 2: ps[1]}
        assert e.units == "rate"
        assert e.bunit == "MJy/sr"
        assert e.exptime == sim.exptime
        assert e.pixar_sr[1] == pytest.approx((PIXEL_SCALE / 206264.806) ** 2)
        assert e.date.isot.startswith("2026-07-01T12:00")
        for c in e.chips:
            assert isinstance(c.wcs, jwst.GWCSAdapter)
            assert c.data.dtype == np.float32
            assert c.header["DETECTOR"] == e.detectors[c.extver]
    assert len(jwst.read_jwst_exposures(files, group_detectors=False)) == 4
    one = jwst.read_jwst_exposure(sim.paths[0])
    assert len(one.chips) == 2
    with pytest.raises(ValueError, match="expected one"):
        jwst.read_jwst_exposure(files)
    with pytest.raises(ValueError, match="more than once"):
        jwst.read_jwst_exposures([files[0], files[0]])


def test_reader_masks_and_models(sim):
    path = sim.paths[0][0]
    exp = jwst.read_jwst_exposure([path])
    chip = exp.chips[0]
    with datamodels.open(path) as model:
        dq = np.asarray(model.dq)
        assert np.array_equal(chip.data, model.data, equal_nan=True)
        from_model = jwst.read_jwst_exposure([model])
    dnu = (dq & jwst.JWSTDQ.DO_NOT_USE) != 0
    sat = (dq & jwst.JWSTDQ.SATURATED) != 0
    jump = (dq & jwst.JWSTDQ.JUMP_DET) != 0
    assert not chip.valid[dnu].any()
    assert chip.valid[jump & ~dnu & ~sat].all()
    assert np.array_equal(chip.valid, np.isfinite(chip.data) & ((dq & 0x80000213) == 0))
    loose = jwst.read_jwst_exposure([path], dq_bad="DO_NOT_USE")
    assert np.array_equal(loose.chips[0].valid, ~dnu)
    named = jwst.read_jwst_exposure([path], dq_bad="DO_NOT_USE+SATURATED")
    assert np.array_equal(named.chips[0].valid, ~dnu & ~sat)
    assert from_model.paths == {1: None}
    assert np.array_equal(from_model.chips[0].valid, chip.valid)
    with pytest.raises(ValueError, match="unknown JWST DQ flag"):
        jwst.read_jwst_exposure([path], dq_bad="DO_NOT_USE,BOGUS")


# ---------------------------------------------------------------------------
# Writer


def _sip_error(model, adapter):
    """Largest error (px) of the wcsinfo SIP header against a gWCS."""
    keys = model.meta.wcsinfo.instance
    hdr = fits.Header()
    for k, v in keys.items():
        if k.startswith(("crpix", "crval", "ctype", "cd1", "cd2", "a_", "b_", "cunit")):
            hdr[k.upper()] = v
    sip = WCS(hdr)
    xx, yy = _grid(33)
    return float(
        np.max(_px(sip.all_pix2world(xx, yy, 0), adapter.pixel_to_sky(xx, yy)))
    )


def test_writer_inserts_v2v3corr_and_archives(sim, tmp_path):
    import shutil

    path = tmp_path / sim.paths[1][0].name
    shutil.copy(sim.paths[1][0], path)
    exp = jwst.read_jwst_exposure([path])
    lin = _wcslin()
    m, s, c = _fit()
    new = exp.chips[0].wcs.corrected(lin, m, s, center=c)
    rep = jwst.update_jwst_wcs(
        path, new, wcsname="TEST-1", fit_info={"rmse": 0.01, "matrix": m, "x": object()}
    )
    assert rep.changed
    assert rep.max_change > 1.0
    assert rep.sip_max_error <= 0.02
    assert rep.archived_as == 0
    # The CLI prints every report (FITS or gWCS) with the same call.
    assert rep.text(max_changes=0) == rep.text()
    assert rep.text().startswith(f"wrote {path}: gWCS TEST-1")
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary left
    xx, yy = _grid()
    with datamodels.open(path) as model:
        assert model.meta.wcs.available_frames == [
            "detector",
            "v2v3",
            "v2v3corr",
            "world",
        ]
        got = model.meta.wcs(xx, yy, with_bounding_box=False)
        assert np.max(_px(got, new.pixel_to_sky(xx, yy))) < 1e-9
        record = model.meta.subpixal_jax
        assert record.wcsname == "TEST-1"
        assert record.fit.rmse == 0.01
        assert len(record.wcs_archive) == 1
        archived = record.wcs_archive[0]
        assert archived.wcsname == "PIPELINE"
        old = exp.chips[0].wcs.pixel_to_sky(xx, yy)
        assert np.max(_px(archived.wcs(xx, yy, with_bounding_box=False), old)) < 1e-12
        assert _sip_error(model, new) <= 0.02
        assert model.meta.wcsinfo.s_region.startswith("POLYGON ICRS")
    # The reader sees the corrected gWCS.
    again = jwst.read_jwst_exposure([path])
    assert np.max(_px(again.chips[0].wcs.pixel_to_sky(xx, yy), got)) == 0.0
    # Re-running with the same solution is a no-op: nothing written or archived.
    mtime = path.stat().st_mtime_ns
    rep2 = jwst.update_jwst_wcs(path, new, wcsname="TEST-2")
    assert not rep2.changed
    assert rep2.wcsname == "TEST-1"
    assert path.stat().st_mtime_ns == mtime
    # A further change archives exactly one more gWCS.
    newer = again.chips[0].wcs.corrected(lin, np.eye(2), [0.5, 0.0], center=c)
    rep3 = jwst.update_jwst_wcs(path, newer, wcsname="TEST-3")
    assert rep3.archived_as == 1
    with datamodels.open(path) as model:
        names = [a.wcsname for a in model.meta.subpixal_jax.wcs_archive]
        assert names == ["PIPELINE", "TEST-1"]
        assert model.meta.subpixal_jax.wcsname == "TEST-3"


def test_exposure_writer_is_all_or_nothing(sim, tmp_path):
    import shutil

    paths = []
    for p in sim.paths[1]:
        shutil.copy(p, tmp_path / p.name)
        paths.append(tmp_path / p.name)
    exp = jwst.read_jwst_exposure(paths)
    lin = _wcslin()
    m, s, c = _fit()
    after = {ch.extver: ch.wcs.corrected(lin, m, s, center=c) for ch in exp.chips}
    before = [p.read_bytes() for p in paths]
    # The second detector's new WCS is for the wrong shape: its file fails
    # after the first one was prepared, and neither file changes.
    bad = dict(after)
    bad[2] = jwst.GWCSAdapter(after[2].gwcs, shape=(64, 64))
    with pytest.raises(ValueError, match="shape"):
        jwst.update_jwst_exposure_wcs(exp, bad)
    assert [p.read_bytes() for p in paths] == before
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)
    dry = jwst.update_jwst_exposure_wcs(exp, after, dry_run=True)
    assert all(r.changed for r in dry)
    assert [p.read_bytes() for p in paths] == before
    out = tmp_path / "out"
    out.mkdir()
    copies = jwst.update_jwst_exposure_wcs(exp, after, output_dir=out)
    assert [r.path for r in copies] == [out / p.name for p in paths]
    assert [p.read_bytes() for p in paths] == before
    with datamodels.open(out / paths[1].name) as model:
        assert "v2v3corr" in model.meta.wcs.available_frames
    shutil.rmtree(out)
    reports = jwst.update_jwst_exposure_wcs(exp, after, wcsname="EXP")
    assert [r.changed for r in reports] == [True, True]
    assert all(r.sip_max_error <= 0.02 for r in reports)
    reread = jwst.read_jwst_exposure(paths)
    xx, yy = _grid()
    for ch in reread.chips:
        exp_sky = after[ch.extver].pixel_to_sky(xx, yy)
        assert np.max(_px(ch.wcs.pixel_to_sky(xx, yy), exp_sky)) < 1e-9


def test_writer_in_memory_model(sim):
    with datamodels.open(sim.paths[0][1]) as model:
        a = jwst.GWCSAdapter(
            model.meta.wcs,
            shape=model.data.shape,
            wcsinfo={
                "v2_ref": model.meta.wcsinfo.v2_ref,
                "v3_ref": model.meta.wcsinfo.v3_ref,
                "roll_ref": model.meta.wcsinfo.roll_ref,
            },
        )
        new = a.with_plane_correction(np.eye(2), [0.031, 0.0])
        rep = jwst.update_jwst_wcs(model, new, dry_run=True)
        assert rep.changed
        assert rep.path is None
        assert "v2v3corr" not in model.meta.wcs.available_frames
        rep = jwst.update_jwst_wcs(model, new)
        assert rep.max_change == pytest.approx(1.0, rel=0.01)
        assert "v2v3corr" in model.meta.wcs.available_frames


def test_correction_goes_after_the_velocity_aberration_frame(chip):
    correctors = pytest.importorskip("tweakwcs.correctors")
    import copy

    import gwcs
    from astropy.modeling import models

    _, w, info = chip
    # The pipeline's fast DVA correction: a scale about the reference point.
    k = 1.00004
    va = (models.Scale(k) & models.Scale(k)) | (
        models.Shift((1 - k) * info["v2_ref"]) & models.Shift((1 - k) * info["v3_ref"])
    )
    steps = copy.deepcopy(w.pipeline)
    vacorr = copy.deepcopy(steps[1].frame)
    vacorr.name = "v2v3vacorr"
    wva = gwcs.WCS(
        [
            (steps[0].frame, steps[0].transform),
            (steps[1].frame, va),
            (vacorr, steps[1].transform),
            (steps[2].frame, None),
        ]
    )
    a = jwst.GWCSAdapter(wva, shape=SHAPE, wcsinfo=info)
    lin = _wcslin()
    m, s, c = _fit()
    new = a.corrected(lin, m, s, center=c)
    assert new.gwcs.available_frames == [
        "detector",
        "v2v3",
        "v2v3vacorr",
        "v2v3corr",
        "world",
    ]
    jac, t = jwst.plane_correction(a, lin, m, s, center=c)
    oracle = correctors.JWSTWCSCorrector(wva, info)
    oracle.set_correction(matrix=jac, shift=t)
    assert oracle.wcs.available_frames == new.gwcs.available_frames
    xx, yy = _grid()
    theirs = oracle.wcs(xx, yy, with_bounding_box=False)
    assert np.max(_px(new.pixel_to_sky(xx, yy), theirs)) < 1e-9

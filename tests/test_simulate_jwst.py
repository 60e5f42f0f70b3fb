"""Tests of the NIRCam-like simulator: the files hold the truth it recorded."""

import math

import numpy as np
import pytest

pytest.importorskip("gwcs")
datamodels = pytest.importorskip("stdatamodels.jwst.datamodels")

from subpixal_jax.simulate_jwst import (  # noqa: E402
    DETECTORS,
    PIXEL_SCALE,
    PointingError,
    attitude_matrix,
    misregistration,
    nircam_like_gwcs,
    pointing_from_attitude,
    simulate_jwst_exposures,
)

ERRORS = [
    PointingError(shift=(0.0, 0.0)),
    PointingError(shift=(1.0, 0.0)),
    PointingError(shift=(0.0, 0.0), rotation=0.03),
]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_jwst_exposures(
        tmp_path_factory.mktemp("simjwst"),
        n_exposures=3,
        errors=ERRORS,
        shape=(128, 128),
        n_stars=80,
        n_galaxies=10,
        seed=3,
    )


def test_attitude_round_trip_and_shared_pointing():
    att = attitude_matrix(120.0, -527.0, 53.1, -27.8, 30.0)
    assert np.allclose(att @ att.T, np.eye(3), atol=1e-15)
    ra, dec, roll = pointing_from_attitude(att, 120.0, -527.0)
    assert (ra, dec, roll) == pytest.approx((53.1, -27.8, 30.0), abs=1e-10)
    # Another detector's keywords describe the same attitude.
    other = pointing_from_attitude(att, 130.0, -500.0)
    assert np.allclose(attitude_matrix(130.0, -500.0, *other), att, atol=1e-14)


def test_gwcs_has_the_pipeline_structure():
    w, info = nircam_like_gwcs(
        "NRCA1", ra_ref=53.1, dec_ref=-27.8, roll_ref=30.0, shape=(128, 128)
    )
    assert w.available_frames == ["detector", "v2v3", "world"]
    assert w.pipeline[1].frame.unit[0].to_string() == "arcsec"
    assert set(info) >= {"v2_ref", "v3_ref", "vparity", "v3yangle", "roll_ref"}
    # The reference pixel (chip centre) is at V2_REF, V3_REF and RA/DEC_REF.
    v2, v3 = w.get_transform("detector", "v2v3")(63.5, 63.5)
    assert (v2, v3) == pytest.approx((info["v2_ref"], info["v3_ref"]), abs=1e-10)
    assert w(63.5, 63.5) == pytest.approx((53.1, -27.8), abs=1e-12)
    # Pixel scale ~0.031"/px; the distortion bends the corners by ~1 px.
    v2a, v3a = w.get_transform("detector", "v2v3")(64.5, 63.5)
    assert math.hypot(v2a - v2, v3a - v3) == pytest.approx(PIXEL_SCALE, rel=0.01)
    # The corners depart from the linear map by about a pixel.
    jac = np.array([[v2a - v2], [v3a - v3]])
    corner = np.array(w.get_transform("detector", "v2v3")(0.0, 0.0))
    v2y, v3y = w.get_transform("detector", "v2v3")(63.5, 64.5)
    lin = np.array([v2, v3]) + np.column_stack([jac, [v2y - v2, v3y - v3]]) @ [
        -63.5,
        -63.5,
    ]
    bend = np.hypot(*(corner - lin)) / PIXEL_SCALE
    assert 0.1 < bend < 3.0


def test_files_are_calibrated_image_models(sim):
    assert len(sim.paths) == 3
    assert all(len(p) == 2 for p in sim.paths)
    path = sim.paths[1][1]
    assert path.name == "jw01234001001_01101_00002_nrca2_cal.fits"
    with datamodels.open(path) as model:
        assert isinstance(model, datamodels.ImageModel)
        assert model.data.shape == model.err.shape == model.dq.shape == (128, 128)
        assert model.meta.bunit_data == "MJy/sr"
        assert model.meta.photometry.pixelarea_steradians > 0
        assert model.meta.observation.date == "2026-07-01"
        assert model.meta.instrument.detector == "NRCA2"
        assert model.meta.exposure.effective_exposure_time == sim.exptime
        assert model.meta.wcs.available_frames == ["detector", "v2v3", "world"]
        assert model.meta.wcsinfo.v2_ref == DETECTORS["NRCA2"]["v2_ref"]
        assert model.meta.wcsinfo.ctype1 == "RA---TAN-SIP"
        bad = (model.dq & 1) != 0
        assert bad.any()
        assert (~bad).any()
        assert np.all(np.isnan(model.data[bad]))
        assert np.all(np.isfinite(model.data[~bad]))
        assert ((model.dq & 4) != 0).any()  # JUMP_DET on usable pixels


def test_header_error_is_the_injected_one(sim):
    # Exposure 0 has no error; a 1-px shift misplaces every pixel by ~1 px;
    # a 0.03 deg rotation about the exposure centre by 0.03 deg x radius
    # (radius ~40-200 px for two adjacent 128-px chips: 0.02-0.1 px).
    assert misregistration(sim, 0, sim.header_wcs[0]) < 1e-8
    assert misregistration(sim, 1, sim.header_wcs[1]) == pytest.approx(1.0, rel=0.02)
    rot = misregistration(sim, 2, sim.header_wcs[2])
    assert 0.02 < rot < 0.1
    for i in range(3):
        assert misregistration(sim, i, sim.true_wcs[i]) < 1e-8


def test_stars_are_rendered_at_their_true_positions(tmp_path):
    sim = simulate_jwst_exposures(
        tmp_path,
        n_exposures=1,
        detectors=("NRCA1",),
        shape=(96, 96),
        n_stars=80,
        n_galaxies=0,
        noise=False,
        seed=5,
    )
    w = sim.true_wcs[0]["NRCA1"]
    with datamodels.open(sim.paths[0][0]) as model:
        data = np.nan_to_num(np.array(model.data, dtype=float))
        flagged = (np.asarray(model.dq) & 1) != 0
    x, y = w.invert(np.asarray(sim.sources["ra"]), np.asarray(sim.sources["dec"]))
    yy, xx = np.mgrid[0:96, 0:96]
    checked = 0
    for xs, ys in zip(x, y, strict=True):
        if not (10 < xs < 85 and 10 < ys < 85):
            continue
        box = (np.abs(xx - xs) < 6) & (np.abs(yy - ys) < 6)
        if flagged[box].any():
            continue
        wgt = np.where(box, data, 0.0)
        cx, cy = (wgt * xx).sum() / wgt.sum(), (wgt * yy).sum() / wgt.sum()
        assert math.hypot(cx - xs, cy - ys) < 0.05
        checked += 1
    assert checked >= 5

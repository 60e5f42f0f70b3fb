"""Tests of the simulator: the truth it records is the truth it rendered."""

import logging
import math
import time

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from subpixal_jax.simulate import (
    DQ_BAD_PIXEL,
    DQ_COSMIC_RAY,
    DQ_HOT_PIXEL,
    WcsError,
    load_truth,
    render_sources,
    simulate_exposures,
    sip_distortion,
    transform_wcs,
)

SMALL = {"chip_shape": (128, 256), "chip_gap": 20}
QUIET = {"noise": False, "cosmic_rays": False, "bad_pixels": False}


def _sky_points(wcs, n=200, seed=0):
    rows, cols = wcs.array_shape
    rng = np.random.default_rng(seed)
    px = np.column_stack([rng.uniform(0, cols - 1, n), rng.uniform(0, rows - 1, n)])
    return wcs.all_pix2world(px, 0)


def _world2pix(wcs, sky):
    return wcs.all_world2pix(sky, 0, tolerance=1e-12, maxiter=100)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """Three noisy two-chip exposures with skewed errors, small chips."""
    errors = [
        WcsError(shift=(0.0, 0.0)),
        WcsError(shift=(1.2, -0.7), rotation=0.025, scale=1.00008, skew=0.01),
        WcsError(shift=(-1.5, 1.4), rotation=-0.03, scale=0.99991),
    ]
    return simulate_exposures(
        tmp_path_factory.mktemp("small"), n_exposures=3, errors=errors, **SMALL
    )


# ---------------------------------------------------------------------------
# Geometry: sources land where the true WCS says; the header differs by T


def test_star_centroids_match_true_wcs(tmp_path):
    sim = simulate_exposures(
        tmp_path,
        n_exposures=2,
        psf="gaussian",
        n_stars=25,
        n_galaxies=0,
        flux_range=(2e4, 5e4),
        min_separation=30.0,
        **SMALL,
        **QUIET,
    )
    sky_radec = np.column_stack([sim.sources["ra"], sim.sources["dec"]])
    worst, n_checked = 0.0, 0
    for i, path in enumerate(sim.paths):
        with fits.open(path) as hdul:
            for extver, wcs in sim.true_wcs[i].items():
                data = hdul["SCI", extver].data.astype(float) - sim.sky
                xy = _world2pix(wcs, sky_radec)
                r = 7
                rows, cols = data.shape
                for x, y in xy:
                    ix, iy = round(x), round(y)
                    if not (r <= ix < cols - r and r <= iy < rows - r):
                        continue
                    box = data[iy - r : iy + r + 1, ix - r : ix + r + 1]
                    yy, xx = np.mgrid[iy - r : iy + r + 1, ix - r : ix + r + 1]
                    cx = (box * xx).sum() / box.sum()
                    cy = (box * yy).sum() / box.sum()
                    worst = max(worst, abs(cx - x), abs(cy - y))
                    n_checked += 1
    logging.getLogger(__name__).info("centroid worst %.2e px over %d", worst, n_checked)
    assert n_checked >= 20
    # float32 storage of the image limits this to ~1e-5 px.
    assert worst < 1e-3


def test_header_wcs_is_true_wcs_moved_by_T(small_set):
    sim = small_set
    worst = 0.0
    for i, err in enumerate(sim.errors):
        frame = sim.frame_wcs[i]
        center = frame.wcs.crpix - 1.0  # 0-based, like the positions below
        for extver, true in sim.true_wcs[i].items():
            header = sim.header_wcs[i][extver]
            sky = _sky_points(true, seed=extver)
            # Where the header WCS puts each source, in true frame pixels ...
            p_header = _world2pix(header, sky)
            lhs = frame.wcs_world2pix(true.all_pix2world(p_header, 0), 0)
            # ... is T applied to the source's true frame position.
            rhs = err.apply(frame.wcs_world2pix(sky, 0), center=center)
            worst = max(worst, np.abs(lhs - rhs).max())
    assert worst < 1e-8


def test_shift_direction_in_plain_pixels(tmp_path):
    """A +1 px x shift makes the header predict sources 1 px to the right."""
    sim = simulate_exposures(
        tmp_path,
        n_exposures=2,
        n_chips=1,
        errors=[WcsError(shift=(0, 0)), WcsError(shift=(1.0, 0.0))],
        roll=0.0,
        roll_offsets=[0.0, 0.0],
        distortion=False,
        n_stars=0,
        n_galaxies=0,
        **SMALL,
        **QUIET,
    )
    sky = _sky_points(sim.true_wcs[1][1])
    d = _world2pix(sim.header_wcs[1][1], sky) - _world2pix(sim.true_wcs[1][1], sky)
    np.testing.assert_allclose(d, np.tile([1.0, 0.0], (len(d), 1)), atol=1e-8)


def test_documented_inverse_restores_true_wcs(small_set):
    sim = small_set
    for i, err in enumerate(sim.errors):
        for extver, true in sim.true_wcs[i].items():
            back = transform_wcs(
                sim.header_wcs[i][extver],
                sim.frame_wcs[i],
                matrix=err.matrix,
                shift=err.shift,
            )
            np.testing.assert_allclose(
                back.wcs.crval, true.wcs.crval, rtol=0, atol=1e-12
            )
            np.testing.assert_allclose(back.wcs.cd, true.wcs.cd, rtol=1e-12, atol=0)
            np.testing.assert_array_equal(back.sip.a, true.sip.a)
            np.testing.assert_array_equal(back.sip.b, true.sip.b)
            sky = _sky_points(true)
            np.testing.assert_allclose(
                _world2pix(back, sky), _world2pix(true, sky), rtol=0, atol=1e-8
            )


def test_transform_wcs_roundtrip_and_pc_input():
    frame = WCS(naxis=2)
    frame.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    frame.wcs.crval = [210.0, 54.3]
    frame.wcs.crpix = [300.0, 200.0]
    frame.wcs.cdelt = [-1e-5, 1e-5]  # PC/CDELT form, not CD
    frame.wcs.set()
    m = WcsError(shift=(0.3, -0.2), rotation=0.5, scale=1.001, skew=0.2).matrix
    s = np.array([3.0, -2.0])
    fwd = transform_wcs(frame, frame, matrix=m, shift=s)
    # Exact at CRPIX: the frame position of the CRPIX of the moved WCS is T(c).
    p = frame.wcs_world2pix(fwd.wcs_pix2world([frame.wcs.crpix], 1), 1)[0]
    np.testing.assert_allclose(p, frame.wcs.crpix + s, atol=1e-9)
    m_inv = np.linalg.inv(m)
    back = transform_wcs(fwd, frame, matrix=m_inv, shift=-m_inv @ s)
    np.testing.assert_allclose(back.wcs.crval, frame.wcs.crval, atol=1e-12)
    cd = lambda w: w.wcs.get_pc() * w.wcs.cdelt[:, None]  # noqa: E731
    np.testing.assert_allclose(cd(back), cd(frame), rtol=0, atol=1e-17)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"matrix": np.eye(3), "shift": [0, 0]}, "matrix"),
        ({"matrix": np.zeros((2, 2)), "shift": [0, 0]}, "matrix"),
        ({"matrix": np.eye(2), "shift": [0, np.nan]}, "shift"),
    ],
)
def test_transform_wcs_rejects_bad_input(kwargs, name):
    frame = WCS(naxis=2)
    frame.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    with pytest.raises(ValueError, match=name):
        transform_wcs(frame, frame, **kwargs)


def test_wcs_error_matrix_decomposes_like_tweakwcs():
    err = WcsError(shift=(1, 2), rotation=0.7, scale=1.0003, skew=0.05)
    (p0, p1), (q0, q1) = err.matrix
    rotx = math.degrees(math.atan2(-q0, p0))
    roty = math.degrees(math.atan2(p1, q1))
    assert 0.5 * (rotx + roty) == pytest.approx(0.7, abs=1e-12)
    assert roty - rotx == pytest.approx(0.05, abs=1e-12)
    assert math.hypot(p0, q0) == pytest.approx(1.0003, rel=1e-14)
    assert math.hypot(p1, q1) == pytest.approx(1.0003, rel=1e-14)
    with pytest.raises(ValueError, match="scale"):
        WcsError(shift=(0, 0), scale=0.0)
    with pytest.raises(ValueError, match="shift"):
        WcsError(shift=(0, 0, 1))


def test_default_errors_reference_and_maxima(tmp_path):
    sim = simulate_exposures(
        tmp_path,
        n_exposures=6,
        n_chips=1,
        n_stars=0,
        n_galaxies=0,
        max_skew=0.01,
        **SMALL,
        **QUIET,
    )
    assert sim.errors[0] == WcsError(shift=(0.0, 0.0))
    for err in sim.errors[1:]:
        assert max(abs(v) for v in err.shift) <= 1.5
        assert abs(err.rotation) <= 0.03
        assert abs(err.scale - 1.0) <= 1e-4
        assert abs(err.skew) <= 0.01
    assert len({e.shift for e in sim.errors[1:]}) == 5


def test_sip_distortion_amplitude_and_realism(small_set):
    a, b = sip_distortion((512, 1024), amplitude=3.0, seed=4)
    u, v = 511.5, 255.5
    corners = [(su * u, sv * v) for su in (-1, 1) for sv in (-1, 1)]

    def disp(coeffs, x, y):
        return sum(
            coeffs[p, q] * x**p * y**q
            for p in range(coeffs.shape[0])
            for q in range(coeffs.shape[1])
        )

    mags = [math.hypot(disp(a, x, y), disp(b, x, y)) for x, y in corners]
    assert max(mags) <= 3.0 + 1e-9
    assert max(mags) > 1.0
    for coeffs in (a, b):  # no constant or linear terms: those belong to CRVAL/CD
        assert coeffs[0, 0] == coeffs[1, 0] == coeffs[0, 1] == 0.0
    # Different chips of one exposure get different distortions.
    assert not np.array_equal(
        small_set.true_wcs[0][1].sip.a, small_set.true_wcs[0][2].sip.a
    )


# ---------------------------------------------------------------------------
# Pixels: flux, profiles, noise, defects, units


def test_render_sources_conserves_flux_and_centre():
    shape = (160, 200)
    src = {
        "x": [40.3, 120.7, 60.1, 150.45],
        "y": [40.8, 50.2, 110.6, 115.3],
        "flux": [1e4, 3e4, 2e4, 5e3],
        "kind": ["gaussian", "moffat", "sersic", "sersic"],
        "fwhm": [2.2, 2.0, np.nan, np.nan],
        "beta": [np.nan, 2.5, np.nan, np.nan],
        "r_eff": [np.nan, np.nan, 4.0, 2.0],
        "axis_ratio": [np.nan, np.nan, 0.5, 0.9],
        "theta": [np.nan, np.nan, 30.0, -70.0],
        "sersic_n": [np.nan, np.nan, 1.0, 3.0],
    }
    img = render_sources(shape, src, psf_fwhm=2.0)
    total = sum(src["flux"])
    assert abs(img.sum() - total) / total < 1e-3
    yy, xx = np.indices(shape)
    for x, y in zip(src["x"], src["y"], strict=True):
        box = (np.abs(xx - x) < 30) & (np.abs(yy - y) < 30)
        w = img * box
        assert (w * xx).sum() / w.sum() == pytest.approx(x, abs=1e-3)
        assert (w * yy).sum() / w.sum() == pytest.approx(y, abs=1e-3)


def test_render_sources_galaxy_orientation():
    src = {
        "x": [32.0],
        "y": [32.0],
        "flux": [1.0],
        "kind": ["sersic"],
        "r_eff": [5.0],
        "axis_ratio": [0.4],
        "theta": [0.0],
        "sersic_n": [1.0],
    }
    img = render_sources((64, 64), src, psf_fwhm=0.0)
    yy, xx = np.indices(img.shape)
    assert (img * (xx - 32) ** 2).sum() > 4 * (img * (yy - 32) ** 2).sum()


def test_render_sources_partial_and_validation():
    src = {
        "x": [-1.0],
        "y": [10.0],
        "flux": [100.0],
        "kind": ["gaussian"],
        "fwhm": [2.0],
    }
    img = render_sources((20, 20), src)
    assert 0.0 < img.sum() < 100.0
    with pytest.raises(ValueError, match="kind"):
        render_sources((20, 20), {**src, "kind": ["blob"]})
    with pytest.raises(ValueError, match="fwhm"):
        render_sources((20, 20), {**src, "fwhm": [-1.0]})
    with pytest.raises(ValueError, match="shape"):
        render_sources((0, 20), src)
    with pytest.raises(ValueError, match="oversample"):
        render_sources((20, 20), src, oversample=0)


@pytest.mark.parametrize("units", ["counts", "rate"])
def test_noise_statistics(tmp_path, units):
    sky, rn, exptime = 60.0, 5.0, 400.0
    sim = simulate_exposures(
        tmp_path,
        n_exposures=1,
        n_stars=0,
        n_galaxies=0,
        cosmic_rays=False,
        bad_pixels=False,
        sky=sky,
        read_noise=rn,
        exptime=exptime,
        units=units,
        **SMALL,
    )
    to_e = 1.0 if units == "counts" else exptime
    expected = math.sqrt(sky + rn**2)
    with fits.open(sim.paths[0]) as hdul:
        for extver in (1, 2):
            sci = hdul["SCI", extver].data.astype(float) * to_e
            err = hdul["ERR", extver].data.astype(float) * to_e
            assert sci.mean() == pytest.approx(sky, abs=0.1)  # SCI keeps the sky
            assert sci.std() == pytest.approx(expected, rel=0.02)
            np.testing.assert_allclose(err, expected, rtol=1e-6)


def test_counts_and_rate_scale_by_exptime(tmp_path):
    kw = {"n_exposures": 1, "exptime": 250.0, "seed": 3, **SMALL}
    a = simulate_exposures(tmp_path / "c", units="counts", **kw)
    b = simulate_exposures(tmp_path / "r", units="rate", **kw)
    with fits.open(a.paths[0]) as ha, fits.open(b.paths[0]) as hb:
        assert ha[0].header["EXPTIME"] == hb[0].header["EXPTIME"] == 250.0
        for extver in (1, 2):
            assert ha["SCI", extver].header["BUNIT"] == "ELECTRONS"
            assert hb["SCI", extver].header["BUNIT"] == "ELECTRONS/S"
            assert hb["ERR", extver].header["BUNIT"] == "ELECTRONS/S"
            for ext in ("SCI", "ERR"):
                np.testing.assert_allclose(
                    hb[ext, extver].data * 250.0, ha[ext, extver].data, rtol=1e-6
                )
            np.testing.assert_array_equal(ha["DQ", extver].data, hb["DQ", extver].data)


def test_cosmic_rays_and_defects_in_dq(tmp_path):
    sim = simulate_exposures(
        tmp_path,
        n_exposures=1,
        n_chips=1,
        chip_shape=(256, 256),
        n_stars=0,
        n_galaxies=0,
        noise=False,
        cosmic_ray_rate=2e-5,
    )
    with fits.open(sim.paths[0]) as hdul:
        sci = hdul["SCI", 1].data.astype(float)
        dq = hdul["DQ", 1].data
    assert dq.dtype.str[1:] == "i2"
    bad = (dq & DQ_BAD_PIXEL) != 0
    hot = (dq & DQ_HOT_PIXEL) != 0
    assert bad.any(axis=0).sum() == 2  # two bad columns
    assert hot.sum() > 0
    assert np.all(sci[hot & ~bad] > sim.sky + 400)
    hit = (sci > sim.sky + 1.0) & ~bad & ~hot
    flagged = (dq & DQ_COSMIC_RAY) != 0
    assert (hit & flagged).sum() > 50
    assert (hit & ~flagged).sum() > 50  # some cosmic rays are left unflagged
    assert np.all(sci[flagged & ~bad & ~hot] > sim.sky)


# ---------------------------------------------------------------------------
# Files: structure, SIP round trip, truth file, determinism


def test_file_structure_and_sip_roundtrip(small_set):
    sim = small_set
    for i, path in enumerate(sim.paths):
        with fits.open(path) as hdul:
            assert hdul[0].header["EXPTIME"] == sim.exptime
            names = [(h.name, h.ver) for h in hdul[1:]]
            assert names == [(n, v) for v in (1, 2) for n in ("SCI", "ERR", "DQ")]
            for extver in (1, 2):
                assert hdul["SCI", extver].data.shape == (128, 256)
                assert hdul["SCI", extver].data.dtype.str[1:] == "f4"
                for ext in ("SCI", "ERR", "DQ"):
                    wcs = WCS(hdul[ext, extver].header, hdul, relax=True)
                    assert wcs.sip is not None
                    expected = sim.header_wcs[i][extver]
                    sky = _sky_points(expected)
                    np.testing.assert_allclose(
                        _world2pix(wcs, sky), _world2pix(expected, sky), atol=1e-9
                    )
                np.testing.assert_array_equal(wcs.sip.a, sim.true_wcs[i][extver].sip.a)


def test_truth_roundtrip(small_set):
    sim = small_set
    back = load_truth(sim.truth_path)
    assert back.paths == sim.paths
    assert back.truth_path == sim.truth_path
    assert back.errors == sim.errors
    for name in ("sky", "exptime", "units", "pixel_scale", "read_noise"):
        assert getattr(back, name) == getattr(sim, name)
    assert back.sources.colnames == sim.sources.colnames
    for name in sim.sources.colnames:
        np.testing.assert_array_equal(back.sources[name], sim.sources[name])
    for kind in ("true_wcs", "header_wcs"):
        for got, want in zip(getattr(back, kind), getattr(sim, kind), strict=True):
            assert got.keys() == want.keys()
            for k in got:
                sky = _sky_points(want[k])
                np.testing.assert_array_equal(
                    _world2pix(got[k], sky), _world2pix(want[k], sky)
                )
                assert got[k].array_shape == want[k].array_shape
    for got, want in zip(back.frame_wcs, sim.frame_wcs, strict=True):
        np.testing.assert_array_equal(got.wcs.crval, want.wcs.crval)
        np.testing.assert_array_equal(got.wcs.cd, want.wcs.cd)


def test_load_truth_rejects_other_files(tmp_path, small_set):
    with pytest.raises(ValueError, match="path"):
        load_truth(tmp_path / "missing.ecsv")
    with pytest.raises(ValueError, match="path"):
        load_truth(small_set.paths[0])


def test_same_seed_same_files_other_seed_differs(tmp_path):
    kw = {"n_exposures": 2, "n_chips": 1, **SMALL}
    a = simulate_exposures(tmp_path / "a", seed=7, **kw)
    b = simulate_exposures(tmp_path / "b", seed=7, **kw)
    c = simulate_exposures(tmp_path / "c", seed=8, **kw)
    for pa, pb, pc in zip(a.paths, b.paths, c.paths, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.read_bytes() != pc.read_bytes()
    assert a.truth_path.read_bytes() == b.truth_path.read_bytes()
    assert a.truth_path.read_bytes() != c.truth_path.read_bytes()


def test_writes_only_into_outdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "new"
    simulate_exposures(out, n_exposures=1, n_chips=1, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]
    assert sorted(p.name for p in out.iterdir()) == ["sim00_flt.fits", "sim_truth.ecsv"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_exposures": 0}, "n_exposures"),
        ({"n_exposures": 1.5}, "n_exposures"),
        ({"units": "adu"}, "units"),
        ({"sky": -1.0}, "sky"),
        ({"n_chips": 3}, "n_chips"),
        ({"chip_shape": (8, 8)}, "chip_shape"),
        ({"chip_shape": (10,)}, "chip_shape"),
        ({"pixel_scale": 0.0}, "pixel_scale"),
        ({"exptime": -5.0}, "exptime"),
        ({"read_noise": math.nan}, "read_noise"),
        ({"psf": "airy"}, "psf"),
        ({"errors": [WcsError(shift=(0, 0))]}, "errors"),
        ({"dither": [(0, 0)]}, "dither"),
        ({"max_shift": -1.0}, "max_shift"),
        ({"flux_range": (10.0, 1.0)}, "flux_range"),
        ({"seed": -1}, "seed"),
        ({"noise": "yes"}, "noise"),
        ({"cr_flagged_fraction": 1.5}, "cr_flagged_fraction"),
    ],
)
def test_bad_arguments_name_the_parameter(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        simulate_exposures(tmp_path, **{"n_exposures": 2, **kwargs})
    assert list(tmp_path.iterdir()) == []  # validated before touching disk


def test_outdir_parent_must_exist(tmp_path):
    with pytest.raises(ValueError, match="outdir"):
        simulate_exposures(tmp_path / "no" / "such", n_exposures=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="outdir"):
        simulate_exposures(tmp_path / "file", n_exposures=1)


def test_default_set_timing_and_bright_sources(tmp_path):
    """The default 4 x (2 x 512x1024) set; the time is reported, not asserted."""
    t0 = time.perf_counter()
    sim = simulate_exposures(tmp_path)
    elapsed = time.perf_counter() - t0
    logging.getLogger(__name__).warning("default 4-exposure set: %.2f s", elapsed)
    assert len(sim.paths) == 4
    # Predicted S/N of each source inside exposure 0 (aperture of radius ~1.5
    # FWHM for stars, ~2 r_eff for galaxies).
    src = sim.sources
    radius = np.where(
        src["kind"] == "sersic",
        np.hypot(2.0, 2 * np.nan_to_num(src["r_eff"]) / sim.pixel_scale),
        3.0,
    )
    noise2 = src["flux"] + np.pi * radius**2 * (sim.sky + sim.read_noise**2)
    snr = src["flux"] / np.sqrt(noise2)
    n_bright = 0
    for wcs in sim.true_wcs[0].values():
        xy = wcs.all_world2pix(np.column_stack([src["ra"], src["dec"]]), 0)
        rows, cols = wcs.array_shape
        inside = (xy[:, 0] > 5) & (xy[:, 0] < cols - 6)
        inside &= (xy[:, 1] > 5) & (xy[:, 1] < rows - 6)
        n_bright += int((inside & (snr > 20)).sum())
    assert n_bright >= 100
    # The distortion is a few pixels at the corners of each chip.
    for wcs in sim.true_wcs[0].values():
        corner = np.array([[0.0, 0.0], [1023.0, 511.0]])
        shift = wcs.wcs_world2pix(wcs.all_pix2world(corner, 0), 0) - corner
        assert 0.5 < np.abs(shift).max() < 5.0

import math

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from subpixal_jax.io.wcs import correct_wcs
from subpixal_jax.reference.matching import MatchStatus
from subpixal_jax.reference.refcat import (
    AbsoluteTie,
    observation_epoch,
    positions_at,
    read_reference_catalog,
    tie_to_catalog,
)

MAS = 1.0 / 3.6e6  # degrees
N_STARS = 100


def _wcslin():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [53.16, -27.79]
    w.wcs.crpix = [2000.5, 2000.5]
    w.wcs.cd = [[-0.05 / 3600, 0.0], [0.0, 0.05 / 3600]]
    w.wcs.radesys = "ICRS"
    w.wcs.set()
    return w


def _gaia(rng, n=N_STARS):
    """True star positions (2016.0) and motions, and a noisy Gaia-like catalog."""
    wcslin = _wcslin()
    pix = rng.uniform(0.0, 4000.0, (n, 2))
    ra, dec = wcslin.all_pix2world(pix[:, 0], pix[:, 1], 0)
    truth = Table(
        {
            "ra": ra,
            "dec": dec,
            "pmra": rng.normal(0.0, 5.0, n),
            "pmdec": rng.normal(0.0, 5.0, n),
            "parallax": rng.uniform(0.2, 2.0, n),
            "ref_epoch": np.full(n, 2016.0),
            "mag": np.sort(rng.uniform(14.0, 20.0, n)),
        }
    )
    truth["pmra"][:5] = np.nan  # no proper motion: kept fixed
    truth["pmdec"][:5] = np.nan
    cat = truth.copy()
    cat["ra_error"] = rng.uniform(0.1, 0.6, n)
    cat["dec_error"] = rng.uniform(0.1, 0.6, n)
    cat["pmra_error"] = rng.uniform(0.02, 0.1, n)
    cat["pmdec_error"] = rng.uniform(0.02, 0.1, n)
    cosd = np.cos(np.radians(dec))
    cat["ra"] = ra + rng.normal(0.0, 1.0, n) * cat["ra_error"] * MAS / cosd
    cat["dec"] = dec + rng.normal(0.0, 1.0, n) * cat["dec_error"] * MAS
    cat["pmra"] = cat["pmra"] + rng.normal(0.0, 1.0, n) * cat["pmra_error"]
    cat["pmdec"] = cat["pmdec"] + rng.normal(0.0, 1.0, n) * cat["pmdec_error"]
    return wcslin, truth, cat


def _aligned(rng, wcslin, truth, matrix, shift, *, sigma_mas=0.5, n_extra=60):
    """The aligned set's catalog: true positions at 2026 moved by the WCS error."""
    now = positions_at(truth, 2026.0)
    uv = np.column_stack(wcslin.all_world2pix(now["ra"], now["dec"], 0))
    c = wcslin.wcs.crpix - 1.0
    xy = (uv - c) @ np.asarray(matrix).T + c + shift
    xy += rng.normal(0.0, sigma_mas / 50.0, xy.shape)
    extra = rng.uniform(0.0, 4000.0, (n_extra, 2))  # fainter, not in Gaia
    xy = np.vstack([xy, extra])
    ra, dec = wcslin.all_pix2world(xy[:, 0], xy[:, 1], 0)
    return ra, dec, xy, uv


def test_proper_motion_matches_hand_computation():
    cat = Table(
        {
            "ra": [10.0, 200.0],
            "dec": [60.0, -45.0],
            "ra_error": [0.3, 0.3],
            "dec_error": [0.4, 0.4],
            "pmra": [100.0, np.nan],
            "pmdec": [-50.0, np.nan],
            "pmra_error": [0.1, 0.1],
            "pmdec_error": [0.2, 0.2],
            "parallax": [2.0, np.nan],
            "ref_epoch": [2016.0, 2016.0],
        }
    )
    moved = positions_at(cat, 2026.0)
    # 10 Julian years: dδ = μδ Δt, dα = μα* Δt / cos δ (second-order terms
    # here are below 0.01 mas).
    assert (moved["dec"][0] - 60.0) / MAS == pytest.approx(-500.0, abs=0.02)
    dra = (moved["ra"][0] - 10.0) * math.cos(math.radians(60.0 - 250 * MAS))
    assert dra / MAS == pytest.approx(1000.0, abs=0.05)
    # Without proper motion the star stays where it was, exactly.
    assert moved["ra"][1] == 200.0
    assert moved["dec"][1] == -45.0
    # Errors grow with the proper-motion errors times 10 yr.
    assert moved["ra_error"][0] == pytest.approx(math.hypot(0.3, 1.0))
    assert moved["dec_error"][0] == pytest.approx(math.hypot(0.4, 2.0))
    assert moved.meta["epoch"] == pytest.approx(2026.0)
    # An epoch given as a Time or a date string gives the same answer.
    same = positions_at(cat, "2026-01-01T00:00:00")  # J2026.0 (TT; UTC 69 s off)
    assert abs(same["dec"][0] - moved["dec"][0]) / MAS < 0.01


def test_gaia_columns_read_from_ecsv_csv_fits(tmp_path):
    rng = np.random.default_rng(0)
    _, _, cat = _gaia(rng, n=20)
    gaia = cat.copy()
    for name, unit in (
        ("ra", u.deg),
        ("dec", u.deg),
        ("ra_error", u.mas),
        ("dec_error", u.mas),
        ("pmra", u.mas / u.yr),
        ("pmdec", u.mas / u.yr),
        ("parallax", u.mas),
        ("ref_epoch", u.yr),
    ):
        gaia[name].unit = unit
    gaia.rename_column("mag", "phot_g_mean_mag")
    gaia.write(tmp_path / "gaia.ecsv")
    gaia.write(tmp_path / "gaia.fits")
    plain = cat.copy()
    plain.rename_columns(["ra", "dec"], ["RA", "DEC"])
    plain.write(tmp_path / "gaia.csv")
    for name in ("gaia.ecsv", "gaia.fits", "gaia.csv"):
        got = read_reference_catalog(tmp_path / name)
        for col in ("ra", "dec", "pmra", "pmdec", "ra_error", "ref_epoch", "mag"):
            np.testing.assert_allclose(got[col], cat[col], rtol=1e-12, err_msg=name)
        assert got.meta["path"].endswith(name)


def test_units_are_converted(tmp_path):
    t = Table({"ra": [1.0], "dec": [2.0], "ra_error": [0.001], "dec_error": [0.002]})
    t["ra_error"].unit = u.arcsec
    t["dec_error"].unit = u.arcsec
    t.write(tmp_path / "c.ecsv")
    got = read_reference_catalog(tmp_path / "c.ecsv")
    assert got["ra_error"][0] == pytest.approx(1.0)
    assert got["dec_error"][0] == pytest.approx(2.0)
    t["ra_error"].unit = u.s
    t.write(tmp_path / "bad.ecsv")
    with pytest.raises(ValueError, match=r"ra_error.*unit"):
        read_reference_catalog(tmp_path / "bad.ecsv")


def test_missing_column_named(tmp_path):
    path = tmp_path / "nodec.csv"
    Table({"RA": [1.0, 2.0], "mag": [15.0, 16.0]}).write(path)
    with pytest.raises(ValueError, match=r"nodec\.csv: no 'dec' column") as info:
        read_reference_catalog(path)
    assert "'RA'" in str(info.value)  # the columns it has
    with pytest.raises(ValueError, match="unknown catalog format"):
        read_reference_catalog(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="no such file"):
        read_reference_catalog(tmp_path / "missing.ecsv")


def test_proper_motion_needs_an_epoch(tmp_path):
    path = tmp_path / "pm.csv"
    Table({"ra": [1.0], "dec": [2.0], "pmra": [3.0], "pmdec": [4.0]}).write(path)
    with pytest.raises(ValueError, match="ref_epoch"):
        read_reference_catalog(path)
    got = read_reference_catalog(path, ref_epoch=2016.0)
    assert got["ref_epoch"][0] == 2016.0


def test_observation_epoch_keywords():
    hdr = fits.Header()
    hdr["DATE-OBS"] = "2026-07-02"
    hdr["TIME-OBS"] = "06:00:00"
    assert observation_epoch(hdr).isot == "2026-07-02T06:00:00.000"
    hdr["MJD-OBS"] = 61000.0
    assert observation_epoch(hdr).mjd == 61000.0
    hdr["EXPSTART"] = 61000.5
    hdr["EXPEND"] = 61000.6
    assert observation_epoch(hdr).mjd == pytest.approx(61000.55)
    assert observation_epoch({"DATE-OBS": "2026-07-02T01:02:03"}).isot.startswith(
        "2026-07-02T01:02:03"
    )
    with pytest.raises(ValueError, match="EXPSTART, MJD-OBS, DATE-OBS"):
        observation_epoch(fits.Header())
    with pytest.raises(ValueError, match="observation epoch"):
        observation_epoch({"MJD-OBS": "soon"})


@pytest.mark.parametrize(
    ("fitgeom", "rotation", "scale"),
    [("shift", 0.0, 1.0), ("rscale", 0.02, 1.0 + 3e-5)],
)
def test_tie_recovers_injected_transform(fitgeom, rotation, scale):
    rng = np.random.default_rng(1)
    wcslin, truth, cat = _gaia(rng)
    r = math.radians(rotation)
    matrix = scale * np.array([[math.cos(r), math.sin(r)], [-math.sin(r), math.cos(r)]])
    shift = np.array([31.7, -18.2])  # 1.6 and 0.9 arcsec
    ra, dec, xy, _ = _aligned(rng, wcslin, truth, matrix, shift)
    refcat = positions_at(cat, 2026.0)
    errors = np.full(len(ra), 0.5)
    tie = tie_to_catalog((ra, dec), refcat, wcslin, errors=errors, fitgeom=fitgeom)
    assert isinstance(tie, AbsoluteTie)
    assert tie.status == MatchStatus.OK, tie.reason
    assert tie.n_matches >= N_STARS - 3
    # Matched pairs are the true ones (the first N_STARS aligned sources are
    # the Gaia stars in catalog order).
    assert np.mean(tie.pairs[:, 0] == tie.pairs[:, 1]) > 0.99
    err = np.abs(tie.shift - shift)
    assert np.all(err < 4 * tie.shift_err + 1e-4), (err, tie.shift_err)
    assert np.all(tie.shift_err_mas < 1.0)
    np.testing.assert_allclose(tie.shift_err_mas, tie.shift_err * 50.0)
    assert tie.pixel_scale == pytest.approx(50.0)
    # Residuals: Gaia errors at 2026 (≈0.3-1.1 mas) and 0.5 mas of the set.
    assert 0.5 < tie.rms_mas < 2.0
    if fitgeom == "rscale":
        assert tie.fit is not None
        rot = float(np.mean(tie.fit.rot))
        assert rot == pytest.approx(rotation, abs=4 * tie.rot_err + 1e-7)
        assert float(tie.fit.mean_scale) == pytest.approx(scale, abs=4 * tie.scale_err)
    else:
        np.testing.assert_array_equal(tie.matrix, np.eye(2))
    assert tie.epoch == pytest.approx(2026.0)

    # Applied with correct_wcs, the correction puts the set on the catalog.
    new = correct_wcs(
        wcslin, wcslin, tie.matrix, tie.shift, center=tie.center, fitgeom=fitgeom
    )
    sky = np.column_stack(new.all_pix2world(xy[:N_STARS, 0], xy[:N_STARS, 1], 0))
    now = positions_at(truth, 2026.0)
    dra = (sky[:, 0] - now["ra"]) * np.cos(np.radians(now["dec"])) / MAS
    ddec = (sky[:, 1] - now["dec"]) / MAS
    assert np.sqrt(np.mean(dra**2 + ddec**2)) < 1.5


def test_tie_without_proper_motion_is_worse():
    rng = np.random.default_rng(1)
    wcslin, truth, cat = _gaia(rng)
    ra, dec, *_ = _aligned(rng, wcslin, truth, np.eye(2), np.array([31.7, -18.2]))
    good = tie_to_catalog((ra, dec), positions_at(cat, 2026.0), wcslin)
    # A SkyCoord or a table of the same positions gives the same tie.
    sky = SkyCoord(ra * u.deg, dec * u.deg)
    same = tie_to_catalog(sky, positions_at(cat, 2026.0), wcslin)
    np.testing.assert_allclose(same.shift, good.shift, atol=1e-9)
    table = tie_to_catalog(
        Table({"ra": ra, "dec": dec}), positions_at(cat, 2026.0), wcslin
    )
    np.testing.assert_allclose(table.shift, good.shift, atol=1e-9)
    stale = tie_to_catalog((ra, dec), cat, wcslin)  # still at 2016.0
    assert good.ok
    assert good.rms_mas < 2.0
    # 10 years of ~5 mas/yr motions: tens of mas of scatter.
    assert not stale.ok or stale.rms_mas > 10 * good.rms_mas


def test_tie_too_few_stars():
    rng = np.random.default_rng(2)
    wcslin, truth, cat = _gaia(rng, n=8)
    ra, dec, *_ = _aligned(rng, wcslin, truth, np.eye(2), np.array([5.0, 5.0]))
    tie = tie_to_catalog(np.column_stack([ra, dec]), positions_at(cat, 2026.0), wcslin)
    assert tie.status in (MatchStatus.TOO_FEW_MATCHES, MatchStatus.NO_SOURCES)
    assert "min_matches=10" in tie.reason
    np.testing.assert_array_equal(tie.shift, np.zeros(2))
    assert math.isnan(tie.rms_mas)


def test_tie_bad_inputs_named():
    wcslin = _wcslin()
    cat = Table({"ra": [53.16], "dec": [-27.79]})
    with pytest.raises(ValueError, match="fitgeom"):
        tie_to_catalog(([53.16], [-27.79]), cat, wcslin, fitgeom="affine")
    with pytest.raises(ValueError, match="refcat"):
        tie_to_catalog(([53.16], [-27.79]), Table({"x": [1.0]}), wcslin)
    with pytest.raises(ValueError, match="errors"):
        tie_to_catalog(([53.16], [-27.79]), cat, wcslin, errors=[1.0, 2.0])
    with pytest.raises(ValueError, match="sky_positions"):
        tie_to_catalog(np.zeros((3, 3)), cat, wcslin)

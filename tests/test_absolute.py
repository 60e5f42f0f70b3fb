"""The absolute tie end to end: an aligned set moved as one onto a catalog.

Four two-chip 256x512 exposures observed at 2026.0 whose header WCSs share a
common error of 0.5 arcsec and 0.02 deg (plus their own small errors), and a
Gaia-like catalog of the field's stars at 2016.0 (0.2-1 mas errors, proper
motions up to 50 mas/yr).
"""

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time

from subpixal_jax.align import align_images, write_corrections
from subpixal_jax.geometry.transform import Affine
from subpixal_jax.io.wcs import FIT_KEYWORDS
from subpixal_jax.pipeline.absolute import measure_tie
from subpixal_jax.pipeline.stages import corrected_wcs
from subpixal_jax.reference.catalog import PhotutilsCatalog
from subpixal_jax.reference.refcat import positions_at, read_reference_catalog
from subpixal_jax.reference.resample import DrizzleResample
from subpixal_jax.simulate import WcsError, simulate_exposures
from subpixal_jax.status import RunStatus, TieGrade

PIXEL_SCALE = 0.05  # arcsec
MAS_PER_PX = 1000.0 * PIXEL_SCALE
EPOCH = 2026.0
#: The common error: 0.5 arcsec (10 px) and 0.02 deg.
COMMON = WcsError((8.0, -6.0), rotation=0.02)
SMALL = [(0.0, 0.0, 0.0), (0.8, -0.5, 0.01), (-0.4, 0.9, -0.008), (0.3, 0.6, 0.004)]
OPTIONS = {"absolute_fitgeom": "rscale"}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    errors = [
        WcsError(
            (COMMON.shift[0] + dx, COMMON.shift[1] + dy),
            rotation=COMMON.rotation + rot,
        )
        for dx, dy, rot in SMALL
    ]
    sim = simulate_exposures(
        tmp_path_factory.mktemp("abs"),
        n_exposures=4,
        chip_shape=(256, 512),
        pixel_scale=PIXEL_SCALE,
        errors=errors,
        seed=11,
    )
    mjd = Time(EPOCH, format="jyear").utc.mjd
    for path in sim.paths:
        fits.setval(path, "MJD-OBS", value=mjd, ext=0)
    return sim


@pytest.fixture(scope="module")
def refcat_path(sim, tmp_path_factory):
    """A Gaia DR3-like ECSV of the field's stars at 2016.0."""
    rng = np.random.default_rng(4)
    stars = sim.sources[sim.sources["kind"] != "sersic"]
    n = len(stars)
    # A common motion and a spread of a few mas/yr, and a few fast stars.
    pm = np.array([-3.0, 4.0]) + rng.normal(0.0, 3.0, (n, 2))
    pm[:4] = rng.uniform(30.0, 35.0, (4, 2)) * rng.choice([-1, 1], (4, 2))
    now = Table(
        {
            "ra": stars["ra"],
            "dec": stars["dec"],
            "pmra": pm[:, 0],
            "pmdec": pm[:, 1],
            "ref_epoch": np.full(n, EPOCH),
        }
    )
    then = positions_at(now, 2016.0)
    err = rng.uniform(0.2, 1.0, (n, 2))
    cosd = np.cos(np.radians(then["dec"]))
    table = Table(
        {
            "ra": then["ra"] + rng.normal(0.0, err[:, 0]) / 3.6e6 / cosd,
            "dec": then["dec"] + rng.normal(0.0, err[:, 1]) / 3.6e6,
            "ra_error": err[:, 0],
            "dec_error": err[:, 1],
            "pmra": pm[:, 0],
            "pmdec": pm[:, 1],
            "parallax": rng.uniform(0.1, 2.0, n),
            "ref_epoch": np.full(n, 2016.0),
            "phot_g_mean_mag": 25.0 - 2.5 * np.log10(np.asarray(stars["flux"])),
        }
    )
    for name in ("ra", "dec"):
        table[name].unit = u.deg
    for name in ("ra_error", "dec_error", "parallax"):
        table[name].unit = u.mas
    for name in ("pmra", "pmdec"):
        table[name].unit = u.mas / u.yr
    path = tmp_path_factory.mktemp("gaia") / "gaia_dr3.ecsv"
    table.write(path)
    return path


def _align(sim, **kwargs):
    resample = DrizzleResample(sim.paths)
    result = align_images(PhotutilsCatalog(), resample, **OPTIONS, **kwargs)
    return result, resample


@pytest.fixture(scope="module")
def untied(sim):
    return _align(sim)


@pytest.fixture(scope="module")
def tied(sim, refcat_path):
    return _align(sim, reference_catalog=refcat_path)


def _sky_error(sim, wcs_sets):
    """Offsets (mas, along RA cos dec and Dec) of the WCSs from the truth.

    Over a grid of every chip of every exposure: where the WCS puts a pixel
    minus where the true WCS does.
    """
    out = []
    for i, chips in enumerate(wcs_sets):
        for extver, true in sim.true_wcs[i].items():
            ny, nx = true.array_shape
            xs, ys = np.meshgrid(np.linspace(0, nx - 1, 7), np.linspace(0, ny - 1, 7))
            pix = np.column_stack([xs.ravel(), ys.ravel()])
            t = true.all_pix2world(pix, 0)
            w = chips[extver].all_pix2world(pix, 0)
            d = (w - t) * 3.6e6
            d[:, 0] *= np.cos(np.radians(t[:, 1]))
            out.append(d)
    return np.concatenate(out)


def _relative(wcs_sets):
    """Every chip's grid mapped into exposure 0's first chip (pixels)."""
    target = wcs_sets[0][1]
    out = []
    for chips in wcs_sets[1:]:
        for w in chips.values():
            ny, nx = w.array_shape
            xs, ys = np.meshgrid(np.linspace(0, nx - 1, 5), np.linspace(0, ny - 1, 5))
            pix = np.column_stack([xs.ravel(), ys.ravel()])
            sky = w.all_pix2world(pix, 0)
            out.append(target.all_world2pix(sky, 0, tolerance=1e-12, maxiter=200))
    return np.concatenate(out)


def test_tie_puts_the_set_on_the_sky(sim, untied, tied):
    result, _ = tied
    tie = result.absolute
    assert result.status.status is RunStatus.CONVERGED
    assert tie is not None
    assert tie.ok, tie.reason
    before = _sky_error(sim, sim.header_wcs)
    relative_only = _sky_error(sim, untied[0].final_wcs)
    after = _sky_error(sim, result.final_wcs)
    mean = after.mean(axis=0)
    sigma = tie.shift_err_mas
    print(
        f"tie: {tie.n_matches} stars, rms {tie.rms_mas:.2f} mas, grade "
        f"{tie.grade.name}, shift error {np.round(sigma, 3)} mas; mean offset "
        f"before {np.round(before.mean(axis=0), 1)}, relative only "
        f"{np.round(relative_only.mean(axis=0), 1)}, tied {np.round(mean, 3)} mas; "
        f"tied rms {np.sqrt(np.mean(np.sum(after**2, axis=1))):.3f} mas"
    )
    assert np.hypot(*before.mean(axis=0)) > 400  # the 0.5 arcsec common error
    assert np.hypot(*relative_only.mean(axis=0)) > 400  # alignment keeps it
    # The set's mean error against the truth: within 3 sigma of the reported
    # error (per axis; the wcslin axes are RA and Dec, north up) and <= 2 mas.
    assert np.all(np.abs(mean) <= 3 * sigma), (mean, sigma)
    assert np.hypot(*mean) <= 2.0
    assert tie.grade is TieGrade.GOOD
    assert tie.epoch == pytest.approx(EPOCH, abs=1e-3)
    assert tie.catalog == "gaia_dr3.ecsv"


def test_tie_keeps_the_relative_alignment(untied, tied):
    # Every chip is turned by one rotation of the sky: the exposures map into
    # each other as before to the rounding of sky coordinates in degrees
    # (correct_wcs alone, an affine map of the fit frame's plane: 1e-7 px).
    result = tied[0]
    diff = float(
        np.abs(_relative(result.final_wcs) - _relative(untied[0].final_wcs)).max()
    )
    # And it is the fitted tie: in the fit frame every chip moved by T^-1
    # (to the second-order term a TAN header cannot hold, < 1e-6 px).
    tie = result.absolute
    lin = result.wcslin
    inverse = np.linalg.inv(tie.matrix)
    worst = 0.0
    for plain, moved in zip(untied[0].final_wcs, result.final_wcs, strict=True):
        for extver, w in plain.items():
            ny, nx = w.array_shape
            xs, ys = np.meshgrid(np.linspace(0, nx - 1, 5), np.linspace(0, ny - 1, 5))
            p = np.column_stack([xs.ravel(), ys.ravel()])
            q_plain = lin.wcs_world2pix(w.all_pix2world(p, 0), 0)
            q_moved = lin.wcs_world2pix(moved[extver].all_pix2world(p, 0), 0)
            want = (q_plain - tie.center - tie.shift) @ inverse.T + tie.center
            worst = max(worst, float(np.abs(q_moved - want).max()))
    print(f"relative mapping changed by {diff:.1e} px; tie applied to {worst:.1e} px")
    assert diff <= 2e-8
    assert worst <= 1e-6


def test_without_proper_motions_the_tie_is_worse(sim, untied, refcat_path):
    result, resample = untied
    refcat = read_reference_catalog(refcat_path)
    still = refcat.copy()
    still["pmra"] = np.nan
    still["pmdec"] = np.nan
    errors = {}
    ties = {}
    for name, cat in (("propagated", refcat), ("not propagated", still)):
        tie = measure_tie(PhotutilsCatalog(), resample, result.wcslin, cat, "rscale")
        assert tie.ok, tie.reason
        affine = Affine(tie.matrix, tie.shift, tie.center)
        moved = [
            corrected_wcs(w, result.wcslin, affine, "rscale") for w in result.final_wcs
        ]
        errors[name] = float(np.hypot(*_sky_error(sim, moved).mean(axis=0)))
        ties[name] = tie
    print(
        {k: round(v, 2) for k, v in errors.items()},
        {k: round(t.rms_mas, 2) for k, t in ties.items()},
    )
    assert errors["propagated"] <= 2.0
    # 10 years of a (-3, 4) mas/yr common motion: ~50 mas.
    assert errors["not propagated"] > 10 * max(errors["propagated"], 1.0)
    assert ties["not propagated"].rms_mas > 5 * ties["propagated"].rms_mas


def test_tie_is_recorded_in_headers_and_summary(sim, tied, tmp_path):
    result, _ = tied
    table = result.to_table()
    meta = table.meta["absolute"]
    assert meta["grade"] == "GOOD"
    assert meta["catalog"] == "gaia_dr3.ecsv"
    assert meta["n_matches"] == result.absolute.n_matches
    reports = write_corrections(result, sim.paths, output_dir=tmp_path)
    assert len(reports) == len(sim.paths)
    (catalog_kw,) = FIT_KEYWORDS["refcat"][0]
    (rms_kw,) = FIT_KEYWORDS["tie_rms"][0]
    (grade_kw,) = FIT_KEYWORDS["tie_grade"][0]
    for path in sim.paths:
        header = fits.getheader(tmp_path / path.name, ("SCI", 1))
        assert header[catalog_kw] == "gaia_dr3.ecsv"
        assert header[rms_kw] == pytest.approx(result.absolute.rms_mas, rel=1e-9)
        assert header[grade_kw] == "GOOD"


def test_cli_prints_the_tie(tied, capsys):
    from subpixal_jax.apps.cli import _print_result
    from subpixal_jax.pipeline.verdict import image_reports

    result, _ = tied
    _print_result(result, image_reports(result))
    line = capsys.readouterr().out.splitlines()[-1]
    tie = result.absolute
    assert line.startswith("absolute tie to gaia_dr3.ecsv: GOOD")
    assert f"{tie.n_matches} stars, rms {tie.rms_mas:.1f} mas" in line

"""A user's files through the command line: checked first, written only when
sound, all together, and a solution applied once.

A small simulated set (three two-chip 256x512 exposures, the shapes of the
alignment and capture tests) keeps the compiles shared. (On 128x256 chips,
16 sources per image, one first pass of this seed leaves 1.3 px residuals
and the run does not converge: too few sources to be a fair file test.)
"""

import hashlib
import os
import shutil

import pytest
from astropy.io import fits

from subpixal_jax.apps.cli import main
from subpixal_jax.simulate import simulate_exposures


def _digests(paths):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_exposures(
        tmp_path_factory.mktemp("sim"), n_exposures=3, chip_shape=(256, 512), seed=3
    )


@pytest.fixture
def copies(sim, tmp_path):
    """Fresh copies of the simulated files (tests may change them)."""
    out = []
    for p in sim.paths:
        shutil.copy(p, tmp_path / p.name)
        out.append(tmp_path / p.name)
    return out


def test_not_converged_run_writes_nothing_unless_forced(copies, tmp_path, capsys):
    before = _digests(copies)
    args = ["align", *map(str, copies), "--reference", "0", "--nmax", "1"]
    code = main([*args, "--in-place"])
    out = capsys.readouterr().out
    assert code == 1
    assert "NOT_CONVERGED" in out
    assert "SUCCESS" not in out
    assert _digests(copies) == before
    code = main([*args, "--in-place", "--force"])
    out = capsys.readouterr().out
    assert code == 1  # written, but the run still did not converge
    assert "forced" in out
    changed = _digests(copies)
    assert changed[copies[0].name] == before[copies[0].name]  # the reference
    assert all(changed[p.name] != before[p.name] for p in copies[1:])


def test_read_only_input_is_refused_before_any_work(copies, capsys):
    before = _digests(copies)
    os.chmod(copies[1], 0o444)
    try:
        code = main(["align", *map(str, copies), "--in-place"])
    finally:
        os.chmod(copies[1], 0o644)
    err = capsys.readouterr().err
    assert code == 2
    assert copies[1].name in err
    assert _digests(copies) == before


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda c, t: [*c, t], "folder"),
        (lambda c, t: c[:1], "at least 2"),
        (lambda c, t: [c[0], c[1], c[1]], "twice"),
    ],
)
def test_bad_inputs_are_named_and_change_nothing(
    copies, tmp_path, capsys, make, expected
):
    before = _digests(copies)
    code = main(["align", *map(str, make(copies, tmp_path)), "--in-place"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert _digests(copies) == before


def test_summary_into_missing_folder_fails_first(copies, tmp_path, capsys):
    code = main(
        ["align", *map(str, copies), "--summary", str(tmp_path / "no" / "s.ecsv")]
    )
    assert code == 2
    assert "summary" in capsys.readouterr().err


def test_apply_twice_is_applying_once_and_foreign_is_refused(copies, tmp_path, capsys):
    summary = tmp_path / "summary.ecsv"
    code = main(
        ["align", *map(str, copies), "--reference", "0", "--summary", str(summary)]
    )
    assert code == 0, capsys.readouterr()
    capsys.readouterr()
    before = _digests(copies)
    assert main(["apply", str(summary), *map(str, copies), "--in-place"]) == 0
    once = _digests(copies)
    assert once[copies[1].name] != before[copies[1].name]
    assert once[copies[0].name] == before[copies[0].name]  # reference untouched
    assert main(["apply", str(summary), *map(str, copies), "--in-place"]) == 0
    assert _digests(copies) == once
    # A file whose WCS is neither the fitted nor the corrected one.
    with fits.open(copies[2], mode="update") as hdul:
        hdul["SCI", 1].header["CRVAL1"] += 1e-4
    capsys.readouterr()
    code = main(["apply", str(summary), str(copies[2]), "--in-place"])
    assert code == 2
    assert "neither" in capsys.readouterr().err


def _to_fk5(path):
    """Rewrite a file's chip WCSs in FK5 J2000 (the same sky, other numbers)."""
    from astropy.coordinates import FK5
    from astropy.wcs import WCS

    from subpixal_jax.io.wcs import convert_wcs_frame

    with fits.open(path, mode="update") as hdul:
        for hdu in hdul:
            if hdu.header.get("EXTNAME") != "SCI":
                continue
            fk5 = convert_wcs_frame(WCS(hdu.header, hdul), FK5(equinox="J2000"))
            hdu.header["RADESYS"] = "FK5"
            hdu.header["EQUINOX"] = 2000.0
            for i in (1, 2):
                hdu.header[f"CRVAL{i}"] = fk5.wcs.crval[i - 1]
                for j in (1, 2):
                    hdu.header[f"CD{i}_{j}"] = fk5.wcs.cd[i - 1, j - 1]


def _pixels(wcs_a, wcs_b):
    """Largest distance (px) between where two chip WCSs put a grid of pixels."""
    import numpy as np
    from astropy.coordinates import SkyCoord

    xs, ys = np.meshgrid(np.linspace(0, 255, 5), np.linspace(0, 127, 5))
    sky = wcs_a.pixel_to_world(xs.ravel(), ys.ravel())
    back = wcs_b.world_to_pixel(SkyCoord(sky).transform_to(wcs_b.pixel_to_world(0, 0)))
    return float(np.max(np.hypot(back[0] - xs.ravel(), back[1] - ys.ravel())))


def test_mixed_fk5_and_icrs_set_aligns_like_an_all_icrs_set(copies, tmp_path):
    from astropy.wcs import WCS

    from subpixal_jax.align import align_files

    icrs_out, mixed_out = tmp_path / "icrs", tmp_path / "mixed"
    align_files(copies, reference=0, output_dir=icrs_out, policy=None)
    _to_fk5(copies[2])
    result, _ = align_files(copies, reference=0, output_dir=mixed_out)
    assert result.status.status.value == "CONVERGED"
    name = copies[2].name
    for ext in (1, 2):
        mixed = WCS(fits.getheader(mixed_out / name, ("SCI", ext)))
        icrs = WCS(fits.getheader(icrs_out / name, ("SCI", ext)))
        assert fits.getheader(mixed_out / name, ("SCI", ext))["RADESYS"] == "FK5"
        # The FK5 file is corrected in its own frame to the same sky.
        assert _pixels(mixed, icrs) < 1e-4


def test_jwst_and_fits_files_are_not_mixed(copies, tmp_path, capsys):
    pytest.importorskip("stdatamodels")
    from subpixal_jax.simulate_jwst import simulate_jwst_exposures

    (tmp_path / "jw").mkdir()
    sim = simulate_jwst_exposures(tmp_path / "jw", n_exposures=2, shape=(64, 64))
    jwst_file = sim.paths[0][0]
    code = main(["align", str(copies[0]), str(copies[1]), str(jwst_file)])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot mix JWST files" in err
    assert jwst_file.name in err

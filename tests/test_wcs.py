"""Tests of subpixal_jax.io.wcs: WCS correction and safe FITS header updates.

Real headers: ACS/WFC two-chip files 2chipA/2chipB (spherical-geometry) and
dist_lookup (astropy), all with SIP, D2IM and NPOL.
"""

import gzip
import importlib.resources
import os
import shutil
from functools import lru_cache

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from tweakwcs.correctors import FITSWCSCorrector

from subpixal_jax.io import wcs as spw
from subpixal_jax.io.transaction import commit_set

SG = ("spherical_geometry", ("tests", "data"))
FILES = {
    "2chipA": (*SG, "2chipA.fits.gz"),
    "2chipB": (*SG, "2chipB.fits.gz"),
    "dist_lookup": ("astropy", ("wcs", "tests", "data"), "dist_lookup.fits.gz"),
}
CHIPS = [("2chipA", 1), ("2chipA", 4), ("2chipB", 1), ("2chipB", 4), ("dist_lookup", 1)]
CHIP_SHAPE = (4096, 2048)  # (nx, ny) of an ACS/WFC chip; headers carry dummy NAXIS


def _path(name):
    pkg, parts, fname = FILES[name]
    return importlib.resources.files(pkg).joinpath(*parts, fname)


@lru_cache
def _load(name, ext):
    with fits.open(_path(name)) as hdul:
        return WCS(hdul[ext].header, hdul)


def _chip_wcs(name, ext):
    return _load(name, ext).deepcopy()


def _drz_wcs(w):
    """A drizzle-like north-up TAN grid, 0.05"/px, tangent point off the chip."""
    lin = WCS(naxis=2)
    lin.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    lin.wcs.crval = w.all_pix2world([[2047.5, 2047.5]], 0)[0]
    lin.wcs.crpix = [3000.5, 3000.5]
    s = 0.05 / 3600
    lin.wcs.cd = [[-s, 0.0], [0.0, s]]
    lin.wcs.radesys = w.wcs.radesys
    lin.wcs.equinox = w.wcs.equinox
    lin.wcs.set()
    lin.pixel_shape = (6000, 6000)
    return lin


def _rot(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


# Realistic corrections: 0.05 deg rotation, 1e-4 scale, ~2 px shift.
CORRECTIONS = {
    "shift": (np.eye(2), np.array([2.0, -1.5])),
    "rscale": ((1 + 1e-4) * _rot(0.05), np.array([0.3, 0.7])),
    "general": (
        np.array([[1 + 2e-4, 3e-4], [-1e-4, 1 - 1e-4]]) @ _rot(0.05),
        np.array([-1.2, 0.4]),
    ),
}


def _grid():
    """Pixels (0-based) across the whole 4096x2048 chip, corners included."""
    yy, xx = np.mgrid[0 : CHIP_SHAPE[1] - 1 : 33j, 0 : CHIP_SHAPE[0] - 1 : 65j]
    return np.column_stack([xx.ravel(), yy.ravel()])


def _expected_lin(w_old, lin, matrix, shift, center):
    """T^-1(L^-1(W_old(p))) in 0-based wcslin pixels, T(p) = M (p - c) + c + s."""
    pold = lin.wcs_world2pix(w_old.all_pix2world(_grid(), 0), 0)
    minv = np.linalg.inv(matrix)
    return (pold - center - shift) @ minv.T + center


def _fd_jacobian(w_old, w_new, lin, matrix, shift, h=200.0):
    """Independent reference: 5-point derivative (h = 200 px) through wcslib."""
    c = lin.wcs.crpix - 1
    minv = np.linalg.inv(matrix)

    def f(p):
        q = lin.wcs_world2pix(w_old.wcs_pix2world(p[None], 0), 0)
        q = (q - c - shift) @ minv.T + c
        return w_new.wcs_world2pix(lin.wcs_pix2world(q, 0), 0)[0]

    x0 = w_old.wcs.crpix - 1
    jac = np.empty((2, 2))
    for j in range(2):
        e = np.zeros(2)
        e[j] = h
        jac[:, j] = (8 * (f(x0 + e / 2) - f(x0 - e / 2)) - (f(x0 + e) - f(x0 - e))) / (
            6 * h
        )
    return jac


# ---------------------------------------------------------------------------
# correct_wcs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fitgeom", list(CORRECTIONS))
@pytest.mark.parametrize(("name", "ext"), CHIPS)
def test_correct_wcs_matches_tweakwcs(name, ext, fitgeom):
    w = _chip_wcs(name, ext)
    lin = _drz_wcs(w)
    matrix, shift = CORRECTIONS[fitgeom]
    c = lin.wcs.crpix - 1
    new = spw.correct_wcs(w, lin, matrix, shift, fitgeom=fitgeom)

    # tweakwcs applies P -> A P + b to 0-based wcslin pixels (its set_correction
    # turns (matrix, shift) into A (P - s'), s' = -A^-1 b). Our model moves a
    # predicted position P to T^-1(P) = M^-1 (P - c - s) + c, so
    # A = M^-1 and b = c - M^-1 (c + s).
    minv = np.linalg.inv(matrix)
    w_tw = w.deepcopy()
    w_tw.pixel_shape = CHIP_SHAPE  # tweakwcs' FD step is 10 px only with the real size
    corr = FITSWCSCorrector(w_tw)
    corr.set_correction(minv, c - minv @ (c + shift), FITSWCSCorrector(lin))
    tw = corr.wcs

    assert np.abs(new.wcs.crval - tw.wcs.crval).max() < 1e-8  # measured <= 6e-14
    scale = np.abs(new.wcs.cd).max()
    # tweakwcs differentiates with a 10 px 5-point difference through wcslib,
    # whose rounding (~1e-14 deg) limits it to ~2e-10..8e-10 relative (measured):
    assert np.abs(new.wcs.cd - tw.wcs.cd).max() / scale < 2e-9
    # an independent 200 px difference agrees with our analytic CD to 1e-10:
    jac = _fd_jacobian(w, new, lin, matrix, shift)
    assert np.abs(jac - np.eye(2)).max() < 1e-10
    # distortion, CRPIX and CTYPE untouched
    assert new.sip is not None
    assert new.cpdis1 is not None
    assert new.cpdis2 is not None
    np.testing.assert_array_equal(new.sip.a, w.sip.a)
    np.testing.assert_array_equal(new.wcs.crpix, w.wcs.crpix)
    assert list(new.wcs.ctype) == list(w.wcs.ctype)
    if name == "dist_lookup":
        assert new.det2im1 is not None


@pytest.mark.parametrize("fitgeom", list(CORRECTIONS))
@pytest.mark.parametrize(("name", "ext"), CHIPS)
def test_correct_wcs_exact_across_chip(name, ext, fitgeom):
    w = _chip_wcs(name, ext)
    lin = _drz_wcs(w)
    matrix, shift = CORRECTIONS[fitgeom]
    new = spw.correct_wcs(w, lin, matrix, shift, fitgeom=fitgeom)
    want = _expected_lin(w, lin, matrix, shift, lin.wcs.crpix - 1)
    got = lin.wcs_world2pix(new.all_pix2world(_grid(), 0), 0)
    # A TAN WCS cannot hold the second-order term of an affine map of another
    # tangent plane; measured 1.5e-7 .. 6.2e-7 px at the chip corners.
    assert np.abs(got - want).max() < 1e-6
    # exact at CRPIX, to the ~1e-9 px rounding of three wcslib round trips
    p0 = w.wcs.crpix[None] - 1
    q_old = lin.wcs_world2pix(w.wcs_pix2world(p0, 0), 0)
    q_want = (q_old - lin.wcs.crpix + 1 - shift) @ np.linalg.inv(matrix).T
    q_want += lin.wcs.crpix - 1
    q_new = lin.wcs_world2pix(new.wcs_pix2world(p0, 0), 0)
    assert np.abs(q_new - q_want).max() < 5e-9


@pytest.mark.parametrize("fitgeom", list(CORRECTIONS))
@pytest.mark.parametrize(("name", "ext"), CHIPS)
def test_correct_wcs_inverse_roundtrip(name, ext, fitgeom):
    w = _chip_wcs(name, ext)
    lin = _drz_wcs(w)
    matrix, shift = CORRECTIONS[fitgeom]
    minv = np.linalg.inv(matrix)
    new = spw.correct_wcs(w, lin, matrix, shift, fitgeom=fitgeom)
    back = spw.correct_wcs(new, lin, minv, -minv @ shift, fitgeom=fitgeom)
    np.testing.assert_allclose(back.wcs.crval, w.wcs.crval, rtol=1e-12, atol=0)
    cd_err = np.abs(back.wcs.cd - w.wcs.cd).max() / np.abs(w.wcs.cd).max()
    assert cd_err < 1e-12  # measured <= 8e-16


def test_correct_wcs_identity_and_input_untouched():
    w = _chip_wcs("2chipA", 1)
    before = w.to_header(relax=True)
    lin = _drz_wcs(w)
    same = spw.correct_wcs(w, lin, np.eye(2), [0.0, 0.0], fitgeom="shift")
    np.testing.assert_allclose(same.wcs.crval, w.wcs.crval, rtol=1e-15, atol=0)
    np.testing.assert_allclose(same.wcs.cd, w.wcs.cd, rtol=1e-14, atol=0)
    spw.correct_wcs(w, lin, *CORRECTIONS["general"])
    assert w.to_header(relax=True) == before
    assert same is not w
    assert same.sip is not w.sip


def test_correct_wcs_center_is_equivalent_to_shift():
    # T(p) = M (p - c) + c + s = M (p - c') + c' + s' with s' = s + (M - I)(c' - c)
    w = _chip_wcs("2chipB", 4)
    lin = _drz_wcs(w)
    matrix, shift = CORRECTIONS["general"]
    c = lin.wcs.crpix - 1
    c2 = np.array([1234.5, 4321.0])
    a = spw.correct_wcs(w, lin, matrix, shift)
    b = spw.correct_wcs(
        w, lin, matrix, shift + (matrix - np.eye(2)) @ (c2 - c), center=c2
    )
    np.testing.assert_allclose(a.wcs.crval, b.wcs.crval, rtol=1e-13, atol=0)
    np.testing.assert_allclose(a.wcs.cd, b.wcs.cd, rtol=1e-11, atol=0)


def test_correct_wcs_keeps_pc_representation():
    w = _chip_wcs("dist_lookup", 1)
    lin = _drz_wcs(w)
    cdelt = np.array([-1.4e-5, 1.4e-5])  # exact in a header card
    hdr = w.to_header(relax=True)  # PC + CDELT = 1 form; rescale CDELT
    for i in range(2):
        hdr[f"CDELT{i + 1}"] = cdelt[i]
        for j in range(2):
            hdr[f"PC{i + 1}_{j + 1}"] = w.wcs.cd[i, j] / cdelt[i]
    pc_w = WCS(hdr)
    assert pc_w.wcs.has_pc()
    matrix, shift = CORRECTIONS["rscale"]
    a = spw.correct_wcs(w, lin, matrix, shift)
    b = spw.correct_wcs(pc_w, lin, matrix, shift)
    assert b.wcs.has_pc()
    assert not b.wcs.has_cd()
    np.testing.assert_array_equal(b.wcs.cdelt, cdelt)
    np.testing.assert_allclose(b.pixel_scale_matrix, a.wcs.cd, rtol=1e-13, atol=0)


def _celestial_tan():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, 20.0]
    w.wcs.crpix = [50.0, 50.0]
    w.wcs.cd = [[-1e-5, 0.0], [0.0, 1e-5]]
    w.wcs.set()
    return w


def _bad_correct_args():
    good = _celestial_tan()
    linear = WCS(naxis=2)
    linear.wcs.ctype = ["LINEAR", "LINEAR"]
    dist = _chip_wcs("dist_lookup", 1)
    only_cpdis = dist.deepcopy()
    only_cpdis.sip = None
    only_cpdis.det2im1 = None
    only_d2im = dist.deepcopy()
    only_d2im.sip = None
    only_d2im.cpdis1 = only_d2im.cpdis2 = None
    i2 = np.eye(2)
    return {
        "imwcs-not-celestial": (linear, good, i2, [0, 0], {}, "imwcs"),
        "wcslin-sip": (good, dist, i2, [0, 0], {}, "distortion"),
        "wcslin-cpdis": (good, only_cpdis, i2, [0, 0], {}, "distortion"),
        "wcslin-det2im": (good, only_d2im, i2, [0, 0], {}, "distortion"),
        "singular": (good, good, [[1, 1], [1, 1]], [0, 0], {}, "singular"),
        "matrix-shape": (good, good, [1, 0, 0, 1], [0, 0], {}, "matrix"),
        "shift-nan": (good, good, i2, [np.nan, 0], {}, "shift"),
        "center-shape": (good, good, i2, [0, 0], {"center": [1]}, "center"),
        "fitgeom-name": (good, good, i2, [0, 0], {"fitgeom": "affine"}, "fitgeom"),
        "fitgeom-shift": (good, good, _rot(1), [0, 0], {"fitgeom": "shift"}, "shift"),
        "fitgeom-rscale": (
            good,
            good,
            [[1, 0.1], [0, 1]],
            [0, 0],
            {"fitgeom": "rscale"},
            "rscale",
        ),
        "fitgeom-rshift": (good, good, 2 * i2, [0, 0], {"fitgeom": "rshift"}, "rshift"),
    }


@pytest.mark.parametrize("case", list(_bad_correct_args()))
def test_correct_wcs_bad_input(case):
    imwcs, wcslin, matrix, shift, kwargs, match = _bad_correct_args()[case]
    with pytest.raises(ValueError, match=match):
        spw.correct_wcs(imwcs, wcslin, matrix, shift, **kwargs)


# ---------------------------------------------------------------------------
# update_image_wcs / update_exposure_wcs
# ---------------------------------------------------------------------------


@pytest.fixture
def flt(tmp_path):
    """A plain-FITS copy of the real two-chip ACS/WFC file 2chipA."""
    path = tmp_path / "2chipA_flt.fits"
    with gzip.open(_path("2chipA"), "rb") as src, path.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


def _corrected(path, ext, fitgeom="rscale", factor=1.0):
    with fits.open(path) as hdul:
        w = WCS(hdul[ext].header, hdul)
    matrix, shift = CORRECTIONS[fitgeom]
    if factor != 1.0:
        matrix = np.eye(2) + factor * (matrix - np.eye(2))
        shift = factor * shift
    return w, spw.correct_wcs(w, _drz_wcs(w), matrix, shift, fitgeom="general")


def _hdu_bytes(path):
    """Raw (unscaled) data bytes and headers of every HDU."""
    with fits.open(path, do_not_scale_image_data=True) as hdul:
        return [
            (None if h.data is None else h.data.tobytes(), h.header.tostring())
            for h in hdul
        ]


# One float64 ulp of a declination near -72 deg (1.4e-14 deg) is 1e-9 px of
# 0.05"; comparing positions through sky coordinates cannot do better than a
# few ulp, so header round trips are checked to PIX_ULP and their parameters
# directly (CRVAL exact, CD to the 14 digits of a FITS card).
PIX_ULP = 1e-8


def _pix_err(w_a, w_b):
    """Sky differences of the two WCSs across the chip, in 0.05" pixels."""
    lin = _drz_wcs(w_a)
    p = _grid()
    return np.abs(
        lin.wcs_world2pix(w_a.all_pix2world(p, 0), 0)
        - lin.wcs_world2pix(w_b.all_pix2world(p, 0), 0)
    )


def test_update_roundtrip_archive_and_data(flt):
    before = _hdu_bytes(flt)
    old, new = _corrected(flt, ("SCI", 1))
    report = spw.update_image_wcs(flt, ("SCI", 1), new)
    assert report.path == flt
    assert report.exts == (1,)
    assert report.archived == ((1, "A", "IDC_qbu1641sj", False),)
    assert report.wcsname == "SUBPIXAL"
    changed = {c.keyword for c in report.changes}
    assert {"WCSNAME", "CRVAL1", "CD1_1", "WCSNAMEA", "CRVAL1A", "CD2_2A"} <= changed
    assert not any(k.startswith(("A_", "B_", "CPDIS", "DP", "D2IM")) for k in changed)

    after = _hdu_bytes(flt)
    for i, ((d0, h0), (d1, h1)) in enumerate(zip(before, after, strict=True)):
        assert d0 == d1  # data byte-identical everywhere
        if i != 1:
            assert h0 == h1
    with fits.open(flt) as hdul:
        hdr = hdul[1].header
        assert hdr["WCSNAME"] == "SUBPIXAL"
        assert hdr["WCSNAMEA"] == "IDC_qbu1641sj"
        assert hdr["WCSNAMEO"] == "OPUS"
        primary = WCS(hdr, hdul)
        archived = spw.archived_wcs(hdul, ("SCI", 1), "A")
    assert _pix_err(new, primary).max() < PIX_ULP
    np.testing.assert_array_equal(primary.wcs.crval, new.wcs.crval)
    np.testing.assert_allclose(primary.wcs.cd, new.wcs.cd, rtol=1e-13, atol=0)
    np.testing.assert_array_equal(archived.wcs.crval, old.wcs.crval)
    np.testing.assert_array_equal(archived.wcs.cd, old.wcs.cd)
    assert _pix_err(old, archived).max() < PIX_ULP
    assert archived.sip is not None
    assert archived.cpdis1 is not None


def test_update_is_idempotent_and_archives_new_names(flt):
    _, new = _corrected(flt, ("SCI", 1))
    spw.update_image_wcs(flt, ("SCI", 1), new)
    snapshot = flt.read_bytes()
    again = spw.update_image_wcs(flt, ("SCI", 1), new)
    assert again.changes == ()
    assert again.archived == ()
    assert again.path is None
    assert flt.read_bytes() == snapshot

    other = spw.update_image_wcs(flt, ("SCI", 1), new, wcsname="other")
    assert other.archived == ((1, "B", "SUBPIXAL", False),)
    # back to SUBPIXAL with the same WCS: OTHER is archived under C
    back = spw.update_image_wcs(flt, ("SCI", 1), new)
    assert back.archived == ((1, "C", "other", False),)
    # OTHER again: the identical SUBPIXAL archive (B) is reused, not duplicated
    reuse = spw.update_image_wcs(flt, ("SCI", 1), new, wcsname="OTHER")
    assert reuse.archived == ((1, "B", "SUBPIXAL", True),)
    # SUBPIXAL with a different WCS, then a third name: the SUBPIXAL archive
    # clashes (B holds a different WCS), so it is auto-renamed SUBPIXAL-1.
    _, new2 = _corrected(flt, ("SCI", 1), factor=2.0)
    spw.update_image_wcs(flt, ("SCI", 1), new2)
    third = spw.update_image_wcs(flt, ("SCI", 1), new2, wcsname="THIRD")
    assert third.archived == ((1, "D", "SUBPIXAL-1", False),)
    with fits.open(flt) as hdul:
        names = {k: hdul[1].header[f"WCSNAME{k}"] for k in "ABCDO"}
        assert hdul[1].header["WCSNAME"] == "THIRD"
        assert "WCSNAMEE" not in hdul[1].header
        assert _pix_err(new2, spw.archived_wcs(hdul, 1, "D")).max() < PIX_ULP
        assert _pix_err(new, spw.archived_wcs(hdul, 1, "B")).max() < PIX_ULP
    assert names == {
        "A": "IDC_qbu1641sj",
        "B": "SUBPIXAL",
        "C": "other",
        "D": "SUBPIXAL-1",
        "O": "OPUS",
    }


def test_update_exposure_is_one_atomic_write(flt, monkeypatch):
    _, new1 = _corrected(flt, ("SCI", 1))
    _, new2 = _corrected(flt, ("SCI", 2))
    calls = []
    real_replace = os.replace

    def counting_replace(src, dst):
        calls.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(spw.os, "replace", counting_replace)
    report = spw.update_exposure_wcs(
        flt,
        {("SCI", 1): new1, ("SCI", 2): new2},
        fit_info={"fitgeom": "rscale", "nmatches": 42, "rmse": 0.012, "shift": [1, 2]},
    )
    assert len(calls) == 1
    assert report.exts == (1, 4)
    assert [a[:2] for a in report.archived] == [(1, "A"), (4, "A")]
    with fits.open(flt) as hdul:
        for ext, new in ((1, new1), (4, new2)):
            hdr = hdul[ext].header
            assert hdr["WCSNAME"] == "SUBPIXAL"
            assert hdr["SPXGEOM"] == "rscale"
            assert hdr["SPXNSRC"] == 42
            assert hdr["SPXRMS"] == 0.012
            assert (hdr["SPXSHX"], hdr["SPXSHY"]) == (1.0, 2.0)
            assert "RMS" in hdr.comments["SPXRMS"]
            assert _pix_err(new, WCS(hdr, hdul)).max() < PIX_ULP


def test_update_crash_before_rename_leaves_original(flt, monkeypatch):
    snapshot = flt.read_bytes()
    listing = sorted(os.listdir(flt.parent))
    _, new = _corrected(flt, ("SCI", 1))

    def crash(src, dst):
        raise RuntimeError("killed between the temp write and the rename")

    monkeypatch.setattr(spw.os, "replace", crash)
    with pytest.raises(RuntimeError, match="killed"):
        spw.update_image_wcs(flt, ("SCI", 1), new)
    assert flt.read_bytes() == snapshot
    assert sorted(os.listdir(flt.parent)) == listing


def test_update_output_dir_and_gzip(tmp_path):
    src = tmp_path / "in" / "2chipB.fits.gz"
    src.parent.mkdir()
    shutil.copyfile(_path("2chipB"), src)
    out = tmp_path / "out"
    out.mkdir()
    snapshot = src.read_bytes()
    before = _hdu_bytes(src)
    _, new = _corrected(src, 4, fitgeom="general")
    report = spw.update_image_wcs(src, 4, new, output=out)
    assert report.path == out / src.name
    assert src.read_bytes() == snapshot
    assert report.path.read_bytes()[:2] == b"\x1f\x8b"  # still gzip
    after = _hdu_bytes(report.path)
    assert [d for d, _ in before] == [d for d, _ in after]
    with fits.open(report.path) as hdul:
        assert _pix_err(new, WCS(hdul[4].header, hdul)).max() < PIX_ULP


def test_update_dry_run_writes_nothing(flt):
    snapshot = flt.read_bytes()
    _, new = _corrected(flt, ("SCI", 2))
    report = spw.update_image_wcs(flt, ("SCI", 2), new, dry_run=True)
    assert report.dry_run
    assert report.path is None
    by_kw = {c.keyword: c for c in report.changes}
    assert by_kw["WCSNAME"].new == "SUBPIXAL"
    assert by_kw["CRVAL1"].new == new.wcs.crval[0]
    assert by_kw["WCSNAMEA"].old is None
    assert flt.read_bytes() == snapshot


def test_update_hdulist_in_memory_leaves_caller_alone():
    with fits.open(_path("dist_lookup")) as hdul:
        header_before = hdul[1].header.tostring()
        w = WCS(hdul[1].header, hdul)
        new = spw.correct_wcs(w, _drz_wcs(w), *CORRECTIONS["shift"], fitgeom="shift")
        report = spw.update_image_wcs(hdul, "SCI", new, wcsname="SPX")
        assert hdul[1].header.tostring() == header_before
        out = report.hdulist
        assert out[1].header["WCSNAME"] == "SPX"
        np.testing.assert_array_equal(out[1].data, hdul[1].data)
        assert _pix_err(new, WCS(out[1].header, out)).max() < PIX_ULP


def _bad_update_cases(flt):
    _, new = _corrected(flt, ("SCI", 1))
    no_sip = new.deepcopy()
    no_sip.sip = None
    linear = WCS(naxis=2)
    linear.wcs.ctype = ["LINEAR", "LINEAR"]
    return {
        "missing-ext": ((("SCI", 9), new), {}, ValueError, "does not exist"),
        "missing-name": (("NOPE", new), {}, ValueError, "does not exist"),
        "no-wcs": ((0, new), {}, ValueError, "celestial"),
        "not-celestial": ((1, linear), {}, ValueError, "celestial"),
        "distortion": ((1, no_sip), {}, ValueError, "distortion"),
        "fit-key": ((1, new), {"fit_info": {"chi2": 1.0}}, ValueError, "chi2"),
        "wcsname": ((1, new), {"wcsname": ""}, ValueError, "wcsname"),
        "output": ((1, new), {"output": flt.parent / "nope"}, FileNotFoundError, "out"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing-ext",
        "missing-name",
        "no-wcs",
        "not-celestial",
        "distortion",
        "fit-key",
        "wcsname",
        "output",
    ],
)
def test_update_bad_input_changes_nothing(flt, case):
    args, kwargs, exc, match = _bad_update_cases(flt)[case]
    snapshot = flt.read_bytes()
    listing = sorted(os.listdir(flt.parent))
    with pytest.raises(exc, match=match):
        spw.update_image_wcs(flt, *args, **kwargs)
    assert flt.read_bytes() == snapshot
    assert sorted(os.listdir(flt.parent)) == listing


def test_update_read_only_file(flt):
    # Refused on the mode bits, so also for root (issue #15); force overrides
    # where the user may write (root), and the mode is kept.
    _, new = _corrected(flt, ("SCI", 1))
    snapshot = flt.read_bytes()
    flt.chmod(0o444)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            spw.update_image_wcs(flt, ("SCI", 1), new)
        assert flt.read_bytes() == snapshot
        with pytest.raises(PermissionError, match="not writable"):
            spw.prepare_exposure_update(flt, {("SCI", 1): new})
        assert sorted(p.name for p in flt.parent.iterdir()) == [flt.name]
        if os.access(flt, os.W_OK):  # root
            report = spw.update_image_wcs(flt, ("SCI", 1), new, force=True)
            assert report.path == flt
            assert flt.stat().st_mode & 0o777 == 0o444
    finally:
        flt.chmod(0o644)


def test_update_not_writable_simulated(flt, monkeypatch):
    # the same check as above when running as root: os.access says "no"
    _, new = _corrected(flt, ("SCI", 1))
    snapshot = flt.read_bytes()
    monkeypatch.setattr(spw.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="not writable"):
        spw.update_image_wcs(flt, ("SCI", 1), new)
    assert flt.read_bytes() == snapshot
    # a dry run or an output directory does not need write access to the file
    assert spw.update_image_wcs(flt, ("SCI", 1), new, dry_run=True).changes


def test_second_write_archives_the_first_correction(flt):
    # Issue #15: a re-run with the same WCSNAME used to overwrite the first
    # corrected WCS without archiving it.
    old, new1 = _corrected(flt, ("SCI", 1))
    _, new2 = _corrected(flt, ("SCI", 1), factor=2.0)
    first = spw.update_image_wcs(flt, ("SCI", 1), new1)
    assert first.archived == ((1, "A", "IDC_qbu1641sj", False),)
    second = spw.update_image_wcs(flt, ("SCI", 1), new2)
    assert second.archived == ((1, "B", "SUBPIXAL-1", False),)
    with fits.open(flt) as hdul:
        assert hdul[1].header["WCSNAME"] == "SUBPIXAL"
        assert _pix_err(new2, WCS(hdul[1].header, hdul)).max() < PIX_ULP
        assert _pix_err(new1, spw.archived_wcs(hdul, 1, "B")).max() < PIX_ULP
        assert _pix_err(old, spw.archived_wcs(hdul, 1, "A")).max() < PIX_ULP
    # writing the first correction back archives the second, and writing it
    # again changes nothing (no archive of an identical WCS)
    third = spw.update_image_wcs(flt, ("SCI", 1), new1)
    assert third.archived == ((1, "C", "SUBPIXAL-2", False),)
    again = spw.update_image_wcs(flt, ("SCI", 1), new1)
    assert again.changes == ()
    assert again.archived == ()


def test_update_report_text_lists_target_and_changes(flt):
    # Regression (issue #15): the CLI printed "would write None" for a dry run.
    _, new = _corrected(flt, ("SCI", 1))
    report = spw.update_image_wcs(flt, ("SCI", 1), new, dry_run=True)
    assert report.path is None
    assert report.target == flt
    text = str(report)
    lines = text.splitlines()
    assert lines[0].startswith(f"would write {flt}: ")
    assert "None" not in lines[0]
    assert f"{len(report.changes)} keyword change(s) in ext [1]" in lines[0]
    assert "archived as key A" in text
    crval = next(c for c in report.changes if c.keyword == "CRVAL1")
    assert f"ext 1 CRVAL1: {crval.old!r} -> {crval.new!r}" in text
    assert "ext 1 WCSNAMEA: (none) -> 'IDC_qbu1641sj'" in text
    assert len(lines) == 1 + len(report.archived) + len(report.changes)
    short = report.text(max_changes=3).splitlines()
    assert short[-1] == f"  ... and {len(report.changes) - 3} more"
    # none listed (the CLI's writes): the head's count says it all
    assert report.text(max_changes=0).splitlines() == lines[: 1 + len(report.archived)]
    written = spw.update_image_wcs(flt, ("SCI", 1), new)
    assert str(written).startswith(f"wrote {flt}: ")
    nothing = spw.update_image_wcs(flt, ("SCI", 1), new)
    assert str(nothing).startswith(f"{flt}: nothing to write: 0 keyword change(s)")


def test_update_through_a_symlink_updates_the_real_file(flt):
    link = flt.parent / "link_flt.fits"
    link.symlink_to(flt)
    _, new = _corrected(flt, ("SCI", 1))
    report = spw.update_image_wcs(link, ("SCI", 1), new)
    assert report.path == flt
    assert link.is_symlink()
    assert fits.getval(flt, "WCSNAME", ext=1) == "SUBPIXAL"


def test_prepare_then_commit(flt):
    snapshot = flt.read_bytes()
    _, new = _corrected(flt, ("SCI", 1))
    pending = spw.prepare_exposure_update(
        flt, {("SCI", 1): new}, fit_info={"nmatches": 7}
    )
    assert flt.read_bytes() == snapshot  # nothing visible yet
    assert pending.temp == flt.parent / f".{flt.name}.subpixal-tmp"
    assert pending.info.path == flt
    assert pending.info.changes
    report = commit_set([pending])
    assert report.changed == (flt,)
    with fits.open(flt) as hdul:
        assert hdul[1].header["SPXNSRC"] == 7
        assert _pix_err(new, WCS(hdul[1].header, hdul)).max() < PIX_ULP
    assert sorted(p.name for p in flt.parent.iterdir()) == [flt.name]
    # nothing to change: nothing to commit
    assert (
        spw.prepare_exposure_update(flt, {("SCI", 1): new}, fit_info={"nmatches": 7})
        is None
    )


# ---------------------------------------------------------------------------
# Fingerprints (apply is idempotent)
# ---------------------------------------------------------------------------


def test_fingerprint_round_trip_and_classify(flt):
    with fits.open(flt) as hdul:
        olds = {v: WCS(hdul["SCI", v].header, hdul) for v in (1, 2)}
    fitted = spw.wcs_fingerprint(flt)
    assert fitted == spw.wcs_fingerprint(olds)  # file and WCS objects agree
    assert len(fitted) == 16
    news = {v: _corrected(flt, ("SCI", v))[1] for v in (1, 2)}
    result = spw.wcs_fingerprint(news)
    assert result != fitted
    assert spw.classify_target(flt, fitted, result) is spw.TargetState.ORIGINAL
    spw.update_exposure_wcs(flt, {("SCI", v): w for v, w in news.items()})
    # the written headers give the fingerprint computed before writing
    assert spw.wcs_fingerprint(flt) == result
    assert spw.classify_target(flt, fitted, result) is spw.TargetState.ALREADY_APPLIED
    other = {v: _corrected(flt, ("SCI", v), factor=2.0)[1] for v in (1, 2)}
    spw.update_exposure_wcs(flt, {("SCI", v): w for v, w in other.items()})
    assert spw.classify_target(flt, fitted, result) is spw.TargetState.FOREIGN


def test_fingerprint_ignores_names_alternates_and_representation():
    w = _celestial_tan()
    hdr = w.to_header()
    for k in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2"):
        hdr.remove(k, ignore_missing=True)
    hdr["CD1_1"], hdr["CD2_2"] = -1e-5, 1e-5
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(header=hdr, name="SCI")])
    ref = spw.wcs_fingerprint(hdul)
    assert ref == spw.wcs_fingerprint({1: w})
    hdul[1].header["WCSNAME"] = "SOMETHING"
    hdul[1].header.extend(w.to_header(key="B"), unique=True)
    hdul[1].header["CRVAL1B"] = 11.0  # an archive does not count
    assert spw.wcs_fingerprint(hdul) == ref
    # PC + CDELT holding the same matrix as CD: the same WCS
    pc = fits.Header()
    for k in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2"):
        pc[k] = hdr[k]
    pc["CDELT1"], pc["CDELT2"] = -1e-5, 1e-5
    pc["PC1_1"], pc["PC2_2"] = 1.0, 1.0
    pc["WCSAXES"] = 2
    alt = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(header=pc, name="SCI")])
    assert spw.wcs_fingerprint(alt) == ref
    # a change of 1e-9 deg (0.07 mas) is seen; one at the 15th digit is not
    hdul[1].header["CRVAL1"] = 10.0 + 1e-9
    assert spw.wcs_fingerprint(hdul) != ref
    hdul[1].header["CRVAL1"] = 10.0 * (1 + 1e-15)
    assert spw.wcs_fingerprint(hdul) == ref
    hdul[1].header["CRVAL1"] = 10.0
    hdul[1].header["RADESYS"] = "FK5"
    assert spw.wcs_fingerprint(hdul) != ref  # another frame is another WCS
    with pytest.raises(ValueError, match="no 'SCI' chip"):
        spw.wcs_fingerprint(fits.HDUList([fits.PrimaryHDU()]))


def _axis_rotation(axis, deg):
    """Rodrigues: the rotation by ``deg`` about the unit vector ``axis``."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    skew = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * skew + (1 - np.cos(t)) * skew @ skew


def _unit(sky):
    ra, dec = np.deg2rad(sky).T
    return np.column_stack(
        [np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)]
    )


@pytest.mark.parametrize(("name", "ext"), CHIPS)
def test_rotate_wcs_is_exact_and_keeps_chips_mapping(name, ext):
    # A 0.5 arcsec turn about an axis off the chip (a shift) plus a roll.
    w = _chip_wcs(name, ext)
    centre = _unit(w.all_pix2world([[2047.5, 1023.5]], 0))[0]
    r = _axis_rotation(np.cross(centre, [0.0, 0.0, 1.0]), 0.5 / 3600) @ (
        _axis_rotation(centre, 0.02)
    )
    new = spw.rotate_wcs(w, r)
    grid = _grid()
    want = _unit(w.all_pix2world(grid, 0)) @ r.T
    got = _unit(new.all_pix2world(grid, 0))
    # 1e-9 px of 0.05 arcsec is 2.4e-16 rad: the rounding of float64.
    assert np.max(np.linalg.norm(got - want, axis=1)) < 5e-15
    assert new.sip is not None or w.sip is None
    assert new.wcs.lonpole == w.wcs.lonpole
    # Two chips turned alike map into each other as before.
    other = _chip_wcs(name, 4 if ext == 1 else 1) if name != "dist_lookup" else w
    moved = spw.rotate_wcs(other, r)
    before = other.all_world2pix(w.all_pix2world(grid, 0), 0, tolerance=1e-12)
    after = moved.all_world2pix(new.all_pix2world(grid, 0), 0, tolerance=1e-12)
    # The rounding of sky coordinates in degrees (correct_wcs: 1e-7 .. 6e-7 px).
    assert np.abs(after - before).max() < 2e-8
    with pytest.raises(ValueError, match="rotation"):
        spw.rotate_wcs(w, 2 * np.eye(3))

"""Tests of subpixal_jax.io.preflight: clear errors before any work (issue #15)."""

import bz2
import gzip
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from subpixal_jax.io import preflight
from subpixal_jax.io.preflight import InputError, check_inputs

SHAPE = (64, 48)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _hdul(seed=0, *, data=None, dq=None, header_edit=None):
    rng = np.random.default_rng(seed)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, -20.0]
    w.wcs.crpix = [24.0, 32.0]
    w.wcs.cd = [[-1e-5, 0.0], [0.0, 1e-5]]
    hdr = w.to_header()
    hdr["BUNIT"] = "ELECTRONS"
    if header_edit is not None:
        header_edit(hdr)
    sci = rng.normal(10.0, 1.0, SHAPE).astype(np.float32) if data is None else data
    primary = fits.PrimaryHDU()
    primary.header["EXPTIME"] = 100.0
    dq = np.zeros(SHAPE, np.int16) if dq is None else dq
    return fits.HDUList(
        [
            primary,
            fits.ImageHDU(sci, header=hdr, name="SCI"),
            fits.ImageHDU(dq, name="DQ"),
        ]
    )


def _write(path, hdul=None):
    (hdul if hdul is not None else _hdul(sum(path.name.encode()))).writeto(path)
    return path


@pytest.fixture
def pair(tmp_path):
    return [_write(tmp_path / "a_flt.fits"), _write(tmp_path / "b_flt.fits")]


def _snapshot(folder):
    return {
        p: p.read_bytes()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _refused(files, match, *, what=None, **kwargs):
    """check_inputs must raise InputError naming ``what`` and ``match``."""
    folders = {Path(f).absolute().parent for f in files}
    before = {d: (_snapshot(d), sorted(d.rglob("*"))) for d in folders}
    with pytest.raises(InputError) as info:
        check_inputs(files, **kwargs)
    # nothing read was changed, nothing was created
    assert {d: (_snapshot(d), sorted(d.rglob("*"))) for d in folders} == before
    err = info.value
    assert isinstance(err, ValueError)
    whats = [w for w, _ in err.problems]
    text = str(err)
    if what is not None:
        assert str(what) in whats, (what, err.problems)
        assert str(what) in text
    assert match in text, text
    return err


def test_good_pair_passes(pair):
    out = check_inputs(pair, in_place=True)
    assert out.paths == tuple(p.resolve() for p in pair)
    assert out.notes == ()


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep > 0 else len(data) + keep])


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file(pair, gz):
    # Regression: "cannot reshape array of size 62280 into shape (512,512)".
    bad = pair[1]
    _truncate(bad, -10000)
    if gz:
        gzip_path = bad.with_suffix(".fits.gz")
        gzip_path.write_bytes(gzip.compress(bad.read_bytes()))
        bad.unlink()
        bad = gzip_path
    before = _snapshot(bad.parent)
    err = _refused([pair[0], bad], "truncated", what=bad)
    assert len(err.problems) == 1  # the good file is not blamed
    assert _snapshot(bad.parent) == before


def test_truncated_gzip_stream(pair):
    gz = pair[1].with_suffix(".fits.gz")
    gz.write_bytes(gzip.compress(pair[1].read_bytes())[:-3000])
    _refused([pair[0], gz], "gzip file is truncated", what=gz)


def test_truncated_inside_a_header(pair):
    # cut inside the DQ header: astropy drops that HDU with a warning
    _truncate(pair[1], 2880 * 2 + SHAPE[0] * SHAPE[1] * 4 + 100)
    _refused(pair, "truncated", what=pair[1])


@pytest.mark.parametrize(
    ("drop", "match"),
    [
        (("CRVAL1", "CRVAL2"), "missing CRVAL1, CRVAL2"),
        (("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2"), "missing CD1_1"),
        (("CTYPE1", "CTYPE2"), "no celestial WCS"),
        ({"RADESYS": "J2000"}, "unknown celestial frame"),
    ],
)
def test_header_without_wcs(tmp_path, pair, drop, match):
    # Regression: "exposures span more than 30 degrees".
    def edit(hdr):
        if isinstance(drop, dict):
            hdr.update(drop)
            return
        for k in drop:
            hdr.remove(k, ignore_missing=True)

    bad = _write(tmp_path / "nowcs.fits", _hdul(3, header_edit=edit))
    _refused([pair[0], bad], match, what=bad)


def test_folder_given_as_file(pair, tmp_path):
    folder = tmp_path / "sub"
    folder.mkdir()
    _refused([pair[0], folder], "is a folder", what=folder)


def test_missing_file(pair, tmp_path):
    _refused(
        [pair[0], tmp_path / "nope.fits"], "no such file", what=tmp_path / "nope.fits"
    )


def test_one_image_only(pair):
    _refused(pair[:1], "at least 2 different exposures", what="files")


@pytest.mark.parametrize("kind", ["zero", "nan", "flagged"])
def test_empty_image_names_that_file(tmp_path, pair, kind):
    data, dq = None, None
    if kind == "zero":
        data = np.zeros(SHAPE, np.float32)
    elif kind == "nan":
        data = np.full(SHAPE, np.nan, np.float32)
    else:
        dq = np.full(SHAPE, 4, np.int16)
    bad = _write(tmp_path / "empty.fits", _hdul(4, data=data, dq=dq))
    err = _refused([pair[0], bad], "the image is empty", what=bad)
    assert [w for w, _ in err.problems] == [str(bad)]  # only the bad file
    # DQ bit 4 ignored: the flagged image is usable
    if kind == "flagged":
        check_inputs([pair[0], bad], dq_bits=4)
    # the data check can be skipped (headers only)
    check_inputs([pair[0], bad], check_data=False)


def test_waivered_wfpc2(tmp_path, pair):
    primary = fits.PrimaryHDU(np.zeros((4, 32, 32), np.float32))
    primary.header["INSTRUME"] = "WFPC2"
    primary.header["EXPTIME"] = 100.0
    table = fits.TableHDU.from_columns(
        [fits.Column(name="CRVAL1", format="E15.7", array=np.zeros(4))]
    )
    c0f = tmp_path / "u2ou0101t_c0f.fits"
    fits.HDUList([primary, table]).writeto(c0f)
    _refused([pair[0], c0f], "convert it to multi-extension FITS", what=c0f)
    _refused([pair[0], c0f], "unsupported format", what=c0f)


def test_same_file_twice(pair, tmp_path):
    a = pair[0]
    _refused([a, pair[1], a], "same file", what=a)
    other = tmp_path / "sub" / ".." / a.name
    (tmp_path / "sub").mkdir()
    _refused([a, pair[1], other], "same file", what=other)
    link = tmp_path / "link.fits"
    link.symlink_to(a)
    _refused([a, pair[1], link], "same file", what=link)
    hard = tmp_path / "hard.fits"
    os.link(a, hard)
    _refused([a, pair[1], hard], "same file", what=hard)


@pytest.mark.parametrize("name", ["", "   ", "x" * 69, "caf\u00e9"])
def test_bad_wcsname(pair, name):
    _refused(pair, "wcsname", what="wcsname", wcsname=name)


def test_summary_into_a_missing_folder(pair, tmp_path):
    s = tmp_path / "missing" / "summary.ecsv"
    _refused(pair, "does not exist", what=s, summary=s)
    _refused(pair, "is a folder", what=tmp_path, summary=tmp_path)
    check_inputs(pair, summary=tmp_path / "summary.ecsv")


def test_output_dir(pair, tmp_path, monkeypatch):
    # creatable (parent exists): fine, with a note; nothing is created
    new = tmp_path / "out"
    out = check_inputs(pair, output_dir=new)
    assert any("will be created" in n for n in out.notes)
    assert not new.exists()
    _refused(
        pair,
        "does not exist",
        what=tmp_path / "x" / "y",
        output_dir=tmp_path / "x" / "y",
    )
    _refused(pair, "not a folder", what=pair[0], output_dir=pair[0])
    # the inputs' own folder: the copies would replace the originals
    _refused(pair, "would replace the original", what=pair[0], output_dir=tmp_path)
    # two inputs with the same file name
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    same = [_write(tmp_path / d / "c_flt.fits") for d in ("d1", "d2")]
    _refused(same, "same file name", what=same[1], output_dir=new)
    # an earlier read-only copy in output_dir is not replaced without force
    new.mkdir()
    _write(new / pair[1].name)
    (new / pair[1].name).chmod(0o444)
    try:
        _refused(pair, "read-only (mode 0444)", what=new / pair[1].name, output_dir=new)
        if IS_ROOT:
            check_inputs(pair, output_dir=new, force=True)
    finally:
        (new / pair[1].name).chmod(0o644)
    check_inputs(pair, output_dir=new)  # a writable earlier copy is replaced
    # unwritable (os.access: root may write anything, so simulate)
    real_access = os.access
    monkeypatch.setattr(
        preflight.os,
        "access",
        lambda p, m: False if Path(p) == new else real_access(p, m),
    )
    _refused(pair, "is not writable", what=new, output_dir=new)


def test_in_place_read_only_input_refused_even_as_root(pair):
    before = _snapshot(pair[0].parent)
    pair[1].chmod(0o444)
    try:
        _refused(pair, "read-only (mode 0444)", what=pair[1], in_place=True)
        check_inputs(pair)  # not updating: fine
        if IS_ROOT:
            check_inputs(pair, in_place=True, force=True)
        else:
            _refused(pair, "read-only", what=pair[1], in_place=True, force=True)
    finally:
        pair[1].chmod(0o644)
    assert _snapshot(pair[0].parent) == before


def test_in_place_folder_not_writable(pair, monkeypatch):
    folder = pair[0].parent
    real_access = os.access
    monkeypatch.setattr(
        preflight.os,
        "access",
        lambda p, m: False if Path(p) == folder else real_access(p, m),
    )
    _refused(pair, "folder", what=pair[0], in_place=True)


def test_in_place_symlink_is_resolved(pair, tmp_path):
    link = tmp_path / "link_flt.fits"
    link.symlink_to(pair[1])
    out = check_inputs([pair[0], link], in_place=True)
    assert out.paths[1] == pair[1].resolve()
    assert out.given[1] == link
    assert any("symbolic link" in n and str(link) in n for n in out.notes)


def test_in_place_hard_link_note(pair, tmp_path):
    os.link(pair[1], tmp_path / "other_name.fits")
    out = check_inputs(pair, in_place=True)
    assert any("2 hard links" in n for n in out.notes)


def test_other_formats_and_headers(pair, tmp_path):
    bz = tmp_path / "c.fits.bz2"
    bz.write_bytes(bz2.compress(pair[1].read_bytes()))
    _refused([pair[0], bz], "bzip2", what=bz)
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"not a fits file at all" * 200)
    _refused([pair[0], junk], "not a readable FITS file", what=junk)
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    _refused([pair[0], empty], "empty (0 bytes)", what=empty)
    hdul = _hdul(5)
    del hdul[0].header["EXPTIME"]
    noexp = _write(tmp_path / "noexp.fits", hdul)
    _refused([pair[0], noexp], "EXPTIME", what=noexp)


def test_every_problem_is_listed(pair, tmp_path):
    _truncate(pair[1], -5000)
    err = _refused(
        [pair[0], pair[1], tmp_path / "gone.fits"],
        "nothing was done",
        wcsname="",
        summary=tmp_path / "no" / "s.ecsv",
    )
    whats = {w for w, _ in err.problems}
    assert whats == {
        str(pair[1]),
        str(tmp_path / "gone.fits"),
        "wcsname",
        str(tmp_path / "no" / "s.ecsv"),
    }


def test_no_jax_needed(tmp_path, pair):
    # The module loads and runs on its own: JAX is never imported (so nothing
    # can be compiled), and neither is the package (whose __init__ imports JAX).
    _truncate(pair[1], -5000)
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("pf", {str(Path(preflight.__file__))!r})
pf = importlib.util.module_from_spec(spec)
sys.modules["pf"] = pf
spec.loader.exec_module(pf)
pf.check_inputs([{str(pair[0])!r}], min_files=1)
try:
    pf.check_inputs([{str(pair[0])!r}, {str(pair[1])!r}], in_place=True)
except pf.InputError as err:
    assert "truncated" in str(err)
else:
    raise SystemExit("no error")
bad = sorted(
    m for m in sys.modules if m == "jax" or m.startswith(("jax.", "subpixal_jax"))
)
print("MODULES", bad)
"""
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr
    assert "MODULES []" in res.stdout


def test_mode_bits_not_os_access(pair, monkeypatch):
    # root's os.access says yes to a 0444 file; the check must not rely on it
    monkeypatch.setattr(preflight.os, "access", lambda p, m: True)
    pair[0].chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    try:
        _refused(pair, "read-only", what=pair[0], in_place=True)
    finally:
        pair[0].chmod(0o644)


def test_mixed_frames_are_noted(tmp_path, pair):
    def fk5(hdr):
        hdr["RADESYS"] = "FK5"

    def equinox_only(hdr):
        hdr.remove("RADESYS", ignore_missing=True)
        hdr["EQUINOX"] = 2000.0

    a = _write(tmp_path / "fk5.fits", _hdul(6, header_edit=fk5))
    b = _write(tmp_path / "eq.fits", _hdul(7, header_edit=equinox_only))
    assert check_inputs([a, b]).notes == ()  # both FK5 J2000
    out = check_inputs([a, b, pair[0]])
    assert len(out.notes) == 1
    assert "different celestial frames" in out.notes[0]
    assert f"FK5 J2000: {a}, {b}" in out.notes[0]
    assert f"ICRS: {pair[0]}" in out.notes[0]

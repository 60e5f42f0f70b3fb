"""Tests of subpixal_jax.io.transaction: a set of files changes all or nothing."""

import json
import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from subpixal_jax.io import transaction as tx
from subpixal_jax.io import wcs as spw

NAMES = ("a_flt.fits", "b_flt.fits", "c_flt.fits")


def _listing(*folders):
    return sorted(p.name for f in folders for p in f.iterdir())


@pytest.fixture
def three(tmp_path):
    """Three small files with content 'old <name>'."""
    paths = [tmp_path / n for n in NAMES]
    for p in paths:
        p.write_bytes(f"old {p.name}".encode())
    return paths


def _prepare(paths):
    return [
        tx.write_temp(p, lambda f, p=p: f.write(f"new {p.name}".encode()))
        for p in paths
    ]


def _contents(paths):
    return [p.read_bytes().decode().split()[0] if p.exists() else None for p in paths]


def test_commit_all(three):
    report = tx.commit_set(_prepare(three))
    assert report.complete
    assert report.changed == tuple(three)
    assert _contents(three) == ["new"] * 3
    assert _listing(three[0].parent) == sorted(NAMES)  # no temp, orig, journal
    assert str(report).startswith("3 file(s) changed")


def test_read_only_second_file_changes_nothing(three):
    # Regression (issue #15): the first file was rewritten while the message
    # said "nothing was changed".
    pending = _prepare(three)
    three[1].chmod(0o444)
    try:
        with pytest.raises(tx.CommitError, match="nothing was changed") as info:
            tx.commit_set(pending)
    finally:
        three[1].chmod(0o644)
    assert info.value.report.changed == ()
    assert str(three[1]) in str(info.value)
    assert "read-only (mode 0444" in str(info.value)
    assert _contents(three) == ["old"] * 3
    assert _listing(three[0].parent) == sorted(NAMES)


def _failing_replace(monkeypatch, fail_at, *, then_all=False):
    """os.replace that fails when renaming onto target ``fail_at``.

    With ``then_all``, every later call fails too (the process is as good
    as dead: no roll-back possible).
    """
    real = os.replace
    state = {"dead": False}

    def replace(src, dst):
        if state["dead"] or os.fspath(dst) == os.fspath(fail_at):
            state["dead"] = then_all
            msg = f"simulated failure renaming onto {dst}"
            raise OSError(msg)
        real(src, dst)

    monkeypatch.setattr(tx.os, "replace", replace)
    return real


@pytest.mark.parametrize("k", [0, 1, 2])
def test_failed_rename_rolls_back(three, monkeypatch, k):
    pending = _prepare(three)
    _failing_replace(monkeypatch, three[k])
    with pytest.raises(tx.CommitError, match="nothing was changed") as info:
        tx.commit_set(pending)
    assert info.value.report.changed == ()
    assert info.value.report.journal == ()
    assert _contents(three) == ["old"] * 3
    assert _listing(three[0].parent) == sorted(NAMES)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("action", ["auto", "complete", "rollback"])
def test_interrupted_commit_is_recovered(three, monkeypatch, k, action):
    pending = _prepare(three)
    real = _failing_replace(monkeypatch, three[k], then_all=True)
    with pytest.raises(tx.CommitError, match="ONLY PART OF THE SET") as info:
        tx.commit_set(pending)
    report = info.value.report
    # the report says exactly which files changed
    assert report.changed == tuple(three[:k])
    assert report.unchanged == tuple(three[k:])
    assert _contents(three) == ["new"] * k + ["old"] * (3 - k)
    assert len(report.journal) == 1
    assert json.loads(report.journal[0].read_text())["state"] == "committing"
    assert "recover" in str(info.value)

    monkeypatch.setattr(tx.os, "replace", real)  # the next run
    rec = tx.recover(three[0].parent, action=action)
    if action == "rollback":
        assert rec.rolled_back == three
        assert _contents(three) == ["old"] * 3
    else:
        assert rec.completed == three
        assert _contents(three) == ["new"] * 3
    assert _listing(three[0].parent) == sorted(NAMES)


def test_recover_rolls_back_when_new_content_is_lost(three, monkeypatch):
    pending = _prepare(three)
    real = _failing_replace(monkeypatch, three[1], then_all=True)
    with pytest.raises(tx.CommitError):
        tx.commit_set(pending)
    monkeypatch.setattr(tx.os, "replace", real)
    pending[2].temp.unlink()  # the new c is gone: the set cannot be completed
    with pytest.raises(ValueError, match="cannot complete"):
        tx.recover(three, action="complete")
    rec = tx.recover(three)  # auto: roll back
    assert rec.rolled_back == three
    assert _contents(three) == ["old"] * 3
    assert _listing(three[0].parent) == sorted(NAMES)


def test_sets_across_folders_and_new_files(tmp_path, monkeypatch):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    old = tmp_path / "x" / "a.fits"
    old.write_bytes(b"old a")
    new = tmp_path / "y" / "b.fits"  # an output copy: does not exist yet
    pending = _prepare([old, new])
    real = _failing_replace(monkeypatch, new, then_all=True)
    with pytest.raises(tx.CommitError) as info:
        tx.commit_set(pending)
    assert info.value.report.changed == (old,)
    # a journal in each folder; recovering either folder finishes the set
    assert len(list((tmp_path / "y").glob(".subpixal-commit-*.json"))) == 1
    monkeypatch.setattr(tx.os, "replace", real)
    rec = tx.recover(tmp_path / "y")
    assert rec.completed == [old, new]
    assert _contents([old, new]) == ["new", "new"]
    assert _listing(tmp_path / "x", tmp_path / "y") == ["a.fits", "b.fits"]

    # a failed set with a new file: the new file is removed again
    pending = _prepare([old, tmp_path / "y" / "c.fits"])
    _failing_replace(monkeypatch, old)
    with pytest.raises(tx.CommitError, match="nothing was changed"):
        tx.commit_set(pending[::-1])  # c first, then a fails
    assert not (tmp_path / "y" / "c.fits").exists()
    assert _listing(tmp_path / "x", tmp_path / "y") == ["a.fits", "b.fits"]


def test_interrupt_rolls_back_and_propagates(three, monkeypatch):
    pending = _prepare(three)
    real = os.replace

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(three[2]):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(tx.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        tx.commit_set(pending)
    assert _contents(three) == ["old"] * 3
    assert _listing(three[0].parent) == sorted(NAMES)


def test_recover_removes_stale_files(three):
    folder = three[0].parent
    tx.temp_path(three[0]).write_bytes(b"half-written")
    os.link(three[1], tx.orig_path(three[1]))  # an orig that is the file itself
    tx.orig_path(three[2]).write_bytes(b"something else")  # might be data
    rec = tx.recover(folder)
    assert set(rec.removed) == {tx.temp_path(three[0]), tx.orig_path(three[1])}
    assert rec.kept == [tx.orig_path(three[2])]
    assert _contents(three) == ["old"] * 3
    # write_temp replaces a stale temp file of its own name
    tx.temp_path(three[0]).write_bytes(b"stale")
    p = tx.write_temp(three[0], lambda f: f.write(b"new a"))
    assert p.temp.read_bytes() == b"new a"


def test_bad_sets(three):
    pending = _prepare(three[:1])
    with pytest.raises(ValueError, match="named twice"):
        tx.commit_set([pending[0], pending[0]])
    assert _listing(three[0].parent) == sorted(NAMES)  # temp discarded
    with pytest.raises(ValueError, match="missing"):
        tx.commit_set([tx.PendingWrite(target=three[0], temp=three[0].parent / "x")])
    with pytest.raises(ValueError, match="action"):
        tx.recover(three[0].parent, action="maybe")
    assert tx.commit_set([]).complete


# ---------------------------------------------------------------------------
# With real FITS updates (wcs.prepare_exposure_update)
# ---------------------------------------------------------------------------


def _fits(path, crval1):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [crval1, 20.0]
    w.wcs.crpix = [8.0, 8.0]
    w.wcs.cd = [[-1e-5, 0.0], [0.0, 1e-5]]
    hdr = w.to_header()
    hdr["WCSNAME"] = "OPUS"
    rng = np.random.default_rng(int(crval1))
    fits.HDUList(
        [fits.PrimaryHDU(), fits.ImageHDU(rng.normal(size=(16, 16)), hdr, name="SCI")]
    ).writeto(path)
    return w


def test_three_fits_files_all_or_nothing(tmp_path, monkeypatch):
    paths = [tmp_path / n for n in NAMES]
    wcss = [_fits(p, 10.0 + i) for i, p in enumerate(paths)]
    before = [p.read_bytes() for p in paths]
    news = [spw.correct_wcs(w, w, np.eye(2), [0.5, 0.0]) for w in wcss]
    pending = [
        spw.prepare_exposure_update(p, {("SCI", 1): n})
        for p, n in zip(paths, news, strict=True)
    ]
    assert [p.read_bytes() for p in paths] == before
    _failing_replace(monkeypatch, paths[2])
    with pytest.raises(tx.CommitError, match="nothing was changed"):
        tx.commit_set(pending)
    assert [p.read_bytes() for p in paths] == before
    assert _listing(tmp_path) == sorted(NAMES)

    monkeypatch.undo()
    pending = [
        spw.prepare_exposure_update(p, {("SCI", 1): n})
        for p, n in zip(paths, news, strict=True)
    ]
    report = tx.commit_set(pending)
    assert report.changed == tuple(paths)
    assert [p.info.archived for p in pending] == [((1, "A", "OPUS", False),)] * 3
    for p, n in zip(paths, news, strict=True):
        with fits.open(p) as hdul:
            assert hdul[1].header["WCSNAME"] == "SUBPIXAL"
            np.testing.assert_array_equal(WCS(hdul[1].header).wcs.crval, n.wcs.crval)


def test_a_symlink_target_replaces_the_real_file(three):
    link = three[0].parent / "link.fits"
    link.symlink_to(three[0])
    report = tx.commit_set(_prepare([link]))
    assert report.changed == (three[0],)
    assert link.is_symlink()
    assert three[0].read_bytes() == b"new link.fits"


def test_discard_removes_prepared_temps(three):
    pending = _prepare(three[:2])
    tx.discard([*pending, None])
    assert _listing(three[0].parent) == sorted(NAMES)
    assert _contents(three) == ["old"] * 3

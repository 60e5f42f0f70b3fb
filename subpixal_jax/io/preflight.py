"""Check input files and output places before any work is done.

An alignment costs tens of seconds to minutes before it writes anything; a
problem with an input found then (a truncated file, a header without a WCS, a
read-only target) wastes that time and, worse, surfaces as an unrelated error
("cannot reshape array ...", "exposures span more than 30 degrees") or blames
the wrong file. :func:`check_inputs` finds these problems first, from the
headers and the file sizes (pixels are read only to find empty images), and
reports every problem with the file it belongs to.

This module is pure host code: it imports only the standard library, numpy
and astropy (never JAX), so a check costs no compilation.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from astropy.io import fits
from astropy.nddata.bitmask import bitfield_to_boolean_mask, interpret_bit_flags

__all__ = ["CheckOptions", "CheckedInputs", "InputError", "check_inputs"]

log = logging.getLogger(__name__)

#: Longest WCSNAME value that fits a FITS card.
_MAX_WCSNAME = 68
_CELESTIAL_AXES = ("RA--", "DEC-", "GLON", "GLAT", "ELON", "ELAT", "SLON", "SLAT")
_GZIP_MAGIC = b"\x1f\x8b"
#: RADESYS values of the FITS standard (wcslib reads them all).
_FRAMES = ("ICRS", "FK5", "FK4", "FK4-NO-E", "GAPPT", "")


class InputError(ValueError):
    """Input files or output places that cannot be used, found before any work.

    Attributes
    ----------
    problems : tuple of (str, str)
        ``(what, problem)`` pairs: the file or option (as the user gave it)
        and what is wrong with it. The message lists them all, one a line.
    """

    def __init__(self, problems: Sequence[tuple[str, str]]):
        self.problems = tuple(problems)
        lines = [f"{what}: {problem}" for what, problem in self.problems]
        super().__init__(
            "nothing was done; fix these inputs first:\n  " + "\n  ".join(lines)
            if len(lines) > 1
            else lines[0] + " (nothing was done)"
        )


@dataclass(frozen=True)
class CheckedInputs:
    """The outcome of a successful :func:`check_inputs`.

    Attributes
    ----------
    given : tuple of pathlib.Path
        The files as the user named them.
    paths : tuple of pathlib.Path
        The files to read and, with ``in_place``, to update: symbolic links
        are resolved to the files they point to (the update changes that
        file; replacing the link itself would turn it into a copy and leave
        the real file stale).
    notes : tuple of str
        Things worth telling the user that are not errors (a link resolved,
        a hard link that the update will detach, an output folder to create,
        inputs in different celestial frames).
    """

    given: tuple[Path, ...]
    paths: tuple[Path, ...]
    notes: tuple[str, ...]


def _writable_bits(mode: int) -> bool:
    return bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _uncompressed_size(path: Path) -> int:
    """Length of a gzip file's content, streamed (no memory), or raise OSError."""
    d = zlib.decompressobj(zlib.MAX_WBITS | 16)
    total = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            total += len(d.decompress(chunk))
            while d.unused_data:  # concatenated gzip members
                rest = d.unused_data
                d = zlib.decompressobj(zlib.MAX_WBITS | 16)
                total += len(d.decompress(rest))
    if not d.eof:
        msg = "the gzip stream ends early"
        raise OSError(msg)
    return total


def _span(hdul: fits.HDUList, i: int) -> tuple[int, int]:
    """Return ``(data offset, padded data length)`` of HDU ``i`` in the file."""
    hdu = hdul[i]
    loc, span = getattr(hdu, "_data_offset", None), getattr(hdu, "_data_size", None)
    if loc is None or span is None:  # astropy internals moved: the slow way
        info = hdul.fileinfo(i)
        loc, span = info["datLoc"], info["datSpan"]
    return int(loc), int(span)


def _sci_hdus(hdul: fits.HDUList, extname: str) -> list[int]:
    return [
        i
        for i, hdu in enumerate(hdul)
        if i > 0 and str(hdu.header.get("EXTNAME", "")).strip().upper() == extname
    ]


def _wcs_problem(header: fits.Header) -> str | None:
    """Say what keeps ``header`` from holding a 2-D celestial WCS (None: nothing)."""
    ctype = [str(header.get(f"CTYPE{i}", "")).upper() for i in (1, 2)]
    if not all(ct[:4] in _CELESTIAL_AXES for ct in ctype):
        return f"no celestial WCS (CTYPE1/2 = {ctype})"
    radesys = str(header.get("RADESYS", header.get("RADECSYS", "ICRS"))).strip()
    if radesys.upper() not in _FRAMES:
        return f"unknown celestial frame RADESYS={radesys!r} (known: {_FRAMES})"
    missing = [k for k in ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2") if k not in header]
    has_cd = any(f"CD{i}_{j}" in header for i in (1, 2) for j in (1, 2))
    has_cdelt = all(f"CDELT{i}" in header for i in (1, 2))
    if not (has_cd or has_cdelt):
        missing.append("CD1_1..CD2_2 (or CDELT1/2)")
    if missing:
        return f"incomplete WCS: missing {', '.join(missing)}"
    try:
        vals = [float(header[k]) for k in ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2")]
        if has_cd:
            cd = np.array(
                [[float(header.get(f"CD{i}_{j}", 0.0)) for j in (1, 2)] for i in (1, 2)]
            )
        else:
            cd = np.diag([float(header["CDELT1"]), float(header["CDELT2"])])
    except (TypeError, ValueError):
        return "non-numeric WCS keywords (CRVAL/CRPIX/CD)"
    if not (np.all(np.isfinite(vals)) and np.all(np.isfinite(cd))):
        return "non-finite WCS keywords (CRVAL/CRPIX/CD)"
    if abs(np.linalg.det(cd)) == 0.0:
        return f"singular WCS matrix (CD {cd.tolist()})"
    return None


def _image_problem(
    hdul: fits.HDUList, chips: list[int], extname: str, dq_bits
) -> str | None:
    """Whether every chip is empty: all zero, all non-finite or all flagged."""
    kinds = []
    for i in chips:
        data = np.asarray(hdul[i].data)
        finite = np.isfinite(data)
        good = finite.copy()
        if i > 0 and dq_bits is not None:
            ver = int(hdul[i].header.get("EXTVER", 1))
            dq = next(
                (
                    h
                    for h in hdul[1:]
                    if str(h.header.get("EXTNAME", "")).strip().upper() == "DQ"
                    and int(h.header.get("EXTVER", 1)) == ver
                ),
                None,
            )
            if dq is not None and dq.data is not None and dq.data.shape == data.shape:
                # Read unscaled: an unsigned DQ (JWST's uint32) is stored
                # with BZERO = 2**31, which must be added back.
                bits = np.asarray(dq.data).astype(np.int64) + int(
                    dq.header.get("BZERO", 0)
                )
                good &= bitfield_to_boolean_mask(
                    bits,
                    ignore_flags=dq_bits,
                    good_mask_value=True,
                    dtype=bool,
                )
        if not finite.any():
            kinds.append("NaN/inf")
        elif not good.any():
            kinds.append("flagged in DQ")
        elif not np.any(data[good] != 0):
            kinds.append("zero")
        else:
            return None
    what = extname if chips and chips[0] > 0 else "primary image"
    return (
        f"the image is empty: every pixel of every {what} array is "
        f"{' or '.join(sorted(set(kinds)))}"
    )


def _frame_of(header: fits.Header) -> str:
    """Celestial frame as wcslib reads the keywords (e.g. 'FK5 J2000')."""
    radesys = str(header.get("RADESYS", header.get("RADECSYS", ""))).strip().upper()
    equinox = header.get("EQUINOX", header.get("EPOCH"))
    try:
        equinox = float(equinox) if equinox is not None else None
    except (TypeError, ValueError):
        equinox = None
    if not radesys and equinox is None:
        radesys = "ICRS"
    elif not radesys:
        radesys = "FK4" if equinox < 1984.0 else "FK5"  # wcslib's rule
    if radesys in ("FK5", "FK4", "FK4-NO-E"):
        default = 2000.0 if radesys == "FK5" else 1950.0
        eq = default if equinox is None else equinox
        return f"{radesys} {'J' if radesys == 'FK5' else 'B'}{eq:g}"
    return radesys


class _Unusable(Exception):
    """A file that cannot be used as an exposure; the message says why."""


def _data_size(real: Path) -> int:
    """Bytes of FITS content in ``real`` (of a gzip file: uncompressed)."""
    with real.open("rb") as f:
        magic = f.read(4)
    if magic[:3] == b"BZh" or magic == b"PK\x03\x04":
        msg = "bzip2/zip files are not supported (only plain or gzip FITS)"
        raise _Unusable(msg)
    try:
        gz = magic[:2] == _GZIP_MAGIC
        size = _uncompressed_size(real) if gz else real.stat().st_size
    except (OSError, EOFError, zlib.error) as exc:
        msg = f"the gzip file is truncated or corrupt ({exc})"
        raise _Unusable(msg) from exc
    if size == 0:
        msg = "the file is empty (0 bytes)"
        raise _Unusable(msg)
    return size


def _unreadable(exc: Exception) -> _Unusable:
    return _Unusable(f"not a readable FITS file ({type(exc).__name__}: {exc})")


def _open_fits(real: Path) -> tuple[fits.HDUList, list[warnings.WarningMessage]]:
    """Open ``real`` lazily; also return the warnings astropy gave on the way."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(
                real, lazy_load_hdus=True, memmap=False, do_not_scale_image_data=True
            )
        except Exception as exc:  # astropy raises many kinds for non-FITS bytes
            raise _unreadable(exc) from exc
    return hdul, caught


def _check_complete(
    hdul: fits.HDUList, size: int, caught: list[warnings.WarningMessage]
) -> None:
    """Read every header (no data) and check the file holds all its HDUs."""
    with warnings.catch_warnings(record=True) as more:
        warnings.simplefilter("always")
        try:
            n = len(hdul)
        except Exception as exc:
            raise _unreadable(exc) from exc
    for w in (*caught, *more):
        if "truncated" in str(w.message):
            msg = f"the file is truncated ({w.message})"
            raise _Unusable(msg)
    spans = [_span(hdul, i) for i in range(n)]
    extra = size - sum(spans[-1])
    if extra > 0:
        # astropy drops an incomplete header at the end with a warning
        msg = (
            f"the file is truncated or corrupt: {extra} bytes after its last "
            f"complete HDU ({n - 1}) are not a FITS header"
        )
        raise _Unusable(msg)
    for i, (dat_loc, _) in enumerate(spans):
        need = dat_loc + hdul[i].size
        if need > size:
            msg = (
                f"the file is truncated: HDU {i} needs {need} bytes, the file "
                f"has {size}"
            )
            raise _Unusable(msg)


def _science_chips(hdul: fits.HDUList, extname: str) -> list[int]:
    """HDU indices of the science arrays: the ``extname`` HDUs, else a 2-D primary."""
    chips = _sci_hdus(hdul, extname)
    if chips:
        return chips
    primary = hdul[0].header
    naxis = int(primary.get("NAXIS", 0))
    if naxis == 3:
        shape = [primary.get(f"NAXIS{k}") for k in (1, 2, 3)]
        msg = (
            f"unsupported format: a 3-D primary array {shape} without "
            f"{extname} extensions (waivered WFPC2 c0f/c1f FITS?); convert "
            "it to multi-extension FITS first (e.g. stsci.tools "
            "convertwaiveredfits) and align the converted file"
        )
        raise _Unusable(msg)
    if naxis != 2:
        msg = (
            f"no {extname!r} extension and no 2-D image in the primary HDU "
            f"(NAXIS={naxis})"
        )
        raise _Unusable(msg)
    return [0]


def _chip_frame(hdul: fits.HDUList, i: int, extname: str) -> str:
    """Check science HDU ``i`` is a 2-D image with a WCS; return its frame."""
    hdr = hdul[i].header
    label = "primary HDU" if i == 0 else f"{extname},{hdr.get('EXTVER', 1)}"
    if int(hdr.get("NAXIS", 0)) != 2 or hdul[i].size == 0:
        dims = [hdr.get(f"NAXIS{k}") for k in range(1, int(hdr.get("NAXIS", 0)) + 1)]
        msg = f"{label} is not a 2-D image (NAXIS={hdr.get('NAXIS')}, {dims})"
        raise _Unusable(msg)
    problem = _wcs_problem(hdr)
    if problem is not None:
        msg = f"{label}: {problem}"
        raise _Unusable(msg)
    return _frame_of(hdr)


def _check_exptime(primary: fits.Header, science: fits.Header) -> None:
    # JWST data models give the effective exposure time instead.
    keys = ("EXPTIME", "EFFEXPTM", "XPOSURE")
    found = [h.get(k) for k in keys for h in (primary, science)]
    exptime = next((v for v in found if v is not None), None)
    try:
        ok = math.isfinite(float(exptime)) and float(exptime) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        msg = f"EXPTIME must be a positive number, got {exptime!r}"
        raise _Unusable(msg)


def _data_problem(
    hdul: fits.HDUList, chips: list[int], extname: str, dq_bits
) -> str | None:
    """:func:`_image_problem` with a JWST data model's own bad DQ bits."""
    if any(h.name == "ASDF" for h in hdul):
        # A JWST data model: only its "bad" DQ bits make a pixel unusable.
        from subpixal_jax.io.jwst import DEFAULT_DQ_BAD

        dq_bits = (2**32 - 1) ^ int(DEFAULT_DQ_BAD)
    return _image_problem(hdul, chips, extname, dq_bits)


def _check_file(
    given: Path,
    real: Path,
    *,
    extname: str,
    dq_bits,
    check_data: bool,
    frames: dict[str, list[str]],
) -> str | None:
    """Problem of one readable regular file as an exposure, or None.

    Adds ``given`` to ``frames[frame]`` for the celestial frame of each
    science HDU checked.
    """
    try:
        size = _data_size(real)
        hdul, caught = _open_fits(real)
        with hdul:
            _check_complete(hdul, size, caught)
            chips = _science_chips(hdul, extname)
            for i in chips:
                users = frames.setdefault(_chip_frame(hdul, i, extname), [])
                if str(given) not in users:
                    users.append(str(given))
            _check_exptime(hdul[0].header, hdul[chips[0]].header)
            return _data_problem(hdul, chips, extname, dq_bits) if check_data else None
    except _Unusable as exc:
        return str(exc)


def _check_target(given: Path, real: Path, *, force: bool) -> list[str]:
    """Problems with updating ``real`` in place (mode bits, not os.access)."""
    problems = []
    mode = real.stat().st_mode
    if not _writable_bits(mode):
        if not force:
            problems.append(
                f"the file is read-only (mode {stat.S_IMODE(mode):04o}); make it "
                "writable, or pass force=True (--force) to update it anyway"
            )
        elif not os.access(real, os.W_OK):
            problems.append(f"the file is read-only (mode {stat.S_IMODE(mode):04o})")
    elif not os.access(real, os.W_OK):
        problems.append("the file is not writable by this user")
    folder = real.parent
    dmode = folder.stat().st_mode
    if not os.access(folder, os.W_OK | os.X_OK):
        problems.append(
            f"its folder {folder} is not writable (a safe update writes a "
            "temporary file there and renames it)"
        )
    elif not _writable_bits(dmode) and not force:
        problems.append(
            f"its folder {folder} is read-only (mode {stat.S_IMODE(dmode):04o}); pass "
            "force=True to update it anyway"
        )
    return problems


def _check_folder(name: str, folder: Path, *, create: bool) -> str | None:
    if folder.exists():
        if not folder.is_dir():
            return f"{name} {str(folder)!r} exists and is not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{name} {str(folder)!r} is not writable"
        return None
    if not create:
        return f"{name}: the folder {str(folder)!r} does not exist"
    parent = folder.parent
    if not parent.is_dir():
        return f"{name}: the folder {str(parent)!r} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return (
            f"{name} {str(folder)!r} cannot be created: {str(parent)!r} is not writable"
        )
    return None


@dataclass(frozen=True)
class CheckOptions:
    """What :func:`check_inputs` checks, besides the files themselves.

    Every field has the default of a plain ``check_inputs(files)``.

    Attributes
    ----------
    in_place : bool
        The files themselves will be updated: each must be a writable regular
        file (checked on the mode bits, so a mode-0444 file is refused even
        for root) in a writable folder.
    output_dir : str or os.PathLike
        Folder for updated copies: must be a writable folder, or a folder that
        can be created (its parent exists and is writable). No copy may land
        on an input, no two inputs may share a file name, and an earlier
        copy there is replaced only if writable (mode bits, unless
        ``force``).
    summary : str or os.PathLike
        File for the summary table: its folder must exist and be writable.
    wcsname : str
        The WCSNAME to write: non-empty printable ASCII, at most 68 characters.
    force : bool
        Update read-only (mode bits) files and folders anyway, where the user
        may write them (e.g. root).
    extname : str
        Name of the science extensions.
    dq_bits : int, str or None
        DQ bits to ignore when judging whether an image is all flagged (as
        :func:`subpixal_jax.io.images.read_exposure`).
    min_files : int
        The least number of exposures (2: one alone has nothing to align to).
    check_data : bool
        Read the science (and DQ) pixels to refuse images that are entirely
        zero, non-finite or flagged. Everything else is checked from headers
        and file sizes only.
    """

    in_place: bool = False
    output_dir: str | os.PathLike | None = None
    summary: str | os.PathLike | None = None
    wcsname: str = "SUBPIXAL"
    force: bool = False
    extname: str = "SCI"
    dq_bits: int | str | None = 0
    min_files: int = 2
    check_data: bool = True


class _Scan(NamedTuple):
    """What the per-file checks found."""

    problems: list[tuple[str, str]]
    notes: list[str]
    pairs: list[tuple[Path, Path]]  # (as given, resolved) of each distinct file
    frames: dict[str, list[str]]  # celestial frame: files in it


def _wcsname_problem(wcsname) -> str | None:
    if not isinstance(wcsname, str) or not wcsname.strip():
        return f"must be a non-empty string, got {wcsname!r}"
    if len(wcsname.strip()) > _MAX_WCSNAME or not all(
        32 <= ord(ch) < 127 for ch in wcsname
    ):
        return f"must be at most 68 printable ASCII characters, got {wcsname!r}"
    return None


def _dq_bits_problem(dq_bits) -> str | None:
    try:
        interpret_bit_flags(dq_bits)
    except (TypeError, ValueError) as exc:
        return f"cannot be interpreted: {dq_bits!r} ({exc})"
    return None


def _locate(p: Path) -> tuple[Path, os.stat_result]:
    """Find the regular file ``p`` names (links resolved) and its status."""
    if not p.exists():
        msg = (
            "no such file"
            if not p.is_symlink()
            else "a symbolic link to a missing file"
        )
        raise _Unusable(msg)
    if p.is_dir():
        msg = "is a folder, not a FITS file"
        raise _Unusable(msg)
    real = p.resolve()
    st = real.stat()
    if not stat.S_ISREG(st.st_mode):
        msg = "is not a regular file"
        raise _Unusable(msg)
    return real, st


def _link_notes(
    p: Path, real: Path, st: os.stat_result, *, in_place: bool
) -> list[str]:
    """Say when a symbolic link is resolved, or hard links would be detached."""
    notes = []
    if real != p.absolute() and (
        p.is_symlink() or any(q.is_symlink() for q in p.absolute().parents)
    ):
        notes.append(f"{p} is a symbolic link to {real}; that file is used")
    if in_place and st.st_nlink > 1:
        notes.append(
            f"{p} has {st.st_nlink} hard links; the update replaces this name "
            "only (the other names keep the old file)"
        )
    return notes


def _scan_files(
    given: list[Path], checks: CheckOptions, extname: str, dq_bits
) -> _Scan:
    """Check every file, in order; a file found twice is checked once."""
    scan = _Scan([], [], [], {})
    seen: dict[tuple[int, int], Path] = {}
    for p in given:
        name = str(p)
        try:
            real, st = _locate(p)
        except _Unusable as exc:
            scan.problems.append((name, str(exc)))
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            twice = f"is the same file as {str(seen[ident])!r}, given twice"
            scan.problems.append((name, twice))
            continue
        seen[ident] = p
        scan.notes.extend(_link_notes(p, real, st, in_place=checks.in_place))
        problem = _check_file(
            p,
            real,
            extname=extname or "SCI",
            dq_bits=dq_bits,
            check_data=checks.check_data,
            frames=scan.frames,
        )
        if problem is not None:
            scan.problems.append((name, problem))
        if checks.in_place:
            scan.problems.extend(
                (name, t) for t in _check_target(p, real, force=checks.force)
            )
        scan.pairs.append((p, real))
    return scan


def _frames_notes(frames: dict[str, list[str]]) -> list[str]:
    if len(frames) <= 1:
        return []
    return [
        "the inputs use different celestial frames ("
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(frames.items()))
        + "); positions are converted between them"
    ]


def _output_dir_checks(
    output_dir: str | os.PathLike, pairs: list[tuple[Path, Path]], *, force: bool
) -> tuple[list[tuple[str, str]], list[str]]:
    """Problems and notes of writing copies of ``pairs`` into ``output_dir``."""
    out = Path(output_dir)
    problem = _check_folder("output_dir", out, create=True)
    if problem is not None:
        return [(str(out), problem)], []
    notes = [] if out.exists() else [f"output_dir {out} will be created"]
    problems = []
    names: dict[str, Path] = {}
    target_dir = out.resolve()
    for g, real in pairs:
        if target_dir / real.name == real:
            problems.append(
                (
                    str(g),
                    f"output_dir {str(out)!r} holds this input itself: "
                    "its copy would replace the original (use in_place, or "
                    "another folder)",
                )
            )
        if real.name in names:
            problems.append(
                (
                    str(g),
                    f"has the same file name as {str(names[real.name])!r}: "
                    f"both copies would be {out / real.name}",
                )
            )
        names.setdefault(real.name, g)
        copy = target_dir / real.name
        if copy != real and copy.exists():
            problems.extend(
                (str(copy), f"(an earlier copy of {g}) {t}")
                for t in _check_target(copy, copy.resolve(), force=force)
            )
    return problems, notes


def _summary_problems(summary: str | os.PathLike) -> list[tuple[str, str]]:
    s = Path(summary)
    if s.is_dir():
        return [(str(s), "summary is a folder, not a file name")]
    problem = _check_folder(
        "summary", s.parent if str(s.parent) else Path("."), create=False
    )
    if problem is not None:
        return [(str(s), problem)]
    if s.exists() and not os.access(s, os.W_OK):
        return [(str(s), "summary exists and is not writable")]
    return []


def check_inputs(
    files: Iterable[str | os.PathLike],
    checks: CheckOptions | None = None,
    **options,
) -> CheckedInputs:
    """Check input files and output places before any work; raise if unusable.

    Parameters
    ----------
    files : iterable of str or os.PathLike
        The exposures (FITS, plain or gzip).
    checks : CheckOptions, optional
        What to check; default ``CheckOptions()``.
    **options
        Fields of :class:`CheckOptions` (``in_place``, ``output_dir``,
        ``summary``, ``wcsname``, ``force``, ``extname``, ``dq_bits``,
        ``min_files``, ``check_data``), overriding those of ``checks``.

    Returns
    -------
    CheckedInputs
        The files, resolved, with notes for the user.

    Raises
    ------
    InputError
        Listing every problem found, each with its file (or option): a
        missing file, a folder given as a file, the same file twice (also
        through another path, a symbolic or a hard link), a truncated or
        unreadable file, an unsupported format (waivered WFPC2, bzip2), a
        science header without a complete celestial WCS, a bad ``EXPTIME``,
        an empty image, too few files, a bad ``wcsname``, an unwritable or
        missing output folder or summary folder, and with ``in_place``,
        targets that may not be changed.

    Notes
    -----
    Symbolic links are resolved: with ``in_place`` the file the link points
    to is updated (and a note says so), the link stays a link. A file with
    several hard links is updated through a rename, which detaches this name
    from the others (a note says so).

    Examples
    --------
    >>> try:
    ...     check_inputs(["no_such_file.fits"])
    ... except InputError as err:
    ...     print(err.problems[0])
    ('no_such_file.fits', 'no such file')
    """
    checks = replace(checks or CheckOptions(), **options)
    if isinstance(files, str | os.PathLike):
        files = [files]
    given = [Path(f) for f in files]
    extname = str(checks.extname).strip().upper()
    dq_problem = _dq_bits_problem(checks.dq_bits)
    problems = [
        (option, problem)
        for option, problem in (
            ("extname", None if extname else "must be a non-empty string"),
            ("dq_bits", dq_problem),
            ("wcsname", _wcsname_problem(checks.wcsname)),
        )
        if problem is not None
    ]
    dq_bits = None if dq_problem else checks.dq_bits
    scan = _scan_files(given, checks, extname, dq_bits)
    problems += scan.problems
    notes = scan.notes + _frames_notes(scan.frames)
    if len(scan.pairs) < checks.min_files:
        problems.append(
            (
                "files",
                f"at least {checks.min_files} different exposures are needed, got "
                f"{len(scan.pairs)}"
                + (f" ({', '.join(map(str, given))})" if given else ""),
            )
        )
    if checks.output_dir is not None:
        more, out_notes = _output_dir_checks(
            checks.output_dir, scan.pairs, force=checks.force
        )
        problems += more
        notes += out_notes
    if checks.summary is not None:
        problems += _summary_problems(checks.summary)
    if problems:
        raise InputError(problems)
    for note in notes:
        log.info("%s", note)
    return CheckedInputs(
        given=tuple(g for g, _ in scan.pairs),
        paths=tuple(r for _, r in scan.pairs),
        notes=tuple(notes),
    )

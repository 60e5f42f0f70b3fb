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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.nddata.bitmask import bitfield_to_boolean_mask, interpret_bit_flags

__all__ = ["CheckedInputs", "InputError", "check_inputs"]

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


def _check_file(
    given: Path,
    real: Path,
    *,
    extname: str,
    dq_bits,
    check_data: bool,
    frames: dict[str, list[str]],
) -> str | None:
    """Problem of one readable regular file as an exposure, or None."""
    with real.open("rb") as f:
        magic = f.read(4)
    gz = magic[:2] == _GZIP_MAGIC
    if magic[:3] == b"BZh" or magic == b"PK\x03\x04":
        return "bzip2/zip files are not supported (only plain or gzip FITS)"
    try:
        size = _uncompressed_size(real) if gz else real.stat().st_size
    except (OSError, EOFError, zlib.error) as exc:
        return f"the gzip file is truncated or corrupt ({exc})"
    if size == 0:
        return "the file is empty (0 bytes)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(
                real, lazy_load_hdus=True, memmap=False, do_not_scale_image_data=True
            )
        except Exception as exc:  # astropy raises many kinds for non-FITS bytes
            return f"not a readable FITS file ({type(exc).__name__}: {exc})"
    with hdul:
        with warnings.catch_warnings(record=True) as more:
            warnings.simplefilter("always")
            try:
                n = len(hdul)  # reads every header, no data
            except Exception as exc:
                return f"not a readable FITS file ({type(exc).__name__}: {exc})"
        for w in (*caught, *more):
            if "truncated" in str(w.message):
                return f"the file is truncated ({w.message})"
        spans = [_span(hdul, i) for i in range(n)]
        extra = size - sum(spans[-1])
        if extra > 0:
            # astropy drops an incomplete header at the end with a warning
            return (
                f"the file is truncated or corrupt: {extra} bytes after its last "
                f"complete HDU ({n - 1}) are not a FITS header"
            )
        for i, (dat_loc, _) in enumerate(spans):
            need = dat_loc + hdul[i].size
            if need > size:
                return (
                    f"the file is truncated: HDU {i} needs {need} bytes, the file "
                    f"has {size}"
                )
        chips = _sci_hdus(hdul, extname)
        primary = hdul[0].header
        if not chips:
            naxis = int(primary.get("NAXIS", 0))
            if naxis == 3:
                shape = [primary.get(f"NAXIS{k}") for k in (1, 2, 3)]
                return (
                    f"unsupported format: a 3-D primary array {shape} without "
                    f"{extname} extensions (waivered WFPC2 c0f/c1f FITS?); convert "
                    "it to multi-extension FITS first (e.g. stsci.tools "
                    "convertwaiveredfits) and align the converted file"
                )
            if naxis != 2:
                return (
                    f"no {extname!r} extension and no 2-D image in the primary HDU "
                    f"(NAXIS={naxis})"
                )
            chips = [0]
        for i in chips:
            hdr = hdul[i].header
            label = "primary HDU" if i == 0 else f"{extname},{hdr.get('EXTVER', 1)}"
            if int(hdr.get("NAXIS", 0)) != 2 or hdul[i].size == 0:
                dims = [
                    hdr.get(f"NAXIS{k}") for k in range(1, int(hdr.get("NAXIS", 0)) + 1)
                ]
                return f"{label} is not a 2-D image (NAXIS={hdr.get('NAXIS')}, {dims})"
            problem = _wcs_problem(hdr)
            if problem is not None:
                return f"{label}: {problem}"
            frames.setdefault(_frame_of(hdr), [])
            if str(given) not in frames[_frame_of(hdr)]:
                frames[_frame_of(hdr)].append(str(given))
        # JWST data models give the effective exposure time instead.
        keys = ("EXPTIME", "EFFEXPTM", "XPOSURE")
        found = [h.get(k) for k in keys for h in (primary, hdul[chips[0]].header)]
        exptime = next((v for v in found if v is not None), None)
        try:
            ok = math.isfinite(float(exptime)) and float(exptime) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            return f"EXPTIME must be a positive number, got {exptime!r}"
        if check_data:
            if any(h.name == "ASDF" for h in hdul):
                # A JWST data model: only its "bad" DQ bits make a pixel unusable.
                from subpixal_jax.jwst import DEFAULT_DQ_BAD

                dq_bits = (2**32 - 1) ^ int(DEFAULT_DQ_BAD)
            return _image_problem(hdul, chips, extname, dq_bits)
    return None


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


def check_inputs(
    files: Iterable[str | os.PathLike],
    *,
    in_place: bool = False,
    output_dir: str | os.PathLike | None = None,
    summary: str | os.PathLike | None = None,
    wcsname: str = "SUBPIXAL",
    force: bool = False,
    extname: str = "SCI",
    dq_bits: int | str | None = 0,
    min_files: int = 2,
    check_data: bool = True,
) -> CheckedInputs:
    """Check input files and output places before any work; raise if unusable.

    Parameters
    ----------
    files : iterable of str or os.PathLike
        The exposures (FITS, plain or gzip).
    in_place : bool, optional
        The files themselves will be updated: each must be a writable regular
        file (checked on the mode bits, so a mode-0444 file is refused even
        for root) in a writable folder.
    output_dir : str or os.PathLike, optional
        Folder for updated copies: must be a writable folder, or a folder that
        can be created (its parent exists and is writable). No copy may land
        on an input, no two inputs may share a file name, and an earlier
        copy there is replaced only if writable (mode bits, unless
        ``force``).
    summary : str or os.PathLike, optional
        File for the summary table: its folder must exist and be writable.
    wcsname : str, optional
        The WCSNAME to write: non-empty printable ASCII, at most 68 characters.
    force : bool, optional
        Update read-only (mode bits) files and folders anyway, where the user
        may write them (e.g. root).
    extname : str, optional
        Name of the science extensions.
    dq_bits : int, str or None, optional
        DQ bits to ignore when judging whether an image is all flagged (as
        :func:`subpixal_jax.images.read_exposure`).
    min_files : int, optional
        The least number of exposures (2: one alone has nothing to align to).
    check_data : bool, optional
        Read the science (and DQ) pixels to refuse images that are entirely
        zero, non-finite or flagged. Everything else is checked from headers
        and file sizes only.

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
    if isinstance(files, str | os.PathLike):
        files = [files]
    given = [Path(f) for f in files]
    problems: list[tuple[str, str]] = []
    notes: list[str] = []
    extname = str(extname).strip().upper()
    if not extname:
        problems.append(("extname", "must be a non-empty string"))
    try:
        interpret_bit_flags(dq_bits)
    except (TypeError, ValueError) as exc:
        problems.append(("dq_bits", f"cannot be interpreted: {dq_bits!r} ({exc})"))
        dq_bits = None
    if not isinstance(wcsname, str) or not wcsname.strip():
        problems.append(("wcsname", f"must be a non-empty string, got {wcsname!r}"))
    elif len(wcsname.strip()) > _MAX_WCSNAME or not all(
        32 <= ord(ch) < 127 for ch in wcsname
    ):
        problems.append(
            (
                "wcsname",
                f"must be at most 68 printable ASCII characters, got {wcsname!r}",
            )
        )

    seen: dict[tuple[int, int], Path] = {}
    frames: dict[str, list[str]] = {}
    pairs: list[tuple[Path, Path]] = []
    for p in given:
        name = str(p)
        if not p.exists():
            problems.append(
                (
                    name,
                    "no such file"
                    if not p.is_symlink()
                    else "a symbolic link to a missing file",
                )
            )
            continue
        if p.is_dir():
            problems.append((name, "is a folder, not a FITS file"))
            continue
        real = p.resolve()
        st = real.stat()
        if not stat.S_ISREG(st.st_mode):
            problems.append((name, "is not a regular file"))
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            problems.append(
                (name, f"is the same file as {str(seen[ident])!r}, given twice")
            )
            continue
        seen[ident] = p
        if real != p.absolute() and (
            p.is_symlink() or any(q.is_symlink() for q in p.absolute().parents)
        ):
            notes.append(f"{name} is a symbolic link to {real}; that file is used")
        if in_place and st.st_nlink > 1:
            notes.append(
                f"{name} has {st.st_nlink} hard links; the update replaces this name "
                "only (the other names keep the old file)"
            )
        problem = _check_file(
            p,
            real,
            extname=extname or "SCI",
            dq_bits=dq_bits,
            check_data=check_data,
            frames=frames,
        )
        if problem is not None:
            problems.append((name, problem))
        if in_place:
            problems.extend((name, t) for t in _check_target(p, real, force=force))
        pairs.append((p, real))

    if len(frames) > 1:
        notes.append(
            "the inputs use different celestial frames ("
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(frames.items()))
            + "); positions are converted between them"
        )
    if len(seen) < min_files:
        problems.append(
            (
                "files",
                f"at least {min_files} different exposures are needed, got "
                f"{len(seen)}" + (f" ({', '.join(map(str, given))})" if given else ""),
            )
        )
    if output_dir is not None:
        out = Path(output_dir)
        problem = _check_folder("output_dir", out, create=True)
        if problem is not None:
            problems.append((str(out), problem))
        else:
            if not out.exists():
                notes.append(f"output_dir {out} will be created")
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
    if summary is not None:
        s = Path(summary)
        if s.is_dir():
            problems.append((str(s), "summary is a folder, not a file name"))
        else:
            problem = _check_folder(
                "summary", s.parent if str(s.parent) else Path("."), create=False
            )
            if problem is not None:
                problems.append((str(s), problem))
            elif s.exists() and not os.access(s, os.W_OK):
                problems.append((str(s), "summary exists and is not writable"))
    if problems:
        raise InputError(problems)
    for note in notes:
        log.info("%s", note)
    return CheckedInputs(
        given=tuple(g for g, _ in pairs),
        paths=tuple(r for _, r in pairs),
        notes=tuple(notes),
    )

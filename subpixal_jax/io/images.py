"""Reading dithered exposures into library-owned arrays.

This is the shared input layer of the shell: the resampler, the cutout code and
the alignment loop all read exposures through :func:`read_exposure`, so there
is one place that decides what a "good" pixel is, which units an exposure is in
and which WCS a chip carries.

An exposure is one FITS file (or an in-memory `~astropy.io.fits.HDUList`)
holding one or more science arrays ("chips"): either a single image in the
primary HDU, or ``SCI`` extensions numbered by ``EXTVER`` (1, 2, ...), each
with optional ``ERR`` and ``DQ`` extensions of the same ``EXTVER``.
"""

from __future__ import annotations

import logging
import os
import pathlib
import warnings
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.nddata.bitmask import bitfield_to_boolean_mask, interpret_bit_flags
from astropy.wcs import WCS

__all__ = ["Chip", "Exposure", "read_exposure"]

log = logging.getLogger(__name__)


@dataclass
class Chip:
    """One science array ("chip") of an exposure, as read.

    The arrays are copies owned by the library; changing them never touches
    the file or the `~astropy.io.fits.HDUList` they were read from.

    Attributes
    ----------
    extver : int
        ``EXTVER`` of the ``SCI`` extension (1 for an image in the primary HDU).
    data : numpy.ndarray
        ``(ny, nx)`` float32 science data in the exposure's native units
        (see `Exposure.units`), **not** sky-subtracted. Bad pixels keep their
        values (possibly NaN); use `valid`.
    valid : numpy.ndarray
        ``(ny, nx)`` bool, True where the pixel is good: finite and not
        flagged in ``DQ`` (after ignoring ``dq_bits``). Cosmic-ray rejection in
        `~subpixal_jax.reference.resample.DrizzleResample` clears further pixels here.
    err : numpy.ndarray or None
        ``(ny, nx)`` float32 ``ERR`` array in native units, or None.
    wcs : astropy.wcs.WCS
        The chip's full WCS (SIP, D2IM and NPOL lookup tables included).
    header : astropy.io.fits.Header
        A copy of the science extension's header.
    """

    extver: int
    data: np.ndarray
    valid: np.ndarray
    err: np.ndarray | None
    wcs: WCS
    header: fits.Header

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` shape of the chip."""
        return self.data.shape


@dataclass
class Exposure:
    """A dithered exposure: its chips, units and exposure time.

    Attributes
    ----------
    name : str
        The path as a string, or a label for an in-memory HDUList.
    path : pathlib.Path or None
        The file it was read from, or None for an in-memory HDUList.
    chips : list of Chip
        The science arrays, sorted by ``EXTVER``.
    units : {'counts', 'rate'}
        ``'rate'`` if the ``BUNIT`` keyword contains ``'/'`` (e.g.
        ``ELECTRONS/S``), else ``'counts'``.
    exptime : float
        Exposure time (primary ``EXPTIME``), positive.
    """

    name: str
    path: pathlib.Path | None
    chips: list[Chip]
    units: str
    exptime: float

    def chip(self, extver: int) -> Chip:
        """Return the chip with the given ``EXTVER``.

        Parameters
        ----------
        extver : int
            The chip's ``EXTVER``.

        Returns
        -------
        Chip
            The chip.

        Raises
        ------
        KeyError
            If the exposure has no such chip.
        """
        for c in self.chips:
            if c.extver == extver:
                return c
        msg = f"exposure {self.name!r} has no chip with extver={extver!r}"
        raise KeyError(msg)


def _find_hdu(hdul: fits.HDUList, extname: str, extver: int):
    for hdu in hdul[1:]:
        name = str(hdu.header.get("EXTNAME", "")).strip().upper()
        if name == extname and int(hdu.header.get("EXTVER", 1)) == extver:
            return hdu
    return None


def _hdu_data(hdu, *, name, what):
    """``hdu.data``, with a read failure (e.g. a truncated file) named."""
    try:
        return hdu.data
    except (ValueError, OSError, TypeError) as exc:
        # astropy's words for a short file are "cannot reshape array of size ..."
        msg = f"{name}: cannot read the {what} data (is the file truncated? {exc})"
        raise ValueError(msg) from exc


def _read_chip(hdul, hdu, extver, *, name, dq_bits):
    data = _hdu_data(hdu, name=name, what=f"science extver {extver}")
    if data is None or data.ndim != 2 or data.size == 0:
        shape = None if data is None else data.shape
        msg = f"{name}: science array of extver {extver} is empty or not 2-D "
        msg += f"(shape {shape})"
        raise ValueError(msg)
    data = np.array(data, dtype=np.float32)
    valid = np.isfinite(data)

    dq_hdu = _find_hdu(hdul, "DQ", extver) if hdu is not hdul[0] else None
    if dq_hdu is not None and _hdu_data(dq_hdu, name=name, what="DQ") is not None:
        dq = np.asarray(dq_hdu.data)
        if dq.shape != data.shape:
            msg = f"{name}: DQ extver {extver} has shape {dq.shape}, "
            msg += f"SCI has {data.shape}"
            raise ValueError(msg)
        if not np.issubdtype(dq.dtype, np.integer):
            dq = dq.astype(np.int64)
        valid &= bitfield_to_boolean_mask(
            dq, ignore_flags=dq_bits, good_mask_value=True, dtype=bool
        )

    err = None
    err_hdu = _find_hdu(hdul, "ERR", extver) if hdu is not hdul[0] else None
    if err_hdu is not None and _hdu_data(err_hdu, name=name, what="ERR") is not None:
        if err_hdu.data.shape != data.shape:
            msg = f"{name}: ERR extver {extver} has shape {err_hdu.data.shape}, "
            msg += f"SCI has {data.shape}"
            raise ValueError(msg)
        err = np.array(err_hdu.data, dtype=np.float32)

    header = hdu.header.copy()
    try:
        wcs = WCS(hdu.header, fobj=hdul, relax=True)
    except Exception as exc:
        msg = f"{name}: cannot read the WCS of extver {extver}: {exc}"
        raise ValueError(msg) from exc
    if not wcs.has_celestial or wcs.naxis != 2:
        msg = f"{name}: extver {extver} has no 2-D celestial WCS "
        msg += f"(CTYPE={list(wcs.wcs.ctype)})"
        raise ValueError(msg)
    wcs.pixel_shape = data.shape[::-1]
    if not valid.any():
        log.warning("%s: extver %d has no valid pixel", name, extver)
    return Chip(extver=extver, data=data, valid=valid, err=err, wcs=wcs, header=header)


def _read_hdulist(hdul, *, name, path, dq_bits, extname):
    sci = [
        h
        for h in hdul[1:]
        if str(h.header.get("EXTNAME", "")).strip().upper() == extname
        and _hdu_data(h, name=name, what=extname) is not None
    ]
    if sci:
        extvers = [int(h.header.get("EXTVER", 1)) for h in sci]
        if len(set(extvers)) != len(extvers):
            msg = f"{name}: duplicate EXTVER among {extname} extensions: {extvers}"
            raise ValueError(msg)
        pairs = sorted(zip(extvers, sci, strict=True), key=lambda p: p[0])
    elif _hdu_data(hdul[0], name=name, what="primary HDU") is not None:
        pairs = [(1, hdul[0])]
    else:
        msg = f"{name}: no {extname!r} extension and no image in the primary HDU"
        raise ValueError(msg)

    primary = hdul[0].header
    exptime = primary.get("EXPTIME", pairs[0][1].header.get("EXPTIME"))
    try:
        exptime = float(exptime)
    except (TypeError, ValueError):
        msg = f"{name}: missing or non-numeric EXPTIME ({exptime!r})"
        raise ValueError(msg) from None
    if not (np.isfinite(exptime) and exptime > 0):
        msg = f"{name}: EXPTIME must be positive, got {exptime!r}"
        raise ValueError(msg)

    bunit = pairs[0][1].header.get("BUNIT", primary.get("BUNIT"))
    if bunit is None:
        log.warning("%s: no BUNIT keyword; assuming counts", name)
        units = "counts"
    else:
        units = "rate" if "/" in str(bunit) else "counts"

    chips = [_read_chip(hdul, h, v, name=name, dq_bits=dq_bits) for v, h in pairs]
    if not any(c.valid.any() for c in chips):
        msg = f"{name}: no valid (finite, unflagged) pixel in any chip"
        raise ValueError(msg)
    if not any(np.any(c.data[c.valid] != 0) for c in chips):
        # an empty exposure would otherwise fail later as a "bad fit" of
        # every exposure it overlaps
        msg = f"{name}: the image is empty (every valid pixel of every chip is 0)"
        raise ValueError(msg)
    return Exposure(name=name, path=path, chips=chips, units=units, exptime=exptime)


def read_exposure(
    source: str | os.PathLike | fits.HDUList,
    *,
    dq_bits: int | str | None = 0,
    extname: str = "SCI",
) -> Exposure:
    """Read an exposure's chips, masks, WCS, units and exposure time.

    Parameters
    ----------
    source : str, os.PathLike or astropy.io.fits.HDUList
        A FITS file name, or an open HDUList (read, never modified or closed).
    dq_bits : int, str or None, optional
        DQ bit flags to **ignore** (treat as good), in the usual syntax: an
        integer, ``"4,8"``, ``"4+8"``, or ``"~4+8"`` (all bits except these).
        ``0`` (the default) means every nonzero DQ value is bad; None means
        DQ is ignored entirely.
    extname : str, optional
        Name of the science extensions. If there is none, a 2-D image in the
        primary HDU is used as the single chip (extver 1).

    Returns
    -------
    Exposure
        The exposure, with library-owned copies of every array.

    Raises
    ------
    ValueError
        If the file has no science data, an empty or non-2-D science array,
        unreadable (e.g. truncated) data, an image whose valid pixels are
        all 0, no celestial WCS, a missing or non-positive ``EXPTIME``, mismatched
        ``DQ``/``ERR`` shapes, no valid pixel at all, or if ``dq_bits`` cannot
        be interpreted.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.io import fits
    >>> from astropy.wcs import WCS
    >>> w = WCS(naxis=2)
    >>> w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> w.wcs.crval = [10.0, -20.0]
    >>> w.wcs.cdelt = [-1e-5, 1e-5]
    >>> sci = fits.ImageHDU(np.ones((8, 10), np.float32), header=w.to_header())
    >>> sci.header["EXTNAME"], sci.header["BUNIT"] = "SCI", "ELECTRONS"
    >>> dq = fits.ImageHDU(np.zeros((8, 10), np.int16), name="DQ")
    >>> dq.data[0, 0] = 4
    >>> hdul = fits.HDUList([fits.PrimaryHDU(), sci, dq])
    >>> hdul[0].header["EXPTIME"] = 100.0
    >>> exp = read_exposure(hdul)
    >>> exp.units, exp.exptime, len(exp.chips), int(exp.chips[0].valid.sum())
    ('counts', 100.0, 1, 79)
    >>> int(read_exposure(hdul, dq_bits=4).chips[0].valid.sum())
    80
    """
    if not isinstance(extname, str) or not extname.strip():
        msg = f"extname must be a non-empty string, got {extname!r}"
        raise ValueError(msg)
    try:
        interpret_bit_flags(dq_bits)
    except (TypeError, ValueError) as exc:
        msg = f"dq_bits could not be interpreted: {dq_bits!r} ({exc})"
        raise ValueError(msg) from None
    extname = extname.strip().upper()

    if isinstance(source, fits.HDUList):
        fname = getattr(source, "filename", lambda: None)()
        name = fname if fname else f"<HDUList {id(source):#x}>"
        return _read_hdulist(
            source, name=name, path=None, dq_bits=dq_bits, extname=extname
        )
    if not isinstance(source, str | os.PathLike):
        msg = f"source must be a path or an HDUList, got {type(source).__name__}"
        raise ValueError(msg)
    path = pathlib.Path(source)
    if not path.is_file():
        msg = f"source: no such file: {str(path)!r}"
        raise ValueError(msg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, memmap=False)
            len(hdul)  # read every header now, under this warnings filter
        except (OSError, ValueError) as exc:
            msg = f"{path}: not a readable FITS file ({exc})"
            raise ValueError(msg) from exc
    for w in caught:
        if "truncated" in str(w.message):
            hdul.close()
            msg = f"{path}: the file is truncated ({w.message})"
            raise ValueError(msg)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    with hdul:
        return _read_hdulist(
            hdul, name=str(path), path=path, dq_bits=dq_bits, extname=extname
        )

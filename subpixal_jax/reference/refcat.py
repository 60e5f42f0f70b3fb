r"""Absolute astrometry: tie an aligned set of exposures to a reference catalog.

The sub-pixel loop aligns exposures to each other; their common frame can
still be off the sky by the pointing error (HST guide stars, JWST: 1–2 arcsec
and more). This module reads an astrometric catalog (Gaia DR3 or any table
with RA/Dec in degrees), propagates it to the observation epoch, and fits
**one** linear correction of the aligned set's catalog onto it. Applying that
one correction to every exposure (``correct_wcs`` with the same matrix,
shift and centre) moves the whole set while keeping the relative alignment
exactly.

Conventions
-----------
Catalog columns after :func:`read_reference_catalog` (Gaia DR3 names and
units): ``ra``, ``dec`` (deg, ICRS), ``ra_error`` (σ of ``ra·cos dec``),
``dec_error`` (mas), ``pmra`` (``μ_α* = μ_α cos δ``), ``pmdec`` (mas/yr),
``pmra_error``, ``pmdec_error`` (mas/yr), ``parallax`` (mas), ``ref_epoch``
(Julian year, TCB for Gaia; 2016.0 for DR3) and ``mag`` (any magnitude,
brightest = smallest); NaN where the file has no such column.

The tie is a fit in 0-based ``wcslin`` pixels, ``xy ≈ M (uv − c) + c + s``,
``xy`` where the aligned set's WCS puts its sources, ``uv`` where the
catalog puts them: the direction :func:`subpixal_jax.io.wcs.correct_wcs`
expects (as in :mod:`subpixal_jax.pipeline.capture`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
from collections.abc import Mapping

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales
from numpy.typing import ArrayLike

from subpixal_jax.core.linfit import FITGEOM_MIN_POINTS, FitStatus, LinearFit
from subpixal_jax.linearfit import iter_linear_fit
from subpixal_jax.reference.matching import (
    MatchLimits,
    MatchResult,
    MatchStatus,
    SearchOptions,
    TransformSummary,
    match_points,
)
from subpixal_jax.status import TieGrade

__all__ = [
    "AbsoluteTie",
    "observation_epoch",
    "positions_at",
    "read_reference_catalog",
    "tie_grade",
    "tie_to_catalog",
]

log = logging.getLogger(__name__)

#: Standard column -> (accepted names, lower case; unit).
_COLUMNS: dict[str, tuple[tuple[str, ...], u.UnitBase]] = {
    "ra": (("ra", "ra_icrs", "raj2000", "ra_deg"), u.deg),
    "dec": (("dec", "de", "dec_icrs", "dej2000", "decj2000", "dec_deg"), u.deg),
    "ra_error": (("ra_error", "ra_err", "e_ra", "e_ra_icrs", "era"), u.mas),
    "dec_error": (("dec_error", "dec_err", "e_dec", "e_de", "e_de_icrs"), u.mas),
    "pmra": (("pmra", "pm_ra", "pmra_cosdec", "pm_ra_cosdec"), u.mas / u.yr),
    "pmdec": (("pmdec", "pm_dec", "pmde"), u.mas / u.yr),
    "pmra_error": (("pmra_error", "pmra_err", "e_pmra"), u.mas / u.yr),
    "pmdec_error": (("pmdec_error", "pmdec_err", "e_pmde", "e_pmdec"), u.mas / u.yr),
    "parallax": (("parallax", "plx"), u.mas),
    "ref_epoch": (("ref_epoch", "epoch"), u.yr),
    "mag": (("phot_g_mean_mag", "mag", "gmag"), u.mag),
}
_FORMATS = {".ecsv": "ascii.ecsv", ".csv": "ascii.csv", ".fits": "fits", ".fit": "fits"}
#: Smallest parallax handed to ERFA (mas): rows without one get a distance at
#: which their proper motion stays well below the speed of light (ERFA warns
#: otherwise). With no radial velocity the distance does not change the
#: propagated direction.
_MIN_PARALLAX = 1e-3


def _format_of(path: pathlib.Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = _FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        msg = f"{path}: unknown catalog format; use .ecsv, .csv or .fits"
        raise ValueError(msg)
    return fmt


def _column(table: Table, names: tuple[str, ...]):
    lower = {name.lower(): name for name in table.colnames}
    for name in names:
        if name in lower:
            return table[lower[name]]
    return None


def _values(col, unit, *, path) -> np.ndarray:
    """Column values in ``unit`` (a column without a unit is taken as is)."""
    if col.unit is not None and unit is not u.mag:
        try:
            values = col.quantity.to_value(unit)
            mask = np.ma.getmaskarray(col)
            return np.where(mask, np.nan, np.asarray(values, dtype=np.float64))
        except u.UnitConversionError as exc:
            msg = f"{path}: column {col.name!r} has unit {col.unit}, not {unit}"
            raise ValueError(msg) from exc
    return np.ma.filled(np.ma.asarray(col, dtype=np.float64), np.nan)


def _epochs(epoch: np.ndarray, meta: Mapping, ref_epoch: float | None) -> np.ndarray:
    """Return the rows' reference epochs: the column, ``ref_epoch``, the meta."""
    epoch = np.asarray(epoch, dtype=np.float64)
    if not np.all(np.isnan(epoch)):
        if ref_epoch is None:
            return epoch
        return np.where(np.isnan(epoch), float(ref_epoch), epoch)
    lower = {str(k).lower(): v for k, v in meta.items()}
    default = ref_epoch if ref_epoch is not None else lower.get("ref_epoch")
    if default is None:
        default = lower.get("epoch")
    return epoch if default is None else np.full(epoch.shape, float(default))


def read_reference_catalog(
    path: str | os.PathLike, *, ref_epoch: float | None = None
) -> Table:
    """Read an astrometric reference catalog (ECSV, CSV or FITS table).

    Parameters
    ----------
    path : str or os.PathLike
        The file; its suffix (``.ecsv``, ``.csv``, ``.fits``/``.fit``,
        optionally ``.gz``) gives the format.
    ref_epoch : float, optional
        Reference epoch (Julian year) of rows without a ``ref_epoch`` column
        value; otherwise the table's ``ref_epoch``/``epoch`` column or meta
        keyword.

    Returns
    -------
    astropy.table.Table
        The standard columns of the module docstring, float64, NaN where
        missing, in the file's row order; ``meta['path']`` is the file (and
        ``meta['name']`` the file's own ``name``, if it has one).

    Raises
    ------
    ValueError
        If the file cannot be read, has no RA or Dec column (the message
        names the file, the missing column and the columns it has), a column
        has an incompatible unit, or proper motions are given without a
        reference epoch.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from astropy.table import Table
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "gaia.csv"
    >>> Table({"RA": [10.0], "DEC": [-20.0], "pmra": [5.0], "pmdec": [0.0],
    ...        "ref_epoch": [2016.0]}).write(path)
    >>> cat = read_reference_catalog(path)
    >>> float(cat["ra"][0]), float(cat["pmra"][0]), float(cat["ref_epoch"][0])
    (10.0, 5.0, 2016.0)
    >>> bool(np.isnan(cat["parallax"][0]))
    True
    """
    path = pathlib.Path(path)
    fmt = _format_of(path)
    if not path.is_file():
        msg = f"{path}: no such file"
        raise ValueError(msg)
    try:
        table = Table.read(path, format=fmt)
    except Exception as exc:
        msg = f"{path}: cannot read a {fmt} table ({exc})"
        raise ValueError(msg) from exc
    out = Table(meta={"path": str(path)})
    if table.meta.get("name"):
        out.meta["name"] = str(table.meta["name"])
    n = len(table)
    for name, (aliases, unit) in _COLUMNS.items():
        col = _column(table, aliases)
        if col is None:
            if name in ("ra", "dec"):
                msg = (
                    f"{path}: no {name!r} column (accepted names: "
                    f"{', '.join(aliases)}, any case); columns: {table.colnames}"
                )
                raise ValueError(msg)
            out[name] = np.full(n, np.nan)
            continue
        out[name] = _values(col, unit, path=path)
    out["ref_epoch"] = _epochs(out["ref_epoch"], table.meta, ref_epoch)
    moving = np.isfinite(out["pmra"]) | np.isfinite(out["pmdec"])
    if np.any(moving & np.isnan(out["ref_epoch"])):
        msg = (
            f"{path}: proper motions without a reference epoch; add a "
            "'ref_epoch' column or pass ref_epoch= (2016.0 for Gaia DR3)"
        )
        raise ValueError(msg)
    bad = ~(np.isfinite(out["ra"]) & np.isfinite(out["dec"]))
    if bad.any():
        log.warning("%s: dropping %d rows without RA/Dec", path, int(bad.sum()))
        out = out[~bad]
    return out


def _as_time(epoch) -> Time:
    if isinstance(epoch, Time):
        return epoch
    if isinstance(epoch, int | float | np.floating | np.integer):
        return Time(float(epoch), format="jyear")
    try:
        return Time(epoch)
    except ValueError as exc:
        msg = f"epoch must be a Time, a Julian year or a date string, got {epoch!r}"
        raise ValueError(msg) from exc


def positions_at(catalog: Table, epoch) -> Table:
    """Propagate a reference catalog to an observation epoch.

    Uses `astropy.coordinates.SkyCoord.apply_space_motion` (ERFA ``pmsafe``)
    with zero radial velocity. Rows without a proper motion keep their
    position. The parallactic (annual) displacement is not applied: the
    positions stay barycentric, as Gaia's are.

    Parameters
    ----------
    catalog : astropy.table.Table
        From :func:`read_reference_catalog`.
    epoch : astropy.time.Time, float or str
        Observation epoch (a float is a Julian year, e.g. 2026.5).

    Returns
    -------
    astropy.table.Table
        A copy with ``ra``/``dec`` at ``epoch``; ``ra_error``/``dec_error``
        grown by the proper-motion errors times the elapsed time where those
        are known; ``meta['epoch']`` the epoch as a Julian year.

    Examples
    --------
    >>> from astropy.table import Table
    >>> cat = Table({"ra": [10.0], "dec": [0.0], "pmra": [0.0],
    ...              "pmdec": [1000.0], "ref_epoch": [2016.0]})
    >>> moved = positions_at(cat, 2026.0)
    >>> round(float((moved["dec"][0] - 0.0) * 3600), 6)  # 10 yr x 1 arcsec/yr
    10.0
    """
    t = _as_time(epoch)
    out = catalog.copy()
    n = len(out)

    def col(name):
        return (
            np.asarray(out[name], dtype=np.float64)
            if name in out.colnames
            else np.full(n, np.nan)
        )

    pmra, pmdec = col("pmra"), col("pmdec")
    ref_epoch = col("ref_epoch")
    moving = (np.isfinite(pmra) | np.isfinite(pmdec)) & np.isfinite(ref_epoch)
    if np.any((np.isfinite(pmra) | np.isfinite(pmdec)) & ~np.isfinite(ref_epoch)):
        msg = "catalog has proper motions without ref_epoch"
        raise ValueError(msg)
    dt = np.where(moving, t.jyear - np.where(moving, ref_epoch, 0.0), 0.0)
    if moving.any():
        m = np.nonzero(moving)[0]
        pm_a = np.nan_to_num(pmra[m])
        pm_d = np.nan_to_num(pmdec[m])
        plx = col("parallax")[m]
        floor = np.maximum(_MIN_PARALLAX, 0.01 * np.hypot(pm_a, pm_d))
        plx = np.where(np.isfinite(plx) & (plx > floor), plx, floor)
        coords = SkyCoord(
            ra=col("ra")[m] * u.deg,
            dec=col("dec")[m] * u.deg,
            pm_ra_cosdec=pm_a * u.mas / u.yr,
            pm_dec=pm_d * u.mas / u.yr,
            distance=(1.0 / plx) * u.kpc,
            radial_velocity=np.zeros(len(m)) * u.km / u.s,
            obstime=Time(ref_epoch[m], format="jyear"),
            frame="icrs",
        )
        moved = coords.apply_space_motion(new_obstime=t)
        ra = col("ra")
        dec = col("dec")
        ra[m] = moved.ra.deg
        dec[m] = moved.dec.deg
        out["ra"] = ra
        out["dec"] = dec
    for err, pm_err in (("ra_error", "pmra_error"), ("dec_error", "pmdec_error")):
        if err in out.colnames and pm_err in out.colnames:
            grow = np.nan_to_num(col(pm_err)) * dt
            out[err] = np.hypot(col(err), grow)
    out.meta["epoch"] = float(t.jyear)
    return out


def observation_epoch(header: Mapping) -> Time:
    """Return the epoch of an exposure from its FITS header.

    Looks, in order, for ``EXPSTART`` (MJD; the mid-exposure with
    ``EXPEND``), ``MJD-OBS`` and ``DATE-OBS`` (with ``TIME-OBS`` when the date
    has no time), all UTC.

    Parameters
    ----------
    header : astropy.io.fits.Header or mapping
        A primary or science header.

    Returns
    -------
    astropy.time.Time
        The epoch (UTC).

    Raises
    ------
    ValueError
        If none of the keywords is present or readable.

    Examples
    --------
    >>> t = observation_epoch({"DATE-OBS": "2026-07-02", "TIME-OBS": "12:00:00"})
    >>> t.isot, round(float(t.jyear), 4)
    ('2026-07-02T12:00:00.000', 2026.4997)
    """
    try:
        if "EXPSTART" in header:
            start = float(header["EXPSTART"])
            end = float(header["EXPEND"]) if "EXPEND" in header else start
            return Time(0.5 * (start + end), format="mjd", scale="utc")
        if "MJD-OBS" in header:
            return Time(float(header["MJD-OBS"]), format="mjd", scale="utc")
        if "DATE-OBS" in header:
            date = str(header["DATE-OBS"]).strip()
            if "T" not in date and "TIME-OBS" in header:
                date = f"{date}T{str(header['TIME-OBS']).strip()}"
            return Time(date, format="isot" if "T" in date else "iso", scale="utc")
    except (TypeError, ValueError) as exc:
        msg = f"cannot read the observation epoch from the header: {exc}"
        raise ValueError(msg) from exc
    msg = "header has none of EXPSTART, MJD-OBS, DATE-OBS: no observation epoch"
    raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class AbsoluteTie(TransformSummary):
    """One linear correction of an aligned set onto a reference catalog.

    ``xy ≈ matrix @ (uv − center) + center + shift`` in 0-based ``wcslin``
    pixels, ``xy`` the aligned set's positions, ``uv`` the catalog's: apply it
    to every exposure's chips with :func:`subpixal_jax.io.wcs.correct_wcs`
    (same ``matrix``, ``shift``, ``center`` and ``fitgeom``). Only when
    ``status`` is OK.

    Attributes
    ----------
    status : MatchStatus
        Outcome.
    reason : str
        Explanation with the numbers.
    matrix : numpy.ndarray, shape (2, 2)
        ``M``.
    shift : numpy.ndarray, shape (2,)
        ``s`` at ``center``, pixels.
    center : numpy.ndarray, shape (2,)
        ``c``.
    fitgeom : str
        Fit geometry.
    n_matches : int
        Catalog stars in the final (clipped) fit.
    rms : float
        Weighted RMS of the residuals, pixels.
    rms_mas : float
        The same in mas.
    shift_err : numpy.ndarray, shape (2,)
        1-sigma errors of ``shift``, pixels.
    shift_err_mas : numpy.ndarray, shape (2,)
        The same in mas.
    rot_err : float
        1-sigma error of the rotation, degrees (0 for 'shift').
    scale_err : float
        1-sigma error of the scale (0 for 'shift' and 'rshift').
    pixel_scale : float
        ``wcslin`` pixel scale, mas per pixel.
    epoch : float
        Epoch of the catalog positions (Julian year), NaN if unknown.
    pairs : numpy.ndarray of int, shape (n, 2)
        Matched ``(i_aligned, i_catalog)`` indices into the inputs.
    match : MatchResult
        The underlying match.
    fit : LinearFit or None
        The weighted clipped fit.
    catalog : str
        Name of the reference catalog (its file's name).
    """

    status: MatchStatus
    reason: str
    matrix: np.ndarray
    shift: np.ndarray
    center: np.ndarray
    fitgeom: str
    n_matches: int
    rms: float
    rms_mas: float
    shift_err: np.ndarray
    shift_err_mas: np.ndarray
    rot_err: float
    scale_err: float
    pixel_scale: float
    epoch: float
    pairs: np.ndarray
    match: MatchResult
    fit: LinearFit | None = None
    catalog: str = ""

    @property
    def grade(self) -> TieGrade:
        """How far the tie can be trusted (:func:`tie_grade`)."""
        return tie_grade(self.ok, self.n_matches, self.rms)


#: A GOOD tie: at least this many stars ...
GOOD_MIN_MATCHES = 25
#: ... and a residual RMS at most this (``wcslin`` pixels; 10 mas on a
#: 0.05 arcsec pixel).
GOOD_MAX_RMS = 0.2
#: A FAIR tie: residual RMS at most this (pixels); worse is POOR.
FAIR_MAX_RMS = 0.5


def tie_grade(ok: bool, n_matches: int, rms: float) -> TieGrade:
    """Grade a tie by its residual RMS (``wcslin`` pixels) and star count.

    GOOD with at least :data:`GOOD_MIN_MATCHES` stars and an RMS at most
    :data:`GOOD_MAX_RMS`; FAIR with an RMS at most :data:`FAIR_MAX_RMS`;
    POOR otherwise; FAILED when the tie was not made (``ok`` False).

    Examples
    --------
    >>> tie_grade(True, 80, 0.05).name, tie_grade(True, 12, 0.05).name
    ('GOOD', 'FAIR')
    >>> tie_grade(True, 80, 0.9).name, tie_grade(False, 0, float("nan")).name
    ('POOR', 'FAILED')
    """
    if not ok:
        return TieGrade.FAILED
    if n_matches >= GOOD_MIN_MATCHES and rms <= GOOD_MAX_RMS:
        return TieGrade.GOOD
    if rms <= FAIR_MAX_RMS:
        return TieGrade.FAIR
    return TieGrade.POOR


def _sky_arrays(sky) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(sky, SkyCoord):
        icrs = sky.icrs
        return icrs.ra.deg.astype(np.float64), icrs.dec.deg.astype(np.float64)
    if isinstance(sky, Table):
        return (
            np.asarray(sky["ra"], dtype=np.float64),
            np.asarray(sky["dec"], dtype=np.float64),
        )
    if isinstance(sky, tuple) and len(sky) == 2:
        ra, dec = (np.asarray(v, dtype=np.float64).ravel() for v in sky)
    else:
        arr = np.asarray(sky, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2:
            msg = (
                "sky_positions must be a SkyCoord, a table with ra/dec, "
                f"(ra, dec) arrays or an (N, 2) array, got shape {arr.shape}"
            )
            raise ValueError(msg)
        ra, dec = arr[:, 0], arr[:, 1]
    if ra.shape != dec.shape:
        msg = f"ra and dec differ in length: {ra.shape} and {dec.shape}"
        raise ValueError(msg)
    return ra, dec


def _errors(value, n, name) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 2 and arr.shape == (n, 2):
        arr = np.sqrt(0.5 * np.sum(arr**2, axis=1))
    if arr.shape != (n,):
        msg = f"{name} must have shape ({n},) or ({n}, 2), got {arr.shape}"
        raise ValueError(msg)
    return arr


def _weights(sigma_mas: np.ndarray | None) -> np.ndarray | None:
    """``1/σ²``; rows without a usable error get the median weight."""
    if sigma_mas is None:
        return None
    ok = np.isfinite(sigma_mas) & (sigma_mas > 0)
    if not ok.any():
        return None
    w = np.zeros_like(sigma_mas)
    w[ok] = 1.0 / sigma_mas[ok] ** 2
    w[~ok] = np.median(w[ok])
    return w


#: The tie's default limits: any shift, rotation within 1 degree and scale
#: within 2% of the aligned set's (it is already on the sky to that level),
#: at least 10 stars within 2 px.
TIE_LIMITS = MatchLimits(
    tolerance=2.0, max_rotation=1.0, scale_range=(0.98, 1.02), min_matches=10
)


def _brightest_first(refcat: Table) -> tuple[Table, np.ndarray, np.ndarray | None]:
    """Return the catalog brightest first, the order, and its errors (mas)."""
    order = np.arange(len(refcat))
    if "mag" in refcat.colnames:
        mag = np.asarray(refcat["mag"], dtype=np.float64)
        order = np.argsort(np.where(np.isfinite(mag), mag, np.inf), kind="stable")
    cat = refcat[order]
    sig_r = None
    if "ra_error" in cat.colnames and "dec_error" in cat.colnames:
        sig_r = np.sqrt(
            0.5
            * (
                np.asarray(cat["ra_error"], dtype=np.float64) ** 2
                + np.asarray(cat["dec_error"], dtype=np.float64) ** 2
            )
        )
    return cat, order, sig_r


def _catalog_name(refcat: Table) -> str:
    """Return the name a tie records: the table's ``name``, else its file's."""
    name = (
        refcat.meta.get("name") or pathlib.Path(str(refcat.meta.get("path", ""))).name
    )
    return str(name)


def _weighted_tie(pairs, xy, uv, weights, fitgeom, center, search, scale_mas):
    """Fit the matched pairs, weighted and clipped, and return the statistics.

    Returns ``(fit, stats)``; ``fit`` is None when it failed.
    """
    i, j = pairs.T
    w_a, w_r = (
        None if w is None else _weights(w[k] / scale_mas)
        for w, k in zip(weights, (i, j), strict=True)
    )
    fit = iter_linear_fit(
        xy[i],
        uv[j],
        w_a,
        w_r,
        fitgeom=fitgeom,
        center=center,
        nclip=search.nclip,
        sigma=search.sigma,
        throw=False,
    )
    if int(fit.status) != FitStatus.OK:
        return None, {}
    shift_err = np.asarray(fit.shift_err, dtype=np.float64)
    return fit, {
        "n_matches": int(fit.npoints),
        "rms": float(fit.rmse),
        "rms_mas": float(fit.rmse) * scale_mas,
        "shift_err": shift_err,
        "shift_err_mas": shift_err * scale_mas,
        "rot_err": float(np.mean(fit.rot_err)),
        "scale_err": float(np.mean(fit.scale_err)),
    }


def tie_to_catalog(
    sky_positions,
    refcat: Table,
    wcslin: WCS,
    limits: MatchLimits | None = None,
    *,
    errors: ArrayLike | None = None,
    fitgeom: str = "shift",
    search: SearchOptions | None = None,
) -> AbsoluteTie:
    r"""Fit one linear correction of an aligned set onto a reference catalog.

    Both catalogs are projected into 0-based ``wcslin`` pixels, matched with
    :func:`~subpixal_jax.reference.matching.match_points` (any shift; rotation and
    scale within the priors), and the matched pairs are fitted with
    :func:`~subpixal_jax.linearfit.iter_linear_fit` weighted by
    ``1/(σ_aligned² + σ_catalog²)``, about ``c = wcslin.wcs.crpix − 1``.

    Parameters
    ----------
    sky_positions : SkyCoord, Table, (ra, dec) or array_like (N, 2)
        The aligned set's source positions (deg), as its corrected WCS puts
        them; brightest first.
    refcat : astropy.table.Table
        The reference catalog at the observation epoch
        (:func:`positions_at`), with ``ra``, ``dec`` and optionally
        ``ra_error``/``dec_error`` (mas) and ``mag`` (used to order it).
    wcslin : astropy.wcs.WCS
        The undistorted TAN frame of the fit (the alignment's ``wcslin``).
    limits : MatchLimits, optional
        Match radius (``wcslin`` pixels), priors and acceptance; default
        :data:`TIE_LIMITS`.
    errors : array_like, shape (N,) or (N, 2), optional
        1-sigma position errors of ``sky_positions`` in mas (per axis;
        ``(σ_x, σ_y)`` pairs are combined).
    fitgeom : {'shift', 'rshift', 'rscale', 'general'}, optional
        Geometry of the tie ('shift' keeps the set's scale and orientation).
    search : SearchOptions, optional
        Triangle search settings and the clipping (``nclip``, ``sigma``) of
        the match's and the tie's fits.

    Returns
    -------
    AbsoluteTie
        The correction, its statistics and errors, and a status.

    Raises
    ------
    ValueError
        Bad inputs (the message names them).
    """
    if fitgeom not in FITGEOM_MIN_POINTS:
        msg = f"fitgeom must be one of {tuple(FITGEOM_MIN_POINTS)}, got {fitgeom!r}"
        raise ValueError(msg)
    if not isinstance(refcat, Table) or not {"ra", "dec"} <= set(refcat.colnames):
        msg = "refcat must be a Table with 'ra' and 'dec' (read_reference_catalog)"
        raise ValueError(msg)
    limits = TIE_LIMITS if limits is None else limits
    search = SearchOptions() if search is None else search
    ra, dec = _sky_arrays(sky_positions)
    sig_a = _errors(errors, len(ra), "errors")
    # Brightest first (triangles come from the brightest stars).
    cat, order, sig_r = _brightest_first(refcat)
    c = np.asarray(wcslin.wcs.crpix, dtype=np.float64) - 1.0
    scale_mas = float(np.mean(proj_plane_pixel_scales(wcslin.celestial))) * 3.6e6
    xy = np.column_stack(wcslin.all_world2pix(ra, dec, 0))
    uv = np.column_stack(
        wcslin.all_world2pix(
            np.asarray(cat["ra"], dtype=np.float64),
            np.asarray(cat["dec"], dtype=np.float64),
            0,
        )
    )
    match = match_points(xy, uv, limits, fitgeom=fitgeom, center=c, search=search)
    status, reason = match.status, match.reason
    nan2 = np.full(2, np.nan)
    stats = {
        "n_matches": match.n_matches,
        "rms": math.nan,
        "rms_mas": math.nan,
        "shift_err": nan2,
        "shift_err_mas": nan2,
        "rot_err": math.nan,
        "scale_err": math.nan,
    }
    fit = None
    if match.ok:
        fit, found = _weighted_tie(
            match.pairs, xy, uv, (sig_a, sig_r), fitgeom, c, search, scale_mas
        )
        if fit is None:
            status = MatchStatus.TOO_FEW_MATCHES
            reason = f"{reason}; the weighted fit failed"
        else:
            stats = found
            reason = (
                f"{reason}; tie '{fitgeom}' on {stats['n_matches']} stars: shift "
                f"({fit.shift[0]:.3f}, {fit.shift[1]:.3f}) ± "
                f"({stats['shift_err'][0]:.3f}, {stats['shift_err'][1]:.3f}) px, "
                f"rms {stats['rms_mas']:.2f} mas"
            )
    log.info("tie_to_catalog %s: %s", status.name, reason)
    pairs = np.zeros((0, 2), dtype=np.intp)
    if fit is not None:
        keep = np.asarray(fit.fitmask, dtype=bool)
        pairs = np.column_stack([match.pairs[keep, 0], order[match.pairs[keep, 1]]])
    return AbsoluteTie(
        status=status,
        reason=reason,
        matrix=np.eye(2) if fit is None else np.asarray(fit.matrix, np.float64),
        shift=np.zeros(2) if fit is None else np.asarray(fit.shift, np.float64),
        center=c,
        fitgeom=fitgeom,
        pixel_scale=scale_mas,
        epoch=float(refcat.meta.get("epoch", math.nan)),
        pairs=pairs,
        match=match,
        fit=fit,
        catalog=_catalog_name(refcat),
        **stats,
    )

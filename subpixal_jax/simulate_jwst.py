r"""Synthetic NIRCam-like calibrated exposures with a gWCS and known pointing errors.

No real JWST file can be downloaded here, so this module writes small
``*_cal.fits`` files with the structure of the jwst pipeline's (an
`stdatamodels.jwst.datamodels.ImageModel`: SCI/ERR/DQ, the gWCS in the ASDF
extension, a SIP approximation in ``meta.wcsinfo``) and the truth they were
made from. It uses numpy, astropy, gwcs and stdatamodels only (and the
source renderer of `subpixal_jax.simulate`), never the JWST reader/writer it
is meant to test: source positions come from gwcs' own numerical inverse.

The gWCS of a detector
----------------------
``detector`` → distortion → ``v2v3`` (arcsec) → V2/V3-to-sky → ``world``:

* the distortion maps 0-based pixels, relative to the reference pixel
  (the chip centre), through a cubic polynomial to "ideal" coordinates
  (arcsec, 0.031"/px) and then to V2/V3 as the SIAF does,
  ``V2 = V2_REF + VPARITY (X cos θ) + Y sin θ``,
  ``V3 = V3_REF - VPARITY (X sin θ) + Y cos θ`` with ``θ = V3IdlYAngle``
  (for ``X`` and ``Y`` the two ideal coordinates); it carries a fitted
  degree-5 inverse polynomial, as the pipeline's distortion files do;
* V2/V3 to sky is the rotation of the pipeline's ``v23tosky``:
  ``RotationSequence3D([V2_REF, -V3_REF, ROLL_REF, DEC_REF, -RA_REF], 'zyxyz')``
  (angles in degrees) between unit vectors.

All detectors of an exposure share one *attitude* (the 3x3 rotation from
V-frame to sky unit vectors); each file's ``RA_REF, DEC_REF, ROLL_REF`` are
computed from it at that detector's ``V2_REF, V3_REF``
(:func:`pointing_from_attitude`).

The injected error
------------------
The header attitude of exposure ``i`` is ``E_i A_i``, ``A_i`` the true one
and ``E_i`` a small sky rotation: a rotation by ``rotation`` degrees about
the true sky direction of the exposure's centre (the mean reference point of
its detectors) followed by the rotation that moves that direction by
``shift`` (nominal pixels of 0.031", along east and north). So the header
gWCS maps every pixel to ``E_i`` of its true sky position.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib
from collections.abc import Mapping

import numpy as np
from astropy import coordinates as coord
from astropy import units as u
from astropy.modeling import fitting
from astropy.modeling import models as m
from astropy.table import Table

from subpixal_jax.simulate import render_sources

try:
    import gwcs
    from gwcs import coordinate_frames as cf
    from gwcs.geometry import CartesianToSpherical, SphericalToCartesian
except ImportError as exc:  # pragma: no cover - depends on the environment
    msg = "subpixal_jax.simulate_jwst needs gwcs: pip install 'subpixal-jax[jwst]'"
    raise ImportError(msg) from exc

__all__ = [
    "DETECTORS",
    "PIXEL_SCALE",
    "JWSTSimConfig",
    "PointingError",
    "SimulatedJWST",
    "attitude_matrix",
    "misregistration",
    "nircam_like_gwcs",
    "pointing_from_attitude",
    "simulate_jwst_exposures",
]

log = logging.getLogger(__name__)

#: Nominal NIRCam short-wave pixel scale, arcsec per pixel.
PIXEL_SCALE = 0.031

#: Reference points (arcsec), V3IdlYAngle (deg) and parity of the synthetic
#: detectors: NIRCam module A short-wave values for NRCA1, with NRCA2 moved
#: next to it so that small chips are adjacent (real full-frame detectors
#: are 2048 px and ~68" apart).
DETECTORS: dict[str, dict[str, float]] = {
    "NRCA1": {
        "v2_ref": 120.6714,
        "v3_ref": -527.3877,
        "v3yangle": -0.5537,
        "vparity": -1,
    },
    "NRCA2": {
        "v2_ref": 120.6100,
        "v3_ref": -518.6000,
        "v3yangle": -0.1837,
        "vparity": -1,
    },
    "NRCA3": {
        "v2_ref": 129.4000,
        "v3_ref": -527.4000,
        "v3yangle": -0.3000,
        "vparity": -1,
    },
    "NRCA4": {
        "v2_ref": 129.3500,
        "v3_ref": -518.6000,
        "v3yangle": -0.4000,
        "vparity": -1,
    },
}

#: Distortion (quadratic and cubic terms, per pixel^n, of the ideal x and y)
#: of each synthetic detector; a 256-px chip bends by ~1 px at its corners.
_DISTORTION = {
    "NRCA1": (
        (3.0e-5, -1.2e-5, 0.8e-5, 2.0e-8, 0.0, -1.0e-8, 0.5e-8),
        (-0.6e-5, 1.5e-5, 2.5e-5, 0.0, 1.5e-8, 0.0, -2.0e-8),
    ),
    "NRCA2": (
        (-2.0e-5, 1.0e-5, -1.2e-5, -1.5e-8, 0.5e-8, 0.0, 1.0e-8),
        (1.0e-5, -2.2e-5, 1.8e-5, 1.0e-8, 0.0, 2.0e-8, 0.0),
    ),
    "NRCA3": (
        (2.0e-5, 0.0, 1.0e-5, 0.0, 1.0e-8, 0.0, 0.0),
        (0.0, 1.0e-5, -2.0e-5, 1.0e-8, 0.0, 0.0, 1.0e-8),
    ),
    "NRCA4": (
        (-1.0e-5, 2.0e-5, 0.0, 1.0e-8, 0.0, 0.0, -1.0e-8),
        (2.0e-5, 0.0, 1.0e-5, 0.0, -1.0e-8, 1.0e-8, 0.0),
    ),
}

#: JWST DQ bits (jwst ``dqflags.pixel``) the simulator sets.
DQ_DO_NOT_USE = 1
DQ_SATURATED = 2
DQ_JUMP_DET = 4
DQ_DEAD = 1024
DQ_HOT = 2048
DQ_REFERENCE_PIXEL = 2147483648

_PHOTMJSR = 0.25  # MJy/sr per DN/s
_GAIN = 2.0  # electrons per DN


@dataclasses.dataclass(frozen=True)
class PointingError:
    """The pointing error injected into one exposure (see the module docstring).

    Parameters
    ----------
    shift : tuple of float
        Move of the exposure centre, in nominal pixels (0.031") along
        (east, north).
    rotation : float, optional
        Rotation about the exposure centre, degrees (positive: east of north).
    """

    shift: tuple[float, float]
    rotation: float = 0.0


@dataclasses.dataclass(frozen=True)
class SimulatedJWST:
    """A simulated JWST set: files and the truth they were made from.

    Attributes
    ----------
    paths : list of list of pathlib.Path
        Per exposure, one ``*_cal.fits`` file per detector.
    detectors : tuple of str
        The detectors of every exposure.
    true_wcs : list of dict of str to gwcs.WCS
        Per exposure, the true gWCS of each detector (by detector name).
    header_wcs : list of dict of str to gwcs.WCS
        The gWCS written in the files (truth plus the pointing error).
    errors : list of PointingError
        The injected errors.
    sources : astropy.table.Table
        The scene (``ra``, ``dec``, ``flux`` [electrons], ``kind``, shape
        columns as in `subpixal_jax.simulate`).
    shape : tuple of int
        ``(ny, nx)`` of every detector.
    exptime : float
        Effective exposure time (s).
    """

    paths: list[list[pathlib.Path]]
    detectors: tuple[str, ...]
    true_wcs: list[dict[str, gwcs.WCS]]
    header_wcs: list[dict[str, gwcs.WCS]]
    errors: list[PointingError]
    sources: Table
    shape: tuple[int, int]
    exptime: float


# ---------------------------------------------------------------------------
# Geometry


def _rot(angles, axes) -> np.ndarray:
    rot = m.RotationSequence3D(list(angles), axes_order=axes)
    return np.array(rot(*np.eye(3)), dtype=np.float64)


def _unit(lon_deg, lat_deg) -> np.ndarray:
    lon, lat = np.deg2rad(lon_deg), np.deg2rad(lat_deg)
    return np.stack(
        [np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1
    )


def _lonlat(v) -> tuple[float, float]:
    v = np.asarray(v, dtype=np.float64)
    lon = math.degrees(math.atan2(v[1], v[0])) % 360.0
    lat = math.degrees(math.atan2(v[2], math.hypot(v[0], v[1])))
    return lon, lat


def attitude_matrix(v2_ref, v3_ref, ra_ref, dec_ref, roll_ref) -> np.ndarray:
    """Return the V-frame-to-sky rotation of a detector's pointing keywords.

    Parameters
    ----------
    v2_ref, v3_ref : float
        Reference point, arcsec.
    ra_ref, dec_ref, roll_ref : float
        Its sky position and the roll, degrees.

    Returns
    -------
    numpy.ndarray
        3x3 rotation acting on unit vectors (V frame → ICRS).

    Examples
    --------
    >>> a = attitude_matrix(120.0, -527.0, 53.0, -27.8, 30.0)
    >>> [round(v, 9) for v in pointing_from_attitude(a, 120.0, -527.0)]
    [53.0, -27.8, 30.0]
    """
    return _rot(
        [v2_ref / 3600.0, -v3_ref / 3600.0, roll_ref, dec_ref, -ra_ref], "zyxyz"
    )


def pointing_from_attitude(att, v2_ref, v3_ref) -> tuple[float, float, float]:
    """``(RA_REF, DEC_REF, ROLL_REF)`` of an attitude at a reference point.

    Parameters
    ----------
    att : array_like, shape (3, 3)
        V-frame-to-sky rotation.
    v2_ref, v3_ref : float
        The reference point, arcsec.

    Returns
    -------
    tuple of float
        Degrees; ``ROLL_REF`` in [0, 360).
    """
    att = np.asarray(att, dtype=np.float64)
    ra, dec = _lonlat(att @ _unit(v2_ref / 3600.0, v3_ref / 3600.0))
    pre = _rot([v2_ref / 3600.0, -v3_ref / 3600.0], "zy")
    post = _rot([dec, -ra], "yz")
    x = post.T @ att @ pre.T
    roll = math.degrees(math.atan2(x[2, 1], x[1, 1]))
    if not np.allclose(_rot([roll], "x"), x, atol=1e-12):
        roll = -roll
    return ra, dec, roll % 360.0


def _distortion(detector: str, shape) -> m.Model:
    """Return the detector -> V2/V3 model (a copy; the fit is cached)."""
    return _cached_distortion(detector, tuple(int(n) for n in shape)).copy()


@functools.lru_cache(maxsize=32)
def _cached_distortion(detector: str, shape) -> m.Model:
    info = DETECTORS[detector]
    ny, nx = shape
    xr, yr = (nx - 1) / 2.0, (ny - 1) / 2.0
    cx, cy = _DISTORTION[detector]
    s = PIXEL_SCALE

    def poly(lin, c):
        # ideal = s * (linear + c20 u² + c11 u v + c02 v² + cubic terms)
        kw = {"c1_0": s * lin[0], "c0_1": s * lin[1]}
        names = ("c2_0", "c1_1", "c0_2", "c3_0", "c2_1", "c1_2", "c0_3")
        kw.update({n: s * v for n, v in zip(names, c, strict=True)})
        return m.Polynomial2D(3, **kw)

    theta = math.radians(info["v3yangle"])
    par = info["vparity"]
    to_v23 = m.AffineTransformation2D(
        matrix=[
            [par * math.cos(theta), math.sin(theta)],
            [-par * math.sin(theta), math.cos(theta)],
        ],
        translation=[info["v2_ref"], info["v3_ref"]],
    )
    ideal = m.Mapping((0, 1, 0, 1)) | (poly((1, 0), cx) & poly((0, 1), cy))
    forward = (m.Shift(-xr) & m.Shift(-yr)) | ideal | to_v23
    # The inverse polynomial (ideal -> pixel offsets), fitted like the
    # pipeline's distortion reference files carry one.
    g = np.linspace(-0.6, 0.6, 41)
    uu, vv = np.meshgrid(g * nx, g * ny)
    ix, iy = ideal(uu, vv)
    fit = fitting.LinearLSQFitter()
    px = fit(m.Polynomial2D(5), ix, iy, uu)
    py = fit(m.Polynomial2D(5), ix, iy, vv)
    inverse = (
        to_v23.inverse
        | m.Mapping((0, 1, 0, 1))
        | (px & py)
        | (m.Shift(xr) & m.Shift(yr))
    )
    forward.inverse = inverse
    forward.name = "distortion"
    return forward


def nircam_like_gwcs(
    detector: str, *, ra_ref: float, dec_ref: float, roll_ref: float, shape
) -> tuple[gwcs.WCS, dict[str, float]]:
    """Build a detector's gWCS with the jwst pipeline's frame structure.

    Parameters
    ----------
    detector : str
        A key of `DETECTORS`.
    ra_ref, dec_ref, roll_ref : float
        Pointing keywords (degrees) at the detector's reference point.
    shape : tuple of int
        ``(ny, nx)``.

    Returns
    -------
    wcs : gwcs.WCS
        Frames ``('detector', 'v2v3', 'world')``, bounding box the chip.
    wcsinfo : dict
        ``v2_ref, v3_ref, vparity, v3yangle, ra_ref, dec_ref, roll_ref``.

    Examples
    --------
    >>> w, info = nircam_like_gwcs("NRCA1", ra_ref=53.0, dec_ref=-27.8,
    ...                            roll_ref=30.0, shape=(64, 64))
    >>> w.available_frames
    ['detector', 'v2v3', 'world']
    >>> [round(float(v), 9) for v in w(31.5, 31.5)]
    [53.0, -27.8]
    """
    if detector not in DETECTORS:
        msg = f"detector must be one of {sorted(DETECTORS)}, got {detector!r}"
        raise ValueError(msg)
    ny, nx = (int(n) for n in shape)
    info = dict(DETECTORS[detector])
    info.update(ra_ref=float(ra_ref), dec_ref=float(dec_ref), roll_ref=float(roll_ref))
    sky = (
        (m.Scale(1 / 3600.0) & m.Scale(1 / 3600.0))
        | SphericalToCartesian(wrap_lon_at=180)
        | m.RotationSequence3D(
            [
                info["v2_ref"] / 3600.0,
                -info["v3_ref"] / 3600.0,
                info["roll_ref"],
                info["dec_ref"],
                -info["ra_ref"],
            ],
            axes_order="zyxyz",
        )
        | CartesianToSpherical(wrap_lon_at=360)
    )
    sky.name = "v23tosky"
    det = cf.Frame2D(name="detector", axes_order=(0, 1), unit=(u.pix, u.pix))
    v2v3 = cf.Frame2D(
        name="v2v3",
        axes_order=(0, 1),
        axes_names=("v2", "v3"),
        unit=(u.arcsec, u.arcsec),
    )
    world = cf.CelestialFrame(
        reference_frame=coord.ICRS(), name="world", axes_names=("lon", "lat")
    )
    w = gwcs.WCS([(det, _distortion(detector, (ny, nx))), (v2v3, sky), (world, None)])
    w.bounding_box = ((-0.5, nx - 0.5), (-0.5, ny - 0.5))
    return w, info


def _small_rotation(axis, angle_rad) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    k = np.array(
        [[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]]
    )
    return np.eye(3) + math.sin(angle_rad) * k + (1 - math.cos(angle_rad)) * k @ k


def _error_rotation(err: PointingError, center) -> np.ndarray:
    ra, dec = _lonlat(center)
    n = _unit(ra, dec)
    east = np.array([-math.sin(math.radians(ra)), math.cos(math.radians(ra)), 0.0])
    north = np.cross(n, east)
    # Rotating by +angle about n turns north towards east (east of north).
    r1 = _small_rotation(-n, math.radians(err.rotation))
    d = (err.shift[0] * east + err.shift[1] * north) * PIXEL_SCALE / 206264.80624709636
    target = n + d
    target /= np.linalg.norm(target)
    axis = np.cross(n, target)
    r2 = (
        np.eye(3)
        if np.linalg.norm(axis) == 0
        else _small_rotation(axis, math.asin(min(np.linalg.norm(axis), 1.0)))
    )
    return r2 @ r1


# ---------------------------------------------------------------------------
# Rendering


def _pixel_positions(w: gwcs.WCS, ra, dec):
    """Exact pixel positions of sky points through a simulator gWCS.

    The sky -> V2/V3 rotation is inverted exactly; the distortion
    polynomial is inverted by Newton steps in the V2/V3 plane, started from
    its fitted inverse (gwcs' ``numerical_inverse`` does not converge on
    these transforms).
    """
    ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
    if ra.size == 0:
        return np.zeros(0), np.zeros(0)
    v2, v3 = w.get_transform("world", "v2v3")(ra, dec)
    dist = w.get_transform("detector", "v2v3")
    x, y = dist.inverse(v2, v3)
    h = 0.5
    for _ in range(8):
        f2, f3 = dist(x, y)
        a2, a3 = dist(x + h, y)
        b2, b3 = dist(x, y + h)
        j11, j12 = (a2 - f2) / h, (b2 - f2) / h
        j21, j22 = (a3 - f3) / h, (b3 - f3) / h
        r2, r3 = v2 - f2, v3 - f3
        det = j11 * j22 - j12 * j21
        dx = (j22 * r2 - j12 * r3) / det
        dy = (-j21 * r2 + j11 * r3) / det
        x, y = x + dx, y + dy
        if np.max(np.hypot(dx, dy)) < 1e-10:
            break
    return np.asarray(x, float), np.asarray(y, float)


def _pixel_shapes(w: gwcs.WCS, x, y, sources):
    """Sky ellipses (r_eff arcsec, axis ratio, PA east of north) in pixels."""
    n = len(x)
    if n == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    h = 0.5
    pts_x = np.concatenate([x - h, x + h, x, x])
    pts_y = np.concatenate([y, y, y - h, y + h])
    ra, dec = w(pts_x, pts_y, with_bounding_box=False)
    ra = np.asarray(ra).reshape(4, n)
    dec = np.asarray(dec).reshape(4, n)
    dec0 = np.radians(np.asarray(sources["dec"], dtype=float))
    dxi = (((ra - ra[0] + 180.0) % 360.0) - 180.0) * np.cos(dec0) * 3600.0
    deta = (dec - dec[0]) * 3600.0
    jac = np.empty((n, 2, 2))
    jac[:, 0, 0] = (dxi[1] - dxi[0]) / (2 * h)
    jac[:, 1, 0] = (deta[1] - deta[0]) / (2 * h)
    jac[:, 0, 1] = (dxi[3] - dxi[2]) / (2 * h)
    jac[:, 1, 1] = (deta[3] - deta[2]) / (2 * h)
    pa = np.radians(np.asarray(sources["pa"], dtype=float))
    a = np.asarray(sources["r_eff"], dtype=float)
    b = a * np.asarray(sources["axis_ratio"], dtype=float)
    major = np.stack([np.sin(pa), np.cos(pa)], axis=-1)
    minor = np.stack([np.cos(pa), -np.sin(pa)], axis=-1)
    q_sky = (
        major[:, :, None] * major[:, None, :] / (a**2)[:, None, None]
        + minor[:, :, None] * minor[:, None, :] / (b**2)[:, None, None]
    )
    q_pix = np.swapaxes(jac, 1, 2) @ q_sky @ jac
    evals, evecs = np.linalg.eigh(q_pix)
    return (
        1.0 / np.sqrt(evals[:, 0]),
        np.sqrt(evals[:, 0] / evals[:, 1]),
        np.degrees(np.arctan2(evecs[:, 1, 0], evecs[:, 0, 0])),
    )


def _render(rng, w, sources, shape, *, psf_fwhm, sky, read_noise, noise):
    ny, nx = shape
    x, y = _pixel_positions(w, np.asarray(sources["ra"]), np.asarray(sources["dec"]))
    near = (x > -40) & (x < nx + 40) & (y > -40) & (y < ny + 40)
    local = sources[near]
    gal = np.asarray(local["kind"]) == "sersic"
    r_pix, ratio, theta = (np.full(len(local), np.nan) for _ in range(3))
    if np.any(gal):
        r_pix[gal], ratio[gal], theta[gal] = _pixel_shapes(
            w, x[near][gal], y[near][gal], local[gal]
        )
    cols = {
        "x": x[near],
        "y": y[near],
        "flux": np.asarray(local["flux"], dtype=float),
        "kind": np.asarray(local["kind"]),
        "fwhm": np.asarray(local["fwhm"], dtype=float),
        "beta": np.asarray(local["beta"], dtype=float),
        "r_eff": r_pix,
        "axis_ratio": ratio,
        "theta": theta,
        "sersic_n": np.asarray(local["sersic_n"], dtype=float),
    }
    expected = sky + render_sources(shape, cols, psf_fwhm=psf_fwhm)
    if noise:
        data = rng.poisson(expected).astype(float) + rng.normal(0, read_noise, shape)
    else:
        data = expected.copy()
    return data, np.sqrt(expected + read_noise**2), expected


def _dq_and_defects(rng, data, expected, full_well):
    """DQ of a calibrated file; NaN where DO_NOT_USE (as the pipeline writes)."""
    nx = data.shape[1]
    dq = np.zeros(data.shape, dtype=np.uint32)
    hot = rng.uniform(size=data.shape) < 1e-3
    dq[hot] |= DQ_DO_NOT_USE | DQ_HOT
    col = int(rng.integers(0, nx))
    dq[:, col] |= DQ_DO_NOT_USE | DQ_DEAD
    dq[:4, :] |= DQ_DO_NOT_USE | DQ_REFERENCE_PIXEL
    jumps = rng.uniform(size=data.shape) < 5e-3
    dq[jumps] |= DQ_JUMP_DET  # corrected in the ramp fit: the data are usable
    dq[expected > full_well] |= DQ_SATURATED
    data = data.copy()
    data[(dq & DQ_DO_NOT_USE) != 0] = np.nan
    return data, dq


# ---------------------------------------------------------------------------
# The data set


def _scene(rng, center_ra, center_dec, half_arcsec, n_stars, n_galaxies, psf_fwhm):
    n = n_stars + n_galaxies
    # Uniform in a square of the tangent plane at the centre, kept apart.
    pts = np.zeros((0, 2))
    while len(pts) < n:
        cand = rng.uniform(-half_arcsec, half_arcsec, (4 * n, 2))
        for c in cand:
            if len(pts) == n:
                break
            if len(pts) == 0 or np.min(np.hypot(*(pts - c).T)) > 12 * PIXEL_SCALE:
                pts = np.vstack([pts, c])
        break
    n = len(pts)
    n_stars = min(n_stars, n)
    xi, eta = np.radians(pts[:, 0] / 3600.0), np.radians(pts[:, 1] / 3600.0)
    n0 = _unit(center_ra, center_dec)
    a0 = math.radians(center_ra)
    east = np.array([-math.sin(a0), math.cos(a0), 0.0])
    north = np.cross(n0, east)
    v = n0 + xi[:, None] * east + eta[:, None] * north
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ra = np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(v[:, 2]))
    flux = np.exp(rng.uniform(math.log(3e3), math.log(3e5), n))
    star = np.arange(n) < n_stars
    nan = np.full(n, np.nan)
    gal = ~star
    r_eff, ratio, pa, sersic = nan.copy(), nan.copy(), nan.copy(), nan.copy()
    r_eff[gal] = np.exp(rng.uniform(math.log(0.05), math.log(0.2), gal.sum()))
    ratio[gal] = rng.uniform(0.4, 1.0, gal.sum())
    pa[gal] = rng.uniform(0.0, 180.0, gal.sum())
    sersic[gal] = rng.uniform(0.7, 2.5, gal.sum())
    table = Table(
        {
            "id": np.arange(1, n + 1),
            "ra": ra,
            "dec": dec,
            "flux": flux,
            "kind": np.where(star, "gaussian", "sersic").astype("U8"),
            "fwhm": np.where(star, psf_fwhm, np.nan),
            "beta": nan,
            "r_eff": r_eff,
            "axis_ratio": ratio,
            "pa": pa,
            "sersic_n": sersic,
        }
    )
    return table


def _draw_errors(rng, n, max_shift, max_rotation):
    errs = [PointingError(shift=(0.0, 0.0), rotation=0.0)]
    for _ in range(1, n):
        ang = rng.uniform(0, 2 * math.pi)
        mag = rng.uniform(0.5, 1.0) * max_shift
        errs.append(
            PointingError(
                shift=(mag * math.cos(ang), mag * math.sin(ang)),
                rotation=float(rng.uniform(-1, 1) * max_rotation),
            )
        )
    return errs


@dataclasses.dataclass(frozen=True)
class JWSTSimConfig:
    """What :func:`simulate_jwst_exposures` simulates.

    Attributes
    ----------
    n_exposures : int
        Exposures (the first has no error).
    detectors : tuple of str
        Keys of `DETECTORS`; every exposure has all of them.
    shape : tuple of int
        ``(ny, nx)`` per detector.
    max_shift, max_rotation : float
        Largest injected shift (nominal pixels) and rotation (degrees);
        drawn per exposure unless ``errors`` is given.
    errors : tuple of PointingError, optional
        The errors, one per exposure.
    n_stars, n_galaxies : int
        Sources of the scene (Gaussian stars, Sersic galaxies).
    psf_fwhm : float
        Star FWHM and galaxy smoothing, pixels.
    exptime : float
        Effective exposure time, seconds.
    sky, read_noise : float
        Sky (electrons per pixel per exposure) and read noise (electrons).
    noise : bool
        Poisson and read noise (else the expectation).
    """

    n_exposures: int = 4
    detectors: tuple[str, ...] = ("NRCA1", "NRCA2")
    shape: tuple[int, int] = (256, 256)
    max_shift: float = 1.5
    max_rotation: float = 0.03
    errors: tuple[PointingError, ...] | None = None
    n_stars: int = 120
    n_galaxies: int = 60
    psf_fwhm: float = 2.1
    exptime: float = 500.0
    sky: float = 100.0
    read_noise: float = 10.0
    noise: bool = True

    def __post_init__(self):
        # Sequences given as lists are kept as tuples (the config is frozen).
        object.__setattr__(self, "detectors", tuple(self.detectors))
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        for d in self.detectors:
            if d not in DETECTORS:
                msg = f"detector must be one of {sorted(DETECTORS)}, got {d!r}"
                raise ValueError(msg)
        if self.errors is not None:
            object.__setattr__(self, "errors", tuple(self.errors))
            if len(self.errors) != self.n_exposures:
                msg = (
                    f"errors must have {self.n_exposures} entries, "
                    f"got {len(self.errors)}"
                )
                raise ValueError(msg)

    @classmethod
    def create(cls, config: JWSTSimConfig | None = None, **kwargs) -> JWSTSimConfig:
        """Return ``config`` (default: the defaults) with fields replaced by name.

        Raises
        ------
        TypeError
            For an unknown field name.
        """
        base = config if config is not None else cls()
        return dataclasses.replace(base, **kwargs) if kwargs else base


def _set_observation(meta, index: int, config: JWSTSimConfig) -> None:
    """Exposure keywords: one exposure per index, shared by its detectors."""
    meta.exposure.type = "NRC_IMAGE"
    meta.exposure.exposure_time = config.exptime
    meta.exposure.effective_exposure_time = config.exptime
    meta.exposure.start_time = 61200.5 + index * 0.01
    obs = meta.observation
    obs.date = "2026-07-01"
    obs.time = f"12:{(index * 15) // 60:02d}:{(index * 15) % 60:02d}.000"
    obs.program_number = "01234"
    obs.observation_number = "001"
    obs.visit_number = "001"
    obs.visit_group = "01"
    obs.sequence_id = "1"
    obs.activity_id = "01"
    obs.exposure_number = f"{index + 1:05d}"


def _set_wcs(meta, w, info, shape) -> None:
    """Set the gWCS, its pointing keywords and the header SIP approximation."""
    keys = ("v2_ref", "v3_ref", "vparity", "v3yangle", "ra_ref", "dec_ref", "roll_ref")
    for k in keys:
        setattr(meta.wcsinfo, k, info[k])
    meta.wcs = w
    ny, nx = shape
    hdr = w.to_fits_sip(
        bounding_box=((-0.5, nx - 0.5), (-0.5, ny - 0.5)),
        max_pix_error=0.01,
        degree=range(1, 7),
        max_inv_pix_error=None,
        npoints=16,
        crpix=[(nx + 1) / 2.0, (ny + 1) / 2.0],
    )
    for key, value in hdr.items():
        if not key.startswith("NAXIS"):
            meta.wcsinfo.instance[key.lower()] = value


def _model(arrays, w, info, *, detector: str, index: int, config: JWSTSimConfig):
    """Return the ImageModel of one detector; ``arrays`` are ``(data, err, dq)``."""
    from stdatamodels.jwst import datamodels

    data, err, dq = arrays
    model = datamodels.ImageModel(data=data.astype(np.float32))
    model.err = err.astype(np.float32)
    model.dq = dq
    meta = model.meta
    meta.telescope = "JWST"
    meta.instrument.name = "NIRCAM"
    meta.instrument.detector = detector
    meta.instrument.module = detector[3]
    meta.instrument.channel = "SHORT"
    meta.instrument.filter = "F200W"
    meta.instrument.pupil = "CLEAR"
    _set_observation(meta, index, config)
    meta.bunit_data = "MJy/sr"
    meta.bunit_err = "MJy/sr"
    meta.photometry.conversion_megajanskys = _PHOTMJSR
    meta.photometry.pixelarea_arcsecsq = PIXEL_SCALE**2
    meta.photometry.pixelarea_steradians = (PIXEL_SCALE / 206264.80624709636) ** 2
    _set_wcs(meta, w, info, config.shape)
    meta.filename = f"jw01234001001_01101_{index + 1:05d}_{detector.lower()}_cal.fits"
    return model


def _detector_gwcs(att, det: str, shape):
    """Return a detector's gWCS under an attitude, and its pointing keywords."""
    ref = DETECTORS[det]
    ra, dec, roll = pointing_from_attitude(att, ref["v2_ref"], ref["v3_ref"])
    return nircam_like_gwcs(det, ra_ref=ra, dec_ref=dec, roll_ref=roll, shape=shape)


def _write_detector(rng, outdir, config, sources, *, index, det, attitudes):
    """Render and save one detector file; return its path and gWCSs."""
    att_true, att_hdr = attitudes
    w_true, _ = _detector_gwcs(att_true, det, config.shape)
    w_hdr, info = _detector_gwcs(att_hdr, det, config.shape)
    electrons, err_e, expected = _render(
        rng,
        w_true,
        sources,
        config.shape,
        psf_fwhm=config.psf_fwhm,
        sky=config.sky,
        read_noise=config.read_noise,
        noise=config.noise,
    )
    full_well = 0.8 * 6.0e4 * _GAIN
    electrons, dq = _dq_and_defects(rng, electrons - config.sky, expected, full_well)
    to_mjysr = _PHOTMJSR / (_GAIN * config.exptime)
    model = _model(
        (electrons * to_mjysr, err_e * to_mjysr, dq),
        w_hdr,
        info,
        detector=det,
        index=index,
        config=config,
    )
    path = outdir / model.meta.filename
    model.save(path)
    model.close()
    return path, w_true, w_hdr


def _scene_half_width(config: JWSTSimConfig, v2c: float, v3c: float) -> float:
    """Half the side (arcsec) of the sky square the scene must cover."""
    spread = max(
        abs(DETECTORS[d]["v3_ref"] - v3c) + abs(DETECTORS[d]["v2_ref"] - v2c)
        for d in config.detectors
    )
    return 0.5 * max(config.shape) * PIXEL_SCALE + spread + 1.0


def simulate_jwst_exposures(
    outdir, config: JWSTSimConfig | None = None, *, seed: int = 0, **kwargs
) -> SimulatedJWST:
    """Write dithered NIRCam-like ``*_cal.fits`` exposures with pointing errors.

    Parameters
    ----------
    outdir : path
        Existing folder for the files.
    config : JWSTSimConfig, optional
        What to simulate (default: four two-detector 256x256 exposures).
    seed : int, optional
        Random seed.
    **kwargs
        :class:`JWSTSimConfig` fields by name (``n_exposures``, ``shape``,
        ``errors``, ...), replacing those of ``config``.

    Returns
    -------
    SimulatedJWST
        Files and truth.

    Examples
    --------
    >>> import tempfile
    >>> sim = simulate_jwst_exposures(
    ...     tempfile.mkdtemp(), n_exposures=2, shape=(32, 32), n_stars=5,
    ...     n_galaxies=0)
    >>> [len(p) for p in sim.paths], sim.detectors
    ([2, 2], ('NRCA1', 'NRCA2'))
    """
    outdir = pathlib.Path(outdir)
    if not outdir.is_dir():
        msg = f"outdir must be an existing folder, got {str(outdir)!r}"
        raise ValueError(msg)
    config = JWSTSimConfig.create(config, **kwargs)
    rng = np.random.default_rng(seed)
    errors = list(
        config.errors
        if config.errors is not None
        else _draw_errors(
            rng, config.n_exposures, config.max_shift, config.max_rotation
        )
    )
    ra0, dec0, roll0 = 53.16, -27.78, 45.0
    v2c = float(np.mean([DETECTORS[d]["v2_ref"] for d in config.detectors]))
    v3c = float(np.mean([DETECTORS[d]["v3_ref"] for d in config.detectors]))
    # Dithers of the reference point: sub-pixel and multi-pixel (arcsec).
    pattern = [(0.0, 0.0), (0.17, 0.05), (0.08, 0.15), (0.26, 0.21)]
    sources = _scene(
        rng,
        ra0,
        dec0,
        _scene_half_width(config, v2c, v3c),
        config.n_stars,
        config.n_galaxies,
        config.psf_fwhm,
    )
    paths, true_wcs, header_wcs = [], [], []
    for i in range(config.n_exposures):
        dv2 = pattern[i % 4][0] + 0.33 * (i // 4)
        dv3 = pattern[i % 4][1] + 0.3 * (i // 4)
        att_true = attitude_matrix(v2c + dv2, v3c + dv3, ra0, dec0, roll0)
        center = att_true @ _unit(v2c / 3600.0, v3c / 3600.0)
        attitudes = (att_true, _error_rotation(errors[i], center) @ att_true)
        paths.append([])
        true_wcs.append({})
        header_wcs.append({})
        for det in config.detectors:
            path, w_true, w_hdr = _write_detector(
                rng, outdir, config, sources, index=i, det=det, attitudes=attitudes
            )
            paths[-1].append(path)
            true_wcs[-1][det] = w_true
            header_wcs[-1][det] = w_hdr
    log.debug("simulated %d JWST exposures in %s", config.n_exposures, outdir)
    return SimulatedJWST(
        paths=paths,
        detectors=config.detectors,
        true_wcs=true_wcs,
        header_wcs=header_wcs,
        errors=errors,
        sources=sources,
        shape=config.shape,
        exptime=float(config.exptime),
    )


def misregistration(
    sim: SimulatedJWST, index: int, wcs: Mapping, *, n: int = 9
) -> float:
    """RMS pixel error of an exposure's chip WCSs against the truth.

    For an ``n x n`` grid of pixels on every detector, the true sky position
    is mapped back through the candidate WCS; the RMS distance (pixels) to
    where it started is the residual misregistration.

    Parameters
    ----------
    sim : SimulatedJWST
        The set.
    index : int
        Exposure index.
    wcs : mapping of str to gwcs.WCS or an object with ``sky_to_pixel``
        Candidate WCS per detector name.
    n : int, optional
        Grid points per axis.

    Returns
    -------
    float
        RMS misregistration in pixels.
    """
    ny, nx = sim.shape
    xx, yy = np.meshgrid(np.linspace(0, nx - 1, n), np.linspace(0, ny - 1, n))
    errors = []
    for det, true in sim.true_wcs[index].items():
        ra, dec = true(xx.ravel(), yy.ravel(), with_bounding_box=False)
        cand = wcs[det]
        if isinstance(cand, gwcs.WCS):
            bx, by = _pixel_positions(cand, ra, dec)
        else:
            bx, by = cand.sky_to_pixel(ra, dec)
        errors.append(
            np.hypot(np.asarray(bx) - xx.ravel(), np.asarray(by) - yy.ravel())
        )
    e = np.concatenate(errors)
    return float(np.sqrt(np.mean(e**2)))

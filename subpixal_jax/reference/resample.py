r"""Drizzle-based resampling with exact O(1) leave-one-out references.

The alignment loop (docs/original.md §1.2) needs, for every exposure *i*, a
reference image built from all the *other* exposures on one output grid that
stays frozen for the whole alignment. The original re-drizzled n−1 exposures
per image per iteration; here each exposure's own weighted contribution is
kept, so

.. math::

    \mathrm{ref}_i = \frac{S - s_i}{W - w_i}, \qquad
    S = \sum_j s_j,\; W = \sum_j w_j,

where :math:`w_j` is exposure *j*'s drizzle weight and :math:`s_j = w_j\,d_j`
its weighted, drizzled data (rate units). A leave-one-out reference costs no
drizzle at all, and a WCS update of exposure *i* re-drizzles only exposure *i*.

Memory: besides the float64 sums ``S`` and ``W``, every exposure keeps its
drizzled image and weight as two float32 output-sized arrays, i.e. 8 bytes per
output pixel per exposure (about 40 MB per exposure for a 2200² grid): fine
for tens of exposures. Each chip's pixel map is cached as well (16 bytes per
input pixel, 134 MB for a 4096x2048 chip), so that drizzling, cosmic-ray
rejection and WCS updates evaluate the WCS once per chip.

WCS objects are turned into pixel maps in exactly one place,
:func:`~subpixal_jax.geometry.homography.chip_pixmap` (re-exported here);
drizzle and blot only see arrays. A WCS correction from the alignment loop
can move a cached map directly
(:func:`~subpixal_jax.geometry.homography.affine_pixmap`).

The pieces are separate functions, callable on their own: the output grid
(:func:`build_output_grid`, :func:`user_output_grid`), the sky
(:func:`exposure_skies`), the drizzle of one exposure
(:func:`drizzle_exposure`), the leave-one-out sums (:class:`LeaveOneOutStack`,
read region by region through a :class:`LeaveOutReader`),
the median of the single drizzles (:func:`median_combine`) and cosmic-ray
masks, returned rather than written into the exposure
(:func:`cosmic_ray_masks`). :class:`DrizzleResample` is the stateful facade
over them that the alignment loop drives (:class:`Resample`); it applies the
cosmic-ray masks to its own copies of the exposures.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord, UnitSphericalRepresentation
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS
from astropy.wcs.utils import celestial_frame_to_wcs, proj_plane_pixel_area
from drizzle.resample import blot_image
from scipy import ndimage

from subpixal_jax.geometry.homography import affine_pixmap, chip_pixmap
from subpixal_jax.geometry.skywcs import SkyWCS
from subpixal_jax.io.images import Chip, Exposure, read_exposure
from subpixal_jax.io.wcs import celestial_frame, convert_wcs_frame, frame_label
from subpixal_jax.reference.drizzle_workers import (
    WorkerError,
    drizzle_chips,
    shared_pool,
)

__all__ = [
    "DrizzleConfig",
    "DrizzleResample",
    "LeaveOneOutStack",
    "LeaveOutReader",
    "Resample",
    "affine_pixmap",
    "build_output_grid",
    "chip_borders",
    "chip_pixmap",
    "chip_rate",
    "cosmic_ray_grid",
    "cosmic_ray_masks",
    "drizzle_exposure",
    "exposure_skies",
    "leave_out_values",
    "median_combine",
    "native_pixel_scale",
    "user_output_grid",
]

log = logging.getLogger(__name__)

_KERNELS = ("square", "point", "turbo", "gaussian", "lanczos2", "lanczos3")
_WEIGHTS = ("exptime", "ivm")
_EDGE_SAMPLES = 33
# Rows per block of a large leave-one-out read (LeaveOutReader.read).
_ROW_BLOCK = 256


@runtime_checkable
class Resample(Protocol):
    """What the alignment loop calls on a resampler (and nothing else).

    Attributes
    ----------
    exposures : list of Exposure
        The inputs, in order; index *i* everywhere refers to this list. The
        loop reads each chip's ``wcs`` and ``valid`` (cosmic-ray flags
        included) from here.
    output_wcs : astropy.wcs.WCS
        The output grid's WCS, frozen for the whole alignment.
    output_shape : tuple of int
        ``(ny, nx)`` of the output grid.
    sky : list of dict
        Per exposure, ``{extver: sky}`` in the exposure's native units.
    sci, wht : numpy.ndarray
        The combined image (rate units) and its weight.
    """

    exposures: list[Exposure]
    output_wcs: WCS
    output_shape: tuple[int, int]
    sky: list[dict[int, float]]

    @property
    def sci(self) -> np.ndarray:
        """Combined image, rate units, 0 where uncovered."""
        ...

    @property
    def wht(self) -> np.ndarray:
        """Combined weight, 0 where uncovered."""
        ...

    def leave_out_reader(self, indices) -> LeaveOutReader:
        """Return the combination of all exposures except ``indices``.

        An object with ``shape`` and ``read(region) -> (sci, wht)`` (see
        `LeaveOutReader`), read only inside the cutout boxes.
        """
        ...

    def median_image(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the median of the single drizzles and where >= 3 cover."""
        ...

    def reject_cosmic_rays(self) -> None:
        """Redo cosmic-ray rejection with the current WCSs."""
        ...

    def use_final_kernel(self) -> bool:
        """Make the combination with the final drizzle kernel from now on.

        Called when the catalog and cosmic-ray passes are done, and before a
        run ends: what the last iteration measures against must be the
        accurate reference. Returns True when the kernel changed (the
        combination is no longer the one measured against), else False.
        """
        ...

    def update_wcs(
        self, i: int, wcs: Mapping[int, WCS], *, affine: tuple | None = None
    ) -> None:
        """Replace exposure *i*'s chip WCSs and update the combination.

        ``affine=(matrix, shift, center)``, when given, is the output-frame
        correction that produced ``wcs`` (see :func:`affine_pixmap`).
        """
        ...


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        msg = f"{name} must be one of {choices}, got {value!r}"
        raise ValueError(msg)


def _check_positive(name: str, value) -> None:
    if not (np.isfinite(value) and value > 0):
        msg = f"{name} must be positive, got {value!r}"
        raise ValueError(msg)


def _check_non_negative(name: str, value) -> None:
    if not (np.isfinite(value) and value >= 0):
        msg = f"{name} must be non-negative, got {value!r}"
        raise ValueError(msg)


#: Default memory for the chips' cached pixel maps (16 bytes per chip pixel):
#: a demo set (8 chips of 512x1024, 67 MB) is cached, a visit of four ACS/WFC
#: exposures (1.07 GB) is not: each drizzle then evaluates its chip's map
#: (~0.2 s for 4096x2048, against ~1.9 s for the drizzle itself).
MAX_CACHED_PIXMAP_BYTES = 512 * 2**20

#: Environment variable: the number of drizzle worker processes (1: none).
WORKERS_ENV = "SUBPIXAL_JAX_DRIZZLE_WORKERS"
#: With ``workers=None``, exposures smaller than this (pixels, all chips)
#: are drizzled in-process: a worker's pickling and start-up would cost
#: more than it saves.
PARALLEL_MIN_PIXELS = 1 << 21
#: With ``workers=None``, at most this many workers (each holds one
#: exposure's inputs and output while it drizzles).
MAX_AUTO_WORKERS = 4
#: Memory one exposure in flight to a worker takes, per input pixel (bytes):
#: map, rate and weights (24) here and again in the worker, plus slack.
WORKER_BYTES_PER_PIXEL = 64


@dataclass(frozen=True)
class DrizzleConfig:
    """Validated drizzle, sky and cosmic-ray settings of `DrizzleResample`.

    The fields are the `DrizzleResample` parameters of the same names (see
    there); construction raises ValueError naming a bad one.
    """

    kernel: str = "square"
    early_kernel: str | None = None
    pixfrac: float = 1.0
    weight: str = "exptime"
    pixel_scale: float | None = None
    rotation: float = 0.0
    sky_sigma: float = 3.0
    cr_reject: bool = False
    cr_sigma: float = 4.0
    cr_scale: float = 1.2
    read_noise: float = 0.0
    max_output_pixels: int = 400_000_000
    max_cached_pixmap_bytes: int = MAX_CACHED_PIXMAP_BYTES
    workers: int | None = None

    def __post_init__(self):
        _check_choice("kernel", self.kernel, _KERNELS)
        if self.early_kernel is not None:
            _check_choice("early_kernel", self.early_kernel, _KERNELS)
        if not (0.0 < float(self.pixfrac) <= 1.0):
            msg = f"pixfrac must be in (0, 1], got {self.pixfrac!r}"
            raise ValueError(msg)
        _check_choice("weight", self.weight, _WEIGHTS)
        for name in ("sky_sigma", "cr_sigma", "max_output_pixels"):
            _check_positive(name, getattr(self, name))
        for name in ("cr_scale", "read_noise", "max_cached_pixmap_bytes"):
            _check_non_negative(name, getattr(self, name))
        if self.pixel_scale is not None and not (
            np.isfinite(self.pixel_scale) and self.pixel_scale > 0
        ):
            msg = "pixel_scale must be a positive number of arcsec, "
            msg += f"got {self.pixel_scale!r}"
            raise ValueError(msg)
        if not np.isfinite(self.rotation):
            msg = f"rotation must be finite, got {self.rotation!r}"
            raise ValueError(msg)
        if self.workers is not None and not (
            isinstance(self.workers, int | np.integer) and self.workers >= 1
        ):
            msg = f"workers must be None or an integer >= 1, got {self.workers!r}"
            raise ValueError(msg)
        object.__setattr__(self, "pixfrac", float(self.pixfrac))


def _area_ratio(pixmap: np.ndarray) -> float:
    """Area of an input pixel in output pixels, at the chip centre."""
    ny, nx = pixmap.shape[:2]
    cy, cx = min(max(ny // 2, 1), ny - 2), min(max(nx // 2, 1), nx - 2)
    if ny < 3 or nx < 3:
        msg = f"chips must be at least 3x3 pixels, got {(ny, nx)}"
        raise ValueError(msg)
    dx = (pixmap[cy, cx + 1] - pixmap[cy, cx - 1]) / 2.0
    dy = (pixmap[cy + 1, cx] - pixmap[cy - 1, cx]) / 2.0
    area = abs(dx[0] * dy[1] - dx[1] * dy[0])
    if not (np.isfinite(area) and area > 0):
        msg = "the chip's pixels have no finite area on the output grid"
        raise ValueError(msg)
    return float(area)


def _chip_scale(wcs) -> float:
    """Pixel scale of a chip WCS at its reference point (degrees)."""
    if isinstance(wcs, SkyWCS):
        return wcs.pixel_scale()
    return math.sqrt(proj_plane_pixel_area(wcs.celestial))


#: Grid rows per block of :func:`median_combine` (keeps a block in cache).
_MEDIAN_ROWS = 32
#: Most exposures per pixel sorted by a min/max network in `median_combine`.
_NETWORK_MAX = 8


def median_combine(singles, shape, *, reject_high: bool = False):
    """Return the per-pixel median of single drizzles where >= 3 cover.

    The detection image of the loop and the model of cosmic-ray rejection.

    Parameters
    ----------
    singles : sequence of (numpy.ndarray, numpy.ndarray)
        Every exposure's own ``(sci, wht)`` on one grid; a pixel covers
        where its weight is positive and its value finite.
    shape : tuple of int
        ``(ny, nx)`` of the grid.
    reject_high : bool, optional
        Drop the highest value where at least 4 cover (see
        :meth:`DrizzleResample.median_image`).

    Returns
    -------
    median : numpy.ndarray
        ``(ny, nx)`` float32, 0 where fewer than 3 cover.
    covered : numpy.ndarray
        ``(ny, nx)`` bool, True where at least 3 cover.
    """
    n = len(singles)
    median = np.zeros(shape, dtype=np.float32)
    enough = np.zeros(shape, dtype=bool)
    for r0 in range(0, shape[0], _MEDIAN_ROWS):
        rows = slice(r0, r0 + _MEDIAN_ROWS)
        # Uncovered (and non-finite) values are +inf: they sort last.
        block = np.full((n, *median[rows].shape), np.inf, np.float32)
        for i, (img, wht) in enumerate(singles):
            good = (wht[rows] > 0) & np.isfinite(img[rows])
            np.copyto(block[i], img[rows], where=good)
        count = np.count_nonzero(block < np.inf, axis=0)
        enough[rows] = count >= 3
        block = _sorted_along_first(block)
        out = median[rows]
        for c in range(3, n + 1):  # pixels with c values: their middle one(s)
            m = c - 1 if reject_high and c >= 4 else c
            middle = 0.5 * (block[(m - 1) // 2] + block[m // 2])
            np.copyto(out, middle, where=count == c)
    return median, enough


def _sorted_along_first(block: np.ndarray) -> np.ndarray:
    """Sort ``block`` along axis 0 (in place for the few-exposure case).

    For up to `_NETWORK_MAX` values per pixel an odd-even transposition
    network of element-wise minima and maxima: the same values as
    ``np.sort(block, axis=0)`` (it only reorders them), several times
    faster for the handful of exposures of a visit (numpy sorts every
    pixel's few values in a call of its own). Equal values may swap, so a
    median of 0 may come out as -0.
    """
    n = block.shape[0]
    if n > _NETWORK_MAX:
        return np.sort(block, axis=0)
    for step in range(n):
        for i in range(step % 2, n - 1, 2):
            low = np.minimum(block[i], block[i + 1])
            np.maximum(block[i], block[i + 1], out=block[i + 1])
            block[i] = low
    return block


def _max_neighbour_difference(img: np.ndarray) -> np.ndarray:
    """Largest absolute difference between each pixel and its 4 neighbours."""
    d = np.zeros_like(img)
    dx = np.abs(np.diff(img, axis=1))
    dy = np.abs(np.diff(img, axis=0))
    np.maximum(d[:, 1:], dx, out=d[:, 1:])
    np.maximum(d[:, :-1], dx, out=d[:, :-1])
    np.maximum(d[1:], dy, out=d[1:])
    np.maximum(d[:-1], dy, out=d[:-1])
    return d


def _chip_border(chip: Chip) -> tuple[np.ndarray, np.ndarray]:
    """Sky coordinates (deg) of points along the chip's outer pixel edges."""
    ny, nx = chip.shape
    t = np.linspace(0.0, 1.0, _EDGE_SAMPLES)
    xs = np.concatenate([t * nx, np.full_like(t, nx), (1 - t) * nx, np.zeros_like(t)])
    ys = np.concatenate([np.zeros_like(t), t * ny, np.full_like(t, ny), (1 - t) * ny])
    ra, dec = chip.wcs.all_pix2world(xs - 0.5, ys - 0.5, 0)
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        msg = f"chip extver {chip.extver}: its WCS gives non-finite sky positions"
        raise ValueError(msg)
    return ra, dec


def _unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra), np.radians(dec)
    return np.stack(
        [np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1
    )


def _as_exposure(src, dq_bits) -> Exposure:
    if isinstance(src, Exposure):
        chips = [
            Chip(
                extver=c.extver,
                data=np.array(c.data, dtype=np.float32),
                valid=np.array(c.valid, dtype=bool),
                err=None if c.err is None else np.array(c.err, dtype=np.float32),
                wcs=c.wcs.deepcopy(),
                header=c.header.copy(),
            )
            for c in src.chips
        ]
        return Exposure(
            name=src.name,
            path=src.path,
            chips=chips,
            units=src.units,
            exptime=float(src.exptime),
        )
    if isinstance(src, fits.HDUList | str | os.PathLike):
        return read_exposure(src, dq_bits=dq_bits)
    msg = "exposures must be Exposure objects, paths or HDULists, "
    msg += f"got {type(src).__name__}"
    raise ValueError(msg)


# ---------------------------------------------------------------------------
# sky


def _auto_sky(chip: Chip, sky_sigma: float) -> float:
    """Sigma-clipped median of a chip's valid pixels (0 without any)."""
    if not chip.valid.any():
        return 0.0
    # The valid pixels as one axis: astropy clips along an axis in compiled
    # code, ~3x faster than its whole-array path on a masked 2-D chip (the
    # same clipped median, bit for bit).
    _, med, _ = sigma_clipped_stats(
        chip.data[chip.valid], sigma=sky_sigma, maxiters=10, axis=0
    )
    return float(med)


def _given_sky(exposure: Exposure, s) -> dict[int, float]:
    if isinstance(s, Mapping):
        missing = {c.extver for c in exposure.chips} - set(s)
        if missing:
            msg = f"sky for {exposure.name} lacks extver(s) {sorted(missing)}: {s!r}"
            raise ValueError(msg)
        d = {c.extver: float(s[c.extver]) for c in exposure.chips}
    else:
        d = {c.extver: float(s) for c in exposure.chips}
    if not all(np.isfinite(v) for v in d.values()):
        msg = f"sky for {exposure.name} must be finite, got {s!r}"
        raise ValueError(msg)
    return d


def exposure_skies(
    exposures: Sequence[Exposure], sky="auto", sky_sigma: float = 3.0
) -> list[dict[int, float]]:
    """Return the sky level of every chip, ``[{extver: sky}, ...]``.

    Parameters
    ----------
    exposures : sequence of Exposure
        The inputs.
    sky : {'auto'}, None or sequence, optional
        See `DrizzleResample`.
    sky_sigma : float, optional
        Clipping threshold of the 'auto' sky.

    Returns
    -------
    list of dict
        Per exposure ``{extver: sky}`` in native units.

    Raises
    ------
    ValueError
        On a malformed ``sky``.
    """
    if sky is None:
        return [{c.extver: 0.0 for c in e.chips} for e in exposures]
    if isinstance(sky, str):
        if sky != "auto":
            msg = f"sky must be 'auto', None or a sequence, got {sky!r}"
            raise ValueError(msg)
        return [{c.extver: _auto_sky(c, sky_sigma) for c in e.chips} for e in exposures]
    sky = list(sky)
    if len(sky) != len(exposures):
        msg = f"sky must have one entry per exposure ({len(exposures)}), "
        msg += f"got {len(sky)}"
        raise ValueError(msg)
    return [_given_sky(e, s) for e, s in zip(exposures, sky, strict=True)]


# ---------------------------------------------------------------------------
# the output grid


def native_pixel_scale(exposures: Sequence[Exposure]) -> float:
    """Return the finest chip pixel scale of the inputs (arcsec).

    The default output scale, and the scale of cosmic-ray rejection;
    taking the finest makes a mixed-scale set independent of file order.
    """
    return 3600.0 * min(_chip_scale(c.wcs) for e in exposures for c in e.chips)


def grid_pixel_scale(output_wcs) -> float:
    """Return the pixel scale of an undistorted output grid (arcsec)."""
    return 3600.0 * math.sqrt(proj_plane_pixel_area(output_wcs))


def chip_borders(exposures: Sequence[Exposure]) -> list[list[tuple]]:
    """Sky points (deg) along every chip's outer edges, per exposure and chip."""
    return [[_chip_border(c) for c in e.chips] for e in exposures]


def _grid_frame(exposures, borders):
    """Choose the grid's celestial frame; return it and the borders in it.

    A grid in the inputs' own frame (e.g. FK5 J2000 for many HST headers)
    needs no frame conversion anywhere. Mixed inputs get the frame most of
    their chips use (ties: the first exposure's); the others' border
    points are converted into it.
    """
    frames = [
        [celestial_frame(c.wcs, f"{e.name} extver {c.extver}") for c in e.chips]
        for e in exposures
    ]
    flat = [f for ex in frames for f in ex]
    counts = [sum(f.is_equivalent_frame(g) for g in flat) for f in flat]
    frame = flat[int(np.argmax(counts))]
    if max(counts) < len(flat):
        others = sorted(
            {frame_label(f) for f in flat if not f.is_equivalent_frame(frame)}
        )
        log.info(
            "the inputs use different celestial frames (%s and %s); the output "
            "grid is in %s and the others are converted",
            frame_label(frame),
            ", ".join(others),
            frame_label(frame),
        )
    converted = []
    for ex, fr in zip(borders, frames, strict=True):
        out = []
        for (ra, dec), f in zip(ex, fr, strict=True):
            if not f.is_equivalent_frame(frame):
                sky = SkyCoord(ra * u.deg, dec * u.deg, frame=f).transform_to(frame)
                sph = sky.represent_as(UnitSphericalRepresentation)
                ra, dec = sph.lon.deg, sph.lat.deg
            out.append((ra, dec))
        converted.append(out)
    return frame, converted


def _tangent_point(ra: np.ndarray, dec: np.ndarray) -> tuple[float, float]:
    """Mean direction of sky points, refused when they are too spread out."""
    vec = _unit_vectors(ra, dec)
    mean = vec.mean(axis=0)
    norm = np.linalg.norm(mean)
    if norm < 1e-6:
        msg = "exposures are spread over the whole sky; no tangent plane fits"
        raise ValueError(msg)
    mean /= norm
    if np.degrees(np.arccos(np.clip(vec @ mean, -1, 1))).max() > 30.0:
        msg = "exposures span more than 30 degrees from their centre: they "
        msg += "do not overlap"
        raise ValueError(msg)
    ra0 = float(np.degrees(np.arctan2(mean[1], mean[0])) % 360.0)
    dec0 = float(np.degrees(np.arcsin(np.clip(mean[2], -1, 1))))
    return ra0, dec0


def build_output_grid(
    exposures: Sequence[Exposure],
    *,
    pixel_scale: float | None = None,
    rotation: float = 0.0,
    max_output_pixels: int = 400_000_000,
    borders=None,
) -> tuple[WCS, tuple[int, int]]:
    """Return an undistorted TAN grid covering all chips of ``exposures``.

    Parameters
    ----------
    exposures : sequence of Exposure
        The inputs (footprints through each chip's full WCS).
    pixel_scale : float, optional
        Arcsec per pixel; default `native_pixel_scale`.
    rotation : float, optional
        Orientation of the y axis, degrees East of North (0: north up).
    max_output_pixels : int, optional
        Refuse a larger grid.
    borders : list, optional
        `chip_borders` of ``exposures``, when already computed.

    Returns
    -------
    wcs : astropy.wcs.WCS
        The grid, tangent at the centre of the inputs, in the celestial frame
        most chips use, with ``pixel_shape`` set.
    shape : tuple of int
        ``(ny, nx)``.

    Raises
    ------
    ValueError
        If the inputs are too spread out or the grid would be too large.
    """
    if borders is None:
        borders = chip_borders(exposures)
    frame, borders = _grid_frame(exposures, borders)
    ra = np.concatenate([b[0] for ex in borders for b in ex])
    dec = np.concatenate([b[1] for ex in borders for b in ex])
    ra0, dec0 = _tangent_point(ra, dec)
    if pixel_scale is None:
        scale = native_pixel_scale(exposures) / 3600.0
    else:
        scale = float(pixel_scale) / 3600.0
    th = math.radians(rotation)
    w = WCS(naxis=2)
    axes = celestial_frame_to_wcs(frame, projection="TAN").wcs
    w.wcs.ctype = list(axes.ctype)
    w.wcs.radesys = axes.radesys
    w.wcs.equinox = axes.equinox
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [1.0, 1.0]
    w.wcs.cd = scale * np.array(
        [[-math.cos(th), math.sin(th)], [math.sin(th), math.cos(th)]]
    )
    x, y = w.wcs_world2pix(ra, dec, 0)
    pad = 1
    # border points are pixel edges: keep every pixel centre inside them
    x0 = math.floor(x.min() + 0.5 + 1e-6) - pad
    y0 = math.floor(y.min() + 0.5 + 1e-6) - pad
    nx = math.ceil(x.max() - 0.5 - 1e-6) + pad - x0 + 1
    ny = math.ceil(y.max() - 0.5 - 1e-6) + pad - y0 + 1
    if nx * ny > max_output_pixels:
        msg = f"the output grid would be {ny}x{nx} pixels (> max_output_pixels="
        msg += f"{max_output_pixels}): the exposures are too far apart to overlap"
        raise ValueError(msg)
    w.wcs.crpix = [1.0 - x0, 1.0 - y0]
    w.pixel_shape = (nx, ny)
    w.wcs.set()
    return w, (ny, nx)


def user_output_grid(
    output_wcs: WCS,
    output_shape: tuple[int, int] | None = None,
    max_output_pixels: int = 400_000_000,
) -> tuple[WCS, tuple[int, int]]:
    """Check a user's output grid; return a copy with its ``(ny, nx)``.

    Raises
    ------
    ValueError
        If ``output_wcs`` is not an undistorted celestial WCS, its shape is
        unknown or not positive, or larger than ``max_output_pixels``.
    """
    if not isinstance(output_wcs, WCS) or not output_wcs.has_celestial:
        msg = f"output_wcs must be a celestial astropy WCS, got {output_wcs!r}"
        raise ValueError(msg)
    if output_wcs.has_distortion:
        msg = "output_wcs must be undistorted (no SIP/D2IM/NPOL)"
        raise ValueError(msg)
    celestial_frame(output_wcs, "output_wcs")  # a frame astropy knows
    if output_shape is None:
        if output_wcs.pixel_shape is None:
            msg = "output_shape is required when output_wcs has no pixel_shape"
            raise ValueError(msg)
        output_shape = tuple(output_wcs.pixel_shape[::-1])
    output_shape = tuple(int(s) for s in output_shape)
    if len(output_shape) != 2 or min(output_shape) < 1:
        msg = f"output_shape must be (ny, nx) positive, got {output_shape!r}"
        raise ValueError(msg)
    if output_shape[0] * output_shape[1] > max_output_pixels:
        msg = f"output_shape {output_shape} exceeds max_output_pixels="
        msg += f"{max_output_pixels}"
        raise ValueError(msg)
    w = output_wcs.deepcopy()
    w.pixel_shape = output_shape[::-1]
    return w, output_shape


def _check_overlap(exposures, borders, output_wcs, output_shape) -> None:
    """Every exposure on the grid, and overlapping another (footprint boxes)."""
    ny, nx = output_shape
    boxes = []
    for e, ex in zip(exposures, borders, strict=True):
        x, y = output_wcs.wcs_world2pix(
            np.concatenate([b[0] for b in ex]),
            np.concatenate([b[1] for b in ex]),
            0,
        )
        box = (x.min(), x.max(), y.min(), y.max())
        if box[1] < -0.5 or box[0] > nx - 0.5 or box[3] < -0.5 or box[2] > ny - 0.5:
            msg = f"exposure {e.name} falls outside the output grid"
            raise ValueError(msg)
        boxes.append(box)
    if len(boxes) < 2:
        return
    for i, (e, a) in enumerate(zip(exposures, boxes, strict=True)):
        if not any(
            a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]
            for j, b in enumerate(boxes)
            if j != i
        ):
            msg = f"exposure {e.name} does not overlap any other exposure"
            raise ValueError(msg)


def _to_grid_frame(exposures, output_wcs) -> None:
    """Express every chip's WCS in the grid's celestial frame (in place).

    Pixel maps, cutouts and fits compare chip and grid coordinates as
    numbers, so a chip in another frame (FK5 among ICRS inputs) is
    converted once here (exact: the frames differ by a rotation; the
    distortion is kept). :func:`subpixal_jax.io.wcs.convert_wcs_frame`
    brings a corrected WCS back to its file's frame before writing. Only
    the resampler's own copies of the exposures are passed here.
    """
    if isinstance(output_wcs, SkyWCS):
        return
    grid = celestial_frame(output_wcs, "output_wcs")
    for e in exposures:
        for c in e.chips:
            if isinstance(c.wcs, SkyWCS):
                continue
            if not celestial_frame(c.wcs, e.name).is_equivalent_frame(grid):
                c.wcs = convert_wcs_frame(c.wcs, grid)


def cosmic_ray_grid(
    exposures: Sequence[Exposure],
    output_wcs: WCS,
    max_output_pixels: int = 400_000_000,
) -> tuple[WCS, tuple[int, int]] | None:
    """Return the grid of cosmic-ray rejection: the inputs' own scale.

    A median drizzled onto a coarser grid and blotted back is smoothed at
    the coarser scale, so star cores would differ from it by much more
    than the noise and be flagged as cosmic rays (AstroDrizzle's separate
    drizzles use the input scale for this reason). When the output scale
    differs from the inputs' by more than 10 %, rejection runs on a grid at
    the inputs' scale; otherwise on the output grid itself (None).
    """
    out_scale = grid_pixel_scale(output_wcs)
    native = native_pixel_scale(exposures)
    if abs(out_scale / native - 1.0) <= 0.1:
        return None
    return build_output_grid(
        exposures, pixel_scale=native, max_output_pixels=max_output_pixels
    )


#: drizzle kernels that interpolate the input at each output pixel.
_INTERPOLATING_KERNELS = ("lanczos2", "lanczos3")


def grid_kernel(kernel: str, output_wcs, exposures: Sequence[Exposure]) -> str:
    """Return the kernel to drizzle with onto ``output_wcs``.

    ``kernel`` itself, except that an interpolating (Lanczos) kernel onto a
    grid coarser than the inputs' finest pixels would alias instead of
    average (the default simulated set on a 1.6x coarser grid: 0.041 px of
    misregistration against square's 0.025 px); 'square' is used there.
    """
    if kernel not in _INTERPOLATING_KERNELS:
        return kernel
    out_scale = grid_pixel_scale(output_wcs)
    native = native_pixel_scale(exposures)
    if out_scale <= native * (1.0 + 1e-3):
        return kernel
    log.info(
        "drizzle grid of %.4g arcsec/px, coarser than the finest input "
        "pixels (%.4g): kernel 'square' instead of %r",
        out_scale,
        native,
        kernel,
    )
    return "square"


# ---------------------------------------------------------------------------
# drizzle of one exposure


def chip_rate(exposure: Exposure, chip: Chip, sky: float, weight: str = "exptime"):
    """Return a chip's sky-subtracted rate, weight map and weight scale.

    Bad pixels are 0 in both. ``weight`` is 'exptime' (the map is the
    validity, scaled by EXPTIME) or 'ivm' (inverse variance of the rate
    from ``ERR``).
    """
    e, c = exposure, chip
    scale = e.exptime if e.units == "counts" else 1.0
    rate = np.where(c.valid, (c.data - np.float32(sky)) / np.float32(scale), 0)
    if weight == "exptime":
        wmap = c.valid.astype(np.float32)
        wscale = e.exptime
    else:
        var = (c.err.astype(np.float64) / scale) ** 2
        good = c.valid & np.isfinite(var) & (var > 0)
        wmap = np.where(good, 1.0 / np.where(good, var, 1.0), 0.0)
        wscale = 1.0
    return rate.astype(np.float32), wmap.astype(np.float32), wscale


def drizzle_exposure(
    exposure: Exposure,
    sky: Mapping[int, float],
    pixmap_of: Callable[[Chip], np.ndarray],
    out_shape: tuple[int, int],
    *,
    kernel: str = "square",
    pixfrac: float = 1.0,
    weight: str = "exptime",
) -> tuple[np.ndarray, np.ndarray]:
    """Drizzle all chips of one exposure onto a grid.

    Parameters
    ----------
    exposure : Exposure
        The exposure (its chips' ``valid`` masks are honoured).
    sky : mapping of int to float
        Sky per ``extver``, native units.
    pixmap_of : callable
        ``pixmap_of(chip)``: the chip's ``(ny, nx, 2)`` map onto the grid
        (e.g. :func:`chip_pixmap`).
    out_shape : tuple of int
        ``(ny, nx)`` of the grid.
    kernel, pixfrac, weight
        See `DrizzleResample`.

    Returns
    -------
    sci, wht : numpy.ndarray
        ``(ny, nx)`` float32 rate image (0 where uncovered) and weight.
    """
    chips = drizzle_inputs(exposure, sky, pixmap_of, pixfrac=pixfrac, weight=weight)
    return drizzle_chips(out_shape, kernel, chips)


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _available_bytes() -> float:
    """Free physical memory (Linux); infinite where the OS does not say."""
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return math.inf


def drizzle_worker_count(workers: int | None, exposures: Sequence[Exposure]) -> int:
    """How many processes drizzle exposures at once (1: in this process).

    Parameters
    ----------
    workers : int or None
        Asked for; None: the `WORKERS_ENV` environment variable if set, else
        up to `MAX_AUTO_WORKERS` (and the CPUs this process may use) when
        the exposures average at least `PARALLEL_MIN_PIXELS` pixels, as
        many as a quarter of the free memory holds (each exposure in flight
        costs ~`WORKER_BYTES_PER_PIXEL` per input pixel: its inputs here and
        in the worker, and its output).
    exposures : sequence of Exposure
        The exposures to drizzle (never more workers than exposures).
    """
    if workers is None:
        env = os.environ.get(WORKERS_ENV, "").strip()
        if env:
            try:
                workers = int(env)
            except ValueError:
                workers = 0
            if workers < 1:
                msg = f"{WORKERS_ENV} must be an integer >= 1, got {env!r}"
                raise ValueError(msg)
        else:
            pixels = sum(c.data.size for e in exposures for c in e.chips)
            per_job = WORKER_BYTES_PER_PIXEL * pixels / len(exposures)
            fit = int(min(0.25 * _available_bytes() / per_job, MAX_AUTO_WORKERS))
            big = pixels >= PARALLEL_MIN_PIXELS * len(exposures)
            workers = max(1, min(fit, _usable_cpus())) if big else 1
    return max(1, min(int(workers), len(exposures)))


def drizzle_inputs(
    exposure: Exposure,
    sky: Mapping[int, float],
    pixmap_of: Callable[[Chip], np.ndarray],
    *,
    pixfrac: float = 1.0,
    weight: str = "exptime",
) -> list[dict]:
    """Per chip, the ``add_image`` arguments of `drizzle_exposure`."""
    chips = []
    for c in exposure.chips:
        pixmap = pixmap_of(c)
        area = _area_ratio(pixmap)
        rate, wmap, wscale = chip_rate(exposure, c, sky[c.extver], weight)
        chips.append(
            {
                "data": rate,
                "exptime": exposure.exptime,
                "pixmap": pixmap,
                "iscale": 1.0 / area,
                "pixel_scale_ratio": 1.0 / math.sqrt(area),
                "weight_map": wmap,
                "wht_scale": wscale,
                "pixfrac": pixfrac,
                "in_units": "cps",
            }
        )
    return chips


# ---------------------------------------------------------------------------
# the leave-one-out accumulator


class LeaveOneOutStack:
    r"""Running sums :math:`S = \sum_j w_j d_j`, :math:`W = \sum_j w_j`.

    Keeps every exposure's own drizzle, so that the combination without
    any subset is two subtractions (no drizzle).

    Parameters
    ----------
    n : int
        Number of exposures.
    shape : tuple of int
        ``(ny, nx)`` of the grid.
    """

    def __init__(self, n: int, shape: tuple[int, int]):
        self.shape = tuple(shape)
        self._img: list[np.ndarray | None] = [None] * n
        self._wht: list[np.ndarray | None] = [None] * n
        self._S = np.zeros(self.shape, dtype=np.float64)
        self._W = np.zeros(self.shape, dtype=np.float64)
        #: Number of `set` calls: readers made before the last one are stale.
        self.version = 0

    def set(self, i: int, img: np.ndarray, wht: np.ndarray) -> None:
        """Replace exposure *i*'s drizzled ``(sci, wht)`` in the sums."""
        # One float64 temporary per product (np.multiply casts as it goes; the
        # same values as ``img.astype(np.float64) * wht``).
        if self._img[i] is not None:
            self._S -= np.multiply(self._img[i], self._wht[i], dtype=np.float64)
            self._W -= self._wht[i]
        self._S += np.multiply(img, wht, dtype=np.float64)
        self._W += wht
        self._img[i], self._wht[i] = img, wht
        self.version += 1

    def contribution(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Return exposure *i*'s own ``(sci, wht)`` (the stack's arrays)."""
        return self._img[i], self._wht[i]

    @property
    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """``(S, W)``, the float64 sums (the stack's arrays)."""
        return self._S, self._W

    @property
    def singles(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every exposure's own ``(sci, wht)``, in order."""
        return list(zip(self._img, self._wht, strict=True))

    def combined(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(S / W, W)`` as read-only float32 (0 where uncovered)."""
        sci = np.zeros(self.shape, dtype=np.float32)
        np.divide(self._S, self._W, out=sci, where=self._W > 0)
        wht = self._W.astype(np.float32)
        sci.flags.writeable = False
        wht.flags.writeable = False
        return sci, wht

    def leave_out(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Return the float32 ``(sci, wht)`` without the exposures ``indices``."""
        return self.reader(indices).full()

    def reader(self, indices) -> LeaveOutReader:
        """Return the combination without ``indices``, computed where read.

        Valid until the next `set` (then its reads raise RuntimeError).
        """
        return LeaveOutReader(self, tuple(sorted(set(indices))), self.version)

    def check(self, names: Sequence[str]) -> None:
        """Raise ValueError if an exposure is empty or overlaps no other one."""
        n = len(names)
        for i, name in enumerate(names):
            own = self._wht[i] > 0
            if not own.any():
                msg = f"exposure {name} has no valid pixel on the output grid"
                raise ValueError(msg)
            if n > 1 and not np.any(own & (self._W - self._wht[i] > 0)):
                msg = f"exposure {name} does not overlap any other exposure"
                raise ValueError(msg)


def leave_out_values(
    totals: tuple[np.ndarray, np.ndarray],
    left_out: Sequence[tuple[np.ndarray, np.ndarray]],
    region: tuple[slice, slice] = (slice(None), slice(None)),
) -> tuple[np.ndarray, np.ndarray]:
    r"""Return :math:`((S - \sum_i w_i d_i) / (W - \sum_i w_i),\ W - \sum_i w_i)`.

    Evaluated on ``region`` only: every operation is elementwise, so the
    values of a region equal that region of the full-frame result bit for
    bit.

    Parameters
    ----------
    totals : tuple of numpy.ndarray
        ``(S, W)``: float64 sums of ``w_j d_j`` and ``w_j`` over all
        exposures.
    left_out : sequence of (numpy.ndarray, numpy.ndarray)
        ``(d_i, w_i)`` float32 drizzle and weight of each exposure to take
        out, subtracted in this order.
    region : tuple of slice, optional
        Basic 2-D index of the values to compute (default: everything).

    Returns
    -------
    sci, wht : numpy.ndarray
        float32 image of ``region`` (0 where the remaining weight is not
        positive) and the remaining weight (0 there too).
    """
    s, w = totals[0][region], totals[1][region]
    for img, wht in left_out:
        part = wht[region]
        w = w - part
        s = s - np.multiply(img[region], part, dtype=np.float64)
    good = w > 0
    # Unmasked (boolean indexing would cost 3 passes more), and the quotient
    # cast once: a float32 `out` with `where`, or np.where for the weight,
    # make a 30x32 box's read ~40 % slower (25 vs 18 us, measured).
    sci = np.divide(s, w, out=np.zeros(w.shape), where=good).astype(np.float32)
    wht = w.astype(np.float32)  # a new array: `w` may be a view of the totals
    wht[~good] = 0
    return sci, wht


@dataclass(frozen=True, eq=False)
class LeaveOutReader:
    """The combination without some exposures, computed only where read.

    Made by `LeaveOneOutStack.reader` (or `DrizzleResample.leave_out_reader`);
    a region read costs time and memory in proportion to its size, so
    cutting small boxes out of a leave-one-out reference needs no
    full-frame array. It reads the stack's arrays when asked, so it holds
    only while the stack is unchanged (its ``version``).

    Attributes
    ----------
    stack : LeaveOneOutStack
        The sums and contributions read.
    indices : tuple of int
        The exposures left out, sorted, without duplicates.
    version : int
        ``stack.version`` when the reader was made.
    """

    stack: LeaveOneOutStack
    indices: tuple[int, ...]
    version: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the grid."""
        return self.stack.shape

    def read(self, region: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """Return the float32 ``(sci, wht)`` of ``region`` (see `leave_out_values`).

        A region of more than 256 rows is computed in blocks of rows, so its
        float64 temporaries stay the size of a block.

        Parameters
        ----------
        region : tuple of slice
            Basic 2-D index into the grid, e.g. ``(slice(y0, y1), slice(x0, x1))``.

        Returns
        -------
        sci, wht : numpy.ndarray
            The region's image (rate units, 0 where no remaining exposure
            covers) and the remaining exposures' weight.

        Raises
        ------
        RuntimeError
            If the stack changed since the reader was made.
        """
        if self.stack.version != self.version:
            msg = "the leave-one-out stack changed since this reader was made"
            raise RuntimeError(msg)
        totals = self.stack.totals
        left_out = [self.stack.contribution(i) for i in self.indices]
        rows, cols = region
        start, stop, step = rows.indices(self.shape[0])
        if step != 1 or stop - start <= _ROW_BLOCK:
            return leave_out_values(totals, left_out, region)
        # in row blocks: float64 temporaries of a block, not of the region
        width = len(range(*cols.indices(self.shape[1])))
        sci = np.empty((stop - start, width), dtype=np.float32)
        wht = np.empty_like(sci)
        for r0 in range(start, stop, _ROW_BLOCK):
            r1 = min(r0 + _ROW_BLOCK, stop)
            block = leave_out_values(totals, left_out, (slice(r0, r1), cols))
            sci[r0 - start : r1 - start], wht[r0 - start : r1 - start] = block
        return sci, wht

    def full(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the whole ``(ny, nx)`` float32 ``(sci, wht)``."""
        return self.read((slice(None), slice(None)))


# ---------------------------------------------------------------------------
# cosmic rays


def cosmic_ray_masks(
    exposure: Exposure,
    sky: Mapping[int, float],
    median: np.ndarray,
    covered: np.ndarray,
    pixmap_of: Callable[[Chip], np.ndarray],
    *,
    cr_sigma: float = 4.0,
    cr_scale: float = 1.2,
    read_noise: float = 0.0,
) -> list[np.ndarray]:
    """Return the cosmic-ray pixels of every chip of an exposure.

    The median is blotted back onto each chip (poly5) as its model; pixels
    with ``|data - model| > cr_sigma * noise + cr_scale * gradient`` where
    the median is defined are flagged and the flags grown by 1 pixel. The
    chips are not changed.

    Parameters
    ----------
    exposure : Exposure
        The exposure; its chips' ``valid`` masks limit the flags.
    sky : mapping of int to float
        Sky per ``extver``, native units.
    median, covered : numpy.ndarray
        The median image (rate units) on the grid of ``pixmap_of`` and
        where it is defined (see `median_combine`).
    pixmap_of : callable
        ``pixmap_of(chip)``: the chip's map onto the median's grid.
    cr_sigma, cr_scale, read_noise
        See `DrizzleResample`.

    Returns
    -------
    list of numpy.ndarray
        Per chip (in ``exposure.chips`` order), bool, True = cosmic ray.
    """
    cover = covered.astype(np.float32)
    struct = np.ones((3, 3), dtype=bool)
    e = exposure
    scale = e.exptime if e.units == "counts" else 1.0
    masks = []
    for c in e.chips:
        pixmap = pixmap_of(c)
        area = _area_ratio(pixmap)
        model = blot_image(median, pixmap, iscale=area * scale, interp="poly5")
        inside = blot_image(cover, pixmap, interp="nearest") > 0.5
        model = model.astype(np.float64) + sky[c.extver]
        if c.err is not None:
            noise = c.err.astype(np.float64)
        else:
            electrons = np.maximum(model, 0) * (e.exptime / scale)
            noise = np.sqrt(electrons + read_noise**2) * scale / e.exptime
        deriv = _max_neighbour_difference(model)
        with np.errstate(invalid="ignore"):
            bad = np.abs(c.data - model) > cr_sigma * noise + cr_scale * deriv
        bad &= c.valid & inside
        masks.append(ndimage.binary_dilation(bad, structure=struct) & c.valid)
    return masks


def _check_chip_wcs(exposure: Exposure, wcs) -> None:
    """Raise ValueError unless ``wcs`` maps extvers of ``exposure`` to sky WCSs."""
    if not isinstance(wcs, Mapping) or not wcs:
        msg = f"wcs must be a non-empty {{extver: WCS}} mapping, got {wcs!r}"
        raise ValueError(msg)
    extvers = {c.extver for c in exposure.chips}
    for k, w in wcs.items():
        if k not in extvers:
            msg = f"wcs: exposure {exposure.name} has no extver {k!r} "
            msg += f"(has {sorted(extvers)})"
            raise ValueError(msg)
        if not isinstance(w, SkyWCS) and (
            not isinstance(w, WCS) or not w.has_celestial
        ):
            msg = f"wcs[{k}] must be a celestial astropy WCS, got {w!r}"
            raise ValueError(msg)


def _checked_affine(affine) -> tuple | None:
    """``(matrix, shift, center)`` as float64 arrays; ValueError if malformed."""
    if affine is None:
        return None
    if not isinstance(affine, tuple | list) or len(affine) != 3:
        msg = f"affine must be (matrix, shift, center), got {affine!r}"
        raise ValueError(msg)
    affine = tuple(np.array(a, dtype=np.float64) for a in affine)
    affine_pixmap(np.zeros((1, 1, 2)), *affine)  # malformed: raise now
    return affine


class DrizzleResample:
    """Drizzle dithered exposures onto one frozen grid, with O(1) leave-one-out.

    Parameters
    ----------
    exposures : sequence of Exposure, str, os.PathLike or astropy.io.fits.HDUList
        The inputs (at least one). Paths and HDULists are read with
        :func:`~subpixal_jax.io.images.read_exposure`; `Exposure` objects are
        copied, so the caller's objects and arrays are never changed.
    output_wcs : astropy.wcs.WCS, optional
        The output grid. Its ``pixel_shape`` (or ``output_shape``) gives the
        size. If None, an undistorted TAN grid covering all inputs is built
        (footprints through each chip's full WCS), tangent at the centre of
        the inputs.
    output_shape : tuple of int, optional
        ``(ny, nx)`` for a user ``output_wcs`` that has no ``pixel_shape``.
    pixel_scale : float, optional
        Output pixel scale in arcsec (built grids only). Default: the first
        chip's scale.
    rotation : float, optional
        Orientation of the output y axis, degrees East of North (built grids
        only). The default 0 is north up, east left.
    kernel : str, optional
        Drizzle kernel: 'square' (default), 'point', 'turbo', 'gaussian',
        'lanczos2' or 'lanczos3'. The Lanczos kernels are replaced by
        'square' on a grid coarser than the inputs (`grid_kernel`); the
        kernel in use after `use_final_kernel` is ``final_kernel``.
    early_kernel : str, optional
        Kernel of the drizzles made before `use_final_kernel` is called
        (None, the default: always ``kernel``). The alignment loop calls it
        once its catalog and cosmic-ray passes are done and then drizzles
        every exposure again with ``kernel``, so the early iterations, which
        only bring the images within a fraction of a pixel, can use a
        faster kernel: 'turbo' (AstroDrizzle's default for its single
        drizzles) takes about a third of the time of 'square', and the
        final alignment is as accurate (``benchmarks/README.md``).
    pixfrac : float, optional
        Drizzle pixfrac, in (0, 1] (default 1).
    weight : {'exptime', 'ivm'}, optional
        Per-pixel weight: the exposure time, or the inverse variance of the
        rate from the ``ERR`` arrays (required then). Bad pixels weigh 0.
    sky : {'auto'}, None or sequence, optional
        'auto' (default): per chip, the sigma-clipped median of its valid
        pixels. None: no sky subtraction. Or one entry per exposure: a float
        (all chips) or a ``{extver: sky}`` dict, in native units.
    dq_bits : int or str, optional
        DQ bits to ignore when reading paths/HDULists (see
        :func:`~subpixal_jax.io.images.read_exposure`).
    sky_sigma : float, optional
        Clipping threshold of the 'auto' sky (default 3).
    cr_reject : bool, optional
        Reject cosmic rays (needs >= 3 exposures): drizzle each exposure
        separately, median them, blot the median back onto every chip
        (poly5), flag pixels with
        ``|data - model| > cr_sigma * noise + cr_scale * gradient``, grow the
        flags by 1 pixel, and drizzle again without them. **The flags are
        cleared from each chip's ``valid`` mask in** `exposures`, so later
        steps (cutouts) see them too. Noise comes from ``ERR`` if present,
        else from Poisson noise of the model (native units taken as electrons)
        plus ``read_noise``.
    cr_sigma : float, optional
        Detection threshold in noise sigmas (default 4).
    cr_scale : float, optional
        Tolerated misregistration in pixels times the model's gradient
        (default 1.2, as AstroDrizzle's ``driz_cr_scale``).
    read_noise : float, optional
        Read noise in electrons for the CR noise model without ``ERR``.
    max_output_pixels : int, optional
        Refuse to build a grid larger than this (default 4e8 pixels).
    max_cached_pixmap_bytes : int, optional
        Keep the chips' pixel maps between drizzles (and move them by the
        loop's affine corrections) only if all of them fit in this many
        bytes (16 per chip pixel; default `MAX_CACHED_PIXMAP_BYTES`, 512 MiB);
        otherwise each drizzle evaluates its chip's map from the WCS. 0 never
        caches.
    workers : int, optional
        Worker processes that drizzle exposures in parallel
        (:mod:`~subpixal_jax.reference.drizzle_workers`; drizzle's C code
        holds the GIL, so threads cannot). Default: the
        ``SUBPIXAL_JAX_DRIZZLE_WORKERS`` environment variable, else up to 4
        for exposures of at least 2**21 pixels (`drizzle_worker_count`);
        1 drizzles in this process. The products are the same either way.

    Attributes
    ----------
    exposures : list of Exposure
        The library's own copies of the inputs (CR flags in ``valid``).
    output_wcs : astropy.wcs.WCS
        Undistorted TAN WCS of the output, frozen.
    output_shape : tuple of int
        ``(ny, nx)``.
    sky : list of dict
        Per exposure ``{extver: sky}`` in native units.
    workers : int
        Processes that drizzle exposures at once (1: this one), from the
        ``workers`` parameter; falls to 1 if a worker dies.
    n_drizzles : int
        Number of single-chip drizzle (``add_image``) calls so far. WCS
        updates are drizzled on the first read after them (`update_wcs`), and
        an exposure is never drizzled again with the WCS and masks of the
        contribution it holds.
    kernel : str
        The kernel of the next drizzle: ``early_kernel`` until
        `use_final_kernel`, then ``final_kernel``.
    final_kernel : str
        ``kernel`` as it fits the grid (`grid_kernel`).
    config : DrizzleConfig
        The validated settings.

    Raises
    ------
    ValueError
        On bad parameters, unreadable inputs, exposures that do not overlap
        each other (or miss a user grid), or a grid that would be too large.

    Notes
    -----
    Output units are rate (native units per second, e.g. e-/s) per output
    pixel: each chip is sky-subtracted, divided by ``EXPTIME`` when in counts,
    and scaled by the output/input pixel-area ratio at the chip centre, so
    total flux is conserved. Uncovered pixels have sci 0 and wht 0.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.io import fits
    >>> from astropy.wcs import WCS
    >>> def exposure(crpix1):
    ...     w = WCS(naxis=2)
    ...     w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    ...     w.wcs.crval, w.wcs.crpix = [10.0, -20.0], [crpix1, 16.0]
    ...     w.wcs.cdelt = [-1e-5, 1e-5]
    ...     hdu = fits.PrimaryHDU(np.ones((32, 32), np.float32), w.to_header())
    ...     hdu.header["EXPTIME"], hdu.header["BUNIT"] = 10.0, "ELECTRONS"
    ...     return fits.HDUList([hdu])
    >>> r = DrizzleResample([exposure(16.0), exposure(20.0)], sky=None)
    >>> r.output_shape, r.n_drizzles
    ((35, 39), 2)
    >>> sci, wht = r.leave_one_out(0)
    >>> float(sci[17, 17]), r.n_drizzles
    (0.1, 2)
    """

    def __init__(  # noqa: PLR0913  # seed signature
        self,
        exposures: Sequence[Exposure | str | os.PathLike | fits.HDUList],
        *,
        output_wcs: WCS | None = None,
        output_shape: tuple[int, int] | None = None,
        pixel_scale: float | None = None,
        rotation: float = 0.0,
        kernel: str = "square",
        early_kernel: str | None = None,
        pixfrac: float = 1.0,
        weight: str = "exptime",
        sky: str | Sequence[float | Mapping[int, float]] | None = "auto",
        dq_bits: int | str | None = 0,
        sky_sigma: float = 3.0,
        cr_reject: bool = False,
        cr_sigma: float = 4.0,
        cr_scale: float = 1.2,
        read_noise: float = 0.0,
        max_output_pixels: int = 400_000_000,
        max_cached_pixmap_bytes: int = MAX_CACHED_PIXMAP_BYTES,
        workers: int | None = None,
    ):
        if isinstance(exposures, str | os.PathLike | fits.HDUList | Exposure):
            exposures = [exposures]
        exposures = list(exposures)
        if not exposures:
            msg = "exposures must contain at least one exposure, got none"
            raise ValueError(msg)
        config = DrizzleConfig(
            kernel=kernel,
            early_kernel=early_kernel,
            pixfrac=pixfrac,
            weight=weight,
            pixel_scale=pixel_scale,
            rotation=rotation,
            sky_sigma=sky_sigma,
            cr_reject=bool(cr_reject),
            cr_sigma=cr_sigma,
            cr_scale=cr_scale,
            read_noise=read_noise,
            max_output_pixels=max_output_pixels,
            max_cached_pixmap_bytes=max_cached_pixmap_bytes,
            workers=workers,
        )
        if cr_reject and len(exposures) < 3:
            msg = f"cr_reject needs at least 3 exposures, got {len(exposures)}"
            raise ValueError(msg)
        self._setup(
            [_as_exposure(e, dq_bits) for e in exposures],
            config,
            sky,
            (output_wcs, output_shape),
        )

    def _setup(self, exposures, config: DrizzleConfig, sky, user_grid) -> None:
        """Grid, sky, first drizzle and cosmic-ray pass of the own copies."""
        self.config = config
        self.pixfrac = config.pixfrac
        self.weight = config.weight
        self.cr_reject = config.cr_reject
        self.n_drizzles = 0
        self.exposures = exposures
        if config.weight == "ivm":
            for e in self.exposures:
                if any(c.err is None for c in e.chips):
                    msg = f"weight='ivm' needs ERR arrays; {e.name} has none"
                    raise ValueError(msg)
        self.sky = exposure_skies(self.exposures, sky, config.sky_sigma)
        self.workers = drizzle_worker_count(config.workers, self.exposures)

        borders = chip_borders(self.exposures)
        if user_grid[0] is None:
            self.output_wcs, self.output_shape = build_output_grid(
                self.exposures,
                pixel_scale=config.pixel_scale,
                rotation=config.rotation,
                max_output_pixels=config.max_output_pixels,
                borders=borders,
            )
        else:
            self.output_wcs, self.output_shape = user_output_grid(
                *user_grid, config.max_output_pixels
            )
        _check_overlap(self.exposures, borders, self.output_wcs, self.output_shape)
        _to_grid_frame(self.exposures, self.output_wcs)
        self.final_kernel = grid_kernel(config.kernel, self.output_wcs, self.exposures)
        self.kernel = config.early_kernel or self.final_kernel

        n = len(self.exposures)
        map_bytes = 16 * sum(c.data.size for e in self.exposures for c in e.chips)
        self._cache_pixmaps = map_bytes <= config.max_cached_pixmap_bytes
        if not self._cache_pixmaps:
            log.info(
                "chip pixel maps (%.2f GB) not cached (max_cached_pixmap_bytes "
                "%d): evaluated for every drizzle",
                map_bytes / 1e9,
                config.max_cached_pixmap_bytes,
            )
        # Per exposure, {extver: pixel map}: computed once, then moved by
        # affine corrections (update_wcs(affine=...)) or recomputed on a new WCS.
        self._pixmaps: list[dict[int, np.ndarray]] = [{} for _ in range(n)]
        # Per exposure, {extver: [(matrix, shift, center), ...]}: corrections
        # not yet applied to the cached map (applied on its first read).
        self._pending: list[dict[int, list[tuple]]] = [{} for _ in range(n)]
        self._stack = LeaveOneOutStack(n, self.output_shape)
        # DQ-only masks, so that cosmic-ray rejection can be redone from scratch
        # once the WCSs are better aligned.
        self._dq_valid = [[c.valid.copy() for c in e.chips] for e in self.exposures]
        # The exposures whose held contribution no longer matches their WCS or
        # masks: drizzled on the first read (`_sync`), so that an update nobody
        # reads (the last iteration's) and a mask change that restores the
        # masks a contribution was drizzled with cost no drizzle.
        self._stale = set(range(n))
        # Per exposure, whether its held contribution used the DQ-only masks.
        self._held_dq = [False] * n
        self._combined: tuple[np.ndarray, np.ndarray] | None = None
        self._sync()
        if config.cr_reject:
            self._reject_cosmic_rays()
            self._sync()
        self._stack.check([e.name for e in self.exposures])

    # ------------------------------------------------------------- drizzle
    def native_scale(self) -> float:
        """Return the finest chip pixel scale of the inputs (arcsec).

        See :func:`native_pixel_scale`.
        """
        return native_pixel_scale(self.exposures)

    def _pixmap_of(self, i: int, grid=None) -> Callable[[Chip], np.ndarray]:
        """Chip -> pixel map of exposure *i*: cached, or onto ``grid``."""
        if grid is None:
            return lambda c: self.pixmap(i, c.extver)
        return lambda c: chip_pixmap(c.wcs, grid[0], c.shape)

    def _drizzle_exposures(self, indices, grid=None) -> list[tuple]:
        """Drizzle exposures onto the output grid, or onto ``grid=(wcs, shape)``.

        Returns their ``(sci, wht)`` in the order of ``indices``; with
        `workers` > 1 they are drizzled in parallel by worker processes,
        each exposure's inputs prepared here while the others drizzle.
        """
        indices = list(indices)
        shape = self.output_shape if grid is None else grid[1]

        def inputs(i):
            e = self.exposures[i]
            self.n_drizzles += len(e.chips)
            return drizzle_inputs(
                e,
                self.sky[i],
                self._pixmap_of(i, grid),
                pixfrac=self.pixfrac,
                weight=self.weight,
            )

        if self.workers < 2 or len(indices) < 2:
            return [drizzle_chips(shape, self.kernel, inputs(i)) for i in indices]
        pool = shared_pool(self.workers)
        pending: list = []
        for i in indices:
            # At most `workers` exposures' inputs wait or drizzle at a time.
            if len(pending) > self.workers:
                concurrent.futures.wait([pending[-self.workers - 1]])
            pending.append(pool.submit(shape, self.kernel, inputs(i)))
        try:
            return [f.result() for f in pending]
        except WorkerError as exc:
            log.warning("%s; drizzling in this process from now on", exc)
            self.workers = 1
            self.n_drizzles -= sum(len(self.exposures[i].chips) for i in indices)
            return self._drizzle_exposures(indices, grid)

    def _sync(self) -> None:
        """Drizzle the stale exposures into the stack (see ``_stale``)."""
        stale = sorted(self._stale)
        for i, drizzled in zip(stale, self._drizzle_exposures(stale), strict=True):
            self._stack.set(i, *drizzled)
            self._held_dq[i] = all(
                np.array_equal(c.valid, dq)
                for c, dq in zip(
                    self.exposures[i].chips, self._dq_valid[i], strict=True
                )
            )
            self._combined = None
        self._stale.clear()

    def median_image(
        self, *, reject_high: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the per-pixel median of the single-exposure drizzles.

        Free of cosmic rays wherever at least 3 exposures cover a pixel, so
        it is the image to detect sources in (AstroDrizzle's median step).

        Parameters
        ----------
        reject_high : bool, optional
            Where at least 4 exposures cover, drop the highest value before
            taking the median: with an even number of values the median
            averages the middle two, so a cosmic ray hitting the same pixel
            in two exposures would survive. For detection, not for models
            (it biases the median low by a fraction of the noise).

        Returns
        -------
        median : numpy.ndarray
            ``(ny, nx)`` float32, rate units, 0 where fewer than 3 exposures
            cover.
        covered : numpy.ndarray
            ``(ny, nx)`` bool, True where at least 3 exposures cover.
        """
        self._sync()
        return median_combine(
            self._stack.singles, self.output_shape, reject_high=reject_high
        )

    def _reject_cosmic_rays(self) -> None:
        """Flag cosmic rays in the own chips' ``valid``; flagged exposures go stale."""
        config = self.config
        grid = cosmic_ray_grid(
            self.exposures, self.output_wcs, config.max_output_pixels
        )
        if grid is None:
            median, enough = self.median_image()
        else:
            log.info(
                "cosmic-ray rejection on a %d x %d grid at the inputs' scale",
                *grid[1][::-1],
            )
            singles = self._drizzle_exposures(range(len(self.exposures)), grid)
            median, enough = median_combine(singles, grid[1])
        total = 0
        for i, e in enumerate(self.exposures):
            masks = cosmic_ray_masks(
                e,
                self.sky[i],
                median,
                enough,
                self._pixmap_of(i, grid),
                cr_sigma=config.cr_sigma,
                cr_scale=config.cr_scale,
                read_noise=config.read_noise,
            )
            for c, bad in zip(e.chips, masks, strict=True):
                n_bad = int(bad.sum())
                if n_bad:
                    c.valid &= ~bad
                    self._stale.add(i)
                total += n_bad
                log.debug(
                    "%s[%d]: %d pixels flagged as cosmic rays", e.name, c.extver, n_bad
                )
        log.info("cosmic-ray rejection flagged %d pixels in all", total)

    # ---------------------------------------------------------------- API
    def reject_cosmic_rays(self) -> None:
        """Redo cosmic-ray rejection from the DQ masks with the current WCSs.

        Rejection compares every exposure with the median of the others, so
        it flags star cores when the exposures are misaligned by a pixel or
        more. The alignment loop therefore reruns it after the WCSs have been
        corrected. Needs at least 3 exposures.
        """
        if len(self.exposures) < 3:
            msg = "cosmic-ray rejection needs at least 3 exposures, "
            msg += f"got {len(self.exposures)}"
            raise ValueError(msg)
        for i, (e, masks) in enumerate(
            zip(self.exposures, self._dq_valid, strict=True)
        ):
            for c, mask in zip(e.chips, masks, strict=True):
                c.valid = mask.copy()
            if not self._held_dq[i]:
                self._stale.add(i)
        self._reject_cosmic_rays()

    def use_final_kernel(self) -> bool:
        """Drizzle with ``kernel`` from now on (see ``early_kernel``).

        The exposures drizzled with ``early_kernel`` are drizzled again on
        the next read of the combination. Calling it again does nothing.

        Returns
        -------
        bool
            True when the kernel changed, False when it was ``final_kernel``
            already.
        """
        if self.kernel == self.final_kernel:
            return False
        log.info(
            "drizzling with the %r kernel from now on (was %r)",
            self.final_kernel,
            self.kernel,
        )
        self.kernel = self.final_kernel
        self._stale.update(range(len(self.exposures)))
        return True

    def leave_out(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Return the combination without the exposures ``indices``.

        Parameters
        ----------
        indices : iterable of int
            Exposures to leave out (duplicates are ignored).

        Returns
        -------
        sci, wht : numpy.ndarray
            ``(ny, nx)`` float32 image (rate units, 0 where no remaining
            exposure covers) and weight of the remaining exposures.
        """
        return self.leave_out_reader(indices).full()

    def leave_out_reader(self, indices) -> LeaveOutReader:
        """Return the combination without ``indices``, computed only where read.

        Equal, region by region and bit for bit, to the same region of
        `leave_out`, without the two full-frame arrays: the alignment loop
        reads only the reference boxes of the cutouts.

        Parameters
        ----------
        indices : iterable of int
            Exposures to leave out (duplicates are ignored).

        Returns
        -------
        LeaveOutReader
            ``read(region)`` gives ``(sci, wht)`` of a region; valid until
            the combination next changes (a WCS update or cosmic-ray
            rejection, once read), then it raises RuntimeError.
        """
        indices = {self._check_index(i) for i in indices}
        self._sync()
        return self._stack.reader(indices)

    def _combination(self) -> tuple[np.ndarray, np.ndarray]:
        self._sync()
        if self._combined is None:
            self._combined = self._stack.combined()
        return self._combined

    @property
    def sci(self) -> np.ndarray:
        """Combined image ``(ny, nx)`` float32, rate units, 0 where uncovered.

        Read-only view of the resampler's state.
        """
        return self._combination()[0]

    @property
    def wht(self) -> np.ndarray:
        """Combined weight ``(ny, nx)`` float32, 0 where uncovered (read-only)."""
        return self._combination()[1]

    def _check_index(self, i) -> int:
        n = len(self.exposures)
        if not isinstance(i, int | np.integer) or not (-n <= i < n):
            msg = f"i must be an exposure index in [0, {n}), got {i!r}"
            raise ValueError(msg)
        return int(i) % n

    def contribution(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Return exposure *i*'s own drizzled ``(sci, wht)`` (copies).

        Parameters
        ----------
        i : int
            Exposure index.

        Returns
        -------
        sci, wht : numpy.ndarray
            ``(ny, nx)`` float32: the exposure alone on the output grid.
        """
        i = self._check_index(i)
        self._sync()
        img, wht = self._stack.contribution(i)
        return img.copy(), wht.copy()

    def leave_one_out(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the reference without exposure *i*, ``(S - s_i) / (W - w_i)``.

        Parameters
        ----------
        i : int
            Index of the exposure to leave out.

        Returns
        -------
        sci, wht : numpy.ndarray
            ``(ny, nx)`` float32 image (rate units, 0 where no other exposure
            covers) and weight of all the other exposures.
        """
        return self.leave_out([i])

    def pixmap(self, i: int, extver: int) -> np.ndarray:
        """Return the pixel map of chip ``extver`` of exposure *i*.

        Cached when the maps of all chips fit in ``max_cached_pixmap_bytes``.

        Parameters
        ----------
        i : int
            Exposure index.
        extver : int
            The chip's ``EXTVER``.

        Returns
        -------
        numpy.ndarray
            ``(ny, nx, 2)`` float64 output ``x, y`` of every chip pixel (see
            :func:`chip_pixmap`); the resampler's own array, read-only.
        """
        i = self._check_index(i)
        maps = self._pixmaps[i]
        if extver not in maps:
            chip = next(
                (c for c in self.exposures[i].chips if c.extver == extver), None
            )
            if chip is None:
                msg = f"exposure {self.exposures[i].name} has no extver {extver!r}"
                raise ValueError(msg)
            pm = chip_pixmap(chip.wcs, self.output_wcs, chip.shape)
            pm.flags.writeable = False
            if not self._cache_pixmaps:
                return pm
            maps[extver] = pm
        for correction in self._pending[i].pop(extver, ()):
            moved = affine_pixmap(maps[extver], *correction)
            moved.flags.writeable = False
            maps[extver] = moved
        return maps[extver]

    def update_wcs(
        self,
        i: int,
        wcs: Mapping[int, WCS],
        *,
        affine: tuple | None = None,
    ) -> None:
        """Give exposure *i*'s chips new WCSs; exposure *i* alone is re-drizzled.

        The drizzle waits for the first read of the combination (``sci``,
        ``wht``, `leave_out`, `contribution`, `median_image`, cosmic-ray
        rejection), so an update that nothing reads afterwards, such as the
        last iteration's, costs no drizzle (`n_drizzles` counts the ones done).

        Parameters
        ----------
        i : int
            Exposure index.
        wcs : mapping of int to astropy.wcs.WCS
            New WCS per ``extver`` (chips not listed keep theirs). Copied.
        affine : tuple of (matrix, shift, center), optional
            The correction that turned the chips' current WCSs into ``wcs``,
            as passed to :func:`subpixal_jax.io.wcs.correct_wcs` with ``wcslin``
            equal to this resampler's ``output_wcs`` (``center`` 0-based,
            required). The listed chips' pixel maps are then moved by
            :func:`affine_pixmap` (on their first read) instead of being
            evaluated from ``wcs``: about 0.1 s instead of 1 s for a
            4096x2048 chip, and the exact composite of the correction, which
            ``wcs`` matches to < 1e-6 px.

        Raises
        ------
        ValueError
            If *i* is out of range, an extver is unknown, a WCS is not
            celestial, or ``affine`` is malformed.
        """
        i = self._check_index(i)
        e = self.exposures[i]
        _check_chip_wcs(e, wcs)
        affine = _checked_affine(affine)
        if not self._cache_pixmaps:
            affine = None  # no map to move: evaluated from the new WCS
        if affine is not None:
            for k in wcs:
                if k not in self._pixmaps[i]:
                    self.pixmap(i, k)  # the map of the current WCS, to be moved
        for c in e.chips:
            if c.extver in wcs:
                c.wcs = copy.deepcopy(wcs[c.extver])
                c.wcs.pixel_shape = c.shape[::-1]
                if affine is None:
                    self._pixmaps[i].pop(c.extver, None)
                    self._pending[i].pop(c.extver, None)
                else:
                    self._pending[i].setdefault(c.extver, []).append(affine)
        self._stale.add(i)

"""Source catalogs with segmentation, and the subpixal filter language.

The alignment loop (docs/original.md §1.2) detects sources on the full drizzled image
and
uses, for every selected source, its position, a weight and its segment.
:class:`PhotutilsCatalog` replaces the original's SExtractor subprocess with
photutils (background, convolution, detection with deblending, moments);
:class:`UserCatalog` wraps a table the user already has. Both share the
filtering of docs/original.md §8.1, with one deliberate change (docs/original.md §9):
a filter on a
column that does not exist raises `ValueError` instead of being ignored.

Columns of `catalog` (subpixal names, 0-based pixel positions):

=================  ========================================================
``id``             segment label; the same value marks the source's pixels
                   in `segmentation`
``x``, ``y``       centroid (0-based, x = column)
``flux``           isophotal flux (sum over the segment, background removed)
``fluxerr``        its error
``fwhm``           FWHM from the second moments, pixels
``semimajor_sigma``, ``semiminor_sigma``  1-sigma moment axes, pixels
``ellipticity``    1 − b/a
``segment_area``   segment area, pixels
``pos_std``        ``fwhm / (2.3548 · flux/fluxerr)``
``weight``         ``1 / pos_std²``
=================  ========================================================
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import operator
import warnings
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from astropy.stats import SigmaClip, gaussian_sigma_to_fwhm, sigma_clipped_stats
from astropy.table import Table
from photutils.background import Background2D, MedianBackground
from photutils.segmentation import (
    SourceCatalog,
    deblend_sources,
    detect_sources,
    make_2dgaussian_kernel,
)
from photutils.utils import NoDetectionsWarning, calc_total_error
from scipy import ndimage

__all__ = [
    "DEFAULT_FILTERS",
    "ImageCatalog",
    "PhotutilsCatalog",
    "UserCatalog",
]

log = logging.getLogger(__name__)

_COMPARE = {
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
}
_RANK = ("h", "l")
#: Filters applied unless told otherwise: ``flux > 0`` and ``fwhm > 0``.
DEFAULT_FILTERS = (("flux", ">", 0), ("fwhm", ">", 0))
_COLUMNS = (
    "id",
    "x",
    "y",
    "flux",
    "fluxerr",
    "fwhm",
    "semimajor_sigma",
    "semiminor_sigma",
    "ellipticity",
    "segment_area",
    "pos_std",
    "weight",
)


@runtime_checkable
class ImageCatalog(Protocol):
    """What the alignment loop needs from a source catalog.

    ``set_image`` gives the image to measure; ``catalog`` is the filtered
    table (columns ``id``, ``x``, ``y``, ``weight``, ...); ``segmentation`` is a
    2-D int array, 0 = background, whose labels match the ``id`` column (the
    catalogs here return one read-only array, not a copy per access).
    """

    def set_image(self, data, *, mask=None, error=None) -> None:
        """Set the image (and pixel mask, error) to detect sources in."""
        ...

    @property
    def catalog(self) -> Table:
        """The filtered catalog."""
        ...

    @property
    def segmentation(self) -> np.ndarray:
        """The segmentation image, labels = ``id``."""
        ...


def _check_filter(f) -> tuple[str, str, object]:
    if not isinstance(f, Sequence) or isinstance(f, str) or len(f) != 3:
        msg = f"filters must be (column, op, value) triples, got {f!r}"
        raise ValueError(msg)
    col, op, value = f
    if not isinstance(col, str) or not col:
        msg = f"filter column must be a non-empty string, got {col!r} in {f!r}"
        raise ValueError(msg)
    if op in _RANK:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            msg = f"filter {f!r}: 'h'/'l' need an integer count, got {value!r}"
            raise ValueError(msg)
        return col, op, int(value)
    if op not in _COMPARE:
        msg = f"filter {f!r}: op must be one of {(*_COMPARE, *_RANK)}, got {op!r}"
        raise ValueError(msg)
    return col, op, value


def _dedupe(filters) -> list[tuple[str, str, object]]:
    """Validate; keep the last filter for each (column, op), in first order."""
    out: dict[tuple[str, str], tuple[str, str, object]] = {}
    for f in filters:
        col, op, value = _check_filter(f)
        out[col, op] = (col, op, value)
    return list(out.values())


def _round_half_away(v: np.ndarray) -> np.ndarray:
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64)


def _add_weights(table: Table) -> None:
    """Add ``pos_std`` and ``weight`` in place where possible (original.md §8.1)."""
    if not {"fwhm", "flux", "fluxerr"} <= set(table.colnames):
        return
    fwhm = np.asarray(table["fwhm"], dtype=np.float64)
    flux = np.asarray(table["flux"], dtype=np.float64)
    err = np.asarray(table["fluxerr"], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pos_std = fwhm / (gaussian_sigma_to_fwhm * flux / err)
        weight = 1.0 / pos_std**2
    table["pos_std"] = pos_std
    table["weight"] = weight


def _multi_peaked_labels(smoothed: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Labels of the segments with more than one local maximum of ``smoothed``.

    Multi-threshold deblending can split a segment only where it has a
    saddle, i.e. two or more local maxima: every component above a level
    holds at least one (its brightest pixel). Deblending only these segments
    gives the same segmentation as deblending all of them, at a fraction of
    the cost (most segments of a field are single stars). Neighbours outside
    the segment do not count (set to -inf), and plateaus count once per
    pixel, so the test can only over-select.
    """
    inside = labels > 0
    values = np.where(inside, smoothed, -np.inf)
    peaks = inside & (values >= ndimage.maximum_filter(values, size=3))
    counts = np.bincount(labels[peaks], minlength=int(labels.max()) + 1)
    return np.flatnonzero(counts >= 2)


def _read_only(array: np.ndarray) -> np.ndarray:
    """``array``, made read-only: a segmentation is shared, never copied."""
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=8)
def _zoom_matrix(n_mesh: int, box: int, n_out: int) -> np.ndarray:
    """``(n_out, n_mesh)`` matrix of photutils' mesh-to-image zoom along one axis.

    `Background2D` resizes its mesh with `scipy.ndimage.zoom` (cubic spline,
    ``grid_mode=True``, ``mode='reflect'``, factor ``box``) and crops to the
    image. That zoom is linear and separable (a spline prefilter and a
    spline evaluation along each axis), so its 2-D map is
    ``Ay @ mesh @ Ax.T`` with, as columns of each matrix, the 1-D zooms of
    the unit vectors.
    """
    columns = [
        ndimage.zoom(unit, box, order=3, mode="reflect", grid_mode=True)[:n_out]
        for unit in np.eye(n_mesh)
    ]
    # Kept (read-only) for the background, threshold and error maps of one
    # detection: ~24 ms per matrix at 4200 px, six of them otherwise.
    return _read_only(np.stack(columns, axis=1))


def _mesh_image(mesh: np.ndarray, box_size, shape, *, scale: float = 1.0):
    """Full-size float32 map of a `Background2D` mesh, times ``scale``.

    The same map as ``Background2D.background`` (or ``background_rms``):
    the zoom of `_zoom_matrix` along both axes, clipped to the mesh's range;
    computed as ``Ay @ mesh @ Ax.T``, two matrix products instead of a
    16-tap spline per pixel (0.1 s instead of 1.2 s for a 4200² map; float64
    factors give photutils' map to 1e-12, the float32 product to 1e-6 of
    the level).

    Parameters
    ----------
    mesh : numpy.ndarray
        ``(my, mx)`` low-resolution map (no NaN: photutils fills excluded
        boxes).
    box_size : pair of int
        Box size ``(by, bx)`` the mesh was measured with.
    shape : pair of int
        ``(ny, nx)`` of the image.
    scale : float, optional
        Factor applied to the mesh first (e.g. the detection threshold in
        RMS units), so that no scaled full-size copy is needed.

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` float32 map.
    """
    mesh = scale * np.asarray(mesh, dtype=np.float64)
    low, high = float(mesh.min()), float(mesh.max())
    if low == high:
        return np.full(shape, low, dtype=np.float32)
    ay = _zoom_matrix(mesh.shape[0], int(box_size[0]), shape[0])
    ax = _zoom_matrix(mesh.shape[1], int(box_size[1]), shape[1])
    out = (ay @ mesh).astype(np.float32) @ ax.T.astype(np.float32)
    return np.clip(out, low, high, out=out)


@dataclasses.dataclass(frozen=True)
class _BackgroundMesh:
    """Low-resolution background and RMS of an image, and their box size."""

    background: np.ndarray
    rms: np.ndarray
    box_size: tuple[int, int]

    def image(self, shape) -> np.ndarray:
        """Return the full-size float32 background map."""
        return _mesh_image(self.background, self.box_size, shape)

    def rms_image(self, shape, *, scale: float = 1.0) -> np.ndarray:
        """Return the full-size float32 RMS map, times ``scale``."""
        return _mesh_image(self.rms, self.box_size, shape, scale=scale)


class _Filtered:
    """Filter and source-mask logic shared by the catalogs (docs/original.md §8.1)."""

    def __init__(self, *, filters, mask):
        self._filters = _dedupe(filters)
        self._mask = None
        self.set_mask(mask)

    @property
    def filters(self) -> list[tuple[str, str, object]]:
        """The current filters, as ``(column, op, value)`` triples."""
        return list(self._filters)

    def set_filters(self, filters: Iterable) -> None:
        """Replace all filters (for a repeated (column, op), the last wins).

        Parameters
        ----------
        filters : iterable of tuple
            ``(column, op, value)``: op one of ``>``, ``>=``, ``==``, ``!=``,
            ``<``, ``<=``, or ``'h'``/``'l'`` with an integer n (keep the n
            highest/lowest; negative n flips the sense).
        """
        self._filters = _dedupe(filters)

    def append_filters(self, filters: Iterable) -> None:
        """Add filters, replacing any existing filter with the same (column, op).

        Parameters
        ----------
        filters : iterable of tuple
            ``(column, op, value)`` triples, as in `set_filters`.
        """
        self._filters = _dedupe([*self._filters, *filters])

    def remove_filters(self, filters: Iterable) -> None:
        """Remove filters matching ``(column, op)`` (a value is ignored).

        Parameters
        ----------
        filters : iterable of tuple
            ``(column, op)`` or ``(column, op, value)``.

        Raises
        ------
        ValueError
            If a filter to remove is not set.
        """
        keys = {(f[0], f[1]) for f in self._filters}
        for f in filters:
            if not isinstance(f, Sequence) or isinstance(f, str) or len(f) < 2:
                msg = f"filters to remove must be (column, op[, value]), got {f!r}"
                raise ValueError(msg)
            if (f[0], f[1]) not in keys:
                msg = f"no filter {(f[0], f[1])!r} to remove; set: {self._filters}"
                raise ValueError(msg)
            keys.discard((f[0], f[1]))
        self._filters = [f for f in self._filters if (f[0], f[1]) in keys]

    def set_mask(self, mask) -> None:
        """Set the source mask (sources, not pixels).

        Parameters
        ----------
        mask : None, 2-D bool array or (N, 2) array
            A boolean image, True = bad: a source is kept only if its rounded
            position lies inside the image on a False pixel. Or a list of
            0-based ``(x, y)`` pixel coordinates: sources whose rounded
            position is listed are dropped. None keeps every source.
        """
        if mask is None:
            self._mask = None
            return
        arr = np.asarray(mask)
        if arr.dtype == bool and arr.ndim == 2:
            self._mask = ("image", arr.copy())
            return
        if arr.ndim == 2 and arr.shape[1] == 2 and np.issubdtype(arr.dtype, np.number):
            self._mask = ("coords", {tuple(p) for p in _round_half_away(arr)})
            return
        msg = "mask must be a 2-D bool image or an (N, 2) list of (x, y), "
        msg += f"got an array of dtype {arr.dtype} and shape {arr.shape}"
        raise ValueError(msg)

    def _apply_filters(self, table: Table) -> Table:
        cols = set(table.colnames)
        for col, op, _ in self._filters:
            if col not in cols:
                msg = f"filter ({col!r}, {op!r}) names an unknown column {col!r}; "
                msg += f"columns: {table.colnames}"
                raise ValueError(msg)
        keep = np.ones(len(table), dtype=bool)
        for name in table.colnames:
            col = np.asarray(table[name])
            if np.issubdtype(col.dtype, np.floating):
                keep &= np.isfinite(col)
        table = table[keep]
        xi = _round_half_away(np.asarray(table["x"], dtype=np.float64))
        yi = _round_half_away(np.asarray(table["y"], dtype=np.float64))
        keep = np.ones(len(table), dtype=bool)
        if self._mask is not None:
            kind, m = self._mask
            if kind == "image":
                ny, nx = m.shape
                inside = (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny)
                keep &= inside
                keep[inside] &= ~m[yi[inside], xi[inside]]
            else:
                keep &= np.array(
                    [(a, b) not in m for a, b in zip(xi, yi, strict=True)], dtype=bool
                )
        for col, op, value in self._filters:
            if op in _COMPARE:
                keep &= _COMPARE[op](np.asarray(table[col]), value)
        table = table[keep]
        rank = np.ones(len(table), dtype=bool)
        for col, op, n in self._filters:
            if op not in _RANK:
                continue
            highest = (op == "h") == (n > 0)
            order = np.argsort(np.asarray(table[col]), kind="stable")
            if highest:
                order = order[::-1]
            sel = np.zeros(len(table), dtype=bool)
            sel[order[: abs(n)]] = True
            rank &= sel
        return table[rank]


class PhotutilsCatalog(_Filtered):
    """Detect and measure sources with photutils; filter them as subpixal does.

    Steps, on `set_image`: a 2-D background and RMS (`Background2D`, median
    estimator, 3-sigma clipping; when too many boxes are masked, as in a
    crowded field, ``exclude_percentile`` is relaxed to 90, and as a last
    resort a global sigma-clipped median is used), a Gaussian smoothing
    kernel, detection of ``n_pixels`` connected pixels above
    ``threshold_sigma`` times the RMS on the smoothed image with deblending
    (`SourceFinder`), and measurement (`SourceCatalog`) on the
    background-subtracted image.

    Parameters
    ----------
    threshold_sigma : float, optional
        Detection threshold in units of the background RMS (default 3).
    n_pixels : int, optional
        Minimum number of connected pixels above threshold (default 5).
    deblend : bool, optional
        Deblend overlapping sources (default True).
    n_levels, contrast : int, float, optional
        Deblending levels and contrast (photutils defaults 32, 0.001).
    kernel_fwhm : float, optional
        FWHM in pixels of the Gaussian smoothing kernel (default 2.5); 0 or
        None disables smoothing.
    box_size : int, optional
        Background box size in pixels (default 64; reduced for small images).
    filter_size : int, optional
        Median filter size in boxes for the background map (default 3).
    centroid : {'moment', 'win'}, optional
        Source position: first moments over the segment ('moment')
        or a Gaussian-windowed centroid ('win', default; like SExtractor's
        XWIN, about 1.5x more precise on faint point sources).
    effective_gain : float, optional
        If given and no ``error`` is passed to `set_image`, the error includes
        Poisson noise: ``calc_total_error(data, rms, effective_gain)``.
        Otherwise the error is the background RMS.
    filters : iterable of tuple, optional
        Initial filters (default `DEFAULT_FILTERS`), see `set_filters`.
    mask : optional
        Source mask, see `set_mask`.

    Examples
    --------
    >>> import numpy as np
    >>> y, x = np.mgrid[:64, :64]
    >>> rng = np.random.default_rng(0)
    >>> img = rng.normal(0.0, 1.0, (64, 64))
    >>> for x0, y0 in [(20.3, 30.7), (45.1, 12.4)]:
    ...     img += 500 * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / 2.0)
    >>> cat = PhotutilsCatalog()
    >>> cat.set_image(img)
    >>> t = cat.catalog
    >>> len(t), [round(float(v), 1) for v in t["x"]]
    (2, [45.1, 20.3])
    >>> int(cat.segmentation[31, 20]) in t["id"]
    True
    """

    def __init__(  # noqa: PLR0913  # seed signature
        self,
        *,
        threshold_sigma: float = 3.0,
        n_pixels: int = 5,
        deblend: bool = True,
        n_levels: int = 32,
        contrast: float = 0.001,
        kernel_fwhm: float | None = 2.5,
        box_size: int = 64,
        filter_size: int = 3,
        centroid: str = "win",
        effective_gain: float | None = None,
        filters: Iterable = DEFAULT_FILTERS,
        mask=None,
    ):
        if not (np.isfinite(threshold_sigma) and threshold_sigma > 0):
            msg = f"threshold_sigma must be positive, got {threshold_sigma!r}"
            raise ValueError(msg)
        for pname, val, low in (
            ("n_pixels", n_pixels, 1),
            ("n_levels", n_levels, 1),
            ("box_size", box_size, 4),
            ("filter_size", filter_size, 1),
        ):
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                msg = f"{pname} must be an integer >= {low}, got {val!r}"
                raise ValueError(msg)
        if not (0 <= contrast <= 1):
            msg = f"contrast must be in [0, 1], got {contrast!r}"
            raise ValueError(msg)
        if kernel_fwhm is not None and not (
            np.isfinite(kernel_fwhm) and kernel_fwhm >= 0
        ):
            msg = f"kernel_fwhm must be >= 0 or None, got {kernel_fwhm!r}"
            raise ValueError(msg)
        if centroid not in ("moment", "win"):
            msg = f"centroid must be 'moment' or 'win', got {centroid!r}"
            raise ValueError(msg)
        if effective_gain is not None and not (
            np.isfinite(effective_gain) and effective_gain > 0
        ):
            msg = f"effective_gain must be positive or None, got {effective_gain!r}"
            raise ValueError(msg)
        super().__init__(filters=filters, mask=mask)
        self.threshold_sigma = float(threshold_sigma)
        self.n_pixels = n_pixels
        self.deblend = bool(deblend)
        self.n_levels = n_levels
        self.contrast = float(contrast)
        self.kernel_fwhm = kernel_fwhm
        self.box_size = box_size
        self.filter_size = filter_size
        self.centroid = centroid
        self.effective_gain = effective_gain
        self._image = None
        self._raw: Table | None = None
        self._segm: np.ndarray | None = None

    def set_image(self, data, *, mask=None, error=None) -> None:
        """Set the image to detect sources in (detection runs on first use).

        Parameters
        ----------
        data : array_like
            2-D image. Copied, as float32 (a drizzled image is float32
            already; detection and measurement run in float32, half the
            memory of float64). Non-finite pixels are masked (with a logged
            warning).
        mask : array_like of bool, optional
            Pixel mask, True = bad (e.g. ``wht == 0`` of a drizzled image).
        error : array_like, optional
            Total 1-sigma error per pixel (copied as float32); see
            ``effective_gain`` otherwise.

        Raises
        ------
        ValueError
            If ``data`` is not a non-empty 2-D array, if ``mask``/``error`` do
            not match its shape, or if no pixel is usable.
        """
        data = np.array(data, dtype=np.float32)
        if data.ndim != 2 or data.size == 0:
            msg = f"data must be a non-empty 2-D image, got shape {data.shape}"
            raise ValueError(msg)
        bad = ~np.isfinite(data)
        if bad.any():
            log.warning("set_image: masking %d non-finite pixels", int(bad.sum()))
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != data.shape:
                msg = f"mask shape {mask.shape} differs from data shape {data.shape}"
                raise ValueError(msg)
            bad |= mask
        if error is not None:
            error = np.array(error, dtype=np.float32)
            if error.shape != data.shape:
                msg = f"error shape {error.shape} differs from data shape {data.shape}"
                raise ValueError(msg)
            bad |= ~np.isfinite(error)
        if bad.all():
            msg = "set_image: every pixel of the image is masked or non-finite"
            raise ValueError(msg)
        data[bad] = 0.0
        if error is not None:
            error[bad] = 0.0
        self._image = (data, bad, error)
        self._raw = None
        self._segm = None

    def _background(self, data, bad) -> _BackgroundMesh | None:
        """Background and RMS meshes of ``data``; None if the RMS is 0 everywhere.

        Boxes whose RMS is not positive (constant data) take the median RMS
        of the others, so that every threshold is above the background.
        """
        box = min(self.box_size, *data.shape)
        for excl in (10.0, 90.0):
            try:
                bkg = Background2D(
                    data,
                    box,
                    mask=bad,
                    filter_size=self.filter_size,
                    sigma_clip=SigmaClip(sigma=3.0, maxiters=10),
                    bkg_estimator=MedianBackground(),
                    exclude_percentile=excl,
                )
            except ValueError as exc:
                log.info("Background2D(exclude_percentile=%g) failed: %s", excl, exc)
                continue
            mesh, rms = bkg.background_mesh, bkg.background_rms_mesh
            break
        else:
            log.warning("Background2D failed; using a global sigma-clipped background")
            _, med, std = sigma_clipped_stats(data, mask=bad, sigma=3.0, maxiters=10)
            mesh, rms = np.full((1, 1), med), np.full((1, 1), std)
        ok = np.isfinite(rms) & (rms > 0)
        if not ok.any():
            return None
        rms = np.where(ok, rms, np.median(rms[ok]))
        return _BackgroundMesh(mesh, rms, (box, box))

    def smoothed(self, image: np.ndarray) -> np.ndarray:
        """Return ``image`` convolved with the detection kernel (``kernel_fwhm``).

        Parameters
        ----------
        image : numpy.ndarray
            Background-subtracted 2-D image.

        Returns
        -------
        numpy.ndarray
            The image detection and deblending run on, of ``image``'s dtype
            (``image`` itself when ``kernel_fwhm`` is 0 or None).

        Notes
        -----
        photutils' circular Gaussian kernel is the outer product of its
        marginal, so the 2-D convolution is two 1-D passes (2·9 instead of
        9² taps at the default FWHM); the intermediate is float64, so the
        result is the 2-D convolution's up to float64 rounding before the
        one rounding to ``image``'s dtype.
        """
        if not self.kernel_fwhm:
            return image
        size = 2 * math.ceil(1.5 * self.kernel_fwhm) + 1
        marginal = make_2dgaussian_kernel(self.kernel_fwhm, size=size).array.sum(0)
        rows = ndimage.convolve1d(
            image, marginal, axis=0, mode="constant", output=np.float64
        )
        return ndimage.convolve1d(
            rows, marginal, axis=1, mode="constant", output=image.dtype
        )

    def _detect(self):
        """Detect and measure; return the table and the int32 segmentation.

        Full-size float32 arrays are made one at a time and freed as soon as
        nothing needs them: the image is background-subtracted in place, the
        threshold map exists only during detection, and the RMS map is made
        for the measurement after it.
        """
        if self._image is None:
            msg = "no image set: call set_image() first"
            raise ValueError(msg)
        sub, bad, error = self._image
        self._image = None  # ``sub`` becomes the background-subtracted image
        mesh = self._background(sub, bad)
        if mesh is None:
            log.warning("background RMS is zero everywhere: no source detected")
            return self._empty(sub.shape)
        sub -= mesh.image(sub.shape)
        sub[bad] = 0.0
        conv = self.smoothed(sub)
        threshold = mesh.rms_image(sub.shape, scale=self.threshold_sigma)
        with warnings.catch_warnings():
            # reported below through logging, with the threshold used
            warnings.simplefilter("ignore", NoDetectionsWarning)
            segm = detect_sources(conv, threshold, self.n_pixels, mask=bad)
        del threshold
        if segm is None:
            log.warning("no source detected above %g sigma", self.threshold_sigma)
            return self._empty(sub.shape)
        if self.deblend:
            segm = self._deblend(conv, segm)
        if error is None:
            error = mesh.rms_image(sub.shape)
            if self.effective_gain is not None:
                error = calc_total_error(np.maximum(sub, 0), error, self.effective_gain)
        cat = SourceCatalog(
            sub, segm, convolved_data=conv, error=error, mask=bad, progress_bar=False
        )
        if self.centroid == "win":
            x, y = cat.x_centroid_win, cat.y_centroid_win
        else:
            x, y = cat.x_centroid, cat.y_centroid
        table = Table()
        table["id"] = np.asarray(cat.labels, dtype=np.int64)
        table["x"] = np.asarray(x, dtype=np.float64)
        table["y"] = np.asarray(y, dtype=np.float64)
        table["flux"] = np.asarray(cat.segment_flux, dtype=np.float64)
        table["fluxerr"] = np.asarray(cat.segment_flux_err, dtype=np.float64)
        for name, attr in (
            ("fwhm", "fwhm"),
            ("semimajor_sigma", "semimajor_axis"),
            ("semiminor_sigma", "semiminor_axis"),
            ("ellipticity", "ellipticity"),
            ("segment_area", "segment_area"),
        ):
            table[name] = np.asarray(getattr(cat, attr).value, dtype=np.float64)
        _add_weights(table)
        log.info("detected %d sources", len(table))
        return table, np.asarray(segm.data, dtype=np.int32)

    def _deblend(self, smoothed, segm):
        candidates = _multi_peaked_labels(smoothed, segm.data)
        if candidates.size == 0:
            return segm
        return deblend_sources(
            smoothed,
            segm,
            self.n_pixels,
            labels=candidates,
            n_levels=self.n_levels,
            contrast=self.contrast,
            progress_bar=False,
        )

    @staticmethod
    def _empty(shape):
        table = Table(
            [np.zeros(0, np.int64)] + [np.zeros(0) for _ in _COLUMNS[1:]],
            names=_COLUMNS,
        )
        return table, np.zeros(shape, dtype=np.int32)

    def _ensure(self):
        if self._raw is None:
            # _detect drops the image (nothing reads it again until the next
            # set_image): on an ACS-size reference it is ~90 MB of pixels and
            # masks, and the background is subtracted from it in place.
            self._raw, segm = self._detect()
            self._segm = _read_only(segm)

    @property
    def raw_catalog(self) -> Table:
        """All detections with every column, before masks and filters (copy)."""
        self._ensure()
        return self._raw.copy()

    @property
    def catalog(self) -> Table:
        """The filtered catalog (a new table on each access).

        Raises
        ------
        ValueError
            If no image is set or a filter names an unknown column.
        """
        self._ensure()
        for col, op, _ in self._filters:
            if col not in _COLUMNS:
                msg = f"filter ({col!r}, {op!r}) names an unknown column {col!r}; "
                msg += f"columns: {list(_COLUMNS)}"
                raise ValueError(msg)
        out = self._apply_filters(self._raw)
        if len(out) == 0 and len(self._raw) > 0:
            log.warning(
                "all %d detections were removed by masks/filters", len(self._raw)
            )
        return out

    @property
    def segmentation(self) -> np.ndarray:
        """``(ny, nx)`` int32 segmentation of **all** detections (read-only).

        Labels equal the ``id`` column; sources removed by the filters keep
        their segments, so cutouts can still mask their neighbours. The
        array is shared, not copied (~70 MB at ACS size): copy it to edit.
        """
        self._ensure()
        return self._segm


class UserCatalog(_Filtered):
    """A catalog the user supplies, filtered like the detected ones.

    Parameters
    ----------
    table : astropy.table.Table
        Must have ``id``, ``x`` and ``y`` (0-based pixels). If it has ``flux``,
        ``fluxerr`` and ``fwhm``, ``pos_std`` and ``weight`` are derived
        (existing ones are kept).
    segmentation : array_like of int, optional
        Segmentation whose labels match ``id``; None gives an all-zero map
        (needs `set_image` to know its shape).
    filters : iterable of tuple, optional
        Initial filters (default none).
    mask : optional
        Source mask, see `set_mask`.

    Examples
    --------
    >>> from astropy.table import Table
    >>> t = Table({"id": [1, 2, 3], "x": [1.0, 5.0, 9.0], "y": [2.0, 4.0, 6.0],
    ...            "flux": [10.0, 30.0, 20.0]})
    >>> cat = UserCatalog(t, filters=[("flux", "h", 2)])
    >>> cat.catalog["id"].tolist()
    [2, 3]
    """

    def __init__(self, table: Table, segmentation=None, *, filters=(), mask=None):
        if not isinstance(table, Table):
            msg = f"table must be an astropy Table, got {type(table).__name__}"
            raise ValueError(msg)
        missing = {"id", "x", "y"} - set(table.colnames)
        if missing:
            msg = f"table lacks required column(s) {sorted(missing)}; "
            msg += f"has {table.colnames}"
            raise ValueError(msg)
        super().__init__(filters=filters, mask=mask)
        self._table = table.copy()
        if "weight" not in table.colnames:
            _add_weights(self._table)
        self._segm = None
        if segmentation is not None:
            seg = np.asarray(segmentation)
            if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
                msg = f"segmentation must be a 2-D int array, got {seg.dtype} "
                msg += f"of shape {seg.shape}"
                raise ValueError(msg)
            self._segm = _read_only(seg.astype(np.int32))

    def set_image(self, data, *, mask=None, error=None) -> None:
        """Record the image shape (the catalog itself is fixed).

        Parameters
        ----------
        data : array_like
            The image the catalog refers to; only its shape is used.
        mask, error : optional
            Ignored (accepted for the `ImageCatalog` protocol).

        Raises
        ------
        ValueError
            If the shape differs from the segmentation's.
        """
        shape = np.shape(data)
        if len(shape) != 2:
            msg = f"data must be a 2-D image, got shape {shape}"
            raise ValueError(msg)
        if self._segm is None:
            self._segm = _read_only(np.zeros(shape, dtype=np.int32))
        elif self._segm.shape != shape:
            msg = f"data shape {shape} differs from segmentation {self._segm.shape}"
            raise ValueError(msg)

    @property
    def catalog(self) -> Table:
        """The filtered catalog (a new table on each access)."""
        return self._apply_filters(self._table)

    @property
    def segmentation(self) -> np.ndarray:
        """The int32 segmentation image (read-only, shared like the detected one).

        Raises
        ------
        ValueError
            If none was given and no image was set.
        """
        if self._segm is None:
            msg = "no segmentation given and no image set: call set_image() first"
            raise ValueError(msg)
        return self._segm

"""Pixel maps between a chip and an undistorted grid, through a plane homography.

WCS objects are turned into pixel maps here: the chip's distortion
(astropy's ``pix2foc``) is evaluated at every pixel, and the remaining sky
round trip from the chip's focal plane to the grid, a central projection
between two tangent planes, is one 3x3 homography fitted on a few exact
round trips and verified (:func:`focal_homography`). A correction measured
on the grid moves a map directly (:func:`affine_pixmap`).
"""

from __future__ import annotations

import logging

import numpy as np
from astropy.wcs import WCS
from drizzle.utils import calc_pixmap

from subpixal_jax.geometry.skywcs import SkyWCS

__all__ = [
    "affine_pixmap",
    "apply_homography",
    "chip_pixmap",
    "focal_homography",
    "focal_lattice",
]

log = logging.getLogger(__name__)

#: Side of the tiles in which :func:`chip_pixmap` evaluates a chip (each
#: tile then spans at most a few nodes of an NPOL table's 64 px grid).
_TILE = 64
#: Nodes per axis of the grid on which the focal-plane homography is fitted.
_HOMOGRAPHY_NODES = 9
#: Largest disagreement (px) with the exact sky round trip the fast map accepts.
_HOMOGRAPHY_TOL = 1e-7
#: Nodes per matrix product in :func:`focal_lattice`: about 16k keeps its
#: float64 planes in cache (10x larger products were 3-5x slower per node).
_LATTICE_NODES = 1 << 14


def chip_pixmap(
    chip_wcs: WCS, output_wcs: WCS, shape: tuple[int, int], *, exact: bool = False
) -> np.ndarray:
    """Map every pixel of a chip to the output grid (the only WCS touch point).

    Parameters
    ----------
    chip_wcs : astropy.wcs.WCS
        The chip's full WCS (distortion included).
    output_wcs : astropy.wcs.WCS
        The output grid's WCS.
    shape : tuple of int
        ``(ny, nx)`` of the chip.
    exact : bool, optional
        Evaluate the full sky round trip at every pixel
        (``drizzle.utils.calc_pixmap``) instead of the fast path.

    Returns
    -------
    numpy.ndarray
        ``(ny, nx, 2)`` float64: the 0-based output ``x, y`` of each chip pixel
        centre. Used both to drizzle the chip forward and to blot an output
        image back onto the chip.

    Notes
    -----
    The map is ``G(foc(p))``: the distortion ``pix2foc`` (SIP, D2IM and
    NPOL, exact at every pixel, since D2IM tables have one node per pixel)
    followed by the sky round trip ``G`` from the chip's focal plane to the
    output pixels. For two gnomonic (TAN) WCSs ``G`` is a central projection
    between two tangent planes, i.e. exactly a plane homography, whatever
    the frames' relative rotation; it is fitted on a coarse grid of exact
    sky round trips and checked there and on a second, offset grid. Both are
    evaluated together on 64x64 pixel tiles by :func:`focal_lattice` (equal
    to ``pix2foc`` then the homography to ~5e-12 px). A 4096x2048 ACS/WFC
    chip then takes 0.2-0.5 s (1.3-2.9 s with ``pix2foc`` at every pixel,
    same runs of ``benchmarks/bench_cutouts.py`` on a loaded machine; 7.4 s
    for the full evaluation, idle), agreeing with the full evaluation to
    about 5e-9 px. When the check fails (a non-TAN or distorted output grid)
    the full evaluation is used.

    Examples
    --------
    >>> from astropy.wcs import WCS
    >>> w = WCS(naxis=2)
    >>> w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> w.wcs.crval, w.wcs.cdelt, w.wcs.crpix = [5, 5], [-1e-5, 1e-5], [1, 1]
    >>> v = w.deepcopy()
    >>> v.wcs.crpix = [3, 1]
    >>> chip_pixmap(w, v, (2, 2))[0, 0].round(6) + 0.0
    array([2., 0.])
    """
    ny, nx = (int(n) for n in shape)
    if exact:
        return calc_pixmap(chip_wcs, output_wcs, shape=(ny, nx))
    if isinstance(chip_wcs, SkyWCS):  # a gWCS chip: its own spline map
        return chip_wcs.pixmap(output_wcs, (ny, nx))
    h = focal_homography(chip_wcs, output_wcs, (ny, nx))
    if h is None:
        return calc_pixmap(chip_wcs, output_wcs, shape=(ny, nx))
    # Tiles of _TILE x _TILE pixels through focal_lattice, a band of tiles
    # at a time (the last column of tiles runs past the chip and is cut).
    out = np.empty((ny, nx, 2))
    tiles = -(-nx // _TILE)
    xs = (np.arange(tiles)[:, None] * _TILE + np.arange(_TILE)).astype(np.float64)
    for r0 in range(0, ny, _TILE):
        rows = np.arange(r0, min(r0 + _TILE, ny), dtype=np.float64)
        band = focal_lattice(chip_wcs, xs, np.broadcast_to(rows, (tiles, len(rows))), h)
        out[r0 : r0 + len(rows)] = band.transpose(1, 0, 2, 3).reshape(
            len(rows), tiles * _TILE, 2
        )[:, :nx]
    return out


def apply_homography(h: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Map points through a plane homography.

    Parameters
    ----------
    h : numpy.ndarray
        ``(3, 3)`` homography acting on ``(x, y, 1)``, or ``(..., 3, 3)``
        homographies broadcasting against the points.
    x, y : numpy.ndarray
        Point coordinates (any matching shapes).

    Returns
    -------
    numpy.ndarray
        ``(..., 2)`` float64 mapped ``(x, y)``.
    """
    h = np.asarray(h)
    w = h[..., 2, 0] * x + h[..., 2, 1] * y + h[..., 2, 2]
    return np.stack(
        [
            (h[..., 0, 0] * x + h[..., 0, 1] * y + h[..., 0, 2]) / w,
            (h[..., 1, 0] * x + h[..., 1, 1] * y + h[..., 1, 2]) / w,
        ],
        axis=-1,
    )


def focal_lattice(
    chip_wcs: WCS,
    xs: np.ndarray,
    ys: np.ndarray,
    homography: np.ndarray | None = None,
) -> np.ndarray:
    """``pix2foc`` (D2IM, SIP, NPOL) on tensor grids, optionally then a homography.

    Parameters
    ----------
    chip_wcs : astropy.wcs.WCS
        The chip's full WCS.
    xs, ys : numpy.ndarray
        ``(K, C)`` and ``(K, R)`` 0-based column and row positions of ``K``
        grids (e.g. the half-pixel nodes of ``K`` cutouts of one shape).
    homography : numpy.ndarray, optional
        ``(3, 3)``, e.g. from :func:`focal_homography`, or ``(K, 3, 3)``, one
        per grid: map the focal-plane positions through it
        (:func:`apply_homography`).

    Returns
    -------
    numpy.ndarray
        ``(K, R, C, 2)`` float64: ``pix2foc`` of ``(xs[k, c], ys[k, r])``,
        0-based, or its image under ``homography``.

    Notes
    -----
    When the detector correction (D2IM) moves ``x`` as a function of ``x``
    alone and ``y`` of ``y`` alone (a one-row ``det2im1`` table, as the
    ACS/WFC column-width correction, and a one-column ``det2im2``), the
    D2IM-corrected positions ``(x', y')`` are a tensor grid again. The SIP
    polynomial and the bilinear NPOL tables evaluated at ``(x', y')`` (the
    order of astropy's pipeline) are then tensor products, and so are the
    homography's numerators and denominator, which are linear in the focal
    plane: each is one small matrix product per grid instead of ``R * C``
    point evaluations. The D2IM itself is astropy's ``det2im`` on the axis
    positions. This agrees with ``pix2foc`` (and the homography applied to
    it) to ~5e-13 px on the real ACS/WFC header (round-off at 4096 px
    coordinates; astropy's conventions: 1-based table coordinates, clamped
    at the table edges). Any other D2IM goes through ``pix2foc`` at every
    point.
    """
    xs = np.asarray(xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    k, c, r = xs.shape[0], xs.shape[1], ys.shape[1]
    d1, d2 = chip_wcs.det2im1, chip_wcs.det2im2
    if (d1 is not None and d1.data.shape[0] != 1) or (
        d2 is not None and d2.data.shape[1] != 1
    ):
        gx = np.broadcast_to(xs[:, None, :], (k, r, c))
        gy = np.broadcast_to(ys[:, :, None], (k, r, c))
        fx, fy = chip_wcs.pix2foc(gx.ravel(), gy.ravel(), 0)
        if homography is None:
            return np.stack([fx, fy], axis=-1).reshape(k, r, c, 2)
        hk = np.broadcast_to(homography, (k, 3, 3))[:, None, None]
        return apply_homography(hk, fx.reshape(k, r, c), fy.reshape(k, r, c))
    # D2IM-corrected axes (the other coordinate is irrelevant to each table).
    x1 = xs if d1 is None else chip_wcs.det2im(xs, np.zeros_like(xs), 0)[0]
    y1 = ys if d2 is None else chip_wcs.det2im(np.zeros_like(ys), ys, 0)[1]
    h = np.eye(3) if homography is None else np.asarray(homography, np.float64)
    h = np.broadcast_to(h, (k, 3, 3))
    # The focal plane is x' + f(u, v) + NPOL_x, y' + g(u, v) + NPOL_y with
    # the SIP polynomials f, g of (u, v) = (x', y') - (CRPIX - 1); every row i
    # of h makes sum_pq M_i[p, q] u^p v^q of it, plus the NPOL terms.
    sip = chip_wcs.sip
    if sip is None:
        coef = [np.zeros((2, 2)), np.zeros((2, 2))]
        shift = np.zeros(2)
    else:
        coef = [np.asarray(sip.a, np.float64), np.asarray(sip.b, np.float64)]
        shift = np.asarray(sip.crpix, np.float64) - 1.0
    n = max(2, *(a.shape[0] for a in coef))
    poly = np.zeros((2, n, n))
    for axis, a in enumerate(coef):
        poly[axis, : a.shape[0], : a.shape[1]] = a
    poly[0, 0, 0] += shift[0]  # x' = u + CRPIX1 - 1
    poly[0, 1, 0] += 1.0
    poly[1, 0, 0] += shift[1]
    poly[1, 0, 1] += 1.0
    m = np.einsum("kia,apq->kipq", h[:, :, :2], poly)  # (K, 3, p, q)
    m[:, :, 0, 0] += h[:, :, 2]
    upow = np.vander((x1 - shift[0]).ravel(), n, increasing=True).reshape(k, c, n)
    vpow = np.vander((y1 - shift[1]).ravel(), n, increasing=True).reshape(k, r, n)
    # Every plane is sum_w L[k, i, r, w] Q[k, w, c]: the polynomial (L = V M_i,
    # Q = U^T) and each NPOL table (L = h_i,axis W_y T, Q = W_x^T) side by
    # side in w, so that one stacked product of contiguous operands (the fast
    # kind in numpy) makes all three planes.
    lefts = [(vpow @ m.transpose(0, 3, 1, 2).reshape(k, n, -1)).reshape(k, r, 3, n)]
    rights = [upow]
    for axis, table in ((0, chip_wcs.cpdis1), (1, chip_wcs.cpdis2)):
        if table is not None:
            rows, cols = _table_factors(table, x1, y1)
            lefts.append(rows[:, :, None, :] * h[:, None, :, axis, None])
            rights.append(cols)
    left = np.concatenate(lefts, axis=-1).transpose(0, 2, 1, 3)
    left = np.ascontiguousarray(left).reshape(k, 3 * r, -1)
    right = np.ascontiguousarray(np.concatenate(rights, axis=-1).transpose(0, 2, 1))
    out = np.empty((k, r, c, 2))
    step = max(1, _LATTICE_NODES // (r * c))
    for a in range(0, k, step):
        planes = (left[a : a + step] @ right[a : a + step]).reshape(-1, 3, r, c)
        if homography is None:
            out[a : a + step, ..., 0] = planes[:, 0]
            out[a : a + step, ..., 1] = planes[:, 1]
        else:
            np.divide(planes[:, 0], planes[:, 2], out=out[a : a + step, ..., 0])
            np.divide(planes[:, 1], planes[:, 2], out=out[a : a + step, ..., 1])
    return out


def _table_factors(table, x1: np.ndarray, y1: np.ndarray):
    """Factors ``(W_y T, W_x)`` of a lookup table's bilinear offset on tensor grids.

    The offset at ``(x1[k, c], y1[k, r])`` is ``(W_y T)[k, r] . W_x[k, c]``;
    each grid only touches the table nodes between its extreme positions,
    so ``T`` is that sub-table. Returns ``(K, R, S)`` and ``(K, C, S)``.
    """
    data = np.asarray(table.data, dtype=np.float64)
    wy, iy = _hat_weights(table, 1, y1, data.shape[0])
    wx, ix = _hat_weights(table, 0, x1, data.shape[1])
    return wy @ data[iy[:, :, None], ix[:, None, :]], wx


def _hat_weights(table, axis: int, pos: np.ndarray, n: int):
    """Bilinear weights ``(K, P, S)`` of positions on the table nodes ``(K, S)``.

    The fractional table coordinate is astropy's
    ``(x - crval) / cdelt + crpix - 1`` of the 1-based ``x``, clamped to the
    table; a node's weight is the hat ``max(0, 1 - |t - node|)``.
    """
    t = (pos + 1.0 - table.crval[axis]) / table.cdelt[axis] + table.crpix[axis] - 1.0
    t = np.clip(t, 0.0, n - 1.0)
    lo = np.floor(t.min(axis=1)).astype(np.int64)
    span = int((np.floor(t.max(axis=1)).astype(np.int64) - lo).max()) + 2
    nodes = lo[:, None] + np.arange(span)  # (K, S), may pass the last node
    weights = np.maximum(0.0, 1.0 - np.abs(t[:, :, None] - nodes[:, None, :]))
    return weights, np.minimum(nodes, n - 1)


def _focal_round_trip(chip_wcs, output_wcs, fx, fy) -> np.ndarray:
    """Exact output pixels of chip focal-plane points (0-based)."""
    ra, dec = chip_wcs.wcs_pix2world(fx, fy, 0)
    ox, oy = output_wcs.all_world2pix(ra, dec, 0)
    return np.stack([ox, oy], axis=-1)


def focal_homography(chip_wcs, output_wcs, shape) -> np.ndarray | None:
    """Fit the homography from a chip's focal plane to output pixels.

    Fitted (direct linear transform, normalised coordinates) on a 9x9 grid
    of exact sky round trips over the chip's focal-plane footprint and
    accepted only if it reproduces them, and those of a grid offset by half
    a cell, to 1e-7 pixels.

    Parameters
    ----------
    chip_wcs : astropy.wcs.WCS
        The chip's full WCS (``pix2foc`` gives its focal plane).
    output_wcs : astropy.wcs.WCS
        The output (reference) grid's WCS.
    shape : tuple of int
        ``(ny, nx)`` of the chip footprint the fit covers.

    Returns
    -------
    numpy.ndarray or None
        ``(3, 3)`` float64 homography for :func:`apply_homography`, or None
        when the round trip fails or is not a homography to the tolerance
        (non-TAN or distorted output grid): callers then evaluate exactly.
    """
    ny, nx = shape
    try:
        u = np.linspace(-0.5, nx - 0.5, _HOMOGRAPHY_NODES)
        v = np.linspace(-0.5, ny - 0.5, _HOMOGRAPHY_NODES)
        px, py = (a.ravel() for a in np.meshgrid(u, v))
        fx, fy = chip_wcs.pix2foc(px, py, 0)
        target = _focal_round_trip(chip_wcs, output_wcs, fx, fy)
    except Exception:  # anything odd: use the exact path
        log.debug("chip_pixmap: no focal-plane round trip; exact evaluation")
        return None
    if not np.all(np.isfinite(target)):
        return None
    # Normalise both planes to O(1) so that the 8x8 system is well conditioned.
    src = np.stack([fx, fy], axis=-1)
    s0, ss = src.mean(0), max(float(np.ptp(src, 0).max()), 1.0)
    t0, ts = target.mean(0), max(float(np.ptp(target, 0).max()), 1.0)
    a = (src - s0) / ss
    b = (target - t0) / ts
    one, zero = np.ones(len(a)), np.zeros(len(a))
    rows = np.concatenate(
        [
            np.stack(
                [
                    a[:, 0],
                    a[:, 1],
                    one,
                    zero,
                    zero,
                    zero,
                    -a[:, 0] * b[:, 0],
                    -a[:, 1] * b[:, 0],
                ],
                axis=1,
            ),
            np.stack(
                [
                    zero,
                    zero,
                    zero,
                    a[:, 0],
                    a[:, 1],
                    one,
                    -a[:, 0] * b[:, 1],
                    -a[:, 1] * b[:, 1],
                ],
                axis=1,
            ),
        ]
    )
    sol = np.linalg.lstsq(rows, np.concatenate([b[:, 0], b[:, 1]]), rcond=None)[0]
    hn = np.append(sol, 1.0).reshape(3, 3)
    pre = np.array([[1 / ss, 0, -s0[0] / ss], [0, 1 / ss, -s0[1] / ss], [0, 0, 1]])
    post = np.array([[ts, 0, t0[0]], [0, ts, t0[1]], [0, 0, 1]])
    h = post @ hn @ pre
    # Check on the fit nodes and on a grid offset from them by half a cell.
    du, dv = 0.5 * (u[1] - u[0]), 0.5 * (v[1] - v[0])
    cx, cy = (a.ravel() for a in np.meshgrid(u[:-1] + du, v[:-1] + dv))
    gx, gy = chip_wcs.pix2foc(cx, cy, 0)
    check = _focal_round_trip(chip_wcs, output_wcs, gx, gy)
    err = max(
        float(np.max(np.abs(apply_homography(h, fx, fy) - target))),
        float(np.max(np.abs(apply_homography(h, gx, gy) - check))),
    )
    if not err <= _HOMOGRAPHY_TOL:
        log.debug("chip_pixmap: homography off by %.2g px; exact evaluation", err)
        return None
    return h


def affine_pixmap(
    pixmap: np.ndarray, matrix, shift, center, *, out: np.ndarray | None = None
) -> np.ndarray:
    r"""Pixel map after an affine correction measured in the output frame.

    The correction is the fit model of :func:`subpixal_jax.io.wcs.correct_wcs`
    with ``wcslin`` the output grid: :math:`T(u) = M (u - c) + c + s` maps
    where a source *is* to where the old WCS *predicts* it, and the corrected
    WCS maps a chip pixel to :math:`T^{-1}` of its old output position. So the
    new map is

    .. math:: p' = M^{-1} (p - c - s) + c.

    This is the exact composite; ``correct_wcs`` can only represent it to a
    second-order tangent-plane term (below 1e-6 px over an ACS/WFC chip for
    a 0.05 deg, 2 px, 1e-4 scale correction, measured in
    ``tests/test_resample.py``).

    Parameters
    ----------
    pixmap : numpy.ndarray
        ``(..., 2)`` output ``x, y`` (0-based), e.g. from :func:`chip_pixmap`.
    matrix : array_like, shape (2, 2)
        ``M`` (tweakwcs orientation, ``x' = M[0,0] u + M[0,1] v``).
    shift : array_like, shape (2,)
        ``s``, output pixels, about ``center``.
    center : array_like, shape (2,)
        ``c``, the 0-based output pixel about which ``M`` acts (the loop uses
        ``output_wcs.wcs.crpix - 1``).
    out : numpy.ndarray, optional
        Where to write the result (may be ``pixmap`` itself).

    Returns
    -------
    numpy.ndarray
        The updated map, float64, same shape as ``pixmap``.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[[10.0, 20.0]]])
    >>> affine_pixmap(p, np.eye(2), [1.0, -2.0], [0.0, 0.0])[0, 0]
    array([ 9., 22.])
    """
    m = np.asarray(matrix, dtype=np.float64)
    s = np.asarray(shift, dtype=np.float64)
    c = np.asarray(center, dtype=np.float64)
    if m.shape != (2, 2) or s.shape != (2,) or c.shape != (2,):
        msg = "matrix must be 2x2 and shift, center 2-vectors, got shapes "
        msg += f"{m.shape}, {s.shape}, {c.shape}"
        raise ValueError(msg)
    inv = np.linalg.inv(m)
    off = c - inv @ (c + s)
    pixmap = np.asarray(pixmap, dtype=np.float64)
    # Copies, so that ``out`` may be ``pixmap``; no (N, 2) @ (2, 2) temporaries.
    x, y = pixmap[..., 0].copy(), pixmap[..., 1].copy()
    if out is None:
        out = np.empty_like(pixmap)
    for k in range(2):
        np.multiply(x, inv[k, 0], out=out[..., k])
        out[..., k] += inv[k, 1] * y
        out[..., k] += off[k]
    return out

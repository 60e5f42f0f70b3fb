"""Sub-pixel peak location by a quadratic fit in a fixed box (docs/original.md §5).

The peak of a correlation map is found in two steps: the (windowed) argmax,
then a least-squares fit of

.. math::

    f(u, v) = c_0 + c_1 u + c_2 v + c_3 u v + c_4 u^2 + c_5 v^2

to the ``w x w`` values around it, with ``(u, v)`` centred on the box. On a
full, evenly spaced box the normal equations are diagonal after subtracting
the mean of ``u**2`` and ``v**2``, so the coefficients are fixed weighted
sums of the box values (no matrix solve). Every fallback is a
``jnp.where`` and is reported through :class:`PeakFlag` bits, never by an
early return or an exception.
"""

from __future__ import annotations

import enum
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PeakFlag(enum.IntFlag):
    """Per-source status bits of a peak or displacement measurement.

    ``0`` means a good measurement. The bits may be combined.

    Attributes
    ----------
    EDGE
        The argmax lies on the border of the searched lag window (the true
        maximum may lie outside it). The fit is still made in a box moved
        inside the window.
    NO_MAXIMUM
        The fitted quadratic has no maximum (not concave); the integer
        argmax is returned.
    TOO_FEW_POINTS
        The window is narrower than the fit box; the integer argmax is
        returned.
    NONFINITE
        Non-finite input pixels or correlation values; the position is NaN.
    VERTEX_OUTSIDE
        The fitted vertex lies outside the fit box; the integer argmax is
        returned.
    INVALID_INPUT
        Nothing to correlate: every pixel masked or zero, or a constant
        image under NCC/ZNCC normalisation; the position is NaN.
    LAG_WINDOW
        The peak is at the edge of the lag window the map (the cutout size)
        allows: the argmax is closer to the window's border than half the
        fit box, so the box cannot be centred on it and the position is
        biased, or the true peak lies beyond the window. The fit is still
        made in a box moved inside the window (as for ``EDGE``, which refers
        to the searched window).
    """

    EDGE = 1
    NO_MAXIMUM = 2
    TOO_FEW_POINTS = 4
    NONFINITE = 8
    VERTEX_OUTSIDE = 16
    INVALID_INPUT = 32
    LAG_WINDOW = 64


#: Flags for which no position is reported (NaN).
FATAL_FLAGS = int(PeakFlag.NONFINITE | PeakFlag.INVALID_INPUT)


class Peak(NamedTuple):
    """Result of :func:`find_peak`.

    Attributes
    ----------
    xy : Array, shape (2,)
        ``(x, y)`` of the peak, 0-based pixel coordinates of the map.
    flags : Array, shape (), int32
        :class:`PeakFlag` bits, 0 if good.
    height : Array, shape ()
        Value of the fitted quadratic at its vertex (the map value at the
        argmax when the fit is rejected).
    hessian : Array, shape (2, 2)
        Second derivatives of the fitted quadratic, ``[[f_xx, f_xy],
        [f_xy, f_yy]]`` per map pixel squared.
    """

    xy: jax.Array
    flags: jax.Array
    height: jax.Array
    hessian: jax.Array


def check_fit_box(fit_box: int) -> int:
    """Validate the fit-box side (odd, >= 3) and return it as an int.

    Parameters
    ----------
    fit_box : int
        Side of the square fit box in map pixels.

    Returns
    -------
    int
        ``fit_box``.

    Raises
    ------
    ValueError
        If ``fit_box`` is not an odd integer >= 3.

    Examples
    --------
    >>> check_fit_box(5)
    5
    """
    if isinstance(fit_box, bool) or not isinstance(fit_box, int):
        msg = f"fit_box must be an odd integer >= 3, got {fit_box!r}"
        raise ValueError(msg)
    if fit_box < 3 or fit_box % 2 == 0:
        msg = f"fit_box must be an odd integer >= 3, got {fit_box!r}"
        raise ValueError(msg)
    return fit_box


def box_start(peak: jax.Array, lo: jax.Array, hi: jax.Array, width: int) -> jax.Array:
    """First index of a ``width``-wide box around ``peak`` kept in ``[lo, hi]``.

    Parameters
    ----------
    peak, lo, hi : Array of int
        Peak index and the inclusive window bounds (same shape).
    width : int
        Box width (static).

    Returns
    -------
    Array of int
        ``clip(peak - width // 2, lo, hi - width + 1)``; below ``lo`` only
        when the window is narrower than the box.
    """
    return jnp.maximum(jnp.minimum(peak - width // 2, hi - width + 1), lo)


def quadratic_coefficients(values: jax.Array) -> jax.Array:
    """Least-squares quadratic coefficients of a full, odd ``w x w`` box.

    Parameters
    ----------
    values : Array, shape (..., w, w)
        Box values indexed ``[v, u]`` (row, column), ``w`` odd.

    Returns
    -------
    Array, shape (..., 6)
        ``(c0, c1, c2, c3, c4, c5)`` of ``c0 + c1 u + c2 v + c3 u v + c4 u**2
        + c5 v**2`` with ``u, v`` in ``-(w//2) .. w//2``.
    """
    w = values.shape[-1]
    h = w // 2
    u = jnp.arange(-h, h + 1, dtype=values.dtype)
    s2 = float(sum(k * k for k in range(-h, h + 1)))
    m2 = s2 / w
    s4 = float(sum((k * k - m2) ** 2 for k in range(-h, h + 1)))
    q = u * u - m2
    uu = u[None, :]
    vv = u[:, None]
    mean = jnp.mean(values, axis=(-2, -1))
    c1 = jnp.sum(values * uu, axis=(-2, -1)) / (w * s2)
    c2 = jnp.sum(values * vv, axis=(-2, -1)) / (w * s2)
    c3 = jnp.sum(values * (uu * vv), axis=(-2, -1)) / (s2 * s2)
    c4 = jnp.sum(values * q[None, :], axis=(-2, -1)) / (w * s4)
    c5 = jnp.sum(values * q[:, None], axis=(-2, -1)) / (w * s4)
    c0 = mean - m2 * (c4 + c5)
    return jnp.stack([c0, c1, c2, c3, c4, c5], axis=-1)


#: Side of the box of the interpolating-polynomial peak (degree ``- 1`` per axis).
LAGRANGE_TAPS = 7

#: Peak-fit methods of the cross-correlation path.
PEAK_FITS: tuple[str, ...] = ("template", "lagrange", "quadratic")


def check_peak_fit(peak_fit: str) -> str:
    """Validate a peak-fit method name and return it.

    Parameters
    ----------
    peak_fit : {'template', 'lagrange', 'quadratic'}
        Peak model (see :func:`lagrange_peak` and
        :func:`subpixal_jax.core.xcorr.find_displacements`).

    Returns
    -------
    str
        ``peak_fit``.

    Raises
    ------
    ValueError
        If ``peak_fit`` is not one of :data:`PEAK_FITS`.

    Examples
    --------
    >>> check_peak_fit("lagrange")
    'lagrange'
    """
    if not isinstance(peak_fit, str) or peak_fit not in PEAK_FITS:
        msg = f"peak_fit must be one of {PEAK_FITS}, got {peak_fit!r}"
        raise ValueError(msg)
    return peak_fit


@functools.cache
def _lagrange_matrix(taps: int):
    """Monomial coefficients of the Lagrange basis on nodes ``-(taps//2) ..``."""
    nodes = np.arange(taps, dtype=np.float64) - taps // 2
    return np.linalg.inv(np.vander(nodes, increasing=True))


def _powers(u, taps):
    """``u**p``, its first and second derivatives for ``p = 0 .. taps - 1``."""
    p = jnp.arange(taps, dtype=u.dtype)
    base = u ** jnp.maximum(p - 2, 0)  # u**(p-2), safe at u = 0
    d2 = jnp.where(p >= 2, p * (p - 1) * base, 0)
    d1 = jnp.where(p >= 1, p * jnp.where(p >= 2, u * base, 1), 0)
    d0 = jnp.where(p >= 2, u * u * base, jnp.where(p == 1, u, 1))
    return d0, d1, d2


def lagrange_weights(u: jax.Array, taps: int = LAGRANGE_TAPS):
    """Lagrange interpolation weights and their derivatives at ``u``.

    Parameters
    ----------
    u : Array, shape ()
        Position relative to the middle node, nodes at ``-(taps//2) ..
        taps//2``.
    taps : int, optional
        Number of nodes (odd, static).

    Returns
    -------
    weights, derivatives : Array, shape (taps,)
        ``f(u) = weights @ f_nodes`` and ``f'(u) = derivatives @ f_nodes``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> w, d = lagrange_weights(jnp.asarray(0.25), 5)
    >>> round(float(w @ jnp.arange(-2.0, 3.0) ** 2), 4), round(float(d.sum()), 4)
    (0.0625, 0.0)
    """
    inverse = jnp.asarray(_lagrange_matrix(taps), u.dtype)
    p0, p1, _ = _powers(u, taps)
    return p0 @ inverse, p1 @ inverse


def lagrange_peak(values: jax.Array, start: jax.Array, *, n_iter: int = 5):
    """Maximum of the polynomial interpolating a square box of map values.

    The correlation of an exposure with a smooth reference is a band-limited
    function of the lag, sampled by the interlaced map at half pixels well
    above its Nyquist rate; the tensor-product Lagrange polynomial through
    a ``T x T`` box reproduces it near the box centre far better than a
    quadratic, whose peak locks onto the grid (an error periodic in the
    sampling step). The maximum is found by Newton steps from ``start``.

    Parameters
    ----------
    values : Array, shape (T, T)
        Map values ``[v, u]`` centred on the argmax, ``T`` odd.
    start : Array, shape (2,)
        Starting ``(u, v)`` relative to the box centre (e.g. the quadratic
        vertex).
    n_iter : int, optional
        Newton iterations (static).

    Returns
    -------
    uv : Array, shape (2,)
        Position of the maximum relative to the box centre.
    height : Array, shape ()
        Interpolated value there.
    hessian : Array, shape (2, 2)
        Second derivatives of the polynomial there (per map pixel squared).
    ok : Array, shape (), bool
        The Hessian is negative definite and the maximum lies within one
        map pixel of the centre (where the interpolation is accurate).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> y, x = jnp.mgrid[-3:4, -3:4]
    >>> box = jnp.exp(-((x - 0.3) ** 2 + (y + 0.2) ** 2) / 8.0)
    >>> uv, height, hessian, ok = lagrange_peak(box, jnp.zeros(2))
    >>> [round(float(t), 4) for t in uv], bool(ok)
    ([0.3, -0.2], True)
    """
    taps = values.shape[-1]
    dtype = values.dtype
    inverse = jnp.asarray(_lagrange_matrix(taps), dtype)
    coef = inverse @ values @ inverse.T  # coef[q, p] of v**q u**p

    def derivatives(uv):
        pu, du, ddu = _powers(uv[0], taps)
        pv, dv, ddv = _powers(uv[1], taps)
        value = pv @ coef @ pu
        grad = jnp.stack([pv @ coef @ du, dv @ coef @ pu])
        fxy = dv @ coef @ du
        hess = jnp.stack(
            [jnp.stack([pv @ coef @ ddu, fxy]), jnp.stack([fxy, ddv @ coef @ pu])]
        )
        return value, grad, hess

    uv = jnp.clip(jnp.nan_to_num(start.astype(dtype)), -1.0, 1.0)
    for _ in range(n_iter):
        _, grad, hess = derivatives(uv)
        det = hess[0, 0] * hess[1, 1] - hess[0, 1] ** 2
        concave = (det > 0) & (hess[0, 0] < 0)
        safe = jnp.where(concave, det, 1.0)
        step = (
            -jnp.stack(
                [
                    hess[1, 1] * grad[0] - hess[0, 1] * grad[1],
                    hess[0, 0] * grad[1] - hess[0, 1] * grad[0],
                ]
            )
            / safe
        )
        step = jnp.where(concave, jnp.clip(step, -0.5, 0.5), 0)
        uv = jnp.clip(uv + step, -1.5, 1.5)
    value, _, hess = derivatives(uv)
    det = hess[0, 0] * hess[1, 1] - hess[0, 1] ** 2
    ok = (det > 0) & (hess[0, 0] < 0) & jnp.all(jnp.abs(uv) <= 1.0)
    return uv, value, hess, ok


def refine_box(  # noqa: PLR0913  # seed signature
    values: jax.Array,
    start: jax.Array,
    guess: jax.Array,
    guess_value: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    *,
    exact_original: bool,
    search_lo: jax.Array | None = None,
    search_hi: jax.Array | None = None,
    reach: int | None = None,
) -> Peak:
    """Fit the quadratic in one box and apply the acceptance rules.

    Parameters
    ----------
    values : Array, shape (w, w)
        Map values of the box, ``[v, u]``.
    start : Array, shape (2,), int
        ``(x, y)`` of the box's first column and row in map pixels.
    guess : Array, shape (2,), int
        ``(x, y)`` of the argmax.
    guess_value : Array, shape ()
        Map value at the argmax.
    lo, hi : Array, shape (2,), int
        Inclusive ``(x, y)`` bounds of the window the box must stay in.
    exact_original : bool
        Reproduce the original's rules (see :func:`find_peak` Notes).
    search_lo, search_hi : Array, shape (2,), int, optional
        Bounds of the (smaller) window the argmax was searched in, for the
        ``EDGE`` flag; default ``lo`` and ``hi``.
    reach : int, optional
        Static. Samples the peak model needs on each side of the argmax; an
        argmax closer than that to ``lo`` or ``hi`` is flagged
        ``LAG_WINDOW``. Default ``w // 2``.

    Returns
    -------
    Peak
        Position, flags, height and Hessian in map pixels.
    """
    w = values.shape[-1]
    h = w // 2
    dtype = values.dtype
    c = quadratic_coefficients(values)
    c0, c1, c2, c3, c4, c5 = (c[k] for k in range(6))
    det = 4.0 * c4 * c5 - c3 * c3
    safe_det = jnp.where(det > 0, det, 1.0)
    u = (c2 * c3 - 2.0 * c5 * c1) / safe_det
    v = (c1 * c3 - 2.0 * c4 * c2) / safe_det
    centre = (start + h).astype(dtype)
    vertex = centre + jnp.stack([u, v])
    height = c0 + 0.5 * (c1 * u + c2 * v)
    hessian = jnp.stack([jnp.stack([2.0 * c4, c3]), jnp.stack([c3, 2.0 * c5])])

    narrow = jnp.any(hi - lo + 1 < w)
    no_max = (det <= 0) | (c4 >= 0)
    nonfinite = ~jnp.all(jnp.isfinite(values)) | ~jnp.isfinite(guess_value)
    search_lo = lo if search_lo is None else search_lo
    search_hi = hi if search_hi is None else search_hi
    edge = jnp.any((guess == search_lo) | (guess == search_hi))
    reach = h if reach is None else reach
    off_centre = jnp.any((guess - lo < reach) | (hi - guess < reach))
    guess_f = guess.astype(dtype)
    if exact_original:
        at_first = jnp.any(guess == lo)
        inside = jnp.all((vertex > lo) & (vertex < hi))
        middle = start.astype(dtype) + 0.5 * w
        fitted = jnp.where(no_max, middle, jnp.where(inside, vertex, guess_f))
        xy = jnp.where(at_first | narrow, guess_f, fitted)
        outside = ~no_max & ~inside
        fit_used = ~(narrow | no_max | outside | at_first)
    else:
        outside = (jnp.abs(u) > h) | (jnp.abs(v) > h)
        fit_used = ~(narrow | no_max | outside)
        xy = jnp.where(fit_used, vertex, guess_f)
    height = jnp.where(fit_used, height, guess_value)
    flags = (
        jnp.where(edge, int(PeakFlag.EDGE), 0)
        | jnp.where(~narrow & no_max, int(PeakFlag.NO_MAXIMUM), 0)
        | jnp.where(narrow, int(PeakFlag.TOO_FEW_POINTS), 0)
        | jnp.where(~narrow & ~no_max & outside, int(PeakFlag.VERTEX_OUTSIDE), 0)
        | jnp.where(nonfinite, int(PeakFlag.NONFINITE), 0)
        | jnp.where(off_centre, int(PeakFlag.LAG_WINDOW), 0)
    ).astype(jnp.int32)
    xy = jnp.where(nonfinite, jnp.nan, xy)
    return Peak(xy=xy, flags=flags, height=height, hessian=hessian)


def masked_argmax(values: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First (row-major) flat index of the maximum over ``valid`` entries.

    Uses a max followed by a min-index lookup, which is several times faster
    than ``jnp.argmax`` on XLA CPU, with the same tie-breaking.

    Parameters
    ----------
    values : Array, shape (H, W)
        Map.
    valid : Array, shape (H, W), bool
        Entries that may hold the maximum.

    Returns
    -------
    index : Array, shape (), int32
        Flat index of the maximum (``H * W`` if no entry is valid).
    value : Array, shape ()
        The maximum (``-inf`` if no entry is valid).
    """
    masked = jnp.where(valid, values, -jnp.inf)
    top = jnp.max(masked)
    flat = jnp.arange(values.size, dtype=jnp.int32).reshape(values.shape)
    index = jnp.min(jnp.where(masked == top, flat, values.size))
    return index, top


@functools.partial(jax.jit, static_argnames=("fit_box", "exact_original"))
def _find_peak(image, mask, *, fit_box, exact_original):
    ny, nx = image.shape
    w = fit_box
    index, top = masked_argmax(image, mask)
    index = jnp.minimum(index, image.size - 1)
    guess = jnp.stack([index % nx, index // nx])
    lo = jnp.zeros(2, dtype=jnp.int32)
    hi = jnp.array([nx - 1, ny - 1], dtype=jnp.int32)
    start = box_start(guess, lo, hi, w)
    rows = jnp.clip(start[1] + jnp.arange(w), 0, ny - 1)
    cols = jnp.clip(start[0] + jnp.arange(w), 0, nx - 1)
    values = image[rows[:, None], cols[None, :]]
    return refine_box(values, start, guess, top, lo, hi, exact_original=exact_original)


def find_peak(
    image: jax.Array,
    *,
    fit_box: int = 5,
    mask: jax.Array | None = None,
    exact_original: bool = False,
) -> Peak:
    """Locate the maximum of a 2-D map to sub-pixel precision.

    Parameters
    ----------
    image : Array, shape (H, W)
        Map (e.g. an interlaced cross-correlation), float32 or float64.
    fit_box : int, optional
        Odd side (>= 3) of the square box of the quadratic fit.
    mask : Array, shape (H, W), bool, optional
        ``True`` where the maximum may be; default everywhere. The fit box
        itself always uses the map values.
    exact_original : bool, optional
        Apply the original ``subpixal`` acceptance rules (see Notes).

    Returns
    -------
    Peak
        ``xy`` (x, y) position in map pixels, ``flags`` (:class:`PeakFlag`),
        the fitted ``height`` and the ``hessian`` of the fitted quadratic.

    Raises
    ------
    ValueError
        If ``image`` is not 2-D, ``mask`` has another shape, or ``fit_box``
        is not an odd integer >= 3.

    Notes
    -----
    Deviations from the original ``centroid.find_peak`` (original.md §5, §9 item 8),
    all switched off by ``exact_original=True``:

    * The polynomial is fitted in coordinates centred on the box (the
      original used absolute coordinates; same function, better
      conditioned), in closed form.
    * A peak in the first row or column is fitted in a box moved inside the
      array like a peak in the last row or column (the original returned
      the integer position there); both are flagged ``EDGE``.
    * When the quadratic has no maximum, the integer argmax is returned and
      flagged ``NO_MAXIMUM``; the original returned the middle of the box,
      which is biased by half a map pixel.
    * The vertex is accepted only inside the fit box (the original accepted
      it anywhere in the array); otherwise the argmax is returned, flagged
      ``VERTEX_OUTSIDE``.

    ``exact_original=True`` keeps the fit in centred coordinates; the
    result equals the original's to rounding. In both modes a map (or lag
    window) narrower than ``fit_box`` returns the integer argmax flagged
    ``TOO_FEW_POINTS``; the original fitted the truncated box when it held
    at least 6 points (only possible for cutouts under 3 px).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> y, x = jnp.mgrid[0:9, 0:9]
    >>> peak = find_peak(-((x - 4.3) ** 2) - 2.0 * (y - 3.8) ** 2)
    >>> [round(float(v), 3) for v in peak.xy], int(peak.flags)
    ([4.3, 3.8], 0)
    """
    image = jnp.asarray(image)
    if image.ndim != 2:
        msg = f"image must be 2-D, got shape {image.shape}"
        raise ValueError(msg)
    if not jnp.issubdtype(image.dtype, jnp.floating):
        image = image.astype(jnp.float32)
    check_fit_box(fit_box)
    if mask is None:
        mask = jnp.ones(image.shape, dtype=bool)
    mask = jnp.asarray(mask)
    if mask.shape != image.shape:
        msg = f"mask must have the shape of image {image.shape}, got {mask.shape}"
        raise ValueError(msg)
    return _find_peak(
        image, mask.astype(bool), fit_box=fit_box, exact_original=bool(exact_original)
    )

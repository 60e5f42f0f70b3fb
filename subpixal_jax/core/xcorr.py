"""Cross-correlation of image cutouts with half-pixel blots (docs/original.md §4).

For every source the exposure cutout ``ref`` is correlated with the four
half-pixel-shifted blots ``B_ab`` of the drizzled reference; the four maps
interlace into a map on a grid twice as fine, whose peak (docs/original.md §5, see
:mod:`subpixal_jax.core.peak`) gives the displacement.

Conventions (as the original, docs/original.md §4.2–4.3):

* the correlation map has the cutout's shape and ``K[c + tau] = sum_m
  B[m] R[m - tau]`` with ``c = ((H - 1) // 2, (W - 1) // 2)`` and ``R`` zero
  outside its array, so ``K`` peaks at ``tau`` when ``B`` is ``R`` shifted
  by ``+tau``;
* interlacing: ``I[2p + b, 2q + a] = K_ab[p, q]``;
* ``(dx, dy)`` = position of the source in ``B_00`` minus its position in
  ``R``, in image pixels.

Validity masks use ``True`` = good (see :mod:`subpixal_jax.core.batch`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from subpixal_jax.core.batch import HALF_PIXEL_SHIFTS
from subpixal_jax.core.peak import (
    FATAL_FLAGS,
    LAGRANGE_TAPS,
    PeakFlag,
    box_start,
    check_fit_box,
    check_peak_fit,
    lagrange_peak,
    lagrange_weights,
    refine_box,
)

#: Supported correlation types (docs/original.md §4.1).
CC_TYPES: tuple[str, ...] = ("CC", "NCC", "ZNCC")

#: Sources per vmapped chunk inside one compiled call.
CHUNK = 64

_SIGMA_OK_FLAGS = int(PeakFlag.EDGE | PeakFlag.LAG_WINDOW)


class _Settings(NamedTuple):
    """Static options of one measurement (hashable: a compile-time key)."""

    cc_type: str
    fit_box: int
    exact: bool
    radius: float | None
    peak_fit: str
    overlap: bool


class Displacements(NamedTuple):
    """Per-source displacements of a batch.

    Attributes
    ----------
    dxdy : Array, shape (N, 2)
        ``(dx, dy)`` in image pixels: source position in blot 00 minus its
        position in the exposure cutout. NaN where ``flags`` holds
        ``NONFINITE`` or ``INVALID_INPUT``.
    flags : Array, shape (N,), int32
        :class:`~subpixal_jax.core.peak.PeakFlag` bits; 0 = good.
    sigma : Array, shape (N, 2)
        Approximate 1-sigma error of ``(dx, dy)`` (image pixels): the
        exposure's noise (the ``variances`` given to
        :func:`find_displacements`, else the per-pixel residuals of the
        exposure against the matched blot, which count model mismatch as
        noise) propagated through the peak fit (the template fit's Fisher
        error with variances); NaN when the fit was rejected. With
        variances the pulls on the standard cases are 1.01-1.06 (template
        fit) and 0.99-1.04 (Lagrange; docs/accuracy.md §1.5).
    peak : Array, shape (N,)
        Height of the fitted correlation peak (units of ``cc_type``; with
        ``overlap_normalise`` the per-lag correlation coefficient, at most
        1).
    quality : Array, shape (N,)
        Peak height over ``sqrt(sum R**2 * sum B**2)`` of the normalised
        arrays (with ``overlap_normalise`` the peak height itself): 1
        for a perfect match, near 0 for no match.
    """

    dxdy: jax.Array
    flags: jax.Array
    sigma: jax.Array
    peak: jax.Array
    quality: jax.Array


class DisplacementMap(NamedTuple):
    """Full output of :func:`find_displacement_full` for one source.

    Attributes
    ----------
    dx, dy : Array, shape ()
        Displacement in image pixels (see :class:`Displacements`).
    flags : Array, shape (), int32
        :class:`~subpixal_jax.core.peak.PeakFlag` bits.
    sigma : Array, shape (2,)
        1-sigma errors of ``(dx, dy)``.
    peak, quality : Array, shape ()
        As in :class:`Displacements`.
    icc : Array, shape (2H, 2W)
        Interlaced correlation map (with ``overlap_normalise`` normalised at
        every lag over its overlap, see :func:`find_displacements`).
    kmaps : Array, shape (4, H, W)
        The four correlation maps in blot order ``(00, 10, 01, 11)``.
    """

    dx: jax.Array
    dy: jax.Array
    flags: jax.Array
    sigma: jax.Array
    peak: jax.Array
    quality: jax.Array
    icc: jax.Array
    kmaps: jax.Array


def _check_cc_type(cc_type: str) -> str:
    name = cc_type.upper() if isinstance(cc_type, str) else cc_type
    if name not in CC_TYPES:
        msg = f"cc_type must be one of {CC_TYPES}, got {cc_type!r}"
        raise ValueError(msg)
    return name


def _fast_length(n: int) -> int:
    """Smallest length >= n whose only prime factors are 2, 3 and 5."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def fft_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Return padded FFT lengths that give every 'same' lag without wrap-around.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)`` of the cutouts.

    Returns
    -------
    tuple of int
        For each axis the smallest 2-3-5-smooth length ``>= n + n // 2``.

    Notes
    -----
    Lag ``tau`` in ``[-c, n - 1 - c]``, ``c = (n - 1) // 2``, is free of
    wrap-around when ``L >= max(n + c, 2 n - 1 - c) = n + n // 2``. For even
    ``n`` this is one more than ``n + (n - 1) // 2``.

    Examples
    --------
    >>> fft_shape((25, 41))
    (40, 64)
    """
    return tuple(_fast_length(n + n // 2) for n in shape)


def _float_dtype(*arrays):
    """Working dtype: float32 or float64 (the FFTs support no narrower float)."""
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits < 32:
        dtype = jnp.dtype(jnp.float32)
    return dtype


def _safe(x):
    return jnp.where(x > 0, x, 1.0)


def _normalise(ref, blots, ref_valid, blot_valid, cc_type):
    """Normalise (original.md §4.1) with validity masks.

    Returns ``(ref, blots, ok, ref_scale)``, ``ref_scale`` the divisor of
    ``ref`` (1 for CC).
    """
    if cc_type == "CC":
        ok = jnp.any(ref != 0) & jnp.any(blots != 0)
        return ref, blots, ok, jnp.ones((), ref.dtype)
    count = jnp.sum(blot_valid)
    pool_mean = jnp.sum(jnp.where(blot_valid, blots, 0)) / _safe(count)
    pool_var = jnp.sum(jnp.where(blot_valid, (blots - pool_mean) ** 2, 0)) / _safe(
        count
    )
    pool_std = jnp.sqrt(pool_var)
    shift = pool_mean if cc_type == "ZNCC" else 0.0
    blots = jnp.where(blot_valid, (blots - shift) / _safe(pool_std), 0)
    union = jnp.any(blot_valid, axis=0) & ref_valid
    n_ref = jnp.sum(union)
    ref_mean = jnp.sum(jnp.where(union, ref, 0)) / _safe(n_ref)
    ref_std = jnp.sqrt(
        jnp.sum(jnp.where(union, (ref - ref_mean) ** 2, 0)) / _safe(n_ref)
    )
    if cc_type == "ZNCC":
        ref = ref - ref_mean
    ref = jnp.where(ref_valid, ref / _safe(ref_std), 0)
    return ref, blots, (pool_std > 0) & (ref_std > 0), _safe(ref_std)


def _lag_extent(big, radius, fit_box):
    """Return the static ``(first, count)`` of the 'same'-layout lags needed.

    With a search radius only the lags within ``ceil(radius)`` plus the
    reach of the fit box are needed.
    """
    if radius is None:
        return 0, big
    centre = (big - 1) // 2
    reach = math.ceil(radius) + fit_box // 2
    first = max(0, centre - reach)
    return first, min(big - 1, centre + reach) - first + 1


def _inverse_dft_rows(first, count, length, dtype, half=False):
    """Matrix evaluating an inverse DFT of ``length`` at ``count`` outputs."""
    k = jnp.arange(length // 2 + 1 if half else length)
    j = jnp.arange(first, first + count)
    phase = (jnp.outer(k, j) % length).astype(dtype) * (2 * math.pi / length)
    weight = jnp.ones(k.shape, dtype) / length
    if half:  # Hermitian half spectrum: interior bins count twice
        weight = jnp.where((k == 0) | (2 * k == length), weight, 2 * weight)
    return jax.lax.complex(jnp.cos(phase), jnp.sin(phase)) * weight[:, None]


def _ref_spectra(ref, lengths):
    """Return padded 2-D spectra of exposure-side arrays ``(..., H, W)``."""
    ly, lx = lengths
    return jnp.fft.fft(jnp.fft.rfft(ref, n=lx, axis=-1), n=ly, axis=-2)


def _blot_spectra(blots, lengths):
    """Return padded 2-D spectra of blot arrays ``(K, H, W)``, centred."""
    h, w = blots.shape[-2:]
    ly, lx = lengths
    cy, cx = (h - 1) // 2, (w - 1) // 2
    fb = jnp.fft.rfft(jnp.pad(blots, ((0, 0), (0, 0), (cx, lx - w - cx))), axis=-1)
    return jnp.fft.fft(jnp.pad(fb, ((0, 0), (cy, ly - h - cy), (0, 0))), axis=-2)


def _inverse_same(product, shape, lengths, extent, dtype):
    """Invert cross-power spectra ``(K, Ly, Lx/2+1)`` at the 'same' lags."""
    h, w = shape
    ly, lx = lengths
    if extent is None or extent == ((0, h), (0, w)):
        out = jnp.fft.ifft(product, axis=-2)[:, :h]
        out = jnp.fft.irfft(out, n=lx, axis=-1)[:, :, :w]
    else:
        (fy, my), (fx, mx) = extent
        rows = _inverse_dft_rows(fy, my, ly, dtype)
        cols = _inverse_dft_rows(fx, mx, lx, dtype, half=True)
        out = jnp.einsum("ky,bkl->byl", rows, product)
        out = jnp.real(jnp.einsum("byl,lx->byx", out, cols))
    return out.astype(dtype)


def _correlate_same(ref, blots, lengths, extent=None):
    """Correlate ``ref`` (H, W) with blots (K, H, W) at the 'same' lags.

    ``extent = ((first_y, count_y), (first_x, count_x))`` (static) returns
    only that window of the 'same' map, evaluated by a partial inverse DFT.
    """
    # Separable transforms that skip the all-zero padded rows: rfft along x
    # on the H data rows, then the full FFT along y; inverse along y first,
    # keeping only the H 'same' rows before the inverse along x.
    product = _blot_spectra(blots, lengths) * jnp.conj(_ref_spectra(ref, lengths))[None]
    return _inverse_same(product, ref.shape, lengths, extent, ref.dtype)


def _overlap_normalised(ref, blots, ref_valid, blot_valid, cc_type, lengths, extent):
    """NCC/ZNCC maps normalised at every lag over its own overlap.

    The masked normalised correlation of Padfield (IEEE TIP 21, 2012): with
    ``M_R``, ``M_B`` the validity masks, every lag's sums run over the pixels
    valid in both arrays, all from FFTs of the arrays, their squares and their
    masks. NCC is ``sum B R / sqrt(sum B**2 sum R**2)``, ZNCC the correlation
    coefficient of the overlapping pixels. Returns ``(maps, scale)``: the
    maps (4, H', W') and, per lag, the divisor that turned the raw sum
    ``sum B R`` into the map (the curvature of the raw sum is ``scale`` times
    that of the map near the peak).
    """
    dtype = ref.dtype
    mr = ref_valid.astype(dtype)
    mb = blot_valid.astype(dtype)
    fr = jnp.conj(_ref_spectra(jnp.stack([ref, ref * ref, mr]), lengths))
    fb = _blot_spectra(jnp.concatenate([blots, blots * blots, mb]), lengths)
    f_b, f_b2, f_mb = fb[:4], fb[4:8], fb[8:]
    fr = fr[:, None]
    products = [f_b * fr[0], f_b2 * fr[2], f_mb * fr[1]]
    if cc_type == "ZNCC":
        products += [f_b * fr[2], f_mb * fr[0], f_mb * fr[2]]
    sums = _inverse_same(jnp.concatenate(products), ref.shape, lengths, extent, dtype)
    sums = sums.reshape((len(products), 4, *sums.shape[1:]))
    cross, b2, r2 = sums[0], sums[1], sums[2]
    if cc_type == "ZNCC":
        count = jnp.maximum(jnp.round(sums[5]), 1.0)
        cross = cross - sums[3] * sums[4] / count
        b2 = b2 - sums[3] ** 2 / count
        r2 = r2 - sums[4] ** 2 / count
    den = jnp.sqrt(jnp.maximum(b2, 0) * jnp.maximum(r2, 0))
    # Lags whose overlap holds (next to) no signal in one array: no match.
    good = den > 1e-6 * jnp.max(den)
    return jnp.where(good, cross / jnp.where(good, den, 1.0), 0), jnp.where(
        good, den, 1.0
    )


def _hole_factor(ref_valid, blots, shape, lengths, extent):
    """Per-lag factor that restores the blot energy lost to bad exposure pixels.

    A bad pixel of the exposure cutout (zeroed) removes the blot's
    contribution there from the correlation, most at the lag where the
    blot's core falls on it, which pushes the peak away from the truth
    (0.1-0.2 px for a bright star crossed by a bad column). Dividing every
    lag's sum by ``sqrt(E - L(tau)) / sqrt(E)``, ``E`` the blot energy and
    ``L(tau)`` the part of it on bad pixels at that lag (the masked
    normalisation of Padfield, IEEE TIP 21, 2012, for the blot alone),
    makes the peak of an exact match the true lag again. Cutouts without
    bad pixels get a factor of exactly 1, so their maps are unchanged.
    Returns the factor, shape of the maps.
    """
    h, w = ref_valid.shape
    inside = (jnp.arange(h)[:, None] < shape[0]) & (jnp.arange(w)[None, :] < shape[1])
    holes = inside & ~ref_valid
    power = blots * blots
    energy = jnp.sum(power, axis=(-2, -1))[:, None, None]
    lost = _correlate_same(holes.astype(blots.dtype), power, lengths, extent)
    # At most a tenfold boost where a blot lies almost wholly on bad pixels.
    kept = jnp.clip(energy - lost, 0.01 * energy, energy)
    factor = jnp.sqrt(energy / _safe(kept))
    return jnp.where(jnp.any(holes) & jnp.all(energy > 0), factor, 1.0)


def _interlace(k00, k10, k01, k11):
    *lead, h, w = k00.shape
    even = jnp.stack([k00, k10], axis=-1).reshape((*lead, h, 2 * w))
    odd = jnp.stack([k01, k11], axis=-1).reshape((*lead, h, 2 * w))
    return jnp.stack([even, odd], axis=-2).reshape((*lead, 2 * h, 2 * w))


def _lag_window(n, big):
    """Inclusive fine-grid bounds of the lags of a cutout side ``n`` in ``big``."""
    lo_p = (big - 1) // 2 - (n - 1) // 2
    return 2 * lo_p, 2 * (lo_p + n - 1) + 1


def _search_window(lo, hi, big, radius):
    """Bounds ``lo, hi`` restricted to lags within ``radius`` image px."""
    if radius is None:
        return lo, hi
    centre = (big - 1) // 2
    return (
        jnp.maximum(lo, math.ceil(2 * (centre - radius))),
        jnp.minimum(hi, math.floor(2 * (centre + radius))),
    )


def _moved(arr, corner):
    """``arr`` moved by a lag: the window at ``corner`` of ``arr`` zero-padded."""
    h, w = arr.shape
    return jax.lax.dynamic_slice(jnp.pad(arr, ((h, h), (w, w))), corner, (h, w))


def _residual_variance(moved, template, use, leverage, scale):
    """Per-pixel variance model fitted to the residuals against the template.

    A per-pixel squared residual makes the error of a single source noisy
    (a few core pixels dominate); a two-parameter variance model, constant
    plus a term proportional to the source (sky + read noise + Poisson),
    fitted to them by least squares gives a stable one. The fit of the
    position and scale absorbs part of the noise of the pixels that drive
    it; dividing each squared residual by one minus its leverage (HC2)
    removes that underestimate (~20% in variance here). Returns the
    model's ``(constant, slope)``: the variance is ``constant + slope *
    |scale * template|``.
    """
    resid2 = jnp.where(use, (moved - scale * template) ** 2, 0)
    resid2 = resid2 / jnp.clip(1.0 - leverage, 0.5, 1.0)
    model = jnp.where(use, jnp.abs(scale * template), 0)
    n_use = _safe(jnp.sum(use))
    m1, m2 = jnp.sum(model) / n_use, jnp.sum(model * model) / n_use
    r0, r1 = jnp.sum(resid2) / n_use, jnp.sum(resid2 * model) / n_use
    spread = m2 - m1 * m1
    slope = jnp.where(spread > 0, (r1 - m1 * r0) / _safe(spread), 0.0)
    slope = jnp.maximum(slope, 0.0)
    const = jnp.maximum(r0 - slope * m1, 0.0)
    return const, slope


def _peak_error(ref, blots, ref_valid, blot_valid, pk, lo, hi, noise=None):
    """1-sigma error of the peak lag (image px) from its curvature.

    Linearising the peak condition gives ``Cov = A^-1 G A^-1`` with ``A`` the
    Hessian of the correlation in the lag (image px) and ``G = sum_m g g^T
    var(m)`` the covariance of its gradient, ``g`` the gradient of the
    matched blot. ``var(m)`` is estimated per pixel by the squared residual
    of the exposure against the blot at the peak, moved by the sub-grid
    offset to first order (a sandwich estimate: it follows Poisson noise).
    """
    h, w = ref.shape
    # Central differences (1 px apart) on the interlaced half-pixel grid give
    # the gradient of each blot at its own sample positions.
    fine = jnp.pad(_interlace(blots[0], blots[1], blots[2], blots[3]), 1)

    def sample(a, b, dx, dy):
        return fine[1 + b + dy :: 2, 1 + a + dx :: 2][:h, :w]

    grad_x = jnp.stack(
        [sample(a, b, 1, 0) - sample(a, b, -1, 0) for a, b in HALF_PIXEL_SHIFTS]
    )
    grad_y = jnp.stack(
        [sample(a, b, 0, 1) - sample(a, b, 0, -1) for a, b in HALF_PIXEL_SHIFTS]
    )
    both = jnp.all(blot_valid, axis=0)
    near = jnp.clip(jnp.round(jnp.nan_to_num(pk.xy)).astype(jnp.int32), lo, hi)
    offset = 0.5 * (pk.xy - near)
    lag = near // 2 - jnp.array([(w - 1) // 2, (h - 1) // 2])
    which = near[0] % 2 + 2 * (near[1] % 2)
    gx, gy = grad_x[which], grad_y[which]
    corner = (h - lag[1], w - lag[0])
    moved = _moved(ref, corner)
    template = blots[which] + offset[0] * gx + offset[1] * gy
    use = _moved(ref_valid, corner) & both
    if noise is None:
        scale = jnp.sum(jnp.where(use, template * moved, 0)) / _safe(
            jnp.sum(jnp.where(use, template * template, 0))
        )
        var = jnp.where(use, (moved - scale * template) ** 2, 0)
    else:
        var = jnp.where(use, _moved(noise, corner), 0)
    sxx = jnp.sum(gx * gx * var)
    syy = jnp.sum(gy * gy * var)
    sxy = jnp.sum(gx * gy * var)
    axx, axy, ayy = (
        4.0 * pk.hessian[0, 0],
        4.0 * pk.hessian[0, 1],
        4.0 * pk.hessian[1, 1],
    )
    det = axx * ayy - axy * axy
    ixx, ixy, iyy = ayy / det, -axy / det, axx / det
    var_x = ixx * ixx * sxx + 2 * ixx * ixy * sxy + ixy * ixy * syy
    var_y = ixy * ixy * sxx + 2 * ixy * iyy * sxy + iyy * iyy * syy
    return jnp.sqrt(jnp.stack([var_x, var_y]))


def _blot_footprint(shape, h, w):
    """Blot pixels whose sample position lies inside the cutout, shape (4, H, W).

    Blot ``ab`` samples ``(i + a/2, j + b/2)``: in its last column (``a = 1``)
    or row (``b = 1``) that is half a pixel beyond the cutout's last pixel
    centre. Pairing those samples would give lag ``+1/2`` one more overlapping
    row or column than lag ``-1/2`` and bias the peak of any map that carries
    signal (a pedestal, a texture) to the cutout's edges towards ``+x, +y``;
    without them every lag ``d`` and ``-d`` overlap by the same pixel count,
    so the interlaced map of an image with itself is symmetric.
    """
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    return jnp.stack(
        [(cols < shape[1] - a) & (rows < shape[0] - b) for a, b in HALF_PIXEL_SHIFTS]
    )


def _template_at(fine, near, frac, shape):
    """Interpolate the template ``B(m + f)`` and its gradient at a fine position.

    ``fine`` is the interlaced map (2H, 2W) of the four blots, ``near`` the
    nearest fine-grid node ``(x, y)`` of the position and ``frac`` the
    offset from it (fine px): the ``LAGRANGE_TAPS``-point Lagrange
    polynomial of the peak fit interpolates the blot samples of the parity
    of ``near``. Returns ``(template, d/dx, d/dy)``, each (H, W), the
    derivatives per image px.
    """
    h, w = shape
    taps = LAGRANGE_TAPS
    pad = jnp.pad(fine, taps // 2)
    a, b = near[0] % 2, near[1] % 2
    zero = jnp.zeros_like(a)  # start indices of one dtype, also under x64
    # Fine [2m + b, 2q + a] holds blot a + 2b: the taps around those samples
    # only, the (H, W) outputs of that parity.
    cols = jax.lax.dynamic_slice(pad, (zero, a), (2 * h + taps - 1, 2 * w + taps - 2))

    def along_x(weights):
        return sum(weights[i] * cols[:, i : i + 2 * w - 1 : 2] for i in range(taps))

    def along_y(arr, weights):
        rows = jax.lax.dynamic_slice(arr, (b, zero), (2 * h + taps - 2, w))
        return sum(weights[j] * rows[j : j + 2 * h - 1 : 2] for j in range(taps))

    wx, dwx = lagrange_weights(jnp.nan_to_num(frac[0]), LAGRANGE_TAPS)
    wy, dwy = lagrange_weights(jnp.nan_to_num(frac[1]), LAGRANGE_TAPS)
    fx = along_x(wx)
    template = along_y(fx, wy)
    gx = 2.0 * along_y(along_x(dwx), wy)  # per image px: fine samples are 1/2 px
    gy = 2.0 * along_y(fx, dwy)
    return template, gx, gy


def _model_variance(moved, template, gx, gy, use):
    """Fit the variance model of :func:`_residual_variance` to a template fit.

    ``template`` and its gradient ``gx, gy`` are zero outside ``use``; the
    leverage is that of the fit of position and scale. Returns the
    per-pixel variance, zero outside ``use``.
    """
    mxx, mxy, myy = jnp.sum(gx * gx), jnp.sum(gx * gy), jnp.sum(gy * gy)
    det = _safe(mxx * myy - mxy * mxy)
    t2 = _safe(jnp.sum(template * template))
    leverage = (myy * gx * gx - 2 * mxy * gx * gy + mxx * gy * gy) / det
    leverage = leverage + template * template / t2
    scale = jnp.sum(template * moved) / t2
    const, slope = _residual_variance(moved, template, use, leverage, scale)
    return jnp.where(use, const + slope * jnp.abs(scale * template), 0)


def _template_error(ref, blots, ref_valid, blot_valid, xy, lo, hi, noise=None):
    """1-sigma error of a peak lag (image px) from the template at the peak.

    The peak of ``C(d) = sum_m R(m) B(m + d)`` is a least-squares estimate
    of ``d`` for the model ``R ~ a B_d``: its covariance is the sandwich
    ``M^-1 (sum_m g g^T var(m)) M^-1 / a**2`` with ``g`` the gradient of the
    template ``B_d``, ``M = sum_m g g^T`` (the expected curvature, free of
    the map's noise) and ``var(m)`` the squared residual of the exposure
    against ``a B_d``. ``B_d`` and ``g`` are interpolated from the
    interlaced blots at the exact peak position with the Lagrange
    polynomial of the peak fit (:func:`_template_at`), so the residuals hold
    noise, not the template's own interpolation error, even at high S/N.
    """
    h, w = ref.shape
    fine = _interlace(blots[0], blots[1], blots[2], blots[3])
    near = jnp.clip(jnp.round(jnp.nan_to_num(xy)).astype(jnp.int32), lo, hi)
    template, gx, gy = _template_at(fine, near, (xy - near).astype(ref.dtype), (h, w))
    lag = near // 2 - jnp.array([(w - 1) // 2, (h - 1) // 2])
    corner = (h - lag[1], w - lag[0])
    moved = _moved(ref, corner)
    use = _moved(ref_valid, corner) & jnp.all(blot_valid, axis=0)
    template = jnp.where(use, template, 0)
    gx = jnp.where(use, gx, 0)
    gy = jnp.where(use, gy, 0)
    t2 = _safe(jnp.sum(template * template))
    scale = jnp.sum(template * moved) / t2
    mxx, mxy, myy = jnp.sum(gx * gx), jnp.sum(gx * gy), jnp.sum(gy * gy)
    det = mxx * myy - mxy * mxy
    det = jnp.where(det > 0, det, jnp.nan)
    if noise is None:
        var = _model_variance(moved, template, gx, gy, use)
    else:
        var = jnp.where(use, _moved(noise, corner), 0)
    sxx = jnp.sum(gx * gx * var)
    syy = jnp.sum(gy * gy * var)
    sxy = jnp.sum(gx * gy * var)
    det = det * scale
    ixx, ixy, iyy = myy / det, -mxy / det, mxx / det
    var_x = ixx * ixx * sxx + 2 * ixx * ixy * sxy + ixy * ixy * syy
    var_y = ixy * ixy * sxx + 2 * ixy * iyy * sxy + iyy * iyy * syy
    return jnp.sqrt(jnp.stack([var_x, var_y]))


def _template_fit(ref, blots, ref_valid, blot_valid, xy, bounds, allowed, noise):
    """Weighted least-squares lag of the interlaced template (``peak_fit='template'``).

    The correlation peak is the unweighted least-squares fit of ``R ~ a
    B_d``; under source-dominated (Poisson) noise it loses information
    (1.2-1.3x the Cramér-Rao bound), and pixels whose template is cut by
    the blot's edge (a Moffat wing at high S/N) pull it. Here one
    Gauss-Newton step from the Lagrange peak ``xy`` (fine px) minimises
    ``sum_m w(m) (R(m - lag) - a B(m + f))**2`` over ``(a, f)`` with ``w = 1
    / var`` (the start's error is far below a pixel: a second step changed
    no RMS of the standard cases by more than 0.01x the bound), the
    template and its gradient interpolated as in :func:`_template_at`, over
    the pixels whose interpolation stencil lies wholly on valid blot
    samples (so the template is exact there, not cut by the zero padding).
    Without ``noise`` (the exposure's variances) the fit is unweighted.
    Returns ``(xy, sigma, ok)``: the fitted position, its errors (image px;
    the sandwich of the fit with ``var`` the noise or, without it, the
    variance model of :func:`_residual_variance`, which is the Fisher
    matrix's when weighted; at ``xy``) and whether the fit is ``allowed``
    and its step within half an image pixel; otherwise ``xy`` is returned.
    ``bounds = (lo, hi)`` is the lag window (fine px).
    """
    h, w = ref.shape
    dtype = ref.dtype
    lo, hi = bounds
    fine = _interlace(blots[0], blots[1], blots[2], blots[3])
    # Fine samples whose whole stencil is valid (an erosion of the interlaced
    # validity), then per blot: blot a + 2b holds fine [2m + b, 2q + a].
    taps = LAGRANGE_TAPS
    valid = jnp.pad(_interlace(*blot_valid).astype(dtype), taps // 2)
    valid = sum(valid[:, i : i + 2 * w] for i in range(taps))
    valid = sum(valid[j : j + 2 * h] for j in range(taps)) > taps * taps - 0.5
    stencil_ok = jnp.stack([valid[b::2, a::2] for a, b in HALF_PIXEL_SHIFTS])
    centre = jnp.array([(w - 1) // 2, (h - 1) // 2])
    start = jnp.nan_to_num(xy).astype(dtype)
    near = jnp.clip(jnp.round(start).astype(jnp.int32), lo, hi)
    template, gx, gy = _template_at(fine, near, start - near, (h, w))
    which = near[0] % 2 + 2 * (near[1] % 2)
    corner = (h - (near[1] // 2 - centre[1]), w - (near[0] // 2 - centre[0]))
    moved = _moved(ref, corner)
    use = _moved(ref_valid, corner) & stencil_ok[which]
    t = jnp.where(use, template, 0)
    gx, gy = jnp.where(use, gx, 0), jnp.where(use, gy, 0)
    if noise is not None:
        var = _moved(noise, corner)
    else:
        var = _model_variance(moved, t, gx, gy, use)
    good = use & (var > 0)
    if noise is None:
        # Unweighted: the two-parameter variance model of one source is
        # too noisy for weights (its constant often fits to 0).
        wgt = use.astype(dtype)
    else:
        wgt = jnp.where(good, 1.0 / jnp.where(good, var, 1.0), 0)
    stt = _safe(jnp.sum(wgt * t * t))
    amp = jnp.sum(wgt * t * moved) / stt
    resid = moved - amp * t
    g = jnp.stack([gx, gy])
    sgt = jnp.einsum("yx,iyx->i", wgt * t, g)
    # Gradients with the amplitude's direction projected out.
    g = g - (sgt / stt)[:, None, None] * t[None]
    sgg = jnp.einsum("yx,iyx,jyx->ij", wgt, g, g)
    sgr = jnp.einsum("yx,iyx->i", wgt * resid, g)
    det = sgg[0, 0] * sgg[1, 1] - sgg[0, 1] ** 2
    ok = (det > 0) & (sgg[0, 0] > 0) & (amp > 0)
    inv = jnp.stack(
        [jnp.stack([sgg[1, 1], -sgg[0, 1]]), jnp.stack([-sgg[0, 1], sgg[0, 0]])]
    ) / jnp.where(ok, det, 1.0)
    step = (inv @ sgr) / jnp.where(ok, amp, 1.0)  # image px
    # Sandwich covariance; the Fisher matrix inv / amp**2 when wgt = 1/var.
    meat = jnp.einsum("yx,iyx,jyx->ij", wgt * wgt * jnp.where(good, var, 0), g, g)
    sigma = jnp.sqrt(jnp.diagonal(inv @ meat @ inv)) / jnp.abs(amp)
    sigma = jnp.where(ok, sigma, jnp.nan)

    ok = allowed & ok & jnp.all(jnp.abs(step) <= 0.5) & jnp.all(jnp.isfinite(step))
    return jnp.where(ok, start + 2.0 * step, xy), sigma, ok


_FIT_FAILED = int(
    PeakFlag.NO_MAXIMUM
    | PeakFlag.TOO_FEW_POINTS
    | PeakFlag.VERTEX_OUTSIDE
    | PeakFlag.NONFINITE
)


#: Narrowest peak (squared Gaussian width in half-pixel map units) that the
#: Lagrange polynomial interpolates better than the quadratic fits: measured
#: crossover between Gaussian PSFs of sigma 0.6 px (width^2 ~3.6, polynomial
#: 0.027 px RMS vs quadratic 0.017 px at S/N 1000) and 0.7 px (~4.7, 0.0095
#: vs 0.0125 px); both are far from the bound for such undersampled
#: sources, for which refinement through the blot is the answer.
_MIN_LAGRANGE_WIDTH2 = 4.0
#: Widest such peak: beyond it the quadratic's grid locking is below 1e-5 px
#: while the polynomial, which does not average, follows float32 rounding
#: of the map (a flat NCC peak on a large pedestal: 1.3e-4 px instead of
#: 1e-6 px for an image correlated with itself).
_MAX_LAGRANGE_WIDTH2 = 64.0


def _lagrange_refine(pk, kmaps, guess, lo, hi, rows_extent, cols_extent):
    """Replace the quadratic vertex by the interpolating polynomial's maximum.

    Kept only when the quadratic fit succeeded, the ``LAGRANGE_TAPS`` box
    centred on the argmax lies inside the lag window, the polynomial has a
    maximum within one map pixel of the argmax and the peak is neither so
    narrow (an undersampled source) that a polynomial cannot follow it nor
    so flat that the quadratic does not lock; otherwise ``pk`` stays.
    Returns ``(pk, used)``.
    """
    (fy, my), (fx, mx) = rows_extent, cols_extent
    half = LAGRANGE_TAPS // 2
    taps = jnp.arange(LAGRANGE_TAPS) - half
    cols = jnp.clip(guess[0] + taps, 2 * fx, 2 * (fx + mx) - 1)
    rows = jnp.clip(guess[1] + taps, 2 * fy, 2 * (fy + my) - 1)
    which = (cols % 2)[None, :] + 2 * (rows % 2)[:, None]
    box = kmaps[which, (rows // 2 - fy)[:, None], (cols // 2 - fx)[None, :]]
    uv, height, hessian, ok = lagrange_peak(box, pk.xy - guess)
    inside = jnp.all((guess - lo >= half) & (hi - guess >= half))
    # Width^2 of the peak (map px^2) if it were a Gaussian, height / -f''.
    width2 = height / -jnp.diagonal(hessian)
    sampled = (height > 0) & jnp.all(
        (width2 >= _MIN_LAGRANGE_WIDTH2) & (width2 <= _MAX_LAGRANGE_WIDTH2)
    )
    use = ok & inside & sampled & ((pk.flags & _FIT_FAILED) == 0)
    return pk._replace(
        xy=jnp.where(use, guess + uv, pk.xy),
        height=jnp.where(use, height, pk.height),
        hessian=jnp.where(use, hessian, pk.hessian),
    ), use


def _measure_one(ref, blots, ref_valid, blot_valid, shape, variance, settings):
    """Displacement of one source; returns (fields..., kmaps)."""
    cc_type, fit_box, exact, radius, peak_fit, overlap = settings
    h, w = ref.shape
    dtype = ref.dtype
    if not exact:
        blot_valid = blot_valid & _blot_footprint(shape, h, w)
    finite = jnp.all(jnp.isfinite(ref) | ~ref_valid) & jnp.all(
        jnp.isfinite(blots) | ~blot_valid
    )
    ref = jnp.where(ref_valid & jnp.isfinite(ref), ref, 0)
    blots = jnp.where(blot_valid & jnp.isfinite(blots), blots, 0)
    if exact:
        blot_valid = blot_valid & (blots != 0)
    ref_n, blots_n, norm_ok, ref_scale = _normalise(
        ref, blots, ref_valid, blot_valid, cc_type
    )
    # The exposure's noise in the normalised units of the map.
    noise = None if variance is None else variance / ref_scale**2
    lagrange = peak_fit in ("lagrange", "template") and not exact
    width = max(fit_box, LAGRANGE_TAPS) if lagrange else fit_box
    (fy, my), (fx, mx) = extent = (
        _lag_extent(h, radius, width),
        _lag_extent(w, radius, width),
    )
    lengths = fft_shape((h, w))
    raw_scale = None
    if exact:
        kmaps = _correlate_same(ref_n, blots_n, lengths, extent)
        scale = None
    elif cc_type == "CC" or not overlap:
        kmaps = _correlate_same(ref_n, blots_n, lengths, extent)
        scale = None
        raw_scale = _hole_factor(ref_valid, blots_n, shape, lengths, extent)
        kmaps = kmaps * raw_scale
    else:
        kmaps, scale = _overlap_normalised(
            ref_n, blots_n, ref_valid, blot_valid, cc_type, lengths, extent
        )

    ny = jnp.clip(shape[0], 0, h)
    nx = jnp.clip(shape[1], 0, w)
    lo_y, hi_y = _lag_window(ny, h)
    lo_x, hi_x = _lag_window(nx, w)
    lo = jnp.stack([lo_x, lo_y]).astype(jnp.int32)
    hi = jnp.stack([hi_x, hi_y]).astype(jnp.int32)
    lo_y, hi_y = _search_window(lo_y, hi_y, h, radius)
    lo_x, hi_x = _search_window(lo_x, hi_x, w, radius)
    search_lo = jnp.stack([lo_x, lo_y]).astype(jnp.int32)
    search_hi = jnp.stack([hi_x, hi_y]).astype(jnp.int32)

    # Argmax on the interlaced grid without building it: fine row 2p + b,
    # fine column 2q + a of map k = a + 2b ('same'-layout p, q; the maps
    # hold rows fy .. fy + my - 1 and columns fx .. fx + mx - 1).
    fine_r = 2 * jnp.arange(fy, fy + my)[None, :] + jnp.arange(2)[:, None]
    fine_c = 2 * jnp.arange(fx, fx + mx)[None, :] + jnp.arange(2)[:, None]
    row_ok = (fine_r >= lo_y) & (fine_r <= hi_y)
    col_ok = (fine_c >= lo_x) & (fine_c <= hi_x)
    valid4 = jnp.stack(
        [row_ok[b][:, None] & col_ok[a][None, :] for a, b in HALF_PIXEL_SHIFTS]
    )
    index4 = jnp.stack(
        [
            fine_r[b][:, None] * (2 * w) + fine_c[a][None, :]
            for a, b in HALF_PIXEL_SHIFTS
        ]
    ).astype(jnp.int32)
    masked = jnp.where(valid4, kmaps, -jnp.inf)
    top = jnp.max(masked)
    index = jnp.min(jnp.where(masked == top, index4, 4 * h * w - 1))
    guess = jnp.stack([index % (2 * w), index // (2 * w)]).astype(jnp.int32)

    start = box_start(guess, lo, hi, fit_box)
    cols = jnp.clip(start[0] + jnp.arange(fit_box), 2 * fx, 2 * (fx + mx) - 1)
    rows = jnp.clip(start[1] + jnp.arange(fit_box), 2 * fy, 2 * (fy + my) - 1)
    which = (cols % 2)[None, :] + 2 * (rows % 2)[:, None]
    values = kmaps[which, (rows // 2 - fy)[:, None], (cols // 2 - fx)[None, :]]
    pk = refine_box(
        values,
        start,
        guess,
        top,
        lo,
        hi,
        exact_original=exact,
        search_lo=search_lo,
        search_hi=search_hi,
        reach=width // 2,
    )
    if lagrange:
        pk, polynomial = _lagrange_refine(pk, kmaps, guess, lo, hi, (fy, my), (fx, mx))
    template = peak_fit == "template" and not exact
    if template:
        xy, sigma, _ = _template_fit(
            ref_n, blots_n, ref_valid, blot_valid, pk.xy, (lo, hi), polynomial, noise
        )
        pk = pk._replace(xy=xy)

    centre = jnp.array([(w - 1) // 2, (h - 1) // 2], dtype=dtype)
    dxdy = 0.5 * pk.xy - centre

    if scale is None:
        r2 = jnp.sum(ref_n * ref_n)
        b2 = jnp.mean(jnp.sum(blots_n * blots_n, axis=(-2, -1)))
        quality = pk.height / jnp.sqrt(_safe(r2 * b2))
        raw = pk
        if raw_scale is not None:
            at = raw_scale[
                guess[0] % 2 + 2 * (guess[1] % 2),
                guess[1] // 2 - fy,
                guess[0] // 2 - fx,
            ]
            raw = pk._replace(hessian=pk.hessian / at)
    else:
        # The map is already a correlation coefficient; the error propagation
        # needs the curvature of the raw sum, ``scale`` times the map's.
        quality = pk.height
        at = scale[
            guess[0] % 2 + 2 * (guess[1] % 2), guess[1] // 2 - fy, guess[0] // 2 - fx
        ]
        raw = pk._replace(hessian=pk.hessian * at)
    if lagrange and not template:  # the template fit gave its own sigma
        sigma = _template_error(
            ref_n, blots_n, ref_valid, blot_valid, pk.xy, lo, hi, noise
        )
    elif not lagrange:
        sigma = _peak_error(ref_n, blots_n, ref_valid, blot_valid, raw, lo, hi, noise)

    empty = ~norm_ok | (ny < 1) | (nx < 1)
    flags = (
        pk.flags
        | jnp.where(empty, int(PeakFlag.INVALID_INPUT), 0)
        | jnp.where(finite, 0, int(PeakFlag.NONFINITE))
    ).astype(jnp.int32)
    fatal = (flags & FATAL_FLAGS) != 0
    nan = jnp.asarray(jnp.nan, dtype)
    dxdy = jnp.where(fatal, nan, dxdy).astype(dtype)
    sigma = jnp.where((flags & ~_SIGMA_OK_FLAGS) != 0, nan, sigma).astype(dtype)
    peak = jnp.where(fatal, nan, pk.height).astype(dtype)
    quality = jnp.where(fatal, nan, quality).astype(dtype)
    return dxdy, flags, sigma, peak, quality, kmaps


@functools.partial(jax.jit, static_argnames=("settings",))
def _find_displacements(refs, blots, masks, blot_masks, shapes, variances, settings):
    n, h, w = refs.shape
    inside = (jnp.arange(h)[None, :, None] < shapes[:, 0, None, None]) & (
        jnp.arange(w)[None, None, :] < shapes[:, 1, None, None]
    )
    ref_valid = masks & inside
    blot_valid = blot_masks & inside[:, None]

    def one(args):
        if variances is None:
            return _measure_one(*args, None, settings)[:5]
        return _measure_one(*args, settings)[:5]

    args = (refs, blots, ref_valid, blot_valid, shapes)
    if variances is not None:
        args = (*args, variances)
    if n <= CHUNK:
        out = jax.vmap(one)(args)
    else:
        # CHUNK sources vmapped per step of a loop (less memory, faster on CPU).
        out = jax.lax.map(one, args, batch_size=CHUNK)
    return Displacements(*out)


def find_displacements(  # noqa: PLR0913  # seed signature
    refs: jax.Array,
    blots: jax.Array,
    masks: jax.Array | None = None,
    *,
    blot_masks: jax.Array | None = None,
    shapes: jax.Array | None = None,
    cc_type: str = "NCC",
    fit_box: int = 5,
    exact_original: bool = False,
    search_radius: float | None = None,
    peak_fit: str = "template",
    overlap_normalise: bool = False,
    variances: jax.Array | None = None,
) -> Displacements:
    """Displacements of a batch of sources by interlaced cross-correlation.

    Parameters
    ----------
    refs : Array, shape (N, H, W)
        Exposure cutouts, zero-padded at the high-index end (the original's
        ``ref_image``).
    blots : Array, shape (N, 4, H, W)
        The four half-pixel blots of each source in order ``(00, 10, 01, 11)``;
        blot ``ab`` samples image position ``(i + a/2, j + b/2)``.
    masks : Array, shape (N, H, W), bool, optional
        Validity of ``refs`` pixels (True = good). Default: all good.
    blot_masks : Array, shape (N, 4, H, W), bool, optional
        Validity of blot pixels; they define the NCC/ZNCC statistics.
        Default: all good.
    shapes : Array, shape (N, 2), int, optional
        True ``(ny, nx)`` of every cutout before padding; default ``(H, W)``.
    cc_type : {'CC', 'NCC', 'ZNCC'}, optional
        Normalisation (docs/original.md §4.1), case-insensitive.
    fit_box : int, optional
        Odd side of the quadratic fit box on the interlaced grid.
    exact_original : bool, optional
        Reproduce the original exactly: blot statistics over the nonzero
        blot pixels (``blot_masks`` is combined with ``B != 0``) and the
        original peak acceptance rules (see
        :func:`subpixal_jax.core.peak.find_peak`).
    search_radius : float, optional
        Static. Search the peak only among lags with ``|dx|, |dy| <=
        search_radius`` image pixels (a square window); None searches every
        lag of each cutout. Only the lags within ``ceil(search_radius) +
        fit_box // 2`` are computed (a partial inverse DFT instead of the
        full inverse FFT); within the radius the results equal those of a
        full search.
    peak_fit : {'template', 'lagrange', 'quadratic'}, optional
        Static. Sub-pixel peak model on the interlaced grid. 'quadratic' is
        the original's least-squares quadratic in the ``fit_box`` box, whose
        vertex locks onto the half-pixel grid (an error periodic in 0.5 px,
        ~0.004 px for well-sampled sources, more for undersampled ones).
        'lagrange' starts there and moves to the maximum of the polynomial
        interpolating the ``LAGRANGE_TAPS`` x ``LAGRANGE_TAPS`` box centred
        on the argmax (see :func:`subpixal_jax.core.peak.lagrange_peak`),
        falling back to the quadratic vertex when that box leaves the lag
        window or the polynomial has no maximum near the argmax.
        'template' (default) goes on from an accepted Lagrange peak with
        one Gauss-Newton step of the least-squares fit
        ``R ~ a B_d`` of the exposure by the blots interpolated at the
        continuous lag ``d``, over the pixels whose template the cutout's
        edge does not cut, weighted by ``1 / variances`` when given: the
        maximum-likelihood position, 0.93-1.05x the Cramér-Rao bound on the
        standard cases at every S/N (the correlation peak, an unweighted
        fit, is 1.1-1.3x under source-dominated noise, and 2.2x for a
        Moffat at S/N 1000, whose wings the cutout cuts); ``sigma`` then
        comes from that fit. Ignored (quadratic) with ``exact_original``.
    overlap_normalise : bool, optional
        Static. NCC/ZNCC only: normalise every lag over its own overlap
        (masked NCC, Padfield 2012) instead of once over the whole arrays.
        It removes the pull of signal reaching the cutout edges (an image
        correlated with itself: a 512x512 texture gives 1.5e-5 px instead of
        5.6e-4 px under ZNCC, 1.0e-3 px under NCC), but the image energy in
        each overlap then changes the map from lag to lag with flux the blot
        does not model (neighbours outside a segment-masked blot): in the
        simulated end-to-end alignment it left a common shift of ~0.003 px
        that stopped convergence. Costs three (NCC) or six (ZNCC) inverse
        transforms per blot instead of one.
    variances : Array, shape (N, H, W), optional
        Noise variance of every ``refs`` pixel (exposure units squared).
        With it ``sigma`` propagates this noise through the peak condition
        (honest at any S/N); without it the noise is estimated from the
        residuals of the exposure against the matched blot, which also
        count every mismatch of the model (a segment-masked reference, a
        neighbour) as noise and overstate the error of bright sources up to
        tenfold.

    Returns
    -------
    Displacements
        ``dxdy`` (N, 2), ``flags`` (N,), ``sigma`` (N, 2), ``peak`` (N,),
        ``quality`` (N,).

    Raises
    ------
    ValueError
        For arrays of the wrong ndim or shape, an unknown ``cc_type``, a bad
        ``fit_box`` or a non-positive ``search_radius``.

    Notes
    -----
    Each source is searched only within its own lag window ``tau in [-c,
    n - 1 - c]``, ``c = (n - 1) // 2`` of its true size (docs/architecture.md §4.2), so
    padding changes no result. Sources are processed in vmapped chunks of
    :data:`CHUNK` inside one compiled call; data problems are reported in
    ``flags`` and never affect other sources. The correlation uses rFFTs of
    length ``>= n + n // 2`` per axis (see :func:`fft_shape`).

    Deviations from the original (``exact_original=False``): validity masks
    replace the "pixels equal to zero" rule, invalid image pixels are set to
    zero (ZNCC subtracts the image mean only from valid pixels), and the
    peak fit fixes the quirks listed in
    :func:`subpixal_jax.core.peak.find_peak`. The map is made symmetric:
    blot samples half a pixel beyond the cutout's last row or column are not
    used (with them lag ``+1/2`` overlaps one row or column more than
    ``-1/2``, which biased an image correlated with itself by up to 0.11 px
    towards ``+x, +y`` on a pedestal); an image equal to its reference now
    gives ``|d| < 1e-4`` px for compact sources on any pedestal, and with
    ``overlap_normalise`` also for textures reaching the cutout edges.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> y, x = jnp.mgrid[0:15, 0:15]
    >>> def g(x0, y0):
    ...     return jnp.exp(-((x - x0) ** 2 + (y - y0) ** 2) / 4.0)
    >>> ref = g(7.3, 6.8)[None]
    >>> blots = jnp.stack([g(7.0 - a / 2, 7.0 - b / 2)
    ...                    for a, b in ((0, 0), (1, 0), (0, 1), (1, 1))])[None]
    >>> out = find_displacements(ref, blots)
    >>> [round(float(v), 1) for v in out.dxdy[0]], int(out.flags[0])
    ([-0.3, 0.2], 0)
    """
    refs = jnp.asarray(refs)
    blots = jnp.asarray(blots)
    if refs.ndim != 3:
        msg = f"refs must have shape (N, H, W), got {refs.shape}"
        raise ValueError(msg)
    n, h, w = refs.shape
    if blots.shape != (n, 4, h, w):
        msg = f"blots must have shape {(n, 4, h, w)}, got {blots.shape}"
        raise ValueError(msg)
    masks = jnp.ones((n, h, w), bool) if masks is None else jnp.asarray(masks)
    if masks.shape != (n, h, w):
        msg = f"masks must have shape {(n, h, w)}, got {masks.shape}"
        raise ValueError(msg)
    if blot_masks is None:
        blot_masks = jnp.ones((n, 4, h, w), bool)
    blot_masks = jnp.asarray(blot_masks)
    if blot_masks.shape != (n, 4, h, w):
        msg = f"blot_masks must have shape {(n, 4, h, w)}, got {blot_masks.shape}"
        raise ValueError(msg)
    if shapes is None:
        shapes = jnp.broadcast_to(jnp.array([h, w], jnp.int32), (n, 2))
    shapes = jnp.asarray(shapes)
    if shapes.shape != (n, 2):
        msg = f"shapes must have shape {(n, 2)}, got {shapes.shape}"
        raise ValueError(msg)
    if variances is not None:
        variances = jnp.asarray(variances)
        if variances.shape != (n, h, w):
            msg = f"variances must have shape {(n, h, w)}, got {variances.shape}"
            raise ValueError(msg)
    cc_type = _check_cc_type(cc_type)
    check_fit_box(fit_box)
    check_peak_fit(peak_fit)
    if search_radius is not None:
        if isinstance(search_radius, bool) or not search_radius > 0:
            msg = f"search_radius must be positive or None, got {search_radius!r}"
            raise ValueError(msg)
        search_radius = float(search_radius)
    dtype = _float_dtype(refs, blots)
    return _find_displacements(
        refs.astype(dtype),
        blots.astype(dtype),
        masks.astype(bool),
        blot_masks.astype(bool),
        shapes.astype(jnp.int32),
        None if variances is None else variances.astype(dtype),
        _Settings(
            cc_type,
            fit_box,
            bool(exact_original),
            search_radius,
            peak_fit,
            bool(overlap_normalise),
        ),
    )


@functools.partial(jax.jit, static_argnames=("cc_type",))
def _cross_correlate(ref, image, ref_mask, image_mask, *, cc_type):
    lead = ref.shape[:-2]
    h, w = ref.shape[-2:]

    def one(r, b, rm, bm):
        r, b, *_ = _normalise(
            jnp.where(rm, r, 0), jnp.where(bm, b, 0)[None], rm, bm[None], cc_type
        )
        return _correlate_same(r, b, fft_shape((h, w)))[0]

    flat = [x.reshape((-1, h, w)) for x in (ref, image, ref_mask, image_mask)]
    return jax.vmap(one)(*flat).reshape((*lead, h, w))


def cross_correlate(
    ref: jax.Array,
    image: jax.Array,
    *,
    cc_type: str = "NCC",
    ref_mask: jax.Array | None = None,
    image_mask: jax.Array | None = None,
) -> jax.Array:
    """'Same'-size linear cross-correlation map, normalised as in docs/original.md §4.1.

    Parameters
    ----------
    ref : Array, shape (..., H, W)
        Exposure cutout(s) ``R``.
    image : Array, shape (..., H, W)
        Blot(s) ``B`` of the same shape.
    cc_type : {'CC', 'NCC', 'ZNCC'}, optional
        Normalisation; for NCC/ZNCC the statistics of ``B`` are over its
        valid pixels and those of ``R`` over the valid pixels of both.
    ref_mask, image_mask : Array, shape (..., H, W), bool, optional
        Validity (True = good); default all good. Invalid pixels count as 0.

    Returns
    -------
    Array, shape (..., H, W)
        ``K[c + tau] = sum_m B[m] R[m - tau]``, ``c = ((H-1)//2, (W-1)//2)``,
        with ``R`` zero outside its array (zero-padded linear correlation).

    Raises
    ------
    ValueError
        If the shapes differ, the arrays are not at least 2-D, or
        ``cc_type`` is unknown.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> r = jnp.zeros((5, 5)).at[2, 2].set(1.0)
    >>> k = cross_correlate(r, jnp.roll(r, 1, axis=1), cc_type="CC")
    >>> [int(v) for v in jnp.unravel_index(jnp.argmax(k), k.shape)]
    [2, 3]
    """
    ref = jnp.asarray(ref)
    image = jnp.asarray(image)
    if ref.ndim < 2:
        msg = f"ref must be at least 2-D, got shape {ref.shape}"
        raise ValueError(msg)
    if image.shape != ref.shape:
        msg = f"image must have the shape of ref {ref.shape}, got {image.shape}"
        raise ValueError(msg)
    masks = []
    for name, mask in (("ref_mask", ref_mask), ("image_mask", image_mask)):
        mask = jnp.ones(ref.shape, bool) if mask is None else jnp.asarray(mask)
        if mask.shape != ref.shape:
            msg = f"{name} must have shape {ref.shape}, got {mask.shape}"
            raise ValueError(msg)
        masks.append(mask.astype(bool))
    cc_type = _check_cc_type(cc_type)
    dtype = _float_dtype(ref, image)
    return _cross_correlate(
        ref.astype(dtype), image.astype(dtype), *masks, cc_type=cc_type
    )


_interlace_jit = jax.jit(_interlace)


def interlace(k00: jax.Array, k10: jax.Array, k01: jax.Array, k11: jax.Array):
    """Interlace four half-pixel correlation maps into one map twice as fine.

    Parameters
    ----------
    k00, k10, k01, k11 : Array, shape (..., H, W)
        Maps of the blots shifted by ``(a/2, b/2)``; ``ab`` = (x flag, y flag).

    Returns
    -------
    Array, shape (..., 2H, 2W)
        ``I[2p + b, 2q + a] = K_ab[p, q]``.

    Raises
    ------
    ValueError
        If the four shapes differ or the maps are not at least 2-D.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> maps = [jnp.full((1, 2), float(v)) for v in range(4)]
    >>> interlace(*maps).tolist()
    [[0.0, 1.0, 0.0, 1.0], [2.0, 3.0, 2.0, 3.0]]
    """
    maps = [jnp.asarray(k) for k in (k00, k10, k01, k11)]
    if maps[0].ndim < 2:
        msg = f"k00 must be at least 2-D, got shape {maps[0].shape}"
        raise ValueError(msg)
    for name, k in zip(("k10", "k01", "k11"), maps[1:], strict=True):
        if k.shape != maps[0].shape:
            msg = f"{name} must have the shape of k00 {maps[0].shape}, got {k.shape}"
            raise ValueError(msg)
    return _interlace_jit(*maps)


@functools.partial(
    jax.jit,
    static_argnames=("cc_type", "exact_original", "peak_fit", "overlap_normalise"),
)
def _find_displacement_full(
    ref, blots, shape, *, cc_type, exact_original, peak_fit, overlap_normalise
):
    valid = jnp.ones(ref.shape, bool)
    inside = (jnp.arange(ref.shape[0])[:, None] < shape[0]) & (
        jnp.arange(ref.shape[1])[None, :] < shape[1]
    )
    dxdy, flags, sigma, peak, quality, kmaps = _measure_one(
        ref,
        blots,
        valid & inside,
        jnp.broadcast_to(inside, blots.shape),
        shape,
        None,
        _Settings(cc_type, 5, exact_original, None, peak_fit, overlap_normalise),
    )
    icc = _interlace(kmaps[0], kmaps[1], kmaps[2], kmaps[3])
    return DisplacementMap(dxdy[0], dxdy[1], flags, sigma, peak, quality, icc, kmaps)


def find_displacement_full(  # noqa: PLR0913  # seed signature
    ref: jax.Array,
    im00: jax.Array,
    im10: jax.Array,
    im01: jax.Array,
    im11: jax.Array,
    *,
    cc_type: str = "NCC",
    exact_original: bool = False,
    shape: jax.Array | None = None,
    peak_fit: str = "template",
    overlap_normalise: bool = False,
) -> DisplacementMap:
    """Displacement of one source with the correlation maps (docs/original.md §4.3).

    Parameters
    ----------
    ref : Array, shape (H, W)
        Exposure cutout.
    im00, im10, im01, im11 : Array, shape (H, W)
        The four half-pixel blots (x flag, y flag).
    cc_type : {'CC', 'NCC', 'ZNCC'}, optional
        Normalisation (docs/original.md §4.1).
    exact_original : bool, optional
        Reproduce the original exactly (see :func:`find_displacements`).
    shape : Array, shape (2,), int, optional
        True ``(ny, nx)`` if the arrays are zero-padded; default ``(H, W)``.
        The maps keep the padded layout (lag ``tau`` at ``(H-1)//2 + tau``).
    peak_fit : {'template', 'lagrange', 'quadratic'}, optional
        Sub-pixel peak model (see :func:`find_displacements`; without
        variances the template fit is unweighted).
    overlap_normalise : bool, optional
        Per-lag normalisation of NCC/ZNCC (see :func:`find_displacements`).

    Returns
    -------
    DisplacementMap
        ``dx, dy, flags, sigma, peak, quality, icc, kmaps``.

    Raises
    ------
    ValueError
        If the arrays are not 2-D of one shape or ``cc_type`` is unknown.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> y, x = jnp.mgrid[0:12, 0:12]
    >>> g = lambda x0, y0: jnp.exp(-((x - x0) ** 2 + (y - y0) ** 2) / 4.0)
    >>> out = find_displacement_full(g(5.5, 6.0), g(6.0, 6.0), g(5.5, 6.0),
    ...                              g(6.0, 5.5), g(5.5, 5.5))
    >>> round(float(out.dx), 2), round(float(out.dy), 2), out.icc.shape
    (0.5, 0.0, (24, 24))
    """
    ref = jnp.asarray(ref)
    if ref.ndim != 2:
        msg = f"ref must be 2-D, got shape {ref.shape}"
        raise ValueError(msg)
    blots = [jnp.asarray(b) for b in (im00, im10, im01, im11)]
    for name, b in zip(("im00", "im10", "im01", "im11"), blots, strict=True):
        if b.shape != ref.shape:
            msg = f"{name} must have the shape of ref {ref.shape}, got {b.shape}"
            raise ValueError(msg)
    shape = jnp.array(ref.shape) if shape is None else jnp.asarray(shape)
    if shape.shape != (2,):
        msg = f"shape must be (ny, nx), got an array of shape {shape.shape}"
        raise ValueError(msg)
    cc_type = _check_cc_type(cc_type)
    check_peak_fit(peak_fit)
    dtype = _float_dtype(ref, *blots)
    return _find_displacement_full(
        ref.astype(dtype),
        jnp.stack(blots).astype(dtype),
        shape.astype(jnp.int32),
        cc_type=cc_type,
        exact_original=bool(exact_original),
        peak_fit=peak_fit,
        overlap_normalise=bool(overlap_normalise),
    )


def find_displacement(
    ref: jax.Array,
    im00: jax.Array,
    im10: jax.Array,
    im01: jax.Array,
    im11: jax.Array,
    *,
    cc_type: str = "NCC",
    exact_original: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Displacement ``(dx, dy)`` of one source (the original's signature).

    Parameters
    ----------
    ref : Array, shape (H, W)
        Exposure cutout.
    im00, im10, im01, im11 : Array, shape (H, W)
        The four half-pixel blots.
    cc_type : {'CC', 'NCC', 'ZNCC'}, optional
        Normalisation (docs/original.md §4.1).
    exact_original : bool, optional
        Reproduce the original exactly (see :func:`find_displacements`).

    Returns
    -------
    dx, dy : Array, shape ()
        Source position in ``im00`` minus its position in ``ref`` (image
        px); NaN for invalid input. Use :func:`find_displacement_full` for
        flags and maps.

    Raises
    ------
    ValueError
        As :func:`find_displacement_full`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> y, x = jnp.mgrid[0:12, 0:12]
    >>> g = lambda x0, y0: jnp.exp(-((x - x0) ** 2 + (y - y0) ** 2) / 4.0)
    >>> dx, dy = find_displacement(g(6.0, 5.0), g(6.0, 6.0), g(5.5, 6.0),
    ...                            g(6.0, 5.5), g(5.5, 5.5))
    >>> round(float(dx), 2), round(float(dy), 2)
    (0.0, 1.0)
    """
    out = find_displacement_full(
        ref, im00, im10, im01, im11, cc_type=cc_type, exact_original=exact_original
    )
    return out.dx, out.dy

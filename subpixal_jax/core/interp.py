"""Separable interpolation of 2-D arrays at arbitrary positions.

The kernels reproduce the ones of drizzle's blot (``drizzle.resample.blot_image``,
formerly drizzlepac's ``cdriz.tblot``; docs/original.md §3.1) and are differentiable
with
respect to both the data and the sample coordinates, which
``jax.scipy.ndimage.map_coordinates`` (order <= 1) cannot offer.

Conventions
-----------
* Coordinates are ``(x, y)`` = (column, row), 0-based, pixel centres at integer
  values; ``data`` is indexed ``[y, x]``.
* A sample is *in range* when ``0 <= x < W`` and ``0 <= y < H`` (``data`` of shape
  ``(H, W)``). This is drizzle 3.0's bound: the lower bound is inclusive, the upper
  one strict, and it is measured against the array size, not the last pixel
  centre, so positions up to half a pixel beyond the last centre are
  interpolated. Non-finite coordinates are out of range. Out-of-range samples
  return the fill value (drizzle raises on NaN coordinates instead).
* Validity masks are ``True`` for good pixels.

Kernels
-------
Every kernel is a tensor product of a 1-D kernel with ``T`` taps at integer
offsets ``lo .. lo + T - 1`` from ``floor(x)`` (``floor(x + 0.5)`` for nearest):

============  ====  ============  ================================================
kind          T     offsets       1-D weights (``s = x - floor(x)``)
============  ====  ============  ================================================
``nearest``   1     0             1, at ``floor(x + 0.5)``
``linear``    2     0..1          ``1 - s, s``
``poly3``     4     -1..2         cubic Lagrange through the 4 samples
``poly5``     6     -2..3         quintic Lagrange through the 6 samples (default)
``lanczos3``  6     -2..3         ``sinc(d) sinc(d / 3)``, ``d`` = tap distance
``lanczos5``  10    -4..5         ``sinc(d) sinc(d / 5)``
============  ====  ============  ================================================

drizzle writes poly3/poly5 in Everett's central-difference form; that is the same
polynomial as the Lagrange form used here (docs/original.md §3.1), so the two agree to
rounding. Lanczos weights are not renormalised (as in drizzle), so a constant
image interpolates to the constant times ``sum(w)``, which ripples by up to about
1e-3 (lanczos3) between pixel centres.

Boundaries
----------
Taps beyond the array edge are synthesised, never fetched from outside:

* ``nearest`` and ``linear`` repeat the edge pixel. For ``linear`` this is
  exactly drizzle's behaviour (interpolation along one axis only in the last
  row/column, the corner pixel value at the corner). drizzle's nearest reads
  past the end of the row (the first pixel of the next row, or unrelated memory
  past the last row) when ``x + 0.5 >= W``; here the index is clamped to the edge.
* ``poly3``, ``poly5`` and the Lanczos kernels use odd reflection,
  ``f(-k) = 2 f(0) - f(k)`` and ``f(n - 1 + k) = 2 f(n - 1) - f(n - 1 - k)``, on both
  axes. drizzle does the same except for an upstream quirk at the top edge of
  the poly kernels (one reflected row is replaced by a raw data row), which is
  not copied, so results differ from drizzle for ``y > H - 3`` (poly5) and
  ``y > H - 1`` (poly3), and agree to rounding everywhere else.
  drizzle 3.0's Lanczos kernels come from a look-up table that is not
  interpolating (weight 8e-4 at distance 1 for lanczos3) and deviates from the
  exact kernel by up to about 3e-3; the kernels here are exact.

A sample is *valid* when it is in range and every pixel its kernel footprint
reads (the ``T x T`` taps, including the pixels that reflected taps are made
from) is finite and marked valid. Invalid or non-finite pixels are replaced by 0
before interpolating, so a NaN never spreads beyond the footprints that contain
it.

Precision: tap positions and fractions are computed in the coordinate dtype;
the fractions (in [0, 1)) are then cast to the data dtype, in which the weights
are computed and the weighted sums accumulate (e.g. float64 pixmaps with
float32 images under ``jax.enable_x64(True)``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class _Kernel(NamedTuple):
    """Static description of one separable kernel."""

    taps: int  # number of taps per axis
    lo: int  # offset of the first tap from the base index
    shift: float  # base index = floor(x + shift)
    pad_mode: str  # jnp.pad mode used to synthesise taps beyond the edge


#: The supported interpolation kinds and their static tap layout.
KERNELS: dict[str, _Kernel] = {
    "nearest": _Kernel(1, 0, 0.5, "edge"),
    "linear": _Kernel(2, 0, 0.0, "edge"),
    "poly3": _Kernel(4, -1, 0.0, "odd"),
    "poly5": _Kernel(6, -2, 0.0, "odd"),
    "lanczos3": _Kernel(6, -2, 0.0, "odd"),
    "lanczos5": _Kernel(10, -4, 0.0, "odd"),
}


def check_kind(kind: str, *, name: str = "kind") -> _Kernel:
    """Return the kernel description of ``kind`` or raise ``ValueError``.

    Parameters
    ----------
    kind : str
        Interpolation kind, one of the keys of `KERNELS`.
    name : str, optional
        Parameter name used in the error message.

    Returns
    -------
    _Kernel
        Number of taps, first offset, rounding shift and padding mode.

    Raises
    ------
    ValueError
        If ``kind`` is not a supported kind.

    Examples
    --------
    >>> check_kind("poly5").taps
    6
    """
    if not isinstance(kind, str) or kind not in KERNELS:
        msg = f"{name} must be one of {sorted(KERNELS)}, got {kind!r}"
        raise ValueError(msg)
    return KERNELS[kind]


def _lagrange_weights(s: jax.Array, lo: int, taps: int) -> list[jax.Array]:
    """Lagrange basis weights at fraction ``s`` for nodes ``lo .. lo + taps - 1``."""
    nodes = list(range(lo, lo + taps))
    diffs = [s - m for m in nodes]
    # prefix[k] = prod_{m < k} diffs[m]; suffix[k] = prod_{m > k} diffs[m]
    prefix = [None] * taps
    suffix = [None] * taps
    acc = None
    for k in range(taps):
        prefix[k] = acc
        acc = diffs[k] if acc is None else acc * diffs[k]
    acc = None
    for k in reversed(range(taps)):
        suffix[k] = acc
        acc = diffs[k] if acc is None else acc * diffs[k]
    weights = []
    for k, node in enumerate(nodes):
        denom = 1.0
        for m in nodes:
            if m != node:
                denom *= node - m
        parts = [p for p in (prefix[k], suffix[k]) if p is not None]
        prod = parts[0] * parts[1] if len(parts) == 2 else parts[0]
        weights.append(prod * (1.0 / denom))
    return weights


def _weights(kind: str, s: jax.Array) -> list[jax.Array]:
    """1-D tap weights of ``kind`` at fraction ``s`` (same dtype as ``s``)."""
    kernel = KERNELS[kind]
    if kind == "nearest":
        return [jnp.ones_like(s)]
    if kind == "linear":
        return [1.0 - s, s]
    if kind in ("poly3", "poly5"):
        return _lagrange_weights(s, kernel.lo, kernel.taps)
    order = 3 if kind == "lanczos3" else 5
    return [
        jnp.sinc(s - k) * jnp.sinc((s - k) / order)
        for k in range(kernel.lo, kernel.lo + kernel.taps)
    ]


def _pad_widths(kernel: _Kernel) -> tuple[int, int]:
    """Rows/columns to add below and above so every in-range tap is inside."""
    low = -kernel.lo
    # base <= n - 1 (n for nearest, whose base is floor(x + 0.5) with x < n)
    high = kernel.lo + kernel.taps - 1 + (1 if kernel.shift else 0)
    return low, high


def _pad(data: jax.Array, valid: jax.Array, kernel: _Kernel):
    """Pad data (synthesised taps) and validity (the pixels they are made of)."""
    low, high = _pad_widths(kernel)
    widths = ((low, high), (low, high))
    if kernel.pad_mode == "edge":
        return jnp.pad(data, widths, mode="edge"), jnp.pad(valid, widths, mode="edge")
    # An odd-reflected tap 2 f(edge) - f(mirror) depends on the mirror pixel and on
    # the edge pixel; the edge pixel is always one of the footprint's own taps.
    padded = jnp.pad(data, widths, mode="reflect", reflect_type="odd")
    return padded, jnp.pad(valid, widths, mode="reflect")


def _window_all(valid: jax.Array, taps: int) -> jax.Array:
    """``out[i, j]`` = all of ``valid[i:i+taps, j:j+taps]`` (separable AND)."""
    if taps == 1:
        return valid
    rows, cols = valid.shape
    acc = valid[:, : cols - taps + 1]
    for k in range(1, taps):
        acc = acc & valid[:, k : cols - taps + 1 + k]
    out = acc[: rows - taps + 1, :]
    for k in range(1, taps):
        out = out & acc[k : rows - taps + 1 + k, :]
    return out


def sample(
    data: jax.Array,
    x: jax.Array,
    y: jax.Array,
    data_valid: jax.Array | None,
    kind: str,
) -> tuple[jax.Array, jax.Array]:
    """Traceable core of the interpolation (no jit, no argument checks).

    Parameters
    ----------
    data : Array, shape (H, W), floating
        Image to sample.
    x, y : Array, same shape, floating
        Sample positions (column, row).
    data_valid : Array, shape (H, W), bool, or None
        Good pixels; None means every pixel (non-finite pixels are always bad).
    kind : str
        A key of `KERNELS` (not validated here).

    Returns
    -------
    values : Array, shape of ``x``, dtype of ``data``
        Interpolated values; 0 where ``valid`` is False.
    valid : Array, shape of ``x``, bool
        In range and with a good footprint.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> v, ok = sample(jnp.ones((4, 4)), jnp.array([1.5]), jnp.array([2.0]), None,
    ...                "linear")
    >>> float(v[0]), bool(ok[0])
    (1.0, True)
    """
    kernel = KERNELS[kind]
    taps = _taps(data, x, y, data_valid, kernel)
    # Fractions in [0, 1) lose nothing that matters in the data dtype, and the
    # weights are cheaper there (float32 weights for float64 pixmaps).
    wx = _weights(kind, taps.frac_x.astype(data.dtype))
    wy = _weights(kind, taps.frac_y.astype(data.dtype))
    total = _tensor_sum(taps, wx, wy)
    return jnp.where(taps.valid, total, jnp.zeros((), data.dtype)), taps.valid


def _tensor_sum(taps, wx, wy) -> jax.Array:
    """``sum_ty wy[ty] sum_tx wx[tx] tap(tx, ty)``, rows summed first."""
    total = None
    for ty, w_row in enumerate(wy):
        row = None
        for tx, w in enumerate(wx):
            term = w * taps.gather(tx, ty)
            row = term if row is None else row + term
        term = w_row * row
        total = term if total is None else total + term
    return total


def sample_with_gradient(
    data: jax.Array,
    x: jax.Array,
    y: jax.Array,
    data_valid: jax.Array | None,
    kind: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Interpolated values and their ``x`` and ``y`` derivatives in one pass.

    The same samples as :func:`sample` (0 where invalid), with the
    derivatives taken from the derivatives of the 1-D tap weights, so the
    taps are gathered once for all three outputs (used for the one-pass
    Jacobians of the refinement).

    Parameters
    ----------
    data, x, y, data_valid, kind
        As in :func:`sample`.

    Returns
    -------
    values, d_x, d_y : Array, shape of ``x``, dtype of ``data``
        Values and their derivatives along x and y; 0 where invalid.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> ramp = jnp.broadcast_to(2.0 * jnp.arange(8.0), (8, 8))
    >>> v, dx, dy = sample_with_gradient(ramp, jnp.array([3.3]), jnp.array([4.0]),
    ...                                  None, "poly5")
    >>> round(float(v[0]), 6), round(float(dx[0]), 6), round(float(dy[0]), 6)
    (6.6, 2.0, 0.0)
    """
    kernel = KERNELS[kind]
    taps = _taps(data, x, y, data_valid, kernel)

    def weights_and_slopes(frac):
        frac = frac.astype(data.dtype)
        return jax.jvp(
            functools.partial(_weights, kind), (frac,), (jnp.ones_like(frac),)
        )

    wx, dwx = weights_and_slopes(taps.frac_x)
    wy, dwy = weights_and_slopes(taps.frac_y)
    value = d_x = d_y = jnp.zeros(x.shape, data.dtype)
    for ty in range(kernel.taps):
        row = row_dx = jnp.zeros(x.shape, data.dtype)
        for tx in range(kernel.taps):
            tap = taps.gather(tx, ty)
            row = row + wx[tx] * tap
            row_dx = row_dx + dwx[tx] * tap
        value = value + wy[ty] * row
        d_x = d_x + wy[ty] * row_dx
        d_y = d_y + dwy[ty] * row
    zero = jnp.zeros((), data.dtype)
    return (
        jnp.where(taps.valid, value, zero),
        jnp.where(taps.valid, d_x, zero),
        jnp.where(taps.valid, d_y, zero),
    )


def sample_variance(
    variance: jax.Array,
    x: jax.Array,
    y: jax.Array,
    data_valid: jax.Array | None,
    kind: str,
) -> jax.Array:
    """Noise variance of :func:`sample`'s values for independent pixel noise.

    ``sum_k w_k**2 * variance_k`` over the taps of every sample, with the
    same weights as :func:`sample` (differentiable in ``x`` and ``y``): the
    interpolated noise is smallest where the weights are spread (near the
    half pixel for the polynomial kernels), largest at pixel centres.

    Parameters
    ----------
    variance : Array, shape (H, W), floating
        Per-pixel noise variance of the sampled data.
    x, y, data_valid, kind
        As in :func:`sample`.

    Returns
    -------
    Array, shape of ``x``, dtype of ``variance``
        Variance of each sample; 0 where the sample is invalid. Taps beyond
        the edge take the edge pixel's variance (an approximation of the
        odd-reflected taps' ``2 f(0) - f(k)``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> var = jnp.ones((8, 8))
    >>> v = sample_variance(var, jnp.array([3.0, 3.5]), jnp.array([4.0, 4.0]),
    ...                     None, "linear")
    >>> [round(float(a), 3) for a in v]
    [1.0, 0.5]
    """
    kernel = KERNELS[kind]
    taps = _taps(variance, x, y, data_valid, kernel._replace(pad_mode="edge"))
    wx = [w * w for w in _weights(kind, taps.frac_x.astype(variance.dtype))]
    wy = [w * w for w in _weights(kind, taps.frac_y.astype(variance.dtype))]
    total = _tensor_sum(taps, wx, wy)
    return jnp.where(taps.valid, total, jnp.zeros((), variance.dtype))


class _Taps(NamedTuple):
    """Where the taps of every sample are, shared by the samplers."""

    flat: jax.Array  # padded data, flattened
    base: jax.Array  # flat index of each sample's first tap
    width: int  # padded row length
    frac_x: jax.Array  # fractional offsets from the first tap
    frac_y: jax.Array
    valid: jax.Array  # in range and a good footprint

    def gather(self, tx: int, ty: int) -> jax.Array:
        """Tap ``(tx, ty)`` of every sample, shaped like the samples."""
        index = self.base + (ty * self.width + tx)
        tap = self.flat.at[index.reshape(-1)].get(mode="promise_in_bounds")
        return tap.reshape(self.base.shape)


def _taps(data, x, y, data_valid, kernel: _Kernel) -> _Taps:
    """Pad ``data`` for ``kernel`` and locate the taps of every sample."""
    height, width = data.shape
    good = jnp.isfinite(data)
    if data_valid is not None:
        good = good & data_valid
    clean = jnp.where(good, data, jnp.zeros((), data.dtype))
    padded, pvalid = _pad(clean, good, kernel)
    footprint_ok = _window_all(pvalid, kernel.taps)
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    # Out-of-range (and NaN) positions are replaced before any arithmetic so that
    # neither values nor gradients see them.
    xs = jnp.where(inside, x, jnp.zeros((), x.dtype))
    ys = jnp.where(inside, y, jnp.zeros((), y.dtype))
    fx = jnp.floor(xs + kernel.shift)
    fy = jnp.floor(ys + kernel.shift)
    ix = fx.astype(jnp.int32)
    iy = fy.astype(jnp.int32)
    valid = inside & footprint_ok.reshape(-1).at[
        (iy * footprint_ok.shape[1] + ix).reshape(-1)
    ].get(mode="promise_in_bounds").reshape(x.shape)
    return _Taps(
        flat=padded.reshape(-1),
        base=iy * padded.shape[1] + ix,
        width=padded.shape[1],
        frac_x=xs - fx,
        frac_y=ys - fy,
        valid=valid,
    )


def _as_float(value, name: str) -> jax.Array:
    """Convert to a JAX array with a floating dtype."""
    arr = jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        if jnp.issubdtype(arr.dtype, jnp.complexfloating):
            msg = f"{name} must be real, got dtype {arr.dtype}"
            raise ValueError(msg)
        arr = arr.astype(jnp.result_type(float))
    return arr


def check_data(data, data_valid, *, name: str = "data", ndim: int = 2):
    """Validate ``data`` (and its validity mask) and convert them to arrays.

    Parameters
    ----------
    data : array_like
        Image(s) with ``ndim`` dimensions; non-floating dtypes become floating.
    data_valid : array_like of bool or None
        Mask of good pixels with the shape of ``data``.
    name : str, optional
        Name of the data parameter, used in error messages.
    ndim : int, optional
        Required number of dimensions.

    Returns
    -------
    data : Array
    data_valid : Array of bool or None

    Raises
    ------
    ValueError
        If a dimension or shape does not match.

    Examples
    --------
    >>> d, v = check_data([[1, 2], [3, 4]], None)
    >>> d.dtype.kind, v is None
    ('f', True)
    """
    data = _as_float(data, name)
    if data.ndim != ndim:
        msg = f"{name} must be {ndim}-D, got shape {data.shape}"
        raise ValueError(msg)
    if data_valid is not None:
        data_valid = jnp.asarray(data_valid)
        if data_valid.shape != data.shape:
            msg = (
                f"{name}_valid must have the shape of {name} {data.shape}, "
                f"got {data_valid.shape}"
            )
            raise ValueError(msg)
        data_valid = data_valid.astype(bool)
    return data, data_valid


def check_coordinates(x, y) -> tuple[jax.Array, jax.Array]:
    """Validate sample coordinates and convert them to floating arrays.

    Parameters
    ----------
    x, y : array_like
        Column and row positions with the same shape.

    Returns
    -------
    x, y : Array
        Floating arrays (integer input becomes the default float dtype).

    Raises
    ------
    ValueError
        If the shapes differ.

    Examples
    --------
    >>> x, y = check_coordinates([1, 2], [0.5, 0.5])
    >>> x.dtype.kind
    'f'
    """
    x = _as_float(x, "x")
    y = _as_float(y, "y")
    if x.shape != y.shape:
        msg = f"x and y must have the same shape, got x {x.shape} and y {y.shape}"
        raise ValueError(msg)
    return x, y


@functools.partial(jax.jit, static_argnames=("kind",))
def _interpolate(data, x, y, data_valid, fillval, kind):
    values, valid = sample(data, x, y, data_valid, kind)
    return jnp.where(valid, values, jnp.asarray(fillval, data.dtype)), valid


def interpolate_with_validity(
    data,
    x,
    y,
    *,
    kind: str = "poly5",
    fillval: float = 0.0,
    data_valid=None,
) -> tuple[jax.Array, jax.Array]:
    """Interpolate ``data`` at ``(x, y)`` and report which samples are valid.

    Parameters
    ----------
    data : array_like, shape (H, W)
        Image, indexed ``[y, x]``.
    x, y : array_like, same shape
        0-based sample positions (column, row), any shape.
    kind : str, optional
        ``'nearest'``, ``'linear'``, ``'poly3'``, ``'poly5'`` (default),
        ``'lanczos3'`` or ``'lanczos5'``; see the module notes.
    fillval : float, optional
        Value of invalid samples.
    data_valid : array_like of bool, shape (H, W), optional
        Good pixels (True). Non-finite pixels are always bad.

    Returns
    -------
    values : Array, shape of ``x``, dtype of ``data``
        Interpolated values, ``fillval`` where ``valid`` is False.
    valid : Array, shape of ``x``, bool
        True where the sample is in range (``0 <= x < W``, ``0 <= y < H``) and
        every pixel of its kernel footprint is good.

    Raises
    ------
    ValueError
        If ``kind`` is unknown, ``data`` is not 2-D, or shapes disagree.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.arange(16.0).reshape(4, 4)
    >>> v, ok = interpolate_with_validity(data, jnp.array([1.5, 9.0]),
    ...                                   jnp.array([2.0, 0.0]))
    >>> v.tolist(), ok.tolist()
    ([9.5, 0.0], [True, False])
    """
    check_kind(kind)
    data, data_valid = check_data(data, data_valid)
    x, y = check_coordinates(x, y)
    return _interpolate(data, x, y, data_valid, fillval, kind)


def interpolate(data, x, y, *, kind: str = "poly5", fillval: float = 0.0) -> jax.Array:
    """Interpolate a 2-D array at arbitrary ``(x, y)`` positions.

    Differentiable with respect to ``data`` and to ``x`` and ``y`` (the
    derivative of the interpolating piecewise polynomial; one-sided at integer
    positions where the kernel is only continuous). ``nearest`` has zero
    coordinate gradient.

    Parameters
    ----------
    data : array_like, shape (H, W)
        Image, indexed ``[y, x]``. Non-finite pixels are masked: samples whose
        kernel footprint contains one return ``fillval``.
    x, y : array_like, same shape
        0-based sample positions (column, row), any shape.
    kind : str, optional
        ``'nearest'``, ``'linear'``, ``'poly3'``, ``'poly5'`` (default),
        ``'lanczos3'`` or ``'lanczos5'``; see the module notes.
    fillval : float, optional
        Value returned outside ``0 <= x < W``, ``0 <= y < H`` (drizzle 3.0's
        strict upper bound), for non-finite positions and for masked footprints.

    Returns
    -------
    Array, shape of ``x``, dtype of ``data``
        Interpolated values.

    Raises
    ------
    ValueError
        If ``kind`` is unknown, ``data`` is not 2-D or ``x`` and ``y`` differ in
        shape.

    See Also
    --------
    interpolate_with_validity : also returns the validity of each sample.

    Examples
    --------
    A cubic is reproduced exactly by the quintic kernel:

    >>> import jax.numpy as jnp
    >>> xx = jnp.arange(12.0)
    >>> data = jnp.broadcast_to(xx**3, (12, 12))
    >>> round(float(interpolate(data, jnp.array(5.25), jnp.array(4.5))), 4)
    144.7031
    """
    return interpolate_with_validity(data, x, y, kind=kind, fillval=fillval)[0]

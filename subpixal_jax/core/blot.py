r"""Differentiable blot: resample a reference image through a pixmap.

A *pixmap* follows drizzle's blot convention: ``pixmap[..., 0]`` and
``pixmap[..., 1]`` are, for every output pixel, the 0-based ``x`` and ``y``
position in the array being resampled (``data``), so the output has the
pixmap's leading shape. The blot of docs/original.md §3 is

.. math::

    B(i, j) = \mathrm{interp}(D_\mathrm{rate})(p(i, j)) \cdot s

with ``s`` the unit/pixel-area factor returned by `blot_scale` and passed as
``iscale``. Kernels, boundary handling and the in-range test are those of
:mod:`subpixal_jax.core.interp` (drizzle 3.0's strict bound ``0 <= x < W``).

Validity (True = good): a blot pixel is valid when its position is finite and
in range and no pixel of its kernel footprint is flagged in ``data_valid`` or
non-finite. Invalid blot pixels hold ``fillval``; bad data pixels are replaced
by 0 before interpolating, so NaN never reaches a pixel whose footprint does not
contain it. Zero-valued good pixels are ordinary data.

Every function is jittable and vmappable; each public kernel has one jitted
entry point with the options (``interp``, shapes) static and everything numeric
traced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from subpixal_jax.core import interp as _interp

#: Strided views of the half-pixel pixmap in the blot order (00, 10, 01, 11):
#: ``(row_start, col_start)`` into ``pixmap[row_start::2, col_start::2]``.
_HALF_PIXEL_STARTS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (1, 0), (1, 1))

#: Units an exposure can be in, and whether its blot is multiplied by EXPTIME.
IMAGE_UNITS: dict[str, bool] = {"counts": True, "rate": False}


def blot_scale(*, image_units: str, image_exptime, area_ratio):
    r"""Return the factor converting interpolated reference rates to image units.

    The reference (drizzled) data are always in rate units per reference pixel.
    A blot onto an exposure must be in the exposure's units per exposure pixel:

    .. math::

        s = (t_\mathrm{img} \text{ if counts else } 1) \cdot
            \frac{A_\mathrm{img}}{A_\mathrm{ref}}

    ``area_ratio`` is the exposure-pixel area over the reference-pixel area,
    i.e. ``|det J|`` of the Jacobian ``d(ref pixel) / d(image pixel)`` of the
    pixmap at the source. This replaces the original's
    ``1 / pix_ratio**2`` with ``pix_ratio`` built from the instrument's nominal
    IDCSCALE (docs/original.md §3 step 2 and §9.22), which ignores the local distortion.

    Parameters
    ----------
    image_units : {'counts', 'rate'}
        Units of the exposure the reference is blotted onto.
    image_exptime : float or array_like
        Exposure time of that exposure (seconds, > 0); used only for counts.
    area_ratio : float or array_like
        Exposure-pixel area / reference-pixel area (> 0).

    Returns
    -------
    float or Array
        The ``iscale`` to pass to the blot functions (an array when any input
        is one).

    Raises
    ------
    ValueError
        If ``image_units`` is unknown, or a concrete ``image_exptime`` or
        ``area_ratio`` is not positive.

    Examples
    --------
    A counts exposure of 400 s with pixels 4x the reference pixel area:

    >>> blot_scale(image_units="counts", image_exptime=400.0, area_ratio=4.0)
    1600.0
    >>> blot_scale(image_units="rate", image_exptime=400.0, area_ratio=4.0)
    4.0
    """
    if image_units not in IMAGE_UNITS:
        msg = f"image_units must be one of {sorted(IMAGE_UNITS)}, got {image_units!r}"
        raise ValueError(msg)
    for name, value in (("image_exptime", image_exptime), ("area_ratio", area_ratio)):
        if isinstance(value, int | float) and not value > 0:
            msg = f"{name} must be positive, got {value!r}"
            raise ValueError(msg)
    if IMAGE_UNITS[image_units]:
        return image_exptime * area_ratio
    return area_ratio * 1.0


def _check_pixmap(pixmap, *, name: str = "pixmap", ndim: int = 3) -> jax.Array:
    """Validate a pixmap: ``ndim`` dims, last axis of length 2, floating."""
    pixmap = _interp._as_float(pixmap, name)
    if pixmap.ndim != ndim or pixmap.shape[-1] != 2:
        lead = ", ".join(["..."] * (ndim - 1))
        msg = f"{name} must have shape ({lead}, 2), got {pixmap.shape}"
        raise ValueError(msg)
    return pixmap


def _blot_core(data, data_valid, pixmap, fillval, iscale, interp):
    """Blot with validity; traceable, unchecked."""
    values, valid = _interp.sample(
        data, pixmap[..., 0], pixmap[..., 1], data_valid, interp
    )
    scaled = values * jnp.asarray(iscale, data.dtype)
    return jnp.where(valid, scaled, jnp.asarray(fillval, data.dtype)), valid


@functools.partial(jax.jit, static_argnames=("interp",))
def _blot_jit(data, data_valid, pixmap, fillval, iscale, interp):
    return _blot_core(data, data_valid, pixmap, fillval, iscale, interp)[0]


def blot(
    data,
    pixmap,
    *,
    interp: str = "poly5",
    fillval: float = 0.0,
    iscale=1.0,
    data_valid=None,
) -> jax.Array:
    """Resample ``data`` onto the grid of ``pixmap`` (drizzle's ``blot_image``).

    Parameters
    ----------
    data : array_like, shape (H, W)
        Image to resample (reference, rate units), indexed ``[y, x]``.
    pixmap : array_like, shape (Ho, Wo, 2)
        For each output pixel, its 0-based ``(x, y)`` position in ``data``.
    interp : str, optional
        Interpolation kind (see :mod:`subpixal_jax.core.interp`); default
        ``'poly5'``.
    fillval : float, optional
        Value of output pixels that are out of range, have a non-finite
        position, or whose kernel footprint contains a bad pixel.
    iscale : float or array_like, optional
        Multiplies the interpolated values (see `blot_scale`).
    data_valid : array_like of bool, shape (H, W), optional
        Good pixels of ``data``. Non-finite pixels are always bad.

    Returns
    -------
    Array, shape (Ho, Wo), dtype of ``data``
        The blotted image.

    Raises
    ------
    ValueError
        If ``interp`` is unknown, ``data`` is not 2-D or ``pixmap`` does not
        have shape (Ho, Wo, 2).

    Examples
    --------
    Shift a ramp by a quarter pixel:

    >>> import jax.numpy as jnp
    >>> data = jnp.broadcast_to(jnp.arange(8.0), (8, 8))
    >>> yy, xx = jnp.mgrid[0:3, 0:3].astype(jnp.float32)
    >>> pixmap = jnp.stack([xx + 2.25, yy + 2.0], axis=-1)
    >>> blot(data, pixmap)[0].tolist()
    [2.25, 3.25, 4.25]
    """
    _interp.check_kind(interp, name="interp")
    data, data_valid = _interp.check_data(data, data_valid)
    pixmap = _check_pixmap(pixmap)
    return _blot_jit(data, data_valid, pixmap, fillval, iscale, interp)


def _affine_core(pixmap, matrix, shift, center):
    """``center + matrix @ (p - center) + shift`` on the last axis."""
    matrix = jnp.asarray(matrix, pixmap.dtype)
    shift = jnp.asarray(shift, pixmap.dtype)
    center = jnp.asarray(center, pixmap.dtype)
    dx = pixmap[..., 0] - center[0]
    dy = pixmap[..., 1] - center[1]
    new_x = center[0] + shift[0] + matrix[0, 0] * dx + matrix[0, 1] * dy
    new_y = center[1] + shift[1] + matrix[1, 0] * dx + matrix[1, 1] * dy
    return jnp.stack([new_x, new_y], axis=-1)


def _check_affine(matrix, shift, center):
    for name, value, shape in (
        ("matrix", matrix, (2, 2)),
        ("shift", shift, (2,)),
        ("center", center, (2,)),
    ):
        got = jnp.shape(value)
        if got != shape:
            msg = f"{name} must have shape {shape}, got {got}"
            raise ValueError(msg)


@jax.jit
def _affine_jit(pixmap, matrix, shift, center):
    return _affine_core(pixmap, matrix, shift, center)


def affine_pixmap(pixmap, matrix, shift, center) -> jax.Array:
    """Apply an affine perturbation, in reference pixels, to a pixmap.

    ``p' = center + matrix @ (p - center) + shift`` for every position ``p`` in
    ``pixmap``. With the identity matrix and a zero shift the pixmap is
    unchanged; the result is differentiable in ``matrix`` and ``shift``, which
    makes a blot a differentiable function of a WCS correction.

    Parameters
    ----------
    pixmap : array_like, shape (..., 2)
        Positions ``(x, y)`` in the reference frame.
    matrix : array_like, shape (2, 2)
        Linear part, acting on ``(x, y)`` column vectors.
    shift : array_like, shape (2,)
        Translation ``(dx, dy)`` in reference pixels.
    center : array_like, shape (2,)
        Fixed point ``(x, y)`` of the linear part.

    Returns
    -------
    Array, shape of ``pixmap``, dtype of ``pixmap``
        The perturbed pixmap.

    Raises
    ------
    ValueError
        If a shape is wrong.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> p = jnp.array([[[2.0, 1.0]]])
    >>> rot90 = jnp.array([[0.0, -1.0], [1.0, 0.0]])
    >>> affine_pixmap(p, rot90, jnp.array([0.5, 0.0]), jnp.array([1.0, 1.0])).tolist()
    [[[1.5, 2.0]]]
    """
    pixmap = _interp._as_float(pixmap, "pixmap")
    if pixmap.ndim < 1 or pixmap.shape[-1] != 2:
        msg = f"pixmap must have shape (..., 2), got {pixmap.shape}"
        raise ValueError(msg)
    _check_affine(matrix, shift, center)
    return _affine_jit(pixmap, matrix, shift, center)


@functools.partial(jax.jit, static_argnames=("interp",))
def _blot_affine_jit(data, data_valid, pixmap, affine, fillval, iscale, interp):
    """Blot through ``pixmap`` moved by ``affine = (matrix, shift, center)``."""
    moved = _affine_core(pixmap, *affine)
    return _blot_core(data, data_valid, moved, fillval, iscale, interp)[0]


def blot_affine(  # noqa: PLR0913  # seed signature
    data,
    pixmap,
    matrix,
    shift,
    center,
    *,
    interp: str = "poly5",
    fillval: float = 0.0,
    iscale=1.0,
    data_valid=None,
) -> jax.Array:
    """Blot through a pixmap perturbed by an affine correction.

    Equivalent to ``blot(data, affine_pixmap(pixmap, matrix, shift, center),
    ...)`` in one jitted call; differentiable with respect to ``data``,
    ``matrix``, ``shift``, ``center`` and ``pixmap``.

    Parameters
    ----------
    data : array_like, shape (H, W)
        Image to resample (reference, rate units).
    pixmap : array_like, shape (Ho, Wo, 2)
        Unperturbed positions ``(x, y)`` in ``data`` of each output pixel.
    matrix : array_like, shape (2, 2)
        Linear part of the perturbation (identity for none).
    shift : array_like, shape (2,)
        Translation in reference pixels.
    center : array_like, shape (2,)
        Fixed point of ``matrix``, in reference pixels.
    interp, fillval, iscale, data_valid
        As in `blot`.

    Returns
    -------
    Array, shape (Ho, Wo), dtype of ``data``
        The blotted image.

    Raises
    ------
    ValueError
        As `blot` and `affine_pixmap`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> data = jnp.broadcast_to(jnp.arange(8.0), (8, 8))
    >>> pm = jnp.stack(jnp.meshgrid(jnp.arange(2.0, 4), jnp.arange(2.0, 4)), -1)
    >>> eye, zero, c = jnp.eye(2), jnp.zeros(2), jnp.array([3.0, 3.0])
    >>> g = jax.grad(lambda s: blot_affine(data, pm, eye, s, c).sum())(zero)
    >>> g.tolist()
    [4.0, 0.0]
    """
    _interp.check_kind(interp, name="interp")
    data, data_valid = _interp.check_data(data, data_valid)
    pixmap = _check_pixmap(pixmap)
    _check_affine(matrix, shift, center)
    affine = (matrix, shift, center)
    return _blot_affine_jit(data, data_valid, pixmap, affine, fillval, iscale, interp)


def _half_pixel_core(data, data_valid, pixmap, fillval, iscale, interp, out_shape):
    """Four half-pixel blots of one cutout; traceable, unchecked."""
    height, width = out_shape
    views = jnp.stack(
        [
            pixmap[r0 : r0 + 2 * height : 2, c0 : c0 + 2 * width : 2]
            for r0, c0 in _HALF_PIXEL_STARTS
        ]
    )  # (4, H, W, 2)
    return _blot_core(data, data_valid, views, fillval, iscale, interp)


def _half_pixel_shape(pixmap: jax.Array, out_shape) -> tuple[int, int]:
    """Output shape implied by (and checked against) a half-pixel pixmap."""
    rows, cols = pixmap.shape[-3], pixmap.shape[-2]
    if out_shape is None:
        if rows % 2 != 1 or cols % 2 != 1 or rows < 3 or cols < 3:
            msg = (
                "pixmap must have shape (2H+1, 2W+1, 2) with H, W >= 1, got "
                f"{pixmap.shape}"
            )
            raise ValueError(msg)
        return (rows - 1) // 2, (cols - 1) // 2
    out_shape = tuple(int(v) for v in out_shape)
    if len(out_shape) != 2 or min(out_shape) < 1:
        msg = f"out_shape must be two positive ints (H, W), got {out_shape}"
        raise ValueError(msg)
    if (rows, cols) != (2 * out_shape[0] + 1, 2 * out_shape[1] + 1):
        msg = (
            f"pixmap shape {pixmap.shape} does not match out_shape={out_shape}: "
            f"expected ({2 * out_shape[0] + 1}, {2 * out_shape[1] + 1}, 2)"
        )
        raise ValueError(msg)
    return out_shape


@functools.partial(jax.jit, static_argnames=("interp", "out_shape"))
def _half_pixel_jit(data, data_valid, pixmap, fillval, iscale, interp, out_shape):
    return _half_pixel_core(
        data, data_valid, pixmap, fillval, iscale, interp, out_shape
    )


def half_pixel_blots(
    data,
    pixmap,
    *,
    out_shape: tuple[int, int] | None = None,
    data_valid=None,
    interp: str = "poly5",
    fillval: float = 0.0,
    iscale=1.0,
) -> tuple[jax.Array, jax.Array]:
    """Compute the four half-pixel blots (docs/original.md §3) from one pixmap.

    Node ``(r, c)`` of ``pixmap`` is the image (exposure) position
    ``(c / 2, r / 2)``, so the four blots are strided views of one array, in the
    order (00, 10, 01, 11) (first digit: x half-shift):

    ======  ==========================  =====================================
    blot    pixmap view                 target pixel ``(i, j)`` samples
    ======  ==========================  =====================================
    ``00``  ``pixmap[0::2, 0::2]``      image position ``(i, j)``
    ``10``  ``pixmap[0::2, 1::2]``      ``(i + 1/2, j)``
    ``01``  ``pixmap[1::2, 0::2]``      ``(i, j + 1/2)``
    ``11``  ``pixmap[1::2, 1::2]``      ``(i + 1/2, j + 1/2)``
    ======  ==========================  =====================================

    each cut to ``(H, W)``.

    Parameters
    ----------
    data : array_like, shape (HR, WR)
        Reference cutout (rate units).
    pixmap : array_like, shape (2H + 1, 2W + 1, 2)
        Half-pixel-grid positions ``(x, y)`` in ``data``.
    out_shape : tuple of int, optional
        ``(H, W)``; derived from ``pixmap`` when omitted, checked when given.
    data_valid : array_like of bool, shape (HR, WR), optional
        Good reference pixels. Non-finite pixels are always bad.
    interp : str, optional
        Interpolation kind; default ``'poly5'``.
    fillval : float, optional
        Value of invalid blot pixels.
    iscale : float or array_like, optional
        Unit/area factor (see `blot_scale`).

    Returns
    -------
    blots : Array, shape (4, H, W), dtype of ``data``
        The blots 00, 10, 01, 11.
    valid : Array, shape (4, H, W), bool
        In range, finite position, and a footprint free of bad pixels.

    Raises
    ------
    ValueError
        If ``interp`` is unknown, ``data`` is not 2-D, or ``pixmap`` does not
        have shape (2H+1, 2W+1, 2) consistent with ``out_shape``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.broadcast_to(jnp.arange(10.0), (10, 10))
    >>> r, c = jnp.mgrid[0:5, 0:5].astype(jnp.float32)
    >>> pixmap = jnp.stack([c / 2 + 3.0, r / 2 + 3.0], axis=-1)  # identity + 3
    >>> blots, valid = half_pixel_blots(data, pixmap)
    >>> blots[:, 0, 0].tolist(), bool(valid.all())
    ([3.0, 3.5, 3.0, 3.5], True)
    """
    _interp.check_kind(interp, name="interp")
    data, data_valid = _interp.check_data(data, data_valid)
    pixmap = _check_pixmap(pixmap)
    out_shape = _half_pixel_shape(pixmap, out_shape)
    return _half_pixel_jit(data, data_valid, pixmap, fillval, iscale, interp, out_shape)


#: Sources per ``lax.map`` step in `half_pixel_blots_batch`.
BATCH_CHUNK = 64


@functools.partial(jax.jit, static_argnames=("interp", "chunk"))
def _batch_jit(ref, ref_valid, pixmap, iscale, fillval, interp, chunk):
    count = ref.shape[0]
    out_shape = ((pixmap.shape[1] - 1) // 2, (pixmap.shape[2] - 1) // 2)
    core = functools.partial(_half_pixel_core, interp=interp, out_shape=out_shape)
    if count <= chunk:
        return jax.vmap(core, in_axes=(0, 0, 0, None, 0))(
            ref, ref_valid, pixmap, fillval, iscale
        )
    # Chunks of `chunk` sources vmapped, stepped through by a loop: faster on
    # CPU than one vmap over everything.
    return jax.lax.map(
        lambda args: core(*args[:3], fillval, args[3]),
        (ref, ref_valid, pixmap, iscale),
        batch_size=chunk,
    )


def half_pixel_blots_batch(
    ref,
    ref_valid,
    pixmap,
    iscale,
    *,
    interp: str = "poly5",
    fillval: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Four half-pixel blots for every source of a batch, in one jitted call.

    `half_pixel_blots` vmapped over sources, processed in chunks of
    `BATCH_CHUNK` sources (``lax.map``) for large batches, which is faster on
    CPU than one call over everything.

    Parameters
    ----------
    ref : array_like, shape (N, HR, WR)
        Reference cutouts (rate units), e.g. ``CutoutBatch.ref``.
    ref_valid : array_like of bool, shape (N, HR, WR)
        Good reference pixels.
    pixmap : array_like, shape (N, 2H + 1, 2W + 1, 2)
        Half-pixel-grid pixmaps (float64 under ``jax.enable_x64``).
    iscale : array_like, shape (N,)
        Per-source unit/area factor (`blot_scale`).
    interp : str, optional
        Interpolation kind; default ``'poly5'``.
    fillval : float, optional
        Value of invalid blot pixels.

    Returns
    -------
    blots : Array, shape (N, 4, H, W), dtype of ``ref``
        Blots 00, 10, 01, 11 of each source.
    valid : Array, shape (N, 4, H, W), bool
        Validity of each blot pixel (see `half_pixel_blots`).

    Raises
    ------
    ValueError
        If ``interp`` is unknown or a shape is inconsistent.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> ref = jnp.ones((2, 12, 12), jnp.float32)
    >>> r, c = jnp.mgrid[0:9, 0:9].astype(jnp.float32)
    >>> pm = jnp.broadcast_to(jnp.stack([c / 2 + 4, r / 2 + 4], -1), (2, 9, 9, 2))
    >>> blots, valid = half_pixel_blots_batch(ref, ref > 0, pm, jnp.array([1.0, 2.0]))
    >>> blots.shape, blots[:, :, 2, 2].tolist()
    ((2, 4, 4, 4), [[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    """
    _interp.check_kind(interp, name="interp")
    ref, ref_valid = _interp.check_data(ref, ref_valid, name="ref", ndim=3)
    if ref_valid is None:
        msg = "ref_valid must be a boolean array of the shape of ref, got None"
        raise ValueError(msg)
    pixmap = _check_pixmap(pixmap, ndim=4)
    _half_pixel_shape(pixmap, None)
    iscale = jnp.asarray(iscale)
    count = ref.shape[0]
    if pixmap.shape[0] != count or iscale.shape != (count,):
        msg = (
            f"pixmap and iscale must have leading size N={count} like ref, got "
            f"pixmap {pixmap.shape} and iscale {iscale.shape}"
        )
        raise ValueError(msg)
    return _batch_jit(ref, ref_valid, pixmap, iscale, fillval, interp, BATCH_CHUNK)

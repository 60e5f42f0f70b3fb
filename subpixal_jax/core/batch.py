"""Batch layout shared by the shell and the kernels.

Every source of every image is padded to one of a few bucket shapes so that a
whole alignment iteration compiles a handful of times, not once per image or
per source. Padding is always at the high-index end and is described by
masks; padded entries never change a real entry's result.

Conventions
-----------
* Coordinates are ``(x, y)`` = (column, row), 0-based, pixel centres at
  integer values. Arrays are indexed ``[..., y, x]``.
* Masks here are *validity* masks: ``True`` marks a good pixel or a real
  source (the opposite of numpy's masked-array convention).
* The four half-pixel blots are ordered ``(00, 10, 01, 11)`` where the first
  digit is the x half-shift flag and the second the y flag: blot ``ab`` of
  target pixel ``(i, j)`` samples image position ``(i + a/2, j + b/2)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax

#: Side lengths (pixels) that cutouts are padded to. Every value factors into
#: 2, 3 and 5 only, so the FFT lengths derived from them stay fast.
CUTOUT_BUCKETS: tuple[int, ...] = (16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256)

#: Side lengths that reference cutouts are padded to in measurement batches:
#: coarser than `CUTOUT_BUCKETS`, so that one image-cutout bucket needs one
#: reference side (the kernels never take FFTs of reference cutouts).
REFERENCE_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256)

#: Smallest padded number of sources; larger counts go to the next power of 2.
MIN_SOURCE_BUCKET = 32

#: Most sources in one measurement call, per platform: on XLA's CPU backend
#: (one thread per call) 32 beat the former power-of-two batches by 13% in CPU
#: time on the demo set and 64-128 lost; accelerators want large calls.
MAX_SOURCE_CHUNK: dict[str, int] = {"cpu": 32, "gpu": 1024, "tpu": 1024}

#: Fewest sources in one measurement call (a multiple of any local device
#: count up to 8, so that chunks still shard evenly).
MIN_SOURCE_CHUNK = 8

#: Side (px) up to which a call holds the platform's `MAX_SOURCE_CHUNK`
#: sources; larger cutouts get proportionally fewer (same padded pixels).
CHUNK_SIDE = 48


#: Order of the four half-pixel shifts ``(a, b)`` along the blot axis.
HALF_PIXEL_SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (0, 1), (1, 1))


def cutout_bucket(size: int, buckets: tuple[int, ...] = CUTOUT_BUCKETS) -> int:
    """Return the padded side length for a cutout side of ``size`` pixels.

    Parameters
    ----------
    size : int
        The largest side (pixels) of the cutouts that go into one batch.
    buckets : tuple of int, optional
        Allowed padded sizes, increasing.

    Returns
    -------
    int
        The smallest bucket that holds ``size``.

    Raises
    ------
    ValueError
        If ``size`` is not positive or exceeds the largest bucket.

    Examples
    --------
    >>> cutout_bucket(21)
    24
    """
    size = int(size)
    if size < 1:
        msg = f"size must be a positive number of pixels, got {size}"
        raise ValueError(msg)
    for bucket in buckets:
        if size <= bucket:
            return bucket
    msg = f"size={size} exceeds the largest cutout bucket ({buckets[-1]} px)"
    raise ValueError(msg)


def source_bucket(count: int, minimum: int = MIN_SOURCE_BUCKET) -> int:
    """Return the padded number of sources for ``count`` real sources.

    Parameters
    ----------
    count : int
        Number of real sources (non-negative).
    minimum : int, optional
        Smallest padded count.

    Returns
    -------
    int
        ``minimum`` or the next power of two at or above ``count``.

    Examples
    --------
    >>> source_bucket(5), source_bucket(100)
    (32, 128)
    """
    count = int(count)
    if count < 0:
        msg = f"count must be non-negative, got {count}"
        raise ValueError(msg)
    if count <= minimum:
        return minimum
    return 1 << math.ceil(math.log2(count))


def source_chunk(side: int, platform: str | None = None) -> int:
    """Return the fixed number of sources per measurement call for a bucket.

    Every batch of one cutout bucket is padded to this many sources, so the
    number of compiled kernel shapes is bounded by the number of cutout
    buckets, whatever the source counts. Larger cutouts get fewer sources
    per call, which bounds the memory of a call (the half-pixel pixmaps of a
    256x256 cutout take 4 MB) and the work wasted on padding.

    Parameters
    ----------
    side : int
        Padded side of the bucket's image cutouts (pixels).
    platform : str, optional
        'cpu', 'gpu' or 'tpu'; default ``jax.default_backend()``.

    Returns
    -------
    int
        The largest power of two ``n`` with
        ``n * side**2 <= MAX_SOURCE_CHUNK[platform] * CHUNK_SIDE**2``,
        clipped to ``[MIN_SOURCE_CHUNK, MAX_SOURCE_CHUNK[platform]]``.

    Examples
    --------
    >>> source_chunk(24, "cpu"), source_chunk(64, "cpu"), source_chunk(128, "cpu")
    (32, 16, 8)
    >>> source_chunk(24, "gpu"), source_chunk(128, "gpu")
    (1024, 128)
    """
    side = int(side)
    if side < 1:
        msg = f"side must be a positive number of pixels, got {side}"
        raise ValueError(msg)
    top = MAX_SOURCE_CHUNK.get(platform or jax.default_backend(), 1024)
    n = 1 << max(0, math.floor(math.log2(top * CHUNK_SIDE**2 / side**2)))
    return min(top, max(MIN_SOURCE_CHUNK, n))


class CutoutBatch(NamedTuple):
    """All source cutouts of one bucket shape, ready for one jitted call.

    ``N`` is the padded number of sources, ``(H, W)`` the padded image-cutout
    shape and ``(HR, WR)`` the padded reference-cutout shape.

    Attributes
    ----------
    image : Array, shape (N, H, W), float32
        Image (exposure) cutouts, sky-subtracted, in the exposure's units;
        zero where ``image_valid`` is False.
    image_valid : Array, shape (N, H, W), bool
        Good image pixels (inside the cutout, finite, not flagged in DQ).
    variance : Array, shape (N, H, W), float32
        Per-pixel noise variance of ``image`` (from ERR, or Poisson + read
        noise); 1 where unknown. Used to weight refinement.
    ref : Array, shape (N, HR, WR), float32
        Reference (drizzled) cutouts in rate units; zero where ``ref_valid``
        is False.
    ref_valid : Array, shape (N, HR, WR), bool
        Good reference pixels (covered, and inside the source's segment when
        segment masking is on).
    pixmap : Array, shape (N, 2H + 1, 2W + 1, 2), float64
        Half-pixel-grid mapping: ``pixmap[k, r, c]`` is the 0-based ``(x, y)``
        position in ``ref[k]`` of image-cutout position ``(c / 2, r / 2)``,
        through the exposure's full distortion.
    iscale : Array, shape (N,), float32
        Factor that converts interpolated reference values to the image's
        units and pixel area (docs/original.md §3 step 5).
    shape : Array, shape (N, 2), int32
        True ``(ny, nx)`` of each image cutout before padding.
    predicted : Array, shape (N, 2), float64
        Where the current WCS predicts each source, ``(x, y)`` in image-cutout
        coordinates.
    weight : Array, shape (N,), float64
        Source weight for the linear fit (0 for padding).
    valid : Array, shape (N,), bool
        True for real sources, False for padding.
    image_index : Array, shape (N,), int32
        Index of the exposure each source belongs to.
    """

    image: jax.Array
    image_valid: jax.Array
    variance: jax.Array
    ref: jax.Array
    ref_valid: jax.Array
    pixmap: jax.Array
    iscale: jax.Array
    shape: jax.Array
    predicted: jax.Array
    weight: jax.Array
    valid: jax.Array
    image_index: jax.Array

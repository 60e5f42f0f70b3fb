"""The displacement stage as one compiled call: four half-pixel blots + CC + peak.

This is the kernel the alignment loop runs once per batch bucket and
iteration. It composes :func:`subpixal_jax.core.blot.half_pixel_blots_batch`
and :func:`subpixal_jax.core.xcorr.find_displacements` on a
:class:`~subpixal_jax.core.batch.CutoutBatch`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from subpixal_jax.core.batch import CutoutBatch
from subpixal_jax.core.blot import half_pixel_blots_batch
from subpixal_jax.core.refine import RefinedDisplacements, refine_displacements
from subpixal_jax.core.xcorr import Displacements, find_displacements


@functools.partial(
    jax.jit,
    static_argnames=(
        "interp",
        "cc_type",
        "fit_box",
        "search_radius",
        "peak_fit",
        "overlap_normalise",
    ),
)
def measure_batch(
    batch: CutoutBatch,
    *,
    interp: str = "poly5",
    cc_type: str = "NCC",
    fit_box: int = 5,
    search_radius: int | None = None,
    peak_fit: str = "template",
    overlap_normalise: bool = False,
) -> tuple[Displacements, jax.Array]:
    """Measure the displacement of every source of a batch.

    Parameters
    ----------
    batch : CutoutBatch
        Cutouts of one bucket shape (see :mod:`subpixal_jax.core.batch`).
    interp : str, optional
        Blot interpolation kernel.
    cc_type : {'CC', 'NCC', 'ZNCC'}, optional
        Cross-correlation normalisation.
    fit_box : int, optional
        Side of the peak-fitting box on the 2x interlaced grid.
    search_radius : int or None, optional
        Restrict the peak search to lags within this many image pixels of
        zero lag (None: the whole lag window).
    peak_fit : {'template', 'lagrange', 'quadratic'}, optional
        Sub-pixel peak model (see
        :func:`subpixal_jax.core.xcorr.find_displacements`, whose default
        this is); 'quadratic' is the original's 5x5 fit.
    overlap_normalise : bool, optional
        Normalise NCC/ZNCC at every lag over its overlap (see
        :func:`subpixal_jax.core.xcorr.find_displacements`).

    Returns
    -------
    displacements : Displacements
        Per-source ``(dx, dy)`` in image pixels, flags, 1-sigma errors, peak
        height and quality; padded rows carry a flag and NaN.
    blots : Array, shape (N, 4, H, W)
        The four half-pixel blots (kept for diagnostics).
    """
    # The reference cutouts are already zero where invalid, and zeros outside a
    # source's segment are part of the model (original.md §2.3): interpolate over them
    # rather than invalidating a kernel-wide ring inside the segment edge.
    everywhere = jnp.ones(batch.ref.shape, dtype=bool)
    blots, blot_valid = half_pixel_blots_batch(
        batch.ref, everywhere, batch.pixmap, batch.iscale, interp=interp
    )
    blot_valid = blot_valid & batch.valid[:, None, None, None]
    result = find_displacements(
        batch.image,
        blots,
        batch.image_valid & batch.valid[:, None, None],
        blot_masks=blot_valid,
        shapes=batch.shape,
        cc_type=cc_type,
        fit_box=fit_box,
        search_radius=search_radius,
        peak_fit=peak_fit,
        overlap_normalise=overlap_normalise,
        variances=batch.variance,
    )
    return result, jnp.asarray(blots)


def _centre_jacobian(pixmap: jax.Array, shape: jax.Array) -> jax.Array:
    """Local derivative of a half-grid pixmap at each cutout's centre node.

    Nodes are half a pixel apart, so the difference across two nodes is the
    derivative per image pixel. Returns ``(N, 2, 2)`` with columns
    ``d/dx`` and ``d/dy``.
    """
    rows = 2 * (shape[:, 0] // 2)
    cols = 2 * (shape[:, 1] // 2)
    # Keep the four neighbours inside the grid even for 1-pixel cutouts.
    rows = jnp.clip(rows, 1, pixmap.shape[1] - 2)
    cols = jnp.clip(cols, 1, pixmap.shape[2] - 2)
    k = jnp.arange(pixmap.shape[0])
    d_dx = pixmap[k, rows, cols + 1] - pixmap[k, rows, cols - 1]
    d_dy = pixmap[k, rows + 1, cols] - pixmap[k, rows - 1, cols]
    return jnp.stack([d_dx, d_dy], axis=-1)


#: Levenberg-Marquardt iterations of `refine_batch`. From the
#: cross-correlation's start the fit converges in one: on the standard cutout
#: cases 1, 2 and 10 iterations give the same RMS error to 1e-6 px at S/N 20,
#: 100 and 1000, and each costs ~280 us per 25x25 source (2 iterations 0.72-0.89
#: ms, 10 iterations 2.1-2.4 ms). Two leave room for a poorer start.
REFINE_ITERATIONS = 2

#: Precision of `refine_batch`. The cutouts' pixmaps are positions inside
#: the reference cutout (< 100 px), so float32 holds them to ~4e-6 px; on the
#: standard cases float32 gives the float64 RMS error to 1e-6 px at S/N 20
#: and 1000 (largest difference per source 1.4e-4 px = 0.005 sigma at S/N
#: 20, 1.3e-6 px at 1000) in 0.37-0.38 ms per 25x25 source instead of
#: 0.78-0.89 ms.
REFINE_DTYPE = jnp.float32


@functools.partial(jax.jit, static_argnames=("interp", "n_iter"))
def refine_batch(
    batch: CutoutBatch,
    dxdy0: jax.Array,
    *,
    interp: str = "poly5",
    n_iter: int = REFINE_ITERATIONS,
) -> RefinedDisplacements:
    """Refine a batch's displacements by least squares through the blot.

    Parameters
    ----------
    batch : CutoutBatch
        Cutouts of one bucket shape.
    dxdy0 : Array, shape (N, 2)
        Starting displacements (the cross-correlation's), image pixels; NaN
        rows are refined from 0 and flagged by the caller.
    interp : str, optional
        Blot interpolation kernel.
    n_iter : int, optional
        Levenberg-Marquardt iterations (default `REFINE_ITERATIONS`).

    Returns
    -------
    RefinedDisplacements
        See :func:`subpixal_jax.core.refine.refine_displacements`.
    """
    _, h, w = batch.image.shape
    pixmap = batch.pixmap[:, 0::2, 0::2][:, :h, :w]
    start = jnp.where(jnp.isfinite(dxdy0), dxdy0, 0.0)
    return refine_displacements(
        batch.image.astype(REFINE_DTYPE),
        batch.variance.astype(REFINE_DTYPE),
        batch.image_valid & batch.valid[:, None, None],
        batch.ref.astype(REFINE_DTYPE),
        jnp.ones(batch.ref.shape, dtype=bool),
        pixmap.astype(REFINE_DTYPE),
        _centre_jacobian(batch.pixmap, batch.shape).astype(REFINE_DTYPE),
        batch.iscale.astype(REFINE_DTYPE),
        start.astype(REFINE_DTYPE),
        interp=interp,
        n_iter=n_iter,
    )

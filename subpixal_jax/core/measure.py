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
from subpixal_jax.core.xcorr import Displacements, find_displacements


@functools.partial(
    jax.jit, static_argnames=("interp", "cc_type", "fit_box", "search_radius")
)
def measure_batch(
    batch: CutoutBatch,
    *,
    interp: str = "poly5",
    cc_type: str = "NCC",
    fit_box: int = 5,
    search_radius: int | None = None,
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

    Returns
    -------
    displacements : Displacements
        Per-source ``(dx, dy)`` in image pixels, flags, 1-sigma errors, peak
        height and quality; padded rows carry a flag and NaN.
    blots : Array, shape (N, 4, H, W)
        The four half-pixel blots (kept for diagnostics).
    """
    # The reference cutouts are already zero where invalid, and zeros outside a
    # source's segment are part of the model (SPEC §2.3): interpolate over them
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
    )
    return result, jnp.asarray(blots)

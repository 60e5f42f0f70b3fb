"""Shard one cutout batch across the local JAX devices (SPMD over sources).

The alignment loop measures every source of a bucket in one jitted call
(:func:`subpixal_jax.core.measure.measure_batch`). Sources are independent,
so with more than one local device the batch is split along its leading
(source) axis: every array of the :class:`~subpixal_jax.core.batch.CutoutBatch`
is placed with a :class:`jax.sharding.NamedSharding` over a 1-D device mesh,
and the same jitted kernel then runs SPMD, each device measuring its own
sources. Results are those of the single-device run (the computation per
source does not change; only where it runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from subpixal_jax.core.batch import CutoutBatch

#: Name of the mesh axis the sources are split along.
SOURCE_AXIS = "sources"


def _n_shards(n_sources: int, n_devices: int) -> int:
    """Largest device count ``<= n_devices`` that divides ``n_sources``."""
    for k in range(min(n_sources, n_devices), 0, -1):
        if n_sources % k == 0:
            return k
    return 1


def shard_batch(
    batch: CutoutBatch, devices: Sequence[jax.Device] | None = None
) -> CutoutBatch:
    """Place a batch on the local devices, split along the source axis.

    Parameters
    ----------
    batch : CutoutBatch
        Arrays (numpy or jax) whose leading axis is the padded source count
        ``N`` (a fixed chunk of sources, see
        :func:`~subpixal_jax.core.batch.source_chunk`).
    devices : sequence of jax.Device, optional
        Devices to split over; default ``jax.local_devices()``. The largest
        number of them that divides ``N`` is used.

    Returns
    -------
    CutoutBatch
        With one device (or ``N`` not divisible by more than one), the batch
        put on that device (``jax.device_put``); otherwise every array
        sharded with ``NamedSharding(Mesh(devices, ('sources',)),
        PartitionSpec('sources'))``, so a jitted kernel applied to it runs
        on all devices at once.

    Raises
    ------
    ValueError
        If ``devices`` is empty or the arrays of ``batch`` disagree on ``N``.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        msg = "devices must hold at least one jax.Device, got an empty sequence"
        raise ValueError(msg)
    sizes = {int(np.shape(leaf)[0]) for leaf in batch}
    if len(sizes) != 1:
        msg = f"batch arrays must share one leading (source) size, got {sorted(sizes)}"
        raise ValueError(msg)
    k = _n_shards(sizes.pop(), len(devices))
    if k == 1:
        return jax.device_put(batch, devices[0])
    mesh = Mesh(np.asarray(devices[:k]), (SOURCE_AXIS,))
    sharding = NamedSharding(mesh, PartitionSpec(SOURCE_AXIS))
    return jax.device_put(batch, sharding)

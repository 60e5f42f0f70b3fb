"""Tests of pipeline.sharding: one batch split over devices, same answers."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from subpixal_jax.core.batch import CutoutBatch
from subpixal_jax.pipeline.sharding import SOURCE_AXIS, shard_batch

# Builds a batch of Gaussian sources displaced by known sub-pixel shifts,
# measures it on one device and sharded over all (forced host) devices, and
# prints both as JSON.
_SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    from subpixal_jax.core.batch import CutoutBatch
    from subpixal_jax.core.measure import measure_batch
    from subpixal_jax.pipeline.sharding import shard_batch

    def make_batch(n_real, n_pad, size=16, ref_size=24, seed=0):
        rng = np.random.default_rng(seed)
        off = (ref_size - size) / 2
        shifts = rng.uniform(-0.8, 0.8, (n_pad, 2))
        yy, xx = np.mgrid[:size, :size]
        ry, rx = np.mgrid[:ref_size, :ref_size]
        image = np.zeros((n_pad, size, size), np.float32)
        ref = np.zeros((n_pad, ref_size, ref_size), np.float32)
        for k in range(n_real):
            cx, cy = (size - 1) / 2 + shifts[k]
            image[k] = 500 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 4.5)
            image[k] += rng.normal(0, 1.0, image[k].shape)
            c = (ref_size - 1) / 2
            ref[k] = 500 * np.exp(-((rx - c) ** 2 + (ry - c) ** 2) / 4.5)
        gy, gx = np.mgrid[: 2 * size + 1, : 2 * size + 1] / 2.0
        pixmap = np.stack([gx + off, gy + off], axis=-1)
        pixmap = np.broadcast_to(pixmap, (n_pad, *pixmap.shape)).copy()
        valid = np.arange(n_pad) < n_real
        return CutoutBatch(
            image=image,
            image_valid=np.broadcast_to(valid[:, None, None], image.shape).copy(),
            variance=np.ones_like(image),
            ref=ref,
            ref_valid=np.broadcast_to(valid[:, None, None], ref.shape).copy(),
            pixmap=pixmap,
            iscale=valid.astype(np.float32),
            shape=np.where(valid[:, None], [size, size], 1).astype(np.int32),
            predicted=np.full((n_pad, 2), (size - 1) / 2),
            weight=valid.astype(np.float64),
            valid=valid,
            image_index=np.zeros(n_pad, np.int32),
        ), shifts[:n_real]

    with jax.enable_x64(True):
        batch, shifts = make_batch(29, 32)
        single, _ = measure_batch(jax.device_put(batch, jax.devices()[0]))
        sharded_batch = shard_batch(batch)
        sharded, _ = measure_batch(sharded_batch)
        spec = sharded_batch.pixmap.sharding.spec
        out_devices = len(sharded.dxdy.sharding.device_set)
    print(json.dumps({
        "n_devices": jax.device_count(),
        "batch_devices": len(sharded_batch.image.sharding.device_set),
        "out_devices": out_devices,
        "spec": str(spec),
        "single_dxdy": np.asarray(single.dxdy).tolist(),
        "sharded_dxdy": np.asarray(sharded.dxdy).tolist(),
        "single_flags": np.asarray(single.flags).tolist(),
        "sharded_flags": np.asarray(sharded.flags).tolist(),
        "single_sigma": np.asarray(single.sigma).tolist(),
        "sharded_sigma": np.asarray(sharded.sigma).tolist(),
        "true_shifts": shifts.tolist(),
    }))
    """
)


def _tiny_batch(n):
    return CutoutBatch(
        *(np.zeros((n, 2), np.float32) for _ in CutoutBatch._fields),
    )


def test_one_device_is_plain_device_put():
    batch = _tiny_batch(32)
    placed = shard_batch(batch, devices=jax.local_devices()[:1])
    assert all(isinstance(leaf, jax.Array) for leaf in placed)
    assert all(len(leaf.sharding.device_set) == 1 for leaf in placed)
    np.testing.assert_array_equal(np.asarray(placed.image), batch.image)


def test_validation_names_the_parameter():
    with pytest.raises(ValueError, match="devices"):
        shard_batch(_tiny_batch(32), devices=[])
    ragged = _tiny_batch(32)._replace(valid=np.zeros(16, bool))
    with pytest.raises(ValueError, match="batch"):
        shard_batch(ragged)


def test_sharded_measurement_matches_single_device():
    """Two forced host devices: the SPMD run reproduces the one-device run."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["n_devices"] == 2
    assert out["batch_devices"] == 2
    assert out["out_devices"] == 2
    assert SOURCE_AXIS in out["spec"]
    single = np.asarray(out["single_dxdy"], dtype=float)
    sharded = np.asarray(out["sharded_dxdy"], dtype=float)
    np.testing.assert_array_equal(out["single_flags"], out["sharded_flags"])
    real = np.asarray(out["single_flags"]) == 0
    assert real.sum() >= 25
    np.testing.assert_allclose(sharded[real], single[real], rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out["sharded_sigma"])[real],
        np.asarray(out["single_sigma"])[real],
        rtol=1e-6,
        atol=1e-9,
    )
    # Padded rows are NaN in both runs.
    assert np.isnan(single[~real]).all() == np.isnan(sharded[~real]).all()
    # The measurement itself is right: the image source sits at +shift from
    # the cutout centre, so the reference blot is displaced by -shift.
    truth = -np.asarray(out["true_shifts"])
    np.testing.assert_allclose(single[:29][real[:29]], truth[real[:29]], atol=0.05)

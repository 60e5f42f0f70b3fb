"""Tests of subpixal_jax.kernel_store: exported kernels reused across processes."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("flatbuffers")  # jax.export serialisation needs it

from subpixal_jax import kernel_store, linearfit
from subpixal_jax.compilation import (
    count_compilations,
    enable_compilation_cache,
)
from subpixal_jax.core.batch import CutoutBatch
from subpixal_jax.core.linfit import iter_linear_fit_batch
from subpixal_jax.core.measure import measure_batch

ROOT = Path(__file__).resolve().parents[1]

# A second process: the stored kernels of `kernel_calls`, their outputs saved.
_CHILD = """
import sys
import jax
import numpy as np
sys.path.insert(0, "tests")
from test_kernel_store import kernel_calls, run_stored
from subpixal_jax import kernel_store, linearfit
from subpixal_jax.compilation import count_compilations, enable_compilation_cache
jax.config.update("jax_numpy_rank_promotion", "raise")  # as conftest: same key
enable_compilation_cache()
kernel_store.enable_kernel_store(sys.argv[1])
with count_compilations() as stats:
    outs = run_stored(kernel_calls()[0])
np.savez(sys.argv[2], *outs)
print(sorted(stats.traced))
"""


def kernel_calls():
    """Measure a batch of shifted Gaussians, and fit two point sets (rscale).

    Returns the calls ``(fun, args, static)`` and the Gaussians' shifts.
    """
    rng = np.random.default_rng(3)
    n, size, ref_size = 32, 16, 24
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    ry, rx = np.mgrid[:ref_size, :ref_size] - (ref_size - 1) / 2
    shifts = rng.uniform(-0.8, 0.8, (n, 1, 1, 2))
    image = 500 * np.exp(
        -((xx - shifts[..., 0]) ** 2 + (yy - shifts[..., 1]) ** 2) / 4.5
    )
    image = (image + rng.normal(0, 1, image.shape)).astype(np.float32)
    ref = np.broadcast_to(500 * np.exp(-(rx**2 + ry**2) / 4.5), (n, ref_size, ref_size))
    gy, gx = np.mgrid[: 2 * size + 1, : 2 * size + 1] / 2.0 + (ref_size - size) / 2
    ones = np.ones(n, bool)
    batch = CutoutBatch(
        image=image,
        image_valid=np.ones(image.shape, bool),
        variance=np.ones_like(image),
        ref=ref.astype(np.float32),
        ref_valid=np.ones(ref.shape, bool),
        pixmap=np.broadcast_to(np.stack([gx, gy], -1), (n, *gx.shape, 2)).copy(),
        iscale=ones.astype(np.float32),
        shape=np.full((n, 2), size, np.int32),
        predicted=np.full((n, 2), (size - 1) / 2),
        weight=ones.astype(np.float64),
        valid=ones,
        image_index=np.zeros(n, np.int32),
    )
    uv = rng.uniform(0, 500, (2, 32, 2))
    xy = 1.001 * uv + 0.4 + rng.normal(0, 0.02, uv.shape)
    xy[:, 0] += 5.0  # one outlier per image, clipped
    fit_args = (
        xy,
        uv,
        np.ones((2, 32)),
        np.ones((2, 32), bool),
        np.full((2, 2), 250.0),
    )
    fit_static = {"fitgeom": "rscale", "nclip": 3, "sigma": 3.0, "sigma_stat": "rmse"}
    measure_static = {"interp": "poly5", "cc_type": "NCC", "peak_fit": "quadratic"}
    calls = [
        (measure_batch, (batch,), measure_static),
        (iter_linear_fit_batch, fit_args, fit_static),
    ]
    return calls, shifts[:, 0, 0]


def run_stored(calls, stored=True):
    """Every call's output leaves as one float64 vector (x64, as the pipeline).

    ``stored=False``: the plain calls of the ``core/`` functions.
    """
    call = kernel_store.call_stored if stored else (lambda f, *a, **s: f(*a, **s))
    with jax.enable_x64(True):
        outs = [call(fun, *args, **static) for fun, args, static in calls]
    return [
        np.concatenate([np.ravel(x).astype(float) for x in jax.tree.leaves(o)])
        for o in outs
    ]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh store in tmp_path; the compilation cache the tests share."""
    monkeypatch.setattr(kernel_store, "_kernels", {})
    monkeypatch.setattr(kernel_store, "_store_dir", None)
    enable_compilation_cache()
    return kernel_store.enable_kernel_store(tmp_path / "store")


def test_second_process_traces_no_stored_kernel(store, tmp_path, monkeypatch):
    calls, shifts = kernel_calls()
    plain = run_stored(calls, stored=False)
    monkeypatch.setattr(kernel_store, "_store_dir", None)
    store_off = run_stored(calls)  # call_stored with the store off
    monkeypatch.setattr(kernel_store, "_store_dir", store)
    assert not any(store.iterdir())
    first = run_stored(calls)
    assert sorted(p.name.split("-")[0] for p in store.iterdir()) == [
        "iter_linear_fit_batch",
        "measure_batch",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "child.npz"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", _CHILD, str(store), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    traced = done.stdout.strip().splitlines()[-1]
    # only the stored kernels' thin wrappers (stored_...) are traced
    assert "'measure_batch'" not in traced
    assert "'iter_linear_fit_batch'" not in traced
    assert "'stored_measure_batch'" in traced
    second = np.load(out)
    for k, (p, off, f) in enumerate(zip(plain, store_off, first, strict=True)):
        np.testing.assert_array_equal(f, off)  # bit-identical, NaN rows too
        np.testing.assert_array_equal(second[f"arr_{k}"], off)
        # The direct call, compiled with XLA's defaults: the last bits only.
        np.testing.assert_allclose(f, p, rtol=1e-12, atol=1e-12, equal_nan=True)
    # The measurement kernel recovered the injected shifts.
    np.testing.assert_allclose(first[0][: 2 * 32].reshape(32, 2), -shifts, atol=0.05)


def test_corrupt_entry_is_rebuilt(store, monkeypatch, caplog):
    calls = kernel_calls()[0][1:]
    (want,) = run_stored(calls)
    (entry,) = store.iterdir()
    whole = entry.read_bytes()
    for broken in (whole[: len(whole) // 2], whole[:-1] + bytes([whole[-1] ^ 1])):
        entry.write_bytes(broken)
        monkeypatch.setattr(kernel_store, "_kernels", {})  # as a new process
        with caplog.at_level(logging.DEBUG, logger="subpixal_jax.kernel_store"):
            (got,) = run_stored(calls)
        assert "rebuilding" in caplog.text
        caplog.clear()
        np.testing.assert_array_equal(got, want)
        monkeypatch.setattr(kernel_store, "_kernels", {})
        with count_compilations() as stats:  # rewritten whole: loaded, not traced
            (again,) = run_stored(calls)
        assert "iter_linear_fit_batch" not in stats.traced
        np.testing.assert_array_equal(again, want)
    assert not list(store.glob("*.tmp"))


def test_changed_source_misses(store, monkeypatch):
    calls = kernel_calls()[0][1:]
    (want,) = run_stored(calls)
    monkeypatch.setattr(kernel_store, "_kernels", {})
    monkeypatch.setattr(kernel_store, "_source_hash", lambda _: "edited core/")
    with count_compilations() as stats:
        (got,) = run_stored(calls)
    assert stats.traced.get("iter_linear_fit_batch") == 1  # traced again
    assert len(list(store.iterdir())) == 2
    np.testing.assert_array_equal(got, want)


def test_store_is_off_without_flatbuffers(monkeypatch, tmp_path):
    monkeypatch.setattr(kernel_store, "_store_dir", None)
    monkeypatch.setattr(kernel_store.importlib.util, "find_spec", lambda _: None)
    assert kernel_store.enable_kernel_store(tmp_path) is None
    assert kernel_store.kernel_store_dir() is None


def test_float64_outside_x64_is_not_narrowed(store):
    call = kernel_calls()[0][1]
    fun, args, static = call
    got = kernel_store.call_stored(fun, *args, **static)  # not under x64
    assert not list(store.iterdir())  # the plain call took its float64 inputs
    (want,) = run_stored([call], stored=False)
    np.testing.assert_array_equal(
        np.concatenate([np.ravel(x).astype(float) for x in got]), want
    )


def test_host_fit_without_weights_through_store(store, monkeypatch):
    uv = np.random.default_rng(5).uniform(0, 300, (40, 2))
    c = uv.mean(axis=0)  # the fit's default centre
    xy = (uv - c) @ np.array([[1.0, 1e-4], [-1e-4, 1.0]]) + c + [0.3, -0.2]
    stored = linearfit.iter_linear_fit(xy, uv, fitgeom="rscale")  # wxy=None
    assert len(list(store.iterdir())) == 1
    monkeypatch.setattr(kernel_store, "_store_dir", None)
    plain = linearfit.iter_linear_fit(xy, uv, fitgeom="rscale")
    np.testing.assert_allclose(stored.shift, [0.3, -0.2], atol=1e-9)
    for a, b in zip(stored, plain, strict=True):
        np.testing.assert_array_equal(a, b)

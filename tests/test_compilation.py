"""Tests of subpixal_jax.compilation: persistent cache and compile counting."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subpixal_jax import compilation, kernel_store
from subpixal_jax.compilation import (
    CompileStats,
    count_compilations,
    default_cache_dir,
    enable_compilation_cache,
)

ROOT = Path(__file__).resolve().parents[1]

# A tiny kernel of this package (poly5 interpolation) in a fresh process.
_CHILD = """
import json, sys
import numpy as np
from subpixal_jax.compilation import count_compilations, enable_compilation_cache
from subpixal_jax.core.interp import interpolate_with_validity
from subpixal_jax.kernel_store import kernel_store_dir
path = enable_compilation_cache()
data = np.arange(64.0, dtype=np.float32).reshape(8, 8)
x = np.linspace(1, 6, 5, dtype=np.float32)
with count_compilations() as stats:
    v, ok = interpolate_with_validity(data, x, x, kind="poly5")
    v.block_until_ready()
print(json.dumps({"path": str(path), "store": str(kernel_store_dir()),
                  "compiles": stats.compiles,
                  "hits": stats.cache_hits, "value": float(v[2])}))
"""


def _spawn(env_cache):
    env = dict(os.environ, SUBPIXAL_JAX_CACHE_DIR=str(env_cache), JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-W", "error", "-c", _CHILD],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _check_reader(cache, written):
    again = _result(_spawn(cache))
    assert again["compiles"] == 0
    assert again["hits"] >= 1
    assert again["value"] == written["value"]


def test_second_process_compiles_nothing(tmp_path):
    cache = tmp_path / "cache"
    first = _result(_spawn(cache))
    assert first["path"] == str(cache.resolve())
    with_store = importlib.util.find_spec("flatbuffers") is not None
    assert first["store"] == str(cache.resolve() / "exported" if with_store else None)
    assert first["compiles"] >= 1
    assert first["hits"] == 0
    assert list(cache.glob("*-cache"))
    _check_reader(cache, first)


@pytest.mark.slow
def test_concurrent_writers_leave_a_whole_cache(tmp_path):
    cache = tmp_path / "cache"
    runs = [_result(p) for p in [_spawn(cache), _spawn(cache), _spawn(cache)]]
    assert max(r["compiles"] for r in runs) >= 1
    assert not list(cache.glob("*.tmp"))  # no half-written files left
    _check_reader(cache, runs[0])


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setattr(kernel_store, "_store_dir", kernel_store.kernel_store_dir())
    monkeypatch.setenv("SUBPIXAL_JAX_CACHE_DIR", "off")
    assert default_cache_dir() is None
    assert enable_compilation_cache() is None
    assert kernel_store.kernel_store_dir() is None  # off for both
    monkeypatch.setenv("SUBPIXAL_JAX_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SUBPIXAL_JAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "subpixal_jax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "subpixal_jax" / "jax"


def test_atomic_cache_round_trip(tmp_path):
    cache = compilation._AtomicFileCache(tmp_path)
    assert cache.get("k") is None
    cache.put("k", b"abc")
    cache.put("k", b"other")  # an existing entry is kept, as JAX's cache does
    assert cache.get("k") == b"abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k-cache"]
    with pytest.raises(ValueError, match="empty"):
        cache.put("", b"x")


def test_count_compilations_nests_and_counts_once_per_shape():
    f = jax.jit(lambda x: jnp.sin(x) * 2.0 - x)
    a, b = np.ones(13, np.float32), np.ones(17, np.float32)
    with count_compilations() as outer:
        f(a).block_until_ready()
        with count_compilations() as inner:
            f(a).block_until_ready()  # same shape: no compile
            f(b).block_until_ready()
    assert outer.compiles + outer.cache_hits == 2
    assert inner.compiles + inner.cache_hits == 1
    assert outer.compile_seconds >= 0.0
    assert outer.traces >= 1
    assert str(CompileStats(3, 4.14)) == "compiled 3 kernels in 4.1 s"
    assert "from the cache" in str(CompileStats(1, 1.0, 2, 0.1))


def test_compilations_are_logged_as_they_happen(monkeypatch, caplog):
    monkeypatch.setattr(compilation, "_LOGGED_COMPILE_SECONDS", 0.0)
    # A constant no earlier run had, so a real compile: switching the cache
    # off does nothing once a process has used it (JAX decides that once).
    salt = float(time.time_ns() % 1_000_003)
    f = jax.jit(lambda x: jnp.cos(x) * 3.0 + x + salt)
    with caplog.at_level(logging.INFO, logger="subpixal_jax.compilation"):
        f(np.ones(11, np.float32)).block_until_ready()  # outside a count: silent
        with count_compilations() as stats:
            f(np.ones(19, np.float32)).block_until_ready()
    lines = [r.getMessage() for r in caplog.records if "compiled" in r.getMessage()]
    assert stats.compiles == 1
    assert len(lines) == 1
    assert all(line.startswith("compiled ") and line.endswith(" s") for line in lines)

"""XLA compile time of the stored kernels: the default options against the store's.

The kernel store (:mod:`subpixal_jax.kernel_store`) compiles its kernels
with `~subpixal_jax.kernel_store.COMPILER_OPTIONS` for the platform (on the
CPU, LLVM's -O2 instead of -O3). For the displacement kernel
(``measure_batch``, one shape per image-cutout bucket, the pipeline's
options) and the linear fit (``iter_fit_kernel``, 4 images x 512 points),
this script lowers each kernel and compiles it with both option sets,
interleaved, ``--repeats`` times; then runs both executables on the same
synthetic inputs (Gaussian sources at known shifts with read noise) and
compares their outputs bit for bit.

Columns: median compile seconds with the default options and with the
store's, their ratio, median run time of one call (ms) with each, and
whether every output is bit-identical. No persistent compilation cache is
used, so every compile is a real one. Run::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_compile.py
"""

import argparse
import functools
import time

import jax
import numpy as np

from subpixal_jax.core.batch import CutoutBatch, source_chunk
from subpixal_jax.core.linfit import fit_batch_arguments, iter_fit_kernel
from subpixal_jax.core.measure import measure_batch
from subpixal_jax.kernel_store import COMPILER_OPTIONS


def _gaussian_batch(side: int, rng: np.random.Generator) -> CutoutBatch:
    """A full batch of ``side`` cutouts: one Gaussian each, shifted up to 1 px."""
    n = source_chunk(side)
    rside = side + 16
    shift = rng.uniform(-1.0, 1.0, (n, 2))
    yy, xx = np.mgrid[0:side, 0:side].astype(float)
    ry, rx = np.mgrid[0:rside, 0:rside].astype(float)
    c, rc = (side - 1) / 2.0, (rside - 1) / 2.0
    sigma2 = 2.0 * 1.5**2
    ref = 1000.0 * np.exp(-((rx - rc) ** 2 + (ry - rc) ** 2) / sigma2)
    image = np.stack(
        [
            1000.0 * np.exp(-((xx - c - dx) ** 2 + (yy - c - dy) ** 2) / sigma2)
            for dx, dy in shift
        ]
    )
    image += rng.normal(0.0, 5.0, image.shape)
    hy, hx = np.mgrid[0 : 2 * side + 1, 0 : 2 * side + 1] / 2.0
    offset = rc - c
    pixmap = np.stack([hx + offset, hy + offset], axis=-1)
    return CutoutBatch(
        image=image.astype(np.float32),
        image_valid=np.ones((n, side, side), bool),
        variance=np.full((n, side, side), 25.0, np.float32),
        ref=np.broadcast_to(ref, (n, rside, rside)).astype(np.float32),
        ref_valid=np.ones((n, rside, rside), bool),
        pixmap=np.broadcast_to(pixmap, (n, *pixmap.shape)).copy(),
        iscale=np.ones(n, np.float32),
        shape=np.full((n, 2), side, np.int32),
        predicted=np.zeros((n, 2)),
        weight=np.ones(n),
        valid=np.ones(n, bool),
        image_index=np.zeros(n, np.int32),
    )


def _fit_arguments(rng: np.random.Generator) -> tuple:
    b, n = 4, 512
    xy = rng.uniform(0.0, 2000.0, (b, n, 2))
    uv = xy + 0.3 + rng.normal(0.0, 0.02, xy.shape)
    return fit_batch_arguments(
        xy, uv, np.ones((b, n)), np.ones((b, n), bool), np.full((b, 2), 1000.0)
    )


def _median_call_ms(compiled, args, repeats: int) -> float:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _bit_identical(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _row(label: str, fun, args, options, repeats: int) -> str:
    seconds = {"default": [], "store": []}
    compiled = {}
    for _ in range(repeats):
        for name, opts in (("default", None), ("store", options)):
            # A new function each time: JAX caches compilations in-process.
            lowered = jax.jit(functools.partial(fun)).lower(*args)
            t0 = time.perf_counter()
            compiled[name] = lowered.compile(compiler_options=opts)
            seconds[name].append(time.perf_counter() - t0)
    t_default, t_store = (float(np.median(seconds[k])) for k in ("default", "store"))
    run = {k: _median_call_ms(c, args, 10) for k, c in compiled.items()}
    same = _bit_identical(compiled["default"](*args), compiled["store"](*args))
    return (
        f"{label:28s} {t_default:8.2f} {t_store:8.2f} {t_store / t_default:6.2f}"
        f" {run['default']:9.2f} {run['store']:9.2f}  {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=(16, 24, 32, 48))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    platform = jax.default_backend()
    options = COMPILER_OPTIONS.get(platform)
    print(f"platform {platform}; store options {options}; median of {args.repeats}")
    print(
        f"{'kernel':28s} {'def. s':>8s} {'store s':>8s} {'ratio':>6s}"
        f" {'def. ms':>9s} {'store ms':>9s}  bit-identical"
    )
    rng = np.random.default_rng(0)
    measure = functools.partial(
        measure_batch, interp="poly5", cc_type="NCC", peak_fit="quadratic"
    )
    with jax.enable_x64(True):
        for side in args.sides:
            batch = _gaussian_batch(side, rng)
            label = f"measure_batch {side}x{side} N={len(batch.valid)}"
            print(_row(label, measure, (batch,), options, args.repeats), flush=True)
        fit = functools.partial(iter_fit_kernel, fitgeom="general")
        print(_row("iter_fit_kernel 4x512", fit, _fit_arguments(rng), options, 3))


if __name__ == "__main__":
    main()

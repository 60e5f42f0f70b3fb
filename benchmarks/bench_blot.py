"""Four half-pixel blots: batched JAX path vs a per-cutout drizzle loop.

For N cutouts of n x n image pixels (reference cutouts (n + 8) square, pixmaps
on the half-pixel grid with a small rotation, scale and SIP-like distortion),
times

* ``jax``: one call of ``half_pixel_blots_batch`` (float32 data, float64
  pixmaps under ``jax.enable_x64``), compiled beforehand;
* ``drizzle``: a Python loop calling ``drizzle.resample.blot_image`` four times
  per cutout on the strided pixmap views (made contiguous, as drizzle needs),
  i.e. the original's blot work without its WCS overhead.

Prints medians (ms per call and µs per source), the drizzle/jax ratio, the
compile time (first call minus a steady call) and the max abs difference
between the two (interior pixels). ``--quick`` runs fewer repeats and sizes.

Usage::

    .venv/bin/python benchmarks/bench_blot.py [--quick] [--interp poly5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from drizzle.resample import blot_image

from subpixal_jax.core.blot import half_pixel_blots_batch


def make_batch(count: int, size: int, seed: int = 0):
    """Smooth sources on (size + 8)^2 references and half-pixel pixmaps."""
    rng = np.random.default_rng(seed)
    ref_size = size + 8
    yy, xx = np.mgrid[0:ref_size, 0:ref_size].astype(np.float64)
    centres = rng.uniform(ref_size / 2 - 2, ref_size / 2 + 2, (count, 2))
    sigma = rng.uniform(1.2, 2.5, (count, 1, 1))
    ref = np.exp(
        -((xx - centres[:, :1, None]) ** 2 + (yy - centres[:, 1:, None]) ** 2)
        / (2 * sigma**2)
    ).astype(np.float32)
    rr, cc = np.mgrid[0 : 2 * size + 1, 0 : 2 * size + 1].astype(np.float64) / 2
    theta = rng.uniform(-0.02, 0.02, count)[:, None, None]
    scale = rng.uniform(0.98, 1.02, count)[:, None, None]
    u, v = cc - size / 2, rr - size / 2
    px = 4 + size / 2 + scale * (np.cos(theta) * u - np.sin(theta) * v)
    py = 4 + size / 2 + scale * (np.sin(theta) * u + np.cos(theta) * v)
    px = px + 1e-3 * u * v
    py = py + 5e-4 * u * u
    pixmap = np.stack([px, py], axis=-1)
    iscale = rng.uniform(0.5, 2.0, count)
    return ref, np.ones_like(ref, dtype=bool), pixmap, iscale


def drizzle_loop(ref, pixmap, iscale, size, interp):
    """Per-cutout loop: four ``blot_image`` calls per source."""
    out = np.empty((ref.shape[0], 4, size, size), np.float32)
    for k in range(ref.shape[0]):
        for b, (r0, c0) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            view = np.ascontiguousarray(
                pixmap[k, r0 : r0 + 2 * size : 2, c0 : c0 + 2 * size : 2]
            )
            out[k, b] = blot_image(
                ref[k], view, fillval=0.0, iscale=float(iscale[k]), interp=interp
            )
    return out


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, repeats")
    parser.add_argument("--interp", default="poly5")
    args = parser.parse_args()
    counts = (256,) if args.quick else (256, 1024)
    sizes = (25, 41)
    repeats = 3 if args.quick else 7

    header = (
        f"{'N':>5} {'n':>3} {'jax ms':>9} {'jax us/src':>10} {'drizzle ms':>11} "
        f"{'drz us/src':>10} {'ratio':>6} {'compile s':>9} {'max|diff|':>9}"
    )
    print(f"interp={args.interp}, devices={jax.devices()}")
    print(header)
    print("-" * len(header))
    with jax.enable_x64(True):
        for size in sizes:
            for count in counts:
                ref, valid, pixmap, iscale = make_batch(count, size)
                ref_j, valid_j = jax.device_put(ref), jax.device_put(valid)
                pixmap_j, iscale_j = jax.device_put(pixmap), jax.device_put(iscale)

                def run_jax(ref_j=ref_j, valid_j=valid_j, pm=pixmap_j, sc=iscale_j):
                    out = half_pixel_blots_batch(
                        ref_j, valid_j, pm, sc, interp=args.interp
                    )
                    return jax.block_until_ready(out)

                start = time.perf_counter()
                blots, _ = run_jax()
                first = time.perf_counter() - start
                t_jax = median_time(run_jax, repeats)
                compile_s = max(first - t_jax, 0.0)

                drz_repeats = max(1, repeats // 2)
                t_drz = median_time(
                    lambda ref=ref, pm=pixmap, sc=iscale, n=size: drizzle_loop(
                        ref, pm, sc, n, args.interp
                    ),
                    drz_repeats,
                )
                expected = drizzle_loop(ref, pixmap, iscale, size, args.interp)
                diff = np.abs(np.asarray(blots) - expected)[:, :, 3:-3, 3:-3].max()
                print(
                    f"{count:>5} {size:>3} {t_jax * 1e3:>9.2f} "
                    f"{t_jax / count * 1e6:>10.1f} {t_drz * 1e3:>11.2f} "
                    f"{t_drz / count * 1e6:>10.1f} {t_drz / t_jax:>6.1f} "
                    f"{compile_s:>9.2f} {diff:>9.1e}"
                )


if __name__ == "__main__":
    main()

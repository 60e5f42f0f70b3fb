"""Benchmark: batched jitted clipped linear fits vs a loop over tweakwcs.

Fits B images x 200 points (10% outliers), fitgeom='general', nclip=3,
sigma=3 (rmse), unweighted, with
``subpixal_jax.core.linfit.iter_linear_fit_batch`` (one call for all B
images) and with a Python loop over ``tweakwcs.linearfit.iter_linear_fit``,
in the same run. Prints median wall times, their ratio (and the ratio of the
best times, steadier on a busy machine), and the compile time of the batched
call (first call minus a steady-state call) separately.

Usage::

    .venv/bin/python benchmarks/bench_linfit.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from tweakwcs import linearfit as twl

from subpixal_jax.core.batch import source_bucket
from subpixal_jax.core.linfit import iter_linear_fit_batch

NPTS = 200
KW = {"fitgeom": "general", "nclip": 3}


def make_batch(n_images: int, rng: np.random.Generator):
    uv = rng.uniform(0.0, 2000.0, (n_images, NPTS, 2))
    ang = np.deg2rad(rng.uniform(-0.05, 0.05, n_images))
    scale = rng.uniform(0.9999, 1.0001, n_images)
    mat = scale[:, None, None] * np.stack(
        [
            np.stack([np.cos(ang), np.sin(ang)], -1),
            np.stack([-np.sin(ang), np.cos(ang)], -1),
        ],
        axis=1,
    )
    xy = np.einsum("bij,bnj->bni", mat, uv) + rng.uniform(-1, 1, (n_images, 1, 2))
    xy += rng.normal(0.0, 0.02, xy.shape)
    bad = rng.uniform(size=(n_images, NPTS)) < 0.1
    xy[bad] += rng.uniform(-3.0, 3.0, (int(bad.sum()), 2))
    return xy, uv


def pad(xy, uv):
    n_images = xy.shape[0]
    bucket = source_bucket(NPTS)
    width = ((0, 0), (0, bucket - NPTS), (0, 0))
    valid = np.zeros((n_images, bucket), bool)
    valid[:, :NPTS] = True
    return np.pad(xy, width), np.pad(uv, width), valid, uv.mean(axis=1)


def run_jax(xyp, uvp, valid, center):
    fit = iter_linear_fit_batch(xyp, uvp, None, valid, center, sigma=3.0, **KW)
    return jax.block_until_ready(fit)


def run_tweakwcs(xy, uv):
    return [
        twl.iter_linear_fit(a, b, sigma=3.0, **KW) for a, b in zip(xy, uv, strict=True)
    ]


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats_jax = 5 if args.quick else 20
    repeats_tw = 1 if args.quick else 3

    rng = np.random.default_rng(0)
    print(
        f"general fit, nclip=3, {NPTS} points/image (padded to {source_bucket(NPTS)})"
    )
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    header = (
        f"{'images':>7} {'jax median':>12} {'tweakwcs median':>16} "
        f"{'ratio':>8} {'best ratio':>11} {'compile':>9} {'max |dM|':>10}"
    )
    print(header)
    print("-" * len(header))
    for n_images in (1, 100, 1000):
        xy, uv = make_batch(n_images, rng)
        padded = pad(xy, uv)
        first, fits = timed(run_jax, *padded)
        times_jax = [timed(run_jax, *padded)[0] for _ in range(repeats_jax)]
        med_jax = statistics.median(times_jax)
        times_tw = []
        for _ in range(repeats_tw):
            elapsed, refs = timed(run_tweakwcs, xy, uv)
            times_tw.append(elapsed)
        med_tw = statistics.median(times_tw)
        dmat = max(
            float(np.abs(np.asarray(fits.matrix[i]) - r["matrix"]).max())
            for i, r in enumerate(refs)
        )
        print(
            f"{n_images:>7} {med_jax * 1e3:>10.2f}ms {med_tw * 1e3:>14.1f}ms "
            f"{med_tw / med_jax:>7.1f}x {min(times_tw) / min(times_jax):>10.1f}x "
            f"{first - med_jax:>8.2f}s {dmat:>10.1e}"
        )


if __name__ == "__main__":
    main()

"""Benchmark: coarse catalog matching (capture range) — speed and success rate.

``subpixal_jax.reference.matching.match_points`` on synthetic point sets in a
4096 x 2048 px field (ACS/WFC-like), positions with 0.1 px noise:

1. **Time vs number of points**: 2 x N points, 80% common, shift (117, -60)
   px, rotation 2 deg, scale 1.1; median and best of the repeats, after a
   warm-up call per N (the clipped fit's compile is excluded and printed
   separately).
2. **Success rate**: each set holds ``n_common`` shared sources and 100 of
   its own; one factor varied at a time (shift, rotation, scale, common
   sources) around a hard default (shift 250 px, rotation 5 deg, scale 1,
   30 common). ``order``: 'bright' puts the common sources first in both
   lists (they are the brightest: what a brightness-sorted catalog gives),
   'random' shuffles them among the others (no brightness information).
   Columns: OK and right (every common point within 0.5 px of truth), OK but
   wrong (must be 0: never a silent wrong answer), not OK (a non-OK status
   with its reason).

Usage::

    .venv/bin/python benchmarks/bench_capture.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np

from subpixal_jax.reference.matching import match_points

FIELD = np.array([4096.0, 2048.0])
NOISE = 0.1


def _matrix(rotation, scale):
    r = math.radians(rotation)
    return scale * np.array([[math.cos(r), math.sin(r)], [-math.sin(r), math.cos(r)]])


def make_sets(rng, n_common, n_own, shift, rotation, scale, order="bright"):
    """``ref = M (xy - c) + c + s`` for the common points; own points random."""
    c = FIELD / 2
    m = _matrix(rotation, scale)
    common = rng.uniform(0.0, 1.0, (n_common, 2)) * FIELD
    ref_common = (common - c) @ m.T + c + shift
    xy = np.vstack([common, rng.uniform(0.0, 1.0, (n_own, 2)) * FIELD])
    ref = np.vstack([ref_common, rng.uniform(0.0, 1.0, (n_own, 2)) * FIELD])
    xy += rng.normal(0.0, NOISE, xy.shape)
    ref += rng.normal(0.0, NOISE, ref.shape)
    truth = (xy[:n_common] - c) @ m.T + c + shift
    if order == "random":
        px = rng.permutation(len(xy))
        pr = rng.permutation(len(ref))
        inv = np.argsort(px)
        xy, ref = xy[px], ref[pr]
        truth_idx = inv[:n_common]
    else:
        truth_idx = np.arange(n_common)
    return xy, ref, c, truth, truth_idx


def timing(sizes, repeats):
    rng = np.random.default_rng(0)
    print("1. match_points time vs number of points (2 x N, 80% common)")
    print(f"{'N':>6} {'first s':>8} {'median s':>9} {'best s':>7} {'hyp':>8} {'ok':>3}")
    for n in sizes:
        n_common = int(0.8 * n)
        args = make_sets(rng, n_common, n - n_common, (117.0, -60.0), 2.0, 1.1)
        t0 = time.perf_counter()
        res = match_points(args[0], args[1], center=args[2])
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            xy, ref, c, *_ = make_sets(
                rng, n_common, n - n_common, (117.0, -60.0), 2.0, 1.1
            )
            t0 = time.perf_counter()
            res = match_points(xy, ref, center=c)
            times.append(time.perf_counter() - t0)
        print(
            f"{n:6d} {first:8.2f} {statistics.median(times):9.3f} {min(times):7.3f} "
            f"{res.n_hypotheses:8d} {'y' if res.ok else 'n':>3}"
        )


def trial(rng, *, n_common, shift, rotation, scale, order, n_own=100):
    phi = rng.uniform(0.0, 2 * math.pi)
    s = shift * np.array([math.cos(phi), math.sin(phi)])
    xy, ref, c, truth, idx = make_sets(rng, n_common, n_own, s, rotation, scale, order)
    res = match_points(xy, ref, center=c)
    if not res.ok:
        return "fail"
    err = np.hypot(*(res.apply(xy[idx]) - truth).T)
    return "right" if np.max(err) < 0.5 else "wrong"


def success(trials):
    rng = np.random.default_rng(1)
    base = {"n_common": 30, "shift": 250.0, "rotation": 5.0, "scale": 1.0}
    grid = [
        ("shift", [0.0, 23.0, 117.0, 250.0, 500.0, 1000.0]),
        ("rotation", [0.0, 2.0, 5.0, 10.0, 30.0]),
        ("scale", [0.5, 0.75, 1.0, 1.5, 2.0]),
        ("n_common", [8, 10, 15, 20, 30, 50, 100]),
    ]
    print()
    print(f"2. success rate, {trials} trials per row, 100 own sources per set;")
    print("   defaults: shift 250 px (random direction), rotation 5 deg, scale 1,")
    print("   30 common sources")
    head = f"{'vary':>9} {'value':>7} {'order':>7} {'OK right':>9} "
    head += f"{'OK wrong':>9} {'not OK':>7} {'ms/trial':>9}"
    print(head)
    for name, values in grid:
        for value in values:
            for order in ("bright", "random"):
                kw = dict(base, **{name: value}, order=order)
                counts = {"right": 0, "wrong": 0, "fail": 0}
                t0 = time.perf_counter()
                for _ in range(trials):
                    counts[trial(rng, **kw)] += 1
                ms = 1e3 * (time.perf_counter() - t0) / trials
                print(
                    f"{name:>9} {value:7g} {order:>7} "
                    f"{100 * counts['right'] / trials:8.0f}% "
                    f"{100 * counts['wrong'] / trials:8.0f}% "
                    f"{100 * counts['fail'] / trials:6.0f}% {ms:9.1f}"
                )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats/trials")
    args = parser.parse_args()
    timing([100, 300, 1000, 3000], 3 if args.quick else 7)
    success(10 if args.quick else 40)


if __name__ == "__main__":
    main()

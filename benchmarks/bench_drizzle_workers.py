"""Drizzling exposures in worker processes vs in the calling process.

Simulates a visit (default 4 exposures x 2 chips of 1024x2048), then times,
for each worker count, building a `DrizzleResample` with cosmic-ray
rejection (one drizzle of every exposure, the median, a second drizzle of
the flagged ones) and re-drizzling three exposures after a WCS update (what
every alignment iteration does). Runs alternate between the worker counts;
the table gives the median of ``--repeats`` runs and the ratio against one
process, and checks that the products are bit-identical. Alternating
restarts the workers, so every timed run includes their start-up, as a new
process does once.

Run::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_drizzle_workers.py
    PYTHONPATH=. .venv/bin/python benchmarks/bench_drizzle_workers.py --quick
"""

import argparse
import tempfile
import time

import numpy as np

from subpixal_jax.reference.resample import DrizzleResample
from subpixal_jax.simulate import simulate_exposures


def one_run(paths, workers):
    """Seconds for set-up and for one 3-exposure update; the final products."""
    t0 = time.perf_counter()
    r = DrizzleResample(paths, cr_reject=True, workers=workers)
    _ = r.sci
    t1 = time.perf_counter()
    for i in (1, 2, 3):
        w = r.exposures[i].chips[0].wcs.deepcopy()
        w.wcs.crpix = w.wcs.crpix + np.array([0.3, -0.2])
        r.update_wcs(i, {r.exposures[i].chips[0].extver: w})
    sci = r.sci
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, r.n_drizzles, sci, r.wht


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip-shape", type=int, nargs=2, default=(1024, 2048))
    parser.add_argument("--workers", type=int, nargs="+", default=(1, 2, 4))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="512x1024, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.chip_shape, args.repeats = (512, 1024), 1
    with tempfile.TemporaryDirectory() as tmp:
        paths = simulate_exposures(
            tmp, n_exposures=4, chip_shape=tuple(args.chip_shape), seed=0
        ).paths
        times = {w: [] for w in args.workers}
        products = {}
        for _ in range(args.repeats):
            for w in args.workers:
                setup, update, n, sci, wht = one_run(paths, w)
                times[w].append((setup, update))
                products[w] = (n, sci, wht)
    ny, nx = args.chip_shape
    print(f"4 exposures x 2 chips of {ny}x{nx}; median of {args.repeats}")
    print(f"{'workers':>7} {'set-up s':>9} {'update s':>9} {'ratio':>6} {'equal':>6}")
    base = np.median([a + b for a, b in times[args.workers[0]]])
    for w in args.workers:
        setup = np.median([a for a, _ in times[w]])
        update = np.median([b for _, b in times[w]])
        total = np.median([a + b for a, b in times[w]])
        n, sci, wht = products[w]
        ref = products[args.workers[0]]
        equal = n == ref[0] and np.array_equal(sci, ref[1])
        equal = equal and np.array_equal(wht, ref[2])
        print(f"{w:>7} {setup:>9.2f} {update:>9.2f} {base / total:>6.2f} {equal!s:>6}")


if __name__ == "__main__":
    main()

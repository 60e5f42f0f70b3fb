"""Wall time of align_visits for many small visits on 1 and 2 local workers.

Every visit is 3 simulated two-chip exposures of 128 x 256 pixels. Each
cluster is warmed first (every worker process aligns one visit, paying its
JAX compilation once; reported separately as ``warm s``); then the timed
runs align fresh copies of the visits into a temporary directory.
Scaling efficiency is ``T(1 worker) / (k * T(k workers))``.

Usage::

    python benchmarks/bench_visits.py            # 8 and 32 visits
    python benchmarks/bench_visits.py --quick    # 4 and 8 visits
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster

from subpixal_jax.apps.distributed import align_visits
from subpixal_jax.simulate import simulate_exposures

OPTIONS = {"nmax": 2, "fitgeom": "rscale"}


def _warm(paths):
    from subpixal_jax.align import align_files

    align_files(paths, **OPTIONS)


def main() -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 and 8 visits")
    args = parser.parse_args()
    counts = (4, 8) if args.quick else (8, 32)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        visits = [
            simulate_exposures(
                root / f"v{k}", n_exposures=3, chip_shape=(128, 256), seed=k
            ).paths
            for k in range(max(counts) + 1)
        ]
        print(f"simulated {len(visits)} visits in {time.perf_counter() - start:.1f} s")
        warm_visit, visits = visits[0], visits[1:]
        rows = []
        wall: dict[tuple[int, int], float] = {}
        for workers in (1, 2):
            with (
                LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                ) as cluster,
                Client(cluster) as client,
            ):
                start = time.perf_counter()
                client.run(_warm, [str(p) for p in warm_visit])
                warm = time.perf_counter() - start
                for n in counts:
                    out = root / f"out-{workers}-{n}"
                    out.mkdir()
                    start = time.perf_counter()
                    table = align_visits(
                        visits[:n], client=client, output_dir=out, **OPTIONS
                    )
                    wall[workers, n] = time.perf_counter() - start
                    ok = int((table["status"] == "SUCCESS").sum())
                    rows.append((workers, n, warm, wall[workers, n], ok, len(table)))
        print("| workers | visits | warm s | wall s | visits/s | efficiency | ok |")
        print("|---|---|---|---|---|---|---|")
        for workers, n, warm, t, ok, total in rows:
            eff = wall[1, n] / (workers * t)
            print(
                f"| {workers} | {n} | {warm:.1f} | {t:.1f} | {n / t:.2f} "
                f"| {eff:.2f} | {ok}/{total} |"
            )


if __name__ == "__main__":
    main()

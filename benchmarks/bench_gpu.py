"""End-to-end alignment time per stage on whatever device JAX sees.

Simulates the demo data set (default 4 exposures x 2 chips of 512x1024,
``subpixal_jax.simulate.simulate_exposures``), then runs
``align_images`` twice on fresh resamplers in one process:

* **cold**: every kernel compiled (a private, empty persistent compilation
  cache, so earlier runs on this machine do not help);
* **warm**: same shapes again, nothing compiled.

Stage times come from wrapping the library's stage functions for the
duration of the runs. Indented stages are nested: chip pixel maps are made
inside "drizzle exposures", which runs in the set-up, in every re-drizzle
and in cosmic-ray rejection, so those rows overlap.
Compilations are counted with :func:`subpixal_jax.compilation.count_compilations`.

Run::

    .venv/bin/python benchmarks/bench_gpu.py              # demo size
    .venv/bin/python benchmarks/bench_gpu.py --quick      # 4 exposures, 256x512
    .venv/bin/python benchmarks/bench_gpu.py --chip-shape 2048 4096   # ACS-size

On a GPU machine install the CUDA wheels first (``pip install -e .[gpu]``);
``JAX_PLATFORMS=cpu`` forces the CPU for comparison.
"""

import argparse
import contextlib
import os
import tempfile
import threading
import time
from collections import defaultdict

import jax
import numpy as np

from subpixal_jax import align
from subpixal_jax.compilation import count_compilations, enable_compilation_cache
from subpixal_jax.pipeline import stages
from subpixal_jax.reference import resample as resample_module
from subpixal_jax.reference.catalog import PhotutilsCatalog
from subpixal_jax.reference.resample import DrizzleResample
from subpixal_jax.simulate import simulate_exposures

#: (label, owner, attribute, depth): the stages that are timed.
STAGES = (
    ("resampler set-up (drizzle all)", None, "setup", 0),
    ("  chip pixel maps", resample_module, "chip_pixmap", 1),
    ("  drizzle exposures (+ maps)", DrizzleResample, "_drizzle_exposures", 1),
    ("catalog detection (photutils)", PhotutilsCatalog, "_detect", 0),
    ("cutouts + pixmap nodes", stages, "create_cutouts", 0),
    ("measure displacements", stages, "measure_displacements", 0),
    ("  build batches", stages, "iter_batches", 1),
    ("linear fits", stages, "fit_points", 0),
    ("WCS corrections", stages, "correct_wcs", 0),
    # WCS updates are drizzled when the products are next read.
    ("re-drizzle updated images", DrizzleResample, "_sync", 0),
    ("cosmic-ray re-rejection", DrizzleResample, "reject_cosmic_rays", 0),
)


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class StageTimer:
    """Wall time, call count and peak RSS per wrapped stage function.

    A sampler thread reads the resident set size every ``interval`` seconds
    and raises the peak of every stage running at that moment, so a stage's
    peak is the most memory the process held while it ran (what it
    allocated on top of what was live before it). Drizzle worker processes
    are not counted (they hold one exposure's inputs and output each).
    """

    def __init__(self, interval: float = 0.02):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.peak_rss = defaultdict(int)
        self._running = defaultdict(int)
        self._interval = interval
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(self._interval):
            self.note_rss()

    def note_rss(self, label=None):
        rss = _rss_bytes()
        labels = [k for k, n in list(self._running.items()) if n] + [label]
        for k in labels:
            self.peak_rss[k] = max(self.peak_rss[k], rss)

    def wrap(self, label, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            self._running[label] += 1
            self.note_rss(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self.note_rss(label)
                self._running[label] -= 1
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        return timed

    def wrap_iterator(self, label, fn):
        """Time the work of each step of the iterator ``fn`` returns."""

        def timed(*args, **kwargs):
            steps = iter(fn(*args, **kwargs))
            while True:
                start = time.perf_counter()
                try:
                    item = next(steps)
                except StopIteration:
                    return
                finally:
                    self.seconds[label] += time.perf_counter() - start
                    self.calls[label] += 1
                yield item

        return timed

    @contextlib.contextmanager
    def patched(self):
        saved = []
        for label, owner, attr, _ in STAGES:
            if owner is None:
                continue
            fn = getattr(owner, attr)
            saved.append((owner, attr, fn))
            wrap = self.wrap_iterator if attr == "iter_batches" else self.wrap
            setattr(owner, attr, wrap(label, fn))
        self._sampler.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._sampler.join()
            for owner, attr, fn in saved:
                setattr(owner, attr, fn)


def run_once(paths, options, early_kernel, final_kernel):
    """One alignment from the files.

    Returns (timer, compile stats, wall, result, drizzle workers, load
    averages before and after): other jobs on the machine slow every stage,
    so the table says how busy it was.
    """
    timer = StageTimer()
    load_before = os.getloadavg()[0]
    with count_compilations() as stats, timer.patched():
        start = time.perf_counter()
        resample = timer.wrap("resampler set-up (drizzle all)", DrizzleResample)(
            paths, kernel=final_kernel, early_kernel=early_kernel
        )
        # the finder align_files uses by default (no absolute tie)
        catalog = PhotutilsCatalog(centroid="moment")
        result = align.align_images(catalog, resample, **options)
        wall = time.perf_counter() - start
    load = (load_before, os.getloadavg()[0])
    return timer, stats, wall, result, resample.workers, load


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip-shape", type=int, nargs=2, default=(512, 1024))
    parser.add_argument("--n-exposures", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fitgeom", default="general")
    parser.add_argument(
        "--quick", action="store_true", help="4 exposures of 2 chips of 256x512"
    )
    parser.add_argument(
        "--early-kernel",
        default=align.EARLY_KERNEL,
        help="drizzle kernel of the catalog and cosmic-ray iterations, as "
        "align_files (default %(default)s); 'none': the final one throughout",
    )
    parser.add_argument(
        "--final-kernel",
        default=align.FINAL_KERNEL,
        help="drizzle kernel of the last iterations, as align_files "
        "(default %(default)s)",
    )
    args = parser.parse_args()
    if args.quick:
        args.chip_shape, args.n_exposures = (256, 512), 4
    early = None if args.early_kernel == "none" else args.early_kernel

    with tempfile.TemporaryDirectory() as tmp:
        enable_compilation_cache(f"{tmp}/jax-cache")
        t0 = time.perf_counter()
        sim = simulate_exposures(
            f"{tmp}/data",
            n_exposures=args.n_exposures,
            chip_shape=tuple(args.chip_shape),
            seed=args.seed,
        )
        t_sim = time.perf_counter() - t0
        options = {"fitgeom": args.fitgeom, "reference": 0}
        cold = run_once(sim.paths, options, early, args.final_kernel)
        warm = run_once(sim.paths, options, early, args.final_kernel)

    devices = ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices())
    ny, nx = args.chip_shape
    print(
        f"device(s): {devices}; {args.n_exposures} exposures x 2 chips of "
        f"{ny}x{nx} (simulated in {t_sim:.1f} s)"
    )
    result = warm[3]
    n_src = [r["n_sources"] for r in result.summary if r["iteration"] == 1]
    print(
        f"status {result.status} after {result.n_iterations} iterations; "
        f"sources per image in iteration 1: {n_src}"
    )
    print()
    head = f"{'stage':<34} {'calls':>6} {'cold [s]':>9} {'warm [s]':>9}"
    head += f" {'peak RSS cold/warm [GB]':>24}"
    print(head)
    print("-" * len(head))
    for label, _, _, _ in STAGES:
        calls = warm[0].calls.get(label, 0)
        if not calls and not cold[0].calls.get(label, 0):
            continue
        rss = "-"  # iterators' steps are not sampled
        if cold[0].peak_rss[label]:
            rss = f"{cold[0].peak_rss[label] / 1e9:.2f} / "
            rss += f"{warm[0].peak_rss[label] / 1e9:.2f}"
        print(
            f"{label:<34} {calls:>6} {cold[0].seconds[label]:>9.2f} "
            f"{warm[0].seconds[label]:>9.2f} {rss:>24}"
        )
    print("-" * len(head))
    rss = f"{max(cold[0].peak_rss.values()) / 1e9:.2f} / "
    rss += f"{max(warm[0].peak_rss.values()) / 1e9:.2f}"
    print(f"{'total (wall)':<34} {'':>6} {cold[2]:>9.2f} {warm[2]:>9.2f} {rss:>24}")
    print()
    print(f"cold: {cold[1]}; warm: {warm[1]}")
    print(
        f"drizzle workers: {cold[4]}; kernels: {early} then {args.final_kernel}; "
        f"1-min load average before/after: "
        f"cold {cold[5][0]:.1f}/{cold[5][1]:.1f}, "
        f"warm {warm[5][0]:.1f}/{warm[5][1]:.1f} ({os.cpu_count()} CPUs)"
    )
    per_image = np.array(
        [r["rmse"] for r in result.summary if r["iteration"] == result.n_iterations],
        dtype=float,
    )
    print(f"final fit RMS per image [px]: {np.round(per_image, 4).tolist()}")


if __name__ == "__main__":
    main()

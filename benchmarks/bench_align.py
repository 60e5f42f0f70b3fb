"""Wall time of a whole alignment, split into stages, vs an original-style loop.

For 4 and 16 simulated two-chip exposures (exposure 0 held fixed, 3
iterations, ``nmax=3``):

* ``align_images`` end to end: a first run (which compiles the kernels for
  this data set's bucket shapes) and a second, timed run on a fresh
  resample; the difference is reported as compile time.
* A manual loop that mirrors the ``align_images`` iterations stage by stage
  (drizzle and leave-one-out references, catalog on the median image,
  cutouts and pixmaps, kernels, fit, WCS update; no joint solution or CR
  re-rejection), timed with ``time.perf_counter`` on its second run (warm).
* The same displacement stage done the way the original works, per source:
  four ``drizzle.resample.blot_image`` calls on the source's reference
  cutout with the four half-pixel pixmaps, ``scipy.signal.fftconvolve`` per
  blot, interlacing and a 5x5 quadratic peak fit in numpy
  (``bench_displacement.original_find_displacement``); same cutouts, same
  run, with the ratio.

* The capture stage (``subpixal_jax.pipeline.coarse.capture_stage``: source
  detection on every chip, triangle matching against the anchor exposure,
  the WCS update when needed), per captured exposure, median of 3 runs: on
  the small-offset set (nothing to apply) and on a set whose exposures are
  off by 23-250 px (each run on a fresh resample); and ``align_images``
  warm with ``capture='always'`` vs ``'off'`` on the small-offset set.

* ``--warm-only``: ``align_images`` with its default options (as
  ``subpixal-jax align`` runs it, resample construction included) on the
  default demo set (4 exposures x 2 chips 512x1024), warm: one compiling
  run, then the median of 3 runs in the same process, with the number of
  single-chip drizzles of one run (``DrizzleResample.n_drizzles``).

Run::

    .venv/bin/python benchmarks/bench_align.py [--quick] [--capture-only]
    .venv/bin/python benchmarks/bench_align.py --warm-only

``--quick`` uses 128x256 chips and 4 exposures only; ``--capture-only``
runs the capture section alone.
"""

import argparse
import os
import tempfile
import time
from collections import defaultdict

import numpy as np
from bench_displacement import original_find_displacement
from drizzle.resample import blot_image

from subpixal_jax import align
from subpixal_jax.core.batch import HALF_PIXEL_SHIFTS
from subpixal_jax.geometry.cutouts import create_cutouts, create_primary_cutouts
from subpixal_jax.io.wcs import correct_wcs
from subpixal_jax.options import AlignOptions
from subpixal_jax.pipeline import stages
from subpixal_jax.pipeline.coarse import capture_stage
from subpixal_jax.reference.catalog import PhotutilsCatalog
from subpixal_jax.reference.resample import DrizzleResample
from subpixal_jax.simulate import WcsError, simulate_exposures

N_ITERATIONS = 3
#: Runs of each capture timing (the median is reported).
CAPTURE_REPEATS = 3
#: Warm runs of the default-options timing (the median is reported).
WARM_REPEATS = 3
#: Exposures 1-3 of the large-offset set (exposure 0 has none).
LARGE = [
    WcsError((23.0, -7.5)),
    WcsError((-117.0, 40.0), rotation=2.0),
    WcsError((250.0, -180.0)),
]


def original_displacements(cutouts):
    """Per-source blots (drizzle) + CC (scipy) + peak fit (numpy)."""
    out = []
    for c in cutouts:
        h, w = c.shape
        blots = [
            blot_image(
                c.ref,
                np.ascontiguousarray(c.pixmap[b::2, a::2][:h, :w]),
                fillval=0.0,
                iscale=float(c.iscale),
                interp="poly5",
            )
            for a, b in HALF_PIXEL_SHIFTS
        ]
        out.append(original_find_displacement(c.image, blots))
    return out


def staged_run(paths, *, original):
    """One alignment written out stage by stage; returns stage times (s)."""
    t = defaultdict(float)
    start = time.perf_counter()
    resample = DrizzleResample(paths)
    t["drizzle/reference"] += time.perf_counter() - start

    start = time.perf_counter()
    catalog = PhotutilsCatalog()
    # As align_images with 3+ exposures: detect on the CR-free median.
    median, covered = resample.median_image()
    catalog.set_image(median, mask=~covered)
    table, segmentation = catalog.catalog, catalog.segmentation
    primaries = create_primary_cutouts(table, segmentation, ref_valid=resample.wht > 0)
    t["catalog"] += time.perf_counter() - start

    options = AlignOptions.create(nmax=N_ITERATIONS, reference=0)
    wcslin = resample.output_wcs
    center = np.asarray(wcslin.wcs.crpix, dtype=float) - 1.0
    todo = range(1, len(paths))
    n_sources = 0
    for _ in range(N_ITERATIONS):
        cutouts = []
        for i in todo:
            start = time.perf_counter()
            ref_sci, ref_wht = resample.leave_out([i])
            t["drizzle/reference"] += time.perf_counter() - start
            start = time.perf_counter()
            cutouts.append(
                create_cutouts(
                    primaries,
                    segmentation,
                    ref_sci,
                    ref_wht > 0,
                    wcslin,
                    resample.exposures[i],
                    sky=resample.sky[i],
                )
            )
            t["cutouts+pixmaps"] += time.perf_counter() - start
        n_sources += sum(len(c) for c in cutouts)

        start = time.perf_counter()
        measured = stages.measure_displacements(cutouts)
        t["kernels"] += time.perf_counter() - start
        if original:
            start = time.perf_counter()
            for cuts in cutouts:
                original_displacements(cuts)
            t["original displacements"] += time.perf_counter() - start

        start = time.perf_counter()
        points = [
            stages.fit_inputs(cuts, meas, resample.exposures[i], wcslin, options)
            for i, cuts, meas in zip(todo, cutouts, measured, strict=True)
        ]
        points = stages.robust_inliers(points, center, options)
        fits = stages.fit_points(points, center, options)
        t["fit"] += time.perf_counter() - start

        for i, fit in zip(todo, fits, strict=True):
            start = time.perf_counter()
            new = {
                c.extver: correct_wcs(
                    c.wcs, wcslin, fit.matrix, fit.shift, center=center
                )
                for c in resample.exposures[i].chips
            }
            t["wcs update"] += time.perf_counter() - start
            start = time.perf_counter()
            resample.update_wcs(i, new)
            t["drizzle/reference"] += time.perf_counter() - start
    return t, n_sources


def timed_align(paths, **options):
    start = time.perf_counter()
    resample = DrizzleResample(paths)
    result = align.align_images(
        PhotutilsCatalog(), resample, reference=0, nmax=N_ITERATIONS, **options
    )
    return time.perf_counter() - start, result


def warm_default_align(paths) -> tuple[list[float], int, object]:
    """Warm ``align_images`` with default options: seconds of each run, drizzles."""
    runs, n_drizzles, result = [], None, None
    for k in range(1 + WARM_REPEATS):  # the first run compiles
        start = time.perf_counter()
        resample = DrizzleResample(paths)
        result = align.align_images(PhotutilsCatalog(), resample)
        if k:
            runs.append(time.perf_counter() - start)
        n_drizzles = resample.n_drizzles
    return runs, n_drizzles, result


def warm_only() -> None:
    """The ``--warm-only`` section (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate_exposures(tmp, seed=0)
        runs, n_drizzles, result = warm_default_align(sim.paths)
    print(
        "align_images, default options, 4 x 2 x 512x1024, warm: "
        f"median {np.median(runs):.2f} s of {', '.join(f'{t:.2f}' for t in runs)}; "
        f"{n_drizzles} chip drizzles; {result.n_iterations} iterations, "
        f"{result.status}; load average {os.getloadavg()[0]:.1f}"
    )


def capture_seconds(paths) -> tuple[float, list]:
    """Median seconds of the capture stage per captured exposure, and its results."""
    options = AlignOptions.create(reference=0)
    todo = list(range(1, len(paths)))
    times = []
    for _ in range(CAPTURE_REPEATS):
        resample = DrizzleResample(paths)
        start = time.perf_counter()
        found = capture_stage(resample, resample.output_wcs, options, todo)
        times.append((time.perf_counter() - start) / len(todo))
    return float(np.median(times)), found


def capture_rows(chip_shape) -> list[tuple[str, float]]:
    """The capture section's rows: (label, seconds)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        small = simulate_exposures(tmp + "/small", chip_shape=chip_shape, seed=0)
        per_exp, _ = capture_seconds(small.paths)
        rows.append(("capture/exposure, small offsets", per_exp))
        warm = {}
        for mode in ("off", "always"):
            timed_align(small.paths, capture=mode)  # compiles
            warm[mode] = float(
                np.median(
                    [
                        timed_align(small.paths, capture=mode)[0]
                        for _ in range(CAPTURE_REPEATS)
                    ]
                )
            )
        rows.append(("align_images, capture='off'", warm["off"]))
        rows.append(("align_images, capture='always'", warm["always"]))
        large = simulate_exposures(
            tmp + "/large",
            chip_shape=chip_shape,
            seed=0,
            errors=[WcsError((0.0, 0.0)), *LARGE],
        )
        per_exp, found = capture_seconds(large.paths)
        rows.append(("capture/exposure, 23-250 px", per_exp))
        print(
            "large-offset captures:",
            [f"{c.status.name} {c.n_matches}" for c in found if c is not None],
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small chips, 4 only")
    parser.add_argument(
        "--capture-only", action="store_true", help="the capture section alone"
    )
    parser.add_argument(
        "--warm-only",
        action="store_true",
        help="warm align_images with default options on the demo set alone",
    )
    args = parser.parse_args()
    if args.warm_only:
        warm_only()
        return
    chip_shape = (128, 256) if args.quick else (256, 512)
    counts = (4,) if args.quick else (4, 16)
    capture = capture_rows(chip_shape)
    print(
        f"capture stage, 4 exposures of 2 x {chip_shape[0]}x{chip_shape[1]}, "
        f"median of {CAPTURE_REPEATS}; seconds"
    )
    for label, seconds in capture:
        print(f"  {label:<34}{seconds:>10.2f}")
    if args.capture_only:
        return
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            sim = simulate_exposures(tmp, n_exposures=n, chip_shape=chip_shape, seed=0)
            cold, _ = timed_align(sim.paths)
            warm, result = timed_align(sim.paths)
            staged_run(sim.paths, original=False)  # compiles its own shapes
            stages, n_sources = staged_run(sim.paths, original=True)
        rows.append((n, cold, warm, result, stages, n_sources))

    print(
        f"chips 2 x {chip_shape[0]}x{chip_shape[1]}, {N_ITERATIONS} iterations, "
        "exposure 0 fixed; seconds"
    )
    header = f"{'stage':<26}" + "".join(f"{f'{n} exp':>12}" for n, *_ in rows)
    print(header)
    print("-" * len(header))

    def line(label, values, fmt="{:>12.2f}"):
        print(f"{label:<26}" + "".join(fmt.format(v) for v in values))

    line("align_images, 1st run", [r[1] for r in rows])
    line("align_images, 2nd run", [r[2] for r in rows])
    line("  compile (1st - 2nd)", [r[1] - r[2] for r in rows])
    line("  iterations", [r[3].n_iterations for r in rows], "{:>12d}")
    stages = (
        "drizzle/reference",
        "catalog",
        "cutouts+pixmaps",
        "kernels",
        "fit",
        "wcs update",
    )
    print("manual loop (warm):")
    for stage in stages:
        line(f"  {stage}", [r[4][stage] for r in rows])
    line("  total", [sum(r[4][s] for s in stages) for r in rows])
    line("  sources measured", [r[5] for r in rows], "{:>12d}")
    print("displacement stage:")
    line("  kernels (jax, batched)", [r[4]["kernels"] for r in rows])
    line("  original per-source loop", [r[4]["original displacements"] for r in rows])
    line(
        "  ratio original / jax",
        [r[4]["original displacements"] / r[4]["kernels"] for r in rows],
        "{:>11.1f}x",
    )
    line(
        "  jax per source (ms)",
        [1e3 * r[4]["kernels"] / r[5] for r in rows],
        "{:>12.3f}",
    )
    line(
        "  original per source (ms)",
        [1e3 * r[4]["original displacements"] / r[5] for r in rows],
        "{:>12.3f}",
    )
    for n, _, _, result, _, _ in rows:
        print(f"{n} exposures: align_images status {result.status}")


if __name__ == "__main__":
    main()

"""Time of ``stages.image_cutouts`` per image: leave-one-out reference and cutouts.

On a simulated set (default: the demo set, 4 exposures x 2 chips 512x1024),
after building the resample and the catalog as ``align_images`` does, times
for every image *i* (median of ``--repeats`` runs):

* ``auto``: ``subpixal_jax.pipeline.stages.image_cutouts`` as the loop
  calls it (leave-one-out values read inside the cutout boxes, or the whole
  frame once when the boxes would cost more: ``FULL_READ_RATIO``);
* ``boxes``: the same, always box by box (``FULL_READ_RATIO = inf``);
* ``full frame``: the former path, ``resample.leave_out([i])`` (two
  full-frame float32 arrays) then ``create_cutouts`` on those arrays;
* ``leave_out``: the full-frame ``leave_out`` alone (what the boxes save);
* ``box reads``: ``leave_out_reader([i]).read`` of every cutout's reference
  box (what they cost instead);
* ``peak MB``: the peak of memory allocated (``tracemalloc``, which numpy
  reports to) during one call: auto / boxes / full frame.

It checks that both paths give equal cutouts (every field). Run::

    .venv/bin/python benchmarks/bench_leave_out.py
    .venv/bin/python benchmarks/bench_leave_out.py --chip 2048 4096 --n 2
    .venv/bin/python benchmarks/bench_leave_out.py --chip 1024 2048 --n 2 \
        --stars 300 --galaxies 100
"""

import argparse
import tempfile
import time
import tracemalloc

import numpy as np

from subpixal_jax.geometry import cutouts
from subpixal_jax.geometry.cutouts import create_cutouts
from subpixal_jax.options import AlignOptions
from subpixal_jax.pipeline import stages
from subpixal_jax.pipeline.loop import refresh_catalog
from subpixal_jax.reference.catalog import PhotutilsCatalog
from subpixal_jax.reference.resample import DrizzleResample
from subpixal_jax.simulate import simulate_exposures


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def _full_frame(i, resample, catalog_state, options):
    sci, wht = resample.leave_out([i])
    return create_cutouts(
        catalog_state.primaries,
        catalog_state.segmentation,
        sci,
        wht > 0,
        resample.output_wcs,
        resample.exposures[i],
        sky=resample.sky[i],
        combine_seg_mask=options.combine_seg_mask,
    )


def _peak_mb(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def _box_reads(reader, cutouts):
    ny, nx = reader.shape
    for c in cutouts:
        (x1, y1), (x2, y2) = c.ref_blc, c.ref_trc
        reader.read(
            (
                slice(max(y1, 0), min(y2, ny - 1) + 1),
                slice(max(x1, 0), min(x2, nx - 1) + 1),
            )
        )


def _same(a, b):
    return len(a) == len(b) and all(
        all(
            np.array_equal(getattr(x, f), getattr(y, f)) for f in x.__dataclass_fields__
        )
        for x, y in zip(a, b, strict=True)
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip", type=int, nargs=2, default=(512, 1024))
    parser.add_argument("--n", type=int, default=4, help="exposures")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stars", type=int, help="n_stars (default: the simulator's)")
    parser.add_argument("--galaxies", type=int, help="n_galaxies")
    parser.add_argument(
        "--every",
        type=int,
        nargs="+",
        default=[1],
        help="keep every k-th catalog source (a sparser field); one table per k",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate_exposures(
            tmp,
            n_exposures=args.n,
            chip_shape=tuple(args.chip),
            n_stars=args.stars,
            n_galaxies=args.galaxies,
        )
        start = time.perf_counter()
        resample = DrizzleResample(sim.paths)
        options = AlignOptions.create()
        catalog_state = refresh_catalog(PhotutilsCatalog(), resample, options)
        setup = time.perf_counter() - start
    ny, nx = resample.output_shape
    print(
        f"{args.n} x 2 chips {args.chip[0]}x{args.chip[1]}, grid {ny}x{nx}, "
        f"{len(catalog_state.primaries)} primaries (setup {setup:.1f} s)"
    )
    for every in args.every:
        sparse = stages.CatalogState(
            catalog_state.primaries[::every], catalog_state.segmentation
        )
        print(f"every {every}-th source: {len(sparse.primaries)} primaries")
        _table(args, resample, sparse, options)


def _table(args, resample, catalog_state, options):
    print(
        "  i  cutouts  auto s  boxes s  full frame s  leave_out s  box reads s"
        "  peak MB auto/boxes/full  equal"
    )
    for i in range(args.n):

        def auto(i=i):
            return stages.image_cutouts(
                i, resample, catalog_state, options, frozenset()
            )

        def boxes(i=i):
            ratio = cutouts.FULL_READ_RATIO
            cutouts.FULL_READ_RATIO = float("inf")
            try:
                return auto(i)
            finally:
                cutouts.FULL_READ_RATIO = ratio

        def full(i=i):
            return _full_frame(i, resample, catalog_state, options)

        t_auto, new = _median_time(auto, args.repeats)
        t_boxes, by_box = _median_time(boxes, args.repeats)
        t_old, old = _median_time(full, args.repeats)
        t_loo, _ = _median_time(lambda i=i: resample.leave_out([i]), args.repeats)
        reader = resample.leave_out_reader([i])
        t_read, _ = _median_time(
            lambda reader=reader, new=new: _box_reads(reader, new), args.repeats
        )
        peaks = "/".join(f"{_peak_mb(f):.0f}" for f in (auto, boxes, full))
        print(
            f"{i:3d} {len(new):8d} {t_auto:7.3f} {t_boxes:8.3f} {t_old:13.3f}"
            f" {t_loo:12.3f} {t_read:12.3f} {peaks:>24s}"
            f"  {_same(new, old) and _same(by_box, old)}"
        )


if __name__ == "__main__":
    main()

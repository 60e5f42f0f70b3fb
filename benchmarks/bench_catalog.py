"""Source detection on a drizzled reference: the catalog's cost, time and memory.

A field of Gaussian stars (sigma 1.5 px, one per 1600 px², fluxes 10^2-10^4.5,
sky 20, noise 3), float32 like a drizzled image, at a demo-set and an ACS-visit
size. Rows, each the median of ``--repeat`` runs in this process (the paths
take turns):

* **former**: the path this project used first, re-created with photutils
  alone: `SourceFinder` deblending every segment, then `SourceCatalog` with
  windowed centroids;
* **before**: the `PhotutilsCatalog(centroid='moment')` of commit d2c4f21,
  re-created with photutils alone: float64 copies, photutils' full-size
  background and RMS maps (cubic-spline zoom of the mesh), a 2-D kernel
  convolution, a full-size threshold, the segmentation copied on access;
* **win**: `PhotutilsCatalog(centroid='win')` now;
* **moment**: `PhotutilsCatalog(centroid='moment')` now, the finder
  ``align_files`` uses unless an absolute tie needs windowed centroids.

Peak memory is the `tracemalloc` peak above the start of each call (numpy
reports its array buffers to tracemalloc), in a separate run so that tracing
does not slow the timed ones; it includes what the call returns (catalog and
segmentation) but not the input image. "same segm" compares the moment row's
segmentation with the before row's, label for label.

Run::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_catalog.py [--quick]
"""

import argparse
import functools
import time
import tracemalloc

import numpy as np
from astropy.stats import SigmaClip
from photutils.background import Background2D, MedianBackground
from photutils.segmentation import (
    SourceCatalog,
    SourceFinder,
    deblend_sources,
    detect_sources,
    make_2dgaussian_kernel,
)
from scipy import ndimage

from subpixal_jax.reference.catalog import PhotutilsCatalog, _multi_peaked_labels


def star_field(side: int, seed: int = 0) -> np.ndarray:
    """A ``side`` x ``side`` float32 field of Gaussian stars on a noisy sky."""
    rng = np.random.default_rng(seed)
    image = rng.normal(20.0, 3.0, (side, side))
    n = side * side // 1600
    xs, ys = rng.uniform(10, side - 10, n), rng.uniform(10, side - 10, n)
    fluxes = 10 ** rng.uniform(2.0, 4.5, n)
    yy, xx = np.mgrid[-7:8, -7:8]
    for x0, y0, f in zip(xs, ys, fluxes, strict=True):
        i, j = int(y0), int(x0)
        r2 = (xx + j - x0) ** 2 + (yy + i - y0) ** 2
        image[i - 7 : i + 8, j - 7 : j + 8] += (
            f / (2 * np.pi * 2.25) * np.exp(-r2 / 4.5)
        )
    return image.astype(np.float32)


def _photutils_maps(image, bad, finder):
    """Background2D's full-size float64 background and RMS maps."""
    bkg = Background2D(
        image,
        min(finder.box_size, *image.shape),
        mask=bad,
        filter_size=finder.filter_size,
        sigma_clip=SigmaClip(sigma=3.0, maxiters=10),
        bkg_estimator=MedianBackground(),
    )
    return bkg.background, bkg.background_rms


def _kernel(finder):
    size = 2 * int(np.ceil(1.5 * finder.kernel_fwhm)) + 1
    return make_2dgaussian_kernel(finder.kernel_fwhm, size=size).array


def former_catalog(image: np.ndarray, finder: PhotutilsCatalog):
    """Deblend every segment, windowed centroids (the first path)."""
    bkg, rms = _photutils_maps(image, None, finder)
    sub = image - bkg
    conv = ndimage.convolve(sub, _kernel(finder), mode="constant")
    segm = SourceFinder(finder.n_pixels, progress_bar=False)(
        conv, finder.threshold_sigma * rms
    )
    cat = SourceCatalog(sub, segm, convolved_data=conv, error=rms, progress_bar=False)
    return len(cat.x_centroid_win), segm.data


def before_catalog(image: np.ndarray, finder: PhotutilsCatalog):
    """The float64 moment path of commit d2c4f21, array for array."""
    data = np.array(image, dtype=np.float64)
    bad = ~np.isfinite(data)
    bad |= np.zeros(data.shape, dtype=bool)  # the pixel mask run_finder passes
    data[bad] = 0.0
    bkg, rms = _photutils_maps(data, bad, finder)
    sub = np.where(bad, 0.0, data - bkg)
    conv = ndimage.convolve(sub, _kernel(finder), mode="constant")
    rms_ok = np.isfinite(rms) & (rms > 0)
    rms = np.where(rms_ok, rms, np.median(rms[rms_ok]))
    segm = detect_sources(conv, finder.threshold_sigma * rms, finder.n_pixels, mask=bad)
    segm = deblend_sources(
        conv,
        segm,
        finder.n_pixels,
        labels=_multi_peaked_labels(conv, segm.data),
        progress_bar=False,
    )
    cat = SourceCatalog(
        sub, segm, convolved_data=conv, error=rms, mask=bad, progress_bar=False
    )
    columns = [cat.x_centroid, cat.y_centroid, cat.segment_flux, cat.segment_flux_err]
    for name in ("fwhm", "semimajor_axis", "semiminor_axis", "ellipticity"):
        columns.append(getattr(cat, name).value)
    columns.append(cat.segment_area.value)
    segmentation = np.asarray(segm.data, dtype=np.int32)
    return len(columns[0]), segmentation.copy()  # the former property copied


def run_finder(image: np.ndarray, centroid: str):
    """Detect with `PhotutilsCatalog`; return the source count and segmentation."""
    finder = PhotutilsCatalog(centroid=centroid)
    finder.set_image(image, mask=np.zeros(image.shape, dtype=bool))
    return len(finder.catalog), finder.segmentation


def timed(paths: dict, repeat: int):
    """Median wall time of ``repeat`` calls of each path, and its last result.

    The paths take turns in each round, so that a load that changes during
    the run weighs on all of them alike.
    """
    times = {name: [] for name in paths}
    outs = {}
    for _ in range(repeat):
        for name, fn in paths.items():
            start = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}, outs


def peak_mib(fn) -> float:
    """tracemalloc peak above the start of one call, MiB."""
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del out
    return (peak - start) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo size only")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-former", action="store_true", help="skip the former row")
    args = parser.parse_args()
    sides = (1450,) if args.quick else (1450, 4200)
    print(
        f"{'side':>5} {'sources':>7} {'former s':>8} {'before s':>8} {'win s':>6}"
        f" {'moment s':>8} {'before MiB':>10} {'moment MiB':>10}"
        f" {'time':>6} {'memory':>6} {'same segm':>9}"
    )
    for side in sides:
        image = star_field(side)
        finder = PhotutilsCatalog()
        paths = {
            "before": functools.partial(before_catalog, image, finder),
            "win": functools.partial(run_finder, image, "win"),
            "moment": functools.partial(run_finder, image, "moment"),
        }
        if not args.no_former:
            paths["former"] = functools.partial(former_catalog, image, finder)
        times, outs = timed(paths, args.repeat)
        peaks = {name: peak_mib(paths[name]) for name in ("before", "moment")}
        n, segm = outs["moment"]
        same = np.array_equal(segm, outs["before"][1])
        former = f"{times['former']:8.2f}" if "former" in times else f"{'-':>8}"
        print(
            f"{side:5d} {n:7d} {former} {times['before']:8.2f} {times['win']:6.2f}"
            f" {times['moment']:8.2f} {peaks['before']:10.0f} {peaks['moment']:10.0f}"
            f" {times['before'] / times['moment']:5.1f}x"
            f" {peaks['before'] / peaks['moment']:5.1f}x {same!s:>9}",
            flush=True,
        )


if __name__ == "__main__":
    main()

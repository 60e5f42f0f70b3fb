"""Source detection on a drizzled reference: the catalog's cost and its parts.

A field of Gaussian stars (sigma 1.5 px, one per 1600 px², fluxes 10^2-10^4.5,
sky 20, noise 3) at a demo-set and an ACS-visit size. Rows, each the median
of ``--repeat`` runs in this process:

* **former**: the path this project used before, re-created with photutils
  alone: `SourceFinder` deblending every segment, then `SourceCatalog` with
  windowed centroids;
* **win**: `PhotutilsCatalog(centroid='win')`, which deblends only the
  segments with two or more peaks (same segmentation, checked here);
* **moment**: `PhotutilsCatalog(centroid='moment')`, the finder
  ``align_files`` uses unless an absolute tie needs windowed centroids.

Run::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_catalog.py [--quick]
"""

import argparse
import functools
import time

import numpy as np
from astropy.stats import SigmaClip
from photutils.background import Background2D, MedianBackground
from photutils.segmentation import SourceCatalog, SourceFinder

from subpixal_jax.reference.catalog import PhotutilsCatalog


def star_field(side: int, seed: int = 0) -> np.ndarray:
    """A ``side`` x ``side`` field of Gaussian stars on a noisy sky."""
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
    return image


def former_catalog(image: np.ndarray, finder: PhotutilsCatalog):
    """Deblend every segment, windowed centroids (the former path)."""
    box = min(finder.box_size, *image.shape)
    bkg = Background2D(
        image,
        box,
        filter_size=finder.filter_size,
        sigma_clip=SigmaClip(sigma=3.0, maxiters=10),
        bkg_estimator=MedianBackground(),
    )
    sub = image - bkg.background
    conv = finder.smoothed(sub)
    segm = SourceFinder(finder.n_pixels, progress_bar=False)(
        conv, finder.threshold_sigma * bkg.background_rms
    )
    cat = SourceCatalog(
        sub, segm, convolved_data=conv, error=bkg.background_rms, progress_bar=False
    )
    return np.asarray(cat.x_centroid_win), segm.data


def run_finder(image: np.ndarray, centroid: str):
    """Detect with `PhotutilsCatalog`; return the source count and segmentation."""
    finder = PhotutilsCatalog(centroid=centroid)
    finder.set_image(image)
    return len(finder.catalog), finder.segmentation


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo size only")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    sides = (1450,) if args.quick else (1450, 4200)
    print(
        f"{'side':>5} {'sources':>7} {'former s':>9} {'win s':>7} {'moment s':>9}"
        f" {'former/moment':>13} {'same segm':>9}"
    )
    for side in sides:
        image = star_field(side)

        t_former, (_, segm_former) = timed(
            functools.partial(former_catalog, image, PhotutilsCatalog()), args.repeat
        )
        t_win, (n, segm) = timed(
            functools.partial(run_finder, image, "win"), args.repeat
        )
        t_moment, _ = timed(functools.partial(run_finder, image, "moment"), args.repeat)
        same = np.array_equal(segm, segm_former)
        print(
            f"{side:5d} {n:7d} {t_former:9.2f} {t_win:7.2f} {t_moment:9.2f}"
            f" {t_former / t_moment:12.1f}x {same!s:>9}",
            flush=True,
        )


if __name__ == "__main__":
    main()

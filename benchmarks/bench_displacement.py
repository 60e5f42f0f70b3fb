"""Throughput of the displacement stage (CC + interlace + peak fit).

Compares the batched, jitted ``find_displacements`` with a per-source loop
written the way the original works (docs/original.md §4–5: numpy normalisation, four
``scipy.signal.fftconvolve`` calls, interlacing, a numpy least-squares
quadratic fit), both measured in the same run on the same cutouts
(Gaussian sources at peak S/N 100, see ``subpixal_jax.testing.accuracy``).

Run::

    .venv/bin/python benchmarks/bench_displacement.py [--quick]

Times are medians per cutout; the compile time of each (N, n) shape is
reported separately (default path). Columns: ``default`` (footprint-masked
NCC, ``peak_fit='template'``: the Lagrange peak and the template fit
weighted by the pixel variances, as the pipeline calls it), ``lagrange``
(``peak_fit='lagrange'``, the default until the template fit),
``quad`` (``peak_fit='quadratic'``), ``exact``
(``exact_original=True``: the original's normalisation and peak fit),
``r=2`` the default with the bounded-lag path of later iterations
(``search_radius=2``: only lags within 2 px + the peak model's reach are
computed). ``max |d|`` compares ``exact`` with the loop.
"""

import argparse
import time

import jax
import numpy as np
from scipy.signal import fftconvolve

from subpixal_jax.core.xcorr import find_displacements
from subpixal_jax.testing.accuracy import make_case


def original_find_peak(image, w=5):
    """The original's centroid.find_peak path used by the cc module."""
    ny, nx = image.shape
    jmax, imax = np.unravel_index(np.argmax(image), image.shape)
    x1 = max(0, imax - w // 2)
    x2 = min(nx, x1 + w)
    y1 = max(0, jmax - w // 2)
    y2 = min(ny, y1 + w)
    if imax == x1 or jmax == y1:
        return float(imax), float(jmax)
    if x2 - x1 < w:
        x1, x2 = (0, min(nx, w)) if x1 == 0 else (max(0, nx - w), nx)
    if y2 - y1 < w:
        y1, y2 = (0, min(ny, w)) if y1 == 0 else (max(0, ny - w), ny)
    yy, xx = np.mgrid[y1:y2, x1:x2]
    x = xx.ravel().astype(float)
    y = yy.ravel().astype(float)
    a = np.stack([np.ones_like(x), x, y, x * y, x * x, y * y], axis=1)
    coef = np.linalg.lstsq(a, image[y1:y2, x1:x2].ravel(), rcond=None)[0]
    _, c10, c01, c11, c20, c02 = coef
    d = 4 * c20 * c02 - c11**2
    if d <= 0 or (c20 > 0 and c02 >= 0) or (c20 >= 0 and c02 > 0):
        return (x1 + x2) / 2, (y1 + y2) / 2
    xm = (c01 * c11 - 2 * c02 * c10) / d
    ym = (c10 * c11 - 2 * c01 * c20) / d
    if 0 < xm < nx - 1 and 0 < ym < ny - 1:
        return xm, ym
    return float(imax), float(jmax)


def original_find_displacement(img, blots):
    """Per-source NCC displacement as in the original cc.find_displacement."""
    nonzero = [b != 0 for b in blots]
    pool = np.concatenate([b[m] for b, m in zip(blots, nonzero, strict=True)])
    sd = pool.std()
    blots = [np.where(m, b / sd, 0) for b, m in zip(blots, nonzero, strict=True)]
    union = np.logical_or.reduce(nonzero)
    ref = img / img[union].std()
    k = [np.flip(fftconvolve(ref, np.flip(b), mode="same")) for b in blots]
    ny, nx = img.shape
    icc = np.empty((2 * ny, 2 * nx), dtype=k[0].dtype)
    icc[0::2, 0::2], icc[0::2, 1::2], icc[1::2, 0::2], icc[1::2, 1::2] = k
    xm, ym = original_find_peak(icc)
    return 0.5 * xm - (nx - 1) // 2, 0.5 * ym - (ny - 1) // 2


def make_batch(count, size, rng):
    cases = [make_case("gaussian", 100.0, size, rng) for _ in range(count)]
    refs = np.stack([c.image for c in cases]).astype(np.float32)
    blots = np.stack([c.refs for c in cases]).astype(np.float32)
    variances = np.stack([c.variance for c in cases]).astype(np.float32)
    return refs, blots, variances


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run")
    args = parser.parse_args()
    counts = (64, 256) if args.quick else (64, 256, 1024)
    sizes = (25,) if args.quick else (25, 41)
    repeats = 3 if args.quick else 7
    rng = np.random.default_rng(1)

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, float32, NCC")
    header = (
        f"{'n':>3} {'N':>5} {'compile s':>9} {'default':>8} {'lagrange':>8} "
        f"{'quad':>8} "
        f"{'exact':>8} {'r=2':>8} {'orig loop':>9} {'speed-up':>8} {'max |d|':>9}"
    )
    print("us per source; speed-up = orig loop / default")
    print(header)
    print("-" * len(header))
    for size in sizes:
        for count in counts:
            refs, blots, variances = make_batch(count, size, rng)
            dev_refs, dev_blots = jax.device_put(refs), jax.device_put(blots)
            dev_var = jax.device_put(variances)

            def batched(r=dev_refs, b=dev_blots, radius=None, **kw):
                return jax.block_until_ready(
                    find_displacements(r, b, search_radius=radius, **kw)
                )

            def default(radius=None, v=dev_var):
                return batched(radius=radius, variances=v)

            start = time.perf_counter()
            default()
            first = time.perf_counter() - start
            t_jax = median_time(default, repeats)
            compile_s = first - t_jax
            batched(peak_fit="lagrange")
            t_lagrange = median_time(lambda: batched(peak_fit="lagrange"), repeats)
            batched(peak_fit="quadratic")
            t_quad = median_time(lambda: batched(peak_fit="quadratic"), repeats)
            out = batched(exact_original=True)
            t_exact = median_time(lambda: batched(exact_original=True), repeats)
            default(radius=2)
            t_near = median_time(lambda: default(radius=2), repeats)

            loop_n = min(count, 64 if args.quick else 256)

            def loop(r=refs, b=blots, m=loop_n):
                return [original_find_displacement(r[k], b[k]) for k in range(m)]

            expected = np.array(loop())
            t_orig = median_time(loop, max(1, repeats // 2)) / loop_n
            diff = np.max(np.abs(np.asarray(out.dxdy)[:loop_n] - expected))
            us = [1e6 * t / count for t in (t_jax, t_lagrange, t_quad, t_exact, t_near)]
            print(
                f"{size:3d} {count:5d} {compile_s:9.2f} "
                + " ".join(f"{u:8.1f}" for u in us)
                + f" {1e6 * t_orig:9.1f} {t_orig * count / t_jax:8.1f} {diff:9.1e}"
            )


if __name__ == "__main__":
    main()

"""Time the reference pipeline: full drizzle, leave-one-out, WCS update, catalog.

Usage::

    python benchmarks/bench_reference.py            # 4 and 16 two-chip 1024x2048
    python benchmarks/bench_reference.py --quick    # 4 two-chip 512x1024

The exposures are built in memory here (two-chip, 0.05"/px, Gaussian stars on
sky with Poisson-like noise, dithered and slightly rotated), so the script runs
without any file. Stages:

- read      : read_exposure of every in-memory HDUList (array copies, WCS)
- pixmap    : chip_pixmap of one chip (part of 'drizzle'): exact pix2foc + the
              verified focal-plane homography
- exact     : the same with exact=True (drizzle.utils.calc_pixmap), and
              'max err' the largest difference (px)
- affine    : affine_pixmap of that map (what update_wcs(affine=...) does)
- upd.aff   : update_wcs with an affine correction instead of new WCSs (and
              the read that drizzles it, as 'update')
- drizzle   : DrizzleResample(...) = sky + grid + pixmaps + add_image per chip
- loo       : one leave_one_out(i) reference (no drizzle)
- update    : update_wcs(i) and the first read after it, which re-drizzles
              that one exposure (2 chips)
- catalog   : PhotutilsCatalog on the full drizzled image (masked where wht=0)
"""

import argparse
import time

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from subpixal_jax.io.images import read_exposure
from subpixal_jax.io.wcs import correct_wcs
from subpixal_jax.reference.catalog import PhotutilsCatalog
from subpixal_jax.reference.resample import DrizzleResample, affine_pixmap, chip_pixmap

RA0, DEC0, SCALE = 6.02, -72.08, 0.05 / 3600.0


def _chip_wcs(shape, dx, dy, rot, k):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [RA0, DEC0]
    w.wcs.crpix = [shape[1] / 2 + 0.5 + dx, shape[0] + 0.5 + dy - k * shape[0]]
    t = np.radians(rot)
    w.wcs.cd = SCALE * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    w.wcs.set()
    return w


def _exposures(n, shape, n_stars, seed=0):
    rng = np.random.default_rng(seed)
    half_ra = SCALE * shape[1] / 2 / np.cos(np.radians(DEC0))
    ra = RA0 + rng.uniform(-half_ra, half_ra, n_stars)
    dec = DEC0 + rng.uniform(-SCALE * shape[0], SCALE * shape[0], n_stars)
    flux = 10 ** rng.uniform(2.5, 5.0, n_stars)
    yy, xx = np.mgrid[-5:6, -5:6]
    out = []
    for _ in range(n):
        dx, dy = rng.uniform(-10, 10, 2)
        prim = fits.PrimaryHDU()
        prim.header["EXPTIME"] = 500.0
        hdus = [prim]
        for k in range(2):
            w = _chip_wcs(shape, dx, dy, rng.uniform(-0.05, 0.05), k)
            img = rng.normal(100.0, 10.0, shape).astype(np.float32)
            x, y = w.all_world2pix(ra, dec, 0)
            ok = (x > 5) & (x < shape[1] - 6) & (y > 5) & (y < shape[0] - 6)
            for xs, ys, f in zip(x[ok], y[ok], flux[ok], strict=True):
                ix, iy = round(xs), round(ys)
                r2 = (xx + ix - xs) ** 2 + (yy + iy - ys) ** 2
                img[iy - 5 : iy + 6, ix - 5 : ix + 6] += f * np.exp(-r2 / 2.9) / 9.1
            hdr = w.to_header()
            hdr["BUNIT"] = "ELECTRONS"
            sci = fits.ImageHDU(img, hdr, name="SCI")
            sci.header["EXTVER"] = k + 1
            hdus.append(sci)
        out.append(fits.HDUList(hdus))
    return out


def _time(fn):
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


def run(n, shape, n_stars):
    hduls = _exposures(n, shape, n_stars)
    exps, t_read = _time(lambda: [read_exposure(h) for h in hduls])
    res, t_driz = _time(lambda: DrizzleResample(exps))
    c = res.exposures[0].chips[0]
    fast, t_pix = _time(lambda: chip_pixmap(c.wcs, res.output_wcs, c.shape))
    exact, t_exact = _time(
        lambda: chip_pixmap(c.wcs, res.output_wcs, c.shape, exact=True)
    )
    err = float(np.abs(fast - exact).max())
    corr = (np.eye(2) * (1 + 1e-4), np.array([0.3, -0.2]), res.output_wcs.wcs.crpix - 1)
    _, t_aff = _time(lambda: affine_pixmap(fast, *corr))
    _, t_loo = _time(lambda: res.leave_one_out(n // 2))
    new = {}
    for ch in res.exposures[1].chips:
        w = ch.wcs.deepcopy()
        w.wcs.crpix = w.wcs.crpix + np.array([0.2, -0.1])
        new[ch.extver] = w
    # update_wcs drizzles on the first read after it: time the two together
    _, t_upd = _time(lambda: (res.update_wcs(1, new), res.contribution(1)))
    moved = {
        ch.extver: correct_wcs(ch.wcs, res.output_wcs, *corr[:2], center=corr[2])
        for ch in res.exposures[2].chips
    }
    _, t_upd_aff = _time(
        lambda: (res.update_wcs(2, moved, affine=corr), res.contribution(2))
    )
    cat = PhotutilsCatalog()

    def catalog():
        cat.set_image(res.sci, mask=res.wht == 0)
        return cat.catalog

    table, t_cat = _time(catalog)
    return {
        "n": n,
        "chip": f"{shape[0]}x{shape[1]}",
        "out": "x".join(map(str, res.output_shape)),
        "read": t_read,
        "pixmap/chip": t_pix,
        "exact": t_exact,
        "max err": err,
        "affine": t_aff,
        "drizzle": t_driz,
        "loo": t_loo,
        "update": t_upd,
        "upd.aff": t_upd_aff,
        "catalog": t_cat,
        "nsrc": len(table),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 exposures, 512x1024 chips")
    args = p.parse_args()
    if args.quick:
        cases = [(4, (512, 1024), 1000)]
    else:
        cases = [(4, (1024, 2048), 4000), (16, (1024, 2048), 4000)]
    rows = [run(*c) for c in cases]
    cols = [
        "n",
        "chip",
        "out",
        "read",
        "pixmap/chip",
        "exact",
        "max err",
        "affine",
        "drizzle",
        "loo",
        "update",
        "upd.aff",
        "catalog",
        "nsrc",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [
            (f"{r[k]:.1e}" if k == "max err" else f"{r[k]:.3f}")
            if isinstance(r[k], float)
            else str(r[k])
            for k in cols
        ]
        print("| " + " | ".join(cells) + " |")
    print("times in seconds; drizzle includes sky, grid, pixmaps and all add_image")


if __name__ == "__main__":
    main()

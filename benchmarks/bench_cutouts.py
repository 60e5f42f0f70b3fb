"""Cutouts + pixmap nodes per source: ``create_cutouts`` against the former path.

Two sets, each timed in the same process, interleaved (median of
``--repeats``), per source kept:

* ``demo``: the default simulated set (4 exposures x 2 chips 512x1024, SIP),
  image 1 cut against the leave-one-out reference of the others (arrays);
* ``acs``: one chip with the real ACS/WFC distortion astropy ships
  (``dist_lookup.fits.gz``: SIP order 4, D2IM, NPOL; its first
  ``--acs-shape`` pixels) against a synthetic reference 0.04"/px, rotated by
  17 deg, with sources on a jittered grid.

Columns: the whole ``create_cutouts`` (stages 1-2, the chip and reference
boxes, are unchanged and shared); stage 3 (image and reference cutouts,
pixmap nodes, ``|det J|``) now and the former per-source stage 3,
re-implemented below (one source at a time: slices, ``pix2foc`` at every
half-pixel node, the homography, ``np.linalg.det``); the pixmap nodes +
``|det J|`` alone, now and former. The last columns check that both give
the same cutouts: the largest pixmap difference (px) and whether every other
field is equal. With the ``acs`` set, also the whole-chip map drizzle uses
(`~subpixal_jax.geometry.homography.chip_pixmap`, 64 px tiles through
``focal_lattice``) against ``pix2foc`` at every pixel. Run::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_cutouts.py
"""

import argparse
import math
import tempfile
import time

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from subpixal_jax.core.blot import blot_scale
from subpixal_jax.geometry import cutouts as cm
from subpixal_jax.geometry.homography import (
    apply_homography,
    chip_pixmap,
    focal_homography,
)
from subpixal_jax.io.images import Chip, Exposure
from subpixal_jax.testing.real_data import acs_wfc_wcs

# ---------------------------------------------------------------------------
# the former stage 3 (one source at a time), for comparison only


def _former_nodes(chip_wcs, ref_wcs, blcs, shapes, chip_shape):
    """``pix2foc`` at every half-pixel node of every cutout, then the homography."""
    counts = (2 * shapes[:, 0] + 1) * (2 * shapes[:, 1] + 1)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    nodes = np.empty((bounds[-1], 2))
    grids = {}
    for k, (h, w) in enumerate(shapes):
        grid = grids.get((h, w))
        if grid is None:
            rows, cols = np.mgrid[0 : 2 * h + 1, 0 : 2 * w + 1]
            grid = grids[(h, w)] = np.stack(
                [cols.ravel() * 0.5, rows.ravel() * 0.5], -1
            )
        np.add(grid, blcs[k], out=nodes[bounds[k] : bounds[k + 1]])
    foc = chip_wcs.pix2foc(nodes, 0)
    hom = focal_homography(chip_wcs, ref_wcs, chip_shape)
    ref = apply_homography(hom, foc[:, 0], foc[:, 1])
    return [ref[bounds[k] : bounds[k + 1]] for k in range(len(shapes))]


def _former_area(pixmap, q):
    h = (pixmap.shape[0] - 1) // 2
    w = (pixmap.shape[1] - 1) // 2
    r0 = int(np.clip(np.rint(2 * q[1]), 1, 2 * h - 1))
    c0 = int(np.clip(np.rint(2 * q[0]), 1, 2 * w - 1))
    jac = np.stack(
        [
            pixmap[r0, c0 + 1] - pixmap[r0, c0 - 1],
            pixmap[r0 + 1, c0] - pixmap[r0 - 1, c0],
        ],
        axis=-1,
    )
    return abs(np.linalg.det(jac))


def _former_pixmaps(chip, ref_wcs, blcs, shapes, origins, q):
    maps = _former_nodes(chip.wcs, ref_wcs, blcs, shapes, chip.data.shape)
    pixmaps, area = [], np.empty(len(maps))
    for i, (nodes, (h, w)) in enumerate(zip(maps, shapes, strict=True)):
        pixmaps.append(nodes.reshape(2 * h + 1, 2 * w + 1, 2) - origins[i])
        area[i] = _former_area(pixmaps[-1], q[i])
    return pixmaps, area


def _former_chip_cutouts(primaries, boxes, chip, exposure, reference, sky):
    keep, blc, trc, predicted_abs, _, rlo, rhi = boxes
    noise = cm._ChipNoise.of(chip, exposure, sky)
    rny, rnx = reference.seg.shape
    kept = []
    for j, k in enumerate(keep):
        (x1, y1), (x2, y2) = blc[j], trc[j]
        sl = (slice(y1, y2 + 1), slice(x1, x2 + 1))
        data, valid, e = noise.valid(chip, lambda a, sl=sl: a[sl])
        if not valid.any() or not np.all(np.isfinite(rlo[j]) & np.isfinite(rhi[j])):
            continue
        rb = (int(rlo[j][0]), int(rlo[j][1]))
        rt = (int(rhi[j][0]), int(rhi[j][1]))
        if rb[0] > rnx - 1 or rb[1] > rny - 1 or rt[0] < 0 or rt[1] < 0:
            continue
        if max(rt[0] - rb[0], rt[1] - rb[1]) + 1 > cm.CUTOUT_BUCKETS[-1]:
            continue
        ref = reference.cutout(rb, rt, primaries[k].src_id)
        if ref is None:
            continue
        image, variance = noise.image_and_variance(data, valid, e)
        kept.append((k, (int(x1), int(y1)), (int(x2), int(y2)), image, valid))
        kept[-1] += (variance, rb, rt, ref)
    shapes = np.array([c[3].shape for c in kept], dtype=np.int64)
    blcs = np.array([c[1] for c in kept], dtype=np.int64)
    origins = np.array([c[6] for c in kept], dtype=np.float64)
    q = predicted_abs[[c[0] for c in kept]] - blcs
    pixmaps, area = _former_pixmaps(chip, reference.wcs, blcs, shapes, origins, q)
    iscale = blot_scale(
        image_units=exposure.units, image_exptime=exposure.exptime, area_ratio=area
    )
    return [
        cm.SourceCutouts(
            src_id=primaries[k].src_id,
            extver=int(chip.extver),
            src_pos=primaries[k].src_pos,
            blc=b,
            trc=t,
            image=image,
            image_valid=valid,
            variance=variance,
            predicted=(float(q[i, 0]), float(q[i, 1])),
            ref_blc=rb,
            ref_trc=rt,
            ref=ref[0],
            ref_valid=ref[1],
            pixmap=pixmaps[i],
            iscale=float(iscale[i]),
            weight=primaries[k].weight,
        )
        for i, (k, b, t, image, valid, variance, rb, rt, ref) in enumerate(kept)
    ]


# ---------------------------------------------------------------------------
# sets


def _demo_set():
    from subpixal_jax.options import AlignOptions
    from subpixal_jax.pipeline.loop import refresh_catalog
    from subpixal_jax.reference.catalog import PhotutilsCatalog
    from subpixal_jax.reference.resample import DrizzleResample
    from subpixal_jax.simulate import simulate_exposures

    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate_exposures(tmp)
        resample = DrizzleResample(sim.paths)
        state = refresh_catalog(PhotutilsCatalog(), resample, AlignOptions.create())
    sci, wht = resample.leave_out([1])
    return {
        "primaries": state.primaries,
        "seg": state.segmentation,
        "ref": sci,
        "valid": wht > 0,
        "ref_wcs": resample.output_wcs,
        "exposure": resample.exposures[1],
        "sky": resample.sky[1],
    }


def _acs_set(shape, spacing=24.0, seed=0):
    """A chip with the real ACS/WFC distortion and a rotated TAN reference."""
    chip_wcs = acs_wfc_wcs()
    ny, nx = shape
    centre = chip_wcs.all_pix2world([[nx / 2, ny / 2]], 0)[0]
    scale, angle = 0.04 / 3600, math.radians(17.0)
    ref_wcs = WCS(naxis=2)
    ref_wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    ref_wcs.wcs.crval = centre
    rshape = (int(2.0 * ny * 1.25) + 64, int(1.6 * nx * 1.25) + 64)
    ref_wcs.wcs.crpix = [rshape[1] / 2, rshape[0] / 2]
    c, s = math.cos(angle), math.sin(angle)
    ref_wcs.wcs.cd = scale * np.array([[-c, s], [s, c]])
    ref_wcs.wcs.set()
    rng = np.random.default_rng(seed)
    # Sources on a jittered grid of chip pixels, mapped to the reference.
    gy, gx = np.mgrid[12 : ny - 12 : spacing, 12 : nx - 12 : spacing]
    chip_xy = np.stack([gx.ravel(), gy.ravel()], -1) + rng.uniform(-3, 3, (gx.size, 2))
    ref_xy = ref_wcs.wcs_world2pix(chip_wcs.all_pix2world(chip_xy, 0), 0)
    ids = np.arange(1, len(ref_xy) + 1)
    seg = np.zeros(rshape, np.int32)
    ref = rng.normal(0.0, 0.01, rshape).astype(np.float32)
    data = rng.normal(100.0, 5.0, shape).astype(np.float32)
    yy, xx = np.mgrid[-7:8, -7:8]
    for i, ((rx, ry), (cx, cy)) in enumerate(zip(ref_xy, chip_xy, strict=True)):
        for img, (x, y), value in ((ref, (rx, ry), 1.0), (data, (cx, cy), 500.0)):
            x0, y0 = round(x), round(y)
            disc = (xx + x0 - x) ** 2 + (yy + y0 - y) ** 2
            img[y0 - 7 : y0 + 8, x0 - 7 : x0 + 8] += value * np.exp(-disc / 4.0)
            if img is ref:
                seg[y0 - 7 : y0 + 8, x0 - 7 : x0 + 8][disc <= 16] = ids[i]
    chip = Chip(
        extver=1,
        data=data,
        valid=np.ones(shape, bool),
        err=None,
        wcs=chip_wcs,
        header=fits.Header(),
    )
    exposure = Exposure(
        name="acs", path=None, chips=[chip], units="counts", exptime=500.0
    )
    primaries = cm.create_primary_cutouts(
        {"id": ids, "x": ref_xy[:, 0], "y": ref_xy[:, 1]}, seg
    )
    return {
        "primaries": primaries,
        "seg": seg,
        "ref": ref,
        "valid": np.ones(rshape, bool),
        "ref_wcs": ref_wcs,
        "exposure": exposure,
        "sky": {1: 100.0},
    }


# ---------------------------------------------------------------------------
# timing


def _stages(s):
    """Stages 1-2 as ``create_cutouts`` runs them: chip boxes and the reference."""
    prim = s["primaries"]
    blc = np.array([p.blc for p in prim], dtype=np.float64)
    trc = np.array([p.trc for p in prim], dtype=np.float64)
    corners = cm._outer_corners(blc, trc).reshape(-1, 2)
    pos = np.array([p.src_pos for p in prim], dtype=np.float64)
    world = s["ref_wcs"].wcs_pix2world(np.concatenate([corners, pos]), 0)
    boxes = [
        cm._chip_boxes(chip, world, len(prim), 2, s["ref_wcs"])
        for chip in s["exposure"].chips
    ]
    values = cm._reference_values(s["ref"], s["valid"], s["seg"].shape)
    return boxes, cm._Reference(values, s["seg"], s["ref_wcs"], True)


def _stage3(s, boxes, reference, former):
    out = []
    for chip, chip_boxes in zip(s["exposure"].chips, boxes, strict=True):
        sky = float(s["sky"].get(chip.extver) or 0.0)
        if former:
            out += _former_chip_cutouts(
                s["primaries"], chip_boxes, chip, s["exposure"], reference, sky
            )
        else:
            out += cm._chip_cutouts(
                s["primaries"],
                chip_boxes,
                chip,
                s["exposure"],
                reference,
                sky=sky,
                exact_pixmaps=False,
            )
    return out


def _pixmaps_only(s, cutouts, former):
    for chip in s["exposure"].chips:
        mine = [c for c in cutouts if c.extver == chip.extver]
        blcs = np.array([c.blc for c in mine], dtype=np.int64)
        shapes = np.array([c.shape for c in mine], dtype=np.int64)
        origins = np.array([c.ref_blc for c in mine], dtype=np.float64)
        q = np.array([c.predicted for c in mine])
        if former:
            _former_pixmaps(chip, s["ref_wcs"], blcs, shapes, origins, q)
            continue
        for g in cm._pixmap_nodes(
            chip.wcs,
            s["ref_wcs"],
            blcs,
            shapes,
            exact=False,
            chip_shape=chip.data.shape,
            origins=origins,
        ):
            cm._pixmap_area(g.nodes, q[g.members], shapes[g.members])


def _same(new, old):
    if len(new) != len(old):
        return float("inf"), False
    err, equal = 0.0, True
    for a, b in zip(new, old, strict=True):
        err = max(err, float(np.abs(a.pixmap - b.pixmap).max()))
        equal &= abs(a.iscale - b.iscale) <= 1e-9 * abs(b.iscale)
        for f in a.__dataclass_fields__:
            if f not in ("pixmap", "iscale"):
                equal &= bool(np.array_equal(getattr(a, f), getattr(b, f)))
    return err, equal


def _median(fns, repeats):
    """Median seconds of each function, runs interleaved."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns, strict=True):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def _row(name, s, repeats):
    boxes, reference = _stages(s)
    new = _stage3(s, boxes, reference, former=False)
    old = _stage3(s, boxes, reference, former=True)
    err, equal = _same(new, old)
    n = len(new)
    nodes = sum((2 * c.shape[0] + 1) * (2 * c.shape[1] + 1) for c in new) / n

    def whole():
        cm.create_cutouts(
            s["primaries"],
            s["seg"],
            s["ref"],
            s["valid"],
            s["ref_wcs"],
            s["exposure"],
            sky=s["sky"],
        )

    t = _median(
        [
            whole,
            lambda: _stages(s),
            lambda: _stage3(s, boxes, reference, former=False),
            lambda: _stage3(s, boxes, reference, former=True),
            lambda: _pixmaps_only(s, new, former=False),
            lambda: _pixmaps_only(s, new, former=True),
        ],
        repeats,
    )
    us = [1e6 * v / n for v in t]
    print(
        f"{name:5s} {n:7d} {nodes:6.0f}  {us[0]:7.1f} / {us[1] + us[3]:6.1f}"
        f"  {us[1]:5.1f}  {us[2]:7.1f} / {us[3]:6.1f}  {us[4]:6.1f} / {us[5]:6.1f}"
        f"  {err:9.1e}  {equal}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--acs-shape", type=int, nargs=2, default=(1024, 2048))
    parser.add_argument("--sets", nargs="+", default=["demo", "acs"])
    args = parser.parse_args()
    print(
        "median us per source kept; whole = create_cutouts; s1-2 = chip and reference"
        " boxes; s3 = cutouts + pixmaps + |det J|; pixmaps = nodes + |det J| alone"
    )
    print(
        "set   cutouts  nodes  whole now/former   s1-2   s3 now/former"
        "   pixmaps now/former  max|dpix|px  equal"
    )
    for name in args.sets:
        s = _demo_set() if name == "demo" else _acs_set(tuple(args.acs_shape))
        _row(name, s, args.repeats)
    if "acs" in args.sets:
        _chip_pixmap_row(s, args.repeats)


def _former_chip_pixmap(chip_wcs, output_wcs, shape):
    """``pix2foc`` at every pixel, then the homography (the former fast map)."""
    h = focal_homography(chip_wcs, output_wcs, shape)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    fx, fy = chip_wcs.pix2foc(xx.ravel(), yy.ravel(), 0)
    return apply_homography(h, fx, fy).reshape(*shape, 2)


def _chip_pixmap_row(s, repeats):
    """Whole-chip maps (drizzle's) of the ACS/WFC chip over its 4096x2048 domain."""
    chip_wcs, ref_wcs = s["exposure"].chips[0].wcs, s["ref_wcs"]
    shape = (2048, 4096)
    new = chip_pixmap(chip_wcs, ref_wcs, shape)
    old = _former_chip_pixmap(chip_wcs, ref_wcs, shape)
    err = float(np.abs(new - old).max())
    del new, old
    t = _median(
        [
            lambda: chip_pixmap(chip_wcs, ref_wcs, shape),
            lambda: _former_chip_pixmap(chip_wcs, ref_wcs, shape),
        ],
        max(1, repeats // 2),
    )
    print(
        f"chip_pixmap, ACS/WFC chip {shape[1]}x{shape[0]}: now {t[0]:.2f} s, "
        f"former (pix2foc at every pixel) {t[1]:.2f} s, max |difference| {err:.1e} px"
    )


if __name__ == "__main__":
    main()

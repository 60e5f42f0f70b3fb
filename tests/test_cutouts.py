"""Tests of the host-side cutouts, pixmaps, batches and fit points."""

import importlib.resources
import math
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, DistortionLookupTable

from subpixal_jax.core.batch import (
    CUTOUT_BUCKETS,
    REFERENCE_BUCKETS,
    CutoutBatch,
    cutout_bucket,
    source_bucket,
    source_chunk,
)
from subpixal_jax.geometry import cutouts as cutouts_module
from subpixal_jax.geometry.cutouts import (
    PIXMAP_OUTSIDE,
    _pixmap_nodes,
    build_batches,
    create_cutouts,
    create_primary_cutouts,
    iter_batches,
    reference_points,
)
from subpixal_jax.geometry.homography import (
    apply_homography,
    focal_homography,
    focal_lattice,
)
from subpixal_jax.io.images import Chip, Exposure, read_exposure
from subpixal_jax.options import AlignOptions
from subpixal_jax.pipeline.loop import refresh_catalog
from subpixal_jax.pipeline.stages import image_cutouts
from subpixal_jax.reference.catalog import PhotutilsCatalog
from subpixal_jax.reference.resample import DrizzleResample
from subpixal_jax.simulate import WcsError, simulate_exposures

REF_SHAPE = (260, 300)  # (ny, nx) of the synthetic reference
REF_SCALE = 0.05 / 3600
CHIP_SCALE = 0.06 / 3600
CRVAL = (150.1, 2.2)
EXPTIME = 400.0
SKY = {1: 30.0, 2: 25.0}


def _tan(crval, crpix, scale, angle_deg, shape):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = crval
    w.wcs.crpix = crpix
    a = math.radians(angle_deg)
    w.wcs.cd = scale * np.array(
        [[-math.cos(a), math.sin(a)], [math.sin(a), math.cos(a)]]
    )
    w.wcs.set()
    w.pixel_shape = shape[::-1]
    return w


def _tan_sip(crval, crpix, scale, angle_deg, shape, amplitude):
    header = _tan(crval, crpix, scale, angle_deg, shape).to_header()
    header["CTYPE1"] = "RA---TAN-SIP"
    header["CTYPE2"] = "DEC--TAN-SIP"
    header["A_ORDER"] = header["B_ORDER"] = 3
    norm = max(shape) / 2.0  # displacement ~ amplitude px at the chip edge
    header["A_2_0"] = amplitude / norm**2
    header["A_1_1"] = -0.5 * amplitude / norm**2
    header["B_0_2"] = 0.7 * amplitude / norm**2
    header["A_3_0"] = 0.3 * amplitude / norm**3
    header["B_1_2"] = -0.4 * amplitude / norm**3
    w = WCS(header)
    w.pixel_shape = shape[::-1]
    return w


def _gauss_image(shape, xy, flux, sigma):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.zeros(shape)
    for (x, y), f in zip(xy, flux, strict=True):
        img += f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return img / (2 * np.pi * sigma**2)


def _disc_segmentation(shape, xy, ids, radius):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    seg = np.zeros(shape, dtype=np.int32)
    for (x, y), i in zip(xy, ids, strict=True):
        seg[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2] = i
    return seg


@pytest.fixture(scope="module")
def scene():
    """Reference frame, two SIP chips, sources, segmentation, exposure."""
    rng = np.random.default_rng(42)
    ref_wcs = _tan(CRVAL, (150.5, 130.5), REF_SCALE, 0.0, REF_SHAPE)
    chip_shape = (100, 220)
    # Two chips stacked in y with a 6 px gap, in the reference frame.
    chips = []
    for extver, dy in ((1, -53.0), (2, 53.0)):
        centre = ref_wcs.wcs_pix2world(
            [[150.0, 130.0 + dy * CHIP_SCALE / REF_SCALE]], 0
        )
        w = _tan_sip(tuple(centre[0]), (110.5, 50.5), CHIP_SCALE, 3.0, chip_shape, 1.5)
        chips.append((extver, w))

    # Sources on a grid (some near chip borders and in the gap).
    gx, gy = np.meshgrid(np.arange(20, 281, 26.0), np.arange(18, 245, 22.0))
    xy = np.stack([gx.ravel(), gy.ravel()], -1) + rng.uniform(-3, 3, (gx.size, 2))
    xy = np.concatenate([xy, [[2.0, 100.0], [150.0, 257.0]]])  # touch the border
    n = len(xy)
    ids = np.arange(1, n + 1) * 3  # sparse ids
    flux = rng.uniform(500, 5000, n)
    seg = _disc_segmentation(REF_SHAPE, xy, ids, 4.0)
    ref_data = _gauss_image(REF_SHAPE, xy, flux, 1.3).astype(np.float32)
    ref_valid = np.ones(REF_SHAPE, bool)
    ref_valid[:, 270:] = False  # an uncovered strip
    ref_data[~ref_valid] = 0.0
    sky_pos = ref_wcs.wcs_pix2world(xy, 0)

    exp_chips = []
    for extver, w in chips:
        pix = w.all_world2pix(sky_pos, 0, quiet=True)
        back = w.all_pix2world(pix, 0)
        ok = np.all(np.abs(back - sky_pos) < 1e-9, axis=1)  # converged points
        data = _gauss_image(chip_shape, pix[ok], flux[ok] * EXPTIME, 1.3 / 1.2)
        data += SKY[extver] + rng.normal(0, 4.0, chip_shape)
        valid = np.ones(chip_shape, bool)
        valid[:, 100] = False
        err = np.full(chip_shape, 4.0, np.float32)
        exp_chips.append(
            Chip(
                extver=extver,
                data=data.astype(np.float32),
                valid=valid,
                err=err if extver == 1 else None,
                wcs=w,
                header=fits.Header(),
            )
        )
    exposure = Exposure(
        name="synthetic", path=None, chips=exp_chips, units="counts", exptime=EXPTIME
    )
    catalog = Table({"id": ids, "x": xy[:, 0], "y": xy[:, 1], "weight": flux / 100})
    return {
        "ref_wcs": ref_wcs,
        "ref_data": ref_data,
        "ref_valid": ref_valid,
        "seg": seg,
        "catalog": catalog,
        "sky_pos": sky_pos,
        "exposure": exposure,
    }


@pytest.fixture(scope="module")
def primaries(scene):
    return create_primary_cutouts(
        scene["catalog"], scene["seg"], ref_valid=scene["ref_valid"]
    )


@pytest.fixture(scope="module")
def cutouts(scene, primaries):
    return create_cutouts(
        primaries,
        scene["seg"],
        scene["ref_data"],
        scene["ref_valid"],
        scene["ref_wcs"],
        scene["exposure"],
        sky=SKY,
    )


# ---------------------------------------------------------------------------
# primary cutouts


def test_primary_boxes_match_brute_force(scene, primaries):
    seg, cat, valid = scene["seg"], scene["catalog"], scene["ref_valid"]
    ny, nx = seg.shape
    expected = {}
    for row in cat:
        ys, xs = np.nonzero(seg == row["id"])
        if xs.size == 0 or xs.min() <= 0 or ys.min() <= 0:
            continue
        if xs.max() >= nx - 1 or ys.max() >= ny - 1:
            continue
        if not valid[ys, xs].any():
            continue
        expected[int(row["id"])] = (
            (int(xs.min()) - 1, int(ys.min()) - 1),
            (int(xs.max()) + 1, int(ys.max()) + 1),
            (float(row["x"]), float(row["y"])),
            float(row["weight"]),
        )
    got = {p.src_id: (p.blc, p.trc, p.src_pos, p.weight) for p in primaries}
    assert got == expected
    # Both skip rules fired in this scene.
    assert len(expected) < len(cat)
    assert all(p.src_pos[0] < 274 for p in primaries)


def test_primary_id_intersection_pad_and_no_weight():
    seg = np.zeros((30, 30), dtype=np.int64)
    seg[5:9, 5:10] = 7
    seg[15:20, 15:18] = 9
    cat = Table({"id": [7, 8], "x": [7.0, 1.0], "y": [6.5, 1.0]})
    (p,) = create_primary_cutouts(cat, seg, pad=3)
    assert (p.src_id, p.blc, p.trc, p.weight) == (7, (2, 2), (12, 11), None)
    # A pad pushing the box out of the image skips the source.
    assert create_primary_cutouts(cat, seg, pad=6) == []


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"catalog": Table({"id": [1], "x": [1.0]})}, "catalog"),
        ({"segmentation": np.zeros((4, 4, 2), int)}, "segmentation"),
        ({"segmentation": np.zeros((4, 4))}, "segmentation"),
        ({"ref_valid": np.ones((5, 4), bool)}, "ref_valid"),
        ({"pad": -1}, "pad"),
        ({"catalog": Table({"id": [1, 1], "x": [1.0, 2], "y": [1.0, 2]})}, "catalog"),
        (
            {"catalog": Table({"id": [1], "x": [1.0], "y": [1.0], "weight": [-1]})},
            "catalog",
        ),
    ],
)
def test_primary_bad_input(kwargs, name):
    args = {
        "catalog": Table({"id": [1], "x": [1.0], "y": [1.0]}),
        "segmentation": np.zeros((4, 4), int),
        "ref_valid": None,
        "pad": 1,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        create_primary_cutouts(
            args["catalog"],
            args["segmentation"],
            ref_valid=args["ref_valid"],
            pad=args["pad"],
        )


# ---------------------------------------------------------------------------
# source cutouts


def test_every_chip_used_and_straddlers_once(cutouts, primaries):
    extvers = {c.extver for c in cutouts}
    assert extvers == {1, 2}
    ids_per_chip = {e: {c.src_id for c in cutouts if c.extver == e} for e in (1, 2)}
    # A source fits on at most one chip here (the chips do not overlap).
    assert not ids_per_chip[1] & ids_per_chip[2]
    assert len(cutouts) < len(primaries)  # off-chip / gap sources skipped


def test_image_boxes_follow_spec(scene, primaries, cutouts):
    by_id = {p.src_id: p for p in primaries}
    exposure = scene["exposure"]
    ref_wcs = scene["ref_wcs"]
    for c in cutouts:
        chip = exposure.chip(c.extver)
        p = by_id[c.src_id]
        (x1, y1), (x2, y2) = p.blc, p.trc
        outer = np.array(
            [
                [x1 - 0.5, y1 - 0.5],
                [x1 - 0.5, y2 + 0.5],
                [x2 + 0.5, y2 + 0.5],
                [x2 + 0.5, y1 - 0.5],
            ]
        )
        pix = chip.wcs.all_world2pix(ref_wcs.wcs_pix2world(outer, 0), 0, tolerance=1e-9)
        assert c.blc == tuple(np.floor(pix.min(0) - 2).astype(int))
        assert c.trc == tuple(np.ceil(pix.max(0) + 2).astype(int))
        ny, nx = chip.shape
        assert 0 <= c.blc[0] <= c.trc[0] <= nx - 1
        assert 0 <= c.blc[1] <= c.trc[1] <= ny - 1
        # Image cutout: data minus sky, zero where invalid, DQ column masked.
        sl = (slice(c.blc[1], c.trc[1] + 1), slice(c.blc[0], c.trc[0] + 1))
        good = chip.valid[sl]
        np.testing.assert_array_equal(c.image_valid, good)
        np.testing.assert_allclose(c.image[good], chip.data[sl][good] - SKY[c.extver])
        assert np.all(c.image[~good] == 0)
        assert c.image.dtype == np.float32


def test_reference_boxes_and_masks(scene, primaries, cutouts):
    ref_wcs, seg = scene["ref_wcs"], scene["seg"]
    exposure = scene["exposure"]
    ref_pad = math.ceil(2 * CHIP_SCALE / REF_SCALE)
    assert ref_pad == 3
    for c in cutouts:
        chip = exposure.chip(c.extver)
        (x1, y1), (x2, y2) = c.blc, c.trc
        outer = np.array(
            [
                [x1 - 0.5, y1 - 0.5],
                [x1 - 0.5, y2 + 0.5],
                [x2 + 0.5, y2 + 0.5],
                [x2 + 0.5, y1 - 0.5],
            ]
        )
        rp = ref_wcs.wcs_world2pix(chip.wcs.all_pix2world(outer, 0), 0)
        assert c.ref_blc == tuple(np.floor(rp.min(0) - ref_pad).astype(int))
        assert c.ref_trc == tuple(np.ceil(rp.max(0) + ref_pad).astype(int))
        (rx1, ry1), (rx2, ry2) = c.ref_blc, c.ref_trc
        assert c.ref.shape == (ry2 - ry1 + 1, rx2 - rx1 + 1)
        # Segment masking on: exactly the covered pixels of the own segment.
        own = np.zeros(c.ref.shape, bool)
        yy, xx = np.mgrid[ry1 : ry2 + 1, rx1 : rx2 + 1]
        inside = (xx >= 0) & (yy >= 0) & (xx < seg.shape[1]) & (yy < seg.shape[0])
        own[inside] = (seg[yy[inside], xx[inside]] == c.src_id) & scene["ref_valid"][
            yy[inside], xx[inside]
        ]
        np.testing.assert_array_equal(c.ref_valid, own)
        assert np.all(c.ref[~c.ref_valid] == 0)
        np.testing.assert_array_equal(c.ref[own], scene["ref_data"][yy[own], xx[own]])


def test_segment_mask_off_keeps_neighbours(scene, primaries, cutouts):
    loose = create_cutouts(
        primaries,
        scene["seg"],
        scene["ref_data"],
        scene["ref_valid"],
        scene["ref_wcs"],
        scene["exposure"],
        sky=SKY,
        combine_seg_mask=False,
    )
    assert [(c.src_id, c.extver) for c in loose] == [
        (c.src_id, c.extver) for c in cutouts
    ]
    for a, b in zip(cutouts, loose, strict=True):
        assert b.ref_valid.sum() > a.ref_valid.sum()
        assert np.all(b.ref_valid[a.ref_valid])


def test_predicted_positions(scene, cutouts):
    """Predicted positions satisfy the full forward WCS to < 1e-8 px."""
    exposure, ref_wcs = scene["exposure"], scene["ref_wcs"]
    for extver in (1, 2):
        chip = exposure.chip(extver)
        cs = [c for c in cutouts if c.extver == extver]
        absolute = np.array([np.add(c.blc, c.predicted) for c in cs])
        sky = chip.wcs.all_pix2world(absolute, 0)
        back = ref_wcs.wcs_world2pix(sky, 0)
        cat = np.array([c.src_pos for c in cs])
        np.testing.assert_allclose(back, cat, atol=1e-8 * CHIP_SCALE / REF_SCALE)


def test_variance_models(scene, cutouts):
    for c in cutouts:
        v = c.variance[c.image_valid]
        if c.extver == 1:  # from ERR
            np.testing.assert_allclose(v, 16.0)
        else:  # Poisson + read noise estimated from the sky (true sigma 4)
            expected = np.maximum(c.image[c.image_valid], 0) + SKY[2]
            rn2 = v - expected
            assert np.all(np.abs(rn2 - max(16 - SKY[2], 0)) < 4.0)
        assert np.all(c.variance[~c.image_valid] == 1)


def test_iscale_is_exptime_times_local_area(scene, cutouts):
    exposure, ref_wcs = scene["exposure"], scene["ref_wcs"]
    for c in cutouts[:10]:
        chip = exposure.chip(c.extver)
        q = np.add(c.blc, c.predicted)
        h = 1e-3
        steps = np.array([[h, 0], [-h, 0], [0, h], [0, -h]])
        pts = q + steps
        r = ref_wcs.wcs_world2pix(chip.wcs.all_pix2world(pts, 0), 0)
        jac = np.stack([(r[0] - r[1]) / (2 * h), (r[2] - r[3]) / (2 * h)], -1)
        area = abs(np.linalg.det(jac))
        assert abs(area / (CHIP_SCALE / REF_SCALE) ** 2 - 1) < 0.05
        np.testing.assert_allclose(c.iscale, EXPTIME * area, rtol=1e-4)


def test_caller_arrays_unchanged(scene, primaries):
    copies = {k: scene[k].copy() for k in ("ref_data", "ref_valid", "seg")}
    chip_copies = [(c.data.copy(), c.valid.copy()) for c in scene["exposure"].chips]
    cat = scene["catalog"].copy()
    create_primary_cutouts(scene["catalog"], scene["seg"], ref_valid=scene["ref_valid"])
    out = create_cutouts(
        primaries,
        scene["seg"],
        scene["ref_data"],
        scene["ref_valid"],
        scene["ref_wcs"],
        scene["exposure"],
        sky=SKY,
    )
    dxdy = np.ones((len(out), 2))
    dcopy = dxdy.copy()
    reference_points(out, dxdy, scene["exposure"], scene["ref_wcs"])
    for k, v in copies.items():
        np.testing.assert_array_equal(scene[k], v)
    for chip, (d, v) in zip(scene["exposure"].chips, chip_copies, strict=True):
        np.testing.assert_array_equal(chip.data, d)
        np.testing.assert_array_equal(chip.valid, v)
    np.testing.assert_array_equal(dxdy, dcopy)
    assert all(np.all(cat[c] == scene["catalog"][c]) for c in cat.colnames)


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"segmentation": np.zeros((5, 5), int)}, "ref_data"),
        ({"ref_valid": np.ones((5, 5), bool)}, "ref_valid"),
        ({"pad": -2}, "pad"),
        ({"sky": 3.0}, "sky"),
        ({"primaries": [1, 2]}, "primaries"),
    ],
)
def test_create_cutouts_bad_input(scene, primaries, change, name):
    args = {
        "primaries": primaries,
        "segmentation": scene["seg"],
        "ref_valid": scene["ref_valid"],
        "pad": 2,
        "sky": None,
    }
    args.update(change)
    with pytest.raises(ValueError, match=name):
        create_cutouts(
            args["primaries"],
            args["segmentation"],
            scene["ref_data"],
            args["ref_valid"],
            scene["ref_wcs"],
            scene["exposure"],
            sky=args["sky"],
            pad=args["pad"],
        )


def test_distorted_reference_rejected(scene, primaries):
    chip_wcs = scene["exposure"].chips[0].wcs
    with pytest.raises(ValueError, match="ref_wcs"):
        create_cutouts(
            primaries,
            scene["seg"],
            scene["ref_data"],
            scene["ref_valid"],
            chip_wcs,
            scene["exposure"],
        )


# ---------------------------------------------------------------------------
# pixmaps


def test_pixmap_exact_path_matches_node_by_node(scene, cutouts):
    """The exact pixmap is the full WCS chain at every half-pixel node."""
    exposure, ref_wcs = scene["exposure"], scene["ref_wcs"]
    c = cutouts[0]
    chip = exposure.chip(c.extver)
    h, w = c.shape
    rows, cols = np.mgrid[0 : 2 * h + 1, 0 : 2 * w + 1]
    ra, dec = chip.wcs.all_pix2world(cols / 2.0 + c.blc[0], rows / 2.0 + c.blc[1], 0)
    x, y = ref_wcs.wcs_world2pix(ra, dec, 0)
    exact = np.stack([x - c.ref_blc[0], y - c.ref_blc[1]], -1)
    np.testing.assert_allclose(c.pixmap, exact, atol=1e-7)
    assert c.pixmap.shape == (2 * h + 1, 2 * w + 1, 2)
    assert c.pixmap.dtype == np.float64


def test_pixmap_fast_vs_exact_synthetic(scene, primaries, cutouts):
    exact = create_cutouts(
        primaries,
        scene["seg"],
        scene["ref_data"],
        scene["ref_valid"],
        scene["ref_wcs"],
        scene["exposure"],
        sky=SKY,
        exact_pixmaps=True,
    )
    err = max(
        np.abs(a.pixmap - b.pixmap).max() for a, b in zip(cutouts, exact, strict=True)
    )
    assert err < 1e-7


def _per_cutout(groups, shapes):
    """Each cutout's ``(2h+1, 2w+1, 2)`` pixmap from `_pixmap_nodes` groups."""
    maps = [None] * len(shapes)
    for g in groups:
        for i, k in enumerate(g.members):
            h, w = shapes[k]
            maps[k] = g.nodes[i, : 2 * h + 1, : 2 * w + 1]
    return maps


def _real_wcs(package, name, ext):
    path = importlib.resources.files(package).joinpath("tests", "data", name)
    with fits.open(path) as hdul, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(hdul[ext].header, hdul)


@pytest.mark.parametrize(
    ("package", "name", "ext"),
    [
        ("spherical_geometry", "2chipA.fits.gz", 1),
        ("spherical_geometry", "2chipA.fits.gz", 4),
        ("astropy.wcs", "dist_lookup.fits.gz", 1),  # real NPOL + D2IM tables
    ],
)
def test_pixmap_fast_vs_exact_real_headers(package, name, ext):
    """Fast pixmaps vs every node through the full ACS/WFC WCS (measured ~1e-8)."""
    chip_wcs = _real_wcs(package, name, ext)
    if name.startswith("dist"):
        assert chip_wcs.cpdis1 is not None
        assert chip_wcs.det2im1 is not None
    centre = chip_wcs.all_pix2world([[2048.0, 1024.0]], 0)[0]
    ref_wcs = _tan(
        tuple(centre + np.array([0.01, -0.01])),
        (3000, 3000),
        0.04 / 3600,
        17.0,
        (6000, 6000),
    )
    rng = np.random.default_rng(5)
    k = 120
    shapes = rng.integers(6, 48, (k, 2))
    blcs = np.stack([rng.integers(0, 4000, k), rng.integers(0, 2000, k)], -1)
    fast = _per_cutout(
        _pixmap_nodes(chip_wcs, ref_wcs, blcs, shapes, exact=False), shapes
    )
    exact = _per_cutout(
        _pixmap_nodes(chip_wcs, ref_wcs, blcs, shapes, exact=True), shapes
    )
    err = max(np.abs(a - b).max() for a, b in zip(fast, exact, strict=True))
    assert err < 1e-7


def test_pixmap_non_gnomonic_reference_uses_quadratics():
    """A SIN reference: no homography, per-cutout quadratics (measured 7e-9 px)."""
    chip_wcs = _real_wcs("astropy.wcs", "dist_lookup.fits.gz", 1)
    centre = chip_wcs.all_pix2world([[2048.0, 1024.0]], 0)[0]
    ref_wcs = _tan(
        tuple(centre + np.array([0.3, -0.3])),
        (3000, 3000),
        0.04 / 3600,
        17.0,
        (6000, 6000),
    )
    ref_wcs.wcs.ctype = ["RA---SIN", "DEC--SIN"]
    ref_wcs.wcs.set()
    assert focal_homography(chip_wcs, ref_wcs, (2048, 4096)) is None
    rng = np.random.default_rng(6)
    k = 40
    shapes = rng.integers(6, 40, (k, 2))
    blcs = np.stack([rng.integers(0, 4000, k), rng.integers(0, 2000, k)], -1)
    origins = rng.uniform(0, 5000, (k, 2))
    fast = _pixmap_nodes(chip_wcs, ref_wcs, blcs, shapes, exact=False, origins=origins)
    exact = _pixmap_nodes(chip_wcs, ref_wcs, blcs, shapes, exact=True, origins=origins)
    fast, exact = _per_cutout(fast, shapes), _per_cutout(exact, shapes)
    assert max(np.abs(a - b).max() for a, b in zip(fast, exact, strict=True)) < 1e-7


def _pix2foc_grid(chip_wcs, xs, ys):
    gx = np.broadcast_to(xs[:, None, :], (len(xs), ys.shape[1], xs.shape[1]))
    gy = np.broadcast_to(ys[:, :, None], gx.shape)
    fx, fy = chip_wcs.pix2foc(gx.ravel(), gy.ravel(), 0)
    return np.stack([fx, fy], -1).reshape(*gx.shape, 2)


def test_focal_lattice_is_pix2foc_on_the_acs_header():
    """Tensor-product SIP + NPOL after astropy's D2IM = pix2foc at every node.

    Half-pixel grids all over the ACS/WFC chip and past its edges (the
    tables clamp there), alone and through per-grid homographies.
    """
    chip_wcs = _real_wcs("astropy.wcs", "dist_lookup.fits.gz", 1)
    assert chip_wcs.det2im1.data.shape[0] == 1  # the separable case
    rng = np.random.default_rng(11)
    k = 40
    corner = np.stack([rng.integers(-40, 4100, k), rng.integers(-40, 2060, k)], -1)
    xs = corner[:, :1] + 0.5 * np.arange(37)
    ys = corner[:, 1:] + 0.5 * np.arange(23)
    exact = _pix2foc_grid(chip_wcs, xs, ys)
    np.testing.assert_allclose(
        focal_lattice(chip_wcs, xs, ys), exact, rtol=0, atol=1e-9
    )
    h = np.eye(3) + rng.normal(0, 1e-3, (k, 3, 3)) * [
        [1, 1, 1e3],
        [1, 1, 1e3],
        [1e-4] * 3,
    ]
    got = focal_lattice(chip_wcs, xs, ys, h)
    want = apply_homography(h[:, None, None], exact[..., 0], exact[..., 1])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)  # measured ~5e-12
    # The lattice really carries the tables: without them nodes move.
    bare = chip_wcs.deepcopy()
    bare.det2im1 = bare.cpdis1 = bare.cpdis2 = None
    assert np.abs(focal_lattice(bare, xs, ys) - exact).max() > 1e-2


def test_focal_lattice_two_dimensional_d2im_point_by_point():
    """A D2IM varying along both axes is not separable: pix2foc at every node."""
    chip_wcs = _real_wcs("astropy.wcs", "dist_lookup.fits.gz", 1)
    d2im = chip_wcs.det2im1
    rng = np.random.default_rng(2)
    table = rng.normal(0, 0.05, (16, 64)).astype(np.float32)
    chip_wcs.det2im1 = DistortionLookupTable(
        table, (1.0, 1.0), (0.0, 0.0), (64.0, 128.0)
    )
    chip_wcs.det2im2 = DistortionLookupTable(
        table.T.copy(), (1.0, 1.0), (0.0, 0.0), (128.0, 64.0)
    )
    assert d2im is not None
    xs = np.array([[100.0], [3000.0]]) + 0.5 * np.arange(9)
    ys = np.array([[50.0], [1700.0]]) + 0.5 * np.arange(7)
    exact = _pix2foc_grid(chip_wcs, xs, ys)
    np.testing.assert_array_equal(focal_lattice(chip_wcs, xs, ys), exact)
    # and not what the tensor path would give from the first row alone
    chip_wcs.det2im1 = DistortionLookupTable(
        table[:1], (1.0, 1.0), (0.0, 0.0), (64.0, 128.0)
    )
    chip_wcs.det2im2 = None
    assert np.abs(focal_lattice(chip_wcs, xs, ys) - exact).max() > 1e-3


def test_simulated_pixmaps_equal_the_exact_evaluation(simulated):
    """The simulator's SIP chips: fast pixmaps = all_pix2world at every node."""
    exposure, frame = simulated["header_exp"], simulated["frame"]
    cutouts = simulated["header"]
    assert len(cutouts) > 20
    assert {c.extver for c in cutouts} == {1, 2}
    err = 0.0
    for c in cutouts:
        h, w = c.shape
        rows, cols = np.mgrid[0 : 2 * h + 1, 0 : 2 * w + 1]
        ra, dec = exposure.chip(c.extver).wcs.all_pix2world(
            cols / 2 + c.blc[0], rows / 2 + c.blc[1], 0
        )
        x, y = frame.wcs_world2pix(ra, dec, 0)
        exact = np.stack([x - c.ref_blc[0], y - c.ref_blc[1]], -1)
        err = max(err, np.abs(c.pixmap - exact).max())
    assert err < 1e-8


# ---------------------------------------------------------------------------
# batches


def test_build_batches_invariants(cutouts):
    image_index = [i % 3 for i in range(len(cutouts))]
    batches = build_batches(cutouts, image_index)
    shapes = {(b.image.shape[1:], b.ref.shape[1:]) for b, _ in batches}
    assert len(shapes) <= 3
    seen = []
    for batch, index in batches:
        assert isinstance(batch, CutoutBatch)
        n, side, _ = batch.image.shape
        rside = batch.ref.shape[1]
        # a fixed number of sources per bucket, whatever the source count
        assert n == source_chunk(side)
        assert rside in REFERENCE_BUCKETS
        assert side in CUTOUT_BUCKETS
        assert rside in CUTOUT_BUCKETS
        assert batch.pixmap.shape == (n, 2 * side + 1, 2 * side + 1, 2)
        assert batch.image.dtype == np.float32
        assert batch.pixmap.dtype == np.float64
        assert batch.shape.dtype == np.int32
        assert batch.image_index.dtype == np.int32
        assert np.array_equal(batch.valid, index >= 0)
        pad = ~batch.valid
        assert not batch.image[pad].any()
        assert not batch.ref[pad].any()
        assert not batch.image_valid[pad].any()
        assert not batch.ref_valid[pad].any()
        assert np.all(batch.weight[pad] == 0)
        assert np.all(batch.iscale[pad] == 0)
        assert np.all(batch.pixmap[pad] == (rside - 1) / 2)
        assert np.all(batch.variance[pad] == 1)
        for row in np.flatnonzero(batch.valid):
            c = cutouts[index[row]]
            h, w = c.shape
            hr, wr = c.ref_shape
            assert tuple(batch.shape[row]) == (h, w)
            np.testing.assert_array_equal(batch.image[row, :h, :w], c.image)
            assert not batch.image_valid[row, h:].any()
            assert not batch.image_valid[row, :, w:].any()
            np.testing.assert_array_equal(batch.ref[row, :hr, :wr], c.ref)
            np.testing.assert_array_equal(
                batch.pixmap[row, : 2 * h + 1, : 2 * w + 1], c.pixmap
            )
            assert np.all(batch.pixmap[row, 2 * h + 1 :] == PIXMAP_OUTSIDE)
            assert batch.image_index[row] == image_index[index[row]]
            assert batch.weight[row] == c.weight
            np.testing.assert_array_equal(batch.predicted[row], c.predicted)
            seen.append(int(index[row]))
    assert sorted(seen) == list(range(len(cutouts)))


def test_padded_pixmap_nodes_blot_to_zero(cutouts):
    """Nodes beyond a source's true grid sample nothing (fill value)."""
    from subpixal_jax.core.blot import blot

    batch, _index = build_batches(cutouts, [0] * len(cutouts))[0]
    row = 0
    h, w = batch.shape[row]
    ones = np.ones(batch.ref.shape[1:], np.float32)
    out = np.asarray(blot(ones, batch.pixmap[row, ::2, ::2][:-1, :-1], interp="linear"))
    # Integer node h (one past the last pixel) is still a real node.
    assert np.all(out[h + 1 :] == 0)
    assert np.all(out[:, w + 1 :] == 0)
    assert np.all(out[:h, :w] == 1)


def test_build_batches_bad_input(cutouts):
    with pytest.raises(ValueError, match="image_index"):
        build_batches(cutouts, [0])
    with pytest.raises(ValueError, match="chunk"):
        build_batches(cutouts, [0] * len(cutouts), chunk=-1)


def test_iter_batches_is_lazy_and_equals_the_list(cutouts):
    """Batches are made one at a time; bad input fails at the call."""
    many = list(cutouts) * 3
    owner = [0] * len(many)
    steps = iter_batches(many, owner, chunk=4)
    first = next(steps)
    listed = build_batches(many, owner, chunk=4)
    for (a, ia), (b, ib) in zip([first, *steps], listed, strict=True):
        np.testing.assert_array_equal(ia, ib)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="chunk"):
        iter_batches(many, owner, chunk=-1)  # not deferred to the first batch


def test_build_batches_chunks_bound_the_shapes(cutouts):
    """Many sources: more calls of the same shapes, not new shapes."""
    many = list(cutouts) * 7
    owner = [0] * len(many)
    small = build_batches(cutouts, [0] * len(cutouts), chunk=4)
    large = build_batches(many, owner, chunk=4)
    shape = {(b.image.shape, b.ref.shape) for b, _ in small}
    assert {(b.image.shape, b.ref.shape) for b, _ in large} == shape
    assert len(large) > len(small)
    for batch, _ in large:
        assert batch.image.shape[0] == 4
    rows = np.concatenate([index[index >= 0] for _, index in large])
    assert sorted(rows) == list(range(len(many)))
    # chunk=0: one batch per bucket, padded to a power of two (former layout)
    whole = build_batches(many, owner, chunk=0)
    assert len(whole) == len(shape)
    for batch, index in whole:
        assert batch.image.shape[0] == source_bucket(int(np.sum(index >= 0)))


# ---------------------------------------------------------------------------
# fit points


def test_reference_points_sign_synthetic(scene, cutouts):
    """With the measured d = predicted - true, the §7 correction restores truth."""
    exposure, ref_wcs = scene["exposure"], scene["ref_wcs"]
    shift = np.array([0.37, -0.21])  # true position = header position - shift
    dxdy = np.tile(shift, (len(cutouts), 1))
    xy, uv = reference_points(cutouts, dxdy, exposure, ref_wcs)
    s = (xy - uv).mean(0)
    jac_scale = CHIP_SCALE / REF_SCALE
    # xy - uv ≈ -J d: opposite to d, scaled to reference pixels.
    assert s @ shift < -0.95 * jac_scale * shift @ shift
    np.testing.assert_allclose(
        np.linalg.norm(s), np.linalg.norm(shift) * jac_scale, rtol=0.05
    )
    # Corrected WCS (docs/conventions.md §5, pure shift): W'(p) = L(L^-1(W(p)) - s);
    # the true
    # position predicted - d must land on the catalog position.
    for c, x_cat in zip(cutouts, xy, strict=True):
        chip = exposure.chip(c.extver)
        true = np.add(c.blc, c.predicted) - shift
        moved = ref_wcs.wcs_world2pix(chip.wcs.all_pix2world([true], 0), 0)[0] - s
        assert np.linalg.norm(moved - x_cat) < 0.02
        np.testing.assert_allclose(x_cat, c.src_pos, atol=1e-7)


def test_reference_points_bad_input(scene, cutouts):
    with pytest.raises(ValueError, match="dxdy"):
        reference_points(cutouts, np.zeros((1, 2)), scene["exposure"], scene["ref_wcs"])


# ---------------------------------------------------------------------------
# simulator: two-chip exposures with a known injected error


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("sim")
    error = WcsError(shift=(0.7, -0.4))
    sim = simulate_exposures(
        outdir, n_exposures=1, chip_shape=(128, 256), errors=[error], seed=3
    )
    frame = sim.frame_wcs[0]
    ny, nx = frame.pixel_shape[::-1]
    xy = frame.wcs_world2pix(np.stack([sim.sources["ra"], sim.sources["dec"]], -1), 0)
    ids = np.asarray(sim.sources["id"])
    seg = _disc_segmentation((ny, nx), xy, ids, 3.0)
    ref = _gauss_image((ny, nx), xy, np.asarray(sim.sources["flux"]) / sim.exptime, 1.0)
    catalog = Table({"id": ids, "x": xy[:, 0], "y": xy[:, 1]})
    prim = create_primary_cutouts(catalog, seg)
    header_exp = read_exposure(sim.paths[0])
    true_exp = read_exposure(sim.paths[0])
    for chip in true_exp.chips:
        chip.wcs = sim.true_wcs[0][chip.extver]
    args = (prim, seg, ref.astype(np.float32), np.ones((ny, nx), bool), frame)
    return {
        "sim": sim,
        "error": error,
        "frame": frame,
        "header": create_cutouts(*args, header_exp, sky=dict.fromkeys((1, 2), sim.sky)),
        "true": create_cutouts(*args, true_exp, sky=dict.fromkeys((1, 2), sim.sky)),
        "header_exp": header_exp,
        "true_exp": true_exp,
    }


def test_simulated_predicted_positions_with_true_wcs(simulated):
    sim = simulated["sim"]
    radec = {int(r["id"]): (r["ra"], r["dec"]) for r in sim.sources}
    cs = simulated["true"]
    assert {c.extver for c in cs} == {1, 2}
    for c in cs:
        true_pix = sim.true_wcs[0][c.extver].all_world2pix(
            [radec[c.src_id]], 0, tolerance=1e-10
        )[0]
        assert np.linalg.norm(np.add(c.blc, c.predicted) - true_pix) < 1e-4
        # The variance came from ERR (SCI/ERR/DQ files).
        assert np.all(c.variance[c.image_valid] > 0)


def test_simulated_both_chips_in_one_batch(simulated):
    cs = simulated["header"]
    batches = build_batches(cs, [0] * len(cs))
    assert any(
        len({cs[i].extver for i in index[index >= 0]}) == 2 for _, index in batches
    )


def test_simulated_reference_points_recover_injected_shift(simulated):
    """d = predicted(header) - true gives xy - uv = the restoring fit shift -s."""
    header, true = simulated["header"], simulated["true"]
    by_key = {(c.src_id, c.extver): c for c in true}
    pairs = [
        (h, by_key[(h.src_id, h.extver)])
        for h in header
        if (h.src_id, h.extver) in by_key
    ]
    assert len(pairs) > 5
    hs = [h for h, _ in pairs]
    d = np.array(
        [np.add(h.blc, h.predicted) - np.add(t.blc, t.predicted) for h, t in pairs]
    )
    xy, uv = reference_points(hs, d, simulated["header_exp"], simulated["frame"])
    s_fit = (xy - uv).mean(0)
    # Restoring fit F = T^-1: s_F = -s (simulate.py docstring).
    np.testing.assert_allclose(s_fit, -np.array(simulated["error"].shift), atol=2e-3)
    np.testing.assert_allclose(xy - uv, np.broadcast_to(s_fit, xy.shape), atol=5e-3)


@pytest.mark.slow
def test_chunked_batches_measure_the_same_displacements(cutouts, simulated):
    """The chunked layout changes only padding: displacements agree to 1e-6 px."""
    from collections import Counter

    import jax

    from subpixal_jax.core.measure import measure_batch

    def key(c):
        return cutout_bucket(max(c.shape))

    def ref_sides(group, chunk):
        return {
            b.ref.shape[1]
            for b, _ in build_batches(group, [0] * len(group), chunk=chunk)
        }

    # the smallest image bucket (compiles fastest) whose reference cutouts
    # the new layout pads differently
    groups = []
    for cs in (cutouts, simulated["header"]):
        counts = Counter(key(c) for c in cs)
        groups += [[c for c in cs if key(c) == k] for k, n in counts.items() if n > 8]
    group = next(g for g in groups if ref_sides(g, 0) != ref_sides(g, None))

    def measure(chunk):
        out = np.full((len(group), 2), np.nan)
        with jax.enable_x64(True):
            for batch, index in build_batches(group, [0] * len(group), chunk=chunk):
                found, _ = measure_batch(batch)
                real = index >= 0
                out[index[real]] = np.asarray(found.dxdy)[real]
        return out

    before, after = measure(0), measure(None)
    assert np.isfinite(before).sum() > 10
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6, equal_nan=True)


# ---------------------------------------------------------------------------
# the leave-one-out reference read box by box


@pytest.fixture(scope="module")
def drizzled(tmp_path_factory):
    sim = simulate_exposures(
        tmp_path_factory.mktemp("loo"), n_exposures=3, chip_shape=(256, 512), seed=3
    )
    resample = DrizzleResample(sim.paths)
    options = AlignOptions.create()
    return resample, refresh_catalog(PhotutilsCatalog(), resample, options), options


class _CountingReader:
    """A `ReferenceReader` proxy that records the regions read."""

    def __init__(self, reader):
        self.reader, self.regions = reader, []

    @property
    def shape(self):
        return self.reader.shape

    def read(self, region):
        self.regions.append(region)
        return self.reader.read(region)


@pytest.mark.parametrize("ratio", [None, 0.0, math.inf])
def test_reader_cutouts_equal_full_frame_cutouts(drizzled, ratio, monkeypatch):
    """Cutouts from the reader (boxes or one whole frame) = from full arrays."""
    resample, state, options = drizzled
    n_partial = 0
    for i, exclude in ((1, frozenset()), (2, frozenset({0}))):
        sci, wht = resample.leave_out([i, *exclude])
        args = (resample.output_wcs, resample.exposures[i])
        kwargs = {"sky": resample.sky[i], "combine_seg_mask": options.combine_seg_mask}
        prim, seg = state.primaries, state.segmentation
        full = create_cutouts(prim, seg, sci, wht > 0, *args, **kwargs)
        if ratio is None:  # the loop's call, the default choice
            read = image_cutouts(i, resample, state, options, exclude)
        else:
            monkeypatch.setattr(cutouts_module, "FULL_READ_RATIO", ratio)
            reader = _CountingReader(resample.leave_out_reader([i, *exclude]))
            read = create_cutouts(prim, seg, reader, None, *args, **kwargs)
            n_reads = len(reader.regions)
            assert n_reads == 1 if ratio == 0 else n_reads >= len(read)
        assert len(read) == len(full) > 50
        for a, b in zip(read, full, strict=True):
            for name in a.__dataclass_fields__:
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        # reference boxes that reach into pixels no remaining exposure covers
        n_partial += sum(
            (
                wht[c.ref_blc[1] : c.ref_trc[1] + 1, c.ref_blc[0] : c.ref_trc[0] + 1]
                == 0
            ).any()
            for c in read
        )
    assert n_partial > 0


class _ArrayReader:
    """A `ReferenceReader` over full arrays (what a resampler's reader gives)."""

    def __init__(self, sci, wht):
        self.sci, self.wht = sci, wht

    @property
    def shape(self):
        return self.sci.shape

    def read(self, region):
        return self.sci[region], self.wht[region]


def test_reader_reference_and_its_bad_input(scene, primaries, cutouts):
    wht = np.where(scene["ref_valid"], np.float32(2.5), np.float32(0))
    reader = _ArrayReader(scene["ref_data"], wht)
    args = (scene["ref_wcs"], scene["exposure"])
    boxed = create_cutouts(primaries, scene["seg"], reader, None, *args, sky=SKY)
    assert len(boxed) == len(cutouts) > 0
    for a, b in zip(boxed, cutouts, strict=True):
        np.testing.assert_array_equal(a.ref, b.ref)
        np.testing.assert_array_equal(a.ref_valid, b.ref_valid)
    with pytest.raises(ValueError, match="ref_valid must be None"):
        create_cutouts(primaries, scene["seg"], reader, scene["ref_valid"], *args)
    small = _ArrayReader(scene["ref_data"][:-1], wht[:-1])
    with pytest.raises(ValueError, match="ref_data"):
        create_cutouts(primaries, scene["seg"], small, None, *args)

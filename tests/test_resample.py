"""Tests of reference.resample: grid, flux, leave-one-out, WCS updates, CRs."""

import re
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from scipy.special import erf

import subpixal_jax
from subpixal_jax.geometry.homography import focal_homography
from subpixal_jax.io.images import read_exposure
from subpixal_jax.reference import resample as resample_module
from subpixal_jax.reference.resample import (
    DrizzleConfig,
    DrizzleResample,
    LeaveOneOutStack,
    Resample,
    affine_pixmap,
    build_output_grid,
    chip_pixmap,
    cosmic_ray_masks,
    drizzle_exposure,
    exposure_skies,
    median_combine,
    native_pixel_scale,
)
from subpixal_jax.testing.real_data import acs_wfc_wcs

RA0, DEC0 = 6.02, -72.08
SCALE = 0.05 / 3600.0
CHIP = (48, 80)  # (ny, nx) per chip
PSF_SIGMA = 1.1


def _chip_wcs(dx, dy, rot_deg, k):
    """Chip k (0-based) of an exposure dithered by (dx, dy) px and rotated."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [RA0, DEC0]
    w.wcs.crpix = [CHIP[1] / 2 + 0.5 + dx, CHIP[0] + 0.5 + dy - k * CHIP[0]]
    t = np.radians(rot_deg)
    w.wcs.cd = SCALE * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    w.wcs.set()
    return w


def _scene(n=40, seed=3):
    rng = np.random.default_rng(seed)
    half = 0.8 * SCALE * np.array([CHIP[1] / 2, CHIP[0]])
    ra = RA0 + rng.uniform(-half[0], half[0], n) / np.cos(np.radians(DEC0))
    dec = DEC0 + rng.uniform(-half[1], half[1], n)
    flux = rng.uniform(2e3, 2e4, n)  # electrons per second
    return ra, dec, flux


def _render(w, shape, ra, dec, flux_counts):
    """Pixel-integrated Gaussian stars (exact flux per pixel)."""
    img = np.zeros(shape)
    x, y = w.all_world2pix(ra, dec, 0)
    edges_x = np.arange(shape[1] + 1) - 0.5
    edges_y = np.arange(shape[0] + 1) - 0.5
    s = np.sqrt(2) * PSF_SIGMA
    for xi, yi, f in zip(x, y, flux_counts, strict=True):
        px = np.diff(0.5 * erf((edges_x - xi) / s))
        py = np.diff(0.5 * erf((edges_y - yi) / s))
        img += f * np.outer(py, px)
    return img


def _exposure(dither, *, scene, n_chips=2, units="counts", noise=0.0, seed=0, crs=()):
    """One exposure dithered by ``dither = (dx, dy, rot_deg)``, 100 s, sky 20/s."""
    dx, dy, rot = dither
    exptime, sky = 100.0, 20.0
    ra, dec, flux = scene
    rng = np.random.default_rng(seed)
    prim = fits.PrimaryHDU()
    prim.header["EXPTIME"] = exptime
    hdus = [prim]
    for k in range(n_chips):
        w = _chip_wcs(dx, dy, rot, k)
        counts = _render(w, CHIP, ra, dec, flux * exptime) + sky * exptime
        counts += rng.normal(0, noise, CHIP) if noise else 0
        for y, x, v in crs:
            if k == 0:
                counts[y, x] += v
        data = counts if units == "counts" else counts / exptime
        hdr = w.to_header()
        hdr["BUNIT"] = "ELECTRONS" if units == "counts" else "ELECTRONS/S"
        sci = fits.ImageHDU(data.astype(np.float32), hdr, name="SCI")
        err_c = np.sqrt(np.maximum(counts, 0) + noise**2)
        err = err_c if units == "counts" else err_c / exptime
        errh = fits.ImageHDU(err.astype(np.float32), name="ERR")
        for h in (sci, errh):
            h.header["EXTVER"] = k + 1
        hdus += [sci, errh]
    return fits.HDUList(hdus)


DITHERS = [(0.0, 0.0, 0.0), (3.3, -2.6, 0.0), (-4.1, 1.7, 0.05), (1.2, 5.4, -0.05)]


@pytest.fixture(scope="module")
def scene():
    return _scene()


@pytest.fixture(scope="module")
def exposures(scene):
    return [
        read_exposure(_exposure((dx, dy, r), scene=scene, seed=i))
        for i, (dx, dy, r) in enumerate(DITHERS)
    ]


@pytest.fixture(scope="module")
def resample(exposures):
    return DrizzleResample(exposures)


def test_protocol_grid_and_units(resample, exposures):
    assert isinstance(resample, Resample)
    assert resample.n_drizzles == 8  # 4 exposures x 2 chips
    ny, nx = resample.output_shape
    assert resample.sci.shape == resample.wht.shape == (ny, nx)
    assert resample.sci.dtype == resample.wht.dtype == np.float32
    w = resample.output_wcs
    assert not w.has_distortion
    assert list(w.wcs.ctype) == ["RA---TAN", "DEC--TAN"]
    # north up, east left, first chip's scale
    np.testing.assert_allclose(
        w.pixel_scale_matrix, [[-SCALE, 0], [0, SCALE]], atol=1e-12
    )
    # both chips of every exposure land in the one output
    for i in range(4):
        _, wt = resample.contribution(i)
        for c in exposures[i].chips:
            pm = chip_pixmap(c.wcs, w, c.shape)
            x, y = np.rint(pm[c.shape[0] // 2, c.shape[1] // 2]).astype(int)
            assert wt[y, x] > 0
    # uncovered pixels: sci 0, wht 0
    assert resample.wht[0, 0] == 0
    assert resample.sci[0, 0] == 0
    # sky 'auto' finds the injected sky (20 e-/s x 100 s), native units
    for d in resample.sky:
        assert set(d) == {1, 2}
        for v in d.values():
            assert abs(v - 2000.0) < 15.0


def test_callers_exposures_untouched(exposures):
    before = [c.valid.copy() for c in exposures[0].chips]
    r = DrizzleResample(exposures[:2], sky=[0.0, {1: 0.0, 2: 0.0}])
    r.exposures[0].chips[0].valid[:] = False
    assert r.exposures[0] is not exposures[0]
    for b, c in zip(before, exposures[0].chips, strict=True):
        np.testing.assert_array_equal(b, c.valid)


def test_flux_conserved():
    """Noise-free stars, coarser rotated output grid: total flux within 0.1%."""
    ra, dec, flux = _scene(n=12, seed=5)
    # keep stars >= 10 px away from every chip edge of both exposures
    keep = np.abs(dec - DEC0) < SCALE * (CHIP[0] - 12)
    keep &= np.abs((ra - RA0) * np.cos(np.radians(DEC0))) < SCALE * (CHIP[1] / 2 - 12)
    scene = (ra[keep], dec[keep], flux[keep])
    exps = [
        _exposure((dx, dy, r), scene=scene, seed=i)
        for i, (dx, dy, r) in enumerate(DITHERS[:2])
    ]
    r = DrizzleResample(exps, pixel_scale=0.07, rotation=30.0, sky=[2000.0, 2000.0])
    total = float(np.sum(r.sci, dtype=np.float64))
    np.testing.assert_allclose(total, scene[2].sum(), rtol=1e-3)
    for i in range(2):
        one = float(np.sum(r.contribution(i)[0], dtype=np.float64))
        np.testing.assert_allclose(one, scene[2].sum(), rtol=1e-3)


def test_leave_one_out_equals_redrizzle(resample, exposures):
    n0 = resample.n_drizzles
    for i in range(len(exposures)):
        sci, wht = resample.leave_one_out(i)
        assert resample.n_drizzles == n0  # O(1): no drizzle at all
        others = [e for j, e in enumerate(exposures) if j != i]
        sky = [d for j, d in enumerate(resample.sky) if j != i]
        direct = DrizzleResample(others, output_wcs=resample.output_wcs, sky=sky)
        np.testing.assert_allclose(wht, direct.wht, rtol=2e-6, atol=1e-3)
        scale = np.abs(direct.sci).max()
        np.testing.assert_allclose(sci, direct.sci, rtol=1e-5, atol=1e-6 * scale)
        # pixels only exposure i covers are 0 in the reference
        own = resample.contribution(i)[1] > 0
        only_i = own & (wht == 0)
        assert np.all(sci[only_i] == 0)


def test_leave_out_reader_regions_equal_the_full_frame(exposures, monkeypatch):
    r = DrizzleResample(exposures, sky=None)  # own copy: updated below
    monkeypatch.setattr(resample_module, "_ROW_BLOCK", 7)  # full frames in blocks
    full_sci, full_wht = r.leave_out([2, 0, 2])
    n0 = r.n_drizzles
    reader = r.leave_out_reader([2, 0, 2])
    assert reader.indices == (0, 2)
    assert reader.shape == r.output_shape
    # oracle: (S - s_0 - s_2) / (W - w_0 - w_2) from the contributions
    parts = [r.contribution(j) for j in range(len(exposures))]
    s_all = sum(img.astype(np.float64) * wht for img, wht in parts)
    w_all = sum(wht.astype(np.float64) for _, wht in parts)
    s = s_all - parts[0][0].astype(np.float64) * parts[0][1]
    s -= parts[2][0].astype(np.float64) * parts[2][1]
    w = w_all - parts[0][1] - parts[2][1]
    with np.errstate(invalid="ignore", divide="ignore"):
        oracle = np.where(w > 0, s / w, 0).astype(np.float32)
    np.testing.assert_array_equal(full_sci, oracle)  # same operations, same order
    np.testing.assert_array_equal(full_wht, np.where(w > 0, w, 0).astype(np.float32))
    ny, nx = r.output_shape
    regions = [
        (slice(None), slice(None)),
        (slice(10, 37), slice(5, 60)),
        (slice(0, 4), slice(nx - 3, nx)),  # a corner, partly uncovered
        (slice(ny // 2, ny // 2 + 1), slice(nx // 3, nx // 3 + 1)),
    ]
    for region in regions:
        sci, wht = reader.read(region)
        assert sci.dtype == wht.dtype == np.float32
        np.testing.assert_array_equal(sci, full_sci[region])  # bit for bit
        np.testing.assert_array_equal(wht, full_wht[region])
    assert (full_wht == 0).any()
    assert (full_wht > 0).any()
    assert r.n_drizzles == n0
    shifted = {c.extver: c.wcs.deepcopy() for c in r.exposures[1].chips}
    for w1 in shifted.values():
        w1.wcs.crpix = w1.wcs.crpix + np.array([0.4, -0.3])
    r.update_wcs(1, shifted)
    np.testing.assert_array_equal(reader.read(regions[1])[0], full_sci[regions[1]])
    assert r.wht.shape == r.output_shape  # the combination changes on this read
    with pytest.raises(RuntimeError, match="changed"):
        reader.read(regions[1])
    sci, _ = r.leave_out_reader([0, 2]).read(regions[1])
    np.testing.assert_array_equal(sci, r.leave_out([0, 2])[0][regions[1]])
    assert not np.array_equal(sci, full_sci[regions[1]])


def test_update_wcs_redrizzles_one_exposure(exposures):
    r = DrizzleResample(exposures, sky=None)
    n0 = r.n_drizzles
    shifted = {}
    for c in r.exposures[2].chips:
        w = c.wcs.deepcopy()
        w.wcs.crpix = w.wcs.crpix + np.array([0.4, -0.3])
        shifted[c.extver] = w
    r.update_wcs(2, shifted)
    assert r.n_drizzles == n0  # drizzled on the first read
    r.update_wcs(2, shifted)
    assert r.wht.shape == r.output_shape
    assert r.n_drizzles == n0 + 2  # only exposure 2's two chips, once
    assert r.exposures[2].chips[0].wcs.wcs.crpix[0] == shifted[1].wcs.crpix[0]
    shifted[1].wcs.crpix = [0, 0]  # the resampler keeps its own copy
    assert r.exposures[2].chips[0].wcs.wcs.crpix[0] != 0
    # identical to building from scratch with the new WCS
    fresh = DrizzleResample(r.exposures, output_wcs=r.output_wcs, sky=None)
    scale = np.abs(fresh.sci).max()
    np.testing.assert_allclose(r.sci, fresh.sci, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(r.wht, fresh.wht, rtol=1e-6)
    for i in (0, 2):
        a, _ = r.leave_one_out(i)
        b, _ = fresh.leave_one_out(i)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
    with pytest.raises(ValueError, match="extver"):
        r.update_wcs(0, {7: shifted[2]})
    with pytest.raises(ValueError, match="exposure index"):
        r.leave_one_out(9)


def test_counts_and_rate_inputs_agree(scene):
    a = _exposure((0, 0, 0), scene=scene, units="counts")
    b = _exposure((0, 0, 0), scene=scene, units="rate")
    c = _exposure((2.5, 1.5, 0), scene=scene)
    ra = DrizzleResample([a, c], sky=None)
    rb = DrizzleResample([b, c], sky=None, output_wcs=ra.output_wcs)
    np.testing.assert_allclose(ra.sci, rb.sci, rtol=1e-5, atol=1e-3)


def test_ivm_weights(exposures):
    r = DrizzleResample(exposures[:2], weight="ivm")
    assert np.all(np.isfinite(r.sci))
    assert r.wht.max() > 0
    # inverse variance of the rate: exptime^2 / err^2 at most ~ 100^2 / 2000
    assert r.wht.max() < 2 * 100.0**2 / 2000.0 * 4


def test_cosmic_ray_rejection(scene):
    crs = [(10, 15, 5e4), (30, 60, 2e4), (35, 25, 2e3)]  # star-free pixels
    exps = [
        _exposure(
            (dx, dy, r), scene=scene, seed=i, noise=5.0, crs=crs if i == 1 else ()
        )
        for i, (dx, dy, r) in enumerate(DITHERS)
    ]
    plain = DrizzleResample(exps)
    clean = DrizzleResample(exps, cr_reject=True)
    flagged_exposures = [
        i
        for i, e in enumerate(clean.exposures)
        if not all(c.valid.all() for c in e.chips)
    ]
    assert 1 in flagged_exposures
    # separate drizzle, then again only the exposures with flags
    assert clean.n_drizzles == 8 + 2 * len(flagged_exposures)
    valid = clean.exposures[1].chips[0].valid
    for y, x, _ in crs:
        assert not valid[y - 1 : y + 2, x - 1 : x + 2].any()  # grown by 1 px
    # only the CRs (and their 3x3 growth), not star cores, are flagged elsewhere
    flagged = sum(int((~c.valid).sum()) for e in clean.exposures for c in e.chips)
    assert flagged <= 3 * 9 + 20
    # the CR is gone from the combined image
    w = clean.exposures[1].chips[0].wcs
    for y, x, v in crs:
        ox, oy = np.rint(chip_pixmap(w, clean.output_wcs, CHIP)[y, x]).astype(int)
        box = np.s_[oy - 1 : oy + 2, ox - 1 : ox + 2]
        assert plain.sci[box].max() > 0.1 * v / 100.0 / 4
        cleaned = np.abs(clean.sci[box] - plain.sci[box]).max()
        assert cleaned > 0.05 * v / 100.0 / 4


def test_worker_processes_drizzle_the_same_products(scene, caplog):
    """Drizzling in worker processes changes no bit; a dead worker is survived."""
    from subpixal_jax.reference import drizzle_workers

    crs = [(10, 15, 5e4), (30, 60, 2e4)]
    exps = [
        _exposure((dx, dy, r), scene=scene, seed=i, crs=crs if i == 1 else ())
        for i, (dx, dy, r) in enumerate(DITHERS)
    ]
    here = DrizzleResample(exps, cr_reject=True, workers=1)
    pooled = DrizzleResample(exps, cr_reject=True, workers=2)
    assert (here.workers, pooled.workers) == (1, 2)

    def same():
        np.testing.assert_array_equal(pooled.sci, here.sci)
        np.testing.assert_array_equal(pooled.wht, here.wht)
        for a, b in zip(pooled.exposures, here.exposures, strict=True):
            for ca, cb in zip(a.chips, b.chips, strict=True):
                np.testing.assert_array_equal(ca.valid, cb.valid)
        assert pooled.n_drizzles == here.n_drizzles

    def shift(i, dx):
        for r in (here, pooled):
            w = r.exposures[i].chips[0].wcs.deepcopy()
            w.wcs.crpix = w.wcs.crpix + np.array([dx, -0.5 * dx])
            r.update_wcs(i, {1: w})

    same()
    shift(1, 0.3)
    shift(2, 0.6)
    same()
    # a worker killed under the pool: the next drizzle is done here instead
    for worker in drizzle_workers.shared_pool(2)._all:
        worker.process.kill()
        worker.process.wait()
    shift(1, -0.2)
    shift(3, -0.2)
    with caplog.at_level("WARNING", logger="subpixal_jax.reference.resample"):
        same()
    assert "drizzle worker" in caplog.text
    assert pooled.workers == 1


def test_a_worker_job_is_not_held_while_it_drizzles(monkeypatch):
    """An exposure's inputs are freed once sent, not when the worker replies."""
    import pickle
    import weakref

    from subpixal_jax.reference import drizzle_workers

    n = 64
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    data = np.full((n, n), 3.0, np.float32)
    chip = {
        "data": data,
        "exptime": 1.0,
        "pixmap": np.dstack([xx, yy]),
        "weight_map": np.ones_like(data),
    }
    alive = weakref.ref(data)
    held_at_reply = []
    real_load = pickle.load

    def load(stream):
        held_at_reply.append(alive() is not None)
        return real_load(stream)

    monkeypatch.setattr(drizzle_workers.pickle, "load", load)
    with drizzle_workers.DrizzlePool(1) as pool:
        future = pool.submit((n, n), "square", [chip])
        del chip, data
        sci, _ = future.result()
    assert held_at_reply == [False]
    np.testing.assert_allclose(sci[1:-1, 1:-1], 3.0)


def test_lanczos_drizzles_combine_without_negative_weights():
    """The Lanczos kernel's negative lobes never reach a combination.

    Two drizzles of one flat field, one with a masked hole: drizzle leaves
    negative weights around the hole (and the grid edge), which summed with
    the other exposure's would lift the combination there by ~20%.
    """
    from subpixal_jax.reference.drizzle_workers import drizzle_chips

    n = 120
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    roll = np.deg2rad(17.0)
    pixmap = np.dstack(
        [
            30 + np.cos(roll) * xx - np.sin(roll) * yy + 0.3,
            30 + np.sin(roll) * xx + np.cos(roll) * yy + 0.2,
        ]
    )
    flat = np.full((n, n), 100.0, np.float32)
    holed = np.ones_like(flat)
    holed[50:53, 50:55] = 0
    products = []
    for weight in (np.ones_like(flat), holed):
        chip = {"data": flat, "exptime": 1.0, "pixmap": pixmap, "weight_map": weight}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the flux warning is handled
            products.append(drizzle_chips((200, 200), "lanczos3", [chip]))
    for sci, wht in products:
        assert wht.min() == 0.0
        assert np.all(sci[wht == 0] == 0)
    s = sum(sci.astype(float) * wht for sci, wht in products)
    w = sum(wht.astype(float) for _, wht in products)
    covered = w > 0
    np.testing.assert_allclose(s[covered] / w[covered], 100.0, atol=0.01)


def test_lanczos_only_onto_grids_no_coarser_than_the_inputs(exposures):
    native = native_pixel_scale(exposures)
    for scale, expected in ((native, "lanczos3"), (0.5 * native, "lanczos3")):
        r = DrizzleResample(exposures, kernel="lanczos3", pixel_scale=scale)
        assert r.final_kernel == r.kernel == expected
    coarse = DrizzleResample(
        exposures, kernel="lanczos3", early_kernel="turbo", pixel_scale=1.6 * native
    )
    assert coarse.kernel == "turbo"
    assert coarse.final_kernel == "square"
    assert coarse.use_final_kernel()
    assert coarse.kernel == "square"


def test_drizzle_worker_count(scene, monkeypatch):
    from subpixal_jax.reference import resample as module

    exps = [read_exposure(_exposure(d, scene=scene, seed=0)) for d in DITHERS[:3]]
    monkeypatch.delenv(module.WORKERS_ENV, raising=False)
    assert module.drizzle_worker_count(8, exps) == 3  # never more than exposures
    assert module.drizzle_worker_count(None, exps) == 1  # small: in-process
    monkeypatch.setattr(module, "PARALLEL_MIN_PIXELS", 1)
    monkeypatch.setattr(module, "_usable_cpus", lambda: 2)
    monkeypatch.setattr(module, "_available_bytes", lambda: 1e12)
    assert module.drizzle_worker_count(None, exps) == 2
    pixels = sum(c.data.size for c in exps[0].chips)
    one = module.WORKER_BYTES_PER_PIXEL * pixels
    monkeypatch.setattr(module, "_available_bytes", lambda: 4 * one)  # holds 1
    assert module.drizzle_worker_count(None, exps) == 1
    monkeypatch.setenv(module.WORKERS_ENV, "1")
    assert module.drizzle_worker_count(None, exps) == 1
    monkeypatch.setenv(module.WORKERS_ENV, "many")
    with pytest.raises(ValueError, match=module.WORKERS_ENV):
        module.drizzle_worker_count(None, exps)
    with pytest.raises(ValueError, match="workers"):
        DrizzleResample(exps, workers=0)


def test_cosmic_ray_pass_reuses_held_contributions(scene):
    """A contribution drizzled with the same WCS and masks is never redone."""
    crs = [(10, 15, 5e4), (30, 60, 2e4)]
    exps = [
        _exposure(
            (dx, dy, r), scene=scene, seed=i, noise=5.0, crs=crs if i == 1 else ()
        )
        for i, (dx, dy, r) in enumerate(DITHERS)
    ]
    clean = DrizzleResample(exps, cr_reject=True)
    n_flagged = sum(not all(c.valid.all() for c in e.chips) for e in clean.exposures)
    # the loop's first rejection on a resampler built without it (DQ-only
    # contributions held): the median is made of them, and only the flagged
    # exposures are drizzled again (before: all 4 twice, 16 chip drizzles)
    plain = DrizzleResample(exps)
    plain.reject_cosmic_rays()
    np.testing.assert_array_equal(plain.sci, clean.sci)
    assert plain.n_drizzles == 8 + 2 * n_flagged
    np.testing.assert_array_equal(plain.wht, clean.wht)
    # a second rejection: the flagged exposures need their DQ-only drizzle
    # for the median and their flagged one after; the others keep theirs
    n0 = clean.n_drizzles
    clean.reject_cosmic_rays()
    clean.median_image()
    assert clean.n_drizzles == n0 + 2 * 2 * n_flagged
    np.testing.assert_allclose(clean.sci, plain.sci, rtol=1e-6, atol=1e-6)


def test_bad_input(scene, exposures):
    far = _exposure((0, 0, 0), scene=scene)
    for h in far[1:]:
        if "CRVAL1" in h.header:
            h.header["CRVAL1"] = RA0 + 0.5
    with pytest.raises(ValueError, match="overlap"):
        DrizzleResample([exposures[0], far])
    far2 = _exposure((0, 0, 0), scene=scene)
    for h in far2[1:]:
        if "CRVAL1" in h.header:
            h.header["CRVAL1"] = RA0 + 60
    with pytest.raises(ValueError, match="overlap"):
        DrizzleResample([exposures[0], far2])
    r = DrizzleResample(exposures[:2])
    other = r.output_wcs.deepcopy()
    other.wcs.crval = [RA0 + 1, DEC0]
    with pytest.raises(ValueError, match="outside the output grid"):
        DrizzleResample(exposures[:2], output_wcs=other)
    no_err = _exposure((0, 0, 0), scene=scene)
    for h in list(no_err):
        if h.name == "ERR":
            no_err.remove(h)
    with pytest.raises(ValueError, match="ivm"):
        DrizzleResample([no_err, exposures[1]], weight="ivm")
    for kw, match in [
        ({"kernel": "sinc"}, "kernel"),
        ({"pixfrac": 0.0}, "pixfrac"),
        ({"weight": "wht"}, "weight"),
        ({"sky": "median"}, "sky"),
        ({"sky": [1.0]}, "sky"),
        ({"sky": [{1: 0.0}, 0.0]}, "extver"),
        ({"cr_reject": True}, "cr_reject"),
        ({"pixel_scale": -1.0}, "pixel_scale"),
    ]:
        with pytest.raises(ValueError, match=match):
            DrizzleResample(exposures[:2], **kw)
    with pytest.raises(ValueError, match="at least one"):
        DrizzleResample([])
    with pytest.raises(ValueError, match="exposures must be"):
        DrizzleResample([1.0, 2.0])
    nan = _exposure((0, 0, 0), scene=scene, n_chips=1)
    nan[1].data[:] = np.nan
    with pytest.raises(ValueError, match="no valid"):
        DrizzleResample([nan, exposures[0]])


def _grid_for(w, rot_deg=20.0, ctype=("RA---TAN", "DEC--TAN"), offset=0.01):
    out = WCS(naxis=2)
    out.wcs.ctype = list(ctype)
    out.wcs.crval = w.wcs.crval + np.array([offset, offset])
    out.wcs.crpix = [2100.0, 2100.0]
    t = np.radians(rot_deg)
    out.wcs.cd = SCALE * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    out.wcs.set()
    return out


def test_fast_pixmap_matches_full_evaluation_on_acs_chip():
    w = acs_wfc_wcs()
    assert w.sip is not None
    assert w.det2im1 is not None
    assert w.cpdis1 is not None
    out = _grid_for(w)
    shape = (2048, 4096)  # the chip's real domain (CRPIX 2048, 1024), not NAXIS
    fast = chip_pixmap(w, out, shape)
    assert fast.shape == (*shape, 2)
    # The exact map on a lattice of rows/columns (covering edges and corners).
    ys = np.r_[0 : shape[0] : 61, shape[0] - 1]
    xs = np.r_[0 : shape[1] : 53, shape[1] - 1]
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    ra, dec = w.all_pix2world(xx.ravel(), yy.ravel(), 0)
    ex, ey = out.all_world2pix(ra, dec, 0)
    got = fast[yy, xx].reshape(-1, 2)
    err = np.hypot(got[:, 0] - ex, got[:, 1] - ey)
    assert err.max() < 1e-7  # measured 6e-9 px
    # NPOL/D2IM are really in there: dropping them moves pixels by > 0.01 px
    sip_only = w.deepcopy()
    sip_only.cpdis1 = sip_only.cpdis2 = sip_only.det2im1 = None
    plain = chip_pixmap(sip_only, out, (64, 64))
    assert np.abs(plain - fast[:64, :64]).max() > 1e-2


def test_fast_pixmap_falls_back_for_non_gnomonic_output():
    w = acs_wfc_wcs()
    out = _grid_for(w, ctype=("RA---SIN", "DEC--SIN"), offset=0.5)
    shape = (8, 4096)
    assert focal_homography(w, out, shape) is None
    fast = chip_pixmap(w, out, shape)
    np.testing.assert_array_equal(fast, chip_pixmap(w, out, shape, exact=True))
    # and a small TAN case agrees with the exact path too
    shape = (40, 50)
    out = _grid_for(w, rot_deg=-35.0)
    np.testing.assert_allclose(
        chip_pixmap(w, out, shape), chip_pixmap(w, out, shape, exact=True), atol=1e-8
    )


def _rotation(deg, scale=1.0):
    t = np.radians(deg)
    return scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def test_affine_pixmap_equals_corrected_wcs_on_acs_chip():
    from subpixal_jax.io.wcs import correct_wcs

    w = acs_wfc_wcs()
    out = _grid_for(w)
    out.wcs.radesys, out.wcs.equinox = "FK5", 2000.0  # the chip's frame
    out.wcs.set()
    # exact maps on a lattice over the chip's full 4096x2048 domain
    yy, xx = np.meshgrid(np.r_[0:2048:31, 2047], np.r_[0:4096:29, 4095], indexing="ij")

    def exact(wcs):
        ra, dec = wcs.all_pix2world(xx.ravel(), yy.ravel(), 0)
        return np.stack(out.all_world2pix(ra, dec, 0), axis=-1)

    before = exact(w)
    # a realistic correction (0.05 deg, 1e-4 scale, 2 px), about the grid's
    # reference pixel (what the loop uses) and about a point off the chip
    matrix, shift = _rotation(0.05, 1 + 1e-4), np.array([2.0, -1.5])
    for center in (out.wcs.crpix - 1.0, np.array([3000.0, 500.0])):
        corrected = correct_wcs(w, out, matrix, shift, center=center)
        moved = affine_pixmap(before, matrix, shift, center)
        # measured 7.5e-7 px: correct_wcs's second-order tangent-plane term
        np.testing.assert_allclose(moved, exact(corrected), rtol=0, atol=1e-6)
        # T(moved) is the old map (the definition, to rounding)
        back = (moved - center) @ matrix.T + center + shift
        np.testing.assert_allclose(back, before, rtol=0, atol=1e-9)


def test_update_wcs_with_affine_moves_cached_pixmaps(exposures):
    from subpixal_jax.io.wcs import correct_wcs

    r = DrizzleResample(exposures, sky=None)
    plain = DrizzleResample(exposures, output_wcs=r.output_wcs, sky=None)
    matrix, shift = _rotation(0.03, 1 - 2e-4), np.array([0.4, -0.3])
    center = r.output_wcs.wcs.crpix - 1.0
    new = {
        c.extver: correct_wcs(c.wcs, r.output_wcs, matrix, shift, center=center)
        for c in r.exposures[1].chips
    }
    old = {c.extver: r.pixmap(1, c.extver).copy() for c in r.exposures[1].chips}
    n0 = r.n_drizzles
    r.update_wcs(1, new, affine=(matrix, shift, center))
    plain.update_wcs(1, new)
    r.contribution(1)
    assert r.n_drizzles == n0 + 2
    for k, pm in old.items():
        np.testing.assert_array_equal(
            r.pixmap(1, k), affine_pixmap(pm, matrix, shift, center)
        )
        np.testing.assert_allclose(r.pixmap(1, k), plain.pixmap(1, k), atol=1e-8)
        assert r.exposures[1].chips[k - 1].wcs.wcs.crval[0] == new[k].wcs.crval[0]
    np.testing.assert_allclose(r.sci, plain.sci, rtol=1e-5, atol=1e-6 * r.sci.max())
    with pytest.raises(ValueError, match="affine"):
        r.update_wcs(1, new, affine=(matrix, shift))
    with pytest.raises(ValueError, match="2x2"):
        affine_pixmap(old[1], np.eye(3), shift, center)
    with pytest.raises(ValueError, match="2x2"):  # at the call, not the read
        r.update_wcs(1, new, affine=(np.eye(3), shift, center))
    # two corrections before a read: moved by both, in order, when read
    now = {k: r.pixmap(1, k).copy() for k in old}
    second = (np.eye(2), np.array([-0.1, 0.2]), center)
    r.update_wcs(1, new, affine=(matrix, shift, center))
    r.update_wcs(1, new, affine=second)
    for k, pm in now.items():
        both = affine_pixmap(affine_pixmap(pm, matrix, shift, center), *second)
        np.testing.assert_array_equal(r.pixmap(1, k), both)


def test_pixel_maps_beyond_the_memory_budget_are_not_kept(exposures):
    """Without the cache every read evaluates the map; the products are the same."""
    from subpixal_jax.io.wcs import correct_wcs

    cached = DrizzleResample(exposures, sky=None)
    bare = DrizzleResample(
        exposures, output_wcs=cached.output_wcs, sky=None, max_cached_pixmap_bytes=0
    )
    assert all(not maps for maps in bare._pixmaps)
    np.testing.assert_array_equal(bare.sci, cached.sci)
    matrix, shift = _rotation(0.03, 1 - 2e-4), np.array([0.4, -0.3])
    center = cached.output_wcs.wcs.crpix - 1.0
    new = {
        c.extver: correct_wcs(c.wcs, cached.output_wcs, matrix, shift, center=center)
        for c in cached.exposures[1].chips
    }
    for r in (cached, bare):
        r.update_wcs(1, new, affine=(matrix, shift, center))
    # the cached maps are moved by the correction, the others evaluated from
    # the new WCS, which matches it to < 1e-6 px
    for c in bare.exposures[1].chips:
        np.testing.assert_allclose(
            bare.pixmap(1, c.extver), cached.pixmap(1, c.extver), atol=1e-6
        )
    scale = np.abs(cached.sci).max()
    np.testing.assert_allclose(bare.sci, cached.sci, rtol=1e-5, atol=1e-6 * scale)
    assert all(not maps for maps in bare._pixmaps)
    assert bare.n_drizzles == cached.n_drizzles
    with pytest.raises(ValueError, match="max_cached_pixmap_bytes"):
        DrizzleResample(exposures, max_cached_pixmap_bytes=-1)


def test_pure_pieces_rebuild_the_facade(scene):
    """Grid, per-exposure drizzle, stack and CR masks reproduce the facade."""
    crs = [(10, 15, 5e4), (30, 60, 2e4)]
    exps = [
        read_exposure(
            _exposure((dx, dy, r), scene=scene, seed=i, crs=crs if i == 1 else ())
        )
        for i, (dx, dy, r) in enumerate(DITHERS)
    ]
    facade = DrizzleResample(exps, cr_reject=True)
    wcs, shape = build_output_grid(exps)
    assert shape == facade.output_shape
    assert wcs.to_header_string() == facade.output_wcs.to_header_string()
    sky = exposure_skies(exps)
    assert sky == facade.sky
    stack = LeaveOneOutStack(len(exps), shape)
    singles = []
    for i, e in enumerate(exps):
        single = drizzle_exposure(
            e, sky[i], lambda c: chip_pixmap(c.wcs, wcs, c.shape), shape
        )
        stack.set(i, *single)
        singles.append(single)
    median, covered = median_combine(singles, shape)
    before = [c.valid.copy() for c in exps[1].chips]
    masks = cosmic_ray_masks(
        exps[1], sky[1], median, covered, lambda c: chip_pixmap(c.wcs, wcs, c.shape)
    )
    for b, c, bad, own in zip(
        before, exps[1].chips, masks, facade.exposures[1].chips, strict=True
    ):
        np.testing.assert_array_equal(c.valid, b)  # returned, not written
        np.testing.assert_array_equal(own.valid, b & ~bad)
    for y, x, _ in crs:
        assert masks[0][y - 1 : y + 2, x - 1 : x + 2].all()
    # Exposures 0, 2 and 3 have no cosmic ray: their drizzles (and the
    # combination without exposure 1) are the facade's, bit for bit.
    np.testing.assert_array_equal(stack.contribution(0)[0], facade.contribution(0)[0])
    sci, wht = stack.leave_out([1])
    ref_sci, ref_wht = facade.leave_out([1])
    np.testing.assert_array_equal(wht, ref_wht)
    np.testing.assert_array_equal(sci, ref_sci)
    with pytest.raises(ValueError, match="pixfrac"):
        DrizzleConfig(pixfrac=1.5)
    with pytest.raises(ValueError, match="read_noise"):
        DrizzleConfig(read_noise=-1.0)


def test_protocol_lists_what_the_loop_calls():
    """Every ``resample.<name>`` the loop uses is in `Resample`, nothing more."""
    root = Path(subpixal_jax.__file__).parent
    sources = [*sorted((root / "pipeline").glob("*.py")), root / "align.py"]
    used = set()
    for path in sources:
        text = path.read_text()
        used |= set(re.findall(r"(?<![.\w])resample\.([a-z_]\w*)", text))
        assert not re.search(r"(hasattr|getattr)\(\s*resample\b", text), path
    members = {
        name
        for name in dir(Resample)
        if not name.startswith("_") and name not in dir(Protocol)
    } | set(Resample.__annotations__)
    assert used == members


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("reject_high", [False, True])
def test_median_combine_equals_a_masked_median(n, reject_high):
    """The sorting network gives numpy's median of the covering values.

    Weights of 0 and non-finite values do not cover; ties of values (the
    rounded data) and both sides of the network's size limit are covered.
    """
    rng = np.random.default_rng(n)
    shape = (70, 45)
    singles = []
    for _ in range(n):
        img = rng.normal(size=shape).astype(np.float32).round(1)
        img[rng.random(shape) < 0.02] = np.nan
        wht = (rng.random(shape) > 0.25).astype(np.float32)
        singles.append((img, wht))
    median, covered = median_combine(singles, shape, reject_high=reject_high)

    values = np.stack([np.where(w > 0, d, np.nan) for d, w in singles])
    count = np.isfinite(values).sum(axis=0)
    if reject_high:  # drop the highest where 4 or more cover
        top = np.nanargmax(np.where(np.isfinite(values), values, -np.inf), axis=0)
        high = np.zeros(values.shape, bool)
        np.put_along_axis(high, top[None], True, axis=0)
        values[high & (count >= 4)[None]] = np.nan
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.where(count >= 3, np.nanmedian(values, axis=0), 0)
    np.testing.assert_array_equal(covered, count >= 3)
    np.testing.assert_array_equal(median, expected.astype(np.float32))
    assert covered.any() == (n >= 3)


def test_early_kernel_until_use_final_kernel(exposures):
    """Early drizzles use ``early_kernel``; the switch re-drizzles all, once."""
    r = DrizzleResample(exposures, early_kernel="turbo")
    turbo = DrizzleResample(exposures, kernel="turbo")
    square = DrizzleResample(exposures)
    assert r.kernel == "turbo"
    for i in range(len(exposures)):
        np.testing.assert_array_equal(r.contribution(i)[0], turbo.contribution(i)[0])
    assert not np.array_equal(r.contribution(1)[0], square.contribution(1)[0])
    n0 = r.n_drizzles
    assert r.use_final_kernel()
    assert r.kernel == "square"
    assert r.n_drizzles == n0  # drizzled on the next read
    sci, wht = r.sci, r.wht
    assert r.n_drizzles == n0 + 2 * len(exposures)
    np.testing.assert_array_equal(sci, square.sci)
    np.testing.assert_array_equal(wht, square.wht)
    assert not r.use_final_kernel()  # nothing to do
    assert r.sci.shape == r.output_shape
    assert r.n_drizzles == n0 + 2 * len(exposures)
    assert not square.use_final_kernel()  # no early kernel: nothing to do either
    with pytest.raises(ValueError, match="early_kernel"):
        DrizzleResample(exposures, early_kernel="box")

"""Tests of the batched interlaced cross-correlation (docs/original.md §4, §11)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import fftconvolve
from test_peak import numpy_find_peak

from subpixal_jax.core import xcorr
from subpixal_jax.core.peak import PeakFlag
from subpixal_jax.core.xcorr import (
    cross_correlate,
    find_displacement,
    find_displacement_full,
    find_displacements,
    interlace,
)
from subpixal_jax.testing.accuracy import model_image, texture_references

ORACLE = Path(__file__).parent / "data" / "original_native_ncc.npz"
N, H, W = 8, 24, 24  # the one bucket shape shared by most tests
SHIFTS = ((0, 0), (1, 0), (0, 1), (1, 1))


# --- independent numpy/scipy re-creation of docs/original.md §4 -------------


def numpy_maps(img, blots, cc_type):
    blots = [np.asarray(b, np.float64) for b in blots]
    ref = np.asarray(img, np.float64)
    if cc_type in ("NCC", "ZNCC"):
        nonzero = [b != 0 for b in blots]
        pool = np.concatenate([b[m] for b, m in zip(blots, nonzero, strict=True)])
        mu = pool.mean() if cc_type == "ZNCC" else 0.0
        sd = pool.std()
        blots = [
            np.where(m, (b - mu) / sd, 0) for b, m in zip(blots, nonzero, strict=True)
        ]
        union = np.logical_or.reduce(nonzero)
        if cc_type == "ZNCC":
            ref = ref - ref[union].mean()
        ref = ref / ref[union].std()
    return [np.flip(fftconvolve(ref, np.flip(b), mode="same")) for b in blots]


def numpy_interlace(k00, k10, k01, k11):
    out = np.zeros((2 * k00.shape[0], 2 * k00.shape[1]))
    out[0::2, 0::2], out[0::2, 1::2] = k00, k10
    out[1::2, 0::2], out[1::2, 1::2] = k01, k11
    return out


def numpy_find_displacement(img, blots, cc_type="NCC"):
    icc = numpy_interlace(*numpy_maps(img, blots, cc_type))
    xm, ym = numpy_find_peak(icc)
    ny, nx = img.shape
    return 0.5 * xm - (2 * nx - 1) // 4, 0.5 * ym - (2 * ny - 1) // 4


# --- synthetic sources -------------------------------------------------------


def gauss(shape, x0, y0, sigma=1.3):
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))


def source_case(shape, pos_img, pos_blot, rng=None, noise=0.0, flux=100.0):
    """Exposure with the source at pos_img; four blots with it at pos_blot."""
    img = flux * gauss(shape, *pos_img)
    blots = np.stack(
        [
            flux * gauss(shape, pos_blot[0] - a / 2, pos_blot[1] - b / 2)
            for a, b in SHIFTS
        ]
    )
    if noise:
        img = img + rng.normal(0, noise, shape)
    return img, blots


def pad_batch(cases, h=H, w=W):
    refs = np.zeros((len(cases), h, w))
    blots = np.zeros((len(cases), 4, h, w))
    shapes = np.zeros((len(cases), 2), np.int32)
    for k, (img, bl) in enumerate(cases):
        ny, nx = img.shape
        refs[k, :ny, :nx] = img
        blots[k, :, :ny, :nx] = bl
        shapes[k] = ny, nx
    return refs, blots, shapes


@pytest.fixture(scope="module")
def mixed_batch():
    """Random-noise and source-like cutouts of odd and even sizes, padded."""
    rng = np.random.default_rng(7)
    sizes = [
        (17, 17),
        (18, 16),
        (21, 20),
        (16, 19),
        (24, 24),
        (19, 22),
        (20, 17),
        (23, 18),
    ]
    cases = []
    for k, (ny, nx) in enumerate(sizes):
        if k % 2:
            img = rng.normal(size=(ny, nx))
            bl = rng.normal(size=(4, ny, nx))
        else:
            c = np.array([(nx - 1) / 2, (ny - 1) / 2])
            pos = c + rng.uniform(-2, 2, 2)
            img, bl = source_case(
                (ny, nx), pos, pos + rng.uniform(-1.5, 1.5, 2), rng, 1.0
            )
            bl[:, :2] = 0.0  # some exactly-zero blot pixels, as after segment masking
        cases.append((img, bl))
    return cases


@pytest.mark.parametrize("cc_type", ["CC", "NCC", "ZNCC"])
def test_exact_original_matches_numpy_float64(mixed_batch, cc_type):
    refs, blots, shapes = pad_batch(mixed_batch)
    with jax.enable_x64(True):
        out = find_displacements(
            refs, blots, shapes=shapes, cc_type=cc_type, exact_original=True
        )
        assert out.dxdy.dtype == jnp.float64
        got = np.asarray(out.dxdy)
    expected = np.array(
        [numpy_find_displacement(i, b, cc_type) for i, b in mixed_batch]
    )
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_oracle_original_outputs():
    d = np.load(ORACLE)
    blots = np.stack([d["b00"], d["b10"], d["b01"], d["b11"]], axis=1)
    out = find_displacements(
        d["img"], blots, shapes=d["shape"], cc_type="NCC", exact_original=True
    )
    assert out.dxdy.dtype == jnp.float32
    np.testing.assert_allclose(out.dxdy, d["dxdy"], atol=2e-5, rtol=0)
    assert np.all(np.asarray(out.flags) == 0)

    full = jax.vmap(
        lambda r, b, s: find_displacement_full(
            r, b[0], b[1], b[2], b[3], shape=s, exact_original=True
        )
    )(d["img"], blots, d["shape"])
    hp, wp = d["img"].shape[1:]
    for k, (ny, nx) in enumerate(d["shape"]):
        oy = 2 * ((hp - 1) // 2 - (ny - 1) // 2)
        ox = 2 * ((wp - 1) // 2 - (nx - 1) // 2)
        mine = np.asarray(full.icc[k, oy : oy + 2 * ny, ox : ox + 2 * nx])
        theirs = d["icc"][k, : 2 * ny, : 2 * nx]
        np.testing.assert_allclose(
            mine, theirs, rtol=0, atol=2e-4 * np.abs(theirs).max()
        )


def test_cross_correlate_and_interlace_match_scipy():
    # regression: an FFT length of n + (n - 1) // 2 wraps the last lag for even n
    rng = np.random.default_rng(11)
    ref = rng.normal(size=(3, 17, 22))
    img = rng.normal(size=(3, 17, 22))
    with jax.enable_x64(True):
        for cc_type in ("CC", "ZNCC"):
            got = cross_correlate(ref, img, cc_type=cc_type)
            for k in range(3):
                expected = numpy_maps(ref[k], [img[k]], cc_type)[0]
                np.testing.assert_allclose(got[k], expected, atol=1e-10)
        maps = [rng.normal(size=(5, 6)) for _ in range(4)]
        np.testing.assert_array_equal(interlace(*maps), numpy_interlace(*maps))


@pytest.fixture(scope="module")
def source_batch():
    rng = np.random.default_rng(5)
    cases = []
    for _ in range(N):
        pos = np.array([11.5, 11.5]) + rng.uniform(-2, 2, 2)
        shift = rng.uniform(-1.5, 1.5, 2)
        cases.append(source_case((H, W), pos + shift, pos, rng, noise=0.5))
    refs, blots, _ = pad_batch(cases)
    return refs.astype(np.float32), blots.astype(np.float32)


def test_self_displacement_is_zero(source_batch):
    _, blots = source_batch
    out = find_displacements(blots[:, 0], blots)
    assert np.all(np.asarray(out.flags) == 0)
    np.testing.assert_allclose(out.dxdy, 0.0, atol=5e-3)


@settings(max_examples=6)
@given(
    st.tuples(st.floats(9, 14), st.floats(9, 14)),
    st.tuples(st.floats(-1.5, 1.5), st.floats(-1.5, 1.5)),
)
def test_swapping_roles_flips_sign(pos, shift):
    a = np.array(pos)
    b = a + np.array(shift)
    img_a, blots_a = source_case((H, W), a, a)
    img_b, blots_b = source_case((H, W), b, b)
    dab = find_displacement(img_a, *blots_b)
    dba = find_displacement(img_b, *blots_a)
    np.testing.assert_allclose(dab, b - a, atol=0.01)
    np.testing.assert_allclose(np.add(dab, dba), 0.0, atol=0.01)


def test_order_independence(source_batch):
    refs, blots = source_batch
    perm = np.random.default_rng(0).permutation(N)
    a = find_displacements(refs, blots)
    b = find_displacements(refs[perm], blots[perm])
    for fa, fb in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(fa)[perm], fb)


def test_padding_does_not_change_results(source_batch):
    refs, blots = source_batch
    core = (slice(None), slice(3, 20), slice(2, 20))  # odd x even true shape
    small_r = refs[core]
    small_b = blots[:, :, 3:20, 2:20]
    direct = find_displacements(small_r, small_b)  # its own (17, 18) shape
    padded_r, padded_b, shapes = pad_batch(list(zip(small_r, small_b, strict=True)))
    padded = find_displacements(
        padded_r.astype(np.float32), padded_b.astype(np.float32), shapes=shapes
    )
    np.testing.assert_array_equal(padded.flags, direct.flags)
    np.testing.assert_allclose(padded.dxdy, direct.dxdy, atol=2e-4)
    # Garbage in the padding is ignored when masks say so.
    noisy_r = padded_r + 50.0 * (padded_r == 0)
    masked = find_displacements(
        noisy_r.astype(np.float32),
        padded_b.astype(np.float32),
        masks=padded_r != 0,
        shapes=shapes,
    )
    np.testing.assert_allclose(masked.dxdy, padded.dxdy, atol=1e-5)


def test_jit_equals_eager_and_vmap_equals_loop(source_batch):
    refs, blots = source_batch
    batch = find_displacements(refs, blots)
    with jax.disable_jit():
        eager = find_displacements(refs[:1], blots[:1])
    np.testing.assert_allclose(eager.dxdy, batch.dxdy[:1], atol=1e-5)
    loop = np.array([find_displacement(refs[k], *blots[k]) for k in range(N)])
    # Newton on the Lagrange polynomial turns float32 rounding into ~2e-6 px.
    np.testing.assert_allclose(loop, batch.dxdy, atol=5e-6)
    vmapped = jax.vmap(find_displacement)(refs, *np.moveaxis(blots, 1, 0))
    np.testing.assert_allclose(np.stack(vmapped, axis=1), loop, atol=5e-6)


def test_no_recompilation_for_same_bucket(source_batch):
    refs, blots = source_batch
    find_displacements(refs, blots)
    before = xcorr._find_displacements._cache_size()
    out = find_displacements(refs[::-1] * 2.0, blots[::-1], masks=refs != 0)
    assert xcorr._find_displacements._cache_size() == before
    assert out.dxdy.shape == (N, 2)


def test_chunked_path_equals_single_chunk(source_batch):
    refs, blots = source_batch
    reps = 70 // N + 1
    big_r = np.concatenate([refs] * reps)[:70]
    big_b = np.concatenate([blots] * reps)[:70]
    big = find_displacements(big_r, big_b)
    small = find_displacements(refs, blots)
    np.testing.assert_allclose(
        np.asarray(big.dxdy).reshape(-1, 2)[: 8 * (70 // 8)],
        np.tile(np.asarray(small.dxdy), (70 // 8, 1)),
        atol=1e-6,
    )


def test_search_radius(source_batch):
    refs, blots = source_batch
    full = find_displacements(refs, blots)
    near = find_displacements(refs, blots, search_radius=0.75)
    size = np.abs(np.asarray(full.dxdy)).max(axis=1)
    small, large = size < 0.5, size > 1.0
    assert small.any()
    assert large.any()
    # Inside the radius nothing changes (the fit box may cross the radius).
    np.testing.assert_allclose(
        np.asarray(near.dxdy)[small], np.asarray(full.dxdy)[small], atol=1e-6
    )
    assert np.all(np.asarray(near.flags)[large] & PeakFlag.EDGE)


def test_bad_sources_are_flagged_and_isolated(source_batch):
    refs, blots = source_batch
    masks = np.ones(refs.shape, bool)
    blot_masks = np.ones(blots.shape, bool)
    bad_r, bad_b = refs.copy(), blots.copy()
    masks[1] = False  # all masked
    bad_r[3] = 0.0
    bad_b[3] = 0.0  # all zero
    bad_r[5, 4, 4] = np.nan  # NaN in a valid pixel
    bad_b[6, 2, 5, 5] = np.inf
    good = find_displacements(refs, blots)
    for cc_type in ("NCC",):
        out = find_displacements(
            bad_r, bad_b, masks, blot_masks=blot_masks, cc_type=cc_type
        )
        flags = np.asarray(out.flags)
        assert flags[1] & PeakFlag.INVALID_INPUT
        assert flags[3] & PeakFlag.INVALID_INPUT
        assert flags[5] & PeakFlag.NONFINITE
        assert flags[6] & PeakFlag.NONFINITE
        bad = [1, 3, 5, 6]
        assert np.all(np.isnan(np.asarray(out.dxdy)[bad]))
        ok = [0, 2, 4, 7]
        assert np.all(flags[ok] == 0)
        np.testing.assert_array_equal(
            np.asarray(out.dxdy)[ok], np.asarray(good.dxdy)[ok]
        )
    # A NaN pixel that is masked out is simply ignored.
    masks[1] = True
    masks[5, 4, 4] = False
    out = find_displacements(bad_r, blots, masks)
    assert int(out.flags[5]) == 0


def test_sigma_and_quality_are_sensible(source_batch):
    refs, blots = source_batch
    out = find_displacements(refs, blots)
    sigma = np.asarray(out.sigma)
    assert np.all(np.isfinite(sigma))
    assert np.all((sigma > 0) & (sigma < 0.1))
    q = np.asarray(out.quality)
    assert np.all((q > 0.9) & (q <= 1.0 + 1e-6))


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((np.zeros((2, 8)), np.zeros((2, 4, 8, 8))), {}, "refs"),
        ((np.zeros((2, 8, 8)), np.zeros((2, 3, 8, 8))), {}, "blots"),
        (
            (np.zeros((2, 8, 8)), np.zeros((2, 4, 8, 8)), np.ones((2, 8, 7))),
            {},
            "masks",
        ),
        (
            (np.zeros((2, 8, 8)), np.zeros((2, 4, 8, 8))),
            {"blot_masks": np.ones((2, 8, 8))},
            "blot_masks",
        ),
        (
            (np.zeros((2, 8, 8)), np.zeros((2, 4, 8, 8))),
            {"shapes": np.ones((2,))},
            "shapes",
        ),
        ((np.zeros((2, 8, 8)), np.zeros((2, 4, 8, 8))), {"cc_type": "PCC"}, "cc_type"),
        ((np.zeros((2, 8, 8)), np.zeros((2, 4, 8, 8))), {"fit_box": 6}, "fit_box"),
        (
            (np.zeros((2, 8, 8)), np.zeros((2, 4, 8, 8))),
            {"search_radius": 0},
            "search_radius",
        ),
    ],
)
def test_bad_arguments_raise(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        find_displacements(*args, **kwargs)


def test_single_source_bad_arguments():
    z = np.zeros((6, 6))
    with pytest.raises(ValueError, match="im10"):
        find_displacement(z, z, np.zeros((6, 5)), z, z)
    with pytest.raises(ValueError, match="cc_type"):
        find_displacement(z, z, z, z, z, cc_type="xx")
    with pytest.raises(ValueError, match="image"):
        cross_correlate(z, np.zeros((5, 6)))
    with pytest.raises(ValueError, match="k11"):
        interlace(z, z, z, np.zeros((6, 5)))


# --- zero-lag symmetry (issue #17) -------------------------------------------


def _gaussian_blots(pedestal, sigma=1.5, centre=(11.0, 11.0)):
    """Pixel-integrated Gaussian and its half-pixel blots on a pedestal."""
    params = {"kind": "gaussian", "sigma": sigma, "x0": centre[0], "y0": centre[1]}
    blots = np.stack([model_image(params, H, (a / 2, b / 2)) for a, b in SHIFTS])
    return blots + pedestal * blots[0].max()


@pytest.mark.parametrize("cc_type", ["CC", "NCC", "ZNCC"])
def test_image_equal_to_reference_gives_zero_on_a_pedestal(cc_type):
    # The original's interlaced map is asymmetric by one overlapping row and
    # column between lags +1/2 and -1/2: 0.027 / 0.113 px (CC, NCC) on
    # pedestals of 10% / 100% of the peak, 0.0019 px for ZNCC without one.
    cases = [(p, s, (11.0, 11.0)) for p in (0.0, 0.1, 1.0) for s in (1.0, 1.5)]
    cases += [(0.1, 1.2, (10.3, 12.6)), (1.0, 1.2, (12.4, 9.8))]
    blots = np.stack([_gaussian_blots(*c) for c in cases]).astype(np.float32)
    out = find_displacements(blots[:, 0], blots, cc_type=cc_type)
    assert np.all(np.asarray(out.flags) == 0)
    np.testing.assert_allclose(out.dxdy, 0.0, atol=1e-4)
    if cc_type != "CC":
        per_lag = find_displacements(
            blots[:, 0], blots, cc_type=cc_type, overlap_normalise=True
        )
        np.testing.assert_allclose(per_lag.dxdy, 0.0, atol=1e-4)
    if cc_type == "NCC":  # the original's bias is still there on request
        old = find_displacements(blots[:, 0], blots, exact_original=True)
        assert np.asarray(old.dxdy)[2:].min() > 0.01


@pytest.mark.slow
def test_image_equal_to_reference_gives_zero_on_a_texture():
    # Signal up to the edges of a 512x512 cutout: the original's ZNCC gives
    # 0.006-0.012 px; the overlap-normalised map is symmetric.
    blots = texture_references(512, seed=3).astype(np.float32)[None]
    out = find_displacements(blots[:, 0], blots, cc_type="ZNCC", overlap_normalise=True)
    assert int(out.flags[0]) == 0
    np.testing.assert_allclose(out.dxdy, 0.0, atol=1e-4)
    # Normalised once over the arrays the edges still pull the correlation
    # peak (3.5e-3 px with peak_fit='lagrange', 9.9e-3 px for the original);
    # the template fit, over one set of pixels at every lag, does not.
    plain = find_displacements(blots[:, 0], blots, cc_type="ZNCC")
    np.testing.assert_allclose(plain.dxdy, 0.0, atol=1e-4)


def test_peak_at_the_lag_window_edge_is_flagged():
    # A 24-px cutout measures lags -11 .. 12 px. Peaks that leave the fit box
    # no room inside that window, or lie beyond it, carry LAG_WINDOW.
    shifts = [(0, 0), (5, -3), (8, 0), (0, -7.5), (12.0, 0), (0, -10.8), (12.6, 0)]
    shifts += [(13.5, 0)]
    rng = np.random.default_rng(4)
    cases = [
        source_case((H, W), (11.0 - sx, 11.0 - sy), (11.0, 11.0), rng, noise=0.5)
        for sx, sy in shifts
    ]
    refs, blots, _ = pad_batch(cases)
    refs, blots = refs.astype(np.float32), blots.astype(np.float32)
    out = find_displacements(refs, blots, overlap_normalise=True)
    flags = np.asarray(out.flags)
    lag = (flags & PeakFlag.LAG_WINDOW) != 0
    np.testing.assert_array_equal(lag, [False] * 4 + [True] * 4)
    assert np.all(flags[:4] == 0)
    np.testing.assert_allclose(np.asarray(out.dxdy)[:4], shifts[:4], atol=0.02)
    assert flags[-1] & PeakFlag.EDGE
    # Normalised once over the arrays, the shrinking overlap pulls far peaks
    # inwards, so only the peak nearest the border is caught there.
    plain = np.asarray(find_displacements(refs, blots).flags)
    assert np.all(plain[:4] == 0)
    assert plain[5] & PeakFlag.LAG_WINDOW


def test_half_precision_input_is_upcast(source_batch):
    # float16 / bfloat16 cutouts used to crash inside the rFFT.
    refs, blots = source_batch
    expected = find_displacements(refs.astype(np.float16), blots.astype(np.float16))
    for dtype in (np.float16, jnp.bfloat16):
        out = find_displacements(refs.astype(dtype), blots.astype(dtype))
        assert out.dxdy.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(out.flags), 0)
        np.testing.assert_allclose(out.dxdy, expected.dxdy, atol=0.01)
    single = find_displacement(refs[0].astype(np.float16), *blots[0].astype(np.float16))
    np.testing.assert_allclose(single, expected.dxdy[0], atol=1e-5)


#: Largest error (px) with bad pixels by the core: measured 9e-5 (template,
#: whose fit leaves the bad pixels out), 0.003 (Lagrange) and 0.019 / 0.114
#: (quadratic, column / core row); 0.36-0.41 px without the per-lag
#: blot-energy factor. The 5x5 quadratic follows the map's shape over +-1
#: px, which the factor corrects only near its maximum.
BAD_PIXEL_ERROR = {"template": 3e-4, "lagrange": 0.01, "quadratic": 0.13}


@pytest.mark.parametrize("peak_fit", ["template", "lagrange", "quadratic"])
def test_bad_pixels_through_the_core_do_not_pull_the_peak(peak_fit):
    # A star with a bad column next to its core, or three bad pixels in its
    # core row (zeroed and masked). A cutout without bad pixels gets a
    # factor of exactly 1 (equal up to the rounding of another batch).
    shift = np.array([0.3, -0.2])
    blots = _gaussian_blots(0.0, sigma=1.2).astype(np.float32)
    params = {"kind": "gaussian", "sigma": 1.2, "x0": 11.0, "y0": 11.0}
    moved = {**params, "x0": 11.0 + shift[0], "y0": 11.0 + shift[1]}
    image = model_image(moved, H).astype(np.float32)
    masks = np.ones((3, H, H), bool)
    masks[1, :, 10] = False
    masks[2, 11, 9:12] = False
    images = np.where(masks, image[None], 0.0)
    out = find_displacements(
        images, np.broadcast_to(blots, (3, *blots.shape)), masks, peak_fit=peak_fit
    )
    assert np.all(np.asarray(out.flags) == 0)
    error = np.abs(np.asarray(out.dxdy) + shift)
    assert error[1:].max() <= BAD_PIXEL_ERROR[peak_fit]
    plain = find_displacements(images[:1], blots[None], peak_fit=peak_fit)
    np.testing.assert_allclose(out.dxdy[0], plain.dxdy[0], atol=1e-5)


def test_chunked_batch_equals_its_parts(source_batch):
    # More sources than one chunk: lax.map over CHUNK-source steps plus the
    # remainder must give what vmapped calls on the parts give (to float32
    # rounding: XLA vectorises a batch of 3 and one of 64 differently).
    refs, blots = source_batch
    reps = -(-(xcorr.CHUNK + 3) // len(refs))
    refs, blots = (
        np.tile(refs, (reps, 1, 1))[: xcorr.CHUNK + 3],
        np.tile(blots, (reps, 1, 1, 1))[: xcorr.CHUNK + 3],
    )
    whole = find_displacements(refs, blots)
    head = find_displacements(refs[: xcorr.CHUNK], blots[: xcorr.CHUNK])
    tail = find_displacements(refs[xcorr.CHUNK :], blots[xcorr.CHUNK :])
    for fw, fh, ft in zip(whole, head, tail, strict=True):
        np.testing.assert_allclose(
            np.asarray(fw), np.concatenate([fh, ft]), rtol=0, atol=1e-6
        )


@pytest.mark.slow  # one more compilation (~45 s on a loaded 2-core machine)
def test_template_fit_is_the_same_under_x64(source_batch):
    # The pipeline runs with 64-bit integers enabled: the template fit's
    # index arithmetic must trace there too, float32 pixels giving float32
    # results.
    refs, blots = source_batch
    expected = find_displacements(refs, blots)
    with jax.enable_x64(True):
        out = find_displacements(refs, blots)
    assert out.dxdy.dtype == jnp.float32
    np.testing.assert_allclose(out.dxdy, expected.dxdy, rtol=0, atol=1e-6)

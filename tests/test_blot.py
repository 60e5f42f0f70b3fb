"""Tests for subpixal_jax.core.blot against drizzle.resample.blot_image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from drizzle.resample import blot_image

from subpixal_jax.core.blot import (
    affine_pixmap,
    blot,
    blot_affine,
    blot_scale,
    half_pixel_blots,
    half_pixel_blots_batch,
)

REF = 32  # reference (data) side
OUT = 20  # blot output side
EDGE = 3  # "outer 3 pixels" of the reference excluded from the 1e-5 comparison


def _smooth_image(seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:REF, 0:REF].astype(np.float64)
    out = np.zeros((REF, REF))
    for _ in range(6):
        kx, ky = rng.uniform(-0.5, 0.5, 2)
        out += rng.normal() * np.cos(kx * xx + ky * yy + rng.uniform(0, 6))
    return out.astype(np.float32)


def _source_image(seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:REF, 0:REF].astype(np.float64)
    out = np.zeros((REF, REF))
    for _ in range(3):
        cx, cy = rng.uniform(8, REF - 8, 2)
        s = rng.uniform(1.0, 2.0)
        out += rng.uniform(10, 100) * np.exp(
            -((xx - cx) ** 2 + (yy - cy) ** 2) / 2 / s**2
        )
    return out.astype(np.float32)


def _pixmap(kind, shape=(OUT, OUT), step=1.0):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64) * step
    u, v = xx - 9.5, yy - 9.5
    if kind == "identity":
        px, py = xx, yy
    elif kind == "shift":
        px, py = xx + 5.37, yy + 6.81
    elif kind == "rotated":
        t, s = 0.3, 1.1
        px = 16 + s * (np.cos(t) * u - np.sin(t) * v)
        py = 15.5 + s * (np.sin(t) * u + np.cos(t) * v)
    else:  # SIP-like: affine + quadratic/cubic distortion, over the whole array
        px = 15.7 + 1.3 * u + 0.05 * v + 4e-3 * u * v + 3e-3 * u**2 - 1e-4 * u**3
        py = 15.2 - 0.04 * u + 1.4 * v + 3e-3 * v**2 + 2e-3 * u * v + 1e-4 * v**3
    return np.stack([px, py], axis=-1)


PIXMAPS = ("identity", "shift", "rotated", "sip")


@pytest.fixture(scope="module")
def images():
    return {"smooth": _smooth_image(0), "source": _source_image(1)}


def _interior(pixmap):
    x, y = pixmap[..., 0], pixmap[..., 1]
    return (x >= EDGE) & (x < REF - EDGE) & (y >= EDGE) & (y < REF - EDGE)


@pytest.mark.parametrize("interp", ["nearest", "linear", "poly3", "poly5"])
def test_agrees_with_drizzle_blot_image(interp, images):
    for name, data in images.items():
        span = float(data.max() - data.min())
        for kind in PIXMAPS:
            pixmap = _pixmap(kind)
            expect = blot_image(data, pixmap, interp=interp, fillval=0.0, iscale=1.7)
            with jax.enable_x64(True):
                got = np.asarray(blot(data, pixmap, interp=interp, iscale=1.7))
            inner = _interior(pixmap)
            assert inner.sum() > 100
            err = np.abs(got - expect)[inner].max() / (1.7 * span)
            assert err <= 1e-5, (name, kind, err)
            # out-of-range pixels are filled identically
            outside = (pixmap[..., 0] >= REF) | (pixmap[..., 1] >= REF)
            outside |= (pixmap[..., 0] < 0) | (pixmap[..., 1] < 0)
            np.testing.assert_array_equal(got[outside], 0.0)
            np.testing.assert_array_equal(expect[outside], 0.0)


def test_edges_versus_drizzle(images):
    """Where (and only where) we differ from drizzle near the array edges."""
    data = images["smooth"]
    span = float(data.max() - data.min())
    # sample every in-range position on a 1/4-pixel grid, edges included
    g = np.arange(0, REF, 0.25)
    pixmap = np.stack(np.meshgrid(g, g), axis=-1)
    x, y = pixmap[..., 0], pixmap[..., 1]
    with jax.enable_x64(True):
        for interp in ("linear", "poly3", "poly5", "nearest"):
            expect = blot_image(data, pixmap, interp=interp, fillval=0.0)
            got = np.asarray(blot(data, pixmap, interp=interp))
            bad = np.abs(got - expect) > 1e-5 * span
            if interp == "linear":
                # edge repetition is drizzle's behaviour exactly
                assert not bad.any()
            elif interp == "poly3":
                # odd reflection matches on the left/right/bottom edges; drizzle's
                # top-edge quirk can show above the last row centre only. (Whether
                # it shows at all depends on what drizzle reads past the array
                # there, which differs between runs: assert only where.)
                assert (y[bad] > REF - 1).all()
            elif interp == "poly5":
                # the quirk reaches 3 rows down for the 6-tap kernel
                assert (y[bad] > REF - 3).all()
            else:
                # drizzle's nearest reads past the row (or array) end when
                # x + 0.5 >= W (y + 0.5 >= H); we clamp to the last column (row)
                over = (x >= REF - 0.5) | (y >= REF - 0.5)
                assert (bad <= over).all()
                cols = np.minimum((x[over] + 0.5).astype(int), REF - 1)
                rows = np.minimum((y[over] + 0.5).astype(int), REF - 1)
                np.testing.assert_array_equal(got[over], data[rows, cols])


@pytest.mark.parametrize("interp", ["lanczos3", "lanczos5"])
def test_lanczos_close_to_drizzle_lut(interp, images):
    # drizzle 3.0's Lanczos uses an approximate look-up table: agreement is
    # ~1e-3 of the range in the interior, not float32 precision.
    data = images["smooth"]
    span = float(data.max() - data.min())
    pixmap = _pixmap("rotated")
    order = int(interp[-1])
    x, y = pixmap[..., 0], pixmap[..., 1]
    inner = (x >= order) & (x < REF - order - 1) & (y >= order) & (y < REF - order - 1)
    expect = blot_image(data, pixmap, interp=interp, fillval=0.0)
    with jax.enable_x64(True):
        got = np.asarray(blot(data, pixmap, interp=interp))
    err = np.abs(got - expect)[inner].max() / span
    assert 1e-5 < err < 5e-3


def test_constant_blots_to_constant_times_iscale():
    data = np.full((REF, REF), 2.5, np.float32)
    with jax.enable_x64(True):
        got = np.asarray(blot(data, _pixmap("sip"), iscale=3.0))
    inside = got != 0
    assert inside.sum() > 200
    np.testing.assert_allclose(got[inside], 7.5, rtol=1e-6)


def test_half_pixel_blots_are_strided_blots(images):
    data = images["source"]
    pixmap = _pixmap("sip", shape=(2 * OUT + 1, 2 * OUT + 1), step=0.5)
    valid_in = np.ones((REF, REF), bool)
    valid_in[20, 17] = False
    with jax.enable_x64(True):
        blots, valid = half_pixel_blots(data, pixmap, data_valid=valid_in, iscale=2.0)
        assert blots.shape == (4, OUT, OUT)
        assert valid.shape == (4, OUT, OUT)
        assert blots.dtype == jnp.float32
        for b, (r0, c0) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            view = np.ascontiguousarray(
                pixmap[r0 : r0 + 2 * OUT : 2, c0 : c0 + 2 * OUT : 2]
            )
            one = blot(data, view, iscale=2.0, data_valid=valid_in)
            np.testing.assert_array_equal(blots[b], one)
            expect = blot_image(data, view, iscale=2.0, fillval=0.0)
            good = np.asarray(valid[b]) & _interior(view)
            err = np.abs(np.asarray(blots[b]) - expect)[good].max()
            assert err <= 1e-5 * 2.0 * float(data.max())
    # blot 10 of pixel (i, j) is at image position (i + 1/2, j): pixmap node (2j, 2i+1)
    assert (~np.asarray(valid)).any()


def test_half_pixel_identity_samples_half_pixels():
    data = np.broadcast_to(np.arange(REF, dtype=np.float32), (REF, REF)).copy()
    data = data + 100 * np.arange(REF, dtype=np.float32)[:, None]
    n = 5
    rr, cc = np.mgrid[0 : 2 * n + 1, 0 : 2 * n + 1] / 2.0
    pixmap = np.stack([cc + 10, rr + 10], axis=-1)
    blots, valid = half_pixel_blots(data, pixmap, out_shape=(n, n))
    assert bool(valid.all())
    j, i = 2, 3
    for b, (a, c) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        # blot ab of pixel (i, j) samples image position (i + a/2, j + c/2)
        assert float(blots[b, j, i]) == pytest.approx(
            10 + i + a / 2 + 100 * (10 + j + c / 2)
        )


def _loss_params(data, pixmap, center):
    def loss(params):
        matrix = jnp.eye(2) + params[:4].reshape(2, 2)
        return jnp.sum(blot_affine(data, pixmap, matrix, params[4:], center) ** 2)

    return loss


def test_gradient_wrt_shift_and_affine_matches_finite_differences(images):
    pixmap = _pixmap("rotated", shape=(8, 8))
    with jax.enable_x64(True):
        data = jnp.asarray(images["source"], jnp.float64)
        center = jnp.array([16.0, 15.5])
        loss = _loss_params(data, jnp.asarray(pixmap), center)
        params = jnp.array([1e-3, -2e-3, 1.5e-3, 5e-4, 0.123, -0.271])
        grad = np.asarray(jax.grad(loss)(params))
        eps = 1e-6
        fd = np.array(
            [
                (
                    float(loss(params.at[k].add(eps)))
                    - float(loss(params.at[k].add(-eps)))
                )
                / (2 * eps)
                for k in range(6)
            ]
        )
    np.testing.assert_allclose(grad, fd, rtol=1e-4)
    assert np.abs(grad).min() > 1e-3  # every parameter matters


def test_affine_pixmap_identity_and_formula():
    pixmap = jnp.asarray(_pixmap("shift", shape=(4, 4)), jnp.float32)
    same = affine_pixmap(pixmap, jnp.eye(2), jnp.zeros(2), jnp.array([3.0, 4.0]))
    np.testing.assert_array_equal(same, pixmap)
    m = jnp.array([[1.01, 0.02], [-0.02, 0.99]])
    out = affine_pixmap(pixmap, m, jnp.array([0.5, -0.25]), jnp.array([3.0, 4.0]))
    d = np.asarray(pixmap) - [3.0, 4.0]
    expect = np.einsum("ij,...j->...i", np.asarray(m), d) + np.array([3.5, 3.75])
    np.testing.assert_allclose(out, expect, rtol=1e-6)


def test_blot_scale():
    assert (
        blot_scale(image_units="counts", image_exptime=500.0, area_ratio=0.25) == 125.0
    )
    assert blot_scale(image_units="rate", image_exptime=500.0, area_ratio=0.25) == 0.25
    with pytest.raises(ValueError, match="image_units"):
        blot_scale(image_units="electrons", image_exptime=1.0, area_ratio=1.0)
    with pytest.raises(ValueError, match="image_exptime"):
        blot_scale(image_units="counts", image_exptime=0.0, area_ratio=1.0)
    with pytest.raises(ValueError, match="area_ratio"):
        blot_scale(image_units="rate", image_exptime=1.0, area_ratio=-1.0)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(3)
    count, n = 5, 8
    ref = rng.normal(size=(count, 16, 16)).astype(np.float32)
    ref_valid = rng.uniform(size=ref.shape) > 0.02
    rr, cc = np.mgrid[0 : 2 * n + 1, 0 : 2 * n + 1] / 2.0
    shifts = rng.uniform(2, 5, (count, 1, 1, 2))
    pixmap = np.stack([cc, rr], axis=-1)[None] * 1.05 + shifts
    iscale = rng.uniform(0.5, 2, count)
    return ref, ref_valid, pixmap, iscale


def test_batch_equals_loop_and_jit_equals_eager(batch):
    ref, ref_valid, pixmap, iscale = batch
    with jax.enable_x64(True):
        blots, valid = half_pixel_blots_batch(ref, ref_valid, pixmap, iscale)
        assert blots.shape == (5, 4, 8, 8)
        assert blots.dtype == jnp.float32
        assert valid.dtype == jnp.bool_
        for k in range(5):
            b, v = half_pixel_blots(
                ref[k], pixmap[k], data_valid=ref_valid[k], iscale=iscale[k]
            )
            np.testing.assert_allclose(blots[k], b, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(valid[k], v)
        # eager (op by op) == jitted; linear keeps the eager run short (poly5
        # jit == eager is covered in test_interp)
        args = (ref[:2], ref_valid[:2], pixmap[:2], iscale[:2])
        jitted = half_pixel_blots_batch(*args, interp="linear")
        with jax.disable_jit():
            eager = half_pixel_blots_batch(*args, interp="linear")
        np.testing.assert_allclose(eager[0], jitted[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(eager[1], jitted[1])


def test_batch_chunking_and_no_recompilation(batch, monkeypatch):
    import subpixal_jax.core.blot as blot_module

    ref, ref_valid, pixmap, iscale = batch
    with jax.enable_x64(True):
        full, full_valid = half_pixel_blots_batch(ref, ref_valid, pixmap, iscale)
        monkeypatch.setattr(blot_module, "BATCH_CHUNK", 2)  # 2 chunks and a remainder
        chunked, chunked_valid = half_pixel_blots_batch(ref, ref_valid, pixmap, iscale)
        np.testing.assert_array_equal(chunked, full)
        np.testing.assert_array_equal(chunked_valid, full_valid)
        before = blot_module._batch_jit._cache_size()
        half_pixel_blots_batch(ref + 1, ref_valid, pixmap + 0.1, iscale * 2)
        assert blot_module._batch_jit._cache_size() == before


def test_nan_data_and_coordinates(batch):
    ref, ref_valid, pixmap, iscale = batch
    ref = ref.copy()
    pixmap = pixmap.copy()
    ref[0, 8, 8] = np.nan
    pixmap[0, 4, 6] = np.nan  # blot 00 pixel (3, 2)
    pixmap[0, 5, 7, 0] = np.inf  # blot 11 pixel (3, 2)
    with jax.enable_x64(True):
        blots, valid = half_pixel_blots_batch(
            ref, np.ones_like(ref_valid), pixmap, iscale, fillval=-1.0
        )
    blots, valid = np.asarray(blots), np.asarray(valid)
    assert np.isfinite(blots).all()
    assert not valid[0, 0, 2, 3]
    assert not valid[0, 3, 2, 3]
    assert blots[0, 0, 2, 3] == -1.0
    assert blots[0, 3, 2, 3] == -1.0
    # NaN at ref (8, 8) only invalidates samples whose 6x6 footprint holds it
    x, y = pixmap[0, ..., 0], pixmap[0, ..., 1]
    fx, fy = np.floor(x), np.floor(y)
    near = (np.abs(fx - 7.5) <= 2.5) & (np.abs(fy - 7.5) <= 2.5)
    for b, (r0, c0) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        sl = (slice(r0, r0 + 16, 2), slice(c0, c0 + 16, 2))
        finite = np.isfinite(x[sl]) & np.isfinite(y[sl])
        np.testing.assert_array_equal(valid[0, b], finite & ~near[sl])
    assert valid[1:].all()


def test_bad_arguments(batch):
    ref, ref_valid, pixmap, iscale = batch
    data = ref[0]
    with pytest.raises(ValueError, match="interp"):
        blot(data, pixmap[0], interp="sinc")
    with pytest.raises(ValueError, match="pixmap"):
        blot(data, pixmap[0, ..., :1])
    with pytest.raises(ValueError, match="out_shape"):
        half_pixel_blots(data, pixmap[0], out_shape=(9, 8))
    with pytest.raises(ValueError, match="pixmap"):
        half_pixel_blots(data, pixmap[0, :-1])
    with pytest.raises(ValueError, match="iscale"):
        half_pixel_blots_batch(ref, ref_valid, pixmap, iscale[:3])
    with pytest.raises(ValueError, match="ref_valid"):
        half_pixel_blots_batch(ref, ref_valid[:, :3], pixmap, iscale)
    with pytest.raises(ValueError, match="matrix"):
        affine_pixmap(pixmap[0], jnp.eye(3), jnp.zeros(2), jnp.zeros(2))

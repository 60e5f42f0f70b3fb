"""Tests for subpixal_jax.core.interp: kernels, exactness, gradients, edges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subpixal_jax.core.interp import (
    KERNELS,
    interpolate,
    interpolate_with_validity,
    sample,
)

SIZE = 20  # every test uses (SIZE, SIZE) images and 64 sample points


def _poly_image(degree, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    u, v = (xx - 9.3) / 10, (yy - 10.1) / 10
    out = np.zeros_like(u)
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            out += rng.normal() * u**i * v**j
    return out.astype(dtype)


def _exact_poly(degree, x, y, seed=0):
    rng = np.random.default_rng(seed)
    u, v = (x - 9.3) / 10, (y - 10.1) / 10
    out = np.zeros_like(u)
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            out += rng.normal() * u**i * v**j
    return out


@pytest.fixture(scope="module")
def interior_points():
    rng = np.random.default_rng(5)
    # interior: every tap (-4..+5 for lanczos5) lies inside the array
    return rng.uniform(4.0, SIZE - 6.0, (2, 64))


@pytest.mark.parametrize(
    ("kind", "degree"), [("linear", 1), ("poly3", 3), ("poly5", 5), ("poly5", 3)]
)
def test_polynomials_are_exact_in_the_interior(kind, degree, interior_points):
    x, y = interior_points
    with jax.enable_x64(True):
        got = interpolate(_poly_image(degree), x, y, kind=kind)
    np.testing.assert_allclose(got, _exact_poly(degree, x, y), atol=1e-12)


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_constant_image(kind, interior_points):
    x, y = interior_points
    got = interpolate(jnp.full((SIZE, SIZE), 3.5, jnp.float32), x, y, kind=kind)
    # Lanczos weights are not renormalised: sum(w) ripples by < 1.5e-2 (lanczos3)
    tol = 2e-2 if kind.startswith("lanczos") else 1e-6
    np.testing.assert_allclose(got, 3.5, rtol=tol)


def test_polynomials_exact_up_to_the_edges_with_odd_reflection():
    # Odd reflection continues a linear function exactly: poly kernels reproduce
    # a plane everywhere in range, including within 3 px of every edge.
    rng = np.random.default_rng(1)
    x = rng.uniform(0, SIZE, 64)
    y = rng.uniform(0, SIZE, 64)
    with jax.enable_x64(True):
        for kind in ("poly3", "poly5", "lanczos3"):
            got = interpolate(_poly_image(1), x, y, kind=kind)
            tol = 1e-12 if kind.startswith("poly") else 2e-2
            np.testing.assert_allclose(got, _exact_poly(1, x, y), atol=tol)


@pytest.mark.parametrize("kind", ["lanczos3", "lanczos5"])
def test_lanczos_matches_the_exact_formula(kind, interior_points):
    order = int(kind[-1])
    x, y = interior_points
    rng = np.random.default_rng(2)
    data = rng.normal(size=(SIZE, SIZE))
    ix, iy = np.floor(x).astype(int), np.floor(y).astype(int)
    expect = np.zeros_like(x)
    for oy in range(-order + 1, order + 1):
        for ox in range(-order + 1, order + 1):
            dx, dy = x - (ix + ox), y - (iy + oy)
            w = np.sinc(dx) * np.sinc(dx / order) * np.sinc(dy) * np.sinc(dy / order)
            expect += w * data[iy + oy, ix + ox]
    with jax.enable_x64(True):
        got = interpolate(data, x, y, kind=kind)
    np.testing.assert_allclose(got, expect, atol=1e-12)


def test_strict_bounds_and_nonfinite_positions():
    data = jnp.ones((SIZE, SIZE), jnp.float32)
    x = jnp.array([0.0, -1e-6, SIZE - 1e-4, SIZE, 5.0, 5.0, jnp.nan, jnp.inf])
    y = jnp.array([0.0, 5.0, 5.0, 5.0, -0.01, SIZE - 1e-4, 5.0, 5.0])
    values, valid = interpolate_with_validity(data, x, y, kind="poly5", fillval=-9.0)
    assert valid.tolist() == [True, False, True, False, False, True, False, False]
    np.testing.assert_allclose(values, [1, -9, 1, -9, -9, 1, -9, -9], rtol=1e-6)


def test_nan_is_masked_within_the_footprint_only():
    data = np.ones((SIZE, SIZE), np.float32)
    data[10, 10] = np.nan
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    x, y = xx + 0.25, yy + 0.25
    for kind, lo, hi in (("poly5", -2, 3), ("linear", 0, 1), ("poly3", -1, 2)):
        values, valid = interpolate_with_validity(data, x, y, kind=kind)
        assert np.isfinite(np.asarray(values)).all()
        # sample (i, j) has footprint rows/cols floor + lo .. floor + hi
        bad = np.zeros((SIZE, SIZE), bool)
        bad[10 - hi : 10 - lo + 1, 10 - hi : 10 - lo + 1] = True
        in_range = (x < SIZE) & (y < SIZE)
        np.testing.assert_array_equal(np.asarray(valid), in_range & ~bad)
        np.testing.assert_allclose(np.asarray(values)[valid], 1.0, rtol=1e-6)


def test_data_valid_mask_and_zero_data_are_distinct():
    data = np.zeros((SIZE, SIZE), np.float32)  # zeros are legitimate data
    mask = np.ones((SIZE, SIZE), bool)
    mask[3, 4] = False
    values, valid = interpolate_with_validity(
        data, jnp.array([4.5, 12.5]), jnp.array([3.5, 12.5]), data_valid=mask
    )
    assert valid.tolist() == [False, True]
    assert values.tolist() == [0.0, 0.0]


def test_dtype_float32_data_float64_coordinates():
    data = jnp.asarray(_poly_image(3, dtype=np.float32))
    with jax.enable_x64(True):
        x = jnp.array([7.123456789012, 8.5], jnp.float64)
        y = jnp.array([9.25, 10.75], jnp.float64)
        got = interpolate(data, x, y)
        assert got.dtype == jnp.float32
        ref64 = interpolate(jnp.asarray(data, jnp.float64), x, y)
    np.testing.assert_allclose(got, ref64, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "poly5", "lanczos3"])
def test_coordinate_gradient_matches_finite_differences(kind, interior_points):
    x, y = interior_points[:, :8]
    rng = np.random.default_rng(3)
    data = rng.normal(size=(SIZE, SIZE))
    eps = 1e-6
    with jax.enable_x64(True):
        data_j = jnp.asarray(data)
        grad = jax.grad(
            lambda xx, yy: interpolate(data_j, xx, yy, kind=kind).sum(), (0, 1)
        )
        gx, gy = grad(jnp.asarray(x), jnp.asarray(y))

        def f(xx, yy):
            return np.asarray(interpolate(data_j, xx, yy, kind=kind))

        fdx = (f(x + eps, y) - f(x - eps, y)) / (2 * eps)
        fdy = (f(x, y + eps) - f(x, y - eps)) / (2 * eps)
    np.testing.assert_allclose(gx, fdx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gy, fdy, rtol=1e-5, atol=1e-6)


def test_data_gradient_is_the_weights_and_linear(interior_points):
    x, y = interior_points
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, SIZE, SIZE))
    with jax.enable_x64(True):
        fa = interpolate(a, x, y)
        fab = interpolate(a + 2 * b, x, y)
        fb = interpolate(b, x, y)
        np.testing.assert_allclose(fab, fa + 2 * fb, atol=1e-12)
        g = jax.grad(lambda d: interpolate(d, x, y).sum())(jnp.asarray(a))
        # the gradient of a sum of samples is the sum of the tap weights
        ones = interpolate(jnp.ones((SIZE, SIZE)), x, y)
        np.testing.assert_allclose(float(g.sum()), float(ones.sum()), rtol=1e-12)


@settings(max_examples=6)
@given(
    fx=st.floats(0.0, 0.999),
    fy=st.floats(0.0, 0.999),
    kind=st.sampled_from(["nearest", "linear", "poly3", "poly5"]),
)
def test_integer_offsets_reproduce_samples(fx, fy, kind):
    # Interpolating kernels return the pixel value at pixel centres, and the
    # interpolant at p + (1, 0) equals that of the image shifted by one column.
    rng = np.random.default_rng(6)
    data = rng.normal(size=(SIZE, SIZE)).astype(np.float32)
    at_centre = interpolate(data, jnp.array([7.0]), jnp.array([9.0]), kind=kind)
    assert float(at_centre[0]) == pytest.approx(float(data[9, 7]), abs=1e-6)
    shifted = np.roll(data, -1, axis=1)
    p = interpolate(data, jnp.array([8.0 + fx]), jnp.array([9.0 + fy]), kind=kind)
    q = interpolate(shifted, jnp.array([7.0 + fx]), jnp.array([9.0 + fy]), kind=kind)
    assert float(p[0]) == pytest.approx(float(q[0]), abs=1e-5)


def test_jit_equals_eager_and_vmap_equals_loop(interior_points):
    x, y = interior_points
    rng = np.random.default_rng(7)
    stack = rng.normal(size=(3, SIZE, SIZE)).astype(np.float32)
    jitted = interpolate(stack[0], x[:4], y[:4])
    with jax.disable_jit():
        eager = interpolate(stack[0], x[:4], y[:4])
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    batched = jax.vmap(lambda d: sample(d, xj, yj, None, "poly5")[0])(stack)
    for k in range(3):
        np.testing.assert_allclose(
            batched[k], interpolate(stack[k], xj, yj), rtol=1e-6, atol=1e-6
        )


def test_bad_arguments_raise_naming_the_parameter():
    data = jnp.zeros((SIZE, SIZE))
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="kind"):
        interpolate(data, x, x, kind="spline3")
    with pytest.raises(ValueError, match="data must be 2-D"):
        interpolate(jnp.zeros(5), x, x)
    with pytest.raises(ValueError, match="x and y"):
        interpolate(data, x, jnp.zeros(4))
    with pytest.raises(ValueError, match="data_valid"):
        interpolate_with_validity(data, x, x, data_valid=jnp.ones((3, 3), bool))

"""Tests of the quadratic peak fit (docs/original.md §5) and its flags."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subpixal_jax.core.peak import (
    PeakFlag,
    check_peak_fit,
    find_peak,
    lagrange_peak,
    lagrange_weights,
    quadratic_coefficients,
)

SHAPE = (12, 14)


def numpy_find_peak(image, w=5):
    """Independent re-creation of the original centroid.find_peak (original.md §5)."""
    image = np.asarray(image, dtype=np.float64)
    ny, nx = image.shape
    jmax, imax = np.unravel_index(np.argmax(image), image.shape)
    x1 = max(0, imax - w // 2)
    x2 = min(nx, x1 + w)
    y1 = max(0, jmax - w // 2)
    y2 = min(ny, y1 + w)
    if imax == x1 or jmax == y1:
        return float(imax), float(jmax)
    if x2 - x1 < w:
        if x1 == 0:
            x2 = min(nx, w)
        if x2 == nx:
            x1 = max(0, nx - w)
    if y2 - y1 < w:
        if y1 == 0:
            y2 = min(ny, w)
        if y2 == ny:
            y1 = max(0, ny - w)
    if (x2 - x1) * (y2 - y1) < 6:
        return float(imax), float(jmax)
    yy, xx = np.mgrid[y1:y2, x1:x2]
    x = xx.ravel().astype(float)
    y = yy.ravel().astype(float)
    a = np.stack([np.ones_like(x), x, y, x * y, x * x, y * y], axis=1)
    _c0, c10, c01, c11, c20, c02 = np.linalg.lstsq(
        a, image[y1:y2, x1:x2].ravel(), rcond=None
    )[0]
    d = 4 * c20 * c02 - c11**2
    if d <= 0 or (c20 > 0 and c02 >= 0) or (c20 >= 0 and c02 > 0):
        return (x1 + x2) / 2, (y1 + y2) / 2
    xm = (c01 * c11 - 2 * c02 * c10) / d
    ym = (c10 * c11 - 2 * c01 * c20) / d
    if 0 < xm < nx - 1 and 0 < ym < ny - 1:
        return xm, ym
    return float(imax), float(jmax)


def paraboloid(x0, y0, ax=1.0, ay=2.0, cxy=0.3):
    y, x = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    return -(ax * (x - x0) ** 2 + ay * (y - y0) ** 2 + cxy * (x - x0) * (y - y0))


def test_quadratic_coefficients_match_lstsq():
    rng = np.random.default_rng(3)
    vals = rng.normal(size=(5, 5))
    u = np.arange(-2, 3, dtype=float)
    vv, uu = np.meshgrid(u, u, indexing="ij")
    a = np.stack(
        [
            np.ones(25),
            uu.ravel(),
            vv.ravel(),
            (uu * vv).ravel(),
            (uu**2).ravel(),
            (vv**2).ravel(),
        ],
        axis=1,
    )
    expected = np.linalg.lstsq(a, vals.ravel(), rcond=None)[0]
    got = quadratic_coefficients(jnp.asarray(vals, jnp.float32))
    np.testing.assert_allclose(got, expected, atol=1e-5)


@settings(max_examples=10)
@given(st.floats(3.0, 10.0), st.floats(3.0, 8.0))
def test_exact_paraboloid_vertex(x0, y0):
    peak = find_peak(jnp.asarray(paraboloid(x0, y0), jnp.float32))
    assert int(peak.flags) == 0
    np.testing.assert_allclose(peak.xy, [x0, y0], atol=2e-4)
    np.testing.assert_allclose(peak.hessian, [[-2.0, -0.3], [-0.3, -4.0]], atol=1e-3)


def test_edge_peak_is_fitted_and_flagged():
    peak = find_peak(jnp.asarray(paraboloid(0.2, 5.0), jnp.float32))
    assert int(peak.flags) & PeakFlag.EDGE
    np.testing.assert_allclose(peak.xy, [0.2, 5.0], atol=2e-4)
    # The original returns the integer position for a peak in column 0.
    orig = find_peak(
        jnp.asarray(paraboloid(0.2, 5.0), jnp.float32), exact_original=True
    )
    np.testing.assert_allclose(orig.xy, [0.0, 5.0])


def test_no_maximum_returns_argmax_not_window_middle():
    # regression (docs/original.md §9 item 8): the original returned the box middle.
    saddle = paraboloid(6.0, 5.0, ax=1.0, ay=-1.0, cxy=0.0)
    peak = find_peak(
        jnp.asarray(saddle, jnp.float32),
        mask=jnp.asarray(np.abs(np.mgrid[0:12, 0:14][0] - 5) < 1),
    )
    assert int(peak.flags) & PeakFlag.NO_MAXIMUM
    np.testing.assert_allclose(peak.xy, [6.0, 5.0])
    orig = find_peak(
        jnp.asarray(saddle, jnp.float32),
        exact_original=True,
        mask=jnp.asarray(np.abs(np.mgrid[0:12, 0:14][0] - 5) < 1),
    )
    np.testing.assert_allclose(orig.xy, [6.5, 5.5])


def test_vertex_outside_box_is_rejected():
    # A nearly flat ridge: the fitted vertex lies far outside the 5x5 box.
    img = (
        paraboloid(6.0, 5.0, ax=1e-3, ay=1.0, cxy=0.0) + 0.05 * np.mgrid[0:12, 0:14][1]
    )
    peak = find_peak(jnp.asarray(img, jnp.float32))
    assert int(peak.flags) & PeakFlag.VERTEX_OUTSIDE
    assert float(peak.xy[0]) == 13.0


def test_nonfinite_flagged():
    img = paraboloid(6.0, 5.0)
    img[5, 7] = np.nan
    peak = find_peak(jnp.asarray(img, jnp.float32))
    assert int(peak.flags) & PeakFlag.NONFINITE
    assert np.all(np.isnan(peak.xy))


@settings(max_examples=15)
@given(st.integers(0, 2**31 - 1))
def test_exact_original_matches_numpy(seed):
    img = np.random.default_rng(seed).normal(size=SHAPE)
    with jax.enable_x64(True):
        got = find_peak(jnp.asarray(img), exact_original=True)
        np.testing.assert_allclose(got.xy, numpy_find_peak(img), atol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fit_box": 4}, "fit_box"),
        ({"fit_box": 1}, "fit_box"),
        ({"mask": np.ones((3, 3), bool)}, "mask"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        find_peak(jnp.zeros(SHAPE), **kwargs)
    with pytest.raises(ValueError, match="image"):
        find_peak(jnp.zeros(5))


def test_lagrange_weights_reproduce_polynomials():
    nodes = np.arange(-3.0, 4.0)
    for u in (-0.7, 0.0, 0.31):
        w, d = lagrange_weights(jnp.asarray(u), 7)
        for power in range(7):  # exact up to degree 6
            assert float(w @ nodes**power) == pytest.approx(u**power, abs=1e-5)
            slope = power * u ** (power - 1) if power else 0.0
            assert float(d @ nodes**power) == pytest.approx(slope, abs=1e-4)


@pytest.mark.parametrize("sigma", [2.83, 4.0])
def test_lagrange_peak_has_no_grid_locking(sigma):
    # A Gaussian peak of width sigma map pixels (2.83 = the correlation of a
    # sigma-1 px source on the half-pixel grid): the quadratic vertex locks
    # onto the grid by up to ~1e-2 map px, the interpolating polynomial's
    # maximum is within 2e-4.
    y, x = np.mgrid[-3:4, -3:4].astype(float)
    with jax.enable_x64(True):
        for x0 in np.linspace(-0.5, 0.5, 9):
            y0 = -0.4 * x0 + 0.1
            box = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))
            uv, height, hessian, ok = lagrange_peak(jnp.asarray(box), jnp.zeros(2))
            assert bool(ok)
            np.testing.assert_allclose(uv, [x0, y0], atol=2e-4)
            assert float(height) == pytest.approx(1.0, abs=1e-4)
            np.testing.assert_allclose(
                hessian, -np.eye(2) / sigma**2, atol=0.02 / sigma**2
            )
    quad = find_peak(np.exp(-((x - 0.25) ** 2 + y**2) / (2 * 2.83**2)))
    assert abs(float(quad.xy[0]) - 3.25) > 2e-3


def test_lagrange_peak_rejects_a_minimum():
    y, x = np.mgrid[-3:4, -3:4].astype(float)
    *_, ok = lagrange_peak(jnp.asarray((x - 0.2) ** 2 + y**2), jnp.zeros(2))
    assert not bool(ok)
    with pytest.raises(ValueError, match="peak_fit"):
        check_peak_fit("gauss")

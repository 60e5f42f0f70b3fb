"""Tests of the clipped, weighted linear fits (core/linfit.py, linearfit.py).

Compilations are the cost here, so almost every batched call uses one shape,
``(B, N) = (8, 64)``; nclip, sigma, its statistic, clip_accum and the
weighted flag are traced and never recompile.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tweakwcs import linearfit as twl

from subpixal_jax.core import linfit
from subpixal_jax.core.linfit import (
    FITGEOM_MIN_POINTS,
    FitStatus,
    iter_linear_fit_batch,
)
from subpixal_jax.errors import NotEnoughPointsError, SingularMatrixError
from subpixal_jax.linearfit import iter_linear_fit

B, N = 8, 64
GEOMS = tuple(FITGEOM_MIN_POINTS)


def _matrix(rot, scale):
    """tweakwcs convention: M = [[sx cos rx, sy sin ry], [-sx sin rx, sy cos ry]]."""
    rx, ry = np.deg2rad(rot)
    sx, sy = scale
    return np.array(
        [[sx * np.cos(rx), sy * np.sin(ry)], [-sx * np.sin(rx), sy * np.cos(ry)]]
    )


def _case(rng, geom, *, n, outliers, weighted, noise=0.05):
    """One random point set: (xy, uv, weights or None) with n real points."""
    uv = rng.uniform(0.0, 500.0, (n, 2))
    rot = rng.uniform(-5, 5)
    if geom == "general":
        mat = _matrix((rot, rot + rng.uniform(-1, 1)), rng.uniform(0.97, 1.03, 2))
    else:
        mat = _matrix((rot, rot), (rng.uniform(0.97, 1.03),) * 2)
    if geom != "shift" and rng.uniform() < 0.3:
        mat = mat @ np.diag([1.0, -1.0])  # a flip
    c = rng.uniform(100, 400, 2)
    xy = (uv - c) @ mat.T + c + rng.uniform(-3, 3, 2) + rng.normal(0, noise, (n, 2))
    bad = rng.uniform(size=n) < outliers
    xy[bad] += rng.choice([-1, 1], (bad.sum(), 2)) * rng.uniform(1, 10, (bad.sum(), 2))
    w = None
    if weighted:
        w = rng.uniform(0.2, 2.0, n)
        w[rng.uniform(size=n) < 0.05] = 0.0
    return xy, uv, w


def _pad_batch(cases):
    xy = np.zeros((B, N, 2))
    uv = np.zeros((B, N, 2))
    w = np.zeros((B, N))
    valid = np.zeros((B, N), bool)
    center = np.zeros((B, 2))
    for b, (cxy, cuv, cw) in enumerate(cases):
        n = len(cxy)
        xy[b, :n], uv[b, :n], valid[b, :n] = cxy, cuv, True
        w[b, :n] = 1.0 if cw is None else cw
        center[b] = cuv[w[b, :n] > 0].mean(axis=0)
    return xy, uv, w, valid, center


def _assert_matches_tweakwcs(ours, ref, n, ctx):
    np.testing.assert_array_equal(np.asarray(ours.fitmask)[:n], ref["fitmask"], ctx)
    assert int(ours.eff_nclip) == ref["eff_nclip"], ctx
    assert int(ours.status) == FitStatus.OK, ctx
    close = dict(rtol=1e-9, atol=1e-11, err_msg=ctx)
    np.testing.assert_allclose(ours.shift, ref["shift"], **close)
    np.testing.assert_allclose(ours.matrix, ref["matrix"], **close)
    for key, name in (
        ("rot", "rot"),
        ("<rot>", "mean_rot"),
        ("proper_rot", "proper_rot"),
    ):
        np.testing.assert_allclose(getattr(ours, name), ref[key], rtol=1e-9, atol=1e-9)
    # A flipped rscale has skew ±180: the same angle on either side of the cut.
    dskew = (float(ours.skew) - ref["skew"] + 180.0) % 360.0 - 180.0
    assert abs(dskew) < 1e-9, ctx
    np.testing.assert_allclose(ours.scale, ref["scale"], **close)
    np.testing.assert_allclose(ours.mean_scale, ref["<scale>"], **close)
    assert bool(ours.proper) == bool(ref["proper"]), ctx
    for stat in ("rmse", "mae", "std"):
        np.testing.assert_allclose(getattr(ours, stat), ref[stat], **close)
    fitted = np.asarray(ours.resids)[:n][np.asarray(ours.fitmask)[:n]]
    np.testing.assert_allclose(fitted, ref["resids"], rtol=1e-9, atol=1e-9)


def test_min_points_table_matches_tweakwcs():
    assert FITGEOM_MIN_POINTS == twl.SUPPORTED_FITGEOM_MODES
    assert set(linfit.FITGEOM_NPARAMS) == set(GEOMS)


@pytest.mark.parametrize("geom", GEOMS)
def test_batch_matches_tweakwcs(geom):
    """Every nclip 0..5, both clip_accum, weighted or not, three statistics."""
    rng = np.random.default_rng(GEOMS.index(geom))
    stats = ("rmse", "mae", "std")
    checked = 0
    for nclip in range(6):
        for clip_accum in (False, True):
            for weighted in (False, True):
                cases = [
                    _case(
                        rng,
                        geom,
                        n=int(rng.integers(12, N + 1)),
                        outliers=0.3 * b / (B - 1),
                        weighted=weighted,
                    )
                    for b in range(B)
                ]
                xy, uv, w, valid, center = _pad_batch(cases)
                sigma_stat = stats[(nclip + 2 * weighted) % 3]
                fits = iter_linear_fit_batch(
                    xy,
                    uv,
                    w if weighted else None,
                    valid,
                    center,
                    fitgeom=geom,
                    nclip=nclip,
                    sigma=2.5,
                    sigma_stat=sigma_stat,
                    clip_accum=clip_accum,
                )
                fits = jax.tree.map(np.asarray, fits)
                for b, (cxy, cuv, cw) in enumerate(cases):
                    ref = twl.iter_linear_fit(
                        cxy,
                        cuv,
                        wuv=cw,
                        fitgeom=geom,
                        nclip=nclip,
                        sigma=(2.5, sigma_stat),
                        clip_accum=clip_accum,
                    )
                    ours = jax.tree.map(lambda a, b=b: a[b], fits)
                    ctx = f"{geom} nclip={nclip} accum={clip_accum} w={weighted} b={b}"
                    _assert_matches_tweakwcs(ours, ref, len(cxy), ctx)
                    checked += ref["eff_nclip"] > 0
    assert checked >= 20  # clipping really happened in many cases


@pytest.mark.parametrize(
    ("wxy", "wuv", "sigma"),
    [(False, False, 3.0), (True, False, (2.0, "mae")), (True, True, (2.0, "std"))],
)
def test_host_wrapper_matches_tweakwcs(wxy, wuv, sigma):
    rng = np.random.default_rng(7)
    xy, uv, w = _case(rng, "general", n=30, outliers=0.2, weighted=True)
    w2 = rng.uniform(0.5, 1.5, len(xy))
    kw = {"wxy": w if wxy else None, "wuv": (w2 if wxy else w) if wuv else None}
    ours = iter_linear_fit(xy, uv, **kw, fitgeom="general", sigma=sigma, nclip=4)
    ref = twl.iter_linear_fit(xy, uv, **kw, fitgeom="general", sigma=sigma, nclip=4)
    _assert_matches_tweakwcs(ours, ref, len(xy), str(kw))
    np.testing.assert_allclose(ours.center, ref["center"], rtol=1e-12)
    assert isinstance(ours.shift, np.ndarray)
    assert ours.resids.shape == (30, 2)
    assert ours.fitmask.shape == (30,)


def _ideal_batch(mats, shifts, rng):
    uv = rng.uniform(-200, 200, (B, N, 2))
    xy = np.einsum("bij,bnj->bni", mats, uv) + shifts[:, None, :]
    return xy, uv, np.ones((B, N), bool), np.zeros((B, 2))


@pytest.mark.parametrize(
    ("geom", "rot", "scale", "flip"),
    [
        ("shift", (0.0, 0.0), (1.0, 1.0), False),
        ("rshift", (30.0, 30.0), (1.0, 1.0), False),
        ("rshift", (-120.0, -120.0), (1.0, 1.0), True),
        ("rscale", (-20.0, -20.0), (1.3, 1.3), False),
        ("rscale", (75.0, 75.0), (0.7, 0.7), True),
        ("general", (10.0, 13.0), (1.2, 0.9), False),
        ("general", (-40.0, -35.0), (0.8, 1.1), True),
    ],
)
def test_known_transform_recovered_exactly(geom, rot, scale, flip):
    rng = np.random.default_rng(3)
    mat = _matrix(rot, scale) @ (np.diag([1.0, -1.0]) if flip else np.eye(2))
    shifts = rng.uniform(-5, 5, (B, 2))
    xy, uv, valid, center = _ideal_batch(np.broadcast_to(mat, (B, 2, 2)), shifts, rng)
    # nclip=0: with ideal data the residuals are rounding noise, and clipping
    # them (as tweakwcs would) is legitimate but beside the point here.
    fits = iter_linear_fit_batch(xy, uv, None, valid, center, fitgeom=geom, nclip=0)
    np.testing.assert_array_equal(fits.status, FitStatus.OK)
    np.testing.assert_allclose(fits.shift, shifts, atol=1e-11)
    np.testing.assert_allclose(fits.matrix, np.broadcast_to(mat, (B, 2, 2)), atol=1e-13)
    np.testing.assert_array_equal(fits.proper, not flip)
    np.testing.assert_array_less(fits.rmse, 1e-10)
    assert fits.fitmask.all()
    if not flip:
        np.testing.assert_allclose(fits.rot, np.broadcast_to(rot, (B, 2)), atol=1e-10)
        np.testing.assert_allclose(fits.skew, rot[1] - rot[0], atol=1e-10)
    np.testing.assert_allclose(fits.scale, np.broadcast_to(scale, (B, 2)), rtol=1e-12)


def test_rscale_45_degree_quirk_fixed():
    """tweakwcs sets θ = 0 when num == den; an exact 45° rotation proves it."""
    uv = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    mat = np.array([[1.0, 1.0], [-1.0, 1.0]])  # 45°, scale sqrt(2)
    xy = uv @ mat.T
    valid = np.zeros((B, N), bool)
    valid[:, :4] = True
    pad = ((0, 0), (0, N - 4), (0, 0))
    fits = iter_linear_fit_batch(
        np.pad(np.broadcast_to(xy, (B, 4, 2)), pad),
        np.pad(np.broadcast_to(uv, (B, 4, 2)), pad),
        None,
        valid,
        np.zeros((B, 2)),
        fitgeom="rscale",
        nclip=0,
    )
    np.testing.assert_allclose(fits.matrix[0], mat, atol=1e-15)
    np.testing.assert_allclose(fits.proper_rot[0], 45.0, atol=1e-12)
    np.testing.assert_allclose(fits.rmse[0], 0.0, atol=1e-15)
    ref = twl.iter_linear_fit(xy, uv, fitgeom="rscale", center=(0, 0), nclip=0)
    assert ref["proper_rot"] == 0.0  # the documented deviation
    assert ref["rmse"] > 0.5


@pytest.mark.parametrize("geom", ["rscale", "general"])
def test_errors_match_scatter_of_1000_realisations(geom):
    rng = np.random.default_rng(11)
    reps, npts = 1000, 50
    mat = (
        _matrix((3.0, 3.0), (1.02, 1.02))
        if geom == "rscale"
        else _matrix((3.0, 4.0), (1.02, 0.99))
    )
    uv = np.broadcast_to(rng.uniform(-300, 300, (npts, 2)), (reps, npts, 2))
    clean = uv @ mat.T + np.array([0.4, -0.7])[None, None, :]
    pad = ((0, 0), (0, N - npts), (0, 0))
    valid = np.zeros((reps, N), bool)
    valid[:, :npts] = True
    for weighted in (False, True):
        w = rng.uniform(0.25, 4.0, npts) if weighted else np.ones(npts)
        noise = rng.normal(0, 0.1, (reps, npts, 2)) / np.sqrt(w)[None, :, None]
        fits = iter_linear_fit_batch(
            np.pad(clean + noise, pad),
            np.pad(uv, pad),
            np.pad(np.broadcast_to(w, (reps, npts)), pad[:2]) if weighted else None,
            valid,
            np.zeros((reps, 2)),
            fitgeom=geom,
            nclip=0,
        )
        assert (np.asarray(fits.status) == 0).all()
        for value, err in (
            (fits.shift, fits.shift_err),
            (fits.rot, fits.rot_err),
            (fits.scale, fits.scale_err),
        ):
            scatter = np.std(np.asarray(value), axis=0)
            reported = np.sqrt(np.mean(np.asarray(err) ** 2, axis=0))
            np.testing.assert_allclose(reported, scatter, rtol=0.1)


def test_general_covariance_matches_numpy_weighted_least_squares():
    rng = np.random.default_rng(5)
    xy, uv, w = _case(rng, "general", n=30, outliers=0.0, weighted=True)
    fit = iter_linear_fit(xy, uv, wuv=w, fitgeom="general", center=(0, 0), nclip=0)
    keep = w > 0
    design = np.column_stack([np.ones(keep.sum()), uv[keep]])
    sw = np.sqrt(w[keep])[:, None]
    cov_x = np.linalg.inv((design * sw).T @ (design * sw))
    coef, res, *_ = np.linalg.lstsq(design * sw, xy[keep] * sw, rcond=None)
    var = res.sum() / (2 * keep.sum() - 6)
    # Our vector (s_x, s_y, M00, M01, M10, M11) against per-axis (s, M_0, M_1).
    np.testing.assert_allclose(fit.shift, coef[0], rtol=1e-10)
    np.testing.assert_allclose(fit.covariance[0, 0], var * cov_x[0, 0], rtol=1e-8)
    np.testing.assert_allclose(fit.covariance[2:4, 2:4], var * cov_x[1:, 1:], rtol=1e-8)
    np.testing.assert_allclose(fit.covariance[0, 2:4], var * cov_x[0, 1:], rtol=1e-8)
    np.testing.assert_allclose(fit.covariance[0, 4:], 0.0, atol=1e-18)


def _standard_batch(seed=0, weighted=True):
    rng = np.random.default_rng(seed)
    cases = [
        _case(
            rng,
            "general",
            n=int(rng.integers(12, N + 1)),
            outliers=0.2,
            weighted=weighted,
        )
        for _ in range(B)
    ]
    return _pad_batch(cases)


def test_padding_invariance_and_vmap_equals_loop():
    """Batch rows padded to 64 with garbage == single fits padded to 32."""
    rng = np.random.default_rng(1)
    cases = [
        _case(rng, "general", n=int(rng.integers(12, 33)), outliers=0.2, weighted=True)
        for _ in range(B)
    ]
    xy, uv, w, valid, center = _pad_batch(cases)
    # Padding holds garbage: it must not matter.
    xy[~valid] = np.nan
    uv[~valid] = 1e30
    w[~valid] = 5.0
    kw = dict(fitgeom="general", nclip=3, sigma=2.0)
    batch = iter_linear_fit_batch(xy, uv, w, valid, center, **kw)
    for b in range(B):
        one = linfit.iter_linear_fit(
            xy[b, :32],
            uv[b, :32],
            wuv=w[b, :32],
            mask=valid[b, :32],
            center=center[b],
            **kw,
        )
        for name, a, c in zip(one._fields, one, batch, strict=True):
            c = c[b, :32] if name in ("resids", "fitmask") else c[b]
            # Sums over 32 or 64 entries may round differently: ~1 ulp of the
            # coordinates (~500 px), hence atol 1e-12 on residuals.
            np.testing.assert_allclose(a, c, rtol=1e-13, atol=1e-12, err_msg=name)


def test_jit_equals_eager():
    rng = np.random.default_rng(2)
    xy, uv, w = _case(rng, "shift", n=20, outliers=0.2, weighted=True)
    kw = dict(fitgeom="shift", nclip=1, sigma=2.0)
    with jax.disable_jit():
        eager = linfit.iter_linear_fit(xy, uv, wuv=w, **kw)
    xyb, uvb, wb, valid, center = _pad_batch([(xy, uv, w)] * B)
    jitted = iter_linear_fit_batch(xyb, uvb, wb, valid, center, **kw)
    for name, a, c in zip(eager._fields, eager, jitted, strict=True):
        c = c[0, :20] if name in ("resids", "fitmask") else c[0]
        np.testing.assert_allclose(a, c, rtol=1e-13, atol=1e-14, err_msg=name)


def test_one_compilation_per_bucket():
    xy, uv, w, valid, center = _standard_batch(seed=2)
    iter_linear_fit_batch(xy, uv, w, valid, center, fitgeom="general")
    before = linfit.iter_fit_kernel._cache_size()
    for nclip, sigma, stat, accum, weights in [
        (0, 3.0, "rmse", False, w),
        (5, 2.0, "mae", True, None),
        (1, 4.5, "std", False, w),
        (None, 1.0, "rmse", True, None),
    ]:
        iter_linear_fit_batch(
            xy,
            uv,
            weights,
            valid,
            center,
            fitgeom="general",
            nclip=nclip,
            sigma=sigma,
            sigma_stat=stat,
            clip_accum=accum,
        )
    assert linfit.iter_fit_kernel._cache_size() == before


def test_result_independent_of_global_x64():
    xy, uv, w, valid, center = _standard_batch(seed=3)
    with jax.enable_x64(False):
        off = iter_linear_fit_batch(xy, uv, w, valid, center, fitgeom="general")
    with jax.enable_x64(True):
        on = iter_linear_fit_batch(xy, uv, w, valid, center, fitgeom="general")
    for name, a, b in zip(off._fields, off, on, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert off.matrix.dtype == jnp.float64
    assert off.covariance.dtype == jnp.float64


@given(st.integers(0, 2**32 - 1))
def test_point_order_does_not_matter(seed):
    xy, uv, w, valid, center = _standard_batch(seed=4)
    perm = np.random.default_rng(seed).permutation(N)
    a = iter_linear_fit_batch(xy, uv, w, valid, center, fitgeom="general")
    b = iter_linear_fit_batch(
        xy[:, perm], uv[:, perm], w[:, perm], valid[:, perm], center, fitgeom="general"
    )
    np.testing.assert_array_equal(np.asarray(a.fitmask)[:, perm], b.fitmask)
    np.testing.assert_allclose(a.matrix, b.matrix, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a.shift, b.shift, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- bad input


def test_bad_data_gives_status_not_silent_nan():
    xy, uv, w, valid, center = _standard_batch(seed=6)
    valid[0, 2:] = False  # 2 points: too few for 'general'
    w[1] = 0.0  # all weights zero
    uv[2, :, 1] = 3.0 * uv[2, :, 0]  # collinear: singular
    xy[3, 5] = np.nan  # non-finite input on a fitted point
    fits = iter_linear_fit_batch(xy, uv, w, valid, center, fitgeom="general", nclip=2)
    np.testing.assert_array_equal(
        fits.status,
        [
            FitStatus.NOT_ENOUGH_POINTS,
            FitStatus.NOT_ENOUGH_POINTS,
            FitStatus.SINGULAR,
            FitStatus.NON_FINITE,
        ]
        + [FitStatus.OK] * (B - 4),
    )
    assert np.isnan(fits.matrix[:4]).all()
    assert np.isnan(fits.shift_err[:4]).all()
    assert np.isfinite(fits.matrix[4:]).all()
    np.testing.assert_array_equal(fits.npoints[:2], [2, 0])


@pytest.mark.parametrize("geom", ["rshift", "rscale"])
def test_coincident_points_are_singular_for_rotations(geom):
    xy, uv, w, valid, center = _standard_batch(seed=8)
    uv[0] = 123.25  # every point at one place: no rotation can be found
    fits = iter_linear_fit_batch(xy, uv, w, valid, center, fitgeom=geom)
    assert int(fits.status[0]) == FitStatus.SINGULAR
    assert np.isnan(fits.rot[0]).all()
    np.testing.assert_array_equal(fits.status[1:], FitStatus.OK)


def test_exactly_min_points_disables_clipping_and_has_nan_covariance():
    uv = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    xy = uv + np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    fit = iter_linear_fit(xy, uv, fitgeom="general", nclip=3)
    assert int(fit.eff_nclip) == 0
    assert fit.fitmask.all()
    assert np.isnan(fit.covariance).all()  # no degrees of freedom left


def test_host_wrapper_raises_on_bad_status():
    uv = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    with pytest.raises(NotEnoughPointsError, match="general"):
        iter_linear_fit(uv[:2], uv[:2], fitgeom="general")
    with pytest.raises(NotEnoughPointsError):
        iter_linear_fit(uv, uv, wuv=np.zeros(4), fitgeom="general")
    with pytest.raises(SingularMatrixError):
        iter_linear_fit(uv, uv, fitgeom="general")
    fit = iter_linear_fit(uv, uv, fitgeom="general", throw=False)
    assert int(fit.status) == FitStatus.SINGULAR
    assert np.isnan(fit.shift).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"uv": np.zeros((4, 2))}, "uv"),
        ({"xy": np.zeros((5, 3))}, "xy"),
        ({"wxy": -np.ones(5)}, "wxy"),
        ({"wuv": np.ones(4)}, "wuv"),
        ({"wuv": np.full(5, np.nan)}, "wuv"),
        ({"fitgeom": "affine"}, "fitgeom"),
        ({"nclip": -1}, "nclip"),
        ({"nclip": 1.5}, "nclip"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": (3.0, "mad")}, "sigma"),
        ({"center": (1.0,)}, "center"),
        ({"throw": "yes"}, "throw"),
    ],
)
def test_host_wrapper_value_errors_name_the_argument(kwargs, name):
    args = {"xy": np.zeros((5, 2)), "uv": np.zeros((5, 2))} | kwargs
    with pytest.raises(ValueError, match=name):
        iter_linear_fit(args.pop("xy"), args.pop("uv"), **args)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fitgeom": "affine"}, "fitgeom"),
        ({"nclip": -2}, "nclip"),
        ({"sigma": -1.0}, "sigma"),
        ({"sigma_stat": "mad"}, "sigma_stat"),
        ({"weights": np.ones((B, N + 1))}, "weights"),
        ({"mask": np.ones(N, bool)}, "mask"),
        ({"center": np.zeros(2)}, "center"),
        ({"uv": np.zeros((B, N, 3))}, "uv"),
    ],
)
def test_batch_value_errors_name_the_argument(kwargs, name):
    args = {
        "xy": np.zeros((B, N, 2)),
        "uv": np.zeros((B, N, 2)),
        "weights": None,
        "mask": np.ones((B, N), bool),
        "center": np.zeros((B, 2)),
    } | kwargs
    positional = [args.pop(k) for k in ("xy", "uv", "weights", "mask", "center")]
    with pytest.raises(ValueError, match=name):
        iter_linear_fit_batch(*positional, **args)


def test_normalized_clipping_judges_each_point_by_its_own_error():
    # 20 bright points (sigma 0.002 px) and 60 faint ones (0.05 px), Gaussian
    # noise, weights 1/sigma², one 2 px outlier among the bright ones.
    rng = np.random.default_rng(3)
    n_bright, n_faint = 20, 60
    sigma = np.r_[np.full(n_bright, 0.002), np.full(n_faint, 0.05)]
    uv = rng.uniform(0, 500, (n_bright + n_faint, 2))
    xy = uv + np.array([0.3, -0.2]) + rng.normal(size=uv.shape) * sigma[:, None]
    xy[0] += 2.0
    args = (xy[None], uv[None], 1.0 / sigma[None] ** 2, np.ones((1, len(uv)), bool))
    center = np.full((1, 2), 250.0)

    def fit(nclip, normalized):
        f = iter_linear_fit_batch(
            *args,
            center,
            fitgeom="rscale",
            nclip=nclip,
            sigma=3.0,
            clip_normalized=normalized,
        )
        return np.asarray(f.fitmask[0]), np.asarray(f.shift[0])

    for nclip in range(1, 6):
        kept, shift = fit(nclip, True)
        assert not kept[0]  # the outlier
        assert kept[n_bright:].sum() >= n_faint - 2  # 3 sigma of their own errors
        np.testing.assert_allclose(shift, [0.3, -0.2], atol=0.002)
    # Plain |r| against the bright points' RMS drops the faint points on one
    # pass and re-admits everything (the outlier too) on the next.
    kept, shift = fit(4, False)
    assert kept[0]
    assert kept[n_bright:].sum() < n_faint // 2
    assert np.abs(shift - [0.3, -0.2]).max() > 0.05

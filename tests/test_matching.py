import math

import numpy as np
import pytest

from subpixal_jax.reference.matching import (
    MatchLimits,
    MatchResult,
    MatchStatus,
    SearchOptions,
    match_points,
)

EXTENT = 2000.0


def _matrix(rotation=0.0, scale=1.0):
    """WcsError / tweakwcs convention: M = s [[cos r, sin r], [-sin r, cos r]]."""
    r = math.radians(rotation)
    return scale * np.array([[math.cos(r), math.sin(r)], [-math.sin(r), math.cos(r)]])


def _field(
    n=120,
    *,
    shift=(0.0, 0.0),
    rotation=0.0,
    scale=1.0,
    noise=0.05,
    n_extra=0,
    seed=0,
):
    """``ref = M (xy - c) + c + s`` plus noise; ``n_extra`` unmatched points each."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0.0, EXTENT, (n, 2))
    c = np.full(2, EXTENT / 2)
    m = _matrix(rotation, scale)
    ref = (xy - c) @ m.T + c + np.asarray(shift) + rng.normal(0.0, noise, (n, 2))
    if n_extra:
        xy = np.vstack([xy, rng.uniform(0.0, EXTENT, (n_extra, 2))])
        ref = np.vstack([ref, rng.uniform(0.0, EXTENT, (n_extra, 2))])
    return xy, ref, c, m


@pytest.mark.parametrize(
    ("shift", "rotation", "scale"),
    [
        ((23.0, -7.0), 0.0, 1.0),
        ((-117.0, 60.0), 0.0, 1.0),
        ((250.0, -250.0), 0.0, 1.0),
        ((3.0, 2.0), 5.0, 1.0),
        ((3.0, 2.0), -5.0, 1.0),
        ((40.0, -10.0), 2.0, 0.5),
        ((-40.0, 10.0), -2.0, 2.0),
    ],
)
def test_injected_transform_recovered(shift, rotation, scale):
    xy, ref, c, m = _field(shift=shift, rotation=rotation, scale=scale, n_extra=30)
    res = match_points(xy, ref, center=c)
    assert res.status == MatchStatus.OK, res.reason
    # The 120 true pairs and no false ones (30 unmatched points per set).
    assert res.n_matches >= 118
    assert np.all(res.pairs[:, 0] == res.pairs[:, 1])
    assert np.all(res.pairs[:, 0] < 120)
    # 5 sigma of a least-squares fit: noise 0.05 px on 120 points spread
    # uniformly over 2000 px (RMS 577 px per axis).
    sigma_m = 0.05 / (math.sqrt(120) * EXTENT / math.sqrt(12))
    np.testing.assert_allclose(res.shift, shift, atol=5 * 0.05 / math.sqrt(120))
    np.testing.assert_allclose(res.matrix, m, atol=5 * sigma_m)
    assert res.rotation == pytest.approx(
        rotation, abs=math.degrees(5 * sigma_m / scale)
    )
    assert res.scale == pytest.approx(scale, abs=5 * sigma_m)
    assert res.rms == pytest.approx(0.05 * math.sqrt(2), rel=0.25)
    assert res.significance > 10
    np.testing.assert_allclose(res.apply(xy[:120]), ref[:120], atol=0.3)


def test_partial_overlap_and_outliers():
    # The reference sees only the left 40% of the field shifted by 117 px,
    # plus its own unrelated sources; 30% of xy are unmatched.
    xy, ref, c, _ = _field(n=300, shift=(117.0, -40.0), n_extra=100, seed=4)
    inside = ref[:, 0] < 0.4 * EXTENT
    inside[300:] = True
    keep = np.nonzero(inside)[0]
    res = match_points(xy, ref[keep], center=c)
    assert res.status == MatchStatus.OK, res.reason
    true_pairs = np.sum(keep < 300)
    assert res.n_matches >= true_pairs - 2
    assert np.all(keep[res.pairs[:, 1]] == res.pairs[:, 0])
    np.testing.assert_allclose(res.shift, (117.0, -40.0), atol=0.05)


def test_order_and_direction_invariance():
    xy, ref, c, _ = _field(shift=(60.0, 20.0), rotation=1.5, scale=1.1, seed=2)
    res = match_points(xy, ref, center=c)
    perm = np.random.default_rng(0).permutation(len(xy))
    res_perm = match_points(xy[perm], ref, center=c)
    np.testing.assert_allclose(res_perm.matrix, res.matrix, atol=1e-9)
    np.testing.assert_allclose(res_perm.shift, res.shift, atol=1e-7)
    np.testing.assert_array_equal(perm[res_perm.pairs[:, 0]], res_perm.pairs[:, 1])
    # Matching the other way round gives the inverse transform.
    back = match_points(ref, xy, center=c)
    assert back.ok
    np.testing.assert_allclose(back.matrix @ res.matrix, np.eye(2), atol=1e-5)
    np.testing.assert_allclose(back.apply(res.apply(xy)), xy, atol=0.02)


def test_general_fitgeom_fits_skew():
    rng = np.random.default_rng(5)
    xy = rng.uniform(0.0, EXTENT, (120, 2))
    c = np.full(2, EXTENT / 2)
    m = np.array([[1.002, 0.004], [-0.001, 0.998]])
    ref = (xy - c) @ m.T + c + [80.0, 15.0] + rng.normal(0.0, 0.03, xy.shape)
    res = match_points(xy, ref, center=c, fitgeom="general")
    assert res.ok, res.reason
    np.testing.assert_allclose(res.matrix, m, atol=2e-5)
    assert res.rms < 0.06


def test_regular_grid_is_ambiguous():
    g = np.arange(11) * 100.0
    grid = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
    noise = np.random.default_rng(1).normal(0.0, 0.05, grid.shape)
    res = match_points(grid, grid + np.array([250.3, 30.1]) + noise)
    assert res.status == MatchStatus.AMBIGUOUS
    assert res.n_second >= 0.5 * res.n_matches
    assert "second-best" in res.reason
    assert "min_significance" in res.reason


def test_pure_noise_is_not_ok():
    rng = np.random.default_rng(3)
    res = match_points(
        rng.uniform(0, EXTENT, (120, 2)), rng.uniform(0, EXTENT, (120, 2))
    )
    assert res.status in (MatchStatus.TOO_FEW_MATCHES, MatchStatus.AMBIGUOUS)
    assert res.n_matches < 15
    assert f"{res.n_matches} matches" in res.reason


def test_too_few_common_sources():
    # 10 common sources, the brightest (first) of 120 in each set.
    xy, ref, c, _ = _field(n=10, shift=(30.0, 30.0), n_extra=110, seed=6)
    res = match_points(xy, ref, center=c)
    assert res.status == MatchStatus.TOO_FEW_MATCHES
    assert "min_matches=15" in res.reason
    # The same field passes when fewer matches are asked for.
    loose = match_points(xy, ref, MatchLimits(min_matches=8), center=c)
    assert loose.ok, loose.reason
    np.testing.assert_allclose(loose.shift, (30.0, 30.0), atol=0.1)


def test_priors_exclude_the_true_transform():
    xy, ref, c, _ = _field(shift=(200.0, 0.0), seed=7)
    res = match_points(xy, ref, MatchLimits(max_shift=100.0), center=c)
    assert not res.ok
    rot = match_points(*_field(rotation=5.0, seed=7)[:2], MatchLimits(max_rotation=2.0))
    assert not rot.ok
    scl = match_points(
        *_field(scale=2.0, seed=7)[:2], MatchLimits(scale_range=(0.8, 1.25))
    )
    assert not scl.ok


@pytest.mark.parametrize(
    ("xy", "ref"),
    [
        (np.zeros((2, 2)), np.zeros((50, 2))),
        (np.full((10, 2), np.nan), np.zeros((50, 2))),
        (np.zeros((0, 2)), np.zeros((0, 2))),
    ],
)
def test_no_sources(xy, ref):
    res = match_points(xy, ref)
    assert res.status == MatchStatus.NO_SOURCES
    assert "at least 3 finite points" in res.reason
    assert res.n_matches == 0
    np.testing.assert_array_equal(res.matrix, np.eye(2))


def test_nan_rows_ignored_and_indices_kept():
    xy, ref, c, _ = _field(shift=(23.0, 0.0), seed=8)
    xy[5] = np.nan
    res = match_points(xy, ref, center=c)
    assert res.ok
    assert 5 not in res.pairs[:, 0]
    assert np.all(res.pairs[:, 0] == res.pairs[:, 1])


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: MatchLimits(tolerance=0.0), "tolerance"),
        (lambda: MatchLimits(scale_range=(2.0, 1.0)), "scale_range"),
        (lambda: MatchLimits(min_matches=2), "min_matches"),
        (lambda: MatchLimits(max_shift=-1.0), "max_shift"),
        (lambda: MatchLimits(min_significance=0), "min_significance"),
        (lambda: SearchOptions(max_points=2), "max_points"),
        (lambda: SearchOptions(fallback_neighbors=1), "fallback_neighbors"),
        (lambda: SearchOptions(n_neighbors=True), "n_neighbors"),
    ],
)
def test_bad_options_named(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"fitgeom": "affine"}, "fitgeom"), ({"center": (1.0,)}, "center")],
)
def test_bad_arguments_named(kwargs, name):
    xy, ref, *_ = _field(n=20)
    with pytest.raises(ValueError, match=name):
        match_points(xy, ref, **kwargs)


def test_bad_shape_named():
    with pytest.raises(ValueError, match="ref must have shape"):
        match_points(np.zeros((5, 2)), np.zeros((5, 3)))


def test_result_is_frozen():
    xy, ref, c, _ = _field(seed=9)
    res = match_points(xy, ref, center=c)
    assert isinstance(res, MatchResult)
    with pytest.raises(AttributeError):
        res.n_matches = 0


@pytest.mark.parametrize("seed", [1, 3])
def test_fallback_finds_few_common_among_many(seed):
    # 20 common sources among 120 per set, in no particular order: the
    # 5-neighbour triangles of the common sources are polluted by the others,
    # the fallback's 9-neighbour triangles are not.
    xy, ref, c, m = _field(
        n=20, shift=(117.0, 40.0), rotation=3.0, n_extra=100, seed=seed
    )
    rng = np.random.default_rng(seed)
    px, pr = rng.permutation(len(xy)), rng.permutation(len(ref))
    found = match_points(xy[px], ref[pr], center=c)
    assert found.ok, found.reason
    assert np.sum(px[found.pairs[:, 0]] == pr[found.pairs[:, 1]]) == 20
    np.testing.assert_allclose(found.matrix, m, atol=1e-4)
    plain = match_points(
        xy[px], ref[pr], center=c, search=SearchOptions(fallback_neighbors=None)
    )
    assert plain.status == MatchStatus.TOO_FEW_MATCHES

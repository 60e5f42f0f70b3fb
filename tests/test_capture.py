import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from subpixal_jax.io.images import read_exposure
from subpixal_jax.io.wcs import correct_wcs
from subpixal_jax.pipeline.capture import (
    CaptureResult,
    coarse_transform,
    detect_exposure_sources,
    needs_capture,
)
from subpixal_jax.reference.matching import MatchLimits, MatchStatus
from subpixal_jax.simulate import WcsError, misregistration, simulate_exposures

#: Injected header errors: none, the three shifts of issue #16, a 5 degree
#: rotation, a 2x-binned image whose header keeps the unbinned scale (the
#: sources sit at half the distance from the centre: scale 0.5) and the
#: opposite (scale 2) with a rotation.
ERRORS = {
    "none": WcsError((0.0, 0.0)),
    "shift23": WcsError((23.0, -7.5)),
    "shift117": WcsError((-117.0, 40.0)),
    "shift250": WcsError((250.0, -180.0)),
    "rot5": WcsError((5.0, 3.0), rotation=5.0),
    "bin2": WcsError((10.0, -4.0), scale=0.5),
    "scale2": WcsError((-30.0, 12.0), rotation=-3.0, scale=2.0),
}
NAMES = list(ERRORS)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_exposures(
        tmp_path_factory.mktemp("capture"),
        n_exposures=len(ERRORS),
        n_chips=2,
        chip_shape=(256, 512),
        chip_gap=20,
        errors=list(ERRORS.values()),
        seed=3,
    )


@pytest.fixture(scope="module")
def reference(sim):
    """The scene's true positions in the fit frame (exposure 0's frame)."""
    wcslin = sim.frame_wcs[0]
    sky = np.column_stack([sim.sources["ra"], sim.sources["dec"]])
    return wcslin, wcslin.all_world2pix(sky, 0), np.asarray(sim.sources["flux"])


class _Captures(dict):
    """Exposure and capture result per case, computed on first use."""

    def __init__(self, sim, reference):
        super().__init__()
        self.sim, self.reference = sim, reference

    def __missing__(self, name):
        wcslin, ref_xy, flux = self.reference
        exposure = read_exposure(self.sim.paths[NAMES.index(name)])
        res = coarse_transform(exposure, ref_xy, wcslin, reference_flux=flux)
        self[name] = (exposure, res)
        return self[name]


@pytest.fixture(scope="module")
def captures(sim, reference):
    return _Captures(sim, reference)


def _corrected(exposure, wcslin, res, *, inverse=False):
    matrix, shift = res.matrix, res.shift
    if inverse:
        matrix = np.linalg.inv(matrix)
        shift = -matrix @ shift
    return {
        chip.extver: correct_wcs(
            chip.wcs, wcslin, matrix, shift, center=res.center, fitgeom=res.fitgeom
        )
        for chip in exposure.chips
    }


@pytest.mark.parametrize("name", NAMES)
def test_capture_restores_true_wcs(sim, reference, captures, name):
    wcslin = reference[0]
    k = NAMES.index(name)
    exposure, res = captures[name]
    assert res.status == MatchStatus.OK, res.reason
    assert res.n_matches >= 30
    assert res.significance > 4
    # Moment centroids without deblending (4x faster than windowed ones):
    # measured rms up to 0.31 px (the 2x-binned header doubles the errors).
    assert res.rms < 0.4
    before = misregistration(sim, k, sim.header_wcs[k])
    after = misregistration(sim, k, _corrected(exposure, wcslin, res))
    # Well inside the sub-pixel capture range (issue #16 asks < 0.5 px).
    assert after < 0.15, (before, after)
    if name != "none":
        assert before > 20
    # The fit is the inverse of the injected error (frames differ by the
    # simulated dither and a roll offset below 0.005 deg).
    err = ERRORS[name]
    assert res.scale == pytest.approx(1.0 / err.scale, rel=1e-3)
    assert res.rotation == pytest.approx(-err.rotation, abs=0.02)


def test_direction_matters(sim, reference, captures):
    # Applying the inverse transform moves the exposure further away.
    exposure, res = captures["shift117"]
    k = NAMES.index("shift117")
    before = misregistration(sim, k, sim.header_wcs[k])
    wrong = misregistration(
        sim, k, _corrected(exposure, reference[0], res, inverse=True)
    )
    assert wrong > 1.9 * before


def test_needs_capture_rule(captures):
    assert not needs_capture(captures["none"][1])
    for name in NAMES[1:]:
        res = captures[name][1]
        assert needs_capture(res), name
        assert res.max_displacement > 20
    with pytest.raises(ValueError, match="threshold"):
        needs_capture(captures["none"][1], threshold=-1.0)


def test_detected_sources_in_fit_frame(sim, reference, captures):
    # Without an error the detected positions fall on the truth.
    wcslin, ref_xy, _ = reference
    exposure = captures["none"][0]
    xy, flux = detect_exposure_sources(exposure, wcslin, max_sources=20)
    assert len(xy) == 20
    assert np.all(np.diff(flux) <= 0)
    d, _ = cKDTree(ref_xy).query(xy)
    assert np.median(d) < 0.1


def test_too_few_common_sources(reference, captures):
    wcslin, ref_xy, flux = reference
    exposure, res = captures["shift117"]
    # Only 8 reference sources (the brightest): below min_matches=15.
    few = coarse_transform(
        exposure,
        ref_xy[np.argsort(-flux)[:8]],
        wcslin,
        source_xy=res.xy,
    )
    assert few.status in (MatchStatus.TOO_FEW_MATCHES, MatchStatus.AMBIGUOUS)
    assert not needs_capture(few)
    assert "min_matches=15" in few.reason or "min_significance" in few.reason
    np.testing.assert_array_equal(few.matrix, np.eye(2))
    np.testing.assert_array_equal(few.shift, np.zeros(2))


def test_pure_noise_reference(reference, captures):
    wcslin, ref_xy, _ = reference
    exposure, res = captures["shift23"]
    rng = np.random.default_rng(0)
    lo, hi = ref_xy.min(axis=0), ref_xy.max(axis=0)
    noise = rng.uniform(lo, hi, (len(ref_xy), 2))
    out = coarse_transform(exposure, noise, wcslin, source_xy=res.xy)
    assert out.status != MatchStatus.OK
    assert f"{out.match.n_matches} matches" in out.reason


def test_regular_grid_is_ambiguous(reference, captures):
    wcslin = reference[0]
    exposure = captures["none"][0]
    g = np.arange(7) * 60.0  # 49 points: the 64-point fit bucket of the others
    grid = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
    out = coarse_transform(exposure, grid + 30.0, wcslin, source_xy=grid)
    assert out.status == MatchStatus.AMBIGUOUS
    assert "second-best" in out.reason


def test_max_shift_prior(reference, captures):
    wcslin, ref_xy, flux = reference
    exposure, res = captures["shift250"]
    out = coarse_transform(
        exposure,
        ref_xy,
        wcslin,
        MatchLimits(max_shift=100),
        reference_flux=flux,
        source_xy=res.xy,
    )
    assert not out.ok
    ok = coarse_transform(
        exposure,
        ref_xy,
        wcslin,
        MatchLimits(max_shift=400),
        reference_flux=flux,
        source_xy=res.xy,
    )
    assert ok.ok, ok.reason
    np.testing.assert_allclose(ok.shift, res.shift, atol=1e-6)
    assert math.isfinite(ok.max_displacement)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"reference_xy": np.zeros((4, 3))}, "reference_xy"),
        ({"reference_flux": np.zeros(3)}, "reference_flux"),
        ({"fitgeom": "affine"}, "fitgeom"),
        ({"source_xy": np.zeros(4)}, "source_xy"),
    ],
)
def test_bad_arguments_named(reference, captures, kwargs, name):
    wcslin, ref_xy, _ = reference
    exposure = captures["none"][0]
    args = {"reference_xy": ref_xy, "source_xy": np.zeros((5, 2))} | kwargs
    with pytest.raises(ValueError, match=name):
        coarse_transform(exposure, args.pop("reference_xy"), wcslin, **args)


def test_result_type(captures):
    res = captures["none"][1]
    assert isinstance(res, CaptureResult)
    assert res.fitgeom == "rscale"
    with pytest.raises(AttributeError):
        res.shift = np.zeros(2)

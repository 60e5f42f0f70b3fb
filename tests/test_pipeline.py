"""The loop as a step over explicit state: by hand, checkpointed, statuses.

A small simulated set (three two-chip 128x256 exposures, the plots tests'
shapes) keeps the compiles shared with other tests.
"""

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest

from subpixal_jax.align import align_images, resolve_options
from subpixal_jax.apps.cli import build_parser
from subpixal_jax.geometry.transform import Affine
from subpixal_jax.io.result import ImageFit, IterationResult
from subpixal_jax.options import AlignOptions, cli_fields, flag_name
from subpixal_jax.pipeline import (
    align_step,
    initial_state,
    load_state,
    save_state,
    stages,
    stop_reason,
)
from subpixal_jax.pipeline.loop import final_outcomes
from subpixal_jax.reference.catalog import PhotutilsCatalog
from subpixal_jax.reference.resample import DrizzleResample
from subpixal_jax.simulate import simulate_exposures
from subpixal_jax.status import (
    ImageOutcome,
    ImageStatus,
    RunStatus,
    SourceFlag,
)

# The capture stage off: align_step by hand never runs it (the stage has its
# own tests), and on these 128x256 chips (16 sources) one image's first
# pass leaves 1.3 px residuals, which would send it there.
OPTIONS = {"nmax": 3, "reference": 0, "cr_reject": True, "capture": "off"}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_exposures(
        tmp_path_factory.mktemp("sim"), n_exposures=3, chip_shape=(128, 256), seed=3
    )


@pytest.fixture(scope="module")
def uninterrupted(sim):
    return align_images(PhotutilsCatalog(), DrizzleResample(sim.paths), **OPTIONS)


def _sky(final_wcs):
    grid = np.array([[5.0, 5.0], [250.0, 120.0], [128.0, 64.0]])
    return np.concatenate(
        [final_wcs[ext].all_pix2world(grid, 0) for ext in sorted(final_wcs)]
    )


PIXEL_DEG = 0.05 / 3600  # the simulator's pixel scale


def _same_wcs(a, b, atol_px=1e-9):
    """Chip WCSs that put the same pixels at the same sky positions."""
    for wa, wb in zip(a, b, strict=True):
        np.testing.assert_allclose(_sky(wa), _sky(wb), rtol=0, atol=atol_px * PIXEL_DEG)


def test_three_steps_by_hand_equal_align_images(sim, uninterrupted):
    resample = DrizzleResample(sim.paths)
    options = resolve_options(resample, AlignOptions.create(**OPTIONS))
    catalog = PhotutilsCatalog()
    state = initial_state(resample)
    for _ in range(3):
        state, record = align_step(
            state, catalog, resample, resample.output_wcs, options
        )
        assert isinstance(record, IterationResult)
    assert state.iteration == uninterrupted.n_iterations == 3
    assert state.max_shifts[-1] < state.max_shifts[0]
    final = [dict(w) for w in state.wcs]
    _same_wcs(final, uninterrupted.final_wcs)
    for mine, theirs in zip(state.totals, uninterrupted.corrections, strict=True):
        if theirs is None:
            assert mine is None
            continue
        np.testing.assert_allclose(mine.matrix, theirs.matrix, rtol=0, atol=1e-12)
        np.testing.assert_allclose(mine.shift, theirs.shift, rtol=0, atol=1e-9)


def test_checkpoint_resumes_to_the_same_result(sim, uninterrupted, tmp_path):
    path = tmp_path / "after2.pkl"

    def stop_after_two(record):
        return record.iteration < 2

    def keep(state):
        save_state(state, path)

    first = align_images(
        PhotutilsCatalog(),
        DrizzleResample(sim.paths),
        on_iteration=stop_after_two,
        checkpoint=keep,
        **OPTIONS,
    )
    assert first.status.status is RunStatus.STOPPED
    saved = load_state(path)
    assert saved.iteration == 2
    # A new process would read the files again: a fresh resampler, synced to
    # the saved WCSs and cosmic-ray masks by the first step.
    resumed = align_images(
        PhotutilsCatalog(), DrizzleResample(sim.paths), state=saved, **OPTIONS
    )
    assert resumed.n_iterations == 3
    assert resumed.status == uninterrupted.status
    # The resumed resampler sums its drizzles in another order than the one
    # that was updated in place: ~1e-6 px of float64 rounding (measured 1.2e-6).
    _same_wcs(resumed.final_wcs, uninterrupted.final_wcs, atol_px=1e-5)
    assert [r["status"] for r in resumed.summary] == [
        r["status"] for r in uninterrupted.summary
    ]


def test_load_state_refuses_other_files(tmp_path):
    bad = tmp_path / "x.pkl"
    bad.write_bytes(b"\x80\x04N.")  # pickle of None
    with pytest.raises(ValueError, match="not a subpixal_jax checkpoint"):
        load_state(bad)


def test_not_converged_run_reports_no_success(sim):
    # One iteration cannot converge from ~1.5 px errors.
    result = align_images(
        PhotutilsCatalog(),
        DrizzleResample(sim.paths),
        nmax=1,
        reference=0,
        cr_reject=True,
        capture="off",
    )
    assert result.status.status is RunStatus.MAX_ITERATIONS
    statuses = [o.status for o in result.final_status]
    assert statuses == [
        ImageStatus.REFERENCE,
        ImageStatus.NOT_CONVERGED,
        ImageStatus.NOT_CONVERGED,
    ]
    assert "eps_shift" in result.final_status[1].reason
    assert all("SUCCESS" not in r["status"] for r in result.summary)
    assert (
        result.to_table()
        .meta["final_status"][Path(sim.paths[1]).name]
        .startswith("NOT_CONVERGED")
    )


# -------------------------------------------------------------- stop_reason


@pytest.mark.parametrize(
    ("shifts", "expected"),
    [
        ([0.5, 0.001], RunStatus.CONVERGED),
        ([0.5, 0.4, 0.3], RunStatus.MAX_ITERATIONS),
        ([0.1, 0.2, 0.4], RunStatus.DIVERGED),
        ([0.5, math.nan], RunStatus.FAILED),
        ([0.5, 0.4], None),
    ],
)
def test_stop_reason_covers_every_run_status(shifts, expected):
    outcome = stop_reason(shifts, AlignOptions(eps_shift=0.003, max_iterations=3))
    assert (outcome.status if outcome else None) is expected


class _Kernels:
    """A resampler's kernel switch: early until ``use_final_kernel``."""

    def __init__(self, early: bool):
        self.early = early

    def use_final_kernel(self) -> bool:
        switched, self.early = self.early, False
        return switched


@pytest.mark.parametrize(
    ("shifts", "early", "expected"),
    [
        ((0.001,), True, None),  # converged on the early kernel: once more
        ((0.001,), False, RunStatus.CONVERGED),
        ((0.5, 0.001), True, RunStatus.CONVERGED),  # the limit comes first
        ((0.5,), True, None),
        ((0.5, math.nan), True, RunStatus.FAILED),
    ],
)
def test_a_run_converges_only_on_the_final_kernel(shifts, early, expected):
    from types import SimpleNamespace

    from subpixal_jax.pipeline.loop import _stop_on_final_kernel

    kernels = _Kernels(early)
    options = AlignOptions(eps_shift=0.003, max_iterations=2)
    state = SimpleNamespace(max_shifts=shifts)
    outcome = _stop_on_final_kernel(state, kernels, options)
    assert (outcome.status if outcome else None) is expected
    # the switch happens exactly when the run goes on because of it
    assert kernels.early == (early and shifts != (0.001,))


def test_small_oscillation_above_eps_is_not_divergence():
    options = AlignOptions(eps_shift=0.003, max_iterations=10)
    assert stop_reason([0.004, 0.007, 0.012], options) is None


def _image(status):
    outcome = ImageOutcome(status, "why" if status is ImageStatus.FAILED else "")
    return ImageFit("a.fits", outcome, None, None, math.nan, {}, {})


@pytest.mark.parametrize("run", [RunStatus.MAX_ITERATIONS, RunStatus.DIVERGED])
def test_final_outcomes_never_success_unless_converged(run):
    from subpixal_jax.status import RunOutcome

    step = IterationResult(
        3, False, [_image(s) for s in (ImageStatus.SUCCESS, ImageStatus.REFERENCE)]
    )
    step.images.append(_image(ImageStatus.FAILED))
    final = final_outcomes(step, RunOutcome(run), AlignOptions())
    assert [o.status for o in final] == [
        ImageStatus.NOT_CONVERGED,
        ImageStatus.REFERENCE,
        ImageStatus.FAILED,
    ]
    converged = final_outcomes(step, RunOutcome(RunStatus.CONVERGED), AlignOptions())
    assert converged[0].status is ImageStatus.SUCCESS


# ------------------------------------------------------------- vocabulary


def test_status_text_round_trips_the_summary_spelling():
    for status in ImageStatus:
        outcome = ImageOutcome(status, "a reason: with colon")
        assert ImageOutcome.parse(str(outcome)) == outcome
    assert ImageOutcome.parse("SUCCESS") == ImageOutcome(ImageStatus.SUCCESS)


def test_source_flags_do_not_overlap():
    values = [int(f) for f in SourceFlag]
    assert all(v and v & (v - 1) == 0 for v in values)  # one bit each
    assert len(set(values)) == len(values)
    from subpixal_jax.core.peak import PeakFlag

    for flag in PeakFlag:
        assert SourceFlag[flag.name] == flag


#: Patterns that would branch on the text of a status.
_STRING_STATUS = re.compile(
    r"""status[^\n=]{0,40}(==|!=|\bin\b)\s*[("'\[{]*\s*["'](SUCCESS|FAILED|SKIPPED|"""
    r"""REFERENCE|CONVERGED|MAX_ITERATIONS|DIVERGED|STOPPED|NOT_CONVERGED)"""
    r"""|startswith\((res\.)?["']?(SUCCESS|FAILED|SKIPPED|REFERENCE)"""
    r"""|==\s*res\.(SUCCESS|FAILED|SKIPPED|REFERENCE)"""
)


def test_library_compares_no_status_strings():
    root = Path(__file__).parents[1] / "subpixal_jax"
    offenders = []
    for path in root.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _STRING_STATUS.search(line) and ">>>" not in line:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, offenders


# ---------------------------------------------------------------- options


def test_cli_flags_are_generated_from_align_options():
    parser = build_parser()
    align = parser._subparsers._group_actions[0].choices["align"]
    flags = {s for a in align._actions for s in a.option_strings}
    expected = {flag_name(f) for f in cli_fields()}
    assert expected <= flags
    api_only = {f.name for f in dataclasses.fields(AlignOptions)} - {
        f.name for f in cli_fields()
    }
    # Set by --plots, not flags of their own.
    assert api_only == {"history", "keep_diagnostics"}
    args = parser.parse_args(
        ["align", "a.fits", "--fitgeom", "RSCALE", "--nmax", "4,1", "--no-cr-reject"]
    )
    from subpixal_jax.options import from_arguments

    options = from_arguments(args)
    assert (options.fitgeom, options.max_iterations) == ("rscale", 4)
    assert (options.max_full_resamples, options.cr_reject) == (1, False)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fitgeom": "affine"}, "fitgeom"),
        ({"nclip": -1}, "nclip"),
        ({"sigma": 0}, "sigma"),
        ({"sigma": (3, "mad")}, "sigma_stat"),
        ({"nmax": 0}, "max_iterations"),
        ({"nmax": (2, 3)}, "nmax"),
        ({"eps_shift": -1}, "eps_shift"),
        ({"cc_type": "PHASE"}, "cc_type"),
        ({"interp": "cubic"}, "interp"),
        ({"wcsupdate": "later"}, "wcsupdate"),
        ({"refine": "all"}, "refine"),
        ({"history": "some"}, "history"),
        ({"search_radius": 0}, "search_radius"),
        ({"reference": -1}, "reference"),
        ({"joint": "yes"}, "joint"),
    ],
)
def test_every_option_is_validated_with_its_name(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        AlignOptions.create(**kwargs)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="fitgeometry"):
        AlignOptions.create(fitgeometry="shift")


def test_readme_documents_every_option():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("## Options") : readme.index("## Results and statuses")]
    missing = [
        f.name for f in dataclasses.fields(AlignOptions) if f"`{f.name}`" not in table
    ]
    assert not missing, missing


def test_fit_weights_follow_the_measured_sigma():
    sigma = np.array([[0.004, 0.004], [0.1, 0.1], [np.nan, np.nan]])
    meas = stages.Measured(np.zeros((3, 2)), sigma, np.zeros(3, int), [])
    options = AlignOptions(weighting="measured")
    # Image pixels twice the fit frame's: errors double in fit-frame pixels.
    w = stages.fit_weights([None] * 3, meas, options, pixel_ratio=2.0)
    floor = stages.POSITION_ERROR_FLOOR
    np.testing.assert_allclose(w[:2], 1 / (4 * sigma[:2, 0] ** 2 + floor**2))
    assert w[2] == 0.0
    unweighted = AlignOptions(use_weights=False)
    np.testing.assert_array_equal(stages.fit_weights([None] * 3, meas, unweighted), 1)


def test_robust_inliers_judge_each_point_by_its_own_error():
    # 300 points with errors from 0.003 to 0.3 px and a shift of (0.5, -0.2);
    # one bright point (sigma 0.003 px) 0.05 px off: 17 of its own errors,
    # but far inside the scatter of the faint ones, which an unnormalised
    # clip would have kept and let dominate the weighted fit.
    rng = np.random.default_rng(5)
    n = 300
    sigma = np.exp(rng.uniform(np.log(0.003), np.log(0.3), n))
    uv = rng.uniform(0, 1000, (n, 2))
    xy = uv + np.array([0.5, -0.2]) + sigma[:, None] * rng.standard_normal((n, 2))
    xy[0] = uv[0] + np.array([0.5, -0.2]) + 0.05
    sigma[0] = 0.003
    weight = 1 / (sigma**2 + stages.POSITION_ERROR_FLOOR**2)
    points = stages.Points(xy, uv, weight, np.ones(n, bool))
    center = np.array([500.0, 500.0])
    measured = AlignOptions(weighting="measured")
    (kept,) = stages.robust_inliers([points], center, measured)
    assert not kept.good[0]
    assert np.count_nonzero(kept.good[1:]) >= 0.98 * (n - 1)
    (fit,) = stages.fit_points([kept], center, measured)
    np.testing.assert_allclose(fit.shift, [0.5, -0.2], atol=0.003)


def test_excess_error_recovers_an_injected_floor():
    # 2000 points with errors 0.003-0.3 px plus an error of 0.01 px per axis
    # the weights do not know of: the chi-square sum finds it (a median
    # over the faint majority would not: they are noise-dominated).
    rng = np.random.default_rng(8)
    n = 2000
    sigma = np.exp(rng.uniform(np.log(0.003), np.log(0.3), n))
    total = np.hypot(sigma, 0.01)
    residual = total[:, None] * rng.standard_normal((n, 2))
    weight = 1 / sigma**2
    distance = np.hypot(*residual.T)
    mask = np.ones(n, bool)
    extra = stages.excess_error(distance, weight, mask, n_params=4)
    assert extra == pytest.approx(0.01, rel=0.1)
    # Errors that explain the residuals: no excess.
    honest = np.hypot(*(sigma[:, None] * rng.standard_normal((n, 2))).T)
    assert stages.excess_error(honest * 0.9, weight, mask, n_params=4) == 0.0


def test_convergence_follows_the_applied_correction():
    # Under the joint solution an image can measure a shift that every image
    # measures alike and that the correction leaves out: the run converges on
    # what was applied (0.0005 px here), not on the fit (none here).
    correction = Affine(np.eye(2), np.array([0.0003, 0.0004]), np.zeros(2))
    image = ImageFit(
        "a", ImageOutcome(ImageStatus.SUCCESS), None, None, 0.0, {}, {},
        correction=correction,
    )  # fmt: skip
    assert image.shift_norm == pytest.approx(0.0005)
    assert np.all(np.isnan(image.shift))
    unapplied = dataclasses.replace(image, correction=None)
    assert math.isnan(unapplied.shift_norm)

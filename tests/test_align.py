"""Acceptance tests of the alignment loop on simulated exposures.

One simulated set of four two-chip exposures is aligned once (module
fixture); the end-to-end, compile-count, file-writing and CLI tests share
it. Expensive variants are marked ``slow`` (run with ``-m slow``).
"""

import hashlib
import itertools
import math

import jax
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from subpixal_jax.align import align_files, align_images, apply_solution
from subpixal_jax.apps.cli import main
from subpixal_jax.core import linfit
from subpixal_jax.core.measure import measure_batch
from subpixal_jax.errors import AlignmentError
from subpixal_jax.io import result as res
from subpixal_jax.io.wcs import archived_wcs
from subpixal_jax.reference.catalog import PhotutilsCatalog
from subpixal_jax.reference.resample import DrizzleResample
from subpixal_jax.simulate import (
    WcsError,
    misregistration,
    recovered_error,
    simulate_exposures,
)

CHIP_SHAPE = (256, 512)
SEED = 2

#: Residual misregistration (RMS px over both chips) the default alignment
#: must reach at this chip size: measured 0.042-0.051 px for this seed
#: (0.027-0.039 px for seed 0), 0.016-0.022 px with refine='sources'. The
#: issue's goal of 0.01 px is not reached at 256x512 chips.
MAX_MISREGISTRATION = 0.07
MAX_SHIFT_ERROR = 0.05  # px, recovered vs injected (measured <= 0.027)
MAX_ROTATION_ERROR = 0.006  # deg, recovered vs injected (measured <= 0.0035)
#: Looser limits of the slow variants: 'otf' stops at 0.063-0.088 px (only the
#: shift is tested for convergence), one chip reaches 0.066 px, 'rscale'
#: recovers one rotation 0.0067 deg off.
MAX_MISREGISTRATION_VARIANT = 0.12
MAX_ROTATION_ERROR_VARIANT = 0.01


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digests(paths):
    return {p.name: _digest(p) for p in paths}


def _pixel_grid(wcs, n=7):
    ny, nx = wcs.array_shape
    xs, ys = np.meshgrid(np.linspace(0, nx - 1, n), np.linspace(0, ny - 1, n))
    return np.column_stack([xs.ravel(), ys.ravel()])


def _pixel_difference(a, b):
    """Largest distance (px of ``b``) between where ``a`` and ``b`` put a pixel."""
    pixels = _pixel_grid(a)
    back = b.all_world2pix(a.all_pix2world(pixels, 0), 0, tolerance=1e-12)
    return float(np.max(np.hypot(*(back - pixels).T)))


class _CallCounter:
    """Wraps ``measure_batch`` as the loop sees it and records every call.

    ``signatures`` holds each call's array shapes (what selects a
    compilation); ``marks`` the number of calls at the end of each iteration
    (the loop calls ``on_iteration`` after every iteration but the last).
    """

    def __init__(self):
        self.signatures = []
        self.marks = []

    def __call__(self, batch, **kwargs):
        shapes = tuple(leaf.shape for leaf in jax.tree_util.tree_leaves(batch))
        self.signatures.append(shapes)
        return measure_batch(batch, **kwargs)

    def on_iteration(self, step):
        self.marks.append(len(self.signatures))

    def per_iteration(self):
        """Per iteration, the ``(image side, reference side)`` of each call."""
        ends = [0, *self.marks, len(self.signatures)]
        return [
            [(sig[0][1], sig[3][1]) for sig in self.signatures[a:b]]
            for a, b in itertools.pairwise(ends)
        ]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_exposures(
        tmp_path_factory.mktemp("sim"), n_exposures=4, chip_shape=CHIP_SHAPE, seed=SEED
    )


@pytest.fixture(scope="module")
def aligned(sim, tmp_path_factory):
    """One alignment of the simulated set, written to an output folder."""
    originals = _digests(sim.paths)
    out = tmp_path_factory.mktemp("corrected")
    summary = out.parent / "summary.ecsv"
    counter = _CallCounter()
    measure_before = measure_batch._cache_size()
    fit_before = linfit.iter_fit_kernel._cache_size()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("subpixal_jax.pipeline.stages.measure_batch", counter)
        result, reports = align_files(
            sim.paths,
            fitgeom="general",
            reference=0,
            in_place=False,
            output_dir=out,
            summary=summary,
            history="all",
            on_iteration=counter.on_iteration,
        )
    return {
        "result": result,
        "reports": reports,
        "out": out,
        "summary": summary,
        "originals": originals,
        "calls": counter,
        "measure_compiles": measure_batch._cache_size() - measure_before,
        "fit_compiles": linfit.iter_fit_kernel._cache_size() - fit_before,
    }


# ---------------------------------------------------------------------------
# 1. End to end on the simulator


def test_alignment_recovers_injected_errors(sim, aligned):
    result = aligned["result"]
    print(f"status {result.status} after {result.n_iterations} iterations")
    assert result.status == "CONVERGED"
    assert result.converged
    for i in range(1, 4):
        before = misregistration(sim, i, sim.header_wcs[i])
        after = misregistration(sim, i, result.final_wcs[i])
        injected = sim.errors[i]
        found = recovered_error(sim, i, result.final_wcs[i])
        print(
            f"exposure {i}: misregistration {before:.4f} -> {after:.4f} px; "
            f"shift {injected.shift} found {found.shift}; "
            f"rotation {injected.rotation:.5f} found {found.rotation:.5f} deg"
        )
        assert before > 0.3
        assert after < MAX_MISREGISTRATION
        np.testing.assert_allclose(found.shift, injected.shift, atol=MAX_SHIFT_ERROR)
        assert found.rotation == pytest.approx(
            injected.rotation, abs=MAX_ROTATION_ERROR
        )
        assert found.scale == pytest.approx(injected.scale, abs=1e-4)
    # The reference exposure is held fixed exactly.
    assert misregistration(sim, 0, result.final_wcs[0]) < 1e-6


def test_summary_has_one_row_per_image_and_iteration(sim, aligned):
    result = aligned["result"]
    rows = result.summary
    assert len(rows) == 4 * result.n_iterations
    assert [(r["iteration"], r["image"]) for r in rows] == [
        (k, str(p)) for k in range(1, result.n_iterations + 1) for p in sim.paths
    ]
    for row in rows:
        if row["image"] == str(sim.paths[0]):
            assert row["status"] == res.REFERENCE
            assert row["n_sources"] == 0
            assert math.isnan(row["dx"])
        else:
            assert row["status"] == res.SUCCESS
            assert row["n_fit"] >= 50
            assert row["n_good"] <= row["n_sources"]
            assert 0.0 < row["rmse"] < 0.3
    last = [r for r in rows if r["iteration"] == result.n_iterations]
    assert max(math.hypot(r["dx"], r["dy"]) for r in last[1:]) < 0.003
    # History 'all' keeps every iteration; the first one is a full resample.
    assert [h.iteration for h in result.history] == list(
        range(1, result.n_iterations + 1)
    )
    assert result.history[0].full_resample


def test_summary_ecsv_round_trip(sim, aligned, tmp_path):
    result = aligned["result"]
    path = tmp_path / "again.ecsv"
    result.write_summary(path)
    wcslin, center, corrections = res.read_solution(path)
    assert sorted(corrections) == sorted(p.name for p in sim.paths)
    # The fixed reference is listed without a correction.
    assert corrections[sim.paths[0].name] is None
    assert result.corrections[0] is None
    np.testing.assert_allclose(center, result.center)
    assert wcslin.to_header_string() == result.wcslin.to_header_string()
    for path, total in zip(sim.paths[1:], result.corrections[1:], strict=True):
        matrix, shift = corrections[path.name].matrix, corrections[path.name].shift
        np.testing.assert_allclose(matrix, total.matrix, rtol=0, atol=1e-15)
        np.testing.assert_allclose(shift, total.shift, rtol=0, atol=1e-12)
    table = result.to_table()
    assert table.meta["status"] == "CONVERGED"
    assert len(table) == len(result.summary)
    # align_files wrote the same summary.
    written = res.read_solution(aligned["summary"])[2]
    assert sorted(written) == sorted(corrections)


# ---------------------------------------------------------------------------
# 2. One compiled pass per iteration


def test_one_compiled_measurement_per_bucket_and_iteration(aligned):
    counter = aligned["calls"]
    result = aligned["result"]
    per_iteration = counter.per_iteration()
    signatures = set(counter.signatures)
    calls = [len(buckets) for buckets in per_iteration]
    n_sources = [
        sum(r["n_sources"] for r in result.summary if r["iteration"] == k)
        for k in range(1, result.n_iterations + 1)
    ]
    print(
        f"measure_batch calls per iteration {calls} for {n_sources} "
        f"sources of 3 images; {len(signatures)} distinct batch signatures; "
        f"new compilations: measure {aligned['measure_compiles']}, "
        f"fit {aligned['fit_compiles']}"
    )
    assert len(per_iteration) == result.n_iterations
    # Every iteration measures all 3 images' ~240 sources with one call per
    # (image, reference) cutout-size bucket, images pooled: a handful of
    # calls, not one per image or per source.
    # Sources are measured in fixed-size chunks per cutout-size bucket: a few
    # distinct shapes per iteration, each called for as many chunks as needed.
    for buckets in per_iteration:
        assert 1 <= len(set(buckets)) <= 5
        assert 1 <= len(buckets) <= 16
    assert all(n > 200 for n in n_sources)
    # Compilations: at most one per distinct chunk signature over the whole
    # run (fewer when an earlier test already compiled one).
    assert aligned["measure_compiles"] <= len(signatures) <= 6
    # Fits: the pre-clipping and the clipped fit share one vmapped kernel.
    assert aligned["fit_compiles"] <= 2


# ---------------------------------------------------------------------------
# 3. Files


def test_output_dir_gets_corrected_copies(sim, aligned):
    result, out = aligned["result"], aligned["out"]
    assert _digests(sim.paths) == aligned["originals"]
    # The fixed reference is not rewritten; the three aligned images are.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in sim.paths[1:]
    )
    assert len(aligned["reports"]) == 3
    for i, path in enumerate(sim.paths[1:], start=1):
        report = aligned["reports"][i - 1]
        assert report.path == out / path.name
        with fits.open(out / path.name) as hdul:
            for extver, final in result.final_wcs[i].items():
                header = hdul["SCI", extver].header
                assert header["WCSNAME"] == "SUBPIXAL"
                written = WCS(header, hdul)
                assert _pixel_difference(written, final) < 1e-6
                (key,) = {
                    k
                    for ext, k, _, _ in report.archived
                    if ext == hdul.index_of(("SCI", extver))
                }
                old = archived_wcs(hdul, ("SCI", extver), key)
                assert _pixel_difference(old, sim.header_wcs[i][extver]) < 1e-6


def test_apply_solution_reproduces_the_corrected_wcs(sim, aligned, tmp_path):
    result = aligned["result"]
    reports = apply_solution(aligned["summary"], sim.paths, output_dir=tmp_path)
    # The reference has a null correction: skipped, not rewritten.
    assert [r.path for r in reports] == [tmp_path / p.name for p in sim.paths[1:]]
    assert not (tmp_path / sim.paths[0].name).exists()
    for i, path in enumerate(sim.paths[1:], start=1):
        with fits.open(tmp_path / path.name) as hdul:
            for extver, final in result.final_wcs[i].items():
                written = WCS(hdul["SCI", extver].header, hdul)
                assert _pixel_difference(written, final) < 1e-6
    assert _digests(sim.paths) == aligned["originals"]


def test_apply_solution_rejects_files_not_in_the_solution(sim, aligned, tmp_path):
    stranger = tmp_path / "stranger_flt.fits"
    stranger.write_bytes(sim.paths[1].read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="stranger_flt"):
        apply_solution(aligned["summary"], [sim.paths[1], stranger], output_dir=out)
    assert list(out.iterdir()) == []


def test_apply_solution_dry_run_writes_nothing(sim, aligned, tmp_path):
    reports = apply_solution(
        aligned["summary"], sim.paths[1:], output_dir=tmp_path, dry_run=True
    )
    assert [r.dry_run for r in reports] == [True] * 3
    assert all(r.changes for r in reports)
    assert list(tmp_path.iterdir()) == []
    assert _digests(sim.paths) == aligned["originals"]


# ---------------------------------------------------------------------------
# 4. Bad input


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("fitgeom", "affine"),
        ("cc_type", "PCC"),
        ("wcsupdate", "later"),
        ("nmax", (2, 3)),
        ("eps_shift", -1e-3),
        ("history", "some"),
    ],
)
def test_bad_option_raises_before_writing(sim, option, value, tmp_path):
    before = _digests(sim.paths)
    with pytest.raises(ValueError, match=option):
        align_files(sim.paths, output_dir=tmp_path, **{option: value})
    assert list(tmp_path.iterdir()) == []
    assert _digests(sim.paths) == before


def test_missing_file_is_named(sim, tmp_path):
    before = _digests(sim.paths)
    missing = tmp_path / "nothere_flt.fits"
    with pytest.raises(ValueError, match=r"nothere_flt\.fits"):
        align_files([*sim.paths, missing], in_place=True)
    assert _digests(sim.paths) == before


def test_in_place_and_output_dir_are_exclusive(sim, tmp_path):
    before = _digests(sim.paths)
    with pytest.raises(ValueError, match="in_place"):
        align_files(sim.paths, in_place=True, output_dir=tmp_path)
    assert _digests(sim.paths) == before


def test_corrupt_file_is_named(sim, tmp_path):
    bad = tmp_path / "garbage_flt.fits"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    before = _digests(sim.paths)
    with pytest.raises((ValueError, OSError), match=r"garbage_flt\.fits"):
        align_files([*sim.paths, bad], in_place=True)
    assert _digests(sim.paths) == before


def test_non_overlapping_images_raise(tmp_path):
    far = simulate_exposures(
        tmp_path,
        n_exposures=2,
        n_chips=1,
        chip_shape=(32, 32),
        dither=[(0.0, 0.0), (400.0, 0.0)],
        n_stars=4,
        n_galaxies=0,
        cosmic_rays=False,
        distortion=False,
        seed=1,
    )
    before = _digests(far.paths)
    with pytest.raises(ValueError, match="overlap"):
        align_files(far.paths, in_place=True)
    assert _digests(far.paths) == before


# ---------------------------------------------------------------------------
# 5. A failing image does not stop the others


class _SubsetCatalog:
    """A detected catalog without the sources that some exposures would see.

    Keeps every source at least ``MARGIN`` pixels outside the chip footprints
    ``hide``, plus ``allow`` sources at least ``MARGIN`` pixels inside
    ``hide[0]`` and outside the others.
    """

    MARGIN = 12.0

    def __init__(self, resample, hide, allow):
        self.inner = PhotutilsCatalog()
        self.resample = resample
        self.hide = hide
        self.allow = allow

    def set_image(self, data, *, mask=None, error=None):
        self.inner.set_image(data, mask=mask, error=error)

    @property
    def catalog(self):
        table = self.inner.catalog
        sky = self.resample.output_wcs.wcs_pix2world(
            np.column_stack([table["x"], table["y"]]), 0
        )
        near = [self._within(wcs, sky, self.MARGIN) for wcs in self.hide]
        keep = ~np.any(near, axis=0)
        deep = self._within(self.hide[0], sky, -self.MARGIN)
        deep &= ~np.any(near[1:], axis=0)
        keep[np.flatnonzero(deep)[: self.allow]] = True
        return table[keep]

    @staticmethod
    def _within(wcs, sky, margin):
        x, y = wcs.all_world2pix(sky, 0).T
        ny, nx = wcs.array_shape
        return (
            (x > -margin)
            & (x < nx - 1 + margin)
            & (y > -margin)
            & (y < ny - 1 + margin)
        )

    @property
    def segmentation(self):
        return self.inner.segmentation


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    sim = simulate_exposures(
        tmp_path_factory.mktemp("partial"),
        n_exposures=4,
        n_chips=1,
        chip_shape=(160, 320),
        dither=[(0.0, 0.0), (3.5, 1.5), (200.0, 0.0), (0.0, 110.0)],
        errors=[
            WcsError((0.0, 0.0)),
            WcsError((0.6, -0.4), rotation=0.01),
            WcsError((0.3, 0.2)),
            WcsError((-0.5, 0.4)),
        ],
        n_stars=220,
        n_galaxies=0,
        cosmic_rays=False,
        seed=5,
    )

    def run(throw):
        resample = DrizzleResample(sim.paths)
        hide = [sim.header_wcs[2][1], sim.header_wcs[3][1]]
        catalog = _SubsetCatalog(resample, hide, allow=2)
        return align_images(
            catalog, resample, reference=0, nmax=2, cr_reject=False, throw=throw
        )

    return sim, run


def test_failed_and_skipped_images_do_not_stop_the_others(partial):
    sim, run = partial
    result = run(throw=False)
    last = {
        r["image"]: r for r in result.summary if r["iteration"] == result.n_iterations
    }
    statuses = [last[str(p)]["status"] for p in sim.paths]
    print(statuses)
    assert statuses[0] == res.REFERENCE
    # Two iterations do not converge: the fitted image is reported
    # NOT_CONVERGED at the end, SUCCESS in the iteration's own record.
    assert statuses[1].startswith(res.NOT_CONVERGED)
    assert result.history[-1].images[1].ok
    assert statuses[2].startswith(res.FAILED)
    assert "too few sources" in statuses[2]
    assert statuses[3].startswith(res.SKIPPED)
    assert "no catalog source" in statuses[3]
    before = misregistration(sim, 1, sim.header_wcs[1])
    after = misregistration(sim, 1, result.final_wcs[1])
    print(f"exposure 1: {before:.4f} -> {after:.4f} px")
    assert after < 0.1 * before
    # The failed and skipped images keep their header WCS.
    for i in (2, 3):
        assert _pixel_difference(result.final_wcs[i][1], sim.header_wcs[i][1]) < 1e-6
        assert result.corrections[i] is None


def test_throw_raises_alignment_error(partial):
    sim, run = partial
    with pytest.raises(AlignmentError, match=sim.paths[2].name):
        run(throw=True)


# ---------------------------------------------------------------------------
# 6. Command line


def test_cli_align_and_apply(sim, aligned, tmp_path, capsys):
    out, applied = tmp_path / "out", tmp_path / "applied"
    out.mkdir()
    applied.mkdir()
    summary = tmp_path / "cli.ecsv"
    paths = [str(p) for p in sim.paths]
    code = main(
        [
            "align",
            *paths,
            "--output-dir",
            str(out),
            "--summary",
            str(summary),
            "--reference",
            "0",
            "--nmax",
            "3",
            "--eps-shift",
            "0.01",
        ]
    )
    text = capsys.readouterr().out
    print(text)
    assert code == 0
    assert "status: CONVERGED" in text
    for path in sim.paths[1:]:
        assert f"wrote {out / path.name}" in text
    assert summary.is_file()
    code = main(["apply", str(summary), *paths[1:], "--output-dir", str(applied)])
    assert code == 0
    for path in sim.paths[1:]:
        with fits.open(out / path.name) as a, fits.open(applied / path.name) as b:
            for extver in (1, 2):
                wa = WCS(a["SCI", extver].header, a)
                wb = WCS(b["SCI", extver].header, b)
                assert _pixel_difference(wa, wb) < 1e-6
    assert _digests(sim.paths) == aligned["originals"]


def test_cli_usage_errors(sim, tmp_path, capsys):
    paths = [str(p) for p in sim.paths]
    code = main(["align", *paths, "--nmax", "2,3"])
    assert code == 2
    assert "nmax" in capsys.readouterr().err
    code = main(["align", str(tmp_path / "nothere_flt.fits")])
    assert code == 2
    assert "nothere_flt.fits" in capsys.readouterr().err
    code = main(["apply", str(tmp_path / "none.ecsv"), *paths])
    assert code == 2
    assert "none.ecsv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["align", *paths, "--fitgeom", "affine"])
    assert exc.value.code == 2
    assert "affine" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Slow variants


def _misregistrations(sim, result):
    return [misregistration(sim, i, result.final_wcs[i]) for i in range(len(sim.paths))]


@pytest.mark.slow
def test_otf_converges_like_batch(sim, aligned):
    result, _ = align_files(sim.paths, reference=0, wcsupdate="otf")
    batch = _misregistrations(sim, aligned["result"])
    otf = _misregistrations(sim, result)
    print(
        f"otf {result.status} after {result.n_iterations} iterations "
        f"(batch {aligned['result'].n_iterations}); misregistration "
        f"batch {np.round(batch, 4)} otf {np.round(otf, 4)}"
    )
    assert result.status == "CONVERGED"
    assert max(otf[1:]) < MAX_MISREGISTRATION_VARIANT


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fitgeom", "errors"),
    [
        (
            "rscale",
            [
                WcsError((0.0, 0.0)),
                WcsError((0.9, -0.6), rotation=0.02, scale=1 + 8e-5),
                WcsError((-1.2, 0.4), rotation=-0.015, scale=1 - 6e-5),
                WcsError((0.3, 1.1), rotation=0.01, scale=1 + 3e-5),
            ],
        ),
        (
            "shift",
            [
                WcsError((0.0, 0.0)),
                WcsError((0.9, -0.6)),
                WcsError((-1.2, 0.4)),
                WcsError((0.3, 1.1)),
            ],
        ),
    ],
)
def test_restricted_fitgeom_recovers_matching_errors(fitgeom, errors, tmp_path):
    sim = simulate_exposures(
        tmp_path, n_exposures=4, chip_shape=CHIP_SHAPE, errors=errors, seed=SEED
    )
    result, _ = align_files(sim.paths, reference=0, fitgeom=fitgeom)
    after = _misregistrations(sim, result)
    print(f"{fitgeom}: {result.status} after {result.n_iterations}; {after}")
    assert result.status == "CONVERGED"
    assert {r["status"] for r in result.summary} == {res.REFERENCE, res.SUCCESS}
    for i in range(1, 4):
        found = recovered_error(sim, i, result.final_wcs[i])
        print(f"  {i}: rotation {errors[i].rotation} found {found.rotation:.5f}")
        assert after[i] < MAX_MISREGISTRATION_VARIANT
        np.testing.assert_allclose(found.shift, errors[i].shift, atol=MAX_SHIFT_ERROR)
        assert found.rotation == pytest.approx(
            errors[i].rotation, abs=MAX_ROTATION_ERROR_VARIANT
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant", [{"n_chips": 1}, {"units": "rate"}], ids=["one-chip", "rate"]
)
def test_one_chip_and_rate_units(variant, tmp_path):
    sim = simulate_exposures(
        tmp_path, n_exposures=4, chip_shape=CHIP_SHAPE, seed=SEED, **variant
    )
    result, _ = align_files(sim.paths, reference=0)
    before = [misregistration(sim, i, sim.header_wcs[i]) for i in range(4)]
    after = _misregistrations(sim, result)
    print(f"{variant}: {result.status}; {np.round(before, 4)} -> {np.round(after, 4)}")
    assert result.status == "CONVERGED"
    assert max(after[1:]) < MAX_MISREGISTRATION_VARIANT


@pytest.mark.slow
@pytest.mark.parametrize("refine", ["sources", "transform"])
def test_refinement_is_not_worse(sim, aligned, refine):
    # Issue 17. refine='sources' refining every source gave 0.040 / 0.047 /
    # 0.057 px against the cross-correlation's 0.018 / 0.021 / 0.014: the
    # faint sources' least-squares minima stray on the noisy leave-one-out
    # reference. Keeping their correlation answer below flux S/N 30
    # (`prefer_refined`): 0.0143 / 0.0164 / 0.0145 px.
    result, _ = align_files(sim.paths, reference=0, refine=refine)
    plain = _misregistrations(sim, aligned["result"])
    refined = _misregistrations(sim, result)
    print(
        f"refine={refine!r} {result.status} after {result.n_iterations}: "
        f"{np.round(plain[1:], 4)} -> {np.round(refined[1:], 4)}"
    )
    assert result.status == "CONVERGED"
    for a, b in zip(plain[1:], refined[1:], strict=True):
        assert b <= 1.05 * a


@pytest.mark.slow
def test_limit_cycle_near_eps_shift_is_not_divergence(tmp_path):
    sim = simulate_exposures(tmp_path, n_exposures=4, chip_shape=CHIP_SHAPE, seed=1)
    result, _ = align_files(sim.paths, reference=0)
    after = _misregistrations(sim, result)
    print(f"seed 1: {result.status} after {result.n_iterations}; {after}")
    assert max(after[1:]) < MAX_MISREGISTRATION
    # A 2-cycle just above eps_shift is a noise floor, not divergence.
    assert result.status in ("CONVERGED", "MAX_ITERATIONS")


@pytest.mark.slow
def test_default_set_with_refinement_within_five_thousandths(tmp_path):
    # The acceptance case: four two-chip 512x1024 exposures with
    # errors up to 1.6 px, 0.03 deg and 1e-4. With refine='sources' (faint
    # sources keep the correlation's answer, `prefer_refined`): 0.0032,
    # 0.0039, 0.0043 px (refining every source with the plain clip gave
    # 0.0069, 0.0060, 0.0087; the defaults give 0.0035, 0.0040, 0.0035).
    sim = simulate_exposures(tmp_path, n_exposures=4, seed=0)
    result, _ = align_files(sim.paths, reference=0, refine="sources")
    after = _misregistrations(sim, result)
    print(f"default set, refine='sources': {result.status}; {np.round(after, 4)}")
    assert result.status == "CONVERGED"
    assert max(after[1:]) <= 0.005

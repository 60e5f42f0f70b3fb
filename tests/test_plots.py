"""Diagnostic figures: content checks on one small real alignment."""

import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.quiver import Quiver  # noqa: E402

from subpixal_jax import plots  # noqa: E402
from subpixal_jax.align import align_images  # noqa: E402
from subpixal_jax.catalog import PhotutilsCatalog  # noqa: E402
from subpixal_jax.resample import DrizzleResample  # noqa: E402
from subpixal_jax.simulate import simulate_exposures  # noqa: E402
from subpixal_jax.status import ImageOutcome, ImageStatus  # noqa: E402

N_EXPOSURES = 3


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    sim = simulate_exposures(
        tmp_path_factory.mktemp("sim"),
        n_exposures=N_EXPOSURES,
        chip_shape=(128, 256),
        seed=3,
    )
    resample = DrizzleResample(sim.paths)
    result = align_images(
        PhotutilsCatalog(),
        resample,
        nmax=2,
        keep_diagnostics=True,
        history="all",
        cr_reject=True,
    )
    return result


@pytest.fixture(scope="module")
def image(aligned):
    return aligned.history[-1].images[0]


@pytest.fixture(autouse=True)
def _no_global_state():
    import matplotlib.pyplot as plt

    fignums = plt.get_fignums()
    rc = dict(matplotlib.rcParams)
    backend = matplotlib.get_backend()
    interactive = matplotlib.is_interactive()
    yield
    assert plt.get_fignums() == fignums
    after = dict(matplotlib.rcParams)
    assert after.keys() == rc.keys()
    assert all(after[k] == rc[k] for k in rc if k != "backend")
    assert matplotlib.get_backend() == backend
    assert matplotlib.is_interactive() == interactive


def _quivers(ax):
    return [c for c in ax.collections if isinstance(c, Quiver)]


def test_residual_map_has_one_arrow_per_measured_source(aligned, image):
    assert aligned.wcslin is not None
    fig = plots.plot_residual_map(image, wcslin=aligned.wcslin)
    assert isinstance(fig, Figure)
    before, after = fig.axes
    assert before.get_title() == "before fit"
    assert after.get_title() == "after fit"
    s = image.sources
    measured = np.all(np.isfinite(s.uv), axis=1) & np.all(np.isfinite(s.xy), axis=1)
    for ax in (before, after):
        (quiver,) = _quivers(ax)
        assert np.count_nonzero(measured) == quiver.N
        # One outline per chip, plus the chip labels.
        assert len(ax.get_lines()) == len(image.wcs_before)
        assert {t.get_text() for t in ax.texts} == {
            f"chip {e}" for e in image.wcs_before
        }
    # The after-fit arrows are the fit residuals.
    (quiver,) = _quivers(after)
    resid = plots.fit_residuals(image)[measured]
    np.testing.assert_allclose(quiver.U, resid[:, 0])
    np.testing.assert_allclose(quiver.V, resid[:, 1])
    assert image.name.split("/")[-1] in fig.get_suptitle()


def test_residual_map_without_wcslin_draws_no_outlines(image):
    fig = plots.plot_residual_map(image)
    assert all(not ax.get_lines() for ax in fig.axes)
    assert len(_quivers(fig.axes[0])) == 1


def test_fit_residuals_match_the_definition(image):
    fit, s = image.fit, image.sources
    c = np.asarray(fit.center)
    model = (s.uv - c) @ np.asarray(fit.matrix).T + c + np.asarray(fit.shift)
    np.testing.assert_allclose(plots.fit_residuals(image), s.xy - model)
    fitted = s.fitmask & np.all(np.isfinite(s.uv), axis=1)
    # Weighted rmse of the fitted points is of the order of the plain one.
    plain = np.sqrt(np.mean(np.sum(plots.fit_residuals(image)[fitted] ** 2, axis=1)))
    assert 0.2 * fit.rmse < plain < 5 * fit.rmse


def test_residuals_figure_panels_and_points(image):
    fig = plots.plot_residuals(image)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "residual vs x",
        "residual vs y",
        "residual vs weight",
        "normalised residuals",
    ]
    s = image.sources
    ok = np.all(np.isfinite(plots.fit_residuals(image)), axis=1)
    for ax in fig.axes[:3]:
        # dx and dy, fitted and clipped: every finite residual twice.
        plotted = sum(len(c.get_offsets()) for c in ax.collections)
        assert plotted == 2 * np.count_nonzero(ok)
    assert fig.axes[2].get_xscale() == "log"
    hist = fig.axes[3]
    assert len(hist.patches) == 2  # one step histogram per component
    assert len(hist.get_lines()) == 2  # the two unit-normal curves
    labels = [t.get_text() for t in hist.get_legend().get_texts()]
    assert labels[0].startswith("dx/σ")
    assert labels[1].startswith("dy/σ")
    assert np.count_nonzero(s.fitmask & ok) > 0


def test_gallery_rows_and_peak_marker(image):
    fig = plots.plot_gallery(image, n_sources=3)
    assert len(fig.axes) == 4 * 3
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["cutout", "blot", "cutout − blot", "interlaced CC"] * 3
    s = image.sources
    rows = plots._gallery_rows(image, 3)
    for r, k in enumerate(rows):
        cc_ax = fig.axes[4 * r + 3]
        measured, peak = cc_ax.get_lines()
        np.testing.assert_allclose(measured.get_xydata()[0], s.dxdy[k])
        # The recomputed map's own peak lies on the map.
        (im,) = cc_ax.get_images()
        x0, x1, y0, y1 = im.get_extent()
        px, py = peak.get_xydata()[0]
        assert x0 <= px <= x1
        assert y0 <= py <= y1
        ny, nx = image.extras["cutouts"][k].shape
        assert im.get_array().shape == (2 * ny, 2 * nx)
        assert fig.axes[4 * r].get_images()[0].get_array().shape == (ny, nx)
    assert all(s.flags[k] == 0 for k in rows)


def test_gallery_recovers_a_known_lag():
    # A synthetic ImageFit whose cutout is the blot moved by a known lag.
    from subpixal_jax import result as res
    from subpixal_jax.cutouts import SourceCutouts

    n = 15
    y, x = np.mgrid[0:n, 0:n].astype(float)

    def g(x0, y0):
        return np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / 4.0).astype(np.float32)

    ref = g(7.3, 6.8)
    blots = np.stack(
        [g(7.0 - a / 2, 7.0 - b / 2) for a, b in ((0, 0), (1, 0), (0, 1), (1, 1))]
    )
    cut = SourceCutouts(
        src_id=7,
        extver=1,
        src_pos=(7.0, 7.0),
        blc=(0, 0),
        trc=(n - 1, n - 1),
        image=ref,
        image_valid=np.ones((n, n), bool),
        variance=np.ones((n, n), np.float32),
        predicted=(7.0, 7.0),
        ref_blc=(0, 0),
        ref_trc=(n - 1, n - 1),
        ref=ref,
        ref_valid=np.ones((n, n), bool),
        pixmap=np.zeros((2 * n + 1, 2 * n + 1, 2)),
        iscale=1.0,
        weight=1.0,
    )
    sources = res.SourceMeasurements(
        src_id=np.array([7]),
        extver=np.array([1]),
        dxdy=np.array([[-0.3, 0.2]]),
        sigma=np.array([[0.01, 0.01]]),
        flags=np.array([0]),
        xy=np.array([[7.0, 7.0]]),
        uv=np.array([[6.7, 7.2]]),
        weight=np.array([1.0]),
        fitmask=np.array([True]),
    )
    image = res.ImageFit(
        "fake.fits",
        ImageOutcome(ImageStatus.SUCCESS),
        None,
        sources,
        np.nan,
        {},
        {},
        extras={"cutouts": [cut], "blots": [blots]},
    )
    fig = plots.plot_gallery(image, n_sources=5)
    assert len(fig.axes) == 4
    _, peak = fig.axes[3].get_lines()
    np.testing.assert_allclose(peak.get_xydata()[0], [-0.3, 0.2], atol=0.05)
    # The brightest pixel of the map sits at the lag (image pixels).
    (im,) = fig.axes[3].get_images()
    icc = im.get_array()
    r, c = np.unravel_index(np.argmax(icc), icc.shape)
    x0, _, y0, _ = im.get_extent()
    assert abs(x0 + 0.25 + c / 2 - (-0.3)) <= 0.25
    assert abs(y0 + 0.25 + r / 2 - 0.2) <= 0.25


def test_gallery_needs_diagnostics(aligned):
    import dataclasses

    result = aligned
    bare = dataclasses.replace(result.history[-1].images[0], extras={})
    with pytest.raises(ValueError, match="keep_diagnostics"):
        plots.plot_gallery(bare)
    with pytest.raises(ValueError, match="n_sources"):
        plots.plot_gallery(result.history[-1].images[0], n_sources=0)


def test_convergence_one_line_per_image(aligned):
    result = aligned
    fig = plots.plot_summary_table(result)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["shift", "rotation", "scale", "fit rmse"]
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) == N_EXPOSURES
        for line in lines:
            np.testing.assert_array_equal(line.get_xdata(), [1, 2])
    table = result.to_table()
    first = table[table["image"] == result.names[0]]
    np.testing.assert_allclose(
        fig.axes[0].get_lines()[0].get_ydata(), np.hypot(first["dx"], first["dy"])
    )
    assert str(result.status) in fig.get_suptitle()


def test_convergence_redraws_from_saved_summary(aligned, tmp_path):
    result = aligned
    path = tmp_path / "summary.ecsv"
    result.write_summary(path)
    fresh = plots.plot_summary_table(result)
    redrawn = plots.plot_summary_table(path)
    for a, b in zip(fresh.axes, redrawn.axes, strict=True):
        assert a.get_title() == b.get_title()
        for la, lb in zip(a.get_lines(), b.get_lines(), strict=True):
            np.testing.assert_allclose(la.get_ydata(), lb.get_ydata())
            assert la.get_label() == lb.get_label()
    redrawn_str = plots.plot_summary_table(str(path))
    assert len(redrawn_str.axes[0].get_lines()) == N_EXPOSURES


def test_convergence_skips_images_without_values():
    rows = [
        {
            "iteration": 1,
            "image": name,
            "dx": dx,
            "dy": 0.0,
            "rot_x": 0.0,
            "rot_y": 0.0,
            "scale_x": 1.0,
            "scale_y": 1.0,
            "rmse": 0.1,
        }
        for name, dx in (("ref.fits", np.nan), ("a.fits", 0.5))
    ]
    rows[0].update(rot_x=np.nan, rot_y=np.nan, scale_x=np.nan, rmse=np.nan)
    fig = plots.plot_summary_table(rows)
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 1, 1, 1]
    assert fig.axes[0].get_lines()[0].get_label() == "a.fits"


def test_convergence_rejects_bad_summaries():
    with pytest.raises(ValueError, match="column"):
        plots.plot_summary_table([{"iteration": 1, "image": "a"}])
    with pytest.raises(TypeError, match="summary"):
        plots.plot_summary_table(42)


def test_write_figures(aligned, tmp_path):
    result = aligned
    paths = plots.write_figures(
        result, tmp_path / "figs", prefix="run", dpi=40, n_gallery=2
    )
    names = [p.name for p in paths]
    assert names[0] == "run_convergence.png"
    for kind in ("residual_map", "residuals", "gallery"):
        assert sum(n.endswith(f"_{kind}.png") for n in names) == N_EXPOSURES
    assert len(paths) == 1 + 3 * N_EXPOSURES
    assert "run_000_sim00_flt_residual_map.png" in names
    for p in paths:
        assert p.parent == tmp_path / "figs"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 1000


def test_write_figures_validates(aligned, tmp_path):
    result = aligned
    with pytest.raises(ValueError, match="dpi"):
        plots.write_figures(result, tmp_path, dpi=0)
    with pytest.raises(ValueError, match="n_gallery"):
        plots.write_figures(result, tmp_path, n_gallery=0)
    with pytest.raises(TypeError, match="AlignmentResult"):
        plots.write_figures(result.summary, tmp_path)
    assert not list(tmp_path.iterdir())


def test_missing_matplotlib_names_the_extra(monkeypatch, image):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install subpixal-jax\[plot\]"):
        plots.plot_summary_table([])
    with pytest.raises(ImportError, match="plot"):
        plots.plot_residual_map(image)

"""Diagnostic figures: content checks on one small real alignment."""

import dataclasses
import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.quiver import Quiver, QuiverKey  # noqa: E402

from subpixal_jax.align import align_images  # noqa: E402
from subpixal_jax.apps import plots  # noqa: E402
from subpixal_jax.reference.catalog import PhotutilsCatalog  # noqa: E402
from subpixal_jax.reference.resample import DrizzleResample  # noqa: E402
from subpixal_jax.simulate import simulate_exposures  # noqa: E402

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
        # The figures' subject is the sub-pixel loop; on these 128x256 chips
        # one first pass leaves 1.3 px residuals and would run the capture.
        capture="off",
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


def _quiver(ax, gid):
    (quiver,) = [q for q in _quivers(ax) if q.get_gid() == gid]
    return quiver


def _collection(ax, gid):
    found = [c for c in ax.collections if c.get_gid() == gid]
    return found[0] if found else None


def _measured(s, vectors):
    return np.all(np.isfinite(s.xy), axis=1) & np.all(np.isfinite(vectors), axis=1)


def _check_arrows(ax, s, vectors):
    """The panel's arrows are ``vectors``, capped at the scale's cap (marked)."""
    measured = _measured(s, vectors)
    fitted = measured & s.fitmask
    quiver = _quiver(ax, "fitted")
    gain = 1.0 / quiver.scale
    assert np.count_nonzero(fitted) == quiver.N
    np.testing.assert_allclose(quiver.X, s.xy[fitted, 0])
    np.testing.assert_allclose(quiver.Y, s.xy[fitted, 1])
    length = np.hypot(*vectors[fitted].T)
    p90 = np.percentile(length, plots.SCALE_PERCENTILE)
    extent = np.ptp(s.xy[measured], axis=0).max()
    # The fitted sources' p90 length is drawn at a tenth of the sources' extent.
    np.testing.assert_allclose(p90 * gain, 0.1 * extent)
    cap = 2.0 * p90
    drawn = np.hypot(quiver.U, quiver.V)
    short = length <= cap
    np.testing.assert_allclose(quiver.U[short], vectors[fitted][short, 0])
    np.testing.assert_allclose(quiver.V[short], vectors[fitted][short, 1])
    np.testing.assert_allclose(drawn[~short], cap)
    # The scale bar: a round length near p90, its whole arrow inside the axes.
    (key,) = [a for a in ax.artists if isinstance(a, QuiverKey)]
    assert 0.5 * p90 <= key.U <= 1.5 * p90
    mantissa = key.U / 10 ** np.floor(np.log10(key.U))
    assert round(mantissa, 9) in (1.0, 2.0, 5.0)
    x0, x1 = ax.get_xlim()
    assert 0.0 < key.X - key.U * gain / (x1 - x0) < key.X < 0.5
    return gain, cap


def test_residual_map_before_first_after_last_iteration(aligned):
    assert aligned.wcslin is not None
    assert len(aligned.history) == 2
    fig = plots.plot_residual_map(aligned, image=0)
    assert isinstance(fig, Figure)
    before, after = fig.axes
    assert before.get_title() == "before: iteration 1 displacements"
    assert after.get_title() == "after: iteration 2 fit residuals"
    first = aligned.history[0].images[0]
    last = aligned.history[-1].images[0]
    # The two iterations measured different source sets (full resample).
    assert first.sources.n_sources != last.sources.n_sources
    # Before: the first iteration's xy - uv; after: the last one's residuals.
    _check_arrows(before, first.sources, first.sources.xy - first.sources.uv)
    _check_arrows(after, last.sources, plots.fit_residuals(last))
    # The first iteration was ~1.5 px off, the last fit leaves ~0.2 px.
    scale_before = np.hypot(
        *(first.sources.xy - first.sources.uv)[first.sources.fitmask].T
    )
    scale_after = np.hypot(*plots.fit_residuals(last)[last.sources.fitmask].T)
    assert np.median(scale_before) > 3 * np.median(scale_after)
    for ax, im in ((before, first), (after, last)):
        # One outline per chip (wcslin defaults to the result's), plus labels.
        assert len(ax.get_lines()) == len(im.wcs_before)
        assert {t.get_text() for t in ax.texts} == {f"chip {e}" for e in im.wcs_before}
        legend = ax.get_legend()
        assert "scale bar" in legend.get_title().get_text()
        labels = [t.get_text() for t in legend.get_texts()]
        assert f"fitted ({np.count_nonzero(im.sources.fitmask)})" in labels
    assert "sim00_flt.fits" in fig.get_suptitle()
    assert str(aligned.final_status[0]) in fig.get_suptitle()
    # By name, and as a pair of ImageFits, the same arrows.
    by_name = plots.plot_residual_map(aligned, image="sim00_flt.fits")
    pair = plots.plot_residual_map(first, last, wcslin=aligned.wcslin)
    for other in (by_name, pair):
        for a, b in zip(fig.axes, other.axes, strict=True):
            np.testing.assert_array_equal(
                _quiver(a, "fitted").U, _quiver(b, "fitted").U
            )
    assert pair.axes[0].get_title().startswith("before: first iteration")


def test_residual_map_clipped_outliers_do_not_set_the_scale(image):
    s = image.sources
    before = s.xy - s.uv
    k = int(np.flatnonzero(s.fitmask)[0])  # the source _with_outlier copies
    # Add a copy of a fitted source, 10 px off, that the fit clipped.
    bad = _with_outlier(image, [10.0, 0.0])
    clean_gain, _ = _check_arrows(plots.plot_residual_map(image).axes[0], s, before)
    fig = plots.plot_residual_map(bad)
    ax = fig.axes[0]
    gain, cap = _check_arrows(ax, bad.sources, bad.sources.xy - bad.sources.uv)
    # The outlier leaves the scale exactly as it was.
    assert gain == clean_gain
    clipped = _quiver(ax, "clipped")
    row = np.flatnonzero(
        np.isclose(clipped.X, s.xy[k, 0]) & np.isclose(clipped.Y, s.xy[k, 1])
    )
    (row,) = row
    # Drawn at the cap (~2 fitted p90 lengths), not 10 px long, and marked.
    np.testing.assert_allclose(np.hypot(clipped.U[row], clipped.V[row]), cap)
    assert cap < 0.3 * 10.0
    tips = _collection(ax, "capped tips").get_offsets()
    tip = s.xy[k] + np.array([clipped.U[row], clipped.V[row]]) * gain
    assert np.min(np.hypot(*(tips - tip).T)) < 1e-6
    rings = _collection(ax, "clipped rings").get_offsets()
    assert np.min(np.hypot(*(rings - s.xy[k]).T)) < 1e-9
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("clipped by the fit") for t in labels)
    assert any(t.startswith("arrow capped at") for t in labels)


def test_residual_map_single_iteration_says_so(aligned, image):
    fig = plots.plot_residual_map(image)
    before, after = fig.axes
    assert "this iteration" in before.get_title()
    assert "one iteration given" in fig.get_suptitle()
    # Without wcslin there is nothing to outline.
    assert all(not ax.get_lines() for ax in fig.axes)
    _check_arrows(before, image.sources, image.sources.xy - image.sources.uv)
    _check_arrows(after, image.sources, plots.fit_residuals(image))
    last_only = dataclasses.replace(aligned, history=aligned.history[-1:])
    fig = plots.plot_residual_map(last_only, image=0)
    assert "earlier not kept" in fig.axes[0].get_title()
    assert "only iteration 2 of 2 kept" in fig.get_suptitle()


def test_residual_map_without_fit_or_sources(aligned):
    first = aligned.history[0].images[0]
    last = aligned.history[-1].images[0]
    fig = plots.plot_residual_map(first, dataclasses.replace(last, fit=None))
    before, after = fig.axes
    _check_arrows(before, first.sources, first.sources.xy - first.sources.uv)
    assert not _quivers(after)
    assert [t.get_text() for t in after.texts] == ["no fit"]
    assert "last iteration: no fit" in fig.get_suptitle()
    history = [
        dataclasses.replace(
            aligned.history[0],
            images=[
                dataclasses.replace(first, sources=None, fit=None),
                *aligned.history[0].images[1:],
            ],
        ),
        aligned.history[-1],
    ]
    fig = plots.plot_residual_map(dataclasses.replace(aligned, history=history))
    before, after = fig.axes
    assert not _quivers(before)
    assert "no measurement" in {t.get_text() for t in before.texts}
    _check_arrows(after, last.sources, plots.fit_residuals(last))


def test_residual_map_rejects_bad_arguments(aligned, image):
    with pytest.raises(TypeError, match="after"):
        plots.plot_residual_map(aligned, image)
    with pytest.raises(TypeError, match="image"):
        plots.plot_residual_map(image, image=0)
    with pytest.raises(ValueError, match="out of range"):
        plots.plot_residual_map(aligned, image=N_EXPOSURES)
    with pytest.raises(ValueError, match="no image named"):
        plots.plot_residual_map(aligned, image="nope.fits")
    with pytest.raises(ValueError, match="history"):
        plots.plot_residual_map(dataclasses.replace(aligned, history=[]))
    with pytest.raises(TypeError, match="ImageFit"):
        plots.plot_residual_map(42)


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
    # Log weights only when they span over a decade (these, with the small
    # set's excess error in every weight, span 2.6x; a log axis is tested
    # below with a weight spread added).
    w = s.weight[ok]
    assert w.max() < 10 * w.min()
    assert fig.axes[2].get_xscale() == "linear"
    hist = fig.axes[3]
    assert len(hist.patches) == 2  # one step histogram per component
    assert len(hist.get_lines()) == 2  # the two unit-normal curves
    labels = [t.get_text() for t in hist.get_legend().get_texts()]
    assert labels[0].startswith("dx/σ")
    assert labels[1].startswith("dy/σ")
    assert np.count_nonzero(s.fitmask & ok) > 0


def test_weights_spanning_decades_get_a_log_axis(image):
    s = image.sources
    spread = np.geomspace(1.0, 1000.0, s.n_sources)
    wide = dataclasses.replace(
        image, sources=dataclasses.replace(s, weight=s.weight * spread)
    )
    fig = plots.plot_residuals(wide)
    assert fig.axes[2].get_xscale() == "log"


def _with_outlier(image, offset):
    """``image`` plus a copy of its first fitted source, ``offset`` px off, clipped."""
    s = image.sources
    k = int(np.flatnonzero(s.fitmask)[0])
    rows = {
        f.name: np.concatenate([getattr(s, f.name), getattr(s, f.name)[k : k + 1]])
        for f in dataclasses.fields(s)
    }
    rows["uv"][-1] -= offset
    rows["fitmask"][-1] = False
    return dataclasses.replace(image, sources=type(s)(**rows))


def test_residual_axes_span_the_fitted_sources(image):
    bad = _with_outlier(image, [0.0, 10.0])
    resid = plots.fit_residuals(bad)
    s = bad.sources
    ok = np.all(np.isfinite(resid), axis=1)
    fitted = ok & s.fitmask
    largest = np.abs(resid[fitted]).max()
    # The outlier's residual is ~10 px, the fitted ones well under 1 px.
    assert resid[-1, 1] > 9.0
    assert largest < 1.0
    fig = plots.plot_residuals(bad)
    for ax in fig.axes[:3]:
        lo, hi = ax.get_ylim()
        # Every fitted residual is inside, and the outlier does not stretch it.
        assert lo < -largest
        assert hi > largest
        np.testing.assert_allclose([lo, hi], [-1.15 * largest, 1.15 * largest])
        points = np.concatenate([c.get_offsets() for c in ax.collections])
        assert np.all((points[:, 1] > lo) & (points[:, 1] < hi))
        # Clipped residuals beyond the axis sit on its edge as triangles.
        edge = [c for c in ax.collections if "beyond" in str(c.get_label())]
        assert edge
        at_edge = np.concatenate([c.get_offsets() for c in edge])[:, 1]
        np.testing.assert_allclose(np.abs(at_edge), 0.96 * 1.15 * largest)
    # The outlier's dy sits on the top edge of the residual-vs-x panel.
    tops = [
        c.get_offsets()
        for c in fig.axes[0].collections
        if str(c.get_label()).startswith("dy clipped, beyond")
    ]
    assert np.any(
        np.isclose(np.concatenate(tops), [s.xy[-1, 0], 0.96 * 1.15 * largest]).all(
            axis=1
        )
    )
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("beyond ±" in t for t in labels)
    # Without fitted sources the axis falls back to all residuals.
    assert (
        plots.residual_limit(np.array([[3.0, -4.0]]), np.array([False])) == 1.15 * 4.0
    )
    assert plots.residual_limit(np.full((2, 2), np.nan), np.ones(2, bool)) == 1.0


def _overlapping_tick_labels(fig):
    """Pairs of tick labels, on any axis of ``fig``, whose boxes overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    clashes = []
    for k, ax in enumerate(fig.axes):
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            texts = [
                t
                for t in axis.get_majorticklabels() + axis.get_minorticklabels()
                if t.get_visible() and t.get_text()
            ]
            boxes = [t.get_window_extent(renderer) for t in texts]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    if boxes[i].overlaps(boxes[j]):
                        clashes.append(
                            (k, name, texts[i].get_text(), texts[j].get_text())
                        )
    return clashes


def test_tick_labels_never_overlap(aligned, image):
    figures = [
        plots.plot_residual_map(aligned, image=1),
        plots.plot_residuals(image),
        plots.plot_summary_table(aligned),
    ]
    # A long run with values over many decades, and a narrow figure.
    rows = [
        {
            "iteration": i,
            "image": name,
            "dx": 12.0 * 0.3**i,
            "dy": -3.0 * 0.3**i,
            "rot_x": 1e-3 * (-0.5) ** i + 123.456,
            "rot_y": 1e-3 * (-0.5) ** i + 123.456,
            "scale_x": 1.0 + 1e-6 * i,
            "scale_y": 1.0 + 1e-6 * i,
            "rmse": 0.15 + 0.4 * 0.5**i,
        }
        for name in ("a.fits", "b.fits")
        for i in range(1, 31)
    ]
    long_run = plots.plot_summary_table(rows)
    long_run.set_size_inches(6.0, 4.0)
    figures.append(long_run)
    for fig in figures:
        assert _overlapping_tick_labels(fig) == []
    # A short log axis gets a few plain labels (no minor or 10^n labels).
    rmse_axis = long_run.axes[3].yaxis
    assert rmse_axis.get_scale() == "log"
    labels = [t.get_text() for t in rmse_axis.get_majorticklabels() if t.get_text()]
    assert 2 <= len(labels) <= 5
    assert all(float(t) > 0 for t in labels)
    assert not [t for t in rmse_axis.get_minorticklabels() if t.get_text()]
    # The iteration axis keeps integer ticks.
    ticks = long_run.axes[3].get_xticks()
    np.testing.assert_array_equal(ticks, np.round(ticks))


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
    assert _overlapping_tick_labels(fig) == []


def test_gallery_recovers_a_known_lag():
    # A synthetic ImageFit whose cutout is the blot moved by a known lag.
    from subpixal_jax.geometry.cutouts import SourceCutouts
    from subpixal_jax.io import result as res
    from subpixal_jax.status import ImageOutcome, ImageStatus

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
        name="fake.fits",
        status=ImageOutcome(ImageStatus.SUCCESS),
        fit=None,
        sources=sources,
        irmse=np.nan,
        wcs_before={},
        wcs_after={},
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

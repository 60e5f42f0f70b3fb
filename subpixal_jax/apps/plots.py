"""Diagnostic figures of an alignment.

Every function returns a new :class:`matplotlib.figure.Figure` with an Agg
canvas attached: nothing goes through :mod:`matplotlib.pyplot`, no global
state (figure manager, interactive mode, ``rcParams``) is touched, and the
figures render headless. Save one with ``fig.savefig(path)``, or all of them
with :func:`write_figures`. Matplotlib is the optional ``plot`` extra
(``pip install subpixal-jax[plot]``); without it these functions raise
:class:`ImportError`.

Positions and fit residuals are in the fit frame (``wcslin`` pixels,
0-based), as in :class:`subpixal_jax.io.result.SourceMeasurements`. The fit maps
measured to predicted positions, ``xy ≈ T(uv) = M (uv − c) + c + s``; the
residual map's "before" panel shows the first iteration's ``xy − uv`` (the
misalignment the run started from) and its "after" panel the last
iteration's ``xy − T(uv)`` (what the alignment left).

Scales come from the sources the fit kept, never from the ones it clipped:
arrows are scaled by a high percentile of the fitted vector lengths and
outliers' arrows are capped (and marked), residual axes span the fitted
residuals and outliers sit on their edge. Every axis has a few major ticks
so that tick labels do not collide.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from subpixal_jax.geometry.transform import fit_affine
from subpixal_jax.io import result as res

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install subpixal-jax[plot]"

#: Summary-table columns that :func:`plot_summary_table` reads.
CONVERGENCE_COLUMNS = (
    "iteration",
    "image",
    "dx",
    "dy",
    "rot_x",
    "rot_y",
    "scale_x",
    "scale_y",
    "rmse",
)

_FITTED_COLOR = "C0"
_CLIPPED_COLOR = "0.55"
_OUTLIER_EDGE = "C3"
_FLAGGED_COLOR = "0.5"
#: At most this many major ticks per axis, so that tick labels never collide.
_MAX_TICKS = 5


def _figure(**kwargs):
    """Return a new Figure with an Agg canvas, or raise a helpful ImportError."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        msg = f"plotting needs matplotlib, the optional 'plot' extra: {INSTALL_HINT}"
        raise ImportError(msg) from exc
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _tidy_ticks(fig) -> None:
    """Thin every axis of ``fig`` to a few major ticks, so labels cannot collide.

    Linear axes get a :class:`~matplotlib.ticker.MaxNLocator`; log axes keep
    a few decade ticks, or, when they span under 1.5 decades, a few evenly
    spaced plainly labelled ones, and lose the minor-tick labels Matplotlib
    otherwise adds to short log axes.
    """
    from matplotlib import ticker

    for ax in fig.axes:
        for axis, limits in ((ax.xaxis, ax.get_xlim), (ax.yaxis, ax.get_ylim)):
            if axis.get_scale() == "log":
                lo, hi = sorted(limits())
                decades = math.log10(hi / lo) if lo > 0 and hi > 0 else math.inf
                if decades < 1.5:
                    # Too short for decade ticks (LogLocator would fall back
                    # to a dense linear locator): a few plain, even ticks.
                    axis.set_major_locator(
                        ticker.MaxNLocator(
                            nbins=_MAX_TICKS - 1, steps=[1, 2, 2.5, 5, 10]
                        )
                    )
                    axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
                else:
                    axis.set_major_locator(ticker.LogLocator(numticks=_MAX_TICKS + 1))
                axis.set_minor_formatter(ticker.NullFormatter())
            elif axis.get_scale() == "linear":
                axis.set_major_locator(
                    ticker.MaxNLocator(nbins=_MAX_TICKS, steps=[1, 2, 2.5, 5, 10])
                )


def _short_name(name: str) -> str:
    return pathlib.PurePath(str(name)).name


def _checked_image(image, name: str = "image") -> res.ImageFit:
    if not isinstance(image, res.ImageFit):
        msg = f"{name} must be an ImageFit, got {type(image).__name__}"
        raise TypeError(msg)
    if image.sources is None:
        msg = f"{name} ({image.name}) has no source measurements ({image.status})"
        raise ValueError(msg)
    return image


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        msg = f"{name} must be a positive int, got {value!r}"
        raise ValueError(msg)
    if value < 1:
        msg = f"{name} must be a positive int, got {value!r}"
        raise ValueError(msg)
    return int(value)


def fit_residuals(image: res.ImageFit) -> np.ndarray:
    """Residuals ``xy − (M (uv − c) + c + s)`` of an image's fit.

    Parameters
    ----------
    image : ImageFit
        One image's outcome with sources and a fit.

    Returns
    -------
    numpy.ndarray
        ``(N, 2)`` residuals in fit-frame pixels, one row per source (NaN for
        flagged sources and when the fit failed).

    Raises
    ------
    ValueError
        If ``image`` has no sources or no fit.
    """
    image = _checked_image(image)
    if image.fit is None:
        msg = f"image ({image.name}) has no fit ({image.status})"
        raise ValueError(msg)
    s = image.sources
    with np.errstate(invalid="ignore"):
        return s.xy - fit_affine(image.fit).apply(s.uv)


def _nice_length(value: float) -> float:
    """Round ``value`` to 1, 2 or 5 times a power of ten (for scale bars)."""
    if not (math.isfinite(value) and value > 0):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 5.0, 10.0):
        if value <= step * power * 1.5:
            return step * power
    return 10.0 * power


def _chip_outlines(ax, wcs_by_chip: Mapping[int, WCS], wcslin: WCS, name: str) -> None:
    """Draw each chip's border (the given WCSs) in the fit frame."""
    for extver, wcs in sorted(wcs_by_chip.items()):
        if wcs.pixel_shape is None:
            log.debug("chip %d of %s has no pixel shape: not outlined", extver, name)
            continue
        nx, ny = wcs.pixel_shape
        t = np.linspace(0.0, 1.0, 16)
        edge_x = np.concatenate([t * nx, np.full(16, nx), (1 - t) * nx, np.zeros(16)])
        edge_y = np.concatenate([np.zeros(16), t * ny, np.full(16, ny), (1 - t) * ny])
        world = wcs.all_pix2world(np.stack([edge_x, edge_y], axis=1) - 0.5, 0)
        border = wcslin.wcs_world2pix(world, 0)
        ax.plot(border[:, 0], border[:, 1], color="0.3", lw=0.8)
        ax.text(
            border[:, 0].mean(),
            border[:, 1].mean(),
            f"chip {extver}",
            color="0.3",
            ha="center",
            va="center",
            alpha=0.6,
        )


#: Percentile of the fitted sources' vector lengths that sets a map's scale.
SCALE_PERCENTILE = 90.0
#: Drawn length of the scale length, as a fraction of the sources' extent.
_SCALE_FRACTION = 0.1
#: Arrows longer than this many scale lengths are capped (and marked).
_CAP_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class VectorScale:
    """How a residual-map panel scales its arrows.

    Attributes
    ----------
    reference : float
        The :data:`SCALE_PERCENTILE` percentile of the fitted sources' vector
        lengths (fit-frame px), or of all measured ones when none was fitted.
    gain : float
        Drawn length (data units) per pixel of vector.
    cap : float
        Vector length (fit-frame px) beyond which an arrow is drawn capped.
    """

    reference: float
    gain: float
    cap: float

    @classmethod
    def from_vectors(
        cls, xy: np.ndarray, vectors: np.ndarray, fitted: np.ndarray
    ) -> VectorScale:
        """Scale the arrows from the fitted (kept) sources only.

        Clipped outliers, however long, do not change the scale: the fitted
        sources' high percentile does.
        """
        length = np.hypot(vectors[:, 0], vectors[:, 1])
        ok = np.isfinite(length)
        pool = length[ok & fitted] if np.any(ok & fitted) else length[ok]
        reference = float(np.percentile(pool, SCALE_PERCENTILE)) if pool.size else 1.0
        reference = reference if math.isfinite(reference) and reference > 0 else 1.0
        at = xy[np.all(np.isfinite(xy), axis=1)]
        extent = float(np.ptp(at, axis=0).max()) if len(at) > 1 else 100.0
        extent = extent if extent > 0 else 100.0
        return cls(
            reference, _SCALE_FRACTION * extent / reference, _CAP_FACTOR * reference
        )

    def capped(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the vectors shortened to :attr:`cap`, and which were."""
        length = np.hypot(vectors[:, 0], vectors[:, 1])
        over = length > self.cap
        factor = np.where(over, self.cap / np.where(over, length, 1.0), 1.0)
        return vectors * factor[:, None], over


def _vector_panel(
    ax,
    s: res.SourceMeasurements | None,
    vectors: np.ndarray | None,
    title: str,
    missing: str = "no measurement",
):
    """Draw ``vectors`` as arrows at the sources.

    Returns the panel's VectorScale and the Quiver for its scale bar, or
    None when nothing was measured.

    Fitted sources are blue arrows; sources the fit clipped are thin grey
    arrows from a red ring; flagged sources (no measurement) grey crosses.
    Arrows longer than the scale's cap are drawn at the cap with a red
    diamond at the tip.
    """
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.set_xlabel("x (fit-frame px)")
    ax.set_ylabel("y (fit-frame px)")
    if s is None or vectors is None:
        ax.text(0.5, 0.5, missing, transform=ax.transAxes, ha="center")
        return None
    at = np.all(np.isfinite(s.xy), axis=1)
    measured = at & np.all(np.isfinite(vectors), axis=1)
    fitted = measured & s.fitmask
    clipped = measured & ~s.fitmask
    flagged = at & ~measured
    if not measured.any():
        ax.text(0.5, 0.5, "no measurement", transform=ax.transAxes, ha="center")
        return None
    scale = VectorScale.from_vectors(
        s.xy[measured], vectors[measured], fitted[measured]
    )
    drawn, over = scale.capped(np.where(measured[:, None], vectors, 0.0))
    style = {"angles": "xy", "scale_units": "xy", "scale": 1.0 / scale.gain}
    key_quiver = None
    # gids name the artists (tests and users can find them).
    for sel, color, width, gid in (
        (fitted, _FITTED_COLOR, 0.004, "fitted"),
        (clipped, _CLIPPED_COLOR, 0.0025, "clipped"),
    ):
        if not sel.any():
            continue
        quiver = ax.quiver(
            s.xy[sel, 0],
            s.xy[sel, 1],
            drawn[sel, 0],
            drawn[sel, 1],
            color=color,
            width=width,
            gid=gid,
            **style,
        )
        key_quiver = key_quiver or quiver
    if clipped.any():
        ax.scatter(
            s.xy[clipped, 0],
            s.xy[clipped, 1],
            facecolors="none",
            edgecolors=_OUTLIER_EDGE,
            s=30,
            lw=0.8,
            zorder=3,
            gid="clipped rings",
        )
    if flagged.any():
        ax.scatter(
            s.xy[flagged, 0],
            s.xy[flagged, 1],
            marker="x",
            color=_FLAGGED_COLOR,
            s=20,
            gid="flagged",
        )
    tips = s.xy + drawn * scale.gain
    if over.any():
        ax.scatter(
            tips[over, 0],
            tips[over, 1],
            marker="D",
            s=14,
            color=_OUTLIER_EDGE,
            zorder=4,
            gid="capped tips",
        )
    # Quivers do not enter the data limits: add the arrow tips.
    ax.update_datalim(tips[measured])
    ax.autoscale_view()
    _vector_legend(ax, scale, fitted, clipped, flagged, over)
    return scale, key_quiver


def _scale_bar(ax, scale: VectorScale, quiver) -> None:
    """Add the scale bar at the panel's top left, once its limits are final."""
    bar = _nice_length(scale.reference)
    x0, x1 = ax.get_xlim()
    # labelpos "E" puts the arrow's tip at X: keep its tail inside the axes.
    tip = 0.04 + bar * scale.gain / abs(x1 - x0)
    ax.quiverkey(
        quiver,
        tip,
        0.94,
        bar,
        f"{bar:g} px",
        labelpos="E",
        coordinates="axes",
        color="k",
        fontproperties={"size": "small"},
    )


def _vector_legend(ax, scale, fitted, clipped, flagged, over) -> None:
    """Legend below a residual-map panel: what each marker is, and the scale."""
    from matplotlib.lines import Line2D

    arrow = r"$\rightarrow$"
    entries = (
        (fitted, {"marker": arrow, "color": _FITTED_COLOR, "ms": 14}, "fitted"),
        (
            clipped,
            {
                "marker": "o",
                "mfc": "none",
                "mec": _OUTLIER_EDGE,
                "color": _CLIPPED_COLOR,
            },
            "clipped by the fit (grey arrow)",
        ),
        (flagged, {"marker": "x", "color": _FLAGGED_COLOR}, "flagged, no measurement"),
        (
            over,
            {"marker": "D", "color": _OUTLIER_EDGE, "ms": 4},
            f"arrow capped at {scale.cap:.2g} px",
        ),
    )
    handles = [
        Line2D([], [], ls="none", label=f"{text} ({np.count_nonzero(sel)})", **style)
        for sel, style, text in entries
        if sel.any()
    ]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14),
        ncols=2,
        fontsize="small",
        title=(
            f"scale bar: p{SCALE_PERCENTILE:g} of fitted |vector| is "
            f"{scale.reference:.2g} px"
        ),
        title_fontsize="small",
        frameon=False,
    )


def _iteration_pair(
    before, after, image: int | str | None
) -> tuple[res.ImageFit, res.ImageFit | None, tuple[str, str], str, str]:
    """Resolve plot_residual_map's arguments to (first, last, titles, status, note)."""
    if isinstance(before, res.AlignmentResult):
        result = before
        if after is not None:
            msg = "after must be None when an AlignmentResult is given"
            raise TypeError(msg)
        if not result.history:
            msg = "the result keeps no iteration (history=None): no residual map"
            raise ValueError(msg)
        k = _image_index(result, 0 if image is None else image)
        first_it, last_it = result.history[0], result.history[-1]
        first, last = first_it.images[k], last_it.images[k]
        status = (
            str(result.final_status[k]) if result.final_status else str(last.status)
        )
        i0, i1 = first_it.iteration, last_it.iteration
        if i0 == i1:
            if result.n_iterations > 1:
                note = f"only iteration {i1} of {result.n_iterations} kept"
                titles = (
                    f"before: iteration {i1} displacements (earlier not kept)",
                    f"after: iteration {i1} fit residuals",
                )
            else:
                note = ""
                titles = ("before: displacements", "after: fit residuals")
        else:
            note = ""
            titles = (
                f"before: iteration {i0} displacements",
                f"after: iteration {i1} fit residuals",
            )
        return first, last, titles, status, note
    if image is not None:
        msg = "image selects an image of an AlignmentResult; pass ImageFits alone"
        raise TypeError(msg)
    first = _checked_image(before, "before")
    if after is None:
        titles = (
            "before fit: displacements (this iteration)",
            "after fit: residuals (this iteration)",
        )
        note = "one iteration given: 'before' is not the first iteration's"
        return first, first, titles, str(first.status), note
    last = _checked_image(after, "after")
    titles = (
        "before: first iteration displacements",
        "after: last iteration fit residuals",
    )
    return first, last, titles, str(last.status), ""


def _image_index(result: res.AlignmentResult, image: int | str) -> int:
    n = len(result.history[-1].images)
    if isinstance(image, str):
        matches = [
            k
            for k, name in enumerate(result.names)
            if image in (name, _short_name(name))
        ]
        if not matches:
            msg = f"no image named {image!r} in the result"
            raise ValueError(msg)
        return matches[0]
    if isinstance(image, bool) or not isinstance(image, int | np.integer):
        msg = f"image must be an index or a name, got {image!r}"
        raise TypeError(msg)
    if not -n <= image < n:
        msg = f"image index {image} out of range for {n} images"
        raise ValueError(msg)
    return int(image) % n


def plot_residual_map(
    before,
    after: res.ImageFit | None = None,
    *,
    image: int | str | None = None,
    wcslin: WCS | None = None,
):
    """Displacement vectors at the source positions, before and after alignment.

    Left: ``xy − uv``, the displacement measured for every source in the
    first iteration (before any correction). Right: the fit residuals
    ``xy − T(uv)`` of the last iteration (what the alignment left). Each
    panel scales its arrows from its fitted sources alone (the
    :data:`SCALE_PERCENTILE` percentile of their lengths, shown with the
    scale bar), so outliers do not shrink the arrows that matter; arrows
    longer than twice that are drawn capped with a diamond at the tip.
    Sources clipped by the fit are thin grey arrows from a red ring;
    flagged sources (no measurement) are grey crosses.

    Parameters
    ----------
    before : AlignmentResult or ImageFit
        The result (best with ``history='all'``; ``image`` picks the image),
        or the first iteration's ImageFit of one image. An ImageFit alone is
        drawn as before and after its own fit, and the title says so.
    after : ImageFit, optional
        The last iteration's ImageFit of the same image (with an ImageFit
        ``before`` only).
    image : int or str, optional
        With an AlignmentResult: the image's index (default 0) or name.
    wcslin : astropy.wcs.WCS, optional
        The fit frame (default: the result's ``wcslin``). When known, every
        chip's border is drawn (before its first correction on the left,
        after its last on the right).

    Returns
    -------
    matplotlib.figure.Figure
        Two axes, titled ``"before: ..."`` and ``"after: ..."``.

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    TypeError
        If the arguments are of the wrong kinds.
    ValueError
        If the result keeps no iteration, the image is unknown, or an
        ImageFit has no source measurements.
    """
    fig = _figure(figsize=(12.0, 6.5), layout="constrained")
    if isinstance(before, res.AlignmentResult) and wcslin is None:
        wcslin = before.wcslin
    first, last, titles, status, note = _iteration_pair(before, after, image)
    before_ax, after_ax = fig.subplots(1, 2, sharex=True, sharey=True)
    s0, s1 = first.sources, last.sources
    with np.errstate(invalid="ignore"):
        displacement = None if s0 is None else s0.xy - s0.uv
    residual = fit_residuals(last) if last.fit is not None and s1 is not None else None
    panels = (
        (before_ax, first, s0, displacement, titles[0], first.wcs_before),
        (after_ax, last, s1, residual, titles[1], last.wcs_after or last.wcs_before),
    )
    keys = []
    for ax, fit, s, vectors, title, outlines in panels:
        if wcslin is not None:
            _chip_outlines(ax, outlines, wcslin, fit.name)
        missing = "no fit" if s is not None and vectors is None else "no measurement"
        drawn = _vector_panel(ax, s, vectors, title, missing)
        if drawn is not None:
            keys.append((ax, *drawn))
    # Room above the sources for the scale bars.
    y0, y1 = before_ax.get_ylim()
    before_ax.set_ylim(y0, y1 + 0.12 * (y1 - y0))
    for ax, scale, quiver in keys:
        _scale_bar(ax, scale, quiver)
    n_src = 0 if s1 is None else s1.n_sources
    if last.fit is None:
        outcome = f"last iteration: no fit ({n_src} sources)"
    else:
        n_fit = int(np.count_nonzero(s1.fitmask))
        outcome = (
            f"last fit: {n_fit}/{n_src} sources fitted, "
            f"rmse {float(last.fit.rmse):.3g} px"
        )
    fig.suptitle(
        f"{_short_name(last.name)}: {status}\n{outcome}"
        + (f" ({note})" if note else "")
    )
    _tidy_ticks(fig)
    return fig


def _image_px_per_fit_px(image: res.ImageFit) -> float:
    """Image pixels per fit-frame pixel, from ``irmse / rmse`` (1 if unknown)."""
    rmse = math.nan if image.fit is None else float(image.fit.rmse)
    ratio = float(image.irmse) / rmse if rmse > 0 else math.nan
    return ratio if math.isfinite(ratio) and ratio > 0 else 1.0


def residual_limit(resid: np.ndarray, fitted: np.ndarray) -> float:
    """Half-range of a residual axis: 15 % beyond the largest fitted residual.

    Parameters
    ----------
    resid : numpy.ndarray
        ``(N, 2)`` residuals (NaN allowed).
    fitted : numpy.ndarray
        ``(N,)`` bool, the sources the fit kept.

    Returns
    -------
    float
        The limit (fit-frame px): every finite fitted residual lies within
        it; clipped outliers do not widen it (all finite residuals set it
        when none was fitted).
    """
    ok = np.all(np.isfinite(resid), axis=1)
    pool = resid[ok & fitted] if np.any(ok & fitted) else resid[ok]
    largest = float(np.max(np.abs(pool))) if pool.size else 0.0
    return 1.15 * largest if largest > 0 else 1.0


def plot_residuals(image: res.ImageFit):
    """Fit residuals against x, y and source weight, and their distribution.

    The first three panels show both components of ``xy − T(uv)`` (fit-frame
    pixels) against the predicted position and the fit weight (the catalog
    weight with its systematic floor, the best per-source brightness/S/N
    measure the result keeps); clipped sources are hollow. The residual axis
    spans the fitted sources (:func:`residual_limit`): clipped outliers
    beyond it are drawn on its edge as hollow triangles pointing their way.
    The weight axis is logarithmic when the weights span over a decade. The
    histogram
    shows the fitted sources' residuals in units of their expected scatter,
    ``r / sigma`` (residuals converted to image pixels by ``irmse / rmse``),
    against a unit normal.

    Parameters
    ----------
    image : ImageFit
        One image's outcome, with a fit.

    Returns
    -------
    matplotlib.figure.Figure
        Four axes titled "residual vs x", "residual vs y",
        "residual vs weight" and "normalised residuals".

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    TypeError
        If ``image`` is not an ImageFit.
    ValueError
        If ``image`` has no sources or no fit.
    """
    fig = _figure(figsize=(11.0, 8.0), layout="constrained")
    image = _checked_image(image)
    resid = fit_residuals(image)
    s = image.sources
    ok = np.all(np.isfinite(resid), axis=1)
    fitted = ok & s.fitmask
    clipped = ok & ~s.fitmask
    limit = residual_limit(resid, fitted)
    # Residuals beyond the axis (clipped outliers) sit on its edge, as
    # triangles pointing the way they went.
    edge = 0.96 * limit
    beyond = np.abs(resid) > limit
    shown = np.clip(resid, -edge, edge)
    axes = fig.subplots(2, 2)
    abscissae = (
        (axes[0, 0], s.xy[:, 0], "x", "x (fit-frame px)"),
        (axes[0, 1], s.xy[:, 1], "y", "y (fit-frame px)"),
        (axes[1, 0], s.weight, "weight", "fit weight (1/px²)"),
    )
    for ax, values, what, label in abscissae:
        for comp, color in ((0, "C0"), (1, "C1")):
            name = "xy"[comp]
            inside = clipped & ~beyond[:, comp]
            ax.scatter(
                values[fitted], resid[fitted, comp], s=12, color=color, label=f"d{name}"
            )
            ax.scatter(
                values[inside],
                resid[inside, comp],
                s=24,
                facecolors="none",
                edgecolors=color,
                label=f"d{name} clipped" if inside.any() else None,
            )
            edge_label = f"d{name} clipped, beyond ±{limit:.2g} px (▲/▼)"
            for sign, marker in ((1, "^"), (-1, "v")):
                out = clipped & beyond[:, comp] & (np.sign(resid[:, comp]) == sign)
                if not out.any():
                    continue
                ax.scatter(
                    values[out],
                    shown[out, comp],
                    s=36,
                    marker=marker,
                    facecolors="none",
                    edgecolors=color,
                    label=edge_label,
                )
                edge_label = None
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_ylim(-limit, limit)
        ax.set_title(f"residual vs {what}")
        ax.set_xlabel(label)
        ax.set_ylabel("residual (fit-frame px)")
    weights = s.weight[ok]
    if np.all(weights > 0) and weights.max() > 10.0 * weights.min():
        axes[1, 0].set_xscale("log")
    # One legend entry per kind of marker, not per panel.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes.ravel()[1:3]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    # Below the panels, where it hides no point.
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize="small")

    hist = axes[1, 1]
    hist.set_title("normalised residuals")
    with np.errstate(invalid="ignore", divide="ignore"):
        z = resid[fitted] * _image_px_per_fit_px(image) / s.sigma[fitted]
    bins = np.linspace(-5.0, 5.0, 41)
    grid = np.linspace(-5.0, 5.0, 201)
    width = bins[1] - bins[0]
    for comp, color in ((0, "C0"), (1, "C1")):
        values = z[:, comp][np.isfinite(z[:, comp])]
        if values.size:
            std = float(np.std(values))
            hist.hist(
                np.clip(values, bins[0], bins[-1]),
                bins=bins,
                histtype="step",
                color=color,
                label=f"d{'xy'[comp]}/σ (std {std:.2f})",
            )
            gauss = np.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi)
            hist.plot(grid, values.size * width * gauss, color=color, ls=":", lw=1)
    hist.set_xlabel("residual / expected σ (end bins: beyond ±5)")
    hist.set_ylabel("sources")
    hist.legend(fontsize="small")
    fig.suptitle(f"{_short_name(image.name)}: fit residuals ({image.status})")
    _tidy_ticks(fig)
    return fig


def _gallery_rows(image: res.ImageFit, n_sources: int) -> list[int]:
    """Return up to ``n_sources`` indices of measured sources with blots."""
    extras = image.extras or {}
    if image.sources is None or "cutouts" not in extras or "blots" not in extras:
        return []
    s = image.sources
    usable = [
        k
        for k, blots in enumerate(extras["blots"])
        if blots is not None and s.flags[k] == 0
    ]
    usable.sort(key=lambda k: (not s.fitmask[k], -float(s.weight[k])))
    return usable[:n_sources]


def _crop_lags(icc: np.ndarray, padded: tuple[int, int], true: tuple[int, int]):
    """Crop an interlaced map to the lags of the true size; return map, extent."""
    bounds = []
    for big, n in zip(padded, true, strict=True):
        centre = (big - 1) // 2
        lo = 2 * (centre - (n - 1) // 2)
        hi = 2 * (centre + n - 1 - (n - 1) // 2) + 1
        bounds.append((lo, hi, centre))
    (ylo, yhi, cy), (xlo, xhi, cx) = bounds
    extent = (
        xlo / 2 - cx - 0.25,
        xhi / 2 - cx + 0.25,
        ylo / 2 - cy - 0.25,
        yhi / 2 - cy + 0.25,
    )
    return icc[ylo : yhi + 1, xlo : xhi + 1], extent


def plot_gallery(image: res.ImageFit, *, n_sources: int = 4, cc_type: str = "NCC"):
    """Cutout, blot, difference and interlaced correlation of a few sources.

    Needs the diagnostics of ``align_images(..., keep_diagnostics=True)``
    (``image.extras['cutouts']`` and ``['blots']``). Rows are the heaviest
    fitted sources. The interlaced cross-correlation map is recomputed with
    :func:`subpixal_jax.core.xcorr.find_displacement_full` from the cutout
    and the four blots (without the validity masks the alignment used), on
    a half-pixel grid of lags in image pixels; ``+`` marks the displacement
    the alignment measured, ``x`` the peak fitted on this map.

    Parameters
    ----------
    image : ImageFit
        One image's outcome, with diagnostics.
    n_sources : int, optional
        Maximum number of sources (rows).
    cc_type : {'CC', 'NCC', 'ZNCC'}, optional
        Normalisation of the recomputed map (use the alignment's).

    Returns
    -------
    matplotlib.figure.Figure
        ``4 * rows`` axes; in each row the titles "cutout", "blot",
        "cutout − blot" and "interlaced CC".

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    TypeError
        If ``image`` is not an ImageFit.
    ValueError
        If ``n_sources`` is not a positive int, or ``image`` has no
        diagnostics or no usable source.
    """
    from subpixal_jax.core.xcorr import find_displacement_full

    n_sources = _positive_int(n_sources, "n_sources")
    image = _checked_image(image)
    rows = _gallery_rows(image, n_sources)
    if not rows:
        msg = (
            f"image ({image.name}) has no source with diagnostics: align with "
            "keep_diagnostics=True"
        )
        raise ValueError(msg)
    fig = _figure(figsize=(11.0, 2.7 * len(rows)), layout="constrained")
    cutouts = image.extras["cutouts"]
    blots = image.extras["blots"]
    s = image.sources
    shape = tuple(max(cutouts[k].shape[i] for k in rows) for i in (0, 1))
    axes = fig.subplots(len(rows), 4, squeeze=False)
    for row, k in zip(axes, rows, strict=True):
        cut = cutouts[k]
        data = np.where(cut.image_valid, cut.image, np.nan).astype(np.float32)
        blot = np.asarray(blots[k], dtype=np.float32)
        ny, nx = cut.shape
        pad = ((0, shape[0] - ny), (0, shape[1] - nx))
        found = find_displacement_full(
            np.pad(np.nan_to_num(data), pad),
            *(np.pad(b, pad) for b in blot),
            cc_type=cc_type,
            shape=np.array([ny, nx]),
        )
        icc, extent = _crop_lags(np.asarray(found.icc), shape, (ny, nx))
        finite = data[np.isfinite(data)]
        vmin, vmax = np.percentile(finite, [1.0, 99.5]) if finite.size else (None, None)
        shown = (
            (data, "cutout", {"vmin": vmin, "vmax": vmax}),
            (blot[0], "blot", {"vmin": vmin, "vmax": vmax}),
            (data - blot[0], "cutout − blot", {"cmap": "RdBu_r"}),
        )
        for ax, (values, title, style) in zip(row[:3], shown, strict=True):
            if title == "cutout − blot":
                limit = (
                    float(np.nanmax(np.abs(values)))
                    if np.isfinite(values).any()
                    else 1.0
                )
                style = {**style, "vmin": -limit, "vmax": limit}
            ax.imshow(values, origin="lower", interpolation="nearest", **style)
            ax.set_title(title)
        row[0].set_ylabel(f"source {int(s.src_id[k])}, chip {int(s.extver[k])}")
        cc_ax = row[3]
        cc_ax.imshow(icc, origin="lower", extent=extent, interpolation="nearest")
        cc_ax.plot(*s.dxdy[k], "+", color="w", ms=12, mew=2, label="measured")
        cc_ax.plot(
            float(found.dx), float(found.dy), "x", color="r", ms=8, label="map peak"
        )
        cc_ax.set_title("interlaced CC")
        cc_ax.set_xlabel(f"dx = {s.dxdy[k, 0]:+.3f} ± {s.sigma[k, 0]:.3f} px")
        cc_ax.set_ylabel(f"dy = {s.dxdy[k, 1]:+.3f} ± {s.sigma[k, 1]:.3f} px")
    axes[0, 3].legend(fontsize="x-small", loc="upper right")
    fig.suptitle(f"{_short_name(image.name)}: source diagnostics ({cc_type})")
    _tidy_ticks(fig)
    return fig


def _summary_table(summary) -> Table:
    if isinstance(summary, res.AlignmentResult):
        table = summary.to_table()
    elif isinstance(summary, Table):
        table = summary
    elif isinstance(summary, str | os.PathLike):
        table = Table.read(summary, format="ascii.ecsv")
    elif isinstance(summary, Sequence) and all(isinstance(r, Mapping) for r in summary):
        table = Table(rows=list(summary)) if summary else Table()
    else:
        msg = (
            "summary must be an AlignmentResult, an astropy Table, a list of "
            f"row dicts or the path of an ECSV summary, got {type(summary).__name__}"
        )
        raise TypeError(msg)
    missing = [c for c in CONVERGENCE_COLUMNS if c not in table.colnames]
    if missing:
        msg = f"summary lacks the column(s) {missing}"
        raise ValueError(msg)
    return table


def plot_summary_table(summary):
    """Shift, rotation, scale and fit RMS of every image against iteration.

    Draws from the summary table alone, so a saved ECSV summary
    (``AlignmentResult.write_summary``) redraws the same figure. Each panel
    has one line per image that has a finite value there (the reference
    image and failed iterations have none).

    Parameters
    ----------
    summary : AlignmentResult, astropy.table.Table, list of dict, str or path
        The result, its :meth:`~subpixal_jax.io.result.AlignmentResult.to_table`,
        its ``summary`` rows, or the path of an ECSV summary.

    Returns
    -------
    matplotlib.figure.Figure
        Four axes titled "shift", "rotation", "scale" and "fit rmse".

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    TypeError
        If ``summary`` is none of the accepted kinds.
    ValueError
        If the table lacks a column of :data:`CONVERGENCE_COLUMNS`.

    Examples
    --------
    >>> rows = [
    ...     {"iteration": i, "image": name, "dx": d, "dy": -d, "rot_x": 0.01 / i,
    ...      "rot_y": 0.01 / i, "scale_x": 1.0, "scale_y": 1.0, "rmse": 0.05}
    ...     for name, d0 in (("a.fits", 1.0), ("b.fits", -0.5))
    ...     for i, d in ((1, d0), (2, d0 / 10))]
    >>> fig = plot_summary_table(rows)
    >>> [ax.get_title() for ax in fig.axes]
    ['shift', 'rotation', 'scale', 'fit rmse']
    >>> len(fig.axes[0].get_lines())
    2
    """
    fig = _figure(figsize=(11.0, 7.0), layout="constrained")
    table = _summary_table(summary)
    names = list(dict.fromkeys(str(n) for n in table["image"]))

    def column(sel, name):
        return np.asarray(table[name][sel], dtype=float)

    panels = (
        (
            "shift",
            "|shift| (fit-frame px)",
            lambda m: np.hypot(column(m, "dx"), column(m, "dy")),
        ),
        (
            "rotation",
            "mean rotation (deg)",
            lambda m: 0.5 * (column(m, "rot_x") + column(m, "rot_y")),
        ),
        (
            "scale",
            "mean scale − 1",
            lambda m: 0.5 * (column(m, "scale_x") + column(m, "scale_y")) - 1.0,
        ),
        ("fit rmse", "rmse (fit-frame px)", lambda m: column(m, "rmse")),
    )
    axes = fig.subplots(2, 2, sharex=True).ravel()
    image_col = np.array([str(n) for n in table["image"]])
    for ax, (title, label, values_of) in zip(axes, panels, strict=True):
        for k, name in enumerate(names):
            sel = image_col == name
            its = np.asarray(table["iteration"][sel], dtype=int)
            values = values_of(sel)
            if not np.isfinite(values).any():
                continue
            ax.plot(
                its, values, marker="o", color=f"C{k % 10}", label=_short_name(name)
            )
        ax.set_title(title)
        ax.set_ylabel(label)
        finite = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [[]])
        finite = finite[np.isfinite(finite)]
        if title in ("shift", "fit rmse") and finite.size and np.all(finite > 0):
            ax.set_yscale("log")
    if axes[0].get_lines():
        axes[0].legend(fontsize="small")
    status = table.meta.get("status")
    fig.suptitle("convergence" + (f" ({status})" if status else ""))
    _tidy_ticks(fig)
    for ax in axes[2:]:
        ax.set_xlabel("iteration")
        # The x axis is shared: this sets the integer ticks of all four.
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def _slug(name: str) -> str:
    stem = _short_name(name)
    stem = re.sub(r"(\.fits|\.fit|\.fts)?(\.gz)?$", "", stem, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "image"


def _check_dpi(dpi) -> float:
    if isinstance(dpi, bool) or not isinstance(dpi, int | float) or not dpi > 0:
        msg = f"dpi must be a positive number, got {dpi!r}"
        raise ValueError(msg)
    return float(dpi)


def _save(fig, path: pathlib.Path, dpi: float) -> pathlib.Path:
    fig.savefig(path, dpi=dpi)
    log.info("wrote %s", path)
    return path


def write_figures(
    result: res.AlignmentResult,
    outdir,
    *,
    prefix: str = "subpixal",
    dpi: float = 100,
    n_gallery: int = 4,
    cc_type: str = "NCC",
) -> list[pathlib.Path]:
    """Write every diagnostic figure of an alignment as PNG files.

    Writes ``<prefix>_convergence.png`` and, for every image of the last
    kept iteration that has source measurements,
    ``<prefix>_<k>_<name>_residual_map.png`` (first kept iteration's
    displacements against the last one's fit residuals, chips outlined when
    the result records its fit frame, ``result.wcslin``),
    ``..._residuals.png`` (the last iteration's, when it has a fit) and
    ``..._gallery.png`` (when the alignment kept diagnostics); ``k`` is the
    image's 0-based input index.

    Parameters
    ----------
    result : AlignmentResult
        What :func:`subpixal_jax.align_images` returned.
    outdir : str or path
        Output directory; created if missing.
    prefix : str, optional
        File-name prefix.
    dpi : float, optional
        Resolution of the PNG files.
    n_gallery : int, optional
        Sources per gallery.
    cc_type : {'CC', 'NCC', 'ZNCC'}, optional
        The alignment's ``cc_type``, for the gallery's correlation maps.

    Returns
    -------
    list of pathlib.Path
        The files written, in the order above.

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    TypeError
        If ``result`` is not an AlignmentResult.
    ValueError
        If ``dpi`` or ``n_gallery`` is not positive.
    """
    if not isinstance(result, res.AlignmentResult):
        msg = f"result must be an AlignmentResult, got {type(result).__name__}"
        raise TypeError(msg)
    dpi = _check_dpi(dpi)
    n_gallery = _positive_int(n_gallery, "n_gallery")
    outdir = pathlib.Path(outdir)
    summary = plot_summary_table(result)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [_save(summary, outdir / f"{prefix}_convergence.png", dpi)]
    wcslin = result.wcslin
    images = result.history[-1].images if result.history else []
    if not images:
        log.info("result keeps no iteration (history=None): only the convergence plot")
    for k, image in enumerate(images):
        if image.sources is None:
            continue
        stem = outdir / f"{prefix}_{k:03d}_{_slug(image.name)}"
        figures: list[tuple[str, Any]] = [
            ("residual_map", plot_residual_map(result, image=k, wcslin=wcslin))
        ]
        if image.fit is not None:
            figures.append(("residuals", plot_residuals(image)))
        if _gallery_rows(image, n_gallery):
            figures.append(
                ("gallery", plot_gallery(image, n_sources=n_gallery, cc_type=cc_type))
            )
        for kind, fig in figures:
            paths.append(_save(fig, pathlib.Path(f"{stem}_{kind}.png"), dpi))
    return paths

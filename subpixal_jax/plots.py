"""Diagnostic figures of an alignment.

Every function returns a new :class:`matplotlib.figure.Figure` with an Agg
canvas attached: nothing goes through :mod:`matplotlib.pyplot`, no global
state (figure manager, interactive mode, ``rcParams``) is touched, and the
figures render headless. Save one with ``fig.savefig(path)``, or all of them
with :func:`write_figures`. Matplotlib is the optional ``plot`` extra
(``pip install subpixal-jax[plot]``); without it these functions raise
:class:`ImportError`.

Positions and fit residuals are in the fit frame (``wcslin`` pixels,
0-based), as in :class:`subpixal_jax.result.SourceMeasurements`. The fit maps
measured to predicted positions, ``xy ≈ T(uv) = M (uv − c) + c + s``; "before
the fit" shows ``xy − uv`` (the residual of the identity) and "after the fit"
``xy − T(uv)``.
"""

from __future__ import annotations

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

from subpixal_jax import result as res
from subpixal_jax.transform import fit_affine

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
_CLIPPED_COLOR = "C3"
_FLAGGED_COLOR = "0.5"


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


def _chip_outlines(ax, image: res.ImageFit, wcslin: WCS) -> None:
    """Draw each chip's border (its WCS before the fit) in the fit frame."""
    for extver, wcs in sorted(image.wcs_before.items()):
        if wcs.pixel_shape is None:
            log.debug(
                "chip %d of %s has no pixel shape: not outlined", extver, image.name
            )
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


def _vector_panel(ax, s: res.SourceMeasurements, vectors: np.ndarray, title: str):
    """Quiver of ``vectors`` at the sources; return the Quiver (or None)."""
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.set_xlabel("x (fit-frame px)")
    ax.set_ylabel("y (fit-frame px)")
    at = np.all(np.isfinite(s.xy), axis=1)
    good = at & np.all(np.isfinite(vectors), axis=1)
    flagged = at & ~good
    if flagged.any():
        ax.scatter(
            s.xy[flagged, 0],
            s.xy[flagged, 1],
            marker="x",
            color=_FLAGGED_COLOR,
            label="flagged",
        )
    if not good.any():
        ax.text(0.5, 0.5, "no measurement", transform=ax.transAxes, ha="center")
        return None
    xy, vec = s.xy[good], vectors[good]
    fitted = s.fitmask[good]
    length = np.hypot(vec[:, 0], vec[:, 1])
    typical = float(np.median(length[fitted] if fitted.any() else length))
    typical = typical if typical > 0 else 1.0
    extent = float(np.ptp(xy, axis=0).max()) if len(xy) > 1 else 100.0
    extent = extent if extent > 0 else 100.0
    gain = 0.06 * extent / typical
    colors = np.where(fitted, _FITTED_COLOR, _CLIPPED_COLOR)
    quiver = ax.quiver(
        xy[:, 0],
        xy[:, 1],
        vec[:, 0],
        vec[:, 1],
        color=list(colors),
        angles="xy",
        scale_units="xy",
        scale=1.0 / gain,
        width=0.004,
    )
    if (~fitted).any():
        ax.scatter(
            xy[~fitted, 0],
            xy[~fitted, 1],
            facecolors="none",
            edgecolors=_CLIPPED_COLOR,
            s=30,
            label="clipped",
        )
    bar = _nice_length(2.0 * typical)
    ax.quiverkey(
        quiver, 0.82, 1.06, bar, f"{bar:g} px", labelpos="E", coordinates="axes"
    )
    if flagged.any() or (~fitted).any():
        ax.legend(loc="lower right", fontsize="small")
    return quiver


def plot_residual_map(image: res.ImageFit, *, wcslin: WCS | None = None):
    """Displacement vectors at the source positions, before and after the fit.

    Left: ``xy − uv``, the measured displacement of every source in the fit
    frame. Right: the fit residuals ``xy − T(uv)``. Each panel has its own
    scale bar (a quiver key, in fit-frame pixels). Sources clipped by the fit
    are drawn in red and circled; flagged sources (no measurement) are
    marked with a grey ``x``.

    Parameters
    ----------
    image : ImageFit
        One image's outcome (e.g. ``result.history[-1].images[k]``).
    wcslin : astropy.wcs.WCS, optional
        The fit frame of the alignment (``AlignmentResult.wcslin``). When
        given, every chip's border (its WCS before this iteration's
        correction) is drawn.

    Returns
    -------
    matplotlib.figure.Figure
        Two axes titled "before fit" and "after fit".

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    TypeError
        If ``image`` is not an ImageFit.
    ValueError
        If ``image`` has no source measurements.
    """
    fig = _figure(figsize=(12.0, 5.5), layout="constrained")
    image = _checked_image(image)
    s = image.sources
    before_ax, after_ax = fig.subplots(1, 2, sharex=True, sharey=True)
    with np.errstate(invalid="ignore"):
        before = s.xy - s.uv
    after = (
        fit_residuals(image) if image.fit is not None else np.full_like(s.xy, np.nan)
    )
    for ax, vectors, title in (
        (before_ax, before, "before fit"),
        (after_ax, after, "after fit"),
    ):
        if wcslin is not None:
            _chip_outlines(ax, image, wcslin)
        _vector_panel(ax, s, vectors, title)
    rmse = math.nan if image.fit is None else float(image.fit.rmse)
    fig.suptitle(
        f"{_short_name(image.name)}: {image.status}, "
        f"{int(np.count_nonzero(s.fitmask))}/{s.n_sources} sources fitted, "
        f"rmse {rmse:.3g} px"
    )
    return fig


def _image_px_per_fit_px(image: res.ImageFit) -> float:
    """Image pixels per fit-frame pixel, from ``irmse / rmse`` (1 if unknown)."""
    rmse = math.nan if image.fit is None else float(image.fit.rmse)
    ratio = float(image.irmse) / rmse if rmse > 0 else math.nan
    return ratio if math.isfinite(ratio) and ratio > 0 else 1.0


def plot_residuals(image: res.ImageFit):
    """Fit residuals against x, y and source weight, and their distribution.

    The first three panels show both components of ``xy − T(uv)`` (fit-frame
    pixels) against the predicted position and the fit weight (the catalog
    weight with its systematic floor, the best per-source brightness/S/N
    measure the result keeps); clipped sources are hollow. The histogram
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
    axes = fig.subplots(2, 2)
    abscissae = (
        (axes[0, 0], s.xy[:, 0], "x", "x (fit-frame px)"),
        (axes[0, 1], s.xy[:, 1], "y", "y (fit-frame px)"),
        (axes[1, 0], s.weight, "weight", "fit weight (1/px²)"),
    )
    for ax, values, what, label in abscissae:
        for comp, color in ((0, "C0"), (1, "C1")):
            name = "xy"[comp]
            ax.scatter(
                values[fitted], resid[fitted, comp], s=12, color=color, label=f"d{name}"
            )
            ax.scatter(
                values[clipped],
                resid[clipped, comp],
                s=24,
                facecolors="none",
                edgecolors=color,
                label=f"d{name} clipped" if clipped.any() else None,
            )
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_title(f"residual vs {what}")
        ax.set_xlabel(label)
        ax.set_ylabel("residual (fit-frame px)")
    if np.any(s.weight[ok] > 0) and np.ptp(s.weight[ok]) > 0:
        axes[1, 0].set_xscale("log")
    axes[0, 0].legend(fontsize="small")

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
    hist.set_xlabel("residual / expected σ (values beyond ±5 in the end bins)")
    hist.set_ylabel("sources")
    hist.legend(fontsize="small")
    fig.suptitle(f"{_short_name(image.name)}: fit residuals ({image.status})")
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
        The result, its :meth:`~subpixal_jax.result.AlignmentResult.to_table`,
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
    for ax in axes[2:]:
        ax.set_xlabel("iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
    if axes[0].get_lines():
        axes[0].legend(fontsize="small")
    status = table.meta.get("status")
    fig.suptitle("convergence" + (f" ({status})" if status else ""))
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
    kept iteration that has source measurements (chips outlined when the
    result records its fit frame, ``result.wcslin``),
    ``<prefix>_<k>_<name>_residual_map.png``, ``..._residuals.png`` (when it
    has a fit) and ``..._gallery.png`` (when the alignment kept diagnostics);
    ``k`` is the image's 0-based input index.

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
            ("residual_map", plot_residual_map(image, wcslin=wcslin))
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

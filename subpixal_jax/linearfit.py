"""Host wrapper around the jitted linear fit: numpy in, numpy out.

:func:`iter_linear_fit` takes the real points only (no padding), checks its
arguments, pads them to a source bucket so that fits of similar size share a
compilation, runs :func:`subpixal_jax.core.linfit.iter_linear_fit_batch` on a
batch of one in float64, and turns a bad status into an exception when asked.
"""

from __future__ import annotations

import jax
import numpy as np
from numpy.typing import ArrayLike

from subpixal_jax.core import linfit
from subpixal_jax.core.batch import source_bucket
from subpixal_jax.core.linfit import STATUS_MESSAGES, FitStatus, LinearFit
from subpixal_jax.errors import NotEnoughPointsError, SingularMatrixError
from subpixal_jax.kernel_store import call_stored

__all__ = ["iter_linear_fit"]


def _points(name: str, value: ArrayLike) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        msg = f"{name} must have shape (N, 2), got {arr.shape}"
        raise ValueError(msg)
    return arr


def _weights(name: str, value: ArrayLike | None, n: int) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (n,):
        msg = f"{name} must have shape ({n},) to match xy, got {arr.shape}"
        raise ValueError(msg)
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        msg = f"{name} must be finite and non-negative, got {arr[bad][0]!r}"
        raise ValueError(msg)
    return arr


def _combined(wxy: np.ndarray | None, wuv: np.ndarray | None) -> np.ndarray | None:
    """One weight per point: ``1/w = 1/wxy + 1/wuv`` when both are given."""
    if wxy is None or wuv is None:
        return wuv if wxy is None else wxy
    both = (wxy > 0) & (wuv > 0)
    out = np.zeros_like(wxy)
    out[both] = wxy[both] * wuv[both] / (wxy[both] + wuv[both])
    return out


def iter_linear_fit(  # noqa: PLR0913  # seed signature
    xy: ArrayLike,
    uv: ArrayLike,
    wxy: ArrayLike | None = None,
    wuv: ArrayLike | None = None,
    *,
    fitgeom: str = "general",
    center: ArrayLike | None = None,
    nclip: int | None = 3,
    sigma: float | tuple[float, str] = 3.0,
    clip_accum: bool = False,
    throw: bool = True,
) -> LinearFit:
    """Fit ``xy ≈ M (uv − c) + c + s`` with sigma clipping (tweakwcs-compatible).

    The drop-in counterpart of ``tweakwcs.linearfit.iter_linear_fit`` (0.9.3)
    for real points given as numpy arrays; see
    :func:`subpixal_jax.core.linfit.iter_linear_fit` for the model, the
    clipping rules and the deviations from tweakwcs.

    Parameters
    ----------
    xy, uv : array_like, shape (N, 2)
        Point positions ``(x, y)``; ``uv`` is mapped onto ``xy``.
    wxy, wuv : array_like, shape (N,), optional
        Non-negative finite weights of ``xy`` and ``uv``; with both, the
        weight is ``wxy·wuv/(wxy + wuv)``. Zero-weight points are left out.
    fitgeom : {'shift', 'rshift', 'rscale', 'general'}, optional
        Fit geometry.
    center : array_like, shape (2,), optional
        Centre ``c``; default the mean of the ``uv`` points with positive
        weight (tweakwcs' choice).
    nclip : int or None, optional
        Maximum number of clipping passes (None means 0).
    sigma : float or (float, {'rmse', 'mae', 'std'}), optional
        Clipping threshold, in units of ``'rmse'`` unless a statistic is named.
    clip_accum : bool, optional
        If True, rejected points stay rejected.
    throw : bool, optional
        Raise on a failed fit (default) instead of returning its status.

    Returns
    -------
    LinearFit
        Fields as numpy values (0-d arrays for scalars). ``resids`` has shape
        ``(N, 2)`` and covers every point, clipped or not (tweakwcs returns
        only the fitted rows: use ``resids[fitmask]``); ``fitmask`` has
        shape ``(N,)``.

    Raises
    ------
    ValueError
        Bad shapes, mismatched lengths, negative or non-finite weights, an
        unknown ``fitgeom``, a negative ``nclip`` or a non-positive ``sigma``.
    NotEnoughPointsError
        With ``throw=True``, when fewer points have positive weight than
        ``fitgeom`` needs (:data:`~subpixal_jax.core.linfit.FITGEOM_MIN_POINTS`).
    SingularMatrixError
        With ``throw=True``, when the fit is singular or not finite.

    Examples
    --------
    >>> import numpy as np
    >>> uv = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    >>> fit = iter_linear_fit(uv + [2.0, -1.0], uv, fitgeom="rscale")
    >>> fit.shift.round(9).tolist(), float(fit.mean_scale.round(9))
    ([2.0, -1.0], 1.0)
    """
    fitgeom = linfit._check_fitgeom(fitgeom)
    nclip = linfit._check_nclip(nclip)
    nsigma, stat_index = linfit._parse_sigma(sigma)
    if not isinstance(throw, bool):
        msg = f"throw must be a bool, got {throw!r}"
        raise ValueError(msg)
    xy = _points("xy", xy)
    uv = _points("uv", uv)
    n = xy.shape[0]
    if uv.shape[0] != n:
        msg = f"uv must have as many points as xy ({n}), got {uv.shape[0]}"
        raise ValueError(msg)
    weights = _combined(_weights("wxy", wxy, n), _weights("wuv", wuv, n))
    use = np.ones(n, dtype=bool) if weights is None else weights > 0
    if center is None:
        # With no usable point the fit reports NOT_ENOUGH_POINTS.
        center = uv[use].mean(axis=0) if use.any() else np.full(2, np.nan)
    else:
        center = np.asarray(center, dtype=np.float64)
        if center.shape != (2,) or not np.isfinite(center).all():
            msg = f"center must be two finite numbers, got {center!r}"
            raise ValueError(msg)
    bucket = source_bucket(n)
    pad = ((0, bucket - n), (0, 0))
    valid = np.zeros((1, bucket), dtype=bool)
    valid[0, :n] = True
    with jax.enable_x64(True):  # float64 inputs reach the stored kernel whole
        arguments = linfit.fit_batch_arguments(
            np.pad(xy, pad)[None],
            np.pad(uv, pad)[None],
            None if weights is None else np.pad(weights, pad[0])[None],
            valid,
            center[None],
            nclip=nclip,
            sigma=nsigma,
            sigma_stat=linfit.SIGMA_STATS[stat_index],
            clip_accum=bool(clip_accum),
        )
        batch = call_stored(linfit.iter_fit_kernel, *arguments, fitgeom=fitgeom)
        fit = LinearFit(*(np.asarray(field)[0] for field in batch))
    fit = fit._replace(resids=fit.resids[:n], fitmask=fit.fitmask[:n])
    status = FitStatus(int(fit.status))
    if throw and status != FitStatus.OK:
        error = (
            NotEnoughPointsError
            if status == FitStatus.NOT_ENOUGH_POINTS
            else SingularMatrixError
        )
        msg = (
            f"'{fitgeom}' fit of {n} points failed: {STATUS_MESSAGES[status]} "
            f"({int(fit.npoints)} points used, "
            f"{linfit.FITGEOM_MIN_POINTS[fitgeom]} needed)"
        )
        raise error(msg)
    return fit

"""Clipped, weighted linear fits between two 2-D point sets, in fixed shapes.

The model (tweakwcs 0.9.3, docs/original.md §6.2) maps ``uv`` onto ``xy`` about a centre
``c``::

    xy_k ≈ M · (uv_k − c) + c + s

and minimises ``Σ_k w_k ‖xy_k − (M (uv_k − c) + c + s)‖²``. The geometries are

``shift``
    ``M = I``; only ``s`` is fitted.
``rshift``
    ``M`` a rotation, proper or with a flip; scale fixed at 1.
``rscale``
    ``M`` a rotation times one scale, proper or with a flip (geomap's
    ``rscale``).
``general``
    ``M`` any 2x2 matrix (six-parameter affine fit).

Points are never removed: every array keeps its padded length ``N`` and a
validity mask says which entries are real, so a batch of images with
different source counts, padded to one bucket, compiles once. Failures are
data: every fit carries an integer :class:`FitStatus`, and its numbers are NaN
whenever the status is not ``OK``.

Deviations from tweakwcs 0.9.3 (each deliberate, see docs/original.md §9.14):

* ``rscale``/``rshift``: tweakwcs sets the rotation angle to 0 whenever its
  numerator equals its denominator, which turns an exact 45° rotation into a
  wrong fit. Here the angle is always ``atan2(num, den)``.
* Arithmetic is float64 (tweakwcs uses longdouble); coordinates are centred
  on ``c`` and again on their weighted means before any sums are formed, and
  the ``general`` normal equations are solved in that doubly centred frame,
  so results agree with tweakwcs to about 1e-12 relative.
* Singularity is tested relative to the data's spread (condition number
  above ``1 / SINGULAR_RTOL``) rather than by an exact zero pivot, so
  collinear points give ``SINGULAR`` instead of garbage. ``rshift`` is also
  flagged when all points coincide (its rotation is then undetermined).
* The ``'mad'`` clipping statistic is not offered.
"""

from __future__ import annotations

import enum
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

#: Minimum number of (positively weighted) points each fit geometry needs.
#: The keys are the supported ``fitgeom`` values (tweakwcs'
#: ``SUPPORTED_FITGEOM_MODES``).
FITGEOM_MIN_POINTS: dict[str, int] = {
    "shift": 1,
    "rshift": 2,
    "rscale": 2,
    "general": 3,
}

#: Number of fitted parameters per geometry; see :class:`LinearFit` for the
#: order of each parameter vector.
FITGEOM_NPARAMS: dict[str, int] = {"shift": 2, "rshift": 3, "rscale": 4, "general": 6}

#: Statistics that ``sigma`` may be expressed in, in the order of the codes
#: passed to the kernels.
SIGMA_STATS: tuple[str, ...] = ("rmse", "mae", "std")

#: Relative threshold below which a fit's normal matrix counts as singular.
SINGULAR_RTOL = 1e-12


class FitStatus(enum.IntEnum):
    """Outcome code of one fit."""

    OK = 0
    NOT_ENOUGH_POINTS = 1
    SINGULAR = 2
    NON_FINITE = 3


#: A human-readable message for every :class:`FitStatus`.
STATUS_MESSAGES: dict[FitStatus, str] = {
    FitStatus.OK: "success",
    FitStatus.NOT_ENOUGH_POINTS: "fewer valid points than the fit geometry needs",
    FitStatus.SINGULAR: "singular normal equations (collinear or coincident points)",
    FitStatus.NON_FINITE: "non-finite fit parameters (non-finite input?)",
}


class LinearFit(NamedTuple):
    """Result of a (clipped) linear fit; tweakwcs field names.

    Shapes are for one image; the batched entry point adds a leading axis
    ``B`` to every field. Angles are in degrees. When ``status`` is not
    ``FitStatus.OK`` every floating-point field except ``center`` is NaN.

    Attributes
    ----------
    shift : Array, shape (2,)
        ``s`` in ``xy ≈ M (uv − c) + c + s``.
    matrix : Array, shape (2, 2)
        ``M`` (tweakwcs >= 0.6 convention: ``x' = M[0, 0] u + M[0, 1] v``).
    proper_rot : Array, shape ()
        Rotation angle as if the rotation were proper.
    rot : Array, shape (2,)
        ``(rotx, roty)``, rotations of the X and Y axes, in (−180, 180].
    mean_rot : Array, shape ()
        Arithmetic mean of ``rot`` (tweakwcs ``<rot>``).
    scale : Array, shape (2,)
        ``(sx, sy)``, scales along the X and Y axes.
    mean_scale : Array, shape ()
        ``sqrt(|det M|)`` (tweakwcs ``<scale>``).
    skew : Array, shape ()
        ``roty − rotx`` wrapped to [−180, 180); 0 for a proper rotation.
    proper : Array of bool, shape ()
        True when ``det M >= 0``.
    rmse, mae, std : Array, shape ()
        Residual statistics over the fitted points (docs/original.md §6.3; weighted when
        weights were given).
    resids : Array, shape (N, 2)
        ``xy − (M (uv − c) + c + s)`` for every valid point, clipped ones
        included; NaN for a point with non-finite input; 0 for padding.
    fitmask : Array of bool, shape (N,)
        Points used in the final fit.
    center : Array, shape (2,)
        The centre ``c``.
    eff_nclip : Array of int32, shape ()
        Number of clipping passes that changed the fit.
    covariance : Array, shape (P, P)
        Covariance of the fitted parameter vector, ``σ̂² (Jᵀ W J)⁻¹``, with
        ``J`` the model's Jacobian at the solution, ``W`` the weights and
        ``σ̂² = Σ w_k ‖r_k‖² / (2n − P)`` (n fitted points; the scale of the
        weights cancels, so they need only be relative). The vector is
        ``(s_x, s_y)`` for shift, ``(s_x, s_y, θ)`` for rshift,
        ``(s_x, s_y, θ, m)`` for rscale, with
        ``M = m·diag(1, ±1)·[[cos θ, sin θ], [−sin θ, cos θ]]`` and θ in
        degrees, and ``(s_x, s_y, M00, M01, M10, M11)`` for general. NaN when
        ``2n <= P`` (no degrees of freedom left).
    shift_err : Array, shape (2,)
        1-sigma errors of ``shift``.
    rot_err : Array, shape (2,)
        1-sigma errors of ``rot`` (degrees); 0 for ``shift``.
    scale_err : Array, shape (2,)
        1-sigma errors of ``scale``; 0 for ``shift`` and ``rshift``.
    status : Array of int32, shape ()
        A :class:`FitStatus` code.
    npoints : Array of int32, shape ()
        Number of points in the final fit.
    """

    shift: jax.Array
    matrix: jax.Array
    proper_rot: jax.Array
    rot: jax.Array
    mean_rot: jax.Array
    scale: jax.Array
    mean_scale: jax.Array
    skew: jax.Array
    proper: jax.Array
    rmse: jax.Array
    mae: jax.Array
    std: jax.Array
    resids: jax.Array
    fitmask: jax.Array
    center: jax.Array
    eff_nclip: jax.Array
    covariance: jax.Array
    shift_err: jax.Array
    rot_err: jax.Array
    scale_err: jax.Array
    status: jax.Array
    npoints: jax.Array


class _Solution(NamedTuple):
    """One unclipped fit: parameters, residuals and statistics."""

    params: jax.Array  # (P,)
    flip: jax.Array  # () +1 proper, -1 reflected (rshift/rscale only)
    resids: jax.Array  # (2, N)
    stats: jax.Array  # (3,) in SIGMA_STATS order
    moments: jax.Array  # (5,) Σŵu, Σŵv, Σŵu², Σŵuv, Σŵv² of the fitted uv
    npts: jax.Array  # () number of fitted points
    status: jax.Array  # () int32


class Clipping(NamedTuple):
    """The traced clipping options of one fit (changing them never recompiles)."""

    weighted: jax.Array  # () bool: weights were given
    nclip: jax.Array  # () int32: maximum number of clipping passes
    nsigma: jax.Array  # () float64: threshold in units of the statistic
    stat_index: jax.Array  # () int32: index into SIGMA_STATS
    clip_accum: jax.Array  # () bool: rejected points stay rejected
    normalized: jax.Array  # () bool: residuals judged in units of their own error


def _clipping(
    weighted, nclip, nsigma, stat_index, clip_accum, normalized=False
) -> Clipping:
    """Pack checked option values as the arrays the jitted fits trace (x64)."""
    return Clipping(
        weighted=jnp.asarray(bool(weighted)),
        nclip=jnp.asarray(nclip, dtype=jnp.int32),
        nsigma=jnp.asarray(nsigma, dtype=jnp.float64),
        stat_index=jnp.asarray(stat_index, dtype=jnp.int32),
        clip_accum=jnp.asarray(bool(clip_accum)),
        normalized=jnp.asarray(bool(normalized)),
    )


# --------------------------------------------------------------------------
# argument checks (trace time)


def _check_fitgeom(fitgeom: str) -> str:
    if not isinstance(fitgeom, str) or fitgeom not in FITGEOM_MIN_POINTS:
        msg = f"fitgeom must be one of {tuple(FITGEOM_MIN_POINTS)}, got {fitgeom!r}"
        raise ValueError(msg)
    return fitgeom


def _check_nclip(nclip: int | None) -> int:
    if nclip is None:
        return 0
    if isinstance(nclip, bool) or not isinstance(nclip, int) or nclip < 0:
        msg = f"nclip must be a non-negative integer or None, got {nclip!r}"
        raise ValueError(msg)
    return nclip


def _check_sigma_value(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"sigma must be a positive number, got {value!r}"
        raise ValueError(msg)
    if not (math.isfinite(value) and value > 0):
        msg = f"sigma must be a positive finite number, got {value!r}"
        raise ValueError(msg)
    return float(value)


def _check_sigma_stat(stat: object) -> int:
    if stat not in SIGMA_STATS:
        msg = f"sigma_stat must be one of {SIGMA_STATS}, got {stat!r}"
        raise ValueError(msg)
    return SIGMA_STATS.index(stat)


def _parse_sigma(sigma: float | tuple[float, str]) -> tuple[float, int]:
    """Split ``sigma`` (a number or ``(number, statistic)``) into value, code."""
    if isinstance(sigma, (tuple, list)):
        if len(sigma) != 2:
            msg = f"sigma must be a number or a (number, statistic) pair, got {sigma!r}"
            raise ValueError(msg)
        if sigma[1] not in SIGMA_STATS:
            msg = f"sigma statistic must be one of {SIGMA_STATS}, got {sigma!r}"
            raise ValueError(msg)
        return _check_sigma_value(sigma[0]), SIGMA_STATS.index(sigma[1])
    return _check_sigma_value(sigma), 0


def _check_shape(name: str, value: jax.Array, shape: tuple[int, ...]) -> None:
    if value.shape != shape:
        msg = f"{name} must have shape {shape}, got {value.shape}"
        raise ValueError(msg)


def _check_points(xy: jax.Array, uv: jax.Array, lead: int) -> None:
    if xy.ndim != lead + 2 or xy.shape[-1] != 2:
        expect = "(B, N, 2)" if lead else "(N, 2)"
        msg = f"xy must have shape {expect}, got {xy.shape}"
        raise ValueError(msg)
    _check_shape("uv", uv, xy.shape)


# --------------------------------------------------------------------------
# the maths of one fit


def _matrix(fitgeom: str, params: jax.Array, flip: jax.Array) -> jax.Array:
    """Build ``M`` from a parameter vector (the model's single definition)."""
    if fitgeom == "shift":
        return jnp.eye(2, dtype=params.dtype)
    if fitgeom == "general":
        return params[2:].reshape(2, 2)
    theta = jnp.deg2rad(params[2])
    c, s = jnp.cos(theta), jnp.sin(theta)
    mag = params[3] if fitgeom == "rscale" else jnp.ones_like(c)
    return mag * jnp.stack([jnp.stack([c, s]), jnp.stack([-flip * s, flip * c])])


def _solve(
    fitgeom: str,
    pts: jax.Array,
    w: jax.Array,
    finite: jax.Array,
    weighted: jax.Array,
) -> _Solution:
    """Fit the points with ``w > 0``.

    ``pts`` has shape (4, N) with rows ``x, y, u, v`` (a planar layout keeps
    every sum one contiguous, stacked reduction), centred on ``c`` and
    finite; ``finite`` marks the points whose input was. ``w`` is 0 for every
    point left out.
    """
    use = w > 0
    npts = jnp.sum(use)
    sw = jnp.sum(w)
    wn = w / jnp.where(sw > 0, sw, 1.0)
    mx, my, mu, mv = jnp.sum(pts * wn[None, :], axis=1)
    # Centred again on the weighted means before forming second moments.
    dx, dy, du, dv = pts - jnp.stack([mx, my, mu, mv])[:, None]
    products = jnp.stack(
        [du * du, du * dv, dv * dv, dx * du, dx * dv, dy * du, dy * dv]
    )
    suu, suv, svv, sxu, sxv, syu, syv = jnp.sum(products * wn[None, :], axis=1)
    x, y, u, v = pts
    spread = suu + svv + mu * mu + mv * mv  # Σ ŵ‖uv‖²
    trace = suu + svv
    flip = jnp.ones((), dtype=pts.dtype)

    if fitgeom == "shift":
        mat = jnp.eye(2, dtype=pts.dtype)
        singular = jnp.zeros((), dtype=bool)
    elif fitgeom == "general":
        det = suu * svv - suv * suv
        singular = (trace <= SINGULAR_RTOL * spread) | (det <= SINGULAR_RTOL * trace**2)
        # Rows of M solve [[suu, suv], [suv, svv]] · row = (s?u, s?v).
        p0, p1 = (svv * sxu - suv * sxv) / det, (suu * sxv - suv * sxu) / det
        q0, q1 = (svv * syu - suv * syv) / det, (suu * syv - suv * syu) / det
        mat = jnp.stack([jnp.stack([p0, p1]), jnp.stack([q0, q1])])
    else:
        reflected = sxu * syv - sxv * syu < 0
        flip = jnp.where(reflected, -1.0, 1.0)
        num = jnp.where(reflected, sxv + syu, sxv - syu)
        den = jnp.where(reflected, sxu - syv, sxu + syv)
        theta = jnp.rad2deg(jnp.arctan2(num, den))
        singular = trace <= SINGULAR_RTOL * spread
        angle = [theta]
        if fitgeom == "rscale":
            rad = jnp.deg2rad(theta)
            angle.append((den * jnp.cos(rad) + num * jnp.sin(rad)) / trace)
        partial = jnp.concatenate([jnp.zeros(2, dtype=pts.dtype), jnp.stack(angle)])
        mat = _matrix(fitgeom, partial, flip)
    shift = jnp.stack(
        [
            mx - mat[0, 0] * mu - mat[0, 1] * mv,
            my - mat[1, 0] * mu - mat[1, 1] * mv,
        ]
    )
    if fitgeom == "general":
        params = jnp.concatenate([shift, mat.reshape(4)])
    elif fitgeom == "shift":
        params = shift
    else:
        params = partial.at[:2].set(shift)

    rx = x - (mat[0, 0] * u + mat[0, 1] * v + shift[0])
    ry = y - (mat[1, 0] * u + mat[1, 1] * v + shift[1])
    # Points left out may be anywhere (even overflow): keep them out of sums.
    stats = _statistics(
        jnp.where(use, rx, 0.0), jnp.where(use, ry, 0.0), wn, npts, weighted
    )
    status = jnp.select(
        [
            npts < FITGEOM_MIN_POINTS[fitgeom],
            jnp.any(use & ~finite),
            singular,
            ~jnp.all(jnp.isfinite(params)),
        ],
        [
            FitStatus.NOT_ENOUGH_POINTS,
            FitStatus.NON_FINITE,
            FitStatus.SINGULAR,
            FitStatus.NON_FINITE,
        ],
        FitStatus.OK,
    ).astype(jnp.int32)
    resids = jnp.where(finite[None, :], jnp.stack([rx, ry]), jnp.nan)
    moments = jnp.stack([mu, mv, suu + mu * mu, suv + mu * mv, svv + mv * mv])
    return _Solution(params, flip, resids, stats, moments, npts, status)


def _statistics(
    rx: jax.Array,
    ry: jax.Array,
    wn: jax.Array,
    npts: jax.Array,
    weighted: jax.Array,
) -> jax.Array:
    """``(rmse, mae, std)`` of the residuals, ``wn`` summing to 1 (original.md §6.3)."""
    norm2 = rx * rx + ry * ry
    terms = jnp.stack([norm2, jnp.sqrt(norm2), rx, ry, wn])
    ms, mae, mrx, mry, v2 = jnp.sum(terms * wn[None, :], axis=1)
    rmse = jnp.sqrt(ms)
    # One pass: the weighted mean residual of a fit with a free shift is ~0.
    var = jnp.maximum(ms - mrx * mrx - mry * mry, 0.0)
    # Reliability-weights correction (tweakwcs), 0 for a single point.
    several = npts > 1
    corr = jnp.where(several, 1.0 - v2, 1.0)
    std_w = jnp.where(several, jnp.sqrt(var / corr), 0.0)
    std = jnp.where(weighted, std_w, jnp.sqrt(var))
    return jnp.stack([rmse, mae, std])


def _rot_scale(matrix: jax.Array) -> jax.Array:
    """``(rotx, roty, sx, sy)`` of a matrix (degrees), for error propagation."""
    return jnp.stack(
        [
            jnp.rad2deg(jnp.arctan2(-matrix[1, 0], matrix[0, 0])),
            jnp.rad2deg(jnp.arctan2(matrix[0, 1], matrix[1, 1])),
            jnp.hypot(matrix[0, 0], matrix[1, 0]),
            jnp.hypot(matrix[0, 1], matrix[1, 1]),
        ]
    )


def _spd_inverse(a: jax.Array) -> jax.Array:
    """Invert a small symmetric positive-definite matrix (Gauss-Jordan).

    Unrolled over the (static, <= 6) size with whole-row updates; no pivoting
    is needed for a positive-definite matrix. Much cheaper under ``vmap`` on
    XLA:CPU than the batched LAPACK path of :func:`jax.numpy.linalg.inv`.
    """
    n = a.shape[0]
    aug = jnp.concatenate([a, jnp.eye(n, dtype=a.dtype)], axis=1)
    for k in range(n):
        row = aug[k] / aug[k, k]
        aug = (aug - aug[:, k : k + 1] * row[None, :]).at[k].set(row)
    return aug[:, n:]


def _covariance(
    fitgeom: str, sol: _Solution
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Parameter covariance and the 1-sigma shift, rotation and scale errors.

    The model ``M(p)·uv + s`` is linear in ``uv``, so its Jacobian for point
    ``k`` is ``J_k = E + D·uv_k`` with ``E`` selecting the shift and ``D =
    ∂M/∂p``; ``Σ w_k J_kᵀ J_k`` then needs only the weighted first and
    second moments of ``uv``, which the fit already computed.
    """
    m1 = sol.moments[:2]
    m2 = jnp.stack(
        [
            jnp.stack([sol.moments[2], sol.moments[3]]),
            jnp.stack([sol.moments[3], sol.moments[4]]),
        ]
    )
    nparams = FITGEOM_NPARAMS[fitgeom]
    # Tiny products are written as broadcasts and sums: under vmap, XLA:CPU
    # runs batched dot_generals of 2x2..6x6 matrices one image at a time.
    dmat = jax.jacfwd(lambda p: _matrix(fitgeom, p, sol.flip))(sol.params)  # (2,2,P)
    dm1 = jnp.sum(dmat * m1[None, :, None], axis=1)  # (2, P): D_j · m1
    cross = jnp.zeros((nparams, nparams), dtype=m1.dtype).at[:2].set(dm1)
    dm2 = jnp.sum(dmat[:, :, None, :] * m2[None, :, :, None], axis=1)  # (2, 2, P)
    normal = (
        jnp.sum(dm2[:, :, :, None] * dmat[:, :, None, :], axis=(0, 1))
        + cross
        + cross.T
        + jnp.diag((jnp.arange(nparams) < 2).astype(m1.dtype))
    )
    dof = 2 * sol.npts - nparams
    variance = jnp.where(dof > 0, sol.stats[0] ** 2 / jnp.maximum(dof, 1), jnp.nan)
    # Σ ŵ‖r‖² = rmse²; with weights normalised to 1 this is σ̂²·(2n − P).
    cov = variance * _spd_inverse(normal)
    derived = jax.jacfwd(lambda p: _rot_scale(_matrix(fitgeom, p, sol.flip)))(
        sol.params
    )
    dvar = jnp.sum(derived[:, :, None] * cov[None, :, :] * derived[:, None, :], (1, 2))
    errs = jnp.sqrt(jnp.maximum(dvar, 0.0))
    shift_err = jnp.sqrt(jnp.maximum(jnp.diagonal(cov)[:2], 0.0))
    return cov, shift_err, errs[:2], errs[2:]


def describe_matrix(fitgeom: str, matrix: jax.Array) -> dict[str, jax.Array]:
    """Rotations, scales and skew of ``M`` as tweakwcs' ``_build_fit`` reports.

    The one decomposition of a fit matrix in the library (fits, refined
    transforms and summaries all use it). Keys: ``proper_rot``, ``rot``,
    ``mean_rot`` (degrees), ``scale``, ``mean_scale``, ``skew`` (degrees),
    ``proper``.
    """
    dtype = matrix.dtype
    det = matrix[0, 0] * matrix[1, 1] - matrix[0, 1] * matrix[1, 0]
    sdet = jnp.sign(det)
    proper = sdet >= 0
    if fitgeom == "shift":
        zero = jnp.zeros((), dtype=dtype)
        return {
            "proper_rot": zero,
            "rot": jnp.zeros(2, dtype=dtype),
            "mean_rot": zero,
            "scale": jnp.ones(2, dtype=dtype),
            "mean_scale": jnp.ones((), dtype=dtype),
            "skew": zero,
            "proper": proper,
        }
    mean_scale = jnp.sqrt(jnp.abs(det))
    if fitgeom == "general":
        scale = jnp.hypot(matrix[0], matrix[1])
    else:
        scale = jnp.stack([mean_scale, mean_scale])
    unit = matrix / scale[None, :]
    proper_rot = jnp.rad2deg(
        jnp.arctan2(unit[0, 1] - sdet * unit[1, 0], unit[0, 0] + sdet * unit[1, 1])
    )
    rotx = jnp.rad2deg(jnp.arctan2(-unit[1, 0], unit[0, 0]))
    roty = jnp.rad2deg(jnp.arctan2(unit[0, 1], unit[1, 1]))
    skew = jnp.mod(roty - rotx - 180.0, 360.0) - 180.0
    rot = jnp.stack([rotx, roty])
    mean_rot = 0.5 * (rotx + roty)
    if fitgeom != "general":
        rot = jnp.where(proper, jnp.stack([proper_rot, proper_rot]), rot)
        mean_rot = jnp.where(proper, proper_rot, mean_rot)
        skew = jnp.where(proper, 0.0, skew)
    return {
        "proper_rot": proper_rot,
        "rot": rot,
        "mean_rot": mean_rot,
        "scale": scale,
        "mean_scale": mean_scale,
        "skew": skew,
        "proper": proper,
    }


def _iter_fit(
    fitgeom: str,
    xy: jax.Array,
    uv: jax.Array,
    weights: jax.Array,
    valid: jax.Array,
    center: jax.Array,
    clipping: Clipping,
) -> LinearFit:
    """Run the clipping loop of docs/original.md §6.4 on one image, in fixed shapes."""
    weighted, nclip, nsigma, stat_index, clip_accum, normalized = clipping
    minobj = FITGEOM_MIN_POINTS[fitgeom]
    wmask = valid & (weights > 0)
    xyc = xy - center[None, :]
    uvc = uv - center[None, :]
    # Non-finite input is zeroed once here; a fit that uses it is NON_FINITE.
    finite = jnp.all(jnp.isfinite(xyc) & jnp.isfinite(uvc), axis=1) | ~valid
    ok_in = (valid & finite)[:, None]
    pts = jnp.where(ok_in, jnp.concatenate([xyc, uvc], axis=1), 0.0).T
    # Materialise the planar copy once, rather than let XLA fuse the
    # transpose into (and repeat it in) every reduction of every pass.
    pts = jax.lax.optimization_barrier(pts)

    def fit(mask: jax.Array) -> _Solution:
        return _solve(fitgeom, pts, jnp.where(mask, weights, 0.0), finite, weighted)

    # With exactly the minimum number of points there is nothing to clip.
    limit = jnp.where(jnp.sum(wmask) == minobj, 0, nclip)

    # Each pass fits the mask chosen by the previous one (the first pass fits
    # all weighted points), then decides whether another pass follows.
    def body(state):
        i, trial, _, _, eff, _ = state
        sol = fit(trial)
        cutoff = nsigma * sol.stats[stat_index]
        # Normalised: |r| sqrt(w / mean w) — with w = 1/sigma² a faint source
        # is judged by its own error, not by the bright ones' residual RMS
        # (whose weighted RMS is the RMS of these normalised residuals).
        mean_w = jnp.sum(jnp.where(trial, weights, 0.0)) / jnp.maximum(
            jnp.sum(trial), 1
        )
        scale = jnp.where(normalized & (mean_w > 0), jnp.sqrt(weights / mean_w), 1.0)
        keep = scale * jnp.sqrt(sol.resids[0] ** 2 + sol.resids[1] ** 2) < cutoff
        stop = (
            (i >= limit)
            | (sol.status != FitStatus.OK)
            | (jnp.sum(trial & keep) < minobj)
            | jnp.all(keep | ~trial)
        )
        # Non-accumulating mode re-admits earlier rejects untested (tweakwcs).
        base = jnp.where(clip_accum, trial, wmask)
        following = base & ~(trial & ~keep)
        eff = eff + jnp.where(i > 0, 1, 0)
        return i + 1, following, trial, sol, eff, stop

    blank = jax.tree.map(
        lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(fit, wmask)
    )
    zero = jnp.zeros((), jnp.int32)
    state = (zero, wmask, wmask, blank, zero, jnp.zeros((), bool))
    _, _, mask, sol, eff, _ = jax.lax.while_loop(lambda s: ~s[-1], body, state)

    cov, shift_err, rot_err, scale_err = _covariance(fitgeom, sol)
    matrix = _matrix(fitgeom, sol.params, sol.flip)
    ok = sol.status == FitStatus.OK

    def nan_unless_ok(a: jax.Array) -> jax.Array:
        return jnp.where(ok, a, jnp.nan)

    desc = describe_matrix(fitgeom, matrix)
    return LinearFit(
        shift=nan_unless_ok(sol.params[:2]),
        matrix=nan_unless_ok(matrix),
        proper_rot=nan_unless_ok(desc["proper_rot"]),
        rot=nan_unless_ok(desc["rot"]),
        mean_rot=nan_unless_ok(desc["mean_rot"]),
        scale=nan_unless_ok(desc["scale"]),
        mean_scale=nan_unless_ok(desc["mean_scale"]),
        skew=nan_unless_ok(desc["skew"]),
        proper=desc["proper"] & ok,
        rmse=nan_unless_ok(sol.stats[0]),
        mae=nan_unless_ok(sol.stats[1]),
        std=nan_unless_ok(sol.stats[2]),
        resids=jnp.where(valid[:, None], nan_unless_ok(sol.resids.T), 0.0),
        fitmask=mask,
        center=center,
        eff_nclip=eff,
        covariance=nan_unless_ok(cov),
        shift_err=nan_unless_ok(shift_err),
        rot_err=nan_unless_ok(rot_err),
        scale_err=nan_unless_ok(scale_err),
        status=sol.status,
        npoints=sol.npts.astype(jnp.int32),
    )


# --------------------------------------------------------------------------
# public entry points


def _combine_weights(wxy: ArrayLike | None, wuv: ArrayLike | None, n: int):
    """Per-point weights (tweakwcs: ``1/w = 1/wxy + 1/wuv``) and a weighted flag."""
    given = [jnp.asarray(w, dtype=jnp.float64) for w in (wxy, wuv) if w is not None]
    for name, w in zip(("wxy", "wuv"), (wxy, wuv), strict=True):
        if w is not None:
            _check_shape(name, jnp.asarray(w), (n,))
    if not given:
        return jnp.ones(n, dtype=jnp.float64), False
    if len(given) == 1:
        return given[0], True
    a, b = given
    both = (a > 0) & (b > 0)
    return jnp.where(both, a * b / jnp.where(both, a + b, 1.0), 0.0), True


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
    mask: ArrayLike | None = None,
) -> LinearFit:
    """Fit ``xy ≈ M (uv − c) + c + s`` with iterative sigma clipping.

    Clipping follows tweakwcs 0.9.3 (docs/original.md §6.4). The work runs in one jitted
    call (compiled once per ``fitgeom`` and ``N``; ``nclip``, ``sigma`` and
    ``clip_accum`` are traced) in float64, whatever the caller's
    ``jax_enable_x64`` setting. The function is pure and may itself be
    wrapped in :func:`jax.jit` or :func:`jax.vmap`; to keep float64 under
    your own :func:`jax.jit`, trace it inside ``jax.enable_x64(True)``
    (otherwise the arguments are cast to float32 at your jit boundary).

    Parameters
    ----------
    xy, uv : array_like, shape (N, 2)
        Point positions ``(x, y)``; ``uv`` is mapped onto ``xy``.
    wxy, wuv : array_like, shape (N,), optional
        Weights of ``xy`` and ``uv``. One set is used as is; with both the
        weight is ``wxy·wuv/(wxy + wuv)``. Points with weight <= 0 are left
        out. Without weights the fit and its statistics are unweighted.
    fitgeom : {'shift', 'rshift', 'rscale', 'general'}, optional
        Fit geometry.
    center : array_like, shape (2,), optional
        Centre ``c``; default: the (unweighted) mean of the ``uv`` points that
        are valid and positively weighted.
    nclip : int or None, optional
        Maximum number of clipping passes (None means 0).
    sigma : float or (float, {'rmse', 'mae', 'std'}), optional
        Clipping threshold: points with ``‖resid‖ >= sigma·stat`` are
        rejected; ``stat`` defaults to ``'rmse'``.
    clip_accum : bool, optional
        If True, rejected points stay rejected; if False (tweakwcs default),
        each pass starts again from all points and only re-tests the
        previous pass's fitted points.
    mask : array_like of bool, shape (N,), optional
        Validity mask (True = real point); default all True.

    Returns
    -------
    LinearFit
        The fit; check ``status`` (a :class:`FitStatus`).

    Raises
    ------
    ValueError
        For a bad ``fitgeom``, ``nclip``, ``sigma`` or array shape.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> uv = jnp.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    >>> fit = iter_linear_fit(uv + jnp.array([[0.5, -0.25]]), uv, fitgeom="shift")
    >>> [round(float(v), 6) for v in fit.shift], int(fit.status)
    ([0.5, -0.25], 0)
    """
    fitgeom = _check_fitgeom(fitgeom)
    nclip = _check_nclip(nclip)
    nsigma, stat_index = _parse_sigma(sigma)
    with jax.enable_x64(True):
        xy = jnp.asarray(xy, dtype=jnp.float64)
        uv = jnp.asarray(uv, dtype=jnp.float64)
        _check_points(xy, uv, 0)
        n = xy.shape[0]
        weights, weighted = _combine_weights(wxy, wuv, n)
        valid = jnp.ones(n, dtype=bool) if mask is None else jnp.asarray(mask, bool)
        _check_shape("mask", valid, (n,))
        if center is None:
            use = valid & (weights > 0)
            count = jnp.sum(use)
            total = jnp.sum(jnp.where(use[:, None], uv, 0.0), axis=0)
            center = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
        center = jnp.asarray(center, dtype=jnp.float64)
        _check_shape("center", center, (2,))
        return _iter_fit_jit(
            fitgeom,
            xy,
            uv,
            weights,
            valid,
            center,
            _clipping(weighted, nclip, nsigma, stat_index, clip_accum),
        )


def fit_shifts(
    xy: ArrayLike,
    uv: ArrayLike,
    wxy: ArrayLike | None = None,
    wuv: ArrayLike | None = None,
    *,
    center: ArrayLike | None = None,
    mask: ArrayLike | None = None,
) -> LinearFit:
    """Fit a shift between two point sets, without clipping.

    ``iter_linear_fit(xy, uv, wxy, wuv, fitgeom='shift', nclip=0)``; see
    :func:`iter_linear_fit` for the parameters and the result.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> uv = jnp.array([[0.0, 0.0], [2.0, 0.0]])
    >>> fit = fit_shifts(uv + jnp.array([[1.0, 0.0]]), uv, jnp.array([1.0, 3.0]))
    >>> fit.shift.tolist(), float(fit.rmse)
    ([1.0, 0.0], 0.0)
    """
    return iter_linear_fit(
        xy, uv, wxy, wuv, fitgeom="shift", center=center, nclip=0, mask=mask
    )


def fit_rshift(
    xy: ArrayLike,
    uv: ArrayLike,
    wxy: ArrayLike | None = None,
    wuv: ArrayLike | None = None,
    *,
    center: ArrayLike | None = None,
    mask: ArrayLike | None = None,
) -> LinearFit:
    """Fit a rotation (proper or flipped) and a shift, scale fixed at 1.

    ``iter_linear_fit(xy, uv, wxy, wuv, fitgeom='rshift', nclip=0)``; see
    :func:`iter_linear_fit` for the parameters and the result.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> uv = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    >>> xy = uv @ jnp.array([[0.0, -1.0], [1.0, 0.0]])  # rotated by 90 degrees
    >>> round(float(fit_rshift(xy, uv).proper_rot), 9)
    90.0
    """
    return iter_linear_fit(
        xy, uv, wxy, wuv, fitgeom="rshift", center=center, nclip=0, mask=mask
    )


def fit_rscale(
    xy: ArrayLike,
    uv: ArrayLike,
    wxy: ArrayLike | None = None,
    wuv: ArrayLike | None = None,
    *,
    center: ArrayLike | None = None,
    mask: ArrayLike | None = None,
) -> LinearFit:
    """Fit a rotation (proper or flipped), one scale and a shift.

    ``iter_linear_fit(xy, uv, wxy, wuv, fitgeom='rscale', nclip=0)``; see
    :func:`iter_linear_fit` for the parameters and the result.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> uv = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    >>> fit = fit_rscale(2.0 * uv * jnp.array([[1.0, -1.0]]), uv)  # y flipped
    >>> round(float(fit.mean_scale), 9), bool(fit.proper)
    (2.0, False)
    """
    return iter_linear_fit(
        xy, uv, wxy, wuv, fitgeom="rscale", center=center, nclip=0, mask=mask
    )


def fit_general(
    xy: ArrayLike,
    uv: ArrayLike,
    wxy: ArrayLike | None = None,
    wuv: ArrayLike | None = None,
    *,
    center: ArrayLike | None = None,
    mask: ArrayLike | None = None,
) -> LinearFit:
    """Fit a general affine transformation (six parameters), without clipping.

    ``iter_linear_fit(xy, uv, wxy, wuv, fitgeom='general', nclip=0)``; see
    :func:`iter_linear_fit` for the parameters and the result.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> uv = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> fit = fit_general(uv @ jnp.array([[2.0, 0.0], [0.5, 1.0]]), uv)
    >>> fit.matrix.round(9).tolist(), int(fit.status)
    ([[2.0, 0.5], [0.0, 1.0]], 0)
    """
    return iter_linear_fit(
        xy, uv, wxy, wuv, fitgeom="general", center=center, nclip=0, mask=mask
    )


_iter_fit_jit = jax.jit(_iter_fit, static_argnums=0)


@functools.partial(jax.jit, static_argnames=("fitgeom",))
def iter_fit_kernel(xy, uv, weights, valid, center, clipping, *, fitgeom):
    """Run the jitted, vmapped fits of `iter_linear_fit_batch`.

    Takes the arrays of `fit_batch_arguments` (the clipping options are
    traced: one compiled kernel per ``fitgeom`` and shape, whatever they are).
    """
    fit = functools.partial(_iter_fit, fitgeom)
    in_axes = (0, 0, 0, 0, 0, None)
    return jax.vmap(fit, in_axes=in_axes)(xy, uv, weights, valid, center, clipping)


def iter_linear_fit_batch(  # noqa: PLR0913  # seed signature
    xy: ArrayLike,
    uv: ArrayLike,
    weights: ArrayLike | None,
    mask: ArrayLike,
    center: ArrayLike,
    *,
    fitgeom: str = "general",
    nclip: int | None = 3,
    sigma: float = 3.0,
    sigma_stat: str = "rmse",
    clip_accum: bool = False,
    clip_normalized: bool = False,
) -> LinearFit:
    """Clipped linear fits of ``B`` images at once (jitted, vmapped).

    Each image ``b`` is fitted as :func:`iter_linear_fit` would fit
    ``(xy[b], uv[b])`` with weights ``weights[b]``, validity ``mask[b]`` and
    centre ``center[b]``. Only ``fitgeom`` and the array shapes select a
    compilation; ``nclip``, ``sigma``, ``sigma_stat`` and ``clip_accum`` are
    traced, so changing them does not recompile. Computes in float64
    whatever the caller's ``jax_enable_x64`` setting.

    Parameters
    ----------
    xy, uv : array_like, shape (B, N, 2)
        Point positions per image, padded to a common ``N``.
    weights : array_like, shape (B, N), or None
        Fit weights (points with weight <= 0 are left out); None for an
        unweighted fit (which differs from equal weights only in ``std``).
    mask : array_like of bool, shape (B, N)
        True for real points, False for padding.
    center : array_like, shape (B, 2)
        Centre ``c`` of each image's fit.
    fitgeom : {'shift', 'rshift', 'rscale', 'general'}, optional
        Fit geometry.
    nclip : int or None, optional
        Maximum number of clipping passes.
    sigma : float, optional
        Clipping threshold in units of ``sigma_stat``.
    sigma_stat : {'rmse', 'mae', 'std'}, optional
        Statistic for the threshold.
    clip_accum : bool, optional
        Whether rejected points stay rejected.
    clip_normalized : bool, optional
        Judge each residual in units of its own error, ``|r| sqrt(w / mean
        w)``, against ``sigma`` times the weighted statistic (for weights
        ``1/σ²``); the default compares plain ``|r|``, as the original and
        tweakwcs do, which with such weights rejects faint sources for
        noise the weights already allow for.

    Returns
    -------
    LinearFit
        Every field with a leading axis ``B``.

    Raises
    ------
    ValueError
        For a bad option value or array shape.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> uv = jnp.array([[[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [9.0, 9.0]]] * 2)
    >>> xy = uv + jnp.array([[[1.0, 0.0]], [[0.0, 2.0]]])
    >>> mask = jnp.array([[True] * 4, [True, True, True, False]])
    >>> fits = iter_linear_fit_batch(xy, uv, None, mask, jnp.zeros((2, 2)))
    >>> fits.shift.round(9).tolist(), fits.npoints.tolist()
    ([[1.0, 0.0], [0.0, 2.0]], [4, 3])
    """
    fitgeom = _check_fitgeom(fitgeom)
    with jax.enable_x64(True):
        arguments = fit_batch_arguments(
            xy,
            uv,
            weights,
            mask,
            center,
            nclip=nclip,
            sigma=sigma,
            sigma_stat=sigma_stat,
            clip_accum=clip_accum,
            clip_normalized=clip_normalized,
        )
        return iter_fit_kernel(*arguments, fitgeom=fitgeom)


def fit_batch_arguments(  # noqa: PLR0913  # the options of iter_linear_fit_batch
    xy: ArrayLike,
    uv: ArrayLike,
    weights: ArrayLike | None,
    mask: ArrayLike,
    center: ArrayLike,
    *,
    nclip: int | None = 3,
    sigma: float = 3.0,
    sigma_stat: str = "rmse",
    clip_accum: bool = False,
    clip_normalized: bool = False,
) -> tuple:
    """Check `iter_linear_fit_batch`'s inputs; the arguments of `iter_fit_kernel`.

    Call it inside ``jax.enable_x64(True)`` (the points stay float64).

    Returns
    -------
    tuple
        ``(xy, uv, weights, mask, center, clipping)``: float64 arrays, unit
        weights when ``weights`` is None, and the traced `Clipping` options.
    """
    nclip = _check_nclip(nclip)
    nsigma = _check_sigma_value(sigma)
    stat_index = _check_sigma_stat(sigma_stat)
    xy = jnp.asarray(xy, dtype=jnp.float64)
    uv = jnp.asarray(uv, dtype=jnp.float64)
    _check_points(xy, uv, 1)
    lead = xy.shape[:2]
    weighted = weights is not None
    if weighted:
        weights = jnp.asarray(weights, dtype=jnp.float64)
        _check_shape("weights", weights, lead)
    else:
        weights = jnp.ones(lead, dtype=jnp.float64)
    mask = jnp.asarray(mask, dtype=bool)
    _check_shape("mask", mask, lead)
    center = jnp.asarray(center, dtype=jnp.float64)
    _check_shape("center", center, (lead[0], 2))
    clipping = _clipping(
        weighted, nclip, nsigma, stat_index, clip_accum, clip_normalized
    )
    return xy, uv, weights, mask, center, clipping

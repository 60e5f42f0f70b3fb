r"""Gradient refinement through the differentiable blot.

The cross-correlation estimate of subpixal is limited by its method: a
quadratic fit to a 2x-supersampled correlation map locks onto the grid
(a floor near 0.004 px) and weights pixels sub-optimally. Here the alignment
is optimised directly: the image cutout ``I`` is modelled as

.. math:: I(p) \approx a \, B_d(p) + b, \qquad
          B_d(p) = s \, R(P(p) + J d),

where ``R`` is the reference cutout interpolated by the blot kernel, ``P`` the
pixmap (image pixel -> reference pixel), ``J`` its local Jacobian, ``s`` the
unit factor and ``d`` the displacement in image pixels, with the same sign
as the cross-correlation (position in the blot minus position in the image).
The flux scale ``a`` and background ``b`` are solved in closed form for every
``d`` (variable projection), so the optimisation is over ``d`` alone, by
damped Gauss-Newton (Levenberg-Marquardt) with pixel weights ``1/var``.
The covariance of ``d`` is the inverse Fisher matrix of the projected
problem, which accounts for the unknown ``a`` and ``b``.

:func:`refine_transform` optimises the same loss summed over all sources of
an image, over the parameters of a linear transform of the reference frame,
with a Cauchy loss on each source's chi-square excess so that outliers cannot
drag the solution.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from subpixal_jax.core.interp import (
    check_kind,
    sample,
    sample_variance,
    sample_with_gradient,
)

#: Bit flags of a refined source (0 = good).
FLAG_NO_PIXELS = 1  #: fewer usable pixels than parameters
FLAG_DEGENERATE = 2  #: singular normal equations (flat template)
FLAG_NOT_CONVERGED = 4  #: last step larger than the tolerance
FLAG_NON_FINITE = 8  #: non-finite result

#: Flux S/N of the refined fit below which :func:`prefer_refined` keeps the
#: starting (cross-correlation) displacement. Below it the reference's noise
#: makes spurious least-squares minima 0.1-0.5 px from the truth, which the
#: correlation peak averages out (docs/accuracy.md §1.7): on undersampled
#: sources against a reference as noisy as the image the refinement's RMS
#: error is 0.074 px for all sources, 0.032 px above S/N 30, against 0.035 px
#: for the correlation; S/N 30-40 is best there and end to end.
MIN_REFINED_SNR = 30.0

_MAX_STEP = 0.5  # px: Gauss-Newton steps are clipped to stay in the linear regime
_TOLERANCE = 1e-4  # px: convergence threshold on the final Gauss-Newton step


class RefinedDisplacements(NamedTuple):
    """Result of :func:`refine_displacements` (leading axis: sources).

    Attributes
    ----------
    dxdy : Array, shape (N, 2)
        Refined ``(dx, dy)`` in image pixels (NaN where flagged).
    covariance : Array, shape (N, 2, 2)
        Inverse Fisher matrix of ``(dx, dy)``.
    sigma : Array, shape (N, 2)
        1-sigma errors, the square roots of the covariance diagonal.
    chi2_red : Array, shape (N,)
        Reduced chi-square of the best model (should be ~1 when the noise
        model is right).
    flux_scale, background : Array, shape (N,)
        Best ``a`` and ``b``.
    snr : Array, shape (N,)
        Signal-to-noise ratio of the flux scale, ``a / sigma_a`` at the best
        ``d`` (background profiled out).
    flags : Array, shape (N,), int32
        Bit flags, 0 for a good source.
    """

    dxdy: jax.Array
    covariance: jax.Array
    sigma: jax.Array
    chi2_red: jax.Array
    flux_scale: jax.Array
    background: jax.Array
    snr: jax.Array
    flags: jax.Array


def _solve_linear(template, image, weight):
    """Weighted least-squares flux scale and background for a template."""
    s0 = jnp.sum(weight)
    st = jnp.sum(weight * template)
    stt = jnp.sum(weight * template * template)
    si = jnp.sum(weight * image)
    sti = jnp.sum(weight * template * image)
    det = stt * s0 - st * st
    safe = jnp.where(det > 0, det, 1.0)
    scale = (sti * s0 - st * si) / safe
    background = (stt * si - st * sti) / safe
    return scale, background, det


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _blot_values(ref, ref_valid, x, y, kind):
    """Interpolated reference (0 where invalid), with a one-pass derivative."""
    return sample(ref, x, y, ref_valid, kind)[0]


def _blot_values_jvp(kind, primals, tangents):
    ref, ref_valid, x, y = primals
    ref_dot, _, x_dot, y_dot = tangents
    values, d_x, d_y = sample_with_gradient(ref, x, y, ref_valid, kind)
    out = jnp.zeros_like(values)
    if not isinstance(x_dot, SymbolicZero):
        out = out + (d_x * x_dot).astype(values.dtype)
    if not isinstance(y_dot, SymbolicZero):
        out = out + (d_y * y_dot).astype(values.dtype)
    if not isinstance(ref_dot, SymbolicZero):
        out = out + sample(ref_dot, x, y, ref_valid, kind)[0]
    return values, out


_blot_values.defjvp(_blot_values_jvp, symbolic_zeros=True)


class _Blot(NamedTuple):
    """What places one source's reference on its exposure cutout."""

    ref: jax.Array
    ref_valid: jax.Array
    pixmap: jax.Array
    jacobian: jax.Array
    iscale: jax.Array
    ref_variance: jax.Array | None = None  # noise variance of ``ref``


def _positions(shift, blot):
    """Return the reference positions of the pixels displaced by ``J @ shift``."""
    offset = blot.jacobian @ shift
    return blot.pixmap[..., 0] + offset[0], blot.pixmap[..., 1] + offset[1]


def _template(shift, blot, kind):
    """Interpolate the reference at the pixmap displaced by ``J @ shift``."""
    x, y = _positions(shift, blot)
    return _blot_values(blot.ref, blot.ref_valid, x, y, kind) * blot.iscale


def _projected_residuals(shift, image, weight, blot, kind):
    """Weighted residuals with the flux scale and background profiled out.

    Returns the residuals twice (the second copy as ``jacfwd`` auxiliary
    output, so one pass gives both the residuals and their Jacobian) and the
    best ``(scale, background, det)``.
    """
    template = _template(shift, blot, kind).astype(shift.dtype)
    scale, background, det = _solve_linear(template, image, weight)
    # sqrt's derivative at 0 is infinite: masked pixels (weight 0) must not
    # turn a zero tangent of a shift-dependent weight into NaN.
    positive = weight > 0
    root = jnp.where(positive, jnp.sqrt(jnp.where(positive, weight, 1.0)), 0.0)
    r = (root * (image - scale * template - background)).reshape(-1)
    return r, (r, scale, background, det)


def _weight_function(d0, image, variance, usable, blot, kind):
    """Pixel weights as a function of the displacement.

    Without a reference variance the weights are ``1 / variance``. With one,
    the blot's noise ``(a s)² sum_k w_k(d)² var_ref_k`` depends on the
    fractional shift (smallest near the half pixel, where the weights
    spread), so a fixed-variance chi-square is lowest there and pulls the
    fit toward it. Each residual is instead normalised by its full variance
    at the current ``d`` (effective-variance chi-square): its expectation is
    the number of pixels at the true ``d`` whatever the shift, so the
    minimum is unbiased. A Gaussian likelihood's ``log var`` term would
    reintroduce the pull. The flux scale ``a`` is the one at ``d0``.
    """
    dtype = d0.dtype
    weight = jnp.where(usable, 1.0 / jnp.where(usable, variance, 1.0), 0.0)
    weight = weight.astype(dtype)
    if blot.ref_variance is None:
        return lambda _: weight
    safe = jnp.where(usable, variance, 1.0).astype(dtype)
    scale = _solve_linear(_template(d0, blot, kind).astype(dtype), image, weight)[0]
    gain = (scale * blot.iscale.astype(dtype)) ** 2

    def weight_at(d):
        x, y = _positions(d, blot)
        blotted = sample_variance(blot.ref_variance, x, y, blot.ref_valid, kind)
        return jnp.where(usable, 1.0 / (safe + gain * blotted.astype(dtype)), 0.0)

    return weight_at


def _refine_one(image, variance, valid, blot, d0, kind, n_iter):
    dtype = d0.dtype
    image = image.astype(dtype)
    # Pixels usable at the start stay the only ones used: a mask that changed
    # with d would make the loss discontinuous.
    _, template_ok = sample(blot.ref, *_positions(d0, blot), blot.ref_valid, kind)
    usable = valid & template_ok & (variance > 0) & jnp.isfinite(image)
    image = jnp.where(usable, image, 0.0)
    n_used = jnp.sum(usable)
    weight_at = _weight_function(d0, image, variance, usable, blot, kind)

    def residuals(d):
        return _projected_residuals(d, image, weight_at(d), blot, kind)

    linearise = jax.jacfwd(residuals, has_aux=True)

    # The state carries the linearisation at the current point, so the
    # residual function is traced once in the loop (at the trial point).
    def levenberg_marquardt(_, state):
        d, damping, jac, aux = state
        r = aux[0]
        normal = jac.T @ jac
        damped = normal + damping * jnp.diag(jnp.diag(normal) + 1e-12)
        step = -jnp.linalg.solve(damped, jac.T @ r)
        step = step * jnp.minimum(1.0, _MAX_STEP / (jnp.linalg.norm(step) + 1e-30))
        trial = d + step
        trial_jac, trial_aux = linearise(trial)
        better = jnp.sum(trial_aux[0] ** 2) <= jnp.sum(r * r)
        return jax.tree.map(
            lambda new, old: jnp.where(better, new, old),
            (trial, damping / 3.0, trial_jac, trial_aux),
            (d, damping * 4.0, jac, aux),
        )

    start = (d0, jnp.asarray(1e-3, dtype), *linearise(d0))
    d, _, jac, (r, scale, background, det) = jax.lax.fori_loop(
        0, n_iter, levenberg_marquardt, start
    )
    covariance = jnp.linalg.inv(jac.T @ jac)
    chi2 = jnp.sum(r * r)
    # Converged when the undamped Gauss-Newton step from the final point is
    # negligible against the tolerance or the statistical error.
    final_step = jnp.linalg.norm(covariance @ (jac.T @ r))
    sigma = jnp.sqrt(jnp.abs(jnp.diag(covariance)))
    tolerance = jnp.maximum(_TOLERANCE, 0.05 * jnp.linalg.norm(sigma))
    dof = jnp.maximum(n_used - 4, 1)
    # var(a) = sum(w) / det of the weighted (a, b) normal equations.
    weight_sum = jnp.sum(weight_at(d))
    positive = weight_sum > 0
    snr = scale * jnp.sqrt(
        jnp.where(
            positive, jnp.maximum(det, 0.0) / jnp.where(positive, weight_sum, 1.0), 0.0
        )
    )

    flags = jnp.where(n_used <= 4, FLAG_NO_PIXELS, 0)
    flags |= jnp.where(det > 0, 0, FLAG_DEGENERATE)
    flags |= jnp.where(final_step < tolerance, 0, FLAG_NOT_CONVERGED)
    finite = jnp.all(jnp.isfinite(d)) & jnp.all(jnp.isfinite(covariance))
    flags |= jnp.where(finite, 0, FLAG_NON_FINITE)
    # Not converged is a warning; the others make the result unusable.
    bad = (flags & ~FLAG_NOT_CONVERGED) != 0
    nan = jnp.asarray(jnp.nan, dtype)
    return RefinedDisplacements(
        dxdy=jnp.where(bad, nan, d),
        covariance=jnp.where(bad, nan, covariance),
        sigma=jnp.where(bad, nan, sigma),
        chi2_red=chi2 / dof,
        flux_scale=scale,
        background=background,
        snr=snr,
        flags=flags.astype(jnp.int32),
    )


def prefer_refined(dxdy0, sigma0, refined, min_snr: float = MIN_REFINED_SNR):
    """Take the refined displacements of the sources bright enough to trust them.

    Parameters
    ----------
    dxdy0, sigma0 : array, shape (N, 2)
        The starting displacements (the cross-correlation's) and their errors.
    refined : RefinedDisplacements
        Their refinement.
    min_snr : float, optional
        The least flux S/N (``refined.snr``) at which the refined answer is
        taken (default `MIN_REFINED_SNR`).

    Returns
    -------
    dxdy, sigma : numpy.ndarray, shape (N, 2)
        ``refined`` where its S/N reaches ``min_snr`` (or the start is not
        finite), the start elsewhere.

    Examples
    --------
    >>> import numpy as np
    >>> two = np.full((2, 2), 0.1)
    >>> out = RefinedDisplacements(
    ...     dxdy=two, covariance=None, sigma=two / 10, chi2_red=None,
    ...     flux_scale=None, background=None, snr=np.array([50.0, 5.0]), flags=None)
    >>> dxdy, sigma = prefer_refined(np.zeros((2, 2)), np.ones((2, 2)), out)
    >>> dxdy.tolist(), sigma.tolist()
    ([[0.1, 0.1], [0.0, 0.0]], [[0.01, 0.01], [1.0, 1.0]])
    """
    dxdy0 = np.asarray(dxdy0, dtype=float)
    snr = np.asarray(refined.snr, dtype=float)
    kept = (snr >= min_snr) | ~np.all(np.isfinite(dxdy0), axis=1)
    dxdy = np.where(kept[:, None], np.asarray(refined.dxdy, dtype=float), dxdy0)
    sigma = np.where(
        kept[:, None], np.asarray(refined.sigma, dtype=float), np.asarray(sigma0)
    )
    return dxdy, sigma


@functools.partial(jax.jit, static_argnames=("interp", "n_iter"))
def refine_displacements(  # noqa: PLR0913  # seed signature
    images,
    variances,
    valid,
    ref,
    ref_valid,
    pixmap,
    jacobian,
    iscale,
    dxdy0,
    *,
    ref_variances=None,
    interp: str = "poly5",
    n_iter: int = 10,
) -> RefinedDisplacements:
    """Refine per-source displacements by weighted least squares through the blot.

    Parameters
    ----------
    images : Array, shape (N, H, W)
        Image cutouts (sky-subtracted).
    variances : Array, shape (N, H, W)
        Per-pixel noise variance of ``images``; pixels with variance <= 0 are
        ignored.
    valid : Array, shape (N, H, W), bool
        Good image pixels.
    ref : Array, shape (N, HR, WR)
        Reference cutouts (zero outside the modelled source).
    ref_valid : Array, shape (N, HR, WR), bool
        Good reference pixels.
    pixmap : Array, shape (N, H, W, 2)
        Position ``(x, y)`` in ``ref`` of every image pixel.
    jacobian : Array, shape (N, 2, 2)
        Local derivative of the pixmap, ``d(ref x, y) / d(image x, y)``.
    iscale : Array, shape (N,)
        Unit factor of the blot.
    dxdy0 : Array, shape (N, 2)
        Starting displacement (the cross-correlation answer), image pixels.
        Its dtype sets the precision of the optimisation.
    ref_variances : Array, shape (N, HR, WR), optional
        Noise variance of ``ref`` (its own units). When given, every pixel's
        residual is normalised by its full variance at the current
        displacement, ``variances + (a * iscale)**2 * sum_k w_k**2
        ref_variances_k`` (``w_k`` the blot's weights, ``a`` the flux
        scale), which removes the pull of a noisy reference toward the half
        pixel; ``variances`` then hold the image's noise alone. Default: the
        reference is noiseless (or its noise is already in ``variances``).
        The model takes the reference pixels' noise as independent: noise
        correlated between them (a drizzle's) varies less with the shift,
        and the model then over-corrects (measured at S/N 100 with a 2x2
        box-correlated reference as noisy as the image: error 0.0081 px
        against 0.0063 px for the fixed-variance fit, 0.0053 px with
        independent noise).
    interp : str, optional
        Interpolation kernel of the blot (default 'poly5').
    n_iter : int, optional
        Number of Levenberg-Marquardt iterations (fixed, for jit).

    Returns
    -------
    RefinedDisplacements
        Refined displacements with covariance, reduced chi-square and flags.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> yy, xx = jnp.mgrid[0:15, 0:15].astype(jnp.float32)
    >>> def star(x0, y0):
    ...     return 100 * jnp.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / 4.0)
    >>> ref, image = star(7.0, 7.0), star(6.8, 7.1)
    >>> pix = jnp.stack([xx, yy], axis=-1)
    >>> out = refine_displacements(
    ...     image[None], jnp.ones((1, 15, 15)), jnp.ones((1, 15, 15), bool),
    ...     ref[None], jnp.ones((1, 15, 15), bool), pix[None],
    ...     jnp.eye(2)[None], jnp.ones(1), jnp.zeros((1, 2)))
    >>> [round(float(v), 3) for v in out.dxdy[0]]
    [0.2, -0.1]
    """
    check_kind(interp, name="interp")
    if images.ndim != 3:
        msg = f"images must have shape (N, H, W), got {images.shape}"
        raise ValueError(msg)
    n, h, w = images.shape
    for name, arr, shape in (
        ("variances", variances, (n, h, w)),
        ("valid", valid, (n, h, w)),
        ("pixmap", pixmap, (n, h, w, 2)),
        ("jacobian", jacobian, (n, 2, 2)),
        ("dxdy0", dxdy0, (n, 2)),
    ):
        if tuple(arr.shape) != shape:
            msg = f"{name} must have shape {shape}, got {tuple(arr.shape)}"
            raise ValueError(msg)
    if ref.ndim != 3 or ref.shape[0] != n or ref_valid.shape != ref.shape:
        msg = (
            f"ref and ref_valid must have shape (N={n}, HR, WR), "
            f"got {ref.shape} and {ref_valid.shape}"
        )
        raise ValueError(msg)
    if ref_variances is not None and ref_variances.shape != ref.shape:
        msg = (
            f"ref_variances must have the shape of ref {ref.shape}, "
            f"got {ref_variances.shape}"
        )
        raise ValueError(msg)
    one = functools.partial(_refine_one, kind=interp, n_iter=n_iter)
    start = jnp.where(jnp.isfinite(dxdy0), dxdy0, 0.0)
    blot = _Blot(
        ref, ref_valid, pixmap, jacobian, jnp.asarray(iscale).reshape(n), ref_variances
    )
    return jax.vmap(one)(images, variances, valid, blot, start)


# --------------------------------------------------------------------------
# Refinement of the whole linear transform of one image
# --------------------------------------------------------------------------

#: Number of parameters of the inverse transform per fit geometry.
TRANSFORM_PARAMS = {"shift": 2, "rshift": 3, "rscale": 4, "general": 6}


class RefinedTransform(NamedTuple):
    """Result of :func:`refine_transform` (leading axis: images).

    The transform follows the linear-fit convention
    ``xy = matrix @ (uv - center) + center + shift`` (fit-frame pixels), so it
    can be passed to :func:`subpixal_jax.io.wcs.correct_wcs` like a fit.

    Attributes
    ----------
    matrix : Array, shape (B, 2, 2)
        Refined matrix ``M``.
    shift : Array, shape (B, 2)
        Refined shift ``s`` (fit-frame pixels).
    params : Array, shape (B, P)
        Parameters of the inverse transform ``T⁻¹(q) = A (q - c) + c + t``:
        ``t`` then, per geometry, rotation (rad), log-scale, or the four
        entries of ``A``.
    covariance : Array, shape (B, P, P)
        Covariance of ``params``: the sandwich of the robustly weighted
        fit, scaled by ``chi2_red`` where it exceeds 1.
    shift_err : Array, shape (B, 2)
        1-sigma error of the shift (fit-frame pixels).
    chi2_red : Array, shape (B,)
        Reduced chi-square of the sources' scatter about the transform,
        ~1 when the pixel variances describe all the noise (larger with a
        noisy reference, correlated noise or model errors).
    source_weight : Array, shape (B, S)
        Final Cauchy weight of every source (near 1 for consistent sources,
        small for outliers, 0 for padding).
    flags : Array, shape (B,), int32
        0 for a good result, otherwise ``FLAG_*`` bits.
    """

    matrix: jax.Array
    shift: jax.Array
    params: jax.Array
    covariance: jax.Array
    shift_err: jax.Array
    chi2_red: jax.Array
    source_weight: jax.Array
    flags: jax.Array


def _inverse_params(matrix, shift, center, fitgeom):
    """Parameters of ``T⁻¹`` for ``T(p) = M (p - c) + c + s``."""
    del center
    inv = jnp.linalg.inv(matrix)
    t = -inv @ shift
    angle = jnp.arctan2(inv[1, 0], inv[0, 0])
    if fitgeom == "shift":
        return t
    if fitgeom == "rshift":
        return jnp.concatenate([t, angle[None]])
    if fitgeom == "rscale":
        log_scale = 0.5 * jnp.log(jnp.abs(jnp.linalg.det(inv)))
        return jnp.concatenate([t, angle[None], log_scale[None]])
    return jnp.concatenate([t, inv.reshape(-1)])


def _inverse_matrix(params, fitgeom):
    """Matrix ``A`` of ``T⁻¹`` from its parameters."""
    if fitgeom == "shift":
        return jnp.eye(2, dtype=params.dtype)
    if fitgeom == "general":
        return params[2:6].reshape(2, 2)
    c, s = jnp.cos(params[2]), jnp.sin(params[2])
    rotation = jnp.stack([jnp.stack([c, -s]), jnp.stack([s, c])])
    if fitgeom == "rshift":
        return rotation
    return jnp.exp(params[3]) * rotation


def _source_residuals(a, t, center, source, kind):
    """Profiled residuals of one source when image pixels map through ``T⁻¹``."""
    image, weight, ref, ref_valid, pixmap, origin, iscale = source
    q = (pixmap + (origin - center)[None, None]) @ a.T + (center + t - origin)[
        None, None
    ]
    values = _blot_values(ref, ref_valid, q[..., 0], q[..., 1], kind)
    template = (values * iscale).astype(t.dtype)
    scale, background, _ = _solve_linear(template, image, weight)
    return (jnp.sqrt(weight) * (image - scale * template - background)).reshape(-1)


class _TransformSources(NamedTuple):
    """All source cutouts of one image for :func:`refine_transform`."""

    images: jax.Array
    variances: jax.Array
    valid: jax.Array
    ref: jax.Array
    ref_valid: jax.Array
    pixmap: jax.Array
    origin: jax.Array
    iscale: jax.Array
    source_valid: jax.Array


class _TransformSettings(NamedTuple):
    """Static options of :func:`refine_transform` (hashable)."""

    fitgeom: str
    kind: str
    n_iter: int
    cauchy_scale: float


def _robust_covariance(u, jac, res, cauchy_scale):
    """Covariance of the robust transform fit, honest about the sources' scatter.

    ``F_k = J_kᵀ J_k`` is the Fisher matrix of source ``k`` and
    ``s_k = J_kᵀ r_k`` its score. The noise model's covariance is the
    sandwich of the fit with its weights ``u`` held fixed, ``N⁻¹ A N⁻¹``
    with ``N = Σ u_k F_k`` and ``A = Σ u_k² F_k`` (``N⁻¹`` alone overstates
    it by about ``1 / mean(u)``). It holds only where the pixel variances
    describe all the noise; a noisy reference, correlated noise or model
    errors make the sources scatter more about the transform. The scatter
    gives the M-estimator's own sandwich ``H⁻¹ B H⁻¹`` with
    ``B = Σ u_k² s_k s_kᵀ`` and the Hessian of the Cauchy loss
    ``H = N - 2 B / c²`` (the weights fall as a source's excess grows),
    corrected for the share of the scatter the fit absorbs (for fixed weights
    ``tr(A⁻¹ B)`` expects ``P - Σ u_k² tr(A⁻¹ F_k N⁻¹ (2 u_k - A N⁻¹) F_k)``
    instead of ``P``). The mean ratio of the two over the parameters,
    ``tr(cov_model⁻¹ cov_scatter) / P``, is the reduced chi-square of the
    scatter; the noise model's covariance is scaled by it where it exceeds 1
    (never below it, which a lucky realisation of few sources would give).

    Parameters
    ----------
    u : Array, shape (S,)
        Source weights (0 for padding).
    jac : Array, shape (S, n, P)
        Jacobian of every source's weighted residuals.
    res : Array, shape (S, n)
        Weighted residuals at the solution.
    cauchy_scale : float
        ``c`` of the Cauchy loss.

    Returns
    -------
    covariance : Array, shape (P, P)
        Covariance of the parameters.
    inv_normal : Array, shape (P, P)
        ``N⁻¹`` (the Gauss-Newton step is ``N⁻¹`` times the gradient).
    chi2_red : Array, shape ()
        Reduced chi-square of the scatter (1 where the fit has no spare
        degrees of freedom).
    """
    n_params = jac.shape[-1]
    fisher = jnp.einsum("kip,kiq->kpq", jac, jac)
    score = jnp.einsum("kip,ki->kp", jac, res)
    u2 = u * u
    normal = jnp.einsum("k,kpq->pq", u, fisher)
    inv_normal = jnp.linalg.inv(normal)
    meat = jnp.einsum("k,kpq->pq", u2, fisher)
    inv_meat = jnp.linalg.inv(meat)
    model = inv_normal @ meat @ inv_normal
    inner = 2 * u[:, None, None] * inv_normal[None] - model[None]
    spent = jnp.einsum(
        "pq,kqr,krs,ksp->", inv_meat, u2[:, None, None] * fisher, inner, fisher
    )
    free = n_params - spent
    scatter = jnp.einsum("k,kp,kq->pq", u2, score, score)
    inv_hessian = jnp.linalg.inv(normal - 2.0 / cauchy_scale**2 * scatter)
    measured = inv_hessian @ scatter @ inv_hessian * (n_params / free)
    chi2_red = jnp.trace(normal @ inv_meat @ normal @ measured) / n_params
    chi2_red = jnp.where((free > 0.5) & jnp.isfinite(chi2_red), chi2_red, 1.0)
    return model * jnp.maximum(chi2_red, 1.0), inv_normal, chi2_red


def _refine_transform_one(data, center, matrix0, shift0, settings):
    images, variances, valid, ref, ref_valid, pixmap, origin, iscale, source_valid = (
        data
    )
    fitgeom, kind, n_iter, cauchy_scale = settings
    dtype = center.dtype
    images = images.astype(dtype)
    usable = (
        valid & (variances > 0) & jnp.isfinite(images) & source_valid[:, None, None]
    )
    weights = jnp.where(usable, 1.0 / jnp.where(usable, variances, 1.0), 0.0)
    sources = (
        jnp.where(usable, images, 0.0),
        weights.astype(dtype),
        ref,
        ref_valid,
        pixmap,
        origin,
        iscale,
    )
    params0 = _inverse_params(matrix0, shift0, center, fitgeom)
    a0 = _inverse_matrix(params0, fitgeom)

    def all_residuals(params):
        a = _inverse_matrix(params, fitgeom)
        one = functools.partial(_source_residuals, a, params[:2], center, kind=kind)
        r = jax.vmap(one)(sources)
        return r, r

    # Each source's own best chi-square, the floor its chi-square under the
    # transform is compared with: locally the transform is a shift, so a few
    # Gauss-Newton steps in the shift alone, source by source, find it. The
    # loop linearises once per pass; its last pass only reads the chi-square.
    def own_floor(source):
        def residuals(t):
            r = _source_residuals(a0, t, center, source, kind)
            return r, r

        def step(_, state):
            t, _ = state
            jac, r = jax.jacfwd(residuals, has_aux=True)(t)
            normal = jac.T @ jac + 1e-9 * jnp.eye(2, dtype=dtype)
            delta = -jnp.linalg.solve(normal, jac.T @ r)
            delta = delta * jnp.minimum(
                1.0, _MAX_STEP / (jnp.linalg.norm(delta) + 1e-30)
            )
            return t + delta, jnp.sum(r * r)

        start = (params0[:2], jnp.zeros((), dtype))
        return jax.lax.fori_loop(0, 5, step, start)[1]

    floor = jax.vmap(own_floor)(sources)
    linearise = jax.jacfwd(all_residuals, has_aux=True)

    def robust_terms(res):
        """Source weights and the robust loss from the per-source residuals."""
        excess = jnp.maximum(jnp.sum(res * res, axis=1) - floor, 0.0)
        u = jnp.where(source_valid, 1.0 / (1.0 + excess / cauchy_scale**2), 0.0)
        loss = jnp.log1p(excess / cauchy_scale**2)
        return u, jnp.sum(jnp.where(source_valid, loss, 0.0))

    def weighted(u, jac, res):
        """Residuals (and Jacobian) weighted by the fixed source weights."""
        w = jnp.sqrt(u)
        return (w[:, None, None] * jac).reshape(-1, jac.shape[-1]), (
            w[:, None] * res
        ).reshape(-1)

    # Iteratively reweighted Levenberg-Marquardt on the Cauchy loss. The state
    # carries the linearisation at the current point, so the residuals are
    # traced once in the loop (at the trial point).
    def iteration(_, state):
        params, damping, loss, jac_all, res = state
        jac, r = weighted(robust_terms(res)[0], jac_all, res)
        normal = jac.T @ jac
        damped = normal + damping * jnp.diag(jnp.diag(normal) + 1e-12)
        trial = params - jnp.linalg.solve(damped, jac.T @ r)
        trial_jac, trial_res = linearise(trial)
        trial_loss = robust_terms(trial_res)[1]
        better = trial_loss <= loss
        return jax.tree.map(
            lambda new, old: jnp.where(better, new, old),
            (trial, damping / 3.0, trial_loss, trial_jac, trial_res),
            (params, damping * 4.0, loss, jac_all, res),
        )

    jac0, res0 = linearise(params0)
    state = (params0, jnp.asarray(1e-3, dtype), robust_terms(res0)[1], jac0, res0)
    params, _, _, jac_all, res = jax.lax.fori_loop(0, n_iter, iteration, state)
    u = robust_terms(res)[0]
    covariance, inv_normal, chi2_red = _robust_covariance(u, jac_all, res, cauchy_scale)
    jac, r = weighted(u, jac_all, res)
    final_step = inv_normal @ (jac.T @ r)

    matrix = jnp.linalg.inv(_inverse_matrix(params, fitgeom))
    shift = -matrix @ params[:2]
    # s = -M t: propagate the covariance of t through M (M's own error adds
    # only second-order terms near the identity).
    shift_err = jnp.sqrt(jnp.abs(jnp.diag(matrix @ covariance[:2, :2] @ matrix.T)))

    n_sources = jnp.sum(source_valid)
    flags = jnp.where(n_sources * 2 < params.shape[0], FLAG_NO_PIXELS, 0)
    converged = jnp.max(jnp.abs(final_step[:2])) < jnp.maximum(
        _TOLERANCE, 0.05 * jnp.max(shift_err)
    )
    flags |= jnp.where(converged, 0, FLAG_NOT_CONVERGED)
    finite = jnp.all(jnp.isfinite(params)) & jnp.all(jnp.isfinite(covariance))
    flags |= jnp.where(finite, 0, FLAG_NON_FINITE)
    return RefinedTransform(
        matrix=matrix,
        shift=shift,
        params=params,
        covariance=covariance,
        shift_err=shift_err,
        chi2_red=chi2_red,
        source_weight=u,
        flags=flags.astype(jnp.int32),
    )


@functools.partial(
    jax.jit, static_argnames=("fitgeom", "interp", "n_iter", "cauchy_scale")
)
def refine_transform(  # noqa: PLR0913  # seed signature
    images,
    variances,
    valid,
    ref,
    ref_valid,
    pixmap,
    origin,
    iscale,
    source_valid,
    center,
    matrix0,
    shift0,
    *,
    fitgeom: str = "general",
    interp: str = "poly5",
    n_iter: int = 8,
    cauchy_scale: float = 3.0,
) -> RefinedTransform:
    """Refine each image's linear transform through the blot, robustly.

    Minimises, over the parameters of the inverse transform ``T⁻¹`` of the
    chosen geometry, the sum over sources of a Cauchy loss of each source's
    chi-square excess (its chi-square under the transform minus its own best
    chi-square), with every source's flux scale and background profiled out.
    Image pixel ``p`` of source ``k`` samples the reference at
    ``T⁻¹(pixmap[k, p] + origin[k]) - origin[k]``.

    Parameters
    ----------
    images, variances : Array, shape (B, S, H, W)
        Image cutouts (sky-subtracted) and their noise variance, ``B`` images
        of ``S`` (padded) sources.
    valid : Array, shape (B, S, H, W), bool
        Good image pixels.
    ref : Array, shape (B, S, HR, WR)
        Reference cutouts.
    ref_valid : Array, shape (B, S, HR, WR), bool
        Good reference pixels.
    pixmap : Array, shape (B, S, H, W, 2)
        Position of every image pixel in its reference cutout.
    origin : Array, shape (B, S, 2)
        Fit-frame position of each reference cutout's pixel (0, 0).
    iscale : Array, shape (B, S)
        Unit factor of each blot.
    source_valid : Array, shape (B, S), bool
        Real sources (False for padding or rejected sources).
    center : Array, shape (B, 2)
        Centre of the transform (fit-frame pixels).
    matrix0, shift0 : Array, shapes (B, 2, 2) and (B, 2)
        Starting transform (the clipped linear fit of the displacements).
    fitgeom : {'shift', 'rshift', 'rscale', 'general'}, optional
        Geometry of the transform (rscale and rshift are proper rotations).
    interp : str, optional
        Blot interpolation kernel.
    n_iter : int, optional
        Levenberg-Marquardt iterations.
    cauchy_scale : float, optional
        Chi-square excess (in units of its square root) at which a source's
        weight halves.

    Returns
    -------
    RefinedTransform
        Matrix, shift, parameters with covariance, source weights and flags.
    """
    check_kind(interp, name="interp")
    if fitgeom not in TRANSFORM_PARAMS:
        msg = f"fitgeom must be one of {tuple(TRANSFORM_PARAMS)}, got {fitgeom!r}"
        raise ValueError(msg)
    if images.ndim != 4:
        msg = f"images must have shape (B, S, H, W), got {images.shape}"
        raise ValueError(msg)
    settings = _TransformSettings(fitgeom, interp, n_iter, cauchy_scale)
    data = _TransformSources(
        images, variances, valid, ref, ref_valid, pixmap, origin, iscale, source_valid
    )
    return jax.vmap(lambda *args: _refine_transform_one(*args, settings))(
        data, center, matrix0, shift0
    )

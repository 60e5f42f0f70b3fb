"""Standard cutout conditions and the Cramér–Rao bound (host side, numpy).

Implements the test conditions of the project's accuracy notes: a source
(Gaussian, Moffat or exponential disk convolved with a Gaussian) in an
``n x n`` cutout, the four noiseless half-pixel references ``B_ab`` and a
noisy image shifted by a known ``s``; and the Cramér–Rao bound on the
source position for the Poisson + read-noise model. Used by tests and
benchmarks; never traced.

Conventions: arrays ``[y, x]``, positions ``(x, y)``, 0-based pixel centres.
The cross-correlation method returns ``(dx, dy) = -s`` for these cases.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage, special

#: Source kinds accepted by :func:`make_case`.
KINDS: tuple[str, ...] = ("gaussian", "moffat", "sersic")

#: Sky level (e-/pixel) and read noise (e-) of the standard conditions.
SKY = 20.0
READ_NOISE = 5.0

_SUB = 4  # sub-samples per pixel side for the Moffat and disk profiles
_DISK_PSF_SIGMA = 1.2
_B1 = 1.678  # Sersic b_n for n = 1: half the light inside r_e


class Case(NamedTuple):
    """One standard cutout.

    Attributes
    ----------
    image : ndarray, shape (n, n)
        Sky-subtracted noisy image of the source at ``c + phi + s``.
    refs : ndarray, shape (4, n, n)
        Noiseless references ``B_ab(x, y) = M(x + a/2, y + b/2)`` in blot
        order ``(00, 10, 01, 11)``, ``M`` the source at ``c + phi``.
    shift : ndarray, shape (2,)
        True shift ``s = (sx, sy)`` in pixels.
    variance : ndarray, shape (n, n)
        Per-pixel variance of ``image`` (``F P + sky + RN**2``).
    params : dict
        Noiseless model: ``kind``, ``x0``, ``y0`` (image source centre),
        ``flux``, ``sky``, ``read_noise`` and the profile parameters.
    """

    image: np.ndarray
    refs: np.ndarray
    shift: np.ndarray
    variance: np.ndarray
    params: dict


def _profile(params: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Surface brightness (unit total flux) at points relative to the centre."""
    kind = params["kind"]
    r2 = x * x + y * y
    if kind == "moffat":
        alpha, beta = params["alpha"], params["beta"]
        return (beta - 1) / (math.pi * alpha**2) * (1 + r2 / alpha**2) ** (-beta)
    cos, sin = math.cos(params["theta"]), math.sin(params["theta"])
    xr = x * cos + y * sin
    yr = (-x * sin + y * cos) / params["q"]
    scale = params["r_e"] / _B1
    norm = 2 * math.pi * params["q"] * scale**2
    return np.exp(-np.hypot(xr, yr) / scale) / norm


def model_image(params: dict, n: int, offset: tuple[float, float] = (0.0, 0.0)):
    """Pixel-integrated unit-flux profile sampled at ``(x + ox, y + oy)``.

    Parameters
    ----------
    params : dict
        Model parameters (see :class:`Case`); ``x0, y0`` is the centre.
    n : int
        Cutout side.
    offset : tuple of float, optional
        ``(ox, oy)`` added to every pixel centre before sampling.

    Returns
    -------
    ndarray, shape (n, n)
        Fraction of the source flux in each pixel.

    Examples
    --------
    >>> p = {"kind": "gaussian", "x0": 4.0, "y0": 4.0, "sigma": 1.0}
    >>> round(float(model_image(p, 9).sum()), 4)
    0.9999
    """
    ox, oy = offset
    x0 = params["x0"] - ox
    y0 = params["y0"] - oy
    kind = params["kind"]
    if kind == "gaussian":
        s = params["sigma"] * math.sqrt(2.0)
        edges = np.arange(n + 1) - 0.5
        fx = np.diff(special.erf((edges - x0) / s)) / 2
        fy = np.diff(special.erf((edges - y0) / s)) / 2
        return fy[:, None] * fx[None, :]
    pad = 8 if kind == "sersic" else 0
    sub = (np.arange((n + 2 * pad) * _SUB) + 0.5) / _SUB - 0.5 - pad
    flux = _profile(params, sub[None, :] - x0, sub[:, None] - y0) / _SUB**2
    if kind == "sersic":
        flux = ndimage.gaussian_filter(flux, _DISK_PSF_SIGMA * _SUB, mode="constant")
    flux = flux.reshape(n + 2 * pad, _SUB, n + 2 * pad, _SUB).sum(axis=(1, 3))
    return flux[pad : pad + n, pad : pad + n]


def _draw_params(kind: str, rng: np.random.Generator) -> dict:
    if kind == "gaussian":
        return {"kind": kind, "sigma": rng.uniform(1.0, 1.5)}
    if kind == "moffat":
        beta = 2.5
        fwhm = rng.uniform(2.4, 3.5)
        alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
        return {"kind": kind, "beta": beta, "fwhm": fwhm, "alpha": alpha}
    return {
        "kind": kind,
        "r_e": rng.uniform(1.0, 2.5),
        "q": rng.uniform(0.5, 1.0),
        "theta": rng.uniform(0, math.pi),
    }


def make_case(
    kind: str,
    snr: float,
    n: int,
    rng: np.random.Generator,
    *,
    sigma: float | None = None,
) -> Case:
    """Draw one standard cutout (see the module docstring).

    Parameters
    ----------
    kind : {'gaussian', 'moffat', 'sersic'}
        Source profile ('sersic' is the exponential disk convolved with a
        sigma 1.2 px Gaussian).
    snr : float
        Peak-pixel S/N ``p / sqrt(p + sky + RN**2)`` of the image.
    n : int
        Cutout side (25 or 41 in the standard set).
    rng : numpy.random.Generator
        Random source.
    sigma : float, optional
        Fixed Gaussian PSF sigma in px (``kind='gaussian'`` only), e.g. 0.6
        for an undersampled PSF; default drawn from U[1.0, 1.5].

    Returns
    -------
    Case
        Image, references, true shift, variance and model parameters.

    Raises
    ------
    ValueError
        For an unknown ``kind``, ``snr <= 0`` or ``n < 5``.

    Examples
    --------
    >>> case = make_case("gaussian", 100.0, 25, np.random.default_rng(1))
    >>> case.image.shape, case.refs.shape, bool(np.all(abs(case.shift) <= 1.5))
    ((25, 25), (4, 25, 25), True)
    """
    if kind not in KINDS:
        msg = f"kind must be one of {KINDS}, got {kind!r}"
        raise ValueError(msg)
    if not snr > 0:
        msg = f"snr must be positive, got {snr!r}"
        raise ValueError(msg)
    if n < 5:
        msg = f"n must be >= 5, got {n!r}"
        raise ValueError(msg)
    c = (n - 1) / 2
    phi = rng.uniform(-0.5, 0.5, 2)
    shift = rng.uniform(-1.5, 1.5, 2)
    params = _draw_params(kind, rng)
    if sigma is not None:
        if kind != "gaussian" or not sigma > 0:
            msg = f"sigma needs kind='gaussian' and a positive value, got {sigma!r}"
            raise ValueError(msg)
        params["sigma"] = float(sigma)
    ref_params = dict(params, x0=c + phi[0], y0=c + phi[1])
    refs = np.stack(
        [
            model_image(ref_params, n, (a / 2, b / 2))
            for a, b in ((0, 0), (1, 0), (0, 1), (1, 1))
        ]
    )
    params.update(x0=c + phi[0] + shift[0], y0=c + phi[1] + shift[1])
    unit = model_image(params, n)
    noise2 = SKY + READ_NOISE**2
    peak = (snr**2 + math.sqrt(snr**4 + 4 * snr**2 * noise2)) / 2
    flux = peak / unit.max()
    params.update(flux=flux, sky=SKY, read_noise=READ_NOISE)
    mu = flux * unit + SKY
    image = rng.poisson(mu) + rng.normal(0.0, READ_NOISE, mu.shape) - SKY
    return Case(
        image=image,
        refs=flux * refs,
        shift=shift,
        variance=mu + READ_NOISE**2,
        params=params,
    )


def cramer_rao_bound(params: dict, n: int, *, step: float = 1e-3) -> np.ndarray:
    """Cramér–Rao bound on the source position of one cutout.

    The model is ``mu_i = F P_i(x0, y0) + b`` with ``theta = (x0, y0, F, b)``
    and variance ``mu_i + RN**2``; the Fisher information is ``I_jk =
    sum_i d_j mu_i d_k mu_i / var_i`` (position derivatives by central
    differences).

    Parameters
    ----------
    params : dict
        Model parameters of a :class:`Case` (``flux``, ``sky``,
        ``read_noise``, ``x0``, ``y0``, profile).
    n : int
        Cutout side.
    step : float, optional
        Finite-difference step in pixels.

    Returns
    -------
    ndarray, shape (2,)
        Lower bounds on the 1-sigma errors of ``(x0, y0)`` in pixels.

    Examples
    --------
    >>> case = make_case("gaussian", 100.0, 25, np.random.default_rng(1))
    >>> bool(0.002 < cramer_rao_bound(case.params, 25)[0] < 0.01)
    True
    """
    flux = params["flux"]
    unit = model_image(params, n)

    def moved(dx, dy):
        return model_image(dict(params, x0=params["x0"] + dx, y0=params["y0"] + dy), n)

    d_x = flux * (moved(step, 0) - moved(-step, 0)) / (2 * step)
    d_y = flux * (moved(0, step) - moved(0, -step)) / (2 * step)
    grads = np.stack([d_x, d_y, unit, np.ones_like(unit)]).reshape(4, -1)
    var = (flux * unit + params["sky"] + params["read_noise"] ** 2).ravel()
    fisher = (grads / var) @ grads.T
    cov = np.linalg.inv(fisher)
    return np.sqrt(np.diag(cov)[:2])


def refinement_inputs(images, variances, refs, dxdy0) -> tuple:
    """Arguments of ``refine_displacements`` for a batch of standard cutouts.

    The four half-pixel references ``B_ab`` of each case are interlaced into
    one 2x-supersampled reference ``G[2j + b, 2i + a] = B_ab[j, i]``, which
    image pixel ``(i, j)`` samples at ``(2i, 2j)`` (Jacobian ``2·I``).

    Parameters
    ----------
    images, variances : ndarray, shape (N, n, n)
        Noisy images and their variances (stacked :class:`Case` fields).
    refs : ndarray, shape (N, 4, n, n)
        The cases' references in blot order (00, 10, 01, 11).
    dxdy0 : ndarray, shape (N, 2)
        Starting displacements.

    Returns
    -------
    tuple of ndarray
        ``(images, variances, valid, ref, ref_valid, pixmap, jacobian,
        iscale, dxdy0)`` in the order ``refine_displacements`` takes them.

    Examples
    --------
    >>> case = make_case("gaussian", 100.0, 9, np.random.default_rng(0))
    >>> args = refinement_inputs(case.image[None], case.variance[None],
    ...                          case.refs[None], np.zeros((1, 2)))
    >>> args[3].shape, args[5][0, 1, 2].tolist()
    ((1, 18, 18), [4.0, 2.0])
    """
    images = np.asarray(images)
    n_src, n = images.shape[0], images.shape[-1]
    refs = np.asarray(refs)
    grid = np.zeros((n_src, 2 * n, 2 * n))
    for k, (a, b) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        grid[:, b::2, a::2] = refs[:, k]
    yy, xx = np.mgrid[0:n, 0:n]
    pixmap = np.broadcast_to(np.stack([2.0 * xx, 2.0 * yy], -1), (n_src, n, n, 2))
    return (
        images,
        np.asarray(variances),
        np.ones(images.shape, bool),
        grid,
        np.ones(grid.shape, bool),
        pixmap,
        np.broadcast_to(2.0 * np.eye(2), (n_src, 2, 2)),
        np.ones(n_src),
        np.asarray(dxdy0),
    )


def texture_references(n: int = 512, seed: int = 0) -> np.ndarray:
    """Four half-pixel samplings of a band-limited, natural-looking texture.

    A Gaussian random field with a power-law spectrum (amplitude
    ``(k + 0.01)**-1.5``) cut off smoothly at 0.25 cycles/pixel, periodic
    over ``n`` pixels and sampled exactly (Fourier shift) at ``(x + a/2, y +
    b/2)``, shifted positive with a pedestal. Signal reaches every edge, so
    it tests lag symmetry: ``refs[0]`` correlated with ``refs`` must give 0.

    Parameters
    ----------
    n : int, optional
        Side in pixels.
    seed : int, optional
        Random seed.

    Returns
    -------
    ndarray, shape (4, n, n)
        Blot order ``(00, 10, 01, 11)``.

    Examples
    --------
    >>> refs = texture_references(32)
    >>> refs.shape, bool(refs.min() > 0)
    ((4, 32, 32), True)
    """
    rng = np.random.default_rng(seed)
    kx, ky = np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n))
    k = np.hypot(kx, ky)
    amp = (k + 0.01) ** -1.5 * np.exp(-((k / 0.25) ** 2))
    spec = amp * (rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n)))
    refs = np.stack(
        [
            np.fft.ifft2(spec * np.exp(1j * np.pi * (kx * a + ky * b))).real
            for a, b in ((0, 0), (1, 0), (0, 1), (1, 1))
        ]
    )
    return refs - refs.min() + refs.std()

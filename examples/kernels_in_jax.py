"""Use the kernels inside your own jitted JAX code.

1. Differentiate through the blot: recover a sub-pixel shift between a
   reference and an "observed" image by minimising a chi-square with
   ``jax.value_and_grad`` through :func:`subpixal_jax.core.blot.blot` and a
   few optax steps, all inside one ``jax.jit``.
2. Measure the displacements of a batch of sources with
   :func:`subpixal_jax.core.xcorr.find_displacements` (one compiled call for
   the whole batch), again from inside a jitted function.

    python examples/kernels_in_jax.py [--steps 6] [--n-sources 16]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from subpixal_jax.core.blot import blot
from subpixal_jax.core.xcorr import find_displacements

SIZE = 48


def gaussian_scene(x, y, centres, fluxes, sigma=1.5):
    """Sum of Gaussian sources at ``centres`` (N, 2) evaluated at (x, y)."""
    dx = x[None] - centres[:, 0, None, None]
    dy = y[None] - centres[:, 1, None, None]
    stars = fluxes[:, None, None] * jnp.exp(-(dx**2 + dy**2) / (2 * sigma**2))
    return jnp.sum(stars, axis=0)


def fit_shift(steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    centres = jnp.asarray(rng.uniform(8, SIZE - 8, size=(6, 2)))
    fluxes = jnp.asarray(rng.uniform(50, 200, size=6))
    y, x = jnp.mgrid[0:SIZE, 0:SIZE].astype(jnp.float32)
    reference = gaussian_scene(x, y, centres, fluxes)
    grid = jnp.stack([x, y], axis=-1)  # pixmap: output pixel -> (x, y) in reference
    true_shift = jnp.array([0.37, -0.81])
    noise = 0.5
    observed = blot(reference, grid + true_shift) + noise * jnp.asarray(
        rng.standard_normal((SIZE, SIZE)), jnp.float32
    )

    def chi2(shift):
        model = blot(reference, grid + shift)
        # Leave out the border, where the shifted kernel leaves the image.
        resid = (observed - model)[6:-6, 6:-6] / noise
        return jnp.sum(resid**2)

    @jax.jit
    def run(shift):
        # Newton steps: gradient and Hessian of chi2 both flow through the
        # blot's interpolation kernel.
        def step(shift, _):
            value, grad = jax.value_and_grad(chi2)(shift)
            hess = jax.hessian(chi2)(shift)
            return shift - jnp.linalg.solve(hess, grad), value

        return jax.lax.scan(step, shift, None, length=steps)

    shift, history = run(jnp.zeros(2))
    print("1. chi-square minimised through the blot (jax.grad + jax.hessian)")
    print(f"   chi2: {float(history[0]):.1f} -> {float(history[-1]):.1f}")
    print(f"   true shift      {np.round(np.asarray(true_shift), 3)}")
    print(f"   recovered shift {np.round(np.asarray(shift), 3)}")


def batch_displacements(n_sources: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 15
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)

    def g(x0, y0):
        return np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / 4.0)

    truth = rng.uniform(-1.5, 1.5, size=(n_sources, 2))
    # Each source: the exposure cutout has the star at (7, 7) - d, the four
    # half-pixel blots sample the reference star at (7, 7) moved by (a/2, b/2).
    refs = np.stack([g(7.0 - dx, 7.0 - dy) for dx, dy in truth])
    one = np.stack(
        [g(7.0 - a / 2, 7.0 - b / 2) for a, b in ((0, 0), (1, 0), (0, 1), (1, 1))]
    )
    blots = np.broadcast_to(one, (n_sources, *one.shape))

    measure = jax.jit(lambda r, b: find_displacements(r, b, cc_type="NCC").dxdy)
    found = np.asarray(measure(refs, blots))
    error = np.hypot(*(found - truth).T)  # d = position in blot - position in image
    print(f"2. find_displacements on a batch of {n_sources} sources (one jit call)")
    print(f"   {'true dx':>8} {'dy':>7} {'found dx':>9} {'dy':>7}")
    for (tx, ty), (fx, fy) in list(zip(truth, found, strict=True))[:5]:
        print(f"   {tx:>8.3f} {ty:>7.3f} {fx:>9.3f} {fy:>7.3f}")
    print(f"   max error over the batch: {error.max():.3f} px")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--n-sources", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fit_shift(args.steps, args.seed)
    batch_displacements(args.n_sources, args.seed)


if __name__ == "__main__":
    main()

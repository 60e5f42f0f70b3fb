"""Typed linear transforms of the fit frame and their decomposition.

Convention (the linear fit's, tweakwcs'): a transform maps fit-frame pixels
``uv`` to ``xy = M (uv - c) + c + s``. :class:`Affine` is the correction an
image receives; :class:`RefinedFit` is a transform refined through the blot,
with its own errors, kept apart from the clipped fit it started from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from subpixal_jax.core.linfit import LinearFit, describe_matrix


@dataclasses.dataclass(frozen=True)
class Affine:
    """``xy = matrix (uv - center) + center + shift`` in fit-frame pixels.

    Examples
    --------
    >>> a = Affine.identity([10.0, 10.0])
    >>> b = Affine(np.eye(2), np.array([0.5, -0.25]), np.array([10.0, 10.0]))
    >>> a.then(b).shift.tolist()
    [0.5, -0.25]
    """

    matrix: np.ndarray
    shift: np.ndarray
    center: np.ndarray

    def __post_init__(self) -> None:
        for name in ("matrix", "shift", "center"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), float))

    @classmethod
    def identity(cls, center) -> Affine:
        """Return the transform that changes nothing."""
        return cls(np.eye(2), np.zeros(2), np.asarray(center, float))

    def apply(self, uv: np.ndarray) -> np.ndarray:
        """Map points ``uv`` (``(N, 2)``, fit-frame pixels)."""
        return (uv - self.center) @ self.matrix.T + self.center + self.shift

    def then(self, after: Affine) -> Affine:
        """Total correction of applying ``after`` once ``self`` has been applied.

        A WCS corrected by ``self`` and then by ``after`` maps its pixels as
        if corrected once by ``self ∘ after`` (the corrected WCS is
        ``L (T_self T_after)^-1 L^-1 W_0``), which this returns. Both must
        share the centre.
        """
        return Affine(
            self.matrix @ after.matrix,
            self.matrix @ after.shift + self.shift,
            self.center,
        )

    def describe(self, fitgeom: str = "general") -> dict[str, Any]:
        """Rotation, scale and skew (tweakwcs names) of :attr:`matrix`."""
        return describe(self.matrix, fitgeom)


# One compiled kernel per fit geometry: called eagerly, the decomposition's
# ~20 small operations were each compiled (or loaded from the cache) once per
# process, ~0.5 s of a new command-line process.
_describe_matrix = jax.jit(describe_matrix, static_argnums=0)


def describe(matrix: np.ndarray, fitgeom: str = "general") -> dict[str, Any]:
    """Decompose a fit matrix (the kernels' one decomposition, as numpy values)."""
    with jax.enable_x64(True):
        fields = _describe_matrix(fitgeom, np.asarray(matrix, np.float64))
        return {k: np.asarray(v) for k, v in fields.items()}


def fit_affine(fit: LinearFit) -> Affine:
    """Return the transform of a linear fit."""
    return Affine(fit.matrix, fit.shift, fit.center)


@dataclasses.dataclass(frozen=True)
class RefinedFit:
    """A whole transform refined through the blot (``refine='transform'``).

    Attributes
    ----------
    affine : Affine
        The refined transform.
    shift_err : ndarray, shape (2,)
        1-sigma error of the refined shift (fit-frame pixels).
    covariance : ndarray
        Covariance of the refinement's own parameters.
    rot, scale, skew
        Decomposition of the refined matrix (degrees, ratio, degrees).
    """

    affine: Affine
    shift_err: np.ndarray
    covariance: np.ndarray
    rot: np.ndarray
    scale: np.ndarray
    skew: float

    @classmethod
    def from_matrix(
        cls, affine: Affine, shift_err, covariance, fitgeom: str
    ) -> RefinedFit:
        """Build the record, decomposing the matrix once."""
        parts = describe(affine.matrix, fitgeom)
        return cls(
            affine,
            np.asarray(shift_err, float),
            np.asarray(covariance, float),
            parts["rot"],
            parts["scale"],
            float(parts["skew"]),
        )

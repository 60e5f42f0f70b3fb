r"""Match two 2-D point sets that differ by an unknown similarity transform.

The sub-pixel alignment only sees offsets that fit inside a source cutout. A
larger initial error (tens to hundreds of pixels, degrees of rotation, a
wrong pixel scale) must first be captured by matching catalogs.
:func:`match_points` does that for two point lists in one pixel frame (pure
numpy/scipy, no WCS): ``xy`` (the points to move) and ``ref`` (the reference),
related by

.. math:: x_\mathrm{ref} \approx M (x - c) + c + s,

``M`` a rotation times a scale (or any 2x2 matrix with ``fitgeom='general'``),
``s`` the shift at the centre ``c``. This is the convention of
:func:`subpixal_jax.linearfit.iter_linear_fit` with ``xy = ref`` and
``uv = xy``.

Method
------
Triangle (asterism) matching, as in Groth (1986, AJ 91, 1244), Valdes et al.
(1995, PASP 107, 1119) and astroalign (Beroiz et al. 2020): the shape of a
triangle, two ratios of its sorted sides, does not change under a similarity
transform, so triangles can be compared without knowing the shift, rotation
or scale. Why this and not a rotation/scale grid plus a 2-D histogram of
pairwise offsets (tweakwcs' ``2dhist``):

* **unknown scale and rotation cost nothing.** A histogram of offsets needs
  one histogram per trial rotation and scale; with rotations of ±5° and
  scales 0.5–2 the grid needs hundreds of cells (the step must keep the
  extrapolated error across the field below the histogram bin), each
  ``O(N²)`` pairs within ``max_shift``. Triangles give rotation and scale
  directly from three points.
* **crowding.** Triangles are built from each point and its few nearest
  neighbours (``O(N k²)`` triangles, not ``O(N³)``), so they stay local and
  their number grows linearly with ``N``; the 2-D offset histogram of a
  crowded field fills with chance pairs, its peak over the background falls
  as ``1/√N``.
* **cost.** Building triangles, matching their invariants and voting are
  vectorised k-d tree queries (``scipy.spatial.cKDTree``); 2 × 1000 points
  take a few hundred ms (``benchmarks/bench_capture.py``).
* **accuracy.** A triangle gives only a rough transform; the result comes
  from a sigma-clipped least-squares fit over all matched points
  (:func:`~subpixal_jax.linearfit.iter_linear_fit`), so it is as precise as
  the positions (~0.01 px for hundreds of matches).

Steps:

1. Triangles: each point with its ``n_neighbors`` nearest neighbours, all
   triangles among them, deduplicated. Invariants ``(L₂/L₁, L₃/L₁)`` of the
   sorted sides ``L₁ ≥ L₂ ≥ L₃``, plus the orientation (a similarity without
   reflection keeps it). Vertices are ordered by their opposite side, so a
   pair of matched triangles gives three point pairs; triangles whose sides
   are too close in length for a stable order are dropped.
2. Every pair of triangles with invariants within ``invariant_tolerance``
   gives a similarity hypothesis (log scale, angle, shift at ``c``); those
   outside the priors (``max_shift``, ``max_rotation``, ``scale_range``) are
   dropped.
3. Hough-style vote: the true transform is where hypotheses pile up. Each
   hypothesis counts its neighbours in the 4-D parameter space; the densest
   ones seed candidates (each seed's neighbours give a least-squares
   similarity from their vertex pairs), then every candidate is scored on
   **all** points: one-to-one nearest-neighbour pairs within ``tolerance``,
   refitted a few times with a shrinking radius.
4. If no candidate reaches ``min_matches``, steps 1–3 run again on the
   brightest 150 points with ``fallback_neighbors`` (9) neighbours: local
   triangles fail when the common sources are a small minority (their
   nearest neighbours are unrelated sources); wider neighbourhoods still
   hold common triangles, at a cost acceptable for 150 points.
5. The best candidate is refitted with clipping (``iter_linear_fit``,
   ``fitgeom``). Its match count is compared with the best *distinct*
   candidate (one whose transform differs by more than ``tolerance`` RMS over
   the points, counted by the pairs it does not share with the winner) and
   with the number expected by chance (``N_xy ρ_ref π tolerance²``).

Never a silent wrong answer: a result is :attr:`MatchStatus.OK` only with at
least ``min_matches`` matches and a ``significance`` (best matches over
``max(second best, chance, 1)``) of at least ``min_significance``. A regular
grid, pure noise or too little overlap give a non-OK status whose ``reason``
names the numbers.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import math

import numpy as np
from numpy.typing import ArrayLike
from scipy.spatial import cKDTree

from subpixal_jax.core.linfit import FITGEOM_MIN_POINTS, FitStatus, LinearFit
from subpixal_jax.geometry.transform import describe
from subpixal_jax.linearfit import iter_linear_fit

__all__ = ["MatchResult", "MatchStatus", "match_points"]

log = logging.getLogger(__name__)

#: Refinement radii of a candidate, in units of ``tolerance``.
_REFINE_RADII = (4.0, 2.0, 1.0, 1.0)
#: Sizes of the brightest-first subsets that also form triangles.
_SUBSET_SIZES = (15, 50, 150)
#: Points of each set searched again with larger neighbourhoods.
_FALLBACK_POINTS = 150
#: Smallest relative gap between sorted triangle sides (stable vertex order).
_SIDE_GAP = 0.03


class MatchStatus(enum.IntEnum):
    """Outcome of a point-set match."""

    #: A unique, significant match with at least ``min_matches`` pairs.
    OK = 0
    #: Another, different transform matches almost as many points (e.g. a
    #: regular grid), or the best one is not above chance.
    AMBIGUOUS = 1
    #: The best transform matches fewer than ``min_matches`` points.
    TOO_FEW_MATCHES = 2
    #: A point set has fewer than 3 usable points.
    NO_SOURCES = 3


class TransformSummary:
    """Status and decomposition shared by the matching results.

    The rotation and scale come from the library's one decomposition of a fit
    matrix (:func:`subpixal_jax.geometry.transform.describe`, tweakwcs conventions).
    """

    @property
    def ok(self) -> bool:
        """Whether ``status`` is OK."""
        return self.status == MatchStatus.OK

    @property
    def scale(self) -> float:
        """``sqrt(|det M|)``."""
        return float(describe(self.matrix, "rscale")["mean_scale"])

    @property
    def rotation(self) -> float:
        """Rotation of ``M`` in degrees (tweakwcs sign, ``WcsError.rotation``)."""
        return float(describe(self.matrix, "rscale")["proper_rot"])


@dataclasses.dataclass(frozen=True)
class MatchResult(TransformSummary):
    r"""The transform between two point sets and the pairs that support it.

    The transform maps ``xy`` onto ``ref``:
    ``x_ref ≈ matrix @ (x − center) + center + shift``. Only use it when
    ``status`` is :attr:`MatchStatus.OK`; otherwise it is the best candidate
    found (or the identity), kept for diagnostics.

    Attributes
    ----------
    status : MatchStatus
        Outcome.
    reason : str
        Human-readable explanation with the numbers behind ``status``.
    matrix : numpy.ndarray, shape (2, 2)
        ``M`` (tweakwcs orientation: ``x' = M[0,0] x + M[0,1] y``).
    shift : numpy.ndarray, shape (2,)
        ``s`` at ``center``, in pixels.
    center : numpy.ndarray, shape (2,)
        ``c``.
    pairs : numpy.ndarray of int, shape (n_matches, 2)
        Matched indices ``(i_xy, i_ref)``: one-to-one nearest pairs within
        ``tolerance`` under the final transform.
    n_matches : int
        Number of pairs.
    rms : float
        RMS distance of the pairs after the fit, pixels (NaN if none).
    n_second : int
        Matches of the best candidate that differs from the winner.
    n_random : float
        Matches expected by chance for any transform.
    significance : float
        ``n_matches / max(n_second, n_random, 1)``.
    n_hypotheses : int
        Triangle-pair hypotheses inside the priors.
    fit : LinearFit or None
        The final clipped fit (``xy`` → ``ref``); None when it was not made
        (fewer than ``min_matches`` pairs) or failed.
    """

    status: MatchStatus
    reason: str
    matrix: np.ndarray
    shift: np.ndarray
    center: np.ndarray
    pairs: np.ndarray
    n_matches: int
    rms: float
    n_second: int
    n_random: float
    significance: float
    n_hypotheses: int
    fit: LinearFit | None = None

    def apply(self, xy: ArrayLike) -> np.ndarray:
        """Map points of the ``xy`` set into the ``ref`` frame.

        Parameters
        ----------
        xy : array_like, shape (N, 2)
            Points ``(x, y)``.

        Returns
        -------
        numpy.ndarray, shape (N, 2)
            ``M (xy − c) + c + s``.
        """
        xy = np.asarray(xy, dtype=np.float64)
        return (xy - self.center) @ self.matrix.T + self.center + self.shift


# ---------------------------------------------------------------------------
# Validation


def _check_points(name: str, value: ArrayLike) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        msg = f"{name} must have shape (N, 2), got {arr.shape}"
        raise ValueError(msg)
    return arr


def _check_positive(name: str, value, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        msg = f"{name} must be a positive number, got {value!r}"
        raise ValueError(msg)
    return v


# ---------------------------------------------------------------------------
# Triangles


def _triangles(pts: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Local triangles of a point set: ordered vertices (T, 3) and keys (T, 3).

    Vertices are ordered by the length of the opposite side, longest first;
    keys are ``(L₂/L₁, L₃/L₁, orientation)`` with the orientation scaled so
    that triangles of opposite handedness are never within a tolerance.
    """
    # Neighbourhoods among the brightest 15, 50 and 150 points and among
    # all: when one catalog is deeper, the bright subsets still share their
    # neighbours (and give large triangles that span the field).
    sizes = [m for m in _SUBSET_SIZES if m < len(pts)] + [len(pts)]
    tris = []
    for n in sizes:
        k = min(n_neighbors + 1, n)
        _, nn = cKDTree(pts[:n]).query(pts[:n], k=k)
        nn = np.asarray(nn).reshape(n, k)
        combos = np.array(list(itertools.combinations(range(k), 3)))
        tris.append(nn[:, combos].reshape(-1, 3))
    tri = np.sort(np.concatenate(tris), axis=1).astype(np.int64)
    m = len(pts)
    key = np.unique((tri[:, 0] * m + tri[:, 1]) * m + tri[:, 2])
    tri = np.column_stack([key // (m * m), (key // m) % m, key % m])
    p = pts[tri]  # (T, 3, 2)
    # side opposite vertex v
    opp = np.stack(
        [
            np.hypot(*(p[:, 1] - p[:, 2]).T),
            np.hypot(*(p[:, 0] - p[:, 2]).T),
            np.hypot(*(p[:, 0] - p[:, 1]).T),
        ],
        axis=1,
    )
    order = np.argsort(-opp, axis=1)
    sides = np.take_along_axis(opp, order, axis=1)
    tri = np.take_along_axis(tri, order, axis=1)
    ok = sides[:, 2] > 0
    lmax = np.where(ok, sides[:, 0], 1.0)
    gaps = np.diff(-sides, axis=1) / lmax[:, None]
    ok &= np.all(gaps > _SIDE_GAP, axis=1)
    tri = tri[ok]
    sides = sides[ok]
    q = pts[tri]
    d1 = q[:, 1] - q[:, 0]
    d2 = q[:, 2] - q[:, 0]
    orient = np.sign(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])
    keys = np.column_stack(
        [sides[:, 1] / sides[:, 0], sides[:, 2] / sides[:, 0], 10.0 * orient]
    )
    return tri, keys


def _similarity(zx: np.ndarray, zr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``zr ≈ a zx + b`` along the last axis (complex points)."""
    mx = zx.mean(axis=-1, keepdims=True)
    mr = zr.mean(axis=-1, keepdims=True)
    dx = zx - mx
    num = np.sum((zr - mr) * np.conj(dx), axis=-1)
    den = np.sum(np.abs(dx) ** 2, axis=-1)
    a = num / np.where(den > 0, den, 1.0)
    b = mr[..., 0] - a * mx[..., 0]
    return a, b


def _density(feats: np.ndarray) -> np.ndarray:
    """Neighbour count of every row in cells of width 2 (two staggered grids).

    A histogram instead of a ball count per row: the true cluster holds
    thousands of hypotheses, and ball counts cost the square of that.
    """
    best = np.zeros(len(feats), dtype=np.intp)
    for offset in (0.0, 1.0):
        cells = np.floor((feats + offset) / 2.0).astype(np.int64)
        cells -= cells.min(axis=0)
        key = np.ravel_multi_index(cells.T, tuple(cells.max(axis=0) + 1))
        _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        best = np.maximum(best, counts[inverse])
    return best


def _complex(pts: np.ndarray) -> np.ndarray:
    return pts[..., 0] + 1j * pts[..., 1]


def _matrix_of(a: complex) -> np.ndarray:
    return np.array([[a.real, -a.imag], [a.imag, a.real]])


def _fit_transform(x: np.ndarray, r: np.ndarray, general: bool):
    """Least squares ``r ≈ A x + t`` (similarity, or affine if ``general``)."""
    if general and len(x) >= 3:
        design = np.column_stack([x, np.ones(len(x))])
        coef, *_ = np.linalg.lstsq(design, r, rcond=None)
        return coef[:2].T, coef[2]
    a, b = _similarity(_complex(x), _complex(r))
    return _matrix_of(complex(a)), np.array([b.real, b.imag])


def _pairs(mapped: np.ndarray, tree: cKDTree, radius: float):
    """One-to-one nearest pairs ``(i, j)`` closer than ``radius``."""
    d, j = tree.query(mapped, distance_upper_bound=radius)
    ok = np.isfinite(d)
    i = np.nonzero(ok)[0]
    j = j[ok]
    d = d[ok]
    order = np.lexsort((d, j))
    i, j, d = i[order], j[order], d[order]
    first = np.r_[True, j[1:] != j[:-1]] if len(j) else np.zeros(0, bool)
    return i[first], j[first]


def _refine(x, r, tree, matrix, shift, tolerance, general):
    """Re-pair and refit with shrinking radii; return the candidate and pairs."""
    i = j = np.zeros(0, dtype=np.intp)
    for factor in _REFINE_RADII:
        i, j = _pairs(x @ matrix.T + shift, tree, factor * tolerance)
        if len(i) < 3:
            break
        matrix, shift = _fit_transform(x[i], r[j], general)
    i, j = _pairs(x @ matrix.T + shift, tree, tolerance)
    return matrix, shift, i, j


def _search(
    x,
    r,
    limit,
    n_neighbors,
    *,
    tree_r,
    tolerance,
    priors,
    invariant_tolerance,
    max_candidates,
    general,
):
    """Triangle hypotheses, Hough vote and candidate transforms scored on all points.

    Returns ``(candidates, n_hypotheses, (n_triangles_xy, n_triangles_ref))``
    with candidates ``(n_pairs, matrix, shift, i, j)`` about the origin.
    """
    smin, smax, max_rotation, max_shift = priors
    tri_x, key_x = _triangles(x[:limit], n_neighbors)
    tri_r, key_r = _triangles(r[:limit], n_neighbors)
    n_tri = (len(tri_x), len(tri_r))
    if not (len(tri_x) and len(tri_r)):
        return [], 0, n_tri
    near = cKDTree(key_x).sparse_distance_matrix(
        cKDTree(key_r), invariant_tolerance, output_type="ndarray"
    )
    hyp = np.column_stack([near["i"], near["j"]]).astype(np.intp)
    zx = _complex(x[tri_x[hyp[:, 0]]])
    zr = _complex(r[tri_r[hyp[:, 1]]])
    a, b = _similarity(zx, zr)
    # a is about the origin (= c): b is the shift at c.
    scale = np.abs(a)
    angle = np.angle(a)
    inside = (scale >= smin) & (scale <= smax)
    if max_rotation is not None:
        inside &= np.abs(angle) <= math.radians(max_rotation)
    if max_shift is not None:
        inside &= np.abs(b) <= max_shift
    zx, zr = zx[inside], zr[inside]
    b, scale, angle = b[inside], scale[inside], angle[inside]
    n_hyp = len(zx)
    if n_hyp == 0:
        return [], 0, n_tri

    # Vote in (log scale, angle, shift): the radius of the shift axis allows
    # for a triangle's angle error extrapolated to the field's extent.
    extent = float(np.sqrt(np.mean(np.sum(x**2, axis=1))))
    ang_tol = 0.01
    shift_tol = max(3.0 * tolerance, ang_tol * extent)
    feats = np.column_stack(
        [
            np.log(scale) / ang_tol,
            angle / ang_tol,
            b.real / shift_tol,
            b.imag / shift_tol,
        ]
    )
    density = _density(feats)
    tree_f = cKDTree(feats)
    candidates = []
    used = np.zeros(n_hyp, dtype=bool)
    for seed in np.argsort(-density, kind="stable"):
        if len(candidates) >= max_candidates or density[seed] < 2:
            break
        if used[seed]:
            continue
        members = np.asarray(tree_f.query_ball_point(feats[seed], 1.0), dtype=np.intp)
        seed_a, seed_b = _similarity(zx[members].ravel(), zr[members].ravel())
        matrix = _matrix_of(complex(seed_a))
        shift = np.array([seed_b.real, seed_b.imag])
        matrix, shift, i, j = _refine(x, r, tree_r, matrix, shift, tolerance, general)
        candidates.append((len(i), matrix, shift, i, j))
        # Hypotheses this candidate explains need no seed of their own (they
        # lie near it in parameter space).
        todo = np.asarray(tree_f.query_ball_point(feats[seed], 4.0), dtype=np.intp)
        todo = todo[~used[todo]]
        a_c = complex(matrix[0, 0], matrix[1, 0])
        b_c = complex(*shift)
        err = np.max(np.abs(a_c * zx[todo] + b_c - zr[todo]), axis=1)
        used[todo[err < 4.0 * tolerance]] = True
        used[members] = True
    return candidates, n_hyp, n_tri


# ---------------------------------------------------------------------------
# Public entry point


def match_points(
    xy: ArrayLike,
    ref: ArrayLike,
    *,
    tolerance: float = 2.0,
    max_shift: float | None = None,
    max_rotation: float | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    fitgeom: str = "rscale",
    center: ArrayLike | None = None,
    min_matches: int = 15,
    min_significance: float = 2.0,
    max_points: int | None = 1000,
    n_neighbors: int = 5,
    fallback_neighbors: int | None = 9,
    invariant_tolerance: float = 0.01,
    max_candidates: int = 12,
    nclip: int | None = 3,
    sigma: float = 3.0,
) -> MatchResult:
    r"""Find the transform that maps ``xy`` onto ``ref`` and the matched pairs.

    Parameters
    ----------
    xy, ref : array_like, shape (N, 2) and (M, 2)
        Point positions ``(x, y)`` in one pixel frame; ``xy`` is mapped onto
        ``ref``. Order them brightest first: only the first ``max_points``
        build triangles (all points are used for the final match). Rows with
        non-finite values are ignored.
    tolerance : float, optional
        Match radius after the transform, pixels of the frame.
    max_shift : float or None, optional
        Largest ``|s|`` (at ``center``) considered, pixels; None: any.
    max_rotation : float or None, optional
        Largest rotation considered, degrees; None: any.
    scale_range : (float, float), optional
        Smallest and largest scale ``sqrt|det M|`` considered.
    fitgeom : {'shift', 'rshift', 'rscale', 'general'}, optional
        Geometry of the final clipped fit (the search always uses a
        similarity).
    center : array_like, shape (2,), optional
        ``c``; default the mean of the finite ``xy`` points.
    min_matches : int, optional
        Fewest matched pairs for an OK result.
    min_significance : float, optional
        Smallest ``n_matches / max(n_second, n_random, 1)`` for an OK result.
    max_points : int or None, optional
        Points of each set (the first ones) used to build triangles.
    n_neighbors : int, optional
        Neighbours of each point that form its triangles.
    fallback_neighbors : int or None, optional
        When the first search finds fewer than ``min_matches`` pairs, search
        again among the brightest 150 points with this many neighbours
        (more triangles: finds a few common sources among many unrelated
        ones); None disables it.
    invariant_tolerance : float, optional
        Match radius of the triangle side ratios.
    max_candidates : int, optional
        Candidate transforms scored on all points.
    nclip : int or None, optional
        Clipping passes of the final fit.
    sigma : float, optional
        Clipping threshold of the final fit, in RMS.

    Returns
    -------
    MatchResult
        The transform, the pairs (indices into the inputs as given), the
        match statistics and a status with its reason.

    Raises
    ------
    ValueError
        If a point array does not have shape (N, 2), or an option is out of
        range (the message names it).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> xy = rng.uniform(0, 1000, (200, 2))
    >>> c = xy.mean(axis=0)
    >>> t = np.radians(3.0)
    >>> m = 1.2 * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    >>> ref = (xy - c) @ m.T + c + [117.0, -23.0]
    >>> res = match_points(xy, ref, center=c)
    >>> res.status.name, res.n_matches
    ('OK', 200)
    >>> res.shift.round(6).tolist(), round(res.scale, 6)
    ([117.0, -23.0], 1.2)
    """
    xy = _check_points("xy", xy)
    ref = _check_points("ref", ref)
    tolerance = _check_positive("tolerance", tolerance)
    max_shift = _check_positive("max_shift", max_shift, allow_none=True)
    max_rotation = _check_positive("max_rotation", max_rotation, allow_none=True)
    smin, smax = (float(v) for v in scale_range)
    if not (0 < smin <= smax and math.isfinite(smax)):
        msg = f"scale_range must be (min, max) with 0 < min <= max, got {scale_range!r}"
        raise ValueError(msg)
    if fitgeom not in FITGEOM_MIN_POINTS:
        msg = f"fitgeom must be one of {tuple(FITGEOM_MIN_POINTS)}, got {fitgeom!r}"
        raise ValueError(msg)
    for name, val, low in (
        ("min_matches", min_matches, 3),
        ("n_neighbors", n_neighbors, 2),
        ("max_candidates", max_candidates, 1),
    ):
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            msg = f"{name} must be an integer >= {low}, got {val!r}"
            raise ValueError(msg)
    bad_fb = isinstance(fallback_neighbors, bool) or not isinstance(
        fallback_neighbors, int
    )
    if fallback_neighbors is not None and (bad_fb or fallback_neighbors < 2):
        msg = (
            "fallback_neighbors must be an integer >= 2 or None, "
            f"got {fallback_neighbors!r}"
        )
        raise ValueError(msg)
    bad_max = isinstance(max_points, bool) or not isinstance(max_points, int)
    if max_points is not None and (bad_max or max_points < 3):
        msg = f"max_points must be an integer >= 3 or None, got {max_points!r}"
        raise ValueError(msg)
    min_significance = _check_positive("min_significance", min_significance)
    invariant_tolerance = _check_positive("invariant_tolerance", invariant_tolerance)

    keep_x = np.nonzero(np.all(np.isfinite(xy), axis=1))[0]
    keep_r = np.nonzero(np.all(np.isfinite(ref), axis=1))[0]
    if center is None:
        c = xy[keep_x].mean(axis=0) if len(keep_x) else np.zeros(2)
    else:
        c = np.asarray(center, dtype=np.float64)
        if c.shape != (2,) or not np.all(np.isfinite(c)):
            msg = f"center must be two finite numbers, got {center!r}"
            raise ValueError(msg)
    general = fitgeom == "general"

    def result(status, reason, matrix=None, shift=None, i=None, j=None, **kw):
        pairs = np.zeros((0, 2), dtype=np.intp)
        if i is not None:
            pairs = np.column_stack([keep_x[i], keep_r[j]])
        out = MatchResult(
            status=status,
            reason=reason,
            matrix=np.eye(2) if matrix is None else np.asarray(matrix, float),
            shift=np.zeros(2) if shift is None else np.asarray(shift, float),
            center=c.copy(),
            pairs=pairs,
            n_matches=len(pairs),
            **{
                "rms": math.nan,
                "n_second": 0,
                "n_random": 0.0,
                "significance": 0.0,
                "n_hypotheses": 0,
                "fit": None,
                **kw,
            },
        )
        log.info("match_points: %s: %s", out.status.name, out.reason)
        return out

    if len(keep_x) < 3 or len(keep_r) < 3:
        return result(
            MatchStatus.NO_SOURCES,
            f"need at least 3 finite points in each set, got {len(keep_x)} in xy "
            f"and {len(keep_r)} in ref",
        )
    # Work about c: x' = x − c, r' = r − c, so r' ≈ A x' + s.
    x = xy[keep_x] - c
    r = ref[keep_r] - c
    # Chance matches for any transform: xy points landing within tolerance
    # of some ref point, ref density from its bounding box.
    lo, hi = r.min(axis=0), r.max(axis=0)
    area = max(float(np.prod(np.maximum(hi - lo, tolerance))), 1.0)
    n_random = len(x) * min(len(r) * math.pi * tolerance**2 / area, 1.0)
    tree_r = cKDTree(r)
    search = {
        "tree_r": tree_r,
        "tolerance": tolerance,
        "priors": (smin, smax, max_rotation, max_shift),
        "invariant_tolerance": invariant_tolerance,
        "max_candidates": max_candidates,
        "general": general,
    }
    limit = len(x) if max_points is None else max_points
    candidates, n_hyp, n_tri = _search(x, r, limit, n_neighbors, **search)
    best = max((cand[0] for cand in candidates), default=0)
    if best < min_matches and fallback_neighbors:
        # Few common sources drown in neighbourhoods full of unrelated
        # ones: retry the brightest with larger neighbourhoods.
        more, n_more, _ = _search(
            x, r, min(limit, _FALLBACK_POINTS), fallback_neighbors, **search
        )
        candidates += more
        n_hyp += n_more
    if not candidates:
        return result(
            MatchStatus.TOO_FEW_MATCHES,
            f"no two triangles of {n_tri[0]} (xy) and {n_tri[1]} (ref) agree on "
            f"a transform within the priors ({n_hyp} triangle pairs)",
            n_random=n_random,
            n_hypotheses=n_hyp,
        )
    candidates.sort(key=lambda cand: -cand[0])
    _, matrix, shift, i, j = candidates[0]
    # The runner-up: a different transform (RMS difference over the points
    # above tolerance), counted by the pairs it does not share with the best.
    best_pairs = set(zip(i.tolist(), j.tolist(), strict=True))
    n_second = 0
    for _, m_c, s_c, i_c, j_c in candidates[1:]:
        diff = x @ (m_c - matrix).T + (s_c - shift)
        if np.sqrt(np.mean(np.sum(diff**2, axis=1))) > tolerance:
            own = sum(
                p not in best_pairs
                for p in zip(i_c.tolist(), j_c.tolist(), strict=True)
            )
            n_second = max(n_second, own)

    fit = None
    rms = math.nan
    # No clipped fit below min_matches: the status is decided already.
    if len(i) >= max(FITGEOM_MIN_POINTS[fitgeom], min_matches):
        fit = iter_linear_fit(
            r[j] + c,
            x[i] + c,
            fitgeom=fitgeom,
            center=c,
            nclip=nclip,
            sigma=sigma,
            throw=False,
        )
        if int(fit.status) == FitStatus.OK:
            matrix = np.asarray(fit.matrix, dtype=np.float64)
            shift = np.asarray(fit.shift, dtype=np.float64)
            # Final pairs under the fitted geometry.
            i, j = _pairs(x @ matrix.T + shift, tree_r, tolerance)
        else:
            fit = None
    if len(i):
        res = x[i] @ matrix.T + shift - r[j]
        rms = float(np.sqrt(np.mean(np.sum(res**2, axis=1))))
    n_matches = len(i)
    significance = n_matches / max(n_second, n_random, 1.0)
    stats = {
        "rms": rms,
        "n_second": n_second,
        "n_random": n_random,
        "significance": significance,
        "n_hypotheses": n_hyp,
        "fit": fit,
    }
    numbers = (
        f"{n_matches} matches of {len(x)} xy / {len(r)} ref points within "
        f"{tolerance:g} px; second-best distinct transform {n_second}, "
        f"{n_random:.1f} expected by chance"
    )
    if n_matches < min_matches:
        status = MatchStatus.TOO_FEW_MATCHES
        reason = f"{numbers}: fewer than min_matches={min_matches}"
    elif significance < min_significance:
        status = MatchStatus.AMBIGUOUS
        reason = (
            f"{numbers}: significance {significance:.2f} < "
            f"min_significance={min_significance:g}"
        )
    else:
        status = MatchStatus.OK
        reason = f"{numbers}: significance {significance:.1f}"
    return result(status, reason, matrix, shift, i, j, **stats)

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

__all__ = [
    "MatchLimits",
    "MatchResult",
    "MatchStatus",
    "SearchOptions",
    "match_points",
]

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
# Validation and options


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


def _check_int(name: str, value, low: int, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        tail = " or None" if allow_none else ""
        msg = f"{name} must be an integer >= {low}{tail}, got {value!r}"
        raise ValueError(msg)
    return value


def _check_center(center, default: np.ndarray) -> np.ndarray:
    if center is None:
        return default
    c = np.asarray(center, dtype=np.float64)
    if c.shape != (2,) or not np.all(np.isfinite(c)):
        msg = f"center must be two finite numbers, got {center!r}"
        raise ValueError(msg)
    return c


def _check_fitgeom(fitgeom: str) -> None:
    if fitgeom not in FITGEOM_MIN_POINTS:
        msg = f"fitgeom must be one of {tuple(FITGEOM_MIN_POINTS)}, got {fitgeom!r}"
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class MatchLimits:
    """What a match may find (the priors) and must reach (its acceptance).

    Attributes
    ----------
    tolerance : float
        Match radius after the transform, pixels of the frame.
    max_shift : float or None
        Largest ``|s|`` (at the centre) considered, pixels; None: any.
    max_rotation : float or None
        Largest rotation considered, degrees; None: any.
    scale_range : (float, float)
        Smallest and largest scale ``sqrt|det M|`` considered.
    min_matches : int
        Fewest matched pairs for an OK result.
    min_significance : float
        Smallest ``n_matches / max(n_second, n_random, 1)`` for an OK result.

    Raises
    ------
    ValueError
        For a value out of range (the message names it).
    """

    tolerance: float = 2.0
    max_shift: float | None = None
    max_rotation: float | None = None
    scale_range: tuple[float, float] = (0.5, 2.0)
    min_matches: int = 15
    min_significance: float = 2.0

    def __post_init__(self):
        _check_positive("tolerance", self.tolerance)
        _check_positive("max_shift", self.max_shift, allow_none=True)
        _check_positive("max_rotation", self.max_rotation, allow_none=True)
        _check_positive("min_significance", self.min_significance)
        _check_int("min_matches", self.min_matches, 3)
        smin, smax = (float(v) for v in self.scale_range)
        if not (0 < smin <= smax and math.isfinite(smax)):
            msg = (
                "scale_range must be (min, max) with 0 < min <= max, "
                f"got {self.scale_range!r}"
            )
            raise ValueError(msg)
        object.__setattr__(self, "scale_range", (smin, smax))


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """How the triangle search runs: its reach and its cost.

    Attributes
    ----------
    max_points : int or None
        Points of each set (the first ones) used to build triangles.
    n_neighbors : int
        Neighbours of each point that form its triangles.
    fallback_neighbors : int or None
        When the first search finds fewer than ``min_matches`` pairs, search
        again among the brightest 150 points with this many neighbours
        (more triangles: finds a few common sources among many unrelated
        ones); None disables it.
    invariant_tolerance : float
        Match radius of the triangle side ratios.
    max_candidates : int
        Candidate transforms scored on all points.
    nclip : int or None
        Clipping passes of the final fit.
    sigma : float
        Clipping threshold of the final fit, in RMS.

    Raises
    ------
    ValueError
        For a value out of range (the message names it).
    """

    max_points: int | None = 1000
    n_neighbors: int = 5
    fallback_neighbors: int | None = 9
    invariant_tolerance: float = 0.01
    max_candidates: int = 12
    nclip: int | None = 3
    sigma: float = 3.0

    def __post_init__(self):
        _check_int("max_points", self.max_points, 3, allow_none=True)
        _check_int("n_neighbors", self.n_neighbors, 2)
        _check_int("fallback_neighbors", self.fallback_neighbors, 2, allow_none=True)
        _check_int("max_candidates", self.max_candidates, 1)
        _check_positive("invariant_tolerance", self.invariant_tolerance)
        _check_positive("sigma", self.sigma)


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


@dataclasses.dataclass(frozen=True)
class _Sets:
    """The two point sets about the centre, and what every search step needs."""

    x: np.ndarray
    r: np.ndarray
    tree_r: cKDTree
    limits: MatchLimits
    search: SearchOptions
    general: bool


def _hypotheses(sets: _Sets, limit: int, n_neighbors: int):
    """Triangle pairs with matching shapes whose similarity lies inside the priors.

    Returns ``(zx, zr, a, b, n_triangles)``: the vertex triples (complex,
    about the centre), each pair's similarity ``zr ≈ a zx + b`` and the
    triangle counts of both sets.
    """
    x, r, lim = sets.x, sets.r, sets.limits
    tri_x, key_x = _triangles(x[:limit], n_neighbors)
    tri_r, key_r = _triangles(r[:limit], n_neighbors)
    n_tri = (len(tri_x), len(tri_r))
    empty = np.zeros((0, 3), complex)
    if not (len(tri_x) and len(tri_r)):
        return empty, empty, np.zeros(0, complex), np.zeros(0, complex), n_tri
    near = cKDTree(key_x).sparse_distance_matrix(
        cKDTree(key_r), sets.search.invariant_tolerance, output_type="ndarray"
    )
    zx = _complex(x[tri_x[near["i"].astype(np.intp)]])
    zr = _complex(r[tri_r[near["j"].astype(np.intp)]])
    a, b = _similarity(zx, zr)
    # a is about the origin (= c): b is the shift at c.
    smin, smax = lim.scale_range
    inside = (np.abs(a) >= smin) & (np.abs(a) <= smax)
    if lim.max_rotation is not None:
        inside &= np.abs(np.angle(a)) <= math.radians(lim.max_rotation)
    if lim.max_shift is not None:
        inside &= np.abs(b) <= lim.max_shift
    return zx[inside], zr[inside], a[inside], b[inside], n_tri


def _vote_features(sets: _Sets, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hypotheses in (log scale, angle, shift) units of one vote cell.

    The radius of the shift axis allows for a triangle's angle error
    extrapolated to the field's extent.
    """
    extent = float(np.sqrt(np.mean(np.sum(sets.x**2, axis=1))))
    ang_tol = 0.01
    shift_tol = max(3.0 * sets.limits.tolerance, ang_tol * extent)
    return np.column_stack(
        [
            np.log(np.abs(a)) / ang_tol,
            np.angle(a) / ang_tol,
            b.real / shift_tol,
            b.imag / shift_tol,
        ]
    )


def _search(sets: _Sets, limit: int, n_neighbors: int):
    """Triangle hypotheses, Hough vote and candidate transforms scored on all points.

    Returns ``(candidates, n_hypotheses, (n_triangles_xy, n_triangles_ref))``
    with candidates ``(n_pairs, matrix, shift, i, j)`` about the origin.
    """
    zx, zr, a, b, n_tri = _hypotheses(sets, limit, n_neighbors)
    n_hyp = len(zx)
    if n_hyp == 0:
        return [], 0, n_tri
    tolerance = sets.limits.tolerance
    feats = _vote_features(sets, a, b)
    density = _density(feats)
    tree_f = cKDTree(feats)
    candidates = []
    used = np.zeros(n_hyp, dtype=bool)
    for seed in np.argsort(-density, kind="stable"):
        if len(candidates) >= sets.search.max_candidates or density[seed] < 2:
            break
        if used[seed]:
            continue
        members = np.asarray(tree_f.query_ball_point(feats[seed], 1.0), dtype=np.intp)
        seed_a, seed_b = _similarity(zx[members].ravel(), zr[members].ravel())
        matrix, shift, i, j = _refine(
            sets.x,
            sets.r,
            sets.tree_r,
            _matrix_of(complex(seed_a)),
            np.array([seed_b.real, seed_b.imag]),
            tolerance,
            sets.general,
        )
        candidates.append((len(i), matrix, shift, i, j))
        # Hypotheses this candidate explains need no seed of their own (they
        # lie near it in parameter space).
        todo = np.asarray(tree_f.query_ball_point(feats[seed], 4.0), dtype=np.intp)
        todo = todo[~used[todo]]
        a_c = complex(matrix[0, 0], matrix[1, 0])
        err = np.max(np.abs(a_c * zx[todo] + complex(*shift) - zr[todo]), axis=1)
        used[todo[err < 4.0 * tolerance]] = True
        used[members] = True
    return candidates, n_hyp, n_tri


def _all_candidates(sets: _Sets):
    """Search, and search again with wider neighbourhoods when too few matched."""
    opts = sets.search
    limit = len(sets.x) if opts.max_points is None else opts.max_points
    candidates, n_hyp, n_tri = _search(sets, limit, opts.n_neighbors)
    best = max((cand[0] for cand in candidates), default=0)
    if best < sets.limits.min_matches and opts.fallback_neighbors:
        # Few common sources drown in neighbourhoods full of unrelated
        # ones: retry the brightest with larger neighbourhoods.
        more, n_more, _ = _search(
            sets, min(limit, _FALLBACK_POINTS), opts.fallback_neighbors
        )
        candidates += more
        n_hyp += n_more
    candidates.sort(key=lambda cand: -cand[0])
    return candidates, n_hyp, n_tri


def _chance_matches(x: np.ndarray, r: np.ndarray, tolerance: float) -> float:
    """Return the matches expected by chance for any transform.

    ``xy`` points landing within ``tolerance`` of some ``ref`` point, the
    ``ref`` density from its bounding box.
    """
    lo, hi = r.min(axis=0), r.max(axis=0)
    area = max(float(np.prod(np.maximum(hi - lo, tolerance))), 1.0)
    return len(x) * min(len(r) * math.pi * tolerance**2 / area, 1.0)


def _runner_up(candidates, x: np.ndarray, tolerance: float) -> int:
    """Count the matches of the best candidate that differs from the winner.

    Different: RMS difference over the points above ``tolerance``; counted by
    the pairs it does not share with the winner.
    """
    _, matrix, shift, i, j = candidates[0]
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
    return n_second


def _final_fit(sets: _Sets, candidate, c: np.ndarray, fitgeom: str):
    """Clipped fit of the winner's pairs and the pairs under the fitted geometry.

    Returns ``(matrix, shift, i, j, fit)``; ``fit`` is None below
    ``min_matches`` (the status is decided already) or when it failed.
    """
    _, matrix, shift, i, j = candidate
    if len(i) < max(FITGEOM_MIN_POINTS[fitgeom], sets.limits.min_matches):
        return matrix, shift, i, j, None
    fit = iter_linear_fit(
        sets.r[j] + c,
        sets.x[i] + c,
        fitgeom=fitgeom,
        center=c,
        nclip=sets.search.nclip,
        sigma=sets.search.sigma,
        throw=False,
    )
    if int(fit.status) != FitStatus.OK:
        return matrix, shift, i, j, None
    matrix = np.asarray(fit.matrix, dtype=np.float64)
    shift = np.asarray(fit.shift, dtype=np.float64)
    i, j = _pairs(sets.x @ matrix.T + shift, sets.tree_r, sets.limits.tolerance)
    return matrix, shift, i, j, fit


def _verdict(n_matches: int, significance: float, numbers: str, lim: MatchLimits):
    """Status and reason of a match from its numbers."""
    if n_matches < lim.min_matches:
        return (
            MatchStatus.TOO_FEW_MATCHES,
            f"{numbers}: fewer than min_matches={lim.min_matches}",
        )
    if significance < lim.min_significance:
        return MatchStatus.AMBIGUOUS, (
            f"{numbers}: significance {significance:.2f} < "
            f"min_significance={lim.min_significance:g}"
        )
    return MatchStatus.OK, f"{numbers}: significance {significance:.1f}"


def _result(status, reason, center, pairs=None, **fields) -> MatchResult:
    """Build and log a :class:`MatchResult` (identity transform unless given)."""
    values = {
        "matrix": np.eye(2),
        "shift": np.zeros(2),
        "rms": math.nan,
        "n_second": 0,
        "n_random": 0.0,
        "significance": 0.0,
        "n_hypotheses": 0,
        "fit": None,
        **fields,
    }
    pairs = np.zeros((0, 2), dtype=np.intp) if pairs is None else pairs
    out = MatchResult(
        status=status,
        reason=reason,
        center=center.copy(),
        pairs=pairs,
        n_matches=len(pairs),
        **values,
    )
    log.info("match_points: %s: %s", out.status.name, out.reason)
    return out


# ---------------------------------------------------------------------------
# Public entry point


def match_points(
    xy: ArrayLike,
    ref: ArrayLike,
    limits: MatchLimits | None = None,
    *,
    fitgeom: str = "rscale",
    center: ArrayLike | None = None,
    search: SearchOptions | None = None,
) -> MatchResult:
    r"""Find the transform that maps ``xy`` onto ``ref`` and the matched pairs.

    Parameters
    ----------
    xy, ref : array_like, shape (N, 2) and (M, 2)
        Point positions ``(x, y)`` in one pixel frame; ``xy`` is mapped onto
        ``ref``. Order them brightest first: only the first
        ``search.max_points`` build triangles (all points are used for the
        final match). Rows with non-finite values are ignored.
    limits : MatchLimits, optional
        Match radius, priors (largest shift and rotation, scale range) and
        acceptance (``min_matches``, ``min_significance``); default
        ``MatchLimits()``.
    fitgeom : {'shift', 'rshift', 'rscale', 'general'}, optional
        Geometry of the final clipped fit (the search always uses a
        similarity).
    center : array_like, shape (2,), optional
        ``c``; default the mean of the finite ``xy`` points.
    search : SearchOptions, optional
        Triangle search and final clipping settings; default
        ``SearchOptions()``.

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
    limits = MatchLimits() if limits is None else limits
    search = SearchOptions() if search is None else search
    _check_fitgeom(fitgeom)
    keep_x = np.nonzero(np.all(np.isfinite(xy), axis=1))[0]
    keep_r = np.nonzero(np.all(np.isfinite(ref), axis=1))[0]
    c = _check_center(center, xy[keep_x].mean(axis=0) if len(keep_x) else np.zeros(2))
    if len(keep_x) < 3 or len(keep_r) < 3:
        return _result(
            MatchStatus.NO_SOURCES,
            f"need at least 3 finite points in each set, got {len(keep_x)} in xy "
            f"and {len(keep_r)} in ref",
            c,
        )
    # Work about c: x' = x − c, r' = r − c, so r' ≈ A x' + s.
    x = xy[keep_x] - c
    r = ref[keep_r] - c
    sets = _Sets(x, r, cKDTree(r), limits, search, fitgeom == "general")
    n_random = _chance_matches(x, r, limits.tolerance)
    candidates, n_hyp, n_tri = _all_candidates(sets)
    if not candidates:
        return _result(
            MatchStatus.TOO_FEW_MATCHES,
            f"no two triangles of {n_tri[0]} (xy) and {n_tri[1]} (ref) agree on "
            f"a transform within the priors ({n_hyp} triangle pairs)",
            c,
            n_random=n_random,
            n_hypotheses=n_hyp,
        )
    n_second = _runner_up(candidates, x, limits.tolerance)
    matrix, shift, i, j, fit = _final_fit(sets, candidates[0], c, fitgeom)
    rms = math.nan
    if len(i):
        res = x[i] @ matrix.T + shift - r[j]
        rms = float(np.sqrt(np.mean(np.sum(res**2, axis=1))))
    significance = len(i) / max(n_second, n_random, 1.0)
    numbers = (
        f"{len(i)} matches of {len(x)} xy / {len(r)} ref points within "
        f"{limits.tolerance:g} px; second-best distinct transform {n_second}, "
        f"{n_random:.1f} expected by chance"
    )
    status, reason = _verdict(len(i), significance, numbers, limits)
    return _result(
        status,
        reason,
        c,
        np.column_stack([keep_x[i], keep_r[j]]),
        matrix=np.asarray(matrix, float),
        shift=np.asarray(shift, float),
        rms=rms,
        n_second=n_second,
        n_random=n_random,
        significance=significance,
        n_hypotheses=n_hyp,
        fit=fit,
    )

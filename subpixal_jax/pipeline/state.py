"""What the alignment loop carries between iterations, as one immutable record.

:class:`AlignState` holds every image's current chip WCSs and validity masks
(cosmic-ray flags included), the accumulated corrections, the images left out
of the references, the catalog being measured, and the record of the
iterations so far. The resampler
(:class:`~subpixal_jax.reference.resample.DrizzleResample`)
holds the drizzled contributions that follow from it; :func:`sync_resample`
brings a resampler to a state (so a state saved to a file and loaded in
another process resumes exactly where it stopped).
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from astropy.wcs import WCS

from subpixal_jax.geometry.transform import Affine
from subpixal_jax.io import result as res
from subpixal_jax.pipeline.stages import CatalogState
from subpixal_jax.status import ImageOutcome

#: Format version of :func:`save_state` files (2: the states hold ``failed``).
_CHECKPOINT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class AlignState:
    """The alignment loop's state after ``iteration`` iterations.

    Attributes
    ----------
    iteration : int
        Iterations done (0 for a fresh state).
    n_full : int
        Full resamples (catalog and cosmic-ray passes) done.
    wcs : tuple of dict of int to WCS
        Every image's current chip WCSs.
    valid : tuple of dict of int to ndarray
        Every chip's validity mask (DQ and cosmic-ray flags).
    totals : tuple of Affine or None
        Every image's accumulated correction (None: not corrected yet).
    excluded : frozenset of int
        Images that failed and are left out of the others' references.
    catalog : CatalogState or None
        The sources being measured (None before the first full resample).
    max_shifts : tuple of float
        The largest fitted shift of every iteration (what stopping looks at).
    summary : tuple of dict
        Summary-table rows so far.
    history : tuple of IterationResult
        The iteration records kept (per the ``history`` option).
    initial_wcs : tuple of dict of int to WCS
        Every image's chip WCSs before the first iteration (what a solution
        is fitted from).
    captures : tuple of CaptureResult or None
        The capture stage's result per image (empty: it did not run).
    failed : mapping of int to ImageOutcome
        Images held out of the rest of the run with their FAILED outcome
        (e.g. an image the capture stage could not match): never measured
        again, left out of the others' references, their WCS the initial one.
    """

    iteration: int
    n_full: int
    wcs: tuple[Mapping[int, WCS], ...]
    valid: tuple[Mapping[int, np.ndarray], ...]
    totals: tuple[Affine | None, ...]
    excluded: frozenset[int] = frozenset()
    catalog: CatalogState | None = None
    max_shifts: tuple[float, ...] = ()
    summary: tuple[dict, ...] = ()
    history: tuple[res.IterationResult, ...] = ()
    initial_wcs: tuple[Mapping[int, WCS], ...] = ()
    captures: tuple = ()
    failed: Mapping[int, ImageOutcome] = dataclasses.field(default_factory=dict)


def _resample_wcs(resample) -> tuple[dict[int, WCS], ...]:
    return tuple({c.extver: c.wcs for c in e.chips} for e in resample.exposures)


def _resample_valid(resample) -> tuple[dict[int, np.ndarray], ...]:
    return tuple({c.extver: c.valid for c in e.chips} for e in resample.exposures)


def initial_state(resample) -> AlignState:
    """Return a fresh state from a resampler's current WCSs and masks."""
    n = len(resample.exposures)
    wcs = _resample_wcs(resample)
    return AlignState(
        iteration=0,
        n_full=0,
        wcs=wcs,
        valid=_resample_valid(resample),
        totals=(None,) * n,
        initial_wcs=wcs,
    )


def snapshot_masks(resample) -> tuple[dict[int, np.ndarray], ...]:
    """Copy every chip's validity mask (after cosmic-ray rejection)."""
    return tuple(
        {c.extver: c.valid.copy() for c in e.chips} for e in resample.exposures
    )


def sync_resample(resample, state: AlignState) -> int:
    """Bring ``resample`` to ``state``: re-drizzle the images that differ.

    Within one run the resampler already matches (nothing is done); after
    :func:`load_state` in a new process, the images whose WCS or masks
    differ from the saved ones are re-drizzled. Returns how many were.
    """
    if len(state.wcs) != len(resample.exposures):
        msg = (
            f"the state has {len(state.wcs)} images, the resampler "
            f"{len(resample.exposures)}"
        )
        raise ValueError(msg)
    changed = 0
    for i, exposure in enumerate(resample.exposures):
        stale = False
        for chip in exposure.chips:
            mask = state.valid[i][chip.extver]
            if chip.valid is not mask and not np.array_equal(chip.valid, mask):
                chip.valid = mask.copy()
                stale = True
            stale |= chip.wcs is not state.wcs[i][chip.extver]
        if stale:
            resample.update_wcs(i, dict(state.wcs[i]))
            changed += 1
    return changed


def adopt_resample_wcs(state: AlignState, resample) -> AlignState:
    """Return the state with the resampler's (copied) WCS objects, after an update."""
    return dataclasses.replace(state, wcs=_resample_wcs(resample))


def save_state(state: AlignState, path: str | Path) -> None:
    """Write a checkpoint of ``state`` (a pickle: load only files you wrote).

    Parameters
    ----------
    state : AlignState
        The state to save, e.g. after :func:`~subpixal_jax.pipeline.align_step`.
    path : path
        File to write (replaced atomically).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.subpixal-tmp")
    with tmp.open("wb") as f:
        pickle.dump({"version": _CHECKPOINT_VERSION, "state": state}, f)
    tmp.replace(path)


def load_state(path: str | Path) -> AlignState:
    """Read a checkpoint written by :func:`save_state`.

    Raises
    ------
    ValueError
        If the file is not a checkpoint of this version.
    """
    with Path(path).open("rb") as f:
        data = pickle.load(f)
    if not isinstance(data, dict) or data.get("version") != _CHECKPOINT_VERSION:
        msg = f"{path} is not a subpixal_jax checkpoint (version {_CHECKPOINT_VERSION})"
        raise ValueError(msg)
    return data["state"]

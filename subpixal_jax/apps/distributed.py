"""Align many visits at once on a Dask cluster, one task per visit.

A *visit* is a set of exposures aligned together (one call of
:func:`subpixal_jax.align.align_files`). :func:`align_visits` submits every
visit as one task to a ``distributed`` cluster (a local one by default),
collects one summary row per image into a single table, and is safe to
interrupt and re-run:

* a visit that raises records ``FAILED`` with the exception text and the
  others go on; a worker that dies mid-visit has its task rescheduled
  elsewhere by the scheduler (and exceptions outside the alignment are
  retried ``retries`` times);
* tasks are idempotent: with ``output_dir`` the inputs are never touched and
  every output is written atomically, so a retried visit rewrites the same
  files; with ``in_place=True`` a visit's files are first written to a
  staging directory next to them and only then renamed over the originals
  (two-phase: a retry finishes an interrupted commit instead of aligning
  twice);
* a re-run skips visits already aligned: those whose rows in an existing
  ``summary`` are all SUCCESS/REFERENCE, and those whose output files all
  carry the new ``WCSNAME`` already.

Dask is an optional dependency: ``pip install subpixal-jax[distributed]``.

Each visit drizzles its exposures with up to 4 worker processes when they
are large (:func:`~subpixal_jax.reference.resample.drizzle_worker_count`);
when the cluster's workers already fill the cores, set
``SUBPIXAL_JAX_DRIZZLE_WORKERS=1`` in their environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table

from subpixal_jax.options import AlignOptions
from subpixal_jax.status import ImageOutcome, ImageStatus

log = logging.getLogger(__name__)

#: Columns of the table :func:`align_visits` returns, in order.
COLUMNS = (
    "visit",
    "image",
    "status",
    "n_fit",
    "dx",
    "dy",
    "dx_err",
    "dy_err",
    "rot",
    "scale",
    "rmse",
    "irmse",
    "iterations",
    "seconds",
    "error",
)
_STRING_COLUMNS = ("visit", "image", "status", "error")
_INT_COLUMNS = ("n_fit", "iterations")
_DONE = (ImageStatus.SUCCESS, ImageStatus.REFERENCE)
_STAGING = ".subpixal-staging-{visit}"
_COMMIT = "COMMIT.json"


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:
        msg = (
            "align_visits needs dask.distributed; install it with "
            "'pip install subpixal-jax[distributed]'"
        )
        raise ImportError(msg) from exc
    return distributed


# --------------------------------------------------------------------------
# Input parsing
# --------------------------------------------------------------------------


def _group_table(visits: Table) -> dict[str, list[Path]]:
    """Group a table's ``path`` column by its ``visit`` column."""
    missing = {"visit", "path"} - set(visits.colnames)
    if missing:
        msg = (
            "visits table must have columns 'visit' and 'path', "
            f"missing {sorted(missing)} (has {visits.colnames})"
        )
        raise ValueError(msg)
    grouped: dict[str, list[Path]] = {}
    for visit, path in zip(visits["visit"], visits["path"], strict=True):
        grouped.setdefault(str(visit), []).append(Path(str(path)))
    return grouped


def _group_lists(visits: Sequence) -> dict[str, list[Path]]:
    """Name the visits of a list of lists of paths ``visit0000``, ``visit0001``, ..."""
    grouped = {}
    for k, files in enumerate(visits):
        if isinstance(files, str | os.PathLike) or not isinstance(files, Sequence):
            msg = f"visits[{k}] must be a list of FITS paths, got {files!r}"
            raise ValueError(msg)
        grouped[f"visit{k:04d}"] = [Path(f) for f in files]
    return grouped


def _group_visits(visits) -> dict[str, list[Path]]:
    """``{visit name: [paths]}`` from any accepted form of ``visits``, unchecked."""
    if isinstance(visits, str | os.PathLike):
        path = Path(visits)
        if not path.is_file():
            msg = f"visits must be an existing CSV/ECSV file, got {str(path)!r}"
            raise ValueError(msg)
        fmt = "ascii.ecsv" if path.suffix.lower() == ".ecsv" else "ascii.csv"
        visits = Table.read(path, format=fmt)
    if isinstance(visits, Table):
        return _group_table(visits)
    if isinstance(visits, Sequence):
        return _group_lists(visits)
    msg = (
        "visits must be a list of lists of paths, an astropy Table or a "
        f"CSV path, got {type(visits).__name__}"
    )
    raise ValueError(msg)


def _check_visit(name: str, files: list[Path]) -> None:
    """Raise ValueError unless one visit is usable (named, non-empty, on disk)."""
    if not files:
        msg = f"visits: visit {name!r} has no files"
        raise ValueError(msg)
    if not name or any(c in name for c in "/\\") or name in (".", ".."):
        msg = f"visits: visit name {name!r} cannot be used as a directory name"
        raise ValueError(msg)
    missing_files = [str(f) for f in files if not f.is_file()]
    if missing_files:
        msg = f"visits: visit {name!r} has missing files {missing_files}"
        raise ValueError(msg)
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        msg = f"visits: visit {name!r} has repeated file names {names}"
        raise ValueError(msg)


def _parse_visits(visits) -> dict[str, list[Path]]:
    """Normalise ``visits`` to ``{visit name: [paths]}`` and validate it."""
    grouped = _group_visits(visits)
    if not grouped:
        msg = "visits must hold at least one visit, got none"
        raise ValueError(msg)
    for name, files in grouped.items():
        _check_visit(name, files)
    return grouped


# --------------------------------------------------------------------------
# Idempotence: what is already done
# --------------------------------------------------------------------------


def _has_wcsname(path: Path, wcsname: str) -> bool:
    """Tell whether every SCI header of ``path`` has primary WCSNAME ``wcsname``."""
    try:
        with fits.open(path) as hdul:
            names = [
                str(h.header.get("WCSNAME", "")).strip()
                for h in hdul
                if h.header.get("EXTNAME") == "SCI"
            ]
    except OSError:
        return False
    return bool(names) and all(n == wcsname for n in names)


def _targets(files: list[Path], visit_dir: Path | None) -> list[Path]:
    return files if visit_dir is None else [visit_dir / f.name for f in files]


def _previous_rows(summary) -> dict[str, list[dict[str, Any]]]:
    """Rows of an existing summary ECSV, grouped by visit (empty if none)."""
    if summary is None or not Path(summary).is_file():
        return {}
    table = Table.read(summary, format="ascii.ecsv")
    if "visit" not in table.colnames or "status" not in table.colnames:
        msg = f"summary {str(summary)!r} is not an align_visits summary"
        raise ValueError(msg)
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in table:
        rows.setdefault(str(row["visit"]), []).append(
            {c: row[c] for c in table.colnames if c in COLUMNS}
        )
    return rows


# --------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------


def _row(visit: str, image: str, status: str, **values) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS, math.nan)
    row.update(visit=visit, image=image, status=status, error="")
    row.update(n_fit=0, iterations=0)
    row.update(values)
    return row


def _result_rows(visit, files, result, seconds) -> list[dict[str, Any]]:
    """One row per image: final status, total correction, last fit quality."""
    last: dict[str, dict[str, Any]] = {}
    for r in result.summary:
        last[r["image"]] = r
    rows = []
    for path, name, correction, outcome in zip(
        files, result.names, result.corrections, result.final_status, strict=True
    ):
        r = last.get(name, {})
        dx = dy = rot = scale = math.nan
        if correction is not None:
            dx, dy = correction.shift
            parts = correction.describe("rscale")
            rot, scale = float(parts["proper_rot"]), float(parts["mean_scale"])
        elif outcome.status is ImageStatus.REFERENCE:
            dx = dy = rot = 0.0
            scale = 1.0
        rows.append(
            _row(
                visit,
                str(path),
                outcome.status.value,
                n_fit=int(r.get("n_fit", 0)),
                dx=float(dx),
                dy=float(dy),
                dx_err=float(r.get("dx_err", math.nan)),
                dy_err=float(r.get("dy_err", math.nan)),
                rot=float(rot),
                scale=float(scale),
                rmse=float(r.get("rmse", math.nan)),
                irmse=float(r.get("irmse", math.nan)),
                iterations=int(result.n_iterations),
                seconds=seconds,
                error=outcome.reason,
            )
        )
    return rows


def _commit(staging: Path, files: list[Path]) -> None:
    """Move staged files over the originals named in the commit record."""
    for f in files:
        staged = staging / f.name
        if staged.exists():
            os.replace(staged, f)
    shutil.rmtree(staging)


def _align_visit(
    visit: str,
    files: list[str],
    output_dir: str | None,
    in_place: bool,
    wcsname: str,
    options: dict[str, Any],
) -> list[dict[str, Any]]:
    """Align one visit; never raises for a failure of the alignment itself."""
    from subpixal_jax.align import align_files, write_corrections

    paths = [Path(f) for f in files]
    start = time.perf_counter()
    staging = paths[0].parent / _STAGING.format(visit=visit) if in_place else None
    try:
        if staging is not None and (staging / _COMMIT).is_file():
            # A previous attempt finished aligning and died while committing.
            record = json.loads((staging / _COMMIT).read_text())
            _commit(staging, paths)
            log.info("visit %s: finished an interrupted commit", visit)
            return record["rows"]
        if staging is not None and staging.exists():
            shutil.rmtree(staging)  # an attempt that died before committing
        if in_place and all(_has_wcsname(p, wcsname) for p in paths):
            # An attempt that committed and died before reporting: aligning
            # again would correct the corrected files a second time.
            reason = f"already aligned (WCSNAME={wcsname})"
            return [
                _row(visit, str(p), ImageStatus.SKIPPED.value, error=reason)
                for p in paths
            ]
        result, _ = align_files(paths, **options)
        seconds = time.perf_counter() - start
        rows = _result_rows(visit, paths, result, seconds)
        if staging is not None:
            staging.mkdir()
            write_corrections(result, paths, wcsname=wcsname, output_dir=staging)
            tmp = staging / (_COMMIT + ".tmp")
            tmp.write_text(json.dumps({"rows": rows}))
            os.replace(tmp, staging / _COMMIT)
            _commit(staging, paths)
        elif output_dir is not None:
            target = Path(output_dir) / visit
            target.mkdir(parents=True, exist_ok=True)
            write_corrections(result, paths, wcsname=wcsname, output_dir=target)
    except Exception as exc:  # a failed visit is data, not a crash
        log.warning("visit %s failed: %s", visit, exc)
        reason = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - start
        return [
            _row(visit, str(p), ImageStatus.FAILED.value, seconds=seconds, error=reason)
            for p in paths
        ]
    log.info("visit %s: %s in %.1f s", visit, result.status, seconds)
    return rows


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def _to_table(rows: list[dict[str, Any]]) -> Table:
    columns = {}
    for c in COLUMNS:
        values = [r[c] for r in rows]
        if c in _STRING_COLUMNS:
            columns[c] = np.asarray([str(v) for v in values], dtype=str)
        elif c in _INT_COLUMNS:
            columns[c] = np.asarray(values, dtype=np.int64)
        else:
            columns[c] = np.asarray(values, dtype=float)
    return Table(columns, names=COLUMNS)


@contextlib.contextmanager
def _client(client, n_workers: int):
    distributed = _import_distributed()
    if isinstance(client, distributed.Client):
        yield client
        return
    if isinstance(client, str):
        with distributed.Client(client) as connected:
            yield connected
        return
    if client is not None:
        msg = (
            "client must be None, a scheduler address or a distributed.Client, "
            f"got {type(client).__name__}"
        )
        raise ValueError(msg)
    with (
        distributed.LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as local,
    ):
        yield local


def align_visits(
    visits,
    *,
    client=None,
    n_workers: int = 2,
    output_dir: str | os.PathLike | None = None,
    summary: str | os.PathLike | None = None,
    progress: bool = False,
    retries: int = 2,
    **align_options,
) -> Table:
    """Align many visits on a Dask cluster, one task per visit.

    Parameters
    ----------
    visits : list of list of path, astropy.table.Table or path
        The visits: a list of lists of FITS files (visits are then named
        ``visit0000``, ``visit0001``, ...), or a table (or CSV/ECSV file)
        with columns ``visit`` (name) and ``path`` (one row per file).
    client : None, str or distributed.Client, optional
        None starts a ``LocalCluster`` on this machine (loopback only, one
        thread per worker process) and closes it at the end; a string is the
        address of a scheduler to connect to; a Client is used as given.
    n_workers : int, optional
        Worker processes of the local cluster (``client=None`` only).
    output_dir : path, optional
        Write each visit's corrected copies into ``output_dir/<visit>/``
        (created). Give ``in_place=True`` instead to update the files
        themselves (all files of a visit must sit on one file system).
    summary : path, optional
        Write the result table here (ECSV). If the file exists already,
        visits whose rows in it are all SUCCESS/REFERENCE are not aligned
        again and keep their rows.
    progress : bool, optional
        Show a progress bar over visits.
    retries : int, optional
        Times a visit's task is resubmitted after an unexpected error of the
        task itself (failures of the alignment are recorded, not retried).
        Tasks lost with a dead worker are rescheduled by the scheduler.
    **align_options
        Passed to :func:`subpixal_jax.align.align_files` (``nmax``,
        ``fitgeom``, ``in_place``, ``wcsname``, ...); ``output_dir``,
        ``summary`` and ``dry_run`` are handled here.

    Returns
    -------
    astropy.table.Table
        One row per image: ``visit``, ``image`` (input path), ``status``
        (SUCCESS, REFERENCE, NOT_CONVERGED, FAILED or SKIPPED), ``n_fit``
        (sources in the last fit), ``dx``, ``dy`` (total correction shift,
        fit-frame pixels),
        ``dx_err``, ``dy_err``, ``rmse``, ``irmse`` (last fit), ``rot``
        (deg) and ``scale`` of the total correction, ``iterations``,
        ``seconds`` (visit wall time) and ``error`` (reason of a failure).

    Raises
    ------
    ValueError
        On bad ``visits`` (empty, a missing file, wrong table columns),
        ``client``, ``n_workers``, ``output_dir`` or ``retries``.
    ImportError
        If dask.distributed is not installed.
    """
    grouped = _parse_visits(visits)
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        msg = f"n_workers must be a positive int, got {n_workers!r}"
        raise ValueError(msg)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        msg = f"retries must be a non-negative int, got {retries!r}"
        raise ValueError(msg)
    if "dry_run" in align_options or "summary" in align_options:
        msg = "align_options must not hold 'dry_run' or 'summary' (per-visit)"
        raise ValueError(msg)
    in_place = bool(align_options.pop("in_place", False))
    wcsname = str(align_options.pop("wcsname", "SUBPIXAL"))
    if in_place and output_dir is not None:
        msg = "give either in_place=True or output_dir, not both"
        raise ValueError(msg)
    if output_dir is not None:
        output_dir = Path(output_dir)
        if not output_dir.is_dir():
            msg = f"output_dir must be an existing directory, got {str(output_dir)!r}"
            raise ValueError(msg)
    # Validate the alignment options here, before any task runs.
    AlignOptions.create(
        **{k: v for k, v in align_options.items() if k in AlignOptions.keywords()}
    )
    previous = _previous_rows(summary)
    rows: dict[str, list[dict[str, Any]]] = {}
    todo: dict[str, list[Path]] = {}
    for name, files in grouped.items():
        old = previous.get(name, [])
        if old and all(ImageOutcome.parse(r["status"]).status in _DONE for r in old):
            log.info("visit %s: already aligned (summary), skipped", name)
            rows[name] = old
            continue
        visit_dir = None if output_dir is None else output_dir / name
        if (in_place or visit_dir is not None) and all(
            _has_wcsname(t, wcsname) for t in _targets(files, visit_dir)
        ):
            log.info("visit %s: already aligned (WCSNAME %s), skipped", name, wcsname)
            reason = f"already aligned (WCSNAME={wcsname})"
            rows[name] = [
                _row(name, str(f), ImageStatus.SKIPPED.value, error=reason)
                for f in files
            ]
            continue
        todo[name] = files
    if todo:
        # What every visit's task gets after its name and files.
        task_args = (
            None if output_dir is None else str(output_dir),
            in_place,
            wcsname,
            dict(align_options),
        )
        rows.update(
            _run(todo, client, n_workers, retries, progress, task_args=task_args)
        )
    table = _to_table([r for name in grouped for r in rows[name]])
    if summary is not None:
        table.write(summary, format="ascii.ecsv", overwrite=True)
    return table


def _run(todo, client, n_workers, retries, progress, *, task_args):
    """Submit one ``_align_visit(name, files, *task_args)`` task per visit."""
    distributed = _import_distributed()
    rows: dict[str, list[dict[str, Any]]] = {}
    with _client(client, n_workers) as dask_client:
        futures = {
            dask_client.submit(
                _align_visit,
                name,
                [str(f) for f in files],
                *task_args,
                key=f"align-visit-{name}-{os.getpid()}-{time.time_ns()}",
                retries=retries,
                pure=False,
            ): name
            for name, files in todo.items()
        }
        done = distributed.as_completed(list(futures), with_results=False)
        if progress:
            from tqdm.auto import tqdm

            done = tqdm(done, total=len(futures), desc="visits", unit="visit")
        for future in done:
            name = futures[future]
            try:
                rows[name] = future.result()
            except Exception as exc:  # e.g. KilledWorker
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("visit %s failed: %s", name, reason)
                rows[name] = [
                    _row(name, str(f), ImageStatus.FAILED.value, error=reason)
                    for f in todo[name]
                ]
    return rows

"""Replace a set of files all together or not at all.

Aligning a set of exposures ends by rewriting every one of them; a failure
half-way (a read-only file, a full disk, a kill) must not leave some files
corrected and others not. :func:`commit_set` does it in phases:

1. **prepare**: every new file is written in full next to its target, as
   ``.<name>.subpixal-tmp``, and fsynced (:func:`write_temp`); any failure
   here changes nothing;
2. **check**: every target and its folder must be writable (mode bits, so a
   read-only file is refused even for root, unless ``force``);
3. **journal**: a small JSON file ``.subpixal-commit-<id>.json`` in each
   target folder lists the set; the originals are kept as
   ``.<name>.subpixal-orig`` (hard links, so nothing is copied);
4. **rename** the temporary files over their targets; if a rename fails, the
   renamed ones are put back from their originals;
5. **clean up**: the journal is marked committed, then the originals and the
   journal are removed.

If the process dies during phase 4, :func:`recover` reads the journal and
completes the commit (every remaining temporary file is there) or rolls it
back, and removes stale temporary files.

Pure standard library; no astropy, no JAX.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "CommitError",
    "CommitReport",
    "PendingWrite",
    "RecoveryReport",
    "commit_set",
    "discard",
    "orig_path",
    "recover",
    "temp_path",
    "write_temp",
]

log = logging.getLogger(__name__)

_TMP = ".subpixal-tmp"
_ORIG = ".subpixal-orig"
_JOURNAL_PREFIX = ".subpixal-commit-"
_JOURNAL_VERSION = 1


class _State(enum.StrEnum):
    PREPARED = "prepared"  # origs being linked; no target touched
    COMMITTING = "committing"  # renames under way
    COMMITTED = "committed"  # every target is new; only clean-up left


def temp_path(target: str | os.PathLike) -> Path:
    """Return the temporary file name used for ``target``: ``.<name>.subpixal-tmp``.

    Parameters
    ----------
    target : str or os.PathLike
        The file to be replaced.

    Returns
    -------
    pathlib.Path
        In the same folder as ``target``.
    """
    t = Path(target)
    return t.with_name(f".{t.name}{_TMP}")


def orig_path(target: str | os.PathLike) -> Path:
    """Return where ``target``'s original is kept during a commit.

    Parameters
    ----------
    target : str or os.PathLike
        The file to be replaced.

    Returns
    -------
    pathlib.Path
        ``.<name>.subpixal-orig`` in the same folder.
    """
    t = Path(target)
    return t.with_name(f".{t.name}{_ORIG}")


@dataclass(frozen=True)
class PendingWrite:
    """A fully written temporary file waiting to replace its target.

    Attributes
    ----------
    target : pathlib.Path
        The file to replace (or create).
    temp : pathlib.Path
        The temporary file, in the target's folder.
    info : object, optional
        Anything the caller wants back in the report (e.g. an UpdateReport).
    """

    target: Path
    temp: Path
    info: Any = None


@dataclass(frozen=True)
class CommitReport:
    """What a commit changed.

    Attributes
    ----------
    changed : tuple of pathlib.Path
        Targets that now hold the new content.
    unchanged : tuple of pathlib.Path
        Targets that hold their original content (or, for new files, do not
        exist).
    complete : bool
        True when every target changed (success), False otherwise.
    journal : tuple of pathlib.Path
        Journal files left for :func:`recover` (empty unless a roll-back
        itself failed).
    """

    changed: tuple[Path, ...]
    unchanged: tuple[Path, ...]
    complete: bool
    journal: tuple[Path, ...] = ()

    def __str__(self) -> str:
        """Return a one-paragraph account for the user."""
        if self.complete:
            return f"{len(self.changed)} file(s) changed: " + ", ".join(
                map(str, self.changed)
            )
        if not self.changed:
            return "nothing was changed"
        text = (
            f"ONLY PART OF THE SET CHANGED: changed {', '.join(map(str, self.changed))}"
            f"; unchanged {', '.join(map(str, self.unchanged)) or 'none'}"
        )
        if self.journal:
            text += (
                f"; run subpixal_jax.io.transaction.recover on {self.journal[0].parent}"
            )
        return text


class CommitError(OSError):
    """A set of files could not be replaced; ``report`` says what changed.

    Attributes
    ----------
    report : CommitReport
        Which files changed (normally none: the set was rolled back).
    """

    def __init__(self, message: str, report: CommitReport):
        self.report = report
        super().__init__(f"{message}; {report}")


@dataclass
class RecoveryReport:
    """What :func:`recover` did.

    Attributes
    ----------
    completed : list of pathlib.Path
        Targets of interrupted commits that were completed (now new).
    rolled_back : list of pathlib.Path
        Targets of interrupted commits that were restored (now old).
    removed : list of pathlib.Path
        Stale temporary files, originals and journals removed.
    kept : list of pathlib.Path
        Leftovers that were not removed because they might hold data (see
        the log).
    """

    completed: list[Path] = field(default_factory=list)
    rolled_back: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system allows it
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_temp(
    target: str | os.PathLike,
    write: Callable[[BinaryIO], None],
    *,
    mode: int | None = None,
    info: Any = None,
) -> PendingWrite:
    """Write a target's new content to its temporary file (phase 1).

    Parameters
    ----------
    target : str or os.PathLike
        The file the content is for; its folder must exist. A symbolic link
        is resolved: the file it points to will be replaced.
    write : callable
        ``write(fileobj)`` writes the whole content to a binary file object.
    mode : int, optional
        Permission bits for the new file. Default: the target's, if it exists.
    info : object, optional
        Passed through to :class:`PendingWrite`.

    Returns
    -------
    PendingWrite

    Raises
    ------
    OSError
        If the temporary file cannot be written; nothing is left behind.

    Notes
    -----
    A temporary file of the same name left by an earlier, killed run is
    replaced (a stale file, found by name).
    """
    # A symbolic link is followed: the real file is replaced (renaming onto
    # the link would turn it into a copy and leave the real file stale).
    target = Path(target).resolve()
    tmp = temp_path(target)
    if mode is None and target.exists():
        mode = stat.S_IMODE(target.stat().st_mode)
    if tmp.exists():
        log.warning("removing a stale temporary file %s", tmp)
        tmp.unlink()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return PendingWrite(target=target, temp=tmp, info=info)


def _writable_problem(target: Path, *, force: bool) -> str | None:
    folder = target.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"its folder {folder} is not writable"
    if not target.exists():
        return None
    bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    mode = target.stat().st_mode
    if not mode & bits and not force:
        return f"it is read-only (mode {stat.S_IMODE(mode):04o}; force=True overrides)"
    if not os.access(target, os.W_OK):
        return "it is not writable by this user"
    return None


def _journal_paths(folders: Iterable[Path], ident: str) -> list[Path]:
    return [f / f"{_JOURNAL_PREFIX}{ident}.json" for f in sorted(set(folders))]


def _write_journal(paths: Sequence[Path], record: dict) -> None:
    text = json.dumps(record, indent=1)
    for p in paths:
        tmp = p.with_name(p.name + ".tmp")
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        _fsync_dir(p.parent)


def _keep_original(target: Path, orig: Path) -> None:
    """Keep ``target``'s current content as ``orig`` (a hard link, else a copy)."""
    orig.unlink(missing_ok=True)
    try:
        os.link(target, orig)
    except OSError:
        shutil.copy2(target, orig)


def commit_set(updates: Sequence[PendingWrite], *, force: bool = False) -> CommitReport:
    """Replace every target by its temporary file, or none of them.

    Parameters
    ----------
    updates : sequence of PendingWrite
        From :func:`write_temp` (or
        :func:`subpixal_jax.io.wcs.prepare_exposure_update`). Targets must be
        distinct.
    force : bool, optional
        Replace read-only (mode bits) targets too, where the user may.

    Returns
    -------
    CommitReport
        With ``complete=True``; every target changed.

    Raises
    ------
    CommitError
        If any target cannot be replaced. The set is rolled back first, so
        normally ``report.changed`` is empty ("nothing was changed"); if the
        roll-back fails too, the report names exactly which files changed and
        the journal and the temporary files are kept for :func:`recover`.
        Otherwise the temporary files are removed.
    ValueError
        If two updates name the same target, or a temporary file is missing.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for name in "ab":
    ...     _ = (d / name).write_text("old")
    >>> pending = [write_temp(d / n, lambda f: f.write(b"new")) for n in "ab"]
    >>> report = commit_set(pending)
    >>> report.complete, (d / "a").read_text(), sorted(p.name for p in d.iterdir())
    (True, 'new', ['a', 'b'])
    """
    updates = list(updates)
    targets = _checked_targets(updates, force=force)
    if not updates:
        return CommitReport(changed=(), unchanged=(), complete=True)
    ident = uuid.uuid4().hex[:12]
    journals = _journal_paths((t.parent for t in targets), ident)
    entries = [
        {
            "target": str(t),
            "temp": str(Path(u.temp).absolute()),
            "orig": str(orig_path(t)),
            "existed": t.exists(),
        }
        for t, u in zip(targets, updates, strict=True)
    ]
    record = {
        "version": _JOURNAL_VERSION,
        "id": ident,
        "state": _State.PREPARED.value,
        "entries": entries,
        "journals": [str(j) for j in journals],
    }
    renamed: list[int] = []
    try:
        _replace_all(record, journals, renamed)
    except BaseException as exc:
        report = _roll_back(entries, renamed, journals)
        if not report.journal:
            discard(updates)
        # else: keep the remaining temporary files, so recover() can complete
        if isinstance(exc, Exception):
            raise CommitError(f"commit failed ({exc})", report) from exc
        raise
    _finish(entries, journals)
    log.info("committed %d file(s) together", len(targets))
    return CommitReport(changed=tuple(targets), unchanged=(), complete=True)


def _checked_targets(updates: list[PendingWrite], *, force: bool) -> list[Path]:
    """Return the targets of a set, or discard it and raise (nothing touched)."""
    targets = [Path(u.target).absolute() for u in updates]
    if len({os.path.realpath(t) for t in targets}) != len(targets):
        discard(updates)
        msg = f"commit_set: a target is named twice in {targets}"
        raise ValueError(msg)
    for u in updates:
        if not Path(u.temp).is_file():
            discard(updates)
            msg = f"commit_set: the temporary file {u.temp} of {u.target} is missing"
            raise ValueError(msg)
    problems = [
        f"{t}: {p}"
        for t in targets
        if (p := _writable_problem(t, force=force)) is not None
    ]
    if problems:
        discard(updates)
        none = CommitReport(changed=(), unchanged=tuple(targets), complete=False)
        raise CommitError("cannot replace " + "; ".join(problems), none)
    return targets


def _replace_all(record: dict, journals: list[Path], renamed: list[int]) -> None:
    """Phases 3 and 4: journal, keep the originals, rename (``renamed`` grows)."""
    entries = record["entries"]
    _write_journal(journals, record)
    for e in entries:
        if e["existed"]:
            _keep_original(Path(e["target"]), Path(e["orig"]))
    record["state"] = _State.COMMITTING.value
    _write_journal(journals, record)
    for i, e in enumerate(entries):
        os.replace(e["temp"], e["target"])
        renamed.append(i)
    for folder in {Path(e["target"]).parent for e in entries}:
        _fsync_dir(folder)
    record["state"] = _State.COMMITTED.value
    _write_journal(journals, record)


def discard(updates: Iterable[PendingWrite | None]) -> None:
    """Remove the temporary files of prepared writes that will not be committed.

    For a caller whose preparation of a set failed part-way: the temporary
    files already written are removed, no target is touched.

    Parameters
    ----------
    updates : iterable of PendingWrite or None
        Prepared writes (``None`` entries are skipped).
    """
    for u in updates:
        if u is None:
            continue
        with contextlib.suppress(OSError):
            Path(u.temp).unlink(missing_ok=True)


def _roll_back(entries: list[dict], renamed: list[int], journals: list[Path]):
    """Undo the renames; return what is changed afterwards."""
    failed: list[int] = []
    for i in reversed(renamed):
        e = entries[i]
        try:
            if e["existed"]:
                os.replace(e["orig"], e["target"])
            else:
                Path(e["target"]).unlink()
        except OSError as exc:
            log.error("could not restore %s: %s", e["target"], exc)
            failed.append(i)
    targets = [Path(e["target"]) for e in entries]
    if failed:
        # keep the journal and every original: recover() can finish the job
        changed = tuple(targets[i] for i in sorted(failed))
        return CommitReport(
            changed=changed,
            unchanged=tuple(t for t in targets if t not in changed),
            complete=False,
            journal=tuple(j for j in journals if j.exists()),
        )
    _finish(entries, journals)
    return CommitReport(changed=(), unchanged=tuple(targets), complete=False)


def _finish(entries: list[dict], journals: list[Path]) -> None:
    """Remove originals, then the journals (in that order: see recover)."""
    for e in entries:
        with contextlib.suppress(OSError):
            Path(e["orig"]).unlink(missing_ok=True)
    for j in journals:
        with contextlib.suppress(OSError):
            j.unlink(missing_ok=True)
            Path(str(j) + ".tmp").unlink(missing_ok=True)


def _folders(directory_or_files) -> list[Path]:
    if isinstance(directory_or_files, str | os.PathLike):
        directory_or_files = [directory_or_files]
    out = []
    for p in map(Path, directory_or_files):
        folder = p if p.is_dir() else p.absolute().parent
        if folder not in out:
            out.append(folder)
    return out


def recover(
    directory_or_files: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    action: str = "auto",
) -> RecoveryReport:
    """Finish or roll back interrupted commits; remove stale temporary files.

    Parameters
    ----------
    directory_or_files : path or iterable of paths
        Folders to look in, or files whose folders to look in.
    action : {'auto', 'complete', 'rollback'}, optional
        What to do with a commit interrupted during its renames. 'auto'
        completes it when every temporary file not yet renamed is still there
        (the new set is whole), and rolls it back otherwise. A commit that
        had not started renaming is always rolled back; one that had finished
        is only cleaned up. 'complete' raises if a new file is gone.

    Returns
    -------
    RecoveryReport

    Raises
    ------
    ValueError
        For an unknown ``action``, or ``'complete'`` when a temporary file is
        missing.

    Examples
    --------
    >>> import tempfile
    >>> recover(tempfile.mkdtemp()).completed
    []
    """
    if action not in ("auto", "complete", "rollback"):
        msg = f"action must be 'auto', 'complete' or 'rollback', got {action!r}"
        raise ValueError(msg)
    report = RecoveryReport()
    folders = _folders(directory_or_files)
    done: set[str] = set()
    for folder in folders:
        for jpath in sorted(folder.glob(f"{_JOURNAL_PREFIX}*.json")):
            try:
                record = json.loads(jpath.read_text())
                ident = record["id"]
                entries = record["entries"]
                state = _State(record["state"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("unreadable commit journal %s (%s); left alone", jpath, exc)
                report.kept.append(jpath)
                continue
            journals = [Path(j) for j in record.get("journals", [str(jpath)])]
            if ident in done:
                continue
            done.add(ident)
            _recover_one(entries, state, journals, action, report)
    for folder in folders:
        for tmp in sorted(folder.glob(f".*{_TMP}")):
            log.warning("removing a stale temporary file %s", tmp)
            tmp.unlink(missing_ok=True)
            report.removed.append(tmp)
        for orig in sorted(folder.glob(f".*{_ORIG}")):
            target = orig.with_name(orig.name[1 : -len(_ORIG)])
            if target.exists() and os.path.samefile(orig, target):
                orig.unlink()
                report.removed.append(orig)
            else:
                log.warning(
                    "%s may hold the only copy of an original %s; left alone",
                    orig,
                    target,
                )
                report.kept.append(orig)
    return report


def _entry_status(e: dict) -> str:
    """'pending' (temp still there), 'renamed' (target is new) or 'lost'."""
    temp, target, orig = Path(e["temp"]), Path(e["target"]), Path(e["orig"])
    if temp.exists():
        return "pending"
    if not e["existed"]:
        return "renamed" if target.exists() else "lost"
    if target.exists() and orig.exists() and not os.path.samefile(orig, target):
        return "renamed"
    return "lost"  # the temp is gone but the target is still the original


def _recover_one(entries, state, journals, action, report) -> None:
    targets = [Path(e["target"]) for e in entries]
    if state is _State.COMMITTED:
        _finish(entries, journals)
        report.removed.extend(journals)
        return
    status = [_entry_status(e) for e in entries]
    whole = "lost" not in status
    if action == "complete" and not whole:
        lost = [str(t) for t, s in zip(targets, status, strict=True) if s == "lost"]
        msg = f"cannot complete the commit: the new content of {lost} is gone"
        raise ValueError(msg)
    if state is _State.COMMITTING and whole and action in ("auto", "complete"):
        for e, s in zip(entries, status, strict=True):
            if s == "pending":
                os.replace(e["temp"], e["target"])
        for folder in {t.parent for t in targets}:
            _fsync_dir(folder)
        _finish(entries, journals)
        report.completed.extend(targets)
        log.info("completed an interrupted commit of %d file(s)", len(targets))
        return
    for e, s in zip(entries, status, strict=True):
        temp, target, orig = Path(e["temp"]), Path(e["target"]), Path(e["orig"])
        if s == "pending":  # never renamed: the target is the original
            temp.unlink()
            report.removed.append(temp)
        elif s == "renamed" and e["existed"]:
            os.replace(orig, target)
        elif s == "renamed":
            target.unlink()
    _finish(entries, journals)
    report.rolled_back.extend(targets)
    log.info("rolled back an interrupted commit of %d file(s)", len(targets))

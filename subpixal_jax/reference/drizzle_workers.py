"""Drizzle several exposures at once in worker processes.

drizzle's C ``add_image`` holds the GIL (two threads drizzling two chips take
longer than one thread drizzling both), and it is most of an alignment's time
at full-frame sizes (~1.9 s per 4096x2048 chip, tens of drizzles a run). The
exposures of one drizzle step are independent, so they are drizzled in
parallel by a few worker processes.

The workers are plain subprocesses (``python -m`` this module) that read
pickled jobs on stdin and write pickled results on stdout. They import only
numpy and drizzle, never JAX, and never re-import the caller's ``__main__``
(``multiprocessing``'s spawn and forkserver do, which breaks user scripts
without an ``if __name__ == "__main__"`` guard; fork is unsafe in a process
that runs JAX's threads). A worker ignores Ctrl-C (the caller handles it) and
exits when its stdin closes, so a killed caller leaves no worker behind.

This module keeps its imports light on purpose: it is what a worker runs.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["DrizzlePool", "WorkerError", "drizzle_chips", "shared_pool"]

log = logging.getLogger(__name__)


def drizzle_chips(
    out_shape: tuple[int, int], kernel: str, chips: Sequence[dict]
) -> tuple[np.ndarray, np.ndarray]:
    """Drizzle one exposure's chips onto a fresh grid.

    Parameters
    ----------
    out_shape : tuple of int
        ``(ny, nx)`` of the grid.
    kernel : str
        drizzle kernel name.
    chips : sequence of dict
        Keyword arguments of ``drizzle.resample.Drizzle.add_image``, one
        per chip (data, pixmap, weights, scales).

    Returns
    -------
    sci, wht : numpy.ndarray
        ``(ny, nx)`` float32 rate image (0 where uncovered) and weight
        (0 there too: the Lanczos kernels' negative lobes leave negative
        weights next to edges and masked pixels, which would otherwise take
        weight from the other exposures' values in a combination).
    """
    from drizzle.resample import Drizzle

    driz = Drizzle(kernel=kernel, fillval=0.0, out_shape=out_shape, disable_ctx=True)
    with warnings.catch_warnings():
        # drizzle warns that the Lanczos kernels do not conserve flux; the
        # alignment uses the drizzle as a template of source shapes, and
        # the exposures' sums are never measured from it.
        warnings.filterwarnings("ignore", message="Kernel .* is not a flux-conserving")
        for chip in chips:
            driz.add_image(**chip)
    covered = driz.out_wht > 0
    img = np.where(covered, driz.out_img, 0).astype(np.float32)
    return img, np.where(covered, driz.out_wht, 0).astype(np.float32)


class WorkerError(RuntimeError):
    """A worker process died or could not be reached."""


class _Worker:
    """One worker subprocess and its pipes; one job at a time."""

    def __init__(self):
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, env.get("PYTHONPATH", "")) if p
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )

    def call(self, job: list):
        """Run ``drizzle_chips(*job.pop())`` in the worker; re-raise its error.

        The arguments are taken out of ``job`` and dropped once sent, so an
        exposure's inputs (a 4096x2048 chip's map, rate and weights: 200 MB)
        are not held here while the worker drizzles them.
        """
        try:
            args = job.pop()
            pickle.dump(args, self.process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.process.stdin.flush()
            del args
            ok, value = pickle.load(self.process.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            code = self.process.poll()
            msg = f"drizzle worker {self.process.pid} failed (exit code {code}): {exc}"
            raise WorkerError(msg) from exc
        if not ok:
            raise value
        return value

    def close(self) -> None:
        try:
            self.process.stdin.close()
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
        finally:
            self.process.stdout.close()


class DrizzlePool:
    """A few worker processes that drizzle exposures in parallel.

    Parameters
    ----------
    workers : int
        Number of worker processes (started on first use).

    Examples
    --------
    >>> import numpy as np
    >>> y, x = np.mgrid[0:4, 0:4].astype(float)
    >>> chip = dict(data=np.ones((4, 4), np.float32), exptime=1.0,
    ...             pixmap=np.dstack([x, y]), in_units="cps")
    >>> with DrizzlePool(2) as pool:
    ...     futures = [pool.submit((4, 4), "square", [chip]) for _ in range(3)]
    ...     [float(f.result()[0][1, 1]) for f in futures]
    [1.0, 1.0, 1.0]
    """

    def __init__(self, workers: int):
        if int(workers) < 1:
            msg = f"workers must be at least 1, got {workers!r}"
            raise ValueError(msg)
        self.workers = int(workers)
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._threads = concurrent.futures.ThreadPoolExecutor(
            self.workers, thread_name_prefix="drizzle"
        )

    def _checkout(self) -> _Worker:
        with self._lock:
            if self._idle.empty() and len(self._all) < self.workers:
                worker = _Worker()
                self._all.append(worker)
                return worker
        return self._idle.get()

    def _run(self, job: list):
        worker = self._checkout()
        try:
            result = worker.call(job)
        except WorkerError:
            with self._lock:
                self._all.remove(worker)
            worker.close()
            raise
        self._idle.put(worker)
        return result

    def submit(self, out_shape, kernel, chips) -> concurrent.futures.Future:
        """Queue one exposure's :func:`drizzle_chips`; returns its future."""
        # The job's only reference is this list, emptied when it is sent.
        return self._threads.submit(self._run, [(tuple(out_shape), kernel, chips)])

    def close(self) -> None:
        """Stop the workers (waits for running jobs)."""
        self._threads.shutdown(wait=True)
        with self._lock:
            workers, self._all = self._all, []
        for worker in workers:
            worker.close()

    def __enter__(self) -> DrizzlePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared: DrizzlePool | None = None
_shared_lock = threading.Lock()


def shared_pool(workers: int) -> DrizzlePool:
    """Return the process-wide pool of ``workers`` processes (closed at exit).

    Resamplers share it, so a process starts its workers once.
    """
    global _shared
    with _shared_lock:
        if _shared is None or _shared.workers != workers:
            if _shared is not None:
                _shared.close()
            _shared = DrizzlePool(workers)
        return _shared


@atexit.register
def _close_shared() -> None:
    if _shared is not None:
        _shared.close()


def _serve() -> None:
    """Worker main loop: jobs from stdin, results to stdout, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    jobs, results = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the result pipe
    while True:
        try:
            args = pickle.load(jobs)
        except EOFError:
            return
        try:
            reply = (True, drizzle_chips(*args))
        except Exception as exc:  # sent back, re-raised there
            reply = (False, exc)
        pickle.dump(reply, results, protocol=pickle.HIGHEST_PROTOCOL)
        results.flush()


if __name__ == "__main__":
    _serve()

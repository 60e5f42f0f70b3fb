"""Persistent JAX compilation cache and compile accounting.

A cold run of the alignment spends about half its time compiling XLA kernels
(17 s of 31-34 s for the default demo set on a 2-core CPU). JAX can keep the
compiled executables on disk, so that a second process with the same shapes
compiles nothing; :func:`enable_compilation_cache` turns that on. It is not
done at import: entry points (the CLI, ``align_images``) call it.

Where the cache lives, in order of precedence:

1. the ``path`` argument;
2. the ``SUBPIXAL_JAX_CACHE_DIR`` environment variable (``off`` disables the
   cache);
3. ``$XDG_CACHE_HOME/subpixal_jax/jax``, else ``~/.cache/subpixal_jax/jax``.

Concurrent processes: JAX 0.10's file cache writes an entry in place
(``Path.write_bytes``) and takes a lock only when a size limit needs the
``filelock`` package, so a reader can see a half-written entry and a killed
writer leaves a truncated one behind for good (each later process then warns
and recompiles). The cache installed here writes every entry to a temporary
file in the same directory and renames it into place, so readers see either
nothing or a whole entry. If JAX's internals differ from what this module
expects, JAX's own file cache is used instead (logged at DEBUG).

The cache does not save JAX's tracing and lowering of each kernel shape;
:mod:`subpixal_jax.kernel_store`, turned on with the cache in its
``exported`` folder, keeps the lowered kernels themselves.

:func:`count_compilations` counts compilations through ``jax.monitoring``:
``/jax/core/compile/backend_compile_duration`` is recorded for every backend
compilation request, persistent-cache hits included, and
``/jax/compilation_cache/cache_hits`` just before it for a hit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import jax

__all__ = [
    "CACHE_ENV",
    "KERNEL_STORE_FOLDER",
    "CompileStats",
    "count_compilations",
    "default_cache_dir",
    "enable_compilation_cache",
]

log = logging.getLogger(__name__)

#: Environment variable naming the cache directory (``off`` disables it).
CACHE_ENV = "SUBPIXAL_JAX_CACHE_DIR"
#: Folder of the cache directory that holds the exported kernels.
KERNEL_STORE_FOLDER = "exported"

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_CACHE_SUFFIX = "-cache"  # JAX's own entry name suffix, so the caches mix
#: Compilations at least this long are logged (INFO) as they finish.
_LOGGED_COMPILE_SECONDS = 0.5


def default_cache_dir() -> Path | None:
    """Return the cache directory the environment asks for, or None if 'off'.

    Returns
    -------
    pathlib.Path or None
        ``SUBPIXAL_JAX_CACHE_DIR`` if set (None when it is ``off``), else
        ``$XDG_CACHE_HOME/subpixal_jax/jax`` or ``~/.cache/subpixal_jax/jax``.
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() == "off":
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = Path(base).expanduser() if base else Path.home() / ".cache"
    return root / "subpixal_jax" / "jax"


class _AtomicFileCache:
    """A JAX cache backend whose writes are atomic renames (see module doc)."""

    def __init__(self, path: Path):
        self._path = self.path = Path(path)
        self._path.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> bytes | None:
        if not key:
            msg = "key cannot be empty"
            raise ValueError(msg)
        try:
            return (self._path / f"{key}{_CACHE_SUFFIX}").read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, value: bytes) -> None:
        if not key:
            msg = "key cannot be empty"
            raise ValueError(msg)
        target = self._path / f"{key}{_CACHE_SUFFIX}"
        if target.exists():
            return
        fd, tmp = tempfile.mkstemp(dir=self._path, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


_state_lock = threading.Lock()
_enabled_path: Path | None = None


def _install_atomic_cache(path: Path) -> bool:
    """Make JAX use :class:`_AtomicFileCache` at ``path``; False if it cannot."""
    try:
        from jax._src import compilation_cache as cc
        from jax._src.compilation_cache_interface import CacheInterface

        cls = type("AtomicFileCache", (_AtomicFileCache, CacheInterface), {})
        cache = cls(path)
        cc.reset_cache()
        with cc._cache_initialized_mutex:
            cc._cache = cache
            cc._cache_initialized = True
    except (ImportError, AttributeError, TypeError) as exc:  # other JAX layout
        log.debug("compilation cache: JAX's own file cache (%s)", exc)
        return False
    return True


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache (call from entry points).

    Parameters
    ----------
    path : str or os.PathLike, optional
        Cache directory. Default: :func:`default_cache_dir` (the
        ``SUBPIXAL_JAX_CACHE_DIR`` environment variable, ``off`` disabling
        the cache, else the user cache directory).

    Returns
    -------
    pathlib.Path or None
        The directory in use, or None when disabled (or not creatable: the
        run then simply compiles, with a warning in the log).

    Notes
    -----
    Every compiled kernel is cached, however small or fast to compile
    (``jax_persistent_cache_min_compile_time_secs = 0``, no minimum entry
    size): the alignment compiles tens of kernels of 0.2-1.3 s each, which
    JAX's 1 s default threshold would mostly skip. Calling it again with the
    same directory does nothing; with another directory, switches to it.
    The kernel store (:mod:`subpixal_jax.kernel_store`) follows: on in the
    ``exported`` folder of the directory, off with the cache. The cache is
    trusted code: do not point it at a directory others can write to.
    """
    from subpixal_jax import kernel_store  # imports core: not at start-up

    global _enabled_path
    target = Path(path).expanduser() if path is not None else default_cache_dir()
    with _state_lock:
        if target is None:
            log.debug("compilation cache disabled by %s=off", CACHE_ENV)
            kernel_store.enable_kernel_store(None)
            return None
        target = target.resolve()
        if _enabled_path == target:
            kernel_store.enable_kernel_store(target / KERNEL_STORE_FOLDER)
            return target
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning(
                "compilation cache disabled: cannot create %s (%s)", target, exc
            )
            kernel_store.enable_kernel_store(None)
            return None
        jax.config.update("jax_compilation_cache_dir", str(target))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        atomic = _install_atomic_cache(target)
        _enabled_path = target
    store = kernel_store.enable_kernel_store(target / KERNEL_STORE_FOLDER)
    log.debug(
        "compilation cache at %s (atomic writes: %s); kernel store %s",
        target,
        atomic,
        store,
    )
    return target


@dataclasses.dataclass
class CompileStats:
    """Compilations seen inside :func:`count_compilations`.

    Attributes
    ----------
    compiles : int
        Kernels compiled by the backend (persistent-cache hits excluded).
    compile_seconds : float
        Time spent in those compilations.
    cache_hits : int
        Kernels loaded from the persistent cache instead.
    cache_seconds : float
        Time spent loading them.
    traces : int
        Functions traced to jaxprs (also counts traces that hit no compile).
    traced : dict of str to int
        The same traces by function name.
    """

    compiles: int = 0
    compile_seconds: float = 0.0
    cache_hits: int = 0
    cache_seconds: float = 0.0
    traces: int = 0
    traced: dict[str, int] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        s = f"compiled {self.compiles} kernels in {self.compile_seconds:.1f} s"
        if self.cache_hits:
            s += f", loaded {self.cache_hits} from the cache in "
            s += f"{self.cache_seconds:.1f} s"
        return s


_active: list[CompileStats] = []
_pending_hit = threading.local()
_listeners_installed = False


def _on_event(event: str, **kwargs) -> None:
    if event == _CACHE_HIT:
        _pending_hit.value = True


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _TRACE:
        name = kwargs.get("fun_name", "?")
        with _state_lock:
            for s in _active:
                s.traces += 1
                s.traced[name] = s.traced.get(name, 0) + 1
        return
    if event != _BACKEND_COMPILE:
        return
    hit = getattr(_pending_hit, "value", False)
    _pending_hit.value = False
    with _state_lock:
        counting = bool(_active)
        for s in _active:
            if hit:
                s.cache_hits += 1
                s.cache_seconds += duration
            else:
                s.compiles += 1
                s.compile_seconds += duration
    # Say so while it happens: a first run waits seconds on each of these.
    if counting and not hit and duration >= _LOGGED_COMPILE_SECONDS:
        name = kwargs.get("fun_name", "a kernel")
        log.info("compiled %s in %.1f s", name, duration)


@contextlib.contextmanager
def count_compilations() -> Iterator[CompileStats]:
    """Count the XLA compilations (and cache loads) run inside the block.

    Yields
    ------
    CompileStats
        Filled in as compilations happen; ``str()`` of it reads e.g.
        ``compiled 3 kernels in 4.1 s``. Blocks may nest; each counts
        everything inside it, in every thread.

    Examples
    --------
    >>> import jax, numpy as np
    >>> with count_compilations() as stats:
    ...     _ = jax.jit(lambda x: x * 3 + 1)(np.arange(7.0))
    >>> stats.compiles + stats.cache_hits
    1
    """
    global _listeners_installed
    stats = CompileStats()
    with _state_lock:
        if not _listeners_installed:
            jax.monitoring.register_event_listener(_on_event)
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _listeners_installed = True
        _active.append(stats)
    try:
        yield stats
    finally:
        with _state_lock:
            _active.remove(stats)

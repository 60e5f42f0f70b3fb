"""A disk store of exported (traced and lowered) kernels, next to the XLA cache.

The persistent compilation cache (:mod:`subpixal_jax.compilation`) saves the
XLA compilation of a kernel, but JAX consults it only after tracing the
Python function to a jaxpr and lowering that to StableHLO, about 1 s per
kernel shape of the displacement stage on a 2-core CPU. This store keeps the
lowered kernel itself (:func:`jax.export.export`, serialised): a later
process with the same shapes deserialises it and calls it
(:meth:`jax.export.Exported.call`), which traces only a thin wrapper, and
its compilation then hits the compilation cache.

:func:`enable_compilation_cache <subpixal_jax.compilation.enable_compilation_cache>`
turns the store on, in the ``exported`` folder of the cache directory (so
``SUBPIXAL_JAX_CACHE_DIR=off`` disables both). Serialisation needs the
``flatbuffers`` package; without it the store stays off (logged at DEBUG).

An entry is keyed by the kernel's name, its static options, the structure,
shapes and dtypes of its arguments, the platform, the jax and jaxlib
versions, the JAX settings that change tracing (x64, rank and dtype
promotion, matmul precision) and a hash of the source of ``core/``, of the
kernel's module and of this module, so that a code change never runs a
stale kernel.
Entries are written to a temporary file and renamed into place (readers see
a whole entry or none, with concurrent processes too) and carry a SHA-256
of their contents: an unreadable, truncated or altered entry is logged at
DEBUG and rebuilt. While the store is on, a stored kernel always runs
through its export, also in the process that builds it, so every process
gets the same results. Every kernel called through :func:`call_stored` is
compiled with `COMPILER_OPTIONS` for its platform, store on or off, so the
results do not depend on the store either (bit-identical: tested); a
direct call of the ``core/`` function, compiled with XLA's defaults, can
differ from them in the last bits of float64 sums.
Like the compilation cache, the store holds code that is run: do not point
it at a folder others can write to.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import jaxlib
import numpy as np

from subpixal_jax.core.batch import CutoutBatch
from subpixal_jax.core.linfit import Clipping, LinearFit
from subpixal_jax.core.refine import RefinedDisplacements
from subpixal_jax.core.xcorr import Displacements

__all__ = ["call_stored", "enable_kernel_store", "kernel_store_dir"]

log = logging.getLogger(__name__)

# Containers that stored kernels take or return: their pytree nodes must be
# registered (under a stable name) before an export is (de)serialised.
for _cls in (CutoutBatch, Displacements, RefinedDisplacements, LinearFit, Clipping):
    jax.export.register_namedtuple_serialization(
        _cls, serialized_name=f"subpixal_jax.{_cls.__name__}"
    )

_MAGIC = b"subpixal_jax exported kernel v1\n"
_SUFFIX = ".jaxexport"
_CORE = Path(__file__).resolve().parent / "core"
# JAX settings that change what a trace produces, beyond the argument types.
_TRACE_CONFIG = (
    "jax_numpy_rank_promotion",
    "jax_numpy_dtype_promotion",
    "jax_default_matmul_precision",
)

#: XLA options of a stored kernel's compilation, by platform. On the CPU,
#: LLVM's -O2 instead of XLA's default -O3 compiles the displacement kernels
#: 25-40% faster, runs them as fast and gives bit-identical results
#: (``benchmarks/bench_compile.py``).
COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 2}}

_lock = threading.Lock()
_store_dir: Path | None = None
# (store folder or None, key) -> compiled kernel of this process.
_kernels: dict[tuple[Path | None, str], Callable] = {}


def enable_kernel_store(path: str | os.PathLike | None) -> Path | None:
    """Keep exported kernels in ``path`` (None: turn the store off).

    Called by :func:`subpixal_jax.compilation.enable_compilation_cache`;
    call it directly only to use another folder.

    Parameters
    ----------
    path : str or os.PathLike or None
        Store folder (created if missing).

    Returns
    -------
    pathlib.Path or None
        The folder in use; None when off, when ``path`` cannot be created,
        when ``flatbuffers`` (needed to serialise) is not installed or when
        the ``core/`` sources cannot be found to hash.
    """
    global _store_dir
    target = None
    if path is not None:
        if importlib.util.find_spec("flatbuffers") is None:
            log.debug("kernel store off: the flatbuffers package is not installed")
        elif not any(_CORE.glob("*.py")):  # no sources to hash: stale kernels
            log.debug("kernel store off: no core/ sources at %s", _CORE)
        else:
            try:
                target = Path(path).expanduser().resolve()
                target.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.debug("kernel store off: cannot create %s (%s)", path, exc)
                target = None
    with _lock:
        _store_dir = target
    return target


def kernel_store_dir() -> Path | None:
    """Return the folder of the kernel store, or None when it is off."""
    return _store_dir


def call_stored(fun: Callable, *args, **static):
    """Call ``fun(*args, **static)``, through the kernel store when it is on.

    Parameters
    ----------
    fun : callable
        A function of ``core/`` that can be jitted with ``static`` fixed
        (a jitted kernel, or a host wrapper whose checks depend only on
        shapes and ``static``). Other callables (without a
        ``__qualname__``, such as a test's counting stand-in) are called
        plainly.
    *args : pytrees of arrays
        Traced arguments.
    **static
        Static options (hashable values with a stable ``repr``).

    Returns
    -------
    object
        What ``fun`` returns. When every argument is on at most one device
        and no float64 array is outside x64, it is computed by ``fun``
        jitted with `COMPILER_OPTIONS`; with the store on, through the
        exported kernel: loaded if stored, else traced, exported and stored
        first.
    """
    store = _store_dir
    named = hasattr(fun, "__qualname__")  # the key needs a name: not a stand-in
    if not named or not _storable(args):
        return fun(*args, **static)
    key = (store, _key(fun, args, static))
    kernel = _kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                kernel = _kernel(store, key[1], fun, args, static)
                _kernels[key] = kernel
    return kernel(*args)


def _storable(args) -> bool:
    """Whether exporting keeps the arguments as they are.

    An export takes one device, and its jit boundary would narrow a float64
    array outside x64, which a host wrapper such as ``iter_linear_fit_batch``
    keeps (it enters x64 itself).
    """
    for leaf in jax.tree.leaves(args):
        if isinstance(leaf, jax.Array):
            ok = len(leaf.sharding.device_set) <= 1
        elif isinstance(leaf, np.ndarray | np.generic):
            ok = jax.dtypes.canonicalize_dtype(leaf.dtype) == leaf.dtype
        else:  # Python scalars are weakly typed: kept as jit keeps them
            ok = True
        if not ok:
            return False
    return True


@functools.cache
def _source_hash(module_file: str | None) -> str:
    """SHA-256 of ``core/``, the kernel's module and this module (the export)."""
    digest = hashlib.sha256()
    files = [*sorted(_CORE.glob("*.py")), Path(__file__).resolve()]
    if module_file is not None and Path(module_file).resolve().parent != _CORE:
        files.append(Path(module_file).resolve())
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _key(fun: Callable, args, static: dict) -> str:
    """Return the text that names one stored kernel (see the module doc)."""
    leaves, treedef = jax.tree.flatten(args)
    module = sys.modules.get(fun.__module__)
    fields = {
        "kernel": f"{fun.__module__}.{fun.__qualname__}",
        "static": repr(sorted(static.items())),
        "tree": str(treedef),
        "avals": [str(jax.typeof(leaf)) for leaf in leaves],
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "x64": jax.dtypes.canonicalize_dtype(np.float64) == np.float64,
        "config": [str(getattr(jax.config, name)) for name in _TRACE_CONFIG],
        "source": _source_hash(getattr(module, "__file__", None)),
    }
    return json.dumps(fields, sort_keys=True)


def _entry_path(store: Path, fun: Callable, key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    return store / f"{fun.__name__}-{digest}{_SUFFIX}"


def _kernel(store: Path | None, key: str, fun: Callable, args, static) -> Callable:
    """Return the jitted kernel: ``fun`` itself, or (store on) its export."""
    options = COMPILER_OPTIONS.get(jax.default_backend())
    if store is None:
        return jax.jit(functools.partial(fun, **static), compiler_options=options)
    path = _entry_path(store, fun, key)
    exported = _load(path, key, args)
    if exported is None:
        exported = jax.export.export(jax.jit(functools.partial(fun, **static)))(*args)
        _save(path, key, exported)

    def call(*args):
        return exported.call(*args)

    # Named after the kernel, so that the compile log says which one it is.
    call.__name__ = call.__qualname__ = f"stored_{fun.__name__}"
    return jax.jit(call, compiler_options=options)


def _load(path: Path, key: str, args) -> jax.export.Exported | None:
    """Read the export stored at ``path``; None (logged) if absent or unusable."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.debug("kernel store: cannot read %s (%s); rebuilding", path, exc)
        return None
    head = _MAGIC + key.encode() + b"\n"
    body = blob[len(head) :]
    payload = body[32:]
    if not blob.startswith(head) or hashlib.sha256(payload).digest() != body[:32]:
        log.debug("kernel store: %s is not a whole entry for its key; rebuilding", path)
        return None
    try:
        exported = jax.export.deserialize(bytearray(payload))
    except Exception as exc:  # any failure: rebuild, never crash
        log.debug("kernel store: cannot deserialise %s (%s); rebuilding", path, exc)
        return None
    leaves, treedef = jax.tree.flatten((args, {}))  # Exported: (args, kwargs)
    wanted = [(np.shape(x), jax.typeof(x).dtype) for x in leaves]
    found = [(a.shape, a.dtype) for a in exported.in_avals]
    if exported.in_tree != treedef or found != wanted or exported.nr_devices != 1:
        log.debug("kernel store: %s does not fit its arguments; rebuilding", path)
        return None
    return exported


def _save(path: Path, key: str, exported: jax.export.Exported) -> None:
    """Write the entry atomically; a failure only costs a later rebuild."""
    try:
        payload = bytes(exported.serialize())
    except Exception as exc:  # e.g. an unregistered pytree node
        log.debug("kernel store: cannot serialise %s (%s)", path.name, exc)
        return
    blob = _MAGIC + key.encode() + b"\n" + hashlib.sha256(payload).digest() + payload
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("kernel store: cannot write %s (%s)", path, exc)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

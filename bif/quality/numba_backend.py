"""arviz-stats' numba backend (``arviz_stats.numba.diagnostics``), imported under a lock that every process of this
machine sharing the same numba cache takes: import it from here, never directly.

Importing the backend compiles arviz-stats' ``cache=True`` gufuncs (``geyer``, ``_quantile_ufunc``), or loads them
from numba's on-disk cache (``arviz_stats/numba/__pycache__``, or ``$NUMBA_CACHE_DIR``). numba caches a gufunc in
two files: its kernel (``diagnostics.geyer-*.nbc``) and its wrapper (``guf-diagnostics.geyer-*.nbc``). The wrapper
calls the kernel by a mangled name that carries a counter local to the process that compiled it. When processes
compile at once (the Dask workers or forkservers of the first runs on a fresh install, a test process next to
them), the cache can end up with the kernel of one and the wrapper of another. Every process that loads that pair
afterwards crashes (segmentation fault) in its first ``geyer`` call, until the files are deleted: numba issue
#10128, open in numba 0.68 (fixes proposed in numba PRs #10545 and #10814). In CI that killed every Dask worker that
ran the diagnostics, and so every ``bif run`` (``KilledWorker: _diagnose_job``) and ``bif calibrate``.
``tests/test_numba_cache.py`` reproduces the race: four processes that import at once.

Here the import holds an exclusive ``flock`` on a file in the temporary folder, named for the Python
environment and ``NUMBA_CACHE_DIR``: one process compiles and writes both files, and the others load them after
it. The lock is released when the process dies, so it is never stale. The wait is once per process: about 0.3 s
a process to load from the cache, ~3 s for the one that compiles.

A cache broken before (by an older bif, or by another program that imports arviz-stats' backend without the lock)
is repaired. bif records the files of ``geyer``'s cache that it knows to be a working pair (``bif-checked.json``
beside them): those this process just wrote itself, or those a child process loaded and called without crashing.
Files it does not know are checked that way once: about 3 s, in the first process that meets them. When the
child crashes, bif deletes them, logs a warning and imports the backend again, which compiles and writes a working
pair. ``tests/test_numba_cache.py`` breaks a cache on purpose and checks the repair.

The backend's module is loaded from its file (:func:`_load`), not through its package: ``arviz_stats.numba``'s
``__init__`` imports ``arviz_stats.numba.array``, which loads a ``target="parallel"`` quantile gufunc from numba's
cache and ``arviz_stats.base`` (scipy.signal), none of which bif uses: 1.5-1.7 s of a core against 0.26-0.34 s for
the module alone (after numpy, scipy.stats, xarray, numba; session 36, 3 runs each). Every forkserver of a Dask
cluster and every process that diagnoses paid it: a kept cluster's forkserver imports took 9.5-10.9 s, now 7.7-8.8 s
(3 interleaved runs each). ``diagnostics.py`` imports only numpy, scipy, xarray, xarray-einstats and numba, so it
runs the same; it is registered under its own name, so a later ``from arviz_stats.numba import diagnostics`` gets
this module. Should a release of arviz-stats make the file need its package, the plain import is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from bif.locks import locked_file
from bif.quality.diagnostics import limit_numba_threads


def lock_path() -> Path:
    """The lock file shared by the processes that use this environment's numba cache for arviz-stats."""
    key = f"{sys.prefix}\0{os.environ.get('NUMBA_CACHE_DIR', '')}".encode()
    return Path(tempfile.gettempdir()) / f"bif-numba-cache-{os.getuid()}-{hashlib.sha1(key).hexdigest()[:12]}.lock"


#: The file beside numba's cache files that names the ``geyer`` cache files bif knows to be a working pair.
CHECKED_FILE = "bif-checked.json"
#: A child process's check of the cache: load ``geyer`` from it and call it once.
_CANARY = ("import numpy as np; from arviz_stats.numba import diagnostics as d; "
           "d.geyer(np.arange(16.0).reshape(2, 8) ** 2, 0.0)")
log = logging.getLogger(__name__)

#: The backend's module name.
BACKEND = "arviz_stats.numba.diagnostics"


def _load() -> ModuleType:
    """arviz-stats' ``arviz_stats.numba.diagnostics`` executed from its file, without its package's ``__init__``
    (see the module docstring); the plain import when that fails. Compiles or loads its gufuncs (numba's cache), so
    call it under the lock."""
    if BACKEND in sys.modules:  # imported already (through its package, or here)
        return sys.modules[BACKEND]
    spec = None
    with contextlib.suppress(ImportError, ValueError, AttributeError, TypeError):
        top = importlib.util.find_spec(BACKEND.partition(".")[0])  # finds, does not import, the top-level package
        path = Path(top.origin).parent / "numba" / "diagnostics.py"
        spec = importlib.util.spec_from_file_location(BACKEND, path) if path.is_file() else None
    if spec is None or spec.loader is None:
        return importlib.import_module(BACKEND)
    module = importlib.util.module_from_spec(spec)
    sys.modules[BACKEND] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as err:
        sys.modules.pop(BACKEND, None)
        if isinstance(err, ImportError):  # the file needs its package now: import it as arviz-stats does
            return importlib.import_module(BACKEND)
        raise
    return module


def _cache_folder(module: ModuleType) -> Path | None:
    """The folder of numba's cache of ``module.geyer`` (None: not cached, or numba's internals differ)."""
    try:
        return Path(module.geyer.gufunc_builder.nb_func.cache._cache_path)
    except (AttributeError, TypeError):
        return None


def _geyer_files(folder: Path) -> list[Path]:
    """``geyer``'s cache files in ``folder``: the kernel's and the wrapper's index and data."""
    return sorted(p for pattern in ("diagnostics.geyer-*.nb[ci]", "guf-diagnostics.geyer-*.nb[ci]")
                  for p in folder.glob(pattern))


def _fingerprint(files: list[Path]) -> list[list[Any]]:
    return [[p.name, st.st_size, st.st_mtime_ns] for p in files for st in (p.stat(),)]


def _canary() -> int | None:
    """The exit status of a child that loads ``geyer`` from the cache and calls it (None: no answer)."""
    try:
        return subprocess.run([sys.executable, "-c", _CANARY], env={**os.environ, "NUMBA_NUM_THREADS": "1"},
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=300).returncode
    except (OSError, subprocess.TimeoutExpired):
        return None


def _checked(module: ModuleType, started_ns: int) -> ModuleType:
    """``module`` (arviz-stats' backend, just imported) once its ``geyer`` cache is known to work; see the module
    docstring. Called under the lock."""
    folder = _cache_folder(module)
    files = _geyer_files(folder) if folder is not None else []
    if not files:
        return module
    marker = folder / CHECKED_FILE
    try:
        seen = _fingerprint(files)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(marker.read_text()) == seen:
                return module
        fresh = all(mtime >= started_ns for _, _, mtime in seen)  # written by this import: one process's pair
    except OSError:
        return module
    if not fresh:
        code = _canary()
        if code is None or code >= 0:  # no answer, or an error that is not a crash: nothing to repair
            if code == 0:
                _write_marker(marker, seen)
            return module
        log.warning("numba's cache of arviz-stats' geyer gufunc in %s crashed a process that loaded it (exit %s; "
                    "numba issue #10128): deleting %s and compiling it again", folder, code,
                    ", ".join(p.name for p in files))
        for p in files:
            with contextlib.suppress(OSError):
                p.unlink()
        # compile and write a new pair: the module's code again, in the same module object (every reference to it,
        # its package's attribute included, gets the new gufuncs), as importlib.reload does; reload itself needs
        # the package imported, which _load avoids
        module.__spec__.loader.exec_module(module)
        files = _geyer_files(folder)
        with contextlib.suppress(OSError):
            seen = _fingerprint(files)
    _write_marker(marker, seen)
    return module


def _write_marker(marker: Path, seen: list[list[Any]]) -> None:
    with contextlib.suppress(OSError):
        marker.write_text(json.dumps(seen))


limit_numba_threads()  # before numba loads
with locked_file(lock_path()):
    _started = time.time_ns()
    azd = _checked(_load(), _started)

__all__ = ["CHECKED_FILE", "azd", "lock_path"]

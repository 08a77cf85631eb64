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
a process to load from the cache, ~3 s for the one that compiles. A cache already broken by an earlier race stays
broken: delete the ``*.nbi`` and ``*.nbc`` files of ``arviz_stats/numba/__pycache__`` (README, troubleshooting).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bif.quality.diagnostics import limit_numba_threads


def lock_path() -> Path:
    """The lock file shared by the processes that use this environment's numba cache for arviz-stats."""
    key = f"{sys.prefix}\0{os.environ.get('NUMBA_CACHE_DIR', '')}".encode()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"bif-numba-cache-{uid}-{hashlib.sha1(key).hexdigest()[:12]}.lock"


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """Hold an exclusive ``flock`` of :func:`lock_path` (nothing held where flock or the file is unavailable)."""
    try:
        import fcntl

        fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


limit_numba_threads()  # before numba loads
with _cache_lock():
    from arviz_stats.numba import diagnostics as azd

__all__ = ["azd", "lock_path"]

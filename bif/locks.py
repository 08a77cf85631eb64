"""An exclusive ``flock`` on a file: held by one process of the machine at a time, released when it dies (never
stale). Used by the kept Prefect server and Dask cluster (their state folders) and by the diagnostics' numba
backend (:mod:`bif.quality.numba_backend`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def locked_file(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created, with its folder, when missing)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

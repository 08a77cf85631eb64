"""``manifest.json``: the one file that says whether a run is complete.

It is written with ``status: running`` when a run starts, ``failed`` /
``failed_quality`` when it stops early, and ``complete`` only after every output exists,
as the last write of the run. Readers must call :func:`require_complete`.
"""
from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Mapping
from typing import Any

from bif import schema as S
from bif.errors import IncompleteRunError
from bif.store.fs import get_fs, join, read_json, write_json

_PACKAGES = ("bif-pipeline", "torch", "numpy", "prefect", "prefect-dask", "dask", "distributed", "pyarrow",
             "fsspec", "s3fs", "xarray", "zarr", "great-expectations", "arviz", "arviz-stats", "numba",
             "transformers", "safetensors")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the results."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def read_manifest(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The manifest of the run at ``uri``, or None if there is none."""
    fs, root = get_fs(uri, storage_options)
    return read_json(fs, join(root, S.MANIFEST_FILE))


def update_manifest(uri: str, storage_options: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the manifest (creating it) and write it atomically."""
    fs, root = get_fs(uri, storage_options)
    path = join(root, S.MANIFEST_FILE)
    manifest = read_json(fs, path) or {}
    manifest.update(fields)
    manifest["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(fs, path, manifest)
    return manifest


def require_complete(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest, if the run is complete; else IncompleteRunError naming its status."""
    manifest = read_manifest(uri, storage_options)
    if manifest is None:
        raise IncompleteRunError(f"{uri!r} has no {S.MANIFEST_FILE}: it is not a bif run, or it never started")
    if manifest.get("status") != S.STATUS_COMPLETE:
        why = manifest.get("error") or manifest.get("quality_failures") or ""
        raise IncompleteRunError(
            f"run at {uri!r} is not complete (status {manifest.get('status')!r}); its outputs may be partial. {why}".strip()
        )
    return manifest

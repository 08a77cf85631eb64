"""fsspec helpers: resolve URIs, write atomically, check reachability, keep secrets out of text.

Local paths, ``s3://`` (s3fs, configured by ``storage_options``) and ``memory://`` are
supported. Every error names the URI and the fix.
"""
from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from bif.errors import StorageError


_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


def get_fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the protocol-free path of ``uri``.

    Object-store listings are not cached: other processes commit blocks while we read, and
    a stale listing would hide them.
    """
    opts = dict(storage_options or {})
    if uri.split("://", 1)[0] in _OBJECT_STORES:
        opts.setdefault("use_listings_cache", False)
    try:
        return url_to_fs(uri, **opts)
    except (ImportError, ValueError) as err:
        raise StorageError(f"cannot open {uri!r}: {err}") from None


def join(root: str, *parts: str) -> str:
    """Join path parts onto a protocol-free path or a URI."""
    return posixpath.join(root.rstrip("/"), *parts)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that a reader sees either no file or the whole file.

    Local: write a hidden temporary file in the same folder, then rename it. Object
    stores (s3, memory): a single PUT already appears whole or not at all.
    """
    parent = posixpath.dirname(path)
    if is_local(fs):
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}")
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write(fs, path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any | None:
    """Read JSON at ``path``; None if the file does not exist."""
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def check_writable(uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Fail fast with a clear StorageError if ``uri`` cannot be written (e.g. an unreachable bucket)."""
    fs, path = get_fs(uri, storage_options)
    probe = join(path, f".bif-probe-{uuid.uuid4().hex}")
    try:
        if is_local(fs):
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as err:  # botocore / aiohttp / OS errors differ by backend
        endpoint = (dict(storage_options or {}).get("client_kwargs") or {}).get("endpoint_url")
        where = f" at endpoint {endpoint}" if endpoint else ""
        raise StorageError(
            f"output {uri!r}{where} is not writable: {type(err).__name__}: {str(err)[:200]}. "
            "Check that the bucket exists, the endpoint is reachable and storage_options hold valid credentials."
        ) from None


def redact(text: str, storage_options: Mapping[str, Any] | None) -> str:
    """Replace every credential-looking string value of ``storage_options`` in ``text`` by ***."""
    for value in _secret_values(storage_options or {}):
        text = text.replace(value, "***")
    return text


def _secret_values(obj: Any) -> list[str]:
    out: list[str] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(v, (Mapping, list, tuple)):
                out.extend(_secret_values(v))
            elif isinstance(v, str) and len(v) >= 4 and k not in ("endpoint_url", "region_name"):
                out.append(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out.extend(_secret_values(v))
    return out

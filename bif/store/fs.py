"""fsspec helpers: resolve URIs, write atomically, check reachability, keep secrets out of text.

Local paths, ``s3://`` (s3fs, configured by ``storage_options``) and ``memory://`` are
supported. Every error names the URI and the fix.
"""
from __future__ import annotations

import contextlib
import json
import math
import posixpath
import uuid
from collections.abc import Iterator, Mapping
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
    except Exception as err:  # noqa: BLE001 - a bad storage_options value raises TypeError etc.
        raise StorageError(redact(
            f"cannot open {uri!r}: {type(err).__name__}: {err}. Check storage_options "
            "(keys and value types of the fsspec backend)", storage_options)) from None


def endpoint_of(fs: fsspec.AbstractFileSystem) -> str | None:
    """The object store's endpoint URL, if the filesystem has one (for error messages)."""
    opts = getattr(fs, "storage_options", None) or {}
    return (opts.get("client_kwargs") or {}).get("endpoint_url") or opts.get("endpoint_url")


def storage_error(action: str, path: str, fs: fsspec.AbstractFileSystem, err: BaseException,
                  *, hint: str = "a rerun resumes from what was committed") -> StorageError:
    """A StorageError naming the path, the endpoint and the cause, with credentials redacted."""
    endpoint = endpoint_of(fs)
    where = f" at endpoint {endpoint}" if endpoint else ""
    cause = str(err).splitlines()[0][:200] if str(err) else ""
    try:
        path = fs.unstrip_protocol(path)
    except Exception:  # noqa: BLE001 - keep the bare path
        pass
    return StorageError(redact(f"{action} {path!r}{where} failed: {type(err).__name__}: {cause}. "
                               f"Check that the store is reachable; {hint}.",
                               getattr(fs, "storage_options", None)))


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
    try:
        if is_local(fs):
            if parent:
                fs.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}")
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
        else:
            fs.pipe_file(path, data)
    except StorageError:
        raise
    except Exception as err:  # botocore / aiohttp / OS errors differ by backend
        raise storage_error("writing", path, fs, err) from None


_STORE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "urllib3", "requests")


def is_store_failure(err: BaseException) -> bool:
    """True for errors of the storage backend itself (unreachable endpoint, refused credentials, I/O)."""
    if isinstance(err, StorageError):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)) or (
            isinstance(err, OSError) and not isinstance(err, (FileNotFoundError, FileExistsError, IsADirectoryError))):
        return True
    return any(type(err).__module__.startswith(m) for m in _STORE_MODULES)


@contextlib.contextmanager
def storage_guard(uri: str, storage_options: Mapping[str, Any] | None = None, *,
                  hint: str = "a rerun resumes from what was committed") -> Iterator[None]:
    """Turn backend failures (botocore, aiohttp, OS errors) raised inside into a StorageError naming
    ``uri``, the endpoint and ``hint``, with credentials redacted. Domain errors pass unchanged."""
    try:
        yield
    except Exception as err:
        if not is_store_failure(err):
            raise
        endpoint = (dict(storage_options or {}).get("client_kwargs") or {}).get("endpoint_url")
        where = f" at endpoint {endpoint}" if endpoint else ""
        cause = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise StorageError(redact(
            f"storage for {uri!r}{where} failed: {type(err).__name__}: {cause}. Check that the store is "
            f"reachable and the credentials are valid; {hint}.", storage_options)) from None


def strict_json_data(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, so that it serializes as strict JSON.

    Strict JSON has no NaN / Infinity. bif writes them as ``null``: an infinite bound
    (``loss_bounds: [0.0, null]``) means "unbounded", a NaN statistic means "undefined".
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: strict_json_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json_data(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():  # numpy / torch scalars
        return strict_json_data(obj.item())
    return obj


def dumps_strict(obj: Any) -> str:
    """Strict JSON text of ``obj`` (non-finite floats become null; see :func:`strict_json_data`)."""
    return json.dumps(strict_json_data(obj), indent=2, sort_keys=True, default=str, allow_nan=False)


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented, strict JSON (no NaN / Infinity: they become null)."""
    atomic_write(fs, path, dumps_strict(obj).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any | None:
    """Read JSON at ``path``; None if the file does not exist."""
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise StorageError(f"{path!r} is not valid JSON ({err}); it is damaged. Use another --output, "
                           "or delete the run and rerun it") from None
    except Exception as err:  # noqa: BLE001 - an unreachable store
        raise storage_error("reading", path, fs, err) from None


def read_uri(uri: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of the file at ``uri`` (a local path or fsspec URI); FileNotFoundError if it is missing."""
    with fsspec.open(uri, "rb", **dict(storage_options or {})) as f:
        return f.read()


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
        raise StorageError(redact(
            f"output {uri!r}{where} is not writable: {type(err).__name__}: {str(err)[:200]}. "
            "Check that the bucket exists, the endpoint is reachable and storage_options hold valid credentials.",
            storage_options)) from None


def redact(text: str, storage_options: Any) -> str:
    """Replace every credential-looking value of ``storage_options`` in ``text`` by ***.

    ``storage_options`` may be malformed (a string, a list): its string values are
    redacted all the same, so an error about a bad value never echoes a secret.
    """
    values = _secret_values(storage_options) if isinstance(storage_options, (Mapping, list, tuple)) else (
        [storage_options] if isinstance(storage_options, str) and len(storage_options) >= 4 else [])
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, "***")
        text = text.replace(repr(value)[1:-1], "***")
    return text


def _secret_values(obj: Any) -> list[str]:
    out: list[str] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(v, (Mapping, list, tuple)):
                out.extend(_secret_values(v))
            elif isinstance(v, (str, int, float, bytes)) and not isinstance(v, bool) and \
                    k not in ("endpoint_url", "region_name"):
                text = v.decode(errors="replace") if isinstance(v, bytes) else str(v)
                if len(text) >= 4:
                    out.append(text)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            if isinstance(v, str) and len(v) >= 4:
                out.append(v)
            else:
                out.extend(_secret_values(v))
    return out

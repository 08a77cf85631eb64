"""The run catalog of a sweep output, and the run identity of many checkpoints.

Owns what ``bif watch`` / ``bif backfill`` need from storage (no Prefect, no Dask):

- **Run identity.** ``run_id = sha256(checkpoint content sha256, config hash)[:16]``, where the
  config hash (:func:`sweep_config_hash`) covers the whole public config except where things
  live or run (``output``, ``checkpoint``, ``storage_options``, ``compute``). The same checkpoint
  bytes under another name or bucket are the same run; each run lives in
  ``<output>/runs/<run_id>/`` (:func:`run_uri`).
- **Checkpoint discovery.** :func:`list_checkpoints` expands a glob (local or ``s3://``) into
  files with their modification time (the filter of ``--since`` / ``--until``).
- **The catalog.** Object stores have no atomic append, so every state a run reaches
  (``running``, ``complete``, ``failed``, ``failed_quality``) is one immutable Parquet file of one
  row, ``<output>/catalog/<run_id>-<ns>-<random>.parquet``, written atomically and never rewritten:
  runs that finish at the same moment write different files and no row is lost.
  :meth:`Catalog.compact` folds them into ``<output>/catalog.parquet``, one row per run (its
  latest state), and repeats until the folder listing it read is still the folder listing after
  its write: the last compaction to write has then seen every file written before it, so a
  concurrent compaction cannot drop a row either. The folder stays the source of truth (the
  history of every run); ``catalog.parquet`` is what data teams read.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import posixpath
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bif import schema as S
from bif.errors import ConfigError, StorageError
from bif.store.fs import atomic_write, get_fs, join, storage_error
from bif.store.tables import Located, read_arrow, table_bytes

#: Config keys that say where a run reads, writes or runs, not what it computes: outside the config hash.
_PLACEMENT_KEYS = ("output", "checkpoint", "storage_options", "compute")
#: Attempts of :meth:`Catalog.compact` before it gives up on a folder that keeps changing.
_COMPACT_ROUNDS = 20


# ---------------------------------------------------------------- identity


def sweep_config_hash(config: Mapping[str, Any]) -> str:
    """16-hex sha256 of a run config's public data without output, checkpoint, storage options and compute."""
    data = {k: v for k, v in config.items() if k not in _PLACEMENT_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_run_id(checkpoint_sha256: str, config_hash: str) -> str:
    """The run id of one (checkpoint content, config) pair: 16 hex digits."""
    return hashlib.sha256(f"{checkpoint_sha256}:{config_hash}".encode()).hexdigest()[:16]


def run_uri(output: str, run_id: str) -> str:
    """``<output>/runs/<run_id>``: where the run of ``run_id`` writes."""
    return join(output, S.RUNS_DIR, run_id)


# ---------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointFile:
    """One checkpoint found by a glob: its URI (with protocol for object stores), mtime (epoch s), size (bytes)."""

    uri: str
    mtime: float
    size: int


def _mtime(info: Mapping[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "modified", "created"):
        v = info.get(key)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, dt.datetime):
            return (v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)).timestamp()
    return None


def list_checkpoints(pattern: str, storage_options: Mapping[str, Any] | None = None, *,
                     since: float | None = None, until: float | None = None) -> list[CheckpointFile]:
    """The files matching ``pattern`` (a glob, local or ``s3://``), sorted by mtime then URI.

    ``since`` / ``until`` (epoch seconds, inclusive / exclusive) filter on the file's
    modification time (local mtime, S3 ``LastModified``).
    """
    fs, path = get_fs(pattern, storage_options)
    try:
        found = fs.glob(path, detail=True)
    except Exception as err:  # noqa: BLE001 - unreachable bucket, bad credentials
        raise storage_error("listing checkpoints", path, fs, err, hint="check --checkpoints and the credentials")
    local = "://" not in pattern or pattern.startswith("file://")
    out = []
    for p, info in sorted(found.items()):
        if info.get("type") == "directory":
            continue
        mtime = _mtime(info)
        if mtime is None:
            mtime = fs.modified(p).timestamp()
        if (since is not None and mtime < since) or (until is not None and mtime >= until):
            continue
        out.append(CheckpointFile(uri=p if local else fs.unstrip_protocol(p), mtime=mtime, size=int(info.get("size") or 0)))
    return sorted(out, key=lambda c: (c.mtime, c.uri))


def file_sha256(uri: str, storage_options: Mapping[str, Any] | None = None, *, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, streamed (the same value as the run manifest's ``checkpoint_sha256``)."""
    fs, path = get_fs(uri, storage_options)
    h = hashlib.sha256()
    try:
        with fs.open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except FileNotFoundError:
        raise StorageError(f"checkpoint {uri!r} disappeared while the sweep read it; rerun the sweep") from None
    except Exception as err:  # noqa: BLE001
        raise storage_error("reading", path, fs, err, hint="rerun the sweep once the store is back") from None
    return h.hexdigest()


def parse_when(text: str | None, *, name: str = "--since") -> float | None:
    """Epoch seconds of an ISO date or date-time (UTC unless it names a zone); None for None."""
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{name} {text!r} is not an ISO date; use e.g. 2026-11-01 or 2026-11-01T12:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


# ---------------------------------------------------------------- catalog rows


def _ts(epoch: float | None) -> pd.Timestamp | None:
    return None if epoch is None else pd.Timestamp(epoch, unit="s", tz="UTC")


@dataclass
class CatalogRow:
    """One recorded state of one run (column names and types: :func:`bif.schema.catalog_schema`)."""

    run_id: str
    checkpoint_uri: str
    checkpoint_sha256: str
    config_hash: str
    status: str
    output_uri: str
    checkpoint_mtime: float | None = None  # epoch seconds
    started_at: float | None = None
    finished_at: float | None = None
    timings: dict[str, float] = field(default_factory=dict)  # keys of bif.schema.CATALOG_TIMINGS
    quality_passed: bool | None = None
    failed_gates: str | None = None
    num_warnings: int | None = None
    rhat_max: float | None = None
    num_rhat_above_threshold: int | None = None
    ess_bulk_min: float | None = None
    n_train: int | None = None
    n_query: int | None = None
    num_chains: int | None = None
    num_draws: int | None = None
    resumed_blocks: int | None = None
    error: str | None = None

    def with_manifest(self, manifest: Mapping[str, Any] | None) -> "CatalogRow":
        """Fill timings, sizes and the quality summary from a run's ``manifest.json``."""
        if not manifest:
            return self
        t = manifest.get("timings") or {}
        self.timings = {**{k: float(t[k]) for k in S.CATALOG_TIMINGS if isinstance(t.get(k), (int, float))},
                        **self.timings}
        r = manifest.get("resolved") or {}
        self.n_train, self.n_query = r.get("n_train", self.n_train), r.get("n_query", self.n_query)
        sampler = (manifest.get("config") or {}).get("sampler") or {}
        self.num_chains, self.num_draws = sampler.get("num_chains"), sampler.get("num_draws")
        resumed = manifest.get("resumed_blocks")
        if isinstance(resumed, list):
            self.resumed_blocks = int(sum(resumed))
        q = manifest.get("quality")
        if isinstance(q, dict):
            self.quality_passed = bool(q.get("passed"))
            self.failed_gates = ",".join(str(f.get("gate")) for f in q.get("failed") or []) or None
            self.num_warnings = len(q.get("warnings") or [])
        d = manifest.get("diagnostics")
        if isinstance(d, dict):
            self.rhat_max = (d.get("rhat") or {}).get("max")
            self.ess_bulk_min = (d.get("ess_bulk") or {}).get("min")
            self.num_rhat_above_threshold = d.get("num_rhat_above_threshold")
        if manifest.get("error") and not self.error:
            self.error = str(manifest["error"])
        return self

    def to_table(self, recorded_at: float) -> pa.Table:
        rec: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "timings"}
        for k in (S.CHECKPOINT_MTIME, S.STARTED_AT, S.FINISHED_AT):
            rec[k] = _ts(rec[k])
        rec[S.RECORDED_AT] = _ts(recorded_at)
        for k in S.CATALOG_TIMINGS:
            rec[k] = self.timings.get(k)
        schema = S.catalog_schema()
        return pa.Table.from_pylist([{n: rec.get(n) for n in schema.names}], schema=schema)


# ---------------------------------------------------------------- the catalog


class Catalog(Located):
    """The catalog of the sweep output ``uri``: ``catalog/`` (every recorded state) and ``catalog.parquet``."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None):
        self.uri, self.storage_options = uri, dict(storage_options or {})
        self.fs, self.root = get_fs(uri, self.storage_options)

    def record(self, row: CatalogRow) -> str:
        """Write ``row`` as a new immutable file under ``catalog/``; returns its path."""
        now = time.time()
        name = f"{row.run_id}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        path = self.path(S.CATALOG_DIR, name)
        atomic_write(self.fs, path, table_bytes(row.to_table(now)))
        return path

    def _files(self) -> list[str]:
        try:
            found = self.fs.find(self.path(S.CATALOG_DIR))
        except FileNotFoundError:
            return []
        except Exception as err:  # noqa: BLE001
            raise storage_error("listing", self.path(S.CATALOG_DIR), self.fs, err) from None
        return sorted(p for p in found if p.endswith(".parquet") and not posixpath.basename(p).startswith("."))

    def _read(self, paths: Sequence[str]) -> pd.DataFrame:
        schema = S.catalog_schema()
        blobs = self.fs.cat(list(paths)) if paths else {}  # one concurrent fetch on object stores
        tables = [pq.read_table(pa.BufferReader(blobs[p if p in blobs else self.fs._strip_protocol(p)]))
                  for p in paths]
        table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
        return table.to_pandas()

    def history(self) -> pd.DataFrame:
        """Every recorded state of every run (the ``catalog/`` folder), oldest first."""
        df = self._read(self._files())
        return df.sort_values([S.RECORDED_AT, S.RUN_ID], kind="stable").reset_index(drop=True)

    @staticmethod
    def _latest(df: pd.DataFrame) -> pd.DataFrame:
        df = df.sort_values([S.RECORDED_AT, S.RUN_ID], kind="stable")
        out = df.drop_duplicates(S.RUN_ID, keep="last")
        return out.sort_values([S.CHECKPOINT_MTIME, S.CHECKPOINT_URI, S.RUN_ID], kind="stable").reset_index(drop=True)

    def latest(self) -> pd.DataFrame:
        """One row per run, its latest recorded state, from the ``catalog/`` folder (always current)."""
        return self._latest(self.history())

    def statuses(self) -> dict[str, str]:
        """run_id -> latest status."""
        df = self.latest()
        return dict(zip(df[S.RUN_ID], df[S.STATUS]))

    def compact(self) -> pd.DataFrame:
        """Write ``catalog.parquet`` (one row per run) from ``catalog/``; returns it. Safe to run concurrently."""
        for _ in range(_COMPACT_ROUNDS):
            files = self._files()
            df = self._latest(self._read(files))
            atomic_write(self.fs, self.path(S.CATALOG_FILE),
                         table_bytes(pa.Table.from_pandas(df, schema=S.catalog_schema(), preserve_index=False)))
            if self._files() == files:  # nothing was recorded while we compacted: every row is in
                return df
        raise StorageError(f"the catalog under {self.url(S.CATALOG_DIR)!r} kept changing during "
                           f"{_COMPACT_ROUNDS} compactions; rerun `bif backfill` (or compact) when the runs settle")

    def write_text(self, rel: str, text: str) -> str:
        """Atomically write a page (e.g. a trend report) under the sweep output; returns its URI."""
        atomic_write(self.fs, self.path(rel), text.encode())
        return self.url(rel)

    def read(self) -> pd.DataFrame:
        """``catalog.parquet`` as written by the last compaction (empty if there is none)."""
        try:
            return read_arrow(self.fs, self.path(S.CATALOG_FILE)).to_pandas()
        except FileNotFoundError:
            return S.catalog_schema().empty_table().to_pandas()

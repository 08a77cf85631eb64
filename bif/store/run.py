"""RunStore: the one object that owns a run directory (local path or fsspec URI).

A run directory holds (names in :mod:`bif.schema`): ``config.json``, ``manifest.json``,
``lease.json``, ``reference.parquet``, the trace blocks (``traces/``, ``health/``,
``state/``), ``bif.zarr``, ``topk.parquet``, ``diagnostics.parquet``, ``quality/``,
``report.html`` and ``logs/``. :class:`RunStore` gives every path, writes each file atomically,
reads and updates the manifest, lists committed trace blocks as :class:`BlockRef`, commits and
resumes trace blocks (through :class:`bif.store.traces.TraceStore`, which keeps the trace
encoding), and does every Parquet and Zarr read and write of a run. A RunStore is a small,
picklable value (uri, storage_options, trace dtype): Dask tasks receive it whole.
"""
from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bif import schema as S
from bif.store import manifest as _manifest
from bif.store.fs import atomic_write, get_fs, read_json, write_json
from bif.store.tables import Located, frame_bytes, read_arrow
from bif.store.traces import BlockLayout, BlockRef, TraceStore, read_layout, read_losses, read_token_losses

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    import xarray as xr

    from bif.sampling.chain import ChainState, DrawBlock
    from bif.store.lease import OutputLease

__all__ = ["BifArray", "BlockRef", "RunStore"]


BIF_DESCRIPTION = "-Cov(train loss_i, query loss_j) over SGLD draws; >0: upweighting i raises j's loss"
BIF_CORR_DESCRIPTION = ("-Corr(train loss_i, query loss_j) over SGLD draws; 0 where either trace is constant "
                        "(train_constant / query_constant)")
#: A bif.zarr variable up to this size is read in the calling process, not through Dask (RunStore.open_bif).
IN_PROCESS_BYTES = 64 * 2**20
_NAN_FILL = "AAAAAAAA+H8="  # xarray's _FillValue attribute for NaN in zarr v3: base64 of the float64 NaN's bytes


def constant_description(dim: str) -> str:
    """The ``description`` attribute of bif.zarr's ``<dim>_constant`` flags."""
    return (f"True where the {dim} sample's loss trace is constant over all draws (zero variance): its bif is 0 and "
            "its bif_corr is defined as 0")


@dataclass(frozen=True)
class RunStore(Located):
    """One run directory at ``uri`` (a path or URI), reached with ``storage_options``."""

    uri: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    loss_dtype: str = "float32"  # dtype of the losses in new trace blocks

    def __post_init__(self) -> None:
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))

    @classmethod
    def of(cls, cfg: Any) -> "RunStore":
        """The store of a RunConfig's output."""
        return cls(cfg.output, cfg.storage_options, loss_dtype=cfg.sampler.trace_dtype)

    # --- paths ----------------------------------------------------------------------------------
    @property
    def fs(self):
        return get_fs(self.uri, self.storage_options)[0]

    @property
    def root(self) -> str:
        """The protocol-free path of the run directory (for ``self.fs``)."""
        return get_fs(self.uri, self.storage_options)[1]

    # --- bytes, text, JSON ----------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Atomically write ``data`` at ``rel``; returns the file's protocol-free path."""
        path = self.path(rel)
        atomic_write(self.fs, path, data)
        return path

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def read_json(self, *parts: str) -> Any | None:
        """JSON at ``parts``; None if the file does not exist."""
        return read_json(self.fs, self.path(*parts))

    def write_json(self, rel: str, obj: Any) -> None:
        """Atomically write ``obj`` as strict JSON (NaN / Infinity become null)."""
        write_json(self.fs, self.path(rel), obj)

    # --- manifest, config, lease ----------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        return _manifest.read_manifest(self.uri, self.storage_options)

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        return _manifest.update_manifest(self.uri, self.storage_options, **fields)

    def require_complete(self) -> dict[str, Any]:
        return _manifest.require_complete(self.uri, self.storage_options)

    def read_config(self) -> dict[str, Any] | None:
        return self.read_json(S.CONFIG_FILE)

    def write_config(self, data: Mapping[str, Any]) -> None:
        self.write_json(S.CONFIG_FILE, dict(data))

    def lease(self, **kw: Any) -> "OutputLease":
        """The output's lease (not yet acquired); see :mod:`bif.store.lease`."""
        from bif.store.lease import OutputLease

        return OutputLease(self.uri, dict(self.storage_options), **kw)

    def check_lease(self) -> None:
        """OutputBusyError if a live run holds the lease."""
        from bif.store.lease import check_lease

        check_lease(self.uri, self.storage_options)

    # --- Parquet tables -------------------------------------------------------------------------
    def write_table(self, rel: str, df: pd.DataFrame) -> None:
        """Atomically write ``df`` (index dropped) as Parquet at ``rel``."""
        self.write_bytes(rel, frame_bytes(df))

    def read_table(self, *parts: str, columns: Sequence[str] | None = None, filters: Any = None) -> pd.DataFrame | None:
        """The Parquet file at ``parts`` as a DataFrame (``filters``: pyarrow row filters); None if it does not exist."""
        path = self.path(*parts)
        if not self.fs.exists(path):
            return None
        return read_arrow(self.fs, path, columns=columns, filters=filters).to_pandas()

    def open_dataset(self, rel: str, *, dask: bool = True) -> "xr.Dataset | None":
        """The Zarr store at ``rel`` as a lazy Dataset, None when it does not exist. ``dask=False``: no Dask
        graph; each indexing reads the chunks it touches through zarr (cheaper for many small reads)."""
        import xarray as xr

        if not self.exists(rel):
            return None
        return xr.open_zarr(self.url(rel), storage_options=self.storage_options or None, consolidated=False,
                            **({} if dask else {"chunks": None}))

    def write_topk(self, df: pd.DataFrame) -> None:
        self.write_table(S.TOPK_FILE, df)

    def read_topk(self) -> pd.DataFrame | None:
        return self.read_table(S.TOPK_FILE)

    def write_diagnostics(self, df: pd.DataFrame) -> None:
        self.write_table(S.DIAGNOSTICS_FILE, df)

    def read_diagnostics(self) -> pd.DataFrame | None:
        return self.read_table(S.DIAGNOSTICS_FILE)

    def write_reference(self, train: np.ndarray, query: np.ndarray) -> None:
        """Per-sample losses at the checkpoint w* (``reference.parquet``)."""
        self.traces.write_reference(train, query)

    def read_reference(self) -> pd.DataFrame | None:
        return self.read_table(S.REFERENCE_FILE)

    # --- trace blocks ---------------------------------------------------------------------------
    @property
    def traces(self) -> TraceStore:
        """The trace block store of this run (commit, checksum, resume)."""
        return TraceStore(self.uri, storage_options=self.storage_options, loss_dtype=self.loss_dtype)

    def write_block(self, block: "DrawBlock", *, block_index: int, ref_train_loss_mean: float) -> None:
        self.traces.write_block(block, block_index=block_index, ref_train_loss_mean=ref_train_loss_mean)

    def load_resume_state(self, chain: int) -> tuple["ChainState | None", int]:
        return self.traces.load_resume_state(chain)

    def committed_blocks(self, chain: int) -> list[int]:
        return self.traces.committed_blocks(chain)

    def blocks(self, *, num_chains: int | None = None) -> list[BlockRef]:
        """Every committed trace block, sorted by (chain, block); the contiguous prefix of each chain only."""
        return self.traces.block_files(num_chains=num_chains)

    def verify_blocks(self, refs: Sequence[BlockRef]) -> None:
        """StorageError naming the first damaged trace file of ``refs``."""
        self.traces.verify_blocks(list(refs))

    def read_trace_table(self, ref: BlockRef) -> "pa.Table":
        """A committed trace block as an Arrow table (long format of :mod:`bif.schema`)."""
        return read_arrow(self.fs, ref.path)

    def read_layout(self, ref: BlockRef) -> BlockLayout:
        return read_layout(self.fs, ref.path)

    def read_losses(self, ref: BlockRef, *, split: str, start: int, stop: int) -> np.ndarray:
        """Losses of samples ``[start, stop)`` of ``split`` in one block: float64 (num_draws, stop - start)."""
        return read_losses(self.fs, ref.path, split=split, start=start, stop=stop)

    def read_token_losses(self, ref: BlockRef, *, split: str, start: int, stop: int) -> np.ndarray:
        """Losses of variables ``[start, stop)`` of ``split`` (token runs: valid tokens) in one block: (D, stop - start)."""
        return read_token_losses(self.fs, ref.path, split=split, start=start, stop=stop)

    def read_loss_ranges(self, ref: BlockRef, ranges: Mapping[str, tuple[int, int]], *, by_variable: bool = False
                         ) -> dict[str, np.ndarray]:
        """Losses of several sample ranges of one block, {split: float64 (num_draws, stop - start)}, with one
        open, one footer parse and one decode of the loss column's overlapping row groups (the covariance's leaves
        read a train range and a query range of every block).

        ``by_variable``: {split: (stop - start, num_draws)} instead, a variable's draws in a row, in the file's
        dtype (float32 traces stay float32): the layout the file stores, so sample traces come back as views of
        the decoded column, neither transposed nor converted (read-only; token runs' sequence sums are float64).
        """
        import pyarrow.parquet as pq

        with self.fs.open(ref.path, "rb") as f:
            pf = pq.ParquetFile(f)
            layout = BlockLayout.from_bytes(pf.schema_arrow.metadata[S.META_LAYOUT])
            if layout.variables.is_tokens:  # token runs: sequence losses (sums of valid token losses)
                out = {split: read_losses(self.fs, ref.path, split=split, start=start, stop=stop, layout=layout)
                       for split, (start, stop) in ranges.items()}
                return {split: v.T for split, v in out.items()} if by_variable else out
            nd, g = layout.num_draws, layout.row_group_rows
            spans = {split: layout.variables.row_range(split, start, stop, nd) for split, (start, stop) in ranges.items()}
            groups = sorted({i for r0, r1 in spans.values() if r1 > r0 for i in range(r0 // g, (r1 - 1) // g + 1)})
            col = pf.read_row_groups(groups, columns=[S.LOSS]).column(0).to_numpy() if groups else np.zeros(0)
        offset = {grp: i * g for i, grp in enumerate(groups)}  # where each row group starts in ``col``
        out = {}
        for split, (r0, r1) in spans.items():
            if r1 <= r0:
                out[split] = np.zeros((0, nd) if by_variable else (nd, 0))
                continue
            lo = offset[r0 // g] + r0 % g
            rows = col[lo: lo + (r1 - r0)].reshape(-1, nd)  # (variables, D)
            out[split] = rows if by_variable else rows.T.astype(np.float64)  # (D, n)
        return out

    def read_health(self, refs: Sequence[BlockRef] | None = None) -> pd.DataFrame | None:
        """The health rows of ``refs`` (their health files that exist), or of every health file when
        ``refs`` is None (sorted by chain and draw); None when there is none."""
        fs = self.fs
        if refs is None:
            paths = sorted(fs.glob(self.path(S.HEALTH_DIR, "*", "*.parquet")))
        else:
            paths = [p for p in (self.path(S.HEALTH_DIR, S.block_name(r.chain, r.block, "parquet")) for r in refs)
                     if fs.exists(p)]
        if not paths:
            return None
        import pandas as pd

        frame = pd.concat([read_arrow(fs, p).to_pandas() for p in paths], ignore_index=True)
        return frame.sort_values([S.CHAIN, S.DRAW]) if refs is None else frame

    # --- bif.zarr -------------------------------------------------------------------------------
    @property
    def bif_uri(self) -> str:
        return self.url(S.BIF_ZARR)

    def create_bif(self, *, n_train: int, n_query: int, train_block: int, query_block: int, dtype: str,
                   attrs: Mapping[str, Any], compress: bool = False, coordinates: bool = True) -> "BifArray":
        """Create ``bif.zarr`` (coords + empty, NaN-filled arrays chunked like the blocks) without computing; returns
        it open for region writes.

        Influence values are noisy floats: zstd saves ~8% of the bytes and costs ~4x the write
        time (measured on 4096 x 1024 float32 blocks), so compression is off unless asked for.
        ``coordinates`` False: only the group and the two output arrays (4 of 13 ms), which is all the blocks
        write into; the caller adds the rest with :meth:`BifArray.create_coordinates` while the blocks run.
        """
        import zarr

        chunks = (min(train_block, n_train), min(query_block, n_query))
        # written with zarr directly, node for node what xarray's to_zarr(compute=False) of the Dataset writes
        # (tests/test_store.py compares the two); xarray and dask took 20-40 ms of the stage's start
        group = zarr.open_group(self.bif_uri, mode="w", zarr_format=3, attributes=dict(attrs),
                                storage_options=self.storage_options or None)
        arrays = tuple(group.create_array(name, shape=(n_train, n_query), chunks=chunks, dtype=dtype,
                                          fill_value=np.nan, compressors="auto" if compress else None,
                                          dimension_names=(S.TRAIN_DIM, S.QUERY_DIM),
                                          attributes={"description": what, "_FillValue": _NAN_FILL})
                       for name, what in ((S.BIF, BIF_DESCRIPTION), (S.BIF_CORR, BIF_CORR_DESCRIPTION)))
        array = BifArray(group, tuple(a.with_config({"write_empty_chunks": True}) for a in arrays))
        if coordinates:
            array.create_coordinates(n_train, n_query)
        return array

    def bif_array(self) -> "BifArray":
        """``bif.zarr`` opened for region writes (its group and its two output arrays, metadata read once)."""
        import zarr

        group = zarr.open_group(self.bif_uri, mode="r+", storage_options=self.storage_options or None)
        return BifArray(group, tuple(group[name].with_config({"write_empty_chunks": True})
                                     for name in (S.BIF, S.BIF_CORR)))

    def open_bif(self, *, dask: bool | None = None) -> "xr.Dataset | None":
        """``bif.zarr`` as a lazy Dataset; None when it does not exist.

        ``dask`` None: Dask-backed when its largest variable exceeds :data:`IN_PROCESS_BYTES`, else read
        through zarr in the calling process when indexed (``chunks=None``): a small result read through
        Dask costs a graph and a scheduler round trip per ``.values``, more than the read itself.
        """
        import xarray as xr

        if not self.exists(S.BIF_ZARR):
            return None
        opts = {"storage_options": self.storage_options or None, "consolidated": False}
        if dask is not True:
            ds = xr.open_zarr(self.bif_uri, chunks=None, **opts)
            if dask is False or max((v.nbytes for v in ds.data_vars.values()), default=0) <= IN_PROCESS_BYTES:
                return ds
        return xr.open_zarr(self.bif_uri, **opts)

    # --- token runs: bif_tokens.zarr -------------------------------------------------------------
    @property
    def token_bif_uri(self) -> str:
        return self.url(S.BIF_TOKENS_ZARR)

    def create_token_bif(self, *, train_samples: np.ndarray, train_positions: np.ndarray,
                         query_samples: np.ndarray, query_positions: np.ndarray, n_train: int, n_query: int,
                         train_block: int, query_block: int, dtype: str, attrs: Mapping[str, Any],
                         compress: bool = False, seq_block: int | None = None) -> None:
        """Create ``bif_tokens.zarr`` (coords + NaN-filled arrays chunked like the token blocks) without computing.

        ``bif`` / ``bif_corr`` over (train_token, query_token), ``bif_seq_tok`` over (train,
        query_token), ``bif_tok_seq`` over (train_token, query); the token dims carry the
        ``*_sample`` / ``*_position`` coordinates of each valid token. Chunks: ``train_block`` train
        tokens (``seq_block`` train sequences, default ``train_block``) x ``query_block`` query tokens or sequences.
        """
        import dask.array as da
        import xarray as xr

        nt, nq = len(train_samples), len(query_samples)

        def empty(rows: int, cols: int, rb: int, cb: int):
            return da.full((rows, cols), np.nan, dtype=dtype, chunks=(max(1, min(rb, rows)), max(1, min(cb, cols))))

        tt, qt, tr, qu = S.TRAIN_TOKEN_DIM, S.QUERY_TOKEN_DIM, S.TRAIN_DIM, S.QUERY_DIM
        ds = xr.Dataset(
            {S.BIF: ((tt, qt), empty(nt, nq, train_block, query_block)),
             S.BIF_CORR: ((tt, qt), empty(nt, nq, train_block, query_block)),
             S.BIF_SEQ_TOK: ((tr, qt), empty(n_train, nq, seq_block or train_block, query_block)),
             S.BIF_TOK_SEQ: ((tt, qu), empty(nt, n_query, train_block, query_block))},
            coords={tt: np.arange(nt, dtype=np.int64), qt: np.arange(nq, dtype=np.int64),
                    tr: np.arange(n_train, dtype=np.int64), qu: np.arange(n_query, dtype=np.int64),
                    S.TRAIN_SAMPLE: (tt, np.asarray(train_samples, dtype=np.int64)),
                    S.TRAIN_POSITION: (tt, np.asarray(train_positions, dtype=np.int64)),
                    S.QUERY_SAMPLE: (qt, np.asarray(query_samples, dtype=np.int64)),
                    S.QUERY_POSITION: (qt, np.asarray(query_positions, dtype=np.int64))},
            attrs=dict(attrs),
        )
        ds[S.BIF].attrs["description"] = "-Cov(train token loss, query token loss) over SGLD draws (valid tokens)"
        ds[S.BIF_CORR].attrs["description"] = "-Corr(train token loss, query token loss); 0 where a trace is constant"
        ds[S.BIF_SEQ_TOK].attrs["description"] = "-Cov(train sequence loss, query token loss) (row segment sums of bif)"
        ds[S.BIF_TOK_SEQ].attrs["description"] = "-Cov(train token loss, query sequence loss) (column segment sums of bif)"
        names = (S.BIF, S.BIF_CORR, S.BIF_SEQ_TOK, S.BIF_TOK_SEQ)
        encoding = None if compress else {k: {"compressors": None} for k in names}
        ds.to_zarr(self.token_bif_uri, mode="w", compute=False, storage_options=self.storage_options or None,
                   consolidated=False, zarr_format=3, encoding=encoding)

    def token_bif_array(self) -> "ZarrRegions":
        """``bif_tokens.zarr`` opened for region writes."""
        import zarr

        return ZarrRegions(zarr.open_group(self.token_bif_uri, mode="r+", storage_options=self.storage_options or None))

    def open_token_bif(self) -> "xr.Dataset | None":
        """``bif_tokens.zarr`` as a lazy Dataset; None when it does not exist."""
        import xarray as xr

        if not self.exists(S.BIF_TOKENS_ZARR):
            return None
        return xr.open_zarr(self.token_bif_uri, storage_options=self.storage_options or None, consolidated=False)

    # --- quality/, report.html, logs/ -----------------------------------------------------------
    def write_quality_json(self, name: str, obj: Any) -> None:
        self.write_json(posixpath.join(S.QUALITY_DIR, name), obj)

    def write_quality_text(self, name: str, text: str) -> None:
        self.write_text(posixpath.join(S.QUALITY_DIR, name), text)

    def read_quality_summary(self) -> dict[str, Any] | None:
        return self.read_json(S.QUALITY_DIR, S.QUALITY_SUMMARY_FILE)

    def write_report(self, text: str) -> str:
        """Write ``report.html``; returns its URI."""
        self.write_text(S.REPORT_FILE, text)
        return self.url(S.REPORT_FILE)

    def write_log(self, name: str, text: str) -> str:
        """Write ``logs/<name>``; returns its protocol-free path."""
        fs, path = self.fs, self.path("logs", name)
        fs.makedirs(self.path("logs"), exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(text.encode())
        return path


@dataclass(frozen=True)
class BifArray:
    """``bif.zarr`` open for region writes (each output block writes its own region).

    Picklable and small (~2 KB: the arrays' metadata and the store, no data): the covariance opens it once and
    hands it to every block's task, whose worker then reads no zarr metadata (2.4 ms a block when each task
    opened the group and both arrays itself).
    """

    group: Any  # zarr.Group
    # zarr.Array: bif, bif_corr. write_empty_chunks: zarr would otherwise scan every chunk for an all-NaN fill
    # (3 ms of a 3,334 x 1,000 block's pair); influence values are finite, so the scan never skips one
    arrays: tuple[Any, Any]

    @property
    def dtype(self) -> np.dtype:
        return self.arrays[0].dtype

    def create_coordinates(self, n_train: int, n_query: int) -> None:
        """The group's other nodes: the dimension coordinates (0..n-1) and the constant-trace flags (all False)."""
        group = self.group
        for dim, n in ((S.TRAIN_DIM, n_train), (S.QUERY_DIM, n_query)):
            group.create_array(dim, data=np.arange(n, dtype=np.int64), chunks=(max(1, n),), dimension_names=(dim,))
        for dim, n in ((S.TRAIN_DIM, n_train), (S.QUERY_DIM, n_query)):
            group.create_array(S.constant_var(dim), shape=(n,), chunks=(max(1, n),), dtype=bool, fill_value=False,
                               dimension_names=(dim,), attributes={"description": constant_description(dim)})

    def write_region(self, train: tuple[int, int], query: tuple[int, int], bif: np.ndarray,
                     bif_corr: np.ndarray) -> None:
        """Write one block's region of both arrays, the two at once in zarr's I/O threads."""
        import asyncio

        from zarr.core.sync import sync

        sel = (slice(*train), slice(*query))

        async def both() -> None:
            await asyncio.gather(*(a.async_array.setitem(sel, v) for a, v in zip(self.arrays, (bif, bif_corr))))

        sync(both())

    def write_constant_flags(self, train_constant: np.ndarray, query_constant: np.ndarray) -> None:
        self.group[S.constant_var(S.TRAIN_DIM)][:] = train_constant
        self.group[S.constant_var(S.QUERY_DIM)][:] = query_constant


@dataclass(frozen=True)
class ZarrRegions:
    """A zarr group open for region writes of its 2-D arrays (each output block writes its own chunks)."""

    group: Any  # zarr.Group

    def dtype(self, name: str) -> np.dtype:
        return self.group[name].dtype

    def write(self, name: str, rows: tuple[int, int], cols: tuple[int, int], values: np.ndarray) -> None:
        self.group[name][rows[0]:rows[1], cols[0]:cols[1]] = values

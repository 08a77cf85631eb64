"""The trace store: per-sample loss traces and chain states as Parquet / torch files on fsspec.

Schema and layout are defined in :mod:`bif.schema`. Each (chain, block) is committed by
writing, in order, ``state/…pt``, ``health/…parquet`` and finally ``traces/…parquet``;
all writes are atomic, so a block is either committed whole or absent. A killed chain
resumes from its last committed block with no draw lost or duplicated.

Integrity: the CRC32C of each trace file's bytes is stored in its health file's Parquet
metadata (``bif.traces_crc32c``, 8 hex digits), which is written before the trace file (the
commit marker). CRC32C is the checksum S3 and GCS keep for objects; the machine computes it
(SSE4.2) at 5 GB/s against sha256's 1 GB/s, and it catches every burst error up to 32 bits and
any other damage but one in 4 billion. Blocks committed before it carry ``bif.traces_sha256``,
which is checked instead. A resume checks every committed block of the chain (one read of its trace files);
the first damaged block and all later ones are dropped and sampled again. Only the latest
chain state is kept, so redoing block k resamples the chain from its seed (bit-identical)
and commits blocks k onwards: the cost is the sampling time of blocks 0..k-1 again, at most
one chain's sampling time. Readers (the covariance) check every file before they use it
and raise a StorageError naming it; a rerun then redoes the block.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import logging
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bif import schema as S
from bif.errors import StorageError
from bif.sampling.measure import Variables, sequence_sums
from bif.store.fs import atomic_write, get_fs, join
from bif.store.tables import table_bytes

if TYPE_CHECKING:  # torch is imported lazily: readers of traces (the Dask reduction) never need it
    from bif.sampling.chain import ChainState, DrawBlock

#: Samples per Parquet row group (rows = samples x draws in the block). Readers of a
#: sample range fetch only the row groups that overlap it.
ROW_GROUP_SAMPLES = 1024

#: Parquet metadata key of a health file: the CRC32C of the trace file of the same block (8 hex digits).
META_TRACES_CRC32C = b"bif.traces_crc32c"
#: The sha256 that health files written before the CRC32C hold instead; still checked.
META_TRACES_SHA256 = b"bif.traces_sha256"
#: Bytes read at a time when a trace file is checked (a 1M-sample block is 400 MB).
CHECK_CHUNK = 8 << 20


def crc32c_hex(data: bytes) -> str:
    """CRC32C (Castagnoli) of ``data`` as 8 lowercase hex digits."""
    import google_crc32c

    return f"{google_crc32c.value(data):08x}"


def file_checksum(f: Any, algorithm: str) -> str:
    """Hex digest of the rest of the open binary file ``f``, read in :data:`CHECK_CHUNK` pieces: ``crc32c`` or
    ``sha256``."""
    if algorithm == "sha256":
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(CHECK_CHUNK), b""):
            h.update(chunk)
        return h.hexdigest()
    import google_crc32c

    crc = 0
    for chunk in iter(lambda: f.read(CHECK_CHUNK), b""):
        crc = google_crc32c.extend(crc, chunk)
    return f"{crc:08x}"

log = logging.getLogger(__name__)

_BLOCK_RE = re.compile(r"chain-(\d+)/block-(\d+)\.parquet$")


@dataclass(frozen=True)
class BlockRef:
    """A committed trace block: its chain, its block index, and the trace file's protocol-free path."""

    chain: int
    block: int
    path: str


@dataclass(frozen=True)
class BlockLayout:
    """Key-value metadata of a trace file: which draws and samples it holds, and in what order."""

    chain: int
    block: int
    draw_start: int
    num_draws: int
    n_train: int
    n_query: int
    row_group_rows: int
    #: token runs: the token variables (counts per sample, true positions), :func:`encode_tokens`; None: samples
    tokens: str | None = None

    @property
    def variables(self) -> Variables:
        """The variables of each draw in this file (their row offsets: :mod:`bif.sampling.measure`)."""
        if self.tokens is not None:
            return decode_tokens(self.tokens, self.n_train, self.n_query)
        return Variables.of_samples(n_train=self.n_train, n_query=self.n_query)

    @property
    def is_tokens(self) -> bool:
        return self.tokens is not None

    def to_bytes(self) -> bytes:
        order = S.TOKEN_TRACE_ROW_ORDER if self.tokens is not None else S.TRACE_ROW_ORDER
        d = dict(self.__dict__)
        if d["tokens"] is None:
            d.pop("tokens")  # sample runs keep the old footer
        return json.dumps(d | {"order": list(order)}, allow_nan=False).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "BlockLayout":
        d = json.loads(raw)
        d.pop("order", None)
        return cls(**d)


@functools.lru_cache(maxsize=8)
def _row_keys(n_train: int, n_query: int, num_draws: int):
    """:meth:`Variables.row_keys` of a sample-variable block, built once per shape (the chain's commit path:
    every block of a chain has the same shape). Callers must not modify the arrays."""
    keys = Variables.of_samples(n_train=n_train, n_query=n_query).row_keys(num_draws)
    for arr in (keys.split, keys.sample, keys.draw):
        arr.flags.writeable = False  # shared between blocks: a write would corrupt the next block's keys
    return keys


def encode_tokens(variables: Variables) -> str:
    """The token variables (counts per sample, true positions, both splits) as one compact string for a footer."""
    tr, qu = variables.token_counts
    flat = np.concatenate([tr, qu, variables.token_positions(S.TRAIN), variables.token_positions(S.QUERY)])
    return base64.b64encode(zlib.compress(flat.astype("<i8").tobytes(), 6)).decode()


@functools.lru_cache(maxsize=16)
def decode_tokens(text: str, n_train: int, n_query: int) -> Variables:
    """Inverse of :func:`encode_tokens` (cached: every read of a file of the run decodes the same string)."""
    flat = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<i8").astype(np.int64)
    tr, qu = flat[:n_train], flat[n_train:n_train + n_query]
    a = n_train + n_query
    b = a + int(tr.sum())
    return Variables.of_tokens(train_tokens=tr, query_tokens=qu, train_positions=flat[a:b],
                               query_positions=flat[b:b + int(qu.sum())])


def trace_table(block: DrawBlock, *, loss_dtype: str = "float32") -> tuple[pa.Table, BlockLayout]:
    """Arrow table of a DrawBlock in the documented long format: one row per (chain, draw, sample).

    Token runs (``block.variables`` of tokens): one row per (chain, draw, sample, position) of
    every valid token, with a ``position`` column. Row order and keys come from
    :meth:`bif.sampling.measure.Variables.row_keys`.
    """
    nd = block.train_losses.shape[0]
    tokens = block.variables is not None and block.variables.is_tokens
    if tokens:
        n_train, n_query = block.variables.sample_counts
        variables = block.variables
    else:
        n_train, n_query = block.train_losses.shape[1], block.query_losses.shape[1]
        variables = Variables.of_samples(n_train=n_train, n_query=n_query)
    # row groups of about ROW_GROUP_SAMPLES variables (token runs: as many rows as a sample run's group)
    layout = BlockLayout(chain=block.chain, block=block.draw_start, draw_start=block.draw_start, num_draws=nd,
                         n_train=n_train, n_query=n_query, row_group_rows=ROW_GROUP_SAMPLES * nd,
                         tokens=encode_tokens(variables) if tokens else None)
    keys = variables.row_keys(nd) if tokens else _row_keys(n_train, n_query, nd)
    np_dtype = np.float32 if loss_dtype == "float32" else np.float64
    # (D, variables) -> (variables, D): rows run variable-major, draws ascending within a variable
    losses = np.concatenate([block.train_losses, block.query_losses], axis=1).T.astype(np_dtype, copy=False)
    sch = S.trace_schema(loss_dtype, tokens=tokens).with_metadata({S.META_LAYOUT: layout.to_bytes()})
    table = pa.Table.from_arrays(
        [
            pa.array(np.full(variables.num_rows(nd), block.chain, dtype=np.int32)),
            pa.array((keys.draw + np.int32(block.draw_start)).astype(np.int32, copy=False)),
            pa.DictionaryArray.from_arrays(pa.array(keys.split.astype(np.int8, copy=False)),
                                           pa.array(list(variables.splits))),
            pa.array(keys.sample),
        ] + ([pa.array(keys.position)] if tokens else []) + [
            pa.array(losses.reshape(-1)),
        ],
        schema=sch,
    )
    return table, layout


def _table_bytes(table: pa.Table, row_group_rows: int | None = None, *, dictionary: bool | list[str] = True,
                 uncompressed: Sequence[str] = ()) -> bytes:
    """Parquet bytes of ``table``, zstd except the columns ``uncompressed``. ``dictionary``: the columns to
    dictionary-encode (True: all).

    Trace files dictionary-encode only ``split``: losses are distinct floats and the key
    columns compress well plainly, so dictionary pages there cost ~5x the write time of the
    whole file (the chain's commit path) and make it larger, not smaller. Their ``loss`` column is
    not compressed: zstd saved 8% of it on digits' losses (331 of 360 KB a block) and 15% on noise,
    while its decompression doubled the covariance's reads (a 3,334-sample block of a 20k x 1k run
    from two files: 9.7-13.6 instead of 4.9 ms); the key columns still shrink 30-60x.
    """
    codec = {f.name: ("none" if f.name in uncompressed else "zstd") for f in table.schema} if uncompressed else "zstd"
    return table_bytes(table, row_group_rows, compression=codec, use_dictionary=dictionary)


def state_bytes(state: ChainState) -> bytes:
    """Serialize a ChainState (tensors and ints only, loadable with weights_only=True)."""
    import torch

    buf = io.BytesIO()
    torch.save({"step": state.step, "num_recorded": state.num_recorded, "params": state.params,
                "precond": state.precond, "rng_cpu": state.rng_cpu, "rng_noise": state.rng_noise}, buf)
    return buf.getvalue()


def state_from_bytes(raw: bytes) -> ChainState:
    import torch

    from bif.sampling.chain import ChainState

    d = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    return ChainState(**d)


@dataclass(frozen=True)
class TraceStore:
    """Reads and writes one run's trace blocks under ``root`` (a path or URI)."""

    root: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    loss_dtype: str = "float32"

    @property
    def fs_path(self):
        return get_fs(self.root, self.storage_options)

    def _path(self, kind: str, chain: int, block: int, suffix: str) -> str:
        _, root = self.fs_path
        return join(root, kind, S.block_name(chain, block, suffix))

    def write_block(self, block: DrawBlock, *, block_index: int, ref_train_loss_mean: float) -> None:
        """Commit one block: state, then health, then the trace file (the commit marker)."""
        fs, _ = self.fs_path
        c = block.chain
        atomic_write(fs, self._path(S.STATE_DIR, c, block_index, "pt"), state_bytes(block.state))
        health = pa.table({
            S.CHAIN: pa.array(np.full(block.num_draws, c, np.int32)),
            S.DRAW: pa.array(np.arange(block.draw_start, block.draw_start + block.num_draws, dtype=np.int32)),
            S.STEP: pa.array(block.steps),
            S.DISTANCE: pa.array(block.distance.astype(np.float64)),
            S.TRAIN_LOSS_MEAN: pa.array(block.train_losses.mean(axis=1).astype(np.float64)),
            S.QUERY_LOSS_MEAN: pa.array(block.query_losses.mean(axis=1).astype(np.float64)),
            S.REF_TRAIN_LOSS_MEAN: pa.array(np.full(block.num_draws, ref_train_loss_mean, np.float64)),
        })
        table, layout = trace_table(block, loss_dtype=self.loss_dtype)
        layout = BlockLayout(**(layout.__dict__ | {"block": block_index}))
        table = table.replace_schema_metadata({S.META_LAYOUT: layout.to_bytes()})
        trace_bytes = _table_bytes(table, layout.row_group_rows, dictionary=[S.SPLIT], uncompressed=[S.LOSS])
        health = health.replace_schema_metadata({META_TRACES_CRC32C: crc32c_hex(trace_bytes).encode()})
        atomic_write(fs, self._path(S.HEALTH_DIR, c, block_index, "parquet"), _table_bytes(health))
        atomic_write(fs, self._path(S.TRACES_DIR, c, block_index, "parquet"), trace_bytes)
        if block_index > 0:  # only the latest state is needed to resume
            prev = self._path(S.STATE_DIR, c, block_index - 1, "pt")
            try:
                if fs.exists(prev):
                    fs.rm_file(prev)
            except Exception:  # noqa: BLE001 - a stale state file is harmless; the next commit retries
                pass

    def block_damage(self, chain: int, block: int) -> str | None:
        """Why the committed block is damaged (checksum mismatch, unreadable), or None if it is intact.

        The CRC32C, or the sha256 of blocks committed before it; blocks written before checksums existed (neither
        key) count as intact.
        """
        fs, _ = self.fs_path
        hpath = self._path(S.HEALTH_DIR, chain, block, "parquet")
        tpath = self._path(S.TRACES_DIR, chain, block, "parquet")
        try:
            with fs.open(hpath, "rb") as f:
                md = pq.read_schema(f).metadata or {}
        except FileNotFoundError:
            return f"its health file {hpath!r} is missing"
        except Exception as err:  # noqa: BLE001 - a damaged health file
            if _is_unreachable(err):
                raise
            return f"its health file {hpath!r} is unreadable ({type(err).__name__})"
        for key, algorithm in ((META_TRACES_CRC32C, "crc32c"), (META_TRACES_SHA256, "sha256")):
            want = md.get(key)
            if want is not None:
                break
        else:
            return None
        with fs.open(tpath, "rb") as f:
            got = file_checksum(f, algorithm)
        if got != want.decode():
            return f"{tpath!r} has {algorithm} {got}, but {want.decode()} was recorded when it was committed"
        return None

    def verify_blocks(self, files: list[BlockRef]) -> None:
        """StorageError naming the first damaged trace file of ``files`` (from :meth:`block_files`).

        Reads every file once (8 at a time), about the cost of one more pass of the covariance's reads.
        """
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="bif-verify") as pool:
            damage = list(pool.map(lambda f: self.block_damage(f.chain, f.block), files))
        for (c, b), why in zip(((f.chain, f.block) for f in files), damage):
            if why is not None:
                raise StorageError(
                    f"trace block {b} of chain {c} is damaged: {why}. Rerun the same command: the run resumes, "
                    "drops this block and the ones after it in this chain, and samples them again."
                )

    def drop_blocks(self, chain: int, first: int) -> None:
        """Remove blocks ``first``.. of ``chain``: trace files first (the commit markers), then health and state."""
        fs, _ = self.fs_path
        blocks = sorted(b for (c, b) in self._listing() if c == chain and b >= first)
        for kind, suffix in ((S.TRACES_DIR, "parquet"), (S.HEALTH_DIR, "parquet"), (S.STATE_DIR, "pt")):
            for b in ([first] + [x for x in blocks if x != first]):
                path = self._path(kind, chain, b, suffix)
                try:
                    fs.rm_file(path)
                except FileNotFoundError:
                    pass

    def write_reference(self, train: np.ndarray, query: np.ndarray) -> None:
        """Per-sample losses at the checkpoint w* (``reference.parquet``)."""
        fs, root = self.fs_path
        table = pa.table({
            S.SPLIT: pa.array([S.TRAIN] * len(train) + [S.QUERY] * len(query)).dictionary_encode(),
            S.SAMPLE: pa.array(np.r_[np.arange(len(train)), np.arange(len(query))].astype(np.int64)),
            S.LOSS: pa.array(np.r_[train, query].astype(np.float64)),
        })
        atomic_write(fs, join(root, S.REFERENCE_FILE), _table_bytes(table))

    def committed_blocks(self, chain: int) -> list[int]:
        """Indices 0..k-1 of the contiguous committed blocks of ``chain``."""
        fs, root = self.fs_path
        found = {b for (c, b), _ in self._listing().items() if c == chain}
        k = 0
        while k in found:
            k += 1
        return list(range(k))

    def _listing(self) -> dict[tuple[int, int], str]:
        fs, root = self.fs_path
        base = join(root, S.TRACES_DIR)
        try:
            paths = fs.glob(join(base, "chain-*", "block-*.parquet"))
        except FileNotFoundError:
            return {}
        out = {}
        for p in paths:
            m = _BLOCK_RE.search(p)
            if m:
                out[(int(m.group(1)), int(m.group(2)))] = p
        return out

    def load_resume_state(self, chain: int) -> tuple[ChainState | None, int]:
        """(state after the last committed block, number of intact committed blocks) of ``chain``.

        Every committed block is checked against its checksum; the first damaged one and all
        later ones are dropped (and logged, naming the file). The state is None when there are
        blocks but no usable state after the last one: the caller then resamples the chain
        from its seed (bit-identical) and commits only the missing blocks.
        """
        blocks = self.committed_blocks(chain)
        for b in blocks:
            why = self.block_damage(chain, b)
            if why is not None:
                log.warning("chain %d: trace block %d is damaged (%s); dropping it and the %d block(s) after it, "
                            "they are sampled again", chain, b, why, len(blocks) - b - 1)
                self.drop_blocks(chain, b)
                blocks = blocks[:b]
                break
        if not blocks:
            return None, 0
        fs, _ = self.fs_path
        path = self._path(S.STATE_DIR, chain, blocks[-1], "pt")
        try:
            with fs.open(path, "rb") as f:
                return state_from_bytes(f.read()), len(blocks)
        except FileNotFoundError:
            return None, len(blocks)
        except Exception as err:  # noqa: BLE001 - a damaged state file: resample from the seed
            if _is_unreachable(err):
                raise
            log.warning("chain %d: state %r is unreadable (%s); resampling the chain from its seed",
                        chain, path, type(err).__name__)
            return None, len(blocks)

    def block_files(self, *, num_chains: int | None = None) -> list[BlockRef]:
        """A BlockRef of every committed block, sorted by (chain, block); contiguous prefixes only."""
        listing = self._listing()
        chains = sorted({c for c, _ in listing}) if num_chains is None else list(range(num_chains))
        out = []
        for c in chains:
            for b in self.committed_blocks(c):
                out.append(BlockRef(c, b, listing[(c, b)]))
        return out


def _is_unreachable(err: BaseException) -> bool:
    """True for errors of an unreachable store (not of a damaged file), which must propagate."""
    name = type(err).__name__
    return isinstance(err, (ConnectionError, TimeoutError, StorageError)) or "Endpoint" in name or "Connect" in name


def read_layout(fs, path: str) -> BlockLayout:
    """The BlockLayout stored in a trace file's footer."""
    with fs.open(path, "rb") as f:
        md = pq.ParquetFile(f).schema_arrow.metadata
    return BlockLayout.from_bytes(md[S.META_LAYOUT])


def read_losses(fs, path: str, *, split: str, start: int, stop: int, layout: BlockLayout | None = None
                ) -> np.ndarray:
    """Losses of samples ``[start, stop)`` of ``split`` in one trace file, as float64 (num_draws, stop - start).

    Reads only the loss column of the row groups that overlap the range. Token runs: the
    sequence loss of each sample, the sum of its valid token losses (float64).
    """
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        layout = layout or BlockLayout.from_bytes(pf.schema_arrow.metadata[S.META_LAYOUT])
        variables = layout.variables
        if not variables.is_tokens:
            r0, r1 = variables.row_range(split, start, stop, layout.num_draws)
            return _read_rows(pf, layout, r0, r1)
        bounds = variables.sample_var_bounds(split)
        v0, v1 = int(bounds[start]), int(bounds[stop])
        vals = _read_variables(pf, layout, split, v0, v1)  # (D, v1 - v0)
    return sequence_sums(vals, np.diff(bounds[start:stop + 1]))


def read_token_losses(fs, path: str, *, split: str, start: int, stop: int, layout: BlockLayout | None = None
                      ) -> np.ndarray:
    """Losses of variables ``[start, stop)`` of ``split`` (split-local token indices), float64 (num_draws, stop - start).

    The variables of a token run are its valid tokens in (sample, position) order; for a
    sample run they are the samples (as :func:`read_losses`).
    """
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        layout = layout or BlockLayout.from_bytes(pf.schema_arrow.metadata[S.META_LAYOUT])
        return _read_variables(pf, layout, split, start, stop)


def _read_variables(pf, layout: BlockLayout, split: str, v0: int, v1: int) -> np.ndarray:
    variables = layout.variables
    n = variables.num_variables(split)
    if not 0 <= v0 <= v1 <= n:
        raise StorageError(f"variables [{v0}, {v1}) are outside {split!r}'s {n} variables")
    base = variables.first_variable(split)
    nd = layout.num_draws
    return _read_rows(pf, layout, (base + v0) * nd, (base + v1) * nd)


def _read_rows(pf, layout: BlockLayout, r0: int, r1: int) -> np.ndarray:
    """Rows ``[r0, r1)`` of the loss column (whole variables) as float64 (num_draws, variables)."""
    nd = layout.num_draws
    if r1 <= r0:
        return np.zeros((nd, 0), dtype=np.float64)
    g = layout.row_group_rows
    groups = list(range(r0 // g, (r1 - 1) // g + 1))
    col = pf.read_row_groups(groups, columns=[S.LOSS]).column(0)
    vals = col.to_numpy()[r0 - groups[0] * g: r1 - groups[0] * g]
    return vals.reshape(-1, nd).T.astype(np.float64)  # (variables, D) -> (D, variables)

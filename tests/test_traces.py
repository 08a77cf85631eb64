"""Trace store round trips on local disk, memory:// and a real S3 API (moto), and atomic commits."""
from __future__ import annotations

import numpy as np
import pytest

from bif import schema as S
from bif.config import SamplerConfig
from bif.errors import StorageError
from bif.examples import linear
from bif.sampling.chain import SGLDChain
from bif.store.run import BlockRef, RunStore


def _blocks(n=30, m=5, draws=10, per_block=4):
    prob = linear.build(n=n, d=3, m=m, seed=4)
    s = SamplerConfig(num_chains=1, num_draws=draws, num_burnin_steps=2, steps_per_draw=1, step_size=1e-3,
                      gamma=5.0, batch_size=10)
    return list(SGLDChain(prob, s, chain=2).run(num_draws=draws, draws_per_block=per_block))


def _roundtrip(root, storage_options):
    blocks = _blocks()
    store = RunStore(root, storage_options=storage_options, loss_dtype="float64")
    for i, b in enumerate(blocks):
        store.write_block(b, block_index=i, ref_train_loss_mean=1.5)
    files = store.blocks()
    assert all(isinstance(f, BlockRef) for f in files)
    assert [(f.chain, f.block) for f in files] == [(2, 0), (2, 1), (2, 2)]
    for ref, blk in zip(files, blocks):
        layout = store.read_layout(ref)
        assert (layout.draw_start, layout.num_draws, layout.n_train, layout.n_query) == (blk.draw_start, blk.num_draws, 30, 5)
        np.testing.assert_array_equal(store.read_losses(ref, split="train", start=7, stop=23), blk.train_losses[:, 7:23])
        np.testing.assert_array_equal(store.read_losses(ref, split="query", start=0, stop=5), blk.query_losses)
        df = store.read_trace_table(ref).to_pandas()
        assert list(df.columns) == [S.CHAIN, S.DRAW, S.SPLIT, S.SAMPLE, S.LOSS]
        assert len(df) == blk.num_draws * 35
        assert not df.duplicated([S.CHAIN, S.DRAW, S.SPLIT, S.SAMPLE]).any()
        # long format agrees with the wide arrays
        wide = df[df[S.SPLIT] == "train"].pivot(index=S.DRAW, columns=S.SAMPLE, values=S.LOSS).to_numpy()
        np.testing.assert_array_equal(wide, blk.train_losses)
    state, done = store.load_resume_state(2)
    assert done == 3 and state.num_recorded == 10
    health = store.read_health([files[1]])
    assert list(health[S.DRAW]) == [4, 5, 6, 7]
    np.testing.assert_allclose(health[S.DISTANCE], blocks[1].distance)
    return store


def test_roundtrip_local(tmp_path):
    _roundtrip(str(tmp_path / "run"), {})
    leftovers = [p for p in (tmp_path / "run").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []  # atomic writes leave no temporary files
    # only the latest state file is kept
    assert sorted(p.name for p in (tmp_path / "run" / "state" / "chain-2").iterdir()) == ["block-00002.pt"]


def test_trace_files_leave_the_loss_column_uncompressed(tmp_path):
    """The loss column is stored plainly (its decompression doubled the covariance's reads for 8% of its bytes);
    the key columns stay zstd-compressed, and the health file is zstd throughout."""
    import pyarrow.parquet as pq

    store = _roundtrip(str(tmp_path / "run"), {})
    for ref in store.blocks():
        meta = pq.ParquetFile(ref.path).metadata
        for g in range(meta.num_row_groups):
            codecs = {meta.row_group(g).column(i).path_in_schema: meta.row_group(g).column(i).compression
                      for i in range(meta.num_columns)}
            assert codecs == {S.CHAIN: "ZSTD", S.DRAW: "ZSTD", S.SPLIT: "ZSTD", S.SAMPLE: "ZSTD", S.LOSS: "UNCOMPRESSED"}
    health = next((tmp_path / "run" / S.HEALTH_DIR).rglob("*.parquet"))
    meta = pq.ParquetFile(health).metadata
    assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {"ZSTD"}


def test_trace_files_keep_split_statistics_and_the_bytes_of_arrows_default_batches(tmp_path):
    """The store encodes WRITE_BATCH_ROWS rows at a time (Arrow's default is 1,024; the statistics of the
    dictionary column ``split`` cost ~2 ms a digits block at that size). The file is byte for byte what Arrow's
    default batches write, and every row group keeps its statistics: a reader filtering on ``split`` (DuckDB)
    skips the row groups that hold no row of that split."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from bif.store.tables import WRITE_BATCH_ROWS
    from bif.store.traces import ROW_GROUP_SAMPLES

    # row groups: train, train, train + query, query
    n, m, draws = 2 * ROW_GROUP_SAMPLES + 300, ROW_GROUP_SAMPLES + 700, 70
    prob = linear.build(n=n, d=3, m=m, seed=4)
    s = SamplerConfig(num_chains=1, num_draws=draws, num_burnin_steps=1, steps_per_draw=1, step_size=1e-4,
                      gamma=5.0, batch_size=10)
    block = next(SGLDChain(prob, s, chain=0).run(num_draws=draws, draws_per_block=draws))
    assert ROW_GROUP_SAMPLES * draws > WRITE_BATCH_ROWS  # row groups of more than one batch of ours
    store = RunStore(str(tmp_path / "run"), loss_dtype="float32")
    store.write_block(block, block_index=0, ref_train_loss_mean=1.0)
    ref = store.blocks()[0]
    raw = open(ref.path, "rb").read()
    pf = pq.ParquetFile(ref.path)
    meta = pf.metadata
    sink = pa.BufferOutputStream()
    pq.write_table(pf.read(), sink, row_group_size=meta.row_group(0).num_rows, use_dictionary=[S.SPLIT],
                   compression={c: ("none" if c == S.LOSS else "zstd") for c in pf.schema_arrow.names})
    assert sink.getvalue().to_pybytes() == raw
    col = pf.schema_arrow.get_field_index(S.SPLIT)
    stats = [(meta.row_group(g).column(col).statistics.min, meta.row_group(g).column(col).statistics.max)
             for g in range(meta.num_row_groups)]
    assert stats == [("train", "train"), ("train", "train"), ("query", "train"), ("query", "query")]
    # DuckDB prunes row groups by them (pyarrow's datasets do not prune on a dictionary column)
    import duckdb

    for split, scanned, rows in (("query", 2, m * draws), ("train", 3, n * draws)):
        plan = duckdb.sql(f"EXPLAIN ANALYZE SELECT count(*) FROM '{ref.path}' WHERE split = '{split}'").fetchall()
        assert f"Row Groups Scanned: {scanned} / 4" in " ".join(str(r) for r in plan), split
        assert duckdb.sql(f"SELECT count(*) FROM '{ref.path}' WHERE split = '{split}'").fetchall() == [(rows,)]
    assert ds.dataset(ref.path, format="parquet").to_table(filter=ds.field(S.SPLIT) == "query").num_rows == m * draws


def test_roundtrip_memory():
    _roundtrip("memory://bif-traces-test", {})


def test_roundtrip_s3(s3_bucket):
    bucket, opts = s3_bucket
    _roundtrip(f"s3://{bucket}/runs/a", opts)


def test_uncommitted_block_is_invisible_and_resume_redoes_it_bit_for_bit(tmp_path):
    """A kill after block 1's state was written but before its trace file (the commit marker), as the
    real write order leaves it: block 1 is not listed, and the chain resumes from the state after
    block 0 and produces block 1 exactly as an uninterrupted chain did."""
    from bif.examples import linear as lin
    from bif.store.traces import state_bytes

    blocks = _blocks()
    store = RunStore(str(tmp_path), loss_dtype="float64")
    store.write_block(blocks[0], block_index=0, ref_train_loss_mean=0.0)
    # block 1 killed mid-commit: the write order is state, health, traces (and the old state is deleted
    # only after the trace file). Its state is written whole (atomic), the trace file only as a temp file.
    store.fs.pipe_file(store.path(S.STATE_DIR, S.block_name(2, 1, "pt")), state_bytes(blocks[1].state))
    (tmp_path / "traces" / "chain-2" / ".tmp-deadbeef").write_bytes(b"partial")
    assert [r.block for r in store.blocks()] == [0]
    state, done = store.load_resume_state(2)
    assert done == 1 and state.num_recorded == 4 and state.step == blocks[0].state.step
    # resume: the new block 1 equals the uninterrupted one bit for bit
    prob = lin.build(n=30, d=3, m=5, seed=4)
    s = SamplerConfig(num_chains=1, num_draws=10, num_burnin_steps=2, steps_per_draw=1, step_size=1e-3,
                      gamma=5.0, batch_size=10)
    chain = SGLDChain(prob, s, chain=2)
    chain.load_state(state)
    redone = next(iter(chain.run(num_draws=10, draws_per_block=4)))
    assert redone.draw_start == 4
    np.testing.assert_array_equal(redone.train_losses, blocks[1].train_losses)
    np.testing.assert_array_equal(redone.query_losses, blocks[1].query_losses)


def test_corrupt_block_is_detected_named_and_dropped(tmp_path, caplog):
    """A committed trace file with flipped bytes fails its CRC32C (recorded in the health file before
    the commit): readers raise a StorageError naming it; a resume drops it and the blocks after it."""
    blocks = _blocks()
    store = RunStore(str(tmp_path), loss_dtype="float64")
    for i, b in enumerate(blocks):
        store.write_block(b, block_index=i, ref_train_loss_mean=0.0)
    store.verify_blocks(store.blocks())  # intact
    path = tmp_path / "traces" / "chain-2" / "block-00001.parquet"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match=r"trace block 1 of chain 2 is damaged: .*block-00001\.parquet.*"
                                           r"Rerun the same command"):
        store.verify_blocks(store.blocks())
    with caplog.at_level("WARNING"):
        state, done = store.load_resume_state(2)
    assert (state, done) == (None, 1)  # block 0 kept; no state after it is left: resample from the seed
    assert "block-00001.parquet" in caplog.text
    assert [r.block for r in store.blocks()] == [0]
    assert not (tmp_path / "health" / "chain-2" / "block-00002.parquet").exists()
    # a truncated file is caught the same way
    path0 = tmp_path / "traces" / "chain-2" / "block-00000.parquet"
    path0.write_bytes(path0.read_bytes()[:100])
    with pytest.raises(StorageError, match="block-00000.parquet"):
        store.verify_blocks(store.blocks())


def test_checksums_are_crc32c_and_older_sha256_blocks_are_still_checked(tmp_path):
    """New health files record the trace file's CRC32C; a health file written before it holds a sha256, which is
    checked instead (a flipped byte is caught either way); a health file with neither counts as intact."""
    import hashlib

    import google_crc32c
    import pyarrow.parquet as pq

    from bif.store.traces import META_TRACES_CRC32C, META_TRACES_SHA256, file_checksum

    blocks = _blocks()
    store = RunStore(str(tmp_path), loss_dtype="float64")
    for i, b in enumerate(blocks[:2]):
        store.write_block(b, block_index=i, ref_train_loss_mean=0.0)
    trace = tmp_path / "traces" / "chain-2" / "block-00000.parquet"
    health = tmp_path / "health" / "chain-2" / "block-00000.parquet"
    md = pq.read_schema(health).metadata
    assert META_TRACES_SHA256 not in md
    assert md[META_TRACES_CRC32C].decode() == f"{google_crc32c.value(trace.read_bytes()):08x}"
    with trace.open("rb") as f:  # read in pieces: the same digests as of the whole bytes
        assert file_checksum(f, "crc32c") == md[META_TRACES_CRC32C].decode()
    with trace.open("rb") as f:
        assert file_checksum(f, "sha256") == hashlib.sha256(trace.read_bytes()).hexdigest()

    def rewrite_health(meta):
        table = pq.read_table(health)
        pq.write_table(table.replace_schema_metadata(meta), health)

    rewrite_health({META_TRACES_SHA256: hashlib.sha256(trace.read_bytes()).hexdigest().encode()})  # an older run
    store.verify_blocks(store.blocks())
    raw = bytearray(trace.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    trace.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match=r"block-00000\.parquet' has sha256 [0-9a-f]{64}, but"):
        store.verify_blocks(store.blocks())
    rewrite_health({})  # written before checksums existed
    store.verify_blocks(store.blocks())

"""The run catalog (bif/store/catalog.py): run identity, checkpoint discovery, no lost rows under
concurrent finishes (threads and processes, local disk and moto's S3), and pandas / pyarrow /
DuckDB reading it."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pandas as pd
import pyarrow.dataset as ds
import pytest

from bif import schema as S
from bif.errors import ConfigError
from bif.store.catalog import (Catalog, CatalogRow, list_checkpoints, make_run_id, parse_when, run_uri,
                               sweep_config_hash)


def _row(i: int, output: str, status: str = S.STATUS_COMPLETE) -> CatalogRow:
    sha = f"{i:064x}"
    rid = make_run_id(sha, "cfg0")
    return CatalogRow(run_id=rid, checkpoint_uri=f"{output}/ckpt/{i}.pt", checkpoint_sha256=sha, config_hash="cfg0",
                      status=status, output_uri=run_uri(output, rid), checkpoint_mtime=1.7e9 + i,
                      started_at=1.8e9 + i, finished_at=1.8e9 + i + 5 if status != S.STATUS_RUNNING else None,
                      timings={"total_s": 5.0 + i}, quality_passed=True, rhat_max=1.01, n_train=40,
                      error=None if status != S.STATUS_FAILED else f"boom {i}")


def test_run_identity_is_content_and_config_not_paths():
    base = {"problem": "bif.examples.linear:build", "sampler": {"num_draws": 10}, "output": "a", "checkpoint": "x.pt",
            "storage_options": {"key": "k"}, "compute": {"n_workers": 2}}
    moved = base | {"output": "s3://b/elsewhere", "checkpoint": "s3://b/y.pt", "compute": {"address": "tcp://h:1"}}
    assert sweep_config_hash(base) == sweep_config_hash(moved)
    assert sweep_config_hash(base) != sweep_config_hash(base | {"sampler": {"num_draws": 11}})
    h = sweep_config_hash(base)
    assert len(h) == 16 and make_run_id("a" * 64, h) == make_run_id("a" * 64, h)
    assert len({make_run_id("a" * 64, h), make_run_id("b" * 64, h), make_run_id("a" * 64, "0" * 16)}) == 3
    assert run_uri("s3://b/out", "abc") == "s3://b/out/runs/abc"


def test_list_checkpoints_filters_on_modification_time(tmp_path):
    for i, day in enumerate((1, 10, 20)):
        p = tmp_path / f"step-{i}.pt"
        p.write_bytes(b"x" * (i + 1))
        t = parse_when(f"2026-11-{day:02d}T00:00:00")
        os.utime(p, (t, t))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    found = list_checkpoints(str(tmp_path / "*.pt"))
    assert [os.path.basename(c.uri) for c in found] == ["step-0.pt", "step-1.pt", "step-2.pt"]
    assert [c.size for c in found] == [1, 2, 3]
    sel = list_checkpoints(str(tmp_path / "*.pt"), since=parse_when("2026-11-10"), until=parse_when("2026-11-20"))
    assert [os.path.basename(c.uri) for c in sel] == ["step-1.pt"]  # since inclusive, until exclusive
    assert list_checkpoints(str(tmp_path / "none-*.pt")) == []
    with pytest.raises(ConfigError, match="--since 'last tuesday'.*ISO"):
        parse_when("last tuesday")


def test_latest_state_wins_and_history_keeps_every_state(tmp_path):
    cat = Catalog(str(tmp_path))
    cat.record(_row(1, str(tmp_path), S.STATUS_RUNNING))
    cat.record(_row(2, str(tmp_path), S.STATUS_FAILED))
    cat.record(_row(1, str(tmp_path), S.STATUS_COMPLETE))
    assert len(cat.history()) == 3
    df = cat.compact()
    assert list(df[S.STATUS]) == [S.STATUS_COMPLETE, S.STATUS_FAILED]  # ordered by checkpoint mtime
    assert df[S.ERROR].tolist()[1] == "boom 2" and pd.isna(df[S.ERROR].tolist()[0])
    assert cat.read().equals(df)
    assert str(df[S.STARTED_AT].dtype) == "datetime64[us, UTC]"


def _record_and_compact(uri: str, opts: dict, ids: list[int]) -> None:
    cat = Catalog(uri, opts)
    for i in ids:
        cat.record(_row(i, uri))
        cat.compact()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_finishes_never_lose_a_row(tmp_path, where, request):
    if where == "s3":
        bucket, opts = request.getfixturevalue("s3_bucket")
        uri = f"s3://{bucket}/sweep"
    else:
        uri, opts = str(tmp_path / "sweep"), {}
    n_threads, per_thread = (4, 2) if where == "s3" else (6, 3)
    barrier = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        barrier.wait()  # every thread records and compacts at the same moment
        _record_and_compact(uri, opts, [t * per_thread + k for k in range(per_thread)])

    with ThreadPoolExecutor(n_threads) as pool:
        list(pool.map(worker, range(n_threads)))
    want = {_row(i, uri).run_id for i in range(n_threads * per_thread)}
    # the last compaction to write saw every row: catalog.parquet is complete without another compaction
    assert set(Catalog(uri, opts).read()[S.RUN_ID]) == want
    assert len(Catalog(uri, opts).history()) == n_threads * per_thread


def test_concurrent_finishes_from_processes(tmp_path):
    uri = str(tmp_path / "sweep")
    with ProcessPoolExecutor(4) as pool:
        list(pool.map(_record_and_compact, [uri] * 4, [{}] * 4, [[p * 5 + k for k in range(5)] for p in range(4)]))
    assert set(Catalog(uri).read()[S.RUN_ID]) == {_row(i, uri).run_id for i in range(20)}


def test_pandas_pyarrow_and_duckdb_read_the_catalog(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    cat = Catalog(str(tmp_path))
    for i in range(3):
        cat.record(_row(i, str(tmp_path), S.STATUS_FAILED if i == 1 else S.STATUS_COMPLETE))
    cat.compact()
    path = tmp_path / S.CATALOG_FILE
    pdf = pd.read_parquet(path)
    assert len(pdf) == 3 and set(S.catalog_schema().names) <= set(pdf.columns)
    table = ds.dataset(path).to_table()
    assert table.schema.field(S.STARTED_AT).type == S.catalog_schema().field(S.STARTED_AT).type
    assert table.num_rows == 3
    folder = ds.dataset(tmp_path / S.CATALOG_DIR, format="parquet").to_table()  # the history, as a dataset
    assert folder.num_rows == 3
    got = duckdb.sql(f"SELECT status, count(*) AS n FROM '{path}' GROUP BY status ORDER BY status").fetchall()
    assert got == [("complete", 2), ("failed", 1)]
    total = duckdb.sql(f"SELECT sum(total_s) FROM '{path}' WHERE status = 'complete'").fetchall()[0][0]
    assert total == pytest.approx(5.0 + 7.0)


def test_topk_trend_known_ranks_and_overlaps(tmp_path):
    from bif.trend import topk_trend, trend_html

    def frame(order: list[int]) -> pd.DataFrame:  # query 0's positive list in this order; query 1 is noise
        rows = [{S.QUERY: 0, S.DIRECTION: "positive", S.RANK: r, S.TRAIN: t, S.BIF: 1.0 - 0.1 * r, S.BIF_CORR: 0.5}
                for r, t in enumerate(order)]
        rows += [{S.QUERY: 1, S.DIRECTION: "positive", S.RANK: 0, S.TRAIN: 99, S.BIF: 9.0, S.BIF_CORR: 0.9},
                 {S.QUERY: 0, S.DIRECTION: "negative", S.RANK: 0, S.TRAIN: 98, S.BIF: -9.0, S.BIF_CORR: -0.9}]
        return pd.DataFrame(rows, columns=list(S.TOPK_COLUMNS))

    runs = [("e010", frame([1, 2, 3, 4])), ("e030", frame([2, 1, 5, 3])), ("e100", frame([2, 5, 6, 7]))]
    tr = topk_trend(runs, query=0, k=3)
    assert tr.checkpoints == ["e010", "e030", "e100"]
    assert sorted(tr.ranks.index) == [1, 2, 3, 5, 6]  # ever in a top 3; 4 and 7 never, 98 / 99 other lists
    assert tr.ranks.loc[2].tolist() == [1.0, 0.0, 0.0]
    assert tr.ranks.loc[6].isna().tolist() == [True, True, False]
    assert tr.bif.loc[1, "e010"] == pytest.approx(1.0)
    assert tr.jaccard == pytest.approx([2 / 4, 2 / 4])  # {1,2,3}->{2,1,5}; {2,1,5}->{2,5,6}
    table = tr.table()
    assert table.index[0] == 2 and table.loc[6].tolist() == ["-", "-", "2"]
    page = trend_html(tr, source="runs/sweep")
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page and "e030" in page
    assert topk_trend(runs[:1], query=0, k=3).jaccard == []

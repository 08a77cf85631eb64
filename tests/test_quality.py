"""Data-quality gates: good data passes; each injected fault fails the right gate and names where."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from bif import schema as S
from bif.config import QualityConfig, SamplerConfig
from bif.errors import QualityError
from bif.quality.aggregates import trace_block_stats
from bif.quality.registry import gate_names
from bif.quality.run import (GATES, QualityReport, RunSizes, check_health, check_results, check_trace_block,
                             check_trace_stats, run_gates)
from bif.sampling.chain import DrawBlock
from bif.store.traces import trace_table

N_TRAIN, N_QUERY, ND, D0, CHAIN = 30, 5, 10, 20, 1
BOUNDS = (0.0, float("inf"))
Q = QualityConfig()
SAMPLER = SamplerConfig(num_draws=D0 + ND, draws_per_block=ND)  # block 2 holds draws D0 .. D0 + ND - 1
BLOCK = D0 // ND
SIZES = RunSizes(n_train=N_TRAIN, n_query=N_QUERY, loss_bounds=BOUNDS)


def _q(**kw) -> QualityConfig:
    return QualityConfig(**kw)


def _block_frame(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    block = DrawBlock(chain=CHAIN, draw_start=D0, train_losses=rng.gamma(2.0, 0.3, (ND, N_TRAIN)),
                      query_losses=rng.gamma(2.0, 0.3, (ND, N_QUERY)), steps=np.arange(ND), distance=np.ones(ND),
                      state=None)
    table, _ = trace_table(block)
    return table.to_pandas()


def _check(df: pd.DataFrame, quality: QualityConfig = Q, **kw) -> list:
    return check_trace_block(df, quality, SAMPLER, sizes=SIZES, chain=CHAIN, block=BLOCK, **kw)


def _failed(results) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in results:
        if not r.success:
            out.setdefault(r.gate, []).append(r)
    return out


def _row(df: pd.DataFrame, split: str, sample: int, draw: int) -> int:
    idx = df.index[(df[S.SPLIT] == split) & (df[S.SAMPLE] == sample) & (df[S.DRAW] == draw)]
    assert len(idx) == 1
    return int(idx[0])


def test_good_block_passes():
    results = _check(_block_frame())
    assert results and all(r.success for r in results)
    assert {r.gate for r in results} == {"trace_schema", "trace_nulls", "trace_finite", "trace_unique",
                                         "trace_complete", "trace_bounds"}
    assert not _failed(check_trace_block(_block_frame(), Q, SAMPLER, chain=CHAIN, block=BLOCK,
                                         sizes=RunSizes(n_train=N_TRAIN, n_query=N_QUERY, loss_bounds=(0.0, 100.0))))
    # a frame of several blocks names its draws explicitly
    assert not _failed(check_trace_block(_block_frame(), Q, SamplerConfig(num_draws=100, draws_per_block=5),
                                         sizes=SIZES, chain=CHAIN, block=4, draws=(D0, ND)))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_loss_names_chain_draw_sample(value):
    df = _block_frame()
    df.loc[_row(df, "train", 7, D0 + 3), S.LOSS] = value
    failed = _failed(_check(df))
    assert set(failed) <= {"trace_finite", "trace_bounds"} and "trace_finite" in failed
    (r,) = failed["trace_finite"]
    assert r.unexpected_count == 1 and r.severity == "error"
    assert f"chain={CHAIN}" in r.detail and f"draw={D0 + 3}" in r.detail and "split=train sample=7" in r.detail


def test_duplicate_row_fails_unique_and_complete():
    df = _block_frame()
    dup = df.iloc[[_row(df, "query", 2, D0 + 4)]]
    failed = _failed(_check(pd.concat([df, dup], ignore_index=True)))
    assert set(failed) == {"trace_unique", "trace_complete"}
    (r,) = failed["trace_unique"]
    assert r.unexpected_count == 2  # both copies
    assert f"draw={D0 + 4} split=query sample=2" in r.detail
    assert "query sample 2 has 11 of 10 draws (duplicated draws)" in failed["trace_complete"][0].detail


def test_missing_draw_names_the_draw():
    df = _block_frame()
    failed = _failed(_check(df[df[S.DRAW] != D0 + 7].reset_index(drop=True)))
    assert set(failed) == {"trace_complete"}
    details = " | ".join(r.detail for r in failed["trace_complete"])
    assert f"missing draw values [{D0 + 7}]" in details
    assert f"missing draws [{D0 + 7}]" in details  # from the row count's explanation
    assert f"chain {CHAIN}" in details


def test_missing_single_row_names_split_sample_draw():
    df = _block_frame()
    failed = _failed(_check(df.drop(index=_row(df, "train", 4, D0 + 2)).reset_index(drop=True)))
    assert set(failed) == {"trace_complete"}
    (r,) = failed["trace_complete"]
    assert r.expectation == "expect_table_row_count_to_equal"
    assert f"train sample 4 has 9 of 10 draws (missing draws [{D0 + 2}])" in r.detail


def test_sample_out_of_range_and_wrong_chain():
    df = _block_frame()
    df.loc[_row(df, "query", 4, D0), S.SAMPLE] = N_QUERY + 3
    df.loc[_row(df, "train", 0, D0 + 1), S.CHAIN] = 9
    failed = _failed(_check(df))
    details = " | ".join(r.detail for r in failed["trace_complete"])
    assert f"sample={N_QUERY + 3}" in details and "chain=9" in details


def test_out_of_bounds_loss():
    df = _block_frame()
    df.loc[_row(df, "train", 11, D0 + 9), S.LOSS] = -0.25
    failed = _failed(_check(df))
    assert set(failed) == {"trace_bounds"}
    assert "draw=29 split=train sample=11 loss=-0.25" in failed["trace_bounds"][0].detail


def test_schema_mismatch_stops_early():
    df = _block_frame().rename(columns={S.LOSS: "value"})
    results = _check(df)
    assert len(results) == 1 and results[0].gate == "trace_schema" and not results[0].success
    df = _block_frame()
    df[S.SAMPLE] = df[S.SAMPLE].astype(np.int32)
    assert "int32" in _failed(_check(df))["trace_schema"][0].detail


def _stats_check(df: pd.DataFrame, **kw) -> list:
    import pyarrow as pa

    nullable = pa.schema([f.with_nullable(True) for f in S.trace_schema()])
    table = pa.Table.from_pandas(df, schema=nullable, preserve_index=False)
    stats = trace_block_stats(table, chain=CHAIN, block=2, draw_start=D0, num_draws=ND, n_train=N_TRAIN,
                              n_query=N_QUERY, loss_bounds=BOUNDS)
    return check_trace_stats(pd.DataFrame([stats]), Q, **kw)


def _inject(kind: str) -> pd.DataFrame:
    df = _block_frame()
    if kind == "nan":
        df.loc[_row(df, "train", 7, D0 + 3), S.LOSS] = np.nan
    elif kind == "inf":
        df.loc[_row(df, "query", 1, D0 + 5), S.LOSS] = np.inf
    elif kind == "duplicate":
        df = pd.concat([df, df.iloc[[_row(df, "query", 2, D0 + 4)]]], ignore_index=True)
    elif kind == "missing_draw":
        df = df[df[S.DRAW] != D0 + 7].reset_index(drop=True)
    elif kind == "missing_row":
        df = df.drop(index=_row(df, "train", 4, D0 + 2)).reset_index(drop=True)
    elif kind == "bounds":
        df.loc[_row(df, "train", 11, D0 + 9), S.LOSS] = -0.25
    elif kind == "wrong_chain":
        df.loc[_row(df, "train", 0, D0 + 1), S.CHAIN] = 9
    return df


FAULTS = {  # fault -> (failing gates, text naming where, in the aggregate check's detail)
    "none": (set(), ""),
    "nan": ({"trace_finite"}, f"first_nonfinite=draw={D0 + 3} split=train sample=7 loss=nan"),
    "inf": ({"trace_finite"}, f"first_nonfinite=draw={D0 + 5} split=query sample=1 loss=inf"),
    "duplicate": ({"trace_unique"}, f"first_duplicate=draw={D0 + 4} split=query sample=2"),
    "missing_draw": ({"trace_complete"}, f"first_missing=draw={D0 + 7} split=train sample=0"),
    "missing_row": ({"trace_complete"}, f"first_missing=draw={D0 + 2} split=train sample=4"),
    "bounds": ({"trace_bounds"}, f"first_out_of_bounds=draw={D0 + 9} split=train sample=11 loss=-0.25"),
    "wrong_chain": ({"trace_complete"}, f"first_wrong_chain=draw={D0 + 1} split=train sample=0"),
}


@pytest.mark.parametrize("kind", list(FAULTS))
def test_aggregate_check_agrees_with_row_check(kind):
    """Per-block numpy aggregates + GE flag the same gates as GE on every row, and name the first offending row."""
    df = _inject(kind)
    gates, where = FAULTS[kind]
    agg = _failed(_stats_check(df))
    rows = _failed(_check(df))
    assert set(agg) == gates
    assert set(rows) == gates | ({"trace_complete"} if kind == "duplicate" else set())  # + its row count
    if where:
        details = " | ".join(r.detail for rs in agg.values() for r in rs)
        assert where in details and f"chain={CHAIN} block=2" in details


STREAMED = {"none", "nan", "inf", "bounds"}  # faults the row-group path itself counts; the others fall back


@pytest.mark.parametrize("kind", list(FAULTS) + ["schema", "null_key", "late_nan"])
def test_trace_file_stats_equals_the_whole_table_path(tmp_path, kind):
    """trace_file_stats (the gates' per-file job) reads a file laid out as written one row group at a time: the
    same dict as trace_block_stats on the whole table for every fault, with the first offender named across
    row groups; files not laid out as written take the whole-table path (checked via _stream_stats)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bif.quality.aggregates import _stream_stats, trace_file_stats

    df = _inject(kind if kind in FAULTS else "none")
    schema = S.trace_schema()
    if kind == "late_nan":  # two offenders in different row groups: the first one is named
        df.loc[_row(df, "query", 4, D0 + 8), S.LOSS] = np.nan
        df.loc[_row(df, "query", 2, D0 + 1), S.LOSS] = np.inf
    if kind == "schema":
        df[S.SAMPLE] = df[S.SAMPLE].astype(np.int32)
        schema = schema.set(schema.get_field_index(S.SAMPLE), pa.field(S.SAMPLE, pa.int32(), nullable=False))
    if kind == "null_key":
        schema = pa.schema([f.with_nullable(True) for f in schema])
    loose = pa.schema([f.with_nullable(True) for f in schema])
    table = pa.Table.from_pandas(df, schema=loose, preserve_index=False)  # pandas' NaN becomes a null here ...
    i = table.schema.get_field_index(S.LOSS)
    table = table.set_column(i, S.LOSS, pa.array(df[S.LOSS].to_numpy(np.float32)))  # ... a NaN value here
    table = table.cast(schema)
    if kind == "null_key":
        draw = table.column(S.DRAW).to_pylist()
        draw[57] = None
        table = table.set_column(table.schema.get_field_index(S.DRAW), S.DRAW, pa.array(draw, pa.int32()))
    path = str(tmp_path / "block.parquet")
    pq.write_table(table, path, row_group_size=37)  # several row groups, cut inside a sample's draws
    kw = dict(chain=CHAIN, block=2, draw_start=D0, num_draws=ND, n_train=N_TRAIN, n_query=N_QUERY,
              loss_bounds=BOUNDS)
    fs = fsspec.filesystem("file")
    want = trace_block_stats(pq.read_table(path), **kw)
    assert trace_file_stats(fs, path, **kw) == want
    pf = pq.ParquetFile(path)
    groups = (pf.read_row_group(i) for i in range(pf.num_row_groups))
    streamed = _stream_stats(pf.schema_arrow, pf.metadata.num_rows, groups, loss_dtype="float32", **kw)
    assert (streamed is not None) == (kind in STREAMED | {"late_nan"})
    if kind == "late_nan":
        assert want["n_nonfinite"] == 2 and want["first_nonfinite"] == f"draw={D0 + 1} split=query sample=2 loss=inf"


def test_severity_warning_turns_failure_into_warning():
    df = _block_frame()
    df.loc[_row(df, "train", 1, D0), S.LOSS] = np.nan
    results = _check(df, _q(severity={"trace_finite": "warning"}))
    report = QualityReport.from_results(results)
    assert report.passed and not report.failed
    assert [r.gate for r in report.warnings] == ["trace_finite"]
    report = QualityReport.from_results(_check(df, allow_warnings=True))
    assert report.passed and len(report.warnings) == 1
    failing = QualityReport.from_results(_check(df))
    assert not failing.passed
    with pytest.raises(QualityError, match=r"trace_finite \[expect_column_values_to_not_be_null\].*sample=1"):
        failing.raise_if_failed()


# --- health -----------------------------------------------------------------------------------
def _health(num_chains: int = 4, num_draws: int = 50, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    for c in range(num_chains):
        frames.append(pd.DataFrame({
            S.CHAIN: np.full(num_draws, c, np.int32), S.DRAW: np.arange(num_draws, dtype=np.int32),
            S.STEP: np.arange(num_draws) * 5, S.DISTANCE: 1.0 + 0.1 * rng.random(num_draws),
            S.TRAIN_LOSS_MEAN: 0.3 + 0.05 * rng.random(num_draws), S.QUERY_LOSS_MEAN: 0.4 + 0.05 * rng.random(num_draws),
            S.REF_TRAIN_LOSS_MEAN: np.full(num_draws, 0.25)}))
    return pd.concat(frames, ignore_index=True)


def _check_health(df, **kw):
    quality = QualityConfig(max_loss_factor=5.0, loss_slack=0.0, **kw)
    return check_health(df, quality, SamplerConfig(num_draws=50, num_chains=4))


def test_healthy_chains_pass():
    assert all(r.success for r in _check_health(_health()))


def test_runaway_chain_fails_naming_the_chain():
    df = _health()
    late = (df[S.CHAIN] == 2) & (df[S.DRAW] >= 20)
    df.loc[late, S.TRAIN_LOSS_MEAN] = np.linspace(1, 80, int(late.sum()))
    failed = _failed(_check_health(df))
    assert set(failed) == {"health_loss"}
    (r,) = failed["health_loss"]
    assert "chain=2" in r.detail and "worst_draw=49" in r.detail and "chain=0" not in r.detail


def test_distance_bound_names_chain_and_draw():
    df = _health()
    df.loc[(df[S.CHAIN] == 3) & (df[S.DRAW] == 17), S.DISTANCE] = 50.0
    failed = _failed(_check_health(df))
    assert set(failed) == {"health_distance"} and "chain=3 draw=17 distance=50" in failed["health_distance"][0].detail
    assert not _failed(_check_health(df, max_distance=60.0))  # an explicit bound replaces the relative one


def test_missing_draws_and_chains():
    df = _health()
    df = df[~((df[S.CHAIN] == 1) & (df[S.DRAW] == 30)) & (df[S.CHAIN] != 3)]
    failed = _failed(_check_health(df))
    assert set(failed) == {"health_draws"}
    details = " | ".join(r.detail for r in failed["health_draws"])
    assert "chain=1 num_draws=49" in details and "missing chain values [3]" in details


# --- results ----------------------------------------------------------------------------------
def _results(n_train: int = 40, n_query: int = 40, chunks=(16, 40), seed: int = 0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, n_train))
    y = x[:, :n_query] if n_query == n_train else rng.normal(size=(200, n_query))
    xc, yc = x - x.mean(0), y - y.mean(0)
    cov = xc.T @ yc / 199
    corr = cov / np.outer(xc.std(0, ddof=1), yc.std(0, ddof=1))
    ds = xr.Dataset({S.BIF: ((S.TRAIN_DIM, S.QUERY_DIM), -cov), S.BIF_CORR: ((S.TRAIN_DIM, S.QUERY_DIM), -corr)},
                    coords={S.TRAIN_DIM: np.arange(n_train), S.QUERY_DIM: np.arange(n_query)})
    return ds.chunk({S.TRAIN_DIM: chunks[0], S.QUERY_DIM: chunks[1]})


SELF40 = RunSizes(n_train=40, n_query=40, query_is_train=True)


def test_good_results_pass_and_are_chunked():
    results = check_results(_results(), Q, sizes=SELF40)
    assert all(r.success for r in results)
    assert {r.gate for r in results} == {"results_shape", "results_finite", "results_corr_range",
                                         "results_self_influence"}


def test_bad_results_name_the_pair():
    ds = _results().load()
    ds[S.BIF][33, 7] = np.nan
    ds[S.BIF_CORR][5, 9] = 1.5
    ds[S.BIF][12, 12] = 0.5  # positive self-influence: impossible for -Var
    failed = _failed(check_results(ds.chunk({S.TRAIN_DIM: 16}), Q, sizes=SELF40))
    assert set(failed) == {"results_finite", "results_corr_range", "results_self_influence"}
    assert "bad_train=33 bad_query=7 bad_value=nan" in failed["results_finite"][0].detail
    assert "max_train=5 max_query=9 max=1.5" in failed["results_corr_range"][0].detail
    assert "sample=12 self_influence=0.5" in failed["results_self_influence"][0].detail


def test_results_gates_agree_in_process_and_on_dask(dask_address):
    """A bif.zarr small enough to be read in process is scanned there (scheduler 'sync'), a Dask-backed one on the
    cluster: the same gate results and failure details either way."""
    from distributed import Client, get_task_stream

    ds = _results().load()
    ds[S.BIF][33, 7] = np.nan
    ds[S.BIF_CORR][5, 9] = 1.5
    ds[S.BIF][12, 12] = 0.5

    def summary(results):
        return sorted((r.gate, r.success, r.unexpected_count, r.detail) for r in results)

    with Client(dask_address) as client:  # the default scheduler now, as under a task's worker_client
        with get_task_stream(client=client) as here:
            in_process = summary(check_results(ds, Q, sizes=SELF40))
        with get_task_stream(client=client) as there:
            on_dask = summary(check_results(ds.chunk({S.TRAIN_DIM: -1}), Q, sizes=SELF40))
    assert not here.data and there.data  # nothing went through the cluster for the in-memory bif
    assert in_process == on_dask
    assert {g for g, ok, *_ in in_process if not ok} == {"results_finite", "results_corr_range",
                                                           "results_self_influence"}


def test_results_shape_and_coords():
    ds = _results(n_train=40, n_query=8)
    failed = _failed(check_results(ds, Q, sizes=RunSizes(n_train=41, n_query=8)))
    assert set(failed) == {"results_shape"}
    assert any("dim=train size=40 expected_size=41" in r.detail for r in failed["results_shape"])
    failed = _failed(check_results(ds.drop_vars(S.BIF_CORR), Q, sizes=RunSizes(n_train=40, n_query=8)))
    assert any("var=bif_corr" in r.detail for r in failed["results_shape"])
    shifted = ds.assign_coords({S.QUERY_DIM: np.arange(8) + 100})
    failed = _failed(check_results(shifted, Q, sizes=RunSizes(n_train=40, n_query=8)))
    assert any("sample ids" in r.detail for r in failed["results_shape"])


def test_constant_trace_share_warns_by_default_and_nan_corr_still_fails():
    ds = _results(n_train=40, n_query=8).load()
    ds[S.TRAIN_CONSTANT] = (S.TRAIN_DIM, np.arange(40) < 24)  # 60 % of train, 1 of 8 query
    ds[S.QUERY_CONSTANT] = (S.QUERY_DIM, np.arange(8) == 3)
    ds[S.BIF][:24] = 0.0
    ds[S.BIF_CORR][:24] = 0.0  # the defined value: finite, so results_corr_range passes
    results = check_results(ds.chunk({S.TRAIN_DIM: 16}), _q(max_constant_share=0.5),
                            sizes=RunSizes(n_train=40, n_query=8))
    bad = [r for r in results if not r.success]
    assert [(r.gate, r.severity, r.unexpected_count) for r in bad] == [("traces_constant", "warning", 1)]
    assert "split=train num_constant=24 num_samples=40 share_constant=0.6" in bad[0].detail
    report = QualityReport.from_results(results)
    assert report.passed and len(report.warnings) == 1
    # raised limit: passes; explicit severity error: fails the run
    assert all(r.success for r in check_results(ds, _q(max_constant_share=0.6), sizes=RunSizes(n_train=40, n_query=8)))
    strict = check_results(ds, _q(max_constant_share=0.1, severity={"traces_constant": "error"}),
                           sizes=RunSizes(n_train=40, n_query=8))
    assert [(r.gate, r.unexpected_count) for r in _failed(strict)["traces_constant"]] == [("traces_constant", 2)]
    assert not QualityReport.from_results(strict).passed
    # a NaN in bif_corr is no longer explained away as a constant trace: it fails
    ds[S.BIF_CORR][30, 2] = np.nan
    failed = _failed(check_results(ds, _q(max_constant_share=1.0), sizes=RunSizes(n_train=40, n_query=8)))
    assert set(failed) == {"results_corr_range"}
    assert "bad_train=30 bad_query=2 bad_value=nan" in failed["results_corr_range"][0].detail


# --- whole runs ---------------------------------------------------------------------------------
def test_config_lists_every_gate():
    assert set(GATES) == set(gate_names())
    assert QualityConfig(severity={g: "warning" for g in GATES}).severity == {g: "warning" for g in GATES}
    description = QualityConfig.model_fields["severity"].description
    assert all(g in description for g in GATES)


def test_import_is_cheap():
    code = "import sys, bif.quality.run; assert 'great_expectations' not in sys.modules; assert 'prefect' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_run_gates_on_a_tiny_run(tiny_run):
    run, cfg = tiny_run
    report = run_gates(run.uri, None, cfg, n_train=run.n_train, n_query=run.n_query, loss_bounds=(0.0, np.inf))
    assert report.passed and not report.warnings, report.summary()
    # the reads run side by side (run_gates' threads), the results keep the gates' order: traces, health, results
    groups = [r.gate.split("_")[0] for r in report.results]
    assert groups == sorted(groups, key=["trace", "health", "results", "traces"].index)
    assert groups[0] == "trace" and "health" in groups and groups[-1] in ("results", "traces")  # traces_constant
    qdir = Path(run.uri) / "quality"
    summary = json.loads((qdir / "summary.json").read_text())
    assert summary["passed"] and summary["num_expectations"] == len(report.results)
    for group in ("traces", "health", "results"):
        data = json.loads((qdir / f"{group}.json").read_text())
        assert data["validation_results"] and all(v["success"] for v in data["validation_results"])
        assert (qdir / f"{group}.md").read_text()
        # passed suites in BOOLEAN_ONLY: success alone, and the rows each suite saw (none is vacuous here)
        for v in data["validation_results"]:
            assert all(r["result"] == {} for r in v["results"])
            assert v["meta"]["rows_validated"] >= 1
    health = json.loads((qdir / "health.json").read_text())["validation_results"]
    assert health[0]["meta"]["rows_validated"] == cfg.sampler.num_chains * cfg.sampler.num_draws  # the draws


def test_run_gates_names_a_corrupt_block_and_a_missing_one(tiny_run, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    run, cfg = tiny_run
    uri = str(tmp_path / "run")
    shutil.copytree(run.uri, uri)
    path = Path(uri) / S.TRACES_DIR / S.block_name(1, 1, "parquet")
    table = pq.read_table(path)
    loss = table.column(S.LOSS).to_numpy().copy()
    loss[3 * cfg.sampler.draws_per_block + 2] = np.nan  # train sample 3, third draw of block 1
    pq.write_table(table.set_column(4, S.LOSS, pa_array(loss)), path)
    (Path(uri) / S.TRACES_DIR / S.block_name(0, 1, "parquet")).unlink()
    report = run_gates(uri, None, cfg, n_train=run.n_train, n_query=run.n_query, loss_bounds=(0.0, np.inf))
    assert not report.passed
    text = report.summary()
    d = cfg.sampler.draws_per_block + 2
    assert "FAILED trace_finite [expect_column_values_to_be_between]: NaN or infinite loss" in text
    assert f"chain=1 block=1 first_nonfinite=draw={d} split=train sample=3 loss=nan" in text
    assert "FAILED trace_complete" in text and "chain=0 num_blocks=1" in text
    # health is read for committed blocks only, so chain 0's missing block also shows there
    assert {r.gate for r in report.failed} == {"trace_finite", "trace_complete", "health_draws"}
    rows = run_gates(uri, None, cfg, n_train=run.n_train, n_query=run.n_query, loss_bounds=(0.0, np.inf),
                     trace_rows=True)
    assert {r.gate for r in rows.failed} == {"trace_finite", "trace_complete", "health_draws"}
    assert f"chain=1 draw={d} split=train sample=3 loss=nan" in rows.summary()
    assert "# Validation Results" in (Path(uri) / "quality" / "traces.md").read_text()
    # a suite with a failure is validated again in SUMMARY: the failed expectation's counts and rows are on record
    traces = json.loads((Path(uri) / "quality" / "traces.json").read_text())["validation_results"]
    failed = [r for v in traces for r in v["results"] if not r["success"]]
    assert failed and all(r["result"]["unexpected_count"] >= 1 and r["result"]["element_count"] >= 1
                          for r in failed if "unexpected_count" in r["result"])
    assert any("partial_unexpected_index_list" in r["result"] for r in failed)
    fixed = run_gates(uri, None, cfg.model_copy(update={"quality": QualityConfig(allow_warnings=True)}),
                      n_train=run.n_train, n_query=run.n_query, loss_bounds=(0.0, np.inf))
    assert fixed.passed and len(fixed.warnings) == len(report.failed)


def pa_array(values: np.ndarray):
    import pyarrow as pa

    return pa.array(values.astype(np.float32))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from run_fixtures import make_run

    run = make_run(tmp_path_factory.mktemp("quality") / "run", n_train=40, n_query=6, num_draws=20,
                   draws_per_block=10, train_epochs=20)
    return run, run.config

"""The Dask reduction: equal to the in-memory covariance, and invariant to blocks, chunks, tree shape
and chain order (float64 end to end)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from bif import schema as S
from bif.config import CovarianceConfig, SamplerConfig
from bif.examples import linear
from bif.tasks.covariance import compute_bif
from bif.moments import bif_in_memory
from bif.sampling.chain import SGLDChain
from bif.store.run import RunStore

N_TRAIN, N_QUERY, CHAINS, DRAWS = 23, 7, 3, 24


def _write_run(root, draws_per_block, storage_options=None):
    prob = linear.build(n=N_TRAIN, d=3, m=N_QUERY, seed=5)
    s = SamplerConfig(num_chains=CHAINS, num_draws=DRAWS, num_burnin_steps=5, steps_per_draw=2,
                      step_size=2e-3, gamma=5.0, batch_size=8, seed=11)
    store = RunStore(root, storage_options=storage_options or {}, loss_dtype="float64")
    train, query = [], []
    for c in range(CHAINS):
        blocks = list(SGLDChain(prob, s, chain=c).run(num_draws=DRAWS, draws_per_block=draws_per_block))
        for i, b in enumerate(blocks):
            store.write_block(b, block_index=i, ref_train_loss_mean=0.0)
        train.append(np.concatenate([b.train_losses for b in blocks]))
        query.append(np.concatenate([b.query_losses for b in blocks]))
    return store, np.stack(train), np.stack(query)


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    out = {}
    for dpb in (24, 5):  # one block per chain vs uneven chunks of draws
        root = str(tmp_path_factory.mktemp(f"dpb{dpb}"))
        out[dpb] = (root, *_write_run(root, dpb))
    return out


def _cov(train_block, query_block, *, split_every=8, pooling="stack", ddof=1, k=5, compress=False):
    return CovarianceConfig(train_block_size=train_block, query_block_size=query_block, split_every=split_every,
                            pooling=pooling, ddof=ddof, topk=k, compress=compress)


def _reduce(root, files, *, train_block=N_TRAIN, query_block=N_QUERY, split_every=8, pooling="stack", ddof=1, k=5,
            compress=False, **kw):
    cov = _cov(train_block, query_block, split_every=split_every, pooling=pooling, ddof=ddof, k=k, compress=compress)
    args = dict(n_train=N_TRAIN, n_query=N_QUERY, dtype="float64",
                leaf_draws=1)  # one file per leaf, so merges and tree shapes are exercised
    summary = compute_bif(RunStore(root), cov, files, **(args | kw))
    with xr.open_zarr(summary.bif_uri, consolidated=False) as ds:
        return ds.load(), summary


def test_matches_in_memory_covariance(run_dirs):
    root, store, train, query = run_dirs[5]
    ds, summary = _reduce(root, store.blocks())
    ref_bif, ref_corr = bif_in_memory(train, query)
    np.testing.assert_allclose(ds[S.BIF].values, ref_bif, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ds[S.BIF_CORR].values, ref_corr, rtol=1e-10, atol=1e-12)
    assert ds[S.BIF].dims == (S.TRAIN_DIM, S.QUERY_DIM)
    assert list(ds[S.TRAIN_DIM].values) == list(range(N_TRAIN))
    assert list(ds[S.QUERY_DIM].values) == list(range(N_QUERY))


@pytest.mark.parametrize("train_block,query_block,split_every,leaf_draws",
                         [(1, 1, 2, 1), (4, 3, 2, 10), (10, 7, 3, 1), (23, 2, 16, 1024), (6, 7, 2, 15)])
def test_block_sizes_and_tree_shape_do_not_change_result(run_dirs, train_block, query_block, split_every,
                                                         leaf_draws):
    root, store, train, query = run_dirs[5]
    ref, _ = _reduce(root, store.blocks())
    ds, summary = _reduce(root, store.blocks(), train_block=train_block, query_block=query_block,
                          split_every=split_every, leaf_draws=leaf_draws)
    np.testing.assert_allclose(ds[S.BIF].values, ref[S.BIF].values, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ds[S.BIF_CORR].values, ref[S.BIF_CORR].values, rtol=1e-10, atol=1e-12)
    assert summary.num_blocks == -(-N_TRAIN // train_block) * -(-N_QUERY // query_block)


def test_compression_does_not_change_values(run_dirs):
    root, store, *_ = run_dirs[5]
    plain, _ = _reduce(root, store.blocks())
    packed, _ = _reduce(root, store.blocks(), compress=True)
    np.testing.assert_array_equal(plain[S.BIF].values, packed[S.BIF].values)


def test_draw_chunking_and_chain_order_do_not_change_result(run_dirs):
    root_a, store_a, *_ = run_dirs[24]
    root_b, store_b, *_ = run_dirs[5]
    a, _ = _reduce(root_a, store_a.blocks())
    files = store_b.blocks()
    b, _ = _reduce(root_b, files[::-1])  # reversed chain and block order
    np.testing.assert_allclose(a[S.BIF].values, b[S.BIF].values, rtol=1e-10, atol=1e-14)


def test_chain_mean_pooling(run_dirs):
    root, store, train, query = run_dirs[5]
    ds, _ = _reduce(root, store.blocks(), pooling="chain_mean", train_block=6)
    ref_bif, ref_corr = bif_in_memory(train, query, pooling="chain_mean")
    np.testing.assert_allclose(ds[S.BIF].values, ref_bif, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ds[S.BIF_CORR].values, ref_corr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("query_block", [N_QUERY, 2])
def test_topk_is_global_over_blocks(run_dirs, query_block):
    root, store, train, query = run_dirs[5]
    ds, summary = _reduce(root, store.blocks(), train_block=4, query_block=query_block, k=5)
    bif = ds[S.BIF].values
    topk = summary.topk
    assert list(topk.columns) == list(S.TOPK_COLUMNS)
    # the table comes in its documented order (query, direction, rank), whatever order the blocks finished in
    ordered = topk.sort_values([S.QUERY, S.DIRECTION, S.RANK], ignore_index=True)
    pd.testing.assert_frame_equal(topk, ordered)
    assert len(topk) == N_QUERY * 2 * 5 and topk.index.equals(pd.RangeIndex(len(topk)))
    for q in range(N_QUERY):
        pos = topk[(topk[S.QUERY] == q) & (topk[S.DIRECTION] == "positive")].sort_values(S.RANK)
        neg = topk[(topk[S.QUERY] == q) & (topk[S.DIRECTION] == "negative")].sort_values(S.RANK)
        np.testing.assert_array_equal(pos[S.TRAIN].to_numpy(), np.argsort(-bif[:, q], kind="stable")[:5])
        np.testing.assert_array_equal(neg[S.TRAIN].to_numpy(), np.argsort(bif[:, q], kind="stable")[:5])
        np.testing.assert_allclose(pos[S.BIF_CORR].to_numpy(), ds[S.BIF_CORR].values[pos[S.TRAIN].to_numpy(), q])


def test_reduction_on_a_real_local_cluster_and_s3(s3_bucket, run_dirs):
    """Same numbers when the blocks run on a distributed LocalCluster and traces live on S3."""
    from distributed import Client, LocalCluster

    bucket, opts = s3_bucket
    root = f"s3://{bucket}/cov"
    store, train, query = _write_run(root, 6, storage_options=opts)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", processes=True) as cl, \
            Client(cl) as client:
        summary = compute_bif(store, _cov(5, 4, split_every=2, k=3), store.blocks(), n_train=N_TRAIN,
                              n_query=N_QUERY, dtype="float64", client=client, max_in_flight=3, verify=True)
    ds = xr.open_zarr(summary.bif_uri, storage_options=opts, consolidated=False).load()
    ref_bif, _ = bif_in_memory(train, query)
    np.testing.assert_allclose(ds[S.BIF].values, ref_bif, rtol=1e-10, atol=1e-14)
    assert isinstance(summary.topk, pd.DataFrame) and len(summary.topk) == N_QUERY * 2 * 3


@pytest.mark.parametrize("pooling", ["stack", "chain_mean"])
def test_constant_traces_give_zero_corr_and_flags(tmp_path, pooling):
    """Losses exactly 0.0 at every draw (saturated float32 cross-entropy): bif_corr 0, never NaN, and flagged."""
    from bif.sampling.chain import ChainState, DrawBlock

    rng = np.random.default_rng(4)
    chains, draws, n_train, n_query = 2, 12, 9, 4
    train = rng.gamma(2.0, 0.5, (chains, draws, n_train))
    query = rng.gamma(2.0, 0.5, (chains, draws, n_query))
    train[..., [0, 5]] = 0.0  # constant everywhere
    query[..., 1] = 0.0
    train[0, :, 7], train[1, :, 7] = 1.0, 2.0  # constant within each chain only: not constant when pooled
    store = RunStore(str(tmp_path), loss_dtype="float64")
    state = ChainState(step=0, num_recorded=0, params={}, precond=None, rng_cpu=np.zeros(1), rng_noise=np.zeros(1))
    for c in range(chains):
        for b in range(2):
            sl = slice(b * 6, b * 6 + 6)
            store.write_block(DrawBlock(chain=c, draw_start=sl.start, train_losses=train[c, sl],
                                        query_losses=query[c, sl], steps=np.arange(6), distance=np.ones(6),
                                        state=state), block_index=b, ref_train_loss_mean=1.0)
    summary = compute_bif(store, _cov(4, 3, pooling=pooling, k=2), store.blocks(), n_train=n_train,
                          n_query=n_query, dtype="float32", leaf_draws=1)
    with xr.open_zarr(summary.bif_uri, consolidated=False) as ds:
        ds = ds.load()
    want_train = np.isin(np.arange(n_train), [0, 5])
    np.testing.assert_array_equal(ds[S.TRAIN_CONSTANT].values, want_train)
    np.testing.assert_array_equal(ds[S.QUERY_CONSTANT].values, np.arange(n_query) == 1)
    assert summary.constant_counts() == {"train": {"count": 2, "total": 9, "share": 2 / 9},
                                         "query": {"count": 1, "total": 4, "share": 0.25}}
    corr = ds[S.BIF_CORR].values
    assert np.isfinite(corr).all() and np.isfinite(ds[S.BIF].values).all()
    assert (corr[[0, 5]] == 0).all() and (corr[:, 1] == 0).all() and not np.signbit(corr[[0, 5]]).any()
    assert (ds[S.BIF].values[[0, 5]] == 0).all()
    _, ref_corr = bif_in_memory(train, query, pooling=pooling)  # the in-memory path defines the same 0
    np.testing.assert_allclose(corr, ref_corr, rtol=1e-5, atol=1e-6)
    # top-k: with whole columns of ties, no train example is both positive and negative
    for q, g in summary.topk.groupby(S.QUERY):
        assert not set(g.loc[g[S.DIRECTION] == "positive", S.TRAIN]) & set(g.loc[g[S.DIRECTION] == "negative", S.TRAIN])
    col = summary.topk[summary.topk[S.QUERY] == 1]  # a constant query: all bif 0, ties broken by train id
    assert col.loc[col[S.DIRECTION] == "positive", S.TRAIN].tolist() == [0, 1]
    assert col.loc[col[S.DIRECTION] == "negative", S.TRAIN].tolist() == [8, 7]


def test_topk_lists_are_disjoint_when_n_train_is_below_2k(run_dirs):
    root, store, train, query = run_dirs[5]
    for k, (n_pos, n_neg) in ((5, (5, 5)), (12, (12, 11)), (40, (12, 11))):
        _, summary = _reduce(root, store.blocks(), k=k, train_block=6)
        bif, _ = bif_in_memory(train, query)
        for q, g in summary.topk.groupby(S.QUERY):
            pos = g.loc[g[S.DIRECTION] == "positive"].sort_values(S.RANK)[S.TRAIN].tolist()
            neg = g.loc[g[S.DIRECTION] == "negative"].sort_values(S.RANK)[S.TRAIN].tolist()
            assert (len(pos), len(neg)) == (n_pos, n_neg)
            assert not set(pos) & set(neg)
            order = np.argsort(-bif[:, q], kind="stable").tolist()
            assert pos == order[:n_pos] and neg == order[::-1][:n_neg]


# --- float32 GEMMs (issue 11): the error against float64, stated and bounded ------------------------------------
#: Largest error of the float32-GEMM path, in units of sqrt(m2_x m2_y) (i.e. of a correlation); measured 3-4e-7
#: for 50-4,000 draws, about the float32 output's own rounding.
F32_CORR_TOL = 2e-6


@pytest.mark.parametrize("draws", [50, 400, 4000])
def test_float32_gemm_is_within_tolerance_of_float64(draws):
    """Known low-rank data (losses ~5 and ~2 with shared factors): the float32 GEMM's comoment and correlation
    stay within F32_CORR_TOL of float64; means and m2 are float64 in both."""
    from bif.moments import correlation, from_draws

    rng = np.random.default_rng(draws)
    z = rng.normal(size=(draws, 3))
    x = (5.0 + 0.3 * z @ rng.normal(size=(3, 300)) + 0.05 * rng.normal(size=(draws, 300))).astype(np.float32)
    y = (2.0 + 0.3 * z @ rng.normal(size=(3, 40)) + 0.2 * rng.normal(size=(draws, 40))).astype(np.float32)
    m64, m32 = from_draws(x, y), from_draws(x, y, dtype="float32")
    assert m32.comoment.dtype == np.float32 and m32.m2_x.dtype == np.float64
    np.testing.assert_array_equal(m32.m2_x, m64.m2_x)
    scale = np.sqrt(np.outer(m64.m2_x, m64.m2_y))
    err = np.abs(m32.comoment - m64.comoment) / scale
    assert err.max() < F32_CORR_TOL, err.max()
    assert np.abs(correlation(m32) - correlation(m64)).max() < F32_CORR_TOL
    assert np.abs(correlation(m64)).max() > 0.9  # strongly correlated pairs are in the test


def test_float32_output_uses_float32_gemms_within_tolerance(run_dirs):
    """The pipeline's float32 output: bif / bif_corr within F32_CORR_TOL (x the pair's scale) of float64, the
    top-k identical, and block sizes change it only by that rounding."""
    root, store, train, query = run_dirs[5]
    ref_bif, ref_corr = bif_in_memory(train, query)
    x, y = train.reshape(-1, N_TRAIN), query.reshape(-1, N_QUERY)
    scale = np.outer(x.std(0, ddof=1), y.std(0, ddof=1))  # sqrt(var_x var_y)
    outs = []
    for tb, qb in ((N_TRAIN, N_QUERY), (4, 3)):
        ds, summary = _reduce(root, store.blocks(), train_block=tb, query_block=qb, dtype="float32")
        assert ds[S.BIF].dtype == np.float32
        assert np.abs(ds[S.BIF].values - ref_bif).max() <= F32_CORR_TOL * scale.max()
        assert np.all(np.abs(ds[S.BIF].values - ref_bif) <= F32_CORR_TOL * scale + 1e-7 * np.abs(ref_bif))
        assert np.abs(ds[S.BIF_CORR].values - ref_corr).max() < F32_CORR_TOL
        outs.append((ds, summary))
    (a, sa), (b, sb) = outs
    assert np.abs(a[S.BIF_CORR].values - b[S.BIF_CORR].values).max() < F32_CORR_TOL
    pd.testing.assert_frame_equal(sa.topk[[S.QUERY, S.DIRECTION, S.RANK, S.TRAIN]],
                                  sb.topk[[S.QUERY, S.DIRECTION, S.RANK, S.TRAIN]])


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_verify_names_a_damaged_file_during_the_reduction(tmp_path, damage):
    """verify=True checks every file's sha256 beside the reduction (no separate pass): a flipped byte, or a
    truncated file whose read fails first, is a StorageError naming the file."""
    from bif.errors import StorageError

    root = str(tmp_path / "run")
    store, *_ = _write_run(root, 8)
    files = store.blocks()
    _reduce(root, files, verify=True)  # intact
    path = tmp_path / "run" / "traces" / "chain-1" / "block-00002.parquet"
    raw = path.read_bytes()
    path.write_bytes(raw[:200] if damage == "truncated" else raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0xFF])
                     + raw[len(raw) // 2 + 1:])
    with pytest.raises(StorageError, match=r"trace block 2 of chain 1 is damaged: .*block-00002\.parquet"):
        _reduce(root, files, verify=True)


@pytest.mark.parametrize("args, size", [((20_000, 4096, 1, 2), 3334), ((100_000, 4096, 1, 2), 3847),
                                        ((40, 16, 10, 2), 16), ((40, 16, 1, 2), 10), ((23, 10, 1, 2), 6),
                                        ((1797, 4096, 1, 2), 899), ((5, 16, 1, 1), 5), ((9, 2, 1, 4), 2),
                                        ((1, 16, 1, 2), 1)])
def test_balanced_train_block(args, size):
    """At most the configured size; blocks x query blocks a multiple of the slots where that is possible."""
    from bif.tasks.covariance import balanced_train_block

    n_train, block, query_blocks, slots = args
    got = balanced_train_block(*args)
    assert got == size and 1 <= got <= block
    blocks = -(-n_train // got)
    assert (blocks * query_blocks) % slots == 0 or got == min(block, n_train)


def test_cluster_reduction_balances_blocks_and_names_a_damaged_file(tmp_path, dask_address):
    """On a cluster of 2 workers, 23 train samples in blocks of at most 10 run as 4 blocks of 6 (3 would leave a
    worker idle in the second round): the same values and top-k as one block in memory, bif.zarr chunked (6, 7);
    the sha256 checks, started before bif.zarr is created, still name a damaged file."""
    from distributed import Client

    from bif.errors import StorageError

    root = str(tmp_path / "run")
    store, train, query = _write_run(root, 8)
    files = store.blocks()
    ref, ref_summary = _reduce(root, files)
    with Client(dask_address) as client:
        ds, summary = _reduce(root, files, train_block=10, client=client, verify=True, leaf_draws=1024)
        assert summary.num_blocks == 4
        with xr.open_zarr(summary.bif_uri, consolidated=False) as lazy:
            assert lazy[S.BIF].encoding["chunks"] == (6, N_QUERY)
        np.testing.assert_allclose(ds[S.BIF].values, ref[S.BIF].values, rtol=1e-10, atol=1e-14)
        pd.testing.assert_frame_equal(summary.topk, ref_summary.topk)
        path = tmp_path / "run" / "traces" / "chain-2" / "block-00001.parquet"
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0xFF]) + raw[len(raw) // 2 + 1:])
        with pytest.raises(StorageError, match=r"trace block 1 of chain 2 is damaged"):
            _reduce(root, files, train_block=10, client=client, verify=True, leaf_draws=1024)


@pytest.mark.parametrize("n, count", [(20, 4), (7, 3), (2, 4), (1, 1), (5, 1), (0, 3), (9, 0)])
def test_even_batches_cover_the_items_in_order(n, count):
    """The sha256 checks and the gates' batched map cut their items into at most ``count`` runs, none empty,
    sizes at most one apart, whose concatenation is the items in order."""
    from bif.tasks.covariance import even_batches

    items = [f"f{i}" for i in range(n)]
    batches = even_batches(items, count)
    assert [x for b in batches for x in b] == items
    assert len(batches) == (min(max(count, 1), n) if n else 0)
    assert all(batches) and (not batches or max(map(len, batches)) - min(map(len, batches)) <= 1)


def test_batched_map_on_a_cluster_keeps_the_order_in_fewer_tasks(dask_address):
    """steps._mapper(batched=True), the gates' map over trace files: the same results in the same order as one
    task per item, in about two tasks per worker (2 workers: 4 tasks for 11 items)."""
    from distributed import Client, get_task_stream

    from bif.tasks.steps import _mapper

    xs = list(range(11))
    with Client(dask_address) as client:
        for batched, tasks in ((True, 4), (False, 11)):
            with get_task_stream(client=client) as stream:
                got = _mapper(client, batched=batched)(_square_and_pid, xs)
            assert [r[0] for r in got] == [x * x for x in xs]
            assert len({r[1] for r in got}) <= 2  # two worker processes
            assert len(stream.data) == tasks


def _square_and_pid(x: int) -> tuple[int, int]:
    import os

    return x * x, os.getpid()


@pytest.mark.slow  # ~1-3 min: writes traces, starts a LocalCluster, runs the limit benchmark at its quick size
def test_scale_benchmark_runs_and_reports_its_rows(tmp_path):
    """`python -m benchmarks.scale` (README, Benchmarks): its quick sizes run end to end and give the table rows."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "scale.json"
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--quick", "--only", "limit", "--repeats", "2",
                          "--out", str(out)], cwd=repo, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in ("limit_100k", "limit_20k"):
        m = figures[key]
        assert m["limit_s"] == max(m["gemm64_s"], m["zarr_write_s"], m["trace_read_s"]) > 0
        assert len(m["stage_runs_s"]) == 2 and m["stage_s"] == pytest.approx(float(np.median(m["stage_runs_s"])))
        assert m["ratio_vs_limit"] == pytest.approx(m["stage_s"] / m["limit_s"])
        assert len(m["paired_runs_s"]) == 2 and min(m["paired_runs_s"]) > 0  # a GEMM before each run
        assert m["ratio_vs_gemm64_paired"] == pytest.approx(
            float(np.median([w / g for w, g in zip(m["stage_runs_s"], m["paired_runs_s"])])))
        parts = m["block_parts_ms"]
        assert all(parts[k] > 0 for k in ("read", "moments", "outputs", "write", "topk"))
    table = out.with_suffix(".md").read_text()
    assert "covariance stage vs one float64 GEMM" in table and "each run against a float64 GEMM" in table
    from benchmarks.machine import describe_parts  # the machine's fresh memory before each part (benchmarks/machine.py)

    machine = figures["machine"]
    assert list(machine["memory_before"]) == ["limit"] and machine["memory_before"]["limit"] == machine["memory"]
    assert machine["memory"]["idle_s"] == 2.5 and machine["memory"]["fill_hot_ms"] > 0
    assert f"| machine: fresh memory (not a target) | {describe_parts(machine)} | - | yes |" in table

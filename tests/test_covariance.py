"""The Dask reduction: equal to the in-memory covariance, and invariant to blocks, chunks, tree shape
and chain order (float64 end to end)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from bif import schema as S
from bif.config import SamplerConfig
from bif.examples import linear
from tasks.covariance import compute_bif
from tasks.moments import bif_in_memory
from tasks.sampler import SGLDChain
from tasks.traces import TraceStore

N_TRAIN, N_QUERY, CHAINS, DRAWS = 23, 7, 3, 24


def _write_run(root, draws_per_block, storage_options=None):
    prob = linear.build(n=N_TRAIN, d=3, m=N_QUERY, seed=5)
    s = SamplerConfig(num_chains=CHAINS, num_draws=DRAWS, num_burnin_steps=5, steps_per_draw=2,
                      step_size=2e-3, gamma=5.0, batch_size=8, seed=11)
    store = TraceStore(root, storage_options=storage_options or {}, loss_dtype="float64")
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


def _reduce(root, files, **kw):
    args = dict(storage_options={}, n_train=N_TRAIN, n_query=N_QUERY, train_block=N_TRAIN,
                query_block=N_QUERY, split_every=8, pooling="stack", ddof=1, k=5, dtype="float64",
                leaf_draws=1)  # one file per leaf, so merges and tree shapes are exercised
    summary = compute_bif(root, files, **(args | kw))
    with xr.open_zarr(summary.bif_uri, consolidated=False) as ds:
        return ds.load(), summary


def test_matches_in_memory_covariance(run_dirs):
    root, store, train, query = run_dirs[5]
    ds, summary = _reduce(root, store.block_files())
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
    ref, _ = _reduce(root, store.block_files())
    ds, summary = _reduce(root, store.block_files(), train_block=train_block, query_block=query_block,
                          split_every=split_every, leaf_draws=leaf_draws)
    np.testing.assert_allclose(ds[S.BIF].values, ref[S.BIF].values, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ds[S.BIF_CORR].values, ref[S.BIF_CORR].values, rtol=1e-10, atol=1e-12)
    assert summary.num_blocks == -(-N_TRAIN // train_block) * -(-N_QUERY // query_block)


def test_compression_does_not_change_values(run_dirs):
    root, store, *_ = run_dirs[5]
    plain, _ = _reduce(root, store.block_files())
    packed, _ = _reduce(root, store.block_files(), compress=True)
    np.testing.assert_array_equal(plain[S.BIF].values, packed[S.BIF].values)


def test_draw_chunking_and_chain_order_do_not_change_result(run_dirs):
    root_a, store_a, *_ = run_dirs[24]
    root_b, store_b, *_ = run_dirs[5]
    a, _ = _reduce(root_a, store_a.block_files())
    files = store_b.block_files()
    b, _ = _reduce(root_b, files[::-1])  # reversed chain and block order
    np.testing.assert_allclose(a[S.BIF].values, b[S.BIF].values, rtol=1e-10, atol=1e-14)


def test_chain_mean_pooling(run_dirs):
    root, store, train, query = run_dirs[5]
    ds, _ = _reduce(root, store.block_files(), pooling="chain_mean", train_block=6)
    ref_bif, ref_corr = bif_in_memory(train, query, pooling="chain_mean")
    np.testing.assert_allclose(ds[S.BIF].values, ref_bif, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ds[S.BIF_CORR].values, ref_corr, rtol=1e-10, atol=1e-12)


def test_topk_is_global_over_blocks(run_dirs):
    root, store, train, query = run_dirs[5]
    ds, summary = _reduce(root, store.block_files(), train_block=4, k=5)
    bif = ds[S.BIF].values
    topk = summary.topk
    assert list(topk.columns) == list(S.TOPK_COLUMNS)
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
        summary = compute_bif(root, store.block_files(), storage_options=opts, n_train=N_TRAIN, n_query=N_QUERY,
                              train_block=5, query_block=4, split_every=2, k=3, dtype="float64", client=client,
                              max_in_flight=3)
    ds = xr.open_zarr(summary.bif_uri, storage_options=opts, consolidated=False).load()
    ref_bif, _ = bif_in_memory(train, query)
    np.testing.assert_allclose(ds[S.BIF].values, ref_bif, rtol=1e-10, atol=1e-14)
    assert isinstance(summary.topk, pd.DataFrame) and len(summary.topk) == N_QUERY * 2 * 3

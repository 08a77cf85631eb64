"""RunStore round trips on local disk and a real S3 API (moto): JSON, manifest, committed blocks, tables, bif.zarr."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from bif import schema as S
from bif.errors import IncompleteRunError
from bif.sampling.chain import ChainState, DrawBlock
from bif.store import BlockRef, RunStore
from bif.store.tables import Folder, read_table, write_table


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return RunStore(str(tmp_path / "run"), loss_dtype="float64")
    bucket, opts = request.getfixturevalue("s3_bucket")
    return RunStore(f"s3://{bucket}/runs/r1", opts, loss_dtype="float64")


def _block(chain: int, index: int, *, draws: int = 3, n_train: int = 5, n_query: int = 2) -> DrawBlock:
    rng = np.random.default_rng([chain, index])
    state = ChainState(step=index, num_recorded=(index + 1) * draws, params={}, precond=None,
                       rng_cpu=np.zeros(1), rng_noise=np.zeros(1))
    return DrawBlock(chain=chain, draw_start=index * draws, train_losses=rng.gamma(2.0, 0.5, (draws, n_train)),
                     query_losses=rng.gamma(2.0, 0.5, (draws, n_query)), steps=np.arange(draws),
                     distance=np.ones(draws), state=state)


def test_json_round_trip_is_strict(store):
    assert store.read_json("missing.json") is None
    store.write_json("x.json", {"bounds": (0.0, math.inf), "mcse": float("nan"), "n": np.int64(3)})
    assert store.read_json("x.json") == {"bounds": [0.0, None], "mcse": None, "n": 3}
    assert b"NaN" not in store.read_bytes("x.json") and b"Infinity" not in store.read_bytes("x.json")
    store.write_config({"config_hash": "abc", "config": {"problem": "p:f"}})
    assert store.read_config() == {"config_hash": "abc", "config": {"problem": "p:f"}}


def test_manifest_status_transitions(store):
    assert store.manifest() is None
    with pytest.raises(IncompleteRunError, match="has no manifest.json"):
        store.require_complete()
    store.update_manifest(status=S.STATUS_RUNNING, n_train=5)
    with pytest.raises(IncompleteRunError, match="status 'running'"):
        store.require_complete()
    store.update_manifest(status=S.STATUS_FAILED, error="boom")
    with pytest.raises(IncompleteRunError, match="status 'failed'.*boom"):
        store.require_complete()
    store.update_manifest(status=S.STATUS_COMPLETE, error=None)
    manifest = store.require_complete()
    assert manifest["status"] == S.STATUS_COMPLETE and manifest["n_train"] == 5 and "updated_at" in manifest
    assert store.manifest() == manifest


def test_block_listing_returns_contiguous_committed_blockrefs(store):
    for chain, index in ((0, 0), (0, 1), (0, 3), (1, 0), (2, 1)):  # chain 0 lacks block 2, chain 2 lacks block 0
        store.write_block(_block(chain, index), block_index=index, ref_train_loss_mean=1.0)
    refs = store.blocks()
    assert all(isinstance(r, BlockRef) for r in refs)
    assert [(r.chain, r.block) for r in refs] == [(0, 0), (0, 1), (1, 0)]
    assert refs[1].path.endswith(S.block_name(0, 1, "parquet"))
    assert [(r.chain, r.block) for r in store.blocks(num_chains=1)] == [(0, 0)] + [(0, 1)]
    assert store.committed_blocks(0) == [0, 1] and store.committed_blocks(2) == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        refs[0].block = 7
    np.testing.assert_array_equal(store.read_losses(refs[2], split=S.TRAIN, start=1, stop=4),
                                  _block(1, 0).train_losses[:, 1:4])
    health = store.read_health(refs)
    assert list(health[S.CHAIN]) == [0] * 3 + [0] * 3 + [1] * 3 and list(health[S.DRAW][:6]) == list(range(6))
    store.verify_blocks(refs)  # intact


def test_tables_and_report_round_trip(store):
    assert store.read_topk() is None and store.read_diagnostics() is None
    topk = pd.DataFrame({S.QUERY: [0, 0], S.DIRECTION: ["positive", "negative"], S.RANK: [0, 0],
                         S.TRAIN: [3, 1], S.BIF: [0.5, -0.25], S.BIF_CORR: [0.9, -0.1]})
    store.write_topk(topk)
    pd.testing.assert_frame_equal(store.read_topk(), topk)
    store.write_reference(np.array([1.0, 2.0]), np.array([3.0]))
    ref = store.read_reference()
    assert list(ref[S.LOSS]) == [1.0, 2.0, 3.0] and list(ref[S.SPLIT].astype(str)) == ["train", "train", "query"]
    assert store.write_report("<html></html>") == store.url(S.REPORT_FILE)
    assert store.read_bytes(S.REPORT_FILE) == b"<html></html>"
    store.write_quality_json(S.QUALITY_SUMMARY_FILE, {"passed": True})
    assert store.read_quality_summary() == {"passed": True}
    store.write_log("run.log", "hello")
    assert store.read_bytes("logs/run.log") == b"hello"


def test_bif_zarr_create_region_write_and_open(store):
    assert store.open_bif() is None
    store.create_bif(n_train=5, n_query=3, train_block=2, query_block=2, dtype="float64", attrs={"pooling": "stack"})
    array = store.bif_array()
    assert array.dtype == np.float64
    bif = np.arange(15, dtype=np.float64).reshape(5, 3)
    for t0, t1 in ((0, 2), (2, 4), (4, 5)):
        for q0, q1 in ((0, 2), (2, 3)):
            array.write_region((t0, t1), (q0, q1), bif[t0:t1, q0:q1], -bif[t0:t1, q0:q1] / 15)
    array.write_constant_flags(np.array([True, False, False, False, True]), np.array([False, True, False]))
    ds = store.open_bif().load()
    np.testing.assert_array_equal(ds[S.BIF].values, bif)
    np.testing.assert_array_equal(ds[S.BIF_CORR].values, -bif / 15)
    assert list(ds[S.TRAIN_CONSTANT].values) == [True, False, False, False, True]
    assert list(ds[S.QUERY_CONSTANT].values) == [False, True, False]
    assert ds.attrs["pooling"] == "stack" and ds[S.BIF].dims == (S.TRAIN_DIM, S.QUERY_DIM)


def test_a_small_bif_zarr_is_read_in_process_and_a_large_one_through_dask(store, monkeypatch):
    """open_bif: up to IN_PROCESS_BYTES per variable no Dask graph (each read goes through zarr in the caller: a
    scheduler round trip per .values cost more than the read); above it, or with dask=True, Dask-backed. The
    values are the same either way."""
    import dask.array as da

    import bif.store.run as run_mod

    store.create_bif(n_train=6, n_query=4, train_block=4, query_block=4, dtype="float32", attrs={})
    bif = np.arange(24, dtype=np.float32).reshape(6, 4)
    store.bif_array().write_region((0, 6), (0, 4), bif, bif / 24)
    small = store.open_bif()
    assert not isinstance(small[S.BIF].variable._data, da.Array)
    np.testing.assert_array_equal(small[S.BIF].isel({S.TRAIN_DIM: [5, 0, 3]}).values, bif[[5, 0, 3]])
    forced = store.open_bif(dask=True)
    assert isinstance(forced[S.BIF].data, da.Array)
    monkeypatch.setattr(run_mod, "IN_PROCESS_BYTES", 24 * 4 - 1)  # bif is 96 bytes: now "large"
    large = store.open_bif()
    assert isinstance(large[S.BIF].data, da.Array) and large[S.BIF].data.chunks == ((4, 2), (4,))
    assert not isinstance(store.open_bif(dask=False)[S.BIF].variable._data, da.Array)
    np.testing.assert_array_equal(large[S.BIF].values, bif)


@pytest.mark.parametrize("dtype, compress, in_two_steps", [("float32", False, False), ("float64", True, False),
                                                          ("float32", False, True)])
def test_bif_zarr_is_written_as_xarray_writes_it(tmp_path, dtype, compress, in_two_steps):
    """create_bif writes bif.zarr with zarr directly: node for node the metadata xarray's to_zarr(compute=False)
    writes for the same Dataset (dims, fill values, codecs, attributes), and coordinates with the same bytes.
    ``in_two_steps``: the covariance's way, the output arrays first (``coordinates=False``), the rest while the
    blocks run (``create_coordinates``)."""
    import json

    import dask.array as da
    import xarray as xr

    from bif.store import run as R

    n_train, n_query, attrs = 7, 3, {"pooling": "stack", "draws": [1, 2]}
    array = RunStore(str(tmp_path / "ours")).create_bif(n_train=n_train, n_query=n_query, train_block=3,
                                                         query_block=2, dtype=dtype, attrs=attrs, compress=compress,
                                                         coordinates=not in_two_steps)
    if in_two_steps:
        assert sorted(p.parent.name for p in (tmp_path / "ours" / S.BIF_ZARR).rglob("zarr.json")) == \
            sorted([S.BIF_ZARR, S.BIF, S.BIF_CORR])  # what the blocks write into, nothing else yet
        array.create_coordinates(n_train, n_query)
    empty = da.full((n_train, n_query), np.nan, dtype=dtype, chunks=(3, 2))
    ds = xr.Dataset({S.BIF: ((S.TRAIN_DIM, S.QUERY_DIM), empty), S.BIF_CORR: ((S.TRAIN_DIM, S.QUERY_DIM), empty)},
                    coords={S.TRAIN_DIM: np.arange(n_train), S.QUERY_DIM: np.arange(n_query)}, attrs=attrs)
    ds[S.BIF].attrs["description"] = R.BIF_DESCRIPTION
    ds[S.BIF_CORR].attrs["description"] = R.BIF_CORR_DESCRIPTION
    for dim, n in ((S.TRAIN_DIM, n_train), (S.QUERY_DIM, n_query)):
        ds[S.constant_var(dim)] = ((dim,), da.zeros(n, dtype=bool, chunks=n))
        ds[S.constant_var(dim)].attrs["description"] = R.constant_description(dim)
    encoding = None if compress else {S.BIF: {"compressors": None}, S.BIF_CORR: {"compressors": None}}
    ds.to_zarr(str(tmp_path / "xr" / S.BIF_ZARR), mode="w", compute=False, consolidated=False, zarr_format=3,
               encoding=encoding)
    ours, theirs = tmp_path / "ours" / S.BIF_ZARR, tmp_path / "xr" / S.BIF_ZARR
    files = sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file())
    assert len(files) == 9  # group + 6 arrays' metadata + the two coordinates' chunks
    for f in files:
        if f.name == "zarr.json":
            assert json.loads((ours / f).read_text()) == json.loads((theirs / f).read_text()), f
        else:
            assert (ours / f).read_bytes() == (theirs / f).read_bytes(), f
    xr.testing.assert_identical(xr.open_zarr(ours, consolidated=False).load(),
                                xr.open_zarr(theirs, consolidated=False).load())


def test_run_store_is_picklable_for_dask_tasks(store):
    import pickle

    again = pickle.loads(pickle.dumps(store))
    assert again == store and again.storage_options == store.storage_options


def test_an_open_bif_array_travels_to_tasks_and_writes_there(store):
    """compute_bif opens bif.zarr once and pickles the BifArray into every block's task (a few KB: metadata and
    the store, no data); a copy writes into the same arrays, locally and on S3."""
    import pickle

    array = store.create_bif(n_train=4, n_query=3, train_block=2, query_block=3, dtype="float32", attrs={})
    raw = pickle.dumps(array)
    assert len(raw) < 16_000
    copy = pickle.loads(raw)
    assert copy.dtype == np.float32
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    copy.write_region((0, 2), (0, 3), values[:2], -values[:2])
    array.write_region((2, 4), (0, 3), values[2:], -values[2:])
    ds = store.open_bif().load()
    np.testing.assert_array_equal(ds[S.BIF].values, values)
    np.testing.assert_array_equal(ds[S.BIF_CORR].values, -values)


def test_tables_outside_a_run(tmp_path):
    df = pd.DataFrame({"a": np.arange(3, dtype=np.int64), "b": [0.5, 1.5, 2.5]})
    write_table(str(tmp_path), str(tmp_path / "t.parquet"), df)
    pd.testing.assert_frame_equal(read_table(str(tmp_path), str(tmp_path / "t.parquet")), df)
    folder = Folder(str(tmp_path / "lds"))
    folder.write_table("x/y.parquet", df)
    assert folder.exists("x/y.parquet") and not folder.exists("x/z.parquet")
    pd.testing.assert_frame_equal(folder.read_table("x/y.parquet", columns=["b"]), df[["b"]])
    folder.write_json("s.json", {"v": float("inf")})
    assert Folder(folder.url("s.json")).read_json() == {"v": None}

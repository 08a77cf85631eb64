"""Degenerate data is normal data: constant loss traces, tiny train sets, one chain, few draws,
frozen parameters, a query set equal to the train set, topk above n_train.

Every case runs the real flow (Prefect + the shared Dask LocalCluster) and gets a result or a
clear BifError; none may end in a traceback or a NaN in the outputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from bif import schema as S
from bif.config import build_config
from bif.store.manifest import read_manifest
from bif.flows.attribution import run_attribution

pytestmark = pytest.mark.e2e

FAST = {"num_chains": 2, "num_draws": 40, "num_burnin_steps": 10, "steps_per_draw": 2, "step_size": 1e-3,
        "gamma": 100.0, "nbeta": 20.0, "batch_size": 24, "seed": 1, "draws_per_block": 20}


def _cfg(output: Path, address: str, problem: str, problem_args: dict | None = None, **sections) -> object:
    data = {"problem": problem, "problem_args": problem_args or {}, "output": str(output),
            "sampler": FAST | sections.pop("sampler", {}),
            "covariance": {"train_block_size": 8, "query_block_size": 4, "topk": 3} | sections.pop("covariance", {}),
            "quality": {"mcse_num_batches": 4} | sections.pop("quality", {}),
            "compute": {"address": address}}
    return build_config(data | sections)


def _results(out: Path) -> xr.Dataset:
    return xr.open_zarr(out / S.BIF_ZARR, consolidated=False).load()


def _assert_topk_disjoint(out: Path, n_train: int, k: int) -> pd.DataFrame:
    """No train example is both positive and negative for a query; each list has its documented length."""
    topk = pd.read_parquet(out / S.TOPK_FILE)
    for q, g in topk.groupby(S.QUERY):
        pos = g.loc[g[S.DIRECTION] == "positive", S.TRAIN].tolist()
        neg = g.loc[g[S.DIRECTION] == "negative", S.TRAIN].tolist()
        assert not set(pos) & set(neg), (q, pos, neg)
        assert len(pos) == min(k, -(-n_train // 2)) and len(neg) == min(k, n_train // 2), (q, pos, neg)
    return topk


# --- constant loss traces -----------------------------------------------------------------------
def test_saturated_losses_complete_with_zero_corr_mask_counts_and_warning(tmp_path, dask_address):
    """A confident float32 classifier: 16 of 24 train and 5 of 8 query losses are exactly 0 at every draw."""
    from bif.quality.run import run_gates

    out = tmp_path / "sat"
    cfg = _cfg(out, dask_address, "bif_test_problems:saturating")
    manifest = run_attribution(cfg, show_progress=False)
    assert manifest["status"] == S.STATUS_COMPLETE

    # which traces are constant, from the stored traces themselves
    traces = pd.read_parquet(out / S.TRACES_DIR)
    spread = traces.groupby([S.SPLIT, S.SAMPLE], observed=True)[S.LOSS].agg(lambda v: v.max() - v.min())
    const_train = spread.loc[S.TRAIN].to_numpy() == 0
    const_query = spread.loc[S.QUERY].to_numpy() == 0
    # exactly the far-from-boundary samples of the problem
    assert np.flatnonzero(const_train).tolist() == list(range(16))
    assert np.flatnonzero(const_query).tolist() == list(range(5))

    ds = _results(out)
    corr, bif = ds[S.BIF_CORR].values, ds[S.BIF].values
    assert np.isfinite(corr).all() and np.isfinite(bif).all()
    assert ds[S.TRAIN_CONSTANT].dtype == bool and ds[S.QUERY_CONSTANT].dtype == bool
    np.testing.assert_array_equal(ds[S.TRAIN_CONSTANT].values, const_train)
    np.testing.assert_array_equal(ds[S.QUERY_CONSTANT].values, const_query)
    pair_const = const_train[:, None] | const_query[None, :]
    assert (corr[pair_const] == 0).all() and (bif[pair_const] == 0).all()
    assert not np.signbit(corr[pair_const]).any()  # +0.0, not -0.0
    assert (np.abs(corr[~pair_const]) > 0).all() and (np.abs(corr) <= 1).all()

    # counts in the manifest: from the gates (all samples) and from the diagnostics
    want = {S.TRAIN: {"count": 16, "total": 24, "share": 16 / 24}, S.QUERY: {"count": 5, "total": 8, "share": 5 / 8}}
    assert manifest["quality"]["constant_traces"] == want
    assert manifest["diagnostics"]["constant_traces"] == want
    assert json.loads((out / S.MANIFEST_FILE).read_text())["quality"]["constant_traces"] == want
    # both shares pass the default limit 0.5: the traces_constant gate warns, the run is still complete
    warned = [w for w in manifest["quality"]["warnings"] if w["gate"] == "traces_constant"]
    assert len(warned) == 1 and warned[0]["unexpected_count"] == 2, manifest["quality"]
    assert "split=train num_constant=16 num_samples=24" in warned[0]["detail"]
    assert not manifest["quality"]["failed"]

    # diagnostics: constant traces flagged, their R-hat / ESS NaN; the others defined
    diag = pd.read_parquet(out / S.DIAGNOSTICS_FILE)
    np.testing.assert_array_equal(diag[S.CONSTANT].to_numpy(), np.r_[const_query, const_train]
                                  if diag[S.SPLIT].iloc[0] == S.QUERY else np.r_[const_train, const_query])
    c = diag[S.CONSTANT].to_numpy()
    assert diag.loc[c, [S.RHAT, S.ESS_BULK, S.ESS_TAIL]].isna().all().all()
    assert np.isfinite(diag.loc[~c, [S.RHAT, S.ESS_BULK, S.ESS_TAIL]].to_numpy()).all()
    assert manifest["diagnostics"]["num_rhat_nan"] == 0
    mcse = manifest["diagnostics"]["bif_mcse"]
    assert mcse["num_pairs"] == 8 * 3 and mcse["q05"] > 0  # only the 8 x 3 pairs of varying traces

    # report.html names the counts
    report = (out / S.REPORT_FILE).read_text()
    assert "Constant loss traces: train 16 of 24 (66.7%), query 5 of 8 (62.5%)" in report
    assert "21 constant traces without R-hat / ESS" in report

    _assert_topk_disjoint(out, 24, 3)

    # the same run under a higher limit: no warning; with severity error: a failed gate
    def gates(**quality):
        return run_gates(str(out), None, _cfg(out, dask_address, "bif_test_problems:saturating", quality=quality),
                         n_train=24, n_query=8, loss_bounds=(0.0, np.inf))

    assert not gates(max_constant_share=0.7).warnings
    strict = gates(max_constant_share=0.63, severity={"traces_constant": "error"})
    assert [(r.gate, r.unexpected_count) for r in strict.failed] == [("traces_constant", 1)]  # train only


def test_constant_query_column_keeps_topk_disjoint():
    """A whole bif column of ties (a constant query trace): positive and negative still share no example."""
    from bif.tasks.covariance import BlockResult, _topk, merge_topk

    bif = np.zeros((10, 2))
    bif[:, 1] = [3, 1, 1, 1, 0, 0, 0, -1, -1, -5]
    pos = _topk(bif, bif, 0, 4, largest=True)
    neg = _topk(bif, bif, 0, 4, largest=False)
    assert pos[0][:, 0].tolist() == [0, 1, 2, 3] and neg[0][:, 0].tolist() == [9, 8, 7, 6]
    assert pos[0][:, 1].tolist() == [0, 1, 2, 3] and neg[0][:, 1].tolist() == [9, 8, 7, 6]
    # split into two blocks of train rows, merged globally: same answer
    halves = [BlockResult(t0, 0, *_topk(bif[t0:t0 + 5], bif[t0:t0 + 5], t0, 4, True, ids=np.arange(t0, t0 + 5)),
                          *_topk(bif[t0:t0 + 5], bif[t0:t0 + 5], t0, 4, False, ids=np.arange(t0, t0 + 5)))
              for t0 in (0, 5)]
    topk = merge_topk(halves, n_query=2, k=4, n_train=10)
    for q in (0, 1):
        g = topk[topk[S.QUERY] == q]
        assert g.loc[g[S.DIRECTION] == "positive", S.TRAIN].tolist() == [0, 1, 2, 3]
        assert g.loc[g[S.DIRECTION] == "negative", S.TRAIN].tolist() == [9, 8, 7, 6]


@pytest.mark.parametrize("values", ["distinct", "half_steps", "integers_and_a_zero_column", "nan_in_a_column"])
def test_topk_equals_a_full_sort(values):
    """The per-query top-k (its fast path for untied values and its path for ties and NaN) equals a full lexsort:
    bif descending, ties to the smaller train id, for every k from 1 to past the number of rows."""
    from bif.tasks.covariance import _topk

    rng = np.random.default_rng(7)
    for trial in range(60):
        a, b = int(rng.integers(2, 40)), int(rng.integers(1, 6))
        v = rng.standard_normal((a, b)).astype(np.float32)
        if values == "half_steps":
            v = np.round(v * 2) / 2
        elif values == "integers_and_a_zero_column":
            v = np.round(v)
            v[:, 0] = 0.0
        elif values == "nan_in_a_column":
            v[rng.integers(a), -1] = np.nan
        ids = rng.permutation(10 * a)[:a]
        for k in range(1, a + 2):
            for largest in (True, False):
                got, val, _ = _topk(v, v, 0, k, largest, ids=ids)
                kk = min(k, a)
                for j in range(b):
                    if values == "nan_in_a_column" and j == b - 1:
                        continue  # NaN has no place in the order; only the other columns are checked
                    order = np.lexsort((ids, -v[:, j]))  # bif descending, then the smaller id
                    want = order[:kk] if largest else order[::-1][:kk]
                    assert got[:, j].tolist() == want.tolist(), (trial, k, largest, j)
                    np.testing.assert_array_equal(val[:, j], v[want, j])


# --- other degenerate inputs ---------------------------------------------------------------------
LINEAR = "bif.examples.linear:build"


@pytest.mark.parametrize("case", ["n_train_1", "n_train_2", "query_is_train", "query_equals_train_copy",
                                  "single_chain", "draws_below_mcse_batches", "some_frozen"])
def test_degenerate_inputs_get_a_result(case, tmp_path, dask_address):
    out = tmp_path / case
    n_train, k = 10, 3
    problem, args, over = LINEAR, {"n": 10, "d": 2, "m": 3}, {}
    if case in ("n_train_1", "n_train_2"):  # also n_train below topk: 1 positive and 0 / 1 negative per query
        n_train, k = int(case[-1]), 20
        args = {"n": n_train, "d": 2, "m": 3}
        over = {"covariance": {"topk": 20}}
    elif case == "query_is_train":
        problem = "bif_test_problems:self_influence"
    elif case == "query_equals_train_copy":
        problem = "bif_test_problems:query_equals_train_copy"
    elif case == "single_chain":
        over = {"sampler": {"num_chains": 1}}
    elif case == "draws_below_mcse_batches":
        over = {"sampler": {"num_draws": 6, "draws_per_block": 3}, "quality": {"mcse_num_batches": 10}}
    elif case == "some_frozen":
        problem, args = "bif_test_problems:frozen", {"which": "some", "n": 10, "d": 2, "m": 3}
    n_query = n_train if case == "query_is_train" or case == "query_equals_train_copy" else 3
    manifest = run_attribution(_cfg(out, dask_address, problem, args, **over), show_progress=False)
    assert manifest["status"] == S.STATUS_COMPLETE, manifest.get("quality")
    ds = _results(out)
    assert ds[S.BIF].shape == (n_train, n_query)
    assert np.isfinite(ds[S.BIF].values).all() and np.isfinite(ds[S.BIF_CORR].values).all()
    assert (np.abs(ds[S.BIF].values) > 0).all()  # every trace varies here
    assert not ds[S.TRAIN_CONSTANT].values.any() and not ds[S.QUERY_CONSTANT].values.any()
    _assert_topk_disjoint(out, n_train, k)
    diag = pd.read_parquet(out / S.DIAGNOSTICS_FILE)
    assert len(diag) == n_train + n_query
    summary = manifest["diagnostics"]
    if case == "single_chain":  # split R-hat needs 2 chains: undefined, counted, never a failure
        assert diag[S.RHAT].isna().all() and summary["num_rhat_nan"] == n_train + n_query
        assert summary["rhat"]["q50"] is None and summary["ess_bulk"]["q50"] > 0
    elif case == "draws_below_mcse_batches":  # no batch-means MCSE with 6 draws in 10 batches: reported as None
        assert summary["bif_mcse"]["num_pairs"] == 0 and summary["bif_mcse"]["q50"] is None
    else:
        assert np.isfinite(diag[S.RHAT]).all() and summary["bif_mcse"]["q50"] > 0
    if case in ("query_is_train", "query_equals_train_copy"):
        d = np.diag(ds[S.BIF].values)
        assert (d < 0).all()  # self-influence -Var(l_i)
        np.testing.assert_allclose(np.diag(ds[S.BIF_CORR].values), -1.0, atol=1e-6)
    manifest = read_manifest(str(out))  # our parts of it are strict JSON even with undefined diagnostics
    json.dumps([manifest["diagnostics"], manifest["quality"]], allow_nan=False)


def test_all_parameters_frozen_is_a_clear_error(tmp_path, dask_address, capsys):
    """`bif run` on a model without trainable parameters: exit 2 and a message naming the fix, before sampling."""
    from bif.flows.cli import main
    from bif.errors import ProblemError

    data = {"problem": "bif_test_problems:frozen", "problem_args": {"which": "all"}, "output": str(tmp_path / "out"),
            "sampler": {"num_chains": 1, "num_draws": 4}, "compute": {"address": dask_address}}
    with pytest.raises(ProblemError, match=r"no parameters with requires_grad=True.*Set requires_grad=True"):
        run_attribution(build_config(data), show_progress=False)
    assert not (tmp_path / "out" / S.TRACES_DIR).exists()  # refused at preparation: nothing sampled
    cfg = tmp_path / "frozen.yaml"
    cfg.write_text(json.dumps(data | {"output": str(tmp_path / "cli")}))
    assert main(["run", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: problem.model has no parameters with requires_grad=True"), err[-3:]
    manifest = read_manifest(str(tmp_path / "cli"))
    assert manifest is None or manifest["status"] != S.STATUS_COMPLETE

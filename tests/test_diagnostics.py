"""MCMC diagnostics: ArviZ R-hat / ESS on known chains, and the batch-means MCSE of the BIF."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from bif import schema as S
from bif.quality.diagnostics import (DIAGNOSTICS_COLUMNS, DIAGNOSTICS_FILE, bif_mcse, default_block_samples,
                                     loss_diagnostics, write_diagnostics)


def _ar1(rng, shape, phi: float) -> np.ndarray:
    """Stationary AR(1) with unit marginal variance along axis 1; shape (chains, draws, n)."""
    c, d, n = shape
    out = np.empty(shape)
    out[:, 0] = rng.normal(size=(c, n))
    noise = rng.normal(size=shape) * np.sqrt(1 - phi**2)
    for t in range(1, d):
        out[:, t] = phi * out[:, t - 1] + noise[:, t]
    return out


def test_iid_chains_mix():
    rng = np.random.default_rng(0)
    train, query = rng.normal(size=(4, 500, 60)), rng.normal(size=(4, 500, 7))
    diag = loss_diagnostics(train, query)
    assert list(diag.columns) == list(DIAGNOSTICS_COLUMNS)
    assert (diag[S.SPLIT] == S.TRAIN).sum() == 60 and (diag[S.SPLIT] == S.QUERY).sum() == 7
    assert diag[S.SAMPLE].tolist() == list(range(60)) + list(range(7))
    assert diag["rhat"].max() < 1.02 and abs(diag["rhat"].median() - 1.0) < 0.005
    n = 4 * 500
    # ESS of iid draws is n; its estimator scatters by roughly 10 %
    assert 0.85 * n < diag["ess_bulk"].median() < 1.15 * n
    assert 0.8 * n < diag["ess_tail"].median() < 1.2 * n


def test_separated_chains_have_large_rhat():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(4, 300, 20)) + np.array([0.0, 0.0, 1.0, 1.0])[:, None, None]
    diag = loss_diagnostics(train, rng.normal(size=(4, 300, 3)))
    train_rows = diag[diag[S.SPLIT] == S.TRAIN]
    assert (train_rows["rhat"] > 1.1).all()
    assert (diag.loc[diag[S.SPLIT] == S.QUERY, "rhat"] < 1.05).all()


def test_autocorrelated_chains_have_small_ess():
    rng = np.random.default_rng(2)
    phi = 0.9
    diag = loss_diagnostics(_ar1(rng, (4, 1000, 30), phi), np.zeros((4, 1000, 0)))
    n = 4000
    expected = n * (1 - phi) / (1 + phi)  # ESS of an AR(1) mean: n (1 - phi) / (1 + phi) = 210
    assert 0.75 * expected < diag["ess_bulk"].median() < 1.3 * expected


def test_constant_traces_are_flagged_and_left_out_of_summaries():
    """A loss that is exactly 0.0 at every draw: rhat / ESS NaN, constant=True, skipped by quantiles and counts."""
    from bif.quality.diagnostics import summarize

    rng = np.random.default_rng(5)
    train, query = rng.normal(size=(3, 80, 6)), rng.normal(size=(3, 80, 3))
    train[..., [1, 4]] = 0.0
    query[..., 2] = 0.0
    diag = loss_diagnostics(train, query)
    assert diag[S.CONSTANT].tolist() == [False, True, False, False, True, False, False, False, True]
    const = diag[S.CONSTANT]
    assert diag.loc[const, ["rhat", "ess_bulk", "ess_tail"]].isna().all().all()  # ArviZ alone gives ESS = 240
    assert np.isfinite(diag.loc[~const, ["rhat", "ess_bulk", "ess_tail"]].to_numpy()).all()
    summary = summarize(diag)
    assert summary["constant_traces"] == {"train": {"count": 2, "total": 6, "share": 2 / 6},
                                          "query": {"count": 1, "total": 3, "share": 1 / 3}}
    assert summary["num_rhat_nan"] == 0
    assert summary["ess_bulk"]["min"] == pytest.approx(diag.loc[~const, "ess_bulk"].min())
    # a trace that is constant within each chain but differs between chains is not constant
    train[0, :, 1] = 1.0
    assert not loss_diagnostics(train, query)[S.CONSTANT].iloc[1]


def test_single_chain_gives_nan_rhat():
    rng = np.random.default_rng(3)
    diag = loss_diagnostics(rng.normal(size=(1, 100, 4)), rng.normal(size=(1, 100, 2)))
    assert diag["rhat"].isna().all() and (diag["ess_bulk"] > 0).all()


def test_mcse_known_answer_for_independent_gaussians():
    """x, y standard normal with correlation rho: Var(x y) = 1 + rho², so MCSE = sqrt((1 + rho²) / N)."""
    rng = np.random.default_rng(4)
    chains, draws, n = 4, 400, 30
    rho = np.linspace(0.0, 0.9, n)
    x = rng.normal(size=(chains, draws, n))
    y = rho * x + np.sqrt(1 - rho**2) * rng.normal(size=(chains, draws, n))
    mcse = bif_mcse(x, y, num_batches=10)  # (n, n); the diagonal pairs (x_i, y_i) have correlation rho_i
    total = chains * draws
    diag = np.diag(mcse)
    expected = np.sqrt((1 + rho**2) / total)
    # each estimate rests on K = 40 batch means: relative error ~ 1 / sqrt(2 (K - 1)) = 11 %
    assert np.all(np.abs(diag / expected - 1) < 0.5)
    assert abs(np.mean(diag**2 / expected**2) - 1) < 0.1
    off = mcse[~np.eye(n, dtype=bool)]  # independent pairs: sqrt(1 / N)
    assert abs(np.mean(off**2) * total - 1) < 0.05


def test_mcse_shrinks_like_one_over_sqrt_draws():
    rng = np.random.default_rng(5)
    short = bif_mcse(rng.normal(size=(4, 200, 20)), rng.normal(size=(4, 200, 10)), num_batches=10)
    long = bif_mcse(rng.normal(size=(4, 3200, 20)), rng.normal(size=(4, 3200, 10)), num_batches=10)
    ratio = np.sqrt(np.mean(short**2) / np.mean(long**2))
    assert 3.6 < ratio < 4.4  # sqrt(3200 / 200) = 4


def test_mcse_accounts_for_autocorrelation():
    """Independent AR(1) x, y: z = x y has lag-k autocorrelation phi^(2k), so Var(mean z) grows by (1+phi²)/(1-phi²)."""
    rng = np.random.default_rng(6)
    phi, chains, draws = 0.8, 4, 4000
    x, y = _ar1(rng, (chains, draws, 16), phi), _ar1(rng, (chains, draws, 8), phi)
    mcse = bif_mcse(x, y, num_batches=10)
    expected = np.sqrt((1 + phi**2) / (1 - phi**2) / (chains * draws))
    assert abs(np.sqrt(np.mean(mcse**2)) / expected - 1) < 0.12
    iid_mcse = np.sqrt(1 / (chains * draws))
    assert np.mean(mcse) > 1.8 * iid_mcse  # a naive iid standard error would be 2.1x too small


def test_mcse_rejects_bad_input():
    with pytest.raises(ValueError, match="num_batches"):
        bif_mcse(np.zeros((2, 5, 3)), np.zeros((2, 5, 2)), num_batches=10)
    with pytest.raises(ValueError, match="equal leading dims"):
        bif_mcse(np.zeros((2, 50, 3)), np.zeros((2, 40, 2)))


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested summary as {"a.b": value}: numbers as they are, anything else (strings, None, lists) as its repr."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float)) and not isinstance(v, bool) else repr(v)
    return out


def test_write_diagnostics_on_a_stored_run(tmp_path):
    """Blockwise reading from the TraceStore gives the same table as the in-memory call."""
    from bif.sampling.chain import ChainState, DrawBlock
    from bif.store.traces import TraceStore

    rng = np.random.default_rng(7)
    chains, draws, n_train, n_query, per_block = 3, 60, 25, 4, 20
    train = rng.gamma(2.0, 0.5, (chains, draws, n_train)).astype(np.float32).astype(np.float64)
    query = rng.gamma(2.0, 0.5, (chains, draws, n_query)).astype(np.float32).astype(np.float64)
    store = TraceStore(str(tmp_path))
    state = ChainState(step=0, num_recorded=0, params={}, precond=None, rng_cpu=np.zeros(1), rng_noise=np.zeros(1))
    for c in range(chains):
        for b in range(draws // per_block):
            sl = slice(b * per_block, (b + 1) * per_block)
            store.write_block(DrawBlock(chain=c, draw_start=sl.start, train_losses=train[c, sl],
                                        query_losses=query[c, sl], steps=np.arange(per_block),
                                        distance=np.ones(per_block), state=state),
                              block_index=b, ref_train_loss_mean=1.0)
    summary = write_diagnostics(str(tmp_path), None, num_chains=chains, block_samples=7, num_batches=5)
    got = pd.read_parquet(tmp_path / DIAGNOSTICS_FILE)
    want = loss_diagnostics(train, query)
    got = got.sort_values([S.SPLIT, S.SAMPLE]).reset_index(drop=True)
    want = want.sort_values([S.SPLIT, S.SAMPLE]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_categorical=False)
    assert summary["num_samples"] == {"train": n_train, "query": n_query}
    assert summary["num_chains"] == chains and summary["num_draws_per_chain"] == draws
    assert summary["num_rhat_above_threshold"] == int((want["rhat"] > 1.1).sum())
    assert summary["rhat"]["q50"] == pytest.approx(want["rhat"].median())
    mcse = bif_mcse(train, query, num_batches=5)
    assert summary["bif_mcse"]["num_pairs"] == n_train * n_query
    assert summary["bif_mcse"]["max"] == pytest.approx(mcse.max())
    assert summary["bif_mcse"]["q50"] == pytest.approx(np.median(mcse))
    flat_t, flat_q = train.reshape(-1, n_train), query.reshape(-1, n_query)
    bif = -((flat_t - flat_t.mean(0)).T @ (flat_q - flat_q.mean(0))) / (flat_t.shape[0] - 1)
    frac = summary["bif_mcse"]["frac_pairs_abs_bif_above_2_mcse"]
    assert frac == pytest.approx(np.mean(np.abs(bif) > 2 * mcse))
    assert frac < 0.2  # independent traces: no real influence, so few pairs stand out from the noise
    # the block size never changes a value: the default's one block of all 25 samples gives the same file and summary
    assert default_block_samples(chains * draws) == 4096
    again = write_diagnostics(str(tmp_path), None, num_chains=chains, num_batches=5)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / DIAGNOSTICS_FILE).sort_values([S.SPLIT, S.SAMPLE])
                                  .reset_index(drop=True), got, check_categorical=False)
    # equal up to the GEMMs' rounding: a block of 7 samples and one of 25 are summed in another order by BLAS
    # (on an AMD EPYC host one MCSE quantile differed in its 15th digit, 8e-15 relative; on others not at all)
    assert again.pop("elapsed_s") >= 0
    a, b = _flat(again), _flat({k: v for k, v in summary.items() if k != "elapsed_s"})
    assert a.keys() == b.keys()
    assert {k: v for k, v in a.items() if isinstance(v, str)} == {k: v for k, v in b.items() if isinstance(v, str)}
    numbers = [k for k, v in a.items() if not isinstance(v, str)]
    assert len(numbers) > 20 and [a[k] for k in numbers] == pytest.approx([b[k] for k in numbers], rel=1e-12, abs=0)
    assert summary["constant_traces"]["train"] == {"count": 0, "total": n_train, "share": 0.0}
    import json

    json.dumps(summary, allow_nan=False)  # goes into the manifest: strict JSON
    limited = write_diagnostics(str(tmp_path), None, num_chains=chains, max_samples=10)
    assert limited["num_samples"] == {"train": 10, "query": n_query}


def test_default_block_samples_holds_a_bounded_number_of_loss_values():
    from bif.quality.diagnostics import BLOCK_VALUES

    for values in (1, 7, 200, 400, 1000, 2000, 5000, 10**6):
        b = default_block_samples(values)
        assert 512 <= b <= 8192 and b & (b - 1) == 0  # a power of two in range
        assert b * values <= BLOCK_VALUES or b == 512  # at most BLOCK_VALUES values, unless at the floor
        assert b in (512, 8192) or 2 * b * values > BLOCK_VALUES  # the largest such power of two
    assert [default_block_samples(v) for v in (200, 2000)] == [4096, 512]  # 2 x 100 draws; digits' 2 x 1,000


def test_block_bounds_cover_every_sample_once_with_a_finer_tail():
    from bif.quality.diagnostics import _block_bounds

    for n, block in ((50_000, 4096), (1797, 512), (8192, 4096), (4096, 4096), (25, 7), (1, 512), (0, 512)):
        bounds = _block_bounds(n, block)
        assert (bounds == []) == (n == 0) and (bounds[-1][1] if bounds else 0) == n
        assert [s for s, _ in bounds] == ([0] + [e for _, e in bounds[:-1]] if bounds else [])  # contiguous
        sizes = [e - s for s, e in bounds]
        assert all(0 < k <= block for k in sizes)
        tail = [k for k in sizes if k < block]
        assert sum(tail) < 2 * block and all(k <= max(block // 4, min(block, 128)) for k in tail[:-1] if n > block)
    assert [e - s for s, e in _block_bounds(50_000, 4096)] == [4096] * 11 + [989, 989, 988, 989, 989]


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, bif.quality.diagnostics, bif.report; "
            "bad = [m for m in ('prefect', 'arviz', 'great_expectations', 'matplotlib') if m in sys.modules]; "
            "sys.exit(str(bad) if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the vectorized R-hat / ESS (arviz-stats' numba backend) against ArviZ 0.23, one sample at a time ---------
def _arviz_reference(traces: np.ndarray) -> dict[str, np.ndarray]:
    """ArviZ 0.23's rank R-hat, bulk ESS and tail ESS of (chains, draws, n) traces (its per-sample loop)."""
    import logging
    import warnings

    import arviz as az
    import xarray as xr

    logging.getLogger("arviz").setLevel(logging.ERROR)  # its 'shape validation failed' notes on purpose-made cases
    ds = xr.Dataset({"loss": (("chain", "draw", "sample"), traces)})
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        return {"rhat": az.rhat(ds, method="rank")["loss"].values, "ess_bulk": az.ess(ds, method="bulk")["loss"].values,
                "ess_tail": az.ess(ds, method="tail")["loss"].values}


def _known_traces() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    odd = rng.normal(size=(4, 101, 12))  # an odd number of draws: splitting drops the middle draw
    odd[..., 1] = 0.0  # constant: rhat NaN, ESS = chains x draws (of the split halves)
    odd[0, :, 2] = 1.0  # constant within one chain only: not constant
    odd[..., 3] = np.round(odd[..., 3])  # many ties: average ranks
    odd[1, 7, 4] = np.nan  # a NaN: NaN everywhere, as in ArviZ
    odd[..., 5] = (rng.random((4, 101)) < 0.03).astype(float)  # the tail indicator at q05 is constant
    odd[..., 6] += np.arange(4)[:, None]  # separated chains: large R-hat
    return {
        "odd_draws": odd,
        "autocorrelated": _ar1(rng, (3, 400, 9), 0.9),
        "random_walk": rng.normal(size=(2, 100, 7)).cumsum(axis=1),
        "single_chain": rng.normal(size=(1, 100, 5)),  # rhat NaN, ESS defined
        "too_short": rng.normal(size=(2, 3, 4)),  # fewer than 4 draws: all NaN
        "gamma_losses": rng.gamma(2.0, 0.5, (2, 64, 8)).astype(np.float32).astype(np.float64),
        # draws of two values (a 0/1 loss), some samples with as many of each: the fold |x - median| is constant,
        # its R-hat NaN, and ArviZ's rank R-hat is the bulk one
        "two_values": (rng.random((2, 20, 40)) < 0.5).astype(float),
    }


@pytest.mark.parametrize("name", list(_known_traces()))
def test_rhat_ess_matches_arviz_per_sample(name):
    """Every value equals ArviZ 0.23's (rtol 1e-10), constant traces, ties, NaN, odd draws and one chain included."""
    from bif.quality.diagnostics import rhat_ess

    traces = _known_traces()[name]
    got, want = rhat_ess(traces), _arviz_reference(traces)
    for key in ("rhat", "ess_bulk", "ess_tail"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-12, equal_nan=True, err_msg=key)
        assert np.array_equal(np.isnan(got[key]), np.isnan(want[key])), key
    if name == "odd_draws":
        assert np.isnan(got["rhat"][1]) and got["ess_bulk"][1] == got["ess_tail"][1] == 4 * 100
        assert got["rhat"][6] > 1.5 and np.isnan(got["ess_bulk"][4])
    if name == "single_chain":
        assert np.isnan(got["rhat"]).all() and np.isfinite(got["ess_bulk"]).all()
    if name == "too_short":
        assert all(np.isnan(v).all() for v in got.values())
    if name == "two_values":
        balanced = (traces == 1).sum(axis=(0, 1)) == 20  # as many ones as zeros: a constant fold
        assert balanced.sum() >= 3 and np.isfinite(got["rhat"]).all()


def test_degenerate_traces_match_arviz_stats_default_backend():
    """Degenerate traces against arviz-stats' default (numpy) backend, ArviZ >= 1's: draws of two values (as many of
    each: a constant fold, whose R-hat is the bulk one), chains stuck at different values (R-hat inf; ArviZ 0.23
    gives NaN), three values, and saturated float32 losses (many exact zeros, some traces all zero). rtol 1e-10.

    Not compared: the ESS of draws of two values. Their autocovariances can sum to exactly 0 in Geyer's sequence,
    and rounding then decides where it stops; ArviZ 0.23, arviz-stats' numpy and numba backends and this module
    round differently (e.g. 2 chains x 10 draws of 0/1: 24 of 3,000 tail ESS differ between ArviZ 0.23 and
    arviz-stats' numba backend)."""
    import warnings

    from arviz_stats.base import array_stats

    from bif.quality.diagnostics import rhat_ess

    rng = np.random.default_rng(21)
    losses = rng.gamma(0.3, 1.0, (2, 100, 60)).astype(np.float32)
    losses[losses < 0.5] = 0.0
    losses[..., :5] = 0.0  # saturated at every draw: constant
    cases = {"two_values": (rng.random((2, 20, 100)) < 0.5).astype(float),
             "stuck_chains": np.broadcast_to(rng.normal(size=(4, 1, 10)), (4, 50, 10)).copy(),
             "three_values": rng.integers(0, 3, (2, 30, 60)).astype(float),
             "saturated": losses.astype(np.float64)}
    for name, t in cases.items():
        got = rhat_ess(t)
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore")
            want = {"rhat": array_stats.rhat(t, chain_axis=0, draw_axis=1, method="rank"),
                    "ess_bulk": array_stats.ess(t, chain_axis=0, draw_axis=1, method="bulk"),
                    "ess_tail": array_stats.ess(t, chain_axis=0, draw_axis=1, method="tail", prob=(0.05, 0.95))}
        for key in ("rhat",) if name == "two_values" else tuple(want):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=0, equal_nan=True, err_msg=f"{name} {key}")
    two = cases["two_values"]
    assert ((two == 1).sum(axis=(0, 1)) == 20).sum() >= 5  # balanced samples: their fold is constant
    assert np.isfinite(rhat_ess(two)["rhat"]).all()
    assert np.isposinf(rhat_ess(cases["stuck_chains"])["rhat"]).all()
    assert (losses == 0).all(axis=(0, 1)).any() and not (losses == 0).all()


def test_rhat_ess_is_vectorized_over_samples():
    """One block of 4,000 samples costs far less than ArviZ's one-call-per-sample loop on 200 of them x 20."""
    import time

    from bif.quality.diagnostics import rhat_ess

    rng = np.random.default_rng(3)
    many = rng.normal(size=(2, 100, 4000))
    rhat_ess(many[..., :8])  # imports and numba's compiled gufuncs
    t = time.process_time()
    got = rhat_ess(many)
    ours = time.process_time() - t
    t = time.process_time()
    want = _arviz_reference(many[..., :200])
    per_sample_arviz = (time.process_time() - t) / 200
    np.testing.assert_allclose(got["ess_bulk"][:200], want["ess_bulk"], rtol=1e-10)
    assert ours < 0.25 * per_sample_arviz * 4000, (ours, per_sample_arviz)


def test_passes_never_change_a_value(monkeypatch):
    """R-hat / ESS in passes of a few samples (PASS_VALUES) equal one pass over all of them, bit for bit: constant,
    NaN, tied and odd-draw traces included."""
    from bif.quality import diagnostics as D

    rng = np.random.default_rng(5)
    traces = rng.normal(size=(3, 41, 37)).astype(np.float32)
    traces[:, :, 4] = 0.0  # constant
    traces[1, 7, 9] = np.nan
    traces[:, :20, 11] = 1.5  # ties
    whole = D.rhat_ess(traces)
    assert np.isnan(whole["rhat"][[4, 9]]).all() and np.isfinite(whole["rhat"][11])
    monkeypatch.setattr(D, "PASS_VALUES", 5 * 3 * 41)  # passes of 5 samples, the last of 2
    parts = D.rhat_ess(traces)
    for k in whole:
        np.testing.assert_array_equal(parts[k], whole[k])
    frame, const = D._rows_diagnostics(np.moveaxis(traces, 2, 0), split=S.TRAIN)
    assert const.tolist() == [i == 4 for i in range(37)] and len(frame) == 37


def test_sampled_pairs_get_the_mcse_and_bif_of_every_pair_computation():
    """_pair_mcse (the sampled-pairs path of write_diagnostics, large runs) against bif_mcse and the BIF over
    all pairs (the GEMM path): the same values at the sampled pairs, uneven batches included."""
    from bif.quality.diagnostics import _mcse_and_comoment, _pair_mcse

    rng = np.random.default_rng(3)
    chains, draws, a, b = 3, 107, 40, 9  # 107 draws: batches of 10 and 11
    shared = rng.normal(size=(chains, draws, 1))
    train = (rng.gamma(2.0, 0.5, (chains, draws, a)) + shared).astype(np.float32)
    query = (rng.gamma(2.0, 0.5, (chains, draws, b)) - shared).astype(np.float32)
    pick = np.sort(rng.choice(a * b, size=150, replace=False))
    ti, qj = pick // b, pick % b
    mcse, bif = _pair_mcse(train, query, ti, qj, 10)
    all_mcse, comoment = _mcse_and_comoment(train, query, 10)
    np.testing.assert_allclose(mcse, bif_mcse(train, query, num_batches=10)[ti, qj], rtol=1e-9)
    np.testing.assert_allclose(mcse, all_mcse[ti, qj], rtol=1e-9)
    flat_t, flat_q = train.reshape(-1, a).astype(np.float64), query.reshape(-1, b).astype(np.float64)
    want = -((flat_t - flat_t.mean(0)).T @ (flat_q - flat_q.mean(0))) / (flat_t.shape[0] - 1)
    np.testing.assert_allclose(bif, want[ti, qj], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(-comoment / (flat_t.shape[0] - 1), want, rtol=1e-9, atol=1e-12)
    assert (bif > 0).mean() > 0.9  # the shared component (+ in train, - in query): Cov < 0, BIF > 0 for most pairs


def test_with_a_map_fn_the_caller_never_loads_numba(tmp_path):
    """Every R-hat / ESS, the query split's included, runs inside map_fn: `bif run`'s command (which maps onto
    its Dask workers) no longer imports arviz-stats, numba and scipy.stats for the query split (~3-5 s)."""
    import subprocess
    import sys

    from bif.sampling.chain import ChainState, DrawBlock
    from bif.store.traces import TraceStore

    rng = np.random.default_rng(5)
    chains, draws, n_train, n_query = 2, 40, 12, 3
    train = rng.gamma(2.0, 0.5, (chains, draws, n_train)).astype(np.float32).astype(np.float64)  # as stored
    query = rng.gamma(2.0, 0.5, (chains, draws, n_query)).astype(np.float32).astype(np.float64)
    store = TraceStore(str(tmp_path))
    state = ChainState(step=0, num_recorded=0, params={}, precond=None, rng_cpu=np.zeros(1), rng_noise=np.zeros(1))
    for c in range(chains):
        store.write_block(DrawBlock(chain=c, draw_start=0, train_losses=train[c], query_losses=query[c],
                                    steps=np.arange(draws), distance=np.ones(draws), state=state),
                          block_index=0, ref_train_loss_mean=1.0)
    code = f"""
import multiprocessing, sys
from concurrent.futures import ProcessPoolExecutor
from bif.quality.diagnostics import write_diagnostics
with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
    summary = write_diagnostics({str(tmp_path)!r}, None, num_chains=2, block_samples=5,
                                map_fn=lambda f, xs: list(pool.map(f, xs)))
loaded = sorted(m for m in ("numba", "arviz_stats", "scipy.stats", "xarray") if m in sys.modules)
print(summary["num_samples"]["train"], summary["num_samples"]["query"], loaded)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[-2]
    assert out == f"{n_train} {n_query} []"
    got = pd.read_parquet(tmp_path / DIAGNOSTICS_FILE).sort_values([S.SPLIT, S.SAMPLE]).reset_index(drop=True)
    want = loss_diagnostics(train, query).sort_values([S.SPLIT, S.SAMPLE]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_categorical=False)


def test_rank_normalization_equals_arviz_stats_and_float32_ranks_change_nothing():
    """``_z_scale`` (contiguous rows, float32 ranks for float32 traces) gives arviz-stats' ``_z_scale`` values, and
    R-hat / ESS of float32 traces equal those of the same values in float64, ties included."""
    import xarray as xr
    from bif.quality.diagnostics import _z_fold, _z_scale, rhat_ess
    from bif.quality.numba_backend import azd

    rng = np.random.default_rng(5)
    x = rng.gamma(2.0, 0.5, (3, 80, 40)).astype(np.float32)
    x[..., :10] = np.round(x[..., :10], 1)  # ties: average ranks
    split = azd._split_chains(xr.DataArray(x.astype(np.float64), dims=("chain", "draw", "sample")))
    want = azd._z_scale(split).transpose("chain", "draw", "sample").values
    for dtype in (np.float32, np.float64):
        np.testing.assert_array_equal(_z_scale(split, dtype).values, want)
    for dtype in (np.float32, np.float64):
        np.testing.assert_array_equal(_z_fold(split, dtype).values,
                                      azd._z_fold(split).transpose("chain", "draw", "sample").values)
    got32, got64 = rhat_ess(x), rhat_ess(x.astype(np.float64))
    for key in got32:
        np.testing.assert_array_equal(got32[key], got64[key], err_msg=key)


@pytest.mark.parametrize("n", [4, 5, 7, 20, 21, 100, 101, 200, 401, 2000])
def test_quantiles_of_sorted_rows_equal_numpys_bit_for_bit(n):
    """The tail ESS's quantiles, read off sorted rows, equal np.quantile's (method "linear") bit for bit: ties,
    float32 values, the quantiles 0 and 1 and a gamma of exactly 0.5 included."""
    from bif.quality.diagnostics import _sorted_quantiles

    rng = np.random.default_rng(n)
    rows = np.concatenate([rng.normal(size=(50, n)), np.round(rng.normal(size=(20, n)), 1),
                           rng.gamma(2.0, 0.5, (20, n)).astype(np.float32).astype(np.float64),
                           rng.normal(scale=1e-300, size=(5, n)), np.full((5, n), 3.25)])
    ordered = np.sort(rows, axis=1)
    q = (0.0, 0.05, 0.25, 0.5, 0.95, 1.0, 0.5 / (n - 1) + 1 / (n - 1), 1 / 3)
    got = _sorted_quantiles(ordered, q)
    want = np.quantile(rows, q, axis=1)
    assert got.shape == want.shape == (len(q), rows.shape[0])
    np.testing.assert_array_equal(got, want)
    assert np.array_equal(got[[1, 4]], np.quantile(rows, (0.05, 0.95), axis=1))


def _score_cases(rng, c: int, d: int) -> np.ndarray:
    """Rows of c x d values of many kinds: continuous, ties, -0 beside +0, two values (as many of each: a constant
    fold), constant, and symmetric about the median (the fold's ties across its two sides)."""
    k = c * d
    sym = rng.normal(size=(6, k // 2))
    return np.concatenate([
        rng.normal(size=(12, k)), np.round(rng.normal(size=(8, k)), 1), rng.integers(-2, 3, (6, k)) * 0.5,
        np.where(rng.random((4, k)) < 0.5, -0.0, 0.0) + rng.integers(0, 2, (4, k)),
        np.tile([0.0, 1.0], (4, k // 2 + 1))[:, :k], np.full((3, k), 2.5),
        np.concatenate([sym, -sym, np.zeros((6, k % 2))], axis=1) + 3.0,
        rng.gamma(0.3, 1.0, (6, k)) * (rng.random((6, k)) > 0.4)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c,d", [(4, 50), (2, 2), (3, 7), (1, 9), (8, 25)])
def test_normal_scores_from_one_sort_equal_bottlenecks_ranks_bit_for_bit(dtype, c, d):
    """_normal_scores (one sort per row, the fold's order merged from it) gives _z_rows' and _z_fold_rows' scores
    (bottleneck's rankdata) and np.sort's rows, bit for bit, for ties, signed zeros, constant folds and odd sizes;
    rows with an infinite value take the bottleneck path and keep its values."""
    from bif.quality.diagnostics import _normal_scores, _z_fold_rows, _z_rows

    rng = np.random.default_rng(c * 100 + d)
    rows = _score_cases(rng, c, d).astype(dtype)
    rows[-1, 0], rows[-2, :3] = np.inf, -np.inf  # the bottleneck path
    shape = (rows.shape[0], c, d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # infinite rows are expected input: no RuntimeWarning in a run's log
        z, z_fold, ordered = _normal_scores(rows, shape)
    with np.errstate(invalid="ignore"):
        want_ordered = np.sort(rows, axis=1).astype(np.float64)
        want_fold = _z_fold_rows(rows.astype(np.float64), want_ordered, shape)
    np.testing.assert_array_equal(ordered, want_ordered)  # (-0 and +0 compare equal: no value depends on the sign)
    np.testing.assert_array_equal(z, _z_rows(rows, shape))
    np.testing.assert_array_equal(z_fold, want_fold)
    assert z.shape == z_fold.shape == shape and np.isfinite(z[:-2]).all() and np.isfinite(z_fold[:-2]).all()
    z_only, none, _ = _normal_scores(rows, shape, fold=False)
    assert none is None and np.array_equal(z_only, z)


def test_normal_scores_of_random_rows_equal_bottlenecks_ranks():
    """Many random rows of few distinct values (ties everywhere) and of continuous values, float32 and float64."""
    from bif.quality.diagnostics import _normal_scores, _z_fold_rows, _z_rows

    rng = np.random.default_rng(29)
    for trial in range(60):
        c, d = int(rng.integers(1, 5)), int(rng.integers(2, 40))
        k = c * d
        rows = (rng.integers(0, int(rng.integers(2, 6)), (40, k)) * rng.choice([0.1, 0.3, 1.0])
                if trial % 2 else rng.normal(size=(40, k)))
        rows = rows.astype(np.float32 if trial % 3 else np.float64)
        shape = (40, c, d)
        z, z_fold, ordered = _normal_scores(rows, shape)
        np.testing.assert_array_equal(z, _z_rows(rows, shape))
        np.testing.assert_array_equal(z_fold, _z_fold_rows(rows.astype(np.float64), ordered, shape))


def test_frames_are_joined_as_pandas_joins_them():
    """write_diagnostics joins the jobs' frames column by column: the same frame as pd.concat, NaN and constant
    rows, both splits and a single frame included."""
    import pandas as pd

    from bif.quality.diagnostics import _concat_frames, _split_diagnostics

    rng = np.random.default_rng(9)
    train = rng.normal(size=(2, 40, 30)).astype(np.float32)
    train[..., 4] = 0.0  # constant
    frames = [_split_diagnostics(train[..., :17], split="train"), _split_diagnostics(train[..., 17:], split="train",
                                                                                         start=17),
              _split_diagnostics(rng.normal(size=(2, 40, 5)), split="query")]
    for parts in (frames, frames[:1], frames[2:] + frames[:2]):
        pd.testing.assert_frame_equal(_concat_frames(parts), pd.concat(parts, ignore_index=True), check_exact=True)
    assert _concat_frames(frames)["constant"].sum() == 1

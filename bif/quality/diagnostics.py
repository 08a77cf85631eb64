"""MCMC diagnostics of the per-sample loss traces (ArviZ) and the Monte-Carlo standard error of the BIF.

No Prefect imports. R-hat and ESS are ArviZ's, to its values: the rank-normalized
split R-hat and the bulk / tail ESS of Vehtari et al. 2021 (arXiv 1903.08008), as
``arviz.rhat(method="rank")`` and ``arviz.ess(method="bulk" / "tail")`` define them. They are
computed in the steps of arviz-stats' vectorized backend (``arviz_stats.numba.diagnostics``: rank
normalization over (chain, draw) for all samples at once, FFT autocovariances, and Geyer's
initial monotone sequence as its numba gufunc over the samples), so a block of thousands of
samples costs a few array passes instead of one Python call per sample (ArviZ 0.23 and
arviz-stats' ``array_stats`` loop over the samples, about 3.5 ms a sample here). The steps
around numpy's FFTs and arviz-stats' ``geyer`` run compiled (:mod:`bif.quality.kernels`), each with the
values of the numpy step it replaced, bit for bit (a rounding difference in an autocovariance can move
the end of Geyer's sequence on discrete draws). The tail ESS
is composed as ArviZ composes it, ``min(ess(split(x <= q05)), ess(split(x <= q95)))`` with the
same backend's ``_ess`` and ``_split_chains``; ArviZ's validity rules are applied around it
(fewer than 4 draws or a NaN: NaN; R-hat needs 2 chains; an odd number of draws drops the
middle one when splitting). ``tests/test_diagnostics.py`` checks every value against ArviZ 0.23, and degenerate
traces (two or three values, stuck chains, saturated losses) against arviz-stats' default backend. Where the two
differ, this module follows arviz-stats: chains stuck at different values have R-hat inf (ArviZ 0.23: NaN).

A constant loss trace (the same value at every draw of every chain, e.g. a float32
cross-entropy of exactly 0.0) has no defined R-hat or ESS: ArviZ gives R-hat NaN and ESS =
chains x draws for it. ``diagnostics.parquet`` flags such samples in its ``constant``
column and holds NaN in rhat, ess_bulk and ess_tail there, so no quantile, count or
histogram mistakes them for well-mixed samples; the summary counts them per split
(``constant_traces``) and its ``num_rhat_nan`` counts only the non-constant samples with an
undefined R-hat (e.g. a single chain, or fewer than 4 draws). Pairs with a constant trace
have BIF 0 and MCSE 0; they are left out of the MCSE quantiles and of the fraction of pairs
with |BIF| > 2 MCSE.

The BIF's Monte-Carlo standard error (:func:`bif_mcse`) uses batch means. With pooled
means x̄_i, ȳ_j over all C chains and N draws in total, the covariance is (up to the
factor N/(N-1)) the mean of z_t = (x_t,i - x̄_i)(y_t,j - ȳ_j). Each chain's draws are cut
into ``num_batches`` contiguous batches; with m_b the mean of z over batch b and
K = C x num_batches,

    MCSE(BIF_ij) = sd_b(m_b) / sqrt(K).

Batches much longer than the autocorrelation time make this valid for correlated draws
(Flegal & Jones 2010); differences between chains enter through the batches too. For
independent Gaussian x, y with correlation rho it estimates sqrt((1 + rho²) / N).

**numba and torch in one process.** numba's default OpenMP threading layer starts its own
thread pool (one thread per core), whose idle threads spin. Torch steps taken later in the same
process then ran slower whenever every core was busy: 4.9x with one such process per core on a
quiet 2-core machine (digits SGLD after one :func:`rhat_ess` call, ``OMP_NUM_THREADS=1`` as in
a Dask worker), 14-35x on a machine loaded by other jobs. That hits every worker
that diagnoses a run and then samples the next (a backfill on one cluster, a calibration sweep,
a kept cluster). :func:`limit_numba_threads` sets ``NUMBA_NUM_THREADS`` before numba loads: 1
unless set; Dask workers get ``compute.threads_per_worker`` and ``OMP_WAIT_POLICY=PASSIVE``
from :mod:`bif.flows.runtime`. Measured by ``python -m benchmarks.numba_torch``.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from bif import schema as S
from bif.config import RHAT_THRESHOLD

RHAT, ESS_BULK, ESS_TAIL = S.RHAT, S.ESS_BULK, S.ESS_TAIL
DIAGNOSTICS_FILE = S.DIAGNOSTICS_FILE
DIAGNOSTICS_COLUMNS = S.DIAGNOSTICS_COLUMNS
MCSE_METHOD = "batch means over contiguous draw batches within each chain (chains x num_batches batches)"
_QUANTILES = (0.05, 0.5, 0.95)


def limit_numba_threads() -> None:
    """Cap numba's thread pool before numba loads (``NUMBA_NUM_THREADS``, default 1; see the module docstring).

    A no-op when ``NUMBA_NUM_THREADS`` is already set (a Dask worker gets
    ``compute.threads_per_worker``) or numba is already loaded (numba reads the variable at
    import; in a process that imports numba itself before the first diagnostics, set
    ``NUMBA_NUM_THREADS`` in its environment).
    """
    if "numba" not in sys.modules:
        os.environ.setdefault("NUMBA_NUM_THREADS", "1")


def rhat_ess(traces: np.ndarray, *, tail: bool = True) -> dict[str, np.ndarray]:
    """ArviZ rank R-hat and bulk (and tail) ESS of every trace in ``traces`` (chains, draws, n), in float64.

    Returns {"rhat", "ess_bulk"[, "ess_tail"]}: (n,) float64 each, ArviZ's raw values (a
    constant trace has R-hat NaN and ESS = chains x draws; :func:`loss_diagnostics` masks
    those), computed for all n traces at once (see the module docstring). The one R-hat /
    ESS of the project: the diagnostics stage and calibration use it.
    """
    t = np.asarray(traces)
    if t.ndim != 3:
        raise ValueError(f"traces must be (chains, draws, n), got shape {t.shape}")
    return _rhat_ess_rows(np.moveaxis(t, 2, 0), tail=tail)[0]


#: Loss values (samples x chains x draws) of one R-hat / ESS pass (:func:`_rhat_ess_rows`): its float64
#: temporaries (2 MiB each) stay in a core's L2 cache.
PASS_VALUES = 1 << 18


def _rhat_ess_rows(rows: np.ndarray, *, tail: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """:func:`rhat_ess` of (n, chains, draws) traces, a sample's draws in a row (the layout trace files store),
    and which samples are constant ((n,) bool, :func:`constant_traces`).

    Computed in passes of at most :data:`PASS_VALUES` loss values (samples are independent, so the values are
    those of one pass): on the 2-core machine (2 MiB of L2 a core) 2 chains x 100 draws cost 30.7-31.9 us a
    sample in passes of 512-2,048 samples, 34.1 in passes of 4,096 and 35.5 in passes of 8,192.
    """
    n, chains, draws = rows.shape
    step = max(1, PASS_VALUES // max(1, chains * draws))
    if n <= step:
        return _rhat_ess_pass(rows, tail=tail)
    parts = [_rhat_ess_pass(rows[s:s + step], tail=tail) for s in range(0, n, step)]
    return ({k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]},
            np.concatenate([p[1] for p in parts]))


def _rhat_ess_pass(rows: np.ndarray, *, tail: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """:func:`_rhat_ess_rows` in one pass.

    float32 traces stay float32 where that changes no value (the ranks, the sort); everything else is float64.
    """
    if rows.dtype not in (np.float32, np.float64):
        rows = rows.astype(np.float64)
    n, chains, draws = rows.shape
    keys = (RHAT, ESS_BULK, ESS_TAIL) if tail else (RHAT, ESS_BULK)
    out = {k: np.full(n, np.nan) for k in keys}
    flat_all = rows.reshape(n, chains * draws)  # (sample, chain x draw): a copy only for a strided view
    const = _constant_rows(flat_all)
    if n == 0 or chains == 0 or draws < 4:  # ArviZ: fewer than 4 draws gives NaN
        return out, const
    half = draws // 2
    split_size = 2 * chains * half  # ArviZ's ESS of a constant (split) array is its size
    valid = ~np.isnan(flat_all).any(axis=1)  # ArviZ: a NaN anywhere gives NaN (a NaN trace is never constant)
    for k in (ESS_BULK, ESS_TAIL) if tail else (ESS_BULK,):
        out[k][const] = split_size
    idx = np.flatnonzero(valid & ~const)
    if not idx.size:
        return out, const
    from bif.quality.kernels import centre_chains, split_rhat
    from bif.quality.numba_backend import azd  # under a lock: numba's gufunc cache races (see that module)

    sub = flat_all if idx.size == n else flat_all[idx]
    m = idx.size
    # each sample's split draws as one row, (sample, split chain, draw): ArviZ's _split_chains makes split chain
    # 2c + h of half h of chain c, which is this reshape of the (sample, chain, draw) rows (odd draws: without
    # the middle one)
    if draws == 2 * half:
        flat = sub
    else:
        s3 = sub.reshape(m, chains, draws)
        flat = np.concatenate([s3[:, :, :half], s3[:, :, draws - half:]], axis=2).reshape(m, -1)
    shape = (m, 2 * chains, half)
    with np.errstate(invalid="ignore", divide="ignore"):
        # the normal scores of the draws and of their fold (R-hat needs at least 2 chains: ArviZ), and the rows
        # sorted (the fold's median and, for even draws, the tail quantiles), from one sort: see _normal_scores
        z, z_fold, ordered = _normal_scores(flat, shape, fold=chains >= 2)
        if chains >= 2:
            bulk, folded = split_rhat(z), split_rhat(z_fold)
            # rank R-hat: ArviZ's max(bulk, folded), Python's max: the folded R-hat where it is the larger, else
            # the bulk one. A fold without spread (draws of two values, as many of each: |x - median| is one
            # value) has a NaN folded R-hat, and keeps the bulk one, as in ArviZ 0.23 and arviz-stats' default
            # backend (arviz-stats' numba backend, xr.where(bulk > folded, ...), gives NaN there)
            out[RHAT][idx] = np.where(folded > bulk, folded, bulk)
        out[ESS_BULK][idx] = _ess_of_centred(azd, z, centre_chains(z))  # a varying row's ranks vary
        if tail:
            # (2, m): ArviZ takes them on the unsplit draws; the same values as np.quantile over axes (0, 1), read
            # off each sample's draws sorted in one contiguous row (:func:`_sorted_quantiles`). With an even number
            # of draws the split draws are all of them, so their sorted rows serve
            unsplit = ordered if draws == 2 * half else np.sort(sub, axis=1).astype(np.float64, copy=False)
            qs = _sorted_quantiles(unsplit, (0.05, 0.95))
            split = flat.reshape(shape)
            out[ESS_TAIL][idx] = np.minimum(*(_tail_ess(azd, split, q) for q in qs))
    return out, const


def _constant_rows(flat: np.ndarray) -> np.ndarray:
    """(n,) bool: each row of ``flat`` (n, values) holds one value (False for an empty row)."""
    if flat.shape[1] == 0:
        return np.zeros(flat.shape[0], dtype=bool)
    return (flat == flat[:, :1]).all(axis=1)


def _normal_scores(rows: np.ndarray, shape: tuple[int, int, int], *, fold: bool = True
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """arviz-stats' rank normalization of each row of ``rows`` (m, c x d) without NaN, float32 or float64: (``z``
    (m, c, d) float64 of ``shape`` (:func:`_z_rows`' values), the same of the fold (:func:`_z_fold_rows`' values;
    None without ``fold``), the rows sorted (m, c x d) float64).

    :func:`bif.quality.kernels.normal_scores` sorts each row once and reads both rankings off it (the fold's by merging
    the two sides of the median): 1,310 samples x 200 float32 draws took 3.4 ms against 6.2 ms for two bottleneck
    ``rankdata`` calls and a sort (session 29). Rows with an infinite value take :func:`_z_rows` and
    :func:`_z_fold_rows`. The test compares every output with theirs bit for bit.
    """
    from bif.quality.kernels import normal_scores

    m, c, d = shape
    z, z_fold, ordered, finite = normal_scores(rows, _score_table(c * d), fold=fold)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        sub = rows[bad]
        ordered[bad] = np.sort(sub, axis=1)
        z[bad] = _z_rows(sub, (bad.size, c, d)).reshape(bad.size, c * d)
        if fold:
            with np.errstate(invalid="ignore"):  # |inf - an infinite median| is NaN, as in ArviZ (which warns)
                folded = _z_fold_rows(sub.astype(np.float64), ordered[bad], (bad.size, c, d))
            z_fold[bad] = folded.reshape(bad.size, -1)
    return z.reshape(shape), (z_fold.reshape(shape) if fold else None), ordered


def _score_table(k: int) -> np.ndarray:
    """(2 k + 1,) float64: the normal score of each possible rank r of k values (whole or half numbers in [1, k],
    at index 2 r): Blom's ``(r - 3/8) / (k - 3/4 + 1)``, then ``scipy.special.ndtri`` (``scipy.stats.norm.ppf``),
    the same float64 input as ArviZ's for each draw, so the same values."""
    from scipy.special import ndtri

    return ndtri((np.arange(2 * k + 1) / 2 - 3 / 8) / (k - 2 * 3 / 8 + 1))


def _z_scale(split: Any, rank_dtype: Any = np.float64) -> Any:
    """arviz-stats' rank normalization (``azd._z_scale``) of split (chain, draw, sample) draws, same values, as a
    (chain, draw, sample) DataArray: :func:`_normal_scores` on the rows of :func:`_sample_rows` in ``rank_dtype``.
    The test checks the values against ``azd._z_scale``; :func:`rhat_ess` calls :func:`_normal_scores` on its rows
    directly."""
    rows, (c, d, m) = _sample_rows(split, rank_dtype)
    return _as_split_array(_normal_scores(rows, (m, c, d), fold=False)[0])


def _z_fold(split: Any, rank_dtype: Any = np.float64) -> Any:
    """arviz-stats' ``azd._z_fold`` of split (chain, draw, sample) draws as a (chain, draw, sample) DataArray:
    :func:`_normal_scores`' fold scores (the test checks them against ``azd._z_fold``)."""
    rows, (c, d, m) = _sample_rows(split, rank_dtype)
    return _as_split_array(_normal_scores(rows, (m, c, d))[1])


def _z_fold_rows(rows: np.ndarray, ordered: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """arviz-stats' ``azd._z_fold`` of float64 ``rows`` (m, c x d): |draws - their median over (chain, draw)|, in
    float64 as ArviZ computes it, rank-normalized (:func:`_z_rows`). ``ordered``: the rows sorted (float64), whose
    median is read off them (:func:`_sorted_median`)."""
    return _z_rows(np.abs(rows - _sorted_median(ordered)), shape)


def _sorted_median(ordered: np.ndarray) -> np.ndarray:
    """``np.median(ordered, axis=1, keepdims=True)`` of rows already sorted, the same values without numpy's
    partition: the middle element, or the mean of the two middle ones as numpy takes it ((a + b) / 2)."""
    k = ordered.shape[1]
    if k % 2:
        return ordered[:, k // 2:k // 2 + 1].copy()
    return (ordered[:, k // 2 - 1:k // 2] + ordered[:, k // 2:k // 2 + 1]) / 2


def _sorted_quantiles(ordered: np.ndarray, q: tuple[float, ...]) -> np.ndarray:
    """``np.quantile(ordered, q, axis=1)`` (method "linear") of float64 rows already sorted, without NaN: (len(q),
    rows), the same values by numpy's own steps (numpy 2's ``_quantile``: the virtual index (n - 1) q, its floor and
    the next index, gamma = index - floor, and ``_lerp``: a + (b - a) gamma, or b - (b - a)(1 - gamma) where
    gamma >= 0.5), read off the sorted rows instead of numpy's partition of them. That partition ran along the
    strided axis of the (draws, samples) view numpy moves the axis to: 3-4 ms of a 28 ms pass of 1,310 samples x
    200 draws (session 28). The test compares with np.quantile, bit for bit."""
    n = ordered.shape[1]
    virtual = (n - 1) * np.asarray(q, dtype=np.float64)
    prev = np.floor(virtual)
    gamma = (virtual - prev)[:, None]
    lo = np.minimum(prev, n - 1).astype(np.intp)  # numpy: an index at or past the last takes the last value
    hi = np.where(virtual >= n - 1, n - 1, prev + 1).astype(np.intp)
    a, b = ordered[:, lo].T, ordered[:, hi].T  # (len(q), rows)
    diff = b - a
    out = a + diff * gamma
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    return out


def _sample_rows(split: Any, dtype: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Split (chain, draw, sample) draws as contiguous (sample, chain x draw) rows of ``dtype``, and (c, d, m)."""
    values = np.asarray(split.transpose("chain", "draw", "sample").values)
    c, d, m = values.shape
    return np.ascontiguousarray(values.reshape(c * d, m).T, dtype=dtype), (c, d, m)


def _as_split_array(z: np.ndarray) -> Any:
    """(sample, chain, draw) values as a (chain, draw, sample) DataArray."""
    import xarray as xr

    return xr.DataArray(z.transpose(1, 2, 0), dims=("chain", "draw", "sample"))


def _z_rows(rows: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """arviz-stats' rank normalization of each row of ``rows`` (m, c x d): (m, c, d) float64 of ``shape``.

    ArviZ's definition: ranks over (chain, draw) (``scipy.stats.rankdata``, ties averaged), Blom's
    back-transform ``(r - 3/8) / (S - 3/4 + 1)``, then the standard normal quantile (``scipy.special.ndtri``,
    what ``scipy.stats.norm.ppf`` evaluates). arviz-stats reaches them through xarray-einstats, which
    ranks a strided view in float64; here each sample's draws are one contiguous row, ranked in its
    dtype: float32 where the traces are float32, whose ranks and ties are those of their float64 copies
    (the conversion is exact). The ranks come from bottleneck's ``rankdata`` (C; the same average ranks as
    scipy's, 4.5x faster: 0.19 vs 0.86 s on 1,897 samples x 2,000 draws).

    The passes use :func:`_normal_scores` (one sort for both rankings); this is its path for rows with an infinite
    value, and the reference its test compares with.
    """
    from bottleneck import rankdata

    m, c, d = shape
    # ranks are whole or half numbers (ties averaged) in [1, c d]: the normal quantile of each possible rank once
    # (_score_table), then looked up
    ranks = rankdata(rows, axis=1)
    ranks *= 2
    return _score_table(c * d).take(ranks.astype(np.intp)).reshape(m, c, d)


def _ess_of_centred(azd: Any, centred: np.ndarray, chain_mean: np.ndarray) -> np.ndarray:
    """``azd._ess`` of (sample, chain, draw) float64 draws, none constant, already centred per chain (C-contiguous,
    overwritten), given their chain means (sample, chain): (sample,) ESS, the same values.

    arviz-stats' own steps on plain arrays: each chain's autocovariance by FFT (``azd.autocov``: centred per chain,
    ``rfft`` at ``next_fast_len(2 draws)``, times its conjugate (here re² + im², the same to ~1e-14: see
    :func:`bif.quality.kernels.power_spectrum`), ``irfft``, the first ``draws`` lags over draws), its compiled
    ``geyer`` gufunc for Geyer's initial monotone sequence, and its floor on tau. Its xarray wrappers moved the draw
    axis last and back for every call (``apply_ufunc``); here each sample's chains are contiguous rows throughout:
    36 -> 13 ms of a 2,048-sample diagnostics job. The steps around the FFTs are compiled
    (:mod:`bif.quality.kernels`: numpy's values, one pass each; 3.8 -> 3.3 ms for 1,310 samples x 4 x 50).
    The test compares with ArviZ (rtol 1e-10).
    """
    from bif.quality.kernels import first_lags, power_spectrum

    _, c, d = centred.shape
    n = azd.next_fast_len(2 * d)
    spectrum = np.ascontiguousarray(np.fft.rfft(centred, n=n, axis=2))
    power_spectrum(spectrum)
    acov = first_lags(np.ascontiguousarray(np.fft.irfft(spectrum, n=n, axis=2)), d)  # (sample, chain, lag)
    term = chain_mean.var(axis=1, ddof=1) if c > 1 else 0.0
    tau = azd.geyer(acov, term)
    floor = 1 / np.log10(c * d)
    return (c * d) / np.where(tau > floor, tau, floor)


def _tail_ess(azd: Any, split: np.ndarray, q: np.ndarray) -> np.ndarray:
    """ArviZ's ESS of the indicators ``draws <= q`` of split (sample, chain, draw) draws, ``q`` (sample,): the ESS
    of the tail quantile q. ArviZ splits the indicators of the unsplit draws: the same elements as the indicators
    of the split draws (float32 draws compare with the float64 quantile as float64). A sample whose indicators
    do not vary has ESS = its number of draws (ArviZ's rule for a constant array). The indicators are made
    centred in one pass (:func:`bif.quality.kernels.centred_indicators`, numpy's values)."""
    from bif.quality.kernels import centred_indicators

    m, c, d = split.shape
    centred, chain_mean, varying = centred_indicators(split, q)
    res = np.full(m, float(c * d))
    if varying.all():
        res[:] = _ess_of_centred(azd, centred, chain_mean)
    elif varying.any():
        res[varying] = _ess_of_centred(azd, centred[varying], chain_mean[varying])
    return res


def _split_diagnostics(traces: np.ndarray, *, split: str, start: int = 0) -> pd.DataFrame:
    """ArviZ rank R-hat and bulk / tail ESS of ``traces`` (chains, draws, n): one row per sample."""
    return _rows_diagnostics(np.moveaxis(np.asarray(traces), 2, 0), split=split, start=start)[0]


def _rows_diagnostics(rows: np.ndarray, *, split: str, start: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """:func:`_split_diagnostics` of (n, chains, draws) traces, and which samples are constant ((n,) bool)."""
    n = rows.shape[0]
    raw, const = _rhat_ess_rows(rows)
    rhat, bulk, tail = (np.where(const, np.nan, raw[k]) for k in (RHAT, ESS_BULK, ESS_TAIL))
    frame = pd.DataFrame({S.SPLIT: pd.Categorical.from_codes(np.full(n, list(S.SPLITS).index(split), np.int8),
                                                              categories=list(S.SPLITS)),
                          S.SAMPLE: np.arange(start, start + n, dtype=np.int64),
                          RHAT: rhat, ESS_BULK: bulk, ESS_TAIL: tail, S.CONSTANT: const})
    return frame, const


def constant_traces(traces: np.ndarray) -> np.ndarray:
    """(n,) bool: the trace of each sample in ``traces`` (chains, draws, n) has one value at every draw."""
    t = np.asarray(traces)
    return _constant_rows(np.moveaxis(t, 2, 0).reshape(t.shape[2], t.shape[0] * t.shape[1]))


def loss_diagnostics(train: np.ndarray, query: np.ndarray, *, train_start: int = 0, query_start: int = 0
                     ) -> pd.DataFrame:
    """Rank R-hat, bulk ESS and tail ESS of every sample's loss trace.

    ``train`` (chains, draws, n_train) and ``query`` (chains, draws, n_query). Returns one
    row per sample with columns split, sample, rhat, ess_bulk, ess_tail, constant (sample ids
    start at ``train_start`` / ``query_start``). R-hat is NaN with a single chain; rhat and
    both ESS are NaN for a constant trace (``constant`` True).
    """
    for name, a in (("train", train), ("query", query)):
        if a.ndim != 3:
            raise ValueError(f"{name} traces must be (chains, draws, n), got shape {a.shape}")
    parts = [_split_diagnostics(a, split=split, start=s)
             for a, split, s in ((train, S.TRAIN, train_start), (query, S.QUERY, query_start)) if a.shape[2]]
    return pd.concat(parts, ignore_index=True) if parts else _empty_frame()


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame({S.SPLIT: pd.Categorical([], categories=list(S.SPLITS)), S.SAMPLE: np.zeros(0, np.int64),
                         RHAT: np.zeros(0), ESS_BULK: np.zeros(0), ESS_TAIL: np.zeros(0),
                         S.CONSTANT: np.zeros(0, dtype=bool)})[list(DIAGNOSTICS_COLUMNS)]


def _batch_means_state(train: np.ndarray, query: np.ndarray, num_batches: int
                       ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(K, Σ_b m_b, Σ_b m_b², C) of the batch means m_b (n_train, n_query) of z, accumulated in float64.

    C = Σ_b L_b m_b is the comoment (Σ over all draws of z), so the BIF costs no extra GEMM.
    Σ_b m_b and C are one GEMM over all draws. For short batches (L <= 15 draws, the usual
    case) Σ_b m_b² is one GEMM too, through the identity
    (Σ_{t in b} x_t y_tᵀ)²_ij = Σ_{t, s in b} (x_t x_s)_i (y_t y_s)_j over the L(L+1)/2 pairs
    t <= s of each batch (products of draws, elementwise); longer batches take one GEMM per
    batch and accumulate its square in place.
    """
    chains, draws = train.shape[:2]
    if draws < num_batches:
        raise ValueError(f"need at least num_batches={num_batches} draws per chain for batch means, got {draws}")
    x = np.asarray(train, dtype=np.float64)
    y = np.asarray(query, dtype=np.float64)
    xc = x - x.mean(axis=(0, 1))  # (C, D, a), centred at the pooled means
    yc = y - y.mean(axis=(0, 1))  # (C, D, b)
    a, b = x.shape[2], y.shape[2]
    bounds = np.cumsum([0] + [len(i) for i in np.array_split(np.arange(draws), num_batches)])
    lengths = np.diff(bounds)  # (num_batches,) draws per batch
    w = np.repeat(1.0 / lengths, lengths)  # (D,) 1 / L of each draw's batch
    xf = xc.reshape(chains * draws, a)
    both = xf.T @ np.concatenate([(yc * w[None, :, None]).reshape(-1, b), yc.reshape(-1, b)], axis=1)  # (a, 2b)
    total, comoment = both[:, :b], both[:, b:]
    total_sq = np.zeros((a, b))
    for length in np.unique(lengths):
        starts = bounds[:-1][lengths == length]
        take = (starts[:, None] + np.arange(length)[None, :]).ravel()
        xb = xc[:, take].reshape(-1, length, a)  # (K', L, a)
        yb = yc[:, take].reshape(-1, length, b)  # (K', L, b)
        if length <= 15:
            iu, ju = np.triu_indices(length)
            weight = np.where(iu == ju, 1.0, 2.0) / float(length * length)  # pairs t < s stand for (t, s) and (s, t)
            u = (xb[:, iu] * xb[:, ju]).reshape(-1, a)  # (K' P, a)
            v = (yb[:, iu] * yb[:, ju] * weight[None, :, None]).reshape(-1, b)  # (K' P, b)
            total_sq += u.T @ v
        else:
            for k in range(xb.shape[0]):
                m = xb[k].T @ yb[k]  # (a, b): L x the batch mean
                m *= m
                total_sq += m / float(length * length)
    return chains * num_batches, total, total_sq, comoment


def bif_mcse(train: np.ndarray, query: np.ndarray, *, num_batches: int = 10) -> np.ndarray:
    """Batch-means Monte-Carlo standard error of BIF(i, j), shape (n_train, n_query); see the module docstring.

    ``train`` (chains, draws, n_train) and ``query`` (chains, draws, n_query) hold per-sample
    losses, pooled over chains as the "stack" BIF is. Cost: one GEMM per batch, as much as
    the BIF itself.
    """
    if train.ndim != 3 or query.ndim != 3 or train.shape[:2] != query.shape[:2]:
        raise ValueError(f"expected (chains, draws, n) arrays with equal leading dims, got {train.shape}, {query.shape}")
    return _mcse_and_comoment(train, query, num_batches)[0]


def _mcse_and_comoment(train: np.ndarray, query: np.ndarray, num_batches: int) -> tuple[np.ndarray, np.ndarray]:
    """(MCSE of BIF (a, b), comoment Σ_t (x_t - x̄)(y_t - ȳ) (a, b)) from one pass of batch means."""
    k, total, total_sq, comoment = _batch_means_state(train, query, num_batches)
    var = np.maximum(total_sq - total * total / k, 0.0) / (k - 1)  # sample variance of the batch means
    return np.sqrt(var / k), comoment


def _quantiles(values: np.ndarray, *, low_is_bad: bool) -> dict[str, float | None]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"q05": None, "q50": None, "q95": None, "min" if low_is_bad else "max": None}
    # one call for the three: one partition at three cuts (the same values as three calls, 1.7x faster)
    qs = {f"q{int(q * 100):02d}": float(x) for q, x in zip(_QUANTILES, np.quantile(v, _QUANTILES))}
    return qs | ({"min": float(v.min())} if low_is_bad else {"max": float(v.max())})


def summarize(diag: pd.DataFrame, *, rhat_threshold: float = RHAT_THRESHOLD) -> dict[str, Any]:
    """Quantiles of R-hat / ESS and the count of samples above ``rhat_threshold`` (JSON-able, for the manifest).

    Constant traces (``constant``) are counted per split under ``constant_traces``; their
    NaN R-hat / ESS are in neither the quantiles nor ``num_rhat_nan``.
    """
    rhat = diag[RHAT].to_numpy(dtype=np.float64)
    const = (diag[S.CONSTANT].to_numpy(dtype=bool) if S.CONSTANT in diag.columns
             else np.zeros(len(diag), dtype=bool))
    counts = {}
    for s in S.SPLITS:
        in_split = (diag[S.SPLIT] == s).to_numpy()
        n, c = int(in_split.sum()), int((const & in_split).sum())
        counts[s] = {"count": c, "total": n, "share": c / n if n else 0.0}
    return {
        "num_samples": {s: int((diag[S.SPLIT] == s).sum()) for s in S.SPLITS},
        "rhat": _quantiles(rhat, low_is_bad=False),
        "ess_bulk": _quantiles(diag[ESS_BULK].to_numpy(dtype=np.float64), low_is_bad=True),
        "ess_tail": _quantiles(diag[ESS_TAIL].to_numpy(dtype=np.float64), low_is_bad=True),
        "rhat_threshold": rhat_threshold,
        "num_rhat_above_threshold": int(np.sum(rhat > rhat_threshold)),
        "num_rhat_nan": int(np.sum(~np.isfinite(rhat) & ~const)),
        "constant_traces": counts,
    }


def _read_rows(store: Any, files: list[Any], *, split: str, start: int, stop: int, num_chains: int) -> np.ndarray:
    """Traces of samples [start, stop) of ``split`` as rows, (stop - start, chains, draws) in the files' dtype (float32
    traces stay float32), each chain cut to the shortest chain's draws.

    The files store each sample's draws in a row (``by_variable``): one open and footer parse per file, and
    one copy into place, where reading them as (draws, samples) float64 and transposing them took twice as long
    (6.5 vs 3.2 ms for 2,048 samples of 2 chains x 2 files of 50 draws).
    """
    per_chain: list[list[np.ndarray]] = [[] for _ in range(num_chains)]
    for ref in files:
        per_chain[ref.chain].append(store.read_loss_ranges(ref, {split: (start, stop)}, by_variable=True)[split])
    parts = [p for p in per_chain if p]
    draws = min(sum(a.shape[1] for a in p) for p in parts)
    out = np.empty((stop - start, len(parts), draws), dtype=np.result_type(*(a.dtype for p in parts for a in p)))
    for c, chain_parts in enumerate(parts):
        d0 = 0
        for a in chain_parts:
            take = min(a.shape[1], draws - d0)
            if take <= 0:
                break
            out[:, c, d0:d0 + take] = a[:, :take]
            d0 += take
    return out


def _pair_mcse(train: np.ndarray, query: np.ndarray, ti: np.ndarray, qj: np.ndarray, num_batches: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(MCSE, BIF) of the pairs (ti[p], qj[p]) only, each (P,): the batch means of z of those pairs, as bif_mcse
    computes them for all pairs (O(P x draws) work instead of a GEMM per pair of blocks). ``train`` (chains,
    draws, a), ``query`` (chains, draws, b); :func:`_pair_mcse_rows` on their rows."""
    chains, draws = train.shape[:2]
    return _pair_mcse_rows(_centred_rows(np.moveaxis(np.asarray(train), 2, 0)),
                           _centred_rows(np.moveaxis(np.asarray(query), 2, 0)), ti, qj, chains, draws, num_batches)


def _centred_rows(rows: np.ndarray) -> np.ndarray:
    """(n, chains, draws) traces as (n, chains x draws) float64 rows, each centred at its pooled mean (a copy)."""
    x = rows.reshape(rows.shape[0], -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    return x


def _pair_mcse_rows(x: np.ndarray, y: np.ndarray, ti: np.ndarray, qj: np.ndarray, chains: int, draws: int,
                    num_batches: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_pair_mcse` of centred rows (:func:`_centred_rows`) ``x`` (a, chains x draws), ``y`` (b, ...).

    Each pair reads two contiguous rows; :func:`bif.block_ops.pair_batch_means` (numba) sums each pair's products
    per batch in one pass, without the (pairs, draws) products numpy formed (12 -> 5 ms for 8,192 pairs x 200
    draws, the centring included).
    """
    from bif.block_ops import pair_batch_means

    starts = np.cumsum([0] + [len(i) for i in np.array_split(np.arange(draws), num_batches)])[:-1]
    lengths = np.diff(np.r_[starts, draws])
    cuts = (np.arange(chains)[:, None] * draws + starts[None, :]).ravel()  # batch starts along chains·draws
    inv_len = np.tile(1.0 / lengths, chains)  # (chains·num_batches,)
    mcse, total_z = pair_batch_means(x, y, ti, qj, cuts, inv_len)
    return mcse, -total_z / (chains * draws - 1)


def _diagnose_train_block(job: tuple) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, int, int, int]:
    """Diagnostics and MCSE of one block of train samples (a picklable unit of work for map_fn).

    Returns (frame, MCSE and |BIF| / MCSE of the kept pairs, pairs among them with |BIF| > 2 MCSE, number of
    kept pairs, number of defined pairs). The kept pairs are all defined pairs when there are at most ``keep``,
    else a seeded uniform sample of ``keep`` of them; only their MCSE is computed.
    """
    store, files, start, stop, num_chains, query, num_batches, keep, seed = job
    rows = _read_rows(store, files, split=S.TRAIN, start=start, stop=stop, num_chains=num_chains)  # (n, C, D)
    frame, const = _rows_diagnostics(rows, split=S.TRAIN, start=start)
    empty = np.array([])
    chains, draws = rows.shape[1:]
    if not query.shape[0] or draws < num_batches:
        return frame, empty, empty, 0, 0, 0
    # pairs with a constant trace (BIF = MCSE = 0) carry no information: left out of the summary
    ti_all, qj_all = np.flatnonzero(~const), np.flatnonzero(~_constant_rows(query.reshape(query.shape[0], -1)))
    defined = ti_all.size * qj_all.size
    rng = np.random.default_rng([seed, start])
    pick = (np.arange(defined) if defined <= keep else np.sort(rng.choice(defined, size=keep, replace=False)))
    if pick.size == defined:
        # every defined pair: the batch means by GEMMs (bif_mcse's way) cost far less than gathering each pair's
        # products (digits, 1,697 x 100 pairs x 2 x 1,000 draws: 0.18 s against 1.8 s, 7.8 s before the rows)
        train = np.moveaxis(rows[ti_all], 0, 2)  # (chains, draws, kept samples)
        sub_mcse, comoment = _mcse_and_comoment(train, np.moveaxis(query[qj_all], 0, 2), num_batches)
        mcse, bif = sub_mcse.ravel(), -comoment.ravel() / (chains * draws - 1)
    else:
        mcse, bif = _pair_mcse_rows(_centred_rows(rows), _centred_rows(query),
                                    ti_all[pick // qj_all.size], qj_all[pick % qj_all.size], chains, draws,
                                    num_batches)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.abs(bif) / mcse
    return frame, mcse, snr, int(np.sum(snr > 2)), int(pick.size), int(defined)


def _diagnose_job(job: tuple) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, int, int, int]:
    """One unit of :func:`write_diagnostics`' map: ``(QUERY, rows)`` (the query split's diagnostics) or
    ``(TRAIN, block job)`` (:func:`_diagnose_train_block`); both return its 6-tuple."""
    kind, payload = job
    if kind == S.QUERY:
        empty = np.array([])
        return _rows_diagnostics(payload, split=S.QUERY)[0], empty, empty, 0, 0, 0
    return _diagnose_train_block(payload)


def _concat_frames(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """``pd.concat(frames, ignore_index=True)`` of :func:`_split_diagnostics` frames, column by column: their
    ``split`` columns all have the categories ``S.SPLITS``, which pandas' concat unioned frame by frame (13 -> 2 ms
    for the 26 frames of a 50k-sample run)."""
    if not frames:
        return _empty_frame()
    cols = {c: np.concatenate([f[c].to_numpy() for f in frames]) for c in frames[0].columns if c != S.SPLIT}
    codes = np.concatenate([f[S.SPLIT].cat.codes.to_numpy() for f in frames])
    cols[S.SPLIT] = pd.Categorical.from_codes(codes, categories=list(S.SPLITS))
    return pd.DataFrame(cols)[list(frames[0].columns)]


#: Loss values (chains x draws x samples) a diagnostics block holds by default (:func:`default_block_samples`).
BLOCK_VALUES = 1 << 20
_BLOCK_SAMPLES_RANGE = (512, 8192)


def default_block_samples(values_per_sample: int) -> int:
    """Samples per diagnostics block when the config leaves it open: the largest power of two whose block holds
    at most :data:`BLOCK_VALUES` loss values (``values_per_sample`` = chains x draws), within 512 to 8,192.

    Each block costs a fixed few ms (4 file opens per chain, a few hundred numpy calls): at 2 chains x 100 draws
    a sample cost 53 us in blocks of 512 (the fixed default until session 24) and 37-39 us in blocks of 4,096;
    long chains keep small blocks (2 chains x 1,000 draws: 512), whose float64 temporaries stay ~8 MiB.
    """
    low, high = _BLOCK_SAMPLES_RANGE
    fit = BLOCK_VALUES // max(1, int(values_per_sample))
    return int(min(high, max(low, 1 << max(0, fit.bit_length() - 1))))


def _block_bounds(n: int, block: int) -> list[tuple[int, int]]:
    """[start, stop) of the train blocks of :func:`write_diagnostics`: blocks of ``block`` samples, then the last
    ``block`` to ``2 block`` samples in about equal blocks of at most a quarter block (or of min(block, 128)
    samples, when more). Dask hands blocks to whichever worker is free, so the workers finish within a quarter
    block of each other; a whole last block used to run while the other workers idled (4,096 samples of
    2 x 100 draws: ~0.13 s)."""
    if n <= block:
        return [(0, n)] if n > 0 else []
    full = n // block - 1
    bounds = [(i * block, (i + 1) * block) for i in range(full)]
    start = full * block
    pieces = -(-(n - start) // max(block // 4, min(block, 128)))
    cuts = [start + round(i * (n - start) / pieces) for i in range(pieces + 1)]
    return bounds + list(zip(cuts[:-1], cuts[1:]))


def write_diagnostics(output_uri: str, storage_options: Mapping[str, Any] | None, *, num_chains: int,
                      max_samples: int | None = None, block_samples: int | None = None, num_batches: int = 10,
                      rhat_threshold: float = RHAT_THRESHOLD, seed: int = 0, map_fn: Callable | None = None) -> dict[str, Any]:
    """Diagnose a run's traces, write ``<output>/diagnostics.parquet`` and return a JSON-able summary.

    Train samples are diagnosed in blocks through ``map_fn`` (default ``map``; pass e.g.
    ``lambda f, xs: client.gather(client.map(f, list(xs)))`` to spread blocks over Dask workers).

    Reads ``block_samples`` samples of every chain at a time (memory ~ chains x draws x
    block_samples x 8 bytes, plus the query traces; None: :func:`default_block_samples`).
    ``max_samples`` limits each split to its
    first samples. R-hat and ESS cover every sample. The MCSE summary (quantiles over train x
    query pairs, and the fraction of pairs with |BIF| > 2 MCSE) is computed over all defined
    pairs when there are at most about 200,000, else over a seeded uniform sample of about
    200,000 of them (``num_pairs_evaluated``; the fraction's standard error is then at most
    0.0012): only those pairs' batch means are formed, O(pairs x draws), instead of a batch-means
    GEMM over every pair, which cost several times the covariance itself.
    """
    from bif.store.run import RunStore

    t0 = time.perf_counter()
    store = RunStore(output_uri, storage_options or {})
    files = store.blocks(num_chains=num_chains)
    if not files:
        raise FileNotFoundError(f"no committed trace blocks under {output_uri!r}/{S.TRACES_DIR}; run the sampler first")
    layout = store.read_layout(files[0])
    cap = (lambda n: n) if max_samples is None else (lambda n: min(n, max_samples))
    n_train, n_query = cap(layout.n_train), cap(layout.n_query)
    if block_samples is None:  # the draws of every chain: the blocks' draws (each file of a run holds as many)
        block_samples = default_block_samples(layout.num_draws * len(files))
    # (n_query, chains, draws) in the files' dtype: every job gets them (float32 traces: half the bytes of float64)
    query = _read_rows(store, files, split=S.QUERY, start=0, stop=n_query, num_chains=num_chains)
    # the query split's R-hat / ESS is a job like the train blocks: with a Dask map_fn, this process never
    # loads arviz-stats, numba or scipy.stats (~3-5 s of a core in `bif run`'s command; its workers have them).
    # Each block keeps pairs for the MCSE quantiles in proportion to its samples (a uniform sample of ~200,000)
    jobs = ([(S.QUERY, query)] if n_query else []) + [
        (S.TRAIN, (store, files, start, stop, num_chains, query, num_batches,
                   max(1, 200_000 * (stop - start) // max(1, n_train)), seed))
        for start, stop in _block_bounds(n_train, block_samples)]
    frames, mcse_kept, snr_kept, n_sig, n_kept, n_pairs = [], [], [], 0, 0, 0
    for frame, mcse_pick, snr_pick, sig, kept, pairs in (map_fn or map)(_diagnose_job, jobs):
        frames.append(frame)
        mcse_kept.append(mcse_pick)
        snr_kept.append(snr_pick)
        n_sig += sig
        n_kept += kept
        n_pairs += pairs
    diag = _concat_frames(frames)
    store.write_diagnostics(diag)
    summary = summarize(diag, rhat_threshold=rhat_threshold)
    summary["num_chains"] = int(query.shape[1]) if n_query else num_chains
    summary["num_draws_per_chain"] = int(query.shape[2]) if n_query else None
    mcse_all = np.concatenate(mcse_kept) if mcse_kept else np.array([])
    snr_all = np.concatenate(snr_kept) if snr_kept else np.array([])
    summary["bif_mcse"] = {"method": MCSE_METHOD, "num_batches": num_batches, "num_pairs": n_pairs,
                           **_quantiles(mcse_all, low_is_bad=False),
                           "abs_bif_over_mcse": _quantiles(snr_all, low_is_bad=True),
                           "frac_pairs_abs_bif_above_2_mcse": (n_sig / n_kept) if n_kept else None,
                           "num_pairs_evaluated": n_kept}
    summary["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return summary

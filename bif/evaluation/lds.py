"""Linear Datamodeling Score (LDS): how well attributions predict retraining outcomes.

Pure numpy / scipy: imports nothing from Prefect, Dask, torch or fsspec.

Protocol (Park et al. 2023, "TRAK", arXiv 2303.14186, Sec. 2). Draw M subsets S_1..S_M of
the training set, each of size ⌊α·n⌉, retrain on each with a few seeds, and measure every
query's output f_q(S_m) (here: its loss, averaged over seeds). A method's attribution
τ (n_train, n_query) predicts

    g_q(S_m) = Σ_{i ∈ S_m} τ[i, q],

and the LDS of query q is the Spearman rank correlation ρ_q = spearman_m(g_q(S_m), f_q(S_m)).
The overall LDS is the mean of ρ_q over queries, with standard error std(ρ)/√Q.

**Sign convention.** τ[i, q] > 0 means *including* train example i *raises* query q's
loss. This is the BIF's own sign (BIF = -Cov(ℓ_i, φ_q)). Every baseline in
:mod:`bif.evaluation.baselines` returns scores in this sign, so a correct method has a positive LDS
and a flipped sign shows up as a negative one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def subset_size(n_train: int, alpha: float) -> int:
    """Number of examples in each subset: round(α·n), at least 1 and at most n - 1."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}; the LDS default is 0.5")
    if n_train < 2:
        raise ValueError(f"need at least 2 training examples for subsets, got n_train={n_train}")
    return int(min(max(round(alpha * n_train), 1), n_train - 1))


def draw_subsets(n_train: int, *, num_subsets: int = 100, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Boolean masks (num_subsets, n_train) of random subsets of size round(α·n), without replacement.

    Subset m is drawn from ``SeedSequence([seed, m])`` alone, so it does not depend on
    ``num_subsets``: raising M keeps the first subsets (and their cached retrainings).
    """
    if num_subsets < 2:
        raise ValueError(f"num_subsets must be >= 2 for a rank correlation, got {num_subsets}")
    k = subset_size(n_train, alpha)
    masks = np.zeros((num_subsets, n_train), dtype=bool)
    for m in range(num_subsets):
        rng = np.random.default_rng(np.random.SeedSequence([seed, m]))
        masks[m, rng.choice(n_train, size=k, replace=False)] = True
    return masks


def retrain_seed(seed: int, subset: int, rep: int) -> int:
    """Training seed of repetition ``rep`` on subset ``subset``, derived from the root seed."""
    return int(np.random.SeedSequence([seed, subset, rep, 1]).generate_state(1, dtype=np.uint32)[0])


def predict_outputs(tau: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Datamodel predictions g (M, n_query) = masks (M, n_train) @ τ (n_train, n_query)."""
    tau = np.asarray(tau, dtype=np.float64)
    masks = np.asarray(masks)
    if tau.ndim != 2 or masks.ndim != 2 or masks.shape[1] != tau.shape[0]:
        raise ValueError(f"tau must be (n_train, n_query) and masks (M, n_train); got {tau.shape} and {masks.shape}")
    if not np.isfinite(tau).all():
        bad = np.argwhere(~np.isfinite(tau))[0]
        raise ValueError(f"tau has a non-finite value at (train={bad[0]}, query={bad[1]}); fix the attribution method")
    return masks.astype(np.float64) @ tau


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` (M, Q) with the same column of ``b`` -> (Q,).

    Ties get average ranks (bottleneck's ``rankdata``, as ``scipy.stats.rankdata``); a constant column, or one with
    a NaN in either array, gives NaN (as scipy's). Not scipy: ``scipy.stats`` took 1.1-1.4 s of ``bif lds``'s 6.6 s
    to import, for this alone; bottleneck (the diagnostics' ranks) 0.08 s.
    """
    from bottleneck import rankdata

    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (M, Q) arrays of equal shape, got {a.shape} and {b.shape}")
    nan = np.isnan(a).any(axis=0) | np.isnan(b).any(axis=0)  # bottleneck ranks a NaN last; scipy gives NaN
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    denom = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((denom > 0) & ~nan, (ra * rb).sum(axis=0) / np.where(denom > 0, denom, 1.0), np.nan)


@dataclass(frozen=True)
class GroundTruth:
    """Retrained query losses for the LDS: masks (M, n_train) and losses (M, seeds, n_query).

    Defined here, in a module of numpy alone, because it is a task argument (``bif calibrate``'s settings): the
    kept cluster's scheduler unpickles every task, and the module a class lives in is what it imports."""

    masks: np.ndarray
    losses: np.ndarray

    @property
    def outputs(self) -> np.ndarray:
        """Seed-averaged outputs (M, n_query)."""
        return self.losses.mean(axis=1)


@dataclass(frozen=True)
class LDSResult:
    """LDS of one method: per query, their mean, and its standard error."""

    per_query: np.ndarray  # (n_query,) float64, NaN where predictions or outputs are constant
    mean: float  # nanmean of per_query
    stderr: float  # nanstd(per_query, ddof=1) / sqrt(#finite)
    num_subsets: int

    @property
    def num_valid(self) -> int:
        return int(np.isfinite(self.per_query).sum())


def summarize(per_query: np.ndarray, num_subsets: int) -> LDSResult:
    """Mean and standard error (std with ddof=1 over √Q) of per-query LDS values, ignoring NaNs."""
    ok = np.isfinite(per_query)
    q = int(ok.sum())
    mean = float(per_query[ok].mean()) if q else float("nan")
    stderr = float(per_query[ok].std(ddof=1) / np.sqrt(q)) if q > 1 else float("nan")
    return LDSResult(per_query=per_query, mean=mean, stderr=stderr, num_subsets=num_subsets)


def lds(tau: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> LDSResult:
    """LDS of attribution τ (n_train, n_query) against measured ``outputs`` (M, n_query).

    ``outputs[m, q]`` is query q's loss after retraining on subset ``masks[m]``, averaged
    over seeds. τ must follow the module's sign convention (τ > 0: including i raises q's loss).
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    pred = predict_outputs(tau, masks)
    if outputs.shape != pred.shape:
        raise ValueError(f"outputs must be (M, n_query) = {pred.shape}, got {outputs.shape}")
    return summarize(spearman_columns(pred, outputs), masks.shape[0])


def mean_over_seeds(losses: np.ndarray) -> np.ndarray:
    """Average retrained losses (M, seeds, n_query) over seeds -> (M, n_query)."""
    if losses.ndim != 3:
        raise ValueError(f"expected (subsets, seeds, n_query) losses, got shape {losses.shape}")
    return losses.mean(axis=1)

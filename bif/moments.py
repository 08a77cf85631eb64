"""Mergeable cross-moments of two sets of variables: the state of the covariance reduction.

Pure numpy. A :class:`Moments` summarizes n draws of x (a variables) and y (b variables):

    n,  mean_x (a,),  mean_y (b,),  m2_x (a,) = Σ(x - x̄)²,  m2_y (b,),  comoment (a, b) = Σ(x - x̄)(y - ȳ)ᵀ.

``merge`` is Chan, Golub & LeVeque's (1979) pairwise update, exact in any order and
grouping, so a Dask tree reduction may take any shape (dask's own variance keeps the
same ``{n, mean, M2}`` state):

    δx = x̄_B - x̄_A,  δy = ȳ_B - ȳ_A,  n = n_A + n_B,
    C = C_A + C_B + δx δyᵀ · n_A n_B / n,    x̄ = x̄_A + δx · n_B / n.

The influence (Kreer et al. 2025) is ``BIF = -Cov = -C/(n - ddof)`` and the normalized
form ``-Corr = -C / sqrt(m2_x m2_yᵀ)``.

A constant trace (m2 = 0 exactly, e.g. a float32 cross-entropy that is 0.0 at every draw
of a confidently classified sample) has no correlation with anything: its covariance is
0, and we define its correlation as 0 too (never NaN), so the outputs stay finite.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Moments:
    """Cross-moment state of n draws of x (a,) and y (b,); float64 arrays (``comoment`` may be float32, see from_draws)."""

    n: int
    mean_x: np.ndarray  # (a,)
    mean_y: np.ndarray  # (b,)
    m2_x: np.ndarray  # (a,)
    m2_y: np.ndarray  # (b,)
    comoment: np.ndarray  # (a, b); float32 when from_draws ran its GEMM in float32 (a merge promotes to float64)

    @property
    def shape(self) -> tuple[int, int]:
        return self.comoment.shape


def from_draws(x: np.ndarray, y: np.ndarray, *, dtype: np.dtype | str | None = None) -> Moments:
    """Moments of draws ``x`` (n, a) and ``y`` (n, b), rows paired by draw. One GEMM.

    Means and m2 are computed in float64, and the draws centred in float64. ``dtype`` is the
    GEMM's (default float64): float32 halves its time and memory traffic, and the comoment
    then carries float32 rounding, about sqrt(n) x 6e-8 relative to sqrt(m2_x m2_y) (the
    scale of a correlation); ``tests/test_covariance.py`` bounds it against float64. Merges
    promote the comoment to float64.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of draws, got {x.shape[0]} and {y.shape[0]}")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mx, my = x.mean(axis=0), y.mean(axis=0)
    if x.shape[0]:  # a constant column's mean is its value exactly, so its m2 is exactly 0 (no rounding residue)
        mx = np.where(np.all(x == x[:1], axis=0), x[0], mx)
        my = np.where(np.all(y == y[:1], axis=0), y[0], my)
    xc, yc = x - mx, y - my  # (n, a), (n, b)
    gemm = np.dtype(dtype or np.float64)
    comoment = xc.T @ yc if gemm == np.float64 else xc.astype(gemm).T @ yc.astype(gemm)  # (a, b)
    return Moments(n=x.shape[0], mean_x=mx, mean_y=my, m2_x=np.einsum("ij,ij->j", xc, xc),
                   m2_y=np.einsum("ij,ij->j", yc, yc), comoment=comoment)


def merge(a: Moments, b: Moments) -> Moments:
    """Exact merge of two states over disjoint draws (see module docstring)."""
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    dx = b.mean_x - a.mean_x
    dy = b.mean_y - a.mean_y
    f = a.n * b.n / n
    return Moments(
        n=n,
        mean_x=a.mean_x + dx * (b.n / n),
        mean_y=a.mean_y + dy * (b.n / n),
        m2_x=a.m2_x + b.m2_x + dx * dx * f,
        m2_y=a.m2_y + b.m2_y + dy * dy * f,
        comoment=a.comoment + b.comoment + np.outer(dx * f, dy),
    )


def merge_all(states: Iterable[Moments]) -> Moments:
    """Merge any number of states left to right (the combine / aggregate step of a tree)."""
    it = iter(states)
    try:
        acc = next(it)
    except StopIteration:
        raise ValueError("merge_all needs at least one Moments state") from None
    for s in it:
        acc = merge(acc, s)
    return acc


def covariance(m: Moments, *, ddof: int = 1) -> np.ndarray:
    """Cov(x_i, y_j) = C_ij / (n - ddof), shape (a, b)."""
    if m.n - ddof <= 0:
        raise ValueError(f"need more than {ddof} draws for a covariance, got n={m.n}")
    return m.comoment / (m.n - ddof)


def constant(m2: np.ndarray) -> np.ndarray:
    """Which variables had a constant trace (m2 == 0 exactly): bool, same shape as ``m2``."""
    return np.asarray(m2) <= 0.0


def inv_sqrt(m2: np.ndarray) -> np.ndarray:
    """1 / sqrt(m2) in float64, 0 where m2 is 0: the factor of a constant trace's correlation, which is 0."""
    return 1.0 / np.sqrt(np.where(np.asarray(m2) > 0, m2, np.inf))


def correlation(m: Moments) -> np.ndarray:
    """Corr(x_i, y_j) = C_ij / sqrt(m2_x_i m2_y_j), shape (a, b); 0 where either trace is constant (m2 = 0)."""
    denom = np.sqrt(np.outer(m.m2_x, m.m2_y))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = m.comoment / denom
    corr[constant(m.m2_x), :] = 0.0
    corr[:, constant(m.m2_y)] = 0.0
    return np.clip(corr, -1.0, 1.0, out=corr)


def mean_of_covariances(states: Iterable[Moments], *, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-chain pooling: the averages of Cov and of Corr over states (one per chain)."""
    covs, corrs = [], []
    for s in states:
        covs.append(covariance(s, ddof=ddof))
        corrs.append(correlation(s))
    return np.mean(covs, axis=0), np.mean(corrs, axis=0)


def bif_in_memory(train: np.ndarray, query: np.ndarray, *, pooling: str = "stack", ddof: int = 1
                  ) -> tuple[np.ndarray, np.ndarray]:
    """BIF and normalized BIF from in-memory traces, without Dask or storage.

    ``train`` (chains, draws, n_train) and ``query`` (chains, draws, n_query) hold per-sample
    losses. Returns ``(bif, bif_corr)``, each (n_train, n_query): ``-Cov`` and ``-Corr``
    pooled over all chains' draws (``"stack"``) or averaged per chain (``"chain_mean"``);
    ``bif_corr`` is 0 where a trace is constant.
    """
    if train.ndim != 3 or query.ndim != 3 or train.shape[:2] != query.shape[:2]:
        raise ValueError(f"expected (chains, draws, n) arrays with equal leading dims, got {train.shape}, {query.shape}")
    states = [from_draws(train[c], query[c]) for c in range(train.shape[0])]
    if pooling == "stack":
        m = merge_all(states)
        return -covariance(m, ddof=ddof), -correlation(m)
    if pooling == "chain_mean":
        cov, corr = mean_of_covariances(states, ddof=ddof)
        return -cov, -corr
    raise ValueError(f"pooling must be 'stack' or 'chain_mean', got {pooling!r}")

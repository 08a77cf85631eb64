"""Bayesian linear regression: the one model whose localized BIF is known in closed form.

With ℓ_i(w) = ½(y_i - x_i·w)² and L_n the mean of ℓ over the n training rows, the
localized tempered posterior p(w) ∝ exp(-nβ·L_n(w) - γ/2‖w - w*‖²) is exactly Gaussian:

    P = (nβ/n)·XᵀX + γI,    μ = P⁻¹((nβ/n)·Xᵀy + γ·w*),    Σ = P⁻¹.

With r_i = y_i - x_i·μ and s_ij = x_iᵀ Σ x_j (for any two examples, train or query),

    Cov(ℓ_i, ℓ_j) = r_i r_j s_ij + ½ s_ij²,     BIF(i, j) = -Cov(ℓ_i, φ_j).

Full-batch SGLD with step ε has the same mean and the exact stationary covariance
Σ_ε = (P - εP²/4)⁻¹ (pass ``step_size`` to get it), so the closed form also covers the
discretization bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bif.problem import Problem


def per_sample_loss(model: nn.Module, batch) -> torch.Tensor:
    """½(y - x·w)² per row: batch = [x (B, d), y (B,)] -> (B,)."""
    x, y = batch
    return 0.5 * (y - model(x).squeeze(-1)) ** 2


@dataclass(frozen=True)
class LinearData:
    """Design matrices (float64) and the checkpoint w* of the linear problem."""

    x_train: np.ndarray  # (n, d)
    y_train: np.ndarray  # (n,)
    x_query: np.ndarray  # (m, d)
    y_query: np.ndarray  # (m,)
    w_star: np.ndarray  # (d,)


def make_data(n: int = 40, d: int = 4, m: int = 6, noise: float = 0.5, singular: bool = False,
              seed: int = 0) -> LinearData:
    """Seeded synthetic regression data. ``singular=True`` duplicates a column, so XᵀX is singular."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + m, d))
    if singular:
        x[:, -1] = x[:, 0]
    w_true = rng.normal(size=d)
    y = x @ w_true + noise * rng.normal(size=n + m)
    # w* = a ridge fit (not the posterior mean), so the residual term r_i r_j s_ij matters
    xt, yt = x[:n], y[:n]
    w_star = np.linalg.solve(xt.T @ xt + 1.0 * np.eye(d), xt.T @ yt) + 0.1 * rng.normal(size=d)
    return LinearData(x_train=xt, y_train=yt, x_query=x[n:], y_query=y[n:], w_star=w_star)


def build(n: int = 40, d: int = 4, m: int = 6, noise: float = 0.5, singular: bool = False, seed: int = 0,
          dtype: str = "float64") -> Problem:
    """The linear-regression problem (model = bias-free nn.Linear at w*)."""
    data = make_data(n=n, d=d, m=m, noise=noise, singular=singular, seed=seed)
    tdtype = getattr(torch, dtype)
    model = nn.Linear(d, 1, bias=False).to(tdtype)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(data.w_star, dtype=tdtype)[None, :])
    t = lambda a: torch.as_tensor(a, dtype=tdtype)  # noqa: E731
    return Problem(model=model.eval(), train=TensorDataset(t(data.x_train), t(data.y_train)),
                   query=TensorDataset(t(data.x_query), t(data.y_query)), loss=per_sample_loss,
                   loss_bounds=(0.0, float("inf")), extras={"data": data})


def posterior(data: LinearData, *, nbeta: float, gamma: float, step_size: float | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Mean μ (d,) and covariance Σ (d, d) of the localized posterior (or of SGLD's stationary law)."""
    n, d = data.x_train.shape
    prec = (nbeta / n) * data.x_train.T @ data.x_train + gamma * np.eye(d)
    mu = np.linalg.solve(prec, (nbeta / n) * data.x_train.T @ data.y_train + gamma * data.w_star)
    if step_size is not None:
        prec = prec - step_size * prec @ prec / 4.0
    return mu, np.linalg.inv(prec)


def loss_covariance(data: LinearData, *, nbeta: float, gamma: float, step_size: float | None = None) -> np.ndarray:
    """Cov(ℓ_i, φ_j) (n_train, n_query) under the localized posterior: r_i r_j s_ij + ½ s_ij²."""
    mu, sigma = posterior(data, nbeta=nbeta, gamma=gamma, step_size=step_size)
    r_t = data.y_train - data.x_train @ mu
    r_q = data.y_query - data.x_query @ mu
    s = data.x_train @ sigma @ data.x_query.T
    return np.outer(r_t, r_q) * s + 0.5 * s**2


def closed_form_bif(data: LinearData, *, nbeta: float, gamma: float, step_size: float | None = None) -> np.ndarray:
    """BIF(i, j) = -Cov(ℓ_i, φ_j), shape (n_train, n_query)."""
    return -loss_covariance(data, nbeta=nbeta, gamma=gamma, step_size=step_size)

"""GradDot and GradCos: TracIn (Pruthi et al. 2020, arXiv 2002.08484) at the final checkpoint only.

In the BIF's sign (τ > 0: including train i raises query q's loss):

    GradDot  τ[i, q] = -(1/n) · ∇φ_q(θ*) · ∇ℓ_i(θ*)          (the influence function with H = I)
    GradCos  τ[i, q] = -cos(∇φ_q(θ*), ∇ℓ_i(θ*))

A gradient step on ℓ_i changes φ_q by -η ∇φ_q·∇ℓ_i to first order, hence the minus sign.
"""
from __future__ import annotations

import time

import torch
import xarray as xr

from bif.evaluation.baselines.common import as_scores, flatten_model, per_sample_grads
from bif.problem import Problem


def _grads(problem: Problem, batch_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Train grads (n, P), query grads (Q, P), and the start time of the query-dependent part."""
    fm = flatten_model(problem.model, dtype)
    g_train = per_sample_grads(problem, fm, problem.train, batch_size=batch_size)
    t0 = time.perf_counter()
    return g_train, per_sample_grads(problem, fm, problem.query, batch_size=batch_size), t0


def graddot_scores(problem: Problem, *, batch_size: int = 256, dtype: torch.dtype = torch.float64) -> xr.DataArray:
    """GradDot τ (n_train, n_query) = -(1/n)·∇ℓ_i·∇φ_q, as a DataArray named ``"graddot"``."""
    g_train, g_query, t0 = _grads(problem, batch_size, dtype)  # (n, P), (Q, P)
    tau = -(g_train @ g_query.T) / g_train.shape[0]
    return as_scores(tau, name="graddot", attrs={"method": "graddot", "query_seconds": time.perf_counter() - t0})


def gradcos_scores(problem: Problem, *, batch_size: int = 256, dtype: torch.dtype = torch.float64,
                   eps: float = 1e-12) -> xr.DataArray:
    """GradCos τ (n_train, n_query) = -cos(∇ℓ_i, ∇φ_q), as a DataArray named ``"gradcos"``."""
    g_train, g_query, t0 = _grads(problem, batch_size, dtype)
    g_train = g_train / g_train.norm(dim=1, keepdim=True).clamp_min(eps)
    g_query = g_query / g_query.norm(dim=1, keepdim=True).clamp_min(eps)
    tau = -(g_train @ g_query.T)
    return as_scores(tau, name="gradcos", attrs={"method": "gradcos", "query_seconds": time.perf_counter() - t0})

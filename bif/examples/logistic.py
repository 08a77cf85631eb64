"""Tiny L2-regularized softmax regression whose ``fit`` is exact (Newton's method, float64).

The training objective is convex, so retraining has no seed noise and the classical
influence function is exact to first order:

    R(θ) = (1/n) Σ_i s_i · CE(W x_i + b, y_i) + (l2/2)·(‖W‖² + ‖b‖²),   s_i = 1 by default.

With damping λ = l2 the damped influence function of :mod:`bif.evaluation.baselines.influence`
uses exactly ∇²R. Used by the LDS, baseline and calibration tests.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from bif.problem import Problem


def per_sample_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy per sample: batch = [x (B, d), y (B,)] -> (B,)."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def newton_fit(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, l2: float,
               sample_weight: torch.Tensor | None = None, max_iter: int = 50, tol: float = 1e-12) -> nn.Linear:
    """Minimize R(θ) above by damped-free Newton steps; returns a float64 ``nn.Linear(d, k)``."""
    x = x.to(torch.float64)
    n, d = x.shape
    w = torch.ones(n, dtype=torch.float64) if sample_weight is None else sample_weight.to(torch.float64)
    theta = torch.zeros(num_classes * (d + 1), dtype=torch.float64)

    xt = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)  # (n, d+1)
    onehot = F.one_hot(y, num_classes).to(torch.float64)  # (n, k)
    eye = torch.eye(theta.numel(), dtype=torch.float64)
    # closed-form gradient and Hessian (no torch.func: its forward mode is not thread-safe)
    for _ in range(max_iter):
        wb = theta.view(num_classes, d + 1)
        p = torch.softmax(xt @ wb.T, dim=1)  # (n, k)
        g = ((w[:, None] * (p - onehot)).T @ xt / n).reshape(-1) + l2 * theta  # (k(d+1),)
        if float(g.norm()) < tol:
            break
        a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, k, k)
        h = torch.einsum("i,iab,ij,il->ajbl", w / n, a, xt, xt).reshape(theta.numel(), -1) + l2 * eye
        theta = theta - torch.linalg.solve(h, g)
    model = nn.Linear(d, num_classes).to(torch.float64)
    with torch.no_grad():
        wb = theta.view(num_classes, d + 1)
        model.weight.copy_(wb[:, :d])
        model.bias.copy_(wb[:, d])
    return model.eval()


def build(n: int = 60, d: int = 5, num_classes: int = 3, n_query: int = 12, l2: float = 0.05, seed: int = 0
          ) -> Problem:
    """Seeded synthetic softmax-regression problem; the model is the exact optimum on all of train."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + n_query, d))
    w_true = 1.5 * rng.normal(size=(d, num_classes))
    logits = x @ w_true
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(num_classes, p=row) for row in p])
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.int64)
    train = TensorDataset(xt[:n], yt[:n])
    query = TensorDataset(xt[n:], yt[n:])

    def fit(dataset: Dataset, fit_seed: int) -> nn.Module:  # the seed is irrelevant: the fit is exact
        xs, ys = dataset.tensors if isinstance(dataset, TensorDataset) else (
            torch.stack([dataset[i][0] for i in range(len(dataset))]),
            torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))]))
        return newton_fit(xs, ys, num_classes=num_classes, l2=l2)

    model = newton_fit(xt[:n], yt[:n], num_classes=num_classes, l2=l2)
    return Problem(model=model, train=train, query=query, loss=per_sample_loss, fit=fit,
                   extras={"l2": l2, "num_classes": num_classes})

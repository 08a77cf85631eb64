"""Built-in example: a small tabular regression MLP on scikit-learn's diabetes set (ships with sklearn).

A second data type for the calibrator and the LDS benchmark (``benchmarks/calibration.py``):
442 patients, 10 standardized features, a standardized disease-progression target; a
10 -> 32 -> 1 tanh MLP with a per-sample squared-error loss, trained with full-batch Adam
and weight decay. ``build(...)`` trains the checkpoint w* itself (cheap: ~0.2 s), so a
config needs no checkpoint file; ``fit`` retrains on a subset for ``bif lds``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bif.problem import Problem

NUM_QUERY = 100

#: What a Dask worker that runs this problem imports ahead of its first chain: scikit-learn's datasets
#: (``load_diabetes``), about 0.6 s of a core in each worker of every run otherwise; see
#: ``bif.flows.runtime.problem_preload``.
WORKER_PRELOAD = ("sklearn.datasets",)


def _load(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Diabetes as (X (442, 10) float32, y (442,) float32), both standardized, shuffled by ``seed``."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    order = np.random.default_rng(seed).permutation(len(d.target))
    x = d.data[order].astype(np.float64)
    y = d.target[order].astype(np.float64)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return x.astype(np.float32), y.astype(np.float32)


def make_model(hidden: int = 32, seed: int = 0) -> nn.Module:
    """10 -> hidden -> 1 tanh MLP with seeded init."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def per_sample_loss(model: nn.Module, batch) -> torch.Tensor:
    """Squared error per sample: batch = [x (B, 10), y (B,)] -> (B,)."""
    x, y = batch
    return (model(x).squeeze(-1) - y) ** 2


def train_model(model: nn.Module, ds: TensorDataset, *, epochs: int = 400, lr: float = 1e-2,
                weight_decay: float = 1e-2, seed: int = 0) -> nn.Module:
    """Full-batch Adam with L2 (``weight_decay``) on the mean squared error; deterministic for a seed. Trains in place."""
    torch.manual_seed(seed)
    x, y = ds.tensors
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        per_sample_loss(model, [x, y]).mean().backward()
        opt.step()
    return model.eval()


def build(n_train: int | None = None, n_query: int = NUM_QUERY, hidden: int = 32, seed: int = 0,
          train_epochs: int = 400) -> Problem:
    """The diabetes problem. Query = ``n_query`` held-out patients; train = the first ``n_train`` of the rest.

    The model is trained on train (``train_epochs`` full-batch Adam epochs, seed ``seed``); 0 leaves it
    freshly initialized (then load a checkpoint).
    """
    x, y = _load(seed)
    rest = len(y) - n_query
    n_train = rest if n_train is None else min(int(n_train), rest)
    train = TensorDataset(torch.from_numpy(x[:n_train]), torch.from_numpy(y[:n_train]))
    query = TensorDataset(torch.from_numpy(x[-n_query:]), torch.from_numpy(y[-n_query:]))
    model = make_model(hidden, seed)
    if train_epochs:
        train_model(model, train, epochs=train_epochs, seed=seed)

    def fit(dataset: TensorDataset, fit_seed: int) -> nn.Module:
        return train_model(make_model(hidden, fit_seed), dataset, epochs=train_epochs or 400, seed=fit_seed)

    def render(split: str, index: int) -> str:
        xs, ys = (train if split == "train" else query)[index]
        return f"target {float(ys):+.2f}; features " + " ".join(f"{v:+.1f}" for v in xs.tolist())

    return Problem(model=model.eval(), train=train, query=query, loss=per_sample_loss, fit=fit,
                   loss_bounds=(0.0, float("inf")), render=render)

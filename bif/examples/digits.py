"""Built-in example: a small MLP classifier on scikit-learn's 8x8 digits (ships with sklearn).

``build(...)`` is the problem factory named in ``examples/digits.yaml``;
``bif example digits <checkpoint>`` trains and saves the checkpoint it is sampled at.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from bif.problem import Problem

NUM_QUERY = 100

#: What a Dask worker that runs this problem imports ahead of its first chain: scikit-learn's datasets
#: (``load_digits``), about 0.6 s of a core in each worker of every run otherwise; see
#: ``bif.flows.runtime.problem_preload``.
WORKER_PRELOAD = ("sklearn.datasets",)


def _load(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits as (X standardized float32 (1797, 64), y int64, raw images (1797, 8, 8)), shuffled by ``seed``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    raw = d.images[order].astype(np.float32)
    x = (d.data[order].astype(np.float32) - 8.0) / 8.0  # pixel range 0..16 -> -1..1
    return x, d.target[order].astype(np.int64), raw


def make_model(hidden: int = 32, seed: int = 0) -> nn.Module:
    """64 -> hidden -> 10 tanh MLP with seeded init."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def per_sample_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy per sample: batch = [x (B, 64), y (B,)] -> (B,)."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def train_model(model: nn.Module, ds: TensorDataset, *, epochs: int = 300, lr: float = 1e-2,
                weight_decay: float = 1e-3, seed: int = 0) -> nn.Module:
    """Full-batch Adam with L2; deterministic for a given seed. Returns the model (trained in place)."""
    torch.manual_seed(seed)
    x, y = ds.tensors
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def build(n_train: int | None = None, n_query: int = NUM_QUERY, hidden: int = 32, seed: int = 0,
          train_epochs: int = 0) -> Problem:
    """The digits problem. Query = ``n_query`` held-out digits; train = the first ``n_train`` of the rest.

    The model comes freshly initialized unless ``train_epochs`` > 0; runs normally load the
    checkpoint written by ``bif example digits``.
    """
    x, y, raw = _load(seed)
    xq, yq = x[-n_query:], y[-n_query:]
    rest = len(y) - n_query
    n_train = rest if n_train is None else min(n_train, rest)
    xt, yt = x[:n_train], y[:n_train]
    train = TensorDataset(torch.from_numpy(xt), torch.from_numpy(yt))
    query = TensorDataset(torch.from_numpy(xq), torch.from_numpy(yq))
    model = make_model(hidden, seed)
    if train_epochs:
        train_model(model, train, epochs=train_epochs, seed=seed)
    images = {"train": raw[:n_train], "query": raw[-n_query:]}
    labels = {"train": yt, "query": yq}

    def fit(dataset: TensorDataset, fit_seed: int) -> nn.Module:
        return train_model(make_model(hidden, fit_seed), dataset, seed=fit_seed)

    def render(split: str, index: int) -> np.ndarray:
        return images[split][index]

    return Problem(model=model.eval(), train=train, query=query, loss=per_sample_loss, fit=fit,
                   loss_bounds=(0.0, float("inf")), render=render,
                   extras={"labels": labels})


def save_checkpoint(path: str, *, n_train: int | None = None, hidden: int = 32, seed: int = 0,
                    epochs: int = 300) -> str:
    """Train the digits MLP and save its state dict to ``path`` (local or fsspec URI). Returns the path."""
    import io

    import fsspec

    prob = build(n_train=n_train, hidden=hidden, seed=seed)
    train_model(prob.model, prob.train, epochs=epochs, seed=seed)
    buf = io.BytesIO()
    torch.save(prob.model.state_dict(), buf)
    fs, p = fsspec.core.url_to_fs(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(p, buf.getvalue())
    return path

"""Tiny token-level problems for tests/test_tokens.py (importable by Dask workers through sys.path).

A bigram language model (embedding + linear head, float64) over integer sequences with
padding: ``loss`` returns per-token next-token cross-entropies ``(B, T - 1)`` and, depending on
``form``, a padding mask. No transformers needed.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from bif.problem import Problem

VOCAB = "·abcdefghij"  # id 0 is padding


class Bigram(torch.nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.head(self.emb(ids))


def _data(n: int, length: int, seed: int, min_len: int):
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, length), dtype=np.int64)
    valid = np.zeros((n, length), dtype=bool)
    for i in range(n):
        L = int(rng.integers(min_len, length + 1))
        ids[i, :L] = rng.integers(1, len(VOCAB), size=L)
        valid[i, :L] = True
    return torch.as_tensor(ids), torch.as_tensor(valid)


def build(n_train: int = 6, n_query: int = 3, length: int = 8, dim: int = 3, seed: int = 0, form: str = "pair",
          prompt: int = 0, min_len: int = 2, tie: bool = False, fit_steps: int = 0) -> Problem:
    """``form``: 'pair' ((B, T-1) losses, mask), 'plain' ((B, T-1) losses only; sequences are then unpadded),
    'bad_mask' (a float mask). ``prompt``: the first ``prompt`` loss positions are masked too (so valid
    positions do not start at 0). ``tie``: the head shares the embedding's weight (tied weights).
    ``fit_steps`` > 0: the model is trained (full-batch Adam on the mean valid-token loss plus a small weight
    decay) and the problem has ``fit`` (the same training on a subset), for LDS."""
    torch.manual_seed(seed)
    model = Bigram(len(VOCAB), dim).double()
    if tie:
        model.head.weight = model.emb.weight
    if form == "plain":
        min_len = length
    tr_ids, tr_valid = _data(n_train, length, seed + 1, min_len)
    qu_ids, qu_valid = _data(n_query, length, seed + 2, min_len)
    train, query = TensorDataset(tr_ids, tr_valid), TensorDataset(qu_ids, qu_valid)

    def loss(model, batch):
        ids, valid = batch
        logits = model(ids[:, :-1])  # (B, T-1, V)
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        mask = valid[:, 1:].clone()
        if prompt:
            mask[:, :prompt] = False
        if form == "plain":
            return losses
        if form == "bad_mask":
            return losses, mask.double()
        return losses, mask

    def render_tokens(split: str, index: int) -> list[str]:
        ids = (tr_ids if split == "train" else qu_ids)[index]
        return [VOCAB[int(t)] for t in ids[1:]]  # the predicted token at each loss position

    if not fit_steps:
        return Problem(model=model, train=train, query=query, loss=loss, render_tokens=render_tokens)

    def fit(dataset, fit_seed: int) -> torch.nn.Module:
        torch.manual_seed(fit_seed)
        m = Bigram(len(VOCAB), dim).double()
        ids, valid = dataset.tensors
        opt = torch.optim.Adam(m.parameters(), lr=0.1)
        for _ in range(fit_steps):
            opt.zero_grad()
            out = loss(m, (ids, valid))
            losses, mask = out if isinstance(out, tuple) else (out, torch.ones_like(out, dtype=torch.bool))
            objective = losses[mask].mean() + 1e-3 * sum((p ** 2).sum() for p in m.parameters())
            objective.backward()
            opt.step()
        return m.eval()

    return Problem(model=fit(train, seed), train=train, query=query, loss=loss, render_tokens=render_tokens, fit=fit)

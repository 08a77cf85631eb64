"""Retrain the problem on one subset with one seed and measure every query's loss.

Pure torch / numpy (no Prefect, Dask or fsspec): the LDS flow's task wraps
:func:`retrain_query_losses`, and calibration calls :func:`ground_truth` in-process.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from bif.errors import ProblemError
from bif.evaluation.lds import GroundTruth, retrain_seed  # GroundTruth: defined in lds, kept importable here
from bif.problem import Problem


def subset_dataset(ds: Dataset, indices: np.ndarray) -> Dataset:
    """The examples ``indices`` of ``ds``: a TensorDataset when ``ds`` is one, else a ``Subset``."""
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    if isinstance(ds, TensorDataset):
        return TensorDataset(*[t[idx] for t in ds.tensors])
    return Subset(ds, idx.tolist())


@torch.no_grad()
def query_losses(problem: Problem, model: torch.nn.Module, *, batch_size: int = 4096) -> np.ndarray:
    """Per-sample losses of every query example under ``model``: (n_query,) float64 (token losses: each query
    sequence's loss, the sum of its valid token losses, as in ``bif.zarr``)."""
    from bif.evaluation.baselines.common import batches, sample_losses

    dtype = next(model.parameters()).dtype
    out = [sample_losses(problem, model, b).detach().to(torch.float64)
           for b in batches(problem.query, batch_size, dtype)]
    return torch.cat(out).cpu().numpy()


def require_fit(problem: Problem, needs: str = "the LDS benchmark needs") -> None:
    """ProblemError unless the problem has ``fit``: what needs it checks this before it starts anything (`bif lds`
    and `bif calibrate` found out only when their retrainings failed, each retried twice: 24 s and 71 s)."""
    if problem.fit is None:
        raise ProblemError(f"problem has no fit(dataset, seed) -> nn.Module; {needs} it to retrain on subsets "
                           "(add `fit` to the problem factory's return value)")


def has_token_losses(problem: Problem) -> bool:
    """Whether ``problem.loss`` gives per-token losses (``(B, T)`` or a ``(losses, mask)`` pair), from its loss on
    the first train example at w*."""
    from bif.sampling.chain import collate_indices, split_loss

    with torch.no_grad():
        return split_loss(problem.loss(problem.model, collate_indices(problem.train, torch.arange(1))), 1)[2]


def retrain_query_losses(problem: Problem, mask: np.ndarray, seed: int) -> np.ndarray:
    """Train a fresh model on train[mask] with ``problem.fit(subset, seed)``; its query losses (n_query,).

    ``mask`` is a boolean (n_train,) row of :func:`bif.evaluation.lds.draw_subsets`.
    """
    require_fit(problem)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (len(problem.train),):
        raise ValueError(f"mask must have shape ({len(problem.train)},), got {mask.shape}")
    model = problem.fit(subset_dataset(problem.train, np.flatnonzero(mask)), int(seed))
    if not isinstance(model, torch.nn.Module):
        raise ProblemError(f"problem.fit must return an nn.Module, got {type(model).__name__}")
    losses = query_losses(problem, model.eval())
    if not np.isfinite(losses).all():
        bad = int(np.flatnonzero(~np.isfinite(losses))[0])
        raise ProblemError(f"retrained model gives query sample {bad} a non-finite loss {losses[bad]}; "
                           "check problem.fit (learning rate, epochs)")
    return losses


def ground_truth(problem: Problem, masks: np.ndarray, *, num_seeds: int, seed: int = 0) -> GroundTruth:
    """Retrain on every subset with ``num_seeds`` seeds, serially in this process (for small problems)."""
    losses = np.stack([
        np.stack([retrain_query_losses(problem, masks[m], retrain_seed(seed, m, r)) for r in range(num_seeds)])
        for m in range(masks.shape[0])
    ])
    return GroundTruth(masks=np.asarray(masks, dtype=bool), losses=losses)

"""Problem factories of tests/test_faults.py (importable by Dask workers and `bif` subprocesses)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from bif.examples import linear


def raising_factory(**kwargs):
    raise RuntimeError("boom: the dataset server is down")


def nan_at_wstar(**kwargs):
    """Linear problem whose query sample 3 has a NaN target: its loss at w* is NaN."""
    prob = linear.build(**kwargs)
    x, y = prob.query.tensors
    y = y.clone()
    y[3] = float("nan")
    return {"model": prob.model, "train": prob.train, "query": torch.utils.data.TensorDataset(x, y),
            "loss": prob.loss}


def negative_loss(**kwargs):
    """Linear problem whose losses at w* are all below its declared loss_bounds."""
    prob = linear.build(**kwargs)
    return {"model": prob.model, "train": prob.train, "query": prob.query, "loss_bounds": (0.0, 1e9),
            "loss": lambda model, batch: prob.loss(model, batch) - 1e6}


def held_while(hold: str, held: str, **kwargs):
    """Linear problem whose SGLD steps wait while the file ``hold`` exists (at most 120 s).

    A test holds a run in its sampling with it: the first step that waits creates the file ``held``.
    Loss evaluations (no gradient) do not wait.
    """
    prob = linear.build(**kwargs)

    def loss(model, batch):
        if torch.is_grad_enabled() and os.path.exists(hold):
            Path(held).touch()
            deadline = time.monotonic() + 120
            while os.path.exists(hold) and time.monotonic() < deadline:
                time.sleep(0.01)
        return prob.loss(model, batch)

    return {"model": prob.model, "train": prob.train, "query": prob.query, "loss": loss}

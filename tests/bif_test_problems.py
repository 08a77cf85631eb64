"""Problem factories used by the tests (importable by Dask workers through sys.path)."""
from __future__ import annotations

from bif.examples import linear
from bif.problem import Problem


def wrong_shape_loss(**kwargs) -> dict:
    """A problem (as a plain dict) whose loss returns the batch mean instead of per-sample losses."""
    prob = linear.build(**kwargs)
    return {"model": prob.model, "train": prob.train, "query": prob.query,
            "loss": lambda model, batch: linear.per_sample_loss(model, batch).mean()}


def self_influence(**kwargs) -> Problem:
    """Linear problem whose query set is the train set."""
    prob = linear.build(**kwargs)
    return Problem(model=prob.model, train=prob.train, query=prob.train, loss=prob.loss)

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


def _saturating_data(n: int, n_far: int, seed: int):
    """x (n, 2) float32 and labels: the first ``n_far`` points lie far from the boundary x0 = 0, the rest near it."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    sign = np.where(y == 1, 1.0, -1.0)
    x0 = np.where(np.arange(n) < n_far, 5.0 + rng.uniform(0, 1, n), rng.uniform(0.02, 0.1, n)) * sign
    x = np.stack([x0, rng.normal(size=n)], axis=1)
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)


def saturating(n_train: int = 24, n_far_train: int = 16, n_query: int = 8, n_far_query: int = 5,
               scale: float = 10.0, seed: int = 0) -> Problem:
    """A confidently trained 2-class linear classifier in float32 whose cross-entropy saturates.

    The logit margin is 2 x scale x x0: about 100-120 for the first ``n_far_train`` train and
    ``n_far_query`` query samples, so their float32 cross-entropy is exactly 0.0 at w* and at
    every SGLD draw near it (a constant trace); the other samples sit near the boundary
    (margin ~ 0.4-2) and their losses vary.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset

    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-scale, 0.0], [scale, 0.0]]))
        model.bias.zero_()
    xt, yt = _saturating_data(n_train, n_far_train, seed)
    xq, yq = _saturating_data(n_query, n_far_query, seed + 1)

    def loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")

    return Problem(model=model.eval(), train=TensorDataset(xt, yt), query=TensorDataset(xq, yq), loss=loss,
                   extras={"far": {"train": list(range(n_far_train)), "query": list(range(n_far_query))}})


def frozen(which: str = "some", **kwargs) -> Problem:
    """The linear problem with requires_grad=False on its parameters ('all'), or on a model with one frozen layer."""
    import torch
    from torch import nn

    prob = linear.build(**kwargs)
    if which == "all":
        for p in prob.model.parameters():
            p.requires_grad_(False)
        return prob
    d = prob.model.in_features
    model = nn.Sequential(nn.Linear(d, d, bias=False), prob.model).to(prob.model.weight.dtype)
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(d, dtype=prob.model.weight.dtype))
    model[0].weight.requires_grad_(False)  # frozen: only the last layer is sampled
    return Problem(model=model.eval(), train=prob.train, query=prob.query, loss=prob.loss)


def query_equals_train_copy(**kwargs) -> Problem:
    """The linear problem whose query set holds the same examples as train (an equal copy, not the same object)."""
    prob = linear.build(**kwargs)
    from torch.utils.data import TensorDataset

    return Problem(model=prob.model, train=prob.train, query=TensorDataset(*prob.train.tensors), loss=prob.loss)

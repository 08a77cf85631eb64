"""TRAK (Park et al. 2023, arXiv 2303.14186) through traker, in the BIF's sign.

Optional extra: ``pip install .[baselines]``. traker's "image_classification" task
scores with the margin f = log(p_y / (1 - p_y)) of a classifier whose batches are
``[x, y]``; a positive TRAK score means training on i *raises* the query's margin, i.e.
*lowers* its loss, so

    τ[i, q] = -score[i, q],   τ > 0: including i raises q's loss.

On CPU traker needs ``proj_dim >= 200`` (with ≤ 100 its ``score()`` fails, a bug in trak).
TRAK is usually run on an ensemble of independently trained models; ``num_models`` > 1
retrains with ``problem.fit(train, seed)`` for seeds 1.. and averages, the first model
being the problem's checkpoint.
"""
from __future__ import annotations

import copy
import logging
import tempfile
import time

import torch
import xarray as xr

from bif.errors import ProblemError
from bif.evaluation.baselines.common import as_scores, batches
from bif.problem import Problem


def trak_scores(problem: Problem, *, proj_dim: int = 512, num_models: int = 1, lambda_reg: float = 0.0,
                batch_size: int = 256, seed: int = 0) -> xr.DataArray:
    """TRAK τ (n_train, n_query) = -traker scores, named ``"trak"``; model run in float32 on CPU.

    ``lambda_reg`` is added to the diagonal of the projected-gradient Gram matrix before its
    inverse; it must be > 0 when the model has fewer parameters than ``proj_dim``.
    """
    from bif.evaluation.retrain import has_token_losses

    if has_token_losses(problem):  # traker failed inside its vmap ("batching ... indexing with a boolean mask")
        raise ProblemError("TRAK (traker's image-classification task) scores a classifier's [x, y] batches, not "
                           "per-token losses; leave `trak` out of --methods for a language model")
    try:
        from trak import TRAKer
    except ImportError as err:
        raise ImportError(f"TRAK needs traker ({err}); install it with `pip install .[baselines]`") from None
    if proj_dim < 200:
        raise ValueError(f"proj_dim must be >= 200 on CPU (trak's BasicProjector fails below), got {proj_dim}")
    if num_models > 1 and problem.fit is None:
        raise ValueError("num_models > 1 needs problem.fit(dataset, seed) to train the ensemble")
    logging.getLogger("TRAK").setLevel(logging.WARNING)
    models = [problem.model] + [problem.fit(problem.train, seed + k) for k in range(1, num_models)]
    models = [copy.deepcopy(m).to(torch.float32).eval() for m in models]
    train_b = batches(problem.train, batch_size, torch.float32)
    query_b = batches(problem.query, batch_size, torch.float32)
    n, q = len(problem.train), len(problem.query)
    with tempfile.TemporaryDirectory() as tmp:
        traker = TRAKer(model=models[0], task="image_classification", train_set_size=n, save_dir=tmp,
                        device="cpu", proj_dim=proj_dim, use_half_precision=False, proj_max_batch_size=32, lambda_reg=lambda_reg,
                        logging_level=logging.WARNING)
        for k, m in enumerate(models):
            traker.load_checkpoint(m.state_dict(), model_id=k)
            for b in train_b:
                traker.featurize(batch=b, num_samples=b[0].shape[0])
        traker.finalize_features()
        t0 = time.perf_counter()  # train features are query-independent; a new query set repeats only this
        for k, m in enumerate(models):
            traker.start_scoring_checkpoint(exp_name="q", checkpoint=m.state_dict(), model_id=k, num_targets=q)
            for b in query_b:
                traker.score(batch=b, num_samples=b[0].shape[0])
        s = traker.finalize_scores(exp_name="q")  # (n, Q)
        query_seconds = time.perf_counter() - t0
    tau = -torch.as_tensor(s, dtype=torch.float64)
    return as_scores(tau, name="trak", attrs={"method": "trak", "proj_dim": proj_dim, "num_models": num_models,
                                             "lambda_reg": lambda_reg, "query_seconds": query_seconds})

"""EK-FAC influence (Grosse et al. 2023, arXiv 2308.03296) through kronfluence, in the BIF's sign.

Optional extra: ``pip install .[baselines]`` (kronfluence 1.0.1 lists torchvision as a
requirement but never imports it, and torchvision from the registry does not match the CPU
torch build: install kronfluence with ``pip install --no-deps kronfluence==1.0.1`` plus its
other requirements, or remove torchvision afterwards). kronfluence's pairwise score is s[q, i] = ∇φ_qᵀ (F̂ + λI)⁻¹ ∇ℓ_i, with F̂
the EK-FAC approximation of the (here: empirical) Fisher of the mean training loss;
a positive s means training on i *lowers* φ_q. As for the classical influence function
(:mod:`bif.evaluation.baselines.influence`),

    τ[i, q] = -(1/n) · s[q, i],   τ > 0: including i raises q's loss.

Only ``nn.Linear`` and ``nn.Conv2d`` layers are tracked (kronfluence's limitation).
"""
from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
from typing import Any

import torch
import xarray as xr

from bif.evaluation.baselines.common import as_scores, sample_losses
from bif.problem import Problem


class _Child(torch.nn.Module):
    """The model as this module's one child, called with the caller's arguments as they are: a Hugging Face model
    takes keywords (``input_ids=...``), which ``nn.Sequential`` refused. Its parameter names gain the prefix "0.",
    as they did in the ``nn.Sequential`` it replaces."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.add_module("0", model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, "0")(*args, **kwargs)


def _require():
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except ImportError as err:
        raise ImportError(f"EK-FAC needs kronfluence ({err}); install it with `pip install .[baselines]` "
                          "(on CPU torch: `pip install --no-deps kronfluence==1.0.1` plus its other deps)") from None
    return Analyzer, prepare_model, FactorArguments, ScoreArguments, Task


def ekfac_scores(problem: Problem, *, damping: float | None = None, batch_size: int = 256,
                 strategy: str = "ekfac", output_dir: str | None = None) -> xr.DataArray:
    """EK-FAC influence τ (n_train, n_query) = -(1/n)·kronfluence pairwise scores, named ``"ekfac"``.

    ``damping`` is kronfluence's λ on the mean-loss Fisher (None: its heuristic, 0.1 × the
    mean eigenvalue). ``strategy`` may also be "kfac", "diagonal" or "identity". The
    empirical Fisher is used (labels from the batch), so any ``problem.loss`` works.
    Factors go to a temporary folder unless ``output_dir`` is given.
    """
    Analyzer, prepare_model, FactorArguments, ScoreArguments, Task = _require()

    def loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:  # (B,): token losses as sequence losses
        return sample_losses(problem, model, batch)

    class _Task(Task):
        def compute_train_loss(self, batch, model, sample=False):  # noqa: ARG002 (empirical Fisher)
            return loss(model, batch).sum()

        def compute_measurement(self, batch, model):
            return loss(model, batch).sum()

    task = _Task()
    # wrapped so that a bare nn.Linear model is a child module (kronfluence only wraps children)
    model = prepare_model(_Child(copy.deepcopy(problem.model)).eval(), task)
    dtype = next(model.parameters()).dtype
    for name in ("kronfluence", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # kronfluence 1.0.1 builds torch.cuda.amp.GradScaler, deprecated in torch >= 2.4
        warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
        analyzer = Analyzer("bif_ekfac", model, task, cpu=not torch.cuda.is_available(), disable_tqdm=True,
                            output_dir=output_dir or tmp, log_level=logging.WARNING)
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=True,
                                      activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
                                      per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
        analyzer.fit_all_factors("factors", problem.train, per_device_batch_size=batch_size,
                                 factor_args=factor_args, overwrite_output_dir=True)
        t0 = time.perf_counter()  # factors are query-independent; scoring a new query set repeats only this
        score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=dtype,
                                    precondition_dtype=dtype, score_dtype=dtype)
        analyzer.compute_pairwise_scores("scores", "factors", problem.query, problem.train,
                                         per_device_query_batch_size=batch_size,
                                         per_device_train_batch_size=batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
        s = analyzer.load_pairwise_scores("scores")["all_modules"]  # (Q, n)
        query_seconds = time.perf_counter() - t0
    tau = -s.to(torch.float64).T / len(problem.train)
    return as_scores(tau, name="ekfac", attrs={"method": "ekfac", "strategy": strategy,
                                              "damping": "heuristic" if damping is None else float(damping),
                                              "query_seconds": query_seconds})

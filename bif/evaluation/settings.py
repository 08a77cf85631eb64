"""Settings of the LDS benchmark (``bif lds``) and of the methods it scores: frozen, validated.

The run config (problem, checkpoint, output, sampler) is the attribution run's
:class:`bif.config.RunConfig`; these settings sit beside it and come from CLI flags.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bif.config import RHAT_THRESHOLD
from bif.evaluation.methods import method_names

#: A registered attribution method's name (:mod:`bif.evaluation.methods`).
Method = str
#: ``bif`` yields two score arrays: ``bif`` (-Cov) and ``bif_corr`` (-Corr).
DEFAULT_METHODS: tuple[Method, ...] = ("bif", "influence", "graddot", "gradcos")


class MethodOptions(BaseModel):
    """Hyperparameters of the baselines (BIF takes the run config's sampler block)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    damping: float = Field(1e-3, ge=0, description="Damping λ of the classical influence function (all solvers).")
    lissa_depth: int = Field(1000, ge=1, description="LiSSA recursion depth.")
    ekfac_damping: float | None = Field(None, gt=0, description="EK-FAC damping; None: kronfluence's heuristic.")
    trak_proj_dim: int = Field(512, ge=200, description="TRAK projection dimension (>= 200 on CPU).")
    trak_lambda_reg: float = Field(0.0, ge=0, description="TRAK ridge on the projected Gram matrix.")
    trak_num_models: int = Field(1, ge=1, description="TRAK ensemble size (extra models trained with problem.fit).")


class LDSSettings(BaseModel):
    """Subsets, seeds and methods of one LDS benchmark."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(0.5, gt=0, lt=1, description="Fraction of the training set in each subset.")
    num_subsets: int = Field(100, ge=2, description="Number M of random subsets.")
    num_seeds: int = Field(3, ge=1, description="Retraining seeds per subset; outputs are averaged over them.")
    seed: int = Field(0, ge=0, description="Root seed of the subsets and the retraining seeds.")
    methods: tuple[Method, ...] = Field(DEFAULT_METHODS, description="Attribution methods to score.")
    options: MethodOptions = Field(default_factory=MethodOptions, description="Baseline hyperparameters.")

    @field_validator("methods")
    @classmethod
    def _registered(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in value if m not in method_names()]
        if unknown:
            raise ValueError(f"unknown attribution method {', '.join(map(repr, unknown))}; choose from "
                             + ", ".join(method_names()))
        return value

    retries: int = Field(2, ge=0, description="Retries of each retraining task.")

    def ground_truth_key(self, problem: str, problem_args: dict[str, Any]) -> str:
        """Short sha256 of what determines the retrained losses: problem, its args, subsets and seeds.

        The checkpoint and the methods do not enter: retraining starts from scratch, and a new
        method reuses the same ground truth.
        """
        data = {"problem": problem, "problem_args": problem_args, "alpha": self.alpha,
                "num_subsets": self.num_subsets, "num_seeds": self.num_seeds, "seed": self.seed}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CalibrationSettings(BaseModel):
    """The ``bif calibrate`` sweep: a pilot for the largest stable step, then a small grid scored on LDS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_subsets: int = Field(20, ge=2, description="Subsets of the cheap LDS ground truth.")
    num_seeds: int = Field(1, ge=1, description="Retraining seeds per subset of the cheap ground truth.")
    alpha: float = Field(0.5, gt=0, lt=1, description="Fraction of the training set in each subset.")
    seed: int = Field(0, ge=0, description="Root seed of subsets and retraining seeds.")
    nbeta: float | None = Field(None, gt=0, description="nβ of the sweep; None: bif.evaluation.calibrate.default_nbeta(n).")
    step_sizes: tuple[float, ...] | None = Field(
        None, description="Explicit step sizes to sweep; None: fractions of the pilot's largest stable step.")
    gammas: tuple[float, ...] | None = Field(None, description="Explicit gammas; None: (0.03, 0.1, 0.3)·nβ.")
    pilot_steps: int = Field(200, ge=10, description="SGLD steps of each pilot chain.")
    num_chains: int = Field(4, ge=2, description="Chains per evaluated setting (R-hat needs >= 2).")
    num_draws: int = Field(300, ge=8, description="Draws per chain per evaluated setting.")
    rhat_max: float = Field(RHAT_THRESHOLD, gt=1, description="Largest acceptable R-hat of any loss trace.")
    ess_min: float = Field(50.0, gt=0, description="Smallest acceptable median bulk ESS.")
    drift_max: float = Field(1.5, gt=1, description="Largest acceptable growth of the distance from w*.")

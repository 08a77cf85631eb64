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
    """The ``bif calibrate`` search (:mod:`bif.evaluation.calibrate`): a cheap ground truth, a curvature probe,
    successive halving over (nβ/n, λ, batch, step fraction) sized to a budget, and a draw budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_subsets: int = Field(60, ge=2, description="Subsets of the cheap LDS ground truth (one seed each by default).")
    num_seeds: int = Field(1, ge=1, description="Retraining seeds per subset of the cheap ground truth.")
    alpha: float = Field(0.5, gt=0, lt=1, description="Fraction of the training set in each subset.")
    seed: int = Field(1, ge=0, description="Root seed of the cheap ground truth's subsets and retrainings (1: "
                      "independent of `bif lds`'s default seed 0, so a later `bif lds` does not score the "
                      "calibrator on the subsets it was tuned on).")
    budget_retrainings: float = Field(
        300.0, gt=0, description="Budget in retrainings: the search stops planning new rounds once its wall time "
        "passes this many times the measured wall time per retraining (300 = one full 100 x 3 ground truth).")
    budget_seconds: float | None = Field(None, gt=0, description="Explicit budget in wall seconds (overrides "
                                         "budget_retrainings).")
    nbeta_mults: tuple[float, ...] = Field((1.0, 10.0, 100.0), min_length=1,
                                           description="nβ / n of round 0.")
    lambdas: tuple[float, ...] = Field((0.003, 0.01, 0.03, 0.1, 0.3), min_length=1,
                                       description="Damping λ = γ / nβ of round 0.")
    step_fractions: tuple[float, ...] = Field((0.15, 0.05), min_length=1, description=(
        "Step sizes as fractions of the stability limit 4 / (nβ (λ_max + λ)); round 0 uses the first."))
    minibatch: int = Field(64, ge=1, description="Minibatch size tried besides the full batch (capped at n / 2).")
    full_batch_max_cost: float = Field(2.0, gt=0, description=(
        "Use the full batch in round 0 when its step costs at most this many minibatch steps; else the minibatch."))
    num_rounds: int = Field(3, ge=1, description="Rounds of successive halving (the draws triple each round).")
    keep: float = Field(1 / 3, gt=0, le=1, description="Share of settings kept after each round.")
    round0_draws: int | None = Field(None, ge=8, description="Draws per chain in round 0; None: sized to the budget.")
    min_round0_draws: int = Field(40, ge=8, description="Fewest draws per chain of round 0 when it is sized to the "
                                  "budget (round0_draws None).")
    min_relaxations: float = Field(10.0, ge=0, description=(
        "When round 0 is sized to the budget, a candidate runs in it only if its chain relaxes at least this many "
        "times (draws x steps_per_draw x the flat-direction contraction rate 2 frac λ/(λ_max + λ)); a small "
        "budget then runs fewer, longer chains instead of every candidate at a draw count where its LDS is noise. "
        "0: every candidate always runs."))
    burnin_relaxations: float | None = Field(3.0, gt=0, description=(
        "Burn-in of each search chain, in relaxation times 1/rate (at most the config's num_burnin_steps); "
        "None: the config's burn-in. The recommended block keeps the config's burn-in."))
    plan_margin: float = Field(0.85, gt=0, le=1, description=(
        "Each round is planned to fit this share of the budget that is left (the rest is a reserve: a round's "
        "wall time on a shared machine varies by tens of percent)."))
    max_draws: int = Field(2000, ge=8, description="Most draws per chain of any round.")
    search_chains: int = Field(2, ge=2, description="Chains per evaluated setting (R-hat needs >= 2).")
    num_chains: int = Field(4, ge=2, description="Chains in the recommended sampler block (R-hat needs >= 2).")
    project_draws: int | None = Field(
        4000, ge=2, description="Rank settings by their LDS projected to this many draws in all (chains x draws; "
        "bif.evaluation.calibrate.projected_lds, from the two halves of the chains), so short search chains do "
        "not penalize settings that are noisy but win with the draws a real run uses. None: the observed LDS.")
    tie_se: float = Field(1.0, ge=0, description="Settings within this many paired SEs of the best tie; ties go "
                          "to the healthiest, then the larger λ, then the cheaper one.")
    target_share: float = Field(0.5, gt=0, lt=1, description=(
        "Draw budget: recommend num_draws so that this share of the (train, query) pairs has |BIF| > 2 MCSE "
        "(batch-means MCSE from the winner's traces, scaled as 1/sqrt(draws))."))
    max_num_draws: int = Field(4000, ge=8, description="Cap on the recommended num_draws per chain.")
    pilot_steps: int = Field(200, ge=10, description="SGLD steps of the stability pilot at the largest nβ.")
    rhat_max: float = Field(RHAT_THRESHOLD, gt=1, description="Largest acceptable R-hat of any loss trace.")
    ess_min: float = Field(20.0, gt=0, description="Smallest acceptable median bulk ESS.")
    drift_max: float = Field(1.5, gt=1, description="Largest acceptable growth of the distance from w*.")

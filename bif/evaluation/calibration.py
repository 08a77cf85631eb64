"""Run one calibration setting (chains → diagnostics → BIF → LDS) and the step-size pilot.

No Prefect here; :mod:`bif.flows.calibrate` wraps these in tasks. Diagnostics are ArviZ's
rank R-hat and bulk ESS of every per-sample loss trace, computed by the same function as the
attribution run's diagnostics (:func:`bif.quality.diagnostics.rhat_ess`). A setting diverged
when a chain raised :class:`bif.errors.ChainDivergedError`, left w* to a non-finite distance,
or ran away by the rule of the ``health_loss`` gate (:func:`bif.quality.rules.runaway`, with
the ``quality`` defaults; the pilot uses the stricter :data:`PILOT_LOSS_FACTOR` /
:data:`PILOT_LOSS_SLACK`).
"""
from __future__ import annotations

import time

import numpy as np

from bif.evaluation.calibrate import SettingScore, drift_ratio
from bif.config import QualityConfig, SamplerConfig
from bif.errors import ChainDivergedError
from bif.evaluation.lds import lds
from bif.problem import Problem
from bif.moments import bif_in_memory
from bif.evaluation.retrain import GroundTruth
from bif.quality.rules import runaway
from bif.sampling.chain import SGLDChain, sample_chains

_QUALITY = QualityConfig()
#: The step-size pilot's runaway rule is stricter than the gate's (a short chain from w*).
PILOT_LOSS_FACTOR, PILOT_LOSS_SLACK = 3.0, 0.5


def run_chains(problem: Problem, sampler: SamplerConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All chains in-process (:func:`bif.sampling.chain.sample_chains`).

    Returns train (C, D, n_train), query (C, D, n_query) and distance (C, D) from w*.
    """
    traces = sample_chains(problem, sampler)
    return traces.train, traces.query, traces.distance


def _rhat_ess(train: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ArviZ rank R-hat and bulk ESS of every loss trace; train and query (chains, draws, n) -> (n_train + n_query,) each.

    Raw ArviZ values (:func:`bif.quality.diagnostics.rhat_ess`): a constant trace has R-hat
    NaN and bulk ESS chains x draws.
    """
    from bif.quality.diagnostics import rhat_ess

    traces = np.concatenate([train, query], axis=2)  # (C, D, n_train + n_query)
    out = rhat_ess(traces, tail=False)
    return out["rhat"], out["ess_bulk"]


def _diverged_by_loss(train: np.ndarray, reference_mean: float, factor: float = _QUALITY.max_loss_factor,
                      slack: float = _QUALITY.loss_slack) -> bool:
    """A chain ran away (:func:`bif.quality.rules.runaway` on train (C, D, n_train)): its mean train loss
    exceeds factor x the loss at w* + slack."""
    return bool(runaway(train.mean(axis=(1, 2)), reference_mean, max_loss_factor=factor, loss_slack=slack).any())


def evaluate_setting(problem: Problem, sampler: SamplerConfig, gt: GroundTruth | None) -> SettingScore:
    """Diagnostics, drift and LDS (against ``gt``, if given) of one sampler setting."""
    nbeta = float(sampler.nbeta if sampler.nbeta is not None else len(problem.train))
    head = {"step_size": sampler.step_size, "nbeta": nbeta, "gamma": sampler.gamma}
    t0 = time.perf_counter()
    try:
        train, query, dist = run_chains(problem, sampler)
    except ChainDivergedError:
        return SettingScore(**head, diverged=True, seconds=time.perf_counter() - t0)
    ref = float(SGLDChain(problem, sampler, chain=0).reference_losses()[0].mean())
    if _diverged_by_loss(train, ref) or not np.isfinite(dist).all():
        return SettingScore(**head, diverged=True, seconds=time.perf_counter() - t0)
    rhat, ess = _rhat_ess(train, query)
    score = {"max_rhat": float(np.nanmax(rhat)) if np.isfinite(rhat).any() else float("nan"),
             "median_ess_bulk": float(np.nanmedian(ess)),
             "distance_mean": float(dist.mean()), "drift_ratio": drift_ratio(dist)}
    if gt is not None:
        bif, _ = bif_in_memory(train, query)
        res = lds(bif, gt.masks, gt.outputs)
        score |= {"lds": res.mean, "lds_stderr": res.stderr}
    return SettingScore(**head, diverged=False, **score, seconds=time.perf_counter() - t0)


def pilot_stable(problem: Problem, sampler: SamplerConfig, step_size: float, *, num_steps: int = 200) -> bool:
    """Whether a short single chain with ``step_size`` stays finite and does not run away from w*."""
    s = sampler.model_copy(update={"step_size": step_size, "num_chains": 1, "num_burnin_steps": 0,
                                   "steps_per_draw": max(1, num_steps // 10), "num_draws": 10})
    try:
        train, _, dist = run_chains(problem, s)
    except ChainDivergedError:
        return False
    ref = float(SGLDChain(problem, s, chain=0).reference_losses()[0].mean())
    return bool(np.isfinite(dist).all() and not _diverged_by_loss(train, ref, factor=PILOT_LOSS_FACTOR,
                                                                        slack=PILOT_LOSS_SLACK))

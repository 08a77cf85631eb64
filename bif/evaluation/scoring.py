"""Compute one method's attribution on a problem, with its wall time and peak memory.

No Prefect here: the LDS flow's tasks and the benchmark script call :func:`score_method`.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from bif.evaluation.baselines.common import as_scores
from bif.config import CovarianceConfig, SamplerConfig
from bif.evaluation.settings import MethodOptions
from bif.problem import Problem


@dataclass(frozen=True)
class Scored:
    """Scores τ (n_train, n_query) of one named method plus its cost."""

    name: str
    tau: np.ndarray  # (n_train, n_query) float64, τ > 0: including i raises q's loss
    seconds: float  # wall time of the whole method
    query_seconds: float  # wall time of the query-dependent part (scoring a new query set)
    peak_mb: float  # peak RSS increase over the start, MiB (sampled every 5 ms)


def measure(fn: Callable[[], Any], *, interval: float = 0.005) -> tuple[Any, float, float]:
    """Run ``fn()``; return (result, seconds, peak RSS increase in MiB sampled by a thread)."""
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(interval):
            peak[0] = max(peak[0], proc.memory_info().rss)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return out, seconds, (peak[0] - base) / 2**20


def bif_arrays(problem: Problem, sampler: SamplerConfig, *, pooling: str = "stack"
               ) -> tuple[np.ndarray, np.ndarray]:
    """BIF and BIF_corr (n_train, n_query) in-process: ``sample_traces`` then ``bif_in_memory``."""
    from bif.moments import bif_in_memory
    from bif.sampling.chain import sample_traces

    return bif_in_memory(*sample_traces(problem, sampler), pooling=pooling)


def _baseline(problem: Problem, method: str, opts: MethodOptions):
    if method in ("influence", "influence_cg", "influence_lissa"):
        from bif.evaluation.baselines.influence import influence_scores

        solver = {"influence": "explicit", "influence_cg": "cg", "influence_lissa": "lissa"}[method]
        return influence_scores(problem, damping=opts.damping, solver=solver, lissa_depth=opts.lissa_depth)
    if method == "graddot":
        from bif.evaluation.baselines.graddot import graddot_scores

        return graddot_scores(problem)
    if method == "gradcos":
        from bif.evaluation.baselines.graddot import gradcos_scores

        return gradcos_scores(problem)
    if method == "ekfac":
        from bif.evaluation.baselines.ekfac import ekfac_scores

        return ekfac_scores(problem, damping=opts.ekfac_damping)
    if method == "trak":
        from bif.evaluation.baselines.trak import trak_scores

        return trak_scores(problem, proj_dim=opts.trak_proj_dim, lambda_reg=opts.trak_lambda_reg,
                           num_models=opts.trak_num_models)
    raise ValueError(f"unknown attribution method {method!r}")


def score_method(problem: Problem, method: str, *, sampler: SamplerConfig | None = None,
                 covariance: CovarianceConfig | None = None, options: MethodOptions | None = None
                 ) -> list[Scored]:
    """Scores of ``method`` on ``problem``; ``"bif"`` returns two entries, ``bif`` and ``bif_corr``.

    For BIF the whole sampling run is query-dependent (the chains must record the new
    queries' losses), so its ``query_seconds`` equals its ``seconds``.
    """
    opts = options or MethodOptions()
    if method == "bif":
        pooling = (covariance or CovarianceConfig()).pooling
        (b, bc), sec, mb = measure(lambda: bif_arrays(problem, sampler or SamplerConfig(), pooling=pooling))
        return [Scored("bif", as_scores(b, name="bif").values, sec, sec, mb),
                Scored("bif_corr", np.nan_to_num(bc, nan=0.0), sec, sec, mb)]  # NaN: a constant loss trace
    da, sec, mb = measure(lambda: _baseline(problem, method, opts))
    return [Scored(method, da.values, sec, float(da.attrs.get("query_seconds", sec)), mb)]

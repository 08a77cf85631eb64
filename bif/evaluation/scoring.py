"""Compute one method's attribution on a problem, with its wall time and peak memory.

No Prefect here: the LDS flow's tasks and the benchmark script call :func:`score_method`,
which dispatches through the method registry :mod:`bif.evaluation.methods`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from bif.config import CovarianceConfig, SamplerConfig
from bif.evaluation.methods import MethodInputs, get_method
from bif.evaluation.settings import MethodOptions

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from bif.problem import Problem


@dataclass(frozen=True)
class Scored:
    """Scores τ (n_train, n_query) of one named method plus its cost."""

    name: str
    tau: np.ndarray  # (n_train, n_query) float64, τ > 0: including i raises q's loss
    seconds: float  # wall time of the whole method
    query_seconds: float  # wall time of the query-dependent part (scoring a new query set)
    peak_mb: float  # peak RSS increase over the start, MiB (sampled every 5 ms)
    warnings: tuple[str, ...] = ()  # the method's warnings about these scores (MethodOutput.warnings)


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


def score_method(problem: Problem, method: str, *, sampler: SamplerConfig | None = None,
                 covariance: CovarianceConfig | None = None, options: MethodOptions | None = None
                 ) -> list[Scored]:
    """Scores of ``method`` (a name in :mod:`bif.evaluation.methods`) on ``problem``; ``"bif"`` returns two
    entries, ``bif`` and ``bif_corr``.

    For BIF the whole sampling run is query-dependent (the chains must record the new
    queries' losses), so its ``query_seconds`` equals its ``seconds``.
    """
    m = get_method(method)  # ConfigError naming the registered methods
    inputs = MethodInputs(sampler=sampler or SamplerConfig(), covariance=covariance or CovarianceConfig(),
                          options=options or MethodOptions())
    out, sec, mb = measure(lambda: m.compute(problem, inputs))
    query_seconds = sec if out.query_seconds is None else out.query_seconds
    for message in out.warnings:
        log.warning("%s", message)
    return [Scored(name, tau, sec, query_seconds, mb, tuple(out.warnings)) for name, tau in out.scores.items()]

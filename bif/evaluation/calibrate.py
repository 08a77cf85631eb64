"""Choosing the SGLD settings (step size ε, nβ, γ) from diagnostics and a cheap LDS: the pure parts.

No Prefect, Dask, torch or fsspec here; :mod:`bif.evaluation.calibration` runs the chains and
:mod:`bif.flows.calibrate` wires the sweep.

Defaults, and why (measured on the digits MLP, see README "Calibration"):

- **nβ = n** (β = 1, the untempered posterior). The localized posterior's covariance is
  ≈ (nβ·H + γ·I)⁻¹, so the BIF behaves like a classical influence function with damping
  γ / nβ; keeping γ as a multiple of nβ keeps that damping fixed as n grows.
- **γ = 0.1·nβ** (damping 0.1 per unit of mean-loss curvature).
- **ε·nβ ≈ const**: the drift ε/2·(nβ·∇²L + γ) must stay below 2 in its largest
  eigen-direction, so the largest stable step shrinks like 1/nβ. The pilot
  (:func:`largest_stable`) finds it; the sweep then tries fractions of it.

Scoring. A setting is *healthy* when no chain diverged, the worst loss-trace R-hat is at
most ``rhat_max``, the median bulk ESS is at least ``ess_min``, and the distance from w*
has stopped growing (the mean distance of the last quarter of draws is at most
``drift_max`` times that of the second quarter). Among healthy settings the one with the
best LDS against the cheap ground truth wins; if none is healthy, the non-diverged one
with the best LDS is returned, flagged unhealthy.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bif.config import RHAT_THRESHOLD

#: γ as a multiple of nβ (the damping γ / nβ the BIF implicitly applies).
DEFAULT_GAMMA_PER_NBETA = 0.1
#: Fractions of the largest stable step size that the sweep tries.
STEP_FRACTIONS = (0.5, 0.15)
#: Damping multiples γ / nβ that the sweep tries.
GAMMA_PER_NBETA = (0.03, 0.1, 0.3)


def default_nbeta(n_train: int) -> float:
    """nβ = n (β = 1); see the module docstring."""
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    return float(n_train)


def default_gamma(nbeta: float) -> float:
    """γ = 0.1·nβ."""
    return DEFAULT_GAMMA_PER_NBETA * nbeta


def pilot_step_sizes(nbeta: float, *, top: float = 10.0, factor: float = 3.0, num: int = 8) -> list[float]:
    """Candidate step sizes for the pilot, descending geometrically from ``top``/nβ by ``factor``."""
    return [top / nbeta / factor**k for k in range(num)]


def largest_stable(results: Mapping[float, bool]) -> float:
    """The largest step size whose pilot stayed stable, such that every smaller tried one was stable too.

    ``results`` maps step size -> stable. Raises ValueError when even the smallest diverged.
    """
    best = None
    for eps in sorted(results):
        if not results[eps]:
            break
        best = eps
    if best is None:
        raise ValueError(f"every pilot step size diverged (smallest {min(results):.3g}); "
                         "lower the candidates or raise gamma")
    return best


@dataclass(frozen=True)
class SettingScore:
    """Diagnostics and LDS of one (step_size, nbeta, gamma) setting."""

    step_size: float
    nbeta: float
    gamma: float
    diverged: bool
    max_rhat: float = math.nan
    median_ess_bulk: float = math.nan
    distance_mean: float = math.nan  # mean ||w - w*|| over all draws and chains
    drift_ratio: float = math.nan  # mean distance of the last quarter / of the second quarter of draws
    lds: float = math.nan
    lds_stderr: float = math.nan
    seconds: float = math.nan


def drift_ratio(distance: np.ndarray) -> float:
    """Mean distance from w* in the last quarter of draws over that in the second quarter; distance (chains, draws)."""
    d = np.asarray(distance, dtype=np.float64)
    q = d.shape[1] // 4
    if q == 0:
        return math.nan
    return float(d[:, -q:].mean() / max(d[:, q:2 * q].mean(), 1e-300))


def is_healthy(s: SettingScore, *, rhat_max: float = RHAT_THRESHOLD, ess_min: float = 50.0, drift_max: float = 1.5) -> bool:
    """No divergence, R-hat ≤ rhat_max, median bulk ESS ≥ ess_min, and no growing drift from w*."""
    return (not s.diverged and s.max_rhat <= rhat_max and s.median_ess_bulk >= ess_min
            and (math.isnan(s.drift_ratio) or s.drift_ratio <= drift_max))


def recommend(scores: Sequence[SettingScore], **thresholds: float) -> tuple[SettingScore, bool]:
    """The best setting and whether it is healthy (see the module docstring for the rule)."""
    live = [s for s in scores if not s.diverged]
    if not live:
        raise ValueError("every calibration setting diverged; lower step_size or raise gamma")
    healthy = [s for s in live if is_healthy(s, **thresholds)]
    pool = healthy or live
    key = (lambda s: (-np.inf if math.isnan(s.lds) else s.lds, -s.max_rhat))
    return max(pool, key=key), bool(healthy)


def grid(largest_stable_step: float, nbeta: float, *, step_fractions: Iterable[float] = STEP_FRACTIONS,
         gamma_per_nbeta: Iterable[float] = GAMMA_PER_NBETA) -> list[tuple[float, float, float]]:
    """(step_size, nbeta, gamma) points of the sweep around the pilot's largest stable step."""
    return [(largest_stable_step * f, nbeta, g * nbeta) for f in step_fractions for g in gamma_per_nbeta]


def sampler_block(base: Mapping[str, Any], best: SettingScore) -> dict[str, Any]:
    """The ``sampler:`` mapping to put in a config: ``base`` with ε, nβ and γ replaced."""
    return {**dict(base), "step_size": float(f"{best.step_size:.4g}"), "nbeta": float(f"{best.nbeta:.6g}"),
            "gamma": float(f"{best.gamma:.4g}")}


def as_records(scores: Iterable[SettingScore]) -> list[dict[str, Any]]:
    return [asdict(s) for s in scores]


def plot_tradeoffs(scores: Sequence[SettingScore], best: SettingScore, path: str) -> None:
    """Two panels: LDS and worst R-hat against step size, one line per γ; diverged settings as ×."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for g in sorted({s.gamma for s in scores}):
        pts = sorted((s for s in scores if s.gamma == g and not s.diverged), key=lambda s: s.step_size)
        if pts:
            xs = [s.step_size for s in pts]
            a1.plot(xs, [s.lds for s in pts], marker="o", label=f"γ={g:.3g}")
            a2.plot(xs, [s.max_rhat for s in pts], marker="o", label=f"γ={g:.3g}")
    for s in scores:
        if s.diverged:
            a1.scatter([s.step_size], [0.0], marker="x", color="red")
    a1.scatter([best.step_size], [best.lds], s=160, facecolors="none", edgecolors="black", label="recommended")
    a1.set(xscale="log", xlabel="step size ε", ylabel="LDS (cheap ground truth)", title="LDS (× = diverged)")
    a2.axhline(1.1, color="grey", ls="--")
    a2.set(xscale="log", xlabel="step size ε", ylabel="max R-hat of loss traces", title="Convergence")
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Choosing the SGLD settings (nβ, γ, ε, batch, draws) on a problem never seen before: the pure parts.

No Prefect, Dask, torch or fsspec here; :mod:`bif.evaluation.calibration` runs the chains and
:mod:`bif.flows.calibrate` wires the search.

**Theory that shapes the search.** The localized, tempered posterior around w* has covariance
≈ (nβ·H + γ·I)⁻¹, so as nβ grows the BIF tends to the classical influence function with damping
λ = γ/nβ (the Laplace limit). Two axes matter: λ (how much the flat directions are damped) and
nβ/n (how far from the Laplace limit). The SGLD drift ε/2·(nβ·H + γ) is stable iff
ε < 4 / (nβ·(λ_max + λ)) with λ_max the top Hessian eigenvalue of L_n at w*
(:func:`step_limit`), so one curvature estimate fixes ε for every (nβ, λ) as a fraction of that
limit; the mixing time in steps, ≈ (λ_max + λ)/(λ_min + λ), does not depend on nβ, so a larger
nβ is nearly free while a smaller λ costs mixing. Full batch is used whenever its step costs at
most ``full_batch_max_cost`` times a minibatch step (minibatch noise grows with nβ).

**Search** (:func:`bif.evaluation.calibration.search`, :func:`survivors`): successive halving. Round 0 scores the
(nβ/n, λ) of a coarse grid on short chains; each later round keeps the best third by LDS
(at least 2), adds the batch / step-fraction variants of the leader, and triples the draws
(or less: :func:`next_draws` scales them to what is left of the budget). Its cost is predicted
from the probe's seconds per step, corrected after each round by the round's measured wall time,
and sized to the budget (300 retrainings, i.e. one full ground-truth build, by default).
Mixing sets the floor (:func:`relaxation_rate`): a flat direction relaxes at 2·frac·λ/(λ_max + λ)
per step whatever nβ, so each search chain burns in for a few relaxation times
(:func:`burnin_steps`) and round 0 runs, at the largest draw count the budget affords, only the
candidates that relax ``min_relaxations`` times in it (:func:`plan_round0`, :func:`admitted`): a small
budget runs fewer, longer chains instead of every candidate at a draw count where its LDS is noise.

**Scoring** (:func:`paired`, :func:`pick`). Each setting's per-query LDS against a cheap ground
truth (many subsets, one seed, independent of the evaluation subsets); two settings are
compared by the paired difference of their per-query LDS, whose standard error is far smaller
than either LDS's. Within ``tie_se`` paired SEs of the best, a setting ties; ties go to the
healthiest (R-hat, ESS), then the larger λ, then the cheaper one.

**Draw budget** (:func:`draws_for_share`). With the Monte-Carlo standard error of every BIF
pair from the winner's traces (batch means, :func:`bif.quality.diagnostics.bif_mcse`), MCSE
scales as 1/√draws, so pair p passes |BIF_p| > 2·MCSE_p from D_p = D·(2·MCSE_p/|BIF_p|)²
draws on (|BIF_p| debiased as √max(BIF² - MCSE², 0)); the recommended draws are the ``target_share``
quantile of D_p.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from bif.config import RHAT_THRESHOLD, SamplerConfig

#: nβ / n of round 0 (and of the grid the benchmark scores).
NBETA_MULTS = (1.0, 10.0, 100.0)
#: Damping λ = γ/nβ of round 0.
LAMBDAS = (0.003, 0.01, 0.03, 0.1, 0.3)
#: Step sizes as fractions of the stability limit 4 / (nβ·(λ_max + λ)).
STEP_FRACTIONS = (0.15, 0.05)
def step_limit(lambda_max: float, nbeta: float, lam: float) -> float:
    """Largest stable SGLD step of the drift ε/2·(nβ·H + γ) on a quadratic: 4 / (nβ·(λ_max + λ)), λ = γ/nβ."""
    if nbeta <= 0:
        raise ValueError(f"nbeta must be > 0, got {nbeta}")
    denom = nbeta * (max(lambda_max, 0.0) + lam)
    if denom <= 0:
        raise ValueError("lambda_max + lambda must be > 0 (a flat loss needs gamma > 0)")
    return 4.0 / denom


@dataclass(frozen=True)
class Candidate:
    """One sampler setting: nβ = mult·n, γ = λ·nβ, ε = frac·step_limit, minibatch ``batch`` (0 = full)."""

    mult: float
    lam: float
    batch: int = 0
    frac: float = STEP_FRACTIONS[0]

    def key(self) -> str:
        return f"nb{self.mult:g}n_lam{self.lam:g}_b{self.batch or 'full'}_f{self.frac:g}"

    def sampler_values(self, n_train: int, lambda_max: float) -> dict[str, float | int]:
        """``nbeta``, ``gamma``, ``step_size``, ``batch_size`` for a SamplerConfig."""
        nbeta = self.mult * n_train
        return {"nbeta": nbeta, "gamma": self.lam * nbeta,
                "step_size": self.frac * step_limit(lambda_max, nbeta, self.lam),
                "batch_size": n_train if self.batch in (0, None) or self.batch >= n_train else int(self.batch)}


@dataclass(frozen=True)
class Job:
    """One setting to evaluate: its sampler block and the search's labels (a picklable task argument).

    Defined here, in a module without torch, with :class:`SettingScore`: the kept cluster's scheduler unpickles
    every task, and the module a class lives in is what it imports (``bif.evaluation.calibration`` imports torch)."""

    sampler: SamplerConfig
    head: dict
    target_share: float | None
    diagnostics: bool = True
    project_draws: int | None = None


@dataclass(frozen=True)
class SettingScore:
    """Diagnostics and LDS of one setting at one draw count (one round of the search)."""

    step_size: float
    nbeta: float
    gamma: float
    diverged: bool
    batch_size: int = 0
    mult: float = math.nan
    lam: float = math.nan
    frac: float = math.nan
    round: int = 0
    num_chains: int = 0
    num_draws: int = 0
    num_burnin_steps: int = 0
    max_rhat: float = math.nan
    median_ess_bulk: float = math.nan
    distance_mean: float = math.nan  # mean ||w - w*|| over all draws and chains
    drift_ratio: float = math.nan  # mean distance of the last quarter / of the second quarter of draws
    lds: float = math.nan
    lds_stderr: float = math.nan
    lds_projected: float = math.nan  # LDS projected to CalibrationSettings.project_draws (projected_lds)
    seconds: float = math.nan
    seconds_per_step: float = math.nan  # wall seconds per chain step (sampling + its share of evaluation)
    draws_for_target: float = math.nan  # draws per chain for the target share of |BIF| > 2 MCSE
    share_now: float = math.nan  # share of pairs with |BIF| > 2 MCSE at num_draws
    draws_curve: tuple[float, ...] = field(default=(), repr=False)  # draws per chain for each of CURVE_SHARES
    per_query: tuple[float, ...] = field(default=(), repr=False)  # LDS per query (cheap ground truth)
    per_query_projected: tuple[float, ...] = field(default=(), repr=False)  # the same, projected

    def metric(self, projected: bool) -> tuple[float, tuple[float, ...]]:
        """(LDS, per-query LDS) used for ranking: the projected ones when asked and available."""
        if projected and math.isfinite(self.lds_projected) and self.per_query_projected:
            return self.lds_projected, self.per_query_projected
        return self.lds, self.per_query


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


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the per-query LDS difference a - b over queries where both are finite.

    The paired SE is sd(a_q - b_q)/√Q; it is much smaller than either LDS's SE when the two
    settings err on the same queries. (nan, nan) with fewer than 2 common queries.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"per-query LDS of different lengths: {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return math.nan, math.nan
    d = x[ok] - y[ok]
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(ok.sum()))


def _robustness(s: SettingScore, rhat_max: float, ess_min: float, drift_max: float) -> tuple:
    """Tie-break key, larger is better: healthy, then larger λ, then cheaper per step."""
    return (is_healthy(s, rhat_max=rhat_max, ess_min=ess_min, drift_max=drift_max),
            -np.inf if math.isnan(s.lam) else s.lam, -(s.seconds_per_step if math.isfinite(s.seconds_per_step) else 0.0))


def pick(scores: Sequence[SettingScore], *, tie_se: float = 1.0, rhat_max: float = RHAT_THRESHOLD,
         ess_min: float = 50.0, drift_max: float = 1.5, projected: bool = False
         ) -> tuple[SettingScore, list[SettingScore]]:
    """The winner among ``scores`` (one round) and the settings that tie with the best.

    The best is the non-diverged setting with the highest LDS (the projected LDS with ``projected``,
    where known). A setting ties when its paired difference to the best is within ``tie_se`` paired
    SEs. Among ties the most robust wins (:func:`_robustness`: healthy, larger λ, cheaper). Raises
    ValueError when every setting diverged.
    """
    live = [s for s in scores if not s.diverged and math.isfinite(s.metric(projected)[0])]
    if not live:
        raise ValueError("every calibration setting diverged (or gave no LDS); lower the step fraction or raise gamma")
    best = max(live, key=lambda s: s.metric(projected)[0])
    top, top_q = best.metric(projected)
    ties = []
    for s in live:
        if s is best:
            ties.append(s)
            continue
        val, q = s.metric(projected)
        diff, se = paired(top_q, q) if top_q and q else (top - val, 0.0)
        if math.isfinite(diff) and diff <= tie_se * (se if math.isfinite(se) else 0.0):
            ties.append(s)
    winner = max(ties, key=lambda s: _robustness(s, rhat_max, ess_min, drift_max))
    return winner, ties


def survivors(scores: Sequence[SettingScore], *, keep: float = 1 / 3, minimum: int = 2,
              projected: bool = False) -> list[SettingScore]:
    """The best ``keep`` share by LDS (projected with ``projected``; at least ``minimum``) of the live settings."""
    live = sorted((s for s in scores if not s.diverged and math.isfinite(s.metric(projected)[0])),
                  key=lambda s: -s.metric(projected)[0])
    return live[:max(minimum, math.ceil(keep * len(live)))]


def variants(c: Candidate, *, minibatch: int | None, fractions: Iterable[float] = STEP_FRACTIONS) -> list[Candidate]:
    """The batch / step-fraction neighbours of ``c``: the other fractions, and ``minibatch`` if given."""
    out = [replace(c, frac=f) for f in fractions if f != c.frac]
    if minibatch:
        out += [replace(c, batch=minibatch, frac=f) for f in fractions]
    return [v for v in out if v != c]


def relaxation_rate(lambda_max: float, lam: float, frac: float) -> float:
    """Per-step contraction of the SGLD drift along a flat direction of L_n (curvature 0): 2·frac·λ/(λ_max + λ).

    With ε = frac · 4/(nβ(λ_max + λ)) the drift ε/2·(nβ·h + γ) contracts a direction of curvature h by
    2·frac·(h + λ)/(λ_max + λ) per step, whatever nβ; the flat directions (h ≈ 0) are the slowest, so
    1/rate is the relaxation time of the chain in steps (its mixing time on the quadratic model), capped at 1.
    """
    denom = max(lambda_max, 0.0) + lam
    if denom <= 0 or frac <= 0:
        return 0.0
    return min(1.0, 2.0 * frac * lam / denom)


def burnin_steps(rate: float, *, relaxations: float | None, cap: int) -> int:
    """Burn-in of a search chain from w*: ``relaxations`` relaxation times (1/rate), at most ``cap`` (the base burn-in).

    A chain started at w* reaches the stationary spread of the quadratic model as 1 - exp(-2·rate·t), so 3
    relaxation times leave 0.25% of it; ``relaxations`` None (or rate 0) keeps ``cap``.
    """
    if relaxations is None or rate <= 0:
        return int(cap)
    return int(min(cap, max(1, math.ceil(relaxations / rate))))


def admitted(rates: Sequence[float], draws: int, *, steps_per_draw: int, min_relaxations: float) -> list[bool]:
    """Which candidates relax at least ``min_relaxations`` times over ``draws`` x ``steps_per_draw`` steps.

    A chain shorter than a few relaxation times gives a BIF that is mostly the start's memory, so its LDS
    says little about the setting; such candidates sit out a round that cannot afford them. The fastest
    relaxing candidates (largest rate) are always admitted, so a round is never empty.
    """
    if not rates:
        return []
    top = max(rates)
    return [r * draws * steps_per_draw >= min_relaxations or r >= top * (1 - 1e-12) for r in rates]


def plan_round0(rates: Sequence[float], cost: Callable[[int, list[bool]], float], *, remaining: float,
                floor: int, max_draws: int, steps_per_draw: int, min_relaxations: float,
                step: int = 10) -> tuple[int, list[bool]]:
    """Round 0's draws per chain and its candidates, sized to the budget.

    The largest ``draws`` in [floor, max_draws] (in steps of ``step``) whose whole plan fits:
    ``cost(draws, mask) <= remaining`` with ``mask = admitted(rates, draws, ...)``. A larger round 0 both
    buys draws and admits the slower-mixing candidates, so a small budget runs fewer, longer chains instead
    of every candidate at a draw count where its LDS is noise. When nothing fits: (floor, its mask).
    """
    best = None
    d = floor
    while d <= max_draws:
        mask = admitted(rates, d, steps_per_draw=steps_per_draw, min_relaxations=min_relaxations)
        if cost(d, mask) <= remaining:
            best = (d, mask)
        d += step
    if best is None:
        return floor, admitted(rates, floor, steps_per_draw=steps_per_draw, min_relaxations=min_relaxations)
    return best


def next_draws(prev: int, cost: Callable[[int, bool], float], *, remaining: float, growth: float = 3.0,
               min_growth: float = 1.5, max_draws: int) -> tuple[int, bool] | None:
    """Draws of the next round and whether it must be the last: (draws, last), or None to stop.

    Tries ``growth`` x ``prev`` draws (capped at ``max_draws``) and less, down to ``min_growth`` x ``prev``,
    with the later rounds still planned (``cost(draws, False)``: this round and the rest); if none fits,
    the same range with this round as the last one (``cost(draws, True)``). Draws that scale with what is
    left, instead of skipping a round that would overrun the budget by a little.
    """
    hi = int(min(max_draws, math.floor(growth * prev)))
    lo = int(min(max_draws, math.ceil(min_growth * prev)))
    if hi < prev:
        return None
    for last in (False, True):
        d = hi
        while d >= lo:
            if cost(d, last) <= remaining:
                return d, last
            d -= max(1, (hi - lo) // 20)
    return None


def chain_steps(num_draws: int, *, burnin: int, steps_per_draw: int) -> int:
    """SGLD steps of one chain."""
    return burnin + num_draws * steps_per_draw


def recommended_draws(total_draws: float, *, num_chains: int, max_num_draws: int, min_num_draws: int = 100) -> int:
    """Draws per chain for ``total_draws`` over ``num_chains`` chains, within [min_num_draws, max_num_draws].

    ``total_draws`` is inf (the target share is never reached) or NaN (no pair with MCSE > 0):
    then ``max_num_draws``, the most the calibrator recommends.
    """
    if not math.isfinite(total_draws):
        return int(max_num_draws)
    return int(min(max(math.ceil(total_draws / num_chains), min_num_draws), max_num_draws))


def draws_for_share(bif: np.ndarray, mcse: np.ndarray, num_draws: int, *, target_share: float) -> float:
    """Draws (in the units of ``num_draws``) at which a ``target_share`` of the pairs have |BIF| > 2·MCSE.

    MCSE ∝ 1/√draws, so pair p passes from D_p = num_draws·(2·MCSE_p/|BIF_p|)² on, with |BIF_p|
    debiased for its own noise (:func:`_debiased`); the answer is
    the ``target_share`` quantile of D_p over pairs with MCSE > 0 (a pair with BIF = 0 never passes:
    D_p = inf). ``inf`` when fewer than ``target_share`` of the pairs can ever pass.
    """
    if not 0.0 < target_share < 1.0:
        raise ValueError(f"target_share must lie in (0, 1), got {target_share}")
    b, m = _debiased(bif, mcse)
    ok = np.isfinite(b) & np.isfinite(m) & (m > 0)
    if not ok.any():
        return math.nan
    with np.errstate(divide="ignore"):
        need = np.where(b[ok] > 0, num_draws * (2.0 * m[ok] / np.where(b[ok] > 0, b[ok], 1.0)) ** 2, np.inf)
    return float(np.quantile(need, target_share, method="inverted_cdf"))  # no interpolation with inf


def _debiased(bif: np.ndarray, mcse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|BIF| with its noise removed, √max(BIF² - MCSE², 0), and MCSE), flattened.

    An estimated |BIF| is inflated by its own noise (E BIF̂² = BIF² + MCSE²); without this, pairs
    with a true BIF near 0 would look as if they passed soon, and the draws would be underestimated
    (measured on digits n = 200: a 0.5 target predicted from 2 x 630 draws gave 0.26 at 4 x 1507).
    """
    b, m = np.asarray(bif, np.float64).ravel(), np.asarray(mcse, np.float64).ravel()
    return np.sqrt(np.maximum(b * b - m * m, 0.0)), m


def share_at(bif: np.ndarray, mcse: np.ndarray, num_draws: int, draws: float) -> float:
    """Share of pairs (MCSE > 0) with |BIF| > 2·MCSE after ``draws`` draws (MCSE ∝ 1/√draws).

    At ``draws == num_draws`` the observed share; otherwise predicted from the debiased |BIF|
    (:func:`_debiased`).
    """
    if draws == num_draws:
        b, m = np.abs(np.asarray(bif, np.float64)).ravel(), np.asarray(mcse, np.float64).ravel()
    else:
        b, m = _debiased(bif, mcse)
    ok = np.isfinite(b) & np.isfinite(m) & (m > 0)
    if not ok.any():
        return math.nan
    return float(np.mean(b[ok] > 2.0 * m[ok] * math.sqrt(num_draws / draws)))


def projected_lds(tau_a: np.ndarray, tau_b: np.ndarray, masks: np.ndarray, per_query: Sequence[float], *,
                  factor: float) -> np.ndarray:
    """Per-query LDS projected to ``factor`` times the draws, from two independent halves of the chains.

    τ_a, τ_b (n_train, n_query) come from disjoint chains; the datamodel predictions g = masks·τ of
    their average carry Monte-Carlo noise of variance N_q = var_m(g_a - g_b)/4 against a total variance
    V_q, so the reliability is r = S/(S + N) with S = V - N. A correlation shrinks like √r under
    independent noise (Spearman's attenuation); with ``factor`` x the draws N shrinks by ``factor``, so

        LDS_q(factor) = LDS_q · √(r(factor) / r),   r(factor) = S / (S + N / factor),

    clipped to [-1, 1]. Queries without signal (S <= 0) keep their observed value. An approximation
    (Pearson attenuation applied to a rank correlation) used to compare settings run with few draws.
    """
    m = np.asarray(masks, dtype=np.float64)
    ga, gb = m @ np.asarray(tau_a, np.float64), m @ np.asarray(tau_b, np.float64)  # (M, Q)
    noise = np.var(ga - gb, axis=0, ddof=1) / 4.0
    total = np.var((ga + gb) / 2.0, axis=0, ddof=1)
    signal = total - noise
    lq = np.asarray(per_query, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(signal > 0, (signal + noise) / (signal + noise / factor), 1.0)
    return np.clip(lq * np.sqrt(ratio), -1.0, 1.0)


#: Shares at which :func:`bif.evaluation.calibration.evaluate_setting` records the draws needed.
CURVE_SHARES = tuple(round(0.05 * k, 2) for k in range(1, 20))


def share_from_curve(curve: Sequence[float], draws: float) -> float:
    """Share of pairs with |BIF| > 2 MCSE after ``draws`` draws per chain, from (CURVE_SHARES, draws needed)."""
    if not curve:
        return math.nan
    passed = [q for q, d in zip(CURVE_SHARES, curve) if math.isfinite(d) and d <= draws]
    return max(passed, default=0.0)


def sampler_block(base: Mapping[str, Any], best: SettingScore, *, num_draws: int | None = None,
                  num_chains: int | None = None, burnin: int | None = None, steps_per_draw: int | None = None
                  ) -> dict[str, Any]:
    """The ``sampler:`` mapping to put in a config: ``base`` with the calibrated values replaced."""
    out = {**dict(base), "step_size": float(f"{best.step_size:.4g}"), "nbeta": float(f"{best.nbeta:.6g}"),
           "gamma": float(f"{best.gamma:.4g}")}
    if best.batch_size:
        out["batch_size"] = int(best.batch_size)
    for k, v in (("num_draws", num_draws), ("num_chains", num_chains), ("num_burnin_steps", burnin),
                 ("steps_per_draw", steps_per_draw)):
        if v is not None:
            out[k] = int(v)
    return out


def as_records(scores: Iterable[SettingScore]) -> list[dict[str, Any]]:
    """JSON-able rows (per-query LDS included)."""
    return [asdict(s) | {"per_query": list(s.per_query)} for s in scores]


def plot_search(scores: Sequence[SettingScore], best: SettingScore, path: str) -> None:
    """Left: LDS heat map over λ x nβ/n (round 0, full batch; the pick circled). Right: LDS by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    r0 = [s for s in scores if s.round == 0]
    mults = sorted({s.mult for s in r0})
    lams = sorted({s.lam for s in r0})
    grid = np.full((len(mults), len(lams)), np.nan)
    for s in r0:
        if not s.diverged:
            grid[mults.index(s.mult), lams.index(s.lam)] = s.lds
    im = a1.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    a1.set_xticks(range(len(lams)), [f"{v:g}" for v in lams])
    a1.set_yticks(range(len(mults)), [f"{v:g}" for v in mults])
    for i in range(len(mults)):
        for j in range(len(lams)):
            a1.text(j, i, "div" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}", ha="center", va="center",
                    fontsize=7, color="white")
    if best.mult in mults and best.lam in lams:
        a1.scatter([lams.index(best.lam)], [mults.index(best.mult)], s=500, facecolors="none", edgecolors="red",
                   linewidths=2)
    a1.set(xlabel="damping λ = γ / nβ", ylabel="nβ / n", title="round 0 LDS (cheap ground truth)")
    fig.colorbar(im, ax=a1, fraction=0.046)
    for s in scores:
        if not s.diverged:
            a2.scatter([s.round], [s.lds], color="tab:blue", alpha=0.6)
    a2.scatter([best.round], [best.lds], s=200, facecolors="none", edgecolors="red", linewidths=2, label="pick")
    a2.set(xlabel="round (draws x3 each)", ylabel="LDS (cheap ground truth)", title="successive halving")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

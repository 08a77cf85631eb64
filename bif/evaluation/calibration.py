"""Run the calibration search: one setting (chains → diagnostics → BIF → LDS), the probe, and the rounds.

No Prefect here; :mod:`bif.flows.calibrate` runs :func:`search` with a ``map_fn`` that sends each
round's settings to Dask as tasks, and ``benchmarks/calibration.py`` runs it in-process. Diagnostics are ArviZ's
rank R-hat and bulk ESS of every per-sample loss trace, computed by the same function as the
attribution run's diagnostics (:func:`bif.quality.diagnostics.rhat_ess`). A setting diverged
when a chain raised :class:`bif.errors.ChainDivergedError`, left w* to a non-finite distance,
or ran away by the rule of the ``health_loss`` gate (:func:`bif.quality.rules.runaway`, with
the ``quality`` defaults; the pilot uses the stricter :data:`PILOT_LOSS_FACTOR` /
:data:`PILOT_LOSS_SLACK`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bif.evaluation import calibrate as C
from bif.evaluation.calibrate import Job, SettingScore, drift_ratio  # Job: defined there, importable here
from bif.config import QualityConfig, SamplerConfig
from bif.errors import ChainDivergedError
from bif.evaluation.lds import lds
from bif.problem import Problem
from bif.moments import bif_in_memory
from bif.evaluation.lds import GroundTruth
from bif.evaluation.settings import CalibrationSettings
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


def evaluate_setting(problem: Problem, sampler: SamplerConfig, gt: GroundTruth | None, *,
                     head: dict | None = None, target_share: float | None = None,
                     diagnostics: bool = True, project_draws: int | None = None) -> SettingScore:
    """Diagnostics, drift and LDS (per query, against ``gt`` if given) of one sampler setting.

    ``project_draws`` (total draws over all chains) adds ``lds_projected`` (:func:`bif.evaluation.calibrate.
    projected_lds` from the two halves of the chains). ``diagnostics=False`` skips R-hat / ESS (round 0 of the search: short chains, and ArviZ's numba
    backend compiles for ~10 s in every fresh process). ``head`` adds the search's labels (mult, lam, frac, round) to the score. With ``target_share``,
    also the draws per chain at which that share of BIF pairs has |BIF| > 2·MCSE
    (:func:`bif.evaluation.calibrate.draws_for_share`, batch-means MCSE of
    :func:`bif.quality.diagnostics.bif_mcse`), as ``draws_for_target``, and the share now.
    """
    nbeta = float(sampler.nbeta if sampler.nbeta is not None else len(problem.train))
    n = len(problem.train)
    head = {"step_size": sampler.step_size, "nbeta": nbeta, "gamma": sampler.gamma,
            "batch_size": min(sampler.batch_size, n), "num_chains": sampler.num_chains,
            "num_draws": sampler.num_draws, "num_burnin_steps": sampler.num_burnin_steps, **(head or {})}
    steps = sampler.num_chains * (sampler.num_burnin_steps + sampler.num_draws * sampler.steps_per_draw)
    t0 = time.perf_counter()
    try:
        train, query, dist = run_chains(problem, sampler)
    except ChainDivergedError:
        return SettingScore(**head, diverged=True, seconds=time.perf_counter() - t0)
    sec = time.perf_counter() - t0
    ref = float(SGLDChain(problem, sampler, chain=0).reference_losses()[0].mean())
    if _diverged_by_loss(train, ref) or not np.isfinite(dist).all():
        return SettingScore(**head, diverged=True, seconds=sec, seconds_per_step=sec / steps)
    score = {"distance_mean": float(dist.mean()), "drift_ratio": drift_ratio(dist)}
    if diagnostics:
        rhat, ess = _rhat_ess(train, query)
        score |= {"max_rhat": float(np.nanmax(rhat)) if np.isfinite(rhat).any() else float("nan"),
                  "median_ess_bulk": float(np.nanmedian(ess))}
    bif = None
    if gt is not None:
        bif, _ = bif_in_memory(train, query)
        res = lds(bif, gt.masks, gt.outputs)
        score |= {"lds": res.mean, "lds_stderr": res.stderr, "per_query": tuple(float(v) for v in res.per_query)}
        c = train.shape[0]
        if project_draws and c >= 2:
            h = c // 2
            ta, tb = bif_in_memory(train[:h], query[:h])[0], bif_in_memory(train[h:], query[h:])[0]
            proj = C.projected_lds(ta, tb, gt.masks, res.per_query, factor=project_draws / (c * train.shape[1]))
            score["lds_projected"] = float(np.nanmean(proj)) if np.isfinite(proj).any() else float("nan")
            score["per_query_projected"] = tuple(float(v) for v in proj)
    if target_share is not None and train.shape[1] >= 20:
        from bif.quality.diagnostics import bif_mcse

        bif = bif_in_memory(train, query)[0] if bif is None else bif
        mcse = bif_mcse(train, query, num_batches=10)
        d = train.shape[1]
        score |= {"draws_for_target": C.draws_for_share(bif, mcse, d, target_share=target_share),
                  "share_now": C.share_at(bif, mcse, d, d),
                  "draws_curve": tuple(C.draws_for_share(bif, mcse, d, target_share=q) for q in C.CURVE_SHARES)}
    return SettingScore(**head, diverged=False, **score, seconds=sec, seconds_per_step=sec / steps)


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


def top_hessian_eigenvalue(problem: Problem, *, num_iter: int = 30, max_samples: int = 2048, seed: int = 0,
                           params: list[str] | None = None) -> float:
    """Largest |eigenvalue| λ_max of the Hessian of the mean train loss L_n at w*, by power iteration on
    Hessian-vector products (double backward; no Hessian is formed).

    Uses the first ``max_samples`` train examples (all of them for small sets). SGLD's drift
    ε/2·(nβ·∇²L + γ) is stable iff ε < 4 / (nβ·(λ_max + γ/nβ)), which :func:`bif.evaluation.calibrate.
    step_limit` turns into the step-size scale of every setting. Returns 0.0 for a loss that is flat at w*.
    """
    import copy

    import torch

    from bif.evaluation.baselines.influence import top_eigenvalue
    from bif.sampling.chain import collate_indices, minibatch_loss, select_params

    model = copy.deepcopy(problem.model).eval()
    ps = [p for _, p in select_params(model, params)]
    n = min(len(problem.train), max_samples)
    loss = minibatch_loss(problem, model, collate_indices(problem.train, torch.arange(n)), n)
    grads = torch.autograd.grad(loss, ps, create_graph=True)
    sizes = [p.numel() for p in ps]

    def hvp(v: torch.Tensor) -> torch.Tensor:  # (P, 1) -> H v (P, 1), by double backward
        parts = [x.view_as(p) for x, p in zip(torch.split(v[:, 0], sizes), ps)]
        hv = torch.autograd.grad(grads, ps, grad_outputs=parts, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).unsqueeze(1)

    return top_eigenvalue(hvp, sum(sizes), iters=num_iter, seed=seed, dtype=ps[0].dtype)


@dataclass(frozen=True)
class Probe:
    """What the search needs to know before round 0: curvature, step costs and the stable step fraction."""

    lambda_max: float  # top Hessian eigenvalue of L_n at w*
    full_step_seconds: float  # one full-batch SGLD step, seconds
    mini_step_seconds: float  # one minibatch SGLD step, seconds
    minibatch: int  # the minibatch size tried (settings.minibatch capped at n / 2)
    fraction_scale: float  # 1.0, or halved until the pilot at the largest nβ and smallest λ stayed stable
    seconds: float


def _step_seconds(problem: Problem, sampler: SamplerConfig, num_steps: int = 10, repeats: int = 3,
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one SGLD step (the median of ``repeats`` timings of ``num_steps`` steps)."""
    chain = SGLDChain(problem, sampler, chain=0)
    chain.sgld_step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(num_steps):
            chain.sgld_step()
        times.append((clock() - t0) / num_steps)
    return float(np.median(times))


def probe(problem: Problem, base: SamplerConfig, st: CalibrationSettings, *,
          clock: Callable[[], float] = time.perf_counter) -> Probe:
    """λ_max (:func:`top_hessian_eigenvalue`), the cost of a full-batch and a minibatch step, and a stability pilot.

    The pilot runs one short chain at the largest nβ/n and smallest λ of the grid with the first step
    fraction; if it diverges or runs away, the fractions are halved (at most 5 times).
    """
    t0 = clock()
    n = len(problem.train)
    lmax = top_hessian_eigenvalue(problem, params=base.params)
    mini = max(1, min(st.minibatch, n // 2))
    tiny = base.model_copy(update={"step_size": 1e-12, "nbeta": float(n), "gamma": 1.0})
    full_s = _step_seconds(problem, tiny.model_copy(update={"batch_size": n}), clock=clock)
    mini_s = _step_seconds(problem, tiny.model_copy(update={"batch_size": mini}), clock=clock)
    scale = 1.0
    for _ in range(5):
        c = C.Candidate(max(st.nbeta_mults), min(st.lambdas), 0, st.step_fractions[0] * scale)
        s = base.model_copy(update=c.sampler_values(n, lmax))
        if pilot_stable(problem, s, s.step_size, num_steps=st.pilot_steps):
            break
        scale /= 2
    return Probe(lmax, full_s, mini_s, mini, scale, clock() - t0)


@dataclass(frozen=True)
class SearchResult:
    """The pick, every score, and what the search cost."""

    best: SettingScore
    healthy: bool
    ties: list[SettingScore]
    scores: list[SettingScore]
    probe: Probe
    rounds: list[dict]
    budget_seconds: float
    spent_seconds: float
    num_draws: int  # recommended draws per chain (num_chains chains)
    num_chains: int
    predicted_share: float  # predicted share of pairs with |BIF| > 2 MCSE at num_draws
    run_seconds: float  # predicted wall time of the recommended run (chains in parallel)
    note: str = ""


def _planned_seconds(counts: list[int], draws: list[int], *, chains: int, burnin: int, steps_per_draw: int,
                     step_s: float, parallelism: int) -> float:
    """Wall time of rounds with counts[r] settings of draws[r] draws (a draw costs about one more step)."""
    steps = sum(k * chains * C.chain_steps(d, burnin=burnin, steps_per_draw=steps_per_draw + 1)
                for k, d in zip(counts, draws))
    return steps * step_s / max(1, parallelism)


def search(problem: Problem, base: SamplerConfig, gt: GroundTruth, st: CalibrationSettings, *,
           budget_seconds: float, spent_seconds: float = 0.0, parallelism: int = 1,
           map_fn: Callable[[list[Job]], list[SettingScore]] | None = None, probe_result: Probe | None = None,
           log: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter) -> SearchResult:
    """Successive halving over (nβ/n, λ, batch, step fraction), sized to ``budget_seconds`` of wall time.

    ``spent_seconds`` already went (the cheap ground truth); ``map_fn(jobs)`` evaluates a round's
    settings (default: in this process, one after the other) and ``parallelism`` says how many run at
    once. Round 0: every (nβ/n, λ) of the settings at the first step fraction and the batch the probe
    chose; round r+1 keeps the best ``keep`` share, adds the leader's batch / step variants after round
    0, and triples the draws. Round 0's draws are the most that fit the budget
    (:func:`bif.evaluation.calibrate.plan_round0`, at least ``min_round0_draws``); a candidate that would
    not relax ``min_relaxations`` times in them sits out (only when the draws are sized to the budget).
    Every plan keeps ``1 - plan_margin`` of what is left in reserve (the wall time of a round on a shared
    machine varies by tens of percent). Each search chain burns in for ``burnin_relaxations`` relaxation times (at most the base burn-in).
    A later round gets the draws that fit what is left (:func:`bif.evaluation.calibrate.next_draws`:
    x3, or less, or as the last round); a round that fits at less than 1.5x the previous draws is skipped.
    ``clock`` measures the budget (wall time by default; the benchmark passes the process's CPU time,
    which a shared machine's load does not inflate). The winner is :func:`bif.evaluation.calibrate.pick`
    of the last round; its MCSE gives the recommended
    ``num_draws``.
    """
    t_start = clock() - spent_seconds
    n = len(problem.train)
    if map_fn is None:
        def map_fn(jobs):
            return [evaluate_setting(problem, j.sampler, gt, head=j.head, target_share=j.target_share,
                                     diagnostics=j.diagnostics, project_draws=j.project_draws) for j in jobs]
    pr = probe_result or probe(problem, base, st, clock=clock)
    full = pr.full_step_seconds <= st.full_batch_max_cost * pr.mini_step_seconds
    batch0, other = (0, pr.minibatch) if full else (pr.minibatch, 0)
    step_s = [pr.full_step_seconds if full else pr.mini_step_seconds]  # of round 0's batch; corrected each round
    # a step of the other batch costs what the probe measured, relative to round 0's batch
    rel = {batch0: 1.0, other: (pr.mini_step_seconds / pr.full_step_seconds if full
                                else pr.full_step_seconds / pr.mini_step_seconds)}
    fracs = [f * pr.fraction_scale for f in st.step_fractions]
    grid = [C.Candidate(m, lam, batch0, fracs[0]) for m in st.nbeta_mults for lam in st.lambdas]
    burnin, spd, chains = base.num_burnin_steps, base.steps_per_draw, st.search_chains

    def rate(c: C.Candidate) -> float:
        return C.relaxation_rate(pr.lambda_max, c.lam, c.frac)

    def burn(c: C.Candidate) -> int:
        return C.burnin_steps(rate(c), relaxations=st.burnin_relaxations, cap=burnin)

    def seconds(counts: list[int], draws: list[int], b: int, factor: float = 1.0) -> float:
        return _planned_seconds(counts, draws, chains=chains, burnin=b, steps_per_draw=spd,
                                step_s=step_s[0] * factor, parallelism=parallelism)

    def round_cost(cands: list[C.Candidate], d: int) -> float:
        return sum(seconds([1], [d], burn(c), rel.get(c.batch, 1.0)) for c in cands)

    worst = max(rel.values())  # later rounds hold both batches: plan them at the dearer step

    def later_counts(k0: int) -> list[int]:
        counts = [k0]
        for r in range(1, st.num_rounds):
            counts.append(max(2, math.ceil(st.keep * counts[-1])) + (len(fracs) * 2 - 1 if r == 1 else 0))
        return counts[1:]

    def later_burnin(cands: list[C.Candidate]) -> int:  # the slowest of the candidates and their step variants
        return max((burn(C.Candidate(c.mult, c.lam, c.batch, f)) for c in cands for f in fracs), default=burnin)

    def plan_cost(d0: int, mask: list[bool]) -> float:
        cands = [c for c, ok in zip(grid, mask) if ok]
        draws = [min(st.max_draws, d0 * 3 ** r) for r in range(1, st.num_rounds)]
        return round_cost(cands, d0) + seconds(later_counts(len(cands)), draws, later_burnin(cands), worst)

    remaining = budget_seconds - (clock() - t_start)
    if st.round0_draws is not None:
        d0, mask = st.round0_draws, [True] * len(grid)
    else:
        d0, mask = C.plan_round0([rate(c) for c in grid], plan_cost, remaining=st.plan_margin * remaining,
                                 floor=st.min_round0_draws, max_draws=st.max_draws, steps_per_draw=spd,
                                 min_relaxations=st.min_relaxations)
    cands = [c for c, ok in zip(grid, mask) if ok]
    left_out = [c for c, ok in zip(grid, mask) if not ok]
    log(f"probe: λ_max {pr.lambda_max:.4g}, step {pr.full_step_seconds * 1e3:.2f} ms full batch / "
        f"{pr.mini_step_seconds * 1e3:.2f} ms batch {pr.minibatch} -> round 0 with "
        f"{'the full batch' if full else f'batch {pr.minibatch}'}; step fractions {', '.join(f'{f:g}' for f in fracs)}")
    log(f"budget {budget_seconds:.0f} s, {budget_seconds - remaining:.0f} s spent; round 0: {len(cands)} settings "
        f"at {d0} draws x {chains} chains (planned {plan_cost(d0, mask):.0f} s for all rounds)"
        + (f"; left out, too slow to mix in {d0} draws: λ = "
           + ", ".join(sorted({f'{c.lam:g}' for c in left_out})) if left_out else ""))
    scores: list[SettingScore] = []
    rounds: list[dict] = []
    last: list[SettingScore] = []
    note = f"round 0 left out {len(left_out)} slow-mixing settings" if left_out else ""
    draws, final = d0, st.num_rounds == 1
    for r in range(st.num_rounds):
        if r > 0:
            left = budget_seconds - (clock() - t_start)

            def cost(d: int, last_round: bool) -> float:
                rest, k = [], len(cands)
                for _ in range(0 if last_round else st.num_rounds - 1 - r):
                    k = max(2, math.ceil(st.keep * k))
                    rest.append(k)
                ds = [min(st.max_draws, d * 3 ** k) for k in range(1, len(rest) + 1)]
                return round_cost(cands, d) + seconds(rest, ds, later_burnin(cands), worst)

            nxt = C.next_draws(draws, cost, remaining=st.plan_margin * left, max_draws=st.max_draws)
            if nxt is None:
                msg = (f"stopped after round {r - 1}: round {r} would take ~{cost(math.ceil(1.5 * draws), True):.0f} s "
                       f"at 1.5x the draws, {max(left, 0):.0f} s left")
                note += ("; " if note else "") + msg
                log(msg)
                break
            draws, final = nxt[0], nxt[1] or r == st.num_rounds - 1
        jobs = [Job(base.model_copy(update={**c.sampler_values(n, pr.lambda_max), "num_chains": chains,
                                            "num_draws": draws, "num_burnin_steps": burn(c)}),
                    {"mult": c.mult, "lam": c.lam, "frac": c.frac, "round": r}, st.target_share,
                    diagnostics=r > 0 or st.num_rounds == 1, project_draws=st.project_draws) for c in cands]
        planned = round_cost(cands, draws)
        t0 = clock()
        last = map_fn(jobs)
        scores += last
        rounds.append({"round": r, "settings": len(jobs), "draws": draws, "chains": chains,
                       "seconds": clock() - t0})
        if planned > 0:  # plan the next rounds at the cost this round actually had (evaluation, load included)
            step_s[0] *= rounds[-1]["seconds"] / planned
        live = [s for s in last if not s.diverged]
        log(f"round {r}: {len(jobs)} settings x {draws} draws in {rounds[-1]['seconds']:.1f} s; "
            f"{len(jobs) - len(live)} diverged; best LDS "
            + (f"{max(s.lds for s in live):+.3f}" if live else "n/a")
            + (f" (projected to {st.project_draws} draws {max(s.lds_projected for s in live):+.3f})"
               if live and st.project_draws else ""))
        if final:
            break
        keep = C.survivors(last, keep=st.keep, projected=bool(st.project_draws))
        if not keep:
            break
        nxt = [C.Candidate(s.mult, s.lam, 0 if s.batch_size >= n else s.batch_size, s.frac) for s in keep]
        if r == 0:
            nxt += C.variants(nxt[0], minibatch=other or None, fractions=fracs)
            if other == 0:  # round 0 ran a minibatch: the variant is the full batch
                nxt += [C.Candidate(nxt[0].mult, nxt[0].lam, 0, f) for f in fracs]
        cands = list(dict.fromkeys(nxt))
    best, ties = C.pick(last, tie_se=st.tie_se, rhat_max=st.rhat_max, ess_min=st.ess_min, drift_max=st.drift_max,
                        projected=bool(st.project_draws))
    healthy = C.is_healthy(best, rhat_max=st.rhat_max, ess_min=st.ess_min, drift_max=st.drift_max)
    total = best.draws_for_target * best.num_chains if math.isfinite(best.draws_for_target) else math.inf
    num_draws = C.recommended_draws(total, num_chains=st.num_chains, max_num_draws=st.max_num_draws)
    if not math.isfinite(total) or total / st.num_chains > st.max_num_draws:
        note += ("; " if note else "") + (f"the target share {st.target_share:g} of |BIF| > 2 MCSE is not reached "
                                          f"within {st.max_num_draws} draws per chain")
    share = C.share_from_curve(best.draws_curve, num_draws * st.num_chains / max(best.num_chains, 1))
    run_s = best.seconds_per_step * st.num_chains * C.chain_steps(num_draws, burnin=burnin, steps_per_draw=spd) \
        / max(1, min(st.num_chains, parallelism))
    return SearchResult(best=best, healthy=healthy, ties=ties, scores=scores, probe=pr, rounds=rounds,
                        budget_seconds=budget_seconds, spent_seconds=clock() - t_start,
                        num_draws=num_draws, num_chains=st.num_chains, predicted_share=share, run_seconds=run_s,
                        note=note)

"""Calibration: the pure rules (step limit, paired ties, draw budget on an AR(1) trace with known MCSE),
the search in-process on a problem with a known good answer, and the flow end to end."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import yaml

from bif.config import SamplerConfig, build_config
from bif.evaluation import calibrate as C
from bif.evaluation.calibration import evaluate_setting, pilot_stable, search, top_hessian_eigenvalue
from bif.evaluation.lds import draw_subsets
from bif.evaluation.retrain import ground_truth
from bif.evaluation.settings import CalibrationSettings
from bif.examples.logistic import build

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def problem():
    return build(n=40, n_query=6)


def _s(lds, per_query=(), *, lam=0.01, diverged=False, rhat=1.01, ess=200.0, drift=1.0, sps=1e-3, mult=10.0):
    lds = float(np.mean(per_query)) if len(per_query) else lds
    return C.SettingScore(step_size=0.1, nbeta=40.0 * mult, gamma=40.0 * mult * lam, diverged=diverged,
                          mult=mult, lam=lam, max_rhat=rhat, median_ess_bulk=ess, drift_ratio=drift, lds=lds,
                          seconds_per_step=sps, per_query=tuple(per_query))


def test_step_limit_and_candidates_follow_the_stability_rule():
    assert C.step_limit(0.5, 100.0, 0.01) == pytest.approx(4 / (100 * 0.51))
    c = C.Candidate(mult=30.0, lam=0.01, batch=0, frac=0.5)
    v = c.sampler_values(200, 0.5)
    assert v["nbeta"] == 6000.0 and v["gamma"] == pytest.approx(60.0) and v["batch_size"] == 200
    assert v["step_size"] == pytest.approx(0.5 * 4 / (6000 * 0.51))
    assert C.Candidate(1.0, 0.1, batch=64).sampler_values(40, 1.0)["batch_size"] == 40  # capped at n: full
    with pytest.raises(ValueError, match="gamma > 0"):
        C.step_limit(0.0, 10.0, 0.0)


def test_paired_difference_has_the_paired_standard_error():
    rng = np.random.default_rng(0)
    common = rng.normal(0.6, 0.2, size=100)  # both settings err on the same queries
    a, b = common + 0.02 + rng.normal(0, 0.01, 100), common + rng.normal(0, 0.01, 100)
    diff, se = C.paired(a, b)
    assert diff == pytest.approx(0.02, abs=0.005) and se < 0.003  # each LDS alone has SE ~0.02
    assert C.paired([1.0, math.nan], [0.5, 0.2]) == (math.nan, math.nan) or math.isnan(C.paired([1.0, math.nan], [0.5, 0.2])[0])
    with pytest.raises(ValueError, match="different lengths"):
        C.paired([1.0, 2.0], [1.0])


def test_pick_breaks_ties_toward_the_robust_setting_and_never_a_diverged_one():
    rng = np.random.default_rng(1)
    base = rng.normal(0.6, 0.2, size=80)
    noise = rng.normal(0, 0.02, 80)
    noise -= noise.mean()
    best = _s(0.0, base + 0.02, lam=0.001)  # best LDS but only 0.001 above the next, paired SE ~0.002: a tie
    tie = _s(0.0, base + 0.019 + noise, lam=0.03)
    worse = _s(0.5, base - 0.1, lam=0.1)  # clearly worse (paired), larger λ does not save it
    div = _s(math.nan, lam=0.1, diverged=True)
    winner, ties = C.pick([best, tie, worse, div])
    assert winner is tie and {id(t) for t in ties} == {id(best), id(tie)}
    # an unhealthy tie loses to a healthy one even with the larger λ
    sick = _s(0.0, base + 0.019 + noise, lam=0.1, rhat=1.6)
    assert C.pick([best, sick])[0] is best
    # without per-query values a tie needs an equal LDS
    assert C.pick([_s(0.7, lam=0.001), _s(0.69, lam=0.1)])[0].lds == 0.7
    with pytest.raises(ValueError, match="every calibration setting diverged"):
        C.pick([div])
    kept = C.survivors([_s(v) for v in (0.1, 0.5, 0.3, 0.2, 0.4, 0.6)] + [div])
    assert [s.lds for s in kept] == [0.6, 0.5]
    assert not C.is_healthy(_s(0.9, drift=3.0)) and not C.is_healthy(_s(0.9, ess=10.0))


def test_variants_and_round_sizing():
    c = C.Candidate(10.0, 0.01, 0, 0.5)
    vs = C.variants(c, minibatch=16, fractions=(0.5, 0.15))
    assert set(vs) == {C.Candidate(10.0, 0.01, 0, 0.15), C.Candidate(10.0, 0.01, 16, 0.5),
                       C.Candidate(10.0, 0.01, 16, 0.15)}
    # the search's plan: settings x chains x (burn-in + draws x (steps per draw + 1 for the evaluation))
    # steps at the measured seconds per step, over the workers running at once
    from bif.evaluation.calibration import _planned_seconds

    got = _planned_seconds([10, 3], [100, 300], chains=2, burnin=100, steps_per_draw=5, step_s=1e-3, parallelism=2)
    assert got == pytest.approx((10 * 2 * (100 + 100 * 6) + 3 * 2 * (100 + 300 * 6)) * 1e-3 / 2)


def test_relaxation_rate_burnin_and_the_budget_sized_round_0():
    # the flat-direction contraction of ε/2·(nβ h + γ) with ε = frac·4/(nβ(λ_max + λ)), h = 0, whatever nβ
    assert C.relaxation_rate(0.98, 0.1, 0.15) == pytest.approx(2 * 0.15 * 0.1 / 1.08)
    assert C.relaxation_rate(0.0, 0.1, 0.9) == 1.0 and C.relaxation_rate(1.0, 0.0, 0.15) == 0.0
    nbeta, lam, lmax, frac = 800.0, 0.1, 0.98, 0.15  # the rate is the drift's contraction on a flat direction
    eps = frac * C.step_limit(lmax, nbeta, lam)
    assert eps / 2 * (nbeta * 0.0 + lam * nbeta) == pytest.approx(C.relaxation_rate(lmax, lam, frac))
    assert C.burnin_steps(0.0278, relaxations=3, cap=500) == 108
    assert C.burnin_steps(0.001, relaxations=3, cap=500) == 500 and C.burnin_steps(0.5, relaxations=None, cap=500) == 500
    # 500 steps: 0.5, 5 and 50 relaxation times; the fastest always runs
    assert C.admitted([0.001, 0.01, 0.1], 100, steps_per_draw=5, min_relaxations=10) == [False, False, True]
    assert C.admitted([0.001, 0.01, 0.1], 100, steps_per_draw=5, min_relaxations=0) == [True] * 3
    assert C.admitted([0.001, 0.001], 1, steps_per_draw=1, min_relaxations=10) == [True, True]

    def cost(d, mask):  # seconds: draws x admitted candidates
        return d * sum(mask)

    kw = dict(floor=40, max_draws=2000, steps_per_draw=5, min_relaxations=10)
    # admitted from d >= 2/rate: 20, 200, 2000 draws
    assert C.plan_round0([0.001, 0.01, 0.1], cost, remaining=150, **kw) == (150, [False, False, True])
    assert C.plan_round0([0.001, 0.01, 0.1], cost, remaining=1000, **kw) == (500, [False, True, True])
    assert C.plan_round0([0.001, 0.01, 0.1], cost, remaining=1e5, **kw) == (2000, [True, True, True])
    assert C.plan_round0([0.001, 0.01, 0.1], cost, remaining=10, **kw) == (40, [False, False, True])

    def later(d, last):  # this round d, the rest (when planned) as much again
        return d * (1 if last else 2)

    assert C.next_draws(100, later, remaining=700, max_draws=2000) == (300, False)
    d, last = C.next_draws(100, later, remaining=400, max_draws=2000)
    assert 150 <= d <= 200 and not last
    d, last = C.next_draws(100, later, remaining=200, max_draws=2000)
    assert 150 <= d <= 200 and last
    assert C.next_draws(100, later, remaining=100, max_draws=2000) is None
    assert C.next_draws(1500, later, remaining=1e9, max_draws=2000) == (2000, False)


def test_search_sizes_rounds_by_mixing_and_stays_inside_its_budget():
    """The search's planning on a simulated clock (chains cost 2x the probe's step, evaluation included):
    a small budget runs only the candidates that relax 10 times in round 0's draws, burns each in for 3
    relaxation times, and ends inside the budget; a large one runs the whole grid."""
    from bif.evaluation.calibration import Probe

    class Sim:  # a problem of n = 800 and a clock that only chains advance
        train = range(800)
        now = 0.0

    pr = Probe(lambda_max=0.98, full_step_seconds=1.3e-3, mini_step_seconds=0.8e-3, minibatch=64,
               fraction_scale=1.0, seconds=0.5)

    def fake_map(jobs):
        out = []
        for j in jobs:
            s = j.sampler
            steps = s.num_chains * (s.num_burnin_steps + s.num_draws * (s.steps_per_draw + 1))
            sec = steps * 2 * (pr.full_step_seconds if s.batch_size == 800 else pr.mini_step_seconds)
            Sim.now += sec
            lds = 0.6 - 0.1 * abs(math.log10(j.head["lam"] / 0.1)) - 0.02 * math.log10(j.head["mult"])
            out.append(C.SettingScore(step_size=s.step_size, nbeta=s.nbeta, gamma=s.gamma, diverged=False,
                                      batch_size=s.batch_size, num_chains=s.num_chains, num_draws=s.num_draws,
                                      num_burnin_steps=s.num_burnin_steps, lds=lds, per_query=(lds,) * 4,
                                      max_rhat=1.0, median_ess_bulk=500.0, seconds=sec,
                                      seconds_per_step=sec / steps, **j.head))
        return out

    base = SamplerConfig(num_burnin_steps=500, steps_per_draw=5)
    st = CalibrationSettings()
    Sim.now = 0.0
    res = search(Sim(), base, None, st, budget_seconds=110.0, spent_seconds=22.0, map_fn=fake_map, probe_result=pr,
                 log=lambda _: None, clock=lambda: Sim.now)
    r0 = [s for s in res.scores if s.round == 0]
    d0 = res.rounds[0]["draws"]
    assert len(r0) < len(st.nbeta_mults) * len(st.lambdas) and "left out" in res.note
    for s in res.scores:
        rate = C.relaxation_rate(pr.lambda_max, s.lam, s.frac)
        assert s.num_burnin_steps == min(500, math.ceil(3 / rate))
        if s.round == 0:
            assert rate * d0 * base.steps_per_draw >= st.min_relaxations or s.lam == max(st.lambdas)
    assert len(res.rounds) >= 2 and res.rounds[1]["draws"] > d0 and res.spent_seconds <= 110.0
    assert res.best.lam == 0.1 and res.best.mult == 1.0
    Sim.now = 0.0
    big = search(Sim(), base, None, st, budget_seconds=1e5, map_fn=fake_map, probe_result=pr,
                 log=lambda _: None, clock=lambda: Sim.now)
    # round 0 at the most draws a round may have (2000); λ = 0.003 relaxes only 9.2 times in them
    assert big.rounds[0]["draws"] == st.max_draws and big.spent_seconds <= 1e5
    assert big.rounds[0]["settings"] == len(st.nbeta_mults) * (len(st.lambdas) - 1)
    assert C.relaxation_rate(0.98, 0.003, 0.15) * 2000 * 5 == pytest.approx(9.16, abs=0.01)
    assert [r["draws"] for r in big.rounds] == [2000] * st.num_rounds


def _ar1(rng, shape, phi):
    """Stationary unit-variance AR(1) along axis 1 of shape (chains, draws, k)."""
    x = np.empty(shape)
    x[:, 0] = rng.normal(size=(shape[0], shape[2]))
    e = rng.normal(size=shape) * math.sqrt(1 - phi * phi)
    for t in range(1, shape[1]):
        x[:, t] = phi * x[:, t - 1] + e[:, t]
    return x


def test_draw_budget_matches_the_known_mcse_of_an_ar1_trace():
    """x and e independent AR(1) (φ), y_j = ρ_j x + √(1-ρ_j²) e_j: BIF_j = -ρ_j and the MCSE of the mean of
    x·y over N draws is √((1+ρ²)(1+φ²)/((1-φ²)N)), so pair j passes |BIF| > 2 MCSE from
    N_j = 4(1+ρ²)(1+φ²)/((1-φ²)ρ²) draws in all."""
    from bif.moments import bif_in_memory
    from bif.quality.diagnostics import bif_mcse

    rng = np.random.default_rng(3)
    chains, draws, phi = 4, 4000, 0.6
    rho = np.linspace(0.08, 0.5, 8)
    x = _ar1(rng, (chains, draws, 1), phi)
    e = _ar1(rng, (chains, draws, rho.size), phi)
    y = rho * x + np.sqrt(1 - rho ** 2) * e  # (C, D, 8)
    bif, _ = bif_in_memory(x, y)
    mcse = bif_mcse(x, y, num_batches=20)
    known = np.sqrt((1 + rho ** 2) * (1 + phi ** 2) / ((1 - phi ** 2) * chains * draws))
    assert np.allclose(mcse[0], known, rtol=0.35)
    assert np.allclose(-bif[0], rho, atol=4 * known.max())
    need = 4 * (1 + rho ** 2) * (1 + phi ** 2) / ((1 - phi ** 2) * rho ** 2) / chains  # draws per chain
    got = C.draws_for_share(bif, mcse, draws, target_share=0.5)
    assert got == pytest.approx(np.quantile(need, 0.5), rel=0.5)
    assert C.share_at(bif, mcse, draws, 10 * need.max()) == 1.0
    assert C.share_at(bif, mcse, draws, 0.2 * need.min()) == 0.0
    # zero BIF never passes: a target above the share of nonzero pairs is unreachable
    z = np.concatenate([bif, np.zeros_like(bif)], axis=1)
    m = np.concatenate([mcse, mcse], axis=1)
    assert C.draws_for_share(z, m, draws, target_share=0.75) == math.inf
    # an unreachable (inf) or undefined (NaN) target recommends the cap, never crashes (digits n = 800 did)
    assert C.recommended_draws(math.inf, num_chains=4, max_num_draws=4000) == 4000
    assert C.recommended_draws(math.nan, num_chains=4, max_num_draws=4000) == 4000
    assert C.recommended_draws(6001.0, num_chains=4, max_num_draws=4000) == 1501
    assert C.recommended_draws(40.0, num_chains=4, max_num_draws=4000) == 100
    assert C.share_from_curve(tuple(np.full(19, 50.0)), 60) == 0.95 and C.share_from_curve((), 1) != 0.0
    with pytest.raises(ValueError, match="target_share"):
        C.draws_for_share(bif, mcse, draws, target_share=1.0)


def test_top_hessian_eigenvalue_is_the_exact_one_on_softmax_regression(problem):
    """Power iteration on HVPs against the explicit Hessian of the mean loss (float64 logistic problem)."""
    from torch.func import functional_call, hessian

    names = [n for n, _ in problem.model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in problem.model.parameters()])
    shapes = [p.shape for p in problem.model.parameters()]
    x, y = problem.train.tensors

    def loss(v):
        parts, i = {}, 0
        for name, s in zip(names, shapes):
            parts[name] = v[i:i + s.numel()].reshape(s)
            i += s.numel()
        return torch.nn.functional.cross_entropy(functional_call(problem.model, parts, (x,)), y)

    exact = float(torch.linalg.eigvalsh(hessian(loss)(flat)).abs().max())
    assert top_hessian_eigenvalue(problem, num_iter=100) == pytest.approx(exact, rel=1e-3)


def test_huge_step_size_is_flagged_diverged_and_a_small_one_is_not(problem):
    base = SamplerConfig(num_chains=2, num_draws=20, num_burnin_steps=10, steps_per_draw=2, batch_size=40,
                         gamma=4.0)
    huge = evaluate_setting(problem, base.model_copy(update={"step_size": 50.0}), None)
    assert huge.diverged and math.isnan(huge.lds)
    assert not pilot_stable(problem, base, 50.0, num_steps=50)
    ok = evaluate_setting(problem, base.model_copy(update={"step_size": 1e-2}), None, diagnostics=False)
    assert not ok.diverged and math.isnan(ok.max_rhat) and ok.distance_mean > 0 and ok.seconds_per_step > 0
    assert pilot_stable(problem, base, 1e-2, num_steps=50)


def test_search_beats_a_deliberately_bad_setting():
    """In-process search on the logistic problem must pick a setting whose LDS on an independent ground
    truth beats a deliberately bad start: nβ = 100n with damping λ = 0.001, where the chains wander along
    weakly curved directions and the BIF is mostly Monte-Carlo noise at 2 x 200 draws (measured: ~0.19 vs
    ~0.88 for nβ = n, λ = 0.1)."""
    problem = build(n=40, n_query=30)
    n = len(problem.train)
    gt = ground_truth(problem, draw_subsets(n, num_subsets=30, seed=1), num_seeds=1)
    st = CalibrationSettings(num_subsets=30, nbeta_mults=(1.0, 30.0), lambdas=(0.003, 0.1), num_rounds=2,
                             round0_draws=40, minibatch=20)
    base = SamplerConfig(num_burnin_steps=50, steps_per_draw=2)
    res = search(problem, base, gt, st, budget_seconds=600.0, log=lambda _: None)
    assert len(res.rounds) == 2 and res.rounds[0]["settings"] == 4 and res.rounds[1]["draws"] == 120
    assert not res.best.diverged and res.best.round == 1 and res.best.lds > 0.5
    assert res.best.num_draws == 120 and math.isfinite(res.best.max_rhat) and math.isfinite(res.best.lds_projected)
    assert 100 <= res.num_draws <= st.max_num_draws and res.run_seconds > 0
    # scored against an independent ground truth (other subsets), the pick beats the bad start
    check = ground_truth(problem, draw_subsets(n, num_subsets=30, seed=7), num_seeds=1)
    good = base.model_copy(update={"step_size": res.best.step_size, "nbeta": res.best.nbeta,
                                   "gamma": res.best.gamma, "batch_size": res.best.batch_size,
                                   "num_chains": 2, "num_draws": 200})
    bad = base.model_copy(update={**C.Candidate(100.0, 0.001, 0, 0.15).sampler_values(n, res.probe.lambda_max),
                                  "num_chains": 2, "num_draws": 200})
    g, b = (evaluate_setting(problem, s, check, diagnostics=False) for s in (good, bad))
    diff, se = C.paired(g.per_query, b.per_query)
    assert g.lds > b.lds + 0.2 and diff > 3 * se, (g.lds, b.lds, diff, se)


@pytest.mark.slow  # ~100 s on the shared 2-core box (Dask cluster, Prefect, numba compile per worker); the
# default suite runs the same flow through `bif calibrate --quick` in tests/test_cli.py
def test_calibration_flow_writes_a_block_within_its_budget(tmp_path, prefect_api_url):
    from bif.flows.calibrate import calibrate_flow

    cfg = build_config({"problem": "bif.examples.logistic:build", "problem_args": {"n": 40, "n_query": 6},
                        "output": str(tmp_path / "out"),
                        "sampler": {"num_burnin_steps": 50, "steps_per_draw": 2, "batch_size": 40},
                        "compute": {"n_workers": 2}})
    st = CalibrationSettings(num_subsets=10, nbeta_mults=(3.0, 30.0), lambdas=(0.01, 0.1), num_rounds=2,
                             round0_draws=30, pilot_steps=40)
    res = calibrate_flow(config=cfg.public_dict() | {"storage_options": {}}, settings=st.model_dump(mode="json"))
    rec = res["recommended"]
    assert not rec["diverged"] and rec["lds"] > 0.3
    # the default budget: 300 retrainings at the measured wall time per retraining; round 1 runs only if it fits
    assert res["budget_seconds"] == pytest.approx(300 * res["seconds_per_retraining"])
    assert res["probe"]["lambda_max"] > 0 and rec["round"] == len(res["rounds"]) - 1
    assert rec["step_size"] <= 0.15 * C.step_limit(res["probe"]["lambda_max"], rec["nbeta"], rec["lam"]) * (1 + 1e-9)
    assert len(res["scores"]) == sum(r["settings"] for r in res["rounds"]) and res["rounds"][0]["settings"] == 4
    out = tmp_path / "out" / "calibration"
    block = yaml.safe_load((out / "sampler.yaml").read_text())["sampler"]
    s = SamplerConfig(**block)
    assert s.step_size == pytest.approx(rec["step_size"], rel=1e-3) and s.num_draws == res["num_draws"]
    assert s.num_chains == 4 and s.batch_size == rec["batch_size"]
    assert os.path.getsize(out / "search.png") > 5000 and (out / "scores.json").exists()


def test_projected_lds_predicts_the_lds_with_more_draws():
    """Two noisy halves of τ: the LDS projected to 4x the draws matches the LDS of a τ with 4x less noise."""
    from bif.evaluation.lds import lds

    rng = np.random.default_rng(5)
    n, q, m, sigma = 120, 60, 80, 0.6
    tau = rng.normal(size=(n, q))
    masks = draw_subsets(n, num_subsets=m, seed=2)
    outputs = masks @ tau + rng.normal(0, 2.0, size=(m, q))
    ta, tb = tau + rng.normal(0, sigma, (n, q)), tau + rng.normal(0, sigma, (n, q))
    now = lds((ta + tb) / 2, masks, outputs)
    proj = C.projected_lds(ta, tb, masks, now.per_query, factor=4.0)
    more = lds(tau + rng.normal(0, sigma / math.sqrt(2 * 4.0), (n, q)), masks, outputs)
    assert more.mean - now.mean > 0.03  # the noise matters here
    assert float(np.mean(proj)) == pytest.approx(more.mean, abs=0.015)
    assert np.allclose(C.projected_lds(ta, tb, masks, now.per_query, factor=1.0), now.per_query)


def test_diabetes_example_is_a_regression_problem_with_fit():
    """The tabular example of the calibration benchmark: its config loads, w* fits, and `fit` retrains."""
    from pathlib import Path

    from bif.config import load_config
    from bif.problem import load_problem

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "bif" / "examples" / "diabetes.yaml"))
    p = load_problem(cfg.problem, cfg.problem_args)
    assert (len(p.train), len(p.query)) == (342, 100) and cfg.sampler.batch_size == len(p.train)
    x, y = p.train.tensors
    refit = p.fit(p.train, 1)
    with torch.no_grad():
        fitted, fresh = p.loss(p.model, [x, y]), p.loss(refit, [x, y])
    assert fitted.shape == (342,) and float(fitted.mean()) < 0.5 and float(fresh.mean()) < 0.5  # y has variance 1
    assert isinstance(p.render("query", 0), str)


def test_calibrate_options_reach_the_settings():
    """`bif calibrate`'s budget options (its description names --budget-retrainings; it had no such option), and
    --quick's grid under options that name their own."""
    from bif.flows.cli import build_parser
    from bif.flows.cli_lds import calibration_settings

    def settings(*argv: str) -> CalibrationSettings:
        return calibration_settings(build_parser().parse_args(["calibrate", "cfg.yaml", *argv]))

    default = settings()
    assert default.budget_retrainings == 300 and default.budget_seconds is None and default.num_rounds == 3
    assert settings("--budget-retrainings", "40").budget_retrainings == 40
    both = settings("--budget-retrainings", "40", "--budget-seconds", "90")
    assert (both.budget_retrainings, both.budget_seconds) == (40, 90)
    quick = settings("--quick", "--lambdas", "0.05")
    assert quick.nbeta_mults == (1.0, 10.0) and quick.lambdas == (0.05,) and quick.num_rounds == 2

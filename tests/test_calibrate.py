"""Calibration: the selection rules, divergence flagging, and one small sweep through the flow."""
from __future__ import annotations

import math
import os

import pytest
import torch
import yaml

from bif.evaluation import calibrate as C
from bif.config import SamplerConfig, build_config
from bif.examples.logistic import build
from bif.evaluation.settings import CalibrationSettings
from bif.evaluation.calibration import evaluate_setting, pilot_stable

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def problem():
    return build(n=40, n_query=6)


def _s(eps, lds, *, diverged=False, rhat=1.01, ess=200.0, drift=1.0):
    return C.SettingScore(step_size=eps, nbeta=40.0, gamma=4.0, diverged=diverged, max_rhat=rhat,
                          median_ess_bulk=ess, drift_ratio=drift, lds=lds)


def test_recommend_prefers_healthy_settings_and_never_a_diverged_one():
    scores = [_s(1.0, math.nan, diverged=True), _s(0.1, 0.9, rhat=1.5), _s(0.01, 0.6), _s(0.001, 0.5)]
    best, healthy = C.recommend(scores)
    assert best.step_size == 0.01 and healthy
    best, healthy = C.recommend([_s(1.0, math.nan, diverged=True), _s(0.1, 0.9, rhat=1.5)])
    assert best.step_size == 0.1 and not healthy
    assert not C.is_healthy(_s(0.1, 0.9, drift=3.0)) and not C.is_healthy(_s(0.1, 0.9, ess=10.0))
    with pytest.raises(ValueError, match="every calibration setting diverged"):
        C.recommend([_s(1.0, math.nan, diverged=True)])


def test_pilot_rules_and_defaults():
    assert C.largest_stable({1.0: False, 0.1: True, 0.01: True, 0.3: True}) == 0.3
    assert C.largest_stable({1.0: True, 0.1: False, 0.01: True}) == 0.01  # stability must hold all the way up
    with pytest.raises(ValueError, match="every pilot step size diverged"):
        C.largest_stable({0.1: False})
    assert C.default_nbeta(500) == 500.0 and C.default_gamma(500.0) == pytest.approx(50.0)
    cands = C.pilot_step_sizes(100.0)
    assert cands[0] == pytest.approx(0.1) and all(a > b for a, b in zip(cands, cands[1:]))
    pts = C.grid(0.01, 100.0)
    assert len(pts) == 6 and max(p[0] for p in pts) == pytest.approx(0.005)
    assert sorted({round(p[2], 9) for p in pts}) == [3.0, 10.0, 30.0]
    block = C.sampler_block({"num_chains": 4, "step_size": 1.0}, _s(0.0123456, 0.5))
    assert block == {"num_chains": 4, "step_size": 0.01235, "nbeta": 40.0, "gamma": 4.0}


def test_huge_step_size_is_flagged_diverged_and_a_small_one_is_not(problem):
    base = SamplerConfig(num_chains=2, num_draws=20, num_burnin_steps=10, steps_per_draw=2, batch_size=40,
                         gamma=4.0)
    huge = evaluate_setting(problem, base.model_copy(update={"step_size": 50.0}), None)
    assert huge.diverged and math.isnan(huge.lds)
    assert not pilot_stable(problem, base, 50.0, num_steps=50)
    ok = evaluate_setting(problem, base.model_copy(update={"step_size": 1e-2}), None)
    assert not ok.diverged and math.isfinite(ok.max_rhat) and ok.distance_mean > 0
    assert pilot_stable(problem, base, 1e-2, num_steps=50)


def test_calibration_flow_picks_a_non_diverging_setting(tmp_path, prefect_api_url):
    from bif.flows.calibrate import calibrate_flow

    cfg = build_config({"problem": "bif.examples.logistic:build", "problem_args": {"n": 40, "n_query": 6},
                        "output": str(tmp_path / "out"),
                        "sampler": {"num_burnin_steps": 50, "steps_per_draw": 2, "batch_size": 40}})
    st = CalibrationSettings(num_subsets=10, num_chains=2, num_draws=80, pilot_steps=40)
    res = calibrate_flow(config=cfg.public_dict() | {"storage_options": {}}, settings=st.model_dump(mode="json"))
    assert res["largest_stable_step"] > 0
    assert not res["recommended"]["diverged"] and res["recommended"]["lds"] > 0.3
    assert res["recommended"]["step_size"] <= 0.5 * res["largest_stable_step"] * (1 + 1e-9)
    assert len(res["scores"]) == 6
    out = tmp_path / "out" / "calibration"
    block = yaml.safe_load((out / "sampler.yaml").read_text())["sampler"]
    assert SamplerConfig(**block).step_size == pytest.approx(res["recommended"]["step_size"], rel=1e-3)
    assert os.path.getsize(out / "tradeoffs.png") > 5000 and (out / "scores.json").exists()

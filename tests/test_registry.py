"""Rules 8-10 of docs/architecture.md: registries for gates and methods, config passed whole, docstrings.

Also the shared rules: one runaway rule for the health_loss gate and calibration, one
R-hat / ESS, and the diagnostics switch independent of the gates.
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from bif import schema as S
from bif.config import QualityConfig, RunConfig, SamplerConfig, build_config, config_reference, load_config
from bif.errors import ConfigError
from bif.evaluation import calibration
from bif.evaluation.methods import get_method, method_names, methods_help
from bif.quality import gates
from bif.quality.expectations import Check
from bif.quality.registry import default_severity, gate_names, get_gate, register_gate
from bif.quality.rules import runaway

REPO = Path(__file__).resolve().parents[1]
BUILTIN_METHODS = ("bif", "influence", "influence_cg", "influence_lissa", "graddot", "gradcos", "ekfac", "trak")


# --- gates ------------------------------------------------------------------------------------------
def test_unknown_gate_in_severity_is_a_config_error_naming_the_valid_gates(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("problem: bif.examples.linear:build\nquality: {severity: {health_los: warning}}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "quality.severity" in msg and "'health_los'" in msg
    assert all(g in msg for g in gate_names())
    with pytest.raises(ConfigError, match="'error' or 'warning'"):
        load_config(p, overrides=["quality.severity={health_loss: fatal}"])


def test_severity_keys_come_from_the_registry_and_the_hash_ignores_them():
    data = {"problem": "bif.examples.linear:build", "quality": {"severity": {"health_distance": "warning"}}}
    cfg = build_config(data)
    assert cfg.quality.severity == {"health_distance": "warning"}
    assert cfg.public_dict()["quality"]["severity"] == {"health_distance": "warning"}  # YAML / JSON form
    assert cfg.hash() == build_config({"problem": "bif.examples.linear:build"}).hash()
    assert default_severity() == {"traces_constant": "warning"} and get_gate("traces_constant").severity == "warning"
    line = next(l for l in config_reference().splitlines() if l.strip().startswith("severity:"))
    assert all(g in line for g in gate_names())  # `bif keys` lists the gates
    assert gates.GATES == gate_names()


def test_a_check_of_an_unregistered_gate_is_refused():
    frame = pd.DataFrame({"x": [1]})
    run = gates._validator(QualityConfig(), None, None)
    with pytest.raises(KeyError, match="unknown quality gate 'my_gate'.*trace_schema"):
        run(frame, [Check("my_gate", "ExpectColumnValuesToNotBeNull", {"column": "x"})], "suite")
    with pytest.raises(ValueError, match="already registered"):
        register_gate("trace_finite", suite="traces", description="something else")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from run_fixtures import make_run

    run = make_run(tmp_path_factory.mktemp("registry") / "run", n_train=24, n_query=4, num_draws=20,
                   draws_per_block=10, train_epochs=10)
    # add the constant-trace flags that the flow writes, so traces_constant runs too
    flags = xr.Dataset({S.TRAIN_CONSTANT: (S.TRAIN_DIM, np.zeros(run.n_train, bool)),
                        S.QUERY_CONSTANT: (S.QUERY_DIM, np.zeros(run.n_query, bool))})
    flags.to_zarr(str(Path(run.uri) / S.BIF_ZARR), mode="a", consolidated=False)
    return run


def test_every_gate_the_suites_emit_is_registered_and_every_registered_gate_is_emitted(tiny):
    from bif.quality.run import run_gates

    emitted: set[str] = set()
    for trace_rows in (False, True):
        report = run_gates(tiny.uri, None, tiny.config, n_train=tiny.n_train, n_query=tiny.n_query,
                           loss_bounds=(0.0, np.inf), trace_rows=trace_rows)
        emitted |= {r.gate for r in report.results}
    # the self-influence gate needs query set = train set
    x = np.random.default_rng(0).normal(size=(50, 6))
    cov = np.cov(x, rowvar=False)
    ds = xr.Dataset({S.BIF: ((S.TRAIN_DIM, S.QUERY_DIM), -cov),
                     S.BIF_CORR: ((S.TRAIN_DIM, S.QUERY_DIM), -np.corrcoef(x, rowvar=False))})
    res = gates.check_results(ds, QualityConfig(), sizes=gates.RunSizes(n_train=6, n_query=6, query_is_train=True))
    assert all(r.success for r in res)
    emitted |= {r.gate for r in res}
    assert emitted == set(gate_names())


# --- methods ------------------------------------------------------------------------------------------
def test_methods_register_themselves_and_unknown_ones_are_clear_errors():
    from bif.evaluation.scoring import score_method
    from bif.evaluation.settings import DEFAULT_METHODS, LDSSettings

    assert method_names() == BUILTIN_METHODS
    assert set(DEFAULT_METHODS) <= set(method_names())
    assert get_method("bif").outputs == ("bif", "bif_corr") and get_method("trak").outputs == ("trak",)
    assert all(m in methods_help() for m in method_names())
    with pytest.raises(ConfigError, match="unknown attribution method 'tracin'.*choose from bif, influence"):
        get_method("tracin")
    with pytest.raises(ConfigError, match="'tracin'"):
        score_method(None, "tracin")  # checked before any work
    with pytest.raises(ValueError, match="unknown attribution method 'tracin'; choose from bif"):
        LDSSettings(methods=("bif", "tracin"))
    assert LDSSettings(methods=("ekfac",)).methods == ("ekfac",)


def test_lds_cli_help_and_validation_come_from_the_registry(tmp_path, capsys):
    from bif.flows.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["lds"]
    help_text = sub.format_help()
    assert all(m in help_text for m in method_names())
    p = tmp_path / "c.yaml"
    p.write_text(f"problem: bif.examples.linear:build\noutput: {tmp_path / 'out'}\n")
    assert main(["lds", str(p), "--methods", "bif,tracin"]) != 0
    err = capsys.readouterr().err
    assert "tracin" in err and "graddot" in err


def test_graddot_through_the_registry_matches_the_baseline():
    from bif.evaluation.baselines.graddot import graddot_scores
    from bif.evaluation.scoring import score_method
    from bif.examples import linear

    problem = linear.build(n=12, d=3, m=3, seed=1)
    (s,) = score_method(problem, "graddot")
    assert s.name == "graddot" and s.query_seconds <= s.seconds
    np.testing.assert_array_equal(s.tau, graddot_scores(problem).values)


# --- one runaway rule, one R-hat / ESS --------------------------------------------------------------------
def _health_and_traces(chain_means: np.ndarray, ref: float, draws: int = 8, n: int = 5):
    """A health table and train traces (C, D, n) whose per-chain mean train losses are ``chain_means``."""
    rng = np.random.default_rng(1)
    train = np.empty((len(chain_means), draws, n))
    frames = []
    for c, m in enumerate(chain_means):
        t = rng.normal(size=(draws, n))
        train[c] = t - t.mean() + m  # the mean over (draws, samples) is exactly m
        frames.append(pd.DataFrame({
            S.CHAIN: np.full(draws, c, np.int32), S.DRAW: np.arange(draws, dtype=np.int32), S.STEP: np.arange(draws),
            S.DISTANCE: np.ones(draws), S.TRAIN_LOSS_MEAN: train[c].mean(axis=1), S.QUERY_LOSS_MEAN: np.ones(draws),
            S.REF_TRAIN_LOSS_MEAN: np.full(draws, ref)}))
    return pd.concat(frames, ignore_index=True), train


@pytest.mark.parametrize("factor,slack", [(10.0, 1.0), (3.0, 0.5), (2.0, 0.0)])
def test_runaway_rule_gives_the_same_verdict_in_the_gate_and_in_calibration(factor, slack):
    ref = 0.4
    bound = factor * ref + slack
    means = np.array([0.1, bound - 0.05, bound + 0.05, 5 * bound])  # chains 2 and 3 ran away
    health, train = _health_and_traces(means, ref)
    expected = [False, False, True, True]
    assert runaway(train.mean(axis=(1, 2)), ref, max_loss_factor=factor, loss_slack=slack).tolist() == expected
    quality = QualityConfig(max_loss_factor=factor, loss_slack=slack)
    res = gates.check_health(health, quality, SamplerConfig(num_chains=4, num_draws=8))
    (failed,) = [r for r in res if not r.success]
    assert failed.gate == "health_loss" and failed.unexpected_count == 2
    assert "chain=2" in failed.detail and "chain=3" in failed.detail and "chain=1" not in failed.detail
    for keep in ([0, 1], [2], [3]):  # calibration: per subset of chains, the same verdict
        verdict = calibration._diverged_by_loss(train[keep], ref, factor=factor, slack=slack)
        assert verdict == any(expected[k] for k in keep)


def test_calibration_defaults_are_the_quality_defaults():
    q = QualityConfig()
    sig = inspect.signature(calibration._diverged_by_loss)
    assert sig.parameters["factor"].default == q.max_loss_factor and sig.parameters["slack"].default == q.loss_slack


def test_calibration_rhat_ess_is_the_diagnostics_one():
    from bif.quality.diagnostics import loss_diagnostics

    rng = np.random.default_rng(0)
    train, query = rng.normal(size=(3, 30, 5)), rng.normal(size=(3, 30, 2))
    train[:, :, 1] = 0.0  # a constant trace: raw ArviZ values in calibration, masked in diagnostics.parquet
    rhat, ess = calibration._rhat_ess(train, query)
    diag = loss_diagnostics(train, query)
    live = ~diag[S.CONSTANT].to_numpy()
    np.testing.assert_array_equal(rhat[live], diag[S.RHAT].to_numpy()[live])
    np.testing.assert_array_equal(ess[live], diag[S.ESS_BULK].to_numpy()[live])
    assert np.isnan(rhat[1]) and ess[1] == 3 * 30


# --- rule 9: config passed whole; rule 10: docstrings ----------------------------------------------------
@pytest.mark.parametrize("fn", [gates.check_trace_block, gates.check_trace_stats, gates.check_trace_chains,
                                gates.check_health, gates.check_results])
def test_gates_take_the_config_sections_whole(fn):
    params = inspect.signature(fn).parameters
    assert "quality" in params and len(params) <= 9
    assert not {"severity", "max_loss_factor", "loss_slack", "corr_atol", "num_draws", "num_chains"} & set(params)


def _modules():
    for folder in ("bif", "flows", "tasks"):
        yield from sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_opens_with_a_docstring(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc) > 20 and "TODO" not in doc, f"{path.relative_to(REPO)}: say what the module owns"


# --- the diagnostics switch -------------------------------------------------------------------------------
@pytest.mark.e2e
def test_diagnostics_switch_is_independent_of_the_gates(tmp_path, dask_address):
    from bif.flows.attribution import run_attribution

    sampler = {"num_chains": 2, "num_draws": 20, "num_burnin_steps": 10, "steps_per_draw": 2, "step_size": 2e-3,
               "gamma": 10.0, "nbeta": 40.0, "batch_size": 40, "seed": 3, "draws_per_block": 10}

    def cfg(name: str, **quality) -> RunConfig:
        return build_config({"problem": "bif.examples.linear:build", "problem_args": {"n": 40, "d": 4, "m": 6, "seed": 2},
                             "output": str(tmp_path / name), "sampler": sampler, "compute": {"address": dask_address},
                             "quality": quality})

    manifest = run_attribution(cfg("no_diag", diagnostics=False), show_progress=False)
    out = tmp_path / "no_diag"
    assert manifest["status"] == "complete" and manifest["diagnostics"] is None
    assert not (out / S.DIAGNOSTICS_FILE).exists()
    assert manifest["quality"]["passed"] and (out / S.QUALITY_DIR / S.QUALITY_SUMMARY_FILE).exists()  # gates ran

    manifest = run_attribution(cfg("no_gates", enabled=False), show_progress=False)
    out = tmp_path / "no_gates"
    assert manifest["status"] == "complete" and manifest["quality"] is None
    assert not (out / S.QUALITY_DIR / S.QUALITY_SUMMARY_FILE).exists()
    assert (out / S.DIAGNOSTICS_FILE).exists() and manifest["diagnostics"]["rhat_threshold"] == 1.1

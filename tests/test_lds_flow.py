"""One small LDS flow on a real Dask LocalCluster under a Prefect test server; the rerun reuses the ground truth."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bif.config import build_config
from bif.evaluation.settings import LDSSettings

torch.set_num_threads(1)
pytestmark = pytest.mark.e2e


def _mtimes(root: str) -> dict[str, float]:
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files if f.endswith(".parquet") and "results" not in d}


def test_lds_flow_caches_ground_truth(tmp_path, prefect_api_url, dask_address):
    from bif.flows.lds import run_lds

    cfg = build_config({"problem": "bif.examples.logistic:build", "problem_args": {"n": 40, "n_query": 6},
                        "output": str(tmp_path / "out"),
                        "sampler": {"num_chains": 2, "num_draws": 100, "num_burnin_steps": 50, "steps_per_draw": 2,
                                    "step_size": 1e-2, "gamma": 10.0, "batch_size": 40}})
    st = LDSSettings(num_subsets=10, num_seeds=1, methods=("bif", "influence", "graddot"),
                     options={"damping": 0.05})
    first = run_lds(cfg, st, address=dask_address, run_name="first")
    assert first["cached"] is False and first["num_retrained"] == 10
    root = str(tmp_path / "out" / "lds" / first["ground_truth_key"])
    before = _mtimes(root)
    assert len([p for p in before if "/retrain/" in p]) == 10
    gt = pd.read_parquet(os.path.join(root, "ground_truth.parquet"))
    assert len(gt) == 10 * 1 * 6 and np.isfinite(gt["loss"]).all()

    second = run_lds(cfg, st, address=dask_address, run_name="second")
    assert second["cached"] is True and second["num_retrained"] == 0
    assert second["ground_truth_key"] == first["ground_truth_key"]
    assert _mtimes(root) == before  # nothing retrained or rewritten

    by = {r["method"]: r for r in second["methods"]}
    assert set(by) == {"bif", "bif_corr", "influence", "graddot"}
    assert by["influence"]["lds"] == pytest.approx({r["method"]: r for r in first["methods"]}["influence"]["lds"])
    for name, r in by.items():
        assert r["lds"] > 0.3 and r["seconds"] > 0, (name, r)
    per_query = pd.read_parquet(os.path.join(root, "results", "second", "lds.parquet"))
    assert len(per_query) == 4 * 6
    # the flow's own process (the `bif lds` command) neither builds the problem nor ranks with scipy: torch and
    # scipy.stats took 3 s of its 7.3 s on a running kept cluster (4.7 s without them, 2026-12-04)
    code = ("import json, sys; from bif.config import build_config; from bif.evaluation.settings import LDSSettings; "
            "from bif.flows.lds import run_lds; "
            f"res = run_lds(build_config(json.loads({json.dumps(cfg.public_dict())!r})), "
            f"LDSSettings.model_validate_json({st.model_dump_json()!r}), address={dask_address!r}, run_name='third'); "
            "print(json.dumps({'lds': {r['method']: r['lds'] for r in res['methods']}, 'cached': res['cached'], "
            "'loaded': [m for m in ('torch', 'scipy') if m in sys.modules]}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    third = json.loads(proc.stdout.strip().splitlines()[-1])
    assert third["loaded"] == [] and third["cached"] is True
    assert third["lds"] == pytest.approx({name: r["lds"] for name, r in by.items()}, abs=1e-12)
    # a different subset count is a different ground truth
    assert LDSSettings(num_subsets=13).ground_truth_key(cfg.problem, cfg.problem_args) != first["ground_truth_key"]



def test_lds_and_calibrate_refuse_a_problem_without_fit_before_any_retraining(tmp_path, prefect_api_url,
                                                                             dask_address):
    """Both need ``problem.fit`` for their retrainings; without it they stop before submitting one. They found out
    only from the failed retrainings, each retried twice: a user's `bif lds` waited 24 s and `bif calibrate` 71 s
    for the same message."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    from bif.errors import ProblemError
    from bif.evaluation.settings import CalibrationSettings
    from bif.flows.calibrate import run_calibration
    from bif.flows.lds import run_lds

    async def last_run(flow_name: str) -> tuple[str, list[str]]:
        """The state of the newest run of ``flow_name`` and the names of its task runs."""
        async with get_client() as client:
            (run,) = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                                 sort=FlowRunSort.START_TIME_DESC, limit=1)
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            return run.state.type.value, sorted(t.name for t in tasks)

    cfg = build_config({"problem": "bif.examples.linear:build", "problem_args": {"n": 12, "d": 2, "m": 3},
                        "output": str(tmp_path / "out")})  # the linear example has no fit
    with pytest.raises(ProblemError, match=r"^problem has no fit\(dataset, seed\) -> nn.Module; the LDS benchmark "
                                           r"needs it to retrain on subsets"):
        run_lds(cfg, LDSSettings(num_subsets=4, num_seeds=1, methods=("graddot",)), address=dask_address)
    state, tasks = asyncio.run(last_run("bif-lds"))
    assert state == "FAILED" and any(t.startswith("problem-sizes") for t in tasks), tasks
    assert not any(t.startswith("retrain") for t in tasks), tasks
    with pytest.raises(ProblemError, match=r"^problem has no fit\(dataset, seed\) -> nn.Module; `bif calibrate` "
                                           r"scores each setting by a cheap LDS, which needs it"):
        run_calibration(cfg, CalibrationSettings(num_subsets=4), address=dask_address)
    state, tasks = asyncio.run(last_run("bif-calibrate"))
    assert state == "FAILED" and tasks == [], tasks  # not a retraining, nor the probe
    assert not (tmp_path / "out" / "lds").exists()  # no ground truth was planned


def test_lds_of_a_token_problem_scores_its_sequences(tmp_path, prefect_api_url, dask_address):
    """A language model's `bif lds`: the ground truth is each query sequence's loss (the sum of its valid token
    losses) after retraining, and every method scores sequences, as ``bif.zarr`` does. It failed with an
    AttributeError (the retrained losses: a (losses, mask) pair has no ``detach``), and GradDot and influence failed
    in torch.func (the gradient of a (1, T) tensor, not a scalar). `bif calibrate` refuses such a problem with a
    message (its grid scales nβ with the samples)."""
    import token_problems as tp

    from bif.errors import ProblemError
    from bif.evaluation.settings import CalibrationSettings
    from bif.flows.calibrate import run_calibration
    from bif.flows.lds import run_lds

    args = {"n_train": 24, "n_query": 8, "length": 8, "min_len": 3, "fit_steps": 200}
    cfg = build_config({"problem": "token_problems:build", "problem_args": args, "output": str(tmp_path / "out"),
                        "sampler": {"num_chains": 2, "num_draws": 400, "num_burnin_steps": 50, "steps_per_draw": 2,
                                    "step_size": 1e-2, "gamma": 100.0, "batch_size": 24}})
    st = LDSSettings(num_subsets=16, num_seeds=1, methods=("bif", "graddot", "influence"), options={"damping": 0.05})
    # TRAK cannot score per-token losses: its message stops the flow before the ground truth is gathered (it came
    # only after all 16 retrainings, then ground_truth.parquet); the next run finishes the retrainings
    with pytest.raises(ProblemError, match=r"^TRAK \(traker's image-classification task\) scores a classifier"):
        run_lds(cfg, st.model_copy(update={"methods": ("graddot", "trak")}), address=dask_address)
    assert not list((tmp_path / "out" / "lds").glob("*/ground_truth.parquet"))
    res = run_lds(cfg, st, address=dask_address)
    root = tmp_path / "out" / "lds" / res["ground_truth_key"]
    gt = pd.read_parquet(root / "ground_truth.parquet")
    subsets = pd.read_parquet(root / "subsets.parquet")
    assert len(gt) == 16 * 8 and res["num_retrained"] <= 16
    # subset 0's retrained query losses, by hand: the bigram trained on the subset, valid tokens summed per sequence
    prob = tp.build(**args)
    ids, valid = prob.train.tensors
    keep = torch.as_tensor(np.sort(subsets[subsets["subset"] == 0]["train"].to_numpy()))
    row = gt[gt["subset"] == 0].sort_values("query")
    model = prob.fit(torch.utils.data.TensorDataset(ids[keep], valid[keep]), int(row["fit_seed"].iloc[0]))
    with torch.no_grad():
        losses, mask = prob.loss(model, prob.query.tensors)
    want = (losses * mask).sum(dim=1).numpy()
    np.testing.assert_allclose(row["loss"].to_numpy(), want, rtol=1e-9)
    assert not np.allclose(want, losses[:, 0].numpy())  # sequences of 2-7 tokens: a sum, not one token
    by = {r["method"]: r["lds"] for r in res["methods"]}
    assert set(by) == {"bif", "bif_corr", "graddot", "influence"}
    for name, value in by.items():  # 0.44 (bif), 0.44 (bif_corr), 0.46 (graddot), 0.42 (influence)
        assert value > 0.25, (name, by)
    # at λ = 1e-3 this bigram's Hessian is indefinite (smallest eigenvalue -0.0088): CG stops each query where it
    # meets negative curvature, and the summary (which `bif lds` prints) says so; CG ran P iterations before
    # (the explicit solve's warning too: it divides by the negative eigenvalue)
    cg = run_lds(cfg, LDSSettings(num_subsets=16, num_seeds=1, methods=("influence_cg", "influence"),
                                  options={"damping": 1e-3}), address=dask_address)
    assert cg["cached"] and cg["ground_truth_key"] == res["ground_truth_key"]
    report, explicit = sorted(cg["methods"], key=lambda r: r["method"] != "influence_cg")
    assert report["method"] == "influence_cg" and len(report["warnings"]) == 1, report
    assert re.match(r"influence_cg: 8 of 8 queries met negative curvature .* raise the damping, now 0\.001",
                    report["warnings"][0]), report["warnings"]
    assert explicit["method"] == "influence" and len(explicit["warnings"]) == 1, explicit
    assert re.match(r"influence: H \+ λI is not positive definite \(smallest eigenvalue of H -0\.00881, "
                    r"λ = 0\.001\).*raise the damping above 0\.00881$", explicit["warnings"][0]), explicit["warnings"]
    stored = {r["method"]: r["warnings"] for r in json.loads(Path(cg["summary_uri"]).read_text())["methods"]}
    assert stored == {"influence_cg": report["warnings"], "influence": explicit["warnings"]}
    assert by["influence"] > 0.25 and all(r["warnings"] == [] for r in res["methods"])
    with pytest.raises(ProblemError, match=r"^`bif calibrate` does not search per-token losses"):
        run_calibration(cfg, CalibrationSettings(num_subsets=4), address=dask_address)

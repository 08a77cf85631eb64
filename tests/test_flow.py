"""End to end: the Prefect flow on a real Dask LocalCluster, against the closed-form BIF;
the CLI; credentials; and bad input (clear error, non-zero exit, never a complete manifest)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml

from bif import schema as S
from bif.flows.cli import main
from bif.config import build_config
from bif.errors import ChainDivergedError
from bif.examples import linear
from bif.store.manifest import read_manifest
from bif.flows.attribution import run_attribution
from conftest import S3_KEY, S3_SECRET

pytestmark = pytest.mark.e2e

LINEAR_ARGS = {"n": 40, "d": 4, "m": 6, "singular": True, "seed": 2}
SAMPLER = {"num_chains": 2, "num_draws": 1500, "num_burnin_steps": 400, "steps_per_draw": 10,
           "step_size": 2e-3, "gamma": 10.0, "nbeta": 40.0, "batch_size": 40, "seed": 3,
           "draws_per_block": 500, "trace_dtype": "float64"}


def _cfg(output, address, **over):
    data = {"problem": "bif.examples.linear:build", "problem_args": LINEAR_ARGS, "output": str(output),
            "sampler": SAMPLER, "covariance": {"train_block_size": 16, "query_block_size": 4, "topk": 5},
            "compute": {"address": address}}
    for k, v in over.items():
        data[k] = (data.get(k) or {}) | v if isinstance(v, dict) and k != "problem_args" else v
    return build_config(data)


@pytest.fixture(scope="module")
def closed_form_run(tmp_path_factory, dask_address) -> tuple:
    """One complete run of the closed-form config on the session cluster, under the session's Prefect
    server: (root, cfg, manifest). Two tests check it: the closed form, the outputs and the skipped
    rerun; and the Prefect artifacts it published (they used to run the flow once each)."""
    root = tmp_path_factory.mktemp("closed-form")
    cfg = _cfg(root / "run", dask_address)
    return root, cfg, run_attribution(cfg, show_progress=False)


def test_flow_matches_closed_form_and_reruns_are_skipped(closed_form_run, capsys):
    tmp_path, cfg, manifest = closed_form_run
    assert manifest["status"] == S.STATUS_COMPLETE
    assert manifest["config_hash"] == cfg.hash()
    ds = xr.open_zarr(tmp_path / "run" / S.BIF_ZARR, consolidated=False).load()
    data = linear.make_data(**LINEAR_ARGS)
    exact = linear.closed_form_bif(data, nbeta=40.0, gamma=10.0, step_size=2e-3)
    rel = np.linalg.norm(ds[S.BIF].values - exact) / np.linalg.norm(exact)
    assert rel < 0.2, rel  # 3000 draws; Monte-Carlo error ~0.05-0.08
    assert ds[S.BIF].shape == (40, 6)
    # traces: every (chain, draw, split, sample) exactly once
    traces = pd.read_parquet(tmp_path / "run" / S.TRACES_DIR)
    assert len(traces) == 2 * 1500 * 46
    assert not traces.duplicated([S.CHAIN, S.DRAW, S.SPLIT, S.SAMPLE]).any()
    topk = pd.read_parquet(tmp_path / "run" / S.TOPK_FILE)
    best = topk[(topk[S.QUERY] == 2) & (topk[S.DIRECTION] == "positive") & (topk[S.RANK] == 0)][S.TRAIN].item()
    assert best == int(np.argmax(ds[S.BIF].values[:, 2]))
    # quality gates passed, diagnostics and the report exist (issue 3)
    assert manifest["quality"]["passed"] and manifest["quality"]["num_expectations"] > 10
    assert manifest["diagnostics"]["num_chains"] == 2
    diag = pd.read_parquet(tmp_path / "run" / "diagnostics.parquet")
    assert len(diag) == 46 and diag["rhat"].max() < 1.1 and diag["ess_bulk"].min() > 100
    report = (tmp_path / "run" / "report.html").read_text()
    assert "not complete" not in report and "Quality gates passed" in report
    strongest = topk.assign(a=topk[S.BIF].abs()).groupby(S.QUERY)["a"].max().nlargest(3).index  # the queries shown
    assert sorted(int(q) for q in __import__("re").findall(r"<h3>query (\d+)</h3>", report)) == sorted(int(q) for q in strongest)
    for row in topk[topk[S.QUERY].isin(strongest)].itertuples(index=False):  # ids from topk.parquet, ranks 0-4
        assert f"<br>train {getattr(row, S.TRAIN)}<br>bif " in report
    assert (tmp_path / "run" / "quality" / "summary.json").exists()
    # the rerun finds the complete manifest and skips everything
    assert run_attribution(cfg, show_progress=False).get("skipped") is True
    # the CLI reads it back
    assert main(["show", str(tmp_path / "run"), "--query", "2", "-k", "3"]) == 0
    assert f"{best}" in capsys.readouterr().out


@pytest.mark.parametrize("on_workers", [False, True], ids=["driven-here", "on-workers"])
def test_credentials_never_reach_outputs_logs_or_prefect(s3_bucket, dask_address, prefect_api_url, on_workers):
    """Also with the covariance's driver, the gates, the report and the artifacts as tasks on workers (what a
    kept cluster does: ``gates_on_workers``), which get the config with its credentials through Dask."""
    import asyncio

    from prefect.client.orchestration import get_client

    bucket, opts = s3_bucket
    name = f"secret-test-{on_workers}"
    out = f"s3://{bucket}/runs/{name}"
    cfg = _cfg(out, dask_address, storage_options=opts,
               sampler=SAMPLER | {"num_draws": 20, "num_burnin_steps": 5, "draws_per_block": 10})
    manifest = run_attribution(cfg, show_progress=False, gates_on_workers=on_workers)
    assert manifest["status"] == "complete" and manifest["quality"]["passed"]
    import fsspec

    fs = fsspec.filesystem("s3", **opts)
    texts = [fs.cat(f"{bucket}/runs/{name}/{f}").decode() for f in (S.MANIFEST_FILE, S.CONFIG_FILE)]
    assert fs.exists(f"{bucket}/runs/{name}/{S.BIF_ZARR}") and fs.exists(f"{bucket}/runs/{name}/{S.REPORT_FILE}")

    async def dump_prefect():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            tasks = await client.read_task_runs()
            logs = await client.read_logs()
            return json.dumps([r.model_dump(mode="json") for r in [*runs, *tasks, *logs]])

    texts.append(asyncio.run(dump_prefect()))
    for text in texts:
        if S3_SECRET in text:
            i = text.index(S3_SECRET)
            print("LEAK", text[max(0, i - 600):i + 100])
        assert S3_SECRET not in text and S3_KEY not in text
    assert '"storage_options"' in texts[1] and "***" in texts[1]


def test_nan_chain_fails_run_with_named_chain(tmp_path, dask_address, capsys):
    cfg = _cfg(tmp_path / "nan", dask_address,
               sampler=SAMPLER | {"step_size": 50.0, "gamma": 0.0, "nbeta": 1e6, "num_draws": 40,
                                  "draws_per_block": 10})
    with pytest.raises(ChainDivergedError, match=r"chain \d diverged"):
        run_attribution(cfg, show_progress=False)
    manifest = read_manifest(str(tmp_path / "nan"))
    assert manifest["status"] == S.STATUS_FAILED and "diverged" in manifest["error"]


def test_divergent_step_size_fails_a_quality_gate(tmp_path, dask_address, capsys):
    """A step size just past SGLD's stability limit: losses explode (but stay finite) and a gate fails."""
    from bif.errors import QualityError

    data = linear.make_data(**LINEAR_ARGS)
    mu, sigma = linear.posterior(data, nbeta=40.0, gamma=10.0)
    lam_max = np.linalg.eigvalsh(np.linalg.inv(sigma)).max()
    cfg = _cfg(tmp_path / "bad", dask_address,
               sampler=SAMPLER | {"step_size": 4.4 / lam_max, "num_burnin_steps": 0, "steps_per_draw": 1,
                                  "num_draws": 60, "draws_per_block": 20})
    with pytest.raises(QualityError, match=r"FAILED health_loss") as ei:
        run_attribution(cfg, show_progress=False)
    assert "chain=" in str(ei.value)
    manifest = read_manifest(str(tmp_path / "bad"))
    assert manifest["status"] == S.STATUS_FAILED_QUALITY
    assert any(f["gate"] == "health_loss" for f in manifest["quality_failures"])
    assert (tmp_path / "bad" / S.BIF_ZARR).exists()  # results stay for inspection
    # --allow-warnings turns the failure into a warning and the run completes
    path = _write_yaml(tmp_path / "bad.yaml", cfg.public_dict() | {"output": str(tmp_path / "bad2")})
    assert main(["run", path, "--no-progress", "--allow-warnings"]) == 0
    assert read_manifest(str(tmp_path / "bad2"))["status"] == S.STATUS_COMPLETE
    assert "warning: gate health_loss" in capsys.readouterr().err


def test_prefect_artifacts_published(prefect_api_url, closed_form_run):
    """The complete run of ``closed_form_run`` published its summary and top-k as Prefect artifacts."""
    import asyncio

    from prefect.client.orchestration import get_client

    _, cfg, manifest = closed_form_run
    assert manifest["status"] == "complete"

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    arts = asyncio.run(artifacts())
    keys = {a.key for a in arts}
    assert {"bif-run-summary", "bif-topk"} <= keys
    # this run's own: its summary names its output, and its flow run published the top-k table too
    (mine,) = [a for a in arts if a.key == "bif-run-summary" and a.description == f"BIF run at {cfg.output}"]
    assert f"# BIF run `{cfg.output}`" in mine.data and mine.flow_run_id is not None
    assert "bif-topk" in {a.key for a in arts if a.flow_run_id == mine.flow_run_id}


def _write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("case", ["unknown_key", "missing_module", "wrong_shape_loss", "corrupt_checkpoint",
                                  "unsafe_checkpoint"])
def test_bad_input_clear_error_nonzero_exit(case, tmp_path, dask_address, capsys, prefect_api_url):
    out = tmp_path / "out"
    data = {"problem": "bif.examples.linear:build", "output": str(out),
            "sampler": {"num_chains": 1, "num_draws": 4, "num_burnin_steps": 1},
            "compute": {"address": dask_address}}
    marker = tmp_path / "pwned"
    expect = {
        "unknown_key": r"unknown config key 'sampler.num_draw'",
        "missing_module": r"cannot import problem module 'no_such_module_xyz'",
        "wrong_shape_loss": r"per-sample losses of shape \(40,\).*got \(\)",
        "corrupt_checkpoint": r"could not be loaded as a state dict with weights_only=True",
        "unsafe_checkpoint": r"could not be loaded as a state dict with weights_only=True",
    }[case]
    if case == "unknown_key":
        data["sampler"]["num_draw"] = 3
    elif case == "missing_module":
        data["problem"] = "no_such_module_xyz:build"
    elif case == "wrong_shape_loss":
        data["problem"] = "bif_test_problems:wrong_shape_loss"
    elif case == "corrupt_checkpoint":
        (tmp_path / "ckpt.pt").write_bytes(b"\x80\x02 not a checkpoint")
        data["checkpoint"] = str(tmp_path / "ckpt.pt")
    else:  # a pickle that would run code if loaded without weights_only
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"weight": Evil()}, tmp_path / "ckpt.pt")
        data["checkpoint"] = str(tmp_path / "ckpt.pt")
    code = main(["run", _write_yaml(tmp_path / "cfg.yaml", data), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert __import__("re").search(expect, err), err
    manifest = read_manifest(str(out))
    assert manifest is None or manifest["status"] != S.STATUS_COMPLETE
    assert not marker.exists()


def test_unreachable_bucket(tmp_path, moto_server, capsys):
    opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": moto_server}}
    path = _write_yaml(tmp_path / "c.yaml", {"problem": "bif.examples.linear:build",
                                               "output": "s3://no-such-bucket-bif/x", "storage_options": opts})
    assert main(["run", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "s3://no-such-bucket-bif/x" in err and "not writable" in err


def test_killed_run_resumes_without_lost_or_duplicate_draws(tmp_path, prefect_api_url, dask_address):
    """SIGKILL a real `bif run` (CLI, its own LocalCluster) after its first committed block, then rerun."""
    out = tmp_path / "killed"
    data = {"problem": "bif.examples.digits:build", "problem_args": {"n_train": 300, "n_query": 20},
            "output": str(out), "sampler": {"num_chains": 2, "num_draws": 400, "num_burnin_steps": 10,
                                             "steps_per_draw": 3, "draws_per_block": 40, "step_size": 1e-5},
            "compute": {"n_workers": 2}}
    cfg_path = _write_yaml(tmp_path / "k.yaml", data)
    env = os.environ | {"PREFECT_API_URL": prefect_api_url, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "bif.flows.cli", "run", cfg_path, "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / S.TRACES_DIR / "chain-0" / "block-00000.parquet"
    deadline = time.monotonic() + 240
    while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert first.exists(), "the run never committed a block"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = sorted(p.name for p in (out / S.TRACES_DIR / "chain-0").glob("block-*.parquet"))
    assert 1 <= len(committed) < 10  # killed midway
    assert read_manifest(str(out))["status"] == S.STATUS_RUNNING  # never mistaken for complete
    cfg = build_config(data | {"compute": {"address": dask_address}})
    manifest = run_attribution(cfg, show_progress=False)
    assert manifest["status"] == S.STATUS_COMPLETE
    assert manifest["resumed_blocks"][0] >= 1
    traces = pd.read_parquet(out / S.TRACES_DIR, columns=[S.CHAIN, S.DRAW, S.SPLIT, S.SAMPLE])
    assert len(traces) == 2 * 400 * 320
    assert not traces.duplicated().any()
    assert sorted(traces[S.DRAW].unique()) == list(range(400))


def test_killed_dask_worker_mid_chain_loses_nothing(tmp_path, prefect_api_url):
    """SIGKILL one Dask worker after a committed block: Dask reruns the chain task, which resumes."""
    import threading

    from distributed import Client

    from bif.flows.attribution import dask_cluster

    out = tmp_path / "kw"
    cfg = build_config({"problem": "bif.examples.digits:build", "problem_args": {"n_train": 300, "n_query": 20},
                        "output": str(out), "compute": {"n_workers": 2},
                        "sampler": {"num_chains": 2, "num_draws": 600, "num_burnin_steps": 10, "steps_per_draw": 3,
                                    "draws_per_block": 40, "step_size": 1e-5}})
    killed = []
    with dask_cluster(cfg) as address, Client(address, set_as_default=False) as client:
        def killer():
            firsts = [out / S.TRACES_DIR / f"chain-{c}" / "block-00001.parquet" for c in (0, 1)]
            deadline = time.monotonic() + 120
            while not all(f.exists() for f in firsts) and time.monotonic() < deadline:
                time.sleep(0.05)
            pid = next(iter(client.run(os.getpid).values()))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        threading.Thread(target=killer, daemon=True).start()
        manifest = run_attribution(cfg, show_progress=False, address=address)
    assert killed, "no worker was killed"
    assert manifest["status"] == S.STATUS_COMPLETE
    assert max(manifest["resumed_blocks"]) >= 1  # the rerun task resumed instead of starting over
    traces = pd.read_parquet(out / S.TRACES_DIR, columns=[S.CHAIN, S.DRAW, S.SPLIT, S.SAMPLE])
    assert len(traces) == 2 * 600 * 320 and not traces.duplicated().any()

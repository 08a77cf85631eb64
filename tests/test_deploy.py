"""Deployments: prefect.yaml parses and its entrypoints import (the way `prefect deploy` loads them),
`bif serve` registers the deployments with their schedules on a Prefect server and a run triggered
through the API completes, and a deployed sweep takes S3 credentials from a Prefect Secret block,
never from its parameters (the marker secret is absent from Prefect's database and every output)."""
from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bif import schema as S
from test_ops import make_checkpoints, sweep_data

REPO = Path(__file__).resolve().parents[1]
BIF = str(Path(sys.executable).parent / "bif")


def test_prefect_yaml_parses_and_names_entrypoints_that_import():
    from prefect.flows import load_flow_from_entrypoint

    from bif.flows.cli_ops import build_deployments, import_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"attribution", "watch", "backfill"}
    flows = {"attribution": "bif-attribution", "watch": "bif-watch", "backfill": "bif-backfill"}
    for name, d in deps.items():
        path, fn = d["entrypoint"].split(":")
        assert (REPO / path).is_file(), d["entrypoint"]
        cwd = os.getcwd()
        os.chdir(REPO)  # `prefect deploy` loads entrypoints relative to the project root
        try:
            loaded = load_flow_from_entrypoint(d["entrypoint"])
        finally:
            os.chdir(cwd)
        assert loaded.name == flows[name]
        ours = import_entrypoint(d["entrypoint"])
        assert ours.name == flows[name] and ours.fn.__module__.startswith("bif.flows.")
        # the parameters bind to the flow's signature, and none of them is a credential
        inspect.signature(ours.fn).bind(**d["parameters"])
        text = json.dumps(d["parameters"]).lower()
        for word in ("storage_options", "secret\"", "\"key\"", "\"aws_", "password", "token"):
            assert word not in text, (name, word)
        if isinstance(d["parameters"]["config"], str):
            assert (REPO / d["parameters"]["config"]).is_file()
        assert d["work_pool"]["name"] == "bif-process"
    assert deps["watch"]["schedules"] == [{"interval": 900}]
    built = {d.name: d for d in build_deployments(REPO / "prefect.yaml")}
    assert built["watch"].schedules[0].schedule.interval.total_seconds() == 900
    assert built["watch"].entrypoint == "bif.flows.backfill.watch_flow" and not built["backfill"].schedules
    assert built["attribution"].parameters["config"]["checkpoint"] == "s3://bif/checkpoints/digits.pt"


def test_serve_refuses_a_missing_file_and_an_unknown_deployment(tmp_path, capsys):
    from bif.flows.cli import main

    assert main(["serve", "--prefect-file", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml' does not exist" in capsys.readouterr().err
    assert main(["serve", "--prefect-file", str(REPO / "prefect.yaml"), "--only", "nightly"]) == 2
    assert "--only nightly: no such deployment" in capsys.readouterr().err


def _serve_file(tmp_path: Path, config: Path, checkpoints: str) -> Path:
    spec = {"name": "bif-test", "deployments": [
        {"name": "watch-test", "entrypoint": "bif.flows.backfill:watch_flow",
         "parameters": {"config": str(config), "checkpoints": checkpoints, "max_concurrent": 1},
         "schedules": [{"interval": 3600}]},
        {"name": "backfill-test", "entrypoint": "bif.flows.backfill:backfill_flow",
         "parameters": {"config": str(config), "checkpoints": checkpoints}, "schedules": [{"cron": "0 3 * * *"}]}]}
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_bif_serve_registers_scheduled_deployments_and_a_triggered_run_completes(tmp_path, prefect_api_url,
                                                                                  dask_address):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    make_checkpoints(str(tmp_path / "ckpts"), 1)
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(sweep_data(str(tmp_path / "sweep"), {"address": dask_address})))
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    proc = subprocess.Popen([BIF, "serve", "--prefect-file", str(_serve_file(tmp_path, cfg, str(tmp_path / "ckpts/*.pt")))],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with get_client(sync_client=True) as client:
            deadline, names = time.time() + 120, {}
            while time.time() < deadline and len(names) < 2:
                names = {d.name: d for d in client.read_deployments() if d.name.endswith("-test")}
                time.sleep(1)
            assert set(names) == {"watch-test", "backfill-test"}, proc.stdout and ""
            assert names["watch-test"].schedules[0].schedule.interval.total_seconds() == 3600
            assert names["backfill-test"].schedules[0].schedule.cron == "0 3 * * *"
        run = run_deployment("bif-watch/watch-test", timeout=400)
        assert run.state.is_completed(), run.state
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "serving bif-watch/watch-test" in out
    cat = pd.read_parquet(tmp_path / "sweep" / S.CATALOG_FILE)
    assert list(cat[S.STATUS]) == [S.STATUS_COMPLETE]


DEPLOYED = textwrap.dedent("""
    # a deployed sweep: the Secret block holds the storage options; the flow gets only the block's name
    import json, os, sys


    def main():
        from bif.flows.prefect_server import prefect_api
        with prefect_api() as ready:
            ready()
            from prefect.blocks.system import Secret
            from bif.flows.backfill import watch_flow
            Secret(value=json.loads(os.environ.pop("BIF_TEST_OPTIONS"))).save("bif-s3", overwrite=True)
            res = watch_flow(config=json.loads(sys.argv[1]), checkpoints=sys.argv[2], secret_block="bif-s3")
            print(json.dumps(res["counts"]))


    if __name__ == "__main__":  # Dask's worker processes import this module again
        main()
""")


@pytest.mark.slow
def test_deployed_sweep_takes_s3_credentials_from_a_secret_block_never_parameters(tmp_path, s3_bucket,
                                                                                   user_prefect_home):
    from leak_check import assert_no_leak

    bucket, opts = s3_bucket
    make_checkpoints(f"s3://{bucket}/ckpts", 1, storage_options=opts)
    data = sweep_data(f"s3://{bucket}/sweep", {"n_workers": 2})
    script = tmp_path / "deployed.py"
    script.write_text(DEPLOYED)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(user_prefect_home), "BIF_TEST_OPTIONS": json.dumps(opts)}
    res = subprocess.run([sys.executable, str(script), json.dumps(data), f"s3://{bucket}/ckpts/*.pt"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["complete"] == 1
    objects = assert_no_leak(res, user_prefect_home, tmp_path, bucket, opts, "bif-watch", "watch",
                             config_name="deployed.py")
    assert any(p.endswith(S.CATALOG_FILE) for p in objects)
    run_logs = [p for p in objects if "/runs/" in p and "/logs/run-" in p]
    assert run_logs and b"sample-chain" in objects[run_logs[0]]  # the subflow's own log, task runs included

"""One credentials policy for every flow (flows/runtime.py), checked through the CLI.

Each flow (run, lds, calibrate) writes to S3 (moto's real S3 API on 127.0.0.1) with a
marker secret in the config's ``storage_options``. The command starts its own Prefect
server on a private PREFECT_HOME; afterwards the marker must be in none of: Prefect's
database, the terminal, the run's log file, any object in the bucket, any local file.
Each test also checks the flow really read and wrote S3, so it can fail.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import S3_KEY, S3_SECRET

pytestmark = pytest.mark.e2e

BIF = str(Path(sys.executable).parent / "bif")
REPO = Path(__file__).resolve().parents[1]


def _run_cli(tmp_path: Path, bucket: str, opts: dict, cfg: dict, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    home = tmp_path / "prefect-home"
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "cfg.yaml").write_text(yaml.safe_dump(cfg | {"output": f"s3://{bucket}/out", "storage_options": opts}))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL" and not k.startswith("AWS_")}
    env["PREFECT_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    res = subprocess.run([BIF, args[0], "cfg.yaml", *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    return res, home


def _assert_no_leak(res: subprocess.CompletedProcess, home: Path, tmp_path: Path, bucket: str, opts: dict,
                    flow_name: str, log_prefix: str) -> dict[str, bytes]:
    """The marker is nowhere; returns the bucket's objects (path -> bytes) for the caller's checks."""
    import s3fs

    markers = (S3_SECRET.encode(), S3_KEY.encode())
    for m in (S3_SECRET, S3_KEY):
        assert m not in res.stdout and m not in res.stderr
    # Prefect's database (and its WAL / journal files): the server the CLI started used this home
    db_files = [p for p in home.rglob("*") if p.is_file()]
    db = home / "prefect.db"
    assert db.exists() and db.stat().st_size > 10_000
    db_bytes = b"".join(p.read_bytes() for p in db_files if p.name.startswith("prefect.db"))
    assert flow_name.encode() in db_bytes  # it is the database this run wrote to
    assert bucket.encode() in db_bytes  # the (public) config is in there, as a flow parameter
    for p in db_files:
        assert not any(m in p.read_bytes() for m in markers), f"marker in {p}"
    # every object in the bucket, the run log included
    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs=opts["client_kwargs"])
    objects = {p: fs.cat_file(p) for p in fs.find(bucket)}
    for p, data in objects.items():
        assert not any(m in data for m in markers), f"marker in s3://{p}"
    logs = [p for p in objects if f"/logs/{log_prefix}-" in p]
    assert logs, sorted(objects)
    assert b"Beginning flow run" in objects[logs[0]]
    # every local file except the user's own config
    for p in (tmp_path / "work").rglob("*"):
        if p.is_file() and p.name != "cfg.yaml":
            assert not any(m in p.read_bytes() for m in markers), f"marker in {p}"
    return objects


def test_run_credentials_stay_out_of_prefect_logs_and_outputs(tmp_path, s3_bucket):
    bucket, opts = s3_bucket
    cfg = {"problem": "bif.examples.linear:build", "compute": {"n_workers": 2},
           "sampler": {"num_chains": 2, "num_draws": 40, "num_burnin_steps": 5, "draws_per_block": 20,
                       "step_size": 1e-3}, "covariance": {"topk": 3}}
    res, home = _run_cli(tmp_path, bucket, opts, cfg, "run")
    assert res.returncode == 0, res.stdout + res.stderr
    objects = _assert_no_leak(res, home, tmp_path, bucket, opts, "bif-attribution", "run")
    import json

    assert json.loads(objects[f"{bucket}/out/manifest.json"])["status"] == "complete"
    assert any(p.startswith(f"{bucket}/out/traces/chain-1/") for p in objects)
    assert f"{bucket}/out/topk.parquet" in objects


LOGISTIC = {"problem": "bif.examples.logistic:build", "problem_args": {"n": 40, "n_query": 6},
            "compute": {"n_workers": 2},
            "sampler": {"num_chains": 2, "num_draws": 40, "num_burnin_steps": 20, "steps_per_draw": 2,
                        "step_size": 1e-2, "gamma": 10.0, "batch_size": 40}}


def test_lds_credentials_stay_out_of_prefect_logs_and_outputs(tmp_path, s3_bucket):
    bucket, opts = s3_bucket
    res, home = _run_cli(tmp_path, bucket, opts, LOGISTIC, "lds", "--num-subsets", "4", "--num-seeds", "1",
                         "--methods", "graddot")
    assert res.returncode == 0, res.stdout + res.stderr
    objects = _assert_no_leak(res, home, tmp_path, bucket, opts, "bif-lds", "lds")
    assert sum("/retrain/" in p for p in objects) == 4  # the retrainings wrote to S3
    assert any(p.endswith("/results/latest/summary.json") for p in objects)


def test_calibrate_credentials_stay_out_of_prefect_logs_and_outputs(tmp_path, s3_bucket):
    bucket, opts = s3_bucket
    res, home = _run_cli(tmp_path, bucket, opts, LOGISTIC, "calibrate", "--num-subsets", "3", "--num-draws", "10",
                         "--num-chains", "2", "--pilot-steps", "10")
    assert res.returncode == 0, res.stdout + res.stderr
    objects = _assert_no_leak(res, home, tmp_path, bucket, opts, "bif-calibrate", "calibrate")
    block = yaml.safe_load(objects[f"{bucket}/out/calibration/sampler.yaml"])["sampler"]
    assert block["step_size"] > 0 and block["nbeta"] > 0
    assert f"{bucket}/out/calibration/tradeoffs.png" in objects

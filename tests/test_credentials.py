"""One credentials policy for every flow (flows/runtime.py), checked through the CLI.

`bif run` here; `bif lds` and `bif calibrate` get the same check in tests/test_cli.py, whose
tests of those commands run on S3 (one run of each command asserts its values and the leak).
The flow writes to S3 (moto's real S3 API on 127.0.0.1) with a marker secret in the
config's ``storage_options``. The command starts its own Prefect server on a PREFECT_HOME
that is not the test session's (one home shared by the CLI tests, so its database is
created once); afterwards the marker must be in none of: Prefect's database (every file of
the home), the terminal, the run's log file, any object in the bucket, any local file
(tests/leak_check.py). The test also checks the flow really read and wrote S3, and that its
own run (its unique bucket) is in the database it greps, so it can fail.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leak_check import assert_no_leak

pytestmark = pytest.mark.e2e

BIF = str(Path(sys.executable).parent / "bif")
REPO = Path(__file__).resolve().parents[1]


def _run_cli(tmp_path: Path, home: Path, bucket: str, opts: dict, cfg: dict,
             *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "cfg.yaml").write_text(yaml.safe_dump(cfg | {"output": f"s3://{bucket}/out", "storage_options": opts}))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL" and not k.startswith("AWS_")}
    env["PREFECT_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    res = subprocess.run([BIF, args[0], "cfg.yaml", *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    return res, home


def test_run_credentials_stay_out_of_prefect_logs_and_outputs(tmp_path, s3_bucket, user_prefect_home):
    bucket, opts = s3_bucket
    cfg = {"problem": "bif.examples.linear:build", "compute": {"n_workers": 2},
           "sampler": {"num_chains": 2, "num_draws": 40, "num_burnin_steps": 5, "draws_per_block": 20,
                       "step_size": 1e-3}, "covariance": {"topk": 3}}
    res, home = _run_cli(tmp_path, user_prefect_home, bucket, opts, cfg, "run")
    assert res.returncode == 0, res.stdout + res.stderr
    objects = assert_no_leak(res, home, tmp_path / "work", bucket, opts, "bif-attribution", "run")
    import json

    assert json.loads(objects[f"{bucket}/out/manifest.json"])["status"] == "complete"
    assert any(p.startswith(f"{bucket}/out/traces/chain-1/") for p in objects)
    assert f"{bucket}/out/topk.parquet" in objects

"""One credentials policy for every flow (flows/runtime.py), checked through the CLI.

`bif run` here; `bif lds` and `bif calibrate` get the same check in tests/test_cli.py, whose
tests of those commands run on S3 (one run of each command asserts its values and the leak).
The flow writes to S3 (moto's real S3 API on 127.0.0.1) with a marker secret in the
config's ``storage_options``. The command uses the kept local Prefect server of a PREFECT_HOME
that is not the test session's (one home shared by the CLI tests, so its database is
created once); afterwards the marker must be in none of: Prefect's database (every file of
the home), the terminal, the run's log file, any object in the bucket, any local file
(tests/leak_check.py). The test also checks the flow really read and wrote S3, and that its
own run (its unique bucket) is in the database it greps, so it can fail. The run itself is the
session fixture ``linear_cli_run`` (tests/conftest.py), whose other checks are in
tests/test_server.py::test_bif_run_reports_to_the_kept_server: one run of the command, both checks.
"""
from __future__ import annotations

import json

import pytest

from leak_check import assert_no_leak

pytestmark = pytest.mark.e2e


def test_run_credentials_stay_out_of_prefect_logs_and_outputs(linear_cli_run):
    """The run of tests/conftest.py::linear_cli_run (one `bif run` on S3 with the marker secret, which
    test_server.py's kept-server test checks too): the marker is nowhere, and the run really wrote S3."""
    run = linear_cli_run
    assert run.res.returncode == 0, run.res.stdout + run.res.stderr
    objects = assert_no_leak(run.res, run.home, run.workdir, run.bucket, run.opts, "bif-attribution", "run")
    assert json.loads(objects[f"{run.bucket}/out/manifest.json"])["status"] == "complete"
    assert any(p.startswith(f"{run.bucket}/out/traces/chain-1/") for p in objects)
    assert f"{run.bucket}/out/topk.parquet" in objects

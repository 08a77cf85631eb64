"""Shared fixtures: a real S3 API (moto server on 127.0.0.1), a Prefect test server, a Dask LocalCluster."""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import uuid

import pytest

# Quiet, offline Prefect for every test process and its children (Dask workers inherit env).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bif-prefect-home-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_UI_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import torch  # noqa: E402

torch.set_num_threads(1)

S3_KEY = "AKIAEXAMPLEKEY123456"
S3_SECRET = "s3cr3t-value-that-must-never-leak-0123456789"


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 API served by moto on 127.0.0.1 (no mocks of s3fs). Yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_server):
    """A fresh bucket; yields (bucket name, storage_options with credentials)."""
    import boto3

    name = f"bif-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                 region_name="us-east-1").create_bucket(Bucket=name)
    opts = {"key": S3_KEY, "secret": S3_SECRET, "client_kwargs": {"endpoint_url": moto_server}}
    yield name, opts


@pytest.fixture(scope="session")
def prefect_api_url():
    """A Prefect test server for the session; its URL is exported so Dask workers report to it."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)
            from bif.flows.prefect_server import drain_prefect_workers

            drain_prefect_workers()


@pytest.fixture(scope="session")
def dask_address(prefect_api_url):
    """A real Dask LocalCluster (2 worker processes, 1 thread each), started after the Prefect server."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def user_prefect_home(tmp_path_factory):
    """One PREFECT_HOME for the CLI subprocess tests (test_cli, test_credentials, test_server): its kept
    local Prefect server (flows/prefect_server.py) boots in the background here, once, and every `bif`
    command of those tests reuses it, as a user's commands do; it is stopped at the end of the session.
    The server writes to this home's database, so the tests that grep the home for leaked secrets
    still look at the database the run wrote to (they identify their own rows by a unique bucket)."""
    import threading

    from bif.flows.prefect_server import ensure_server, stop_server

    home = tmp_path_factory.mktemp("prefect-home")
    boot = threading.Thread(target=lambda: ensure_server(home=home, timeout=180, idle_timeout_s=900),
                            daemon=True)  # a first command started meanwhile waits on the server's lock
    boot.start()
    yield home
    boot.join()
    stop_server(home)


@pytest.fixture(scope="session", autouse=True)
def _stop_kept_prefect_servers():
    """`bif` commands run with the session's PREFECT_HOME (test_faults) leave its kept server running: stop it."""
    yield
    from pathlib import Path

    from bif.flows.prefect_server import stop_server

    stop_server(Path(os.environ["PREFECT_HOME"]))

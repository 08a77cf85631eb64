"""Shared fixtures: a real S3 API (moto server on 127.0.0.1), a Prefect test server, a Dask LocalCluster."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# Quiet, offline Prefect for every test process and its children (Dask workers inherit env).
# Under pytest-xdist (`make test TEST_WORKERS=2`) every worker gets a Prefect home of its own:
# the workers inherit the controller's environment, and a shared home would share one kept local
# server (flows/prefect_server.py: its state file, lock and database), which one worker's teardown
# stops while the other still uses it.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _XDIST_WORKER:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"bif-prefect-home-{_XDIST_WORKER}-")
else:
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bif-prefect-home-"))
# bif's cache (the empty Prefect database that seeds fresh homes, flows/prefect_server.py): the session's own, never
# the user's ~/.cache; the first fresh home of the session creates it and the later ones start from it
os.environ["BIF_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"bif-cache-{_XDIST_WORKER or 'main'}-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_UI_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
# commands in tests start and stop their own Dask cluster; tests of the kept cluster turn it on themselves
os.environ.setdefault("BIF_KEEP_CLUSTER", "0")
# nor a warm bif process (bif.flows.warm): tests/test_warm.py turns it on
os.environ.setdefault("BIF_WARM", "0")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import torch  # noqa: E402

torch.set_num_threads(1)

# the machine in the header, each failure printed at once, --suite-deadline (tests/ci_watch.py)
from ci_watch import (  # noqa: E402,F401
    pytest_addoption, pytest_configure, pytest_report_header, pytest_runtest_logreport, pytest_runtest_protocol,
    pytest_sessionstart)

REPO = Path(__file__).resolve().parents[1]
S3_KEY = "AKIAEXAMPLEKEY123456"
S3_SECRET = "s3cr3t-value-that-must-never-leak-0123456789"


def shadowing_file(module: str) -> str:
    """The text of a ``<module>.py`` for a user's directory, where it bears an installed module's name: importing it
    fails (tests/test_cli.py, test_kept_cluster.py and test_warm.py check that bif's processes never import it)."""
    return f"raise ImportError('the working directory hid the installed {module}')\n"


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
    """A real Dask LocalCluster (2 worker processes, 1 thread each), started after the Prefect server.

    With the housekeeping intervals and the profiler setting of bif's own clusters
    (``bif.flows.runtime.dask_cluster``): at Dask's defaults this cluster, idle for most of a session, took 10.8% of
    a core (its scheduler in the pytest process 4.5%, each worker 3.1-3.2%; 1.5% with these settings, 30 s each,
    2026-12-05), in each xdist worker for the whole suite, on a suite that keeps both cores busy. The settings are
    set only while the cluster starts, so that no other cluster of the session gets them from here (a test of bif's
    own settings could not fail); a worker that a test kills comes back with Dask's defaults."""
    import dask
    from distributed import LocalCluster

    from bif.flows.runtime import HOUSEKEEPING

    with dask.config.set({**HOUSEKEEPING, "distributed.worker.profile.enabled": False}):  # read as they start
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=logging.ERROR)
    with cluster:  # the session's other clusters keep their own settings
        yield cluster.scheduler_address


#: The default linear run of tests/test_faults.py (its ``_cfg``), made once per session by
#: :func:`linear_complete_run`; ``compute`` and ``output`` are added there.
LINEAR_RUN_DATA = {
    "problem": "bif.examples.linear:build", "problem_args": {"n": 40, "d": 4, "m": 6, "singular": True, "seed": 2},
    "sampler": {"num_chains": 2, "num_draws": 60, "num_burnin_steps": 20, "steps_per_draw": 2, "step_size": 2e-3,
                "gamma": 10.0, "nbeta": 40.0, "batch_size": 40, "seed": 3, "draws_per_block": 20,
                "trace_dtype": "float64"},
    "covariance": {"train_block_size": 16, "query_block_size": 4, "topk": 5},
}


@dataclass(frozen=True)
class CompleteRun:
    """One complete run of :data:`LINEAR_RUN_DATA` (see :func:`linear_complete_run`)."""

    out: Path  # its local output folder
    cfg: object  # its bif.config.RunConfig
    manifest: dict  # what run_attribution returned


@pytest.fixture(scope="session")
def linear_complete_run(tmp_path_factory, dask_address) -> CompleteRun:
    """One complete `run_attribution` of :data:`LINEAR_RUN_DATA` on the session cluster, under the session's
    Prefect server, read (never written) by several tests that used to run it, or a config like it, each:
    test_faults.py (the refused rerun leaves it untouched; the corrupt-block test's uninterrupted
    reference) and test_strict_json.py (every JSON file of a run is strict)."""
    from bif.config import build_config
    from bif.flows.attribution import run_attribution

    out = tmp_path_factory.mktemp("linear-complete") / "run"
    cfg = build_config(LINEAR_RUN_DATA | {"output": str(out), "compute": {"address": dask_address}})
    return CompleteRun(out=out, cfg=cfg, manifest=run_attribution(cfg, show_progress=False))


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


@dataclass(frozen=True)
class CliRun:
    """One finished `bif run` subprocess (see :func:`linear_cli_run`)."""

    res: subprocess.CompletedProcess
    home: Path  # the PREFECT_HOME it ran with (the CLI tests' home)
    workdir: Path  # its working directory (holds the user's cfg.yaml)
    bucket: str  # its output is s3://<bucket>/out
    opts: dict  # storage_options with the marker credentials
    server: object  # bif.flows.prefect_server.ServerInfo of the kept server before the run


@pytest.fixture(scope="session")
def linear_cli_run(tmp_path_factory, moto_server, user_prefect_home) -> CliRun:
    """`bif run cfg.yaml` on the linear example as a user types it: the console script in a subprocess,
    no PREFECT_API_URL and no AWS_* variables, the CLI tests' Prefect home (whose kept server it must
    reuse), its output on S3 (moto) with the marker secret in the config's ``storage_options``.

    One run, two sets of assertions on it (they used to run the same command twice):
    test_credentials.py::test_run_credentials_stay_out_of_prefect_logs_and_outputs (the marker is
    nowhere) and test_server.py::test_bif_run_reports_to_the_kept_server (it reported to the kept
    server without replacing it, and ended its Dask workers). Under xdist both files are one group."""
    import boto3
    import yaml

    from bif.flows.prefect_server import ensure_server

    server = ensure_server(home=user_prefect_home, timeout=180)  # kept there by an earlier command
    bucket = f"bif-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    opts = {"key": S3_KEY, "secret": S3_SECRET, "client_kwargs": {"endpoint_url": moto_server}}
    cfg = {"problem": "bif.examples.linear:build", "compute": {"n_workers": 2},
           "sampler": {"num_chains": 2, "num_draws": 40, "num_burnin_steps": 5, "draws_per_block": 20,
                       "step_size": 1e-3}, "covariance": {"topk": 3}}
    work = tmp_path_factory.mktemp("linear-cli-run") / "work"
    work.mkdir()
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg | {"output": f"s3://{bucket}/out", "storage_options": opts}))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL" and not k.startswith("AWS_")}
    env["PREFECT_HOME"] = str(user_prefect_home)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    res = subprocess.run([str(Path(sys.executable).parent / "bif"), "run", "cfg.yaml"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    return CliRun(res=res, home=user_prefect_home, workdir=work, bucket=bucket, opts=opts, server=server)


@pytest.fixture(scope="session", autouse=True)
def _stop_kept_prefect_servers():
    """`bif` commands run with the session's PREFECT_HOME (test_faults) leave its kept server running: stop it."""
    yield
    from pathlib import Path

    from bif.flows.prefect_server import stop_server

    stop_server(Path(os.environ["PREFECT_HOME"]))


# ---------------------------------------------------------------- pytest-xdist: units and order
# `make test TEST_WORKERS=2` runs the default suite on two pytest-xdist workers, `--dist loadfile`: a unit of
# work is one test file, run whole in one worker in file order, so module-scoped fixtures (an
# example trained once per module, the server-lifecycle tests of test_server.py that run in order)
# behave as in a plain `pytest` run. Files that share one expensive session fixture share a unit
# (XDIST_GROUPS), so the fixture runs once. Units go out longest first, so that no long file starts
# last while the other worker idles. (xdist 3.8's `--dist loadgroup` groups nothing under pytest 9.2:
# it renames node ids through ``item._nodeid``, which pytest 9.2 no longer reads.)

#: Files that share a unit of work, with the session fixture they share.
XDIST_GROUPS = {
    "test_credentials.py": "cli-linear-run",  # linear_cli_run: one `bif run` on S3 for both files
    "test_server.py": "cli-linear-run",
    "test_faults.py": "linear-complete-run",  # linear_complete_run: one run_attribution, read by both files
    "test_strict_json.py": "linear-complete-run",
}

#: Rough wall time of a file's tests, seconds: each file's summed test times (setup included) in a
#: `pytest -n 2 --dist loadfile` run on the 2-core machine (junit; the mean of two fresh-clone runs of session 38,
#: 2026-12-05; test_warm: the second run's, after its `bif lds` test came), files under 3 s left out. Only the order
#: matters: the longest units go out first. (Both runs replayed in this order: 579/584 s and 637/637 s per worker.)
#: test_ops: 38 since its `bif backfill` CLI test (session 41, +22 s); test_tokens: 14 since its notebook test (+5 s).
#: test_cli: 118 (session 42: 89-101 s in two fresh-clone runs, then the README's problem from scratch, ~18-36 s).
#: Session 43: test_tinylm 38 (+20 s: its `bif lds`), test_lds_flow 33 (+18 s: a token problem), test_lm 13 (+9 s).
XDIST_COST_S = {
    "test_kept_cluster.py": 225, "test_flow.py": 114, "test_warm.py": 103, "test_numba_cache.py": 88,
    "test_faults.py": 83, "test_cli.py": 118, "test_startup.py": 61, "test_server.py": 53, "test_degenerate.py": 36,
    "test_sampler.py": 36, "test_runtime.py": 32, "test_bench.py": 28, "test_worker_settings.py": 27,
    "test_covariance.py": 25, "test_baselines.py": 25, "test_quality.py": 23, "test_tinylm.py": 38,
    "test_credentials.py": 17, "test_ops.py": 38, "test_ci_watch.py": 15, "test_report.py": 15, "test_lds_flow.py": 33,
    "test_notebook.py": 10, "test_registry.py": 10, "test_tokens.py": 14, "test_architecture.py": 8,
    "test_diagnostics.py": 8, "test_report_tokens.py": 7, "test_catalog.py": 7, "test_store.py": 6, "test_infra.py": 6,
    "test_threads.py": 5, "test_calibrate.py": 5, "test_lm.py": 13, "test_lds.py": 4,
}


def _unit_of(path: str | Path) -> str:
    """The unit of work of a test file: its XDIST_GROUPS group, else the file's name (as XDIST_COST_S names it;
    a full path here gave every ungrouped file cost 0, so they went out in collection order, not longest first)."""
    return XDIST_GROUPS.get(Path(path).name, Path(path).name)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist; `-p no:xdist` runs without it
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the files of XDIST_GROUPS in one unit, units in the workers' order."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileGroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit_of(nodeid.split("::", 1)[0])

    config.option.loadscopereorder = False  # keep the order of pytest_collection_modifyitems below
    return FileGroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """In an xdist worker: order the units of work longest first (tests keep their order within a
    unit; the scheduler hands units out in this order). A plain `pytest` run keeps pytest's order."""
    if not _XDIST_WORKER:
        return
    cost: dict[str, float] = {}
    for file, seconds in XDIST_COST_S.items():
        cost[_unit_of(file)] = cost.get(_unit_of(file), 0) + seconds
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(_unit_of(item.path), i)
    items.sort(key=lambda it: (-cost.get(_unit_of(it.path), 0), first_seen[_unit_of(it.path)]))  # stable

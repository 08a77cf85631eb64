"""The kept Dask cluster (flows/kept_cluster.py), driven as a user does: `bif run` and `bif server` subprocesses.

The suite turns the kept cluster off for every other test (tests/conftest.py sets BIF_KEEP_CLUSTER=0); these
turn it on in their commands' environment, with a Prefect home of their own, and stop it at the end.

- A second `bif run` reuses the first one's cluster (same serve process) with fresh workers (other pids), and
  computes the same BIF as the first (same seeds, other output).
- `bif backfill --max-concurrent 1` on the kept cluster runs each run's quality gates and report on its workers:
  the sweep's own process never loads great_expectations or matplotlib.
- A user's problem module edited between two commands is the edited one in the second: the kept processes
  never hold a user's module.
- Another set-up (here: another environment) replaces the cluster, and cluster.log says what changed.
- `bif server stop` stops it; `bif server status` shows it.
Unit tests: the fingerprint ignores what libraries set while loading, a command finds the cluster taken while
another holds it, and a kept cluster restarts its workers when a task outlives its command.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from bif.flows import kept_cluster
from conftest import shadowing_file
from test_ops import make_checkpoints

pytestmark = pytest.mark.e2e

BIF = str(Path(sys.executable).parent / "bif")
REPO = Path(__file__).resolve().parents[1]

USER_PROBLEM = '''
"""A user's problem module (edited between two commands by the test)."""
from bif.examples.linear import build as _linear

N = {n}


def build():
    return _linear(n=N, d=3, m=4, seed=1)
'''


def _env(home: Path, work: Path, **extra: str) -> dict[str, str]:
    """A user's shell in ``work``: the problem module there is found because it is the working directory (no
    PYTHONPATH entry for it, as a user has none)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(home), "BIF_KEEP_CLUSTER": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return env | extra


def _bif(home: Path, work: Path, *args: str, timeout: float = 420, **extra: str) -> subprocess.CompletedProcess:
    res = subprocess.run([BIF, *args], cwd=work, env=_env(home, work, **extra), capture_output=True, text=True,
                         timeout=timeout)
    return res


def _alive(pid: int) -> bool:
    """Running (an exited process whose parent is gone stays a zombie until init reaps it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cluster(home: Path) -> dict:
    return json.loads((home / "bif-cluster" / "cluster.json").read_text())


def _why_replaced(home: Path) -> str:
    """cluster.log's lines that say why a command replaced the kept cluster (for an assertion's message: a
    replacement that the test did not expect names its reason, not only two pids)."""
    log = home / "bif-cluster" / "cluster.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join(ln for ln in lines if "replacing the kept cluster" in ln or "could not use" in ln) or "(none)"


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user's working directory with a problem module and a config, and a Prefect home of its own."""
    home = tmp_path_factory.mktemp("kept-home")
    work = tmp_path_factory.mktemp("kept-work")
    (work / "myproblem.py").write_text(USER_PROBLEM.format(n=30))
    # beside it, a file with an installed module's name: the kept cluster's processes take the command's sys.path
    # (the directory last); `python -m` put it first, and the cluster never came up (every command a cluster of its
    # own, cluster.log: "ImportError: the working directory hid the installed yaml")
    (work / "yaml.py").write_text(shadowing_file("yaml"))
    cfg = {"problem": "myproblem:build", "compute": {"n_workers": 2},
           "sampler": {"num_chains": 2, "num_draws": 40, "num_burnin_steps": 5, "draws_per_block": 20,
                       "step_size": 1e-3, "nbeta": 30.0, "batch_size": 30, "seed": 4},
           "covariance": {"topk": 3}}
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    yield home, work
    subprocess.run([BIF, "server", "stop"], env=_env(home, work), capture_output=True, timeout=120)


def test_second_run_reuses_the_cluster_with_fresh_workers_and_the_same_bif(user):
    import xarray as xr

    home, work = user
    first = _bif(home, work, "run", "cfg.yaml", "--no-progress", "--output", "out1")
    assert first.returncode == 0, first.stderr[-3000:]
    kept = _cluster(home)
    assert _alive(kept["pid"])
    second = _bif(home, work, "run", "cfg.yaml", "--no-progress", "--output", "out2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert _cluster(home)["pid"] == kept["pid"], _why_replaced(home)  # the same kept cluster ...
    m1, m2 = (json.loads((work / o / "manifest.json").read_text()) for o in ("out1", "out2"))
    assert not set(m1["timings"]["chain_pid"]) & set(m2["timings"]["chain_pid"])  # ... with fresh workers
    assert m2["status"] == "complete" and m2["quality"]["passed"]
    b1, b2 = (xr.open_zarr(work / o / "bif.zarr", consolidated=False)["bif"].values for o in ("out1", "out2"))
    np.testing.assert_array_equal(b1, b2)  # same seeds, same draws: the kept cluster changes nothing
    status = _bif(home, work, "server", "status")
    assert f"pid {kept['pid']}" in status.stdout and kept["address"] in status.stdout


def test_a_sweep_on_the_kept_cluster_runs_its_gates_and_report_on_the_workers(user):
    """`bif backfill --max-concurrent 1` on the kept cluster runs each run's quality gates and report on the
    cluster's workers (their forkserver has great_expectations and matplotlib loaded), as `bif run` does, not in the
    sweep's own process. They ran there before: the first run of a 4-checkpoint digits sweep took 5.8 s instead of
    2.6 s, its gates importing great_expectations in that process (~5 s of a core). (With more runs at once they
    stay in the sweep's process: flows/cli_ops.py says why.)"""
    home, work = user
    make_checkpoints(str(work / "ckpts"), 2)  # two checkpoints of the linear model the config builds
    # the command's own main() in a process that reports, when it ends, which of the two it has loaded; run by the
    # `bif` script's interpreter (its path is part of the kept cluster's fingerprint: another would replace it)
    interpreter = Path(BIF).read_text().splitlines()[0].removeprefix("#!").strip()
    # (-P and main() with no argv: the command's own sys.path, the working directory last, where -c put it first)
    code = ("import sys\nfrom bif.flows.cli import main\ncode = main()\n"
            "print('loaded:', ' '.join(m for m in ('great_expectations', 'matplotlib') if m in sys.modules))\n"
            "sys.exit(code)")
    res = subprocess.run([interpreter, "-P", "-c", code, "backfill", "cfg.yaml", "--checkpoints", "ckpts/*.pt",
                          "--output", "sweep", "--max-concurrent", "1", "--no-progress"], cwd=work,
                         env=_env(home, work), capture_output=True, text=True, timeout=420)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "2 complete, 0 failed" in res.stdout, res.stdout[-2000:]
    assert re.search(r"^loaded: *$", res.stdout, re.M), res.stdout[-2000:]
    manifests = [json.loads(p.read_text()) for p in (work / "sweep" / "runs").glob("*/manifest.json")]
    assert len(manifests) == 2
    for m in manifests:  # the gates did run (on a worker), and the report was drawn
        assert m["status"] == "complete" and m["quality"]["passed"] and m["timings"]["gates_s"] > 0
    assert len(list((work / "sweep" / "runs").glob("*/report.html"))) == 2


def test_an_edited_problem_module_is_the_edited_one_in_the_next_run(user):
    home, work = user
    pid = _cluster(home)["pid"]
    (work / "myproblem.py").write_text(USER_PROBLEM.format(n=22))  # the user edits the module
    res = _bif(home, work, "run", "cfg.yaml", "--no-progress", "--output", "out-edited",
               "--set", "sampler.nbeta=22", "--set", "sampler.batch_size=22")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _cluster(home)["pid"] == pid, _why_replaced(home)  # still the kept cluster
    manifest = json.loads((work / "out-edited" / "manifest.json").read_text())
    assert manifest["n_train"] == 22  # not the 30 of the module the workers saw in the first runs


def test_bad_input_fails_on_the_kept_cluster_with_its_message(user):
    """With the server and the cluster kept, the pre-flight runs on a worker: a bad checkpoint still ends the
    command with exit 2 and the pre-flight's own message, and the kept cluster stays for the next command."""
    home, work = user
    pid = _cluster(home)["pid"]
    (work / "bad.pt").write_bytes(b"not a checkpoint")
    res = _bif(home, work, "run", "cfg.yaml", "--no-progress", "--output", "out-bad", "--set", "checkpoint=bad.pt")
    assert res.returncode == 2 and "could not be loaded as a state dict" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not (work / "out-bad" / "manifest.json").exists()
    assert _cluster(home)["pid"] == pid and _alive(pid), _why_replaced(home)


def test_bif_lds_and_bif_run_on_one_config_share_the_kept_cluster(user):
    """`bif lds` and `bif run` on one config use one kept cluster. (Each switch between `bif run`, `bif lds` and
    `bif calibrate` replaced it before: the next command paid a cold start, 13-15 s instead of 1-3 s on the 2-core
    machine.) Here the cluster was started for the user's own module; `bif lds` on bif's logistic example needs that
    example's modules ahead, so it replaces the cluster once with one that imports both, which `bif run` reuses."""
    home, work = user
    old = _cluster(home)["pid"]
    cfg = {"problem": "bif.examples.logistic:build", "problem_args": {"n": 40, "n_query": 6},
           "compute": {"n_workers": 2},
           "sampler": {"num_chains": 2, "num_draws": 40, "num_burnin_steps": 10, "draws_per_block": 20,
                       "step_size": 1e-2, "gamma": 10.0, "batch_size": 40, "seed": 4}}
    (work / "logistic.yaml").write_text(yaml.safe_dump(cfg))
    lds = _bif(home, work, "lds", "logistic.yaml", "--num-subsets", "4", "--num-seeds", "1", "--methods", "graddot",
               "--output", "out-lds")
    assert lds.returncode == 0, lds.stderr[-3000:]
    assert re.search(r"^\s+graddot\s+LDS [+-][\d.]+", lds.stdout, re.M), lds.stdout
    pid = _cluster(home)["pid"]
    assert pid != old and not _alive(old)
    log = (home / "bif-cluster" / "cluster.log").read_text()
    assert f"replacing the kept cluster (pid {old}): it does not import bif.examples.logistic" in log, log[-2000:]
    run = _bif(home, work, "run", "logistic.yaml", "--no-progress", "--output", "out-logistic")
    assert run.returncode == 0, run.stderr[-3000:]
    assert _cluster(home)["pid"] == pid and _alive(pid), _why_replaced(home)
    assert (home / "bif-cluster" / "cluster.log").read_text().count("replacing") == log.count("replacing")


def test_another_environment_replaces_the_cluster_and_stop_ends_it(user):
    home, work = user
    old = _cluster(home)
    res = _bif(home, work, "run", "cfg.yaml", "--no-progress", "--output", "out-env", BIF_TEST_MARKER="other")
    assert res.returncode == 0, res.stderr[-3000:]
    new = _cluster(home)
    assert new["pid"] != old["pid"] and not _alive(old["pid"])
    assert "changed env" in (home / "bif-cluster" / "cluster.log").read_text()
    stop = _bif(home, work, "server", "stop")
    assert "stopped the kept Dask cluster" in stop.stdout
    deadline = time.monotonic() + 30
    while _alive(new["pid"]):
        assert time.monotonic() < deadline, "the kept cluster outlived `bif server stop`"
        time.sleep(0.2)
    assert kept_cluster.status(home) is None


# ---------------------------------------------------------------- units


def test_fingerprint_follows_the_environment_but_not_what_libraries_set_on_import(monkeypatch):
    spec = {"compute": {"n_workers": 2}, "num_tasks": 2, "preload": [], "warm_modules": []}
    base = kept_cluster.fingerprint(spec)
    monkeypatch.setenv("KMP_DUPLICATE_LIB_OK", "True")  # set by a library while the command imports it
    monkeypatch.setenv("KMP_INIT_AT_FORK", "FALSE")
    assert kept_cluster.fingerprint(spec) == base
    monkeypatch.setenv("MAKELEVEL", "7")  # `make demo`, then a plain `bif run`: the same cluster
    monkeypatch.setenv("MAKEFLAGS", "-j2 --no-print-directory")
    assert kept_cluster.fingerprint(spec) == base
    # `bif run`, then `bif run -v`: configure_terminal's two variables only change what the kept workers write to
    # cluster.log, so the same cluster; but not the same warm process, whose copy writes to the terminal
    from bif.flows import runtime, warm

    monkeypatch.delenv("BIF_QUIET_TERMINAL", raising=False)
    monkeypatch.delenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", raising=False)
    monkeypatch.setattr(runtime, "_quiet_this_process", lambda: None)  # this test process keeps its loggers
    monkeypatch.setattr(runtime, "_VERBOSE", runtime._VERBOSE)
    verbose, verbose_warm = kept_cluster.fingerprint(spec), warm.request_key()
    runtime.configure_terminal(verbose=False)
    assert os.environ["BIF_QUIET_TERMINAL"] == "1" and kept_cluster.fingerprint(spec) == verbose
    assert warm.request_key() != verbose_warm
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")  # other credentials: another cluster
    assert kept_cluster.fingerprint(spec) != base
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert kept_cluster.fingerprint(spec) == base
    assert kept_cluster.fingerprint({**spec, "num_tasks": 3}) != base
    # what the cluster imports ahead is not its identity (test_a_cluster_that_imports_what_a_command_needs_serves_it)
    assert kept_cluster.fingerprint({**spec, "preload": ["bif.tasks.steps"], "warm_modules": ["graphlib"]}) == base
    monkeypatch.setattr(kept_cluster, "_code_stamp", lambda: [("bif/x.py", 1, 2)])  # bif edited or upgraded
    assert kept_cluster.fingerprint(spec) != base


def test_torchs_own_inductor_cache_default_is_not_a_set_up_but_a_users_value_is(monkeypatch, tmp_path):
    """transformers loads torch._dynamo, which sets TORCHINDUCTOR_CACHE_DIR in the command's environment. A tinylm
    `bif run` that ran in itself had it at the cluster's claim; the next, a warm copy with the shell's environment,
    had not and replaced the cluster (15 s). The value torch sets must not count; another value must."""
    from bif.flows import warm

    spec = {"compute": {"n_workers": 2}, "num_tasks": 2, "preload": [], "warm_modules": []}
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    base, base_warm = kept_cluster.fingerprint(spec), warm.request_key()
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    code = "import os, torch._dynamo; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", res.stdout.strip())  # what torch set while loading
    assert kept_cluster.fingerprint(spec) == base and warm.request_key() == base_warm
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the user's own cache: another set-up
    assert kept_cluster.fingerprint(spec) != base and warm.request_key() != base_warm


def test_bif_run_lds_and_calibrate_ask_the_kept_cluster_for_modules_it_imports_from_the_start():
    """The worker preloads of `bif lds` and `bif calibrate` are among those every kept cluster starts with (with
    `bif run`'s), so switching between the commands never replaces the cluster for a module (each switch did)."""
    from bif.flows import calibrate, lds, runtime

    for flow_preload in (runtime.DEFAULT_PRELOAD, lds.PRELOAD, calibrate.PRELOAD):
        assert set(flow_preload) <= set(runtime.KEPT_WORKER_PRELOAD), flow_preload


def test_a_cluster_that_imports_what_a_command_needs_serves_it(tmp_path, monkeypatch):
    """A command whose modules the kept cluster imports ahead reuses it whatever else the cluster imports; one that
    needs another module replaces it with a cluster that imports both, so that the first command's set-up is served
    by the new cluster too (no cluster per command when a user switches between `bif run` and `bif lds`)."""
    from distributed import Client

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    from bif.config import ComputeConfig

    base = {"compute": ComputeConfig(n_workers=1).model_dump(), "num_tasks": 1, "preload": ["bif.flows.runtime"],
            "warm_modules": []}
    extra = {**base, "warm_modules": ["graphlib"]}  # a module nothing else here imports

    def worker_has(address: str, module: str) -> bool:
        with Client(address, set_as_default=False) as client:
            (has,) = client.run(lambda: module in sys.modules).values()
            return has

    try:
        with kept_cluster.use_kept_cluster(base) as kept:
            first, reused = kept
            assert not reused and first.modules == {"preload": ["bif.flows.runtime"], "warm_modules": []}
            assert not worker_has(first.address, "graphlib")
        with kept_cluster.use_kept_cluster({**base, "preload": []}) as kept:  # asks for less: served
            info, reused = kept
            assert reused and info.pid == first.pid
        with kept_cluster.use_kept_cluster(extra) as kept:  # asks for a module the cluster lacks: replaced
            second, reused = kept
            assert not reused and second.pid != first.pid and not _alive(first.pid)
            assert second.modules == {"preload": ["bif.flows.runtime"], "warm_modules": ["graphlib"]}
            assert worker_has(second.address, "graphlib")  # forked from a forkserver that imported it
        log = (tmp_path / "bif-cluster" / "cluster.log").read_text()
        assert f"replacing the kept cluster (pid {first.pid}): it does not import graphlib" in log, log[-2000:]
        with kept_cluster.use_kept_cluster(base) as kept:  # the first set-up again: the new cluster serves it
            info, reused = kept
            assert reused and info.pid == second.pid
    finally:
        kept_cluster.stop()


def test_a_command_finds_the_cluster_taken_while_another_uses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    state = kept_cluster.cluster_dir()
    state.mkdir(parents=True)
    held = kept_cluster._try_lock(state / "use.lock")
    assert held is not None
    spec = {"compute": {"n_workers": 1}, "num_tasks": 1, "preload": [], "warm_modules": []}
    try:
        with kept_cluster.use_kept_cluster(spec) as kept:
            assert kept is None  # the caller starts a cluster of its own
    finally:
        held.close()
    assert not (state / "cluster.json").exists()  # nothing was started


def test_a_task_that_outlives_its_command_is_stopped(tmp_path, monkeypatch):
    """A command killed mid-run leaves its task running on the kept workers; the cluster restarts them."""
    from distributed import Client

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    from bif.config import ComputeConfig

    spec = {"compute": ComputeConfig(n_workers=1).model_dump(), "num_tasks": 1, "preload": ["bif.flows.runtime"],
            "warm_modules": []}
    try:
        with kept_cluster.use_kept_cluster(spec) as kept:
            assert kept is not None
            info, reused = kept
            assert not reused
            client = Client(info.address, set_as_default=False)
            # its scheduler had what it needs to unpickle a `bif run`'s tasks imported before the first command came
            # (kept_cluster._import_for_scheduler; that cost the first run on a new cluster 1.2 s), and not torch
            loaded = client.run_on_scheduler(lambda: [m for m in (*kept_cluster.SCHEDULER_IMPORTS, "torch")
                                                      if m in sys.modules])
            assert loaded == list(kept_cluster.SCHEDULER_IMPORTS)
            worker_pid = next(iter(client.run(os.getpid).values()))
            chain = client.submit(time.sleep, 600, pure=False)  # a chain that would run for 10 minutes
            deadline = time.monotonic() + 30
            while not any(client.run(kept_cluster._executing_count).values()):
                assert time.monotonic() < deadline, "the task never started"
                time.sleep(0.1)
            # the command is killed: its client goes (the scheduler releases the task, the thread runs on)
            del chain
            client.close()
        # and its use.lock is released while its task still runs: the cluster restarts the worker
        deadline = time.monotonic() + 60
        while _alive(worker_pid):
            assert time.monotonic() < deadline, "the orphaned task's worker was not restarted"
            time.sleep(0.2)
    finally:
        kept_cluster.stop()


def test_released_workers_are_restarted_by_the_cluster_so_the_next_command_need_not(tmp_path, monkeypatch):
    """The cluster's process restarts the workers a command released and marks them fresh; the next command
    consumes the mark and uses them as they are (no restart on its way to the first step), and they are
    restarted again after it."""
    from distributed import Client

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    from bif.config import ComputeConfig

    spec = {"compute": ComputeConfig(n_workers=1).model_dump(), "num_tasks": 1, "preload": ["bif.flows.runtime"],
            "warm_modules": []}
    mark = tmp_path / "bif-cluster" / kept_cluster.FRESH_FILE

    def pids(address: str) -> set[int]:
        with Client(address, set_as_default=False) as client:
            return set(client.run(os.getpid).values())

    def wait_for_mark() -> None:
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert time.monotonic() < deadline, "the released workers were not restarted and marked fresh"
            time.sleep(0.1)

    try:
        with kept_cluster.use_kept_cluster(spec) as kept:
            info, reused = kept
            assert not reused
            used = pids(info.address)
            assert not mark.exists()
        wait_for_mark()
        fresh = pids(info.address)
        assert fresh and not fresh & used  # restarted after the command released them
        with kept_cluster.use_kept_cluster(spec) as kept:
            again, reused = kept
            assert reused and again.pid == info.pid
            assert not mark.exists()  # consumed by this command
            assert pids(again.address) == fresh  # used as they are: no restart by the command
        wait_for_mark()
        assert not pids(info.address) & fresh  # and restarted again after it
    finally:
        kept_cluster.stop()


def test_each_command_sets_the_idle_wait_after_itself_and_the_cluster_stops_by_itself(tmp_path, monkeypatch):
    """compute.keep_cluster_idle_s is the wait after the command that set it, not part of the set-up: a command
    asking for another wait reuses the cluster (no replacement), `bif server status`'s source shows the new wait, and
    the idle cluster stops by itself after it. (A scheduled command every 15 minutes found the cluster stopped after
    its 10 idle minutes, every time, and paid a new cluster's start in each run.)"""
    from bif.config import ComputeConfig
    from bif.flows.runtime import dask_cluster

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv(kept_cluster.KEEP_ENV, "1")
    fields = {"n_workers": 1}
    try:
        with dask_cluster(ComputeConfig(**fields, keep_cluster_idle_s=900), num_tasks=1, preload=(),
                          keep=True) as cluster:
            assert cluster.kept
            first = _cluster(tmp_path)
            assert first["idle_timeout_s"] == 900.0
        with dask_cluster(ComputeConfig(**fields, keep_cluster_idle_s=2), num_tasks=1, preload=(),
                          keep=True) as cluster:
            assert cluster.kept and cluster.address == first["address"]
            now = _cluster(tmp_path)
            assert now["pid"] == first["pid"] and now["idle_timeout_s"] == 2.0, _why_replaced(tmp_path)
        deadline = time.monotonic() + 60  # released: ~2 s idle, a look at its workers, then it stops
        while _alive(first["pid"]):
            assert time.monotonic() < deadline, "the idle cluster did not stop after the command's 2 s"
            time.sleep(0.2)
        assert "replacing" not in (tmp_path / "bif-cluster" / "cluster.log").read_text()
    finally:
        kept_cluster.stop()


def test_an_idle_cluster_looks_at_its_workers_after_a_command_or_once_a_minute():
    """The idle loop calls its workers (task running? all there?) when a command held the cluster since its last
    look, when the fresh mark is gone (a command claimed the workers between two polls, or was killed), and
    otherwise only every IDLE_CHECK_S seconds; not every second as before."""
    due = kept_cluster._idle_check_due
    limit = kept_cluster.IDLE_CHECK_S
    assert 10.0 <= limit <= 120.0
    assert due(marked=True, used=True, since_check_s=1.0)  # a command released the cluster
    assert due(marked=False, used=False, since_check_s=1.0)  # the mark was consumed (or never written)
    assert due(marked=True, used=False, since_check_s=limit)  # the safety net: a worker that died meanwhile
    assert not due(marked=True, used=False, since_check_s=1.0)
    assert not due(marked=True, used=False, since_check_s=limit - 1.0)


def test_workers_that_do_not_come_back_get_a_new_cluster(tmp_path, monkeypatch):
    """A kept cluster whose forkserver hangs (stopped with SIGSTOP: no worker can be forked) is replaced by the
    next command after BIF_KEPT_RESTART_TIMEOUT seconds, not waited on and then abandoned for a cluster of its own."""
    import signal

    from distributed import Client

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv(kept_cluster.RESTART_TIMEOUT_ENV, "5")
    from bif.config import ComputeConfig

    spec = {"compute": ComputeConfig(n_workers=1).model_dump(), "num_tasks": 1, "preload": ["bif.flows.runtime"],
            "warm_modules": []}
    hung = None
    try:
        with kept_cluster.use_kept_cluster(spec) as kept:
            assert kept is not None and not kept[1]
            first = kept[0]
        forkservers = [p for p in psutil.Process(first.pid).children(recursive=True)
                       if "forkserver" in " ".join(p.cmdline())]
        assert forkservers, "the kept cluster forks its workers from a forkserver"
        hung = forkservers[0]
        hung.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with kept_cluster.use_kept_cluster(spec) as kept:
            assert kept is not None
            info, reused = kept
            assert not reused and info.pid != first.pid  # a new cluster ...
            with Client(info.address, set_as_default=False) as client:
                assert client.submit(os.getpid, pure=False).result(timeout=60) > 0  # ... whose workers run tasks
        assert time.monotonic() - t0 < 120
        assert not _alive(first.pid)
        log = (tmp_path / "bif-cluster" / "cluster.log").read_text()
        assert "its workers did not come back" in log
        # with what its processes were doing: here the forkserver, stopped (SIGSTOP)
        assert re.search(rf"its processes: .*forkserver {hung.pid} \(parent {first.pid}\) stopped", log), log[-2000:]
    finally:
        if hung is not None:
            with contextlib.suppress(psutil.Error):
                hung.kill()
        kept_cluster.stop()


def test_workers_that_start_slowly_are_waited_for_not_replaced(tmp_path, monkeypatch):
    """Workers that take longer than BIF_KEPT_RESTART_TIMEOUT to register, but whose processes are alive and
    starting, are waited for: the cluster is kept (load slows a restart: 0.3 s idle, 1-3.3 s beside 10 busy
    processes). Here a worker preload sleeps 5 s at start, past a 2 s timeout. A hung forkserver still fails after
    the timeout (test_workers_that_do_not_come_back_get_a_new_cluster)."""
    from distributed import Client

    from bif.config import ComputeConfig

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(kept_cluster.RESTART_TIMEOUT_ENV, "2")
    monkeypatch.chdir(tmp_path)  # the kept cluster's processes import the preload from their working directory
    slow = tmp_path / "slow"
    (tmp_path / "slowstart.py").write_text(
        f"import os, time\n\n\ndef dask_setup(worker):\n    if os.path.exists({str(slow)!r}):\n        time.sleep(5)\n")
    spec = {"compute": ComputeConfig(n_workers=2).model_dump(), "num_tasks": 2,
            "preload": ["bif.flows.runtime", "slowstart"], "warm_modules": []}
    mark = tmp_path / "home" / "bif-cluster" / kept_cluster.FRESH_FILE
    try:
        with kept_cluster.use_kept_cluster(spec) as kept:
            info, reused = kept
            assert not reused
            slow.touch()
            t0 = time.monotonic()
            kept_cluster._restart_workers(info.address, 2, info.pid)  # a command's restart: waits, does not raise
            assert time.monotonic() - t0 > 2.0  # past the timeout: the wait went on while the workers started
            with Client(info.address, set_as_default=False) as client:
                assert len(client.scheduler_info()["workers"]) == 2
                assert client.submit(os.getpid, pure=False).result(timeout=60) > 0
        deadline = time.monotonic() + 60  # released: the cluster's own restart (slow too) marks them fresh
        while not mark.exists():
            assert time.monotonic() < deadline, (tmp_path / "home" / "bif-cluster" / "cluster.log").read_text()[-2000:]
            time.sleep(0.1)
        with kept_cluster.use_kept_cluster(spec) as kept:
            again, reused = kept
            assert reused and again.pid == info.pid, _why_replaced(tmp_path / "home")
        log = (tmp_path / "home" / "bif-cluster" / "cluster.log").read_text()
        assert "restarting the workers failed" not in log and "replacing" not in log, log[-2000:]
    finally:
        kept_cluster.stop()


def test_back_to_back_restarts_keep_every_worker(tmp_path, monkeypatch):
    """Restarts in a row leave the kept cluster all its workers. LocalCluster closed a worker's nanny for good when,
    distributed.deploy.lost-worker-timeout after a restart removed its worker, the worker was away again in a later
    restart's gap (bif.flows.runtime.LOST_WORKER_TIMEOUT): the cluster had a worker less, and the next command's
    restart replaced it. The environment asks for a 1 s check here (Dask's default is 15 s), so that several checks
    fall within the restarts below; the cluster's own setting must win."""
    from distributed import Client

    from bif.config import ComputeConfig

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT", "1s")
    spec = {"compute": ComputeConfig(n_workers=2).model_dump(), "num_tasks": 2, "preload": ["bif.flows.runtime"],
            "warm_modules": []}
    try:
        with kept_cluster.use_kept_cluster(spec) as kept:  # holds the cluster: its own loop restarts nothing
            info, _ = kept
            t0, restarts = time.monotonic(), 0
            while time.monotonic() - t0 < 8.0:
                kept_cluster._restart_workers(info.address, 2, info.pid)
                restarts += 1
            assert restarts >= 5
            time.sleep(1.5)  # the checks of the last restarts
            with Client(info.address, set_as_default=False) as client:
                assert len(client.scheduler_info()["workers"]) == 2
                assert len(set(client.run(os.getpid).values())) == 2
    finally:
        kept_cluster.stop()


def test_switched_off_by_the_environment_or_the_config(monkeypatch):
    from bif.config import ComputeConfig

    monkeypatch.setenv("BIF_KEEP_CLUSTER", "1")
    assert kept_cluster.enabled(ComputeConfig())
    assert not kept_cluster.enabled(ComputeConfig(keep_cluster=False))
    assert not kept_cluster.enabled(ComputeConfig(address="tcp://127.0.0.1:8786"))
    for off in ("0", "false", "off"):
        monkeypatch.setenv("BIF_KEEP_CLUSTER", off)
        assert not kept_cluster.enabled(ComputeConfig())


"""The warm bif process (flows/warm.py), driven as a user does: `bif run` and `bif server` subprocesses.

The suite turns it off for every other test (tests/conftest.py sets BIF_WARM=0 and BIF_KEEP_CLUSTER=0); these
turn both on in their commands' environment, with a Prefect home and a working directory of their own.

- The first `bif run` runs in itself and starts the warm process (the fixture); the next one runs as its copy
  (warm.log says so) and computes the same BIF, with its summary on the command's own standard output.
- `bif backfill` and `bif watch` run as copies too.
- Bad input in a copy: exit 2 and the message on the command's standard error, no traceback.
- Ctrl-C: the command passes SIGINT to its copy, which stops as `bif run` stops (exit 130, its message).
- Another environment: the command runs in itself, and a warm process of its set-up replaces the old one.
- `bif server status` shows it, `bif server stop` stops it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from bif.flows import warm
from conftest import shadowing_file
from test_ops import make_checkpoints

pytestmark = pytest.mark.e2e

BIF = str(Path(sys.executable).parent / "bif")
REPO = Path(__file__).resolve().parents[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(home), "BIF_KEEP_CLUSTER": "1", "BIF_WARM": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return env | extra


def _bif(home: Path, work: Path, *args: str, timeout: float = 420, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([BIF, *args], cwd=work, env=_env(home, **extra), capture_output=True, text=True,
                          timeout=timeout)


def _log(home: Path) -> str:
    path = home / "bif-warm" / "warm.log"
    return path.read_text() if path.exists() else ""


def _wait_for_warm(home: Path, *, other_than: int | None = None, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = warm.status(home)
        if info is not None and info["pid"] != other_than and f"warm process {info['pid']} ready" in _log(home):
            return info
        time.sleep(0.2)
    raise AssertionError(f"no warm process came up in {timeout} s; warm.log:\n{_log(home)[-3000:]}")


def _copies(home: Path) -> list[tuple[int, int]]:
    """(pid, exit status) of every copy that ended, from warm.log."""
    out = []
    for line in _log(home).splitlines():
        if line.startswith("copy ") and " ended: exit " in line:
            pid, code = line[5:].split(" ended: exit ")
            out.append((int(pid), int(code)))
    return out


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    home = tmp_path_factory.mktemp("warm-home")
    work = tmp_path_factory.mktemp("warm-work")
    cfg = {"problem": "bif.examples.linear:build", "problem_args": {"n": 30, "d": 3, "m": 4, "seed": 1},
           "compute": {"n_workers": 2},
           "sampler": {"num_chains": 2, "num_draws": 40, "num_burnin_steps": 5, "draws_per_block": 20,
                       "step_size": 1e-3, "nbeta": 30.0, "batch_size": 30, "seed": 4},
           "covariance": {"topk": 3}}
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # a file of the user's directory with a standard module's name: the warm process and the kept cluster start
    # with `python -P` and take the command's sys.path, the directory last. With `python -m` the directory came
    # first: neither came up (each imported this with its own imports), and this first command failed ("Nanny
    # failed to start"). A cluster of the command's own (BIF_KEEP_CLUSTER=0) failed so too until session 44: its
    # forkserver starts with `python -c`, which put the directory first, and imports socket before it takes the
    # command's sys.path; it now starts with PYTHONSAFEPATH (tests/test_cli.py's from-scratch test checks it).
    (work / "socket.py").write_text(shadowing_file("socket"))
    # the first command runs in itself and starts the kept server, the kept cluster and the warm process
    first = _bif(home, work, "run", "cfg.yaml", "--no-progress", "--output", "out1")
    assert first.returncode == 0, first.stderr[-3000:]
    _wait_for_warm(home)
    assert not _copies(home)
    yield home, work
    subprocess.run([BIF, "server", "stop"], cwd=work, env=_env(home), capture_output=True, timeout=120)


def test_the_next_run_is_a_copy_of_the_warm_process_with_the_same_result(user):
    import xarray as xr

    home, work = user
    info = _wait_for_warm(home)
    before = len(_copies(home))
    second = _bif(home, work, "run", "cfg.yaml", "--no-progress", "--output", "out2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert [code for _, code in _copies(home)[before:]] == [0]  # it ran as a copy ...
    assert "status: complete" in second.stdout and "out2" in second.stdout  # ... on the command's own stdout
    b1, b2 = (xr.open_zarr(work / o / "bif.zarr", consolidated=False)["bif"].values for o in ("out1", "out2"))
    np.testing.assert_array_equal(b1, b2)  # same seeds, same draws
    assert json.loads((work / "out2" / "manifest.json").read_text())["status"] == "complete"
    status = _bif(home, work, "server", "status")
    assert f"warm bif process: pid {info['pid']}" in status.stdout


def test_backfill_and_watch_run_as_copies_too(user):
    """`bif backfill` and `bif watch` run as copies (warm.COMMANDS), their output on the command's own standard
    output. A watch that finds nothing new starts no server and no cluster: in itself it was its imports (2.3-2.4 s
    on the 2-core machine), as a copy 0.2 s."""
    home, work = user
    _wait_for_warm(home)
    make_checkpoints(str(work / "ckpts"), 2)  # two checkpoints of the linear model the config builds
    before = len(_copies(home))
    sweep = _bif(home, work, "backfill", "cfg.yaml", "--checkpoints", "ckpts/*.pt", "--output", "sweep",
                 "--no-progress")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "2 complete, 0 failed, 0 skipped" in sweep.stdout, sweep.stdout[-2000:]
    watch = _bif(home, work, "watch", "cfg.yaml", "--checkpoints", "ckpts/*.pt", "--output", "sweep", "--no-progress")
    assert watch.returncode == 0, watch.stderr[-3000:]
    assert "0 complete, 0 failed, 2 skipped" in watch.stdout, watch.stdout[-2000:]
    assert [code for _, code in _copies(home)[before:]] == [0, 0]  # both ran as copies
    log = _log(home)
    assert "runs `bif backfill`" in log and "runs `bif watch`" in log
    manifests = [json.loads(p.read_text()) for p in (work / "sweep" / "runs").glob("*/manifest.json")]
    assert sorted(m["status"] for m in manifests) == ["complete", "complete"]


def test_lds_runs_as_a_copy_with_the_result_it_has_in_itself(user):
    """`bif lds` runs as a copy too (warm.COMMANDS): on a running kept cluster it took 4.5-5.0 s in itself and
    2.3-2.7 s as a copy (logistic, 4 subsets, bif and graddot; 2-core machine, 2026-12-04)."""
    home, work = user
    _wait_for_warm(home)
    # the LDS retrains, which the linear example cannot (no fit): the logistic one, whose module the kept cluster
    # then adds to its forkserver (one replacement, which serves both examples after it)
    cfg = {"problem": "bif.examples.logistic:build", "problem_args": {"n": 40, "n_query": 6},
           "compute": {"n_workers": 2}, "sampler": {"num_chains": 2, "num_draws": 40, "batch_size": 40}}
    (work / "lds.yaml").write_text(yaml.safe_dump(cfg))
    args = ("lds", "lds.yaml", "--num-subsets", "4", "--num-seeds", "1", "--methods", "graddot", "--output", "lds")
    alone = _bif(home, work, *args, BIF_WARM="0")  # in itself: the warm process is off for this command
    assert alone.returncode == 0, alone.stderr[-3000:]
    before = len(_copies(home))
    copy = _bif(home, work, *args)
    assert copy.returncode == 0, copy.stderr[-3000:]
    assert [code for _, code in _copies(home)[before:]] == [0] and "runs `bif lds`" in _log(home)

    def lds_lines(res: subprocess.CompletedProcess) -> list[str]:  # the method's LDS and its error, not its time
        return [line.rsplit("  ", 1)[0] for line in res.stdout.splitlines() if " LDS " in line]

    assert lds_lines(copy) == lds_lines(alone) and len(lds_lines(alone)) == 1
    assert "(retrained, 4 retrainings)" in alone.stdout and "(reused, 0 retrainings)" in copy.stdout


def test_bad_input_in_a_copy_exits_2_with_its_message(user):
    home, work = user
    _wait_for_warm(home)
    before = len(_copies(home))
    res = _bif(home, work, "run", "cfg.yaml", "--no-progress", "--output", "out-bad", "--set", "sampler.num_drawz=3")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "unknown config key 'sampler.num_drawz'" in res.stderr and "Traceback" not in res.stderr
    assert _copies(home)[before:] == [(_copies(home)[-1][0], 2)]


def test_ctrl_c_reaches_the_copy(user):
    """SIGINT to the command: its copy stops as `bif run` stops on Ctrl-C (exit 130, 'interrupted')."""
    home, work = user
    _wait_for_warm(home)
    before = len(_copies(home))
    proc = subprocess.Popen([BIF, "run", "cfg.yaml", "--no-progress", "--output", "out-int",
                             "--set", "sampler.num_draws=4000", "--set", "sampler.draws_per_block=500"],
                            cwd=work, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((work / "out-int" / "traces").glob("chain-*/*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)  # the chains sample (a block is committed), as when a user presses Ctrl-C
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err
    assert [code for _, code in _copies(home)[before:]] == [130]


def test_another_environment_runs_in_itself_and_replaces_the_warm_process(user):
    home, work = user
    old = _wait_for_warm(home)
    before = len(_copies(home))
    res = _bif(home, work, "run", "cfg.yaml", "--no-progress", "--output", "out-env", BIF_TEST_OTHER_SETUP="1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(_copies(home)) == before  # not a copy of the old set-up's process
    assert "a command with another set-up (env) runs in itself" in _log(home)  # the part that changed
    new = _wait_for_warm(home, other_than=old["pid"])
    deadline = time.monotonic() + 30
    while warm._alive(old["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)  # the replaced one leaves (it had no copy running)
    assert not warm._alive(old["pid"])
    stop = _bif(home, work, "server", "stop", BIF_TEST_OTHER_SETUP="1")
    assert f"stopped the warm bif process (pid {new['pid']})" in stop.stdout
    deadline = time.monotonic() + 30
    while warm._alive(new["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not warm._alive(new["pid"]) and warm.status(home) is None


def test_the_set_up_is_the_environment_bif_run_makes(monkeypatch):
    """`make demo` exports two of the variables `bif run` sets by default anyway (DO_NOT_TRACK=1,
    PREFECT_SERVER_ANALYTICS_ENABLED=false): the same set-up as a shell's `bif run`; another value is not."""
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    shell = warm.request_key()
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    assert warm.request_key() == shell
    monkeypatch.setenv("MAKELEVEL", "1")  # what make sets for a recipe changes nothing either
    assert warm.request_key() == shell
    monkeypatch.setenv("DO_NOT_TRACK", "0")
    assert warm.request_key() != shell
    assert set(warm.key_parts()) == {"protocol", "python", "path", "cwd", "env", "profiles", "code"}


def test_only_plain_runs_go_to_a_warm_copy(monkeypatch):
    monkeypatch.setenv("BIF_WARM", "1")
    monkeypatch.setenv("BIF_KEEP_CLUSTER", "1")
    assert warm.enabled(["run", "cfg.yaml"]) and warm.enabled(["lds", "cfg.yaml"])
    assert not warm.enabled(["run", "cfg.yaml", "-v"])  # the terminal is set up before Prefect loads
    assert not warm.enabled(["show", "out"]) and not warm.enabled([])
    monkeypatch.setenv("BIF_KEEP_CLUSTER", "0")
    assert not warm.enabled(["run", "cfg.yaml"])
    monkeypatch.setenv("BIF_KEEP_CLUSTER", "1")
    monkeypatch.setenv("BIF_WARM", "off")
    assert not warm.enabled(["run", "cfg.yaml"])
    monkeypatch.setenv("BIF_WARM", "1")
    monkeypatch.setattr(sys, "platform", "darwin")  # Linux only
    assert not warm.enabled(["run", "cfg.yaml"])


def test_the_warm_process_waits_as_long_as_the_kept_cluster(tmp_path):
    """Without BIF_WARM_IDLE_TIMEOUT the warm process waits for the next command as long as the kept cluster of its
    Prefect home does (cluster.json: the last command's compute.keep_cluster_idle_s), so a scheduled command that
    keeps the cluster for its next run keeps its warm copy too. The real process, by its entry point; the cluster's
    record written as a command leaves it (here a 1 s wait, then 600 s)."""
    from bif.flows.kept_cluster import KeptClusterInfo, _write_info, cluster_dir

    state, record = warm.warm_dir(tmp_path), cluster_dir(tmp_path)
    record.mkdir(parents=True)

    def cluster_waits(seconds: float) -> None:
        _write_info(record, KeptClusterInfo(pid=os.getpid(), address="tcp://127.0.0.1:1", key="k",
                                            started_at=time.time(), idle_timeout_s=seconds))

    assert warm.idle_timeout(state, None) == warm.DEFAULT_IDLE_TIMEOUT_S  # no kept cluster yet
    cluster_waits(1.0)
    assert warm.idle_timeout(state, None) == 1.0 and warm.idle_timeout(state, 30.0) == 30.0  # the variable wins
    env = {k: v for k, v in _env(tmp_path).items() if k != "BIF_WARM_IDLE_TIMEOUT"}
    proc = subprocess.Popen([sys.executable, "-m", "bif.flows.warm", "serve", str(state)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while warm.status(tmp_path) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the warm process did not come up"
            time.sleep(0.1)
        ready = time.monotonic()
        assert warm.status(tmp_path)["idle_timeout_s"] == 1.0
        proc.wait(timeout=60)  # leaves after the cluster's 1 s (it looks once a second)
        assert time.monotonic() - ready >= 1.0
        cluster_waits(600.0)  # a longer wait keeps the next one
        proc = subprocess.Popen([sys.executable, "-m", "bif.flows.warm", "serve", str(state)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while warm.status(tmp_path) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the warm process did not come up"
            time.sleep(0.1)
        time.sleep(3.0)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=30)

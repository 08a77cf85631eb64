"""The kept local Prefect server (flows/prefect_server.py), driven as a user does: `bif server ...` and
`bif run` subprocesses with no PREFECT_API_URL.

One Prefect home for the module's server-lifecycle tests (its database is created once); they run in
order: a second command reuses the server (which holds none of the command's credentials); a killed
server (stale server.json) is detected and replaced, and the new one stops by itself when idle; two
commands started at once share one server; `bif server stop` stops it and frees its port. The last test checks
that a real `bif run` on the CLI tests' home (tests/conftest.py::linear_cli_run, shared with test_credentials.py)
reported to the kept server without replacing it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from bif.flows.prefect_server import server_dir

pytestmark = pytest.mark.e2e

BIF = str(Path(sys.executable).parent / "bif")
REPO = Path(__file__).resolve().parents[1]
MARKER = "aws-secret-that-the-kept-server-must-not-hold"


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    env["AWS_SECRET_ACCESS_KEY"] = MARKER  # the user's shell has credentials; the server must not keep them
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def bif(home: Path, *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    res = subprocess.run([BIF, *args], env=_env(home), capture_output=True, text=True, timeout=timeout)
    return res, time.perf_counter() - t0


def running(res: subprocess.CompletedProcess) -> tuple[int, str]:
    """(pid, url) from `bif server start|status` output."""
    m = re.search(r"(http://127\.0\.0\.1:\d+/api)\s+\(pid (\d+),", res.stdout)
    assert m, res.stdout + res.stderr
    return int(m.group(2)), m.group(1)


def servers_of(home: Path) -> list[psutil.Process]:
    """Live kept-server processes serving ``home`` (their working directory is its state folder)."""
    out = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = p.info.get("cmdline") or []
        if "bif.flows.prefect_server" in cmd and "serve" in cmd and p.info.get("cwd") == str(server_dir(home)):
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp("server-home")
    yield h
    subprocess.run([BIF, "server", "stop"], env=_env(h), capture_output=True, timeout=60)


def test_second_command_reuses_the_kept_server(home):
    status, _ = bif(home, "server", "status")
    assert status.returncode == 3 and "no local Prefect server" in status.stdout
    first, t_first = bif(home, "server", "start")  # boots it (and creates the database)
    assert first.returncode == 0, first.stderr
    pid, url = running(first)
    assert health(url)
    second, t_second = bif(home, "server", "start")
    assert second.returncode == 0, second.stderr
    assert running(second) == (pid, url)  # the same process: reused, not replaced
    assert t_second < t_first / 2, (t_first, t_second)
    assert [p.pid for p in servers_of(home)] == [pid]
    info = json.loads((server_dir(home) / "server.json").read_text())
    assert (info["pid"], info["url"], info["prefect_home"]) == (pid, url, str(home))
    # the kept server holds nothing of the environment of the command that started it
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert MARKER.encode() not in environ and b"AWS_SECRET_ACCESS_KEY" not in environ
    assert f"PREFECT_HOME={home}".encode() in environ.split(b"\0")


def test_a_killed_server_is_detected_and_replaced_and_an_idle_one_stops(home):
    old_pid, old_url = running(bif(home, "server", "status")[0])  # the first test's server
    os.killpg(old_pid, signal.SIGKILL)  # server.json now names a dead process
    deadline = time.monotonic() + 30
    while servers_of(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert json.loads((server_dir(home) / "server.json").read_text())["pid"] == old_pid  # stale record
    status, _ = bif(home, "server", "status")
    assert status.returncode == 3, status.stdout
    res, _ = bif(home, "server", "start", "--idle-timeout", "4")
    pid, url = running(res)
    # the last command asked the kept cluster to wait 8 s (compute.keep_cluster_idle_s): the server waits as long
    from bif.flows.kept_cluster import KeptClusterInfo, _write_info, cluster_dir

    cluster_dir(home).mkdir(parents=True, exist_ok=True)
    _write_info(cluster_dir(home), KeptClusterInfo(pid=os.getpid(), address="tcp://127.0.0.1:1", key="k",
                                                   started_at=time.time(), idle_timeout_s=8.0))
    assert pid != old_pid and health(url)
    last_request = time.monotonic()
    assert [p.pid for p in servers_of(home)] == [pid]
    time.sleep(max(0.0, last_request + 6.0 - time.monotonic()))
    assert [p.pid for p in servers_of(home)] == [pid]  # past its own 4 s, within the cluster's 8 s
    # with no API request for 8 s it stops by itself
    deadline = time.monotonic() + 60
    while servers_of(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not servers_of(home) and not health(url)
    (cluster_dir(home) / "cluster.json").unlink()


def test_two_commands_at_once_share_one_server(home):
    assert not servers_of(home)  # the idle one stopped itself
    env = _env(home)
    procs = [subprocess.Popen([BIF, "server", "start"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    found = {running(subprocess.CompletedProcess([], 0, out, err)) for out, err in outs}
    assert len(found) == 1, found  # both got the same server
    (pid, url), = found
    assert [p.pid for p in servers_of(home)] == [pid] and health(url)


def test_kept_server_settings_no_heartbeats_and_a_one_root_ca_file(home):
    """Prefect's flow-run heartbeat thread sleeps in 1 s steps and the flow joins it on exit (0-1 s added to every
    run). Its heartbeats feed zombie-run automations, which the kept server has none of: commands using it turn them
    off. Every Prefect client builds a verifying SSL context, for an http:// API too: on the kept server it loads a
    one-root file instead of certifi's bundle. A server of the user's (PREFECT_API_URL) keeps Prefect's defaults."""
    code = ("from bif.flows.prefect_server import prefect_api; from prefect.settings import get_current_settings; "
            "api = prefect_api(); ready = api.__enter__(); ready(); s = get_current_settings(); "
            "print(s.flows.heartbeat_frequency, s.api.ssl_cert_file); api.__exit__(None, None, None)")
    kept = subprocess.run([sys.executable, "-c", code], env=_env(home), capture_output=True, text=True, timeout=120)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    heartbeat, ca = kept.stdout.split()
    assert heartbeat == "None"
    # the plain-http kept server's clients load one root of certifi's bundle, not all of it (20 ms a client)
    import certifi

    assert Path(ca).parent == server_dir(home)
    one = Path(ca).read_text()
    assert one.count("BEGIN CERTIFICATE") == 1 and one in Path(certifi.where()).read_text()
    _, url = running(bif(home, "server", "status")[0])
    users = subprocess.run([sys.executable, "-c", code], env=_env(home) | {"PREFECT_API_URL": url},
                           capture_output=True, text=True, timeout=120)
    assert users.returncode == 0, users.stdout + users.stderr
    default = subprocess.run([sys.executable, "-c", "from prefect.settings import get_current_settings; "
                              "print(get_current_settings().api.ssl_cert_file)"],
                             env=_env(home) | {"PREFECT_API_URL": url}, capture_output=True, text=True, timeout=120)
    assert users.stdout.split() == ["180", default.stdout.strip()] and default.stdout.strip() != ca


def test_stop_ends_the_process_and_frees_the_port(home):
    pid, url = running(bif(home, "server", "status")[0])  # the one the two commands share
    port = int(url.split(":")[2].split("/")[0])
    res, _ = bif(home, "server", "stop")
    assert res.returncode == 0 and f"stopped: {url}" in res.stdout, res.stdout
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not health(url)
    with socket.socket() as s:  # nothing listens on the port any more (TIME_WAIT of old connections aside)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    assert not (server_dir(home) / "server.json").exists()
    status, _ = bif(home, "server", "status")
    assert status.returncode == 3
    again, _ = bif(home, "server", "stop")
    assert again.returncode == 0 and "no local Prefect server ran" in again.stdout


def test_a_starting_server_holds_its_port_from_the_first_moment(tmp_path):
    """The command binds the server's port and the server inherits the socket (prefect_server._bound_socket).
    Before, the command found a free port, closed it, and the server bound it seconds later, after its imports: a
    kept Dask cluster starting meanwhile took that port once (CI, 2026-12-05), and the command read a Dask
    handshake as the server's answer and exited 1. Here nothing else can bind the port while the server boots."""
    import errno

    from bif.flows.prefect_server import _claim_server, healthy, stop_server

    home = tmp_path / "home"
    info, wait = _claim_server(home=home, idle_timeout_s=60)
    assert wait is not None  # a new server, still importing
    bind_errors = []
    for reuse in (0, 1):  # what a Dask scheduler or worker binding a free port might get (tornado sets SO_REUSEADDR)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
            try:
                s.bind(("127.0.0.1", info.port))
                bind_errors.append(None)
            except OSError as err:
                bind_errors.append(err.errno)
    try:
        wait(180)  # (it also releases server.lock, which stop_server takes)
        assert bind_errors == [errno.EADDRINUSE, errno.EADDRINUSE]
        assert healthy(info.url) and [p.pid for p in servers_of(home)] == [info.pid]
    finally:
        stop_server(home)


def test_a_port_that_speaks_another_protocol_is_not_a_healthy_server():
    """healthy() is False, not an exception, when what answers on the port is not HTTP (a Dask comm sends its
    msgpack handshake first; the command once failed with http.client.BadStatusLine)."""
    import threading

    from bif.flows.prefect_server import healthy

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.sendall(b"\x00\x00\x00\x00\x00\x00\x00\x01*\x83\xabcompression\xc0\xa6python\n")
                time.sleep(0.5)

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        assert healthy(f"http://127.0.0.1:{port}/api") is False
        t.join(5)


def test_bif_run_reports_to_the_kept_server(linear_cli_run):
    """A real `bif run` on the CLI tests' home uses the server already kept there and leaves it running.

    The run is the session fixture ``linear_cli_run`` (tests/conftest.py: the linear example on S3,
    no PREFECT_API_URL), which test_credentials.py checks for leaks: one run of the command, both checks."""
    import s3fs

    run, before = linear_cli_run, linear_cli_run.server
    assert run.res.returncode == 0, run.res.stdout + run.res.stderr
    after = json.loads((server_dir(run.home) / "server.json").read_text())
    assert (after["pid"], after["url"]) == (before.pid, before.url)  # reused, still running
    assert health(before.url)
    # the flow run is in that server's database: the run's flow-run id is in the API
    fs = s3fs.S3FileSystem(**run.opts)
    manifest = json.loads(fs.cat_file(f"{run.bucket}/out/manifest.json"))
    assert manifest["status"] == "complete"
    req = urllib.request.Request(f"{before.url}/flow_runs/filter", data=json.dumps({"limit": 200}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        runs = json.loads(r.read())
    assert any(r["state_type"] == "COMPLETED" for r in runs)
    (log_path,) = fs.glob(f"{run.bucket}/out/logs/run-*.log")
    log = fs.cat_file(log_path).decode()
    flow_run_ids = {r["id"] for r in runs}
    assert "Beginning flow run" in log
    assert any(fid in log for fid in flow_run_ids) or any(r["name"] in log for r in runs)
    # the command ended its Dask workers when it was done (they ran in its working directory)
    left = [p for p in psutil.process_iter(["cwd", "status"])
            if p.info["cwd"] == str(run.workdir) and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]


def _sqlite(path: Path, query: str):
    import sqlite3

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def _api(url: str, path: str, body: dict) -> object:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_a_fresh_home_starts_from_the_kept_empty_database(tmp_path, monkeypatch):
    """The first server on a fresh home leaves its just-migrated, empty database in bif's cache; the next fresh home
    starts from a copy of it (seen by a mark put on the kept copy), and its server works on it. A database that
    holds a flow is never kept."""
    import sqlite3
    from importlib.metadata import version

    from bif.flows import prefect_server as ps

    cache = tmp_path / "cache"
    homes = [tmp_path / "home-a", tmp_path / "home-b"]

    def cmd(home: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([BIF, *args], env=_env(home) | {"BIF_CACHE_DIR": str(cache)}, capture_output=True,
                              text=True, timeout=240)

    try:
        first = cmd(homes[0], "server", "start")
        assert first.returncode == 0, first.stdout + first.stderr
        tpl = cache / "prefect-db" / f"prefect-{version('prefect')}.db"
        assert tpl.is_file()
        own = {r[0] for r in _sqlite(homes[0] / "prefect.db", "SELECT name FROM sqlite_master WHERE type='table'")}
        kept = {r[0] for r in _sqlite(tpl, "SELECT name FROM sqlite_master WHERE type='table'")}
        assert kept == own and {"alembic_version", "flow", "flow_run", "deployment"} <= kept
        assert _sqlite(tpl, "SELECT version_num FROM alembic_version") == \
            _sqlite(homes[0] / "prefect.db", "SELECT version_num FROM alembic_version")
        assert _sqlite(tpl, "SELECT count(*) FROM flow_run") == [(0,)]
        con = sqlite3.connect(tpl)  # a mark neither SQLite nor Prefect sets
        con.execute("PRAGMA user_version = 4242")
        con.commit()
        con.close()

        second = cmd(homes[1], "server", "start")
        assert second.returncode == 0, second.stdout + second.stderr
        assert _sqlite(homes[1] / "prefect.db", "PRAGMA user_version") == [(4242,)]  # started from the copy
        _, url = running(second)
        flow = _api(url, "/flows/", {"name": "seeded-home-check"})
        assert [f["id"] for f in _api(url, "/flows/filter", {})] == [flow["id"]]
        # that database now holds a flow: it is refused as a template, and the kept one stays as it was
        monkeypatch.setenv("BIF_CACHE_DIR", str(cache))
        assert not ps._keep_template(homes[1] / "prefect.db", version("prefect"))
        assert _sqlite(tpl, "PRAGMA user_version") == [(4242,)]
        assert _sqlite(tpl, "SELECT count(*) FROM flow") == [(0,)]
    finally:
        for home in homes:
            cmd(home, "server", "stop")

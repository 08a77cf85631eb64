"""Run against a Prefect API: the one in PREFECT_API_URL, or a local server kept between runs.

Prefect's temporary-server mode breaks with Dask worker processes (each worker starts
its own server against one SQLite file), so with no PREFECT_API_URL every flow path
(:func:`prefect_api`: ``bif run``, ``bif lds``, ``bif calibrate``, the operations
commands) uses one real local server on 127.0.0.1 and exports its URL (worker processes
inherit it). Booting that server costs 5-20 s, so it is **kept**: the first command starts
it in the background, detached, and the next commands reuse it (a health check, a few ms).

**State** lives in ``<PREFECT_HOME>/bif-server/`` (the server serves that home's
database, so one server per Prefect home): ``server.json`` (pid, port, API URL, Prefect
version, start time), ``server.lock`` (an ``flock`` held while a command checks, starts or
stops the server, so two commands started at once share one server) and ``server.log``.
A stale ``server.json`` (process gone, or not answering, or another Prefect version) is
detected under the lock and replaced by a new server.

**Isolation.** The server gets a scrubbed environment (PATH, HOME, locale, ``PREFECT_*``
and the quiet settings; no ``AWS_*`` or other variables of the command that started it)
and runs in its state folder, so a long-lived server holds nothing of one user command's
credentials or working directory. Credentials never reach Prefect anyway
(:mod:`bif.flows.runtime`). It stops by itself after ``idle_timeout_s`` without an API
request; a command keeps it alive while it runs (a health request every 30 s).
``bif server stop`` stops it; ``bif server status`` shows it.

**A fresh Prefect home** has no database, and Prefect's migrations take most of the first
start (5.5 of 11.4 s on the 2-core machine). The first server a machine boots on a fresh home
therefore leaves a copy of its just-migrated, still empty database in the cache
(``$BIF_CACHE_DIR``, else ``$XDG_CACHE_HOME/bif``, else ``~/.cache/bif``:
``prefect-db/prefect-<version>.db``), and the next fresh home of the same Prefect version
starts from that copy; Prefect still runs its migrations on it (a no-op at the head). Only
Prefect's default SQLite database is seeded (no ``PREFECT_*DATABASE*`` setting, no profiles
file in the home), only a copy that passes SQLite's ``quick_check`` is used, and a copy is
kept only while every table except the migration stamp and Prefect's built-in block types is
empty, so no flow, run, deployment, variable or block document ever reaches the cache.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from bif.locks import locked_file

#: Settings applied to every run: no telemetry, no DNS lookups to the outside.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}
#: A kept server stops after this long without an API request (a running command pings it).
DEFAULT_IDLE_TIMEOUT_S = 3600.0
#: How often a command using the server pings it (must stay well under any idle timeout).
KEEPALIVE_S = 30.0
#: Variables of the starting command that the kept server inherits (plus every PREFECT_*).
_SERVER_ENV_KEEP = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ",
                    "VIRTUAL_ENV", "PYTHONPATH")


def quiet_prefect_env() -> None:
    """Turn Prefect telemetry off for this process and its children."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


# ---------------------------------------------------------------- the kept local server


@dataclass(frozen=True)
class ServerInfo:
    """A kept local Prefect server, as recorded in ``server.json``."""

    pid: int
    port: int
    url: str  # the API URL, http://127.0.0.1:<port>/api
    prefect_version: str
    prefect_home: str
    started_at: float  # UNIX time
    idle_timeout_s: float


def prefect_home() -> Path:
    """The Prefect home this process uses: ``PREFECT_HOME``, else Prefect's default ``~/.prefect``."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def server_dir(home: Path | None = None) -> Path:
    """Where the kept server's state lives: ``<PREFECT_HOME>/bif-server``."""
    return (home or prefect_home()) / "bif-server"


def _prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """Hold ``server.lock`` (exclusive flock; released when the process dies, so never stale)."""
    with locked_file(state / "server.lock"):
        yield


def _read_info(state: Path) -> ServerInfo | None:
    try:
        return ServerInfo(**json.loads((state / "server.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def healthy(url: str, *, timeout: float = 2.0) -> bool:
    """True when the Prefect API at ``url`` answers its health check; False for anything else, including a
    process on that port that speaks another protocol (a Dask comm's handshake is not an HTTP status line)."""
    import http.client

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:  # noqa: S310 - 127.0.0.1 only
            return resp.status == 200
    except (OSError, ValueError, http.client.HTTPException):
        return False


def _is_our_server(pid: int, port: int) -> bool:
    """The process ``pid`` is alive and is a kept server serving ``port`` (not a recycled pid)."""
    import psutil

    try:
        cmd = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return "bif.flows.prefect_server" in cmd and str(port) in cmd


def server_status(home: Path | None = None) -> ServerInfo | None:
    """The kept server of this Prefect home if it runs and answers, else None (no lock taken)."""
    info = _read_info(server_dir(home))
    if info is None or not _is_our_server(info.pid, info.port) or not healthy(info.url):
        return None
    return info


def api_available_now(home: Path | None = None) -> bool:
    """Whether :func:`prefect_api` would start nothing: PREFECT_API_URL is set, or the kept server answers."""
    return bool(os.environ.get("PREFECT_API_URL")) or server_status(home) is not None


def _bound_socket() -> socket.socket:
    """A TCP socket bound to a free port of 127.0.0.1, for the server to inherit and listen on.

    The server binds nothing itself: a port found free here and closed again stayed free only until something
    else took it, and the server imports for seconds before it binds. A kept Dask cluster starting at the same
    time binds its scheduler, nannies and workers to free ports too, and once took that very port: the command
    then read a Dask handshake as the server's answer and failed (CI, 2026-12-05). The socket listens from here
    on, so no other socket can bind the port (a bound socket that does not listen can share it with another
    that sets SO_REUSEADDR); a health check meanwhile waits in its backlog until the server accepts. SO_REUSEADDR
    as uvicorn sets it when it binds: the connections of a stopped server in TIME_WAIT do not keep the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(2048)  # uvicorn's default backlog
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def _server_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k in _SERVER_ENV_KEEP or (k.startswith("PREFECT_") and k != "PREFECT_API_URL")}
    return env | QUIET_ENV | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                              "PREFECT__SERVER_FINAL": "1", "PREFECT_HOME": str(home)}


def _terminate(pid: int, *, timeout: float = 10.0) -> None:
    """Stop process group ``pid`` (SIGTERM, then SIGKILL after ``timeout`` s) and wait until it is gone."""
    import psutil

    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                proc = psutil.Process(pid)
                proc.wait(timeout=0.2)  # reaps it when it is our child
                return
            except psutil.NoSuchProcess:
                return
            except psutil.TimeoutExpired:
                # not our child (its parent exited): once it has exited it is a zombie until init reaps it
                with contextlib.suppress(psutil.Error):
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        return


#: Tables a kept template database may hold rows in: the migration stamp and Prefect's block type registry.
_TEMPLATE_TABLES = frozenset({"alembic_version", "block_type", "block_schema", "block_schema_reference"})


def cache_dir() -> Path:
    """bif's per-machine cache: ``$BIF_CACHE_DIR``, else ``$XDG_CACHE_HOME/bif``, else ``~/.cache/bif``."""
    root = os.environ.get("BIF_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "bif"


def database_template(version: str) -> Path:
    """Where the empty, migrated database of Prefect ``version`` is kept for fresh Prefect homes."""
    return cache_dir() / "prefect-db" / f"prefect-{version}.db"


def _default_database(home: Path) -> Path | None:
    """``<home>/prefect.db`` when the server will use Prefect's default SQLite file there, else None (a
    ``PREFECT_*DATABASE*`` setting or a profiles file may point it elsewhere: then nothing is seeded or kept)."""
    if any("DATABASE" in k for k in os.environ if k.startswith("PREFECT_")) or os.environ.get("PREFECT_PROFILES_PATH") \
            or (home / "profiles.toml").exists():
        return None
    return home / "prefect.db"


def _template_problem(conn: "sqlite3.Connection") -> str | None:
    """Why the database open on ``conn`` is no template (damaged, not migrated, holds data), or None."""
    check = conn.execute("PRAGMA quick_check").fetchone()
    if not check or check[0] != "ok":
        return f"quick_check: {check[0] if check else 'no answer'}"
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    if "alembic_version" not in tables or conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0] != 1:
        return "no migration stamp"
    full = [t for t in tables if t not in _TEMPLATE_TABLES and not t.startswith("sqlite_")
            and conn.execute(f'SELECT 1 FROM "{t}" LIMIT 1').fetchone() is not None]
    return f"rows in {', '.join(sorted(full))}" if full else None


def _seed_database(db: Path, version: str) -> bool:
    """Copy the kept template to ``db``, a fresh home's default database (:func:`_default_database`) that does not
    exist yet; True when it did."""
    import sqlite3

    tpl = database_template(version)
    if any(db.with_name(db.name + x).exists() for x in ("", "-wal", "-journal")) or not tpl.is_file():
        return False
    tmp = db.with_name(f"{db.name}.seed-{os.getpid()}")
    try:
        shutil.copyfile(tpl, tmp)
        try:
            conn = sqlite3.connect(f"file:{tmp}?mode=ro&immutable=1", uri=True)  # no -wal or -shm files beside it
            try:
                problem = _template_problem(conn)
            finally:
                conn.close()
        except sqlite3.Error as err:  # not a database at all
            problem = f"{type(err).__name__}: {err}"
        if problem is not None:  # damaged or altered since it was kept: never use it again
            tpl.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
            return False
        tmp.replace(db)
    except (OSError, sqlite3.Error):
        tmp.unlink(missing_ok=True)
        return False
    return True


def _keep_template(db: Path, version: str) -> bool:
    """Best effort: keep a consistent copy of the just-migrated database ``db`` as the template of ``version``
    (SQLite's online backup, so the running server's WAL is included); True when it did. Never raises."""
    import sqlite3

    tpl = database_template(version)
    tmp = tpl.with_name(f"{tpl.name}.{os.getpid()}.tmp")
    try:
        tpl.parent.mkdir(parents=True, exist_ok=True)
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
            problem = _template_problem(dst)
        finally:
            src.close()
            dst.close()
        if problem is None:
            tmp.replace(tpl)
            return True
    except (OSError, sqlite3.Error):
        pass
    tmp.unlink(missing_ok=True)
    return False


def ensure_server(*, home: Path | None = None, timeout: float = 90.0,
                  idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> ServerInfo:
    """The kept local server of Prefect home ``home`` (default :func:`prefect_home`): reused when it answers, else started (and recorded).

    Safe when several commands call it at once: they serialize on ``server.lock`` and the
    first starts the server, the others find it running. A recorded server that is gone, does
    not answer, or runs another Prefect version is replaced. Raises RuntimeError naming the
    server log when a new server does not answer within ``timeout`` seconds.
    """
    info, wait = _claim_server(home=home, idle_timeout_s=idle_timeout_s)
    if wait is not None:
        wait(timeout)
    return info


def _claim_server(*, home: Path | None, idle_timeout_s: float) -> tuple[ServerInfo, Callable[[float], None] | None]:
    """Take ``server.lock``; return the running server and None, or a just-spawned one and ``wait(timeout)``.

    ``wait`` (callable from another thread) blocks until the new server answers, records it in
    ``server.json`` and releases the lock; until then other commands wait on the lock, never
    seeing a half-started server. Spawning takes milliseconds, so the URL is known at once.
    """
    home = Path(home or prefect_home())
    state = server_dir(home)
    version = _prefect_version()
    lock = contextlib.ExitStack()
    lock.enter_context(_locked(state))
    try:
        info = _read_info(state)
        if info is not None:
            ours = _is_our_server(info.pid, info.port)
            if ours and info.prefect_version == version and healthy(info.url):
                lock.close()
                return info, None
            if ours:  # hung, or another Prefect version: replace it
                _terminate(info.pid)
            (state / "server.json").unlink(missing_ok=True)
        db = _default_database(home)
        fresh = db is not None and not db.exists()  # its first start: Prefect creates the database
        seeded = fresh and _seed_database(db, version)
        with _bound_socket() as sock, open(state / "server.log", "ab") as log:
            port = sock.getsockname()[1]
            proc = subprocess.Popen(
                [sys.executable, "-m", "bif.flows.prefect_server", "serve", "--port", str(port),
                 "--idle-timeout", str(idle_timeout_s), "--fd", str(sock.fileno())],
                cwd=state, env=_server_env(home), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # its own session: survives this command and its Ctrl-C
                pass_fds=(sock.fileno(),))  # the server's copy holds the port; this one closes here
    except BaseException:
        lock.close()
        raise
    info = ServerInfo(pid=proc.pid, port=port, url=f"http://127.0.0.1:{port}/api", prefect_version=version,
                      prefect_home=str(home), started_at=time.time(), idle_timeout_s=idle_timeout_s)

    def wait(timeout: float) -> None:
        with lock:
            deadline = time.monotonic() + timeout
            while not healthy(info.url, timeout=1.0):
                if proc.poll() is not None or time.monotonic() > deadline:
                    _terminate(proc.pid)
                    tail = (state / "server.log").read_text(errors="replace")[-2000:]
                    seed_note = ""
                    if seeded:  # the home was fresh: drop the copied database and its template, so a rerun
                        # starts the way Prefect does by itself
                        for suffix in ("", "-wal", "-shm", "-journal"):
                            db.with_name(db.name + suffix).unlink(missing_ok=True)
                        database_template(version).unlink(missing_ok=True)
                        seed_note = (f" It had started from the kept empty database {database_template(version)}; "
                                     "that copy is removed, and the next command creates the database anew.")
                    raise RuntimeError(f"the local Prefect server did not start on port {port} "
                                       f"(see {state / 'server.log'}).{seed_note}\n{tail}")
                time.sleep(0.1)
            if fresh and not seeded:  # migrated and still empty (nothing used it yet: we hold the lock)
                _keep_template(db, version)
            tmp = state / f"server.json.{os.getpid()}"
            tmp.write_text(json.dumps(asdict(info)))
            tmp.replace(state / "server.json")

    return info, wait


def stop_server(home: Path | None = None) -> ServerInfo | None:
    """Stop the kept server of this Prefect home (waits until its process is gone); returns what ran."""
    state = server_dir(home)
    if not state.exists():
        return None
    with _locked(state):
        info = _read_info(state)
        if info is None:
            return None
        if _is_our_server(info.pid, info.port):
            _terminate(info.pid)
        else:
            info = None  # stale record: nothing ran
        (state / "server.json").unlink(missing_ok=True)
        return info


def _keepalive(url: str, stop: threading.Event) -> None:
    while not stop.wait(KEEPALIVE_S):
        healthy(url)


@contextlib.contextmanager
def prefect_api(*, startup_timeout: int | None = None) -> Iterator[Callable[[], str]]:
    """Provide a Prefect API: the one in PREFECT_API_URL, or the kept local server (:func:`ensure_server`).

    Yields ``ready()``, which blocks until the API answers and returns its URL. A kept server
    that answers is found in milliseconds; a new one boots in a background thread from entry
    on, with its URL already exported, so the caller can start the Dask cluster (whose
    workers inherit PREFECT_API_URL) meanwhile. On exit, Prefect's log and event workers are
    drained; the server is kept for the next command. ``startup_timeout`` (seconds a new server
    may take to answer): default ``BIF_SERVER_START_TIMEOUT`` or 90 (raise it on a loaded machine).
    """
    quiet_prefect_env()
    if startup_timeout is None:
        startup_timeout = int(float(os.environ.get("BIF_SERVER_START_TIMEOUT", "90")))
    url = os.environ.get("PREFECT_API_URL")
    if url:
        try:
            yield lambda: url
        finally:
            drain_prefect_workers()
        return
    info, wait = _claim_server(home=None, idle_timeout_s=DEFAULT_IDLE_TIMEOUT_S)
    errors: list[BaseException] = []
    thread = None
    if wait is not None:
        def boot() -> None:
            try:
                wait(startup_timeout)
            except BaseException as err:  # noqa: BLE001 - re-raised by ready()
                errors.append(err)

        thread = threading.Thread(target=boot, name="prefect-server-boot", daemon=True)
        thread.start()

    def ready() -> str:
        if thread is not None:
            thread.join()
        if errors:
            raise RuntimeError(f"the local Prefect server did not start: {errors[0]}") from errors[0]
        return info.url

    stop = threading.Event()
    threading.Thread(target=_keepalive, args=(info.url, stop), name="prefect-server-keepalive", daemon=True).start()
    os.environ["PREFECT_API_URL"] = info.url
    try:
        from prefect.settings import (PREFECT_API_SSL_CERT_FILE, PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
                                      temporary_settings)

        # No flow-run heartbeats on the kept server: they feed zombie-run automations, which a server this
        # command started has none of (a dead run is found by its output lease). Prefect's heartbeat thread
        # sleeps in 1 s steps and the flow joins it on exit: 0-1 s (0.5 s on average) added to every run.
        updates = {PREFECT_API_URL: info.url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
        ca = _plain_http_ca_file(info.url)
        if ca is not None:
            updates[PREFECT_API_SSL_CERT_FILE] = ca
        # the settings travel with every task to the Dask workers (Prefect serializes them into its context)
        with temporary_settings(updates=updates):
            try:
                yield ready
            finally:
                drain_prefect_workers()
    finally:
        stop.set()
        os.environ.pop("PREFECT_API_URL", None)
        if thread is not None:
            thread.join()


def _plain_http_ca_file(url: str) -> str | None:
    """A CA file of one certifi root, for the Prefect clients of the kept server (plain http on this host), else None.

    Prefect builds a verifying SSL context for every client it creates, also for an http:// API that never uses
    it, loading a whole CA bundle each time (certifi's, or SSL_CERT_FILE's): 20 ms, and each task run on a Dask
    worker creates two clients. One root of certifi's bundle loads in 0.2 ms; the context is never used for a
    connection. Written once in the server's state folder."""
    if not url.startswith("http://"):
        return None
    path = server_dir() / "http-api-ca.pem"
    if not path.exists():
        try:
            import re

            import certifi

            first = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?",
                              Path(certifi.where()).read_text(encoding="ascii"), re.S)
            if first is None:
                return None
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(first.group(0), encoding="ascii")
            os.replace(tmp, path)
        except OSError:
            return None
    return str(path)


def drain_prefect_workers() -> None:
    """Flush Prefect's background log and event workers (else exit hangs ~80 s)."""
    if "prefect" not in sys.modules:
        return  # nothing of Prefect ran in this process
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=10)


# ---------------------------------------------------------------- the server process itself


def idle_limit(home: Path, idle_timeout_s: float) -> float:
    """Seconds the kept server of ``home`` waits without a request: its own ``idle_timeout_s``, or longer while the
    last command asked the kept cluster of ``home`` to wait longer (``compute.keep_cluster_idle_s``, in its
    ``cluster.json``), so that a command scheduled less often than hourly finds the server with the cluster."""
    from bif.flows.kept_cluster import requested_wait

    wait = requested_wait(home)
    return idle_timeout_s if wait is None else max(idle_timeout_s, wait)


def _serve(port: int, idle_timeout_s: float, fd: int | None = None) -> None:
    """Serve Prefect's API on 127.0.0.1:``port`` until SIGTERM or ``idle_timeout_s`` without a request (longer while
    the kept cluster waits longer: :func:`idle_limit`).

    ``fd``: the socket the starting command bound to ``port`` (:func:`_bound_socket`); without it, bind here."""
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app()
    last = [time.monotonic()]
    home = Path.cwd().parent  # it runs in <PREFECT_HOME>/bif-server

    async def tracked(scope, receive, send):  # ASGI: note each request's time
        if scope["type"] != "lifespan":
            last[0] = time.monotonic()
        await app(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(tracked, host="127.0.0.1", port=port, log_level="error",
                                           lifespan="on"))

    def watchdog() -> None:
        while not server.should_exit:
            time.sleep(min(30.0, max(0.5, idle_timeout_s / 10)))
            if not server.started:  # booting (database migrations): not idle yet
                last[0] = time.monotonic()
            elif time.monotonic() - last[0] > idle_limit(home, idle_timeout_s) or not home.exists():
                # idle, or its Prefect home (a temporary one) was deleted: nobody can find it any more
                server.should_exit = True  # uvicorn's graceful shutdown

    threading.Thread(target=watchdog, name="idle-watchdog", daemon=True).start()
    server.run(sockets=None if fd is None else [socket.socket(fileno=fd)])


if __name__ == "__main__":  # python -m bif.flows.prefect_server serve --port N --idle-timeout S [--fd FD]
    import argparse

    ap = argparse.ArgumentParser(description="The kept local Prefect server (started by ensure_server).")
    ap.add_argument("mode", choices=["serve"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S)
    ap.add_argument("--fd", type=int, default=None, help="a socket bound to --port, inherited from the command")
    a = ap.parse_args()
    _serve(a.port, a.idle_timeout, a.fd)

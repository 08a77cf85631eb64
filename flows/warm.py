"""A warm ``bif`` process kept between commands: ``bif run`` without paying for its imports.

``bif run`` spends about 1.2 s of one core, before its first step, importing Prefect, distributed and
the flow's modules. With the kept Prefect server and the kept Dask cluster running, that is most of
its start-up. The first ``bif run`` therefore also starts, detached, a warm process that has
imported them (after quieting the terminal exactly as ``bif run`` does). The next ``bif run`` with
the same set-up asks it for a copy of itself: the warm process forks, the copy takes the command's
working directory, environment, ``sys.path``, arguments and terminal (its standard output and
error, passed over a Unix socket), and runs the very same ``bif.flows.cli.main`` the command
would have run. The command only relays: signals (Ctrl-C) go to the copy, and the command exits
with the copy's exit status. Nothing is run by a different code path: a copy is ``bif run`` with
its imports done. ``bif backfill``, ``bif watch``, ``bif lds`` and ``bif calibrate`` run as copies the same way
(:data:`COMMANDS`); a sweep that finds every checkpoint done starts no server and no cluster, and is then mostly
its imports.

**Same set-up** means the same key (:func:`request_key`): interpreter, ``sys.path``, working
directory, the whole environment (as the kept cluster compares it, :mod:`bif.flows.kept_cluster`),
Prefect's profiles file, and the size and modification time of every source file of bif. Any
difference, ``-v`` (the terminal is configured before Prefect loads), another command than
those of :data:`COMMANDS`, a warm process that does not answer at once, or a busy fork (a thread in the warm
process) and the command runs as before, in itself; a warm process for its set-up is then started
for the next one. The copy's standard input is ``/dev/null`` (these commands read nothing).

Linux only. Off with ``BIF_WARM=0``, and wherever the kept cluster is off (``BIF_KEEP_CLUSTER=0``, a
``compute.address``); the test suite turns it off except in its own tests. **State** in
``<PREFECT_HOME>/bif-warm/``: ``warm.json`` (pid, socket, key hash, start time), the socket,
``warm.log``. It stops after ``idle_timeout_s`` without a command (``BIF_WARM_IDLE_TIMEOUT`` when set, else as
long as the kept cluster waits: ``compute.keep_cluster_idle_s`` of the last command, default 10 minutes), when
another set-up's warm process replaces it in ``warm.json`` (once its copies have ended), when its
state folder is deleted, or with ``bif server stop``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: ``BIF_WARM=0`` (or false/no/off): every command imports what it needs itself.
WARM_ENV = "BIF_WARM"
#: A warm process stops after this long without a command.
DEFAULT_IDLE_TIMEOUT_S = 600.0
#: Commands a warm copy runs: ``bif run``, whose imports are most of its start-up, the sweeps (``bif backfill``,
#: ``bif watch``: a scheduled watch that finds nothing new is little more than its imports), and ``bif lds`` and
#: ``bif calibrate`` (their flows' modules, Prefect and distributed: ``bif lds`` on a running cluster took
#: 4.7 s in itself).
COMMANDS = ("run", "backfill", "watch", "lds", "calibrate")
#: Seconds a command waits for the warm process to answer before it runs in itself.
ANSWER_TIMEOUT_S = 2.0
_REPLY_TIMEOUT_S = 30.0
_PROTOCOL = 1
_PATH_ENV = "BIF_WARM_SYS_PATH"


def with_working_directory(path: Sequence[str]) -> list[str]:
    """``path`` (a ``sys.path``) with the working directory at its end when it is not on it already: the ``sys.path``
    of the `bif` command (flows/cli.py) and of the processes it starts, which get it from the command (this module's
    warm process, the kept cluster's): ``problem: my_module:build`` finds a ``my_module.py`` beside the user, and a
    file there never takes the place of a module found before (a ``yaml.py`` beside the config stopped the kept
    cluster from starting: its ``python -m`` put the working directory first). They start with ``python -P``, so
    that nothing is imported before they take the command's ``sys.path``."""
    try:
        cwd = os.getcwd()
    except OSError:  # the directory was deleted under the shell: nothing to import from
        return list(path)
    return [*path] if any(os.path.abspath(p or os.curdir) == cwd for p in path) else [*path, cwd]


#: True in a warm copy: it runs the command itself, never asks a warm process.
_IS_COPY = False


def enabled(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (without the program name) may run in a warm copy: a command of :data:`COMMANDS`, no
    ``-v``, and neither ``BIF_WARM`` nor ``BIF_KEEP_CLUSTER`` off."""
    from bif.flows.kept_cluster import KEEP_ENV

    def off(name: str) -> bool:
        return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")

    # Linux only: fork() of a process that loaded numpy, pandas and Prefect is what Linux does well (macOS warns
    # against fork without exec), and the descriptors travel with SCM_RIGHTS
    return (sys.platform.startswith("linux") and bool(argv) and argv[0] in COMMANDS
            and not {"-v", "--verbose"} & set(argv) and not off(WARM_ENV) and not off(KEEP_ENV))


def warm_dir(home: Path | None = None) -> Path:
    from bif.flows.prefect_server import prefect_home

    return (home or prefect_home()) / "bif-warm"


def key_parts(env: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of each part of the set-up a warm process serves (see the module docstring)."""
    from bif.flows.kept_cluster import _VOLATILE_ENV, _code_stamp, stable_env
    from bif.flows.prefect_server import QUIET_ENV, prefect_home

    # the environment as `bif run` makes it before anything reads it (quiet_prefect_env's defaults): `make demo`
    # exports two of them, a shell does not, and both commands run the same
    env = QUIET_ENV | dict(os.environ if env is None else env)
    profiles = prefect_home() / "profiles.toml"
    try:
        st = profiles.stat()
        prof = [st.st_size, st.st_mtime_ns]
    except OSError:
        prof = None
    parts = {"protocol": _PROTOCOL, "python": [sys.executable, sys.version], "path": list(sys.path),
             "cwd": os.getcwd(), "env": stable_env(env, _VOLATILE_ENV),
             "profiles": prof, "code": _code_stamp()}
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for k, v in parts.items()}


def request_key(env: dict[str, str] | None = None, *, parts: dict[str, str] | None = None) -> str:
    """The set-up a warm process serves, as one hash of :func:`key_parts` (``parts``: computed already)."""
    return hashlib.sha256(json.dumps(parts or key_parts(env), sort_keys=True).encode()).hexdigest()


def _read_info(state: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((state / "warm.json").read_text())
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Running: an exited process whose parent is gone stays a zombie until init reaps it."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, ValueError, IndexError):
        pass  # no /proc: ask the kernel
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# ------------------------------------------------------------------------------------------- the command's side
def run_in_warm_copy(argv: Sequence[str]) -> int | None:
    """Run ``bif <argv>`` in a warm copy and return its exit status, or None when this command must run in
    itself (no warm process for this set-up, or it did not take the command); then one is started for the next."""
    if _IS_COPY or not enabled(argv):
        return None
    try:
        parts = key_parts()
        key = request_key(parts=parts)
        state = warm_dir()
        info = _read_info(state)
        if info is None or info.get("key") != hashlib.sha256(key.encode()).hexdigest() or not _alive(info["pid"]):
            if info is not None and _alive(info.get("pid", -1)):
                changed = sorted(k for k, v in parts.items() if (info.get("parts") or {}).get(k) != v)
                _log(state, f"a command with another set-up ({', '.join(changed) or 'unknown'}) runs in itself; "
                            "starting a warm process for it")
            _start_in_background(state, key)
            return None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(ANSWER_TIMEOUT_S)
        conn.connect(info["socket"])
        header = json.dumps({"key": key, "argv": [sys.argv[0], *argv], "env": dict(os.environ), "cwd": os.getcwd(),
                             "path": list(sys.path),
                             "sigint": signal.getsignal(signal.SIGINT) is not signal.SIG_IGN}).encode()
        with open(os.devnull, "rb") as null:
            socket.send_fds(conn, [len(header).to_bytes(8, "big")], [null.fileno(), 1, 2])
        conn.sendall(header)
        # the request is out: a copy may start any moment, so wait long for the answer (the fork takes milliseconds;
        # running here as well after a late answer would start the run twice, which the output's lease refuses)
        conn.settimeout(_REPLY_TIMEOUT_S)
        reply = _read_line(conn)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not reply.get("ok"):
        return None
    return _relay(conn, int(reply["pid"]))


def _relay(conn: socket.socket, pid: int) -> int:
    """Forward this command's signals to the copy ``pid`` until the warm process sends its exit status."""
    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(OSError):
            os.kill(pid, signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # what this command ignores, its copy would have ignored
            signal.signal(sig, forward)
    conn.settimeout(None)
    try:
        status = _read_line(conn)
    except (OSError, ValueError):
        status = {}
    if "exit" not in status:
        print(f"bif: the warm process (pid {pid}'s parent) ended before the run; its result is in the run's "
              "manifest.json", file=sys.stderr)
        return 1
    return int(status["exit"])


def _log(state: Path, line: str) -> None:
    with contextlib.suppress(OSError), open(state / "warm.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def _read_line(conn: socket.socket) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            raise ValueError("connection closed")
        buf += chunk
    return json.loads(buf)


def _start_in_background(state: Path, key: str) -> None:
    """Start a warm process for this set-up (detached), unless one is starting; never waits for it."""
    import fcntl
    import subprocess

    state.mkdir(parents=True, exist_ok=True)
    lock = open(state / "start.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return  # another command is starting one
    try:
        with open(state / "warm.log", "ab") as log:
            # this command's sys.path goes along (``python -m`` would start with another sys.path[0])
            env = dict(os.environ) | {_PATH_ENV: json.dumps(sys.path)}
            subprocess.Popen([sys.executable, "-P", "-m", "bif.flows.warm", "serve", str(state), str(lock.fileno())],
                             cwd=os.getcwd(), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, pass_fds=(lock.fileno(),))
    finally:
        lock.close()  # the warm process holds the lock (its copy of the descriptor) until it listens


# ------------------------------------------------------------------------------------------- the warm process
def _preload() -> None:
    """What ``bif run`` imports on its way to the first step and after it, and the sweeps' and the LDS and
    calibration commands' modules (not torch: only ``bif calibrate`` imports it, in the copy), quieted as ``bif run``
    quiets them."""
    from bif.flows.runtime import configure_terminal

    configure_terminal(verbose=False)  # before Prefect loads, as bif run does
    from bif.flows.prefect_server import quiet_prefect_env

    quiet_prefect_env()
    import importlib

    for name in ("bif.flows.cli", "bif.config", "bif.flows.prefect_server", "bif.flows.kept_cluster",
                 "bif.flows.runtime", "prefect", "prefect.flows", "prefect.tasks", "prefect.context",
                 "prefect.client.orchestration", "prefect.artifacts", "prefect_dask", "distributed",
                 "bif.flows.attribution", "bif.tasks.pipeline", "bif.tasks.steps", "bif.flows.progress",
                 "fastapi.encoders", "pandas", "pyarrow.parquet", "bif.quality.diagnostics", "bif.tasks.covariance",
                 "bif.quality.run", "bif.report", "bif.flows.cli_ops", "bif.flows.backfill", "bif.store.catalog",
                 "rich.progress", "rich.table", "bif.flows.cli_lds", "bif.flows.lds", "bif.flows.calibrate",
                 "bif.evaluation.store", "bif.evaluation.scoring", "bottleneck"):
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    with contextlib.suppress(Exception):  # the settings' dump that every task submission sends (runtime)
        from prefect.context import SettingsContext

        from bif.flows.runtime import serialize_settings_once

        serialize_settings_once()
        SettingsContext.get().serialize()


def idle_timeout(state: Path, fixed: float | None) -> float:
    """Seconds the warm process of ``state`` waits for the next command: ``fixed`` (``BIF_WARM_IDLE_TIMEOUT``) when
    set, else the wait of the kept cluster of its Prefect home (``cluster.json``: the last command's
    ``compute.keep_cluster_idle_s``), else :data:`DEFAULT_IDLE_TIMEOUT_S`. A scheduled command that keeps the cluster
    for its next run keeps its warm process too; before, the warm process left after 10 minutes whatever the cluster
    did, and such a run started in itself."""
    if fixed is not None:
        return fixed
    from bif.flows.kept_cluster import requested_wait

    wait = requested_wait(state.parent)
    return DEFAULT_IDLE_TIMEOUT_S if wait is None else wait


def serve(state: Path, lock_fd: int | None = None, idle_timeout_s: float | None = None) -> None:
    """The warm process: preload, listen on a socket in ``state``, fork a copy per command. ``lock_fd``: the
    starting command's ``start.lock``, held until this process listens. ``idle_timeout_s``: see
    :func:`idle_timeout` (None: the kept cluster's)."""
    import select
    import threading

    path_json = os.environ.pop(_PATH_ENV, None)
    if path_json:
        sys.path[:] = json.loads(path_json)
    parts = key_parts()
    key = request_key(parts=parts)
    _preload()
    state.mkdir(parents=True, exist_ok=True)
    path = state / f"warm-{os.getpid()}.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)  # the socket is this user's only (connecting to it needs write permission)
    try:
        listener.bind(str(path))
    finally:
        os.umask(umask)
    listener.listen(16)
    me = {"pid": os.getpid(), "socket": str(path), "key": hashlib.sha256(key.encode()).hexdigest(),
          "parts": parts, "started_at": time.time(),
          "idle_timeout_s": idle_timeout(state, idle_timeout_s)}
    tmp = state / f"warm.json.{os.getpid()}"
    tmp.write_text(json.dumps(me))
    os.replace(tmp, state / "warm.json")
    if lock_fd is not None:
        with contextlib.suppress(OSError):
            os.close(lock_fd)
    print(f"warm process {os.getpid()} ready after {time.process_time():.1f} s of CPU", flush=True)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stopping: list[int] = []  # SIGTERM (bif server stop): take no more commands, leave once the copies ended
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    children: dict[int, socket.socket] = {}
    last = time.monotonic()
    try:
        while True:
            if stopping and not children:
                break
            ready, _, _ = select.select([wake_r] if stopping else [listener, wake_r], [], [], 1.0)
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
            _reap(children)
            if children:
                last = time.monotonic()
            if listener in ready:
                conn, _ = listener.accept()
                last = time.monotonic()
                with contextlib.suppress(Exception):
                    _take(conn, key, children, listener, (wake_r, wake_w), threading.active_count())
                continue
            current = _read_info(state)
            replaced = current is None or current.get("pid") != os.getpid()
            if not children and (replaced or time.monotonic() - last > idle_timeout(state, idle_timeout_s)):
                break
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        listener.close()


def _reap(children: dict[int, socket.socket]) -> None:
    """Send each ended copy's exit status to its command."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        print(f"copy {pid} ended: exit {code if code >= 0 else 128 - code}", flush=True)
        with contextlib.suppress(OSError):
            conn.sendall((json.dumps({"exit": code if code >= 0 else 128 - code}) + "\n").encode())
        conn.close()


def _take(conn: socket.socket, key: str, children: dict[int, socket.socket], listener: socket.socket,
          wake: tuple[int, int], threads: int) -> None:
    """Read one command's request; fork a copy that runs it, or refuse (the command then runs in itself)."""
    conn.settimeout(ANSWER_TIMEOUT_S)
    msg, fds, _, _ = socket.recv_fds(conn, 8, 3)
    try:
        size = int.from_bytes(msg, "big")
        raw = b""
        while len(raw) < size:
            chunk = conn.recv(size - len(raw))
            if not chunk:
                raise ValueError("request cut short")
            raw += chunk
        req = json.loads(raw)
        ok = req.get("key") == key and len(fds) == 3 and threads == 1  # fork only a process of one thread
        if not ok:
            print(f"refused a command: {'another set-up' if req.get('key') != key else 'not one thread'}", flush=True)
            conn.sendall(b'{"ok": false}\n')
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            _copy(conn, fds, req, listener, wake)  # never returns
        conn.sendall((json.dumps({"ok": True, "pid": pid}) + "\n").encode())
        children[pid] = conn
        print(f"copy {pid} runs `bif {' '.join(req['argv'][1:2])}` in {req['cwd']}", flush=True)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _copy(conn: socket.socket, fds: list[int], req: dict[str, Any], listener: socket.socket,
          wake: tuple[int, int]) -> None:
    """In the forked copy: become the command (descriptors, directory, environment, path, argv) and run it."""
    import io
    import threading

    global _IS_COPY
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler if req.get("sigint", True) else signal.SIG_IGN)
        listener.close()
        for fd in wake:
            os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding=sys.stdin.encoding)
        unbuffered = bool(req["env"].get("PYTHONUNBUFFERED"))  # as the interpreter sets up its streams
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=sys.stdout.encoding,
                                      errors=sys.stdout.errors, line_buffering=os.isatty(1), write_through=unbuffered)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=sys.stderr.encoding,
                                      errors="backslashreplace", line_buffering=True, write_through=unbuffered)
        sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.path[:] = req["path"]
        sys.argv = list(req["argv"])
        numpy = sys.modules.get("numpy")
        if numpy is not None:  # a fresh process seeds numpy's global generator from the OS; a fork shares the warm
            numpy.random.seed()  # process's state (Python's own `random` reseeds itself after a fork)

        def watch() -> None:  # the command is gone (killed): stop as the command itself would have been stopped
            with contextlib.suppress(OSError):
                conn.settimeout(None)
                while conn.recv(1):
                    pass
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="bif-warm-command", daemon=True).start()
        _IS_COPY = True
        from bif.flows.cli import main

        code = main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - the command's own handler prints its errors; this is a last resort
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        # the interpreter's exit without unwinding the warm process's frames below (its loop, its socket): the exit
        # handlers (logging, Prefect's), the streams, then the exit status, which the warm process sends on
        import atexit

        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def status(home: Path | None = None) -> dict[str, Any] | None:
    """The warm process of this Prefect home (``warm.json``) when it runs, else None."""
    info = _read_info(warm_dir(home))
    return info if info is not None and _alive(info.get("pid", -1)) else None


def stop(home: Path | None = None) -> dict[str, Any] | None:
    """Stop the warm process of this Prefect home; returns what ran. Copies still running run to their end
    (the warm process takes no more commands and leaves after them)."""
    state = warm_dir(home)
    info = _read_info(state)
    (state / "warm.json").unlink(missing_ok=True)  # a warm process without its entry leaves when idle
    if info is None or not _alive(info.get("pid", -1)):
        return None
    with contextlib.suppress(OSError):
        os.kill(info["pid"], signal.SIGTERM)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "serve":
        fixed = os.environ.get("BIF_WARM_IDLE_TIMEOUT")
        serve(Path(args[1]), int(args[2]) if len(args) > 2 else None, float(fixed) if fixed else None)
        return 0
    print("usage: python -m bif.flows.warm serve STATE_DIR [LOCK_FD]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    # run as bif.flows.warm, not __main__: a copy's `bif` code imports bif.flows.warm, which must be this module
    from bif.flows.warm import main as _main

    sys.exit(_main())

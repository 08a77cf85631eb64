"""A local Dask cluster kept between commands, like the kept Prefect server (:mod:`bif.flows.prefect_server`).

A command that starts its own LocalCluster pays for it on every run: a forkserver that
imports torch, Prefect, distributed, xarray and arviz-stats (seconds of a core, see
:func:`bif.flows.runtime._use_forkserver`), then the workers. With ``compute.keep_cluster``
(the default; ``BIF_KEEP_CLUSTER=0`` turns it off) the first ``bif run`` / ``bif lds`` /
``bif calibrate`` starts the cluster in a detached process, and the next command with the same
set-up reuses it.

**What makes two commands "the same set-up"** is a fingerprint (:func:`fingerprint`) of
everything a worker inherits or has imported: the Python interpreter, the working directory
(relative paths resolve there), the whole environment (credentials in ``AWS_*`` variables, the
Prefect API URL, thread settings), the worker count, threads and GPUs, and the size and
modification time of every source file of bif itself. Any
difference starts a new cluster and stops the old one. What the forkserver and the workers import ahead (the
command's preload modules: bif's flows, bif's example problem factories) is not part of it: a cluster whose imports
include a command's serves it, so ``bif run``, ``bif lds`` and ``bif calibrate`` on one config share one cluster
(each of them replaced it before: the README's sequence of commands paid a cold start at every switch); a command
that needs a module the cluster lacks replaces it with one that imports both (:func:`_missing_modules`), so
switching back costs nothing. A user's own problem module is never
imported by the kept processes: **every command gets fresh workers** (forked afresh from the
forkserver), so a worker never holds a module, a problem or memory from an earlier run. The
cluster's own process restarts them as soon as a command has released them, and marks them
fresh (``fresh.json``); the next command then uses them as they are, and restarts them itself
(0.15-0.46 s on its way to the first step) only when they are not marked fresh. While they sit
marked fresh and unused, the cluster's process looks at them once a minute (:data:`IDLE_CHECK_S`).

**One command at a time.** A command holds ``use.lock`` (an ``flock``) while it uses the
cluster; a second command started meanwhile finds it taken and starts a cluster of its own,
as without this module. When no command holds the lock but a worker still runs a task (its
command was killed: Dask releases its tasks, but a running one goes on in its worker's thread), the cluster
restarts its workers, so an orphaned chain stops writing.

**State** lives in ``<PREFECT_HOME>/bif-cluster/``: ``cluster.json`` (pid, scheduler address,
fingerprint, start time), ``state.lock``, ``use.lock`` and ``cluster.log``. The environment is
kept in the cluster's processes only, never written anywhere; ``cluster.json`` holds a hash.
The cluster stops by itself after ``idle_timeout_s`` (``compute.keep_cluster_idle_s``, default 10 minutes; each
command sets it for the wait after itself) without a command,
when its Prefect home is deleted, or with ``bif server stop``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, IO

from bif.locks import locked_file

#: The keys of a spec that name what the cluster imports ahead (Dask's worker preloads; the forkserver's extra
#: imports): not part of the fingerprint (see :func:`_missing_modules`).
MODULE_KEYS = ("preload", "warm_modules")
#: ``BIF_KEEP_CLUSTER=0`` (or false/no/off): every command starts and stops its own LocalCluster.
KEEP_ENV = "BIF_KEEP_CLUSTER"
#: The starting command's ``sys.path`` (:func:`bif.flows.warm.with_working_directory`), for the serve process.
PATH_ENV = "BIF_KEPT_SYS_PATH"
#: A kept cluster stops after this long without a command using it.
DEFAULT_IDLE_TIMEOUT_S = 600.0
#: Seconds a new kept cluster may take to come up before the command starts its own instead.
START_TIMEOUT_S = 120.0
#: Seconds a command waits for the kept cluster's restarted workers before it replaces the cluster.
RESTART_TIMEOUT_ENV = "BIF_KEPT_RESTART_TIMEOUT"
#: Its default: 60 restarts of an idle cluster took 0.15-0.46 s; workers that did not come back (4 commands
#: in about 40 on 2026-12-01, none in the next 90) never came back, so 30 s was only a longer stall. Their cause,
#: found on 2026-12-03: LocalCluster had closed their nannies (bif.flows.runtime.LOST_WORKER_TIMEOUT, now off).
RESTART_TIMEOUT_S = 10.0
#: How long a restart waits past ``BIF_KEPT_RESTART_TIMEOUT`` for workers that are still starting (forked, alive,
#: not yet registered); the longest a new cluster may take to come up. Load slows a restart: 0.15-0.46 s idle,
#: 1.0-1.4 s beside 10 busy processes on the 2-core machine (and 3.3 s once). A slow start is waited for, not
#: mistaken for a hung forkserver; before, a command also counted the workers registered at that moment (none, after
#: the cluster's own restart had given up) instead of the cluster's, and replaced it at once.
RESTART_START_CAP_S = START_TIMEOUT_S
#: Written (under ``state.lock``) by the cluster's process when it restarted workers that no command holds; the
#: next command consumes it and skips its own restart. Holds the writer's pid: a replaced cluster's mark is stale.
FRESH_FILE = "fresh.json"
#: While its workers are marked fresh and no command has held the cluster since its last look, the cluster's
#: process looks at its workers (a call to each: is a task running, are they all there) this often instead of
#: every second. Every second, those calls kept an idle 2-worker cluster at 3.5-3.7% of a core on the 2-core CI
#: machine (its own process 2.2-2.3%, each worker 0.6-0.7%) for the 10 minutes it waits for the next command;
#: 2.4-2.5% (1.4-1.5% and 0.5%: heartbeats and housekeeping) with this. Three 30 s windows each, 2026-12-02.
IDLE_CHECK_S = 60.0
#: Imported by the kept cluster's own process ahead of the first command (:func:`_import_for_scheduler`): what its
#: scheduler imported to unpickle a `bif run`'s task graphs (Prefect's task engine and bif's flow, steps, stores,
#: covariance, gates and diagnostics, with pandas, dask.bag and zarr: the scheduler's modules after a run, less those
#: before), and the modules of `bif lds`'s and `bif calibrate`'s tasks. Not torch: those flow modules import what
#: needs torch in their functions, and their task arguments are classes of modules without it (tests/test_cli.py
#: checks the scheduler after both commands).
SCHEDULER_IMPORTS = ("prefect.task_engine", "bif.flows.attribution", "bif.flows.cli", "bif.tasks.covariance",
                     "bif.quality.run", "bif.quality.diagnostics", "zarr", "bif.flows.lds", "bif.flows.calibrate")
#: Variables that differ between two shells of one user without changing what a worker does, and those
#: that libraries set in the command when they load (torch and scikit-learn's OpenMP settings: whether
#: they are set yet depends on how far the command's imports got when the cluster is claimed).
_VOLATILE_ENV = ("_", "OLDPWD", "PWD", "SHLVL", "COLUMNS", "LINES", "PYTEST_CURRENT_TEST", "BIF_CLIENT_ENV_KEYS",
                 RESTART_TIMEOUT_ENV, "BIF_WARM",  # whether the command ran in a warm copy (bif.flows.warm)
                 "KMP_INIT_AT_FORK", "KMP_DUPLICATE_LIB_OK",
                 # what make sets for a recipe (`make demo` and a plain `bif run` share one cluster)
                 "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES", "MAKE_TERMOUT", "MAKE_TERMERR")
#: The cluster's fingerprint also leaves out `-v` or not (bif.flows.runtime.configure_terminal): in a kept cluster
#: it only sets how much the workers write to cluster.log, never to the command's terminal, and toggling it
#: replaced the cluster (10.6-13 s instead of 2-3.7 s for the next command). The warm process
#: (bif.flows.warm) keeps them in its fingerprint: a command runs in its copy and writes to the user's terminal.
_CLUSTER_VOLATILE_ENV = (*_VOLATILE_ENV, "BIF_QUIET_TERMINAL", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL")


def _library_default_env() -> dict[str, str]:
    """Variables a library sets in the command's own environment, to its default, when one of its modules loads.

    torch sets ``TORCHINDUCTOR_CACHE_DIR`` when ``torch._dynamo`` loads (``torch._dynamo.package`` calls
    ``torch._inductor.runtime.cache_dir_utils.cache_dir()``), and transformers loads it: a `bif run` of a language
    model that ran in itself had it at the cluster's claim; the same command as a warm copy, which gets the shell's
    environment, had not, and replaced the cluster (15-19 s instead of 0.2 s, on the tinylm example, 2026-12-04).
    Equal to this default it says nothing about the set-up; another value (the user's) still counts.
    """
    import getpass
    import re
    import tempfile

    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}"
    return {"TORCHINDUCTOR_CACHE_DIR": os.path.join(tempfile.gettempdir(),
                                                    "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))}


def stable_env(env: dict[str, str], volatile: tuple[str, ...]) -> list[tuple[str, str]]:
    """``env``'s (name, value) pairs that name a set-up: without ``volatile`` and :func:`_library_default_env`."""
    defaults = _library_default_env()
    return sorted((k, v) for k, v in env.items() if k not in volatile and defaults.get(k) != v)


@dataclass(frozen=True)
class KeptClusterInfo:
    pid: int
    address: str
    key: str
    started_at: float
    idle_timeout_s: float
    parts: dict[str, str] | None = None
    #: what its forkserver and workers import ahead: the spec's :data:`MODULE_KEYS` (None: written by an older bif)
    modules: dict[str, list[str]] | None = None


def enabled(compute: Any) -> bool:
    """Whether a command should use a kept cluster for ``compute`` (no address to join, not switched off)."""
    if compute.address or not getattr(compute, "keep_cluster", True):
        return False
    return os.environ.get(KEEP_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cluster_dir(home: Path | None = None) -> Path:
    """``<PREFECT_HOME>/bif-cluster``: beside the kept Prefect server's state."""
    from bif.flows.prefect_server import prefect_home

    return Path(home or prefect_home()) / "bif-cluster"


def _code_stamp() -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every Python file of bif's packages: an edit or an upgrade changes it."""
    import bif
    import bif.flows
    import bif.tasks

    out = []
    for pkg in (bif, bif.flows, bif.tasks):
        for root in pkg.__path__:
            for path in sorted(Path(root).rglob("*.py")):
                with contextlib.suppress(OSError):
                    st = path.stat()
                    out.append((str(path), st.st_size, st.st_mtime_ns))
    return out


def fingerprint_parts(spec: dict[str, Any]) -> dict[str, str]:
    """sha256 of each part of the set-up: ``spec`` (compute and worker count; not its :data:`MODULE_KEYS`, see
    :func:`_missing_modules`), interpreter, working directory, environment, bif's source files (see the module
    docstring). ``cluster.json`` keeps them, so a replaced cluster can say which part changed (in ``cluster.log``)."""
    env = stable_env(dict(os.environ), _CLUSTER_VOLATILE_ENV)
    parts = {"spec": {k: v for k, v in spec.items() if k not in MODULE_KEYS}, "python": [sys.executable, sys.version],
             "cwd": os.getcwd(), "env": env, "code": _code_stamp()}
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for k, v in parts.items()}


def fingerprint(spec: dict[str, Any]) -> str:
    """One hash of :func:`fingerprint_parts`: two commands with the same one share a kept cluster."""
    return _key(fingerprint_parts(spec))


def _missing_modules(info: KeptClusterInfo, spec: dict[str, Any]) -> list[str]:
    """The modules of ``spec`` (its :data:`MODULE_KEYS`) that the kept cluster ``info`` does not import ahead.

    A worker imports what its task needs anyway, so such a cluster would still be correct; but a module missing
    from the forkserver is imported again in every fresh worker of every command (bif.lm's transformers: seconds
    each), so the command replaces the cluster with one that imports both (:func:`_with_modules`)."""
    have = info.modules or {}
    return [m for k in MODULE_KEYS for m in spec.get(k, []) if m not in have.get(k, [])]


def _with_modules(spec: dict[str, Any], info: KeptClusterInfo) -> dict[str, Any]:
    """``spec`` with the modules of the kept cluster ``info`` added ahead of its own: the replacement keeps
    serving the commands the old cluster served."""
    have = info.modules or {}
    return {**spec, **{k: list(dict.fromkeys([*have.get(k, []), *spec.get(k, [])])) for k in MODULE_KEYS}}


def _key(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _read_info(state: Path) -> KeptClusterInfo | None:
    try:
        return KeptClusterInfo(**json.loads((state / "cluster.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _is_ours(pid: int) -> bool:
    import psutil

    try:
        return "bif.flows.kept_cluster" in psutil.Process(pid).cmdline()
    except psutil.Error:
        return False


def _answers(address: str, timeout: float = 5.0) -> bool:
    from distributed import Client

    try:
        with Client(address, timeout=timeout, set_as_default=False):
            return True
    except Exception:  # noqa: BLE001
        return False


def status(home: Path | None = None) -> KeptClusterInfo | None:
    """The kept cluster of this Prefect home when its process runs, else None."""
    info = _read_info(cluster_dir(home))
    return info if info is not None and _is_ours(info.pid) else None


def stop(home: Path | None = None) -> KeptClusterInfo | None:
    """Stop the kept cluster of this Prefect home (its whole process group); returns what ran."""
    from bif.flows.prefect_server import _terminate

    state = cluster_dir(home)
    if not state.exists():
        return None
    with locked_file(state / "state.lock"):
        info = _read_info(state)
        if info is not None and _is_ours(info.pid):
            _terminate(info.pid)
        else:
            info = None
        (state / "cluster.json").unlink(missing_ok=True)
        return info


def _try_lock(path: Path, attempts: int = 5) -> IO[str] | None:
    """An exclusive flock on ``path`` (a few tries over ~0.25 s), or None when another process holds it."""
    import fcntl

    fh = open(path, "a+")  # noqa: SIM115 - held until released by the caller
    for i in range(attempts):
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except OSError:
            time.sleep(0.05 * (i + 1))
    fh.close()
    return None


@contextlib.contextmanager
def use_kept_cluster(spec: dict[str, Any], *, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
                     start_timeout_s: float = START_TIMEOUT_S) -> Iterator[tuple[KeptClusterInfo, bool] | None]:
    """Yield (the kept cluster for ``spec``, whether it was running already), with its workers fresh; None
    when it cannot be had (another command uses it, or it did not start: the caller starts its own).

    ``spec``: {"compute": ComputeConfig data, "num_tasks": int, "preload": [...], "warm_modules": [...]}.
    """
    state = cluster_dir()
    state.mkdir(parents=True, exist_ok=True)
    use = _try_lock(state / "use.lock")
    if use is None:
        yield None  # another command is using it
        return
    try:
        claimed = _claim(state, spec, idle_timeout_s, start_timeout_s)
    except Exception as err:  # noqa: BLE001 - the kept cluster is an optimisation: the command starts its own
        import traceback

        with open(state / "cluster.log", "a") as log:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} a command could not use the kept cluster:", file=log)
            traceback.print_exc(file=log)
        print(f"note: the kept Dask cluster could not be used ({type(err).__name__}: {err}; see "
              f"{state / 'cluster.log'}); this command starts its own", file=sys.stderr)
        claimed = None
    try:
        yield claimed
    finally:
        use.close()  # releases the flock


def _claim(state: Path, spec: dict[str, Any], idle_timeout_s: float,
           start_timeout_s: float) -> tuple[KeptClusterInfo, bool] | None:
    """The kept cluster for ``spec`` (started, or replaced, when needed) with fresh workers, and whether it ran."""
    parts = fingerprint_parts(spec)  # once: it stats every source file of bif
    key = _key(parts)
    with locked_file(state / "state.lock"):
        info = _read_info(state)
        same = info is not None and info.key == key and _is_ours(info.pid) and _answers(info.address)
        missing = _missing_modules(info, spec) if same else None  # None: another set-up, or not running
        reused = missing == []
        fresh = _take_fresh(state, info.pid if reused else None)  # consumed either way: this command uses them
        if not reused:
            if missing:
                why, spec = f"it does not import {', '.join(missing)}", _with_modules(spec, info)
            else:
                changed = [k for k in parts if info is not None and (info.parts or {}).get(k) != parts[k]]
                why = f"changed {', '.join(changed or ['not answering'])}"
            info = _replace(state, info, why, spec, parts, idle_timeout_s, start_timeout_s)
        elif info.idle_timeout_s != idle_timeout_s:
            info = _set_idle_timeout(state, info, idle_timeout_s)
    if info is None:
        return None
    if reused and not fresh:
        try:
            _restart_workers(info.address, _spec_workers(spec), info.pid)
        except Exception as err:  # noqa: BLE001 - workers that do not come back: a new cluster, not a slow command
            with locked_file(state / "state.lock"):
                why = (f"its workers did not come back ({type(err).__name__}: {err}); its processes: "
                       f"{_process_states(info.pid)}")
                info = _replace(state, info, why, _with_modules(spec, info), parts, idle_timeout_s, start_timeout_s)
            return None if info is None else (info, False)
    return info, reused


def requested_wait(home: Path) -> float | None:
    """The wait the last command that used the kept cluster of the Prefect home ``home`` asked for after itself
    (``compute.keep_cluster_idle_s``, in ``cluster.json``), or None when no command has used one. The warm process
    (:func:`bif.flows.warm.idle_timeout`) and the kept Prefect server (:func:`bif.flows.prefect_server.idle_limit`)
    wait as long, so a scheduled command finds the whole stack."""
    info = _read_info(cluster_dir(home))
    return None if info is None else info.idle_timeout_s


def _write_info(state: Path, info: KeptClusterInfo) -> None:
    """Write ``cluster.json`` at once (a reader never sees half of it)."""
    tmp = state / f"cluster.json.{os.getpid()}"
    tmp.write_text(json.dumps(asdict(info)))
    tmp.replace(state / "cluster.json")


def _set_idle_timeout(state: Path, info: KeptClusterInfo, idle_timeout_s: float) -> KeptClusterInfo:
    """The running cluster ``info`` waits ``idle_timeout_s`` after this command (its process reads ``cluster.json``
    every second). Each command sets the wait after itself, so a scheduled command keeps the cluster for its next run
    (``compute.keep_cluster_idle_s``); the timeout is not part of the set-up, and changing it replaces nothing. The
    caller holds ``state.lock`` (nobody else writes the file while the cluster runs)."""
    updated = replace(info, idle_timeout_s=float(idle_timeout_s))
    _write_info(state, updated)
    return updated


def _replace(state: Path, info: KeptClusterInfo | None, why: str, spec: dict[str, Any], parts: dict[str, str],
             idle_timeout_s: float, start_timeout_s: float) -> KeptClusterInfo | None:
    """Stop the kept cluster ``info`` when it is ours and running (logging ``why``), then start a new one.
    The caller holds ``state.lock``."""
    from bif.flows.prefect_server import _terminate

    if info is not None and _is_ours(info.pid):
        with open(state / "cluster.log", "a") as log:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} replacing the kept cluster (pid {info.pid}): {why}", file=log)
        _terminate(info.pid)
    (state / "cluster.json").unlink(missing_ok=True)
    return _start(state, spec, parts, idle_timeout_s, start_timeout_s)


def _start(state: Path, spec: dict[str, Any], parts: dict[str, str], idle_timeout_s: float,
           timeout: float) -> KeptClusterInfo | None:
    """Start the serve process and wait for its ``cluster.json``; None (process stopped) when it does not come up."""
    import subprocess

    from bif.flows.prefect_server import _terminate

    (state / "spec.json").write_text(json.dumps({"spec": spec, "key": _key(parts), "idle_timeout_s": idle_timeout_s,
                                                 "parts": parts}))
    with open(state / "cluster.log", "ab") as log:
        from bif.flows.warm import with_working_directory

        # -P and the command's sys.path: the working directory last, where `python -m` put it first
        env = dict(os.environ) | {PATH_ENV: json.dumps(with_working_directory(sys.path))}
        proc = subprocess.Popen([sys.executable, "-P", "-m", "bif.flows.kept_cluster", "serve", str(state)],
                                env=env, cwd=os.getcwd(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)  # survives this command and its Ctrl-C
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _read_info(state)
        if info is not None and info.pid == proc.pid:
            return info
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    _terminate(proc.pid)
    print(f"note: the kept Dask cluster did not start (see {state / 'cluster.log'}); "
          "this command starts its own", file=sys.stderr)
    return None


def _spec_workers(spec: dict[str, Any]) -> int:
    """How many workers the kept cluster of ``spec`` runs (its process starts them with
    :func:`bif.flows.runtime.dask_cluster`)."""
    from bif.flows.runtime import worker_count

    return worker_count(spec["compute"].get("n_workers"), spec["num_tasks"])


def _restart_workers(address: str, workers: int, pid: int) -> None:
    """Fresh worker processes (forked from the kept forkserver): no module, problem or memory of an earlier run.

    ``workers``: how many the cluster runs (not how many are registered now: after a restart of the cluster's own
    that gave up, none may be yet); ``pid``: the cluster's process. Raises when they are not back (see
    :func:`_restart`): the caller then replaces the cluster.
    """
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        _restart(client, workers, pid)


def _restart(client: Any, workers: int, pid: int) -> None:
    """Restart the workers of ``client``'s cluster (process ``pid``) and wait for ``workers`` of them.

    The old workers must stop within ``BIF_KEPT_RESTART_TIMEOUT`` seconds (default 10). The new ones must register
    within it too, unless worker processes are still starting (:func:`_starting_workers`): then up to
    :data:`RESTART_START_CAP_S`. A hung forkserver (no worker can be forked, or an old one's exit is never
    reported) still fails after the timeout; a loaded machine's slow start does not replace the cluster."""
    timeout = float(os.environ.get(RESTART_TIMEOUT_ENV, str(RESTART_TIMEOUT_S)))
    client.restart(timeout=timeout, wait_for_workers=False)
    start = time.monotonic()
    while True:
        have = len(client.scheduler_info()["workers"])
        if have >= workers:
            return
        waited = time.monotonic() - start
        if waited >= RESTART_START_CAP_S or (waited >= timeout and _starting_workers(pid) <= have):
            raise TimeoutError(f"{have} of {workers} workers came back within {waited:.1f} s")
        time.sleep(0.1)


def _helper(cmd: str, parent: int, pid: int) -> str | None:
    """Which multiprocessing helper of the kept cluster ``pid`` a descendant with command line ``cmd`` and parent
    ``parent`` is ("forkserver", "resource tracker"), or None (a worker, or a process of one)."""
    if parent != pid:
        return None
    return "forkserver" if "forkserver" in cmd else "resource tracker" if "resource_tracker" in cmd else None


def _starting_workers(pid: int) -> int:
    """Worker processes of the kept cluster ``pid`` that run or can still start: its descendants but its
    multiprocessing helpers (the resource tracker, the forkserver), neither stopped nor exited, and none at all
    when its forkserver is stopped (nothing can be forked). Registered workers are among them."""
    import psutil

    gone = {psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, psutil.STATUS_TRACING_STOP}
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return 0
    count = 0
    for p in procs:
        try:
            cmd, status, parent = " ".join(p.cmdline()), p.status(), p.ppid()
        except psutil.Error:
            continue  # exited meanwhile
        helper = _helper(cmd, parent, pid)
        if helper == "forkserver" and status in gone:
            return 0
        count += helper is None and status not in gone
    return count


def _take_fresh(state: Path, pid: int | None) -> bool:
    """Whether the cluster process ``pid`` marked its workers fresh since a command last used them; removes the
    mark (the caller, holding ``state.lock``, is about to use them)."""
    path = state / FRESH_FILE
    try:
        mark = json.loads(path.read_text())
    except (OSError, ValueError):
        mark = None
    path.unlink(missing_ok=True)
    return pid is not None and isinstance(mark, dict) and mark.get("pid") == pid


def _refresh_idle_workers(state: Path, client: Any, workers: int) -> None:
    """When no command holds the cluster: restart its workers unless they are marked fresh and none runs a task,
    then mark them fresh (:data:`FRESH_FILE`).

    Runs under ``state.lock``: a command that takes ``use.lock`` meanwhile waits in :func:`_claim` until the
    restart is done, then finds the mark. A task still running here belongs to a command that is gone (killed:
    Dask released its tasks, but a running one goes on in its worker's thread, a chain for minutes, writing to
    its output); only a restart stops it. Workers that do not come back leave no mark: the next command
    restarts them itself and replaces the cluster when they still do not come back.
    """
    with locked_file(state / "state.lock"):
        use = _try_lock(state / "use.lock", attempts=1)
        if use is None:
            return  # a command is using the cluster
        use.close()
        marked = (state / FRESH_FILE).exists()
        running = any(client.run(_executing_count).values())
        if marked and not running and len(client.scheduler_info()["workers"]) == workers:
            return
        (state / FRESH_FILE).unlink(missing_ok=True)
        if running:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} no command holds the cluster but tasks run: "
                  "restarting the workers", file=sys.stderr, flush=True)
        _restart(client, workers, os.getpid())
        tmp = state / f"{FRESH_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps({"pid": os.getpid(), "at": time.time()}))
        tmp.replace(state / FRESH_FILE)


def _process_states(pid: int) -> str:
    """The kept cluster's processes (forkserver, workers, ...) as the kernel sees them: pid, state, wait channel,
    threads. For ``cluster.log`` when workers did not come back from a restart (seen rarely, never reproduced on
    demand), so that the next occurrence says what they were doing."""
    try:
        import psutil

        procs = psutil.Process(pid).children(recursive=True)
    except Exception as err:  # noqa: BLE001 - best effort
        return f"unknown ({type(err).__name__})"
    out = []
    for p in procs:
        try:
            kind = "forkserver" if _helper(" ".join(p.cmdline()), p.ppid(), pid) == "forkserver" else "process"
            wchan = Path(f"/proc/{p.pid}/wchan").read_text().strip() if Path(f"/proc/{p.pid}/wchan").exists() else ""
            out.append(f"{kind} {p.pid} (parent {p.ppid()}) {p.status()} wchan={wchan or '-'} threads={p.num_threads()}")
        except Exception:  # noqa: BLE001 - it may have exited meanwhile
            continue
    return "; ".join(out) or "none"


# ---------------------------------------------------------------- the kept cluster process itself


def _executing_count(dask_worker: Any) -> int:
    """Tasks running in ``dask_worker``'s threads, released (cancelled) and seceded ones included (a task under
    ``worker_client``, like the quality gates, secedes), for ``Client.run``."""
    return len(dask_worker.state.all_running_tasks)



def _serve(state: Path) -> None:
    """Run the LocalCluster of ``state/spec.json`` until idle, replaced, stopped or its home is gone."""
    from bif.config import ComputeConfig
    from bif.flows import runtime

    cfg = json.loads((state / "spec.json").read_text())
    spec, idle_timeout_s = cfg["spec"], float(cfg["idle_timeout_s"])
    compute = ComputeConfig(**spec["compute"])
    # the forkserver's imports (torch, Prefect, the checks' modules: ~11 s of a core) are the longest part of a cold
    # start: begin them now, beside this process's own imports of distributed and the scheduler's start
    runtime.start_forkserver(compute, preload=tuple(spec["preload"]), warm_modules=tuple(spec["warm_modules"]))
    _import_for_scheduler()
    from distributed import Client
    with runtime.dask_cluster(compute, num_tasks=spec["num_tasks"], preload=tuple(spec["preload"]),
                              warm_modules=tuple(spec["warm_modules"])) as cluster, \
            Client(cluster.address, set_as_default=False) as client:
        info = KeptClusterInfo(pid=os.getpid(), address=cluster.address, key=cfg["key"], started_at=time.time(),
                               idle_timeout_s=idle_timeout_s, parts=cfg.get("parts"),
                               modules={k: list(spec.get(k, [])) for k in MODULE_KEYS})
        _write_info(state, info)
        workers = _spec_workers(spec)
        last_used, checked = time.monotonic(), -math.inf  # checked: the last look at the workers (none yet)
        while True:
            time.sleep(1.0)
            current = _read_info(state)
            if current is None or current.pid != os.getpid() or not state.parent.exists():
                return  # stopped, replaced, or its Prefect home was deleted
            free = _try_lock(state / "use.lock", attempts=1)
            if free is None:
                last_used = time.monotonic()
                continue
            free.close()
            marked = (state / FRESH_FILE).exists()
            if _idle_check_due(marked=marked, used=last_used > checked, since_check_s=time.monotonic() - checked):
                checked = time.monotonic()
                try:
                    _refresh_idle_workers(state, client, workers)
                except Exception as err:  # noqa: BLE001 - a failed restart leaves the cluster as it is
                    print(f"restarting the workers failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            if time.monotonic() - last_used > current.idle_timeout_s:  # the last command's (_set_idle_timeout)
                return


def _import_for_scheduler() -> None:
    """Import what the scheduler, which runs in this process, needs to unpickle a `bif run`'s tasks, while the
    forkserver imports its own.

    Dask's scheduler unpickles every task graph a command sends, so the first `bif run` on a new kept cluster had it
    import Prefect's task engine and bif's flow, task and check modules while the run's tasks waited: its prepare
    stage took 1.5-1.7 s and its covariance 0.8-1.1 s, against 0.3-0.4 s and 0.5-0.7 s on a cluster the run found
    started (the scheduler's process was busy for 1 s before the first task reached a worker). Here they load while
    the forkserver is busy with its own imports (seconds), in which this process only waits. Measured on the 2-core
    machine, each run on a new kept cluster, interleaved: logistic 14.6 -> 13.6 s median (5 pairs), digits 18.6 ->
    17.4 s (3 pairs); start-up unchanged. Errors are left to the unpickling, which meets and reports them.
    """
    import importlib

    for name in SCHEDULER_IMPORTS:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def _idle_check_due(*, marked: bool, used: bool, since_check_s: float) -> bool:
    """Whether the idle cluster's process should look at its workers now (:func:`_refresh_idle_workers`).

    ``marked``: the fresh mark exists; ``used``: a command held ``use.lock`` since the last look;
    ``since_check_s``: seconds since it. A command consumes the mark when it claims the workers, so a
    missing mark also catches a command that came and went between two polls (or was killed: its task
    may still run). With the mark in place and no command since, nothing of bif's has touched the
    workers: look every :data:`IDLE_CHECK_S` seconds only (a worker that died meanwhile).
    """
    return used or not marked or since_check_s >= IDLE_CHECK_S


if __name__ == "__main__":  # python -P -m bif.flows.kept_cluster serve STATE_DIR
    if PATH_ENV in os.environ:  # before the cluster's imports, which its forkserver and workers inherit
        sys.path[:] = json.loads(os.environ.pop(PATH_ENV))
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        _serve(Path(sys.argv[2]))
    else:
        sys.exit("usage: python -m bif.flows.kept_cluster serve STATE_DIR (started by bif commands)")

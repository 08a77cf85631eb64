"""The runtime every flow shares: the Dask cluster, the credentials policy, quiet logs and the run log file.

Built once here, used by the attribution, LDS and calibration flows (and the operations
flows to come), so the three cannot drift apart again.

**Cluster.** :func:`dask_cluster` joins ``compute.address``, or starts a ``LocalCluster``:
worker processes, one BLAS/OpenMP/numba thread per worker thread (idle OpenMP threads
sleep), Dask's
``MALLOC_TRIM_THRESHOLD_`` dropped (it slowed torch SGLD steps by ~33%) and glibc told to keep
freed memory for reuse (:func:`tune_malloc`), a ``GPU``
resource per worker with ``compute.gpus``, heavy imports preloaded, quiet logging.

**Runtime inside the flow.** Every flow builds its runtime in its own body with
``with runtime.on_dask(cfg.compute, num_tasks=..., address=scheduler_address) as rt:`` and
sends its Dask-bound tasks with ``rt.submit(task, ...)`` (prefect-dask's ``DaskTaskRunner``
on that cluster). A flow run from a deployment (no ``scheduler_address``) therefore runs
on Dask like the CLI's; the CLI only pre-starts the cluster, to overlap its start-up with
the Prefect server's and to follow progress, and passes its address.

**Credentials policy.** Credentials are never Prefect flow parameters: Prefect stores
parameters in its database and API, and its ``SecretDict`` is stored in clear. A flow
receives ``credentials_ref`` (an opaque key) and, optionally, ``secret_block`` (the *name*
of a Prefect Secret block), and :func:`resolve_storage_options` finds the options, first
match wins:

(a) the process-local registry, filled by :func:`call_flow` when the CLI / Python API
    started the flow in this process;
(b) the Prefect Secret block ``secret_block`` (a JSON object of fsspec options), for
    deployed flows;
(c) nothing: ``{}``, so s3fs uses the ambient credentials (``AWS_*`` variables, profiles,
    instance roles).

Tasks may receive the resolved options inside their arguments: they travel pickled over
Dask, and Prefect does not persist task arguments when the task has ``cache_policy=NO_CACHE``
(every task that takes credentials must have it).

**Logs.** By default the terminal shows progress bars and the closing summary only;
``verbose=True`` shows Prefect's and Dask's INFO logs. Either way :func:`call_flow` writes
every log line of the flow run, including the task-run logs sent from Dask workers, to
``<output>/logs/<name>-<UTC time>.log``, fetched from the Prefect API after the run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: Modules every worker imports while the cluster boots, not in its first task.
DEFAULT_PRELOAD = ("bif.flows.runtime", "bif.tasks.pipeline", "bif.tasks.steps")
#: Set in worker processes (and this one) when logs should stay off the terminal.
_QUIET_ENV = "BIF_QUIET_TERMINAL"
#: Set in forked workers: the names of the client's environment variables (see :func:`dask_setup`).
_ENV_KEYS = "BIF_CLIENT_ENV_KEYS"
_NOISY_LOGGERS = ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.core",
                  "distributed.worker", "distributed.http.proxy", "distributed.diskutils",
                  "great_expectations", "prefect.task_runner.dask", "prefect.server", "prefect")

_CREDENTIALS: dict[str, dict[str, Any]] = {}
_VERBOSE = False


# ---------------------------------------------------------------- terminal and logging


def _quiet_teardown_noise() -> None:
    """distributed logs a closed batched stream at teardown with its traceback ("Batched Comm Closed", INFO):
    a normal end of a connection, not an error; -v must not show users a traceback for it. The same for a
    worker's heartbeat that finds its scheduler gone as the command's own cluster closes (:class:`_DropLostHeartbeat`;
    seen under `bif lds -v` in CI, after the flow had finished)."""
    logging.getLogger("distributed.batched").setLevel(logging.WARNING)
    logging.getLogger("distributed.worker").addFilter(_LOST_HEARTBEAT)  # once: a Filter is added once


def configure_terminal(*, verbose: bool) -> None:
    """Quiet (default) or verbose terminal for this process and the workers it starts.

    Must run before Prefect is imported: Prefect reads its console-handler level from the
    environment once. Logs still reach the Prefect API (and so the run's log file).
    """
    global _VERBOSE
    _VERBOSE = verbose
    _quiet_teardown_noise()
    if verbose:
        os.environ.pop(_QUIET_ENV, None)
        return
    os.environ[_QUIET_ENV] = "1"
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
    _quiet_this_process()


class _DropLostHeartbeat(logging.Filter):
    """Drops distributed's "Failed to communicate with scheduler during heartbeat." (ERROR, with a traceback).

    A worker logs it when its scheduler has gone, which is how a command's own cluster ends after a failed
    flow: the command exits (its scheduler with it) while a worker still sends a heartbeat, and that worker's
    stderr is the command's terminal. The worker goes on and retries; a scheduler that is really lost fails the
    command anyway. Seen once in CI: the traceback under a diverged chain's one-line error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to communicate with scheduler during heartbeat")


_LOST_HEARTBEAT = _DropLostHeartbeat()


def _quiet_this_process() -> None:
    _quiet_teardown_noise()
    for name in _NOISY_LOGGERS:
        if name.startswith("prefect"):
            continue  # Prefect's own loggers must keep INFO for the API handler; its console handler is quiet
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Worker process still alive after 4.0 seconds, killing" at teardown of a busy machine
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
    # ArviZ announces its refactor with a FutureWarning on import; not the user's concern
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"arviz(\.|$)")
    warnings.filterwarnings("ignore", message=r".*arviz.*refactor", category=FutureWarning)


#: glibc's mallopt parameters (malloc.h) and the values :func:`tune_malloc` sets in the workers
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
MALLOC_TRIM_THRESHOLD = 128 << 20
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
#: ``BIF_WORKER_MALLOC=default``: leave glibc's own settings (workers return freed memory sooner)
WORKER_MALLOC_ENV = "BIF_WORKER_MALLOC"


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse in this process: True when it was set.

    A covariance block allocates and frees about 70 MB of arrays (trace reads, centred draws, the
    comoment, bif and bif_corr), each one 5-27 MB. glibc's defaults serve such an array with a fresh
    mmap, or trim the heap once more than twice the largest array is free, so every block
    touched its memory anew: 22,000 minor page faults per 20k x 1k x 400 stage, at ~2 us each on
    this VM. With arrays up to 32 MiB served from the heap and up to 128 MiB of free heap kept, a
    3,334 x 1,000 block's work in one thread took 22-24 ms instead of 30-31 ms (0 faults instead
    of 2,200), and the stage's worker CPU 0.46 s instead of 0.53 s. A worker keeps up to 128 MiB
    per malloc arena more than it uses at the moment (the 20k stage's peak: 0.90 vs 0.78 GB).

    Linux with glibc only. A process whose environment sets ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` keeps what glibc made of them (the user's choice), and so does one with
    ``BIF_WORKER_MALLOC=default`` (`python -m benchmarks.malloc_ab` compares the two).
    """
    if sys.platform != "linux" or any(k in os.environ for k in _MALLOC_ENV):
        return False
    if os.environ.get(WORKER_MALLOC_ENV, "tuned") == "default":
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt  # this process's C library
    except (ValueError, OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return (mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1)


def dask_setup(worker: Any = None) -> None:
    """Dask preload hook: the worker's environment is its client's (see :func:`_use_forkserver`); quiet
    the worker process like the client (see :func:`configure_terminal`); glibc keeps freed memory for
    reuse (:func:`tune_malloc`)."""
    keys = os.environ.get(_ENV_KEYS)
    if keys:
        keep = set(json.loads(keys))
        for k in [k for k in os.environ if k not in keep]:
            del os.environ[k]
    tune_malloc()
    _quiet_teardown_noise()
    if os.environ.get(_QUIET_ENV):
        _quiet_this_process()
        # a worker's task-run failure records reach the command's terminal through a cluster of its own: set
        # Prefect's logging up now (its first task run would; later set-ups are incremental and keep the handlers)
        from prefect.logging.configuration import ensure_logging_setup

        ensure_logging_setup()
        quiet_run_records(everything=True)


# ---------------------------------------------------------------- Dask cluster


@dataclass(frozen=True)
class Cluster:
    """A scheduler to run on and what it cost to get it."""

    address: str
    startup_seconds: float  # 0 when joining a running scheduler
    started_here: bool
    kept: bool = False  # the kept cluster of bif.flows.kept_cluster (its workers restarted for this command)


#: Dask's housekeeping in the scheduler, the nannies and the workers, less often than its defaults. The event-loop
#: tick (20 ms: it only measures how late the loop runs, to warn past 3 s), the system monitor (500 ms: CPU,
#: memory and I/O figures for the dashboard) and the memory monitor (100 ms: spill, pause and the nanny's
#: terminate threshold) took 7.8-8.7% of a core of an idle 2-worker cluster, 1.4% at these settings (20 s each,
#: all processes of the cluster); during sampling that is CPU the chains lose on a machine with a core per chain.
HOUSEKEEPING: dict[str, str] = {"distributed.admin.tick.interval": "1s",
                                "distributed.admin.system-monitor.interval": "2s",
                                "distributed.worker.memory.monitor-interval": "500ms"}

#: LocalCluster (a SpecCluster) closes a worker's nanny for good when, this long after the scheduler removed the
#: worker, no worker of its name is registered (distributed 2026.8, ``SpecCluster._update_worker_status``). A restart
#: removes every worker and its nanny starts it again under the same name, so a check that falls in the gap of a
#: later restart closes a nanny whose worker is coming back: the kept cluster then had a worker less for good
#: (rarely, after some 40 commands; every time within 2 minutes of back-to-back restarts, 2026-12-03). Our nannies
#: restart their own workers and nothing rescales a cluster of ours, so the check only ever did that harm: never.
LOST_WORKER_TIMEOUT = {"distributed.deploy.lost-worker-timeout": "3650 days"}


def worker_count(n_workers: int | None, num_tasks: int) -> int:
    """The workers of a LocalCluster of :func:`dask_cluster`: ``n_workers`` (``compute.n_workers``), else one per task
    that can run at once, at most one per core."""
    return n_workers or max(1, min(num_tasks, os.cpu_count() or 1))


@contextlib.contextmanager
def dask_cluster(compute: Any, *, num_tasks: int, address: str | None = None,
                 preload: tuple[str, ...] = DEFAULT_PRELOAD, warm_modules: tuple[str, ...] = (),
                 keep: bool = False) -> Iterator[Cluster]:
    """Yield a :class:`Cluster`: ``address``, else ``compute.address``, else a LocalCluster started here.

    ``keep`` (the CLI commands): instead of a LocalCluster of this process, use the kept cluster
    of :mod:`bif.flows.kept_cluster` (started on first use, reused while the set-up is the same,
    its workers restarted for this command) unless ``compute.keep_cluster`` or
    ``BIF_KEEP_CLUSTER=0`` says no, or another command is using it.

    ``compute`` is a :class:`bif.config.ComputeConfig`; ``num_tasks`` is how many tasks can
    run at once (chains, retrainings), so the LocalCluster gets
    ``compute.n_workers or min(num_tasks, cores)`` workers, forked from a forkserver
    that has imported the heavy modules once (:func:`_use_forkserver`; ``warm_modules`` are
    added to its imports when this is the process's first cluster, e.g. :func:`problem_preload`).
    """
    address = address or compute.address
    if address:
        yield Cluster(address=address, startup_seconds=0.0, started_here=False)
        return
    t0 = time.perf_counter()
    threads = compute.threads_per_worker
    n_workers = worker_count(compute.n_workers, num_tasks)
    if keep:
        from bif.flows import kept_cluster

        if kept_cluster.enabled(compute):
            # the idle timeout is the command's wish for the wait after it, not part of the set-up (the fingerprint)
            spec = {"compute": {**compute.model_dump(exclude={"keep_cluster_idle_s"}), "n_workers": n_workers},
                    "num_tasks": n_workers, "preload": list(dict.fromkeys([*preload, *KEPT_WORKER_PRELOAD])),
                    "warm_modules": list(dict.fromkeys([*warm_modules, *KEPT_PRELOAD]))}
            idle = getattr(compute, "keep_cluster_idle_s", kept_cluster.DEFAULT_IDLE_TIMEOUT_S)
            with kept_cluster.use_kept_cluster(spec, idle_timeout_s=idle) as kept:
                if kept is not None:
                    info, _ = kept
                    yield Cluster(address=info.address, startup_seconds=time.perf_counter() - t0, started_here=True,
                                  kept=True)
                    return
    import dask
    from distributed import LocalCluster

    kwargs: dict[str, Any] = {"n_workers": n_workers, "threads_per_worker": threads, "processes": True,
                              "dashboard_address": ":0", "silence_logs": logging.WARNING,
                              "preload": list(preload)}
    if compute.gpus:
        kwargs["resources"] = {"GPU": 1}
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in workers; it makes glibc trim on every
    # large free and slowed SGLD steps by ~33% here (4.6 -> 6.1 ms per digits draw). Keep the
    # thread caps (one BLAS / OpenMP thread per worker thread), drop the trim setting.
    spawn_env, environ = _worker_environ(threads)
    # distributed's nanny also writes its pre-spawn environ into *this* process's os.environ
    # (WorkerProcess.start: os.environ.update), so a plain LocalCluster started earlier in the
    # process (a notebook's, a test's) leaves Dask's value behind, and every later worker would
    # inherit it from us. Drop exactly that leaked value; a value the user chose is kept.
    leaked = spawn_env.get("MALLOC_TRIM_THRESHOLD_")
    if leaked is not None and os.environ.get("MALLOC_TRIM_THRESHOLD_") == str(leaked):
        del os.environ["MALLOC_TRIM_THRESHOLD_"]
    if not _VERBOSE:
        _quiet_this_process()
    # Dask's statistical profiler samples every worker thread's stack each 10 ms for the dashboard's profile page,
    # holding the GIL the chain's thread needs: per digits draw 1.79 vs 1.77 ms (8 interleaved runs each way)
    settings: dict[str, Any] = {"distributed.nanny.pre-spawn-environ": environ,
                                "distributed.worker.profile.enabled": False, **HOUSEKEEPING, **LOST_WORKER_TIMEOUT}
    if _use_forkserver((*preload, *warm_modules), {k: environ[k] for k in _THREAD_VARS if k in environ}):
        settings["distributed.worker.multiprocessing-method"] = "forkserver"
        # A forked worker inherits the forkserver's environment, frozen when it started; a spawned
        # one inherits ours as it is now. Send ours along (the nanny sets it in the worker) and let
        # the worker drop what we no longer have (dask_setup), so both see the same variables.
        extra = dask.config.get("distributed.nanny.environ", {}) or {}
        os.environ.pop(_ENV_KEYS, None)  # the nanny leaks the last list into os.environ, which overrides ours
        environ = {**os.environ, **{k: str(v) for k, v in environ.items()}}
        environ[_ENV_KEYS] = json.dumps(sorted({*environ, *extra, _ENV_KEYS}))
        settings["distributed.nanny.pre-spawn-environ"] = environ
        if "bif.flows.runtime" not in preload:
            kwargs["preload"] = ["bif.flows.runtime", *preload]
    before = dict(os.environ)
    # Dask takes a pre-spawn variable from os.environ when it is set there (e.g. the OMP_NUM_THREADS=1
    # that a plain LocalCluster started earlier leaves behind): for the start, ours are os.environ's
    os.environ.update({k: str(environ[k]) for k in _THREAD_VARS if k in environ})
    os.environ.update(FORKSERVER_START_ENV)  # the forkserver, if a first worker starts it now
    try:
        with dask.config.set(settings), LocalCluster(**kwargs) as cluster:
            _restore_environ(before)
            yield Cluster(address=cluster.scheduler_address, startup_seconds=time.perf_counter() - t0,
                          started_here=True)
    finally:
        _restore_environ(before)


def _restore_environ(before: Mapping[str, str]) -> None:
    """Undo what distributed's nanny wrote into this process's os.environ (its pre-spawn environ, at each
    worker start): our thread caps would otherwise override the next cluster's own (Dask prefers a
    variable of os.environ to its config), and they are not this process's settings."""
    for k in [k for k in os.environ if k not in before]:
        del os.environ[k]
    for k, v in before.items():
        if os.environ.get(k) != v:
            os.environ[k] = v


def _worker_environ(threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Dask's pre-spawn environ, and the workers' own: Dask's without ``MALLOC_TRIM_THRESHOLD_``, thread caps."""
    import dask

    spawn_env = dask.config.get("distributed.nanny.pre-spawn-environ", {})
    environ = {k: v for k, v in spawn_env.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    environ |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    # numba (the diagnostics' ArviZ backend) would start an OpenMP pool of one spinning thread per
    # core in each worker; torch steps after it ran 5-35x slower (bif.quality.diagnostics). Cap it,
    # and let idle OpenMP threads sleep instead of spinning.
    environ |= {"NUMBA_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE"}
    return spawn_env, environ


def start_forkserver(compute: Any, *, preload: tuple[str, ...] = DEFAULT_PRELOAD,
                     warm_modules: tuple[str, ...] = ()) -> bool:
    """Start the forkserver that :func:`dask_cluster` will fork its workers from, now; True when it runs.

    The forkserver spends seconds of its own core importing torch, Prefect and distributed
    (:func:`_use_forkserver`). Started by the cluster itself, it would begin only after this
    process has imported distributed and started the scheduler, seconds of a core that the
    command shares with its pre-flight. Started here, first, its imports overlap both. Same
    preload and thread settings as the cluster's own start (the cluster then finds it running);
    nothing happens for a cluster that joins an address, or where workers are spawned.
    """
    from multiprocessing import forkserver

    if compute.address:
        return False
    _, environ = _worker_environ(compute.threads_per_worker)
    threads = {k: environ[k] for k in _THREAD_VARS if k in environ}
    if not _use_forkserver((*preload, *warm_modules), threads):
        return False
    before = dict(os.environ)
    os.environ.update({k: str(v) for k, v in threads.items()})  # the forkserver's thread pools size on import
    os.environ.update(FORKSERVER_START_ENV)
    try:
        forkserver.ensure_running()
    finally:
        _restore_environ(before)
    return True


@contextlib.contextmanager
def cluster_in_background(compute: Any, *, num_tasks: int, address: str | None = None,
                          preload: tuple[str, ...] = DEFAULT_PRELOAD, warm_modules: tuple[str, ...] = (),
                          warm: Callable[[], Any] | None = None, keep: bool = False
                          ) -> Iterator[Callable[[], Cluster]]:
    """:func:`dask_cluster` started on a thread from entry on; yields ``wait()``, which returns the :class:`Cluster`.

    The caller checks its inputs meanwhile (the CLI's pre-flight: imports, the problem, the
    losses at w*, one core's work for seconds) while the workers boot on the other cores.
    ``warm``: run once on every worker of a cluster started here, as soon as it is up, as a
    Dask task pinned to that worker, so the tasks sent later queue behind it (e.g.
    :func:`bif.tasks.pipeline.warm_problem`: imports and the problem, before the first chain);
    its errors are ignored (the real task meets and reports them). ``wait()`` re-raises a
    failed start. On exit the cluster closes, after its start and the warm tasks end.
    """
    import threading

    stack = contextlib.ExitStack()
    box: dict[str, Any] = {}
    started = threading.Event()

    def start() -> None:
        try:
            cluster = stack.enter_context(dask_cluster(compute, num_tasks=num_tasks, address=address,
                                                       preload=preload, warm_modules=warm_modules, keep=keep))
            box["cluster"] = cluster
            # the warm tasks are queued before wait() returns, so every task sent later runs after them
            pending = _warm_workers(cluster.address, warm) if warm is not None and cluster.started_here else None
        except BaseException as err:  # noqa: BLE001 - re-raised by wait()
            box["error"] = err
            return
        finally:
            started.set()
        if pending is not None:
            pending()

    from bif.flows import kept_cluster

    if address is None and not (keep and kept_cluster.enabled(compute)):
        start_forkserver(compute, preload=preload, warm_modules=warm_modules)
    thread = threading.Thread(target=start, name="bif-cluster-start", daemon=True)
    thread.start()

    def wait() -> Cluster:
        started.wait()
        if "error" in box:
            raise box["error"]
        return box["cluster"]

    try:
        yield wait
    finally:
        thread.join()
        stack.close()


def _warm_workers(address: str, warm: Callable[[], Any]) -> Callable[[], None] | None:
    """Queue ``warm()`` once on every worker of ``address``, as a task pinned there; returns ``finish()``,
    which waits for them and closes the client (errors ignored; None when nothing could be queued)."""
    from distributed import Client, wait

    try:
        client = Client(address, set_as_default=False)
    except Exception:  # noqa: BLE001 - warming is an optimisation
        return None
    try:
        workers = list(client.scheduler_info()["workers"])
        futures = [client.submit(warm, key=f"bif-warm-{i}-{uuid.uuid4().hex[:8]}", workers=[w],
                                 allow_other_workers=False, pure=False) for i, w in enumerate(workers)]
    except Exception:  # noqa: BLE001
        client.close()
        return None

    def finish() -> None:
        with contextlib.suppress(Exception):
            wait(futures)
        with contextlib.suppress(Exception):
            client.close()

    return finish


#: ``BIF_WORKER_START=spawn`` makes LocalClusters spawn their workers (Dask's default) instead of forking them.
WORKER_START_ENV = "BIF_WORKER_START"
#: Environment of the forkserver's start. Python starts it as ``python -c``, which puts the working directory first
#: on ``sys.path`` while it imports ``multiprocessing.forkserver`` (socket, selectors, ...), before it takes this
#: process's ``sys.path``: a user's ``socket.py`` there was imported in place of the standard module, and the
#: cluster never came up ("Nanny failed to start"). ``PYTHONSAFEPATH`` (``-P``) leaves the directory out; it stays
#: on the workers' ``sys.path`` after this process's, where their problem modules are found.
FORKSERVER_START_ENV = {"PYTHONSAFEPATH": "1"}

#: The thread settings of the workers of the forkserver this process started (None: not started).
_FORKSERVER_THREADS: dict[str, str] | None = None
#: Worker variables that size thread pools when a library loads (see :func:`_use_forkserver`).
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_WAIT_POLICY")
#: Imported once by the forkserver that forks the LocalCluster's workers (see :func:`_use_forkserver`).
#: ``pyarrow.dataset``: ``pq.read_table`` (the health files, tables) loads it, and its shared libraries, on first use;
#: each fresh worker paid 0.38 s of its core for that in every run (a profile of the gates' first call in a worker).
#: ``bif.block_ops``: the covariance blocks' numba kernels, loaded from numba's cache in 10 ms once numba is up (after
#: arviz-stats); a fresh worker would pay that at its first block, a fresh install the compile (~2 s) in every worker.
#: ``bif.quality.numba_backend``: arviz-stats' numba backend (the diagnostics), imported under the lock that keeps
#: forkservers and workers importing at once from breaking numba's cache (see that module). ``bif.quality.kernels``:
#: the diagnostics' own kernels (33 ms from numba's cache; the compile on a fresh install: ~4 s).
FORKSERVER_PRELOAD = ("distributed", "torch", "prefect", "prefect_dask", "pyarrow.parquet", "pyarrow.dataset",
                      "xarray", "zarr", "bif.quality.numba_backend", "bif.block_ops", "bif.quality.kernels",
                      "dask.array", "bif.tasks.covariance")
#: Imported after every other preload of a forkserver: ``gc.freeze()`` of what they created (see that module).
FORKSERVER_LAST = "bif.flows.forkserver_ready"
#: Added to the forkserver's imports of a kept cluster, which pays for them once: its workers run the
#: quality gates (great_expectations: ~5 s of a core to import) and draw the report (matplotlib: ~1 s). A command
#: with a cluster of its own runs both itself and imports them while its cluster starts.
KEPT_PRELOAD = ("great_expectations", "bif.quality.run", "matplotlib.figure", "matplotlib.backends.backend_agg",
                "bif.report", "bif.flows.forkserver_warmup")
#: Dask worker preloads of a kept cluster: those of every flow a CLI command runs on it (``bif run``: the default;
#: ``bif lds`` and ``bif calibrate``: the retraining and calibration modules, which add 0.07 s of a core to the
#: forkserver's ~10 s), so that switching between the commands reuses the cluster (bif.flows.kept_cluster).
KEPT_WORKER_PRELOAD = (*DEFAULT_PRELOAD, "bif.evaluation.retrain", "bif.evaluation.calibration")


def problem_preload(problem: str) -> tuple[str, ...]:
    """Modules a worker needs for the problem factory ``problem`` ("module:function"), for the forkserver.

    Only bif's own factories (user modules may do anything on import): the factory's module
    and its ``WORKER_PRELOAD`` (e.g. :mod:`bif.lm`'s transformers classes).
    """
    import ast
    import importlib.util

    module = problem.partition(":")[0]
    if not module.startswith("bif."):
        return ()
    # read, not imported: importing the factory's module here (torch, scikit-learn: ~4 s of a core)
    # would delay the forkserver that imports it anyway (:func:`start_forkserver`)
    try:
        spec = importlib.util.find_spec(module)
        tree = ast.parse(open(spec.origin, encoding="utf-8").read()) if spec and spec.origin else None
    except Exception:  # noqa: BLE001 - the pre-flight reports a bad factory
        return ()
    if tree is None:
        return ()
    extra: tuple[str, ...] = ()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "WORKER_PRELOAD"
                                                for t in node.targets):
            with contextlib.suppress(ValueError):
                extra = tuple(ast.literal_eval(node.value))
    return (module, *extra)


def _use_forkserver(preload: tuple[str, ...], threads: Mapping[str, str]) -> bool:
    """Fork the workers from one warm process instead of spawning fresh interpreters (POSIX only).

    A spawned worker imports torch, Prefect, distributed and bif itself: ~5 s of one core
    each, paid by every worker of every cluster. Python's forkserver imports them once (the
    first LocalCluster of this process starts it, with that cluster's worker environment:
    thread caps, numba's pool size) and forks every later worker ready to run, in
    milliseconds; a process that starts several clusters (a test session, a calibration
    sweep) pays once. The forkserver is single-threaded and imports nothing that starts
    threads or CUDA, so forking it is safe. Thread pools (OpenMP, BLAS, numba) size
    themselves when they load, in the forkserver, so a later cluster with other thread
    settings (``threads``: the thread variables of its workers) spawns its workers instead.
    ``BIF_WORKER_START=spawn`` (or another ``distributed.worker.multiprocessing-method`` in
    Dask's config, or a forkserver that something else started) keeps Dask's way.
    """
    global _FORKSERVER_THREADS
    import multiprocessing

    import dask

    if os.environ.get(WORKER_START_ENV, "forkserver") != "forkserver":
        return False  # BIF_WORKER_START=spawn: Dask's own way
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    if dask.config.get("distributed.worker.multiprocessing-method", "spawn") != "spawn":
        return False  # the user chose another method in Dask's config
    threads = {k: str(v) for k, v in threads.items()}
    # distributed sets its own preload list when it first starts a forkserver worker, unless told that
    # one is set; not imported yet (:func:`start_forkserver` runs before it is), it has set nothing
    dutils = sys.modules.get("distributed.utils")
    if _FORKSERVER_THREADS is not None:
        if dutils is not None:
            dutils._forkserver_preload_set = True
        return _FORKSERVER_THREADS == threads
    if dutils is not None and getattr(dutils, "_forkserver_preload_set", True):
        return False  # a forkserver someone else set up: its environment is unknown
    from multiprocessing import forkserver

    if getattr(forkserver._forkserver, "_forkserver_pid", None) is not None:
        return False  # a forkserver started by other code: its preload and environment are unknown
    # the last: bif.flows.forkserver_ready freezes what the others created (gc.freeze), for every forked worker
    modules = [m for m in FORKSERVER_PRELOAD + tuple(preload) if _importable(m)] + [FORKSERVER_LAST]
    multiprocessing.get_context("forkserver").set_forkserver_preload(modules)
    if dutils is not None:
        dutils._forkserver_preload_set = True  # distributed would replace the list with its own
    _FORKSERVER_THREADS = threads
    return True


def _importable(module: str) -> bool:
    """Whether ``module``'s top-level package is installed, without importing anything.

    ``find_spec("a.b.c")`` imports ``a.b`` to find ``c``: for ``arviz_stats.numba.diagnostics``
    that cost the command ~3 s of a core (numba) only to check a name the forkserver imports
    anyway. The forkserver skips a submodule that fails to import, so the top level is enough.
    """
    import importlib.util

    try:
        return importlib.util.find_spec(module.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def import_in_background(*warmers: Callable[[], Any]) -> None:
    """Call each of ``warmers`` (imports, caches) on a daemon thread of this process; errors are ignored.

    For what a command will need after a wait it cannot shorten (its cluster starting, its
    chains sampling): the quality gates' great_expectations context, matplotlib.
    """
    import threading

    def run() -> None:
        for w in warmers:
            with contextlib.suppress(Exception):
                w()

    threading.Thread(target=run, name="bif-warm-imports", daemon=True).start()


class DaskRuntime:
    """The Dask side of one flow run: where it runs (:class:`Cluster`) and how tasks get there.

    :meth:`submit` sends a Prefect task to the cluster through prefect-dask's
    ``DaskTaskRunner`` (the task run reports to the flow run like ``task.submit``);
    :meth:`submit_gpu` also claims one ``GPU`` resource when ``compute.gpus`` is set.
    """

    def __init__(self, cluster: Cluster, runner: Any, gpus: int) -> None:
        self.cluster, self._runner, self._gpus = cluster, runner, gpus

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def startup_seconds(self) -> float:
        return self.cluster.startup_seconds

    def submit(self, task: Any, *args: Any, **kwargs: Any) -> Any:
        """``task(*args, **kwargs)`` as a task run on the cluster; returns its Prefect future."""
        from prefect.utilities.callables import get_call_parameters

        return self._runner.submit(task, get_call_parameters(task.fn, args, kwargs))

    def submit_gpu(self, task: Any, *args: Any, **kwargs: Any) -> Any:
        """:meth:`submit`, holding one worker ``GPU`` resource while it runs when ``compute.gpus`` is set."""
        if not self._gpus:
            return self.submit(task, *args, **kwargs)
        import dask

        with dask.annotate(resources={"GPU": 1}):
            return self.submit(task, *args, **kwargs)


@contextlib.contextmanager
def on_dask(compute: Any, *, num_tasks: int, address: str | None = None,
            preload: tuple[str, ...] = DEFAULT_PRELOAD) -> Iterator[DaskRuntime]:
    """The runtime of one flow run, built inside the flow from ``cfg.compute``: every flow uses this.

    Joins ``address`` (a cluster the CLI started early, to overlap its start-up with the
    Prefect server's) or ``compute.address``, else starts a LocalCluster (:func:`dask_cluster`:
    MALLOC fix and reuse, thread caps, housekeeping intervals, GPU resources, quiet logs) that lives as
    long as the block.
    So a flow run from a Prefect deployment runs its tasks on Dask exactly as the CLI does.
    """
    from prefect_dask import DaskTaskRunner

    serialize_settings_once()
    with dask_cluster(compute, num_tasks=num_tasks, address=address, preload=preload) as cluster:
        try:
            with DaskTaskRunner(address=cluster.address) as runner:
                yield DaskRuntime(cluster, runner, compute.gpus)
        finally:
            if cluster.started_here:  # the workers go with the cluster: flush their task-run logs first
                _drain_workers(cluster.address)


def serialize_settings_once() -> None:
    """Serialize Prefect's settings once per settings object, not once per task sent to Dask.

    prefect-dask's client serializes the whole context for every task it submits; the settings, a
    large pydantic model whose dump renders each secret field, took 13-17 ms of it on an idle core and
    about twice that beside a run's workers, nine times per run on the flow's critical path. A settings
    context does not change while it is current, so its dump is kept (keyed by the object, which the
    cache holds so that its id is not reused) and handed out again; the dict is only pickled. Installed
    once per process; a Prefect without ``SettingsContext.serialize`` is left as it is.
    """
    from prefect.context import SettingsContext

    original = getattr(SettingsContext, "serialize", None)
    if original is None or getattr(original, "_bif_cached", False):
        return
    cache: dict[tuple[int, bool], tuple[Any, dict[str, Any]]] = {}  # dict operations are atomic: no lock

    def serialize(self: Any, include_secrets: bool = True) -> dict[str, Any]:
        key = (id(self), include_secrets)
        hit = cache.get(key)
        if hit is None or hit[0] is not self:
            if len(cache) >= 8:
                cache.clear()
            hit = cache[key] = (self, original(self, include_secrets=include_secrets))
        return hit[1]

    serialize._bif_cached = True  # type: ignore[attr-defined]
    serialize._bif_original = original  # type: ignore[attr-defined]
    SettingsContext.serialize = serialize  # type: ignore[method-assign]


def worker_device(device: str, gpus: int, address: str) -> str:
    """The torch device a chain task gets on this cluster (``compute.device`` resolved on a worker)."""
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        fut = client.submit(_resolve_device, device, pure=False, resources={"GPU": 1} if gpus else None)
        return str(fut.result())


def _resolve_device(device: str) -> str:
    """``device`` resolved where this runs (a worker: torch loads there, never in the command)."""
    from bif.sampling.chain import resolve_device

    return str(resolve_device(device))


# ---------------------------------------------------------------- credentials policy


@contextlib.contextmanager
def credentials(storage_options: Mapping[str, Any]) -> Iterator[str | None]:
    """Register ``storage_options`` in this process for one flow run; yields the ref (None when empty)."""
    if not storage_options:
        yield None
        return
    ref = uuid.uuid4().hex
    _CREDENTIALS[ref] = dict(storage_options)
    try:
        yield ref
    finally:
        _CREDENTIALS.pop(ref, None)


def resolve_storage_options(credentials_ref: str | None, secret_block: str | None = None) -> dict[str, Any]:
    """fsspec options for a flow: (a) the local registry, (b) a Prefect Secret block, (c) ambient ``{}``."""
    if credentials_ref and credentials_ref in _CREDENTIALS:
        return dict(_CREDENTIALS[credentials_ref])
    if secret_block:
        import json

        from prefect.blocks.system import Secret

        from bif.errors import ConfigError

        try:
            value = Secret.load(secret_block).get()
        except Exception as err:  # noqa: BLE001 - no block, no API: the message names the block
            raise ConfigError(f"could not load the Prefect Secret block {secret_block!r} with the storage "
                              f"options ({type(err).__name__}); create it, or leave credentials to AWS_* "
                              "variables / instance roles") from None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, dict):
            raise ConfigError(f"the Prefect Secret block {secret_block!r} must hold a JSON object of fsspec "
                              "storage options, e.g. {\"key\": ..., \"secret\": ...}")
        return value
    return {}


def flow_config(config: Mapping[str, Any], credentials_ref: str | None, secret_block: str | None = None) -> Any:
    """The RunConfig of a flow: its public ``config`` data plus the storage options the policy resolves."""
    from bif.config import build_config

    return build_config({**config, "storage_options": resolve_storage_options(credentials_ref, secret_block)})


# ---------------------------------------------------------------- running a flow


def call_flow(flow_fn: Any, cfg: Any, *, address: str, log_name: str, **params: Any) -> Any:
    """Run ``flow_fn`` on the Dask scheduler ``address`` with ``cfg``'s credentials kept out of Prefect.

    The flow gets ``config`` (public data, no credentials), ``credentials_ref``,
    ``scheduler_address=address`` (its :func:`on_dask` joins that cluster) and ``params``.
    Afterwards, success or failure, the flow run's logs go to ``<cfg.output>/logs/``.
    Returns the flow's result; raises its error.
    """
    quiet_failure_records()
    with credentials(cfg.storage_options) as ref:
        state = flow_fn(config=cfg.public_dict() | {"storage_options": {}}, credentials_ref=ref,
                        scheduler_address=address, return_state=True, **params)
    _save_logs(state, cfg, address=address, name=log_name)
    return state.result()


class _RunRecordConsoleFilter(logging.Filter):
    """Quiet terminal: keeps flow and task runs' failure records that the command reports itself off the terminal.

    In the command (``everything`` False): a record whose exception is a :class:`bif.errors.BifError` (bad
    input, a diverged chain, a damaged file, failed gates), which the command reports in one line before it
    exits 2; any other exception keeps its traceback. In a worker of a cluster of the command's own
    (``everything`` True): every run record, as a kept cluster's workers write theirs to ``cluster.log`` and
    not to the terminal. Either way the records reach the Prefect API, and so ``<output>/logs/``."""

    def __init__(self, everything: bool = False) -> None:
        super().__init__()
        self.everything = everything

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        if self.everything:
            return False
        from bif.errors import BifError

        return not isinstance(record.exc_info[1] if record.exc_info else None, BifError)


def quiet_failure_records() -> None:
    """On a quiet terminal (:func:`configure_terminal`), keep the records of flow and task runs that failed with a
    BifError off it (:class:`_RunRecordConsoleFilter`): the command reports them in one line. Every command that runs
    a flow calls this first (:func:`call_flow`; `bif backfill` and `bif watch`, whose failed runs are rows of their
    table, printed 50-line tracebacks above it)."""
    if os.environ.get(_QUIET_ENV):
        quiet_run_records()


def quiet_run_records(*, everything: bool = False) -> None:
    """Add :class:`_RunRecordConsoleFilter` to Prefect's console handlers (once per handler)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                                       if name.startswith("prefect")]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and \
                    not any(isinstance(f, _RunRecordConsoleFilter) for f in handler.filters):
                handler.addFilter(_RunRecordConsoleFilter(everything))


def _save_logs(state: Any, cfg: Any, *, address: str, name: str) -> str | None:
    """Write the flow run's log lines (from the Prefect API) to ``<output>/logs/<name>-<time>.log``."""
    from bif.errors import RunConflictError

    try:
        state.result()
    except RunConflictError:
        return None  # a refused run leaves the existing output untouched
    except BaseException:  # noqa: BLE001 - the caller raises it; the log is wanted most then
        pass
    try:
        text = _fetch_logs(state.state_details.flow_run_id, address)
        from bif.store.run import RunStore

        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        return RunStore(cfg.output, cfg.storage_options).write_log(f"{name}-{stamp}.log",
                                                                   _redact(text, cfg.storage_options))
    except Exception as err:  # noqa: BLE001 - a log we cannot save must not fail a finished run
        print(f"note: could not save the run log under {cfg.output}/logs ({type(err).__name__})")
        return None


def _redact(text: str, storage_options: Mapping[str, Any]) -> str:
    from bif.store.fs import redact

    return redact(text, storage_options)


def _drain_worker() -> None:
    """Flush a Dask worker's Prefect log batch (in a thread: the worker's event loop is running here)."""
    import threading

    from bif.flows.prefect_server import drain_prefect_workers

    t = threading.Thread(target=drain_prefect_workers, daemon=True)
    t.start()
    t.join(timeout=15)


def _drain_workers(address: str) -> None:
    """Flush every worker's batch of task-run logs to the Prefect API (best effort)."""
    from distributed import Client

    with contextlib.suppress(Exception), Client(address, set_as_default=False, timeout=10) as client:
        client.run(_drain_worker)  # task-run logs wait in each worker's batch until flushed


def _fetch_logs(flow_run_id: Any, address: str) -> str:
    """Every log line of one flow run (worker task runs included), oldest first, as text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    from bif.flows.prefect_server import drain_prefect_workers

    _drain_workers(address)
    drain_prefect_workers()
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    lines: list[str] = []
    with get_client(sync_client=True) as client:
        names: dict[Any, str] = {}
        while True:
            page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                         limit=200, offset=len(names))
            names |= {t.id: t.name for t in page}
            if len(page) < 200:
                break
        offset = 0
        while True:
            page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                    limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC)
            for log in page:
                stamp = log.timestamp.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
                where = names.get(log.task_run_id, log.name) if log.task_run_id else log.name
                lines.append(f"{stamp} | {logging.getLevelName(log.level):<7} | {where} - {log.message}")
            if len(page) < 200:
                break
            offset += len(page)
    return "\n".join(lines) + "\n"



# ---------------------------------------------------------------- leaving quickly


def exit_now(code: int) -> None:
    """End this command at once: flush the terminal and Prefect's queues, kill our worker processes, ``os._exit``.

    For the CLI after its work is done and its summary printed (the manifest, traces and
    logs are all written): a LocalCluster's graceful close and the interpreter's teardown
    take seconds and change nothing the user keeps. Child processes in this process's session
    (Dask workers, their resource tracker) get SIGKILL; the kept Prefect server runs in a
    session of its own and stays. Never call it from code that others import and continue.
    """
    import signal
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    from bif.flows.prefect_server import drain_prefect_workers

    drain_prefect_workers()
    with contextlib.suppress(Exception):
        import psutil

        me = os.getsid(0)
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(Exception):
                if os.getsid(child.pid) == me:
                    child.send_signal(signal.SIGKILL)
    os._exit(code)

"""Process settings of the Dask clusters that bif starts (:mod:`bif.flows.runtime`).

glibc keeps freed memory for reuse in the workers (:func:`bif.flows.runtime.tune_malloc`): a covariance
block allocates and frees ~70 MB of 5-27 MB arrays, and with glibc's defaults each block mapped them anew:
22,000 minor page faults per 20k x 1k x 400 stage, ~2 us each on a VM. The measure here is the same: page
faults when arrays of that size are allocated again after a free.

Dask's housekeeping runs less often than its defaults (``bif.flows.runtime.HOUSEKEEPING``): an idle 2-worker
cluster took 7.8-8.7% of a core at Dask's intervals, 1.4% at these.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from bif.config import ComputeConfig

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")


def _refaults(mb: int = 20, count: int = 3) -> int:
    """Minor page faults while ``count`` arrays of ``mb`` MiB, each written whole, are built a second time."""
    import resource

    def build() -> list[bytes]:
        return [b"\x01" * (mb << 20) for _ in range(count)]

    first = build()
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    again = build()
    del again
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _in_a_thread() -> int:
    """:func:`_refaults` on a thread of its own (its own malloc arena), as a Dask task runs."""
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(_refaults()))
    t.start()
    t.join()
    return out[0]


#: 3 x 20 MiB = 15,360 pages; a process that maps them anew faults on nearly every one
PAGES = 3 * (20 << 20) // os.sysconf("SC_PAGE_SIZE")


def _intervals(server, names: tuple[str, ...]) -> dict[str, float]:
    return {k: float(server.periodic_callbacks[k].callback_time) for k in names}


def test_workers_reuse_freed_memory_and_keep_house_less_often_forked_and_spawned(monkeypatch):
    from distributed import Client

    from bif.flows.runtime import dask_cluster

    # one thread: forked from the forkserver; two: other thread settings than the forkserver's, spawned
    for threads in (1, 2):
        with dask_cluster(ComputeConfig(n_workers=1, threads_per_worker=threads), num_tasks=1) as cluster, \
                Client(cluster.address) as client:
            faults = client.submit(_refaults, pure=False).result()
            (worker,) = client.run(lambda dask_worker: _intervals(dask_worker, ("tick", "monitor", "memory_monitor"))
                                   ).values()
            (nanny,) = client.run(lambda dask_worker: _intervals(dask_worker, ("tick", "memory_monitor")),
                                  nanny=True).values()
            scheduler = client.run_on_scheduler(lambda dask_scheduler: _intervals(dask_scheduler, ("tick", "monitor")))
        assert faults < PAGES // 50, (threads, faults)
        # Dask's defaults: tick 20 ms, system monitor 500 ms, memory monitor 100 ms
        assert worker == {"tick": 1000, "monitor": 2000, "memory_monitor": 500}, (threads, worker)
        assert nanny == {"tick": 1000, "memory_monitor": 500} and scheduler == {"tick": 1000, "monitor": 2000}
    # BIF_WORKER_MALLOC=default reaches a forked worker (through the client's environment): glibc's own settings
    monkeypatch.setenv("BIF_WORKER_MALLOC", "default")
    with dask_cluster(ComputeConfig(n_workers=1, threads_per_worker=1), num_tasks=1) as cluster, \
            Client(cluster.address) as client:
        assert client.submit(_refaults, pure=False).result() > PAGES * 0.9


def test_malloc_ab_benchmark_runs_both_settings(tmp_path):
    """`python -m benchmarks.malloc_ab` (README, Benchmarks) at its quick size: one cluster per setting."""
    import json

    out = tmp_path / "ab.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "benchmarks.malloc_ab", "--quick", "--rounds", "1", "--repeats", "1",
                          "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["shape"] == [400, 5000, 1000] and set(data["clusters"]) == {"default", "tuned"}
    for setting, (cluster,) in data["clusters"].items():
        assert len(cluster["stage_runs_s"]) == 1 and cluster["stage_runs_s"][0] > 0, setting
        assert cluster["faults_per_run"] > 0 and cluster["worker_cpu_s_per_run"] > 0, setting


def _plain(env: dict[str, str], tune: bool) -> tuple[str, int, int]:
    import inspect

    code = ("import threading\n" + inspect.getsource(_refaults) + inspect.getsource(_in_a_thread)
            + "from bif.flows.runtime import tune_malloc\n"
            + f"tuned = tune_malloc() if {tune} else None\n"
            + "print(tuned, _in_a_thread(), _refaults())\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    tuned, thread, main = res.stdout.split()
    return tuned, int(thread), int(main)


def test_tuned_process_refaults_nothing_and_glibc_defaults_refault_every_page():
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    tuned, thread, main = _plain(env, tune=True)
    assert tuned == "True" and thread < PAGES // 50 and main < PAGES // 50, (thread, main)
    # the same allocations with glibc's own settings: (nearly) every page again; the measure tells them apart
    _, thread, main = _plain(env, tune=False)
    assert thread > PAGES * 0.9 and main > PAGES // 2, (thread, main)
    # a malloc setting in the environment is the user's: left as glibc read it
    tuned, thread, _ = _plain(env | {"MALLOC_TRIM_THRESHOLD_": "65536"}, tune=True)
    assert tuned == "False" and thread > PAGES * 0.9, thread
    # and BIF_WORKER_MALLOC=default keeps glibc's own settings
    tuned, thread, _ = _plain(env | {"BIF_WORKER_MALLOC": "default"}, tune=True)
    assert tuned == "False" and thread > PAGES * 0.9, thread


@pytest.mark.parametrize("verbose", [False, True])
def test_a_terminal_drops_a_lost_heartbeat_but_not_other_worker_errors(verbose):
    """A command's own cluster ends with the command: a worker whose heartbeat finds the scheduler gone logs an
    ERROR with a traceback to the command's terminal (seen in CI under a diverged chain's one-line error, and at
    the end of a successful `bif lds -v`). Every process (the command, and workers through dask_setup), quiet or
    verbose, drops that record and keeps every other."""
    code = (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stderr, format='%(levelname)s %(message)s')\n"
        "from bif.flows.runtime import configure_terminal\n"
        f"configure_terminal(verbose={verbose})\n"
        "log = logging.getLogger('distributed.worker')\n"
        "try:\n"
        "    raise OSError('Stream is closed')\n"
        "except OSError:\n"
        "    log.exception('Failed to communicate with scheduler during heartbeat.')\n"
        "log.error('Compute Failed for key x')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Compute Failed for key x" in res.stderr
    assert "heartbeat" not in res.stderr and "Traceback" not in res.stderr

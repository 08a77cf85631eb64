"""Start-up of a run: forked Dask workers, the cluster started beside the pre-flight, the warmed problem.

``bif.flows.runtime.dask_cluster`` forks its workers from Python's forkserver, which imports
torch, Prefect, distributed and bif once per process; ``cluster_in_background`` starts the
cluster on a thread and runs a warm-up task on every worker; ``bif.tasks.pipeline.warm_problem``
builds the problem there ahead of the first chain. Real LocalClusters throughout.
"""
from __future__ import annotations

import os

import torch

from bif.config import ComputeConfig, build_config
from bif.tasks import pipeline


def _env_of_worker(names: tuple[str, ...]) -> dict:
    import os

    return {k: os.environ.get(k) for k in names} | {"ppid": os.getppid(), "torch_loaded": "torch" in __import__("sys").modules}


def test_forked_workers_see_the_clients_environment_as_it_is_now(monkeypatch):
    """Two clusters in one process: the second's workers come from the same forkserver, yet see variables set
    after the first started and not those removed since (a spawned worker would inherit them the same way)."""
    from distributed import Client

    from bif.flows.runtime import dask_cluster

    names = ("BIF_TEST_KEPT", "BIF_TEST_REMOVED", "BIF_TEST_ADDED", "OMP_NUM_THREADS")
    monkeypatch.setenv("BIF_TEST_KEPT", "1")
    monkeypatch.setenv("BIF_TEST_REMOVED", "old")
    monkeypatch.delenv("BIF_TEST_ADDED", raising=False)
    compute = ComputeConfig(n_workers=2, threads_per_worker=1)
    with dask_cluster(compute, num_tasks=2) as cluster, Client(cluster.address) as client:
        first = list(client.run(_env_of_worker, names).values())
    monkeypatch.delenv("BIF_TEST_REMOVED")
    monkeypatch.setenv("BIF_TEST_ADDED", "new")
    with dask_cluster(compute, num_tasks=2) as cluster, Client(cluster.address) as client:
        second = list(client.run(_env_of_worker, names).values())
    for env in first:
        assert (env["BIF_TEST_KEPT"], env["BIF_TEST_REMOVED"], env["BIF_TEST_ADDED"]) == ("1", "old", None)
    for env in second:
        assert (env["BIF_TEST_KEPT"], env["BIF_TEST_REMOVED"], env["BIF_TEST_ADDED"]) == ("1", None, "new")
    for env in first + second:
        assert env["OMP_NUM_THREADS"] == "1" and env["torch_loaded"]  # thread caps; torch came with the fork
    parents = {env["ppid"] for env in first + second}
    assert len(parents) == 1 and os.getpid() not in parents  # one forkserver forked all four workers


def _linear_cfg(tmp_path, **compute):
    return build_config({"problem": "bif.examples.linear:build", "output": str(tmp_path / "out"),
                         "sampler": {"num_chains": 2, "num_draws": 4, "draws_per_block": 2},
                         "compute": compute})


def test_warmed_problem_is_taken_once(tmp_path):
    cfg = _linear_cfg(tmp_path)
    assert pipeline.warm_problem(cfg) >= 0.0
    warmed, _ = pipeline.materialize_problem(cfg, warmed=True)
    again, _ = pipeline.materialize_problem(cfg, warmed=True)  # the warmed one is gone: a fresh build
    plain, _ = pipeline.materialize_problem(cfg)
    assert warmed is not again and again is not plain
    for a, b in zip(warmed.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)  # the same problem either way
    # another config's chain never takes it
    pipeline.warm_problem(cfg)
    other = build_config(cfg.public_dict() | {"storage_options": {}, "problem_args": {"n": 7}})
    first_other, _ = pipeline.materialize_problem(other, warmed=True)
    assert len(first_other.train) == 7
    taken, _ = pipeline.materialize_problem(cfg, warmed=True)
    assert len(taken.train) != 7 and pipeline._problem_key(cfg) not in pipeline._WARMED


def _warmed_here() -> list:
    from bif.tasks import pipeline as p

    return sorted(k[0] for k in p._WARMED)


def test_cluster_in_background_warms_every_worker(tmp_path):
    """The warm task runs once on each worker before anything sent later; ``wait()`` gives the cluster."""
    from distributed import Client

    from bif.flows.runtime import cluster_in_background

    cfg = _linear_cfg(tmp_path)
    with cluster_in_background(cfg.compute, num_tasks=2, warm=lambda: pipeline.warm_problem(cfg)) as wait:
        cluster = wait()
        assert cluster.started_here
        with Client(cluster.address) as client:
            # the warm tasks were submitted before this one, pinned to their worker: they ran first there
            ran = client.gather([client.submit(_warmed_here, workers=[w], pure=False)
                                 for w in client.scheduler_info()["workers"]])
    assert ran == [["bif.examples.linear:build"], ["bif.examples.linear:build"]]


def test_cluster_in_background_joins_a_given_scheduler_without_warming_it(tmp_path):
    """With ``compute.address`` the cluster is someone else's: joined as it is, nothing warmed on it."""
    from distributed import Client, LocalCluster

    from bif.flows.runtime import cluster_in_background

    calls = []
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as plain:
        compute = ComputeConfig(address=plain.scheduler_address)
        with cluster_in_background(compute, num_tasks=2, warm=lambda: calls.append(1)) as wait:
            cluster = wait()
            assert (cluster.address, cluster.started_here, cluster.startup_seconds) == (plain.scheduler_address,
                                                                                       False, 0.0)
            with Client(cluster.address) as client:
                assert client.submit(lambda: 2 + 2).result() == 4
    assert calls == []


def test_bad_checkpoint_with_a_kept_server_exits_fast_and_leaves_no_worker_behind(tmp_path, user_prefect_home):
    """With the Prefect server already up, `bif run` starts its cluster beside the pre-flight. A bad checkpoint
    still fails with exit 2 and the pre-flight's message, and takes the starting cluster (forkserver and
    workers) with it: no process carrying this command's environment outlives it."""
    import subprocess
    import sys
    import time
    import uuid
    from pathlib import Path

    import psutil
    import yaml

    from bif.flows.prefect_server import ensure_server

    ensure_server(home=user_prefect_home, timeout=180, idle_timeout_s=900)  # up: the early path is taken
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"problem": "bif.examples.linear:build", "checkpoint": str(tmp_path / "bad.pt"),
                                   "output": str(tmp_path / "o")}))
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(user_prefect_home), "BIF_TEST_MARKER": marker}
    t0 = time.monotonic()
    proc = subprocess.run([str(Path(sys.executable).parent / "bif"), "run", str(cfg), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    secs = time.monotonic() - t0
    assert proc.returncode == 2 and "could not be loaded as a state dict" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and secs < 60, secs

    def carriers() -> list[int]:
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("BIF_TEST_MARKER") == marker:
                    found.append(p.pid)
            except psutil.Error:
                pass
        return found

    deadline = time.monotonic() + 10  # SIGKILLed children are reaped by init within moments
    while carriers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert carriers() == []
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_a_cluster_with_other_thread_settings_spawns_its_workers():
    """Thread pools size themselves when their library loads (in the forkserver): a cluster whose workers need
    other thread settings than the forkserver's gets spawned workers, with its own caps."""
    from distributed import Client

    from bif.flows.runtime import dask_cluster

    names = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")
    with dask_cluster(ComputeConfig(n_workers=1, threads_per_worker=1), num_tasks=1) as cluster, \
            Client(cluster.address) as client:
        (one,) = client.run(_env_of_worker, names).values()
    with dask_cluster(ComputeConfig(n_workers=1, threads_per_worker=2), num_tasks=1) as cluster, \
            Client(cluster.address) as client:
        (two,) = client.run(_env_of_worker, names).values()
        numba_threads = list(client.run(lambda: __import__("numba").config.NUMBA_NUM_THREADS).values())
    assert (one["OMP_NUM_THREADS"], one["NUMBA_NUM_THREADS"]) == ("1", "1")
    assert (two["OMP_NUM_THREADS"], two["NUMBA_NUM_THREADS"]) == ("2", "2") and numba_threads == [2]
    assert one["ppid"] != two["ppid"]  # the 2-thread worker was not forked from the 1-thread forkserver


def test_checking_the_forkserver_preload_imports_nothing():
    """The command checks which preload modules exist without importing them: find_spec on a dotted name
    would import its parents (arviz_stats.numba loads numba: ~3 s of a core in every `bif run`)."""
    import subprocess
    import sys

    code = ("import sys; from bif.flows.runtime import FORKSERVER_PRELOAD, _importable; "
            "before = set(sys.modules); "
            "ok = [_importable(m) for m in FORKSERVER_PRELOAD + ('bif.lm', 'no_such_package_bif.x')]; "
            "new = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('numba', 'arviz_stats', 'transformers')); "
            "print(ok[-1], all(ok[:-1]), new)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "[]"]


def test_the_forkservers_problem_modules_are_read_not_imported():
    """`bif run` starts the forkserver first (start_forkserver), before its own heavy imports. Finding which
    problem modules the forkserver should import must not import them here (torch and scikit-learn for digits:
    ~4 s of the command's core, which delayed the forkserver's start by as much)."""
    import subprocess
    import sys

    code = ("import sys; from bif.flows.runtime import problem_preload; "
            "print(problem_preload('bif.examples.digits:build'), problem_preload('bif.lm:build'), "
            "problem_preload('my_module:build'), problem_preload('bif.no_such_module:build'), "
            "sorted(m for m in ('torch', 'sklearn', 'transformers', 'bif.examples.digits') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ("('bif.examples.digits', 'sklearn.datasets') ('bif.lm', 'transformers.models.auto.modeling_auto', "
                   "'transformers.models.auto.tokenization_auto') () () []")


def test_the_flow_module_loads_no_frame_or_plot_library():
    """`bif run` imports the attribution flow on its way to the first draw, while the kept cluster's workers wait
    for its pre-flight; the flow's gates, report and covariance run on workers. Its import must not load pandas
    (0.2-0.5 s of the command's core, through bif.report and the store), matplotlib, xarray, zarr or torch."""
    import subprocess
    import sys

    code = ("import sys; import bif.flows.attribution, bif.flows.cli; "
            "print(sorted(m for m in ('pandas', 'matplotlib', 'xarray', 'zarr', 'torch', 'sklearn', 'dask.array', "
            "'great_expectations') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_a_fresh_worker_reads_parquet_tables_without_importing(tmp_path):
    """Every `bif run` forks new workers; the first ``pq.read_table`` in one (the gates' and the report's health
    files) loaded pyarrow.dataset and its shared libraries: 0.38 s of the worker's core in every run. The
    forkserver has it loaded, so a fresh worker's first read imports nothing."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), path)
    code = ("import sys\n"
            "from bif.config import ComputeConfig\n"
            "from bif.flows.runtime import dask_cluster\n"
            "def first_read(path):\n"
            "    before = set(sys.modules)\n"
            "    import pyarrow.parquet as pq\n"
            "    n = pq.read_table(path).num_rows\n"
            "    return n, sorted(m for m in set(sys.modules) - before if m.startswith('pyarrow'))\n"
            "if __name__ == '__main__':\n"
            "    from distributed import Client\n"
            "    with dask_cluster(ComputeConfig(n_workers=1), num_tasks=1) as cl, Client(cl.address) as client:\n"
            f"        print(client.submit(first_read, {str(path)!r}).result())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "BIF_WORKER_START"})
    assert out.stdout.strip().splitlines()[-1] == "(3, [])", out.stderr[-2000:]


def test_a_fresh_worker_starts_with_the_forkservers_objects_frozen_and_a_kept_ones_figure_drawn():
    """A forked worker inherits millions of objects from its forkserver; its first full garbage collection walked
    them all and copied their pages (0.4 s of a core in a profile of the report's first sections). The forkserver
    freezes them last (bif.flows.forkserver_ready). A kept cluster's forkserver also draws the report's warm-up
    figure (bif.flows.forkserver_warmup): a fresh worker's first figure took 0.76-0.91 s without it."""
    import subprocess
    import sys

    code = ("from bif.config import ComputeConfig\n"
            "from bif.flows.runtime import KEPT_PRELOAD, dask_cluster\n"
            "def state():\n"
            "    import gc, sys\n"
            "    return gc.get_freeze_count(), 'PIL.JpegImagePlugin' in sys.modules\n"
            "if __name__ == '__main__':\n"
            "    from distributed import Client\n"
            "    with dask_cluster(ComputeConfig(n_workers=1), num_tasks=1, warm_modules=KEPT_PRELOAD) as cl, \\\n"
            "            Client(cl.address) as client:\n"
            "        print(*client.submit(state, pure=False).result())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "BIF_WORKER_START"})
    frozen, plugins = out.stdout.strip().splitlines()[-1].split()
    assert int(frozen) > 100_000, out.stderr[-2000:]  # torch, Prefect, distributed, GE, matplotlib: millions
    # the warm-up figure was drawn and encoded there: Pillow loads all its image plugins at its first save (importing
    # matplotlib loads the PNG one only); matplotlib drops its font objects in a forked child itself, so they can't tell
    assert plugins == "True"


def test_start_forkserver_starts_the_clusters_forkserver_ahead_of_it():
    """The forkserver start_forkserver starts is the one the cluster's workers are forked from."""
    import subprocess
    import sys

    code = ("from multiprocessing import forkserver\n"
            "from bif.config import ComputeConfig\n"
            "from bif.flows.runtime import start_forkserver, dask_cluster\n"
            "if __name__ == '__main__':\n"
            "    c = ComputeConfig(n_workers=1)\n"
            "    assert start_forkserver(c)\n"
            "    pid = forkserver._forkserver._forkserver_pid\n"
            "    from distributed import Client\n"
            "    import os\n"
            "    with dask_cluster(c, num_tasks=1) as cl, Client(cl.address) as client:\n"
            "        (ppid,) = client.run(os.getppid).values()\n"
            "    print(pid is not None and ppid == pid)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]

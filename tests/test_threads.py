"""Thread pools that share a process with torch: numba's (the diagnostics' ArviZ backend) is capped.

numba's default OpenMP pool (one spinning thread per core) made later torch SGLD steps in the
same process 5-35x slower when every core was busy (``python -m benchmarks.numba_torch``). Dask workers started by
:mod:`bif.flows.runtime` get ``NUMBA_NUM_THREADS = threads_per_worker`` and
``OMP_WAIT_POLICY=PASSIVE``; in any other process :func:`bif.quality.diagnostics.rhat_ess`
caps numba at one thread unless ``NUMBA_NUM_THREADS`` is set.
"""
from __future__ import annotations

import os
import subprocess
import sys


from bif.config import ComputeConfig


def _worker_threads() -> dict:
    import os

    import numba
    import numpy as np

    from bif.quality.diagnostics import rhat_ess

    out = rhat_ess(np.random.default_rng(0).normal(size=(2, 40, 5)))
    env = {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                          "MALLOC_TRIM_THRESHOLD_")}
    return env | {"numba_threads": numba.get_num_threads(), "rhat_finite": bool(np.isfinite(out["rhat"]).all())}


def test_runtime_workers_cap_numba_and_let_openmp_threads_sleep(monkeypatch):
    from distributed import Client

    from bif.flows.runtime import dask_cluster

    # what a plain LocalCluster started earlier in this process leaves in os.environ (distributed's
    # nanny writes its pre-spawn environ into the parent): our workers must not inherit it
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")

    with dask_cluster(ComputeConfig(n_workers=1, threads_per_worker=1), num_tasks=1) as cluster, \
            Client(cluster.address) as client:
        (got,) = client.run(_worker_threads).values()
    assert got == {"NUMBA_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
                   "MALLOC_TRIM_THRESHOLD_": None, "numba_threads": 1, "rhat_finite": True}


def test_diagnostics_cap_numba_in_a_plain_process():
    code = ("import numpy as np, torch\n"
            "from bif.quality.diagnostics import rhat_ess\n"
            "r = rhat_ess(np.random.default_rng(0).normal(size=(2, 40, 5)))\n"
            "assert np.isfinite(r['rhat']).all()\n"
            "import numba\n"
            "print(numba.get_num_threads(), numba.config.NUMBA_NUM_THREADS)\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    # the pool itself is capped (NUMBA_NUM_THREADS), not only the threads a call uses
    assert plain.stdout.split() == ["1", "1"]

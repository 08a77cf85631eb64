"""Processes that load arviz-stats' numba backend at once leave a numba cache that works, and a cache broken before
is repaired (bif.quality.numba_backend).

numba issue #10128: when processes whose numba counters differ compile the same ``cache=True`` gufunc at once, the
cache can keep the kernel of one and the wrapper of another, and every later process that loads them segfaults in
its first call. Without the lock of bif.quality.numba_backend this test's processes crashed (rc -11) in each of
several runs: three of the four that imported at once and then every process that loaded the cache afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from bif.quality.diagnostics import rhat_ess
from bif.quality.numba_backend import CHECKED_FILE

#: A process: compile ``k`` numba functions first (as a Dask worker compiles the covariance kernels before its first
#: diagnostics: numba's per-process counter then differs between processes), say it is ready, wait for the signal,
#: then compute the diagnostics of a seeded trace and print its bulk ESS.
_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import numba
    import numpy as np
    k, folder = int(sys.argv[1]), Path(sys.argv[2])
    for i in range(k):
        numba.njit(lambda x, i=i: x + i)(1.0)
    (folder / f"ready{k}").touch()
    while not (folder / "go").exists():
        time.sleep(0.005)
    from bif.quality.diagnostics import rhat_ess
    rng = np.random.default_rng(7)
    print(json.dumps(rhat_ess(rng.normal(size=(4, 60, 50)).cumsum(axis=1))["ess_bulk"].tolist()))
""")


def _start(counts: list[int], folder: Path, env: dict[str, str]) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(k), str(folder)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in counts]
    deadline = time.monotonic() + 120
    while not all((folder / f"ready{k}").exists() for k in counts) and time.monotonic() < deadline:
        time.sleep(0.01)
    (folder / "go").touch()
    return procs


def test_processes_that_load_the_backend_at_once_leave_a_numba_cache_that_works(tmp_path):
    cache = tmp_path / "numba-cache"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "NUMBA_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    want = rhat_ess(np.random.default_rng(7).normal(size=(4, 60, 50)).cumsum(axis=1))["ess_bulk"].tolist()
    for stage, counts in enumerate(([0, 3, 6, 9], [1, 5])):  # four compile at once, then two load the cache
        folder = tmp_path / f"stage{stage}"
        folder.mkdir()
        for k, p in zip(counts, _start(counts, folder, env)):
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"stage {stage}, process {k}: rc {p.returncode}\n{err[-3000:]}"
            np.testing.assert_allclose(json.loads(out.strip().splitlines()[-1]), want, rtol=1e-12)
    # the processes did use this cache: geyer's kernel and its wrapper were written there, once each
    assert len(list(cache.rglob("diagnostics.geyer-*.nbc"))) == 1
    assert len(list(cache.rglob("guf-diagnostics.geyer-*.nbc"))) == 1


#: A process that uses arviz-stats' backend directly, as bif does not: compile ``k`` numba functions, import it, and
#: call ``geyer`` when told to.
_DIRECT = textwrap.dedent("""
    import sys
    import numba
    for i in range(int(sys.argv[1])):
        numba.njit(lambda x, i=i: x + i)(1.0)
    from arviz_stats.numba import diagnostics as d
    if sys.argv[2] == "call":
        import numpy as np
        print(d.geyer(np.arange(16.0).reshape(2, 8) ** 2, 0.0))
""")
_BIF = ("import json, numpy as np; from bif.quality.diagnostics import rhat_ess; "
        "print(json.dumps(rhat_ess(np.random.default_rng(7).normal(size=(4, 60, 50)).cumsum(axis=1))"
        "['ess_bulk'].tolist()))")


def test_a_cache_broken_before_is_repaired_by_the_first_bif_process(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"), "NUMBA_NUM_THREADS": "1"}

    def direct(k: int, what: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _DIRECT, str(k), what], env=env, capture_output=True,
                              text=True, timeout=300)

    # break the cache as two processes without the lock can: one's wrapper beside another's kernel
    assert direct(3, "import").returncode == 0
    folder = next((tmp_path / "numba-cache").rglob("guf-diagnostics.geyer-*.nbc")).parent
    for p in folder.glob("diagnostics.geyer-*"):
        p.unlink()
    assert direct(9, "import").returncode == 0
    assert direct(0, "call").returncode < 0  # broken: a process that loads it and calls geyer crashes

    bif = subprocess.run([sys.executable, "-c", _BIF], env=env, capture_output=True, text=True, timeout=300)
    assert bif.returncode == 0, bif.stderr[-3000:]
    want = rhat_ess(np.random.default_rng(7).normal(size=(4, 60, 50)).cumsum(axis=1))["ess_bulk"].tolist()
    np.testing.assert_allclose(json.loads(bif.stdout.strip().splitlines()[-1]), want, rtol=1e-12)
    assert "crashed a process that loaded it" in bif.stderr and "numba issue #10128" in bif.stderr

    assert direct(5, "call").returncode == 0  # repaired for every process, not only for bif's
    files = sorted(folder.glob("*diagnostics.geyer-*.nb[ci]"))
    assert len(files) == 4
    assert json.loads((folder / CHECKED_FILE).read_text()) == [
        [p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    # the next bif process trusts the checked pair: it neither checks nor rewrites it
    again = subprocess.run([sys.executable, "-c", _BIF], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "crashed" not in again.stderr
    assert [p.stat().st_mtime_ns for p in files] == [row[2] for row in json.loads((folder / CHECKED_FILE).read_text())]


#: A process that imports bif's backend, optionally after arviz-stats' package or with loading from the file broken,
#: and prints what it loaded and the diagnostics of a seeded trace.
_LOADED = textwrap.dedent("""
    import importlib.util, json, sys
    if sys.argv[1] == "package-first":
        import arviz_stats.numba
    if sys.argv[1] == "no-file-load":
        importlib.util.spec_from_file_location = lambda *a, **k: None
    import numpy as np
    from bif.quality.diagnostics import rhat_ess
    from bif.quality.numba_backend import azd
    package_loaded = "arviz_stats.numba" in sys.modules
    from arviz_stats.numba import diagnostics as through_package
    diag = rhat_ess(np.random.default_rng(7).normal(size=(4, 60, 50)).cumsum(axis=1))
    print(json.dumps({"file": azd.__file__, "same": through_package is azd, "package_loaded": package_loaded,
                      "array_loaded": package_loaded and "arviz_stats.numba.array" in sys.modules,
                      **{k: diag[k].tolist() for k in ("rhat", "ess_bulk", "ess_tail")}}))
""")


def test_the_backend_is_arviz_stats_own_module_loaded_without_its_package():
    """bif loads ``arviz_stats.numba.diagnostics`` from its file, not through ``arviz_stats.numba`` (whose
    ``__init__`` loads a parallel gufunc and scipy.signal that bif never uses: ~1.3 s of a core in every forkserver):
    the same file, one module object for both ways in, the same diagnostics as after the package's import, and the
    plain import when loading from the file fails."""
    import importlib.util

    def run(mode: str) -> dict:
        res = subprocess.run([sys.executable, "-c", _LOADED, mode], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    package_dir = Path(importlib.util.find_spec("arviz_stats").origin).parent
    direct, package_first, fallback = run("direct"), run("package-first"), run("no-file-load")
    assert direct["file"] == str(package_dir / "numba" / "diagnostics.py") == package_first["file"]
    assert direct["same"] and package_first["same"] and fallback["same"]
    assert not direct["package_loaded"] and not direct["array_loaded"]
    assert package_first["package_loaded"] and fallback["package_loaded"] and fallback["array_loaded"]
    for other in (package_first, fallback):
        for k in ("rhat", "ess_bulk", "ess_tail"):
            np.testing.assert_allclose(direct[k], other[k], rtol=1e-12)

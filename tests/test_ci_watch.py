"""tests/ci_watch.py in a real pytest run of its own (a subprocess on two xdist workers): the machine header, each
failure printed as it happens, and one suite deadline that stops every worker and fails the run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("BIF_SUITE_DEADLINE", "PYTEST_XDIST_WORKER",
                                                             "PYTEST_XDIST_TESTRUNUID", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_watch", "-p", "no:cacheprovider",
                           "-n", "2", "--dist", "loadfile", "-o", "addopts=", "--rootdir", str(folder), *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_the_header_each_failure_and_a_crash_print_before_the_summary(tmp_path):
    (tmp_path / "test_one.py").write_text(
        "import sys\n"
        "def test_fails():\n"
        "    print('what the test wrote to stderr', file=sys.stderr)\n"
        "    assert 1 + 1 == 3, 'arithmetic is broken'\n"
        "def test_passes():\n"
        "    pass\n"
        "def test_a_child_crashes():\n"  # a command whose process segfaults, as a Dask worker did in CI
        "    import subprocess\n"
        "    code = 'import ctypes\\ndef deep_inside():\\n    ctypes.string_at(0)\\ndeep_inside()'\n"
        "    r = subprocess.run([sys.executable, '-X', 'faulthandler', '-c', code], capture_output=True, text=True)\n"
        "    assert r.returncode == 0, 'lots of output\\n' * 50 + r.stderr + 'and more\\n' * 50\n")
    run = _pytest(tmp_path)
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    header = out.split("test session starts")[1].split("created:")[0]
    for line in ("machine: ", "cpu: ", "disk: ", "limits: ", "network: ", "python: ", "environment variables: "):
        assert line in header, line
    from benchmarks.machine import free_page_reporting, numpy_hugepage, pages

    assert f"pages: {pages(free_page_reporting(), numpy_hugepage())}" in header, header
    # the failure line comes before pytest's own FAILURES section, with the error and the test's stderr
    now = out.index("FAILED test_one.py::test_fails: AssertionError: arithmetic is broken")
    assert now < out.index("= FAILURES =")
    assert "what the test wrote to stderr" in out[now:out.index("= FAILURES =")]
    # a crashed child's stack (faulthandler) is printed at once too, even when its output is long
    crash = out.index("--- a crashed process's stack (faulthandler)")
    assert crash < out.index("= FAILURES =") and "in deep_inside" in out[crash:out.index("= FAILURES =")]
    assert "2 failed, 1 passed" in out


def test_the_suite_deadline_stops_every_worker_and_fails_the_run(tmp_path):
    for name in ("a", "b"):  # two files: one per worker, each far longer than the deadline
        (tmp_path / f"test_{name}.py").write_text(
            "import time\n" + "".join(f"def test_{i}():\n    time.sleep(0.5)\n" for i in range(40)))
    run = _pytest(tmp_path, "--suite-deadline=3")
    out = run.stdout
    assert run.returncode != 0, out + run.stderr
    assert "suite deadline passed" in out, out
    ran = int(out.rsplit(" passed", 1)[0].rsplit(" ", 1)[1])
    assert 2 <= ran < 40, out  # both workers stopped after the tests in hand, long before their 20 s of tests
    assert "suite deadline: " in out  # the header says when

"""What a test run prints so that a CI log names its trouble, and the deadline that makes it end with a summary.

tests/conftest.py imports these hooks (a ``pytest_plugins`` list is refused in a conftest below the rootdir).

- **The machine, in the header** (:func:`pytest_report_header`): architecture, cores, memory, how the kernel
  handles free pages (benchmarks/machine.py), free disk of the temporary folder, the repository and /dev/shm, the
  process limits, cgroup limits, whether this host's name resolves and loopback TCP connects, the versions of the
  compiled stack, and the *names* of the environment's variables (never their values: they may hold credentials).
  A CI run that fails on its machine and not on ours (stop 34: failures from the first tests and a segmentation
  fault, and no test named) then says how the two differ.
- **Each failure as it happens** (:func:`pytest_runtest_logreport`): one line per failed or erroring test, with
  its error, printed at once; the first :data:`DETAILED_FAILURES` also print the end of their traceback. A log
  cut to its head and tail keeps the first failures, which the end-of-run summary would print only at the end.
- **A deadline for the whole suite** (``--suite-deadline SECONDS``): the controller writes the absolute time into
  :data:`DEADLINE_ENV` before pytest-xdist starts its workers; every worker, a replacement of a crashed worker
  included, inherits it. A worker past it stops after the test in hand, and the run ends with its summary and a
  non-zero status. (pytest-timeout's ``--session-timeout`` counts from each worker's own start: a worker that
  replaces a crashed one starts its clock again, so stop 34's run went on until CI's own limit killed it.)
"""
from __future__ import annotations

import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

#: Environment variable holding the suite's deadline (seconds since the epoch), set by the controller.
DEADLINE_ENV = "BIF_SUITE_DEADLINE"
#: Failures that also print the end of their traceback at once (later ones print one line each).
DETAILED_FAILURES = 5
#: Lines of a detailed failure's traceback printed at once (its end: the error and where it was raised).
DETAILED_LINES = 25
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def pytest_addoption(parser):
    parser.addoption("--suite-deadline", type=float, default=None, metavar="SECONDS",
                     help="stop the whole run, xdist workers and their replacements included, once SECONDS have "
                          "passed since it started; the run then ends with its summary and a non-zero status "
                          "(tests/ci_watch.py)")


def pytest_configure(config):
    seconds = config.getoption("suite_deadline", None)
    if seconds and not _WORKER and DEADLINE_ENV not in os.environ:
        os.environ[DEADLINE_ENV] = repr(time.time() + seconds)  # the workers start after this and inherit it


def suite_deadline() -> float | None:
    """The run's deadline (seconds since the epoch), or None when the run has none."""
    value = os.environ.get(DEADLINE_ENV)
    return float(value) if value else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    deadline = suite_deadline()
    if deadline is not None and time.time() > deadline:
        item.session.shouldfail = (f"suite deadline passed ({DEADLINE_ENV}, --suite-deadline): the run stops "
                                   "after the tests in hand")


# ---------------------------------------------------------------- the machine, in the header

def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def _meminfo() -> str:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        total, avail = (int(fields[k].split()[0]) * 1024 for k in ("MemTotal", "MemAvailable"))
        return f"memory {_gib(total)}, {_gib(avail)} available"
    except (OSError, KeyError, ValueError) as err:
        return f"memory unknown ({type(err).__name__})"


def _pages() -> str:
    """Whether the kernel hands free memory back to a hypervisor (free page reporting) and numpy asks for huge
    pages: together they can make new arrays slow to fill after an idle gap (benchmarks/machine.py, whose functions
    this reads; loaded from its file, as this plugin also runs in folders outside the repository)."""
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location("_bif_machine", Path(__file__).resolve().parents[1] /
                                                      "benchmarks" / "machine.py")
        machine = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(machine)
        fpr, huge = machine.free_page_reporting(), machine.numpy_hugepage()
    except Exception as err:  # noqa: BLE001 - the header must never fail the run
        return f"pages: unknown ({type(err).__name__})"
    return f"pages: {machine.pages(fpr, huge)}"


def _free(path: str | Path) -> str:
    try:
        usage = shutil.disk_usage(path)
        return f"{path} {_gib(usage.free)} free of {_gib(usage.total)}"
    except OSError as err:
        return f"{path} ({type(err).__name__}: {err})"


def _limits() -> str:
    parts = []
    for name in ("NOFILE", "NPROC", "STACK", "AS", "MEMLOCK"):
        soft, hard = resource.getrlimit(getattr(resource, f"RLIMIT_{name}"))
        parts.append(f"{name.lower()} {'unlimited' if soft == resource.RLIM_INFINITY else soft}"
                     + ("" if hard == soft else f"/{'unlimited' if hard == resource.RLIM_INFINITY else hard}"))
    return ", ".join(parts)


def _cgroup() -> str:
    parts = []
    for name in ("memory.max", "cpu.max", "pids.max"):
        try:
            parts.append(f"{name} {Path('/sys/fs/cgroup', name).read_text().strip()}")
        except OSError:
            pass
    return ", ".join(parts) or "none read"


def _network() -> str:
    host = socket.gethostname()
    try:
        resolved = socket.gethostbyname(host)
    except OSError as err:
        resolved = f"does not resolve ({type(err).__name__}: {err})"
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            with socket.create_connection(server.getsockname(), timeout=5):
                pass
        loopback = "connects"
    except OSError as err:
        loopback = f"fails ({type(err).__name__}: {err})"
    return f"host {host!r} -> {resolved}; loopback TCP {loopback}"


def _versions() -> str:
    from importlib import metadata

    parts = []
    for dist in ("torch", "numpy", "numba", "llvmlite", "scipy", "pyarrow", "distributed", "prefect", "zarr"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} missing")
    return ", ".join(parts)


#: Prefixes of environment variables whose values the header prints: settings of the compiled stack, never secrets.
SHOWN_VALUES = ("OPENBLAS_", "OMP_", "MKL_", "NUMBA_", "NUMEXPR_", "MALLOC_", "LD_", "PYTHON", "DASK_", "CI")


def _cpu() -> str:
    model, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "?":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wide = " ".join(sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "avx_vnni")))
    try:
        import llvmlite.binding as llvm

        jit = f"numba's target {llvm.get_host_cpu_name()}"
    except Exception as err:  # noqa: BLE001 - a header line, whatever goes wrong
        jit = f"numba's target unknown ({type(err).__name__})"
    return f"cpu: {model}; {jit}; {wide or 'no avx2/avx512 flags'}"


def machine_lines(repo: Path) -> list[str]:
    """The header lines that describe this machine (environment values only for :data:`SHOWN_VALUES`)."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    names = " ".join(sorted(os.environ))
    shown = " ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith(SHOWN_VALUES))
    return [
        f"machine: {platform.machine()}, {platform.platform()}, {os.cpu_count()} cpus "
        f"({len(os.sched_getaffinity(0))} usable), load {load}, {_meminfo()}, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        _cpu(),
        f"disk: {_free(tempfile.gettempdir())}; {_free(repo)}; {_free('/dev/shm')}",
        _pages(),
        f"limits: {_limits()}; cgroup: {_cgroup()}",
        f"network: {_network()}",
        f"python: {sys.executable} {platform.python_version()}; {_versions()}",
        f"environment variables: {names}",
        f"values: {shown or '(none of ' + ', '.join(SHOWN_VALUES) + ')'}",
    ]


def pytest_report_header(config):
    if _WORKER:
        return None
    lines = machine_lines(Path(str(config.rootpath)))
    deadline = suite_deadline()
    if deadline is not None:
        lines.append(f"suite deadline: {time.strftime('%H:%M:%S UTC', time.gmtime(deadline))} "
                     f"({deadline - time.time():.0f} s from now)")
    return lines


# ---------------------------------------------------------------- each failure as it happens

_failures_seen = 0
_terminal = None  # pytest's terminal reporter, once the session starts (pytest_sessionstart)


def _error_of(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return f"{crash.message.splitlines()[0] if crash.message else ''} ({Path(crash.path).name}:{crash.lineno})"
    text = str(report.longrepr).strip().splitlines()
    return text[-1] if text else "(no message)"


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    """Print a failed or erroring test at once (the controller of an xdist run, or the only process)."""
    global _failures_seen
    if _WORKER or not report.failed:
        return
    terminal = _terminal
    if terminal is None:  # a report before the session started: pytest prints it itself
        return
    _failures_seen += 1
    where = getattr(report, "node", None)
    worker = f"[{where.gateway.id}] " if where is not None else ""
    kind = {"call": "FAILED", "setup": "ERROR at setup", "teardown": "ERROR at teardown"}.get(report.when, "CRASHED")
    terminal.write_line(f"{worker}{kind} {report.nodeid}: {_error_of(report)[:400]}", red=True)
    if _failures_seen <= DETAILED_FAILURES:
        text = str(report.longrepr).rstrip().splitlines()[-DETAILED_LINES:]
        for title, content in report.sections:  # what the test printed: a subprocess's stderr, a worker's crash
            if "stderr" in title or "stdout" in title:
                text += [f"--- {title} (its end)", *content.rstrip().splitlines()[-DETAILED_LINES:]]
        for line in text:
            terminal.write_line(f"    {line[:300]}")
    for line in _crash_stack("\n".join([str(report.longrepr), *(c for _, c in report.sections)])):
        terminal.write_line(f"    {line[:300]}")


#: Crashes (a segmentation fault, an abort) whose stack :func:`pytest_runtest_logreport` still prints at once.
CRASH_STACKS = 3
_crash_stacks_seen = 0


def _crash_stack(text: str) -> list[str]:
    """The crashing thread's stack of the first "Fatal Python error" in ``text`` (PYTHONFAULTHANDLER's dump of a
    crashed process, e.g. a Dask worker's, in a command's stderr), for the first :data:`CRASH_STACKS` crashes."""
    global _crash_stacks_seen
    at = text.find("Fatal Python error")
    if at < 0 or _crash_stacks_seen >= CRASH_STACKS:
        return []
    _crash_stacks_seen += 1
    lines = text[at:].splitlines()
    current = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("Current thread")), None)
    stack = lines[current:current + 16] if current is not None else lines[1:16]
    extensions = [ln for ln in lines if ln.lstrip().startswith("Extension modules")][:1]
    return ["--- a crashed process's stack (faulthandler)", lines[0], *stack, *extensions]


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    global _terminal
    _terminal = session.config.pluginmanager.get_plugin("terminalreporter")

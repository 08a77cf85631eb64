"""How this machine's fresh memory behaves: what a benchmark records beside its cores and versions.

    python -m benchmarks.machine        # prints the probe's JSON (~5 s)

On a virtual machine whose balloon device reports free memory to the hypervisor (virtio-balloon's free page
reporting), the kernel hands 2 MiB blocks that stayed free for 2 s back to the host. numpy asks for transparent
huge pages for its large arrays (``madvise``), and a huge page made of such a block is backed again by the host when
it is first touched. On the 2-core machine of session 40 that made 160 MiB of new numpy arrays take 1.1-1.8 s to
fill after 3 s idle, against 20-50 ms right after the same memory was freed and 87-130 ms with 4 KiB pages
(``NUMPY_MADVISE_HUGEPAGE=0``): an allocation after an idle gap, such as a benchmark's first GEMM of a series, costs
up to 50 times what the next one does. The same machine measured 0.17-0.37 s for one cold GEMM of the 20k shape in
session 32 and 0.72-1.07 s in session 40. Figures from machines whose probes differ do not compare; ratios within
one run still do.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

#: virtio-balloon's feature bit for free page reporting (VIRTIO_BALLOON_F_REPORTING in linux/virtio_balloon.h)
VIRTIO_BALLOON_F_REPORTING = 5
_BALLOON = Path("/sys/bus/virtio/drivers/virtio_balloon")
_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's model name (``/proc/cpuinfo``), or None where that file is absent: float results that are
    deterministic on one machine (the tiny LM's LDS) differ between CPU models, and so do their timings."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def free_page_reporting(balloon: Path = _BALLOON, order_file: Path = _ORDER) -> dict | None:
    """The balloon device that reports free memory to the hypervisor and the size of the blocks it reports, or None
    when no bound virtio-balloon device negotiated free page reporting (not Linux, no balloon, the feature off)."""
    try:
        devices = sorted(balloon.glob("virtio*"))
    except OSError:
        return None
    for dev in devices:
        try:
            bits = (dev / "features").read_text().strip()
        except OSError:
            continue
        if len(bits) > VIRTIO_BALLOON_F_REPORTING and bits[VIRTIO_BALLOON_F_REPORTING] == "1":
            try:
                order = int(order_file.read_text().strip())
            except (OSError, ValueError):
                order = None
            return {"device": dev.name, "order": order,
                    "block_mib": (4096 << order) / 2**20 if order is not None else None}
    return None


def _fill_ms(nbytes: int) -> float:
    """Milliseconds to allocate a new float64 numpy array of ``nbytes`` and fill it (every page touched)."""
    import numpy as np

    t = time.perf_counter()
    a = np.empty(nbytes // 8)
    a.fill(1.0)
    ms = 1e3 * (time.perf_counter() - t)
    del a
    return ms


def numpy_hugepage() -> bool | None:
    """Whether numpy asks for transparent huge pages for its large arrays (``NUMPY_MADVISE_HUGEPAGE``)."""
    try:
        from numpy._core.multiarray import _get_madvise_hugepage
    except ImportError:  # numpy < 2
        try:
            from numpy.core.multiarray import _get_madvise_hugepage
        except ImportError:
            return None
    return bool(_get_madvise_hugepage())


def memory_probe(mib: int = 160, idle_s: float = 3.0) -> dict:
    """Fill new numpy arrays of ``mib`` MiB: three times in a row (the best is ``fill_hot_ms``: memory this process
    freed a moment ago), then after ``idle_s`` seconds idle (``fill_after_idle_ms``: longer than the 2 s after which
    a reporting kernel hands free blocks to the hypervisor). Also says whether the kernel reports free memory
    (:func:`free_page_reporting`) and whether numpy asks for huge pages. Takes ``idle_s`` plus ~1-2 s."""
    nbytes = mib << 20
    hot = [_fill_ms(nbytes) for _ in range(3)]
    time.sleep(idle_s)
    cold = _fill_ms(nbytes)
    return {"fill_mib": mib, "fill_hot_ms": min(hot), "fill_first_ms": hot[0], "idle_s": idle_s,
            "fill_after_idle_ms": cold, "after_idle_vs_hot": cold / min(hot),
            "free_page_reporting": free_page_reporting(), "numpy_madvise_hugepage": numpy_hugepage()}


def pages(fpr: dict | None, huge: bool | None) -> str:
    """How the kernel handles free pages, in words: :func:`free_page_reporting`'s result and :func:`numpy_hugepage`'s
    (e.g. "free page reporting on (virtio0, 2 MiB blocks); numpy huge pages on"). The benchmarks' tables and the CI
    log's header print it."""
    reporting = (f"free page reporting on ({fpr['device']}, {fpr['block_mib']:g} MiB blocks)" if fpr and
                 fpr.get("block_mib") else "free page reporting on" if fpr else "no free page reporting")
    return f"{reporting}; numpy huge pages {'on' if huge else 'off'}"


def describe(probe: dict) -> str:
    """One line for a benchmark's table: the fills, and what they mean when the idle one is much slower."""
    line = (f"{probe['fill_mib']} MiB of new numpy arrays filled in {probe['fill_hot_ms']:.0f} ms, "
            f"{probe['fill_after_idle_ms']:.0f} ms after {probe['idle_s']:g} s idle "
            f"({probe['after_idle_vs_hot']:.0f}x; "
            f"{pages(probe.get('free_page_reporting'), probe.get('numpy_madvise_hugepage'))})")
    if probe["after_idle_vs_hot"] >= 5:
        line += ": a timing that allocates after an idle gap is inflated here (benchmarks/machine.py)"
    return line


class PartProbes:
    """The probe before each timed part of a benchmark: the machine's state moves from minute to minute (in session
    40 the ratio went between 0.8x and 75x from one probe to the next, a minute or two apart), so one probe at the
    start does not speak for the parts after it.

    ``machine`` is the benchmark's ``machine`` record: the first probe goes to ``machine["memory"]``, and every part's
    to ``machine["memory_before"][part]``. ``say``: the benchmark's progress line, told before each probe."""

    def __init__(self, machine: dict, *, idle_s: float = 3.0, say: Callable[[str], None] | None = None):
        self.machine, self.idle_s, self.say = machine, idle_s, say

    def before(self, part: str) -> dict:
        if self.say is not None:
            self.say(f"machine: how its fresh memory behaves before the {part} part (benchmarks/machine.py)")
        probe = memory_probe(idle_s=self.idle_s)
        self.machine.setdefault("memory", probe)
        self.machine.setdefault("memory_before", {})[part] = probe
        return probe


def describe_parts(machine: dict) -> str:
    """The first probe's line (:func:`describe`), then each part's idle-to-hot ratio, and a warning when any part's
    is 5x or more."""
    probe = machine["memory"]
    parts = machine.get("memory_before") or {}
    line = describe(probe)
    if parts:
        line += "; after idle vs at once, before each part: " + ", ".join(
            f"{part} {p['after_idle_vs_hot']:.1f}x" for part, p in parts.items())
        if any(p["after_idle_vs_hot"] >= 5 for p in parts.values()) and probe["after_idle_vs_hot"] < 5:
            line += ": a timing that allocates after an idle gap is inflated in that part (benchmarks/machine.py)"
    return line


if __name__ == "__main__":
    print(json.dumps(memory_probe(), indent=1))

"""Data-quality gates over a finished run directory, and their report.

No Prefect imports; GE is imported lazily. The suites live in :mod:`bif.quality.gates` (see
there for the list of gates); :func:`run_gates` runs them over ``<output>``: trace blocks
through per-block aggregates (or row by row with ``trace_rows=True``), the health table,
and ``bif.zarr`` through Dask-computed chunk aggregates, the reads side by side while GE validates in the
calling thread. It saves GE's results as
``<output>/quality/{traces,health,results}.json``, GE's offline Markdown rendering as
``*.md`` (GE's HTML Data Docs load CSS/JS from CDNs, so they are not written), our
``summary.json``, and returns a :class:`QualityReport`.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from bif import schema as S
from bif.errors import QualityError
from bif.quality.aggregates import trace_file_stats
from bif.quality.expectations import GateResult
from bif.quality.gates import (GATES, RunSizes, block_draws, check_health, check_results, check_trace_block,
                               check_trace_chains, check_trace_stats, results_aggregates, validate_results)

if TYPE_CHECKING:
    import xarray as xr

    from bif.config import RunConfig
    from bif.store.run import BlockRef, RunStore

__all__ = ["GATES", "GateResult", "QualityReport", "RunSizes", "check_trace_block", "check_trace_stats", "check_trace_chains",
           "check_health", "check_results", "run_gates"]

_MAX_SUMMARY_LINES = 20


@dataclass(frozen=True)
class QualityReport:
    """All gate results of a run; ``failed`` holds failed 'error' gates, ``warnings`` failed 'warning' gates."""

    results: tuple[GateResult, ...]
    failed: tuple[GateResult, ...]
    warnings: tuple[GateResult, ...]
    elapsed_s: float = 0.0
    #: {"train": {"count", "total", "share"}, "query": {...}} of constant loss traces (None: no flags in bif.zarr)
    constant_traces: Mapping[str, Mapping[str, float | int]] | None = None

    @classmethod
    def from_results(cls, results: Sequence[GateResult], *, elapsed_s: float = 0.0,
                     constant_traces: Mapping[str, Mapping[str, float | int]] | None = None) -> "QualityReport":
        res = tuple(results)
        return cls(results=res, failed=tuple(r for r in res if not r.success and r.severity == "error"),
                   warnings=tuple(r for r in res if not r.success and r.severity == "warning"), elapsed_s=elapsed_s,
                   constant_traces=constant_traces)

    @property
    def passed(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        """One line per failed expectation: gate, expectation, and the offending chain / draw / sample."""
        n_ok = sum(r.success for r in self.results)
        head = (f"quality gates {'passed' if self.passed else 'FAILED'}: {len(self.failed)} failed, "
                f"{len(self.warnings)} warnings, {n_ok} of {len(self.results)} expectations met")
        lines = [head]
        for label, items in (("FAILED", self.failed), ("WARNING", self.warnings)):
            for r in items[:_MAX_SUMMARY_LINES]:
                lines.append(f"  {label} {r.gate} [{r.expectation}]: {r.detail}")
            if len(items) > _MAX_SUMMARY_LINES:
                lines.append(f"  ... and {len(items) - _MAX_SUMMARY_LINES} more {label.lower()} expectations")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise :class:`bif.errors.QualityError` with :meth:`summary` if an 'error' gate failed."""
        if self.failed:
            raise QualityError(self.summary() + "\nInspect <output>/quality/, fix the sampler settings, or set "
                               "quality.severity.<gate>: warning (or --allow-warnings) to accept the run.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the manifest and ``quality/summary.json``."""
        return {"passed": self.passed, "elapsed_s": round(self.elapsed_s, 3),
                "num_expectations": len(self.results), "failed": [r.to_dict() for r in self.failed],
                "warnings": [r.to_dict() for r in self.warnings],
                "constant_traces": ({k: dict(v) for k, v in self.constant_traces.items()}
                                    if self.constant_traces is not None else None)}


# --- a whole run ------------------------------------------------------------------------------------
def _trace_stats(ref: "BlockRef", *, store: "RunStore", draws_per_block: int, num_draws: int,
                 **kw: Any) -> dict[str, Any]:
    """Aggregates of one committed trace block ``ref``; picklable for Dask."""
    d0 = ref.block * draws_per_block
    nd = max(0, min(draws_per_block, num_draws - d0))
    return trace_file_stats(store.fs, ref.path, chain=ref.chain, block=ref.block, draw_start=d0, num_draws=nd, **kw)


def run_gates(output_uri: str, storage_options: Mapping[str, Any] | None, config: "RunConfig", *, n_train: int,
              n_query: int, loss_bounds: tuple[float, float], query_is_train: bool = False,
              allow_warnings: bool | None = None, trace_rows: bool = False,
              map_fn: Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]] = map) -> QualityReport:
    """Run every gate over the run at ``output_uri``; save ``quality/*.json`` / ``*.md`` and return the report.

    Trace files are reduced to aggregates one at a time through ``map_fn`` (``map``; pass
    e.g. ``lambda f, xs: client.gather(client.map(f, list(xs)))`` to spread them over Dask
    workers), then GE validates one row per file. ``trace_rows=True`` instead runs GE on
    every row of every block (about 1.4 us a row: thorough, for small runs). ``allow_warnings``
    (default ``config.quality.allow_warnings``) turns every failure into a warning.
    """
    from functools import partial

    from bif.store.run import RunStore

    t0 = time.perf_counter()
    q, smp = config.quality, config.sampler
    kw = {"allow_warnings": allow_warnings}
    sizes = RunSizes(n_train=n_train, n_query=n_query, loss_bounds=loss_bounds, query_is_train=query_is_train)
    store = RunStore(output_uri, storage_options or {})
    files = store.blocks(num_chains=smp.num_chains)
    raws: dict[str, list[dict[str, Any]]] = {"traces": [], "health": [], "results": []}
    results: list[GateResult] = []

    def draws(block: int) -> tuple[int, int]:  # (draw_start, expected draws) of a block
        return block_draws(smp, block)

    # the reads run beside the GE work of this thread: the trace aggregates on map_fn's workers and bif.zarr's
    # chunk aggregates (Dask) in their own threads, while the health table is read and validated here; the
    # results keep the order of the gates (traces, health, results), computed sequentially before (0.98-1.18 s
    # at 50k x 500 x 200 draws on 2 workers, of which 0.44-0.54 s GE's own work in this thread)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="bif-gates") as pool:
        stats = None
        if not trace_rows:
            job = partial(_trace_stats, store=store, draws_per_block=smp.draws_per_block, num_draws=smp.num_draws,
                          n_train=n_train, n_query=n_query, loss_bounds=loss_bounds, loss_dtype=smp.trace_dtype)
            stats = pool.submit(lambda: pd.DataFrame(list(map_fn(job, files))))
        aggregates = pool.submit(lambda: results_aggregates(_open_results(store), sizes))

        # the health file of every committed block (written before its trace file)
        health = store.read_health(files)
        if health is None:
            health = pd.DataFrame({c: [] for c in S.HEALTH_COLUMNS})
        health_results = check_health(health, q, smp, ge_results=raws["health"], **kw)

        if trace_rows:
            for ref in files:
                results += check_trace_block(store.read_trace_table(ref).to_pandas(), q, smp, sizes=sizes,
                                             chain=ref.chain, block=ref.block, ge_results=raws["traces"], **kw)
        else:
            results += check_trace_stats(stats.result(), q, ge_results=raws["traces"], **kw)
        # committed blocks per chain (the block gates above check what each block holds)
        blocks = pd.DataFrame([{S.CHAIN: r.chain, "block": r.block, "num_draws": draws(r.block)[1]} for r in files])
        results += check_trace_chains(blocks, q, smp, ge_results=raws["traces"], **kw)
        results += health_results

        agg = aggregates.result()
        results += validate_results(agg, q, sizes=sizes, ge_results=raws["results"], **kw)

    report = QualityReport.from_results(results, elapsed_s=time.perf_counter() - t0,
                                        constant_traces=agg.constant_counts)
    for group, items in raws.items():
        markdown = [r.pop("markdown", None) for r in items]
        store.write_quality_json(f"{group}.json", {"validation_results": items})
        text = "\n\n".join(m for m in markdown if m) or (
            f"# {group}\n\nAll {len(items)} {group} suites passed (GE's Markdown is rendered for failed suites "
            "only; every result is in the JSON file beside this one).\n")
        store.write_quality_text(f"{group}.md", text)
    store.write_quality_json(S.QUALITY_SUMMARY_FILE, report.to_dict() | {"summary": report.summary()})
    return report


def _open_results(store: "RunStore") -> "xr.Dataset":
    """bif.zarr as a Dask-backed Dataset; an empty Dataset when it is missing (results_shape then fails)."""
    import xarray as xr

    try:
        ds = store.open_bif()
    except (FileNotFoundError, KeyError, ValueError, OSError):
        ds = None
    return xr.Dataset() if ds is None else ds

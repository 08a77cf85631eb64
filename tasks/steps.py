"""Prefect tasks: each loads its inputs, calls one function of ``bif.tasks.pipeline``, returns its result.

No arithmetic here. Chain tasks retry once on errors that are not the user's (a lost
worker, a storage hiccup); the retry resumes from the last committed block.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from bif.config import RunConfig
from bif.errors import BifError, StorageError
from bif.tasks import pipeline

PROGRESS_TOPIC = "bif-progress"


def _is_transient(task, task_run, state) -> bool:
    """Retry unless the failure is a domain error (bad config, diverged chain, ...); storage errors retry."""
    try:
        state.result()
    except StorageError:
        return True
    except BifError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


class _DaskProgress:
    """Sends (chain, draws_done, num_draws) to the client as Dask worker events, at most every 0.5 s."""

    def __init__(self) -> None:
        self.last = 0.0
        try:
            from distributed import get_worker

            self.worker = get_worker()
        except (ImportError, ValueError):
            self.worker = None

    def __call__(self, chain: int, done: int, total: int) -> None:
        now = time.monotonic()
        if self.worker is None or (done < total and now - self.last < 0.5):
            return
        self.last = now
        self.worker.log_event(PROGRESS_TOPIC, {"chain": chain, "done": done, "total": total})


@task(name="prepare-run", cache_policy=NO_CACHE)
def prepare(cfg: RunConfig) -> pipeline.RunInfo:
    return pipeline.prepare_run(cfg)


@task(name="sample-chain", task_run_name="sample-chain-{chain}", cache_policy=NO_CACHE, retries=1,
      retry_delay_seconds=1, retry_condition_fn=_is_transient)
def sample_chain(cfg: RunConfig, chain: int, ref_train_loss_mean: float) -> pipeline.ChainResult:
    return pipeline.run_chain(cfg, chain, ref_train_loss_mean=ref_train_loss_mean, progress=_DaskProgress())


@task(name="check-traces", cache_policy=NO_CACHE)
def check_traces(cfg: RunConfig) -> None:
    pipeline.check_traces_complete(cfg)


def _mapper(client: Any, priority: int = 0, *, batched: bool = False):
    """``map(f, xs)`` over the Dask workers of ``client`` (results in order); ``priority``: Dask's (higher first).

    ``batched``: for many short calls (the gates' few-ms aggregate per trace file), ``xs`` goes out in about
    two batches per worker, one task each, instead of one task per item: each task costs the scheduler, the
    worker and this client a few ms of CPU, which the items themselves do not amortize on a small run.
    """
    def run(f: Callable, xs: Iterable[Any]) -> list[Any]:
        items = list(xs)
        if not batched or len(items) <= 1:
            return client.gather(client.map(f, items, priority=priority))
        from bif.tasks.covariance import _slots, even_batches

        batches = even_batches(items, 2 * _slots(client, None))
        return [r for out in client.gather(client.map(partial(_each, f), batches, priority=priority)) for r in out]

    return run


def _each(f: Callable, batch: Sequence[Any]) -> list[Any]:
    """``[f(x) for x in batch]``: one Dask task for a batch of :func:`_mapper`'s items."""
    return [f(x) for x in batch]


@task(name="reduce-covariance", cache_policy=NO_CACHE)
def reduce_covariance(cfg: RunConfig, info: pipeline.RunInfo, scheduler_address: str | None = None) -> Any:
    """The covariance reduction. Sent to a Dask worker (``scheduler_address`` None), it submits its blocks from
    there (``worker_client``: the task leaves its thread to them meanwhile), and xarray, zarr and dask.array
    load in the worker, where a kept cluster's forkserver has imported them, not in the command."""
    from distributed import Client, worker_client

    def run(client: Any) -> Any:
        return pipeline.reduce_covariance(cfg, info, client=client,
                                          progress=lambda stage, done, total: client.log_event(
                                              PROGRESS_TOPIC, {"stage": stage, "done": done, "total": total}))

    if scheduler_address is None:
        with worker_client() as client:
            return run(client)
    with Client(scheduler_address, set_as_default=False) as client:
        return run(client)


@task(name="quality-gates", cache_policy=NO_CACHE)
def quality_gates(cfg: RunConfig, info: pipeline.RunInfo, scheduler_address: str | None = None) -> Any:
    """The quality gates. Sent to a Dask worker (``scheduler_address`` None), they spread their trace reads over
    the cluster from there (``worker_client``: the task leaves its thread to the reads meanwhile), and
    great_expectations loads in the worker, where the forkserver has imported it, not in the command."""
    from distributed import Client, worker_client

    if scheduler_address is None:
        with worker_client() as client:
            return pipeline.quality_gates(cfg, info, map_fn=_mapper(client, batched=True))
    with Client(scheduler_address, set_as_default=False) as client:
        return pipeline.quality_gates(cfg, info, map_fn=_mapper(client, batched=True))


@task(name="diagnostics", cache_policy=NO_CACHE)
def diagnostics(cfg: RunConfig, scheduler_address: str) -> dict[str, Any]:
    from distributed import Client

    with Client(scheduler_address, set_as_default=False) as client:
        # below the covariance's blocks, which run beside them, and what waits on those (gates, report sections)
        return pipeline.diagnostics(cfg, map_fn=_mapper(client, priority=-1))


@task(name="report", cache_policy=NO_CACHE)
def report(cfg: RunConfig, status: str | None = None, prebuilt: dict[str, str] | None = None) -> str:
    return pipeline.report(cfg, status=status, prebuilt=prebuilt)


@task(name="report-sections", cache_policy=NO_CACHE)
def report_sections(cfg: RunConfig, titles: tuple[str, ...] | None = None) -> dict[str, str]:
    """Report sections drawn ahead of the report (a Dask task): by default those that read neither the gates'
    nor the diagnostics' outputs, which run beside the checks; ``titles`` picks others (the diagnostics'
    section, once they are written)."""
    _leave_worker_slot()  # a long task of its own: the gates' reads queued after it run at once beside it
    return pipeline.report_sections(cfg, titles=titles)


def _leave_worker_slot() -> None:
    """On a Dask worker, leave its thread pool (``distributed.secede``) for the rest of this task, so that the
    worker starts its next queued task now instead of after this one (the OS then shares the core between them).
    Measured on the digits run: the gates' trace reads waited 0.5 s behind the report's early sections."""
    from distributed import secede
    from distributed.worker import get_worker

    try:
        get_worker()
    except ValueError:
        return
    secede()


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(cfg: RunConfig, status: str | None = None) -> None:
    """The run summary and the top-k table as Prefect artifacts (visible in the Prefect UI)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from bif.report import markdown_summary, topk_records

    create_markdown_artifact(markdown=markdown_summary(cfg.output, cfg.storage_options, status=status),
                             key="bif-run-summary",
                             description=f"BIF run at {cfg.output}")
    create_table_artifact(table=topk_records(cfg.output, cfg.storage_options), key="bif-topk",
                          description="Top positive / negative train examples for the most influenced queries")


@task(name="finish-run", cache_policy=NO_CACHE)
def finish(cfg: RunConfig, info: pipeline.RunInfo, timings: dict[str, float], extra: dict[str, Any]) -> dict:
    return pipeline.finish_run(cfg, info, timings=timings, extra=extra)

"""The attribution flow: prepare → chains on Dask (one task each) → covariance → manifest.

:func:`attribution_flow` is the deployable flow: it builds its own runtime from
``cfg.compute`` (:func:`bif.flows.runtime.on_dask`: join ``scheduler_address`` or
``compute.address``, else start a LocalCluster) and runs the chains, the covariance
reduction, the gates and the diagnostics on it, so a Prefect deployment runs on Dask like
the CLI. ``run_attribution(cfg)`` is the Python entry point (the CLI calls it): it starts
the cluster first (or joins one) to show progress from its events, then calls the flow
with that ``scheduler_address``. Credentials and logs follow the shared runtime
(:mod:`bif.flows.runtime`): credentials are never flow parameters.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from prefect import flow
from prefect.futures import as_completed, wait

from bif import schema as S
from bif.config import RunConfig
from bif.errors import QualityError
from bif.store.manifest import update_manifest
from bif.flows import runtime
from bif.tasks import pipeline, steps


@flow(name="bif-attribution", log_prints=True)
def attribution_flow(config: dict[str, Any], credentials_ref: str | None = None, secret_block: str | None = None,
                     scheduler_address: str | None = None, cluster_startup_seconds: float = 0.0,
                     gates_on_workers: bool = False) -> dict[str, Any]:
    """Run one attribution: ``config`` is RunConfig data without credentials (see :mod:`bif.flows.runtime`).

    Runs on the Dask cluster ``scheduler_address``, else ``compute.address``, else a LocalCluster of
    its own; ``cluster_startup_seconds`` is what the caller paid for ``scheduler_address``.
    ``gates_on_workers``: run the quality gates and draw the report as tasks on workers (a kept cluster's
    workers have great_expectations and matplotlib loaded), not in this process.
    """
    cfg = runtime.flow_config(config, credentials_ref, secret_block)
    with runtime.on_dask(cfg.compute, num_tasks=cfg.sampler.num_chains, address=scheduler_address) as rt:
        startup = rt.startup_seconds if rt.cluster.started_here else cluster_startup_seconds
        return _attribution(cfg, rt, startup, gates_on_workers=gates_on_workers)


def _attribution(cfg: RunConfig, rt: runtime.DaskRuntime, cluster_startup_seconds: float, *,
                 gates_on_workers: bool = False) -> dict[str, Any]:
    """The flow's body on its runtime ``rt``: chains, covariance, gates and diagnostics run on ``rt``'s cluster."""
    t0 = time.perf_counter()
    lease = pipeline.acquire_lease(cfg)  # OutputBusyError while another live run writes here
    try:
        info = rt.submit(steps.prepare, cfg).result()  # on a worker: the problem is built there, not here
        if info.already_complete:
            print(f"run at {cfg.output} is already complete; nothing to do")
            return {"status": "complete", "skipped": True}
        resolved = _resolved(cfg, info, rt.address)
        update_manifest(cfg.output, cfg.storage_options, resolved=resolved)
        print("resolved: " + ", ".join(f"{k}={v}" for k, v in resolved.items()))
        t1 = time.perf_counter()
        futures = [rt.submit_gpu(steps.sample_chain, cfg, c, info.ref_train_loss_mean)
                   for c in range(cfg.sampler.num_chains)]
        wait(futures)
        chains = [f.result() for f in futures]  # raises the first chain failure
        steps.check_traces(cfg)
        t2 = time.perf_counter()
        # the diagnostics start with the gates, after the covariance: started beside it, their jobs held both
        # workers when its blocks were queued, and the covariance (which the gates wait for) took 0.6 s, not 0.2
        summary = _covariance(cfg, info, rt, on_worker=gates_on_workers)
        t3 = time.perf_counter()
        # the report's sections that need neither check are drawn on a worker meanwhile (one task: measured faster
        # than one per section); it leaves its worker's slot, so the gates' reads queued after it run at once
        checks = _checks(cfg, info, rt, gates_on_workers=gates_on_workers,
                         then=lambda: [rt.submit(steps.report_sections, cfg)])
        gates, diag = checks["gates"], checks["diagnostics"]
        t5 = time.perf_counter()
        timings = {"cluster_startup_s": cluster_startup_seconds, "prepare_s": t1 - t0, "sampling_s": t2 - t1,
                   "covariance_s": t3 - t2, "gates_s": checks["gates_s"], "diagnostics_s": checks["diagnostics_s"],
                   "checks_s": t5 - t3,
                   "chain_s": [r.seconds for r in chains],
                   "chain_sampling_s": [r.sampling_seconds for r in chains],
                   "chain_draws_sampled": [r.draws_sampled for r in chains],
                   "chain_pid": [r.pid for r in chains],
                   "sampling_started_at": min(r.sampling_started_at for r in chains)}
        extra = {"resolved": resolved, "num_output_blocks": summary.num_blocks, "resumed_blocks": [r.resumed_blocks for r in chains],
                 "diagnostics": diag, "quality": gates.to_dict() if gates is not None else None}
        if gates is not None and not gates.passed:
            pipeline.fail_run(cfg, QualityError(gates.summary()), status=S.STATUS_FAILED_QUALITY,
                              quality_failures=[f.__dict__ for f in gates.failed], timings=timings, **extra)
        final_status = S.STATUS_COMPLETE if gates is None or gates.passed else S.STATUS_FAILED_QUALITY
        # the report and the artifacts read the same finished outputs: write them at once, the artifacts first
        # (they wait for no report section). On a kept cluster the report is drawn and the artifacts are read on
        # workers, whose forkserver has matplotlib, xarray and zarr loaded; with a cluster of its own the command
        # does both (and loaded matplotlib while its cluster started)
        def end(task: Any, *args: Any) -> Any:
            return rt.submit(task, cfg, *args) if gates_on_workers else task.submit(cfg, *args)

        ends = [end(steps.publish_artifacts, final_status)]
        prebuilt: dict[str, str] = {}
        for section in [*checks["then"], checks["diagnostics_section"]]:
            prebuilt |= _result_or_none(section) or {}
        ends.append(end(steps.report, final_status, prebuilt))
        for f in ends:
            f.result()  # raises its error
        if gates is not None:
            gates.raise_if_failed()
        timings["report_s"] = time.perf_counter() - t5
        timings["total_s"] = cluster_startup_seconds + time.perf_counter() - t0
        timings["finished_at"] = time.time()
        return steps.finish(cfg, info, timings, extra)
    except QualityError:
        raise  # the manifest already says failed_quality
    except BaseException as err:
        pipeline.fail_run(cfg, err)  # writes nothing for a refusal (RunConflictError)
        raise
    finally:
        lease.release()


def _succeeded(future: Any) -> bool:
    """Whether the finished ``future`` holds a result. Not ``future.state``: a task run's final state reaches the
    Prefect API after its future is done, so ``state.is_completed()`` read then was often still False."""
    try:
        future.result()
    except Exception:  # noqa: BLE001 - _checks raises it when it collects the results
        return False
    return True


def _result_or_none(future: Any) -> Any:
    """``future``'s result, or None when it is None or failed (the caller has a slower way to the same thing)."""
    if future is None:
        return None
    try:
        return future.result()
    except Exception:  # noqa: BLE001 - the report task builds the sections itself
        return None


def _covariance(cfg: RunConfig, info: pipeline.RunInfo, rt: runtime.DaskRuntime, *, on_worker: bool) -> Any:
    """The covariance reduction, as a task on a worker (``on_worker``: a kept cluster's workers have its
    imports loaded) or a thread of the flow; returns its summary."""
    future = rt.submit(steps.reduce_covariance, cfg, info) if on_worker else \
        steps.reduce_covariance.submit(cfg, info, rt.address)
    return future.result()


def _checks(cfg: RunConfig, info: pipeline.RunInfo, rt: runtime.DaskRuntime, *,
            gates_on_workers: bool = False, then: Callable[[], list[Any]] | None = None) -> dict[str, Any]:
    """Quality gates and diagnostics side by side, threads of the flow (the gates a task on a worker with
    ``gates_on_workers``); each maps its reads over the cluster. When the diagnostics finish while the gates
    still run, the report's diagnostics section is drawn on a worker meanwhile.

    Returns ``gates`` (a QualityReport or None when ``quality.enabled`` is off), ``diagnostics``
    (dict or None when ``quality.diagnostics`` is off), the seconds each took from its start, and
    ``diagnostics_section`` (the future of that section, or None). ``then()`` submits more work once the gates
    are queued (the report's early sections); its futures are returned as ``then``.
    """
    t0 = time.perf_counter()
    futures: dict[Any, str] = {}
    if cfg.quality.enabled:
        gates = rt.submit(steps.quality_gates, cfg, info) if gates_on_workers else \
            steps.quality_gates.submit(cfg, info, rt.address)
        futures[gates] = "gates"
    queued = then() if then is not None else []
    if cfg.quality.diagnostics:
        futures[steps.diagnostics.submit(cfg, rt.address)] = "diagnostics"
    out: dict[str, Any] = {"gates": None, "diagnostics": None, "gates_s": 0.0, "diagnostics_s": 0.0,
                           "diagnostics_section": None, "then": queued}
    for done, f in enumerate(as_completed(list(futures)), 1):
        name = futures[f]
        out[f"{name}_s"] = time.perf_counter() - t0
        # drawn beside the gates when they still run; finishing last, the report draws it (one task fewer to wait on)
        if name == "diagnostics" and done < len(futures) and _succeeded(f):
            out["diagnostics_section"] = rt.submit(steps.report_sections, cfg, (S.REPORT_DIAGNOSTICS_SECTION,))
    for f, name in futures.items():
        out[name] = f.result()  # raises the stage's error
    return out


def _resolved(cfg: RunConfig, info: pipeline.RunInfo, scheduler_address: str) -> dict[str, Any]:
    """The values the config leaves open, as this run uses them: nβ, γ, ε, device (manifest key ``resolved``)."""
    s = cfg.sampler
    device = cfg.compute.device
    with contextlib.suppress(Exception):  # only informative; the chains resolve it themselves
        device = runtime.worker_device(cfg.compute.device, cfg.compute.gpus, scheduler_address)
    nbeta = s.nbeta if s.nbeta is not None else (info.nbeta or info.n_train)  # token runs: valid train tokens
    return {"nbeta": float(nbeta), "gamma": float(s.gamma),
            "step_size": float(s.step_size), "device": device, "n_train": info.n_train, "n_query": info.n_query}


@contextlib.contextmanager
def dask_cluster(cfg: RunConfig) -> Iterator[str]:
    """Yield a scheduler address for ``cfg`` (:func:`bif.flows.runtime.dask_cluster`, one task per chain)."""
    with runtime.dask_cluster(cfg.compute, num_tasks=cfg.sampler.num_chains) as cluster:
        yield cluster.address


def run_attribution(cfg: RunConfig, *, show_progress: bool = True, address: str | None = None,
                    cluster_startup_seconds: float = 0.0, gates_on_workers: bool = False) -> dict[str, Any]:
    """Run the flow on a Dask cluster and return the final manifest. Raises the run's error on failure.

    ``address``: a running scheduler to use; default ``compute.address`` or a LocalCluster started
    here. ``cluster_startup_seconds``: what starting ``address`` cost, when the caller started it.
    """
    from distributed import Client

    from bif.flows.progress import RunProgress
    from bif.store.fs import check_writable

    if cfg.output.startswith("memory://"):
        from bif.errors import ConfigError

        raise ConfigError("output memory:// lives in one process and Dask workers cannot see it; "
                          "use a local path or s3:// for runs (memory:// serves tests of the trace store)")
    check_writable(cfg.output, cfg.storage_options)  # fail before paying for a cluster
    with runtime.dask_cluster(cfg.compute, num_tasks=cfg.sampler.num_chains, address=address) as cluster, \
            Client(cluster.address, set_as_default=False) as client, \
            RunProgress(client, num_chains=cfg.sampler.num_chains, num_draws=cfg.sampler.num_draws,
                        enabled=show_progress):
        startup = cluster.startup_seconds if cluster.started_here else cluster_startup_seconds
        return runtime.call_flow(attribution_flow, cfg, address=cluster.address, log_name="run",
                                 cluster_startup_seconds=startup, gates_on_workers=gates_on_workers)

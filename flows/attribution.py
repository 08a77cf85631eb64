"""The attribution flow: prepare → chains on Dask (one task each) → covariance → manifest.

``run_attribution(cfg)`` is the Python entry point (the CLI calls it): it starts a Dask
LocalCluster, or joins ``compute.address``, shows progress, and runs the flow on that
cluster through prefect-dask's ``DaskTaskRunner``.

Credentials never become flow parameters (Prefect stores parameters, and its
``SecretDict`` is stored in clear). ``run_attribution`` keeps ``storage_options`` in a
process-local registry and passes the flow an opaque reference; tasks receive them as
pickled arguments over Dask, which Prefect does not persist. A flow started elsewhere
(e.g. a deployment) finds no reference and uses the ambient credentials (AWS_* variables,
instance roles), as s3fs does by default.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

from prefect import flow
from prefect.futures import wait

from bif import schema as S
from bif.config import RunConfig, build_config
from bif.errors import QualityError
from tasks import pipeline, steps


_CREDENTIALS: dict[str, dict[str, Any]] = {}


@flow(name="bif-attribution", log_prints=True)
def attribution_flow(config: dict[str, Any], credentials_ref: str | None = None,
                     scheduler_address: str | None = None, cluster_startup_seconds: float = 0.0) -> dict[str, Any]:
    """Run one attribution: ``config`` is RunConfig data with credentials removed."""
    cfg = build_config({**config, "storage_options": _CREDENTIALS.get(credentials_ref or "", {})})
    t0 = time.perf_counter()
    lease = pipeline.acquire_lease(cfg)  # OutputBusyError while another live run writes here
    try:
        info = steps.prepare(cfg)
        if info.already_complete:
            print(f"run at {cfg.output} is already complete; nothing to do")
            return {"status": "complete", "skipped": True}
        t1 = time.perf_counter()
        futures = []
        for c in range(cfg.sampler.num_chains):
            with _gpu_claim(cfg.compute.gpus):
                futures.append(steps.sample_chain.submit(cfg, c, info.ref_train_loss_mean))
        wait(futures)
        chains = [f.result() for f in futures]  # raises the first chain failure
        steps.check_traces(cfg)
        t2 = time.perf_counter()
        summary = steps.reduce_covariance(cfg, info, scheduler_address)
        t3 = time.perf_counter()
        gates = steps.quality_gates(cfg, info, scheduler_address) if cfg.quality.enabled else None
        t4 = time.perf_counter()
        diag = steps.diagnostics(cfg, scheduler_address) if cfg.quality.enabled else None
        t5 = time.perf_counter()
        timings = {"cluster_startup_s": cluster_startup_seconds, "prepare_s": t1 - t0, "sampling_s": t2 - t1,
                   "covariance_s": t3 - t2, "gates_s": t4 - t3, "diagnostics_s": t5 - t4,
                   "chain_s": [r.seconds for r in chains],
                   "chain_sampling_s": [r.sampling_seconds for r in chains],
                   "chain_draws_sampled": [r.draws_sampled for r in chains],
                   "sampling_started_at": min(r.sampling_started_at for r in chains)}
        extra = {"num_output_blocks": summary.num_blocks, "resumed_blocks": [r.resumed_blocks for r in chains],
                 "diagnostics": diag, "quality": gates.to_dict() if gates is not None else None}
        if gates is not None and not gates.passed:
            pipeline.fail_run(cfg, QualityError(gates.summary()), status=S.STATUS_FAILED_QUALITY,
                              quality_failures=[f.__dict__ for f in gates.failed], timings=timings, **extra)
        final_status = S.STATUS_COMPLETE if gates is None or gates.passed else S.STATUS_FAILED_QUALITY
        steps.report(cfg, final_status)
        steps.publish_artifacts(cfg, final_status)
        if gates is not None:
            gates.raise_if_failed()
        timings["report_s"] = time.perf_counter() - t5
        timings["finished_at"] = time.time()
        return steps.finish(cfg, info, timings, extra)
    except QualityError:
        raise  # the manifest already says failed_quality
    except BaseException as err:
        pipeline.fail_run(cfg, err)  # writes nothing for a refusal (RunConflictError)
        raise
    finally:
        lease.release()


@contextlib.contextmanager
def _gpu_claim(gpus: int) -> Iterator[None]:
    if gpus:
        import dask

        with dask.annotate(resources={"GPU": 1}):
            yield
    else:
        yield


@contextlib.contextmanager
def dask_cluster(cfg: RunConfig) -> Iterator[str]:
    """Yield a scheduler address: ``compute.address``, or a LocalCluster started here (1 torch thread/worker)."""
    if cfg.compute.address:
        yield cfg.compute.address
        return
    from distributed import LocalCluster

    n_workers = cfg.compute.n_workers or max(1, min(cfg.sampler.num_chains, os.cpu_count() or 1))
    kwargs: dict[str, Any] = {"n_workers": n_workers, "threads_per_worker": cfg.compute.threads_per_worker,
                              "processes": True, "dashboard_address": ":0", "silence_logs": 40,
                              # import torch / prefect / pyarrow while the cluster boots, not in the first task
                              "preload": ["tasks.pipeline", "tasks.steps"]}
    if cfg.compute.gpus:
        kwargs["resources"] = {"GPU": 1}
    import dask

    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in workers; it makes glibc trim on every
    # large free and slowed SGLD steps by ~33% here (4.6 -> 6.1 ms per digits draw). Keep the
    # thread caps (one BLAS / OpenMP thread per worker thread), drop the trim setting.
    threads = cfg.compute.threads_per_worker
    environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    environ |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), LocalCluster(**kwargs) as cluster:
        yield cluster.scheduler_address


def run_attribution(cfg: RunConfig, *, show_progress: bool = True, address: str | None = None) -> dict[str, Any]:
    """Run the flow on a Dask cluster and return the final manifest. Raises the run's error on failure.

    ``address``: a running scheduler to use; default ``compute.address`` or a LocalCluster started here.
    """
    from distributed import Client
    from prefect_dask import DaskTaskRunner

    from bif.progress import RunProgress
    from bif.storage import check_writable

    for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.core",
                 "distributed.worker", "distributed.http.proxy"):
        logging.getLogger(name).setLevel(logging.WARNING)

    if cfg.output.startswith("memory://"):
        from bif.errors import ConfigError

        raise ConfigError("output memory:// lives in one process and Dask workers cannot see it; "
                          "use a local path or s3:// for runs (memory:// serves tests of the trace store)")
    check_writable(cfg.output, cfg.storage_options)  # fail before paying for a cluster
    t0 = time.perf_counter()
    own = contextlib.nullcontext(address) if address else dask_cluster(cfg)
    with own as address, Client(address, set_as_default=False) as client:
        with RunProgress(client, num_chains=cfg.sampler.num_chains, num_draws=cfg.sampler.num_draws,
                         enabled=show_progress):
            runner = DaskTaskRunner(address=address)
            startup = time.perf_counter() - t0
            ref = uuid.uuid4().hex
            _CREDENTIALS[ref] = dict(cfg.storage_options)
            try:
                return attribution_flow.with_options(task_runner=runner)(
                    config=cfg.public_dict() | {"storage_options": {}}, credentials_ref=ref,
                    scheduler_address=address, cluster_startup_seconds=startup)
            finally:
                _CREDENTIALS.pop(ref, None)

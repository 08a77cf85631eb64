"""The LDS flow: plan subsets → retrain on Dask (one task per subset × seed) → score methods → LDS.

:func:`lds_flow` is the deployable flow: it builds its own runtime from ``cfg.compute``
(:func:`bif.flows.runtime.on_dask`: join ``scheduler_address`` or ``compute.address``,
else start a LocalCluster) and runs its retrainings and scorings there, so a Prefect
deployment runs on Dask like the CLI. ``run_lds(cfg, settings)`` is the Python entry point
(``bif lds`` calls it). Credentials and logs follow the shared runtime
(:mod:`bif.flows.runtime`): credentials are never flow parameters.
The ground truth is cached under ``<output>/lds/<key>/`` (see :mod:`bif.evaluation.store`):
finished retrainings are never redone, and a complete ground truth is reused as is.
All logic lives in :mod:`bif.evaluation.retrain`, :mod:`bif.evaluation.scoring`, :mod:`bif.evaluation.store`
and :mod:`bif.evaluation.lds`; the decorated functions only load, call and write.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from bif.config import RunConfig, build_config
from bif.flows import runtime
from bif.evaluation.settings import LDSSettings

if TYPE_CHECKING:
    from bif.evaluation.scoring import Scored

# The tasks import bif.evaluation's store, retraining and scoring in their bodies, not here: a kept cluster's
# scheduler imports this module to unpickle the tasks (bif.flows.kept_cluster.SCHEDULER_IMPORTS), and the retraining
# imports torch. The flow's own body (the command) never imports torch: the problem is built on the workers.

#: What LDS and calibration workers import while the cluster boots.
PRELOAD = ("bif.flows.runtime", "bif.evaluation.retrain")


def worker_problem(spec: str, args: dict[str, Any], checkpoint: str | None = None) -> Any:
    """The problem, in a task on a Dask worker: torch on one thread (the worker's core), the problem built once per
    process (:func:`bif.evaluation.store.cached_problem`). The LDS and calibration tasks all start here."""
    import torch

    from bif.evaluation import store as lds_store

    torch.set_num_threads(1)
    return lds_store.cached_problem(spec, args, checkpoint)


@task(name="retrain", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def retrain_task(spec: str, args: dict[str, Any], root_uri: str, subset: int, rep: int, fit_seed: int,
                 indices: np.ndarray, storage_options: dict[str, Any] | None = None) -> int:
    """Retrain on one subset with one seed and commit its query losses; returns the id of the process it ran in."""
    from bif.evaluation import store as lds_store
    from bif.evaluation.retrain import retrain_query_losses

    problem = worker_problem(spec, args)
    mask = np.zeros(len(problem.train), dtype=bool)
    mask[indices] = True
    losses = retrain_query_losses(problem, mask, fit_seed)
    lds_store.write_retrain(root_uri, subset, rep, fit_seed, losses, storage_options=storage_options or {})
    return os.getpid()


@task(name="score-method", cache_policy=NO_CACHE)
def score_task(config: dict[str, Any], method: str, settings: dict[str, Any]) -> list[Scored]:
    """One method's attribution at the checkpoint, with its cost."""
    from bif.evaluation.scoring import score_method

    cfg, st = build_config(config), LDSSettings.model_validate(settings)
    problem = worker_problem(cfg.problem, cfg.problem_args, cfg.checkpoint)
    return score_method(problem, method, sampler=cfg.sampler, covariance=cfg.covariance, options=st.options)


@task(name="problem-sizes", cache_policy=NO_CACHE)
def sizes_task(spec: str, args: dict[str, Any]) -> tuple[int, int]:
    """(n_train, n_query) of the problem, built on a worker (which keeps it for its retrainings and scorings): the
    command then never imports torch (1.9 s of ``bif lds``'s core on a running cluster). A problem without ``fit``
    fails here, before any retraining is submitted."""
    from bif.evaluation.retrain import require_fit

    problem = worker_problem(spec, args)
    require_fit(problem)
    return len(problem.train), len(problem.query)


@flow(name="bif-lds", log_prints=True)
def lds_flow(config: dict[str, Any], settings: dict[str, Any], credentials_ref: str | None = None,
             secret_block: str | None = None, run_name: str = "latest",
             scheduler_address: str | None = None) -> dict[str, Any]:
    """LDS of every method in ``settings`` on the problem of ``config`` (RunConfig data, no credentials).

    Runs on the Dask cluster ``scheduler_address``, else ``compute.address``, else a LocalCluster of its own.
    """
    cfg, st = runtime.flow_config(config, credentials_ref, secret_block), LDSSettings.model_validate(settings)
    with runtime.on_dask(cfg.compute, num_tasks=1 << 16, address=scheduler_address, preload=PRELOAD) as rt:
        return _lds(config, settings, cfg, st, rt, run_name)


def _lds(config: dict[str, Any], settings: dict[str, Any], cfg: RunConfig, st: LDSSettings,
         rt: runtime.DaskRuntime, run_name: str) -> dict[str, Any]:
    """The flow's body on its runtime ``rt``: retrainings and scorings run on ``rt``'s cluster."""
    from bif.evaluation import store as lds_store

    opts = dict(cfg.storage_options)
    t0 = time.perf_counter()
    sizes = rt.submit(sizes_task, cfg.problem, cfg.problem_args)  # first: the scorings would queue ahead of it
    score_futures = [rt.submit(score_task, config, m, settings) for m in st.methods]
    n_train, n_query = sizes.result()
    p = lds_store.plan(cfg.output, cfg.problem, cfg.problem_args, st, n_train=n_train, n_query=n_query,
                       storage_options=opts)
    print(f"ground truth {p.root_uri}: {'cached' if p.cached else f'{len(p.missing)} retrainings to run'}")
    futures = [rt.submit(retrain_task, cfg.problem, cfg.problem_args, p.root_uri, m, r, seed,
                         np.flatnonzero(p.masks[m]), opts) for m, r, seed in p.missing]
    _raise_failed_scoring(score_futures, futures)  # returns once every retraining and scoring has ended
    pids = sorted({f.result() for f in futures})  # raises the first failure after its retries
    gt = (lds_store.read_ground_truth(p, st, storage_options=opts) if p.cached
          else lds_store.consolidate(p, st, storage_options=opts))
    t1 = time.perf_counter()
    scored = [s for f in score_futures for s in f.result()]
    reports, per_query = lds_store.evaluate(gt, scored)
    extra = {"ground_truth_key": p.key, "ground_truth_uri": p.root_uri, "cached": p.cached,
             "num_retrained": len(p.missing), "ground_truth_seconds": t1 - t0,
             "total_seconds": time.perf_counter() - t0, "settings": st.model_dump(mode="json")}
    summary_uri = lds_store.write_results(p, run_name, reports, per_query, extra, storage_options=opts)
    for r in reports:
        print(f"{r.method:>16}: LDS {r.lds:+.3f} ± {r.stderr:.3f}  ({r.seconds:.1f} s)")
    # retrain_pids: where the retrainings ran (returned, not written: the summary file is unchanged)
    return {"methods": [r.__dict__ for r in reports], "summary_uri": summary_uri, **extra, "retrain_pids": pids}


def _raise_failed_scoring(scorings: list[Any], retrainings: list[Any]) -> None:
    """Wait for the retrainings and the scorings together, raising a scoring's failure as soon as it ends: a method
    that cannot score the problem (TRAK or the explicit influence solver on a language model) stopped the flow only
    after the whole ground truth (2.3 min of retrainings on the tiny LM). The retrainings written by then stay, and
    the next run retrains only the rest."""
    from prefect.futures import as_completed

    ids = {f.task_run_id for f in scorings}
    for done in as_completed([*retrainings, *scorings]):
        if done.task_run_id in ids:
            done.result()  # raises the method's error


def run_lds(cfg: RunConfig, settings: LDSSettings, *, address: str | None = None, run_name: str = "latest",
            keep: bool = False) -> dict[str, Any]:
    """Run :func:`lds_flow` on a Dask cluster (``address``, ``compute.address`` or a new LocalCluster; ``keep``:
    the kept cluster of :mod:`bif.flows.kept_cluster`, as ``bif lds`` does)."""
    # the problem's modules ahead in the forkserver, as `bif run` has them: its kept cluster then serves this too
    with runtime.dask_cluster(cfg.compute, num_tasks=1 << 16, address=address, preload=PRELOAD,
                              warm_modules=runtime.problem_preload(cfg.problem), keep=keep) as cluster:
        return runtime.call_flow(lds_flow, cfg, address=cluster.address, log_name="lds",
                                 settings=settings.model_dump(mode="json"), run_name=run_name)

"""The calibration flow: cheap ground truth + step-size pilot → sweep of (ε, nβ, γ) on Dask → YAML + PNG.

:func:`calibrate_flow` is the deployable flow: it builds its own runtime from
``cfg.compute`` (:func:`bif.flows.runtime.on_dask`: join ``scheduler_address`` or
``compute.address``, else start a LocalCluster) and runs every retraining, pilot and grid
point there, so a Prefect deployment runs on Dask like the CLI.
``run_calibration(cfg, settings)`` is the entry point (``bif calibrate`` calls it). The
retrainings reuse the LDS flow's task and cache (a cheap ground truth of ``num_subsets``
subsets under ``<output>/lds/<key>/``); each pilot step size and each grid point is a task.
Outputs under ``<output>/calibration/``: ``sampler.yaml`` (the recommended ``sampler:``
block), ``tradeoffs.png``, ``scores.json``. Logic lives in :mod:`bif.evaluation.calibrate` and
:mod:`bif.evaluation.calibration`. Credentials and logs follow the shared runtime
(:mod:`bif.flows.runtime`): credentials are never flow parameters.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from bif.evaluation import calibrate as C
from bif.config import RunConfig, build_config
from bif.evaluation.settings import CalibrationSettings, LDSSettings
from bif.flows import runtime
from bif.flows.lds import PRELOAD as LDS_PRELOAD, retrain_task
from bif.evaluation import calibration, store as lds_store
from bif.evaluation.retrain import GroundTruth

#: What calibration workers import while the cluster boots.
PRELOAD = (*LDS_PRELOAD, "bif.evaluation.calibration")


@task(name="pilot-step", cache_policy=NO_CACHE)
def pilot_task(config: dict[str, Any], step_size: float, nbeta: float, gamma: float, pilot_steps: int) -> bool:
    """Whether one short chain at ``step_size`` stays stable."""
    import torch

    torch.set_num_threads(1)
    cfg = build_config(config)
    problem = lds_store.cached_problem(cfg.problem, cfg.problem_args, cfg.checkpoint)
    s = cfg.sampler.model_copy(update={"nbeta": nbeta, "gamma": gamma})
    return calibration.pilot_stable(problem, s, step_size, num_steps=pilot_steps)


@task(name="evaluate-setting", cache_policy=NO_CACHE)
def evaluate_task(config: dict[str, Any], point: tuple[float, float, float], num_chains: int, num_draws: int,
                  gt: GroundTruth) -> C.SettingScore:
    """Diagnostics and LDS of one (step_size, nbeta, gamma)."""
    import torch

    torch.set_num_threads(1)
    cfg = build_config(config)
    problem = lds_store.cached_problem(cfg.problem, cfg.problem_args, cfg.checkpoint)
    eps, nbeta, gamma = point
    s = cfg.sampler.model_copy(update={"step_size": eps, "nbeta": nbeta, "gamma": gamma,
                                       "num_chains": num_chains, "num_draws": num_draws})
    return calibration.evaluate_setting(problem, s, gt)


def _write_outputs(cfg: RunConfig, settings: CalibrationSettings, scores, best, healthy, largest,
                   opts) -> dict[str, Any]:
    import tempfile

    import yaml

    from bif.store.fs import join
    from bif.store.run import RunStore

    store = RunStore(cfg.output, opts)
    block = C.sampler_block(cfg.sampler.model_dump(mode="json"), best)
    store.write_text(join("calibration", "sampler.yaml"), yaml.safe_dump({"sampler": block}, sort_keys=False))
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "tradeoffs.png")
        C.plot_tradeoffs(scores, best, png)
        with open(png, "rb") as f:
            store.write_bytes(join("calibration", "tradeoffs.png"), f.read())
    result = {"recommended": C.as_records([best])[0], "healthy": healthy, "largest_stable_step": largest,
              "sampler": block, "scores": C.as_records(scores), "output_uri": join(cfg.output, "calibration"),
              "settings": settings.model_dump(mode="json")}
    store.write_json(join("calibration", "scores.json"), result)
    return result


@flow(name="bif-calibrate", log_prints=True)
def calibrate_flow(config: dict[str, Any], settings: dict[str, Any], credentials_ref: str | None = None,
                   secret_block: str | None = None, scheduler_address: str | None = None) -> dict[str, Any]:
    """Pilot, sweep and recommend a sampler block for the problem of ``config`` (RunConfig data, no credentials).

    Runs on the Dask cluster ``scheduler_address``, else ``compute.address``, else a LocalCluster of its own.
    """
    cfg = runtime.flow_config(config, credentials_ref, secret_block)
    st = CalibrationSettings.model_validate(settings)
    with runtime.on_dask(cfg.compute, num_tasks=1 << 16, address=scheduler_address, preload=PRELOAD) as rt:
        return _calibrate(config, cfg, st, rt)


def _calibrate(config: dict[str, Any], cfg: RunConfig, st: CalibrationSettings, rt: runtime.DaskRuntime
               ) -> dict[str, Any]:
    """The flow's body on its runtime ``rt``: retrainings, pilots and grid points run on ``rt``'s cluster."""
    opts = dict(cfg.storage_options)
    problem = lds_store.cached_problem(cfg.problem, cfg.problem_args)
    lds_settings = LDSSettings(alpha=st.alpha, num_subsets=st.num_subsets, num_seeds=st.num_seeds, seed=st.seed)
    p = lds_store.plan(cfg.output, cfg.problem, cfg.problem_args, lds_settings, n_train=len(problem.train),
                       n_query=len(problem.query), storage_options=opts)
    retrains = [rt.submit(retrain_task, cfg.problem, cfg.problem_args, p.root_uri, m, r, seed,
                          np.flatnonzero(p.masks[m]), opts) for m, r, seed in p.missing]
    nbeta = st.nbeta or C.default_nbeta(len(problem.train))
    largest = None
    if st.step_sizes is None:
        cands = C.pilot_step_sizes(nbeta)
        pilots = [rt.submit(pilot_task, config, e, nbeta, C.default_gamma(nbeta), st.pilot_steps) for e in cands]
        largest = C.largest_stable({e: f.result() for e, f in zip(cands, pilots)})
        print(f"pilot: largest stable step size {largest:.3g} (nβ = {nbeta:.4g})")
        points = C.grid(largest, nbeta, gamma_per_nbeta=[g / nbeta for g in st.gammas] if st.gammas
                        else C.GAMMA_PER_NBETA)
    else:
        gammas = st.gammas or tuple(g * nbeta for g in C.GAMMA_PER_NBETA)
        points = [(e, nbeta, g) for e in st.step_sizes for g in gammas]
    wait(retrains)
    for f in retrains:
        f.result()
    gt = (lds_store.read_ground_truth(p, lds_settings, storage_options=opts) if p.cached
          else lds_store.consolidate(p, lds_settings, storage_options=opts))
    futures = [rt.submit(evaluate_task, config, pt, st.num_chains, st.num_draws, gt) for pt in points]
    scores = [f.result() for f in futures]
    best, healthy = C.recommend(scores, rhat_max=st.rhat_max, ess_min=st.ess_min, drift_max=st.drift_max)
    for s in scores:
        print(f"ε={s.step_size:.3g} nβ={s.nbeta:.4g} γ={s.gamma:.4g}: "
              + ("DIVERGED" if s.diverged else f"LDS {s.lds:+.3f} R-hat {s.max_rhat:.3f} ESS {s.median_ess_bulk:.0f}"))
    return _write_outputs(cfg, st, scores, best, healthy, largest, opts)


def run_calibration(cfg: RunConfig, settings: CalibrationSettings, *, address: str | None = None) -> dict[str, Any]:
    """Run :func:`calibrate_flow` on a Dask cluster (``address``, ``compute.address`` or a new LocalCluster)."""
    with runtime.dask_cluster(cfg.compute, num_tasks=1 << 16, address=address, preload=PRELOAD) as cluster:
        return runtime.call_flow(calibrate_flow, cfg, address=cluster.address, log_name="calibrate",
                                 settings=settings.model_dump(mode="json"))

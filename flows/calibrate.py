"""The calibration flow: cheap ground truth + probe → successive halving on Dask → sampler.yaml, scores, plot.

:func:`calibrate_flow` is the deployable flow: it builds its own runtime from
``cfg.compute`` (:func:`bif.flows.runtime.on_dask`: join ``scheduler_address`` or
``compute.address``, else start a LocalCluster) and runs every retraining, the probe and every
evaluated setting there, so a Prefect deployment runs on Dask like the CLI.
``run_calibration(cfg, settings)`` is the entry point (``bif calibrate`` calls it). The
retrainings reuse the LDS flow's task and cache (a cheap ground truth of ``num_subsets``
subsets under ``<output>/lds/<key>/``); their wall time per retraining sets the budget
(``budget_retrainings`` of them). The search itself is :func:`bif.evaluation.calibration.search`
with a ``map_fn`` that submits each round's settings as tasks. Outputs under
``<output>/calibration/``: ``sampler.yaml`` (the recommended ``sampler:`` block),
``search.png``, ``scores.json`` (schema in docs/lds.md). Credentials and logs follow the shared
runtime (:mod:`bif.flows.runtime`): credentials are never flow parameters.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from bif.evaluation import calibrate as C
from bif.config import RunConfig, build_config
from bif.evaluation.settings import CalibrationSettings, LDSSettings
from bif.flows import runtime
from bif.flows.lds import PRELOAD as LDS_PRELOAD, retrain_task, worker_problem

if TYPE_CHECKING:
    from bif.evaluation import calibration
    from bif.evaluation.lds import GroundTruth

# The functions import bif.evaluation's calibration and store (torch) in their bodies, not here: a kept cluster's
# scheduler imports this module to unpickle the tasks, whose arguments (calibrate.Job, lds.GroundTruth) are defined
# in modules without torch.

#: What calibration workers import while the cluster boots.
PRELOAD = (*LDS_PRELOAD, "bif.evaluation.calibration")


def _problem(config: dict[str, Any]):
    cfg = build_config(config)
    return cfg, worker_problem(cfg.problem, cfg.problem_args, cfg.checkpoint)


@task(name="calibration-probe", cache_policy=NO_CACHE)
def probe_task(config: dict[str, Any], settings: dict[str, Any]) -> calibration.Probe:
    """λ_max, step costs and the stability pilot (:func:`bif.evaluation.calibration.probe`)."""
    from bif.evaluation import calibration

    cfg, problem = _problem(config)
    return calibration.probe(problem, cfg.sampler, CalibrationSettings.model_validate(settings))


@task(name="time-retraining", cache_policy=NO_CACHE)
def time_retrain_task(spec: str, args: dict[str, Any], indices: np.ndarray, fit_seed: int) -> float:
    """Seconds of one retraining (when the cheap ground truth is cached and no retraining was timed)."""
    from bif.evaluation.retrain import retrain_query_losses

    problem = worker_problem(spec, args)
    mask = np.zeros(len(problem.train), dtype=bool)
    mask[indices] = True
    t0 = time.perf_counter()
    retrain_query_losses(problem, mask, fit_seed)
    return time.perf_counter() - t0


@task(name="evaluate-setting", cache_policy=NO_CACHE)
def evaluate_task(config: dict[str, Any], job: C.Job, gt: GroundTruth) -> C.SettingScore:
    """Diagnostics, LDS and MCSE of one setting."""
    from bif.evaluation import calibration

    _, problem = _problem(config)
    return calibration.evaluate_setting(problem, job.sampler, gt, head=job.head, target_share=job.target_share,
                                        diagnostics=job.diagnostics, project_draws=job.project_draws)


def _num_workers(address: str) -> int:
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        return max(1, sum(client.nthreads().values()))


def _write_outputs(cfg: RunConfig, st: CalibrationSettings, res: calibration.SearchResult, block: dict[str, Any],
                   extra: dict[str, Any], opts) -> dict[str, Any]:
    import tempfile
    from dataclasses import asdict

    import yaml

    from bif.store.fs import join
    from bif.store.run import RunStore

    store = RunStore(cfg.output, opts)
    store.write_text(join("calibration", "sampler.yaml"), yaml.safe_dump({"sampler": block}, sort_keys=False))
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "search.png")
        C.plot_search(res.scores, res.best, png)
        with open(png, "rb") as f:
            store.write_bytes(join("calibration", "search.png"), f.read())
    out = {"recommended": C.as_records([res.best])[0], "healthy": res.healthy, "sampler": block,
           "num_draws": res.num_draws, "num_chains": res.num_chains, "predicted_share": res.predicted_share,
           "run_seconds": res.run_seconds, "budget_seconds": res.budget_seconds,
           "spent_seconds": res.spent_seconds, "probe": asdict(res.probe), "rounds": res.rounds,
           "ties": [{"mult": t.mult, "lam": t.lam, "batch_size": t.batch_size, "frac": t.frac, "lds": t.lds}
                    for t in res.ties],
           "note": res.note, "scores": C.as_records(res.scores),
           "output_uri": join(cfg.output, "calibration"), "settings": st.model_dump(mode="json"), **extra}
    store.write_json(join("calibration", "scores.json"), out)
    return out


@flow(name="bif-calibrate", log_prints=True)
def calibrate_flow(config: dict[str, Any], settings: dict[str, Any], credentials_ref: str | None = None,
                   secret_block: str | None = None, scheduler_address: str | None = None) -> dict[str, Any]:
    """Search and recommend a sampler block for the problem of ``config`` (RunConfig data, no credentials).

    Runs on the Dask cluster ``scheduler_address``, else ``compute.address``, else a LocalCluster of its own.
    """
    cfg = runtime.flow_config(config, credentials_ref, secret_block)
    st = CalibrationSettings.model_validate(settings)
    with runtime.on_dask(cfg.compute, num_tasks=1 << 16, address=scheduler_address, preload=PRELOAD) as rt:
        return _calibrate(config, cfg, st, rt)


def _calibrate(config: dict[str, Any], cfg: RunConfig, st: CalibrationSettings, rt: runtime.DaskRuntime
               ) -> dict[str, Any]:
    """The flow's body on its runtime ``rt``: retrainings, the probe and every setting run on ``rt``'s cluster."""
    from bif.evaluation import calibration, store as lds_store
    from bif.errors import ProblemError
    from bif.evaluation.retrain import has_token_losses, require_fit

    t_start = time.perf_counter()
    opts = dict(cfg.storage_options)
    problem = lds_store.cached_problem(cfg.problem, cfg.problem_args)
    require_fit(problem, "`bif calibrate` scores each setting by a cheap LDS, which needs")
    if has_token_losses(problem):  # its grid scales nβ with the samples, a token run's default is the tokens
        raise ProblemError("`bif calibrate` does not search per-token losses (a language model) yet: set the sampler "
                           "by hand (README, Language models) and check it with `bif lds`, which scores the "
                           "sequence-level BIF")
    n = len(problem.train)
    lds_settings = LDSSettings(alpha=st.alpha, num_subsets=st.num_subsets, num_seeds=st.num_seeds, seed=st.seed)
    p = lds_store.plan(cfg.output, cfg.problem, cfg.problem_args, lds_settings, n_train=n,
                       n_query=len(problem.query), storage_options=opts)
    parallelism = _num_workers(rt.address)
    t_gt = time.perf_counter()
    retrains = [rt.submit(retrain_task, cfg.problem, cfg.problem_args, p.root_uri, m, r, seed,
                          np.flatnonzero(p.masks[m]), opts) for m, r, seed in p.missing]
    if not retrains:  # cached: time one retraining for the budget
        timer = rt.submit(time_retrain_task, cfg.problem, cfg.problem_args, np.flatnonzero(p.masks[0]), 0)
    probe = rt.submit(probe_task, config, st.model_dump(mode="json"))
    wait(retrains)
    for f in retrains:
        f.result()
    if retrains:
        per_retrain = (time.perf_counter() - t_gt) / len(retrains)  # wall, at this cluster's parallelism
    else:
        per_retrain = timer.result() / parallelism
    budget = st.budget_seconds or st.budget_retrainings * per_retrain
    gt = (lds_store.read_ground_truth(p, lds_settings, storage_options=opts) if p.cached
          else lds_store.consolidate(p, lds_settings, storage_options=opts))
    how = f"{st.budget_seconds:g} s (--budget-seconds)" if st.budget_seconds else \
        f"{st.budget_retrainings:g} retrainings x {per_retrain:.3g} s wall each"
    print(f"cheap ground truth: {st.num_subsets} subsets x {st.num_seeds} seed(s) "
          f"({'reused' if p.cached else f'{len(retrains)} retrainings'}); budget {budget:.0f} s = {how}")

    def map_fn(jobs):
        futures = [rt.submit(evaluate_task, config, j, gt) for j in jobs]
        return [f.result() for f in futures]

    res = calibration.search(problem if cfg.checkpoint is None else lds_store.cached_problem(
        cfg.problem, cfg.problem_args, cfg.checkpoint), cfg.sampler, gt, st, budget_seconds=budget,
        spent_seconds=time.perf_counter() - t_start, parallelism=parallelism, map_fn=map_fn,
        probe_result=probe.result(), log=lambda m: print(m))  # print at call time: the flow logs it
    block = C.sampler_block(cfg.sampler.model_dump(mode="json"), res.best, num_draws=res.num_draws,
                            num_chains=res.num_chains)
    for s in sorted(res.scores, key=lambda s: (s.round, -s.lds if np.isfinite(s.lds) else 0.0)):
        print(f"  round {s.round} nβ={s.mult:g}n λ={s.lam:g} batch={s.batch_size} frac={s.frac:.3g}: "
              + ("DIVERGED" if s.diverged else f"LDS {s.lds:+.3f} R-hat {s.max_rhat:.3f} ESS {s.median_ess_bulk:.0f}"))
    out = _write_outputs(cfg, st, res, block, {"seconds_per_retraining": per_retrain,
                                               "total_seconds": time.perf_counter() - t_start}, opts)
    for line in summary_lines(out, st):
        print(line)
    return out


def summary_lines(result: dict[str, Any], st: CalibrationSettings) -> list[str]:
    """The pick, the draw budget and the time spent, from the flow's result (the flow's log and ``bif calibrate``)."""
    r = result["recommended"]
    return [f"pick: nbeta = {r['mult']:g} n = {r['nbeta']:.4g}, damping gamma/nbeta = {r['lam']:g} "
            f"(gamma = {r['gamma']:.4g}), step {r['frac']:.3g} of the stability limit (= {r['step_size']:.3g}), "
            f"batch {r['batch_size']}; cheap LDS {r['lds']:+.3f} ± {r['lds_stderr']:.3f} (projected to "
            f"{st.project_draws} draws {r['lds_projected']:+.3f}); {len(result['ties'])} tied",
            f"draws: {result['num_chains']} chains x {result['num_draws']} draws for {st.target_share:.0%} of pairs "
            f"with |BIF| > 2 MCSE (predicted {result['predicted_share']:.0%}); that run takes "
            f"~{result['run_seconds']:.0f} s here",
            f"spent {result['spent_seconds']:.0f} s of a {result['budget_seconds']:.0f} s budget"
            + (f" ({result['note']})" if result["note"] else "")]


def run_calibration(cfg: RunConfig, settings: CalibrationSettings, *, address: str | None = None,
                    keep: bool = False) -> dict[str, Any]:
    """Run :func:`calibrate_flow` on a Dask cluster (``address``, ``compute.address`` or a new LocalCluster; ``keep``:
    the kept cluster of :mod:`bif.flows.kept_cluster`, as ``bif calibrate`` does)."""
    # the problem's modules ahead in the forkserver, as `bif run` has them: its kept cluster then serves this too
    with runtime.dask_cluster(cfg.compute, num_tasks=1 << 16, address=address, preload=PRELOAD,
                              warm_modules=runtime.problem_preload(cfg.problem), keep=keep) as cluster:
        return runtime.call_flow(calibrate_flow, cfg, address=cluster.address, log_name="calibrate",
                                 settings=settings.model_dump(mode="json"))

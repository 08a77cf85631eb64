"""Operations flows: attribute many checkpoints, once each, into one output with a catalog.

``watch_flow`` (one sweep over a glob; deployed with a schedule) and ``backfill_flow`` (a
glob filtered by ``since`` / ``until`` on the checkpoints' modification time) are one path,
:func:`sweep`:

1. **Plan** (:func:`plan_sweep`): list the checkpoints, hash each file's bytes, and give each
   the run id ``sha256(checkpoint sha256, config hash)[:16]`` (:mod:`bif.store.catalog`). A run
   whose catalog state (or manifest) is ``complete`` is skipped; any other is run, which resumes
   a half-finished run from its committed blocks (the attribution flow's resume).
2. **Run** every planned checkpoint as a Prefect subflow, :func:`bif.flows.attribution.attribution_flow`,
   into ``<output>/runs/<run_id>/``, at most ``max_concurrent`` at a time (threads of this flow
   run, each subflow a child of it), all on the one Dask cluster that this flow's runtime
   (:func:`bif.flows.runtime.on_dask`) starts or joins. A subflow's failure (a corrupt checkpoint,
   a diverged chain, a failed gate) is caught and recorded; the others go on.
3. **Record** each run's states (``running``, then ``complete`` / ``failed`` / ``failed_quality``
   with timings, the quality summary and the error message) in the catalog, and compact it into
   ``<output>/catalog.parquet`` at the end.

Credentials follow the shared policy (:mod:`bif.flows.runtime`): the sweep resolves them once
(CLI registry, Secret block ``secret_block``, or ambient) and registers them in this process
for its subflows, which receive only the registry's opaque ref. Progress goes to listeners
registered in this process (:func:`listen`), named by ``events_ref``.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from prefect import flow

from bif import schema as S
from bif.config import RunConfig, build_config, load_config
from bif.errors import ConfigError, QualityError
from bif.flows import runtime
from bif.store.catalog import (Catalog, CatalogRow, file_sha256, list_checkpoints, make_run_id,
                               parse_when, run_uri, sweep_config_hash)
from bif.store.fs import redact
from bif.store.manifest import read_manifest

#: What the sweep does with a planned checkpoint.
RUN, RESUME, RETRY, SKIP = "run", "resume", "retry", "skip"
#: Progress events: (run_id, checkpoint_uri, state) with state one of these or a final catalog status.
EV_PLANNED, EV_RUNNING = "planned", "running"

_LISTENERS: dict[str, Callable[[str, str, str], None]] = {}


@dataclass(frozen=True)
class PlannedRun:
    """One checkpoint of a sweep: its run id and what the sweep will do with it (``action``)."""

    run_id: str
    checkpoint_uri: str
    checkpoint_sha256: str
    checkpoint_mtime: float
    output_uri: str
    action: str  # run (new) / resume (running, half-finished) / retry (failed before) / skip (complete)
    previous_status: str | None


@dataclass(frozen=True)
class RunOutcome:
    """What happened to one planned run in this sweep."""

    run_id: str
    checkpoint_uri: str
    action: str
    status: str  # the catalog status, or "skipped"
    seconds: float
    error: str | None = None


# ---------------------------------------------------------------- planning (no Prefect)


def sweep_settings(config: dict[str, Any] | str, credentials_ref: str | None, secret_block: str | None,
                   output: str | None = None) -> RunConfig:
    """The sweep's RunConfig: ``config`` is public RunConfig data or a YAML path (deployments pass one);
    ``output`` replaces its ``output`` (the sweep's root)."""
    if isinstance(config, str):
        config = load_config(config).public_dict() | {"storage_options": {}}
    if output:
        config = {**config, "output": output}
    return runtime.flow_config(config, credentials_ref, secret_block)


def plan_sweep(cfg: RunConfig, pattern: str, *, since: float | None = None, until: float | None = None
               ) -> tuple[str, list[PlannedRun]]:
    """(config hash, one PlannedRun per checkpoint matching ``pattern``), oldest checkpoint first."""
    config_hash = sweep_config_hash(cfg.public_dict())
    found = list_checkpoints(pattern, cfg.storage_options, since=since, until=until)
    statuses = Catalog(cfg.output, cfg.storage_options).statuses()
    plan = []
    for ck in found:
        sha = file_sha256(ck.uri, cfg.storage_options)
        rid = make_run_id(sha, config_hash)
        out = run_uri(cfg.output, rid)
        prev = statuses.get(rid)
        if prev != S.STATUS_COMPLETE:  # the catalog may lag the run (a sweep killed after the run finished)
            manifest = read_manifest(out, cfg.storage_options)
            if manifest is not None and manifest.get("status") == S.STATUS_COMPLETE:
                prev = S.STATUS_COMPLETE
        action = {None: RUN, S.STATUS_COMPLETE: SKIP, S.STATUS_RUNNING: RESUME}.get(prev, RETRY)
        plan.append(PlannedRun(rid, ck.uri, sha, ck.mtime, out, action, prev))
    # two files with the same bytes are one run: keep the first (oldest) of each
    seen: set[str] = set()
    plan = [p for p in plan if not (p.run_id in seen or seen.add(p.run_id))]
    return config_hash, plan


def run_config(cfg: RunConfig, planned: PlannedRun) -> RunConfig:
    """The attribution config of one planned run: the sweep's config at its checkpoint and run folder."""
    return build_config(cfg.model_dump(mode="json") | {"checkpoint": planned.checkpoint_uri, "output": planned.output_uri})


# ---------------------------------------------------------------- progress listeners


@contextlib.contextmanager
def listen(callback: Callable[[str, str, str], None]) -> Iterator[str]:
    """Register ``callback(run_id, checkpoint_uri, state)`` for sweeps run in this process; yields the ref."""
    ref = uuid.uuid4().hex
    _LISTENERS[ref] = callback
    try:
        yield ref
    finally:
        _LISTENERS.pop(ref, None)


def _emitter(events_ref: str | None) -> Callable[[str, str, str], None]:
    callback = _LISTENERS.get(events_ref or "")

    def emit(run_id: str, uri: str, state: str) -> None:
        if callback is not None:
            with contextlib.suppress(Exception):  # a broken progress display never fails a run
                callback(run_id, uri, state)
    return emit


# ---------------------------------------------------------------- one run, the whole sweep


def _base_row(cfg: RunConfig, p: PlannedRun, config_hash: str, status: str, **kw: Any) -> CatalogRow:
    return CatalogRow(run_id=p.run_id, checkpoint_uri=p.checkpoint_uri, checkpoint_sha256=p.checkpoint_sha256,
                      config_hash=config_hash, status=status, output_uri=p.output_uri,
                      checkpoint_mtime=p.checkpoint_mtime, num_chains=cfg.sampler.num_chains,
                      num_draws=cfg.sampler.num_draws, **kw)


def _error_text(err: BaseException, cfg: RunConfig) -> str:
    return redact(f"{type(err).__name__}: {str(err).strip()}", cfg.storage_options)[:2000]


def _attribute_one(cfg: RunConfig, p: PlannedRun, config_hash: str, *, address: str, credentials_ref: str | None,
                   emit: Callable[[str, str, str], None], gates_on_workers: bool = False) -> RunOutcome:
    """Run one planned checkpoint as an attribution subflow and record it; never raises for the run's failure.

    ``gates_on_workers``: the subflow's quality gates and report run on the cluster's workers (see
    :func:`bif.flows.attribution.attribution_flow`), as `bif run` has them on a kept cluster."""
    from bif.flows.attribution import attribution_flow

    catalog = Catalog(cfg.output, cfg.storage_options)
    started = time.time()
    catalog.record(_base_row(cfg, p, config_hash, S.STATUS_RUNNING, started_at=started))
    emit(p.run_id, p.checkpoint_uri, EV_RUNNING)
    status, error, t0 = S.STATUS_COMPLETE, None, time.perf_counter()
    try:
        rcfg = run_config(cfg, p)
        sub = attribution_flow.with_options(flow_run_name=f"attribution-{p.run_id}")
        state = sub(config=rcfg.public_dict() | {"storage_options": {}}, credentials_ref=credentials_ref,
                    scheduler_address=address, gates_on_workers=gates_on_workers, return_state=True)
        runtime._save_logs(state, rcfg, address=address, name="run")  # the run's log file, like `bif run`
        state.result()
        manifest = read_manifest(p.output_uri, cfg.storage_options) or {}
        if manifest.get("checkpoint_sha256") not in (None, p.checkpoint_sha256):
            status, error = S.STATUS_FAILED, (f"checkpoint {p.checkpoint_uri!r} changed while the sweep ran (sha256 "
                                              f"{manifest.get('checkpoint_sha256')}, planned {p.checkpoint_sha256}); "
                                              "the next sweep attributes the new file under its own run id")
    except QualityError as err:
        status, error = S.STATUS_FAILED_QUALITY, _error_text(err, cfg)
    except Exception as err:  # noqa: BLE001 - one checkpoint's failure never stops the others
        status, error = S.STATUS_FAILED, _error_text(err, cfg)
    seconds = time.perf_counter() - t0
    manifest = None
    with contextlib.suppress(Exception):
        manifest = read_manifest(p.output_uri, cfg.storage_options)
    row = _base_row(cfg, p, config_hash, status, started_at=started, finished_at=time.time(),
                    timings={"wall_s": seconds}, error=error).with_manifest(manifest)
    catalog.record(row)
    emit(p.run_id, p.checkpoint_uri, status)
    return RunOutcome(p.run_id, p.checkpoint_uri, p.action, status, seconds, error)


def _save_sweep_log(cfg: RunConfig, address: str) -> None:
    """The sweep flow run's own log lines (not its subflows', which each run folder has) to ``<output>/logs/``."""
    from prefect.runtime import flow_run

    from bif.store.run import RunStore

    try:
        text = runtime._fetch_logs(flow_run.id, address)
        name = (flow_run.flow_name or "sweep").removeprefix("bif-")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        RunStore(cfg.output, cfg.storage_options).write_log(f"{name}-{stamp}.log", redact(text, cfg.storage_options))
    except Exception as err:  # noqa: BLE001 - a log we cannot save must not fail a finished sweep
        print(f"note: could not save the sweep log under {cfg.output}/logs ({type(err).__name__})")


def sweep(cfg: RunConfig, plan: list[PlannedRun], config_hash: str, *, max_concurrent: int,
          scheduler_address: str | None, events_ref: str | None, gates_on_workers: bool = False) -> dict[str, Any]:
    """Attribute every planned run that is not complete, ``max_concurrent`` at a time on one Dask runtime
    (``gates_on_workers``: see :func:`_attribute_one`)."""
    if max_concurrent < 1:
        raise ConfigError(f"max_concurrent must be at least 1, got {max_concurrent}")
    emit = _emitter(events_ref)
    todo = [p for p in plan if p.action != SKIP]
    outcomes = {p.run_id: RunOutcome(p.run_id, p.checkpoint_uri, SKIP, "skipped", 0.0) for p in plan if p.action == SKIP}
    for p in plan:
        emit(p.run_id, p.checkpoint_uri, "skipped" if p.action == SKIP else EV_PLANNED)
    if todo:
        slots = min(max_concurrent, len(todo))
        with runtime.on_dask(cfg.compute, num_tasks=slots * cfg.sampler.num_chains, address=scheduler_address) as rt, \
                runtime.credentials(cfg.storage_options) as ref, ThreadPoolExecutor(slots) as pool:
            futures = []
            for p in todo:  # each subflow runs in a copy of this flow run's context: a child of it
                ctx = contextvars.copy_context()
                futures.append(pool.submit(ctx.run, _attribute_one, cfg, p, config_hash, address=rt.address,
                                           credentials_ref=ref, emit=emit, gates_on_workers=gates_on_workers))
            for f in futures:
                o = f.result()
                outcomes[o.run_id] = o
            _save_sweep_log(cfg, rt.address)
    catalog = Catalog(cfg.output, cfg.storage_options)
    catalog.compact()
    runs = [asdict(outcomes[p.run_id]) for p in plan]
    counts = {k: sum(r["status"] == k for r in runs)
              for k in ("skipped", S.STATUS_COMPLETE, S.STATUS_FAILED, S.STATUS_FAILED_QUALITY)}
    print("sweep of " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" into {cfg.output}")
    return {"output": cfg.output, "config_hash": config_hash, "catalog": catalog.url(S.CATALOG_FILE),
            "counts": counts, "runs": runs}


def dry_run_summary(cfg: RunConfig, plan: list[PlannedRun], config_hash: str) -> dict[str, Any]:
    """What a sweep would do, without running anything."""
    runs = [{"run_id": p.run_id, "checkpoint_uri": p.checkpoint_uri, "action": p.action,
             "status": p.previous_status, "seconds": 0.0, "error": None} for p in plan]
    counts = {a: sum(p.action == a for p in plan) for a in (RUN, RESUME, RETRY, SKIP)}
    return {"output": cfg.output, "config_hash": config_hash, "dry_run": True, "counts": counts, "runs": runs}


# ---------------------------------------------------------------- the flows


@flow(name="bif-backfill", log_prints=True)
def backfill_flow(config: dict[str, Any] | str, checkpoints: str, since: str | None = None, until: str | None = None,
                  max_concurrent: int = 2, dry_run: bool = False, output: str | None = None,
                  credentials_ref: str | None = None, secret_block: str | None = None,
                  scheduler_address: str | None = None, events_ref: str | None = None,
                  gates_on_workers: bool = False) -> dict[str, Any]:
    """Attribute every checkpoint matching ``checkpoints`` (modified in [since, until)) that has no complete run.

    ``config``: RunConfig data without credentials, or a YAML path; its ``output`` is the sweep's
    root (runs under ``runs/<run_id>/``, the catalog beside them; ``output`` replaces it); its
    ``checkpoint`` is ignored. ``since`` / ``until``: ISO dates on the checkpoint files' modification time.
    ``gates_on_workers``: each run's quality gates and report run on the workers of ``scheduler_address``
    (`bif backfill` on the kept cluster, whose workers have great_expectations and matplotlib loaded), not in the
    process of this flow.
    """
    cfg = sweep_settings(config, credentials_ref, secret_block, output)
    config_hash, plan = plan_sweep(cfg, checkpoints, since=parse_when(since, name="since"),
                                   until=parse_when(until, name="until"))
    if dry_run:
        return dry_run_summary(cfg, plan, config_hash)
    return sweep(cfg, plan, config_hash, max_concurrent=max_concurrent, scheduler_address=scheduler_address,
                 events_ref=events_ref, gates_on_workers=gates_on_workers)


@flow(name="bif-watch", log_prints=True)
def watch_flow(config: dict[str, Any] | str, checkpoints: str, max_concurrent: int = 2, output: str | None = None,
               credentials_ref: str | None = None, secret_block: str | None = None,
               scheduler_address: str | None = None, events_ref: str | None = None,
               gates_on_workers: bool = False) -> dict[str, Any]:
    """One sweep: attribute every checkpoint matching ``checkpoints`` that has no complete run for this config
    (``gates_on_workers``: as :func:`backfill_flow`)."""
    cfg = sweep_settings(config, credentials_ref, secret_block, output)
    config_hash, plan = plan_sweep(cfg, checkpoints)
    return sweep(cfg, plan, config_hash, max_concurrent=max_concurrent, scheduler_address=scheduler_address,
                 events_ref=events_ref, gates_on_workers=gates_on_workers)


def public_config(cfg: RunConfig) -> dict[str, Any]:
    """What a sweep flow receives as ``config``: public data, no credentials."""
    return cfg.public_dict() | {"storage_options": {}}



"""``bif watch`` / ``bif backfill`` / ``bif serve`` / ``bif trend``: the operations subcommands.

    bif backfill CONFIG --checkpoints GLOB [--since DATE] [--until DATE] [--max-concurrent N] [--dry-run]
    bif watch CONFIG --checkpoints GLOB [--max-concurrent N]
    bif serve [--prefect-file prefect.yaml] [--only NAME]
    bif trend OUTPUT --query Q [-k K] [--out FILE]

The sweeps run :mod:`bif.flows.backfill`'s flows in this process, against the Prefect API of
:func:`bif.flows.prefect_server.prefect_api` and a Dask cluster started here (their start-ups
overlap, as in ``bif run``); progress comes from the flow's events. ``bif serve`` builds the
deployments of ``prefect.yaml`` (:func:`build_deployments`) and serves them with Prefect's
``serve``: the same deployments ``prefect deploy`` puts on a work pool.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bif.errors import BifError, ConfigError

SWEEP_EPILOG = """Each checkpoint's run goes to <output>/runs/<run_id>/ (run_id = hash of the checkpoint's bytes and
the config without output / checkpoint / compute); every run's state goes to the catalog,
<output>/catalog.parquet. A checkpoint with a complete run for this config is skipped; a failed
or half-finished one is rerun (resumed from its committed blocks). A failure never stops the
others. Exit code 0 when every run is complete or skipped, 2 when one failed."""


# ---------------------------------------------------------------- progress


class SweepProgress:
    """Live progress on stderr: a bar over the runs to do, with done / running / failed / skipped counts."""

    def __init__(self, *, enabled: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.enabled = enabled
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, disable=not enabled)
        self.states: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.task = None

    def __enter__(self) -> "SweepProgress":
        self.progress.__enter__()
        self.task = self.progress.add_task("checkpoints", total=None)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, run_id: str, uri: str, state: str) -> None:
        self.states[run_id], self.names[run_id] = state, uri.rstrip("/").rsplit("/", 1)[-1]
        counts = {k: sum(v == k for v in self.states.values()) for k in
                  ("complete", "running", "failed", "failed_quality", "skipped", "planned")}
        todo = len(self.states) - counts["skipped"]
        done = counts["complete"] + counts["failed"] + counts["failed_quality"]
        failed = counts["failed"] + counts["failed_quality"]
        self.progress.update(self.task, total=todo, completed=done,
                             description=f"checkpoints: {counts['complete']} done, {counts['running']} running, "
                                         f"{failed} failed, {counts['skipped']} skipped")
        if state in ("complete", "failed", "failed_quality") and self.enabled:
            mark = "ok  " if state == "complete" else "FAIL"
            self.progress.console.print(f"{mark} {self.names[run_id]} ({run_id}): {state}")


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.table import Table

    from bif.flows.progress import StdoutConsole

    table = Table(title=title)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*r)
    StdoutConsole(width=160, soft_wrap=False).print(table)


def print_summary(res: dict[str, Any]) -> None:
    """The closing table of a sweep (or the plan of a dry run) on stdout."""
    dry = res.get("dry_run", False)
    rows = [[r["checkpoint_uri"], r["run_id"], r["action"], str(r["status"] or "-"),
             "" if dry else f"{r['seconds']:.1f}", (r.get("error") or "")[:160]] for r in res["runs"]]
    _table("plan (dry run: nothing runs)" if dry else "sweep", ["checkpoint", "run_id", "action",
           "previous status" if dry else "status", "" if dry else "seconds", "error"], rows)
    c = res["counts"]
    if dry:
        print(f"plan: {c['run']} to run, {c['resume']} to resume, {c['retry']} to retry, {c['skip']} skipped "
              f"(complete) into {res['output']}")
    else:
        print(f"{c['complete']} complete, {c['failed'] + c['failed_quality']} failed, {c['skipped']} skipped "
              f"(already complete); catalog: {res['catalog']}")


# ---------------------------------------------------------------- bif backfill / bif watch


def _cmd_sweep(args: argparse.Namespace) -> int:
    from bif.flows.runtime import configure_terminal

    configure_terminal(verbose=args.verbose)  # before Prefect is imported
    from bif.config import load_config
    from bif.store.catalog import parse_when

    cfg = load_config(args.config, overrides=list(args.set or []), output=args.output)
    backfill = args.command == "backfill"
    since = parse_when(getattr(args, "since", None), name="--since")
    until = parse_when(getattr(args, "until", None), name="--until")
    if args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be at least 1, got {args.max_concurrent}")
    if cfg.output.startswith("memory://"):
        raise ConfigError("output memory:// lives in one process and Dask workers cannot see it; use a path or s3://")
    from bif.flows import backfill as ops

    config_hash, plan = ops.plan_sweep(cfg, args.checkpoints, since=since, until=until)  # seconds, no server
    if backfill and args.dry_run:
        print_summary(ops.dry_run_summary(cfg, plan, config_hash))
        return 0
    if all(p.action == ops.SKIP for p in plan):  # nothing left: no server, no cluster
        print_summary({"output": cfg.output, "catalog": f"{cfg.output.rstrip('/')}/catalog.parquet",
                       "runs": [{"checkpoint_uri": p.checkpoint_uri, "run_id": p.run_id, "action": p.action,
                                 "status": "skipped", "seconds": 0.0, "error": None} for p in plan],
                       "counts": {"complete": 0, "failed": 0, "failed_quality": 0, "skipped": len(plan)}})
        return 0
    from bif.flows.prefect_server import prefect_api
    from bif.flows.runtime import credentials, dask_cluster, quiet_failure_records
    from bif.store.fs import check_writable

    check_writable(cfg.output, cfg.storage_options)  # before paying for a server and a cluster
    params: dict[str, Any] = {"config": ops.public_config(cfg), "checkpoints": args.checkpoints,
                              "max_concurrent": args.max_concurrent}
    if backfill:
        params |= {"since": args.since, "until": args.until}
    flow_fn = ops.backfill_flow if backfill else ops.watch_flow
    t0 = time.perf_counter()
    with prefect_api() as ready, dask_cluster(cfg.compute, num_tasks=args.max_concurrent * cfg.sampler.num_chains, keep=True) \
            as cluster:
        # the runs' gates and report: one run at a time on a kept cluster, on its workers, which have
        # great_expectations and matplotlib loaded (the first run of a sweep took 5.8 s instead of 2.6 s, its gates
        # importing them in this process); else here, importing them now while the first runs sample (as `bif run`
        # on a cluster of its own). Not on the workers with two runs at once: the runs' Prefect tasks then share the
        # workers' threads (report sections secede), and one publish-artifacts task found Prefect's sync client
        # closed under it (1 failed run in ~32 at --max-concurrent 2)
        from bif.flows.cli import after_sampling_imports
        from bif.flows.runtime import import_in_background

        on_workers = cluster.kept and args.max_concurrent == 1
        import_in_background(*after_sampling_imports(cfg, here=not on_workers))
        url = ready()
        if args.verbose:
            print(f"Prefect API: {url}  Dask scheduler: {cluster.address}", file=sys.stderr)
        quiet_failure_records()  # a failed run is a row of the table below, not a traceback above it
        with SweepProgress(enabled=not args.no_progress) as progress, ops.listen(progress.update) as events, \
                credentials(cfg.storage_options) as ref:
            state = flow_fn(**params, credentials_ref=ref, scheduler_address=cluster.address, events_ref=events,
                            gates_on_workers=on_workers, return_state=True)
        res = state.result()
    print_summary(res)
    print(f"time: {time.perf_counter() - t0:.1f}s")
    return 2 if res["counts"]["failed"] + res["counts"]["failed_quality"] else 0


# ---------------------------------------------------------------- bif serve


def read_prefect_file(path: str | Path) -> dict[str, Any]:
    """The parsed ``prefect.yaml``; ConfigError naming the file if it is missing or malformed."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"deployments file {str(p)!r} does not exist; run from the repository root or pass "
                          "--prefect-file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{str(p)!r} is not valid YAML: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(data.get("deployments"), list) or not data["deployments"]:
        raise ConfigError(f"{str(p)!r} has no `deployments:` list")
    return data


def import_entrypoint(entrypoint: str) -> Any:
    """The flow of a ``prefect.yaml`` entrypoint: ``flows/x.py:fn`` is the installed ``bif.flows.x:fn``."""
    import importlib

    path, _, name = entrypoint.rpartition(":")
    if path.endswith(".py"):
        parts = Path(path).with_suffix("").parts
        if parts[0] in ("flows", "tasks"):
            module = "bif." + ".".join(parts)
        else:
            from prefect.flows import load_flow_from_entrypoint

            return load_flow_from_entrypoint(entrypoint)
    else:
        module = path
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"entrypoint {entrypoint!r} does not import: {err}") from None


def schedules_of(spec: dict[str, Any]) -> list[Any]:
    """Prefect schedules from a deployment's ``schedules:`` (``cron`` / ``interval`` seconds, ``timezone``, ``active``)."""
    from prefect.schedules import Cron, Interval

    out = []
    for s in spec.get("schedules") or []:
        common = {"timezone": s.get("timezone"), "active": s.get("active", True)}
        if "cron" in s:
            out.append(Cron(s["cron"], **common))
        elif "interval" in s:
            out.append(Interval(float(s["interval"]), **common))
        else:
            raise ConfigError(f"deployment {spec.get('name')!r}: a schedule needs `cron` or `interval`, got {s}")
    return out


def build_deployments(prefect_file: str | Path, *, only: list[str] | None = None) -> list[Any]:
    """``RunnerDeployment`` objects for the deployments of ``prefect_file`` (parameters and schedules as written)."""
    from prefect.deployments.runner import EntrypointType

    specs = read_prefect_file(prefect_file)["deployments"]
    names = [s.get("name") for s in specs]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ConfigError(f"--only {', '.join(unknown)}: no such deployment in {str(prefect_file)!r} ({', '.join(names)})")
    out = []
    for spec in specs:
        if only and spec["name"] not in only:
            continue
        fl = import_entrypoint(spec["entrypoint"])
        out.append(fl.to_deployment(name=spec["name"], parameters=spec.get("parameters") or {},
                                    schedules=schedules_of(spec), description=spec.get("description"),
                                    tags=spec.get("tags") or [], entrypoint_type=EntrypointType.MODULE_PATH))
    return out


def _cmd_serve(args: argparse.Namespace) -> int:
    from bif.flows.runtime import configure_terminal

    configure_terminal(verbose=args.verbose)
    deployments = build_deployments(args.prefect_file, only=args.only)
    from prefect import serve

    from bif.flows.prefect_server import prefect_api

    with prefect_api() as ready:
        url = ready()
        for d in deployments:
            when = ", ".join(str(getattr(s, "schedule", s)) for s in d.schedules or []) or "no schedule"
            print(f"serving {d.flow_name}/{d.name} ({when})", file=sys.stderr)
        print(f"Prefect API: {url}; Ctrl-C stops serving", file=sys.stderr)
        serve(*deployments, print_starting_message=False, limit=args.limit)
    return 0


# ---------------------------------------------------------------- bif trend


def _cmd_trend(args: argparse.Namespace) -> int:
    from bif import schema as S
    from bif.store.catalog import Catalog
    from bif.store.run import RunStore
    from bif.trend import topk_trend, trend_html

    cat = Catalog(args.output)
    latest = cat.latest()
    done = latest[latest[S.STATUS] == S.STATUS_COMPLETE]
    if done.empty:
        raise BifError(f"{args.output!r} has no complete run in its catalog ({S.CATALOG_DIR}/); run "
                       "`bif backfill CONFIG --checkpoints GLOB` into it first")
    runs = []
    for _, row in done.iterrows():
        store = RunStore(row[S.OUTPUT_URI])
        store.require_complete()
        runs.append((row[S.CHECKPOINT_URI].rstrip("/").rsplit("/", 1)[-1], store.read_topk()))
    n_query = int(max(df[S.QUERY].max() for _, df in runs)) + 1
    if not 0 <= args.query < n_query:
        raise BifError(f"query {args.query} is not in the runs of {args.output!r} (queries 0..{n_query - 1})")
    trend = topk_trend(runs, query=args.query, k=args.k, direction=args.direction)
    tab = trend.table()
    _table(f"query {args.query}: rank of its top-{args.k} {args.direction} train examples per checkpoint "
           "('-': not in the top k)", ["train"] + trend.checkpoints,
           [[str(i)] + list(r) for i, r in tab.iterrows()])
    print("top-k overlap of consecutive checkpoints (Jaccard): "
          + (", ".join(f"{j:.2f}" for j in trend.jaccard) or "-"))
    page = trend_html(trend, source=args.output)
    if args.out:
        Path(args.out).write_text(page)
        out = args.out
    else:
        out = cat.write_text(f"trend-query-{args.query}.html", page)
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- registration


def register(sub: Any) -> None:
    """Add ``backfill``, ``watch``, ``serve`` and ``trend`` to the ``bif`` subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    for name in ("backfill", "watch"):
        if name == "backfill":
            p = sub.add_parser(name, help="attribute every checkpoint of a glob (and date range) not done yet",
                               description="Attribute many checkpoints: one run each, as Prefect subflows on one "
                               "Dask cluster, with a catalog.", epilog=SWEEP_EPILOG, formatter_class=fmt)
        else:
            p = sub.add_parser(name, help="one sweep: attribute every new checkpoint of a glob",
                               description="One sweep over a glob: attribute every checkpoint without a complete "
                               "run for this config (deployed on a schedule by `bif serve` / prefect.yaml).",
                               epilog=SWEEP_EPILOG, formatter_class=fmt)
        p.add_argument("config", help="YAML config; its `output` is the sweep's root, its `checkpoint` is ignored")
        p.add_argument("--checkpoints", required=True, metavar="GLOB",
                       help="checkpoint files, a local glob or s3://bucket/prefix/*.pt (quote it)")
        p.add_argument("--max-concurrent", type=int, default=2, metavar="N",
                       help="runs at once (default 2); they share one Dask cluster")
        if name == "backfill":
            p.add_argument("--since", metavar="DATE", help="only checkpoints modified at or after DATE (ISO, UTC)")
            p.add_argument("--until", metavar="DATE", help="only checkpoints modified before DATE (ISO, UTC)")
            p.add_argument("--dry-run", action="store_true", help="print the plan (run / resume / retry / skip) and stop")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        p.add_argument("--output", help="the sweep's root directory or URI (overrides `output:`)")
        p.add_argument("--no-progress", action="store_true", help="hide the progress display")
        p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's and Dask's logs")
        p.set_defaults(func=_cmd_sweep)

    s = sub.add_parser("serve", help="serve the deployments of prefect.yaml with Prefect's serve (no work pool)",
                       description="Serve the deployments of prefect.yaml (attribution, watch on its schedule, "
                       "backfill) from this process. With no PREFECT_API_URL a local Prefect server is started "
                       "and kept for as long as this runs.", formatter_class=fmt)
    s.add_argument("--prefect-file", default="prefect.yaml", help="deployments file (default ./prefect.yaml)")
    s.add_argument("--only", action="append", metavar="NAME", help="serve only this deployment (repeatable)")
    s.add_argument("--limit", type=int, default=None, help="at most this many flow runs at once")
    s.add_argument("-v", "--verbose", action="store_true", help="show Prefect's and Dask's logs")
    s.set_defaults(func=_cmd_serve)

    t = sub.add_parser("trend", help="how a query's most influential train examples change across checkpoints",
                       description="From a sweep's catalog: the rank of a query's top-k train examples at each "
                       "checkpoint (oldest first) and the overlap between neighbours; writes an HTML page.")
    t.add_argument("output", help="the sweep's root (where catalog/ is)")
    t.add_argument("--query", type=int, required=True, help="query sample id")
    t.add_argument("-k", "--k", type=int, default=5, help="top k per checkpoint (default 5)")
    t.add_argument("--direction", choices=["positive", "negative"], default="positive",
                   help="positive: upweighting raises the query's loss (default)")
    t.add_argument("--out", help="local HTML file to write (default <output>/trend-query-Q.html)")
    t.set_defaults(func=_cmd_trend)

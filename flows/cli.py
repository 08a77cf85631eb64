"""``bif``: command-line interface of bif-pipeline.

    bif run CONFIG [--set sampler.num_draws=400] [--output s3://bucket/runs/x]
    bif show OUTPUT --query 3
    bif example digits CHECKPOINT
    bif keys
    bif report OUTPUT        bif lds CONFIG        bif calibrate CONFIG        bif compare
    bif server status|start|stop
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from bif.errors import BifError

#: Set by :func:`main` when it runs as the ``bif`` command (not called in-process with ``argv``):
#: long commands may then end with :func:`bif.flows.runtime.exit_now` once their output is written.
_EXIT_NOW = False

EPILOG = """examples:
  bif example digits runs/example/digits.pt          # train the built-in example's checkpoint
  bif run bif/examples/digits.yaml                    # attribution on embedded defaults
  bif example tinylm                                  # a tiny GPT-2 with planted facts (runs/example/tinylm)
  bif run bif/examples/tinylm.yaml                    # per-token attribution of the tiny LM
  bif run cfg.yaml --set sampler.num_draws=400 --output s3://bucket/runs/x
  bif show runs/example/digits --query 3             # top train examples for query 3
  bif keys                                           # every config key, default and meaning
  bif report runs/example/digits                     # regenerate report.html
  bif lds cfg.yaml / bif calibrate cfg.yaml / bif compare   # LDS benchmark, sampler calibration, README table

With no PREFECT_API_URL set, `bif run`, `bif lds` and `bif calibrate` use a local Prefect
server that the first of them starts in the background and later ones reuse (it stops after
an idle hour, or the kept cluster's longer wait, or with `bif server stop`); with it set, they
report to that server. A warm bif process (BIF_WARM=0: off) lets a later `bif run` start without
importing Prefect again. The terminal shows progress and a summary; -v shows the logs, which
always go to <output>/logs/.
Exit codes: 0 ok, 1 unexpected error, 2 bad input or failed run (the message names the
problem and the fix)."""


def _cmd_run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    from bif.flows.runtime import configure_terminal

    configure_terminal(verbose=args.verbose)  # before Prefect is imported
    from bif.config import load_config
    from bif.flows.prefect_server import api_available_now, prefect_api, quiet_prefect_env

    overrides = list(args.set or []) + (["quality.allow_warnings=true"] if args.allow_warnings else [])
    cfg = load_config(args.config, overrides=overrides, output=args.output)
    quiet_prefect_env()
    from bif.flows.runtime import cluster_in_background, import_in_background, problem_preload

    def cluster():
        # the workers boot (and build the problem: imports, checkpoint) on the other cores
        return cluster_in_background(cfg.compute, num_tasks=cfg.sampler.num_chains,
                                     warm_modules=problem_preload(cfg.problem),
                                     warm=functools.partial(_warm_problem, cfg), keep=True)

    with contextlib.ExitStack() as stack:
        # A Prefect API that is already up (the kept server, or PREFECT_API_URL) costs nothing to
        # use, so the Dask cluster starts now, beside the pre-flight checks. Otherwise nothing
        # starts before those checks pass: bad input fails in seconds, before any server.
        early = api_available_now()
        if early:
            ready, pending = stack.enter_context(prefect_api()), stack.enter_context(cluster())
        from bif.flows.kept_cluster import enabled as keep_enabled

        try:
            # output, problem, checkpoint, losses at w*, identity, lease: before any server starts
            waited = 0.0  # seconds the pre-flight waited for the cluster to come up
            if early and keep_enabled(cfg.compute):
                waited = _preflight_on_kept_cluster(cfg, pending)
            else:
                from bif.tasks import pipeline

                pipeline.preflight(cfg)
        except BifError as err:
            if early and _EXIT_NOW:  # leave at once: the starting cluster's workers are killed with us
                from bif.flows.runtime import exit_now

                exit_now(_report_error(err))
            raise
        from bif.flows.attribution import run_attribution

        t0 = time.perf_counter()  # what the run waits for the server and the cluster after its checks
        if not early:
            ready, pending = stack.enter_context(prefect_api()), stack.enter_context(cluster())
        # the gates and the report run where great_expectations and matplotlib are loaded already: a kept cluster's
        # workers, else this process, which loads them while the cluster starts
        import_in_background(_warm_flow_call, *after_sampling_imports(cfg, here=not keep_enabled(cfg.compute)))
        url = ready()  # the server (kept, or booting) and the cluster start concurrently
        address = pending().address
        startup = waited + time.perf_counter() - t0
        if args.verbose:
            print(f"Prefect API: {url}  Dask scheduler: {address}", file=sys.stderr)
        manifest = run_attribution(cfg, show_progress=not args.no_progress, address=address,
                                   cluster_startup_seconds=startup, gates_on_workers=pending().kept)
        code = _print_run_summary(manifest, cfg, wall=time.perf_counter() - t_start)
        if _EXIT_NOW:  # everything is written: skip the cluster's graceful close and the interpreter teardown
            from bif.flows.runtime import exit_now

            exit_now(code)
    return code


def _preflight(cfg) -> None:
    """:func:`bif.tasks.pipeline.preflight` as a Dask task (this module, not the pipeline, is what gets pickled)."""
    from bif.tasks import pipeline

    pipeline.preflight(cfg)


def _preflight_on_kept_cluster(cfg, pending) -> float:
    """The pre-flight on a worker of the kept cluster, whose workers are idle while this process imports the flow
    (torch, Prefect: seconds of its core). Builds the problem there, not here. Without a kept cluster (another
    command uses it, or it did not start) the pre-flight runs here, as before. Returns the seconds it waited for the
    cluster (the run's "server+cluster start": a cluster started or replaced by this command takes seconds)."""
    from bif.flows.attribution import run_attribution  # noqa: F401 - imported now, while the cluster comes up

    t0 = time.perf_counter()
    cluster = pending()
    waited = time.perf_counter() - t0
    if not cluster.kept:
        from bif.tasks import pipeline

        pipeline.preflight(cfg)
        return waited
    from distributed import Client

    from bif.flows.runtime import import_in_background

    import_in_background(_warm_flow_call)  # while this process waits for the pre-flight on the worker
    with Client(cluster.address, set_as_default=False) as client:
        client.submit(_preflight, cfg, pure=False).result()  # raises the pre-flight's BifError here
    return waited


def _warm_flow_call() -> None:
    """Import what calling a Prefect flow imports on its first call: FastAPI's ``jsonable_encoder``, with which
    Prefect serializes the flow's parameters (about 0.15 s, otherwise on the way to the first draw)."""
    import fastapi.encoders  # noqa: F401


def after_sampling_imports(cfg, *, here: bool = True) -> list:
    """What the flow's gates and report will import in this process, as warm-up calls: nothing on a kept cluster,
    whose workers run both (their forkserver has great_expectations and matplotlib loaded)."""
    if not here:
        return []
    from bif import report
    from bif.quality import expectations

    return ([expectations.warm] if cfg.quality.enabled else []) + [report.warm]


def _warm_problem(cfg) -> float:
    """:func:`bif.tasks.pipeline.warm_problem` on a worker (this module, not the pipeline, is what gets pickled)."""
    from bif.tasks.pipeline import warm_problem

    return warm_problem(cfg)


def _print_run_summary(manifest: dict, cfg, *, wall: float | None) -> int:
    if manifest.get("skipped"):
        from bif.store.manifest import read_manifest

        print(f"run at {cfg.output} is already complete; nothing to do (it is shown below)")
        manifest, wall = read_manifest(cfg.output, cfg.storage_options) or manifest, None
    for line in run_summary(manifest, cfg.output, wall_seconds=wall):
        print(line)
    quality = manifest.get("quality") or {}
    for w in quality.get("warnings", []):
        print(f"warning: gate {w.get('gate')} [{w.get('expectation')}]: {w.get('detail')}", file=sys.stderr)
    return 0 if manifest.get("status") == "complete" else 2


#: Stage durations of the manifest's ``timings``, in run order, with their labels.
#: The gates and the diagnostics run at once (``checks_s``: from the covariance's end until both are done; the
#: diagnostics start beside the covariance, so ``diagnostics_s`` may exceed it); older manifests timed them one
#: after the other.
STAGES = (("cluster_startup_s", "server+cluster start"), ("prepare_s", "prepare"), ("sampling_s", "sampling"),
          ("covariance_s", "covariance"), ("checks_s", "gates+diagnostics"), ("gates_s", "gates"),
          ("diagnostics_s", "diagnostics"), ("report_s", "report"))


def run_summary(manifest: dict, output: str, *, wall_seconds: float | None = None) -> list[str]:
    """The closing lines of ``bif run``: status, resolved values, durations, gates, R-hat/ESS, where to look."""
    out = output.rstrip("/")
    lines = [f"status: {manifest.get('status')}   output: {out}"]
    r = manifest.get("resolved") or {}
    if r:
        nbeta_note = ""
        if (manifest.get("config") or {}).get("sampler", {}).get("nbeta") is None:  # the default: one per sample
            nbeta_note = " (= valid train tokens)" if manifest.get("n_train_tokens") else " (= n_train)"
        lines.append(f"sampler: nβ={r.get('nbeta'):g}{nbeta_note}  γ={r.get('gamma'):g}  ε={r.get('step_size'):g}  "
                     f"device={r.get('device')}")
    t = manifest.get("timings") or {}
    skip = ("gates_s", "diagnostics_s") if isinstance(t.get("checks_s"), (int, float)) else ()
    parts = [f"{label} {t[k]:.1f}s" for k, label in STAGES if isinstance(t.get(k), (int, float)) and k not in skip]
    if parts:
        total = wall_seconds if wall_seconds is not None else t.get("total_s")
        lines.append((f"time: {total:.1f}s = " if isinstance(total, (int, float)) else "time: ") + ", ".join(parts))
    q = manifest.get("quality")
    if q:
        verdict = "passed" if q.get("passed") else "FAILED"
        failed = ", ".join(f.get("gate", "?") for f in q.get("failed") or [])
        lines.append(f"gates: {verdict} ({q.get('num_expectations')} checks"
                     + (f"; failed: {failed}" if failed else "")
                     + (f"; {len(q.get('warnings') or [])} warnings" if q.get("warnings") else "") + ")")
    d = manifest.get("diagnostics")
    if d and d.get("rhat"):
        n = sum((d.get("num_samples") or {}).values()) if isinstance(d.get("num_samples"), dict) else None
        above = d.get("num_rhat_above_threshold")
        lines.append(f"R-hat: max {d['rhat'].get('max', float('nan')):.3f}, median {d['rhat'].get('q50', float('nan')):.3f}"
                     f"; {above}{f' of {n}' if n else ''} traces above {d.get('rhat_threshold')}"
                     f"   ESS bulk: median {d.get('ess_bulk', {}).get('q50', float('nan')):.0f}, "
                     f"min {d.get('ess_bulk', {}).get('min', float('nan')):.0f}")
    if manifest.get("status") == "complete":
        from bif import schema as S

        tokens = "  (per token: --tokens)" if S.TOPK_TOKENS_FILE in (manifest.get("token_outputs") or ()) else ""
        lines.append(f"top-k: bif show {out} --query 0{tokens}     report: {out}/report.html     logs: {out}/logs/")
    else:
        lines.append(f"logs: {out}/logs/")
    return lines


def _cmd_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    from bif import schema as S
    from bif.flows.progress import StdoutConsole as Console
    from bif.store.run import RunStore

    store = RunStore(args.output)
    store.require_complete()
    if getattr(args, "tokens", False):
        from bif.tasks.tokens import show_tokens

        Console().print(show_tokens(store, query=args.query, k=args.k))
        return 0
    df = store.read_topk()
    if df is None:
        raise BifError(f"{args.output!r} has no {S.TOPK_FILE}; rerun the run to write it")
    sel = df[(df[S.QUERY] == args.query) & (df[S.RANK] < args.k)]
    if sel.empty:
        raise BifError(f"query {args.query} is not in {args.output} (queries 0..{int(df[S.QUERY].max())})")
    console = Console()
    for direction, title in (("positive", "raise"), ("negative", "lower")):
        table = Table(title=f"query {args.query}: train examples whose upweighting would {title} its loss")
        for col in ("rank", "train", "bif", "bif_corr"):
            table.add_column(col, justify="right")
        for _, r in sel[sel[S.DIRECTION] == direction].iterrows():
            table.add_row(str(r[S.RANK]), str(r[S.TRAIN]), f"{r[S.BIF]:.4g}", f"{r[S.BIF_CORR]:+.3f}")
        console.print(table)
    return 0


#: Where `bif example digits` saves its checkpoint by default: where bif/examples/digits.yaml reads it.
DIGITS_CHECKPOINT = "runs/example/digits.pt"


def _cmd_example(args: argparse.Namespace) -> int:
    if args.name == "tinylm":
        from bif.examples.tinylm import DEFAULT_DIR, TinyLMSpec, save_example

        out = save_example(args.checkpoint or DEFAULT_DIR, seed=args.seed, spec=TinyLMSpec(steps=args.epochs))
        print(f"wrote the tiny LM (query fact accuracy {out['query_fact_accuracy']:.2f}, "
              f"{out['seconds']:.0f} s) to {out['dir']}")
        return 0
    from bif.examples.digits import save_checkpoint

    path = save_checkpoint(args.checkpoint or DIGITS_CHECKPOINT, epochs=args.epochs)
    print(f"wrote digits checkpoint to {path}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from bif.config import config_reference

    print(config_reference())
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from bif.flows import prefect_server as ps

    def describe(info: ps.ServerInfo) -> str:
        since = datetime.fromtimestamp(info.started_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (f"{info.url}  (pid {info.pid}, Prefect {info.prefect_version}, since {since}, "
                f"home {info.prefect_home})")

    from bif.flows import kept_cluster as kc

    def describe_cluster(info: kc.KeptClusterInfo) -> str:
        since = datetime.fromtimestamp(info.started_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{info.address}  (pid {info.pid}, since {since}, stops after {info.idle_timeout_s:.0f} s idle)"

    from bif.flows import warm

    if args.action == "status":
        info = ps.server_status()
        cluster = kc.status()
        print(f"kept Dask cluster: {describe_cluster(cluster)}" if cluster else
              "no kept Dask cluster runs (the next `bif run` starts one)")
        w = warm.status()
        print(f"warm bif process: pid {w['pid']} (`bif run`, `bif backfill`, `bif watch`, `bif lds` and "
              "`bif calibrate` start as copies of it, "
              "their imports done)" if w else
              "no warm bif process runs (the next `bif run`, `bif lds` or `bif calibrate` starts one)")
        if info is None:
            print(f"no local Prefect server runs for {ps.prefect_home()} (the next `bif run` starts one)")
            return 3
        print(f"running: {describe(info)}")
        return 0
    if args.action == "start":
        ps.quiet_prefect_env()
        info = ps.ensure_server(idle_timeout_s=args.idle_timeout)
        print(f"running: {describe(info)}")
        return 0
    w = warm.stop()
    if w is not None:
        print(f"stopped the warm bif process (pid {w['pid']})")
    cluster = kc.stop()
    if cluster is not None:
        print(f"stopped the kept Dask cluster: {describe_cluster(cluster)}")
    info = ps.stop_server()
    print(f"stopped: {describe(info)}" if info else f"no local Prefect server ran for {ps.prefect_home()}")
    return 0


def _with_examples(sub: Any, name: str, *, help: str, description: str, examples: list[str]) -> Any:
    """A subcommand whose --help ends with example command lines, one per line (the description wrapped here, as
    RawDescriptionHelpFormatter keeps the epilog's line breaks and wraps neither)."""
    import textwrap

    return sub.add_parser(name, help=help, description=textwrap.fill(description, width=79),
                          epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bif", description="Training-data attribution with local Bayesian "
                                "influence functions (BIF = -Cov over SGLD draws).", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="sample chains, reduce the covariance, write bif.zarr + topk.parquet",
                       description="Run attribution for a config. Outputs go to <output>/ (see README: Output schema).")
    r.add_argument("config", help="YAML config (see `bif keys` for every key)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set sampler.num_draws=400 (repeatable)")
    r.add_argument("--output", help="output directory or URI (overrides `output:`)")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    r.add_argument("--allow-warnings", action="store_true",
                   help="report failed quality gates as warnings instead of failing the run")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="show Prefect's and Dask's logs on the terminal (they always go to <output>/logs/)")
    r.set_defaults(func=_cmd_run)

    s = _with_examples(sub, "show", help="print the top train examples for a query of a finished run",
                       description="The train examples whose upweighting would most raise (positive BIF) and most "
                       "lower (negative) the loss of query QUERY, from <output>/topk.parquet; --tokens: per token of "
                       "a language model's query sequence, from topk_tokens.parquet.",
                       examples=["bif show runs/example/digits --query 3",
                                 "bif show runs/example/tinylm-run --query 0 --tokens -k 3",
                                 "bif show s3://bucket/runs/x --query 3 -k 20"])
    s.add_argument("output", help="run output directory or URI")
    s.add_argument("--query", type=int, required=True, help="query sample id")
    s.add_argument("-k", "--k", type=int, default=10, help="rows per direction (default 10)")
    s.add_argument("--tokens", action="store_true",
                   help="token runs: for each valid token of query sequence QUERY, its top-k train tokens per sign "
                        "(from topk_tokens.parquet)")
    s.set_defaults(func=_cmd_show)

    e = _with_examples(sub, "example", help="train and save a built-in example's checkpoint",
                       description="Train a built-in example here (no download) and save what its config reads: "
                       "digits, a small MLP on scikit-learn's 8x8 digits (a state dict); tinylm, a tiny GPT-2 with "
                       "planted facts (model, tokenizer and text files).",
                       examples=["bif example digits                    # runs/example/digits.pt; then bif run "
                                 "bif/examples/digits.yaml",
                                 "bif example tinylm                    # runs/example/tinylm/; then bif run "
                                 "bif/examples/tinylm.yaml",
                                 "bif example digits ckpts/e010.pt --epochs 10   # a checkpoint early in training"])
    e.add_argument("name", choices=["digits", "tinylm"], help="example problem")
    e.add_argument("checkpoint", nargs="?", metavar="PATH", help="digits: where to save the state dict (default "
                   f"{DIGITS_CHECKPOINT}, which bif/examples/digits.yaml reads); tinylm: the model + corpus directory "
                   "(default runs/example/tinylm)")
    e.add_argument("--seed", type=int, default=0, help="tinylm: corpus, init and training seed (default 0)")
    e.add_argument("--epochs", type=int, default=300,
                   help="full-batch training steps: digits' Adam epochs, tinylm's AdamW steps (default 300)")
    e.set_defaults(func=_cmd_example)

    k = sub.add_parser("keys", help="list every config key with its default and description",
                       description="Every key a config may set (problem, sampler, covariance, quality, compute, "
                       "...), with its default and meaning; set one in the config's YAML, or for one run on the "
                       "command line (see `bif run --help`).")
    k.set_defaults(func=_cmd_keys)

    sv = sub.add_parser("server", help="the local Prefect server and Dask cluster that commands keep between runs",
                        description="With no PREFECT_API_URL, `bif run` / `bif lds` / `bif calibrate` start a local "
                        "Prefect server for <PREFECT_HOME> in the background on first use and reuse it afterwards. "
                        "They also keep their Dask cluster (compute.keep_cluster; BIF_KEEP_CLUSTER=0 turns it off), "
                        "reused by the next command with the same set-up and stopped after compute.keep_cluster_idle_s "
                        "(default 600 s; set it above a scheduled command's interval), and a "
                        "warm bif process whose copy runs the next `bif run`, `bif backfill`, `bif watch`, "
                        "`bif lds` or `bif calibrate` with its "
                        "imports done (BIF_WARM=0 turns it off), kept as long as the cluster. status: show all "
                        "three (exit 3 when no server "
                        "runs); start: start the server now; stop: stop all three.")
    sv.add_argument("action", choices=["status", "start", "stop"],
                    help="status: show the server, cluster and warm process; start: start the server; stop: stop all")
    sv.add_argument("--idle-timeout", type=float, default=3600.0, metavar="SECONDS",
                    help="with start: stop after this long without an API request (default 3600)")
    sv.set_defaults(func=_cmd_server)

    for module in ("bif.flows.cli_report", "bif.flows.cli_lds", "bif.flows.cli_ops"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError:
            continue
        mod.register(sub)
    return p


def _report_error(err: BifError) -> int:
    """Print a user error the one way every command does; returns its exit code."""
    print(f"error: {err}", file=sys.stderr)
    return err.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    global _EXIT_NOW
    if argv is None:  # the `bif` command: a warm copy of it may run it with its imports done (bif.flows.warm)
        from bif.flows.warm import run_in_warm_copy, with_working_directory

        # `problem: my_module:build` finds my_module.py beside the user, as with `python -m` (a console script's
        # sys.path has its own folder instead); last, so that it never hides an installed module
        sys.path[:] = with_working_directory(sys.path)

        code = run_in_warm_copy(sys.argv[1:])
        if code is not None:
            return code
    parser = build_parser()
    args = parser.parse_args(argv)
    _EXIT_NOW = argv is None
    interrupted = _note_interrupts()
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
        return code
    except KeyboardInterrupt:
        return _interrupted()
    except BifError as err:
        return _interrupted() if interrupted else _report_error(err)
    except BrokenPipeError:
        # stdout closed early (`bif keys | head -1`): stop quietly, like other Unix tools; point
        # stdout at devnull so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception:  # noqa: BLE001
        if interrupted:
            return _interrupted()
        traceback.print_exc()
        return 1
    finally:
        _restore_interrupts()


def _interrupted() -> int:
    print("interrupted; committed blocks are kept and a rerun resumes them", file=sys.stderr)
    return 130


def _note_interrupts() -> list[int]:
    """A list that gets an entry when SIGINT arrives (Python's own handler then raises KeyboardInterrupt, as
    before). Ctrl-C can land inside code that turns the KeyboardInterrupt into another error (pydantic's
    serializer in Prefect's engine did: exit 1 and a traceback); the command still exits 130 then. Only when
    SIGINT has Python's default handler, in the main thread."""
    import signal
    import threading

    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return seen

    def note(signum: int, frame: Any) -> None:
        seen.append(signum)
        signal.default_int_handler(signum, frame)

    note.bif_note = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGINT, note)
    return seen


def _restore_interrupts() -> None:
    """Python's default SIGINT handler again, when :func:`_note_interrupts` replaced it."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and \
            getattr(signal.getsignal(signal.SIGINT), "bif_note", False):
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())

"""``bif``: command-line interface of bif-pipeline.

    bif run CONFIG [--set sampler.num_draws=400] [--output s3://bucket/runs/x]
    bif show OUTPUT --query 3
    bif example digits CHECKPOINT
    bif keys
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from bif.errors import BifError

EPILOG = """examples:
  bif example digits runs/example/digits.pt          # train the built-in example's checkpoint
  bif run bif/examples/digits.yaml                    # attribution on embedded defaults
  bif run cfg.yaml --set sampler.num_draws=400 --output s3://bucket/runs/x
  bif show runs/example/digits --query 3             # top train examples for query 3
  bif keys                                           # every config key, default and meaning

With no PREFECT_API_URL set, `bif run` starts and stops a local Prefect server itself;
with it set, the run reports to that server. Exit codes: 0 ok, 1 unexpected error,
2 bad input or failed run (the message names the problem and the fix)."""


def _cmd_run(args: argparse.Namespace) -> int:
    from bif.config import load_config
    from bif.prefect_server import prefect_api, quiet_prefect_env

    overrides = list(args.set or []) + (["quality.allow_warnings=true"] if args.allow_warnings else [])
    cfg = load_config(args.config, overrides=overrides, output=args.output)
    from tasks.pipeline import preflight
    preflight(cfg)  # output, problem, checkpoint, losses at w*, identity, lease: in seconds, before any server
    quiet_prefect_env()
    from bif.storage import check_writable
    from flows.attribution import dask_cluster, run_attribution

    check_writable(cfg.output, cfg.storage_options)  # fail before paying for a server and a cluster
    with prefect_api() as ready, dask_cluster(cfg) as address:  # both boot concurrently
        print(f"Prefect API: {ready()}  Dask scheduler: {address}", file=sys.stderr)
        manifest = run_attribution(cfg, show_progress=not args.no_progress, address=address)
    print(f"status: {manifest.get('status')}  output: {cfg.output}")
    quality = manifest.get("quality") or {}
    for w in quality.get("warnings", []):
        print(f"warning: gate {w.get('gate')} [{w.get('expectation')}]: {w.get('detail')}", file=sys.stderr)
    if manifest.get("status") == "complete":
        print(f"report: {cfg.output.rstrip('/')}/report.html   top-k: bif show {cfg.output} --query 0")
    t = manifest.get("timings") or {}
    if t:
        print("timings: " + ", ".join(f"{k}={v:.1f}s" for k, v in t.items() if isinstance(v, float)))
    return 0 if manifest.get("status") == "complete" else 2


def _cmd_show(args: argparse.Namespace) -> int:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from bif import schema as S
    from bif.manifest import require_complete
    from bif.storage import get_fs, join

    require_complete(args.output)
    fs, root = get_fs(args.output)
    with fs.open(join(root, S.TOPK_FILE), "rb") as f:
        df = pd.read_parquet(f)
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


def _cmd_example(args: argparse.Namespace) -> int:
    from bif.examples.digits import save_checkpoint

    path = save_checkpoint(args.checkpoint, epochs=args.epochs)
    print(f"wrote digits checkpoint to {path}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from bif.config import config_reference

    print(config_reference())
    return 0


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
    r.set_defaults(func=_cmd_run)

    s = sub.add_parser("show", help="print the top train examples for a query of a finished run")
    s.add_argument("output", help="run output directory or URI")
    s.add_argument("--query", type=int, required=True, help="query sample id")
    s.add_argument("-k", "--k", type=int, default=10, help="rows per direction (default 10)")
    s.set_defaults(func=_cmd_show)

    e = sub.add_parser("example", help="train and save a built-in example's checkpoint")
    e.add_argument("name", choices=["digits"], help="example problem")
    e.add_argument("checkpoint", help="where to save the state dict")
    e.add_argument("--epochs", type=int, default=300, help="full-batch Adam epochs (default 300)")
    e.set_defaults(func=_cmd_example)

    k = sub.add_parser("keys", help="list every config key with its default and description")
    k.set_defaults(func=_cmd_keys)

    for module in ("bif.cli_report", "bif.cli_lds"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError:
            continue
        mod.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BifError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted; committed blocks are kept and a rerun resumes them", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())

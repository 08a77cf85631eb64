"""``bif report <uri>``: regenerate a run's self-contained ``report.html``.

``register(subparsers)`` adds the subcommand to the main argparse parser (flows/cli.py).
With ``--problem-from-config`` the problem named in ``<uri>/config.json`` is rebuilt
(factory, problem_args, checkpoint) so the report can draw the examples themselves
(images for digits, snippets for text); if that fails, the report is written without them.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from bif import schema as S
from bif.errors import BifError, StorageError


def problem_from_config(uri: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The problem of the run at ``uri``, rebuilt from its config.json; None (with a note on stderr) if impossible."""
    from bif.problem import load_problem
    from bif.store.run import RunStore

    data = RunStore(uri, storage_options or {}).read_config()
    if data is None:
        print(f"note: {uri}/{S.CONFIG_FILE} is missing; writing the report without example images", file=sys.stderr)
        return None
    cfg = data.get("config", data)
    try:
        return load_problem(cfg["problem"], cfg.get("problem_args") or {}, checkpoint=cfg.get("checkpoint"),
                            storage_options=storage_options)
    except (BifError, KeyError, TypeError, ValueError, ImportError) as err:
        print(f"note: could not rebuild the problem from {S.CONFIG_FILE} ({type(err).__name__}: {err}); "
              "writing the report without example images", file=sys.stderr)
        return None


def _cmd_report(args: argparse.Namespace) -> int:
    from bif.report import write_report
    from bif.store.run import RunStore

    try:
        opts = json.loads(args.storage_options) if args.storage_options else {}
    except json.JSONDecodeError as err:
        print(f"error: --storage-options must be a JSON object, e.g. '{{\"anon\": true}}' ({err})", file=sys.stderr)
        return 2
    store = RunStore(args.uri, opts)
    if not (store.exists(S.MANIFEST_FILE) or store.exists(S.CONFIG_FILE)):
        raise StorageError(f"{args.uri!r} holds no {S.MANIFEST_FILE} or {S.CONFIG_FILE}: is it a bif run output?")
    problem = problem_from_config(args.uri, opts) if args.problem_from_config else None
    path = write_report(args.uri, opts, problem=problem, num_queries=args.queries, k=args.k)
    print(path)
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("report", help="regenerate <uri>/report.html (self-contained, embedded images)",
                              description=__doc__.split("\n\n")[0].replace("``", "`"))
    p.add_argument("uri", help="run output directory or URI")
    p.add_argument("--problem-from-config", action="store_true",
                   help="rebuild the problem from <uri>/config.json to draw the top examples (images / snippets)")
    p.add_argument("--queries", type=int, default=3, help="queries whose top examples are shown (default 3)")
    p.add_argument("-k", "--k", type=int, default=5, help="examples per direction and query (default 5)")
    p.add_argument("--storage-options", default=None,
                   help="fsspec storage options as JSON (credentials are better left to the environment)")
    p.set_defaults(func=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m bif.flows.cli_report <uri>``), for when flows/cli.py is not at hand."""
    parser = argparse.ArgumentParser(prog="bif")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except BifError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""``bif lds``, ``bif calibrate`` and ``bif compare``: registered on the main CLI by :func:`register`.

    bif lds CONFIG [--num-subsets 100 --num-seeds 3 --alpha 0.5 --methods bif,influence,graddot,gradcos]
    bif calibrate CONFIG [--quick]               # writes <output>/calibration/sampler.yaml + search.png
    bif compare [--sizes 200,800,full]           # the README table and plot (benchmarks/lds_table.py)
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bif.evaluation.settings import CalibrationSettings


def _load(args: argparse.Namespace):
    from bif.flows.runtime import configure_terminal

    configure_terminal(verbose=args.verbose)  # before Prefect is imported
    from bif.config import load_config

    return load_config(args.config, overrides=args.set or [], output=args.output)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (problem, checkpoint, output, sampler)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--output", help="output directory or URI (overrides `output:`)")
    p.add_argument("--address", help="join this Dask scheduler instead of starting a LocalCluster")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Prefect's and Dask's logs on the terminal (they always go to <output>/logs/)")


def _settings_error(err: Exception, what: str) -> Exception:
    """A ConfigError naming the bad setting as its CLI flag, from a pydantic ValidationError or a ValueError."""
    from pydantic import ValidationError

    from bif.errors import ConfigError

    if isinstance(err, ValidationError):
        parts = []
        for e in err.errors():
            field = ".".join(str(x) for x in e.get("loc", ()))
            flag = "--" + field.replace("_", "-") if field and "." not in field else field
            parts.append(f"{flag} = {e.get('input')!r}: {e.get('msg')}")
        return ConfigError(f"bad {what} setting: " + "; ".join(parts) + f". See `bif {what} --help`.")
    return ConfigError(f"{what} failed: {err}")


def _flow_errors(what: str):
    """Turn ValueErrors (and pydantic ValidationErrors) from the settings and the flow into ConfigErrors."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except ValueError as err:
            raise _settings_error(err, what) from None

    return guard()


def cmd_lds(args: argparse.Namespace) -> int:
    """Run the LDS flow and print one line per method."""
    cfg = _load(args)
    from bif.evaluation.settings import LDSSettings, MethodOptions
    from bif.flows.prefect_server import prefect_api

    with _flow_errors("lds"):
        settings = LDSSettings(alpha=args.alpha, num_subsets=args.num_subsets, num_seeds=args.num_seeds,
                               seed=args.seed, methods=tuple(m for m in args.methods.split(",") if m),
                               options=MethodOptions(damping=args.damping))
    from bif.flows.lds import run_lds

    t0 = time.perf_counter()
    with prefect_api() as ready:
        url = ready()
        if args.verbose:
            print(f"Prefect API: {url}", file=sys.stderr)
        with _flow_errors("lds"):
            res = run_lds(cfg, settings, address=args.address, run_name=args.run_name, keep=True)
    print(f"ground truth: {res['ground_truth_uri']} ({'reused' if res['cached'] else 'retrained'}, "
          f"{res['num_retrained']} retrainings)")
    for r in res["methods"]:
        print(f"{r['method']:>16}  LDS {r['lds']:+.3f} ± {r['stderr']:.3f}  {r['seconds']:.1f} s")
        for message in r.get("warnings", ()):
            print(f"{'':>16}  warning: {message}")
    print(f"summary: {res['summary_uri']}  wall time {time.perf_counter() - t0:.1f} s")
    print(f"logs: {cfg.output.rstrip('/')}/logs/")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Run the calibration flow and print the recommended sampler block."""
    cfg = _load(args)
    import yaml

    from bif.flows.prefect_server import prefect_api

    with _flow_errors("calibrate"):
        settings = calibration_settings(args)
    from bif.flows.calibrate import run_calibration, summary_lines

    t0 = time.perf_counter()
    with prefect_api() as ready:
        url = ready()
        if args.verbose:
            print(f"Prefect API: {url}", file=sys.stderr)
        with _flow_errors("calibrate"):
            res = run_calibration(cfg, settings, address=args.address, keep=True)
    print(yaml.safe_dump({"sampler": res["sampler"]}, sort_keys=False))
    if not res["healthy"]:
        print("warning: no setting passed every diagnostic; the best non-diverged one is shown", file=sys.stderr)
    print(f"outputs: {res['output_uri']} (sampler.yaml, search.png, scores.json)  "
          f"wall time {time.perf_counter() - t0:.1f} s")
    for line in summary_lines(res, settings):
        print(line)
    print(f"logs: {cfg.output.rstrip('/')}/logs/")
    return 0


def calibration_settings(args: argparse.Namespace) -> CalibrationSettings:
    """The CalibrationSettings of `bif calibrate`'s options (``--quick``'s grid unless the options name one)."""
    from bif.evaluation.settings import CalibrationSettings

    extra = {k: v for k, v in {"round0_draws": args.num_draws, "budget_seconds": args.budget_seconds,
                               "budget_retrainings": args.budget_retrainings,
                               "nbeta_mults": _floats(args.nbeta_mults), "lambdas": _floats(args.lambdas),
                               "num_rounds": args.num_rounds}.items() if v is not None}
    if args.quick:
        extra = {"nbeta_mults": (1.0, 10.0), "lambdas": (0.01, 0.1), "num_rounds": 2} | extra
    return CalibrationSettings(num_subsets=args.num_subsets, num_chains=args.num_chains,
                               pilot_steps=args.pilot_steps, target_share=args.target_share, **extra)


def _floats(text: str | None) -> tuple[float, ...] | None:
    """'1,3,10' -> (1.0, 3.0, 10.0); None stays None."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        from bif.errors import ConfigError

        raise ConfigError(f"expected comma-separated numbers, got {text!r} (e.g. --lambdas 0.003,0.03)") from None


def cmd_compare(args: argparse.Namespace) -> int:
    """Regenerate docs/lds_table.md, docs/lds_table.json and docs/lds_vs_n.png."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lds_table.py"
    spec = importlib.util.spec_from_file_location("lds_table", path)
    if spec is None or not path.exists():
        from bif.errors import BifError

        raise BifError(f"{path} not found; `bif compare` runs from a source checkout of bif-pipeline")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # options not given keep the table's own declared defaults (benchmarks/lds_table.py): one source
    argv = ["--sizes", args.sizes]
    for flag, value in (("--num-subsets", args.num_subsets), ("--num-seeds", args.num_seeds),
                        ("--bif-draws", args.bif_draws)):
        argv += [flag, str(value)] if value is not None else []
    argv += ["--cache", args.cache] if args.cache else []
    argv += ["--docs", args.docs] if args.docs else []
    with _flow_errors("compare"):
        return mod.main(argv + (["--skip-optional"] if args.skip_optional else []))


def register(subparsers) -> None:
    """Add the ``lds``, ``calibrate`` and ``compare`` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser("lds", help="retraining benchmark: LDS of BIF and the classical baselines",
                              description="Draw subsets, retrain on each (cached under <output>/lds/), score methods.")
    _common(p)
    p.add_argument("--alpha", type=float, default=0.5, help="subset fraction (default 0.5)")
    p.add_argument("--num-subsets", type=int, default=100, help="M subsets (default 100)")
    p.add_argument("--num-seeds", type=int, default=3, help="retraining seeds per subset (default 3)")
    p.add_argument("--seed", type=int, default=0, help="root seed of subsets and retrainings")
    from bif.evaluation.methods import methods_help
    from bif.evaluation.settings import DEFAULT_METHODS

    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated names from the method registry (default %(default)s): {methods_help()}")
    p.add_argument("--damping", type=float, default=1e-3, help="damping of the classical influence function")
    p.add_argument("--run-name", default="latest", help="results/<run-name>/ under the ground-truth folder")
    p.set_defaults(func=cmd_lds)

    c = subparsers.add_parser(
        "calibrate", help="pick nbeta, gamma, step_size, batch_size and num_draws (search sized to a budget)",
        description="Builds a cheap ground truth (subsets x 1 seed), measures the curvature at w*, and runs a "
        "successive-halving search over nbeta/n x damping (gamma/nbeta) x batch x step fraction, scored by a "
        "paired LDS, within the wall time of --budget-retrainings retrainings (default 300: one full 100 x 3 "
        "ground truth). Then recommends num_draws for a target Monte-Carlo error. Writes "
        "<output>/calibration/{sampler.yaml, search.png, scores.json}.")
    _common(c)
    c.add_argument("--num-subsets", type=int, default=60, help="subsets of the cheap ground truth (default 60)")
    c.add_argument("--num-draws", type=int, default=None,
                   help="draws per chain in round 0, every setting runs (default: sized to the budget, and settings too "
                   "slow to mix in those draws sit out; up to x3 each round, as the budget allows)")
    c.add_argument("--num-chains", type=int, default=4, help="chains of the recommended block (default 4)")
    c.add_argument("--pilot-steps", type=int, default=200, help="SGLD steps of the stability pilot (default 200)")
    c.add_argument("--budget-retrainings", type=float, default=None,
                   help="wall-time budget in retrainings: this many times the measured wall time of one retraining "
                   "(default 300)")
    c.add_argument("--budget-seconds", type=float, default=None,
                   help="wall-time budget in seconds (overrides --budget-retrainings)")
    c.add_argument("--nbeta-mults", default=None, help="nbeta/n values of round 0 (default 1,10,100)")
    c.add_argument("--lambdas", default=None, help="damping gamma/nbeta values of round 0 (default "
                   "0.003,0.01,0.03,0.1,0.3)")
    c.add_argument("--num-rounds", type=int, default=None, help="successive-halving rounds (default 3)")
    c.add_argument("--target-share", type=float, default=0.5,
                   help="recommend num_draws so this share of pairs has |BIF| > 2 MCSE (default 0.5)")
    c.add_argument("--quick", action="store_true",
                   help="a 2 x 2 grid (nbeta n, 10n; damping 0.01, 0.1) and 2 rounds: a first look")
    c.set_defaults(func=cmd_calibrate)

    m = subparsers.add_parser("compare", help="regenerate the README LDS table and plot on the digits example",
                              description="The README's LDS table and plot: BIF and the classical baselines "
                              "against retraining on digits subsets, at each training-set size (runs "
                              "benchmarks/lds_table.py from a source checkout; the retrainings are cached under "
                              "--cache and reused by the next run).")
    m.add_argument("--sizes", default="200,800,full", help="training-set sizes (default 200,800,full)")
    m.add_argument("--num-subsets", type=int, default=None, help="subsets per size (default 100, the table's)")
    m.add_argument("--num-seeds", type=int, default=None, help="retraining seeds per subset (default 3)")
    m.add_argument("--bif-draws", type=int, default=None, help="draws per BIF chain, 4 chains (default 2000)")
    m.add_argument("--cache", default=None, help="ground-truth cache, path or URI (default runs/lds_bench/)")
    m.add_argument("--docs", default=None,
                   help="where lds_table.md / .json and lds_vs_n.png go (default the checkout's docs/)")
    m.add_argument("--skip-optional", action="store_true", help="leave out EK-FAC and TRAK")
    m.set_defaults(func=cmd_compare)

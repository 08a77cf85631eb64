"""A user's sequence of commands on one config, with the kept cluster and with a cluster per command.

    python -m benchmarks.commands [--sequence run,lds,run,lds,run] [--quick] [--out docs/benchmarks_commands.json]

The README's commands switch between `bif run` and `bif lds` on the digits example (``bif/examples/digits.yaml``,
each command into an output of its own, so no run is skipped). Each setting runs the whole sequence as typed:
the console script in a subprocess, no PREFECT_API_URL, a new Prefect home. ``kept``: the defaults (the kept
Prefect server, Dask cluster and warm process); ``own``: ``BIF_KEEP_CLUSTER=0``, a cluster per command (the kept
server still serves both). Reports each command's wall time, the sums after the first command (which pays the
cold start either way), and how often the kept cluster was replaced (``cluster.log``). The two settings run one
after the other: compare them within one run of this benchmark.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.pipeline import ROOT, strict_json

BIF = str(Path(sys.executable).parent / "bif")
CONFIG = "bif/examples/digits.yaml"
CHECKPOINT = ROOT / "runs" / "example" / "digits.pt"  # where digits.yaml looks (`make demo` writes it)
ARGS = {"run": ["--no-progress"], "lds": ["--num-subsets", "8", "--num-seeds", "1"],
        "calibrate": ["--quick"]}
QUICK = ["--set", "sampler.num_draws=100", "--set", "sampler.num_burnin_steps=20"]


def sequence(commands: list[str], keep: bool, quick: bool) -> dict:
    """Run ``commands`` in a new Prefect home; each command's seconds and the kept cluster's replacements."""
    with tempfile.TemporaryDirectory(prefix="bif-bench-commands-") as tmp:
        home, out = Path(tmp) / "home", Path(tmp) / "out"
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL" and not k.startswith("PREFECT_LOGGING")}
        env |= {"PREFECT_HOME": str(home), "BIF_KEEP_CLUSTER": "1" if keep else "0"}
        times = []
        try:
            for i, cmd in enumerate(commands):
                argv = [BIF, cmd, CONFIG, *ARGS[cmd], *(QUICK if quick and cmd == "run" else []),
                        "--output", str(out / f"{i}-{cmd}")]
                t0 = time.perf_counter()
                res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
                times.append(round(time.perf_counter() - t0, 2))
                if res.returncode != 0:
                    raise SystemExit(f"`{' '.join(argv[1:])}` failed ({res.returncode}):\n{res.stderr[-3000:]}")
                print(f"  {'kept' if keep else 'own '} {cmd:<9} {times[-1]:7.1f} s", flush=True)
            log = home / "bif-cluster" / "cluster.log"
            replaced = log.read_text().count("replacing the kept cluster") if log.exists() else 0
        finally:
            subprocess.run([BIF, "server", "stop"], cwd=ROOT, env=env, capture_output=True, timeout=300)
    return {"commands": commands, "seconds": times, "after_first_s": round(sum(times[1:]), 2),
            "replacements": replaced}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequence", default="run,lds,run,lds,run",
                    help=f"commands, comma-separated, of {', '.join(ARGS)} (default: run,lds,run,lds,run)")
    ap.add_argument("--quick", action="store_true", help="runs of 100 draws (a smoke test of the benchmark)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_commands.json"))
    args = ap.parse_args(argv)
    commands = args.sequence.split(",")
    if unknown := sorted(set(commands) - set(ARGS)):
        ap.error(f"--sequence: unknown command(s) {', '.join(unknown)}; choose from {', '.join(ARGS)}")
    if not CHECKPOINT.exists():
        subprocess.run([BIF, "example", "digits", str(CHECKPOINT)], cwd=ROOT, check=True)
    result = {"config": CONFIG, "quick": args.quick, "cores": os.cpu_count()}
    for keep in (True, False):
        result["kept" if keep else "own"] = sequence(commands, keep, args.quick)
    kept, own = result["kept"]["after_first_s"], result["own"]["after_first_s"]
    result["after_first_ratio_kept_vs_own"] = round(kept / own, 3) if own else None
    Path(args.out).write_text(strict_json(result))
    print(f"after the first command: kept {kept:.1f} s, own clusters {own:.1f} s "
          f"({result['after_first_ratio_kept_vs_own']}x); kept cluster replaced {result['kept']['replacements']} "
          f"time(s); written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

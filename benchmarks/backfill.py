"""Backfill throughput: `bif backfill` over the checkpoints of one training run, against the same checkpoints as
one `bif run` each and against a bare one-process loop.

    python -m benchmarks.backfill [--checkpoints 4] [--draws 1000] [--max-concurrent 1,2] [--repeats 2] [--quick]
                                  [--out docs/benchmarks_backfill.json]

Issue 11's target 1 compares one whole `bif run` with a bare loop; a data team backfilling a training run pays
the run's fixed costs once per checkpoint. This measures that, on digits checkpoints of one training run
(``bif.examples.digits.save_checkpoint`` at 10, 30, 100, 300, ... epochs) with target 1's sampler settings (2
chains x ``--draws`` draws, 100 draws a block). Every command is the ``bif`` script in a subprocess, as typed, in a
new Prefect home with the defaults (the kept server, cluster and warm process, which a first `bif run` starts and
which is not timed). Each round runs, in this order:

- ``singles``: each checkpoint as its own `bif run` (a warm copy each);
- ``backfill_mc<k>``: `bif backfill --max-concurrent k` into a new output (every checkpoint is a new run there; a
  warm copy too, since session 34);
- ``bare``: per checkpoint, :func:`benchmarks.pipeline.bare_loop` (one chain: its burn-in, steps and loss
  evaluations, no storage, no checks) times the number of chains: target 1's yardstick, the chains one after
  another.

Reported per round and as medians over rounds: each total, seconds per checkpoint, the ratios of a backfill to the
bare loop and to the single runs, and the backfill's own overhead (its wall time less the sum of its runs' wall
times from the catalog: the command's imports, the sweep's listing and hashing, the catalog). The figures are
ratios within one run of this command on one machine.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.pipeline import ROOT, say, strict_json

BIF = str(Path(sys.executable).parent / "bif")
EPOCHS = (10, 30, 100, 300, 1000, 3000)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "BIF_KEEP_CLUSTER", "BIF_WARM") and not k.startswith("PREFECT_LOGGING")}
    return env | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _bif(env: dict[str, str], *args: str) -> float:
    """Seconds of one `bif` command; SystemExit with its stderr if it fails."""
    t0 = time.perf_counter()
    res = subprocess.run([BIF, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"`bif {' '.join(args)}` failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def _bare(args: tuple[str, int]) -> float:
    """Seconds of one chain's bare loop on the config ``args[0]`` (in a fresh process: one thread, as a worker)."""
    from benchmarks.pipeline import bare_loop
    from bif.config import load_config

    return bare_loop(load_config(args[0]), args[1])["seconds"]


def _catalog_seconds(output: Path) -> list[float]:
    """Each run's wall time as the sweep's catalog records it."""
    from bif.store.catalog import Catalog

    frame = Catalog(str(output)).read()
    return [float(s) for s in frame["wall_s"]]


def make_checkpoints(folder: Path, count: int) -> list[Path]:
    """``count`` digits checkpoints of one training run (the same seed, more epochs each)."""
    from bif.examples.digits import save_checkpoint

    if count > len(EPOCHS):
        raise SystemExit(f"--checkpoints: at most {len(EPOCHS)}")
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(save_checkpoint(str(folder / f"digits-e{e:04d}.pt"), epochs=e)) for e in EPOCHS[:count]]


def bench(work: Path, *, checkpoints: int, draws: int, max_concurrent: list[int], repeats: int) -> dict:
    ckpts = make_checkpoints(work / "ckpts", checkpoints)
    data = yaml.safe_load((ROOT / "bif/examples/digits.yaml").read_text())
    data["sampler"].update(num_chains=2, num_draws=draws, draws_per_block=100)
    chains = data["sampler"]["num_chains"]
    cfg = work / "digits.yaml"
    cfg.write_text(yaml.safe_dump(data | {"checkpoint": str(ckpts[0])}))
    per_ckpt_cfgs = []
    for i, ck in enumerate(ckpts):
        p = work / f"digits-{i}.yaml"
        p.write_text(yaml.safe_dump(data | {"checkpoint": str(ck)}))
        per_ckpt_cfgs.append(str(p))
    env = _env(work / "prefect-home")
    rounds = []
    try:
        say("backfill: a first `bif run` starts the kept server, cluster and warm process (not timed)")
        first = _bif(env, "run", str(cfg), "--no-progress", "--output", str(work / "first"))
        for r in range(repeats):
            row: dict = {}
            say(f"backfill: round {r + 1} of {repeats}: {checkpoints} single `bif run` commands")
            row["singles_s"] = [_bif(env, "run", c, "--no-progress", "--output", str(work / f"single-{r}-{i}"))
                                for i, c in enumerate(per_ckpt_cfgs)]
            for k in max_concurrent:
                say(f"backfill: round {r + 1} of {repeats}: `bif backfill --max-concurrent {k}`")
                out = work / f"sweep-{r}-mc{k}"
                wall = _bif(env, "backfill", str(cfg), "--checkpoints", str(work / "ckpts" / "*.pt"), "--output",
                            str(out), "--max-concurrent", str(k))
                runs = _catalog_seconds(out)
                if len(runs) != checkpoints:
                    raise SystemExit(f"the sweep into {out} recorded {len(runs)} runs, not {checkpoints}")
                row[f"backfill_mc{k}_s"], row[f"backfill_mc{k}_runs_s"] = wall, runs
            say(f"backfill: round {r + 1} of {repeats}: the bare loop, {chains} chains one after another per "
                "checkpoint")
            with mp.get_context("spawn").Pool(1) as pool:  # one fresh process, as in benchmarks.pipeline
                row["bare_s"] = [chains * s for s in pool.map(_bare, [(c, draws) for c in per_ckpt_cfgs])]
            rounds.append(row)
    finally:
        subprocess.run([BIF, "server", "stop"], cwd=ROOT, env=env, capture_output=True, timeout=300)

    def med(f) -> float:
        return float(np.median([f(row) for row in rounds]))

    result = {"checkpoints": checkpoints, "draws_per_chain": draws, "chains": chains, "cores": os.cpu_count(),
              "first_run_s": first, "rounds": rounds, "repeats": repeats,
              "singles_s": med(lambda row: sum(row["singles_s"])), "bare_s": med(lambda row: sum(row["bare_s"]))}
    for k in max_concurrent:
        key = f"backfill_mc{k}"
        result |= {
            f"{key}_s": med(lambda row: row[f"{key}_s"]),
            f"{key}_per_checkpoint_s": med(lambda row: row[f"{key}_s"] / checkpoints),
            f"{key}_vs_bare": med(lambda row: row[f"{key}_s"] / sum(row["bare_s"])),
            f"{key}_vs_singles": med(lambda row: row[f"{key}_s"] / sum(row["singles_s"])),
            # what the sweep adds to its runs: a sequential sweep's wall time less its runs' (mc 1 only)
            **({f"{key}_overhead_s": med(lambda row: row[f"{key}_s"] - sum(row[f"{key}_runs_s"]))} if k == 1 else {}),
        }
    result["singles_vs_bare"] = med(lambda row: sum(row["singles_s"]) / sum(row["bare_s"]))
    return result


def render(r: dict) -> str:
    n = r["checkpoints"]
    lines = [f"backfill of {n} digits checkpoints, {r['chains']} chains x {r['draws_per_chain']} draws each "
             f"(medians of {r['repeats']} rounds; {r['cores']} cores):",
             f"  bare loop, chains one after another: {r['bare_s']:.1f} s ({r['bare_s'] / n:.2f} s a checkpoint)",
             f"  one `bif run` per checkpoint:        {r['singles_s']:.1f} s ({r['singles_s'] / n:.2f} s a checkpoint)"
             f" = {r['singles_vs_bare']:.2f}x the bare loop"]
    for key in sorted(k for k in r if k.startswith("backfill_mc") and k.endswith("_vs_bare")):
        base = key.removesuffix("_vs_bare")
        extra = f", sweep overhead {r[base + '_overhead_s']:.1f} s" if base + "_overhead_s" in r else ""
        lines.append(f"  `bif backfill --max-concurrent {base.removeprefix('backfill_mc')}`: {r[base + '_s']:.1f} s "
                     f"({r[base + '_per_checkpoint_s']:.2f} s a checkpoint) = {r[key]:.2f}x the bare loop, "
                     f"{r[base + '_vs_singles']:.2f}x the single runs{extra}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=4, help=f"checkpoints to backfill (2-{len(EPOCHS)}, default 4)")
    ap.add_argument("--draws", type=int, default=1000, help="draws per chain (default 1000, as target 1)")
    ap.add_argument("--max-concurrent", default="1,2", help="the sweeps' --max-concurrent values (default 1,2)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds; the figures are their medians (default 2)")
    ap.add_argument("--quick", action="store_true", help="2 checkpoints, 100 draws, one round, --max-concurrent 1")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_backfill.json"), help="where to write the figures")
    args = ap.parse_args(argv)
    try:
        mcs = [int(k) for k in args.max_concurrent.split(",")]
    except ValueError:
        ap.error(f"--max-concurrent: comma-separated integers, got {args.max_concurrent!r}")
    if args.checkpoints < 2 or args.checkpoints > len(EPOCHS) or args.draws < 1 or args.repeats < 1 or min(mcs) < 1:
        ap.error(f"--checkpoints 2-{len(EPOCHS)}, --draws, --repeats and --max-concurrent at least 1")
    if args.quick:
        args.checkpoints, args.draws, args.repeats, mcs = 2, 100, 1, [1]
    with tempfile.TemporaryDirectory(prefix="bif-bench-backfill-") as tmp:
        result = bench(Path(tmp), checkpoints=args.checkpoints, draws=args.draws, max_concurrent=mcs,
                       repeats=args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(strict_json(result))
    print(render(result))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The covariance stage with glibc's default malloc in the workers against bif's (``bif.flows.runtime.tune_malloc``).

    python -m benchmarks.malloc_ab [--rounds 6] [--repeats 6] [--quick] [--out docs/benchmarks_malloc_ab.json]

20,000 train x 1,000 query x 400 draws of synthetic traces, reduced as ``benchmarks.scale`` times its 20k stage.
Each round starts one cluster per setting, in alternating order, each in a process of its own (glibc settings
are per process, and a forked worker inherits its forkserver's): ``default`` with ``BIF_WORKER_MALLOC=default``,
``tuned`` without. Per cluster: the stage's wall time (``--repeats`` runs after a warm-up), and the workers'
minor page faults and CPU seconds per stage run. On a shared machine whose speed drifts from minute to minute,
the interleaved medians and the CPU seconds tell the settings apart where one run of each cannot.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.pipeline import ROOT, default_train_block, strict_json

N_TRAIN, N_QUERY, DRAWS = 20_000, 1000, 400
QUICK_N_TRAIN = 5000  # --quick: blocks of 1,250 x 1,000 (arrays of 2-5 MB)


def _usage() -> tuple[int, float]:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_utime + r.ru_stime


def one_cluster(root: str, repeats: int, n_train: int) -> dict:
    """In this process: a cluster as `bif run` builds it, the stage ``repeats`` times, the workers' usage."""
    from benchmarks.scale import Cluster, covariance_stage

    with Cluster() as cl:
        before = cl.client.run(_usage)
        out = covariance_stage(root, cl.client, n_train=n_train, n_query=N_QUERY, train_block=default_train_block(),
                               query_block=1024, repeats=repeats)
        after = cl.client.run(_usage)
    runs = repeats + 2  # the warm-up (one block) and the untimed memory run count as about one run each
    return {"stage_runs_s": out["stage_runs_s"], "peak_rss_gb": out["stage_peak_rss_gb"],
            "faults_per_run": sum(after[w][0] - before[w][0] for w in after) / runs,
            "worker_cpu_s_per_run": sum(after[w][1] - before[w][1] for w in after) / runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="clusters per setting, in alternating order")
    ap.add_argument("--repeats", type=int, default=6, help="timed stage runs per cluster")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_N_TRAIN:,} train samples (a smoke test)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_malloc_ab.json"))
    ap.add_argument("--one", nargs=3, metavar=("ROOT", "REPEATS", "N_TRAIN"), help=argparse.SUPPRESS)  # one cluster
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_cluster(args.one[0], int(args.one[1]), int(args.one[2]))))
        return 0
    n_train = QUICK_N_TRAIN if args.quick else N_TRAIN
    from benchmarks.scale import write_in_subprocess

    work = Path(tempfile.mkdtemp(prefix="bif-malloc-ab-"))
    root = str(work / "traces")
    try:
        write_in_subprocess(root, n_train=n_train, n_query=N_QUERY, draws=DRAWS, per_block=200)
        runs: dict[str, list[dict]] = {"default": [], "tuned": []}
        for r in range(args.rounds):
            for setting in ("default", "tuned") if r % 2 == 0 else ("tuned", "default"):
                env = {k: v for k, v in os.environ.items() if k != "BIF_WORKER_MALLOC"}
                if setting == "default":
                    env["BIF_WORKER_MALLOC"] = "default"
                res = subprocess.run([sys.executable, "-m", "benchmarks.malloc_ab", "--one", root, str(args.repeats),
                                      str(n_train)],
                                     env=env, cwd=ROOT, capture_output=True, text=True, check=True)
                one = json.loads(res.stdout.strip().splitlines()[-1])
                runs[setting].append(one)
                print(setting, strict_json(one, indent=None), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {s: {"stage_s_median": float(np.median([x for c in cs for x in c["stage_runs_s"]])),
                   "worker_cpu_s_per_run_median": float(np.median([c["worker_cpu_s_per_run"] for c in cs])),
                   "faults_per_run_median": float(np.median([c["faults_per_run"] for c in cs])),
                   "peak_rss_gb_median": float(np.median([c["peak_rss_gb"] for c in cs]))} for s, cs in runs.items()}
    result = {"shape": [DRAWS, n_train, N_QUERY], "rounds": args.rounds, "repeats": args.repeats,
              "summary": summary, "clusters": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(strict_json(result))
    print(strict_json(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

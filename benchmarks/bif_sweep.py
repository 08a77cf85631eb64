"""BIF sampler settings and estimators against the cached digits LDS ground truth (issue 12, part 3).

    python benchmarks/bif_sweep.py --n 200 --grid nbeta=1,10,100 lam=0.003,0.01 batch=full
    python benchmarks/bif_sweep.py --n 800 --grid nbeta=30 lam=0.01 batch=full,128 --draws 1000

Each setting samples 4 chains once (in this process, one torch thread) and scores every
estimator on the same traces: ``stack`` (-Cov pooled over all draws, the pipeline's
default), ``chain_mean`` (per-chain covariances averaged), ``corr`` (-Corr, stacked), and
``partial`` (-Cov after regressing each trace on the per-draw mean train loss; this changes
the estimand, see docs/lds.md). nβ is given in units of n (``nbeta=30`` means nβ = 30n),
λ = γ/nβ, and the step is ε = c/nβ with ``c`` (default 0.6) so that ε·nβ stays fixed.
Results go to ``--out`` as JSON lines (one per setting: LDS ± SE of every estimator, wall
time, and the per-query LDS for paired differences). The ground truth must already be cached
(``python benchmarks/lds_table.py --ground-truth-only``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bif.config import SamplerConfig  # noqa: E402
from bif.evaluation import store as lds_store  # noqa: E402
from bif.evaluation.lds import lds  # noqa: E402
from bif.evaluation.settings import LDSSettings  # noqa: E402
from bif.examples.digits import build, train_model  # noqa: E402
from bif.moments import bif_in_memory  # noqa: E402
from bif.sampling.chain import sample_chains  # noqa: E402


def load_problem(n: int | None, dtype: str):
    problem = build(n_train=n)
    train_model(problem.model, problem.train, seed=0)
    if dtype == "float64":
        def dbl(ds):
            x, y = ds.tensors
            return TensorDataset(x.double(), y)
        problem = replace(problem, model=problem.model.double(), train=dbl(problem.train), query=dbl(problem.query))
    return problem


def load_gt(problem, n_label: str, cache: str, num_subsets: int, num_seeds: int):
    settings = LDSSettings(num_subsets=num_subsets, num_seeds=num_seeds, seed=0)
    p = lds_store.plan(cache, "bif.examples.digits:build", {"n_train": n_label}, settings,
                       n_train=len(problem.train), n_query=len(problem.query))
    if not p.cached:
        raise SystemExit(f"no cached ground truth for n={n_label} under {cache}; run lds_table.py --ground-truth-only")
    return lds_store.read_ground_truth(p, settings)


def partial_cov(train: np.ndarray, query: np.ndarray) -> np.ndarray:
    """-Cov of the residuals after regressing every trace on the per-draw mean train loss (stacked draws)."""
    x = train.reshape(-1, train.shape[-1])
    y = query.reshape(-1, query.shape[-1])
    z = x.mean(axis=1, keepdims=True)
    z = z - z.mean()
    zz = float((z * z).sum())
    xc, yc = x - x.mean(0), y - y.mean(0)
    if zz > 0:
        xc = xc - z @ ((z.T @ xc) / zz)
        yc = yc - z @ ((z.T @ yc) / zz)
    return -(xc.T @ yc) / (x.shape[0] - 1)


def estimators(train: np.ndarray, query: np.ndarray) -> dict[str, np.ndarray]:
    b, bc = bif_in_memory(train, query, pooling="stack")
    cm, _ = bif_in_memory(train, query, pooling="chain_mean")
    return {"stack": b, "corr": bc, "chain_mean": cm, "partial": partial_cov(train, query)}


def report(path: str, ref: dict[str, str]) -> None:
    """Print every recorded setting's LDS and its paired difference (mean ± SE over queries) to the reference setting."""
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for n in sorted({r["n"] for r in recs}):
        rows = [r for r in recs if r["n"] == n and "estimators" in r]
        base = next((r for r in rows if all(r["setting"].get(k) == v for k, v in ref.items())
                     and r["dtype"] == "float32"), None)
        b = np.asarray(base["estimators"]["stack"]["per_query"]) if base else None
        print(f"n={n}" + (f" (paired differences against {ref})" if base else ""))
        for r in rows:
            s = r["setting"]
            desc = (f"nb={s['nbeta']:>5}n lam={s['lam']:<6} batch={s['batch']:<5} c={s['c']:<4} spd={s['spd']} "
                    f"burn={s['burnin']} draws={s['draws']} {r['dtype']}")
            cells = []
            for k, v in r["estimators"].items():
                cell = f"{k}={v['lds']:.3f}±{v['stderr']:.3f}"
                if b is not None:
                    d = np.asarray(v["per_query"]) - b
                    cell += f" (Δ{np.nanmean(d):+.3f}±{np.nanstd(d, ddof=1) / np.sqrt(np.isfinite(d).sum()):.3f})"
                cells.append(cell)
            print(f"  {desc} {r['seconds']:5.0f}s  " + "  ".join(cells))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="200", help="training-set size: 200, 800 or full")
    ap.add_argument("--grid", nargs="+", default=["nbeta=1", "lam=0.1", "batch=128"],
                    help="key=v1,v2 ... over nbeta (units of n), lam (γ/nβ), batch (int or 'full'), c (ε·nβ), "
                         "spd (steps per draw), burnin, draws")
    ap.add_argument("--draws", type=int, default=1000, help="draws per chain (default; grid key 'draws' overrides)")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="model and data dtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-subsets", type=int, default=100)
    ap.add_argument("--num-seeds", type=int, default=3)
    ap.add_argument("--cache", default="/work/cache/lds")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bif_sweep.jsonl"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--report", action="store_true",
                    help="print the results in --out, with paired differences against today's rule, and exit")
    args = ap.parse_args(argv)
    if args.report:
        report(args.out, {"nbeta": "1", "lam": "0.1", "batch": "128", "c": "0.6", "spd": "5", "burnin": "500",
                          "draws": "1000"})
        return 0
    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_DISABLE", "1")
    n_arg = None if args.n == "full" else int(args.n)
    problem = load_problem(n_arg, args.dtype)
    n = len(problem.train)
    gt = load_gt(problem, args.n, args.cache, args.num_subsets, args.num_seeds)
    base = {"nbeta": "1", "lam": "0.1", "batch": "128", "c": "0.6", "spd": "5", "burnin": "500",
            "draws": str(args.draws)}
    grid = dict(base)
    for item in args.grid:
        k, v = item.split("=", 1)
        if k not in base:
            raise SystemExit(f"unknown grid key {k!r}; choose from {', '.join(base)}")
        grid[k] = v
    keys = list(grid)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for combo in itertools.product(*(grid[k].split(",") for k in keys)):
        s = dict(zip(keys, combo))
        nbeta = float(s["nbeta"]) * n
        lam = float(s["lam"])
        batch = n if s["batch"] == "full" else int(s["batch"])
        cfg = SamplerConfig(num_chains=args.chains, num_draws=int(s["draws"]), num_burnin_steps=int(s["burnin"]),
                            steps_per_draw=int(s["spd"]), step_size=float(s["c"]) / nbeta, nbeta=nbeta,
                            gamma=lam * nbeta, batch_size=batch, seed=args.seed)
        t0 = time.perf_counter()
        try:
            tr = sample_chains(problem, cfg)
        except Exception as e:  # a diverged chain is a result too
            print(f"n={n} {s}: FAILED {type(e).__name__}: {e}", flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps({"n": n, "setting": s, "dtype": args.dtype, "tag": args.tag,
                                    "error": f"{type(e).__name__}: {e}"}) + "\n")
            continue
        sec = time.perf_counter() - t0
        res = {}
        for name, tau in estimators(tr.train, tr.query).items():
            r = lds(np.nan_to_num(tau), gt.masks, gt.outputs)
            res[name] = {"lds": r.mean, "stderr": r.stderr, "per_query": r.per_query.tolist()}
        rec = {"n": n, "setting": s, "dtype": args.dtype, "tag": args.tag, "seconds": sec,
               "dist_last": float(tr.distance[:, -1].mean()), "estimators": res}
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"n={n} {s} {sec:.0f}s dist={rec['dist_last']:.3g} " + " ".join(
            f"{k}={v['lds']:.3f}±{v['stderr']:.3f}" for k, v in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does `bif calibrate` find good sampler settings on problems it has never seen? (issue 12, parts 1-2)

    python benchmarks/calibration.py gt diabetes        # full ground truth (100 x 3) of the tabular problem
    python benchmarks/calibration.py grid digits200     # wide grid at a fixed draw budget (taus saved)
    python benchmarks/calibration.py calibrate digits200   # the calibrator, then its pick at its draws
    python benchmarks/calibration.py report             # docs/calibration.{json,md}, docs/calibration_grid.png

Three problems: digits at n = 200 and n = 800 (w* exactly as ``benchmarks/lds_table.py`` makes
it: ``build(n_train=n)``, ``train_model(..., seed=0)``; ground truth read from the shared
cache ``--lds-cache``, default /work/cache/lds) and the diabetes regression MLP
(:mod:`bif.examples.diabetes`; its ground truth is built here, under ``--cache``). Every grid
setting runs 4 chains x ``--draws`` draws (500 burn-in steps, 5 steps per draw) and is scored
against the full 100 x 3 ground truth. Step sizes follow ε = frac · 4 / (nβ·(λ_max + λ)) with
λ_max the top Hessian eigenvalue of L_n at w* (the stability limit of the SGLD drift).

Everything runs serially in this process with one torch thread. Results land under
``--cache/<problem>/`` (``grid.json``, ``tau/*.npz``, ``calibration.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bif.config import SamplerConfig  # noqa: E402
from bif.evaluation import store as lds_store  # noqa: E402
from bif.evaluation.calibration import run_chains, top_hessian_eigenvalue  # noqa: E402
from bif.evaluation.lds import lds  # noqa: E402
from bif.evaluation.retrain import retrain_query_losses  # noqa: E402
from bif.evaluation.settings import LDSSettings  # noqa: E402
from bif.moments import bif_in_memory  # noqa: E402
from bif.store.fs import strict_json_data  # noqa: E402

NBETA_MULTS = (1, 10, 100)
LAMBDAS = (0.01, 0.03, 0.1, 0.3)
BURNIN, STEPS_PER_DRAW = 500, 5
FULL_GT = LDSSettings(num_subsets=100, num_seeds=3, seed=0)
PROBLEMS = {
    "digits200": ("bif.examples.digits:build", {"n_train": "200"}),
    "digits800": ("bif.examples.digits:build", {"n_train": "800"}),
    "diabetes": ("bif.examples.diabetes:build", {}),
}


def make_problem(name: str):
    """The problem at its checkpoint w*."""
    if name.startswith("digits"):
        from bif.examples.digits import build, train_model

        p = build(n_train=int(name.removeprefix("digits")))
        train_model(p.model, p.train, seed=0)
        return p
    from bif.examples.diabetes import build

    return build()


def gt_root(name: str, args) -> str:
    return args.lds_cache if name.startswith("digits") else os.path.join(args.cache, "lds")


def full_ground_truth(name: str, problem, args, *, build: bool = False):
    """(GroundTruth, seconds) of the full 100 x 3 ground truth; builds it only when ``build`` (own problems)."""
    spec, pargs = PROBLEMS[name]
    root = gt_root(name, args)
    if name.startswith("digits") and not os.path.exists(os.path.join(root, f"DONE-{pargs['n_train']}")):
        raise SystemExit(f"{root}/DONE-{pargs['n_train']} is missing: the digits ground truth is not built yet")
    p = lds_store.plan(root, spec, pargs, FULL_GT, n_train=len(problem.train), n_query=len(problem.query))
    t0 = time.perf_counter()
    if not p.cached:
        if not build:
            raise SystemExit(f"no ground truth at {p.root_uri}; run `calibration.py gt {name}` first")
        for k, (m, r, seed) in enumerate(p.missing):
            lds_store.write_retrain(p.root_uri, m, r, seed, retrain_query_losses(problem, p.masks[m], seed))
            if k % 50 == 0:
                print(f"  retrained {k + 1}/{len(p.missing)}", flush=True)
    gt = lds_store.read_ground_truth(p, FULL_GT) if p.cached else lds_store.consolidate(p, FULL_GT)
    return gt, time.perf_counter() - t0


def sampler_for(n: int, lmax: float, mult: float, lam: float, batch: int | str, frac: float, draws: int,
                chains: int = 4) -> SamplerConfig:
    nbeta = mult * n
    eps = frac * 4.0 / (nbeta * (lmax + lam))
    bs = n if batch == "full" else int(batch)
    return SamplerConfig(num_chains=chains, num_draws=draws, num_burnin_steps=BURNIN, steps_per_draw=STEPS_PER_DRAW,
                         step_size=eps, nbeta=nbeta, gamma=lam * nbeta, batch_size=bs, seed=0)


def setting_id(mult, lam, batch, frac) -> str:
    return f"nb{mult:g}_lam{lam:g}_b{batch}_f{frac:g}"


def run_setting(problem, s: SamplerConfig) -> dict:
    """Sample, diagnose, and keep τ at draw prefixes and per chain pair (for noise estimates)."""
    from bif.evaluation.calibration import _rhat_ess
    from bif.errors import ChainDivergedError

    t0 = time.perf_counter()
    try:
        train, query, dist = run_chains(problem, s)
    except ChainDivergedError:
        return {"diverged": True, "seconds": time.perf_counter() - t0}
    sec = time.perf_counter() - t0
    if not np.isfinite(dist).all():
        return {"diverged": True, "seconds": sec}
    D = train.shape[1]
    taus = {f"d{d}": bif_in_memory(train[:, :d], query[:, :d])[0] for d in (D // 4, D // 2, D)}
    taus["h0"] = bif_in_memory(train[:2], query[:2])[0]
    taus["h1"] = bif_in_memory(train[2:], query[2:])[0]
    rhat, ess = _rhat_ess(train, query)
    return {"diverged": False, "seconds": sec, "max_rhat": float(np.nanmax(rhat)),
            "median_ess_bulk": float(np.nanmedian(ess)), "distance_mean": float(dist.mean()),
            "train_loss_mean": float(train.mean()), "taus": taus}


def cmd_gt(args) -> None:
    name = args.problem
    problem = make_problem(name)
    gt, sec = full_ground_truth(name, problem, args, build=True)
    print(f"{name}: ground truth {gt.losses.shape} in {sec:.0f} s", flush=True)


def _score(tau, gt) -> tuple[float, float, np.ndarray]:
    r = lds(tau, gt.masks, gt.outputs)
    return r.mean, r.stderr, r.per_query


def cmd_grid(args) -> None:
    name = args.problem
    problem = make_problem(name)
    n = len(problem.train)
    lmax = top_hessian_eigenvalue(problem)
    out = Path(args.cache) / name
    (out / "tau").mkdir(parents=True, exist_ok=True)
    path = out / "grid.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {r["id"] for r in rows}
    mults = tuple(float(v) for v in args.mults.split(",")) if args.mults else NBETA_MULTS
    lams = tuple(float(v) for v in args.lams.split(",")) if args.lams else LAMBDAS
    todo = [(m, lam, "full", args.frac) for m in mults for lam in lams]
    if args.only:  # explicit "mult:lam" pairs, in this order
        todo = [(float(a), float(b), "full", args.frac) for a, b in (x.split(":") for x in args.only.split(","))]
    if args.variants:  # batch / eps variants around the best full-batch settings (needs the ground truth)
        gt, _ = full_ground_truth(name, problem, args)
        scored = sorted((r for r in rows if not r["diverged"] and r["batch"] == "full"),
                        key=lambda r: -_score(np.load(out / "tau" / f"{r['id']}.npz")[f"d{args.draws}"], gt)[0])
        small = min(64, n // 4)
        for r in scored[:args.variants]:
            todo += [(r["mult"], r["lam"], small, args.frac), (r["mult"], r["lam"], "full", 0.05),
                     (r["mult"], r["lam"], small, 0.05)]
    for mult, lam, batch, frac in todo:
        if args.until and time.strftime("%H:%M", time.gmtime()) >= args.until:
            print(f"{name}: stopping the grid at {args.until} UTC (--until)", flush=True)
            break
        sid = setting_id(mult, lam, batch, frac)
        if sid in done:
            continue
        s = sampler_for(n, lmax, mult, lam, batch, frac, args.draws)
        res = run_setting(problem, s)
        taus = res.pop("taus", None)
        if taus is not None:
            np.savez(out / "tau" / f"{sid}.npz", **taus)
        row = {"id": sid, "mult": mult, "lam": lam, "batch": batch, "frac": frac, "nbeta": s.nbeta,
               "gamma": s.gamma, "step_size": s.step_size, "batch_size": s.batch_size, "draws": args.draws,
               "chains": 4, "lambda_max": lmax, **res}
        rows.append(row)
        done.add(sid)
        print(f"{name} {sid}: {'DIVERGED' if row['diverged'] else 'ok'} {row['seconds']:.1f} s "
              f"R-hat {row.get('max_rhat', float('nan')):.3f}", flush=True)
        path.write_text(json.dumps(strict_json_data({"problem": name, "n_train": n, "lambda_max": lmax,
                                                     "rows": rows}), indent=1))


def _paired_vs(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from bif.evaluation.calibrate import paired

    return paired(a, b)


def cmd_calibrate(args) -> None:
    """The calibrator in-process (serial, one thread), then its pick at its draws, scored on the full ground truth."""
    from dataclasses import asdict

    from bif.evaluation import calibrate as C
    from bif.evaluation.calibration import evaluate_setting, search
    from bif.evaluation.lds import draw_subsets
    from bif.evaluation.retrain import ground_truth
    from bif.evaluation.settings import CalibrationSettings

    name = args.problem
    problem = make_problem(name)
    n = len(problem.train)
    full_gt, _ = full_ground_truth(name, problem, args)
    st = CalibrationSettings(budget_retrainings=args.budget_retrainings)
    base = SamplerConfig(num_burnin_steps=BURNIN, steps_per_draw=STEPS_PER_DRAW, seed=0)
    # the budget and the search run on this process's CPU time (one torch thread): on the shared machine the
    # wall time of the cheap ground truth and of the search's rounds swing by several x with the others' load
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t0, w0 = clock(), time.perf_counter()
    cheap = ground_truth(problem, draw_subsets(n, num_subsets=st.num_subsets, alpha=st.alpha, seed=st.seed),
                         num_seeds=st.num_seeds, seed=st.seed)
    gt_s = clock() - t0
    per_retrain = gt_s / (st.num_subsets * st.num_seeds)
    budget = st.budget_retrainings * per_retrain
    res = search(problem, base, cheap, st, budget_seconds=budget, spent_seconds=gt_s, parallelism=1,
                 log=lambda m: print(f"  {m}", flush=True), clock=clock)
    spent = clock() - t0
    wall = time.perf_counter() - w0
    b = res.best
    print(f"{name}: calibrator {spent:.0f} {args.clock} s (budget {budget:.0f} s = {st.budget_retrainings:g} x "
          f"{per_retrain:.2f} s; wall {wall:.0f} s): nβ={b.mult:g}n "
          f"λ={b.lam:g} batch={b.batch_size} frac={b.frac:.3g}; {res.num_chains} x {res.num_draws} draws", flush=True)
    rec = base.model_copy(update={"step_size": b.step_size, "nbeta": b.nbeta, "gamma": b.gamma,
                                  "batch_size": b.batch_size, "num_chains": res.num_chains,
                                  "num_draws": res.num_draws})
    val = evaluate_setting(problem, rec, full_gt, target_share=st.target_share)
    print(f"{name}: recommended at {res.num_draws} draws: LDS {val.lds:+.3f} ± {val.lds_stderr:.3f} "
          f"({val.seconds:.0f} s, share |BIF|>2MCSE {val.share_now:.2f})", flush=True)
    out = {"problem": name, "n_train": n, "calibrator_seconds": spent, "clock": args.clock, "wall_seconds": wall,
           "budget_seconds": budget,
           "seconds_per_retraining": per_retrain, "cheap_gt_seconds": gt_s, "spent_seconds": res.spent_seconds,
           "rounds": res.rounds, "note": res.note, "probe": asdict(res.probe),
           "recommended": C.as_records([b])[0], "num_draws": res.num_draws, "num_chains": res.num_chains,
           "predicted_share": res.predicted_share, "predicted_run_seconds": res.run_seconds,
           "validation": {k: v for k, v in C.as_records([val])[0].items()},
           "scores": C.as_records(res.scores), "settings": st.model_dump(mode="json")}
    if args.draws and b.num_draws:  # the pick at the grid's draw budget too, for a like-for-like comparison
        same = rec.model_copy(update={"num_chains": 4, "num_draws": args.draws})
        v2 = evaluate_setting(problem, same, full_gt, diagnostics=False)
        out["validation_grid_budget"] = C.as_records([v2])[0]
        print(f"{name}: recommended at 4 x {args.draws} draws: LDS {v2.lds:+.3f} ± {v2.lds_stderr:.3f}", flush=True)
    path = Path(args.cache) / name / "calibration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict_json_data(out), indent=1))


def score_grid(name: str, args) -> dict:
    """Every grid row's LDS ± SE (and at 1/4 and 1/2 of the draws) against the full ground truth; the best."""
    from bif.evaluation.calibrate import paired

    out = Path(args.cache) / name
    data = json.loads((out / "grid.json").read_text())
    problem = make_problem(name)
    gt, _ = full_ground_truth(name, problem, args)
    rows, per_query = [], {}
    for r in data["rows"]:
        row = {k: r[k] for k in ("id", "mult", "lam", "batch", "frac", "nbeta", "gamma", "step_size", "batch_size",
                                 "draws", "seconds", "diverged") if k in r}
        row |= {k: r.get(k) for k in ("max_rhat", "median_ess_bulk")}
        if not r["diverged"]:
            taus = np.load(out / "tau" / f"{r['id']}.npz")
            for key in taus.files:
                m, se, pq = _score(taus[key], gt)
                row[f"lds_{key}"], row[f"se_{key}"] = m, se
                if key == f"d{r['draws']}":
                    per_query[r["id"]] = pq
            row["lds"], row["stderr"] = row[f"lds_d{r['draws']}"], row[f"se_d{r['draws']}"]
            from bif.evaluation.calibrate import projected_lds

            for f in (4, 100):  # the halves' noise projected to 4x and 100x the draws
                row[f"lds_proj{f}"] = float(np.nanmean(projected_lds(taus["h0"], taus["h1"], gt.masks,
                                                                      per_query[r["id"]], factor=f)))
        rows.append(row)
    live = [r for r in rows if not r["diverged"]]
    best = max(live, key=lambda r: r["lds"])
    for r in live:
        r["paired_vs_best"], r["paired_se"] = paired(per_query[r["id"]], per_query[best["id"]])
    return {"problem": name, "n_train": data["n_train"], "lambda_max": data["lambda_max"], "rows": rows,
            "best": best, "per_query": per_query}


def cmd_score(args) -> None:
    names = [args.problem] if args.problem else [p for p in PROBLEMS if (Path(args.cache) / p / "grid.json").exists()]
    for name in names:
        g = score_grid(name, args)
        print(f"{name} (n={g['n_train']}, λ_max={g['lambda_max']:.3g}); best {g['best']['id']} "
              f"LDS {g['best']['lds']:.3f} ± {g['best']['stderr']:.3f}")
        for r in sorted(g["rows"], key=lambda r: (r["batch"] != "full", r["frac"], r["mult"], r["lam"])):
            if r["diverged"]:
                print(f"  {r['id']:<28} DIVERGED")
                continue
            d = r["draws"]
            print(f"  {r['id']:<28} LDS {r['lds']:.3f} ± {r['stderr']:.3f}  (d{d // 4} {r[f'lds_d{d // 4}']:.3f}, "
                  f"d{d // 2} {r[f'lds_d{d // 2}']:.3f}, halves {r['lds_h0']:.3f}/{r['lds_h1']:.3f}, "
                  f"proj x4 {r['lds_proj4']:.3f} x100 {r['lds_proj100']:.3f})  "
                  f"vs best {r['paired_vs_best']:+.3f} ± {r['paired_se']:.3f}  R-hat {r['max_rhat']:.2f}  "
                  f"{r['seconds']:.0f} s", flush=True)


def cmd_report(args) -> None:
    """docs/calibration.json (every number), docs/calibration.md (the table) and docs/calibration_grid.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bif.evaluation.calibrate import paired

    names = [p for p in PROBLEMS if (Path(args.cache) / p / "grid.json").exists()]
    report, lines = {"problems": {}}, []
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.8), squeeze=False)
    lines += ["| problem | n | grid best (4 x 800 draws; grid size) | LDS | calibrated pick | its draws | LDS | "
              "paired diff vs grid best | calibrator time / GT build |", "|---" * 9 + "|"]
    for ax, name in zip(axes[0], names):
        g = score_grid(name, args)
        per_query = g.pop("per_query")
        entry = {"grid": g}
        cal_path = Path(args.cache) / name / "calibration.json"
        best = g["best"]
        cal = json.loads(cal_path.read_text()) if cal_path.exists() else None
        cell = ["n/a"] * 5
        if cal:
            problem = make_problem(name)
            gt, _ = full_ground_truth(name, problem, args)
            v = cal["validation"]
            diff, se = paired(v["per_query"], per_query[best["id"]])
            entry["calibration"] = cal | {"paired_vs_grid_best": diff, "paired_se": se}
            r = cal["recommended"]
            gt_build = 300 * cal["seconds_per_retraining"]
            cell = [f"nβ={r['mult']:g}n, λ={r['lam']:g}, batch {r['batch_size']}, frac {r['frac']:.3g}",
                    f"{cal['num_chains']} x {cal['num_draws']}", f"{v['lds']:.3f} ± {v['lds_stderr']:.3f}",
                    f"{diff:+.3f} ± {se:.3f}",
                    f"{cal['calibrator_seconds']:.0f} s / {gt_build:.0f} s {cal.get('clock', 'wall')} time (budget "
                    f"{cal['budget_seconds'] / cal['seconds_per_retraining']:.0f} retrainings)"]
            if "validation_grid_budget" in cal:
                v2 = cal["validation_grid_budget"]
                d2, se2 = paired(v2["per_query"], per_query[best["id"]])
                entry["calibration"] |= {"paired_vs_grid_best_same_draws": d2, "paired_se_same_draws": se2}
                cell[2] += f" (4 x {best['draws']}: {v2['lds']:.3f})"
        report["problems"][name] = entry
        lines.append(f"| {name} | {g['n_train']} | nβ={best['mult']:g}n, λ={best['lam']:g}, batch {best['batch']}, "
                     f"frac {best['frac']:g}; {sum(not r['diverged'] for r in g['rows'])} settings | {best['lds']:.3f} ± {best['stderr']:.3f} | " + " | ".join(cell) + " |")
        full = [r for r in g["rows"] if r["batch"] == "full" and r["frac"] == args.frac]
        mults = sorted({r["mult"] for r in full})
        lams = sorted({r["lam"] for r in full})
        grid = np.full((len(mults), len(lams)), np.nan)
        diverged = set()
        for r in full:
            if r["diverged"]:
                diverged.add((mults.index(r["mult"]), lams.index(r["lam"])))
            else:
                grid[mults.index(r["mult"]), lams.index(r["lam"])] = r["lds"]
        im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lams)), [f"{v:g}" for v in lams])
        ax.set_yticks(range(len(mults)), [f"{v:g}" for v in mults])
        for i in range(len(mults)):
            for j in range(len(lams)):
                txt = f"{grid[i, j]:.2f}" if np.isfinite(grid[i, j]) else ("div" if (i, j) in diverged else "not run")
                ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                        color="white" if np.isfinite(grid[i, j]) else "grey")
        if cal and cal["recommended"]["mult"] in mults and cal["recommended"]["lam"] in lams:
            ax.scatter([lams.index(cal["recommended"]["lam"])], [mults.index(cal["recommended"]["mult"])], s=600,
                       facecolors="none", edgecolors="red", linewidths=2, label="calibrated pick")
            ax.legend(fontsize=7, loc="lower right", markerscale=0.3)
        ax.set(xlabel="damping λ = γ/nβ", ylabel="nβ / n", title=f"{name}: LDS, full batch, frac {args.frac:g}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    docs = Path(args.docs)
    fig.savefig(docs / "calibration_grid.png", dpi=110)
    def slim(obj):  # per-query arrays stay in the cache's JSON files, not in docs/
        if isinstance(obj, dict):
            return {k: slim(v) for k, v in obj.items() if k not in ("per_query", "per_query_projected",
                                                                    "draws_curve")}
        if isinstance(obj, list):
            return [slim(v) for v in obj]
        return obj

    (docs / "calibration.json").write_text(json.dumps(strict_json_data(slim(report)), indent=1, default=float))
    draws_lines = ["| problem | recommended draws | target share of pairs with |BIF| > 2 MCSE | predicted | "
                   "measured at those draws | predicted run time |", "|---" * 6 + "|"]
    for name, entry in report["problems"].items():
        cal = entry.get("calibration")
        if cal:
            draws_lines.append(f"| {name} | {cal['num_chains']} x {cal['num_draws']} | "
                               f"{cal.get('settings', {}).get('target_share', 0.5):g} | "
                               f"{cal['predicted_share']:.2f} | {cal['validation']['share_now']:.2f} | "
                               f"{cal['predicted_run_seconds']:.0f} s |")
    text = ("Calibration benchmark (`python benchmarks/calibration.py ...`): LDS ± SE against the full 100 x 3 "
            "ground truth; paired diff = mean per-query LDS difference ± its SE. Machine shared with other "
            "jobs (load 2-10 on 2 cores): seconds are inflated, ratios within one run hold.\n\n"
            + "\n".join(lines) + "\n\nDraw budget (part 2): the share of (train, query) pairs with |BIF| > 2 MCSE "
            "at the recommended draws, measured on the validation run.\n\n" + "\n".join(draws_lines) + "\n")
    (docs / "calibration.md").write_text(text)
    print(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["gt", "grid", "score", "calibrate", "report"])
    ap.add_argument("problem", nargs="?", default=None, choices=[*PROBLEMS, None])
    ap.add_argument("--cache", default=str(ROOT / "runs" / "calib_bench"), help="own results and ground truths")
    ap.add_argument("--lds-cache", default="/work/cache/lds", help="shared digits ground truths (read only)")
    ap.add_argument("--draws", type=int, default=800, help="draws per chain of every grid setting (4 chains)")
    ap.add_argument("--frac", type=float, default=0.15, help="step fraction of the stability limit on the grid")
    ap.add_argument("--variants", type=int, default=0, help="batch / eps variants around the best N settings")
    ap.add_argument("--mults", default=None, help="nbeta/n values of the grid (default 1,3,10,30,100)")
    ap.add_argument("--lams", default=None, help="damping values of the grid (default 0.001,...,0.1)")
    ap.add_argument("--only", default=None, help="explicit grid points 'mult:lam,...' (overrides --mults/--lams)")
    ap.add_argument("--until", default=None, help="HH:MM UTC: start no grid setting after it")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="what the calibrator's budget counts: this process's CPU time (default; the machine is "
                    "shared) or wall time")
    ap.add_argument("--budget-retrainings", type=float, default=300.0, help="calibrator budget in retrainings")
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="where the report goes")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    {"gt": cmd_gt, "grid": cmd_grid, "calibrate": cmd_calibrate, "score": cmd_score,
     "report": cmd_report}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

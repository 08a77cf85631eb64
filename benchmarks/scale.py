"""Benchmark of the checks and the reduction at scale (issue 11, targets 2, 4 and 5). Ratios measured in one run.

    python -m benchmarks.scale [--only checks|limit|scale] [--repeats 3] [--quick] [--out docs/benchmarks_scale.json]

checks  50,000 train x 500 query x 200 draws (2 chains): the covariance reduction, the quality
        gates and the R-hat / ESS diagnostics (every sample) on the same Dask cluster; each check
        against the reduction.
limit   the covariance stage (checksum verification + reduction to bif.zarr + top-k) against the
        real limit = max(the GEMM at the rate measured here, a plain zarr write of two arrays of
        the output's size, a plain read of the traces' loss column), at 100k x 1k x 200 and
        20k x 1k x 400; also against one float64 GEMM on centred in-RAM data. ``block_parts_ms``: the
        parts of one output block (reads, moments and GEMM, outputs, write, top-k) timed in this process.
scale   1,000,000 train x 100 query x 100 draws out of core: wall time and peak memory (summed PSS)
        of the whole process tree (main + scheduler + nannies + workers) during the reduction.

Synthetic traces are written in the real trace format in a subprocess, so the writer's memory
never counts against the reduction. The machine this runs on may be shared: compare ratios
measured in one run, not absolute times across runs. The checks' and the limit's stages run
``--repeats`` times after a warm-up and report medians (every run is kept in the JSON): one run
of the 20k stage measured 0.35-0.50 s from one minute to the next on the same code.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.machine import PartProbes, cpu_model, describe_parts
from benchmarks.pipeline import Cluster, PeakRSS, ROOT, default_train_block, say, strict_json, write_synthetic

CHAINS = 2


def _write(root: str, n_train: int, n_query: int, draws: int, per_block: int) -> None:
    write_synthetic(root, n_train=n_train, n_query=n_query, chains=CHAINS, draws=draws // CHAINS, per_block=per_block)


def write_in_subprocess(root: str, *, n_train: int, n_query: int, draws: int, per_block: int) -> float:
    """Write synthetic traces (``draws`` in total over 2 chains) in a spawned process; returns seconds."""
    t = time.perf_counter()
    p = mp.get_context("spawn").Process(target=_write, args=(root, n_train, n_query, draws, per_block))
    p.start()
    p.join()
    if p.exitcode:
        raise RuntimeError(f"writing synthetic traces failed (exit {p.exitcode})")
    return time.perf_counter() - t


def gemm_seconds(d: int, a: int, b: int, dtype: str = "float64", repeats: int = 3) -> float:
    """Best-of seconds of xᵀy with x (d, a), y (d, b) in ``dtype``, on data already centred in RAM."""
    rng = np.random.default_rng(0)
    best = np.inf
    step = 20_000  # the GEMM in slices, so that 1M x 1k float64 inputs never sit in memory at once
    y = rng.standard_normal((d, b)).astype(dtype)
    xs = rng.standard_normal((d, min(a, step))).astype(dtype)
    for _ in range(repeats):
        t = time.perf_counter()
        for s in range(0, a, step):
            xs[:, : min(step, a - s)].T @ y
        best = min(best, time.perf_counter() - t)
    return best


def plain_zarr_write(path: str, n_train: int, n_query: int, *, train_block: int, query_block: int) -> float:
    """Seconds to write two float32 (n_train, n_query) zarr arrays chunked like bif.zarr, uncompressed, from RAM."""
    import zarr

    rng = np.random.default_rng(0)
    block = rng.standard_normal((min(train_block, n_train), n_query)).astype(np.float32)
    group = zarr.open_group(path, mode="w", zarr_format=3)
    arrays = [group.create_array(name, shape=(n_train, n_query), chunks=(min(train_block, n_train),
                                                                         min(query_block, n_query)),
                                 dtype="float32", compressors=None, fill_value=np.nan) for name in ("a", "b")]
    t = time.perf_counter()
    for s in range(0, n_train, train_block):
        e = min(s + train_block, n_train)
        for arr in arrays:
            arr[s:e, :] = block[: e - s]
    out = time.perf_counter() - t
    shutil.rmtree(path, ignore_errors=True)
    return out


def plain_trace_read(root: str) -> float:
    """Seconds to read the loss column of every trace file (bytes, decompression, decoding)."""
    import pyarrow.parquet as pq

    from bif import schema as S

    files = sorted(Path(root, S.TRACES_DIR).rglob("*.parquet"))
    t = time.perf_counter()
    for f in files:
        pq.read_table(f, columns=[S.LOSS]).column(0).to_numpy()
    return time.perf_counter() - t


def covariance_stage(root: str, client, *, n_train: int, n_query: int, train_block: int, query_block: int,
                     repeats: int = 1, paired: Callable[[], float] | None = None,
                     after: Callable[[], None] | None = None) -> dict:
    """The pipeline's covariance stage (tasks.pipeline.reduce_covariance without a config): verify, reduce, top-k.

    ``repeats`` timed runs after one warm-up: ``stage_s`` is their median, ``stage_runs_s`` every run (one run of
    the 20k stage measured 0.35-0.50 s from one minute to the next on the same code). Each run starts as a run's
    stage does, without a bif.zarr: the previous run's is removed before the clock starts (removing a full 20k
    output took 20-25 ms inside ``create_bif``). The peak memory (``stage_peak_rss_gb``) comes from one more run,
    untimed: its PSS sampler reads every process's smaps, 20-27 ms of a core per sample, which the timed runs
    used to pay beside the 2 workers.

    ``paired``: a reference timed just before each run (``paired_runs_s``, e.g. the float64 GEMM): the machine's
    speed moved by up to 2x from one minute to the next, so each run is also compared with its own reference.
    ``after``: called after each timed run, off the clock, with that run's bif.zarr in place (the checks).
    """
    import inspect

    from bif import schema as S
    from bif.config import CovarianceConfig
    from bif.store.run import RunStore
    from bif.tasks.covariance import compute_bif

    store = RunStore(root)
    cov = CovarianceConfig(train_block_size=train_block, query_block_size=query_block)
    files = store.blocks()
    verifies_itself = "verify" in inspect.signature(compute_bif).parameters

    def run() -> float:
        shutil.rmtree(Path(root, S.BIF_ZARR), ignore_errors=True)
        t0 = time.perf_counter()
        if not verifies_itself:  # the code before issue 11 verified checksums in a separate pass
            store.verify_blocks(files)
        # the pipeline checks every file's sha256 beside the reduction (tasks.pipeline.reduce_covariance)
        summary = compute_bif(store, cov, files, n_train=n_train, n_query=n_query, client=client,
                              **({"verify": True} if verifies_itself else {}))
        store.write_topk(summary.topk)
        return time.perf_counter() - t0

    # warm-up on the first block only (imports, zarr code paths on the workers)
    compute_bif(store, cov, files, n_train=min(n_train, train_block), n_query=n_query, client=client)
    walls, refs = [], []
    for _ in range(max(1, repeats)):
        if paired is not None:
            refs.append(paired())
        walls.append(run())
        if after is not None:
            after()
    with PeakRSS(pss=True) as rss:
        run()
    out = {"stage_s": float(np.median(walls)), "stage_runs_s": walls, "stage_peak_rss_gb": rss.peak / 2**30}
    return out | ({"paired_runs_s": refs} if refs else {})


def block_parts(root: str, *, n_train: int, n_query: int, train_block: int, query_block: int,
                repeats: int = 5) -> dict:
    """Milliseconds (medians of ``repeats``) of the parts of one output block of the stage, in this process on one
    core: the trace reads (rows of draws per variable, as stored), the moments (centring + float32 GEMM), the negated outputs, their write into bif.zarr
    (which the stage created) and the top-k of both directions, as ``tasks.covariance.reduce_block`` runs them."""
    import threadpoolctl

    from bif import schema as S
    from bif.config import CovarianceConfig
    from bif.block_ops import row_moments
    from bif.store.run import RunStore
    from bif.tasks import covariance as C

    store = RunStore(root)
    files = store.blocks()
    cov = CovarianceConfig(train_block_size=train_block, query_block_size=query_block)
    tb = C.balanced_train_block(n_train, cov.train_block_size, -(-n_query // query_block), 2)
    tr, qr = (0, min(tb, n_train)), (0, min(query_block, n_query))
    array = store.bif_array()
    times: dict[str, list[float]] = {k: [] for k in ("read", "moments", "outputs", "write", "topk")}
    with threadpoolctl.threadpool_limits(1):  # one BLAS thread, as in a worker
        for _ in range(repeats):
            t = [time.perf_counter()]
            parts = [store.read_loss_ranges(r, {S.TRAIN: tr, S.QUERY: qr}, by_variable=True) for r in files]
            x, y = (np.concatenate([p[s] for p in parts], axis=1) for s in (S.TRAIN, S.QUERY))
            t.append(time.perf_counter())
            m = row_moments(x, y, overwrite=True)
            t.append(time.perf_counter())
            bif, corr = C._block_outputs(m, ddof=cov.ddof, pooling="stack", dtype=array.dtype)
            t.append(time.perf_counter())
            array.write_region(tr, qr, bif, corr)
            t.append(time.perf_counter())
            C._topk_both(bif, corr, tr[0], cov.topk)
            t.append(time.perf_counter())
            for name, a, b in zip(times, t, t[1:]):
                times[name].append((b - a) * 1e3)
    return {"block": [tr[1] - tr[0], qr[1] - qr[0]], **{k: float(np.median(v)) for k, v in times.items()}}


def _warm_gates() -> None:
    """Import the gates' modules (bif.quality.run: pandas, the suites) and build great_expectations' context, as the
    kept cluster's forkserver (KEPT_PRELOAD) and `bif run` (during sampling) do; the first call paid ~0.5 s for it."""
    from bif.quality import expectations, run  # noqa: F401

    expectations.warm()


def _warm_diagnostics() -> None:
    """Import the diagnostics' stack (xarray, scipy, numba, arviz-stats) and load its compiled gufuncs."""
    from bif.quality.diagnostics import rhat_ess

    rhat_ess(np.random.default_rng(0).normal(size=(2, 8, 3)))


def bench_checks(work: Path, *, n_train: int, n_query: int, draws: int, repeats: int = 1,
                 train_block: int | None = None) -> dict:
    """Reduction, gates and diagnostics on the same traces and cluster, in ``repeats`` rounds of one run of each
    (medians, every run, and each round's ratios)."""
    from bif.config import build_config
    from bif.quality.diagnostics import default_block_samples, write_diagnostics
    from bif.quality.run import run_gates

    root = str(work / "checks")
    per_block = draws // CHAINS // 2
    write_in_subprocess(root, n_train=n_train, n_query=n_query, draws=draws, per_block=per_block)
    cfg = build_config({"problem": "bif.examples.linear:build", "output": root,
                        "sampler": {"num_chains": CHAINS, "num_draws": draws // CHAINS, "draws_per_block": per_block}})
    tb = train_block or default_train_block()
    out = {"shape": [draws, n_train, n_query], "train_block": tb}
    import great_expectations  # noqa: F401  (GE's import, ~4 s, is paid once per process, not per check)

    with Cluster() as cl:
        # imports are fixed costs paid once per process (issue 11's target 1), not scaling: warm them everywhere,
        # as covariance_stage warms the reduction up
        t = time.perf_counter()
        _warm_diagnostics()
        cl.client.run(_warm_diagnostics)
        out["diagnostics_warmup_s"] = time.perf_counter() - t
        t = time.perf_counter()
        _warm_gates()
        cl.client.run(_warm_gates)
        out["gates_warmup_s"] = time.perf_counter() - t
        # one round: the stage, then the gates, then the diagnostics, each timed once (until session 24 the stage
        # ran its 3 times, then the gates theirs, then the diagnostics: the machine's drift between those minutes
        # went into the ratios); the ratios below are of the medians, and per round in *_rounds
        gates_runs, diag_runs, last = [], [], {}

        def checks() -> None:
            t = time.perf_counter()
            last["report"] = run_gates(root, {}, cfg, n_train=n_train, n_query=n_query,
                                       loss_bounds=(0.0, float("inf")), map_fn=cl.map)
            gates_runs.append(time.perf_counter() - t)
            t = time.perf_counter()
            last["summary"] = write_diagnostics(root, {}, num_chains=CHAINS, map_fn=cl.map,
                                                block_samples=cfg.quality.diagnostics_block_samples)
            diag_runs.append(time.perf_counter() - t)

        out |= covariance_stage(root, cl.client, n_train=n_train, n_query=n_query, train_block=tb,
                                query_block=1024, repeats=repeats, after=checks)
        out["gates_s"], out["gates_runs_s"] = float(np.median(gates_runs)), gates_runs
        out["gates_passed"] = last["report"].passed
        out["diagnostics_s"], out["diagnostics_runs_s"] = float(np.median(diag_runs)), diag_runs
        summary = last["summary"]
        for name, runs in (("gates", gates_runs), ("diagnostics", diag_runs)):
            out[f"{name}_over_reduction_rounds"] = [c / st for c, st in zip(runs, out["stage_runs_s"])]
    n = summary["num_samples"]
    out["diagnosed_samples"] = n["train"] + n["query"]
    # what the pipeline's config gives (None: default_block_samples of chains x draws); 2048 before session 24,
    # while `bif run` read 512-sample blocks (the config's default then)
    out["diagnostics_block_samples"] = cfg.quality.diagnostics_block_samples or default_block_samples(draws)
    out["rhat_q50"], out["ess_bulk_q50"] = summary["rhat"]["q50"], summary["ess_bulk"]["q50"]
    out["gates_over_reduction"] = out["gates_s"] / out["stage_s"]
    out["diagnostics_over_reduction"] = out["diagnostics_s"] / out["stage_s"]
    shutil.rmtree(root, ignore_errors=True)
    return out


def bench_limit(work: Path, *, n_train: int, n_query: int, draws: int, per_block: int, repeats: int = 1,
                train_block: int | None = None) -> dict:
    """The covariance stage (median of ``repeats`` runs) against max(GEMM, plain zarr write of the output, plain read
    of the traces), and the parts of one of its blocks (:func:`block_parts`)."""
    root = str(work / f"limit-{n_train}")
    write_in_subprocess(root, n_train=n_train, n_query=n_query, draws=draws, per_block=per_block)
    tb = train_block or default_train_block()
    out = {"shape": [draws, n_train, n_query], "train_block": tb}
    out["gemm64_s"] = gemm_seconds(draws, n_train, n_query, "float64")
    out["gemm32_s"] = gemm_seconds(draws, n_train, n_query, "float32")
    out["zarr_write_s"] = plain_zarr_write(str(work / "plain.zarr"), n_train, n_query,
                                           train_block=tb, query_block=1024)
    out["trace_read_s"] = plain_trace_read(root)
    with Cluster() as cl:
        # each run paired with a float64 GEMM timed just before it (one try, where gemm64_s is the best of three)
        out |= covariance_stage(root, cl.client, n_train=n_train, n_query=n_query, train_block=tb,
                                query_block=1024, repeats=repeats,
                                paired=lambda: gemm_seconds(draws, n_train, n_query, repeats=1))
    out["block_parts_ms"] = block_parts(root, n_train=n_train, n_query=n_query, train_block=tb,
                                        query_block=1024)
    out["limit_s"] = max(out["gemm64_s"], out["zarr_write_s"], out["trace_read_s"])
    out["limit_f32_s"] = max(out["gemm32_s"], out["zarr_write_s"], out["trace_read_s"])
    out["ratio_vs_limit"] = out["stage_s"] / out["limit_s"]
    out["ratio_vs_limit_f32_gemm"] = out["stage_s"] / out["limit_f32_s"]
    out["ratio_vs_gemm64"] = out["stage_s"] / out["gemm64_s"]
    pairs = [w / g for w, g in zip(out["stage_runs_s"], out.get("paired_runs_s", []))]
    if pairs:  # each run against the GEMM just before it
        out["ratio_vs_gemm64_paired_runs"] = pairs
        out["ratio_vs_gemm64_paired"] = float(np.median(pairs))
    out["ratio_vs_gemm32"] = out["stage_s"] / out["gemm32_s"]
    shutil.rmtree(root, ignore_errors=True)
    return out


def bench_scale(work: Path, *, n_train: int, n_query: int, draws: int, per_block: int,
                train_block: int | None = None) -> dict:
    """Out of core: wall time and peak RSS of all processes during the covariance stage."""
    root = str(work / "scale")
    tb = train_block or default_train_block()
    t_write = write_in_subprocess(root, n_train=n_train, n_query=n_query, draws=draws, per_block=per_block)
    trace_bytes = sum(f.stat().st_size for f in Path(root, "traces").rglob("*") if f.is_file())
    with Cluster() as cl:
        idle = PeakRSS(pss=True)._sample_once()
        out = covariance_stage(root, cl.client, n_train=n_train, n_query=n_query, train_block=tb,
                               query_block=1024)
    out_bytes = sum(f.stat().st_size for f in Path(root, "bif.zarr").rglob("*") if f.is_file())
    shutil.rmtree(root, ignore_errors=True)
    return {"shape": [draws, n_train, n_query], "trace_write_s": t_write, "trace_bytes": trace_bytes,
            "output_bytes": out_bytes, "idle_processes_rss_gb": idle / 2**30, "train_block": tb, **out}


def _of(m: dict) -> str:
    """' (median of N runs)' where the figure is a median of several."""
    n = len(m.get("stage_runs_s", ()))
    return f" (median of {n} runs)" if n > 1 else ""


def _span(m: dict, key: str) -> str:
    """' (a-b)': the range of the runs behind a median, when there are several."""
    runs = m.get(key) or []
    return f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""


def _rounds(m: dict, key: str) -> str:
    """'; per round: a, b, cx': the ratio of each round's runs (the checks beside the stage run just before)."""
    runs = m.get(key) or []
    return f"; per round: {', '.join(f'{x:.2f}' for x in runs)}x" if len(runs) > 1 else ""


def _paired(m: dict) -> str:
    """'; each run against a GEMM timed just before it: median ...x (a-b)', when measured."""
    p = m.get("ratio_vs_gemm64_paired_runs")
    if not p:
        return ""
    return (f"; each run against a float64 GEMM timed just before it: median {m['ratio_vs_gemm64_paired']:.2f}x "
            f"({min(p):.2f}-{max(p):.2f})")


def _parts(m: dict) -> str:
    """'; one block of a x b: read ..., ... ms': the parts of one block (:func:`block_parts`), when measured."""
    p = m.get("block_parts_ms")
    if not p:
        return ""
    a, b = p["block"]
    names = ("read", "moments", "outputs", "write", "topk")
    return (f"; one {a:,} x {b:,} block on one core: " + ", ".join(f"{k} {p[k]:.0f}" for k in names) +
            f" ms (sum {sum(p[k] for k in names):.0f})")


def render_markdown(r: dict) -> str:
    """This benchmark's rows of the README's table."""
    rows = ["| what | measured | target | met |", "|---|---|---|---|"]

    def row(what, value, target, ok):
        rows.append(f"| {what} | {value} | {target} | {'yes' if ok else '**no**'} |")

    if "checks" in r:
        c = r["checks"]
        d, n, q = c["shape"]
        row(f"checks at {n:,} train x {q:,} query x {d} draws: quality gates vs the covariance stage{_of(c)}",
            f"{c['gates_s']:.2f} s{_span(c, 'gates_runs_s')} vs {c['stage_s']:.2f} s{_span(c, 'stage_runs_s')} = "
            f"{c['gates_over_reduction']:.2f}x{_rounds(c, 'gates_over_reduction_rounds')}", "<= 2x",
            c["gates_over_reduction"] <= 2)
        row(f"checks: R-hat / ESS diagnostics of all {c['diagnosed_samples']:,} samples (+ BIF MCSE) vs the "
            f"covariance stage{_of(c)}", f"{c['diagnostics_s']:.2f} s{_span(c, 'diagnostics_runs_s')} vs "
            f"{c['stage_s']:.2f} s = {c['diagnostics_over_reduction']:.2f}x"
            f"{_rounds(c, 'diagnostics_over_reduction_rounds')}", "<= 2x",
            c["diagnostics_over_reduction"] <= 2)
    for key in ("limit_100k", "limit_20k"):
        if key in r:
            m = r[key]
            d, n, q = m["shape"]
            row(f"covariance stage (verify + reduce + bif.zarr + top-k), {n:,} x {q:,} x {d} draws, vs the limit "
                f"max(GEMM, plain zarr write, plain trace read){_of(m)}",
                f"{m['stage_s']:.2f} s{_span(m, 'stage_runs_s')} vs max({m['gemm64_s']:.2f}, {m['zarr_write_s']:.2f}, {m['trace_read_s']:.2f}) s"
                f" = {m['ratio_vs_limit']:.2f}x (float32 GEMM limit {m['limit_f32_s']:.2f} s: "
                f"{m['ratio_vs_limit_f32_gemm']:.2f}x)", "<= 2x" if key == "limit_100k" else "(reported)",
                m["ratio_vs_limit"] <= 2 or key != "limit_100k")
            if key == "limit_20k":
                row(f"covariance stage vs one float64 GEMM, {n:,} x {q:,} x {d} draws{_of(m)}",
                    f"{m['stage_s']:.2f} s vs {m['gemm64_s']:.2f} s = {m['ratio_vs_gemm64']:.2f}x (vs float32 GEMM "
                    f"{m['gemm32_s']:.2f} s: {m['ratio_vs_gemm32']:.2f}x){_paired(m)}{_parts(m)}", "<= 2x",
                    m["ratio_vs_gemm64"] <= 2)
    if "scale" in r:
        s = r["scale"]
        d, n, q = s["shape"]
        row(f"scale: {n:,} train x {q:,} query x {d} draws out of core, peak memory of all processes (main + "
            "scheduler + forkserver + workers; summed PSS, which counts pages the forked workers share once) "
            "during the covariance stage",
            f"{s['stage_peak_rss_gb']:.2f} GB (idle: {s['idle_processes_rss_gb']:.2f} GB); {s['stage_s']:.1f} s; "
            f"traces {s['trace_bytes'] / 2**30:.2f} GiB, output {s['output_bytes'] / 2**30:.2f} GiB", "< 2 GB",
            s["stage_peak_rss_gb"] < 2)
    if (r.get("machine") or {}).get("memory"):  # what makes this run's seconds comparable with another's, or not
        row("machine: fresh memory (not a target)", describe_parts(r["machine"]), "-", True)
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the benchmark itself)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_scale.json"), help="where to write the figures")
    ap.add_argument("--only", choices=["checks", "limit", "scale"], action="append",
                    help="run only these parts (repeatable); default all")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each stage in checks and limit (figures are medians; every run is kept)")
    ap.add_argument("--train-block", type=int, default=None,
                    help="the stages' covariance.train_block_size (default: the config's, as `bif run` uses)")
    args = ap.parse_args(argv)
    q = args.quick
    parts = args.only or ["checks", "limit", "scale"]
    work = Path(tempfile.mkdtemp(prefix="bif-scale-"))
    results: dict = {"machine": {"note": "shared machine: compare ratios within one run", "cpu": cpu_model()}}
    probe = PartProbes(results["machine"], idle_s=2.5 if q else 3.0, say=say).before
    try:
        if "checks" in parts:
            probe("checks")
            say("checks: the covariance stage, the gates and the diagnostics on the same traces")
            results["checks"] = bench_checks(work, n_train=2000 if q else 50_000, n_query=100 if q else 500, draws=200,
                                            repeats=args.repeats, train_block=args.train_block)
            print(strict_json(results["checks"], indent=1), flush=True)
        if "limit" in parts:
            probe("limit")
            say("limit: the covariance stage against its limit (the large shape, then the 20k one)")
            results["limit_100k"] = bench_limit(work, n_train=5000 if q else 100_000, n_query=1000, draws=200,
                                                per_block=50, repeats=args.repeats, train_block=args.train_block)
            print(strict_json(results["limit_100k"], indent=1), flush=True)
            results["limit_20k"] = bench_limit(work, n_train=2000 if q else 20_000, n_query=1000, draws=400,
                                               per_block=200, repeats=args.repeats, train_block=args.train_block)
            print(strict_json(results["limit_20k"], indent=1), flush=True)
        if "scale" in parts:
            probe("scale")
            say("scale: the 1M-train reduction out of core (writing its traces first)")
            results["scale"] = bench_scale(work, n_train=20_000 if q else 1_000_000, n_query=100, draws=100,
                                           per_block=25, train_block=args.train_block)
            print(strict_json(results["scale"], indent=1), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = (json.loads(out.read_text()) if out.exists() else {}) | results
    out.write_text(strict_json(merged))
    out.with_suffix(".md").write_text(render_markdown(merged))
    print(render_markdown(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())

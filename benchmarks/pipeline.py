"""Benchmark of the attribution pipeline (issue 2, section 8). Ratios measured in one run.

    python -m benchmarks.pipeline [--quick] [--out docs/benchmarks.json]

1. Sampler overhead: a whole ``bif run`` (subprocess: local Prefect server, LocalCluster,
   2 chains x 1,000 draws on the digits example) against a bare torch loop in one process
   doing the same SGLD steps and loss evaluations for one chain.
2. Covariance: the Dask reduction from Parquet traces to bif.zarr against one numpy GEMM on
   centered in-RAM data of the same shape.
3. Out of core: 100,000 train x 1,000 query x 200 draws of synthetic traces in the trace
   format, reduced to bif.zarr; peak RSS of the whole process tree, and wall time against the
   reduction's FLOPs at the GEMM rate measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


class PeakRSS:
    """Samples the summed RSS of this process and all its children every 50 ms."""

    def __init__(self, pid: int | None = None):
        self.proc = psutil.Process(pid or os.getpid())
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


# ------------------------------------------------------------------------------------
def bare_loop(cfg, num_draws: int) -> dict:
    """The same SGLD steps and per-draw loss evaluations as one chain, as plain torch code."""
    from bif.examples.digits import per_sample_loss
    from tasks.pipeline import materialize_problem

    torch.set_num_threads(1)
    prob, _ = materialize_problem(cfg)
    s = cfg.sampler
    model = prob.model
    params = [p for p in model.parameters()]
    anchor = [p.detach().clone() for p in params]
    xt, yt = prob.train.tensors
    xq, yq = prob.query.tensors
    n = len(yt)
    nbeta = float(s.nbeta or n)
    gen = torch.Generator().manual_seed(0)
    out_t = torch.empty(num_draws, n)
    out_q = torch.empty(num_draws, len(yq))

    def step():
        idx = torch.randperm(n, generator=gen)[: s.batch_size]
        for p in params:
            p.grad = None
        per_sample_loss(model, [xt[idx], yt[idx]]).mean().backward()
        with torch.no_grad():
            for p, a in zip(params, anchor):
                p.add_(p.grad * nbeta + s.gamma * (p - a), alpha=-s.step_size / 2)
                p.add_(torch.randn(p.shape, generator=gen), alpha=s.step_size ** 0.5)

    t0 = time.perf_counter()
    for _ in range(s.num_burnin_steps):
        step()
    for d in range(num_draws):
        for _ in range(s.steps_per_draw):
            step()
        with torch.no_grad():
            out_t[d] = per_sample_loss(model, [xt, yt])
            out_q[d] = per_sample_loss(model, [xq, yq])
    return {"seconds": time.perf_counter() - t0, "per_draw_s": (time.perf_counter() - t0) / num_draws}


def bench_sampler(workdir: Path, num_draws: int) -> dict:
    from bif.config import load_config
    from bif.examples.digits import save_checkpoint

    ckpt = workdir / "digits.pt"
    save_checkpoint(str(ckpt))
    cfg_data = yaml.safe_load((ROOT / "bif/examples/digits.yaml").read_text())
    cfg_data.update(checkpoint=str(ckpt), output=str(workdir / "run"))
    cfg_data["sampler"].update(num_chains=2, num_draws=num_draws, draws_per_block=100)
    cfg_path = workdir / "digits.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_data))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "bif.cli", "run", str(cfg_path), "--no-progress"], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t0
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    manifest = json.loads((workdir / "run" / "manifest.json").read_text())
    t = manifest["timings"]
    ours_per_draw = max(t["chain_sampling_s"]) / num_draws
    bare = bare_loop(load_config(cfg_path), num_draws)
    startup = t["sampling_started_at"] - t0
    return {
        "chains": 2, "draws_per_chain": num_draws,
        "bif_run_wall_s": wall,
        "startup_s": startup,
        "teardown_s": t0 + wall - t["finished_at"],
        "ours_per_draw_s": ours_per_draw,
        "bare_per_draw_s": bare["per_draw_s"],
        "per_draw_ratio": ours_per_draw / bare["per_draw_s"],
        "whole_run_ratio_vs_bare_2_chains_sequential": wall / (2 * bare["seconds"]),
        "covariance_s": t["covariance_s"],
    }


# ------------------------------------------------------------------------------------
def gemm_rate(d: int, a: int, b: int, repeats: int = 3) -> float:
    """FLOP/s of numpy's float64 GEMM xᵀy with x (d, a), y (d, b) (best of ``repeats``)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(d, a)), rng.normal(size=(d, b))
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        x.T @ y
        best = min(best, time.perf_counter() - t)
    return 2.0 * d * a * b / best


def write_synthetic(root: str, *, n_train: int, n_query: int, chains: int, draws: int, per_block: int) -> list:
    """Synthetic traces in the real trace format (losses with a shared low-rank signal)."""
    from tasks.sampler import ChainState, DrawBlock
    from tasks.traces import TraceStore

    store = TraceStore(root)
    rng = np.random.default_rng(0)
    state = ChainState(step=0, num_recorded=0, params={}, precond=None, rng_cpu=torch.Generator().get_state(),
                       rng_noise=torch.Generator().get_state())
    for c in range(chains):
        for b in range(draws // per_block):
            z = rng.normal(size=(per_block, 4)).astype(np.float32)
            tr = (1.0 + 0.1 * z @ rng.normal(size=(4, n_train)).astype(np.float32)
                  + 0.05 * rng.standard_normal((per_block, n_train), dtype=np.float32))
            qu = 1.0 + 0.1 * z @ rng.normal(size=(4, n_query)).astype(np.float32)
            blk = DrawBlock(chain=c, draw_start=b * per_block, train_losses=tr, query_losses=qu,
                            steps=np.arange(per_block), distance=np.zeros(per_block), state=state)
            store.write_block(blk, block_index=b, ref_train_loss_mean=1.0)
            del tr, qu, blk
    return store.block_files()


def reduce_on_cluster(root: str, files: list, *, n_train: int, n_query: int, train_block: int,
                      query_block: int) -> float:
    from distributed import Client, LocalCluster

    from tasks.covariance import compute_bif

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=40) as cluster, \
            Client(cluster) as client:
        client.run(lambda: None)
        t0 = time.perf_counter()
        compute_bif(root, files, storage_options={}, n_train=n_train, n_query=n_query, train_block=train_block,
                    query_block=query_block, client=client)
        return time.perf_counter() - t0


def bench_covariance(workdir: Path, *, n_train: int, n_query: int, draws: int) -> dict:
    root = str(workdir / "cov")
    files = write_synthetic(root, n_train=n_train, n_query=n_query, chains=2, draws=draws // 2,
                            per_block=draws // 2)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(draws, n_train))
    y = rng.normal(size=(draws, n_query))
    t = time.perf_counter()
    xc, yc = x - x.mean(0), y - y.mean(0)
    t_center = time.perf_counter() - t
    t = time.perf_counter()
    xc.T @ yc
    t_gemm = time.perf_counter() - t
    del x, y, xc, yc
    wall = reduce_on_cluster(root, files, n_train=n_train, n_query=n_query, train_block=4096, query_block=1024)
    shutil.rmtree(root, ignore_errors=True)
    return {"shape": [draws, n_train, n_query], "gemm_s": t_gemm, "center_plus_gemm_s": t_center + t_gemm,
            "dask_reduction_s": wall, "ratio_vs_gemm": wall / t_gemm}


def bench_out_of_core(workdir: Path, *, n_train: int, n_query: int, draws: int) -> dict:
    root = str(workdir / "ooc")
    t = time.perf_counter()
    files = write_synthetic(root, n_train=n_train, n_query=n_query, chains=2, draws=draws // 2,
                            per_block=draws // 4)
    t_write = time.perf_counter() - t
    rate = gemm_rate(draws, 20_000, n_query)
    flops = 2.0 * draws * n_train * n_query
    with PeakRSS() as rss:
        wall = reduce_on_cluster(root, files, n_train=n_train, n_query=n_query, train_block=4096,
                                 query_block=1024)
    size = sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())
    shutil.rmtree(root, ignore_errors=True)
    limit = flops / rate
    return {"shape": [draws, n_train, n_query], "trace_write_s": t_write, "reduce_wall_s": wall,
            "peak_rss_gb": rss.peak / 2**30, "gemm_gflops": rate / 1e9, "gemm_limit_s": limit,
            "ratio_vs_gemm_limit": wall / limit, "output_bytes": size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test of the benchmark itself)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.json"), help="where to write the figures")
    ap.add_argument("--only", choices=["sampler", "covariance", "ooc"], action="append")
    args = ap.parse_args(argv)
    q = args.quick
    work = Path(tempfile.mkdtemp(prefix="bif-bench-"))
    results = {"machine": {"cores": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__}}
    try:
        if not args.only or "sampler" in args.only:
            results["sampler"] = bench_sampler(work, 100 if q else 1000)
            print(json.dumps(results["sampler"], indent=1), flush=True)
        if not args.only or "covariance" in args.only:
            results["covariance"] = bench_covariance(work, n_train=5000 if q else 20_000, n_query=1000, draws=400)
            print(json.dumps(results["covariance"], indent=1), flush=True)
        if not args.only or "ooc" in args.only:
            results["out_of_core"] = bench_out_of_core(work, n_train=10_000 if q else 100_000, n_query=1000,
                                                       draws=200)
            print(json.dumps(results["out_of_core"], indent=1), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    Path(args.out).write_text(json.dumps(old | results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

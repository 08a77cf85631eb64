"""Benchmark: the token-level reduction out of core (issue 9, section 5: traces several times the worker limit).

    python -m benchmarks.tokens_ooc [--train-seqs 16000] [--max-len 128] [--query-seqs 2] [--query-len 32]
                                    [--draws 200] [--worker-memory 512MB] [--out docs/tokens_ooc.json]

Writes synthetic token traces through the real trace store (RunStore.write_block of token
DrawBlocks: padded sequences of random length, valid tokens only, float32 losses with a shared
low-rank signal), then runs the token run's reduction on a LocalCluster of 2 workers x 1
thread whose memory limit is ``--worker-memory`` (Dask pauses a worker at 80% and kills it at
95% of it): the sequence level (bif.zarr + topk.parquet, bif.tasks.covariance.compute_bif)
and topk_tokens.parquet (bif.tasks.tokens.compute_token_bif, token_matrix off). Reports the
trace volume (float32 token losses, and Parquet bytes on disk) against the worker limit,
wall times, and the peak RSS of each worker process (sampled every 50 ms) and of the driver.
Not a test: figures depend on the machine (report ratios measured in one run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil


def write_token_traces(root: str, *, train_seqs: int, max_len: int, query_seqs: int, query_len: int, chains: int,
                       draws: int, per_block: int, seed: int = 0) -> dict:
    """Synthetic token traces in the real format (RunStore.write_block); returns their sizes."""
    import torch

    from bif.sampling.chain import ChainState, DrawBlock
    from bif.sampling.measure import Variables
    from bif.store.run import RunStore
    from bif.tasks.tokens import token_table

    rng = np.random.default_rng(seed)
    tr_counts = rng.integers(max_len // 2, max_len + 1, size=train_seqs)
    qu_counts = np.full(query_seqs, query_len)
    variables = Variables.of_tokens(train_tokens=tr_counts, query_tokens=qu_counts)
    nt, nq = int(tr_counts.sum()), int(qu_counts.sum())
    store = RunStore(root)
    store.write_table("tokens.parquet", token_table(variables, np.ones(nt), np.ones(nq)))
    state = ChainState(step=0, num_recorded=0, params={}, precond=None, rng_cpu=torch.Generator().get_state(),
                       rng_noise=torch.Generator().get_state())
    load_t = rng.normal(size=(4, nt)).astype(np.float32)  # (rank, train tokens) shared signal
    load_q = rng.normal(size=(4, nq)).astype(np.float32)
    for c in range(chains):
        for b in range(draws // per_block):
            z = rng.normal(size=(per_block, 4)).astype(np.float32)
            tr = 2.0 + 0.1 * (z @ load_t)
            tr += 0.05 * rng.standard_normal(tr.shape, dtype=np.float32)
            qu = 2.0 + 0.1 * (z @ load_q)
            np.abs(tr, out=tr)
            np.abs(qu, out=qu)
            blk = DrawBlock(chain=c, draw_start=b * per_block, train_losses=tr, query_losses=qu,
                            steps=np.arange(per_block), distance=np.zeros(per_block), state=state,
                            variables=variables)
            store.write_block(blk, block_index=b, ref_train_loss_mean=2.0)
            del tr, qu, blk
    disk = sum(f.stat().st_size for f in (Path(root) / "traces").rglob("*.parquet"))
    return {"train_tokens": nt, "query_tokens": nq, "train_seqs": train_seqs, "query_seqs": query_seqs,
            "chains": chains, "draws_per_chain": draws, "draws_per_block": per_block,
            "trace_float32_gb": 4 * (nt + nq) * draws * chains / 1e9, "trace_parquet_gb": disk / 1e9}


class WorkerPeaks:
    """Peak RSS of given processes, sampled every 50 ms."""

    def __init__(self, pids: list[int]):
        self.procs = [psutil.Process(p) for p in pids]
        self.peaks = [0] * len(pids)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for i, p in enumerate(self.procs):
                try:
                    self.peaks[i] = max(self.peaks[i], p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def reduce(root: str, *, worker_memory: str, train_block: int, token_block: int, query_block: int, topk: int) -> dict:
    from distributed import Client, LocalCluster

    from bif.config import CovarianceConfig
    from bif.store.run import RunStore
    from bif.tasks.covariance import compute_bif
    from bif.tasks.tokens import compute_token_bif

    store = RunStore(root)
    cov = CovarianceConfig(train_block_size=train_block, query_block_size=query_block, topk=topk,
                           token_train_block_size=token_block)
    files = store.blocks()
    layout = store.read_layout(files[0])
    n_train, n_query = layout.n_train, layout.n_query
    out: dict = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=worker_memory, dashboard_address=":0",
                      silence_logs=40, preload=["bif.tasks.tokens"]) as cluster, Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        out["worker_idle_rss_gb"] = [psutil.Process(p).memory_info().rss / 1e9 for p in pids]
        me = WorkerPeaks([os.getpid()])
        with WorkerPeaks(pids) as peaks, me:
            t0 = time.perf_counter()
            summary = compute_bif(store, cov, files, n_train=n_train, n_query=n_query, client=client)
            store.write_topk(summary.topk)
            t1 = time.perf_counter()
            tokens = compute_token_bif(store, cov, files, client=client)
            t2 = time.perf_counter()
        alive = len(client.scheduler_info()["workers"])
    out |= {"sequence_level_s": t1 - t0, "token_topk_s": t2 - t1, "total_s": t2 - t0,
            "sequence_blocks": summary.num_blocks, "token_blocks": tokens.num_blocks,
            "topk_tokens_rows": len(tokens.topk_tokens), "worker_peak_rss_gb": [p / 1e9 for p in peaks.peaks],
            "driver_peak_rss_gb": me.peaks[0] / 1e9, "workers_alive_at_end": alive,
            "worker_memory_limit": worker_memory}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-seqs", type=int, default=16000, help="train sequences (lengths uniform in [L/2, L])")
    ap.add_argument("--max-len", type=int, default=128, help="L: the longest train sequence, in valid tokens")
    ap.add_argument("--query-seqs", type=int, default=2, help="query sequences")
    ap.add_argument("--query-len", type=int, default=32, help="valid tokens per query sequence")
    ap.add_argument("--draws", type=int, default=200, help="draws per chain (2 chains)")
    ap.add_argument("--draws-per-block", type=int, default=10, help="draws per trace block")
    ap.add_argument("--worker-memory", default="512MB", help="Dask memory limit per worker (2 workers)")
    ap.add_argument("--train-block", type=int, default=2048, help="train sequences per sequence-level block")
    ap.add_argument("--token-block", type=int, default=65536, help="train tokens per token-level block")
    ap.add_argument("--query-block", type=int, default=1024, help="query sequences / tokens per block")
    ap.add_argument("--topk", type=int, default=10, help="top-k per query token and sign")
    ap.add_argument("--workdir", default=None, help="where the traces go (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    from dask.utils import parse_bytes

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bif-tokens-ooc-"))
    root = str(work / "run")
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    sizes = write_token_traces(root, train_seqs=args.train_seqs, max_len=args.max_len, query_seqs=args.query_seqs,
                               query_len=args.query_len, chains=2, draws=args.draws, per_block=args.draws_per_block)
    sizes["write_s"] = time.perf_counter() - t
    print(json.dumps(sizes, indent=2), flush=True)
    res = sizes | reduce(root, worker_memory=args.worker_memory, train_block=args.train_block,
                         token_block=args.token_block, query_block=args.query_block, topk=args.topk)
    limit_gb = parse_bytes(args.worker_memory) / 1e9
    res["trace_over_worker_limit"] = res["trace_float32_gb"] / limit_gb
    res["worker_peak_over_limit"] = max(res["worker_peak_rss_gb"]) / limit_gb
    res["gflop"] = 2 * res["train_tokens"] * res["query_tokens"] * 2 * args.draws / 1e9
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

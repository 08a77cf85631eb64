"""A tiny but realistic run directory, made without the Prefect flow.

``make_run(root)`` samples the digits problem with :class:`bif.sampling.chain.SGLDChain`,
commits the blocks through :class:`bif.store.traces.TraceStore` (traces, health, state,
reference.parquet), computes the BIF in memory and writes ``bif.zarr``, ``topk.parquet``,
``config.json`` and ``manifest.json`` in the documented layout. The flow's real output
can replace it later.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bif import schema as S
from bif.config import RunConfig, SamplerConfig
from bif.examples import digits
from bif.problem import Problem
from bif.moments import bif_in_memory
from bif.sampling.chain import SGLDChain
from bif.store.traces import TraceStore


@dataclass(frozen=True)
class TinyRun:
    """Where the run lies and what it holds."""

    uri: str
    config: RunConfig
    problem: Problem
    train: np.ndarray  # (chains, draws, n_train) float64 traces
    query: np.ndarray  # (chains, draws, n_query)
    n_train: int
    n_query: int


def topk_frame(bif: np.ndarray, bif_corr: np.ndarray, *, k: int) -> pd.DataFrame:
    """topk.parquet rows: per query the k largest ('positive') and k smallest ('negative') BIF train examples."""
    rows = []
    order = np.argsort(bif, axis=0)  # (n_train, n_query) ascending per query
    for j in range(bif.shape[1]):
        for direction, idx in (("positive", order[::-1, j][:k]), ("negative", order[:, j][:k])):
            for rank, i in enumerate(idx):  # rank 0 = most influential, as in bif.tasks.covariance
                rows.append({S.QUERY: j, S.DIRECTION: direction, S.RANK: rank, S.TRAIN: int(i),
                             S.BIF: float(bif[i, j]), S.BIF_CORR: float(bif_corr[i, j])})
    return pd.DataFrame(rows, columns=list(S.TOPK_COLUMNS))


def write_results(uri: str, bif: np.ndarray, bif_corr: np.ndarray, *, k: int = 5) -> None:
    """bif.zarr (dims (train, query), coords = sample ids) and topk.parquet under a local ``uri``."""
    import xarray as xr

    n_train, n_query = bif.shape
    ds = xr.Dataset({S.BIF: ((S.TRAIN_DIM, S.QUERY_DIM), bif), S.BIF_CORR: ((S.TRAIN_DIM, S.QUERY_DIM), bif_corr)},
                    coords={S.TRAIN_DIM: np.arange(n_train), S.QUERY_DIM: np.arange(n_query)})
    ds.chunk({S.TRAIN_DIM: max(1, n_train // 2), S.QUERY_DIM: n_query}).to_zarr(
        str(Path(uri) / S.BIF_ZARR), mode="w", consolidated=False)
    topk_frame(bif, bif_corr, k=k).to_parquet(Path(uri) / S.TOPK_FILE, index=False)


def make_run(root: str | Path, *, n_train: int = 120, n_query: int = 12, num_chains: int = 2, num_draws: int = 40,
             draws_per_block: int = 20, hidden: int = 16, train_epochs: int = 60, seed: int = 0,
             num_burnin_steps: int = 20, steps_per_draw: int = 2) -> TinyRun:
    """Sample and write a complete tiny digits run under ``root``; takes about a second."""
    torch.set_num_threads(1)
    uri = str(root)
    Path(uri).mkdir(parents=True, exist_ok=True)
    problem = digits.build(n_train=n_train, n_query=n_query, hidden=hidden, seed=seed, train_epochs=train_epochs)
    settings = SamplerConfig(num_chains=num_chains, num_draws=num_draws, draws_per_block=draws_per_block,
                             num_burnin_steps=num_burnin_steps, steps_per_draw=steps_per_draw, step_size=1e-4, gamma=1000.0, batch_size=32,
                             seed=seed, trace_dtype="float32")
    config = RunConfig(problem="bif.examples.digits:build",
                       problem_args={"n_train": n_train, "n_query": n_query, "hidden": hidden, "seed": seed,
                                     "train_epochs": train_epochs},
                       output=uri, sampler=settings)
    store = TraceStore(uri)
    train, query = [], []
    for c in range(num_chains):
        chain = SGLDChain(problem, settings, chain=c)
        ref_train, ref_query = chain.reference_losses()
        if c == 0:
            store.write_reference(ref_train, ref_query)
        blocks = []
        for b, block in enumerate(chain.run(num_draws=num_draws, draws_per_block=draws_per_block)):
            store.write_block(block, block_index=b, ref_train_loss_mean=float(ref_train.mean()))
            blocks.append(block)
        # the store keeps float32; analyse exactly what was stored
        train.append(np.concatenate([blk.train_losses for blk in blocks]).astype(np.float32).astype(np.float64))
        query.append(np.concatenate([blk.query_losses for blk in blocks]).astype(np.float32).astype(np.float64))
    tr, qu = np.stack(train), np.stack(query)
    bif, bif_corr = bif_in_memory(tr, qu)
    write_results(uri, bif, bif_corr)
    (Path(uri) / S.CONFIG_FILE).write_text(json.dumps({"config_hash": config.hash(), "config": config.public_dict()},
                                                      indent=2))
    (Path(uri) / S.MANIFEST_FILE).write_text(json.dumps({"status": S.STATUS_COMPLETE, "config_hash": config.hash()}))
    return TinyRun(uri=uri, config=config, problem=problem, train=tr, query=qu, n_train=n_train, n_query=n_query)

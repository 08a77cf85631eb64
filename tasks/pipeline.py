"""The pipeline's stages as plain functions (no Prefect): prepare, sample one chain, reduce, finish.

``tasks.steps`` wraps each in a Prefect ``@task``; tests call these directly.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bif import schema as S
from bif.config import RunConfig
from bif.errors import RunConflictError
from bif.manifest import package_versions, read_manifest, update_manifest
from bif.problem import Problem, load_checkpoint, load_problem, model_hash
from bif.storage import atomic_write, check_writable, get_fs, join, read_json, write_json
from tasks.sampler import SGLDChain, resolve_device
from tasks.traces import TraceStore

ProgressFn = Callable[[int, int, int], None]  # (chain, draws_done, num_draws)


@dataclass(frozen=True)
class RunInfo:
    """Facts about a run fixed at preparation time."""

    config_hash: str
    n_train: int
    n_query: int
    checkpoint_sha256: str | None
    model_sha256: str
    ref_train_loss_mean: float
    loss_bounds: tuple[float, float]
    query_is_train: bool
    already_complete: bool = False


@dataclass(frozen=True)
class ChainResult:
    """What one chain task did."""

    chain: int
    num_draws: int
    resumed_blocks: int
    seconds: float  # whole task: problem load, sampling, writes
    sampling_started_at: float  # epoch seconds when the first SGLD step ran
    sampling_seconds: float  # burn-in + draws + Parquet commits
    draws_sampled: int  # draws produced by this task (fewer after a resume)


def materialize_problem(cfg: RunConfig) -> tuple[Problem, str | None]:
    """Build the problem and load the checkpoint; returns (problem, checkpoint sha256 or None)."""
    problem = load_problem(cfg.problem, cfg.problem_args)
    ckpt = None
    if cfg.checkpoint is not None:
        ckpt = load_checkpoint(problem.model, cfg.checkpoint, storage_options=cfg.storage_options)
    return problem, ckpt


def trace_store(cfg: RunConfig) -> TraceStore:
    return TraceStore(cfg.output, storage_options=cfg.storage_options, loss_dtype=cfg.sampler.trace_dtype)


def prepare_run(cfg: RunConfig) -> RunInfo:
    """Check the output, refuse a conflicting rerun, write config.json, the running manifest and reference losses."""
    check_writable(cfg.output, cfg.storage_options)
    fs, root = get_fs(cfg.output, cfg.storage_options)
    cfg_hash = cfg.hash()
    existing = read_json(fs, join(root, S.CONFIG_FILE))
    if existing is not None and existing.get("config_hash") != cfg_hash:
        raise RunConflictError(
            f"output {cfg.output!r} holds a run with config hash {existing.get('config_hash')} but this config "
            f"hashes to {cfg_hash} (problem, checkpoint or sampler settings differ). Use another --output, "
            "or delete the old run."
        )
    problem, ckpt = materialize_problem(cfg)
    manifest = read_manifest(cfg.output, cfg.storage_options) or {}
    done = manifest.get("status") == S.STATUS_COMPLETE and manifest.get("config") == cfg.public_dict()
    chain = SGLDChain(problem, cfg.sampler, chain=0, device=resolve_device(cfg.compute.device))
    ref_train, ref_query = chain.reference_losses()
    info = RunInfo(config_hash=cfg_hash, n_train=len(problem.train), n_query=len(problem.query),
                   checkpoint_sha256=ckpt, model_sha256=model_hash(problem.model),
                   ref_train_loss_mean=float(ref_train.mean()), loss_bounds=tuple(problem.loss_bounds),
                   query_is_train=problem.query is problem.train, already_complete=done)
    if done:
        return info
    write_json(fs, join(root, S.CONFIG_FILE), {"config_hash": cfg_hash, "config": cfg.public_dict()})
    trace_store(cfg).write_reference(ref_train, ref_query)
    update_manifest(cfg.output, cfg.storage_options, status=S.STATUS_RUNNING, config=cfg.public_dict(),
                    config_hash=cfg_hash, checkpoint_sha256=ckpt, model_sha256=info.model_sha256,
                    n_train=info.n_train, n_query=info.n_query, packages=package_versions(), error=None,
                    started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return info


def pick_device(cfg: RunConfig) -> torch.device:
    """The chain's device; on a multi-GPU worker pool, worker k takes GPU k mod count."""
    device = resolve_device(cfg.compute.device)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        try:
            from distributed import get_worker

            name = get_worker().name
            if isinstance(name, int):
                return torch.device("cuda", name % torch.cuda.device_count())
        except (ImportError, ValueError):
            pass
    return device


def run_chain(cfg: RunConfig, chain: int, *, ref_train_loss_mean: float, progress: ProgressFn | None = None
              ) -> ChainResult:
    """Sample one chain, committing a trace block every ``draws_per_block`` draws; resumes if blocks exist."""
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.compute.threads_per_worker)
    problem, _ = materialize_problem(cfg)
    s = cfg.sampler
    loss_dtype = torch.float32 if s.trace_dtype == "float32" else torch.float64
    sampler = SGLDChain(problem, s, chain=chain, device=pick_device(cfg), loss_dtype=loss_dtype)
    store = trace_store(cfg)
    state, done_blocks = store.load_resume_state(chain)
    if state is not None:
        sampler.load_state(state)
    if progress:
        progress(chain, sampler.num_recorded, s.num_draws)
    draw_cb = (lambda d: progress(chain, d, s.num_draws)) if progress else None
    started_at, t1, first = time.time(), time.perf_counter(), sampler.num_recorded
    # Commit each block on a writer thread while the chain samples the next one. At most one
    # write is in flight, so blocks still commit in order (resume semantics are unchanged)
    # and a failed write surfaces before the next block is handed over.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"bif-writer-{chain}") as writer:
        pending = None
        for i, block in enumerate(sampler.run(num_draws=s.num_draws, draws_per_block=s.draws_per_block,
                                              on_draw=draw_cb), start=done_blocks):
            if pending is not None:
                pending.result()
            pending = writer.submit(store.write_block, block, block_index=i, ref_train_loss_mean=ref_train_loss_mean)
        if pending is not None:
            pending.result()
    t2 = time.perf_counter()
    return ChainResult(chain=chain, num_draws=s.num_draws, resumed_blocks=done_blocks, seconds=t2 - t0,
                       sampling_started_at=started_at, sampling_seconds=t2 - t1,
                       draws_sampled=sampler.num_recorded - first)


def reduce_covariance(cfg: RunConfig, info: RunInfo, *, client: Any = None,
                      progress: Callable[[int, int], None] | None = None):
    """Reduce all committed traces to bif.zarr and topk.parquet; returns the CovarianceSummary."""
    from tasks.covariance import compute_bif

    store = trace_store(cfg)
    files = store.block_files(num_chains=cfg.sampler.num_chains)
    cv = cfg.covariance
    summary = compute_bif(cfg.output, files, storage_options=cfg.storage_options, n_train=info.n_train,
                          n_query=info.n_query, train_block=cv.train_block_size, query_block=cv.query_block_size,
                          split_every=cv.split_every, pooling=cv.pooling, ddof=cv.ddof, k=cv.topk,
                          client=client, progress=progress, compress=cv.compress,
                          attrs={"config_hash": info.config_hash, "pooling": cv.pooling, "ddof": cv.ddof})
    fs, root = get_fs(cfg.output, cfg.storage_options)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(summary.topk, preserve_index=False), sink)
    atomic_write(fs, join(root, S.TOPK_FILE), sink.getvalue().to_pybytes())
    return summary


def check_traces_complete(cfg: RunConfig) -> None:
    """Every chain has all its draws committed; else IncompleteRunError naming the chain."""
    from bif.errors import IncompleteRunError

    store = trace_store(cfg)
    s = cfg.sampler
    expected = -(-s.num_draws // s.draws_per_block)
    for c in range(s.num_chains):
        got = len(store.committed_blocks(c))
        if got != expected:
            raise IncompleteRunError(f"chain {c} has {got} of {expected} trace blocks committed; rerun to resume it")


def finish_run(cfg: RunConfig, info: RunInfo, *, timings: dict[str, float], extra: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """Write the manifest with status complete: the last write of a run."""
    return update_manifest(cfg.output, cfg.storage_options, status=S.STATUS_COMPLETE, timings=timings,
                           run_info=asdict(info), **(extra or {}))


def fail_run(cfg: RunConfig, err: BaseException, *, status: str = S.STATUS_FAILED, **fields: Any) -> None:
    """Record a failure in the manifest (best effort: the output itself may be unreachable)."""
    from bif.storage import redact

    try:
        update_manifest(cfg.output, cfg.storage_options, status=status,
                        error=redact(f"{type(err).__name__}: {err}", cfg.storage_options), **fields)
    except Exception:  # noqa: BLE001 - the original error matters more
        pass


def quality_gates(cfg: RunConfig, info: RunInfo, *, map_fn: Callable | None = None):
    """Run the data-quality gates over the finished run; returns a tasks.quality.QualityReport."""
    from tasks.quality import run_gates

    return run_gates(cfg.output, cfg.storage_options, cfg, n_train=info.n_train, n_query=info.n_query,
                     loss_bounds=info.loss_bounds, query_is_train=info.query_is_train, map_fn=map_fn or map)


def diagnostics(cfg: RunConfig, *, map_fn: Callable | None = None) -> dict[str, Any]:
    """ArviZ R-hat / ESS per sample → diagnostics.parquet, plus the BIF's MCSE; returns the summary."""
    from tasks.diagnostics import write_diagnostics

    q = cfg.quality
    return write_diagnostics(cfg.output, cfg.storage_options, num_chains=cfg.sampler.num_chains,
                             max_samples=q.diagnostics_max_samples, block_samples=q.diagnostics_block_samples,
                             num_batches=q.mcse_num_batches, rhat_threshold=q.rhat_threshold, map_fn=map_fn)


def report(cfg: RunConfig, *, status: str | None = None) -> str:
    """report.html (with the problem's renderer for example images, when it has one)."""
    from bif.report import write_report

    try:
        problem, _ = materialize_problem(cfg)
    except Exception:  # noqa: BLE001 - a report without images beats no report
        problem = None
    return write_report(cfg.output, cfg.storage_options, problem=problem, status=status)

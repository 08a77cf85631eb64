"""The pipeline's stages as plain functions (no Prefect): prepare, sample one chain, reduce, finish.

``bif.tasks.steps`` wraps each in a Prefect ``@task``; tests call these directly.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from bif import schema as S
from bif.config import RunConfig
from bif.errors import BifError, ProblemError, RunConflictError
from bif.store.fs import check_writable, storage_guard
from bif.store.manifest import package_versions
from bif.store.run import RunStore

if TYPE_CHECKING:  # torch, the problem and the sampler load where they are used: on the workers, not in the command
    import torch

    from bif.problem import Problem
    from bif.sampling.chain import SGLDChain

ProgressFn = Callable[[int, int, int], None]  # (chain, draws_done, num_draws)


def _storage_errors(fn: Callable) -> Callable:
    """Stage functions turn backend failures (an unreachable endpoint) into a clear StorageError."""
    import functools

    @functools.wraps(fn)
    def wrapper(cfg: RunConfig, *args: Any, **kwargs: Any) -> Any:
        with storage_guard(cfg.output, cfg.storage_options):
            return fn(cfg, *args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class RunInfo:
    """Facts about a run fixed at preparation time."""

    config_hash: str
    n_train: int
    n_query: int
    checkpoint_sha256: str | None
    model_sha256: str
    data_sha256: str
    ref_train_loss_mean: float
    loss_bounds: tuple[float, float]
    query_is_train: bool
    already_complete: bool = False
    # token runs (problem.loss returns (B, T) or ((B, T), mask)): valid tokens per split; None for sample runs
    n_train_tokens: int | None = None
    n_query_tokens: int | None = None
    nbeta: float | None = None  # the chains' nβ (sampler.nbeta, else train samples or valid train tokens)


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
    pid: int = 0  # the process that ran the chain (a Dask worker's, in a flow run)


#: Problems built ahead of their first chain by :func:`warm_problem`, one per key, used once.
_WARMED: dict[tuple[str, str, str | None], tuple[float, Problem, str | None]] = {}
#: A warmed problem older than this is built again (it was meant for a chain that never came).
WARM_TTL_S = 600.0


def _problem_key(cfg: RunConfig) -> tuple[str, str, str | None]:
    import json

    return cfg.problem, json.dumps(cfg.problem_args, sort_keys=True, default=str), cfg.checkpoint


def warm_problem(cfg: RunConfig) -> float:
    """Build ``cfg``'s problem in this process ahead of its first chain; returns the seconds it took.

    Runs on each Dask worker while the command still checks the run (:func:`preflight`), so the
    worker's first chain finds its imports loaded (``transformers`` for a language model: ~5 s)
    and the problem built. The first :func:`materialize_problem` ``(cfg, warmed=True)`` in this
    process takes the warmed problem (once; later chains build their own); it is never reused
    across runs, and the chain still checks its identity (checkpoint, weights, data) against the
    run's. Errors are left to the chain, which reports them.
    """
    import torch

    t0 = time.perf_counter()
    now = time.monotonic()
    for key in [k for k, (t, _, _) in _WARMED.items() if now - t > WARM_TTL_S]:
        _WARMED.pop(key, None)
    torch.set_num_threads(cfg.compute.threads_per_worker)  # as the chain will: same floats, same hashes
    problem, ckpt = materialize_problem(cfg)
    _WARMED[_problem_key(cfg)] = (time.monotonic(), problem, ckpt)
    return time.perf_counter() - t0


def materialize_problem(cfg: RunConfig, *, warmed: bool = False) -> tuple[Problem, str | None]:
    """Build the problem and load the checkpoint; returns (problem, checkpoint sha256 or None).

    ``warmed``: take the problem :func:`warm_problem` built in this process for ``cfg``, if any
    (once, and only within :data:`WARM_TTL_S`).
    """
    if warmed:
        entry = _WARMED.pop(_problem_key(cfg), None)
        if entry is not None and time.monotonic() - entry[0] <= WARM_TTL_S:
            return entry[1], entry[2]
    from bif.problem import load_checkpoint, load_problem

    problem = load_problem(cfg.problem, cfg.problem_args)
    ckpt = None
    if cfg.checkpoint is not None:
        ckpt = load_checkpoint(problem.model, cfg.checkpoint, storage_options=cfg.storage_options)
    return problem, ckpt


def run_store(cfg: RunConfig) -> RunStore:
    """The RunStore of ``cfg.output``."""
    return RunStore.of(cfg)


#: The identity of a run's inputs, beyond its config hash (stored in config.json and manifest.json):
#: - ``checkpoint_sha256``: sha256 of the checkpoint file's bytes (None without a checkpoint);
#: - ``model_sha256``: sha256 of the model's parameters and buffers at w*, after the checkpoint is
#:   loaded; covers factories that train or load the model themselves;
#: - ``data_sha256``: sha256 of the train and query sets exactly as the losses see them: every
#:   sample collated once into the no-grad evaluation batches (the tensors are already in memory
#:   for the reference losses, so hashing costs one pass over them, ~1 GB/s). Data a loss reads
#:   from elsewhere (a file the model opens itself) is not covered.
#: A rerun or a resumed chain whose identity differs is refused: blocks sampled around two
#: different checkpoints or datasets must never mix. A factory that trains its own model must do
#: so deterministically (seeded; hashes are computed with ``compute.threads_per_worker`` torch
#: threads everywhere, as the chains run); otherwise load a checkpoint.
IDENTITY_KEYS = ("checkpoint_sha256", "model_sha256", "data_sha256")


def data_hash(chain: SGLDChain) -> str:
    """sha256 of the train and query sets as collated for the losses (see IDENTITY_KEYS)."""
    from bif.problem import tensors_hash

    train, query = chain.eval_data
    h = tensors_hash(["train", train])
    return tensors_hash(["query", query], h).hexdigest()


def run_identity(problem: Problem, ckpt: str | None, chain: SGLDChain) -> dict[str, str | None]:
    from bif.problem import model_hash

    return {"checkpoint_sha256": ckpt, "model_sha256": model_hash(problem.model), "data_sha256": data_hash(chain)}


def stored_identity(cfg: RunConfig) -> dict[str, Any] | None:
    """The identity recorded by the run already at ``cfg.output`` (config.json, else manifest.json)."""
    store = run_store(cfg)
    existing = store.read_config() or {}
    if isinstance(existing.get("identity"), dict):
        return existing["identity"]
    manifest = store.manifest() or {}
    old = {k: manifest[k] for k in IDENTITY_KEYS if k in manifest}
    return old or None


def check_identity(cfg: RunConfig, identity: dict[str, Any], stored: dict[str, Any] | None, *, where: str) -> None:
    """RunConflictError if ``identity`` differs from the ``stored`` one of the run at ``cfg.output``."""
    if not stored:
        return
    diffs = [k for k in IDENTITY_KEYS if k in stored and stored[k] != identity.get(k)]
    if not diffs:
        return
    what = {"checkpoint_sha256": f"checkpoint {cfg.checkpoint!r}", "model_sha256": "the model's weights at w*",
            "data_sha256": "the problem's train / query data"}
    lines = "; ".join(f"{what[k]}: the run has {k} {stored[k]}, now {identity.get(k)}" for k in diffs)
    raise RunConflictError(
        f"{where}: output {cfg.output!r} holds a run made from other inputs than this one ({lines}). "
        "Its results belong to the old inputs, and mixing them would be wrong. The existing run is left "
        "untouched. Use another --output for the new inputs (or delete the old run to replace it)."
    )


def check_reference_losses(problem: Problem, train: np.ndarray, query: np.ndarray) -> None:
    """ProblemError naming split and sample if a loss at w* is NaN / Inf or outside ``problem.loss_bounds``."""
    low, high = (float(b) for b in problem.loss_bounds)
    for split, losses in ((S.TRAIN, train), (S.QUERY, query)):
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            i = int(bad[0])
            raise ProblemError(
                f"the loss at the checkpoint w* is {losses[i]} for {split} sample {i} ({bad.size} non-finite "
                f"{split} losses in all). Sampling around it cannot work: check the checkpoint, the data of that "
                "sample and problem.loss (e.g. log(0), a division by zero)."
            )
        tol = 1e-6 * max(1.0, abs(low) if np.isfinite(low) else 1.0, abs(high) if np.isfinite(high) else 1.0)
        out = np.flatnonzero((losses < low - tol) | (losses > high + tol))
        if out.size:
            i = int(out[0])
            raise ProblemError(
                f"the loss at the checkpoint w* is {losses[i]} for {split} sample {i}, outside problem.loss_bounds "
                f"({low}, {high}) ({out.size} {split} samples out of bounds). Fix problem.loss or loss_bounds."
            )


def _reference(problem: Problem, cfg: RunConfig) -> tuple[SGLDChain, np.ndarray, np.ndarray]:
    """A chain-0 sampler (for its collated data) and the per-sample losses at w*."""
    from bif.sampling.chain import SGLDChain, resolve_device

    try:
        chain = SGLDChain(problem, cfg.sampler, chain=0, device=resolve_device(cfg.compute.device))
        ref_train, ref_query = chain.reference_losses()
    except BifError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's loss / dataset failed
        raise ProblemError(
            f"evaluating problem.loss at w* raised {type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
            f" (problem {cfg.problem!r}); check that loss(model, batch) accepts a default-collated batch"
        ) from None
    return chain, ref_train, ref_query


@dataclass(frozen=True)
class _Inspection:
    info: RunInfo
    identity: dict[str, Any]
    ref_train: np.ndarray  # per variable (token runs: per valid token)
    ref_query: np.ndarray
    chain: SGLDChain
    problem: Problem


def _inspect(cfg: RunConfig) -> _Inspection:
    """Every check of a run's start that writes nothing: output, config hash, problem, checkpoint,
    reference losses, identity against an existing run."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.compute.threads_per_worker)  # as in the chains: same floats, same hashes
    try:
        return _inspect_pinned(cfg)
    finally:
        torch.set_num_threads(threads)


def _same_run(stored: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Whether a complete run's stored public config equals ``current``, the checkpoint's path aside
    (the checkpoint is compared by content through the identity check)."""
    if not isinstance(stored, dict):
        return False
    return {k: v for k, v in stored.items() if k != "checkpoint"} == {k: v for k, v in current.items() if k != "checkpoint"}


def _inspect_pinned(cfg: RunConfig) -> _Inspection:
    check_writable(cfg.output, cfg.storage_options)
    store = run_store(cfg)
    cfg_hash = cfg.hash()
    existing = store.read_config()
    if existing is not None and existing.get("config_hash") != cfg_hash:
        raise RunConflictError(
            f"output {cfg.output!r} holds a run with config hash {existing.get('config_hash')} but this config "
            f"hashes to {cfg_hash} (problem or sampler settings differ). The existing run is left "
            "untouched. Use another --output, or delete the old run."
        )
    problem, ckpt = materialize_problem(cfg)
    chain, ref_train, ref_query = _reference(problem, cfg)
    identity = run_identity(problem, ckpt, chain)
    check_identity(cfg, identity, stored_identity(cfg), where="refusing to reuse the output")
    check_reference_losses(problem, ref_train, ref_query)
    manifest = store.manifest() or {}
    done = manifest.get("status") == S.STATUS_COMPLETE and _same_run(manifest.get("config"), cfg.public_dict())
    tokens = chain.variables.is_tokens
    info = RunInfo(config_hash=cfg_hash, n_train=len(problem.train), n_query=len(problem.query),
                   checkpoint_sha256=ckpt, model_sha256=identity["model_sha256"],
                   data_sha256=identity["data_sha256"],
                   ref_train_loss_mean=float(ref_train.mean()), loss_bounds=tuple(problem.loss_bounds),
                   query_is_train=problem.query is problem.train, already_complete=done,
                   n_train_tokens=chain.n_train_vars if tokens else None,
                   n_query_tokens=chain.n_query_vars if tokens else None, nbeta=chain.nbeta)
    return _Inspection(info, identity, ref_train, ref_query, chain, problem)


@_storage_errors
def preflight(cfg: RunConfig) -> RunInfo:
    """Fast checks before any server starts (about a second on small problems, plus the problem's imports).

    ``bif run`` starts its Dask cluster beside them when a Prefect API is already up; a failure
    then ends the command at once, cluster and all (:func:`bif.flows.runtime.exit_now`).

    Validates the output (writable, not leased by a live run, no conflicting run), builds the
    problem, loads the checkpoint, computes the losses at w* and checks them and the run's
    identity. Writes nothing; the flow's prepare step checks all of it again.
    """
    if cfg.output.startswith("memory://"):
        from bif.errors import ConfigError

        raise ConfigError("output memory:// lives in one process and Dask workers cannot see it; "
                          "use a local path or s3:// for runs (memory:// serves tests of the trace store)")
    info = _inspect(cfg).info
    run_store(cfg).check_lease()
    return info


def acquire_lease(cfg: RunConfig):
    """Take the output's lease (bif.store.lease.OutputLease); OutputBusyError if a live run holds it."""
    return run_store(cfg).lease().acquire()


@_storage_errors
def prepare_run(cfg: RunConfig) -> RunInfo:
    """Check the output, refuse a conflicting rerun, write config.json, the running manifest and reference losses.

    Refusals (RunConflictError, a bad problem or checkpoint) write nothing.
    """
    store = run_store(cfg)
    ins = _inspect(cfg)
    info = ins.info
    if info.already_complete:
        return info
    store.write_config({"config_hash": info.config_hash, "config": cfg.public_dict(), "identity": ins.identity})
    variables = ins.chain.variables
    if variables.is_tokens:  # reference.parquet holds sequence losses; tokens.parquet every valid token
        from bif.sampling.measure import sequence_sums
        from bif.tasks.tokens import token_table

        store.write_table(S.TOKENS_FILE, token_table(variables, ins.ref_train, ins.ref_query,
                                                     ins.problem.render_tokens))
        store.write_reference(sequence_sums(ins.ref_train, variables.token_counts[0]),
                              sequence_sums(ins.ref_query, variables.token_counts[1]))
    else:
        store.write_reference(ins.ref_train, ins.ref_query)
    store.update_manifest(status=S.STATUS_RUNNING, config=cfg.public_dict(),
                    config_hash=info.config_hash, **ins.identity,
                    n_train=info.n_train, n_query=info.n_query, packages=package_versions(), error=None,
                    **({"n_train_tokens": info.n_train_tokens, "n_query_tokens": info.n_query_tokens}
                       if info.n_train_tokens is not None else {}),
                    started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return info


def pick_device(cfg: RunConfig) -> torch.device:
    """The chain's device; on a multi-GPU worker pool, worker k takes GPU k mod count."""
    import torch

    from bif.sampling.chain import resolve_device

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


@_storage_errors
def run_chain(cfg: RunConfig, chain: int, *, ref_train_loss_mean: float, progress: ProgressFn | None = None
              ) -> ChainResult:
    """Sample one chain, committing a trace block every ``draws_per_block`` draws; resumes if blocks exist."""
    import torch

    from bif.sampling.chain import SGLDChain

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.compute.threads_per_worker)
    problem, ckpt = materialize_problem(cfg, warmed=True)
    s = cfg.sampler
    loss_dtype = torch.float32 if s.trace_dtype == "float32" else torch.float64
    sampler = SGLDChain(problem, s, chain=chain, device=pick_device(cfg), loss_dtype=loss_dtype)
    # The chain checks the run's identity itself: a deployed flow, or a retry, may resume it
    # after the checkpoint or the data changed; its blocks must never mix with the old ones.
    check_identity(cfg, run_identity(problem, ckpt, sampler), stored_identity(cfg),
                   where=f"chain {chain} refuses to resume")
    store = run_store(cfg)
    state, done_blocks = store.load_resume_state(chain)
    skip = 0
    if state is not None:
        sampler.load_state(state)
    elif done_blocks:
        # No state to resume from (a corrupt block was dropped, or an older run kept only the
        # latest state): resample the chain from its seed, which is bit-identical, and commit
        # only the blocks that are missing. Costs the sampling time of the kept blocks.
        skip = done_blocks
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
                                              on_draw=draw_cb), start=done_blocks - skip):
            if i < done_blocks:
                continue  # replayed to rebuild the state; already committed
            if pending is not None:
                pending.result()
            pending = writer.submit(store.write_block, block, block_index=i, ref_train_loss_mean=ref_train_loss_mean)
        if pending is not None:
            pending.result()
    t2 = time.perf_counter()
    return ChainResult(chain=chain, num_draws=s.num_draws, resumed_blocks=done_blocks, seconds=t2 - t0,
                       sampling_started_at=started_at, sampling_seconds=t2 - t1,
                       draws_sampled=sampler.num_recorded - first, pid=os.getpid())


@_storage_errors
def reduce_covariance(cfg: RunConfig, info: RunInfo, *, client: Any = None,
                      progress: Callable[[str, int, int], None] | None = None):
    """Reduce all committed traces to bif.zarr and topk.parquet (and, on token runs, bif_tokens.zarr and
    topk_tokens.parquet); returns the CovarianceSummary. ``progress(stage, done, total)`` is called as blocks finish,
    with stage "covariance" for the blocks of bif.zarr, then "tokens" for the token reduction's own blocks (one
    count for both read "3/2" on the tiny LM)."""
    from bif.tasks.covariance import compute_bif

    def stage(name: str) -> Callable[[int, int], None] | None:
        return partial(progress, name) if progress else None

    store = run_store(cfg)
    files = store.blocks(num_chains=cfg.sampler.num_chains)
    cv = cfg.covariance
    # verify=True: each file's checksum (CRC32C) is checked beside the reduction; a damaged file raises a
    # StorageError naming it, and a rerun redoes it
    summary = compute_bif(store, cv, files, n_train=info.n_train, n_query=info.n_query, client=client,
                          progress=stage("covariance"), verify=True,
                          attrs={"config_hash": info.config_hash, "pooling": cv.pooling, "ddof": cv.ddof})
    store.write_topk(summary.topk)
    if info.n_train_tokens is not None:  # token runs: topk_tokens.parquet (and bif_tokens.zarr)
        from bif.tasks.tokens import compute_token_bif

        tokens = compute_token_bif(store, cv, files, client=client, progress=stage("tokens"),
                                   attrs={"config_hash": info.config_hash, "pooling": cv.pooling, "ddof": cv.ddof})
        store.update_manifest(token_outputs=tokens.outputs())
    return summary


@_storage_errors
def check_traces_complete(cfg: RunConfig) -> None:
    """Every chain has all its draws committed; else IncompleteRunError naming the chain."""
    from bif.errors import IncompleteRunError

    store = run_store(cfg)
    s = cfg.sampler
    expected = -(-s.num_draws // s.draws_per_block)
    for c in range(s.num_chains):
        got = len(store.committed_blocks(c))
        if got != expected:
            raise IncompleteRunError(f"chain {c} has {got} of {expected} trace blocks committed; rerun to resume it")


@_storage_errors
def finish_run(cfg: RunConfig, info: RunInfo, *, timings: dict[str, float], extra: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """Write the manifest with status complete: the last write of a run."""
    return run_store(cfg).update_manifest(status=S.STATUS_COMPLETE, timings=timings, run_info=asdict(info),
                                          **(extra or {}))


def fail_run(cfg: RunConfig, err: BaseException, *, status: str = S.STATUS_FAILED, attempts: int = 5,
             backoff_s: float = 0.5, **fields: Any) -> None:
    """Record a failure in the manifest (best effort: the output itself may be unreachable).

    A refusal (RunConflictError: another run's output, a busy lease) writes nothing: the
    existing run stays as it was. Otherwise the write is retried ``attempts`` times with
    doubling backoff (0.5 + 1 + 2 + 4 s), so a store that comes back gets ``failed``; if it
    never does, the manifest stays ``running``, which readers refuse as not complete, and the
    run's lease lapses at its expiry.
    """
    from bif.store.fs import redact

    if isinstance(err, RunConflictError):
        return
    delay = backoff_s
    for attempt in range(attempts):
        try:
            run_store(cfg).update_manifest(status=status,
                            error=redact(f"{type(err).__name__}: {err}", cfg.storage_options), **fields)
            return
        except Exception:  # noqa: BLE001 - the original error matters more
            if attempt + 1 < attempts:
                time.sleep(delay)
                delay *= 2


@_storage_errors
def quality_gates(cfg: RunConfig, info: RunInfo, *, map_fn: Callable | None = None):
    """Run the data-quality gates over the finished run; returns a bif.quality.run.QualityReport."""
    from bif.quality.run import run_gates

    return run_gates(cfg.output, cfg.storage_options, cfg, n_train=info.n_train, n_query=info.n_query,
                     loss_bounds=info.loss_bounds, query_is_train=info.query_is_train, map_fn=map_fn or map)


@_storage_errors
def diagnostics(cfg: RunConfig, *, map_fn: Callable | None = None) -> dict[str, Any]:
    """ArviZ R-hat / ESS per sample → diagnostics.parquet, plus the BIF's MCSE; returns the summary."""
    from bif.quality.diagnostics import write_diagnostics

    q = cfg.quality
    return write_diagnostics(cfg.output, cfg.storage_options, num_chains=cfg.sampler.num_chains,
                             max_samples=q.diagnostics_max_samples, block_samples=q.diagnostics_block_samples,
                             num_batches=q.mcse_num_batches, rhat_threshold=q.rhat_threshold, map_fn=map_fn)


def _report_problem(cfg: RunConfig) -> Any:
    try:
        return materialize_problem(cfg)[0]
    except Exception:  # noqa: BLE001 - a report without images beats no report
        return None


def report(cfg: RunConfig, *, status: str | None = None, prebuilt: dict[str, str] | None = None) -> str:
    """report.html (with the problem's renderer for example images, when it has one).

    ``prebuilt``: sections :func:`report_sections` built already (title -> HTML); the problem is
    then built only if a section left to build draws examples.
    """
    from bif.report import SECTIONS, write_report

    prebuilt = prebuilt or {}
    needs_problem = SECTIONS[-1] not in prebuilt  # only the top-k section draws the problem's examples
    problem = _report_problem(cfg) if needs_problem else None
    return write_report(cfg.output, cfg.storage_options, problem=problem, status=status, prebuilt=prebuilt)


def report_sections(cfg: RunConfig, titles: tuple[str, ...] | None = None) -> dict[str, str]:
    """Report sections as HTML (title -> HTML), for :func:`report`'s ``prebuilt``: by default those that need
    neither the gates nor the diagnostics (``bif.report.EARLY_SECTIONS``), which the flow builds on a worker
    while its checks run; ``titles`` picks others. The problem is built only for the section that draws
    its examples."""
    from bif.report import EARLY_SECTIONS, SECTIONS, build_sections

    titles = EARLY_SECTIONS if titles is None else tuple(titles)
    problem = _report_problem(cfg) if SECTIONS[-1] in titles else None
    return build_sections(cfg.output, cfg.storage_options, problem=problem, titles=titles)

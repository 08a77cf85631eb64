"""Localized SGMCMC chains over a model's parameters, with per-sample loss traces at every draw.

Pure torch: imports nothing from Prefect, Dask or fsspec.

The target is the localized, tempered posterior (Kreer et al. 2025, arXiv 2509.26544)

    p(w) ∝ exp(-nβ·L_n(w) - γ/2·‖w - w*‖²),

with L_n the mean per-sample training loss. The dynamics are a :class:`bif.sampling.kernels.Kernel`,
whose docstrings hold the update equations: SGLD, ``w ← w - ε/2·(nβ·∇L_B(w) + γ(w - w*)) + N(0, ε)``
for a minibatch B, or pSGLD (RMSProp-preconditioned), selected by ``sampler.preconditioner``
(:func:`bif.sampling.kernels.kernel_name`).

This module owns what every kernel shares: the model copy and w*, the minibatch gradient,
the seeded generators, recording, the finite checks, blocks and the resume state.
The model stays in ``eval()`` mode throughout (no dropout; batch norm uses running stats).
After ``num_burnin_steps`` steps, a draw is recorded every ``steps_per_draw`` steps: the
per-sample losses of every train and query example, evaluated without gradients in large
batches. A NaN or Inf stops the chain with :class:`bif.errors.ChainDivergedError`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from bif.config import SamplerConfig
from bif.errors import ChainDivergedError, ProblemError
from bif.problem import Problem
from bif.sampling.kernels import Kernel, get_kernel, kernel_name


def chain_seed(root_seed: int, chain: int) -> int:
    """Seed of chain ``chain``, derived from the root seed with numpy's SeedSequence."""
    return int(np.random.SeedSequence([root_seed, chain]).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a collated batch (tensors nested in lists / tuples / dicts) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def collate_indices(ds: Dataset, idx: torch.Tensor) -> Any:
    """Collate the samples ``idx`` of ``ds`` like torch's default collate (fast path for TensorDataset)."""
    if isinstance(ds, TensorDataset):
        return [t[idx] for t in ds.tensors]
    return default_collate([ds[int(i)] for i in idx.tolist()])


def cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    """``batch`` with its floating-point tensors cast to ``dtype`` (nested lists / tuples / dicts; others kept)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(cast_floats(v, dtype) for v in batch)
    return batch


def eval_batches(ds: Dataset, batch_size: int, device: torch.device, *, dtype: torch.dtype | None = None
                 ) -> list[Any]:
    """All of ``ds`` collated once into consecutive batches of ``batch_size`` on ``device``.

    ``dtype``: cast the floating-point tensors to it (None: keep the dataset's dtypes).
    """
    n = len(ds)
    out = []
    for s in range(0, n, batch_size):
        batch = to_device(collate_indices(ds, torch.arange(s, min(s + batch_size, n))), device)
        out.append(batch if dtype is None else cast_floats(batch, dtype))
    return out


def checked_loss(problem: Problem, model: torch.nn.Module, batch: Any, expected: int) -> torch.Tensor:
    """``problem.loss(model, batch)``, checked to have shape ``(expected,)``."""
    out = problem.loss(model, batch)
    if not isinstance(out, torch.Tensor) or out.shape != (expected,):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ProblemError(
            f"problem.loss must return per-sample losses of shape ({expected},) for a batch of {expected}, "
            f"got {shape}; use reduction='none' (e.g. F.cross_entropy(..., reduction='none'))"
        )
    return out


@torch.no_grad()
def evaluate_losses(problem: Problem, model: torch.nn.Module, batches: Sequence[Any], sizes: Sequence[int],
                    out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (n,) with the per-sample losses of the collated ``batches``."""
    start = 0
    for batch, size in zip(batches, sizes, strict=True):
        out[start:start + size] = checked_loss(problem, model, batch, size).to(out.dtype)
        start += size
    return out


@dataclass
class ChainState:
    """Everything needed to continue a chain exactly: parameters, kernel state, RNG."""

    step: int  # SGLD steps taken so far
    num_recorded: int  # draws recorded so far
    params: dict[str, torch.Tensor]  # on CPU
    # the kernel's state_dict(), on CPU: pSGLD's RMSProp V per parameter, None for SGLD
    # (the name is that of the stored state files, which keep it)
    precond: dict[str, torch.Tensor] | None
    rng_cpu: torch.Tensor  # state of the minibatch-index generator
    rng_noise: torch.Tensor  # state of the noise generator (on the chain's device)


@dataclass(frozen=True)
class DrawBlock:
    """Draws ``[draw_start, draw_start + D)`` of one chain and the state after them."""

    chain: int
    draw_start: int
    train_losses: np.ndarray  # (D, n_train)
    query_losses: np.ndarray  # (D, n_query)
    steps: np.ndarray  # (D,) int64, SGLD step index of each draw
    distance: np.ndarray  # (D,) float64, ||w - w*|| at each draw
    state: ChainState

    @property
    def num_draws(self) -> int:
        return self.train_losses.shape[0]


class SGLDChain:
    """One localized SGMCMC chain started at the problem's checkpoint w*.

    The caller owns ``problem`` and this class never mutates it: it samples a deep copy of
    the model. ``kernel``: a registered kernel name or a :class:`~bif.sampling.kernels.Kernel`
    subclass; None takes the config's (:func:`~bif.sampling.kernels.kernel_name`).
    """

    def __init__(self, problem: Problem, settings: SamplerConfig, *, chain: int, device: torch.device | str = "cpu",
                 loss_dtype: torch.dtype = torch.float64, kernel: str | type[Kernel] | None = None):
        import copy

        self.problem = problem
        self.settings = settings
        self.chain = chain
        self.device = torch.device(device)
        self.loss_dtype = loss_dtype
        self.model = copy.deepcopy(problem.model).to(self.device).eval()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ProblemError("problem.model has no parameters with requires_grad=True to sample: every parameter "
                               "is frozen. Set requires_grad=True on the parameters whose posterior the BIF "
                               "should cover (e.g. the last layer) in the problem factory")
        self.anchor = [p.detach().clone() for p in self.params]
        self.n_train = len(problem.train)
        self.n_query = len(problem.query)
        self.nbeta = float(settings.nbeta if settings.nbeta is not None else self.n_train)
        kernel = kernel_name(settings) if kernel is None else kernel
        kernel_cls = get_kernel(kernel) if isinstance(kernel, str) else kernel
        self.kernel: Kernel = kernel_cls(self.names, self.params, settings)
        seed = chain_seed(settings.seed, chain)
        self.gen_cpu = torch.Generator().manual_seed(seed)
        self.gen_noise = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.step = 0
        self.num_recorded = 0
        bs = settings.eval_batch_size
        self._train_batches = eval_batches(problem.train, bs, self.device)
        self._query_batches = eval_batches(problem.query, bs, self.device)
        self._train_sizes = [min(bs, self.n_train - s) for s in range(0, self.n_train, bs)]
        self._query_sizes = [min(bs, self.n_query - s) for s in range(0, self.n_query, bs)]

    # -- state ---------------------------------------------------------------------------
    def state(self) -> ChainState:
        """Snapshot of the chain (copies on CPU)."""
        return ChainState(
            step=self.step,
            num_recorded=self.num_recorded,
            params={n: p.detach().cpu().clone() for n, p in zip(self.names, self.params)},
            precond=self.kernel.state_dict(),
            rng_cpu=self.gen_cpu.get_state(),
            rng_noise=self.gen_noise.get_state(),
        )

    def load_state(self, state: ChainState) -> None:
        """Continue from ``state`` (as produced by :meth:`state`)."""
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(state.params[n].to(self.device))
        self.kernel.load_state_dict(state.precond)
        self.gen_cpu.set_state(state.rng_cpu)
        self.gen_noise.set_state(state.rng_noise)
        self.step = state.step
        self.num_recorded = state.num_recorded

    # -- dynamics --------------------------------------------------------------------------
    def sgld_step(self) -> None:
        """One step of the chain's kernel on a fresh minibatch gradient (equations: :mod:`bif.sampling.kernels`)."""
        s = self.settings
        # minibatch without replacement; batch_size >= n_train gives the full-batch gradient
        idx = torch.randperm(self.n_train, generator=self.gen_cpu)[: s.batch_size]
        batch = to_device(collate_indices(self.problem.train, idx), self.device)
        for p in self.params:
            p.grad = None
        loss = checked_loss(self.problem, self.model, batch, len(idx)).mean()
        loss.backward()
        with torch.no_grad():
            self.kernel.step(self.params, [p.grad for p in self.params], anchor=self.anchor, nbeta=self.nbeta,
                             gamma=s.gamma, step_size=s.step_size, generator=self.gen_noise)
        self.step += 1

    @torch.no_grad()
    def distance(self) -> torch.Tensor:
        """||w - w*||_2 as a 0-d tensor on the chain's device."""
        return torch.sqrt(sum(((p - a) ** 2).sum() for p, a in zip(self.params, self.anchor)))

    def _check_finite(self, row: torch.Tensor, split: str, draw: int) -> None:
        if not bool(torch.isfinite(row).all()):
            bad = int((~torch.isfinite(row)).nonzero()[0, 0])
            raise ChainDivergedError(chain=self.chain, draw=draw, split=split, sample=bad, value=float(row[bad]))

    @property
    def eval_data(self) -> tuple[list[Any], list[Any]]:
        """(train batches, query batches): every sample collated once, as the losses see them."""
        return self._train_batches, self._query_batches

    def reference_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample train and query losses at the current weights, as float64 numpy arrays."""
        tr = evaluate_losses(self.problem, self.model, self._train_batches, self._train_sizes,
                             torch.empty(self.n_train, dtype=torch.float64, device=self.device))
        qu = evaluate_losses(self.problem, self.model, self._query_batches, self._query_sizes,
                             torch.empty(self.n_query, dtype=torch.float64, device=self.device))
        return tr.cpu().numpy(), qu.cpu().numpy()

    def run(self, *, num_draws: int, draws_per_block: int,
            on_draw: Callable[[int], None] | None = None) -> Iterator[DrawBlock]:
        """Sample until ``num_draws`` draws are recorded, yielding a DrawBlock every ``draws_per_block``.

        Resumes from the loaded state: already-recorded draws are not produced again.
        ``on_draw(num_recorded)`` is called after every draw (for progress bars).
        """
        s = self.settings
        while self.step < s.num_burnin_steps:
            self.sgld_step()
        while self.num_recorded < num_draws:
            d0 = self.num_recorded
            nd = min(draws_per_block, num_draws - d0)
            tr = torch.empty((nd, self.n_train), dtype=self.loss_dtype, device=self.device)
            qu = torch.empty((nd, self.n_query), dtype=self.loss_dtype, device=self.device)
            dist = torch.empty(nd, dtype=torch.float64, device=self.device)
            steps = np.empty(nd, dtype=np.int64)
            for k in range(nd):
                for _ in range(s.steps_per_draw):
                    self.sgld_step()
                evaluate_losses(self.problem, self.model, self._train_batches, self._train_sizes, tr[k])
                evaluate_losses(self.problem, self.model, self._query_batches, self._query_sizes, qu[k])
                self._check_finite(tr[k], "train", d0 + k)
                self._check_finite(qu[k], "query", d0 + k)
                dist[k] = self.distance()
                steps[k] = self.step
                self.num_recorded += 1
                if on_draw is not None:
                    on_draw(self.num_recorded)
            yield DrawBlock(chain=self.chain, draw_start=d0, train_losses=tr.cpu().numpy(),
                            query_losses=qu.cpu().numpy(), steps=steps, distance=dist.cpu().numpy(),
                            state=self.state())


@dataclass(frozen=True)
class ChainTraces:
    """All draws of all chains of one in-process run (see :func:`sample_chains`)."""

    train: np.ndarray  # (chains, draws, n_train), per-sample train losses
    query: np.ndarray  # (chains, draws, n_query), per-sample query losses
    distance: np.ndarray  # (chains, draws) float64, ||w - w*|| at each draw


def sample_chains(problem: Problem, settings: SamplerConfig, *, device: torch.device | str = "cpu",
                  loss_dtype: torch.dtype = torch.float64, kernel: str | type[Kernel] | None = None) -> ChainTraces:
    """Run all ``settings.num_chains`` chains in this process, one after the other, with no storage involved.

    The one in-process chain loop (tests, in-memory scoring, calibration sweeps); each chain
    records ``settings.num_draws`` draws in one block.
    """
    train, query, dist = [], [], []
    for c in range(settings.num_chains):
        chain = SGLDChain(problem, settings, chain=c, device=device, loss_dtype=loss_dtype, kernel=kernel)
        blocks = list(chain.run(num_draws=settings.num_draws, draws_per_block=settings.num_draws))
        train.append(np.concatenate([b.train_losses for b in blocks]))
        query.append(np.concatenate([b.query_losses for b in blocks]))
        dist.append(np.concatenate([b.distance for b in blocks]))
    return ChainTraces(train=np.stack(train), query=np.stack(query), distance=np.stack(dist))


def sample_traces(problem: Problem, settings: SamplerConfig, *, device: torch.device | str = "cpu",
                  loss_dtype: torch.dtype = torch.float64, kernel: str | type[Kernel] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(train, query)`` of :func:`sample_chains`: losses (chains, draws, n_train) and (chains, draws, n_query)."""
    traces = sample_chains(problem, settings, device=device, loss_dtype=loss_dtype, kernel=kernel)
    return traces.train, traces.query

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

Token losses (``problem.loss`` returns ``(B, T)`` or ``((B, T), mask)``, see
:mod:`bif.problem`): a draw records the loss of every *valid* token (the variables of
:meth:`bif.sampling.measure.Variables.of_tokens`, positions = true indices along T; the
masks are fixed by the first evaluation at w* and must not change); L_B is then the mean
over the minibatch's valid tokens and the default nβ the number of valid train tokens.

``sampler.params`` (name globs) restricts the sampled parameters: the others are frozen at
w* in the chain's model copy and are not part of the chain state. ``sampler.autocast: bf16``
evaluates the losses under ``torch.autocast`` bfloat16 on CUDA (a warning on CPU, ignored).
"""
from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from bif.config import SamplerConfig
from bif.errors import ChainDivergedError, ConfigError, ProblemError
from bif.problem import Problem
from bif.sampling.kernels import Kernel, get_kernel, kernel_name
from bif.sampling.measure import Variables, sequence_sums  # noqa: F401 - re-exported
from bif.warnings import BifWarning


def chain_seed(root_seed: int, chain: int) -> int:
    """Seed of chain ``chain``, derived from the root seed with numpy's SeedSequence."""
    return int(np.random.SeedSequence([root_seed, chain]).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU. A device this process cannot use is a ConfigError naming it (a
    'cuda' run on a machine without CUDA failed in the loss at w*, with a hint about the loss's batch)."""
    from bif.errors import ConfigError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"compute.device {device!r} is not a torch device ({str(err).strip()[:200]}); use 'auto', "
                          "'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else f"it sees {count} CUDA device{'s' if count != 1 else ''}")
            raise ConfigError(f"compute.device is {device!r}, but {why} (torch {torch.__version__}, on this "
                              "machine's workers); use 'auto' (CUDA when there is a GPU) or 'cpu'")
    return dev


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


class _Mismatch(Exception):
    pass


def concat_batches(a: Any, b: Any) -> Any | None:
    """One collated batch holding ``a``'s samples, then ``b``'s; None when they cannot be joined.

    Tensors are concatenated along dim 0 and must agree in trailing shape, dtype and device;
    dicts (same keys), lists and tuples (same length) are joined leaf by leaf. Any other leaf
    (a string, a number) makes the batches unjoinable.
    """
    def join(x: Any, y: Any) -> Any:
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.ndim == 0 or x.shape[1:] != y.shape[1:] or x.dtype != y.dtype or x.device != y.device:
                raise _Mismatch
            return torch.cat([x, y])
        if isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys():
            return {k: join(x[k], y[k]) for k in x}
        if isinstance(x, (list, tuple)) and type(x) is type(y) and len(x) == len(y):
            return type(x)(join(u, v) for u, v in zip(x, y))
        raise _Mismatch

    try:
        return join(a, b)
    except _Mismatch:
        return None


def _shape_of(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _loss_forms(expected: int) -> str:
    return (f"per-sample losses of shape ({expected},), per-token losses ({expected}, T), or a pair "
            f"(losses ({expected}, T), mask ({expected}, T) bool)")


def _one_column(out: Any) -> bool:
    """Whether a ``problem.loss`` result is a ``(B, 1)`` tensor (see :func:`split_loss`)."""
    return isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] == 1


def split_loss(out: Any, expected: int) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Check a ``problem.loss`` result for a batch of ``expected``: (losses, mask or None, is_tokens).

    Accepts ``(B,)`` per-sample losses, ``(B, T)`` per-token losses (mask None: all valid) or
    a pair ``(losses (B, T), mask (B, T) bool)``; anything else is a ProblemError naming it.
    A ``(B, 1)`` tensor is per-sample losses (``F.mse_loss(..., reduction="none")`` of a regression's ``(B, 1)``
    output): one token per sample would give the same figures, and made a regression a token run, which
    ``bif calibrate`` and TRAK refuse.
    """
    if isinstance(out, torch.Tensor):  # the common case first: it runs at every step and draw
        shape = out.shape
        if len(shape) in (1, 2) and shape[0] == expected:
            if len(shape) == 2 and _one_column(out):  # the length first: a (B,) loss, at every draw, skips the call
                return out[:, 0], None, False
            return out, None, len(shape) == 2
    elif isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ProblemError(f"problem.loss returned a {type(out).__name__} of {len(out)} items; it must return "
                               f"{_loss_forms(expected)}")
        losses, mask = out
        if not isinstance(losses, torch.Tensor) or losses.ndim != 2 or losses.shape[0] != expected:
            raise ProblemError(f"problem.loss returned a pair whose losses have shape {_shape_of(losses)} for a "
                               f"batch of {expected}; they must have shape ({expected}, T) with reduction='none'")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != losses.shape:
            what = f"dtype {mask.dtype}, shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else \
                type(mask).__name__
            raise ProblemError(f"problem.loss returned a mask with {what}; it must be a bool Tensor of the losses' "
                               f"shape {tuple(losses.shape)} (e.g. attention_mask[:, 1:].bool()), True where a "
                               "token's loss counts")
        return losses, mask, True
    raise ProblemError(f"problem.loss must return {_loss_forms(expected)}; got {_shape_of(out)} for a batch of "
                       f"{expected}. Use reduction='none' (e.g. F.cross_entropy(..., reduction='none'))")


def checked_loss(problem: Problem, model: torch.nn.Module, batch: Any, expected: int) -> torch.Tensor:
    """``problem.loss(model, batch)`` reduced to per-sample losses ``(expected,)``.

    Token losses become the sum of each sample's valid token losses (the sequence loss).
    """
    losses, mask, tokens = split_loss(problem.loss(model, batch), expected)
    if not tokens:
        return losses
    return (losses if mask is None else torch.where(mask, losses, torch.zeros_like(losses))).sum(dim=1)


def minibatch_loss(problem: Problem, model: torch.nn.Module, batch: Any, expected: int) -> torch.Tensor:
    """L_B: the mean per-sample loss, or for token losses the mean over the batch's valid tokens (0-d)."""
    losses, mask, tokens = split_loss(problem.loss(model, batch), expected)
    if mask is None:
        return losses.mean()
    return torch.where(mask, losses, torch.zeros_like(losses)).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def evaluate_losses(problem: Problem, model: torch.nn.Module, batches: Sequence[Any], sizes: Sequence[int],
                    out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (n,) with the per-sample losses of the collated ``batches`` (token losses: sequence sums)."""
    start = 0
    for batch, size in zip(batches, sizes, strict=True):
        out[start:start + size] = checked_loss(problem, model, batch, size).to(out.dtype)
        start += size
    return out


@dataclass(frozen=True)
class Measurement:
    """What a draw records for one split, fixed by the first evaluation at w*.

    ``tokens``: per-token losses; ``masks``: per eval batch the (B, T) bool mask of valid
    tokens on the chain's device (None: all valid, or sample losses); ``counts`` (n,) valid
    tokens per sample; ``positions`` (variables,) their indices along T.
    """

    tokens: bool
    masks: tuple[torch.Tensor | None, ...]
    counts: np.ndarray
    positions: np.ndarray

    @property
    def num_variables(self) -> int:
        return int(self.counts.sum()) if self.tokens else len(self.counts)


@torch.no_grad()
def measure(problem: Problem, model: torch.nn.Module, batches: Sequence[Any], sizes: Sequence[int],
            split: str) -> tuple[Measurement, torch.Tensor]:
    """Evaluate ``batches`` once: (the split's Measurement, its per-variable losses as a 1-D float64 tensor)."""
    masks, counts, positions, values = [], [], [], []
    split_batches = []
    for batch, size in zip(batches, sizes, strict=True):
        out = problem.loss(model, batch)
        split_batches.append((*split_loss(out, size), _one_column(out)))
    kinds = {tokens for _, _, tokens, single in split_batches if not single}
    if len(kinds) > 1:
        raise ProblemError(f"problem.loss returned per-sample losses for some {split} batches and per-token "
                           "losses for others; return one form for every batch")
    as_tokens = kinds == {True}  # a (B, 1) batch is one token per sample in a token run, else per-sample losses
    for losses, mask, tokens, single in split_batches:
        if single and as_tokens:
            losses, tokens = losses[:, None], True
        if not tokens:
            values.append(losses.to(torch.float64))
            masks.append(None)
            continue
        full = mask if mask is not None else torch.ones_like(losses, dtype=torch.bool)
        masks.append(mask)
        counts.append(full.sum(dim=1).cpu().numpy())
        positions.append(full.nonzero()[:, 1].cpu().numpy())  # row-major: sample, then position ascending
        values.append(losses[full].to(torch.float64))
    n = sum(sizes)
    m = Measurement(tokens=as_tokens, masks=tuple(masks),
                    counts=np.concatenate(counts).astype(np.int64) if as_tokens else np.ones(n, dtype=np.int64),
                    positions=np.concatenate(positions).astype(np.int64) if as_tokens else np.zeros(n, np.int64))
    return m, torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def record_losses(problem: Problem, model: torch.nn.Module, batches: Sequence[Any], sizes: Sequence[int],
                  m: Measurement, out: torch.Tensor, *, split: str) -> torch.Tensor:
    """Fill ``out`` (variables,) with the losses of every variable of ``m`` (valid tokens only for token losses)."""
    if not m.tokens:
        return evaluate_losses(problem, model, batches, sizes, out)
    start = 0
    for b, (batch, size, want) in enumerate(zip(batches, sizes, m.masks, strict=True)):
        losses, mask, _ = split_loss(problem.loss(model, batch), size)  # a (B, 1) batch comes back as (B,)
        if (mask is None) != (want is None) or (mask is not None and (mask.shape != want.shape
                                                                      or not torch.equal(mask, want))):
            raise ProblemError(f"problem.loss returned another token mask for {split} batch {b} than at w*; the "
                               "mask must depend on the data only (e.g. padding), never on the weights")
        vals = losses.reshape(-1) if mask is None else losses[mask]
        out[start:start + vals.numel()] = vals.to(out.dtype)
        start += vals.numel()
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
    #: the variables of each draw (None: one per sample); token runs: train_losses is (D, train tokens)
    variables: Variables | None = None

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
        named = select_params(self.model, settings.params)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if not self.params:
            raise ProblemError("problem.model has no parameters with requires_grad=True to sample: every parameter "
                               "is frozen. Set requires_grad=True on the parameters whose posterior the BIF "
                               "should cover (e.g. the last layer) in the problem factory")
        self.anchor = [p.detach().clone() for p in self.params]
        self.n_train = len(problem.train)
        self.n_query = len(problem.query)
        self.autocast = settings.autocast if self.device.type == "cuda" else None
        if settings.autocast is not None and self.autocast is None:
            warnings.warn(f"sampler.autocast={settings.autocast!r} applies on CUDA only; the chain runs on "
                          f"{self.device} and evaluates the losses in full precision", BifWarning, stacklevel=2)
        kernel = kernel_name(settings) if kernel is None else kernel
        kernel_cls = get_kernel(kernel) if isinstance(kernel, str) else kernel
        self.kernel: Kernel = kernel_cls(self.names, self.params, settings)
        seed = chain_seed(settings.seed, chain)
        self.gen_cpu = torch.Generator().manual_seed(seed)
        self.gen_noise = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.step = 0
        self.num_recorded = 0
        # TensorDataset: the train tensors move to the chain's device once and every minibatch is
        # gathered there (no host-to-device copy per step on CUDA); other datasets collate per step
        self._train_tensors = ([t.to(self.device) for t in problem.train.tensors]
                               if isinstance(problem.train, TensorDataset) else None)
        bs = settings.eval_batch_size
        self._train_batches = eval_batches(problem.train, bs, self.device)
        self._query_batches = eval_batches(problem.query, bs, self.device)
        self._train_sizes = [min(bs, self.n_train - s) for s in range(0, self.n_train, bs)]
        self._query_sizes = [min(bs, self.n_query - s) for s in range(0, self.n_query, bs)]
        self._measured: tuple | None = None  # set by the first evaluation at w* (:meth:`_measure`)
        #: (batch, Measurement, buffer): train and query evaluated in one forward pass (:meth:`_joint_evaluation`)
        self._joint: tuple | None = None
        self._nbeta: float | None = None

    def _measure(self) -> tuple:
        """The first evaluation fixes what a draw records (samples or valid tokens); lazy, once.

        Masks depend on the data only, so the layout does not depend on when it is taken; its
        losses serve :meth:`reference_losses` only while the chain is still at w*.
        """
        if self._measured is not None:
            return self._measured
        problem = self.problem
        with self.autocast_context():
            m_train, ref_tr = measure(problem, self.model, self._train_batches, self._train_sizes, "train")
            m_query, ref_qu = measure(problem, self.model, self._query_batches, self._query_sizes, "query")
        if m_train.tokens != m_query.tokens:
            raise ProblemError("problem.loss returned per-token losses for one split and per-sample losses for the "
                               "other; return one form for both train and query")
        if m_train.tokens:
            for split, m in (("train", m_train), ("query", m_query)):
                if m.num_variables == 0:
                    raise ProblemError(f"the {split} set has no valid token (every mask position is False); "
                                       "nothing can be sampled or attributed there")
            variables = Variables.of_tokens(train_tokens=m_train.counts, query_tokens=m_query.counts,
                                            train_positions=m_train.positions, query_positions=m_query.positions)
        else:
            variables = Variables.of_samples(n_train=self.n_train, n_query=self.n_query)
        with self.autocast_context():
            self._joint = self._joint_evaluation(m_train, m_query, ref_tr, ref_qu)
        self._measured = (m_train, m_query, variables, (ref_tr.cpu().numpy(), ref_qu.cpu().numpy()))
        return self._measured

    def _joint_evaluation(self, m_train: Measurement, m_query: Measurement, ref_tr: torch.Tensor,
                          ref_qu: torch.Tensor) -> tuple | None:
        """Train and query in one forward pass per draw, when that computes the same losses; else None.

        Small problems pay a forward pass's fixed cost (Python, kernel launches) once per split
        and draw; joined, once per draw (the tinylm example: 8.7 -> 7.6 ms per evaluation). Taken
        when each split is one evaluation batch, the two batches join (:func:`concat_batches`:
        same structure and trailing shapes; ``bif.lm`` pads both splits to one length for this),
        and at w* the joined batch gives the same variables (masks) and the same losses as the
        separate ones (rtol 1e-5: batched kernels may round differently). Checked once per
        chain, at w*, before any step.
        """
        n = self.n_train + self.n_query
        if len(self._train_batches) != 1 or len(self._query_batches) != 1 or n > self.settings.eval_batch_size:
            return None
        batch = concat_batches(self._train_batches[0], self._query_batches[0])
        if batch is None:
            return None
        try:
            m, ref = measure(self.problem, self.model, [batch], [n], "train and query")
        except ProblemError:
            return None
        if m.tokens != m_train.tokens or not np.array_equal(m.counts, np.r_[m_train.counts, m_query.counts]) \
                or not np.array_equal(m.positions, np.r_[m_train.positions, m_query.positions]):
            return None
        if not torch.allclose(ref, torch.cat([ref_tr, ref_qu]), rtol=1e-5, atol=1e-6, equal_nan=True):
            return None
        return batch, m, torch.empty(m.num_variables, dtype=self.loss_dtype, device=self.device)

    @property
    def variables(self) -> Variables:
        """What each draw records: one variable per sample, or per valid token (:mod:`bif.sampling.measure`)."""
        return self._measure()[2]

    @property
    def n_train_vars(self) -> int:
        return self.variables.num_variables("train")

    @property
    def n_query_vars(self) -> int:
        return self.variables.num_variables("query")

    @property
    def nbeta(self) -> float:
        """nβ: ``sampler.nbeta``, else the number of train variables (n_train, or the valid train tokens)."""
        if self._nbeta is None:  # fixed once the first evaluation has fixed the variables; read at every step
            s = self.settings.nbeta
            self._nbeta = float(s) if s is not None else float(self.n_train_vars)
        return self._nbeta

    def autocast_context(self):
        """``torch.autocast`` bfloat16 on CUDA when ``sampler.autocast: bf16``, else a no-op context."""
        if self.autocast == "bf16":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
        self._measure()  # at w*, before the weights move
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
        if self._train_tensors is not None:
            dev_idx = idx if self.device.type == "cpu" else idx.to(self.device, non_blocking=True)
            batch = [t.index_select(0, dev_idx) for t in self._train_tensors]  # t[idx] without its indexing path
        else:
            batch = to_device(collate_indices(self.problem.train, idx), self.device)
        with self.autocast_context():
            loss = minibatch_loss(self.problem, self.model, batch, len(idx))
        # the gradient of the sampled parameters only, returned rather than accumulated into p.grad; a parameter
        # the loss does not use gets 0 (its dynamics are then the prior's and the noise). Not materialize_grads=True:
        # its check of every gradient cost 4 us a step.
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        if any(g is None for g in grads):
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        with torch.no_grad():
            self.kernel.step(self.params, grads, anchor=self.anchor, nbeta=self.nbeta,
                             gamma=s.gamma, step_size=s.step_size, generator=self.gen_noise)
        self.step += 1

    @torch.no_grad()
    def distance(self) -> torch.Tensor:
        """||w - w*||_2 as a 0-d tensor on the chain's device."""
        norms = torch._foreach_norm(torch._foreach_sub(self.params, self.anchor))
        return torch.linalg.vector_norm(torch.stack(norms))

    def _check_finite(self, tr: torch.Tensor, qu: torch.Tensor, d0: int) -> None:
        """ChainDivergedError naming the first draw (train before query) with a non-finite loss in a block.

        One check per block, not per draw: a single device sync per block on CUDA.
        """
        if bool(torch.isfinite(tr).all()) and bool(torch.isfinite(qu).all()):
            return
        for k in range(tr.shape[0]):
            for split, row in (("train", tr[k]), ("query", qu[k])):
                if not bool(torch.isfinite(row).all()):
                    bad = int((~torch.isfinite(row)).nonzero()[0, 0])
                    sample = int(self.variables.token_samples(split)[bad])  # the sample of variable `bad`
                    raise ChainDivergedError(chain=self.chain, draw=d0 + k, split=split, sample=sample,
                                             value=float(row[bad]))

    @property
    def eval_data(self) -> tuple[list[Any], list[Any]]:
        """(train batches, query batches): every sample collated once, as the losses see them."""
        return self._train_batches, self._query_batches

    def reference_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """Train and query losses of every variable at the current weights (float64 numpy arrays).

        Per-sample losses, or for token losses the loss of every valid token in variable order
        (:attr:`variables`); sequence losses are their per-sample sums (:func:`sequence_sums`).
        """
        if self._measured is None or (self.step == 0 and self.num_recorded == 0):  # at w*: the first evaluation
            ref = self._measure()[3]
            return ref[0].copy(), ref[1].copy()
        tr = torch.empty(self.n_train_vars, dtype=torch.float64, device=self.device)
        qu = torch.empty(self.n_query_vars, dtype=torch.float64, device=self.device)
        with self.autocast_context():
            self._record(tr, qu)
        return tr.cpu().numpy(), qu.cpu().numpy()

    def _record(self, tr: torch.Tensor, qu: torch.Tensor) -> None:
        m_train, m_query = self._measure()[:2]
        if self._joint is not None:
            batch, m, out = self._joint
            record_losses(self.problem, self.model, [batch], [self.n_train + self.n_query], m, out,
                          split="train and query")
            tr.copy_(out[:tr.numel()])
            qu.copy_(out[tr.numel():])
            return
        record_losses(self.problem, self.model, self._train_batches, self._train_sizes, m_train, tr, split="train")
        record_losses(self.problem, self.model, self._query_batches, self._query_sizes, m_query, qu, split="query")

    def run(self, *, num_draws: int, draws_per_block: int,
            on_draw: Callable[[int], None] | None = None) -> Iterator[DrawBlock]:
        """Sample until ``num_draws`` draws are recorded, yielding a DrawBlock every ``draws_per_block``.

        Resumes from the loaded state: already-recorded draws are not produced again.
        ``on_draw(num_recorded)`` is called after every draw (for progress bars).
        """
        s = self.settings
        while self.step < s.num_burnin_steps:
            self.sgld_step()
        self._measure()
        while self.num_recorded < num_draws:
            d0 = self.num_recorded
            nd = min(draws_per_block, num_draws - d0)
            tr = torch.empty((nd, self.n_train_vars), dtype=self.loss_dtype, device=self.device)
            qu = torch.empty((nd, self.n_query_vars), dtype=self.loss_dtype, device=self.device)
            dist = torch.empty(nd, dtype=torch.float64, device=self.device)
            steps = np.empty(nd, dtype=np.int64)
            for k in range(nd):
                for _ in range(s.steps_per_draw):
                    self.sgld_step()
                with self.autocast_context():
                    self._record(tr[k], qu[k])
                dist[k] = self.distance()
                steps[k] = self.step
                self.num_recorded += 1
                if on_draw is not None:
                    on_draw(self.num_recorded)
            self._check_finite(tr, qu, d0)
            yield DrawBlock(chain=self.chain, draw_start=d0, train_losses=tr.cpu().numpy(),
                            query_losses=qu.cpu().numpy(), steps=steps, distance=dist.cpu().numpy(),
                            state=self.state(), variables=self.variables if self.variables.is_tokens else None)


def select_params(model: torch.nn.Module, globs: Sequence[str] | None) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) to sample: those with requires_grad, restricted to names matching ``globs`` (fnmatch).

    Unmatched parameters get ``requires_grad_(False)`` on ``model`` (the chain's own copy), so
    no gradient is computed for them and they stay at w*. ConfigError naming the globs when
    none matches.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if globs is None:
        return named
    chosen = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, g) for g in globs)]
    if not chosen and named:
        names = [n for n, _ in named]
        raise ConfigError(f"sampler.params {list(globs)} matches none of the model's {len(names)} trainable "
                          f"parameters ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); fix the globs "
                          "(fnmatch patterns over model.named_parameters(), e.g. 'lm_head.*')")
    keep = {n for n, _ in chosen}
    for n, p in named:
        if n not in keep:
            p.requires_grad_(False)
    return chosen


@dataclass(frozen=True)
class ChainTraces:
    """All draws of all chains of one in-process run (see :func:`sample_chains`)."""

    train: np.ndarray  # (chains, draws, n_train), per-sample train losses (token runs: per valid token)
    query: np.ndarray  # (chains, draws, n_query), per-sample query losses (token runs: per valid token)
    distance: np.ndarray  # (chains, draws) float64, ||w - w*|| at each draw
    variables: Variables | None = None  # token runs: the token variables of the columns

    def per_sample(self) -> tuple[np.ndarray, np.ndarray]:
        """``(train, query)`` with one column per sample: a token run's sequence losses, the sum of each sample's
        valid token losses (what ``bif.zarr`` and :func:`checked_loss` use), float64; a sample run's as they are."""
        if self.variables is None:
            return self.train, self.query
        v = self.variables
        return (sequence_sums(self.train, np.diff(v.sample_var_bounds("train"))),
                sequence_sums(self.query, np.diff(v.sample_var_bounds("query"))))


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
    return ChainTraces(train=np.stack(train), query=np.stack(query), distance=np.stack(dist),
                       variables=chain.variables if chain.variables.is_tokens else None)


def sample_traces(problem: Problem, settings: SamplerConfig, *, device: torch.device | str = "cpu",
                  loss_dtype: torch.dtype = torch.float64, kernel: str | type[Kernel] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(train, query)`` of :func:`sample_chains`: losses (chains, draws, n_train) and (chains, draws, n_query), one
    column per sample (token runs: the sequence losses, :meth:`ChainTraces.per_sample`)."""
    return sample_chains(problem, settings, device=device, loss_dtype=loss_dtype, kernel=kernel).per_sample()

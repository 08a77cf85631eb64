"""Shared pieces of the baselines: the (train, query) layout and per-sample gradients via torch.func.

Nothing here imports Prefect, Dask or fsspec. Gradients are taken with respect to all
parameters with ``requires_grad``, flattened into one vector θ (P,), on a float64 copy of
the model by default (the caller's model is never modified).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn
from torch.utils.data import Dataset

from bif.problem import Problem
from bif.sampling.chain import checked_loss, eval_batches

TRAIN_DIM = "train"
QUERY_DIM = "query"


def as_scores(tau: np.ndarray | torch.Tensor, *, name: str, attrs: dict[str, Any] | None = None) -> xr.DataArray:
    """Wrap τ (n_train, n_query) as a float64 DataArray with dims (train, query) and sample-id coords."""
    if isinstance(tau, torch.Tensor):
        tau = tau.detach().cpu().numpy()
    tau = np.asarray(tau, dtype=np.float64)
    if tau.ndim != 2:
        raise ValueError(f"scores must be (n_train, n_query), got shape {tau.shape}")
    return xr.DataArray(tau, dims=(TRAIN_DIM, QUERY_DIM),
                        coords={TRAIN_DIM: np.arange(tau.shape[0]), QUERY_DIM: np.arange(tau.shape[1])},
                        name=name, attrs={"sign": "positive = including train example raises query loss",
                                          **(attrs or {})})


def bif_scores(bif: np.ndarray, bif_corr: np.ndarray) -> xr.Dataset:
    """The BIF pair from ``bif.moments.bif_in_memory`` as a Dataset in the bif.zarr layout."""
    return xr.Dataset({"bif": as_scores(bif, name="bif"), "bif_corr": as_scores(bif_corr, name="bif_corr")})


# -- collation ---------------------------------------------------------------------------
def batches(ds: Dataset, batch_size: int, dtype: torch.dtype) -> list[Any]:
    """``ds`` collated (torch default collate) into consecutive batches on the CPU, floats cast to ``dtype``.

    The sampler's collation (:func:`bif.sampling.chain.eval_batches`), so baselines see the data as the chains do.
    """
    return eval_batches(ds, batch_size, torch.device("cpu"), dtype=dtype)


def batch_len(batch: Any) -> int:
    """Leading size of a collated batch."""
    leaves = torch.utils._pytree.tree_leaves(batch)
    return int(next(t for t in leaves if isinstance(t, torch.Tensor)).shape[0])


# -- functional model ----------------------------------------------------------------------
class _Bound:
    """Callable stand-in for the model with parameters taken from a dict (for problem.loss)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        self._model, self._params = model, params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self._model, self._params, args, kwargs)


@dataclass(frozen=True)
class FlatModel:
    """A private copy of the model and its trainable parameters as one flat vector θ (P,)."""

    model: nn.Module
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    theta: torch.Tensor  # (P,)

    @property
    def num_params(self) -> int:
        return int(self.theta.numel())

    def params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unflatten θ (P,) into the name -> tensor dict of ``functional_call``."""
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            k = int(np.prod(shape)) if len(shape) else 1
            out[name] = flat[start:start + k].view(shape)
            start += k
        return out


def flatten_model(model: nn.Module, dtype: torch.dtype = torch.float64) -> FlatModel:
    """Deep-copy ``model`` to ``dtype`` in eval mode and flatten its trainable parameters.

    A Hugging Face model's copy computes attention eagerly (``set_attn_implementation("eager")``), the same
    function: torch's fused CPU attention (SDPA) has neither forward-mode nor double-backward derivatives, which
    the influence function's Hessian-vector products take, and transformers' mask for it branches on the padding
    mask's values, which ``vmap`` cannot batch (GradDot failed there).
    """
    m = copy.deepcopy(model).to(dtype).eval()
    if callable(getattr(m, "set_attn_implementation", None)) and \
            getattr(getattr(m, "config", None), "_attn_implementation", "eager") != "eager":
        m.set_attn_implementation("eager")
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
    return FlatModel(model=m, names=tuple(n for n, _ in named), shapes=tuple(p.shape for _, p in named), theta=theta)


def sample_losses(problem: Problem, model: Any, batch: Any) -> torch.Tensor:
    """``problem.loss(model, batch)`` as one loss per sample (B,): token losses become sequence losses, the sum of
    each sample's valid token losses (:func:`bif.sampling.chain.checked_loss`), as in ``bif.zarr``."""
    return checked_loss(problem, model, batch, batch_len(batch))


def loss_of(problem: Problem, fm: FlatModel) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """``f(θ, batch) -> (B,)``: the problem's per-sample losses at flat parameters θ (:func:`sample_losses`)."""
    def f(flat: torch.Tensor, batch: Any) -> torch.Tensor:
        return sample_losses(problem, _Bound(fm.model, fm.params(flat)), batch)
    return f


def per_sample_grads(problem: Problem, fm: FlatModel, ds: Dataset, *, batch_size: int = 256) -> torch.Tensor:
    """∇_θ ℓ_i(θ*) for every sample of ``ds``: (n, P), via ``vmap(grad(...))``.

    A model whose forward pass branches on its inputs' values cannot be vmapped ("data-dependent control flow");
    its gradients are taken one sample at a time, with the same ``grad``, and the same values.
    """
    f = loss_of(problem, fm)

    def single(flat: torch.Tensor, sample: Any) -> torch.Tensor:
        one = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)
        return f(flat, one)[0]

    grad = torch.func.grad(single)
    g = torch.func.vmap(grad, in_dims=(None, 0))
    out, looped = [], False
    for b in batches(ds, batch_size, fm.theta.dtype):
        if not looped:
            try:
                out.append(g(fm.theta, b).detach())
                continue
            except RuntimeError as err:
                if "vmap" not in str(err):
                    raise
                looped = True
        out.extend(grad(fm.theta, _sample(b, i)).detach()[None] for i in range(batch_len(b)))
    return torch.cat(out)


def _sample(batch: Any, i: int) -> Any:
    """Sample ``i`` of a collated batch, as ``vmap`` hands it to the function (its tensors without the batch dim)."""
    return torch.utils._pytree.tree_map(lambda t: t[i] if isinstance(t, torch.Tensor) else t, batch)


def mean_train_loss(problem: Problem, fm: FlatModel, *, batch_size: int = 4096
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """L(θ) = (1/n) Σ_i ℓ_i(θ) over the whole train set (no regularizer), as a function of θ."""
    f = loss_of(problem, fm)
    data = batches(problem.train, batch_size, fm.theta.dtype)
    n = len(problem.train)
    return lambda flat: sum(f(flat, b).sum() for b in data) / n


def hvp_fn(objective: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor
           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V (P, k) -> H V (P, k)`` with H = ∇²objective(θ), by forward-over-reverse (jvp of grad)."""
    g = torch.func.grad(objective)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(g, (theta,), (v,))[1]

    vm = torch.func.vmap(hvp, in_dims=1, out_dims=1)
    return lambda v: vm(v).detach()

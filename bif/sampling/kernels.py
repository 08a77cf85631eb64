"""Sampler kernels: the dynamics of one SGMCMC step, and their registry.

Pure torch: imports nothing from Prefect, Dask or fsspec.

A :class:`Kernel` owns only the update of the parameters and its own state (e.g. pSGLD's
RMSProp average V). The chain (:mod:`bif.sampling.chain`) owns everything around it and
shares it between kernels: the model copy and the anchor w*, the minibatch gradient of the
mean loss, the random generators, recording the per-sample losses at draws, the finite
checks, blocks and the resume state (it stores :meth:`Kernel.state_dict` in
``ChainState.precond``).

The target is the localized, tempered posterior (Kreer et al. 2025, arXiv 2509.26544)

    p(w) ∝ exp(-nβ·L_n(w) - γ/2·‖w - w*‖²),

so every kernel gets the drift d = nβ·∇L_B(w) + γ(w - w*) of a minibatch B
(:func:`localized_drift`) and a noise generator.

Adding a kernel (e.g. SGHMC): subclass :class:`Kernel`, decorate it with
``@register_kernel("sghmc")`` and put it in ``bif/sampling/sghmc.py``: :func:`get_kernel`
imports ``bif.sampling.<name>`` on first use, so Dask workers find it too. Select it from
the config by extending :func:`kernel_name` (and ``SamplerConfig`` for its settings).
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch

from bif.config import SamplerConfig
from bif.errors import ConfigError

_KERNELS: dict[str, type["Kernel"]] = {}


class Kernel:
    """Dynamics of one chain: update the sampled parameters in place, one step at a time.

    Built once per chain with the parameter names and tensors (on the chain's device) and
    the sampler settings; :meth:`step` is called under ``torch.no_grad()``. Keep any state
    as tensors and return it from :meth:`state_dict` (CPU copies), so a resumed chain
    continues bit-identically. Draw all randomness from the ``generator`` passed to
    :meth:`step`: its state is saved with the chain.
    """

    name: ClassVar[str] = ""

    def __init__(self, names: Sequence[str], params: Sequence[torch.Tensor], settings: SamplerConfig):
        self.names = list(names)
        self.settings = settings

    def standard_normal(self, params: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        """ξ ~ N(0, I) shaped like ``params``: one draw from ``generator`` of all their elements, flattened in
        parameter order, split into views of a buffer that the next call overwrites.

        When the parameters differ in dtype or device, one draw per tensor in parameter order instead. One
        draw into a kept buffer, not one new tensor per parameter: on the digits MLP's 4 tensors an SGLD
        step's arithmetic took 18 us instead of 45 us (the draw alone 7 vs 18 us).
        """
        buf = getattr(self, "_noise_views", None)
        if buf is None:
            first = params[0]
            if all(p.dtype == first.dtype and p.device == first.device for p in params):
                flat = torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
                views = [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in params]), params)]
                buf = self._noise_views = ([flat], views)
            else:
                views = [torch.empty_like(p) for p in params]
                buf = self._noise_views = (views, views)
        for t in buf[0]:
            t.normal_(generator=generator)
        return buf[1]

    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *, anchor: Sequence[torch.Tensor],
             nbeta: float, gamma: float, step_size: float, generator: torch.Generator) -> None:
        """Update ``params`` in place, given ``grads`` = ∇L_B(w) (mean minibatch loss), same shapes."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The kernel's state as CPU tensors keyed by name, or None if it has none."""
        return None

    def load_state_dict(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); None leaves the fresh state."""


def register_kernel(name: str) -> Callable[[type[Kernel]], type[Kernel]]:
    """Class decorator: make a :class:`Kernel` subclass available as ``get_kernel(name)``."""
    def deco(cls: type[Kernel]) -> type[Kernel]:
        if not (isinstance(cls, type) and issubclass(cls, Kernel)):
            raise TypeError(f"@register_kernel({name!r}) decorates a subclass of bif.sampling.kernels.Kernel, "
                            f"got {cls!r}")
        if name in _KERNELS and _KERNELS[name] is not cls:
            raise ConfigError(f"sampler kernel {name!r} is already registered by {_KERNELS[name].__qualname__}; "
                              "choose another name")
        cls.name = name
        _KERNELS[name] = cls
        return cls
    return deco


def registered_kernels() -> tuple[str, ...]:
    """Names of the registered kernels, sorted."""
    return tuple(sorted(_KERNELS))


def get_kernel(name: str) -> type[Kernel]:
    """The kernel class registered as ``name``; imports ``bif.sampling.<name>`` first if it is not registered yet."""
    if name not in _KERNELS and name.isidentifier():
        try:
            importlib.import_module(f"bif.sampling.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"bif.sampling.{name}":  # the kernel's module exists but an import inside it failed
                raise
    if name not in _KERNELS:
        raise ConfigError(f"unknown sampler kernel {name!r}; registered kernels: {', '.join(registered_kernels())}. "
                          f"Register one with @bif.sampling.kernels.register_kernel({name!r}) in "
                          f"bif/sampling/{name}.py")
    return _KERNELS[name]


def kernel_name(settings: SamplerConfig) -> str:
    """The kernel the config selects: ``sampler.preconditioner`` none → 'sgld', rmsprop → 'psgld'."""
    return {"none": "sgld", "rmsprop": "psgld"}[settings.preconditioner]


def localized_drift(grad: torch.Tensor, param: torch.Tensor, anchor: torch.Tensor, *, nbeta: float,
                    gamma: float) -> torch.Tensor:
    """d = nβ·∇L_B(w) + γ(w - w*), a new tensor (``grad`` is not modified)."""
    return grad.mul(nbeta).add_(param - anchor, alpha=gamma)


@register_kernel("sgld")
class SGLD(Kernel):
    """Stochastic gradient Langevin dynamics (Welling & Teh 2011), localized at w*.

    With d = nβ·∇L_B(w) + γ(w - w*) and ξ ~ N(0, I) drawn from ``generator``, per tensor:

        w ← w - ε/2·d + √ε·ξ

    Stateless. RNG: ξ is :meth:`Kernel.standard_normal` (one draw of all sampled elements in parameter
    order; chains sampled before this form drew one ``torch.randn`` per tensor, so a seed's draws differ
    from theirs, with the same distribution).
    """

    def step(self, params, grads, *, anchor, nbeta, gamma, step_size, generator):
        # w - ε/2·(nβ·g + γ(w - w*)) + √ε·ξ as three in-place passes over the parameter list, no temporaries:
        # w ← w + c·(w* - w) with c = εγ/2 (lerp), then -εnβ/2·g, then √ε·ξ; batched with torch._foreach_*
        # (one kernel launch per op, not per op and tensor)
        eps = step_size
        params, grads, anchor = list(params), list(grads), list(anchor)
        noise = self.standard_normal(params, generator)
        if gamma:
            torch._foreach_lerp_(params, anchor, eps * gamma / 2)
        torch._foreach_add_(params, grads, alpha=-eps * nbeta / 2)
        torch._foreach_add_(params, noise, alpha=math.sqrt(eps))


@register_kernel("psgld")
class PSGLD(Kernel):
    """SGLD with the RMSProp preconditioner (pSGLD, Li et al. 2016; the Γ correction term is dropped, as is usual).

    With d = nβ·∇L_B(w) + γ(w - w*), ξ ~ N(0, I), α = ``rmsprop_alpha`` and
    e = ``rmsprop_eps``, per tensor (V starts at 0):

        V ← αV + (1-α)·d⊙d,   G = 1/(√V + e),   w ← w - ε/2·G⊙d + √ε·√G⊙ξ   (noise N(0, ε·G))

    State: V per parameter, keyed by parameter name. RNG: as :class:`SGLD`.
    """

    def __init__(self, names, params, settings):
        super().__init__(names, params, settings)
        self.v = [torch.zeros_like(p) for p in params]

    def step(self, params, grads, *, anchor, nbeta, gamma, step_size, generator):
        eps, alpha = step_size, self.settings.rmsprop_alpha
        for p, g, a, v, noise in zip(params, grads, anchor, self.v, self.standard_normal(params, generator),
                                     strict=True):
            drift = localized_drift(g, p, a, nbeta=nbeta, gamma=gamma)
            v.mul_(alpha).addcmul_(drift, drift, value=1 - alpha)
            precond = v.sqrt().add_(self.settings.rmsprop_eps).reciprocal_()
            p.addcmul_(precond, drift, value=-eps / 2).addcmul_(precond.sqrt_(), noise, value=math.sqrt(eps))

    def state_dict(self):
        return {n: v.cpu().clone() for n, v in zip(self.names, self.v)}

    def load_state_dict(self, state):
        if state is None:
            return
        with torch.no_grad():
            for n, v in zip(self.names, self.v):
                v.copy_(state[n].to(v.device))

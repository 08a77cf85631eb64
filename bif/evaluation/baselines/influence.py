"""Damped classical influence functions (Koh & Liang 2017, arXiv 1703.04730), in the BIF's sign.

Let the model be trained to θ* on the mean loss L(θ) = (1/n) Σ_k ℓ_k(θ) (plus a
regularizer), and H = ∇²L(θ*) + λI with damping λ ≥ 0 (λ also stands in for an L2
regularizer of strength λ, which ``problem.loss`` does not expose). Giving train example
i the weight 1 + ε in that mean, i.e. L_ε = L + (ε/n)·ℓ_i, moves the optimum by
dθ*/dε = -(1/n)·H⁻¹∇ℓ_i, and query q's loss φ_q by

    dφ_q/dε = -(1/n) · ∇φ_qᵀ H⁻¹ ∇ℓ_i.

Including i (weight 1) instead of leaving it out (weight 0) is ε: 0 → 1 from the left, so

    τ[i, q] = -(1/n) · ∇φ_q(θ*)ᵀ (∇²L(θ*) + λI)⁻¹ ∇ℓ_i(θ*),

positive when including i raises q's loss (the sign of :mod:`bif.evaluation.lds`). Leave-one-out
retraining changes φ_q by about -τ[i, q]; the tests check both against retraining.

Solvers for (H + λI)⁻¹ ∇φ_q (one right-hand side per query, so n_query solves):

- ``"explicit"``: build H with Hessian-vector products against the identity and
  eigendecompose it once (P³; for P up to a few thousand).
- ``"cg"``: conjugate gradients with HVPs (torch.func forward-over-reverse), all queries
  batched; exact for H + λI positive definite; elsewhere truncated where a query's search direction meets
  negative curvature (flagged in the attributes and warned about), and capped at ``CG_MAX_ITER`` iterations.
- ``"lissa"``: Agarwal et al. 2017's recursion x ← b + x - (H + λI)x / s, with
  H⁻¹b ≈ x_T / s; full-batch or minibatch HVPs, scale s from power iteration.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Literal

import torch
import xarray as xr

from bif.errors import ConfigError
from bif.evaluation.baselines.common import as_scores, flatten_model, hvp_fn, mean_train_loss, per_sample_grads
from bif.problem import Problem
from bif.warnings import BifWarning

Solver = Literal["explicit", "cg", "lissa"]
#: Largest model the explicit solver builds the Hessian of: 12,000 parameters make a 1.1 GiB float64 matrix, and
#: ``eigh`` needs about as much again (the digits MLP has 2,410; the tiny LM example 27,584: 5.7 GiB)
EXPLICIT_MAX_PARAMS = 12_000


def explicit_hessian(hvp, num_params: int, *, chunk_size: int = 256, dtype: torch.dtype = torch.float64
                     ) -> torch.Tensor:
    """H (P, P) assembled from HVPs against identity columns, ``chunk_size`` at a time, symmetrized."""
    eye = torch.eye(num_params, dtype=dtype)
    h = torch.cat([hvp(eye[:, s:s + chunk_size]) for s in range(0, num_params, chunk_size)], dim=1)
    return 0.5 * (h + h.T)


def solve_explicit(hessian: torch.Tensor, rhs: torch.Tensor, *, damping: float) -> torch.Tensor:
    """(H + λI)⁻¹ B for B (P, k), by a dense solve."""
    a = hessian + damping * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    return torch.linalg.solve(a, rhs)


#: Default iteration cap of :func:`solve_cg`: exact arithmetic needs at most P iterations, but a model of tens of
#: thousands of parameters would take that many full-batch HVPs (the tiny LM's 27,584 ran 12 minutes of a core
#: without finishing); columns still above the tolerance at the cap are reported, not hidden
CG_MAX_ITER = 1000


def solve_cg(hvp, rhs: torch.Tensor, *, damping: float, tol: float = 1e-10, max_iter: int | None = None,
             info: dict | None = None) -> torch.Tensor:
    """Batched conjugate gradients for (H + λI) X = B, B (P, k); each column has its own step sizes.

    A column stops when its residual norm is below ``tol``·‖b‖, or when its search direction p has
    pᵀ(H + λI)p <= 0: the system is not positive definite there, and the iterate so far (its
    solution on the positive-curvature Krylov subspace, as truncated CG keeps it) is returned rather than a step
    along negative curvature. All stop after ``max_iter`` iterations (default min(P, :data:`CG_MAX_ITER`)).
    ``info``, if given, receives ``iterations``, ``negative_curvature`` (columns stopped by it) and
    ``unconverged`` (columns still above the tolerance at the cap).
    """
    def apply(v: torch.Tensor) -> torch.Tensor:
        return hvp(v) + damping * v

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(0)  # (k,)
    stop = (tol * rhs.norm(dim=0)) ** 2
    active = rs > stop
    negative = torch.zeros_like(active)
    limit = max_iter if max_iter is not None else min(rhs.shape[0], CG_MAX_ITER)
    it = 0
    while it < limit and bool(active.any()):
        ap = apply(p)
        pap = (p * ap).sum(0)
        bent = active & (pap <= 0)  # negative (or zero) curvature along p: stop the column where it is
        negative |= bent
        active &= ~bent
        alpha = torch.where(active, rs / torch.where(pap > 0, pap, 1.0), 0.0)
        x += alpha * p
        r -= alpha * ap
        rs_new = (r * r).sum(0)
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
        p = r + beta * p
        rs = torch.where(active, rs_new, rs)
        active &= rs > stop
        it += 1
    if info is not None:
        info.update(iterations=it, negative_curvature=int(negative.sum()), unconverged=int(active.sum()))
    return x


def top_eigenvalue(hvp, num_params: int, *, iters: int = 50, seed: int = 0, dtype: torch.dtype = torch.float64
                   ) -> float:
    """Largest-magnitude eigenvalue of H by power iteration."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(num_params, 1, generator=gen, dtype=dtype)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        hv = hvp(v)
        lam = float((v * hv).sum())
        v = hv / hv.norm().clamp_min(1e-30)
    return abs(lam)


def solve_lissa(hvp, rhs: torch.Tensor, *, damping: float, scale: float, depth: int = 1000) -> torch.Tensor:
    """LiSSA: x₀ = b, x_{t+1} = b + x_t - (H + λI)x_t / s, return x_T / s ≈ (H + λI)⁻¹ b.

    Converges when 0 < eig(H + λI) < 2s; the error shrinks like (1 - λ_min/s)^T.
    ``hvp`` may be stochastic (minibatch HVPs): then the result is one LiSSA estimate.
    """
    x = rhs.clone()
    for _ in range(depth):
        x = rhs + x - (hvp(x) + damping * x) / scale
    return x / scale


def _minibatch_hvp(problem: Problem, fm, *, batch_size: int, seed: int):
    """An HVP over a fresh random minibatch of the train set on every call (for LiSSA)."""
    from torch.utils.data import Subset

    n = len(problem.train)
    gen = torch.Generator().manual_seed(seed)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        idx = torch.randperm(n, generator=gen)[:batch_size].tolist()
        sub = Problem(model=problem.model, train=Subset(problem.train, idx), query=problem.query, loss=problem.loss)
        return hvp_fn(mean_train_loss(sub, fm), fm.theta)(v)

    return hvp


def influence_scores(problem: Problem, *, damping: float = 1e-3, solver: Solver = "explicit",
                     grad_batch_size: int = 256, cg_tol: float = 1e-10, cg_max_iter: int | None = None,
                     lissa_depth: int = 1000, lissa_scale: float | None = None, lissa_batch_size: int | None = None,
                     lissa_repeats: int = 1, seed: int = 0, dtype: torch.dtype = torch.float64, warn: bool = True
                     ) -> xr.DataArray:
    """Damped influence τ (n_train, n_query) = -(1/n)·∇φ_qᵀ(H + λI)⁻¹∇ℓ_i at the problem's checkpoint.

    See the module docstring for the derivation and sign. ``damping`` is λ; ``solver``
    picks explicit / CG / LiSSA. LiSSA uses full-batch HVPs unless ``lissa_batch_size``
    is set, and averages ``lissa_repeats`` estimates. Returns a DataArray named
    ``"influence"`` with dims (train, query).

    An explicit solve of an indefinite H + λI, or CG that meets negative curvature or its iteration cap
    (:func:`solve_cg`), puts a message in the attribute ``warning`` and, with ``warn``, also raises it as a
    :class:`~bif.warnings.BifWarning`.
    """
    if damping < 0 or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    fm = flatten_model(problem.model, dtype)
    if solver == "explicit" and fm.num_params > EXPLICIT_MAX_PARAMS:
        gib = fm.num_params ** 2 * torch.finfo(dtype).bits / 8 / 2**30
        raise ConfigError(f"the explicit influence solver would build a {fm.num_params:,} x {fm.num_params:,} Hessian "
                         f"({gib:.1f} GiB, and its eigendecomposition); the model has more than "
                         f"{EXPLICIT_MAX_PARAMS:,} parameters: leave influence out of --methods (influence_cg and "
                         "influence_lissa build no matrix, but take many Hessian-vector products per query)")
    n = len(problem.train)
    g_train = per_sample_grads(problem, fm, problem.train, batch_size=grad_batch_size)  # (n, P)
    hvp = hvp_fn(mean_train_loss(problem, fm), fm.theta)
    attrs = {"method": "influence", "solver": solver, "damping": float(damping)}
    if solver == "explicit":  # factor once: H = V diag(d) Vᵀ, so a new query set costs two GEMMs
        evals, evecs = torch.linalg.eigh(explicit_hessian(hvp, fm.num_params, dtype=dtype))
        attrs["min_eigenvalue"] = float(evals[0])
        if float(evals[0]) + damping <= 0:
            attrs["indefinite"] = True  # H + λI is not positive definite: raise the damping
            attrs["warning"] = (f"influence: H + λI is not positive definite (smallest eigenvalue of H "
                                f"{float(evals[0]):.3g}, λ = {damping:g}); the solve divides by its negative and "
                                f"near-zero eigenvalues: raise the damping above {-float(evals[0]):.3g}")
    elif solver == "lissa":
        scale = lissa_scale or 1.1 * (top_eigenvalue(hvp, fm.num_params, seed=seed, dtype=dtype) + damping)
        attrs["lissa_scale"] = float(scale)
    elif solver != "cg":
        raise ValueError(f"solver must be 'explicit', 'cg' or 'lissa', got {solver!r}")
    t0 = time.perf_counter()  # everything below depends on the query set
    g_query = per_sample_grads(problem, fm, problem.query, batch_size=grad_batch_size)  # (Q, P)
    rhs = g_query.T.contiguous()  # (P, Q)
    if solver == "explicit":
        x = evecs @ ((evecs.T @ rhs) / (evals + damping)[:, None])
    elif solver == "cg":
        info: dict = {}
        x = solve_cg(hvp, rhs, damping=damping, tol=cg_tol, max_iter=cg_max_iter, info=info)
        attrs.update({f"cg_{key}": value for key, value in info.items()})
        if info["negative_curvature"]:
            attrs["indefinite"] = True  # H + λI is not positive definite along some query's Krylov space
        if info["negative_curvature"] or info["unconverged"]:
            attrs["warning"] = (f"influence_cg: {info['negative_curvature']} of {rhs.shape[1]} queries met negative "
                                f"curvature (H + λI is not positive definite: raise the damping, now {damping:g}) and "
                                f"{info['unconverged']} did not converge in {info['iterations']} iterations; their "
                                "scores are truncated-CG approximations")
    else:
        runs = []
        for r in range(lissa_repeats):
            h = hvp if lissa_batch_size is None else _minibatch_hvp(problem, fm, batch_size=lissa_batch_size,
                                                                    seed=seed + r)
            runs.append(solve_lissa(h, rhs, damping=damping, scale=scale, depth=lissa_depth))
        x = torch.stack(runs).mean(0)
    tau = -(g_train @ x) / n  # (n, Q)
    attrs["query_seconds"] = time.perf_counter() - t0
    if warn and "warning" in attrs:
        warnings.warn(attrs["warning"], BifWarning, stacklevel=2)
    return as_scores(tau, name="influence", attrs=attrs)

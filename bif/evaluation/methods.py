"""The registry of attribution methods scored by the LDS benchmark (``bif lds --methods``).

Light at import (no torch, no baseline imports): each method registers its name, a one-line
description and a ``compute(problem, inputs)`` function that imports its implementation
lazily and returns named score arrays τ (n_train, n_query). :func:`bif.evaluation.scoring.score_method`
dispatches through :func:`get_method`; :class:`bif.evaluation.settings.LDSSettings` and the
CLI take the valid names from :func:`method_names`. A new method is one :func:`register_method`
call (here or in its own module, imported by this one) plus its implementation under
:mod:`bif.evaluation.baselines` (see docs/architecture.md).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bif.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from bif.config import CovarianceConfig, SamplerConfig
    from bif.evaluation.settings import MethodOptions
    from bif.problem import Problem


@dataclass(frozen=True)
class MethodInputs:
    """What a method may read besides the problem: the run's sampler / covariance sections and the baselines' options."""

    sampler: "SamplerConfig"
    covariance: "CovarianceConfig"
    options: "MethodOptions"


@dataclass(frozen=True)
class MethodOutput:
    """Named score arrays τ (n_train, n_query) float64 of one method, τ > 0: including i raises q's loss."""

    scores: Mapping[str, "np.ndarray"] = field(default_factory=dict)
    query_seconds: float | None = None  # wall time of the query-dependent part; None: the whole method
    warnings: tuple[str, ...] = ()  # what the user should know about these scores (bif lds prints them)


Compute = Callable[["Problem", MethodInputs], MethodOutput]


@dataclass(frozen=True)
class AttributionMethod:
    """One registered method: its name (``--methods``), what it is, and how to compute it."""

    name: str
    description: str
    compute: Compute
    outputs: tuple[str, ...] = ()  # names of the score arrays (default: (name,))


_METHODS: dict[str, AttributionMethod] = {}


def register_method(name: str, *, description: str, outputs: tuple[str, ...] = ()) -> Callable[[Compute], Compute]:
    """Decorator: register ``compute(problem, inputs) -> MethodOutput`` as the attribution method ``name``."""
    def deco(fn: Compute) -> Compute:
        if name in _METHODS and _METHODS[name].compute is not fn:
            raise ValueError(f"attribution method {name!r} is already registered")
        _METHODS[name] = AttributionMethod(name, description, fn, outputs or (name,))
        return fn
    return deco


def method_names() -> tuple[str, ...]:
    """Names of all registered methods, in registration order."""
    return tuple(_METHODS)


def get_method(name: str) -> AttributionMethod:
    """The registered method ``name``; :class:`bif.errors.ConfigError` naming the valid ones otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown attribution method {name!r}; choose from {', '.join(_METHODS)} "
                          "(bif.evaluation.methods)") from None


def methods_help() -> str:
    """One line per method, for ``bif lds --help``."""
    return "; ".join(f"{m.name}: {m.description}" for m in _METHODS.values())


def _from_array(da: Any, name: str) -> MethodOutput:
    """A baseline's DataArray (its ``query_seconds`` and ``warning`` attributes, if any) as a MethodOutput."""
    qs = da.attrs.get("query_seconds")
    warning = da.attrs.get("warning")
    return MethodOutput({name: da.values}, None if qs is None else float(qs), (warning,) if warning else ())


# --- the built-in methods -----------------------------------------------------------------------------
@register_method("bif", outputs=("bif", "bif_corr"),
                 description="local Bayesian influence function -Cov (and -Corr as bif_corr) over SGLD draws")
def _bif(problem: "Problem", inputs: MethodInputs) -> MethodOutput:
    import numpy as np

    from bif.evaluation.baselines.common import as_scores
    from bif.evaluation.scoring import bif_arrays

    b, bc = bif_arrays(problem, inputs.sampler, pooling=inputs.covariance.pooling)
    # the whole sampling run is query-dependent: query_seconds = seconds
    return MethodOutput({"bif": as_scores(b, name="bif").values,
                         "bif_corr": np.nan_to_num(bc, nan=0.0)})  # NaN: a constant loss trace


def _influence(solver: str) -> Compute:
    def compute(problem: "Problem", inputs: MethodInputs) -> MethodOutput:
        from bif.evaluation.baselines.influence import influence_scores

        o = inputs.options
        return _from_array(influence_scores(problem, damping=o.damping, solver=solver, lissa_depth=o.lissa_depth,
                                            warn=False), _SOLVER_METHOD[solver])
    return compute


_SOLVER_METHOD = {"explicit": "influence", "cg": "influence_cg", "lissa": "influence_lissa"}
register_method("influence", description="classical influence function, explicit damped Hessian")(
    _influence("explicit"))
register_method("influence_cg", description="classical influence function, conjugate-gradient solve")(_influence("cg"))
register_method("influence_lissa", description="classical influence function, LiSSA recursion")(_influence("lissa"))


@register_method("graddot", description="TracIn at the final checkpoint: gradient dot product")
def _graddot(problem: "Problem", inputs: MethodInputs) -> MethodOutput:
    from bif.evaluation.baselines.graddot import graddot_scores

    return _from_array(graddot_scores(problem), "graddot")


@register_method("gradcos", description="TracIn at the final checkpoint: gradient cosine")
def _gradcos(problem: "Problem", inputs: MethodInputs) -> MethodOutput:
    from bif.evaluation.baselines.graddot import gradcos_scores

    return _from_array(gradcos_scores(problem), "gradcos")


@register_method("ekfac", description="EK-FAC influence (kronfluence; pip install .[baselines])")
def _ekfac(problem: "Problem", inputs: MethodInputs) -> MethodOutput:
    from bif.evaluation.baselines.ekfac import ekfac_scores

    return _from_array(ekfac_scores(problem, damping=inputs.options.ekfac_damping), "ekfac")


@register_method("trak", description="TRAK (traker; pip install .[baselines])")
def _trak(problem: "Problem", inputs: MethodInputs) -> MethodOutput:
    from bif.evaluation.baselines.trak import trak_scores

    o = inputs.options
    return _from_array(trak_scores(problem, proj_dim=o.trak_proj_dim, lambda_reg=o.trak_lambda_reg,
                                   num_models=o.trak_num_models), "trak")

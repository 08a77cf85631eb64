"""The registry of quality gates: name, default severity, suite and a one-line description of each.

Light on purpose (imports neither Great Expectations nor pandas), so that
:class:`bif.config.QualityConfig` can take the allowed keys of ``quality.severity`` from it
and ``bif keys`` can list them. A gate is registered once, with :func:`register_gate`; the
suites in :mod:`bif.quality.gates` refuse a check whose gate is not registered, so a new gate
is one ``register_gate`` call plus its checks (see docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]
SEVERITIES: tuple[str, ...] = ("error", "warning")


@dataclass(frozen=True)
class Gate:
    """One registered gate: the key of ``quality.severity`` and what it checks."""

    name: str  # e.g. "trace_finite"
    suite: str  # "traces", "health" or "results": the quality/<suite>.json file its results go to
    description: str  # one line
    severity: str = "error"  # default severity: 'error' fails the run, 'warning' is only reported


_GATES: dict[str, Gate] = {}


def register_gate(name: str, *, suite: str, description: str, severity: str = "error") -> Gate:
    """Register a gate (idempotent for an identical entry); returns it."""
    if severity not in SEVERITIES:
        raise ValueError(f"gate {name!r}: default severity must be 'error' or 'warning', got {severity!r}")
    gate = Gate(name, suite, description, severity)
    if name in _GATES and _GATES[name] != gate:
        raise ValueError(f"gate {name!r} is already registered differently: {_GATES[name]}")
    _GATES[name] = gate
    return gate


def gate_names() -> tuple[str, ...]:
    """Names of all registered gates, in registration order."""
    return tuple(_GATES)


def get_gate(name: str) -> Gate:
    """The registered gate ``name``; KeyError naming the valid gates otherwise."""
    try:
        return _GATES[name]
    except KeyError:
        raise KeyError(f"unknown quality gate {name!r}; registered gates: {', '.join(_GATES)}") from None


def default_severity() -> dict[str, str]:
    """{gate: severity} of the gates whose default severity is not 'error'."""
    return {g.name: g.severity for g in _GATES.values() if g.severity != "error"}


def unknown_gates(names: object) -> list[str]:
    """The names in ``names`` that are not registered gates (in their order)."""
    return [n for n in names if n not in _GATES]  # type: ignore[attr-defined]


# --- the built-in gates (their checks: bif.quality.gates) -----------------------------------------------
register_gate("trace_schema", suite="traces", description="columns and dtypes of a trace block match bif.schema.trace_schema")
register_gate("trace_nulls", suite="traces", description="no nulls in chain / draw / split / sample")
register_gate("trace_finite", suite="traces", description="no null, NaN or +-Inf loss")
register_gate("trace_unique", suite="traces", description="one row per (chain, draw, split, sample)")
register_gate("trace_complete", suite="traces",
              description="every (draw, split, sample) of a block present, and num_draws committed draws per chain")
register_gate("trace_bounds", suite="traces", description="losses within the problem's loss_bounds")
register_gate("health_schema", suite="health", description="the health table's columns are present and keyed")
register_gate("health_draws", suite="health", description="num_draws unique draws per chain, every chain present")
register_gate("health_loss", suite="health",
              description="no runaway chain: mean train loss <= max_loss_factor x ref + loss_slack")
register_gate("health_distance", suite="health", description="every draw's ||w - w*|| within the distance bound")
register_gate("results_shape", suite="results",
              description="bif / bif_corr have dims (train, query), the right sizes and sample-id coords")
register_gate("results_finite", suite="results", description="bif and bif_corr finite everywhere")
register_gate("results_corr_range", suite="results", description="bif_corr within [-1, 1] (up to corr_atol)")
register_gate("results_self_influence", suite="results",
              description="self-influence bif[i, i] = -Var(l_i) <= 0 when the query set is the train set")
register_gate("traces_constant", suite="results", severity="warning",
              description="share of constant loss traces per split at most max_constant_share")

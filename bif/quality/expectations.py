"""Run Great Expectations 1.x suites on pandas frames and turn GE's results into :class:`GateResult`.

Ephemeral, code-only use: one ``gx.get_context(mode="ephemeral")`` per process, with its
progress bars off; it writes no ``gx/`` folder and opens no sockets. GE has no Dask data
source, so callers validate one Parquet block at a time, or a small frame of aggregates
that Dask computed. GE costs about 4 s to import and is imported only when a suite runs.

A :class:`Check` names the gate it belongs to, the GE expectation (class name and
keyword arguments, so building checks imports nothing) and the key columns that name an
offending row (chain, draw, sample). Result format ``SUMMARY`` gives the index labels of
the first unexpected rows cheaply; we look those rows up ourselves, because GE's
``unexpected_index_column_names`` takes seconds when many rows fail.
"""
from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from bif.quality.registry import SEVERITIES  # the one list of severities

_GX_SEVERITY = {"error": "critical", "warning": "warning"}
#: Rows named in a failure's detail.
MAX_DETAIL_ROWS = 5
_LOCK = threading.Lock()  # the GE context is not documented as thread-safe
#: GE's result format of a suite's first validation. A suite with a failed expectation is validated again in
#: SUMMARY, whose rows name the offenders (:func:`validate`).
FIRST_FORMAT = "BOOLEAN_ONLY"


@dataclass(frozen=True)
class GateResult:
    """Outcome of one expectation of one gate on one frame (a trace block, the health table, ...)."""

    gate: str  # e.g. "trace_finite"; the config's quality.severity keys
    expectation: str  # GE expectation type, e.g. "expect_column_values_to_not_be_null"
    success: bool
    severity: str  # "error" (fails the run) or "warning" (reported only)
    unexpected_count: int  # offending rows (or 1 for a failed table-level expectation)
    detail: str  # where: names the offending chain / draw / split / sample; "" when passed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Explain = Callable[[pd.DataFrame, dict[str, Any]], str]


@dataclass(frozen=True)
class Check:
    """One expectation of a gate: ``Check("trace_bounds", "ExpectColumnValuesToBeBetween", {"column": "loss", ...})``."""

    gate: str
    expectation: str  # class name in great_expectations.expectations
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    keys: tuple[str, ...] = ()  # columns that name an offending row in the detail
    explain: Explain | None = None  # custom detail for a failure: explain(frame, ge_result_dict)
    context: str = ""  # prefix of the detail, e.g. "chain 2 block 3"
    where: tuple[str, Any] | None = None  # (column, value): validate only the rows where column == value


@functools.lru_cache(maxsize=1)
def _batch_definition():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    asset = ctx.data_sources.add_pandas("bif").add_dataframe_asset("frame")
    return asset.add_batch_definition_whole_dataframe("whole")


def warm() -> None:
    """Import great_expectations and build its ephemeral context now (~5 s of one core), not at the first gate."""
    _batch_definition()


def resolve_severity(gate: str, severity: Mapping[str, str] | None, *, allow_warnings: bool = False) -> str:
    """The severity of ``gate``: 'warning' under allow_warnings, else the mapping's entry, else 'error'."""
    if allow_warnings:
        return "warning"
    sev = (severity or {}).get(gate, "error")
    if sev not in SEVERITIES:
        raise ValueError(f"severity of gate {gate!r} must be 'error' or 'warning', got {sev!r}")
    return sev


def validate(frame: pd.DataFrame, checks: Sequence[Check], *, suite: str, severity: Mapping[str, str] | None = None,
             allow_warnings: bool = False, markdown: bool | None = True) -> tuple[list[GateResult], dict[str, Any]]:
    """Validate ``frame`` against ``checks`` as one GE suite named ``suite``.

    Returns the GateResults (in the order of ``checks``) and GE's own validation result
    as JSON-able data (``ExpectationSuiteValidationResult.to_json_dict()``: in result format
    :data:`FIRST_FORMAT` when every expectation passed, else SUMMARY; the frame's row count is
    ``meta["rows_validated"]``), plus, under the key ``"markdown"``, GE's human-readable
    rendering (None when not rendered).
    ``markdown``: True renders always, None only when the suite failed (rendering costs
    about 0.07 s a suite), False never.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    sevs = [resolve_severity(c.gate, severity, allow_warnings=allow_warnings) for c in checks]
    expectations = [
        getattr(gxe, c.expectation)(**dict(c.kwargs), meta={"gate": c.gate, "check": i}, severity=_GX_SEVERITY[s],
                                    **({"row_condition": Column(c.where[0]) == c.where[1]} if c.where else {}))
        for i, (c, s) in enumerate(zip(checks, sevs))
    ]
    with _LOCK:
        batch = _batch_definition().get_batch(batch_parameters={"dataframe": frame})
        gx_suite = gx.ExpectationSuite(name=suite, expectations=expectations)
        # BOOLEAN_ONLY first: success alone. A passed expectation's BASIC result adds zero counts (and the
        # element count, which meta's rows_validated gives per suite), whose metrics cost about a quarter of GE's
        # time (37 -> 27 ms for the 7 expectations of the health table; 0.62 -> 0.57 s for `run_gates` at 50k x 500
        # x 200 draws); SUMMARY (2 empty lists more) cost another 30% before. A suite with a failure is validated
        # again in SUMMARY, whose labels name the rows; success is the same in every format.
        res = batch.validate(gx_suite, result_format={"result_format": FIRST_FORMAT,
                                                      "partial_unexpected_count": MAX_DETAIL_ROWS})
        if not all(r.success for r in res.results):
            res = batch.validate(gx_suite, result_format={"result_format": "SUMMARY",
                                                          "partial_unexpected_count": MAX_DETAIL_ROWS})
    by_index: dict[int, Any] = {int(r.expectation_config.meta["check"]): r for r in res.results}
    out = [_gate_result(c, by_index[i], frame, s) for i, (c, s) in enumerate(zip(checks, sevs))]
    raw = res.to_json_dict()
    raw.setdefault("meta", {})["rows_validated"] = len(frame)  # a suite that passed over no rows shows it here
    raw["markdown"] = _markdown(res) if markdown or (markdown is None and not res.success) else None
    return out, raw


def _markdown(res: Any) -> str | None:
    """GE's Markdown rendering of a validation result (offline; its HTML Data Docs load CSS/JS from CDNs)."""
    try:
        from great_expectations.render.renderer import ValidationResultsPageRenderer
        from great_expectations.render.view import DefaultMarkdownPageView

        return DefaultMarkdownPageView().render(ValidationResultsPageRenderer().render(res))
    except Exception:  # rendering is a convenience; a renderer bug must not fail the gates
        return None


def _exception_message(info: Any) -> str | None:
    if isinstance(info, Mapping):
        if info.get("raised_exception") and info.get("exception_message"):
            return str(info["exception_message"])
        for v in info.values():
            msg = _exception_message(v)
            if msg:
                return msg
    return None


def _scalar(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.6g}")
    return v


def describe_rows(frame: pd.DataFrame, labels: Sequence[Any], keys: Sequence[str], value: str | None = None) -> str:
    """'chain=0 draw=5 split=train sample=3 loss=nan; ...' for the rows with index ``labels``."""
    cols = [k for k in keys if k in frame.columns] + ([value] if value and value in frame.columns and value not in keys
                                                      else [])
    if not cols or not len(labels):
        return ""
    rows = frame.loc[list(labels)[:MAX_DETAIL_ROWS], cols]
    return "; ".join(" ".join(f"{c}={_scalar(v)}" for c, v in zip(cols, rec)) for rec in rows.itertuples(index=False))


def _gate_result(check: Check, r: Any, frame: pd.DataFrame, severity: str) -> GateResult:
    result = dict(r.result or {})
    etype = r.expectation_config.type
    err = _exception_message(r.exception_info)
    count = int(result.get("unexpected_count") or 0) + int(result.get("missing_count") or 0) * (
        "distinct_values" in etype)
    if r.success:
        return GateResult(check.gate, etype, True, severity, 0, "")
    count = max(count, 1)
    if err:
        detail = f"could not evaluate: {err[:300]}"
    elif check.explain is not None:
        detail = check.explain(frame, result)
    else:
        detail = _default_detail(check, result, frame)
    if check.context:
        detail = f"{check.context}: {detail}"
    return GateResult(check.gate, etype, False, severity, count, detail)


def _default_detail(check: Check, result: dict[str, Any], frame: pd.DataFrame) -> str:
    column = check.kwargs.get("column")
    if result.get("partial_missing_list") or ("partial_unexpected_list" in result and "element_count" not in result):
        missing = [_scalar(v) for v in result.get("partial_missing_list") or []]
        extra = [_scalar(v) for v in result.get("partial_unexpected_list") or []]
        parts = ([f"missing {column} values {missing}"] if missing else []) + (
            [f"unexpected {column} values {extra}"] if extra else [])
        return ", ".join(parts) or f"{column}: observed {result.get('observed_value')}"
    labels = result.get("partial_unexpected_index_list")
    if labels and not isinstance(labels[0], Mapping):
        total = result.get("element_count")
        rows = describe_rows(frame, labels, check.keys or tuple(frame.columns), column)
        return f"{result.get('unexpected_count')} of {total} rows, e.g. {rows}"
    if "observed_value" in result:
        expected = {k: v for k, v in check.kwargs.items() if k not in ("column", "meta")}
        return f"observed {result['observed_value']!r}, expected {expected}"
    return f"failed ({', '.join(f'{k}={v}' for k, v in result.items())[:300]})"

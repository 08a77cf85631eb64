"""The quality gates as Great Expectations suites over one frame each (no Prefect, GE imported lazily).

Gates (the keys of ``config.quality.severity``; each is registered, with its default severity
and a one-line description, in :mod:`bif.quality.registry`, and a check of an unregistered
gate is refused):

- ``trace_schema`` columns and dtypes of a trace block match :func:`bif.schema.trace_schema`.
- ``trace_nulls`` no nulls in chain / draw / split / sample.
- ``trace_finite`` no null, NaN or ±Inf loss.
- ``trace_unique`` one row per (chain, draw, split, sample).
- ``trace_complete`` every (draw, split, sample) of the block is present and nothing else;
  each chain has ``sampler.num_draws`` committed draws.
- ``trace_bounds`` losses within the problem's ``loss_bounds``.
- ``health_schema`` / ``health_draws`` health columns present; num_draws unique draws per chain.
- ``health_loss`` per chain: mean train loss <= max_loss_factor x ref + loss_slack (no runaway).
- ``health_distance`` every draw: ||w - w*|| <= max_distance (localization held).
- ``results_shape`` bif / bif_corr have dims (train, query), the right sizes and sample-id coords.
- ``results_finite`` / ``results_corr_range`` / ``results_self_influence`` on per-chunk
  aggregates computed by Dask (non-finite count, min, max), never on n_train x n_query
  rows in pandas; the self-influence diagonal -Var(l_i) <= 0. ``bif_corr`` must be finite
  everywhere: a constant loss trace gives 0 there (see :mod:`bif.tasks.covariance`), not NaN.
- ``traces_constant`` (default severity ``warning``): per split, the share of samples whose
  loss trace is constant over all draws (``bif.zarr``'s ``train_constant`` /
  ``query_constant``) is at most ``quality.max_constant_share``. Constant traces are a
  legitimate state (e.g. float32 cross-entropy 0.0 of confidently classified samples), but
  such samples carry no attribution, so a large share deserves a look.

Every ``check_*`` takes the config sections whole (``quality``, and ``sampler`` where the
draws matter) plus the run's :class:`RunSizes`; ``allow_warnings`` (default
``quality.allow_warnings``) turns every failure into a warning.

Traces are checked either row by row (:func:`check_trace_block`, GE on the rows of a
block) or, cheaply at any scale, on per-block aggregates (:func:`check_trace_stats` over
:func:`bif.quality.aggregates.trace_block_stats`): both name the gate and the offending
chain / draw / split / sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bif import schema as S
from bif.quality.aggregates import chunk_stats_tasks
from bif.quality.expectations import Check, GateResult, validate
from bif.quality.registry import default_severity, gate_names, get_gate
from bif.quality.rules import runaway_bound
from bif.sampling.measure import Variables

if TYPE_CHECKING:
    import xarray as xr

    from bif.config import QualityConfig, SamplerConfig

#: Names of the registered gates (:mod:`bif.quality.registry`).
GATES = gate_names()
#: Severity of gates not listed in ``quality.severity`` (all others: 'error'), from the registry.
DEFAULT_SEVERITY = default_severity()
TRACE_KEYS = (S.CHAIN, S.DRAW, S.SPLIT, S.SAMPLE)
_FMAX = float(np.finfo(np.float64).max)


@dataclass(frozen=True)
class RunSizes:
    """What the gates check a run against, besides its config: the problem's sizes and loss bounds."""

    n_train: int
    n_query: int
    loss_bounds: tuple[float, float] = (-np.inf, np.inf)  # (low, high); infinite ends are not checked
    query_is_train: bool = False  # the query set is the train set (enables results_self_influence)


def _validator(quality: "QualityConfig", allow_warnings: bool | None, raws: list[dict[str, Any]] | None,
               markdown: bool | None = None):
    """validate() bound to the severity settings; GE's JSON results are appended to ``raws`` when given.

    GE's Markdown is rendered for failed suites only (``markdown=None``): rendering costs about as
    much as validating, and a passed suite's JSON result says all there is.
    """
    merged = default_severity() | dict(quality.severity)
    allow = quality.allow_warnings if allow_warnings is None else allow_warnings

    def run(frame: pd.DataFrame, checks: list[Check], suite: str) -> list[GateResult]:
        for c in checks:
            get_gate(c.gate)  # KeyError naming the registered gates: register a new gate first
        res, raw = validate(frame, checks, suite=suite, severity=merged, allow_warnings=allow,
                            markdown=markdown)
        if raws is not None:
            raws.append(raw)
        return res
    return run


# --- traces -------------------------------------------------------------------------------
def _missing_rows(nd: int, d0: int, variables: Variables):
    """Explain a wrong row count: which (split, sample) lack which draws."""
    def explain(frame: pd.DataFrame, result: dict[str, Any]) -> str:
        got = result.get("observed_value")
        want = variables.num_rows(nd)
        counts = frame.groupby([S.SPLIT, S.SAMPLE], observed=True)[S.DRAW].size()
        msgs = []
        for split in variables.splits:
            n = variables.num_samples(split)
            present = counts.xs(split, level=0) if split in counts.index.get_level_values(0) else counts.iloc[:0]
            absent = np.setdiff1d(np.arange(n), present.index.to_numpy())
            msgs += [f"{split} sample {int(i)} has no rows" for i in absent[:3]]
            for i, c in present[present != nd].head(3).items():
                draws = frame.loc[(frame[S.SPLIT] == split) & (frame[S.SAMPLE] == i), S.DRAW].to_numpy()
                miss = np.setdiff1d(np.arange(d0, d0 + nd), draws)
                what = f"missing draws {miss[:5].tolist()}" if len(miss) else "duplicated draws"
                msgs.append(f"{split} sample {int(i)} has {int(c)} of {nd} draws ({what})")
        return f"{got} rows, expected {want} = {nd} draws x {variables.num_variables()} samples; " + "; ".join(msgs[:5])
    return explain


def block_draws(sampler: "SamplerConfig", block: int) -> tuple[int, int]:
    """(first draw, number of draws) of trace block ``block`` under ``sampler``'s num_draws / draws_per_block."""
    d0 = block * sampler.draws_per_block
    return d0, max(0, min(sampler.draws_per_block, sampler.num_draws - d0))


def check_trace_block(df: pd.DataFrame, quality: "QualityConfig", sampler: "SamplerConfig", *, sizes: RunSizes,
                      chain: int, block: int, draws: tuple[int, int] | None = None,
                      allow_warnings: bool | None = None, ge_results: list[dict[str, Any]] | None = None
                      ) -> list[GateResult]:
    """Validate one trace block frame (long format of :mod:`bif.schema`, as read by ``pq.read_table().to_pandas()``).

    The expected draws are those of ``block`` under ``sampler`` (:func:`block_draws`); a frame
    that holds several consecutive blocks of one chain passes ``draws`` = (first draw,
    number of draws) instead, and ``block`` then only labels details. The loss dtype is
    ``sampler.trace_dtype``.

    Gates trace_schema, trace_nulls, trace_finite, trace_unique, trace_complete and
    trace_bounds (``sizes.loss_bounds``; infinite ends are not checked). GE's JSON results
    are appended to ``ge_results`` when given (as for every ``check_*``).
    """
    draw_start, num_draws_expected_in_block = draws if draws is not None else block_draws(sampler, block)
    n_train, n_query, loss_bounds, loss_dtype = sizes.n_train, sizes.n_query, sizes.loss_bounds, sampler.trace_dtype
    ctx = f"chain {chain} block {block if block is not None else '?'} (draws {draw_start}.." \
          f"{draw_start + num_draws_expected_in_block - 1})"
    run = _validator(quality, allow_warnings, ge_results, markdown=None)  # GE's Markdown of failed blocks only
    suite = f"traces chain={chain} draw_start={draw_start}"
    cols = [S.CHAIN, S.DRAW, S.SPLIT, S.SAMPLE, S.LOSS]
    types = {S.CHAIN: "int32", S.DRAW: "int32", S.SPLIT: "CategoricalDtypeType", S.SAMPLE: "int64", S.LOSS: loss_dtype}
    schema = [Check("trace_schema", "ExpectTableColumnsToMatchOrderedList", {"column_list": cols}, context=ctx)]
    schema += [Check("trace_schema", "ExpectColumnValuesToBeOfType", {"column": k, "type_": t}, context=ctx)
               for k, t in types.items()]
    res = run(df.iloc[:1], schema, suite + " schema")  # dtypes survive slicing: one row is enough
    if not res[0].success:  # nothing else can be evaluated on the wrong columns
        return res[:1]
    try:  # GE vectorizes range checks only for int64 / float64 columns (else a Python loop per row)
        df = df.astype({k: "float64" if k == S.LOSS or df[k].isna().any() else "int64"
                        for k in (S.CHAIN, S.DRAW, S.SAMPLE, S.LOSS)})
    except (TypeError, ValueError):
        return res
    nd, d0 = num_draws_expected_in_block, draw_start
    n_by_split = {k: v for k, v in ((S.TRAIN, n_train), (S.QUERY, n_query)) if v > 0}
    variables = Variables.of_samples(n_train=n_train, n_query=n_query)  # row offsets: bif.sampling.measure
    low, high = loss_bounds

    def c(gate: str, name: str, **kwargs: Any) -> Check:
        return Check(gate, name, kwargs, keys=TRACE_KEYS, context=ctx)

    checks = [c("trace_nulls", "ExpectColumnValuesToNotBeNull", column=k) for k in TRACE_KEYS]
    checks += [
        c("trace_finite", "ExpectColumnValuesToNotBeNull", column=S.LOSS),  # NaN reads as null in pandas
        c("trace_finite", "ExpectColumnValuesToBeBetween", column=S.LOSS, min_value=-_FMAX, max_value=_FMAX),
        c("trace_unique", "ExpectCompoundColumnsToBeUnique", column_list=list(TRACE_KEYS)),
        Check("trace_complete", "ExpectTableRowCountToEqual", {"value": variables.num_rows(nd)},
              explain=_missing_rows(nd, d0, variables), context=ctx),
        c("trace_complete", "ExpectColumnValuesToBeInSet", column=S.CHAIN, value_set=[chain]),
        c("trace_complete", "ExpectColumnDistinctValuesToEqualSet", column=S.DRAW, value_set=list(range(d0, d0 + nd))),
        c("trace_complete", "ExpectColumnValuesToBeBetween", column=S.DRAW, min_value=d0, max_value=d0 + nd - 1),
        c("trace_complete", "ExpectColumnDistinctValuesToEqualSet", column=S.SPLIT, value_set=list(n_by_split)),
    ]
    checks += [Check("trace_complete", "ExpectColumnValuesToBeBetween", {"column": S.SAMPLE, "min_value": 0,
                     "max_value": n - 1}, keys=TRACE_KEYS, context=ctx, where=(S.SPLIT, split))
               for split, n in n_by_split.items()]
    if np.isfinite(low) or np.isfinite(high):
        checks.append(c("trace_bounds", "ExpectColumnValuesToBeBetween", column=S.LOSS,
                        min_value=float(low) if np.isfinite(low) else None,
                        max_value=float(high) if np.isfinite(high) else None))
    return res + run(df, checks, suite)


def check_trace_stats(stats: pd.DataFrame, quality: "QualityConfig", *, allow_warnings: bool | None = None,
                      ge_results: list[dict[str, Any]] | None = None) -> list[GateResult]:
    """The trace gates on per-block aggregates: one row per trace file from :func:`bif.quality.aggregates.trace_block_stats`.

    Cheap at any scale (the rows were counted in numpy); each failure names the chain,
    block and the first offending (draw, split, sample).
    """
    run = _validator(quality, allow_warnings, ge_results)
    block_keys = (S.CHAIN, "block")
    res = run(stats, [Check("trace_schema", "ExpectColumnValuesToBeInSet", {"column": "schema_ok", "value_set": [True]},
                            keys=block_keys, context="columns / dtypes differ from bif.schema.trace_schema")],
              "trace blocks schema")
    if not res[0].success or stats.empty:
        return res

    def zero(gate: str, count: str, first: str | None, what: str) -> Check:
        return Check(gate, "ExpectColumnValuesToBeBetween", {"column": count, "min_value": 0, "max_value": 0},
                     keys=block_keys + ((first,) if first else ()) + (count,), context=what)

    return res + run(stats, [
        zero("trace_nulls", "n_null_keys", None, "null chain / draw / split / sample"),
        zero("trace_finite", "n_nonfinite", "first_nonfinite", "NaN or infinite loss"),
        zero("trace_unique", "n_duplicate", "first_duplicate", "duplicated (chain, draw, split, sample)"),
        zero("trace_complete", "n_missing", "first_missing", "missing (draw, split, sample) rows"),
        zero("trace_complete", "n_out_of_range", "first_out_of_range", "draw or sample outside the block"),
        zero("trace_complete", "n_wrong_chain", "first_wrong_chain", "rows of another chain"),
        zero("trace_bounds", "n_out_of_bounds", "first_out_of_bounds", "loss outside problem.loss_bounds"),
    ], "trace blocks")


def check_trace_chains(blocks: pd.DataFrame, quality: "QualityConfig", sampler: "SamplerConfig", *,
                       allow_warnings: bool | None = None, ge_results: list[dict[str, Any]] | None = None
                       ) -> list[GateResult]:
    """Each of ``sampler.num_chains`` chains has ``sampler.num_draws`` committed draws.

    ``blocks`` has one row per committed block (chain, block, num_draws).
    """
    num_chains, num_draws = sampler.num_chains, sampler.num_draws
    per_chain = (blocks.groupby(S.CHAIN, as_index=False).agg(committed_draws=("num_draws", "sum"),
                                                             num_blocks=("block", "size"))
                 if len(blocks) else pd.DataFrame({S.CHAIN: pd.Series([], "int64"), "committed_draws": [],
                                                   "num_blocks": []}))
    checks = [
        Check("trace_complete", "ExpectColumnDistinctValuesToEqualSet", {"column": S.CHAIN,
              "value_set": list(range(num_chains))}, context="chains with committed trace blocks"),
        Check("trace_complete", "ExpectColumnValuesToBeBetween", {"column": "committed_draws", "min_value": num_draws,
              "max_value": num_draws}, keys=(S.CHAIN, "num_blocks"), context=f"expected {num_draws} draws per chain"),
    ]
    return _validator(quality, allow_warnings, ge_results)(per_chain, checks, "trace chains")


# --- sampler health ---------------------------------------------------------------------------
def check_health(df_health: pd.DataFrame, quality: "QualityConfig", sampler: "SamplerConfig", *,
                 allow_warnings: bool | None = None, ge_results: list[dict[str, Any]] | None = None
                 ) -> list[GateResult]:
    """Validate the per-draw health table (columns :data:`bif.schema.HEALTH_COLUMNS`, all chains and blocks).

    Runaway (health_loss, :func:`bif.quality.rules.runaway`): per chain, mean over draws of
    train_loss_mean <= quality.max_loss_factor x ref_train_loss_mean + quality.loss_slack.
    Localization (health_distance): every draw's distance <= quality.max_distance, or
    quality.max_distance_factor x the median distance. health_draws: sampler.num_draws
    draws for each of sampler.num_chains chains.
    """
    num_draws, num_chains = sampler.num_draws, sampler.num_chains
    max_loss_factor, loss_slack = quality.max_loss_factor, quality.loss_slack
    max_distance, max_distance_factor = quality.max_distance, quality.max_distance_factor
    run = _validator(quality, allow_warnings, ge_results)
    res = run(df_health, [Check("health_schema", "ExpectTableColumnsToMatchSet",
                                {"column_set": list(S.HEALTH_COLUMNS), "exact_match": False})], "health columns")
    if not res[0].success:
        return res
    keys = (S.CHAIN, S.DRAW)
    raw_checks = [Check("health_schema", "ExpectColumnValuesToNotBeNull", {"column": k}, keys=keys)
                  for k in (S.CHAIN, S.DRAW, S.REF_TRAIN_LOSS_MEAN)]
    raw_checks += [
        Check("health_loss", "ExpectColumnValuesToNotBeNull", {"column": S.TRAIN_LOSS_MEAN}, keys=keys),
        Check("health_draws", "ExpectCompoundColumnsToBeUnique", {"column_list": [S.CHAIN, S.DRAW]}, keys=keys),
        Check("health_distance", "ExpectColumnValuesToNotBeNull", {"column": S.DISTANCE}, keys=keys),
    ]
    dist = df_health[S.DISTANCE].to_numpy(dtype=np.float64)
    bound = max_distance if max_distance is not None else (
        max_distance_factor * float(np.nanmedian(dist)) if np.isfinite(dist).any() else _FMAX)
    how = "max_distance" if max_distance is not None else f"{max_distance_factor} x median distance"
    raw_checks.append(Check("health_distance", "ExpectColumnValuesToBeBetween",
                            {"column": S.DISTANCE, "min_value": 0.0, "max_value": bound}, keys=keys,
                            context=f"||w - w*|| above {bound:.4g} ({how})"))
    res += run(df_health, raw_checks, "health draws")

    g = df_health.groupby(S.CHAIN)
    per_chain = pd.DataFrame({
        "num_draws": g[S.DRAW].nunique(),
        "mean_train_loss": g[S.TRAIN_LOSS_MEAN].mean(),
        "ref_train_loss": g[S.REF_TRAIN_LOSS_MEAN].mean(),
        "worst_draw": g[S.TRAIN_LOSS_MEAN].idxmax().map(lambda i: int(df_health.loc[i, S.DRAW]) if i == i else -1),
        "worst_draw_loss": g[S.TRAIN_LOSS_MEAN].max(),
    }).reset_index()
    per_chain["loss_bound"] = runaway_bound(per_chain["ref_train_loss"], max_loss_factor=max_loss_factor,
                                            loss_slack=loss_slack)
    chain_checks = [
        Check("health_draws", "ExpectColumnValuesToBeBetween", {"column": "num_draws", "min_value": num_draws,
              "max_value": num_draws}, keys=(S.CHAIN,), context=f"expected {num_draws} draws per chain"),
        Check("health_loss", "ExpectColumnPairValuesAToBeGreaterThanB",
              {"column_A": "loss_bound", "column_B": "mean_train_loss", "or_equal": True},
              keys=(S.CHAIN, "mean_train_loss", "loss_bound", "ref_train_loss", "worst_draw", "worst_draw_loss"),
              context=f"chain ran away: mean train loss > {max_loss_factor} x ref + {loss_slack}"),
    ]
    chain_checks.append(Check("health_draws", "ExpectColumnDistinctValuesToEqualSet",
                                  {"column": S.CHAIN, "value_set": list(range(num_chains))}))
    return res + run(per_chain, chain_checks, "health chains")


# --- results --------------------------------------------------------------------------------------
def _ids(ds: "xr.Dataset", dim: str, n: int) -> np.ndarray:
    return np.asarray(ds[dim].values) if dim in ds.coords else np.arange(n)


def constant_trace_counts(ds: "xr.Dataset") -> dict[str, dict[str, float | int]] | None:
    """Number, total and share of constant-trace samples per split from bif.zarr's flags; None if absent."""
    from bif.tasks.covariance import constant_counts

    flags = {dim: np.asarray(ds[S.constant_var(dim)].values, dtype=bool)
             for dim in (S.TRAIN_DIM, S.QUERY_DIM) if S.constant_var(dim) in ds.data_vars}
    if len(flags) < 2:
        return None
    return constant_counts(flags[S.TRAIN_DIM], flags[S.QUERY_DIM])


@dataclass(frozen=True)
class ResultsAggregates:
    """What the result gates validate, read from bif.zarr (:func:`results_aggregates`): the shape table (one row
    per variable and dim), the per-chunk aggregates of each well-shaped variable, the self-influence diagonal
    (or None) and the constant-trace counts per split (or None without flags)."""

    shape: pd.DataFrame
    stats: dict[str, list[dict[str, Any]]]
    diagonal: np.ndarray | None
    constant_counts: dict[str, dict[str, float | int]] | None


def results_aggregates(ds: "xr.Dataset", sizes: RunSizes) -> ResultsAggregates:
    """Read what :func:`validate_results` checks from ``ds`` (bif.zarr): sizes and coords of ``bif`` /
    ``bif_corr``, and their per-chunk aggregates computed by Dask (one pass over each stored chunk). No GE: the
    gates run this beside their GE work on the traces (:func:`bif.quality.run.run_gates`)."""
    import dask
    import dask.array as da

    n_train, n_query, query_is_train = sizes.n_train, sizes.n_query, sizes.query_is_train
    expected = {S.TRAIN_DIM: n_train, S.QUERY_DIM: n_query}
    rows = []
    for var in (S.BIF, S.BIF_CORR):
        present = var in ds.data_vars and ds[var].dims == (S.TRAIN_DIM, S.QUERY_DIM)
        for dim, n in expected.items():
            size = int(ds[var].sizes.get(dim, -1)) if var in ds.data_vars else -1
            coords_ok = present and size == n and (dim not in ds.coords
                                                   or np.array_equal(_ids(ds, dim, n), np.arange(n)))
            rows.append({"var": var, "dim": dim, "present": bool(present), "size": size, "expected_size": n,
                         "coords_ok": bool(coords_ok)})
    shape = pd.DataFrame(rows)
    ok = {v for v in (S.BIF, S.BIF_CORR) if shape.loc[shape["var"] == v, "coords_ok"].all()}
    data = {v: ds[v].data for v in ok}  # Dask arrays, or numpy for a bif.zarr read in this process (open_bif)
    tasks = {v: chunk_stats_tasks(a) for v, a in data.items()}
    diag = None
    if query_is_train and S.BIF in ok and n_train == n_query:
        diag = da.diagonal(da.asarray(data[S.BIF]))
    # in memory already: scanned in this process; through a cluster its one or few chunks would cost more in
    # round trips than the scan
    lazy = any(isinstance(a, da.Array) for a in data.values())
    stats, diag_values = dask.compute(tasks, diag, **({} if lazy else {"scheduler": "sync"}))
    return ResultsAggregates(shape=shape, stats=stats,
                             diagonal=None if diag_values is None else np.asarray(diag_values, dtype=np.float64),
                             constant_counts=constant_trace_counts(ds))


def check_results(ds: "xr.Dataset", quality: "QualityConfig", *, sizes: RunSizes, allow_warnings: bool | None = None,
                  ge_results: list[dict[str, Any]] | None = None) -> list[GateResult]:
    """Validate ``bif`` / ``bif_corr`` (dims (train, query)) through per-chunk aggregates computed by Dask.

    Memory and pandas work scale with the number of chunks, not with n_train x n_query.
    Tolerances from ``quality`` (corr_atol, self_influence_rtol); ``traces_constant`` checks
    the share of constant-trace samples per split against ``quality.max_constant_share``
    (skipped when bif.zarr has no constant flags). :func:`results_aggregates` then
    :func:`validate_results`.
    """
    return validate_results(results_aggregates(ds, sizes), quality, sizes=sizes, allow_warnings=allow_warnings,
                            ge_results=ge_results)


def validate_results(agg: ResultsAggregates, quality: "QualityConfig", *, sizes: RunSizes,
                     allow_warnings: bool | None = None, ge_results: list[dict[str, Any]] | None = None
                     ) -> list[GateResult]:
    """The result gates (GE) on what :func:`results_aggregates` read; see :func:`check_results`."""
    corr_atol, self_influence_rtol = quality.corr_atol, quality.self_influence_rtol
    max_constant_share = quality.max_constant_share
    run = _validator(quality, allow_warnings, ge_results)
    keys = ("var", "dim", "size", "expected_size")
    res = run(agg.shape, [
        Check("results_shape", "ExpectColumnValuesToBeInSet", {"column": "present", "value_set": [True]}, keys=keys,
              context=f"expected variables with dims ({S.TRAIN_DIM}, {S.QUERY_DIM})"),
        Check("results_shape", "ExpectColumnPairValuesToBeEqual", {"column_A": "size", "column_B": "expected_size"},
              keys=keys),
        Check("results_shape", "ExpectColumnValuesToBeInSet", {"column": "coords_ok", "value_set": [True]}, keys=keys,
              context="coordinates must be the sample ids 0..n-1"),
    ], "results shape")
    stats = agg.stats
    if S.BIF in stats:
        frame = pd.DataFrame(stats[S.BIF])
        res += run(frame, [Check("results_finite", "ExpectColumnValuesToBeBetween",
                                 {"column": "n_nonfinite", "min_value": 0, "max_value": 0},
                                 keys=("bad_train", "bad_query", "bad_value"), context="non-finite bif")], "results bif")
    if S.BIF_CORR in stats:
        frame = pd.DataFrame(stats[S.BIF_CORR])
        res += run(frame, [
            Check("results_corr_range", "ExpectColumnValuesToBeBetween", {"column": "n_nonfinite", "min_value": 0,
                  "max_value": 0}, keys=("bad_train", "bad_query", "bad_value"),
                  context="non-finite bif_corr (constant traces give 0, so this is a NaN/Inf in the traces or "
                          "the reduction)"),
            Check("results_corr_range", "ExpectColumnValuesToBeBetween", {"column": "min", "min_value": -1 - corr_atol},
                  keys=("min_train", "min_query", "min"), context="bif_corr below -1"),
            Check("results_corr_range", "ExpectColumnValuesToBeBetween", {"column": "max", "max_value": 1 + corr_atol},
                  keys=("max_train", "max_query", "max"), context="bif_corr above 1"),
        ], "results bif_corr")
    if agg.diagonal is not None:
        d = agg.diagonal
        tol = self_influence_rtol * float(np.nanmax(np.abs(d))) if np.isfinite(d).any() else 0.0
        frame = pd.DataFrame({S.SAMPLE: np.arange(sizes.n_train), "self_influence": d})
        res += run(frame, [Check("results_self_influence", "ExpectColumnValuesToBeBetween",
                                 {"column": "self_influence", "max_value": tol}, keys=(S.SAMPLE,),
                                 context="self-influence bif[i, i] = -Var(l_i) must be <= 0")], "results self-influence")
    counts = agg.constant_counts
    if counts is not None:
        frame = pd.DataFrame([{S.SPLIT: split, "num_constant": c["count"], "num_samples": c["total"],
                               "share_constant": c["share"]} for split, c in counts.items()])
        res += run(frame, [Check("traces_constant", "ExpectColumnValuesToBeBetween",
                                 {"column": "share_constant", "min_value": 0.0, "max_value": max_constant_share},
                                 keys=(S.SPLIT, "num_constant", "num_samples", "share_constant"),
                                 context=f"share of constant loss traces above quality.max_constant_share="
                                         f"{max_constant_share:g} (their bif and bif_corr are 0: they carry no "
                                         "attribution; a very confident checkpoint or a too small nbeta?)")],
                   "results constant traces")
    return res

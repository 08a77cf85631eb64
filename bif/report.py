"""A run's report: ``<output>/report.html``, one self-contained file with embedded PNGs.

Sections (each says what is missing instead of failing when its input file is absent):
run summary (manifest.json, config.json), quality gates (quality/summary.json), loss
traces per chain and distance to w* (health/), R-hat and ESS histograms
(diagnostics.parquet), the BIF heatmap with the number and share of constant loss traces
(bif.zarr), and the most influential train
examples of a few queries (topk.parquet, drawn with ``problem.render`` when given: images
for 2-D arrays, snippets for strings). Token runs get one more section, the interactive
token view (:mod:`bif.report_tokens`); sequence-level runs render without it.
:func:`markdown_summary` and :func:`topk_markdown` give the same key tables as Markdown for
Prefect artifacts.
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from bif import schema as S
from bif.store.run import RunStore

#: The section of the R-hat / ESS histograms: it reads only the diagnostics' output, so a flow draws it as soon
#: as they finish.
DIAGNOSTICS_SECTION = S.REPORT_DIAGNOSTICS_SECTION
SECTIONS = ("Run summary", "Quality gates", "Loss traces and distance to w*", DIAGNOSTICS_SECTION, "BIF heatmap",
            "Most influential training examples")
_MAX_HEATMAP = (300, 120)  # (train rows, query columns) drawn at most
_CSS = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "img{max-width:100%}.fail{color:#b00020;font-weight:bold}.ok{color:#1b7f3b;font-weight:bold}"
        ".warn{color:#b26a00;font-weight:bold}.missing{color:#777;font-style:italic}code{font-size:90%}")


# --- small HTML / PNG helpers --------------------------------------------------------------
def _png(fig: Any, alt: str) -> str:
    """An <img> with the figure as an embedded base64 PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


#: Room around and between the report's axes, in inches (a figure's size varies, so fractions would not do):
#: tick labels of up to about 8 characters plus an axis label on the left and between panels, a title on top.
_MARGINS = {"left": 0.8, "right": 0.25, "bottom": 0.55, "top": 0.35, "hgap": 0.7}


def _figure(nrows: int, ncols: int, *, figsize: tuple[float, float], squeeze: bool = True, gap: float = 0.75):
    """(figure, axes) drawn by matplotlib's Agg renderer without pyplot: no global state, no GUI backend.

    Fixed margins (:data:`_MARGINS`, ``gap``: inches between panels, a colorbar's labels included) instead of
    matplotlib's constrained layout, which measured every tick label of every axis twice per figure: 40% of
    the three figures' drawing time (580 -> 354 ms for the digits run's traces, diagnostics and heatmap).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    axes = fig.subplots(nrows, ncols, squeeze=squeeze)
    w, h = figsize
    m = _MARGINS
    left, right, bottom, top = m["left"] / w, 1 - m["right"] / w, m["bottom"] / h, 1 - m["top"] / h
    if left < right and bottom < top:  # a figure too small for the margins keeps matplotlib's defaults
        axis_w = ((right - left) * w - (ncols - 1) * gap) / ncols
        axis_h = ((top - bottom) * h - (nrows - 1) * m["hgap"]) / nrows
        fig.subplots_adjust(left=left, right=right, bottom=bottom, top=top,
                            wspace=gap / axis_w if axis_w > 0 else None,
                            hspace=m["hgap"] / axis_h if axis_h > 0 else None)
    return fig, axes


def warm() -> None:
    """Draw and encode one tiny figure: loads matplotlib, its Agg backend, fonts and PNG writer (~1.5 s) ahead of a report."""
    fig, ax = _figure(1, 1, figsize=(3, 2))
    ax.plot([0, 1], [0, 1], label="x")
    ax.set_title("warm")
    ax.legend()
    _png(fig, "warm")


def _missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}</p>'


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, float_format=lambda v: f"{v:.4g}", escape=True)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)


# --- sections -------------------------------------------------------------------------------
def _summary(run: RunStore, problem: Any, status: str | None = None) -> str:
    manifest, config = run.read_json(S.MANIFEST_FILE), run.read_json(S.CONFIG_FILE)
    if manifest is None and config is None:
        return _missing(f"{S.MANIFEST_FILE} and {S.CONFIG_FILE} are missing: not a bif run directory?")
    cfg = (config or {}).get("config", config or {})
    status = status or (manifest or {}).get("status")
    rows = [("output", run.uri), ("status", status or "unknown (no manifest)"),
            ("config hash", (config or {}).get("config_hash", (manifest or {}).get("config_hash", "")))]
    rows += [("problem", cfg.get("problem", "")), ("problem_args", cfg.get("problem_args", ""))]
    rows += [(f"sampler.{k}", v) for k, v in (cfg.get("sampler") or {}).items()
             if k in ("num_chains", "num_draws", "step_size", "gamma", "nbeta", "batch_size", "preconditioner")]
    body = _table(pd.DataFrame([(k, str(v)) for k, v in rows], columns=["field", "value"]))
    if status and status != S.STATUS_COMPLETE:
        body = f'<p class="fail">This run is not complete (status {html.escape(str(status))}).</p>' + body
    return body


def _quality(run: RunStore, problem: Any) -> str:
    summary = run.read_json(S.QUALITY_DIR, S.QUALITY_SUMMARY_FILE)
    if summary is None:
        return _missing(f"The quality gates were not run ({S.QUALITY_DIR}/{S.QUALITY_SUMMARY_FILE} is missing).")
    failed, warnings = summary.get("failed", []), summary.get("warnings", [])
    cls, word = ("ok", "passed") if summary.get("passed") else ("fail", "FAILED")
    out = (f'<p class="{cls}">Quality gates {word}: {len(failed)} failed, {len(warnings)} warnings, '
           f'{summary.get("num_expectations", "?")} expectations checked in {summary.get("elapsed_s", "?")} s.</p>')
    rows = [dict(r, outcome="failed") for r in failed] + [dict(r, outcome="warning") for r in warnings]
    if rows:
        out += _table(pd.DataFrame(rows)[["outcome", "gate", "expectation", "unexpected_count", "detail"]])
    return out + "<p>GE's results: <code>quality/*.json</code>, readable form <code>quality/*.md</code>.</p>"


def _traces(run: RunStore, problem: Any) -> str:
    health = run.read_health()
    if health is None:
        return _missing(f"No sampler health files ({S.HEALTH_DIR}/) found.")
    fig, axes = _figure(1, 3, figsize=(15, 3.8))
    for chain, g in health.groupby(S.CHAIN):
        axes[0].plot(g[S.DRAW], g[S.TRAIN_LOSS_MEAN], lw=1, label=f"chain {chain}")
        axes[1].plot(g[S.DRAW], g[S.QUERY_LOSS_MEAN], lw=1, label=f"chain {chain}")
        axes[2].plot(g[S.DRAW], g[S.DISTANCE], lw=1, label=f"chain {chain}")
    ref = health[S.REF_TRAIN_LOSS_MEAN].mean()
    axes[0].axhline(ref, color="k", ls="--", lw=1, label="at w*")
    for ax, title in zip(axes, ("mean train loss", "mean query loss", "distance ||w - w*||")):
        ax.set_title(title)
        ax.set_xlabel("draw")
    axes[0].legend(fontsize=8)
    out = _png(fig, "loss traces per chain and distance to w*")
    per_chain = health.groupby(S.CHAIN).agg(draws=(S.DRAW, "nunique"), mean_train_loss=(S.TRAIN_LOSS_MEAN, "mean"),
                                            ref_train_loss=(S.REF_TRAIN_LOSS_MEAN, "mean"),
                                            max_distance=(S.DISTANCE, "max")).reset_index()
    return out + _table(per_chain)


def _rhat_threshold(run: RunStore) -> float:
    """The run's ``quality.rhat_threshold``: from config.json, else the manifest's diagnostics, else the default."""
    from bif.config import RHAT_THRESHOLD

    config = run.read_json(S.CONFIG_FILE) or {}
    quality = (config.get("config", config) or {}).get("quality") or {}
    if quality.get("rhat_threshold") is not None:
        return float(quality["rhat_threshold"])
    diag = (run.read_json(S.MANIFEST_FILE) or {}).get("diagnostics") or {}
    return float(diag.get("rhat_threshold") or RHAT_THRESHOLD)


def _diagnostics(run: RunStore, problem: Any) -> str:
    diag = run.read_table(S.DIAGNOSTICS_FILE)
    if diag is None:
        return _missing(f"No MCMC diagnostics ({S.DIAGNOSTICS_FILE} is missing).")
    fig, axes = _figure(1, 3, figsize=(15, 3.6))
    for ax, col in zip(axes, (S.RHAT, S.ESS_BULK, S.ESS_TAIL)):
        for split, g in diag.groupby(S.SPLIT, observed=True):
            v = g[col].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if v.size:
                ax.hist(v, bins=40, alpha=0.6, label=str(split), histtype="stepfilled")
        ax.set_title(col)
        if ax.get_legend_handles_labels()[0]:  # nothing drawn when every value is undefined (one chain)
            ax.legend(fontsize=8)
    threshold = _rhat_threshold(run)
    axes[0].axvline(threshold, color="r", ls="--", lw=1)
    out = _png(fig, "R-hat and ESS histograms")
    rhat = diag[S.RHAT].to_numpy(dtype=float)
    const = diag[S.CONSTANT].to_numpy(dtype=bool) if S.CONSTANT in diag else np.zeros(len(diag), dtype=bool)
    n_bad = int(np.sum(rhat > threshold))
    cls = "ok" if n_bad == 0 else "warn"
    out += (f'<p class="{cls}">{n_bad} of {len(diag)} samples have rank R-hat &gt; {threshold:g} '
            f"({int(np.sum(~np.isfinite(rhat) & ~const))} undefined, {int(const.sum())} constant traces "
            "without R-hat / ESS).</p>")
    worst = diag.sort_values(S.RHAT, ascending=False).head(5)
    return out + "<p>Worst-mixing samples:</p>" + _table(worst)


def _heatmap(run: RunStore, problem: Any) -> str:
    ds = run.open_bif()
    if ds is None or S.BIF not in ds:
        return _missing(f"No results ({S.BIF_ZARR} is missing).")
    n_train, n_query = ds.sizes[S.TRAIN_DIM], ds.sizes[S.QUERY_DIM]
    rows = np.unique(np.linspace(0, n_train - 1, min(n_train, _MAX_HEATMAP[0])).astype(int))
    cols = np.unique(np.linspace(0, n_query - 1, min(n_query, _MAX_HEATMAP[1])).astype(int))
    names = [v for v in (S.BIF, S.BIF_CORR) if v in ds]
    fig, axes = _figure(1, len(names), figsize=(7 * len(names), 5), squeeze=False, gap=1.3)  # gap: colorbar labels
    for ax, name in zip(axes[0], names):
        a = np.asarray(ds[name].isel({S.TRAIN_DIM: rows, S.QUERY_DIM: cols}).values, dtype=float)
        finite = a[np.isfinite(a)]
        vmax = float(np.quantile(np.abs(finite), 0.99)) if finite.size else 1.0
        im = ax.imshow(a, aspect="auto", cmap="RdBu_r", vmin=-vmax or -1, vmax=vmax or 1, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel(f"query ({len(cols)} of {n_query})")
        ax.set_ylabel(f"train ({len(rows)} of {n_train})")
        fig.colorbar(im, ax=ax)
    note = "" if (len(rows), len(cols)) == (n_train, n_query) else \
        f"<p>Evenly spaced rows / columns shown: {len(rows)} of {n_train} train, {len(cols)} of {n_query} query.</p>"
    return _png(fig, "BIF heatmap") + note + _constant_note(ds)


def constant_counts(ds: Any) -> dict[str, tuple[int, int]] | None:
    """{split: (constant-trace samples, samples)} from bif.zarr's flags; None for a store without them."""
    names = {S.TRAIN: S.TRAIN_CONSTANT, S.QUERY: S.QUERY_CONSTANT}
    if ds is None or not all(v in ds for v in names.values()):
        return None
    return {split: (int(np.asarray(ds[v].values, dtype=bool).sum()), int(ds[v].size)) for split, v in names.items()}


def _constant_note(ds: Any) -> str:
    counts = constant_counts(ds)
    if counts is None:
        return ""
    parts = [f"{split} {c} of {n} ({100 * c / n if n else 0:.1f}%)" for split, (c, n) in counts.items()]
    cls = "warn" if any(c for c, _ in counts.values()) else "ok"
    return (f'<p class="{cls}" id="constant-traces">Constant loss traces: {", ".join(parts)}. Their bif and '
            f"bif_corr are 0 (flags <code>{S.TRAIN_CONSTANT}</code> / <code>{S.QUERY_CONSTANT}</code> in "
            f"<code>{S.BIF_ZARR}</code>).</p>")


def _labels(problem: Any, split: str, i: int) -> str:
    labels = getattr(problem, "extras", {}).get("labels") if problem is not None else None
    try:
        return f" (label {int(labels[split][i])})" if labels is not None else ""
    except (KeyError, IndexError, TypeError, ValueError):
        return ""


def _pick_queries(topk: pd.DataFrame, num_queries: int) -> list[int]:
    """The queries whose strongest influence (|bif| of the top rank) is largest."""
    best = topk.assign(abs_bif=topk[S.BIF].abs()).groupby(S.QUERY)["abs_bif"].max()
    return [int(q) for q in best.sort_values(ascending=False).index[:num_queries]]


def _image_tag(image: Any, alt: str, *, size: int = 72) -> str:
    """A small embedded PNG of a 2-D (grey) or (H, W, 3|4) image, upscaled by pixel repetition."""
    from matplotlib.image import imsave

    a = np.asarray(image, dtype=float)
    scale = max(1, size // max(a.shape[:2]))
    a = np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)
    buf = io.BytesIO()
    if a.ndim == 2:
        imsave(buf, a, cmap="gray_r", format="png")
    else:
        imsave(buf, np.clip(a / (a.max() if a.max() > 1 else 1), 0, 1), format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _is_image(x: Any) -> bool:
    return np.ndim(x) == 2 or (np.ndim(x) == 3 and np.shape(x)[-1] in (3, 4))


def _render_query(topk: pd.DataFrame, q: int, render: Callable[[str, int], Any] | None, problem: Any, k: int) -> str:
    """The query and its top-k positive / negative train examples: images, text snippets, or ids only."""
    def show(split: str, i: int) -> str:
        if render is None:
            return ""
        try:
            x = render(split, i)
        except Exception as err:  # a broken renderer must not break the report
            return _missing(f"render failed: {type(err).__name__}")
        if _is_image(x):
            return _image_tag(x, f"{split} {i}")
        return f"<code>{html.escape(str(x)[:200])}</code>"

    out = [f"<h3>query {q}{html.escape(_labels(problem, S.QUERY, q))}</h3>{show(S.QUERY, q)}", "<table>"]
    for d in ("positive", "negative"):
        rows = topk[(topk[S.QUERY] == q) & (topk[S.DIRECTION] == d)].sort_values(S.RANK).head(k)
        cells = []
        for row in rows.itertuples(index=False):
            i = int(getattr(row, S.TRAIN))
            cells.append(f"<td>{show(S.TRAIN, i)}<br>train {i}{html.escape(_labels(problem, S.TRAIN, i))}<br>"
                         f"bif {_fmt(float(getattr(row, S.BIF)))}<br>corr {_fmt(float(getattr(row, S.BIF_CORR)))}</td>")
        out.append(f"<tr><th>{d}</th>{''.join(cells)}</tr>")
    return "\n".join(out) + "</table>"


def _topk_section(run: RunStore, problem: Any, *, num_queries: int = 3, k: int = 5) -> str:
    topk = run.read_table(S.TOPK_FILE)
    if topk is None or topk.empty:
        return _missing(f"No top-k table ({S.TOPK_FILE} is missing).")
    render = getattr(problem, "render", None) if problem is not None else None
    intro = ("<p>Positive BIF: upweighting the train example raises the query's loss; negative: lowers it. "
             f"Queries with the strongest influences shown; all queries are in <code>{S.TOPK_FILE}</code>.</p>")
    return intro + "".join(_render_query(topk, q, render, problem, k) for q in _pick_queries(topk, num_queries))


# --- public API ------------------------------------------------------------------------------
#: Sections that read only the traces' health and the reduction's outputs (bif.zarr, topk.parquet), not the
#: gates' or the diagnostics' files: a flow builds them while its checks run (:func:`build_sections`).
EARLY_SECTIONS = ("Loss traces and distance to w*", "BIF heatmap", "Most influential training examples")


def _builders(num_queries: int, k: int, status: str | None, token_limits: Any, run: RunStore
              ) -> dict[str, Callable[[RunStore, Any], str]]:
    """Every section of ``run``'s report, title -> builder, in report order."""
    from bif import report_tokens

    out: dict[str, Callable[[RunStore, Any], str]] = dict(zip(SECTIONS, [
        lambda r, p: _summary(r, p, status), _quality, _traces, _diagnostics, _heatmap,
        lambda r, p: _topk_section(r, p, num_queries=num_queries, k=k)]))
    if report_tokens.is_token_run(run):
        out[report_tokens.TITLE] = lambda r, p: report_tokens.token_view_html(r.uri, r.storage_options,
                                                                              limits=token_limits)
    return out


def _build(title: str, build: Callable[[RunStore, Any], str], run: RunStore, problem: Any) -> str:
    try:
        return build(run, problem)
    except Exception as err:  # one unreadable input must not cost the whole report
        return _missing(f"Could not build this section: {type(err).__name__}: {str(err)[:300]}")


def build_sections(output_uri: str, storage_options: Mapping[str, Any] | None = None, *, problem: Any = None,
                   titles: tuple[str, ...] = EARLY_SECTIONS, num_queries: int = 3, k: int = 5,
                   token_limits: Any = None) -> dict[str, str]:
    """The HTML of the sections ``titles`` (title -> HTML), for :func:`build_report_html`'s ``prebuilt``.

    The token view joins :data:`EARLY_SECTIONS` on token runs (it reads the token outputs only).
    """
    from bif import report_tokens

    run = RunStore(output_uri, storage_options or {})
    builders = _builders(num_queries, k, None, token_limits, run)
    wanted = (*titles, report_tokens.TITLE) if titles == EARLY_SECTIONS else titles
    return {t: _build(t, builders[t], run, problem) for t in wanted if t in builders}


def build_report_html(output_uri: str, storage_options: Mapping[str, Any] | None = None, *, problem: Any = None,
                      num_queries: int = 3, k: int = 5, status: str | None = None,
                      token_limits: Any = None, prebuilt: Mapping[str, str] | None = None) -> str:
    """The report as an HTML string (see the module docstring). ``status`` overrides the manifest's.

    ``token_limits`` (a :class:`bif.report_tokens.TokenViewLimits`) bounds the token view's data.
    ``prebuilt``: sections already built (title -> HTML, from :func:`build_sections` on the same
    outputs); the others are built here.
    """
    run = RunStore(output_uri, storage_options or {})
    prebuilt = prebuilt or {}
    body = []
    for title, build in _builders(num_queries, k, status, token_limits, run).items():
        content = prebuilt[title] if title in prebuilt else _build(title, build, run, problem)
        anchor = title.lower().split()[0]
        body.append(f'<section id="{anchor}"><h2>{html.escape(title)}</h2>\n{content}</section>')
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>BIF run report</title><style>{_CSS}</style>"
            f"</head><body><h1>BIF run report</h1><p><code>{html.escape(output_uri)}</code></p>\n"
            + "\n".join(body) + "</body></html>")


def write_report(output_uri: str, storage_options: Mapping[str, Any] | None = None, *, problem: Any = None,
                 num_queries: int = 3, k: int = 5, status: str | None = None, token_limits: Any = None,
                 prebuilt: Mapping[str, str] | None = None) -> str:
    """Write ``<output>/report.html`` (one self-contained file) and return its URI.

    The flow writes the report just before the final manifest write and passes the final
    ``status``; ``bif report`` regenerates it from the manifest.
    """
    text = build_report_html(output_uri, storage_options, problem=problem, num_queries=num_queries, k=k,
                             status=status, token_limits=token_limits, prebuilt=prebuilt)
    return RunStore(output_uri, storage_options or {}).write_report(text)


def markdown_summary(output_uri: str, storage_options: Mapping[str, Any] | None = None, *,
                     status: str | None = None) -> str:
    """Status, gate outcome, R-hat / ESS summary and BIF shape as Markdown (for a Prefect artifact)."""
    run = RunStore(output_uri, storage_options or {})
    manifest = run.read_json(S.MANIFEST_FILE) or {}
    lines = [f"# BIF run `{output_uri}`", "", f"**Status:** {status or manifest.get('status', 'unknown')}", ""]
    quality = run.read_json(S.QUALITY_DIR, S.QUALITY_SUMMARY_FILE)
    lines.append("## Quality gates")
    if quality is None:
        lines.append("_not run_")
    else:
        lines.append(f"{'passed' if quality.get('passed') else '**FAILED**'}: {len(quality.get('failed', []))} "
                     f"failed, {len(quality.get('warnings', []))} warnings")
        for r in quality.get("failed", []) + quality.get("warnings", []):
            detail = str(r.get("detail", "")).replace("|", "/")
            lines.append(f"- `{r.get('gate')}` {r.get('expectation')}: {detail}")
    lines += ["", "## MCMC diagnostics"]
    diag = run.read_table(S.DIAGNOSTICS_FILE)
    if diag is None:
        lines.append("_no diagnostics.parquet_")
    else:
        threshold = _rhat_threshold(run)
        lines += [f"| split | samples | R-hat median | R-hat max | # R-hat > {threshold:g} | ESS bulk median "
                  "| ESS tail median |",
                  "|---|---|---|---|---|---|---|"]
        for split, g in diag.groupby(S.SPLIT, observed=True):
            lines.append(f"| {split} | {len(g)} | {_fmt(float(g[S.RHAT].median()))} | {_fmt(float(g[S.RHAT].max()))} "
                         f"| {int((g[S.RHAT] > threshold).sum())} | {_fmt(float(g[S.ESS_BULK].median()))} "
                         f"| {_fmt(float(g[S.ESS_TAIL].median()))} |")
    lines += ["", "## Results"]
    ds = run.open_bif()
    lines.append("_no bif.zarr_" if ds is None else
                 f"bif: {ds.sizes.get(S.TRAIN_DIM)} train x {ds.sizes.get(S.QUERY_DIM)} query")
    counts = constant_counts(ds)
    if counts is not None:
        lines.append("constant loss traces: " + ", ".join(f"{split} {c} of {n}" for split, (c, n) in counts.items()))
    return "\n".join(lines) + "\n"


def topk_records(output_uri: str, storage_options: Mapping[str, Any] | None = None, *, num_queries: int = 5,
                 k: int = 5) -> list[dict[str, Any]]:
    """Rows of topk.parquet for the ``num_queries`` most strongly influenced queries (for a table artifact)."""
    topk = RunStore(output_uri, storage_options or {}).read_table(S.TOPK_FILE)
    if topk is None or topk.empty:
        return []
    keep = topk[topk[S.QUERY].isin(_pick_queries(topk, num_queries)) & (topk[S.RANK] < topk[S.RANK].min() + k)]
    order = keep[S.DIRECTION].map({"positive": 0, "negative": 1})
    keep = keep.assign(_order=order).sort_values([S.QUERY, "_order", S.RANK])
    return [{c: (v.item() if hasattr(v, "item") else v) for c, v in rec.items()}
            for rec in keep[list(S.TOPK_COLUMNS)].to_dict("records")]


def topk_markdown(output_uri: str, storage_options: Mapping[str, Any] | None = None, *, num_queries: int = 5,
                  k: int = 5) -> str:
    """:func:`topk_records` as a Markdown table."""
    records = topk_records(output_uri, storage_options, num_queries=num_queries, k=k)
    if not records:
        return "_no topk.parquet_\n"
    lines = ["| " + " | ".join(S.TOPK_COLUMNS) + " |", "|" + "---|" * len(S.TOPK_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in S.TOPK_COLUMNS) + " |" for r in records]
    return "\n".join(lines) + "\n"

"""How a query's most influential train examples change over training, across a catalog's checkpoints.

Input: the complete runs of a sweep's catalog (one per checkpoint, oldest first) and each
run's ``topk.parquet``. :func:`topk_trend` gives, per train example that is ever in the
query's top ``k`` (``positive``: upweighting it raises the query's loss), its rank at every
checkpoint (NaN where it is not in the top k) and its BIF; and, per consecutive pair of
checkpoints, the overlap of their top-k sets (Jaccard). :func:`trend_html` renders both as
one self-contained page with an embedded PNG (matplotlib, Agg). No orchestration, no I/O
beyond what the caller hands in.
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bif import schema as S


@dataclass(frozen=True)
class Trend:
    """Ranks and BIFs of one query's top-k train examples over checkpoints."""

    query: int
    direction: str
    k: int
    checkpoints: list[str]  # labels, oldest first
    ranks: pd.DataFrame  # index train id, columns checkpoint labels; rank (0 = strongest) or NaN
    bif: pd.DataFrame  # same shape: the BIF where the example is in the top k, else NaN
    jaccard: list[float]  # len(checkpoints) - 1: |A ∩ B| / |A ∪ B| of consecutive top-k sets

    def table(self) -> pd.DataFrame:
        """One row per train example: its rank at each checkpoint ('-' outside the top k), strongest first."""
        order = self.ranks.mean(axis=1, skipna=True) - self.ranks.notna().sum(axis=1)  # persistent and strong first
        out = self.ranks.loc[order.sort_values(kind="stable").index]
        return out.map(lambda v: "-" if pd.isna(v) else str(int(v)))


def topk_trend(runs: Sequence[tuple[str, pd.DataFrame]], *, query: int, k: int = 5,
               direction: str = "positive") -> Trend:
    """The :class:`Trend` of ``query`` over ``runs`` = [(checkpoint label, topk.parquet frame)], oldest first."""
    labels = [label for label, _ in runs]
    sets, rank_cols, bif_cols = [], {}, {}
    for label, df in runs:
        sel = df[(df[S.QUERY] == query) & (df[S.DIRECTION] == direction) & (df[S.RANK] < k)]
        sets.append(set(sel[S.TRAIN].astype(int)))
        rank_cols[label] = sel.set_index(S.TRAIN)[S.RANK].astype(float)
        bif_cols[label] = sel.set_index(S.TRAIN)[S.BIF].astype(float)
    ranks = pd.DataFrame(rank_cols, columns=labels).sort_index()
    bif = pd.DataFrame(bif_cols, columns=labels).reindex(ranks.index)
    jac = [len(a & b) / len(a | b) if (a | b) else 1.0 for a, b in zip(sets, sets[1:])]
    return Trend(query=query, direction=direction, k=k, checkpoints=labels, ranks=ranks, bif=bif, jaccard=jac)


def trend_png(trend: Trend) -> bytes:
    """A PNG: rank of each top-k train example per checkpoint (left), top-k overlap between neighbours (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(trend.checkpoints))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1.2]})
    for train_id, row in trend.ranks.iterrows():
        ax.plot(x, row.to_numpy(), marker="o", label=f"train {train_id}")
    ax.set_xticks(x, trend.checkpoints, rotation=30, ha="right", fontsize=8)
    ax.invert_yaxis()
    ax.set_ylabel("rank (0 = strongest)")
    ax.set_title(f"query {trend.query}: top {trend.k} {trend.direction} train examples over checkpoints")
    if len(trend.ranks) <= 15:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if trend.jaccard:
        ax2.bar(np.arange(len(trend.jaccard)), trend.jaccard)
        ax2.set_xticks(np.arange(len(trend.jaccard)), [f"{i}→{i + 1}" for i in range(len(trend.jaccard))], fontsize=8)
    ax2.set_ylim(0, 1)
    ax2.set_title("top-k overlap (Jaccard)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def trend_html(trend: Trend, *, source: str) -> str:
    """One self-contained HTML page: the PNG, the rank table and the overlaps."""
    png = base64.b64encode(trend_png(trend)).decode()
    table = trend.table().to_html(classes="ranks", border=0, escape=True)
    jac = ", ".join(f"{a} → {b}: {j:.2f}" for a, b, j in zip(trend.checkpoints, trend.checkpoints[1:], trend.jaccard))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>bif trend: query {trend.query}</title>"
            "<style>body{font-family:sans-serif;margin:2em} table.ranks td,table.ranks th{padding:2px 8px;"
            "text-align:right}</style></head><body>"
            f"<h1>Query {trend.query}: its top {trend.k} {html.escape(trend.direction)} train examples over training</h1>"
            f"<p>From the catalog of <code>{html.escape(source)}</code>: {len(trend.checkpoints)} complete runs, "
            "oldest checkpoint first. Rank 0 is the train example whose upweighting would most raise the "
            "query's loss; '-' means outside the top k at that checkpoint.</p>"
            f"<img alt='ranks over checkpoints' src='data:image/png;base64,{png}'>"
            f"<h2>Ranks</h2>{table}<h2>Overlap of consecutive top-k sets</h2><p>{html.escape(jac) or '-'}</p>"
            "</body></html>")

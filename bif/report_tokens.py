"""The report's token view: a query sequence's tokens coloured by a train sequence's (or token's) influence.

Owns the "Token view" section of ``report.html`` for token runs (problems whose loss is per
token, see the README's language-model section). It reads the run's outputs only:

- ``tokens.parquet``: the text of every valid token (``split, sample, position, token``);
- ``bif_tokens.zarr`` when present (``covariance.token_matrix: true``): the dense values
  ``bif`` (train token x query token), ``bif_seq_tok`` (train sequence x query token) and
  ``bif_tok_seq`` (train token x query sequence);
- else ``topk_tokens.parquet``: the top-k train tokens of each query token only. The view
  then says it is sparse: a token is coloured by the sum of its *listed* entries, and a
  token with none is grey ("not in top-k").
- ``bif.zarr``: the sequence-level values that pick the query sequences and rank their
  train sequences (when it is missing, the segment sums of ``bif_seq_tok`` / the listed
  top-k entries do).

:func:`token_view_data` gathers a bounded selection (:class:`TokenViewLimits`: the query
sequences with the strongest influence, the top train sequences of each, the first tokens
of long sequences, a budget of token x token values) as one JSON-ready dict;
:func:`token_view_html` embeds it with the view's script (``report_tokens.js``, package
data) so the report stays one self-contained file. Sign convention: positive BIF means
upweighting the train example raises the query's loss (red); negative lowers it (blue).
"""
from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from bif import schema as S
from bif.store.run import RunStore

TITLE = "Token view"
DATA_ID = "bif-token-data"  # id of the <script type="application/json"> holding the embedded data
_CSS = (".tv-controls label{margin-right:1.2em}.tv-controls select{max-width:28em}"
        ".tv-panel{border:1px solid #ddd;border-radius:4px;padding:.4em .8em;margin:.6em 0}"
        ".tv-panel h4{margin:.2em 0 .4em;font-weight:600}"
        ".tv-tokens{font-family:ui-monospace,monospace;font-size:14px;line-height:1.9;white-space:pre-wrap;"
        "word-break:break-all}"
        ".tok{padding:1px 0;margin:0 1px;border-radius:2px;cursor:pointer;border:1px solid transparent}"
        ".tok.na{background:repeating-linear-gradient(45deg,#eee,#eee 3px,#f8f8f8 3px,#f8f8f8 6px);color:#999}"
        ".tv-tokens.gaps .tok{margin-right:.5em}.tok.sel{border:2px solid #000}.tok:hover{border-color:#555}"
        ".tv-legend{display:flex;align-items:center;gap:.5em;font-size:12px;color:#444;margin-top:.3em}"
        ".tv-bar{width:220px;height:12px;border:1px solid #aaa;"
        "background:linear-gradient(to right,rgb(33,102,172),#fff,rgb(178,24,43))}"
        "#tv-info{font-family:ui-monospace,monospace;font-size:13px;min-height:1.4em;color:#333}"
        ".tv-note{color:#555;font-size:90%}")


@dataclass(frozen=True)
class TokenViewLimits:
    """Bounds on what the token view embeds (the report stays small for big runs)."""

    max_queries: int = 12  # query sequences shown: those with the strongest |bif| to any train sequence
    top_train: int = 8  # train sequences listed per query sequence: the largest |bif|, either sign
    max_tokens: int = 256  # tokens shown per sequence: its first valid ones
    max_pair_values: int = 250_000  # token x token values embedded over all (train, query) pairs

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if int(value) < 1:
                raise ValueError(f"TokenViewLimits.{name} must be >= 1, got {value!r}")


def is_token_run(run: RunStore) -> bool:
    """True when the run wrote token-level outputs (the view is added); sequence runs get none."""
    return any(run.exists(name) for name in (S.TOKENS_FILE, S.TOPK_TOKENS_FILE, S.BIF_TOKENS_ZARR))


# --- reading ----------------------------------------------------------------------------------
def _read_filtered(run: RunStore, name: str, columns: list[str], filters: list | None) -> pd.DataFrame | None:
    """Rows of the Parquet file ``name`` matching pyarrow ``filters`` (row groups pruned), None if absent."""
    return run.read_table(name, columns=columns, filters=filters)


def _open_tokens_zarr(run: RunStore):
    """bif_tokens.zarr without Dask: the view reads many small orthogonal blocks, and zarr reads only the
    chunks each one touches; through Dask every block is its own graph (about 2x slower on a
    19 200 x 2 560 token matrix, measured on a shared machine)."""
    return run.open_dataset(S.BIF_TOKENS_ZARR, dask=False)


def _select(da: Any, dim: str, ids: np.ndarray) -> Any:
    """``da`` at sample ids ``ids`` along ``dim`` (by coordinate label when the dim has one)."""
    return da.sel({dim: ids}) if dim in da.coords else da.isel({dim: ids})


def _nums(a: Any) -> list:
    """Stored values as embedded, flattened: rounded to 7 significant digits (float32's precision, so the
    JSON stays short), None for NaN / inf."""
    a = np.asarray(a, dtype=float).ravel()
    out = a.copy()
    big = np.isfinite(a) & (np.abs(a) > 1e-290)  # (the scale of smaller ones would overflow; they stay as stored)
    scale = 10.0 ** (6 - np.floor(np.log10(np.abs(a[big]))))
    out[big] = np.round(a[big] * scale) / scale
    values = out.tolist()
    for i in np.flatnonzero(~np.isfinite(a)):
        values[i] = None
    return values


def _num(v: float) -> float | None:
    return _nums([v])[0]


def _rank(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest |values| (NaN last; ties by index)."""
    key = np.abs(np.asarray(values, dtype=float))
    key = np.where(np.isfinite(key), key, -1.0)
    return np.argsort(-key, kind="stable")[:n]


def _interleave(a: np.ndarray, b: np.ndarray, n: int) -> list[int]:
    """The first ``n`` distinct items of a[0], b[0], a[1], b[1], ..."""
    out: dict[int, None] = {}
    for x in (int(v) for pair in zip(a, b) for v in pair):
        if len(out) == n:
            break
        out.setdefault(x, None)
    return list(out)


@dataclass
class _Seqs:
    """Shown sequences of one split: sample ids and, per sample, its shown token positions and texts."""

    samples: list[int]
    positions: dict[int, np.ndarray]
    texts: dict[int, list[str]]
    totals: dict[int, int]  # valid tokens of the sample (shown or not)


def _sequences(run: RunStore, split: str, samples: list[int], known: dict[int, np.ndarray], max_tokens: int) -> _Seqs:
    """The first ``max_tokens`` valid positions of each sample (from ``known``, else tokens.parquet) and texts."""
    rows = _read_filtered(run, S.TOKENS_FILE, [S.SPLIT, S.SAMPLE, S.POSITION, S.TOKEN],
                          [(S.SPLIT, "==", split), (S.SAMPLE, "in", [int(s) for s in samples])] if samples else None)
    rows = rows if rows is not None else pd.DataFrame({S.SAMPLE: [], S.POSITION: [], S.TOKEN: []})
    by_sample = {int(s): g for s, g in rows.groupby(S.SAMPLE)} if len(rows) else {}
    positions, texts, totals = {}, {}, {}
    for s in samples:
        g = by_sample.get(s)
        pos = np.sort(known[s]) if s in known else (np.sort(g[S.POSITION].to_numpy(np.int64)) if g is not None
                                                  else np.zeros(0, np.int64))
        totals[s] = int(pos.size)
        pos = pos[:max_tokens]
        text = dict(zip(g[S.POSITION].astype(int), g[S.TOKEN].astype(str))) if g is not None else {}
        positions[s], texts[s] = pos, [text.get(int(p), "") for p in pos]
    return _Seqs(list(samples), positions, texts, totals)


# --- selection --------------------------------------------------------------------------------
def _sequence_bif(run: RunStore) -> Any | None:
    """bif.zarr's (train, query) ``bif`` (lazy), or None."""
    ds = run.open_bif()
    return ds[S.BIF] if ds is not None and S.BIF in ds else None


def _dense(run: RunStore, ds: Any, limits: TokenViewLimits) -> dict[str, Any]:
    """The embedded selection from bif_tokens.zarr (exact values)."""
    t_sample = np.asarray(ds[S.TRAIN_SAMPLE].values, dtype=np.int64)
    t_pos = np.asarray(ds[S.TRAIN_POSITION].values, dtype=np.int64)
    q_sample = np.asarray(ds[S.QUERY_SAMPLE].values, dtype=np.int64)
    q_pos = np.asarray(ds[S.QUERY_POSITION].values, dtype=np.int64)
    seq = _sequence_bif(run)
    seq_source = S.BIF_ZARR
    if seq is None:  # the segment sums over each query's tokens (equal by construction)
        seq = ds[S.BIF_SEQ_TOK].assign_coords({S.QUERY_SAMPLE: (S.QUERY_TOKEN_DIM, q_sample)}).groupby(S.QUERY_SAMPLE).sum()
        seq = seq.rename({S.QUERY_SAMPLE: S.QUERY_DIM})
        seq_source = f"{S.BIF_SEQ_TOK} summed over each query's tokens"
    n_query_all = int(seq.sizes[S.QUERY_DIM])
    query_ids = np.asarray(seq[S.QUERY_DIM].values if S.QUERY_DIM in seq.coords else np.arange(n_query_all))
    strength = np.asarray(abs(seq).max(S.TRAIN_DIM).values, dtype=float)
    queries = [int(query_ids[i]) for i in _rank(strength, limits.max_queries)]
    cols = np.asarray(_select(seq, S.QUERY_DIM, np.asarray(queries)).values, dtype=float)  # (n_train, nq)
    train_ids = np.asarray(seq[S.TRAIN_DIM].values if S.TRAIN_DIM in seq.coords else np.arange(cols.shape[0]))
    # A train sequence can matter to one query token while its sequence-level sum cancels: the partners
    # alternate the sequence-level ranking with the ranking by the largest |bif_seq_tok| on one query token.
    seq_tok_all = _select(ds[S.BIF_SEQ_TOK], S.TRAIN_DIM, train_ids)
    ranked = {}
    for c, q in enumerate(queries):
        tok = np.abs(np.asarray(seq_tok_all.isel({S.QUERY_TOKEN_DIM: np.flatnonzero(q_sample == q)}).values,
                                dtype=float))  # (n_train, tokens of q)
        tok_max = np.where(np.isfinite(tok), tok, -1.0).max(axis=1, initial=-1.0)
        order = _interleave(_rank(cols[:, c], len(train_ids)), _rank(tok_max, len(train_ids)), limits.top_train)
        ranked[q] = [(int(train_ids[i]), float(cols[i, c])) for i in order]
    trains = list(dict.fromkeys(t for q in queries for t, _ in ranked[q]))

    t_idx = {t: np.flatnonzero(t_sample == t) for t in trains}
    q_idx = {q: np.flatnonzero(q_sample == q) for q in queries}
    t_idx = {t: i[np.argsort(t_pos[i], kind="stable")][:limits.max_tokens] for t, i in t_idx.items()}
    q_idx = {q: i[np.argsort(q_pos[i], kind="stable")][:limits.max_tokens] for q, i in q_idx.items()}
    qs = _sequences(run, S.QUERY, queries, {q: q_pos[np.flatnonzero(q_sample == q)] for q in queries},
                    limits.max_tokens)
    ts = _sequences(run, S.TRAIN, trains, {t: t_pos[np.flatnonzero(t_sample == t)] for t in trains},
                    limits.max_tokens)

    all_q = np.concatenate([q_idx[q] for q in queries]) if queries else np.zeros(0, np.int64)
    all_t = np.concatenate([t_idx[t] for t in trains]) if trains else np.zeros(0, np.int64)
    seq_tok = np.asarray(_select(ds[S.BIF_SEQ_TOK], S.TRAIN_DIM, np.asarray(trains)).isel(
        {S.QUERY_TOKEN_DIM: all_q}).values, dtype=float) if trains else np.zeros((0, 0))
    tok_seq = np.asarray(_select(ds[S.BIF_TOK_SEQ], S.QUERY_DIM, np.asarray(queries)).isel(
        {S.TRAIN_TOKEN_DIM: all_t}).values, dtype=float) if queries else np.zeros((0, 0))
    q_off = dict(zip(queries, np.cumsum([0] + [len(q_idx[q]) for q in queries])))
    t_off = dict(zip(trains, np.cumsum([0] + [len(t_idx[t]) for t in trains])))

    pairs, budget, dropped = [], limits.max_pair_values, 0
    for qi, q in enumerate(queries):
        # the train sequences of q whose token x token block fits the budget, read in one go
        fits = []
        for t, _ in ranked[q]:
            if len(q_idx[q]) * len(t_idx[t]) <= budget:
                fits.append(t)
                budget -= len(q_idx[q]) * len(t_idx[t])
        rows = np.concatenate([t_idx[t] for t in fits]) if fits else np.zeros(0, np.int64)
        block = np.asarray(ds[S.BIF].isel({S.TRAIN_TOKEN_DIM: rows, S.QUERY_TOKEN_DIM: q_idx[q]}).values, dtype=float)
        starts = dict(zip(fits, np.cumsum([0] + [len(t_idx[t]) for t in fits])))
        for t, value in ranked[q]:
            ti = trains.index(t)
            qa, qb = q_off[q], q_off[q] + len(q_idx[q])
            ta, tb = t_off[t], t_off[t] + len(t_idx[t])
            tt = None
            if t in starts:
                tt = [_nums(row) for row in block[starts[t]:starts[t] + len(t_idx[t])]]
            else:
                dropped += 1
            pairs.append({"q": qi, "t": ti, "bif": _num(value), "q_by_t": _nums(seq_tok[ti, qa:qb]),
                          "t_by_q": _nums(tok_seq[ta:tb, qi]), "tt": tt})
    return {"mode": "dense", "source": S.BIF_TOKENS_ZARR, "sequence_source": seq_source,
            "n_queries": n_query_all, "n_trains": int(cols.shape[0]), "pairs": pairs, "tt_dropped": dropped,
            "queries": _seq_json(qs), "trains": _seq_json(ts)}


def _sparse(run: RunStore, limits: TokenViewLimits) -> dict[str, Any]:
    """The embedded selection from topk_tokens.parquet: listed entries only (partial sums)."""
    cols = [S.QUERY_SAMPLE, S.QUERY_POSITION, S.TRAIN_SAMPLE, S.TRAIN_POSITION, S.BIF]
    head = _read_filtered(run, S.TOPK_TOKENS_FILE, [S.QUERY_SAMPLE, S.BIF], None)
    strength = head.assign(a=head[S.BIF].abs()).groupby(S.QUERY_SAMPLE)["a"].max()
    strength = strength.sort_index()
    queries = [int(strength.index[i]) for i in _rank(strength.to_numpy(), limits.max_queries)]
    rows = _read_filtered(run, S.TOPK_TOKENS_FILE, cols, [(S.QUERY_SAMPLE, "in", queries)] if queries else None)
    # an entry listed under both signs (k near the number of train tokens) counts once
    rows = rows.drop_duplicates([S.QUERY_SAMPLE, S.QUERY_POSITION, S.TRAIN_SAMPLE, S.TRAIN_POSITION])
    seq = _sequence_bif(run)
    ranked: dict[int, list[tuple[int, float | None]]] = {}
    for q in queries:
        g = rows[rows[S.QUERY_SAMPLE] == q]
        score = g.assign(a=g[S.BIF].abs()).groupby(S.TRAIN_SAMPLE)["a"].sum().sort_index()
        top = [int(score.index[i]) for i in _rank(score.to_numpy(), limits.top_train)]
        values = (np.asarray(_select(_select(seq, S.QUERY_DIM, np.asarray([q])), S.TRAIN_DIM, np.asarray(top))
                             .values, dtype=float).ravel() if seq is not None and top else [None] * len(top))
        ranked[q] = list(zip(top, values))
    trains = list(dict.fromkeys(t for q in queries for t, _ in ranked[q]))
    qs = _sequences(run, S.QUERY, queries, {}, limits.max_tokens)
    ts = _sequences(run, S.TRAIN, trains, {}, limits.max_tokens)

    pairs, budget, dropped = [], limits.max_pair_values, 0
    for qi, q in enumerate(queries):
        for t, value in ranked[q]:
            qpos, tpos = qs.positions[q], ts.positions[t]
            g = rows[(rows[S.QUERY_SAMPLE] == q) & (rows[S.TRAIN_SAMPLE] == t)]
            g = g[g[S.QUERY_POSITION].isin(qpos) & g[S.TRAIN_POSITION].isin(tpos)]
            qj = {int(p): j for j, p in enumerate(qpos)}
            ti_ = {int(p): i for i, p in enumerate(tpos)}
            q_by_t: list = [None] * len(qpos)
            t_by_q: list = [None] * len(tpos)
            size = len(qpos) * len(tpos)
            tt = [[None] * len(qpos) for _ in tpos] if size <= budget else None
            budget, dropped = (budget - size, dropped) if tt is not None else (budget, dropped + 1)
            for qp, tp, v in zip(g[S.QUERY_POSITION].astype(int), g[S.TRAIN_POSITION].astype(int), g[S.BIF].astype(float)):
                j, i = qj[qp], ti_[tp]
                q_by_t[j] = (q_by_t[j] or 0.0) + v
                t_by_q[i] = (t_by_q[i] or 0.0) + v
                if tt is not None:
                    tt[i][j] = _num(v)
            pairs.append({"q": qi, "t": trains.index(t), "bif": None if value is None else _num(value),
                          "q_by_t": [None if v is None else _num(v) for v in q_by_t],
                          "t_by_q": [None if v is None else _num(v) for v in t_by_q], "tt": tt})
    return {"mode": "sparse", "source": S.TOPK_TOKENS_FILE,
            "sequence_source": S.BIF_ZARR if seq is not None else "none",
            "n_queries": int(len(strength)), "n_trains": int(seq.sizes[S.TRAIN_DIM]) if seq is not None else None,
            "pairs": pairs, "tt_dropped": dropped, "queries": _seq_json(qs), "trains": _seq_json(ts)}


def _seq_json(seqs: _Seqs) -> list[dict[str, Any]]:
    return [{"sample": int(s), "pos": [int(p) for p in seqs.positions[s]], "tok": seqs.texts[s],
             "n_tokens": seqs.totals[s]} for s in seqs.samples]


def token_view_data(output_uri: str, storage_options: Any = None, *,
                    limits: TokenViewLimits | None = None) -> dict[str, Any] | None:
    """The token view's embedded data (a JSON-ready dict), or None for a run without token outputs.

    Keys: ``mode`` ("dense" from bif_tokens.zarr | "sparse" from topk_tokens.parquet),
    ``queries`` / ``trains`` (shown sequences: ``sample``, ``pos`` (true positions along T),
    ``tok`` (texts), ``n_tokens`` (valid tokens in all)), ``pairs`` (one per query and listed
    train sequence: indices ``q``, ``t`` into those lists, sequence-level ``bif``, ``q_by_t``
    (per shown query token: bif_seq_tok[train seq, token]), ``t_by_q`` (per shown train token:
    bif_tok_seq[token, query seq]), ``tt`` (train tokens x query tokens of ``bif``, or None
    past ``limits.max_pair_values``)), ``limits`` and the counts of what was left out.
    In sparse mode the values are sums of listed top-k entries and None where none is listed.
    """
    limits = limits or TokenViewLimits()
    run = RunStore(output_uri, storage_options or {})
    if not is_token_run(run):
        return None
    ds = _open_tokens_zarr(run)
    if ds is not None and all(v in ds for v in (S.BIF, S.BIF_SEQ_TOK, S.BIF_TOK_SEQ)):
        data = _dense(run, ds, limits)
    elif run.exists(S.TOPK_TOKENS_FILE):
        data = _sparse(run, limits)
    else:
        raise FileNotFoundError(f"a token run needs {S.BIF_TOKENS_ZARR} (with {S.BIF}, {S.BIF_SEQ_TOK}, {S.BIF_TOK_SEQ}) "
                                f"or {S.TOPK_TOKENS_FILE}; neither is in {output_uri}")
    data["limits"] = asdict(limits)
    texts = [t for s in data["queries"] + data["trains"] for t in s["tok"] if t]
    data["has_text"] = bool(texts)
    # word-level tokenizers render tokens without their spaces: the view then puts a gap between tokens
    data["spaced"] = any(t[:1].isspace() or t[-1:].isspace() for t in texts)
    return data


# --- HTML -------------------------------------------------------------------------------------
def _script_json(obj: Any) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' survive unescaped (a token may read '</script>')."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _notes(data: dict[str, Any]) -> list[str]:
    lim, notes = data["limits"], []
    nq, nt = len(data["queries"]), len(data["trains"])
    if data["n_queries"] is not None and nq < data["n_queries"]:
        notes.append(f"{nq} of {data['n_queries']} query sequences shown (those with the strongest |bif|; "
                     f"cap {lim['max_queries']}).")
    per = max(sum(p["q"] == qi for p in data["pairs"]) for qi in range(nq)) if nq else 0
    rank = ("alternately the largest sequence-level |bif| and the largest |bif_seq_tok| on one query token"
            if data["mode"] == "dense" else "the largest sum of |bif| over their listed top-k tokens")
    notes.append(f"Per query sequence, up to {lim['top_train']} train sequences with {rank} (at most {per} here; "
                 f"{nt} distinct" + (f" of {data['n_trains']}" if data.get("n_trains") else "") + ").")
    long_ = [s for s in data["queries"] + data["trains"] if s["n_tokens"] > len(s["pos"])]
    if long_:
        notes.append(f"{len(long_)} sequences are longer than {lim['max_tokens']} tokens: their first "
                     f"{lim['max_tokens']} are shown.")
    nan = sum(v is None for p in data["pairs"] for k in ("q_by_t", "t_by_q") for v in p[k])
    if data["mode"] == "dense" and nan:
        notes.append(f"{nan} shown token values are NaN in {S.BIF_TOKENS_ZARR} (shown grey): was it written by a run "
                     "that did not finish?")
    if data["tt_dropped"]:
        notes.append(f"Token x token values are embedded for {len(data['pairs']) - data['tt_dropped']} of "
                     f"{len(data['pairs'])} pairs (cap {lim['max_pair_values']} values); clicking a token of the "
                     "others says so.")
    return notes


def token_view_html(output_uri: str, storage_options: Any = None, *, limits: TokenViewLimits | None = None) -> str:
    """The token view section body (controls, panels, embedded JSON and script); "" for a sequence run."""
    try:
        data = token_view_data(output_uri, storage_options, limits=limits)
    except FileNotFoundError as err:  # a token run that stopped before its token results
        return f'<p class="missing">{html.escape(str(err))}</p>'
    if data is None:
        return ""
    if not data["pairs"]:
        return f'<p class="missing">No token values to show ({html.escape(data["source"])} lists none).</p>'
    if data["mode"] == "dense":
        source = (f"Values from <code>{S.BIF_TOKENS_ZARR}</code> (dense): <code>{S.BIF_SEQ_TOK}</code> colours a "
                  f"query sequence by a whole train sequence, <code>{S.BIF_TOK_SEQ}</code> a train sequence by a whole "
                  f"query sequence, <code>{S.BIF}</code> token by token.")
    else:
        source = (f'<span class="warn">Sparse view</span>: this run has no <code>{S.BIF_TOKENS_ZARR}</code> (set '
                  f"<code>covariance.token_matrix: true</code> for it), so the values come from "
                  f"<code>{S.TOPK_TOKENS_FILE}</code>, which lists only the top-k train tokens of each query token. "
                  "A token is coloured by the sum of its listed entries; grey tokens have none listed (their value "
                  "is unknown, not 0).")
    intro = (f"<p>{source} Positive BIF (red): upweighting the train example raises the query's loss; negative "
             "(blue): it lowers it. Colours are centred at 0 and scaled per panel, or shared by all partners listed "
             "for the first-picked sequence so that their strengths compare (legend). Click a train token to "
             "colour the query by that token alone; click a query token to colour the train sequence by its "
             "influence on that token; click it again to go back to whole sequences. Hover a token for its value. "
             "Link to a view: <code>report.html#q=QUERY&amp;t=TRAIN&amp;ttok=POS&amp;qtok=POS&amp;dir=q|t"
             "&amp;scale=shared</code> (sample ids and token positions).</p>")
    notes = "".join(f'<p class="tv-note">{html.escape(n)}</p>' for n in _notes(data))
    if not data["has_text"]:
        notes += '<p class="tv-note">The problem renders no token texts: tokens are shown as #position.</p>'
    script = resources.files("bif").joinpath("report_tokens.js").read_text(encoding="utf-8")
    controls = ('<div class="tv-controls"><label>Start from <select id="tv-dir"><option value="q">a query sequence'
                '</option><option value="t">a train sequence</option></select></label>'
                '<label><span id="tv-first-label">Query sequence</span> <select id="tv-first"></select></label>'
                '<label><span id="tv-second-label">Train sequence</span> <select id="tv-second"></select></label>'
                '<label>Colour scale <select id="tv-scale"><option value="panel">each panel its own</option>'
                '<option value="shared">shared by the listed partners</option></select></label></div>')
    return (f"<style>{_CSS}</style>{intro}{notes}<noscript><p class=\"missing\">The token view needs JavaScript."
            f"</p></noscript><div id=\"token-view\" data-mode=\"{data['mode']}\">{controls}"
            '<div id="tv-panels"></div><div id="tv-info">Hover a token.</div></div>'
            f'<script type="application/json" id="{DATA_ID}">{_script_json(data)}</script>'
            f"<script>{script}</script>")

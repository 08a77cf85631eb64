"""Token-level BIF of token runs: ``tokens.parquet``, ``topk_tokens.parquet`` and ``bif_tokens.zarr``, out of core.

A token run's traces hold one loss per valid token per draw (:mod:`bif.sampling.measure`,
``Variables.of_tokens``). The sequence level (``bif.zarr``, ``topk.parquet``) is the
ordinary reduction of :mod:`bif.tasks.covariance`: the trace store reads a sample's loss as
the sum of its valid token losses. This module adds the token level, as the same kind of
Dask map-reduce over mergeable moments (:mod:`bif.moments`), cut into output blocks of
``train_block_size`` train tokens x ``query_block_size`` query tokens
(``token_train_block_size``, when set, overrides the train side):

- ``topk_tokens.parquet`` (always): for every valid query token, its top-k train tokens by
  ``bif`` in each sign (``covariance.token_topk``, default ``topk``), in the total order of
  :func:`bif.tasks.covariance.merge_topk` (``bif`` descending, ties to the smaller train
  token index; the two signs never share a train token). Each block keeps only its k
  candidates per query token, so memory is bounded by the block size and the blocks in
  flight, never by train tokens x query tokens. Top-k is ranked on float64 values.
- ``bif_tokens.zarr`` (``covariance.token_matrix: true``): ``bif`` and ``bif_corr`` over
  (train_token, query_token), written block by block, plus the mixed levels
  ``bif_seq_tok`` (train, query_token) = -Cov(train sequence loss, query token loss) and
  ``bif_tok_seq`` (train_token, query) = -Cov(train token loss, query sequence loss), each its
  own reduction (so they check the token matrix: they equal its row / column segment sums).

Texts come from ``tokens.parquet`` (written at preparation, :func:`token_table`):
``query_token``, ``train_token`` and ``train_context`` (up to :data:`CONTEXT_TOKENS` valid
tokens of the same train sequence on each side, the token itself marked ⟦ ⟧, the space before it
outside the mark; tokens are joined without separators, as their texts carry their own spaces:
bif.lm.token_texts), all "" when the problem has no ``render_tokens``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask
import dask.bag as db
import numpy as np
import pandas as pd

from bif import schema as S
from bif.errors import ProblemError
from bif.moments import Moments, from_draws, merge_all
from bif.sampling.measure import Variables
from bif.store.run import BlockRef, RunStore
from bif.tasks.covariance import BlockResult, _negated_outputs, _ranges, _topk, compute_bounded, merge_topk

if TYPE_CHECKING:
    from bif.config import CovarianceConfig

#: Valid train tokens shown on each side of a train token in ``train_context``.
CONTEXT_TOKENS = 4


# --- tokens.parquet ------------------------------------------------------------------------------
def token_table(variables: Variables, ref_train: np.ndarray, ref_query: np.ndarray,
                render_tokens: Callable[[str, int], Sequence[str]] | None = None) -> pd.DataFrame:
    """The tokens.parquet table: one row per valid token in variable order (split, sample, position).

    ``ref_train`` / ``ref_query``: each token's loss at w* (variables,). ``render_tokens``:
    the problem's renderer (``token`` is "" without one).
    """
    frames = []
    for split, ref in ((S.TRAIN, ref_train), (S.QUERY, ref_query)):
        samples, positions = variables.token_samples(split), variables.token_positions(split)
        texts = [""] * len(samples)
        if render_tokens is not None:
            texts = _render(render_tokens, split, samples, positions)
        frames.append(pd.DataFrame({S.SPLIT: split, S.SAMPLE: samples, S.POSITION: positions, S.TOKEN: texts,
                                    S.REF_LOSS: np.asarray(ref, dtype=np.float64)}))
    return pd.concat(frames, ignore_index=True)[list(S.TOKENS_COLUMNS)]


def _render(render_tokens: Callable[[str, int], Sequence[str]], split: str, samples: np.ndarray,
            positions: np.ndarray) -> list[str]:
    out: list[str] = []
    bounds = np.r_[0, np.flatnonzero(np.diff(samples)) + 1, len(samples)] if len(samples) else np.zeros(1, int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        i = int(samples[a])
        try:
            texts = list(render_tokens(split, i))
        except Exception as err:  # noqa: BLE001 - the user's renderer failed
            raise ProblemError(f"problem.render_tokens({split!r}, {i}) raised {type(err).__name__}: {err}; it must "
                               "return one string per loss position of the sample") from None
        last = int(positions[b - 1])
        if len(texts) <= last:
            raise ProblemError(f"problem.render_tokens({split!r}, {i}) returned {len(texts)} strings, but the loss "
                               f"has a valid token at position {last}; return one string per loss position (T)")
        out.extend(str(texts[int(p)]) for p in positions[a:b])
    return out


# --- the reduction ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    """What one side of an output block reads: the tokens of ``split`` or its sequences (sums of their tokens)."""

    split: str
    tokens: bool

    def read(self, store: RunStore, ref: BlockRef, span: tuple[int, int]) -> np.ndarray:
        """float64 (draws, span) losses of variables (tokens) or samples (sequences) ``span`` of one block."""
        read = store.read_token_losses if self.tokens else store.read_losses
        return read(ref, split=self.split, start=span[0], stop=span[1])


def leaf_moments(store: RunStore, refs: Sequence[BlockRef], x: Level, xs: tuple[int, int], y: Level,
                 ys: tuple[int, int]) -> Moments:
    """Moments of a few trace blocks (draws stacked) between ``x`` over ``xs`` and ``y`` over ``ys``."""
    return from_draws(np.concatenate([x.read(store, r, xs) for r in refs]),
                      np.concatenate([y.read(store, r, ys) for r in refs]))


def _merged(store: RunStore, cov: "CovarianceConfig", files: Sequence[BlockRef], x: Level, xs: tuple[int, int],
            y: Level, ys: tuple[int, int], files_per_leaf: int) -> Any:
    """Delayed merged Moments of one output block (a list of per-chain states when pooling per chain)."""
    groups = [list(files)] if cov.pooling == "stack" else [
        [f for f in files if f.chain == c] for c in sorted({f.chain for f in files})]
    states = []
    for group in groups:
        chunks = [group[i:i + files_per_leaf] for i in range(0, len(group), files_per_leaf)]
        bag = db.from_sequence(chunks, npartitions=len(chunks))
        leaves = bag.map(lambda refs: leaf_moments(store, refs, x, xs, y, ys))
        states.append(leaves.reduction(merge_all, merge_all, split_every=cov.split_every).to_delayed())
    return states[0] if cov.pooling == "stack" else dask.delayed(list)(states)


def finalize_tokens(states: Moments | list[Moments], *, store: RunStore, train: tuple[int, int],
                    query: tuple[int, int], ddof: int, k: int, pooling: str, write: bool) -> BlockResult:
    """A (train tokens, query tokens) block: its top-k candidates per query token; writes its zarr region if ``write``."""
    bif, corr = _negated_outputs(states, ddof=ddof, pooling=pooling, dtype=np.float64)
    if write:
        arr = store.token_bif_array()
        arr.write(S.BIF, train, query, bif.astype(arr.dtype(S.BIF)))
        arr.write(S.BIF_CORR, train, query, corr.astype(arr.dtype(S.BIF_CORR)))
    key_t = np.ascontiguousarray(bif.T)
    ids = np.arange(train[0], train[1])
    pos = _topk(bif, corr, train[0], k, largest=True, key_t=key_t, ids=ids)
    neg = _topk(bif, corr, train[0], k, largest=False, key_t=key_t, ids=ids)
    return BlockResult(train[0], query[0], *pos, *neg)


def finalize_mixed(states: Moments | list[Moments], *, store: RunStore, name: str, rows: tuple[int, int],
                   cols: tuple[int, int], ddof: int, pooling: str) -> None:
    """Write -Cov of a mixed-level block (``bif_seq_tok`` or ``bif_tok_seq``) into its zarr region."""
    bif, _ = _negated_outputs(states, ddof=ddof, pooling=pooling, dtype=np.float64)
    arr = store.token_bif_array()
    arr.write(name, rows, cols, bif.astype(arr.dtype(name)))


@dataclass(frozen=True)
class TokenSummary:
    """What the token stage produced."""

    n_train_tokens: int
    n_query_tokens: int
    num_blocks: int
    topk_tokens: pd.DataFrame
    token_matrix_uri: str | None  # bif_tokens.zarr, or None when covariance.token_matrix is off

    def outputs(self) -> list[str]:
        """The files written (manifest key ``token_outputs``)."""
        return [S.TOKENS_FILE, S.TOPK_TOKENS_FILE] + ([S.BIF_TOKENS_ZARR] if self.token_matrix_uri else [])


def compute_token_bif(store: RunStore, cov: "CovarianceConfig", files: Sequence[BlockRef], *, dtype: str = "float32",
                      client: Any = None, max_in_flight: int | None = None, attrs: Mapping[str, Any] | None = None,
                      progress: Callable[[int, int], None] | None = None, leaf_draws: int = 1024) -> TokenSummary:
    """Reduce a token run's committed trace blocks to ``topk_tokens.parquet`` (and ``bif_tokens.zarr``).

    ``cov`` sets the block sizes (in tokens), tree fan-in, pooling, ddof, ``token_topk`` and
    ``token_matrix``. Scheduling as :func:`bif.tasks.covariance.compute_bif`: with a
    distributed ``client`` at most ``max_in_flight`` output blocks run at a time.
    """
    if not files:
        raise ValueError("no committed trace blocks to reduce")
    layout = store.read_layout(files[0])
    variables = layout.variables
    if not variables.is_tokens:
        raise ValueError(f"the traces of {store.uri!r} hold per-sample losses, not tokens")
    nt, nq = variables.num_variables(S.TRAIN), variables.num_variables(S.QUERY)
    n_train, n_query = variables.num_samples(S.TRAIN), variables.num_samples(S.QUERY)
    k = cov.token_topk or cov.topk
    tb, qb = cov.token_train_block_size or cov.train_block_size, cov.query_block_size
    fpl = max(1, leaf_draws // max(1, layout.num_draws))
    write = bool(cov.token_matrix)
    if write:
        store.create_token_bif(train_samples=variables.token_samples(S.TRAIN),
                               train_positions=variables.token_positions(S.TRAIN),
                               query_samples=variables.token_samples(S.QUERY),
                               query_positions=variables.token_positions(S.QUERY), n_train=n_train, n_query=n_query,
                               train_block=tb, query_block=qb, seq_block=cov.train_block_size, dtype=dtype,
                               attrs=dict(attrs or {}), compress=cov.compress)
    tt, qt = Level(S.TRAIN, True), Level(S.QUERY, True)
    finals = []
    for tr in _ranges(nt, tb):
        for qr in _ranges(nq, qb):
            finals.append(dask.delayed(finalize_tokens)(_merged(store, cov, files, tt, tr, qt, qr, fpl), store=store,
                                                        train=tr, query=qr, ddof=cov.ddof, k=k, pooling=cov.pooling,
                                                        write=write))
    if write:
        ts, qs = Level(S.TRAIN, False), Level(S.QUERY, False)
        for name, x, nx, xb, y, ny in ((S.BIF_SEQ_TOK, ts, n_train, cov.train_block_size, qt, nq),
                                       (S.BIF_TOK_SEQ, tt, nt, tb, qs, n_query)):
            for xr_ in _ranges(nx, xb):
                for yr_ in _ranges(ny, qb):
                    finals.append(dask.delayed(finalize_mixed)(_merged(store, cov, files, x, xr_, y, yr_, fpl),
                                                               store=store, name=name, rows=xr_, cols=yr_,
                                                               ddof=cov.ddof, pooling=cov.pooling))
    results = [r for r in compute_bounded(finals, client=client, max_in_flight=max_in_flight, progress=progress)
               if r is not None]
    table = topk_tokens_table(merge_topk(results, n_query=nq, k=k, n_train=nt), variables,
                              store.read_table(S.TOKENS_FILE, columns=[S.SPLIT, S.TOKEN]))
    store.write_table(S.TOPK_TOKENS_FILE, table)
    return TokenSummary(n_train_tokens=nt, n_query_tokens=nq, num_blocks=len(finals), topk_tokens=table,
                        token_matrix_uri=store.token_bif_uri if write else None)


def topk_tokens_table(topk: pd.DataFrame, variables: Variables, tokens: pd.DataFrame | None) -> pd.DataFrame:
    """merge_topk's table over token variables → the topk_tokens.parquet schema (coordinates and texts).

    ``tokens``: tokens.parquet (``split``, ``token`` in variable order); None gives "" texts.
    """
    qv = topk[S.QUERY].to_numpy(dtype=np.int64)
    tv = topk[S.TRAIN].to_numpy(dtype=np.int64)
    nt = variables.num_variables(S.TRAIN)
    t_samples, t_pos = variables.token_samples(S.TRAIN), variables.token_positions(S.TRAIN)
    q_samples, q_pos = variables.token_samples(S.QUERY), variables.token_positions(S.QUERY)
    if tokens is not None and len(tokens) == nt + variables.num_variables(S.QUERY):
        t_text = tokens[S.TOKEN].to_numpy(dtype=object)[:nt]
        q_text = tokens[S.TOKEN].to_numpy(dtype=object)[nt:]
    else:
        t_text = np.full(nt, "", dtype=object)
        q_text = np.full(variables.num_variables(S.QUERY), "", dtype=object)
    rendered = bool(len(t_text)) and any(t_text)
    bounds = variables.sample_var_bounds(S.TRAIN)
    context = [_context(t_text, int(v), int(bounds[t_samples[v]]), int(bounds[t_samples[v] + 1]))
               if rendered else "" for v in tv]
    out = pd.DataFrame({
        S.QUERY_SAMPLE: q_samples[qv], S.QUERY_POSITION: q_pos[qv], S.SIGN: topk[S.DIRECTION].to_numpy(),
        S.RANK: topk[S.RANK].to_numpy(dtype=np.int64), S.TRAIN_SAMPLE: t_samples[tv], S.TRAIN_POSITION: t_pos[tv],
        S.BIF: topk[S.BIF].to_numpy(dtype=np.float64), S.BIF_CORR: topk[S.BIF_CORR].to_numpy(dtype=np.float64),
        S.QUERY_TOKEN: q_text[qv].astype(str), S.TRAIN_TOKEN: t_text[tv].astype(str), S.TRAIN_CONTEXT: context,
    })
    return out.sort_values([S.QUERY_SAMPLE, S.QUERY_POSITION, S.SIGN, S.RANK],
                           ignore_index=True)[list(S.TOPK_TOKENS_COLUMNS)]


def _context(texts: np.ndarray, v: int, lo: int, hi: int) -> str:
    """Token ``v`` among its neighbours, marked; the space before it stays outside the mark ("the ⟦fish⟧ finds")."""
    left = "".join(texts[max(lo, v - CONTEXT_TOKENS):v])
    right = "".join(texts[v + 1:min(hi, v + 1 + CONTEXT_TOKENS)])
    token = str(texts[v])
    word = token.lstrip()
    return f"{left}{token[:len(token) - len(word)]}{S.CONTEXT_MARK[0]}{word}{S.CONTEXT_MARK[1]}{right}"


def show_tokens(store: RunStore, *, query: int, k: int) -> Any:
    """A rich Table of ``bif show --tokens``: per valid token of query sequence ``query``, its top-k train tokens."""
    from rich.table import Table

    from bif.errors import BifError

    df = store.read_table(S.TOPK_TOKENS_FILE)
    if df is None:
        raise BifError(f"{store.uri!r} has no {S.TOPK_TOKENS_FILE}: it is not a token run (its problem.loss returns "
                       "per-sample losses), or it predates per-token BIF")
    sel = df[(df[S.QUERY_SAMPLE] == query) & (df[S.RANK] < k)]
    if sel.empty:
        have = sorted(df[S.QUERY_SAMPLE].unique().tolist())
        raise BifError(f"query sequence {query} has no valid token in {store.uri} (query sequences with tokens: "
                       f"{have[:10]}{' ...' if len(have) > 10 else ''})")
    table = Table(title=f"query {query}: per token, the train tokens whose upweighting would raise (+) / lower (-) "
                        "its loss")
    for col in ("pos", "query token", "sign", "rank", "train", "train pos", "context", "bif"):
        table.add_column(col, justify="left" if col in ("query token", "context") else "right")
    for r in sel.itertuples(index=False):
        table.add_row(str(getattr(r, S.QUERY_POSITION)), getattr(r, S.QUERY_TOKEN).strip(),
                      "+" if getattr(r, S.SIGN) == "positive" else "-", str(getattr(r, S.RANK)),
                      str(getattr(r, S.TRAIN_SAMPLE)), str(getattr(r, S.TRAIN_POSITION)),
                      getattr(r, S.TRAIN_CONTEXT).strip(), f"{getattr(r, S.BIF):.4g}")
    return table

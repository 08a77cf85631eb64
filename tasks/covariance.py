"""BIF as a Dask map-reduce over trace blocks: mergeable moments → ``bif.zarr`` + top-k.

The output (n_train, n_query) is cut into blocks (train_block_size x query_block_size).
For each output block, every committed trace file contributes one leaf
(:func:`bif.moments.from_draws` on its draws); a ``dask.bag`` reduction with
``split_every`` merges the leaves (:func:`bif.moments.merge_all`), so Dask picks the
tree shape and the answer does not depend on it. A finalize step turns the merged state
into ``bif = -Cov`` and ``bif_corr = -Corr``, writes that region of the zarr store, and
returns the block's top-k candidates and which of its samples had a constant loss trace.

Constant traces (zero variance over all pooled draws, e.g. a float32 cross-entropy of
exactly 0.0 at every draw) are a legitimate state: their ``bif`` is 0 and their
``bif_corr`` is defined as 0 (never NaN); ``bif.zarr`` flags them in the boolean variables
``train_constant`` (dim train) and ``query_constant`` (dim query).

Top-k (``topk.parquet``): per query, the train examples are put in one total order,
``bif`` descending with ties broken by the smaller train id; ``positive`` lists its first
``min(k, ceil(n_train / 2))`` examples and ``negative`` its last ``min(k, floor(n_train / 2))``
(most negative first). The two lists never share an example, also when n_train < 2k
or when many values tie (a constant query trace makes a whole column 0). Memory is bounded by the block size and the number
of blocks in flight, never by n_train.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import dask
import dask.bag as db
import numpy as np
import pandas as pd

from bif import schema as S
from bif.moments import Moments, inv_sqrt, mean_of_covariances, merge_all
from bif.store.run import BifArray, BlockRef, RunStore

if TYPE_CHECKING:
    from bif.config import CovarianceConfig


@dataclass(frozen=True)
class BlockResult:
    """Top-k candidates of one output block (k may be smaller than requested for small blocks)."""

    train_start: int
    query_start: int
    pos_train: np.ndarray  # (k, bq) train ids with the largest bif per query
    pos_bif: np.ndarray  # (k, bq)
    pos_corr: np.ndarray  # (k, bq)
    neg_train: np.ndarray  # (k, bq) train ids with the smallest bif per query
    neg_bif: np.ndarray
    neg_corr: np.ndarray
    train_constant: np.ndarray | None = None  # (bt,) bool: the train sample's trace is constant
    query_constant: np.ndarray | None = None  # (bq,) bool


@dataclass(frozen=True)
class CovarianceSummary:
    """What the covariance stage produced."""

    n_train: int
    n_query: int
    num_blocks: int
    bif_uri: str
    topk: pd.DataFrame
    train_constant: np.ndarray | None = None  # (n_train,) bool, as written to bif.zarr
    query_constant: np.ndarray | None = None  # (n_query,) bool

    def constant_counts(self) -> dict[str, dict[str, float | int]]:
        """Number and share of constant-trace samples per split (JSON-able)."""
        return constant_counts(self.train_constant, self.query_constant)


def constant_counts(train_constant: np.ndarray | None, query_constant: np.ndarray | None
                    ) -> dict[str, dict[str, float | int]]:
    """{"train": {"count", "total", "share"}, "query": {...}} of boolean constant flags (share 0 when empty)."""
    out = {}
    for split, flags in ((S.TRAIN, train_constant), (S.QUERY, query_constant)):
        f = np.zeros(0, dtype=bool) if flags is None else np.asarray(flags, dtype=bool)
        out[split] = {"count": int(f.sum()), "total": int(f.size), "share": float(f.mean()) if f.size else 0.0}
    return out


def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def even_batches(items: Sequence[Any], count: int) -> list[list[Any]]:
    """``items`` cut into at most ``count`` runs of consecutive items whose sizes differ by at most one, none empty."""
    if not items:
        return []
    count = max(1, min(count, len(items)))
    size, extra = divmod(len(items), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def leaf_moments(store: RunStore, refs: Sequence[BlockRef], train: tuple[int, int],
                 query: tuple[int, int], *, gemm_dtype: str | None = None) -> Moments:
    """Moments of a few trace blocks (their draws stacked) restricted to a train range and a query range.

    Stacking files into one leaf makes one deeper GEMM instead of several thin GEMMs plus merges.
    ``gemm_dtype``: the GEMM's dtype (:func:`bif.moments.from_draws`; default float64). A float32 GEMM takes the
    draws as the files store them, a row per variable, into :func:`bif.block_ops.row_moments` (the same state,
    without transposing them into float64 first); a float64 GEMM keeps :func:`~bif.moments.from_draws`.
    """
    from bif.moments import from_draws

    ranges = {S.TRAIN: train, S.QUERY: query}
    if np.dtype(gemm_dtype or np.float64) == np.float32:
        from bif.block_ops import row_moments

        parts = [store.read_loss_ranges(r, ranges, by_variable=True) for r in refs]  # one open per file
        if len(parts) == 1:
            return row_moments(parts[0][S.TRAIN], parts[0][S.QUERY])
        x = np.concatenate([p[S.TRAIN] for p in parts], axis=1)  # (a, D): our own copy, centred in place
        y = np.concatenate([p[S.QUERY] for p in parts], axis=1)  # (b, D)
        return row_moments(x, y, overwrite=True)
    parts = [store.read_loss_ranges(r, ranges) for r in refs]  # one open per file
    x = np.concatenate([p[S.TRAIN] for p in parts])  # (D, a)
    y = np.concatenate([p[S.QUERY] for p in parts])  # (D, b)
    return from_draws(x, y, dtype=gemm_dtype)


def _topk(values: np.ndarray, corr: np.ndarray, train_start: int, k: int, largest: bool,
          key_t: np.ndarray | None = None, ids: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k rows per column of ``values`` (a, b), best first: (row index + train_start, values, corr), each (k, b).

    Rows are ranked in one total order: ``values`` descending, ties broken by the smaller
    train id (``ids``: (a,) or (a, b); default the row index). ``largest`` takes the first
    k of that order, otherwise the last k, most negative first; so the two directions are
    disjoint whenever 2k <= a, however many values tie. ``key_t`` may pass ``values.T`` as a
    C-contiguous copy.
    """
    a, b = values.shape
    k = min(k, a)
    key = np.ascontiguousarray(values.T) if key_t is None else key_t  # (b, a): select along contiguous rows
    tie = (np.broadcast_to(np.arange(a)[None, :], (b, a)) if ids is None
           else np.broadcast_to(ids.T if ids.ndim == 2 else ids[None, :], (b, a)))  # (b, a) tie-break ids
    idx = _select(key, tie, k, largest) if 0 < k < a else np.tile(np.arange(a), (b, 1))[:, :k]
    sel = np.take_along_axis(key, idx, axis=1)
    sel_tie = np.take_along_axis(tie, idx, axis=1)
    order = np.lexsort((sel_tie, -sel), axis=1) if largest else np.lexsort((-sel_tie, sel), axis=1)
    idx = np.take_along_axis(idx, order, axis=1).T  # (k, b)
    return (idx + train_start, np.take_along_axis(values, idx, axis=0), np.take_along_axis(corr, idx, axis=0))


def _select(key: np.ndarray, tie: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Column indices (b, k), unordered, of the first (``largest``) or last k of each row of ``key`` (b, a) in the
    total order of :func:`_topk`; 0 < k < a.

    Most rows have exactly k values at or beyond their k-th value (noisy floats rarely tie): a
    value-only partition finds that value and a mask the k, about 4 ms per direction on a
    1,000 x 3,334 float32 block against 10 ms for ``argpartition`` (whose int64 index array doubles
    the data it moves). Rows where values tie at the k-th (a constant query trace makes a whole row
    0) or NaN sits take ``argpartition`` and :func:`_select_with_ties`.
    """
    b, a = key.shape
    kth = a - k if largest else k - 1
    thr = np.partition(key, kth, axis=1)[:, kth:kth + 1]  # (b, 1) the k-th value
    beyond = key >= thr if largest else key <= thr
    hit = np.flatnonzero(beyond)  # row-major: each row's hits in column order
    if hit.size == b * k and np.array_equal(rows := hit // a, np.repeat(np.arange(b), k)):
        return (hit - rows * a).reshape(b, k)
    clean = np.count_nonzero(beyond, axis=1) == k
    idx = np.empty((b, k), dtype=np.intp)
    if clean.any():
        hit = np.flatnonzero(beyond[clean])
        idx[clean] = (hit % a).reshape(-1, k)
    rest = np.flatnonzero(~clean)
    part = np.argpartition(key[rest], kth, axis=1)
    idx[rest] = part[:, a - k:] if largest else part[:, :k]
    thr = np.take_along_axis(key[rest], part[:, kth:kth + 1], axis=1)  # the k-th value (NaN-aware order)
    tied = np.flatnonzero(np.count_nonzero(key[rest] == thr, axis=1) > 1)  # rows where ties cross the cut
    if tied.size:
        rows = rest[tied]
        idx[rows] = _select_with_ties(key[rows], thr[tied], tie[rows], k, largest)
    return idx


def _select_with_ties(key: np.ndarray, thr: np.ndarray, tie: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Column indices (r, k) of the k best per row of ``key`` (r, a) with ties at ``thr`` (r, 1) taken in ``tie`` order."""
    r, a = key.shape
    strict = key > thr if largest else key < thr
    need = k - strict.sum(axis=1, keepdims=True)  # ties at the threshold still to take, (r, 1)
    at = key == thr
    # ties taken in tie-id order: the smallest ids for the largest values, the largest ids for the smallest
    order = np.argsort(tie if largest else -tie, axis=1, kind="stable")
    rank_in_ties = np.empty((r, a), dtype=np.int64)
    np.put_along_axis(rank_in_ties, order, np.cumsum(np.take_along_axis(at, order, axis=1), axis=1), axis=1)
    pick = strict | (at & (rank_in_ties <= need))
    return np.nonzero(pick)[1].reshape(r, k)  # exactly k per row, in column order


def _pooled_constant(states: Moments | list[Moments], which: str) -> np.ndarray:
    """Constant over all pooled draws: every chain's m2 is 0 and all chains share one mean. ``which`` 'x' or 'y'."""
    from bif.moments import constant

    seq = [states] if isinstance(states, Moments) else list(states)
    flags = np.logical_and.reduce([constant(getattr(m, f"m2_{which}")) for m in seq])
    first = getattr(seq[0], f"mean_{which}")
    for m in seq[1:]:
        flags &= getattr(m, f"mean_{which}") == first
    return flags


def _negated_outputs(states: Moments | list[Moments], *, ddof: int, pooling: str, dtype: np.dtype
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(bif, bif_corr) of a block in the output dtype, computed in float64 with few passes."""
    if pooling == "chain_mean":
        cov, corr = mean_of_covariances(states, ddof=ddof)
        return (-cov).astype(dtype), (0.0 - corr).astype(dtype)
    m: Moments = states
    if m.n - ddof <= 0:
        raise ValueError(f"need more than {ddof} draws for a covariance, got n={m.n}")
    bif = np.multiply(m.comoment, -1.0 / (m.n - ddof), dtype=dtype)
    # a constant trace (m2 = 0) has correlation 0 by definition (bif.moments.correlation)
    inv_x, inv_y = inv_sqrt(m.m2_x), inv_sqrt(m.m2_y)
    corr = np.multiply(m.comoment, -inv_x[:, None], dtype=dtype)
    corr *= inv_y[None, :].astype(dtype)
    corr += 0.0  # -0.0 -> 0.0 where a trace is constant
    np.clip(corr, -1.0, 1.0, out=corr)
    return bif, corr


def _block_outputs(states: Moments | list[Moments], *, ddof: int, pooling: str, dtype: np.dtype
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(bif, bif_corr) of a block: one compiled pass (:func:`bif.block_ops.stack_outputs`, bit for bit the numpy
    result) for a pooled state and a float32 output, else :func:`_negated_outputs`.

    On a 3,334 x 1,000 block: 0.9 ms against 6 ms for numpy's six passes and their temporaries.
    """
    if pooling == "stack" and np.dtype(dtype) == np.float32 and states.n - ddof > 0:
        from bif.block_ops import stack_outputs

        out = stack_outputs(states.comoment, n=states.n, ddof=ddof, m2_x=states.m2_x, m2_y=states.m2_y)
        if out is not None:
            return out
    return _negated_outputs(states, ddof=ddof, pooling=pooling, dtype=dtype)


def _topk_both(values: np.ndarray, corr: np.ndarray, train_start: int, k: int
               ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Both directions of a block's top-k, exactly as ``_topk(..., largest=True)`` and ``largest=False`` with the
    rows as tie-break ids: ((ids, values, corr), (ids, values, corr)), each (min(k, a), b).

    :func:`bif.block_ops.topk_rows` selects them in three passes without transposing or partitioning the block
    (4-5 ms on a 3,334 x 1,000 float32 block against 13-19 ms); the columns it declines (ties past its buffer) and
    blocks with a non-finite value or in float64 take :func:`_topk`.
    """
    from bif.block_ops import topk_rows

    found = topk_rows(values, k)
    if found is None:
        key_t = np.ascontiguousarray(values.T)  # (b, a)
        # one partition per direction: numpy's argpartition at two cuts at once measured 3-4x slower than two cuts
        return (_topk(values, corr, train_start, k, largest=True, key_t=key_t),
                _topk(values, corr, train_start, k, largest=False, key_t=key_t))
    pos, neg, ok = found  # (kk, b) row indices
    if not ok.all():
        cols = np.flatnonzero(~ok)
        sub, sub_corr = values[:, cols], corr[:, cols]
        pos[:, cols] = _topk(sub, sub_corr, 0, k, largest=True)[0]
        neg[:, cols] = _topk(sub, sub_corr, 0, k, largest=False)[0]
    return tuple((idx + train_start, np.take_along_axis(values, idx, axis=0), np.take_along_axis(corr, idx, axis=0))
                 for idx in (pos, neg))


def finalize_block(states: Moments | list[Moments], *, store: RunStore, train: tuple[int, int],
                   query: tuple[int, int], ddof: int, k: int, pooling: str, array: BifArray | None = None
                   ) -> BlockResult:
    """Merged moments → bif / bif_corr block → zarr region; returns the block's top-k candidates.

    ``bif = -C/(n - ddof)``, ``bif_corr = -C/sqrt(m2_x m2_yᵀ)`` (0 where a trace is constant;
    see :mod:`bif.moments`). ``array``: ``bif.zarr`` already open (:meth:`RunStore.bif_array`), else opened here.
    """
    array = array if array is not None else store.bif_array()
    bif, bif_corr = _block_outputs(states, ddof=ddof, pooling=pooling, dtype=array.dtype)
    array.write_region(train, query, bif, bif_corr)
    pos, neg = _topk_both(bif, bif_corr, train[0], k)
    return BlockResult(train[0], query[0], *pos, *neg, train_constant=_pooled_constant(states, "x"),
                       query_constant=_pooled_constant(states, "y"))


def _groups(files: Sequence[BlockRef], pooling: str) -> list[list[BlockRef]]:
    """The files whose draws pool into one state: all of them ('stack'), or each chain's ('chain_mean')."""
    if pooling == "stack":
        return [list(files)]
    return [[f for f in files if f.chain == c] for c in sorted({f.chain for f in files})]


def _one_leaf_per_group(groups: Sequence[Sequence[BlockRef]], files_per_leaf: int) -> bool:
    """Whether each group's files make one leaf: then a block is one task (:func:`reduce_block`), no reduction tree."""
    return all(len(g) <= files_per_leaf for g in groups)


def reduce_block(store: RunStore, groups: Sequence[Sequence[BlockRef]], train: tuple[int, int],
                 query: tuple[int, int], *, gemm_dtype: str | None, ddof: int, k: int, pooling: str,
                 array: BifArray | None = None) -> BlockResult:
    """One output block in one task, when each group of files (all files, or one chain's) makes one leaf:
    its leaves (:func:`leaf_moments`) and :func:`finalize_block`, with no task boundary between them."""
    states = [leaf_moments(store, refs, train, query, gemm_dtype=gemm_dtype) for refs in groups]
    return finalize_block(states[0] if pooling == "stack" else states, store=store, train=train, query=query,
                          ddof=ddof, k=k, pooling=pooling, array=array)


def build_graph(store: RunStore, cov: "CovarianceConfig", files: Sequence[BlockRef], *, n_train: int,
                n_query: int, files_per_leaf: int = 1, gemm_dtype: str | None = None,
                array: BifArray | None = None) -> list[Any]:
    """One task per output block, evaluating to a BlockResult: a dask Delayed, or a :func:`functools.partial` of
    :func:`reduce_block` when each block is one task (:func:`compute_bounded` submits those as they are).

    Leaves read ``files_per_leaf`` consecutive blocks (of one chain when pooling per chain) and
    run their GEMM in ``gemm_dtype`` (default float64). ``array``: ``bif.zarr`` open, handed to every block
    (else each block opens it).
    """
    if not files:
        raise ValueError("no committed trace blocks to reduce")
    pooling = cov.pooling
    groups = _groups(files, pooling)
    fused = _one_leaf_per_group(groups, files_per_leaf)
    finals = []
    for tr in _ranges(n_train, cov.train_block_size):
        for qr in _ranges(n_query, cov.query_block_size):
            if fused:  # one leaf per group: the whole block in one task, a plain call (see compute_bounded)
                finals.append(partial(reduce_block, store, groups, tr, qr, gemm_dtype=gemm_dtype, ddof=cov.ddof,
                                      k=cov.topk, pooling=pooling, array=array))
                continue
            states = []
            for group in groups:
                chunks = [group[i:i + files_per_leaf] for i in range(0, len(group), files_per_leaf)]
                if len(chunks) == 1:  # one leaf: no reduction tree (a bag adds a task and a scheduler round trip)
                    states.append(dask.delayed(leaf_moments)(store, chunks[0], tr, qr, gemm_dtype=gemm_dtype))
                    continue
                bag = db.from_sequence(chunks, npartitions=len(chunks))
                leaves = bag.map(lambda refs, tr=tr, qr=qr: leaf_moments(store, refs, tr, qr, gemm_dtype=gemm_dtype))
                states.append(leaves.reduction(merge_all, merge_all, split_every=cov.split_every).to_delayed())
            state = states[0] if pooling == "stack" else dask.delayed(list)(states)
            finals.append(dask.delayed(finalize_block)(state, store=store, train=tr, query=qr, ddof=cov.ddof,
                                                       k=cov.topk, pooling=pooling, array=array))
    return finals


def merge_topk(results: Sequence[BlockResult], *, n_query: int, k: int, n_train: int | None = None
               ) -> pd.DataFrame:
    """Global top-k per query from the blocks' candidates → the topk.parquet table.

    ``positive`` keeps ``min(k, ceil(n_train / 2))`` rows per query and ``negative``
    ``min(k, floor(n_train / 2))``: both ends of one total order, so no train example is
    listed in both (see the module docstring). ``n_train`` defaults to the blocks' extent.
    """
    if n_train is None:
        n_train = max((r.train_start + (len(r.train_constant) if r.train_constant is not None else
                                        r.pos_train.shape[0]) for r in results), default=0)
    k_dir = {True: min(k, -(-n_train // 2)), False: min(k, n_train // 2)}
    by_q: dict[int, list[BlockResult]] = {}
    for r in results:
        by_q.setdefault(r.query_start, []).append(r)
    # built in the table's order (query, direction, rank; 'negative' sorts before 'positive'), each query's rows
    # one row of a (queries, ranks) array: no sort, and no frame per piece (10 -> 5 ms for 40,000 rows)
    cols: dict[str, list[np.ndarray]] = {c: [] for c in S.TOPK_COLUMNS}
    for q0, rs in sorted(by_q.items()):
        picked = []
        for largest in (False, True):
            pre = "pos" if largest else "neg"
            ids = np.concatenate([getattr(r, f"{pre}_train") for r in rs])
            val = np.concatenate([getattr(r, f"{pre}_bif") for r in rs])
            cor = np.concatenate([getattr(r, f"{pre}_corr") for r in rs])
            top_pos, top_val, top_cor = _topk(val, cor, 0, k_dir[largest], largest, ids=ids)
            picked.append((np.take_along_axis(ids, top_pos, axis=0), top_val, top_cor))  # each (kk, bq)
        (neg_ids, neg_val, neg_cor), (pos_ids, pos_val, pos_cor) = picked
        k_neg, bq = neg_val.shape
        k_pos = pos_val.shape[0]
        cols[S.QUERY].append(np.repeat(np.arange(q0, q0 + bq), k_neg + k_pos))
        cols[S.DIRECTION].append(np.tile(np.repeat(np.array([0, 1], dtype=np.int8), (k_neg, k_pos)), bq))
        cols[S.RANK].append(np.tile(np.concatenate([np.arange(k_neg), np.arange(k_pos)]), bq))
        cols[S.TRAIN].append(np.concatenate([neg_ids.T, pos_ids.T], axis=1).reshape(-1))
        cols[S.BIF].append(np.concatenate([neg_val.T, pos_val.T], axis=1).reshape(-1).astype(np.float64))
        cols[S.BIF_CORR].append(np.concatenate([neg_cor.T, pos_cor.T], axis=1).reshape(-1).astype(np.float64))
    cols[S.DIRECTION] = [_directions(np.concatenate(cols[S.DIRECTION]))]
    return pd.DataFrame({c: np.concatenate(v) if len(v) > 1 else v[0] for c, v in cols.items()})


def _directions(codes: np.ndarray) -> Any:
    """The direction column from codes (0 'negative', 1 'positive'), of the dtype pandas gives strings: with pandas
    >= 3 an Arrow-backed ``str`` column, taken in Arrow (0.5 ms for 40,000 rows against 2.5 ms converting Python
    strings); else an object array."""
    names = np.array(["negative", "positive"], dtype=object)
    dtype = pd.Series(names).dtype
    if getattr(dtype, "storage", None) == "pyarrow":
        import pyarrow as pa

        return pd.array(pa.array(names, pa.large_string()).take(pa.array(codes)), dtype=dtype)
    return names[codes]


def _verify_blocks(store: RunStore, refs: Sequence[BlockRef]) -> None:
    """StorageError naming the first of ``refs`` whose trace file fails its checksum (a Dask task beside the reduction)."""
    store.verify_blocks(list(refs))


def _verify_tasks(store: RunStore, files: Sequence[BlockRef], slots: int) -> list[Any]:
    """The checksum checks of ``files`` as about two Delayed per slot, each checking a run of consecutive files.

    One task per file cost the scheduler and the workers a few ms each, more than a small file's hash.
    """
    return [dask.delayed(_verify_blocks, pure=False)(store, batch) for batch in even_batches(files, 2 * slots)]


def _slots(client: Any, max_in_flight: int | None) -> int:
    """Output blocks computed at once: ``max_in_flight``, else one per worker of ``client`` (1 without one)."""
    if max_in_flight:
        return max_in_flight
    return max(1, len(client.scheduler_info().get("workers", {}))) if client is not None else 1


def balanced_train_block(n_train: int, train_block: int, query_blocks: int, slots: int) -> int:
    """The train block size the reduction uses: at most ``train_block``, and small enough that the number of
    output blocks is a multiple of ``slots`` (the blocks computed at once), so that no round leaves a worker idle.

    Five blocks of 4,096 on two workers take three rounds, the last with one worker idle; six blocks
    of 3,334 take three full rounds of less work each. Smaller blocks only lower the memory bound.
    """
    blocks = max(1, -(-n_train // train_block))
    if slots <= 1 or n_train <= 1:
        return min(train_block, max(n_train, 1))
    want = blocks
    while (want * query_blocks) % slots and want < n_train:
        want += 1
    if want == blocks:
        return min(train_block, n_train)
    size = -(-n_train // want)
    # ceil division can give fewer blocks than asked for (n=9 in 6 -> size 2 -> 5 blocks): keep the configured size then
    return size if -(-n_train // size) == want else min(train_block, n_train)


def _delayed(final: Any) -> Any:
    """A task of :func:`build_graph` as a Delayed (a partial: its call)."""
    return dask.delayed(final.func)(*final.args, **final.keywords) if isinstance(final, partial) else final


def _submit(client: Any, finals: Sequence[Any]) -> list[Any]:
    """Tasks of :func:`build_graph` on ``client``'s cluster, as futures: a partial is submitted as a plain call (2.7
    against 8.5 ms of this process for four blocks as Delayed: no graph to build, optimise and pack)."""
    calls = [f for f in finals if isinstance(f, partial)]
    graphs = [f for f in finals if not isinstance(f, partial)]
    return ([client.submit(f.func, *f.args, pure=False, **f.keywords) for f in calls]
            + (client.compute(graphs) if graphs else []))


def compute_bounded(finals: Sequence[Any], *, client: Any, max_in_flight: int | None,
                    progress: Callable[[int, int], None] | None, beside: Sequence[Any] = (),
                    after_submit: Callable[[], None] | None = None) -> list[Any]:
    """Compute ``finals`` (Delayed, or partials of plain calls), at most ``max_in_flight`` at a time; results in
    completion order.

    ``beside``: Delayed run alongside (the checksum checks) with the first batch, on the local scheduler only
    (their errors raise); on a cluster the caller submits them itself (:func:`compute_bif` does, before it
    creates bif.zarr). ``after_submit``: called once the first blocks are on the cluster, while they run (on the
    local scheduler: before they run).
    """
    total, results = len(finals), []
    if client is None:
        if after_submit is not None:
            after_submit()
        step = max_in_flight or total
        pending_beside = list(beside)
        for s in range(0, total, step):
            *done, _ = dask.compute(*map(_delayed, finals[s:s + step]), pending_beside)
            pending_beside = []
            results.extend(done)
            if progress:
                progress(len(results), total)
        return results
    from distributed import as_completed

    if beside:
        raise ValueError("beside is for the local scheduler; on a cluster, submit those tasks yourself")
    limit = max_in_flight or _slots(client, None)
    pending = list(finals)
    futures = as_completed(_submit(client, pending[:limit]), loop=client.loop)
    pending = pending[limit:]
    if after_submit is not None:
        after_submit()
    for fut in futures:
        results.append(fut.result())
        fut.release()
        if pending:
            futures.update(_submit(client, [pending.pop(0)]))
        if progress:
            progress(len(results), total)
    return results


def compute_bif(store: RunStore, cov: "CovarianceConfig", files: Sequence[BlockRef], *, n_train: int,
                n_query: int, dtype: str = "float32", client: Any = None, max_in_flight: int | None = None,
                attrs: Mapping[str, Any] | None = None, progress: Callable[[int, int], None] | None = None,
                leaf_draws: int = 1024, gemm_dtype: str | None = None, verify: bool = False) -> CovarianceSummary:
    """Reduce the committed trace blocks ``files`` of ``store`` to its ``bif.zarr`` and the top-k table.

    ``cov`` (the run's ``covariance`` config) sets the block sizes, tree fan-in, pooling, ddof,
    top-k and compression; ``n_train`` / ``n_query`` are the run's sample counts. With a distributed
    ``client`` the blocks run on its cluster, at most ``max_in_flight`` output blocks at a
    time (bounding memory); otherwise Dask's local threaded scheduler runs them.
    ``progress(done, total)`` is called as blocks finish. Leaves stack about ``leaf_draws``
    draws (memory ~ leaf_draws x (train_block + query_block) x 8 bytes).

    ``gemm_dtype`` (default: the output ``dtype``): the leaves' GEMM dtype. A float32 output
    gets float32 GEMMs, whose rounding (~1e-6 of a correlation, see
    :func:`bif.moments.from_draws`) is of the order of the float32 output's own; a float64
    output keeps float64 end to end. ``verify``: check every file's checksum as Dask tasks
    running beside the reduction (instead of a separate pass before it); a damaged file
    raises :class:`bif.errors.StorageError` naming it, also when reading it failed first.
    """
    k = cov.topk
    slots = _slots(client, max_in_flight)
    checks = _verify_tasks(store, files, slots) if verify and files else []
    # on a cluster the checksum checks start now, on workers that would idle while this process creates bif.zarr
    early = client.compute(checks, priority=-1) if checks and client is not None else []
    tb = balanced_train_block(n_train, cov.train_block_size, len(_ranges(n_query, cov.query_block_size)), slots)
    if tb != cov.train_block_size:
        cov = cov.model_copy(update={"train_block_size": tb})
    # the group and the two output arrays only: the coordinates and flags are created while the first blocks run
    array = store.create_bif(n_train=n_train, n_query=n_query, train_block=cov.train_block_size,
                             query_block=cov.query_block_size, dtype=dtype, attrs=attrs or {}, compress=cov.compress,
                             coordinates=not files)
    if not files:
        raise ValueError("no committed trace blocks to reduce")
    draws_per_file = max(1, store.read_layout(files[0]).num_draws)
    files_per_leaf = max(1, leaf_draws // draws_per_file)
    # every block gets ``array``: no worker reads the zarr metadata again
    finals = build_graph(store, cov, files, n_train=n_train, n_query=n_query, files_per_leaf=files_per_leaf,
                         gemm_dtype=gemm_dtype or dtype, array=array)
    if not max_in_flight and _one_leaf_per_group(_groups(files, cov.pooling), files_per_leaf):
        # one task per block (reduce_block) holds memory only while it runs: one block queued per slot lets a
        # worker start its next block at once instead of after a round trip through this process (10-15 ms)
        max_in_flight = 2 * slots
    total = len(finals)
    try:
        results = compute_bounded(finals, client=client, max_in_flight=max_in_flight, progress=progress,
                                  beside=checks if client is None else (),
                                  after_submit=lambda: array.create_coordinates(n_train, n_query))
        if any(f.status != "finished" for f in early):  # finished checks returned None: no round trip to ask
            client.gather(early)
    except Exception:
        if early:  # a damaged file is the better explanation of a failed read
            client.gather(early)
        elif verify:
            dask.compute(*checks)
        raise
    topk = merge_topk(results, n_query=n_query, k=k, n_train=n_train)
    train_constant, query_constant = np.zeros(n_train, dtype=bool), np.zeros(n_query, dtype=bool)
    for r in results:
        train_constant[r.train_start:r.train_start + len(r.train_constant)] = r.train_constant
        query_constant[r.query_start:r.query_start + len(r.query_constant)] = r.query_constant
    array.write_constant_flags(train_constant, query_constant)
    return CovarianceSummary(n_train=n_train, n_query=n_query, num_blocks=total, bif_uri=store.bif_uri, topk=topk,
                             train_constant=train_constant, query_constant=query_constant)

"""Per-chunk aggregates of a 2-D result array, computed by Dask: the cheap input of the result gates.

For each (train, query) chunk: the count of non-finite values (and the first one's
position), and the min and max of the finite values with their positions. The quality
gates then validate a frame with one row per chunk instead of n_train x n_query values.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

#: Chunking of an in-memory (numpy) array.
DEFAULT_CHUNKS = (4096, 1024)


def block_stats(block: np.ndarray, t0: int, q0: int) -> dict[str, Any]:
    """Aggregates of one (train, query) chunk: count of non-finite values, min and max with their positions.

    A float32 / float64 chunk (bif.zarr's) in one compiled pass (:func:`_block_stats_compiled`), any other in
    numpy (:func:`_block_stats_numpy`): the same dict.
    """
    a = np.asarray(block)
    if a.dtype in (np.float32, np.float64) and a.ndim == 2:  # bif.zarr's arrays: one compiled pass
        return _block_stats_compiled(a, t0, q0)
    return _block_stats_numpy(a, t0, q0)


def _block_stats_numpy(a: np.ndarray, t0: int, q0: int) -> dict[str, Any]:
    """:func:`block_stats` in numpy (any dtype; the compiled pass's reference in the tests)."""
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    finite = np.isfinite(a)
    n_bad = int(a.size - np.count_nonzero(finite))
    out: dict[str, Any] = {"train_start": t0, "query_start": q0, "n_nonfinite": n_bad,
                           "bad_train": -1, "bad_query": -1, "bad_value": np.nan}
    if n_bad:
        i, j = np.argwhere(~finite)[0]
        out.update(bad_train=t0 + int(i), bad_query=q0 + int(j), bad_value=float(a[i, j]))
    for name, fill, arg in (("min", np.inf, np.argmin), ("max", -np.inf, np.argmax)):
        masked = np.where(finite, a, fill) if n_bad else a
        i, j = np.unravel_index(arg(masked), a.shape) if a.size else (0, 0)
        ok = a.size and np.isfinite(masked[i, j])
        out.update({name: float(masked[i, j]) if ok else np.nan, f"{name}_train": t0 + int(i) if ok else -1,
                    f"{name}_query": q0 + int(j) if ok else -1})
    return out


def _block_stats_compiled(a: np.ndarray, t0: int, q0: int) -> dict[str, Any]:
    """:func:`block_stats` of a 2-D float32 / float64 chunk from :func:`bif.quality.kernels.finite_extremes`: the same
    dict (16 MB chunks of a 50k x 500 run: one pass instead of four)."""
    from bif.quality.kernels import finite_extremes

    n_bad, first, lo, hi = finite_extremes(a)
    cols = a.shape[1]
    out: dict[str, Any] = {"train_start": t0, "query_start": q0, "n_nonfinite": n_bad,
                           "bad_train": -1, "bad_query": -1, "bad_value": np.nan}
    if n_bad:
        i, j = divmod(first, cols)
        out.update(bad_train=t0 + i, bad_query=q0 + j, bad_value=float(a[i, j]))
    for name, k in (("min", lo), ("max", hi)):
        if k < 0:  # no finite value
            out.update({name: np.nan, f"{name}_train": -1, f"{name}_query": -1})
        else:
            i, j = divmod(k, cols)
            out.update({name: float(a[i, j]), f"{name}_train": t0 + i, f"{name}_query": q0 + j})
    return out


def chunk_stats_tasks(arr: Any) -> list[Any]:
    """Delayed :func:`block_stats` of every chunk of a 2-D (dask or numpy) array."""
    import dask
    import dask.array as da

    darr = arr if isinstance(arr, da.Array) else da.from_array(np.asarray(arr), chunks=DEFAULT_CHUNKS)
    t_off, q_off = (np.r_[0, np.cumsum(c)[:-1]] for c in darr.chunks)
    blocks = darr.to_delayed()  # (n_train_chunks, n_query_chunks) of Delayed
    return [dask.delayed(block_stats)(blocks[i, j], int(t_off[i]), int(q_off[j]))
            for i in range(blocks.shape[0]) for j in range(blocks.shape[1])]


def _first_key(split_idx: np.ndarray, sample: np.ndarray, draw: np.ndarray, mask: np.ndarray,
               loss: np.ndarray | None = None) -> str:
    """'draw=D split=S sample=I [loss=V]' of the first row where ``mask`` holds, or ''."""
    hits = np.flatnonzero(mask)
    if not hits.size:
        return ""
    i = hits[0]
    split = ("train", "query")[int(split_idx[i])] if 0 <= split_idx[i] <= 1 else f"#{split_idx[i]}"
    text = f"draw={int(draw[i])} split={split} sample={int(sample[i])}"
    return text + (f" loss={float(loss[i]):.6g}" if loss is not None else "")


def trace_block_stats(table: Any, *, chain: int, block: int, draw_start: int, num_draws: int, n_train: int,
                      n_query: int, loss_bounds: tuple[float, float], loss_dtype: str = "float32") -> dict[str, Any]:
    """Aggregates of one trace file (a pyarrow Table in the :mod:`bif.schema` layout), O(rows) numpy.

    Counts (and the first offending row of each): nulls in the key columns, non-finite
    losses, losses outside ``loss_bounds``, rows of another chain, keys out of range,
    duplicated and missing (draw, split, sample) keys, with key = (split, sample, draw) over
    draws [draw_start, draw_start + num_draws). ``schema_ok``: names and types match.
    """
    from bif import schema as S
    from bif.sampling.measure import Variables

    variables = Variables.of_samples(n_train=n_train, n_query=n_query)  # row offsets: bif.sampling.measure
    tokens = _token_variables(table.schema)  # token runs: the valid tokens the file's footer declares
    if tokens is not None and tokens.sample_counts == (n_train, n_query):
        variables = tokens
    expected = S.trace_schema(loss_dtype, tokens=tokens is not None)
    names_ok = table.schema.names == expected.names
    out: dict[str, Any] = {"chain": chain, "block": block, "rows": table.num_rows,
                           "expected_rows": variables.num_rows(num_draws),
                           "schema_ok": bool(names_ok and all(table.schema.field(f.name).type == f.type
                                                              for f in expected))}
    if not names_ok:
        return out
    cols = {k: table.column(k) for k in expected.names}
    out["n_null_keys"] = int(sum(cols[k].null_count for k in (S.CHAIN, S.DRAW, S.SPLIT, S.SAMPLE)))
    split_idx = _split_indices(cols[S.SPLIT])
    low, high = loss_bounds
    loss = cols[S.LOSS].to_numpy(zero_copy_only=False)  # nulls become NaN
    if not all(np.isinf(v) or loss.dtype.type(v) == v for v in (low, high)):  # a bound float32 cannot hold exactly
        loss = loss.astype(np.float64)
    bad = ~np.isfinite(loss)
    oob = ~bad & ((loss < low) | (loss > high))
    if out["rows"] == out["expected_rows"] and not out["n_null_keys"]:
        # fast path: the keys are exactly the written layout (the usual case), checked by equality instead of
        # counting every key; any difference falls through to the counts below, which name the first offender
        keys = variables.row_keys(num_draws)
        raw = {k: cols[k].to_numpy() for k in (S.CHAIN, S.DRAW, S.SAMPLE)}
        same_positions = (not variables.is_tokens
                          or np.array_equal(cols[S.POSITION].to_numpy(), keys.position))
        if (same_positions and np.array_equal(split_idx, keys.split) and np.array_equal(raw[S.SAMPLE], keys.sample)
                and np.array_equal(raw[S.DRAW] - np.int64(draw_start), keys.draw)
                and bool(np.all(raw[S.CHAIN] == chain))):
            n_bad, n_oob = int(np.count_nonzero(bad)), int(np.count_nonzero(oob))
            out.update({
                "n_nonfinite": n_bad, "first_nonfinite": _first_key(split_idx, raw[S.SAMPLE], raw[S.DRAW], bad, loss)
                if n_bad else "",
                "n_out_of_bounds": n_oob, "first_out_of_bounds": _first_key(split_idx, raw[S.SAMPLE], raw[S.DRAW],
                                                                            oob, loss) if n_oob else "",
                "n_wrong_chain": 0, "first_wrong_chain": "", "n_out_of_range": 0, "first_out_of_range": "",
                "n_duplicate": 0, "first_duplicate": "", "n_missing": 0, "first_missing": "",
            })
            return out
    int_cols = (S.CHAIN, S.DRAW, S.SAMPLE) + ((S.POSITION,) if variables.is_tokens else ())
    ints = {k: cols[k].fill_null(-1).to_numpy().astype(np.int64) for k in int_cols}
    draw, sample = ints[S.DRAW], ints[S.SAMPLE]
    position = ints.get(S.POSITION, np.zeros_like(sample))
    wrong_chain = ints[S.CHAIN] != chain
    in_range = variables.in_range(split_idx, sample, position) & (draw >= draw_start) & \
        (draw < draw_start + num_draws)
    key = variables.row(variables.variable(split_idx[in_range], sample[in_range], position[in_range]),
                        draw[in_range] - draw_start, num_draws)  # the row each in-range key has in a correct file
    counts = np.bincount(key, minlength=out["expected_rows"])
    missing = np.flatnonzero(counts == 0)
    first_missing = ""
    if missing.size:
        k = variables.unrow(int(missing[0]), num_draws)
        first_missing = f"draw={draw_start + int(k.draw)} split={variables.splits[int(k.split)]} sample={int(k.sample)}"
        if variables.is_tokens:
            first_missing += f" position={int(k.position)}"
    dup_rows = in_range.copy()
    dup_rows[in_range] = counts[key] > 1
    out.update({
        "n_nonfinite": int(bad.sum()), "first_nonfinite": _first_key(split_idx, sample, draw, bad, loss),
        "n_out_of_bounds": int(oob.sum()), "first_out_of_bounds": _first_key(split_idx, sample, draw, oob, loss),
        "n_wrong_chain": int(wrong_chain.sum()), "first_wrong_chain": _first_key(split_idx, sample, draw, wrong_chain),
        "n_out_of_range": int((~in_range).sum()), "first_out_of_range": _first_key(split_idx, sample, draw, ~in_range),
        "n_duplicate": int(np.sum(np.maximum(counts - 1, 0))),
        "first_duplicate": _first_key(split_idx, sample, draw, dup_rows),
        "n_missing": int(missing.size), "first_missing": first_missing,
    })
    return out


def _split_indices(column: Any) -> np.ndarray:
    """A trace file's ``split`` column as split indices (:data:`bif.schema.SPLITS` order; 2 for any other name,
    0 for a null): dictionary indices mapped through the file's own dictionary, or the names looked up."""
    import pyarrow as pa

    from bif import schema as S

    col = column.combine_chunks()
    if not pa.types.is_dictionary(col.type):
        return np.array([S.SPLITS.index(n) if n in S.SPLITS else 2 for n in col.to_pylist()], dtype=np.int64)
    return _split_remap(col.dictionary)[col.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)]


def _split_remap(dictionary: Any) -> np.ndarray:
    """The split index (:data:`bif.schema.SPLITS` order; 2 for any other name) of each entry of a ``split`` column's
    Arrow dictionary, int64 (``[2]`` for an empty dictionary, whose null indices are filled with 0)."""
    from bif import schema as S

    return np.array([S.SPLITS.index(n) if n in S.SPLITS else 2 for n in dictionary.to_pylist()] or [2],
                    dtype=np.int64)


def trace_file_stats(fs: Any, path: str, *, chain: int, block: int, draw_start: int, num_draws: int, n_train: int,
                     n_query: int, loss_bounds: tuple[float, float], loss_dtype: str = "float32") -> dict[str, Any]:
    """:func:`trace_block_stats` of the trace file at ``path`` on the filesystem ``fs``, the same dict.

    A file laid out as the writer lays it out (the usual case: schema, row count and every key as
    written, no null key) is read one row group at a time, and its keys are compared with the
    expected keys of that row group only: the temporaries are those of one row group (about 1 MB),
    not of the file. At 50,500 samples x 50 draws the whole-file path allocated about 150 MB of
    arrays per file, and a fresh Dask worker (every `bif run` forks new ones) paid for each new
    page: 0.39-0.54 s for its first file against 0.06-0.11 s for later ones. Anything else (another
    schema or row count, a null or misplaced key, a token run) reads the whole table and takes
    :func:`trace_block_stats`, which counts and names the offenders.
    """
    from bif.store.tables import arrow_row_groups, read_arrow

    kw = {"chain": chain, "block": block, "draw_start": draw_start, "num_draws": num_draws, "n_train": n_train,
          "n_query": n_query, "loss_bounds": loss_bounds, "loss_dtype": loss_dtype}
    with arrow_row_groups(fs, path) as (schema, rows, groups):
        out = _stream_stats(schema, rows, groups, **kw)
    return out if out is not None else trace_block_stats(read_arrow(fs, path), **kw)


def _stream_stats(schema: Any, rows: int, groups: Iterable[Any], *, chain: int, block: int, draw_start: int,
                  num_draws: int, n_train: int, n_query: int, loss_bounds: tuple[float, float], loss_dtype: str
                  ) -> dict[str, Any] | None:
    """:func:`trace_block_stats`' fast path over a trace file's row ``groups`` (Arrow tables in file order; the
    file's ``schema`` and number of ``rows``), or None where the file is not laid out as written (the caller then
    takes the whole-table path)."""
    from bif import schema as S
    from bif.quality.kernels import loss_flag_counts, sample_keys_match
    from bif.sampling.measure import Variables

    if _token_variables(schema) is not None:
        return None
    expected = S.trace_schema(loss_dtype)
    nd = int(num_draws)
    variables = Variables.of_samples(n_train=n_train, n_query=n_query)
    if (schema.names != expected.names or any(schema.field(f.name).type != f.type for f in expected)
            or rows != variables.num_rows(nd) or nd <= 0):
        return None
    low, high = loss_bounds
    exact_bounds = all(np.isinf(v) or np.dtype(loss_dtype).type(v) == v for v in (low, high))
    n_bad = n_oob = 0
    first_bad = first_oob = ""
    start = 0
    for t in groups:
        n = t.num_rows
        if any(t.column(k).null_count for k in (S.CHAIN, S.DRAW, S.SPLIT, S.SAMPLE)) or t.column(S.LOSS).null_count:
            return None
        split = t.column(S.SPLIT).combine_chunks()  # dictionary<int8, string>: the schema was checked above
        remap = _split_remap(split.dictionary)
        codes = split.indices.to_numpy()
        sample, draw = t.column(S.SAMPLE).to_numpy(), t.column(S.DRAW).to_numpy()
        # the keys Variables.unrow gives for these rows (sample variables: train samples, then query samples, each
        # nd draws in a row), compared in one compiled pass (bif.quality.kernels; numpy's arrays of the expected
        # keys and its comparisons took 30 of a file's 74 ms at 50,500 samples x 50 draws, reading 32)
        if not sample_keys_match(codes, remap, sample, draw, t.column(S.CHAIN).to_numpy(), start=start, num_draws=nd,
                                 n_train=n_train, draw_start=draw_start, chain=chain):
            return None
        loss = t.column(S.LOSS).to_numpy()
        k_bad, k_oob = loss_flag_counts(loss, low, high)
        if (k_bad and not n_bad) or (k_oob and not n_oob):  # name the first offender (numpy, rare)
            split_idx = remap[codes]
            if not exact_bounds:
                loss = loss.astype(np.float64)
            bad = ~np.isfinite(loss)
            oob = ~bad & ((loss < low) | (loss > high))
            if k_bad and not n_bad:
                first_bad = _first_key(split_idx, sample, draw, bad, loss)
            if k_oob and not n_oob:
                first_oob = _first_key(split_idx, sample, draw, oob, loss)
        n_bad, n_oob = n_bad + k_bad, n_oob + k_oob
        start += n
    return {"chain": chain, "block": block, "rows": rows, "expected_rows": variables.num_rows(nd), "schema_ok": True,
            "n_null_keys": 0, "n_nonfinite": n_bad, "first_nonfinite": first_bad, "n_out_of_bounds": n_oob,
            "first_out_of_bounds": first_oob, "n_wrong_chain": 0, "first_wrong_chain": "", "n_out_of_range": 0,
            "first_out_of_range": "", "n_duplicate": 0, "first_duplicate": "", "n_missing": 0, "first_missing": ""}


def _token_variables(schema: Any) -> Any:
    """The token Variables declared in a trace file's schema metadata (its BlockLayout), or None for a sample run."""
    from bif import schema as S
    from bif.store.traces import BlockLayout

    md = schema.metadata or {}
    raw = md.get(S.META_LAYOUT)
    if raw is None:
        return None
    try:
        layout = BlockLayout.from_bytes(raw)
    except (ValueError, TypeError, KeyError):
        return None
    return layout.variables if layout.is_tokens else None

"""The measurement seam: variable and row offsets round-trip, and agree with the stored trace files' row order."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bif import schema as S
from bif.config import SamplerConfig
from bif.errors import BifError
from bif.examples import linear
from bif.quality.aggregates import trace_block_stats
from bif.sampling.chain import SGLDChain
from bif.sampling.measure import Variables
from bif.store.traces import TraceStore, read_layout, read_losses

counts = st.integers(min_value=0, max_value=7)
tokens = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=6)


def _layouts():
    samples = st.builds(lambda a, b: Variables.of_samples(n_train=a, n_query=b), counts, counts)
    toks = st.builds(lambda a, b: Variables.of_tokens(train_tokens=a, query_tokens=b), tokens, tokens)
    return st.one_of(samples, toks)


def _expected_keys(v: Variables) -> list[tuple[int, int, int]]:
    """(split, sample, position) of every variable, in the documented order, by brute force."""
    out = []
    for k, n in enumerate(v.sample_counts):
        for i in range(n):
            for p in range(1 if v.token_counts is None else int(v.token_counts[k][i])):
                out.append((k, i, p))
    return out


@settings(max_examples=200, deadline=None)
@given(layout=_layouts(), nd=st.integers(min_value=1, max_value=4))
def test_rows_round_trip(layout, nd):
    keys = _expected_keys(layout)
    assert layout.num_variables() == len(keys) and layout.num_rows(nd) == len(keys) * nd
    assert [layout.num_variables(s) for s in layout.splits] == [sum(1 for k in keys if k[0] == j)
                                                               for j in range(len(layout.splits))]
    rows = np.arange(layout.num_rows(nd))
    # row -> variable -> row
    rk = layout.unrow(rows, nd)
    again = layout.row(layout.variable(rk.split, rk.sample, rk.position), rk.draw, nd)
    np.testing.assert_array_equal(again, rows)
    # row_keys lists the rows in order, and agrees with the brute-force order
    allk = layout.row_keys(nd)
    for name in rk._fields:
        np.testing.assert_array_equal(getattr(allk, name), getattr(rk, name))
    assert [tuple(x) for x in zip(allk.split[::nd], allk.sample[::nd], allk.position[::nd])] == keys
    assert layout.in_range(allk.split, allk.sample, allk.position).all()
    # each (split, samples [a, b)) is one contiguous row range
    for j, split in enumerate(layout.splits):
        n = layout.num_samples(split)
        for a in range(n + 1):
            for b in range(a, n + 1):
                r0, r1 = layout.row_range(split, a, b, nd)
                sel = (allk.split == j) & (allk.sample >= a) & (allk.sample < b)
                np.testing.assert_array_equal(np.flatnonzero(sel), np.arange(r0, r1))


@settings(max_examples=100, deadline=None)
@given(layout=_layouts(), split=st.integers(-1, 3), sample=st.integers(-2, 8), position=st.integers(-1, 6))
def test_in_range_names_exactly_the_variables(layout, split, sample, position):
    assert bool(layout.in_range(split, sample, position)) == ((split, sample, position) in _expected_keys(layout))


def test_sample_and_token_layouts_by_hand():
    v = Variables.of_samples(n_train=3, n_query=2)
    assert not v.is_tokens and v.num_variables() == 5 and v.num_variables(S.QUERY) == 2
    assert v.row_range(S.QUERY, 1, 2, 4) == (16, 20)  # (3 + 1) x 4 draws
    t = Variables.of_tokens(train_tokens=[2, 0, 3], query_tokens=[1])
    assert t.is_tokens and t.num_variables() == 6 and t.num_variables(S.TRAIN) == 5
    assert int(t.variable(0, 2, 1)) == 3 and int(t.variable(1, 0, 0)) == 5
    assert t.row_range(S.TRAIN, 1, 3, 2) == (4, 10)  # sample 1 has no tokens; sample 2's three
    assert [int(x) for x in t.locate(4)] == [0, 2, 2]


def test_bad_layouts_and_splits_are_bif_errors():
    v = Variables.of_samples(n_train=3, n_query=2)
    with pytest.raises(BifError, match="unknown split 'val'"):
        v.num_variables("val")
    with pytest.raises(BifError, match=r"samples \[1, 4\) are outside 'train'"):
        v.row_range(S.TRAIN, 1, 4, 2)
    with pytest.raises(BifError, match="token_counts"):
        Variables(sample_counts=(2, 1), token_counts=(np.array([1]), np.array([1])))
    with pytest.raises(BifError, match="sample_counts"):
        Variables(sample_counts=(2,))


def test_agrees_with_stored_trace_files(tmp_path):
    """The trace files' rows are in the order Variables computes; read_losses and the aggregates use it."""
    prob = linear.build(n=11, d=3, m=3, seed=4)
    s = SamplerConfig(num_chains=1, num_draws=5, num_burnin_steps=1, steps_per_draw=1, step_size=1e-3, gamma=5.0,
                      batch_size=4)
    blocks = list(SGLDChain(prob, s, chain=1).run(num_draws=5, draws_per_block=3))
    store = TraceStore(str(tmp_path), loss_dtype="float64")
    for i, b in enumerate(blocks):
        store.write_block(b, block_index=i, ref_train_loss_mean=1.0)
    fs, _ = store.fs_path
    for ref, blk in zip(store.block_files(), blocks):
        c, i, path = ref.chain, ref.block, ref.path
        layout = read_layout(fs, path)
        v = layout.variables
        assert (v.num_variables(S.TRAIN), v.num_variables(S.QUERY)) == (11, 3)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        nd = blk.num_draws
        keys = v.unrow(np.arange(table.num_rows), nd)
        np.testing.assert_array_equal(table.column(S.DRAW).to_numpy(), blk.draw_start + keys.draw)
        np.testing.assert_array_equal(table.column(S.SAMPLE).to_numpy(), keys.sample)
        np.testing.assert_array_equal(np.array(table.column(S.SPLIT).to_pylist()), np.array(v.splits)[keys.split])
        wide = np.concatenate([blk.train_losses, blk.query_losses], axis=1)  # (D, variables)
        columns = v.variable(keys.split, keys.sample)
        np.testing.assert_array_equal(table.column(S.LOSS).to_numpy(), wide[keys.draw, columns])
        np.testing.assert_array_equal(read_losses(fs, path, split=S.QUERY, start=1, stop=3), blk.query_losses[:, 1:3])
        # the aggregates name the first missing row through the same inverse
        stats = trace_block_stats(table.slice(0, table.num_rows - 1), chain=c, block=i, draw_start=blk.draw_start,
                                  num_draws=nd, n_train=11, n_query=3, loss_bounds=(-np.inf, np.inf),
                                  loss_dtype="float64")
        assert stats["n_missing"] == 1
        assert stats["first_missing"] == f"draw={blk.draw_start + nd - 1} split=query sample=2"

"""The compiled block kernels (bif.block_ops) against the numpy path they replace, value for value.

The moments of rows of draws must equal ``from_draws`` of the same draws as columns: the means bit for bit (constant
traces keep m2 exactly 0), m2 to float64 rounding, the comoment to the float32 GEMM's.

The outputs must equal ``_negated_outputs`` bit for bit (bif.zarr is the same file either way), and the top-k must
equal a full lexsort of every column (value descending, ties to the smaller row) in both directions, for untied
values, heavy ties (the candidate buffer overflows and the column takes the numpy path), tiny and tall blocks.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bif.block_ops import centre_rows, row_moments, stack_outputs, topk_rows
from bif.moments import Moments, from_draws
from bif.tasks.covariance import _block_outputs, _negated_outputs, _topk, _topk_both


def _state(rng, a, b, *, dtype=np.float32, zero_x=(), zero_y=(), scale=1.0):
    com = (rng.standard_normal((a, b)) * scale).astype(dtype)
    m2x, m2y = rng.random(a) + 0.5, rng.random(b) + 0.5
    m2x[list(zero_x)] = 0.0
    m2y[list(zero_y)] = 0.0
    com[list(zero_x), :] = 0.0
    com[:, list(zero_y)] = 0.0
    return Moments(n=int(rng.integers(3, 500)), mean_x=np.zeros(a), mean_y=np.zeros(b), m2_x=m2x, m2_y=m2y,
                   comoment=com)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: most correlations clip at +-1
def test_stack_outputs_equal_numpy_bit_for_bit(dtype, scale):
    rng = np.random.default_rng(3)
    for a, b in ((1, 1), (7, 3), (300, 41)):
        m = _state(rng, a, b, dtype=dtype, zero_x=[0] if a > 1 else [], zero_y=[b - 1] if b > 1 else [], scale=scale)
        for ddof in (0, 1):
            want_bif, want_corr = _negated_outputs(m, ddof=ddof, pooling="stack", dtype=np.dtype(np.float32))
            got_bif, got_corr = stack_outputs(m.comoment, n=m.n, ddof=ddof, m2_x=m.m2_x, m2_y=m.m2_y)
            assert got_bif.dtype == got_corr.dtype == np.float32
            # byte equality: also the sign of zeros (no -0.0 where a trace is constant) and the clipped ends
            assert got_bif.tobytes() == want_bif.tobytes()
            assert got_corr.tobytes() == want_corr.tobytes()
            if scale > 1:
                assert (np.abs(got_corr) == 1).mean() > 0.5


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_blocks_are_declined_and_keep_the_numpy_answer(bad):
    rng = np.random.default_rng(4)
    m = _state(rng, 20, 5)
    m.comoment[3, 2] = bad
    assert stack_outputs(m.comoment, n=m.n, ddof=1, m2_x=m.m2_x, m2_y=m.m2_y) is None
    want = _negated_outputs(m, ddof=1, pooling="stack", dtype=np.dtype(np.float32))
    got = _block_outputs(m, ddof=1, pooling="stack", dtype=np.dtype(np.float32))
    for w, g in zip(want, got):
        assert w.tobytes() == g.tobytes()
    values = np.ones((20, 5), np.float32)
    values[4, 1] = bad
    assert topk_rows(values, 3) is None


def _full_sort(v: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """(min(k, a), b) rows per column by a full lexsort: value descending, ties to the smaller row."""
    a = v.shape[0]
    cols = []
    for j in range(v.shape[1]):
        order = np.lexsort((np.arange(a), -v[:, j]))
        cols.append(order[:min(k, a)] if largest else order[::-1][:min(k, a)])
    return np.stack(cols, axis=1)


def _values(rng, a, b, kind):
    v = rng.standard_normal((a, b)).astype(np.float32)
    if kind == "half_steps":
        v = np.round(v * 2) / 2
    elif kind == "integers_and_a_constant_column":
        v = np.round(v)
        v[:, 0] = 0.0
    elif kind == "two_levels":
        v = (v > 0).astype(np.float32)
    return v


@pytest.mark.parametrize("kind", ["distinct", "half_steps", "integers_and_a_constant_column", "two_levels"])
def test_topk_equals_a_full_sort(kind):
    """Untied values keep every column on the compiled path; ties overflow some columns' candidates, which the
    caller (_topk_both) answers with _topk. Either way each column equals a full sort, for k from 1 past a."""
    rng = np.random.default_rng(11)
    shapes = [(int(rng.integers(1, 60)), int(rng.integers(1, 7))) for _ in range(25)] + [(3334, 9), (700, 40)]
    compiled_only = 0
    for a, b in shapes:
        v = _values(rng, a, b, kind)
        corr = v * 0.5
        for k in sorted({1, 2, 3, 20, a - 1, a, a + 1} - {0}):
            pos, neg, ok = topk_rows(v, k)
            want_pos, want_neg = _full_sort(v, k, True), _full_sort(v, k, False)
            assert np.array_equal(pos[:, ok], want_pos[:, ok]) and np.array_equal(neg[:, ok], want_neg[:, ok])
            compiled_only += int(ok.all())
            (p_ids, p_val, p_cor), (n_ids, n_val, n_cor) = _topk_both(v, corr, 100, k)
            assert np.array_equal(p_ids, want_pos + 100) and np.array_equal(n_ids, want_neg + 100)
            np.testing.assert_array_equal(p_val, np.take_along_axis(v, want_pos, axis=0))
            np.testing.assert_array_equal(n_cor, np.take_along_axis(corr, want_neg, axis=0))
    if kind == "distinct":
        assert compiled_only > 0.9 * sum(len({1, 2, 3, 20, a - 1, a, a + 1} - {0}) for a, _ in shapes)


def test_a_constant_column_overflows_to_the_exact_path():
    """A constant query trace makes its bif column 0 everywhere: every row is a candidate, the column is declined,
    and _topk_both still returns the first and last k rows of the order (0..k-1 and a-1..a-k)."""
    rng = np.random.default_rng(5)
    v = rng.standard_normal((2000, 4)).astype(np.float32)
    v[:, 2] = 0.0
    pos, neg, ok = topk_rows(v, 20)
    assert ok.tolist() == [True, True, False, True]
    (p_ids, _, _), (n_ids, _, _) = _topk_both(v, v, 0, 20)
    assert p_ids[:, 2].tolist() == list(range(20)) and n_ids[:, 2].tolist() == list(range(1999, 1979, -1))


@settings(max_examples=60, deadline=None)
@given(a=st.integers(1, 200), b=st.integers(1, 6), k=st.integers(1, 30), levels=st.integers(2, 400),
       seed=st.integers(0, 2**31 - 1))
def test_topk_both_equals_two_numpy_calls(a, b, k, levels, seed):
    """Property: for values drawn from ``levels`` distinct levels (few levels: many ties), the compiled selection
    plus its fallback equals _topk's two directions, ids, values and correlations."""
    rng = np.random.default_rng(seed)
    v = (rng.integers(0, levels, (a, b)) / levels).astype(np.float32)
    corr = rng.standard_normal((a, b)).astype(np.float32)
    got = _topk_both(v, corr, 7, k)
    want = (_topk(v, corr, 7, k, largest=True), _topk(v, corr, 7, k, largest=False))
    for g, w in zip(got, want):
        for x, y in zip(g, w):
            np.testing.assert_array_equal(x, y)


def _rows(rng, a, d, dtype, *, loc=0.0):
    rows = (rng.standard_normal((a, d)) * rng.uniform(0.1, 10, size=(a, 1)) + loc).astype(dtype)
    if a > 2:
        rows[1] = np.float32(0.1)  # constant, and not exactly representable: sum / D would leave a residue
        rows[2] = 0.0  # a saturated loss
    return rows


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("a, b, d", [(1, 1, 1), (5, 3, 2), (300, 41, 400), (64, 17, 1000)])
def test_row_moments_equal_from_draws(dtype, a, b, d):
    rng = np.random.default_rng(a * 1000 + d)
    x, y = _rows(rng, a, d, dtype, loc=3.0), _rows(rng, b, d, dtype)
    x_before = x.copy()
    got = row_moments(x, y)
    want = from_draws(np.ascontiguousarray(x.T), np.ascontiguousarray(y.T), dtype="float32")
    assert got.n == want.n == d
    np.testing.assert_array_equal(got.mean_x, want.mean_x)  # same summation order, bit for bit
    np.testing.assert_array_equal(got.mean_y, want.mean_y)
    np.testing.assert_allclose(got.m2_x, want.m2_x, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got.m2_y, want.m2_y, rtol=1e-12, atol=0)
    assert got.comoment.dtype == np.float32 and got.comoment.shape == (a, b)
    scale = np.sqrt(np.outer(want.m2_x, want.m2_y)) + 1e-30
    assert np.max(np.abs(got.comoment - want.comoment) / scale) < 1e-5  # the float32 GEMM's rounding
    np.testing.assert_array_equal(x, x_before)  # the caller's rows are left alone unless overwrite=True
    if a > 2 and d > 1:
        assert got.m2_x[1] == 0.0 and got.m2_x[2] == 0.0  # constant traces: exactly 0, not a rounding residue
        assert got.mean_x[1] == np.float64(np.float32(0.1))
        assert not got.comoment[1].any() and not got.comoment[2].any()


def test_row_moments_of_a_row_do_not_depend_on_the_other_rows():
    """Block sizes never change the state: each variable's moments come from its own row only."""
    rng = np.random.default_rng(7)
    x, y = _rows(rng, 90, 300, np.float32), _rows(rng, 12, 300, np.float32)
    whole = row_moments(x, y)
    for lo, hi in ((0, 1), (0, 37), (37, 90)):
        part = row_moments(x[lo:hi], y)
        np.testing.assert_array_equal(part.mean_x, whole.mean_x[lo:hi])
        np.testing.assert_array_equal(part.m2_x, whole.m2_x[lo:hi])
        np.testing.assert_array_equal(part.mean_y, whole.mean_y)
        np.testing.assert_array_equal(part.m2_y, whole.m2_y)


def test_centre_rows_overwrites_only_when_asked_and_propagates_non_finite():
    rng = np.random.default_rng(8)
    x = _rows(rng, 6, 50, np.float32)
    x[3, 10] = np.nan
    x[4, 0] = np.inf
    view = x.copy()
    view.flags.writeable = False  # as a decoded Parquet column is
    centred, mean, m2 = centre_rows(view)
    assert centred is not view and centred.dtype == np.float32
    np.testing.assert_array_equal(centred[0], (view[0].astype(np.float64) - mean[0]).astype(np.float32))
    assert np.isnan(mean[3]) and np.isnan(m2[3]) and np.isnan(centred[3]).all()
    assert np.isinf(mean[4]) and np.isnan(m2[4])  # inf - inf: the outputs turn non-finite and take numpy's path
    own = x.copy()
    out, _, _ = centre_rows(own, overwrite=True)
    assert out is own
    np.testing.assert_array_equal(out[~np.isnan(out)], centred[~np.isnan(centred)])
    with pytest.raises(ValueError, match="at least one draw"):
        centre_rows(np.zeros((3, 0), np.float32))

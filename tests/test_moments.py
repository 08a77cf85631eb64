"""Mergeable moments: exact against numpy for any split, order and tree shape (float64)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bif.moments import bif_in_memory, correlation, covariance, from_draws, merge_all


def _data(seed, n=37, a=5, b=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, a)) * rng.uniform(0.1, 10, size=a) + 100.0  # large offset tests cancellation
    y = x[:, :b] * 0.3 + rng.normal(size=(n, b))
    return x, y


def _ref_cov(x, y, ddof=1):
    full = np.cov(np.hstack([x, y]).T, ddof=ddof)
    return full[: x.shape[1], x.shape[1]:]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(1, 36), min_size=0, max_size=6, unique=True),
       shuffle=st.booleans())
def test_any_partition_and_order_gives_numpy_cov(seed, cuts, shuffle):
    x, y = _data(seed)
    bounds = [0, *sorted(cuts), len(x)]
    parts = [from_draws(x[s:e], y[s:e]) for s, e in zip(bounds[:-1], bounds[1:])]
    if shuffle:
        parts = parts[::-1]
    m = merge_all(parts)
    assert m.n == len(x)
    np.testing.assert_allclose(covariance(m), _ref_cov(x, y), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m.mean_x, x.mean(0), rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), split_every=st.integers(2, 5))
def test_tree_shape_does_not_change_result(seed, split_every):
    x, y = _data(seed, n=64)
    leaves = [from_draws(x[i:i + 4], y[i:i + 4]) for i in range(0, 64, 4)]
    level = leaves
    while len(level) > 1:  # a tree with fan-in split_every
        level = [merge_all(level[i:i + split_every]) for i in range(0, len(level), split_every)]
    flat = merge_all(leaves)
    np.testing.assert_allclose(level[0].comoment, flat.comoment, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(correlation(level[0]), np.corrcoef(np.hstack([x, y]).T)[:5, 5:], rtol=1e-9)


def test_correlation_bounds_and_sign():
    x, y = _data(3)
    corr = correlation(from_draws(x, y))
    assert np.all(np.abs(corr) <= 1.0)
    # y[:,0] was built from x[:,0] with a positive slope
    assert corr[0, 0] > 0.5




def test_bif_in_memory_pooling():
    rng = np.random.default_rng(0)
    tr = rng.normal(size=(3, 50, 4))
    qu = tr[..., :2] + rng.normal(size=(3, 50, 2))
    bif, corr = bif_in_memory(tr, qu, pooling="stack")
    np.testing.assert_allclose(bif, -_ref_cov(tr.reshape(150, 4), qu.reshape(150, 2)), rtol=1e-10)
    bif_c, _ = bif_in_memory(tr, qu, pooling="chain_mean")
    per_chain = np.mean([-_ref_cov(tr[c], qu[c]) for c in range(3)], axis=0)
    np.testing.assert_allclose(bif_c, per_chain, rtol=1e-10)
    assert bif[0, 0] < 0 and corr[0, 0] < -0.5  # positively correlated losses -> negative BIF
    with pytest.raises(ValueError, match="pooling"):
        bif_in_memory(tr, qu, pooling="nope")


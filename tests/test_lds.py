"""LDS arithmetic (bif.evaluation.lds) on cases with known answers."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from bif.evaluation.lds import draw_subsets, lds, mean_over_seeds, predict_outputs, retrain_seed, spearman_columns, subset_size


def _case(n=50, q=7, m=60, seed=0):
    rng = np.random.default_rng(seed)
    tau = rng.normal(size=(n, q))
    masks = draw_subsets(n, num_subsets=m, alpha=0.5, seed=seed)
    return tau, masks, rng


def test_exact_linear_datamodel_gives_lds_one():
    tau, masks, rng = _case()
    bias = rng.normal(size=tau.shape[1])
    outputs = bias + masks @ tau  # the outputs *are* a linear datamodel with weights tau
    res = lds(tau, masks, outputs)
    np.testing.assert_allclose(res.per_query, 1.0, atol=1e-12)
    assert res.mean == pytest.approx(1.0) and res.stderr == pytest.approx(0.0, abs=1e-12)
    assert res.num_subsets == 60 and res.num_valid == 7


def test_linear_model_with_small_noise_is_near_one_and_flipped_sign_near_minus_one():
    tau, masks, rng = _case(seed=1)
    outputs = masks @ tau + 0.05 * rng.normal(size=(masks.shape[0], tau.shape[1]))
    assert lds(tau, masks, outputs).mean > 0.98
    assert lds(-tau, masks, outputs).mean < -0.98


def test_random_attribution_has_lds_near_zero_with_honest_stderr():
    tau, masks, rng = _case(n=80, q=200, m=100, seed=2)
    outputs = rng.normal(size=(100, 200))
    res = lds(tau, masks, outputs)
    assert abs(res.mean) < 4 * res.stderr  # ~N(0, 1/sqrt(M)) per query, so stderr ≈ 0.1/sqrt(200)
    assert res.stderr == pytest.approx(np.std(res.per_query, ddof=1) / np.sqrt(200))
    assert 0.005 < res.stderr < 0.01


def test_spearman_columns_matches_scipy_including_ties():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, size=(30, 4)).astype(float)  # many ties
    b = rng.normal(size=(30, 4))
    ours = spearman_columns(a, b)
    for j in range(4):
        assert ours[j] == pytest.approx(spearmanr(a[:, j], b[:, j]).statistic, abs=1e-12)


def test_spearman_columns_gives_nan_where_a_column_has_a_nan_as_scipy_does():
    """bottleneck's ranks put a NaN last instead of giving NaN: the column's correlation must still be NaN."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    a[5, 0] = np.nan
    b[7, 2] = np.nan
    ours = spearman_columns(a, b)
    assert np.isnan(ours[0]) and np.isnan(ours[2])
    assert np.isnan(spearmanr(a[:, 0], b[:, 0]).statistic) and np.isnan(spearmanr(a[:, 2], b[:, 2]).statistic)
    assert ours[1] == pytest.approx(spearmanr(a[:, 1], b[:, 1]).statistic, abs=1e-12)


def test_constant_column_is_nan_and_ignored_in_the_mean():
    tau, masks, _ = _case(q=3)
    outputs = masks @ tau
    outputs[:, 1] = 2.0
    res = lds(tau, masks, outputs)
    assert np.isnan(res.per_query[1]) and res.num_valid == 2 and res.mean == pytest.approx(1.0)


def test_subsets_are_reproducible_from_a_seed_and_prefix_stable():
    a = draw_subsets(41, num_subsets=20, alpha=0.5, seed=7)
    b = draw_subsets(41, num_subsets=20, alpha=0.5, seed=7)
    c = draw_subsets(41, num_subsets=30, alpha=0.5, seed=7)
    d = draw_subsets(41, num_subsets=20, alpha=0.5, seed=8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c[:20])  # raising M keeps the first subsets
    assert not np.array_equal(a, d)
    assert subset_size(41, 0.5) == 20 and (a.sum(1) == 20).all()
    assert len({row.tobytes() for row in a}) == 20
    assert draw_subsets(10, num_subsets=5, alpha=0.3).sum(1).tolist() == [3] * 5
    assert retrain_seed(0, 3, 1) == retrain_seed(0, 3, 1) != retrain_seed(0, 3, 2)


def test_predict_outputs_and_input_checks():
    tau = np.array([[1.0, 0.0], [2.0, -1.0], [4.0, 3.0]])
    masks = np.array([[True, False, True], [False, True, True]])
    np.testing.assert_allclose(predict_outputs(tau, masks), [[5.0, 3.0], [6.0, 2.0]])
    with pytest.raises(ValueError, match="non-finite value at \\(train=1, query=0\\)"):
        predict_outputs(np.where(tau == 2.0, np.nan, tau), masks)
    with pytest.raises(ValueError, match="alpha"):
        draw_subsets(10, alpha=1.0)
    with pytest.raises(ValueError, match="outputs must be"):
        lds(tau, masks, np.zeros((3, 2)))
    np.testing.assert_allclose(mean_over_seeds(np.arange(12.0).reshape(2, 3, 2)), [[2.0, 3.0], [8.0, 9.0]])


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-3, 1e3), shift=st.floats(-10, 10), seed=st.integers(0, 1000))
def test_lds_is_invariant_to_positive_scale_of_tau_and_per_query_offsets(scale, shift, seed):
    tau, masks, rng = _case(n=20, q=3, m=15, seed=seed)
    outputs = rng.normal(size=(15, 3))
    base = lds(tau, masks, outputs).per_query
    np.testing.assert_allclose(lds(scale * tau, masks, outputs + shift).per_query, base, atol=1e-9)


def test_math_modules_import_no_orchestration():
    code = ("import sys, bif.evaluation.lds, bif.evaluation.baselines.influence, bif.evaluation.baselines.graddot, bif.evaluation.retrain; "
            "bad = [m for m in ('prefect', 'dask', 'distributed', 'fsspec') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

"""The diagnostics' compiled steps (bif.quality.kernels) against the numpy steps they replace, bit for bit.

R-hat / ESS must keep arviz-stats' values: a rounding difference in an autocovariance can move the end of Geyer's
sequence on discrete draws. So each kernel must give numpy's exact values, sums in numpy's order included.
(The rank-normal scores are tested in test_diagnostics.py, against bottleneck's ranks and arviz-stats.)
"""
from __future__ import annotations

import numpy as np
import pytest

from bif.quality import kernels as K


def _numpy_rhat(rows: np.ndarray) -> np.ndarray:
    """arviz-stats' split R-hat on a plain (sample, chain, draw) array in numpy's steps (the pass's code until
    session 29): sqrt(((d B / W) + d - 1) / d)."""
    m, c, d = rows.shape
    means = np.add.reduce(rows, axis=2, keepdims=True) / d
    dev = rows - means
    np.multiply(dev, dev, out=dev)
    within = (np.add.reduce(dev, axis=2) / (d - 1)).mean(axis=1)
    between = d * means.reshape(m, c).var(axis=1, ddof=1)
    return np.sqrt((between / within + d - 1) / d)


def _rows(rng, shape) -> np.ndarray:
    """Draws of mixed magnitudes and offsets per chain (sums whose order shows in the last bits), and 0/1 draws."""
    m, c, d = shape
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3, (m, c, 1)) + rng.uniform(-50, 50, (m, c, 1))
    x[: m // 4] = rng.random((m // 4, c, d)) < 0.3
    return x


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9, 15, 16, 17, 50, 127, 128, 129, 136, 255, 256, 257, 1000, 4099])
def test_sums_are_numpys_pairwise_sums(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6, n)
        assert K.numpy_sum(x) == np.add.reduce(x)


@pytest.mark.parametrize("c,d", [(2, 4), (2, 50), (4, 50), (3, 7), (8, 25), (9, 129), (17, 300), (4, 1000)])
def test_split_rhat_equals_numpys_steps_bit_for_bit(c, d):
    rng = np.random.default_rng(c * 1000 + d)
    rows = _rows(rng, (40, c, d))
    rows[1] = 2.5  # constant: 0 / 0
    with np.errstate(invalid="ignore", divide="ignore"):
        want = _numpy_rhat(rows.copy())
        got = K.split_rhat(rows)
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[1]) and np.isfinite(got[2:]).all()
    assert K.split_rhat(np.empty((0, c, d))).shape == (0,)


@pytest.mark.parametrize("c,d", [(1, 3), (4, 50), (2, 129), (8, 500)])
def test_ess_steps_equal_numpys_bit_for_bit(c, d):
    rng = np.random.default_rng(c + d)
    rows = _rows(rng, (30, c, d))
    want_mean = rows.mean(axis=2)
    want_centred = rows - want_mean[:, :, None]
    centred = rows.copy()
    np.testing.assert_array_equal(K.centre_chains(centred), want_mean)
    np.testing.assert_array_equal(centred, want_centred)

    n = 2 * d
    spectrum = np.fft.rfft(centred, n=n, axis=2)
    parts = spectrum.view(np.float64).reshape(*spectrum.shape, 2)
    want_power = parts[..., 0] * parts[..., 0] + parts[..., 1] * parts[..., 1]
    K.power_spectrum(spectrum)
    np.testing.assert_array_equal(spectrum.real, want_power)
    assert not spectrum.imag.any()

    full = np.fft.irfft(spectrum, n=n, axis=2)
    acov = K.first_lags(full, d)
    assert acov.flags.c_contiguous and acov.shape == (30, c, d)
    np.testing.assert_array_equal(acov, full[:, :, :d] / d)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_centred_indicators_equal_numpys_steps(dtype):
    """The tail ESS's indicators draws <= q (float32 draws against a float64 quantile, compared in float64), centred
    per chain: numpy's 0 / 1 array, its mean and the centred values bit for bit, and which samples vary."""
    rng = np.random.default_rng(7)
    split = rng.gamma(0.5, 1.0, (60, 4, 37)).astype(dtype)
    split[:10] = np.round(split[:10], 1)  # ties at the quantile
    q = np.quantile(split.reshape(60, -1).astype(np.float64), 0.05, axis=1)
    q[10] = -1.0  # no draw at or below: constant 0
    q[11] = 1e9  # every draw: constant 1
    q[12] = float(np.float32(0.1)) if dtype == np.float32 else 0.1  # float32 0.1 is not float64 0.1
    ind = np.less_equal(split, q[:, None, None], out=np.empty(split.shape))
    want_mean = ind.mean(axis=2)
    flat = ind.reshape(60, -1)
    want_varying = (flat.max(axis=1) - flat.min(axis=1)) >= np.finfo(float).resolution
    centred, means, varying = K.centred_indicators(split, q)
    np.testing.assert_array_equal(means, want_mean)
    np.testing.assert_array_equal(centred, ind - want_mean[:, :, None])
    np.testing.assert_array_equal(varying, want_varying)
    assert not varying[10] and not varying[11] and varying[:10].all()

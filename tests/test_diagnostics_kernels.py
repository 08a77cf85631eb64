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


# --- the trace gates' fast path (bif.quality.aggregates._stream_stats) ----------------------------------------------
def _numpy_keys_match(codes, remap, sample, draw, chains, start, nd, n_train, draw_start, chain) -> bool:
    """The numpy expression the kernel replaced (session 29's _stream_stats)."""
    row = np.arange(start, start + len(codes), dtype=np.int64)
    var = row // nd
    query = row >= n_train * nd
    return bool(np.array_equal(remap[codes], query) and np.array_equal(sample, var - query * n_train)
                and np.array_equal(draw, row - var * nd + draw_start) and np.all(chains == chain))


def test_sample_keys_match_is_the_numpy_test_of_the_written_layout():
    rng = np.random.default_rng(3)
    for trial in range(300):
        nd, n_train, n_query = int(rng.integers(1, 9)), int(rng.integers(0, 12)), int(rng.integers(0, 6))
        total = (n_train + n_query) * nd
        if total == 0:
            continue
        start = int(rng.integers(0, total))
        stop = int(rng.integers(start + 1, total + 1))
        row = np.arange(start, stop)
        var = row // nd
        q = var >= n_train
        draw_start, chain = int(rng.integers(0, 1000)), int(rng.integers(0, 5))
        remap = np.array([0, 1], dtype=np.int64) if trial % 3 else np.array([1, 0], dtype=np.int64)
        codes = np.where(q, int(np.flatnonzero(remap == 1)[0]), int(np.flatnonzero(remap == 0)[0])).astype(np.int8)
        arrays = {"codes": codes, "sample": (var - q * n_train).astype(np.int64),
                  "draw": (row - var * nd + draw_start).astype(np.int32),
                  "chains": np.full(len(row), chain, dtype=np.int32)}
        if trial % 2:  # one wrong value in one column, anywhere
            name = ["codes", "sample", "draw", "chains"][trial // 2 % 4]
            a = arrays[name].copy()
            i = int(rng.integers(0, len(a)))
            a[i] = a[i] + (1 if name != "codes" or a[i] == 0 else -1)
            arrays[name] = a
        for a in arrays.values():
            a.setflags(write=False)  # as Arrow's zero-copy arrays are
        args = (arrays["codes"], remap, arrays["sample"], arrays["draw"], arrays["chains"])
        want = _numpy_keys_match(*args, start, nd, n_train, draw_start, chain)
        assert want == (trial % 2 == 0)
        assert K.sample_keys_match(*args, start=start, num_draws=nd, n_train=n_train, draw_start=draw_start,
                                   chain=chain) == want
    # a dictionary index outside the dictionary is a mismatch, not a read past it
    bad = np.array([0, 5], dtype=np.int8)
    assert not K.sample_keys_match(bad, np.array([0, 1]), np.array([0, 0]), np.array([0, 1], dtype=np.int32),
                                   np.zeros(2, dtype=np.int32), start=0, num_draws=2, n_train=1, draw_start=0, chain=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bounds", [(0.0, np.inf), (-np.inf, np.inf), (0.1, 2.3), (-1.0, 1.0), (np.nan, 1.0)])
def test_loss_flag_counts_are_numpys(dtype, bounds):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(5000) * 2).astype(dtype)
    x[rng.integers(0, 5000, 40)] = np.nan
    x[rng.integers(0, 5000, 20)] = np.inf
    x[rng.integers(0, 5000, 20)] = -np.inf
    x[:4] = [-0.0, 0.0, dtype(0.1), dtype(2.3)]  # on a bound that float32 cannot hold exactly
    low, high = bounds
    exact = all(np.isinf(v) or dtype(v) == v for v in bounds)
    y = x if exact else x.astype(np.float64)  # _stream_stats' numpy steps
    bad = ~np.isfinite(y)
    with np.errstate(invalid="ignore"):
        oob = ~bad & ((y < low) | (y > high))
    x.setflags(write=False)
    assert K.loss_flag_counts(x, low, high) == (int(bad.sum()), int(oob.sum()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_stats_compiled_is_the_numpy_pass(dtype):
    """The result gates' chunk aggregates: the compiled pass gives numpy's dict (first non-finite value, first
    minimum and maximum among equal values, -0.0 and 0.0 tied, chunks all non-finite or empty)."""
    from bif.quality.aggregates import _block_stats_compiled, _block_stats_numpy

    rng = np.random.default_rng(11)
    for trial in range(200):
        shape = (int(rng.integers(0, 9)), int(rng.integers(0, 9)))
        a = rng.integers(-3, 4, shape).astype(dtype)  # few values: ties of the min and max
        if trial % 3 == 0:
            a *= dtype(0.0)  # zeros ...
            a[rng.random(shape) < 0.5] = dtype(-0.0)  # ... and negative zeros
        for v in (np.nan, np.inf, -np.inf):
            a[rng.random(shape) < (0.1 if trial % 5 else 1.0)] = v
        if trial % 7 == 0:
            a = np.asfortranarray(a)  # a chunk not in C order
        t0, q0 = int(rng.integers(0, 10**6)), int(rng.integers(0, 10**3))
        want, got = _block_stats_numpy(a, t0, q0), _block_stats_compiled(a, t0, q0)
        assert list(got) == list(want)
        for k, v in want.items():
            assert (np.isnan(v) and np.isnan(got[k])) if isinstance(v, float) and np.isnan(v) else got[k] == v, k
            if isinstance(v, float) and v == 0.0:
                assert np.signbit(got[k]) == np.signbit(v), k  # the same element, not an equal one

"""The compiled steps (numba) of the diagnostics' R-hat / ESS pass (:func:`bif.quality.diagnostics._rhat_ess_pass`),
each giving the values of the numpy steps it replaces bit for bit, and of the quality gates' aggregates (last
sections: a trace file's keys and loss counts, a bif.zarr chunk's non-finite count and extremes).

Imported only inside the pass (numba is heavy; :mod:`bif.quality.diagnostics` must import light). The pass's time
went to numpy's elementwise passes and temporaries around the FFTs and ranks; these make one pass over the data
instead. FFTs stay numpy's (pocketfft), Geyer's sequence arviz-stats' ``geyer`` gufunc.

**Rank-normal scores.** :func:`normal_scores` gives both rankings that ArviZ's rank R-hat needs, of the draws and of
their fold |draw - median|, from one sort of each sample's draws: the fold's order is merged from the two sides of
the median, where bottleneck's ``rankdata`` sorted twice. Ranks are whole or half numbers found by comparisons
only, so the scores equal those of any exact ranking. 1,310 samples x 200 float32 draws: 3.4 against 6.2 ms, the
sort for the quantiles included.

**Sums in numpy's order.** numpy sums a contiguous row pairwise (``pairwise_sum`` in its umath loops: blocks of up to
128 values in 8 interleaved accumulators, combined as ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)), then the
rest one by one; longer rows split in halves whose length is a multiple of 8). :func:`_pairwise` adds in the same
order, so the means and variances below are numpy's to the bit; the tests compare them for many lengths.

**R-hat.** :func:`split_rhat`: arviz-stats' split R-hat of each sample's (chain, draw) rows, one pass per chain,
where numpy made three (sample, chain, draw) temporaries (deviations, their squares, the reductions).

**Gates.** :func:`sample_keys_match` and :func:`loss_flag_counts` (a trace file's row group, on the workers of
:func:`bif.quality.run.run_gates`), :func:`finite_extremes` (a chunk of bif.zarr): one pass each, the counts and
positions of numpy's steps (tests/test_diagnostics_kernels.py).

**ESS steps.** Around numpy's ``rfft`` / ``irfft``: :func:`centre_chains` (each chain's mean, numpy's, subtracted in
place), :func:`power_spectrum` (re² + im² in place, numpy's two products and one sum) and :func:`first_lags` (the
first ``draws`` lags divided by ``draws``, as a contiguous array for ``geyer``).
"""
from __future__ import annotations

import numpy as np

from bif.quality.diagnostics import limit_numba_threads

limit_numba_threads()  # before numba loads: its thread pool is sized then (see bif.quality.diagnostics)

import numba as nb  # noqa: E402

_F32, _F64 = nb.float32, nb.float64


@nb.njit(nb.void(_F32[:, ::1], nb.uint64[:, ::1]), cache=True, nogil=True, error_model="numpy")
def _order_keys(x, keys):  # pragma: no cover - compiled
    a, k = x.shape
    for i in range(a):
        for j in range(k):
            # the float's bits, ordered as unsigned: -0 and +0 are next to each other (and tie: they compare equal)
            b = np.float32(x[i, j]).view(np.uint32)
            b = b ^ np.uint32(0xFFFFFFFF) if b >> np.uint32(31) else b | np.uint32(0x80000000)
            keys[i, j] = (np.uint64(b) << np.uint64(32)) | np.uint64(j)


@nb.njit(nb.void(nb.uint64[:, ::1], _F64[:, ::1], nb.int64[:, ::1]), cache=True, nogil=True, error_model="numpy")
def _decode_keys(keys, ordered, perm):  # pragma: no cover - compiled
    a, k = keys.shape
    for i in range(a):
        for j in range(k):
            key = keys[i, j]
            b = np.uint32(key >> np.uint64(32))
            b = b ^ np.uint32(0x80000000) if b >> np.uint32(31) else b ^ np.uint32(0xFFFFFFFF)
            ordered[i, j] = np.float64(np.uint32(b).view(np.float32))
            perm[i, j] = np.int64(key & np.uint64(0xFFFFFFFF))


@nb.njit(inline="always")
def _tied_scores(v, pos, k, table, out, start):  # pragma: no cover - compiled
    # v sorted, pos[j] where v[j] goes in out: out[pos[j]] = table[2 x the average rank of v[j]'s ties], the rank
    # of the run [s, e) being (s + 1 + e) / 2; the runs' starts forward, then their ends backward, branch-free
    s = 0
    start[0] = 0
    for j in range(1, k):
        s = s if v[j] == v[j - 1] else j
        start[j] = s
    e = k
    out[pos[k - 1]] = table[start[k - 1] + k + 1]
    for j in range(k - 2, -1, -1):
        e = e if v[j] == v[j + 1] else j + 1
        out[pos[j]] = table[start[j] + e + 1]


@nb.njit(nb.void(_F64[:, ::1], nb.int64[:, ::1], _F64[::1], _F64[:, ::1], _F64[:, ::1], nb.boolean,
                 nb.boolean[::1]), cache=True, nogil=True, error_model="numpy")
def _normal_scores(ordered, perm, table, z, zf, fold, finite):  # pragma: no cover - compiled
    a, k = ordered.shape
    dist = np.empty(k + 2)
    merged = np.empty(k)
    mpos = np.empty(k, np.int64)
    start = np.empty(k, np.int64)
    for i in range(a):
        o = ordered[i]
        p = perm[i]
        if not (np.isfinite(o[0]) and np.isfinite(o[k - 1])):
            finite[i] = False
            continue
        finite[i] = True
        _tied_scores(o, p, k, table, z[i], start)
        if not fold:
            continue
        med = o[k // 2] if k % 2 else (o[k // 2 - 1] + o[k // 2]) / 2
        # dist[1 + j] = |o[j] - med|: falls (not strictly) from j = 0 to the median, then rises; +inf sentinels
        # at both ends (a finite row's distances are finite). Merging the two sides from the median outwards
        # sorts the distances, branch-free
        dist[0] = np.inf
        dist[k + 1] = np.inf
        below = 0
        for j in range(k):
            dist[j + 1] = abs(o[j] - med)
            below += o[j] < med
        lo = below  # dist index of the next value below the median (o index below - 1)
        hi = below + 1
        for t in range(k):
            dl = dist[lo]
            dh = dist[hi]
            take_lo = dl <= dh
            merged[t] = dl if take_lo else dh
            mpos[t] = p[(lo if take_lo else hi) - 1]
            lo -= take_lo
            hi += 1 - take_lo
        _tied_scores(merged, mpos, k, table, zf[i], start)


def normal_scores(rows: np.ndarray, table: np.ndarray, *, fold: bool = True
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Rank-normal scores of each row of ``rows`` (a, k) (float32 or float64, no NaN), from one sort of the row:

    - ``z`` (a, k): ``table[2 r]``, r the average rank (1 to k, ties averaged) of each value in its row;
    - ``z_fold`` (a, k), or None without ``fold``: the same of |value - the row's median| (numpy's median: the
      middle value, or the two middle ones' (a + b) / 2, in float64);
    - ``ordered`` (a, k) float64: the row sorted;
    - ``finite`` (a,) bool: rows with an infinite value are left to the caller (their ``z``, ``z_fold`` unset).

    Ranks are whole or half numbers, found by comparisons only, so these equal the scores of any exact ranking
    (bottleneck's or scipy's ``rankdata``) bit for bit. The sort: float32 values with their column packed into
    uint64 keys (order-preserving bits) and sorted by numpy; float64 values by ``argsort``. The fold's
    order comes from the sorted row without a second sort: |value - median| falls towards the median and rises
    after it, so merging the two sides sorts it. ``table``: (2 k + 1,) float64.
    """
    a, k = rows.shape
    if k >= 1 << 32:
        raise ValueError(f"at most 2**32 - 1 values per row, got {k}")
    ordered = np.empty((a, k))
    if rows.dtype == np.float32:
        keys = np.empty((a, k), dtype=np.uint64)
        _order_keys(np.require(rows, requirements=("C", "W")), keys)  # (a read-only array: a copy)
        keys.sort(axis=1)
        perm = np.empty((a, k), dtype=np.int64)
        _decode_keys(keys, ordered, perm)
    else:
        rows = np.asarray(rows, dtype=np.float64)
        perm = np.ascontiguousarray(np.argsort(rows, axis=1), dtype=np.int64)
        ordered[:] = np.take_along_axis(rows, perm, axis=1)
    z = np.empty((a, k))
    zf = np.empty((a, k)) if fold else np.empty((0, 0))
    finite = np.empty(a, dtype=np.bool_)
    if k:
        _normal_scores(ordered, perm, np.ascontiguousarray(table, dtype=np.float64), z, zf, fold, finite)
    else:
        finite[:] = True
    return z, (zf if fold else None), ordered, finite


@nb.njit(inline="always")
def _block_sum(a, s, n):  # pragma: no cover - compiled
    # numpy's pairwise_sum of a[s:s + n] for n <= 128: under 8 values one by one, else 8 accumulators
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[s + i]
        return res
    r0, r1, r2, r3 = a[s], a[s + 1], a[s + 2], a[s + 3]
    r4, r5, r6, r7 = a[s + 4], a[s + 5], a[s + 6], a[s + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[s + i]
        r1 += a[s + i + 1]
        r2 += a[s + i + 2]
        r3 += a[s + i + 3]
        r4 += a[s + i + 4]
        r5 += a[s + i + 5]
        r6 += a[s + i + 6]
        r7 += a[s + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[s + i]
        i += 1
    return res


@nb.njit(cache=True, nogil=True)
def _halves_sum(a, n, frames, left):  # pragma: no cover - compiled
    # numpy's pairwise_sum above 128 values: the sum of two halves (the first a multiple of 8 values long), each
    # summed the same way down to blocks of <= 128. Recursion without recursive calls (numba cannot cache those):
    # frames[f] = (start, length, 1 once its left half is pending), left[f] = the left half's sum
    top = 0
    frames[0, 0], frames[0, 1], frames[0, 2] = 0, n, 0
    while True:
        s, k = frames[top, 0], frames[top, 1]
        if k > 128:
            h = k // 2
            h -= h % 8
            frames[top, 2] = 1
            top += 1
            frames[top, 0], frames[top, 1], frames[top, 2] = s, h, 0
            continue
        v = _block_sum(a, s, k)
        while True:  # hand v to the frames above: a left half waits for its right half, a right half completes
            top -= 1
            if top < 0:
                return v
            if frames[top, 2] == 1:
                left[top] = v
                frames[top, 2] = 2
                h = frames[top, 1] // 2
                h -= h % 8
                top += 1
                frames[top, 0], frames[top, 1], frames[top, 2] = frames[top - 1, 0] + h, frames[top - 1, 1] - h, 0
                break
            v = left[top] + v


@nb.njit(nb.float64(_F64[::1], nb.int64, nb.int64[:, ::1], _F64[::1]), cache=True, nogil=True)
def _pairwise(a, n, frames, left):  # pragma: no cover - compiled
    """The sum of a[:n] as numpy's ``np.add.reduce`` of a contiguous row adds it (``frames`` (64, 3) int64 and
    ``left`` (64,) float64: scratch for rows of more than 128 values)."""
    return _block_sum(a, 0, n) if n <= 128 else _halves_sum(a, n, frames, left)


def _scratch() -> tuple[np.ndarray, np.ndarray]:
    return np.empty((64, 3), dtype=np.int64), np.empty(64)


@nb.njit(cache=True, nogil=True)  # compiled on first use: only the test calls it
def _numpy_sum(a, frames, left):  # pragma: no cover - compiled
    return _pairwise(a, a.shape[0], frames, left)


def numpy_sum(row: np.ndarray) -> float:
    """:func:`_pairwise` of a contiguous float64 row (the test compares it with ``np.add.reduce``)."""
    return float(_numpy_sum(np.ascontiguousarray(row, dtype=np.float64), *_scratch()))


_CHAINS = nb.types.Array(_F64, 3, "C")


@nb.njit(nb.void(_CHAINS, _F64[::1], nb.int64[:, ::1], _F64[::1]), cache=True, nogil=True, error_model="numpy")
def _split_rhat(rows, out, frames, left):  # pragma: no cover - compiled
    m, c, d = rows.shape
    means = np.empty(c)
    within = np.empty(c)
    sq = np.empty(max(c, d))
    for i in range(m):
        for j in range(c):
            r = rows[i, j]
            mu = _pairwise(r, d, frames, left) / d
            means[j] = mu
            for t in range(d):
                e = r[t] - mu
                sq[t] = e * e
            within[j] = _pairwise(sq, d, frames, left) / (d - 1)
        w = _pairwise(within, c, frames, left) / c
        grand = _pairwise(means, c, frames, left) / c
        for j in range(c):
            e = means[j] - grand
            sq[j] = e * e
        between = d * (_pairwise(sq, c, frames, left) / (c - 1))
        out[i] = np.sqrt((between / w + d - 1) / d)


def split_rhat(rows: np.ndarray) -> np.ndarray:
    """arviz-stats' split R-hat of (sample, chain, draw) float64 draws (at least 2 chains): (sample,), the values of
    numpy's ``sqrt(((d B / W) + d - 1) / d)``, B the variance (ddof 1) of the chain means, W the mean of the chains'
    variances (ddof 1), each mean and sum taken in numpy's order (0.69 -> 0.39 ms for 1,310 samples x 4 x 50)."""
    out = np.empty(rows.shape[0])
    if rows.shape[0]:
        _split_rhat(np.ascontiguousarray(rows, dtype=np.float64), out, *_scratch())
    return out


@nb.njit(nb.void(_CHAINS, _F64[:, ::1], nb.int64[:, ::1], _F64[::1]), cache=True, nogil=True, error_model="numpy")
def _centre_chains(rows, means, frames, left):  # pragma: no cover - compiled
    m, c, d = rows.shape
    for i in range(m):
        for j in range(c):
            r = rows[i, j]
            mu = _pairwise(r, d, frames, left) / d
            means[i, j] = mu
            for t in range(d):
                r[t] -= mu


def centre_chains(rows: np.ndarray) -> np.ndarray:
    """Subtract each chain's mean from (sample, chain, draw) float64 C-contiguous ``rows`` in place and return the
    means (sample, chain): numpy's ``rows.mean(axis=2)`` and ``rows -= means[..., None]``, bit for bit."""
    means = np.empty(rows.shape[:2])
    if rows.size:
        _centre_chains(rows, means, *_scratch())
    return means


@nb.njit(nb.void(nb.types.Array(nb.complex128, 3, "C")), cache=True, nogil=True, error_model="numpy")
def _power_spectrum(spectrum):  # pragma: no cover - compiled
    m, c, h = spectrum.shape
    for i in range(m):
        for j in range(c):
            s = spectrum[i, j]
            for t in range(h):
                v = s[t]
                s[t] = v.real * v.real + v.imag * v.imag


def power_spectrum(spectrum: np.ndarray) -> None:
    """X conj(X) of a C-contiguous complex128 spectrum, in place: re² + im² (imaginary part 0), numpy's products
    and sum (numpy's complex product X * conj(X) rounds its imaginary part to ~1e-14 instead of 0)."""
    _power_spectrum(spectrum)


@nb.njit(nb.void(_CHAINS, _F64, _CHAINS), cache=True, nogil=True, error_model="numpy")
def _first_lags(full, d, acov):  # pragma: no cover - compiled
    m, c, k = acov.shape
    for i in range(m):
        for j in range(c):
            f = full[i, j]
            a = acov[i, j]
            for t in range(k):
                a[t] = f[t] / d


def first_lags(full: np.ndarray, draws: int) -> np.ndarray:
    """``full[:, :, :draws] / draws`` of C-contiguous float64 ``full`` (sample, chain, lag), contiguous."""
    acov = np.empty((*full.shape[:2], draws))
    if acov.size:
        _first_lags(full, float(draws), acov)
    return acov


@nb.njit([nb.void(nb.types.Array(t, 3, "C"), _F64[::1], _CHAINS, _F64[:, ::1], nb.boolean[::1]) for t in (_F32, _F64)],
         cache=True, nogil=True, error_model="numpy")
def _centred_indicators(split, q, out, means, varying):  # pragma: no cover - compiled
    m, c, d = split.shape
    for i in range(m):
        qi = q[i]
        total = 0
        for j in range(c):
            r = split[i, j]
            count = 0
            for t in range(d):
                count += r[t] <= qi
            mu = count / d
            means[i, j] = mu
            o = out[i, j]
            for t in range(d):
                o[t] = (1.0 if r[t] <= qi else 0.0) - mu
            total += count
        varying[i] = 0 < total < c * d


def centred_indicators(split: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The indicators ``split <= q[:, None, None]`` of (sample, chain, draw) float32 / float64 draws (compared in
    float64) as float64 0 / 1, each chain centred at its mean: (centred (sample, chain, draw), the chain means
    (sample, chain), whether each sample's indicators vary (sample,)). numpy's values: a sum of zeros and ones is
    exact in any order, so each mean is numpy's ``mean``; a sample varies when it holds both values (ArviZ's test
    of a constant array, max - min >= float64's resolution, for zeros and ones)."""
    if split.dtype not in (np.float32, np.float64):
        split = split.astype(np.float64)
    split = np.require(split, requirements=("C", "W"))  # (a read-only array: a copy)
    m, c, d = split.shape
    out, means, varying = np.empty((m, c, d)), np.empty((m, c)), np.empty(m, dtype=np.bool_)
    if m:
        _centred_indicators(split, np.ascontiguousarray(q, dtype=np.float64), out, means, varying)
    return out, means, varying


# --- the trace gates' fast path (bif.quality.aggregates._stream_stats) ----------------------------------------------
def _ro(t):  # a read-only C array type; writable arrays convert to it (Arrow's zero-copy arrays are read-only)
    return nb.types.Array(t, 1, "C", readonly=True)


@nb.njit(nb.boolean(_ro(nb.int8), _ro(nb.int64), _ro(nb.int64), _ro(nb.int32), _ro(nb.int32), nb.int64, nb.int64,
                    nb.int64, nb.int64, nb.int64), cache=True, nogil=True)
def _sample_keys_match(codes, remap, sample, draw, chains, start, nd, n_train, draw_start, chain
                       ):  # pragma: no cover - compiled
    n = codes.shape[0]
    var = start // nd  # row start + i holds draw d of variable var: counted on, no division per row
    d = start - var * nd
    k = remap.shape[0]
    for i in range(n):
        query = 1 if var >= n_train else 0
        code = codes[i]
        if code < 0 or code >= k or remap[code] != query or sample[i] != var - query * n_train \
                or draw[i] != d + draw_start or chains[i] != chain:
            return False
        d += 1
        if d == nd:
            d = 0
            var += 1
    return True


def sample_keys_match(codes: np.ndarray, remap: np.ndarray, sample: np.ndarray, draw: np.ndarray,
                      chains: np.ndarray, *, start: int, num_draws: int, n_train: int, draw_start: int,
                      chain: int) -> bool:
    """Whether the keys of rows ``start``, ``start + 1``, ... of a sample run's trace file are those its writer gives
    them: train samples, then query samples, each ``num_draws`` draws in a row from ``draw_start``, all of ``chain``.

    ``codes``: the ``split`` column's dictionary indices (int8), ``remap`` each dictionary entry's split index
    (:data:`bif.schema.SPLITS` order; 2 for another name); ``sample`` int64, ``draw`` and ``chains`` int32, as
    :func:`bif.schema.trace_schema` stores them. One pass, where numpy's equality tests made eight (the
    expected keys, then their comparisons): 50,500 rows in about 0.14 ms instead of 0.6 ms."""
    return bool(_sample_keys_match(codes, remap, sample, draw, chains, start, num_draws, n_train, draw_start, chain))


@nb.njit([nb.types.UniTuple(nb.int64, 2)(_ro(t), _F64, _F64) for t in (_F32, _F64)], cache=True, nogil=True)
def _loss_flag_counts(loss, low, high):  # pragma: no cover - compiled
    bad = 0
    oob = 0
    for x in loss:
        v = np.float64(x)
        if not np.isfinite(v):
            bad += 1
        elif v < low or v > high:
            oob += 1
    return bad, oob


def loss_flag_counts(loss: np.ndarray, low: float, high: float) -> tuple[int, int]:
    """(losses that are NaN or infinite, finite losses outside [low, high]) of a float32 / float64 array, compared in
    float64: the counts of numpy's ``~isfinite(loss)`` and ``~bad & ((loss < low) | (loss > high))``, in either
    dtype (a bound float32 holds exactly compares alike in both)."""
    bad, oob = _loss_flag_counts(np.ascontiguousarray(loss), float(low), float(high))
    return int(bad), int(oob)


# --- the result gates' chunk aggregates (bif.quality.aggregates.block_stats) ----------------------------------------
@nb.njit([nb.types.UniTuple(nb.int64, 4)(_ro(t)) for t in (_F32, _F64)], cache=True, nogil=True)
def _finite_extremes(a):  # pragma: no cover - compiled
    n_bad = 0
    first_bad = -1
    lo = -1
    hi = -1
    for k in range(a.shape[0]):
        v = a[k]
        if not np.isfinite(v):
            if n_bad == 0:
                first_bad = k
            n_bad += 1
        else:
            if lo < 0 or v < a[lo]:
                lo = k
            if hi < 0 or v > a[hi]:
                hi = k
    return n_bad, first_bad, lo, hi


def finite_extremes(a: np.ndarray) -> tuple[int, int, int, int]:
    """(non-finite values, flat index of the first, of the first finite minimum, of the first finite maximum; -1 for
    none) of a float32 / float64 array in C order, in one pass: the positions numpy's ``argwhere(~isfinite(a))[0]``,
    and ``argmin`` / ``argmax`` of ``a`` with its non-finite values masked by -/+inf, give (each the first of equal
    values), where numpy made four passes and two temporaries."""
    n_bad, first, lo, hi = _finite_extremes(np.ascontiguousarray(a).reshape(-1))
    return int(n_bad), int(first), int(lo), int(hi)

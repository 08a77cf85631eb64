"""One output block of the covariance in compiled passes (numba): its moments, its two outputs, and its top-k in
both directions.

Pure numpy + numba; nothing here knows about storage or Dask. :mod:`bif.tasks.covariance` calls these for each
output block (a train rows x b query columns) and keeps its numpy path for what they decline (a non-finite value,
a column whose ties overflow the candidate buffer).

**Moments.** :func:`row_moments` takes the traces in the layout a trace file stores them, one row of draws per
variable (``(a, D)``: a variable's draws are contiguous), and makes :func:`bif.moments.from_draws`' float32-GEMM
state from them in two passes per row: the mean (float64, summed in draw order, so equal to numpy's
``x.mean(axis=0)`` bit for bit; a constant row's mean is its value, so its m2 is exactly 0), then the centred
draws in float32 and m2 in float64, then one float32 GEMM. numpy needed the draws transposed into ``(D, a)``
float64 first, then six passes over them (a 3,334 x 1,000 block at 400 draws, its GEMM included: 30 -> 22.5 ms
in one process, and the read no longer converts).

**Outputs.** :func:`stack_outputs` computes, in one pass over the float32 comoment and with numpy's float32
rounding step for step (``bif.tasks.covariance._negated_outputs``)::

    bif  = f32(C) * f32(-1 / (n - ddof))
    corr = clip(f32(C) * f32(-1 / sqrt(m2_x)) * f32(1 / sqrt(m2_y)) + 0, -1, 1)    (0 where an m2 is 0)

numpy made five passes for ``corr`` and one for ``bif``, each with its own temporaries.

**Top-k.** Per column, the first k rows of one total order (value descending, ties to the smaller row) and the
last k (reported most negative first). :func:`topk_rows` finds them without sorting or transposing the block:

1. one row-major pass takes the maximum and the minimum of every group of ``group`` consecutive rows;
2. per column, the k-th largest group maximum ``T`` is a lower bound of the k-th largest value: each of the k
   groups whose maximum is at least ``T`` holds a value at least ``T``. So every row of the first k, and every
   value tied with the k-th, is at least ``T`` (symmetrically for the minima);
3. a second pass collects, per column, the rows at or beyond the bound (about 2k of them for untied values);
4. an insertion sort of those candidates by the order gives the exact selection.

A column with more than ``cap`` candidates (many ties, e.g. a constant query trace) is flagged for the caller's
exact path; a non-finite value anywhere declines the whole block.

**Batch means of sampled pairs.** :func:`pair_batch_means` is the diagnostics' MCSE of a sample of (train, query)
pairs (:func:`bif.quality.diagnostics._pair_mcse`): per pair, the products of its two centred rows summed over each
batch of draws, in one pass with no temporaries (numpy gathered both rows of every pair into (pairs, draws) arrays
and multiplied them; the whole MCSE of 8,192 pairs x 200 draws, centring included: 12 -> 5 ms).
"""
from __future__ import annotations

import numba as nb
import numpy as np

from bif.moments import Moments, inv_sqrt

_F32, _F64 = nb.float32, nb.float64


def _rows(dtype, readonly=False):
    return nb.types.Array(dtype, 2, "C", readonly=readonly)


@nb.njit([nb.void(_rows(t, ro), _F32[:, ::1], _F64[::1], _F64[::1]) for t in (_F32, _F64) for ro in (False, True)],
         cache=True, nogil=True)  # read-only: rows viewing a decoded Parquet column
def _centre_rows(src, dst, mean, m2):  # pragma: no cover - compiled
    a, d = src.shape
    for i in range(a):
        row, first = src[i], src[i, 0]
        s = 0.0
        same = True
        for k in range(d):
            v = row[k]
            s += np.float64(v)
            same &= v == first  # False for NaN
        m = np.float64(first) if same else s / d
        q = 0.0
        out = dst[i]
        for k in range(d):
            c = np.float64(row[k]) - m
            out[k] = np.float32(c)
            q += c * c
        mean[i] = m
        m2[i] = q


def centre_rows(rows: np.ndarray, *, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centred float32 (a, D), mean float64 (a,), m2 float64 (a,)) of ``rows`` (a, D), D >= 1.

    The mean as numpy's ``rows.T.mean(axis=0)`` in float64 (same summation order; the value itself for a constant
    row), the centring in float64 rounded to float32, m2 the float64 sum of squares of the float64 centred draws.
    ``overwrite``: the centred draws may replace a C-contiguous float32 ``rows`` (the caller's own buffer).
    """
    src = np.ascontiguousarray(rows)
    if src.dtype not in (np.float32, np.float64):
        src = src.astype(np.float64)
    a, d = src.shape
    if d == 0:
        raise ValueError("centre_rows needs at least one draw")
    own = overwrite or src is not rows
    dst = src if own and src.dtype == np.float32 and src.flags.writeable else np.empty((a, d), np.float32)
    mean, m2 = np.empty(a), np.empty(a)
    _centre_rows(src, dst, mean, m2)
    return dst, mean, m2


def row_moments(x_rows: np.ndarray, y_rows: np.ndarray, *, overwrite: bool = False) -> Moments:
    """:func:`bif.moments.from_draws` ``(x_rows.T, y_rows.T, dtype="float32")`` from rows of draws per variable.

    ``x_rows`` (a, D) and ``y_rows`` (b, D), float32 or float64, C-contiguous or not. The means are equal to
    from_draws' bit for bit and the m2 to float64 rounding (a sequential sum instead of einsum's); the comoment is
    the float32 GEMM of the same float32 centred draws, whose rounding may differ with BLAS' kernel by the
    float32 GEMM's own error (see :func:`bif.moments.from_draws`). ``overwrite``: see :func:`centre_rows`.
    """
    if x_rows.shape[1] != y_rows.shape[1]:
        raise ValueError(f"x and y must have the same number of draws, got {x_rows.shape[1]} and {y_rows.shape[1]}")
    xc, mean_x, m2_x = centre_rows(x_rows, overwrite=overwrite)
    yc, mean_y, m2_y = centre_rows(y_rows, overwrite=overwrite)
    return Moments(n=x_rows.shape[1], mean_x=mean_x, mean_y=mean_y, m2_x=m2_x, m2_y=m2_y, comoment=xc @ yc.T)


@nb.njit([nb.boolean(_F32[:, ::1], _F32, _F32[::1], _F32[::1], _F32[:, ::1], _F32[:, ::1]),
          nb.boolean(_F64[:, ::1], _F32, _F32[::1], _F32[::1], _F32[:, ::1], _F32[:, ::1])],
         cache=True, nogil=True)
def _stack_outputs(com, scale, neg_inv_x, inv_y, bif, corr):  # pragma: no cover - compiled
    a, b = com.shape
    finite = True
    for i in range(a):
        nx = neg_inv_x[i]
        crow, brow, rrow = com[i], bif[i], corr[i]
        for j in range(b):
            c = np.float32(crow[j])
            v = c * scale
            brow[j] = v
            t = c * nx * inv_y[j] + np.float32(0.0)  # + 0: -0.0 -> 0.0 where an m2 is 0
            rrow[j] = min(max(t, np.float32(-1.0)), np.float32(1.0))
            finite &= (v - v) == 0  # False for NaN and +-inf
    return finite


def stack_outputs(comoment: np.ndarray, *, n: int, ddof: int, m2_x: np.ndarray, m2_y: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """(bif, bif_corr) float32 (a, b) of one pooled state, as ``_negated_outputs`` computes them in numpy, bit for
    bit; None when a value is not finite (the caller's numpy path then decides). ``comoment`` float32 or float64."""
    com = np.ascontiguousarray(comoment)
    if com.dtype not in (np.float32, np.float64):
        return None
    neg_inv_x, inv_y = (-inv_sqrt(m2_x)).astype(np.float32), inv_sqrt(m2_y).astype(np.float32)
    bif, corr = np.empty(com.shape, np.float32), np.empty(com.shape, np.float32)
    ok = _stack_outputs(com, np.float32(-1.0 / (n - ddof)), neg_inv_x, inv_y, bif, corr)
    return (bif, corr) if ok else None


@nb.njit(inline="always")
def _kth(col, n, kth):  # pragma: no cover - compiled
    """The kth smallest (0-based) of ``col[:n]``, selected in place (Hoare's quickselect; any ties)."""
    lo, hi = 0, n - 1
    while lo < hi:
        pivot = col[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while col[i] < pivot:
                i += 1
            while col[j] > pivot:
                j -= 1
            if i <= j:
                col[i], col[j] = col[j], col[i]
                i += 1
                j -= 1
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            break
    return col[kth]


@nb.njit(inline="always")
def _first_k(values, j, rows, n, kk, largest, vals, out):  # pragma: no cover - compiled
    """``out[:kk]`` = the first kk of candidate ``rows[:n]`` of column j in the order (value descending, smaller
    row first) when ``largest``, else in (value ascending, larger row first); insertion sort in ``vals``/``rows``."""
    for s in range(n):
        v, r = values[rows[s], j], rows[s]
        t = s
        while t > 0:
            pv, pr = vals[t - 1], rows[t - 1]
            if largest:
                before = v > pv or (v == pv and r < pr)
            else:
                before = v < pv or (v == pv and r > pr)
            if not before:
                break
            vals[t], rows[t] = pv, pr
            t -= 1
        vals[t], rows[t] = v, r
    for s in range(kk):
        out[s] = rows[s]


@nb.njit(nb.types.Tuple((nb.int64[:, ::1], nb.int64[:, ::1], nb.boolean[::1], nb.boolean))(
    _F32[:, ::1], nb.int64, nb.int64, nb.int64), cache=True, nogil=True)
def _topk_rows(values, k, group, cap):  # pragma: no cover - compiled
    a, b = values.shape
    kk = min(k, a)
    num_groups = (a + group - 1) // group
    gmax = np.empty((b, num_groups), values.dtype)  # (b, G): each column's bounds selected in place
    gmin = np.empty((b, num_groups), values.dtype)
    hi = np.empty(b, values.dtype)
    lo = np.empty(b, values.dtype)
    finite = True
    for g in range(num_groups):  # 1. group maxima and minima, row-major
        row = values[g * group]
        for j in range(b):
            v = row[j]
            hi[j] = v
            lo[j] = v
            finite &= (v - v) == 0  # False for NaN and +-inf
        for i in range(g * group + 1, min(a, (g + 1) * group)):
            row = values[i]
            for j in range(b):
                v = row[j]
                hi[j] = v if v > hi[j] else hi[j]
                lo[j] = v if v < lo[j] else lo[j]
                finite &= (v - v) == 0
        for j in range(b):
            gmax[j, g] = hi[j]
            gmin[j, g] = lo[j]
    pos = np.zeros((b, kk), np.int64)
    neg = np.zeros((b, kk), np.int64)
    ok = np.zeros(b, np.bool_)
    if not finite:
        return pos, neg, ok, False
    t_pos = np.empty(b, values.dtype)  # 2. bounds: the kk-th largest group maximum, the kk-th smallest minimum
    t_neg = np.empty(b, values.dtype)
    for j in range(b):
        t_pos[j] = _kth(gmax[j], num_groups, num_groups - kk)
        t_neg[j] = _kth(gmin[j], num_groups, kk - 1)
    n_pos = np.zeros(b, np.int64)  # 3. candidates, in row order
    n_neg = np.zeros(b, np.int64)
    c_pos = np.empty((b, cap), np.int64)
    c_neg = np.empty((b, cap), np.int64)
    for i in range(a):
        row = values[i]
        for j in range(b):
            v = row[j]
            if v >= t_pos[j]:
                c = n_pos[j]
                if c < cap:
                    c_pos[j, c] = i
                n_pos[j] = c + 1
            if v <= t_neg[j]:
                c = n_neg[j]
                if c < cap:
                    c_neg[j, c] = i
                n_neg[j] = c + 1
    vals = np.empty(cap, values.dtype)
    for j in range(b):  # 4. exact selection among the candidates
        if kk <= n_pos[j] <= cap and kk <= n_neg[j] <= cap:
            ok[j] = True
            _first_k(values, j, c_pos[j], n_pos[j], kk, True, vals, pos[j])
            _first_k(values, j, c_neg[j], n_neg[j], kk, False, vals, neg[j])
    return pos, neg, ok, True


def topk_rows(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Row indices of the first and the last ``min(k, a)`` rows per column of ``values`` (a, b) in the order value
    descending, ties to the smaller row: (pos (kk, b) best first, neg (kk, b) most negative first, ok (b,) bool).

    Columns with ``ok`` False (more tied candidates than the buffer holds) carry no answer; None when a value is
    not finite or not float32 (a float64 output keeps the numpy path).
    """
    v = np.ascontiguousarray(values)
    if v.dtype != np.float32 or v.ndim != 2 or 0 in v.shape or k < 1:
        return None
    a = v.shape[0]
    kk = min(k, a)
    group = max(1, a // (2 * kk))  # about 2k groups: ~1.35k candidates per column for untied values
    pos, neg, ok, finite = _topk_rows(v, int(k), int(group), int(min(a, 4 * kk + 2 * group + 32)))
    return (pos.T, neg.T, ok) if finite else None


@nb.njit(nb.void(_F64[:, ::1], _F64[:, ::1], nb.int64[::1], nb.int64[::1], nb.int64[::1], _F64[::1], _F64[::1],
                 _F64[::1]), cache=True, nogil=True)
def _pair_batch_means(x, y, ti, qj, cuts, inv_len, mcse, total_z):  # pragma: no cover - compiled
    n, k = x.shape[1], cuts.shape[0]
    for p in range(ti.shape[0]):
        xr, yr = x[ti[p]], y[qj[p]]
        total, total_sq, whole = 0.0, 0.0, 0.0
        for b in range(k):
            end = cuts[b + 1] if b + 1 < k else n
            s = 0.0
            for t in range(cuts[b], end):
                s += xr[t] * yr[t]
            m = s * inv_len[b]
            total += m
            total_sq += m * m
            whole += s
        mcse[p] = np.sqrt(max(total_sq - total * total / k, 0.0) / (k - 1) / k)
        total_z[p] = whole


def pair_batch_means(x: np.ndarray, y: np.ndarray, ti: np.ndarray, qj: np.ndarray, cuts: np.ndarray,
                     inv_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(MCSE, sum of z) of the pairs (ti[p], qj[p]), each (P,), from centred rows ``x`` (a, N) and ``y`` (b, N).

    z_t = x[ti, t] y[qj, t]; the K = ``len(cuts)`` batches are ``cuts[b]:cuts[b + 1]`` (the last to N) with
    means m_b = sum(z over the batch) x ``inv_len[b]``; MCSE = sqrt(max(sum m_b^2 - (sum m_b)^2 / K, 0) / (K - 1) / K).
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    ti = np.ascontiguousarray(ti, dtype=np.int64)
    qj = np.ascontiguousarray(qj, dtype=np.int64)
    mcse, total_z = np.empty(len(ti)), np.empty(len(ti))
    _pair_batch_means(x, y, ti, qj, np.ascontiguousarray(cuts, dtype=np.int64),
                      np.ascontiguousarray(inv_len, dtype=np.float64), mcse, total_z)
    return mcse, total_z

"""The measurement layout: which variables a trace draw records, and every offset of them in one place.

Pure numpy (names from :mod:`bif.schema`): nothing here reads or writes files.

A draw of a trace records one loss per *variable*. A variable is a sample (one loss per
sample per draw, today) or a (sample, position) token of a sequence (one loss per token,
for language models). Variables are ordered split by split (:data:`bif.schema.SPLITS`:
train, then query), samples ascending within a split and positions ascending within a
sample; the *variable index* v numbers them from 0 over all splits. A trace file of one
block of D draws holds the loss of variable v at draw ``draw_start + d`` in row

    r = v·D + d        (bif.schema.TRACE_ROW_ORDER: split, sample[, position], draw)

so each split's rows reshape to (variables, D). :class:`Variables` computes these offsets
and their inverse; the trace store, the trace aggregates and the trace gates all use it.

Token positions: a token variable's ``position`` is its true index along T of the loss
tensor ``(B, T)`` (masked positions are skipped and never become variables). Without
explicit ``positions`` the valid tokens of a sample are positions ``0..count-1``; with them
(:meth:`Variables.of_tokens` ``train_positions`` / ``query_positions``: per split one int64
array over its variables, ascending within each sample) every ``position`` argument and
result is that true index.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np

from bif import schema as S
from bif.errors import BifError


class RowKeys(NamedTuple):
    """Keys of the rows of a trace block, in row order: each (rows,) integers."""

    split: np.ndarray  # index into Variables.splits
    sample: np.ndarray  # sample index within the split
    position: np.ndarray  # token position within the sample (0 for sample variables)
    draw: np.ndarray  # draw offset d within the block (the draw is draw_start + d)


@dataclass(frozen=True, eq=False)
class Variables:
    """The variables of one trace draw: per split a number of samples, each one variable or one per token.

    ``sample_counts[k]``: samples of split ``splits[k]``. ``token_counts``: None for one
    variable per sample, else per split an int64 array (n_k,) of the token positions per
    sample (a sample with 0 tokens has no variables). Build with :meth:`of_samples` or
    :meth:`of_tokens`. Index arguments are numpy arrays (vectorized) or ints.
    """

    sample_counts: tuple[int, ...]
    token_counts: tuple[np.ndarray, ...] | None = None
    splits: tuple[str, ...] = field(default=S.SPLITS)
    #: per split an int64 array (variables of the split,): true position of each token variable
    #: along T (None: positions 0..count-1 of each sample)
    positions: tuple[np.ndarray, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.sample_counts) != len(self.splits) or any(int(n) < 0 for n in self.sample_counts):
            raise BifError(f"sample_counts {self.sample_counts} must give one count >= 0 per split {self.splits}")
        if self.token_counts is not None:
            tokens = tuple(np.asarray(t, dtype=np.int64).reshape(-1) for t in self.token_counts)
            if len(tokens) != len(self.splits) or any(len(t) != n for t, n in zip(tokens, self.sample_counts)) \
                    or any((t < 0).any() for t in tokens):
                raise BifError(f"token_counts must give, per split {self.splits}, one count >= 0 per sample "
                               f"(sample_counts {self.sample_counts}); got lengths {[len(t) for t in tokens]}")
            object.__setattr__(self, "token_counts", tokens)
        if self.positions is not None:
            if self.token_counts is None:
                raise BifError("positions are given for sample variables; they belong to token variables only")
            pos = tuple(np.asarray(p, dtype=np.int64).reshape(-1) for p in self.positions)
            if len(pos) != len(self.splits) or any(len(p) != int(t.sum()) for p, t in zip(pos, self.token_counts)):
                raise BifError(f"positions must give, per split {self.splits}, one position per token variable "
                               f"({[int(t.sum()) for t in self.token_counts]}); got {[len(p) for p in pos]}")
            flat = np.concatenate(pos)
            if (flat < 0).any():
                raise BifError("token positions must be >= 0")
            starts = self._var_start[:-1][np.diff(self._var_start) > 0]  # first variable of each non-empty sample
            step = np.diff(flat)
            first = np.zeros(len(flat), dtype=bool)
            first[starts] = True
            if (step <= 0)[~first[1:]].any():
                raise BifError("token positions must be strictly ascending within each sample")
            object.__setattr__(self, "positions", pos)

    @classmethod
    def of_samples(cls, *, n_train: int, n_query: int) -> "Variables":
        """One variable per sample: n_train train and n_query query samples."""
        return cls(sample_counts=(int(n_train), int(n_query)))

    @classmethod
    def of_tokens(cls, *, train_tokens: Sequence[int] | np.ndarray, query_tokens: Sequence[int] | np.ndarray,
                  train_positions: np.ndarray | None = None, query_positions: np.ndarray | None = None
                  ) -> "Variables":
        """One variable per (sample, position) token; ``train_tokens[i]``: valid tokens of train sample i (and query).

        ``train_positions`` / ``query_positions``: the true index along T of each token
        variable of the split (ascending within a sample); None: ``0..count-1``.
        """
        tr, qu = (np.asarray(t, dtype=np.int64).reshape(-1) for t in (train_tokens, query_tokens))
        if (train_positions is None) != (query_positions is None):
            raise BifError("give both train_positions and query_positions, or neither")
        pos = None if train_positions is None else (train_positions, query_positions)
        return cls(sample_counts=(len(tr), len(qu)), token_counts=(tr, qu), positions=pos)

    @cached_property
    def _true_positions(self) -> np.ndarray | None:
        """(variables,) true position of every variable, or None when positions are implicit."""
        return None if self.positions is None else np.concatenate(self.positions)

    @cached_property
    def _keys(self) -> np.ndarray:
        """(variables,) strictly increasing key g·M + position (M > every position): the inverse of :meth:`variable`."""
        g = np.repeat(np.arange(len(self._var_start) - 1, dtype=np.int64), np.diff(self._var_start))
        return g * self._span + self._true_positions

    @cached_property
    def _span(self) -> int:
        return int(self._true_positions.max()) + 1 if self._true_positions.size else 1

    def token_positions(self, split: str) -> np.ndarray:
        """(variables of ``split``,) int64: the true position of each token variable of ``split``."""
        k = self.split_index(split)
        if self.positions is not None:
            return self.positions[k]
        if self.token_counts is None:
            return np.zeros(self.num_samples(split), dtype=np.int64)
        t = self.token_counts[k]
        return np.arange(int(t.sum()), dtype=np.int64) - np.repeat(np.r_[0, np.cumsum(t)[:-1]], t)

    def token_samples(self, split: str) -> np.ndarray:
        """(variables of ``split``,) int64: the sample of each variable of ``split``."""
        k = self.split_index(split)
        n = self.num_samples(split)
        if self.token_counts is None:
            return np.arange(n, dtype=np.int64)
        return np.repeat(np.arange(n, dtype=np.int64), self.token_counts[k])

    def first_variable(self, split: str) -> int:
        """Variable index (over all splits) of ``split``'s first variable."""
        return int(self._split_var_start[self.split_index(split)])

    def sample_var_bounds(self, split: str) -> np.ndarray:
        """(samples + 1,) int64: variables ``[b[i], b[i+1])`` of ``split`` belong to its sample i (split-local)."""
        k = self.split_index(split)
        n = self.num_samples(split)
        if self.token_counts is None:
            return np.arange(n + 1, dtype=np.int64)
        return np.r_[0, np.cumsum(self.token_counts[k])].astype(np.int64)

    # -- counts ----------------------------------------------------------------------------
    @property
    def is_tokens(self) -> bool:
        """True if the variables are (sample, position) tokens."""
        return self.token_counts is not None

    def split_index(self, split: str) -> int:
        """Index of ``split`` in :attr:`splits`."""
        try:
            return self.splits.index(split)
        except ValueError:
            raise BifError(f"unknown split {split!r}; the trace's splits are {list(self.splits)}") from None

    def num_samples(self, split: str) -> int:
        """Samples of ``split``."""
        return int(self.sample_counts[self.split_index(split)])

    def num_variables(self, split: str | None = None) -> int:
        """Variables of ``split`` per draw (None: of all splits)."""
        if split is None:
            return int(self._split_var_start[-1])
        k = self.split_index(split)
        return int(self._split_var_start[k + 1] - self._split_var_start[k])

    def num_rows(self, num_draws: int) -> int:
        """Rows of a trace block of ``num_draws`` draws."""
        return self.num_variables() * int(num_draws)

    @cached_property
    def _sample_start(self) -> np.ndarray:
        """(splits + 1,) global index of each split's first sample (samples numbered over all splits)."""
        return np.r_[0, np.cumsum(np.asarray(self.sample_counts, dtype=np.int64))].astype(np.int64)

    @cached_property
    def _var_start(self) -> np.ndarray | None:
        """(samples + 1,) variable index of each global sample's first token; None for sample variables."""
        if self.token_counts is None:
            return None
        return np.r_[0, np.cumsum(np.concatenate(self.token_counts))].astype(np.int64)

    @cached_property
    def _split_var_start(self) -> np.ndarray:
        """(splits + 1,) variable index of each split's first variable."""
        if self._var_start is None:
            return self._sample_start
        return self._var_start[self._sample_start]

    # -- variable index <-> (split, sample, position) ---------------------------------------
    def variable(self, split, sample, position=0):
        """Variable index of (split index, sample within the split, token position); vectorized."""
        g = self._sample_start[split] + sample
        if self._var_start is None:
            return g + position
        if self.positions is None:
            return self._var_start[g] + position
        return np.searchsorted(self._keys, np.asarray(g, dtype=np.int64) * self._span + position)

    def locate(self, variable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inverse of :meth:`variable`: (split index, sample within the split, position), each int64."""
        v = np.asarray(variable, dtype=np.int64)
        if self._var_start is None:
            g, pos = v, np.zeros_like(v)
        else:  # the last sample starting at or before v (samples with 0 tokens are skipped by 'right')
            g = np.searchsorted(self._var_start, v, side="right") - 1
            pos = v - self._var_start[g] if self.positions is None else self._true_positions[v]
        split = np.searchsorted(self._sample_start, g, side="right") - 1
        return split, g - self._sample_start[split], pos

    def in_range(self, split, sample, position=0) -> np.ndarray:
        """Whether (split index, sample, position) names a variable of this layout; vectorized, any ints."""
        split, sample, position = (np.asarray(x, dtype=np.int64) for x in (split, sample, position))
        n = len(self.splits)
        ok_split = (split >= 0) & (split < n)
        k = np.where(ok_split, split, 0)
        counts = np.r_[np.asarray(self.sample_counts, dtype=np.int64), 0]
        ok = ok_split & (sample >= 0) & (sample < counts[np.where(ok_split, split, n)])
        if self._var_start is None:
            return ok & (position == 0)
        tokens = np.r_[np.diff(self._var_start), 0]  # per global sample, and 0 for "no sample"
        g = np.where(ok, self._sample_start[k] + sample, len(tokens) - 1)
        if self.positions is None:
            return ok & (position >= 0) & (position < tokens[g])
        ok = ok & (position >= 0) & (position < self._span)
        key = np.where(ok, g * self._span + position, -1)
        if not len(self._keys):
            return ok & False
        at = np.clip(np.searchsorted(self._keys, key), 0, len(self._keys) - 1)
        return ok & (self._keys[at] == key)

    # -- rows of a trace block -------------------------------------------------------------
    @staticmethod
    def row(variable, draw, num_draws: int):
        """Row of (variable index, draw offset within the block) in a block of ``num_draws`` draws."""
        return variable * num_draws + draw

    def unrow(self, row, num_draws: int) -> RowKeys:
        """Inverse of :meth:`row` composed with :meth:`variable`: the keys of ``row``."""
        v, d = np.divmod(np.asarray(row, dtype=np.int64), int(num_draws))
        split, sample, position = self.locate(v)
        return RowKeys(split=split, sample=sample, position=position, draw=d)

    def row_range(self, split: str, start: int, stop: int, num_draws: int) -> tuple[int, int]:
        """Rows ``[r0, r1)`` of every variable of samples ``[start, stop)`` of ``split`` (they are contiguous)."""
        k = self.split_index(split)
        if not 0 <= start <= stop <= self.sample_counts[k]:
            raise BifError(f"samples [{start}, {stop}) are outside {split!r}'s {self.sample_counts[k]} samples")
        g0, g1 = int(self._sample_start[k]) + start, int(self._sample_start[k]) + stop
        v0, v1 = (g0, g1) if self._var_start is None else (int(self._var_start[g0]), int(self._var_start[g1]))
        return v0 * num_draws, v1 * num_draws

    def row_keys(self, num_draws: int) -> RowKeys:
        """Keys of every row of a block of ``num_draws`` draws, in row order (as the trace files store them).

        Compact dtypes (the trace writer's hot path): split int8, sample and position int64,
        draw int32; for sample variables ``position`` is a read-only view of zeros.
        """
        nd = int(num_draws)
        n = int(self._sample_start[-1])
        split_of = np.repeat(np.arange(len(self.splits), dtype=np.int8), self.sample_counts)  # (samples,)
        sample_of = np.arange(n, dtype=np.int64) - self._sample_start[split_of]
        if self._var_start is None:
            position = None
        else:
            tokens = np.diff(self._var_start)
            split_of, sample_of = np.repeat(split_of, tokens), np.repeat(sample_of, tokens)  # (variables,)
            position = (np.arange(len(split_of), dtype=np.int64) - np.repeat(self._var_start[:-1], tokens)
                        if self.positions is None else self._true_positions)
        rows = len(split_of) * nd
        return RowKeys(split=np.repeat(split_of, nd), sample=np.repeat(sample_of, nd),
                       position=np.broadcast_to(np.int64(0), (rows,)) if position is None else np.repeat(position, nd),
                       draw=np.tile(np.arange(nd, dtype=np.int32), len(split_of)))


def sequence_sums(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-sample sums of token values along the last axis: ``values`` (..., variables), ``counts`` (n,) → (..., n).

    float64; a sample with 0 valid tokens sums to 0.
    """
    values = np.asarray(values, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros(values.shape[:-1] + (len(counts),), dtype=np.float64)
    nz = np.flatnonzero(counts > 0)
    if nz.size:
        starts = np.r_[0, np.cumsum(counts)[:-1]][nz]
        out[..., nz] = np.add.reduceat(values, starts, axis=-1)
    return out

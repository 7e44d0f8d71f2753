"""Ordered buckets of float32 scores, for curves over ~1e9 pixel scores in one streaming pass.

A float32's bit pattern, with the sign folded in, sorts exactly like the number, so
``key >> dropped_bits`` is an ordered bucket index that needs no global min/max (one pass
over a stream of maps) and is equally fine in relative terms at every magnitude. With the
default 8 dropped bits every octave [2^e, 2^(e+1)) holds 2^15 buckets: a bucket is at most
2^-15 (3e-5) of the score's magnitude wide, 1.5e-5 in [0.5, 1) — finer everywhere in [0, 1]
than 2^16 linear levels over [0, 1]. Scores in different buckets are ordered exactly; scores
sharing a bucket are treated as tied (the only approximation; metrics report a bound).
Maps are compared as float32, the precision of the official evaluation's TIFF maps.
"""

from __future__ import annotations

import numpy as np

DEFAULT_DROPPED_BITS = 8  # of float32's 23 mantissa bits; 2^15 buckets per octave
MAX_BUCKETS = 2**25  # a histogram range beyond this (>= 512 MB for 2 columns) is refused
_SIGN = np.uint32(0x80000000)


def float32_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys with ``key(a) < key(b)`` iff ``float32(a) < float32(b)``; NaN is refused."""
    values = np.asarray(scores, dtype=np.float32)
    if np.isnan(values).any():
        raise ValueError("scores contain NaN")
    # Adding +0.0 turns -0.0 into +0.0, so equal scores always share one key.
    bits = (values + np.float32(0.0)).view(np.uint32)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def score_buckets(scores: np.ndarray, dropped_bits: int = DEFAULT_DROPPED_BITS) -> np.ndarray:
    """Ordered bucket index (uint32, same shape) of each score."""
    if not 0 <= dropped_bits <= 23:
        raise ValueError(f"dropped_bits must be in 0..23, got {dropped_bits}")
    return float32_keys(scores) >> np.uint32(dropped_bits)


def bucket_floor(buckets: np.ndarray, dropped_bits: int = DEFAULT_DROPPED_BITS) -> np.ndarray:
    """The smallest float32 value of each bucket (float64 array): score >= floor <=> in bucket or above."""
    keys = np.asarray(buckets, dtype=np.uint32) << np.uint32(dropped_bits)
    bits = np.where(keys & _SIGN, keys & ~_SIGN, ~keys)
    with np.errstate(invalid="ignore"):  # NaN bit patterns, replaced below
        floors = bits.view(np.float32).astype(np.float64)
    # Keys below -inf's are NaN patterns; the bucket holding -inf starts at -inf.
    return np.where(np.isnan(floors), -np.inf, floors)


def bucket_counts(buckets: np.ndarray, weights: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """Per-bucket counts (or weight sums) over the range the buckets span: (first bucket, sums)."""
    flat = np.asarray(buckets).ravel()
    if flat.size == 0:
        return 0, np.zeros(0)
    start = int(flat.min())
    sums = np.bincount((flat - np.uint32(start)).astype(np.intp), weights=weights,
                       minlength=int(flat.max()) - start + 1)
    return start, sums


class BucketHistogram:
    """Per-bucket sums in ``columns`` columns over a dense bucket range that grows as needed.

    Float64 throughout: pixel counts stay exact up to 2^53. Memory is 8 bytes x columns per
    bucket of the spanned range (4M buckets for scores in [0, 1] with 8 dropped bits).
    """

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self._start = 0
        self._values = np.zeros((0, columns))

    def add(self, column: int, start: int, sums: np.ndarray) -> None:
        """Add ``sums`` to buckets ``start, start+1, ...`` of ``column``."""
        if len(sums) == 0:
            return
        self._cover(start, start + len(sums))
        offset = start - self._start
        self._values[offset:offset + len(sums), column] += sums

    def merge(self, other: "BucketHistogram") -> None:
        """Add another histogram's sums to this one (same column layout)."""
        for column in range(self.columns):
            self.add(column, other._start, other._values[:, column])

    def occupied(self) -> tuple[np.ndarray, np.ndarray]:
        """(buckets ascending, sums [n, columns]) of the buckets with any non-zero sum."""
        rows = np.flatnonzero(np.any(self._values != 0, axis=1))
        return rows.astype(np.int64) + self._start, self._values[rows]

    def _cover(self, start: int, stop: int) -> None:
        old_stop = self._start + len(self._values)
        if len(self._values) and start >= self._start and stop <= old_stop:
            return
        # Grow with 25% slack on the side that grew, so a slowly widening stream copies rarely.
        lo = min(start, self._start) if len(self._values) else start
        hi = max(stop, old_stop) if len(self._values) else stop
        if hi - lo > MAX_BUCKETS:
            raise ValueError(f"scores span {hi - lo} buckets (limit {MAX_BUCKETS}): drop more mantissa bits "
                             f"(dropped_bits >= {DEFAULT_DROPPED_BITS} always fits)")
        slack = (hi - lo) // 4
        lo = max(0, lo - slack) if start < self._start or not len(self._values) else lo
        hi = hi + slack if stop > old_stop or not len(self._values) else hi
        grown = np.zeros((hi - lo, self.columns))
        if len(self._values):
            grown[self._start - lo:self._start - lo + len(self._values)] = self._values
        self._start, self._values = lo, grown

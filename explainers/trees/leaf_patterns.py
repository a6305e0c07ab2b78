"""Interventional TreeSHAP for leaves with many path features: each leaf keeps the distinct
patterns of the background (which of its path conditions a background row fails), weighted,
and every explained row is compared with those patterns instead of with every background row.

For one leaf with k path features, an explained row x fails the set U of its conditions and a
background row z the set Q (u = |U|, c = |Q|). The pair adds to the leaf's Shapley values only
when U and Q are disjoint (no feature is outside the box for both), and then the game is the one
of explainers/trees/leaf_tables.py with A = Q and B = U: each feature of Q gets
w (c-1)! u! / (c+u)! and each feature of U gets -w c! (u-1)! / (c+u)!. Both are w r(c, u) times
u and c, with r(c, u) = (c-1)! (u-1)! / (c+u)! = 1 / (c u C(c+u, c)), so one coefficient per
(row, pattern) serves both sides. Background rows with the same Q in a leaf are one entry with
their total weight: a leaf has at most min(background rows, 2^k) entries, in practice far fewer
(background rows fail few of a deep leaf's conditions), and a row costs one disjointness test
and one coefficient per entry, whatever the number of background rows behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from explainers.base import Array

# distinct (leaf, pattern) pairs kept for one background: about 80 bytes each with the sparse
# matrix that spreads them, so at most ~80 MB (a fit must fit the service's fit cache to last)
MAX_ENTRIES = 1_000_000


_Part = tuple[Array, Array, Array]  # (leaf, failed, weight), (pairs,) each


class TooManyPatterns(Exception):
    """The background has too many distinct patterns to keep; use shap's walk for it."""


@dataclass(frozen=True)
class Patterns:
    """One background's distinct patterns on the leaves [0, leaves) of a leaf range whose slots
    (path features) are numbered leaf after leaf, bit j of a leaf's mask being its slot j."""

    full: Array  # (leaves,) int64: every slot of the leaf
    leaf: Array  # (entries,) intp, ascending: the entry's leaf
    failed: Array  # (entries,) int64: Q, the slots the entry's background rows fail
    at: Array  # (entries,) intp: leaf * (top + 1) + |Q|, the entry's row in `_coefficients`
    spread: sparse.csr_matrix  # (slots + leaves, entries): what one unit of coefficient adds
    slot_leaf: Array  # (slots,) intp
    slot_bit: Array  # (slots,) int64
    inside: Array  # (leaves,) background weight inside the leaf's whole box
    r: Array  # (top + 1, top + 1): r(c, u), with r(c, 0) = 1/c and r(0, u) = 1/u

    @staticmethod
    def fit(parts: list[_Part], ks: Array) -> Patterns:
        """From the background's distinct pairs, chunk by chunk (`PatternCounter`), and each
        leaf's slot count ks (leaves,)."""
        leaf, failed, weight = _distinct(*(np.concatenate(p) for p in zip(*parts, strict=True)))
        _check_size(leaf.size)
        top = int(ks.max())
        count = np.bitwise_count(failed).astype(np.intp)  # (entries,)
        starts = np.r_[0, np.cumsum(ks)[:-1]]  # (leaves,) each leaf's first slot
        return Patterns(
            full=_full(ks), leaf=leaf, failed=failed, at=leaf * (top + 1) + count,
            spread=_spread(leaf, failed, weight, count, starts, ks),
            slot_leaf=np.repeat(np.arange(ks.size), ks),
            slot_bit=np.concatenate([np.arange(k, dtype=np.int64) for k in ks]),
            inside=np.bincount(leaf[count == 0], weight[count == 0], minlength=ks.size),
            r=_coefficients(top))

    @property
    def entries(self) -> int:
        return int(self.leaf.size)

    def shares(self, masks: Array) -> Array:
        """Each slot's share of its leaf value for rows with masks (rows, leaves): (slots,
        rows). (np.take, not fancy indexing: several times faster for a few rows.)"""
        U = (~masks & self.full).T.copy()  # (leaves, rows): the slots each row fails
        u = np.bitwise_count(U).astype(np.intp)  # (leaves, rows)
        c = np.arange(self.r.shape[0])[None, :, None]
        by_count = self.r[c, u[:, None, :]].reshape(-1, masks.shape[0])  # (leaves * (top+1), rows)
        v = np.take(by_count, self.at, axis=0)  # (entries, rows): r(|Q|, |U|)
        v *= (np.take(U, self.leaf, axis=0) & self.failed[:, None]) == 0  # disjoint Q, U only
        out = self.spread @ v  # (slots + leaves, rows)
        slots = self.slot_leaf.size
        failing = (np.take(U, self.slot_leaf, axis=0) >> self.slot_bit[:, None]) & 1
        return np.asarray(out[:slots] * np.take(np.maximum(u, 1), self.slot_leaf, axis=0)
                          - np.take(out[slots:], self.slot_leaf, axis=0) * failing)


class PatternCounter:
    """Collects the background's distinct (leaf, failed slots) pairs chunk by chunk, reducing
    each chunk at once: memory follows the distinct pairs, not the background."""

    def __init__(self, ks: Array) -> None:
        self.ks = ks
        self._full = _full(ks)
        self._parts: list[_Part] = []
        self._kept = 0

    def add(self, masks: Array, weights: Array) -> None:
        """Masks (rows, leaves), bit j saying the row is inside slot j, and weights (rows,)."""
        leaves = np.broadcast_to(np.arange(self._full.size), masks.shape)  # (rows, leaves)
        w = np.broadcast_to(weights[:, None], masks.shape)
        self._parts.append(_distinct(leaves.ravel(), (~masks & self._full).ravel(), w.ravel()))
        self._kept += self._parts[-1][0].size
        if self._kept > 2 * MAX_ENTRIES:
            self._parts = [_distinct(*(np.concatenate(p)
                                       for p in zip(*self._parts, strict=True)))]
            self._kept = _check_size(self._parts[0][0].size)

    def patterns(self) -> Patterns:
        """The distinct pairs of everything added; TooManyPatterns past MAX_ENTRIES."""
        return Patterns.fit(self._parts, self.ks)


def _full(ks: Array) -> Array:
    """Every slot of each leaf: (leaves,) int64."""
    return (np.int64(1) << ks.astype(np.int64)) - 1


def _check_size(entries: int) -> int:
    if entries > MAX_ENTRIES:
        raise TooManyPatterns(f"the background has over {MAX_ENTRIES} distinct (leaf, pattern) "
                              "pairs")
    return entries


def _distinct(leaf: Array, failed: Array, weight: Array) -> tuple[Array, Array, Array]:
    """The distinct (leaf, failed) pairs in (leaf, failed) order and their summed weights,
    zero weights dropped: (entries,) each."""
    keep = weight > 0
    leaf, failed, weight = leaf[keep], failed[keep], weight[keep]
    order = np.lexsort((failed, leaf))
    leaf, failed, weight = leaf[order], failed[order], weight[order]
    new = np.r_[True, (leaf[1:] != leaf[:-1]) | (failed[1:] != failed[:-1])]
    starts = np.flatnonzero(new)
    return (leaf[starts].astype(np.intp), failed[starts].astype(np.int64),
            np.add.reduceat(weight, starts) if starts.size else weight[:0])


def _spread(leaf: Array, failed: Array, weight: Array, count: Array, starts: Array,
            ks: Array) -> sparse.csr_matrix:
    """(slots + leaves, entries): entry e's weight on the slots of its Q (the plus side, to be
    scaled by u), and weight * max(|Q|, 1) on its leaf's row (the minus side, to be spread over
    the row's failed slots)."""
    rows, cols = [], []
    slots = int(ks.sum())
    for j in range(int(ks.max())):
        has = np.flatnonzero((failed >> j) & 1)
        rows.append(starts[leaf[has]] + j)
        cols.append(has)
    e = np.arange(leaf.size)
    data = np.concatenate([*(weight[c] for c in cols), weight * np.maximum(count, 1)])
    return sparse.csr_matrix((data, (np.concatenate([*rows, slots + leaf]),
                                     np.concatenate([*cols, e]))),
                             shape=(slots + ks.size, leaf.size))


def _coefficients(top: int) -> Array:
    """r(c, u) = 1 / (c u C(c+u, c)) for c, u in [0, top], with r(c, 0) = 1/c (a row inside the
    box: Q's features share the value) and r(0, u) = 1/u (a background row inside it): (top+1,
    top+1), each entry correctly rounded from exact integers."""
    r = np.zeros((top + 1, top + 1))
    for c in range(top + 1):
        for u in range(top + 1):
            if c or u:
                r[c, u] = 1 / (max(c, 1) * max(u, 1) * math.comb(c + u, c))
    return r

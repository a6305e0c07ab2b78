"""Interventional TreeSHAP by per-leaf lookup tables and background patterns: exact, and with a
per-row cost that does not follow the background's size.

For one background row z, the ensemble evaluated at (x_S, z_rest) reaches leaf l iff every
feature on l's path takes a value inside l's box: x's value if the feature is in S, z's value
otherwise. Per path feature, x is inside or not (bit of the mask m) and z is inside or not
(bit of the pattern p). The leaf's share of v(S) is then the game
value_l * [A within S] * [B outside S], with A = features only x satisfies and B = features
only z satisfies (zero when a feature satisfies neither), whose Shapley values are closed-form:
(|A|-1)! |B|! / (|A|+|B|)! for each feature of A and -|A|! (|B|-1)! / (|A|+|B|)! for each of B.

Averaged over the background, a leaf's contribution depends on x only through m. For leaves with
few path features, every possible m (2^k of them for k path features) is tabulated once per
background, from graded subset sums of the background's pattern weights (k^2 2^k operations per
leaf); explaining a row is then one comparison and one look-up per (leaf, path feature). Leaves
with more path features than MAX_TABLE_FEATURES, or past MAX_TABLE_ENTRIES, keep the
background's distinct patterns instead (explainers/trees/leaf_patterns.py). That is what shap's C
code computes, without its walk over every background row. Leaves with more than
MAX_PATH_FEATURES path features are out of scope (`TablesTooLarge`): the caller uses shap's walk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from explainers.base import Array
from explainers.trees.leaf_patterns import PatternCounter, Patterns
from explainers.trees.onnx_trees import ParsedTrees, ShapTree

MAX_PATH_FEATURES = 52  # a mask is a sum of distinct powers of two, exact in float64 to 2^53
MAX_TABLE_FEATURES = 16  # a leaf's table has k 2^k entries; deeper leaves keep patterns
MAX_TABLE_ENTRIES = 4_000_000  # float64 table entries per background (32 MB)
CHUNK_ELEMENTS = 1 << 21  # (rows x slots) elements handled per step, to bound memory
CACHE_ELEMENTS = 1 << 19  # (rows x pattern entries) per step: the arrays stay in the caches

Box = dict[int, tuple[float, float, bool]]  # feature -> (lo, hi, NaN inside): lo < x <= hi


class TablesTooLarge(Exception):
    """The ensemble's leaves have too many path features for masks; use shap's walk."""


@dataclass(frozen=True)
class _Group:
    """The leaves with k path features: leaves [first, first + leaves) of the ensemble, whose
    k slots each are slots [start, start + leaves * k), leaf after leaf."""

    k: int
    leaves: int
    first: int
    start: int

    @property
    def entries(self) -> int:
        """Table entries: 2^k masks times k slots per leaf."""
        return self.leaves * self.k << self.k


@dataclass(frozen=True)
class LeafBoxes:
    """Every leaf with at least one split as a box over its path's features ("slots": one per
    path feature, in feature order), grouped by the number of path features k, ascending. Slot j
    of a leaf is bit j of the leaf's mask; NaN is inside a slot when every split on the path
    sends missing values toward the leaf. Leaves of single-leaf trees are folded into
    `constant`. The first `tabled` groups get tables, the others background patterns."""

    n_features: int
    groups: tuple[_Group, ...]
    tabled: int
    values: Array  # (leaves, targets)
    constant: Array  # (targets,) base offset plus the values of single-leaf trees
    feature: Array  # (slots,) the slot's feature
    lo: Array  # (slots,) x > lo; NaN where unbounded, so that -inf is inside
    hi: Array  # (slots,) x <= hi; +inf where unbounded
    nan: Array  # (slots,) bool: NaN is inside
    bits: sparse.csr_matrix  # (leaves, slots): 2^j from slot j of a leaf to the leaf
    ks: Array  # (leaves,) each leaf's number of path features

    @staticmethod
    def build(parsed: ParsedTrees, targets: Sequence[int]) -> LeafBoxes:
        """The boxes of every leaf of `parsed` on the `targets` columns; TablesTooLarge when a
        leaf has more than MAX_PATH_FEATURES features."""
        keep = list(targets)
        constant = np.asarray(parsed["base_offset"], np.float64)[keep].copy()  # (targets,)
        by_k: dict[int, list[tuple[Box, Array]]] = {}
        for tree in parsed["trees"]:
            for box, value in _tree_leaves(tree):
                if box:
                    by_k.setdefault(len(box), []).append((box, value[keep]))
                else:
                    constant += value[keep]
        if by_k and max(by_k) > MAX_PATH_FEATURES:
            raise TablesTooLarge(f"a leaf has {max(by_k)} path features (at most "
                                 f"{MAX_PATH_FEATURES})")
        return _pack(sorted(by_k), [by_k[k] for k in sorted(by_k)], constant,
                     parsed["n_features"], len(keep))

    @property
    def targets(self) -> int:
        return int(self.values.shape[1])

    @property
    def deep(self) -> tuple[int, int]:
        """The first leaf and first slot of the pattern groups (all leaves and slots if none)."""
        if self.tabled == len(self.groups):
            return self.values.shape[0], self.feature.size
        g = self.groups[self.tabled]
        return g.first, g.start

    @property
    def slots(self) -> int:
        return int(self.feature.size)

    @property
    def table_entries(self) -> int:
        return sum(g.entries for g in self.groups[:self.tabled])

    def pattern_bound(self, rows: int) -> int:
        """The most distinct patterns `rows` background rows can leave on the deep leaves."""
        ks = self.ks[self.deep[0]:]
        return int(np.minimum(float(rows), np.ldexp(1.0, ks)).sum())

    def engine(self) -> str:
        """Which leaves get tables and which get patterns, by path features k."""
        ks = [g.k for g in self.groups]
        parts = [f"leaf tables ({_span(ks[:self.tabled])})" if self.tabled else "",
                 f"background patterns ({_span(ks[self.tabled:])})" if ks[self.tabled:] else ""]
        return " and ".join(p for p in parts if p) or "trees without splits"

    def chunk(self, entries: int = 0) -> int:
        """Rows handled per step, so that (rows x slots) arrays stay near CHUNK_ELEMENTS and
        (rows x pattern entries) ones near CACHE_ELEMENTS."""
        return max(1, min(CHUNK_ELEMENTS // max(self.feature.size, 1),
                          CACHE_ELEMENTS // max(entries, 1)))

    def masks(self, X: Array, any_nan: bool) -> Array:
        """Bit j of (r, l) says row r of X (rows, features) is inside the j-th slot of leaf l:
        (rows, leaves) int64."""
        x = np.take(X.T, self.feature, axis=0)  # (slots, rows)
        inside = ~(x <= self.lo[:, None]) & (x <= self.hi[:, None])
        if any_nan:
            inside |= np.isnan(x) & self.nan[:, None]
        return np.asarray(self.bits @ inside.astype(np.float64)).T.astype(np.int64)

    def full(self) -> Array:
        """Each leaf's mask of a row inside its whole box: (leaves,) int64."""
        return (np.int64(1) << self.ks.astype(np.int64)) - 1


@dataclass(frozen=True)
class Counts:
    """A background seen through the leaves: weight per pattern of each tabled leaf, (leaves,
    2^k) per group, and the distinct patterns of the deep leaves."""

    tabled: list[Array]
    deep: PatternCounter

    def add(self, boxes: LeafBoxes, patterns: Array, weights: Array) -> None:
        """Fold in background rows with masks `patterns` (rows, leaves) and weights (rows,)."""
        for g, c in zip(boxes.groups, self.tabled, strict=False):
            c += _pattern_weights(patterns[:, g.first:g.first + g.leaves], weights, g.k)
        if self.deep.ks.size:
            self.deep.add(patterns[:, boxes.deep[0]:], weights)


@dataclass(frozen=True)
class LeafTables:
    """What one background leaves behind: explain any number of rows without touching it again.

    For a tabled group's leaf l and mask m, row l * 2^k + m of the group's table holds the k path
    features' shares of the leaf value; the other leaves keep the background's patterns.
    """

    boxes: LeafBoxes
    tables: tuple[Array, ...]  # per tabled group (leaves * 2^k, k)
    patterns: Patterns | None  # the leaves of the other groups
    weights: sparse.csr_matrix  # (features * targets, slots): share -> attribution
    expected: Array  # (targets,) weighted mean margin over the background

    @staticmethod
    def fit(boxes: LeafBoxes, data: Array, weights: Array) -> LeafTables:
        """Tabulate every leaf against the background `data` (rows, features) in the op's
        precision, with weights summing to one; TooManyPatterns when the deep leaves' patterns
        would be too many to keep."""
        return LeafTables.build(boxes, LeafTables.count(boxes, data, weights))

    @staticmethod
    def count(boxes: LeafBoxes, data: Array, weights: Array) -> Counts:
        """The pass over the background (cost: rows x slots): pattern weights per tabled
        leaf, distinct patterns of the others."""
        any_nan = bool(np.isnan(data).any())
        counts = Counts([np.zeros((g.leaves, 1 << g.k)) for g in boxes.groups[:boxes.tabled]],
                        PatternCounter(boxes.ks[boxes.deep[0]:]))
        step = boxes.chunk()
        for i in range(0, data.shape[0], step):  # chunks bound the (rows, leaves) arrays
            counts.add(boxes, boxes.masks(data[i:i + step], any_nan), weights[i:i + step])
        return counts

    @staticmethod
    def build(boxes: LeafBoxes, counts: Counts) -> LeafTables:
        """Tables from each tabled group's pattern weights (cost: k^2 2^k per leaf, whatever
        the background), the deep leaves' patterns, and the background's expected margin."""
        first, _ = boxes.deep
        expected = boxes.constant.copy()
        tables = []
        for g, c in zip(boxes.groups, counts.tabled, strict=False):
            expected += c[:, -1] @ boxes.values[g.first:g.first + g.leaves]
            tables.append(_tables(g.k, c))
        patterns = None
        if counts.deep.ks.size:
            patterns = counts.deep.patterns()
            expected += patterns.inside @ boxes.values[first:]
        return LeafTables(boxes, tuple(tables), patterns, _slot_weights(boxes), expected)

    @property
    def entries(self) -> int:
        """Pattern entries a row is compared with (0 without pattern groups)."""
        return 0 if self.patterns is None else self.patterns.entries

    def explain(self, X: Array) -> tuple[Array, Array]:
        """Attributions (rows, features, targets) and margins (rows, targets) for X (rows,
        features) in the op's precision."""
        b = self.boxes
        phi = np.zeros((b.n_features * b.targets, X.shape[0]))  # (features * targets, rows)
        raw = np.tile(b.constant, (X.shape[0], 1))  # (rows, targets)
        any_nan = bool(np.isnan(X).any())
        full = b.full()
        step = b.chunk(self.entries)
        for i in range(0, X.shape[0], step):
            m = b.masks(X[i:i + step], any_nan)  # (rows, leaves)
            phi[:, i:i + step] = self.weights @ self._shares(m)
            raw[i:i + step] += (m == full) @ b.values
        return phi.T.reshape(X.shape[0], b.n_features, b.targets), raw

    def _shares(self, m: Array) -> Array:
        """Each slot's share of its leaf value for masks m (rows, leaves): (slots, rows)."""
        out = np.empty((self.boxes.feature.size, m.shape[0]))
        for g, table in zip(self.boxes.groups, self.tables, strict=False):
            rows = m[:, g.first:g.first + g.leaves] + (np.arange(g.leaves) << g.k)
            out[g.start:g.start + g.leaves * g.k] = np.take(table, rows, axis=0).reshape(
                m.shape[0], -1).T
        if self.patterns is not None:
            first, start = self.boxes.deep
            out[start:] = self.patterns.shares(m[:, first:])
        return out


def _span(ks: list[int]) -> str:
    """"k <= 9", "k = 12" or "k 10-15" for ascending path-feature counts k."""
    if ks[0] == 1:
        return f"k <= {ks[-1]}"
    return f"k = {ks[0]}" if ks[0] == ks[-1] else f"k {ks[0]}-{ks[-1]}"


# ---------------------------------------------------------------------------- building boxes


def _tree_leaves(tree: ShapTree) -> Iterator[tuple[Box, Array]]:
    """(box, value) of every leaf of one shap-format tree, walking from the root."""
    stack: list[tuple[int, Box]] = [(0, {})]
    while stack:
        node, box = stack.pop()
        left = int(tree["children_left"][node])
        if left < 0:
            yield box, np.asarray(tree["values"][node], np.float64)
            continue
        f, t = int(tree["features"][node]), float(tree["thresholds"][node])
        nan_left = int(tree["children_default"][node]) == left
        stack.append((left, _narrow(box, f, hi=t, nan=nan_left)))
        stack.append((int(tree["children_right"][node]), _narrow(box, f, lo=t, nan=not nan_left)))


def _narrow(box: Box, feature: int, lo: float | None = None, hi: float = math.inf,
            nan: bool = True) -> Box:
    """A copy of `box` with feature's interval intersected with (lo, hi] and NaN kept only if
    both allow it. An unbounded lower end is NaN, not -inf: a split at -inf is a real bound
    (x = -inf goes left of it)."""
    old_lo, old_hi, old_nan = box.get(feature, (math.nan, math.inf, True))
    new_lo = old_lo if lo is None else lo if math.isnan(old_lo) else max(old_lo, lo)
    out = dict(box)
    out[feature] = (new_lo, min(old_hi, hi), old_nan and nan)
    return out


def _tabled(groups: tuple[_Group, ...]) -> int:
    """How many groups (ascending k) get tables: those within MAX_TABLE_FEATURES path features
    whose tables, with those of the groups before, stay within MAX_TABLE_ENTRIES."""
    total = 0
    for i, g in enumerate(groups):
        total += g.entries
        if g.k > MAX_TABLE_FEATURES or total > MAX_TABLE_ENTRIES:
            return i
    return len(groups)


def _pack(ks: list[int], groups: list[list[tuple[Box, Array]]], constant: Array,
          n_features: int, targets: int) -> LeafBoxes:
    """Slot arrays of the leaves, group after group, each leaf's slots in feature order."""
    slots = [(f, lo, hi, nan) for leaves in groups for box, _ in leaves
             for f, (lo, hi, nan) in sorted(box.items())]
    feature, lo, hi, nan = (np.asarray(c) for c in zip(*slots, strict=True)) if slots else \
        (np.zeros(0),) * 4
    values = [v for leaves in groups for _, v in leaves]
    counts = [len(leaves) for leaves in groups]
    layout = _layout(ks, counts)
    leaf_ks = np.repeat(np.asarray(ks, np.intp), counts)  # (leaves,)
    return LeafBoxes(
        n_features=n_features, groups=layout, tabled=_tabled(layout),
        values=np.asarray(values, np.float64).reshape(len(values), targets), constant=constant,
        feature=feature.astype(np.intp), lo=lo.astype(np.float64),
        hi=hi.astype(np.float64), nan=nan.astype(bool), bits=_bits(leaf_ks), ks=leaf_ks)


def _layout(ks: list[int], counts: list[int]) -> tuple[_Group, ...]:
    """Where each group's leaves and slots start."""
    groups, first, start = [], 0, 0
    for k, n in zip(ks, counts, strict=True):
        groups.append(_Group(k, n, first, start))
        first, start = first + n, start + n * k
    return tuple(groups)


def _bits(ks: Array) -> sparse.csr_matrix:
    """(leaves, slots): 2^j from slot j of each leaf (ks (leaves,) slots each), so that a row's
    inside-flags (slots,) map to its masks (leaves,)."""
    j = np.arange(int(ks.sum())) - np.repeat(np.cumsum(ks) - ks, ks)  # (slots,) bit in its leaf
    return sparse.csr_matrix((np.ldexp(1.0, j), (np.repeat(np.arange(ks.size), ks),
                                                 np.arange(j.size))), shape=(ks.size, j.size))


# ---------------------------------------------------------------------------- tables


def _pattern_weights(patterns: Array, weights: Array, k: int) -> Array:
    """Background weight per (leaf, pattern) from patterns (background rows, leaves):
    (leaves, 2^k)."""
    leaves = patterns.shape[1]
    codes = patterns + (np.arange(leaves) << k)  # (background rows, leaves)
    counts = np.bincount(codes.ravel(), np.repeat(weights, leaves), minlength=leaves << k)
    return counts.reshape(leaves, 1 << k)


def _tables(k: int, counts: Array) -> Array:
    """Every mask's k slot shares from the weights per pattern counts (leaves, 2^k): (leaves *
    2^k, k), in chunks of leaves that bound the (leaves, k+1, 2^k) subset sums."""
    step = max(1, CHUNK_ELEMENTS // ((k + 1) << k))
    parts = [_table_chunk(k, counts[i:i + step]) for i in range(0, counts.shape[0], step)]
    return np.concatenate(parts or [np.zeros((0, k))])


def _table_chunk(k: int, counts: Array) -> Array:
    """A row with mask m fails U = ~m (u = |U|); a background row with pattern p fails
    Q = ~p (c = |Q|). They play iff Q lies within m; then each j of Q gets cp(c, u) and each j
    of U -cm(c, u). With H[c][m] the weight of the Q within m with |Q| = c (graded subset sums),
    slot j's share is sum_c (H[c][m] - H[c][m - j]) cp(c, u) when j is in m, else
    -sum_c H[c][m] cm(c, u)."""
    n, leaves = 1 << k, counts.shape[0]
    pop = np.bitwise_count(np.arange(n)).astype(np.intp)  # (masks,)
    H = np.zeros((n, k + 1, leaves))  # mask-major: each subset-sum pass adds long rows
    H[np.arange(n), pop] = counts[:, ::-1].T  # Q = full - p: the weight per failed set
    for j in range(k):  # subset sums over bit j
        view = H.reshape(n >> (j + 1), 2, -1)
        view[:, 1] += view[:, 0]
    u = k - pop  # (masks,)
    cp, cm = _games(k)  # (k+1, k+1) each, by [c, u]
    gain = np.einsum("mcl,cm->ml", H, cp[:, u])  # (masks, leaves)
    gain_without = np.einsum("mcl,cm->ml", H, cp[:, np.maximum(u - 1, 0)])  # at m - j: u + 1
    loss = np.einsum("mcl,cm->ml", H, cm[:, u])
    m = np.arange(n)[:, None]
    bit = np.int64(1) << np.arange(k)  # (k,)
    table = np.where(((m & bit) > 0)[:, :, None], gain[:, None, :] - gain_without[m ^ bit],
                     -loss[:, None, :])  # (masks, k, leaves)
    return np.ascontiguousarray(table.transpose(2, 0, 1)).reshape(leaves << k, k)


def _games(k: int) -> tuple[Array, Array]:
    """The closed-form game's coefficients by [c, u] (c = |A| features only z fails, u = |B|
    features only x fails): cp = (c-1)! u! / (c+u)! for each feature of A (0 without any), and
    cm = c! (u-1)! / (c+u)! for each of B (0 without any): (k+1, k+1) each."""
    cp, cm = np.zeros((k + 1, k + 1)), np.zeros((k + 1, k + 1))
    for c in range(k + 1):
        for u in range(k + 1):
            whole = math.comb(c + u, c)
            cp[c, u] = 1 / (c * whole) if c else 0.0
            cm[c, u] = 1 / (u * whole) if u else 0.0
    return cp, cm


def _slot_weights(boxes: LeafBoxes) -> sparse.csr_matrix:
    """(features * targets, slots): a slot's looked-up share times its leaf's values, into the
    slot's feature."""
    targets = boxes.targets
    slot_leaf = np.repeat(np.arange(boxes.values.shape[0]), boxes.ks)
    rows = (boxes.feature[:, None] * targets + np.arange(targets)).ravel()
    cols = np.repeat(np.arange(boxes.feature.size), targets)
    data = boxes.values[slot_leaf].ravel()  # (slots * targets,)
    return sparse.csr_matrix((data, (rows, cols)),
                             shape=(boxes.n_features * targets, boxes.feature.size))

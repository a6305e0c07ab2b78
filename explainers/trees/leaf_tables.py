"""Interventional TreeSHAP by per-leaf lookup tables: exact, and independent of background size
per explained row.

For one background row z, the ensemble evaluated at (x_S, z_rest) reaches leaf l iff every
feature on l's path takes a value inside l's box: x's value if the feature is in S, z's value
otherwise. Per path feature, x is inside or not (bit of the mask m) and z is inside or not
(bit of the pattern p). The leaf's share of v(S) is then the game
value_l * [A within S] * [B outside S], with A = features only x satisfies and B = features
only z satisfies (zero when a feature satisfies neither), whose Shapley values are closed-form:
(|A|-1)! |B|! / (|A|+|B|)! for each feature of A and -|A|! (|B|-1)! / (|A|+|B|)! for each of B.

Averaged over the background, a leaf's contribution depends on x only through m, so for
every leaf and every possible m (2^k of them for k path features) the weighted sum over the
background's patterns is tabulated once per background. Explaining a row is then: compare it
with each leaf's box, look up one table entry per (leaf, path feature), add them up per feature.
That is what shap's C code computes, without the per-row walk over every background row.
Leaves with more than MAX_PATH_FEATURES path features, or tables over MAX_TABLE_ENTRIES, are
out of scope (`TablesTooLarge`); the caller uses shap's implementation then.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from explainers.base import Array
from explainers.trees.onnx_trees import ParsedTrees, ShapTree

MAX_PATH_FEATURES = 9  # a leaf's table has 2^k rows; the build tensor is 4^k * k
MAX_TABLE_ENTRIES = 4_000_000  # float64 table entries per background (32 MB)
CHUNK_ELEMENTS = 1 << 21  # (rows x slots) elements handled per step, to bound memory

Box = dict[int, tuple[float, float, bool]]  # feature -> (lo, hi, NaN inside): lo < x <= hi


class TablesTooLarge(Exception):
    """The ensemble's leaves have too many path features for tables; use shap's walk."""


@dataclass(frozen=True)
class _Group:
    """The leaves with k path features: leaves [first, first + leaves) of the ensemble, whose
    k slots each are slots [start, start + leaves * k), leaf after leaf."""

    k: int
    leaves: int
    first: int
    start: int

    def masks(self, inside: Array) -> Array:
        """Bit j of (r, l) says row r is inside the j-th slot of the group's leaf l, from
        `inside` (rows, all slots): (rows, leaves) intp."""
        end = self.start + self.leaves * self.k
        slots = inside[:, self.start:end].reshape(inside.shape[0], self.leaves, self.k)
        masks = slots[..., 0].astype(np.intp)
        for j in range(1, self.k):
            masks |= slots[..., j].astype(np.intp) << j
        return masks


@dataclass(frozen=True)
class LeafBoxes:
    """Every leaf with at least one split as a box over its path's features ("slots": one per
    path feature, in feature order), grouped by the number of path features k. Slot j of a leaf
    is bit j of the leaf's mask; NaN is inside a slot when every split on the path sends missing
    values toward the leaf. Leaves of single-leaf trees are folded into `constant`."""

    n_features: int
    groups: tuple[_Group, ...]
    values: Array  # (leaves, targets)
    constant: Array  # (targets,) base offset plus the values of single-leaf trees
    feature: Array  # (slots,) the slot's feature
    lo: Array  # (slots,) x > lo; NaN where unbounded, so that -inf is inside
    hi: Array  # (slots,) x <= hi; +inf where unbounded
    nan: Array  # (slots,) bool: NaN is inside

    @staticmethod
    def build(parsed: ParsedTrees, targets: Sequence[int]) -> LeafBoxes:
        """The boxes of every leaf of `parsed` on the `targets` columns; TablesTooLarge when a
        leaf has more than MAX_PATH_FEATURES features or the tables would be too big."""
        keep = list(targets)
        constant = np.asarray(parsed["base_offset"], np.float64)[keep].copy()  # (targets,)
        by_k: dict[int, list[tuple[Box, Array]]] = {}
        for tree in parsed["trees"]:
            for box, value in _tree_leaves(tree):
                if box:
                    by_k.setdefault(len(box), []).append((box, value[keep]))
                else:
                    constant += value[keep]
        _check_limits({k: len(leaves) for k, leaves in by_k.items()})
        return _pack(sorted(by_k), [by_k[k] for k in sorted(by_k)], constant,
                     parsed["n_features"], len(keep))

    @property
    def targets(self) -> int:
        return int(self.values.shape[1])

    def chunk(self) -> int:
        """Rows handled per step, so that (rows x slots) arrays stay near CHUNK_ELEMENTS."""
        return max(1, CHUNK_ELEMENTS // max(self.feature.size, 1))

    def masks(self, X: Array, any_nan: bool) -> Array:
        """Bit j of (r, l) says row r of X (rows, features) is inside the j-th slot of leaf l:
        (rows, leaves) intp."""
        x = X[:, self.feature]  # (rows, slots)
        inside = ~(x <= self.lo) & (x <= self.hi)
        if any_nan:
            inside |= np.isnan(x) & self.nan
        out = np.empty((X.shape[0], self.values.shape[0]), np.intp)  # (rows, leaves)
        for g in self.groups:
            out[:, g.first:g.first + g.leaves] = g.masks(inside)
        return out

    def full(self) -> Array:
        """Each leaf's mask of a row inside its whole box: (leaves,)."""
        return np.concatenate([np.full(g.leaves, (1 << g.k) - 1, np.intp) for g in self.groups]
                              or [np.zeros(0, np.intp)])


@dataclass(frozen=True)
class LeafTables:
    """The tables of one background: explain any number of rows without touching it again.

    For a group's leaf l and mask m, row l * 2^k + m of the group's table holds the k path
    features' shares of the leaf value.
    """

    boxes: LeafBoxes
    tables: tuple[Array, ...]  # per group (leaves * 2^k, k)
    weights: sparse.csr_matrix  # (features * targets, slots): share -> attribution
    expected: Array  # (targets,) weighted mean margin over the background

    @staticmethod
    def fit(boxes: LeafBoxes, data: Array, weights: Array) -> LeafTables:
        """Tabulate every leaf against the background `data` (rows, features) in the op's
        precision, with weights summing to one."""
        any_nan = bool(np.isnan(data).any())
        counts = [np.zeros((g.leaves, 1 << g.k)) for g in boxes.groups]  # weight per pattern
        step = boxes.chunk()
        for i in range(0, data.shape[0], step):  # chunks bound the (rows, leaves) arrays
            patterns = boxes.masks(data[i:i + step], any_nan)  # (chunk rows, leaves)
            for g, c in zip(boxes.groups, counts, strict=True):
                c += _pattern_weights(patterns[:, g.first:g.first + g.leaves],
                                      weights[i:i + step], g.k)
        expected = boxes.constant.copy()
        tables = []
        for g, c in zip(boxes.groups, counts, strict=True):
            expected += c[:, -1] @ boxes.values[g.first:g.first + g.leaves]
            tables.append((c @ _games(g.k)).reshape(g.leaves << g.k, g.k))
        return LeafTables(boxes, tuple(tables), _slot_weights(boxes), expected)

    def explain(self, X: Array) -> tuple[Array, Array]:
        """Attributions (rows, features, targets) and margins (rows, targets) for X (rows,
        features) in the op's precision."""
        b = self.boxes
        phi = np.zeros((b.n_features * b.targets, X.shape[0]))  # (features * targets, rows)
        raw = np.tile(b.constant, (X.shape[0], 1))  # (rows, targets)
        any_nan = bool(np.isnan(X).any())
        full = b.full()
        step = b.chunk()
        for i in range(0, X.shape[0], step):
            m = b.masks(X[i:i + step], any_nan)  # (rows, leaves)
            phi[:, i:i + step] = self.weights @ self._look_up(m).T
            raw[i:i + step] += (m == full) @ b.values
        return phi.T.reshape(X.shape[0], b.n_features, b.targets), raw

    def _look_up(self, m: Array) -> Array:
        """Each slot's share for masks m (rows, leaves): (rows, slots)."""
        out = np.empty((m.shape[0], self.boxes.feature.size))
        for g, table in zip(self.boxes.groups, self.tables, strict=True):
            rows = m[:, g.first:g.first + g.leaves] + (np.arange(g.leaves) << g.k)
            out[:, g.start:g.start + g.leaves * g.k] = np.take(table, rows, axis=0).reshape(
                m.shape[0], -1)
        return out


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


def _check_limits(leaves_per_k: dict[int, int]) -> None:
    """TablesTooLarge when a leaf has too many path features or the tables too many entries."""
    if leaves_per_k and max(leaves_per_k) > MAX_PATH_FEATURES:
        raise TablesTooLarge(f"a leaf has {max(leaves_per_k)} path features (tables stop at "
                             f"{MAX_PATH_FEATURES})")
    entries = sum(n * k << k for k, n in leaves_per_k.items())
    if entries > MAX_TABLE_ENTRIES:
        raise TablesTooLarge(f"tables would hold {entries} entries (at most "
                             f"{MAX_TABLE_ENTRIES})")


def _pack(ks: list[int], groups: list[list[tuple[Box, Array]]], constant: Array,
          n_features: int, targets: int) -> LeafBoxes:
    """Slot arrays of the leaves, group after group, each leaf's slots in feature order."""
    slots = [(f, lo, hi, nan) for leaves in groups for box, _ in leaves
             for f, (lo, hi, nan) in sorted(box.items())]
    feature, lo, hi, nan = (np.asarray(c) for c in zip(*slots, strict=True)) if slots else \
        (np.zeros(0),) * 4
    lo = lo.astype(np.float64)
    values = [v for leaves in groups for _, v in leaves]
    return LeafBoxes(
        n_features=n_features, groups=_layout(ks, [len(leaves) for leaves in groups]),
        values=np.asarray(values, np.float64).reshape(len(values), targets), constant=constant,
        feature=feature.astype(np.intp), lo=lo,
        hi=hi.astype(np.float64), nan=nan.astype(bool))


def _layout(ks: list[int], counts: list[int]) -> tuple[_Group, ...]:
    """Where each group's leaves and slots start."""
    groups, first, start = [], 0, 0
    for k, n in zip(ks, counts, strict=True):
        groups.append(_Group(k, n, first, start))
        first, start = first + n, start + n * k
    return tuple(groups)


# ---------------------------------------------------------------------------- tables


def _pattern_weights(patterns: Array, weights: Array, k: int) -> Array:
    """Background weight per (leaf, pattern) from patterns (background rows, leaves):
    (leaves, 2^k)."""
    leaves = patterns.shape[1]
    codes = patterns + (np.arange(leaves) << k)  # (background rows, leaves)
    counts = np.bincount(codes.ravel(), np.repeat(weights, leaves), minlength=leaves << k)
    return counts.reshape(leaves, 1 << k)


def _games(k: int) -> Array:
    """Shapley value of each path feature in the game of (mask m, pattern p):
    (patterns, masks * features)."""
    m = np.arange(1 << k)[:, None]  # (masks, 1)
    p = np.arange(1 << k)[None, :]  # (1, patterns)
    full = (1 << k) - 1
    feasible = (m | p) == full  # (masks, patterns)
    only_x, only_z = m & ~p & full, p & ~m & full
    a = np.bitwise_count(only_x).astype(np.int64)  # (masks, patterns)
    b = np.bitwise_count(only_z).astype(np.int64)
    fact = np.asarray([math.factorial(i) for i in range(2 * k + 2)], np.float64)
    total = fact[a + b]
    plus = np.where(a > 0, fact[np.maximum(a - 1, 0)] * fact[b] / total, 0.0)
    minus = np.where(b > 0, fact[a] * fact[np.maximum(b - 1, 0)] / total, 0.0)
    j = np.arange(k)
    in_x = (only_x[..., None] >> j) & 1  # (masks, patterns, features)
    in_z = (only_z[..., None] >> j) & 1
    g = feasible[..., None] * (in_x * plus[..., None] - in_z * minus[..., None])
    return np.ascontiguousarray(g.transpose(1, 0, 2).reshape(1 << k, -1))


def _slot_weights(boxes: LeafBoxes) -> sparse.csr_matrix:
    """(features * targets, slots): a slot's looked-up share times its leaf's values, into the
    slot's feature."""
    targets = boxes.targets
    slot_leaf = np.concatenate([np.repeat(np.arange(g.first, g.first + g.leaves), g.k)
                                for g in boxes.groups] or [np.zeros(0, np.intp)])
    rows = (boxes.feature[:, None] * targets + np.arange(targets)).ravel()
    cols = np.repeat(np.arange(boxes.feature.size), targets)
    data = boxes.values[slot_leaf].ravel()  # (slots * targets,)
    return sparse.csr_matrix((data, (rows, cols)),
                             shape=(boxes.n_features * targets, boxes.feature.size))

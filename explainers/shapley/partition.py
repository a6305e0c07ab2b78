"""`partition`: Owen values over a hierarchy of groups, the quantity shap's Partition explainer
computes (image patches merged into quadrants, tokens into spans, a client's own tree).

The Owen value of a group averages its marginal contributions over the random orders that
keep every node of the hierarchy contiguous (Owen 1977): at each node a uniformly random order
of its children. Exactly: a leaf at depth L gets sum over subsets R_1..R_L of the siblings of
its ancestors of prod_l |R_l|! (c_l - |R_l| - 1)! / c_l! x [v(R u {i}) - v(R)], with R the union
of the chosen siblings' groups and c_l the number of children at level l. That is
sum_leaves prod_l 2^(c_l - 1) coalition pairs, shared between leaves: a 4 x 4 grid of patches
under a quadtree needs 2 x 16 x 64 pairs of at most 2^16 distinct coalitions.

When the distinct coalitions do not fit the budget (or MAX_CONTEXTS), the same orders are
sampled instead: the antithetic permutation sampler (shapley/permutation.py) with orders drawn
level by level, so the answer keeps its standard errors, intervals and exact additivity. With a
flat hierarchy (every group a child of the root) Owen values are Shapley values.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import factorial

import numpy as np

from explainers.base import Array, Background, Budget, Evaluator, Explanation
from explainers.errors import InvalidArgument
from explainers.groups import Groups, Hierarchy
from explainers.masking import coalition_values, pinned
from explainers.memory import ByteLru
from explainers.shapley.permutation import PermutationShapley

MAX_CONTEXTS = 2**20  # (leaf, sibling subset) pairs enumerated at most for the exact answer
EXACT_SHARE = 0.5  # the exact enumeration may use at most this share of the remaining time
TABLE_BYTES = 64 * 1024 * 1024  # the formula's tables kept per estimator, in bytes at most
MAX_TABLES = 16  # and at most this many hierarchies (an 8 x 8 quadtree's table: ~1 MB)
DIRECT_BYTES = 2  # up to 16 leaves, distinct coalitions are found by direct addressing
TABLE_S_PER_TERM = 1e-6  # building a table, per (leaf, context) term: 0.2-0.4 us measured
TABLE_SHARE = 0.25  # a table is built within a call only if it takes at most this share


def context_count(h: Hierarchy) -> int:
    """(leaf, context) pairs the exact Owen values need: sum over leaves of prod 2^(c_l - 1)."""
    def count(node: int) -> int:
        kids = h.kids(node)
        return 1 if not kids else sum(count(k) for k in kids) * 2 ** (len(kids) - 1)
    return count(h.root)


@dataclass(frozen=True)
class OwenTable:
    """The exact Owen formula of one hierarchy, computed once and shared by every request over
    it: the distinct coalitions (packed bits, np.packbits order) and, per (leaf, context) term,
    its leaf, its weight and the rows of its coalitions without (first K) and with the leaf."""

    packed: Array  # (coalitions, ceil(leaves / 8)) uint8
    leaves: int
    leaf: Array  # (K,) int32
    weight: Array  # (K,) float64
    where: Array  # (2K,) int32

    @property
    def size(self) -> int:
        """Distinct coalitions."""
        return int(self.packed.shape[0])

    def coalitions(self) -> Array:
        """The distinct coalitions as (coalitions, leaves) bool, in lexicographic order."""
        return np.unpackbits(self.packed, axis=1, count=self.leaves).astype(bool)


def owen_table(h: Hierarchy) -> OwenTable:
    """Every term of the exact Owen formula over `h` and its distinct coalitions."""
    leaf, ctx, weight = owen_contexts(h)
    packed, where = _distinct(leaf, ctx)
    return OwenTable(packed, h.leaves, leaf.astype(np.int32), weight, where.astype(np.int32))


def owen_contexts(h: Hierarchy) -> tuple[Array, Array, Array]:
    """Every (leaf, context) of the exact Owen formula: leaf ids (K,), contexts (K, bytes)
    uint8, the packed bits of the groups present besides the leaf, and weights (K,). Built
    bottom-up with arrays; the terms come in the order of a depth-first walk (children in
    order, then sibling subsets by binary code), and each weight is the product of its levels'
    factors taken from the root down, as the textbook recursion computes it."""
    members = _packed_members(h)  # (nodes, bytes) uint8
    leaf, ctx, factors = _contexts(h, h.root, members)
    weight = np.ones(leaf.size)
    for column in factors.T:  # root first: the same rounding as the recursion
        weight = weight * column
    return leaf, ctx, weight


def _packed_members(h: Hierarchy) -> Array:
    """(nodes, ceil(leaves / 8)) uint8: the packed bits of the leaves under each node."""
    nodes = h.root + 1
    out = np.zeros((nodes, -(-h.leaves // 8)), np.uint8)
    leaves = np.arange(h.leaves)
    out[leaves, leaves >> 3] = 128 >> (leaves & 7)  # np.packbits' big-endian bit order
    for node in range(h.leaves, nodes):  # children are listed before their parent
        out[node] = np.bitwise_or.reduce(out[list(h.kids(node))], axis=0)
    return out


def _contexts(h: Hierarchy, node: int, members: Array) -> tuple[Array, Array, Array]:
    """Terms below `node`: leaf ids (K,), packed contexts (K, bytes), level factors (K, depth)
    with the factor of `node`'s level first (1.0 past a shallow leaf's depth)."""
    kids = h.kids(node)
    if not kids:
        return np.array([node]), np.zeros((1, members.shape[1]), np.uint8), np.ones((1, 0))
    parts = [_child_terms(h, kids, i, members) for i in range(len(kids))]
    depth = max(f.shape[1] for _, _, f in parts)
    factors = [np.pad(f, ((0, 0), (0, depth - f.shape[1])), constant_values=1.0)
               for _, _, f in parts]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate(factors))


def _child_terms(h: Hierarchy, kids: tuple[int, ...], i: int, members: Array
                 ) -> tuple[Array, Array, Array]:
    """Terms through child kids[i]: every subset of its siblings (by binary code) joined to
    every context below the child."""
    c, others = len(kids), [k for k in kids if k != kids[i]]
    s = 2 ** (c - 1)
    subsets = np.zeros((s, members.shape[1]), np.uint8)  # (S, bytes): bit j of code = others[j]
    for j, sibling in enumerate(others):  # codes with bit j set = codes below it, plus others[j]
        subsets[1 << j:2 << j] = subsets[:1 << j] | members[sibling]
    by_size = np.array([factorial(k) * factorial(c - k - 1) / factorial(c) for k in range(c)])
    leaf, ctx, factors = _contexts(h, kids[i], members)
    k = leaf.size
    joined = (subsets[:, None, :] | ctx[None]).reshape(s * k, -1)  # (S * Kc, bytes)
    level = np.repeat(by_size[np.bitwise_count(np.arange(s))], k)[:, None]  # (S * Kc, 1)
    return np.tile(leaf, s), joined, np.concatenate([level, np.tile(factors, (s, 1))], axis=1)


def hierarchical_orders(h: Hierarchy) -> PermutationShapley:
    """The permutation sampler drawing orders consistent with `h`, and their reverses."""
    depth_nodes = _ancestors(h)  # (depth, leaves) ancestor node id at each depth, -1 = none

    def orders(d: int, n: int, rng: np.random.Generator) -> Array:
        keys = np.concatenate([rng.random((n, h.root + 1)), np.zeros((n, 1))], axis=1)
        order = np.tile(np.arange(d), (n, 1))  # (n, leaves) radix sort, deepest key first
        for level in depth_nodes[::-1]:
            k = keys[:, level][np.arange(n)[:, None], order]  # (n, leaves)
            order = np.take_along_axis(order, np.argsort(k, axis=1, kind="stable"), axis=1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(d)[None], axis=1)
        return np.concatenate([rank, d - 1 - rank]).astype(np.int32)  # (2n, leaves)

    return PermutationShapley(orders, name="partition")


def _ancestors(h: Hierarchy) -> Array:
    """(depth, leaves): the ancestor of each leaf at depths 1..max (the node itself at its own
    depth), -1 below a leaf's depth; -1 indexes the zero key column."""
    paths: list[list[int]] = [[] for _ in range(h.leaves)]

    def walk(node: int, path: list[int]) -> None:
        if node < h.leaves:
            paths[node] = path
        for k in h.kids(node):
            walk(k, [*path, k])

    walk(h.root, [])
    depth = max(len(p) for p in paths)
    return np.array([[p[i] if i < len(p) else -1 for p in paths] for i in range(depth)])


class PartitionOwen:
    """Owen values: exact by enumeration when it fits the budget, else sampled orders. The
    formula's tables are kept per hierarchy (an LRU bounded in bytes, owned by this estimator
    and so by the registry that holds it): a hierarchy's coalitions are found once."""

    name = "partition"

    def __init__(self, table_bytes: int = TABLE_BYTES, max_tables: int = MAX_TABLES) -> None:
        self._tables: ByteLru[Hierarchy, OwenTable] = ByteLru(table_bytes, max_tables)

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        return None  # depends on the hierarchy: decided per request in `explain`

    def table(self, h: Hierarchy) -> OwenTable:
        """The exact formula's table of `h`, from the cache or built (and kept)."""
        return self._tables.get_or_build(h, lambda: owen_table(h))

    def _affordable(self, h: Hierarchy, terms: int, budget: Budget) -> bool:
        """Whether the table is at hand, or building it takes a small share of the time left
        (else a small budget would be spent on a table and leave nothing to sample with)."""
        if self._tables.get(h) is not None:
            return True
        return terms * TABLE_S_PER_TERM <= TABLE_SHARE * budget.remaining()

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Exact when the distinct coalitions fit half the budget, else sampled."""
        g = groups or Groups.each(x.size)
        h = g.hierarchy or Hierarchy.flat(g.size)
        if g.size < 2:
            raise InvalidArgument("groups: partition needs at least two groups")
        background = pinned(model, x, background, g)
        terms = context_count(h)
        if terms <= MAX_CONTEXTS and self._affordable(h, terms, budget):
            table = self.table(h)
            rows = table.size * background.rows
            fits_cap = budget.max_evaluations is None or rows <= budget.max_evaluations
            if fits_cap and model.seconds_for(rows) <= EXACT_SHARE * budget.remaining():
                return self._exact(model, x, background, g, table)
        return hierarchical_orders(h).explain(model, x, background, budget, rng, g)

    def _exact(self, model: Evaluator, x: Array, background: Background, groups: Groups,
               table: OwenTable) -> Explanation:
        fx = model(x[None])[0]  # (outputs,)
        v = _values(model, x, background, groups, table.coalitions(), fx)  # (coalitions, outputs)
        k = table.leaf.size
        gain = v[table.where[k:]] - v[table.where[:k]]  # (K, outputs) with the leaf minus without
        phi = np.zeros((fx.size, groups.size))
        np.add.at(phi.T, table.leaf, table.weight[:, None] * gain)
        return Explanation.build(self.name, phi, np.zeros_like(phi), background.base_values, fx,
                                 evaluations=model.evaluations, converged=True,
                                 budget_exhausted=False)


def _distinct(leaf: Array, ctx: Array) -> tuple[Array, Array]:
    """The distinct coalitions of the formula (without, then with each leaf), packed, in the
    lexicographic order of their bits, and where each of the 2K masks sits among them. Rows
    become big-endian words, so one 1-D unique (or a void view past 64 leaves) sorts them as
    np.unique(axis=0) sorts the unpacked bools, at a fraction of its cost."""
    with_leaf = ctx.copy()
    with_leaf[np.arange(leaf.size), leaf >> 3] |= (128 >> (leaf & 7)).astype(np.uint8)
    both = np.concatenate([ctx, with_leaf])  # (2K, bytes)
    if both.shape[1] <= DIRECT_BYTES:
        return _distinct_direct(both)
    width = -(-both.shape[1] // 8) * 8
    words = np.ascontiguousarray(np.pad(both, ((0, 0), (0, width - both.shape[1]))))
    keys = words.view(">u8").ravel() if width == 8 else words.view(f"V{width}").ravel()
    unique, where = np.unique(keys, return_inverse=True)
    table = unique.view(np.uint8).reshape(-1, width)[:, :both.shape[1]]
    return np.ascontiguousarray(table), where.ravel()


def _distinct_direct(both: Array) -> tuple[Array, Array]:
    """_distinct for at most 16 leaves: keys index a table of every possible coalition (no
    sort; a flat hierarchy over 16 groups has 2^19 terms)."""
    keys = both[:, 0].astype(np.int64) << 8 * (DIRECT_BYTES - 1)  # (2K,) big-endian bits
    if both.shape[1] > 1:
        keys |= both[:, 1]
    seen = np.zeros(1 << 8 * DIRECT_BYTES, bool)
    seen[keys] = True
    rank = np.cumsum(seen) - 1  # (2^16,) row of each coalition among the distinct ones
    present = np.flatnonzero(seen)  # (distinct,) in lexicographic order of the bits
    table = np.stack([present >> 8, present & 255], axis=1).astype(np.uint8)
    return table[:, :both.shape[1]], rank[keys]


def _values(model: Evaluator, x: Array, background: Background, groups: Groups,
            coalitions: Array, fx: Array) -> Array:
    """v over the coalitions (coalitions, outputs); the empty and full ones are known."""
    v = np.empty((coalitions.shape[0], fx.size))
    size = coalitions.sum(axis=1)
    inner = (size > 0) & (size < coalitions.shape[1])
    v[size == 0], v[size == coalitions.shape[1]] = background.base_values, fx
    if inner.any():
        v[inner] = coalition_values(model, coalitions[inner], x, background, groups)
    return v

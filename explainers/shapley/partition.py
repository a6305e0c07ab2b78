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

from math import factorial

import numpy as np

from explainers.base import Array, Background, Budget, Evaluator, Explanation
from explainers.errors import InvalidArgument
from explainers.groups import Groups, Hierarchy
from explainers.masking import coalition_values, pinned
from explainers.shapley.permutation import PermutationShapley

MAX_CONTEXTS = 2**20  # (leaf, sibling subset) pairs enumerated at most for the exact answer
EXACT_SHARE = 0.5  # the exact enumeration may use at most this share of the remaining time


def context_count(h: Hierarchy) -> int:
    """(leaf, context) pairs the exact Owen values need: sum over leaves of prod 2^(c_l - 1)."""
    def count(node: int) -> int:
        kids = h.kids(node)
        return 1 if not kids else sum(count(k) for k in kids) * 2 ** (len(kids) - 1)
    return count(h.root)


def owen_contexts(h: Hierarchy) -> tuple[Array, Array, Array]:
    """Every (leaf, context) of the exact Owen formula: leaf ids (K,), contexts (K, leaves) bool
    (the groups present besides the leaf) and their weights (K,)."""
    leaves, masks, weights = [], [], []

    def walk(node: int, context: Array, weight: float) -> None:
        kids = h.kids(node)
        if not kids:
            leaves.append(node)
            masks.append(context)
            weights.append(weight)
            return
        c = len(kids)
        for child in kids:
            others = [k for k in kids if k != child]
            for code in range(2 ** len(others)):
                chosen = [k for j, k in enumerate(others) if code >> j & 1]
                ctx = context.copy()
                for k in chosen:
                    ctx[list(h.members(k))] = True
                w = factorial(len(chosen)) * factorial(c - len(chosen) - 1) / factorial(c)
                walk(child, ctx, weight * w)

    walk(h.root, np.zeros(h.leaves, bool), 1.0)
    return np.array(leaves), np.array(masks), np.array(weights)


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
    """Owen values: exact by enumeration when it fits the budget, else sampled orders."""

    name = "partition"

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        return None  # depends on the hierarchy: decided per request in `explain`

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Exact when the distinct coalitions fit half the budget, else sampled."""
        g = groups or Groups.each(x.size)
        h = g.hierarchy or Hierarchy.flat(g.size)
        if g.size < 2:
            raise InvalidArgument("groups: partition needs at least two groups")
        background = pinned(model, x, background, g)
        if context_count(h) <= MAX_CONTEXTS:
            leaf, ctx, w = owen_contexts(h)
            coalitions, where = _distinct(leaf, ctx)
            rows = coalitions.shape[0] * background.rows
            fits_cap = budget.max_evaluations is None or rows <= budget.max_evaluations
            if fits_cap and model.seconds_for(rows) <= EXACT_SHARE * budget.remaining():
                return self._exact(model, x, background, g, coalitions, where, leaf, w)
        return hierarchical_orders(h).explain(model, x, background, budget, rng, g)

    def _exact(self, model: Evaluator, x: Array, background: Background, groups: Groups,
               coalitions: Array, where: Array, leaf: Array, w: Array) -> Explanation:
        fx = model(x[None])[0]  # (outputs,)
        v = _values(model, x, background, groups, coalitions, fx)  # (coalitions, outputs)
        k = leaf.size
        gain = v[where[k:]] - v[where[:k]]  # (K, outputs) with the leaf minus without
        phi = np.zeros((fx.size, groups.size))
        np.add.at(phi.T, leaf, w[:, None] * gain)
        return Explanation.build(self.name, phi, np.zeros_like(phi), background.base_values, fx,
                                 evaluations=model.evaluations, converged=True,
                                 budget_exhausted=False)


def _distinct(leaf: Array, ctx: Array) -> tuple[Array, Array]:
    """The distinct coalitions of the formula (without, then with each leaf) and where each of
    the 2K masks sits among them."""
    with_leaf = ctx.copy()
    with_leaf[np.arange(leaf.size), leaf] = True
    table, where = np.unique(np.concatenate([ctx, with_leaf]), axis=0, return_inverse=True)
    return table, where.ravel()


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

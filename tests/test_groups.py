"""Feature groups: the representation, grouped Shapley against brute force, Owen values against
the two-level formula and against every order a hierarchy allows."""

from __future__ import annotations

import math
import time
from itertools import combinations, permutations, product

import numpy as np
import pytest

from explainers import Background, Budget, Evaluator, build_registry
from explainers.base import Array
from explainers.errors import InvalidArgument
from explainers.groups import Groups, Hierarchy, grid, quadtree, tokens
from explainers.shapley.partition import (
    PartitionOwen,
    context_count,
    hierarchical_orders,
    owen_table,
)

REGISTRY = build_registry()


def image_model(X: Array) -> Array:
    """A nonlinear two-output function of 8 x 8 'images' (rows, 64) with interactions."""
    img = X.reshape(-1, 8, 8)
    a = np.tanh(img[:, :4, :4].sum(axis=(1, 2)) * img[:, 4:, 4:].mean(axis=(1, 2)))
    b = np.sin(img[:, :, 3].sum(axis=1)) + img[:, 0, 0] * img[:, 7, 7] * img[:, 2, 5]
    return np.stack([a + 0.3 * img[:, 5, 1], b], axis=1)


def v_of(f, x: Array, bg: Array, groups: Groups):  # type: ignore[no-untyped-def]
    """v(S) over groups, by definition: groups in S from x, the others from each bg row."""
    def v(S: tuple[int, ...]) -> Array:
        keep = np.isin(groups.index, S) | (groups.index < 0)  # (elements,)
        return f(np.where(keep, x, bg)).mean(axis=0)  # type: ignore[no-any-return]
    return v


def brute_shapley(v, d: int) -> Array:  # type: ignore[no-untyped-def]
    """The textbook formula over d players, one coalition at a time."""
    phi = np.zeros((v(()).size, d))
    for i in range(d):
        others = [j for j in range(d) if j != i]
        for s in range(d):
            w = math.factorial(s) * math.factorial(d - s - 1) / math.factorial(d)
            for S in combinations(others, s):
                phi[:, i] += w * (v((*S, i)) - v(S))
    return phi


def owen_two_level(v, unions: list[list[int]]) -> Array:  # type: ignore[no-untyped-def]
    """Owen values for a root over unions of players (Owen 1977, the two-level formula)."""
    m, d = len(unions), sum(len(u) for u in unions)
    phi = np.zeros((v(()).size, d))
    for k, union in enumerate(unions):
        rest = [j for j in range(m) if j != k]
        for r in range(m):
            wr = math.factorial(r) * math.factorial(m - r - 1) / math.factorial(m)
            for R in combinations(rest, r):
                base = tuple(p for j in R for p in unions[j])
                for i in union:
                    inner = [p for p in union if p != i]
                    s = len(union)
                    for t in range(s):
                        wt = math.factorial(t) * math.factorial(s - t - 1) / math.factorial(s)
                        for T in combinations(inner, t):
                            phi[:, i] += wr * wt * (v((*base, *T, i)) - v((*base, *T)))
    return phi


def owen_by_orders(v, h: Hierarchy) -> Array:  # type: ignore[no-untyped-def]
    """Average marginal contributions over every order keeping each node contiguous."""
    def orders(node: int) -> list[tuple[int, ...]]:
        kids = h.kids(node)
        if not kids:
            return [(node,)]
        out = []
        for perm in permutations(kids):
            for parts in product(*(orders(k) for k in perm)):
                out.append(tuple(p for part in parts for p in part))
        return out

    all_orders = orders(h.root)
    phi = np.zeros((v(()).size, h.leaves))
    for order in all_orders:
        for pos, i in enumerate(order):
            phi[:, i] += v(tuple(order[:pos + 1])) - v(tuple(order[:pos]))
    return phi / len(all_orders)


def explain(method: str, x: Array, bg: Background, groups: Groups, seconds: float = 20.0,
            evals: int | None = None, seed: int = 1):  # type: ignore[no-untyped-def]
    estimator = PartitionOwen() if method == "partition" else REGISTRY[method]
    return estimator.explain(Evaluator(image_model, 4096, 1e6), x, bg,
                             Budget.of_seconds(seconds, max_evaluations=evals),
                             np.random.default_rng(seed), groups)


@pytest.fixture(scope="module")
def image() -> tuple[Array, Background]:
    rng = np.random.default_rng(4)
    bg = rng.normal(size=(3, 64))
    return rng.normal(size=64), Background.build(bg, image_model(bg))


def patches(cells: int) -> Groups:
    index, labels, counts = grid((8, 8), (0, 1), (cells, cells))
    return Groups.build(index, labels, quadtree(counts))


def test_grid_cuts_spatial_axes_and_shares_channels() -> None:
    index, labels, counts = grid((3, 4, 4), (1, 2), (2, 2))  # C, H, W
    ids = index.reshape(3, 4, 4)
    assert counts == (2, 2) and labels[3] == "patch 1,1"
    assert np.all(ids[0] == ids[2])  # every channel in the same patch
    np.testing.assert_array_equal(ids[0], [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3],
                                           [2, 2, 3, 3]])


def test_quadtree_merges_two_by_two_up_to_a_root() -> None:
    h = quadtree((4, 4))
    assert h.leaves == 16 and h.kids(h.root) == (16, 17, 18, 19)
    assert h.members(16) == (0, 1, 4, 5)
    assert context_count(h) == 16 * 8 * 8


def test_tokens_skip_padding() -> None:
    index, labels = tokens(np.array([5, 9, 0, 0]), pad=0)
    np.testing.assert_array_equal(index, [0, 1, -1, -1])
    assert labels == ("token 0", "token 1")


@pytest.mark.parametrize("index, labels, message", [
    (np.array([0, 2, 2]), None, "id 1 has no element"),
    (np.array([0, 1, -2]), None, ">= -1"),
    (np.array([0, 1, 1]), ["a"], "1 labels for 2 groups"),
    (np.array([[0, 1]]), None, "flat integer mask"),
])
def test_bad_masks_are_refused_naming_the_problem(index: Array, labels: list[str] | None,
                                                  message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Groups.build(index, labels)


def test_bad_hierarchies_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="hierarchy"):
        Hierarchy.build(3, [(0, 1), (1, 2)])  # leaf 1 in two parents, leaf 2 twice
    with pytest.raises(InvalidArgument, match="hierarchy"):
        Hierarchy.build(2, [(0,), (1,)])


def test_exact_grouped_shapley_equals_brute_force(image: tuple[Array, Background]) -> None:
    x, bg = image
    index, labels, _ = grid((8, 8), (0, 1), (2, 4))  # 8 groups of 2 x 4 elements
    groups = Groups.build(index, labels)
    got = explain("exact", x, bg, groups)
    want = brute_shapley(v_of(image_model, x, bg.data, groups), groups.size)
    np.testing.assert_allclose(got.values, want, atol=1e-10)
    np.testing.assert_allclose(got.additivity_gap, 0, atol=1e-12)


@pytest.mark.parametrize("method", ["permutation", "kernel"])
def test_grouped_samplers_converge_to_exact(method: str, image: tuple[Array, Background]) -> None:
    x, bg = image
    groups = patches(2)  # 4 groups: exact is cheap, samplers must agree within their intervals
    exact = explain("exact", x, bg, groups).values
    got = explain(method, x, bg, groups, evals=40_000)
    low, high = got.interval(0.999)
    assert np.all((low - 1e-9 <= exact) & (exact <= high + 1e-9))
    np.testing.assert_allclose(got.additivity_gap, 0, atol=1e-9)


def test_elements_in_no_group_keep_x_and_move_the_base_value(
        image: tuple[Array, Background]) -> None:
    x, bg = image
    index = np.repeat(np.arange(4), 16)
    index[:8] = -1  # the first row of the image is never masked
    groups = Groups.build(index)
    got = explain("exact", x, bg, groups)
    v = v_of(image_model, x, bg.data, groups)
    np.testing.assert_allclose(got.base_values, v(()), atol=1e-12)
    np.testing.assert_allclose(got.values, brute_shapley(v, 4), atol=1e-10)


def test_partition_is_exact_owen_on_sixteen_patches(image: tuple[Array, Background]) -> None:
    x, bg = image
    groups = patches(4)
    got = explain("partition", x, bg, groups)
    assert got.method == "partition" and got.converged and got.samples == 0
    unions = [list(groups.hierarchy.members(n)) for n in groups.hierarchy.kids(  # type: ignore[union-attr]
        groups.hierarchy.root)]  # type: ignore[union-attr]
    want = owen_two_level(v_of(image_model, x, bg.data, groups), unions)
    np.testing.assert_allclose(got.values, want, atol=1e-9)
    np.testing.assert_allclose(got.additivity_gap, 0, atol=1e-9)


def test_partition_equals_the_average_over_every_allowed_order(
        image: tuple[Array, Background]) -> None:
    """A three-level hierarchy of unequal depths, checked against all 48 allowed orders."""
    x, bg = image
    groups = Groups.build(np.repeat(np.arange(6), [10, 10, 11, 11, 11, 11]))
    h = Hierarchy.build(6, [(0, 1), (6, 2), (3, 4, 5), (7, 8)])
    got = explain("partition", x, bg, groups.with_hierarchy(h))
    want = owen_by_orders(v_of(image_model, x, bg.data, groups), h)
    np.testing.assert_allclose(got.values, want, atol=1e-9)


def test_flat_partition_is_shapley(image: tuple[Array, Background]) -> None:
    x, bg = image
    groups = patches(2)
    flat = explain("partition", x, bg, Groups.build(groups.index, groups.labels))
    np.testing.assert_allclose(flat.values, explain("exact", x, bg, groups).values, atol=1e-10)


def test_sampled_partition_converges_to_exact_owen(image: tuple[Array, Background]) -> None:
    """An evaluation cap too small for the enumeration switches to hierarchical orders."""
    x, bg = image
    groups = patches(4)
    exact = explain("partition", x, bg, groups).values
    sampled = explain("partition", x, bg, groups, evals=1_200, seed=3)  # exact: 464 x 3
    assert sampled.samples > 0 and not sampled.converged
    low, high = sampled.interval(0.999)
    assert np.mean((low <= exact) & (exact <= high)) > 0.97
    np.testing.assert_allclose(sampled.additivity_gap, 0, atol=1e-9)


def test_hierarchical_orders_keep_every_node_contiguous() -> None:
    h = quadtree((4, 4))
    sampler = hierarchical_orders(h)
    ranks = sampler._orders(16, 200, np.random.default_rng(0))  # (400, 16)
    for node in range(16, h.root + 1):
        members = list(h.members(node))
        spread = ranks[:, members].max(axis=1) - ranks[:, members].min(axis=1)
        assert np.all(spread == len(members) - 1)
    first = np.argmin(ranks[:200], axis=1)
    assert len(set(first.tolist())) == 16  # every leaf can come first


def owen_terms_by_recursion(h: Hierarchy) -> tuple[Array, Array, Array, Array]:
    """The formula's terms as the first implementation found them, one context at a time, and
    np.unique(axis=0) over the bool masks: leaf ids, weights, distinct coalitions and where
    each term's without/with coalitions sit."""
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
                w = math.factorial(len(chosen)) * math.factorial(c - len(chosen) - 1) \
                    / math.factorial(c)
                walk(child, ctx, weight * w)

    walk(h.root, np.zeros(h.leaves, bool), 1.0)
    leaf, ctx = np.array(leaves), np.array(masks)
    with_leaf = ctx.copy()
    with_leaf[np.arange(leaf.size), leaf] = True
    table, where = np.unique(np.concatenate([ctx, with_leaf]), axis=0, return_inverse=True)
    return leaf, np.array(weights), table, where.ravel()


def binary_tree(leaves: int) -> Hierarchy:
    """Neighbours merged pairwise level by level (a k-d tree over a line of groups)."""
    nodes, children, nxt = list(range(leaves)), [], leaves
    while len(nodes) > 1:
        merged = []
        for a, b in zip(nodes[::2], nodes[1::2], strict=False):
            children.append((a, b))
            merged.append(nxt)
            nxt += 1
        nodes = merged + nodes[len(nodes) - len(nodes) % 2:]
    return Hierarchy.build(leaves, children)


@pytest.mark.parametrize("h", [quadtree((4, 4)), quadtree((3, 5)), quadtree((8, 8)),
                               binary_tree(9), binary_tree(100), Hierarchy.flat(10),
                               Hierarchy.build(6, [(0, 1), (6, 2), (3, 4, 5), (7, 8)])],
                         ids=["quad4x4", "quad3x5", "quad8x8", "binary9", "binary100", "flat10",
                              "uneven6"])
def test_owen_table_is_identical_to_the_recursion(h: Hierarchy) -> None:
    """Packed contexts and a 1-D unique give bit for bit the terms and coalitions of the
    one-context-at-a-time recursion (100 leaves: past one 64-bit word)."""
    leaf, weight, coalitions, where = owen_terms_by_recursion(h)
    table = owen_table(h)
    np.testing.assert_array_equal(table.leaf, leaf)
    np.testing.assert_array_equal(table.weight, weight)  # same products, same rounding
    np.testing.assert_array_equal(table.coalitions(), coalitions)
    np.testing.assert_array_equal(table.where, where)


def test_owen_tables_are_fast_and_kept_per_hierarchy() -> None:
    """An 8 x 8 quadtree's table (32,768 terms, 14,800 coalitions) took 0.7-1.3 s, which
    left a 300 ms budget nothing: now a few ms, and found once per hierarchy."""
    estimator = PartitionOwen()
    start = time.perf_counter()
    first = estimator.table(quadtree((8, 8)))
    assert time.perf_counter() - start < 0.25  # ~12 ms alone on 2 cores: loose under load
    assert first.size == 14_800 and first.leaf.size == context_count(quadtree((8, 8)))
    assert estimator.table(quadtree((8, 8))) is first  # an equal hierarchy hits the cache
    assert estimator.table(quadtree((4, 4))) is not first
    start = time.perf_counter()
    flat = estimator.table(Hierarchy.flat(16))  # 2^19 terms over every coalition
    assert time.perf_counter() - start < 1.0 and flat.size == 2**16  # ~0.1 s alone


def test_the_table_cache_is_bounded_in_bytes() -> None:
    small = PartitionOwen(table_bytes=200_000)
    small.table(quadtree((4, 4)))
    assert small._tables.nbytes <= 200_000 and len(small._tables) == 1
    small.table(quadtree((8, 8)))  # ~1 MB: not kept
    assert small._tables.nbytes <= 200_000 and len(small._tables) == 1


def test_a_small_budget_samples_rather_than_build_a_large_table(
        image: tuple[Array, Background]) -> None:
    """32,768 terms (an 8 x 8 quadtree) take ~10 ms to tabulate: a 40 ms call samples at once
    and builds nothing; a call with time to spare builds the table, and later calls use it."""
    x, bg = image
    estimator = PartitionOwen()
    groups = patches(8)
    quick = estimator.explain(Evaluator(image_model, 4096, 1e6), x, bg, Budget.of_seconds(0.04),
                              np.random.default_rng(0), groups)
    assert quick.samples > 0 and len(estimator._tables) == 0
    estimator.explain(Evaluator(image_model, 4096, 1e6), x, bg, Budget.of_seconds(20.0),
                      np.random.default_rng(0), groups)
    assert len(estimator._tables) == 1

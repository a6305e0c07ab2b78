"""Leaf tables and background patterns (explainers.trees.leaf_tables, leaf_patterns): the
closed-form game, exactness against brute force on trees with up to 16 path features, chunking,
and the fall-back to shap's walk."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from sklearn.ensemble import ExtraTreesRegressor, RandomForestRegressor

from explainers.base import Array, Background
from explainers.trees import leaf_patterns, leaf_tables
from explainers.trees.leaf_patterns import PatternCounter
from explainers.trees.leaf_tables import LeafBoxes, LeafTables, _tables
from explainers.trees.onnx_trees import parse_onnx_trees, predict_raw
from explainers.trees.tree import TreeShap
from tests.test_estimators import brute_force
from tests.test_tree import (
    Fn,
    background,
    graph_of,
    make_data,
    scores_fn,
    sklearn_model,
    target,
    to_onnx,
)

DEEP = 16  # features of the deep models: brute force enumerates 2^16 coalitions
ENGINES = {"tables to k=16": 16, "tables to k=9": 9, "patterns only": 0}


def shapley_of_game(k: int, m: int, p: int) -> np.ndarray:
    """Brute-force Shapley values of v(S) = 1 iff every feature j has (x's bit if j in S else
    z's bit) set, where m holds x's bits and p z's bits."""
    def v(s: tuple[int, ...]) -> float:
        return float(all((m if j in s else p) >> j & 1 for j in range(k)))

    phi = np.zeros(k)
    for i in range(k):
        others = [j for j in range(k) if j != i]
        for size in range(k):
            for s in itertools.combinations(others, size):
                w = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
                phi[i] += w * (v((*s, i)) - v(s))
    return phi


@pytest.mark.parametrize("k", [1, 2, 4])
def test_tables_and_patterns_match_the_brute_force_game_for_every_mask(k: int) -> None:
    """Two leaves with k slots, random weights on every pattern (zeros included): both engines
    give each mask the weighted brute-force Shapley values of the game."""
    rng = np.random.default_rng(k)
    counts = rng.random((2, 1 << k)) * (rng.random((2, 1 << k)) < 0.7)  # (leaves, patterns)
    games = np.array([[shapley_of_game(k, m, p) for p in range(1 << k)] for m in range(1 << k)])
    expected = np.einsum("lp,mpj->lmj", counts, games)  # (leaves, masks, slots)
    tables = _tables(k, counts).reshape(2, 1 << k, k)
    np.testing.assert_allclose(tables, expected, atol=1e-14)
    masks = np.arange(1 << k)[:, None]  # (rows = every mask, one leaf); patterns alike
    for leaf in range(2):
        counter = PatternCounter(np.array([k]))
        counter.add(masks, counts[leaf])
        shares = counter.patterns().shares(masks)  # (slots, masks)
        np.testing.assert_allclose(shares.T, expected[leaf], atol=1e-14)


def deep_tree_model(seed: int, trees: int = 2) -> onnx.ModelProto:
    """Random trees over DEEP features whose spine uses every feature once (its last leaves have
    16 path features); side branches stop at random and may split on a feature again. Modes,
    thresholds and missing-value sides are random, so every rewritten split rule is exercised."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list[Any]] = {n: [] for n in (
        "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_modes", "nodes_values",
        "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true",
        "target_treeids", "target_nodeids", "target_weights")}

    def grow(tree: int, used: tuple[int, ...], spine: bool) -> int:
        node = sum(1 for t in cols["nodes_treeids"] if t == tree)
        at = len(cols["nodes_treeids"])
        leaf = len(used) == DEEP or (not spine and rng.random() < 0.35)
        free = [f for f in range(DEEP) if f not in used] if spine else list(range(DEEP))
        row = (tree, node, 0 if leaf else int(rng.choice(free)),
               "LEAF" if leaf else str(rng.choice(["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE",
                                                   "BRANCH_GT"])),
               float(np.float32(rng.normal())), 0, 0, int(rng.integers(2)))
        for name, value in zip(list(cols)[:8], row, strict=True):
            cols[name].append(value)
        if leaf:
            cols["target_treeids"].append(tree)
            cols["target_nodeids"].append(node)
            cols["target_weights"].append(float(rng.normal()))
            return node
        on = int(rng.integers(2))  # which child carries the spine on
        kids = [grow(tree, (*used, row[2]), spine and on == side) for side in (0, 1)]
        cols["nodes_truenodeids"][at], cols["nodes_falsenodeids"][at] = kids
        return node

    for tree in range(trees):
        grow(tree, (), True)
    node = helper.make_node("TreeEnsembleRegressor", ["X"], ["Y"], domain="ai.onnx.ml",
                            n_targets=1, target_ids=[0] * len(cols["target_treeids"]),
                            base_values=[0.5], **cols)
    return graph_of([node], TensorProto.FLOAT, DEEP, 1)


def brute_force_all(f: Fn, x: Array, bg: Array, weights: Array) -> Array:
    """Interventional Shapley values by enumeration, every coalition in one call of f:
    (outputs, features)."""
    d = x.size
    inside = (np.arange(1 << d)[:, None] >> np.arange(d)) & 1  # (coalitions, features)
    Z = np.where(inside[:, None, :] == 1, x, bg[None])  # (coalitions, bg rows, features)
    v = np.einsum("cbo,b->co", f(Z.reshape(-1, d)).reshape(1 << d, bg.shape[0], -1), weights)
    size = inside.sum(axis=1)  # (coalitions,)
    w = np.array([math.factorial(s) * math.factorial(d - s - 1) / math.factorial(d)
                  for s in range(d)])
    phi = np.zeros((v.shape[1], d))
    for i in range(d):
        without = np.flatnonzero(inside[:, i] == 0)  # coalitions lacking i
        phi[:, i] = w[size[without]] @ (v[without | 1 << i] - v[without])
    return phi


def deep_rows(rows: int, seed: int, nan_share: float) -> Array:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, DEEP)).astype(np.float32).astype(np.float64)
    X[rng.random(X.shape) < nan_share] = np.nan
    return X


@pytest.fixture(scope="module")
def deep_model() -> tuple[onnx.ModelProto, Fn]:
    model = deep_tree_model(3)
    return model, scores_fn(model)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_trees_with_16_path_features_match_brute_force(
        engine: str, deep_model: tuple[onnx.ModelProto, Fn],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Weighted background and rows with NaNs on random deep trees: every engine equals
    enumeration of onnxruntime's own outputs."""
    monkeypatch.setattr(leaf_tables, "MAX_TABLE_FEATURES", ENGINES[engine])
    model, f = deep_model
    parsed = parse_onnx_trees(model)
    ks = LeafBoxes.build(parsed, [0]).ks
    assert ks.max() == DEEP and np.count_nonzero(ks >= 10) >= 10
    bg, X = deep_rows(5, 1, 0.15), deep_rows(2, 2, 0.15)
    counts = np.array([1.0, 3.0, 1.0, 2.0, 1.0])
    ts = TreeShap(parsed)
    for x, e in zip(X, ts.explain_rows(X, background(bg, f, counts)), strict=True):
        np.testing.assert_allclose(e.values, brute_force_all(f, x, bg, counts / counts.sum()),
                                   atol=1e-6)
        np.testing.assert_allclose(e.prediction, f(x[None])[0], atol=1e-6)
    engine_note = e.notes[-1]
    assert engine_note.startswith("tree engine: exact interventional TreeSHAP by ")
    assert ("background patterns (k 10-16)" in engine_note) == (engine == "tables to k=9")


def test_a_real_forest_with_14_path_features_matches_brute_force(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Extremely randomised trees grown to purity on 16 features: leaves with 2 to 14 path
    features; tables for the shallow ones, patterns for the deep ones."""
    monkeypatch.setattr(leaf_tables, "MAX_TABLE_FEATURES", 9)
    X = deep_rows(200, 4, 0.0)
    est = ExtraTreesRegressor(n_estimators=2, max_features=1, random_state=0)
    est.fit(X, X[:, 0] + X[:, 1] * X[:, 2] + np.random.default_rng(0).normal(size=200))
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    model = convert_sklearn(est, initial_types=[("input", FloatTensorType([None, DEEP]))],
                            target_opset={"": 17, "ai.onnx.ml": 3})
    f = scores_fn(model)
    ts = TreeShap(parse_onnx_trees(model))
    assert ts.engine == "leaf tables (k 2-9) and background patterns (k 10-14)"
    bg, x = X[:4], deep_rows(1, 5, 0.0)[0]
    e = ts.explain_rows(x[None], background(bg, f))[0]
    np.testing.assert_allclose(e.values, brute_force_all(f, x, bg, np.full(4, 0.25)),
                               atol=1e-6)


def test_weighted_background_with_nans_matches_brute_force() -> None:
    est, _ = sklearn_model("gbr")
    parsed = parse_onnx_trees(to_onnx(est))
    bg = make_data(12, 5, nan_share=0.2)  # NaNs follow each split's missing-value side
    counts = np.array([1, 2, 3, 1, 1, 4, 1, 2, 1, 1, 3, 1])
    tables = LeafTables.fit(LeafBoxes.build(parsed, [0]), bg, counts / counts.sum())
    X = make_data(3, 6, nan_share=0.3)
    phi, raw = tables.explain(X)  # (rows, features, 1), (rows, 1)
    np.testing.assert_allclose(raw, predict_raw(parsed, X), atol=1e-12)
    for r in range(3):
        exact = brute_force(lambda Z: predict_raw(parsed, Z), X[r], np.repeat(bg, counts, 0))
        np.testing.assert_allclose(phi[r][:, 0], exact[0], atol=1e-12)


@pytest.mark.parametrize("engine", ["tables to k=9", "patterns only"])
def test_chunks_give_the_same_answer(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leaf_tables, "MAX_TABLE_FEATURES", ENGINES[engine])
    est, train = sklearn_model("gbr")
    boxes = LeafBoxes.build(parse_onnx_trees(to_onnx(est)), [0])
    fitted = LeafTables.fit(boxes, train[:50], np.full(50, 0.02))
    whole = fitted.explain(train[50:90])
    monkeypatch.setattr(leaf_tables, "CHUNK_ELEMENTS", 64)  # a few rows per step
    monkeypatch.setattr(leaf_tables, "CACHE_ELEMENTS", 64)
    monkeypatch.setattr(leaf_patterns, "MAX_ENTRIES", max(fitted.entries, 1))  # merge early
    assert boxes.chunk() < 40
    parts = LeafTables.fit(boxes, train[:50], np.full(50, 0.02)).explain(train[50:90])
    for a, b in zip(whole, parts, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_too_many_patterns_fall_back_to_shaps_walk_for_that_background(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leaf_tables, "MAX_TABLE_FEATURES", 0)
    X = make_data(300, 8)
    est = RandomForestRegressor(n_estimators=3, max_depth=6, random_state=0)
    model = to_onnx(est.fit(X, target(X)))
    f = scores_fn(model)
    parsed = parse_onnx_trees(model)
    small, large = background(X[:2], f), background(X[:40], f)
    boxes = LeafBoxes.build(parsed, [0])
    most = LeafTables.fit(boxes, small.data, small.weights).entries
    monkeypatch.setattr(leaf_patterns, "MAX_ENTRIES", most)
    ts = TreeShap(parsed)
    assert "patterns" in ts.explain_rows(X[50:51], small)[0].notes[-1]
    e = ts.explain_rows(X[50:51], large)[0]
    assert f"TreeSHAP (the background has over {most} distinct" in e.notes[-1]
    np.testing.assert_allclose(e.values[0], brute_force(f, X[50], X[:40])[0], atol=1e-5)


def test_leaves_past_the_mask_width_fall_back_to_shaps_walk_with_the_same_values(
        monkeypatch: pytest.MonkeyPatch) -> None:
    X = make_data(300, 8)
    est = RandomForestRegressor(n_estimators=3, max_depth=None, random_state=0)
    model = to_onnx(est.fit(X, target(X)))
    parsed = parse_onnx_trees(model)
    monkeypatch.setattr(leaf_tables, "MAX_PATH_FEATURES", 3)  # the models here have 5 features
    with pytest.raises(leaf_tables.TablesTooLarge, match="path features"):
        LeafBoxes.build(parsed, [0])
    ts = TreeShap(parsed)
    assert ts.engine.startswith("shap's interventional TreeSHAP (a leaf has")
    f = scores_fn(model)
    bg = background(X[:20], f)
    for x, e in zip(X[20:22], ts.explain_rows(X[20:22], bg), strict=True):
        np.testing.assert_allclose(e.values[0], brute_force(f, x, X[:20])[0], atol=1e-5)
        assert e.notes[-1].startswith("tree engine: exact interventional TreeSHAP by shap's")


@pytest.mark.parametrize("engine", list(ENGINES))
def test_every_engine_agrees_with_shaps_walk_on_a_forest(
        engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leaf_tables, "MAX_TABLE_FEATURES", ENGINES[engine])
    X = make_data(300, 9)
    est = RandomForestRegressor(n_estimators=20, max_depth=6, random_state=0)
    parsed = parse_onnx_trees(to_onnx(est.fit(X, target(X))))
    tabled, walked = TreeShap(parsed), TreeShap(parsed, tables=False)
    bg = background(X[:60], scores_fn(to_onnx(est)))
    for a, b in zip(tabled.explain_rows(X[60:70], bg), walked.explain_rows(X[60:70], bg),
                    strict=True):
        np.testing.assert_allclose(a.values, b.values, atol=1e-7)
        np.testing.assert_allclose(a.base_values, b.base_values, atol=1e-7)
        np.testing.assert_allclose(a.prediction, b.prediction, atol=1e-7)


def test_a_split_at_minus_infinity_is_a_bound_not_an_open_end() -> None:
    """BRANCH_LT at -FLT_MAX in float32 becomes "x <= -inf goes left": x = -inf goes left,
    every other value right (an open lower end would let -inf into both leaves)."""
    node = helper.make_node(
        "TreeEnsembleRegressor", ["X"], ["Y"], domain="ai.onnx.ml",
        nodes_treeids=[0, 0, 0], nodes_nodeids=[0, 1, 2], nodes_featureids=[0, 0, 0],
        nodes_modes=["BRANCH_LT", "LEAF", "LEAF"], nodes_values=[-3.4028235e38, 0.0, 0.0],
        nodes_truenodeids=[1, 0, 0], nodes_falsenodeids=[2, 0, 0],
        nodes_missing_value_tracks_true=[0, 0, 0], target_treeids=[0, 0], target_nodeids=[1, 2],
        target_ids=[0, 0], target_weights=[1.0, 10.0], n_targets=1)
    model = graph_of([node], TensorProto.FLOAT, 1, 1)
    f = scores_fn(model)
    X, bg = np.array([[-np.inf], [3.0]]), np.array([[0.0], [-np.inf]])
    for x, e in zip(X, TreeShap(parse_onnx_trees(model)).explain_rows(X, background(bg, f)),
                    strict=True):
        np.testing.assert_allclose(e.prediction, f(x[None])[0])
        np.testing.assert_allclose(e.values[0], brute_force(f, x, bg)[0], atol=1e-12)


def test_fit_time_is_predicted_before_and_learned_after_a_fit(
        deep_model: tuple[onnx.ModelProto, Fn]) -> None:
    """A new background's fit is predicted from built-in rates, then from measured ones; a
    fitted background costs only its rows."""
    model, f = deep_model
    ts = TreeShap(parse_onnx_trees(model))
    bg = background(deep_rows(50, 6, 0.0), f)
    prior = ts.fit_seconds(bg)
    assert prior > 0 and ts.seconds_for(1, bg) == pytest.approx(prior)  # no row timed yet
    ts.prefit(bg)
    assert ts.fit_seconds(bg) == 0 and ts.seconds_for(1, bg) is None
    ts.explain_rows(deep_rows(3, 7, 0.0), bg)
    per_row = ts.seconds_for(1, bg)
    assert per_row is not None and per_row > 0
    other = Background.build(deep_rows(60, 8, 0.0), np.zeros((60, 1)))
    assert ts.fit_seconds(other) > 0 and ts.fit_seconds(other) != prior  # measured now
    assert ts.seconds_for(10, other) == pytest.approx(
        ts.fit_seconds(other) + 10 * ts._per_unit[True] * ts._units(other))

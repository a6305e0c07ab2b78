"""Leaf tables (explainers.trees.leaf_tables): the closed-form game, exactness against brute force,
chunking, and the fall-back to shap's walk for leaves with too many path features."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from onnx import TensorProto, helper
from sklearn.ensemble import RandomForestRegressor

from explainers.trees import leaf_tables
from explainers.trees.leaf_tables import LeafBoxes, LeafTables, _games
from explainers.trees.onnx_trees import parse_onnx_trees, predict_raw
from explainers.trees.tree import TreeShap
from tests.test_estimators import brute_force
from tests.test_tree import (
    background,
    graph_of,
    make_data,
    scores_fn,
    sklearn_model,
    target,
    to_onnx,
)


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
def test_the_closed_form_game_matches_brute_force_for_every_mask_and_pattern(k: int) -> None:
    games = _games(k).reshape(1 << k, 1 << k, k)  # (patterns, masks, features)
    for m, p in itertools.product(range(1 << k), repeat=2):
        np.testing.assert_allclose(games[p, m], shapley_of_game(k, m, p), atol=1e-15)


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


def test_chunks_give_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    est, train = sklearn_model("gbr")
    boxes = LeafBoxes.build(parse_onnx_trees(to_onnx(est)), [0])
    whole = LeafTables.fit(boxes, train[:50], np.full(50, 0.02)).explain(train[50:90])
    monkeypatch.setattr(leaf_tables, "CHUNK_ELEMENTS", 64)  # a few rows per step
    assert boxes.chunk() < 40
    parts = LeafTables.fit(boxes, train[:50], np.full(50, 0.02)).explain(train[50:90])
    for a, b in zip(whole, parts, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_deep_leaves_fall_back_to_shaps_walk_with_the_same_values(
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


def test_tables_and_shaps_walk_agree_on_a_forest() -> None:
    X = make_data(300, 9)
    est = RandomForestRegressor(n_estimators=20, max_depth=6, random_state=0)
    parsed = parse_onnx_trees(to_onnx(est.fit(X, target(X))))
    tabled, walked = TreeShap(parsed), TreeShap(parsed, tables=False)
    assert tabled.engine == "leaf tables"
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

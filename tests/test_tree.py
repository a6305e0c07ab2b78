"""TreeSHAP on ONNX tree ensembles: real converted models against shap on the native model,
hand-built graphs against onnxruntime and brute-force Shapley values, and the refusals."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import shap
from onnx import TensorProto, helper, numpy_helper

from explainers.base import Array, Background, Budget, Evaluator
from explainers.errors import InvalidArgument
from explainers.trees.onnx_trees import (
    UnsupportedTrees,
    apply_post_transform,
    parse_onnx_trees,
    predict_margin,
)
from explainers.trees.tree import MAX_WEIGHT_GROUPS, TreeShap
from tests.test_estimators import brute_force

ATOL = 1e-5
D = 5  # features of the trained models
Fn = Callable[[Array], Array]


# ---------------------------------------------------------------------------- helpers


def make_data(rows: int, seed: int, nan_share: float = 0.0) -> Array:
    """Float32-representable features (the ONNX models read float32), some NaN if asked."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, D)).astype(np.float32).astype(np.float64)  # (rows, D)
    X[rng.random(X.shape) < nan_share] = np.nan
    return X


def labels(X: Array, classes: int) -> Array:
    """Classes from a nonlinear score with interactions, NaN treated as 0."""
    Z = np.nan_to_num(X)
    score = Z[:, 0] + Z[:, 1] * Z[:, 2] - 0.5 * Z[:, 3]
    return np.digitize(score, np.quantile(score, np.linspace(0, 1, classes + 1)[1:-1]))


def target(X: Array) -> Array:
    Z = np.nan_to_num(X)
    return 2 * Z[:, 0] + np.sin(Z[:, 1]) * Z[:, 2] + np.where(np.isnan(X[:, 3]), 1.5, 0.0)


def to_onnx(est: Any) -> onnx.ModelProto:
    """skl2onnx conversion, float input, no ZipMap; ai.onnx.ml 3 works for XGBoost/LightGBM."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    options = {id(est): {"zipmap": False}} if hasattr(est, "predict_proba") else None
    return convert_sklearn(est, initial_types=[("input", FloatTensorType([None, D]))],
                           options=options, target_opset={"": 17, "ai.onnx.ml": 3})


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def ort_fn(model: onnx.ModelProto, output: str) -> Fn:
    """f(X) = the model's `output` as float64 (rows, columns), the way the service calls it."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    dtype = np.float64 if sess.get_inputs()[0].type == "tensor(double)" else np.float32

    def f(X: Array) -> Array:
        y = sess.run([output], {name: X.astype(dtype)})[0]
        return np.asarray(y, np.float64).reshape(X.shape[0], -1)

    return f


def scores_fn(model: onnx.ModelProto) -> Fn:
    return ort_fn(model, parse_onnx_trees(model)["score_outputs"][0])


def background(data: Array, f: Fn, weights: Array | None = None) -> Background:
    return Background.build(data, f(data), weights)


def explain_all(ts: TreeShap, X: Array, bg: Background) -> tuple[Array, Array, Array]:
    """values (rows, columns, features), base (columns,), predictions (rows, columns)."""
    out = ts.explain_rows(X, bg)
    return (np.stack([e.values for e in out]), out[0].base_values,
            np.stack([e.prediction for e in out]))


def native_shap(est: Any, bg: Array, X: Array, columns: int) -> tuple[Array, Array]:
    """shap on the native model, raw scale, same background: (rows, columns, features), base."""
    masker = shap.maskers.Independent(bg, max_samples=len(bg))
    explainer = shap.TreeExplainer(est, data=masker, feature_perturbation="interventional",
                                   model_output="raw")
    sv = np.asarray(explainer.shap_values(X, check_additivity=False))
    base = np.atleast_1d(np.asarray(explainer.expected_value, np.float64))
    if sv.ndim == 2 and columns == 2:  # one score: the ONNX op reports it as [-s, s]
        return np.stack([-sv, sv], axis=1), np.r_[-base[-1:], base[-1:]]
    if sv.ndim == 2:
        return sv[:, None, :], base
    return sv.transpose(0, 2, 1), base


def check_against_runtime(model: onnx.ModelProto, X: Array) -> None:
    """Trees rebuilt from the graph, post_transform applied, reproduce onnxruntime."""
    parsed = parse_onnx_trees(model)
    mine = apply_post_transform(parsed["post_transform"], predict_margin(parsed, X))
    np.testing.assert_allclose(mine, scores_fn(model)(X), atol=ATOL, rtol=1e-6)


# ---------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def registered() -> Iterator[None]:
    """Route XGBoost and LightGBM through skl2onnx with onnxmltools' converters."""
    from lightgbm import LGBMClassifier
    from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
    from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )
    from xgboost import XGBClassifier, XGBRegressor

    opts = {"nocl": [True, False], "zipmap": [True, False, "columns"]}
    update_registered_converter(XGBClassifier, "XGBoostXGBClassifier",
                                calculate_linear_classifier_output_shapes, convert_xgboost,
                                options=opts)
    update_registered_converter(XGBRegressor, "XGBoostXGBRegressor",
                                calculate_linear_regressor_output_shapes, convert_xgboost)
    update_registered_converter(LGBMClassifier, "LightGbmLGBMClassifier",
                                calculate_linear_classifier_output_shapes, convert_lightgbm,
                                options=opts)
    yield


def sklearn_model(kind: str) -> tuple[Any, Array]:
    """A small fitted model and its training data."""
    from sklearn import ensemble

    X = make_data(400, 0)
    small = {"n_estimators": 30, "max_depth": 3, "random_state": 0}
    if kind == "gbc":
        return ensemble.GradientBoostingClassifier(**small).fit(X, labels(X, 2)), X
    if kind == "gbr":
        return ensemble.GradientBoostingRegressor(**small).fit(X, target(X)), X
    if kind == "rfr":
        return ensemble.RandomForestRegressor(**small).fit(X, target(X)), X
    if kind == "rfc":
        return ensemble.RandomForestClassifier(**small).fit(X, labels(X, 2)), X
    return ensemble.RandomForestClassifier(**small).fit(X, labels(X, 3)), X


def boosted_model(kind: str) -> tuple[Any, Array]:
    """XGBoost / LightGBM models, small."""
    from lightgbm import LGBMClassifier
    from xgboost import XGBClassifier, XGBRegressor

    X = make_data(400, 1)
    if kind == "xgbc":
        return XGBClassifier(n_estimators=30, max_depth=3).fit(X, labels(X, 2)), X
    if kind == "xgbc3":
        return XGBClassifier(n_estimators=15, max_depth=3).fit(X, labels(X, 3)), X
    if kind == "xgbr":
        return XGBRegressor(n_estimators=30, max_depth=3).fit(X, target(X)), X
    lgbm = LGBMClassifier(n_estimators=15 if kind == "lgbc3" else 30, max_depth=3, num_leaves=8,
                          verbose=-1, random_state=0)
    return lgbm.fit(X, labels(X, 3 if kind == "lgbc3" else 2)), X


def compare_with_native(est: Any, model: onnx.ModelProto, train: Array,
                        margin: Fn | None = None) -> float:
    """TreeShap on the ONNX graph vs shap on the native model; returns the max difference.

    `margin`: the native model's own raw output, when shap's base value for it is wrong.
    """
    bg, X = train[:40], make_data(25, 7, nan_share=0.1 if np.isnan(train).any() else 0.0)
    ts = TreeShap.from_onnx(model)
    values, base, pred = explain_all(ts, X, background(bg, scores_fn(model)))
    expected, expected_base = native_shap(est, bg, X, values.shape[1])
    if margin is not None:
        expected_base = margin(bg).mean(axis=0)
    np.testing.assert_allclose(values, expected, atol=ATOL)
    np.testing.assert_allclose(base, expected_base, atol=ATOL)
    np.testing.assert_allclose(pred - base, values.sum(axis=2), atol=ATOL)  # additive
    check_against_runtime(model, np.r_[X, train])
    return float(np.abs(values - expected).max())


@pytest.mark.parametrize("kind", ["gbc", "gbr", "rfr", "rfc", "rfc3"])
def test_sklearn_ensembles_match_shap_on_the_native_model(kind: str) -> None:
    est, train = sklearn_model(kind)
    compare_with_native(est, to_onnx(est), train)


@pytest.mark.parametrize("kind", ["xgbc", "xgbc3", "xgbr"])
def test_xgboost_matches_shap_on_the_native_model(kind: str, registered: None) -> None:
    est, train = boosted_model(kind)
    # shap 0.51 reads only the first of XGBoost 3's per-class intercepts (base_score is a vector
    # for multi-class): its attributions are right but its expected value is off for the other
    # classes. The ONNX graph has all of them, so compare the base with xgboost's own margin.
    margin = (lambda X: est.predict(X, output_margin=True)) if kind == "xgbc3" else None
    compare_with_native(est, to_onnx(est), train, margin)


@pytest.mark.parametrize("kind", ["lgbc", "lgbc3"])
def test_lightgbm_matches_shap_on_the_native_model(kind: str, registered: None) -> None:
    # LightGBM splits on doubles; ONNX stores them as float32. The test rows are random float32
    # values, far from every split point, so both models route them identically; rows sitting
    # between a double threshold and its float32 rounding would differ (by design of the ONNX).
    est, train = boosted_model(kind)
    compare_with_native(est, to_onnx(est), train)


def lightgbm_defaults() -> tuple[Any, onnx.ModelProto, Array]:
    """LGBMClassifier() with its defaults (num_leaves=31, 100 trees) on 1,000 rows of 40
    features, its ONNX conversion (needs the `registered` fixture), and 1,200 rows: the training
    rows, then 200 it has not seen."""
    from lightgbm import LGBMClassifier
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=1200, n_features=40, n_informative=20, random_state=0)
    X = X.astype(np.float32).astype(np.float64)
    est = LGBMClassifier(verbose=-1, random_state=0, n_jobs=1).fit(X[:1000], y[:1000])
    model = convert_sklearn(est, initial_types=[("input", FloatTensorType([None, 40]))],
                            options={id(est): {"zipmap": False}},
                            target_opset={"": 17, "ai.onnx.ml": 3})
    return est, model, X


def test_lightgbm_with_default_leaves_has_deep_leaves_and_matches_shap(registered: None) -> None:
    """num_leaves=31 grows leaves with 10+ path features (background patterns, not shap's walk):
    equal to shap on the native model to 1e-6 relative, on rows it was not trained on."""
    est, model, X = lightgbm_defaults()
    ts = TreeShap.from_onnx(model, output_columns=[1])
    assert "background patterns (k 10-" in ts.engine
    bg, rows = X[:200], X[1100:1105]
    out = ts.explain_rows(rows, background(bg, scores_fn(model)))
    mine = np.stack([e.values[0] for e in out])  # (rows, features)
    masker = shap.maskers.Independent(bg, max_samples=len(bg))
    theirs = shap.TreeExplainer(est, data=masker, feature_perturbation="interventional",
                                model_output="raw").shap_values(rows, check_additivity=False)
    theirs = np.asarray(theirs).reshape(mine.shape)
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6 * np.abs(theirs).max())
    assert "background patterns" in out[0].notes[-1]


def test_hist_gradient_boosting_with_missing_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from skl2onnx.common import tree_ensemble
    from sklearn.ensemble import HistGradientBoostingRegressor

    original = tree_ensemble.add_node

    def add_node(*args: Any, **kwargs: Any) -> Any:
        # skl2onnx 1.20 passes Python bools for missing_value_tracks_true; onnx 1.23 wants ints
        flag = kwargs.get("nodes_missing_value_tracks_true", 0)
        return original(*args, **{**kwargs, "nodes_missing_value_tracks_true": int(flag)})

    monkeypatch.setattr(tree_ensemble, "add_node", add_node)
    X = make_data(400, 2, nan_share=0.15)
    est = HistGradientBoostingRegressor(max_iter=30, max_depth=4, random_state=0)
    est.fit(X, target(X))
    model = to_onnx(est)
    assert set(helper.get_attribute_value(next(
        a for a in model.graph.node[0].attribute
        if a.name == "nodes_missing_value_tracks_true"))) == {0, 1}
    compare_with_native(est, model, X)


def test_brute_force_on_a_converted_regressor() -> None:
    est, train = sklearn_model("gbr")
    model = to_onnx(est)
    f = scores_fn(model)
    bg, X = train[:16], make_data(3, 11)
    ts = TreeShap.from_onnx(model)
    for x, e in zip(X, ts.explain_rows(X, background(bg, f)), strict=True):
        np.testing.assert_allclose(e.values, brute_force(f, x, bg), atol=ATOL)
    # the parsed dict is shap's custom tree format as it is (shap's own rounding: ~1e-9)
    direct = shap.TreeExplainer(parse_onnx_trees(model), feature_perturbation="interventional",
                                data=shap.maskers.Independent(bg, max_samples=len(bg)))
    np.testing.assert_allclose(direct.shap_values(X), [e.values[0] for e in ts.explain_rows(
        X, background(bg, f))], atol=1e-8)


# ---------------------------------------------------------------------------- hand-built graphs

SPLITS = np.array([0.5, np.float32(0.1), -1.0], np.float32)  # 0.1 is not exact in binary
MODES = ["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT"]


def legacy_regressor(mode: str, tracks: list[int], dtype: int = TensorProto.FLOAT,
                     partial: bool = False, **extra: Any) -> onnx.ModelProto:
    """Two trees of depth 2 over 3 features, every split in `mode`, two targets.

    Tree 1 lists its nodes out of id order (children are ids, not positions) and one of its
    leaves has two weights for the same target, which must add up.
    """
    t0, t1 = tracks
    leaf = "LEAF"
    nodes = {"nodes_treeids": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
             "nodes_nodeids": [0, 1, 2, 3, 4, 0, 3, 1, 4, 2],
             "nodes_featureids": [0, 1, 0, 0, 0, 2, 0, 1, 0, 0],
             "nodes_modes": [mode, mode, leaf, leaf, leaf, mode, leaf, mode, leaf, leaf],
             "nodes_values": [SPLITS[0], SPLITS[1], 0, 0, 0, SPLITS[2], 0, SPLITS[0], 0, 0],
             "nodes_truenodeids": [1, 2, 0, 0, 0, 4, 0, 2, 0, 0],
             "nodes_falsenodeids": [4, 3, 0, 0, 0, 1, 0, 3, 0, 0],
             "nodes_missing_value_tracks_true": [t0, t1, 0, 0, 0, t1, 0, t0, 0, 0]}
    # every leaf of tree 0 has a weight for target 1 (one of them 0), so onnxruntime always
    # adds target 1's base value (it drops it in rows where no leaf has a weight for it)
    targets = {"target_treeids": [0, 0, 0, 1, 1, 1, 1, 0, 0, 0][:10 - 2 * partial],
               "target_nodeids": [2, 3, 4, 2, 3, 4, 4, 2, 3, 4][:10 - 2 * partial],
               "target_ids": [0, 0, 0, 0, 0, 0, 0, 1, 1, 1][:10 - 2 * partial], "n_targets": 2,
               "target_weights": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 0.5, -3.0, 0.0, 1.5]
               [:10 - 2 * partial], "base_values": [0.25, -0.5], **extra}
    node = helper.make_node("TreeEnsembleRegressor", ["X"], ["Y"], domain="ai.onnx.ml",
                            **nodes, **targets)
    return graph_of([node], dtype, 3, 2)


def graph_of(nodes: list[onnx.NodeProto], dtype: int, features: int, outputs: int,
             ml_opset: int = 3) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("X", dtype, [None, features])
    y = helper.make_tensor_value_info(nodes[-1].output[-1], TensorProto.FLOAT, [None, outputs])
    graph = helper.make_graph(nodes, "trees", [x], [y])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("ai.onnx.ml", ml_opset)]
    return helper.make_model(graph, opset_imports=opsets)


def boundary_rows() -> Array:
    """Every combination of each split value, its float32 neighbours, and NaN: (rows, 3)."""
    points = [np.nan]
    for t in SPLITS:
        points += [float(t), float(np.nextafter(t, np.float32(-np.inf))),
                   float(np.nextafter(t, np.float32(np.inf)))]
    grid = np.array(points)
    return np.array(np.meshgrid(grid, grid, grid)).reshape(3, -1).T  # (points^3, 3)


@pytest.mark.parametrize("mode", MODES)
def test_each_branch_mode_routes_like_onnxruntime_on_the_thresholds(mode: str) -> None:
    model = legacy_regressor(mode, [1, 0])
    rows = boundary_rows()
    check_against_runtime(model, rows)
    f = scores_fn(model)
    rng = np.random.default_rng(3)
    bg = rows[rng.choice(len(rows), 12, replace=False)]
    X = rows[rng.choice(len(rows), 4, replace=False)]
    for x, e in zip(X, TreeShap.from_onnx(model).explain_rows(X, background(bg, f)),
                    strict=True):
        np.testing.assert_allclose(e.values, brute_force(f, x, bg), atol=ATOL)
        np.testing.assert_allclose(e.prediction, f(x[None])[0], atol=ATOL)


def test_double_input_keeps_exact_leq_splits_and_refuses_strict_ones() -> None:
    model = legacy_regressor("BRANCH_LEQ", [0, 1], dtype=TensorProto.DOUBLE)
    assert parse_onnx_trees(model)["input_dtype"] is np.float64
    check_against_runtime(model, boundary_rows())
    with pytest.raises(UnsupportedTrees, match="float32"):
        parse_onnx_trees(legacy_regressor("BRANCH_LT", [0, 0], dtype=TensorProto.DOUBLE))


def opset5_model(aggregate: int = 0, modes: tuple[int, ...] = (0, 3, 1)) -> onnx.ModelProto:
    """TreeEnsemble (ai.onnx.ml 5) behind an Identity: two targets, three trees, one a stump.

    tree 0: node 0 (x0) -> true: node 1 (x1) -> leaves 1 / 2, false: leaf 0
    tree 1: node 2 (x0) -> leaves 3 / 4; tree 2: node 3, both branches to leaf 5 (a stump)
    """
    node = helper.make_node(
        "TreeEnsemble", ["Xi"], ["Y"], domain="ai.onnx.ml", n_targets=2,
        aggregate_function=aggregate, post_transform=0, tree_roots=[0, 2, 3],
        nodes_modes=numpy_helper.from_array(np.array([*modes, 0], np.uint8)),
        nodes_featureids=[0, 1, 0, 0],
        nodes_splits=numpy_helper.from_array(np.r_[SPLITS, 0].astype(np.float32)),
        nodes_truenodeids=[1, 1, 3, 5], nodes_trueleafs=[0, 1, 1, 1],
        nodes_falsenodeids=[0, 2, 4, 5], nodes_falseleafs=[1, 1, 1, 1],
        nodes_missing_value_tracks_true=[1, 0, 0, 0],
        leaf_targetids=[0, 0, 1, 0, 1, 1],
        leaf_weights=numpy_helper.from_array(np.array([1, -2, 3, 5, 7, 0.5], np.float32)))
    identity = helper.make_node("Identity", ["X"], ["Xi"])
    return graph_of([identity, node], TensorProto.FLOAT, 3, 2, ml_opset=5)


def test_opset5_tree_ensemble_with_average_and_two_targets() -> None:
    model = opset5_model()
    rows = boundary_rows()
    check_against_runtime(model, rows)
    parsed = parse_onnx_trees(model)
    assert len(parsed["trees"]) == 3 and parsed["post_transform"] == "NONE"
    f = scores_fn(model)
    bg, X = rows[::97][:10], rows[5::131][:3]
    for x, e in zip(X, TreeShap.from_onnx(model).explain_rows(X, background(bg, f)),
                    strict=True):
        np.testing.assert_allclose(e.values, brute_force(f, x, bg), atol=ATOL)


def test_classifier_with_repeated_weights_and_zipmap() -> None:
    """Two leaves carry several class entries that must sum; SOFTMAX over three classes."""
    node = helper.make_node(
        "TreeEnsembleClassifier", ["X"], ["label", "scores"], domain="ai.onnx.ml",
        nodes_treeids=[0, 0, 0], nodes_nodeids=[0, 1, 2], nodes_featureids=[1, 0, 0],
        nodes_modes=["BRANCH_GT", "LEAF", "LEAF"], nodes_values=[float(SPLITS[1]), 0, 0],
        nodes_truenodeids=[1, 0, 0], nodes_falsenodeids=[2, 0, 0],
        class_treeids=[0, 0, 0, 0, 0], class_nodeids=[1, 1, 2, 1, 2],
        class_ids=[0, 0, 1, 2, 2], class_weights=[0.5, 0.25, 1.0, -1.0, 2.0],
        classlabels_int64s=[0, 1, 2], base_values=[0.1, 0.2, 0.3], post_transform="SOFTMAX")
    zipmap = helper.make_node("ZipMap", ["scores"], ["probabilities"], domain="ai.onnx.ml",
                              classlabels_int64s=[0, 1, 2])
    model = graph_of([node, zipmap], TensorProto.FLOAT, 3, 3)
    maps = helper.make_map_type_proto(TensorProto.INT64,
                                      helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    model.graph.output[0].CopyFrom(helper.make_value_info(
        "probabilities", helper.make_sequence_type_proto(maps)))
    parsed = parse_onnx_trees(model)
    assert parsed["score_outputs"] == ("probabilities",)
    X = boundary_rows()
    margin = predict_margin(parsed, X)
    expected = np.where(X[:, [1]] > SPLITS[1], [0.85, 0.2, -0.7], [0.1, 1.2, 2.3])
    np.testing.assert_allclose(margin, expected, atol=1e-7)
    sess = session(model)
    proba = sess.run(["probabilities"], {"X": X.astype(np.float32)})[0]
    table = np.array([[row[k] for k in range(3)] for row in proba])
    np.testing.assert_allclose(apply_post_transform("SOFTMAX", margin), table, atol=ATOL)


# ---------------------------------------------------------------------------- refusals


def test_equality_splits_are_refused() -> None:
    with pytest.raises(UnsupportedTrees, match="BRANCH_EQ"):
        parse_onnx_trees(legacy_regressor("BRANCH_EQ", [0, 0]))
    with pytest.raises(UnsupportedTrees, match="BRANCH_MEMBER"):
        parse_onnx_trees(opset5_model(modes=(0, 6, 1)))


def test_min_max_aggregation_is_refused() -> None:
    with pytest.raises(UnsupportedTrees, match="MAX"):
        parse_onnx_trees(legacy_regressor("BRANCH_LEQ", [0, 0], aggregate_function="MAX"))
    with pytest.raises(UnsupportedTrees, match="MIN"):
        parse_onnx_trees(opset5_model(aggregate=2))


def test_preprocessing_before_the_trees_is_refused() -> None:
    model = legacy_regressor("BRANCH_LEQ", [0, 0])
    scale = helper.make_node("Scaler", ["X"], ["Xs"], domain="ai.onnx.ml", scale=[2.0, 1.0, 1.0],
                             offset=[0.0, 0.0, 0.0])
    model.graph.node[0].input[0] = "Xs"
    model.graph.node.insert(0, scale)
    with pytest.raises(UnsupportedTrees, match="Scaler"):
        parse_onnx_trees(model)


def test_base_values_onnxruntime_drops_are_refused() -> None:
    model = legacy_regressor("BRANCH_LEQ", [0, 0], partial=True)
    # only tree 0's leaf 2 weighs target 1: a row reaching leaf 4 gets 0, not the base -0.5
    assert session(model).run(None, {"X": np.array([[1.0, 0, 0]], np.float32)})[0][0, 1] == 0
    with pytest.raises(UnsupportedTrees, match="no leaf with a weight"):
        parse_onnx_trees(model)


def test_single_target_leaves_with_several_weights_are_refused() -> None:
    # onnxruntime keeps only the first weight of such a leaf; the ONNX spec sums them
    node = helper.make_node(
        "TreeEnsembleRegressor", ["X"], ["Y"], domain="ai.onnx.ml", n_targets=1,
        nodes_treeids=[0], nodes_nodeids=[0], nodes_featureids=[0], nodes_modes=["LEAF"],
        nodes_values=[0.0], nodes_truenodeids=[0], nodes_falsenodeids=[0],
        target_treeids=[0, 0], target_nodeids=[0, 0], target_ids=[0, 0], target_weights=[1, 2])
    with pytest.raises(UnsupportedTrees, match="first"):
        parse_onnx_trees(graph_of([node], TensorProto.FLOAT, 1, 1))


# ---------------------------------------------------------------------------- the estimator


@pytest.fixture(scope="module")
def gbc() -> tuple[onnx.ModelProto, Array]:
    est, train = sklearn_model("gbc")
    return to_onnx(est), train


def test_explain_follows_the_estimator_contract(gbc: tuple[onnx.ModelProto, Array]) -> None:
    model, train = gbc
    f = scores_fn(model)
    bg = background(train[:30], f)
    ts = TreeShap.from_onnx(model)
    ev = Evaluator(f)
    e = ts.explain(ev, train[50], bg, Budget.of_seconds(1.0), np.random.default_rng(0))
    assert e.method == "tree" and e.converged and not e.budget_exhausted
    assert e.values.shape == (2, D) and not e.std_errors.any() and ev.evaluations == 0
    assert "LOGISTIC" in e.notes[0]
    np.testing.assert_allclose(e.additivity_gap, 0.0, atol=1e-6)
    np.testing.assert_allclose(apply_post_transform("LOGISTIC", e.prediction[None])[0],
                               f(train[50:51])[0], atol=ATOL)
    again = ts.explain_rows(train[50:52], bg)[0]
    np.testing.assert_array_equal(again.values, e.values)
    assert len(ts._cache) == 1
    for rows in (train[:20], train[20:40], train[40:60], train[60:80], train[80:100]):
        ts.explain_rows(train[:1], background(rows, f))
    assert len(ts._cache) == 4  # bounded


def test_output_columns_pick_the_score_columns(gbc: tuple[onnx.ModelProto, Array]) -> None:
    model, train = gbc
    bg = background(train[:30], scores_fn(model))
    both = TreeShap.from_onnx(model).explain_rows(train[40:43], bg)
    one = TreeShap.from_onnx(model, output_columns=[1]).explain_rows(train[40:43], bg)
    for a, b in zip(both, one, strict=True):
        np.testing.assert_allclose(b.values, a.values[1:], atol=1e-12)
        np.testing.assert_allclose(b.base_values, a.base_values[1:], atol=1e-12)
    with pytest.raises(InvalidArgument, match="output_columns"):
        TreeShap.from_onnx(model, output_columns=[2])


@pytest.mark.parametrize("tables", [True, False], ids=["tables", "shap"])
def test_weighted_background_equals_repeated_rows(gbc: tuple[onnx.ModelProto, Array],
                                                  tables: bool) -> None:
    model, train = gbc
    f = scores_fn(model)
    data, counts = train[:12], np.array([1, 2, 3] * 4)
    ts = TreeShap(parse_onnx_trees(model), tables=tables)
    weighted = ts.explain_rows(train[60:63], background(data, f, counts.astype(float)))
    repeated = ts.explain_rows(train[60:63], background(np.repeat(data, counts, axis=0), f))
    for a, b in zip(weighted, repeated, strict=True):
        np.testing.assert_allclose(a.values, b.values, atol=1e-9)
        np.testing.assert_allclose(a.base_values, b.base_values, atol=1e-9)
    counts = np.arange(1, MAX_WEIGHT_GROUPS + 2)
    many = background(train[:MAX_WEIGHT_GROUPS + 1], f, counts.astype(float))
    if not tables:  # shap's path runs once per distinct weight, so their number is capped
        with pytest.raises(InvalidArgument, match=r"background\.weights"):
            ts.explain_rows(train[:1], many)
        return
    spread = background(np.repeat(train[:MAX_WEIGHT_GROUPS + 1], counts, axis=0), f)
    for a, b in zip(ts.explain_rows(train[60:62], many), ts.explain_rows(train[60:62], spread),
                    strict=True):
        np.testing.assert_allclose(a.values, b.values, atol=1e-9)


def test_shapes_are_checked(gbc: tuple[onnx.ModelProto, Array]) -> None:
    model, train = gbc
    bg = background(train[:10], scores_fn(model))
    ts = TreeShap.from_onnx(model)
    with pytest.raises(InvalidArgument, match="x:"):
        ts.explain(Evaluator(scores_fn(model)), train[0, :3], bg, Budget.of_seconds(1.0),
                   np.random.default_rng(0))

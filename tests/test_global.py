"""Dataset-wide explanations against scikit-learn and shap on real converted models:
permutation importance and partial dependence equal scikit-learn's on the same ONNX function,
data and permutations; ICE curves average to the PDP; dataset-wide mean |phi| is the mean of the
per-row answers; TreeSHAP interactions equal shap's on the native model; PCA equals
scikit-learn's. Also the jobs' contract: progress, cancellation, budgets, row caps, seeds."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import shap
from scipy.stats.mstats import mquantiles
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.decomposition import PCA
from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor
from sklearn.inspection import partial_dependence as sk_partial_dependence
from sklearn.inspection import permutation_importance as sk_permutation_importance

from explainers.base import Array, Background, Budget, Evaluator
from explainers.errors import Cancelled, InvalidArgument, ResourceExhausted
from explainers.global_.dataset_shapley import LocalExplainer, dataset_shapley, player_values
from explainers.global_.dependence import GridSpec, partial_dependence
from explainers.global_.interactions import tree_interactions
from explainers.global_.jobs import Control, Progress, events, run
from explainers.global_.permutation_importance import (
    importance_from_permutations,
    permutation_importance,
)
from explainers.global_.projection import pca
from explainers.groups import Groups
from explainers.shapley.permutation import PermutationShapley
from explainers.trees.onnx_trees import parse_onnx_trees
from explainers.trees.tree import TreeShap

D = 4  # features
Fn = Callable[[Array], Array]
TOL = 1e-12


# ---------------------------------------------------------------------------- models


def make_data(rows: int = 120, seed: int = 0) -> Array:
    """Float32-representable features (the models read float32); column 3 has 5 values."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, D)).astype(np.float32).astype(np.float64)  # (rows, D)
    X[:, 3] = rng.integers(0, 5, rows)
    return X


def classes(X: Array) -> Array:
    return np.digitize(X[:, 0] + X[:, 1] * X[:, 2] + 0.3 * X[:, 3], [-0.3, 0.9])


def regression_target(X: Array) -> Array:
    return X[:, 0] * X[:, 1] + np.sin(X[:, 2]) + 0.2 * X[:, 3]


def to_onnx(est: Any) -> onnx.ModelProto:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    options = {id(est): {"zipmap": False}} if hasattr(est, "predict_proba") else None
    return convert_sklearn(est, initial_types=[("input", FloatTensorType([None, D]))],
                           options=options, target_opset={"": 17, "ai.onnx.ml": 3})


def ort_fn(model: onnx.ModelProto) -> Fn:
    """f(X): the model's last output (probabilities, or the prediction) as float64 (rows, k)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    output = sess.get_outputs()[-1].name

    def f(X: Array) -> Array:
        y = sess.run([output], {"input": X.astype(np.float32)})[0]
        return np.asarray(y, np.float64).reshape(X.shape[0], -1)
    return f


@pytest.fixture(scope="module", name="X")
def rows_fixture() -> Array:
    return make_data()


@pytest.fixture(scope="module")
def classifier(X: Array) -> tuple[GradientBoostingClassifier, onnx.ModelProto]:
    est = GradientBoostingClassifier(n_estimators=15, max_depth=2, random_state=0)
    est.fit(X, classes(X))
    return est, to_onnx(est)


@pytest.fixture(scope="module")
def regressor(X: Array) -> tuple[GradientBoostingRegressor, onnx.ModelProto]:
    est = GradientBoostingRegressor(n_estimators=20, max_depth=3, random_state=0)
    est.fit(X, regression_target(X))
    return est, to_onnx(est)


class OnnxClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """scikit-learn's view of the ONNX function; records every matrix it is given."""

    def __init__(self, fn: Fn | None = None) -> None:
        self.fn = fn

    def fit(self, X: Array, y: Array) -> OnnxClassifier:
        self.classes_ = np.unique(y)
        self.seen_: list[Array] = []
        return self

    def predict_proba(self, X: Array) -> Array:
        assert self.fn is not None
        self.seen_.append(np.array(X))
        return self.fn(X)

    def predict(self, X: Array) -> Array:
        return np.asarray(self.classes_[np.argmax(self.predict_proba(X), axis=1)])


class OnnxRegressor(RegressorMixin, BaseEstimator):  # type: ignore[misc]
    def __init__(self, fn: Fn | None = None) -> None:
        self.fn = fn

    def fit(self, X: Array, y: Array) -> OnnxRegressor:
        self.seen_: list[Array] = []
        return self

    def predict(self, X: Array) -> Array:
        assert self.fn is not None
        self.seen_.append(np.array(X))
        return self.fn(X)[:, 0]


def sklearn_permutations(X: Array, seen: list[Array], repeats: int) -> dict[tuple[int, int], Array]:
    """A row permutation behind each matrix scikit-learn scored (columns outer, repeats
    inner, after the baseline): the rows' values matched in sorted order (any match of tied
    values gives the same matrix), checked to reproduce the matrix exactly."""
    perms = {}
    for j in range(X.shape[1]):
        order = np.argsort(X[:, j], kind="stable")
        for r in range(repeats):
            A = seen[1 + j * repeats + r]
            perm = np.empty(X.shape[0], np.int64)
            perm[np.argsort(A[:, j], kind="stable")] = order
            B = X.copy()
            B[:, j] = X[perm, j]
            assert np.array_equal(A, B)
            perms[(r, j)] = perm
    return perms


# ------------------------------------------------------------------ permutation importance


@pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one")
@pytest.mark.parametrize(("kind", "scoring", "metric"), [
    ("classifier", "accuracy", "accuracy"), ("classifier", "neg_log_loss", "log_loss"),
    ("regressor", "r2", "r2"), ("regressor", "neg_mean_squared_error", "mse")])
def test_permutation_importance_equals_sklearn(X: Array, classifier: Any, regressor: Any,
                                               kind: str, scoring: str, metric: str) -> None:
    """Fed scikit-learn's own permutations, the importances are scikit-learn's."""
    model = classifier if kind == "classifier" else regressor
    fn = ort_fn(model[1])
    y = classes(X) if kind == "classifier" else regression_target(X)
    est = (OnnxClassifier(fn) if kind == "classifier" else OnnxRegressor(fn)).fit(X, y)
    theirs = sk_permutation_importance(est, X, y, scoring=scoring, n_repeats=4, random_state=7)
    perms = sklearn_permutations(X, est.seen_, 4)
    ours = run(importance_from_permutations(Evaluator(fn), X, lambda r, g: perms[(r, g)], y,
                                            metric, repeats=4))
    assert ours.metric == metric and ours.info.complete
    np.testing.assert_allclose(ours.importances, theirs.importances, rtol=0, atol=TOL)
    np.testing.assert_allclose(ours.mean, theirs.importances_mean, rtol=0, atol=TOL)
    # scikit-learn's std is ddof=0 across repeats; ours is the standard error of the mean
    se = theirs.importances_std * math.sqrt(4 / 3) / 2
    np.testing.assert_allclose(ours.std_errors, se, rtol=1e-9, atol=TOL)
    assert ours.mean.max() > 0.01  # the models use their features


def test_importance_without_labels_is_the_mean_absolute_change(X: Array) -> None:
    """No labels: the mean |f(permuted) - f(X)| over rows and outputs; an unused column 0."""
    def f(A: Array) -> Array:
        return np.stack([A[:, 0] * A[:, 1], np.sin(A[:, 2])], axis=1)
    rng = np.random.default_rng(3)
    perms = {(r, g): rng.permutation(X.shape[0]) for r in range(3) for g in range(D)}
    ours = run(importance_from_permutations(Evaluator(f), X, lambda r, g: perms[(r, g)],
                                            repeats=3))
    for (r, g), p in perms.items():
        B = X.copy()
        B[:, g] = X[p, g]
        assert ours.importances[g, r] == pytest.approx(np.mean(np.abs(f(B) - f(X))), abs=TOL)
    assert ours.metric == "mean_abs_change" and ours.baseline_score == 0
    assert np.all(ours.importances[3] == 0) and np.all(ours.importances[:3] > 0)


def test_a_group_is_permuted_as_a_block(X: Array, regressor: Any) -> None:
    """Players {0, 1} and {2, 3}: one permutation moves both columns of a group."""
    fn, y = ort_fn(regressor[1]), regression_target(X)
    groups = Groups.build(np.array([0, 0, 1, 1]), ["a", "b"])
    rng = np.random.default_rng(5)
    perms = {(r, g): rng.permutation(X.shape[0]) for r in range(2) for g in range(2)}
    ours = run(importance_from_permutations(Evaluator(fn), X, lambda r, g: perms[(r, g)], y,
                                            "mse", repeats=2, groups=groups))
    assert ours.labels == ("a", "b")
    for (r, g), p in perms.items():
        B = X.copy()
        cols = [2 * g, 2 * g + 1]
        B[:, cols] = X[p][:, cols]
        drop = np.mean((y - fn(B)[:, 0]) ** 2) - np.mean((y - fn(X)[:, 0]) ** 2)
        assert ours.importances[g, r] == pytest.approx(drop, abs=1e-10)


def test_permutation_importance_is_seeded_and_capped(X: Array, regressor: Any) -> None:
    fn, y = ort_fn(regressor[1]), regression_target(X)

    def once(seed: int, cap: int | None = None) -> Any:
        return run(permutation_importance(Evaluator(fn), X, np.random.default_rng(seed), y,
                                          "r2", repeats=3, control=Control(max_rows=cap)))
    a, b, c = once(1), once(1), once(2)
    assert np.array_equal(a.importances, b.importances)
    assert not np.array_equal(a.importances, c.importances)
    capped = once(1, cap=50)
    assert capped.rows.size == 50 and np.all(np.diff(capped.rows) > 0)


def test_permutation_importance_stops_at_whole_repeats_on_its_budget(X: Array,
                                                                    regressor: Any) -> None:
    """An evaluation cap for 3 of 6 repeats: 3 repeats for every player, marked as stopped;
    a cap below 2 repeats is refused before any model call."""
    fn, y, n = ort_fn(regressor[1]), regression_target(X), X.shape[0]
    cap = n * (1 + 3 * D) + n  # baseline, 3 repeats, and part of a fourth
    model = Evaluator(fn)
    out = run(permutation_importance(model, X, np.random.default_rng(0), y, "mse", repeats=6,
                                     control=Control(Budget(math.inf, cap))))
    assert out.repeats == 3 and out.info.stopped == "max_evaluations"
    assert model.evaluations == n * (1 + 3 * D) and np.all(np.isfinite(out.std_errors))
    small = Evaluator(fn)
    with pytest.raises(ResourceExhausted):
        run(permutation_importance(small, X, np.random.default_rng(0), y, "mse",
                                   control=Control(Budget(math.inf, n * (1 + D)))))
    assert small.evaluations == 0


@pytest.mark.parametrize(("y", "metric", "message"), [
    (None, "r2", "needs labels"), (np.zeros(120), "", "metric"),
    (np.full(120, 7), "accuracy", "class index"), (np.zeros(5), "mse", "labels: one per row")])
def test_permutation_importance_refuses_bad_labels(X: Array, classifier: Any, y: Array | None,
                                                   metric: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        run(permutation_importance(Evaluator(ort_fn(classifier[1])), X,
                                   np.random.default_rng(0), y, metric))


# ---------------------------------------------------------------------------- partial dependence


@pytest.mark.parametrize(("kind", "features", "resolution"), [
    ("regressor", [0], 100), ("regressor", [3, 1], 30), ("classifier", [0, 2], 15),
    ("classifier", [3], 100)])
def test_partial_dependence_equals_sklearn(X: Array, classifier: Any, regressor: Any,
                                           kind: str, features: list[int],
                                           resolution: int) -> None:
    """Brute-force PDP and ICE, on scikit-learn's default grid, equal its partial_dependence;
    the ICE curves of every row average to the PDP."""
    model = classifier if kind == "classifier" else regressor
    fn = ort_fn(model[1])
    est = (OnnxClassifier(fn) if kind == "classifier" else OnnxRegressor(fn)).fit(
        X, classes(X) if kind == "classifier" else regression_target(X))
    theirs = sk_partial_dependence(est, X, features, method="brute", kind="both",
                                   grid_resolution=resolution)
    ours = run(partial_dependence(Evaluator(fn), X, features, np.random.default_rng(0),
                                  GridSpec(resolution=resolution), ice_rows=X.shape[0]))
    for a, b in zip(ours.grid_values, theirs.grid_values, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ours.average, theirs.average, rtol=0, atol=TOL)
    np.testing.assert_allclose(ours.individual, theirs.individual, rtol=0, atol=TOL)
    np.testing.assert_allclose(ours.individual.mean(axis=1), ours.average, rtol=0, atol=TOL)
    assert np.array_equal(ours.ice_rows, np.arange(X.shape[0])) and ours.rows == X.shape[0]
    spread = ours.individual.std(axis=1, ddof=1) / math.sqrt(X.shape[0])
    np.testing.assert_allclose(ours.std_errors, spread, rtol=1e-9, atol=TOL)


def test_a_pair_of_features_of_a_classifier_gives_its_decision_regions(
        X: Array, classifier: Any) -> None:
    ours = run(partial_dependence(Evaluator(ort_fn(classifier[1])), X, [0, 1],
                                  np.random.default_rng(0), GridSpec(resolution=10)))
    assert ours.average.shape == (3, 10, 10) and ours.regions.shape == (10, 10)
    assert np.array_equal(ours.regions, ours.average.argmax(axis=0))
    assert len(np.unique(ours.regions)) >= 2


def test_ice_for_a_sample_of_rows_and_a_quantile_grid(X: Array, regressor: Any) -> None:
    """ICE for 10 seeded rows (their own predictions, up to onnxruntime's float32 sums, whose
    order depends on the batch size); the quantile grid's points are the quantiles at evenly
    spaced levels between the percentiles."""
    fn = ort_fn(regressor[1])
    spec = GridSpec(resolution=8, spacing="quantiles")
    ours = run(partial_dependence(Evaluator(fn), X, [1], np.random.default_rng(4), spec,
                                  ice_rows=10))
    levels = np.linspace(0.05, 0.95, 8)
    np.testing.assert_array_equal(ours.grid_values[0], np.asarray(mquantiles(X[:, 1], levels)))
    assert ours.ice_rows.size == 10 and np.all(np.diff(ours.ice_rows) > 0)
    for k, row in enumerate(ours.ice_rows):
        B = np.repeat(X[row][None], 8, axis=0)
        B[:, 1] = ours.grid_values[0]
        np.testing.assert_allclose(ours.individual[0, k], fn(B)[:, 0], rtol=0, atol=1e-6)


def test_partial_dependence_on_a_budget_averages_the_rows_done(X: Array,
                                                               regressor: Any) -> None:
    """An evaluation cap for part of the rows: the PDP over a seeded sample of rows, equal
    to the mean of their ICE curves, marked as stopped."""
    fn = ort_fn(regressor[1])
    model = Evaluator(fn, rows_per_second=5)  # slow: one row per chunk
    out = run(partial_dependence(model, X, [0], np.random.default_rng(0), GridSpec(resolution=5),
                                 ice_rows=X.shape[0], control=Control(Budget(math.inf, 5 * 30))))
    assert out.info.stopped == "max_evaluations" and out.rows == 30 == out.ice_rows.size
    np.testing.assert_allclose(out.individual.mean(axis=1), out.average, rtol=0, atol=TOL)


@pytest.mark.parametrize(("features", "spec", "message"), [
    ([0, 0], GridSpec(), "features"), ([7], GridSpec(), "features"),
    ([0], GridSpec(percentiles=(0.5, 0.4)), "percentiles"),
    ([0], GridSpec(spacing="log"), "spacing"),
    ([0, 1], GridSpec(values=(np.arange(3.0),)), "grid.values")])
def test_partial_dependence_refuses_bad_requests(X: Array, features: list[int], spec: GridSpec,
                                                 message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        run(partial_dependence(Evaluator(lambda A: A[:, :1]), X, features,
                               np.random.default_rng(0), spec))


# ---------------------------------------------------------------------------- jobs


def test_a_job_reports_progress_then_its_result(X: Array, regressor: Any) -> None:
    fn = ort_fn(regressor[1])
    stream = list(events(partial_dependence(Evaluator(fn, rows_per_second=2000), X, [0],
                                            np.random.default_rng(0), GridSpec(resolution=20))))
    reports, result = stream[:-1], stream[-1]
    assert all(isinstance(p, Progress) for p in reports) and hasattr(result, "average")
    assert reports[0].done == 0 and reports[-1].done == reports[-1].total == X.shape[0]
    assert [p.done for p in reports] == sorted(p.done for p in reports)
    assert reports[-1].remaining_s == 0 and math.isinf(reports[0].remaining_s)


def test_cancelling_a_job_stops_it_at_once(X: Array, regressor: Any) -> None:
    """should_stop turns true after the third model call: Cancelled, and no further call."""
    fn = ort_fn(regressor[1])
    calls = []

    def counted(A: Array) -> Array:
        calls.append(A.shape[0])
        return fn(A)
    control = Control(should_stop=lambda: len(calls) >= 3)
    model = Evaluator(counted, rows_per_second=5)  # one row per chunk
    with pytest.raises(Cancelled):
        run(partial_dependence(model, X, [0], np.random.default_rng(0), control=control))
    assert len(calls) == 3
    with pytest.raises(Cancelled):
        run(permutation_importance(Evaluator(counted, rows_per_second=5), X,
                                   np.random.default_rng(0), control=control))
    assert len(calls) == 3


# ---------------------------------------------------------------------------- dataset Shapley


def test_dataset_mean_abs_phi_is_the_mean_of_the_row_answers(X: Array,
                                                            regressor: Any) -> None:
    """Exact TreeSHAP per row, aggregated: mean |phi|, its standard error across rows, mean
    phi and the beeswarm data equal the same rows explained one by one."""
    fn, tree = ort_fn(regressor[1]), TreeShap.from_onnx(regressor[1])
    bg = Background.build(X[:30], fn(X[:30]))
    rows = X[:40]
    explain = LocalExplainer(tree, lambda rate: Evaluator(fn, rows_per_second=rate), bg,
                             np.random.default_rng(0))
    out = run(dataset_shapley(explain, rows, [f"x{j}" for j in range(D)],
                              np.random.default_rng(1)))
    single = np.stack([tree.explain(Evaluator(fn), x, bg, Budget(math.inf),
                                    np.random.default_rng(0)).values for x in rows])
    np.testing.assert_allclose(out.values, single, rtol=0, atol=TOL)
    np.testing.assert_allclose(out.mean_abs, np.abs(single).mean(axis=0), rtol=0, atol=TOL)
    se = np.abs(single).std(axis=0, ddof=1) / math.sqrt(40)
    np.testing.assert_allclose(out.mean_abs_se, se, rtol=1e-9, atol=TOL)
    np.testing.assert_allclose(out.mean, single.mean(axis=0), rtol=0, atol=TOL)
    assert np.array_equal(out.rows, np.arange(40)) and np.array_equal(out.feature_values, rows)
    assert out.methods == ("tree",) and out.labels == ("x0", "x1", "x2", "x3")


def test_dataset_shapley_with_a_sampler_groups_and_a_row_cap(X: Array, regressor: Any) -> None:
    """Any local method: the permutation sampler over two groups on a seeded sample of 12
    rows; the aggregate is the mean of the per-row answers; a group has no single value."""
    fn = ort_fn(regressor[1])
    bg = Background.build(X[:20], fn(X[:20]))
    groups = Groups.build(np.array([0, 0, 1, -1]), ["ab", "c"])
    explain = LocalExplainer(PermutationShapley(), lambda rate: Evaluator(fn, rows_per_second=rate),
                             bg, np.random.default_rng(0), groups)
    control = Control(Budget.of_seconds(30, max_evaluations=12 * 4000), max_rows=12)
    values = player_values(X, groups)
    out = run(dataset_shapley(explain, X, groups.labels, np.random.default_rng(2), control,
                              values))
    assert out.rows.size == 12 and out.info.complete and out.info.evaluations <= 12 * 4000
    np.testing.assert_allclose(out.mean_abs, np.abs(out.values).mean(axis=0), rtol=0, atol=TOL)
    assert out.feature_values is not None and np.all(np.isnan(out.feature_values[:, 0]))
    np.testing.assert_array_equal(out.feature_values[:, 1], X[out.rows, 2])
    assert np.all(out.std_errors > 0)


def test_dataset_shapley_on_a_deadline_reports_the_rows_done(X: Array, regressor: Any) -> None:
    """Rows that take 50 ms each and a 0.4 s deadline: a partial answer over the rows done,
    marked as stopped; cancelled before the first row, no row is explained."""
    fn, tree = ort_fn(regressor[1]), TreeShap.from_onnx(regressor[1])
    bg = Background.build(X[:20], fn(X[:20]))
    explain = LocalExplainer(tree, lambda rate: Evaluator(fn, rows_per_second=rate), bg,
                             np.random.default_rng(0))
    calls = []

    def slow(x: Array, budget: Budget) -> Any:
        calls.append(budget)
        time.sleep(0.05)
        return explain(x, budget)
    out = run(dataset_shapley(slow, X, list("abcd"), np.random.default_rng(0),
                              Control(Budget.of_seconds(0.4))))
    assert out.info.stopped == "deadline" and 2 <= out.rows.size < X.shape[0] // 2
    assert out.rows.size == len(calls) and calls[0].deadline < calls[1].deadline
    with pytest.raises(Cancelled):
        run(dataset_shapley(slow, X, list("abcd"), np.random.default_rng(0),
                            Control(should_stop=lambda: True)))
    assert len(calls) == out.rows.size


def test_tree_interactions_equal_shap_on_the_native_model(X: Array, regressor: Any) -> None:
    """Covers counted on the training rows are the trained trees' covers: the interaction
    values equal shap's path-dependent ones on the scikit-learn model."""
    est, model = regressor
    out = run(tree_interactions(parse_onnx_trees(model), X[:25], X))
    native = shap.TreeExplainer(est)
    assert out.values is not None and out.rows == 25
    np.testing.assert_allclose(out.values[:, 0], native.shap_interaction_values(X[:25]),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.values[:, 0].sum(axis=2), native.shap_values(X[:25]),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.mean_abs, np.abs(out.values).mean(axis=0), atol=TOL)
    assert out.info.notes == ()
    few = run(tree_interactions(parse_onnx_trees(model), X[:5], X[:3]))  # most leaves unseen
    assert few.values is not None and np.all(np.isfinite(few.values))


def test_tree_interactions_of_a_classifier_are_on_the_margin(X: Array, classifier: Any) -> None:
    out = run(tree_interactions(parse_onnx_trees(classifier[1]), X[:5], X, columns=[2]))
    assert out.values is not None and out.values.shape == (5, 1, D, D)
    assert out.info.notes == ("margin scale: the values are before the model's SOFTMAX",)
    np.testing.assert_allclose(out.values, out.values.transpose(0, 1, 3, 2), atol=1e-12)


# ---------------------------------------------------------------------------- projection


def test_pca_equals_sklearn(X: Array) -> None:
    colour = np.arange(X.shape[0])
    ours = pca(X, 3, colour)
    theirs = PCA(n_components=3, svd_solver="full").fit(X)
    np.testing.assert_allclose(ours.components, theirs.components_, atol=1e-10)
    np.testing.assert_allclose(ours.coordinates, theirs.transform(X), atol=1e-10)
    np.testing.assert_allclose(ours.explained_variance_ratio,
                               theirs.explained_variance_ratio_, atol=1e-12)
    assert ours.colour is not None and np.array_equal(ours.colour, colour)
    with pytest.raises(InvalidArgument, match="components"):
        pca(X, 5)

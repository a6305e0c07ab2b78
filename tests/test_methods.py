"""Tree and linear methods through a real server: which method serves a request, on which scale,
with which fall-back, against exact enumeration of the same function and closed forms."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from explainers.base import Background
from explainers.errors import ResourceExhausted
from service.api.server import Sidelight, start
from service.api.tensors import from_array
from service.plane.targets import resolve_target
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import settings_for
from tests.redis_process import wait_for
from tests.test_tree import (  # noqa: F401 (registered: a fixture)
    D,
    labels,
    lightgbm_defaults,
    make_data,
    registered,
    target,
)

Array = np.ndarray
TIGHT = 1e-6


def convert(est: Any, zipmap: bool = False) -> onnx.ModelProto:
    options = {id(est): {"zipmap": False}} if hasattr(est, "predict_proba") and not zipmap \
        else None
    return convert_sklearn(est, initial_types=[("input", FloatTensorType([None, D]))],
                           options=options, target_opset={"": 17, "ai.onnx.ml": 3})


def hist_gbr_with_nans(monkeypatch: pytest.MonkeyPatch) -> onnx.ModelProto:
    """HistGradientBoosting trained on data with NaN (skl2onnx 1.20 needs an int flag)."""
    from skl2onnx.common import tree_ensemble
    from sklearn.ensemble import HistGradientBoostingRegressor

    original = tree_ensemble.add_node

    def add_node(*args: Any, **kwargs: Any) -> Any:
        flag = int(kwargs.get("nodes_missing_value_tracks_true", 0))
        return original(*args, **{**kwargs, "nodes_missing_value_tracks_true": flag})

    monkeypatch.setattr(tree_ensemble, "add_node", add_node)
    X = make_data(300, 2, nan_share=0.15)
    est = HistGradientBoostingRegressor(max_iter=20, max_depth=3, random_state=0)
    return convert(est.fit(X, target(X)))


def gemm_model(w: Array, b: float) -> onnx.ModelProto:
    """y = x @ w + b as a bare MatMul + Add graph (no ai.onnx.ml op)."""
    nodes = [helper.make_node("MatMul", ["input", "W"], ["h"]),
             helper.make_node("Add", ["h", "B"], ["y"])]
    inits = [numpy_helper.from_array(w.astype(np.float32).reshape(D, 1), "W"),
             numpy_helper.from_array(np.array([b], np.float32), "B")]
    graph = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, ["N", D])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def add_model(root: Path, name: str, model: onnx.ModelProto, bg: Array, config: str = "") -> None:
    (root / name / "1").mkdir(parents=True)
    onnx.save(model, root / name / "1" / "model.onnx")
    np.save(root / name / "bg.npy", bg)
    (root / name / "explain.yaml").write_text(f"background: {{path: bg.npy}}\n{config}")


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    X = make_data(300, 0)
    y2 = labels(X, 2)
    gbc = GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0).fit(X, y2)
    scaled_gbr = make_pipeline(StandardScaler(), GradientBoostingRegressor(
        n_estimators=20, max_depth=3, random_state=0)).fit(X, target(X))
    logreg = make_pipeline(StandardScaler(), LogisticRegression(C=10.0)).fit(X, y2)
    softmax = LogisticRegression(C=10.0).fit(X, labels(X, 3))
    gbc3 = GradientBoostingClassifier(n_estimators=10, max_depth=2, random_state=0)
    return {"X": X, "gbc": gbc, "scaled_gbr": scaled_gbr, "logreg": logreg, "softmax": softmax,
            "gbc3": gbc3.fit(X, labels(X, 3))}


@pytest.fixture(scope="module")
def server(models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidelight]:
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("methods")
    bg = models["X"][:24]
    add_model(root, "gbc", convert(models["gbc"]), bg, "output: probabilities\nclasses: [1]\n")
    add_model(root, "scaled_gbr", convert(models["scaled_gbr"]), bg)
    add_model(root, "logreg", convert(models["logreg"], zipmap=True), bg,
              "output: output_probability\nclasses: [1]\nscale: logit\n")
    add_model(root, "softmax", convert(models["softmax"]), bg, "output: probabilities\n")
    add_model(root, "gbc3", convert(models["gbc3"]), bg, "output: probabilities\n")
    add_model(root, "gemm", gemm_model(np.arange(1.0, D + 1), 0.5), bg)
    nan_bg = make_data(24, 5, nan_share=0.2)
    add_model(root, "hist_nan", hist_gbr_with_nans(mp), nan_bg, "allow_missing: true\n")
    add_model(root, "hist_strict", hist_gbr_with_nans(mp), make_data(24, 5))
    mp.undo()
    app = start(settings_for(root, metrics_port=-1, drift_enabled=False))
    yield app
    app.stop(grace=0)


@pytest.fixture(scope="module")
def stub(server: Sidelight) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.ExplainerStub(channel)


def explain(stub: pb_grpc.ExplainerStub, model: str, X: Array, **kw: Any) -> pb.ExplainResponse:
    kw.setdefault("budget_ms", 2000)
    target = pb.Target(scale=kw.pop("scale", ""), classes=kw.pop("classes", []))
    return stub.Explain(pb.ExplainRequest(model=model, inputs=[from_array("input", X)],
                                          target=target, **kw))


def values(r: pb.ExplainResponse) -> Array:
    d = len(r.feature_names)
    return np.array([list(row.attributions) for row in r.rows]).reshape(len(r.rows), -1, d)


def rows() -> Array:
    return make_data(4, 9)


def test_auto_uses_tree_on_the_logit_of_a_boosted_classifier_and_equals_exact(
        stub: pb_grpc.ExplainerStub) -> None:
    tree = explain(stub, "gbc", rows(), scale="logit")
    exact = explain(stub, "gbc", rows(), scale="logit", method="exact")
    assert (tree.method, tree.scale, exact.method) == ("tree", "logit", "exact")
    assert tree.cost.model_evaluations == 0 and not any(tree.rows[0].std_errors)
    np.testing.assert_allclose(values(tree), values(exact), atol=TIGHT)
    for t, e in zip(tree.rows, exact.rows, strict=True):
        np.testing.assert_allclose(t.predictions, e.predictions, atol=1e-5)
        np.testing.assert_allclose(t.base_values, e.base_values, atol=1e-5)


def test_tree_on_probabilities_explains_the_margin_and_says_so(
        stub: pb_grpc.ExplainerStub) -> None:
    auto = explain(stub, "gbc", rows(), scale="identity")
    assert auto.method == "exact" and auto.scale == "identity"  # probabilities: sampled/exact
    forced = explain(stub, "gbc", rows(), scale="identity", method="tree")
    assert forced.method == "tree" and forced.scale == "margin"
    assert any("margin" in n for n in forced.notes)
    margin = explain(stub, "gbc", rows(), scale="margin", method="exact")
    np.testing.assert_allclose(values(forced), values(margin), atol=TIGHT)


def test_a_tree_graph_behind_a_scaler_falls_back_to_sampling_and_says_why(
        stub: pb_grpc.ExplainerStub) -> None:
    r = explain(stub, "scaled_gbr", rows(), method="tree")
    assert r.method == "exact" and any("tree unavailable" in n and "Scaler" in n
                                       for n in r.notes)
    info = stub.GetModel(pb.GetModelRequest(model="scaled_gbr"))
    assert "Scaler" in info.tree_unsupported
    assert stub.GetModel(pb.GetModelRequest(model="gbc")).tree_unsupported == ""


def test_missing_values_are_explained_only_where_the_model_allows_them(
        stub: pb_grpc.ExplainerStub) -> None:
    X = rows()
    X[0, 1], X[2, 3] = np.nan, np.nan
    tree = explain(stub, "hist_nan", X)
    exact = explain(stub, "hist_nan", X, method="exact")
    assert tree.method == "tree"
    np.testing.assert_allclose(values(tree), values(exact), atol=TIGHT)
    with pytest.raises(grpc.RpcError) as info:
        explain(stub, "hist_strict", X)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "non-finite" in info.value.details()


def test_logistic_regression_behind_a_scaler_is_linear_on_the_exact_logit(
        stub: pb_grpc.ExplainerStub, models: dict[str, Any]) -> None:
    scaler, clf = models["logreg"]
    w = clf.coef_[0] / scaler.scale_  # (features,) on the request's features
    bg = models["X"][:24]
    X = rows() * 6  # far out: the float32 probability saturates, the margin does not
    r = explain(stub, "logreg", X)
    assert r.method == "linear" and r.scale == "logit" and r.output_names == ["1"]
    np.testing.assert_allclose(values(r)[:, 0], w * (X - bg.mean(axis=0)), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose([row.predictions[0] for row in r.rows],
                               clf.decision_function(scaler.transform(X)), rtol=1e-4)
    exact = explain(stub, "logreg", X, method="exact")
    np.testing.assert_allclose(values(r), values(exact), atol=1e-4)


def test_softmax_tree_classifier_is_exact_on_the_margin_only(
        stub: pb_grpc.ExplainerStub) -> None:
    X = rows()
    auto = explain(stub, "gbc3", X, scale="identity")  # the default is the margin: test_tree_links
    assert auto.method == "exact" and auto.scale == "identity" and len(auto.output_names) == 3
    tree = explain(stub, "gbc3", X, scale="margin")
    exact = explain(stub, "gbc3", X, scale="margin", method="exact")
    assert (tree.method, tree.scale) == ("tree", "margin")
    np.testing.assert_allclose(values(tree), values(exact), atol=TIGHT)


def test_linear_on_a_nonlinear_output_falls_back_and_says_why(
        stub: pb_grpc.ExplainerStub) -> None:
    r = explain(stub, "softmax", rows(), method="linear")  # softmax probabilities
    assert r.method == "exact" and any("not affine" in n for n in r.notes)


def test_a_matmul_add_graph_is_linear(stub: pb_grpc.ExplainerStub) -> None:
    X = rows()
    bg = make_data(300, 0)[:24]
    r = explain(stub, "gemm", X)
    assert r.method == "linear"
    np.testing.assert_allclose(values(r)[:, 0], np.arange(1.0, D + 1) * (X - bg.mean(axis=0)),
                               rtol=1e-4, atol=1e-4)


def test_scales_and_errors_name_the_field(stub: pb_grpc.ExplainerStub) -> None:
    assert list(stub.GetModel(pb.GetModelRequest(model="gbc")).scales) == [
        "identity", "logit", "margin"]
    assert list(stub.GetModel(pb.GetModelRequest(model="gemm")).scales) == ["identity", "logit"]
    for kw in ({"scale": "margin"}, {"method": "shapley"}):
        with pytest.raises(grpc.RpcError) as info:
            explain(stub, "gemm", rows(), **kw)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert next(iter(kw)) in info.value.details()


def test_tree_refuses_or_samples_when_its_measured_speed_misses_the_budget(
        server: Sidelight) -> None:
    plane = server.data_plane()
    model = plane.repo.get("gbc")
    target = resolve_target(model, "", (), "logit")
    meta, bg = plane.background(model, "default", target)

    def choose(method: str, seconds: float) -> Any:
        return plane.choose(method, model, target, bg, meta.sha256, 100, seconds)

    tree = choose("tree", 10.0).estimator
    assert tree.name == "tree"
    measured = dict(tree._per_unit)
    tree.prefit(bg)  # (the first explanation would have fitted it)
    tree._per_unit[True] = 0.02 / tree._units(bg)  # as if a row took 20 ms: 2 s for 100 rows
    try:
        with pytest.raises(ResourceExhausted, match="budget_ms"):
            choose("tree", 1.0)
        auto = choose("", 1.0)
        assert auto.estimator.name == "auto" and "sampled instead" in auto.notes[0]
        assert choose("", 10.0).estimator is tree
    finally:
        tree._per_unit = measured  # leave the shared server as it was


def test_a_new_backgrounds_fit_is_counted_in_the_budget_and_done_off_the_request_path(
        server: Sidelight) -> None:
    """A background no one fitted here (uploaded through another replica, say): its one-off
    fit is predicted and counted; when it misses the budget, tree refuses (explicit) or samples
    (auto), says so, and the fit runs in the background for the next requests."""
    plane = server.data_plane()
    model = plane.repo.get("gbc")
    target = resolve_target(model, "", (), "logit")
    fresh, other = (Background.build(make_data(40, seed), np.zeros((40, 1))) for seed in (21, 22))

    def choose(method: str, seconds: float, bg: Background) -> Any:
        return plane.choose(method, model, target, bg, "fresh", 1, seconds)

    tree = choose("tree", 10.0, fresh).estimator
    fit = tree.fit_seconds(fresh)
    assert fit > 0 and tree.seconds_for(1, fresh) >= fit
    with pytest.raises(ResourceExhausted, match="to tabulate this background, once"):
        choose("tree", fit / 2, fresh)
    assert wait_for(lambda: tree.fit_seconds(fresh) == 0)  # fitted off the request path
    assert choose("tree", 10.0, fresh).estimator is tree and tree.seconds_for(1, fresh) < fit
    auto = choose("", tree.fit_seconds(other) / 2, other)
    assert auto.estimator.name == "auto" and "sampled instead" in auto.notes[0]
    assert "to tabulate this background" in auto.notes[0]


@pytest.mark.parametrize(("method", "budget_ms"), [("auto", 20.0), ("auto", 50.0),
                                                   ("tree", 50.0)])
def test_first_calls_right_after_an_upload_stay_within_their_budget(
        stub: pb_grpc.ExplainerStub, models: dict[str, Any], method: str,
        budget_ms: float) -> None:
    """Upload a fresh background and explain against it at once, before the upload's fit
    can be done: each first call answers within its budget (the fit counted: tree refuses
    or auto samples meanwhile) or is refused on arrival, never late."""
    for k in range(5):
        name = f"fresh_{method}_{budget_ms:g}_{k}"
        stub.PutBackground(pb.PutBackgroundRequest(model="gbc", name=name, data=from_array(
            "", models["X"][:40] + 0.01 * (k + 1))))
        start = time.monotonic()
        try:
            r = explain(stub, "gbc", models["X"][k:k + 1], method=method,
                        budget_ms=budget_ms, background=name, seed=k)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            assert time.monotonic() - start < budget_ms / 1e3
            continue
        assert r.cost.elapsed_ms <= budget_ms, (r.method, r.cost.elapsed_ms, list(r.notes))
        assert not r.cost.rows_not_reached or r.method != "tree"


def test_start_up_and_uploads_fit_the_trees_ahead_of_traffic(
        models: dict[str, Any], tmp_path: Path) -> None:
    """Start-up fits the default background; an upload fits the default target and the
    targets requested lately, so a first call on either finds the tables built."""
    add_model(tmp_path, "gbc", convert(models["gbc"]), models["X"][:24],
              "output: probabilities\nclasses: [1]\n")
    app = start(settings_for(tmp_path, metrics_port=-1, drift_enabled=False))
    try:
        plane = app.data_plane()
        model = plane.repo.get("gbc")
        target = resolve_target(model, "", (), "")  # the logit: the trees' margin
        class0 = resolve_target(model, "", (0,), "logit")  # another target, once requested

        def fitted(name: str, t: Any = target) -> bool:
            meta, bg = plane.background(model, name, t)
            tree = plane.choose("tree", model, t, bg, meta.sha256, 1, 10.0).estimator
            return bool(tree.fit_seconds(bg) == 0)

        def upload(name: str, rows: Array) -> None:
            with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                pb_grpc.ExplainerStub(channel).PutBackground(pb.PutBackgroundRequest(
                    model="gbc", name=name, data=from_array("", rows)))

        assert len(plane.methods._fits) == 1 and fitted("default")  # before any request
        upload("other", models["X"][100:160])
        assert wait_for(lambda: len(plane.methods._fits) == 2) and fitted("other")
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            r = explain(pb_grpc.ExplainerStub(channel), "gbc", models["X"][:1], method="tree",
                        classes=[0], scale="logit")
        assert r.method == "tree"
        upload("third", models["X"][200:260])  # fitted for the default and the class-0 target
        assert wait_for(lambda: fitted("third") and fitted("third", class0))
    finally:
        app.stop(grace=0)


@pytest.mark.usefixtures("registered")
def test_auto_explains_lightgbm_defaults_by_tree_in_a_small_budget_and_names_the_engine(
        tmp_path: Path) -> None:
    """num_leaves=31 grows leaves with 10+ path features; with 1,000 background rows `auto`
    used to sample (shap's walk was too slow). Now tree answers within the budget, exactly,
    and the notes say which engine ran."""
    _, model, X = lightgbm_defaults()
    add_model(tmp_path, "lgbm", model, X[:1000], "output: probabilities\nclasses: [1]\n")
    app = start(settings_for(tmp_path, metrics_port=-1, drift_enabled=False))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            r = explain(pb_grpc.ExplainerStub(channel), "lgbm", X[1100:1101], budget_ms=50)
        assert r.method == "tree" and r.scale == "logit" and r.cost.elapsed_ms < 50
        assert any(n.startswith("tree engine: exact interventional TreeSHAP by leaf tables")
                   and "background patterns (k 10-" in n for n in r.notes), list(r.notes)
    finally:
        app.stop(grace=0)

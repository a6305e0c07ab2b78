"""A real server on port 0 through a real client stub: every RPC, health, reflection, errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from explainers import build_registry
from service.api.server import Sidelight, start
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS, background_of, settings_for


def request(model: str, X: np.ndarray, **kw: object) -> pb.ExplainRequest:
    return pb.ExplainRequest(model=model, inputs=[from_array("input", X)], **kw)  # type: ignore[arg-type]


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code(), info.value.details()


def test_explain_returns_attributions_errors_base_and_prediction(
        stub: pb_grpc.ExplainerStub) -> None:
    X = background_of("breast_cancer_mlp")[:3].astype(np.float32)
    r = stub.Explain(request("breast_cancer_mlp", X, budget_ms=150, seed=3))
    assert r.model == "breast_cancer_mlp" and r.version == "1" and r.method == "permutation"
    assert len(r.feature_names) == 30 and r.feature_names[0] == "mean radius"
    assert list(r.output_names) == ["benign"] and r.scale == "logit"
    assert len(r.rows) == 3 and r.background_rows == 100 and len(r.background_sha256) == 64
    for row in r.rows:
        phi, se = np.array(row.attributions), np.array(row.std_errors)
        assert phi.shape == se.shape == (30,) and np.all(se > 0) and np.all(np.isfinite(se))
        assert row.predictions[0] - row.base_values[0] == pytest.approx(phi.sum(), abs=1e-9)
        low, high = np.array(row.ci_low), np.array(row.ci_high)
        np.testing.assert_allclose(high - phi, phi - low, rtol=1e-9)
        ratio = (high - low) / (2 * se)  # Student t per attribution, many dof: just above z
        assert np.all(ratio >= 1.959) and np.all(ratio <= 2.6)  # Student t with >= 5 dof
        assert row.samples >= 8
    assert r.cost.model_evaluations == sum(row.model_evaluations for row in r.rows) > 0
    # budget adherence is measured in benchmarks; here only a loose sanity bound
    assert 0 < r.cost.elapsed_ms <= 1.1 * 150 and r.cost.budget_source == "request"


def test_prediction_is_the_models_output_on_the_requested_scale(
        stub: pb_grpc.ExplainerStub, app: Sidelight) -> None:
    """Identity scale returns the ONNX probability itself, every column by default."""
    X = background_of("breast_cancer_logreg")[:2]
    r = stub.Explain(request("breast_cancer_logreg", X, budget_ms=100,
                             target=pb.Target(scale="identity", classes=[0, 1])))
    model = app.data_plane().repo.get("breast_cancer_logreg")
    proba = model.onnx.predict(X, "output_probability")  # (rows, 2)
    got = np.array([row.predictions for row in r.rows])
    np.testing.assert_allclose(got, proba, atol=1e-7)
    assert list(r.output_names) == ["malignant", "benign"]


def test_exact_matches_shap_exact_explainer_on_a_bundled_model(
        stub: pb_grpc.ExplainerStub, app: Sidelight) -> None:
    shap = pytest.importorskip("shap")
    bg = background_of("diabetes_forest")
    x = bg[7:8] * 1.1
    r = stub.Explain(request("diabetes_forest", x, method="exact", budget_ms=5000))
    model = app.data_plane().repo.get("diabetes_forest")

    def f(X: np.ndarray) -> np.ndarray:
        return model.onnx.predict(X, "variable")[:, 0]

    explainer = shap.ExactExplainer(f, shap.maskers.Independent(bg, max_samples=len(bg)))
    expected = explainer(x).values[0]
    np.testing.assert_allclose(r.rows[0].attributions, expected, rtol=1e-9, atol=1e-9)
    assert r.method == "exact" and not any(r.rows[0].std_errors)


def test_linear_model_attributions_are_w_times_deviation(stub: pb_grpc.ExplainerStub,
                                                         app: Sidelight) -> None:
    model = app.data_plane().repo.get("diabetes_linear")
    bg = background_of("diabetes_linear")
    intercept = model.onnx.predict(np.zeros((1, 10)), "variable")[0, 0]
    w = model.onnx.predict(np.eye(10), "variable")[:, 0] - intercept  # (features,)
    x = bg[:1] + 0.01
    for method, used in (("", "linear"), ("linear", "linear"), ("exact", "exact")):
        r = stub.Explain(request("diabetes_linear", x, budget_ms=500, method=method))
        assert r.method == used
        np.testing.assert_allclose(r.rows[0].attributions, w * (x[0] - bg.mean(axis=0)),
                                   rtol=1e-4, atol=1e-3)


def test_list_and_get_models(stub: pb_grpc.ExplainerStub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {p.name for p in MODELS.iterdir() if p.is_dir()}
    assert all(m.state == "READY" for m in models.values())
    info = stub.GetModel(pb.GetModelRequest(model="breast_cancer_gbdt"))
    assert info.inputs[0].name == "input" and list(info.inputs[0].shape) == [-1, 30]
    assert info.output == "probabilities" and list(info.output_names) == ["benign"]
    assert info.background_rows == 100 and info.rows_per_second > 0 and len(info.sha256) == 64


def test_health_is_serving_and_reflection_lists_the_services(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "sidelight.v1.Explainer"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "sidelight.v1.Explainer" in services and "grpc.health.v1.Health" in services


def test_many_rows_multi_output_and_seed_determinism(stub: pb_grpc.ExplainerStub) -> None:
    X = background_of("breast_cancer_gbdt")[:4]
    req = request("breast_cancer_gbdt", X, method="kernel", budget_ms=2000, seed=11,
                  target=pb.Target(classes=[0, 1], scale="identity"))
    r = stub.Explain(req)
    assert len(r.rows) == 4 and len(r.rows[0].attributions) == 2 * 30
    phi = np.array(r.rows[0].attributions).reshape(2, 30)
    np.testing.assert_allclose(phi[0], -phi[1], atol=1e-9)  # p0 = 1 - p1


def invalid(stub: pb_grpc.ExplainerStub, req: pb.ExplainRequest) -> str:
    code, details = code_of(lambda: stub.Explain(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    return details


def test_bad_requests_get_invalid_argument_naming_the_field(stub: pb_grpc.ExplainerStub) -> None:
    row = background_of("breast_cancer_mlp")[:1]
    assert "inputs[0].shape" in invalid(stub, request("breast_cancer_mlp", row[:, :29]))
    nan = row.copy()
    nan[0, 4] = np.nan
    assert "inputs" in invalid(stub, request("breast_cancer_mlp", nan))
    wrong_dtype = pb.Tensor(name="input", datatype="BYTES", shape=[1, 30])
    details = invalid(stub, pb.ExplainRequest(model="breast_cancer_mlp", inputs=[wrong_dtype]))
    assert "inputs[0].datatype" in details
    assert "inputs[0].shape" in invalid(stub, request("breast_cancer_mlp", row[:0]))
    assert "method" in invalid(stub, request("breast_cancer_mlp", row, method="magic"))
    assert "method" in invalid(stub, request("breast_cancer_mlp", row, method="exact"))
    short = pb.Tensor(name="input", datatype="FP32", shape=[1, 30], raw=b"\0" * 8)
    assert "inputs[0].raw" in invalid(stub, pb.ExplainRequest(model="breast_cancer_mlp",
                                                              inputs=[short]))
    bad_class = request("breast_cancer_mlp", row, target=pb.Target(classes=[5]))
    assert "target.classes" in invalid(stub, bad_class)
    assert "budget_ms" in invalid(stub, request("breast_cancer_mlp", row, budget_ms=-1))
    assert "inputs[0].name" in invalid(stub, pb.ExplainRequest(
        model="breast_cancer_mlp", inputs=[from_array("nope", row)]))


def test_seed_and_evaluation_cap_reproduce_the_answer(stub: pb_grpc.ExplainerStub) -> None:
    X = background_of("breast_cancer_mlp")[5:6]
    # different budgets are different requests (no result-cache hit); the cap binds first
    a, b = (stub.Explain(request("breast_cancer_mlp", X, budget_ms=budget, seed=4,
                                 max_evaluations=20_000)) for budget in (2000, 5000))
    assert not a.cached and not b.cached
    assert list(a.rows[0].attributions) == list(b.rows[0].attributions)
    assert a.rows[0].model_evaluations <= 20_000 and not a.cost.converged
    c = stub.Explain(request("breast_cancer_mlp", X, budget_ms=2000, seed=5,
                             max_evaluations=20_000))
    assert list(a.rows[0].attributions) != list(c.rows[0].attributions)


def test_typed_contents_work_like_raw_bytes(stub: pb_grpc.ExplainerStub) -> None:
    row = background_of("diabetes_linear")[:1]
    typed = pb.Tensor(name="input", datatype="FP64", shape=[1, 10],
                      contents=pb.TensorContents(fp64_contents=row.ravel()))
    a = stub.Explain(pb.ExplainRequest(model="diabetes_linear", inputs=[typed], budget_ms=500))
    b = stub.Explain(request("diabetes_linear", row, budget_ms=500))
    assert list(a.rows[0].attributions) == list(b.rows[0].attributions)


def test_not_found_resource_exhausted_and_deadline(stub: pb_grpc.ExplainerStub) -> None:
    row = background_of("diabetes_forest")[:1]
    code, details = code_of(lambda: stub.Explain(request("no_such_model", row)))
    assert code == grpc.StatusCode.NOT_FOUND and "model" in details
    code, details = code_of(lambda: stub.Explain(request("diabetes_forest", row, version="9")))
    assert code == grpc.StatusCode.NOT_FOUND and "version" in details
    code, details = code_of(lambda: stub.Explain(request("diabetes_forest", row,
                                                         background="nope")))
    assert code == grpc.StatusCode.NOT_FOUND and "background" in details
    code, details = code_of(lambda: stub.Explain(request("diabetes_forest", row,
                                                         method="exact", budget_ms=1)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "budget_ms" in details
    code, _ = code_of(lambda: stub.Explain(request("diabetes_forest", row), timeout=0.01))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stub.Explain(request("diabetes_forest", row, budget_ms=50)).rows  # still serving


def test_deadline_sets_the_budget_and_is_honoured(stub: pb_grpc.ExplainerStub) -> None:
    row = background_of("breast_cancer_mlp")[:1]
    r = stub.Explain(request("breast_cancer_mlp", row), timeout=0.3)
    assert r.cost.budget_source == "deadline" and r.cost.budget_ms < 300
    assert r.cost.elapsed_ms < 1.1 * r.cost.budget_ms and r.cost.budget_exhausted
    r = stub.Explain(request("breast_cancer_mlp", row))
    assert r.cost.budget_source == "model_default" and r.cost.budget_ms == 200


@pytest.fixture()
def broken_repo(tmp_path: Path) -> Path:
    """One good model, one corrupt ONNX file, one invalid explain.yaml."""
    good = tmp_path / "good" / "1"
    good.mkdir(parents=True)
    (good / "model.onnx").write_bytes((MODELS / "diabetes_linear/1/model.onnx").read_bytes())
    (tmp_path / "good" / "explain.yaml").write_text("background: {path: bg.csv}\n")
    np.savetxt(tmp_path / "good" / "bg.csv", background_of("diabetes_linear")[:20], delimiter=",")
    corrupt = tmp_path / "corrupt" / "1"
    corrupt.mkdir(parents=True)
    (corrupt / "model.onnx").write_bytes(b"not an onnx file")
    bad_yaml = tmp_path / "bad_yaml" / "1"
    bad_yaml.mkdir(parents=True)
    (bad_yaml / "model.onnx").write_bytes((MODELS / "diabetes_linear/1/model.onnx").read_bytes())
    (tmp_path / "bad_yaml" / "explain.yaml").write_text("scale: sideways\n")
    return tmp_path


@pytest.fixture()
def broken_app(broken_repo: Path) -> Iterator[Sidelight]:
    running = start(settings_for(broken_repo))
    yield running
    running.stop(grace=0)


def test_broken_models_are_reported_and_do_not_stop_the_others(broken_app: Sidelight) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{broken_app.port}") as ch:
        stub = pb_grpc.ExplainerStub(ch)
        states = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert states["good"].state == "READY" and states["good"].feature_names[0] == "input_0"
        assert states["corrupt"].state == "FAILED" and states["corrupt"].error
        assert states["bad_yaml"].state == "FAILED" and "scale" in states["bad_yaml"].error
        row = background_of("diabetes_linear")[:1]
        code, details = code_of(lambda: stub.Explain(request("corrupt", row)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "failed to load" in details
        assert stub.Explain(request("good", row, budget_ms=200)).rows[0].attributions


def test_loading_server_is_not_serving_and_unavailable() -> None:
    app = start(settings_for(MODELS, metrics_port=-1), load=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            code, _ = code_of(lambda: pb_grpc.ExplainerStub(ch).ListModels(
                pb.ListModelsRequest()))
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        app.stop(grace=0)


class Exploding:
    """An estimator with a bug: stands in for any unexpected exception."""

    name = "auto"

    def expected_evaluations(self, n_features: int, background: object) -> None:
        return None

    def explain(self, *args: object) -> None:
        raise RuntimeError("secret internal detail")


def test_unknown_exceptions_become_internal_with_one_log_line(
        caplog: pytest.LogCaptureFixture) -> None:
    app = start(settings_for(MODELS, metrics_port=-1))
    try:
        plane = app.data_plane()
        plane.methods.registry = {**build_registry(), "auto": Exploding()}  # type: ignore
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch, caplog.at_level(logging.ERROR):
            stub = pb_grpc.ExplainerStub(ch)
            code, details = code_of(lambda: stub.Explain(
                request("breast_cancer_mlp", background_of("breast_cancer_mlp")[:1])))
            assert code == grpc.StatusCode.INTERNAL and "secret" not in details
            assert stub.ListModels(pb.ListModelsRequest()).models  # still serving
        lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(lines) == 1 and "RuntimeError" in lines[0].getMessage()
    finally:
        app.stop(grace=0)


def test_the_result_cache_answers_only_identical_requests(stub: pb_grpc.ExplainerStub) -> None:
    X = background_of("breast_cancer_gbdt")[7:8]
    data = from_array("data", background_of("breast_cancer_gbdt")[:50])
    stub.PutBackground(pb.PutBackgroundRequest(model="breast_cancer_gbdt", name="other",
                                               data=data))
    base = {"method": "permutation", "budget_ms": 500, "seed": 77, "max_evaluations": 4000,
            "target": pb.Target(classes=[1], scale="logit")}
    first = stub.Explain(request("breast_cancer_gbdt", X, **base))
    again = stub.Explain(request("breast_cancer_gbdt", X, **base))
    assert not first.cached and again.cached
    assert list(again.rows[0].attributions) == list(first.rows[0].attributions)
    changes = [{"seed": 78}, {"max_evaluations": 4001}, {"method": "auto"},
               {"target": pb.Target(classes=[0], scale="logit")},
               {"target": pb.Target(classes=[1], scale="identity")},
               {"background": "other"}, {"budget_ms": 2000}]
    for change in changes:
        r = stub.Explain(request("breast_cancer_gbdt", X, **{**base, **change}))
        assert not r.cached, change
    moved = X.copy()
    moved[0, 3] += 1.0
    assert not stub.Explain(request("breast_cancer_gbdt", moved, **base)).cached

"""The gradient methods through a real server on the bundled CNN and text model: every method
answers with maps shaped like the input on the logit scale; the gradient map equals central
finite differences of the logit computed here with onnxruntime."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from service.api.server import Sidelight
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS
from tests.serving import serve, stub_on

DIGITS = np.load(MODELS / "digits_cnn" / "background.npy")  # (100, 1, 8, 8) float32
SENTENCE = np.array([[30, 33, 36, 2, 3] + [0] * 11], np.int64)  # "the movie was not good"
METHODS = ("saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "deeplift",
           "deepshap", "gradcam", "gradcam++")


@pytest.fixture(scope="module")
def app() -> Iterator[Sidelight]:
    yield from serve(MODELS, drift_enabled=False)


@pytest.fixture(scope="module")
def stub(app: Sidelight) -> Iterator[pb_grpc.ExplainerStub]:
    yield from stub_on(app)


def explain(stub: pb_grpc.ExplainerStub, model: str, X: np.ndarray, method: str,
            **kw: object) -> pb.ExplainResponse:
    name = "image" if model == "digits_cnn" else "tokens"
    return stub.Explain(pb.ExplainRequest(model=model, inputs=[from_array(name, X)],  # type: ignore[arg-type]
                                          method=method, budget_ms=400, seed=1, **kw),
                        timeout=30)


def heat_of(row: pb.RowExplanation, shape: tuple[int, ...]) -> np.ndarray:
    (m,) = row.maps
    return np.frombuffer(m.raw, "<f8").reshape(shape)


@pytest.mark.parametrize("method", METHODS)
def test_every_gradient_method_maps_the_image_on_the_logit_scale(
        stub: pb_grpc.ExplainerStub, method: str) -> None:
    r = explain(stub, "digits_cnn", DIGITS[:2], method, target=pb.Target(classes=[3]))
    assert r.method == method and r.scale == "logit" and r.modality == "image"
    assert any("the input of the final Softmax" in n for n in r.notes)
    assert any(n == "gradient engine: onnx-ad" for n in r.notes)
    for row in r.rows:
        heat = heat_of(row, (1, 1, 8, 8))
        assert np.all(np.isfinite(heat)) and np.any(heat != 0)
        assert np.all(np.isfinite(row.attributions)) and np.all(np.isfinite(row.std_errors))


@pytest.mark.parametrize("method", METHODS[:6])
def test_every_gradient_method_scores_the_tokens(stub: pb_grpc.ExplainerStub,
                                                 method: str) -> None:
    r = explain(stub, "text_sentiment", SENTENCE, method)
    row = r.rows[0]
    assert r.scale == "logit" and len(row.labels) == 5 and len(row.attributions) == 5
    heat = heat_of(row, (1, 16))
    assert np.all(heat[0, 5:] == 0)  # pads get nothing
    np.testing.assert_allclose(heat[0, :5], row.attributions, atol=1e-12)


def test_integrated_gradients_reports_its_completeness_gap(stub: pb_grpc.ExplainerStub) -> None:
    r = explain(stub, "digits_cnn", DIGITS[4:5], "integrated_gradients",
                target=pb.Target(classes=[2]))
    row = r.rows[0]
    gap = row.diagnostics["completeness_gap"]
    assert row.diagnostics["steps"] >= 16
    total = row.predictions[0] - row.base_values[0]
    assert sum(row.attributions) - total == pytest.approx(gap, abs=1e-9)
    assert abs(gap) < 1e-3 * max(1.0, abs(total))


def logit_fd(x: np.ndarray, column: int, h: float = 1e-3) -> np.ndarray:
    """Central finite differences of the digits CNN's logit for one column (float32 model)."""
    session = ort.InferenceSession(str(MODELS / "digits_cnn" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    flat = x.ravel().astype(np.float64)
    steps = np.eye(flat.size) * h
    up = (flat + steps).reshape(-1, 1, 8, 8).astype(np.float32)
    down = (flat - steps).reshape(-1, 1, 8, 8).astype(np.float32)
    f_up = session.run(["logits"], {"image": up})[0][:, column]
    f_down = session.run(["logits"], {"image": down})[0][:, column]
    return np.asarray((f_up - f_down) / (2 * h), np.float64)


def test_the_gradient_map_equals_finite_differences(stub: pb_grpc.ExplainerStub) -> None:
    jitter = np.random.default_rng(3).normal(0, 0.05, DIGITS[:1].shape).astype(np.float32)
    x = DIGITS[9:10] + jitter  # off the ReLU and MaxPool ties
    r = explain(stub, "digits_cnn", x, "saliency", target=pb.Target(classes=[7]),
                gradients=pb.GradientOptions(signed=True))
    got = heat_of(r.rows[0], (64,))
    np.testing.assert_allclose(got, logit_fd(x, 7), atol=2e-3 * np.abs(got).max())


def test_identity_scale_differentiates_the_probability(stub: pb_grpc.ExplainerStub) -> None:
    r = explain(stub, "digits_cnn", DIGITS[:1], "saliency",
                target=pb.Target(classes=[0], scale="identity"))
    assert r.scale == "identity" and any("identity scale" in n for n in r.notes)


@pytest.mark.parametrize(("model", "method", "options", "code", "field"), [
    ("text_sentiment", "gradcam", {}, grpc.StatusCode.FAILED_PRECONDITION, "gradients.layer"),
    ("digits_cnn", "saliency", {"layer": "x"}, grpc.StatusCode.INVALID_ARGUMENT,
     "gradients.layer"),
    ("digits_cnn", "integrated_gradients", {"steps": 7000}, grpc.StatusCode.INVALID_ARGUMENT,
     "integrated_gradients.steps"),
])
def test_bad_gradient_options_name_the_field(stub: pb_grpc.ExplainerStub, model: str,
                                             method: str, options: dict[str, object],
                                             code: grpc.StatusCode, field: str) -> None:
    X = DIGITS[:1] if model == "digits_cnn" else SENTENCE
    with pytest.raises(grpc.RpcError) as info:
        explain(stub, model, X, method, gradients=pb.GradientOptions(**options))  # type: ignore[arg-type]
    assert info.value.code() == code and field in info.value.details()

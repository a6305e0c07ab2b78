"""Defects the fuzzer (tests/fuzzing/) found, each through a real server: answers that came back
OK with inf/NaN (activations past the model's float32 range or a Cast to it, activation
maximisation over a range or from a start beyond the input's datatype, weight statistics of a
-inf mask constant or an empty ROI, smoothgrad's infinite noise, live importance over fewer
than two rows), INTERNAL from a huge blur,
and INTERNAL for a tabular explanation against a zeros or constant baseline. Each is now a
clear status or a finite, correct answer."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from explainers.layers.activations import summary
from service.api.server import start
from service.api.tensors import from_array
from sidelight.v1 import datasets_pb2 as dpb
from sidelight.v1 import datasets_pb2_grpc as dpb_grpc
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from sidelight.v1 import layers_pb2 as lpb
from sidelight.v1 import layers_pb2_grpc as lpb_grpc
from tests.conftest import MODELS, settings_for
from tests.fuzzing import non_finite
from tests.fuzzing.models import masked_model, pair_model, write_model

DIGITS = np.load(MODELS / "digits_cnn" / "background.npy").astype(np.float32)  # (100, 1, 8, 8)
DIABETES = np.load(MODELS / "diabetes_linear" / "background.npy").astype(np.float32)  # (N, 10)
CONV1 = "/conv1/Conv_output_0"
FLOAT32_MAX = float(np.finfo(np.float32).max)


@pytest.fixture(scope="module")
def layers(channel: grpc.Channel) -> lpb_grpc.LayersStub:
    return lpb_grpc.LayersStub(channel)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    """A server on the fuzz run's two-input model and its image model with odd weights."""
    root = tmp_path_factory.mktemp("found") / "models"
    rng = np.random.default_rng(0)
    write_model(root, "fuzz_pair", pair_model(), rng.normal(size=(40, 3)))
    write_model(root, "fuzz_masked", masked_model(), rng.normal(size=(40, 1, 2, 2)))
    app = start(settings_for(root, metrics_port=-1))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            yield ch
    finally:
        app.stop(grace=0)


def refused(call: object, request: object) -> grpc.RpcError:
    """The error a call ends with (a stream read to the end)."""
    with pytest.raises(grpc.RpcError) as info:
        answer = call(request, timeout=30)  # type: ignore[operator]
        if not isinstance(answer, lpb.MaximizeResponse | lpb.WeightsResponse):
            list(answer)
    return info.value


# -- activations past the model's range ---------------------------------------------------------
def test_activations_that_overflow_are_refused_naming_the_row_and_tensor(
        layers: lpb_grpc.LayersStub) -> None:
    X = DIGITS[:2].copy()
    X[1] = FLOAT32_MAX  # finite float32 inputs; the convolution's sums overflow
    for reduction in ("none", "channel_mean"):
        err = refused(layers.GetActivations, lpb.ActivationsRequest(
            model="digits_cnn", inputs=[from_array("image", X)], layers=[CONV1],
            reduction=reduction))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert f"inputs: row 1: tensor '{CONV1}' is inf/NaN there" in err.details()


def test_an_input_cast_past_float32_inside_the_model_is_refused(built: grpc.Channel) -> None:
    """b is FP64 (1e39 is finite there); the graph casts it to float32: inf, then NaN."""
    a, b = np.zeros((2, 2), np.float32), np.array([0.5, 1e39])
    err = refused(lpb_grpc.LayersStub(built).GetActivations, lpb.ActivationsRequest(
        model="fuzz_pair", inputs=[from_array("a", a), from_array("b", b)],
        layers=["probs"]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs: row 1: tensor 'probs' is inf/NaN there" in err.details()


# -- activation maximisation ------------------------------------------------------------------
def test_a_range_beyond_the_inputs_datatype_is_refused(layers: lpb_grpc.LayersStub) -> None:
    for low, high in ((-1e308, 1e308), (0.0, 1e39), (-3.5e38, 1.0)):
        err = refused(layers.Maximize, lpb.MaximizeRequest(
            model="digits_cnn", low=low, high=high, budget_ms=50, steps=4))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "leave the finite values of input 'image' (FP32" in err.details()


def test_a_start_where_the_model_overflows_is_refused(layers: lpb_grpc.LayersStub) -> None:
    start = np.full((1, 10), FLOAT32_MAX, np.float32)  # the linear model's sum: inf or NaN
    err = refused(layers.Maximize, lpb.MaximizeRequest(
        model="diabetes_linear", start=[from_array("input", start)],
        low=-FLOAT32_MAX, high=FLOAT32_MAX, budget_ms=50, steps=4))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("start: the objective is ") and \
        "at the start row: a value overflows the model's arithmetic" in err.details()


def test_the_ascent_stops_before_a_step_that_overflows(layers: lpb_grpc.LayersStub) -> None:
    """Over float32's whole range the first step of the linear model's ascent lands where its
    sum overflows: the answer is the last finite row, with a note (it came back OK with inf)."""
    answer = layers.Maximize(lpb.MaximizeRequest(
        model="diabetes_linear", low=-FLOAT32_MAX, high=FLOAT32_MAX, budget_ms=200, steps=8,
        seed=3), timeout=30)
    assert non_finite(answer) is None
    assert answer.steps == 0 and answer.activation == answer.start_activation
    assert any("stopped at step 2: the objective or the row reached inf/NaN" in n
               for n in answer.notes)


def test_a_huge_blur_is_refused(layers: lpb_grpc.LayersStub) -> None:
    """It was INTERNAL: scipy refused the filter's size."""
    err = refused(layers.Maximize, lpb.MaximizeRequest(model="digits_cnn", blur_sigma=1e30,
                                                       budget_ms=50))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("blur_sigma: 1e+30; at most 100.0 positions")


# -- weights -----------------------------------------------------------------------------------
def test_weight_statistics_are_finite_for_a_minus_inf_constant_and_an_empty_roi(
        built: grpc.Channel) -> None:
    answer = lpb_grpc.LayersStub(built).GetWeights(lpb.WeightsRequest(model="fuzz_masked"),
                                                   timeout=30)
    assert non_finite(answer) is None
    found = {w.name: w for w in answer.weights}
    floor, roi, w = found["floor"], found["roi"], found["W"]
    assert (floor.nonfinite, floor.mean, floor.std, floor.l2, floor.abs_max) == (1, 0, 0, 0, 0)
    assert (roi.nonfinite, roi.mean, roi.zeros, sum(roi.histogram_counts)) == (0, 0, 0, 0)
    values = masked_model().graph.initializer[2]
    x = np.asarray(values.float_data, np.float64)
    np.testing.assert_allclose([w.mean, w.std, w.l2, w.abs_max],
                               [x.mean(), x.std(), np.linalg.norm(x), np.abs(x).max()],
                               rtol=1e-12)


def test_statistics_of_a_tensor_without_values_are_zero() -> None:
    s = summary(np.zeros((2, 0), np.float32))
    assert [list(v) for v in (s.mean, s.std, s.min, s.max, s.zeros)] == [[0.0, 0.0]] * 5


# -- tabular explanations against a reference row ---------------------------------------------
def f_linear(X: np.ndarray) -> np.ndarray:
    """diabetes_linear's prediction per row (rows,)."""
    session = ort.InferenceSession(str(MODELS / "diabetes_linear" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": X.astype(np.float32)})[0]).reshape(-1)


@pytest.mark.parametrize("kind,value", [("zeros", 0.0), ("constant", 0.05)])
def test_a_tabular_model_explained_against_a_reference_row(
        stub: pb_grpc.ExplainerStub, kind: str, value: float) -> None:
    """It was INTERNAL (the per-feature path assumed background rows). For a linear model the
    Shapley value against one reference row r is phi_i = f(r with x_i) - f(r)."""
    x = DIABETES[:1]  # (1, 10)
    answer = stub.Explain(pb.ExplainRequest(
        model="diabetes_linear", inputs=[from_array("input", x)], budget_ms=500, seed=1,
        baseline=pb.Baseline(kind=kind, value=value)), timeout=30)
    r = np.full((1, 10), value, np.float32)
    swapped = np.repeat(r, 10, axis=0)
    swapped[np.arange(10), np.arange(10)] = x[0]  # row i: r with x_i
    expected = f_linear(swapped) - f_linear(r)[0]
    row = answer.rows[0]
    np.testing.assert_allclose(row.attributions, expected, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(row.base_values, f_linear(r), rtol=1e-6)


def test_smoothgrad_noise_must_be_a_finite_share_of_the_range(
        stub: pb_grpc.ExplainerStub) -> None:
    """noise_level inf came back OK with an infinite noise sigma in the diagnostics."""
    for level in (math.inf, 1e308, math.nan, -0.1):
        with pytest.raises(grpc.RpcError) as info:
            stub.Explain(pb.ExplainRequest(
                model="digits_cnn", inputs=[from_array("image", DIGITS[:1])], method="smoothgrad",
                budget_ms=200, gradients=pb.GradientOptions(noise_level=level, samples=8)),
                timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("gradients.noise_level: ")


def test_live_importance_over_fewer_than_two_rows_is_finite_and_says_so(
        built: grpc.Channel) -> None:
    """With no row (or one) in the window mean_abs (std_errors) came back NaN in an OK answer."""
    datasets, stub = dpb_grpc.DatasetsStub(built), pb_grpc.ExplainerStub(built)

    def live() -> dpb.LiveImportance:
        return datasets.GetLiveImportance(dpb.LiveImportanceRequest(model="fuzz_pair"),
                                          timeout=30)

    def explain(rows: slice) -> np.ndarray:
        X = np.random.default_rng(5).normal(size=(4, 3))[rows]  # (rows, features)
        answer = stub.Explain(pb.ExplainRequest(
            model="fuzz_pair", budget_ms=500, seed=1, inputs=[
                from_array("a", X[:, :2].astype(np.float32)), from_array("b", X[:, 2])]),
            timeout=30)
        return np.array([np.reshape(r.attributions, (-1, 3))[0] for r in answer.rows])  # (rows,
        # features): the first output's (softmax of two: the other's are their negatives)

    empty = live()
    assert empty.rows == 0 and non_finite(empty) is None
    assert list(empty.mean_abs) == list(empty.std_errors) == [0.0] * 3
    assert "no rows were explained in the window" in " ".join(empty.notes)
    first = np.abs(explain(slice(0, 1)))
    one = live()
    assert one.rows == 1 and non_finite(one) is None and list(one.std_errors) == [0.0] * 3
    np.testing.assert_allclose(one.mean_abs, first[0], rtol=1e-6)
    assert "its std_errors are unknown (0 here)" in " ".join(one.notes)
    a = np.concatenate([first, np.abs(explain(slice(1, 4)))])  # (4, features)
    four = live()
    assert four.rows == 4 and not any("0 here" in n for n in four.notes)
    np.testing.assert_allclose(four.std_errors, a.std(axis=0, ddof=1) / 2, rtol=1e-6)

"""Issue 11, items 2 and 3: no answer with inf/NaN, and none whose attributions miss
f(x) - E f, ever leaves the data plane as OK; none is cached or counted as an answered row.
Tiny ONNX graphs built here, served by a real server."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from explainers.base import Array, Background, Explanation
from service.api.server import Sidelight
from service.api.tensors import from_array
from service.plane.guard import find_failure, tolerance
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.serving import serve, stub_on
from tests.test_linear_check import graph_model, two_input_model
from tests.test_methods import add_model

W = np.array([1.0, -0.5, 0.25, 2.0])  # (features,)
BG = np.random.default_rng(3).normal(size=(32, 4))  # (rows, features) around 0


def one_input_model(*tail: tuple[str, list[str]], consts: dict[str, Array]) -> onnx.ModelProto:
    """x [N, 4] FP32 -> MatMul(W) -> tail ops, in order, each (op, extra inputs) -> y."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h0"])]
    for k, (op, extra) in enumerate(tail):
        nodes.append(helper.make_node(op, [f"h{k}", *extra], [f"h{k + 1}"]))
    nodes[-1].output[0] = "y"
    inits = [numpy_helper.from_array(W.astype(np.float32).reshape(4, 1), "W"),
             *(numpy_helper.from_array(v.astype(np.float32), k) for k, v in consts.items())]
    return graph_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             ["N", 4])], inits)


def log_of_product() -> onnx.ModelProto:
    """y = log(x0 * x1): finite where x0 and x1 share a sign, NaN on mixes where they do not."""
    nodes = [helper.make_node("Split", ["x", "two"], ["p", "q", "rest"], axis=1),
             helper.make_node("Mul", ["p", "q"], ["pq"]), helper.make_node("Log", ["pq"], ["y"])]
    return graph_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                       [numpy_helper.from_array(np.array([1, 1, 2], np.int64), "two")])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidelight]:
    root = tmp_path_factory.mktemp("guard")
    big = BG.copy()
    big[4, 0] = 1e39  # a stored background the FP32 model turns into inf
    add_model(root, "affine", one_input_model(("Add", ["b"]), consts={"b": np.array([0.5])}),
              BG)
    add_model(root, "stored_overflow", one_input_model(("Add", ["b"]),
                                                       consts={"b": np.array([0.5])}), big)
    add_model(root, "amplifier", one_input_model(("Mul", ["k"]), consts={"k": np.array([1e30])}),
              BG)
    add_model(root, "relu_offset", one_input_model(("Add", ["b"]), ("Relu", []),
                                                   consts={"b": np.array([100.0])}), BG)
    add_model(root, "log_product", log_of_product(), np.abs(BG) + 0.5)
    add_model(root, "sigmoid", two_input_model("Sigmoid"), BG)
    yield from serve(root)


@pytest.fixture(scope="module")
def stub(server: Sidelight) -> Iterator[pb_grpc.ExplainerStub]:
    yield from stub_on(server)


def explain(stub: pb_grpc.ExplainerStub, model: str, X: Array, **kw: Any) -> pb.ExplainResponse:
    return stub.Explain(pb.ExplainRequest(model=model, inputs=[from_array("x", X)],
                                          budget_ms=2000, **kw))


def refused(stub: pb_grpc.ExplainerStub, model: str, X: Array,
            **kw: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        explain(stub, model, X, **kw)
    return info.value.code(), info.value.details()


def gap_sum(server: Sidelight, model: str, method: str) -> float | None:
    """The additivity-gap histogram's sum for a model and method, after folding the queue."""
    server.metrics.recorder.fold()
    return server.metrics.registry.get_sample_value(
        "sidelight_explain_additivity_gap_sum", {"model": model, "method": method})


def ok_calls(server: Sidelight, model: str) -> float:
    server.metrics.recorder.fold()
    return sum(server.metrics.registry.get_sample_value(
        "sidelight_explain_requests_total", {"model": model, "method": m, "code": "OK"}) or 0.0
        for m in ("auto", "linear", "exact", "permutation"))


def test_a_value_that_overflows_the_models_dtype_is_refused_by_name(
        stub: pb_grpc.ExplainerStub, server: Sidelight) -> None:
    X = np.array([[0.1, 0.2, 0.3, 0.4], [1e39, 0.0, 0.0, 0.0]])  # FP64 on the wire, FP32 model
    code, details = refused(stub, "affine", X)
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # was OK, attributions ~3e38
    assert "'x'" in details and "row 1, feature 0" in details and "FP32" in details
    assert ok_calls(server, "affine") == 0


def test_an_upload_that_overflows_the_models_dtype_is_refused_by_name(
        stub: pb_grpc.ExplainerStub) -> None:
    data = BG.copy()
    data[2, 3] = -1e39
    with pytest.raises(grpc.RpcError) as info:
        stub.PutBackground(pb.PutBackgroundRequest(model="affine", name="huge",
                                                   data=from_array("data", data)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # was stored: NaN every call
    assert info.value.details().startswith("data:") and "row 2, feature 3" in info.value.details()
    assert all(b.name != "huge" for b in stub.ListBackgrounds(
        pb.ListBackgroundsRequest(model="affine")).backgrounds)


def test_a_stored_background_that_overflows_fails_every_call_and_poisons_nothing(
        stub: pb_grpc.ExplainerStub, server: Sidelight) -> None:
    for method in ("", "linear", "exact", "permutation"):
        code, details = refused(stub, "stored_overflow", BG[:2], method=method)
        assert code == grpc.StatusCode.FAILED_PRECONDITION  # was OK with NaN attributions
        assert details.startswith("background: 'default' of model 'stored_overflow'")
        assert "row 4, feature 0: 1e+39" in details and "PutBackground" in details
    assert ok_calls(server, "stored_overflow") == 0
    for method in ("linear", "exact", "permutation", "_unknown"):
        assert gap_sum(server, "stored_overflow", method) in (None, 0.0)


def test_a_model_that_overflows_on_a_finite_input_is_the_inputs_fault(
        stub: pb_grpc.ExplainerStub, server: Sidelight) -> None:
    X = np.array([[1.0, 1.0, 1.0, 1.0], [1e9, 1e9, 1e9, 1e9]])  # 1e9 * 1e30 > FP32's max
    for method in ("", "exact", "permutation"):
        code, details = refused(stub, "amplifier", X, method=method)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("inputs: row 1") and "inf" in details
    assert ok_calls(server, "amplifier") == 0


def test_inf_or_nan_on_mixes_of_row_and_background_is_a_clear_failure(
        stub: pb_grpc.ExplainerStub) -> None:
    X = np.array([[-1.0, -2.0, 0.0, 0.0]])  # log(2) here, log(< 0) = NaN on half the mixes
    code, details = refused(stub, "log_product", X, method="exact")
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # was OK with NaN attributions
    assert "not finite" in details and "'default'" in details


def test_linear_that_misses_the_model_falls_back_and_only_the_good_answer_is_cached(
        stub: pb_grpc.ExplainerStub, server: Sidelight) -> None:
    """relu(x @ W + 100) is affine wherever the probes go, not at this row (relu cuts at 0)."""
    near = explain(stub, "relu_offset", BG[:1])
    assert near.method == "linear"
    X = np.array([[-160.0, 0.0, 0.0, 0.0]])
    first = explain(stub, "relu_offset", X, seed=5)
    assert first.method == "exact" and not first.cached  # was linear, off by 160
    assert any("method linear failed its check on row 0" in n for n in first.notes)
    row = first.rows[0]
    assert row.predictions[0] == 0.0
    assert sum(row.attributions) == pytest.approx(row.predictions[0] - row.base_values[0],
                                                  abs=1e-9)
    again = explain(stub, "relu_offset", X, seed=5)
    assert again.cached and again.method == "exact"
    np.testing.assert_array_equal(again.rows[0].attributions, row.attributions)
    for method, bound in (("exact", 1e-9), ("linear", 1e-3)):  # the rows' method labels
        gap = gap_sum(server, "relu_offset", method)
        assert gap is not None and math.isfinite(gap) and gap < bound


def test_every_answer_through_the_server_adds_up(stub: pb_grpc.ExplainerStub) -> None:
    """The sigmoid model with a wide background: each method, several rows, the guard's
    own tolerance as the bound."""
    X = np.random.default_rng(9).normal(size=(3, 4)) * 3
    for method in ("", "exact", "permutation", "kernel"):
        r = stub.Explain(pb.ExplainRequest(
            model="sigmoid", inputs=[from_array("a", X[:, :2]), from_array("b", X[:, 2:])],
            method=method, budget_ms=2000, max_evaluations=4000))
        for row in r.rows:
            size = max(abs(row.predictions[0]), abs(row.base_values[0]))
            gap = abs(row.predictions[0] - row.base_values[0] - sum(row.attributions))
            assert gap <= 1e-9 * size


# ---------------------------------------------------------------------------- the check alone


def row(method: str, values: list[float], prediction: float, base: float = 0.0,
        std_errors: float = 0.0) -> Explanation:
    phi = np.array([values])  # (1 output, features)
    return Explanation.build(method, phi, np.full_like(phi, std_errors), np.array([base]),
                             np.array([prediction]), evaluations=0, converged=True,
                             budget_exhausted=False)


def test_failures_are_ranked_input_then_background_then_attributions() -> None:
    good = row("exact", [1.0, 2.0], 3.0)
    assert find_failure((good,), "FP32", None) is None
    cases = {
        "prediction": row("exact", [math.nan, 1.0], math.inf),
        "base": row("exact", [math.nan, 1.0], 1.0, base=math.nan),
        "values": row("permutation", [1.0, 2.0], 3.0, std_errors=math.inf),
        "gap": row("exact", [1.0, 2.0], 3.0 + 1e-6),
    }
    for kind, bad in cases.items():
        failure = find_failure((good, bad), "FP32", None)
        assert failure is not None and (failure.kind, failure.row) == (kind, 1)
    both = find_failure((cases["gap"], cases["prediction"]), "FP32", None)
    assert both is not None and both.kind == "prediction"


def test_non_finite_diagnostics_fail_after_everything_else() -> None:
    """smoothgrad reported its noise's sigma as inf in an OK answer (found by the fuzzer)."""
    good = row("smoothgrad", [1.0, 2.0], 3.0)
    noisy = replace(good, diagnostics=(("noise_sigma", math.inf), ("samples", 8.0)))
    failure = find_failure((good, noisy), "FP32", None)
    assert failure is not None and (failure.kind, failure.row) == ("diagnostics", 1)
    assert "noise_sigma not finite" in str(failure.error("FP32", "default"))
    both = find_failure((noisy, row("exact", [1.0, 2.0], math.inf)), "FP32", None)
    assert both is not None and both.kind == "prediction"


def test_the_tolerance_follows_the_method_and_the_models_precision() -> None:
    assert tolerance("permutation", "FP32") == tolerance("exact", "FP16") == 1e-9
    assert tolerance("linear", "FP64") == 1e-9 and tolerance("tree", "FP32") == 1e-5
    assert tolerance("linear", "FP16") == 1e-2 and tolerance("lime", "FP32") is None
    near = row("linear", [1.0, 2.0], 3.0 + 2e-5)  # 7e-6 of the size 3
    assert find_failure((near,), "FP32", None) is None
    assert find_failure((near,), "FP64", None) is not None


def test_tree_base_values_must_match_the_models_mean_on_the_background() -> None:
    """TreeSHAP computes its own E f: trees misread from the graph show up there."""
    background = Background.build(np.zeros((2, 2)), np.array([[1.0], [3.0]]))  # E f = 2
    own = row("tree", [1.0, 2.0], 5.0, base=2.0)
    assert find_failure((own,), "FP32", background) is None
    off = row("tree", [1.0, 2.0], 5.5, base=2.5)
    failure = find_failure((off,), "FP32", background)
    assert failure is not None and failure.kind == "gap"

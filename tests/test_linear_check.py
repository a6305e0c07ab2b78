"""Issue 11, item 1: `linear` only for functions that are affine, whatever the background, and
never on models whose inputs are ids. Tiny ONNX graphs built here, served by a real server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from explainers.base import Array, Background
from explainers.shapley.linear import fit_affine
from service.api.server import Sidelight
from service.api.tensors import from_array
from service.models.graph import discrete_inputs
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.serving import serve, stub_on
from tests.test_methods import add_model

W = np.array([1.5, -2.0, 0.7, 1.0])  # (features,) of the two-input models
X = np.array([[0.4, -1.1, 0.9, 0.3]])  # (1, features) the explained row
VOCAB = 10


def graph_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
                inits: list[onnx.TensorProto], output: str = "y") -> onnx.ModelProto:
    """A model from its parts with one FP32 [N, 1] output (opset 17)."""
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(
        output, TensorProto.FLOAT, ["N", 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def two_input_model(link: str | None) -> onnx.ModelProto:
    """Concat(a, b) -> MatMul -> Add [-> link]: a and b are FP32 [N, 2]."""
    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("MatMul", ["c", "W"], ["h"]),
             helper.make_node("Add", ["h", "B"], ["z" if link else "y"])]
    if link:
        nodes.append(helper.make_node(link, ["z"], ["y"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 2]) for n in "ab"]
    return graph_model(nodes, inputs, [
        numpy_helper.from_array(W.astype(np.float32).reshape(4, 1), "W"),
        numpy_helper.from_array(np.array([0.3], np.float32), "B")])


def token_model(float_ids: bool = False) -> onnx.ModelProto:
    """ids [N, 4] -> Gather(embedding) -> ReduceMean -> MatMul: INT64 ids, or FP32 ids that a
    Cast and a Reshape turn into indices."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["E", "idx"], ["e"], axis=0),
             helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["m", "V"], ["y"])]
    if float_ids:
        nodes[:0] = [helper.make_node("Cast", ["ids"], ["i64"], to=TensorProto.INT64),
                     helper.make_node("Reshape", ["i64", "shape"], ["idx"])]
    else:
        nodes.insert(0, helper.make_node("Identity", ["ids"], ["idx"]))
    kind = TensorProto.FLOAT if float_ids else TensorProto.INT64
    return graph_model(nodes, [helper.make_tensor_value_info("ids", kind, ["N", 4])], [
        numpy_helper.from_array(rng.normal(size=(VOCAB, 3)).astype(np.float32), "E"),
        numpy_helper.from_array(rng.normal(size=(3, 1)).astype(np.float32), "V"),
        numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")])


def token_rows(n: int, seed: int) -> Array:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, 4)).astype(np.float64)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidelight]:
    """Drift on (the default), so warm-up explains reference rows as in production."""
    root = tmp_path_factory.mktemp("linear_check")
    add_model(root, "sigmoid_one_row", two_input_model("Sigmoid"), np.array([[1.0, 0.5, -0.2,
                                                                               2.0]]))
    add_model(root, "sigmoid_adversarial", two_input_model("Sigmoid"), np.repeat(3 * X, 5, 0))
    add_model(root, "affine_one_row", two_input_model(None), np.array([[1.0, 0.5, -0.2, 2.0]]))
    add_model(root, "tokens", token_model(), token_rows(20, 1))
    add_model(root, "float_tokens", token_model(float_ids=True), token_rows(20, 1))
    yield from serve(root)


@pytest.fixture(scope="module")
def stub(server: Sidelight) -> Iterator[pb_grpc.ExplainerStub]:
    yield from stub_on(server)


def explain(stub: pb_grpc.ExplainerStub, model: str, rows: Array,
            **kw: Any) -> pb.ExplainResponse:
    """Two-input models get a and b; token models their ids (INT64 or FP32 as they take)."""
    if "tokens" in model:
        dtype = np.float32 if model.startswith("float") else np.int64
        inputs = [from_array("ids", rows.astype(dtype))]
    else:
        inputs = [from_array("a", rows[:, :2]), from_array("b", rows[:, 2:])]
    return stub.Explain(pb.ExplainRequest(model=model, inputs=inputs, budget_ms=2000, **kw))


def assert_additive(r: pb.ExplainResponse, tol: float = 1e-9) -> None:
    """sum(attributions) == f(x) - E f for every row, relative to the numbers' size."""
    for row in r.rows:
        gap = row.predictions[0] - row.base_values[0] - sum(row.attributions)
        assert abs(gap) <= tol * max(abs(row.predictions[0]), abs(row.base_values[0]), 1e-12)


@pytest.mark.parametrize("model", ["sigmoid_one_row", "sigmoid_adversarial"])
def test_a_sigmoid_after_matmul_is_not_linear_on_a_degenerate_background(
        stub: pb_grpc.ExplainerStub, model: str) -> None:
    auto = explain(stub, model, X)
    assert auto.method == "exact"  # was linear: sum 0.88 vs f(x) - E f 0.45, or all zeros
    assert_additive(auto)
    forced = explain(stub, model, X, method="linear")
    assert forced.method == "exact" and any("not affine" in n for n in forced.notes)
    assert_additive(forced)


def test_an_affine_graph_is_still_linear_on_a_one_row_background(
        stub: pb_grpc.ExplainerStub) -> None:
    r = explain(stub, "affine_one_row", X)
    assert r.method == "linear"
    np.testing.assert_allclose(r.rows[0].attributions, W * (X[0] - [1.0, 0.5, -0.2, 2.0]),
                               rtol=1e-5, atol=1e-6)
    assert_additive(r, 1e-5)


def sigmoid(X: Array) -> Array:
    return np.asarray(1 / (1 + np.exp(-(X @ W[:, None] + 0.3))))  # (rows, 1)


@pytest.mark.parametrize("rows", [
    np.array([[1.0, 0.5, -0.2, 2.0]]),  # one row
    np.repeat(3 * X, 5, 0),  # identical rows
    np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0]]),  # on a line
    np.array([[0.0, 0.0, 0.0, 0.0], [1e-6, 0.0, 0.0, 0.0]]),  # a tiny spread in one feature
    np.zeros((1, 4)),  # centre 0: probes at the fallback scale 1
])
def test_the_affine_check_fails_a_sigmoid_with_any_background(rows: Array) -> None:
    background = Background.build(rows, sigmoid(rows))
    assert fit_affine(sigmoid, background, dtype=np.float32) is None
    fit = fit_affine(lambda Z: Z @ W[:, None] + 0.3, background, dtype=np.float32)
    assert fit is not None
    np.testing.assert_allclose(fit.weights[0], W, rtol=1e-7)  # float32 probes


@pytest.mark.parametrize("model, why", [("tokens", "is INT64"),
                                        ("float_tokens", "indices of a Gather")])
def test_token_models_are_never_probed_and_explained_against_their_background(
        stub: pb_grpc.ExplainerStub, model: str, why: str) -> None:
    ids = token_rows(3, 7)
    auto = explain(stub, model, ids)
    assert auto.method == "exact"  # was linear: all zeros (gap 2.1) or INTERNAL
    assert_additive(auto, 1e-7)
    forced = explain(stub, model, ids, method="linear")
    assert forced.method == "exact"
    assert any("linear unavailable" in n and "'ids'" in n and why in n for n in forced.notes)
    for f, a in zip(forced.rows, auto.rows, strict=True):  # tokens: rows differ in length
        np.testing.assert_allclose(f.attributions, a.attributions, atol=1e-12)


def test_a_token_model_in_the_repository_does_not_stop_start_up(server: Sidelight) -> None:
    """Warm-up (drift on) explains reference rows of every model; its linear probe used to
    raise onnxruntime's Gather index error out of warm() and end the process."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        info = pb_grpc.ExplainerStub(channel).GetModel(pb.GetModelRequest(model="tokens"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING and info.state == "READY"
    assert server.data_plane().drift is not None


def node_model(build: Callable[[], list[onnx.NodeProto]], inputs: dict[str, int]) -> Any:
    """A model whose graph is `build()`, with FP32/INT inputs [N, 4] and output y."""
    values = [helper.make_tensor_value_info(n, t, ["N", 4]) for n, t in inputs.items()]
    inits = [numpy_helper.from_array(np.arange(4, dtype=np.int64), "cols"),
             numpy_helper.from_array(np.ones((4, 1), np.float32), "E"),
             numpy_helper.from_array(np.array(3, np.int64), "depth"),
             numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "values")]
    return graph_model(build(), values, inits)


def test_index_like_inputs_are_found_through_value_preserving_ops() -> None:
    assert discrete_inputs(token_model()) == {"ids": "is INT64"}
    assert discrete_inputs(token_model(True)) == {"ids": "feeds the indices of a Gather node"}
    columns = node_model(lambda: [  # a float input as Gather *data* (column selection): fine
        helper.make_node("Gather", ["x", "cols"], ["g"], axis=1),
        helper.make_node("MatMul", ["g", "E"], ["y"])], {"x": TensorProto.FLOAT})
    assert discrete_inputs(columns) == {}
    one_hot = node_model(lambda: [  # Floor -> Cast -> OneHot indices: a category code
        helper.make_node("Floor", ["x"], ["f"]),
        helper.make_node("Cast", ["f"], ["k"], to=TensorProto.INT64),
        helper.make_node("OneHot", ["k", "depth", "values"], ["o"]),
        helper.make_node("ReduceSum", ["o"], ["y"])], {"x": TensorProto.FLOAT})
    assert discrete_inputs(one_hot) == {"x": "feeds the indices of a OneHot node"}


"""What reaches the wire when a client sends something wrong: shapes that overflow, huge strings
echoed in messages, values onnxruntime refuses, bytes that do not decode; a port held by another
server; metric series that exist before the first call. All through real servers."""

from __future__ import annotations

import logging
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper

from service.api import server as server_module
from service.api.server import Sidelight, StartupError, start
from service.api.servicer import capped
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS, background_of, settings_for

LONG = "x" * 20_000  # 20 kB: over gRPC's 16 KiB metadata limit when echoed whole
WIDE = "é" * 20_000  # 40 kB of UTF-8, about 120 kB once percent-encoded in the status header
MAX_DETAILS = 1200  # capped() keeps 1024 bytes plus a few words


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def explain(model: str, X: np.ndarray, **kw: object) -> pb.ExplainRequest:
    return pb.ExplainRequest(model=model, inputs=[from_array("input", X)], **kw)  # type: ignore[arg-type]


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the series `name` with exactly these labels, None when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{"):
            series, value = line.rsplit(" ", 1)
            got = ",".join(sorted(series[len(name) + 1:-1].split(",")))
            if got == want:
                return float(value)
    return None


# --- item 4: shapes ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [[2**62, 4], [7, 7905747460161236407], [0, 2**62],
                                   [2**63 - 1, 2**63 - 1], [1] * 9, [], [3, -1]])
def test_shapes_are_checked_with_exact_arithmetic_before_any_allocation(
        stub: pb_grpc.ExplainerStub, shape: list[int]) -> None:
    for contents in (pb.TensorContents(fp64_contents=[0.5]), None):
        tensor = pb.Tensor(name="input", datatype="FP64", shape=shape, contents=contents,
                           raw=b"" if contents else b"\0" * 8)
        code, details = code_of(lambda t=tensor: stub.Explain(  # type: ignore[misc]
            pb.ExplainRequest(model="diabetes_linear", inputs=[t])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith("inputs[0].shape: ")
    code, details = code_of(lambda: stub.PutBackground(pb.PutBackgroundRequest(
        model="diabetes_linear", name="huge", data=pb.Tensor(datatype="FP32", shape=shape))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("data.shape: ")


def test_a_shape_beyond_the_message_limit_names_the_limit(stub: pb_grpc.ExplainerStub) -> None:
    code, details = code_of(lambda: stub.Explain(pb.ExplainRequest(
        model="diabetes_linear", inputs=[pb.Tensor(datatype="FP64", shape=[2**62, 4])])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_upload_bytes" in details and str(2**64) in details  # exact, not wrapped to 0


# --- item 8: echoed client text ----------------------------------------------------------------
def test_huge_client_strings_come_back_shortened_with_the_right_code(
        stub: pb_grpc.ExplainerStub) -> None:
    X = background_of("diabetes_linear")[:1]
    found, invalid = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    calls: list[tuple[grpc.StatusCode, str, Callable[[], object]]] = [
        (found, "model: ", lambda: stub.GetModel(pb.GetModelRequest(model=LONG))),
        (found, "model: ", lambda: stub.GetModel(pb.GetModelRequest(model=WIDE))),
        (found, "version: ", lambda: stub.GetModel(pb.GetModelRequest(
            model="diabetes_linear", version=LONG))),
        (found, "model: ", lambda: stub.Explain(explain(LONG, X))),
        (invalid, "method: ", lambda: stub.Explain(explain("diabetes_linear", X, method=WIDE))),
        (found, "background: ", lambda: stub.Explain(explain("diabetes_linear", X,
                                                             background=LONG))),
        (invalid, "target.output: ", lambda: stub.Explain(explain(
            "diabetes_linear", X, target=pb.Target(output=LONG)))),
        (invalid, "target.scale: ", lambda: stub.Explain(explain(
            "diabetes_linear", X, target=pb.Target(scale=LONG)))),
        (invalid, "target.classes: ", lambda: stub.Explain(explain(
            "diabetes_linear", X, target=pb.Target(classes=range(10, 100_000))))),
        (invalid, "inputs[0].name: ", lambda: stub.Explain(pb.ExplainRequest(
            model="diabetes_linear", inputs=[from_array(LONG, X)]))),
        (invalid, "inputs[0].datatype: ", lambda: stub.Explain(pb.ExplainRequest(
            model="diabetes_linear", inputs=[pb.Tensor(datatype=LONG, shape=[1, 10])]))),
        (invalid, "name: ", lambda: stub.PutBackground(pb.PutBackgroundRequest(
            model="diabetes_linear", name=LONG, data=from_array("", X)))),
        (invalid, "name: ", lambda: stub.GetBackground(pb.GetBackgroundRequest(
            model="diabetes_linear", name=LONG))),
        (invalid, "name: ", lambda: stub.DeleteBackground(pb.DeleteBackgroundRequest(
            model="diabetes_linear", name=LONG))),
        (found, "model: ", lambda: stub.ListBackgrounds(pb.ListBackgroundsRequest(model=LONG))),
    ]
    for want, field, call in calls:
        code, details = code_of(call)
        assert (code, details[:len(field)]) == (want, field), details[:200]
        assert len(details.encode()) <= MAX_DETAILS
    assert "(20000 characters)" in code_of(calls[0][2])[1]


def test_the_error_mapping_caps_any_message() -> None:
    assert capped("short") == "short"
    long = capped("é" * 5000)
    assert len(long.encode()) <= MAX_DETAILS and long.endswith("(10000 bytes)")


# --- item 9: onnxruntime refusing the caller's values -----------------------------------------
def _graph_model(nodes: list[onnx.NodeProto], constants: dict[str, list[int]]) -> onnx.ModelProto:
    """input FP32 [N, 2] -> y FP32 [N, 1] through `nodes`; `c0` is column 0 of the input."""
    inits = [helper.make_tensor(k, TensorProto.INT64, [] if k == "zero" else [len(v)], v)
             for k, v in constants.items()]  # "zero" is a scalar: Gather on it drops the axis
    graph = helper.make_graph(
        [helper.make_node("Gather", ["input", "zero"], ["c0"], axis=1), *nodes], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def lookup_model() -> onnx.ModelProto:
    """y = w[int(x0)] + x1: a categorical code looked up in a table of 10 (Gather)."""
    h = helper.make_node
    return _graph_model([
        h("Gather", ["input", "one"], ["c1"], axis=1),
        h("Cast", ["c0"], ["code"], to=TensorProto.INT64),
        h("Cast", ["table_i"], ["table"], to=TensorProto.FLOAT),
        h("Gather", ["table", "code"], ["w"], axis=0),
        h("Unsqueeze", ["w", "one"], ["w1"]),
        h("Add", ["w1", "c1"], ["y"])],
        {"zero": [0], "one": [1], "table_i": list(range(10))})


def reshape_model() -> onnx.ModelProto:
    """sum(x) per row, through a Reshape to [-1, min(x0)]: fine while x0 >= 1."""
    h = helper.make_node
    return _graph_model([
        h("ReduceMin", ["c0"], ["low"], keepdims=1),
        h("Cast", ["low"], ["k"], to=TensorProto.INT64),
        h("Concat", ["minus1", "k"], ["shape"], axis=0),
        h("Reshape", ["input", "shape"], ["flat"]),
        h("Shape", ["input"], ["x_shape"]),
        h("Reshape", ["flat", "x_shape"], ["back"]),
        h("ReduceSum", ["back", "axis1"], ["y"], keepdims=1)],
        {"zero": [0], "minus1": [-1], "axis1": [1]})


def expand_model() -> onnx.ModelProto:
    """sum(x) per row, through max(x0) copies of x: a huge x0 cannot be allocated."""
    h = helper.make_node
    return _graph_model([
        h("ReduceMax", ["c0"], ["high"], keepdims=1),
        h("Cast", ["high"], ["k"], to=TensorProto.INT64),
        h("Concat", ["k", "one", "one"], ["shape"], axis=0),
        h("Expand", ["input", "shape"], ["copies"]),  # (k, N, 2)
        h("ReduceMean", ["copies"], ["mean"], axes=[0], keepdims=0),
        h("ReduceSum", ["mean", "one"], ["y"], keepdims=1)],
        {"zero": [0], "one": [1]})


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidelight]:
    """A server with three small models that onnxruntime refuses some values for."""
    repo = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    background = np.column_stack([rng.integers(1, 3, 20), rng.normal(size=20)])  # (20, 2)
    for name, model in (("lookup", lookup_model()), ("reshape", reshape_model()),
                        ("expand", expand_model())):
        (repo / name / "1").mkdir(parents=True)
        onnx.save(model, repo / name / "1" / "model.onnx")
        np.save(repo / name / "background.npy", background.astype(np.float32))
        (repo / name / "explain.yaml").write_text(yaml.safe_dump(
            {"method": "exact", "background": {"path": "background.npy"}}))
    running = start(settings_for(repo))
    yield running
    running.stop(grace=0)


def test_values_onnxruntime_refuses_are_invalid_argument_not_server_errors(
        odd: Sidelight, capfd: pytest.CaptureFixture[str]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{odd.port}") as channel:
        stub = pb_grpc.ExplainerStub(channel)
        assert stub.Explain(explain("lookup", np.array([[3.0, 0.5]]))).rows  # in the table
        code, details = code_of(lambda: stub.Explain(explain("lookup", np.array([[50.0, 0.5]]))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("inputs: the model cannot evaluate these values: Gather node")
        assert "out of data bounds" in details and "[ONNXRuntimeError]" not in details
        code, details = code_of(lambda: stub.Explain(explain("reshape", np.array([[-3.0, 1]]))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "Reshape node" in details
        assert "was false" not in details  # onnxruntime's source location is dropped
    text = scrape(odd.metrics_port)
    for model in ("lookup", "reshape"):
        assert sample(text, "sidelight_explain_requests_total", model=model, method="auto",
                      code="INVALID_ARGUMENT") == 1
        assert (sample(text, "sidelight_explain_requests_total", model=model, method="auto",
                       code="INTERNAL") or 0) == 0
    assert "sequential_executor" not in capfd.readouterr().err  # onnxruntime logs nothing


def test_an_allocation_onnxruntime_cannot_make_stays_internal_with_one_log_line(
        odd: Sidelight, caplog: pytest.LogCaptureFixture) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{odd.port}") as channel, \
            caplog.at_level(logging.ERROR):
        code, details = code_of(lambda: pb_grpc.ExplainerStub(channel).Explain(
            explain("expand", np.array([[1e15, 1.0]]))))
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error; see the server log")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "Failed to allocate" in errors[0].getMessage()
    assert errors[0].exc_info is None


# --- item 10: undecodable bytes ---------------------------------------------------------------
def test_undecodable_bytes_are_invalid_argument_with_one_log_line(
        channel: grpc.Channel, caplog: pytest.LogCaptureFixture) -> None:
    def raw(method: str) -> Callable[[bytes], bytes]:
        return channel.unary_unary(method, request_serializer=lambda b: b,  # type: ignore[no-any-return]
                                   response_deserializer=lambda b: b)

    with caplog.at_level(logging.INFO):
        for _ in range(5):
            code, details = code_of(lambda: raw("/sidelight.v1.Explainer/Explain")(b"\xff\xff"))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert details == "request: could not be decoded as sidelight.v1.ExplainRequest"
        code, details = code_of(lambda: raw("/sidelight.v1.Explainer/GetModel")(b"\x0a\x05ab"))
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "request: could not be "
                                   "decoded as sidelight.v1.GetModelRequest")
        code, _ = code_of(lambda: raw("/grpc.health.v1.Health/Check")(b"\xff"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.exc_info or "deserializ" in r.getMessage()]
    assert len([r for r in caplog.records if "could not be decoded" in r.getMessage()]) <= 1
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert raw("/sidelight.v1.Explainer/GetModel")(
        pb.GetModelRequest(model="diabetes_linear").SerializeToString())


# --- item 15: a port another server holds -----------------------------------------------------
def test_a_second_server_on_the_same_grpc_port_refuses_to_start(
        app: Sidelight, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(MODELS, port=app.port, metrics_port=-1)
    with pytest.raises(StartupError, match=f"gRPC port {app.port} on 127.0.0.1 is in use"):
        start(settings, load=False)
    monkeypatch.setattr(server_module, "_in_use", lambda host, port: False)
    with pytest.raises(StartupError, match="cannot listen"):  # grpcio itself, SO_REUSEPORT off
        start(settings, load=False)


def test_a_busy_metrics_port_is_a_startup_error(app: Sidelight) -> None:
    with pytest.raises(StartupError, match=f"metrics port {app.metrics_port} on 127.0.0.1: "
                                           "Address already in use"):
        start(settings_for(MODELS, metrics_port=app.metrics_port), load=False)


# --- item 20: series that exist before the first call -----------------------------------------
def test_a_fresh_server_exports_zero_series_for_what_panels_and_rules_query(
        tmp_path: Path) -> None:
    shutil.copytree(MODELS / "diabetes_linear", tmp_path / "diabetes_linear")
    fresh = start(settings_for(tmp_path))
    try:
        text = scrape(fresh.metrics_port)
    finally:
        fresh.stop(grace=0)
    assert sample(text, "sidelight_explain_rejected_total", reason="overload") == 0
    model = {"model": "diabetes_linear"}
    for code in ("OK", "INVALID_ARGUMENT", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
        assert sample(text, "sidelight_explain_requests_total", method="auto", code=code,
                      **model) == 0
    for name in ("rows", "budget_exhausted", "converged"):
        for method in ("exact", "permutation", "kernel", "tree", "linear"):
            assert sample(text, f"sidelight_explain_{name}_total", method=method, **model) == 0
    assert sample(text, "sidelight_explain_cpu_seconds_total", **model) == 0
    for cache in ("background", "derived", "result"):
        for result in ("hit", "miss"):
            assert sample(text, "sidelight_cache_requests_total", cache=cache,
                          result=result) is not None

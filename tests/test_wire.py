"""What reaches the wire when a client sends something wrong: shapes that overflow, huge strings
echoed in messages. All through real servers."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest

from service.api.servicer import capped
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import background_of

LONG = "x" * 20_000  # 20 kB: over gRPC's 16 KiB metadata limit when echoed whole
WIDE = "é" * 20_000  # 40 kB of UTF-8, about 120 kB once percent-encoded in the status header
MAX_DETAILS = 1200  # capped() keeps 1024 bytes plus a few words


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def explain(model: str, X: np.ndarray, **kw: object) -> pb.ExplainRequest:
    return pb.ExplainRequest(model=model, inputs=[from_array("input", X)], **kw)  # type: ignore[arg-type]


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

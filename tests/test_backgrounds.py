"""Background RPCs through a real server: upload, use, list, replace, delete, limits."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from service.api.server import Sidelight, start
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS, background_of, settings_for


@pytest.fixture(scope="module")
def stub() -> Iterator[pb_grpc.ExplainerStub]:
    app: Sidelight = start(settings_for(MODELS, metrics_port=-1, drift_reference_rows=0,
                                        max_background_rows=500, max_upload_bytes=64 * 1024))
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        yield pb_grpc.ExplainerStub(ch)
    app.stop(grace=0)


def put(stub: pb_grpc.ExplainerStub, data: np.ndarray, name: str = "shifted",
        model: str = "diabetes_linear") -> pb.PutBackgroundResponse:
    return stub.PutBackground(pb.PutBackgroundRequest(model=model, name=name,
                                                      data=from_array("", data)))


def explain(stub: pb_grpc.ExplainerStub, background: str) -> pb.ExplainResponse:
    x = background_of("diabetes_linear")[:1]
    return stub.Explain(pb.ExplainRequest(model="diabetes_linear", background=background,
                                          inputs=[from_array("input", x)], budget_ms=500))


def test_upload_use_list_replace_delete(stub: pb_grpc.ExplainerStub) -> None:
    data = background_of("diabetes_linear")[:40] + 0.05
    r = put(stub, data)
    assert r.persisted and r.background.rows == 40 and r.background.features == 10
    assert r.background.datatype == "FP64" and r.background.source == "upload"
    assert len(r.background.sha256) == 64 and r.background.feature_names[2] == "bmi"
    info = stub.GetBackground(pb.GetBackgroundRequest(model="diabetes_linear", name="shifted"))
    assert info == r.background
    names = {(b.model, b.name) for b in stub.ListBackgrounds(pb.ListBackgroundsRequest(
        model="diabetes_linear")).backgrounds}
    assert names == {("diabetes_linear", "default"), ("diabetes_linear", "shifted")}
    shifted = explain(stub, "shifted")
    assert shifted.background == "shifted" and shifted.background_rows == 40
    assert shifted.background_sha256 == r.background.sha256
    default = explain(stub, "")
    assert default.rows[0].base_values[0] != pytest.approx(shifted.rows[0].base_values[0])
    replaced = put(stub, data[:10])
    assert explain(stub, "shifted").background_rows == 10
    assert replaced.background.sha256 != r.background.sha256
    assert stub.DeleteBackground(pb.DeleteBackgroundRequest(model="diabetes_linear",
                                                            name="shifted")).deleted
    with pytest.raises(grpc.RpcError) as err:
        explain(stub, "shifted")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "background" in err.value.details()
    assert not stub.DeleteBackground(pb.DeleteBackgroundRequest(model="diabetes_linear",
                                                                name="shifted")).deleted


def test_float32_upload_keeps_its_bytes(stub: pb_grpc.ExplainerStub) -> None:
    data = background_of("diabetes_linear")[:5].astype(np.float32)
    r = put(stub, data, name="f32")
    assert r.background.datatype == "FP32"
    import hashlib
    assert r.background.sha256 == hashlib.sha256(data.tobytes()).hexdigest()


@pytest.mark.parametrize(("data", "name", "field"), [
    (np.zeros((3, 9)), "x", "data.shape"),
    (np.zeros((0, 10)), "x", "data.shape"),
    (np.zeros((3, 10), np.int64), "x", "data.datatype"),
    (np.full((3, 10), np.nan), "x", "data"),
    (np.zeros((3, 10)), "bad name!", "name"),
    (np.zeros((501, 10)), "x", "max_background_rows"),
    (np.zeros((900, 10)), "x", "max_upload_bytes"),
])
def test_bad_uploads_name_the_field_or_limit(stub: pb_grpc.ExplainerStub, data: np.ndarray,
                                             name: str, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        put(stub, data, name=name)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_unknown_model_or_background_is_not_found(stub: pb_grpc.ExplainerStub) -> None:
    for call in (lambda: put(stub, np.zeros((2, 10)), model="nope"),
                 lambda: stub.GetBackground(pb.GetBackgroundRequest(model="diabetes_linear",
                                                                    name="missing")),
                 lambda: stub.ListBackgrounds(pb.ListBackgroundsRequest(model="nope"))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

"""The Layers service through a real gRPC server on the bundled digits CNN and attention model:
ListLayers against the graph, activations against an onnxruntime run of a copy of the model
that outputs the tensor (built here, not by the service), blocks of rows put back together
when messages are kept tiny, weight statistics against numpy on the initializers, attention
rows summing to one, activation maximisation raising the logit within the range and
deterministic for a seed, the refusals naming the field, the size limit, tokens, draining,
cancellation and the metrics."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import numpy_helper
from prometheus_client import CollectorRegistry

from explainers.errors import Cancelled, Unavailable
from explainers.gradients.graphs import last_spatial_conv
from explainers.layers.activations import Activation, Summary
from service.api.layers import LayersServicer, activation_chunks, row_blocks
from service.api.server import Sidelight, start
from service.api.tensors import from_array
from service.cli import main
from service.client import Client
from service.monitoring.metrics import UNKNOWN, Metrics
from service.plane.dataplane import DataPlane
from service.plane.layers import Activations, LayerPlane, MaximizeQuery
from service.plane.scheduler import Control
from sidelight.v1 import layers_pb2 as lpb
from sidelight.v1 import layers_pb2_grpc as lpb_grpc
from tests.conftest import MODELS, settings_for
from tests.secured import code_of, one_model_repo

CNN = MODELS / "digits_cnn" / "1" / "model.onnx"
TEXT = MODELS / "text_sentiment" / "1" / "model.onnx"
DIGITS = np.load(MODELS / "digits_cnn" / "background.npy").astype(np.float32)  # (100, 1, 8, 8)
TOKENS = np.load(MODELS / "text_sentiment" / "background.npy").astype(np.int64)  # (32, 16)
RELU1, POOL, RELU2 = "/relu1/Relu_output_0", "/pool/MaxPool_output_0", "/relu2/Relu_output_0"
SOFTMAX = "/attention/softmax/Softmax_output_0"
TOKEN = "layers-token-0b1c2d3e4f5a6b7c8d"


def oracle(path: Path, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The named tensors from onnxruntime on a copy of the model whose outputs include them
    (their types from onnx's shape inference)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    typed = {v.name: v for v in model.graph.value_info}
    model.graph.output.extend(typed[n] for n in names if n in typed)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, feeds), strict=True))


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> lpb_grpc.LayersStub:
    return lpb_grpc.LayersStub(channel)


@pytest.fixture(scope="module")
def client(app: Sidelight) -> Iterator[Client]:
    with Client(f"127.0.0.1:{app.port}", timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def plane(app: Sidelight) -> DataPlane:
    """A data plane of its own over the session server's models (its own metrics)."""
    return DataPlane(app.data_plane().repo, app.data_plane().store, app.settings,
                     Metrics(CollectorRegistry()))


def layers_server(plane: DataPlane, chunk_bytes: int,
                  max_bytes: int) -> Iterator[lpb_grpc.LayersStub]:
    """A Layers server of its own with small limits, and a stub on it."""
    layers = LayerPlane(plane, max_bytes=max_bytes)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    lpb_grpc.add_LayersServicer_to_server(LayersServicer(lambda: layers, chunk_bytes), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield lpb_grpc.LayersStub(channel)
    server.stop(0)


@pytest.fixture(scope="module")
def tight(plane: DataPlane) -> Iterator[lpb_grpc.LayersStub]:
    """Messages of at most 10 KB."""
    yield from layers_server(plane, 10_000, 1 << 20)


@pytest.fixture(scope="module")
def limited(plane: DataPlane) -> Iterator[lpb_grpc.LayersStub]:
    """Answers of at most 10 KB."""
    yield from layers_server(plane, 1 << 20, 10_000)


def activations_of(stub: lpb_grpc.LayersStub, X: np.ndarray, layers: list[str],
                   **kw: object) -> list[lpb.ActivationChunk]:
    request = lpb.ActivationsRequest(model="digits_cnn", inputs=[from_array("image", X)],
                                     layers=layers, **kw)  # type: ignore[arg-type]
    return list(stub.GetActivations(request, timeout=30))


def refusal(fn: object, request: object) -> grpc.RpcError:
    """The error a call ends with (streams read to the end)."""
    with pytest.raises(grpc.RpcError) as info:
        answer = fn(request, timeout=30)  # type: ignore[operator]
        if not isinstance(answer, lpb.ListLayersResponse | lpb.WeightsResponse |
                          lpb.MaximizeResponse):
            list(answer)
    return info.value


# -- ListLayers --------------------------------------------------------------------------------
def test_list_layers_names_the_convolutions_the_attention_and_gradcams_layer(
        client: Client, stub: lpb_grpc.LayersStub) -> None:
    cnn = client.list_layers("digits_cnn")
    proto = onnx.load(CNN)
    assert cnn.names == [o for n in proto.graph.node if n.op_type != "Constant" for o in n.output]
    conv = cnn.layers[0]
    assert (conv.name, conv.op_type, conv.shape, conv.datatype, conv.batch_axis) == \
        ("/conv1/Conv_output_0", "Conv", (1, 8, 8, 8), "FP32", 0)
    assert cnn.gradcam_layer == last_spatial_conv(proto) == RELU2
    assert not cnn.attention and "no attention layer found" in cnn.attention_unavailable
    text = stub.ListLayers(lpb.ListLayersRequest(model="text_sentiment"), timeout=30)
    layer, = text.attention_layers
    assert (layer.kind, layer.probabilities, layer.node) == \
        ("Softmax", SOFTMAX, "/attention/softmax/Softmax")
    assert text.gradcam_layer == "" and text.attention_unavailable == ""
    run = oracle(TEXT, [x.name for x in text.layers], {"tokens": TOKENS[:3]})
    for x in text.layers:  # the batch-1 shapes scale along the batch axis
        assert run[x.name].shape == (3, *x.shape[1:]) and x.batch_axis == 0, x.name


# -- GetActivations ----------------------------------------------------------------------------
def test_activations_equal_onnxruntime_with_per_row_statistics(client: Client) -> None:
    X = DIGITS[:5]
    got = client.activations("digits_cnn", X, [RELU1, POOL, "logits"])
    expected = oracle(CNN, [RELU1, POOL, "logits"], {"image": X})
    for name, want in expected.items():
        a = got[name]
        assert a.values.dtype == np.float32 and a.per_row and a.shape == want.shape
        np.testing.assert_allclose(a.values, want, rtol=1e-6, atol=1e-6)
        flat = want.reshape(5, -1).astype(np.float64)
        for stat, value in [("mean", flat.mean(1)), ("std", flat.std(1)), ("min", flat.min(1)),
                            ("max", flat.max(1)), ("zeros", (flat == 0).mean(1))]:
            np.testing.assert_allclose(getattr(a, stat), value, rtol=1e-6, atol=1e-9)
    means = got[RELU1].channel_mean
    assert means is not None and got["logits"].channel_mean is None
    np.testing.assert_allclose(means, expected[RELU1].mean(axis=(2, 3)),
                               atol=1e-6)


def test_channel_mean_and_top_k(client: Client) -> None:
    X = DIGITS[5:9]
    want = oracle(CNN, [RELU2], {"image": X})[RELU2]  # (4, 16, 8, 8)
    mean = client.activations("digits_cnn", X, [RELU2], reduction="channel_mean")[RELU2]
    assert mean.values.shape == (4, 8, 8) and mean.shape == (4, 16, 8, 8)
    np.testing.assert_allclose(mean.values, want.mean(axis=1), atol=1e-6)
    top = client.activations("digits_cnn", X, [RELU2], reduction="top_k", k=3)[RELU2]
    assert top.values.shape == (4, 3, 8, 8) and top.channels is not None
    order = np.argsort(-want.mean(axis=(2, 3)), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(top.channels, order)
    np.testing.assert_array_equal(top.values, np.take_along_axis(
        want, order[:, :, None, None], axis=1))
    default = client.activations("digits_cnn", X, [RELU2], reduction="top_k")[RELU2]
    assert default.values.shape == (4, 8, 8, 8)  # k = 0: eight channels


def test_tiny_messages_carry_blocks_of_rows_that_reassemble(
        tight: lpb_grpc.LayersStub) -> None:
    X = DIGITS[10:15]  # relu1: 2,048 bytes a row
    chunks = activations_of(tight, X, [RELU1, "logits"], reduction="")
    relu = [c for c in chunks if c.layer == RELU1]
    assert [(c.row_offset, c.rows) for c in relu] == [(0, 2), (2, 2), (4, 1)]
    assert all(c.ByteSize() <= 10_000 for c in chunks)
    values = np.concatenate([np.frombuffer(c.values.raw, "<f4").reshape(c.values.shape)
                             for c in relu])
    np.testing.assert_array_equal(values, oracle(CNN, [RELU1], {"image": X})[RELU1])
    means = np.concatenate([list(c.summary.mean) for c in relu])
    np.testing.assert_allclose(means, values.reshape(5, -1).mean(axis=1), atol=1e-6)
    assert all(list(c.shape) == [5, 8, 8, 8] for c in relu)
    logits, = [c for c in chunks if c.layer == "logits"]
    assert (logits.row_offset, logits.rows) == (0, 5)
    maps = list(tight.GetAttention(lpb.AttentionRequest(
        model="text_sentiment", inputs=[from_array("tokens", TOKENS[:6])]), timeout=30))
    assert [(c.row_offset, c.rows) for c in maps] == [(i, 4 if i == 0 else 2)
                                                      for i in (0, 4)]
    assert all(c.ByteSize() <= 10_000 for c in maps)


def test_a_tensor_without_a_row_axis_goes_whole_and_blocks_cover_the_rows() -> None:
    whole = np.arange(6, dtype=np.int64)  # a shape computation, say
    one = np.ones(1)
    summary = Summary(one * 2.5, one, one * 0, one * 5, one / 6, None)
    result = Activations("m", "1", 40, (Activation("shape", (6,), "int64", False, summary,
                                                   "none", whole, None),), 1.0)
    chunk, = activation_chunks(result, 64)
    assert (chunk.per_row, chunk.row_offset, chunk.rows, list(chunk.values.shape)) == \
        (False, 0, 40, [6])
    for rows, size, limit in [(5, 2048, 10_000), (1, 10**9, 100), (300, 7, 4 << 20)]:
        blocks = row_blocks(rows, size, limit)
        assert blocks[0][0] == 0 and blocks[-1][1] == rows
        assert all(a < b == c for (a, b), (c, _) in itertools.pairwise(blocks))


def test_activations_over_the_limit_are_refused_with_the_figure(
        limited: lpb_grpc.LayersStub) -> None:
    err = refusal(limited.GetActivations, lpb.ActivationsRequest(
        model="digits_cnn", inputs=[from_array("image", DIGITS[:10])], layers=[RELU1]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "20480 bytes for 10 rows, over the 10000-byte limit" in err.details()
    assert "channel_mean" in err.details()
    mean, = activations_of(limited, DIGITS[:10], [RELU1], reduction="channel_mean")
    assert list(mean.values.shape) == [10, 8, 8]


# -- GetWeights --------------------------------------------------------------------------------
def test_weight_statistics_equal_numpy_on_the_initializers(client: Client) -> None:
    found = {w.name: w for w in client.weights("digits_cnn")}
    proto = onnx.load(CNN)
    assert list(found) == [i.name for i in proto.graph.initializer]
    for init in proto.graph.initializer:
        x = numpy_helper.to_array(init).astype(np.float64).ravel()
        w = found[init.name]
        assert w.shape == numpy_helper.to_array(init).shape and w.datatype == "FP32"
        np.testing.assert_allclose([w.mean, w.std, w.l2, w.abs_max, w.zeros],
                                   [x.mean(), x.std(), np.linalg.norm(x), np.abs(x).max(),
                                    np.mean(x == 0)], rtol=1e-12)
        counts, edges = np.histogram(x, bins=32)
        np.testing.assert_array_equal(w.counts, counts)
        np.testing.assert_allclose(w.edges, edges, rtol=1e-12)
    assert found["conv2.weight"].uses == (("/conv2/Conv", "Conv", 1),)
    picked = client.weights("digits_cnn", ["head.bias", "conv1.weight"])
    assert [w.name for w in picked] == ["head.bias", "conv1.weight"]


# -- GetAttention ------------------------------------------------------------------------------
def test_attention_rows_sum_to_one_over_the_keys(client: Client) -> None:
    X = TOKENS[:5]
    layer, = client.attention("text_sentiment", X)
    assert layer.layer.probabilities == SOFTMAX and layer.maps.shape == (5, 1, 16, 16)
    np.testing.assert_allclose(layer.maps.sum(axis=-1), 1, atol=1e-6)
    np.testing.assert_array_equal(layer.maps, oracle(TEXT, [SOFTMAX], {"tokens": X})[SOFTMAX])
    mean, = client.attention("text_sentiment", X, reduction="head_mean")
    np.testing.assert_allclose(mean.maps, layer.maps, atol=1e-7)  # one head: its own mean
    words, = client.attention("text_sentiment", "the movie was not good")
    assert words.maps.shape == (1, 1, 16, 16)


# -- Maximize ----------------------------------------------------------------------------------
def logits_at(inputs: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(oracle(CNN, ["logits"], {"image": inputs["image"]})["logits"][0])


def test_maximize_raises_the_logit_within_the_range_deterministically(client: Client) -> None:
    first = client.maximize("digits_cnn", 3, seed=7, steps=40, budget_ms=5000)
    again = client.maximize("digits_cnn", 3, seed=7, steps=40, budget_ms=5000)
    image = first.inputs["image"]
    assert image.shape == (1, 1, 8, 8) and image.dtype == np.float32
    np.testing.assert_array_equal(image, again.inputs["image"])
    assert first.steps == 40 and first.trace.shape == (40,) and not first.cost.budget_exhausted
    assert first.activation > first.start_activation + 2
    assert first.cost.model_evaluations == 42 and first.cost.budget_source == "request"
    low, high = DIGITS.min(), DIGITS.max()  # the background's range
    assert low <= image.min() and image.max() <= high
    assert logits_at(first.inputs)[3] == pytest.approx(first.activation, rel=1e-5)
    start = logits_at({"image": DIGITS.reshape(100, -1).mean(0).reshape(1, 1, 8, 8)})
    assert start[3] == pytest.approx(first.start_activation, rel=1e-5)
    other = client.maximize("digits_cnn", 3, seed=8, steps=40, budget_ms=5000)
    assert not np.array_equal(other.inputs["image"], image)  # the jitter follows the seed


def test_maximize_a_channel_from_a_start_in_a_given_range(client: Client) -> None:
    found = client.maximize("digits_cnn", 5, objective="channel", layer=RELU2,
                            start=DIGITS[3], low=0.0, high=0.5, steps=20, budget_ms=5000,
                            blur_every=-1, jitter=-1)
    image = found.inputs["image"]
    assert image.min() >= 0 and image.max() <= 0.5 and found.steps == 20
    relu2 = client.activations("digits_cnn", image, [RELU2])[RELU2]
    assert relu2.channel_mean is not None
    assert relu2.channel_mean[0, 5] == pytest.approx(found.activation, rel=1e-5)
    assert found.activation > found.start_activation
    assert any("channel 5" in n for n in found.notes)


def test_maximize_keeps_to_the_budget_or_the_deadline(client: Client,
                                                      stub: lpb_grpc.LayersStub) -> None:
    """2,048 steps take far more than 15 ms here (a step is a one-row gradient, ~20 us, and
    the regularisers): a 15 ms budget stops the ascent early; without budget_ms the call's
    deadline sets the budget."""
    short = client.maximize("digits_cnn", 3, budget_ms=15, seed=1, steps=2048)
    assert short.cost.budget_exhausted and 1 <= short.steps < 2048
    assert (short.cost.budget_ms, short.cost.budget_source) == (15, "request")
    timed = client.maximize("digits_cnn", 3, seed=1, steps=8, timeout=2.0)
    assert timed.cost.budget_source == "deadline" and timed.cost.budget_ms < 2000
    default = stub.Maximize(lpb.MaximizeRequest(model="digits_cnn", index=3, steps=8))
    assert default.cost.budget_source == "model_default" and default.cost.budget_ms == 500


def test_maximize_stops_when_cancelled(plane: DataPlane) -> None:
    layers, control = LayerPlane(plane), Control(np.inf)
    threading.Timer(0.2, control.cancel, ("stop",)).start()
    with pytest.raises(Cancelled, match="stop"):
        layers.maximize(MaximizeQuery("digits_cnn", steps=4096, budget_ms=20_000), control)


# -- refusals ----------------------------------------------------------------------------------
def test_refusals_name_the_field(stub: lpb_grpc.LayersStub) -> None:
    image = [from_array("image", DIGITS[:2])]
    cases = [
        (stub.ListLayers, lpb.ListLayersRequest(model="nope"), "NOT_FOUND", "model: no model"),
        (stub.GetActivations, lpb.ActivationsRequest(model="digits_cnn", inputs=image,
                                                     layers=["relu1"]),
         "INVALID_ARGUMENT", f"layers: model 'digits_cnn' has no tensor 'relu1' (8 tensors; "
                             f"did you mean: '{RELU1}'"),
        (stub.GetActivations, lpb.ActivationsRequest(model="digits_cnn", inputs=image,
                                                     layers=["conv1.weight"]),
         "INVALID_ARGUMENT", "it is a weight: see GetWeights"),
        (stub.GetActivations, lpb.ActivationsRequest(
            model="digits_cnn", inputs=[from_array("image", DIGITS[:2, :, :4])],
            layers=[RELU1]), "INVALID_ARGUMENT", "inputs[0].shape: got [2, 1, 4, 8]"),
        (stub.GetActivations, lpb.ActivationsRequest(model="digits_cnn", inputs=image,
                                                     layers=[RELU1], reduction="max"),
         "INVALID_ARGUMENT", "reduction: 'max'"),
        (stub.GetActivations, lpb.ActivationsRequest(model="digits_cnn", inputs=image),
         "INVALID_ARGUMENT", "layers: name at least one tensor"),
        (stub.GetAttention, lpb.AttentionRequest(model="digits_cnn", inputs=image),
         "FAILED_PRECONDITION", "attention: no attention layer found"),
        (stub.GetAttention, lpb.AttentionRequest(model="text_sentiment"), "INVALID_ARGUMENT",
         "inputs: model 'text_sentiment' takes 1 input(s)"),
        (stub.GetWeights, lpb.WeightsRequest(model="digits_cnn", names=["w"]),
         "INVALID_ARGUMENT", "names: no weight 'w'"),
        (stub.Maximize, lpb.MaximizeRequest(model="digits_cnn", index=10), "INVALID_ARGUMENT",
         "index: column 10 outside the 10 column(s) of 'probabilities'"),
        (stub.Maximize, lpb.MaximizeRequest(model="digits_cnn", objective="neuron"),
         "INVALID_ARGUMENT", "objective: 'neuron'"),
        (stub.Maximize, lpb.MaximizeRequest(model="digits_cnn", objective="channel"),
         "INVALID_ARGUMENT", "layer: name at least one tensor"),
        (stub.Maximize, lpb.MaximizeRequest(model="digits_cnn", start=[from_array(
            "image", DIGITS[:1, :, :2])]), "INVALID_ARGUMENT", "start[0].shape: got [1, 1, 2, 8]"),
        (stub.Maximize, lpb.MaximizeRequest(model="digits_cnn", low=1, high=1),
         "INVALID_ARGUMENT", "low, high: need finite low < high"),
        (stub.Maximize, lpb.MaximizeRequest(model="digits_cnn", steps=10**6),
         "INVALID_ARGUMENT", "steps: 1000000"),
        (stub.Maximize, lpb.MaximizeRequest(model="text_sentiment", index=0),
         "FAILED_PRECONDITION", "maximize: the model has no floating-point input"),
        (stub.GetActivations, lpb.ActivationsRequest(model="digits_cnn", inputs=image,
                                                     layers=[RELU1], reduction="top_k", k=-2),
         "INVALID_ARGUMENT", "k: top_k keeps at least one channel, got -2"),
        (stub.GetActivations, lpb.ActivationsRequest(
            model="digits_cnn", inputs=[from_array("image", np.full((1, 1, 8, 8), np.nan))],
            layers=[RELU1]), "INVALID_ARGUMENT", "inputs: non-finite value at row 0"),
        (stub.GetActivations, lpb.ActivationsRequest(model="digits_cnn", inputs=image,
                                                     layers=[f"x{i}" for i in range(300)]),
         "INVALID_ARGUMENT", "layers: 300 tensors; at most 256"),
        (stub.Maximize, lpb.MaximizeRequest(model="digits_cnn", learning_rate=-1),
         "INVALID_ARGUMENT", "learning_rate: -1.0"),
        (stub.Maximize, lpb.MaximizeRequest(model="digits_cnn", budget_ms=-5),
         "INVALID_ARGUMENT", "budget_ms: must be a finite number >= 0"),
    ]
    for fn, request, code, text in cases:
        err = refusal(fn, request)
        assert (err.code().name, text) == (code, text) and text in err.details(), \
            (request, err.details())


def test_undecodable_requests_are_invalid_arguments(channel: grpc.Channel) -> None:
    garbage = b"\xff\xff\xff"
    for call in (lambda: channel.unary_unary("/sidelight.v1.Layers/ListLayers")(
                     garbage, timeout=10),
                 lambda: list(channel.unary_stream("/sidelight.v1.Layers/GetActivations")(
                     garbage, timeout=10))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "could not be decoded as sidelight.v1." in info.value.details()


def test_the_service_is_in_health_and_reflection_and_needs_a_token(
        channel: grpc.Channel, tmp_path: Path) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="sidelight.v1.Layers"),
                        timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    tokens = tmp_path / "tokens"
    tokens.write_text(f"reader explain {TOKEN}\n")
    app = start(settings_for(one_model_repo(tmp_path / "repo"), tokens_path=tokens,
                             metrics_port=-1, drift_enabled=False))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as locked:
            stub = lpb_grpc.LayersStub(locked)
            listing = lpb.ListLayersRequest(model="diabetes_linear")
            assert code_of(stub.ListLayers, listing) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(stub.ListLayers, listing, metadata=(
                ("authorization", f"Bearer {TOKEN}"),)) == grpc.StatusCode.OK
            err = refusal(stub.GetActivations, lpb.ActivationsRequest(model="diabetes_linear"))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        app.stop(grace=0)


def test_calls_are_counted_and_refused_while_draining(plane: DataPlane) -> None:
    layers = LayerPlane(plane)
    layers.list_layers("digits_cnn")
    with pytest.raises(Exception, match="no model"):
        layers.weights("nope")
    plane.metrics.recorder.fold()
    count = plane.metrics.registry.get_sample_value
    assert count("sidelight_explain_requests_total",
                 {"model": "digits_cnn", "method": "layers.list", "code": "OK"}) == 1
    assert count("sidelight_explain_requests_total",
                 {"model": UNKNOWN, "method": "layers.weights", "code": "NOT_FOUND"}) == 1
    drained = DataPlane(plane.repo, plane.store, plane.settings, Metrics(CollectorRegistry()))
    drained.drain()
    with pytest.raises(Unavailable, match="stopping"):
        LayerPlane(drained).list_layers("digits_cnn")


def test_the_layers_command(app: Sidelight, capsys: pytest.CaptureFixture[str]) -> None:
    address = f"--address=127.0.0.1:{app.port}"
    main(["layers", "--model", "digits_cnn", address])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "/conv1/Conv_output_0  Conv  [1, 8, 8, 8]  FP32"
    assert out[-1] == f"gradcam layer: {RELU2}" and out[-2].startswith("attention: no")
    main(["layers", "--model", "digits_cnn", "--weights", address])
    assert capsys.readouterr().out.startswith("conv1.weight  [8, 1, 3, 3] FP32  mean ")

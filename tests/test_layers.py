"""Inspecting the network (explainers/layers): the tensor list against the shapes onnxruntime
produces, activations against a numpy convolution, weight statistics against numpy (Identity
aliases, Constant nodes and DequantizeLinear weights included), attention maps against
softmax(Q K^T / scale + mask) computed from the graph's own Q and K (the unfused pattern, a
rank-3 head and the opset-23 Attention op), the refusals, and activation maximisation on the
bundled digits CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from explainers.base import Array, Budget
from explainers.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from explainers.layers.activations import activations
from explainers.layers.attention import AttentionProbe, find, wire
from explainers.layers.graph import Exposed, tensors
from explainers.layers.maximize import (
    Found,
    Objective,
    Settings,
    gradient_model,
    input_range,
    maximize,
)
from explainers.layers.weights import BINS, weights
from tests import gradient_models as models

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
CNN, TEXT = MODELS / "digits_cnn", MODELS / "text_sentiment"
RELU1 = "/relu1/Relu_output_0"
SOFTMAX = "/attention/softmax/Softmax_output_0"


def digits() -> tuple[onnx.ModelProto, Array]:
    """The bundled CNN and its background images (100, 1, 8, 8) float32."""
    return onnx.load(CNN / "1" / "model.onnx"), np.load(CNN / "background.npy").astype(
        np.float32)


def text() -> tuple[onnx.ModelProto, Array]:
    """The bundled attention model and its background token rows (32, 16) int64."""
    return onnx.load(TEXT / "1" / "model.onnx"), np.load(TEXT / "background.npy").astype(
        np.int64)


def softmax(scores: Array) -> Array:
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def initializer(model: onnx.ModelProto, name: str) -> Array:
    return np.asarray(next(numpy_helper.to_array(i) for i in model.graph.initializer
                           if i.name == name))


# -- the tensor list -------------------------------------------------------------------------
def test_tensors_list_every_node_output_with_the_shapes_onnxruntime_produces() -> None:
    """Static shapes at batch 1 times the batch along the batch axis equal the shapes of an
    onnxruntime run at batch 3; Constant outputs are not listed."""
    model, tokens = text()
    listed = tensors(model)
    outputs = [o for n in model.graph.node if n.op_type != "Constant" for o in n.output]
    assert [t.name for t in listed] == outputs
    got = Exposed(model, outputs, listed).run({"tokens": tokens[:3]})
    for t in listed:
        assert t.shape is not None and t.batch_axis == 0, t
        assert got[t.name].shape == (3, *t.shape[1:]), t
        assert got[t.name].dtype.name == t.dtype
    softmax_info = next(t for t in listed if t.name == SOFTMAX)
    assert (softmax_info.op_type, softmax_info.node) == ("Softmax", "/attention/softmax/Softmax")


def test_unknown_tensor_names_the_field_and_points_at_the_list() -> None:
    model, _ = digits()
    with pytest.raises(InvalidArgument, match=r"layers: no tensor 'foo'; see ListLayers"):
        Exposed(model, [RELU1, "foo"])
    with pytest.raises(InvalidArgument, match=r"layers: no tensor 'conv1\.weight'"):
        Exposed(model, ["conv1.weight"])  # an initializer, not a node output


# -- activations -----------------------------------------------------------------------------
def conv_relu(images: Array, kernel: Array, bias: Array) -> Array:
    """relu(conv 3x3, pad 1) in numpy: (rows, 1, H, W) -> (rows, channels, H, W)."""
    padded = np.pad(images.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = sliding_window_view(padded, (3, 3), axis=(2, 3))  # (rows, 1, H, W, 3, 3)
    out = np.einsum("nkijab,ckab->ncij", windows, kernel) + bias[None, :, None, None]
    return np.maximum(out, 0)


def test_activations_equal_a_numpy_convolution_with_statistics_and_reductions() -> None:
    model, images = digits()
    X = images[:5]
    expected = conv_relu(X, initializer(model, "conv1.weight"), initializer(model, "conv1.bias"))
    exposed = Exposed(model, [RELU1, "logits"])
    whole, logits = activations(exposed, {"image": X})
    np.testing.assert_allclose(whole.values, expected, atol=1e-5)
    assert whole.per_row and whole.shape == (5, 8, 8, 8) and logits.values.shape == (5, 10)
    flat = expected.reshape(5, -1)
    np.testing.assert_allclose(whole.summary.mean, flat.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(whole.summary.std, flat.std(axis=1), atol=1e-6)
    np.testing.assert_allclose(whole.summary.max, flat.max(axis=1), atol=1e-5)
    np.testing.assert_allclose(whole.summary.zeros, (flat == 0).mean(axis=1))
    assert whole.summary.zeros.min() > 0  # the ReLU zeroes some values
    per_channel = expected.mean(axis=(2, 3))  # (rows, channels)
    assert whole.summary.channel_mean is not None and logits.summary.channel_mean is None
    np.testing.assert_allclose(whole.summary.channel_mean, per_channel, atol=1e-6)
    mean, = activations(Exposed(model, [RELU1]), {"image": X}, "channel_mean")
    np.testing.assert_allclose(mean.values, expected.mean(axis=1), atol=1e-6)
    top, = activations(Exposed(model, [RELU1]), {"image": X}, "top_k", k=3)
    assert top.channels is not None
    np.testing.assert_array_equal(top.channels, np.argsort(-per_channel, axis=1)[:, :3])
    np.testing.assert_allclose(top.values, np.take_along_axis(
        expected, top.channels[:, :, None, None], axis=1), atol=1e-5)


def test_activation_size_limits_refuse_naming_the_limit_and_reductions_fit() -> None:
    model, images = digits()
    exposed = Exposed(model, [RELU1])  # 2 KiB per row in float32
    feeds = {"image": images[:10]}
    with pytest.raises(ResourceExhausted, match=r"10000-byte limit on an answer.*channel_mean"):
        activations(exposed, feeds, max_bytes=10_000)
    mean, = activations(exposed, feeds, "channel_mean", max_bytes=10_000)
    assert mean.values.nbytes == 10 * 64 * 4
    with pytest.raises(ResourceExhausted, match="15000-byte limit on computed tensors"):
        activations(exposed, feeds, "channel_mean", max_run_bytes=15_000)
    with pytest.raises(InvalidArgument, match="reduction: 'mean'"):
        activations(exposed, feeds, "mean")


# -- weights ---------------------------------------------------------------------------------
def check_stats(stats: object, values: Array) -> None:
    """Every statistic equals numpy's on the values."""
    x = values.astype(np.float64).reshape(-1)
    counts, edges = np.histogram(x, bins=BINS)
    assert getattr(stats, "shape") == values.shape  # noqa: B009
    np.testing.assert_allclose([getattr(stats, k) for k in ("mean", "std", "l2", "abs_max",
                                                            "zeros")],
                               [x.mean(), x.std(), np.linalg.norm(x), np.abs(x).max(),
                                np.mean(x == 0)], rtol=1e-12)
    histogram = getattr(stats, "histogram")  # noqa: B009
    np.testing.assert_array_equal(histogram.counts, counts)
    np.testing.assert_allclose(histogram.edges, edges, rtol=1e-12)


def test_weight_statistics_equal_numpy_on_the_initializers() -> None:
    model, _ = digits()
    found = {w.name: w for w in weights(model)}
    assert list(found) == [i.name for i in model.graph.initializer]
    for init in model.graph.initializer:
        check_stats(found[init.name], numpy_helper.to_array(init))
    assert [(u.node, u.op_type, u.slot) for u in found["conv2.weight"].uses] == \
        [("/conv2/Conv", "Conv", 1)]


def quantised_model() -> tuple[onnx.ModelProto, dict[str, Array]]:
    """x (N, 4) -> Gemm(x, Identity(Identity(w1))) -> MatMul by a per-axis DequantizeLinear
    weight (int8, axis 1) -> Mul by a Constant node -> y (N, 3); returns the weights too."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(5, 4)).astype(np.float32)
    q = rng.integers(-128, 128, size=(5, 3)).astype(np.int8)
    q[0, 0] = 7  # its zero point: one dequantised zero
    scale = np.array([0.02, 0.05, 0.1], np.float32)
    zero = np.array([7, -3, 0], np.int8)
    gain = np.array([1.5, -2.0, 0.0], np.float32)
    nodes = [helper.make_node("Identity", ["w1"], ["w1_alias"]),
             helper.make_node("Identity", ["w1_alias"], ["w1_alias2"]),
             helper.make_node("Gemm", ["x", "w1_alias2"], ["h"], transB=1, name="gemm"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["w2"], axis=1,
                              name="dq"),
             helper.make_node("MatMul", ["h", "w2"], ["m"], name="matmul"),
             helper.make_node("Constant", [], ["gain"], name="const",
                              value=numpy_helper.from_array(gain)),
             helper.make_node("Mul", ["m", "gain"], ["y"], name="mul")]
    graph = helper.make_graph(
        nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(q, "q"),
         numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zero, "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, {"w1": w1, "q": q, "gain": gain}


def test_weights_behind_identity_constant_and_dequantize_linear() -> None:
    """The Identity chain resolves to w1; the quantised weight's statistics are those of the
    values onnxruntime's DequantizeLinear computes; its scale and zero point are no weights."""
    model, given = quantised_model()
    found = {w.name: w for w in weights(model)}
    assert list(found) == ["w1", "q", "gain"]
    check_stats(found["w1"], given["w1"])
    assert found["w1"].aliases == ("w1_alias", "w1_alias2")
    assert [(u.node, u.slot) for u in found["w1"].uses] == [("gemm", 1)]
    dequantised, = Exposed(model, ["w2"]).run({"x": np.zeros((1, 4), np.float32)}).values()
    check_stats(found["q"], dequantised)
    assert (found["q"].source, found["q"].dtype, found["q"].aliases) == \
        ("DequantizeLinear", "int8", ("w2",))
    assert [(u.node, u.op_type) for u in found["q"].uses] == [("matmul", "MatMul")]
    assert found["q"].zeros > 0
    check_stats(found["gain"], given["gain"])
    assert found["gain"].source == "Constant" and found["gain"].zeros == pytest.approx(1 / 3)


@pytest.mark.parametrize("scale, zero, attrs", [
    (np.float32(0.1), np.int8(3), {}),  # per tensor
    (np.array([0.1, 0.2, 0.3, 0.4], np.float32), np.array([1, 2, 3, 4], np.int8), {"axis": 0}),
    (np.linspace(0.1, 1.2, 12, dtype=np.float32).reshape(4, 3),
     np.arange(-6, 6, dtype=np.int8).reshape(4, 3), {"axis": 1, "block_size": 2})])
def test_dequantised_weights_equal_onnxruntimes_per_tensor_axis_and_block(
        scale: Array, zero: Array, attrs: dict[str, int]) -> None:
    q = np.random.default_rng(0).integers(-128, 128, size=(4, 6)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], **attrs),
             helper.make_node("Add", ["x", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.asarray(scale), "s"),
         numpy_helper.from_array(np.asarray(zero), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    found, = weights(model)
    check_stats(found, Exposed(model, ["w"]).run({"x": np.zeros((4, 6), np.float32)})["w"])


# -- attention -------------------------------------------------------------------------------
def test_bundled_attention_maps_sum_to_one_and_match_the_graphs_own_q_and_k() -> None:
    """softmax(Q K^T / sqrt(16) + mask) from the exposed MatMul operands, the mask -1e9 on
    padding tokens (id 0) as the export builds it."""
    model, tokens = text()
    probe = AttentionProbe(model)
    layer, = probe.layers
    assert (layer.probabilities, layer.scores, layer.context) == \
        (SOFTMAX, "/attention/MatMul", "/attention/MatMul_1")
    X = tokens[:6]
    maps = probe.run({"tokens": X}).stacked()  # (rows, layers, heads, queries, keys)
    assert maps.shape == (6, 1, 1, 16, 16)
    np.testing.assert_allclose(maps.sum(axis=-1), 1, atol=1e-6)
    qk = Exposed(model, [layer.query, layer.key]).run({"tokens": X})
    mask = np.where(X == 0, -1e9, 0.0)[:, None, None, :]  # (rows, 1, 1, keys)
    scores = qk[layer.query].astype(np.float64) @ qk[layer.key] / 4 + mask
    np.testing.assert_allclose(maps[:, 0], softmax(scores), atol=1e-6)
    assert np.abs(maps[0, 0, 0][:, X[0] == 0]).max() < 1e-6  # padding gets no attention
    mean = probe.run({"tokens": X}, "head_mean").stacked()
    np.testing.assert_allclose(mean, maps, atol=1e-7)  # one head: its own mean


def test_a_rank_three_attention_is_one_head() -> None:
    model = models.text(length=6, width=8)
    probe = AttentionProbe(model)
    tokens = np.random.default_rng(0).integers(0, 20, size=(4, 6))
    maps, = probe.run({"tokens": tokens}).probabilities
    qk = Exposed(model, ["q", "kt"]).run({"tokens": tokens})
    np.testing.assert_allclose(maps[:, 0], softmax(qk["q"] @ qk["kt"] / np.sqrt(8)), atol=1e-6)


def attention_op_model(heads: int = 2, length: int = 5, width: int = 8,
                       qk_output: bool = False) -> onnx.ModelProto:
    """x (N, length, width) -> MatMuls -> opset-23 Attention (3-D Q/K/V, `heads` heads, an
    additive float mask) -> y; with `qk_output`, the raw Q K^T (mode 0) is a model output."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.normal(size=(width, width)) / np.sqrt(width))
                                     .astype(np.float32), n) for n in ("wq", "wk", "wv")]
    mask = np.triu(np.full((length, length), -1e4, np.float32), k=1)  # causal, additive
    inits.append(numpy_helper.from_array(mask, "mask"))
    outputs = ["y", "", "", "raw"] if qk_output else ["y"]
    nodes = [*(helper.make_node("MatMul", ["x", w], [n]) for w, n in
               (("wq", "q"), ("wk", "k"), ("wv", "v"))),
             helper.make_node("Attention", ["q", "k", "v", "mask"], outputs, name="attn",
                              q_num_heads=heads, kv_num_heads=heads)]
    values = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", length, width])]
    if qk_output:
        values.append(helper.make_tensor_value_info("raw", TensorProto.FLOAT,
                                                    ["N", heads, length, length]))
    graph = helper.make_graph(nodes, "a", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", length, width])], values, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 11
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("qk_output", [False, True])
def test_the_attention_op_gives_its_probabilities(qk_output: bool) -> None:
    """The op's mode-3 output equals softmax(Q K^T / sqrt(head size) + mask) per head from
    the exposed Q and K; when the model reads its 4th output in mode 0, that output is left
    as it was and a second op supplies the probabilities."""
    model = attention_op_model(qk_output=qk_output)
    probe = AttentionProbe(model)
    layer, = probe.layers
    assert layer.kind == "Attention" and layer.node == "attn"
    X = np.random.default_rng(6).normal(size=(3, 5, 8)).astype(np.float32)
    maps = probe.run({"x": X}).stacked()[:, 0]  # (rows, heads, queries, keys)
    split = {n: a.reshape(3, 5, 2, 4).transpose(0, 2, 1, 3)  # (rows, heads, tokens, 4)
             for n, a in Exposed(model, ["q", "k"]).run({"x": X}).items()}
    scores = split["q"].astype(np.float64) @ split["k"].transpose(0, 1, 3, 2) / 2
    mask = initializer(model, "mask")
    np.testing.assert_allclose(maps, softmax(scores + mask), atol=1e-6)
    np.testing.assert_allclose(maps.sum(axis=-1), 1, atol=1e-6)
    if qk_output:
        raw, = Exposed(wire(model, probe.layers), ["raw"]).run({"x": X}).values()
        np.testing.assert_allclose(raw, scores, atol=1e-5)  # still mode 0: scaled Q K^T


def test_fused_attention_and_models_without_attention_are_refused_clearly() -> None:
    model = attention_op_model()
    model.graph.node[3].domain = "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(FailedPrecondition, match=r"'attn' is com\.microsoft\.Attention, a "
                                                 r"fused contrib op that hides the attention"):
        find(model)
    with pytest.raises(FailedPrecondition, match="no attention layer found"):
        AttentionProbe(digits()[0])


# -- activation maximisation -----------------------------------------------------------------
def test_activation_maximisation_raises_the_logit_deterministically() -> None:
    model, images = digits()
    feeds = models.feeds_for("image", (1, 8, 8), np.float32)
    objective = Objective("logit", "probabilities", 3)
    gm = gradient_model(model, feeds, 64, objective)
    low, high = input_range(images)
    start = images[0].reshape(-1).astype(np.float64)

    def run(seed: int) -> Found:
        return maximize(gm, objective, start, low, high, Budget(np.inf),
                        np.random.default_rng(seed), Settings(steps=40))
    found, again = run(0), run(0)
    assert found.steps == 40 and not found.budget_exhausted
    assert found.activation > found.start_activation + 2
    np.testing.assert_array_equal(found.input, again.input)
    assert found.input.min() >= low and found.input.max() <= high
    logit = Exposed(model, ["logits"]).run(feeds(found.input[None]))["logits"]
    assert logit[0, 3] == pytest.approx(found.activation, rel=1e-5)


def test_channel_maximisation_and_the_budget() -> None:
    """The channel objective equals the channel's mean read from the activations, rises, and
    an evaluation cap stops the ascent early; token models are refused."""
    model, images = digits()
    feeds = models.feeds_for("image", (1, 8, 8), np.float32)
    objective = Objective("channel", "/relu2/Relu_output_0", 5)
    gm = gradient_model(model, feeds, 64, objective)
    start = images[1].reshape(-1).astype(np.float64)
    found = maximize(gm, objective, start, 0.0, 1.0, Budget(np.inf, max_evaluations=12),
                     np.random.default_rng(1))
    assert found.budget_exhausted and found.steps == 10  # 1 + 10 + 1 evaluations
    assert found.activation > found.start_activation
    act, = activations(Exposed(model, ["/relu2/Relu_output_0"]), feeds(found.input[None]))
    assert act.summary.channel_mean is not None
    assert act.summary.channel_mean[0, 5] == pytest.approx(found.activation, rel=1e-5)
    with pytest.raises(InvalidArgument, match="channel: 16 outside the 16 channels"):
        gradient_model(model, feeds, 64, Objective("channel", "/relu2/Relu_output_0", 16))
    with pytest.raises(FailedPrecondition, match="no floating-point input"):
        gradient_model(text()[0], models.feeds_for("tokens", (16,), np.int64), 16,
                       Objective("logit", "probabilities", 1))

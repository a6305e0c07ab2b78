"""Small ONNX networks built with onnx.helper for the gradient tests and benchmarks: an MLP, a
CNN (Conv, Relu, MaxPool, Flatten, Gemm, Softmax), a text model (embedding Gather, one
attention head, ReduceMean, Gemm, Softmax) and an affine model, with random weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Array = np.ndarray
OPSET = 17
ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
        np.dtype(np.int64): TensorProto.INT64}


def feeds_for(name: str, shape: Sequence[int], dtype: type) -> Callable[[Array], dict[str, Array]]:
    """Flat rows -> the one input's feed, as service.models.inputs.Layout.feeds does."""
    def feeds(X: Array) -> dict[str, Array]:
        return {name: X.reshape(X.shape[0], *shape).astype(dtype)}
    return feeds


def _init(name: str, value: Array, dtype: type) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto],
           opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp(features: int = 6, hidden: int = 8, classes: int = 3, dtype: type = np.float64,
        activation: str = "Relu", softmax: bool = True, seed: int = 0) -> onnx.ModelProto:
    """Gemm, activation, Gemm, activation, Gemm (+ Softmax): logits -> probabilities."""
    rng = np.random.default_rng(seed)
    e = ELEM[np.dtype(dtype)]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
             helper.make_node(activation, ["h1"], ["a1"]),
             helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], transB=1),
             helper.make_node(activation, ["h2"], ["a2"]),
             helper.make_node("Gemm", ["a2", "w3", "b3"], ["logits"], transB=1)]
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
        out = "probabilities"
    inits = [_init("w1", rng.normal(size=(hidden, features)), dtype),
             _init("b1", rng.normal(size=hidden) * 0.5, dtype),
             _init("w2", rng.normal(size=(hidden, hidden)) / np.sqrt(hidden), dtype),
             _init("b2", rng.normal(size=hidden) * 0.5, dtype),
             _init("w3", rng.normal(size=(classes, hidden)), dtype),
             _init("b3", rng.normal(size=classes), dtype)]
    return _model(nodes, [helper.make_tensor_value_info("x", e, ["N", features])],
                  [helper.make_tensor_value_info(out, e, ["N", classes])], inits)


def affine(features: int = 5, seed: int = 0) -> tuple[onnx.ModelProto, Array, Array]:
    """y = x w + c in float64 (one output); returns the model, w (features,) and c."""
    rng = np.random.default_rng(seed)
    w, c = rng.normal(size=features), rng.normal()
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.DOUBLE,
                                                         ["N", features])],
                   [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 1])],
                   [_init("w", w[None], np.float64), _init("c", [c], np.float64)])
    return model, w, np.array([c])


def cnn(side: int = 8, channels: int = 4, classes: int = 3, dtype: type = np.float32,
        seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    """Conv 3x3 (pad 1), Relu, Conv 3x3 (pad 1), Relu, MaxPool 2x2, Flatten, Gemm, Softmax
    over a (N, 1, side, side) image."""
    rng = np.random.default_rng(seed)
    e = ELEM[np.dtype(dtype)]
    flat = channels * (side // 2) ** 2
    nodes = [helper.make_node("Conv", ["image", "k1", "c1"], ["conv1"], pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3]),
             helper.make_node("Relu", ["conv1"], ["relu1"]),
             helper.make_node("Conv", ["relu1", "k2", "c2"], ["conv2"], pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3]),
             helper.make_node("Relu", ["conv2"], ["relu2"]),
             helper.make_node("MaxPool", ["relu2"], ["pool"], kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    inits = [_init("k1", rng.normal(size=(channels, 1, 3, 3)) / 3, dtype),
             _init("c1", rng.normal(size=channels) * 0.1, dtype),
             _init("k2", rng.normal(size=(channels, channels, 3, 3)) / (3 * np.sqrt(channels)),
                   dtype),
             _init("c2", rng.normal(size=channels) * 0.1, dtype),
             _init("w", rng.normal(size=(classes, flat)) / np.sqrt(flat), dtype),
             _init("b", rng.normal(size=classes) * 0.1, dtype)]
    return _model(nodes, [helper.make_tensor_value_info("image", e, ["N", 1, side, side])],
                  [helper.make_tensor_value_info("probabilities", e, ["N", classes])], inits,
                  opset)


def text(vocabulary: int = 20, length: int = 6, width: int = 8, classes: int = 2,
         dtype: type = np.float32, seed: int = 0) -> onnx.ModelProto:
    """tokens (N, length) int64 -> Gather embedding (N, length, width) -> one attention head
    (Q K^T / sqrt(width), Softmax, times V) -> ReduceMean over positions -> Gemm -> Softmax."""
    rng = np.random.default_rng(seed)
    e = ELEM[np.dtype(dtype)]
    nodes = [helper.make_node("Gather", ["table", "tokens"], ["embedded"]),
             helper.make_node("MatMul", ["embedded", "wq"], ["q"]),
             helper.make_node("MatMul", ["embedded", "wk"], ["k"]),
             helper.make_node("MatMul", ["embedded", "wv"], ["v"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Div", ["scores", "scale"], ["scaled"]),
             helper.make_node("Softmax", ["scaled"], ["attention"], axis=-1),
             helper.make_node("MatMul", ["attention", "v"], ["context"]),
             helper.make_node("ReduceMean", ["context"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("Gemm", ["pooled", "w", "b"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    inits = [_init("table", rng.normal(size=(vocabulary, width)), dtype),
             _init("wq", rng.normal(size=(width, width)) / np.sqrt(width), dtype),
             _init("wk", rng.normal(size=(width, width)) / np.sqrt(width), dtype),
             _init("wv", rng.normal(size=(width, width)) / np.sqrt(width), dtype),
             _init("scale", [np.sqrt(width)], dtype),
             _init("w", rng.normal(size=(classes, width)), dtype),
             _init("b", rng.normal(size=classes) * 0.1, dtype)]
    return _model(nodes, [helper.make_tensor_value_info("tokens", TensorProto.INT64,
                                                        ["N", length])],
                  [helper.make_tensor_value_info("probabilities", e, ["N", classes])], inits)

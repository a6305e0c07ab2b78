"""The gradient backend against central finite differences of plain onnxruntime sessions, on
an MLP, a CNN (at an old opset, so the upgrade runs), a text model's embeddings and a layer;
the logit scale; the finite-difference fallback and the refusal beyond it; the cache."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from explainers.base import Array
from explainers.errors import FailedPrecondition, InvalidArgument
from explainers.gradients import backend
from explainers.gradients.backend import ENGINE_AD, ENGINE_FD, GradientCache, GradientModel
from tests import gradient_models as models


def ort_function(model: onnx.ModelProto, tensor: str,
                 feeds: Callable[[Array], dict[str, Array]]) -> Callable[[Array], Array]:
    """f(X) = `tensor` (rows, -1) float64 from a plain session of the model, the tensor made a
    graph output when it is an intermediate: independent of the backend's graph surgery."""
    copy = onnx.shape_inference.infer_shapes(model)
    if tensor not in {o.name for o in copy.graph.output}:
        copy.graph.output.extend(v for v in copy.graph.value_info if v.name == tensor)
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])

    def f(X: Array) -> Array:
        out = session.run([tensor], feeds(X))[0]
        return np.asarray(out, np.float64).reshape(X.shape[0], -1)
    return f


def central(f: Callable[[Array], Array], X: Array, h: float) -> Array:
    """(rows, outputs, elements) central differences of f at X."""
    cols = []
    for j in range(X.shape[1]):
        up, down = X.copy(), X.copy()
        up[:, j] += h
        down[:, j] -= h
        cols.append((f(up) - f(down)) / (2 * h))
    return np.stack(cols, axis=2)


def test_mlp_gradients_equal_central_differences_on_both_scales() -> None:
    """float64 MLP: every row of 40 (a pinned batch of 32 plus a padded one) and two columns,
    on the logit (default for a Softmax output) and the probability scale."""
    model, feeds = models.mlp(), models.feeds_for("x", (6,), np.float64)
    X = np.random.default_rng(1).normal(size=(40, 6))  # continuous: no ReLU ties
    for scale, tensor in (("auto", "logits"), ("identity", "probabilities")):
        gm = GradientModel.build(model, feeds, 6, "probabilities", [0, 2], scale)
        values, grads = gm.value_and_grad(X)
        f = ort_function(model, tensor, feeds)
        np.testing.assert_allclose(values, f(X)[:, [0, 2]], rtol=1e-12)
        np.testing.assert_allclose(grads, central(f, X, 1e-6)[:, [0, 2]], atol=1e-6)
        assert gm.engine == ENGINE_AD and gm.target.scale == ("logit" if scale == "auto"
                                                               else "identity")
    assert "logit scale" in GradientModel.build(model, feeds, 6, "probabilities", [0]).notes[0]


def test_cnn_gradients_equal_central_differences_after_the_opset_upgrade() -> None:
    """float32 CNN saved at opset 11 (Softmax and MaxPool below onnx-ad's rules): upgraded,
    batch pinned, and equal to float32 central differences on jittered images."""
    model, feeds = models.cnn(opset=11), models.feeds_for("image", (1, 8, 8), np.float32)
    gm = GradientModel.build(model, feeds, 64, "probabilities", [0, 1, 2])
    X = np.random.default_rng(2).normal(size=(3, 64))
    _, grads = gm.value_and_grad(X)
    expected = central(ort_function(model, "logits", feeds), X, 1e-3)
    assert np.abs(grads - expected).max() <= 2e-3 * np.abs(expected).max()
    assert gm.engine == ENGINE_AD and gm.build_seconds > 0


def test_text_gradients_are_taken_at_the_embeddings() -> None:
    """The embedding lookup is cut out as an input: the cut graph gives the model's own
    logits, and its gradients equal central differences in embedding space."""
    model, feeds = models.text(dtype=np.float64), models.feeds_for("tokens", (6,), np.int64)
    gm = GradientModel.build(model, feeds, 6, "probabilities", [0, 1])
    X = np.random.default_rng(3).integers(0, 20, size=(4, 6)).astype(np.float64)
    P = gm.point(X)  # (rows, positions * width)
    assert [v.kind for v in gm.variables] == ["embedding"] and P.shape == (4, 48)
    np.testing.assert_allclose(gm.value(X), ort_function(model, "logits", feeds)(X)[:, :2],
                               rtol=1e-12)
    _, grads = gm.value_and_grad(X, P)
    expected = central(lambda Q: gm.value(X, Q), P, 1e-6)
    np.testing.assert_allclose(grads, expected, atol=1e-7)
    per_token = gm.to_elements(grads[0])  # (columns, positions)
    np.testing.assert_allclose(per_token, grads[0].reshape(2, 6, 8).sum(axis=2))


def test_layer_activation_and_gradient() -> None:
    """A named layer: its activation equals a plain session's, its gradient equals central
    differences with the layer fed. (conv2, before the ReLU: after it, the zeros tie in
    MaxPool windows, where central differences are not a derivative.)"""
    model, feeds = models.cnn(), models.feeds_for("image", (1, 8, 8), np.float32)
    gm = GradientModel.build(model, feeds, 64, "probabilities", [1], layer="conv2")
    X = np.random.default_rng(4).normal(size=(2, 64))
    A, G = gm.layer_and_grad(X)
    assert A.shape == (2, 4, 8, 8) and G.shape == (2, 1, 4, 8, 8)
    np.testing.assert_allclose(A.reshape(2, -1), ort_function(model, "conv2", feeds)(X))
    expected = central(lambda Q: gm.value(X, Q), A.reshape(2, -1), 1e-3)
    assert np.abs(G.reshape(2, 1, -1) - expected).max() <= 2e-3 * np.abs(expected).max()
    with pytest.raises(InvalidArgument, match="no intermediate tensor 'nope'"):
        GradientModel.build(model, feeds, 64, "probabilities", [1], layer="nope")


def _fused_gemm() -> tuple[onnx.ModelProto, Array, Array]:
    """y = sum(relu(x W^T + b)) through com.microsoft.FusedGemm, which onnx-ad refuses."""
    rng = np.random.default_rng(5)
    W, b = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    nodes = [helper.make_node("FusedGemm", ["x", "w", "b"], ["h"], domain="com.microsoft",
                              transB=1, activation="Relu"),
             helper.make_node("ReduceSum", ["h", "axes"], ["y"], keepdims=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(b, "b"),
         numpy_helper.from_array(np.array([1]), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return model, W, b


def test_refused_graph_falls_back_to_finite_differences() -> None:
    """A com.microsoft op on the path: finite differences, equal to the analytic gradient."""
    model, W, b = _fused_gemm()
    gm = GradientModel.build(model, models.feeds_for("x", (6,), np.float32), 6, "y", [0])
    assert gm.engine == ENGINE_FD and "com.microsoft.FusedGemm" in " ".join(gm.notes)
    X = np.random.default_rng(6).normal(size=(3, 6))
    _, grads = gm.value_and_grad(X)
    analytic = ((X @ W.T + b) > 0) @ W  # (rows, features)
    np.testing.assert_allclose(grads[:, 0], analytic, atol=2e-4)


def test_op_onnx_ad_refuses_falls_back_and_beyond_the_cap_fails_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A strided Slice (no reverse rule in onnx-ad): finite differences in float64 (in blocks
    of 2 elements here), exact for y = sum(x[::2]^2); with more elements than the fallback's
    cap, FAILED_PRECONDITION naming the op."""
    monkeypatch.setattr(backend, "FD_CHUNK", 4)
    ints = {"s": [0], "e": [6], "a": [1], "st": [2], "ax": [1]}
    nodes = [helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["r"]),
             helper.make_node("Mul", ["r", "r"], ["q"]),
             helper.make_node("ReduceSum", ["q", "ax"], ["y"], keepdims=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 1])],
        [numpy_helper.from_array(np.array(v), k) for k, v in ints.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = models.feeds_for("x", (6,), np.float64)
    gm = GradientModel.build(model, feeds, 6, "y", [0])
    X = np.random.default_rng(7).normal(size=(2, 6))
    np.testing.assert_allclose(gm.value_and_grad(X)[1][:, 0],
                               np.where(np.arange(6) % 2 == 0, 2 * X, 0), atol=1e-8)
    monkeypatch.setattr(backend, "FD_MAX_ELEMENTS", 4)
    with pytest.raises(FailedPrecondition, match="Slice with a step other than 1"):
        GradientModel.build(model, feeds, 6, "y", [0])
    with pytest.raises(FailedPrecondition, match=r"com\.microsoft\.FusedGemm"):
        GradientModel.build(_fused_gemm()[0], models.feeds_for("x", (6,), np.float32), 6,
                            "y", [0])


def test_scale_and_target_are_checked() -> None:
    """logit needs a final Softmax/Sigmoid (found through Identity/Cast); bad columns and
    outputs are INVALID_ARGUMENT."""
    model = models.affine()[0]
    feeds = models.feeds_for("x", (5,), np.float64)
    with pytest.raises(FailedPrecondition, match="no logit scale"):
        GradientModel.build(model, feeds, 5, "y", [0], scale="logit")
    assert GradientModel.build(model, feeds, 5, "y", [0]).target.scale == "identity"
    with pytest.raises(InvalidArgument, match="output_columns"):
        GradientModel.build(model, feeds, 5, "y", [1])
    with pytest.raises(InvalidArgument, match="no output 'z'"):
        GradientModel.build(model, feeds, 5, "z", [0])
    sig = models.mlp(classes=1, softmax=False)
    sig.graph.node.extend([helper.make_node("Sigmoid", ["logits"], ["p64"]),
                           helper.make_node("Cast", ["p64"], ["p"], to=TensorProto.FLOAT)])
    sig.graph.output[0].CopyFrom(helper.make_tensor_value_info("p", TensorProto.FLOAT,
                                                               ["N", 1]))
    gm = GradientModel.build(sig, models.feeds_for("x", (6,), np.float64), 6, "p", [0])
    assert gm.target.tensor == "logits" and "Sigmoid" in gm.notes[0]


def test_cache_builds_once_per_key_and_reports_build_time() -> None:
    model, feeds = models.cnn(), models.feeds_for("image", (1, 8, 8), np.float32)
    cache = GradientCache()
    first = cache.get("sha", model, feeds, 64, "probabilities", [0])
    assert cache.get("sha", model, feeds, 64, "probabilities", [0]) is first
    assert cache.get("sha", model, feeds, 64, "probabilities", [1]) is not first
    before = first.build_seconds
    first.warm()  # builds the batch-32 adjoint too
    assert first.build_seconds > before > 0
    small = GradientCache(max_bytes=1)
    small.get("a", model, feeds, 64, "probabilities", [0])
    small.get("b", model, feeds, 64, "probabilities", [0])
    assert len(small._items) == 1

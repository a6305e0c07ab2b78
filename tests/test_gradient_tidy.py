"""tidy's rewrites of onnx-ad's adjoints against onnx-ad's own graph (the same numbers) and
against central finite differences: the MaxPool rewrite with ties, the ConvTranspose -> Conv
rewrite, several explained columns at once, and the seed-axis clean-ups."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks._models import ROOT
from benchmarks.gradients import resnet
from explainers.base import Array
from explainers.gradients import backend, graphs, tidy
from explainers.gradients.backend import GradientModel
from tests import gradient_models as models
from tests.test_gradients import central


def untidied(monkeypatch: pytest.MonkeyPatch) -> None:
    """GradientModels built from now on run onnx-ad's graph as it comes (until undo)."""
    monkeypatch.setattr(tidy, "tidy", lambda adjoint, *args: adjoint)


def _pool_model(side: int = 8, channels: int = 4, classes: int = 3,
                dtype: type = np.float32) -> onnx.ModelProto:
    """image -> MaxPool 2x2 stride 2 -> Flatten -> Gemm: the pool reads the input, so ties in
    the input are ties in the windows."""
    rng = np.random.default_rng(5)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    flat = channels * (side // 2) ** 2
    nodes = [helper.make_node("MaxPool", ["image"], ["pool"], kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "pool", [helper.make_tensor_value_info("image", elem,
                                                      ["N", channels, side, side])],
        [helper.make_tensor_value_info("logits", elem, ["N", classes])],
        [numpy_helper.from_array(rng.normal(size=(classes, flat)).astype(dtype), "w"),
         numpy_helper.from_array(rng.normal(size=classes).astype(dtype), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _build(model: onnx.ModelProto, shape: tuple[int, ...], dtype: type, output: str,
           columns: list[int], batches: tuple[int, ...] = (1, 32)) -> GradientModel:
    feeds = models.feeds_for("image", shape, dtype)
    return GradientModel.build(model, feeds, int(np.prod(shape)), output, columns,
                               batches=batches)


def _adjoint_ops(gm: GradientModel, batch: int) -> list[str]:
    """The op types the batch's adjoint session was given; tidied, unless tidy is patched."""
    adjoint = gm._adjoint(batch)
    assert adjoint.tidied or tidy.tidy.__name__ == "<lambda>"
    return list(adjoint.ops)


def _tidied_graph(gm: GradientModel, batch: int) -> onnx.ModelProto:
    """The graph tidy gives for the batch's adjoint, rebuilt the way the backend builds it."""
    captured: list[onnx.ModelProto] = []
    real = tidy.tidy

    def keep(*args: object) -> onnx.ModelProto:
        captured.append(real(*args))  # type: ignore[arg-type]
        return captured[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tidy, "tidy", keep)
        backend._Adjoint(gm.parts, gm.variables, gm.target, batch)
    return captured[-1]


def _central(model: onnx.ModelProto, X: Array, shape: tuple[int, ...], h: float) -> Array:
    """(rows, classes, elements) central differences of the logits, plain session."""
    run = backend.session(model)

    def f(Z: Array) -> Array:
        return np.asarray(run.run(["logits"], {"image": Z.reshape(-1, *shape)})[0])
    return central(f, X, h)


def test_maxpool_rewrite_equals_the_scatter_and_finite_differences(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows with exact ties (integer pixels): MaxUnpool gives onnx-ad's numbers exactly
    (the first maximum takes the gradient), at one row and at 32; jittered pixels: central
    differences (float64, where the scatter stays: onnxruntime has no float64 MaxUnpool)."""
    model, shape = _pool_model(), (4, 8, 8)
    rng = np.random.default_rng(0)
    ties = rng.integers(0, 3, size=(32, 256)).astype(np.float64)  # many tied windows
    untidied(monkeypatch)
    reference = _build(model, shape, np.float32, "logits", [0, 1, 2]).value_and_grad(ties)
    monkeypatch.undo()
    for column in range(3):
        gm = _build(model, shape, np.float32, "logits", [column])
        for batch in (1, 32):
            ops = _adjoint_ops(gm, batch)
            assert "ScatterND" not in ops and "MaxUnpool" in ops
        values, grads = gm.value_and_grad(ties)
        np.testing.assert_array_equal(values[:, 0], reference[0][:, column])
        np.testing.assert_array_equal(grads[:, 0], reference[1][:, column])
        assert np.count_nonzero(grads[0, 0]) == 64  # one element per window
        np.testing.assert_array_equal(gm.value_and_grad(ties[:1])[1][0, 0], grads[0, 0])
    doubles = _pool_model(dtype=np.float64)
    gm = _build(doubles, shape, np.float64, "logits", [1])
    assert "ScatterND" in _adjoint_ops(gm, 32)
    X = rng.normal(size=(32, 256))
    _, grads = gm.value_and_grad(X)
    np.testing.assert_allclose(grads[:, 0], _central(doubles, X, shape, 1e-6)[:, 1], atol=1e-7)


def test_maxpool_rewrite_keeps_the_general_path_for_overlapping_pools() -> None:
    """A 3x3 window at stride 2 overlaps: the scatter stays (MaxUnpool would overwrite where
    the gradient adds up)."""
    model = _pool_model(dtype=np.float64)
    for node in model.graph.node:
        if node.op_type == "MaxPool":
            node.CopyFrom(helper.make_node("MaxPool", ["image"], ["pool"], kernel_shape=[3, 3],
                                           strides=[2, 2], pads=[1, 1, 1, 1]))
    gm = _build(model, (4, 8, 8), np.float64, "logits", [0])
    assert "ScatterND" in _adjoint_ops(gm, 32)
    X = np.random.default_rng(3).normal(size=(4, 256))
    _, grads = gm.value_and_grad(X)
    np.testing.assert_allclose(grads[:, 0], _central(model, X, (4, 8, 8), 1e-6)[:, 0],
                               atol=1e-7)


def test_tidied_cnn_equals_onnx_ad_with_relu_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """The float32 CNN (ReLU then MaxPool: tied zeros in dead windows), 32 rows: tidy's graph
    (ReLU masks on the ReLU output, the MaxPool rewrite at this size) gives onnx-ad's
    gradients, and runs fewer nodes."""
    model, shape = models.cnn(channels=8, side=16), (1, 16, 16)
    X = np.random.default_rng(4).normal(size=(32, 256))
    X[:, :128] = 0  # flat regions: tied activations
    untidied(monkeypatch)
    reference = _build(model, shape, np.float32, "probabilities", [0, 1, 2]).value_and_grad(X)
    plain = len(_adjoint_ops(_build(model, shape, np.float32, "probabilities", [1]), 32))
    monkeypatch.undo()
    gm = GradientModel.build(model, models.feeds_for("image", shape, np.float32), 256,
                             "probabilities", [1])
    assert len(_adjoint_ops(gm, 32)) < plain
    graph = _tidied_graph(gm, 32)
    made = {o: n for n in graph.graph.node for o in n.output}
    unpool = next(n for n in graph.graph.node if n.op_type == "MaxUnpool")
    masked = made[unpool.input[0]]  # the pooled gradient times the ReLU's mask on the pool
    assert masked.op_type == "Mul" and any(
        made[made[i].input[0]].op_type == "Greater"
        and made[made[made[i].input[0]].input[0]].op_type == "MaxPool"
        for i in masked.input if i in made and made[i].op_type == "Cast")
    values, grads = gm.value_and_grad(X)
    np.testing.assert_allclose(values[:, 0], reference[0][:, 1], rtol=1e-6)
    np.testing.assert_allclose(grads[:, 0], reference[1][:, 1], atol=1e-6 * np.abs(
        reference[1]).max())


def test_transposed_convs_become_convs_with_the_same_gradients(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The ResNet-like CNN (16 and 32 channels): no ConvTranspose left where both channel
    counts reach CONV_MIN, gradients equal to onnx-ad's graph to float32 rounding."""
    model = resnet(side=8)
    X = np.random.default_rng(6).normal(size=(3, 192))
    shape = (3, 8, 8)
    untidied(monkeypatch)
    reference = _build(model, shape, np.float32, "probabilities", [2]).value_and_grad(X)
    monkeypatch.undo()
    gm = _build(model, shape, np.float32, "probabilities", [2])
    ops = _adjoint_ops(gm, 1)
    assert ops.count("ConvTranspose") == 2  # onto the 3 input channels, and the strided one
    values, grads = gm.value_and_grad(X)
    np.testing.assert_allclose(values, reference[0], rtol=1e-6)
    np.testing.assert_allclose(grads, reference[1], atol=1e-5 * np.abs(reference[1]).max())


def test_columns_together_equal_columns_one_at_a_time() -> None:
    """The seed axis pinned to 3 columns, and to 1: the same gradients per column."""
    model, shape = models.cnn(), (1, 8, 8)
    X = np.random.default_rng(7).normal(size=(5, 64))
    _, together = _build(model, shape, np.float32, "probabilities", [0, 1, 2]
                         ).value_and_grad(X)
    for column in range(3):
        _, alone = _build(model, shape, np.float32, "probabilities", [column]
                          ).value_and_grad(X)
        np.testing.assert_allclose(alone[:, 0], together[:, column], rtol=1e-5, atol=1e-7)


def test_bundled_text_model_tidied_equals_onnx_ad(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled attention model (softmax's gradient: reductions and scalings with the
    seed axis last): tidy's graph, with the seed a constant, extent-1 reductions gone and the
    unit tails reshaped away, gives onnx-ad's gradients at 1 and 32 rows."""
    model = onnx.load(str(ROOT / "examples" / "models" / "text_sentiment" / "1" / "model.onnx"))
    feeds = models.feeds_for("tokens", (16,), np.int64)
    X = np.random.default_rng(8).integers(0, 50, size=(32, 16)).astype(np.float64)
    X[:, 12:] = 0  # padding
    untidied(monkeypatch)
    plain = GradientModel.build(model, feeds, 16, "probabilities", [1])
    reference = plain.value_and_grad(X)
    before = _adjoint_ops(plain, 32)
    monkeypatch.undo()
    gm = GradientModel.build(model, feeds, 16, "probabilities", [1])
    after = _adjoint_ops(gm, 32)
    assert after.count("ReduceSum") < before.count("ReduceSum")
    assert backend.PREFIX + "logits" not in gm._adjoint(32).inputs  # the seed is baked in
    for rows in (32, 1):
        values, grads = gm.value_and_grad(X[:rows])
        np.testing.assert_allclose(values, reference[0][:rows], rtol=1e-6)
        np.testing.assert_allclose(grads, reference[1][:rows],
                                   atol=1e-6 * np.abs(reference[1]).max())


def test_unit_tails_reshape_around_slow_broadcasts_and_reductions() -> None:
    """x / c with c one element and x ending in extent-1 axes, and a sum over axis 1 of such
    an x, run without the tail; an op with nothing to gain is left alone."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 1])
    nodes = [helper.make_node("Div", ["x", "c"], ["d"]),
             helper.make_node("ReduceSum", ["d", "axis"], ["s"], keepdims=1),
             helper.make_node("Mul", ["x", "x"], ["m"])]
    graph = helper.make_graph(
        nodes, "tails", [x],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("d", "s", "m")],
        [numpy_helper.from_array(np.array([4.0], np.float32), "c"),
         numpy_helper.from_array(np.array([1], np.int64), "axis")])
    model = graphs.infer(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 17)]))
    tidied = graphs.infer(tidy.unit_tails(model))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in tidied.graph.value_info}
    ran = {n.op_type: n for n in tidied.graph.node if n.op_type in ("Div", "ReduceSum")}
    assert shapes[ran["Div"].input[0]] == [2, 3, 4] and shapes[ran["ReduceSum"].input[0]] \
        == [2, 3, 4]
    assert [n.op_type for n in tidied.graph.node].count("Reshape") == 5  # Mul untouched
    X = np.random.default_rng(9).normal(size=(2, 3, 4, 1)).astype(np.float32)
    want = backend.session(model).run(None, {"x": X})
    got = backend.session(tidied).run(None, {"x": X})
    for a, b in zip(want, got, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)

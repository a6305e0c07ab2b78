"""The gradient methods against what they must equal: IG on an affine model is (x - b) w, its
completeness gap shrinks with steps, DeepLIFT is complete on ReLU networks and equals the
Rescale rule by hand, Grad-CAM equals a hand computation, SmoothGrad's standard error falls as
1/sqrt(n), saliency and input x gradient are the gradient (per group when groups are given)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from explainers import Background, Budget, Evaluator
from explainers.base import Array
from explainers.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from explainers.gradients.backend import ENGINE_FD, GradientModel
from explainers.gradients.deeplift import DeepLift
from explainers.gradients.gradcam import GradCam, upsample
from explainers.gradients.graphs import last_spatial_conv
from explainers.gradients.input_x_gradient import InputXGradient
from explainers.gradients.integrated_gradients import IntegratedGradients, gauss_legendre
from explainers.gradients.saliency import Saliency
from explainers.gradients.smoothgrad import SmoothGrad
from explainers.groups import Groups
from tests import gradient_models as models


def unused() -> Evaluator:
    """The Estimator signature's model: gradient methods only read its evaluation count."""
    return Evaluator(lambda X: np.zeros((X.shape[0], 1)))


def background(rows: Array, weights: Array | None = None) -> Background:
    return Background.build(rows, np.zeros((rows.shape[0], 1)), weights)


def budget(seconds: float = 30.0, **kwargs: int | float | None) -> Budget:
    return Budget.of_seconds(seconds, **kwargs)


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def mlp_model(rescale: bool = False, activation: str = "Relu",
              dtype: type = np.float64) -> GradientModel:
    return GradientModel.build(models.mlp(activation=activation, dtype=dtype),
                               models.feeds_for("x", (6,), dtype), 6, "probabilities", [0, 1],
                               rescale=rescale)


def test_gauss_legendre_rules_integrate_polynomials_exactly() -> None:
    for steps in (1, 8, 64, 256):
        t, w = gauss_legendre(steps)
        assert w.sum() == pytest.approx(1.0, abs=1e-14) and np.all((t > 0) & (t < 1))
        assert w @ t**5 == pytest.approx(1 / 6, abs=1e-14) if steps >= 3 else True


def test_integrated_gradients_on_an_affine_model_is_exactly_x_minus_b_times_w() -> None:
    model, w, c = models.affine()
    gm = GradientModel.build(model, models.feeds_for("x", (5,), np.float64), 5, "y", [0])
    x, b = np.arange(1.0, 6.0), np.full(5, -0.5)
    got = IntegratedGradients(gm).explain(unused(), x, background(b[None]), budget(),
                                          rng())
    np.testing.assert_allclose(got.values[0], (x - b) * w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.map, got.values)  # type: ignore[arg-type]
    assert got.additive and abs(dict(got.diagnostics)["completeness_gap"]) < 1e-12
    np.testing.assert_allclose(got.base_values, b @ w + c, rtol=1e-12)
    # several baseline rows: the weighted average (expected gradients), complete against
    # the weighted mean prediction
    rows, weights = np.array([[0.0] * 5, [1.0] * 5, [2.0] * 5]), np.array([0.5, 0.3, 0.2])
    got = IntegratedGradients(gm).explain(unused(), x, background(rows, weights), budget(),
                                          rng())
    np.testing.assert_allclose(got.values[0], (x - weights @ rows) * w, rtol=1e-12)
    assert got.additive and dict(got.diagnostics)["baselines"] == 3


def test_integrated_gradients_gap_shrinks_with_steps_and_is_reported() -> None:
    """A smooth (tanh) network: Gauss-Legendre's gap falls fast with the node count; the
    anytime run doubles steps until the gap meets the accuracy goal."""
    gm = mlp_model(activation="Tanh")
    x, b = np.random.default_rng(1).normal(size=6) * 2, np.zeros((1, 6))
    gaps = []
    for steps in (1, 2, 4, 8):
        got = IntegratedGradients(gm, steps=steps).explain(unused(), x, background(b),
                                                           budget(), rng())
        gaps.append(abs(dict(got.diagnostics)["completeness_gap"]))
        assert dict(got.diagnostics)["steps"] == steps
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] and gaps[3] < 1e-3 * gaps[0]
    got = IntegratedGradients(gm).explain(unused(), x, background(b),
                                          budget(target_error=1e-9), rng())
    gap = dict(got.diagnostics)["completeness_gap"]
    assert abs(gap) <= 1e-9 and got.converged and dict(got.diagnostics)["steps"] >= 8
    np.testing.assert_allclose(gap, got.values.sum(axis=1) - (got.prediction - got.base_values),
                               atol=1e-12)


def test_integrated_gradients_stops_within_an_evaluation_cap() -> None:
    gm = mlp_model()
    x, b = np.ones(6), np.zeros((1, 6))
    got = IntegratedGradients(gm).explain(unused(), x, background(b),
                                          Budget(np.inf, max_evaluations=100), rng())
    # f(x), f(b), then rules of 8, 16, 32 nodes: 58 rows; 64 more would pass the cap
    assert dict(got.diagnostics)["steps"] == 32 and got.evaluations == 58
    assert got.budget_exhausted and not got.converged and not got.additive
    with pytest.raises(ResourceExhausted, match="budget_ms"):
        IntegratedGradients(gm).explain(unused(), x, background(b),
                                        Budget(np.inf, max_evaluations=5), rng())
    with pytest.raises(InvalidArgument, match="budget"):
        IntegratedGradients(gm).explain(unused(), x, background(b), Budget(np.inf), rng())


def test_integrated_gradients_on_text_is_complete_per_token() -> None:
    """The path runs in embedding space from the mask token's embeddings; attributions are
    summed per token and add up to f(x) - f(baseline)."""
    gm = GradientModel.build(models.text(dtype=np.float64),
                             models.feeds_for("tokens", (6,), np.int64), 6, "probabilities",
                             [1])
    x = np.array([3.0, 7, 11, 2, 5, 9])
    baseline = np.array([[1.0, 1, 1, 1, 1, 9]])  # the last token is kept (as padding would be)
    got = IntegratedGradients(gm, steps=256).explain(unused(), x, background(baseline),
                                                     budget(), rng())
    assert got.values.shape == (1, 6) and got.values[0, 5] == 0
    assert abs(dict(got.diagnostics)["completeness_gap"]) < 1e-6
    np.testing.assert_allclose(got.prediction - got.base_values,
                               gm.value(x[None])[0] - gm.value(baseline)[0])
    assert "summed per token" in " ".join(got.notes)


def test_deeplift_is_complete_on_relu_networks_and_equals_the_rescale_rule() -> None:
    gm = mlp_model(rescale=True)
    generator = np.random.default_rng(2)
    x, b = generator.normal(size=6), generator.normal(size=(1, 6))
    got = DeepLift(gm).explain(unused(), x, background(b), budget(), rng())
    gap = dict(got.diagnostics)["completeness_gap"]
    assert abs(gap) < 1e-6 and got.additive
    assert dict(got.diagnostics)["rescaled_nonlinearities"] == 2
    np.testing.assert_allclose(got.values.sum(axis=1), gm.value(x[None])[0] - gm.value(b)[0],
                               atol=1e-10)
    # DeepSHAP: against each of 10 rows, averaged by weight; complete against the mean
    rows, weights = generator.normal(size=(10, 6)), generator.random(10)
    shap = DeepLift(gm, average=True).explain(unused(), x, background(rows, weights), budget(),
                                              rng())
    expected = shap.prediction - (weights / weights.sum()) @ gm.value(rows)
    np.testing.assert_allclose(shap.values.sum(axis=1), expected, atol=1e-10)
    assert shap.method == "deepshap" and shap.additive and shap.evaluations == 2 + 3 * 10


def test_deeplift_by_hand_on_one_hidden_layer() -> None:
    """phi_i = sum_j v_kj m_j W_ji (x_i - b_i), m_j = (relu(a_j) - relu(a0_j)) / (a_j - a0_j)."""
    generator = np.random.default_rng(3)
    W, c, V = generator.normal(size=(5, 4)), generator.normal(size=5), generator.normal(size=(2, 5))
    nodes = [helper.make_node("Gemm", ["x", "W", "c"], ["a"], transB=1),
             helper.make_node("Relu", ["a"], ["h"]),
             helper.make_node("MatMul", ["h", "Vt"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 2])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(c, "c"),
         numpy_helper.from_array(V.T.copy(), "Vt")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    gm = GradientModel.build(model, models.feeds_for("x", (4,), np.float64), 4, "y", [0, 1],
                             rescale=True)
    x, b = generator.normal(size=4), generator.normal(size=4)
    a, a0 = W @ x + c, W @ b + c
    m = (np.maximum(a, 0) - np.maximum(a0, 0)) / (a - a0)
    expected = (V * m) @ W * (x - b)  # (outputs, features)
    got = DeepLift(gm).explain(unused(), x, background(b[None]), budget(), rng())
    np.testing.assert_allclose(got.values, expected, rtol=1e-10)


def test_deeplift_reports_the_gap_where_maxpool_keeps_its_gradient() -> None:
    gm = GradientModel.build(models.cnn(), models.feeds_for("image", (1, 8, 8), np.float32),
                             64, "probabilities", [0], rescale=True)
    x = np.random.default_rng(4).normal(size=64)
    got = DeepLift(gm).explain(unused(), x, background(np.zeros((1, 64))), budget(), rng())
    assert np.isfinite(dict(got.diagnostics)["completeness_gap"]) and got.map is not None
    with pytest.raises(InvalidArgument, match="rescale=True"):
        DeepLift(mlp_model())


def _tail_gradient(pooled_from: Array, W: Array, k: int) -> Array:
    """d logit_k / d relu2 by hand: MaxPool 2x2 routes each window's gradient to its
    maximum; Flatten then Gemm give logit_k = W_k . pooled + b_k."""
    channels, side = pooled_from.shape[0], pooled_from.shape[1]
    grad = np.zeros_like(pooled_from)
    flat = W[k].reshape(channels, side // 2, side // 2)
    for c in range(channels):
        for i in range(side // 2):
            for j in range(side // 2):
                window = pooled_from[c, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                r, s = np.unravel_index(np.argmax(window), (2, 2))
                grad[c, 2 * i + r, 2 * j + s] = flat[c, i, j]
    return grad


def test_gradcam_equals_a_hand_computation() -> None:
    """The activation from a plain session exposing the layer, its gradient by hand through
    MaxPool, Flatten and Gemm; then channel means, the weighted sum, and nearest upsampling
    (here 8x8 -> 8x8, so the map is the CAM on every pixel)."""
    model = models.cnn()
    layer = last_spatial_conv(model)
    assert layer == "relu2"
    feeds = models.feeds_for("image", (1, 8, 8), np.float32)
    gm = GradientModel.build(model, feeds, 64, "probabilities", [0, 2], layer=layer)
    x = np.random.default_rng(5).normal(size=64)
    exposed = onnx.shape_inference.infer_shapes(model)
    exposed.graph.output.extend(v for v in exposed.graph.value_info if v.name == "relu2")
    A = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"]
                             ).run(["relu2"], feeds(x[None]))[0][0].astype(np.float64)
    W = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    for relu in (False, True):
        got = GradCam(gm, relu=relu).explain(unused(), x, background(x[None]), budget(), rng())
        for row, k in enumerate((0, 2)):
            G = _tail_gradient(A, W.astype(np.float64), k)
            cam = np.tensordot(G.mean(axis=(1, 2)), A, axes=1)  # (8, 8)
            cam = np.maximum(cam, 0) if relu else cam
            np.testing.assert_allclose(got.map[row], cam.ravel(), rtol=1e-4,  # type: ignore[index]
                                       atol=1e-6)
    plus = GradCam(gm, plus_plus=True).explain(unused(), x, background(x[None]), budget(), rng())
    G = _tail_gradient(A, W.astype(np.float64), 0)
    g2, g3 = G**2, G**3
    denominator = 2 * g2 + A.sum(axis=(1, 2))[:, None, None] * g3
    alpha = np.where(G != 0, g2 / np.where(denominator == 0, 1, denominator), 0)
    weights = (alpha * np.maximum(G, 0)).sum(axis=(1, 2))
    np.testing.assert_allclose(plus.map[0], np.tensordot(weights, A, axes=1).ravel(),  # type: ignore[index]
                               rtol=1e-4, atol=1e-6)
    assert plus.method == "gradcam++" and not plus.additive and plus.evaluations == 2


def test_upsample_is_nearest_neighbour() -> None:
    cam = np.arange(4.0).reshape(1, 2, 2)
    np.testing.assert_array_equal(upsample(cam, (4, 4))[0],
                                  [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    assert upsample(np.arange(3.0).reshape(1, 3), (7,))[0].tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_smoothgrad_standard_error_falls_as_one_over_sqrt_n() -> None:
    gm = mlp_model()
    x = np.random.default_rng(6).normal(size=6)
    few = SmoothGrad(gm, samples=16).explain(unused(), x, background(x[None]), budget(), rng())
    many = SmoothGrad(gm, samples=256).explain(unused(), x, background(x[None]), budget(),
                                               rng())
    assert few.samples == 16 and many.samples == 256 and many.dof == 255
    ratio = few.std_errors.mean() / many.std_errors.mean()
    assert 2.5 < ratio < 6.0  # sqrt(256 / 16) = 4
    assert np.all(np.abs(many.values - few.values) < 5 * few.std_errors + 1e-12)
    # with almost no noise, SmoothGrad is the gradient
    tiny = SmoothGrad(gm, noise_level=1e-9, samples=8).explain(unused(), x, background(x[None]),
                                                               budget(), rng())
    np.testing.assert_allclose(tiny.values, gm.value_and_grad(x[None])[1][0], rtol=1e-6)
    with pytest.raises(InvalidArgument, match="samples >= 2"):
        SmoothGrad(gm, samples=1)


def test_smoothgrad_anytime_stops_at_the_accuracy_goal() -> None:
    gm = mlp_model()
    x = np.random.default_rng(7).normal(size=6)
    got = SmoothGrad(gm).explain(unused(), x, background(x[None]),
                                 budget(target_error=0.05), rng())
    assert got.converged and got.std_errors.max() <= 0.05 and got.samples >= 8


def test_saliency_and_input_x_gradient_are_the_gradient_per_group() -> None:
    gm = mlp_model()
    x = np.random.default_rng(8).normal(size=6)
    grad = gm.value_and_grad(x[None])[1][0]  # (outputs, elements)
    plain = Saliency(gm).explain(unused(), x, background(x[None]), budget(), rng())
    np.testing.assert_allclose(plain.values, np.abs(grad))
    signed = Saliency(gm, absolute=False).explain(unused(), x, background(x[None]), budget(),
                                                  rng())
    np.testing.assert_allclose(signed.values, grad)
    groups = Groups.build(np.array([0, 0, 1, 1, 1, -1]), ["a", "b"])
    ixg = InputXGradient(gm).explain(unused(), x, background(x[None]), budget(), rng(), groups)
    np.testing.assert_allclose(ixg.map, grad * x)  # type: ignore[arg-type]
    np.testing.assert_allclose(ixg.values, np.stack([(grad * x)[:, :2].sum(axis=1),
                                                     (grad * x)[:, 2:5].sum(axis=1)], axis=1))
    assert ixg.evaluations == 1 and not ixg.additive
    assert dict(ixg.diagnostics)["gradient_build_s"] > 0


def test_methods_run_on_the_finite_difference_fallback_and_refuse_clearly() -> None:
    """Saliency through a graph onnx-ad refuses (FusedGemm) equals the analytic gradient;
    a rescaled model without the op's rule still runs; a logit request without a link
    fails with FAILED_PRECONDITION, never an internal error."""
    from tests.test_gradients import _fused_gemm
    model, W, b = _fused_gemm()
    gm = GradientModel.build(model, models.feeds_for("x", (6,), np.float32), 6, "y", [0])
    assert gm.engine == ENGINE_FD
    x = np.random.default_rng(9).normal(size=6)
    got = Saliency(gm, absolute=False).explain(unused(), x, background(x[None]), budget(), rng())
    np.testing.assert_allclose(got.values[0], ((W @ x + b) > 0) @ W, atol=2e-4)
    assert any("finite-difference" in n for n in got.notes)
    with pytest.raises(FailedPrecondition, match="no logit scale"):
        GradientModel.build(model, models.feeds_for("x", (6,), np.float32), 6, "y", [0],
                            scale="logit")

"""Gradients of the bundled deep models (examples/models/digits_cnn, text_sentiment, trained
by examples/torch_models.py) against central finite differences of plain onnxruntime sessions,
and integrated gradients' completeness on them.

These float32 networks have many ReLU units within a finite-difference step of their kink, so
elements are compared where central differences are a derivative: the one-sided differences
agree, and so do central differences at a quarter of the step (no kink within the step on
either side), and most elements must qualify.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from explainers import Background, Budget, Evaluator
from explainers.base import Array
from explainers.gradients.backend import ENGINE_AD, GradientModel
from explainers.gradients.gradcam import GradCam
from explainers.gradients.graphs import last_spatial_conv
from explainers.gradients.integrated_gradients import IntegratedGradients
from tests import gradient_models as models
from tests.test_gradients import ort_function

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
CNN, TEXT = MODELS / "digits_cnn", MODELS / "text_sentiment"


def smooth_differences(f: Callable[[Array], Array], X: Array, h: float,
                       tolerance: float) -> tuple[Array, Array]:
    """Central differences (rows, outputs, elements) and where they are a derivative: the
    one-sided differences agree within `tolerance`, and so does the central difference at
    h / 4."""
    fx = f(X)
    central, smooth = [], []
    for j in range(X.shape[1]):
        sides = []
        for step in (h, h / 4):
            up, down = X.copy(), X.copy()
            up[:, j] += step
            down[:, j] -= step
            sides.append(((f(up) - fx) / step, (fx - f(down)) / step))
        (forward, backward), (near_f, near_b) = sides
        central.append((forward + backward) / 2)
        smooth.append((np.abs(forward - backward) <= tolerance)
                      & (np.abs(central[-1] - (near_f + near_b) / 2) <= tolerance))
    return np.stack(central, axis=2), np.stack(smooth, axis=2)


def unused() -> Evaluator:
    return Evaluator(lambda X: np.zeros((X.shape[0], 1)))


def test_digits_cnn_gradients_equal_finite_differences() -> None:
    model = onnx.load(CNN / "1" / "model.onnx")
    feeds = models.feeds_for("image", (1, 8, 8), np.float32)
    gm = GradientModel.build(model, feeds, 64, "probabilities", list(range(10)))
    images = np.load(CNN / "background.npy")[:4].reshape(4, -1).astype(np.float64)
    X = images + np.random.default_rng(0).normal(size=images.shape) * 0.1  # no ties
    _, grads = gm.value_and_grad(X)
    expected, smooth = smooth_differences(ort_function(model, "logits", feeds), X, 1e-3, 1e-2)
    assert gm.engine == ENGINE_AD and smooth.mean() > 0.9
    assert np.abs(grads - expected)[smooth].max() <= 1e-2
    x = X[0]
    ig = IntegratedGradients(gm, steps=256).explain(
        unused(), x, Background.build(np.zeros((1, 64)), np.zeros((1, 1))), Budget(np.inf),
        np.random.default_rng(0))
    assert abs(dict(ig.diagnostics)["completeness_gap"]) < 0.05
    layer = last_spatial_conv(model)
    assert layer is not None
    cam = GradCam(GradientModel.build(model, feeds, 64, "probabilities", [3], layer=layer))
    got = cam.explain(unused(), x, Background.build(x[None], np.zeros((1, 1))),
                      Budget(np.inf), np.random.default_rng(0))
    assert got.map is not None and got.map.shape == (1, 64)


def test_text_sentiment_gradients_at_the_embeddings_equal_finite_differences() -> None:
    model = onnx.load(TEXT / "1" / "model.onnx")
    feeds = models.feeds_for("tokens", (16,), np.int64)
    gm = GradientModel.build(model, feeds, 16, "probabilities", [1])
    X = np.load(TEXT / "background.npy")[:4].astype(np.float64)  # (rows, 16) ids, 0 = pad
    np.testing.assert_allclose(gm.value(X), ort_function(model, "logits", feeds)(X)[:, [1]])
    P = gm.point(X)  # (rows, 16 * width)
    _, grads = gm.value_and_grad(X, P)
    expected, smooth = smooth_differences(lambda Q: gm.value(X, Q), P, 1e-3, 1e-2)
    assert [v.kind for v in gm.variables] == ["embedding"] and smooth.mean() > 0.9
    assert np.abs(grads - expected)[smooth].max() <= 1e-2
    x = X[0]
    mask = np.where(x == 0, 0.0, 1.0)[None]  # the mask token at every non-pad position
    ig = IntegratedGradients(gm, steps=256).explain(
        unused(), x, Background.build(mask, np.zeros((1, 1))), Budget(np.inf),
        np.random.default_rng(0))
    assert abs(dict(ig.diagnostics)["completeness_gap"]) < 1e-2
    assert np.all(ig.values[0][x == 0] == 0)  # padding keeps its token: no attribution

"""Sidelight's side of the Captum parity checks (no torch): the committed goldens
(tests/data/captum_goldens.npz, written by benchmarks/captum_goldens.py with Captum 0.9 on the
PyTorch twins of the bundled networks), and the same maps computed here by Sidelight's explainers
in process, on the ONNX files, with the goldens' inputs, baselines, targets, steps and noise.

Conventions mapped (the golden script's docstring says how Captum is called):
- every map is on the logit scale (the input of the final Softmax; Captum's forward returns the
  twin's logits), for the row's target class;
- digits: baseline zeros (explain.yaml `baseline: zeros`); DeepLIFT's reference is the
  background's mean, here that one zero row; DeepSHAP averages over 5 background rows;
- text: baseline = the mask token at every non-pad position (pads keep the pad token), gradients
  at the embedding lookup's output, summed over the embedding axis per token;
- integrated gradients: Gauss-Legendre with STEPS nodes (Captum's default rule);
- SmoothGrad: absolute gradients (the service's default, Captum's NoiseTunnel over Saliency),
  noise = numpy's default_rng(seed).normal(0, sigma, (samples, 64)) with
  sigma = noise_level * (max(x) - min(x)): the noise Sidelight's SmoothGrad draws with that seed,
  and the noise the golden script adds before Captum's Saliency;
- Grad-CAM: the default layer (last Conv's ReLU output), no ReLU on the map, nearest upsampling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx

from explainers import Background, Budget, Evaluator
from explainers.base import Array, Estimator
from explainers.gradients.backend import GradientModel
from explainers.gradients.deeplift import DeepLift
from explainers.gradients.gradcam import GradCam
from explainers.gradients.graphs import last_spatial_conv
from explainers.gradients.input_x_gradient import InputXGradient
from explainers.gradients.integrated_gradients import IntegratedGradients
from explainers.gradients.saliency import Saliency
from explainers.gradients.smoothgrad import SmoothGrad
from tests.gradient_models import feeds_for

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "tests" / "data" / "captum_goldens.npz"
MODELS = ROOT / "examples" / "models"
TOLERANCE = 1e-5  # max |Sidelight - Captum| / max |Captum| per map
DIGITS_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad",
                  "deeplift", "deepshap", "gradcam")
TEXT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "deeplift", "deepshap")
KEYS = tuple(f"digits.{m}" for m in DIGITS_METHODS) + tuple(f"text.{m}" for m in TEXT_METHODS)


def load_goldens(path: Path = GOLDENS) -> dict[str, Array]:
    """The committed inputs and Captum's maps (plain arrays, no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@functools.cache
def goldens() -> dict[str, Array]:
    """The committed goldens, loaded once per test session (treat as read-only)."""
    return load_goldens()


@functools.cache
def ours() -> dict[str, Array]:
    """Sidelight's maps on the committed inputs, computed once per test session."""
    return sidelight_maps(goldens())


def relative_error(ours: Array, golden: Array) -> float:
    """The largest per-map max |ours - golden| / max |golden| over the rows (rows, elements)."""
    a = np.asarray(ours, np.float64).reshape(golden.shape[0], -1)
    b = np.asarray(golden, np.float64).reshape(golden.shape[0], -1)
    scale = np.maximum(np.abs(b).max(axis=1), 1e-30)  # (rows,)
    return float((np.abs(a - b).max(axis=1) / scale).max())


def unused() -> Evaluator:
    """The estimators count evaluations on it; the gradient methods never call it."""
    return Evaluator(lambda X: np.zeros((X.shape[0], 1)))


def background(rows: Array) -> Background:
    flat = np.asarray(rows, np.float64).reshape(rows.shape[0], -1)  # (rows, elements)
    return Background.build(flat, np.zeros((flat.shape[0], 1)))


def _maps(estimator: Estimator, X: Array, targets: Array,
          backgrounds: Callable[[int], Background], seed: int = 0) -> Array:
    """Each row's map (rows, elements) for its target class."""
    out = []
    for i, row in enumerate(np.asarray(X, np.float64).reshape(X.shape[0], -1)):
        got = estimator.explain(unused(), row, backgrounds(i), Budget(np.inf),
                                np.random.default_rng(seed))
        assert got.map is not None
        out.append(got.map[int(targets[i])])
    return np.stack(out)


def digits_maps(g: Mapping[str, Array]) -> dict[str, Array]:
    """Sidelight's maps of the digits CNN for every DIGITS_METHODS entry."""
    model = onnx.load(MODELS / "digits_cnn" / "1" / "model.onnx")
    feeds = feeds_for("image", (1, 8, 8), np.float32)
    columns = list(range(10))
    gm = GradientModel.build(model, feeds, 64, "probabilities", columns)
    rescaled = GradientModel.build(model, feeds, 64, "probabilities", columns, rescale=True)
    layer = last_spatial_conv(model)
    assert layer == str(g["gradcam_layer"]), "the default Grad-CAM layer moved"
    cam = GradientModel.build(model, feeds, 64, "probabilities", columns, layer=layer)
    X, t = g["digits_x"], g["digits_target"]
    zero, shap = background(g["digits_baseline"]), background(g["digits_background"])
    steps, samples = int(g["ig_steps"]), int(g["smoothgrad_samples"])
    smooth = SmoothGrad(gm, float(g["smoothgrad_noise_level"]), samples, absolute=True)
    return {
        "saliency": _maps(Saliency(gm), X, t, lambda _: zero),
        "input_x_gradient": _maps(InputXGradient(gm), X, t, lambda _: zero),
        "integrated_gradients": _maps(IntegratedGradients(gm, steps), X, t, lambda _: zero),
        "smoothgrad": _maps(smooth, X, t, lambda _: zero, int(g["smoothgrad_seed"])),
        "deeplift": _maps(DeepLift(rescaled), X, t, lambda _: zero),
        "deepshap": _maps(DeepLift(rescaled, average=True), X, t, lambda _: shap),
        "gradcam": _maps(GradCam(cam), X, t, lambda _: zero),
    }


def text_maps(g: Mapping[str, Array]) -> dict[str, Array]:
    """Sidelight's maps of the text model (per token) for every TEXT_METHODS entry."""
    model = onnx.load(MODELS / "text_sentiment" / "1" / "model.onnx")
    feeds = feeds_for("tokens", (16,), np.int64)
    gm = GradientModel.build(model, feeds, 16, "probabilities", [0, 1])
    rescaled = GradientModel.build(model, feeds, 16, "probabilities", [0, 1], rescale=True)
    X, t, steps = g["text_x"], g["text_target"], int(g["ig_steps"])
    mask = [background(b[None]) for b in g["text_baseline"]]  # one mask row per sentence
    others = [background(b) for b in g["text_background"]]  # (sentences, rows, 16)
    return {
        "saliency": _maps(Saliency(gm), X, t, mask.__getitem__),
        "input_x_gradient": _maps(InputXGradient(gm), X, t, mask.__getitem__),
        "integrated_gradients": _maps(IntegratedGradients(gm, steps), X, t, mask.__getitem__),
        "deeplift": _maps(DeepLift(rescaled), X, t, mask.__getitem__),
        "deepshap": _maps(DeepLift(rescaled, average=True), X, t, others.__getitem__),
    }


def sidelight_maps(g: Mapping[str, Array]) -> dict[str, Array]:
    """Every KEYS entry computed by Sidelight on the goldens' inputs."""
    maps = {f"digits.{k}": v for k, v in digits_maps(g).items()}
    maps.update({f"text.{k}": v for k, v in text_maps(g).items()})
    return maps

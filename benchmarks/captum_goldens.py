"""Captum's attributions on the PyTorch twins of the bundled networks, written once to
tests/data/captum_goldens.npz (the fixed inputs with them) so tests compare Sidelight against
Captum without torch. Needs the `captum` extra (torch 2.13.0 CPU, captum 0.9.0).

Usage: python -m benchmarks.captum_goldens [--out PATH]

The twins come from examples/torch_models.py (`from_onnx`: the committed ONNX weights, no
pickles); their forward returns the logits, Sidelight's default target scale. How each method is
called to match Sidelight's conventions (tests/captum_parity.py lists them):
- digits (4 test-split rows, target = the true class): Saliency (abs), InputXGradient,
  IntegratedGradients (method "gausslegendre", n_steps = STEPS, zero baseline), DeepLift (zero
  reference), DeepLiftShap (5 rows of the bundled background), SmoothGrad = Captum's Saliency
  (abs) averaged over x + noise where the noise is the one Sidelight draws from SEED (NoiseTunnel
  draws from torch's generator, so only a statistical comparison is possible with it), and
  LayerGradCam at the twin module that produces Sidelight's default layer (the ONNX node
  "/relu2/Relu" -> module `relu2`, see `module_of`), relu_attributions=False, upsampled with
  LayerAttribution.interpolate (nearest).
- text (3 sentences, fixed targets): the layer is `embedding` (its output is the ONNX tensor
  /embedding/Gather_output_0 that Sidelight differentiates); LayerGradientXActivation without
  (saliency, then abs) and with (input x gradient) the activation, LayerIntegratedGradients, and
  LayerDeepLift against the mask-token baseline (the mask id at every non-pad position), summed
  over the embedding axis. DeepSHAP = the mean of LayerDeepLift over 4 baselines per sentence
  that keep its pads (Captum's LayerDeepLiftShap refuses integer inputs: it sets requires_grad
  on the repeated token ids; DeepLiftShap is by definition that mean).
- the text model's attention Softmax: Captum's DeepLift applies its `softmax` rule to every
  nn.Softmax module; that rule is meant for a final softmax (it subtracts the multipliers' mean
  over the whole tensor, both halves of the batch included) and on attention probabilities it
  breaks completeness. Sidelight keeps the attention Softmax's gradient at x (its multiplier for
  every op it does not rewrite), so the goldens run DeepLift with that module swapped for
  `torch.softmax` (`functional_softmax`); benchmarks/captum.py reports what the rule changes.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from captum.attr import (
    DeepLift,
    DeepLiftShap,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerDeepLift,
    LayerGradCam,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    Saliency,
)
from torch import nn

from examples import torch_models
from examples.build_models import digit_images, digits, text_corpus
from explainers.base import Array
from explainers.gradients.graphs import last_spatial_conv, producers
from tests.captum_parity import GOLDENS, MODELS

STEPS = 50  # Captum's default n_steps; a single Gauss-Legendre rule in Sidelight (<= 64)
SAMPLES, NOISE_LEVEL, SEED = 16, 0.15, 7  # SmoothGrad
DIGIT_ROWS = (0, 1, 2, 3)  # rows of the digits test split
SENTENCES = 3  # "the movie was not good", then the first two test sentences
SHAP_ROWS = 5  # digits background rows for DeepLiftShap
MASK_ID, PAD_ID = 1, 0


def twin(name: str) -> nn.Module:
    return torch_models.from_onnx(MODELS / name / "1" / "model.onnx")


def module_of(model: onnx.ModelProto, tensor: str, net: nn.Module) -> nn.Module:
    """The twin module that produces an ONNX tensor: the TorchScript exporter names nodes by
    module path ("/relu2/Relu" is module `relu2`, "/a/b/Op" is `a.b`)."""
    node = producers(model.graph)[tensor]
    path = node.name.strip("/").split("/")[:-1]
    return net.get_submodule(".".join(path))


@contextlib.contextmanager
def functional_softmax(net: nn.Module) -> Iterator[None]:
    """The attention's nn.Softmax swapped for torch.softmax, so DeepLift keeps its gradient at
    x (see the module docstring), then put back."""
    attention = net.get_submodule("attention")
    kept = attention.softmax

    class Softmax(nn.Module):
        def forward(self, scores: torch.Tensor) -> torch.Tensor:
            return torch.softmax(scores, dim=-1)

    attention.softmax = Softmax()
    try:
        yield
    finally:
        attention.softmax = kept


def inputs() -> dict[str, Array]:
    """The fixed rows, targets, baselines and settings the goldens are computed on."""
    split = digits()
    X = digit_images(split.X_test)[list(DIGIT_ROWS)]  # (4, 1, 8, 8) float32 in 0..1
    background = np.load(MODELS / "digits_cnn" / "background.npy")[:SHAP_ROWS]
    sentence = np.array([[30, 33, 36, 2, 3] + [PAD_ID] * 11], np.int64)  # the movie was not good
    tokens = np.concatenate([sentence, text_corpus(SENTENCES - 1, seed=1)[0]])  # (3, 16)
    rng = np.random.default_rng(0)
    others = np.stack([np.where(row == PAD_ID, PAD_ID, rng.integers(2, 50, (4, row.size)))
                       for row in tokens]).astype(np.int64)  # (3, 4, 16), pads kept
    return {
        "digits_x": X, "digits_target": split.y_test[list(DIGIT_ROWS)].astype(np.int64),
        "digits_baseline": np.zeros((1, 1, 8, 8), np.float32),
        "digits_background": background.astype(np.float32),
        "text_x": tokens, "text_target": np.array([1, 0, 1], np.int64),
        "text_baseline": np.where(tokens == PAD_ID, PAD_ID, MASK_ID).astype(np.int64),
        "text_background": others,
        "ig_steps": np.array(STEPS), "smoothgrad_samples": np.array(SAMPLES),
        "smoothgrad_noise_level": np.array(NOISE_LEVEL), "smoothgrad_seed": np.array(SEED),
    }


def _np(t: torch.Tensor, rows: int) -> Array:
    return np.asarray(t.detach().numpy(), np.float32).reshape(rows, -1)


def smoothgrad_noise(x: Array, samples: int, level: float, seed: int) -> Array:
    """Sidelight's SmoothGrad noise for one row (samples, elements)."""
    flat = np.asarray(x, np.float64).ravel()
    sigma = level * float(flat.max() - flat.min())
    return np.random.default_rng(seed).normal(0.0, sigma, (samples, flat.size))


def digits_maps(g: dict[str, Array]) -> dict[str, Array]:
    """Captum's maps (rows, 64) on the digits twin."""
    net, model = twin("digits_cnn"), onnx.load(MODELS / "digits_cnn" / "1" / "model.onnx")
    x, t = torch.from_numpy(g["digits_x"]), torch.from_numpy(g["digits_target"])
    zero, n = torch.zeros_like(x), x.shape[0]
    layer = module_of(model, str(g["gradcam_layer"]), net)
    cam = LayerGradCam(net, layer).attribute(x, target=t, relu_attributions=False)
    steps = int(g["ig_steps"])
    return {
        "saliency": _np(Saliency(net).attribute(x, target=t, abs=True), n),
        "input_x_gradient": _np(InputXGradient(net).attribute(x, target=t), n),
        "integrated_gradients": _np(IntegratedGradients(net).attribute(
            x, zero, target=t, n_steps=steps, method="gausslegendre"), n),
        "smoothgrad": np.stack([_smoothgrad(net, g, i) for i in range(n)]),
        "deeplift": _np(DeepLift(net).attribute(x, zero, target=t), n),
        "deepshap": _np(DeepLiftShap(net).attribute(
            x, torch.from_numpy(g["digits_background"]), target=t), n),
        "gradcam": _np(LayerAttribution.interpolate(cam, x.shape[2:], "nearest"), n),
    }


def _smoothgrad(net: nn.Module, g: dict[str, Array], i: int) -> Array:
    """Captum's Saliency (abs) averaged over one row plus Sidelight's noise (64,)."""
    x = g["digits_x"][i]
    noise = smoothgrad_noise(x, int(g["smoothgrad_samples"]),
                             float(g["smoothgrad_noise_level"]), int(g["smoothgrad_seed"]))
    noisy = (x.ravel().astype(np.float64) + noise).reshape(-1, *x.shape).astype(np.float32)
    rows = noisy.shape[0]
    got = Saliency(net).attribute(torch.from_numpy(noisy), target=int(g["digits_target"][i]),
                                  abs=True)
    return np.asarray(_np(got, rows).astype(np.float64).mean(axis=0), np.float32)


def text_maps(g: dict[str, Array]) -> dict[str, Array]:
    """Captum's per-token maps (rows, 16) on the text twin, at the embedding layer."""
    net = twin("text_sentiment")
    x, t = torch.from_numpy(g["text_x"]), torch.from_numpy(g["text_target"])
    mask, emb, n = torch.from_numpy(g["text_baseline"]), net.get_submodule("embedding"), len(x)
    grads = LayerGradientXActivation(net, emb, multiply_by_inputs=False).attribute(x, target=t)
    with functional_softmax(net):
        deeplift = LayerDeepLift(net, emb).attribute(x, mask, target=t)
        deepshap = [text_deepshap(net, g, i) for i in range(n)]
    return {
        "saliency": _np(grads.abs().sum(-1), n),
        "input_x_gradient": _np(LayerGradientXActivation(net, emb).attribute(x, target=t)
                                .sum(-1), n),
        "integrated_gradients": _np(LayerIntegratedGradients(net, emb).attribute(
            x, mask, target=t, n_steps=int(g["ig_steps"]), method="gausslegendre").sum(-1), n),
        "deeplift": _np(deeplift.sum(-1), n),
        "deepshap": np.stack(deepshap),
    }


def text_deepshap(net: nn.Module, g: dict[str, Array], i: int) -> Array:
    """Mean of LayerDeepLift over sentence i's baselines, per token (16,)."""
    others = torch.from_numpy(g["text_background"][i])  # (baselines, 16)
    x = torch.from_numpy(g["text_x"][i:i + 1]).repeat(others.shape[0], 1)
    got = LayerDeepLift(net, net.get_submodule("embedding")).attribute(
        x, others, target=int(g["text_target"][i]))
    return np.asarray(got.detach().sum(-1).mean(0).numpy(), np.float32)


def captum_maps(g: dict[str, Array]) -> dict[str, Array]:
    """Every tests.captum_parity.KEYS entry computed by Captum on the inputs in g."""
    torch.set_num_threads(1)  # deterministic reductions, as the goldens were made
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns about its hooks and integer inputs
        maps = {f"digits.{k}": v for k, v in digits_maps(g).items()}
        maps.update({f"text.{k}": v for k, v in text_maps(g).items()})
    return maps


def goldens() -> dict[str, Array]:
    """The inputs, the Grad-CAM layer and Captum's maps, as saved."""
    g = inputs()
    layer = last_spatial_conv(onnx.load(MODELS / "digits_cnn" / "1" / "model.onnx"))
    assert layer is not None
    g["gradcam_layer"] = np.array(layer)
    g.update(captum_maps(g))
    return g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=GOLDENS)
    out = parser.parse_args().out
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **goldens())
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

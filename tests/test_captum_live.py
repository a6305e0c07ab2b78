"""Captum rerun (only where torch and captum are installed: the `captum` extra): it still gives
the committed goldens, Sidelight still matches it, and Sidelight's SmoothGrad agrees with
Captum's own NoiseTunnel (which draws its noise from torch) within sampling error."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

from explainers import Budget
from explainers.base import Array
from explainers.gradients.backend import GradientModel
from explainers.gradients.smoothgrad import SmoothGrad
from tests.captum_parity import (
    KEYS,
    MODELS,
    TOLERANCE,
    background,
    goldens,
    ours,
    relative_error,
    unused,
)
from tests.gradient_models import feeds_for

torch = pytest.importorskip("torch")
pytest.importorskip("captum")
from captum.attr import NoiseTunnel, Saliency  # noqa: E402  (needs captum)

from benchmarks import captum_goldens  # noqa: E402  (needs torch and captum)

RERUN = 1e-6  # Captum against its own goldens: same network and inputs, maybe other kernels


@functools.cache
def captum() -> dict[str, Array]:
    return captum_goldens.captum_maps(goldens())


def test_captum_reproduces_the_committed_goldens() -> None:
    errors = {k: relative_error(captum()[k], goldens()[k]) for k in KEYS}
    assert max(errors.values()) <= RERUN, errors


@pytest.mark.parametrize("key", KEYS)
def test_sidelight_matches_captum_now(key: str) -> None:
    assert relative_error(ours()[key], captum()[key]) <= TOLERANCE


def test_smoothgrad_agrees_with_captums_noise_tunnel() -> None:
    """Independent noise on each side: the two means differ by sampling error only, so the
    standardised differences over the 64 pixels have a mean square near 1 (chi-square / 64;
    below 2 has probability > 0.9999); measured 1.0, and 17 when Captum's noise is twice as
    wide."""
    g = goldens()
    x, target, samples = g["digits_x"][0], int(g["digits_target"][0]), 256
    sigma = 0.15 * float(x.max() - x.min())
    gm = GradientModel.build(onnx.load(MODELS / "digits_cnn" / "1" / "model.onnx"),
                             feeds_for("image", (1, 8, 8), np.float32), 64, "probabilities",
                             [target])
    mine = SmoothGrad(gm, 0.15, samples, absolute=True).explain(
        unused(), x.ravel().astype(np.float64), background(g["digits_baseline"]),
        Budget(np.inf), np.random.default_rng(3))
    net = captum_goldens.twin("digits_cnn")
    torch.manual_seed(3)

    def z2(stdev: float) -> float:
        got = NoiseTunnel(Saliency(net)).attribute(
            torch.from_numpy(x[None]), nt_type="smoothgrad", nt_samples=samples, stdevs=stdev,
            target=target).detach().numpy().ravel()
        se = np.sqrt(2) * mine.std_errors[0]  # both means have about the same error
        keep = se > 0
        return float(np.mean(((got - mine.values[0])[keep] / se[keep]) ** 2))

    assert z2(sigma) < 2.0 < z2(2 * sigma)

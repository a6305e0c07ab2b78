"""Sidelight's gradient explainers reproduce Captum's attributions on the bundled networks: the
goldens in tests/data/captum_goldens.npz were computed once with Captum 0.9 on the PyTorch twins
(benchmarks/captum_goldens.py); this test needs no torch.

Tolerance: 1e-5 of the map's largest |value|, per map. Both sides run the same float32 network,
with different kernels (onnxruntime and torch sum convolutions and matrix products in different
orders), so each layer differs by a few float32 roundings (eps = 1.2e-7); measured worst:
1.2e-6 (text DeepLIFT, whose multipliers (y - y0) / (a - a0) amplify that rounding), 1.3e-7 to
3e-7 for the other maps; in absolute terms every map agrees within 1.2e-6.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.captum_parity import KEYS, TOLERANCE, goldens, ours, relative_error


def test_the_goldens_are_plain_small_arrays() -> None:
    g = goldens()
    assert set(KEYS) <= set(g)
    for key in KEYS:
        rows = g["digits_x" if key.startswith("digits") else "text_x"].shape[0]
        assert g[key].dtype == np.float32 and g[key].shape[0] == rows
        assert np.all(np.isfinite(g[key])) and np.any(g[key] != 0)


@pytest.mark.parametrize("key", KEYS)
def test_sidelight_reproduces_captum(key: str) -> None:
    error = relative_error(ours()[key], goldens()[key])
    assert error <= TOLERANCE, f"{key}: max |Sidelight - Captum| / max |Captum| = {error:.2e}"


def test_text_maps_give_padding_nothing() -> None:
    """The baselines keep the pads, so path methods attribute nothing to them (both sides)."""
    pads = goldens()["text_x"] == 0
    for key in ("text.integrated_gradients", "text.deeplift", "text.deepshap"):
        assert np.all(goldens()[key][pads] == 0) and np.all(np.abs(ours()[key][pads]) < 1e-12)

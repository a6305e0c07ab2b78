"""The PyTorch twins rebuilt from the committed ONNX files reproduce onnxruntime (needs torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from examples.build_models import digit_images, digits, text_corpus
from tests.conftest import MODELS

torch = pytest.importorskip("torch")
from examples import torch_models  # noqa: E402  (needs torch)

ATOL = 1e-5
ATTENTION = "/attention/softmax/Softmax_output_0"  # the text model's attention probabilities


def onnx_run(path: Path, x: np.ndarray, extra: str | None = None) -> list[np.ndarray]:
    """probabilities, logits (and ``extra``, exposed as an output) from onnxruntime."""
    proto = onnx.load(str(path))
    if extra:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(extra, 1, None))
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})


def inputs_of(name: str) -> np.ndarray:
    if name == "digits_cnn":
        return digit_images(digits().X_test)  # (360, 1, 8, 8)
    return text_corpus(300, seed=99)[0]  # (300, 16)


@pytest.mark.parametrize("name", ["digits_cnn", "text_sentiment"])
def test_twin_reproduces_onnxruntime(name: str) -> None:
    path = MODELS / name / "1" / "model.onnx"
    x = inputs_of(name)
    probabilities, logits = onnx_run(path, x)
    twin = torch_models.from_onnx(path)
    with torch.no_grad():
        got = twin(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), logits, rtol=0, atol=ATOL)
    np.testing.assert_allclose(torch.softmax(got, -1).numpy(), probabilities, rtol=0, atol=ATOL)


def test_twin_attention_equals_the_onnx_softmax() -> None:
    path = MODELS / "text_sentiment" / "1" / "model.onnx"
    x = inputs_of("text_sentiment")
    *_, attention = onnx_run(path, x, extra=ATTENTION)  # (300, 1, 16, 16)
    twin = torch_models.from_onnx(path)
    seen: list[torch.Tensor] = []
    twin.attention.softmax.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        twin(torch.from_numpy(x))
    np.testing.assert_allclose(seen[0].numpy(), attention, rtol=0, atol=ATOL)
    assert np.all(attention[x[:, None, None, :].repeat(16, axis=2) == 0] == 0)  # no pad keys


def test_twin_gives_input_gradients() -> None:
    twin = torch_models.from_onnx(MODELS / "digits_cnn" / "1" / "model.onnx")
    image = torch.from_numpy(inputs_of("digits_cnn")[:2]).requires_grad_(True)
    twin(image)[:, 3].sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_a_model_without_a_twin_is_refused() -> None:
    with pytest.raises(ValueError, match="no PyTorch twin"):
        torch_models.from_onnx(MODELS / "breast_cancer_mlp" / "1" / "model.onnx")

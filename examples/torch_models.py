"""PyTorch twins of the bundled deep-learning examples, and the code that trains and exports them.

The only module of the project that imports torch (the optional ``torch`` extra). The committed
ONNX files are the source of truth: ``from_onnx(path)`` rebuilds the matching ``nn.Module`` from
the file's initializers (no pickles, no ``.pt`` files), so a benchmark can compare gradients of
the ONNX graph against Captum on the same network.

Every parameter is stored in the ONNX file as an initializer with its ``state_dict`` name and
layout: ``Projection`` keeps its weight as ``(in, out)`` because the TorchScript exporter turns
``nn.Linear`` on a 3-D input into ``MatMul`` with a constant-folded, renamed transpose.

A twin's ``forward`` returns the logits; the ONNX file's ``probabilities`` output is
``torch.softmax(twin(x), dim=-1)``. Each nonlinearity is its own module (Captum's DeepLift and
layer methods hook modules, and DeepLift needs them unshared).
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from onnx import numpy_helper
from torch import nn

OPSET = 17
PAD_ID = 0
MASKED_SCORE = -1e9  # added to attention scores whose key is padding: exp() underflows to 0
# Label smoothing keeps the logits small (|logit| about 5 instead of 40): probabilities are not
# saturated (their gradients and Shapley values stay informative) and float32 rounding
# differences between onnxruntime and torch stay under 1e-5 (4e-6; 2.5e-5 without).
LABEL_SMOOTHING = 0.1


class DigitsCNN(nn.Module):
    """Conv(1->8) ReLU Conv(8->16) ReLU MaxPool(2) Flatten Linear(256->10) on 8x8 digits."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(16 * 4 * 4, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes) of images (N, 1, 8, 8) scaled to 0..1."""
        x = self.relu1(self.conv1(image))  # (N, 8, 8, 8)
        x = self.pool(self.relu2(self.conv2(x)))  # (N, 16, 4, 4)
        return self.head(self.flatten(x))  # (N, classes)


class Projection(nn.Module):
    """``x @ weight + bias`` with ``weight`` stored (in, out), exported as MatMul + Add."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim_in)  # nn.Linear's default initialisation
        self.weight = nn.Parameter(torch.empty(dim_in, dim_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(dim_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        return x @ self.weight + self.bias


class SelfAttention(nn.Module):
    """One head of scaled dot-product self-attention with padded keys masked out.

    The head axis is kept (scores are (N, 1, T, T)) so the exported Softmax has rank 4 like
    multi-head attention in exported transformers.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = Projection(dim, dim)
        self.key = Projection(dim, dim)
        self.value = Projection(dim, dim)
        self.softmax = nn.Softmax(dim=-1)
        self.scale = math.sqrt(dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Attend over x (N, T, D); pad (N, T) is True where the token is padding."""
        q = self.query(x).unsqueeze(1)  # (N, 1, T, D)
        k = self.key(x).unsqueeze(1)  # (N, 1, T, D)
        v = self.value(x).unsqueeze(1)  # (N, 1, T, D)
        scores = q @ k.transpose(-1, -2) / self.scale  # (N, 1, T, T)
        scores = scores + pad[:, None, None, :].float() * MASKED_SCORE
        return (self.softmax(scores) @ v).squeeze(1)  # (N, T, D)


class FeedForward(nn.Module):
    """Position-wise ``down(relu(up(x)))``: lets a token combine what attention brought it
    (e.g. "the previous word is *not*") with its own meaning, which a sum cannot."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = Projection(dim, hidden)
        self.relu = nn.ReLU()
        self.down = Projection(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, T, D)."""
        return self.down(self.relu(self.up(x)))


class TextClassifier(nn.Module):
    """Embedding + positions, one encoder block (self-attention and feed-forward, each with a
    residual), mean over non-pad tokens, Linear head. Positions tell "not good" from "good not"."""

    def __init__(self, vocab_size: int, seq_len: int = 16, dim: int = 16, hidden: int = 32,
                 classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(0.1 * torch.randn(seq_len, dim))
        self.attention = SelfAttention(dim)
        self.feed_forward = FeedForward(dim, hidden)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes) of token ids (N, T), PAD_ID = padding."""
        pad = tokens == PAD_ID  # (N, T)
        x = self.embedding(tokens) + self.position  # (N, T, D)
        h = x + self.attention(x, pad)  # (N, T, D)
        h = h + self.feed_forward(h)  # (N, T, D)
        keep = (~pad).unsqueeze(-1).float()  # (N, T, 1)
        pooled = (h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)  # (N, D)
        return self.head(pooled)  # (N, classes)


def seed_everything(seed: int) -> None:
    """Make torch's initialisation and training reproducible: one thread, fixed seed."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def train(
    model: nn.Module, inputs: NDArray[np.generic], labels: NDArray[np.int64],
    epochs: int, lr: float, batch: int = 64, seed: int = 0, smoothing: float = LABEL_SMOOTHING,
) -> nn.Module:
    """Adam on label-smoothed cross-entropy over shuffled mini-batches; returns it in eval mode."""
    X, y = torch.from_numpy(inputs), torch.from_numpy(labels)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(X), generator=order).split(batch):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(X[rows]), y[rows], label_smoothing=smoothing)
            loss.backward()
            optimiser.step()
    return model.eval()


def predict(model: nn.Module, inputs: NDArray[np.generic]) -> NDArray[np.float32]:
    """The model's logits (N, classes) as numpy."""
    with torch.no_grad():
        return model(torch.from_numpy(inputs)).numpy()


def export_onnx(model: nn.Module, example: NDArray[np.generic], input_name: str) -> onnx.ModelProto:
    """Export with the TorchScript exporter at opset 17, batch axis dynamic, plus a Softmax.

    Outputs: ``probabilities`` (Softmax of the logits, first) and ``logits``. The TorchScript
    exporter needs no onnxscript and emits plain ai.onnx ops (no com.microsoft fusions).
    """
    buffer = io.BytesIO()
    batch = {0: "N"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based export"
        torch.onnx.export(
            model, (torch.from_numpy(example),), buffer, dynamo=False, opset_version=OPSET,
            input_names=[input_name], output_names=["logits"],
            dynamic_axes={input_name: batch, "logits": batch},
        )
    return add_probabilities(onnx.load_from_string(buffer.getvalue()))


def add_probabilities(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Append ``probabilities = Softmax(logits, axis=-1)`` and make it the first output."""
    graph = proto.graph
    (logits,) = graph.output
    graph.node.append(onnx.helper.make_node("Softmax", ["logits"], ["probabilities"],
                                            name="/Softmax_probabilities", axis=-1))
    probabilities = onnx.ValueInfoProto()
    probabilities.CopyFrom(logits)
    probabilities.name = "probabilities"
    graph.output.insert(0, probabilities)
    return proto


def from_onnx(path: str | Path) -> nn.Module:
    """The PyTorch twin of a bundled ONNX model, with the weights read from its initializers."""
    proto = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    model = _empty_twin(proto.graph.input[0].name, weights)
    state = model.state_dict()
    missing = [name for name in state if name not in weights]
    if missing:
        raise ValueError(f"{path}: no initializers for {missing}")
    model.load_state_dict({name: torch.from_numpy(weights[name].copy()) for name in state})
    return model.eval()


def _empty_twin(input_name: str, weights: dict[str, NDArray[np.generic]]) -> nn.Module:
    """An untrained module of the right class and size, chosen by the graph's input name."""
    if input_name == "image":
        return DigitsCNN(classes=weights["head.weight"].shape[0])
    if input_name == "tokens":
        vocab_size, dim = weights["embedding.weight"].shape
        return TextClassifier(vocab_size, seq_len=weights["position"].shape[0], dim=dim,
                              hidden=weights["feed_forward.up.weight"].shape[1],
                              classes=weights["head.weight"].shape[0])
    raise ValueError(f"no PyTorch twin for a model whose input is {input_name!r}")

"""Gradient cost against forward cost, and adjoint build times, for the gradient backend.

Models: the small CNN (8x8) and text model (6 tokens, one attention head) of the gradient tests,
and a ResNet-like CNN with random weights (3x32x32 input, a stem, two residual stages with a
strided projection, global average pooling, Gemm, Softmax) built here with onnx.helper. For
one row and a batch of 32: the forward time of the model in a plain onnxruntime session (the
backend's session options: one intra-op thread, no spinning) and the time of
GradientModel.value_and_grad (values and gradients of one logit column, feeds built from flat
rows as the methods call it), interleaved, medians of REPEATS. The ratio is gradient / forward;
the target is <= 3. Build times: preparation (opset, shape inference, cuts, probe sessions)
and each pinned batch size's adjoint (ORT basic pre-pass, onnx-ad, session).

Usage: python -m benchmarks.gradients [--quick]; `run(quick)` returns the Markdown table.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from explainers.base import Array
from explainers.gradients.backend import GradientModel, session
from tests import gradient_models

REPEATS = 30


@dataclass(frozen=True)
class Case:
    name: str
    model: onnx.ModelProto
    feeds: Callable[[Array], dict[str, Array]]
    elements: int
    rows: Callable[[int], Array]  # n -> (n, elements) inputs


def resnet(side: int = 32, width: int = 16, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """A small ResNet with random weights: stem conv, a residual block at `width` channels, a
    strided projection to 2 * width, a second residual block, GAP, Gemm, Softmax."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def conv(x: str, cin: int, cout: int, name: str, stride: int = 1, relu: bool = True) -> str:
        kernel = rng.normal(size=(cout, cin, 3, 3)) / np.sqrt(9 * cin)
        inits.extend([numpy_helper.from_array(kernel.astype(np.float32), f"{name}_w"),
                       numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}_b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [name],
                                      pads=[1, 1, 1, 1], strides=[stride, stride],
                                      kernel_shape=[3, 3]))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}_r"]))
        return f"{name}_r"

    def block(x: str, c: int, name: str) -> str:
        h = conv(conv(x, c, c, f"{name}a"), c, c, f"{name}b", relu=False)
        nodes.extend([helper.make_node("Add", [x, h], [f"{name}_sum"]),
                      helper.make_node("Relu", [f"{name}_sum"], [f"{name}_out"])])
        return f"{name}_out"

    h = block(conv("image", 3, width, "stem"), width, "block1")
    h = block(conv(h, width, 2 * width, "down", stride=2), 2 * width, "block2")
    inits.extend([numpy_helper.from_array(
        (rng.normal(size=(classes, 2 * width)) / np.sqrt(2 * width)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b")])
    nodes.extend([helper.make_node("GlobalAveragePool", [h], ["gap"]),
                  helper.make_node("Flatten", ["gap"], ["flat"]),
                  helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
                  helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)])
    graph = helper.make_graph(
        nodes, "resnet", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                        ["N", 3, side, side])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def cases() -> list[Case]:
    rng = np.random.default_rng(0)
    return [
        Case("CNN 1x8x8", gradient_models.cnn(),
             gradient_models.feeds_for("image", (1, 8, 8), np.float32), 64,
             lambda n: rng.normal(size=(n, 64))),
        Case("text 6 tokens, attention", gradient_models.text(),
             gradient_models.feeds_for("tokens", (6,), np.int64), 6,
             lambda n: rng.integers(0, 20, size=(n, 6)).astype(np.float64)),
        Case("ResNet-like 3x32x32", resnet(),
             gradient_models.feeds_for("image", (3, 32, 32), np.float32), 3 * 32 * 32,
             lambda n: rng.normal(size=(n, 3 * 32 * 32))),
    ]


def _median_pair(forward: Callable[[], object], gradient: Callable[[], object],
                 repeats: int) -> tuple[float, float]:
    """Median seconds of each, interleaved so load affects both alike."""
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for k, fn in enumerate((forward, gradient)):
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return float(np.median(times[0])), float(np.median(times[1]))


def measure(case: Case, repeats: int) -> list[str]:
    """Table rows for one model: 1 row and 32 rows, then the build times."""
    gm = GradientModel.build(case.model, case.feeds, case.elements, "probabilities", [0])
    gm.warm()
    plain = session(case.model)
    rows = []
    for n in (1, 32):
        X = case.rows(n)
        feeds = case.feeds(X)
        fwd, grad = _median_pair(lambda f=feeds: plain.run(None, f),  # type: ignore[misc]
                                 lambda X=X: gm.value_and_grad(X), repeats)  # type: ignore[misc]
        rows.append(f"| {case.name} | {n} | {1e3 * fwd:.3f} | {1e3 * grad:.3f} | "
                    f"{grad / fwd:.2f} |")
    built = gm.adjoint_seconds
    adjoints = " / ".join(f"{1e3 * built[b]:.0f}" for b in sorted(built))
    prep = gm.build_seconds - sum(built.values())
    rows.append(f"| {case.name} | build | prep {1e3 * prep:.0f} ms | adjoints (batch 1 / 32) "
                f"{adjoints} ms | engine {gm.engine} |")
    return rows


def run(quick: bool) -> str:
    repeats = 5 if quick else REPEATS
    lines = ["### Gradients: cost against a forward pass, and adjoint build times", "",
             "Gradient = GradientModel.value_and_grad (one logit column, onnx-ad adjoint in "
             "onnxruntime); forward = the model in a plain session with the same options. "
             f"Medians of {repeats} interleaved runs. Target: ratio <= 3.", "",
             "| model | rows | forward ms | gradient ms | ratio |",
             "| --- | --- | --- | --- | --- |"]
    for case in cases():
        lines.extend(measure(case, repeats))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    print(run(parser.parse_args().quick))

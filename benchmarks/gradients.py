"""Gradient cost against forward cost, and adjoint build times, for the gradient backend.

Models: the bundled CNN (examples/models/digits_cnn: 1x8x8, two convolutions, MaxPool) and text
model (text_sentiment: 16 tokens, embedding, one attention head, feed-forward; gradients at the
embedding output), and a ResNet-like CNN with random weights (3x32x32 input, a stem, two residual
stages with a strided projection, global average pooling, Gemm, Softmax) built here with
onnx.helper. For
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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks._models import ROOT
from explainers.base import Array
from explainers.gradients.backend import GradientModel, session
from tests import gradient_models

REPEATS = 30
WHY = """What changed, lever by lever (explainers/gradients/tidy.py rewrites onnx-ad's adjoint
before its session; every rewrite is exact, tests/test_gradient_tidy.py checks each against
onnx-ad's own graph and finite differences). Ratios of the adjoint session alone, interleaved
in one run, thread CPU time, load average 2.0-3.0 on 2 cores, before -> after:

- *Seed axis pinned* to the number of explained columns, then static shapes: dead weight
  gradients dropped, Expand/Reshape/Identity aliases bypassed, Transposes that move only the
  size-1 seed axis turned into Reshapes, reshape chains merged. Digits CNN 3.5 -> 2.4 (1 row),
  4.0 -> 3.6 (32 rows); text model 3.1 -> 2.4, 3.0 -> 2.5; ResNet-like 3.8 -> 3.6. (A scalar
  seed, the sum over rows of one column, was not needed and would not help: onnx-ad appends
  the seed axis to every derivative tensor even for a scalar output, so pinning its extent is
  what removes the nodes around it.)
- *ReLU masks*: onnx-ad's Greater(a, 0) read the Conv output, which kept onnxruntime from
  fusing Conv+ReLU; reading the ReLU's output instead gives the same mask and the fusion.
  The adjoint session was already at ORT_ENABLE_ALL (blocked NCHWc Convs included), one
  thread, like the plain session: the optimisation level was not the lever, this was.
  Digits CNN 3.6 -> 3.4 at 32 rows, ResNet-like -0.05.
- *Global average pool*: its gradient was spread over the feature maps, then divided; the
  division now comes first, on the pooled tensor. ResNet-like 3.6 -> 3.1 (1 row), 3.8 -> 3.4.
- *ConvTranspose -> Conv* with the flipped kernel (stride 1, at least 16 channels each way):
  ResNet-like 3.1 -> 3.0, 3.4 -> 3.1. On the digits CNN (16 -> 8 and 8 -> 1 channels) the
  blocked Conv is slower (3.4 -> 4.1), so narrow ones stay ConvTransposes.
- *MaxPool* (windows that tile the input): onnx-ad scatters the pooled gradient onto zeros at
  the pool's indices with ScatterND, a generic kernel; MaxUnpool does the same scatter in one
  pass (digits CNN, 32 rows: the pool's gradient 177 -> ~45 us, 3.8 -> 3.15 on a quiet
  machine). Window arithmetic on the pooled maximum (an earlier version: ~20 small kernels),
  ArgMax over a transposed window axis and SpaceToDepth were all slower than MaxUnpool.
- *ReLU mask before the unpool*: the mask of the ReLU feeding a MaxPool multiplies the unpooled
  gradient, which is zero off each window's maximum, so it moves onto the pooled tensor (a
  quarter of the elements); reshapes around element-wise ops sink so masks meet their inputs.
- *The seed a constant*: the same one-hot every call, so onnxruntime folds the head's gradient
  into constants when it creates the session (digits CNN -6%).
- *The seed axis's slow kernels*: onnxruntime runs an element-wise op with a one-element operand
  and a reduction followed by extent-1 axes one element at a time when the innermost axis has
  extent 1 ([32,16,16,1] / [1]: 57 us; without the axis: 5). Reshaping that axis away around
  them, and dropping onnx-ad's sums over extent-1 axes, took the text model from 2.9 to 1.8 at
  32 rows and 2.5 to 2.3 at one row; the ResNet-like from 2.85 to 2.55 at one row.
- *Python*: value_and_grad at a pinned batch size skips slicing and padding, and reshapes
  instead of moving axes; each gradient output is written by its producer, not copied into
  place.

Tried and dropped: Sign(y) for a ReLU's 0/1 mask (one kernel instead of Greater and Cast, but
onnxruntime's Sign is slower than both: ResNet-like 2.6 -> 3.0), Where for the mask (3x slower
than Cast and Mul), the 16 -> 8 channel ConvTranspose as a Conv (plain or padded to 16 output
channels for the blocked layout: 63 -> 66-68 us), flushing denormals, no prepacking.

Where the time goes, digits CNN at 32 rows (quiet machine, per-kernel profile): the backward
convolutions 62 + 12 us against the forward's 44 + 8 (ConvTranspose runs one small GEMM and a
col2im per image; the forward's Convs run in the blocked NCHWc layout, which needs 16 output
channels, and the first ConvTranspose has 8); MaxPool with indices 39 us (a scalar loop,
where the forward's pool runs blocked in 4); MaxUnpool 7; masks ~14; layout reorders ~8. The
ratio sits at 2.9-3.1 there (median 3.03 over eleven quiet runs on 2026-12-02): what is left
is onnxruntime's kernels, not the graph.
"""


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


def bundled(name: str) -> onnx.ModelProto:
    return onnx.load(ROOT / "examples" / "models" / name / "1" / "model.onnx")


def cases() -> list[Case]:
    rng = np.random.default_rng(0)
    return [
        Case("digits_cnn (bundled) 1x8x8", bundled("digits_cnn"),
             gradient_models.feeds_for("image", (1, 8, 8), np.float32), 64,
             lambda n: rng.random(size=(n, 64))),
        Case("text_sentiment (bundled) 16 tokens", bundled("text_sentiment"),
             gradient_models.feeds_for("tokens", (16,), np.int64), 16,
             lambda n: rng.integers(2, 50, size=(n, 16)).astype(np.float64)),
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


def measure(case: Case, repeats: int) -> tuple[list[str], list[float]]:
    """Table rows for one model (1 row and 32 rows, then the build times) and the ratios."""
    gm = GradientModel.build(case.model, case.feeds, case.elements, "probabilities", [0])
    gm.warm()
    plain = session(case.model)
    rows, ratios = [], []
    for n in (1, 32):
        X = case.rows(n)
        feeds = case.feeds(X)
        fwd, grad = _median_pair(lambda f=feeds: plain.run(None, f),  # type: ignore[misc]
                                 lambda X=X: gm.value_and_grad(X), repeats)  # type: ignore[misc]
        rows.append(f"| {case.name} | {n} | {1e3 * fwd:.3f} | {1e3 * grad:.3f} | "
                    f"{grad / fwd:.2f} |")
        ratios.append(grad / fwd)
    built = gm.adjoint_seconds
    adjoints = " / ".join(f"{1e3 * built[b]:.0f}" for b in sorted(built))
    prep = gm.build_seconds - sum(built.values())
    rows.append(f"| {case.name} | build | prep {1e3 * prep:.0f} ms | adjoints (batch 1 / 32) "
                f"{adjoints} ms | engine {gm.engine} |")
    return rows, ratios


def run(quick: bool) -> str:
    repeats = 5 if quick else REPEATS
    load = os.getloadavg()[0]
    lines = ["## Gradients: cost against a forward pass, and adjoint build times (issue 13)", "",
             f"Load average (1 min) {load:.1f} on 2 cores at the start.", "",
             "Gradient = GradientModel.value_and_grad (one logit column, onnx-ad adjoint in "
             "onnxruntime); forward = the model in a plain session with the same options. "
             f"Medians of {repeats} interleaved runs. Target: ratio <= 3.", "",
             "| model | rows | forward ms | gradient ms | ratio |",
             "| --- | --- | --- | --- | --- |"]
    ratios = []
    first = cases()[0]  # one throwaway build: the first in a process pays one-time set-up
    GradientModel.build(first.model, first.feeds, first.elements, "probabilities", [0])
    for case in cases():
        rows, found = measure(case, repeats)
        lines.extend(rows)
        ratios.extend(found)
    met = sum(r <= 3 for r in ratios)
    verdict = (f"Target ratio <= 3: {'met' if met == len(ratios) else '**missed**'} in "
               f"{len(ratios) - met if met < len(ratios) else met} of {len(ratios)} cases "
               f"(ratios {min(ratios):.1f} to {max(ratios):.1f}).")
    return "\n".join([*lines, "", verdict, "", WHY])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    print(run(parser.parse_args().quick))

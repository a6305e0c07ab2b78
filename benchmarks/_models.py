"""The models the Shapley benchmark runs on: the bundled breast-cancer MLP and GBDT (30 features,
log-odds of the positive class, 100-row backgrounds) and a 100-feature synthetic ReLU MLP built
here with onnx.helper. Each is loaded through the service's own adapter
(service.models.onnx_model), so every figure includes what the service pays per model call."""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from explainers.base import Array, Background, Evaluator, ModelFn
from service.models.onnx_model import OnnxModel
from service.plane.targets import apply_scale

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-cache"
MODELS = ROOT / "examples" / "models"
SYNTHETIC = "synthetic_mlp100"
SYNTHETIC_FEATURES, SYNTHETIC_HIDDEN, SYNTHETIC_BACKGROUND = 100, 64, 100


@dataclass(frozen=True)
class Case:
    """One explained function with its background and the rows the benchmark explains."""

    name: str
    label: str
    model: OnnxModel
    output: str
    column: int
    scale: str
    background: Background
    X: Array  # (rows, features) rows to explain

    def fn(self) -> ModelFn:
        """The explained function, as the data plane builds it: one column, on its scale."""
        model, output, col, scale = self.model, self.output, [self.column], self.scale

        def f(X: Array) -> Array:
            return apply_scale(model.predict(X, output)[:, col], scale)

        return f

    def evaluator(self, fn: ModelFn | None = None) -> Evaluator:
        """A fresh per-request evaluator seeded with the throughput measured at load."""
        return Evaluator(fn or self.fn(), self.model.chunk_rows, self.model.rows_per_second,
                         dtype=self.model.batch_dtype, path_major=self.model.has_trees)

    def plain(self, X: Array) -> None:
        """One plain onnxruntime call on an already-built float32 batch (the overhead baseline)."""
        self.model.session.run([self.output], {self.model.inputs[0].name: X})

    @property
    def d(self) -> int:
        return int(self.X.shape[1])


def breast_cancer_rows(n: int) -> Array:
    """The first n rows of the bundled models' held-out split (same split as the builder)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    X = np.asarray(data.data, np.float32)
    _, X_test = train_test_split(X, test_size=0.2, random_state=0)
    return np.asarray(X_test[:n], np.float64)


def bundled(name: str, label: str, rows: int) -> Case:
    """A bundled classifier explained on the log-odds of class 1, as its explain.yaml says."""
    model = OnnxModel(MODELS / name / "1" / "model.onnx")
    bg = np.load(MODELS / name / "background.npy").astype(np.float64)
    output = model.main_output()
    model.measure(bg, output)
    case = Case(name, label, model, output, 1, "logit", Background.build(bg, bg[:, :1]),
                breast_cancer_rows(rows))
    return _with_predictions(case)


def gbdt_margin(rows: int) -> Case:
    """The bundled GBDT explained on its margin (the log-odds as the trees sum it).

    Same trees, with the ensemble's post_transform set to NONE, so exact TreeSHAP is the exact
    answer for the explained function itself. (The log of float32 probabilities that the
    service's logit scale explains carries rounding noise of up to ~1e-3 at margins near 10.)
    """
    directory = CACHE / "models" / "breast_cancer_gbdt_margin"
    source = MODELS / "breast_cancer_gbdt"
    if not (directory / "1" / "model.onnx").exists():
        proto = onnx.load(source / "1" / "model.onnx")
        for node in proto.graph.node:
            for attr in node.attribute:
                if node.op_type.startswith("TreeEnsemble") and attr.name == "post_transform":
                    attr.s = b"NONE"
        (directory / "1").mkdir(parents=True, exist_ok=True)
        onnx.save(proto, directory / "1" / "model.onnx")
    model = OnnxModel(directory / "1" / "model.onnx")
    bg = np.load(source / "background.npy").astype(np.float64)
    output = model.main_output()
    model.measure(bg, output)
    case = Case("breast_cancer_gbdt", "GBDT (100 trees), 30 features", model, output, 1,
                "identity", Background.build(bg, bg[:, :1]), breast_cancer_rows(rows))
    return _with_predictions(case)


def synthetic(rows: int) -> Case:
    """A 100-feature ReLU MLP (100-64-64-1) on correlated Gaussian inputs, identity scale."""
    directory = synthetic_dir()
    model = OnnxModel(directory / "1" / "model.onnx")
    bg = np.load(directory / "background.npy").astype(np.float64)
    model.measure(bg, "y")
    X = synthetic_inputs(rows, np.random.default_rng(1))
    case = Case(SYNTHETIC, "synthetic MLP, 100 features", model, "y", 0, "identity",
                Background.build(bg, bg[:, :1]), X)
    return _with_predictions(case)


def _with_predictions(case: Case) -> Case:
    data = case.background.data
    bg = Background.build(data, case.fn()(data))
    return Case(case.name, case.label, case.model, case.output, case.column, case.scale, bg,
                case.X)


def synthetic_inputs(n: int, rng: np.random.Generator) -> Array:
    """Rows with pairwise correlations from 4 shared factors, float32-representable."""
    mix = np.random.default_rng(7).normal(size=(4, SYNTHETIC_FEATURES)) * 0.5
    X = rng.normal(size=(n, SYNTHETIC_FEATURES)) + rng.normal(size=(n, 4)) @ mix
    return np.asarray(X.astype(np.float32), np.float64)


def synthetic_dir() -> Path:
    """Write the synthetic model as a Triton-layout entry (idempotent), return its directory."""
    directory = CACHE / "models" / SYNTHETIC
    if not (directory / "1" / "model.onnx").exists():
        (directory / "1").mkdir(parents=True, exist_ok=True)
        onnx.save(synthetic_mlp(), directory / "1" / "model.onnx")
        bg = synthetic_inputs(SYNTHETIC_BACKGROUND, np.random.default_rng(0))
        np.save(directory / "background.npy", bg.astype(np.float32))
        (directory / "explain.yaml").write_text(
            "method: auto\nbudget_ms: 200\nbackground: {path: background.npy}\n")
    return directory


def synthetic_mlp() -> onnx.ModelProto:
    """Random He-initialised weights (seed 0); float32 in and out."""
    return relu_mlp([SYNTHETIC_FEATURES, SYNTHETIC_HIDDEN, SYNTHETIC_HIDDEN, 1], SYNTHETIC)


def relu_mlp(sizes: list[int], name: str, seed: int = 0) -> onnx.ModelProto:
    """A ReLU MLP with layer sizes `sizes` (input first, one output last), random
    He-initialised float32 weights from `seed`; input "input" [N, sizes[0]], output "y"."""
    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "input"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        W = (rng.normal(size=(a, b)) * np.sqrt(2.0 / a)).astype(np.float32)
        c = (rng.normal(size=b) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(W, f"W{i}"), numpy_helper.from_array(c, f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"h{i}"])]
        prev = f"h{i}"
        if b != 1:
            nodes.append(helper.make_node("Relu", [prev], [f"a{i}"]))
            prev = f"a{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def repository() -> Path:
    """A model repository with the three benchmark models, for a real gRPC server."""
    repo = CACHE / "repo"
    for name, source in (("breast_cancer_mlp", MODELS / "breast_cancer_mlp"),
                         ("breast_cancer_gbdt", MODELS / "breast_cancer_gbdt"),
                         (SYNTHETIC, synthetic_dir())):
        if not (repo / name).exists():
            shutil.copytree(source, repo / name)
    return repo


def cases(rows: int, synthetic_rows: int) -> list[Case]:
    """The three benchmark models, each with the rows it explains."""
    return [bundled("breast_cancer_mlp", "MLP (64-64), 30 features", rows),
            gbdt_margin(rows), synthetic(synthetic_rows)]

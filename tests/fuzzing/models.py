"""The fuzzed server's repository (the bundled models, an INT64 token-id model, a two-input
model and an image model with an empty and a -inf weight) and what the generator knows of each
served model: inputs, outputs, valid rows, and the tensors, weights and attention layers the
Layers service lists."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper

from explainers.base import Array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from sidelight.v1 import layers_pb2 as lpb
from sidelight.v1 import layers_pb2_grpc as lpb_grpc

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "models"
SPEC_TIMEOUT_S = 10.0
VOCAB, TOKENS = 10, 4
FLOATS = ("FP16", "FP32", "FP64")  # inputs activation maximisation can ascend


def token_model() -> onnx.ModelProto:
    """score = sum_j E[ids_j]: an INT64 token-id input read through Gather (ids index a table)."""
    table = np.linspace(-1.0, 1.0, VOCAB).astype(np.float32)  # (VOCAB,)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], axis=0),  # (N, TOKENS)
             helper.make_node("ReduceSum", ["emb", "axes"], ["score"], keepdims=1)]  # (N, 1)
    graph = helper.make_graph(
        nodes, "tokens", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", TOKENS])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor("E", TensorProto.FLOAT, [VOCAB], table),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def pair_model() -> onnx.ModelProto:
    """probs = softmax([a, b] @ W) and its logits: an FP32 [N, 2] and an FP64 rank-1 [N] input."""
    W = np.array([[1.0, -1.0], [0.5, 2.0], [-1.5, 0.25]], dtype=np.float32)  # (3, 2)
    nodes = [helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["bf", "axes"], ["b2"]),  # (N, 1)
             helper.make_node("Concat", ["a", "b2"], ["ab"], axis=1),  # (N, 3)
             helper.make_node("MatMul", ["ab", "W"], ["logits"]),  # (N, 2)
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    graph = helper.make_graph(
        nodes, "pair",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("b", TensorProto.DOUBLE, ["N"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor("W", TensorProto.FLOAT, [3, 2], W.ravel()),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def masked_model() -> onnx.ModelProto:
    """logits = max(flatten(resize(image)) @ W, -inf), probs = softmax(logits): an image
    model whose weights include an empty ROI (as exports write for Resize) and a -inf
    constant (as masks are written)."""
    W = np.array([[1.0, -1.0], [0.5, 2.0], [-1.5, 0.25], [0.0, 1.0]], np.float32)  # (4, 2)
    nodes = [helper.make_node("Resize", ["image", "roi", "scales"], ["resized"], mode="nearest"),
             helper.make_node("Flatten", ["resized"], ["flat"], axis=1),  # (N, 4)
             helper.make_node("MatMul", ["flat", "W"], ["scores"]),  # (N, 2)
             helper.make_node("Max", ["scores", "floor"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    graph = helper.make_graph(
        nodes, "masked",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor("roi", TensorProto.FLOAT, [0], []),
         helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 1.0, 1.0]),
         helper.make_tensor("W", TensorProto.FLOAT, [4, 2], W.ravel()),
         helper.make_tensor("floor", TensorProto.FLOAT, [1], [-np.inf])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _extra_models() -> dict[str, tuple[onnx.ModelProto, Array]]:
    """Name -> (model, background (rows, *input shape)) of the models built for the fuzz run."""
    rng = np.random.default_rng(0)
    return {"fuzz_tokens": (token_model(), rng.integers(0, VOCAB, (40, TOKENS)).astype(float)),
            "fuzz_pair": (pair_model(), rng.normal(size=(40, 3))),
            "fuzz_masked": (masked_model(), rng.normal(size=(40, 1, 2, 2)))}


def build_repository(root: Path) -> Path:
    """A model repository under `root`: every bundled model (symlinked: the tabular ones, the
    digits CNN and the text model with attention) and the three built here."""
    root.mkdir(parents=True, exist_ok=True)
    for bundled in sorted(p for p in EXAMPLES.iterdir() if p.is_dir()):
        (root / bundled.name).symlink_to(bundled, target_is_directory=True)
    for name, (model, background) in _extra_models().items():
        write_model(root, name, model, background)
    return root


def write_model(root: Path, name: str, model: onnx.ModelProto, background: Array) -> None:
    """A model folder under `root`: version 1 and its background file."""
    (root / name / "1").mkdir(parents=True)
    onnx.save(model, root / name / "1" / "model.onnx")
    np.save(root / name / "background.npy", background)
    (root / name / "explain.yaml").write_text("background: {path: background.npy}\n")


@dataclass(frozen=True)
class InputSpec:
    """One model input as GetModel reports it."""

    name: str
    datatype: str
    rank: int
    columns: int
    shape: tuple[int, ...] = ()  # the element shape (without the batch axis)


@dataclass(frozen=True)
class LayerSpec:
    """One tensor ListLayers reports: its name, per-row shape (None: unknown rank), datatype,
    and axis 1's size when it is a channel axis reductions and the channel objective read."""

    name: str
    shape: tuple[int, ...] | None
    datatype: str
    channels: int  # axis 1's size for a (rows, channels, ...) tensor, else 0


@dataclass(frozen=True)
class ModelSpec:
    """A served model: its inputs, outputs, feature names, rows of valid values, and what
    the Layers service lists of it."""

    name: str
    version: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    features: tuple[str, ...]
    rows: Array  # (rows, features) valid inputs: the model's background file
    columns: tuple[int, ...] = ()  # per output, its columns (1 when unknown)
    layers: tuple[LayerSpec, ...] = ()
    weights: tuple[str, ...] = ()  # names and aliases GetWeights reports
    attention: bool = False  # GetAttention finds attention layers

    def split(self, X: Array) -> list[Array]:
        """X (rows, elements) as one array per input, shaped (rows, *its element shape)."""
        edges = np.cumsum([0] + [i.columns for i in self.inputs])
        parts = [X[:, a:b] for a, b in itertools.pairwise(edges)]
        return [p.reshape(p.shape[0], *i.shape) for p, i in zip(parts, self.inputs, strict=True)]

    @property
    def ascendable(self) -> bool:
        """Activation maximisation applies: some input is floating point."""
        return any(i.datatype in FLOATS for i in self.inputs)

    @property
    def channel_layers(self) -> tuple[LayerSpec, ...]:
        """Tensors with a channel axis (float ones: the channel objective's)."""
        return tuple(s for s in self.layers if s.channels > 0 and s.datatype in FLOATS)


def read_specs(channel: grpc.Channel, root: Path) -> list[ModelSpec]:
    """Every READY model of the server, with its background file's rows as valid values and
    its tensors, weights and attention layers from the Layers service."""
    stub, layers = pb_grpc.ExplainerStub(channel), lpb_grpc.LayersStub(channel)
    models = stub.ListModels(pb.ListModelsRequest(), timeout=SPEC_TIMEOUT_S).models
    return [_spec(stub.GetModel(pb.GetModelRequest(model=m.name), timeout=SPEC_TIMEOUT_S),
                  layers, root) for m in models if m.state == "READY"]


def _spec(info: pb.ModelInfo, layers: lpb_grpc.LayersStub, root: Path) -> ModelSpec:
    inputs = tuple(InputSpec(i.name, i.datatype, len(i.shape), int(np.prod(i.shape[1:])),
                             tuple(int(d) for d in i.shape[1:])) for i in info.inputs)
    path = root / info.name / "background.npy"
    rows = np.load(path) if path.exists() else np.zeros((1, len(info.feature_names)))
    rows = rows.reshape(rows.shape[0], -1)  # (rows, elements): images are stored (N, C, H, W)
    listing = layers.ListLayers(lpb.ListLayersRequest(model=info.name), timeout=SPEC_TIMEOUT_S)
    weights = layers.GetWeights(lpb.WeightsRequest(model=info.name), timeout=SPEC_TIMEOUT_S)
    return ModelSpec(
        info.name, info.version, inputs, tuple(o.name for o in info.outputs),
        tuple(info.feature_names), np.asarray(rows, np.float64),
        tuple(max(int(np.prod(o.shape[1:])), 1) for o in info.outputs),
        tuple(_layer(t) for t in listing.layers),
        tuple(n for w in weights.weights for n in (w.name, *w.aliases)),
        bool(listing.attention_layers))


def _layer(t: lpb.LayerInfo) -> LayerSpec:
    """A listed tensor; axis 1 counts as channels for a known (1, C, ...) shape with rows."""
    shape = tuple(int(d) for d in t.shape) if t.rank_known else None
    channels = shape[1] if shape and len(shape) >= 2 and t.batch_axis == 0 and shape[1] > 0 \
        else 0
    return LayerSpec(t.name, shape, t.datatype, channels)

"""Attention maps: the attention probabilities of every attention layer of a transformer
export, as (rows, heads, queries, keys) per layer, stacked to [layers, heads, queries, keys]
per row when the layers agree in shape.

Two sources (field notes, "Gradients of ONNX graphs"): the pattern of an unfused export, a
Softmax over the last axis of a rank-4 (rows, heads, queries, keys) or rank-3 (rows, queries,
keys: one head; or rows * heads folded, N-major) tensor whose last two sizes agree where
known, fed through Add/Div/Mul/Sub/Where/Cast by a MatMul(Q, K^T) and feeding, through
Cast/Where/Dropout/Identity, the first operand of a MatMul(., V); and the standard ONNX
`Attention` op (opset 23), on a copy with qk_matmul_output_mode=3 and its 4th output wired.
Fused com.microsoft attention ops compute the probabilities internally and never expose them:
such a graph is refused, naming the op. Where a mask removes every key of a query the pattern
gives that row as its Softmax does (uniform over equally masked keys); the Attention op gives
a zero row. `head_mean` averages the heads (heads = 1) for large maps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import NodeProto, helper

from explainers.base import Array
from explainers.errors import FailedPrecondition, InvalidArgument, quoted
from explainers.gradients.graphs import DEFAULT_DOMAINS, copy, opset, producers
from explainers.layers.activations import MAX_BYTES, MAX_RUN_BYTES, check_answer, check_sizes
from explainers.layers.graph import Exposed, TensorInfo, op_name, rows_of, tensors

SCORE_OPS = ("Add", "Div", "Mul", "Sub", "Where", "Cast")  # between MatMul(Q, K^T) and Softmax
PROBABILITY_OPS = ("Cast", "Where", "Dropout", "Identity")  # between Softmax and MatMul(., V)
REDUCTIONS = ("none", "head_mean")
QK_OUTPUT, QK_MODE = 3, 3  # the Attention op's qk_matmul_output slot; mode 3 = after softmax
WIRED_SUFFIX = "__sidelight_probabilities"


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer: where its probabilities come from."""

    node: str  # the Softmax's (pattern) or the Attention op's name
    kind: str  # "Softmax" (the pattern) or "Attention" (the opset-23 op)
    probabilities: str  # the tensor exposed (the op's wired 4th output)
    query: str  # Q: the scores MatMul's first operand, or the op's Q input
    key: str  # the scores MatMul's second operand (K^T), or the op's K input
    scores: str  # the MatMul(Q, K^T) node's name ("" for the op)
    context: str  # the MatMul(., V) node's name (the op's own name for the op)


@dataclass(frozen=True)
class AttentionMaps:
    """Each layer's probabilities for the rows."""

    layers: tuple[AttentionLayer, ...]
    probabilities: tuple[Array, ...]  # per layer (rows, heads, queries, keys)
    reduction: str  # "none", or "head_mean" (heads = 1)

    def stacked(self) -> Array:
        """(rows, layers, heads, queries, keys); FailedPrecondition when layers differ."""
        shapes = {p.shape for p in self.probabilities}
        if len(shapes) != 1:
            raise FailedPrecondition("attention: the layers' maps differ in shape "
                                     f"({sorted(shapes)}); read them per layer")
        return np.stack(self.probabilities, axis=1)


def find(model: onnx.ModelProto, infos: Sequence[TensorInfo] | None = None
         ) -> list[AttentionLayer]:
    """Every attention layer in graph order; FailedPrecondition when a fused op hides them
    or there is none."""
    _refuse_fused(model.graph)
    shapes = {i.name: i.shape for i in (tensors(model) if infos is None else infos)}
    made, readers = producers(model.graph), _readers(model.graph)
    found = []
    for node in model.graph.node:
        if node.domain not in DEFAULT_DOMAINS:
            continue
        if node.op_type == "Attention":
            found.append(_op_layer(node))
        elif node.op_type == "Softmax" and _attention_shaped(node, shapes, opset(model)):
            layer = _pattern_layer(node, made, readers)
            found += [] if layer is None else [layer]
    if not found:
        raise FailedPrecondition("attention: no attention layer found (no Softmax between "
                                 "MatMul(Q, K^T) and MatMul(., V), no ONNX Attention op)")
    return found


def _refuse_fused(graph: onnx.GraphProto) -> None:
    """FailedPrecondition naming the first fused com.microsoft attention op."""
    for node in graph.node:
        if node.domain == "com.microsoft" and "Attention" in node.op_type:
            raise FailedPrecondition(
                f"attention: node {quoted(node.name)} is {op_name(node)}, a fused contrib op "
                "that hides the attention probabilities; export the model unfused, or with "
                "the standard ONNX Attention op (opset 23)")


def _readers(graph: onnx.GraphProto) -> dict[str, list[NodeProto]]:
    """The nodes reading each tensor."""
    out: dict[str, list[NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _attention_shaped(node: NodeProto, shapes: dict[str, tuple[int, ...] | None],
                      version: int) -> bool:
    """Softmax over the last axis of a rank-3 or rank-4 tensor, last two sizes equal where
    known (before opset 13 Softmax flattens from `axis`, default 1)."""
    shape = shapes.get(node.output[0])
    if shape is None or len(shape) not in (3, 4):
        return False
    axis = next((int(a.i) for a in node.attribute if a.name == "axis"),
                -1 if version >= 13 else 1)
    queries, keys = shape[-2:]
    return axis % len(shape) == len(shape) - 1 and (queries < 0 or keys < 0 or queries == keys)


def _pattern_layer(softmax: NodeProto, made: dict[str, NodeProto],
                   readers: dict[str, list[NodeProto]]) -> AttentionLayer | None:
    """The layer around an attention-shaped Softmax, if the MatMuls are there."""
    scores = _scores(softmax.input[0], made)
    context = _context(softmax.output[0], readers)
    if scores is None or context is None:
        return None
    return AttentionLayer(softmax.name, "Softmax", softmax.output[0], scores.input[0],
                          scores.input[1], scores.name, context.name)


def _scores(name: str, made: dict[str, NodeProto]) -> NodeProto | None:
    """The nearest MatMul upstream of the Softmax input through SCORE_OPS only."""
    queue, seen = deque([name]), {name}
    while queue:
        node = made.get(queue.popleft())
        if node is None or node.domain not in DEFAULT_DOMAINS:
            continue
        if node.op_type == "MatMul":
            return node
        if node.op_type in SCORE_OPS:
            fresh = [n for n in node.input if n and n not in seen]
            seen.update(fresh)
            queue.extend(fresh)
    return None


def _context(name: str, readers: dict[str, list[NodeProto]]) -> NodeProto | None:
    """A MatMul reading the probabilities as its first operand, through PROBABILITY_OPS."""
    queue, seen = deque([name]), {name}
    while queue:
        tensor = queue.popleft()
        for node in readers.get(tensor, []):
            if node.domain not in DEFAULT_DOMAINS:
                continue
            if node.op_type == "MatMul" and node.input[0] == tensor:
                return node
            if node.op_type in PROBABILITY_OPS and node.output[0] not in seen:
                seen.add(node.output[0])
                queue.append(node.output[0])
    return None


def _op_layer(node: NodeProto) -> AttentionLayer:
    """An opset-23 Attention op: its 4th output in mode 3, or the name `wire` gives it."""
    wired = len(node.output) > QK_OUTPUT and node.output[QK_OUTPUT] and _mode(node) == QK_MODE
    name = node.output[QK_OUTPUT] if wired else node.output[0] + WIRED_SUFFIX
    return AttentionLayer(node.name, "Attention", name, node.input[0], node.input[1], "",
                          node.name)


def _mode(node: NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "qk_matmul_output_mode"), 0)


def wire(model: onnx.ModelProto, layers: Sequence[AttentionLayer]) -> onnx.ModelProto:
    """A copy in which each Attention op's probabilities appear under the layer's name: the
    op itself set to mode 3 with its 4th output wired, or, when the model reads that output
    in another mode, a second op computing only the probabilities."""
    wanted = {layer.probabilities for layer in layers if layer.kind == "Attention"}
    if not {n.output[0] + WIRED_SUFFIX for n in model.graph.node} & wanted:
        return model
    out = copy(model)
    for node in list(out.graph.node):
        name = node.output[0] + WIRED_SUFFIX if node.output else ""
        if node.op_type != "Attention" or name not in wanted:
            continue
        target = node
        if len(node.output) > QK_OUTPUT and node.output[QK_OUTPUT]:
            target = out.graph.node.add()
            target.CopyFrom(node)
            target.name = f"{node.name}{WIRED_SUFFIX}"
            target.ClearField("output")
        _set_probabilities(target, name)
    return out


def _set_probabilities(node: NodeProto, name: str) -> None:
    """Mode 3, the 4th output named; unused outputs before it left empty (Y is required)."""
    kept = [a for a in node.attribute if a.name != "qk_matmul_output_mode"]
    node.ClearField("attribute")
    node.attribute.extend([*kept, helper.make_attribute("qk_matmul_output_mode", QK_MODE)])
    outputs = list(node.output) or [name + "__y"]
    outputs += [""] * (QK_OUTPUT + 1 - len(outputs))
    outputs[QK_OUTPUT] = name
    node.ClearField("output")
    node.output.extend(outputs)


class AttentionProbe:
    """The attention layers of a model and an exposed copy returning their probabilities;
    build once per model and reuse."""

    def __init__(self, model: onnx.ModelProto,
                 infos: Sequence[TensorInfo] | None = None) -> None:
        listed = tensors(model) if infos is None else list(infos)
        self.layers = tuple(find(model, listed))
        wired = wire(model, self.layers)
        self.exposed = Exposed(wired, [layer.probabilities for layer in self.layers],
                               listed if wired is model else None)

    @property
    def nbytes(self) -> int:
        return self.exposed.nbytes

    def run(self, feeds: dict[str, Array], reduction: str = "none",
            max_bytes: int = MAX_BYTES, max_run_bytes: int = MAX_RUN_BYTES) -> AttentionMaps:
        """Every layer's probabilities for the fed rows."""
        if reduction not in REDUCTIONS:
            raise InvalidArgument(f"reduction: {quoted(reduction)}; one of "
                                  f"{', '.join(REDUCTIONS)}")
        rows = rows_of(feeds)
        check_sizes(self.exposed, rows, reduction != "none", max_bytes, max_run_bytes,
                    "head_mean")
        got = self.exposed.run(feeds)
        maps = tuple(_reduced(_per_head(layer, got[layer.probabilities], rows), reduction)
                     for layer in self.layers)
        check_answer(maps, rows, max_bytes, "head_mean")
        return AttentionMaps(self.layers, maps, reduction)


def _per_head(layer: AttentionLayer, value: Array, rows: int) -> Array:
    """(rows, heads, queries, keys) from rank 4, rank 3 (one head) or heads folded into the
    leading axis (rows * heads, queries, keys), N-major as exporters fold them."""
    if value.ndim not in (3, 4) or value.shape[0] % rows:
        raise FailedPrecondition(f"attention: {quoted(layer.probabilities)} has shape "
                                 f"{list(value.shape)} for {rows} rows; expected (rows, "
                                 "heads, queries, keys)")
    return value.reshape(rows, -1, *value.shape[-2:])


def _reduced(maps: Array, reduction: str) -> Array:
    """Unchanged, or the mean over heads (rows, 1, queries, keys)."""
    if reduction == "none":
        return maps
    kind = np.promote_types(maps.dtype, np.float32)
    return np.asarray(maps.astype(np.float64).mean(axis=1, keepdims=True), kind)

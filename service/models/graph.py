"""Graph inspection: which inputs only make sense at integer points, how precisely the graph
computes, and whether it walks trees.

An input is *discrete* when its dtype is integer (or bool), or when its values reach the index
slot of a lookup (Gather indices, GatherElements, GatherND, OneHot, ScatterND, ai.onnx.ml
ArrayFeatureExtractor / LabelEncoder / CategoryMapper, com.microsoft EmbedLayerNormalization
ids, ...) through ops that move or round values without mixing them with others (Cast, Reshape,
Squeeze, Unsqueeze, Identity, Flatten, Slice, Concat, Floor, Clip, ...). Such a model is not a
function of real-valued features: probing it between or beyond valid ids returns garbage or
fails inside onnxruntime, so closed-form methods that probe the function must not run on it.
The walk follows values only (a Reshape's shape or a Slice's bounds do not carry the input) and
looks inside subgraphs (If/Loop/Scan bodies read outer tensors by name).
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from onnx import GraphProto, NodeProto, TensorProto

# (domain, op) -> input slots whose values are used as indices or category keys
INDEX_SLOTS: dict[tuple[str, str], tuple[int, ...]] = {
    ("", "Gather"): (1,), ("", "GatherElements"): (1,), ("", "GatherND"): (1,),
    ("", "OneHot"): (0,), ("", "ScatterElements"): (1,), ("", "ScatterND"): (1,),
    ("", "Scatter"): (1,),
    ("ai.onnx.ml", "ArrayFeatureExtractor"): (1,), ("ai.onnx.ml", "LabelEncoder"): (0,),
    ("ai.onnx.ml", "CategoryMapper"): (0,), ("ai.onnx.ml", "OneHotEncoder"): (0,),
    ("com.microsoft", "EmbedLayerNormalization"): (0, 1, 8),
    ("com.microsoft", "GatherBlockQuantized"): (1,), ("com.microsoft", "GatherND"): (1,),
}
# ops whose outputs carry the values of the listed input slots (None = every slot)
VALUE_SLOTS: dict[str, tuple[int, ...] | None] = {
    "Identity": (0,), "Cast": (0,), "CastLike": (0,), "Reshape": (0,), "Squeeze": (0,),
    "Unsqueeze": (0,), "Flatten": (0,), "Slice": (0,), "Transpose": (0,), "Expand": (0,),
    "Tile": (0,), "Split": (0,), "Concat": None, "Floor": (0,), "Ceil": (0,), "Round": (0,),
    "Clip": (0,), "Abs": (0,),
}
DISCRETE_TYPES = {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
                  TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
                  TensorProto.BOOL}
# float element types from the coarsest up: the coarsest one found sets the precision
PRECISIONS = ((TensorProto.BFLOAT16, "BF16"), (TensorProto.FLOAT16, "FP16"),
              (TensorProto.FLOAT, "FP32"), (TensorProto.DOUBLE, "FP64"))


def discrete_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Graph inputs that only take integer points -> why (for the notes), in input order."""
    nodes = list(_all_nodes(model.graph))
    found: dict[str, str] = {}
    for value in _real_inputs(model.graph):
        elem = value.type.tensor_type.elem_type
        if elem in DISCRETE_TYPES:
            found[value.name] = f"is {TensorProto.DataType.Name(elem)}"
            continue
        lookup = _index_use(value.name, nodes)
        if lookup:
            found[value.name] = f"feeds the indices of a {lookup} node"
    return found


def index_inputs(model: onnx.ModelProto) -> frozenset[str]:
    """Graph inputs whose values reach the index slot of a lookup (token ids into an
    embedding, category codes into a table), whatever their dtype."""
    nodes = list(_all_nodes(model.graph))
    return frozenset(v.name for v in _real_inputs(model.graph) if _index_use(v.name, nodes))


def precision(model: onnx.ModelProto) -> str:
    """The coarsest float type among the graph's inputs, outputs and Cast targets (FP32 for a
    double-in, float-out LinearRegressor): the rounding that the model's outputs carry."""
    graph = model.graph
    seen = {v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    seen |= {a.i for n in _all_nodes(graph) if n.op_type == "Cast" for a in n.attribute
             if a.name == "to"}
    return next((name for elem, name in PRECISIONS if elem in seen), "FP64")


def has_trees(model: onnx.ModelProto) -> bool:
    """Whether the graph evaluates a tree ensemble (ai.onnx.ml TreeEnsemble*): such models run
    15-45% faster on batches whose consecutive rows are alike (docs/benchmarks.md, overhead)."""
    return any(n.op_type.startswith("TreeEnsemble") and _domain(n) == "ai.onnx.ml"
               for n in _all_nodes(model.graph))


def _index_use(name: str, nodes: list[NodeProto]) -> str:
    """The op whose index slot the values of tensor `name` reach, or "" when none does."""
    consumers: dict[str, list[tuple[NodeProto, int]]] = {}
    for n in nodes:
        for slot, tensor in enumerate(n.input):
            consumers.setdefault(tensor, []).append((n, slot))
    reached, frontier = {name}, [name]
    while frontier:
        for node, slot in consumers.get(frontier.pop(), []):
            if slot in INDEX_SLOTS.get((_domain(node), node.op_type), ()):
                return node.op_type
            for out in _carried(node, slot):
                if out not in reached:
                    reached.add(out)
                    frontier.append(out)
    return ""


def _carried(node: NodeProto, slot: int) -> list[str]:
    """Outputs of `node` that carry the values arriving at input `slot`."""
    slots = VALUE_SLOTS.get(node.op_type, ()) if _domain(node) == "" else ()
    return [o for o in node.output if o] if slots is None or slot in slots else []


def _domain(node: NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _real_inputs(graph: GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (old IR versions list initializers as inputs)."""
    init = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in init]


def _all_nodes(graph: GraphProto) -> Iterator[NodeProto]:
    """Every node of the graph and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)

"""Graph surgery for gradients, on onnx protos only: the explained tensor (an output, or the
logits before its final Softmax/Sigmoid), tensors cut out as inputs (an embedding output, a
layer), pinned shapes, exposed intermediates, pruning, and DeepLIFT's linearisation.

Every function returns a new model and leaves its argument alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import NodeProto, TypeProto, helper, numpy_helper

OPSET = 17  # onnx-ad has no reverse rules for Softmax < 13 or MaxPool < 16 (field notes)
DEFAULT_DOMAINS = ("", "ai.onnx")
LINKS = ("Softmax", "Sigmoid")  # final links whose input is the logit
PASS_THROUGH = ("Identity", "Cast")  # ops walked through between the link and the output
CUT_SUFFIX = "__sidelight_orig"


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def opset(model: onnx.ModelProto) -> int:
    """The default domain's opset version (1 when the model does not declare it)."""
    return max((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS),
               default=1)


def upgrade(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset >= OPSET (onnx's version converter); unchanged when already there."""
    if opset(model) >= OPSET:
        return model
    return onnx.version_converter.convert_version(model, OPSET)


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference with data propagation, so Reshape targets computed from Shape fold."""
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def reads(node: NodeProto) -> set[str]:
    """Every tensor a node reads, including those its subgraphs (If/Loop/Scan) capture."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for graph in [attr.g, *attr.graphs] if attr.type in subgraphs else []:
            for inner in graph.node:
                names |= reads(inner)
    return names


def producers(graph: onnx.GraphProto) -> dict[str, NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def types(model: onnx.ModelProto) -> dict[str, TypeProto]:
    """The declared or inferred type of every tensor that has one."""
    g = model.graph
    found = {v.name: v.type for v in [*g.input, *g.value_info, *g.output]}
    for init in g.initializer:
        found.setdefault(init.name, helper.make_tensor_type_proto(init.data_type, init.dims))
    return found


def find_link(model: onnx.ModelProto, output: str) -> NodeProto | None:
    """The Softmax or Sigmoid that produces `output`, through Identity/Cast only; None when the
    output is not a link's result."""
    made = producers(model.graph)
    node = made.get(output)
    while node is not None and node.op_type in PASS_THROUGH and node.domain in DEFAULT_DOMAINS:
        node = made.get(node.input[0])
    if node is None or node.op_type not in LINKS or node.domain not in DEFAULT_DOMAINS:
        return None
    return node


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """The model with exactly these graph outputs (types from `types`; shapes left to
    inference, as a pinned batch changes them)."""
    known = types(model)
    out = copy(model)
    out.graph.ClearField("output")
    for name in names:
        elem = known[name].tensor_type.elem_type if name in known else onnx.TensorProto.FLOAT
        out.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return out


def cut(model: onnx.ModelProto, tensors: dict[str, TypeProto]) -> onnx.ModelProto:
    """Each named tensor becomes a graph input of the given type: its producer's output is
    renamed (and pruned later when nothing else needs it), its consumers read the input."""
    out = copy(model)
    for node in out.graph.node:
        for k, name in enumerate(node.output):
            if name in tensors:
                node.output[k] = name + CUT_SUFFIX
    for name, kind in tensors.items():
        value = onnx.ValueInfoProto()
        value.name = name
        value.type.CopyFrom(kind)
        out.graph.input.append(value)
    return out


def pin(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """Inputs fixed to the given full shapes (batch included); stale intermediate and output
    shapes are dropped so inference recomputes them."""
    out = copy(model)
    for value in out.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape
            dims.ClearField("dim")
            for size in shapes[value.name]:
                dims.dim.add().dim_value = int(size)
    out.graph.ClearField("value_info")
    for value in out.graph.output:
        value.type.tensor_type.ClearField("shape")
    return out


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Only the nodes the outputs need, and only the initializers those nodes read."""
    out = copy(model)
    g = out.graph
    needed = {o.name for o in g.output}
    keep: list[NodeProto] = []
    for node in reversed(g.node):
        if any(name in needed for name in node.output):
            keep.append(node)
            needed |= reads(node)
    g.ClearField("node")
    g.node.extend(reversed(keep))
    inits = [i for i in g.initializer if i.name in needed]
    g.ClearField("initializer")
    g.initializer.extend(inits)
    return out


def path(model: onnx.ModelProto, sources: Iterable[str], target: str) -> list[NodeProto]:
    """The nodes between the sources and the target: those that read a value depending on a
    source and whose result reaches the target (graph order)."""
    live = set(sources)
    forward = []
    for node in model.graph.node:
        if reads(node) & live:
            forward.append(node)
            live |= set(node.output)
    reach = {target}
    on_path = []
    for node in reversed(forward):
        if reach & set(node.output):
            on_path.append(node)
            reach |= reads(node)
    return list(reversed(on_path))


def foreign_op(model: onnx.ModelProto, sources: Iterable[str], target: str) -> str | None:
    """The first op outside the default ONNX domain (com.microsoft fused ops, ai.onnx.ml) on
    the differentiated path, as domain.op_type; None when there is none."""
    for node in path(model, sources, target):
        if node.domain not in DEFAULT_DOMAINS:
            return f"{node.domain}.{node.op_type}"
    return None


@dataclass(frozen=True)
class Lookup:
    """An embedding lookup: Gather(table, input) along axis 0, table an initializer."""

    output: str  # the Gather's result: the tensor differentiated instead of the token ids
    input: str  # the graph input holding the ids
    table: np.ndarray  # (vocabulary, *embedding)


def lookups(model: onnx.ModelProto, inputs: Iterable[str]) -> list[Lookup]:
    """Embedding lookups of the given (integer) graph inputs, directly or through a Cast."""
    names = set(inputs)
    made = producers(model.graph)
    tables = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "Gather" or node.domain not in DEFAULT_DOMAINS:
            continue
        ids, axis = node.input[1], _int_attr(node, "axis", 0)
        while ids in made and made[ids].op_type == "Cast":
            ids = made[ids].input[0]
        table = tables.get(node.input[0])
        if ids in names and axis == 0 and table is not None and table.data_type in _FLOATS:
            found.append(Lookup(node.output[0], ids, numpy_helper.to_array(table)))
    return found


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)


def _int_attr(node: NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def last_spatial_conv(model: onnx.ModelProto) -> str | None:
    """Grad-CAM's default layer: the last Conv whose output keeps a spatial extent (more than
    one position), taken after its ReLU when a ReLU is its only consumer (the rectified
    feature maps of the Grad-CAM paper). None when the graph has no such Conv."""
    inferred = types(infer(model))
    consumers: dict[str, list[NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in reversed(model.graph.node):
        if node.op_type != "Conv" or not _spatial(inferred.get(node.output[0])):
            continue
        after = consumers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "Relu":
            return str(after[0].output[0])
        return str(node.output[0])
    return None


def _spatial(kind: TypeProto | None) -> bool:
    """Rank >= 3 with more than one spatial position (unknown sizes count as spatial)."""
    if kind is None:
        return False
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.tensor_type.shape.dim]
    return len(dims) >= 3 and (any(d < 0 for d in dims[2:]) or int(np.prod(dims[2:])) > 1)


# DeepLIFT's Rescale rule: each elementwise nonlinearity y = f(a) on the path is rewritten as
# y = y0 + m (a - a0), with the reference's a0, y0 and the multiplier m fed as inputs. The
# rewritten graph computes the same forward values; its gradient is DeepLIFT's.
RESCALED = ("Relu", "LeakyRelu", "Elu", "Sigmoid", "Tanh", "Softplus")


@dataclass(frozen=True)
class Rescaled:
    """One linearised nonlinearity: its op, input and output tensors, and alpha (LeakyRelu,
    Elu)."""

    op: str
    a: str
    y: str
    alpha: float

    @property
    def inputs(self) -> tuple[str, str, str]:
        """The names of the fed a0, y0 and m."""
        return (f"{self.y}__a0", f"{self.y}__y0", f"{self.y}__m")


def rescalable(model: onnx.ModelProto, sources: Iterable[str], target: str) -> list[Rescaled]:
    """The nonlinearities on the path DeepLIFT's Rescale rule rewrites."""
    return [Rescaled(n.op_type, n.input[0], n.output[0], _alpha(n))
            for n in path(model, sources, target)
            if n.op_type in RESCALED and n.domain in DEFAULT_DOMAINS]


def _alpha(node: NodeProto) -> float:
    default = 0.01 if node.op_type == "LeakyRelu" else 1.0
    for attr in node.attribute:
        if attr.name == "alpha":
            return float(attr.f)
    return default


def linearise(model: onnx.ModelProto, nodes: Sequence[Rescaled]) -> onnx.ModelProto:
    """Replace each listed nonlinearity by y = y0 + m (a - a0) with a0, y0, m new inputs of
    a's type."""
    out = copy(model)
    known = types(model)
    by_output = {n.y: n for n in nodes}
    rewritten: list[NodeProto] = []
    for node in out.graph.node:
        spec = by_output.get(node.output[0]) if node.output else None
        if spec is None:
            rewritten.append(node)
            continue
        a0, y0, m = spec.inputs
        delta, scaled = f"{spec.y}__delta", f"{spec.y}__scaled"
        rewritten += [helper.make_node("Sub", [spec.a, a0], [delta]),
                      helper.make_node("Mul", [delta, m], [scaled]),
                      helper.make_node("Add", [y0, scaled], [spec.y])]
        for name in spec.inputs:
            value = onnx.ValueInfoProto()
            value.name = name
            value.type.CopyFrom(known[spec.a])
            out.graph.input.append(value)
    out.graph.ClearField("node")
    out.graph.node.extend(rewritten)
    return out

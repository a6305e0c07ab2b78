"""Rewrites of onnx-ad's adjoint graph that onnxruntime does not do itself, each exact.

onnx-ad (0.3.0) keeps a trailing axis for the seeds on every derivative tensor and moves it
with Transpose/Reshape/Expand around each rule; it also emits the weights' gradients, which
nobody reads. With the seed count pinned (the explained columns are known when the adjoint is
built) every shape is static, and then:

- nodes no output needs are dropped (onnxruntime keeps them and runs them);
- an Expand to its input's own shape, a Reshape to it, and an Identity are aliases;
- a Transpose that moves only axes of extent 1 keeps the element order: a Reshape;
- a Reshape of a Reshape (Unsqueeze, Squeeze, Flatten: reshapes too, once static) is one
  Reshape of the first input;
- a ReLU's derivative mask Greater(a, 0) reads the ReLU's output instead of a (the same
  booleans), so `a` has the ReLU as only consumer and onnxruntime fuses Conv+ReLU;
- Div/Mul by a constant after an Expand moves before it (a mean's gradient is divided on
  the pooled tensor, not on the spread one);
- a stride-1 ConvTranspose with a constant kernel and at least CONV_MIN channels each way is
  the Conv with the flipped kernel, which onnxruntime runs in its blocked layout.

Every function returns a new model and leaves its argument alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import NodeProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from explainers.gradients import graphs

RESHAPES = ("Reshape", "Unsqueeze", "Squeeze", "Flatten")
FOLDED = ("Slice", "Concat", "Reshape", "Unsqueeze", "Squeeze", "Gather", "Cast", "Add", "Sub",
          "Mul", "Div")  # integer shape arithmetic
CONV_MIN = 16  # channels in and out for the ConvTranspose -> Conv rewrite: below it, the
# blocked Conv was slower here (digits CNN: 8 and 1 channels, ratio 3.4 -> 4.1 at 32 rows)
FOLD_MAX = 64  # elements: shapes and counts, never data


def tidy(adjoint: onnx.ModelProto, seed: str, grads: list[str], seeds: int) -> onnx.ModelProto:
    """The adjoint with the seed axis pinned to `seeds` and the rewrites above applied."""
    out = graphs.infer(pin_seeds(adjoint, [seed, *grads], seeds))
    out = graphs.prune(out)
    out = relu_masks(graphs.infer(_static_sizes(out)))
    out = graphs.infer(_clear_shapes(_aliases(out)))
    out = graphs.prune(_reshape_chains(out))
    out = graphs.infer(_clear_shapes(graphs.prune(_aliases(out))))
    return graphs.infer(_clear_shapes(_transposed_convs(_scale_before_expand(out))))


def pin_seeds(model: onnx.ModelProto, names: list[str], seeds: int) -> onnx.ModelProto:
    """The trailing (seed) axis of these graph inputs/outputs fixed to `seeds`."""
    out = graphs.copy(model)
    for value in [*out.graph.input, *out.graph.output]:
        if value.name in names:
            dims = value.type.tensor_type.shape.dim
            dims[len(dims) - 1].ClearField("dim_param")
            dims[len(dims) - 1].dim_value = seeds
    return out


def _static_sizes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape(x) and Size(x) of a tensor with a static shape replaced by constants, so shape
    inference carries static shapes through the tensors built from them (onnx-ad's zeros for
    a scatter, for one)."""
    out = graphs.copy(model)
    shapes = _shapes(out)
    kept: list[NodeProto] = []
    for node in out.graph.node:
        src = node.input[0] if node.input else ""
        if node.op_type in ("Shape", "Size") and not node.attribute and src in shapes:
            shape = np.array(shapes[src], np.int64)
            value = shape if node.op_type == "Shape" else np.array(shape.prod(), np.int64)
            out.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        else:
            kept.append(node)
    out.graph.ClearField("node")
    out.graph.node.extend(kept)
    return _fold_small(out)


def _fold_small(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes computing small integer tensors (shapes, counts) from constants only, replaced
    by their values (onnx's reference evaluator), so a ConstantOfShape fed by them gets a
    static shape."""
    out = graphs.copy(model)
    constants = _constants(out)
    kept: list[NodeProto] = []
    for node in out.graph.node:
        inputs = [name for name in node.input if name]
        small = inputs and all(n in constants and constants[n].size <= FOLD_MAX
                               and constants[n].dtype.kind in "iu" for n in inputs)
        if small and node.op_type in FOLDED and node.domain in graphs.DEFAULT_DOMAINS:
            values = _evaluate(node, [constants[n] for n in node.input if n])
            for name, value in zip(node.output, values, strict=True):
                constants[name] = value
                out.graph.initializer.append(numpy_helper.from_array(value, name))
        else:
            kept.append(node)
    out.graph.ClearField("node")
    out.graph.node.extend(kept)
    return out


def _evaluate(node: NodeProto, values: list[np.ndarray]) -> list[np.ndarray]:
    """One node run on constant inputs by onnx's reference evaluator."""
    names = [n for n in node.input if n]
    graph = helper.make_graph(
        [node], "fold",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for n, v in zip(names, values, strict=True)],
        [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
         for n in node.output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", graphs.OPSET)])
    got = ReferenceEvaluator(model).run(None, dict(zip(names, values, strict=True)))
    return [np.asarray(v) for v in got]


def _clear_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    out = graphs.copy(model)
    out.graph.ClearField("value_info")
    return out


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor that has one (inferred, declared, or an initializer)."""
    found: dict[str, tuple[int, ...]] = {}
    g = model.graph
    for value in [*g.input, *g.value_info, *g.output]:
        kind = value.type.tensor_type
        if kind.HasField("shape") and all(d.HasField("dim_value") for d in kind.shape.dim):
            found[value.name] = tuple(d.dim_value for d in kind.shape.dim)
    for init in g.initializer:
        found[init.name] = tuple(init.dims)
    return found


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _consumers(model: onnx.ModelProto) -> dict[str, list[NodeProto]]:
    found: dict[str, list[NodeProto]] = {}
    for node in model.graph.node:
        for name in graphs.reads(node):
            found.setdefault(name, []).append(node)
    return found


def _rename_reads(model: onnx.ModelProto, renames: dict[str, str]) -> None:
    """Point every read of a renamed tensor at its replacement (top-level nodes only: the
    adjoints tidied here have no subgraphs on the rewritten tensors)."""
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            while name in renames:
                name = renames[name]
            node.input[k] = name


def _is_alias(node: NodeProto, shapes: dict[str, tuple[int, ...]]) -> bool:
    """An Identity, or an Expand/Reshape whose output has its input's static shape."""
    if node.op_type == "Identity":
        return True
    if node.op_type not in ("Expand", *RESHAPES):
        return False
    src, dst = node.input[0], node.output[0]
    return src in shapes and dst in shapes and shapes[src] == shapes[dst]


def _aliases(model: onnx.ModelProto) -> onnx.ModelProto:
    """Aliases bypassed (kept when their output is a graph output: the name must exist), and
    Transposes that move only extent-1 axes turned into Reshapes."""
    out = graphs.copy(model)
    shapes = _shapes(out)
    outputs = {o.name for o in out.graph.output}
    renames: dict[str, str] = {}
    extra: list[onnx.TensorProto] = []
    for node in out.graph.node:
        if node.domain not in graphs.DEFAULT_DOMAINS:
            continue
        if _is_alias(node, shapes) and node.output[0] not in outputs:
            renames[node.output[0]] = node.input[0]
        elif node.op_type == "Transpose" and _moves_ones_only(node, shapes):
            target = _fresh(out, f"{node.output[0]}__tidy_shape")
            extra.append(numpy_helper.from_array(np.array(shapes[node.output[0]], np.int64),
                                                 target))
            _become_reshape(node, node.input[0], target)
    _rename_reads(out, renames)
    out.graph.initializer.extend(extra)
    return out


def _moves_ones_only(node: NodeProto, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether the permutation keeps the order of the axes longer than 1 (then the elements
    stay in the same order in memory and the Transpose is a Reshape)."""
    if node.input[0] not in shapes or node.output[0] not in shapes:
        return False
    shape = shapes[node.input[0]]
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"),
                list(reversed(range(len(shape)))))
    kept = [p for p in perm if shape[p] != 1]
    return kept == sorted(kept)


def _fresh(model: onnx.ModelProto, stem: str) -> str:
    """A tensor name not yet used in the model."""
    g = model.graph
    used = {i.name for i in g.initializer} | {o for n in g.node for o in n.output} | \
        {v.name for v in [*g.input, *g.output]}
    name, k = stem, 1
    while name in used:
        name, k = f"{stem}_{k}", k + 1
    return name


def _become_reshape(node: NodeProto, source: str, target: str) -> None:
    """Rewrite a node in place into Reshape(source, target), keeping its output name."""
    output = node.output[0]
    node.Clear()
    node.CopyFrom(helper.make_node("Reshape", [source, target], [output],
                                   name=f"{output}__tidy"))


def _reshape_chains(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each static reshape-like node whose input comes from another one reads that one's
    input instead, with its own output shape as the target (the earlier node is dropped by
    pruning once nothing else reads it)."""
    out = graphs.copy(model)
    shapes = _shapes(out)
    made = graphs.producers(out.graph)
    extra: list[onnx.TensorProto] = []
    for node in out.graph.node:
        if not _static_reshape(node, shapes):
            continue
        source = node.input[0]
        while source in made and _static_reshape(made[source], shapes):
            source = made[source].input[0]
        if source == node.input[0] and node.op_type == "Reshape":
            continue
        target = _fresh(out, f"{node.output[0]}__tidy_shape")
        extra.append(numpy_helper.from_array(np.array(shapes[node.output[0]], np.int64),
                                             target))
        _become_reshape(node, source, target)
    out.graph.initializer.extend(extra)
    return out


def _static_reshape(node: NodeProto, shapes: dict[str, tuple[int, ...]]) -> bool:
    return (node.op_type in RESHAPES and node.domain in graphs.DEFAULT_DOMAINS
            and node.input[0] in shapes and node.output[0] in shapes)


def _zero(name: str, constants: dict[str, np.ndarray]) -> bool:
    value = constants.get(name)
    return value is not None and value.size == 1 and float(value.reshape(-1)[0]) == 0.0


def relu_masks(model: onnx.ModelProto) -> onnx.ModelProto:
    """Greater(a, 0) -> Greater(Relu(a), 0) wherever the graph computes Relu(a): relu(a) > 0
    exactly when a > 0 (NaN: both false), and `a` is left to the ReLU alone."""
    out = graphs.copy(model)
    constants = _constants(out)
    relu_of = {n.input[0]: n.output[0] for n in out.graph.node
               if n.op_type == "Relu" and n.domain in graphs.DEFAULT_DOMAINS}
    for node in out.graph.node:
        if (node.op_type == "Greater" and node.input[0] in relu_of
                and _zero(node.input[1], constants)):
            node.input[0] = relu_of[node.input[0]]
    return out


def _scale_before_expand(model: onnx.ModelProto) -> onnx.ModelProto:
    """Div/Mul(Expand(a, shape), c), c a one-element constant and the Expand read only there,
    becomes Expand(Div/Mul(a, c), shape): the same values, the arithmetic on the small tensor
    (onnx-ad spreads a mean's gradient over the pooled tensor, then divides it)."""
    out = graphs.copy(model)
    constants = _constants(out)
    made = graphs.producers(out.graph)
    readers = _consumers(out)
    for node in out.graph.node:
        if node.op_type not in ("Div", "Mul") or node.domain not in graphs.DEFAULT_DOMAINS:
            continue
        first = made.get(node.input[0])
        scalar = constants.get(node.input[1])
        if (first is None or first.op_type != "Expand" or scalar is None or scalar.size != 1
                or len(readers.get(first.output[0], [])) != 1):
            continue
        small, shape, spread = first.input[0], first.input[1], first.output[0]
        op, factor, result = node.op_type, node.input[1], node.output[0]
        first.CopyFrom(helper.make_node(op, [small, factor], [spread], name=f"{spread}__tidy"))
        node.CopyFrom(helper.make_node("Expand", [spread, shape], [result],
                                       name=f"{result}__tidy"))
    return out


def _transposed_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A ConvTranspose at stride 1 (dilation 1, one group, no output padding) with a constant
    kernel, as the Conv with the kernel's channel axes swapped and its window flipped, padded
    by k - 1 - p: the same sums, and onnxruntime runs Conv in its blocked layout (NCHWc)."""
    out = graphs.copy(model)
    constants = _constants(out)
    shapes = _shapes(out)
    extra: list[onnx.TensorProto] = []
    for node in out.graph.node:
        plan = _as_conv(node, constants, shapes)
        if plan is None:
            continue
        kernel, pads = plan
        name = _fresh(out, f"{node.input[1]}__flipped")
        extra.append(numpy_helper.from_array(kernel, name))
        out.graph.initializer.append(extra[-1])
        inputs = [node.input[0], name, *node.input[2:3]]
        node.CopyFrom(helper.make_node("Conv", inputs, [node.output[0]],
                                       name=f"{node.output[0]}__tidy", pads=pads,
                                       kernel_shape=list(kernel.shape[2:])))
    return out


def _as_conv(node: NodeProto, constants: dict[str, np.ndarray],
             shapes: dict[str, tuple[int, ...]]) -> tuple[np.ndarray, list[int]] | None:
    """The flipped kernel and the Conv's pads for a ConvTranspose `_transposed_convs` can
    rewrite (its output shape checked against the pads), else None."""
    if node.op_type != "ConvTranspose" or node.domain not in graphs.DEFAULT_DOMAINS:
        return None
    weight = constants.get(node.input[1])
    x, y = shapes.get(node.input[0]), shapes.get(node.output[0])
    if weight is None or x is None or y is None:
        return None
    rank = weight.ndim - 2
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    ones = [1] * rank
    if (list(attrs.get("strides", ones)) != ones or list(attrs.get("dilations", ones)) != ones
            or attrs.get("group", 1) != 1 or any(attrs.get("output_padding", [0] * rank))
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return None
    pads = list(attrs.get("pads", [0] * 2 * rank))
    kernel = weight.shape[2:]
    conv_pads = [k - 1 - p for k, p in zip([*kernel, *kernel], pads, strict=True)]
    expected = [n + k - 1 - a - b for n, k, a, b in zip(x[2:], kernel, pads[:rank],
                                                          pads[rank:], strict=True)]
    if min(conv_pads) < 0 or list(y[2:]) != expected or min(weight.shape[:2]) < CONV_MIN:
        return None
    flipped = np.flip(np.swapaxes(weight, 0, 1), axis=tuple(range(2, weight.ndim)))
    return np.ascontiguousarray(flipped), conv_pads


def ops(model: onnx.ModelProto) -> Iterator[str]:
    """The op types, in graph order (for tests and benchmarks)."""
    return (n.op_type for n in model.graph.node)

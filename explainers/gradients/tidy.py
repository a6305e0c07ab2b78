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
- a non-overlapping MaxPool's gradient (MaxPool with indices, then ScatterND, both slow
  generic kernels in onnxruntime) becomes window arithmetic on the pooled maximum
  (`maxpool_gradients`): the same values, ties going to the first maximum as before;
- Div/Mul by a constant after an Expand moves before it (a mean's gradient is divided on
  the pooled tensor, not on the spread one);
- a stride-1 ConvTranspose with a constant kernel and at least CONV_MIN channels each way is
  the Conv with the flipped kernel, which onnxruntime runs in its blocked layout.

Every function returns a new model and leaves its argument alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

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
MAXPOOL_MIN = 4096  # input elements for the MaxPool rewrite: below it its ~20 small nodes cost
# more than MaxPool-with-indices + ScatterND (16x8x8 input, 1 row: 10 -> 16 us; 32 rows: 177 ->
# 103 us, the pool's gradient alone)


def tidy(adjoint: onnx.ModelProto, seed: str, grads: list[str], seeds: int) -> onnx.ModelProto:
    """The adjoint with the seed axis pinned to `seeds` and the rewrites above applied."""
    out = graphs.infer(pin_seeds(adjoint, [seed, *grads], seeds))
    out = graphs.prune(out)
    out = relu_masks(graphs.infer(_static_sizes(out)))
    out = graphs.prune(maxpool_gradients(out))
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


def maxpool_gradients(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each ScatterND(zeros, indices of a MaxPool, g) onnx-ad emits for a MaxPool whose windows
    tile the input (kernel == strides, 2-D, no pads, dilation 1, floor mode, sides divisible,
    one seed, at least MAXPOOL_MIN input elements) rewritten without indices:

        up(t)  = t repeated over each window (MatMul by a 0/1 matrix along W, Concat along H)
        eq     = x == up(MaxPool(x))                        (the window's maxima)
        score  = eq * rank weight (k, k-1, ..., 1 in row-major window order)
        first  = eq and score == up(MaxPool(score))         (the first maximum only)
        grad   = first * up(g)

    MaxPool's Indices name the first maximum of a window too (onnxruntime keeps the first on
    ties), and a window of non-overlapping pools scatters one value onto zeros, so the values
    are the same. (A MatMul by 0/1 copies finite values exactly; an infinite maximum would
    spread NaN over its row.)"""
    out = graphs.copy(model)
    shapes = _shapes(out)
    made = graphs.producers(out.graph)
    constants = _constants(out)
    nodes: list[NodeProto] = []
    for node in out.graph.node:
        plan = _pool_plan(node, made, shapes, constants)
        if plan is None:
            nodes.append(node)
            continue
        nodes.extend(_window_gradient(out, node, *plan))
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    return out


def _pool_plan(node: NodeProto, made: dict[str, NodeProto], shapes: dict[str, tuple[int, ...]],
               constants: dict[str, np.ndarray]) -> tuple[NodeProto, list[int]] | None:
    """The MaxPool and its kernel when `node` is a scatter `maxpool_gradients` rewrites."""
    if node.op_type != "ScatterND" or node.domain not in graphs.DEFAULT_DOMAINS:
        return None
    zeros, index, update = node.input
    source = made.get(zeros)
    if source is None or source.op_type != "ConstantOfShape" or any(
            a.name == "value" and numpy_helper.to_array(a.t).any() for a in source.attribute):
        return None
    wrap = made.get(index)
    if wrap is None or wrap.op_type not in RESHAPES:
        return None
    pool = made.get(wrap.input[0])
    if pool is None or pool.op_type != "MaxPool" or len(pool.output) < 2 or \
            pool.output[1] != wrap.input[0]:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
    kernel = list(attrs.get("kernel_shape", []))
    x = shapes.get(pool.input[0])
    if (len(kernel) != 2 or list(attrs.get("strides", [1, 1])) != kernel
            or any(attrs.get("pads", [0] * 4)) or list(attrs.get("dilations", [1, 1])) != [1, 1]
            or attrs.get("ceil_mode", 0) or attrs.get("storage_order", 0)
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or x is None
            or len(x) != 4 or x[2] % kernel[0] or x[3] % kernel[1]
            or math.prod(x) < MAXPOOL_MIN or shapes.get(update, (0,))[-1] != 1
            or shapes.get(node.output[0]) != (math.prod(x), 1)):
        return None
    return pool, kernel


def _window_gradient(model: onnx.ModelProto, scatter: NodeProto, pool: NodeProto,
                     kernel: list[int]) -> list[NodeProto]:
    """The nodes computing `scatter`'s output as `maxpool_gradients` describes."""
    x = pool.input[0]
    n, c, h, w = _shapes(model)[x]
    kh, kw = kernel
    rows, wo = n * c * (h // kh), w // kw

    made = iter(range(1 << 30))

    def name(stem: str) -> str:
        return _fresh(model, f"{scatter.output[0]}__{stem}_{next(made)}")

    def const(stem: str, value: np.ndarray) -> str:
        tensor = numpy_helper.from_array(value, name(stem))
        model.graph.initializer.append(tensor)
        return tensor.name

    elem = graphs.types(model)[x].tensor_type.elem_type
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    spread = const("spread", np.kron(np.eye(wo), np.ones((1, kw))).astype(dtype))  # (wo, w)
    flat, row, full = (const("flat", np.array([rows, wo], np.int64)),
                       const("row", np.array([rows, 1, w], np.int64)),
                       const("full", np.array([n, c, h, w], np.int64)))
    rank = np.arange(kh * kw, 0, -1, dtype=dtype).reshape(kh, kw)
    weights = const("rank", np.tile(rank, (h // kh, w // kw)))  # (h, w)
    out: list[NodeProto] = []

    def node(op: str, inputs: list[str], **attrs: Any) -> str:
        result = name(op.lower())
        out.append(helper.make_node(op, inputs, [result], name=result, **attrs))
        return result

    def up(t: str) -> str:  # (n, c, h/kh, w/kw[, 1]) -> (n, c, h, w)
        along_w = node("MatMul", [node("Reshape", [t, flat]), spread])  # (rows, w)
        line = node("Reshape", [along_w, row])  # (rows, 1, w)
        return node("Reshape", [node("Concat", [line] * kh, axis=1), full])

    pooled = {a.name: helper.get_attribute_value(a) for a in pool.attribute
              if a.name in ("kernel_shape", "strides")}
    top = node("MaxPool", [x], **pooled)
    eq = node("Equal", [x, up(top)])
    score = node("Mul", [node("Cast", [eq], to=elem), weights])
    first = node("And", [eq, node("Equal", [score, up(node("MaxPool", [score], **pooled))])])
    grad = node("Mul", [node("Cast", [first], to=elem), up(scatter.input[2])])
    shape = const("shape", np.array([n * c * h * w, 1], np.int64))
    out.append(helper.make_node("Reshape", [grad, shape], [scatter.output[0]],
                                name=f"{scatter.output[0]}__tidy"))
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

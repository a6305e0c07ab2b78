"""Rewrites of onnx-ad's adjoint graph that onnxruntime does not do itself, each exact.

onnx-ad (0.3.0) keeps a trailing axis for the seeds on every derivative tensor and moves it
with Transpose/Reshape/Expand around each rule; it also emits the weights' gradients, which
nobody reads. With the seed count pinned (the explained columns are known when the adjoint is
built) every shape is static, and then:

- nodes no output needs are dropped (onnxruntime keeps them and runs them);
- an Expand to its input's own shape, a Reshape to it, a sum (mean, max, min, product) over
  extent-1 axes only, and an Identity are aliases;
- a Transpose that moves only axes of extent 1 keeps the element order: a Reshape;
- a Reshape of a Reshape (Unsqueeze, Squeeze, Flatten: reshapes too, once static) is one
  Reshape of the first input;
- a ReLU's derivative mask Greater(a, 0) reads the ReLU's output instead of a (the same
  booleans), so `a` has the ReLU as only consumer and onnxruntime fuses Conv+ReLU (Sign(y),
  the same 0/1 mask in one kernel, was tried: onnxruntime's Sign is slower than Greater and
  Cast together, ResNet-like 2.6 -> 3.0);
- a non-overlapping MaxPool's gradient (ScatterND of the pooled gradient onto zeros at the
  pool's indices, a slow generic kernel in onnxruntime) becomes MaxUnpool, the same scatter
  in one pass (`maxpool_gradients`);
- op(Reshape(a), Reshape(b)) with a, b of one shape is Reshape(op(a, b)), and a ReLU mask
  multiplying a MaxUnpool moves before it, onto the pooled tensor;
- Div/Mul by a constant after an Expand moves before it (a mean's gradient is divided on
  the pooled tensor, not on the spread one);
- a stride-1 ConvTranspose with a constant kernel and at least CONV_MIN channels each way is
  the Conv with the flipped kernel, which onnxruntime runs in its blocked layout.

Every function returns a new model and leaves its argument alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import NodeProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from explainers.gradients import graphs

RESHAPES = ("Reshape", "Unsqueeze", "Squeeze", "Flatten")
ELEMENTWISE = ("Add", "Sub", "Mul", "Div")
REDUCTIONS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd")  # of one
# element: the element itself
FOLDED = ("Slice", "Concat", "Reshape", "Unsqueeze", "Squeeze", "Gather", "Cast", "Add", "Sub",
          "Mul", "Div")  # integer shape arithmetic
CONV_MIN = 16  # channels in and out for the ConvTranspose -> Conv rewrite: below it, the
# blocked Conv was slower here (digits CNN: 8 and 1 channels, ratio 3.4 -> 4.1 at 32 rows)
FOLD_MAX = 64  # elements: shapes and counts, never data
UNPOOLED = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)  # onnxruntime's MaxUnpool types


def tidy(adjoint: onnx.ModelProto, seed: str, grads: list[str], seeds: int,
         value: np.ndarray | None = None) -> onnx.ModelProto:
    """The adjoint with the seed axis pinned to `seeds` and the rewrites above applied; with
    the seed's `value`, the seed a constant (see `bake_seed`)."""
    out = graphs.infer(pin_seeds(adjoint, [seed, *grads], seeds))
    if value is not None:
        out = bake_seed(out, seed, value)
    out = graphs.prune(out)
    out = relu_masks(graphs.infer(_static_sizes(out)))
    out = graphs.prune(maxpool_gradients(out))
    out = graphs.infer(_clear_shapes(_aliases(out)))
    out = graphs.prune(_reshape_chains(out))
    out = graphs.infer(_clear_shapes(graphs.prune(_aliases(out))))
    out = graphs.prune(_reshape_chains(graphs.infer(_clear_shapes(_sink_reshapes(out)))))
    out = graphs.infer(_clear_shapes(graphs.prune(_aliases(out))))
    out = graphs.infer(_clear_shapes(graphs.prune(masks_before_unpool(out))))
    out = graphs.infer(_clear_shapes(_transposed_convs(_scale_before_expand(out))))
    out = graphs.infer(_clear_shapes(unit_tails(out)))
    return _written_outputs(out, grads) if seeds == 1 else out


def pin_seeds(model: onnx.ModelProto, names: list[str], seeds: int) -> onnx.ModelProto:
    """The trailing (seed) axis of these graph inputs/outputs fixed to `seeds`."""
    out = graphs.copy(model)
    for value in [*out.graph.input, *out.graph.output]:
        if value.name in names:
            dims = value.type.tensor_type.shape.dim
            dims[len(dims) - 1].ClearField("dim_param")
            dims[len(dims) - 1].dim_value = seeds
    return out


def bake_seed(model: onnx.ModelProto, seed: str, value: np.ndarray) -> onnx.ModelProto:
    """The seed input as an initializer: it is the same one-hot on every call, so onnxruntime
    folds the adjoint's first steps (the head's gradient, up to the first nonlinearity) into
    constants at session creation (digits CNN, 32 rows: -6% of the adjoint's time)."""
    out = graphs.copy(model)
    kept = [i for i in out.graph.input if i.name != seed]
    out.graph.ClearField("input")
    out.graph.input.extend(kept)
    out.graph.initializer.append(numpy_helper.from_array(value, seed))
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
    """An Identity, or an Expand/Reshape/reduction whose output has its input's static shape
    (a reduction over extent-1 axes only: onnx-ad's un-broadcasting sums, which onnxruntime
    runs as real reductions, 44 us for a 32x16x16 one)."""
    if node.op_type == "Identity":
        return True
    if node.op_type not in ("Expand", *RESHAPES, *REDUCTIONS):
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
    for node in out.graph.node:
        if node.domain not in graphs.DEFAULT_DOMAINS:
            continue
        if _is_alias(node, shapes) and node.output[0] not in outputs:
            renames[node.output[0]] = node.input[0]
        elif node.op_type == "Transpose" and _moves_ones_only(node, shapes):
            target = _shape_const(out, f"{node.output[0]}__tidy_shape", shapes[node.output[0]])
            _become_reshape(node, node.input[0], target)
    _rename_reads(out, renames)
    return out


def _written_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A gradient output copied or reshaped from a tensor nothing else reads is written by
    that tensor's producer instead, its declared shape then left open (one seed: the caller
    reshapes each output to (rows, 1, elements), whatever its axes)."""
    out = graphs.copy(model)
    for name in names:
        while _write_directly(out, name):
            pass
    return out


def _write_directly(model: onnx.ModelProto, name: str) -> bool:
    """One step of `_written_outputs`: whether a copy or reshape into `name` was removed."""
    made = graphs.producers(model.graph)
    last = made.get(name)
    if last is None or last.op_type not in ("Identity", *RESHAPES):
        return False
    source, readers = made.get(last.input[0]), _consumers(model).get(last.input[0], [])
    outputs = {o.name: o for o in model.graph.output}
    if source is None or last.input[0] in outputs or len(readers) != 1:
        return False
    at = next(k for k, n in enumerate(model.graph.node) if name in n.output)
    source.output[list(source.output).index(last.input[0])] = name
    outputs[name].type.tensor_type.ClearField("shape")
    del model.graph.node[at]
    return True


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


def _shape_const(model: onnx.ModelProto, stem: str, dims: tuple[int, ...]) -> str:
    """A new int64 initializer holding `dims` (a Reshape's target), under a fresh name."""
    name = _fresh(model, stem)
    model.graph.initializer.append(numpy_helper.from_array(np.array(dims, np.int64), name))
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
    for node in out.graph.node:
        if not _static_reshape(node, shapes):
            continue
        source = node.input[0]
        while source in made and _static_reshape(made[source], shapes):
            source = made[source].input[0]
        if source == node.input[0] and node.op_type == "Reshape":
            continue
        target = _shape_const(out, f"{node.output[0]}__tidy_shape", shapes[node.output[0]])
        _become_reshape(node, source, target)
    return out


def _sink_reshapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """op(Reshape(a), Reshape(b)) -> Reshape(op(a, b)) for an element-wise op whose inputs,
    and a and b, have equal static shapes (onnx-ad's seed axis added to both sides of a ReLU
    mask): one Reshape instead of two, and it then merges with the next."""
    out = graphs.copy(model)
    shapes = _shapes(out)
    made = graphs.producers(out.graph)
    nodes: list[NodeProto] = []
    for node in out.graph.node:
        sources = [made.get(n) for n in node.input]
        if (node.op_type not in ELEMENTWISE or node.domain not in graphs.DEFAULT_DOMAINS
                or len(sources) != 2 or any(s is None or not _static_reshape(s, shapes)
                                            for s in sources)):
            nodes.append(node)
            continue
        a, b = (s.input[0] for s in sources if s is not None)
        if shapes[a] != shapes[b] or shapes[node.input[0]] != shapes[node.input[1]]:
            nodes.append(node)
            continue
        result, inner = node.output[0], _fresh(out, f"{node.output[0]}__sunk")
        target = _shape_const(out, f"{result}__tidy_shape", shapes[result])
        nodes.append(helper.make_node(node.op_type, [a, b], [inner], name=inner))
        nodes.append(helper.make_node("Reshape", [inner, target], [result],
                                      name=f"{result}__tidy"))
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    return out


def masks_before_unpool(model: onnx.ModelProto) -> onnx.ModelProto:
    """Mul(MaxUnpool(g, I), Cast(Greater(y, 0))), y the input of the MaxPool that gave I (a
    ReLU's mask after its pool): the mask on the pooled tensor instead, Mul(g, Cast(Greater(
    MaxPool(y), 0))) then MaxUnpool, a quarter of the elements for 2x2 windows. Exact: the
    unpooled value sits where y equals its window's maximum, and is zero elsewhere."""
    out = graphs.copy(model)
    made = graphs.producers(out.graph)
    readers = _consumers(out)
    constants = _constants(out)
    extra: list[NodeProto] = []
    for node in out.graph.node:
        plan = _unpooled_mask(node, made, readers, constants)
        if plan is None:
            continue
        unpool, cast, greater, pool = plan
        names = [_fresh(out, f"{node.output[0]}__pooled_{k}") for k in ("gt", "cast", "g")]
        extra.extend([
            helper.make_node("Greater", [pool.output[0], greater.input[1]], [names[0]],
                             name=names[0]),
            helper.make_node("Cast", [names[0]], [names[1]], name=names[1],
                             to=next(a.i for a in cast.attribute if a.name == "to")),
            helper.make_node("Mul", [unpool.input[0], names[1]], [names[2]], name=names[2])])
        result = node.output[0]
        node.CopyFrom(helper.make_node("MaxUnpool", [names[2], *unpool.input[1:]], [result],
                                       name=f"{result}__tidy"))
        node.attribute.extend(unpool.attribute)
    _insert_before_use(out, extra)
    return out


def _unpooled_mask(node: NodeProto, made: dict[str, NodeProto],
                   readers: dict[str, list[NodeProto]], constants: dict[str, np.ndarray]
                   ) -> tuple[NodeProto, NodeProto, NodeProto, NodeProto] | None:
    """(MaxUnpool, Cast, Greater, MaxPool) when `node` is a Mul `masks_before_unpool`
    rewrites."""
    if node.op_type != "Mul" or node.domain not in graphs.DEFAULT_DOMAINS:
        return None
    first, second = (made.get(n) for n in node.input)
    unpool, cast = (first, second) if first is not None and first.op_type == "MaxUnpool" \
        else (second, first)
    if unpool is None or cast is None or unpool.op_type != "MaxUnpool" or \
            cast.op_type != "Cast" or len(readers.get(unpool.output[0], [])) != 1:
        return None
    greater, pool = made.get(cast.input[0]), made.get(unpool.input[1])
    if (greater is None or pool is None or greater.op_type != "Greater"
            or not _zero(greater.input[1], constants) or pool.op_type != "MaxPool"
            or greater.input[0] != pool.input[0] or len(pool.output) < 2):
        return None
    return unpool, cast, greater, pool


def _insert_before_use(model: onnx.ModelProto, extra: list[NodeProto]) -> None:
    """Add nodes, each placed just before the first node that reads its output (the graph
    stays topologically sorted: their inputs are all produced earlier)."""
    wanted = {n.output[0]: n for n in extra}
    placed: set[str] = set()
    nodes: list[NodeProto] = []

    def place(name: str) -> None:
        if name in wanted and name not in placed:
            placed.add(name)
            for read in wanted[name].input:
                place(read)
            nodes.append(wanted[name])

    for node in model.graph.node:
        for read in node.input:
            place(read)
        nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)


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
    one seed, a float32 or float16 input: what onnxruntime's MaxUnpool takes) rewritten as
    MaxUnpool(g, indices): the pool's Indices name the first maximum of each window
    (onnxruntime keeps the first on ties) and windows that do not overlap scatter one value
    each onto zeros, which is what MaxUnpool does, in one pass over the pooled tensor instead
    of ScatterND's generic kernel (digits CNN, 32 rows: the pool's gradient 177 -> ~40 us)."""
    out = graphs.copy(model)
    shapes = _shapes(out)
    made = graphs.producers(out.graph)
    types = graphs.types(out)
    nodes: list[NodeProto] = []
    for node in out.graph.node:
        pool = _pool_plan(node, made, shapes, types)
        nodes.extend([node] if pool is None else _unpool(out, node, pool, shapes))
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    return out


def _pool_plan(node: NodeProto, made: dict[str, NodeProto], shapes: dict[str, tuple[int, ...]],
               types: dict[str, onnx.TypeProto]) -> NodeProto | None:
    """The MaxPool when `node` is a scatter `maxpool_gradients` rewrites."""
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
    kind = types.get(pool.input[0])
    if (len(kernel) != 2 or list(attrs.get("strides", [1, 1])) != kernel
            or any(attrs.get("pads", [0] * 4)) or list(attrs.get("dilations", [1, 1])) != [1, 1]
            or attrs.get("ceil_mode", 0) or attrs.get("storage_order", 0)
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or x is None
            or len(x) != 4 or x[2] % kernel[0] or x[3] % kernel[1] or kind is None
            or kind.tensor_type.elem_type not in UNPOOLED or pool.output[0] not in shapes
            or shapes.get(update, (0,))[-1] != 1
            or shapes.get(node.output[0]) != (math.prod(x), 1)):
        return None
    return pool


def _unpool(model: onnx.ModelProto, scatter: NodeProto, pool: NodeProto,
            shapes: dict[str, tuple[int, ...]]) -> list[NodeProto]:
    """Reshape(g) to the pooled shape, MaxUnpool (onto the pool's input shape: windows that
    tile it, so MaxUnpool's own output shape, which shape inference then knows), Reshape to
    the scatter's (elements, 1)."""
    stem = scatter.output[0]
    names = {"pooled": _shape_const(model, f"{stem}__pooled", shapes[pool.output[0]]),
             "flat": _shape_const(model, f"{stem}__flat", (math.prod(shapes[pool.input[0]]), 1))}
    attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute
             if a.name in ("kernel_shape", "strides")}
    g, unpooled = _fresh(model, f"{stem}__g"), _fresh(model, f"{stem}__unpooled")
    return [helper.make_node("Reshape", [scatter.input[2], names["pooled"]], [g], name=g),
            helper.make_node("MaxUnpool", [g, pool.output[1]], [unpooled],
                             name=unpooled, **attrs),
            helper.make_node("Reshape", [unpooled, names["flat"]], [stem],
                             name=f"{stem}__tidy")]


def unit_tails(model: onnx.ModelProto) -> onnx.ModelProto:
    """Trailing extent-1 axes (the seed axis) dropped around the two kernels onnxruntime runs
    one element at a time when the innermost axis has extent 1: an element-wise op with a
    one-element operand ([32,16,16,1] / [1]: 57 us, against 5 without the axis) and a
    reduction that keeps such axes after the reduced ones (45 us against 5). Reshape in,
    the same op, Reshape out: the same values."""
    out = graphs.copy(model)
    shapes = _shapes(out)
    constants = _constants(out)
    nodes: list[NodeProto] = []
    for k, node in enumerate(out.graph.node):
        tail = _unit_tail(node, shapes, constants)
        nodes.extend([node] if tail == 0 else _without_tail(out, node, shapes, tail, k))
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    return out


def _unit_tail(node: NodeProto, shapes: dict[str, tuple[int, ...]],
               constants: dict[str, np.ndarray]) -> int:
    """How many trailing extent-1 axes `unit_tails` drops around `node` (0: leave it)."""
    if node.domain not in graphs.DEFAULT_DOMAINS or node.output[0] not in shapes or \
            any(name not in shapes for name in node.input if name):
        return 0
    shape = shapes[node.output[0]]
    if node.op_type in ELEMENTWISE and len(node.input) == 2 and math.prod(shape) > 1:
        sizes = sorted(math.prod(shapes[n]) for n in node.input)
        same = shapes[node.input[0]] == shapes[node.input[1]]
        return _ones_at_end(shape) if sizes[0] == 1 and not same else 0
    if node.op_type in REDUCTIONS and _keeps_dims(node):
        src = shapes[node.input[0]]
        axes = _axes(node, len(src), constants)
        tail = _ones_at_end(src)
        return tail if axes and all(a < len(src) - tail for a in axes) else 0
    return 0


def _ones_at_end(shape: tuple[int, ...]) -> int:
    """The number of trailing extent-1 axes, all but the first axis at most."""
    k = 0
    while k < len(shape) - 1 and shape[len(shape) - 1 - k] == 1:
        k += 1
    return k


def _keeps_dims(node: NodeProto) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return bool(attrs.get("keepdims", 1))


def _axes(node: NodeProto, rank: int, constants: dict[str, np.ndarray]) -> list[int]:
    """A reduction's axes, non-negative (attribute, or constant input); [] when unknown or
    empty (then it reduces everything, or nothing)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "axes" in attrs:
        return [int(a) % rank for a in attrs["axes"]]
    if len(node.input) > 1 and node.input[1] in constants:
        return [int(a) % rank for a in constants[node.input[1]].reshape(-1)]
    return []


def _without_tail(model: onnx.ModelProto, node: NodeProto, shapes: dict[str, tuple[int, ...]],
                  tail: int, k: int) -> list[NodeProto]:
    """`node` (the k-th) on its inputs with `tail` trailing axes reshaped away, then reshaped
    back; names carry k, as the new nodes join the graph only after the pass."""
    def target(dims: tuple[int, ...]) -> str:
        return _shape_const(model, f"{node.output[0]}__untailed_shape", dims)

    made: list[NodeProto] = []
    reads = list(node.input)
    for j, name in enumerate(reads[:1] if node.op_type in REDUCTIONS else reads):
        dims = shapes[name]
        cut = dims[:len(dims) - tail] if math.prod(dims) > 1 else ()
        reads[j] = _fresh(model, f"{name}__untailed_{k}_{j}")
        made.append(helper.make_node("Reshape", [name, target(cut)], [reads[j]],
                                     name=reads[j]))
    inner = _fresh(model, f"{node.output[0]}__untailed_{k}")
    body = onnx.NodeProto()
    body.CopyFrom(node)
    body.ClearField("input")
    body.input.extend(reads)
    body.output[0] = inner
    body.name = inner
    made.append(body)
    made.append(helper.make_node("Reshape", [inner, target(shapes[node.output[0]])],
                                 [node.output[0]], name=f"{node.output[0]}__tidy"))
    return made


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

"""Read the tree ensemble of an ONNX graph into shap's custom tree format.

Handles ai.onnx.ml TreeEnsembleRegressor / TreeEnsembleClassifier (opsets 1 and 3) and TreeEnsemble
(opset 5). The trees give the raw margin; the op's post_transform (or the Sigmoid/Softmax node
that some converters put after an op without one) is reported, never applied, so the caller can
say "explained on the margin scale". Every split is rewritten to shap's single rule,
"x <= threshold goes left, NaN goes to children_default", so that shap's interventional TreeSHAP
and `predict_margin` route each row exactly as onnxruntime 1.32 does. Anything that cannot be
rewritten exactly raises `UnsupportedTrees`, and the caller falls back to a sampling estimator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypedDict

import numpy as np
import onnx
from onnx import GraphProto, NodeProto, TensorProto, helper, numpy_helper

Array = np.ndarray
Finder = Callable[[Array, Array, Array], Array]

ML_DOMAIN = "ai.onnx.ml"
LEGACY_OPS = ("TreeEnsembleRegressor", "TreeEnsembleClassifier")
TREE_OPS = (*LEGACY_OPS, "TreeEnsemble")
LEAF = -1
LEQ, LT, GTE, GT = 0, 1, 2, 3  # the opset-5 codes; EQ 4, NEQ 5, MEMBER 6 are unsupported
MODE_CODES = {"BRANCH_LEQ": LEQ, "BRANCH_LT": LT, "BRANCH_GTE": GTE, "BRANCH_GT": GT,
              "BRANCH_EQ": 4, "BRANCH_NEQ": 5, "BRANCH_MEMBER": 6, "LEAF": LEAF}
MODE_NAMES = {code: name for name, code in MODE_CODES.items()}
TRANSFORMS = ("NONE", "SOFTMAX", "LOGISTIC", "SOFTMAX_ZERO", "PROBIT")  # index = opset-5 code
AGGREGATES = ("AVERAGE", "SUM", "MIN", "MAX")  # index = opset-5 code
# shap's interventional code (tree_shap.h, tree_shap_indep) indexes nodes with 16-bit shorts.
MAX_TREE_NODES = 32767
PASS_THROUGH = ("Identity", "ZipMap", "Cast")
NEUTRAL = {"Mul": 1.0, "Div": 1.0, "Add": 0.0, "Sub": 0.0}  # x op c == x when c is all this
# a link applied by a node after the op (the op's post_transform then NONE): op -> transform
LINK_NODES = {"Sigmoid": "LOGISTIC", "Softmax": "SOFTMAX"}
FLOAT_TYPES: dict[int, type[np.floating[Any]]] = {int(TensorProto.FLOAT): np.float32,
                                                   int(TensorProto.DOUBLE): np.float64}


class UnsupportedTrees(Exception):
    """The graph is not a tree ensemble TreeSHAP can explain exactly; the message says why.

    A condition, not a failure: the caller falls back to a sampling estimator.
    """


class ShapTree(TypedDict):
    """One tree in shap's custom format: node 0 is the root, leaves have -1 children."""

    children_left: Array  # (nodes,) int32
    children_right: Array  # (nodes,) int32
    children_default: Array  # (nodes,) int32: where NaN goes
    features: Array  # (nodes,) int32, -1 at leaves
    thresholds: Array  # (nodes,) float64 holding float32 values: x <= t goes left
    values: Array  # (nodes, targets) float64: leaf values (shap recomputes interior ones)
    node_sample_weight: Array  # (nodes,) float64: shap overwrites it from the background


class ParsedTrees(TypedDict):
    """shap's custom model dict, plus how the op's score columns follow from the tree targets.

    shap sees `targets` raw outputs; the op's score columns ("outputs") are the affine image
    `output_map @ raw + output_offset`, and the op reports `post_transform(outputs)`.
    """

    trees: list[ShapTree]
    base_offset: Array  # (targets,) base_values, added to every row's raw sum
    input_dtype: type[np.floating[Any]]  # the precision the op compares in
    internal_dtype: type[np.floating[Any]]
    tree_output: str
    output_map: Array  # (outputs, targets)
    output_offset: Array  # (outputs,)
    post_transform: str  # NONE, LOGISTIC, SOFTMAX or SOFTMAX_ZERO, as onnxruntime applies it
    # (the op's own, or a Sigmoid/Softmax node's right after an op that applies none)
    n_features: int  # columns of the input the op reads
    score_outputs: tuple[str, ...]  # graph outputs carrying post_transform(scores) unchanged


@dataclass(frozen=True)
class _Table:
    """Every node of every tree in one table; children are table positions, not node ids."""

    roots: Array  # (trees,) positions
    leaf: Array  # (nodes,) bool
    feature: Array  # (nodes,) int64
    split: Array  # (nodes,) float64 threshold as written
    mode: Array  # (nodes,) int64 mode code
    true_pos: Array  # (nodes,)
    false_pos: Array  # (nodes,)
    nan_true: Array  # (nodes,) bool: NaN takes the true branch
    values: Array  # (nodes, targets) summed leaf weights
    scored: Array  # (nodes, targets) bool: the leaf has a weight entry for the target


@dataclass(frozen=True)
class _Routing:
    """The table rewritten to "x <= threshold goes left"."""

    left: Array  # (nodes,) positions
    right: Array  # (nodes,)
    threshold: Array  # (nodes,) float64
    nan_left: Array  # (nodes,) bool


@dataclass(frozen=True)
class _Head:
    """What happens after the trees: raw base values, the column map and the transform.

    onnxruntime 1.32 adds some base values only to targets that got a weight in that row, and
    a binary classifier changes layout without one: the targets in `always_scored` must get a
    weight in every row for the output to be the linear sum the trees describe.
    """

    base: Array  # (targets,)
    output_map: Array  # (outputs, targets)
    output_offset: Array  # (outputs,)
    post_transform: str
    always_scored: tuple[int, ...] = ()


# ---------------------------------------------------------------------------- public API


def parse_onnx_trees(model: onnx.ModelProto) -> ParsedTrees:
    """The ensemble of a graph `input -> [Identity/Cast]* -> tree op -> ...` in shap's format."""
    graph = model.graph
    node = _find_tree(graph)
    input_name, input_dtype = _input_chain(graph, node)
    attrs = _attributes(node)
    table, head = _parse_op(node.op_type, attrs)
    n_features = _feature_count(graph, input_name, table)
    routing = _route(table, input_dtype)
    orders = [_preorder(int(root), table, routing) for root in table.roots]
    _check_scored(table, [order for order, _, _ in orders], head.always_scored)
    trees = [_shap_tree(order, table, routing) for order in orders]
    transform, outputs = _link(graph, _score_tensor(node), head.post_transform)
    return ParsedTrees(trees=trees, base_offset=_frozen(head.base), input_dtype=input_dtype,
                       internal_dtype=np.float64, tree_output="raw_value",
                       output_map=_frozen(head.output_map),
                       output_offset=_frozen(head.output_offset),
                       post_transform=transform, n_features=n_features,
                       score_outputs=outputs)


def _link(graph: GraphProto, scores: str, transform: str) -> tuple[str, tuple[str, ...]]:
    """The transform after the trees and the graph outputs it yields: the op's own, or a
    Sigmoid/Softmax node's when the op applies none and the scores reach no output directly
    (the outputs then carry link(margin), just as with the op's post_transform)."""
    outputs = reachable_outputs(graph, scores)
    link = following_link(graph, scores) if transform == "NONE" and not outputs else None
    return (link.transform, link.outputs) if link else (transform, outputs)


def shap_model(parsed: ParsedTrees, targets: list[int] | None = None) -> dict[str, Any]:
    """A fresh dict for shap.TreeExplainer, restricted to `targets` (all by default).

    Fresh because shap overwrites each tree's node_sample_weight in place.
    """
    keep = list(range(parsed["base_offset"].size)) if targets is None else targets
    trees = [ShapTree(children_left=t["children_left"], children_right=t["children_right"],
                      children_default=t["children_default"], features=t["features"],
                      thresholds=t["thresholds"], values=t["values"][:, keep],
                      node_sample_weight=np.ones(t["features"].size))
             for t in parsed["trees"]]
    return {"trees": trees, "base_offset": parsed["base_offset"][keep],
            "input_dtype": parsed["input_dtype"], "internal_dtype": np.float64,
            "tree_output": parsed["tree_output"]}


def predict_raw(parsed: ParsedTrees, X: Array) -> Array:
    """The raw tree sums plus base values for X (rows, features): (rows, targets), pure numpy."""
    Xc = np.asarray(X).astype(parsed["input_dtype"]).astype(np.float64)  # (rows, features)
    out = np.tile(parsed["base_offset"], (Xc.shape[0], 1))  # (rows, targets)
    for tree in parsed["trees"]:
        out += tree["values"][_leaves(tree, Xc)]
    return out


def predict_margin(parsed: ParsedTrees, X: Array) -> Array:
    """The op's score columns before post_transform, for X (rows, features): (rows, outputs)."""
    raw = predict_raw(parsed, X)  # (rows, targets)
    return np.asarray(raw @ parsed["output_map"].T + parsed["output_offset"])


def apply_post_transform(name: str, margins: Array) -> Array:
    """onnxruntime's post_transform on margins (rows, outputs): what the op finally returns."""
    m = np.asarray(margins, np.float64)
    if name == "NONE":
        return m
    if name == "LOGISTIC":
        return np.asarray(1.0 / (1.0 + np.exp(-m)))
    if name == "SOFTMAX":
        e = np.exp(m - m.max(axis=1, keepdims=True))  # (rows, outputs)
        return np.asarray(e / e.sum(axis=1, keepdims=True))
    if name == "SOFTMAX_ZERO":
        return _softmax_zero(m)
    raise ValueError(f"post_transform {name!r} is not supported")


# ---------------------------------------------------------------------------- the graph


def _find_tree(graph: GraphProto) -> NodeProto:
    """The one tree-ensemble node of the graph."""
    found = [n for n in graph.node if n.op_type in TREE_OPS and n.domain == ML_DOMAIN]
    if len(found) != 1:
        ops = sorted({n.op_type for n in graph.node})
        raise UnsupportedTrees(f"need exactly one {'/'.join(TREE_OPS)} node, found {len(found)} "
                               f"(graph ops: {', '.join(ops)})")
    return found[0]


def _input_chain(graph: GraphProto, tree: NodeProto) -> tuple[str, type[np.floating[Any]]]:
    """Walk back from the tree to a graph input through Identity/Cast only.

    Returns the input's name and the narrowest float type on the way: the precision the
    splits see. Anything else (scalers, imputers, Concat of several inputs) is unsupported.
    """
    producers = {out: n for n in graph.node for out in n.output}
    inputs = _graph_inputs(graph)
    name = tree.input[0]
    dtypes: list[type[np.floating[Any]]] = []
    while name not in inputs:
        node = producers.get(name)
        if node is None or node.op_type not in ("Identity", "Cast"):
            what = "an initializer" if node is None else f"a {node.op_type} node"
            raise UnsupportedTrees(f"the tree input {name!r} comes from {what}, not from a "
                                   "graph input through Identity/Cast only")
        if node.op_type == "Cast":
            dtypes.append(_float_type(_attributes(node).get("to"), f"Cast {node.name!r}"))
        name = node.input[0]
    dtypes.append(_float_type(inputs[name].type.tensor_type.elem_type, f"input {name!r}"))
    return name, (np.float32 if np.float32 in dtypes else np.float64)


def _graph_inputs(graph: GraphProto) -> dict[str, onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (not initializers listed as inputs, old IR style)."""
    init = {t.name for t in graph.initializer}
    return {i.name: i for i in graph.input if i.name not in init}


def _float_type(elem_type: object, where: str) -> type[np.floating[Any]]:
    """float32 or float64 for an ONNX element type; other types would change the values."""
    if not isinstance(elem_type, int) or elem_type not in FLOAT_TYPES:
        raise UnsupportedTrees(f"{where}: only float and double tensors can reach the trees")
    return FLOAT_TYPES[elem_type]


def _feature_count(graph: GraphProto, input_name: str, table: _Table) -> int:
    """Static column count of the input, or one past the largest feature the splits read."""
    dims = graph.input[[i.name for i in graph.input].index(input_name)].type.tensor_type.shape.dim
    used = int(table.feature[~table.leaf].max(initial=-1)) + 1
    if np.any(table.feature[~table.leaf] < 0):
        raise UnsupportedTrees("a split reads a negative feature index")
    if len(dims) == 1:
        n = 1
    elif len(dims) == 2 and dims[1].HasField("dim_value"):
        n = int(dims[1].dim_value)
    elif len(dims) == 2:
        return max(used, 1)
    else:
        raise UnsupportedTrees(f"input {input_name!r} has rank {len(dims)}; trees need [N, F]")
    if used > n:
        raise UnsupportedTrees(f"a split reads feature {used - 1}; the input has {n} columns")
    return n


def _score_tensor(node: NodeProto) -> str:
    """The op's score output: the second output of a classifier, the only one otherwise."""
    return node.output[1] if node.op_type == "TreeEnsembleClassifier" else node.output[0]


def reachable_outputs(graph: GraphProto, scores: str) -> tuple[str, ...]:
    """Graph outputs that carry the tensor `scores` unchanged: reached through Identity,
    ZipMap, Cast or neutral arithmetic (onnxmltools writes Mul(probabilities, 1)) only."""
    reached = _carried(graph, scores)
    return tuple(o.name for o in graph.output if o.name in reached)


@dataclass(frozen=True)
class Link:
    """A link function applied by its own node after the op, e.g. LightGBM's Sigmoid."""

    node: int  # position in graph.node
    transform: str  # LOGISTIC or SOFTMAX, as if it were the op's post_transform
    outputs: tuple[str, ...]  # graph outputs carrying the node's result unchanged


def following_link(graph: GraphProto, scores: str) -> Link | None:
    """The one Sigmoid, or Softmax over the class axis, that the unchanged `scores` feed and
    whose result reaches graph outputs unchanged; None when there is no such single node."""
    reached = _carried(graph, scores)
    found = [(i, n) for i, n in enumerate(graph.node)
             if n.op_type in LINK_NODES and n.input and n.input[0] in reached
             and _attributes(n).get("axis", -1) in (1, -1)]
    if len(found) != 1:
        return None
    i, node = found[0]
    outputs = reachable_outputs(graph, node.output[0])
    return Link(i, LINK_NODES[node.op_type], outputs) if outputs else None


def _carried(graph: GraphProto, scores: str) -> set[str]:
    """Tensors equal to `scores`: it and what pass-through nodes make of it."""
    consumers: dict[str, list[tuple[NodeProto, int]]] = {}
    for n in graph.node:
        for slot, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, slot))
    constants = _constants(graph)
    reached, frontier = {scores}, [scores]
    while frontier:
        for n, slot in consumers.get(frontier.pop(), []):
            if _passes(n, slot, constants) and n.output[0] not in reached:
                reached.add(n.output[0])
                frontier.append(n.output[0])
    return reached


def _passes(node: NodeProto, slot: int, constants: dict[str, Array]) -> bool:
    """Whether `node` hands on the value arriving at input `slot` unchanged."""
    if node.op_type in PASS_THROUGH:
        return slot == 0
    neutral = NEUTRAL.get(node.op_type)
    if neutral is None or len(node.input) != 2 or (slot == 1 and node.op_type in ("Div", "Sub")):
        return False
    other = constants.get(node.input[1 - slot])
    return other is not None and other.ndim <= 1 and bool(np.all(other == neutral))


def _constants(graph: GraphProto) -> dict[str, Array]:
    """Initializers and Constant-node tensors by name (small ones only matter here)."""
    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer if _small(t)}
    for n in graph.node:
        value = _attributes(n).get("value") if n.op_type == "Constant" else None
        if isinstance(value, np.ndarray):
            found[n.output[0]] = value
    return found


def _small(tensor: TensorProto) -> bool:
    """At most 64 elements: neutral operands are scalars or one value per column."""
    return int(np.prod(tensor.dims)) <= 64


def _attributes(node: NodeProto) -> dict[str, Any]:
    """Attribute values with strings decoded and tensors as numpy arrays."""
    return {a.name: _attribute_value(a) for a in node.attribute}


def _attribute_value(attr: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(attr)
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


# ---------------------------------------------------------------------------- the ops


def _parse_op(op_type: str, attrs: dict[str, Any]) -> tuple[_Table, _Head]:
    """Table and head of one of the three ops."""
    if op_type == "TreeEnsemble":
        return _parse_v5(attrs)
    if op_type == "TreeEnsembleRegressor":
        return _parse_regressor(attrs)
    return _parse_classifier(attrs)


def _floats(attrs: dict[str, Any], name: str) -> Array:
    """A float attribute, preferring the double `<name>_as_tensor` form when present."""
    value = attrs.get(f"{name}_as_tensor", attrs.get(name))
    return np.asarray([] if value is None else value, np.float64).ravel()


def _ints(attrs: dict[str, Any], name: str, default: int | None = None, n: int = 0) -> Array:
    """An int attribute; an absent one is `default` repeated n times (or an error)."""
    if name not in attrs:
        if default is None:
            raise UnsupportedTrees(f"attribute {name} is missing")
        return np.full(n, default, np.int64)
    return np.asarray(attrs[name], np.int64).ravel()


def _aggregate(attrs: dict[str, Any]) -> str:
    """SUM or AVERAGE; MIN and MAX are not additive over trees, so TreeSHAP cannot take them."""
    name = _enum(attrs.get("aggregate_function", "SUM"), AGGREGATES)
    if name not in ("SUM", "AVERAGE"):
        raise UnsupportedTrees(f"aggregate_function {name} is not a sum over trees")
    return name


def _transform(attrs: dict[str, Any]) -> str:
    """The declared post_transform; PROBIT is refused (onnxruntime's binary output is broken)."""
    name = _enum(attrs.get("post_transform", "NONE"), TRANSFORMS)
    if name not in TRANSFORMS or name == "PROBIT":
        raise UnsupportedTrees(f"post_transform {name} is not supported")
    return name


def _enum(value: object, names: tuple[str, ...]) -> str:
    """An enum attribute as its name: opset 5 stores the index, older opsets the string."""
    if isinstance(value, int):
        return names[value] if 0 <= value < len(names) else str(value)
    return str(value)


def _target_head(base: Array, targets: int, transform: str) -> _Head:
    """Regression heads: outputs are the targets. onnxruntime ignores every transform but
    PROBIT when there is a single target (FinalizeScores1), so one target means NONE."""
    if base.size not in (0, targets):
        raise UnsupportedTrees(f"{base.size} base_values for {targets} targets")
    effective = "NONE" if targets == 1 else transform
    offset = np.zeros(targets) if base.size == 0 else base
    scored = tuple(np.flatnonzero(offset).tolist()) if targets > 1 else ()
    return _Head(offset, np.eye(targets), np.zeros(targets), effective, scored)


def _parse_v5(attrs: dict[str, Any]) -> tuple[_Table, _Head]:
    """Opset-5 TreeEnsemble: interior nodes and leaves in separate arrays, numeric modes."""
    table = _v5_table(attrs)
    if _aggregate(attrs) == "AVERAGE":
        table = _averaged(table)
    return table, _target_head(np.zeros(0), int(attrs["n_targets"]), _transform(attrs))


def _v5_table(attrs: dict[str, Any]) -> _Table:
    """Interior nodes first, then leaves, in one table; a degenerate root becomes its leaf."""
    _same_length(attrs, "nodes_featureids", "nodes_modes", "nodes_splits", "nodes_truenodeids",
                 "nodes_falsenodeids", "nodes_trueleafs", "nodes_falseleafs")
    _same_length(attrs, "leaf_weights", "leaf_targetids")
    n = _ints(attrs, "nodes_featureids").size
    leaves = np.zeros(_floats(attrs, "leaf_weights").size, np.int64)  # padding for the leaves
    return _Table(
        roots=_v5_roots(attrs, n), leaf=np.r_[np.zeros(n, bool), np.ones(leaves.size, bool)],
        feature=np.r_[_ints(attrs, "nodes_featureids"), leaves],
        split=np.r_[_floats(attrs, "nodes_splits"), leaves],
        mode=np.r_[_ints(attrs, "nodes_modes"), leaves + LEAF],
        true_pos=np.r_[_v5_children(attrs, "true", n), leaves],
        false_pos=np.r_[_v5_children(attrs, "false", n), leaves],
        nan_true=np.r_[_ints(attrs, "nodes_missing_value_tracks_true", 0, n), leaves] > 0,
        **_v5_values(attrs, n))


def _v5_roots(attrs: dict[str, Any], n: int) -> Array:
    """Root positions; a root whose two branches are the same leaf is that leaf (a stump)."""
    roots = _ints(attrs, "tree_roots")
    if roots.size == 0 or roots.min() < 0 or roots.max() >= n:
        raise UnsupportedTrees("tree_roots must index nodes_*")
    true_leaf, false_leaf = _ints(attrs, "nodes_trueleafs"), _ints(attrs, "nodes_falseleafs")
    true_ids, false_ids = _ints(attrs, "nodes_truenodeids"), _ints(attrs, "nodes_falsenodeids")
    stump = (true_leaf[roots] > 0) & (false_leaf[roots] > 0) & (true_ids[roots] == false_ids[roots])
    return np.where(stump, n + true_ids[roots], roots)


def _v5_children(attrs: dict[str, Any], side: str, n: int) -> Array:
    """Table positions of one branch: leaves sit after the n interior nodes."""
    ids, to_leaf = _ints(attrs, f"nodes_{side}nodeids"), _ints(attrs, f"nodes_{side}leafs") > 0
    return np.where(to_leaf, n + ids, ids)


def _v5_values(attrs: dict[str, Any], n: int) -> dict[str, Array]:
    """Each leaf's one weight in its target's column: values and scored, (nodes, targets)."""
    weights, targets = _floats(attrs, "leaf_weights"), _ints(attrs, "leaf_targetids")
    values = np.zeros((n + weights.size, int(attrs["n_targets"])))  # (nodes + leaves, targets)
    _check_ids(targets, values.shape[1], "leaf_targetids")
    rows = n + np.arange(weights.size)
    values[rows, targets] = weights  # one weight per leaf
    scored = np.zeros(values.shape, bool)
    scored[rows, targets] = True
    return {"values": values, "scored": scored}


def _same_length(attrs: dict[str, Any], *names: str) -> None:
    """Parallel attributes (a tuple per position) must all have the same length."""
    lengths = {name: np.asarray(attrs.get(name, [])).size for name in names}
    if len(set(lengths.values())) > 1:
        raise UnsupportedTrees(f"parallel attributes differ in length: {lengths}")


def _parse_regressor(attrs: dict[str, Any]) -> tuple[_Table, _Head]:
    """TreeEnsembleRegressor: targets are the outputs; base_values are added after aggregation."""
    targets = int(attrs.get("n_targets", 1))
    table = _legacy_table(attrs, "target", targets)
    if targets == 1:
        _check_single_weights(attrs)
    if _aggregate(attrs) == "AVERAGE":
        table = _averaged(table)
    return table, _target_head(_floats(attrs, "base_values"), targets, _transform(attrs))


def _check_single_weights(attrs: dict[str, Any]) -> None:
    """One target: onnxruntime keeps only a leaf's first weight where the spec sums them all."""
    keys = _node_keys(_ints(attrs, "target_treeids"), _ints(attrs, "target_nodeids"))
    if np.unique(keys).size != keys.size:
        raise UnsupportedTrees("a single-target leaf has several weights: the ONNX spec sums them "
                               "but onnxruntime uses only the first")


def _parse_classifier(attrs: dict[str, Any]) -> tuple[_Table, _Head]:
    """TreeEnsembleClassifier: one score per class label, with onnxruntime's binary special case."""
    labels = attrs.get("classlabels_int64s") or attrs.get("classlabels_strings") or []
    classes = len(labels)
    table = _legacy_table(attrs, "class", classes)
    base, transform = _floats(attrs, "base_values"), _transform(attrs)
    ids = _ints(attrs, "class_ids")
    if classes > 2:  # base values are added whether or not a class got a weight
        return table, replace(_target_head(base, classes, transform), always_scored=())
    if classes == 2 and set(ids.tolist()) == {0} and base.size <= 1:
        positive = bool(np.all(_floats(attrs, "class_weights") >= 0))
        return _binary_single(table, base, transform, positive)
    if classes == 2 and set(ids.tolist()) == {0, 1} and base.size <= 1:
        return table, _Head(np.pad(base, (0, 2 - base.size)), np.eye(2), np.zeros(2), transform,
                            (0, 1))
    raise UnsupportedTrees(f"classifier with {classes} labels, class_ids "
                           f"{sorted(set(ids.tolist()))} and {base.size} base_values: "
                           "onnxruntime's output for this layout is ill-defined")


def _binary_single(table: _Table, base: Array, transform: str,
                   positive: bool) -> tuple[_Table, _Head]:
    """One score s for two labels. onnxruntime writes [sigmoid(-s), sigmoid(s)] under LOGISTIC,
    else [1 - s, s] when every weight is >= 0 and [-s, s] otherwise (other transforms ignored)."""
    one = replace(table, values=table.values[:, :1], scored=table.scored[:, :1])
    offset = np.array([1.0, 0.0]) if positive and transform != "LOGISTIC" else np.zeros(2)
    effective = "LOGISTIC" if transform == "LOGISTIC" else "NONE"
    raw_base = base[:1] if base.size else np.zeros(1)
    head = _Head(raw_base, np.array([[-1.0], [1.0]]), offset, effective,
                 (0,) if raw_base[0] != 0 else ())
    return one, head


def _check_scored(table: _Table, orders: list[list[int]], targets: tuple[int, ...]) -> None:
    """Each target in `targets` needs a tree whose every leaf has a weight for it, so that
    onnxruntime sees a score for it in every row (see _Head)."""
    for t in targets:
        if not any(table.scored[np.asarray(o)[table.leaf[o]], t].all() for o in orders):
            raise UnsupportedTrees(f"some rows reach no leaf with a weight for output {t}; "
                                   "onnxruntime then drops its base value or changes layout")


def _legacy_table(attrs: dict[str, Any], prefix: str, targets: int) -> _Table:
    """Opsets 1/3: nodes are (treeid, nodeid) and child fields hold node ids of the same tree."""
    mode = _legacy_modes(attrs, prefix)
    tree, node = _ints(attrs, "nodes_treeids"), _ints(attrs, "nodes_nodeids")
    leaf = mode == LEAF
    find = _position_finder(tree, node)
    _, first = np.unique(tree, return_index=True)  # the root is each tree's first node listed
    return _Table(
        roots=np.sort(first), leaf=leaf, feature=_ints(attrs, "nodes_featureids"),
        split=_floats(attrs, "nodes_values"), mode=mode,
        true_pos=np.where(leaf, 0, find(tree, _ints(attrs, "nodes_truenodeids"), ~leaf)),
        false_pos=np.where(leaf, 0, find(tree, _ints(attrs, "nodes_falsenodeids"), ~leaf)),
        nan_true=_ints(attrs, "nodes_missing_value_tracks_true", 0, tree.size).astype(bool),
        **_legacy_values(attrs, prefix, targets, find, leaf))


def _legacy_modes(attrs: dict[str, Any], prefix: str) -> Array:
    """Check the parallel nodes_* / weight arrays and return the mode codes: (nodes,)."""
    _same_length(attrs, "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_modes",
                 "nodes_truenodeids", "nodes_falsenodeids")
    _same_length(attrs, f"{prefix}_treeids", f"{prefix}_nodeids", f"{prefix}_ids")
    tree = _ints(attrs, "nodes_treeids")
    modes = [MODE_CODES.get(m) for m in attrs.get("nodes_modes", [])]
    if None in modes or len(modes) != tree.size or tree.size == 0:
        names = sorted({str(m) for m in attrs.get("nodes_modes", [])})
        raise UnsupportedTrees(f"unknown or missing nodes_modes: {names}")
    if np.count_nonzero(np.diff(tree)) + 1 != np.unique(tree).size:
        raise UnsupportedTrees("nodes_* interleave trees: list each tree's nodes together")
    if _floats(attrs, "nodes_values").size != tree.size:
        raise UnsupportedTrees("nodes_values and nodes_treeids differ in length")
    return np.asarray(modes, np.int64)


def _legacy_values(attrs: dict[str, Any], prefix: str, targets: int, find: Finder,
                   leaf: Array) -> dict[str, Array]:
    """Leaf weights summed per (node, target), and which (node, target) pairs have one.

    Weights on interior nodes are never read.
    """
    ids = _ints(attrs, f"{prefix}_ids")
    _check_ids(ids, targets, f"{prefix}_ids")
    tree, node = _ints(attrs, f"{prefix}_treeids"), _ints(attrs, f"{prefix}_nodeids")
    weights = _floats(attrs, f"{prefix}_weights")
    if weights.size != ids.size:
        raise UnsupportedTrees(f"{ids.size} {prefix}_ids but {weights.size} {prefix}_weights")
    pos = find(tree, node, np.ones(tree.size, bool))  # (entries,)
    on_leaf = leaf[pos]
    values = np.zeros((leaf.size, targets))  # (nodes, targets)
    np.add.at(values, (pos[on_leaf], ids[on_leaf]), weights[on_leaf])
    scored = np.zeros(values.shape, bool)  # (nodes, targets)
    scored[pos[on_leaf], ids[on_leaf]] = True
    return {"values": values, "scored": scored}


def _node_keys(tree: Array, node: Array) -> Array:
    """One int64 key per (tree id, node id)."""
    if tree.size and (node.min() < 0 or node.max() >= 2**31 or tree.min() < 0):
        raise UnsupportedTrees("tree or node ids out of range")
    return np.asarray(tree * 2**31 + node)


def _position_finder(tree: Array, node: Array) -> Finder:
    """A function (tree ids, node ids, which to check) -> table positions of those nodes."""
    keys = _node_keys(tree, node)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    if np.any(sorted_keys[1:] == sorted_keys[:-1]):
        raise UnsupportedTrees("a (tree id, node id) pair appears twice in nodes_*")

    def find(t: Array, n: Array, check: Array) -> Array:
        wanted = _node_keys(t, np.where(check, n, 0))
        at = np.minimum(np.searchsorted(sorted_keys, wanted), max(keys.size - 1, 0))
        if keys.size == 0 or np.any(check & (sorted_keys[at] != wanted)):
            raise UnsupportedTrees("a child or weight refers to a node id its tree does not have")
        return np.asarray(order[at])

    return find


def _check_ids(ids: Array, targets: int, name: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= targets):
        raise UnsupportedTrees(f"{name} outside [0, {targets})")


def _averaged(table: _Table) -> _Table:
    """AVERAGE aggregation is a sum of leaf values divided by the number of trees."""
    return replace(table, values=table.values / max(table.roots.size, 1))


# ---------------------------------------------------------------------------- the splits


def _route(table: _Table, input_dtype: type[np.floating[Any]]) -> _Routing:
    """Rewrite LEQ/LT/GTE/GT splits as "x <= t goes left", exactly in the op's precision.

    x < t is x <= (largest value below t); x >= t and x > t are the negations of x < t and
    x <= t, so their children swap. NaN keeps going where the op sends it.
    """
    inner = ~table.leaf
    bad = sorted({MODE_NAMES.get(int(m), str(m)) for m in table.mode[inner]
                  if m not in (LEQ, LT, GTE, GT)})
    if bad:
        raise UnsupportedTrees(f"split modes {', '.join(bad)} cannot be written as x <= t")
    if np.any(np.isnan(table.split[inner])):
        raise UnsupportedTrees("a split threshold is NaN")
    strict = np.isin(table.mode, (LT, GTE))  # (nodes,)
    swap = np.isin(table.mode, (GTE, GT))  # (nodes,)
    threshold = _thresholds(table.split, strict, input_dtype, inner)
    return _Routing(left=np.where(swap, table.false_pos, table.true_pos),
                    right=np.where(swap, table.true_pos, table.false_pos),
                    threshold=threshold, nan_left=table.nan_true != swap)


def _thresholds(split: Array, strict: Array, input_dtype: type[np.floating[Any]],
                inner: Array) -> Array:
    """t' with (x <= t') == (x <= t), or == (x < t) where strict, for x of the input dtype."""
    if input_dtype is np.float32:
        down = _float32_floor(split)  # (nodes,) largest float32 <= t
        with np.errstate(over="ignore"):  # below -FLT_MAX is -inf, as it should be
            below = np.where(down == split, np.nextafter(down, np.float32(-np.inf)), down)
        return np.where(strict, below, down).astype(np.float64)
    t = np.where(strict, np.nextafter(split, -np.inf), split)  # (nodes,) float64
    if np.any(inner & (t.astype(np.float32).astype(np.float64) != t)):
        raise UnsupportedTrees("double-precision input with thresholds that float32 cannot hold "
                               "(or LT/GTE splits): shap's interventional TreeSHAP compares "
                               "thresholds in float32, so rows near a split would be misrouted")
    return np.asarray(t)


def _float32_floor(t: Array) -> Array:
    """The largest float32 <= t, elementwise: (nodes,) float32."""
    with np.errstate(over="ignore"):
        f = t.astype(np.float32)
        return np.where(f.astype(np.float64) > t, np.nextafter(f, np.float32(-np.inf)), f)


# ---------------------------------------------------------------------------- the trees


def _shap_tree(preorder: tuple[list[int], list[int], list[int]], table: _Table,
               routing: _Routing) -> ShapTree:
    """One tree in shap's layout from its preorder walk; shared subtrees are copied."""
    order, left, right = preorder
    pos = np.asarray(order)
    cl, cr = np.asarray(left, np.int32), np.asarray(right, np.int32)  # (nodes,)
    is_leaf = table.leaf[pos]
    return ShapTree(
        children_left=_frozen(cl), children_right=_frozen(cr),
        children_default=_frozen(np.where(routing.nan_left[pos], cl, cr).astype(np.int32)),
        features=_frozen(np.where(is_leaf, -1, table.feature[pos]).astype(np.int32)),
        thresholds=_frozen(np.where(is_leaf, 0.0, routing.threshold[pos])),
        values=_frozen(np.ascontiguousarray(table.values[pos])),
        node_sample_weight=np.ones(pos.size))  # writable: shap refills it from the background


def _frozen(a: Array) -> Array:
    """Read-only, so parsed trees can be shared between threads and never drift."""
    a.setflags(write=False)
    return a


def _preorder(root: int, table: _Table, routing: _Routing) -> tuple[list[int], list[int],
                                                                    list[int]]:
    """Table positions in shap order and each node's children as shap indices (-1 at leaves)."""
    order: list[int] = []
    left: list[int] = []
    right: list[int] = []
    for pos, parent, is_right in _walk(root, table, routing):
        if parent >= 0:
            (right if is_right else left)[parent] = len(order)
        order.append(pos)
        left.append(-1)
        right.append(-1)
    return order, left, right


def _walk(root: int, table: _Table, routing: _Routing) -> Iterator[tuple[int, int, bool]]:
    """Depth-first (position, parent's shap index, is right child); bounded, so cycles fail."""
    stack = [(root, -1, False)]
    count = 0
    while stack:
        pos, parent, is_right = stack.pop()
        if not 0 <= pos < table.leaf.size:
            raise UnsupportedTrees(f"a child points outside the node table ({pos})")
        yield pos, parent, is_right
        if not table.leaf[pos]:
            stack.append((int(routing.right[pos]), count, True))
            stack.append((int(routing.left[pos]), count, False))
        count += 1
        if count > MAX_TREE_NODES:
            raise UnsupportedTrees(f"a tree has more than {MAX_TREE_NODES} nodes (or a cycle); "
                                   "shap's interventional TreeSHAP indexes nodes with 16 bits")


def _leaves(tree: ShapTree, X: Array) -> Array:
    """Leaf index reached by each row of X (rows, features): (rows,)."""
    idx = np.zeros(X.shape[0], np.int64)  # (rows,)
    rows = np.arange(X.shape[0])
    while True:
        inner = tree["children_left"][idx] >= 0
        if not inner.any():
            return idx
        x = X[rows, np.maximum(tree["features"][idx], 0)]  # (rows,)
        step = np.where(x <= tree["thresholds"][idx], tree["children_left"][idx],
                        tree["children_right"][idx])
        step = np.where(np.isnan(x), tree["children_default"][idx], step)
        idx = np.where(inner, step, idx)


def _softmax_zero(m: Array) -> Array:
    """onnxruntime's SOFTMAX_ZERO: softmax where (near-)zero scores keep weight ~0."""
    top = m.max(axis=1, keepdims=True)  # (rows, 1)
    e = np.where(np.abs(m) > 1e-7, np.exp(m - top), m * np.exp(-top))  # (rows, outputs)
    total = e.sum(axis=1, keepdims=True)
    return np.asarray(np.where(total == 0, 0.5, e / np.where(total == 0, 1.0, total)))

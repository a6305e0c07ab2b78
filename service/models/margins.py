"""The margin of a model: its scores before the final op's post_transform.

ai.onnx.ml classifiers and tree ensembles apply their link function (LOGISTIC, SOFTMAX, ...)
inside the op. Setting that op's `post_transform` to NONE gives the raw scores without
retraining. Some converters apply the link in a node of its own after an op with no
post_transform (a Sigmoid or Softmax fed by the scores): that node becomes an Identity. For a
LOGISTIC output, the margin *is* logit(p), exactly and without the float32 saturation that
makes log(p / (1 - p)) useless once p rounds to 0 or 1; for every other transform the margin
is the scale on which tree and linear attributions are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import NodeProto, helper

from explainers.trees.onnx_trees import following_link, reachable_outputs

ML_DOMAIN = "ai.onnx.ml"
LINK_OPS = ("LinearClassifier", "LinearRegressor", "TreeEnsembleClassifier",
            "TreeEnsembleRegressor", "TreeEnsemble")
TRANSFORM_CODES = ("NONE", "SOFTMAX", "LOGISTIC", "SOFTMAX_ZERO", "PROBIT")  # opset-5 ints


@dataclass(frozen=True)
class MarginGraph:
    """The model with its link op's post_transform set to NONE, and what it removed."""

    proto: onnx.ModelProto
    outputs: dict[str, str]  # graph output name -> the post_transform it had


def margin_graph(model: onnx.ModelProto) -> MarginGraph | None:
    """A copy of `model` whose link op applies no post_transform (or whose link node is an
    Identity), or None when there is none.

    Only graphs with exactly one link op qualify; its score outputs must reach graph outputs
    through Identity, Cast, ZipMap or neutral arithmetic only (directly, or through the one
    Sigmoid/Softmax node that applies the link), so the new outputs are the op's raw scores.
    """
    ops = [n for n in model.graph.node if n.op_type in LINK_OPS and n.domain == ML_DOMAIN]
    if len(ops) != 1:
        return None
    transform = _transform(ops[0])
    if transform == "NONE":
        return _without_link_node(model, _score_output(ops[0]))
    outputs = reachable_outputs(model.graph, _score_output(ops[0]))
    if not outputs:
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _set_none(copy.graph.node[list(model.graph.node).index(ops[0])])
    return MarginGraph(copy, {name: transform for name in outputs})


def _without_link_node(model: onnx.ModelProto, scores: str) -> MarginGraph | None:
    """The copy whose following Sigmoid/Softmax node is an Identity keeping its output name."""
    link = following_link(model.graph, scores)
    if link is None or reachable_outputs(model.graph, scores):
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    node = copy.graph.node[link.node]
    node.CopyFrom(helper.make_node("Identity", [node.input[0]], [node.output[0]], node.name))
    return MarginGraph(copy, {name: link.transform for name in link.outputs})


def _transform(node: NodeProto) -> str:
    """The op's post_transform name (opset 5 stores an index, older opsets a string)."""
    for a in node.attribute:
        if a.name == "post_transform":
            value = helper.get_attribute_value(a)
            if isinstance(value, int):
                return TRANSFORM_CODES[value] if 0 <= value < len(TRANSFORM_CODES) else "?"
            return value.decode() if isinstance(value, bytes) else str(value)
    return "NONE"


def _set_none(node: NodeProto) -> None:
    """Rewrite post_transform to NONE in whichever encoding the op uses."""
    for a in node.attribute:
        if a.name == "post_transform":
            if a.type == onnx.AttributeProto.INT:
                a.i = 0
            else:
                a.s = b"NONE"


def _score_output(node: NodeProto) -> str:
    """Classifiers emit (label, scores); the other link ops emit scores only."""
    return node.output[1] if node.op_type.endswith("Classifier") else node.output[0]

"""Issue 11, item 19: tree classifiers dropped into a repository with only a background are
explained by exact TreeSHAP by default (logit for a binary LOGISTIC output, margin for softmax),
and a link applied by a node after the tree op (Sigmoid, Softmax) or passed through onnxmltools'
Mul(probabilities, 1) is recognised like the op's own post_transform. Real scikit-learn and
LightGBM models converted here, served by a real server."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from explainers.trees.onnx_trees import parse_onnx_trees
from service.api.server import Sidelight
from service.api.tensors import from_array
from service.models.margins import margin_graph
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.serving import serve, stub_on
from tests.test_methods import convert, values
from tests.test_tree import D, labels, make_data, ort_fn

Array = np.ndarray
TIGHT = 1e-5  # TreeSHAP against exact enumeration of the same float32 model


def lightgbm(classes: int) -> onnx.ModelProto:
    """An LGBMClassifier converted by onnxmltools, probabilities as a tensor (zipmap=False)."""
    lightgbm = pytest.importorskip("lightgbm")
    onnxmltools = pytest.importorskip("onnxmltools")
    from onnxmltools.convert.common.data_types import FloatTensorType

    X = make_data(300, 0)
    est = lightgbm.LGBMClassifier(n_estimators=15, num_leaves=8, verbose=-1, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X.astype(np.float32), labels(X, classes))
    return onnxmltools.convert_lightgbm(est, initial_types=[("input", FloatTensorType([None, D]))],
                                        target_opset=15, zipmap=False)


def link_as_node(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with the tree op's LOGISTIC moved into a Sigmoid node after it."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    tree = next(n for n in out.graph.node if n.op_type == "TreeEnsembleClassifier")
    next(a for a in tree.attribute if a.name == "post_transform").s = b"NONE"
    probabilities = tree.output[1]
    tree.output[1] = "raw_scores"
    out.graph.node.insert(list(out.graph.node).index(tree) + 1, helper.make_node(
        "Sigmoid", ["raw_scores"], [probabilities]))
    return out


def add(root: Path, name: str, model: onnx.ModelProto, config: str = "") -> None:
    """A model directory with only a background (and optional extra explain.yaml lines)."""
    (root / name / "1").mkdir(parents=True)
    onnx.save(model, root / name / "1" / "model.onnx")
    np.save(root / name / "bg.npy", make_data(40, 1))
    (root / name / "explain.yaml").write_text(f"background: {{path: bg.npy}}\n{config}")


def regressor() -> onnx.ModelProto:
    """A gradient-boosted regressor: trees with no link."""
    from sklearn.ensemble import GradientBoostingRegressor

    X = make_data(100, 0)
    return convert(GradientBoostingRegressor(n_estimators=5, random_state=0).fit(X, X[:, 0]))


@pytest.fixture(scope="module")
def built() -> dict[str, onnx.ModelProto]:
    from sklearn.ensemble import GradientBoostingClassifier

    X = make_data(300, 0)
    gbc = GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0)
    gbc3 = GradientBoostingClassifier(n_estimators=10, max_depth=2, random_state=0)
    binary = lightgbm(2)
    return {"sk_binary": convert(gbc.fit(X, labels(X, 2))),
            "sk_softmax": convert(gbc3.fit(X, labels(X, 3))),
            "lgb_binary": binary, "lgb_sigmoid_node": link_as_node(binary),
            "lgb_softmax": lightgbm(3)}


@pytest.fixture(scope="module")
def server(built: dict[str, onnx.ModelProto],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidelight]:
    root = tmp_path_factory.mktemp("tree_links")
    for name, model in built.items():
        add(root, name, model)
    add(root, "sk_binary_identity", built["sk_binary"], "scale: identity\n")
    add(root, "regressor_margin", regressor(), "scale: margin\n")
    yield from serve(root, drift_enabled=False)


@pytest.fixture(scope="module")
def stub(server: Sidelight) -> Iterator[pb_grpc.ExplainerStub]:
    yield from stub_on(server)


def explain(stub: pb_grpc.ExplainerStub, model: str, **kw: Any) -> pb.ExplainResponse:
    target = pb.Target(scale=kw.pop("scale", ""))
    return stub.Explain(pb.ExplainRequest(model=model, inputs=[from_array(
        "input", make_data(4, 9).astype(np.float32))], target=target, budget_ms=3000, **kw))


DEFAULTS = [("sk_binary", "logit"), ("lgb_binary", "logit"), ("lgb_sigmoid_node", "logit"),
            ("sk_softmax", "margin"), ("lgb_softmax", "margin")]


@pytest.mark.parametrize("model, scale", DEFAULTS)
def test_a_tree_classifier_defaults_to_the_scale_where_treeshap_is_exact(
        stub: pb_grpc.ExplainerStub, model: str, scale: str) -> None:
    assert stub.GetModel(pb.GetModelRequest(model=model)).scale == scale
    auto = explain(stub, model)
    assert (auto.method, auto.scale) == ("tree", scale)  # was a sampler on probabilities
    assert auto.cost.model_evaluations == 0
    exact = explain(stub, model, method="exact")
    assert exact.scale == scale
    np.testing.assert_allclose(values(auto), values(exact), atol=TIGHT)


def test_an_explicit_scale_in_explain_yaml_wins(stub: pb_grpc.ExplainerStub) -> None:
    assert stub.GetModel(pb.GetModelRequest(model="sk_binary_identity")).scale == "identity"
    r = explain(stub, "sk_binary_identity")
    assert (r.method, r.scale) == ("exact", "identity")
    failed = stub.GetModel(pb.GetModelRequest(model="regressor_margin"))  # nothing to remove
    assert failed.state == "FAILED" and "scale: margin" in failed.error


@pytest.mark.parametrize("model", ["lgb_binary", "lgb_sigmoid_node"])
@pytest.mark.parametrize("scale", ["logit", "margin"])
def test_tree_reads_the_link_of_lightgbm_graphs(stub: pb_grpc.ExplainerStub, model: str,
                                                scale: str) -> None:
    tree = explain(stub, model, scale=scale, method="tree")
    assert (tree.method, tree.scale) == ("tree", scale)  # was refused (fell back to auto)
    assert not any("fell back" in n or "unavailable" in n for n in tree.notes)
    exact = explain(stub, model, scale=scale, method="exact")
    np.testing.assert_allclose(values(tree), values(exact), atol=TIGHT)
    info = stub.GetModel(pb.GetModelRequest(model=model))
    assert info.tree_unsupported == "" and list(info.scales) == ["identity", "logit", "margin"]


def test_a_sigmoid_node_after_the_trees_is_their_link(built: dict[str, onnx.ModelProto]) -> None:
    """Parsed and removed like the op's post_transform: same probabilities, same margins."""
    original, moved = built["lgb_binary"], built["lgb_sigmoid_node"]
    X = make_data(50, 4)
    np.testing.assert_allclose(ort_fn(moved, "probabilities")(X),
                               ort_fn(original, "probabilities")(X), atol=1e-7)
    parsed = parse_onnx_trees(moved)
    assert parsed["post_transform"] == "LOGISTIC"
    assert parsed["score_outputs"] == ("probabilities",)
    a, b = margin_graph(original), margin_graph(moved)
    assert a is not None and b is not None and a.outputs == b.outputs == {
        "probabilities": "LOGISTIC"}
    np.testing.assert_allclose(ort_fn(b.proto, "probabilities")(X),
                               ort_fn(a.proto, "probabilities")(X), atol=1e-6)

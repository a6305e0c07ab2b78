"""Named baselines when every element is its own group, through a real server: the digits CNN
with one group per pixel, and tables (one input or several) against zeros, a constant or the
background's mean. Each must be honoured and named in the response, never replaced silently by
the background rows (nor fail with INTERNAL). Oracles: brute-force Shapley values with
onnxruntime on the bundled files."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from itertools import product
from math import factorial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from service.api.server import Sidelight
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS
from tests.serving import serve, stub_on

Array = np.ndarray
DIGITS = np.load(MODELS / "digits_cnn" / "background.npy")  # (100, 1, 8, 8) float32
DIABETES = np.load(MODELS / "diabetes_linear" / "background.npy").astype(np.float64)
W_A, W_B = np.array([[1.0], [-2.0], [0.5]]), np.array([[3.0], [0.25]])


def two_inputs_model() -> onnx.ModelProto:
    """A table split over two inputs: y = tanh(a @ W_A) + b @ W_B."""
    inits = [numpy_helper.from_array(W_A.astype(np.float32), "wa"),
             numpy_helper.from_array(W_B.astype(np.float32), "wb")]
    nodes = [helper.make_node("MatMul", ["a", "wa"], ["ya"]),
             helper.make_node("Tanh", ["ya"], ["ta"]),
             helper.make_node("MatMul", ["b", "wb"], ["yb"]),
             helper.make_node("Add", ["ta", "yb"], ["y"])]
    g = helper.make_graph(nodes, "g", [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidelight]:
    root = tmp_path_factory.mktemp("models")
    for name in ("digits_cnn", "diabetes_linear", "breast_cancer_gbdt"):
        shutil.copytree(MODELS / name, root / name)
    (root / "split" / "1").mkdir(parents=True)
    onnx.save(two_inputs_model(), root / "split" / "1" / "model.onnx")
    np.save(root / "split" / "background.npy",
            np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32))
    (root / "split" / "explain.yaml").write_text(yaml.safe_dump(
        {"background": {"path": "background.npy"}}))
    yield from serve(root)


@pytest.fixture(scope="module")
def stub(app: Sidelight) -> Iterator[pb_grpc.ExplainerStub]:
    yield from stub_on(app)


def session_fn(name: str, root: Path = MODELS) -> Callable[[Array], Array]:
    """f (rows, elements) -> (rows, outputs) with onnxruntime on a bundled file."""
    session = ort.InferenceSession(str(root / name / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]

    def f(X: Array) -> Array:
        x = X.astype(np.float32).reshape([-1, *[int(s) for s in feed.shape[1:]]])
        return np.asarray(session.run(None, {feed.name: x})[0], np.float64).reshape(len(X), -1)
    return f


def brute_shapley(f: Callable[[Array], Array], x: Array, base: Array) -> Array:
    """Shapley values of v(S) = f(x on S, base elsewhere), all 2^d coalitions in one batch;
    coalition k holds feature i when bit d - 1 - i of k is set."""
    d = x.size
    masks = np.array(list(product([False, True], repeat=d)))  # (2^d, d), row k = code k
    v = f(np.where(masks, x, base))[:, 0]  # (2^d,)
    weight = np.array([factorial(s) * factorial(d - s - 1) / factorial(d) for s in range(d)])
    phi = np.zeros(d)
    for i in range(d):
        without = np.flatnonzero(~masks[:, i])  # (2^(d-1),)
        size = masks[without].sum(axis=1)
        phi[i] = np.sum(weight[size] * (v[without + (1 << (d - 1 - i))] - v[without]))
    return phi


def explain(stub: pb_grpc.ExplainerStub, model: str, inputs: list[pb.Tensor], **kw: object
            ) -> pb.ExplainResponse:
    return stub.Explain(pb.ExplainRequest(model=model, inputs=inputs, seed=1, **kw),  # type: ignore[arg-type]
                        timeout=30)


def table(x: Array) -> list[pb.Tensor]:
    return [from_array("input", x.astype(np.float32)[None])]


@pytest.mark.parametrize(("baseline", "said", "row"), [
    (pb.Baseline(kind="zeros"), "zeros", np.zeros(10)),
    (pb.Baseline(kind="constant", value=0.01), "constant 0.01", np.full(10, 0.01)),
    (pb.Baseline(kind="mean"), "mean of background 'default'", DIABETES.mean(axis=0)),
])
def test_a_table_is_explained_against_the_named_baseline(
        stub: pb_grpc.ExplainerStub, baseline: pb.Baseline, said: str, row: Array) -> None:
    x = DIABETES[3]
    r = explain(stub, "diabetes_linear", table(x), method="exact", budget_ms=5000,
                baseline=baseline)
    assert r.baseline == said and r.modality == "tabular" and r.method == "exact"
    assert list(r.feature_names)[:2] == ["age", "sex"]
    f = session_fn("diabetes_linear")
    np.testing.assert_allclose(r.rows[0].attributions, brute_shapley(f, x, row), atol=1e-6)
    assert r.rows[0].base_values[0] == pytest.approx(f(row[None])[0, 0], abs=1e-6)


def test_the_mean_baseline_is_not_the_background_rows(stub: pb_grpc.ExplainerStub) -> None:
    """On a nonlinear model, f(mean row) differs from the mean of f over the rows: the base
    value tells which one was used."""
    x = np.load(MODELS / "breast_cancer_gbdt" / "background.npy")[5].astype(np.float64)
    rows = explain(stub, "breast_cancer_gbdt", table(x), budget_ms=3000)
    mean = explain(stub, "breast_cancer_gbdt", table(x), budget_ms=3000,
                   baseline=pb.Baseline(kind="mean"))
    assert rows.baseline in ("", "background rows") and mean.baseline.startswith("mean of")
    assert abs(rows.rows[0].base_values[0] - mean.rows[0].base_values[0]) > 1e-3


def test_tree_and_linear_say_why_they_fell_back(stub: pb_grpc.ExplainerStub) -> None:
    r = explain(stub, "diabetes_linear", table(DIABETES[0]), method="linear", budget_ms=3000,
                baseline=pb.Baseline(kind="zeros"))
    assert r.method != "linear" and r.baseline == "zeros"
    assert any("not baseline zeros" in n for n in r.notes), r.notes


def test_every_input_of_a_table_is_replaced(stub: pb_grpc.ExplainerStub) -> None:
    """A table over two inputs: zeros replace the columns of both, not of the first only."""
    a, b = np.array([0.3, -0.7, 1.1]), np.array([2.0, -1.5])
    r = explain(stub, "split", [from_array("a", a[None].astype(np.float32)),
                                from_array("b", b[None].astype(np.float32))],
                method="exact", budget_ms=5000, baseline=pb.Baseline(kind="zeros"))

    def f(X: Array) -> Array:
        return np.tanh(X[:, :3] @ W_A) + X[:, 3:] @ W_B

    expected = brute_shapley(f, np.concatenate([a, b]), np.zeros(5))
    np.testing.assert_allclose(r.rows[0].attributions, expected, atol=1e-5)
    np.testing.assert_allclose(r.rows[0].attributions[3:], (b * W_B[:, 0]), atol=1e-5)


@pytest.mark.parametrize("budget_ms", [300, 2000])
def test_one_group_per_pixel_against_zeros(stub: pb_grpc.ExplainerStub, budget_ms: int) -> None:
    """Each pixel its own group (an identity grouping) with the image's zeros baseline: Owen
    values over the 8 x 8 quadtree, within 300 ms too (the formula's table is built fast)."""
    x = DIGITS[7:8]
    r = explain(stub, "digits_cnn", [from_array("image", x)], budget_ms=budget_ms,
                target=pb.Target(classes=[3]), groups=pb.FeatureGroups(patch=[1]))
    assert r.method == "partition" and r.modality == "image" and r.baseline == "zeros"
    assert r.grouping.startswith("8 x 8 grid of 1 x 1-pixel patches") and r.additive
    row = r.rows[0]
    f = session_fn("digits_cnn")
    assert row.base_values[0] == pytest.approx(f(np.zeros((1, 64)))[0, 3], abs=1e-6)
    assert row.predictions[0] == pytest.approx(f(x.reshape(1, 64))[0, 3], abs=1e-6)
    assert sum(row.attributions) == pytest.approx(row.predictions[0] - row.base_values[0],
                                                  abs=1e-6)
    (m,) = row.maps
    np.testing.assert_allclose(np.frombuffer(m.raw, "<f8"), row.attributions)


def test_one_group_per_pixel_against_the_background_keeps_the_image(
        stub: pb_grpc.ExplainerStub) -> None:
    """Background rows with one group per pixel: still an image answer (maps, the quadtree),
    not a table's per-feature answer."""
    r = explain(stub, "digits_cnn", [from_array("image", DIGITS[2:3])], budget_ms=3000,
                target=pb.Target(classes=[1]), groups=pb.FeatureGroups(patch=[1]),
                baseline=pb.Baseline(kind="background"))
    assert r.modality == "image" and r.baseline == "background rows" and r.method == "partition"
    assert len(r.rows[0].maps) == 1
    f = session_fn("digits_cnn")
    assert r.rows[0].base_values[0] == pytest.approx(f(DIGITS.reshape(100, 64))[:, 1].mean(),
                                                     abs=1e-6)

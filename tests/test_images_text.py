"""Images and text through a real server: the bundled digits CNN and text model, and crafted
models with answers known by hand. Oracles are computed here with onnxruntime directly."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from itertools import combinations
from pathlib import Path

import grpc
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
VOCAB = (MODELS / "text_sentiment" / "vocab.txt").read_text().splitlines()


def save(root: Path, name: str, model: onnx.ModelProto, config: dict[str, object]) -> None:
    (root / name / "1").mkdir(parents=True)
    onnx.save(model, root / name / "1" / "model.onnx")
    (root / name / "explain.yaml").write_text(yaml.safe_dump(config))


def graph(nodes: list[onnx.NodeProto], x: onnx.ValueInfoProto, y: onnx.ValueInfoProto,
          inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def pixels_model() -> onnx.ModelProto:
    """4 x 4 images: y = 2 * pixel(1, 1) + pixel(2, 3) * pixel(3, 3)."""
    inits = [numpy_helper.from_array(np.array([-1, 16], np.int64), "shape"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    inits += [numpy_helper.from_array(np.array([i], np.int64), f"i{i}") for i in (5, 11, 15)]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"])]
    nodes += [helper.make_node("Gather", ["flat", f"i{i}"], [f"p{i}"], axis=1)
              for i in (5, 11, 15)]
    nodes += [helper.make_node("Mul", ["p5", "two"], ["a"]),
              helper.make_node("Mul", ["p11", "p15"], ["b"]),
              helper.make_node("Add", ["a", "b"], ["y"])]
    return graph(nodes, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4]),
                 helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1]), inits)


AFFINE_W = np.linspace(-1, 1, 72).reshape(36, 2).astype(np.float32)


def affine_image_model() -> onnx.ModelProto:
    """6 x 6 images, two outputs affine in the pixels: y = flat(x) @ W + b."""
    inits = [numpy_helper.from_array(np.array([-1, 36], np.int64), "shape"),
             numpy_helper.from_array(AFFINE_W, "W"),
             numpy_helper.from_array(np.array([0.5, -1.0], np.float32), "b")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["y"])]
    return graph(nodes, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 6]),
                 helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2]), inits)


def table_model() -> onnx.ModelProto:
    """Five columns, the middle three a one-hot colour: y = x @ w + tanh(x0 * x4)."""
    inits = [numpy_helper.from_array(np.array([[0.5], [1.0], [-2.0], [3.0], [0.25]],
                                              np.float32), "w"),
             numpy_helper.from_array(np.array([0], np.int64), "c0"),
             numpy_helper.from_array(np.array([4], np.int64), "c4")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["lin"]),
             helper.make_node("Gather", ["x", "c0"], ["x0"], axis=1),
             helper.make_node("Gather", ["x", "c4"], ["x4"], axis=1),
             helper.make_node("Mul", ["x0", "x4"], ["prod"]),
             helper.make_node("Tanh", ["prod"], ["t"]),
             helper.make_node("Add", ["lin", "t"], ["y"])]
    return graph(nodes, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5]),
                 helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1]), inits)


TABLE_FEATURES = ["age", "red", "green", "blue", "income"]
TABLE_BG = np.array([[30, 1, 0, 0, 2.0], [45, 0, 1, 0, 3.5], [52, 0, 0, 1, 1.0],
                     [23, 1, 0, 0, 0.5]], np.float32) / np.array([50, 1, 1, 1, 3], np.float32)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidelight]:
    root = tmp_path_factory.mktemp("models")
    for name in ("digits_cnn", "text_sentiment"):
        shutil.copytree(MODELS / name, root / name)
    save(root, "pixels", pixels_model(), {"baseline": "zeros", "method": "occlusion"})
    save(root, "affine_image", affine_image_model(), {"image": {"grid": 3}})
    save(root, "table", table_model(), {"features": TABLE_FEATURES, "background": {
        "path": "background.npy"}, "groups": [{"name": "colour",
                                               "features": ["red", "green", "blue"]}]})
    np.save(root / "table" / "background.npy", TABLE_BG)
    yield from serve(root)


@pytest.fixture(scope="module")
def stub(app: Sidelight) -> Iterator[pb_grpc.ExplainerStub]:
    yield from stub_on(app)


def onnx_fn(name: str, column: int) -> Callable[[Array], Array]:
    """f for the oracles: onnxruntime on the bundled file, one output column."""
    session = ort.InferenceSession(str(MODELS / name / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]

    shape = [-1, *feed.shape[1:]]

    def f(X: Array) -> Array:
        dtype = np.int64 if "int64" in feed.type else np.float32
        y = session.run(["probabilities"], {feed.name: X.astype(dtype).reshape(shape)})[0]
        return np.asarray(y[:, column], np.float64)
    return f


def coalition_value(f: Callable[[Array], Array], x: Array, base: Array, index: Array
                    ) -> Callable[[tuple[int, ...]], float]:
    """v(S): the groups in S (and every element in no group) from x, the rest from base."""
    def v(S: tuple[int, ...]) -> float:
        keep = np.isin(index, S) | (index < 0)
        return float(f(np.where(keep, x, base)[None])[0])
    return v


def brute_shapley(v: Callable[[tuple[int, ...]], float], d: int) -> Array:
    """The textbook formula over d players."""
    phi = np.zeros(d)
    for i in range(d):
        others = [j for j in range(d) if j != i]
        for s in range(d):
            w = math.factorial(s) * math.factorial(d - s - 1) / math.factorial(d)
            phi[i] += sum(w * (v((*S, i)) - v(S)) for S in combinations(others, s))
    return phi


def owen_two_level(v: Callable[[tuple[int, ...]], float], unions: list[list[int]]) -> Array:
    """Owen values of a root over unions (Owen 1977), one coalition at a time."""
    m, phi = len(unions), np.zeros(sum(len(u) for u in unions))
    for k, union in enumerate(unions):
        rest = [j for j in range(m) if j != k]
        for r in range(m):
            wr = math.factorial(r) * math.factorial(m - r - 1) / math.factorial(m)
            for R in combinations(rest, r):
                base = tuple(p for j in R for p in unions[j])
                for i in union:
                    inner, s = [p for p in union if p != i], len(union)
                    for t in range(s):
                        wt = math.factorial(t) * math.factorial(s - t - 1) / math.factorial(s)
                        for T in combinations(inner, t):
                            phi[i] += wr * wt * (v((*base, *T, i)) - v((*base, *T)))
    return phi


def explain(stub: pb_grpc.ExplainerStub, model: str, X: Array, **kw: object
            ) -> pb.ExplainResponse:
    inputs = [from_array("tokens" if model == "text_sentiment" else "x"
                         if model not in ("digits_cnn",) else "image", X)]
    return stub.Explain(pb.ExplainRequest(model=model, inputs=inputs, seed=1, **kw),  # type: ignore[arg-type]
                        timeout=30)


def refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def grid_index(rows: int, cols: int) -> Array:
    """Group id per pixel of an 8 x 8 image cut into a rows x cols grid (row-major)."""
    r = np.arange(8) * rows // 8
    c = np.arange(8) * cols // 8
    return (r[:, None] * cols + c[None, :]).ravel()


def test_get_model_reports_modality_groups_and_baselines(stub: pb_grpc.ExplainerStub) -> None:
    image = stub.GetModel(pb.GetModelRequest(model="digits_cnn"))
    assert image.state == "READY" and image.modality == "image"
    assert image.grouping.startswith("4 x 4 grid of 2 x 2-pixel patches of input 'image'")
    assert len(image.group_labels) == 16 and image.group_labels[5] == "patch 1,1"
    assert image.baseline == "zeros" and "blur" in image.baselines and "mask" not in image.baselines
    text = stub.GetModel(pb.GetModelRequest(model="text_sentiment"))
    assert text.modality == "text" and text.baseline == "mask token 1"
    assert text.grouping == "one group per non-pad token of input 'tokens'"
    assert not text.group_labels and list(text.vocabulary[:3]) == ["[PAD]", "[MASK]", "not"]
    table = stub.GetModel(pb.GetModelRequest(model="table"))
    assert table.modality == "tabular" and list(table.group_labels) == ["age", "colour", "income"]


def test_exact_grouped_shapley_on_the_cnn_equals_brute_force(stub: pb_grpc.ExplainerStub) -> None:
    x = DIGITS[7:8]
    r = explain(stub, "digits_cnn", x, method="exact", budget_ms=5000,
                target=pb.Target(classes=[int(np.argmax(onnx_fn("digits_cnn", 0)(x)))]),
                groups=pb.FeatureGroups(grid=[2, 4]))
    assert r.method == "exact" and r.modality == "image" and r.additive
    assert r.grouping.startswith("2 x 4 grid") and len(r.feature_names) == 8
    column = r.rows[0].predictions  # the explained class
    cls = int(np.argmax(onnx_fn("digits_cnn", 0)(x)))
    v = coalition_value(onnx_fn("digits_cnn", cls), x.ravel(), np.zeros(64), grid_index(2, 4))
    np.testing.assert_allclose(r.rows[0].attributions, brute_shapley(v, 8), atol=1e-6)
    assert column[0] == pytest.approx(v(tuple(range(8))), abs=1e-6)
    assert r.rows[0].base_values[0] == pytest.approx(v(()), abs=1e-6)


def test_maps_give_each_pixel_its_groups_value(stub: pb_grpc.ExplainerStub) -> None:
    r = explain(stub, "digits_cnn", DIGITS[3:5], method="exact", budget_ms=5000,
                target=pb.Target(classes=[2]), groups=pb.FeatureGroups(grid=[2, 4]))
    index = grid_index(2, 4)
    for row in r.rows:
        (m,) = row.maps
        assert m.name == "image" and list(m.shape) == [1, 1, 8, 8]
        heat = np.frombuffer(m.raw, "<f8").reshape(8, 8)
        np.testing.assert_allclose(heat.ravel(), np.asarray(row.attributions)[index])


def test_partition_equals_brute_force_owen_values_on_sixteen_patches(
        stub: pb_grpc.ExplainerStub) -> None:
    x = DIGITS[11:12]
    r = explain(stub, "digits_cnn", x, budget_ms=5000, target=pb.Target(classes=[5]))
    assert r.method == "partition" and r.grouping.startswith("4 x 4 grid")
    assert r.rows[0].diagnostics == {} and r.rows[0].samples == 0  # enumerated: exact
    index = grid_index(4, 4)
    v = coalition_value(onnx_fn("digits_cnn", 5), x.ravel(), np.zeros(64), index)
    quadrants = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    np.testing.assert_allclose(r.rows[0].attributions, owen_two_level(v, quadrants), atol=1e-6)


def test_a_client_mask_is_used_as_given(stub: pb_grpc.ExplainerStub) -> None:
    x = DIGITS[20:21]
    mask = np.zeros((1, 8, 8), np.int64)
    mask[0, :, 5:] = 1
    mask[0, 6:, :] = 2  # irregular regions, as superpixels would be
    r = explain(stub, "digits_cnn", x, method="exact", budget_ms=3000,
                target=pb.Target(classes=[0]),
                groups=pb.FeatureGroups(mask=from_array("mask", mask),
                                        labels=["left", "right", "bottom"]))
    assert list(r.feature_names) == ["left", "right", "bottom"]
    assert r.grouping == "request mask (3 groups) over input 'image'"
    v = coalition_value(onnx_fn("digits_cnn", 0), x.ravel(), np.zeros(64), mask.ravel())
    np.testing.assert_allclose(r.rows[0].attributions, brute_shapley(v, 3), atol=1e-6)


def test_text_pads_are_not_players_and_get_no_attribution(stub: pb_grpc.ExplainerStub) -> None:
    words = ["the", "movie", "was", "not", "good"]
    ids = np.zeros((1, 16), np.int64)
    ids[0, :5] = [VOCAB.index(w) for w in words]
    r = explain(stub, "text_sentiment", ids, budget_ms=5000)
    row = r.rows[0]
    assert r.method == "exact" and r.modality == "text" and r.baseline == "mask token 1"
    assert list(row.labels) == [f"{w} @{i}" for i, w in enumerate(words)]
    assert not r.feature_names  # labels vary per row
    (m,) = row.maps
    heat = np.frombuffer(m.raw, "<f8").reshape(16)
    assert np.all(heat[5:] == 0) and np.allclose(heat[:5], row.attributions)
    index = np.full(16, -1)
    index[:5] = np.arange(5)
    v = coalition_value(onnx_fn("text_sentiment", 1), ids.ravel(), np.ones(16), index)
    np.testing.assert_allclose(row.attributions, brute_shapley(v, 5), atol=1e-6)
    assert row.predictions[0] - row.base_values[0] == pytest.approx(sum(row.attributions),
                                                                    abs=1e-9)


def test_rows_of_different_lengths_each_get_their_tokens(stub: pb_grpc.ExplainerStub) -> None:
    ids = np.zeros((2, 16), np.int64)
    ids[0, :3] = [VOCAB.index(w) for w in ("a", "great", "film")]
    ids[1, :6] = [VOCAB.index(w) for w in ("the", "plot", "was", "not", "boring", "at")] \
        if "at" in VOCAB else [VOCAB.index(w) for w in ("the", "plot", "was", "not", "boring",
                                                        "the")]
    r = explain(stub, "text_sentiment", ids, method="permutation", budget_ms=400)
    assert [len(row.labels) for row in r.rows] == [3, 6]
    assert [len(row.attributions) for row in r.rows] == [3, 6]


def test_occlusion_equals_a_hand_computation(stub: pb_grpc.ExplainerStub) -> None:
    x = np.arange(1.0, 17.0, dtype=np.float32).reshape(1, 1, 4, 4)  # pixel (r, c) = 4r + c + 1
    r = explain(stub, "pixels", x, budget_ms=2000,
                occlusion=pb.OcclusionWindow(window=[2], strides=[2]))
    row = r.rows[0]
    assert r.method == "occlusion" and not r.additive and row.diagnostics["windows"] == 4
    np.testing.assert_allclose(row.attributions, [12, 0, 0, 192])  # 2*6, 12*16
    heat = np.frombuffer(row.maps[0].raw, "<f8").reshape(4, 4)
    np.testing.assert_allclose(heat, np.kron([[12, 0], [0, 192]], np.ones((2, 2))))
    assert list(r.feature_names) == ["window 0,0,0", "window 0,0,2", "window 0,2,0",
                                     "window 0,2,2"]


def test_lime_recovers_an_affine_models_group_effects(stub: pb_grpc.ExplainerStub) -> None:
    x = np.random.default_rng(0).normal(size=(1, 1, 6, 6)).astype(np.float32)
    r = explain(stub, "affine_image", x, method="lime", max_evaluations=3000, budget_ms=5000)
    row = r.rows[0]
    index = (np.arange(6)[:, None] // 2 * 3 + np.arange(6)[None, :] // 2).ravel()  # 3 x 3 grid
    effect = np.stack([[float((AFFINE_W[:, k] * x.ravel())[index == g].sum()) for g in range(9)]
                       for k in range(2)])
    np.testing.assert_allclose(np.reshape(row.attributions, (2, 9)), effect, rtol=1e-4,
                               atol=1e-5)
    assert row.diagnostics["surrogate_r2"] > 1 - 1e-6 and not r.additive
    np.testing.assert_allclose(row.base_values, [0.5, -1.0], atol=1e-5)  # f(zeros)


def test_a_one_hot_block_sums_its_columns(stub: pb_grpc.ExplainerStub) -> None:
    """On a model additive in the block, the block's Shapley value is the sum of its
    columns' values (explained one per feature with groups given one per column)."""
    x = np.array([[0.9, 0, 1, 0, 0.8]], np.float32)
    grouped = explain(stub, "table", x, method="exact", budget_ms=3000)
    assert list(grouped.feature_names) == ["age", "colour", "income"]
    columns = explain(stub, "table", x, method="exact", budget_ms=3000,
                      groups=pb.FeatureGroups(mask=from_array("mask", np.arange(5)[None]),
                                              labels=TABLE_FEATURES))
    per_column = np.asarray(columns.rows[0].attributions)
    np.testing.assert_allclose(grouped.rows[0].attributions,
                               [per_column[0], per_column[1:4].sum(), per_column[4]], atol=1e-6)
    heat = np.frombuffer(grouped.rows[0].maps[0].raw, "<f8")
    np.testing.assert_allclose(heat[1:4], grouped.rows[0].attributions[1])


@pytest.mark.parametrize("method", ["exact", "permutation", "kernel", "auto", "partition",
                                    "occlusion", "lime"])
@pytest.mark.parametrize("model", ["digits_cnn", "text_sentiment"])
def test_every_method_explains_the_image_and_the_text(stub: pb_grpc.ExplainerStub, model: str,
                                                      method: str) -> None:
    X = DIGITS[:2] if model == "digits_cnn" else \
        np.array([[VOCAB.index(w) for w in ("a", "great", "film")] + [0] * 13] * 2)
    r = explain(stub, model, X, method=method, budget_ms=1500)
    assert len(r.rows) == 2 and r.modality == ("image" if model == "digits_cnn" else "text")
    for row in r.rows:
        assert np.all(np.isfinite(row.attributions)) and np.all(np.isfinite(row.std_errors))
        (m,) = row.maps
        assert list(m.shape)[1:] == list(X.shape[1:])
        if r.additive:
            gap = np.asarray(row.predictions) - row.base_values \
                - np.reshape(row.attributions, (len(row.predictions), -1)).sum(axis=1)
            assert np.all(np.abs(gap) < 1e-6)


@pytest.mark.parametrize(("model", "kw", "field"), [
    ("digits_cnn", {"groups": pb.FeatureGroups(mask=from_array("m", np.zeros((7, 7), np.int64)))},
     "groups.mask.shape"),
    ("digits_cnn", {"groups": pb.FeatureGroups(mask=from_array("m", np.full((1, 8, 8), 2)))},
     "groups.mask"),
    ("digits_cnn", {"groups": pb.FeatureGroups(grid=[9])}, "groups.grid"),
    ("digits_cnn", {"groups": pb.FeatureGroups(grid=[4, 5]), "method": "exact"},
     "exact supports at most 16"),
    ("digits_cnn", {"groups": pb.FeatureGroups(hierarchy=[pb.GroupNode(children=[0, 0])])},
     "groups.hierarchy"),
    ("digits_cnn", {"baseline": pb.Baseline(kind="mask")}, "baseline.kind"),
    ("digits_cnn", {"method": "occlusion", "occlusion": pb.OcclusionWindow(window=[20])},
     "occlusion.window"),
    ("table", {"groups": pb.FeatureGroups(patch=[2])}, "groups.patch"),
    ("text_sentiment", {"baseline": pb.Baseline(kind="blur")}, "baseline.kind"),
])
def test_bad_group_specifications_name_the_field(stub: pb_grpc.ExplainerStub, model: str,
                                                 kw: dict[str, object], field: str) -> None:
    X = {"digits_cnn": DIGITS[:1], "table": TABLE_BG[:1],
         "text_sentiment": np.array([[5, 6] + [0] * 14])}[model]
    code, details = refused(lambda: explain(stub, model, X, budget_ms=500, **kw))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details, details

"""Build the bundled example models under ``examples/models/``.

Run from the project root::

    python examples/build_models.py

Every model is trained deterministically (``random_state=0``) on a dataset that ships
inside scikit-learn, so no download is needed. Each model is written as a Triton-style
model repository entry::

    examples/models/<model>/1/model.onnx
    examples/models/<model>/explain.yaml
    examples/models/<model>/background.npy

``breast_cancer_logreg`` deliberately keeps skl2onnx's default ZipMap output so that the
service's ZipMap handling is exercised; the other classifiers are converted with the
ZipMap disabled and expose a plain float tensor ``[N, 2]`` of probabilities.

After conversion, onnxruntime's predictions on the held-out test split are compared
with the scikit-learn model's ``predict_proba`` / ``predict``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from numpy.typing import NDArray
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import BaseEstimator
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.ensemble import GradientBoostingClassifier, RandomForestRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

MODELS_DIR = Path(__file__).resolve().parent / "models"
SEED = 0
TEST_SIZE = 0.2
BACKGROUND_ROWS = 100
INPUT_NAME = "input"
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
PROBA_ATOL = 1e-4
REGRESSION_RTOL = 1e-3

FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class Dataset:
    """A train/test split of a bundled scikit-learn dataset, as float32."""

    X_train: FloatArray
    X_test: FloatArray
    y_train: NDArray[Any]
    y_test: NDArray[Any]
    feature_names: list[str]
    target_names: list[str] | None


@dataclass(frozen=True)
class ModelSpec:
    """How to build one bundled model and describe it in ``explain.yaml``."""

    name: str
    dataset: Callable[[], Dataset]
    estimator: Callable[[], BaseEstimator]
    is_classifier: bool
    zipmap: bool = False
    scale: str = "identity"
    extra_config: dict[str, Any] = field(default_factory=dict)


def _split(data: Any, target_names: list[str] | None) -> Dataset:
    """Split a scikit-learn ``Bunch`` into a fixed 80/20 float32 train/test split."""
    X = np.asarray(data.data, dtype=np.float32)
    X_train, X_test, y_train, y_test = train_test_split(
        X, data.target, test_size=TEST_SIZE, random_state=SEED
    )
    return Dataset(
        X_train=X_train,
        X_test=X_test,
        y_train=y_train,
        y_test=y_test,
        feature_names=[str(n) for n in data.feature_names],
        target_names=target_names,
    )


def breast_cancer() -> Dataset:
    """The Wisconsin breast cancer dataset (30 features, binary target)."""
    data = load_breast_cancer()
    return _split(data, [str(n) for n in data.target_names])


def diabetes() -> Dataset:
    """The diabetes progression dataset (10 features, continuous target)."""
    return _split(load_diabetes(), None)


MODEL_SPECS: list[ModelSpec] = [
    ModelSpec(
        name="breast_cancer_logreg",
        dataset=breast_cancer,
        estimator=lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        is_classifier=True,
        zipmap=True,
        scale="logit",
    ),
    ModelSpec(
        name="breast_cancer_mlp",
        dataset=breast_cancer,
        estimator=lambda: make_pipeline(
            StandardScaler(),
            MLPClassifier(hidden_layer_sizes=(64, 64), max_iter=500, random_state=SEED),
        ),
        is_classifier=True,
        scale="logit",
    ),
    ModelSpec(
        name="breast_cancer_gbdt",
        dataset=breast_cancer,
        estimator=lambda: GradientBoostingClassifier(
            n_estimators=100, max_depth=3, random_state=SEED
        ),
        is_classifier=True,
        scale="logit",
    ),
    ModelSpec(
        name="diabetes_linear",
        dataset=diabetes,
        estimator=LinearRegression,
        is_classifier=False,
    ),
    ModelSpec(
        name="diabetes_forest",
        dataset=diabetes,
        estimator=lambda: RandomForestRegressor(n_estimators=50, max_depth=6, random_state=SEED),
        is_classifier=False,
    ),
]


def final_estimator(model: BaseEstimator) -> BaseEstimator:
    """Return the last step of a pipeline, or the model itself."""
    return model.steps[-1][1] if isinstance(model, Pipeline) else model


def to_onnx(
    name: str, model: BaseEstimator, n_features: int, is_classifier: bool, zipmap: bool
) -> onnx.ModelProto:
    """Convert a fitted model to ONNX with a float32 ``input`` of shape ``[None, n]``.

    The graph is named after the model (skl2onnx defaults to a random UUID) and the opset
    imports are sorted, so that rebuilding produces byte-identical files. skl2onnx lowers
    each opset to the smallest version the graph needs, up to ``TARGET_OPSET``.
    """
    options: dict[int, dict[str, Any]] | None = None
    if is_classifier and not zipmap:
        # Options are keyed by the estimator that owns them: the classifier step.
        options = {id(final_estimator(model)): {"zipmap": False}}
    proto = convert_sklearn(
        model,
        name=name,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        target_opset=TARGET_OPSET,
        options=options,
    )
    return sort_opset_imports(proto)


def sort_opset_imports(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Sort ``opset_import`` by domain; skl2onnx's order depends on Python's hash seed."""
    imports = sorted(proto.opset_import, key=lambda op: op.domain)
    copies = [onnx.helper.make_opsetid(op.domain, op.version) for op in imports]
    del proto.opset_import[:]
    proto.opset_import.extend(copies)
    return proto


def describe_io(proto: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Human-readable ``name type shape`` strings for the model's inputs and outputs."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    def fmt(arg: ort.NodeArg) -> str:
        return f"{arg.name} {arg.type} {arg.shape}"

    return [fmt(a) for a in session.get_inputs()], [fmt(a) for a in session.get_outputs()]


def zipmap_input(proto: onnx.ModelProto, output: str) -> str | None:
    """The float tensor feeding the ZipMap node that produces ``output``, if any."""
    for node in proto.graph.node:
        if node.op_type == "ZipMap" and output in node.output:
            return str(node.input[0])
    return None


def probability_output(proto: onnx.ModelProto) -> str:
    """The name of the classifier's probability output (ZipMap output or float tensor)."""
    names = [o.name for o in proto.graph.output]
    if "output_probability" in names:
        return "output_probability"
    for out in proto.graph.output:
        if out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            return out.name
    raise RuntimeError(f"no probability output among {names}")


def with_extra_output(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of ``proto`` that also exposes the intermediate float tensor ``name``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def onnx_predict(proto: onnx.ModelProto, X: FloatArray, output: str | None) -> FloatArray:
    """Run the model in onnxruntime; ZipMap outputs are turned back into a matrix."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output] if output else [session.get_outputs()[0].name]
    (result,) = session.run(names, {INPUT_NAME: X})
    if isinstance(result, list):  # ZipMap: one {class: probability} dict per row
        keys = sorted(result[0])
        return np.array([[row[k] for k in keys] for row in result], dtype=np.float32)
    return np.asarray(result, dtype=np.float32).reshape(len(X), -1)


def check_predictions(
    spec: ModelSpec, model: BaseEstimator, proto: onnx.ModelProto, data: Dataset
) -> None:
    """Assert that onnxruntime agrees with scikit-learn on the test split."""
    if spec.is_classifier:
        expected = model.predict_proba(data.X_test)
        got = onnx_predict(proto, data.X_test, probability_output(proto))
        diff = float(np.max(np.abs(got - expected)))
        print(f"  check: max |p_onnx - p_sklearn| = {diff:.3e} (tolerance {PROBA_ATOL:g})")
        assert diff < PROBA_ATOL, f"{spec.name}: probabilities differ by {diff}"
        check_zipmap_tensor(proto, data.X_test, expected)
        accuracy = float(np.mean(model.predict(data.X_test) == data.y_test))
        print(f"  test accuracy = {accuracy:.4f}")
    else:
        expected = model.predict(data.X_test).reshape(len(data.X_test), -1)
        got = onnx_predict(proto, data.X_test, None)
        diff = float(np.max(np.abs(got - expected)))
        rel = diff / float(np.max(np.abs(expected)))
        print(
            f"  check: max |y_onnx - y_sklearn| = {diff:.3e}, relative to max |y| = {rel:.3e}"
            f" (tolerance {REGRESSION_RTOL:g})"
        )
        assert rel < REGRESSION_RTOL, f"{spec.name}: predictions differ by {rel} (relative)"
        r2 = float(model.score(data.X_test, data.y_test))
        print(f"  test R^2 = {r2:.4f}")


def check_zipmap_tensor(proto: onnx.ModelProto, X: FloatArray, expected: NDArray[Any]) -> None:
    """If a ZipMap produces the probabilities, check the float tensor feeding it too.

    The service strips the ZipMap and reads that tensor, so it must hold the same values.
    """
    tensor = zipmap_input(proto, probability_output(proto))
    if tensor is None:
        return
    got = onnx_predict(with_extra_output(proto, tensor), X, tensor)
    diff = float(np.max(np.abs(got - expected)))
    print(f"  check: ZipMap input {tensor!r}: max |p - p_sklearn| = {diff:.3e}")
    assert diff < PROBA_ATOL, f"ZipMap input tensor {tensor} differs by {diff}"


def background_sample(X_train: FloatArray) -> FloatArray:
    """``BACKGROUND_ROWS`` training rows drawn without replacement (seed 0)."""
    rng = np.random.default_rng(SEED)
    rows = rng.choice(len(X_train), size=BACKGROUND_ROWS, replace=False)
    return np.ascontiguousarray(X_train[rows], dtype=np.float32)


def explain_config(spec: ModelSpec, proto: onnx.ModelProto, data: Dataset) -> dict[str, Any]:
    """The contents of the model's ``explain.yaml``."""
    config: dict[str, Any] = {"features": data.feature_names}
    if spec.is_classifier:
        config["output"] = probability_output(proto)
        config["classes"] = [1]
        if data.target_names is not None:
            config["class_names"] = data.target_names
    config["scale"] = spec.scale
    config["method"] = "auto"
    config["budget_ms"] = 200
    config["background"] = {"path": "background.npy", "max_rows": 1000}
    config["allow_missing"] = False
    config.update(spec.extra_config)
    return config


def write_model_dir(
    spec: ModelSpec, proto: onnx.ModelProto, config: dict[str, Any], background: FloatArray
) -> Path:
    """Write ``1/model.onnx``, ``explain.yaml`` and ``background.npy`` for one model."""
    model_dir = MODELS_DIR / spec.name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.onnx").write_bytes(proto.SerializeToString())
    header = f"# Explanation config for {spec.name}; generated by examples/build_models.py.\n"
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    (model_dir / "explain.yaml").write_text(header + body, encoding="utf-8")
    np.save(model_dir / "background.npy", background)
    return model_dir


def build(spec: ModelSpec) -> None:
    """Train, convert, verify and write one model."""
    print(f"{spec.name}:")
    data = spec.dataset()
    model = spec.estimator()
    model.fit(data.X_train, data.y_train)
    proto = to_onnx(spec.name, model, data.X_train.shape[1], spec.is_classifier, spec.zipmap)
    inputs, outputs = describe_io(proto)
    print(f"  inputs:  {inputs}")
    print(f"  outputs: {outputs}")
    opsets = {op.domain or "ai.onnx": op.version for op in proto.opset_import}
    print(f"  opsets:  {opsets}")
    check_predictions(spec, model, proto, data)
    config = explain_config(spec, proto, data)
    print(f"  explain.yaml output: {config.get('output', '(first float output)')}")
    model_dir = write_model_dir(spec, proto, config, background_sample(data.X_train))
    size = (model_dir / "1" / "model.onnx").stat().st_size
    print(f"  wrote {model_dir.relative_to(MODELS_DIR.parent.parent)} (model.onnx {size} bytes)")


def main() -> None:
    """Build every bundled example model."""
    for spec in MODEL_SPECS:
        build(spec)


if __name__ == "__main__":
    main()

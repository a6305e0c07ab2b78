"""Build the bundled example models under ``examples/models/``.

Run from the project root::

    python examples/build_models.py                                   # every model
    python examples/build_models.py --only digits_cnn text_sentiment  # just these

Every model is trained deterministically (seed 0) on data that ships inside scikit-learn or
is generated here, so no download is needed. Each model is written as a Triton-style model
repository entry::

    examples/models/<model>/1/model.onnx
    examples/models/<model>/explain.yaml
    examples/models/<model>/background.npy

Tabular models (scikit-learn, converted with skl2onnx): ``breast_cancer_logreg`` deliberately
keeps skl2onnx's default ZipMap output so that the service's ZipMap handling is exercised; the
other classifiers are converted with the ZipMap disabled and expose a plain float tensor
``[N, 2]`` of probabilities. After conversion, onnxruntime's predictions on the held-out test
split are compared with the scikit-learn model's ``predict_proba`` / ``predict``.

Deep-learning models (trained with PyTorch, the optional ``torch`` extra: ``pip install -e
'.[torch]'``; without it the default run keeps the committed files). Both export
``probabilities`` (Softmax, the explained output) and the ``logits`` feeding it, at opset 17
with plain ai.onnx ops; the script checks onnx.checker, onnxruntime against torch and the
PyTorch twin rebuilt from the ONNX file (``examples/torch_models.py``), all within 1e-5, and
asserts test accuracy >= 95%:

- ``digits_cnn``: scikit-learn's 8x8 digits, ``image`` [N, 1, 8, 8] float32 in 0..1 (pixels
  / 16), Conv(1->8, 3x3) ReLU Conv(8->16, 3x3) ReLU MaxPool(2) Linear(256->10); 10 classes
  "0".."9". Background: 100 training digits. Explained over 2x2 pixel patches against a blank
  (all-zero) image.
- ``text_sentiment``: a generated corpus of 4-12 word movie-review sentences over a 51-token
  vocabulary (``vocab.txt``: id 0 ``[PAD]``, id 1 ``[MASK]``, ``not``, 12 positive, 12 negative,
  24 neutral words), ``tokens`` [N, 16] int64 padded with 0. Label: positive when the sum of word
  polarities (+1 / -1, flipped by a "not" right before the word) is positive; ties are redrawn.
  Model: embedding + learned positions, one single-head self-attention block (padded keys
  masked; the attention Softmax is [N, 1, 16, 16]) and a ReLU feed-forward, each with a
  residual, mean over non-pad tokens, Linear(16->2). Explained with absent tokens replaced by
  ``[MASK]``; 10% of training tokens are masked so such inputs are familiar to the model.
  Background (optional): 32 training sentences.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from numpy.typing import NDArray
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import BaseEstimator
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
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
    return np.ascontiguousarray(X_train[random_rows(len(X_train), BACKGROUND_ROWS)],
                                dtype=np.float32)


def random_rows(n_rows: int, size: int) -> NDArray[np.intp]:
    """``size`` distinct row indices out of ``n_rows``, drawn with seed 0."""
    return np.random.default_rng(SEED).choice(n_rows, size=size, replace=False)


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
    name: str, proto: onnx.ModelProto, config: dict[str, Any], background: NDArray[Any]
) -> Path:
    """Write ``1/model.onnx``, ``explain.yaml`` and ``background.npy`` for one model."""
    model_dir = MODELS_DIR / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.onnx").write_bytes(proto.SerializeToString())
    header = f"# Explanation config for {name}; generated by examples/build_models.py.\n"
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
    model_dir = write_model_dir(spec.name, proto, config, background_sample(data.X_train))
    size = (model_dir / "1" / "model.onnx").stat().st_size
    print(f"  wrote {model_dir.relative_to(MODELS_DIR.parent.parent)} (model.onnx {size} bytes)")


# ---------------------------------------------------------------------------------------------
# Deep-learning examples: trained with torch (the optional ``torch`` extra), committed as ONNX.
# torch is imported only when a model is built (through ``twins()``): tests import the rest.

DIGITS_NAME = "digits_cnn"
TEXT_NAME = "text_sentiment"
DL_BACKGROUND_DIGITS = 100
DL_BACKGROUND_SENTENCES = 32
DL_MIN_ACCURACY = 0.95
DL_ATOL = 1e-5  # onnxruntime vs torch, and twin rebuilt from ONNX vs onnxruntime

PAD, MASK, NEGATOR = "[PAD]", "[MASK]", "not"
POSITIVE = ["good", "great", "excellent", "wonderful", "fantastic", "lovely", "superb",
            "enjoyable", "brilliant", "delightful", "pleasant", "charming"]
NEGATIVE = ["bad", "terrible", "awful", "horrible", "boring", "poor", "dreadful", "dull",
            "disappointing", "mediocre", "tedious", "weak"]
NEUTRAL = ["the", "a", "this", "that", "movie", "film", "plot", "story", "acting", "cast",
           "music", "ending", "script", "was", "is", "and", "but", "really", "very", "quite",
           "it", "i", "found", "overall"]
VOCABULARY = [PAD, MASK, NEGATOR, *POSITIVE, *NEGATIVE, *NEUTRAL]  # line number = token id
SEQ_LEN = 16
MIN_WORDS, MAX_WORDS = 4, 12
MAX_PHRASES = 3  # sentiment phrases per sentence
NEGATION_RATE = 0.3  # chance that a sentiment word is preceded by "not"
MASK_RATE = 0.1  # chance that a token is replaced by [MASK]: masked inputs stay in-distribution
TEXT_TRAIN_SENTENCES, TEXT_TEST_SENTENCES = 4000, 1000
TEXT_TRAIN_SEED, TEXT_TEST_SEED = 0, 1

TOKEN_ID = {word: i for i, word in enumerate(VOCABULARY)}
POLARITY = {TOKEN_ID[w]: 1 for w in POSITIVE} | {TOKEN_ID[w]: -1 for w in NEGATIVE}


def digits() -> Dataset:
    """scikit-learn's 8x8 digits (pixels 0..16), split 80/20 like the tabular models."""
    data = load_digits()
    return _split(data, [str(n) for n in data.target_names])


def digit_images(X: FloatArray) -> FloatArray:
    """Flat digit rows (N, 64) in 0..16 as NCHW images (N, 1, 8, 8) in 0..1."""
    return np.ascontiguousarray(X.reshape(-1, 1, 8, 8) / 16.0, dtype=np.float32)


def sentiment_score(tokens: Sequence[int]) -> int:
    """Sum of word polarities (+1 positive, -1 negative), each flipped when "not" precedes it."""
    score, negated = 0, False
    for token in tokens:
        score += -POLARITY.get(token, 0) if negated else POLARITY.get(token, 0)
        negated = token == TOKEN_ID[NEGATOR]
    return score


def random_sentence(rng: np.random.Generator, mask_rate: float) -> list[int]:
    """4-12 words: 1-3 sentiment phrases ("good" or "not good") among shuffled filler words."""
    sentiment = [TOKEN_ID[w] for w in POSITIVE + NEGATIVE]
    filler = [TOKEN_ID[w] for w in NEUTRAL]
    phrases = [[int(rng.choice(sentiment))] for _ in range(rng.integers(1, MAX_PHRASES + 1))]
    phrases = [[TOKEN_ID[NEGATOR], *p] if rng.random() < NEGATION_RATE else p for p in phrases]
    fillers = rng.integers(MIN_WORDS, MAX_WORDS + 1) - sum(len(p) for p in phrases)
    phrases += [[int(rng.choice(filler))] for _ in range(fillers)]
    words = [t for i in rng.permutation(len(phrases)) for t in phrases[i]]
    return [TOKEN_ID[MASK] if rng.random() < mask_rate else t for t in words]


def text_corpus(
    n: int, seed: int, mask_rate: float = MASK_RATE
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``n`` sentences padded to ``SEQ_LEN`` (n, 16) and labels (1 = positive); ties are redrawn."""
    rng = np.random.default_rng(seed)
    tokens = np.full((n, SEQ_LEN), TOKEN_ID[PAD], dtype=np.int64)  # (sentences, positions)
    labels = np.empty(n, dtype=np.int64)
    for row in range(n):
        sentence, score = [], 0
        while score == 0:
            sentence = random_sentence(rng, mask_rate)
            score = sentiment_score(sentence)
        tokens[row, : len(sentence)] = sentence
        labels[row] = int(score > 0)
    return tokens, labels


def digits_config() -> dict[str, Any]:
    """explain.yaml of ``digits_cnn``: 2x2 pixel patches, zero (black) baseline."""
    return {
        "output": "probabilities",
        "class_names": [str(d) for d in range(10)],
        "modality": "image",
        "image": {"layout": "NCHW", "patch": 2},
        "baseline": "zeros",
        "method": "partition",
        "budget_ms": 500,
        "background": {"path": "background.npy"},
    }


def text_config() -> dict[str, Any]:
    """explain.yaml of ``text_sentiment``: tokens replaced by [MASK] when absent."""
    return {
        "output": "probabilities",
        "classes": [1],
        "class_names": ["negative", "positive"],
        "modality": "text",
        "text": {"pad_token": TOKEN_ID[PAD], "mask_token": TOKEN_ID[MASK],
                 "vocabulary": "vocab.txt"},
        "baseline": "mask",
        "method": "exact",
        "budget_ms": 500,
    }


def onnx_outputs(proto: onnx.ModelProto, x: NDArray[Any]) -> dict[str, FloatArray]:
    """Every output of the model on ``x``, by name."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {session.get_inputs()[0].name: x})
    return {name: np.asarray(v) for name, v in zip(names, values, strict=True)}


def op_types(proto: onnx.ModelProto) -> list[str]:
    """The graph's op types in node order, each listed once."""
    return list(dict.fromkeys(node.op_type for node in proto.graph.node))


def twins() -> ModuleType:
    """``examples/torch_models.py``, imported on demand so this module needs no torch."""
    package = f"{__package__}." if __package__ else ""
    return importlib.import_module(f"{package}torch_models")


def check_export(name: str, proto: onnx.ModelProto, model: Any, x: NDArray[Any]) -> None:
    """onnx.checker passes; onnxruntime, torch and the twin rebuilt from ONNX agree on ``x``."""
    onnx.checker.check_model(proto, full_check=True)
    tm = twins()
    outputs = onnx_outputs(proto, x)
    expected = tm.predict(model, x)  # (rows, classes) logits
    probabilities = np.exp(expected) / np.exp(expected).sum(axis=1, keepdims=True)
    diffs = {"logits": float(np.max(np.abs(outputs["logits"] - expected))),
             "probabilities": float(np.max(np.abs(outputs["probabilities"] - probabilities)))}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(proto.SerializeToString())
        twin = tm.predict(tm.from_onnx(path), x)
    diffs["twin"] = float(np.max(np.abs(twin - outputs["logits"])))
    print(f"  check: max |onnxruntime - torch| {diffs} (tolerance {DL_ATOL:g})")
    assert max(diffs.values()) <= DL_ATOL, f"{name}: outputs differ: {diffs}"


def check_accuracy(name: str, proto: onnx.ModelProto, x: NDArray[Any], y: NDArray[Any]) -> None:
    """Test accuracy through onnxruntime, asserted at ``DL_MIN_ACCURACY``."""
    predicted = onnx_outputs(proto, x)["probabilities"].argmax(axis=1)
    accuracy = float(np.mean(predicted == y))
    print(f"  test accuracy (onnxruntime) = {accuracy:.4f} on {len(y)} held-out inputs")
    assert accuracy >= DL_MIN_ACCURACY, f"{name}: test accuracy {accuracy} < {DL_MIN_ACCURACY}"


def report(proto: onnx.ModelProto, seconds: float) -> None:
    """Print the training time, the IO signature and the op list."""
    inputs, outputs = describe_io(proto)
    print(f"  trained in {seconds:.1f} s")
    print(f"  inputs:  {inputs}")
    print(f"  outputs: {outputs}")
    print(f"  ops:     {op_types(proto)}")


def finish(name: str, proto: onnx.ModelProto, config: dict[str, Any], background: Any) -> Path:
    """Name the graph, write the model directory and print the file size."""
    proto.graph.name = name
    model_dir = write_model_dir(name, proto, config, background)
    size = (model_dir / "1" / "model.onnx").stat().st_size
    print(f"  wrote {model_dir.relative_to(MODELS_DIR.parent.parent)} (model.onnx {size} bytes)")
    return model_dir


def build_digits_cnn() -> None:
    """Train the digits CNN, export it with a Softmax output, verify and write it."""
    print(f"{DIGITS_NAME}:")
    tm, data = twins(), digits()
    X_train, X_test = digit_images(data.X_train), digit_images(data.X_test)  # (N, 1, 8, 8)
    tm.seed_everything(SEED)
    started = time.perf_counter()
    model = tm.train(tm.DigitsCNN(), X_train, data.y_train.astype(np.int64), epochs=60, lr=3e-3)
    proto = tm.export_onnx(model, X_test[:2], "image")
    report(proto, time.perf_counter() - started)
    check_export(DIGITS_NAME, proto, model, X_test)
    check_accuracy(DIGITS_NAME, proto, X_test, data.y_test)
    background = X_train[random_rows(len(X_train), DL_BACKGROUND_DIGITS)]  # (100, 1, 8, 8)
    finish(DIGITS_NAME, proto, digits_config(), background)


def build_text_sentiment() -> None:
    """Train the attention text classifier on the generated corpus, verify and write it."""
    print(f"{TEXT_NAME}:")
    tm = twins()
    X_train, y_train = text_corpus(TEXT_TRAIN_SENTENCES, TEXT_TRAIN_SEED)  # (N, 16) int64
    X_test, y_test = text_corpus(TEXT_TEST_SENTENCES, TEXT_TEST_SEED)
    tm.seed_everything(SEED)
    started = time.perf_counter()
    model = tm.train(tm.TextClassifier(len(VOCABULARY), SEQ_LEN), X_train, y_train,
                     epochs=40, lr=1e-2)
    proto = tm.export_onnx(model, X_test[:2], "tokens")
    report(proto, time.perf_counter() - started)
    check_export(TEXT_NAME, proto, model, X_test)
    check_accuracy(TEXT_NAME, proto, X_test, y_test)
    background = X_train[random_rows(len(X_train), DL_BACKGROUND_SENTENCES)]  # (32, 16)
    model_dir = finish(TEXT_NAME, proto, text_config(), background)
    (model_dir / "vocab.txt").write_text("\n".join(VOCABULARY) + "\n", encoding="utf-8")


DL_BUILDERS: dict[str, Callable[[], None]] = {
    DIGITS_NAME: build_digits_cnn,
    TEXT_NAME: build_text_sentiment,
}


def torch_available() -> bool:
    """Whether the optional ``torch`` extra is installed."""
    return importlib.util.find_spec("torch") is not None


def build_named(name: str) -> None:
    """Build one model by name."""
    if name in DL_BUILDERS:
        DL_BUILDERS[name]()
    else:
        build(next(spec for spec in MODEL_SPECS if spec.name == name))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """``--only NAME...`` restricts the build to the named models."""
    names = [spec.name for spec in MODEL_SPECS] + list(DL_BUILDERS)
    parser = argparse.ArgumentParser(description="Build the bundled example models.")
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                        help=f"build only these models (of {', '.join(names)})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Build every bundled example model, or those named with ``--only``.

    Without ``--only``, the deep-learning models are skipped with a note when torch is missing
    (their committed ONNX files stay); naming one with ``--only`` then fails.
    """
    args = parse_args(argv)
    names = args.only or [spec.name for spec in MODEL_SPECS] + list(DL_BUILDERS)
    if not args.only and not torch_available():
        print(f"note: torch is not installed (pip install -e '.[torch]'): "
              f"keeping the committed {', '.join(DL_BUILDERS)}")
        names = [n for n in names if n not in DL_BUILDERS]
    for name in names:
        build_named(name)


if __name__ == "__main__":
    main()

"""The bundled deep-learning examples (digits_cnn, text_sentiment) work without torch."""

from __future__ import annotations

import ast

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import numpy_helper

from examples.build_models import (
    TOKEN_ID,
    VOCABULARY,
    digit_images,
    digits,
    digits_config,
    sentiment_score,
    text_config,
    text_corpus,
)
from tests.conftest import MODELS, ROOT

DIGITS = MODELS / "digits_cnn"
TEXT = MODELS / "text_sentiment"
ATTENTION_PATH_OPS = {"Add", "Div", "Mul", "Where", "Cast"}  # between MatMul(Q, K^T) and Softmax


def session(model_dir: object) -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS / str(model_dir) / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])


def signature(args: list[ort.NodeArg]) -> list[tuple[str, str, list[object]]]:
    return [(a.name, a.type, list(a.shape)) for a in args]


def test_digits_cnn_signature_and_accuracy() -> None:
    s = session("digits_cnn")
    assert signature(s.get_inputs()) == [("image", "tensor(float)", ["N", 1, 8, 8])]
    assert signature(s.get_outputs()) == [("probabilities", "tensor(float)", ["N", 10]),
                                          ("logits", "tensor(float)", ["N", 10])]
    data = digits()
    probabilities, logits = s.run(None, {"image": digit_images(data.X_test)})  # (360, 10) each
    assert np.mean(probabilities.argmax(axis=1) == data.y_test) >= 0.95
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)


def test_text_sentiment_signature_and_accuracy_on_a_fresh_corpus() -> None:
    s = session("text_sentiment")
    assert signature(s.get_inputs()) == [("tokens", "tensor(int64)", ["N", 16])]
    assert signature(s.get_outputs()) == [("probabilities", "tensor(float)", ["N", 2]),
                                          ("logits", "tensor(float)", ["N", 2])]
    tokens, labels = text_corpus(1000, seed=2026)  # a seed the build never used
    (probabilities,) = s.run(["probabilities"], {"tokens": tokens})  # (1000, 2)
    assert np.mean(probabilities.argmax(axis=1) == labels) >= 0.95


def test_negation_flips_the_next_sentiment_word() -> None:
    ids = [[TOKEN_ID[w] for w in text.split()] for text in
           ("the film was good", "the film was not good", "not bad but boring")]
    assert [sentiment_score(t) for t in ids] == [1, -1, 0]
    tokens = np.zeros((2, 16), dtype=np.int64)
    tokens[0, :4], tokens[1, :5] = ids[0], ids[1]
    (probabilities,) = session("text_sentiment").run(["probabilities"], {"tokens": tokens})
    assert probabilities[0, 1] > 0.9 and probabilities[1, 1] < 0.1


def test_corpus_is_seeded_padded_and_balanced() -> None:
    tokens, labels = text_corpus(500, seed=7)
    again, _ = text_corpus(500, seed=7)
    np.testing.assert_array_equal(tokens, again)
    lengths = (tokens != TOKEN_ID["[PAD]"]).sum(axis=1)
    assert lengths.min() >= 4 and lengths.max() <= 12
    assert all(not row[n:].any() for row, n in zip(tokens, lengths, strict=True))  # pad at end
    assert 0.4 < labels.mean() < 0.6 and (tokens == TOKEN_ID["[MASK]"]).any()


def test_vocabulary_file_matches_the_embedding() -> None:
    lines = (TEXT / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert lines == VOCABULARY and lines[:2] == ["[PAD]", "[MASK]"]
    proto = onnx.load(str(TEXT / "1" / "model.onnx"))
    embedding = next(t for t in proto.graph.initializer if t.name == "embedding.weight")
    assert numpy_helper.to_array(embedding).shape == (len(lines), 16)


def test_explain_yaml_and_backgrounds_are_what_the_build_writes() -> None:
    assert yaml.safe_load((DIGITS / "explain.yaml").read_text()) == digits_config()
    assert yaml.safe_load((TEXT / "explain.yaml").read_text()) == text_config()
    images = np.load(DIGITS / "background.npy")
    assert images.shape == (100, 1, 8, 8) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    sentences = np.load(TEXT / "background.npy")
    assert sentences.shape == (32, 16) and sentences.dtype == np.int64
    assert sentences.min() >= 0 and sentences.max() < len(VOCABULARY)


@pytest.mark.parametrize("name", ["digits_cnn", "text_sentiment"])
def test_plain_opset_17_graphs(name: str) -> None:
    proto = onnx.load(str(MODELS / name / "1" / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [(op.domain, op.version) for op in proto.opset_import] == [("", 17)]
    assert all(node.domain == "" for node in proto.graph.node)


def test_text_graph_has_a_rank_4_attention_softmax() -> None:
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(TEXT / "1" / "model.onnx")))
    producer = {out: node for node in proto.graph.node for out in node.output}
    attention = [node for node in proto.graph.node if node.op_type == "Softmax"
                 and _fed_by_matmul(node, producer) and _feeds_matmul(node, proto.graph)]
    assert len(attention) == 1
    (softmax,) = attention
    assert onnx.helper.get_attribute_value(softmax.attribute[0]) == -1
    shapes = {v.name: v.type.tensor_type.shape.dim for v in proto.graph.value_info}
    dims = [d.dim_param or d.dim_value for d in shapes[softmax.output[0]]]
    assert dims == ["N", 1, 16, 16]


def _fed_by_matmul(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> bool:
    """Whether a MatMul feeds ``node``'s first input through elementwise ops only."""
    source = producer.get(node.input[0])
    while source is not None and source.op_type in ATTENTION_PATH_OPS:
        source = producer.get(source.input[0])
    return source is not None and source.op_type == "MatMul"


def _feeds_matmul(node: onnx.NodeProto, graph: onnx.GraphProto) -> bool:
    return any(c.op_type == "MatMul" and node.output[0] in c.input for c in graph.node)


def test_the_build_script_imports_torch_only_on_demand() -> None:
    """Its module-level imports name no torch module (torch_models is imported lazily)."""
    tree = ast.parse((ROOT / "examples" / "build_models.py").read_text(encoding="utf-8"))
    names = [alias.name for node in tree.body if isinstance(node, ast.Import)
             for alias in node.names]
    names += [node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert names and not [n for n in names if n.split(".")[0] in {"torch", "torch_models"}]

"""Random and malformed requests for every RPC (issue 11), sent as raw bytes to a real server.

A seeded `numpy.random.Generator` draws valid requests and mutations of them (shapes, dtypes,
byte lengths, special values, names, budgets, seeds, targets, oversize strings) plus wire garbage;
`run` sends them from a few client threads and checks every answer. Shared by tests/test_fuzz.py
(2,000+ requests) and benchmarks/fuzz.py (`make fuzz`, 10,000).
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import onnx
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper

from explainers.base import Array
from service.api.tensors import CONTENTS_FIELD, from_array
from service.models.onnx_model import OIP_TO_NUMPY
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc

T = TypeVar("T")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
SERVICE = "sidelight.v1.Explainer"
RPCS = ("Explain", "ListModels", "GetModel", "PutBackground", "GetBackground",
        "ListBackgrounds", "DeleteBackground", "Check")
RPC_WEIGHTS = (0.42, 0.03, 0.07, 0.16, 0.08, 0.05, 0.09, 0.10)
RESPONSES: dict[str, type[Message]] = {
    "Explain": pb.ExplainResponse, "ListModels": pb.ListModelsResponse,
    "GetModel": pb.ModelInfo, "PutBackground": pb.PutBackgroundResponse,
    "GetBackground": pb.BackgroundInfo, "ListBackgrounds": pb.ListBackgroundsResponse,
    "DeleteBackground": pb.DeleteBackgroundResponse, "Check": health_pb2.HealthCheckResponse}
FAILING_STATUSES = ("INTERNAL", "UNKNOWN", "HANG", "OK_NONFINITE")

TIMEOUT_S = 10.0  # a call still unanswered after this long is counted as a hang
SHORT_TIMEOUTS_S = (0.001, 0.01, 0.05, 0.2)  # deadline-only calls and unbounded budgets
UPLOAD_LIMIT = 1 << 20  # SIDELIGHT_MAX_UPLOAD_BYTES of the fuzzed server (small: cheap oversize)
RECEIVE_LIMIT = UPLOAD_LIMIT + (1 << 20)  # the server's gRPC receive limit for that setting
MAX_BACKGROUND_ROWS = 2000  # SIDELIGHT_MAX_BACKGROUND_ROWS of the fuzzed server
SETTINGS = {"max_upload_bytes": UPLOAD_LIMIT, "max_background_rows": MAX_BACKGROUND_ROWS,
            "metrics_port": -1}  # overrides for tests.conftest.settings_for
WIRE_SHARE = 0.12  # share of requests that are wire garbage rather than a message
VALID_SHARE = 0.25  # share of message requests sent unmutated
POOL = tuple(f"fuzz-{i}" for i in range(6))  # names of uploaded backgrounds (bounded storage)
PROTECTED = ("", "default")  # never written or deleted: the run checks `default` survives
ABSENT_MODEL = "fuzz-absent-model"  # the model of garbled writes (a garbled name may read as "")

VALID_METHODS = ("", "auto", "exact", "permutation", "kernel", "tree", "linear")
DATATYPES = tuple(OIP_TO_NUMPY)
ODD_DATATYPES = ("BYTES", "fp32", "Fp64", "int64", "", "FLOAT", "FP8", "STRING", " FP32",
                 "FP32\x00", "BF16")
SPECIAL_FLOATS = (np.nan, np.inf, -np.inf, 1e39, -1e39, 3.4e38, 1e308, -1e308, 1e-310, 5e-324,
                  -0.0, 1e-45)
SPECIAL_INTS = (2**63 - 1, -(2**63), 2**53 + 1, -1, 2**31, -(2**31) - 1, 10**6, 255, 256)
HUGE_SHAPES = ((2**62,), (2**63 - 1,), (2**31, 2**31), (2**32, 2**32), (2**62, 4), (3, 2**61),
               (1, 2**62), (2**40, 2**40, 2**40), (1, 2**63 - 1))
BUDGETS = (0.0, -1.0, -1e-9, float("nan"), float("inf"), float("-inf"), 1e-9, 1e-3, 0.5,
           1e12, 1e308, 5e-324, 30000.0, 30001.0)
SEEDS = (0, 1, 2**63, 2**64 - 1, 2**64 - 2)
TARGET_ERRORS = (float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e-300, 1e308, 5e-324,
                 1e-3)
MAX_EVALUATIONS = (-1, 0, 1, 2, 3, 2**63 - 1, -(2**63), 10**12)
INT32_EXTREMES = (2**31 - 1, -(2**31), -1, 2, 3, 1000)
SCALES = ("identity", "logit", "margin", "", "LOGIT", " logit", "probability", "log", "margin\n")
HEALTH_NAMES = ("", SERVICE, "redis", "grpc.health.v1.Health", "nope")


def weird_names(rng: np.random.Generator) -> list[str]:
    """Names no server should choke on: empty, unicode, 20 kB, path separators, control bytes."""
    printable = "".join(chr(c) for c in rng.integers(32, 127, int(rng.integers(1, 80))))
    return ["", " ", "a" * 20_000, "é" * 10_000, "模型", "😀" * 50, "../../etc/passwd", "a/b",
            "a\\b", "/", "..", ".", "name\x00", "\n", "\t", "%s%n%x", "{}", "*", "sidelight:v1:*",
            "x" * 64, "x" * 65, "default", "DEFAULT", "default ", "default/../default",
            "\u202edefault", "\ufeff", printable, "1", "0", "-1", "999999999999999999999"]


# --- the repository: the bundled models plus two tiny ones built here ------------------------
VOCAB, TOKENS = 10, 4


def token_model() -> onnx.ModelProto:
    """score = sum_j E[ids_j]: an INT64 token-id input read through Gather (ids index a table)."""
    table = np.linspace(-1.0, 1.0, VOCAB).astype(np.float32)  # (VOCAB,)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], axis=0),  # (N, TOKENS)
             helper.make_node("ReduceSum", ["emb", "axes"], ["score"], keepdims=1)]  # (N, 1)
    graph = helper.make_graph(
        nodes, "tokens", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", TOKENS])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor("E", TensorProto.FLOAT, [VOCAB], table),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def pair_model() -> onnx.ModelProto:
    """probs = softmax([a, b] @ W) and its logits: an FP32 [N, 2] and an FP64 rank-1 [N] input."""
    W = np.array([[1.0, -1.0], [0.5, 2.0], [-1.5, 0.25]], dtype=np.float32)  # (3, 2)
    nodes = [helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["bf", "axes"], ["b2"]),  # (N, 1)
             helper.make_node("Concat", ["a", "b2"], ["ab"], axis=1),  # (N, 3)
             helper.make_node("MatMul", ["ab", "W"], ["logits"]),  # (N, 2)
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    graph = helper.make_graph(
        nodes, "pair",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("b", TensorProto.DOUBLE, ["N"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor("W", TensorProto.FLOAT, [3, 2], W.ravel()),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _extra_models() -> dict[str, tuple[onnx.ModelProto, Array]]:
    """Name -> (model, background (rows, features)) of the models built for the fuzz run."""
    rng = np.random.default_rng(0)
    return {"fuzz_tokens": (token_model(), rng.integers(0, VOCAB, (40, TOKENS)).astype(float)),
            "fuzz_pair": (pair_model(), rng.normal(size=(40, 3)))}


def build_repository(root: Path) -> Path:
    """A model repository under `root`: the bundled models (symlinked) and the two built here."""
    root.mkdir(parents=True, exist_ok=True)
    for bundled in sorted(p for p in EXAMPLES.iterdir() if p.is_dir()):
        (root / bundled.name).symlink_to(bundled, target_is_directory=True)
    for name, (model, background) in _extra_models().items():
        (root / name / "1").mkdir(parents=True)
        onnx.save(model, root / name / "1" / "model.onnx")
        np.save(root / name / "background.npy", background)
        (root / name / "explain.yaml").write_text("background: {path: background.npy}\n")
    return root


# --- what the generator knows about the models ------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """One model input as GetModel reports it."""

    name: str
    datatype: str
    rank: int
    columns: int
    shape: tuple[int, ...] = ()  # the element shape (without the batch axis)


@dataclass(frozen=True)
class ModelSpec:
    """A served model: its inputs, outputs, feature names and rows of valid values."""

    name: str
    version: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    features: tuple[str, ...]
    rows: Array  # (rows, features) valid inputs: the model's background file

    def split(self, X: Array) -> list[Array]:
        """X (rows, elements) as one array per input, shaped (rows, *its element shape)."""
        edges = np.cumsum([0] + [i.columns for i in self.inputs])
        parts = [X[:, a:b] for a, b in itertools.pairwise(edges)]
        return [p.reshape(p.shape[0], *i.shape) for p, i in zip(parts, self.inputs, strict=True)]


def read_specs(stub: pb_grpc.ExplainerStub, root: Path) -> list[ModelSpec]:
    """Every READY model of the server, with its background file's rows as valid values."""
    return [_spec(stub.GetModel(pb.GetModelRequest(model=m.name), timeout=TIMEOUT_S), root)
            for m in stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT_S).models
            if m.state == "READY"]


def _spec(info: pb.ModelInfo, root: Path) -> ModelSpec:
    inputs = tuple(InputSpec(i.name, i.datatype, len(i.shape), int(np.prod(i.shape[1:])),
                             tuple(int(d) for d in i.shape[1:])) for i in info.inputs)
    path = root / info.name / "background.npy"
    rows = np.load(path) if path.exists() else np.zeros((1, len(info.feature_names)))
    rows = rows.reshape(rows.shape[0], -1)  # (rows, elements): images are stored (N, C, H, W)
    return ModelSpec(info.name, info.version, inputs, tuple(o.name for o in info.outputs),
                     tuple(info.feature_names), np.asarray(rows, np.float64))


# --- cases ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One request: the RPC, what was done to it, its bytes and the client's timeout."""

    rpc: str
    kind: str
    payload: bytes
    message: Message | None = None  # None for wire garbage
    timeout_s: float = TIMEOUT_S

    def describe(self, width: int = 300) -> str:
        """One line: RPC, mutation and the request (text format, or hex for garbage)."""
        if self.message is None:
            body = f"{len(self.payload)} bytes {self.payload[:48].hex()}"
        else:
            body = compact(text_format.MessageToString(self.message, as_one_line=True))
        return f"{self.rpc} [{self.kind}] timeout={self.timeout_s}s {_clip(body, width)}"


def compact(text: str) -> str:
    """A text-format request made short: quoted strings (names, raw bytes) clipped to 40
    characters, and runs of typed contents values to their first two."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: _clip(m.group(0), 40), text)
    return re.sub(r"((\w+_contents): \S+ \2: \S+ )(?:\2: \S+ )+", r"\1... ", text)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} chars)"


def method_path(rpc: str) -> str:
    return "/grpc.health.v1.Health/Check" if rpc == "Check" else f"/{SERVICE}/{rpc}"


def encode(name: str, values: Array, datatype: str, raw: bool = True) -> pb.Tensor:
    """`values` cast to `datatype` (as numpy casts) in raw bytes or the typed contents field."""
    with np.errstate(all="ignore"):
        array: Array = np.asarray(values).astype(OIP_TO_NUMPY[datatype])
    contents = CONTENTS_FIELD.get(datatype)
    if raw or contents is None:
        return from_array(name, array)
    tensor = pb.Tensor(name=name, datatype=datatype, shape=list(array.shape))
    getattr(tensor.contents, contents).extend(array.ravel().tolist())
    return tensor


def values_of(t: pb.Tensor) -> Array:
    """A tensor's values when it decodes on the client, else a few ones (mutations still apply)."""
    try:
        datatype = t.datatype.upper()
        dtype = np.dtype(OIP_TO_NUMPY[datatype]).newbyteorder("<")
        flat = np.frombuffer(t.raw, dtype=dtype) if t.raw else np.asarray(
            getattr(t.contents, CONTENTS_FIELD[datatype]), dtype=dtype)
        return flat.reshape([int(d) for d in t.shape])
    except (KeyError, ValueError, TypeError):
        return np.ones((1, 4))


class Fuzzer:
    """Draws cases from one seeded generator: valid requests, mutations of them, wire garbage.
    The i-th case depends only on the seed and i (draw them in order)."""

    def __init__(self, specs: Sequence[ModelSpec], seed: int) -> None:
        self.specs = list(specs)
        self.rng = np.random.default_rng(seed)

    def cases(self, count: int) -> Iterator[Case]:
        """`count` cases, drawn lazily (uploads can be megabytes: never hold them all)."""
        return (self.case() for _ in range(count))

    def case(self) -> Case:
        rpc = str(self.rng.choice(RPCS, p=RPC_WEIGHTS))
        if self.rng.random() < WIRE_SHARE:
            kind, payload = self.pick(WIRE)(self, rpc)
            return Case(rpc, f"wire:{kind}", payload)
        kind, message = self.mutated(rpc)
        return Case(rpc, kind, message.SerializeToString(), message, self.timeout_for(message))

    # --- small draws --------------------------------------------------------------------------
    def pick(self, options: Sequence[T]) -> T:
        return options[int(self.rng.integers(len(options)))]

    def weird(self, protect: bool = False) -> str:
        """A weird name; never a PROTECTED one when `protect` (uploads and deletes)."""
        return self.pick([n for n in weird_names(self.rng) if not (protect and n in PROTECTED)])

    def model(self) -> ModelSpec:
        return self.pick(self.specs)

    def spec_of(self, name: str) -> ModelSpec | None:
        return next((s for s in self.specs if s.name == name), None)

    def rows(self, spec: ModelSpec, count: int) -> Array:
        """`count` rows of valid values (rows, features)."""
        return spec.rows[self.rng.integers(0, spec.rows.shape[0], count)]

    def tensors(self, spec: ModelSpec, X: Array) -> list[pb.Tensor]:
        """X (rows, features) as the model's input tensors: raw or contents, named (in any
        order) or all unnamed (matched by position)."""
        raw, named = self.rng.random() < 0.6, self.rng.random() < 0.8
        tensors = [encode(i.name if named else "", part, i.datatype, raw)
                   for i, part in zip(spec.inputs, spec.split(X), strict=True)]
        order = self.rng.permutation(len(tensors)) if named else range(len(tensors))
        return [tensors[int(k)] for k in order]

    # --- valid requests -----------------------------------------------------------------------
    def valid(self, rpc: str) -> Message:
        return VALID[rpc](self)

    def mutated(self, rpc: str) -> tuple[str, Message]:
        """A valid request of `rpc`, sent as is or with 1-3 mutations; (kind, message)."""
        message = self.valid(rpc)
        mutations = MUTATIONS[rpc]
        if not mutations or self.rng.random() < VALID_SHARE:
            return "valid", message
        labels = [self.pick(mutations)(self, message)
                  for _ in range(self.pick((1, 1, 1, 2, 3)))]
        return "|".join(labels), message

    def garbled(self, rpc: str) -> Message:
        """A valid request to garble. Uploads and deletes name no real model: cut short or
        with a flipped tag, their background name can vanish, and "" means `default`."""
        message = self.valid(rpc)
        if rpc in ("PutBackground", "DeleteBackground"):
            message.model = ABSENT_MODEL  # type: ignore[attr-defined]
        return message

    def timeout_for(self, message: Message) -> float:
        """Short when the server takes its budget from the deadline (budget 0, or not a small
        positive number); else long enough that only a hang reaches it."""
        if isinstance(message, pb.ExplainRequest) and not 0 < message.budget_ms <= 1000:
            return self.pick(SHORT_TIMEOUTS_S)
        return TIMEOUT_S


def valid_explain(f: Fuzzer) -> pb.ExplainRequest:
    """1-3 background rows of a model, any method, a 1-20 ms budget, any seed."""
    spec = f.model()
    X = f.rows(spec, f.pick((1, 1, 1, 2, 3)))
    return pb.ExplainRequest(
        model=spec.name, version=f.pick(("", spec.version)), inputs=f.tensors(spec, X),
        method=f.pick(VALID_METHODS), budget_ms=float(f.rng.uniform(1.0, 20.0)),
        seed=int(f.rng.integers(0, 2**63)),
        background=f.pick(POOL) if f.rng.random() < 0.3 else "")


def valid_put(f: Fuzzer) -> pb.PutBackgroundRequest:
    """1-40 background rows under one of the POOL names, FP32 or FP64."""
    spec = f.model()
    X = f.rows(spec, int(f.rng.integers(1, 40)))
    names = spec.features if f.rng.random() < 0.3 else ()
    return pb.PutBackgroundRequest(
        model=spec.name, version=f.pick(("", spec.version)), name=f.pick(POOL),
        data=encode("data", X, f.pick(("FP32", "FP64")), f.rng.random() < 0.6),
        feature_names=names)


def valid_get_model(f: Fuzzer) -> pb.GetModelRequest:
    spec = f.model()
    return pb.GetModelRequest(model=spec.name, version=f.pick(("", spec.version)))


def valid_get_background(f: Fuzzer) -> pb.GetBackgroundRequest:
    spec = f.model()
    return pb.GetBackgroundRequest(model=spec.name, version=f.pick(("", spec.version)),
                                   name=f.pick(("", "default", *POOL)))


def valid_delete(f: Fuzzer) -> pb.DeleteBackgroundRequest:
    spec = f.model()
    return pb.DeleteBackgroundRequest(model=spec.name, version=f.pick(("", spec.version)),
                                      name=f.pick(POOL))


VALID: dict[str, Callable[[Fuzzer], Message]] = {
    "Explain": valid_explain, "ListModels": lambda f: pb.ListModelsRequest(),
    "GetModel": valid_get_model, "PutBackground": valid_put,
    "GetBackground": valid_get_background,
    "ListBackgrounds": lambda f: pb.ListBackgroundsRequest(model=f.pick(("", f.model().name))),
    "DeleteBackground": valid_delete,
    "Check": lambda f: health_pb2.HealthCheckRequest(service=f.pick(("", SERVICE)))}


# --- tensor mutations (Explain inputs and PutBackground data); each returns its label ---------
def t_shape(f: Fuzzer, t: pb.Tensor) -> str:
    """Shape empty, of another rank (0-6), negative, huge (products overflowing int64), zero
    rows, off by one or reversed; the bytes stay as they were."""
    kind = f.pick(("empty", "rank", "negative", "huge", "zero", "off", "reversed"))
    shape = [int(d) for d in t.shape]
    new = {"empty": [], "rank": f.rng.integers(0, 5, int(f.rng.integers(0, 7))).tolist(),
           "negative": [-1, *shape[1:]], "huge": list(f.pick(HUGE_SHAPES)),
           "zero": [0, *shape[1:]], "off": [d + f.pick((-1, 1)) for d in shape],
           "reversed": shape[::-1]}[kind]
    t.ClearField("shape")
    t.shape.extend(int(d) for d in new)
    return f"shape:{kind}"


def t_datatype(f: Fuzzer, t: pb.Tensor) -> str:
    """Datatype relabelled (same bytes: lowercase, unknown, BYTES, FP16...) or the values
    re-encoded in another OIP datatype."""
    if f.rng.random() < 0.5:
        t.datatype = f.pick((*DATATYPES, *ODD_DATATYPES))
        return "dtype:relabel"
    datatype = f.pick(DATATYPES)
    t.CopyFrom(encode(t.name, values_of(t), datatype, f.rng.random() < 0.6))
    return f"dtype:recast-{datatype}"


def t_bytes(f: Fuzzer, t: pb.Tensor) -> str:
    """Raw bytes one or more too many or too few, raw and contents both set, or contents in a
    field that does not match the datatype (or one value too many)."""
    kind = f.pick(("plus", "minus", "half", "both", "wrong-field", "extra-value"))
    raw = t.raw or from_array(t.name, values_of(t)).raw
    if kind in ("plus", "minus", "half"):
        t.raw = {"plus": raw + f.rng.bytes(int(f.rng.integers(1, 9))), "minus": raw[:-1],
                 "half": raw[:len(raw) // 2]}[kind]
    elif kind == "both":
        t.contents.fp64_contents.extend(f.rng.normal(size=int(f.rng.integers(1, 40))).tolist())
        t.raw = raw
    else:
        t.ClearField("raw")
        t.ClearField("contents")
        count = min(int(np.prod(np.clip([int(d) for d in t.shape], 0, 64))), 10_000) \
            + (kind == "extra-value")
        contents = f.pick(("fp32_contents", "fp64_contents", "int64_contents", "bool_contents",
                           "uint_contents"))
        getattr(t.contents, contents).extend([1] * count)
    return f"bytes:{kind}"


def t_values(f: Fuzzer, t: pb.Tensor) -> str:
    """NaN, infinities, 1e39, huge finite, denormals (in the tensor's datatype or FP64), or
    huge integers in an integer datatype, at random places."""
    if f.rng.random() < 0.7:
        values = values_of(t).astype(np.float64)
        datatype = t.datatype.upper() if t.datatype.upper() in OIP_TO_NUMPY and \
            f.rng.random() < 0.5 else "FP64"
        special = f.pick(SPECIAL_FLOATS)
        _scatter(f, values, special)
        t.CopyFrom(encode(t.name, values, datatype, f.rng.random() < 0.7))
        return f"values:{special:g}-{datatype}"
    ints = values_of(t).astype(np.int64)
    big = f.pick(SPECIAL_INTS)
    _scatter(f, ints, big)
    datatype = f.pick(("INT64", "UINT64", "INT32", "INT8", "UINT8", "BOOL"))
    t.CopyFrom(encode(t.name, ints, datatype, f.rng.random() < 0.7))
    return f"values:int{big}-{datatype}"


def _scatter(f: Fuzzer, values: Array, special: float) -> None:
    """`special` at 1-3 random places of `values` (in place)."""
    if values.size:
        values.flat[f.rng.integers(0, values.size, int(f.rng.integers(1, 4)))] = special


TENSOR_MUTATIONS = (t_shape, t_datatype, t_bytes, t_values)


# --- request mutations ------------------------------------------------------------------------
def m_string(f: Fuzzer, message: Message) -> str:
    """One string field (model, version, name, method, background, service) set to a weird
    name; a background `name` of an upload or a delete is never `default` or empty."""
    fields = [d.name for d in message.DESCRIPTOR.fields
              if d.type == d.TYPE_STRING and not d.is_repeated]
    which = f.pick(fields)
    protect = which == "name" and isinstance(message, pb.PutBackgroundRequest
                                             | pb.DeleteBackgroundRequest)
    setattr(message, which, f.weird(protect))
    return f"name:{which}"


def m_input(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """A tensor mutation on one input (an input is added when there is none)."""
    if not r.inputs:
        r.inputs.append(encode("input", f.rng.normal(size=(1, 4)), "FP32"))
    tensor = r.inputs[int(f.rng.integers(len(r.inputs)))]
    if f.rng.random() < 0.15:
        tensor.name = f.weird()
        return "name:input"
    return f.pick(TENSOR_MUTATIONS)(f, tensor)


def m_budget(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """budget_ms: 0 (deadline only), negative, NaN, infinite, tiny or huge."""
    r.budget_ms = f.pick(BUDGETS)
    return f"budget:{r.budget_ms:g}"


def m_seed(f: Fuzzer, r: pb.ExplainRequest) -> str:
    r.seed = f.pick(SEEDS)
    return f"seed:{r.seed}"


def m_target(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """target.classes out of range, negative, int32 extremes or a long list; scale unknown or
    another one; output unknown or another one."""
    kind = f.pick(("classes", "classes-long", "scale", "output"))
    if kind == "classes":
        r.target.classes.extend(f.pick((*INT32_EXTREMES, 0, 1)) for _ in range(3))
    elif kind == "classes-long":
        r.target.classes.extend(f.rng.integers(-1, 3, int(f.rng.integers(10, 400))).tolist())
    elif kind == "scale":
        r.target.scale = f.pick(SCALES)
    else:
        spec = f.spec_of(r.model) or f.model()
        r.target.output = f.pick((*spec.outputs, "nope", f.weird()))
    return f"target:{kind}"


def m_accuracy(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """target_error or max_evaluations: negative, NaN, infinite, tiny or huge."""
    if f.rng.random() < 0.5:
        r.target_error = f.pick(TARGET_ERRORS)
        return f"target_error:{r.target_error:g}"
    r.max_evaluations = f.pick(MAX_EVALUATIONS)
    return f"max_evaluations:{r.max_evaluations}"


def m_method(f: Fuzzer, r: pb.ExplainRequest) -> str:
    r.method = f.pick((*VALID_METHODS, "EXACT", " tree", "tree\n", "shap", "Kernel", "auto+tree",
                       "x" * 20_000))
    return f"method:{_clip(r.method, 12)}"


def m_inputs(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """Inputs dropped, duplicated, one extra, none at all, or only some named."""
    kind = f.pick(("drop", "duplicate", "extra", "none", "unname-one"))
    tensors = [pb.Tensor.FromString(t.SerializeToString()) for t in r.inputs]
    if kind == "drop" and tensors:
        tensors.pop(int(f.rng.integers(len(tensors))))
    elif kind == "duplicate" and tensors:
        tensors.append(tensors[int(f.rng.integers(len(tensors)))])
    elif kind == "extra":
        tensors.append(encode(f.pick(("extra", "")), f.rng.normal(size=(1, 3)), "FP32"))
    elif kind == "none":
        tensors = []
    elif tensors:
        tensors[0].name = ""
    r.ClearField("inputs")
    r.inputs.extend(tensors)
    return f"inputs:{kind}"


def m_rows(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """Batches of 0 rows, the most allowed (256), one more (257), or of different sizes."""
    spec = f.spec_of(r.model)
    if spec is None:
        return "rows:none"
    count = f.pick((0, 64, 256, 257))
    parts = spec.split(f.rows(spec, count))
    label = str(count)
    if len(parts) > 1 and f.rng.random() < 0.5:
        parts[1] = spec.split(f.rows(spec, count + 1))[1]
        label = "mismatched"
    r.ClearField("inputs")
    r.inputs.extend(encode(i.name, p, i.datatype) for i, p in zip(spec.inputs, parts,
                                                                   strict=True))
    return f"rows:{label}"


def p_data(f: Fuzzer, r: pb.PutBackgroundRequest) -> str:
    """A tensor mutation of the uploaded matrix (poison values, shapes, dtypes, bytes)."""
    return f.pick((*TENSOR_MUTATIONS, t_values, t_values))(f, r.data)


def p_feature_names(f: Fuzzer, r: pb.PutBackgroundRequest) -> str:
    """feature_names: one too many or too few, weird or 20 kB long."""
    spec = f.spec_of(r.model) or f.model()
    names = list(spec.features)
    kind = f.pick(("fewer", "more", "weird"))
    new = {"fewer": names[:-1], "more": [*names, "extra"],
           "weird": [f.weird() for _ in names]}[kind]
    r.ClearField("feature_names")
    r.feature_names.extend(new)
    return f"feature_names:{kind}"


def p_oversize(f: Fuzzer, r: pb.PutBackgroundRequest) -> str:
    """More rows than max_background_rows, more bytes than max_upload_bytes, or a message over
    the server's receive limit."""
    spec = f.spec_of(r.model) or f.model()
    d = len(spec.features)
    kind = f.pick(("rows", "rows", "bytes", "message"))
    if kind == "message":
        r.data.CopyFrom(pb.Tensor(name="data", datatype="FP64", shape=[1, d],
                                  raw=bytes(RECEIVE_LIMIT + 1)))
        return "oversize:message"
    rows = MAX_BACKGROUND_ROWS + 1 if kind == "rows" else UPLOAD_LIMIT // (8 * d) + 1
    r.data.CopyFrom(encode("data", f.rows(spec, rows), "FP64" if kind == "bytes" else "FP32"))
    return f"oversize:{kind}"


MUTATIONS: dict[str, tuple[Callable[..., str], ...]] = {
    "Explain": (m_input, m_input, m_input, m_string, m_budget, m_seed, m_target, m_target,
                m_accuracy, m_method, m_inputs, m_rows),
    "ListModels": (),
    "GetModel": (m_string,),
    "PutBackground": (p_data, p_data, p_data, p_data, m_string, m_string, p_feature_names,
                      p_oversize),
    "GetBackground": (m_string,),
    "ListBackgrounds": (m_string,),
    "DeleteBackground": (m_string,),
    "Check": (m_string,),
}


# --- wire garbage: bytes that are not (quite) a request of the RPC ----------------------------
def w_random(f: Fuzzer, rpc: str) -> tuple[str, bytes]:
    return "random", f.rng.bytes(int(f.rng.integers(1, 300)))


def w_truncated(f: Fuzzer, rpc: str) -> tuple[str, bytes]:
    """A valid request cut short (a byte or more missing)."""
    payload = f.garbled(rpc).SerializeToString()
    if len(payload) < 2:
        return "truncated-empty", payload + b"\x0a\x05ab"
    return "truncated", payload[:int(f.rng.integers(1, len(payload)))]


def w_other_type(f: Fuzzer, rpc: str) -> tuple[str, bytes]:
    """A valid request of another RPC, or a response message."""
    other = f.pick([r for r in RPCS if r != rpc])
    message = f.garbled(other) if f.rng.random() < 0.7 else _some_response(f)
    if rpc in ("PutBackground", "DeleteBackground") and hasattr(message, "model"):
        message.model = ABSENT_MODEL
    return f"other-type:{type(message).__name__}", message.SerializeToString()


def w_bitflip(f: Fuzzer, rpc: str) -> tuple[str, bytes]:
    payload = bytearray(f.garbled(rpc).SerializeToString() or b"\x0a\x01a")
    for _ in range(int(f.rng.integers(1, 9))):
        payload[int(f.rng.integers(len(payload)))] ^= 1 << int(f.rng.integers(8))
    return "bitflip", bytes(payload)


def w_encoding(f: Fuzzer, rpc: str) -> tuple[str, bytes]:
    """Invalid UTF-8 in field 1 (a string in every request), bad tags and varints, deep
    groups, an empty message, or bytes over the server's receive limit."""
    kind = f.pick(("bad-utf8", "bad-tag", "long-varint", "deep", "empty", "oversize"))
    payload = {"bad-utf8": b"\x0a\x04\xff\xfe\xc0\x80", "bad-tag": b"\x07\x00",
               "long-varint": b"\x38" + b"\xff" * 11, "deep": b"\x0b" * 300 + b"\x0c" * 300,
               "empty": b"", "oversize": b""}[kind]
    if kind == "oversize":
        payload = b"\x0a" + b"\xff\xff\xff\x01" + bytes(RECEIVE_LIMIT)
    return kind, payload + (f.garbled(rpc).SerializeToString() if kind == "bad-utf8" else b"")


def _some_response(f: Fuzzer) -> Message:
    return pb.ExplainResponse(model="m", rows=[pb.RowExplanation(
        attributions=f.rng.normal(size=5).tolist(), method="exact")], notes=["n"])


WIRE = (w_random, w_truncated, w_other_type, w_bitflip, w_encoding)


# --- running cases and checking answers -------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What came back: a status name (OK_NONFINITE and HANG are the harness's), its details,
    the time it took and the server's error log lines emitted meanwhile (one client only)."""

    case: Case
    status: str
    details: str
    seconds: float
    log: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return self.status in FAILING_STATUSES

    @property
    def key(self) -> str:
        """The failure class: RPC, status and message (the server's log line when known)."""
        message = re.sub(r"[0-9]+", "N", self.log[0] if self.log else self.details)
        return f"{self.case.rpc} {self.status}: {_clip(message, 160)}"

    def describe(self) -> str:
        log = f" | log: {' / '.join(self.log)}" if self.log else ""
        return f"{self.status}: {_clip(self.details, 200)}{log}\n    {self.case.describe()}"


def check_answer(rpc: str, answer: bytes) -> str | None:
    """Why an OK answer is wrong (unparseable, non-finite numbers), or None."""
    try:
        message = RESPONSES[rpc].FromString(answer)
    except DecodeError as err:
        return f"unparseable {RESPONSES[rpc].__name__}: {err}"
    return non_finite(message) if isinstance(message, pb.ExplainResponse) else None


def non_finite(r: pb.ExplainResponse) -> str | None:
    """The first non-finite number of an explanation (attributions, errors, base values,
    predictions, intervals, cost), or None."""
    for i, row in enumerate(r.rows):
        for name in ("attributions", "std_errors", "base_values", "predictions", "ci_low",
                     "ci_high"):
            values = np.asarray(getattr(row, name), dtype=np.float64)
            if not np.all(np.isfinite(values)):
                bad = sorted({str(v) for v in values[~np.isfinite(values)]})
                return f"rows[{i}].{name}: {', '.join(bad)} (method {row.method})"
    if not np.isfinite([r.cost.elapsed_ms, r.cost.budget_ms]).all():
        return f"cost: elapsed_ms {r.cost.elapsed_ms}, budget_ms {r.cost.budget_ms}"
    return None


def send(caller: grpc.UnaryUnaryMultiCallable, case: Case) -> Outcome:
    """One call with the case's timeout; a client deadline hit at TIMEOUT_S counts as a hang."""
    start = time.perf_counter()
    try:
        answer = caller(case.payload, timeout=case.timeout_s)
    except grpc.RpcError as err:
        seconds = time.perf_counter() - start
        status = err.code().name
        if status == "DEADLINE_EXCEEDED" and case.timeout_s >= TIMEOUT_S \
                and seconds >= 0.99 * TIMEOUT_S:
            status = "HANG"
        return Outcome(case, status, err.details() or "", seconds)
    seconds = time.perf_counter() - start
    problem = check_answer(case.rpc, answer)
    return Outcome(case, "OK" if problem is None else "OK_NONFINITE", problem or "", seconds)


class ServerLog(logging.Handler):
    """ERROR lines logged in this process (the in-process server logs every INTERNAL with the
    exception and where it was raised; grpc logs requests it could not deserialize)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.name}: {record.getMessage().splitlines()[0]}"
        if record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            line += f" ({type(err).__name__}: {_clip(str(err), 120)})"
        self.lines.append(_clip(line, 400))


@contextmanager
def server_log() -> Iterator[ServerLog]:
    handler = ServerLog()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


@dataclass
class Summary:
    """Status counts per RPC, every failing outcome, and the server's error log."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: list[Outcome] = field(default_factory=list)
    valid_ok: Counter[str] = field(default_factory=Counter)  # unmutated requests answered OK
    server_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, outcome: Outcome) -> None:
        self.counts[(outcome.case.rpc, outcome.status)] += 1
        if outcome.failed:
            self.failures.append(outcome)
        if outcome.status == "OK" and outcome.case.kind == "valid":
            self.valid_ok[outcome.case.rpc] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def statuses(self) -> list[str]:
        seen = {s for _, s in self.counts}
        return sorted(seen, key=lambda s: (s != "OK", s in FAILING_STATUSES, s))

    def table(self) -> str:
        """Markdown: one row per RPC, one column per status seen."""
        statuses = self.statuses()
        lines = [f"| RPC | requests | {' | '.join(statuses)} |",
                 f"|---|---:|{'---:|' * len(statuses)}"]
        for rpc in RPCS:
            row = [self.counts[(rpc, s)] for s in statuses]
            lines.append(f"| {rpc} | {sum(row):,} | {' | '.join(f'{n:,}' for n in row)} |")
        totals = [sum(self.counts[(r, s)] for r in RPCS) for s in statuses]
        lines.append(f"| all | {self.total:,} | {' | '.join(f'{n:,}' for n in totals)} |")
        return "\n".join(lines)

    def classes(self) -> list[tuple[int, str, Counter[str], Outcome]]:
        """Failures grouped by RPC, status and message (numbers blanked), most frequent first:
        (count, class, the mutations seen in it, its first outcome)."""
        sizes: Counter[str] = Counter()
        kinds: dict[str, Counter[str]] = {}
        first: dict[str, Outcome] = {}
        for o in self.failures:
            sizes[o.key] += 1
            kinds.setdefault(o.key, Counter()).update(o.case.kind.split("|"))
            first.setdefault(o.key, o)
        return [(n, key, kinds[key], first[key]) for key, n in sizes.most_common()]

    def report(self, limit: int = 15) -> str:
        """What failed, compactly: each class with its mutations and its first request, then
        the server's error log lines (one per INTERNAL raised in the servicer)."""
        lines = [f"{len(self.failures)} failing answers of {self.total}:"]
        for n, key, kinds, example in self.classes()[:limit]:
            lines += [f"  {n} x {key}  [{_top(kinds)}]", f"      e.g. {example.case.describe()}"]
        lines += ["server error log:"] + [f"  {n} x {e}" for e, n in
                                          self.error_lines().most_common(limit)]
        return "\n".join(lines)

    def error_lines(self) -> Counter[str]:
        """The server's error log lines with numbers and quoted names blanked, counted."""
        return Counter(re.sub(r"[0-9]+", "N", re.sub(r"'[^']*'", "'.'", e))
                       for e in self.server_errors)


def _top(kinds: Counter[str], n: int = 4) -> str:
    return ", ".join(f"{k} {c}" for k, c in kinds.most_common(n))


def run(channel: grpc.Channel, cases: Iterator[Case], workers: int = 4) -> Summary:
    """Send every case from `workers` client threads; with one client, each outcome carries
    the server error lines logged during its call."""
    callers = {rpc: channel.unary_unary(method_path(rpc)) for rpc in RPCS}
    summary, lock = Summary(), threading.Lock()

    def client(log: ServerLog) -> None:
        while True:
            with lock:
                case = next(cases, None)
            if case is None:
                return
            mark = len(log.lines)
            outcome = send(callers[case.rpc], case)
            if workers == 1:
                outcome = replace(outcome, log=tuple(log.lines[mark:]))
            with lock:
                summary.add(outcome)

    start = time.perf_counter()
    with server_log() as log, ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(client, log) for _ in range(workers)]:
            done.result()
        summary.server_errors = list(log.lines)
    summary.seconds = time.perf_counter() - start
    return summary


# --- after the run ----------------------------------------------------------------------------
def health(channel: grpc.Channel) -> dict[str, str]:
    """The health status of the server as a whole and of the Explainer service."""
    stub = health_pb2_grpc.HealthStub(channel)
    return {name or "(server)": health_pb2.HealthCheckResponse.ServingStatus.Name(
        stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT_S).status)
        for name in ("", SERVICE)}


def default_backgrounds(stub: pb_grpc.ExplainerStub, specs: Sequence[ModelSpec]) -> dict[str, str]:
    """Each model's `default` background sha256 (or the status that prevented reading it)."""
    return {s.name: _sha(stub, s.name) for s in specs}


def _sha(stub: pb_grpc.ExplainerStub, model: str) -> str:
    try:
        return str(stub.GetBackground(pb.GetBackgroundRequest(model=model, name="default"),
                                      timeout=TIMEOUT_S).sha256)
    except grpc.RpcError as err:
        return f"{err.code().name}: {err.details()}"


def ordinary_explain(stub: pb_grpc.ExplainerStub, spec: ModelSpec) -> str:
    """'OK' when an ordinary request (two background rows, 100 ms) gets a finite answer."""
    request = pb.ExplainRequest(model=spec.name, budget_ms=100.0, seed=1, inputs=[
        encode(i.name, part, i.datatype) for i, part in zip(spec.inputs, spec.split(
            spec.rows[:2]), strict=True)])
    try:
        answer = stub.Explain(request, timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        return f"{err.code().name}: {err.details()}"
    return non_finite(answer) or ("OK" if len(answer.rows) == 2 else f"{len(answer.rows)} rows")

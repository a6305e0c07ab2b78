"""The generator: a seeded `numpy.random.Generator` draws, per case, an RPC (by its weight),
then a valid request of it, a mutation of one, or wire garbage; streamed RPCs also get client
cancellations. What is valid and how it is mutated is each service's (explainer.py, layers.py,
datasets.py); the tensor and name mutations shared by all of them are here."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import Message

from explainers.base import Array
from service.api.tensors import CONTENTS_FIELD, from_array
from service.models.onnx_model import OIP_TO_NUMPY
from sidelight.v1 import explainer_pb2 as pb
from tests.fuzzing.models import ModelSpec

T = TypeVar("T")
Request = Any  # a request message, or for a bidi stream the list of messages sent
Mutation = Callable[..., str]  # (fuzzer, request) -> label; changes the request in place

TIMEOUT_S = 10.0  # a call still unanswered after this long is counted as a hang
SHORT_TIMEOUTS_S = (0.001, 0.01, 0.05, 0.2)  # deadline-only calls and unbounded budgets
UPLOAD_LIMIT = 1 << 20  # SIDELIGHT_MAX_UPLOAD_BYTES of the fuzzed server (small: cheap oversize)
RECEIVE_LIMIT = UPLOAD_LIMIT + (1 << 20)  # the server's gRPC receive limit for that setting
MAX_BACKGROUND_ROWS = 2000  # SIDELIGHT_MAX_BACKGROUND_ROWS of the fuzzed server
UPLOADS_PER_CLIENT = 1000  # the fuzz clients' uploads get through (10,000 cases: ~1,100)
SETTINGS = {"max_upload_bytes": UPLOAD_LIMIT, "max_background_rows": MAX_BACKGROUND_ROWS,
            "uploads_per_client": UPLOADS_PER_CLIENT,
            "metrics_port": -1}  # overrides for tests.conftest.settings_for
WIRE_SHARE = 0.12  # share of requests that are wire garbage rather than a message
VALID_SHARE = 0.25  # share of message requests sent unmutated
CANCEL_SHARE = 0.1  # share of streamed calls the client cancels
CANCEL_AFTER_S = (0.0, 0.002, 0.01, 0.05)  # when it cancels
POOL = tuple(f"fuzz-{i}" for i in range(6))  # names of uploaded backgrounds (bounded storage)
PROTECTED = ("", "default")  # never written or deleted: the run checks `default` survives
ABSENT_MODEL = "fuzz-absent-model"  # the model of garbled writes (a garbled name may read as "")

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
ODD_FLOATS = (float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e-300, 1e308, 5e-324,
              -5e-324, 1e-3, 1e6, -1e308)
INT32_EXTREMES = (2**31 - 1, -(2**31), -1, 0, 2, 3, 1000)
INT64_EXTREMES = (-1, 0, 1, 2, 3, 2**63 - 1, -(2**63), 10**12)


def weird_names(rng: np.random.Generator) -> list[str]:
    """Names no server should choke on: empty, unicode, 20 kB, path separators, control bytes."""
    printable = "".join(chr(c) for c in rng.integers(32, 127, int(rng.integers(1, 80))))
    return ["", " ", "a" * 20_000, "é" * 10_000, "模型", "😀" * 50, "../../etc/passwd", "a/b",
            "a\\b", "/", "..", ".", "name\x00", "\n", "\t", "%s%n%x", "{}", "*", "sidelight:v1:*",
            "x" * 64, "x" * 65, "default", "DEFAULT", "default ", "default/../default",
            "\u202edefault", "\ufeff", printable, "1", "0", "-1", "999999999999999999999"]


@dataclass(frozen=True)
class Rpc:
    """One RPC the fuzzer calls: its method, answer type and share of the cases, its valid
    requests and their mutations. `streaming`: "unary", "server" (a stream of answers) or
    "bidi" (valid requests are lists of messages); `message_limit`: the bytes an answer
    message may take (a stream's contract); `writes`: garbled requests must name no real model
    (a cut-off name can read as `default`)."""

    name: str
    path: str
    response: type[Message]
    weight: float
    valid: Callable[[Fuzzer], Request]
    mutations: tuple[Mutation, ...] = ()
    streaming: str = "unary"
    timeout: Callable[[Fuzzer, Request], float] | None = None
    writes: bool = False
    message_limit: int | None = None

    @property
    def service(self) -> str:
        return self.path.split("/")[1]


@dataclass(frozen=True)
class Case:
    """One call: the RPC, what was done to it, the messages' bytes (one unless a bidi stream),
    the client's timeout, and for streams whether and when the client cancels and whether it
    keeps its side open until then."""

    rpc: str
    kind: str
    payloads: tuple[bytes, ...]
    messages: tuple[Message, ...] = ()  # none for wire garbage
    timeout_s: float = TIMEOUT_S
    cancel_s: float | None = None
    hold_open: bool = False

    @property
    def payload(self) -> bytes:
        return self.payloads[0]

    def describe(self, width: int = 300) -> str:
        """One line: RPC, mutation and the request (text format, or hex for garbage)."""
        if self.messages:
            body = " / ".join(compact(text_format.MessageToString(m, as_one_line=True))
                              for m in self.messages)
        else:
            body = " / ".join(f"{len(p)} bytes {p[:48].hex()}" for p in self.payloads)
        cancel = "" if self.cancel_s is None else f" cancel={self.cancel_s}s"
        return f"{self.rpc} [{self.kind}] timeout={self.timeout_s}s{cancel} {clip(body, width)}"


def compact(text: str) -> str:
    """A text-format request made short: quoted strings (names, raw bytes) clipped to 40
    characters, and runs of typed contents values to their first two."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: clip(m.group(0), 40), text)
    return re.sub(r"((\w+_contents): \S+ \2: \S+ )(?:\2: \S+ )+", r"\1... ", text)


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} chars)"


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


def decoded(t: pb.Tensor) -> Array:
    """A tensor's values; KeyError, ValueError or TypeError when it does not decode."""
    datatype = t.datatype.upper()
    dtype = np.dtype(OIP_TO_NUMPY[datatype]).newbyteorder("<")
    flat = np.frombuffer(t.raw, dtype=dtype) if t.raw else np.asarray(
        getattr(t.contents, CONTENTS_FIELD[datatype]), dtype=dtype)
    return flat.reshape([int(d) for d in t.shape])


def values_of(t: pb.Tensor) -> Array:
    """A tensor's values when it decodes on the client, else a few ones (mutations still apply)."""
    try:
        return decoded(t)
    except (KeyError, ValueError, TypeError):
        return np.ones((1, 4))


class Fuzzer:
    """Draws cases from one seeded generator: valid requests, mutations of them, wire garbage,
    cancellations. The i-th case depends only on the RPCs, the seed and i (draw in order)."""

    def __init__(self, specs: Sequence[ModelSpec], seed: int, rpcs: Sequence[Rpc]) -> None:
        self.specs = list(specs)
        self.rng = np.random.default_rng(seed)
        self.rpcs = {r.name: r for r in rpcs}
        weights = np.array([r.weight for r in rpcs], dtype=np.float64)
        self._names, self._p = [r.name for r in rpcs], weights / weights.sum()

    def cases(self, count: int) -> Iterator[Case]:
        """`count` cases, drawn lazily (uploads can be megabytes: never hold them all)."""
        return (self.case() for _ in range(count))

    def case(self) -> Case:
        rpc = self.rpcs[str(self.rng.choice(self._names, p=self._p))]
        if self.rng.random() < WIRE_SHARE:
            kind, payloads = self.garbage(rpc)
            return self.cancelled(Case(rpc.name, f"wire:{kind}", payloads))
        kind, request = self.mutated(rpc)
        messages = tuple(request) if rpc.streaming == "bidi" else (request,)
        timeout = rpc.timeout(self, request) if rpc.timeout else TIMEOUT_S
        return self.cancelled(Case(rpc.name, kind, tuple(m.SerializeToString() for m in messages),
                                   messages, timeout))

    def garbage(self, rpc: Rpc) -> tuple[str, tuple[bytes, ...]]:
        """Wire garbage: the whole request, or one message of a bidi stream (first, last or
        in the middle) with the others valid."""
        kind, payload = self.pick(WIRE)(self, rpc.name)
        if rpc.streaming != "bidi":
            return kind, (payload,)
        stream = [m.SerializeToString() for m in self.garbled(rpc.name, whole=True)]
        at = int(self.rng.integers(len(stream) + 1))
        return f"{kind}@{at}", (*stream[:at], payload, *stream[at + 1:])

    def cancelled(self, case: Case) -> Case:
        """A streamed call the client may cancel, sometimes with its side still open."""
        if self.rpcs[case.rpc].streaming == "unary" or self.rng.random() >= CANCEL_SHARE:
            return case
        hold = self.rpcs[case.rpc].streaming == "bidi" and self.rng.random() < 0.5
        kind = f"{case.kind}|cancel{'-open' if hold else ''}"
        return Case(case.rpc, kind, case.payloads, case.messages, case.timeout_s,
                    self.pick(CANCEL_AFTER_S), hold)

    # --- small draws --------------------------------------------------------------------------
    def pick(self, options: Sequence[T]) -> T:
        return options[int(self.rng.integers(len(options)))]

    def some(self, options: Sequence[T], low: int, high: int) -> list[T]:
        """low to high of `options` (with repeats), in random order."""
        count = int(self.rng.integers(low, high + 1))
        return [self.pick(options) for _ in range(count)] if options else []

    def weird(self, protect: bool = False) -> str:
        """A weird name; never a PROTECTED one when `protect` (uploads and deletes)."""
        return self.pick([n for n in weird_names(self.rng) if not (protect and n in PROTECTED)])

    def model(self, where: Callable[[ModelSpec], bool] | None = None) -> ModelSpec:
        """A model (one `where` holds when some model does)."""
        fit = [s for s in self.specs if where is None or where(s)]
        return self.pick(fit or self.specs)

    def version(self, spec: ModelSpec) -> str:
        return self.pick(("", spec.version))

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

    # --- requests -----------------------------------------------------------------------------
    def mutated(self, rpc: Rpc) -> tuple[str, Request]:
        """A valid request of `rpc`, sent as is or with 1-3 mutations; (kind, request)."""
        request = rpc.valid(self)
        if not rpc.mutations or self.rng.random() < VALID_SHARE:
            return "valid", request
        labels = [self.pick(rpc.mutations)(self, request)
                  for _ in range(self.pick((1, 1, 1, 2, 3)))]
        return "|".join(labels), request

    def garbled(self, rpc: str, whole: bool = False) -> Any:
        """A valid request to garble (a bidi stream's first message unless `whole`). Writes
        name no real model: cut short or with a flipped tag, their background name can
        vanish, and "" means `default`."""
        request = self.rpcs[rpc].valid(self)
        if self.rpcs[rpc].writes:
            request.model = ABSENT_MODEL
        if self.rpcs[rpc].streaming == "bidi" and not whole:
            return request[0]
        return request


# --- tensor mutations (inputs, starts, uploads); each returns its label -----------------------
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
    t.shape.extend(min(max(int(d), -(2**63)), 2**63 - 1) for d in new)  # int64 on the wire
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
    with np.errstate(invalid="ignore"):
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


# --- request mutations shared by the services -------------------------------------------------
def m_string(f: Fuzzer, message: Message) -> str:
    """One string field (model, version, name, method, background, service...) set to a weird
    name; a background `name` of an upload or a delete is never `default` or empty."""
    fields = [d.name for d in message.DESCRIPTOR.fields
              if d.type == d.TYPE_STRING and not d.is_repeated]
    which = f.pick(fields)
    protect = which == "name" and isinstance(message, pb.PutBackgroundRequest
                                             | pb.DeleteBackgroundRequest)
    setattr(message, which, f.weird(protect))
    return f"name:{which}"


def mutate_tensors(f: Fuzzer, tensors: Any, field: str) -> str:
    """A tensor mutation on one of `tensors` (a repeated Tensor field; one is added when it is
    empty), or its name made weird."""
    if not tensors:
        tensors.append(encode("input", f.rng.normal(size=(1, 4)), "FP32"))
    tensor = tensors[int(f.rng.integers(len(tensors)))]
    if f.rng.random() < 0.15:
        tensor.name = f.weird()
        return f"name:{field}"
    return f.pick(TENSOR_MUTATIONS)(f, tensor)


def regroup(f: Fuzzer, tensors: Any) -> str:
    """Tensors dropped, duplicated, one extra, none at all, or only some named (in place)."""
    kind = f.pick(("drop", "duplicate", "extra", "none", "unname-one"))
    copies = [pb.Tensor.FromString(t.SerializeToString()) for t in tensors]
    if kind == "drop" and copies:
        copies.pop(int(f.rng.integers(len(copies))))
    elif kind == "duplicate" and copies:
        copies.append(copies[int(f.rng.integers(len(copies)))])
    elif kind == "extra":
        copies.append(encode(f.pick(("extra", "")), f.rng.normal(size=(1, 3)), "FP32"))
    elif kind == "none":
        copies = []
    elif copies:
        copies[0].name = ""
    del tensors[:]
    tensors.extend(copies)
    return kind


def resized(f: Fuzzer, model: str, tensors: Any, counts: Sequence[int]) -> str:
    """The model's inputs replaced by a batch of one of `counts` rows, or (for a model with
    several inputs, half the time) inputs of different batch sizes; the label."""
    spec = f.spec_of(model)
    if spec is None:
        return "none"
    count = f.pick(counts)
    parts = spec.split(f.rows(spec, count))
    label = str(count)
    if len(parts) > 1 and f.rng.random() < 0.5:
        parts[1] = spec.split(f.rows(spec, count + 1))[1]
        label = "mismatched"
    del tensors[:]
    tensors.extend(encode(i.name, p, i.datatype) for i, p in zip(spec.inputs, parts,
                                                                 strict=True))
    return label


def short_unless_bounded(f: Fuzzer, budget_ms: float) -> float:
    """A short timeout when the server takes its budget from the deadline (budget 0, or not a
    small positive number); else long enough that only a hang reaches it."""
    return TIMEOUT_S if 0 < budget_ms <= 1000 else f.pick(SHORT_TIMEOUTS_S)


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
    other = f.pick([r for r in f.rpcs if r != rpc] or [rpc])
    message = f.garbled(other) if f.rng.random() < 0.7 else _some_response(f)
    if f.rpcs[rpc].writes and hasattr(message, "model"):
        message.model = ABSENT_MODEL
    return f"other-type:{type(message).__name__}", message.SerializeToString()


def w_bitflip(f: Fuzzer, rpc: str) -> tuple[str, bytes]:
    payload = bytearray(f.garbled(rpc).SerializeToString() or b"\x0a\x01a")
    for _ in range(int(f.rng.integers(1, 9))):
        payload[int(f.rng.integers(len(payload)))] ^= 1 << int(f.rng.integers(8))
    return "bitflip", bytes(payload)


def w_encoding(f: Fuzzer, rpc: str) -> tuple[str, bytes]:
    """Invalid UTF-8 in field 1 (a string or a message in every request), bad tags and
    varints, deep groups, an empty message, or bytes over the server's receive limit."""
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

"""The model adapter: one onnxruntime session per model version, seen as a flat function of a
(rows, elements) matrix (service/models/inputs.py lays N-d inputs out flat). Handles dtypes,
several inputs, ZipMap outputs and bounded chunks."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from explainers.base import Array
from explainers.errors import FailedPrecondition, InvalidArgument, clip, quoted
from service.models.graph import discrete_inputs, has_trees, precision
from service.models.inputs import Layout, TensorInfo
from service.models.margins import margin_graph

ONNX_TO_OIP = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}
OIP_TO_NUMPY: dict[str, type] = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8,
    "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
    "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "BOOL": np.bool_,
}
PROBE_BATCHES = (64, 256, 1024, 4096, 16384)
MEASURE_REPEATS = 3  # timings per probe batch size; the fastest counts
MEASURE_TOLERANCE = 0.05  # prefer a larger batch whose rate is within 5% of the best
# What a model call costs its caller beyond _run (evaluator, target column and scale, building
# the masked batch's planes; measured 30-50 us): counted when the batch size is chosen, so a
# model whose rate is flat (trees) does not get 64-row calls that double its cost per row.
CALLER_OVERHEAD_S = 4e-5
ORT_MESSAGE_CHARS = 300
ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
ORT_NODE = re.compile(r"Non-zero status code returned while running (\w+) node\. "
                      r"Name:'([^']*)' Status Message: (?:\S+:\d+ .*? was false\. )?")


def _info(arg: ort.NodeArg) -> TensorInfo:
    dims = tuple(d if isinstance(d, int) else -1 for d in (arg.shape or []))
    return TensorInfo(arg.name, ONNX_TO_OIP.get(arg.type, arg.type), dims)


def strip_zipmap(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """Replace each ZipMap (a list of dicts per row) by an Identity on its float input.

    The output keeps its name, so configs written for the converted model still apply, and
    onnxruntime returns a [rows, classes] tensor instead of Python dicts. Returns the class
    labels per output.
    """
    labels: dict[str, list[str]] = {}
    graph = model.graph
    for i, node in enumerate(graph.node):
        if node.op_type != "ZipMap":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        names = attrs.get("classlabels_strings") or attrs.get("classlabels_int64s") or []
        labels[node.output[0]] = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        graph.node[i].CopyFrom(helper.make_node("Identity", [node.input[0]], [node.output[0]]))
        for out in graph.output:
            if out.name == node.output[0]:
                out.CopyFrom(helper.make_tensor_value_info(out.name, TensorProto.FLOAT,
                                                           ["N", len(names)]))
    return model, labels


def _session(proto: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads that logs nothing itself: what fails is
    raised, and mapped or logged once by the caller (a bad request must not print a line)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _logit_matches(p: Array, margin: Array, tol: float = 1e-2) -> bool:
    """logit(p) == margin wherever p is far enough from 0 and 1 to invert in float32."""
    ok = (p > 1e-4) & (p < 1 - 1e-4)  # (rows, columns)
    if p.shape != margin.shape or not ok.any():
        return False
    logit = np.log(p[ok]) - np.log1p(-p[ok])
    return bool(np.all(np.abs(logit - margin[ok]) <= tol * np.maximum(1.0, np.abs(logit))))


class OnnxModel:
    """A loaded ONNX model: every input's elements concatenated into one flat axis.

    `layout` is how requests and backgrounds are laid out unless they say otherwise: fixed by
    the graph when every element axis is static, else taken from the background file's shape
    (`adopt_layout`) or 16 per symbolic axis. Requests of another shape pass their own layout.
    """

    def __init__(self, path: Path, threads: int = 1) -> None:
        raw = path.read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.proto, self.class_labels = strip_zipmap(onnx.load_from_string(raw))
        self.session = _session(self.proto, threads)
        margin = margin_graph(self.proto)
        self.margin_outputs = margin.outputs if margin else {}  # output -> its post_transform
        self._margin_session = _session(margin.proto, threads) if margin else None
        self.logit_is_margin: frozenset[str] = frozenset()  # set by check_margins
        self.inputs = [_info(a) for a in self.session.get_inputs()]
        self.outputs = [_info(a) for a in self.session.get_outputs()]
        self.discrete_inputs = discrete_inputs(self.proto)  # name -> why it takes only ids
        self.precision = precision(self.proto)  # FP16, FP32 or FP64: the outputs' rounding
        self.has_trees = has_trees(self.proto)  # feed permutation paths one after the other
        self._check_inputs()
        self.layout = Layout.static_of(self.inputs)
        self.chunk_rows = 4096
        self.rows_per_second = 1e5
        self.wall_factors: dict[str, float] = {}  # per method, learned (plane/rows.py)
        self._columns: dict[str, int] = {}

    @property
    def batch_dtype(self) -> type:
        """float32 when every input is FP32 (masked batches are then built without a cast)."""
        return np.float32 if all(i.datatype == "FP32" for i in self.inputs) else np.float64

    @property
    def n_features(self) -> int:
        """Elements of a row in the default layout (features of a table)."""
        return self.layout.elements

    @property
    def static(self) -> bool:
        """Whether every input's element shape is fixed by the graph."""
        return all(i.static for i in self.inputs)

    def adopt_layout(self, layout: Layout) -> None:
        """Make `layout` the default (a background's row shape, for symbolic axes)."""
        self.layout = layout
        self._columns.clear()

    def _check_inputs(self) -> None:
        for i in self.inputs:
            if len(i.shape) < 1 or i.datatype not in OIP_TO_NUMPY:
                raise FailedPrecondition(
                    f"input {i.name!r} is {i.datatype}{list(i.shape)}: explainers need numeric "
                    "inputs with a batch axis first")

    def main_output(self) -> str:
        """The first floating-point output (probabilities for converted classifiers)."""
        for o in self.outputs:
            if o.datatype in ("FP32", "FP64", "FP16"):
                return o.name
        raise FailedPrecondition("model has no floating-point output to explain")

    def output_info(self, name: str) -> TensorInfo:
        for o in self.outputs:
            if o.name == name:
                return o
        known = ", ".join(o.name for o in self.outputs)
        raise InvalidArgument(f"target.output: model has no output {quoted(name)}; outputs: "
                              f"{known}")

    def output_columns(self, output: str) -> int:
        """Number of columns of an output, from a one-row probe (shapes are often dynamic)."""
        if output not in self._columns:
            self._columns[output] = self._run(np.zeros((1, self.n_features)), output).shape[1]
        return self._columns[output]

    def predict(self, X: Array, output: str, margin: bool = False,
                layout: Layout | None = None) -> Array:
        """Output `output` for X (rows, elements) as float64 (rows, columns), chunked; with
        `margin`, the scores before the link op's post_transform (see service.models.margins).
        `layout`: how X's elements form the inputs (default: the model's)."""
        step = self.chunk_rows
        parts = [self._run(X[i:i + step], output, margin, layout)
                 for i in range(0, X.shape[0], step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def check_margins(self, probe: Array) -> None:
        """Record the LOGISTIC outputs whose margin equals logit(output) on unsaturated probe
        values, so the logit scale can be read off the margin exactly."""
        verified = set()
        for output, transform in self.margin_outputs.items():
            if transform == "LOGISTIC" and _logit_matches(self.predict(probe, output),
                                                          self.predict(probe, output, True)):
                verified.add(output)
        self.logit_is_margin = frozenset(verified)

    def _run(self, X: Array, output: str, margin: bool = False,
             layout: Layout | None = None) -> Array:
        feeds = (layout or self.layout).feeds(X)
        session = self._margin_session if margin and self._margin_session else self.session
        try:
            y = np.asarray(session.run([output], feeds)[0], dtype=np.float64)
        except (OrtInvalidArgument, OrtFail) as err:
            mapped = _caller_error(err)
            if mapped is None:
                raise
            raise mapped from None
        return y.reshape(X.shape[0], -1)  # (rows, columns)

    def measure(self, probe: Array, output: str, seconds: float = 0.3) -> None:
        """Find the batch size with the best rows/second here; remember both.

        Each size is timed a few times (the fastest counts: a single call is at the mercy of
        the scheduler), and the largest size within MEASURE_TOLERANCE of the best rate, counting
        the caller's own cost per call, wins: fewer, larger calls cost less per row in the
        Python around the session. rows_per_second is the session's own rate at that size.
        """
        times: dict[int, float] = {}
        deadline = time.monotonic() + seconds
        for batch in PROBE_BATCHES:
            X = probe[np.arange(batch) % probe.shape[0]]  # (batch, features)
            self._run(X, output)  # warm-up
            times[batch] = min(self._timed_run(X, output) for _ in range(MEASURE_REPEATS))
            if time.monotonic() > deadline:
                break
        seen = {b: b / (t + CALLER_OVERHEAD_S) for b, t in times.items()}  # as estimators see it
        best = max(seen.values())
        self.chunk_rows = max(b for b, r in seen.items() if r >= (1 - MEASURE_TOLERANCE) * best)
        self.rows_per_second = self.chunk_rows / times[self.chunk_rows]

    def _timed_run(self, X: Array, output: str) -> float:
        start = time.perf_counter()
        self._run(X, output)
        return max(time.perf_counter() - start, 1e-9)


def _caller_error(err: Exception) -> InvalidArgument | None:
    """onnxruntime's refusal of the values it was given, as INVALID_ARGUMENT naming `inputs`.

    The adapter always feeds the declared ranks and dtypes, so onnxruntime's INVALID_ARGUMENT
    (a Gather index out of range, an invalid Expand shape) and a node that FAILs on the values
    (a Reshape to a shape read from them) come from the request's values: the model ran on
    its background at load. A failed allocation, or a FAIL outside a node, stays the server's.
    """
    text = ORT_PREFIX.sub("", str(err).strip())
    node = ORT_NODE.search(text)
    if isinstance(err, OrtFail) and (node is None or "allocate" in text):
        return None
    if node is not None:
        text = f"{node.group(1)} node {node.group(2)!r}: {text[node.end():]}"
    return InvalidArgument(f"inputs: the model cannot evaluate these values: "
                           f"{clip(text, ORT_MESSAGE_CHARS)}")

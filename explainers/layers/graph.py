"""The inspectable tensors of an ONNX graph, and copies that expose some of them as outputs.

`tensors` lists every node output of the main graph (Constant nodes excluded: their values
are weights, see `weights.py`) with its producer, dtype and static shape from shape inference
with the batch pinned; the batch axis is the one whose size doubles when the pinned batch goes
from 1 to 2. `Exposed` is a pruned copy whose outputs are exactly the named tensors, and its
onnxruntime session: exposing intermediates can stop onnxruntime fusing ops (field notes,
"Gradients of ONNX graphs"), so the model's own session is left alone and the caller caches
Exposed copies per (model, names). Tensors inside If/Loop/Scan bodies are not listed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TypeProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from explainers.base import Array
from explainers.errors import InvalidArgument, clip, quoted
from explainers.gradients import backend, graphs

ORT_MESSAGE_CHARS = 300
MAX_NAMES = 256  # tensors exposed by one copy


@dataclass(frozen=True)
class TensorInfo:
    """One node output: what a user picks a layer by."""

    name: str  # the tensor's name (what the other functions take)
    node: str  # the producing node's name ("" when the node is unnamed)
    op_type: str  # "Conv"; prefixed by its domain outside the default one: "com.microsoft.X"
    shape: tuple[int, ...] | None  # at batch 1; -1 = size unknown; None = rank unknown
    dtype: str  # numpy's name ("float32"); "" when inference cannot tell
    batch_axis: int | None  # the axis that follows the batch; None when none does

    @property
    def row_bytes(self) -> int | None:
        """Bytes per input row when the batch axis leads and every other size is known."""
        if self.batch_axis != 0 or self.shape is None or not self.dtype:
            return None
        if any(d < 0 for d in self.shape[1:]):
            return None
        return math.prod(self.shape[1:]) * np.dtype(self.dtype).itemsize


def tensors(model: onnx.ModelProto,
            shapes: dict[str, tuple[int, ...]] | None = None) -> list[TensorInfo]:
    """Every node output of the main graph in node order, Constant nodes excluded. `shapes`
    (input name -> per-row shape) pins the inputs' other symbolic sizes (a sequence length)."""
    one, two = _inferred(model, 1, shapes), _inferred(model, 2, shapes)
    out = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in graphs.DEFAULT_DOMAINS:
            continue
        for name in node.output:
            if name:
                first = _dims(one.get(name))
                out.append(TensorInfo(name, node.name, op_name(node), first,
                                      _dtype(one.get(name) or two.get(name)),
                                      _batch_axis(first, _dims(two.get(name)))))
    return out


def op_name(node: onnx.NodeProto) -> str:
    """The op type, prefixed by its domain when that is not the default one."""
    return node.op_type if node.domain in graphs.DEFAULT_DOMAINS else \
        f"{node.domain}.{node.op_type}"


def pin_batch(model: onnx.ModelProto, batch: int,
              shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """Every graph input's leading size set to `batch` where it is symbolic (all sizes, when
    `shapes` gives the input's per-row shape); stale inferred shapes are dropped."""
    fixed = {i.name: (batch, *shapes[i.name]) for i in model.graph.input
             if shapes and i.name in shapes}
    out = graphs.pin(model, fixed)
    for value in out.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in fixed and len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    return out


def _inferred(model: onnx.ModelProto, batch: int,
              shapes: dict[str, tuple[int, ...]] | None) -> dict[str, TypeProto]:
    """Types of the tensors with the batch pinned; what the model declares when inference
    fails (a custom op, an invalid graph)."""
    pinned = pin_batch(model, batch, shapes)
    with contextlib.suppress(Exception):  # onnx raises assorted errors on odd graphs
        pinned = graphs.infer(pinned)
    return graphs.types(pinned)


def _dims(kind: TypeProto | None) -> tuple[int, ...] | None:
    """The sizes (-1 where unknown), or None when the rank is unknown."""
    if kind is None or not kind.HasField("tensor_type") or \
            not kind.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else -1
                 for d in kind.tensor_type.shape.dim)


def _dtype(kind: TypeProto | None) -> str:
    """numpy's name for the element type; "" when unknown."""
    if kind is None or not kind.HasField("tensor_type") or not kind.tensor_type.elem_type:
        return ""
    return np.dtype(helper.tensor_dtype_to_np_dtype(kind.tensor_type.elem_type)).name


def _batch_axis(one: tuple[int, ...] | None, two: tuple[int, ...] | None) -> int | None:
    """The first axis whose size doubles from batch 1 to batch 2 (heads folded into the
    batch, (N * heads, ...), count: that axis is still N-major)."""
    if one is None or two is None or len(one) != len(two):
        return None
    return next((i for i, (a, b) in enumerate(zip(one, two, strict=True))
                 if a > 0 and b == 2 * a), None)


def check_names(model: onnx.ModelProto, names: Sequence[str], field: str = "layers"
                ) -> tuple[str, ...]:
    """The names once each, in order; InvalidArgument naming the field for a name that no
    node of the main graph outputs."""
    if not names:
        raise InvalidArgument(f"{field}: name at least one tensor; see ListLayers")
    unique = tuple(dict.fromkeys(names))
    if len(unique) > MAX_NAMES:
        raise InvalidArgument(f"{field}: {len(unique)} tensors; at most {MAX_NAMES} at once")
    known = graphs.producers(model.graph)
    for name in unique:
        if name not in known:
            raise InvalidArgument(f"{field}: no tensor {quoted(name)}; see ListLayers")
    return unique


def exposed(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy whose outputs are exactly the named tensors (once each), pruned to the nodes
    they need; their element types come from shape inference (a bool mask stays bool)."""
    unique = check_names(model, names)
    typed = model
    with contextlib.suppress(Exception):  # onnx raises assorted errors on odd graphs
        typed = graphs.infer(model)
    out = graphs.prune(graphs.with_outputs(typed, unique))
    out.graph.ClearField("value_info")  # inferred for the whole graph; only outputs matter
    return out


class Exposed:
    """An exposed copy (`exposed`) with its session and the listed infos of its tensors; build
    once per (model, names) and reuse."""

    def __init__(self, model: onnx.ModelProto, names: Sequence[str],
                 infos: Sequence[TensorInfo] | None = None) -> None:
        self.names = check_names(model, names)
        listed = {i.name: i for i in (tensors(model) if infos is None else infos)}
        self.infos = {n: listed.get(n, TensorInfo(n, "", "", None, "", None))
                      for n in self.names}
        self.model = exposed(model, self.names)
        self.session = backend.session(self.model)
        self.inputs = tuple(i.name for i in self.session.get_inputs())

    @property
    def nbytes(self) -> int:
        """Serialized size of the copy (for a cache's byte bound)."""
        return int(self.model.ByteSize())

    def row_bytes(self) -> int | None:
        """Bytes the exposed tensors take per input row, when every shape is static."""
        sizes = [i.row_bytes for i in self.infos.values()]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s)

    def run(self, feeds: dict[str, Array]) -> dict[str, Array]:
        """The named tensors' values for the fed rows."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise InvalidArgument(f"inputs: missing {', '.join(map(quoted, missing))}")
        try:
            got = self.session.run(list(self.names), {n: feeds[n] for n in self.inputs})
        except (OrtInvalidArgument, OrtFail) as err:
            raise InvalidArgument("inputs: onnxruntime cannot evaluate the tensors on these "
                                  f"values: {clip(str(err), ORT_MESSAGE_CHARS)}") from None
        return dict(zip(self.names, got, strict=True))


def rows_of(feeds: dict[str, Array]) -> int:
    """The number of fed rows (the leading size of the first feed)."""
    first = next(iter(feeds.values()), None)
    if first is None or np.ndim(first) == 0:
        raise InvalidArgument("inputs: no rows")
    return int(first.shape[0])

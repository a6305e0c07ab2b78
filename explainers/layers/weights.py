"""Weight maps: statistics of each parameter tensor of a graph, read from its constants, and
the nodes that use it.

A weight is a floating-point constant that some node of the main graph reads: an initializer
or a Constant node's value, reached directly or through Identity nodes (exports alias shared
weights that way), or an integer constant dequantised by DequantizeLinear(x, scale,
zero_point) with constant operands (per tensor, per axis, or blocked), whose statistics are
those of the dequantised values (x - zero_point) * scale. The scale and zero point of such a
weight are part of it, not weights of their own. Statistics are in float64 over the finite
values (`nonfinite` counts the others: a -inf mask constant, say), 0 when there are none (an
empty ROI of Resize): every number of an answer is finite. The histogram has BINS equal bins
over the finite values' range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import NodeProto, numpy_helper

from explainers.base import Array
from explainers.errors import FailedPrecondition
from explainers.gradients.graphs import DEFAULT_DOMAINS, producers
from explainers.layers.graph import op_name

BINS = 32
DEQUANTIZE = "DequantizeLinear"
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class Use:
    """A node reading a weight: its name, op type and the input slot."""

    node: str
    op_type: str
    slot: int


@dataclass(frozen=True)
class Histogram:
    counts: Array  # (BINS,) int64 values per bin
    edges: Array  # (BINS + 1,) float64 bin edges over the finite values' range


@dataclass(frozen=True)
class WeightStats:
    """One weight's statistics (float64) and where it is used."""

    name: str  # the initializer, the Constant's output, or the quantised initializer
    source: str  # "initializer", "Constant" or "DequantizeLinear"
    shape: tuple[int, ...]
    dtype: str  # as stored (int8 for a quantised weight)
    mean: float
    std: float  # population standard deviation
    l2: float  # sqrt of the sum of squares
    abs_max: float
    zeros: float  # fraction of values exactly 0 (after dequantising)
    nonfinite: int  # values that are inf or nan (left out of the histogram)
    histogram: Histogram
    uses: tuple[Use, ...]
    aliases: tuple[str, ...]  # other names the users read it by (Identity, DequantizeLinear)


def weights(model: onnx.ModelProto) -> list[WeightStats]:
    """Every weight of the main graph, in the order nodes first use them; values are read
    one weight at a time (a large model's weights are never all copied at once)."""
    g = model.graph
    made = producers(g)
    constants = _constants(g)
    quantised = _dequantizers(g, constants, made)
    outputs = {node.output[0]: x for x, (node, _) in quantised.items()}
    aliases = _aliases(g, {**{n: n for n in constants}, **outputs}, made)
    out = []
    for tensor, used in _uses(g, aliases, outputs).items():
        source, value = constants[tensor]
        if tensor not in quantised and not _floating(value):
            continue
        stored = _values(value)
        values = stored if tensor not in quantised else _dequantised(*quantised[tensor],
                                                                     constants)
        others = tuple(a for a, t in aliases.items() if t == tensor and a != tensor)
        out.append(statistics(tensor, DEQUANTIZE if tensor in quantised else source, stored,
                              values, used, others))
    return out


def statistics(name: str, source: str, stored: Array, values: Array, uses: tuple[Use, ...],
               aliases: tuple[str, ...]) -> WeightStats:
    """The statistics of one weight's finite values (0 when it has none)."""
    x = values.astype(np.float64).reshape(-1)  # (size,)
    finite = x[np.isfinite(x)]  # (finite values,)
    counts, edges = np.histogram(finite, bins=BINS)
    mean, std, l2 = _moments(finite)
    return WeightStats(name, source, tuple(int(d) for d in stored.shape), stored.dtype.name,
                       mean, std, l2, float(np.abs(finite).max()) if finite.size else 0.0,
                       float(np.mean(x == 0)) if x.size else 0.0,
                       int(x.size - finite.size), Histogram(counts, edges), uses, aliases)


def _moments(finite: Array) -> tuple[float, float, float]:
    """Mean, standard deviation and L2 norm of finite values (0 for none), computed on values
    scaled into [-1, 1] when the plain sums overflow."""
    if finite.size == 0:
        return 0.0, 0.0, 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        plain = (float(finite.mean()), float(finite.std()), float(np.sqrt(np.sum(finite**2))))
    if np.all(np.isfinite(plain)):
        return plain
    scale = float(np.abs(finite).max())
    y = finite / scale  # (finite values,) in [-1, 1]
    return scale * float(y.mean()), scale * float(y.std()), scale * float(np.sqrt(np.sum(y**2)))


Constant = tuple[str, onnx.TensorProto | Array]  # (source, the value as stored)


def _constants(graph: onnx.GraphProto) -> dict[str, Constant]:
    """Initializers and Constant nodes' values by tensor name, not yet read."""
    out: dict[str, Constant] = {i.name: ("initializer", i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            value = _constant_value(node)
            if value is not None:
                out[node.output[0]] = ("Constant", value)
    return out


def _floating(value: onnx.TensorProto | Array) -> bool:
    if isinstance(value, onnx.TensorProto):
        return value.data_type in FLOAT_TYPES
    return value.dtype.kind == "f"


def _values(value: onnx.TensorProto | Array) -> Array:
    """A constant's values; FailedPrecondition when they cannot be read."""
    if not isinstance(value, onnx.TensorProto):
        return value
    try:
        return np.asarray(numpy_helper.to_array(value))
    except Exception as exc:  # external data not loaded, a type numpy cannot hold
        raise FailedPrecondition(f"weights: cannot read {value.name!r}: "
                                 f"{type(exc).__name__}") from exc


def _constant_value(node: NodeProto) -> onnx.TensorProto | Array | None:
    """A Constant node's value (tensor, float or floats); None for the other forms."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name == "value_float":
            return np.asarray(attr.f, np.float32)
        if attr.name == "value_floats":
            return np.asarray(attr.floats, np.float32)
    return None


def _aliases(graph: onnx.GraphProto, roots: dict[str, str],
             made: dict[str, NodeProto]) -> dict[str, str]:
    """Every name a node reads a weight by -> the weight: the weight itself, Identity outputs
    of it (chains included), a DequantizeLinear output (given in `roots`)."""
    out = {}
    for node in graph.node:
        for name in node.input:
            root = _through_identity(name, made)
            if root in roots:
                out[name] = roots[root]
    return out


def _through_identity(name: str, made: dict[str, NodeProto]) -> str:
    """The tensor an Identity chain ending at `name` starts from."""
    while name in made and made[name].op_type == "Identity" and \
            made[name].domain in DEFAULT_DOMAINS:
        name = made[name].input[0]
    return name


def _dequantizers(graph: onnx.GraphProto, constants: dict[str, Constant],
                  made: dict[str, NodeProto]) -> dict[str, tuple[NodeProto, list[str]]]:
    """DequantizeLinear nodes whose operands are all constants, by their x's name: the node
    and its operands' constant names ("" for an omitted zero point)."""
    out = {}
    for node in graph.node:
        if node.op_type != DEQUANTIZE or node.domain not in DEFAULT_DOMAINS:
            continue
        names = [_through_identity(n, made) if n else "" for n in node.input]
        if len(names) >= 2 and all(n in constants for n in names if n):
            out[names[0]] = (node, names)
    return out


def _dequantised(node: NodeProto, names: list[str], constants: dict[str, Constant]) -> Array:
    """The dequantised values of one DequantizeLinear weight."""
    x, scale, *zero = (_values(constants[n][1]) if n else None for n in names)
    assert x is not None and scale is not None  # _dequantizers checked both
    return dequantise(node, x, scale, zero[0] if zero else None)


def dequantise(node: NodeProto, x: Array, scale: Array, zero: Array | None) -> Array:
    """(x - zero_point) * scale in the scale's dtype, as the graph computes it: per tensor
    (scalar scale), per axis (1-D scale along `axis`) or blocked (`block_size` values of
    `axis` share a scale)."""
    axis, block = _attr(node, "axis", 1) % max(x.ndim, 1), _attr(node, "block_size", 0)
    z = np.zeros(1) if zero is None else zero.astype(np.float64)
    s = scale.astype(np.float64)
    if s.size > 1 and block > 0:  # same rank as x, axis cut into blocks
        s, z = (np.repeat(a, block, axis=axis).take(range(x.shape[axis]), axis=axis)
                if a.ndim == x.ndim else a for a in (s, z))
    elif s.size > 1:  # one scale per slice along axis
        shape = [1] * x.ndim
        shape[axis] = -1
        s = s.reshape(shape)
        z = z.reshape(shape) if z.size > 1 else z
    return np.asarray((x.astype(np.float64) - z) * s, scale.dtype)


def _attr(node: NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _uses(graph: onnx.GraphProto, aliases: dict[str, str],
          dequantised: dict[str, str]) -> dict[str, tuple[Use, ...]]:
    """Per weight in order of first use, the nodes reading it; Identity nodes and the weights'
    own DequantizeLinear nodes are not uses (a scale read only by them is no weight)."""
    uses: dict[str, list[Use]] = {}
    for node in graph.node:
        if node.op_type == "Identity" or (node.output and node.output[0] in dequantised):
            continue
        for slot, name in enumerate(node.input):
            if name in aliases:
                uses.setdefault(aliases[name], []).append(Use(node.name, op_name(node), slot))
    return {t: tuple(u) for t, u in uses.items()}

"""What the Layers service answers, as numpy arrays and small dataclasses: the streamed chunks
of GetActivations and GetAttention put back together (blocks of rows in order)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from service.client.wire import Array, array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import layers_pb2 as lpb


@dataclass(frozen=True)
class Layer:
    """One inspectable tensor: what `activations` takes."""

    name: str
    node: str
    op_type: str
    shape: tuple[int, ...] | None  # at batch 1, -1 = unknown size; None = rank unknown
    datatype: str
    batch_axis: int  # -1 when no axis follows the batch


@dataclass(frozen=True)
class AttentionLayer:
    node: str
    kind: str  # "Softmax" or "Attention"
    probabilities: str  # the tensor holding them


@dataclass(frozen=True)
class LayerList:
    model: str
    version: str
    layers: tuple[Layer, ...]
    attention: tuple[AttentionLayer, ...]
    attention_unavailable: str  # why there are no attention maps ("" when there are)
    gradcam_layer: str  # Grad-CAM's default layer ("" when none)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


@dataclass(frozen=True)
class Activation:
    """One tensor for the request's rows (statistics per row, or of the whole tensor when it
    has no row axis)."""

    name: str
    shape: tuple[int, ...]  # the full tensor's
    datatype: str
    per_row: bool
    reduction: str
    values: Array  # as computed, (rows, *rest) for channel_mean, (rows, k, *rest) for top_k
    channels: Array | None  # top_k: (rows, k) channel indices
    mean: Array  # (rows,)
    std: Array
    min: Array
    max: Array
    zeros: Array  # fraction of values exactly 0
    channel_mean: Array | None  # (rows, channels), for tensors of rank 3 or more


@dataclass(frozen=True)
class Weight:
    """One weight's statistics (float64, after dequantising) and the nodes reading it."""

    name: str
    source: str  # "initializer", "Constant" or "DequantizeLinear"
    shape: tuple[int, ...]
    datatype: str
    mean: float
    std: float
    l2: float
    abs_max: float
    zeros: float
    nonfinite: int
    counts: Array  # (32,) histogram counts
    edges: Array  # (33,) their edges
    uses: tuple[tuple[str, str, int], ...]  # (node, op type, input slot)
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class AttentionMap:
    """One attention layer's probabilities, (rows, heads, queries, keys)."""

    index: int
    layer: AttentionLayer
    reduction: str
    maps: Array


@dataclass(frozen=True)
class Maximized:
    inputs: dict[str, Array]  # the input found, per model input, batch 1
    activation: float  # the objective there
    start_activation: float  # and at the start
    steps: int
    trace: Array  # (steps,) the objective at each step
    cost: pb.Cost
    notes: tuple[str, ...]


def layer_list(r: lpb.ListLayersResponse) -> LayerList:
    return LayerList(
        r.model, r.version,
        tuple(Layer(x.name, x.node, x.op_type, tuple(x.shape) if x.rank_known else None,
                    x.datatype, x.batch_axis) for x in r.layers),
        tuple(attention_layer(a) for a in r.attention_layers), r.attention_unavailable,
        r.gradcam_layer)


def attention_layer(a: lpb.AttentionLayerInfo) -> AttentionLayer:
    return AttentionLayer(a.node, a.kind, a.probabilities)


def weight(w: lpb.WeightInfo) -> Weight:
    return Weight(w.name, w.source, tuple(w.shape), w.datatype, w.mean, w.std, w.l2, w.abs_max,
                  w.zeros, w.nonfinite, np.array(w.histogram_counts, np.int64),
                  np.array(w.histogram_edges), tuple((u.node, u.op_type, u.slot)
                                                     for u in w.uses), tuple(w.aliases))


def activations(chunks: Iterable[lpb.ActivationChunk]) -> dict[str, Activation]:
    """The chunks of each tensor, in row order, as one Activation per tensor."""
    by_layer: dict[str, list[lpb.ActivationChunk]] = {}
    for chunk in chunks:
        by_layer.setdefault(chunk.layer, []).append(chunk)
    return {name: activation(sorted(parts, key=lambda c: c.row_offset))
            for name, parts in by_layer.items()}


def activation(parts: list[lpb.ActivationChunk]) -> Activation:
    first = parts[0]

    def joined(read: str) -> Array:
        return np.concatenate([np.asarray(getattr(c.summary, read), np.float64)
                               for c in parts])

    channels = _joined([c.channels for c in parts if c.HasField("channels")])
    means = _joined([c.summary.channel_mean for c in parts
                     if c.summary.HasField("channel_mean")])
    values = _joined([c.values for c in parts])
    assert values is not None
    return Activation(first.layer, tuple(first.shape), first.datatype, first.per_row,
                      first.reduction, values, channels, joined("mean"), joined("std"),
                      joined("min"), joined("max"), joined("zeros"), means)


def _joined(tensors: list[pb.Tensor]) -> Array | None:
    """Blocks of rows as one array; None when there are none."""
    return np.concatenate([array(t) for t in tensors]) if tensors else None


def attention_maps(chunks: Iterable[lpb.AttentionChunk]) -> list[AttentionMap]:
    """Each layer's blocks of rows, in row order, as one map per layer (graph order)."""
    by_index: dict[int, list[lpb.AttentionChunk]] = {}
    for chunk in chunks:
        by_index.setdefault(chunk.index, []).append(chunk)
    out = []
    for index in sorted(by_index):
        parts = sorted(by_index[index], key=lambda c: c.row_offset)
        out.append(AttentionMap(index, attention_layer(parts[0].layer), parts[0].reduction,
                                np.concatenate([array(c.maps) for c in parts])))
    return out


def maximized(r: lpb.MaximizeResponse) -> Maximized:
    return Maximized({t.name: array(t) for t in r.inputs}, r.activation, r.start_activation,
                     r.steps, np.array(r.trace), r.cost, tuple(r.notes))

"""The Layers gRPC servicer: protos <-> the layer plane's domain types, errors through the
servicer's one mapping (`call`, `call_stream`). Activations and attention maps are streamed in
blocks of rows, each message under `chunk_bytes` (a single row larger than that goes alone;
a tensor without a row axis goes whole, in one message)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import numpy as np

from explainers.base import Array
from explainers.layers.activations import Activation, Summary
from explainers.layers.attention import AttentionLayer
from explainers.layers.graph import TensorInfo
from explainers.layers.weights import WeightStats
from service.api.servicer import (
    call,
    call_stream,
    control_of,
    deadline_of,
    message_limit,
    to_inputs,
)
from service.api.tensors import NUMPY_TO_OIP, from_array
from service.plane.layers import (
    Activations,
    Attention,
    LayerPlane,
    LayersQuery,
    Listing,
    Maximized,
    MaximizeQuery,
    Weights,
)
from service.plane.scheduler import Control
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import layers_pb2 as lpb
from sidelight.v1 import layers_pb2_grpc as lpb_grpc

R = TypeVar("R")
STREAM_CHUNK_BYTES = 4 * 1024 * 1024  # gRPC's default message limit (layers.proto)
CHUNK_RESERVE_BYTES = 16 * 1024  # a chunk's names, shape and framing, beyond its arrays
SUMMARY_ROW_BYTES = 5 * 8  # mean, std, min, max and zeros of one row (doubles)


class LayersServicer(lpb_grpc.LayersServicer):
    """Layers service over a layer plane that may still be loading (then UNAVAILABLE);
    `chunk_bytes` bounds each streamed message."""

    def __init__(self, layers: Callable[[], LayerPlane],
                 chunk_bytes: int = STREAM_CHUNK_BYTES) -> None:
        self._layers, self._chunk_bytes = layers, chunk_bytes

    def ListLayers(self, request: lpb.ListLayersRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> lpb.ListLayersResponse:
        return call(context, "ListLayers", lambda: to_listing(self._layers().list_layers(
            request.model, request.version, deadline_of(context), control_of(context))))

    def GetWeights(self, request: lpb.WeightsRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> lpb.WeightsResponse:
        return call(context, "GetWeights", lambda: to_weights(self._layers().weights(
            request.model, request.version, tuple(request.names), deadline_of(context),
            control_of(context))))

    def GetActivations(self, request: lpb.ActivationsRequest,  # noqa: N802
                       context: grpc.ServicerContext) -> Iterator[lpb.ActivationChunk]:
        return call_stream(context, "GetActivations", lambda: activation_chunks(
            self._computed(request, context, LayerPlane.activations), self._chunk_bytes))

    def GetAttention(self, request: lpb.AttentionRequest,  # noqa: N802
                     context: grpc.ServicerContext) -> Iterator[lpb.AttentionChunk]:
        return call_stream(context, "GetAttention", lambda: attention_chunks(
            self._computed(request, context, LayerPlane.attention), self._chunk_bytes))

    def _computed(self, request: lpb.ActivationsRequest | lpb.AttentionRequest,
                  context: grpc.ServicerContext,
                  compute: Callable[[LayerPlane, LayersQuery, Control], R]) -> R:
        """The request decoded and answered by the layer plane (before anything streams)."""
        control = control_of(context)  # first: the budget counts from arrival
        layers = self._layers()
        query = to_layers_query(request, context, message_limit(layers.settings))
        return compute(layers, query, control)

    def Maximize(self, request: lpb.MaximizeRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> lpb.MaximizeResponse:
        def run() -> lpb.MaximizeResponse:
            control = control_of(context)  # first: the budget counts from arrival
            layers = self._layers()
            query = to_maximize_query(request, context, message_limit(layers.settings))
            return to_maximized(layers.maximize(query, control))
        return call(context, "Maximize", run)


# --- requests ---------------------------------------------------------------------------------
def to_layers_query(r: lpb.ActivationsRequest | lpb.AttentionRequest,
                    context: grpc.ServicerContext, max_bytes: int) -> LayersQuery:
    """An activations or attention request in domain terms, its tensors decoded."""
    inputs = to_inputs(r.inputs, "inputs", max_bytes)
    if isinstance(r, lpb.ActivationsRequest):
        return LayersQuery(r.model, inputs, r.version, tuple(r.layers), r.reduction, r.k,
                           deadline_of(context))
    return LayersQuery(r.model, inputs, r.version, reduction=r.reduction,
                       deadline_s=deadline_of(context))


def to_maximize_query(r: lpb.MaximizeRequest, context: grpc.ServicerContext,
                      max_bytes: int) -> MaximizeQuery:
    return MaximizeQuery(
        r.model, r.version, r.objective, r.index, r.output, r.layer,
        to_inputs(r.start, "start", max_bytes), r.low, r.high, r.budget_ms,
        deadline_of(context), r.seed, r.steps, r.learning_rate, r.l2, r.jitter, r.blur_every,
        r.blur_sigma, r.background)


# --- answers ----------------------------------------------------------------------------------
def datatype(dtype: str) -> str:
    """The OIP name of a numpy dtype name ("" when unknown or without one)."""
    return NUMPY_TO_OIP.get(np.dtype(dtype), "") if dtype else ""


def to_layer(t: TensorInfo) -> lpb.LayerInfo:
    return lpb.LayerInfo(name=t.name, node=t.node, op_type=t.op_type, shape=t.shape or (),
                         rank_known=t.shape is not None, datatype=datatype(t.dtype),
                         batch_axis=-1 if t.batch_axis is None else t.batch_axis)


def to_attention_layer(a: AttentionLayer) -> lpb.AttentionLayerInfo:
    return lpb.AttentionLayerInfo(node=a.node, kind=a.kind, probabilities=a.probabilities)


def to_listing(s: Listing) -> lpb.ListLayersResponse:
    return lpb.ListLayersResponse(
        model=s.model, version=s.version, layers=[to_layer(t) for t in s.tensors],
        attention_layers=[to_attention_layer(a) for a in s.attention],
        attention_unavailable=s.attention_unavailable, gradcam_layer=s.gradcam_layer)


def to_weight(w: WeightStats) -> lpb.WeightInfo:
    return lpb.WeightInfo(
        name=w.name, source=w.source, shape=w.shape, datatype=datatype(w.dtype), mean=w.mean,
        std=w.std, l2=w.l2, abs_max=w.abs_max, zeros=w.zeros, nonfinite=w.nonfinite,
        histogram_counts=w.histogram.counts.tolist(),
        histogram_edges=w.histogram.edges.tolist(),
        uses=[lpb.WeightUse(node=u.node, op_type=u.op_type, slot=u.slot) for u in w.uses],
        aliases=w.aliases)


def to_weights(w: Weights) -> lpb.WeightsResponse:
    return lpb.WeightsResponse(model=w.model, version=w.version,
                               weights=[to_weight(x) for x in w.weights])


def row_blocks(rows: int, row_bytes: int, limit: int) -> list[tuple[int, int]]:
    """(start, stop) blocks of rows whose messages stay under `limit` bytes, at least one row
    each (a reserve is kept for the message's other fields)."""
    room = limit - min(CHUNK_RESERVE_BYTES, limit // 2)
    per = max(1, room // max(row_bytes, 1))
    return [(a, min(a + per, rows)) for a in range(0, max(rows, 1), per)]


def activation_row_bytes(a: Activation) -> int:
    """What one row of an activation's chunk carries: values, channels and statistics."""
    rows = max(int(a.values.shape[0]), 1)
    extra = 0 if a.channels is None else a.channels.nbytes
    means = a.summary.channel_mean
    extra += 0 if means is None else means.nbytes
    return int(a.values.nbytes + extra) // rows + SUMMARY_ROW_BYTES


def activation_chunks(result: Activations, limit: int) -> Iterator[lpb.ActivationChunk]:
    """Each tensor in blocks of rows (a tensor without a row axis whole), in request order."""
    for a in result.tensors:
        blocks = row_blocks(a.values.shape[0], activation_row_bytes(a), limit) if a.per_row \
            else [(0, result.rows)]
        for start, stop in blocks:
            yield activation_chunk(result, a, start, stop)


def activation_chunk(result: Activations, a: Activation, start: int,
                     stop: int) -> lpb.ActivationChunk:
    """Rows start:stop of one tensor (the whole tensor when it has no row axis)."""
    cut = slice(start, stop) if a.per_row else slice(None)
    chunk = lpb.ActivationChunk(
        model=result.model, version=result.version, layer=a.name, shape=a.shape,
        datatype=datatype(a.dtype), per_row=a.per_row, reduction=a.reduction,
        row_offset=start, rows=stop - start, values=from_array(a.name, a.values[cut]),
        summary=to_summary(a.summary, cut), elapsed_ms=result.elapsed_ms)
    if a.channels is not None:
        chunk.channels.CopyFrom(from_array("channels", a.channels[cut]))
    return chunk


def to_summary(s: Summary, cut: slice) -> lpb.ActivationSummary:
    """The statistics of the block's rows."""
    out = lpb.ActivationSummary(mean=s.mean[cut], std=s.std[cut], min=s.min[cut],
                                max=s.max[cut], zeros=s.zeros[cut])
    if s.channel_mean is not None:
        out.channel_mean.CopyFrom(from_array("channel_mean", s.channel_mean[cut]))
    return out


def attention_chunks(result: Attention, limit: int) -> Iterator[lpb.AttentionChunk]:
    """Each layer's maps (rows, heads, queries, keys) in blocks of rows, in graph order."""
    maps = result.maps
    for index, (layer, values) in enumerate(zip(maps.layers, maps.probabilities,
                                                strict=True)):
        info = to_attention_layer(layer)
        for start, stop in row_blocks(values.shape[0], row_nbytes(values), limit):
            yield lpb.AttentionChunk(
                model=result.model, version=result.version, index=index, layer=info,
                reduction=maps.reduction, row_offset=start, rows=stop - start,
                maps=from_array(layer.probabilities, values[start:stop]),
                elapsed_ms=result.elapsed_ms)


def row_nbytes(values: Array) -> int:
    return int(values.nbytes) // max(int(values.shape[0]), 1)


def to_maximized(m: Maximized) -> lpb.MaximizeResponse:
    f = m.found
    cost = pb.Cost(model_evaluations=m.evaluations, elapsed_ms=m.elapsed_ms,
                   budget_exhausted=f.budget_exhausted, converged=not f.budget_exhausted,
                   budget_ms=m.budget_ms, budget_source=m.budget_source)
    return lpb.MaximizeResponse(
        model=m.model, version=m.version,
        inputs=[from_array(name, values) for name, values in m.inputs],
        activation=f.activation, start_activation=f.start_activation, steps=f.steps,
        trace=f.trace.tolist(), cost=cost, notes=f.notes)

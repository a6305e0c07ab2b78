"""The gRPC servicer: converts protos to domain types and back, and maps errors in one place."""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from explainers.base import Array, Explanation
from explainers.errors import InvalidArgument, SidelightError
from service.api.tensors import from_array, to_array
from service.config import Settings
from service.plane.baselines import DEFAULT_SIGMA, BaselineSpec
from service.plane.dataplane import DataPlane, ExplainResult, ModelSummary, summarize, summarize_all
from service.plane.grouping import MAX_GROUPS, GroupRequest
from service.plane.players import OcclusionRequest
from service.plane.requests import BackgroundUpload, ExplainQuery, GradientRequest
from service.plane.scheduler import Control
from service.store.backgrounds import BackgroundMeta
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
NO_DEADLINE_S = 1e9
RETRY_AFTER = "retry-after-ms"  # trailing metadata of a shed call
MESSAGE_OVERHEAD_BYTES = 1024 * 1024  # room beyond max_upload_bytes for the rest of a message
MAX_DETAILS_BYTES = 1024  # status details travel in a header: gRPC refuses them past 16 KiB
UNDECODABLE_LOG_EVERY_S = 60.0


def message_limit(settings: Settings) -> int:
    """The largest request the server accepts, in bytes (also the cap on a decoded tensor)."""
    return settings.max_upload_bytes + MESSAGE_OVERHEAD_BYTES


def capped(details: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """Status details of at most `limit` UTF-8 bytes (percent-encoding can triple them)."""
    raw = details.encode()
    if len(raw) <= limit:
        return details
    return raw[:limit].decode(errors="ignore") + f"... ({len(raw)} bytes)"


def call(context: grpc.ServicerContext, rpc: str, fn: Callable[[], T]) -> T:
    """Run fn; a SidelightError becomes its status code, anything else INTERNAL + one log line."""
    try:
        return fn()
    except Exception as err:
        abort(context, rpc, err)


def call_stream(context: grpc.ServicerContext, rpc: str,
                events: Callable[[], Iterator[T]]) -> Iterator[T]:
    """`call` for a streaming response: the messages of events(), then its error's status.
    A call its client already ended (cancelled, past its deadline) stops quietly."""
    try:
        yield from events()
    except Exception as err:
        if not context.is_active():
            return
        abort(context, rpc, err)


def abort(context: grpc.ServicerContext, rpc: str, err: Exception) -> NoReturn:
    """End the call with err's status: a SidelightError's own code and message, anything else
    INTERNAL with a generic message (the one place unknown errors become INTERNAL)."""
    if isinstance(err, SidelightError):
        if err.retry_after_s is not None:  # a shed call: when to try again
            context.set_trailing_metadata(((RETRY_AFTER, str(round(1e3 * err.retry_after_s))),))
        context.abort(grpc.StatusCode[err.code], capped(str(err)))
    else:
        where = traceback.extract_tb(err.__traceback__)[-1]
        log.error("internal error in %s: %s: %s at %s:%d", rpc, type(err).__name__, err,
                  where.filename, where.lineno)
        context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
    raise AssertionError("unreachable: abort raises")


def control_of(context: grpc.ServicerContext) -> Control:
    """The call's control, cancelled when the call ends early (client gone, deadline past)."""
    control = Control(math.inf)
    context.add_callback(lambda: control.cancel(
        "the call ended (the client cancelled or its deadline passed)"))
    return control


def to_inputs(tensors: Iterable[pb.Tensor], field: str, max_bytes: int
              ) -> tuple[tuple[str, Array], ...]:
    """(name, array) per tensor, each decoded as `field[i]`."""
    return tuple((t.name, to_array(t, f"{field}[{i}]", max_bytes))
                 for i, t in enumerate(tensors))


class ExplainerServicer(pb_grpc.ExplainerServicer):
    """Explainer service over a data plane that may still be loading (then UNAVAILABLE).
    `client_of` names the caller (auth.AccessGuard.client_id) for per-client upload limits."""

    def __init__(self, plane: Callable[[], DataPlane],
                 client_of: Callable[[grpc.ServicerContext], str]) -> None:
        self._plane, self._client_of = plane, client_of

    def Explain(self, request: pb.ExplainRequest,
                context: grpc.ServicerContext) -> pb.ExplainResponse:
        def explain() -> pb.ExplainResponse:
            control = control_of(context)  # first: the budget counts from arrival
            plane = self._plane()
            query = to_query(request, context, message_limit(plane.settings))
            response = to_response(plane.explain(query, control))
            plane.responded(control)
            return response
        return call(context, "Explain", explain)

    def ListModels(self, request: pb.ListModelsRequest,
                   context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return call(context, "ListModels", lambda: pb.ListModelsResponse(
            models=[to_model_info(s) for s in summarize_all(self._plane())]))

    def GetModel(self, request: pb.GetModelRequest,
                 context: grpc.ServicerContext) -> pb.ModelInfo:
        return call(context, "GetModel", lambda: to_model_info(
            summarize(self._plane(), request.model, request.version)))

    def PutBackground(self, request: pb.PutBackgroundRequest,
                      context: grpc.ServicerContext) -> pb.PutBackgroundResponse:
        def put() -> pb.PutBackgroundResponse:
            plane = self._plane()
            upload = to_upload(request, plane.settings.max_upload_bytes,
                               self._client_of(context))
            meta = plane.put_background(upload)
            return pb.PutBackgroundResponse(background=to_background_info(meta),
                                            persisted=plane.persisted(meta))
        return call(context, "PutBackground", put)

    def GetBackground(self, request: pb.GetBackgroundRequest,
                      context: grpc.ServicerContext) -> pb.BackgroundInfo:
        return call(context, "GetBackground", lambda: to_background_info(
            self._plane().background_meta(request.model, request.version, request.name)))

    def ListBackgrounds(self, request: pb.ListBackgroundsRequest,
                        context: grpc.ServicerContext) -> pb.ListBackgroundsResponse:
        return call(context, "ListBackgrounds", lambda: pb.ListBackgroundsResponse(
            backgrounds=[to_background_info(m)
                         for m in self._plane().list_backgrounds(request.model)]))

    def DeleteBackground(self, request: pb.DeleteBackgroundRequest,
                         context: grpc.ServicerContext) -> pb.DeleteBackgroundResponse:
        return call(context, "DeleteBackground", lambda: pb.DeleteBackgroundResponse(
            deleted=self._plane().delete_background(request.model, request.version,
                                                    request.name)))


def to_query(r: pb.ExplainRequest, context: grpc.ServicerContext,
             max_bytes: int) -> ExplainQuery:
    """The request in domain terms; tensors decoded, the deadline read off the context."""
    return ExplainQuery(
        model=r.model, version=r.version, inputs=to_inputs(r.inputs, "inputs", max_bytes),
        method=r.method, output=r.target.output, classes=tuple(r.target.classes),
        scale=r.target.scale,
        budget_ms=r.budget_ms, deadline_s=deadline_of(context), seed=r.seed,
        background=r.background, target_error=r.target_error,
        max_evaluations=r.max_evaluations, groups=to_groups(r.groups, max_bytes),
        baseline=to_baseline(r.baseline), occlusion=OcclusionRequest(
            tuple(r.occlusion.window), tuple(r.occlusion.strides), r.occlusion.input),
        gradients=GradientRequest(r.gradients.layer, r.gradients.signed,
                                  r.gradients.noise_level, r.gradients.samples,
                                  r.gradients.steps, r.gradients.relu))


def to_groups(g: pb.FeatureGroups, max_bytes: int) -> GroupRequest:
    """The request's groups: a mask decoded like an input, the rest as given (bounded)."""
    if len(g.labels) > MAX_GROUPS or len(g.hierarchy) > MAX_GROUPS:
        raise InvalidArgument(f"groups: at most {MAX_GROUPS} labels and hierarchy nodes")
    mask = to_array(g.mask, "groups.mask", max_bytes) if g.HasField("mask") else None
    return GroupRequest(mask, g.input, tuple(g.labels), tuple(g.patch), tuple(g.grid),
                        tuple(tuple(n.children) for n in g.hierarchy))


def to_baseline(b: pb.Baseline) -> BaselineSpec | None:
    """The request's baseline, None when it names none (the model's default applies)."""
    if not b.kind:
        return None
    return BaselineSpec(b.kind, b.value, b.sigma or DEFAULT_SIGMA)


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """Seconds left on the caller's deadline; None when it set none (gRPC reports ~2^63)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > NO_DEADLINE_S else float(remaining)


def to_upload(r: pb.PutBackgroundRequest, max_bytes: int, client: str) -> BackgroundUpload:
    """Decode an upload after checking its size against max_upload_bytes (the tensor's encoded
    size: reading `raw` would copy it)."""
    size = r.data.ByteSize()
    if size > max_bytes:
        raise InvalidArgument(f"data: {size} bytes exceeds max_upload_bytes {max_bytes}")
    return BackgroundUpload(model=r.model, version=r.version, name=r.name,
                            data=to_array(r.data, "data", max_bytes),
                            feature_names=tuple(r.feature_names), client=client)


def to_background_info(m: BackgroundMeta) -> pb.BackgroundInfo:
    return pb.BackgroundInfo(
        model=m.model, version=m.version, name=m.name, rows=m.rows, features=m.features,
        datatype={"float32": "FP32", "float64": "FP64"}.get(m.dtype, m.dtype), sha256=m.sha256,
        created=m.created, source=m.source, feature_names=m.feature_names,
        model_sha256=m.model_sha256)


def to_response(res: ExplainResult) -> pb.ExplainResponse:
    rows = [to_row(e, res, i) for i, e in enumerate(res.rows)]
    rows += [pb.RowExplanation(status="NOT_REACHED", status_detail="the budget ran out before "
                               "this row") for _ in range(res.not_reached)]
    cost = pb.Cost(model_evaluations=res.evaluations, elapsed_ms=res.elapsed_ms,
                   budget_exhausted=any(e.budget_exhausted for e in res.rows)
                   or res.not_reached > 0,
                   converged=all(e.converged for e in res.rows) and not res.not_reached,
                   budget_ms=res.budget_ms, budget_source=res.budget_source,
                   rows_not_reached=res.not_reached)
    bg = res.background
    return pb.ExplainResponse(
        model=res.model, version=res.version, method=res.method,
        feature_names=res.labels, output_names=res.target.names, rows=rows, cost=cost,
        scale=res.target.scale, background=bg.name, background_rows=bg.rows,
        background_sha256=bg.sha256, background_usage=res.background_usage,
        cached=res.cached, notes=res.notes, modality=res.modality, grouping=res.grouping,
        baseline=res.baseline, additive=res.additive)


def to_row(e: Explanation, res: ExplainResult, i: int) -> pb.RowExplanation:
    """One row: attributions per player, and for grouped answers its maps and labels."""
    low, high = e.interval(0.95)
    row = pb.RowExplanation(
        attributions=e.values.ravel(), std_errors=e.std_errors.ravel(),
        base_values=e.base_values, predictions=e.prediction, model_evaluations=e.evaluations,
        converged=e.converged, budget_exhausted=e.budget_exhausted, method=e.method,
        status="OK",
        ci_low=low.ravel(), ci_high=high.ravel(), samples=e.samples,
        labels=res.row_labels[i] if res.row_labels else (), diagnostics=dict(e.diagnostics))
    if res.maps and res.layout is not None:
        row.maps.extend(from_array(spec.name, part) for spec, part in
                        zip(res.layout.specs, res.layout.split(res.maps[i]), strict=True))
    return row


def to_model_info(s: ModelSummary) -> pb.ModelInfo:
    info = pb.ModelInfo(name=s.name, version=s.version, versions=s.versions,
                        state="FAILED" if s.model is None else "READY", error=s.error)
    m = s.model
    if m is None:
        return info
    info.inputs.extend(pb.TensorSpec(name=i.name, datatype=i.datatype, shape=i.shape)
                       for i in m.onnx.inputs)
    info.outputs.extend(pb.TensorSpec(name=o.name, datatype=o.datatype, shape=o.shape)
                        for o in m.onnx.outputs)
    info.feature_names.extend(m.feature_names)
    info.output = m.output
    columns = m.config.classes or range(len(m.column_names(m.output)))
    info.output_names.extend(m.column_names(m.output)[c] for c in columns)
    info.scale, info.default_method = m.config.scale, m.config.method
    info.default_budget_ms = m.config.budget_ms or 0.0
    info.sha256, info.background_rows = m.sha256, s.background_rows
    info.rows_per_second, info.batch_rows = m.onnx.rows_per_second, m.onnx.chunk_rows
    info.tree_unsupported = "" if m.trees is not None else m.tree_error
    margin = ["margin"] if m.output in m.onnx.margin_outputs else []
    info.scales.extend(["identity", "logit", *margin])
    info.notes.extend(s.notes)
    info.drift_active, info.drift_status = s.drift_active, s.drift_status
    info.modality, info.grouping, info.baseline = m.modality.kind, s.grouping, s.baseline
    info.group_labels.extend(s.group_labels)
    info.baselines.extend(s.baselines)
    info.vocabulary.extend(m.vocabulary)
    return info


class Undecodable:
    """What a guarded deserializer returns for bytes that are not a valid request message
    (grpcio treats a raised exception, or None, as its own INTERNAL error)."""

    __slots__ = ()


UNDECODABLE = Undecodable()
HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                 (False, True): grpc.unary_stream_rpc_method_handler,
                 (True, False): grpc.stream_unary_rpc_method_handler,
                 (True, True): grpc.stream_stream_rpc_method_handler}


class DecodeGuard(grpc.ServerInterceptor):  # type: ignore[misc]
    """Requests whose bytes do not decode get INVALID_ARGUMENT naming the message type and at
    most one log line per `log_every_s` (grpcio would answer INTERNAL and log a traceback per
    call). Covers every method: a single request message (Explainer, health, ...) is refused
    before the servicer runs; in a request stream, reading the bad message raises
    InvalidArgument naming its position, which the servicer's `call_stream` maps."""

    def __init__(self, log_every_s: float = UNDECODABLE_LOG_EVERY_S) -> None:
        self._guarded: dict[str, Any] = {}  # method -> guarded handler; registered methods only
        self._log = RateLimitedLog(log_every_s)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        guarded = self._guarded.get(details.method)
        if guarded is None:
            guarded = self._guarded[details.method] = self._guard(handler, details.method)
        return guarded

    def _guard(self, handler: Any, method: str) -> Any:
        """The same handler with a deserializer that cannot raise and a behavior that answers
        INVALID_ARGUMENT to what it could not decode."""
        decode = handler.request_deserializer
        message = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
        name = message.full_name if message is not None else f"the request of {method}"

        def safe_decode(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception:
                return UNDECODABLE

        kind = (handler.request_streaming, handler.response_streaming)
        behavior = {(False, False): handler.unary_unary, (False, True): handler.unary_stream,
                    (True, False): handler.stream_unary,
                    (True, True): handler.stream_stream}[kind]
        guard = self._stream_guard if handler.request_streaming else self._single_guard
        return HANDLER_KINDS[kind](guard(behavior, method, name),
                                   request_deserializer=safe_decode,
                                   response_serializer=handler.response_serializer)

    def _single_guard(self, behavior: Any, method: str, name: str) -> Any:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            if request is UNDECODABLE:
                self._log.event(method)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"request: could not be decoded as {name}")
            return behavior(request, context)
        return guarded

    def _stream_guard(self, behavior: Any, method: str, name: str) -> Any:
        def checked(requests: Iterator[Any]) -> Iterator[Any]:
            for i, request in enumerate(requests):
                if request is UNDECODABLE:
                    self._log.event(method)
                    raise InvalidArgument(f"request: message {i} of the stream could not be "
                                          f"decoded as {name}")
                yield request

        def guarded(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behavior(checked(requests), context)
        return guarded


class RateLimitedLog:
    """Counts undecodable requests; logs one line at most every `every_s` seconds."""

    def __init__(self, every_s: float) -> None:
        self._every_s, self._lock = every_s, threading.Lock()
        self._count, self._last = 0, -float("inf")

    def event(self, method: str) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < self._every_s:
                return
            count, self._count, self._last = self._count, 0, now
        log.warning("%d request(s) could not be decoded since the last report (latest: %s)",
                    count, method)

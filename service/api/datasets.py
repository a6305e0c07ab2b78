"""The Datasets service: converts DatasetRequest streams and LiveImportanceRequest to domain
types and the dataset plane's events back to messages. Nothing is decided here; errors go
through the servicer's one mapping (`call`, `call_stream`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator

import grpc
import numpy as np

from explainers.errors import InvalidArgument
from explainers.global_.dataset_shapley import DatasetShapley
from explainers.global_.dependence import PartialDependence
from explainers.global_.permutation_importance import PermutationImportance
from service.api.servicer import call, call_stream, deadline_of, message_limit, to_groups
from service.api.tensors import from_array, to_array
from service.plane.datasets import (
    Block,
    DatasetPlane,
    DependenceQuery,
    Event,
    JobQuery,
    JobResult,
    Projected,
    Report,
    ShapleyQuery,
)
from service.plane.live import LiveResult
from service.plane.scheduler import Control
from sidelight.v1 import datasets_pb2 as dpb
from sidelight.v1 import datasets_pb2_grpc as dpb_grpc
from sidelight.v1 import explainer_pb2 as pb


class DatasetsServicer(dpb_grpc.DatasetsServicer):
    """Datasets service over a dataset plane that may still be loading (then UNAVAILABLE)."""

    def __init__(self, plane: Callable[[], DatasetPlane]) -> None:
        self._plane = plane

    def ExplainDataset(self, request_iterator: Iterable[dpb.DatasetRequest],  # noqa: N802
                       context: grpc.ServicerContext) -> Iterator[dpb.DatasetResponse]:
        def events() -> Iterator[dpb.DatasetResponse]:
            plane = self._plane()
            limit = message_limit(plane.plane.settings)
            requests = iter(request_iterator)
            first = next(requests, None)
            if first is None or not first.HasField("job"):
                raise InvalidArgument("job: required in the first message of the stream")
            control = Control(math.inf)
            context.add_callback(lambda: control.cancel(
                "the call ended (the client cancelled or its deadline passed)"))
            with plane.open(to_job(first.job, context, limit), control) as job:
                for i, message in enumerate(itertools.chain([first], requests)):
                    report = job.add(to_block(message, i, limit))
                    if report is not None:
                        yield to_progress(report)
                yield from (to_event(e) for e in job.events())
        return call_stream(context, "ExplainDataset", events)

    def GetLiveImportance(self, request: dpb.LiveImportanceRequest,  # noqa: N802
                          context: grpc.ServicerContext) -> dpb.LiveImportance:
        return call(context, "GetLiveImportance", lambda: to_live(self._plane().live_importance(
            request.model, request.version, request.window_seconds)))


def to_job(j: dpb.DatasetJob, context: grpc.ServicerContext, max_bytes: int) -> JobQuery:
    """The job in domain terms; the deadline read off the context."""
    d, s = j.dependence, j.shapley
    return JobQuery(
        model=j.model, kind=j.kind, version=j.version, dataset=j.dataset,
        output=j.target.output, classes=tuple(j.target.classes), scale=j.target.scale,
        budget_ms=j.budget_ms, deadline_s=deadline_of(context), seed=j.seed, max_rows=j.max_rows,
        max_evaluations=j.max_evaluations, groups=to_groups(j.groups, max_bytes),
        metric=j.permutation.metric, repeats=j.permutation.repeats,
        dependence=DependenceQuery(tuple(d.features), d.resolution, d.percentile_low,
                                   d.percentile_high, d.spacing, d.ice_rows),
        shapley=ShapleyQuery(s.method, s.background, s.target_error, s.rows, s.interactions),
        layer=j.projection.layer, components=j.projection.components)


def to_block(r: dpb.DatasetRequest, index: int, max_bytes: int) -> Block:
    """One message's rows and labels; only the first message may carry the job."""
    if index and r.HasField("job"):
        raise InvalidArgument(f"job: only in the first message (message {index} has one)")
    inputs = tuple((t.name, to_array(t, f"inputs[{i}]", max_bytes))
                   for i, t in enumerate(r.inputs))
    labels = to_array(r.labels, "labels", max_bytes) if r.HasField("labels") else None
    return Block(inputs, labels, index)


def to_progress(r: Report) -> dpb.DatasetResponse:
    return dpb.DatasetResponse(progress=dpb.DatasetProgress(
        stage=r.stage, done=r.done, total=r.total, unit=r.unit, elapsed_ms=r.elapsed_ms,
        remaining_ms=r.remaining_ms))


def to_event(e: Event) -> dpb.DatasetResponse:
    return to_progress(e) if isinstance(e, Report) else dpb.DatasetResponse(result=to_result(e))


def to_result(r: JobResult) -> dpb.DatasetResult:
    cost = pb.Cost(model_evaluations=r.evaluations, elapsed_ms=r.elapsed_ms, budget_ms=r.budget_ms,
                   budget_source=r.budget_source, budget_exhausted=bool(r.stopped),
                   converged=not r.stopped)
    out = dpb.DatasetResult(model=r.model, version=r.version, kind=r.kind, labels=r.labels,
                            output_names=r.output_names, dataset_rows=r.dataset_rows,
                            rows=r.rows, cost=cost, stopped=r.stopped, notes=r.notes,
                            scale=r.scale)
    v = r.value
    if isinstance(v, PermutationImportance):
        out.permutation.CopyFrom(to_importance(v))
    elif isinstance(v, PartialDependence):
        out.dependence.CopyFrom(to_dependence(v))
    elif isinstance(v, DatasetShapley):
        out.shapley.CopyFrom(to_shapley(v, r.per_row))
    else:
        out.projection.CopyFrom(to_projection(v))
    return out


def to_importance(v: PermutationImportance) -> dpb.PermutationImportanceResult:
    return dpb.PermutationImportanceResult(
        metric=v.metric, baseline_score=v.baseline_score, mean=v.mean, std_errors=v.std_errors,
        importances=from_array("importances", v.importances))


def to_dependence(v: PartialDependence) -> dpb.PartialDependenceResult:
    return dpb.PartialDependenceResult(
        features=v.features, grid=[from_array(f"grid[{k}]", a) for k, a in
                                   enumerate(v.grid_values)],
        average=from_array("average", v.average), std_errors=from_array("std_errors", v.std_errors),
        individual=from_array("individual", v.individual), ice_rows=v.ice_rows)


def to_shapley(v: DatasetShapley, per_row: bool) -> dpb.DatasetShapleyResult:
    out = dpb.DatasetShapleyResult(
        mean_abs=from_array("mean_abs", v.mean_abs), mean_abs_se=from_array("mean_abs_se",
                                                                            v.mean_abs_se),
        mean=from_array("mean", v.mean), mean_se=from_array("mean_se", v.mean_se),
        methods=v.methods)
    if v.interactions is not None:
        out.interactions.CopyFrom(from_array("interactions", v.interactions.mean_abs))
    if per_row:
        out.row_indices.extend(v.rows)
        values = v.feature_values if v.feature_values is not None else \
            np.full((v.rows.size, v.values.shape[2]), np.nan)
        out.values.CopyFrom(from_array("values", v.values))
        out.std_errors.CopyFrom(from_array("std_errors", v.std_errors))
        out.base_values.CopyFrom(from_array("base_values", v.base_values))
        out.predictions.CopyFrom(from_array("predictions", v.predictions))
        out.feature_values.CopyFrom(from_array("feature_values", np.asarray(values, np.float64)))
    return out


def to_projection(v: Projected) -> dpb.ProjectionResult:
    p = v.projection
    return dpb.ProjectionResult(
        method=p.method, layer=v.layer, coordinates=from_array("coordinates", p.coordinates),
        explained_variance_ratio=p.explained_variance_ratio,
        predictions=from_array("predictions", v.predictions), row_indices=v.rows)


def to_live(r: LiveResult) -> dpb.LiveImportance:
    f = r.figures
    return dpb.LiveImportance(model=r.model, version=r.version, feature_names=r.feature_names,
                              mean_abs=f.mean_abs, std_errors=f.std_errors, rows=f.rows,
                              replicas=f.replicas, window_seconds=f.window_seconds, notes=r.notes)


"""Dataset-wide explanations from the client: a job streamed to `Datasets.ExplainDataset` (the
job, then the rows in chunks, labels alongside), its progress handed to a callback, and its
result as the plain result types the plots draw (service/client/results.py), each with the
job's summary (`Job`: rows, cost, why it stopped, notes). grpcio, protobuf and numpy only."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.client.explanation import Cost, Explanation, cost_of
from service.client.inputs import Inputs
from service.client.results import Embedding, Importance, PartialDependence, PartialDependence2D
from service.client.wire import Array, array, tensor
from sidelight.v1 import datasets_pb2 as dpb

ProgressHook = Callable[[dpb.DatasetProgress], None]
CHUNK_ROWS = 256  # rows per message: the server's default max_rows_per_request


@dataclass(frozen=True)
class Job:
    """What every dataset result says about its job."""

    model: str
    version: str
    kind: str
    rows: int  # rows used
    dataset_rows: int
    cost: Cost
    stopped: str  # "" = finished; "deadline", "max_evaluations", "budget": covers the work done
    notes: tuple[str, ...]
    scale: str
    output_names: tuple[str, ...]


@dataclass(frozen=True)
class PermutationImportance(Importance):
    """Permutation importance: the mean drop per player (`values`) and its standard error,
    every repeat's drop, and the score on the unpermuted rows."""

    importances: Array | None = None  # (players, repeats)
    baseline_score: float = float("nan")
    job: Job | None = None


@dataclass(frozen=True)
class Dependence(PartialDependence):
    """One feature's PDP and ICE curves for one output (`outputs` holds every output's)."""

    ice_rows: Array | None = None  # (ice rows,) their indices in the dataset
    outputs: Array | None = None  # (outputs, points) every output's PDP
    job: Job | None = None


@dataclass(frozen=True)
class Dependence2D(PartialDependence2D):
    """A pair's PDP: (nx, ny) for one output, (nx, ny, outputs) for several (the decision
    regions of a classifier), with its standard errors."""

    std_errors: Array | None = None  # like values
    job: Job | None = None


@dataclass(frozen=True)
class DatasetShapley:
    """Shapley values over a dataset: mean |phi| and mean phi per output and player with their
    standard errors across rows; with rows, every row's values (`explanation`, which
    `plots.beeswarm` draws); with interactions, mean |TreeSHAP interaction|."""

    feature_names: tuple[str, ...]
    output_names: tuple[str, ...]
    mean_abs: Array  # (outputs, players)
    mean_abs_se: Array
    mean: Array
    mean_se: Array
    methods: tuple[str, ...]
    job: Job
    explanation: Explanation | None = None
    row_indices: Array | None = None  # (rows,)
    interactions: Array | None = None  # (outputs, features, features)

    def importance(self, output: int = 0) -> Importance:
        """Mean |phi| of one output as an Importance (`plots.importance` draws it)."""
        return Importance(self.feature_names, self.mean_abs[output], self.mean_abs_se[output],
                          method="Shapley",
                          metric=f"mean |attribution| ({self.output_names[output]})")


@dataclass(frozen=True)
class Projection(Embedding):
    """Rows projected on their principal components (of the inputs or of a layer)."""

    explained_variance_ratio: Array | None = None  # (components,)
    predictions: Array | None = None  # (rows, outputs)
    row_indices: Array | None = None
    job: Job | None = None


@dataclass(frozen=True)
class LiveImportance(Importance):
    """Mean |attribution| per feature over the answers served recently (every replica's)."""

    rows: int = 0
    replicas: int = 0
    window_seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())


def requests(job: dpb.DatasetJob, inputs: Inputs | None, labels: Array | None,
             chunk_rows: int = CHUNK_ROWS) -> Iterator[dpb.DatasetRequest]:
    """The job, then the rows (and their labels) in chunks of `chunk_rows`; labels that do
    not fit the rows are refused before anything is sent."""
    rows = 0 if inputs is None else inputs.rows
    if labels is not None and len(labels) != rows:
        raise ValueError(f"labels: {len(labels)} for {rows} rows; one per row")

    def messages() -> Iterator[dpb.DatasetRequest]:
        yield dpb.DatasetRequest(job=job)
        for start in range(0, rows, max(1, chunk_rows)):
            assert inputs is not None
            message = dpb.DatasetRequest(inputs=inputs.slice(start, start + chunk_rows)
                                         .tensors())
            if labels is not None:
                message.labels.CopyFrom(tensor("labels", labels[start:start + chunk_rows]))
            yield message
    return messages()


def labels_of(y: Any) -> Array | None:
    """Labels as an array: class indices stay integers, anything else becomes float64."""
    if y is None:
        return None
    values = np.asarray(y.to_numpy() if hasattr(y, "to_numpy") else y)
    return values.astype(np.int64 if values.dtype.kind in "biu" else np.float64)


def collect(responses: Iterator[dpb.DatasetResponse],
            on_progress: ProgressHook | None) -> dpb.DatasetResult:
    """Hand each progress report to `on_progress`; the result."""
    for response in responses:
        if response.HasField("result"):
            return response.result
        if on_progress is not None:
            on_progress(response.progress)
    raise RuntimeError("ExplainDataset ended without a result")


def job_of(r: dpb.DatasetResult) -> Job:
    return Job(r.model, r.version, r.kind, r.rows, r.dataset_rows, cost_of(r.cost), r.stopped,
               tuple(r.notes), r.scale, tuple(r.output_names))


def importance_of(r: dpb.DatasetResult) -> PermutationImportance:
    p = r.permutation
    drop = f"drop in {p.metric}" if p.metric != "mean_abs_change" \
        else "mean |change| of the output"
    return PermutationImportance(tuple(r.labels), np.array(p.mean), np.array(p.std_errors),
                                 "permutation", drop, array(p.importances), p.baseline_score,
                                 job_of(r))


def dependence_of(r: dpb.DatasetResult, output: int = 0) -> Dependence | Dependence2D:
    """One feature: that output's curve (every output's in `outputs`); a pair: the surface,
    with an outputs axis last when there are several (decision regions)."""
    d = r.dependence
    grid, average, se = [array(g) for g in d.grid], array(d.average), array(d.std_errors)
    names = tuple(r.labels)
    if len(grid) == 1:
        ice = array(d.individual)  # (outputs, ice rows, points)
        return Dependence(names[0], grid[0], average[output], se[output],
                          ice[output] if ice.size else None, r.output_names[output],
                          np.array(d.ice_rows), average, job_of(r))
    several = average.shape[0] > 1
    values = np.moveaxis(average, 0, -1) if several else average[0]  # (nx, ny[, outputs])
    errors = np.moveaxis(se, 0, -1) if several else se[0]
    return Dependence2D((names[0], names[1]), grid[0], grid[1], values,
                        tuple(r.output_names) if several else (), output=r.output_names[0]
                        if not several else "", std_errors=errors, job=job_of(r))


def shapley_of(r: dpb.DatasetResult) -> DatasetShapley:
    s, job = r.shapley, job_of(r)
    explanation = rows_of(r) if s.HasField("values") else None
    return DatasetShapley(tuple(r.labels), tuple(r.output_names), array(s.mean_abs),
                          array(s.mean_abs_se), array(s.mean), array(s.mean_se),
                          tuple(s.methods), job, explanation,
                          np.array(s.row_indices) if s.row_indices else None,
                          array(s.interactions) if s.HasField("interactions") else None)


def rows_of(r: dpb.DatasetResult) -> Explanation:
    """Every row's values as an Explanation (intervals: 1.96 standard errors), the players'
    input values as its data (a beeswarm's colours)."""
    s = r.shapley
    values, se = array(s.values), array(s.std_errors)
    data = array(s.feature_values)
    inputs = {} if np.all(np.isnan(data)) else {"feature_values": data}
    return Explanation(r.model, r.version, "+".join(s.methods), values, se, values - 1.96 * se,
                       values + 1.96 * se, array(s.base_values), array(s.predictions),
                       tuple(r.labels), tuple(r.output_names), cost_of(r.cost), tuple(r.notes),
                       inputs=inputs, scale=r.scale)


def projection_of(r: dpb.DatasetResult) -> Projection:
    """Coordinates coloured by the predicted class (several outputs) or the prediction."""
    p = r.projection
    predictions = array(p.predictions)  # (rows, outputs)
    several = predictions.shape[1] > 1
    classes = tuple(r.output_names[k] for k in predictions.argmax(axis=1)) if several else ()
    return Projection(p.layer or "inputs", array(p.coordinates), classes,
                      None if several else predictions[:, 0], (),
                      np.array(p.explained_variance_ratio), predictions,
                      np.array(p.row_indices), job_of(r))


def live_of(r: dpb.LiveImportance) -> LiveImportance:
    return LiveImportance(tuple(r.feature_names), np.array(r.mean_abs), np.array(r.std_errors),
                          "live", "mean |attribution|", r.rows, r.replicas, r.window_seconds,
                          tuple(r.notes))


def feature_index(names: Sequence[str], features: Sequence[int | str]) -> list[int]:
    """Features by position or by name."""
    out = []
    for f in features:
        if isinstance(f, str):
            if f not in names:
                raise ValueError(f"feature {f!r}: the model's features are {list(names)}")
            out.append(list(names).index(f))
        else:
            out.append(int(f))
    return out

"""Dataset-wide explanations as long jobs, decided here and computed by explainers/global_:
permutation importance, partial dependence and ICE, dataset-wide Shapley values and
projections, over rows streamed with the request or a stored dataset (a background by name).

A job is one call: admitted like Explain (in flight, drained, cancelled with the others), it
computes only while it holds a core (earliest deadline first, service/plane/scheduler.py), and
it stops at its next yield point when its client goes away. Its budget (budget_ms, else the
deadline less a margin, else DEFAULT_JOB_S), max_evaluations and max_rows reach the algorithms
through `jobs.Control`; a cap that ends a job early is said in the result's `stopped` and notes,
as is a row sample. Dataset-wide Shapley explains each row on the Explain path itself
(`DataPlane.explain_admitted`): the same budgets, players, methods, guard and error bars.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

from explainers.base import Array, Budget, Evaluator, Explanation
from explainers.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    clip,
    quoted,
)
from explainers.global_.dataset_shapley import DatasetShapley, dataset_shapley
from explainers.global_.dependence import GridSpec, PartialDependence, partial_dependence
from explainers.global_.interactions import tree_interactions
from explainers.global_.jobs import Control as JobControl
from explainers.global_.jobs import Job, JobInfo, Meter, Progress
from explainers.global_.permutation_importance import (
    PermutationImportance,
    permutation_importance,
)
from explainers.global_.projection import Projection, pca
from explainers.global_.scores import CLASSIFICATION, METRICS
from explainers.groups import Groups
from explainers.layers.graph import Exposed, check_names
from explainers.memory import ByteLru
from service.models.inputs import Layout
from service.plane.admission import FIXED_S
from service.plane.dataplane import DataPlane
from service.plane.grouping import GroupRequest
from service.plane.live import LiveImportance, LiveResult
from service.plane.players import resolve_players
from service.plane.requests import ExplainQuery, assemble, check_name
from service.plane.reserve import reserve_s
from service.plane.rows import CHUNK_BYTES
from service.plane.scheduler import Control
from service.plane.targets import Target, resolve_target, target_fn
from service.store.backgrounds import DEFAULT_NAME

KINDS = ("permutation_importance", "partial_dependence", "shapley", "projection")
DEFAULT_JOB_S = 60.0  # a job's budget when neither budget_ms nor a deadline says
RECEIVING_EVERY_S = 0.25  # "receiving" reports at most this often
DEFAULT_REPEATS, DEFAULT_ICE_ROWS, DEFAULT_COMPONENTS = 5, 50, 2
PERMUTED_PLAYERS = 64  # an image's default grid for permutation importance, at most
PROJECTED_BYTES = 256 << 20  # activations a projection holds at most (rows x layer, float64)
EXPOSED_BYTES = 64 << 20  # exposed copies of graphs kept for projections
R = TypeVar("R")


@dataclass(frozen=True)
class DependenceQuery:
    features: tuple[int, ...] = ()
    resolution: int = 0  # 0 = 100
    percentile_low: float = 0.0  # both 0 = 0.05 and 0.95
    percentile_high: float = 0.0
    spacing: str = ""  # "" = uniform
    ice_rows: int = 0  # 0 = DEFAULT_ICE_ROWS, -1 = none


@dataclass(frozen=True)
class ShapleyQuery:
    method: str = ""
    background: str = ""
    target_error: float = 0.0
    rows: bool = False
    interactions: bool = False


@dataclass(frozen=True)
class JobQuery:
    """A DatasetJob in domain terms. `deadline_s` is the time left on the caller's clock."""

    model: str
    kind: str
    version: str = ""
    dataset: str = ""
    output: str = ""
    classes: tuple[int, ...] = ()
    scale: str = ""
    budget_ms: float = 0.0
    deadline_s: float | None = None
    seed: int = 0
    max_rows: int = 0
    max_evaluations: int = 0
    groups: GroupRequest = field(default_factory=GroupRequest)
    metric: str = ""
    repeats: int = 0
    dependence: DependenceQuery = field(default_factory=DependenceQuery)
    shapley: ShapleyQuery = field(default_factory=ShapleyQuery)
    layer: str = ""
    components: int = 0


@dataclass(frozen=True)
class Block:
    """One message's rows: tensors per input name (as Explain's) and labels, either optional."""

    inputs: tuple[tuple[str, Array], ...] = ()
    labels: Array | None = None
    index: int = 0  # the message's position in the stream (errors say which)


@dataclass(frozen=True)
class Projected:
    """A projection with what the answer adds: the layer, predictions and the rows used."""

    projection: Projection
    layer: str
    predictions: Array  # (rows, outputs)
    rows: Array  # (rows,) indices into the dataset, ascending


Value = PermutationImportance | PartialDependence | DatasetShapley | Projected


@dataclass(frozen=True)
class JobResult:
    """A finished (or stopped) job, as DatasetResult says it."""

    model: str
    version: str
    kind: str
    labels: tuple[str, ...]
    output_names: tuple[str, ...]
    dataset_rows: int
    rows: int
    evaluations: int
    elapsed_ms: float
    budget_ms: float
    budget_source: str
    stopped: str
    notes: tuple[str, ...]
    scale: str
    value: Value
    per_row: bool = False  # Shapley: every row's values are part of the answer


@dataclass(frozen=True)
class Report:
    """A progress report as DatasetProgress says it."""

    stage: str  # "receiving" or "running"
    done: int
    total: int
    unit: str
    elapsed_ms: float
    remaining_ms: float  # -1 before the first unit


Event = Report | JobResult


class DatasetPlane:
    """Dataset jobs and live importance over a data plane's models, store and cores."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.live = LiveImportance(plane)
        self.exposed: ByteLru[tuple[str, str], Exposed] = ByteLru(EXPOSED_BYTES)
        self.evaluated = 0  # model rows evaluated by jobs (tests watch it stop on cancel)
        self.running = 0  # jobs in flight

    @contextmanager
    def open(self, q: JobQuery, control: Control) -> Iterator[DatasetJob]:
        """A job admitted as in-flight work for as long as the context lasts; the job's
        options are checked before any row is read."""
        start = time.monotonic()
        with self.plane.in_flight(control):
            job = DatasetJob(self, q, control, start)
            ticket = self.plane.admission.admit(job.deadline, FIXED_S, control)
            self.running += 1
            try:
                yield job
            finally:
                self.running -= 1
                self.plane.admission.done(ticket)

    def live_importance(self, model: str, version: str = "",
                        window_s: float = 0.0) -> LiveResult:
        return self.live.importance(model, version, window_s)

    def count(self, rows: int) -> None:
        self.evaluated += rows


class DatasetJob:
    """One ExplainDataset call: its options resolved, its rows as they arrive, then the run."""

    def __init__(self, owner: DatasetPlane, q: JobQuery, control: Control, start: float) -> None:
        self.owner, self.plane, self.q, self.control, self.start = (owner, owner.plane, q,
                                                                    control, start)
        self.kind = _kind(q.kind)
        self.model = self.plane.repo.get(q.model, q.version)
        self.target = self._target()
        self.budget_s, self.source = self._budget()
        self.deadline = start + self.budget_s - reserve_s(self.budget_s, 1)
        control.deadline, control.cores = self.deadline, self.plane.cores
        _check_options(q, self.kind)
        if q.dataset:
            check_name(q.dataset)
        self.blocks: list[Array] = []  # (rows, elements) each
        self.labels: list[Array] = []
        self.layout: Layout | None = None
        self.received = 0
        self._reported = -math.inf

    # --- options --------------------------------------------------------------------------
    def _target(self) -> Target:
        """The explained target; scored metrics on class probabilities use the identity."""
        q = self.q
        return resolve_target(self.model, q.output, q.classes, q.scale)

    def scored(self, metric: str) -> Target:
        """The target a metric scores: class probabilities (the identity scale) for accuracy
        and log-loss; the job's target otherwise."""
        if metric not in CLASSIFICATION or self.target.scale == "identity":
            return self.target
        if self.q.scale:
            raise InvalidArgument(f"target.scale: {metric} scores class probabilities; use "
                                  "identity")
        return replace(self.target, scale="identity")

    def metric(self, labelled: bool) -> str:
        """The metric asked for, or the default: accuracy for classifiers, r2 otherwise (with
        labels), mean_abs_change (without)."""
        name = self.q.metric.strip().lower()
        if name and name not in METRICS:
            known = ", ".join(sorted(set(METRICS.values())))
            raise InvalidArgument(f"permutation.metric: {quoted(self.q.metric)}; one of {known}")
        if name or not labelled:
            return METRICS.get(name, name)
        model = self.model
        classifier = bool(model.config.class_names) or bool(model.onnx.class_labels)
        return "accuracy" if classifier else "r2"

    def _budget(self) -> tuple[float, str]:
        """Seconds for the job: budget_ms, else the deadline less a margin, else 60 s; never
        past the deadline."""
        q, s = self.q, self.plane.settings
        if not math.isfinite(q.budget_ms) or q.budget_ms < 0:
            raise InvalidArgument("job.budget_ms: must be a finite number >= 0")
        by_deadline = None if q.deadline_s is None else \
            q.deadline_s - max(s.deadline_margin_ms / 1e3, 0.05 * q.deadline_s)
        budget, source = (q.budget_ms / 1e3, "request") if q.budget_ms > 0 else \
            (by_deadline, "deadline") if by_deadline is not None else (DEFAULT_JOB_S, "default")
        if by_deadline is not None and by_deadline < budget:
            budget, source = by_deadline, "deadline"
        if budget <= 0:
            raise DeadlineExceeded("deadline: the call's deadline leaves no time for the job")
        return budget, source

    # --- rows -----------------------------------------------------------------------------
    def add(self, block: Block) -> Report | None:
        """Validate and keep one message's rows; a "receiving" report when one is due."""
        if block.inputs:
            self._add_rows(block)
        if block.labels is not None:
            self._add_labels(block)
        now = time.monotonic()
        if now - self._reported < RECEIVING_EVERY_S:
            return None
        self._reported = now
        return Report("receiving", self.received, 0, "rows", 1e3 * (now - self.start), -1.0)

    def _add_rows(self, block: Block) -> None:
        if self.q.dataset:
            raise InvalidArgument(f"job.dataset: names the stored dataset {quoted(self.q.dataset)}"
                                  "; send no rows with it")
        s = self.plane.settings
        try:
            X, layout = assemble(self.model, block.inputs, s.max_rows_per_request)
        except InvalidArgument as err:
            raise InvalidArgument(f"{err} (message {block.index})") from None
        if self.layout is not None and layout.key != self.layout.key:
            raise InvalidArgument(f"inputs: message {block.index}'s rows are shaped "
                                  f"{list(layout.key)}, the first's {list(self.layout.key)}")
        rows = self.received + X.shape[0]
        if rows > s.max_background_rows or rows * X.shape[1] > s.max_background_cells:
            raise InvalidArgument(
                f"inputs: more than the dataset limits max_background_rows="
                f"{s.max_background_rows}, max_background_cells={s.max_background_cells} "
                "(datasets are held like backgrounds); send a sample (or set max_rows)")
        self.layout, self.received = layout, rows
        self.blocks.append(X)

    def _add_labels(self, block: Block) -> None:
        labels = np.asarray(block.labels)
        rows = self.blocks[-1].shape[0] if block.inputs else None
        if labels.ndim not in (1, 2) or (rows is not None and labels.shape[0] != rows) \
                or labels.dtype.kind not in "biuf":
            raise InvalidArgument(f"labels: message {block.index} has labels of shape "
                                  f"{list(labels.shape)}; one number per row (or [rows, "
                                  f"outputs]) of the message's {rows} rows")
        if self.labels and labels.shape[1:] != self.labels[0].shape[1:]:
            raise InvalidArgument(f"labels: message {block.index}'s labels are shaped unlike "
                                  "the first message's")
        self.labels.append(labels)

    def dataset(self) -> tuple[Array, Layout]:
        """The rows (rows, elements) and their layout: streamed, or the stored dataset."""
        if not self.q.dataset:
            if not self.blocks:
                raise InvalidArgument("inputs: no rows; stream the dataset's rows in inputs, or "
                                      "name a stored dataset in job.dataset")
            assert self.layout is not None
            return np.concatenate(self.blocks), self.layout
        try:
            _, stored = self.plane.background(self.model, self.q.dataset, self.target)
        except NotFound:
            raise NotFound(f"job.dataset: model {self.model.name!r} version "
                           f"{self.model.version} has no stored dataset "
                           f"{quoted(self.q.dataset)}; store one with PutBackground") from None
        return stored.data, self.model.onnx.layout

    def labels_for(self, rows: int) -> Array | None:
        if not self.labels:
            return None
        y = np.concatenate(self.labels)
        if y.shape[0] != rows:
            raise InvalidArgument(f"labels: {y.shape[0]} labels for the dataset's {rows} rows; "
                                  "one per row")
        return y

    # --- the run --------------------------------------------------------------------------
    def events(self) -> Iterator[Event]:
        """Progress reports while the job runs, then its result."""
        X, layout = self.dataset()
        if X.shape[0] < 2:
            raise InvalidArgument(f"inputs: {X.shape[0]} row(s); a dataset job needs at least 2")
        run = RUNNERS[self.kind]
        value, info = yield from run(self, X, layout)
        yield self._result(value, info, X.shape[0])

    def held(self, job: Job[R]) -> Generator[Report, None, R]:
        """Drive a pure job, holding a core only while it computes (a slow reader of the
        progress never keeps a core); its reports become "running" reports."""
        cores = self.plane.cores
        while True:
            with cores.held(self.control):
                try:
                    p = next(job)
                except StopIteration as done:
                    result: R = done.value
                    return result
            yield self.running(p)

    def running(self, p: Progress) -> Report:
        left = -1.0 if math.isinf(p.remaining_s) else 1e3 * p.remaining_s
        return Report("running", p.done, p.total, p.unit, 1e3 * (time.monotonic() - self.start),
                      left)

    def job_control(self, rows: int) -> JobControl:
        """The pure jobs' control: the budget, the call's cancellation, the row cap."""
        q = self.q
        budget = Budget(self.deadline, q.max_evaluations or None)
        cap = q.max_rows if q.max_rows and q.max_rows < rows else None
        return JobControl(budget, lambda: self.control.cancelled, cap)

    def evaluator(self, layout: Layout, target: Target | None = None) -> Evaluator:
        """The explained function, counted, chunked in bytes, pausing at the call's yield
        points (its core handed to an earlier deadline; Cancelled once the call ended)."""
        fn = target_fn(self.model, target or self.target, layout)
        owner = self.owner

        def counted(X: Array) -> Array:
            owner.count(X.shape[0])
            return fn(X)
        onnx = self.model.onnx
        chunk = max(1, min(onnx.chunk_rows, CHUNK_BYTES // max(1, 8 * layout.elements)))
        return Evaluator(counted, chunk, onnx.rows_per_second, dtype=onnx.batch_dtype,
                         pause=self.control.pause, path_major=onnx.has_trees)

    def _result(self, value: Value, info: JobInfo, dataset_rows: int) -> JobResult:
        rows = _rows_used(value)
        notes = [*info.notes]
        if rows < dataset_rows and not info.stopped:
            notes.insert(0, f"max_rows: a seeded random sample of {rows} of the {dataset_rows} "
                         "rows was used")
        if self.labels and self.kind != "permutation_importance":
            notes.append(f"labels: not used by {self.kind}")
        if info.stopped:
            notes.insert(0, f"stopped ({info.stopped}): the result covers the work done "
                         f"before it ({_done(value, self.q)}; {rows} of {dataset_rows} rows)")
        return JobResult(self.model.name, self.model.version, self.kind, _labels(value, self),
                         self.target.names, dataset_rows, rows, info.evaluations,
                         1e3 * (time.monotonic() - self.start), 1e3 * self.budget_s, self.source,
                         info.stopped, tuple(dict.fromkeys(notes)), self.target.scale, value,
                         self.q.shapley.rows)


Outcome = Generator[Report, None, tuple[Value, JobInfo]]


# --- the kinds -----------------------------------------------------------------------------
def run_importance(job: DatasetJob, X: Array, layout: Layout) -> Outcome:
    """Permutation importance of the players on the target, scored against the labels."""
    q = job.q
    y = job.labels_for(X.shape[0])
    metric = job.metric(y is not None)
    if y is None and metric in METRICS and METRICS[metric] != "mean_abs_change":
        raise InvalidArgument(f"labels: metric {metric} needs labels, one per row (or [rows, "
                              "outputs]); without labels only mean_abs_change is measured")
    groups = _fixed_groups(job, layout)
    job.target = job.scored(METRICS.get(metric, metric))
    out = yield from job.held(permutation_importance(
        job.evaluator(layout), X, np.random.default_rng(q.seed), y, metric,
        q.repeats or DEFAULT_REPEATS, groups, job.job_control(X.shape[0])))
    return out, out.info


def run_dependence(job: DatasetJob, X: Array, layout: Layout) -> Outcome:
    """PDP and ICE over the grid of one feature or a pair."""
    d = job.q.dependence
    if any(not 0 <= f < X.shape[1] for f in d.features):
        raise InvalidArgument(f"dependence.features: {list(d.features)}; indices in "
                              f"0..{X.shape[1] - 1}")
    lo, hi = (d.percentile_low, d.percentile_high) if d.percentile_low or d.percentile_high \
        else (0.05, 0.95)
    spec = GridSpec(d.resolution or 100, (lo, hi), d.spacing or "uniform")
    ice = DEFAULT_ICE_ROWS if d.ice_rows == 0 else max(d.ice_rows, 0)
    out = yield from job.held(partial_dependence(
        job.evaluator(layout), X, d.features, np.random.default_rng(job.q.seed), spec, ice,
        job.job_control(X.shape[0])))
    return out, out.info


def run_shapley(job: DatasetJob, X: Array, layout: Layout) -> Outcome:
    """Every visited row explained on the Explain path, aggregated; TreeSHAP interactions
    over the same rows when asked."""
    q = job.q
    labels: list[str] = []  # the players, learnt from the first row's answer (aggregated
    # after the rows, so the job reads them filled in)
    explain = row_explainer(job, layout, labels)
    out = yield from job.held(dataset_shapley(explain, X, labels, np.random.default_rng(q.seed),
                                              job.job_control(X.shape[0])))
    if q.shapley.interactions:
        out = yield from _interactions(job, X, out)
    return out, out.info


def row_explainer(job: DatasetJob, layout: Layout,
                  labels: list[str]) -> Callable[[Array, Budget], Explanation]:
    """One row (elements,) explained like an Explain call of that row with the job's options
    and the row's share of the job's budget; every row must have the first row's players."""
    q, s = job.q, job.q.shapley
    base = ExplainQuery(q.model, (), q.version, s.method, q.output, q.classes, q.scale,
                        seed=q.seed, background=s.background, target_error=s.target_error,
                        groups=q.groups)

    def explain(x: Array, budget: Budget) -> Explanation:
        inputs = tuple((spec.name, part) for spec, part in
                       zip(layout.specs, layout.split(x[None]), strict=True))
        query = replace(base, inputs=inputs, budget_ms=1e3 * max(budget.remaining(), 1e-3),
                        max_evaluations=budget.max_evaluations or 0)
        try:
            result = job.plane.explain_admitted(query, job.control)
        except DeadlineExceeded as err:  # a row's share too small: the job ends on its budget
            raise ResourceExhausted(str(err)) from None
        if not result.rows:
            raise ResourceExhausted("budget: a row's share of the job's budget was too small")
        found = list(result.labels or (result.row_labels[0] if result.row_labels else ()))
        if labels and found != labels:
            raise InvalidArgument(f"groups: rows have different players ({clip(str(found))} "
                                  f"vs {clip(str(labels))}); set groups so every row has the "
                                  "same ones")
        labels[:] = found
        return result.rows[0]
    return explain


def _interactions(job: DatasetJob, X: Array,
                  out: DatasetShapley) -> Generator[Report, None, DatasetShapley]:
    """Mean |TreeSHAP interaction| of the rows explained, covers counted on the background."""
    model = job.model
    if model.trees is None:
        raise InvalidArgument(f"shapley.interactions: needs a tree ensemble; {model.tree_error}")
    _, background = job.plane.background(model, job.q.shapley.background or DEFAULT_NAME,
                                         job.target)
    found = yield from job.held(tree_interactions(model.trees, X[out.rows], background.data,
                                                  job.target.columns,
                                                  job.job_control(out.rows.size)))
    info = out.info
    merged = JobInfo(info.evaluations, info.elapsed_s + found.info.elapsed_s,
                     info.stopped or found.info.stopped, (*info.notes, *found.info.notes))
    return replace(out, interactions=found, info=merged)


def run_projection(job: DatasetJob, X: Array, layout: Layout) -> Outcome:
    """PCA of the rows (a seeded sample of max_rows), or of a layer's activations on them."""
    q = job.q
    control = job.job_control(X.shape[0])
    rows = np.sort(control.visit_order(X.shape[0], np.random.default_rng(q.seed)))  # (rows,)
    meter = Meter(int(rows.size), "rows")
    yield job.running(meter.progress())
    model = job.evaluator(layout)
    predictions, points = [], []
    step = _projection_step(job, layout, rows.size)
    for start in range(0, rows.size, step):
        control.check()
        with job.plane.cores.held(job.control):
            part = X[rows[start:start + step]]  # (chunk, elements)
            predictions.append(model(part))
            points.append(part if not q.layer else _activations(job, layout, part))
        for p in meter.advance(part.shape[0]):
            yield job.running(p)
    projected = pca(np.concatenate(points), q.components or DEFAULT_COMPONENTS)
    info = meter.info(model)
    return Projected(projected, q.layer, np.concatenate(predictions), rows), info


def _projection_step(job: DatasetJob, layout: Layout, rows: int) -> int:
    """Rows per chunk, and a refusal when the activations would not fit PROJECTED_BYTES."""
    if not job.q.layer:
        return max(1, min(rows, 4096))
    exposed = _exposed(job)
    per_row = exposed.row_bytes()
    if per_row is not None and rows * per_row * 2 > PROJECTED_BYTES:  # float64 copies
        raise ResourceExhausted(f"projection.layer: {rows} rows of {quoted(job.q.layer)} take "
                                f"{rows * per_row * 2} bytes; at most {PROJECTED_BYTES}: set "
                                "max_rows")
    return max(1, min(rows, CHUNK_BYTES // max(1, per_row or 8 * layout.elements)))


def _exposed(job: DatasetJob) -> Exposed:
    """The graph with the layer as its output, built once per model file and layer."""
    proto = job.model.onnx.proto
    check_names(proto, [job.q.layer], "projection.layer")
    return job.owner.exposed.get_or_build((job.model.sha256, job.q.layer),
                                          lambda: Exposed(proto, [job.q.layer]))


def _activations(job: DatasetJob, layout: Layout, part: Array) -> Array:
    """The layer's values for the rows (chunk, ...) flattened to (chunk, dims)."""
    values = np.asarray(_exposed(job).run(layout.feeds(part))[job.q.layer])
    if values.ndim < 1 or values.shape[0] != part.shape[0]:
        raise InvalidArgument(f"projection.layer: {quoted(job.q.layer)} is shaped "
                              f"{list(values.shape)} for {part.shape[0]} rows; it has no row "
                              "axis first")
    job.owner.count(part.shape[0])
    return np.asarray(values.reshape(part.shape[0], -1), np.float64)


RUNNERS: dict[str, Callable[[DatasetJob, Array, Layout], Outcome]] = {
    "permutation_importance": run_importance, "partial_dependence": run_dependence,
    "shapley": run_shapley, "projection": run_projection}


# --- helpers -------------------------------------------------------------------------------
def _kind(kind: str) -> str:
    key = kind.strip().lower()
    if key not in KINDS:
        raise InvalidArgument(f"job.kind: {quoted(kind)}; one of {', '.join(KINDS)}")
    return key


def _check_options(q: JobQuery, kind: str) -> None:
    """The job's numbers, checked before any row is read."""
    if q.max_rows < 0 or q.max_rows == 1:
        raise InvalidArgument("job.max_rows: 0 (all rows) or at least 2")
    if q.max_evaluations < 0:
        raise InvalidArgument("job.max_evaluations: must be >= 0")
    if kind == "permutation_importance" and q.repeats and q.repeats < 2:
        raise InvalidArgument("permutation.repeats: at least 2 (for a standard error)")
    if kind == "partial_dependence":
        _check_dependence(q.dependence)
    if kind == "shapley" and (not math.isfinite(q.shapley.target_error)
                              or q.shapley.target_error < 0):
        raise InvalidArgument("shapley.target_error: must be a finite number >= 0")
    if kind == "projection" and q.components not in (0, 2, 3):
        raise InvalidArgument("projection.components: 2 or 3 (0 = 2)")


def _check_dependence(d: DependenceQuery) -> None:
    if len(d.features) not in (1, 2) or len(set(d.features)) != len(d.features):
        raise InvalidArgument(f"dependence.features: one or two distinct feature indices, got "
                              f"{clip(str(list(d.features)))}")
    if d.resolution == 1 or d.resolution < 0:
        raise InvalidArgument("dependence.resolution: 0 (100) or at least 2")
    if (d.percentile_low or d.percentile_high) and \
            not 0 <= d.percentile_low < d.percentile_high <= 1:
        raise InvalidArgument("dependence.percentile_low: 0 <= low < high <= 1 (both 0 = 0.05 "
                              "and 0.95)")
    if d.spacing not in ("", "uniform", "quantiles"):
        raise InvalidArgument(f"dependence.spacing: {quoted(d.spacing)}; uniform or quantiles")
    if d.ice_rows < -1:
        raise InvalidArgument("dependence.ice_rows: -1 (none), 0 (50) or a number of rows")


def _fixed_groups(job: DatasetJob, layout: Layout) -> Groups:
    """The players permuted: the request's groups, else the model's (columns or blocks; an
    image's grid of at most PERMUTED_PLAYERS patches); the same for every row."""
    players = resolve_players(job.model, layout, job.q.groups, None,
                              lambda d: d <= PERMUTED_PLAYERS)
    if players.fixed is None:
        raise InvalidArgument("groups: this model's players vary per row (tokens); send "
                              "groups.mask to permute the same elements in every row")
    return players.fixed


def _rows_used(value: Value) -> int:
    return value.rows if isinstance(value, PartialDependence) else int(value.rows.size)


def _done(value: Value, q: JobQuery) -> str:
    """What was done before a stop, in words."""
    if isinstance(value, PermutationImportance):
        return f"{value.repeats} of {q.repeats or DEFAULT_REPEATS} repeats"
    if isinstance(value, DatasetShapley) and value.interactions is not None:
        return f"interactions over {value.interactions.rows} rows"
    return "rows in a seeded random order"


def _labels(value: Value, job: DatasetJob) -> tuple[str, ...]:
    """The players (importance, Shapley), or the features varied (dependence)."""
    if isinstance(value, PermutationImportance | DatasetShapley):
        return tuple(value.labels)
    if isinstance(value, PartialDependence):
        names = job.model.feature_names
        return tuple(names[f] if f < len(names) else f"x[{f}]" for f in value.features)
    return ()


"""Prometheus metrics. One `Metrics` object per process, built on the registry it is given.

The request path only queues one tuple per call (`Recorder`, a lock-free deque); the
per-call and per-row series (outcomes, latency, cost, quality, cache lookups) and the drift
windows are updated from those records in batches: by a background thread every second, on
every scrape, and inline once the queue is long. A batch costs a few vectorised histogram
updates per label set instead of a dozen locked prometheus_client updates per call: a few
microseconds per call in all (docs/benchmarks.md).

Label sets are bounded: models and methods not in the repository are counted as `_unknown`, and
drift gauges carry at most `max_features` feature labels per model."""

from __future__ import annotations

import collections
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from explainers.base import Array
from service.monitoring.drift import DriftMonitor, DriftStats

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0,
                   5.0, 10.0, 30.0)
EVALUATION_BUCKETS = tuple(float(10**e) for e in range(1, 9))
RELATIVE_ERROR_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
GAP_BUCKETS = (1e-12, 1e-9, 1e-6, 1e-3, 1.0)
UNKNOWN = "_unknown"  # label for names not in the repository: keeps label sets bounded
REJECT_REASONS = ("overload", "admission", "shutdown")  # why a call is shed before any work
CODES = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
         "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL")  # what an Explain call can end with
CACHE_LABELS = tuple((cache, result) for cache in ("background", "derived", "result")
                     for result in ("hit", "miss"))  # (cache, result) of a lookup
FOLD_AT = 20_000  # queued records that make the recording thread fold inline (bounds memory)

T = TypeVar("T")
Record = tuple[Any, ...]
"""("call", model, method, code, seconds, cpu_seconds, Answer or None) or ("cache", cache,
outcome). Records hold strings, numbers and arrays, never the result objects, which are
freed as soon as the response is sent."""

class Answer(NamedTuple):
    """What metrics and drift need from one answered call: per-row scalars, and the rows'
    arrays as blocks with a leading rows axis, so a batch concatenates one block per call."""

    model: str
    version: str
    budget_ms: float
    spread: Array  # (outputs,) standard deviation of f(background)
    X: Array  # (rows, features) the request's inputs
    target: tuple[Any, ...]  # Target.key of the explained target
    methods: tuple[str, ...]  # per row
    evaluations: tuple[int, ...]
    exhausted: tuple[bool, ...]
    converged: tuple[bool, ...]
    samples: tuple[int, ...]  # 0 for exact methods, whose std_errors are all 0
    std_errors: Array  # (rows, outputs, players); zero-padded when rows have fewer players
    predictions: Array  # (rows, outputs)
    base: Array  # (rows, outputs) each row's base value (E f over its reference rows)
    values: Array  # (rows, outputs, players); zero-padded like std_errors
    cached: bool  # from the result cache: no cost or quality to count
    rows: int
    mixed: bool  # rows explained by different methods (auto may pick per row)
    additive: bool = True  # every row's values add up to prediction - base


def answer_of(result: Any) -> Answer:
    """The Answer of an ExplainResult with at least one row (duck-typed: metrics does not
    import the data plane). One row costs three views; more rows one array per kind."""
    rows = result.rows
    first = rows[0]
    additive = all(r.additive for r in rows)
    if len(rows) == 1:
        return Answer(result.model, result.version, result.budget_ms, result.spread, result.X,
                      result.target.key, (first.method,), (first.evaluations,),
                      (first.budget_exhausted,), (first.converged,), (first.samples,),
                      first.std_errors[None], first.prediction[None], first.base_values[None],
                      first.values[None], result.cached, 1, False, additive)
    methods, evaluations, exhausted, converged, samples = zip(
        *[(r.method, r.evaluations, r.budget_exhausted, r.converged, r.samples) for r in rows],
        strict=True)
    return Answer(result.model, result.version, result.budget_ms, result.spread, result.X,
                  result.target.key, methods, evaluations, exhausted, converged, samples,
                  _padded([r.std_errors for r in rows]), np.array([r.prediction for r in rows]),
                  np.array([r.base_values for r in rows]), _padded([r.values for r in rows]),
                  result.cached, len(rows), len(set(methods)) > 1, additive)


def _padded(arrays: list[Array]) -> Array:
    """(outputs, players) arrays as one (rows, outputs, most players) block, zeros appended
    where a row has fewer players (tokens): sums and maxima are unchanged."""
    width = max(a.shape[1] for a in arrays)
    if all(a.shape[1] == width for a in arrays):
        return np.array(arrays)
    return np.array([np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays])


@dataclass(frozen=True)
class DriftSource:
    """One monitored model version: its names and its monitor."""

    model: str
    version: str
    features: tuple[str, ...]  # already capped to the exported features
    feature_index: tuple[int, ...]  # their columns in the model's feature order
    outputs: tuple[str, ...]
    monitor: DriftMonitor
    target: object = None  # Target.key of the target the reference's predictions and phi are for


class Recorder:
    """Per-call records: appended lock-free on the hot path, handed in batches to the sinks."""

    def __init__(self, fold_at: int = FOLD_AT) -> None:
        self._queue: deque[Record] = deque()
        self._sinks: list[Callable[[list[Record]], None]] = []
        self._lock = threading.Lock()
        self._fold_at = fold_at

    def subscribe(self, sink: Callable[[list[Record]], None]) -> None:
        """Every later batch is also handed to `sink` (under the fold lock, in order)."""
        self._sinks.append(sink)

    def add(self, record: Record) -> None:
        self._queue.append(record)
        if len(self._queue) > self._fold_at:
            self.fold()

    def fold(self) -> None:
        """Hand every queued record to the sinks, oldest first."""
        with self._lock:
            self._fold()

    def folded(self, read: Callable[[], T]) -> T:
        """Fold, then run `read` before any other fold can change what it reads (or writes)."""
        with self._lock:
            self._fold()
            return read()

    def _fold(self) -> None:
        batch = self._drain()
        for sink in self._sinks if batch else ():
            try:
                sink(batch)
            except Exception:  # a broken sink must not stop the others or fail a request
                log.exception("metrics: a sink failed on %d records", len(batch))

    def _drain(self) -> list[Record]:
        out, pop = [], self._queue.popleft
        for _ in range(len(self._queue)):  # records appended meanwhile wait for the next fold
            out.append(pop())
        return out

    def run(self, every_seconds: float, stop: threading.Event) -> threading.Thread:
        """Fold every `every_seconds` on a daemon thread until `stop` is set."""
        def loop() -> None:
            while not stop.wait(every_seconds):
                self.fold()

        thread = threading.Thread(target=loop, name="sidelight-metrics", daemon=True)
        thread.start()
        return thread


@dataclass
class Histograms:
    """Prometheus histograms per label set, updated a batch of values at a time."""

    bounds: Array  # (buckets,) upper bounds, +Inf implied
    counts: dict[tuple[str, ...], Array] = field(default_factory=dict)
    sums: dict[tuple[str, ...], float] = field(default_factory=dict)

    @staticmethod
    def of(bounds: Sequence[float]) -> Histograms:
        return Histograms(np.asarray(bounds, np.float64))

    def add(self, labels: tuple[str, ...], values: Sequence[float] | Array,
            scale: float = 1.0) -> None:
        """Observe every value (times `scale`) under `labels`."""
        v = np.asarray(values, np.float64).ravel() * scale  # (values,)
        seen = v[~np.isnan(v)]  # like prometheus_client: NaN joins the sum, no bucket or count
        bucket = np.searchsorted(self.bounds, seen, side="left")  # first bound >= v: "le"
        counts = np.bincount(bucket, minlength=self.bounds.size + 1)
        self.counts[labels] = self.counts.get(labels, 0) + counts
        self.sums[labels] = self.sums.get(labels, 0.0) + float(v.sum())

    def family(self, name: str, doc: str, labelnames: Sequence[str]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=labelnames)
        names = [floatToGoString(b) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        for labels, counts in self.counts.items():
            cumulative = np.cumsum(counts).tolist()
            fam.add_metric(list(labels), list(zip(names, cumulative, strict=True)),
                           self.sums[labels])
        return fam


@dataclass
class Counters:
    """Prometheus counters per label set."""

    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def add(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def family(self, name: str, doc: str, labelnames: Sequence[str]) -> CounterMetricFamily:
        fam = CounterMetricFamily(name, doc, labels=labelnames)
        for labels, value in self.values.items():
            fam.add_metric(list(labels), value)
        return fam


def _by_method(a: Answer) -> list[Answer]:
    """The answer itself when one method explained all its rows (the usual case), else one
    single-row answer per row."""
    if not a.mixed:
        return [a]
    return [a._replace(methods=(a.methods[i],), evaluations=(a.evaluations[i],),
                       exhausted=(a.exhausted[i],), converged=(a.converged[i],),
                       samples=(a.samples[i],), std_errors=a.std_errors[i:i + 1],
                       predictions=a.predictions[i:i + 1], base=a.base[i:i + 1],
                       values=a.values[i:i + 1],
                       X=a.X[i:i + 1], rows=1, mixed=False) for i in range(a.rows)]


class Metrics:
    """Explanation cost, quality, outcome and drift metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.recorder = Recorder()
        self.model_ready = Gauge("sidelight_model_ready",
                                 "1 when a model version is loaded and serving, 0 if it failed.",
                                 ["model", "version"], registry=registry)
        self.model_reloads = Counter("sidelight_model_reloads", "Model versions loaded, "
                                     "refused (the version loaded before goes on serving) or "
                                     "removed by a look at the repository, by outcome.",
                                     ["model", "outcome"], registry=registry)
        self.redis_up = Gauge("sidelight_redis_up", "1 when the background store's Redis answers "
                              "(1 for the in-memory store).", registry=registry)
        self.redis_errors = Counter("sidelight_redis_errors", "Failed Redis operations.",
                                    registry=registry)
        self.in_flight = Gauge("sidelight_explain_in_flight", "Explain calls being served.",
                               registry=registry)
        self.rejected = Counter("sidelight_explain_rejected",
                                "Explain calls shed before any work, by reason.", ["reason"],
                                registry=registry)
        for reason in REJECT_REASONS:  # a series at 0 from the start: panels and rate() work
            self.rejected.labels(reason)
        self._calls = CallSeries()
        self.recorder.subscribe(self._calls.fold)
        registry.register(_Folded(self.recorder, self._calls.families))

    def initialise(self, models: Iterable[str], methods: Iterable[str]) -> None:
        """Zero series for the label values known once the models are loaded, so panels and
        alert rules read 0 instead of "no data", and a first increment is seen by rate()."""
        names, known = list(models), list(methods)
        self.recorder.folded(lambda: self._calls.initialise(names, known))

    def record_call(self, model: str, method: str, code: str, seconds: float,
                    cpu_seconds: float, answer: Answer | None = None) -> None:
        """Outcome, wall and CPU time of one Explain call, and its answer when there is one:
        its rows' cost and quality count unless it came from the cache."""
        self.recorder.add(("call", model, method, code, seconds, cpu_seconds, answer))

    def count_cache(self, cache: str, outcome: str) -> None:
        """One lookup of `cache` (background, derived, result) that was a hit or a miss."""
        self.recorder.add(("cache", cache, outcome))

    def watch_drift(self, sources: Callable[[], Iterable[DriftSource]]) -> None:
        """Export drift gauges computed at scrape time from each monitor's cached report."""
        self.registry.register(DriftCollector(sources, self.recorder.fold))


class CallSeries:
    """The per-call and per-row series, folded from records."""

    def __init__(self) -> None:
        self.requests = Counters()
        self.duration = Histograms.of(LATENCY_BUCKETS)
        self.budget = Histograms.of(LATENCY_BUCKETS)
        self.cpu_seconds = Counters()
        self.rows = Counters()
        self.evaluations = Histograms.of(EVALUATION_BUCKETS)
        self.exhausted = Counters()
        self.converged = Counters()
        self.relative_error = Histograms.of(RELATIVE_ERROR_BUCKETS)
        self.gap = Histograms.of(GAP_BUCKETS)
        self.cache = Counters()
        for labels in CACHE_LABELS:
            self.cache.add(labels, 0.0)

    def initialise(self, models: list[str], methods: list[str]) -> None:
        """Zero counters: outcomes per model for the default method ("auto"), rows per model
        and method that can run (the requested "auto" never labels a row)."""
        for model in models:
            self.cpu_seconds.add((model,), 0.0)
            for code in CODES:
                self.requests.add((model, "auto", code), 0.0)
            for method in (m for m in methods if m != "auto"):
                for series in (self.rows, self.exhausted, self.converged):
                    series.add((model, method), 0.0)

    def fold(self, batch: list[Record]) -> None:
        """Add a batch of records: one pass in Python to group them by label set, then numpy
        per group."""
        calls: dict[tuple[str, str, str], list[Record]] = {}
        caches: list[tuple[str, str]] = []
        for record in batch:
            if record[0] == "cache":
                caches.append(record[1:])
                continue
            group = calls.get(record[1:4])
            if group is None:
                group = calls[record[1:4]] = []
            group.append(record)
        for cache_labels, n in collections.Counter(caches).items():
            self.cache.add(cache_labels, n)
        for labels, records in calls.items():
            self._fold_calls(labels, records)

    def _fold_calls(self, labels: tuple[str, str, str], records: list[Record]) -> None:
        """Calls of one (model, method, code): ("call", ..., seconds, cpu, Answer | None)."""
        model, method, _ = labels
        _, _, _, _, seconds, cpu, answers = zip(*records, strict=True)
        self.requests.add(labels, len(records))
        self.cpu_seconds.add((model,), sum(cpu))
        self.duration.add((model, method), seconds)
        answered = [a for a in answers if a is not None and not a.cached and a.rows]
        if not answered:
            return
        self.budget.add((answered[0].model,), [a.budget_ms for a in answered], 1e-3)
        groups: dict[tuple[Any, ...], list[Answer]] = {}
        for a in answered:  # rows of one answer share its target's shape, usually its method
            for part in (_by_method(a) if a.mixed else (a,)):
                groups.setdefault((part.methods[0], part.values.shape[1:]), []).append(part)
        for (row_method, _), group in groups.items():
            self._fold_rows((answered[0].model, row_method), group)

    def _fold_rows(self, labels: tuple[str, ...], answers: list[Answer]) -> None:
        """Cost and quality of the rows of answers of one (model, method) and shape."""
        counts = [a.rows for a in answers]
        self.rows.add(labels, sum(counts))
        self.evaluations.add(labels, [e for a in answers for e in a.evaluations])
        self.exhausted.add(labels, sum(sum(a.exhausted) for a in answers))
        self.converged.add(labels, sum(sum(a.converged) for a in answers))
        if any(any(a.samples) for a in answers):
            std = np.concatenate([a.std_errors for a in answers])  # (rows, outputs, features)
            spread = np.repeat(np.array([a.spread for a in answers]), counts, axis=0)
            worst = std.max(axis=2)  # (rows, outputs); 0 stays 0 even where spread is 0
            ratio = np.divide(worst, spread, out=np.zeros_like(worst), where=worst != 0)
            self.relative_error.add(labels, ratio.max(axis=1))
        else:  # exact methods (no samples) have no error bars
            self.relative_error.add(labels, np.zeros(sum(counts)))
        additive = [a for a in answers if a.additive]  # occlusion, lime: no gap to measure
        if not additive:
            return
        base = np.concatenate([a.base for a in additive])  # (rows, outputs)
        values = np.concatenate([a.values for a in additive])  # (rows, outputs, players)
        gap = np.concatenate([a.predictions for a in additive]) - base - values.sum(axis=2)
        self.gap.add(labels, np.abs(gap))  # (rows, outputs)

    def families(self) -> Iterator[Metric]:
        mm = ["model", "method"]
        yield self.requests.family("sidelight_explain_requests", "Explain calls by outcome.",
                                   ["model", "method", "code"])
        yield self.duration.family("sidelight_explain_duration_seconds",
                                   "Wall time of Explain calls.", mm)
        yield self.budget.family("sidelight_explain_budget_seconds",
                                 "Budget that applied to each Explain call.", ["model"])
        yield self.evaluations.family("sidelight_explain_model_evaluations",
                                      "Model rows evaluated per explained row.", mm)
        yield self.cpu_seconds.family("sidelight_explain_cpu_seconds",
                                      "CPU time of the threads serving Explain calls.", ["model"])
        yield self.rows.family("sidelight_explain_rows", "Rows explained.", mm)
        yield self.exhausted.family("sidelight_explain_budget_exhausted",
                                    "Rows whose sampling stopped because time ran out.", mm)
        yield self.converged.family("sidelight_explain_converged", "Rows that met their "
                                    "accuracy goal (exact or target_error).", mm)
        yield self.relative_error.family(
            "sidelight_explain_relative_std_error",
            "Largest standard error of a row / standard deviation of f(background).", mm)
        yield self.gap.family("sidelight_explain_additivity_gap", "|f(x) - E f(background) - "
                              "sum(attributions)| per row and output.", mm)
        yield self.cache.family("sidelight_cache_requests", "Cache lookups by cache and result.",
                                ["cache", "result"])


class _Folded(Collector):
    """Folds the queued records, then reports the series built from them."""

    def __init__(self, recorder: Recorder, families: Callable[[], Iterator[Metric]]) -> None:
        self._recorder, self._families = recorder, families

    def collect(self) -> Iterator[Metric]:
        yield from self._recorder.folded(lambda: list(self._families()))

    def describe(self) -> Iterator[Metric]:
        return iter(())


class DriftCollector(Collector):
    """Reads every monitor's report (recomputed at most every few seconds) on scrape, after
    folding the queued requests into the windows."""

    def __init__(self, sources: Callable[[], Iterable[DriftSource]],
                 fold: Callable[[], None]) -> None:
        self._sources, self._fold = sources, fold

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self._fold()
        families = _drift_families()
        for source in self._sources():
            _add_source(families, source)
        yield from families.values()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from _drift_families().values()


def _drift_families() -> dict[str, GaugeMetricFamily]:
    def g(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=labels)

    return {
        "input_psi": g("sidelight_drift_input_psi", "PSI of each input feature, recent "
                       "requests vs the reference (NaN = no recent data).", ["model", "feature"]),
        "input_ks": g("sidelight_drift_input_ks", "Binned KS statistic of each input feature.",
                      ["model", "feature"]),
        "prediction_psi": g("sidelight_drift_prediction_psi", "PSI of each explained output.",
                            ["model", "output"]),
        "prediction_ks": g("sidelight_drift_prediction_ks", "Binned KS of each explained output.",
                           ["model", "output"]),
        "attribution_ratio": g("sidelight_drift_attribution_ratio", "Recent mean |attribution| "
                               "/ reference mean |attribution| per feature.",
                               ["model", "feature"]),
        "attribution_shift": g("sidelight_drift_attribution_shift", "(Recent - reference) "
                               "mean |attribution| per feature / the reference's total mean "
                               "|attribution|.", ["model", "feature"]),
        "attribution_rank": g("sidelight_drift_attribution_rank_change", "Top-k feature "
                              "turnover by mean |attribution|, 0 = same top features.",
                              ["model"]),
        "attribution_mean": g("sidelight_attribution_mean_abs", "Recent mean |attribution| per "
                              "feature (importance over time).", ["model", "feature"]),
        "window_rows": g("sidelight_drift_window_rows", "Rows in the drift window.", ["model"]),
    }


def _add_source(f: dict[str, GaugeMetricFamily], s: DriftSource) -> None:
    report = s.monitor.report()
    idx = list(s.feature_index)
    _add_stats(f["input_psi"], f["input_ks"], s.model, s.features, report.features, idx)
    f["window_rows"].add_metric([s.model], float(np.nanmax(report.features.observations)))
    if report.predictions is not None:
        outputs = list(range(len(s.outputs)))
        _add_stats(f["prediction_psi"], f["prediction_ks"], s.model, s.outputs,
                   report.predictions, outputs)
    if report.attributions is not None:
        a = report.attributions
        for name, j in zip(s.features, idx, strict=True):
            f["attribution_ratio"].add_metric([s.model, name], float(a.ratio[j]))
            f["attribution_shift"].add_metric([s.model, name], float(a.shift[j]))
            f["attribution_mean"].add_metric([s.model, name], float(a.mean_abs[j]))
        f["attribution_rank"].add_metric([s.model], float(a.rank_change))


def _add_stats(psi: GaugeMetricFamily, ks: GaugeMetricFamily, model: str,
               names: tuple[str, ...], stats: DriftStats, idx: list[int]) -> None:
    for name, j in zip(names, idx, strict=True):
        psi.add_metric([model, name], float(stats.psi[j]))
        ks.add_metric([model, name], float(stats.ks[j]))

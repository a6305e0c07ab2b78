"""Prometheus metrics. One `Metrics` object per process, built on the registry it is given.

Label sets are bounded: models and methods not in the repository are counted as `_unknown`, and
drift gauges carry at most `max_features` feature labels per model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from explainers.base import Array, Explanation
from service.drift import DriftMonitor, DriftStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0,
                   5.0, 10.0, 30.0)
EVALUATION_BUCKETS = tuple(float(10**e) for e in range(1, 9))
RELATIVE_ERROR_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
GAP_BUCKETS = (1e-12, 1e-9, 1e-6, 1e-3, 1.0)
UNKNOWN = "_unknown"  # label for names not in the repository: keeps label sets bounded


@dataclass(frozen=True)
class DriftSource:
    """One monitored model version: its names and its monitor."""

    model: str
    version: str
    features: tuple[str, ...]  # already capped to the exported features
    feature_index: tuple[int, ...]  # their columns in the model's feature order
    outputs: tuple[str, ...]
    monitor: DriftMonitor
    target: object = None  # the explained target the reference's predictions and phi are for


@dataclass(frozen=True)
class CallSeries:
    """The per-call series of one (model, method, code), looked up once: labels() costs a lock."""

    requests: Counter
    duration: Histogram
    cpu_seconds: Counter


@dataclass(frozen=True)
class RowSeries:
    """The per-row series of one (model, method), looked up once."""

    rows: Counter
    evaluations: Histogram
    relative_error: Histogram
    additivity_gap: Histogram
    budget_exhausted: Counter
    converged: Counter


class Metrics:
    """Explanation cost, quality, outcome and drift metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._outcomes(registry)
        self._cost(registry)
        self._quality(registry)
        self.model_ready = Gauge("sidelight_model_ready",
                                 "1 when a model version is loaded and serving, 0 if it failed.",
                                 ["model", "version"], registry=registry)
        self.cache = Counter("sidelight_cache_requests", "Cache lookups by cache and result.",
                             ["cache", "result"], registry=registry)
        self.redis_up = Gauge("sidelight_redis_up", "1 when the background store's Redis answers "
                              "(1 for the in-memory store).", registry=registry)
        self.redis_errors = Counter("sidelight_redis_errors", "Failed Redis operations.",
                                    registry=registry)
        self._call_series: dict[tuple[str, str, str], CallSeries] = {}  # bounded like labels
        self._row_series: dict[tuple[str, str], RowSeries] = {}

    def _outcomes(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("sidelight_explain_requests", "Explain calls by outcome.",
                                ["model", "method", "code"], registry=registry)
        self.in_flight = Gauge("sidelight_explain_in_flight", "Explain calls being served.",
                               registry=registry)
        self.rejected = Counter("sidelight_explain_rejected",
                                "Explain calls shed before any work, by reason.", ["reason"],
                                registry=registry)

    def _cost(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram("sidelight_explain_duration_seconds",
                                  "Wall time of Explain calls.", ["model", "method"],
                                  buckets=LATENCY_BUCKETS, registry=registry)
        self.budget = Histogram("sidelight_explain_budget_seconds",
                                "Budget that applied to each Explain call.", ["model"],
                                buckets=LATENCY_BUCKETS, registry=registry)
        self.evaluations = Histogram("sidelight_explain_model_evaluations",
                                     "Model rows evaluated per explained row.",
                                     ["model", "method"], buckets=EVALUATION_BUCKETS,
                                     registry=registry)
        self.cpu_seconds = Counter("sidelight_explain_cpu_seconds",
                                   "CPU time of the threads serving Explain calls.", ["model"],
                                   registry=registry)
        self.rows = Counter("sidelight_explain_rows", "Rows explained.", ["model", "method"],
                            registry=registry)
        self.budget_exhausted = Counter("sidelight_explain_budget_exhausted",
                                        "Rows whose sampling stopped because time ran out.",
                                        ["model", "method"], registry=registry)
        self.converged = Counter("sidelight_explain_converged",
                                 "Rows that met their accuracy goal (exact or target_error).",
                                 ["model", "method"], registry=registry)

    def _quality(self, registry: CollectorRegistry) -> None:
        self.relative_error = Histogram(
            "sidelight_explain_relative_std_error",
            "Largest standard error of a row / standard deviation of f(background).",
            ["model", "method"], buckets=RELATIVE_ERROR_BUCKETS, registry=registry)
        self.additivity_gap = Histogram(
            "sidelight_explain_additivity_gap",
            "|f(x) - E f(background) - sum(attributions)| per row and output.",
            ["model", "method"], buckets=GAP_BUCKETS, registry=registry)

    def record_call(self, model: str, method: str, code: str, seconds: float,
                    cpu_seconds: float) -> None:
        """Outcome, wall time and CPU time of one Explain call."""
        key = (model, method, code)
        s = self._call_series.get(key)
        if s is None:
            s = CallSeries(self.requests.labels(*key), self.duration.labels(model, method),
                           self.cpu_seconds.labels(model))
            self._call_series[key] = s
        s.requests.inc()
        s.duration.observe(seconds)
        s.cpu_seconds.inc(cpu_seconds)

    def record_rows(self, model: str, rows: Sequence[Explanation], spread: Array) -> None:
        """Cost and quality of each explained row; spread (outputs,) scales the error bars."""
        for row in rows:
            s = self.series(model, row.method)
            s.rows.inc()
            s.evaluations.observe(row.evaluations)
            s.relative_error.observe(relative_error(row.std_errors, spread))
            for gap in np.abs(row.additivity_gap).tolist():
                s.additivity_gap.observe(gap)
            if row.budget_exhausted:
                s.budget_exhausted.inc()
            if row.converged:
                s.converged.inc()

    def series(self, model: str, method: str) -> RowSeries:
        """The per-row children of (model, method), created on first use."""
        found = self._row_series.get((model, method))
        if found is None:
            labels = (model, method)
            found = RowSeries(self.rows.labels(*labels), self.evaluations.labels(*labels),
                              self.relative_error.labels(*labels),
                              self.additivity_gap.labels(*labels),
                              self.budget_exhausted.labels(*labels),
                              self.converged.labels(*labels))
            self._row_series[(model, method)] = found
        return found

    def watch_drift(self, sources: Callable[[], Iterable[DriftSource]]) -> None:
        """Export drift gauges computed at scrape time from each monitor's cached report."""
        self.registry.register(DriftCollector(sources))


def relative_error(std_errors: Array, spread: Array) -> float:
    """Largest standard error (outputs, features) over the spread of its output (outputs,)."""
    if not std_errors.any():  # exact methods: skip the division
        return 0.0
    return float((std_errors.max(axis=1) / spread).max())


class DriftCollector(Collector):
    """Reads every monitor's report (recomputed at most every few seconds) on scrape."""

    def __init__(self, sources: Callable[[], Iterable[DriftSource]]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily]:
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

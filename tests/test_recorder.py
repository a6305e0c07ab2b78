"""The deferred recorder behind the request metrics: no record lost under concurrent folds, and
batch-built histograms and counters identical to prometheus_client's own."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.registry import Collector

from explainers.base import Explanation
from service.monitoring.metrics import (
    LATENCY_BUCKETS,
    Counters,
    Histograms,
    Metrics,
    Record,
    Recorder,
    answer_of,
)


def test_no_record_is_lost_while_threads_add_and_fold() -> None:
    recorder = Recorder(fold_at=50)  # adders also fold inline, racing the folding thread
    seen: list[Record] = []
    recorder.subscribe(seen.extend)
    stop = threading.Event()

    def fold_often() -> None:
        while not stop.is_set():
            recorder.fold()

    def add(k: int) -> None:
        for i in range(5000):
            recorder.add(("cache", k, i))

    folder = threading.Thread(target=fold_often)
    folder.start()
    adders = [threading.Thread(target=add, args=(k,)) for k in range(4)]
    for t in adders:
        t.start()
    for t in adders:
        t.join()
    stop.set()
    folder.join()
    recorder.fold()
    assert sorted(seen) == sorted(("cache", k, i) for k in range(4) for i in range(5000))
    for k in range(4):  # each thread's records arrive in the order it added them
        assert [r[2] for r in seen if r[1] == k] == list(range(5000))


class _Families(Collector):
    def __init__(self, hist: Histograms, counts: Counters) -> None:
        self.hist, self.counts = hist, counts

    def collect(self) -> Iterator[object]:  # type: ignore[override]
        yield self.hist.family("t_seconds", "doc", ["model"])
        yield self.counts.family("t_calls", "doc", ["model"])


def test_batched_series_expose_exactly_what_prometheus_client_would() -> None:
    values = np.r_[np.random.default_rng(0).exponential(0.1, 500), LATENCY_BUCKETS, 0.0, 99.0]
    theirs = CollectorRegistry()
    h = Histogram("t_seconds", "doc", ["model"], buckets=LATENCY_BUCKETS, registry=theirs)
    c = Counter("t_calls", "doc", ["model"], registry=theirs)
    for v in values:  # bucket edges included: "le" means <=
        h.labels("m").observe(float(v))
        c.labels("m").inc()
    ours = CollectorRegistry()
    hist, counts = Histograms.of(LATENCY_BUCKETS), Counters()
    for part in np.array_split(values, 7):  # several batches add up
        hist.add(("m",), part)
        counts.add(("m",), len(part))
    ours.register(_Families(hist, counts))

    def samples(registry: CollectorRegistry) -> list[str]:
        return sorted(line for line in generate_latest(registry).decode().splitlines()
                      if line.startswith("t_") and "_created" not in line)

    mine, reference = samples(ours), samples(theirs)
    assert len(mine) == len(LATENCY_BUCKETS) + 1 + 2 + 1  # buckets, +Inf, sum, count, counter
    for a, b in zip(mine, reference, strict=True):
        name_a, value_a = a.rsplit(" ", 1)
        name_b, value_b = b.rsplit(" ", 1)
        assert name_a == name_b
        assert np.isclose(float(value_a), float(value_b), rtol=1e-12)


def test_a_scrape_folds_what_is_queued() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for _ in range(3):
        metrics.record_call("m", "auto", "NOT_FOUND", 0.004, 0.001)
    metrics.count_cache("result", "miss")
    assert registry.get_sample_value("sidelight_explain_requests_total",
                                     {"model": "m", "method": "auto", "code": "NOT_FOUND"}) == 3
    assert registry.get_sample_value("sidelight_explain_duration_seconds_bucket",
                                     {"model": "m", "method": "auto", "le": "0.005"}) == 3
    assert registry.get_sample_value("sidelight_cache_requests_total",
                                     {"cache": "result", "result": "miss"}) == 1


def test_rows_of_one_call_explained_by_different_methods_count_under_each() -> None:
    def row(method: str, samples: int, se: float) -> Explanation:
        values = np.array([[0.5, -0.25]])  # (outputs, features)
        return Explanation.build(method, values, np.full_like(values, se), np.array([1.0]),
                                 np.array([1.25 + 1e-7]), evaluations=40, converged=not samples,
                                 budget_exhausted=bool(samples), samples=samples)

    result = SimpleNamespace(model="m", version="1", budget_ms=50.0, spread=np.array([2.0]),
                             X=np.zeros((3, 2)), target=SimpleNamespace(key=("out", (0,), "")),
                             cached=False, rows=(row("exact", 0, 0.0), row("permutation", 9, 0.5),
                                                 row("exact", 0, 0.0)))
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.record_call("m", "auto", "OK", 0.01, 0.01, answer_of(result))

    def sample(name: str, method: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model": "m", "method": method, **labels})

    assert sample("sidelight_explain_rows_total", "exact") == 2
    assert sample("sidelight_explain_rows_total", "permutation") == 1
    assert sample("sidelight_explain_budget_exhausted_total", "permutation") == 1
    assert sample("sidelight_explain_converged_total", "exact") == 2
    assert sample("sidelight_explain_relative_std_error_sum", "permutation") == 0.25  # 0.5 / 2
    assert sample("sidelight_explain_relative_std_error_sum", "exact") == 0.0
    gap = sample("sidelight_explain_additivity_gap_sum", "exact")
    assert gap is not None and abs(gap - 2e-7) < 1e-12
    assert registry.get_sample_value("sidelight_explain_budget_seconds_sum", {"model": "m"}) \
        == 0.05



def test_nan_joins_the_sum_but_no_bucket_like_prometheus_client() -> None:
    hist = Histograms.of((0.1, 1.0))
    hist.add(("m",), [0.05, np.nan, 2.0])
    assert hist.counts[("m",)].tolist() == [1, 0, 1] and np.isnan(hist.sums[("m",)])


def test_a_sampled_row_without_error_and_a_flat_background_has_relative_error_zero() -> None:
    values = np.array([[0.0, 0.0]])
    row = Explanation.build("permutation", values, values, np.array([1.0]), np.array([1.0]),
                            evaluations=10, converged=True, budget_exhausted=False, samples=5)
    result = SimpleNamespace(model="m", version="1", budget_ms=5.0, spread=np.array([0.0]),
                             X=np.zeros((1, 2)), target=SimpleNamespace(key=()), cached=False,
                             rows=(row,))
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.record_call("m", "permutation", "OK", 0.001, 0.0, answer_of(result))
    labels = {"model": "m", "method": "permutation"}
    assert registry.get_sample_value("sidelight_explain_relative_std_error_sum", labels) == 0.0


def test_a_failing_sink_neither_stops_the_others_nor_raises() -> None:
    recorder = Recorder()
    seen: list[Record] = []

    def broken(batch: list[Record]) -> None:
        raise ValueError("broken sink")

    recorder.subscribe(broken)
    recorder.subscribe(seen.extend)
    recorder.add(("cache", "result", "hit"))
    recorder.fold()
    assert seen == [("cache", "result", "hit")]

"""Prometheus metrics. One `Metrics` object per process, built on the registry it is given."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0,
                   5.0, 10.0, 30.0)
EVALUATION_BUCKETS = tuple(float(10**e) for e in range(1, 9))
UNKNOWN = "_unknown"  # label for names not in the repository: keeps label sets bounded


class Metrics:
    """Explanation cost and outcome metrics; labels are bounded to known models and methods."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("sidelight_explain_requests", "Explain calls by outcome.",
                                ["model", "method", "code"], registry=registry)
        self.duration = Histogram("sidelight_explain_duration_seconds",
                                  "Wall time of Explain calls.", ["model", "method"],
                                  buckets=LATENCY_BUCKETS, registry=registry)
        self.evaluations = Histogram("sidelight_explain_model_evaluations",
                                     "Model rows evaluated per explained row.", ["model", "method"],
                                     buckets=EVALUATION_BUCKETS, registry=registry)
        self.in_flight = Gauge("sidelight_explain_in_flight", "Explain calls being served.",
                               registry=registry)
        self.budget_exhausted = Counter("sidelight_explain_budget_exhausted",
                                        "Rows whose sampling stopped because time ran out.",
                                        ["model", "method"], registry=registry)
        self.converged = Counter("sidelight_explain_converged",
                                 "Rows that met their accuracy goal (exact or target_error).",
                                 ["model", "method"], registry=registry)
        self.model_ready = Gauge("sidelight_model_ready",
                                 "1 when a model version is loaded and serving, 0 if it failed.",
                                 ["model", "version"], registry=registry)

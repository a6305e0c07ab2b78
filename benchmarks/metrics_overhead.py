"""What the Prometheus metrics and drift monitoring cost: explanation throughput with both on vs
both off, through the data plane (no gRPC, so the overhead is not diluted by transport).

Two data planes in one process over the same loaded models: *on* has a real `Metrics` on its own
registry, drift monitors for every model and one scrape of the registry (which recomputes the
drift report) after every block of calls; *off* has drift disabled and a metrics object whose
every call does nothing. Both have the result cache off and serve the same calls (same rows,
seeds and stopping rules: evaluation caps or exact methods, never the clock, so both do the same
work). Blocks alternate on/off, the order flipping each repetition; each mode's figure is its
fastest block, since other load on a shared machine only ever slows a block down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from service.config import Settings
from service.dataplane import DataPlane
from service.metrics import Metrics
from service.repository import ModelRepository
from service.requests import ExplainQuery
from service.store import MemoryStore

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
BLOCK_SECONDS = 0.5  # per block of calls; each on-block ends with one scrape (about 3 ms)


@dataclass(frozen=True)
class Case:
    model: str
    method: str
    rows: int  # rows per call
    max_evaluations: int = 0


CASES = (Case("breast_cancer_mlp", "permutation", 1, 2000),
         Case("breast_cancer_mlp", "permutation", 8, 2000),
         Case("breast_cancer_gbdt", "", 1),
         Case("breast_cancer_gbdt", "", 8),
         Case("diabetes_linear", "", 1))


class _Off:
    """Metrics switched off: every attribute, call and label set is this same no-op."""

    def __getattr__(self, name: str) -> _Off:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _Off:
        return self


def planes(repo: ModelRepository) -> tuple[DataPlane, DataPlane, CollectorRegistry]:
    """(on, off) data planes over the same models, and the on-plane's registry."""
    base = {"models_dir": MODELS, "result_cache_size": 0, "max_budget_ms": 60000.0}
    registry = CollectorRegistry()
    on = DataPlane(repo, MemoryStore(), Settings(**base, drift_enabled=True),  # type: ignore[arg-type]
                   Metrics(registry))
    off = DataPlane(repo, MemoryStore(), Settings(**base, drift_enabled=False),  # type: ignore[arg-type]
                    cast(Metrics, _Off()))
    for plane in (on, off):
        plane.seed_backgrounds()
        plane.warm()
    return on, off, registry


def queries(case: Case, n: int) -> list[ExplainQuery]:
    """n calls of `case.rows` background rows each, distinct rows and seeds."""
    X = np.load(MODELS / case.model / "background.npy")
    index = np.arange(n * case.rows) % X.shape[0]
    return [ExplainQuery(case.model, (("", X[index[i * case.rows:(i + 1) * case.rows]]),),
                         method=case.method, budget_ms=30000.0, seed=i,
                         max_evaluations=case.max_evaluations) for i in range(n)]


def block(plane: DataPlane, calls: list[ExplainQuery], after: Callable[[], object]) -> float:
    """Calls per second over one pass of `calls`, `after()` included (the scrape)."""
    start = time.perf_counter()
    for q in calls:
        plane.explain(q)
    after()
    return len(calls) / (time.perf_counter() - start)


def measure(case: Case, on: DataPlane, off: DataPlane, registry: CollectorRegistry,
            reps: int) -> tuple[float, float, float, str]:
    """(on calls/s, off calls/s, on/off, method): the fastest of interleaved blocks each."""
    probe = off.explain(queries(case, 1)[0])
    per_call = probe.elapsed_ms / 1e3
    calls = queries(case, max(20, min(2000, int(BLOCK_SECONDS / max(per_call, 1e-5)))))
    scrape, nothing = (lambda: generate_latest(registry)), (lambda: None)
    block(on, calls, scrape), block(off, calls, nothing)  # warm both planes' learned rates
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(reps):
        order = ("on", "off") if r % 2 == 0 else ("off", "on")
        for mode in order:
            plane, after = (on, scrape) if mode == "on" else (off, nothing)
            rates[mode].append(block(plane, calls, after))
    best_on, best_off = max(rates["on"]), max(rates["off"])
    return best_on, best_off, best_on / best_off, probe.method


def run(quick: bool) -> str:
    settings = Settings(models_dir=MODELS)  # type: ignore[call-arg]
    repo = ModelRepository.load(MODELS, settings)
    on, off, registry = planes(repo)
    reps = 5 if quick else 15
    lines = ["## Metrics and drift overhead (issue 6)", "",
             "Explain calls per second through the data plane (no gRPC) with Prometheus metrics "
             f"and drift monitoring **on** vs **off**: same calls, {reps} interleaved blocks of "
             f"about {BLOCK_SECONDS} s per mode, fastest block of each. *on* scrapes its registry "
             "(recomputing the drift report) after every block, about 30x more often than a 15 s "
             "scrape interval. *cost/call* = 1/on - 1/off. Target: on/off >= 0.97 (under 3%).", "",
             "| model | method | rows/call | on calls/s | off calls/s | on/off | cost/call |",
             "|---|---|---|---|---|---|---|"]
    for case in CASES:
        rate_on, rate_off, ratio, method = measure(case, on, off, registry, reps)
        cost_us = 1e6 * (1 / rate_on - 1 / rate_off)
        lines.append(f"| {case.model} | {method} | {case.rows} | {rate_on:,.0f} | "
                     f"{rate_off:,.0f} | {ratio:.3f} | {cost_us:.0f} us |")
    lines += ["", "What *on* adds per call: three labelled series and two histogram observations "
              "per call, six series updates per explained row (rows, evaluations, error bar, "
              "additivity gap, stop reason), and drift: the request's rows are queued and binned "
              "in batches of 256 rows (one vectorised histogram per window per batch). That is "
              "tens of microseconds per call plus a few per row, so its share shrinks as "
              "explanations get more expensive: closed-form linear explanations (~0.1 ms) are "
              "where it shows. On a shared 2-core machine single figures move by a few percent "
              "between runs."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run(quick=True))

"""What the Prometheus metrics and drift monitoring cost: explanation throughput with both on vs
both off, through the data plane (no gRPC, so the overhead is not diluted by transport).

Two data planes in one process over the same loaded models: *on* has a real `Metrics` on its own
registry and drift monitors for every model; *off* has drift disabled and a metrics object whose
every call does nothing. A scrape (which recomputes the drift report) is timed on its own and
charged to *on* at one per SCRAPE_INTERVAL_S, Prometheus' usual interval. Both have the result
cache off and serve the same calls (same rows, seeds and stopping rules: evaluation caps or exact
methods, never the clock, so both do the same work). Blocks alternate on/off, the order flipping
each repetition; each mode's figure is its fastest block, since other load on a shared machine
only ever slows a block down.
"""

from __future__ import annotations

import time
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
BLOCK_SECONDS = 0.5  # per block of calls
SCRAPE_INTERVAL_S = 15.0


@dataclass(frozen=True)
class Case:
    model: str
    method: str
    rows: int  # rows per call
    max_evaluations: int = 0


CASES = (Case("breast_cancer_mlp", "permutation", 1, 20000),  # ~1.5% error: a typical call
         Case("breast_cancer_mlp", "permutation", 1, 2000),
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


def block(plane: DataPlane, calls: list[ExplainQuery]) -> float:
    """Calls per second over one pass of `calls`."""
    start = time.perf_counter()
    for q in calls:
        plane.explain(q)
    return len(calls) / (time.perf_counter() - start)


def scrape_seconds(registry: CollectorRegistry) -> float:
    """Median time of a scrape of the on-plane's registry (drift reports recomputed)."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        generate_latest(registry)
        times.append(time.perf_counter() - start)
        time.sleep(5.1)  # the drift report is cached for 5 s: make each scrape recompute it
    return float(np.median(times))


def measure(case: Case, on: DataPlane, off: DataPlane, registry: CollectorRegistry,
            reps: int) -> tuple[float, float, float, str]:
    """(on calls/s, off calls/s, on/off, method): the fastest of interleaved blocks each."""
    probe = off.explain(queries(case, 1)[0])
    per_call = probe.elapsed_ms / 1e3
    calls = queries(case, max(20, min(2000, int(BLOCK_SECONDS / max(per_call, 1e-5)))))
    block(on, calls), block(off, calls)  # warm both planes' learned rates
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(reps):
        order = ("on", "off") if r % 2 == 0 else ("off", "on")
        for mode in order:
            rates[mode].append(block(on if mode == "on" else off, calls))
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
             f"about {BLOCK_SECONDS} s per mode, fastest block of each; *on* also pays for one "
             f"scrape (drift reports recomputed) every {SCRAPE_INTERVAL_S:.0f} s, timed on its "
             "own (below). *cost/call* = 1/on - 1/off. Target: on/off >= 0.97 (under 3%).", "",
             "| model | method | rows/call | on calls/s | off calls/s | on/off | cost/call |",
             "|---|---|---|---|---|---|---|"]
    results: list[tuple[Case, float, float]] = []  # case, on/off, ms per call (off)
    measured = [(case, *measure(case, on, off, registry, reps)) for case in CASES]
    scrape = scrape_seconds(registry)  # every model's drift windows now hold traffic
    share = scrape / SCRAPE_INTERVAL_S  # of one core's time, taken from explanations
    for case, rate_on, rate_off, ratio, method in measured:
        rate_on, ratio = rate_on * (1 - share), ratio * (1 - share)
        results.append((case, ratio, 1e3 / rate_off))
        cost_us = 1e6 * (1 / rate_on - 1 / rate_off)
        cap = f", cap {case.max_evaluations:,}" if case.max_evaluations else ""
        lines.append(f"| {case.model} | {method}{cap} | {case.rows} | {rate_on:,.0f} | "
                     f"{rate_off:,.0f} | {ratio:.3f} | {cost_us:.0f} us |")
    lines += ["", f"A scrape of all five models' metrics, drift reports recomputed: "
              f"{1e3 * scrape:.1f} ms ({100 * share:.2f}% of a core at one per "
              f"{SCRAPE_INTERVAL_S:.0f} s).", "",
              "What *on* adds per call: three labelled series and two histogram observations "
              "per call, six series updates per explained row (rows, evaluations, error bar, "
              "additivity gap, stop reason), and drift: the request's rows are queued and binned "
              "in batches of 256 rows (one vectorised histogram per window per batch). That is "
              "tens of microseconds per call plus a few per row, so its share shrinks as "
              "explanations get more expensive: closed-form linear explanations (~0.1 ms) are "
              "where it shows. On a shared 2-core machine single figures move by a few percent "
              "between runs.", "", verdict(results)]
    return "\n".join(lines) + "\n"


def verdict(results: list[tuple[Case, float, float]]) -> str:
    """Which calls meet the target (on/off >= 0.97), by what an explanation costs."""
    missed = [(c, r, ms) for c, r, ms in results if r < 0.97]
    if not missed:
        return "Target (under 3%): met for every case."
    worst = ", ".join(f"{c.model} {c.rows} row(s) at {ms:.2f} ms per call: {100 * (1 - r):.0f}%"
                      for c, r, ms in missed)
    cheapest_met = min((ms for _, r, ms in results if r >= 0.97), default=float("nan"))
    return (f"Target (under 3%): met for calls of {cheapest_met:.1f} ms and more; **missed** "
            f"for {worst}. The fixed cost per call (series updates, drift queueing and its "
            "share of the scrape) is tens of microseconds, so calls well under a few "
            "milliseconds (closed-form linear, single-row trees, tiny evaluation caps) pay "
            "more than 3%; sampled explanations at the default 200 ms budget pay well under 1%.")


if __name__ == "__main__":
    print(run(quick=True))

"""What the Prometheus metrics and drift monitoring cost: explanation throughput with both on vs
both off, measured twice.

*Through gRPC* (the service as clients use it): two sidelight servers in child processes, one
with metrics and drift, one whose metrics object does nothing and whose drift is off, called in
turn by one sequential client in this process. Each block reports the server process's CPU
time per call (read from the child after its queued records are folded, so their cost is
included): that is what bounds a replica's throughput. The client's wall time per call is shown
too.

*Through the data plane* (no gRPC, a stricter view: the same fixed cost over a smaller total):

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

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from benchmarks._server import python_child
from service.api.tensors import from_array
from service.config import Settings
from service.models.repository import ModelRepository
from service.monitoring.metrics import Metrics
from service.plane.dataplane import DataPlane
from service.plane.requests import ExplainQuery
from service.store.backgrounds import MemoryStore
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"
GRPC_SEGMENT_SECONDS = 2.0
GRPC_SERVER = """
import sys, time
import service.api.server as server
from service.config import Settings
on = sys.argv[2] == "on"
if not on:
    from benchmarks.metrics_overhead import _Off
    server.Metrics = lambda registry: _Off()  # every metrics call does nothing
app = server.start(Settings(models_dir=sys.argv[1], port=0, metrics_port=-1, host="127.0.0.1",
                            result_cache_size=0, drift_enabled=on))
print(app.port, flush=True)
for _ in sys.stdin:  # each line: fold what is queued, then report this process's CPU time
    app.metrics.recorder.fold()
    print(time.process_time(), flush=True)
app.stop(grace=0)
"""
SEGMENT_SECONDS = 1.0  # per segment of calls (both modes)
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


def scrape_seconds(registry: CollectorRegistry) -> float:
    """Median time of a scrape of the on-plane's registry (drift reports recomputed)."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        generate_latest(registry)
        times.append(time.perf_counter() - start)
        time.sleep(5.1)  # the drift report is cached for 5 s: make each scrape recompute it
    return float(np.median(times))


def segment(on: DataPlane, off: DataPlane, calls: list[ExplainQuery]) -> tuple[float, float]:
    """Each call through both planes back to back (alternating which goes first), so both see
    the same machine at the same moment; then *on* folds the segment's records. Seconds spent
    by (on, off)."""
    spent = {"on": 0.0, "off": 0.0}
    planes_ = {"on": on, "off": off}
    for i, q in enumerate(calls):
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
            start = time.perf_counter()
            planes_[mode].explain(q)
            spent[mode] += time.perf_counter() - start
    start = time.perf_counter()
    on.metrics.recorder.fold()
    return spent["on"] + time.perf_counter() - start, spent["off"]


def measure(case: Case, on: DataPlane, off: DataPlane, segments: int) -> dict[str, Any]:
    """Calls/s on and off over all segments, on/off throughput, and the quartiles of the
    segments' on/off."""
    probe = off.explain(queries(case, 1)[0])
    per_call = probe.elapsed_ms / 1e3
    calls = queries(case, max(10, min(4000, int(SEGMENT_SECONDS / (2 * max(per_call, 1e-5))))))
    segment(on, off, calls[:10])  # warm both planes' learned rates
    got = [segment(on, off, calls) for _ in range(segments)]
    total_on, total_off = sum(g[0] for g in got), sum(g[1] for g in got)
    ratios = [g[1] / g[0] for g in got]  # throughput on / off per segment
    n = len(calls) * segments
    return {"on": n / total_on, "off": n / total_off, "ratio": total_off / total_on,
            "low": float(np.percentile(ratios, 25)), "high": float(np.percentile(ratios, 75)),
            "method": probe.method}


@dataclass
class Child:
    """A sidelight server in a child process: its port, and its CPU time on request."""

    proc: subprocess.Popen[str]
    port: int

    def cpu_seconds(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())


@contextmanager
def child(mode: str) -> Iterator[Child]:
    with python_child(GRPC_SERVER, str(MODELS), mode) as proc:
        assert proc.stdout is not None
        yield Child(proc, int(proc.stdout.readline()))


def requests_for(case: Case, n: int) -> list[pb.ExplainRequest]:
    """The gRPC form of `queries`."""
    return [pb.ExplainRequest(model=q.model, inputs=[from_array("", q.inputs[0][1])],
                              method=q.method, budget_ms=q.budget_ms, seed=q.seed,
                              max_evaluations=q.max_evaluations) for q in queries(case, n)]


def grpc_segment(servers: dict[str, Child], stubs: dict[str, pb_grpc.ExplainerStub],
                 calls: list[pb.ExplainRequest]) -> dict[str, float]:
    """Each call sent to both servers back to back (alternating which goes first), so both see
    the same machine at the same moment: server CPU seconds and client wall seconds per call."""
    cpu = {m: c.cpu_seconds() for m, c in servers.items()}
    wall = dict.fromkeys(servers, 0.0)
    for i, request in enumerate(calls):
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
            start = time.perf_counter()
            stubs[mode].Explain(request)
            wall[mode] += time.perf_counter() - start
    out = {f"cpu_{m}": (c.cpu_seconds() - cpu[m]) / len(calls) for m, c in servers.items()}
    return out | {f"wall_{m}": w / len(calls) for m, w in wall.items()}


def grpc_measure(case: Case, servers: dict[str, Child], segments: int) -> dict[str, float]:
    """Server CPU and client wall per call, on and off, over `segments` segments of calls
    interleaved call by call; `ratio` = total CPU on / total CPU off, `low`/`high` = the
    quartiles of the segments' ratios (how much the figure moves)."""
    stubs = {m: pb_grpc.ExplainerStub(grpc.insecure_channel(f"127.0.0.1:{c.port}"))
             for m, c in servers.items()}
    probe = grpc_segment(servers, stubs, requests_for(case, 20))  # connect, warm
    n = max(20, min(5000, int(GRPC_SEGMENT_SECONDS / (2 * probe["wall_off"]))))
    calls = requests_for(case, n)
    got = [grpc_segment(servers, stubs, calls) for _ in range(segments)]
    out = {k: float(np.mean([g[k] for g in got])) for k in got[0]}
    ratios = [g["cpu_on"] / g["cpu_off"] for g in got]
    return out | {"ratio": out["cpu_on"] / out["cpu_off"],
                  "low": float(np.percentile(ratios, 25)),
                  "high": float(np.percentile(ratios, 75))}


def grpc_section(quick: bool) -> list[str]:
    segments = 4 if quick else 12
    lines = ["### Through gRPC", "",
             "Two servers in child processes (metrics and drift on / off) and one client that "
             "sends every call to both, back to back, alternating which goes first, so both "
             f"see the same machine at the same moment; {segments} segments of about "
             f"{GRPC_SEGMENT_SECONDS:.0f} s. *server CPU/call* is the server process's CPU time "
             "per call, including folding the call's records into the metrics and drift "
             "windows: the throughput limit of a replica. *on/off* = total CPU on / off, with "
             "the quartiles of the segments' ratios. Target: on/off <= 1.03.", "",
             "| model | method | rows/call | server CPU/call off | on | on/off (quartiles) | "
             "client wall/call off | on |", "|---|---|---|---|---|---|---|---|"]
    ratios = []
    with child("on") as on, child("off") as off:
        for case in CASES:
            m = grpc_measure(case, {"on": on, "off": off}, segments)
            ratio = m["ratio"]
            ratios.append(ratio)
            cap = f", cap {case.max_evaluations:,}" if case.max_evaluations else ""
            lines.append(f"| {case.model} | {case.method or 'auto'}{cap} | {case.rows} | "
                         f"{1e6 * m['cpu_off']:.0f} us | {1e6 * m['cpu_on']:.0f} us | "
                         f"{ratio:.3f} ({m['low']:.3f}-{m['high']:.3f}) | "
                         f"{1e3 * m['wall_off']:.2f} ms | "
                         f"{1e3 * m['wall_on']:.2f} ms |")
    verdict_line = "met for every case" if max(ratios) <= 1.03 else \
        f"**missed** (worst {100 * (max(ratios) - 1):.1f}%)"
    return [*lines, "", f"Target (server CPU per call, on/off <= 1.03): {verdict_line}. These "
            "servers are not scraped; a scrape every 15 s adds about 0.06% of a core (timed "
            "below).", ""]


def run(quick: bool) -> str:
    settings = Settings(models_dir=MODELS)  # type: ignore[call-arg]
    repo = ModelRepository.load(MODELS, settings)
    on, off, registry = planes(repo)
    segments = 6 if quick else 20
    lines = ["## Metrics and drift overhead (issue 6)", "", *grpc_section(quick),
             "### Through the data plane", "",
             "Explain calls per second through the data plane (no gRPC) with Prometheus metrics "
             "and drift monitoring **on** vs **off**: every call goes through both planes back "
             f"to back, alternating which goes first; {segments} segments of about "
             f"{SEGMENT_SECONDS:.0f} s, each ending with *on* folding its records (timed, "
             "charged to *on*). *on* also pays for one scrape (drift reports recomputed) every "
             f"{SCRAPE_INTERVAL_S:.0f} s, timed on its own (below). *on/off* = throughput on / "
             "off over all segments, with the quartiles of the segments' ratios; *cost/call* = "
             "1/on - 1/off. Target: on/off >= 0.97 (under 3%).", "",
             "| model | method | rows/call | on calls/s | off calls/s | on/off (quartiles) | "
             "cost/call |", "|---|---|---|---|---|---|---|"]
    results: list[tuple[Case, float, float]] = []  # case, on/off, ms per call (off)
    measured = [(case, measure(case, on, off, segments)) for case in CASES]
    scrape = scrape_seconds(registry)  # every model's drift windows now hold traffic
    share = scrape / SCRAPE_INTERVAL_S  # of one core's time, taken from explanations
    for case, m in measured:
        rate_on, ratio = m["on"] * (1 - share), m["ratio"] * (1 - share)
        results.append((case, ratio, 1e3 / m["off"]))
        cost_us = 1e6 * (1 / rate_on - 1 / m["off"])
        cap = f", cap {case.max_evaluations:,}" if case.max_evaluations else ""
        lines.append(f"| {case.model} | {m['method']}{cap} | {case.rows} | {rate_on:,.0f} | "
                     f"{m['off']:,.0f} | {ratio:.3f} ({m['low']:.3f}-{m['high']:.3f}) | "
                     f"{cost_us:.0f} us |")
    lines += ["", f"A scrape of all five models' metrics, drift reports recomputed: "
              f"{1e3 * scrape:.1f} ms ({100 * share:.2f}% of a core at one per "
              f"{SCRAPE_INTERVAL_S:.0f} s).", "",
              "What *on* adds per call: on the request path, one tuple appended to a lock-free "
              "queue (outcome, times, and the answer's arrays as one block per kind) and one per "
              "cache lookup, about 2 us; off the request path (a thread every second, and every "
              "scrape), the queued records are grouped by label set and binned with numpy: every "
              "series of the call and its rows (requests, latency, budget, CPU, rows, "
              "evaluations, error bar, additivity gap, stop reason, cache) and the drift "
              "windows. That is a few microseconds per call plus about one per extra row, so the "
              "cheapest calls (closed-form linear, single-row trees, 0.15-0.3 ms here) are the "
              "ones near the 3% line. Measured separately in blocks of calls per mode instead of "
              "call by call, the same code showed 8-25 us per sub-millisecond call (5-9%): "
              "folding records after thousands of calls reads arrays that have left the CPU "
              "caches; the call-by-call figure is the one robust to this machine's noise. "
              "Single figures move by a percent or two between runs.", "", verdict(results)]
    return "\n".join(lines) + "\n"


def verdict(results: list[tuple[Case, float, float]]) -> str:
    """Which calls meet the target (on/off >= 0.97), by what an explanation costs."""
    missed = [(c, r, ms) for c, r, ms in results if r < 0.97]
    if not missed:
        return "Target (under 3%): met for every case."
    worst = ", ".join(f"{c.model} {c.rows} row(s) at {ms:.2f} ms per call: {100 * (1 - r):.0f}%"
                      for c, r, ms in missed)
    cheapest_met = min((ms for _, r, ms in results if r >= 0.97), default=float("nan"))
    return (f"Target (under 3%): met for calls of {cheapest_met:.2f} ms and more; **missed** "
            f"for {worst}. The fixed cost is a few microseconds per call, so only calls of a "
            "fraction of a millisecond in the data plane (closed-form linear, single-row trees) "
            "can pay more than 3% here; through gRPC, where a call costs the server about 1 ms "
            "of CPU, the same microseconds are the share in the table above.")


if __name__ == "__main__":
    print(run(quick=True))

"""Explanation latency with a 1,000 x 30 background served from the replica's local copy vs
fetched from Redis, and what the shared caches save.

One process, one model (breast_cancer_mlp, 30 features), a private redis-server on loopback.
Every configuration is a DataPlane explaining the same rows with the same seeds (permutation,
a fixed evaluation cap, result cache off), run interleaved so machine noise hits all alike:

- in-memory store (no SIDELIGHT_REDIS_URL);
- Redis, local copy trusted within its staleness bound (the normal hot path: no Redis call);
- Redis, local copy re-validated on every request (SIDELIGHT_REDIS_CHECK_MS=0: one HGET of the
  64-byte sha256 field);
- Redis, no local copy: every request fetches the 1,000 x 30 value, checks its size and sha256
  and decodes it (f(background) stays cached per content, as in production).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from explainers.base import Array
from service.config import Settings
from service.models.repository import ModelRepository
from service.monitoring.metrics import Metrics
from service.plane.dataplane import DataPlane
from service.plane.requests import BackgroundUpload, ExplainQuery
from service.plane.targets import resolve_target
from service.store.backgrounds import BackgroundStore, MemoryStore
from service.store.redis import RedisOptions, RedisStore
from tests.redis_process import RedisProcess

ROOT = Path(__file__).resolve().parents[1]
MODEL = "breast_cancer_mlp"
ROWS, FEATURES, EVALUATIONS = 1000, 30, 2000


def background() -> Array:
    """1,000 x 30 float32 rows: the model's bundled background resampled with small noise."""
    base = np.load(ROOT / "examples" / "models" / MODEL / "background.npy").astype(np.float64)
    rng = np.random.default_rng(0)
    rows = base[rng.integers(0, base.shape[0], ROWS)]
    return (rows * (1 + 0.01 * rng.standard_normal(rows.shape))).astype(np.float32)


@contextmanager
def redis_server() -> Iterator[RedisProcess]:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisProcess(Path(tmp)).start()
        try:
            yield server
        finally:
            server.kill()


def plane(repo: Path, store: BackgroundStore, result_cache: int = 0) -> DataPlane:
    settings = Settings(models_dir=repo, drift_enabled=False, result_cache_size=result_cache,
                        metrics_port=-1)
    loaded = ModelRepository.load(repo, settings)
    return DataPlane(loaded, store, settings, Metrics(CollectorRegistry()))


def query(x: Array, seed: int) -> ExplainQuery:
    return ExplainQuery(model=MODEL, inputs=(("", x[None, :]),), method="permutation",
                        budget_ms=10_000, seed=seed, background="bench",
                        max_evaluations=EVALUATIONS)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def interleaved(planes: dict[str, DataPlane], X: Array, reps: int) -> dict[str, list[float]]:
    """Milliseconds per explanation for each plane, round robin over the same requests."""
    times: dict[str, list[float]] = {name: [] for name in planes}
    for i in range(reps):
        q = query(X[i % X.shape[0]], i)
        for name, p in planes.items():
            times[name].append(timed(lambda p=p, q=q: p.explain(q)))  # type: ignore[misc]
    return times


def stats(ms: list[float]) -> tuple[float, float]:
    return statistics.median(ms), float(np.percentile(ms, 90))


def run(quick: bool) -> str:
    if shutil.which("redis-server") is None:
        return "_redis-server is not installed: section skipped._\n"
    reps = 40 if quick else 300
    data, X = background(), background()[:50].astype(np.float64)
    with tempfile.TemporaryDirectory() as tmp, redis_server() as server:
        repo = Path(tmp)
        (repo / MODEL).symlink_to(ROOT / "examples" / "models" / MODEL)
        opts = RedisOptions(server.url, prefix="bench:")
        stores: dict[str, BackgroundStore] = {
            "in-memory store (no Redis)": MemoryStore(),
            "Redis, local copy within the staleness bound": RedisStore(opts),
            "Redis, local copy + sha256 check every request": RedisStore(
                RedisOptions(server.url, prefix="bench:", check_s=0.0)),
            "Redis, fetched and verified every request": RedisStore(
                RedisOptions(server.url, prefix="bench:", check_s=0.0, local_size=0)),
        }
        planes = {name: plane(repo, s) for name, s in stores.items()}
        for p in planes.values():
            p.put_background(BackgroundUpload(MODEL, data, name="bench"))
        interleaved(planes, X, 5)  # warm: sessions, f(background) per content
        times = interleaved(planes, X, reps)
        extra = shared_savings(repo, server, data, X)
        for s in stores.values():
            s.close()
    return report(times, extra, reps, len(data.tobytes()))


def shared_savings(repo: Path, server: RedisProcess, data: Array, X: Array) -> list[str]:
    """f(background) computed vs read from Redis; an explanation vs a result-cache hit."""
    store = RedisStore(RedisOptions(server.url, prefix="savings:"))
    try:
        a, b = plane(repo, store), plane(repo, store)
        a.put_background(BackgroundUpload(MODEL, data, name="bench"))
        model = a.repo.get(MODEL)
        target = resolve_target(model, "", (), "")
        computed = timed(lambda: a.background(model, "bench", target))
        shared = timed(lambda: b.background(model, "bench", target))  # another replica
        cached = plane(repo, store, result_cache=64)
        miss = statistics.median(timed(lambda i=i: cached.explain(query(X[i], 100 + i)))
                                 for i in range(10))
        hit = statistics.median(timed(lambda i=i: cached.explain(query(X[i], 100 + i)))
                                for i in range(10))
    finally:
        store.close()
    return [f"| f(background) for {ROWS} rows | computed: {computed:.2f} | read from Redis by "
            f"another replica: {shared:.2f} |",
            f"| an identical request | computed (a miss: lookup and store in Redis included): "
            f"{miss:.2f} | result cache hit: {hit:.2f} |"]


def report(times: dict[str, list[float]], extra: list[str], reps: int, nbytes: int) -> str:
    local = stats(times["Redis, local copy within the staleness bound"])[0]
    lines = ["## Backgrounds in Redis: local copy vs fetched\n",
             f"Explanation latency (permutation, {EVALUATIONS} evaluations cap, one row of "
             f"`{MODEL}`) with a {ROWS:,} x {FEATURES} float32 background ({nbytes // 1024} KiB); "
             f"{reps} requests per configuration, interleaved; a private redis-server on "
             "loopback.\n",
             "| background served from | p50 ms | p90 ms | p50 vs local copy |",
             "|---|---:|---:|---:|"]
    for name, ms in times.items():
        p50, p90 = stats(ms)
        lines.append(f"| {name} | {p50:.2f} | {p90:.2f} | {p50 / local:.2f}x |")
    lines += ["", "What the shared caches save (f(background): one measurement; requests: "
              "median of 10; milliseconds):", "",
              "| | without | with |", "|---|---|---|", *extra]
    return "\n".join(lines) + "\n"

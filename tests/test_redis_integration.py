"""Sidecar servers sharing real redis-server processes: one upload serves every replica, a
replacement reaches the others, f(background) and results are shared, corruption is refused,
AUTH works, and killing Redis mid-traffic fails no explanation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.server import REDIS_HEALTH, Sidelight, start
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS, background_of, settings_for
from tests.redis_process import RedisProcess, wait_for

MODEL = "diabetes_linear"
CHECK_MS = 100.0


@dataclass
class Replica:
    app: Sidelight
    channel: grpc.Channel
    stub: pb_grpc.ExplainerStub

    def metric(self, name: str, **labels: str) -> float:
        return float(self.app.metrics.registry.get_sample_value(name, labels) or 0.0)

    def health(self, service: str = "") -> int:
        return int(health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service)).status)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one small model, so each replica starts quickly."""
    root = tmp_path_factory.mktemp("repo")
    (root / MODEL).symlink_to(MODELS / MODEL, target_is_directory=True)
    return root


@pytest.fixture
def replicas(repo: Path) -> Iterator[Callable[..., Replica]]:
    """Factory of sidecars (own metrics registry, no drift); all stopped at the end."""
    made: list[Replica] = []

    def make(url: str, **overrides: object) -> Replica:
        settings = settings_for(repo, metrics_port=-1, drift_enabled=False, redis_url=url,
                                redis_check_ms=CHECK_MS, redis_key_prefix="it:", **overrides)
        app = start(settings)
        channel = grpc.insecure_channel(f"127.0.0.1:{app.port}")
        made.append(Replica(app, channel, pb_grpc.ExplainerStub(channel)))
        return made[-1]

    yield make
    for r in made:
        r.channel.close()
        r.app.stop(grace=0)


def put(r: Replica, data: np.ndarray, name: str) -> pb.PutBackgroundResponse:
    return r.stub.PutBackground(pb.PutBackgroundRequest(model=MODEL, name=name,
                                                        data=from_array("", data)))


def explain(r: Replica, background: str = "", seed: int = 7, row: int = 0,
            timeout: float = 5.0) -> pb.ExplainResponse:
    x = background_of(MODEL)[row:row + 1]
    return r.stub.Explain(pb.ExplainRequest(
        model=MODEL, background=background, inputs=[from_array("input", x)], seed=seed,
        method="permutation", max_evaluations=400, budget_ms=2000), timeout=timeout)


def attributions(response: pb.ExplainResponse) -> np.ndarray:
    return np.array([list(row.attributions) for row in response.rows])


def test_one_upload_serves_both_replicas_identically(redis_server: RedisProcess,
                                                     replicas: Callable[..., Replica]) -> None:
    a, b = replicas(redis_server.url, result_cache_size=0), replicas(redis_server.url)
    data = background_of(MODEL)[:60] * 1.5
    up = put(a, data, "shared")
    assert up.persisted and up.background.source == "upload"
    ra, rb = explain(a, "shared"), explain(b, "shared")
    assert rb.background_sha256 == ra.background_sha256 == up.background.sha256
    assert rb.background_rows == 60 and not ra.cached and not rb.cached
    np.testing.assert_array_equal(attributions(ra), attributions(rb))
    assert list(ra.rows[0].base_values) == list(rb.rows[0].base_values)
    info = b.stub.GetBackground(pb.GetBackgroundRequest(model=MODEL, name="shared"))
    assert info == up.background
    # f(background) was computed by one replica and read from Redis by the other
    hits = a.metric("sidelight_cache_requests_total", cache="derived", result="hit") + \
        b.metric("sidelight_cache_requests_total", cache="derived", result="hit")
    assert hits >= 1
    # the explain.yaml default was seeded once and is shared: both report the same sha256
    assert explain(a).background_sha256 == explain(b).background_sha256
    assert len(redis_server.client().keys("it:bg:*")) == 2


def test_replacement_reaches_the_other_replica_within_the_bound(
        redis_server: RedisProcess, replicas: Callable[..., Replica]) -> None:
    a, b = replicas(redis_server.url), replicas(redis_server.url)
    first = put(a, background_of(MODEL)[:30], "swap").background.sha256
    assert explain(b, "swap").background_sha256 == first
    second = put(a, background_of(MODEL)[30:50], "swap").background.sha256
    time.sleep(CHECK_MS / 1e3 + 0.02)
    r = explain(b, "swap", seed=8)
    assert r.background_sha256 == second and r.background_rows == 20
    assert b.stub.DeleteBackground(pb.DeleteBackgroundRequest(model=MODEL, name="swap")).deleted
    time.sleep(CHECK_MS / 1e3 + 0.02)
    with pytest.raises(grpc.RpcError) as err:
        explain(a, "swap", seed=9)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_identical_requests_are_answered_from_the_result_cache(
        redis_server: RedisProcess, replicas: Callable[..., Replica]) -> None:
    a, b = replicas(redis_server.url), replicas(redis_server.url)
    first = explain(a, seed=3, row=4)
    again, other = explain(a, seed=3, row=4), explain(b, seed=3, row=4)
    assert not first.cached and again.cached and other.cached  # b reads a's answer from Redis
    np.testing.assert_array_equal(attributions(first), attributions(other))
    assert other.cost.model_evaluations == first.cost.model_evaluations
    assert not explain(b, seed=4, row=4).cached  # another seed is another request
    assert b.metric("sidelight_cache_requests_total", cache="result", result="hit") == 1


def test_corrupt_value_in_redis_is_refused(redis_server: RedisProcess,
                                           replicas: Callable[..., Replica]) -> None:
    a, b = replicas(redis_server.url), replicas(redis_server.url)
    up = put(a, background_of(MODEL)[:40], "fragile")
    key = f"it:bg:{MODEL}:1:fragile"
    raw = bytearray(redis_server.client().hget(key, "data") or b"")
    raw[100] ^= 0x01
    redis_server.client().hset(key, "data", bytes(raw))
    with pytest.raises(grpc.RpcError) as err:
        explain(b, "fragile")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert key in err.value.details() and "sha256" in err.value.details()
    assert b.metric("sidelight_redis_errors_total") >= 1
    assert explain(a, "fragile").background_sha256 == up.background.sha256  # verified copy
    again = put(a, background_of(MODEL)[:40], "fragile")  # the same bytes, uploaded again
    assert again.background.sha256 == up.background.sha256
    assert explain(b, "fragile").background_sha256 == up.background.sha256  # read anew


def test_auth_and_a_wrong_password(tmp_path: Path, replicas: Callable[..., Replica]) -> None:
    if not RedisProcess.available():
        pytest.skip("redis-server is not installed")
    server = RedisProcess(tmp_path, password="hunter2").start()
    try:
        good = replicas(server.url)
        assert put(good, background_of(MODEL)[:10], "authed").persisted
        assert good.health(REDIS_HEALTH) == health_pb2.HealthCheckResponse.SERVING
        bad = replicas(server.url.replace("hunter2", "nope"))
        assert bad.health() == health_pb2.HealthCheckResponse.SERVING  # local copies serve
        assert bad.health(REDIS_HEALTH) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert explain(bad).rows and not put(bad, background_of(MODEL)[:10], "x").persisted
    finally:
        server.kill()


def test_killing_redis_mid_traffic_fails_no_explanation(
        redis_server: RedisProcess, replicas: Callable[..., Replica]) -> None:
    a, b = replicas(redis_server.url), replicas(redis_server.url)
    put(a, background_of(MODEL)[:50], "live")
    explain(b, "live")
    done, failures = [0, 0], []
    started_outage, ended_outage = threading.Event(), threading.Event()

    def traffic(i: int, r: Replica) -> None:
        for n in range(120):
            try:
                explain(r, "live" if n % 2 else "", seed=1000 * i + n, row=n % 50)
            except grpc.RpcError as err:
                failures.append(f"{i}/{n}: {err.code()} {err.details()}")
            done[i] += 1
            if n == 40:
                started_outage.wait(10)
            if n == 80:
                ended_outage.wait(10)

    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(traffic, i, r) for i, r in enumerate((a, b))]
        assert wait_for(lambda: min(done) >= 20)
        redis_server.kill()
        held = put(a, background_of(MODEL)[50:90], "offline")
        assert not held.persisted and explain(a, "offline").background_rows == 40
        assert a.health() == b.health() == health_pb2.HealthCheckResponse.SERVING
        started_outage.set()
        assert wait_for(lambda: min(done) >= 60)
        redis_server.start()  # empty: started without persistence
        ended_outage.set()
        for run in runs:
            run.result()
    assert sum(done) >= 200 and failures == []
    assert wait_for(lambda: a.app.store is not None and a.app.store.pending() == 0)
    stored = redis_server.client().hget(f"it:bg:{MODEL}:1:offline", "sha256")
    assert stored == held.background.sha256.encode()  # the held upload was written back
    assert explain(b, "offline").background_sha256 == held.background.sha256
    assert wait_for(lambda: redis_server.client().exists(f"it:bg:{MODEL}:1:live") == 1)
    assert a.health(REDIS_HEALTH) == health_pb2.HealthCheckResponse.SERVING

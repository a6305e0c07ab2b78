"""A Redis at its maxmemory is full, not down: uploads are refused with RESOURCE_EXHAUSTED naming
the limit and never written past it, while the replica stays up, reads, explanations and deletes
keep working, a new replica sees every background, cached data is evicted to make room, and an
explain.yaml default that does not fit is held until it does."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2

from service.api.server import REDIS_HEALTH
from service.store.backgrounds import make_meta
from service.store.redis import SEED_SOURCE, RedisOptions, RedisStore
from sidelight.v1 import explainer_pb2 as pb
from tests import test_redis_integration
from tests.conftest import background_of
from tests.redis_process import RedisProcess, wait_for
from tests.test_redis_integration import MODEL, Replica, explain, put

repo, replicas = test_redis_integration.repo, test_redis_integration.replicas  # the fixtures

MAXMEMORY = 4 * 1024 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING
UPLOAD = np.random.default_rng(0).normal(size=(10_000, 10)) * 0.05  # 800 KB of float64


@pytest.fixture
def full_redis(redis_server: RedisProcess) -> RedisProcess:
    """The test's Redis with a 4 MB maxmemory and the shipped manifests' policy."""
    client = redis_server.client()
    client.config_set("maxmemory", MAXMEMORY)
    client.config_set("maxmemory-policy", "volatile-lru")
    return redis_server


def fill(r: Replica, names: int = 10) -> tuple[list[str], grpc.RpcError]:
    """Upload 800 KB backgrounds until one is refused; the names stored and the refusal."""
    stored = []
    for i in range(names):
        try:
            put(r, UPLOAD + i, f"big{i}")
        except grpc.RpcError as err:
            return stored, err
        stored.append(f"big{i}")
    raise AssertionError(f"{names} uploads of {UPLOAD.nbytes} bytes fit in {MAXMEMORY} bytes")


def put_or_refused(r: Replica, name: str) -> bool:
    """Whether an upload was stored; False when refused as too big (Redis keeps each client's
    buffer of its last upload for a few seconds, so right after an upload another may not fit)."""
    try:
        return put(r, UPLOAD, name).persisted
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        return False


def used_memory(server: RedisProcess) -> int:
    return int(server.client().info("memory")["used_memory"])


def within_maxmemory(server: RedisProcess) -> bool:
    """Redis's memory is back under maxmemory once it has freed the idle clients' buffers
    (a client keeps the buffer of its last upload for a few seconds)."""
    return wait_for(lambda: used_memory(server) <= MAXMEMORY, seconds=5)


def listed(r: Replica) -> set[str]:
    return {b.name for b in r.stub.ListBackgrounds(pb.ListBackgroundsRequest(model=MODEL))
            .backgrounds}


def test_a_full_redis_refuses_uploads_and_keeps_serving(
        full_redis: RedisProcess, replicas: Callable[..., Replica]) -> None:
    a = replicas(full_redis.url)
    stored, refused = fill(a)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
    assert "maxmemory" in refused.details() and str(MAXMEMORY) in refused.details()
    assert len(stored) >= 2 and within_maxmemory(full_redis)  # never written past it
    # still up after several liveness probes (a write would have failed on the full Redis)
    assert not wait_for(lambda: a.health(REDIS_HEALTH) != SERVING, seconds=2.5)
    assert a.metric("sidelight_redis_up") == 1 and a.app.store is not None
    assert a.app.store.pending() == 0  # refused, not held for later
    assert explain(a, stored[0]).background_rows == 10_000
    info = a.stub.GetBackground(pb.GetBackgroundRequest(model=MODEL, name=stored[-1]))
    assert info.rows == 10_000 and {*stored, "default"} <= listed(a)

    b = replicas(full_redis.url)  # a new replica sees everything stored
    assert b.health(REDIS_HEALTH) == SERVING and {*stored, "default"} <= listed(b)
    assert explain(b, stored[-1]).background_sha256 == info.sha256

    assert a.stub.DeleteBackground(pb.DeleteBackgroundRequest(model=MODEL, name=stored[0])).deleted
    assert stored[0] not in listed(b)
    assert wait_for(lambda: put_or_refused(b, "after-delete"))  # the freed memory takes it
    assert within_maxmemory(full_redis)


def test_cached_data_is_evicted_to_make_room_for_a_background(
        full_redis: RedisProcess, replicas: Callable[..., Replica]) -> None:
    a = replicas(full_redis.url)
    client = full_redis.client()
    blob = b"x" * 100_000
    for i in range(60):  # 6 MB of results with a TTL: Redis keeps itself at maxmemory
        client.set(f"it:result:{i}", blob, px=600_000)
    assert used_memory(full_redis) > MAXMEMORY - 2 * len(blob)
    up = put(a, background_of(MODEL)[:1] + UPLOAD, "room")  # needs evictions to fit
    assert up.persisted and a.health(REDIS_HEALTH) == SERVING
    client.ping()  # Redis evicts before each command until it is under maxmemory again
    assert used_memory(full_redis) <= MAXMEMORY
    assert client.hget(f"it:bg:{MODEL}:1:room", "sha256") == up.background.sha256.encode()
    assert len(client.keys("it:result:*")) < 60


def test_a_replica_started_on_a_redis_filled_by_others_is_up(
        full_redis: RedisProcess, replicas: Callable[..., Replica]) -> None:
    first = replicas(full_redis.url)
    kept = put(first, UPLOAD, "kept").background
    client = full_redis.client()
    with contextlib.suppress(redis.exceptions.OutOfMemoryError):
        for i in range(100):  # another application's keys, without a TTL: nothing to evict
            client.set(f"other:{i}", b"y" * 100_000)
    assert used_memory(full_redis) > MAXMEMORY - 100_000
    b = replicas(full_redis.url)
    assert b.health(REDIS_HEALTH) == SERVING and b.metric("sidelight_redis_up") == 1
    assert {"kept", "default"} <= listed(b)
    assert explain(b, "kept").background_sha256 == kept.sha256
    with pytest.raises(grpc.RpcError) as refused:
        put(b, UPLOAD, "more")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"maxmemory {MAXMEMORY}" in refused.value.details()
    assert not wait_for(lambda: b.health(REDIS_HEALTH) != SERVING, seconds=2.5)
    assert b.stub.DeleteBackground(pb.DeleteBackgroundRequest(model=MODEL, name="kept")).deleted
    assert "kept" not in listed(first)


def test_a_default_that_does_not_fit_is_held_until_there_is_room(
        full_redis: RedisProcess) -> None:
    client = full_redis.client()
    with contextlib.suppress(redis.exceptions.OutOfMemoryError):
        for i in range(100):
            client.set(f"other:{i}", b"y" * 100_000)
    store = RedisStore(RedisOptions(full_redis.url, prefix="seed:"))
    try:
        meta = make_meta("m", "1", "default", UPLOAD, SEED_SOURCE, "s" * 64)
        store.put(meta, UPLOAD)  # at start-up: must not fail, must not be lost
        assert not store.persisted(meta) and store.healthy() and store.pending() == 1
        assert store.get("m", "1", "default")[0].sha256 == meta.sha256  # the held copy serves
        client.delete(*client.keys("other:*"))
        assert wait_for(lambda: store.persisted(meta), seconds=5)
        assert client.hget("seed:bg:m:1:default", "sha256") == meta.sha256.encode()
    finally:
        store.close()

"""RedisStore against real redis-server processes: format, sharing, staleness bound, corruption,
outages (kill/restart), AUTH, TLS, the local LRU and derived blobs."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from explainers.errors import FailedPrecondition, NotFound, Unavailable
from service.monitoring.metrics import Metrics
from service.store.backgrounds import (
    BackgroundMeta,
    CorruptValue,
    MemoryStore,
    decode_array,
    encode_array,
    make_meta,
)
from service.store.redis import ABSENT, NEWER, SEED, RedisOptions, RedisStore, masked
from tests.redis_process import RedisProcess, make_cert, wait_for

PREFIX = "t:"


def meta_of(data: np.ndarray, name: str = "bg", source: str = "upload",
            model_sha: str = "m" * 64) -> BackgroundMeta:
    return make_meta("model", "1", name, data, source, model_sha, ("a", "b", "c"))


@pytest.fixture
def stores(redis_server: RedisProcess) -> Iterator[Callable[..., RedisStore]]:
    """Factory of stores on the test's Redis; all closed at the end."""
    made: list[RedisStore] = []

    def make(url: str | None = None, metrics: Metrics | None = None, **kw: object) -> RedisStore:
        options = {"prefix": PREFIX, "check_s": 0.05, "timeout_s": 0.5, **kw}
        store = RedisStore(RedisOptions(url or redis_server.url, **options),  # type: ignore[arg-type]
                           metrics)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def errors(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("sidelight_redis_errors_total")
    return float(value or 0.0)


def test_storage_format_is_raw_bytes_and_a_json_header(stores: Callable[..., RedisStore],
                                                      redis_server: RedisProcess) -> None:
    store = stores()
    data = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    meta = store.put(meta_of(data), data)
    raw = redis_server.client().hgetall(f"{PREFIX}bg:model:1:bg")
    assert raw[b"data"] == data.astype("<f4").tobytes()  # no pickle, no framing
    header = json.loads(raw[b"header"])
    assert header["rows"] == 4 and header["features"] == 3 and header["dtype"] == "float32"
    assert header["sha256"] == hashlib.sha256(raw[b"data"]).hexdigest() == meta.sha256
    assert raw[b"sha256"].decode() == meta.sha256 and header["feature_names"] == ["a", "b", "c"]
    assert raw[b"model_sha256"].decode() == "m" * 64 and header["byteorder"] == "little"
    assert redis_server.client().smembers(f"{PREFIX}bg-index") == {b"t:bg:model:1:bg"}
    assert store.persisted(meta) and store.healthy() and store.pending() == 0


def test_second_store_reads_identical_values(stores: Callable[..., RedisStore]) -> None:
    a, b = stores(), stores()
    for dtype in (np.float32, np.float64):
        data = np.random.default_rng(0).normal(size=(50, 3)).astype(dtype)
        a.put(meta_of(data, name=f"x{dtype.__name__}"), data)
        meta, got = b.get("model", "1", f"x{dtype.__name__}")
        assert got.dtype == dtype and np.array_equal(got, data) and not got.flags.writeable
        assert meta == a.head("model", "1", f"x{dtype.__name__}")
    assert [m.name for m in b.list("model")] == ["xfloat32", "xfloat64"]
    assert b.list("other") == []
    assert b.delete("model", "1", "xfloat32") and not b.delete("model", "1", "xfloat32")
    time.sleep(0.06)  # past a's staleness bound
    with pytest.raises(NotFound):
        a.get("model", "1", "xfloat32")  # a's copy is re-validated and found deleted
    with pytest.raises(NotFound):
        b.head("model", "1", "nothing")


def test_replacement_is_seen_within_the_staleness_bound(stores: Callable[..., RedisStore]) -> None:
    writer, fast, slow = stores(), stores(check_s=0.05), stores(check_s=60.0)
    old, new = np.zeros((3, 3)), np.ones((3, 3))
    writer.put(meta_of(old), old)
    assert fast.get("model", "1", "bg")[1].sum() == 0 and slow.get("model", "1", "bg")[1].sum() == 0
    writer.put(meta_of(new), new)
    time.sleep(0.06)
    assert fast.get("model", "1", "bg")[1].sum() == 9  # re-validated by sha256, then fetched
    assert slow.get("model", "1", "bg")[1].sum() == 0  # its bound (60 s) has not passed


@pytest.mark.parametrize("tamper", ["flip", "truncate", "header", "sha"])
def test_corrupt_values_are_reported_and_never_used(stores: Callable[..., RedisStore],
                                                   redis_server: RedisProcess,
                                                   tamper: str) -> None:
    metrics = Metrics(CollectorRegistry())
    holder, fresh = stores(metrics=metrics), stores(metrics=metrics)
    data = np.random.default_rng(1).normal(size=(20, 3))
    holder.put(meta_of(data), data)
    key, r = f"{PREFIX}bg:model:1:bg", redis_server.client()
    raw = bytearray(r.hget(key, "data") or b"")
    if tamper == "flip":
        raw[17] ^= 0x40
        r.hset(key, mapping={"data": bytes(raw), "sha256": "0" * 64})
    elif tamper == "truncate":
        r.hset(key, mapping={"data": bytes(raw[:-8]), "sha256": "1" * 64})
    elif tamper == "header":
        r.hset(key, mapping={"header": b"{not json", "sha256": "2" * 64})
    else:
        r.hset(key, "sha256", "3" * 64)  # data intact, but the identities disagree
    with pytest.raises(CorruptValue) as err:
        fresh.get("model", "1", "bg")
    assert key in str(err.value) and isinstance(err.value, FailedPrecondition)
    time.sleep(0.06)
    meta, kept = holder.get("model", "1", "bg")  # its verified copy, not Redis's bytes
    assert np.array_equal(kept, data) and meta.sha256 != "0" * 64
    assert errors(metrics) >= 2


def test_outage_serves_local_copies_and_writes_uploads_back(
        stores: Callable[..., RedisStore], redis_server: RedisProcess) -> None:
    metrics = Metrics(CollectorRegistry())
    a, b = stores(metrics=metrics), stores()
    data = np.full((5, 3), 2.0)
    a.put(meta_of(data), data)
    redis_server.kill()
    time.sleep(0.06)
    assert np.array_equal(a.get("model", "1", "bg")[1], data)  # stale-checked, falls back
    assert not a.healthy() and metrics.registry.get_sample_value("sidelight_redis_up") == 0
    assert [m.name for m in a.list()] == ["bg"] and a.head("model", "1", "bg").rows == 5
    held = a.put(meta_of(data + 1, name="offline"), data + 1)
    assert not a.persisted(held) and a.pending() == 1
    assert np.array_equal(a.get("model", "1", "offline")[1], data + 1)
    with pytest.raises(Unavailable):
        a.delete("model", "1", "bg")
    with pytest.raises(Unavailable):
        b.get("model", "1", "offline")  # b never had it and cannot ask
    redis_server.start()  # empty: no persistence
    assert wait_for(lambda: a.pending() == 0 and a.healthy() and b.healthy())
    assert a.persisted(held) and metrics.registry.get_sample_value("sidelight_redis_up") == 1
    assert np.array_equal(b.get("model", "1", "offline")[1], data + 1)
    assert wait_for(lambda: redis_server.client().exists(f"{PREFIX}bg:model:1:bg") == 1)
    assert np.array_equal(b.get("model", "1", "bg")[1], data)  # restored after the data loss


def test_store_started_while_redis_is_down_catches_up(tmp_path: Path) -> None:
    if not RedisProcess.available():
        pytest.skip("redis-server is not installed")
    server = RedisProcess(tmp_path)
    store = RedisStore(RedisOptions(server.url, prefix=PREFIX, connect_timeout_s=0.1))
    try:
        data = np.eye(3)
        seeded = store.put(meta_of(data, source="explain.yaml"), data)
        assert not store.healthy() and not store.persisted(seeded)
        assert store.list("model")[0].source == "explain.yaml"
        server.start()
        assert wait_for(lambda: store.healthy() and store.pending() == 0)
        assert server.client().hget(f"{PREFIX}bg:model:1:bg", "sha256") == seeded.sha256.encode()
    finally:
        store.close()
        server.kill()


def test_conditional_writes_keep_the_newest_value(stores: Callable[..., RedisStore]) -> None:
    """The write modes used when held uploads and seeds are flushed after an outage."""
    store = stores()
    data = np.zeros((2, 3))
    base = meta_of(data, model_sha="a" * 64)
    store.put(base, data)

    def write(mode: str, created: float, model_sha: str = "a" * 64) -> bool:
        from service.store.redis import Local
        meta = BackgroundMeta(**{**base.__dict__, "created": created, "model_sha256": model_sha})
        return store._write(store.key("model", "1", "bg"), Local(meta, data, 0.0), mode)

    assert not write(NEWER, base.created - 1)  # an older held upload loses
    assert write(NEWER, base.created + 1)
    assert not write(SEED, 0.0)  # a seed never replaces a value for the same model file
    assert write(SEED, 0.0, model_sha="b" * 64)  # ... but does replace a stale one
    assert not write(ABSENT, 0.0)


def test_auth(stores: Callable[..., RedisStore], tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, password="s3cret").start()
    try:
        good = stores(server.url)
        data = np.ones((2, 3))
        assert good.healthy() and good.persisted(good.put(meta_of(data), data))
        assert server.client().hget(f"{PREFIX}bg:model:1:bg", "data") == data.tobytes()
        for url in (server.url.replace("s3cret", "wrong"), server.url.replace(":s3cret@", "")):
            bad = stores(url)
            assert not bad.healthy()
            assert not bad.persisted(bad.put(meta_of(data, name="x"), data))
    finally:
        server.kill()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_with_a_private_ca(stores: Callable[..., RedisStore], tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    server = RedisProcess(tmp_path, tls=(cert, key)).start()
    try:
        store = stores(server.url, tls_ca=str(cert))
        data = np.ones((2, 3))
        assert store.healthy() and store.persisted(store.put(meta_of(data), data))
        assert not stores(server.url).healthy()  # the system CAs do not trust it
    finally:
        server.kill()


def test_local_cache_is_bounded_but_keeps_held_uploads(stores: Callable[..., RedisStore],
                                                      redis_server: RedisProcess) -> None:
    store = stores(local_size=2)
    data = np.zeros((2, 3))
    for name in ("a", "b", "c"):
        store.put(meta_of(data, name=name), data)
    assert len(store._local) == 2
    redis_server.kill()
    time.sleep(0.06)
    with pytest.raises(Unavailable):
        store.get("model", "1", "a")  # evicted, and Redis cannot be asked
    for name in ("d", "e", "f"):
        store.put(meta_of(data, name=name), data)
    assert store.pending() == 3 and {"d", "e", "f"} <= {m.name for m in store.list()}


def test_blobs_have_a_ttl_and_degrade_to_misses(stores: Callable[..., RedisStore],
                                               redis_server: RedisProcess) -> None:
    store = stores()
    blob = encode_array(np.arange(6.0).reshape(3, 2))
    store.put_blob("fbg:x", blob, 60.0)
    assert np.array_equal(decode_array(store.get_blob("fbg:x") or b"", "x"),
                          np.arange(6.0).reshape(3, 2))
    assert 0 < int(redis_server.client().pttl(f"{PREFIX}fbg:x")) <= 60_000
    assert store.get_blob("fbg:missing") is None
    redis_server.kill()
    assert store.get_blob("fbg:x") is None
    store.put_blob("fbg:y", blob, 60.0)  # no error: derived data is a cache


def test_array_blobs_detect_tampering() -> None:
    blob = encode_array(np.arange(6.0).reshape(3, 2))
    for bad in (blob[:-1], blob.replace(b'"shape":[3,2]', b'"shape":[2,2]'),
                blob[:-8] + np.float64(9).tobytes(), b"garbage"):
        with pytest.raises(CorruptValue):
            decode_array(bad, "k")


def test_memory_store_is_the_embedded_default() -> None:
    store = MemoryStore()
    data = np.ones((2, 3))
    meta = store.put(meta_of(data), data)
    assert store.persisted(meta) and store.healthy() and store.pending() == 0
    assert store.get_blob("x") is None and store.get("model", "1", "bg")[0] == meta


def test_passwords_are_masked_in_logs() -> None:
    assert masked("redis://:pw@h:1/0") == "redis://***@h:1/0"
    assert masked("redis://h:1") == "redis://h:1"


def test_a_hung_redis_costs_one_timeout_then_local_copies(stores: Callable[..., RedisStore],
                                                          redis_server: RedisProcess) -> None:
    store = stores(timeout_s=0.5)
    data = np.ones((4, 3))
    store.put(meta_of(data), data)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        time.sleep(0.06)
        started = time.monotonic()
        assert np.array_equal(store.get("model", "1", "bg")[1], data)
        assert time.monotonic() - started < 0.95 and not store.healthy()  # one timeout, no retry
        started = time.monotonic()
        store.get("model", "1", "bg")
        assert time.monotonic() - started < 0.25  # marked down: no more waiting on Redis
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert wait_for(store.healthy)


def test_a_flushed_redis_never_costs_a_replica_its_copy(stores: Callable[..., RedisStore],
                                                       redis_server: RedisProcess) -> None:
    a = stores(check_s=0.0)  # re-validates on every use
    data = np.full((4, 3), 5.0)
    a.put(meta_of(data), data)
    redis_server.client().flushall()  # the connection stays up: only the epoch tells
    assert np.array_equal(a.get("model", "1", "bg")[1], data)  # served, not NOT_FOUND
    assert wait_for(lambda: redis_server.client().exists(f"{PREFIX}bg:model:1:bg") == 1)
    assert np.array_equal(a.get("model", "1", "bg")[1], data)

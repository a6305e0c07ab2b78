"""The result cache: key, LRU and TTL limits, the never-pickle codec, sharing through a store."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import pytest

from explainers.base import Explanation
from service.plane.dataplane import ExplainResult
from service.plane.targets import Target
from service.store.backgrounds import BackgroundMeta, CorruptValue, frame
from service.store.redis import RedisOptions, RedisStore
from service.store.results import Codec, ResultCache, budget_class, request_key
from tests.redis_process import RedisProcess

TYPES = (Explanation, Target, BackgroundMeta)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Blobs:
    """A dict standing in for the store's blob methods (TTL ignored)."""

    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}

    def get_blob(self, key: str) -> bytes | None:
        return self.items.get(key)

    def put_blob(self, key: str, value: bytes, ttl_s: float) -> None:
        self.items[key] = value


def result(seed: float = 0.5) -> ExplainResult:
    e = Explanation.build("permutation", np.array([[seed, -0.25, 1e-300]]),
                          np.array([[0.1, 0.2, 0.0]]), np.array([0.3]), np.array([1.5]),
                          evaluations=42, converged=False, budget_exhausted=True, samples=7,
                          dof=math.inf, notes=("n",))
    meta = BackgroundMeta("m", "1", "default", 10, 3, "float32", "a" * 64, 1.5, "upload",
                          "b" * 64, ("x", "y", "z"))
    return ExplainResult("m", "1", ("x", "y", "z"), Target("out", (1,), "logit", ("p",)), (e,),
                         3.5, 100.0, "request", meta, np.array([2.0]), np.zeros((0, 3)),
                         notes=("fell back",))


def cache(size: int = 4, shared: Blobs | None = None,
          clock: Clock | None = None) -> ResultCache[ExplainResult]:
    return ResultCache(size, 60.0, ExplainResult, TYPES, shared, clock or Clock())


def same(a: ExplainResult, b: ExplainResult) -> bool:
    arrays = ("values", "std_errors", "base_values", "prediction")
    return a.rows[0].notes == b.rows[0].notes and all(
        np.array_equal(getattr(a.rows[0], f), getattr(b.rows[0], f)) for f in arrays) and \
        dataclasses.replace(a, rows=(), spread=None, X=None) == \
        dataclasses.replace(b, rows=(), spread=None, X=None)


def test_codec_round_trips_exactly_and_freezes_arrays() -> None:
    codec = Codec((ExplainResult, *TYPES))
    back = codec.decode(codec.encode(result()), "k")
    assert isinstance(back, ExplainResult) and same(back, result())
    assert back.rows[0].values[0, 2] == 1e-300 and back.rows[0].dof == math.inf
    assert isinstance(back.target.columns, tuple) and not back.rows[0].values.flags.writeable


def test_codec_refuses_types_outside_the_allowlist() -> None:
    codec = Codec((Target,))
    with pytest.raises(TypeError):
        codec.encode(result())
    payload = Codec((ExplainResult, *TYPES)).encode(result())
    with pytest.raises(CorruptValue):
        codec.decode(payload, "k")  # names a class this codec may not build
    with pytest.raises(CorruptValue):
        codec.decode(b'{"@d":"Target","f":{"nope":1}}', "k")


def test_lru_bound_and_ttl() -> None:
    clock = Clock()
    c = cache(size=2, clock=clock)
    for k in ("a", "b", "c"):
        c.put(k, result())
    assert len(c) == 2 and c.get("a") is None and c.get("c") is not None
    clock.now += 61
    assert c.get("c") is None and len(c) == 1
    off = cache(size=0)
    off.put("a", result())
    assert off.get("a") is None and not off.enabled


def test_shared_results_reach_another_cache_until_their_ttl() -> None:
    blobs, clock = Blobs(), Clock()
    cache(shared=blobs, clock=clock).put("k", result())
    other = cache(shared=blobs, clock=clock)
    got = other.get("k")
    assert got is not None and same(got, result())
    clock.now += 61
    assert cache(shared=blobs, clock=clock).get("k") is None  # expired by its creation time


def test_tampered_shared_result_is_a_miss() -> None:
    blobs = Blobs()
    cache(shared=blobs).put("k", result())
    blobs.items["k"] = blobs.items["k"].replace(b"permutation", b"exactexactx")
    assert cache(shared=blobs).get("k") is None
    blobs.items["k"] = frame({"created": 1000.0}, b'{"@d":"os.system","f":{}}')
    assert cache(shared=blobs).get("k") is None


def test_key_covers_every_part_and_only_values_of_the_inputs() -> None:
    X = np.array([[1.0, 2.0, 3.0]])
    parts = ("sha", "m", "1", "auto", "out", (1,), "logit", "bg", "bgsha", 7, 0, 0.0, 7)
    base = request_key(X, *parts)
    assert request_key(X.astype(np.float32).astype(np.float64), *parts) == base
    assert request_key(X + 1e-9, *parts) != base and request_key(X.T, *parts) != base
    for i in range(len(parts)):
        changed = (*parts[:i], f"{parts[i]}!", *parts[i + 1:])
        assert request_key(X, *changed) != base
    assert budget_class(400) == budget_class(700) == 9 and budget_class(300) == 8


@pytest.fixture
def store(redis_server: RedisProcess) -> Iterator[RedisStore]:
    s = RedisStore(RedisOptions(redis_server.url, prefix="rc:"))
    yield s
    s.close()


def test_results_are_shared_through_redis(store: RedisStore, redis_server: RedisProcess) -> None:
    ResultCache(4, 30.0, ExplainResult, TYPES, store).put("result:abc", result())
    assert 0 < int(redis_server.client().pttl("rc:result:abc")) <= 30_000
    got = ResultCache(4, 30.0, ExplainResult, TYPES, store).get("result:abc")
    assert got is not None and same(got, result())

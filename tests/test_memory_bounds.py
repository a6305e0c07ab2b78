"""Every cache and store is bounded in bytes: the in-memory store refuses uploads past its bound
(named backgrounds are data, never evicted), the caches evict to theirs, Redis's local copies and
held uploads stay within theirs, and an upload is kept without copies."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from explainers.errors import Unavailable
from explainers.memory import ByteLru, nbytes_of
from service.api.server import Sidelight, start
from service.api.tensors import from_array
from service.config import memory_limit
from service.plane.dataplane import DataPlane
from service.store.backgrounds import make_meta
from service.store.redis import RedisOptions, RedisStore
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS, background_of, settings_for
from tests.redis_process import RedisProcess

STORE_BYTES, CACHE_BYTES, TREE_BYTES, RESULT_BYTES = 3_000_000, 1_500_000, 4_000_000, 300_000
BIG = np.random.default_rng(0).normal(size=(10_000, 10)) * 0.05  # 800 KB of float64


@dataclass
class Server:
    app: Sidelight
    stub: pb_grpc.ExplainerStub

    @property
    def plane(self) -> DataPlane:
        assert self.app.plane is not None
        return self.app.plane

    def put(self, data: np.ndarray, name: str,
            model: str = "diabetes_linear") -> pb.PutBackgroundResponse:
        return self.stub.PutBackground(pb.PutBackgroundRequest(model=model, name=name,
                                                               data=from_array("", data)))

    def explain(self, model: str, background: str = "", rows: int = 1, seed: int = 0,
                method: str = "") -> pb.ExplainResponse:
        X = background_of(model)[:rows]
        return self.stub.Explain(pb.ExplainRequest(
            model=model, background=background, inputs=[from_array("input", X)], seed=seed,
            method=method, budget_ms=5000))

    def delete(self, *names: str, model: str = "diabetes_linear") -> None:
        for name in names:
            self.stub.DeleteBackground(pb.DeleteBackgroundRequest(model=model, name=name))

    def names(self) -> set[str]:
        return {b.name for b in self.stub.ListBackgrounds(pb.ListBackgroundsRequest(
            model="diabetes_linear")).backgrounds}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A replica with the in-memory store and small byte bounds for every cache."""
    root = tmp_path_factory.mktemp("repo")
    for model in ("diabetes_linear", "diabetes_forest"):
        (root / model).symlink_to(MODELS / model, target_is_directory=True)
    app = start(settings_for(root, metrics_port=-1, drift_enabled=False,
                             background_store_bytes=STORE_BYTES,
                             background_cache_bytes=CACHE_BYTES, tree_cache_bytes=TREE_BYTES,
                             result_cache_bytes=RESULT_BYTES))
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield Server(app, pb_grpc.ExplainerStub(channel))
    app.stop(grace=0)


def test_memory_store_refuses_uploads_past_its_bound(server: Server) -> None:
    stored = []
    for i in range(10):
        try:
            server.put(BIG + i, f"big{i}")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"{STORE_BYTES} (SIDELIGHT_BACKGROUND_STORE_BYTES)" in err.details()
            break
        stored.append(f"big{i}")
    assert 2 <= len(stored) <= 3 and {*stored, "default"} <= server.names()  # none evicted
    store = server.app.store
    assert store is not None and store.nbytes <= STORE_BYTES  # type: ignore[attr-defined]
    assert server.put(BIG * 2, stored[0]).background.rows == 10_000  # replacing fits
    assert server.stub.DeleteBackground(pb.DeleteBackgroundRequest(
        model="diabetes_linear", name=stored[0])).deleted
    assert server.put(BIG, "after-delete").persisted  # the freed bytes take a new upload
    server.delete(*stored[1:], "after-delete")


def test_caches_evict_to_their_byte_bounds(server: Server) -> None:
    first = server.explain("diabetes_forest", method="tree")
    for i in range(3):  # each background and its forest tables take about 1 and 2.6 MB
        server.put(background_of("diabetes_forest")[:50] + i, f"trees{i}", "diabetes_forest")
        server.explain("diabetes_forest", f"trees{i}", method="tree")
        server.put(BIG + i, f"rows{i}")
        server.explain("diabetes_linear", f"rows{i}")
    plane = server.plane
    assert plane._backgrounds.nbytes <= CACHE_BYTES and len(plane._backgrounds) < 8
    fits = plane.methods._fits
    assert 1 <= len(fits) < 4 and fits.nbytes <= TREE_BYTES * 3 // 4
    again = server.explain("diabetes_forest", method="tree", seed=1)  # refitted after eviction
    assert list(again.rows[0].attributions) == list(first.rows[0].attributions)
    for seed in range(20):  # answers of 20 rows: about 30 KB each
        server.explain("diabetes_linear", rows=20, seed=seed)
    assert 2 <= len(plane.results) < 20 and plane.results.nbytes <= RESULT_BYTES
    server.delete("rows0", "rows1", "rows2")
    server.delete("trees0", "trees1", "trees2", model="diabetes_forest")


def test_an_upload_is_stored_without_copies(server: Server) -> None:
    """The tensor's bytes are read out of the message once and stored as they are."""
    server.put(BIG, "no-copy")
    store = server.app.store
    assert store is not None
    data = store.get("diabetes_linear", "1", "no-copy")[1]
    base = data.base
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, bytes) and len(base) == BIG.nbytes and not data.flags.writeable
    np.testing.assert_array_equal(data, BIG)
    server.delete("no-copy")


def test_redis_local_copies_and_held_uploads_stay_within_their_bound(
        redis_server: RedisProcess) -> None:
    bound = 2_000_000
    store = RedisStore(RedisOptions(redis_server.url, prefix="mb:", local_bytes=bound))
    try:
        metas = [store.put(make_meta("m", "1", f"b{i}", BIG + i, "upload", "s"), BIG + i)
                 for i in range(4)]
        for m in metas:
            assert store.get("m", "1", m.name)[0].sha256 == m.sha256
        assert sum(e.nbytes for e in store._local.values()) <= bound
        assert len(store._local) == 2  # 800 KB each: the two most recent
        redis_server.kill()
        held = store.put(make_meta("m", "1", "held", BIG, "upload", "s"), BIG)
        assert not store.persisted(held)  # Redis away: held, within half of the bound
        with pytest.raises(Unavailable, match="SIDELIGHT_BACKGROUND_STORE_BYTES"):
            store.put(make_meta("m", "1", "held2", BIG + 1, "upload", "s"), BIG + 1)
        assert store.pending() == 1 and sum(e.nbytes for e in store._local.values()) <= bound
    finally:
        store.close()


def test_byte_lru_evicts_the_oldest_and_keeps_nothing_too_big() -> None:
    lru: ByteLru[str, np.ndarray] = ByteLru(3_500)
    for i in range(5):
        lru.put(f"k{i}", np.zeros(100))  # 800 bytes of data plus the array header
    assert [k for k, _ in lru.items()] == ["k2", "k3", "k4"] and lru.nbytes <= 3_500
    assert lru.get("k2") is not None
    lru.put("k5", np.zeros(100))
    assert [k for k, _ in lru.items()] == ["k4", "k2", "k5"]  # k3 was the least recent
    lru.put("huge", np.zeros(1_000))
    assert lru.get("huge") is None and len(lru) == 3
    assert lru.get_or_build("k6", lambda: np.ones(10))[0] == 1 and lru.get("k6") is not None


def test_nbytes_counts_data_once_and_views_by_their_base() -> None:
    data = np.zeros((1000, 10))
    assert 80_000 < nbytes_of(data) < 80_200
    raw = bytes(80_000)
    view = np.frombuffer(raw, np.float64).reshape(1000, 10)
    assert 80_000 < nbytes_of(view) < 80_400
    assert nbytes_of(view, view[:10], (data, data)) < nbytes_of(view) + nbytes_of(data) + 400
    assert nbytes_of({"a": data}, [data[:5]]) < 81_000


def test_memory_limit_comes_from_the_cgroup(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    v2.write_text("max\n")
    v1.write_text("9223372036854771712\n")  # cgroup v1: no limit
    assert memory_limit((v2, v1)) == 2 * 1024**3
    v2.write_text("1073741824\n")
    assert memory_limit((v2, v1)) == 1024**3
    assert settings_for(MODELS, memory_limit_bytes=1024**3).result_cache_bytes == 1024**3 // 32

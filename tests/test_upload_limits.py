"""Per-client upload limits through a real server: counted per token name when tokens are on,
per peer address (not per connection) when they are off; a refused upload leaves the stored
background as it was; windows expire and the table of clients stays bounded."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

import service.plane.quotas as quotas
from explainers.errors import ResourceExhausted
from service.api.server import start
from service.api.tensors import from_array
from service.plane.quotas import UploadQuota
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import background_of, settings_for
from tests.secured import FRESH, one_model_repo

MODEL = "diabetes_linear"
ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-fedcba9876543210"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return one_model_repo(tmp_path_factory.mktemp("repo"))


@contextmanager
def serve(repo: Path, **overrides: object) -> Iterator[int]:
    app = start(settings_for(repo, **{"metrics_port": -1, "drift_enabled": False, **overrides}))
    yield app.port
    app.stop(grace=0)


def put(port: int, name: str, rows: int = 10, token: str = "") -> pb.PutBackgroundResponse:
    """An upload over a connection of its own."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    data = background_of(MODEL)[:rows]  # (rows, 10) float64: 80 bytes a row
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=FRESH) as channel:
        return pb_grpc.ExplainerStub(channel).PutBackground(pb.PutBackgroundRequest(
            model=MODEL, name=name, data=from_array("", data)), metadata=metadata, timeout=10)


def refused(port: int, name: str, **kwargs: object) -> str:
    with pytest.raises(grpc.RpcError) as err:
        put(port, name, **kwargs)  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return str(err.value.details())


def test_uploads_are_counted_per_peer_address(repo: Path) -> None:
    with serve(repo, uploads_per_client=2) as port:
        first = put(port, "mine").background
        put(port, "other")
        message = refused(port, "mine", rows=20)  # a new connection, the same address
        assert message.startswith("PutBackground: client 'ipv4:127.0.0.1' made 2 uploads in "
                                  "its current 3600 s window")
        assert "at most 2 (SIDELIGHT_UPLOADS_PER_CLIENT); retry in 3600 s" in message
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            kept = pb_grpc.ExplainerStub(channel).GetBackground(
                pb.GetBackgroundRequest(model=MODEL, name="mine"), timeout=10)
        assert kept.sha256 == first.sha256 and kept.rows == 10


def test_bytes_are_counted_per_token(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text(f"alice admin {ALICE}\nbob admin {BOB}\n")
    with serve(repo, tokens_path=tmp_path / "tokens", upload_bytes_per_client=2000) as port:
        put(port, "a", rows=20, token=ALICE)  # 1600 bytes
        message = refused(port, "a", rows=6, token=ALICE)
        assert message.startswith("PutBackground: client 'alice' uploaded 1600 bytes in its "
                                  "current")
        assert "480 more would pass 2000 (SIDELIGHT_UPLOAD_BYTES_PER_CLIENT)" in message
        put(port, "a", rows=5, token=ALICE)  # still fits
        put(port, "b", rows=20, token=BOB)  # same address, another client


def test_windows_expire_and_zero_means_no_limit() -> None:
    now = [0.0]
    quota = UploadQuota(1, 0, 60.0, clock=lambda: now[0])
    quota.admit("c", 10**12)
    with pytest.raises(ResourceExhausted, match="retry in 30 s"):
        now[0] = 30.0
        quota.admit("c", 1)
    now[0] = 60.0
    quota.admit("c", 1)
    unlimited = UploadQuota(0, 0, 60.0)
    for _ in range(1000):
        unlimited.admit("c", 10**9)


def test_the_table_of_clients_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quotas, "MAX_CLIENTS", 3)
    now = [0.0]
    quota = UploadQuota(1, 0, 60.0, clock=lambda: now[0])
    for i in range(5):
        now[0] = float(i)
        quota.admit(f"c{i}", 1)
        assert len(quota._windows) <= 3
    assert list(quota._windows) == ["c2", "c3", "c4"]  # the oldest windows went first
    now[0] = 63.5  # c2 and c3 closed, c4 open: every closed window goes at once
    quota.admit("c5", 1)
    assert list(quota._windows) == ["c4", "c5"]

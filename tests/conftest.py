"""Shared fixtures: the bundled models and one real sidecar on free ports for the session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.api.server import Sidelight, start
from service.config import Settings
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.redis_process import RedisProcess

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"


def settings_for(models: Path, **overrides: object) -> Settings:
    """Settings for a test server: free ports, loopback only."""
    values: dict[str, object] = {"models_dir": models, "port": 0, "metrics_port": 0,
                                 "host": "127.0.0.1"}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def app() -> Iterator[Sidelight]:
    running = start(settings_for(MODELS))
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="session")
def channel(app: Sidelight) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.ExplainerStub:
    return pb_grpc.ExplainerStub(channel)


def background_of(name: str) -> np.ndarray:
    return np.load(MODELS / name / "background.npy").astype(np.float64)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private redis-server on a free port (no persistence); kill/restart it freely."""
    if not RedisProcess.available():
        pytest.skip("redis-server is not installed")
    server = RedisProcess(tmp_path).start()
    yield server
    server.kill()

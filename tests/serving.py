"""A real server on a test repository and a stub on it, for module-scoped fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from service.api.server import Sidelight, start
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import settings_for


def serve(root: Path, **overrides: object) -> Iterator[Sidelight]:
    """Serve `root` (metrics endpoint off) until the fixture ends."""
    app = start(settings_for(root, **{"metrics_port": -1, **overrides}))
    yield app
    app.stop(grace=0)


def stub_on(app: Sidelight) -> Iterator[pb_grpc.ExplainerStub]:
    """A client stub on the server's port until the fixture ends."""
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield pb_grpc.ExplainerStub(channel)

"""Wires the process together: settings -> repository, store, metrics, data plane -> gRPC server
with health checking and reflection, plus the Prometheus HTTP endpoint."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from explainers.errors import Unavailable
from service.api.servicer import ExplainerServicer
from service.config import Settings
from service.models.repository import ModelRepository
from service.monitoring.metrics import Metrics
from service.plane.dataplane import DataPlane
from service.store.backgrounds import BackgroundStore, MemoryStore
from service.store.redis import RedisOptions, RedisStore, masked
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Explainer"].full_name
REDIS_HEALTH = "redis"  # health service name: SERVING while the shared Redis answers
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
FOLD_EVERY_S = 1.0  # queued request records become metrics and drift at least this often
MESSAGE_OVERHEAD_BYTES = 1024 * 1024  # room beyond max_upload_bytes for the rest of a message


@dataclass
class Sidelight:
    """A running sidecar: its ports, its data plane once models are loaded, and a stop()."""

    settings: Settings
    server: grpc.Server
    health: health.HealthServicer
    metrics: Metrics
    port: int
    metrics_port: int = -1
    plane: DataPlane | None = None
    store: BackgroundStore | None = None
    _http: list[Any] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def data_plane(self) -> DataPlane:
        if self.plane is None:
            raise Unavailable("models are still loading; retry shortly")
        return self.plane

    def load(self) -> None:
        """Load the repository, seed and warm backgrounds, then report SERVING."""
        repo = ModelRepository.load(self.settings.models_dir, self.settings)
        self.store = build_store(self.settings, self.metrics, self._redis_state)
        plane = DataPlane(repo, self.store, self.settings, self.metrics)
        plane.seed_backgrounds()
        plane.warm()
        self.plane = plane
        status = health_pb2.HealthCheckResponse.SERVING if repo.ready() \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)
        log.info("loaded %d model version(s); %s", len(repo.ready()),
                 "SERVING" if repo.ready() else "NOT_SERVING (no model loaded)")

    def _redis_state(self, up: bool) -> None:
        """Redis's own health entry; the service stays SERVING on local copies either way."""
        self.health.set(REDIS_HEALTH, health_pb2.HealthCheckResponse.SERVING if up
                        else health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()
        self._stop.set()
        self.metrics.recorder.fold()
        for server in self._http:
            server.shutdown()
        if self.store is not None:
            self.store.close()
            if self.store.pending():
                log.warning("stopped with %d background upload(s) never written to Redis",
                            self.store.pending())


def build_store(settings: Settings, metrics: Metrics,
                on_state: Callable[[bool], None]) -> BackgroundStore:
    """Redis when SIDELIGHT_REDIS_URL is set (shared by every replica), else in memory."""
    if not settings.redis_url:
        metrics.redis_up.set(1)
        return MemoryStore(settings.background_store_bytes)
    log.info("backgrounds and results in Redis at %s", masked(settings.redis_url))
    return RedisStore(RedisOptions.from_settings(settings), metrics, on_state)


def start(settings: Settings, registry: CollectorRegistry | None = None,
          load: bool = True) -> Sidelight:
    """Start gRPC (health NOT_SERVING), the metrics endpoint, then load the models."""
    metrics = Metrics(registry or CollectorRegistry())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.workers),
                         options=[("grpc.max_receive_message_length",
                                   settings.max_upload_bytes + MESSAGE_OVERHEAD_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
                         maximum_concurrent_rpcs=4 * settings.max_in_flight)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    app = Sidelight(settings, server, health_servicer, metrics, port)
    pb_grpc.add_ExplainerServicer_to_server(ExplainerServicer(app.data_plane), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.start()
    metrics.recorder.run(FOLD_EVERY_S, app._stop)
    _start_metrics(app)
    if load:
        app.load()
    return app


def _start_metrics(app: Sidelight) -> None:
    if app.settings.metrics_port < 0:
        return
    http, _ = start_http_server(app.settings.metrics_port, addr=app.settings.host,
                                registry=app.metrics.registry)
    app._http.append(http)
    app.metrics_port = int(http.server_port)

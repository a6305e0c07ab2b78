"""Wires the process together: settings -> repository, store, metrics, data plane -> gRPC server
(TLS, tokens) with health checking and reflection, plus the Prometheus HTTP endpoint."""

from __future__ import annotations

import errno
import gc
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from explainers.errors import Unavailable
from service.api.auth import AccessGuard, Tokens, exposure_problem, is_loopback
from service.api.datasets import DatasetsServicer
from service.api.layers import LayersServicer
from service.api.servicer import DecodeGuard, ExplainerServicer, message_limit
from service.api.tls import CertificateWatch, HttpsMetricsServer, TlsFiles, server_credentials
from service.config import Settings
from service.models.repository import ModelRepository
from service.monitoring.metrics import Metrics
from service.plane.dataplane import DataPlane
from service.plane.datasets import DatasetPlane
from service.plane.layers import LayerPlane
from service.plane.reloader import Reloader
from service.store.backgrounds import BackgroundStore, MemoryStore
from service.store.redis import RedisOptions, RedisStore, masked
from sidelight.v1 import datasets_pb2, datasets_pb2_grpc
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from sidelight.v1 import layers_pb2 as layers_pb
from sidelight.v1 import layers_pb2_grpc as layers_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Explainer"].full_name
LAYERS_NAME = layers_pb.DESCRIPTOR.services_by_name["Layers"].full_name
DATASETS_NAME = datasets_pb2.DESCRIPTOR.services_by_name["Datasets"].full_name
SERVICES = (SERVICE_NAME, LAYERS_NAME, DATASETS_NAME)  # health names (with ""), reflection
REDIS_HEALTH = "redis"  # health service name: SERVING while the shared Redis answers
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
FOLD_EVERY_S = 1.0  # queued request records become metrics and drift at least this often


class StartupError(Exception):
    """The sidecar cannot start (a port in use, no model repository): one line for the user."""


@dataclass
class Sidelight:
    """A running sidecar: its ports, its data plane once models are loaded, and a stop()."""

    settings: Settings
    server: grpc.Server
    health: health.HealthServicer
    metrics: Metrics
    port: int
    metrics_port: int = -1
    health_port: int = -1  # the plaintext health-only port, when SIDELIGHT_HEALTH_PORT is set
    plane: DataPlane | None = None
    datasets: DatasetPlane | None = None
    layers: LayerPlane | None = None
    store: BackgroundStore | None = None
    reloader: Reloader | None = None  # looks for changed models (SIDELIGHT_RELOAD_INTERVAL_SECONDS)
    certificates: CertificateWatch | None = None  # TLS on
    _http: list[Any] = field(default_factory=list)
    _grpc: list[grpc.Server] = field(default_factory=list)  # besides `server`: health only
    _stop: threading.Event = field(default_factory=threading.Event)
    _health_lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: bool = False  # from drain() or stop() on: no reloads, health NOT_SERVING

    def data_plane(self) -> DataPlane:
        if self.plane is None:
            raise Unavailable("models are still loading; retry shortly")
        return self.plane

    def dataset_plane(self) -> DatasetPlane:
        if self.datasets is None:
            raise Unavailable("models are still loading; retry shortly")
        return self.datasets

    def layer_plane(self) -> LayerPlane:
        if self.layers is None:
            raise Unavailable("models are still loading; retry shortly")
        return self.layers

    def load(self) -> None:
        """Load the repository, seed and warm backgrounds, then report SERVING."""
        repo = ModelRepository.load(self.settings.models_dir, self.settings)
        self.store = build_store(self.settings, self.metrics, self._redis_state)
        plane = DataPlane(repo, self.store, self.settings, self.metrics)
        plane.seed_backgrounds()
        plane.warm()
        datasets, layers = DatasetPlane(plane), LayerPlane(plane)
        freeze_startup_objects()
        self.plane, self.datasets, self.layers = plane, datasets, layers
        self._serving()
        self.metrics.initialise(repo.entries, plane.methods.known())
        log.info("loaded %d model version(s); %s", len(repo.ready()),
                 "SERVING" if repo.ready() else "NOT_SERVING (no model loaded)")
        with self._health_lock:
            if not self._stopping:
                self.reloader = Reloader(plane, self._serving).start()

    def _serving(self) -> None:
        """Health SERVING while some model version is ready (a reload may change that),
        unless the server is stopping."""
        ready = self.plane is not None and bool(self.plane.repo.ready())
        status = health_pb2.HealthCheckResponse.SERVING if ready \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        with self._health_lock:
            if not self._stopping:
                for name in ("", *SERVICES):
                    self.health.set(name, status)

    def _redis_state(self, up: bool) -> None:
        """Redis's own health entry; the service stays SERVING on local copies either way."""
        self.health.set(REDIS_HEALTH, health_pb2.HealthCheckResponse.SERVING if up
                        else health_pb2.HealthCheckResponse.NOT_SERVING)

    def drain(self, grace: float, delay: float) -> None:
        """Stop gracefully: health NOT_SERVING first (readiness drains), new explanations
        refused, a `delay` for probes and balancers to see it, then the port closes while the
        calls in flight get `grace` seconds; calls still running are cancelled (their
        computation stops at the next yield point) and the process is left to exit."""
        with self._health_lock:
            self._stopping = True
            for name in ("", *SERVICES):
                self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.plane is not None:
            self.plane.drain()
        log.info("stopping: NOT_SERVING; closing the port in %.1f s, %.1f s for calls in flight",
                 delay, grace)
        time.sleep(delay)
        self.stop(grace)

    def stop(self, grace: float = 1.0) -> None:
        with self._health_lock:
            self._stopping = True
        if self.reloader is not None:
            self.reloader.close()
        for server in (self.server, *self._grpc):
            server.stop(grace).wait()
        if self.plane is not None:
            self.plane.close()
        self._stop.set()
        self.metrics.recorder.fold()
        for server in self._http:
            server.shutdown()
            server.server_close()
        if self.store is not None:
            self.store.close()
            if self.store.pending():
                log.warning("stopped with %d background upload(s) never written to Redis",
                            self.store.pending())


def freeze_startup_objects() -> None:
    """Move what start-up allocated (imported libraries, parsed models: ~200k objects) out of
    the garbage collector's reach: a full collection over them took 108 ms here, a pause that
    lands inside some request's budget; frozen, it takes microseconds."""
    gc.collect()
    gc.freeze()


def build_store(settings: Settings, metrics: Metrics,
                on_state: Callable[[bool], None]) -> BackgroundStore:
    """Redis when SIDELIGHT_REDIS_URL is set (shared by every replica), else in memory."""
    if not settings.redis_url:
        metrics.redis_up.set(1)
        return MemoryStore(settings.background_store_bytes)
    log.info("backgrounds and results in Redis at %s", masked(settings.redis_url))
    return RedisStore(RedisOptions.from_settings(settings), metrics, on_state)


@dataclass(frozen=True)
class Security:
    """Who may call what (tokens, roles, admin switch) and the port's certificates."""

    guard: AccessGuard
    certificates: CertificateWatch | None  # None: plaintext


def security(settings: Settings) -> Security:
    """Tokens and certificates read and checked, or StartupError saying what is wrong; a
    non-loopback address without tokens is refused unless SIDELIGHT_ALLOW_INSECURE."""
    problem = exposure_problem(settings)
    if problem is not None:
        raise StartupError(problem)
    try:
        files = TlsFiles.from_settings(settings)
        watch = CertificateWatch(files) if files is not None else None
        tokens = Tokens(settings.tokens_path) if settings.tokens_path is not None else None
    except (OSError, ValueError) as err:
        raise StartupError(str(err)) from None
    if tokens is not None and watch is None and not is_loopback(settings.host):
        log.warning("tokens travel unencrypted to %s: set SIDELIGHT_TLS_CERT and "
                    "SIDELIGHT_TLS_KEY, unless a service mesh encrypts the traffic",
                    settings.host)
    return Security(AccessGuard(tokens, settings.admin_rpcs), watch)


def start(settings: Settings, registry: CollectorRegistry | None = None,
          load: bool = True) -> Sidelight:
    """Start gRPC (health NOT_SERVING), the metrics endpoint, then load the models."""
    secure = security(settings)
    metrics = Metrics(registry or CollectorRegistry())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.workers),
                         options=[("grpc.max_receive_message_length", message_limit(settings)),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.so_reuseport", 0)],  # a second server must not share
                         interceptors=[secure.guard, DecodeGuard()],
                         maximum_concurrent_rpcs=None)  # shedding is admission's (counted)
    health_servicer = health.HealthServicer()
    for name in ("", *SERVICES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    app = Sidelight(settings, server, health_servicer, metrics,
                    _bind(server, settings.host, settings.port, secure.certificates),
                    certificates=secure.certificates)
    pb_grpc.add_ExplainerServicer_to_server(
        ExplainerServicer(app.data_plane, secure.guard.client_id), server)
    layers_grpc.add_LayersServicer_to_server(LayersServicer(app.layer_plane), server)
    datasets_pb2_grpc.add_DatasetsServicer_to_server(DatasetsServicer(app.dataset_plane), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.start()
    metrics.recorder.run(FOLD_EVERY_S, app._stop)
    try:
        _start_health_port(app)
        _start_metrics(app)
        if load:
            app.load()
    except BaseException:
        app.stop(grace=0)
        raise
    return app


def _bind(server: grpc.Server, host: str, port: int, certificates: CertificateWatch | None,
          name: str = "gRPC port", setting: str = "--port or SIDELIGHT_PORT") -> int:
    """Listen on a gRPC port (TLS when certificates are given), or StartupError when another
    process does: grpcio would otherwise share it (SO_REUSEPORT) and split the traffic."""
    if port and _in_use(host, port):  # checked first: grpcio's refusal also logs a C++ line
        raise StartupError(f"{name} {port} on {host} is in use (another sidelight?); choose "
                           f"another with {setting}")
    try:
        if certificates is not None:
            return int(server.add_secure_port(f"{host}:{port}", server_credentials(certificates)))
        return int(server.add_insecure_port(f"{host}:{port}"))
    except RuntimeError:
        raise StartupError(f"{name}: cannot listen on {host}:{port} (in use, or not an address "
                           f"of this host); see SIDELIGHT_HOST and {setting}") from None


def _start_health_port(app: Sidelight) -> None:
    """Health checks alone on a plaintext port (SIDELIGHT_HEALTH_PORT): Kubernetes gRPC probes
    cannot speak TLS, and health tells nothing but SERVING / NOT_SERVING."""
    port = app.settings.health_port
    if port < 0:
        return
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=16)
    health_pb2_grpc.add_HealthServicer_to_server(app.health, server)
    app.health_port = _bind(server, app.settings.host, port, None, "health port",
                            "SIDELIGHT_HEALTH_PORT")
    server.start()
    app._grpc.append(server)


def _in_use(host: str, port: int) -> bool:
    """Whether binding host:port fails with EADDRINUSE (a listening socket holds it)."""
    try:
        found = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # grpcio reports the bad address itself
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpcio sets it
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    return True
    return False


def _start_metrics(app: Sidelight) -> None:
    """/metrics on its own address (default: the gRPC one), over HTTPS with SIDELIGHT_METRICS_TLS
    (TlsFiles makes sure a certificate is configured then)."""
    s = app.settings
    port, host = s.metrics_port, s.metrics_host or s.host
    if port < 0:
        return
    try:
        if s.metrics_tls and app.certificates is not None:
            http: Any = HttpsMetricsServer(host, port, app.certificates, app.metrics.registry)
        else:
            http, _ = start_http_server(port, addr=host, registry=app.metrics.registry)
    except OSError as err:
        raise StartupError(f"metrics port {port} on {host}: {err.strerror}; choose "
                           "another with --metrics-port or SIDELIGHT_METRICS_PORT") from None
    app._http.append(http)
    app.metrics_port = int(http.server_port)

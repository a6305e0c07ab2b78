"""TLS for the gRPC port (mutual TLS with a client CA) and the metrics endpoint. Certificates
are re-read when their files change (a Kubernetes Secret is rotated in place): the next new
connection gets the new certificate, without a restart."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import grpc
from prometheus_client import CollectorRegistry, make_wsgi_app

from service.config import Settings

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 5.0  # a metrics client that stalls its handshake holds one thread, briefly
Signature = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class TlsFiles:
    """Where the server's certificate chain, its key and (for mTLS) the client CA are."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> TlsFiles | None:
        """The configured files, None when TLS is off; ValueError for half a configuration."""
        if s.tls_cert is None and s.tls_key is None:
            if s.tls_client_ca is not None or s.metrics_tls:
                raise ValueError("SIDELIGHT_TLS_CLIENT_CA and SIDELIGHT_METRICS_TLS need "
                                 "SIDELIGHT_TLS_CERT and SIDELIGHT_TLS_KEY")
            return None
        if s.tls_cert is None or s.tls_key is None:
            raise ValueError("TLS needs both SIDELIGHT_TLS_CERT and SIDELIGHT_TLS_KEY")
        return cls(s.tls_cert, s.tls_key, s.tls_client_ca)

    def signature(self) -> Signature:
        """What changes when any of the files is replaced (symbolic links followed)."""
        stats = [p.stat() for p in (self.cert, self.key, self.client_ca) if p is not None]
        return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)


@dataclass(frozen=True)
class Certificates:
    """One consistent reading of the files: PEM bytes for gRPC, a context for HTTPS."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext

    def grpc_config(self) -> Any:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], self.client_ca)


def read_certificates(files: TlsFiles) -> Certificates:
    """Read the files and check them (ssl refuses a key that does not match the certificate);
    ValueError when they changed while being read (the next connection tries again)."""
    before = files.signature()
    cert, key = files.cert.read_bytes(), files.key.read_bytes()
    ca = files.client_ca.read_bytes() if files.client_ca is not None else None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as err:
        raise ValueError(f"{files.cert}, {files.key}: not a PEM certificate chain and its "
                         f"private key ({err.reason or err})") from None
    if files.client_ca is not None:
        context.load_verify_locations(cafile=files.client_ca)  # checks it parses
    if files.signature() != before:
        raise ValueError(f"{files.cert}: changed while being read")
    return Certificates(cert, key, ca, context)


class CertificateWatch:
    """The current certificates, re-read when a file changes. Checked at every new connection
    (a few stat calls); a change that cannot be used keeps the previous certificates."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._signature = files.signature()
        self.current = read_certificates(files)  # start-up: an error refuses to start
        self._lock = threading.Lock()

    def latest(self) -> Certificates:
        with self._lock:
            try:
                current = self.files.signature()
            except OSError:
                return self.current  # mid-rotation a file can be briefly missing
            if current != self._signature:
                self._signature = current
                self._reload()
            return self.current

    def _reload(self) -> None:
        try:
            self.current = read_certificates(self.files)
        except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
            log.warning("TLS files changed but cannot be used, keeping the previous "
                        "certificate: %s", err)
            return
        log.info("TLS certificate reloaded from %s", self.files.cert)


def server_credentials(watch: CertificateWatch) -> grpc.ServerCredentials:
    """gRPC credentials whose certificate follows the files; client certificates signed by the
    client CA are required when one is configured."""
    seen = [watch.current]

    def fetch() -> Any:  # grpc calls it before every new connection's handshake
        certs = watch.latest()
        if certs is seen[0]:
            return None  # no change
        seen[0] = certs
        return certs.grpc_config()

    return grpc.dynamic_ssl_server_credentials(
        watch.current.grpc_config(), fetch,
        require_client_authentication=watch.files.client_ca is not None)


class QuietHandler(WSGIRequestHandler):
    """No log line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpsMetricsServer(WSGIServer):
    """/metrics over HTTPS with the watched certificate. Each connection gets its own thread
    and its handshake happens there, under a timeout: prometheus_client's own HTTPS server
    shakes hands in its accept loop, so one silent connection stalls every scrape."""

    def __init__(self, host: str, port: int, watch: CertificateWatch,
                 registry: CollectorRegistry) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.watch = watch
        super().__init__((host.strip("[]"), port), QuietHandler)
        self.set_app(make_wsgi_app(registry))
        threading.Thread(target=self.serve_forever, name="metrics-https", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        threading.Thread(target=self._serve, args=(request, client_address),
                         daemon=True).start()

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            with self.watch.latest().context.wrap_socket(request, server_side=True) as tls:
                self.finish_request(tls, client_address)
        except OSError as err:  # a failed or stalled handshake, a client gone
            log.debug("metrics connection from %s: %s", client_address, err)
        finally:
            request.close()

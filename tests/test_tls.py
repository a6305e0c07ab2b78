"""TLS on a real server with real clients: TLS clients served and plaintext ones refused, mutual
TLS refusing clients without a certificate of the client CA, certificates rotated on disk picked
up by the next connection, /metrics over HTTPS and on its own address, start-up refusals."""

from __future__ import annotations

import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.server import Sidelight, StartupError, start
from service.cli import client_needs, main
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.certs import Authority, Issued, served_serial
from tests.conftest import settings_for
from tests.secured import FRESH, code_of, one_model_repo, tls_channel


@dataclass(frozen=True)
class Pki:
    """Two unrelated CAs; a server and a client certificate from the first, a client
    certificate from the second; the first CA's certificate on disk."""

    folder: Path
    ca: Authority
    other_ca: Authority
    server: Issued
    client: Issued
    stranger: Issued
    ca_file: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = Authority("Test CA"), Authority("Other CA")
    pki = Pki(folder, ca, other, ca.issue("sidelight", server=True),
              ca.issue("client", server=False), other.issue("stranger", server=False),
              ca.write(folder, "ca"))
    pki.server.write(folder, "server")
    pki.client.write(folder, "client")
    pki.stranger.write(folder, "stranger")
    return pki


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return one_model_repo(tmp_path_factory.mktemp("repo"))


def serve_tls(repo: Path, folder: Path, **overrides: object) -> Sidelight:
    return start(settings_for(repo, **{"metrics_port": -1, "drift_enabled": False,
                                       "tls_cert": folder / "server.crt",
                                       "tls_key": folder / "server.key", **overrides}))


@pytest.fixture(scope="module")
def tls_app(pki: Pki, repo: Path) -> Iterator[Sidelight]:
    app = serve_tls(repo, pki.folder)
    yield app
    app.stop(grace=0)


@pytest.fixture(scope="module")
def mtls_app(pki: Pki, repo: Path) -> Iterator[Sidelight]:
    app = serve_tls(repo, pki.folder, tls_client_ca=pki.ca_file)
    yield app
    app.stop(grace=0)


def list_models(channel: grpc.Channel) -> grpc.StatusCode:
    with channel:
        return code_of(pb_grpc.ExplainerStub(channel).ListModels, pb.ListModelsRequest())


def test_tls_serves_tls_clients_and_refuses_plaintext_ones(tls_app: Sidelight,
                                                           pki: Pki) -> None:
    with tls_channel(tls_app.port, pki.ca.pem) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        info = stub.GetModel(pb.GetModelRequest(model="diabetes_linear"), timeout=10)
        assert info.state == "READY"
    plain = grpc.insecure_channel(f"127.0.0.1:{tls_app.port}", options=FRESH)
    assert list_models(plain) == grpc.StatusCode.UNAVAILABLE
    assert list_models(tls_channel(tls_app.port, pki.other_ca.pem)) == \
        grpc.StatusCode.UNAVAILABLE  # a server certificate the client does not trust
    assert served_serial(tls_app.port, pki.ca_file) == pki.server.serial


def test_mutual_tls_needs_a_client_certificate_of_the_client_ca(mtls_app: Sidelight,
                                                                pki: Pki) -> None:
    assert list_models(tls_channel(mtls_app.port, pki.ca.pem, pki.client)) == \
        grpc.StatusCode.OK
    assert list_models(tls_channel(mtls_app.port, pki.ca.pem)) == grpc.StatusCode.UNAVAILABLE
    assert list_models(tls_channel(mtls_app.port, pki.ca.pem, pki.stranger)) == \
        grpc.StatusCode.UNAVAILABLE
    plain = grpc.insecure_channel(f"127.0.0.1:{mtls_app.port}", options=FRESH)
    assert list_models(plain) == grpc.StatusCode.UNAVAILABLE


def test_rotated_certificates_are_served_to_the_next_connection(pki: Pki, repo: Path,
                                                                tmp_path: Path) -> None:
    pki.server.write(tmp_path, "server")
    app = serve_tls(repo, tmp_path)
    try:
        assert served_serial(app.port, pki.ca_file) == pki.server.serial
        renewed = pki.ca.issue("sidelight", server=True)
        renewed.write(tmp_path, "server")  # same CA: clients notice nothing but the serial
        assert served_serial(app.port, pki.ca_file) == renewed.serial
        assert list_models(tls_channel(app.port, pki.ca.pem)) == grpc.StatusCode.OK
        moved = pki.other_ca.issue("sidelight", server=True)
        moved.write(tmp_path, "server")  # a new CA: only clients that trust it get in
        assert list_models(tls_channel(app.port, pki.ca.pem)) == grpc.StatusCode.UNAVAILABLE
        assert list_models(tls_channel(app.port, pki.other_ca.pem)) == grpc.StatusCode.OK
        (tmp_path / "server.key").write_bytes(renewed.key)  # a key of another certificate
        assert list_models(tls_channel(app.port, pki.other_ca.pem)) == grpc.StatusCode.OK
    finally:
        app.stop(grace=0)


def test_a_rotated_client_ca_is_picked_up(pki: Pki, repo: Path, tmp_path: Path) -> None:
    pki.server.write(tmp_path, "server")
    client_ca = pki.ca.write(tmp_path, "clients")
    app = serve_tls(repo, tmp_path, tls_client_ca=client_ca)
    try:
        assert list_models(tls_channel(app.port, pki.ca.pem, pki.client)) == grpc.StatusCode.OK
        pki.other_ca.write(tmp_path, "clients")
        assert list_models(tls_channel(app.port, pki.ca.pem, pki.client)) == \
            grpc.StatusCode.UNAVAILABLE
        assert list_models(tls_channel(app.port, pki.ca.pem, pki.stranger)) == \
            grpc.StatusCode.OK
    finally:
        app.stop(grace=0)


def scrape(url: str, ca: Path | None = None) -> str:
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        return str(response.read().decode())


def test_metrics_over_https_follow_rotation_and_survive_a_silent_client(
        pki: Pki, repo: Path, tmp_path: Path) -> None:
    pki.server.write(tmp_path, "server")
    app = serve_tls(repo, tmp_path, metrics_port=0, metrics_tls=True)
    url = f"https://127.0.0.1:{app.metrics_port}/metrics"
    try:
        assert "sidelight_explain_in_flight" in scrape(url, pki.ca_file)
        with pytest.raises(OSError):  # plain HTTP: the handshake fails, the connection resets
            scrape(f"http://127.0.0.1:{app.metrics_port}/metrics")
        with socket.create_connection(("127.0.0.1", app.metrics_port)):  # says nothing
            assert "sidelight_explain_in_flight" in scrape(url, pki.ca_file)
        renewed = pki.ca.issue("sidelight", server=True)
        renewed.write(tmp_path, "server")
        assert served_serial(app.metrics_port, pki.ca_file, alpn="http/1.1") == renewed.serial
        assert "sidelight_explain_in_flight" in scrape(url, pki.ca_file)
    finally:
        app.stop(grace=0)


def test_metrics_bind_their_own_address(repo: Path) -> None:
    app = start(settings_for(repo, metrics_port=0, metrics_host="127.0.0.2",
                             drift_enabled=False))
    try:
        assert "sidelight_" in scrape(f"http://127.0.0.2:{app.metrics_port}/metrics")
        with pytest.raises(urllib.error.URLError):
            scrape(f"http://127.0.0.1:{app.metrics_port}/metrics")
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            assert list_models(channel) == grpc.StatusCode.OK
    finally:
        app.stop(grace=0)


@pytest.mark.parametrize("files, message", [
    ({"tls_cert": "server.crt"}, "TLS needs both SIDELIGHT_TLS_CERT and SIDELIGHT_TLS_KEY"),
    ({"metrics_tls": True}, "SIDELIGHT_METRICS_TLS need SIDELIGHT_TLS_CERT"),
    ({"tls_cert": "server.crt", "tls_key": "client.key"}, "not a PEM certificate chain and "
     "its private key"),
    ({"tls_cert": "server.crt", "tls_key": "missing.key"}, "No such file"),
])
def test_unusable_tls_settings_refuse_to_start(pki: Pki, repo: Path, files: dict[str, object],
                                               message: str) -> None:
    paths = {k: pki.folder / v if isinstance(v, str) else v for k, v in files.items()}
    with pytest.raises(StartupError, match=message):
        start(settings_for(repo, metrics_port=-1, **paths), load=False)


def test_the_cli_connects_with_tls_mtls_and_a_token(pki: Pki, repo: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    token = "cli-token-0123456789abcdef"
    (tmp_path / "tokens").write_text(f"cli explain {token}\n")
    app = serve_tls(repo, pki.folder, tls_client_ca=pki.ca_file, tokens_path=tmp_path / "tokens")
    address = ["--address", f"127.0.0.1:{app.port}"]
    mtls = ["--tls-ca", str(pki.ca_file), "--tls-cert", str(pki.folder / "client.crt"),
            "--tls-key", str(pki.folder / "client.key")]
    try:
        main(["models", *address, *mtls, "--token", token])
        assert "diabetes_linear v1 READY" in capsys.readouterr().out
        main(["explain", *address, *mtls, "--token", token, "--model", "diabetes_linear",
              "--row=0.03,0.05,0.06,0.02,-0.04,-0.03,-0.04,0,0.02,-0.02", "--budget-ms", "200"])
        assert "diabetes_linear v1" in capsys.readouterr().out
        with pytest.raises(SystemExit) as info:
            main(["models", *address, *mtls])
        assert str(info.value.code).startswith("UNAUTHENTICATED: missing credentials")
        with pytest.raises(SystemExit) as info:
            main(["models", *address, "--tls-ca", str(pki.ca_file), "--token", token])
        assert str(info.value.code).startswith("UNAVAILABLE")  # no client certificate
    finally:
        app.stop(grace=0)


def test_a_silent_metrics_client_times_out_alone(pki: Pki, repo: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.api.tls.HANDSHAKE_TIMEOUT_S", 0.2)
    pki.server.write(tmp_path, "server")
    app = serve_tls(repo, tmp_path, metrics_port=0, metrics_tls=True)
    try:
        with socket.create_connection(("127.0.0.1", app.metrics_port)) as silent:
            silent.settimeout(5)
            closed = threading.Event()
            threading.Thread(target=lambda: (silent.recv(1), closed.set()), daemon=True).start()
            assert closed.wait(3)  # the server gave up on it
    finally:
        app.stop(grace=0)


def test_a_plaintext_health_port_serves_probes_and_nothing_else(pki: Pki, repo: Path) -> None:
    app = serve_tls(repo, pki.folder, health_port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.health_port}", options=FRESH) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            assert check(health_pb2.HealthCheckRequest(service="sidelight.v1.Explainer"),
                         timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            assert list_models(channel) == grpc.StatusCode.UNIMPLEMENTED
        plain = grpc.insecure_channel(f"127.0.0.1:{app.port}", options=FRESH)
        assert list_models(plain) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(StartupError, match=f"health port {app.health_port} on 127.0.0.1 "
                           "is in use .* SIDELIGHT_HEALTH_PORT"):
            start(settings_for(repo, metrics_port=-1, health_port=app.health_port), load=False)
    finally:
        app.stop(grace=0)


def test_the_banner_says_what_clients_need(pki: Pki, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, tls_cert=pki.folder / "server.crt",
                            tls_key=pki.folder / "server.key", tls_client_ca=pki.ca_file,
                            tokens_path=tmp_path / "tokens")
    assert client_needs(settings) == [
        "--tls-ca <the CA that signs SIDELIGHT_TLS_CERT>",
        "--tls-cert and --tls-key <a client certificate>",
        "SIDELIGHT_TOKEN=<a token> (or --token)"]
    assert client_needs(settings_for(tmp_path)) == []

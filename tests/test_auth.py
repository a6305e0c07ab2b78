"""Tokens and roles on a real server: every RPC under every kind of caller answers the right
code, health stays open, tokens are re-read from a file or a Secret-like directory and never
reach a log line, the reflection and admin switches, and the refusal to serve a non-loopback
address without tokens."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api.auth import Tokens, is_loopback, parse_tokens
from service.api.server import Sidelight, StartupError, start
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import background_of, settings_for
from tests.secured import code_of, one_model_repo

EXPLAIN_TOKEN = "explain-token-7f3a9c1e5b2d4086"
ADMIN_TOKEN = "admin-token-c0ffee11d00d4f2a9e"
WRONG_TOKEN = "wrong-token-5e6f7a8b9c0d1e2f3a"
TOKENS = f"# name roles token\nfrontend explain {EXPLAIN_TOKEN}\nops admin {ADMIN_TOKEN}\n"
MODEL = "diabetes_linear"
OK, UNAUTH, DENIED = (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED,
                      grpc.StatusCode.PERMISSION_DENIED)
Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


CALLERS: dict[str, Metadata] = {
    "none": (), "wrong": bearer(WRONG_TOKEN), "not bearer": (("authorization", ADMIN_TOKEN),),
    "explain": bearer(EXPLAIN_TOKEN), "admin": bearer(ADMIN_TOKEN)}


def rpcs() -> dict[str, Callable[[pb_grpc.ExplainerStub], tuple[Any, Any]]]:
    """Each RPC of the Explainer service with a request it answers OK when allowed."""
    x, data = background_of(MODEL)[:1], background_of(MODEL)[:20]
    return {
        "Explain": lambda s: (s.Explain, pb.ExplainRequest(
            model=MODEL, inputs=[from_array("input", x)], budget_ms=300)),
        "ListModels": lambda s: (s.ListModels, pb.ListModelsRequest()),
        "GetModel": lambda s: (s.GetModel, pb.GetModelRequest(model=MODEL)),
        "GetBackground": lambda s: (s.GetBackground, pb.GetBackgroundRequest(model=MODEL)),
        "ListBackgrounds": lambda s: (s.ListBackgrounds, pb.ListBackgroundsRequest()),
        "PutBackground": lambda s: (s.PutBackground, pb.PutBackgroundRequest(
            model=MODEL, name="mine", data=from_array("", data))),
        "DeleteBackground": lambda s: (s.DeleteBackground, pb.DeleteBackgroundRequest(
            model=MODEL, name="mine")),
    }


ADMIN_RPCS = {"PutBackground", "DeleteBackground"}


def expected(rpc: str, caller: str) -> grpc.StatusCode:
    if caller not in ("explain", "admin"):
        return UNAUTH
    return DENIED if rpc in ADMIN_RPCS and caller == "explain" else OK


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return one_model_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "tokens"
    path.write_text(TOKENS)
    return path


@contextmanager
def serving(repo: Path, **overrides: object) -> Iterator[grpc.Channel]:
    app = start(settings_for(repo, **{"metrics_port": -1, "drift_enabled": False, **overrides}))
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield channel
    app.stop(grace=0)


@pytest.fixture(scope="module")
def channel(repo: Path, tokens_file: Path) -> Iterator[grpc.Channel]:
    with serving(repo, tokens_path=tokens_file) as ch:
        yield ch


@pytest.fixture(scope="module")
def locked(repo: Path, tokens_file: Path) -> Iterator[grpc.Channel]:
    """Tokens on, reflection and the admin RPCs switched off."""
    with serving(repo, tokens_path=tokens_file, reflection=False, admin_rpcs=False) as ch:
        yield ch


def call(channel: grpc.Channel, rpc: str, metadata: Metadata) -> grpc.StatusCode:
    method, request = rpcs()[rpc](pb_grpc.ExplainerStub(channel))
    return code_of(method, request, metadata=metadata)


def reflect(channel: grpc.Channel, metadata: Metadata) -> grpc.StatusCode:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10))
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return OK


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("rpc", list(rpcs()))
def test_every_rpc_under_every_caller(channel: grpc.Channel, rpc: str, caller: str) -> None:
    assert call(channel, rpc, CALLERS[caller]) == expected(rpc, caller)


def test_refusals_say_why(channel: grpc.Channel) -> None:
    stub = pb_grpc.ExplainerStub(channel)
    for metadata, code, message in [
            ((), UNAUTH, "missing credentials: send the metadata `authorization: Bearer"),
            (bearer(WRONG_TOKEN), UNAUTH, "invalid token"),
            (CALLERS["not bearer"], UNAUTH, "authorization: expected `Bearer <token>`"),
            (bearer(EXPLAIN_TOKEN), DENIED, "DeleteBackground needs the admin role; client "
                                            "'frontend' has explain")]:
        with pytest.raises(grpc.RpcError) as err:
            stub.DeleteBackground(pb.DeleteBackgroundRequest(model=MODEL, name="x"),
                                  metadata=metadata, timeout=10)
        assert err.value.code() == code and err.value.details().startswith(message)


def test_health_is_open_and_reflection_needs_a_token(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert reflect(channel, ()) == UNAUTH
    assert reflect(channel, bearer(EXPLAIN_TOKEN)) == OK


def test_switches_turn_off_reflection_and_the_admin_rpcs(locked: grpc.Channel) -> None:
    assert reflect(locked, bearer(ADMIN_TOKEN)) == grpc.StatusCode.UNIMPLEMENTED
    for rpc in ADMIN_RPCS:
        assert call(locked, rpc, bearer(ADMIN_TOKEN)) == DENIED
        assert call(locked, rpc, ()) == UNAUTH  # who you are is checked first
    assert call(locked, "GetBackground", bearer(ADMIN_TOKEN)) == OK
    with pytest.raises(grpc.RpcError) as err:
        call_put = rpcs()["PutBackground"](pb_grpc.ExplainerStub(locked))
        call_put[0](call_put[1], metadata=bearer(ADMIN_TOKEN), timeout=10)
    assert "switched off on this server (SIDELIGHT_ADMIN_RPCS=false)" in err.value.details()


def test_the_admin_switch_works_without_tokens(repo: Path) -> None:
    with serving(repo, admin_rpcs=False) as channel:
        assert call(channel, "PutBackground", ()) == DENIED
        assert call(channel, "ListBackgrounds", ()) == OK
        assert reflect(channel, ()) == OK


def test_tokens_never_reach_the_logs(channel: grpc.Channel, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture,
                                     capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    for rpc in rpcs():
        for metadata in CALLERS.values():
            call(channel, rpc, metadata)
    broken = tmp_path / "tokens"
    broken.write_text(f"ops {ADMIN_TOKEN} admin\n")  # token and roles swapped
    with pytest.raises(ValueError) as err:
        Tokens(broken)
    logging.getLogger("test").error("start-up refused: %s", err.value)
    out, errors = capfd.readouterr()
    logged = caplog.text + out + errors
    assert "refused /sidelight.v1.Explainer/PutBackground" in logged  # DEBUG lines were kept
    for token in (EXPLAIN_TOKEN, ADMIN_TOKEN, WRONG_TOKEN):
        assert token not in logged


def wait_for(code: grpc.StatusCode, check: Callable[[], grpc.StatusCode]) -> grpc.StatusCode:
    """The check's result once it equals `code`, or the last one after 5 s."""
    deadline, got = time.monotonic() + 5, check()
    while got != code and time.monotonic() < deadline:
        time.sleep(0.1)
        got = check()
    return got


def test_tokens_are_reloaded_when_the_file_changes(repo: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens"
    path.write_text(TOKENS)
    new = "rotated-token-0a1b2c3d4e5f6a7b"
    with serving(repo, tokens_path=path) as channel:
        path.write_text(f"frontend explain {new}\n")
        assert wait_for(OK, partial(call, channel, "ListModels", bearer(new))) == OK
        assert call(channel, "ListModels", bearer(EXPLAIN_TOKEN)) == UNAUTH
        path.write_text(f"frontend explain {new}\nfrontend admin {ADMIN_TOKEN}\n")
        time.sleep(1.2)  # a broken file keeps the tokens in force
        assert call(channel, "ListModels", bearer(new)) == OK
        assert "same name appears twice" in caplog.text and new not in caplog.text


def test_a_secret_directory_holds_the_tokens(repo: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    (secret / "..2026_01_01_00_00_00.1").mkdir(parents=True)  # what a Secret mount looks like
    (secret / "..2026_01_01_00_00_00.1" / "junk").write_text("not a token line")
    (secret / "frontend").write_text(f"frontend explain {EXPLAIN_TOKEN}\n")
    (secret / "ops").write_text(f"ops admin {ADMIN_TOKEN}\n")
    with serving(repo, tokens_path=secret) as channel:
        assert call(channel, "PutBackground", bearer(ADMIN_TOKEN)) == OK
        assert call(channel, "PutBackground", bearer(EXPLAIN_TOKEN)) == DENIED
        assert call(channel, "Explain", bearer(EXPLAIN_TOKEN)) == OK


@pytest.mark.parametrize("text, message", [
    ("frontend explain short", "16-4096 printable ASCII"),
    (f"frontend reader {EXPLAIN_TOKEN}", "unknown role"),
    (f"frontend explain {EXPLAIN_TOKEN} extra", "4 fields"),
    (f"a explain {EXPLAIN_TOKEN}\nb admin {EXPLAIN_TOKEN}", "same token appears twice"),
    (f"fr/ontend explain {EXPLAIN_TOKEN}", "the name must be"),
])
def test_bad_token_files_name_the_line_and_never_the_token(tmp_path: Path, text: str,
                                                           message: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        Tokens(path)
    assert EXPLAIN_TOKEN not in str(err.value)


def test_roles_combine_and_admin_can_explain() -> None:
    entries = parse_tokens(f"a explain,admin {EXPLAIN_TOKEN}\nb admin {ADMIN_TOKEN}", "t")
    assert [sorted(c.roles) for _, c in entries] == [["admin", "explain"]] * 2
    assert all(EXPLAIN_TOKEN.encode() not in d and len(d) == 32 for d, _ in entries)


def test_a_public_address_needs_tokens_or_an_explicit_opt_out(repo: Path,
                                                               tokens_file: Path) -> None:
    public = {"host": "0.0.0.0", "metrics_port": -1}
    with pytest.raises(StartupError, match=r"refusing to serve 0\.0\.0\.0 .* without tokens"):
        start(settings_for(repo, **public), load=False)
    for extra in ({"allow_insecure": True}, {"tokens_path": tokens_file}):
        app: Sidelight = start(settings_for(repo, **public, **extra), load=False)
        app.stop(grace=0)


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("", False), ("::", False), ("10.1.2.3", False)])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_undecodable_requests_are_refused_before_decoding_without_a_token(
        channel: grpc.Channel) -> None:
    raw = channel.unary_unary("/sidelight.v1.Explainer/PutBackground")
    for metadata, code in [((), UNAUTH), (bearer(ADMIN_TOKEN), grpc.StatusCode.INVALID_ARGUMENT)]:
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff", metadata=metadata, timeout=10)
        assert err.value.code() == code

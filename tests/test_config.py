"""explain.yaml parsing is bounded: a small file cannot expand into a large structure, a large
file is refused, and error messages stay short (issue 11, item 6)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from explainers.errors import FailedPrecondition
from service.api.server import start
from service.models.repository import MAX_CONFIG_BYTES, MAX_ERROR_CHARS, read_config
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import background_of, settings_for
from tests.test_server import request
from tests.test_startup import add_model

# 9 levels of 9 aliases: 9^8 = 43 million strings once expanded, from 311 bytes.
BOMB = "\n".join([
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
    *(f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdef", "bcdefg", strict=True)),
    f"features: [{','.join(['*g'] * 9)}]", ""])


def test_an_alias_bomb_fails_its_model_within_a_second_and_the_others_serve(
        tmp_path: Path) -> None:
    add_model(tmp_path, "good", "diabetes_linear", {})
    bomb = add_model(tmp_path, "bomb", "diabetes_linear", {})
    (bomb / "explain.yaml").write_text(BOMB)
    assert len(BOMB) < 340
    started = time.monotonic()
    with pytest.raises(FailedPrecondition, match="alias"):
        read_config(bomb)
    assert time.monotonic() - started < 1.0
    app = start(settings_for(tmp_path, metrics_port=-1, drift_reference_rows=0))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.ExplainerStub(channel)
            m = stub.GetModel(pb.GetModelRequest(model="bomb"))
            assert m.state == "FAILED" and "alias" in m.error
            assert len(m.error) <= MAX_ERROR_CHARS + 100
            r = stub.Explain(request("good", background_of("diabetes_linear")[:1],
                                     budget_ms=300))
            assert r.rows
    finally:
        app.stop(grace=0)


def test_validation_errors_are_short_and_never_echo_the_input(tmp_path: Path) -> None:
    long_value = "x" * 50_000
    (tmp_path / "explain.yaml").write_text(
        f"features: [[{long_value}], [{long_value}]]\nscale: sideways\nbudget_ms: -1\n")
    with pytest.raises(FailedPrecondition) as err:
        read_config(tmp_path)
    message = str(err.value)
    assert len(message) <= MAX_ERROR_CHARS + 100 and long_value[:100] not in message
    assert "scale" in message and "features" in message


def test_anchors_without_aliases_are_fine(tmp_path: Path) -> None:
    (tmp_path / "explain.yaml").write_text("scale: &s margin\nmethod: auto\n")
    assert read_config(tmp_path).scale == "margin"


def test_an_oversized_config_is_refused_before_parsing(tmp_path: Path) -> None:
    (tmp_path / "explain.yaml").write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(FailedPrecondition, match="larger than"):
        read_config(tmp_path)

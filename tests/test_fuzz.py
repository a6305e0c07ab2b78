"""Issue 11: 2,400 random and malformed requests over every RPC against a real server on the
bundled models plus an INT64 token-id (Gather) model and a two-input model. No INTERNAL, no
UNKNOWN, no OK answer with a non-finite number, no hang; afterwards the server is SERVING, every
model's `default` background is unchanged and an ordinary explanation still works.

The generator and the checks are in tests/fuzzing.py; `make fuzz` sends 10,000 (benchmarks/fuzz.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from service.api.server import start
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import settings_for
from tests.fuzzing import (
    RPCS,
    SERVICE,
    SETTINGS,
    Fuzzer,
    ModelSpec,
    Summary,
    build_repository,
    default_backgrounds,
    health,
    ordinary_explain,
    read_specs,
    run,
)

SEED, COUNT, CLIENTS = 11, 2400, 4


@dataclass(frozen=True)
class FuzzRun:
    """The run's outcomes and the server's state before and after it."""

    summary: Summary
    specs: list[ModelSpec]
    defaults_before: dict[str, str]
    defaults_after: dict[str, str]
    health_after: dict[str, str]
    explains_after: dict[str, str]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzRun]:
    root = build_repository(tmp_path_factory.mktemp("fuzz") / "models")
    app = start(settings_for(root, **SETTINGS))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.ExplainerStub(channel)
            specs = read_specs(stub, root)
            before = default_backgrounds(stub, specs)
            summary = run(channel, Fuzzer(specs, SEED).cases(COUNT), CLIENTS)
            yield FuzzRun(summary, specs, before, default_backgrounds(stub, specs),
                          health(channel), {s.name: ordinary_explain(stub, s) for s in specs})
    finally:
        app.stop(grace=0)


def test_every_rpc_gets_valid_and_malformed_requests(fuzzed: FuzzRun) -> None:
    s = fuzzed.summary
    assert s.total == COUNT and len(fuzzed.specs) == 9
    for rpc in RPCS:
        sent = sum(n for (r, _), n in s.counts.items() if r == rpc)
        assert sent >= 50 and s.valid_ok[rpc] > 0, f"{rpc}: {sent} sent\n{s.table()}"
        assert sent > s.counts[(rpc, "OK")], f"{rpc}: nothing was refused\n{s.table()}"


def test_no_internal_unknown_non_finite_or_hung_answer(fuzzed: FuzzRun) -> None:
    s = fuzzed.summary
    assert len(s.failures) == 0, f"{s.report()}\n{s.table()}"


def test_server_is_serving_afterwards(fuzzed: FuzzRun) -> None:
    assert fuzzed.health_after == {"(server)": "SERVING", SERVICE: "SERVING"}


def test_default_backgrounds_are_intact(fuzzed: FuzzRun) -> None:
    without = {"text_sentiment"}  # a text model: its baseline is the mask token, no background
    assert all(len(sha) == 64 for name, sha in fuzzed.defaults_before.items()
               if name not in without), fuzzed.defaults_before
    assert fuzzed.defaults_after == fuzzed.defaults_before


def test_an_ordinary_explanation_still_works(fuzzed: FuzzRun) -> None:
    failing = {name: answer for name, answer in fuzzed.explains_after.items() if answer != "OK"}
    assert failing == {}


def test_the_generator_is_deterministic(fuzzed: FuzzRun) -> None:
    def payloads(seed: int) -> list[tuple[str, str, bytes, float]]:
        return [(c.rpc, c.kind, c.payload, c.timeout_s)
                for c in Fuzzer(fuzzed.specs, seed).cases(300)]

    assert payloads(SEED) == payloads(SEED) != payloads(SEED + 1)

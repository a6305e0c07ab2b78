"""Issue 11: random and malformed requests over every RPC of every service against a real server
on the bundled models (tabular, the digits CNN, the text model with attention) plus an INT64
token-id (Gather) model and a two-input model; streams read to the end or cancelled by the
client. No INTERNAL (answered or logged), no UNKNOWN, no OK answer with a non-finite number or
a streamed message over its limit, no hang; afterwards the server and every service are
SERVING, every model's `default` background is unchanged and ordinary calls still work.

The generator and the checks are in tests/fuzzing/; `make fuzz` sends 10,000 (benchmarks/fuzz.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from service.api.server import start
from tests.conftest import settings_for
from tests.fuzzing import (
    RPCS,
    SERVICES,
    SETTINGS,
    ModelSpec,
    Summary,
    build_repository,
    channel,
    default_backgrounds,
    fuzzer,
    health,
    ordinary_calls,
    read_specs,
    run,
)

SEED, COUNT, CLIENTS = 11, 3500, 4


@dataclass(frozen=True)
class FuzzRun:
    """The run's outcomes and the server's state before and after it."""

    summary: Summary
    specs: list[ModelSpec]
    defaults_before: dict[str, str]
    defaults_after: dict[str, str]
    health_after: dict[str, str]
    calls_after: dict[str, str]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzRun]:
    root = build_repository(tmp_path_factory.mktemp("fuzz") / "models")
    app = start(settings_for(root, **SETTINGS))
    try:
        with channel(app.port) as ch:
            specs = read_specs(ch, root)
            before = default_backgrounds(ch, specs)
            summary = run(ch, fuzzer(specs, SEED).cases(COUNT), RPCS, CLIENTS)
            yield FuzzRun(summary, specs, before, default_backgrounds(ch, specs),
                          health(ch, SERVICES), ordinary_calls(ch, specs))
    finally:
        app.stop(grace=0)


def test_every_rpc_gets_valid_and_malformed_requests(fuzzed: FuzzRun) -> None:
    s = fuzzed.summary
    assert s.total == COUNT and len(fuzzed.specs) == 10
    for rpc in RPCS:
        sent = s.sent(rpc.name)
        assert sent >= 50 and s.valid_ok[rpc.name] > 0, f"{rpc.name}: {sent} sent\n{s.table()}"
        assert sent > s.counts[(rpc.name, "OK")], f"{rpc.name}: nothing refused\n{s.table()}"


def test_streams_are_read_and_cancelled(fuzzed: FuzzRun) -> None:
    s = fuzzed.summary
    for rpc in RPCS:
        if rpc.streaming != "unary":
            assert s.messages[rpc.name] > s.valid_ok[rpc.name], s.table()
            assert s.counts[(rpc.name, "CANCELLED")] > 0, s.table()


def test_no_internal_unknown_non_finite_oversize_or_hung_answer(fuzzed: FuzzRun) -> None:
    s = fuzzed.summary
    assert len(s.failures) == 0, f"{s.report()}\n{s.table()}"
    assert s.internal_logged == [], s.report()


def test_the_server_and_every_service_are_serving_afterwards(fuzzed: FuzzRun) -> None:
    assert fuzzed.health_after == {"(server)": "SERVING", **{n: "SERVING" for n in SERVICES}}


def test_default_backgrounds_are_intact(fuzzed: FuzzRun) -> None:
    without = {"text_sentiment"}  # a text model: its baseline is the mask token, no background
    assert all(len(sha) == 64 for name, sha in fuzzed.defaults_before.items()
               if name not in without), fuzzed.defaults_before
    assert fuzzed.defaults_after == fuzzed.defaults_before


def test_ordinary_calls_still_work(fuzzed: FuzzRun) -> None:
    failing = {call: answer for call, answer in fuzzed.calls_after.items() if answer != "OK"}
    assert failing == {} and len(fuzzed.calls_after) == 2 * len(fuzzed.specs)


def test_the_generator_is_deterministic(fuzzed: FuzzRun) -> None:
    def payloads(seed: int) -> list[tuple[object, ...]]:
        return [(c.rpc, c.kind, c.payloads, c.timeout_s, c.cancel_s, c.hold_open)
                for c in fuzzer(fuzzed.specs, seed).cases(300)]

    assert payloads(SEED) == payloads(SEED) != payloads(SEED + 1)

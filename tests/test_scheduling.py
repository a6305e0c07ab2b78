"""Earliest deadline first over the cores, cancellation at the next yield point, and rows
that are never thrown away: a multi-row call that runs out of time returns the rows done."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from explainers.errors import Cancelled
from service.api.server import Sidelight
from service.api.tensors import from_array
from service.plane.scheduler import Control, Cores
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.test_budget import D, slow_app  # noqa: F401  (the slow model's server)


def test_cores_go_to_the_earliest_deadline() -> None:
    cores = Cores(1)
    holder = Control(100.0, cores)
    cores.acquire(holder)
    order: list[str] = []

    def wait(name: str, deadline: float) -> None:
        control = Control(deadline, cores)
        cores.acquire(control)
        order.append(name)
        cores.release()

    late = threading.Thread(target=wait, args=("late", 50.0))
    early = threading.Thread(target=wait, args=("early", 10.0))
    late.start()
    time.sleep(0.05)
    early.start()
    time.sleep(0.05)
    assert cores.waiting == 2
    cores.release()
    late.join(1)
    early.join(1)
    assert order == ["early", "late"]


def test_a_yield_point_hands_the_core_to_an_earlier_deadline() -> None:
    cores = Cores(1)
    long_call = Control(100.0, cores)
    cores.acquire(long_call)
    ran = threading.Event()

    def short() -> None:
        control = Control(1.0, cores)
        with cores.held(control):
            ran.set()

    thread = threading.Thread(target=short)
    thread.start()
    time.sleep(0.05)
    assert not ran.is_set()  # the long call still holds the only core
    long_call.pause()  # its next yield point: the short call computes first
    assert ran.is_set()
    cores.release()
    thread.join(1)


def test_a_cancelled_call_stops_at_its_next_yield_point_and_leaves_the_queue() -> None:
    cores = Cores(1)
    holder = Control(1.0, cores)
    cores.acquire(holder)
    waiting = Control(2.0, cores)
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            cores.acquire(waiting)
        except Cancelled as err:
            failed.append(err)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.05)
    waiting.cancel("client gone")
    thread.join(1)
    assert failed and cores.waiting == 0
    holder.cancel("server stopping")
    with pytest.raises(Cancelled, match="server stopping"):
        holder.pause()
    cores.release()
    cores.acquire(Control(3.0, cores))  # the core is free again


@pytest.fixture(scope="module")
def stub(slow_app: Sidelight) -> Iterator[pb_grpc.ExplainerStub]:  # noqa: F811
    with grpc.insecure_channel(f"127.0.0.1:{slow_app.port}") as channel:
        yield pb_grpc.ExplainerStub(channel)


def test_a_call_that_runs_out_of_time_returns_the_rows_done(
        stub: pb_grpc.ExplainerStub) -> None:
    """40 rows of a slow model in 150 ms: each row's share shrinks below the sampler's minimum
    part-way; the rows explained come back OK, the rest are NOT_REACHED, nothing is late."""
    X = np.random.default_rng(5).normal(size=(40, D)).astype(np.float32)
    start = time.monotonic()
    r = stub.Explain(pb.ExplainRequest(model="slow", inputs=[from_array("x", X)],
                                       method="permutation", budget_ms=150, seed=1))
    wall = time.monotonic() - start
    statuses = [row.status for row in r.rows]
    done = statuses.count("OK")
    assert len(r.rows) == 40 and 1 <= done < 40
    assert statuses == ["OK"] * done + ["NOT_REACHED"] * (40 - done)
    assert r.cost.rows_not_reached == 40 - done and r.cost.budget_exhausted
    assert not r.rows[-1].attributions and "not reached" in " ".join(r.notes)
    for row in r.rows[:done]:
        assert row.predictions[0] - row.base_values[0] == pytest.approx(sum(row.attributions),
                                                                        abs=1e-6)
    assert wall < 0.150 * 1.5


def test_a_cancelled_client_stops_server_work(slow_app: Sidelight,  # noqa: F811
                                              stub: pb_grpc.ExplainerStub) -> None:
    """A 20 s explanation cancelled by its client after 0.3 s: the server stops at the next
    yield point, so the next call gets a core at once."""
    X = np.random.default_rng(6).normal(size=(1, D)).astype(np.float32)
    future = stub.Explain.future(pb.ExplainRequest(model="slow", inputs=[from_array("x", X)],
                                                   method="permutation", budget_ms=20_000))
    time.sleep(0.3)
    future.cancel()
    plane = slow_app.data_plane()
    deadline = time.monotonic() + 2
    while (plane.cores.waiting or plane._in_flight) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert plane._in_flight == 0
    r = stub.Explain(pb.ExplainRequest(model="slow", inputs=[from_array("x", X)],
                                       method="permutation", budget_ms=100), timeout=2)
    assert r.rows[0].status == "OK"

"""Budgets on a deliberately slow model: answers arrive inside the budget and the deadline, or
the request is refused up front; never a late answer or a DEADLINE_EXCEEDED."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.api.server import Sidelight, start
from service.api.tensors import from_array
from service.plane.dataplane import usable_cores
from service.plane.requests import ExplainQuery
from service.plane.reserve import (
    HORIZON_S,
    MIN_SAMPLES,
    TRANSPORT_S,
    TRANSPORT_SHARE,
    WINDOW,
    Reserve,
    load_reserve_s,
    reserve_s,
)
from service.plane.scheduler import Control
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import settings_for

D, WIDTH = 20, 1024


def slow_mlp() -> onnx.ModelProto:
    """20 -> 1024 -> 1024 -> 1 tanh MLP: about a million multiply-adds per row."""
    rng = np.random.default_rng(0)
    shapes = [(D, WIDTH), (WIDTH, WIDTH), (WIDTH, 1)]
    inits = [numpy_helper.from_array((rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32),
                                     f"W{i}") for i, s in enumerate(shapes)]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"]),
             helper.make_node("Tanh", ["h0"], ["a0"]),
             helper.make_node("MatMul", ["a0", "W1"], ["h1"]),
             helper.make_node("Tanh", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", D])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def slow_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidelight]:
    root = tmp_path_factory.mktemp("slow")
    for name, rows in (("slow", 50), ("slow_big_bg", 2000)):
        (root / name / "1").mkdir(parents=True)
        onnx.save(slow_mlp(), root / name / "1" / "model.onnx")
        np.save(root / name / "bg.npy", np.random.default_rng(1).normal(size=(rows, D)))
        (root / name / "explain.yaml").write_text("background: {path: bg.npy}\n")
    app = start(settings_for(root, metrics_port=-1, drift_reference_rows=0))
    yield app
    app.stop(grace=0)


def explain(app: Sidelight, model: str, timeout: float | None = None,
            **kw: object) -> pb.ExplainResponse:
    x = np.random.default_rng(2).normal(size=(1, D))
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        return pb_grpc.ExplainerStub(ch).Explain(pb.ExplainRequest(  # type: ignore[arg-type]
            model=model, inputs=[from_array("x", x)], **kw), timeout=timeout)


@pytest.mark.parametrize(("method", "budget_ms"), [("permutation", 40.0), ("permutation", 80.0),
                                                   ("auto", 40.0), ("auto", 80.0),
                                                   ("kernel", 700.0)])
def test_small_budgets_are_honoured_on_a_slow_model(slow_app: Sidelight, method: str,
                                                    budget_ms: float) -> None:
    """Kernel's smallest sound fit costs ~400 ms on this model (it refuses less, tested below);
    700 ms leaves room for the measured speed to vary on a loaded machine. The permutation
    sampler's least answer (6 pairs, 228 rows) needs ~16 ms here before the first round is
    measured: 40 ms leaves room for a loaded machine."""
    start = time.monotonic()
    r = explain(slow_app, "slow", method=method, budget_ms=budget_ms, seed=1)  # ~90k rows/s
    wall_ms = 1e3 * (time.monotonic() - start)
    # the precise p99 is a benchmark (docs/benchmarks.md); here a loose bound that still fails
    # if rounds were started without regard to the clock
    assert r.cost.elapsed_ms <= 1.15 * budget_ms, (r.cost.elapsed_ms, budget_ms)
    assert wall_ms <= 1.5 * budget_ms + 20
    assert r.cost.budget_exhausted and not r.cost.converged
    se = np.array(r.rows[0].std_errors)
    assert np.all(np.isfinite(se)) and r.rows[0].samples >= 6
    assert r.rows[0].predictions[0] - r.rows[0].base_values[0] == pytest.approx(
        sum(r.rows[0].attributions), abs=1e-6)


@pytest.mark.parametrize("budget_ms", [25.0, 80.0])
def test_kernel_refuses_budgets_too_small_for_a_sound_fit(slow_app: Sidelight,
                                                          budget_ms: float) -> None:
    """Kernel needs 2 x 20 coalition pairs (100 rows each, ~45 ms here) before its fit and
    jackknife mean anything: below that it says so at once instead of answering with error
    bars it cannot back."""
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        explain(slow_app, "slow", method="kernel", budget_ms=budget_ms, seed=1)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "budget_ms" in err.value.details() and "40 sampled ones" in err.value.details()
    assert "use permutation or auto" in err.value.details()
    assert time.monotonic() - start < 0.05 + budget_ms / 1e3


def test_a_background_too_big_for_the_budget_is_refused_not_late(slow_app: Sidelight) -> None:
    """Kernel against every one of 2000 rows needs 4000 rows per pair: far beyond 5 ms."""
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        explain(slow_app, "slow_big_bg", method="kernel", budget_ms=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "budget_ms" in err.value.details()
    assert time.monotonic() - start < 0.5


def test_the_deadline_alone_sets_the_budget_and_is_met(slow_app: Sidelight) -> None:
    for timeout in (0.15, 0.4):
        r = explain(slow_app, "slow", timeout=timeout)
        assert r.cost.budget_source == "deadline" and r.cost.budget_ms < 1e3 * timeout
        assert r.cost.elapsed_ms < 1e3 * timeout


def test_target_error_stops_early_and_reports_converged(slow_app: Sidelight) -> None:
    loose = explain(slow_app, "slow", method="permutation", budget_ms=3000, target_error=0.05)
    assert loose.cost.converged and not loose.cost.budget_exhausted
    assert max(loose.rows[0].std_errors) <= 0.05
    assert loose.cost.elapsed_ms < 3000


def test_reserves_leave_room_for_the_response_and_grow_with_load() -> None:
    """What is kept back from the estimators: a few ms for what follows them (never most of a
    tiny budget), nothing extra until more explanations run than there are cores, then more
    with the load but never more than a bounded share of what is left."""
    assert 0.5 * 0.005 <= reserve_s(0.005, 1) < 0.005
    assert reserve_s(0.2, 1) < reserve_s(0.2, 256) <= 0.6 * 0.2
    assert load_reserve_s(0.1, 2, cores=2.0) == 0.0
    light, heavy = load_reserve_s(0.1, 4, cores=2.0), load_reserve_s(0.1, 8, cores=2.0)
    assert 0 < light < heavy <= 0.5 * 0.1
    assert load_reserve_s(0.01, 1000, cores=2.0) <= 0.5 * 0.01


def test_the_reserve_is_measured_once_a_load_level_has_samples() -> None:
    """The prior until MIN_SAMPLES calls at a level and budget band; then the measured
    overshoot and post time plus the transport allowance, never below the one-call prior;
    levels and bands apart (a tiny budget's overshoot does not widen a large one's reserve);
    a bounded window, so a load that has passed is forgotten."""
    r = Reserve(cores=2.0)
    assert r.level(0) == 0 and r.level(2) == 1 and r.level(3) == 2 and r.level(10**6) == 8
    assert r.seconds(0.1, 1, in_flight=1) == pytest.approx(reserve_s(0.1, 1))
    for _ in range(MIN_SAMPLES):
        r.observe(1, 0.2, overshoot_s=0.02, post_s=0.004)
        r.observe(1, 0.005, overshoot_s=0.05, post_s=0.0)  # a tiny budget, far over
    measured = TRANSPORT_S + TRANSPORT_SHARE * 0.2 + 0.0002 + 0.02 + 0.004
    assert r.seconds(0.2, 1, in_flight=2) == pytest.approx(measured)
    assert r.seconds(0.2, 1, in_flight=4) > reserve_s(0.2, 1)  # level 2: still the prior
    assert r.seconds(0.05, 1, in_flight=2) < 0.02  # another band: still the prior
    for _ in range(WINDOW):
        r.observe(1, 0.2, overshoot_s=-0.002, post_s=0.001)  # finished early: no overshoot
    assert r.seconds(0.2, 1, in_flight=2) == pytest.approx(reserve_s(0.2, 1))  # the floor
    assert r.samples(1, 0.2) == WINDOW


def test_the_reserve_forgets_tails_past_its_horizon() -> None:
    """A refused call measures nothing, so a cell closed by a burst of overruns reopens (to
    the prior) once the burst is older than HORIZON_S."""
    now = [100.0]
    r = Reserve(cores=2.0, clock=lambda: now[0])
    for _ in range(MIN_SAMPLES):
        r.observe(1, 0.02, overshoot_s=0.0, post_s=0.05)
    assert r.seconds(0.02, 1, in_flight=2) > 0.05
    now[0] += HORIZON_S + 1
    assert r.samples(1, 0.02) == 0
    assert r.seconds(0.02, 1, in_flight=2) == pytest.approx(reserve_s(0.02, 1))


def test_a_measured_tail_too_long_for_the_budget_sheds_on_arrival(slow_app: Sidelight) -> None:
    """Every computed call feeds the reserve; once the calls at a load level are measured to
    need 60 ms after their estimators, a 50 ms budget cannot be met and is refused at once,
    while a 99 ms budget (the same band) is answered in the 35 ms left."""
    plane = slow_app.data_plane()
    before = plane.reserve.samples(1, 0.05)
    explain(slow_app, "slow", method="permutation", budget_ms=50, seed=4)
    assert plane.reserve.samples(1, 0.05) == before + 1
    plane.reserve = Reserve(plane.reserve.cores)
    try:
        for _ in range(MIN_SAMPLES):
            plane.reserve.observe(1, 0.05, overshoot_s=0.0, post_s=0.06)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            explain(slow_app, "slow", method="permutation", budget_ms=50, seed=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "budget_ms" in err.value.details()
        assert time.monotonic() - start < 0.04
        ok = explain(slow_app, "slow", method="permutation", budget_ms=99, seed=3)
        assert ok.cost.elapsed_ms <= 99 - 60
    finally:
        plane.reserve = Reserve(plane.reserve.cores)


def test_usable_cores_follow_a_cgroup_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == affinity  # no cgroup file: affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: at least one
    assert usable_cores(tmp_path) == 1.0
    (tmp_path / "cpu.max").write_text(f"{100000 * (affinity + 4)} 100000\n")
    assert usable_cores(tmp_path) == affinity


def test_a_budget_counts_from_the_calls_arrival(app: Sidelight) -> None:
    """The servicer builds the call's control before decoding the request; the plane's clock
    starts there, so time spent before the plane (here a 60 ms wait) comes out of the budget:
    the answer still arrives within 150 ms of arrival, and says it took the wait too."""
    digits = np.load(Path(__file__).parents[1] / "examples" / "models" / "digits_cnn" /
                     "background.npy").astype(np.float32)
    query = ExplainQuery(model="digits_cnn", inputs=(("image", digits[:1]),),
                         method="permutation", budget_ms=150.0, seed=1)
    control = Control(np.inf)
    time.sleep(0.06)
    result = app.data_plane().explain(query, control)
    waited = 1e3 * (time.monotonic() - control.arrived)
    assert 60.0 <= result.elapsed_ms <= 150.0, result.elapsed_ms
    assert waited <= 150.0 + 25.0, waited  # not 60 + 150: the wait came out of the budget

"""`exact` is admitted only when its learned cost fits (issue 17): the time its answers take per
second of model time is measured on every call and kept per model; exact's own check, auto's
choice and admission at arrival all use it."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from explainers.base import SAFETY, Background, Budget, Evaluator
from explainers.errors import ResourceExhausted
from explainers.shapley.auto import AutoShapley
from explainers.shapley.exact import WALL_PRIOR, ExactShapley
from explainers.shapley.permutation import PermutationShapley
from service.api.server import Sidelight
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.test_scheduling import exact_app  # noqa: F401  (the 8-feature slow model)

D, ROWS = 6, 10
NEEDED = (2**D - 2) * ROWS + 1  # model rows of an exact answer


def _setup(factor: float | None) -> tuple[Evaluator, Background, np.ndarray]:
    rng = np.random.default_rng(0)
    W = rng.normal(size=D)

    def f(X: np.ndarray) -> np.ndarray:
        return np.tanh(X @ W)[:, None]

    bg = rng.normal(size=(ROWS, D))
    factors = {} if factor is None else {"exact": factor}
    # a declared speed of 1e5 rows/s: the model part of exact is NEEDED / 1e5 s, ~6 ms
    return Evaluator(f, 4096, 1e5, wall_factors=factors), Background.build(bg, f(bg)), \
        rng.normal(size=D)


def _budget(model_s: float, multiple: float) -> Budget:
    """A budget whose usable share is `multiple` times the model part of exact."""
    return Budget.of_seconds(multiple * model_s / SAFETY)


def test_exact_refuses_when_its_learned_cost_does_not_fit() -> None:
    ev, bg, x = _setup(3.0)
    model_s = ev.seconds_for(NEEDED)
    with pytest.raises(ResourceExhausted, match="exact needs"):
        ExactShapley().explain(ev, x, bg, _budget(model_s, 2.0), np.random.default_rng(0))
    assert ev.evaluations == 0  # refused before any model call
    ev, bg, x = _setup(1.0)  # the same budget with a measured factor of 1 fits
    e = ExactShapley().explain(ev, x, bg, _budget(model_s, 2.0), np.random.default_rng(0))
    assert e.method == "exact" and e.evaluations == NEEDED


def test_before_any_measure_exact_counts_its_prior() -> None:
    ev, bg, x = _setup(None)
    model_s = ev.seconds_for(NEEDED)
    with pytest.raises(ResourceExhausted):
        ExactShapley().explain(ev, x, bg, _budget(model_s, 0.9 * WALL_PRIOR),
                               np.random.default_rng(0))


def test_auto_samples_when_exacts_learned_cost_exceeds_its_share() -> None:
    auto = AutoShapley(ExactShapley(), PermutationShapley())
    for factor, chosen in ((1.0, "exact"), (3.0, "permutation")):
        ev, bg, _ = _setup(factor)
        budget = _budget(ev.seconds_for(NEEDED), 4.0 * SAFETY)  # exact may use half: 2x model
        assert auto.choose(ev, D, bg, budget).name == chosen


def _exact(app: Sidelight, budget_ms: float) -> pb.ExplainResponse:
    X = np.random.default_rng(2).normal(size=(1, 8)).astype(np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        return pb_grpc.ExplainerStub(channel).Explain(pb.ExplainRequest(
            model="slow8", inputs=[from_array("x", X)], method="exact", budget_ms=budget_ms),
            timeout=10)


def test_the_service_learns_exacts_cost_and_refuses_what_it_no_longer_fits(
        exact_app: Sidelight) -> None:  # noqa: F811
    app = exact_app
    onnx_model = app.data_plane().repo.get("slow8").onnx
    r = _exact(app, 3000)
    assert r.rows[0].method == "exact"
    learned = onnx_model.wall_factors["exact"]
    assert 0.5 < learned < 20  # measured: wall time over model time of that answer
    model_ms = 1e3 * ((2**8 - 2) * 30 + 1) / onnx_model.rows_per_second
    budget_ms = 2.5 * model_ms / SAFETY + 10  # fits a factor of ~2, not of 10
    onnx_model.wall_factors["exact"] = 10.0  # as if its answers had become this slow
    with pytest.raises(grpc.RpcError) as err:
        _exact(app, budget_ms)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # a refusal measures nothing: the learned factor steps back toward the prior, so exact
    # is tried (and measured) again after a few refusals instead of never
    assert onnx_model.wall_factors["exact"] == pytest.approx(WALL_PRIOR + 0.8 * (10 - WALL_PRIOR))
    for _ in range(20):
        try:
            answered = _exact(app, budget_ms)
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert answered.rows[0].method == "exact" and onnx_model.wall_factors["exact"] < 10
    onnx_model.wall_factors["exact"] = 1.0
    assert _exact(app, budget_ms).rows[0].method == "exact"

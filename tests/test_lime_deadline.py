"""LIME's fit against the textbook formulas, and its round loop against a deadline on a fake
clock: a model that turns 3x slower after the first round must still answer in time."""

from __future__ import annotations

import types

import numpy as np
import pytest

from explainers import anytime, base
from explainers.base import Array, Background, Budget, Evaluator, Explanation
from explainers.perturbation import lime
from explainers.perturbation.lime import RIDGE, Lime, Samples, kernel_weights, ridge_fit


def textbook_fit(z: Array, y: Array) -> tuple[Array, Array, Array, Array]:
    """Intercept, coefficients, sandwich standard errors and weighted R^2, straight from the
    definitions: one (1 + d)^2 meat matrix per output, diag(A^-1 meat A^-1)."""
    n, d = z.shape
    w = kernel_weights(z)
    Z = np.concatenate([np.ones((n, 1)), z], axis=1)
    W = np.diag(w)
    A = Z.T @ W @ Z + RIDGE * np.diag([0.0, *np.ones(d)])
    beta = np.linalg.solve(A, Z.T @ W @ y)  # (1 + d, outputs)
    r = y - Z @ beta
    Ainv = np.linalg.inv(A)
    se = []
    for o in range(y.shape[1]):
        meat = Z.T @ W @ np.diag(r[:, o] ** 2) @ W @ Z
        se.append(np.sqrt(np.diag(Ainv @ meat @ Ainv) * n / (n - d - 1)))
    mean = w @ y / w.sum()
    r2 = 1 - (w @ r**2) / (w @ (y - mean) ** 2)
    return beta[0], beta[1:].T, np.array(se)[:, 1:], r2


def test_the_fit_equals_the_textbook_sandwich_for_every_output() -> None:
    rng = np.random.default_rng(0)
    z = rng.random((300, 6)) < 0.5
    y = np.stack([np.tanh(z @ rng.normal(size=6)) + 0.1 * rng.normal(size=300)
                  for _ in range(3)], axis=1)  # (300, 3) nonlinear in z: residuals matter
    got = ridge_fit(z, y)
    intercept, coef, se, r2 = textbook_fit(z, y)
    np.testing.assert_allclose(got.intercept, intercept, rtol=1e-10)
    np.testing.assert_allclose(got.coef, coef, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.se, se, rtol=1e-9)
    np.testing.assert_allclose(got.r2, r2, rtol=1e-10)
    assert got.n == 300


def test_samples_folded_in_rounds_fit_as_one_batch() -> None:
    """The sums kept round by round and the block-wise pass give the batch fit."""
    rng = np.random.default_rng(1)
    z = rng.random((5000, 5)) < 0.5  # > PASS_ROWS in one block, and uneven rounds
    y = (z @ np.arange(5.0) + rng.normal(size=5000))[:, None]
    samples = Samples()
    for start, stop in ((0, 7), (7, 300), (300, 5000)):
        samples.add(z[start:stop], y[start:stop])
    _, coef, se, r2 = textbook_fit(z, y)
    got = samples.fit()
    np.testing.assert_allclose(got.coef, coef, rtol=1e-9)
    np.testing.assert_allclose(got.se, se, rtol=1e-9)
    np.testing.assert_allclose(got.r2, r2, rtol=1e-10)


class FakeClock:
    """Wall and CPU clocks (the deadline is on the wall clock) that only the model moves: each
    row costs `cost` CPU seconds, `slow` times that from the `slow_from`-th call on, and every
    `every`-th call first waits `wait` wall seconds for a core (a preemption: no CPU time)."""

    def __init__(self, cost: float, slow: float = 1.0, slow_from: int = 1, wait: float = 0.0,
                 every: int = 1) -> None:
        self.wall = self.cpu = 1000.0
        self.calls = 0
        self.cost, self.slow, self.slow_from = cost, slow, slow_from
        self.wait, self.every = wait, every

    def now(self) -> float:
        return self.wall

    def thread_time(self) -> float:
        return self.cpu

    def model(self, X: Array) -> Array:
        self.calls += 1
        if self.calls % self.every == 0:
            self.wall += self.wait
        spent = X.shape[0] * self.cost * (self.slow if self.calls >= self.slow_from else 1.0)
        self.wall += spent
        self.cpu += spent
        return np.stack([X.sum(axis=1) + np.sin(X[:, 0])], axis=1)


def explain_on(clock: FakeClock, monkeypatch: pytest.MonkeyPatch, budget_s: float,
               rows_per_second: float) -> tuple[Budget, Explanation]:
    """LIME on 8 features with every clock it reads (and the old loop's) replaced by `clock`."""
    fake = types.SimpleNamespace(perf_counter=clock.now, thread_time=clock.thread_time,
                                 monotonic=clock.now)
    for module in (base, anytime, lime):
        monkeypatch.setattr(module, "time", fake, raising=False)
    x = np.linspace(0.1, 0.8, 8)
    ev = Evaluator(clock.model, 4096, rows_per_second=rows_per_second, call_overhead_s=0.0)
    bg = Background.build(np.zeros((1, 8)), clock.model(np.zeros((1, 8))))
    clock.calls = 0
    budget = Budget(clock.wall + budget_s)
    return budget, Lime().explain(ev, x, bg, budget, np.random.default_rng(0))


@pytest.mark.parametrize("slow_from", range(3, 9))
@pytest.mark.parametrize("budget_s", [0.03, 0.1, 0.4])
def test_a_model_turning_three_times_slower_still_ends_in_time(
        monkeypatch: pytest.MonkeyPatch, budget_s: float, slow_from: int) -> None:
    """Call 1 is f(x), call 2 the first round; from call `slow_from` on every row costs 3x
    what the evaluator measured. The old loop planned a round at the last round's speed with
    the whole safe time left and ended up to 1.87x the budget late here; a round now takes
    at most ROUND_SHARE of it, which absorbs a slowdown up to 1 / (SAFETY * ROUND_SHARE)."""
    clock = FakeClock(cost=1e-3, slow=3.0, slow_from=slow_from)
    budget, got = explain_on(clock, monkeypatch, budget_s, 1e3)
    assert clock.wall <= budget.deadline, f"{(clock.wall - budget.deadline) / budget_s:.2f} late"
    assert got.samples >= 10 and got.budget_exhausted and np.all(np.isfinite(got.std_errors))


@pytest.mark.parametrize("every", [2, 3, 4, 5])
@pytest.mark.parametrize("budget_s", [0.03, 0.1, 0.4])
def test_waits_for_a_core_between_rounds_are_kept_free_at_the_end(
        monkeypatch: pytest.MonkeyPatch, budget_s: float, every: int) -> None:
    """Every few model calls the thread waits 10 ms for a core (a loaded machine). The old
    loop, planning on wall time per sample only, ended up to 1.32x late here; the longest
    wait seen is now kept free, and work is planned on CPU time over the share of the core."""
    clock = FakeClock(cost=1e-4, wait=0.01, every=every)
    budget, got = explain_on(clock, monkeypatch, budget_s, 1e4)
    assert clock.wall <= budget.deadline, f"{(clock.wall - budget.deadline) / budget_s:.2f} late"
    assert got.samples >= 10 and np.all(np.isfinite(got.std_errors))

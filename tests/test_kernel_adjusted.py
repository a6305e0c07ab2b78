"""Regression-adjusted KernelSHAP (explainers/shapley/kernel.py, surrogate.py) on games against
one reference row, where it is `auto`'s sampler: the surrogate's Shapley values against brute
force, the adjusted fit's accuracy and calibration against exact enumeration, and its choice.

The game: a 12-feature tanh MLP with a product of three features (interactions of every order,
so paired sampling is not exact) against a single baseline row. A calibrated estimator covers
95% of 12 x 40 = 480 (feature, seed) pairs within about +-2 points (binomial, plus the
correlation between features of one run); the band [0.92, 0.98] excludes standard errors off by
30% (which cover ~82% or ~99.5%).
"""

from __future__ import annotations

import numpy as np
import pytest

from explainers import Background, Budget, Evaluator, build_registry
from explainers.base import Array
from explainers.shapley import kernel
from explainers.shapley.exact import all_coalitions, shapley_from_values
from explainers.shapley.kernel import KernelShap, KernelSums
from explainers.shapley.surrogate import fit_trees

D, HIDDEN = 12, 24
RNG = np.random.default_rng(7)
W1, B1, W2 = RNG.normal(size=(D, HIDDEN)), 0.3 * RNG.normal(size=HIDDEN), RNG.normal(size=HIDDEN)


def f(X: Array) -> Array:
    return (np.tanh(X @ W1 + B1) @ W2 / 4 + X[:, 0] * X[:, 1] * X[:, 2])[:, None]


X0, Z0 = RNG.normal(size=D), RNG.normal(size=(1, D))
BG = Background.build(Z0, f(Z0))


def exact() -> Array:
    masks = all_coalitions(D)  # (2^D, D)
    return shapley_from_values(f(np.where(masks, X0, Z0)))[0]


def test_surrogate_shapley_values_equal_brute_force() -> None:
    """The trees' closed-form Shapley values equal enumeration over the trees' predictions."""
    rng = np.random.default_rng(0)
    d = 7
    masks = all_coalitions(d)
    y = np.tanh(masks @ rng.normal(size=d)) * (masks[:, 0] & masks[:, 3]) \
        + masks[:, 1] * (1 - masks[:, 2]) * masks[:, 5]
    trees = fit_trees(masks, y, np.ones(len(masks)), rng)
    g = trees.predict(masks)
    assert np.allclose(shapley_from_values(g[:, None])[0], trees.shapley(d), atol=1e-12)
    assert np.std(y - g) < 0.5 * np.std(y)  # the fit explains most of the game


@pytest.fixture
def slow_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the model were slow enough for the trees' fit to pay (ADJUST_COST_SHARE)."""
    monkeypatch.setattr(kernel, "ADJUST_COST_SHARE", np.inf)


def test_adjustment_lowers_the_error_at_equal_evaluations(slow_model: None) -> None:
    """Against the plain constrained fit on the same samples: the adjusted answer is closer to
    the exact values (RMS over seeds)."""
    truth = exact()
    plain, adjusted = [], []
    for seed in range(8):
        sums: list[KernelSums] = []
        e = _explain(600, seed, sums)
        adjusted.append(np.sum((e.values[0] - truth) ** 2))
        plain.append(np.sum((sums[0].estimate()[0][0] - truth) ** 2))
    assert np.mean(adjusted) < 0.6 * np.mean(plain), (np.mean(adjusted), np.mean(plain))


def test_adjusted_intervals_cover_the_exact_values(slow_model: None) -> None:
    truth = exact()
    inside = []
    for seed in range(40):
        e = _explain(800, seed)
        lo, hi = e.interval(0.95)
        inside.append((lo[0] <= truth) & (truth <= hi[0]))
    share = float(np.mean(inside))
    assert 0.92 <= share <= 0.98, share


def test_a_fast_model_is_not_adjusted() -> None:
    """At 1M rows/s, 800 evaluations take ~1 ms: fitting trees would cost more than the
    evaluations it saves, so the answer is the plain fit's."""
    sums: list[KernelSums] = []
    e = _explain(800, 0, sums)
    assert np.array_equal(e.values, sums[0].estimate()[0])


def test_auto_uses_the_kernel_fit_against_one_reference_row_from_13_players() -> None:
    """Against one reference row: permutations for 12 players (a sentence), the kernel fit
    for 20 (image patches); both additive."""
    auto = build_registry()["auto"]
    e = auto.explain(Evaluator(f, 4096, 1e6), X0, BG, Budget(np.inf, 2000),
                     np.random.default_rng(0))
    assert e.method == "permutation"
    assert np.isclose(e.values.sum(), f(X0[None])[0, 0] - BG.base_values[0])
    w = RNG.normal(size=20)

    def g(X: Array) -> Array:
        return np.tanh(X @ w)[:, None]
    x, z = RNG.normal(size=20), RNG.normal(size=(1, 20))
    bg = Background.build(z, g(z))
    e = auto.explain(Evaluator(g, 4096, 1e6), x, bg, Budget(np.inf, 2000),
                     np.random.default_rng(0))
    assert e.method == "kernel"
    assert np.isclose(e.values.sum(), g(x[None])[0, 0] - bg.base_values[0])


def _explain(evaluations: int, seed: int, keep: list[KernelSums] | None = None,  # type: ignore[no-untyped-def]
             rows_per_second: float = 1e6):
    """KernelShap at an evaluation cap; `keep` receives its sums (the plain fit's inputs)."""
    est = KernelShap()
    if keep is not None:
        original = KernelSums.__init__

        def spy(self: KernelSums, *args: object) -> None:
            original(self, *args)  # type: ignore[arg-type]
            keep.append(self)
        KernelSums.__init__ = spy  # type: ignore[method-assign]
        try:
            return est.explain(Evaluator(f, 4096, rows_per_second), X0, BG,
                               Budget(np.inf, evaluations),
                               np.random.default_rng(seed))
        finally:
            KernelSums.__init__ = original  # type: ignore[method-assign]
    return est.explain(Evaluator(f, 4096, rows_per_second), X0, BG, Budget(np.inf, evaluations),
                       np.random.default_rng(seed))


def test_trees_fit_a_subsample_of_a_large_sample() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((5000, 6)) < 0.5
    y = (masks[:, 0] & masks[:, 1]).astype(np.float64)
    trees = fit_trees(masks, y, np.ones(5000), rng)
    assert np.abs(trees.predict(masks) - y).max() < 0.05

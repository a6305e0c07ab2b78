"""Estimator correctness against analytic answers, brute-force Shapley values and shap."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from explainers import Background, Budget, Evaluator, build_registry
from explainers.base import Array, ModelFn
from explainers.errors import InvalidArgument, ResourceExhausted
from explainers.masking import path_rows
from explainers.shapley.exact import all_coalitions
from explainers.shapley.kernel import KernelShap
from explainers.shapley.permutation import DOUBLE_EVERY, RowSweeps

REGISTRY = build_registry()


def brute_force(f: ModelFn, x: Array, bg: Array) -> Array:
    """Interventional Shapley values by the textbook formula, one coalition at a time."""
    d = x.size

    def v(S: tuple[int, ...]) -> Array:
        mask = np.zeros(d, bool)
        mask[list(S)] = True
        return f(np.where(mask, x, bg)).mean(axis=0)  # type: ignore[no-any-return]

    phi = np.zeros((f(x[None]).shape[1], d))
    for i in range(d):
        others = [j for j in range(d) if j != i]
        for s in range(d):
            w = math.factorial(s) * math.factorial(d - s - 1) / math.factorial(d)
            for S in combinations(others, s):
                phi[:, i] += w * (v((*S, i)) - v(S))
    return phi


def nonlinear(X: Array) -> Array:
    """Two outputs with interactions of order two and three."""
    a = np.tanh(X[:, 0] - 0.5 * X[:, 3]) + X[:, 0] * X[:, 1]
    b = np.sin(X[:, 2]) * X[:, 4] * X[:, 1] + X[:, 5] ** 2
    return np.stack([a, b], axis=1)


def setup(f: ModelFn = nonlinear, d: int = 6, rows: int = 25,
          seed: int = 0) -> tuple[Array, Background]:
    rng = np.random.default_rng(seed)
    bg = rng.normal(size=(rows, d))
    return rng.normal(size=d), Background.build(bg, f(bg))


def run(method: str, x: Array, bg: Background, f: ModelFn = nonlinear, evals: int | None = None,
        seconds: float = 10.0, seed: int = 1, target_error: float | None = None):  # type: ignore[no-untyped-def]
    budget = Budget.of_seconds(seconds, max_evaluations=evals, target_error=target_error)
    return REGISTRY[method].explain(Evaluator(f, 4096, 1e6), x, bg, budget,
                                    np.random.default_rng(seed))


def test_exact_matches_analytic_product_game() -> None:
    """f = x0 * x1: the two Shapley values have a closed form against any background."""
    x, bg = np.array([1.5, -2.0]), np.random.default_rng(3).normal(size=(40, 2))

    def f(X: Array) -> Array:
        return (X[:, 0] * X[:, 1])[:, None]

    m0, m1, m01 = bg[:, 0].mean(), bg[:, 1].mean(), (bg[:, 0] * bg[:, 1]).mean()
    phi0 = 0.5 * (x[0] * m1 - m01) + 0.5 * (x[0] * x[1] - m0 * x[1])
    phi1 = 0.5 * (m0 * x[1] - m01) + 0.5 * (x[0] * x[1] - x[0] * m1)
    e = run("exact", x, Background.build(bg, f(bg)), f)
    np.testing.assert_allclose(e.values[0], [phi0, phi1], rtol=1e-12, atol=1e-12)


def test_exact_equals_brute_force_with_several_outputs() -> None:
    x, bg = setup()
    e = run("exact", x, bg)
    np.testing.assert_allclose(e.values, brute_force(nonlinear, x, bg.data), atol=1e-12)
    assert np.all(e.std_errors == 0) and e.converged and not e.budget_exhausted


def test_exact_respects_background_weights() -> None:
    """A weighted background equals the same rows repeated by their weights."""
    x, bg = setup(rows=6)
    weights = np.array([1, 2, 3, 1, 1, 2], float)
    weighted = Background.build(bg.data, bg.predictions, weights)
    repeated_rows = np.repeat(bg.data, weights.astype(int), axis=0)
    repeated = Background.build(repeated_rows, nonlinear(repeated_rows))
    np.testing.assert_allclose(run("exact", x, weighted).values,
                               run("exact", x, repeated).values, atol=1e-12)


@pytest.mark.parametrize("method", ["exact", "permutation", "kernel"])
def test_linear_model_is_w_times_deviation_from_mean(method: str) -> None:
    """Exact and kernel (every background row per coalition) are exact on a linear model; the
    permutation sampler draws one background row per pair, so it is unbiased with an error its
    standard errors account for."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=8)

    def f(X: Array) -> Array:
        return (X @ w + 3.0)[:, None]

    bg = rng.normal(size=(30, 8))
    x = rng.normal(size=8)
    e = run(method, x, Background.build(bg, f(bg)), f, evals=200_000)
    expected = w * (x - bg.mean(axis=0))
    if method == "permutation":
        assert np.all(np.abs(e.values[0] - expected) <= 4 * e.std_errors[0])
        np.testing.assert_allclose(e.values[0], expected, atol=0.02 * np.abs(expected).max())
    else:
        np.testing.assert_allclose(e.values[0], expected, atol=1e-9)


@pytest.mark.parametrize("method", ["exact", "permutation", "kernel"])
def test_additivity(method: str) -> None:
    """sum(phi) = f(x) - E[f(background)] exactly, whenever the sampler stops."""
    x, bg = setup()
    for evals in (5_000, 50_000):
        e = run(method, x, bg, evals=evals)
        np.testing.assert_allclose(e.additivity_gap, 0.0, atol=1e-10)
        np.testing.assert_allclose(e.base_values, bg.predictions.mean(axis=0), atol=1e-12)
        np.testing.assert_allclose(e.prediction, nonlinear(x[None])[0], atol=1e-12)


@pytest.mark.parametrize("method", ["permutation", "kernel"])
def test_samplers_converge_to_exact(method: str) -> None:
    """Error shrinks as evaluations grow and ends within a tight tolerance."""
    x, bg = setup()
    exact = brute_force(nonlinear, x, bg.data)
    errors = [np.abs(run(method, x, bg, evals=n).values - exact).max()
              for n in (2_000, 20_000, 400_000)]
    assert errors[2] < errors[0] / 4
    assert errors[2] < 0.01 * np.abs(exact).max()


def test_kernel_standard_errors_cover_the_exact_values() -> None:
    """Over 20 seeds x 12 attributions, |error| <= 1.96 SE about 95% of the time. With n = 240
    the 95% binomial range of a calibrated estimator is [0.90, 0.98]; we accept [0.85, 0.995].
    (The permutation sampler's calibration is tests/test_calibration.py.)"""
    x, bg = setup()
    exact = brute_force(nonlinear, x, bg.data)
    inside = [np.abs(e.values - exact) <= 1.96 * e.std_errors
              for e in (run("kernel", x, bg, evals=40_000, seed=s) for s in range(20))]
    share = float(np.mean(inside))
    assert 0.85 <= share <= 0.995, share


def test_permutation_is_exact_for_pairwise_interactions_once_every_row_is_visited() -> None:
    """An antithetic pair against one background row is exactly phi(x; z) when the model has
    no interactions above order two, so after a sweep over all rows the stratified estimate is
    the exact value and its standard error is 0; before, it is a sample of rows with errors
    that the standard errors cover."""

    def pairwise(X: Array) -> Array:
        return (np.tanh(X[:, 0] - 0.5 * X[:, 3]) + X[:, 0] * X[:, 1] + X[:, 2] ** 2)[:, None]

    x, bg = setup(pairwise, rows=25)
    exact = brute_force(pairwise, x, bg.data)
    swept = run("permutation", x, bg, pairwise, evals=5_000)  # 5000 / 10 rows = 500 pairs
    np.testing.assert_allclose(swept.values, exact, atol=1e-12)
    assert np.all(swept.std_errors < 1e-9)
    partial = run("permutation", x, bg, pairwise, evals=200)  # 20 pairs on 14 of 25 rows
    assert np.abs(partial.values - exact).max() > 1e-6
    low, high = partial.interval(0.99)
    assert np.all((low - 1e-12 <= exact) & (exact <= high + 1e-12))


@pytest.mark.parametrize("method", ["permutation", "kernel"])
def test_same_seed_same_answer(method: str) -> None:
    x, bg = setup()
    a, b = run(method, x, bg, evals=20_000, seed=7), run(method, x, bg, evals=20_000, seed=7)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.std_errors, b.std_errors)
    c = run(method, x, bg, evals=20_000, seed=8)
    assert not np.array_equal(a.values, c.values)


@pytest.mark.parametrize("method", ["permutation", "kernel"])
def test_target_error_stops_early_and_says_converged(method: str) -> None:
    x, bg = setup()
    e = run(method, x, bg, seconds=30.0, target_error=0.02)
    assert e.converged and not e.budget_exhausted
    assert e.std_errors.max() <= 0.02
    full = run(method, x, bg, evals=2_000_000)
    assert e.evaluations < full.evaluations


def test_no_feature_is_dropped_with_many_features() -> None:
    """100 features, all with non-zero effect: every attribution is reported and non-zero."""
    rng = np.random.default_rng(11)
    w = rng.uniform(0.5, 1.5, size=100)

    def f(X: Array) -> Array:
        return np.tanh(X @ w / 10)[:, None]

    bg = rng.normal(size=(20, 100))
    x = rng.normal(size=100) + 2
    for method in ("permutation", "kernel"):
        e = run(method, x, Background.build(bg, f(bg)), f, seconds=2.0, evals=300_000)
        assert e.values.shape == (1, 100) and np.all(e.values != 0)
        assert np.all(np.isfinite(e.std_errors))


def test_auto_picks_exact_when_it_fits_and_permutation_otherwise() -> None:
    x, bg = setup()
    assert run("auto", x, bg).method == "exact"
    wide = np.random.default_rng(0).normal(size=(10, 20))

    def f(X: Array) -> Array:
        return X.sum(axis=1, keepdims=True)

    e = run("auto", wide[0], Background.build(wide, f(wide)), f, seconds=0.2)
    assert e.method == "permutation"


def test_exact_refuses_too_many_features_and_too_small_budgets() -> None:
    wide = np.zeros((3, 20))
    with pytest.raises(InvalidArgument, match="method"):
        run("exact", wide[0], Background.build(wide, wide[:, :1]), lambda X: X[:, :1])
    x, bg = setup()
    with pytest.raises(ResourceExhausted, match="budget_ms"):
        run("exact", x, bg, evals=100)


def test_single_feature_is_exact_for_every_method() -> None:
    bg = np.arange(5.0)[:, None]

    def f(X: Array) -> Array:
        return X**2

    for method in ("exact", "permutation", "kernel", "auto"):
        e = run(method, np.array([3.0]), Background.build(bg, f(bg)), f, evals=1000)
        np.testing.assert_allclose(e.values, [[9.0 - (bg**2).mean()]])


@pytest.mark.parametrize("method", ["permutation", "kernel"])
def test_weighted_backgrounds_converge_to_exact_and_stay_additive(method: str) -> None:
    """Weights enter as population weights: a weighted background gives the values of the
    rows repeated by their weights, whether the sampler stopped early or not."""
    x, bg = setup(rows=8)
    weights = np.array([1, 5, 1, 1, 3, 1, 1, 2], float)
    weighted = Background.build(bg.data, bg.predictions, weights)
    exact = run("exact", x, weighted).values
    for evals in (300, 1_000_000):
        e = run(method, x, weighted, evals=evals)
        np.testing.assert_allclose(e.additivity_gap, 0.0, atol=1e-10)
    assert np.abs(e.values - exact).max() < 0.01 * np.abs(exact).max()
    assert np.all(np.abs(e.values - exact) <= 4 * e.std_errors + 1e-9)


def test_row_sweeps_visit_every_row_before_any_twice() -> None:
    """The first sweep gives every row one pair (every DOUBLE_EVERY-th row two, back to back);
    then the rows it visited once get their second pair, so every row has two; each later
    sweep is a fresh order of all rows."""
    sweeps = RowSweeps(10, np.random.default_rng(0))
    first = sweeps.take(10 + 10 // DOUBLE_EVERY)
    rows, counts = np.unique(first, return_counts=True)
    assert rows.tolist() == list(range(10)) and counts.sum() == first.size
    assert sorted(counts.tolist()) == [1] * (10 - 10 // DOUBLE_EVERY) + [2] * (10 // DOUBLE_EVERY)
    seconds = sweeps.take(10 - 10 // DOUBLE_EVERY)
    assert sorted(seconds.tolist()) == rows[counts == 1].tolist()
    later = sweeps.take(25)
    for k in (0, 10):
        assert sorted(later[k:k + 10].tolist()) == list(range(10))


def test_a_partial_sweep_is_noted_and_a_complete_one_is_not() -> None:
    x, bg = setup(rows=25)
    partial = run("permutation", x, bg, evals=100)
    assert partial.notes and "of 25 background rows visited" in partial.notes[0]
    assert run("permutation", x, bg, evals=20_000).notes == ()


def test_path_rows_select_x_or_the_reference_exactly() -> None:
    """Bitwise selection equals np.where, NaN included, in float32 and float64; rows come
    step-major (step, path, elements)."""
    rng = np.random.default_rng(4)
    x, Z = rng.normal(size=6), rng.normal(size=(5, 6))
    Z[1, 2] = np.nan
    ranks = np.argsort(rng.random((5, 6)), axis=1)
    for dtype in (np.float32, np.float64):
        inside = ranks[None, :, :] < np.arange(1, 6)[:, None, None]  # (steps, paths, elements)
        expected = np.where(inside, x.astype(dtype), Z.astype(dtype)[None, :, :])
        np.testing.assert_array_equal(path_rows(x, Z, ranks, dtype), expected)


def test_kernel_enumerates_size_one_pairs_exactly_for_three_features() -> None:
    """With three features the pairs ({i}, all but i) are every coalition: no sampling, exact,
    and a standard error of 0."""

    def f(X: Array) -> Array:
        return (X[:, 0] * X[:, 1] * X[:, 2] + np.sin(X[:, 1]))[:, None]

    x, bg = setup(f, d=3)
    e = KernelShap().explain(Evaluator(f, 4096, 1e6), x, bg, Budget.of_seconds(1.0),
                             np.random.default_rng(0))
    np.testing.assert_allclose(e.values, brute_force(f, x, bg.data), atol=1e-12)
    assert e.converged and np.all(e.std_errors == 0)


def test_kernel_enumerates_size_two_pairs_when_the_budget_affords_them() -> None:
    """7 features against one reference row (zeros, so a row's nonzero pattern is its
    coalition), third-order terms: a cap four times the 42 rows of the size-2 pairs has each
    size-2 coalition evaluated exactly once (enumerated; sampling draws sizes 3 and 4 only), and
    the estimate stays unbiased: the mean over seeds is within 4 of its standard errors of the
    brute-force Shapley values, and each run's reported standard errors are of that size."""
    def f(X: Array) -> Array:
        return (X[:, 0] * X[:, 1] * X[:, 2] + np.tanh(X[:, 3] + X[:, 4]) * X[:, 5]
                + X[:, 6] * X[:, 0] * X[:, 4])[:, None]

    x = np.linspace(0.5, 2.0, 7)
    bg = Background.build(np.zeros((1, 7)), f(np.zeros((1, 7))))
    seen: list[Array] = []

    def counted(X: Array) -> Array:
        seen.append(X != 0)
        return f(X)

    runs = [KernelShap().explain(Evaluator(counted if seed == 0 else f, 4096, 1e6), x, bg,
                                 Budget.of_seconds(10.0, max_evaluations=600),
                                 np.random.default_rng(seed)) for seed in range(40)]
    patterns = np.concatenate(seen)  # (rows, features)
    twos = patterns[patterns.sum(axis=1) == 2]
    assert len(twos) == 21 and len({t.tobytes() for t in twos}) == 21
    values = np.stack([e.values[0] for e in runs])  # (runs, features)
    spread = values.std(axis=0, ddof=1)
    exact = brute_force(f, x, bg.data)[0]
    assert np.all(np.abs(values.mean(axis=0) - exact) <= 4 * spread / np.sqrt(len(runs)) + 1e-12)
    reported = np.mean([e.std_errors[0] for e in runs], axis=0)
    assert np.all((reported > 0.5 * spread) & (reported < 2 * spread))


def test_kernel_refuses_fewer_pairs_than_twice_the_features_before_any_model_call() -> None:
    """6 features, 25 rows: f(x), then 6 enumerated + 12 sampled pairs of 50 rows: 901."""
    x, bg = setup()
    calls: list[int] = []

    def counted(X: Array) -> Array:
        calls.append(X.shape[0])
        return nonlinear(X)

    with pytest.raises(ResourceExhausted, match=r"12 sampled ones.*: 901 model evaluations"):
        run("kernel", x, bg, counted, evals=900)
    assert calls == []
    assert run("kernel", x, bg, evals=902).samples == 12


def test_masks_enumerate_every_coalition_once() -> None:
    masks = all_coalitions(5)
    assert masks.shape == (32, 5) and len({m.tobytes() for m in masks}) == 32


def test_results_are_frozen() -> None:
    x, bg = setup()
    e = run("exact", x, bg)
    with pytest.raises(ValueError):
        e.values[0, 0] = 1.0

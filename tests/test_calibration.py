"""Calibration of the samplers' 95% intervals against exact Shapley values.

A fixed-seed statistical test: 20 rows x 8 features x 4 seeds = 640 (row, feature) pairs of a
small tanh MLP (interactions of every order, so no attribution is trivially exact) against
exact enumeration. A calibrated estimator covers ~95%; the binomial standard deviation at 640
pairs is 0.9 points (more with the correlation between features of one row), so the band
[0.90, 0.985] holds a calibrated estimator. It excludes broken standard errors: the test checks
that the same intervals with SEs halved cover < 0.80 and with SEs doubled > 0.985 (and x0.7 /
x1.4 fall outside too), so an estimator whose SEs are off by 30% or more fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from explainers import Background, Budget, Evaluator, build_registry
from explainers.base import Array, Explanation

REGISTRY = build_registry()
D, HIDDEN, BACKGROUND, ROWS, SEEDS = 8, 16, 40, 20, 4
BAND = (0.90, 0.985)


def _model() -> tuple[object, Background, Array]:
    rng = np.random.default_rng(0)
    W1, b1, w2 = rng.normal(size=(D, HIDDEN)), 0.5 * rng.normal(size=HIDDEN), rng.normal(
        size=HIDDEN)

    def f(X: Array) -> Array:
        return (np.tanh(X @ W1 + b1) @ w2 + 0.5 * X[:, 0] * X[:, 1] * X[:, 2])[:, None]

    bg = rng.normal(size=(BACKGROUND, D))
    return f, Background.build(bg, f(bg)), rng.normal(size=(ROWS, D))


F, BG, X = _model()


def _explain(method: str, x: Array, evaluations: int, seed: int) -> Explanation:
    return REGISTRY[method].explain(Evaluator(F, 4096, 1e6), x, BG,  # type: ignore[arg-type]
                                    Budget(np.inf, evaluations), np.random.default_rng(seed))


@pytest.fixture(scope="module")
def exact() -> Array:
    return np.stack([_explain("exact", x, 10**7, 0).values[0] for x in X])  # (rows, features)


def _coverage(method: str, evaluations: int, exact: Array,
              scale: float = 1.0) -> tuple[float, int]:
    inside = []
    for seed in range(SEEDS):
        for r, x in enumerate(X):
            e = _explain(method, x, evaluations, 1000 * seed + r)
            lo, hi = e.interval(0.95)
            half = scale * (hi - lo)[0] / 2
            inside.append(np.abs(e.values[0] - exact[r]) <= half)
    return float(np.mean(inside)), int(np.size(inside))


# permutation: 400 rows = first sweep not finished (28 pairs, 40 background rows); 1500 and
# 20000 = stratified over every row. kernel: 4000 and 20000 rows (all rows per coalition).
@pytest.mark.parametrize(("method", "evaluations"), [("permutation", 400), ("permutation", 1500),
                                                     ("permutation", 20000), ("kernel", 4000),
                                                     ("kernel", 20000)])
def test_intervals_cover_exact_values_at_the_nominal_rate(method: str, evaluations: int,
                                                          exact: Array) -> None:
    share, pairs = _coverage(method, evaluations, exact)
    assert pairs >= 500
    assert BAND[0] <= share <= BAND[1], share


def test_the_band_rejects_standard_errors_off_by_30_percent(exact: Array) -> None:
    """The same intervals with scaled standard errors fall outside the band: the test above
    could not pass with SEs halved, doubled, or 30% off."""
    for scale in (0.5, 0.7):
        assert _coverage("permutation", 1500, exact, scale)[0] < BAND[0]
    for scale in (1.4, 2.0):
        assert _coverage("permutation", 1500, exact, scale)[0] > BAND[1]

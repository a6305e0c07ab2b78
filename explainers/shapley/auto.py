"""`auto`: exact when the enumeration fits the budget comfortably, else the default sampler."""

from __future__ import annotations

import numpy as np

from explainers.base import Array, Background, Budget, Estimator, Evaluator, Explanation
from explainers.groups import Groups
from explainers.shapley.exact import MAX_FEATURES, WALL_PRIOR

EXACT_SHARE = 0.5  # exact may use at most this share of the remaining budget


class AutoShapley:
    """Picks a method per row; the result's `method` names the one actually used."""

    name = "auto"

    def __init__(self, exact: Estimator, sampler: Estimator) -> None:
        self._exact = exact
        self._sampler = sampler

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        return None

    def choose(self, model: Evaluator, n_features: int, background: Background,
               budget: Budget) -> Estimator:
        """Exact if it fits in half the remaining time and evaluation cap, else the sampler."""
        needed = self._exact.expected_evaluations(n_features, background)
        if n_features > MAX_FEATURES or needed is None:
            return self._sampler
        fits_time = model.wall_seconds("exact", needed, WALL_PRIOR) \
            <= EXACT_SHARE * budget.remaining()
        fits_cap = budget.max_evaluations is None or needed <= budget.max_evaluations
        return self._exact if fits_time and fits_cap else self._sampler

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Delegates to the chosen method, which validates its own inputs."""
        players = x.size if groups is None else groups.size
        chosen = self.choose(model, players, background, budget)
        return chosen.explain(model, x, background, budget, rng, groups)

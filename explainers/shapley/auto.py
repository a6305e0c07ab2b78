"""`auto`: exact when the enumeration fits the budget comfortably, else a sampler: paired
KernelSHAP (with its regression adjustment, kernel.py) against one reference row (a named
baseline: image patches) from KERNEL_MIN_PLAYERS players, the default sampler otherwise.

Against one row the game is deterministic and a coalition costs one model row for either
sampler; there the kernel fit reached 5% error with 2-4x fewer evaluations than antithetic
permutations on the digits CNN at 16 and 64 patches, but on the text model (11-12 tokens) the
fit's own cost per evaluation takes most of its lead: in CPU time the kernel reaches 5% a
little sooner (2.0-2.1 against 2.4-2.6 ms) and permutations reach 1% about 2.5x sooner (5.2
against 13.3 ms: docs/benchmarks.md, feature groups), so below KERNEL_MIN_PLAYERS it samples
permutations. Against a background the
permutation sampler visits one background row per pair where the kernel fit pays for all of
them on every coalition."""

from __future__ import annotations

import numpy as np

from explainers.base import Array, Background, Budget, Estimator, Evaluator, Explanation
from explainers.groups import Groups
from explainers.shapley.exact import MAX_FEATURES, WALL_PRIOR
from explainers.shapley.kernel import KernelShap

EXACT_SHARE = 0.5  # exact may use at most this share of the remaining budget
KERNEL_MIN_PLAYERS = 13  # against one row, below this permutations reach 1% sooner


class AutoShapley:
    """Picks a method per row; the result's `method` names the one actually used."""

    name = "auto"

    def __init__(self, exact: Estimator, sampler: Estimator,
                 one_row: Estimator | None = None) -> None:
        self._exact = exact
        self._sampler = sampler
        self._one_row = one_row or KernelShap()

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        return None

    def choose(self, model: Evaluator, n_features: int, background: Background,
               budget: Budget) -> Estimator:
        """Exact if it fits in half the remaining time and evaluation cap, else a sampler."""
        one_row = background.rows == 1 and n_features >= KERNEL_MIN_PLAYERS
        sampler = self._one_row if one_row else self._sampler
        needed = self._exact.expected_evaluations(n_features, background)
        if n_features > MAX_FEATURES or needed is None:
            return sampler
        fits_time = model.wall_seconds("exact", needed, WALL_PRIOR) \
            <= EXACT_SHARE * budget.remaining()
        fits_cap = budget.max_evaluations is None or needed <= budget.max_evaluations
        return self._exact if fits_time and fits_cap else sampler

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Delegates to the chosen method, which validates its own inputs."""
        players = x.size if groups is None else groups.size
        chosen = self.choose(model, players, background, budget)
        return chosen.explain(model, x, background, budget, rng, groups)

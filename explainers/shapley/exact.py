"""Exact interventional Shapley values: every one of the 2^d coalitions against the background."""

from __future__ import annotations

from math import comb

import numpy as np

from explainers.base import SAFETY, Array, Background, Budget, Evaluator, Explanation
from explainers.errors import InvalidArgument, ResourceExhausted
from explainers.groups import Groups
from explainers.masking import coalition_values, pinned, players_of

MAX_FEATURES = 16
# An exact answer's wall time over its model time before one is measured: building the masked
# batches and the sums cost about half the model's time again on a 12-feature MLP (45-57 ms
# against a 32 ms estimate, issue 17); the service then learns each model's own figure.
WALL_PRIOR = 1.6


def all_coalitions(d: int) -> Array:
    """Every subset of d features as a bool mask, indexed by its bit code."""
    codes = np.arange(2**d)
    return ((codes[:, None] >> np.arange(d)) & 1).astype(bool)  # (2^d, features)


def shapley_weights(d: int) -> Array:
    """w(s) = s! (d-s-1)! / d!, the weight of a coalition of size s not containing i."""
    return np.array([1.0 / (d * comb(d - 1, s)) for s in range(d)])  # (sizes,)


def shapley_from_values(v: Array) -> Array:
    """Shapley values from v(S) of all 2^d coalitions (indexed by bit code): (outputs, features)."""
    d = int(np.log2(v.shape[0]))
    codes = np.arange(v.shape[0])
    sizes = np.bitwise_count(codes)  # (2^d,) coalition sizes
    weights = shapley_weights(d)
    phi = np.empty((v.shape[1], d))
    for i in range(d):  # one vectorised pass per feature, never per coalition
        without = codes[(codes >> i) & 1 == 0]  # (2^(d-1),)
        gain = v[without | (1 << i)] - v[without]  # (2^(d-1), outputs)
        phi[:, i] = weights[sizes[without]] @ gain
    return phi


class ExactShapley:
    """Enumerates all coalitions in batched model calls; exact, so standard errors are 0."""

    name = "exact"

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        """Model rows an exact answer needs (the two end coalitions are known already)."""
        return int((2**n_features - 2) * background.rows + 1)

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Check the player count and that the enumeration fits the budget, then compute."""
        d = players_of(x, groups)
        if d > MAX_FEATURES:
            raise InvalidArgument(f"method: exact supports at most {MAX_FEATURES} features or "
                                  f"groups; this request has {d}: use permutation, kernel or "
                                  "auto")
        needed = self.expected_evaluations(d, background) or 0
        seconds = model.wall_seconds(self.name, needed, WALL_PRIOR)
        cap = budget.max_evaluations
        if seconds > SAFETY * budget.remaining() or (cap is not None
                                                     and needed > cap - model.evaluations):
            raise ResourceExhausted(f"budget_ms: exact needs {needed} model evaluations "
                                    f"(~{1e3 * seconds:.0f} ms here, as this model's exact "
                                    "answers measured), more than the budget allows: raise "
                                    "budget_ms or use auto")
        return self._explain(model, x, pinned(model, x, background, groups), groups)

    def _explain(self, model: Evaluator, x: Array, background: Background,
                 groups: Groups | None) -> Explanation:
        fx = model(x[None])[0]  # (outputs,)
        masks = all_coalitions(players_of(x, groups))  # (2^d, players)
        v = np.empty((masks.shape[0], fx.size))  # (2^d, outputs)
        v[0], v[-1] = background.base_values, fx
        if masks.shape[0] > 2:
            v[1:-1] = coalition_values(model, masks[1:-1], x, background, groups)
        phi = shapley_from_values(v)
        return Explanation.build(self.name, phi, np.zeros_like(phi), v[0], fx,
                                 evaluations=model.evaluations, converged=True,
                                 budget_exhausted=False)

"""`smoothgrad`: the gradient averaged over noisy copies of x (Smilkov et al. 2017), with the
standard error of that mean.

Noise is Gaussian with sigma = noise_level * (max(x) - min(x)), the paper's parametrisation
(it recommends 10-20%), in the differentiated variables: the input's elements, or for text
the token embeddings (sigma then relative to the embedding values' range). Each sample is a
gradient map (the signed gradient, as the paper defines it, or its absolute value, Captum's
NoiseTunnel over Saliency); text maps are summed per token. Samples are drawn in rounds under
the budget (explainers.anytime.run_rounds) until the largest standard error of a group's
value is below the accuracy goal, the budget is spent or `samples` are drawn. Not additive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from explainers.anytime import require_stop_rule, run_rounds
from explainers.base import Array, Background, Budget, Evaluator, Explanation
from explainers.errors import InvalidArgument
from explainers.gradients.backend import GradientModel
from explainers.gradients.common import Calls, block_rows, check_row, explanation
from explainers.groups import Groups

NOISE_LEVEL = 0.15


@dataclass
class Moments:
    """Running sums of per-sample group values (outputs, d), their squares, and maps."""

    s1: Array
    s2: Array
    maps: Array  # (outputs, elements)
    n: int = 0

    def add(self, values: Array, maps: Array) -> None:
        """values (samples, outputs, d), maps (samples, outputs, elements)."""
        self.s1 += values.sum(axis=0)
        self.s2 += (values**2).sum(axis=0)
        self.maps += maps.sum(axis=0)
        self.n += values.shape[0]

    def mean(self) -> Array:
        return self.s1 / max(self.n, 1)

    def se(self) -> Array:
        """Standard error of the mean per group value (outputs, d)."""
        n = max(self.n, 2)
        var = np.maximum(self.s2 / n - self.mean() ** 2, 0.0) * n / (n - 1)
        return np.asarray(np.sqrt(var / n))


class SmoothGrad:
    """Anytime SmoothGrad; one instance per GradientModel (model and target)."""

    name = "smoothgrad"

    def __init__(self, gm: GradientModel, noise_level: float = NOISE_LEVEL,
                 samples: int | None = None, absolute: bool = False) -> None:
        if not noise_level > 0 or (samples is not None and samples < 2):
            raise InvalidArgument("smoothgrad: noise_level must be > 0 and samples >= 2 (a "
                                  "standard error needs two)")
        self.gm, self.noise_level, self.samples, self.absolute = gm, noise_level, samples, absolute

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        return self.samples

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Check the budget can stop (a sample count is a stop rule), then sample."""
        if self.samples is None:
            require_stop_rule(budget)
        calls = Calls(self.gm, check_row(self.gm, x), model)
        return self._explain(calls, budget, rng, groups or Groups.each(self.gm.elements))

    def _explain(self, calls: Calls, budget: Budget, rng: np.random.Generator,
                 groups: Groups) -> Explanation:
        k, p = self.gm.columns, self.gm.size
        fx = calls.values(calls.P)[0]  # (outputs,)
        if self.samples is not None:  # a sample count caps the evaluations from here
            cap = calls.ev.evaluations + self.samples
            cap = cap if budget.max_evaluations is None else min(cap, budget.max_evaluations)
            budget = Budget(budget.deadline, cap, budget.target_error)
        span = float(calls.P.max() - calls.P.min())
        sigma = self.noise_level * (span if span > 0 else 1.0)
        acc = Moments(np.zeros((k, groups.size)), np.zeros((k, groups.size)),
                      np.zeros((k, self.gm.elements)))

        def sample(n: int) -> None:
            for start in range(0, n, block_rows(self.gm)):
                rows = min(block_rows(self.gm), n - start)
                noisy = calls.P + rng.normal(0.0, sigma, (rows, p))  # (rows, p)
                _, g = calls.grads(noisy)  # (rows, outputs, p)
                g = np.abs(g) if self.absolute else g
                maps = self.gm.to_elements(g.reshape(rows * k, p))  # (rows * outputs, elements)
                values = groups.sum_elements(maps)  # (rows * outputs, d)
                acc.add(values.reshape(rows, k, -1), maps.reshape(rows, k, -1))

        def max_se() -> float:
            return float(acc.se().max())

        units, stop = run_rounds(calls.ev, budget, 1, p, sample, max_se)
        return explanation(self.name, self.gm, acc.maps / acc.n, groups, np.zeros(k), fx,
                           calls, acc.mean(), acc.se(), samples=units, dof=float(units - 1),
                           converged=stop.converged, budget_exhausted=stop.budget_exhausted,
                           diagnostics=(("samples", float(units)), ("sigma", sigma)))

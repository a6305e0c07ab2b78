"""`lime`: a weighted linear surrogate of the model over groups switched on and off (Ribeiro,
Singh & Guestrin 2016), with the numbers that say how far the surrogate is from the model.

Samples: the explained row itself, then rows where each group is kept with probability 1/2
(LIME's image sampler). A dropped group takes its values from a background row drawn by weight,
independently per group and sample: tabular LIME samples each feature from the background's
distribution; with a one-row baseline (images, text) it is that baseline. Weights: LIME's
kernel sqrt(exp(-D^2 / KERNEL_WIDTH^2)), D the cosine distance between the sample's on/off
vector and all-on. Fit: ridge with penalty RIDGE on the coefficients (not the intercept). LIME
uses Ridge(alpha=1), which shrinks every coefficient by about alpha / (0.12 n) (0.2% at 4,000
samples) without saying so; here the penalty only keeps the fit defined with few samples.
The response reports the weighted R^2 of the fit and each coefficient's standard error
(sandwich, robust to the surrogate being wrong), so the user sees both how well the surrogate
fits and how much the sampling moved it. Samples are drawn in rounds until the budget or the
accuracy goal stops them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from explainers.anytime import MIN_UNITS, require_stop_rule, require_units, run_rounds
from explainers.base import Array, Background, Budget, Evaluator, Explanation
from explainers.groups import Groups
from explainers.masking import pinned, players_of

KERNEL_WIDTH = 0.25  # LIME's image default, on the cosine distance
RIDGE = 1e-3  # a stabiliser, not a prior: see the module docstring


def kernel_weights(z: Array) -> Array:
    """LIME's weight of each on/off sample (n, d): sqrt(exp(-D^2 / width^2))."""
    on = z.sum(axis=1)
    distance = 1.0 - np.sqrt(on / z.shape[1])  # cosine distance to all-on (0 on: distance 1)
    return np.asarray(np.sqrt(np.exp(-distance**2 / KERNEL_WIDTH**2)))


@dataclass
class Samples:
    """Every sample so far: on/off vectors (n, d), model outputs (n, outputs), weights (n,)."""

    z: list[Array] = field(default_factory=list)
    y: list[Array] = field(default_factory=list)

    def add(self, z: Array, y: Array) -> None:
        self.z.append(z)
        self.y.append(y)

    def fit(self) -> Fit:
        return ridge_fit(np.concatenate(self.z), np.concatenate(self.y))


@dataclass(frozen=True)
class Fit:
    """The surrogate: intercept (outputs,), coefficients and their standard errors (outputs, d),
    the weighted R^2 per output, and the samples behind it."""

    intercept: Array
    coef: Array
    se: Array
    r2: Array
    n: int


def ridge_fit(z: Array, y: Array) -> Fit:
    """Weighted ridge of y (n, outputs) on z (n, d) with an unpenalised intercept, and
    sandwich standard errors A^-1 (Z' W diag(r^2) W Z) A^-1 with a small-sample factor."""
    n, d = z.shape
    w = kernel_weights(z)  # (n,)
    Z = np.concatenate([np.ones((n, 1)), z], axis=1)  # (n, 1 + d)
    A = Z.T @ (w[:, None] * Z) + RIDGE * np.diag([0.0, *np.ones(d)])  # (1 + d, 1 + d)
    Ainv = np.linalg.pinv(A)
    beta = Ainv @ (Z.T @ (w[:, None] * y))  # (1 + d, outputs)
    r = y - Z @ beta  # (n, outputs)
    scale = n / max(n - d - 1, 1)
    G = (w[:, None] * Z)  # (n, 1 + d)
    se = np.stack([np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", Ainv, (G * r[:, [o]] ** 2).T @ G,
                                                Ainv), 0.0) * scale)
                   for o in range(y.shape[1])])  # (outputs, 1 + d)
    mean = (w @ y) / w.sum()
    r2 = 1.0 - (w @ r**2) / np.maximum(w @ (y - mean) ** 2, 1e-300)
    return Fit(beta[0], beta[1:].T, se[:, 1:], r2, n)


class Lime:
    """Anytime LIME over groups; not additive (the surrogate's intercept is the base value)."""

    name = "lime"

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        return None

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Check the budget can stop, then sample until it says stop."""
        require_stop_rule(budget)
        g = groups or Groups.each(x.size)
        return self._explain(model, x, pinned(model, x, background, g), budget, rng, g)

    def _explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                 rng: np.random.Generator, groups: Groups) -> Explanation:
        d = players_of(x, groups)
        least = max(MIN_UNITS, d + 2)  # fewer samples than coefficients: no standard errors
        require_units(model, budget, 1, least)  # before any model call
        fx = model(x[None])[0]  # (outputs,)
        samples = Samples()
        samples.add(np.ones((1, d), bool), fx[None])

        def sample(n: int) -> None:
            z = rng.random((n, d)) < 0.5  # (n, players) True = kept
            samples.add(z, self._values(model, x, background, groups, z, rng))

        def max_se() -> float:
            return float(samples.fit().se.max())

        units, stop = run_rounds(model, budget, 1, x.size, sample, max_se, min_units=least,
                                 required=least, finish_grows=True)  # the fit: O(samples)
        fit = samples.fit()
        return Explanation.build(self.name, fit.coef, fit.se, fit.intercept, fx,
                                 evaluations=model.evaluations, converged=stop.converged,
                                 budget_exhausted=stop.budget_exhausted, samples=units,
                                 dof=float(max(fit.n - d - 1, 1)), additive=False,
                                 diagnostics=(("surrogate_r2", float(fit.r2.min())),))

    @staticmethod
    def _values(model: Evaluator, x: Array, background: Background, groups: Groups, z: Array,
                rng: np.random.Generator) -> Array:
        """f on the samples (n, outputs): dropped groups from one background row per group."""
        n, d = z.shape
        rows = rng.choice(background.rows, size=(n, d), p=background.weights)  # (n, players)
        owner = np.where(groups.index < 0, 0, groups.index)  # (elements,)
        reference = background.data[rows[:, owner], np.arange(x.size)]  # (n, elements)
        keep = groups.expand(z)  # (n, elements)
        return model(np.where(keep, x, reference).astype(model.dtype))

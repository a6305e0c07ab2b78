"""Antithetic permutation sampling of interventional Shapley values, with one background row
sampled per permutation pair and that row's known expectation used as a control variate.

Each pair walks a random order forward and backward against the same background row z, giving
the marginal contribution of every feature twice (exact for interactions up to order two).
Sampling z instead of averaging all background rows makes a unit b times cheaper; the extra
variance is measured, and the control variate c = f(z) - E[f(background)] removes much of it.
With the regression coefficient of the control variate estimated by least squares, the
attributions add up to f(x) - E[f(background)] exactly, at every stopping point.
"""

from __future__ import annotations

import numpy as np

from explainers.base import Array, Background, Budget, Explanation
from explainers.engine import Evaluator, hybrid_values, sample_rows
from explainers.sampling import MIN_UNITS, require_stop_rule, run_rounds, single_feature


def pair_orders(d: int, n: int, rng: np.random.Generator) -> Array:
    """Rank of each feature in n random orders and in their reverses: (2n, features)."""
    perms = rng.permuted(np.tile(np.arange(d), (n, 1)), axis=1)  # (pairs, features)
    rank = np.argsort(perms, axis=1)  # rank[p, i] = position of feature i in order p
    return np.concatenate([rank, d - 1 - rank])  # (2 * pairs, features)


def path_marginals(path: Array, ranks: Array) -> Array:
    """Feature-wise marginal contributions from values along each order's path.

    path: (paths, features + 1, outputs), the value after adding k features; ranks: (paths,
    features). Returns (paths, features, outputs).
    """
    steps = np.diff(path, axis=1)  # (paths, features, outputs): step j adds the j-th feature
    return np.take_along_axis(steps, ranks[:, :, None], axis=1)


class ControlVariateSums:
    """Running centred moments of the marginals m and the control variate c (Chan's merge), so
    the estimate and its standard error cost the same after a million units as after ten."""

    def __init__(self, d: int, k: int) -> None:
        self.n = 0
        self.mean_m, self.mean_c = np.zeros((d, k)), np.zeros(k)  # (features, outputs), (outputs,)
        self.ss_m, self.ss_c = np.zeros((d, k)), np.zeros(k)  # sums of squared deviations
        self.cross = np.zeros((d, k))  # sum of (m - mean_m)(c - mean_c)

    def add(self, m: Array, c: Array) -> None:
        """Fold in a batch: m (units, features, outputs), c (units, outputs)."""
        nb, n = m.shape[0], self.n + m.shape[0]
        mean_m, mean_c = m.mean(axis=0), c.mean(axis=0)
        dm, dc = mean_m - self.mean_m, mean_c - self.mean_c
        w = self.n * nb / n
        self.ss_m += ((m - mean_m) ** 2).sum(axis=0) + dm**2 * w
        self.ss_c += ((c - mean_c) ** 2).sum(axis=0) + dc**2 * w
        self.cross += np.einsum("ndk,nk->dk", m - mean_m, c - mean_c) + dm * dc * w
        self.mean_m += dm * nb / n
        self.mean_c += dc * nb / n
        self.n = n

    def estimate(self) -> tuple[Array, Array]:
        """Control-variate-adjusted means and standard errors, both (outputs, features).

        beta = cov(m, c) / var(c) by least squares; with fewer than MIN_UNITS units, or a constant
        c, beta = -1/d, which is unbiased and keeps the sum exact too.
        """
        d = self.mean_m.shape[0]
        beta = np.full(self.mean_m.shape, -1.0 / d)  # (features, outputs)
        ok = self.ss_c > 1e-300
        if self.n >= MIN_UNITS and ok.any():
            beta[:, ok] = self.cross[:, ok] / self.ss_c[ok]
        phi = self.mean_m - beta * self.mean_c  # (features, outputs)
        ss = np.maximum(self.ss_m - 2 * beta * self.cross + beta**2 * self.ss_c, 0.0)
        if self.n < 2:
            return phi.T, np.full(phi.T.shape, np.inf)
        return phi.T, np.sqrt(ss / (self.n - 1) / self.n).T


class PermutationShapley:
    """Anytime antithetic permutation sampler; exactly additive; standard errors per feature."""

    name = "permutation"

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        return None

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator) -> Explanation:
        """Check the budget can stop, then sample until it says stop."""
        require_stop_rule(budget)
        if x.size == 1:
            return single_feature(self.name, model, x, background)
        return self._explain(model, x, background, budget, rng)

    def _explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                 rng: np.random.Generator) -> Explanation:
        fx = model(x[None])[0]  # (outputs,)
        sums = ControlVariateSums(x.size, fx.size)

        def sample(n: int) -> None:
            sums.add(*self._pairs(model, x, fx, background, n, rng))

        def max_se() -> float:
            return float(sums.estimate()[1].max())

        units, stop = run_rounds(model, budget, 2 * (x.size - 1), x.size, sample, max_se)
        phi, se = sums.estimate()
        return Explanation.build(self.name, phi, se, background.base_values, fx,
                                 evaluations=model.evaluations, converged=stop.converged,
                                 budget_exhausted=stop.budget_exhausted, samples=units,
                                 dof=max(units - 2, 1))

    @staticmethod
    def _pairs(model: Evaluator, x: Array, fx: Array, background: Background, n: int,
               rng: np.random.Generator) -> tuple[Array, Array]:
        """Marginals of n antithetic pairs (pairs, features, outputs) and their control variate."""
        d = x.size
        ranks = pair_orders(d, n, rng)  # (2n, features)
        zi = np.tile(sample_rows(background, n, rng), 2)  # (2n,) same row for both directions
        inner = ranks[:, None, :] < np.arange(1, d)[None, :, None]  # (2n, d-1, features)
        z = background.data[zi][:, None, :]  # (2n, 1, features), one row per path
        y = hybrid_values(model, inner, x, z)  # (2n * (d-1), outputs)
        fz = background.predictions[zi]  # (2n, outputs)
        path = np.concatenate([fz[:, None], y.reshape(2 * n, d - 1, -1),
                               np.broadcast_to(fx, (2 * n, 1, fx.size))], axis=1)
        m = path_marginals(path, ranks)  # (2n, features, outputs)
        return 0.5 * (m[:n] + m[n:]), fz[:n] - background.base_values

"""Paired KernelSHAP: coalitions drawn from the Shapley kernel with their complements, a
weighted least-squares fit solved in closed form under the efficiency constraint (no feature is
ever dropped or regularised away), and jackknife standard errors over groups of pairs."""

from __future__ import annotations

import numpy as np

from explainers.base import Array, Background, Budget, Explanation
from explainers.engine import Evaluator, coalition_values
from explainers.sampling import MIN_UNITS, require_stop_rule, run_rounds, single_feature

JACKKNIFE_GROUPS = 16


def kernel_sizes(d: int, n: int, rng: np.random.Generator) -> Array:
    """Coalition sizes drawn with p(s) proportional to (d-1) / (s (d-s)), s = 1..d-1."""
    s = np.arange(1, d)
    p = 1.0 / (s * (d - s))
    return rng.choice(s, size=n, p=p / p.sum())  # (n,)


def kernel_masks(d: int, n: int, rng: np.random.Generator) -> Array:
    """n coalitions from the Shapley kernel distribution: (n, features) bool."""
    sizes = kernel_sizes(d, n, rng)
    order = rng.permuted(np.tile(np.arange(d), (n, 1)), axis=1)  # (n, features) random orders
    rank = np.argsort(order, axis=1)
    return rank < sizes[:, None]  # the first s features of each order


def constrained_solve(A: Array, b: Array, total: Array) -> Array:
    """argmin of the kernel-weighted squared error subject to sum(phi) = total, per output.

    A: (features, features), b: (features, outputs), total: (outputs,). Returns (outputs, features).
    """
    rhs = np.concatenate([b, np.ones((b.shape[0], 1))], axis=1)  # (features, outputs + 1)
    sol = np.linalg.lstsq(A, rhs, rcond=None)[0]  # (features, outputs + 1)
    a_b, a_1 = sol[:, :-1], sol[:, -1]
    nu = (a_b.sum(axis=0) - total) / a_1.sum()  # (outputs,)
    return np.asarray((a_b - a_1[:, None] * nu[None]).T)


class KernelShap:
    """Anytime paired KernelSHAP against every background row."""

    name = "kernel"

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
        base = background.base_values
        sums = KernelSums(x.size, fx.size, fx - base)

        def sample(n: int) -> None:
            masks = kernel_masks(x.size, n, rng)  # (n, features)
            v = coalition_values(model, np.concatenate([masks, ~masks]), x, background) - base
            sums.add(masks, np.stack([v[:n], v[n:]], axis=1))  # v: (2n, outputs)

        def max_se() -> float:
            return float(sums.estimate()[1].max())

        units, stop = run_rounds(model, budget, 2 * background.rows, x.size, sample, max_se,
                                 min_units=max(MIN_UNITS, x.size))
        phi, se = sums.estimate()
        return Explanation.build(self.name, phi, se, base, fx, evaluations=model.evaluations,
                                 converged=stop.converged, budget_exhausted=stop.budget_exhausted,
                                 samples=units, dof=sums.groups() - 1)


class KernelSums:
    """Per-group sums of the normal equations; pairs are dealt to groups in turn, so the fit and
    its jackknife cost the same however many pairs were drawn."""

    def __init__(self, d: int, k: int, total: Array) -> None:
        self.A = np.zeros((JACKKNIFE_GROUPS, d, d))  # (groups, features, features)
        self.b = np.zeros((JACKKNIFE_GROUPS, d, k))  # (groups, features, outputs)
        self.count = np.zeros(JACKKNIFE_GROUPS)
        self.total = total  # f(x) - E[f(background)] per output
        self.n = 0

    def add(self, masks: Array, v: Array) -> None:
        """masks: (pairs, features) bool; v: (pairs, 2, outputs) for S and its complement."""
        groups = (self.n + np.arange(masks.shape[0])) % JACKKNIFE_GROUPS
        z = masks.astype(np.float64)
        for g in np.unique(groups):
            sel = groups == g
            self.A[g] += 0.5 * (z[sel].T @ z[sel] + (1 - z[sel]).T @ (1 - z[sel]))
            self.b[g] += 0.5 * (z[sel].T @ v[sel, 0] + (1 - z[sel]).T @ v[sel, 1])
            self.count[g] += sel.sum()
        self.n += masks.shape[0]

    def groups(self) -> int:
        """Groups holding at least one pair: the jackknife's sample size."""
        return int(np.count_nonzero(self.count))

    def estimate(self) -> tuple[Array, Array]:
        """The constrained fit on all pairs and its delete-a-group jackknife standard error."""
        A, b, n = self.A.sum(0), self.b.sum(0), self.n
        phi = constrained_solve(A / n, b / n, self.total)
        used = np.flatnonzero(self.count)
        loo = np.stack([constrained_solve((A - self.A[g]) / (n - self.count[g]),
                                          (b - self.b[g]) / (n - self.count[g]), self.total)
                        for g in used])  # (groups, outputs, features)
        k = len(used)
        return phi, np.sqrt((k - 1) / k * ((loo - loo.mean(0)) ** 2).sum(0))

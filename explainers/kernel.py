"""Paired KernelSHAP: coalitions drawn from the Shapley kernel with their complements, a
weighted least-squares fit solved in closed form under the efficiency constraint (no feature is
ever dropped or regularised away), and jackknife standard errors over groups of pairs."""

from __future__ import annotations

import numpy as np

from explainers.base import Array, Background, Budget, Explanation
from explainers.engine import Evaluator, coalition_values, hybrid_values, sample_rows
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
    """Anytime paired KernelSHAP.

    By default every background row is used for every coalition (exact for additive models).
    With `sample_background` each pair (S, complement) is evaluated against one background row z
    drawn by weight, with targets f(x_S, z) - f(z): the regression's population solution is
    still the Shapley value and a pair costs 2 model rows instead of 2 x background rows.
    Measured (docs/benchmarks.md): 3x less error per evaluation on the MLP, 3x more on the GBDT.
    """

    name = "kernel"

    def __init__(self, sample_background: bool = False) -> None:
        self.sample_background = sample_background

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
            v = self._values(model, np.concatenate([masks, ~masks]), x, background, rng)
            sums.add(masks, np.stack([v[:n], v[n:]], axis=1))  # v: (2n, outputs)

        def max_se() -> float:
            return float(sums.estimate()[1].max())

        rows_per_pair = 2 if self.sample_background else 2 * background.rows
        units, stop = run_rounds(model, budget, rows_per_pair, x.size, sample, max_se,
                                 min_units=max(MIN_UNITS, x.size))
        phi, se = sums.estimate()
        return Explanation.build(self.name, phi, se, base, fx, evaluations=model.evaluations,
                                 converged=stop.converged, budget_exhausted=stop.budget_exhausted,
                                 samples=units, dof=sums.groups() - 1)

    def _values(self, model: Evaluator, masks: Array, x: Array, background: Background,
                rng: np.random.Generator) -> Array:
        """v(S) - v(empty) per coalition: (2n, outputs); pairs share one background row."""
        if not self.sample_background:
            v = coalition_values(model, masks, x, background)  # (2n, outputs)
            return np.asarray(v - background.base_values)
        zi = np.tile(sample_rows(background, masks.shape[0] // 2, rng), 2)  # (2n,)
        y = hybrid_values(model, masks, x, background.data[zi])  # (2n, outputs)
        return np.asarray(y - background.predictions[zi])


class KernelSums:
    """Per-group sums of the normal equations; pairs are dealt to groups in turn, so the fit and
    its jackknife cost the same however many pairs were drawn."""

    def __init__(self, d: int, k: int, total: Array) -> None:
        self.A = np.zeros((JACKKNIFE_GROUPS, d, d))  # (groups, features, features)
        self.b = np.zeros((JACKKNIFE_GROUPS, d, k))  # (groups, features, outputs)
        self.count = np.zeros(JACKKNIFE_GROUPS)
        self.total = total  # f(x) - E[f(background)] per output
        self.n = 0
        self.rounds = 0

    def add(self, masks: Array, v: Array) -> None:
        """masks: (pairs, features) bool; v: (pairs, 2, outputs) for S and its complement.

        The batch is cut into contiguous blocks dealt to groups in turn, one matmul per block:
        (1-z)^T (1-z) = n 11^T - 1 s^T - s 1^T + z^T z with s the column sums of z.
        """
        z = masks.astype(np.float64)
        blocks = np.array_split(np.arange(z.shape[0]), min(JACKKNIFE_GROUPS, z.shape[0]))
        for i, idx in enumerate(blocks):
            g = (self.rounds + i) % JACKKNIFE_GROUPS
            self.A[g] += _pair_gram(z[idx[0]:idx[-1] + 1])
            self.b[g] += _pair_moment(z[idx[0]:idx[-1] + 1], v[idx[0]:idx[-1] + 1])
            self.count[g] += len(idx)
        self.rounds += len(blocks)
        self.n += z.shape[0]

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


def _pair_gram(z: Array) -> Array:
    """Sum over pairs of (z z^T + (1-z)(1-z)^T) / 2: (features, features)."""
    s = z.sum(axis=0)  # (features,)
    return np.asarray(z.T @ z + 0.5 * (z.shape[0] - s[:, None] - s[None, :]))


def _pair_moment(z: Array, v: Array) -> Array:
    """Sum over pairs of (z v(S) + (1-z) v(~S)) / 2: (features, outputs)."""
    return np.asarray(0.5 * (z.T @ (v[:, 0] - v[:, 1]) + v[:, 1].sum(axis=0)[None, :]))

"""Antithetic permutation sampling of interventional Shapley values, with the background rows
visited in stratified sweeps.

Each pair walks a random order forward and backward against one background row z, giving the
marginal contribution of every feature twice; the pair's mean is exactly phi(x; z), the Shapley
value against z alone, whenever the model has no interactions above order two. What is left to
average is therefore mostly the spread of phi(x; z) across background rows, and sampling z
independently per pair (shap's PermutationExplainer instead pays for every row on every
coalition) leaves all of it in the error. Here pairs visit the rows in sweeps: a random order
of all rows, then another. Before the first sweep ends the visited rows are a simple random
sample without replacement (a finite-population estimator with f(z) - E f(background) as a
regression control variate); once every row is visited the estimate is stratified, sum_b w_b
mean_b, whose error holds only the spread between pairs on the same row.

Standard errors are those of two-stage sampling (Cochran, Sampling Techniques, ch. 10): every
DOUBLE_EVERY-th row of the first sweep gets two pairs, so the within-row spread is measured
from the start (fewer doubled rows measured worse calibration at the end of the first sweep).
Each attribution gets its own effective degrees of freedom (Satterthwaite over rows, discounted
for heavy tails), so an error bar resting on a few rows gets a wider t interval. The
attributions add up to f(x) - E[f(background)] exactly, at every stop.

Measured against independent rows per pair with the same control variate (docs/benchmarks.md
and the report of issue 3): 3-6x less variance per model evaluation once the rows are covered.
Ridge-penalised feature controls in the first sweep cut its variance by up to 1.7x more but
under-covered by 1-3 points, so they are not used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from explainers.anytime import require_stop_rule, require_units, run_rounds, single_feature
from explainers.base import Array, Background, Budget, Evaluator, Explanation
from explainers.groups import Groups
from explainers.masking import path_values, pinned, players_of

DOUBLE_EVERY = 2  # in the first sweep, one row in this many gets two pairs (the within spread)
FOLD_CELLS = 2**18  # pair values held before they are folded into the per-row sums


def pair_orders(d: int, n: int, rng: np.random.Generator) -> Array:
    """Rank of each feature in n random orders and in their reverses: (2n, features).

    The ranks of a uniformly random order are themselves a uniformly random permutation.
    """
    rank = rng.permuted(np.tile(np.arange(d, dtype=np.int32), (n, 1)), axis=1)  # (pairs, d)
    return np.concatenate([rank, d - 1 - rank])  # (2 * pairs, features)


def path_marginals(path: Array, ranks: Array) -> Array:
    """Feature-wise marginal contributions from values along each order's path.

    path: (paths, features + 1, outputs), the value after adding k features; ranks: (paths,
    features). Returns (paths, features, outputs).
    """
    steps = np.diff(path, axis=1)  # (paths, features, outputs): step j adds the j-th feature
    return np.take_along_axis(steps, ranks[:, :, None], axis=1)


class RowSweeps:
    """The background row of every pair: sweeps through all rows, each in a fresh random order.

    In the first sweep every DOUBLE_EVERY-th row is given two consecutive pairs.
    """

    def __init__(self, rows: int, rng: np.random.Generator) -> None:
        self.rows, self._rng = rows, rng
        counts = 1 + (np.arange(rows) % DOUBLE_EVERY == DOUBLE_EVERY - 1)  # (rows,)
        self._queue = np.repeat(rng.permutation(rows), counts)  # (pairs of the first sweep,)
        self._next = 0

    def take(self, n: int) -> Array:
        """Row indices of the next n pairs: (n,)."""
        short = n - (self._queue.size - self._next)
        if short > 0:
            sweeps = -(-short // self.rows)
            more = self._rng.permuted(np.tile(np.arange(self.rows), (sweeps, 1)), axis=1)
            self._queue = np.concatenate([self._queue[self._next:], more.ravel()])
            self._next = 0
        self._next += n
        return self._queue[self._next - n:self._next]


class StratifiedSums:
    """Per-row sums of pair values (shifted by (f(x) - f(z)) / d against cancellation), from
    which the estimate and its two-stage standard error are read at any point."""

    def __init__(self, background: Background, fx: Array) -> None:
        self.bg, self.d = background, 0
        self.total = fx - background.base_values  # (outputs,)
        self.shift = (fx[None] - background.predictions)  # (rows, outputs), divided by d later
        self.count = np.zeros(background.rows)  # pairs per row
        self.sum: Array = np.zeros(0)
        self.sq: Array = np.zeros(0)
        self._pending: list[tuple[Array, Array]] = []
        self._pending_cells = 0

    def add(self, rows: Array, m: Array) -> None:
        """Take pair values m (pairs, features, outputs) drawn against background `rows`;
        they are folded into the per-row sums in large batches (cheaper than per round)."""
        self._pending.append((rows, m))
        self._pending_cells += m.size
        if self._pending_cells >= FOLD_CELLS:
            self._fold()

    def _fold(self) -> None:
        """Per-row sums of the pending pairs: sort by row, add each row's run at once."""
        if not self._pending:
            return
        rows = np.concatenate([r for r, _ in self._pending])  # (pairs,)
        m = np.concatenate([v for _, v in self._pending])  # (pairs, features, outputs)
        self._pending, self._pending_cells = [], 0
        if self.d == 0:
            self.d = m.shape[1]
            self.sum = np.zeros((self.bg.rows, *m.shape[1:]))  # (rows, features, outputs)
            self.sq = np.zeros_like(self.sum)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        starts = np.flatnonzero(np.diff(sorted_rows, prepend=-1))  # first pair of each row
        m = m[order] - self.shift[sorted_rows][:, None, :] / self.d
        uniq = sorted_rows[starts]
        self.count[uniq] += np.diff(starts, append=rows.size)
        self.sum[uniq] += np.add.reduceat(m, starts, axis=0)
        self.sq[uniq] += np.add.reduceat(m * m, starts, axis=0)

    def estimate(self) -> tuple[Array, Array, Array]:
        """Attributions, standard errors and their degrees of freedom, each (outputs, features)."""
        self._fold()
        seen = np.flatnonzero(self.count)
        means = self.sum[seen] / self.count[seen, None, None] \
            + self.shift[seen][:, None, :] / self.d  # (seen rows, features, outputs)
        within = self._within()
        if seen.size == self.bg.rows:
            phi, var, dof = self._stratified(means, within)
        else:
            phi, var, dof = self._first_sweep(seen, means, within)
        return phi.T, np.sqrt(var).T, dof.T

    def notes(self) -> tuple[str, ...]:
        """Say so when the budget ended before every background row was visited."""
        seen = int(np.count_nonzero(self.count))
        if seen == self.bg.rows:
            return ()
        return (f"permutation: {seen} of {self.bg.rows} background rows visited; the "
                "unvisited rows' share of the error is in the standard errors",)

    def _within(self) -> Within | None:
        """Pooled variance of one pair around its row's mean, from rows with several pairs."""
        multi = np.flatnonzero(self.count >= 2)
        if multi.size == 0:
            return None
        k = self.count[multi] - 1  # (rows,) dof of each row's sum of squares
        n = self.count[multi, None, None]
        ss = np.maximum(self.sq[multi] - self.sum[multi] ** 2 / n, 0.0)  # (rows, features, out)
        lam = self.bg.rows * self.bg.weights[multi]  # 1 for a uniform background
        var = np.einsum("b,bdk->dk", lam, ss) / (lam @ k)
        spread = np.einsum("b,bdk->dk", lam**2 / (k + 2), ss**2)  # Satterthwaite, from s^4
        return Within(var, _dof(np.einsum("b,bdk->dk", lam, ss) ** 2, spread, float(k.sum())))

    def _stratified(self, means: Array, within: Within | None) -> tuple[Array, Array, Array]:
        """Every row visited: sum_b w_b mean_b, variance sum_b w_b^2 within / n_b."""
        w = self.bg.weights
        phi = np.einsum("b,bdk->dk", w, means)  # (features, outputs)
        if within is None:  # one pair per row and no repeats: only with a single pair drawn
            return phi, np.full(phi.shape, np.inf), np.ones(phi.shape)
        return phi, within.var * float(w**2 @ (1.0 / self.count)), within.dof

    def _first_sweep(self, seen: Array, means: Array,
                     within: Within | None) -> tuple[Array, Array, Array]:
        """A simple random sample of rows so far: the regression estimator of the mean of
        B w_b mean_b, with f(z) (and B w_b, for weighted backgrounds) as control variates."""
        B, nv = self.bg.rows, seen.size
        uniform = bool(np.ptp(self.bg.weights) <= 1e-12 * self.bg.weights.max())
        scale = np.ones(nv) if uniform else B * self.bg.weights[seen]  # (seen,)
        y = scale[:, None, None] * means  # (seen, features, outputs)
        c = scale[:, None] * (self.bg.predictions[seen] - self.bg.base_values)  # (seen, outputs)
        fit = _regression(y, c, None if uniform else scale - 1.0, self.total)
        if nv < 2:
            return fit.phi, np.full(fit.phi.shape, np.inf), np.ones(fit.phi.shape)
        f = nv / B
        between = (1 - f) * fit.var / nv  # (features, outputs)
        inner = within or Within(fit.var, fit.dof)
        part = inner.var * (f / nv) * float(np.mean(scale**2 / self.count[seen]))
        dof = (between + part) ** 2 / (between**2 / fit.dof + part**2 / inner.dof + 1e-300)
        return fit.phi, between + part, np.maximum(dof, 1.0)


@dataclass(frozen=True)
class Within:
    """A pooled variance per attribution (features, outputs) and its effective dof."""

    var: Array
    dof: Array


@dataclass(frozen=True)
class Fit:
    """A regression estimate per attribution, its residual variance and that variance's dof."""

    phi: Array
    var: Array
    dof: Array


def _dof(square_of_sum: Array, sum_of_fourth: Array, cap: float) -> Array:
    """Effective degrees of freedom of a variance pooled from unequal parts, at most `cap`:
    few dominant parts give few degrees of freedom, hence wider t intervals."""
    return np.asarray(np.clip(square_of_sum / np.maximum(sum_of_fourth, 1e-300), 1.0,
                              max(cap, 1.0)))


def _regression(y: Array, c: Array, c2: Array | None, total: Array) -> Fit:
    """Regression estimate of mean(y) given controls whose population mean is 0.

    y: (n, features, outputs); c: (n, outputs), f(z) - E f, one control per output; c2: (n,)
    or None, B w_b - 1 for weighted backgrounds. Least squares is linear in y, and
    sum_i y_i = total (1 + c2) - c, so the coefficients add up to (-1, total) and the
    attributions to total. With too few rows for a fit those sums are split evenly. The
    residual variance includes the coefficients' own noise at the controls' sample mean, and
    its dof are discounted for heavy tails (kurtosis).
    """
    n, d, k = y.shape
    phi, var, dof = np.empty((d, k)), np.empty((d, k)), np.empty((d, k))
    for o in range(k):
        C = c[:, o:o + 1] if c2 is None else np.column_stack([c[:, o], c2])  # (n, controls)
        Cc, yc = C - C.mean(axis=0), y[:, :, o] - y[:, :, o].mean(axis=0)  # centred
        lever = 0.0  # extra variance per unit of residual variance, from estimating beta
        if n >= C.shape[1] + 3:
            P = np.linalg.pinv(Cc)  # (controls, n)
            beta = P @ yc  # (controls, features)
            lever = float(np.sum((C.mean(axis=0) @ P) ** 2))
        else:
            beta = np.tile(np.array([-1.0, total[o]])[:C.shape[1], None] / d, (1, d))
        phi[:, o] = y[:, :, o].mean(axis=0) - C.mean(axis=0) @ beta
        e2 = (yc - Cc @ beta) ** 2  # (n, features)
        cap = max(n - 1 - C.shape[1], 1)
        var[:, o] = e2.sum(axis=0) / cap * (1 + n * lever)
        dof[:, o] = _dof(3 * e2.sum(axis=0) ** 2, (e2**2).sum(axis=0), cap)
    return Fit(phi, var, dof)


OrderFn = Callable[[int, int, np.random.Generator], Array]
"""(players d, pairs n, rng) -> ranks of the players in n orders and their reverses (2n, d)."""


class PermutationShapley:
    """Anytime antithetic permutation sampler; exactly additive; standard errors per player.

    `orders` draws the random orders: uniform ones give Shapley values; orders consistent with
    a hierarchy of groups give Owen values (shapley/partition.py)."""

    name = "permutation"

    def __init__(self, orders: OrderFn = pair_orders, name: str = "permutation") -> None:
        self._orders, self.name = orders, name

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        return None

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Check the budget can stop, then sample until it says stop."""
        require_stop_rule(budget)
        d = players_of(x, groups)
        if d > 1:  # before any model call: a refusal comes on arrival, before a core is taken
            require_units(model, budget, 2 * (d - 1))
        background = pinned(model, x, background, groups)
        if d == 1:
            return single_feature(self.name, model, x, background)
        return self._explain(model, x, background, budget, rng, groups)

    def _explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                 rng: np.random.Generator, groups: Groups | None) -> Explanation:
        fx = model(x[None])[0]  # (outputs,)
        d = players_of(x, groups)
        sums, sweeps = StratifiedSums(background, fx), RowSweeps(background.rows, rng)

        def sample(n: int) -> None:
            rows = sweeps.take(n)  # (pairs,)
            ranks = self._orders(d, n, rng)  # (2n, players)
            sums.add(rows, self._pairs(model, x, fx, background, rows, ranks, groups))

        def max_se() -> float:
            return float(sums.estimate()[1].max())

        units, stop = run_rounds(model, budget, 2 * (d - 1), x.size, sample, max_se)
        phi, se, dofs = sums.estimate()
        return Explanation.build(self.name, phi, se, background.base_values, fx,
                                 evaluations=model.evaluations, converged=stop.converged,
                                 budget_exhausted=stop.budget_exhausted, samples=units,
                                 dof=float(np.median(dofs)), dofs=dofs, notes=sums.notes())

    @staticmethod
    def _pairs(model: Evaluator, x: Array, fx: Array, background: Background, rows: Array,
               ranks: Array, groups: Groups | None) -> Array:
        """Pair means of the marginals against each pair's background row: (pairs, d, outputs).

        ranks: (2n, players), the n orders then their reverses."""
        n = rows.size
        zi = np.tile(rows, 2)  # (2n,) the same row for both directions
        y = path_values(model, x, background.data[zi], ranks, groups)  # (2n, d - 1, outputs)
        fz = background.predictions[zi]  # (2n, outputs)
        path = np.concatenate([fz[:, None], y,
                               np.broadcast_to(fx, (2 * n, 1, fx.size))], axis=1)
        m = path_marginals(path, ranks)  # (2n, players, outputs)
        return np.asarray(0.5 * (m[:n] + m[n:]))

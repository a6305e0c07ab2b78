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

Error bars that hold at small budgets (issue 17). A player whose value in background row b
equals x's is a dummy of the game against b: its contribution there is exactly 0, so each
player's error comes only from the rows where it differs (its domain), and a player that
differs in no row is exactly 0 (dummies.py). Each player's variances, between rows in the
first sweep and within rows, are moderated with a prior from all the players
(moderation.py), so a player none of whose contributing rows were visited, or each visited
once, still gets a standard error, with the dof that prior carries. With fewer than
MIN_FIT_ROWS rows, or rows whose f(z) barely vary, the controls are not fitted (the ratio
estimator or an even split instead); the least answer is MIN_PAIRS pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from explainers.anytime import require_stop_rule, require_units, run_rounds, single_feature
from explainers.base import Array, Background, Budget, Evaluator, Explanation
from explainers.groups import Groups
from explainers.masking import path_values, pinned, players_of
from explainers.shapley.dummies import all_dummies, differences, live_game, with_dummies
from explainers.shapley.moderation import moderate

MIN_PAIRS = 6  # the least answer: 4 background rows, 2 of them twice; with 2 or 4 pairs
# (2 or 3 rows) the 95% intervals covered 74-93% on digits and Friedman MLPs, from 6 on 94-97%
DOUBLE_EVERY = 2  # in the first sweep, one row in this many gets two pairs (the within spread)
MIN_FIT_ROWS = 8  # fewer visited rows: no fit on the controls (2 residual dof at 4 rows
# fitted one outlying row and reported a tenth of the error on the bundled GBDT)
LEVER_MAX = 1.0  # fit the controls only if n * (their sample mean's leverage) is at most this
RATIO_RANGE = (0.5, 2.0)  # the ratio estimator only where it scales the sample mean this much
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

    In the first sweep every DOUBLE_EVERY-th row is given two consecutive pairs; then the rows
    it visited once get their second pair (in a new random order), so that from 2 x rows pairs
    on every row's own spread is measured: a row visited once carries an error no other row
    shows when a player's contribution varies with the order on a few rows only (trees: 90%
    coverage at 200 pairs over 100 rows with 24 rows still single, measured on the bundled
    GBDT). Then whole sweeps again.
    """

    def __init__(self, rows: int, rng: np.random.Generator) -> None:
        self.rows, self._rng = rows, rng
        order = rng.permutation(rows)  # (rows,)
        counts = 1 + (np.arange(rows) % DOUBLE_EVERY == DOUBLE_EVERY - 1)  # (rows,)
        once = order[counts == 1]  # rows the first sweep visits once: next, in a new order
        self._queue = np.concatenate([np.repeat(order, counts), rng.permutation(once)])
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

    def __init__(self, background: Background, fx: Array, differs: Array) -> None:
        self.bg, self.d = background, 0
        self.differs = differs  # (rows, players) bool: row b differs from x on player j
        self.domain = background.weights @ differs  # (players,) weight where j can contribute
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
        exact = self.domain == 0  # (players,) x equals every background row there
        phi[exact], var[exact] = 0.0, 0.0
        return phi.T, np.sqrt(var).T, dof.T

    def notes(self) -> tuple[str, ...]:
        """Say so when the budget ended before every background row was visited."""
        seen = int(np.count_nonzero(self.count))
        if seen == self.bg.rows:
            return ()
        return (f"permutation: {seen} of {self.bg.rows} background rows visited; the "
                "unvisited rows' share of the error is in the standard errors",)

    def _within(self) -> Within | None:
        """Pooled variance of one pair around its row's mean, from rows with several pairs
        where the player differs from x (elsewhere every pair gives 0 exactly), moderated."""
        multi = np.flatnonzero(self.count >= 2)
        if multi.size == 0:
            return None
        k = self.count[multi] - 1  # (rows,) dof of each row's sum of squares
        n = self.count[multi, None, None]
        ss = np.maximum(self.sq[multi] - self.sum[multi] ** 2 / n, 0.0)  # (rows, features, out)
        D = self.differs[multi].astype(np.float64)  # (rows, players)
        ss = ss * D[:, :, None]
        lam = self.bg.rows * self.bg.weights[multi]  # 1 for a uniform background
        num = np.einsum("b,bdk->dk", lam, ss)
        den = (lam * k) @ D  # (players,)
        var = num / np.maximum(den, 1e-300)[:, None]
        spread = np.einsum("b,bdk->dk", lam**2 / (k + 2), ss**2)  # Satterthwaite, from s^4
        dof = np.where(den[:, None] > 0, _dof(num ** 2, spread, float(k.sum())), 0.0)
        dof = np.minimum(dof, (k @ D)[:, None])
        live = (self.domain > 0).astype(np.float64)  # per domain row already: scale 1
        var, dof = moderate(var, dof, live, multi.size)
        return Within(var, np.maximum(dof, 1.0))

    def _stratified(self, means: Array, within: Within | None) -> tuple[Array, Array, Array]:
        """Every row visited: sum_b w_b mean_b, variance sum_b w_b^2 within / n_b."""
        w = self.bg.weights
        phi = np.einsum("b,bdk->dk", w, means)  # (features, outputs)
        if within is None:  # one pair per row and no repeats: only with a single pair drawn
            return phi, np.full(phi.shape, np.inf), np.ones(phi.shape)
        share = (w**2 / self.count) @ self.differs  # (players,)
        return phi, within.var * share[:, None], within.dof

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
        bvar, bdof = moderate(fit.var, fit.dof, self.domain, nv)
        f = nv / B
        between = (1 - f) * bvar / nv  # (features, outputs)
        inner = within or Within(bvar, bdof)
        share = (scale**2 / self.count[seen]) @ self.differs[seen] / nv  # (players,)
        part = inner.var * (f / nv) * share[:, None]
        dof = (between + part) ** 2 / (between**2 / bdof + part**2 / inner.dof + 1e-300)
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


def _tail_dof(e2: Array, cap: float) -> Array:
    """dof of a variance from squared residuals e2 (n, features), discounted for heavy tails
    (kurtosis), at most `cap`."""
    return _dof(3 * e2.sum(axis=0) ** 2, (e2**2).sum(axis=0), cap)


def _dof(square_of_sum: Array, sum_of_fourth: Array, cap: float) -> Array:
    """Effective degrees of freedom of a variance pooled from unequal parts, at most `cap`:
    few dominant parts give few degrees of freedom, hence wider t intervals."""
    return np.asarray(np.clip(square_of_sum / np.maximum(sum_of_fourth, 1e-300), 1.0,
                              max(cap, 1.0)))


def _regression(y: Array, c: Array, c2: Array | None, total: Array) -> Fit:
    """Estimate of mean(y) from the visited rows, per output (see _one_output).

    y: (n, features, outputs); c: (n, outputs), f(z) - E f, one control per output; c2: (n,)
    or None, B w_b - 1 for weighted backgrounds; total: (outputs,) f(x) - E f."""
    parts = [_one_output(y[:, :, o], c[:, o], c2, float(total[o])) for o in range(y.shape[2])]
    return Fit(*(np.stack([getattr(p, a) for p in parts], axis=1) for a in ("phi", "var", "dof")))


def _one_output(y: Array, c: Array, c2: Array | None, total: float) -> Fit:
    """The regression estimator on the controls whose population mean is 0, when at least
    MIN_FIT_ROWS rows were visited and they span the controls (their sample mean within one
    sample deviation of 0: LEVER_MAX); else the ratio estimator on t = f(x) - f(z); else the
    controls' coefficients split evenly.

    Each is additive: sum_i y_i = total (1 + c2) - c row by row, so least squares, whose
    coefficients are linear in y, gives coefficients adding up to (-1, total), as does the
    even split, and the ratio estimator scales sums that add up. A fit on rows whose controls
    barely vary extrapolates: estimates 100x the attributions were measured on digits with 6
    rows visited, all of another class than x (f(z) ~ 0 for each); the ratio estimator is
    exact there, each row's contributions being proportional to its f(x) - f(z).
    """
    n, d = y.shape
    C = c[:, None] if c2 is None else np.column_stack([c, c2])  # (n, controls)
    if n >= max(C.shape[1] + 3, MIN_FIT_ROWS):
        Cc = C - C.mean(axis=0)  # (n, controls) centred
        P = np.linalg.pinv(Cc)  # (controls, n)
        lever = float(np.sum((C.mean(axis=0) @ P) ** 2))  # beta's noise at the sample mean
        if n * lever <= LEVER_MAX:
            beta = P @ (y - y.mean(axis=0))  # (controls, features)
            return _controlled(y, C, beta, lever, n - 1 - C.shape[1])
    t = y.sum(axis=1)  # (n,) f(x) - f(z) of each visited row
    if c2 is None and n >= 2 and RATIO_RANGE[0] <= total / (t.mean() or np.inf) <= RATIO_RANGE[1]:
        return _ratio(y, t, total)
    even = np.tile(np.array([-1.0, total])[:C.shape[1], None] / d, (1, d))
    return _controlled(y, C, even, 0.0, max(n - 1, 1))


def _controlled(y: Array, C: Array, beta: Array, lever: float, cap: int) -> Fit:
    """mean(y) - mean(C) beta for y (n, features), controls C (n, controls), coefficients
    beta (controls, features), one output: the estimate, its residual variance (with the
    coefficients' own noise at the controls' sample mean, `lever` per unit of it) and that
    variance's dof, discounted for heavy tails (kurtosis). Arrays (features,)."""
    n = y.shape[0]
    phi = y.mean(axis=0) - C.mean(axis=0) @ beta
    e2 = ((y - y.mean(axis=0)) - (C - C.mean(axis=0)) @ beta) ** 2  # (n, features)
    var = e2.sum(axis=0) / cap * (1 + n * lever)
    return Fit(phi, var, _tail_dof(e2, cap))


def _ratio(y: Array, t: Array, total: float) -> Fit:
    """The ratio estimator total * mean(y) / mean(t) (Cochran, ch. 6): y (n, features), t (n,)
    the rows' sums of y, whose population mean is total. Its residual variance carries the
    factor (total / mean(t))^2 of the ratio's linearisation."""
    n = y.shape[0]
    R = y.mean(axis=0) / t.mean()  # (features,)
    e2 = (y - t[:, None] * R[None]) ** 2  # (n, features)
    var = e2.sum(axis=0) / (n - 1) * (total / t.mean()) ** 2
    return Fit(R * total, var, _tail_dof(e2, n - 1))


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
        background = pinned(model, x, background, groups)
        differs = differences(x, background, groups, model.dtype)  # (rows, players)
        live = np.asarray(differs.any(axis=0))  # (players,) the others are dummies: 0 exactly
        if not live.any():
            return all_dummies(self.name, model(x[None])[0], background, live.size,
                               model.evaluations)
        game = live_game(groups, live, x.size)
        if game is None:
            return self._play(model, x, background, budget, rng, groups, differs)
        return with_dummies(self._play(model, x, background, budget, rng, game,
                                       differs[:, live]), live)

    def _play(self, model: Evaluator, x: Array, background: Background, budget: Budget,
              rng: np.random.Generator, groups: Groups | None, differs: Array) -> Explanation:
        d = players_of(x, groups)
        if d == 1:
            return single_feature(self.name, model, x, background)
        # before f(x): a refusal comes on arrival, before the call takes a core
        require_units(model, budget, 2 * (d - 1), MIN_PAIRS)
        return self._explain(model, x, background, budget, rng, groups, differs)

    def _explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                 rng: np.random.Generator, groups: Groups | None,
                 differs: Array) -> Explanation:
        fx = model(x[None])[0]  # (outputs,)
        d = players_of(x, groups)
        sums, sweeps = StratifiedSums(background, fx, differs), RowSweeps(background.rows, rng)

        def sample(n: int) -> None:
            rows = sweeps.take(n)  # (pairs,)
            ranks = self._orders(d, n, rng)  # (2n, players)
            sums.add(rows, self._pairs(model, x, fx, background, rows, ranks, groups))

        def max_se() -> float:
            return float(sums.estimate()[1].max())

        units, stop = run_rounds(model, budget, 2 * (d - 1), x.size, sample, max_se,
                                 required=MIN_PAIRS)
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


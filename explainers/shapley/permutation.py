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

from explainers.anytime import require_stop_rule, run_rounds, single_feature
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

    def __init__(self, background: Background, fx: Array, differs: Array | None = None) -> None:
        self.bg, self.d = background, 0
        self.differs = differs  # (rows, players) bool: z_b differs from x on the player
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
        exact = self._domain() == 0  # (players,) x equals every background row there
        phi[exact], var[exact] = 0.0, 0.0
        return phi.T, np.sqrt(var).T, dof.T

    def _D(self) -> Array:
        if self.differs is None:
            return np.ones((self.bg.rows, self.d), dtype=bool)
        return self.differs

    def _domain(self) -> Array:
        """M_j: background weight of the rows where player j differs from x: (players,)."""
        return np.asarray(self.bg.weights @ self._D())

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
        D = self._D()[multi].astype(np.float64)  # (rows, players)
        ss = ss * D[:, :, None]
        lam = self.bg.rows * self.bg.weights[multi]  # 1 for a uniform background
        num = np.einsum("b,bdk->dk", lam, ss)
        den = (lam * k) @ D  # (players,)
        var = num / np.maximum(den, 1e-300)[:, None]
        spread = np.einsum("b,bdk->dk", lam**2 / (k + 2), ss**2)  # Satterthwaite, from s^4
        dof = np.where(den[:, None] > 0, _dof(num ** 2, spread, float(k.sum())), 0.0)
        dof = np.minimum(dof, (k @ D)[:, None])
        if os.environ.get("WITHIN_PRIOR", "1") == "1":
            var, dof = _moderate(var, dof, np.ones(var.shape[0]), self._domain() > 0,
                                 rows=multi.size)
        return Within(var, np.maximum(dof, 1.0))

    def _stratified(self, means: Array, within: Within | None) -> tuple[Array, Array, Array]:
        """Every row visited: sum_b w_b mean_b, variance sum_b w_b^2 within / n_b."""
        w = self.bg.weights
        phi = np.einsum("b,bdk->dk", w, means)  # (features, outputs)
        if within is None:  # one pair per row and no repeats: only with a single pair drawn
            return phi, np.full(phi.shape, np.inf), np.ones(phi.shape)
        share = (w**2 / self.count) @ self._D()  # (players,)
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
        M = self._domain()
        rms = np.sqrt(np.mean(y**2, axis=0) / np.maximum(M, 1e-300)[:, None])  # (players, out)
        bvar, bdof = _moderate(fit.var, fit.dof, M, M > 0, rms, nv)
        f = nv / B
        between = (1 - f) * bvar / nv  # (features, outputs)
        inner = within or Within(bvar, bdof)
        share = (scale**2 / self.count[seen]) @ self._D()[seen] / nv  # (players,)
        part = inner.var * (f / nv) * share[:, None]
        dof = (between + part) ** 2 / (between**2 / bdof + part**2 / inner.dof + 1e-300)
        return fit.phi, between + part, np.maximum(dof, 1.0)


import os
PRIOR_DOF = float(os.environ.get("PRIOR_DOF", "2"))
PRIOR_Q = float(os.environ.get("PRIOR_Q", "50"))
LOCAL = float(os.environ.get("LOCAL", "0"))
N0 = float(os.environ.get("N0", "0"))
POW = float(os.environ.get("POW", "1"))
LEVER_MAX = float(os.environ.get("LEVER_MAX", "1"))
RATIO_FALLBACK = os.environ.get("RATIO_FALLBACK", "1") == "1"
MAXONLY = os.environ.get("MAXONLY", "0") == "1"


def _moderate(var: Array, dof: Array, domain: Array, live: Array,
              scale: Array | None = None, rows: int = 0) -> tuple[Array, Array]:
    """Empirical-Bayes moderated variances (Smyth 2004): each player's variance pooled with a
    prior from the other players, domain-scaled; the prior adds PRIOR_DOF dof."""
    if not np.any(live):
        return var, dof
    per = var / np.maximum(domain, 1e-300)[:, None]  # (players, outputs)
    if os.environ.get("LIMMA", "0") == "1":
        var, dof = _limma(var, dof, domain, live, per)
        if PRIOR_DOF <= 0:
            return var, dof
    if LOCAL <= 0 or scale is None:
        prior = np.percentile(per[live], PRIOR_Q, axis=0)[None, :] * domain[:, None]
    else:
        prior = np.empty_like(var)
        idx = np.flatnonzero(live)
        w = max(3, int(LOCAL * idx.size))
        for o in range(var.shape[1]):
            order = idx[np.argsort(scale[idx, o], kind="stable")]
            p = per[order, o]
            for r, j in enumerate(order):
                lo = min(max(0, r - w // 2), max(0, idx.size - w))
                prior[j, o] = np.percentile(p[lo:lo + w], PRIOR_Q) * domain[j]
        prior[~live] = 0.0
    n0 = PRIOR_DOF * (min(1.0, N0 / rows) ** POW if rows and N0 > 0 else 1.0)
    out = (n0 * prior + dof * var) / (n0 + dof)
    newdof = dof + n0
    if MAXONLY:
        up = out > var
        return np.where(up, out, var), np.where(up, newdof, np.maximum(dof, 1.0))
    return out, newdof


def _trigamma_inverse(y: float) -> float:
    from scipy.special import polygamma
    x = 0.5 + 1.0 / y
    for _ in range(50):
        tri = float(polygamma(1, x))
        dif = tri * (1 - tri / y) / float(polygamma(2, x))
        x += dif
        if -dif / x < 1e-8:
            break
    return x


NU_MAX = float(os.environ.get("NU_MAX", "1e6"))
NU_MIN = float(os.environ.get("NU_MIN", "0"))


def _limma(var: Array, dof: Array, domain: Array, live: Array, per: Array) -> tuple[Array, Array]:
    from scipy.special import digamma, polygamma
    out, newdof = var.copy(), dof.copy()
    for o in range(var.shape[1]):
        ok = live & (per[:, o] > 0)
        if ok.sum() < 3:
            nu0, s0 = 0.0, 0.0
        else:
            nu = dof[ok, o]
            e = np.log(per[ok, o]) - digamma(nu / 2) + np.log(nu / 2)
            evar = e.var(ddof=1) - float(np.mean(polygamma(1, nu / 2)))
            if evar > 0:
                nu0 = 2 * _trigamma_inverse(evar)
                s0 = float(np.exp(e.mean() + digamma(nu0 / 2) - np.log(nu0 / 2)))
            else:
                nu0, s0 = np.inf, float(np.exp(e.mean()))
        nu0 = min(max(nu0, NU_MIN), NU_MAX)
        prior = s0 * domain
        out[:, o] = (nu0 * prior + dof[:, o] * var[:, o]) / (nu0 + dof[:, o])
        newdof[:, o] = dof[:, o] + nu0
    return out, newdof


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
    """dof of a variance from squared residuals e2 (n, features): 2n / (kurtosis - 1)."""
    n = e2.shape[0]
    s2, s4 = e2.sum(axis=0) ** 2, (e2**2).sum(axis=0)
    if os.environ.get("DOFMODE", "0") == "1":
        return _dof(2 * n * s2, n * s4 - s2, cap)
    return _dof(3 * s2, s4, cap)


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
    attributions to total; so do the fixed coefficients that split those sums evenly, used
    when there are too few rows for a fit or when the fit's estimated variance is the larger
    (rows whose controls barely vary make the fit extrapolate: estimates off by 100x the
    attributions were measured on digits at 6 rows).
    """
    n, d, k = y.shape
    parts = []
    for o in range(k):
        C = c[:, o:o + 1] if c2 is None else np.column_stack([c[:, o], c2])  # (n, controls)
        even = np.tile(np.array([-1.0, total[o]])[:C.shape[1], None] / d, (1, d))
        found = [_controlled(y[:, :, o], C, even, 0.0, max(n - 1, 1))]
        fitted = None
        if n >= C.shape[1] + 3:
            Cc = C - C.mean(axis=0)  # (n, controls) centred
            P = np.linalg.pinv(Cc)  # (controls, n)
            beta = P @ (y[:, :, o] - y[:, :, o].mean(axis=0))  # (controls, features)
            lever = float(np.sum((C.mean(axis=0) @ P) ** 2))
            fitted = _controlled(y[:, :, o], C, beta, lever, n - 1 - C.shape[1])
            if n * lever <= LEVER_MAX:
                found = [fitted]
        if len(found) == 1 and found[0] is not fitted and RATIO_FALLBACK and c2 is None and n >= 2:
            found = [_ratio(y[:, :, o], float(total[o]))]
        if os.environ.get("MINVAR", "0") == "1" and fitted is not None:
            found.append(fitted)
        parts.append(min(found, key=lambda fit: float(np.sum(fit.var))))
    return Fit(*(np.stack([getattr(p, a) for p in parts], axis=1) for a in ("phi", "var", "dof")))


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


def _ratio(y: Array, total: float) -> Fit:
    """The ratio estimator total * mean(y) / mean(t), t = y summed over players (each row's
    f(x) - f(z)): additive, and exact where y is proportional to t (Cochran ch. 6)."""
    n = y.shape[0]
    t = y.sum(axis=1)  # (n,)
    tbar = float(t.mean())
    if abs(tbar) < 1e-12 * max(float(np.abs(t).max()), 1e-300):
        return Fit(np.zeros(y.shape[1]), np.full(y.shape[1], np.inf), np.ones(y.shape[1]))
    R = y.mean(axis=0) / tbar  # (features,)
    e2 = (y - t[:, None] * R[None]) ** 2
    var = e2.sum(axis=0) / (n - 1) * (total / tbar) ** 2
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
        if players_of(x, groups) == 1:
            return single_feature(self.name, model, x, background)
        return self._explain(model, x, background, budget, rng, groups)

    def _explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                 rng: np.random.Generator, groups: Groups | None) -> Explanation:
        fx = model(x[None])[0]  # (outputs,)
        d = players_of(x, groups)
        differs = _differs(x, background, groups, model.dtype)
        sums, sweeps = StratifiedSums(background, fx, differs), RowSweeps(background.rows, rng)

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


def _differs(x: Array, background: Background, groups: Groups | None, dtype: type) -> Array:
    """(rows, players) bool: whether background row b differs from x on player j, in the
    model's input type (bitwise, as the masked rows are built)."""
    it = np.int32 if np.dtype(dtype).itemsize == 4 else np.int64
    xi = x.astype(dtype).view(it)
    zi = np.ascontiguousarray(background.data, dtype=dtype).view(it)
    diff = zi != xi[None]  # (rows, elements)
    if groups is None:
        return diff
    onehot = groups.index[:, None] == np.arange(groups.size)[None]  # (elements, players)
    return np.asarray((diff.astype(np.int64) @ onehot) > 0)

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
accuracy goal stops them; the fit's sums grow with each round, so the final fit is one pass
over the samples whose cost is measured and kept free, and rounds are planned on the CPU time
per sample, the share of a core the thread gets and the longest wait for one (section
"_rounds"): the answer arrives by the deadline on a loaded machine too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from explainers.anytime import (
    MAX_ROUND_CELLS,
    MAX_UNITS,
    MIN_UNITS,
    ROUND_FIXED_S,
    ROUND_OVERHEAD,
    StopReason,
    require_stop_rule,
    require_units,
)
from explainers.base import SAFETY, Array, Background, Budget, Evaluator, Explanation
from explainers.groups import Groups
from explainers.masking import pinned, players_of

KERNEL_WIDTH = 0.25  # LIME's image default, on the cosine distance
RIDGE = 1e-3  # a stabiliser, not a prior: see the module docstring
# The final fit's pass over the samples (residuals, W Z A^-1, the sandwich's squares) took
# 0.6-0.94x the CPU time of the accumulation done as the rounds arrived (Z, W Z, Z'W Z), per
# sample, measured here for 16-64 groups and 1-10 outputs: this factor keeps time for it.
FIT_FACTOR = 1.5
# A round takes at most this share of the time left (after the fit's reserve), so a model that
# turns up to 1 / (SAFETY * ROUND_SHARE) = 3.1x slower during the round still ends in time.
ROUND_SHARE = 0.4
TAIL_SHARE = 1 / 32  # a round adding fewer samples than this share is not worth its overhead
PASS_ROWS = 2048  # samples per step of the final pass (its arrays stay in cache)
MIN_SHARE = 0.05  # the least share of a core assumed (a thread starved longer is stalled)


def kernel_weights(z: Array) -> Array:
    """LIME's weight of each on/off sample (n, d): sqrt(exp(-D^2 / width^2))."""
    on = z.sum(axis=1)
    distance = 1.0 - np.sqrt(on / z.shape[1])  # cosine distance to all-on (0 on: distance 1)
    return np.asarray(np.sqrt(np.exp(-distance**2 / KERNEL_WIDTH**2)))


@dataclass(frozen=True)
class Fit:
    """The surrogate: intercept (outputs,), coefficients and their standard errors (outputs, d),
    the weighted R^2 per output, and the samples behind it."""

    intercept: Array
    coef: Array
    se: Array
    r2: Array
    n: int


class Samples:
    """Every sample so far, with the fit's sums kept up to date as samples arrive, so the final
    fit is an inverse of (1 + d)^2 and one pass over the samples (residuals, standard errors).

    Per block (a round): Z = [1, z] (n, 1 + d), the kernel weights w (n,), y (n, outputs); in
    total A = Z' W Z (1 + d, 1 + d) and b = Z' W y (1 + d, outputs), unpenalised."""

    def __init__(self) -> None:
        self.blocks: list[tuple[Array, Array, Array]] = []  # (Z, w, y) per round
        self.A: Array = np.zeros(0)
        self.b: Array = np.zeros(0)
        self.n = 0
        self._fit: Fit | None = None

    def add(self, z: Array, y: Array) -> None:
        """Fold samples z (n, d) bool with outputs y (n, outputs) into the sums."""
        Z = np.empty((z.shape[0], 1 + z.shape[1]))  # (n, 1 + d)
        Z[:, 0] = 1.0
        Z[:, 1:] = z
        w = kernel_weights(z)  # (n,)
        U = w[:, None] * Z  # (n, 1 + d)
        A, b = Z.T @ U, U.T @ y  # (1 + d, 1 + d), (1 + d, outputs)
        self.A = A if self.n == 0 else self.A + A
        self.b = b if self.n == 0 else self.b + b
        self.blocks.append((Z, w, y))
        self.n += z.shape[0]
        self._fit = None

    def fit(self) -> Fit:
        """The surrogate over every sample so far (kept until samples are added)."""
        if self._fit is None:
            self._fit = _solve(self.A, self.b, self.blocks, self.n)
        return self._fit


def ridge_fit(z: Array, y: Array) -> Fit:
    """Weighted ridge of y (n, outputs) on z (n, d) with an unpenalised intercept, and
    sandwich standard errors A^-1 (Z' W diag(r^2) W Z) A^-1 with a small-sample factor."""
    samples = Samples()
    samples.add(z, y)
    return samples.fit()


def _solve(A: Array, b: Array, blocks: list[tuple[Array, Array, Array]], n: int) -> Fit:
    """The fit from the sums A = Z' W Z, b = Z' W y and one pass over the blocks (Z, w, y).

    The sandwich's diagonal needs no (1 + d)^2 matrix per output: with P = W Z A^-1,
    [A^-1 Z' W diag(r_o^2) W Z A^-1]_kk = sum_i r_io^2 P_ik^2, one product for all outputs;
    Z [beta, A^-1] gives the residuals and P in one product. Block by block, so the pass
    allocates no (samples, 1 + d) array: its cost stays linear in the samples."""
    d, outputs = A.shape[0] - 1, b.shape[1]
    Ainv = np.linalg.pinv(A + RIDGE * np.diag([0.0, *np.ones(d)]))  # (1 + d, 1 + d)
    beta = Ainv @ b  # (1 + d, outputs)
    M = np.concatenate([beta, Ainv], axis=1)  # (1 + d, outputs + 1 + d)
    mean = b[0] / A[0, 0]  # (outputs,) weighted mean of y (Z's first column is 1)
    meat = np.zeros((outputs, 1 + d))  # sum_i r_io^2 P_ik^2
    sse, sst = np.zeros(outputs), np.zeros(outputs)  # weighted residual and total squares
    for Z, w, y in blocks:
        for i in range(0, Z.shape[0], PASS_ROWS):
            Zs, ws, ys = Z[i:i + PASS_ROWS], w[i:i + PASS_ROWS], y[i:i + PASS_ROWS]
            ZM = Zs @ M  # (rows, outputs + 1 + d)
            r = ys - ZM[:, :outputs]  # (rows, outputs)
            P = ws[:, None] * ZM[:, outputs:]  # (rows, 1 + d)
            meat += (r * r).T @ (P * P)
            sse += ws @ (r * r)
            sst += ws @ (ys - mean) ** 2
    se = np.sqrt(np.maximum(meat, 0.0) * (n / max(n - d - 1, 1)))  # (outputs, 1 + d)
    r2 = 1.0 - sse / np.maximum(sst, 1e-300)
    return Fit(beta[0], beta[1:].T, se[:, 1:], r2, n)


class Pace:
    """What the round loop measures on two clocks, wall and this thread's CPU time.

    The CPU time per sample (drawing, the model, the sums) and the accumulation's share of it
    (the final pass costs about FIT_FACTOR times that per sample) describe the work; the share
    of wall time this thread got since the start (CPU over wall) turns work into wall time;
    and the longest wait for a core between two marks (wall less CPU: a preemption, a pause
    the caller's scheduler imposed) is kept free at the end, because a wait that long may
    come again just before the deadline.
    """

    def __init__(self, cpu_per_sample: float) -> None:
        self.cpu_per_sample = cpu_per_sample
        self.fit_per_sample = 0.0  # CPU seconds of the final pass per sample
        self._samples, self._folding = 0, 0.0  # samples and CPU seconds folding them
        self.fit_fixed = 5e-4  # CPU seconds of the final fit's inverse
        self.stall = 0.0  # the longest wait for a core seen between two marks
        self._start = self._last = (time.perf_counter(), time.thread_time())
        self.share = 1.0  # CPU over wall since the start

    def mark(self) -> None:
        """Account the time since the last mark: its wait for a core, the share so far."""
        now = (time.perf_counter(), time.thread_time())
        self.stall = max(self.stall, (now[0] - self._last[0]) - (now[1] - self._last[1]))
        wall = now[0] - self._start[0]
        if wall > 0:
            self.share = min(1.0, max(MIN_SHARE, (now[1] - self._start[1]) / wall))
        self._last = now

    def measure(self, n: int, cpu: float, folding: float) -> None:
        """Fold in a round of n samples: its CPU seconds, and those spent on the sums (the
        fit's reserve follows their total: a pass has the small rounds' overheads too)."""
        self.cpu_per_sample = cpu / n
        self._samples += n
        self._folding += folding
        self.fit_per_sample = FIT_FACTOR * self._folding / self._samples

    @property
    def per_sample(self) -> float:
        """Wall seconds per sample at the share of the core this thread has been getting."""
        return self.cpu_per_sample / self.share

    def fit_seconds(self, samples: int) -> float:
        """Wall seconds kept for the final fit over `samples` samples."""
        return (self.fit_fixed + self.fit_per_sample * samples) / self.share


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
        pace = Pace(ROUND_OVERHEAD * model.seconds_for(1))
        fx = model(x[None])[0]  # (outputs,)
        samples = Samples()
        samples.add(np.ones((1, d), bool), fx[None])
        pace.mark()

        def sample(n: int) -> float:
            """Draw n samples; returns the CPU seconds spent folding them into the sums."""
            z = rng.random((n, d)) < 0.5  # (n, players) True = kept
            y = self._values(model, x, background, groups, z, rng)
            start = time.thread_time()
            samples.add(z, y)
            return time.thread_time() - start

        stop = _rounds(model, budget, samples, sample, least, x.size, pace)
        fit = samples.fit()
        return Explanation.build(self.name, fit.coef, fit.se, fit.intercept, fx,
                                 evaluations=model.evaluations, converged=stop.converged,
                                 budget_exhausted=stop.budget_exhausted, samples=fit.n - 1,
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


def _rounds(model: Evaluator, budget: Budget, samples: Samples, sample: Callable[[int], float],
            least: int, elements: int, pace: Pace) -> StopReason:
    """Draw samples in rounds until the accuracy goal is met or no worthwhile round fits.

    Rounds double from `least` while time is plentiful; each is also capped so that it takes
    at most ROUND_SHARE of the time left after the reserves, at the last round's CPU time per
    sample over the share of a core this thread has been getting (Pace): near the deadline
    rounds shrink, and a model that turns slower within a round still ends in time. Kept
    free: the final fit over the samples drawn and to be drawn (FIT_FACTOR times the measured
    accumulation per sample, plus the inverse's measured time: the fit's cost grows with the
    samples, so it is bounded, not guessed) and the longest wait for a core seen so far.
    Unlike explainers.anytime.run_rounds (which re-times a whole fit after every round, then
    fits again), no fit runs between rounds unless an accuracy goal needs its standard
    errors, and the last fit is the answer. A round adding under TAIL_SHARE of the samples
    is not drawn when time, not the evaluation cap, is what binds.
    """
    cap = max(1, MAX_ROUND_CELLS // max(1, elements))
    tail = TAIL_SHARE if np.isfinite(budget.deadline) else 0.0
    size, units, met = least, 0, False
    while True:
        met = units >= least and budget.target_error is not None \
            and float(samples.fit().se.max()) <= budget.target_error
        n = min(size, cap, _affordable(model, budget, pace, units))
        if units >= least and (met or n < max(1, units * tail) or units >= MAX_UNITS):
            break
        n = max(n, least - units)
        cpu = time.thread_time()
        folding = sample(n)
        pace.measure(n, time.thread_time() - cpu, folding)
        pace.mark()
        if units == 0 and np.isfinite(budget.deadline):
            pace.fit_fixed = FIT_FACTOR * _cpu_seconds(partial(np.linalg.pinv, samples.A))
        units, size = units + n, size * 2
    return StopReason(converged=met, budget_exhausted=not met)


def _affordable(model: Evaluator, budget: Budget, pace: Pace, units: int) -> int:
    """Samples the next round may draw: the evaluation cap, and ROUND_SHARE of the safe time
    left once the fit of every sample (these included) is reserved:
    n * per_sample <= ROUND_SHARE * (time - fit(units + n))."""
    cap = budget.max_evaluations
    by_evals = 2**62 if cap is None else cap - model.evaluations
    left = budget.remaining()
    if not np.isfinite(left):
        return max(0, by_evals)
    free = SAFETY * left - ROUND_FIXED_S - pace.fit_seconds(units) - pace.stall
    by_time = ROUND_SHARE * free / (pace.per_sample + ROUND_SHARE * pace.fit_per_sample)
    return max(0, int(min(by_evals, by_time)))


def _cpu_seconds(fn: Callable[[], object]) -> float:
    """This thread's CPU seconds spent in fn()."""
    start = time.thread_time()
    fn()
    return time.thread_time() - start

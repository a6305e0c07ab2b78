"""What the samplers share: the anytime loop that plans rounds against the budget, and the
bookkeeping of independent sampling units from which standard errors come."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from explainers.base import SAFETY, Array, Background, Budget, Evaluator, Explanation
from explainers.errors import InvalidArgument, ResourceExhausted

MIN_UNITS = 8  # never report a standard error from fewer independent units than this
MAX_ROUND_CELLS = 2**19  # cells in one round's batch: bigger rounds fall out of cache
ROUND_OVERHEAD = 2.0  # before any round is measured, assume building a batch costs as much again
MAX_UNITS = 2**20  # a hard stop for budgets given only as an accuracy goal
ROUND_FIXED_S = 2e-4  # a round's cost beyond its units (numpy calls, bookkeeping)
FINISH_GUESS_S = 5e-4  # the final estimate's cost before it is measured
FINISH_FACTOR = 2.0  # the measured cost, times this (it grows with the samples folded in)


@dataclass(frozen=True)
class StopReason:
    """Why sampling stopped: the accuracy goal was met, or time/evaluations ran out."""

    converged: bool
    budget_exhausted: bool


def require_stop_rule(budget: Budget) -> None:
    """A sampler without a deadline, an evaluation cap or an accuracy goal would never stop."""
    if not np.isfinite(budget.deadline) and budget.max_evaluations is None \
            and budget.target_error is None:
        raise InvalidArgument("budget: a sampler needs budget_ms, max_evaluations or target_error")


def run_rounds(model: Evaluator, budget: Budget, rows_per_unit: int, n_features: int,
               sample: Callable[[int], None], max_se: Callable[[], float],
               min_units: int = MIN_UNITS, required: int = 2) -> tuple[int, StopReason]:
    """Draw units in growing rounds until the goal is met or the next round would not fit.

    Rounds double (from min_units) so per-round overhead stays small while the clock is still
    checked often. A round starts only if it is predicted to finish in time: the prediction uses
    the measured wall time per unit of earlier rounds (model calls plus building the batch), and
    the evaluator's rows/second before the first round; the final estimate's own cost (timed
    once, after the first round, when there is a deadline) is kept free. On a model too slow
    for even `min_units` in the budget, fewer units are drawn (wider intervals, honest dof);
    fewer than `required` (at least two: no standard error is possible below) is
    RESOURCE_EXHAUSTED before any sampling.
    """
    units, size = 0, min_units
    cap = max(1, MAX_ROUND_CELLS // max(1, rows_per_unit * n_features))
    per_unit = ROUND_OVERHEAD * model.seconds_for(rows_per_unit)
    finish = FINISH_GUESS_S  # time kept for the final estimate; measured after the first round
    required = max(2, required)
    _require_units(model, budget, rows_per_unit, per_unit, finish, required)
    while True:
        n = min(size, cap, _affordable_units(model, budget, rows_per_unit, per_unit, finish))
        met = units >= min_units and _goal_met(budget, max_se)
        if units >= required and (n < 1 or units >= MAX_UNITS or met):
            break
        n = max(n, required - units)
        start = time.perf_counter()
        sample(n)
        per_unit = (time.perf_counter() - start) / n
        if units == 0 and np.isfinite(budget.deadline):
            finish = FINISH_FACTOR * _seconds(max_se)
        units, size = units + n, size * 2
    return units, StopReason(converged=met, budget_exhausted=not met)


def require_rows(model: Evaluator, budget: Budget, rows: int, what: str) -> None:
    """Refuse before any model call when `rows` evaluations (plus building their batches and
    the final estimate, guessed as run_rounds guesses them) cannot fit the budget."""
    seconds = ROUND_OVERHEAD * model.seconds_for(rows) + FINISH_GUESS_S
    capped = budget.max_evaluations is not None and rows > budget.max_evaluations
    if capped or seconds > SAFETY * budget.remaining():
        raise ResourceExhausted(f"budget_ms: too small for {what}: {rows} model evaluations, "
                                f"about {1e3 * seconds / SAFETY:.0f} ms here")


def require_units(model: Evaluator, budget: Budget, rows_per_unit: int,
                  required: int = 2) -> None:
    """run_rounds' own up-front refusal, for a sampler to make before its first model call
    (f(x)): a call refused is then refused on arrival, before it waits for a core."""
    per_unit = ROUND_OVERHEAD * model.seconds_for(rows_per_unit)
    _require_units(model, budget, rows_per_unit, per_unit, FINISH_GUESS_S, max(2, required))


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _require_units(model: Evaluator, budget: Budget, rows_per_unit: int, per_unit: float,
                   finish: float, required: int) -> None:
    """Refuse up front when not even the required units (for a standard error) fit."""
    if _affordable_units(model, budget, rows_per_unit, per_unit, finish) < required:
        needed = 1e3 * (required * per_unit / SAFETY + finish)
        raise ResourceExhausted(f"budget_ms: too small for this model and background: "
                                f"{required} sampling units need about {needed:.1f} ms here")


def _affordable_units(model: Evaluator, budget: Budget, rows_per_unit: int,
                      per_unit: float, finish: float) -> int:
    """Units the remaining time (at the measured cost per unit, less the time the final
    estimate takes) and the evaluation cap allow."""
    by_rows = model.affordable_rows(Budget(np.inf, budget.max_evaluations)) // max(1, rows_per_unit)
    by_time = ((budget.remaining() - finish) * SAFETY - ROUND_FIXED_S) / max(per_unit, 1e-9)
    return int(min(by_rows, by_time)) if np.isfinite(by_time) else int(by_rows)


def _goal_met(budget: Budget, max_se: Callable[[], float]) -> bool:
    return budget.target_error is not None and max_se() <= budget.target_error


def single_feature(method: str, model: Evaluator, x: Array, background: Background) -> Explanation:
    """With one feature there is nothing to sample: phi = f(x) - E[f(background)] exactly."""
    fx = model(x[None])[0]  # (outputs,)
    phi = (fx - background.base_values)[:, None]  # (outputs, 1)
    return Explanation.build(method, phi, np.zeros_like(phi), background.base_values, fx,
                             evaluations=model.evaluations, converged=True,
                             budget_exhausted=False)

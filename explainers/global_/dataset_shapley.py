"""Dataset-wide Shapley values: explain many rows with any local method and aggregate them into
mean |phi| per player with its standard error across rows, mean phi, and the per-row values
with each player's input value (what a beeswarm plot draws).

Rows are visited in a seeded random order, each with an equal share of the time left (as the
data plane shares a request's time among its rows), so a job stopped by its budget has explained
a random sample of the rows. The standard errors are across rows: they treat the rows as a sample
of the data, and the per-row estimation noise of a sampling method is part of that spread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from explainers.base import Array, Background, Budget, Estimator, Evaluator, Explanation
from explainers.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from explainers.global_.interactions import Interactions
from explainers.global_.jobs import Control, Job, JobInfo, Meter, frozen
from explainers.groups import Groups

RowExplainer = Callable[[Array, Budget], Explanation]
"""Explains one row (elements,) within a budget, with any local method."""

MIN_ROWS = 2  # a standard error across rows needs two


@dataclass(frozen=True)
class DatasetShapley:
    """Per-row attributions and their aggregates over the rows explained."""

    labels: tuple[str, ...]  # the players
    rows: Array  # (rows,) indices of the rows explained, ascending
    values: Array  # (rows, outputs, players)
    std_errors: Array  # (rows, outputs, players) each row's own estimation error
    base_values: Array  # (rows, outputs)
    predictions: Array  # (rows, outputs)
    feature_values: Array | None  # (rows, players) each player's input value (NaN: a group)
    mean_abs: Array  # (outputs, players) mean |phi| over the rows
    mean_abs_se: Array  # (outputs, players) std of |phi| across rows (ddof=1) / sqrt(rows)
    mean: Array  # (outputs, players) mean phi
    mean_se: Array  # (outputs, players) std of phi across rows (ddof=1) / sqrt(rows)
    methods: tuple[str, ...]  # the local methods that answered (a data plane may fall back)
    info: JobInfo
    interactions: Interactions | None = None  # TreeSHAP interaction values, when asked


def player_values(X: Array, groups: Groups | None = None) -> Array:
    """Each player's input value per row (rows, players), to colour a beeswarm: the element of
    a one-element player, NaN for a group of several elements (it has no single value)."""
    data = np.asarray(X, np.float64)
    if groups is None or groups.identity:
        return data
    out = np.full((data.shape[0], groups.size), np.nan)
    counts = np.bincount(groups.index[groups.index >= 0], minlength=groups.size)
    for g in np.flatnonzero(counts == 1):
        out[:, g] = data[:, int(np.flatnonzero(groups.index == g)[0])]
    return out


class LocalExplainer:
    """A RowExplainer from an estimator against one background: a fresh counted Evaluator per
    row from `evaluator(rows_per_second)`, starting from the speed the previous row measured
    (as the data plane's RowJob.evaluator builds them)."""

    def __init__(self, estimator: Estimator, evaluator: Callable[[float], Evaluator],
                 background: Background, rng: np.random.Generator,
                 groups: Groups | None = None, rows_per_second: float = 1e5) -> None:
        self.estimator, self.evaluator, self.background = estimator, evaluator, background
        self.rng, self.groups, self.rows_per_second = rng, groups, rows_per_second

    def __call__(self, x: Array, budget: Budget) -> Explanation:
        model = self.evaluator(self.rows_per_second)
        out = self.estimator.explain(model, x, self.background, budget, self.rng, self.groups)
        self.rows_per_second = model.rows_per_second
        return out


def dataset_shapley(explain_row: RowExplainer, X: Array, labels: Sequence[str],
                    rng: np.random.Generator, control: Control | None = None,
                    feature_values: Array | None = None) -> Job[DatasetShapley]:
    """Explain the rows of X (rows, elements) in a seeded order (all, or max_rows of them) and
    aggregate; `feature_values` (rows, players) defaults to X when players are the elements."""
    ctl = control or Control()
    data = _checked(X, feature_values)
    order = ctl.visit_order(data.shape[0], rng)
    meter = Meter(order.size, "rows")
    yield meter.progress()
    done: list[tuple[int, Explanation]] = []
    stopped, notes = yield from _explain_rows(explain_row, data, order, ctl, meter, done)
    info = JobInfo(_evaluations(done), meter.elapsed, stopped, notes)
    return aggregate(done, labels, _values_of(data, feature_values, labels), info)


Stop = tuple[str, tuple[str, ...]]  # why a job stopped early ("" = it did not), and notes


def _explain_rows(explain_row: RowExplainer, data: Array, order: Array, control: Control,
                  meter: Meter, done: list[tuple[int, Explanation]]) -> Job[Stop]:
    """Explain the rows in `order` into `done`, each with its share of the budget; returns why
    it stopped early ("" when every row was done) and a note saying so."""
    for i, row in enumerate(order):
        control.check()
        stopped = _out_of_budget(control.budget, _evaluations(done), len(done))
        if stopped:
            return stopped, ()
        budget = _share(control.budget, done, order.size - i)
        try:
            done.append((int(row), explain_row(data[row], budget)))
        except ResourceExhausted as exc:
            if len(done) < MIN_ROWS:
                raise
            return "budget", (str(exc),)
        yield from meter.advance(1)
    return "", ()


def aggregate(explained: Sequence[tuple[int, Explanation]], labels: Sequence[str],
              feature_values: Array | None, info: JobInfo) -> DatasetShapley:
    """Aggregate (row index, explanation) pairs, at least two, ordered by row index;
    feature_values (all rows, players) or None."""
    pairs = sorted(explained, key=lambda p: p[0])
    if len(pairs) < MIN_ROWS:
        raise InvalidArgument(f"x: at least {MIN_ROWS} rows are needed for dataset-wide values")
    rows = np.array([r for r, _ in pairs], np.int64)
    values = np.stack([e.values for _, e in pairs])  # (rows, outputs, players)
    if values.shape[2] != len(labels):
        raise InvalidArgument(f"labels: {len(labels)} for {values.shape[2]} players")
    shown = None if feature_values is None else frozen(np.asarray(feature_values)[rows])
    return DatasetShapley(
        tuple(labels), frozen(rows), frozen(values),
        frozen(np.stack([e.std_errors for _, e in pairs])),
        frozen(np.stack([e.base_values for _, e in pairs])),
        frozen(np.stack([e.prediction for _, e in pairs])), shown,
        *_mean_and_se(np.abs(values)), *_mean_and_se(values),
        tuple(sorted({e.method for _, e in pairs})), info)


def _mean_and_se(values: Array) -> tuple[Array, Array]:
    """Mean over rows (axis 0) and its standard error, std (ddof=1) / sqrt(rows)."""
    n = values.shape[0]
    return frozen(values.mean(axis=0)), frozen(values.std(axis=0, ddof=1) / np.sqrt(n))


def _checked(X: Array, feature_values: Array | None) -> Array:
    data = np.asarray(X, np.float64)
    if data.ndim != 2 or data.shape[0] < MIN_ROWS:
        raise InvalidArgument(f"x: at least {MIN_ROWS} rows (rows, elements) needed, got shape "
                              f"{data.shape}")
    if feature_values is not None and np.shape(feature_values)[0] != data.shape[0]:
        raise InvalidArgument("feature_values: one row per row of x")
    return data


def _values_of(data: Array, feature_values: Array | None, labels: Sequence[str]) -> Array | None:
    """The beeswarm's colours: as given, else the rows themselves when each element is a
    player, else none."""
    if feature_values is not None:
        return np.asarray(feature_values, np.float64)
    return data if data.shape[1] == len(labels) else None


def _evaluations(done: Sequence[tuple[int, Explanation]]) -> int:
    return sum(e.evaluations for _, e in done)


def _out_of_budget(budget: Budget, evaluations: int, rows_done: int) -> str:
    """Why no further row may start ("" when one may); before two rows are done, the time or
    the evaluations running out is an error (there is nothing to report)."""
    spent = budget.max_evaluations is not None and evaluations >= budget.max_evaluations
    reason = "max_evaluations" if spent else "deadline" if budget.remaining() <= 0 else ""
    if reason and rows_done < MIN_ROWS:
        raise DeadlineExceeded(f"budget: the {reason} was reached before {MIN_ROWS} rows were "
                               "explained")
    return reason


def _share(budget: Budget, done: Sequence[tuple[int, Explanation]], rows_left: int) -> Budget:
    """The next row's budget: an equal share of the time and evaluations left."""
    now = time.monotonic()
    cap = budget.max_evaluations
    evals = None if cap is None else max(1, (cap - _evaluations(done)) // rows_left)
    return Budget(now + max(budget.deadline - now, 0.0) / rows_left, evals, budget.target_error)

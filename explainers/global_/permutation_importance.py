"""`permutation_importance`: how much a score drops when a player's columns are shuffled across
the rows, over repeats, with the standard error across repeats.

The computing core takes the permutations explicitly; given the ones scikit-learn draws, it
reproduces `sklearn.inspection.permutation_importance`: importance = baseline score - permuted
score, with "greater is better" scores (explainers.global_.scores). A group of columns is
permuted as a block, one row permutation for all its columns, so one-hot blocks and other
column sets move together; elements in no group are never permuted.

Work runs repeat by repeat, all players in each, so a job stopped by its budget reports every
player over the same completed repeats (at least two, for a standard error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from explainers.anytime import require_rows
from explainers.base import Array, Evaluator
from explainers.errors import DeadlineExceeded, InvalidArgument
from explainers.global_.jobs import Control, Job, JobInfo, Meter, chunk_units, frozen
from explainers.global_.scores import Score, build_score, metric_name
from explainers.groups import Groups

Permutations = Callable[[int, int], Array]
"""(repeat, player) -> a permutation of the rows (rows,): row i takes row perm[i]'s values."""

MIN_REPEATS = 2  # the standard error needs two


@dataclass(frozen=True)
class PermutationImportance:
    """Score drops per player and repeat, their mean and its standard error."""

    metric: str  # accuracy, log_loss, r2, mse (losses negated) or mean_abs_change
    labels: tuple[str, ...]  # the players
    baseline_score: float  # on the unpermuted rows (0 for mean_abs_change)
    importances: Array  # (players, repeats) baseline - permuted score
    mean: Array  # (players,)
    std_errors: Array  # (players,) std over repeats (ddof=1) / sqrt(repeats)
    rows: Array  # (rows,) indices of the rows used, ascending
    info: JobInfo

    @property
    def repeats(self) -> int:
        return int(self.importances.shape[1])


def permutation_importance(model: Evaluator, X: Array, rng: np.random.Generator,
                           y: Array | None = None, metric: str = "", repeats: int = 5,
                           groups: Groups | None = None,
                           control: Control | None = None) -> Job[PermutationImportance]:
    """Importance of each player (each column, or each group of `groups`) for f on X
    (rows, elements): permutations drawn from `rng`; a row cap takes a seeded sample of rows."""
    ctl = control or Control()
    rows = _rows(X, rng, ctl)
    return importance_from_permutations(model, X, lambda r, g: rng.permutation(rows.size), y,
                                        metric, repeats, groups, ctl, rows)


def importance_from_permutations(model: Evaluator, X: Array, perms: Permutations,
                                 y: Array | None = None, metric: str = "", repeats: int = 5,
                                 groups: Groups | None = None, control: Control | None = None,
                                 rows: Array | None = None) -> Job[PermutationImportance]:
    """The core with given permutations, over X[rows] (all rows by default) and y[rows]."""
    ctl = control or Control()
    data, players, used = _checked(X, groups, repeats, rows)
    labels_used = None if y is None else _labels(y, X.shape[0])[used]
    name = metric_name(metric, y is not None)
    require_rows(model, ctl.budget, data.shape[0] * (1 + MIN_REPEATS * players.size),
                 f"permutation importance over {MIN_REPEATS} repeats")
    meter = Meter(data.shape[0] * (1 + repeats * players.size), "evaluations")
    yield meter.progress()
    ctl.check()
    reference = model(data)  # (rows, outputs)
    score = build_score(name, labels_used, reference)
    yield from meter.advance(data.shape[0])
    permuted, stopped = yield from _repeats(model, data, perms, repeats, players, score, ctl,
                                            meter)
    if len(permuted) < MIN_REPEATS:
        raise DeadlineExceeded(f"budget_ms: the deadline passed before {MIN_REPEATS} repeats "
                               "were done")
    baseline = score(reference)
    importances = baseline - np.array(permuted).T  # (players, repeats)
    return _result(name, players, baseline, importances, used, meter.info(model, stopped))


def _rows(X: Array, rng: np.random.Generator, control: Control) -> Array:
    """All rows, or a seeded sample of max_rows of them, ascending."""
    return np.sort(control.visit_order(np.shape(X)[0] if np.ndim(X) else 0, rng))


def _labels(y: Array, rows: int) -> Array:
    labels = np.asarray(y)
    if labels.ndim == 0 or labels.shape[0] != rows:
        raise InvalidArgument(f"labels: one per row ({rows} rows), got shape {labels.shape}")
    return labels


@dataclass(frozen=True)
class _Players:
    """Each player's columns, and its label."""

    columns: tuple[Array, ...]
    labels: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.columns)


def _checked(X: Array, groups: Groups | None, repeats: int,
             rows: Array | None) -> tuple[Array, _Players, Array]:
    """The rows used (rows, elements), the players' columns and the row indices."""
    data = np.asarray(X, np.float64)
    used = np.arange(data.shape[0] if data.ndim else 0) if rows is None \
        else np.asarray(rows, np.int64)
    if data.ndim != 2 or used.size < 2:
        raise InvalidArgument(f"x: at least two rows (rows, elements), got shape {data.shape} "
                              f"({used.size} rows used)")
    if repeats < MIN_REPEATS:
        raise InvalidArgument(f"repeats: at least {MIN_REPEATS} (for a standard error)")
    g = groups or Groups.each(data.shape[1])
    if g.elements != data.shape[1]:
        raise InvalidArgument(f"groups: {g.elements} elements, the rows have {data.shape[1]}")
    columns = tuple(np.flatnonzero(g.index == p) for p in range(g.size))
    return data[used], _Players(columns, g.labels), used


def _repeats(model: Evaluator, data: Array, perms: Permutations, repeats: int,
             players: _Players, score: Score, control: Control,
             meter: Meter) -> Job[tuple[list[Array], str]]:
    """Permuted scores (players,) per completed repeat, and why the repeats stopped early."""
    done: list[Array] = []
    per_repeat = data.shape[0] * players.size
    for r in range(repeats):
        stopped = control.out_of_budget(model, per_repeat) if r >= MIN_REPEATS else ""
        if stopped:
            return done, stopped
        scores = yield from _one_repeat(model, data, perms, r, players, score, control, meter)
        if scores is None:
            return done, "deadline"
        done.append(scores)
    return done, ""


def _one_repeat(model: Evaluator, data: Array, perms: Permutations, repeat: int,
                players: _Players, score: Score, control: Control,
                meter: Meter) -> Job[Array | None]:
    """Permuted scores (players,) for one repeat, players batched into bounded model calls;
    None when the deadline passed before the repeat was done."""
    n = data.shape[0]
    step = chunk_units(model, data.size, n)  # players per batch
    scores = np.empty(players.size)
    for start in range(0, players.size, step):
        control.check()
        if control.budget.remaining() < 0:
            return None
        batch = range(start, min(start + step, players.size))
        pred = model(_permuted(data, [(players.columns[g], perms(repeat, g)) for g in batch]))
        scores[start:start + len(batch)] = [score(pred[k * n:(k + 1) * n])
                                            for k in range(len(batch))]
        yield from meter.advance(len(batch) * n)
    return scores


def _permuted(data: Array, moves: list[tuple[Array, Array]]) -> Array:
    """One copy of data (rows, elements) per (columns, permutation), the columns' values
    taken from the permuted rows: (len(moves) * rows, elements)."""
    n = data.shape[0]
    out = np.tile(data, (len(moves), 1))  # (moves * rows, elements)
    for k, (cols, perm) in enumerate(moves):
        _check_permutation(perm, n)
        out[k * n:(k + 1) * n, cols] = data[np.ix_(perm, cols)]
    return out


def _check_permutation(perm: Array, rows: int) -> None:
    if perm.shape != (rows,) or not np.array_equal(np.sort(perm), np.arange(rows)):
        raise InvalidArgument(f"permutations: each must reorder the {rows} rows")


def _result(metric: str, players: _Players, baseline: float, importances: Array, rows: Array,
            info: JobInfo) -> PermutationImportance:
    """The mean drop per player and its standard error across repeats."""
    repeats = importances.shape[1]
    se = importances.std(axis=1, ddof=1) / np.sqrt(repeats)  # (players,)
    return PermutationImportance(metric, players.labels, baseline, frozen(importances),
                                 frozen(importances.mean(axis=1)), frozen(se),
                                 frozen(rows), info)

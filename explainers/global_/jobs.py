"""What every dataset-wide job shares: progress reports, cancellation between chunks, the
budget (deadline, evaluation cap) and a row cap.

A job is a generator: it yields `Progress` now and then and returns its result, so a streaming
RPC can forward the reports as the work runs and drop the job when its client goes away. The
caller's `Control.should_stop` is checked between chunks (Cancelled is raised at once); the
budget ends a job early with a partial result over the work done, marked in `JobInfo.stopped`.
`run` drives a job to its result; `events` turns it into one stream ending with the result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from explainers.base import SAFETY, Array, Budget, Evaluator
from explainers.errors import Cancelled, InvalidArgument

R = TypeVar("R")
REPORT_EVERY_S = 0.25  # progress reports at most this often (the first and last always)
BATCH_CELLS = 2**21  # elements in one batch a job builds (16 MB of float64): bounds its memory
CHUNK_S = 0.2  # a chunk's predicted model time: cancellation and reports wait at most this


@dataclass(frozen=True)
class Progress:
    """How far a job is: units done of the total, time spent and the time left at the rate
    so far."""

    done: int
    total: int
    unit: str  # "rows" or "evaluations"
    elapsed_s: float
    remaining_s: float  # inf before the first unit is done


Job = Generator[Progress, None, R]


@dataclass(frozen=True)
class JobInfo:
    """How a job ended: its cost, and why it stopped early ("" when it finished)."""

    evaluations: int
    elapsed_s: float
    # "" = finished; "deadline", "max_evaluations", or "budget" (a row's share was refused; the
    # notes say why): the result covers the work done before the stop
    stopped: str = ""
    notes: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.stopped


def frozen(array: Array) -> Array:
    """A read-only copy (the dtype kept), so a result cannot change after it is returned."""
    out = np.array(array, copy=True)
    out.setflags(write=False)
    return out


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Control:
    """What stops a job: the caller (`should_stop`, checked between chunks), the budget (a
    deadline, an evaluation cap) and a cap on the rows used (a seeded sample of them)."""

    budget: Budget = field(default_factory=lambda: Budget(math.inf))
    should_stop: Callable[[], bool] = _never
    max_rows: int | None = None

    def check(self) -> None:
        """Raise Cancelled when the caller asked to stop."""
        if self.should_stop():
            raise Cancelled("the job was cancelled by its caller")

    def out_of_budget(self, model: Evaluator, rows: int) -> str:
        """Why `rows` more evaluations would not fit ("deadline", "max_evaluations"), or ""."""
        cap = self.budget.max_evaluations
        if cap is not None and model.evaluations + rows > cap:
            return "max_evaluations"
        if model.seconds_for(rows) > SAFETY * self.budget.remaining():
            return "deadline"
        return ""

    def visit_order(self, rows: int, rng: np.random.Generator) -> Array:
        """The rows a job visits, in a seeded random order (so a job stopped early has used a
        random sample), at most max_rows of them."""
        if self.max_rows is not None and self.max_rows < 2:
            raise InvalidArgument("max_rows: at least 2 (for a standard error across rows)")
        order = rng.permutation(rows)  # (rows,)
        return order if self.max_rows is None else order[:self.max_rows]


class Meter:
    """Counts a job's units and reports progress, at most every REPORT_EVERY_S."""

    def __init__(self, total: int, unit: str) -> None:
        self.total, self.unit, self.done = total, unit, 0
        self.start = time.perf_counter()
        self._last = -math.inf

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self) -> Progress:
        """The report now; the time left assumes the rate so far."""
        self._last = time.perf_counter()
        elapsed = self._last - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else math.inf
        return Progress(self.done, self.total, self.unit, elapsed, left)

    def advance(self, units: int) -> Iterator[Progress]:
        """Count `units` done; yields a report when one is due (`yield from` it)."""
        self.done += units
        due = time.perf_counter() - self._last >= REPORT_EVERY_S or self.done >= self.total
        if due:
            yield self.progress()

    def info(self, model: Evaluator, stopped: str = "", notes: tuple[str, ...] = ()) -> JobInfo:
        return JobInfo(model.evaluations, self.elapsed, stopped, notes)


def chunk_units(model: Evaluator, cells: int, evaluations: int) -> int:
    """Units of work per chunk when each unit builds `cells` batch elements and costs
    `evaluations` model rows: within BATCH_CELLS and CHUNK_S at the model's measured speed,
    at least one."""
    by_memory = BATCH_CELLS // max(1, cells)
    by_time = int(CHUNK_S * model.rows_per_second / max(1, evaluations))
    return max(1, min(by_memory, by_time))


def run(job: Job[R], on_progress: Callable[[Progress], None] | None = None) -> R:
    """Drive a job to its result, handing each progress report to `on_progress`."""
    while True:
        try:
            report = next(job)
        except StopIteration as done:
            result: R = done.value
            return result
        if on_progress is not None:
            on_progress(report)


def events(job: Job[R]) -> Iterator[Progress | R]:
    """The job's progress reports, then its result as the last item."""
    result = yield from job
    yield result

"""Admission at arrival, on a model of the work: a call is accepted only when its least sound
answer, and the least answers of the calls already accepted, still fit their deadlines with one
more call on the cores. Otherwise it is shed at once, with a retry hint.

The model is the scheduler's (service/plane/scheduler.py): the least answers are served first,
earliest deadline first, over the cores, so a call's least answer is ready in time when its own
remaining least work, and the remaining least work of every call due no later than it spread
over the cores, fit before its deadline (EDF's processor-demand test). What a call computes
beyond its least answer (a sampler refining until its deadline) takes no one's place. A call's
least cost is what its method needs before it can answer at all (exact: every coalition, with
the margin its own check keeps and its measured wall factor; a sampler: its least pairs,
MIN_PAIRS; tree: its measured speed), in seconds at the model's speed as the last calls
measured it (contention included); it falls as the call computes, and a call that has computed
it is no longer counted. Only a call that the new one would make late counts against it: one
already late (past its deadline, finishing its answer) does not shed the calls behind it. A
call too slow even alone is let through: its method refuses it at once, on arrival (it takes a
core only at its first model call), naming what it needs. The model is checked after every call:
an admitted call that did not reach its least answer in time doubles, for its kind (load level
and budget band), the factor applied to least costs, and each that did takes 1% off, so the
share of admitted calls that miss stays near 1% whatever the model leaves out (the interpreter
lock, other processes).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from explainers.base import SAFETY
from explainers.errors import ResourceExhausted
from explainers.shapley.permutation import MIN_PAIRS
from service.plane.scheduler import Control

FIXED_S = 0.001  # per call beyond its model rows: Python around the estimators
SAMPLER_ROUNDS = 2.0  # a sampler's first rounds cost about this much more than their rows
SHED_FLOOR_S = 0.001  # the least retry hint
GROW, DECAY = 2.0, 0.99  # a call that missed its least answer doubles its load level's factor
# on least costs; each that reached it takes 1% off (at most ~1.4% missed at equilibrium)
MAX_FACTOR = 16.0


@dataclass(eq=False)
class Ticket:
    """An admitted call: its deadline, its least cost, and its control (how long it has
    computed so far)."""

    deadline: float
    least_s: float
    control: Control | None = None
    started: float = field(default_factory=time.monotonic)
    kind: int = 0  # calls alike (load level and budget band): their learned factor

    def remaining_least(self, now: float | None = None) -> float:
        ran = self.control.ran(now) if self.control is not None else 0.0
        return max(0.0, self.least_s - ran)


class Admission:
    """The calls accepted and not finished; decides at arrival whether one more fits."""

    def __init__(self, cores: int) -> None:
        self.cores = max(1, cores)
        self._tickets: set[Ticket] = set()
        self._factors: dict[int, float] = {}  # kind of call: measured / modelled least cost
        self._lock = threading.Lock()

    def admit(self, deadline: float, least_s: float, control: Control | None = None,
              now: float | None = None, kind: int = 0) -> Ticket:
        """A ticket, or RESOURCE_EXHAUSTED with `retry_after_s` when this call's least answer
        or an accepted call's would no longer fit its deadline. The control learns its least
        work: the scheduler serves it first until it has computed it. `kind` (calls alike: the
        load level and budget band, reserve.py) picks the factor missed least answers taught."""
        now = time.monotonic() if now is None else now
        least_s *= self.factor(kind)
        ticket = Ticket(deadline, least_s, control, started=now, kind=kind)
        if control is not None:
            control.least_s = least_s
        with self._lock:
            hurt = late([*self._tickets, ticket], self.cores, now)
            if hurt:  # rare: only then are the ones already late found, and left out
                before = set(late(self._tickets, self.cores, now))
                hurt = [t for t in hurt if t not in before]
            alone = now + least_s <= deadline
            if hurt and alone:  # too slow alone: its method refuses it, naming what it needs
                raise self._shed(ticket, hurt, now)
            self._tickets.add(ticket)
        return ticket

    def factor(self, kind: int) -> float:
        """How much more than modelled a least answer has cost for calls of this kind."""
        with self._lock:
            return self._factors.get(kind, 1.0)

    def reached(self, kind: int, reached: bool) -> None:
        """An admitted call's outcome: it reached its least answer in time, or did not (it
        waited or ran slower than the model said: the interpreter lock, other processes), so
        that admission counts least answers as they turn out for such calls, not as
        modelled."""
        with self._lock:
            f = self._factors.get(kind, 1.0)
            self._factors[kind] = max(1.0, f * DECAY) if reached else min(MAX_FACTOR, f * GROW)

    def done(self, ticket: Ticket) -> None:
        with self._lock:
            self._tickets.discard(ticket)

    @property
    def admitted(self) -> int:
        with self._lock:
            return len(self._tickets)

    def _shed(self, new: Ticket, hurt: list[Ticket], now: float) -> ResourceExhausted:
        """Why, and when to retry: once the earliest accepted deadline still ahead has passed."""
        ahead = [t.deadline for t in self._tickets if t.deadline > now]
        retry = max(SHED_FLOOR_S, min(ahead, default=now) - now)
        whose = "this call's" if new in hurt else f"{len(hurt)} accepted call(s)'"
        err = ResourceExhausted(
            f"server busy: {len(self._tickets)} explanations share {self.cores} core(s); "
            f"{whose} least answer ({1e3 * new.least_s:.1f} ms of compute here) would not fit "
            f"its deadline; retry in {1e3 * retry:.0f} ms or with a larger budget_ms")
        err.retry_after_s = retry
        err.reason = "admission"
        return err


def late(tickets: Iterable[Ticket], cores: int, now: float) -> list[Ticket]:
    """The tickets whose least answer would miss its deadline when the cores serve the least
    answers earliest deadline first: its own remaining least work, or that of every ticket due
    no later than it spread over the cores, does not fit before its deadline."""
    due, found = 0.0, []
    for t in sorted(tickets, key=lambda t: t.deadline):
        left = t.remaining_least(now)
        due += left
        if left > 0 and now + max(left, due / cores) > t.deadline:
            found.append(t)
    return found


def least_seconds(method: str, players: int, references: int, rows_per_second: float,
                  tree: bool = False, exact_factor: float = 1.0) -> float:
    """The least compute (seconds) a method needs before it can answer one row with `players`
    players against `references` reference rows, at the model's measured speed (exact: times
    its measured wall factor, the time its answers take per second of model time)."""
    rate = max(rows_per_second, 1.0)
    d, bg = max(players, 1), max(references, 1)
    key = method.strip().lower() or "auto"
    if key == "tree" or (key == "auto" and tree):
        return FIXED_S
    if key in ("auto", "permutation", "partition"):  # its least pairs, one row each way
        return FIXED_S + SAMPLER_ROUNDS * (1 + 2 * MIN_PAIRS * (d - 1)) / rate
    rows = LEAST_ROWS.get(key)
    if rows is None:
        return FIXED_S + 8 / rate  # gradient methods: a few passes
    factor = {"kernel": SAMPLER_ROUNDS, "exact": exact_factor}.get(key, 1.0)
    return FIXED_S + factor * rows(d, bg) / rate


LEAST_ROWS: dict[str, Callable[[int, int], float]] = {  # model rows of the least answer
    "exact": lambda d, bg: ((2**d - 2) * bg + 1) / SAFETY if d <= 16 else math.inf,
    "kernel": lambda d, bg: 1 + 2 * bg * (d + max(8, 2 * d)),
    "lime": lambda d, bg: max(8, d + 2) * 2, "linear": lambda d, bg: 1,
    "occlusion": lambda d, bg: d * bg + 1}

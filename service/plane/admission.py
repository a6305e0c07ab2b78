"""Admission at arrival, on a model of the work: a call is accepted only when its least sound
answer, and the least answers of the calls already accepted, still fit their deadlines once
the cores are shared among one more call. Otherwise it is shed at once, with a retry hint.

The model: admitted calls share the cores (the scheduler hands them round, earliest deadline
first), so with n calls on c cores each progresses at min(1, c / n) of a core; a call's least
cost is what its method needs before it can answer at all (exact: every coalition, with the
margin its own check keeps; a sampler: its least pairs (MIN_PAIRS); tree: its measured speed), in
seconds at the model's speed as the last calls measured it (contention included); a call's
remaining least cost falls as it computes. A call too slow even alone is let through: its
method refuses it at once, naming what it needs.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from explainers.base import SAFETY
from explainers.errors import ResourceExhausted
from explainers.shapley.permutation import MIN_PAIRS
from service.plane.scheduler import Control

FIXED_S = 0.001  # per call beyond its model rows: Python around the estimators
SAMPLER_ROUNDS = 2.0  # a sampler's first rounds cost about this much more than their rows
SHED_FLOOR_S = 0.001  # the least retry hint


@dataclass(eq=False)
class Ticket:
    """An admitted call: its deadline, its least cost, and its control (how long it has
    computed so far)."""

    deadline: float
    least_s: float
    control: Control | None = None
    started: float = field(default_factory=time.monotonic)

    def remaining_least(self) -> float:
        ran = self.control.ran_s if self.control is not None else 0.0
        return max(0.0, self.least_s - ran)


class Admission:
    """The calls accepted and not finished; decides at arrival whether one more fits."""

    def __init__(self, cores: int) -> None:
        self.cores = max(1, cores)
        self._tickets: set[Ticket] = set()
        self._lock = threading.Lock()

    def admit(self, deadline: float, least_s: float, control: Control | None = None,
              now: float | None = None) -> Ticket:
        """A ticket, or RESOURCE_EXHAUSTED with `retry_after_s` when this call's least answer
        or an accepted call's would no longer fit its deadline."""
        now = time.monotonic() if now is None else now
        ticket = Ticket(deadline, least_s, control, started=now)
        with self._lock:
            tickets = [*self._tickets, ticket]
            slowdown = max(1.0, len(tickets) / self.cores)
            late = [t for t in tickets if now + t.remaining_least() * slowdown > t.deadline]
            alone = now + least_s <= deadline
            if late and alone:  # too slow alone: its method refuses it, naming what it needs
                raise self._shed(ticket, late, slowdown, now)
            self._tickets.add(ticket)
        return ticket

    def done(self, ticket: Ticket) -> None:
        with self._lock:
            self._tickets.discard(ticket)

    @property
    def admitted(self) -> int:
        with self._lock:
            return len(self._tickets)

    def _shed(self, new: Ticket, late: list[Ticket], slowdown: float,
              now: float) -> ResourceExhausted:
        """Why, and when to retry: once the earliest accepted deadline has passed."""
        deadlines = [t.deadline for t in self._tickets]
        retry = max(SHED_FLOOR_S, min(deadlines, default=now) - now)
        whose = "this call's" if new in late else f"{len(late)} accepted call(s)'"
        err = ResourceExhausted(
            f"server busy: {len(self._tickets)} explanations share {self.cores} core(s); "
            f"{whose} least answer ({1e3 * new.least_s:.1f} ms of compute here) would not fit "
            f"its deadline; retry in {1e3 * retry:.0f} ms or with a larger budget_ms")
        err.retry_after_s = retry
        err.reason = "admission"
        return err


def least_seconds(method: str, players: int, references: int, rows_per_second: float,
                  tree: bool = False, exact_factor: float = 1.0) -> float:
    """The least compute (seconds) a method needs before it can answer one row with `players`
    players against `references` reference rows, at the model's measured speed (exact: times
    its measured wall factor, the time its answers take per second of model time)."""
    rate = max(rows_per_second, 1.0)
    d, bg = max(players, 1), max(references, 1)
    key = method.strip().lower() or "auto"
    sampler = SAMPLER_ROUNDS * (1 + 2 * MIN_PAIRS * (d - 1)) / rate  # its least pairs
    if key == "tree" or (key == "auto" and tree):
        return FIXED_S
    rows = {"exact": ((2**d - 2) * bg + 1) / SAFETY if d <= 16 else math.inf,
            "kernel": 1 + 2 * bg * (d + max(8, 2 * d)),
            "lime": max(8, d + 2) * 2, "linear": 1, "occlusion": d * bg + 1}
    if key in ("auto", "permutation", "partition"):
        return FIXED_S + sampler
    if key in rows:
        factor = {"kernel": SAMPLER_ROUNDS, "exact": exact_factor}.get(key, 1.0)
        return FIXED_S + factor * rows[key] / rate
    return FIXED_S + 8 / rate  # gradient methods: a few passes

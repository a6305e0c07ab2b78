"""Who computes now: the least answers first, then earliest deadline first, over the cores this
process may use.

A call computes only while it holds a core. It takes one at its first yield point (before each
model call, see Evaluator.pause), so what comes before — choosing the method, the method's own
check that its least answer fits the budget — happens on arrival and a refusal never waits for a
core. At every yield point it hands its core to a waiting call that ranks before it, or to the
first waiting one once it has computed for SLICE_S while others wait, and queues for it again.
The rank: a call that has not yet computed its least answer (admission's figure: what its
method needs before it can answer at all) comes before one refining an answer it already has
(a sampler uses all of its budget), and within each class the earlier deadline comes first.
Admitted calls therefore all reach their least answer in time, as admission planned
(service/plane/admission.py), and share the rest of the cores by deadline ("mandatory parts
first", the imprecise-computation model of Liu et al., IEEE Computer 24(5), 1991); a long call
cannot starve a short one, and the time a call waits counts against its own budget (its sampler
sees a slower unit cost and plans smaller rounds: its share of the cores). The same yield point
stops a call at once when it is cancelled (client gone, deadline passed, server stopping).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time

from explainers.errors import Cancelled
from service.plane.reserve import Tail

SLICE_S = 0.005  # a call computes at most this long while others wait, then takes its turn
Rank = tuple[bool, float]  # (least answer done, deadline): smaller computes first


class Control:
    """One call's deadline, least work and cancellation, checked at its yield points, and
    the times its measured reserve needs."""

    def __init__(self, deadline: float, cores: Cores | None = None) -> None:
        self.deadline, self.cores = deadline, cores
        self.arrived = time.monotonic()  # the servicer builds it before decoding the request:
        # a budget counts from here, the decoding included
        self.cancelled = False  # a flag, not an Event: nothing waits on it, and an Event
        self.reason = ""  # (a Condition and two locks) cost ~10 us per call to build
        self.least_s = 0.0  # compute its least answer needs (set on admission): served first
        self.holding = False  # holds a core now
        self.since = 0.0  # time.monotonic() when it last took a core
        self.ran_s = 0.0  # seconds it has held a core, before the current stretch
        self.waited_s = 0.0  # seconds it has waited in the queue for a core
        self.tail: Tail | None = None  # its admitted plan, measured for the reserve

    def cancel(self, reason: str = "the call was cancelled") -> None:
        self.reason = self.reason or reason
        self.cancelled = True

    def ran(self, now: float | None = None) -> float:
        """Seconds it has held a core, the current stretch included."""
        if not self.holding:
            return self.ran_s
        return self.ran_s + (time.monotonic() if now is None else now) - self.since

    def rank(self, now: float | None = None) -> Rank:
        """Its place among calls wanting a core: short of its least answer first, then by
        deadline."""
        return self.ran(now) >= self.least_s, self.deadline

    def pause(self) -> None:
        """A yield point: stop if cancelled; else take a core (the first time) or let a call
        that ranks before this one compute first."""
        if self.cancelled:
            raise Cancelled(self.reason)
        if self.cores is not None:
            if self.holding:
                self.cores.yield_point(self)
            else:
                self.cores.acquire(self)
            if self.cancelled:
                raise Cancelled(self.reason)


class Held:
    """The context of Cores.held: releases the core on exit if the call holds one (a class,
    not a generator: this runs on every call)."""

    __slots__ = ("control", "cores")

    def __init__(self, cores: Cores, control: Control) -> None:
        self.cores, self.control = cores, control

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        if self.control.holding:
            self.cores.release(self.control)


class Cores:
    """`n` tokens handed out by rank: the first waiting call gets the next one."""

    def __init__(self, n: int) -> None:
        self.n = max(1, n)
        self._free = self.n
        self._waiting: list[tuple[Rank, int, threading.Event]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def held(self, control: Control, lazily: bool = False) -> Held:
        """Compute inside holding a core (waiting for it by rank), released after. `lazily`:
        taken at the call's first yield point instead of now, so that what precedes its first
        model call (the method's own refusal above all) does not wait for a core."""
        control.cores = self
        if not lazily:
            self.acquire(control)
        return Held(self, control)

    def acquire(self, control: Control) -> None:
        """Take a free core unless a call that ranks before waits; else wait for a hand-over
        (a cancelled call stops waiting and raises Cancelled)."""
        with self._lock:
            rank = control.rank()
            if self._free > 0 and not self._ahead_of(rank):
                self._free -= 1
                self._take(control)
                return
            turn = threading.Event()
            entry = (rank, next(self._seq), turn)
            heapq.heappush(self._waiting, entry)
        queued = time.monotonic()
        try:
            while not turn.wait(0.05):
                if control.cancelled and self._withdraw(entry):
                    raise Cancelled(control.reason)
        finally:
            control.waited_s += time.monotonic() - queued
        self._take(control)

    def release(self, control: Control | None = None) -> None:
        """Hand the core to the first waiting call, or free it."""
        if control is not None:
            control.ran_s += time.monotonic() - control.since
            control.holding = False
        with self._lock:
            if self._waiting:
                heapq.heappop(self._waiting)[2].set()
            else:
                self._free += 1

    def yield_point(self, control: Control) -> None:
        """Give the core up when a call that ranks before this one waits, or when others wait
        and this one has had its slice; then queue again."""
        if not self._waiting:  # read without the lock: a call queueing now is seen next time
            return
        with self._lock:
            now = time.monotonic()
            turn_over = bool(self._waiting) and now - control.since > SLICE_S
            if not self._ahead_of(control.rank(now)) and not turn_over:
                return
        self.release(control)
        self.acquire(control)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    @staticmethod
    def _take(control: Control) -> None:
        control.since = time.monotonic()
        control.holding = True

    def _ahead_of(self, rank: Rank) -> bool:
        return bool(self._waiting) and self._waiting[0][0] < rank

    def _withdraw(self, entry: tuple[Rank, int, threading.Event]) -> bool:
        """Leave the queue (a core handed over meanwhile is passed on); always True."""
        with self._lock:
            if entry in self._waiting:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
                return True
        self.release()
        return True

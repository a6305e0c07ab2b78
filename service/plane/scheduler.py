"""Who computes now: earliest deadline first over the cores this process may use.

A call computes only while it holds a core. At every yield point (before each model call, see
Evaluator.pause) it hands its core to a waiting call with an earlier deadline, or to the
earliest waiting one once it has computed for SLICE_S while others wait, and queues for it
again: a long call cannot starve a short one, the admitted calls share the cores, and the time
a call waits counts against its own budget (its sampler sees a slower unit cost and plans
smaller rounds: its share of the cores). The same yield
point stops a call at once when it is cancelled (client gone, deadline passed, server
stopping).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from explainers.errors import Cancelled

SLICE_S = 0.005  # a call computes at most this long while others wait, then takes its turn


class Control:
    """One call's deadline and cancellation, checked at its yield points."""

    def __init__(self, deadline: float, cores: Cores | None = None) -> None:
        self.deadline, self.cores = deadline, cores
        self._cancelled = threading.Event()
        self.reason = ""
        self.since = 0.0  # time.monotonic() when it last took a core
        self.ran_s = 0.0  # seconds it has held a core

    def cancel(self, reason: str = "the call was cancelled") -> None:
        self.reason = self.reason or reason
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def pause(self) -> None:
        """A yield point: stop if cancelled, else let an earlier deadline compute first."""
        if self._cancelled.is_set():
            raise Cancelled(self.reason)
        if self.cores is not None:
            self.cores.yield_point(self)
            if self._cancelled.is_set():
                raise Cancelled(self.reason)


class Cores:
    """`n` tokens handed out by deadline: the earliest waiting deadline gets the next one."""

    def __init__(self, n: int) -> None:
        self.n = max(1, n)
        self._free = self.n
        self._waiting: list[tuple[float, int, threading.Event]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    @contextmanager
    def held(self, control: Control) -> Iterator[None]:
        """Compute inside: a core is held (waiting for it by deadline), released after."""
        self.acquire(control)
        try:
            yield
        finally:
            self.release(control)

    def acquire(self, control: Control) -> None:
        """Take a free core unless an earlier deadline waits; else wait for a hand-over (a
        cancelled call stops waiting and raises Cancelled)."""
        with self._lock:
            if self._free > 0 and not self._ahead_of(control.deadline):
                self._free -= 1
                control.since = time.monotonic()
                return
            turn = threading.Event()
            entry = (control.deadline, next(self._seq), turn)
            heapq.heappush(self._waiting, entry)
        while not turn.wait(0.05):
            if control.cancelled and self._withdraw(entry):
                raise Cancelled(control.reason)
        control.since = time.monotonic()

    def release(self, control: Control | None = None) -> None:
        """Hand the core to the earliest waiting deadline, or free it."""
        if control is not None:
            control.ran_s += time.monotonic() - control.since
        with self._lock:
            if self._waiting:
                heapq.heappop(self._waiting)[2].set()
            else:
                self._free += 1

    def yield_point(self, control: Control) -> None:
        """Give the core up when a call with an earlier deadline waits, or when others wait
        and this one has had its slice; then queue again."""
        with self._lock:
            turn_over = bool(self._waiting) and time.monotonic() - control.since > SLICE_S
            if not self._ahead_of(control.deadline) and not turn_over:
                return
        self.release(control)
        self.acquire(control)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def _ahead_of(self, deadline: float) -> bool:
        return bool(self._waiting) and self._waiting[0][0] < deadline

    def _withdraw(self, entry: tuple[float, int, threading.Event]) -> bool:
        """Leave the queue (a core handed over meanwhile is passed on); always True."""
        with self._lock:
            if entry in self._waiting:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
                return True
        self.release()
        return True

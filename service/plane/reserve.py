"""The time kept back from the estimators for what follows them (the response, metrics, gRPC),
measured rather than assumed.

After every computed one-row call the servicer reports when its response was built. Two
parts are measured: the *overshoot*, how far past their deadline the estimators ran (a round
planned from a speed that then dropped; it grows with the round, so budgets are measured in
bands), and the *post* time, from the estimators' return to the response (the guard, metrics
and encoding, serialised on one interpreter lock). Both grow with the calls in flight, so they
are kept per load level (calls in flight per core, rounded up) and budget band in bounded
windows, and a call's reserve is the sum of their high quantiles plus an allowance for what the
server cannot see (the transport and the client), never less than the one-call prior. Until a
cell has enough samples of the last HORIZON_S the assumed prior (with its load term) holds.
Admission plans with the same deadline, so when the measured tail leaves too little of a budget
the call is shed on arrival instead of answered late.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

WINDOW = 256  # tails kept per load level and band (bounded: 54 cells x 256 pairs)
HORIZON_S = 30.0  # older tails are forgotten: a refused call measures nothing, so a cell
# closed by a burst of overruns must reopen (to the prior) once the burst has passed
MIN_SAMPLES = 32  # below this a level uses the prior
QUANTILE = 99.0  # the reserve covers this percentile of the measured tails
MAX_LEVEL = 8  # calls in flight per core beyond this share one level
TRANSPORT_S = 0.0015  # unseen by the server: gRPC's send and the client, per call and level
TRANSPORT_SHARE = 0.015  # ... and a share of the budget for clock and scheduling jitter
ROW_S = 0.0002  # the response's size grows with the rows
BANDS_S = (0.01, 0.03, 0.1, 0.3, 1.0)  # budget bands measured apart (seconds)
REFRESH_S, REFRESH_CALLS = 0.25, 8  # a cell's quantiles are recomputed this often at most


def reserve_s(budget_s: float, rows: int) -> float:
    """The assumed reserve for one call alone: metrics, the response and gRPC's two trips
    through Python, about 1.5-2 ms per call here, p99 ~4 ms on a busy machine."""
    return min(0.6 * budget_s, 0.003 + 0.03 * budget_s + ROW_S * rows)


def load_reserve_s(remaining_s: float, in_flight: int, cores: float) -> float:
    """The assumed extra when more explanations run than there are cores: everything after
    the estimators (response, gRPC) then runs proportionally slower too."""
    load = in_flight / max(1.0, cores)
    return max(0.0, min(0.4 * remaining_s, (load - 1) * (0.0025 + 0.02 * remaining_s)))


@dataclass
class Tail:
    """One admitted call's plan (its load level, budget, rows, the estimators' deadline and
    its kind for admission) and when its estimators returned."""

    level: int
    budget_s: float
    rows: int
    stop_at: float
    kind: int = 0
    computed_at: float | None = None

    def observe(self, reserve: Reserve) -> None:
        """The response is built now: report the overshoot and the post time (one-row calls
        only: a larger response's time is the prior's per-row term)."""
        if self.computed_at is not None and self.rows == 1:
            done = self.computed_at
            reserve.observe(self.level, self.budget_s, done - self.stop_at,
                            time.monotonic() - done)


class Reserve:
    """Measured overshoot and post times per load level and budget band, and the reserve
    they imply."""

    def __init__(self, cores: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.cores, self.clock = max(1.0, cores), clock
        cells = (MAX_LEVEL + 1) * (len(BANDS_S) + 1)
        # (time.monotonic(), overshoot s, post s) per cell
        self._tails = [deque[tuple[float, float, float]](maxlen=WINDOW) for _ in range(cells)]
        self._seen = [0] * cells  # observations ever made per cell
        # per cell: (when, observations then, quantiles): recomputed every REFRESH_S or
        # REFRESH_CALLS observations, so a cheap call does not pay for a percentile
        self._cached: dict[int, tuple[float, int, tuple[float, float] | None]] = {}
        self._lock = threading.Lock()

    def level(self, in_flight: int) -> int:
        """Calls in flight per core, rounded up (0: none), capped at MAX_LEVEL."""
        return min(MAX_LEVEL, math.ceil(max(0, in_flight) / self.cores))

    def seconds(self, budget_s: float, rows: int, in_flight: int) -> float:
        """Time to keep back from a call's budget at this load: the measured quantiles of
        overshoot and post time plus the unseen transport (never less than the one-call
        prior, which also covers the client's side), or the prior with its load term while
        too few calls of this load and budget band are measured."""
        prior, level = reserve_s(budget_s, rows), self.level(in_flight)
        measured = self.measured(level, budget_s)
        if measured is None:
            return prior + load_reserve_s(budget_s - prior, in_flight, self.cores)
        over, post = measured
        # the client's side and the transport wait for the same busy cores: more per level
        unseen = TRANSPORT_S * max(1, level) + TRANSPORT_SHARE * budget_s + ROW_S * rows
        return max(prior, unseen + over + post)

    def measured(self, level: int, budget_s: float) -> tuple[float, float] | None:
        """(overshoot, post) quantiles in seconds over this level and budget band's tails of
        the last HORIZON_S, or None below MIN_SAMPLES."""
        k, now = self.cell(level, budget_s), self.clock()
        hit = self._cached.get(k)
        if hit is not None and now - hit[0] < REFRESH_S and self._seen[k] - hit[1] < REFRESH_CALLS:
            return hit[2]
        seen, recent = self._seen[k], self._recent(k)
        value = None
        if len(recent) >= MIN_SAMPLES:
            over, post = np.percentile(np.array(recent)[:, 1:], QUANTILE, axis=0)  # (2,)
            value = (float(over), float(post))
        self._cached[k] = (now, seen, value)
        return value

    def samples(self, level: int, budget_s: float) -> int:
        """Calls measured at this level and budget band within the horizon."""
        return len(self._recent(self.cell(level, budget_s)))

    def observe(self, level: int, budget_s: float, overshoot_s: float, post_s: float) -> None:
        """One call: how far past its deadline its estimators ran, and how long its response
        took after them."""
        if math.isfinite(budget_s) and math.isfinite(overshoot_s) and math.isfinite(post_s):
            k = self.cell(level, budget_s)
            with self._lock:
                self._tails[k].append((self.clock(), max(0.0, overshoot_s),
                                       max(0.0, post_s)))
                self._seen[k] += 1

    def _recent(self, k: int) -> list[tuple[float, float, float]]:
        since = self.clock() - HORIZON_S
        with self._lock:
            return [t for t in self._tails[k] if t[0] >= since]

    @staticmethod
    def cell(level: int, budget_s: float) -> int:
        """The window of a load level and budget band (a round, hence an overshoot, grows
        with the budget; a tiny budget's overshoot must not widen a large one's reserve)."""
        band = bisect.bisect_right(BANDS_S, budget_s)
        return min(max(level, 0), MAX_LEVEL) * (len(BANDS_S) + 1) + band

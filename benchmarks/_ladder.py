"""Error-versus-time curves for Shapley explainers and the time each needs to reach an error.

A curve is a ladder of evaluation counts; at each step every explained row is explained once
and the step records the mean wall time per explanation and the root-mean-square relative error
||phi - phi_ref|| / ||phi_ref|| over the rows. Methods are stepped in turn (interleaved), so a
noisy neighbour slows every method alike.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from explainers.base import Array

Explain = Callable[[Array, int, int], Array]  # (row, evaluation count, seed) -> phi (features,)


@dataclass
class Curve:
    """One method's ladder: evaluation counts tried, seconds per explanation, errors."""

    method: str
    explain: Explain
    ladder: list[int]
    seconds: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    rows_used: list[float] = field(default_factory=list)

    def done(self, floor: float, cap_s: float) -> bool:
        """Stop once the error is below `floor`, a step took longer than `cap_s`, or the
        ladder is exhausted."""
        if len(self.errors) == len(self.ladder):
            return True
        return bool(self.errors) and (self.errors[-1] <= floor or self.seconds[-1] > cap_s)

    def time_to(self, target: float) -> tuple[float, bool]:
        """Seconds per explanation at `target` error, interpolated on log-log axes between the
        two steps around it; beyond the last step, extrapolated with error ~ time^-1/2 (then
        the flag is True)."""
        t, e = np.log(self.seconds), np.log(self.errors)
        goal = math.log(target)
        below = np.flatnonzero(e <= goal)
        if below.size and below[0] > 0:
            i = int(below[0])
            slope = (t[i] - t[i - 1]) / (e[i] - e[i - 1]) if e[i] != e[i - 1] else 0.0
            return float(np.exp(t[i - 1] + (goal - e[i - 1]) * slope)), False
        if below.size:  # already below at the first step: scale down along the -1/2 law
            return float(np.exp(t[0] + 2 * (goal - e[0]))), True
        return float(np.exp(t[-1] - 2 * (goal - e[-1]))), True

    def error_at(self, seconds: float) -> float:
        """Error at a wall time per explanation, interpolated (or extrapolated at -1/2)."""
        t, e = np.log(self.seconds), np.log(self.errors)
        goal = math.log(seconds)
        if goal <= t[0]:
            return float(np.exp(e[0] - 0.5 * (goal - t[0])))
        if goal >= t[-1]:
            return float(np.exp(e[-1] - 0.5 * (goal - t[-1])))
        return float(np.exp(np.interp(goal, t, e)))


def relative_error(phi: Array, ref: Array) -> float:
    return float(np.linalg.norm(phi - ref) / np.linalg.norm(ref))


Clock = Callable[[], float]  # seconds: wall (time.perf_counter) or CPU (time.process_time)


def step(curve: Curve, X: Array, refs: Array, seeds: int,
         clock: Clock = time.perf_counter) -> None:
    """Explain every row at the curve's next evaluation count; record time and error."""
    n = curve.ladder[len(curve.errors)]
    errors, elapsed = [], 0.0
    for seed in range(seeds):
        for x, ref in zip(X, refs, strict=True):
            start = clock()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                phi = curve.explain(x, n, seed)
            elapsed += clock() - start
            errors.append(relative_error(phi, ref))
    curve.seconds.append(elapsed / (seeds * len(X)))
    curve.errors.append(float(np.sqrt(np.mean(np.square(errors)))))


def run_curves(curves: list[Curve], X: Array, refs: Array, seeds: int, floor: float,
               cap_s: float, clock: Clock = time.perf_counter) -> None:
    """Step all curves in turn until each is done."""
    while not all(c.done(floor, cap_s) for c in curves):
        for c in curves:
            if not c.done(floor, cap_s):
                step(c, X, refs, seeds, clock)


def geometric(start: float, stop: float, factor: float = 2.0) -> list[int]:
    """start, start * factor, ... up to stop, as integers."""
    out, v = [], start
    while v <= stop:
        out.append(round(v))
        v *= factor
    return out

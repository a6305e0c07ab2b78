"""Rows of a request explained one after the other, each with an equal share of the time left:
against the stored background (tables), or over each row's groups against its reference rows
(images, text, feature blocks). A row that no longer fits its share ends the request early:
the rows explained are returned and the others are reported as not reached. The first row's
refusal is the request's when it is the method's up-front one (methods check before their first
model call, and a call takes a core only then: it comes on arrival); a call refused later (it
waited for a core, or computed and ran out of time) was admitted and is owed an answer: every
row it could not reach says so."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from explainers.base import Array, Background, Budget, Estimator, Evaluator, Explanation, ModelFn
from explainers.errors import DeadlineExceeded, ResourceExhausted
from explainers.groups import Groups
from explainers.shapley.exact import WALL_PRIOR as EXACT_WALL_PRIOR
from service.models.inputs import Layout
from service.models.repository import LoadedModel
from service.plane.baselines import baseline_rows
from service.plane.methods import batch_explainer
from service.plane.players import Players
from service.plane.scheduler import SLICE_S, Control

CHUNK_BYTES = 32 * 1024 * 1024  # a model call's masked batch at most (large images)
LEARN_MIN_ROWS = 256  # rows a call must have evaluated for its speed to count
LEARN_WEIGHT = 0.2  # how much one call moves the model's measured speed
FACTOR_WEIGHT = 0.5  # ... and a method's wall factor (a late answer must not repeat for long)
RELAX = 0.8  # a refusal moves the refusing method's learned wall factor this much back to prior
MIN_RETRY_S = 0.01  # the least retry hint of a call shed by its method's own check


@dataclass(frozen=True)
class RowJob:
    """What every row of a request shares: the model, the explained function, the method,
    the request's stopping rules and seed, and the deadline."""

    model: LoadedModel
    fn: ModelFn
    estimator: Estimator
    seed: int
    max_evaluations: int
    target_error: float
    deadline: float
    elements: int
    control: Control | None = None  # the call's yield point (service/plane/scheduler)

    @property
    def pause(self) -> Callable[[], None] | None:
        return self.control.pause if self.control is not None else None

    def evaluator(self, rate: float, scheduled: bool = True) -> Evaluator:
        """A fresh counted evaluator, its chunks capped in bytes for large inputs; its model
        calls are yield points unless not `scheduled`."""
        onnx = self.model.onnx
        chunk = max(1, min(onnx.chunk_rows, CHUNK_BYTES // max(1, 8 * self.elements)))
        return Evaluator(self.fn, chunk, rate, dtype=onnx.batch_dtype,
                         pause=self.pause if scheduled else None,
                         wall_factors=onnx.wall_factors, path_major=onnx.has_trees)

    def budget(self, rows_left: int) -> Budget:
        """This row's share of the time left, and the request's caps."""
        now = time.monotonic()
        share = max(self.deadline - now, 0.0) / rows_left
        return Budget(now + share, self.max_evaluations or None, self.target_error or None)

    @property
    def waited_s(self) -> float:
        """Seconds the call has waited for a core so far (a refusal after any is late)."""
        return self.control.waited_s if self.control is not None else 0.0

    def clock(self) -> float:
        """Seconds the call has spent, less its waits for a core: a method's wall time is
        measured on this clock (the waits are other calls' work, which admission counts)."""
        return time.perf_counter() - self.waited_s

    def learn(self, ev: Evaluator, found: Explanation | None = None,
              seconds: float = 0.0) -> float:
        """The model's speed as this row measured it (contention included), folded into the
        model's own figure so the next request plans and is admitted with it; and the wall
        time of the method that answered over its model time (`seconds` for `found`), which
        exact's admission and its own check use."""
        onnx = self.model.onnx
        if ev.evaluations >= LEARN_MIN_ROWS:
            onnx.rows_per_second = (1 - LEARN_WEIGHT) * onnx.rows_per_second \
                + LEARN_WEIGHT * ev.rows_per_second
            if found is not None and seconds > 0:
                factor = seconds / ev.seconds_for(ev.evaluations)
                old = onnx.wall_factors.get(found.method, factor)
                onnx.wall_factors[found.method] = (1 - FACTOR_WEIGHT) * old \
                    + FACTOR_WEIGHT * factor
        return ev.rows_per_second

    def attempt(self, ev: Evaluator, explain: Callable[[Budget], Explanation], rows_left: int,
                first: bool) -> Explanation | None:
        """A row with its equal share; when that share is below the method's minimum, with all
        the time left (finishing rows beats spreading thin). None when even that does not fit
        and earlier rows were explained, or when the refusal came late (after model calls or a
        wait for a core); else the first row's refusal is the request's, made on arrival."""
        before = ev.evaluations
        for share_of in dict.fromkeys((rows_left, 1)):
            try:
                return explain(self.budget(share_of))
            except (ResourceExhausted, DeadlineExceeded) as err:
                late = ev.evaluations > before or self.waited_s > 0
                if share_of == 1 and first and not late:
                    loaded = self.relax() or self.contended
                    if loaded and isinstance(err, ResourceExhausted):
                        self.shed(err)
                    raise
        return None

    def relax(self) -> bool:
        """A refusal on arrival measures nothing: move the method's learned wall factor a
        step back toward its prior, so that one slow outlier cannot close the method for good
        (after ~10 refusals it is tried, and measured, again). Whether the factor was above
        its prior (the refusal then came from the server's learned slowness, not the budget
        alone)."""
        factors, name = self.model.onnx.wall_factors, self.estimator.name
        prior = EXACT_WALL_PRIOR if name == "exact" else 1.0
        if factors.get(name, prior) <= prior:
            return False
        factors[name] = prior + RELAX * (factors[name] - prior)
        return True

    @property
    def contended(self) -> bool:
        """Whether the call was admitted with more calls in flight than cores (its time before
        the method's check, and the learned speeds, then depend on the others)."""
        tail = self.control.tail if self.control is not None else None
        return tail is not None and tail.level > 1

    def shed(self, err: ResourceExhausted) -> None:
        """A refusal on arrival under load (a learned slowness, or more calls than cores) is a
        shed call: a retry hint (once this call's own time would have passed) and counted with
        admission's."""
        err.retry_after_s = max(self.deadline - time.monotonic(), MIN_RETRY_S)
        err.reason = "admission"


def explain_plain(job: RowJob, X: Array, background: Background) -> tuple[Explanation, ...]:
    """One player per feature against the stored background; exact batch methods (tree,
    linear) explain every row in one call."""
    rng = np.random.default_rng(job.seed)
    batch = batch_explainer(job.estimator)
    if batch is not None:
        if brief(job, X, background):  # no core to take: done before a hand-over would be
            return tuple(batch(X, background, job.evaluator(job.model.onnx.rows_per_second,
                                                            scheduled=False)))
        if job.pause is not None:  # tree reads its tables without a model call: a yield point
            job.pause()
        return tuple(batch(X, background, job.evaluator(job.model.onnx.rows_per_second)))
    rate, out = job.model.onnx.rows_per_second, []
    for i, x in enumerate(X):
        ev, start = job.evaluator(rate), job.clock()
        found = job.attempt(ev, lambda b, ev=ev, x=x: job.estimator.explain(  # type: ignore[misc]
            ev, x, background, b, rng), X.shape[0] - i, first=i == 0)
        if found is None:
            break  # the rows done are kept; the rest are reported as not reached
        out.append(found)
        rate = job.learn(ev, found, job.clock() - start)
    return tuple(out)


def brief(job: RowJob, X: Array, background: Background) -> bool:
    """Whether a batch method's whole answer (tree, linear: exact, their time predictable)
    takes less than the scheduler's slice: it then computes without taking a core, as a
    hand-over (a thread woken, or a wait for a holder's next yield point) would cost more than
    the ordering gains; the cheapest calls pay nothing for the scheduler."""
    predict = getattr(job.estimator, "seconds_for", None)
    seconds = predict(X.shape[0], background) if predict is not None \
        else X.shape[0] / max(job.model.onnx.rows_per_second, 1.0)
    return seconds is not None and seconds < SLICE_S


References = Callable[[Array, Evaluator], Background]
"""The reference rows of row x (elements,), with f on them computed by the row's evaluator."""


def explain_grouped(job: RowJob, X: Array, players: Players,
                    references: References) -> tuple[tuple[Explanation, ...], tuple[Groups, ...]]:
    """Each row over its own groups against its own reference rows; also returns the groups."""
    rng = np.random.default_rng(job.seed)
    rate, out, groups = job.model.onnx.rows_per_second, [], []
    for i, x in enumerate(X):
        ev = job.evaluator(rate)
        g = players.groups_for(x)
        ref = references(x, ev)
        start = job.clock()
        found = job.attempt(ev, lambda b, ev=ev, x=x, ref=ref, g=g: job.estimator.explain(  # type: ignore[misc]
            ev, x, ref, b, rng, g), X.shape[0] - i, first=i == 0)
        if found is None:
            break  # as in explain_plain
        out.append(found)
        groups.append(g)
        rate = job.learn(ev, found, job.clock() - start)
    return tuple(out), tuple(groups)


def reference_maker(players: Players, layout: Layout, stored: Background | None
                    ) -> References:
    """Reference rows per the baseline: the stored background as it is; a row built once
    (zeros, constant, mean of the background); or one per explained row (blur, mask)."""
    spec = players.baseline
    if spec.kind == "background":
        assert stored is not None

        def as_stored(x: Array, ev: Evaluator) -> Background:
            return stored
        return as_stored
    shared: list[Background] = []
    data = None if stored is None else stored.data
    weights = None if stored is None else stored.weights

    def build(x: Array, ev: Evaluator) -> Background:
        if shared:
            return shared[0]
        rows = baseline_rows(spec, x, layout, players.modality, data, weights)  # (1, elements)
        found = Background.build(rows, ev(rows.astype(ev.dtype)))
        if not spec.per_row:
            shared.append(found)
        return found
    return build


def maps_of(rows: tuple[Explanation, ...], groups: tuple[Groups, ...]) -> tuple[Array, ...]:
    """Each row's attribution map (outputs, elements): its own (occlusion), else each element
    carrying its group's value."""
    return tuple(e.map if e.map is not None else g.to_map(e.values)
                 for e, g in zip(rows, groups, strict=True))

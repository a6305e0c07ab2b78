"""Activation maximisation: gradient ascent on a model's floating-point input to maximise a class
logit or the mean activation of one channel (axis 1) of a named layer.

Gradients come from the gradient backend (explainers.gradients.backend): a class logit is the
output's column on the "auto" scale (the input of a final Softmax/Sigmoid when there is one,
else the output itself); a channel's mean is a (rows, 1) objective appended to a copy of the
graph (Flatten the layer, MatMul by a vector holding 1/positions on the channel's elements).
Each step is Adam on objective - l2/2 ||x||^2 (decay towards 0) with the gradient taken at
the input rolled by a random shift of up to `jitter` positions along its spatial axes and
rolled back, a Gaussian blur of the spatial axes every `blur_every` steps, and clipping to
the input's range. Spatial axes are a float input's per-row axes after the first (channel);
a tabular input has none, so jitter and blur leave it alone. Integer inputs are held at the
start row's values; a model with only token inputs is refused (its ascent would live in
embedding space, not in an input one could return). Anytime: steps run while the next one
fits the budget (the slowest step so far predicts it), at least one; `pause`, called before
each step, lets a caller's scheduler hold the ascent back or stop it (as Evaluator.pause).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from scipy import ndimage

from explainers.base import SAFETY, Array, Budget
from explainers.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from explainers.gradients.backend import Feeds, GradientModel, Variable
from explainers.gradients.graphs import copy
from explainers.layers.graph import TensorInfo, check_names, tensors

OBJECTIVE = "sidelight_objective"  # the channel objective's output in the augmented graph
KINDS = ("logit", "channel")
ADAM = (0.9, 0.999, 1e-8)  # beta1, beta2, epsilon


@dataclass(frozen=True)
class Objective:
    """What is maximised: a column of an output ("logit"), or a channel's mean activation at
    a layer ("channel")."""

    kind: str
    tensor: str  # the output, or the layer
    index: int  # the column, or the channel


@dataclass(frozen=True)
class Settings:
    steps: int = 128  # at most
    learning_rate: float = 0.05  # Adam's step, as a fraction of the input's range
    l2: float = 1e-3  # decay weight
    jitter: int = 1  # largest roll, in positions
    blur_every: int = 4  # steps between blurs; 0 = never
    blur_sigma: float = 0.5  # in positions


@dataclass(frozen=True)
class Found:
    """The input found and what it reached."""

    input: Array  # (elements,) float64: the row after the last step
    activation: float  # the objective at `input`
    start_activation: float  # the objective at the start row
    steps: int
    budget_exhausted: bool  # stopped by the budget before `settings.steps`
    trace: Array  # (steps,) the objective at each step's jittered point
    notes: tuple[str, ...]


def gradient_model(model: onnx.ModelProto, feeds: Feeds, elements: int,
                   objective: Objective, infos: Sequence[TensorInfo] | None = None
                   ) -> GradientModel:
    """The backend's model of the objective's gradient with respect to the inputs (build once
    per model and objective; `infos` saves listing the tensors again)."""
    if objective.kind not in KINDS:
        raise InvalidArgument(f"objective: {objective.kind!r}; one of {', '.join(KINDS)}")
    if objective.kind == "logit":
        gm = GradientModel.build(model, feeds, elements, objective.tensor, [objective.index],
                                 "auto", batches=(1,))
    else:
        augmented = channel_objective(model, objective.tensor, objective.index, infos)
        gm = GradientModel.build(augmented, feeds, elements, OBJECTIVE, [0], "identity",
                                 batches=(1,))
    if any(v.kind != "input" for v in gm.variables):
        raise FailedPrecondition("maximize: the model has no floating-point input to ascend "
                                 "on (token ids reach it through an embedding lookup)")
    return gm


def channel_objective(model: onnx.ModelProto, layer: str, channel: int,
                      infos: Sequence[TensorInfo] | None = None) -> onnx.ModelProto:
    """A copy with one more output, OBJECTIVE (rows, 1): the mean of `layer`'s channel
    `channel` (axis 1) over its other axes."""
    check_names(model, [layer], "layer")
    info = next(i for i in (tensors(model) if infos is None else infos) if i.name == layer)
    shape = info.shape
    if shape is None or info.batch_axis != 0 or len(shape) < 2 or min(shape[1:]) < 0 or \
            not info.dtype.startswith("float"):
        raise FailedPrecondition(f"layer: {layer!r} needs a static float (rows, channels, ...)"
                                 f" shape; shape inference gives {shape} ({info.dtype})")
    if not 0 <= channel < shape[1]:
        raise InvalidArgument(f"channel: {channel} outside the {shape[1]} channels of {layer!r}")
    per = math.prod(shape[2:])
    weights = np.zeros((math.prod(shape[1:]), 1), info.dtype)  # (channels * per, 1)
    weights[channel * per:(channel + 1) * per] = 1 / per
    return _with_objective(model, layer, weights)


def _with_objective(model: onnx.ModelProto, layer: str, weights: Array) -> onnx.ModelProto:
    """A copy with OBJECTIVE = Flatten(layer) @ weights as one more output."""
    out = copy(model)
    flat, vector = f"{OBJECTIVE}__flat", f"{OBJECTIVE}__weights"
    out.graph.node.extend([helper.make_node("Flatten", [layer], [flat], axis=1),
                           helper.make_node("MatMul", [flat, vector], [OBJECTIVE])])
    out.graph.initializer.append(numpy_helper.from_array(weights, vector))
    elem = helper.np_dtype_to_tensor_dtype(weights.dtype)
    out.graph.output.append(helper.make_tensor_value_info(OBJECTIVE, elem, ["N", 1]))
    return out


def input_range(background: Array) -> tuple[float, float]:
    """The clipping range from background rows (rows, elements): their smallest and largest
    value (one range for every element: a per-pixel range would pin always-dark pixels)."""
    return float(np.min(background)), float(np.max(background))


def maximize(gm: GradientModel, objective: Objective, start: Array, low: float | Array,
             high: float | Array, budget: Budget, rng: np.random.Generator,
             settings: Settings = Settings(),
             pause: Callable[[], None] | None = None) -> Found:
    """Gradient ascent on `gm` (from `gradient_model(..., objective)`) from `start`
    (elements,) within [low, high] (scalars or (elements,)); see the module docstring."""
    x0 = _checked(gm, start, settings)
    lo, hi = _bounds(gm, low, high)
    _require(gm, budget)
    ascent = _Ascent(gm, lo, hi, settings, rng, pause)
    begin = _finite_start(float(gm.value(x0[None])[0, 0]))
    x, trace, exhausted = ascent.run(_clipped(gm, x0, lo, hi), budget)
    end = float(gm.value(x[None])[0, 0])
    if not math.isfinite(end) and trace:  # the last step's row was not evaluated before
        ascent.stopped(len(trace))
        x, trace = ascent.previous, trace[:-1]
        end = float(gm.value(x[None])[0, 0])
    return Found(x, end, begin, len(trace), exhausted, np.asarray(trace),
                 (describe(objective, gm), *gm.notes[1:], *ascent.notes))


def _finite_start(value: float) -> float:
    """The objective at the start; InvalidArgument when it is inf/NaN (the model overflows
    there: no step could be measured against it)."""
    if not math.isfinite(value):
        raise InvalidArgument(f"start: the objective is {value} at the start row: a value "
                              "overflows the model's arithmetic there; start elsewhere")
    return value


def describe(objective: Objective, gm: GradientModel) -> str:
    """What was maximised, in words (a logit's scale as the backend resolved it)."""
    if objective.kind == "channel":
        return f"maximised the mean activation of channel {objective.index} of " \
            f"{objective.tensor!r}"
    return f"maximised column {objective.index}: {gm.target.note}"


def _checked(gm: GradientModel, start: Array, settings: Settings) -> Array:
    """The start as a float64 row; InvalidArgument for a bad row or settings."""
    x = np.asarray(start, np.float64)
    if x.shape != (gm.elements,) or not np.all(np.isfinite(x)):
        raise InvalidArgument(f"start: one finite row of {gm.elements} elements, got shape "
                              f"{list(x.shape)}")
    if settings.steps < 1 or settings.learning_rate <= 0 or settings.l2 < 0 or \
            settings.jitter < 0 or settings.blur_every < 0 or settings.blur_sigma < 0:
        raise InvalidArgument("settings: steps >= 1, learning_rate > 0 and l2, jitter, "
                              "blur_every, blur_sigma >= 0")
    return x


def _bounds(gm: GradientModel, low: float | Array, high: float | Array) -> tuple[Array, Array]:
    """(elements,) bounds; InvalidArgument unless low < high everywhere with a finite width
    (the step is a share of it)."""
    lo = np.broadcast_to(np.asarray(low, np.float64), (gm.elements,))
    hi = np.broadcast_to(np.asarray(high, np.float64), (gm.elements,))
    with np.errstate(over="ignore"):
        width = hi - lo
    if not np.all(lo < hi) or not np.all(np.isfinite(width)):
        raise InvalidArgument("range: needs low < high for every element, high - low finite")
    return lo, hi


def _require(gm: GradientModel, budget: Budget) -> None:
    """RESOURCE_EXHAUSTED when two forward rows and one gradient row cannot fit."""
    seconds = 3 * gm.seconds_per_row
    if (budget.max_evaluations is not None and budget.max_evaluations < 3) or \
            seconds > SAFETY * budget.remaining():
        raise ResourceExhausted(f"budget_ms: too small for activation maximisation: one step "
                                f"takes about {seconds * 1e3:.2f} ms")


def _clipped(gm: GradientModel, x: Array, lo: Array, hi: Array) -> Array:
    """x with the float inputs' elements clipped to the range (integer ones untouched)."""
    out = x.copy()
    for v in gm.variables:
        out[v.elements] = np.clip(x[v.elements], lo[v.elements], hi[v.elements])
    return out


class _Ascent:
    """Adam steps with jitter, blur and clipping; one per request."""

    def __init__(self, gm: GradientModel, lo: Array, hi: Array, settings: Settings,
                 rng: np.random.Generator, pause: Callable[[], None] | None = None) -> None:
        self.gm, self.lo, self.hi, self.s, self.rng = gm, lo, hi, settings, rng
        self.pause = pause
        self.rate = settings.learning_rate * (hi - lo)  # (elements,)
        self.m = np.zeros(gm.elements)  # Adam's first moment
        self.v = np.zeros(gm.elements)  # Adam's second moment
        self.free = np.zeros(gm.elements)  # 1 on the float inputs' elements, 0 elsewhere
        for v in gm.variables:
            self.free[v.elements] = 1
        self.notes: list[str] = []
        self.previous = np.zeros(gm.elements)  # run() sets it: the row before the last step

    def run(self, x: Array, budget: Budget) -> tuple[Array, list[float], bool]:
        """Steps until settings.steps or the budget; the row, the trace and whether the
        budget stopped it. When the model's arithmetic overflows (a step's objective or row
        is inf/NaN) the ascent ends at the last row before it, with a note."""
        trace: list[float] = []
        slowest = 0.0
        self.previous = x  # the row before the last step taken
        while len(trace) < self.s.steps:
            if trace and not self._fits(budget, slowest, len(trace)):
                return x, trace, True
            if self.pause is not None:
                self.pause()
            began = time.perf_counter()
            with np.errstate(all="ignore"):
                stepped, value = self._step(x, len(trace) + 1)
            if not (math.isfinite(value) and np.all(np.isfinite(stepped))):
                self.stopped(len(trace) + 1)
                if math.isfinite(value) or not trace:
                    return x, trace, False
                return self.previous, trace[:-1], False  # x is where it overflows
            self.previous, x = x, stepped
            trace.append(value)
            slowest = max(slowest, time.perf_counter() - began)
        return x, trace, False

    def stopped(self, step: int) -> None:
        """Note that step `step` reached inf/NaN."""
        self.notes.append(f"stopped at step {step}: the objective or the row reached inf/NaN "
                          "(the model's arithmetic overflows there); the answer is the last "
                          "row where it was finite")

    def _fits(self, budget: Budget, slowest: float, steps: int) -> bool:
        """One more step and the final forward row fit the time and evaluation budget."""
        used = 1 + steps  # the start's forward row and a gradient row per step
        capped = budget.max_evaluations is not None and used + 2 > budget.max_evaluations
        return not capped and slowest + self.gm.seconds_per_row < SAFETY * budget.remaining()

    def _step(self, x: Array, t: int) -> tuple[Array, float]:
        """One Adam step (t from 1): the new row and the objective at the jittered point."""
        shifts = self._shifts()
        value, grad = self.gm.value_and_grad(_rolled(self.gm, x, shifts)[None])
        g = _rolled(self.gm, self.gm.to_elements(grad[0])[0], shifts, back=True)  # (elements,)
        g = g - self.s.l2 * x * self.free
        beta1, beta2, eps = ADAM
        self.m = beta1 * self.m + (1 - beta1) * g
        self.v = beta2 * self.v + (1 - beta2) * g * g
        step = self.m / (1 - beta1**t) / (np.sqrt(self.v / (1 - beta2**t)) + eps)
        x = x + self.rate * step * self.free
        if self.s.blur_every and t % self.s.blur_every == 0:
            x = _blurred(self.gm, x, self.s.blur_sigma)
        return _clipped(self.gm, x, self.lo, self.hi), float(value[0, 0])

    def _shifts(self) -> list[tuple[int, ...]]:
        """A random roll per variable along its spatial axes."""
        j = self.s.jitter
        return [tuple(int(s) for s in self.rng.integers(-j, j + 1, size=_spatial(v)))
                for v in self.gm.variables]


def _spatial(v: Variable) -> int:
    """The variable's spatial axes: its per-row axes after the first (none for a vector)."""
    return max(0, len(v.shape) - 1)


def _rolled(gm: GradientModel, x: Array, shifts: Sequence[tuple[int, ...]],
            back: bool = False) -> Array:
    """x with each variable's elements rolled along its spatial axes (undone with back)."""
    out = x.copy()
    for v, shift in zip(gm.variables, shifts, strict=True):
        if any(shift):
            axes = tuple(range(1, len(v.shape)))
            moved = np.roll(x[v.elements].reshape(v.shape), [-s if back else s for s in shift],
                            axis=axes)
            out[v.elements] = moved.reshape(-1)
    return out


def _blurred(gm: GradientModel, x: Array, sigma: float) -> Array:
    """x with each variable blurred along its spatial axes (Gaussian, reflected edges)."""
    out = x.copy()
    for v in gm.variables:
        if _spatial(v) and sigma > 0:
            image = x[v.elements].reshape(v.shape)
            out[v.elements] = ndimage.gaussian_filter(image, [0, *[sigma] * _spatial(v)],
                                                      mode="reflect").reshape(-1)
    return out

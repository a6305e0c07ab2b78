"""The Layers service's decisions: which model, which rows, which tensors, how long, and the
caches of what the layer algorithms (explainers/layers) build per model. No gRPC here.

Every call is counted in flight by the data plane (shed while stopping or past max_in_flight,
cancelled when the server stops), admitted on the model of the work and computed while holding
a core, earliest deadline first, like an explanation; its outcome and latency are recorded
with the method label `layers.<call>`. Inputs are validated as Explain validates them
(plane/requests.assemble). What is built per model is cached in byte-bounded LRUs sharing
CACHE_SHARE of SIDELIGHT_MEMORY_LIMIT_BYTES: tensor lists and weight statistics per model file
(sha256), exposed copies per (file, tensors, input shapes), attention probes per (file, input
shapes), and activation-maximisation gradient graphs per (file, objective, input shapes).
Every answer is checked before it leaves: a value that is not finite (the rows overflow the
model's arithmetic) refuses the call with a status naming the row and tensor, never OK.
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from explainers.base import Array, Budget
from explainers.errors import FailedPrecondition, InvalidArgument, SidelightError, quoted
from explainers.gradients.backend import GradientModel
from explainers.gradients.graphs import last_spatial_conv
from explainers.layers.activations import MAX_BYTES, Activation, activations
from explainers.layers.attention import AttentionLayer, AttentionMaps, AttentionProbe, find
from explainers.layers.graph import MAX_NAMES, Exposed, TensorInfo, tensors
from explainers.layers.maximize import (
    KINDS,
    Found,
    Objective,
    Settings,
    gradient_model,
    input_range,
)
from explainers.layers.maximize import maximize as ascend
from explainers.layers.weights import WeightStats, weights
from explainers.memory import ByteLru
from service.models.inputs import NUMPY, Layout
from service.models.repository import LoadedModel
from service.monitoring.metrics import UNKNOWN
from service.plane.admission import FIXED_S
from service.plane.dataplane import DataPlane
from service.plane.requests import ExplainQuery, assemble
from service.plane.reserve import reserve_s
from service.plane.scheduler import Control
from service.plane.targets import resolve_target
from service.store.backgrounds import DEFAULT_NAME

T = TypeVar("T")
Inputs = tuple[tuple[str, Array], ...]  # (name, tensor) per model input, batch first
Shapes = tuple[tuple[int, ...], ...]  # per model input, its per-row shape
CACHE_SHARE = 1 / 64  # of SIDELIGHT_MEMORY_LIMIT_BYTES, for every cache of this file
RUN_FACTOR = 8  # the tensors one call computes may take this many times its answer's limit
DEFAULT_K = 8  # top_k's channels when the request says 0
MAX_STEPS = 4096  # activation maximisation's step cap
GRADIENT_ROWS = 10  # a maximisation's least work in forward rows: two rows and one gradient
SUGGESTED = 5  # tensor names a refusal lists
MAX_BLUR_SIGMA = 100.0  # positions: a wider Gaussian only averages the whole input
FLOATS = ("FP16", "FP32", "FP64")  # the inputs an ascent moves


@dataclass(frozen=True)
class LayersQuery:
    """GetActivations / GetAttention in domain terms (`layers`, `k`: activations only)."""

    model: str
    inputs: Inputs
    version: str = ""
    layers: tuple[str, ...] = ()
    reduction: str = ""
    k: int = 0
    deadline_s: float | None = None  # time left on the caller's clock


@dataclass(frozen=True)
class MaximizeQuery:
    """A Maximize request in domain terms (0 / "" = the default; see layers.proto)."""

    model: str
    version: str = ""
    objective: str = ""
    index: int = 0
    output: str = ""
    layer: str = ""
    start: Inputs = ()
    low: float = 0.0
    high: float = 0.0
    budget_ms: float = 0.0
    deadline_s: float | None = None
    seed: int = 0
    steps: int = 0
    learning_rate: float = 0.0
    l2: float = 0.0
    jitter: int = 0
    blur_every: int = 0
    blur_sigma: float = 0.0
    background: str = ""


@dataclass(frozen=True)
class Listing:
    """A model's inspectable tensors, its attention layers (or why none) and Grad-CAM's
    default layer ("" when it has no spatial convolution)."""

    model: str
    version: str
    tensors: tuple[TensorInfo, ...]
    attention: tuple[AttentionLayer, ...]
    attention_unavailable: str
    gradcam_layer: str


@dataclass(frozen=True)
class Activations:
    model: str
    version: str
    rows: int  # the request's rows
    tensors: tuple[Activation, ...]  # in the order the request named them
    elapsed_ms: float


@dataclass(frozen=True)
class Attention:
    model: str
    version: str
    rows: int
    maps: AttentionMaps
    elapsed_ms: float


@dataclass(frozen=True)
class Weights:
    model: str
    version: str
    weights: tuple[WeightStats, ...]


@dataclass(frozen=True)
class Maximized:
    """The input found (per model input, batch 1, in the input's dtype) and its cost."""

    model: str
    version: str
    inputs: Inputs
    found: Found
    evaluations: int  # the start's and the end's forward rows, one gradient row per step
    elapsed_ms: float
    budget_ms: float
    budget_source: str


@dataclass(frozen=True)
class Call:
    """One admitted call: when it arrived, its budget and its control (yield point)."""

    start: float
    budget_s: float
    source: str
    control: Control


class LayerPlane:
    """The Layers service over a data plane (its models, settings, metrics, admission and
    cores); `max_bytes` bounds the values one activation or attention call returns."""

    def __init__(self, plane: DataPlane, cache_bytes: int | None = None,
                 max_bytes: int = MAX_BYTES) -> None:
        self.plane, self.settings = plane, plane.settings
        self.max_bytes, self.max_run_bytes = max_bytes, RUN_FACTOR * max_bytes
        total = int(CACHE_SHARE * self.settings.memory_limit_bytes) if cache_bytes is None \
            else cache_bytes
        self._tensors: ByteLru[tuple[str, Shapes | None], tuple[TensorInfo, ...]] = \
            ByteLru(total // 16)
        self._listings: ByteLru[str, Listing] = ByteLru(total // 16)
        self._weights: ByteLru[str, tuple[WeightStats, ...]] = ByteLru(total // 8)
        self._exposed: ByteLru[tuple[str, tuple[str, ...], Shapes], Exposed] = \
            ByteLru(3 * total // 8, size=session_bytes)
        self._probes: ByteLru[tuple[str, Shapes], AttentionProbe] = \
            ByteLru(total // 8, size=session_bytes)
        self._gradients: ByteLru[Hashable, GradientModel] = \
            ByteLru(total // 4, size=lambda gm: gm.nbytes)

    # --- the calls -----------------------------------------------------------------------
    def list_layers(self, model: str, version: str = "", deadline_s: float | None = None,
                    control: Control | None = None) -> Listing:
        """The model's tensors, attention layers and Grad-CAM layer (cached per file)."""
        return self._serve("layers.list", ExplainQuery(model, (), version,
                                                       deadline_s=deadline_s),
                           control, 0, lambda m, _: self.listing(m))

    def weights(self, model: str, version: str = "", names: tuple[str, ...] = (),
                deadline_s: float | None = None, control: Control | None = None) -> Weights:
        """Statistics of every weight, or of the named ones (names or aliases)."""
        def work(m: LoadedModel, _: Call) -> Weights:
            found = self._weights.get_or_build(m.sha256, lambda: tuple(weights(m.onnx.proto)))
            return Weights(m.name, m.version, pick_weights(found, names))
        return self._serve("layers.weights", ExplainQuery(model, (), version,
                                                          deadline_s=deadline_s),
                           control, 0, work)

    def activations(self, q: LayersQuery, control: Control | None = None) -> Activations:
        """The named tensors' values for the request's rows, reduced as asked."""
        def work(m: LoadedModel, call: Call) -> Activations:
            X, layout = assemble(m, q.inputs, self.settings.max_rows_per_request)
            names = self.check_layers(m, q.layers, "layers")
            key = (m.sha256, names, layout.shapes)
            exposed = self._exposed.get_or_build(key, lambda: Exposed(
                m.onnx.proto, names, self.infos(m, layout)))
            call.control.pause()
            found = activations(exposed, layout.feeds(X), q.reduction or "none",
                                q.k or DEFAULT_K, self.max_bytes, self.max_run_bytes)
            for a in found:
                finite_activation(a)
            return Activations(m.name, m.version, X.shape[0], tuple(found), elapsed(call))
        return self._serve("layers.activations", _explain_query(q), control,
                           _rows(q.inputs), work)

    def attention(self, q: LayersQuery, control: Control | None = None) -> Attention:
        """Every attention layer's probabilities for the request's rows."""
        def work(m: LoadedModel, call: Call) -> Attention:
            X, layout = assemble(m, q.inputs, self.settings.max_rows_per_request)
            probe = self._probes.get_or_build((m.sha256, layout.shapes), lambda: AttentionProbe(
                m.onnx.proto, self.infos(m, layout)))
            call.control.pause()
            maps = probe.run(layout.feeds(X), q.reduction or "none", self.max_bytes,
                             self.max_run_bytes)
            for layer, values in zip(maps.layers, maps.probabilities, strict=True):
                finite_rows(values, f"attention layer {quoted(layer.node)}")
            return Attention(m.name, m.version, X.shape[0], maps, elapsed(call))
        return self._serve("layers.attention", _explain_query(q), control, _rows(q.inputs),
                           work)

    def maximize(self, q: MaximizeQuery, control: Control | None = None) -> Maximized:
        """Gradient ascent on the model's input under the budget, from the request's seed."""
        budget = ExplainQuery(q.model, (), q.version, budget_ms=q.budget_ms,
                              deadline_s=q.deadline_s)
        return self._serve("layers.maximize", budget, control, GRADIENT_ROWS,
                           lambda m, call: self._maximize(q, m, call))

    # --- admission, scheduling and metrics --------------------------------------------------
    def _serve(self, method: str, q: ExplainQuery, control: Control | None, rows: int,
               work: Callable[[LoadedModel, Call], T]) -> T:
        """Run work as an admitted call holding a core; outcome and latency recorded."""
        control = control or Control(math.inf)
        start, cpu = control.arrived, time.thread_time()
        label = q.model if q.model in self.plane.repo.entries else UNKNOWN
        code = "INTERNAL"
        try:
            with self.plane.in_flight(control):
                out = self._admitted(q, start, control, rows, work)
            code = "OK"
            return out
        except SidelightError as err:
            code = err.code
            raise
        finally:
            self.plane.metrics.record_call(label, method, code, time.monotonic() - start,
                                           time.thread_time() - cpu)

    def _admitted(self, q: ExplainQuery, start: float, control: Control, rows: int,
                  work: Callable[[LoadedModel, Call], T]) -> T:
        """Resolve the model and the budget, pass admission, compute while holding a core."""
        budget_s, source = self.plane.resolve_budget(q, start)
        model = self.plane.repo.get(q.model, q.version)
        control.deadline, control.cores = start + budget_s, self.plane.cores
        least = FIXED_S + rows / max(model.onnx.rows_per_second, 1.0)
        try:
            ticket = self.plane.admission.admit(control.deadline, least, control)
        except SidelightError:
            self.plane.metrics.rejected.labels("admission").inc()
            raise
        try:
            with self.plane.cores.held(control):
                return work(model, Call(start, budget_s, source, control))
        finally:
            self.plane.admission.done(ticket)

    # --- what is built per model ----------------------------------------------------------
    def listing(self, m: LoadedModel) -> Listing:
        """The tensor list, attention layers and Grad-CAM layer of a model file (cached)."""
        def build() -> Listing:
            infos = self.infos(m, None)
            try:
                found, why = tuple(find(m.onnx.proto, infos)), ""
            except FailedPrecondition as err:
                found, why = (), str(err)
            return Listing(m.name, m.version, infos, found, why,
                           last_spatial_conv(m.onnx.proto) or "")
        listed = self._listings.get_or_build(m.sha256, build)  # one file may serve two names
        return replace(listed, model=m.name, version=m.version)

    def infos(self, m: LoadedModel, layout: Layout | None) -> tuple[TensorInfo, ...]:
        """The tensors with the request's input shapes pinned (None: as the graph declares)."""
        shapes = None if layout is None else layout.shapes
        pinned = None if layout is None else {s.name: shape for s, shape in
                                              zip(layout.specs, layout.shapes, strict=True)}
        return self._tensors.get_or_build((m.sha256, shapes),
                                          lambda: tuple(tensors(m.onnx.proto, pinned)))

    def check_layers(self, m: LoadedModel, names: tuple[str, ...] | list[str],
                     field: str) -> tuple[str, ...]:
        """The names once each; INVALID_ARGUMENT naming the field and a few tensors that
        exist for a name that is not a listed tensor."""
        if not names:
            raise InvalidArgument(f"{field}: name at least one tensor; see ListLayers")
        unique = tuple(dict.fromkeys(names))
        if len(unique) > MAX_NAMES:
            raise InvalidArgument(f"{field}: {len(unique)} tensors; at most {MAX_NAMES} at once")
        known = [i.name for i in self.infos(m, None)]
        listed = set(known)
        for name in unique:
            if name not in listed:
                raise InvalidArgument(unknown_tensor(m, name, known, field))
        return unique

    # --- activation maximisation ------------------------------------------------------------
    def _maximize(self, q: MaximizeQuery, m: LoadedModel, call: Call) -> Maximized:
        """Build (or reuse) the objective's gradient graph, find the start and the range,
        ascend until the steps or the budget run out."""
        objective = self._objective(q, m)
        settings = ascent_settings(q)
        start, layout = self._start(q, m)
        began = time.monotonic()
        key = (m.sha256, objective, layout.shapes)
        gm = self._gradients.get_or_build(key, lambda: gradient_model(
            m.onnx.proto, layout.feeds, layout.elements, objective, self.infos(m, layout)))
        built_s = time.monotonic() - began
        x0, low, high = self._origin(q, m, start, layout)
        found = ascend(gm, objective, x0, low, high,
                       Budget(self._ascent_deadline(q, call, built_s)),
                       np.random.default_rng(q.seed), settings, call.control.pause)
        parts = layout.split(found.input[None])  # per input (1, *shape)
        inputs: Inputs = tuple((spec.name, np.asarray(part, NUMPY[spec.datatype]))
                               for spec, part in zip(layout.specs, parts, strict=True))
        finite_found(found, inputs)
        return Maximized(m.name, m.version, inputs, found, 2 + found.steps, elapsed(call),
                         1e3 * call.budget_s, call.source)

    def _objective(self, q: MaximizeQuery, m: LoadedModel) -> Objective:
        """The request's objective ("" = logit), its output or layer and index checked."""
        kind = q.objective or "logit"
        if kind not in KINDS:
            raise InvalidArgument(f"objective: {quoted(kind)}; one of {', '.join(KINDS)}")
        if kind == "logit" and q.layer:
            raise InvalidArgument("layer: only the channel objective reads a layer")
        if kind == "channel" and q.output:
            raise InvalidArgument("output: the channel objective reads `layer`, not an output")
        if q.index < 0:
            raise InvalidArgument(f"index: {q.index} is negative")
        if kind == "channel":
            layer, = self.check_layers(m, [q.layer] if q.layer else [], "layer")
            return Objective("channel", layer, q.index)
        return Objective("logit", logit_output(m, q.output, q.index), q.index)

    def _start(self, q: MaximizeQuery, m: LoadedModel) -> tuple[Array | None, Layout]:
        """The request's start row (elements,) and its layout, or None and the model's."""
        if not q.start:
            return None, m.onnx.layout
        rows = {a.shape[0] if a.ndim else 0 for _, a in q.start}
        if rows != {1}:
            raise InvalidArgument(f"start: one row (batch 1) per model input; got batch "
                                  f"sizes {sorted(rows)}")
        try:
            X, layout = assemble(m, q.start, 1)
        except InvalidArgument as err:  # assemble names the inputs field
            raise InvalidArgument(renamed(str(err), "inputs", "start")) from None
        return X[0], layout

    def _origin(self, q: MaximizeQuery, m: LoadedModel, start: Array | None,
                layout: Layout) -> tuple[Array, float, float]:
        """Where the ascent starts (elements,) and the range it stays in: the request's, else
        the background's mean row and its smallest and largest value."""
        given = q.low != 0 or q.high != 0
        if start is None or not given:
            rows = self._background_rows(m, q.background, layout)  # (rows, elements)
            start = rows.mean(axis=0) if start is None else start
            low, high = (q.low, q.high) if given else input_range(rows)
        else:
            low, high = q.low, q.high
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise InvalidArgument(f"low, high: need finite low < high, got {low} and {high}")
        within_datatypes(low, high, layout)
        return start, low, high

    def _background_rows(self, m: LoadedModel, name: str, layout: Layout) -> Array:
        """The background's rows (rows, elements): the start's mean and the range."""
        _, found = self.plane.background(m, name or DEFAULT_NAME, resolve_target(m, "", (), ""))
        if found.data.shape[1] != layout.elements:
            raise FailedPrecondition(f"background: {found.data.shape[1]} elements per row; the "
                                     f"start has {layout.elements}: give low and high")
        return found.data

    def _ascent_deadline(self, q: MaximizeQuery, call: Call, built_s: float) -> float:
        """The budget less the response's reserve; a graph built for this call (once per
        model and objective) is not counted, within the caller's deadline."""
        end = call.start + call.budget_s + built_s
        if q.deadline_s is not None and built_s > 0:
            latest, _ = self.plane.resolve_budget(ExplainQuery(
                q.model, (), q.version, deadline_s=q.deadline_s), call.start)
            end = min(end, call.start + latest)
        return end - reserve_s(call.budget_s, 1)


def within_datatypes(low: float, high: float, layout: Layout) -> None:
    """INVALID_ARGUMENT when the range leaves a float input's datatype (the input found would
    hold inf) or its width overflows (the step is a share of it)."""
    for spec in layout.specs:
        if spec.datatype in FLOATS:
            largest = float(np.finfo(NUMPY[spec.datatype]).max)
            if max(abs(low), abs(high)) > largest:
                raise InvalidArgument(f"low, high: {low} and {high} leave the finite values of "
                                      f"input {spec.name!r} ({spec.datatype}, |x| <= "
                                      f"{largest:.4g})")
    if not math.isfinite(high - low):
        raise InvalidArgument(f"low, high: the range from {low} to {high} is wider than a "
                              "float64 holds")


def finite_rows(values: Array, what: str, per_row: bool = True) -> None:
    """INVALID_ARGUMENT naming the first row whose values are inf/NaN: those rows overflow
    the model's arithmetic (an answer is never OK with a non-finite number)."""
    if values.dtype.kind not in "fc" or np.all(np.isfinite(values)):
        return
    by_row = values.reshape(values.shape[0], -1) if per_row and values.ndim else \
        values.reshape(1, -1)  # (rows, elements)
    row = int(np.argmax(~np.all(np.isfinite(by_row), axis=1)))
    where = f"row {row}" if per_row else "these rows"
    raise InvalidArgument(f"inputs: {where}: {what} is inf/NaN there: a value overflows the "
                          f"model's {values.dtype} arithmetic or the model produces inf/NaN")


def finite_activation(a: Activation) -> None:
    """The tensor's values and statistics are finite (see finite_rows)."""
    what = f"tensor {quoted(a.name)}"
    finite_rows(a.values, what, a.per_row)
    s = a.summary
    stats = [s.mean, s.std, s.min, s.max, s.zeros]  # (rows,) each
    if s.channel_mean is not None:
        stats.append(s.channel_mean.reshape(s.channel_mean.shape[0], -1).mean(axis=1))
    finite_rows(np.stack(stats, axis=1), f"the statistics of {what}", a.per_row)


def finite_found(found: Found, inputs: Inputs) -> None:
    """The input found, the objective and its trace are finite; else FAILED_PRECONDITION
    (the ascent stops before a non-finite step: this is the last guard)."""
    numbers = [found.activation, found.start_activation, *found.trace.tolist()]
    if np.all(np.isfinite(numbers)) and all(np.all(np.isfinite(v)) for _, v in inputs
                                            if v.dtype.kind == "f"):
        return
    raise FailedPrecondition("maximize: the ascent reached inf/NaN (the model's arithmetic "
                             "overflows in this range); narrow low and high or start elsewhere")


def _explain_query(q: LayersQuery) -> ExplainQuery:
    """What budget resolution reads of a layers query (the model's default budget applies)."""
    return ExplainQuery(q.model, (), q.version, deadline_s=q.deadline_s)


def _rows(inputs: Inputs) -> int:
    """The request's rows as sent (admission's estimate; assemble checks them)."""
    return int(inputs[0][1].shape[0]) if inputs and inputs[0][1].ndim else 0


def elapsed(call: Call) -> float:
    """Milliseconds since the call arrived."""
    return 1e3 * (time.monotonic() - call.start)


def session_bytes(built: Exposed | AttentionProbe) -> int:
    """A graph copy and its session: the session holds its own copy of the weights."""
    return 2 * built.nbytes


def logit_output(m: LoadedModel, output: str, index: int) -> str:
    """The output whose column `index` is maximised ("" = the model's), checked."""
    output = output or m.output
    outputs = [o.name for o in m.onnx.outputs]
    if output not in outputs:
        raise InvalidArgument(f"output: model has no output {quoted(output)}; outputs: "
                              f"{', '.join(outputs)}")
    columns = m.onnx.output_columns(output)
    if index >= columns:
        raise InvalidArgument(f"index: column {index} outside the {columns} column(s) of "
                              f"{output!r}")
    return output


def unknown_tensor(m: LoadedModel, name: str, known: list[str], field: str) -> str:
    """Why a name is refused, with the tensors the caller may have meant."""
    start = f"{field}: model {m.name!r} has no tensor {quoted(name)}"
    if any(i.name == name for i in m.onnx.proto.graph.initializer):
        return f"{start}; it is a weight: see GetWeights"
    inside = [n for n in known if name.lower() in n.lower()]  # "relu1" -> "/relu1/Relu_..."
    close = (inside or difflib.get_close_matches(name, known, SUGGESTED, 0.6))[:SUGGESTED]
    which = "did you mean" if close else "some of them"
    listed = ", ".join(quoted(n) for n in (close or known[:SUGGESTED]))
    return f"{start} ({len(known)} tensors; {which}: {listed}); see ListLayers"


def pick_weights(found: tuple[WeightStats, ...], names: tuple[str, ...]
                 ) -> tuple[WeightStats, ...]:
    """The named weights (by name or alias) in the order asked, or all of them."""
    if not names:
        return found
    by_name = {alias: w for w in found for alias in (w.name, *w.aliases)}
    missing = [n for n in names if n not in by_name]
    if missing:
        some = ", ".join(quoted(w.name) for w in found[:SUGGESTED])
        raise InvalidArgument(f"names: no weight {quoted(missing[0])}; some of the {len(found)} "
                              f"weights: {some}")
    picked = {by_name[n].name: by_name[n] for n in names}  # once each, in order
    return tuple(picked.values())


def ascent_settings(q: MaximizeQuery) -> Settings:
    """The regularisers and step count, 0 = the default, -1 = none for jitter and blur."""
    numbers = {"learning_rate": q.learning_rate, "l2": q.l2, "blur_sigma": q.blur_sigma}
    for field, value in numbers.items():
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(f"{field}: {value}; must be a finite number >= 0")
    if q.blur_sigma > MAX_BLUR_SIGMA:
        raise InvalidArgument(f"blur_sigma: {q.blur_sigma}; at most {MAX_BLUR_SIGMA} positions")
    if not 0 <= q.steps <= MAX_STEPS:
        raise InvalidArgument(f"steps: {q.steps}; at most {MAX_STEPS} (0 = 128)")
    for field, count in {"jitter": q.jitter, "blur_every": q.blur_every}.items():
        if count < -1:
            raise InvalidArgument(f"{field}: {count}; >= 0, or -1 for none")
    d = Settings()
    return Settings(steps=q.steps or d.steps, learning_rate=q.learning_rate or d.learning_rate,
                    l2=q.l2 or d.l2, jitter=_count(q.jitter, d.jitter),
                    blur_every=_count(q.blur_every, d.blur_every),
                    blur_sigma=q.blur_sigma or d.blur_sigma)


def _count(value: int, default: int) -> int:
    """0 = the default, -1 = none (0 to the algorithm)."""
    return 0 if value == -1 else value or default


def renamed(message: str, old: str, new: str) -> str:
    """A message about field `old` (at its start) said of field `new`."""
    return new + message[len(old):] if message.startswith(old) else f"{new}: {message}"


"""The gradient backend: d target / d variables for flat input rows, by an adjoint ONNX graph
(onnx-ad) run in onnxruntime, or by central finite differences for graphs onnx-ad refuses.

The target is one output's selected columns on the requested scale: "identity", or "logit" =
the input of the final Softmax/Sigmoid (walked back from the output through Identity/Cast),
where probabilities do not saturate; "auto" takes the logit when there is one. The variables
are the model's float inputs; for token models, the output of each embedding lookup
(Gather of a weight table by an integer input), cut out of the graph as an input so gradients
and paths live in embedding space; or one named intermediate tensor (a layer, for Grad-CAM).

Preparation follows the field notes ("Gradients of ONNX graphs"): opset >= 17, every input
shape pinned (batch included: onnx-ad's Conv rule needs static shapes), shape inference with
data propagation, onnxruntime's BASIC-level rewrite saved and reloaded before differentiating,
and no op outside the default domain on the differentiated path (com.microsoft fused ops are
refused, ai.onnx.ml ops have no rules). One adjoint graph and session is built per pinned batch
size, on first use (`warm` builds them all); a GradientModel holds them for one (model, output,
columns, scale, layer, input shapes), and GradientCache keeps GradientModels per such key.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ad
import onnxruntime as ort
from onnx import helper

from explainers.base import Array
from explainers.errors import FailedPrecondition, InvalidArgument
from explainers.gradients import graphs, tidy

Feeds = Callable[[Array], dict[str, Array]]
"""Flat rows (rows, elements) -> onnxruntime feeds, every model input in its dtype and shape
(service.models.inputs.Layout.feeds)."""

SCALES = ("auto", "identity", "logit")
BATCHES = (1, 32)  # pinned batch sizes: single rows, and rounds of paths and samples
FD_MAX_ELEMENTS = 4096  # finite differences cost 2 forward rows per differentiated element
FD_STEP = {np.dtype(np.float16): 9.9e-2, np.dtype(np.float32): 4.9e-3,
           np.dtype(np.float64): 6.1e-6}  # eps^(1/3) per dtype
FD_CHUNK = 4096  # forward rows per call on the finite-difference path
PREFIX = "sidelight_adj_"  # onnx-ad's names: seeds and gradients (kept clear of model names)
ENGINE_AD, ENGINE_FD = "onnx-ad", "finite differences"


def session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel =
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            save_to: str | None = None) -> ort.InferenceSession:
    """A single-threaded CPU session without spinning (two shared cores, field notes)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = level
    options.log_severity_level = 3
    if save_to is not None:
        options.optimized_model_filepath = save_to
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def basic_pass(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as onnxruntime's BASIC level rewrites it (constants folded, Identity-aliased
    weights stripped), saved and reloaded: what onnx-ad differentiates fastest."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "basic.onnx")
        session(model, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, save_to=path)
        return onnx.load(path)


class Refused(Exception):
    """onnx-ad (or the preparation it needs) cannot differentiate this graph; says why."""


@dataclass(frozen=True)
class Variable:
    """A tensor differentiated with respect to: a float model input ("input"), an embedding
    lookup's output ("embedding": values from `table` rows picked by the ids in `elements`),
    or an intermediate tensor ("layer": values from a forward pass)."""

    name: str  # its name in the differentiated graph
    kind: str
    shape: tuple[int, ...]  # per row
    dtype: np.dtype  # type: ignore[type-arg]
    elements: slice  # the flat row's elements it comes from (ids, for an embedding)
    table: Array | None = None  # (vocabulary, *embedding) for an embedding

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Input:
    """A model input: its shape per row, its elements in the flat row, its dtype's kind."""

    shape: tuple[int, ...]
    elements: slice
    kind: str  # numpy dtype kind: "f" float, "i"/"u" integer


@dataclass(frozen=True)
class Target:
    """What is differentiated: a tensor, its selected flat columns, the scale and a note."""

    tensor: str
    columns: tuple[int, ...]
    scale: str
    note: str


def resolve_target(model: onnx.ModelProto, output: str, columns: Sequence[int],
                   scale: str) -> Target:
    """The tensor on the requested scale; "logit" without a final link is refused."""
    if output not in {o.name for o in model.graph.output}:
        raise InvalidArgument(f"output: the model has no output {output!r}")
    if scale not in SCALES:
        raise InvalidArgument(f"scale: {scale!r}; one of {', '.join(SCALES)}")
    link = graphs.find_link(model, output) if scale != "identity" else None
    cols = tuple(int(c) for c in columns)
    if link is not None:
        return Target(link.input[0], cols, "logit",
                      f"logit scale: gradients of {link.input[0]!r}, the input of the final "
                      f"{link.op_type} producing {output!r}")
    if scale == "logit":
        raise FailedPrecondition(f"scale: output {output!r} is not produced by a Softmax or "
                                 "Sigmoid, so it has no logit scale; use identity")
    return Target(output, cols, "identity", f"identity scale: gradients of {output!r} itself")


class _Adjoint:
    """onnx-ad's adjoint of the differentiated graph at one pinned batch size, and its
    session."""

    def __init__(self, parts: Prepared, variables: Sequence[Variable], target: Target,
                 batch: int) -> None:
        start = time.perf_counter()
        shapes = {k: (batch, *s) for k, s in parts.shapes.items()}
        names = [v.name for v in variables]
        foreign = graphs.foreign_op(parts.differentiated, names, target.tensor)
        if foreign is not None:
            raise Refused(f"onnx-ad does not differentiate {foreign} (not a standard ONNX op)")
        try:
            pinned = graphs.infer(basic_pass(graphs.infer(graphs.pin(parts.differentiated,
                                                                      shapes))))
            adjoint = onnx_ad.reverse(pinned, inputs=names, outputs=[target.tensor],
                                      prefix=PREFIX, layout="onnx")
            self.seed = _seed(target, parts, batch)  # (batch, *target shape, columns)
            tidied = _tidy_session(adjoint, target, names, self.seed)
            self.tidied = tidied is not None  # else onnx-ad's graph as it came
            if tidied is None:
                self.session = session(adjoint)
            else:
                self.session, adjoint = tidied
            self.ops = tuple(tidy.ops(adjoint))  # the op types the session was given
        except onnx_ad.UnsupportedOperator as exc:
            raise Refused(f"onnx-ad refused the graph: {exc}") from exc
        except Exception as exc:  # onnx-ad is alpha: whatever it or the runtime raises on
            # its graph is a refusal (the caller falls back), never an internal error
            raise Refused(f"onnx-ad failed on the graph: {type(exc).__name__}: {exc}") from exc
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = [target.tensor, *(PREFIX + n for n in names)]
        self.seed_name = PREFIX + target.tensor  # an input of onnx-ad's graph, a constant of
        # tidy's
        self.columns = target.columns
        self._picks = np.array(target.columns, np.intp)
        self.nbytes = int(adjoint.ByteSize())
        self.seconds = time.perf_counter() - start

    def run(self, feeds: dict[str, Array]) -> tuple[Array, Array]:
        """Target values (batch, columns) and gradients (batch, columns, p)."""
        given = {k: v for k, v in feeds.items() if k in self.inputs}
        if self.seed_name in self.inputs:
            given[self.seed_name] = self.seed
        value, *grads = self.session.run(self.outputs, given)
        rows, k = value.shape[0], len(self.columns)
        picked = value.reshape(rows, -1)[:, self._picks]  # (rows, k)
        if k == 1 and len(grads) == 1:  # the common case: one reshape, one copy
            return picked.astype(np.float64), grads[0].reshape(rows, 1, -1).astype(np.float64)
        # (rows, *shape, k) -> (rows, k, size): a plain reshape when k is 1 (no copy)
        flat = [g.reshape(rows, 1, -1) if k == 1 else
                g.reshape(rows, -1, k).transpose(0, 2, 1) for g in grads]
        grad = flat[0] if len(flat) == 1 else np.concatenate(flat, axis=2)
        return picked.astype(np.float64), grad.astype(np.float64)


def _tidy_session(adjoint: onnx.ModelProto, target: Target, names: Sequence[str], seed: Array
                  ) -> tuple[ort.InferenceSession, onnx.ModelProto] | None:
    """A session on the adjoint after tidy's exact rewrites (seed axis pinned to the explained
    columns, the seed a constant); None when tidying or its session fails, and onnx-ad's own
    graph is run (the rewrites are an optimisation only)."""
    try:
        tidied = tidy.tidy(adjoint, PREFIX + target.tensor, [PREFIX + n for n in names],
                           len(target.columns), seed)
        return session(tidied), tidied
    except Exception:  # shape inference, the reference evaluator or onnxruntime refusing
        return None


def _seed(target: Target, parts: Prepared, batch: int) -> Array:
    """One seed per explained column: a one-hot on that column in every row."""
    k = len(target.columns)
    seed = np.zeros((batch, math.prod(parts.target_shape), k), parts.target_dtype)
    seed[:, list(target.columns), np.arange(k)] = 1
    return seed.reshape(batch, *parts.target_shape, k)


@dataclass(frozen=True)
class Prepared:
    """What a GradientModel runs: the primal (cut) graph with the target as its output, the
    graph differentiated (the primal, or DeepLIFT's linearised copy), and the graph exposing
    intermediates (a layer, or the rescaled nonlinearities' a and y), if any."""

    primal: onnx.ModelProto
    differentiated: onnx.ModelProto
    exposed: onnx.ModelProto | None
    shapes: dict[str, tuple[int, ...]]  # per-row shape of every input of `differentiated`
    target_shape: tuple[int, ...]  # per row
    target_dtype: np.dtype  # type: ignore[type-arg]
    rescaled: tuple[graphs.Rescaled, ...] = ()
    rescale: bool = False  # built for DeepLIFT (even when no nonlinearity needed rewriting)


class GradientModel:
    """d target / d variables for flat rows; build with `GradientModel.build`.

    A point is a row's variables flattened and concatenated, (rows, p) float64 (for a
    float-input model p = elements and a point is the row itself). `to_elements` maps
    per-variable values back to the row's elements, summing an embedding's per token.
    """

    def __init__(self, feeds: Feeds, inputs: dict[str, Input], variables: tuple[Variable, ...],
                 target: Target, parts: Prepared, batches: Sequence[int]) -> None:
        self._feeds, self.inputs, self.variables = feeds, inputs, variables
        self.elements = sum(i.elements.stop - i.elements.start for i in inputs.values())
        self.target, self.parts = target, parts
        self.rescaled = parts.rescaled  # the nonlinearities DeepLIFT's Rescale rule rewrote
        self.rescale = parts.rescale
        self._primal = session(parts.primal)
        self._differentiated = (self._primal if parts.differentiated is parts.primal
                                else session(parts.differentiated))
        self._exposed = None if parts.exposed is None else session(parts.exposed)
        self.batches = tuple(sorted({int(b) for b in batches}))
        self._adjoints: dict[int, _Adjoint] = {}
        self._lock = threading.Lock()
        self.engine, self.refusal = ENGINE_AD, ""
        self.build_seconds = 0.0  # preparation plus every adjoint built so far
        self.seconds_per_row = 1e-3  # one row's gradient, measured at build

    @staticmethod
    def build(model: onnx.ModelProto, feeds: Feeds, elements: int, output: str,
              columns: Sequence[int], scale: str = "auto", layer: str | None = None,
              batches: Sequence[int] = BATCHES, rescale: bool = False) -> GradientModel:
        """Prepare the graphs, choose the variables, build the first adjoint (or fall back to
        finite differences) and time a gradient; see the module docstring."""
        start = time.perf_counter()
        base = _upgraded(model)
        probe = feeds(np.zeros((1, elements)))
        target = resolve_target(base, output, columns, scale)
        inputs = _inputs(probe, elements)
        variables = _variables(base, probe, inputs, layer, target.tensor)
        parts = _graphs(base, probe, variables, target, layer, rescale)
        gm = GradientModel(feeds, inputs, variables, target, parts, batches)
        gm._first_build()
        gm.build_seconds = time.perf_counter() - start  # the first adjoint included
        return gm

    # -- building --------------------------------------------------------------------------
    def _first_build(self) -> None:
        """Build the smallest batch's adjoint; on refusal, finite differences when the
        variables are few enough, else FAILED_PRECONDITION saying why."""
        try:
            self._adjoint(self.batches[0])
        except Refused as exc:
            if self.size > FD_MAX_ELEMENTS:
                raise FailedPrecondition(
                    f"gradients: {exc}; the finite-difference fallback is limited to "
                    f"{FD_MAX_ELEMENTS} differentiated elements and this model has "
                    f"{self.size}") from exc
            self.engine, self.refusal = ENGINE_FD, str(exc)
        self.seconds_per_row = self._time_one_row()

    def _adjoint(self, batch: int) -> _Adjoint:
        """The adjoint at a pinned batch size, built on first use (a built one is read
        without the lock: entries are only ever added)."""
        built = self._adjoints.get(batch)
        if built is not None:
            return built
        with self._lock:
            if batch not in self._adjoints:
                built = _Adjoint(self.parts, self.variables, self.target, batch)
                self._adjoints[batch] = built
                self.build_seconds += built.seconds
            return self._adjoints[batch]

    def warm(self) -> None:
        """Build every batch size's adjoint now (at load) rather than on first use."""
        if self.engine == ENGINE_AD:
            for batch in self.batches:
                self._adjoint(batch)

    def _time_one_row(self) -> float:
        """Seconds for one row's gradient (best of three), to plan the first round."""
        X = np.zeros((1, self.elements))
        P = self.point(X)
        refs = self.reference_feeds(X, P, P) if self.rescale else None
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            self.value_and_grad(X, P, refs)
            best = min(best, time.perf_counter() - start)
        return best

    # -- what the methods use --------------------------------------------------------------
    @property
    def size(self) -> int:
        """p: differentiated elements per row."""
        return sum(v.size for v in self.variables)

    @property
    def columns(self) -> int:
        return len(self.target.columns)

    @property
    def notes(self) -> tuple[str, ...]:
        """The scale, the fallback when it is used and why, and what text gradients are."""
        out = [self.target.note]
        if self.engine == ENGINE_FD:
            out.append(f"finite-difference gradients (central, step eps^(1/3)): {self.refusal}")
        if any(v.kind == "embedding" for v in self.variables):
            out.append("gradients with respect to the embedding outputs, summed per token")
        return tuple(out)

    @property
    def adjoint_seconds(self) -> dict[int, float]:
        """Build time of each adjoint built so far, by pinned batch size."""
        return {b: a.seconds for b, a in self._adjoints.items()}

    @property
    def nbytes(self) -> int:
        """Serialized size of the graphs held (for the cache's byte bound)."""
        held = [self.parts.primal, self.parts.differentiated, self.parts.exposed]
        return sum(int(g.ByteSize()) for g in held if g is not None) + \
            sum(a.nbytes for a in self._adjoints.values())

    @property
    def is_layer(self) -> bool:
        return len(self.variables) == 1 and self.variables[0].kind == "layer"

    def point(self, X: Array) -> Array:
        """The rows' variables (rows, p) float64: input values, embeddings, or a layer."""
        if self.is_layer:
            name = self.variables[0].name
            return np.asarray(self._expose(X)[name], np.float64).reshape(X.shape[0], -1)
        parts = [X[:, v.elements] if v.kind == "input" else
                 _lookup(v, X).reshape(X.shape[0], -1) for v in self.variables]
        return np.concatenate(parts, axis=1).astype(np.float64)

    def to_elements(self, V: Array) -> Array:
        """Per-variable values (k, p) -> per-element values (k, elements): inputs in place,
        embeddings summed over their last axis onto their ids. A layer has no element map
        (Grad-CAM upsamples its own)."""
        if self.is_layer:
            raise InvalidArgument("gradients: a layer's values have no element map")
        out = np.zeros((V.shape[0], self.elements))
        start = 0
        for v in self.variables:
            part = V[:, start:start + v.size]  # (k, size)
            start += v.size
            if v.kind == "embedding":
                part = part.reshape(V.shape[0], -1, v.shape[-1]).sum(axis=2)  # (k, ids)
            out[:, v.elements] += part
        return out

    def value(self, X: Array, P: Array | None = None) -> Array:
        """The target (rows, columns) at the rows, the variables at P (default: X's)."""
        return self._run_target(self._primal, self.feeds(X, P))

    def value_and_grad(self, X: Array, P: Array | None = None,
                       references: dict[str, Array] | None = None) -> tuple[Array, Array]:
        """Target values (rows, columns) and gradients (rows, columns, p) at the rows, the
        variables at P (default: X's); a rescaled model also takes DeepLIFT's references."""
        if self.rescale and references is None:
            raise InvalidArgument("gradients: a rescaled (DeepLIFT) model needs references")
        feeds = self.feeds(X, P)
        if references:
            feeds.update(references)
        if self.engine == ENGINE_FD:
            return self._finite_differences(feeds)
        rows = X.shape[0]
        if rows in self.batches:  # one call at a pinned size: no slicing or padding
            return self._adjoint(rows).run(feeds)
        values, grads = [], []
        for start, stop, batch in _chunks(rows, self.batches):
            v, g = self._adjoint(batch).run(_padded(_slice(feeds, start, stop), batch))
            values.append(v[:stop - start])
            grads.append(g[:stop - start])
        if len(values) == 1:
            return values[0], grads[0]
        return np.concatenate(values), np.concatenate(grads)

    def layer_and_grad(self, X: Array) -> tuple[Array, Array]:
        """A layer model's activation (rows, *layer) and gradient (rows, columns, *layer)."""
        if not self.is_layer:
            raise InvalidArgument("gradients: this gradient model was built without a layer")
        shape = self.variables[0].shape
        A = self.point(X)  # (rows, p)
        _, G = self.value_and_grad(X, A)  # (rows, columns, p)
        return A.reshape(X.shape[0], *shape), G.reshape(X.shape[0], self.columns, *shape)

    def feeds(self, X: Array, P: Array | None = None) -> dict[str, Array]:
        """Onnxruntime feeds: the model's inputs from X, the variables from P (X's)."""
        feeds = self._feeds(X)
        if P is None:  # X's own variables, without the float64 round trip
            for v in self.variables:
                if v.kind == "embedding":
                    feeds[v.name] = _lookup(v, X)
                elif v.kind == "layer":
                    feeds[v.name] = self._expose(X)[v.name]
            return feeds
        start = 0
        for v in self.variables:
            part = P[:, start:start + v.size].reshape(X.shape[0], *v.shape)
            feeds[v.name] = part.astype(v.dtype)
            start += v.size
        return feeds

    def reference_feeds(self, x: Array, P: Array, P0: Array) -> dict[str, Array]:
        """DeepLIFT's feeds for one row (x (1, elements) at P (1, p)) against references P0
        (refs, p), one fed row per reference: per rescaled nonlinearity the multiplier
        m = (y - y0) / (a - a0) (or f'(a) where a = a0), and the linearisation's centre. The
        centre is x's own a and y: the rewrite f(a) -> y_c + m (a - a_c) is then exact at x, so
        a MaxPool after it sees x's values (float32 rounding of a centre at the reference would
        break MaxPool's ties among dead ReLUs and route the gradient elsewhere); m, hence the
        gradient, is the same whichever centre is fed."""
        at = self._expose(x, P)
        ref = self._expose(np.repeat(x, P0.shape[0], axis=0), P0)
        out = {}
        rows = P0.shape[0]
        for n in self.rescaled:
            a0, y0, m = n.inputs
            out[a0] = np.repeat(at[n.a], rows, axis=0)
            out[y0] = np.repeat(at[n.y], rows, axis=0)
            out[m] = multiplier(n, at[n.a], at[n.y], ref[n.a], ref[n.y]).astype(ref[n.a].dtype)
        return out

    # -- internals -------------------------------------------------------------------------
    def _expose(self, X: Array, P: Array | None = None) -> dict[str, Array]:
        """The exposed tensors at the rows: a layer's activation (from X alone), or the
        rescaled nonlinearities' a and y (with the variables at P)."""
        assert self._exposed is not None
        feeds = self._feeds(X) if self.is_layer else self.feeds(X, P)
        names = [o.name for o in self._exposed.get_outputs()]
        return dict(zip(names, self._exposed.run(names, _wanted(self._exposed, feeds)),
                        strict=True))

    def _run_target(self, run: ort.InferenceSession, feeds: dict[str, Array]) -> Array:
        """The target's columns (rows, columns) in chunks of FD_CHUNK rows."""
        rows = next(iter(feeds.values())).shape[0]
        out = [run.run([self.target.tensor], _wanted(run, _slice(feeds, i, i + FD_CHUNK)))[0]
               for i in range(0, rows, FD_CHUNK)]
        return _columns(np.concatenate(out), self.target.columns)

    def _finite_differences(self, feeds: dict[str, Array]) -> tuple[Array, Array]:
        """Central differences in the variables' dtype (float64 when the model's is), one
        row at a time: 2p forward rows per row."""
        rows = next(iter(feeds.values())).shape[0]
        values = self._run_target(self._differentiated, feeds)  # (rows, columns)
        grads = np.stack([np.concatenate([self._fd(_slice(feeds, r, r + 1), v)
                                          for v in self.variables], axis=1)
                          for r in range(rows)])  # (rows, columns, p)
        return values, grads

    def _fd(self, feeds: dict[str, Array], v: Variable) -> Array:
        """One row's (columns, size) derivatives in one variable, FD_CHUNK // 2 elements per
        call; each step is measured after rounding to the variable's dtype."""
        base = feeds[v.name].reshape(-1).astype(np.float64)  # (size,)
        step = FD_STEP[np.dtype(v.dtype)] * np.maximum(1.0, np.abs(base))  # (size,)
        out = np.empty((self.columns, v.size))
        for lo in range(0, v.size, FD_CHUNK // 2):
            j = np.arange(lo, min(lo + FD_CHUNK // 2, v.size))  # (block,) elements moved
            plus, minus = np.tile(base, (j.size, 1)), np.tile(base, (j.size, 1))  # (block, size)
            plus[np.arange(j.size), j] += step[j]
            minus[np.arange(j.size), j] -= step[j]
            plus, minus = plus.astype(v.dtype), minus.astype(v.dtype)
            width = plus[np.arange(j.size), j].astype(np.float64) - \
                minus[np.arange(j.size), j].astype(np.float64)  # (block,) steps after rounding
            batch = {k: np.repeat(a, 2 * j.size, axis=0) for k, a in feeds.items()}
            batch[v.name] = np.concatenate([plus, minus]).reshape(2 * j.size, *v.shape)
            y = self._run_target(self._differentiated, batch)  # (2 block, columns)
            out[:, j] = ((y[:j.size] - y[j.size:]) / width[:, None]).T
        return out


def multiplier(n: graphs.Rescaled, a: Array, y: Array, a0: Array, y0: Array) -> Array:
    """DeepLIFT's Rescale multiplier (y - y0) / (a - a0); f'(a) where |a - a0| <= 1e-10
    (Captum's eps), from the op's formula."""
    da = a.astype(np.float64) - a0
    close = np.abs(da) <= 1e-10
    ratio = (y.astype(np.float64) - y0) / np.where(close, 1.0, da)
    return np.asarray(np.where(close, _derivative(n, a.astype(np.float64),
                                                  y.astype(np.float64)), ratio))


def _derivative(n: graphs.Rescaled, a: Array, y: Array) -> Array:
    """f'(a) of the rescaled ops, from a and y = f(a)."""
    if n.op == "Relu":
        return (a > 0).astype(np.float64)
    if n.op == "LeakyRelu":
        return np.where(a > 0, 1.0, n.alpha)
    if n.op == "Elu":
        return np.where(a > 0, 1.0, y + n.alpha)
    if n.op == "Sigmoid":
        return np.asarray(y * (1 - y))
    if n.op == "Tanh":
        return np.asarray(1 - y**2)
    return np.asarray(1 / (1 + np.exp(-a)))  # Softplus


def _upgraded(model: onnx.ModelProto) -> onnx.ModelProto:
    """Opset >= 17 and shapes inferred; a model the converter cannot upgrade is kept as it
    is (onnx-ad then refuses it, and finite differences take over)."""
    with contextlib.suppress(Exception):  # the converter raises assorted errors
        model = graphs.upgrade(model)
    return graphs.infer(model)


def _inputs(probe: dict[str, Array], elements: int) -> dict[str, Input]:
    """Where each model input sits in the flat row, from one probe row of feeds."""
    offsets = np.cumsum([0, *(a[0].size for a in probe.values())])
    if offsets[-1] != elements:
        raise InvalidArgument(f"inputs: the feeds hold {offsets[-1]} elements, not {elements}")
    return {name: Input(tuple(a.shape[1:]), slice(int(lo), int(hi)), a.dtype.kind)
            for (name, a), lo, hi in zip(probe.items(), offsets[:-1], offsets[1:], strict=True)}


def _variables(model: onnx.ModelProto, probe: dict[str, Array], inputs: dict[str, Input],
               layer: str | None, target: str) -> tuple[Variable, ...]:
    """The differentiated tensors: a layer if one is named, else the float inputs and the
    embedding lookups of the integer inputs."""
    if layer is not None:
        return (_layer(model, probe, layer, target),)
    found = [Variable(name, "input", i.shape, probe[name].dtype, i.elements)
             for name, i in inputs.items() if i.kind == "f"]
    ints = [name for name, i in inputs.items() if i.kind in "iu"]
    for lk in graphs.lookups(model, ints):
        shape = (*inputs[lk.input].shape, *lk.table.shape[1:])
        found.append(Variable(lk.output, "embedding", shape, lk.table.dtype,
                              inputs[lk.input].elements, lk.table))
    if not found:
        raise FailedPrecondition("gradients: the model has no floating-point input and no "
                                 "embedding lookup (Gather of a weight table by an input) "
                                 "to differentiate")
    return tuple(found)


def _layer(model: onnx.ModelProto, probe: dict[str, Array], layer: str,
           target: str) -> Variable:
    """A named intermediate tensor as the one variable; its shape from a probe run."""
    known = graphs.types(model)
    if layer not in graphs.producers(model.graph) or layer not in known:
        raise InvalidArgument(f"layer: the graph has no intermediate tensor {layer!r}")
    if not graphs.path(graphs.cut(model, {layer: known[layer]}), [layer], target):
        raise InvalidArgument(f"layer: {target!r} does not depend on {layer!r}")
    run = session(graphs.prune(graphs.with_outputs(model, [layer])))
    value = run.run([layer], _wanted(run, probe))[0]
    if value.dtype.kind != "f":
        raise InvalidArgument(f"layer: {layer!r} is not a floating-point tensor")
    return Variable(layer, "layer", tuple(value.shape[1:]), value.dtype, slice(0, 0))


def _graphs(base: onnx.ModelProto, probe: dict[str, Array], variables: Sequence[Variable],
            target: Target, layer: str | None, rescale: bool) -> Prepared:
    """The primal (variables cut out as inputs, the target the only output), what is
    differentiated (DeepLIFT's linearised copy when rescaling) and what is exposed."""
    cuts = {v.name: helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(v.dtype),
                                                  ["N", *v.shape])
            for v in variables if v.kind != "input"}
    primal = graphs.prune(graphs.with_outputs(graphs.cut(base, cuts), [target.tensor]))
    shapes = {**{k: tuple(a.shape[1:]) for k, a in probe.items()},
              **{v.name: v.shape for v in variables}}
    out = _target_of(primal, probe, variables, target)
    if layer is not None:
        exposed = graphs.prune(graphs.with_outputs(base, [layer]))
        return Prepared(primal, primal, exposed, shapes, *out)
    if not rescale:
        return Prepared(primal, primal, None, shapes, *out)
    nodes = tuple(graphs.rescalable(primal, [v.name for v in variables], target.tensor))
    exposed = graphs.prune(graphs.with_outputs(
        primal, [target.tensor, *(t for n in nodes for t in (n.a, n.y))]))
    parts = Prepared(primal, graphs.linearise(primal, nodes), exposed, shapes, *out, nodes,
                     True)
    sizes = _probe_shapes(parts, probe, variables)
    return Prepared(primal, parts.differentiated, exposed, {**shapes, **sizes}, *out, nodes,
                    True)


def _target_of(primal: onnx.ModelProto, probe: dict[str, Array],
               variables: Sequence[Variable], target: Target
               ) -> tuple[tuple[int, ...], np.dtype]:  # type: ignore[type-arg]
    """The target's per-row shape and dtype, from a two-row probe; a target without one row
    per input row, or columns outside it, are refused."""
    run = session(primal)
    feeds = {k: np.repeat(a, 2, axis=0) for k, a in probe.items()}
    feeds.update({v.name: np.zeros((2, *v.shape), v.dtype) for v in variables})
    got = run.run([target.tensor], _wanted(run, feeds))[0]
    if got.ndim == 0 or got.shape[0] != 2:
        raise FailedPrecondition(f"output: {target.tensor!r} does not have one row per input "
                                 f"row (shape {list(got.shape)} for two rows), so it has no "
                                 "per-row gradient")
    width = math.prod(got.shape[1:])
    if not target.columns or min(target.columns) < 0 or max(target.columns) >= width:
        raise InvalidArgument(f"output_columns: {list(target.columns)} outside the {width} "
                              f"columns of {target.tensor!r}")
    return tuple(got.shape[1:]), got.dtype


def _probe_shapes(parts: Prepared, probe: dict[str, Array], variables: Sequence[Variable]
                  ) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the rescaled nodes' fed inputs, from one exposed run on the probe."""
    assert parts.exposed is not None
    run = session(parts.exposed)
    feeds = dict(probe)
    for v in variables:
        feeds[v.name] = np.zeros((1, *v.shape), v.dtype)
    names = [o.name for o in run.get_outputs()]
    got = dict(zip(names, run.run(names, _wanted(run, feeds)), strict=True))
    return {name: tuple(got[n.a].shape[1:]) for n in parts.rescaled for name in n.inputs}


def _wanted(run: ort.InferenceSession, feeds: dict[str, Array]) -> dict[str, Array]:
    """The feeds a session takes (pruned graphs may not read every model input)."""
    names = {i.name for i in run.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def _lookup(v: Variable, X: Array) -> Array:
    """Embedding rows for the ids in X's elements: (rows, *ids shape, *embedding)."""
    assert v.table is not None
    ids = X[:, v.elements].astype(np.int64)  # (rows, positions)
    vocabulary = v.table.shape[0]
    if ids.size and (ids.min() < -vocabulary or ids.max() >= vocabulary):
        raise InvalidArgument(f"inputs: token ids must lie in [0, {vocabulary}); got "
                              f"{int(ids.min())}..{int(ids.max())}")
    return np.asarray(v.table[ids])


def _columns(value: Array, columns: Sequence[int]) -> Array:
    return np.asarray(value.reshape(value.shape[0], -1)[:, list(columns)], np.float64)


def _slice(feeds: dict[str, Array], start: int, stop: int) -> dict[str, Array]:
    return {k: v[start:stop] for k, v in feeds.items()}


def _padded(feeds: dict[str, Array], batch: int) -> dict[str, Array]:
    """Rows repeated from the last up to the pinned batch size."""
    rows = next(iter(feeds.values())).shape[0]
    if rows == batch:
        return feeds
    pick = np.minimum(np.arange(batch), rows - 1)
    return {k: v[pick] for k, v in feeds.items()}


def _chunks(rows: int, batches: Sequence[int]) -> list[tuple[int, int, int]]:
    """(start, stop, pinned batch) per call: the largest batch while rows remain, then the
    smallest batch that holds the rest (padded)."""
    out, start, largest = [], 0, batches[-1]
    while start < rows:
        left = rows - start
        batch = largest if left >= largest else min(b for b in batches if b >= left)
        out.append((start, start + min(left, batch), batch))
        start += min(left, batch)
    return out


class GradientCache:
    """GradientModels per key (model id, output, columns, scale, layer, rescale, input
    shapes), least recently used first out, bounded in serialized bytes."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self._items: OrderedDict[Hashable, GradientModel] = OrderedDict()
        self._lock = threading.Lock()
        self.max_bytes = max_bytes

    def get(self, model_id: str, model: onnx.ModelProto, feeds: Feeds, elements: int,
            output: str, columns: Sequence[int], scale: str = "auto",
            layer: str | None = None, rescale: bool = False) -> GradientModel:
        """The cached GradientModel, or a new one (built under the lock: builds are rare)."""
        shapes = tuple((k, v.shape[1:]) for k, v in feeds(np.zeros((1, elements))).items())
        key = (model_id, output, tuple(columns), scale, layer, rescale, shapes)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            gm = GradientModel.build(model, feeds, elements, output, columns, scale, layer,
                                     rescale=rescale)
            self._items[key] = gm
            while len(self._items) > 1 and sum(g.nbytes for g in self._items.values()) \
                    > self.max_bytes:
                self._items.popitem(last=False)
            return gm

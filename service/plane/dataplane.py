"""The data plane: decides everything about a request (model, inputs, target, background, budget,
method) and runs the estimators. Domain types in and out; no gRPC here."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from explainers.base import Array, Background, Budget, Estimator, Evaluator, Explanation, ModelFn
from explainers.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    SidelightError,
)
from explainers.memory import ByteLru, nbytes_of
from explainers.registry import build_registry
from service.config import Settings
from service.models.repository import LoadedModel, ModelRepository
from service.monitoring.metrics import UNKNOWN, Metrics, Record, answer_of
from service.monitoring.monitors import DriftMonitors, DriftSettings, drift_reference
from service.plane.methods import Choice, MethodResolver, batch_explainer
from service.plane.requests import (
    BackgroundUpload,
    ExplainQuery,
    assemble,
    check_name,
    check_upload,
)
from service.plane.targets import Target, build_background, resolve_target, target_fn
from service.store.backgrounds import (
    DEFAULT_NAME,
    DERIVED_TTL_S,
    BackgroundMeta,
    BackgroundStore,
    CorruptValue,
    decode_array,
    encode_array,
    make_meta,
    predictions_key,
)
from service.store.results import ResultCache, budget_class, request_key

log = logging.getLogger(__name__)
REFERENCE_BUDGET_S = 0.01  # per background row explained for the attribution-drift reference
USAGE = {"permutation": "one row per permutation pair, rows visited in random sweeps "
                        "(stratified by row; a row's notes say when not every row was reached)",
         "exact": "all rows for every coalition", "kernel": "all rows for every coalition",
         "tree": "all rows (exact interventional TreeSHAP)", "linear": "the mean of all rows"}


@dataclass(frozen=True)
class Prepared:
    """A request resolved against the repository, the store and the clock."""

    query: ExplainQuery
    start: float  # time.monotonic() when the call arrived
    budget_s: float
    source: str  # where the budget came from
    model: LoadedModel
    X: Array  # (rows, features) validated inputs
    target: Target
    meta: BackgroundMeta
    background: Background


@dataclass(frozen=True)
class ExplainResult:
    model: str
    version: str
    feature_names: tuple[str, ...]
    target: Target
    rows: tuple[Explanation, ...]
    elapsed_ms: float
    budget_ms: float
    budget_source: str
    background: BackgroundMeta
    spread: Array  # (outputs,) standard deviation of f(background): the scale of errors
    X: Array  # (rows, features) the explained inputs
    notes: tuple[str, ...] = ()
    cached: bool = False

    @property
    def method(self) -> str:
        return "+".join(dict.fromkeys(r.method for r in self.rows))

    @property
    def evaluations(self) -> int:
        return sum(r.evaluations for r in self.rows)

    @property
    def background_usage(self) -> str:
        methods = dict.fromkeys(r.method for r in self.rows)
        return "; ".join(f"{m}: {USAGE.get(m, 'not sampled')}" for m in methods)


class DataPlane:
    """Explains requests against the repository's models and the store's backgrounds."""

    def __init__(self, repo: ModelRepository, store: BackgroundStore, settings: Settings,
                 metrics: Metrics, registry: Mapping[str, Estimator] | None = None) -> None:
        self.repo, self.store, self.settings, self.metrics = repo, store, settings, metrics
        self.registry = registry or build_registry()
        self.methods = MethodResolver(self.registry, settings.tree_cache_bytes)
        self._backgrounds: ByteLru[tuple[object, ...], Background] = ByteLru(
            settings.background_cache_bytes)  # (content, target) -> rows and f(background)
        self.results = ResultCache(settings.result_cache_size, settings.result_cache_ttl_seconds,
                                   ExplainResult, (Explanation, Target, BackgroundMeta),
                                   store if store.shared else None,
                                   max_bytes=settings.result_cache_bytes, nbytes=result_nbytes)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._cores = usable_cores()
        self.drift = DriftMonitors(DriftSettings(settings.drift_window_seconds,
                                                 settings.drift_max_features)) \
            if settings.drift_enabled else None
        metrics.in_flight.set_function(lambda: self._in_flight)
        if self.drift is not None:
            metrics.watch_drift(self.drift.sources)
            metrics.recorder.subscribe(self._fold_drift)

    # --- start-up -------------------------------------------------------------------------
    def seed_backgrounds(self) -> None:
        """Store each model's explain.yaml background as 'default' unless one is stored."""
        for model in self.repo.ready():
            self.metrics.model_ready.labels(model.name, model.version).set(1)
            if model.background is None or self._has_default(model):
                continue
            meta = make_meta(model.name, model.version, DEFAULT_NAME, model.background,
                             "explain.yaml", model.sha256, model.feature_names)
            self.store.put(meta, model.background)
        for entry in self.repo.entries.values():
            for version in entry.failures:
                self.metrics.model_ready.labels(entry.name, version).set(0)

    def _has_default(self, model: LoadedModel) -> bool:
        """A usable default is stored: same version and same ONNX file (else it is stale)."""
        return any(m.name == DEFAULT_NAME and m.version == model.version
                   and m.model_sha256 in ("", model.sha256) for m in self.store.list(model.name))

    def warm(self) -> None:
        """Compute f(background) for every model's default target before traffic arrives, and
        start drift monitoring against it."""
        for model in self.repo.ready():
            try:
                target = resolve_target(model, "", (), "")
                meta, background = self.background(model, DEFAULT_NAME, target)
            except SidelightError as err:
                log.warning("model %s: no default background yet (%s)", model.name, err)
                continue
            if self.drift is None:  # still fit and time the default method (tree: its speed)
                self._reference_attributions(model, target, background, background.data[:2],
                                             meta.sha256)
                continue
            rows = drift_reference(model, self.settings, target_fn(model, target), background)
            reference = self._reference_attributions(
                model, target, background, rows.data[:self.settings.drift_reference_rows],
                meta.sha256)
            self.drift.add(model.name, model.version, model.feature_names, target.names, rows,
                           reference, target)

    def _reference_attributions(self, model: LoadedModel, target: Target,
                                background: Background, rows: Array,
                                background_sha: str) -> Array | None:
        """Mean-|phi| of a few reference rows (rows, features), explained with the model's
        default method at a small fixed budget; None when there are none or it cannot be done
        (a model's configuration must never stop the sidecar from starting)."""
        if rows.shape[0] == 0:
            return None
        seconds = REFERENCE_BUDGET_S * rows.shape[0]
        try:
            choice = self.choose(model.config.method, model, target, background, background_sha,
                                 rows.shape[0], seconds)
            out = self._explain_rows(model, rows, choice.target, background, choice.estimator,
                                     ExplainQuery(model.name, ()), time.monotonic() + seconds)
        except SidelightError as err:
            log.warning("model %s: no attribution-drift reference (%s)", model.name, err)
            return None
        return np.asarray(np.abs(np.stack([e.values for e in out])).mean(axis=1))  # (rows, feat.)

    # --- Explain --------------------------------------------------------------------------
    def explain(self, q: ExplainQuery) -> ExplainResult:
        """Explain every row of the request within its budget; records the outcome metrics."""
        start, cpu = time.monotonic(), time.thread_time()
        model_label = q.model if q.model in self.repo.entries else UNKNOWN
        method = q.method.strip().lower() or "auto"
        method_label = method if method in self.methods.known() else UNKNOWN
        code, result = "INTERNAL", None
        self._admit()
        try:
            result = self._explain_cached(q, start)
            code = "OK"
            return result
        except SidelightError as err:
            code = err.code
            raise
        finally:
            self._leave()
            self.metrics.record_call(model_label, method_label, code, time.monotonic() - start,
                                     time.thread_time() - cpu,
                                     None if result is None or not result.rows
                                     else answer_of(result))

    def _admit(self) -> None:
        """Shed load beyond max_in_flight before doing any work."""
        with self._lock:
            if self._in_flight >= self.settings.max_in_flight:
                self.metrics.rejected.labels("overload").inc()
                raise ResourceExhausted(f"server busy: {self._in_flight} explanations in flight "
                                        f"(max_in_flight); retry with backoff")
            self._in_flight += 1

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _prepare(self, q: ExplainQuery, start: float) -> Prepared:
        """Resolve the request once: budget, model, inputs, target and background."""
        budget_s, source = self.resolve_budget(q, start)
        model = self.repo.get(q.model, q.version)
        X = assemble(model, q.inputs, self.settings.max_rows_per_request)
        target = resolve_target(model, q.output, q.classes, q.scale)
        meta, background = self.background(model, q.background or DEFAULT_NAME, target)
        if q.target_error < 0 or q.max_evaluations < 0:
            field = "target_error" if q.target_error < 0 else "max_evaluations"
            raise InvalidArgument(f"{field}: must be >= 0")
        return Prepared(q, start, budget_s, source, model, X, target, meta, background)

    def _explain(self, p: Prepared) -> ExplainResult:
        """Choose the method and explain every row before the deadline."""
        q, model, X = p.query, p.model, p.X
        deadline = p.start + p.budget_s - reserve_s(p.budget_s, X.shape[0])
        choice = self.choose(q.method or model.config.method, model, p.target, p.background,
                             p.meta.sha256, X.shape[0], deadline - time.monotonic())
        rows = self._explain_rows(model, X, choice.target, p.background, choice.estimator, q,
                                  deadline)
        elapsed = 1e3 * (time.monotonic() - p.start)
        return ExplainResult(model.name, model.version, model.feature_names, choice.target, rows,
                             elapsed, 1e3 * p.budget_s, p.source, p.meta, spread_of(p.background),
                             X, notes=notes_of(choice, rows))

    def choose(self, method: str, model: LoadedModel, target: Target, background: Background,
               background_sha: str, rows: int, seconds: float) -> Choice:
        """The estimator (and the target it explains) for `rows` rows in `seconds`."""
        def fn(t: Target) -> ModelFn:
            return target_fn(model, t)

        return self.methods.choose(method, model, target, background, fn, background_sha,
                                   rows, seconds)

    def _explain_rows(self, model: LoadedModel, X: Array, target: Target,
                      background: Background, estimator: Estimator, q: ExplainQuery,
                      deadline: float) -> tuple[Explanation, ...]:
        """Rows one after the other, each given an equal share of the time that is left."""
        rng = np.random.default_rng(q.seed)
        fn = target_fn(model, target)
        deadline -= load_reserve_s(deadline - time.monotonic(), self._in_flight, self._cores)
        batch = batch_explainer(estimator)
        if batch is not None:  # exact and batched: no per-row budget
            return tuple(batch(X, background, Evaluator(
                fn, model.onnx.chunk_rows, model.onnx.rows_per_second,
                dtype=model.onnx.batch_dtype)))
        rate, out = model.onnx.rows_per_second, []
        for i, x in enumerate(X):
            now = time.monotonic()
            share = max(deadline - now, 0.0) / (X.shape[0] - i)
            budget = Budget(now + share, q.max_evaluations or None, q.target_error or None)
            ev = Evaluator(fn, model.onnx.chunk_rows, rate, dtype=model.onnx.batch_dtype)
            out.append(estimator.explain(ev, x, background, budget, rng))
            rate = ev.rows_per_second
        return tuple(out)

    def _fold_drift(self, batch: list[Record]) -> None:
        """Feed a batch of answered calls to drift (cached answers too: the inputs arrived)."""
        assert self.drift is not None
        answers = [r[6] for r in batch if r[0] == "call" and r[6] is not None]
        if answers:
            self.drift.observe_answers(answers)

    # --- backgrounds ----------------------------------------------------------------------
    def put_background(self, q: BackgroundUpload) -> BackgroundMeta:
        """Validate an upload against the model and the limits, then store it."""
        model = self.repo.get(q.model, q.version)
        name = check_name(q.name or DEFAULT_NAME)
        data = check_upload(model, q.data, self.settings)
        if q.feature_names and len(q.feature_names) != model.onnx.n_features:
            raise InvalidArgument(f"feature_names: {len(q.feature_names)} names for "
                                  f"{model.onnx.n_features} model features")
        meta = make_meta(model.name, model.version, name, data, "upload", model.sha256,
                         tuple(q.feature_names) or model.feature_names)
        return self.store.put(meta, data)

    def background_meta(self, model: str, version: str, name: str) -> BackgroundMeta:
        loaded = self.repo.get(model, version)
        return self.store.head(loaded.name, loaded.version, check_name(name or DEFAULT_NAME))

    def list_backgrounds(self, model: str) -> list[BackgroundMeta]:
        if model:
            self.repo.get(model)  # NOT_FOUND for unknown models
        return self.store.list(model)

    def delete_background(self, model: str, version: str, name: str) -> bool:
        loaded = self.repo.get(model, version)
        return self.store.delete(loaded.name, loaded.version, check_name(name or DEFAULT_NAME))

    def persisted(self, meta: BackgroundMeta) -> bool:
        """Whether the store has written it durably (a store may hold uploads while offline)."""
        return self.store.persisted(meta)

    def _shared_background(self, model: LoadedModel, meta: BackgroundMeta, data: Array,
                           target: Target) -> Background:
        """f(background) from the store when a replica computed it, else computed and shared."""
        key = predictions_key(meta.sha256, model.sha256, target.output, target.columns,
                              target.scale)
        X = np.asarray(data, np.float64)  # (rows, features)
        predictions = self._stored_predictions(key, X.shape[0])
        self.metrics.count_cache("derived", "miss" if predictions is None else "hit")
        if predictions is not None:
            return Background.build(X, predictions)
        background = build_background(model, data, target)
        self.store.put_blob(key, encode_array(background.predictions), DERIVED_TTL_S)
        return background

    def _stored_predictions(self, key: str, rows: int) -> Array | None:
        """(rows, outputs) f(background) from the store, verified; None if absent or corrupt."""
        blob = self.store.get_blob(key)
        try:
            predictions = None if blob is None else decode_array(blob, key)
        except CorruptValue as err:
            log.error("%s", err)
            self.metrics.redis_errors.inc()
            return None
        ok = predictions is not None and predictions.ndim == 2 and predictions.shape[0] == rows
        return predictions if ok else None

    # --- result cache -----------------------------------------------------------------------
    def _explain_cached(self, q: ExplainQuery, start: float) -> ExplainResult:
        """The stored answer to an identical request (cached=true), else compute and store."""
        p = self._prepare(q, start)
        if not self.results.enabled:
            return self._explain(p)
        key = result_key(p)
        hit = self.results.get(key)
        self.metrics.count_cache("result", "miss" if hit is None else "hit")
        if hit is not None:  # this call's budget and time; the answer's own evaluations
            return replace(hit, X=p.X, cached=True, elapsed_ms=1e3 * (time.monotonic() - start),
                           budget_ms=1e3 * p.budget_s, budget_source=p.source)
        result = self._explain(p)
        self.results.put(key, replace(result, X=result.X[:0]))
        return result

    # --- decisions ------------------------------------------------------------------------
    def resolve_budget(self, q: ExplainQuery, start: float) -> tuple[float, str]:
        """Seconds for the request: budget_ms, else the deadline minus a margin, else the
        model's default; never past the caller's deadline. Returns (seconds, source)."""
        if q.budget_ms < 0 or not np.isfinite(q.budget_ms):
            raise InvalidArgument("budget_ms: must be a finite number >= 0")
        s = self.settings
        by_deadline = None
        if q.deadline_s is not None:
            margin = max(s.deadline_margin_ms / 1e3, 0.05 * q.deadline_s)
            by_deadline = q.deadline_s - margin - (time.monotonic() - start)
        if q.budget_ms > 0:
            budget, source = q.budget_ms / 1e3, "request"
        elif by_deadline is not None:
            budget, source = by_deadline, "deadline"
        else:
            budget, source = self._model_default_ms(q) / 1e3, "model_default"
        if by_deadline is not None and by_deadline < budget:
            budget, source = by_deadline, "deadline"
        if budget <= 0:
            raise DeadlineExceeded("deadline: the request's deadline leaves no time to explain")
        return min(budget, s.max_budget_ms / 1e3), source

    def _model_default_ms(self, q: ExplainQuery) -> float:
        entry = self.repo.entries.get(q.model)
        version = entry.versions.get(q.version or entry.newest() or "") if entry else None
        configured = version.config.budget_ms if version else None
        return configured or self.settings.default_budget_ms

    def background(self, model: LoadedModel, name: str,
                   target: Target) -> tuple[BackgroundMeta, Background]:
        """The named background with f(background) for this target, cached per content."""
        meta, data = self.store.get(model.name, model.version, name)
        if meta.model_sha256 and meta.model_sha256 != model.sha256 and name == DEFAULT_NAME \
                and model.background is not None:  # a rolling update replaced the file
            meta = make_meta(model.name, model.version, name, model.background,
                             "explain.yaml (this replica)", model.sha256, model.feature_names)
            data = model.background
        if meta.model_sha256 and meta.model_sha256 != model.sha256:
            raise FailedPrecondition(f"background: {name!r} was stored for another file of model "
                                     f"{model.name!r} version {model.version}; upload it again")
        if meta.features != model.onnx.n_features:
            raise FailedPrecondition(f"background: {name!r} has {meta.features} features; the "
                                     f"model has {model.onnx.n_features}")
        key = (model.sha256, meta.sha256, target.output, target.columns, target.scale)
        return meta, self._cached(key, lambda: self._shared_background(model, meta, data, target))

    def _cached(self, key: tuple[object, ...], build: Callable[[], Background]) -> Background:
        """Decoded backgrounds per content and target, LRU within background_cache_bytes."""
        return self._backgrounds.get_or_build(key, build)


def result_key(p: Prepared) -> str:
    """Everything that decides the answer, hashed (service/result_cache.py)."""
    q, model, target = p.query, p.model, p.target
    return request_key(p.X, model.sha256, model.name, model.version, model.feature_names,
                       q.method or model.config.method, target.output, target.columns,
                       target.scale, p.meta.name, p.meta.sha256, q.seed, q.max_evaluations,
                       q.target_error, budget_class(1e3 * p.budget_s))


def result_nbytes(r: ExplainResult) -> int:
    """What a cached answer holds, its rows measured on the first (the rows of an answer have
    the same shapes): walking every row costs ~15 us a row."""
    if not r.rows:
        return nbytes_of(r)
    return nbytes_of(replace(r, rows=())) + len(r.rows) * nbytes_of(r.rows[0])


def notes_of(choice: Choice, rows: tuple[Explanation, ...]) -> tuple[str, ...]:
    """The method choice's notes, then each distinct note of the rows."""
    return tuple(dict.fromkeys([*choice.notes, *(n for r in rows for n in r.notes)]))


def spread_of(background: Background) -> Array:
    """Weighted standard deviation of f(background) per output; 1 where it is 0."""
    dev = background.predictions - background.base_values  # (rows, outputs)
    std = np.sqrt(background.weights @ dev**2)
    return np.where(std > 0, std, 1.0)


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> float:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (a Kubernetes CPU
    limit is a quota, not a cpuset, so affinity alone would count every core of the node)."""
    cores = float(len(os.sched_getaffinity(0)))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000"
    except (OSError, ValueError):
        return cores
    return cores if quota == "max" else max(1.0, min(cores, int(quota) / int(period)))


def load_reserve_s(remaining_s: float, in_flight: int, cores: float) -> float:
    """Extra time kept back when more explanations run than there are cores: everything after
    the estimators (response, gRPC) then runs proportionally slower too."""
    load = in_flight / max(1.0, cores)
    return max(0.0, min(0.4 * remaining_s, (load - 1) * (0.0025 + 0.02 * remaining_s)))


def reserve_s(budget_s: float, rows: int) -> float:
    """Time kept back from the estimators for what follows them: metrics, the response and
    gRPC's two trips through Python, about 1.5-2 ms per call here, p99 ~4 ms on a busy machine
    (docs/benchmarks.md)."""
    return min(0.6 * budget_s, 0.003 + 0.03 * budget_s + 0.0002 * rows)


@dataclass(frozen=True)
class ModelSummary:
    """A model version as ListModels / GetModel report it: ready (with its model) or failed."""

    name: str
    version: str
    versions: tuple[str, ...]
    error: str = ""
    model: LoadedModel | None = None
    background_rows: int = 0


def summarize(plane: DataPlane, name: str, version: str = "") -> ModelSummary:
    """One version of a model (newest by default); a failed version carries its reason."""
    entry = plane.repo.entries.get(name)
    if entry is None:
        plane.repo.get(name)  # raises NOT_FOUND naming the known models
        raise AssertionError("unreachable")
    versions = tuple(sorted({*entry.versions, *entry.failures}))
    version = version or entry.newest() or next(iter(entry.failures), "")
    if version in entry.failures:
        return ModelSummary(name, version, versions, entry.failures[version])
    model = plane.repo.get(name, version)
    rows = next((m.rows for m in plane.store.list(name)
                 if m.version == model.version and m.name == DEFAULT_NAME), 0)
    return ModelSummary(name, version, versions, model=model, background_rows=rows)


def summarize_all(plane: DataPlane) -> list[ModelSummary]:
    """Every model's newest version (or its failure)."""
    return [summarize(plane, name) for name in sorted(plane.repo.entries)]

"""The data plane: decides everything about a request (model, inputs, target, background, budget,
method) and runs the estimators. Domain types in and out; no gRPC here."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from explainers.base import Array, Background, Estimator, Explanation, ModelFn
from explainers.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SidelightError,
    Unavailable,
)
from explainers.memory import ByteLru, nbytes_of
from explainers.perturbation.occlusion import Occlusion
from explainers.registry import build_registry, lookup
from explainers.shapley.exact import WALL_PRIOR as EXACT_WALL_PRIOR
from service.config import Settings
from service.models.inputs import Layout, TensorInfo
from service.models.reload import CONFIG
from service.models.repository import (
    LoadedModel,
    ModelEntry,
    ModelRepository,
    pick,
    shorten,
    unusable_values,
    version_key,
)
from service.monitoring.metrics import UNKNOWN, DriftSource, Metrics, Record, answer_of
from service.monitoring.monitors import PENDING, DriftMonitors, DriftSettings, drift_reference
from service.plane.admission import Admission, Ticket, least_seconds
from service.plane.baselines import baselines_for
from service.plane.gradients import METHODS as GRADIENT_METHODS
from service.plane.gradients import GradientMethods
from service.plane.grouping import GroupRequest
from service.plane.guard import checked, find_failure
from service.plane.methods import Choice, MethodResolver
from service.plane.players import (
    Players,
    default_baseline,
    least_rows,
    occlusion_windows,
    resolve_players,
)
from service.plane.quotas import UploadQuota
from service.plane.requests import (
    BackgroundUpload,
    ExplainQuery,
    assemble,
    check_name,
    check_upload,
)
from service.plane.reserve import Reserve, Tail
from service.plane.rows import (
    RowJob,
    explain_grouped,
    explain_plain,
    maps_of,
    reference_maker,
)
from service.plane.scheduler import Control, Cores
from service.plane.targets import Target, build_background, resolve_target, target_fn
from service.store.backgrounds import (
    DEFAULT_NAME,
    DERIVED_TTL_S,
    BackgroundMeta,
    BackgroundStore,
    CorruptValue,
    data_sha256,
    decode_array,
    encode_array,
    make_meta,
    predictions_key,
)
from service.store.results import ResultCache, budget_class, request_key

log = logging.getLogger(__name__)
TREE_TARGETS = 4  # targets per tree model an upload fits ahead of traffic, besides the default
REFERENCE_BUDGET_S = 0.01  # per reference row at start-up; slower models get theirs after it
LATE_ROW_MAX_S = 2.0  # per reference row after start-up, at most (bounds how long close waits)
DRIFT_OFF = "off: SIDELIGHT_DRIFT_ENABLED is false"
HOW_TO_ADD = ("set `background:` in explain.yaml (a .npy or .csv file of rows) or upload one "
              "with PutBackground")
USAGE = {"permutation": "one row per permutation pair, rows visited in random sweeps "
                        "(stratified by row; a row's notes say when not every row was reached)",
         "exact": "all rows for every coalition", "kernel": "all rows for every coalition",
         "tree": "all rows (exact interventional TreeSHAP)", "linear": "the mean of all rows"}


class UnusableBackground(FailedPrecondition):
    """A stored background the model cannot take (a value its input dtype cannot hold, or
    non-finite outputs on it): reported, never used."""


@dataclass(frozen=True)
class ReferenceJob:
    """Rows to explain for a model's attribution-drift reference, and what they need."""

    model: LoadedModel
    target: Target
    background: Background
    rows: Array  # (rows, features)
    background_sha: str


@dataclass(frozen=True)
class Prepared:
    """A request resolved against the repository, the store and the clock."""

    query: ExplainQuery
    start: float  # time.monotonic() when the call arrived
    budget_s: float
    source: str  # where the budget came from
    model: LoadedModel
    X: Array  # (rows, elements) validated inputs
    layout: Layout  # how X's elements form the model's inputs
    target: Target
    meta: BackgroundMeta | None  # None when a named baseline replaces the stored background
    background: Background | None
    players: Players
    control: Control | None = None  # the call's yield point and cancellation


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
    X: Array  # (rows, elements) the explained inputs
    notes: tuple[str, ...] = ()
    cached: bool = False
    modality: str = "tabular"
    grouping: str = "one group per feature"
    baseline: str = "background rows"
    labels: tuple[str, ...] = ()  # players' labels when shared by every row (else per row)
    row_labels: tuple[tuple[str, ...], ...] = ()  # per row, when they vary (text)
    maps: tuple[Array, ...] = ()  # per row (outputs, elements), for grouped answers
    layout: Layout | None = None  # how the maps' elements form the inputs
    not_reached: int = 0  # the request's last rows, left when the budget ran out

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

    @property
    def additive(self) -> bool:
        return all(r.additive for r in self.rows)


class DataPlane:
    """Explains requests against the repository's models and the store's backgrounds."""

    def __init__(self, repo: ModelRepository, store: BackgroundStore, settings: Settings,
                 metrics: Metrics, registry: Mapping[str, Estimator] | None = None) -> None:
        self.repo, self.store, self.settings, self.metrics = repo, store, settings, metrics
        self.registry = registry or build_registry()
        self.gradients = GradientMethods(settings.gradient_cache_bytes)
        self.methods = MethodResolver(self.registry, settings.tree_cache_bytes)
        self._backgrounds: ByteLru[tuple[object, ...], Background] = ByteLru(
            settings.background_cache_bytes)  # (content, target) -> rows and f(background)
        self.uploads = UploadQuota.from_settings(settings)  # per-client upload limits
        self.results = ResultCache(settings.result_cache_size, settings.result_cache_ttl_seconds,
                                   ExplainResult, (Explanation, Target, BackgroundMeta, Layout,
                                                   TensorInfo),
                                   store if store.shared else None,
                                   max_bytes=settings.result_cache_bytes, nbytes=result_nbytes)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stopping = False
        self._calls: set[Control] = set()  # the calls in flight, to cancel when stopping
        self._cores = usable_cores()
        self.cores = Cores(max(1, round(self._cores)))
        self.admission = Admission(self.cores.n)
        self.reserve = Reserve(self._cores)
        self.drift = DriftMonitors(DriftSettings(settings.drift_window_seconds,
                                                 settings.drift_max_features)) \
            if settings.drift_enabled else None
        self._notes: dict[tuple[str, str], list[str]] = {}  # (model, version): start-up notes
        # (model, version): the tree targets requested lately, oldest first (an upload fits them)
        self._tree_targets: dict[tuple[str, str], dict[Target, None]] = {}
        # (model, version, name) -> (sha256, why) of a stored background found unusable
        self._unusable: dict[tuple[str, str, str], tuple[str, str]] = {}
        self._cold: set[tuple[str, str]] = set()  # versions that started without a background
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []  # start-up work still running
        self._check_methods()
        metrics.in_flight.set_function(lambda: self._in_flight)
        if self.drift is not None:
            metrics.watch_drift(self._served_drift)
            metrics.recorder.subscribe(self._fold_drift)

    # --- start-up -------------------------------------------------------------------------
    def _check_methods(self) -> None:
        """A configured default method the estimators do not know fails its model at load."""
        for model in self.repo.ready():
            problem = self.method_problem(model)
            if problem is not None:
                self.repo.fail(model.name, model.version, problem)

    def method_problem(self, model: LoadedModel) -> str | None:
        """Why the configured default method cannot serve the model (unknown), or None."""
        known = self.methods.known()
        if (model.config.method.strip().lower() or "auto") in known:
            return None
        return (f"explain.yaml method: unknown method {model.config.method!r}; known: "
                f"{', '.join(known)}")

    def seed_backgrounds(self) -> None:
        """Store each model's explain.yaml background as 'default' unless one is stored; a
        model whose seeding fails is logged and noted, never fatal."""
        for model in self.repo.ready():
            self.metrics.model_ready.labels(model.name, model.version).set(1)
            try:
                self._seed(model)
            except Exception as err:  # one model's data must never stop the others
                self._startup_note(model, "storing the explain.yaml background", err)
        for entry in self.repo.entries.values():
            for version in entry.failures:
                self.metrics.model_ready.labels(entry.name, version).set(0)

    def _seed(self, model: LoadedModel, refresh: bool = False) -> None:
        """Store explain.yaml's background as 'default' unless a usable one is stored; with
        `refresh` (a reload) also over one stored from an older explain.yaml's file."""
        if model.background is None or self._has_default(model, refresh):
            return
        meta = make_meta(model.name, model.version, DEFAULT_NAME, model.background,
                         "explain.yaml", model.sha256, model.feature_names)
        self.store.put(meta, model.background)

    def _has_default(self, model: LoadedModel, refresh: bool = False) -> bool:
        """A usable default is stored: same version and same ONNX file (else it is stale);
        with `refresh`, one stored from explain.yaml must also hold its current file's rows."""
        rows = data_sha256(model.background) if refresh and model.background is not None \
            else ""
        return any(m.name == DEFAULT_NAME and m.version == model.version
                   and m.model_sha256 in ("", model.sha256)
                   and not (refresh and m.source == "explain.yaml" and m.sha256 != rows)
                   for m in self.store.list(model.name))

    def warm(self, models: list[LoadedModel] | None = None, when: str = "start-up") -> None:
        """Compute f(background) for every model's (or `models`') default target before
        traffic arrives, and start drift monitoring against it. A model that cannot be warmed
        (no or an unusable background, a failing session) is logged and noted, never fatal;
        attribution references too slow for start-up are computed afterwards in one thread."""
        late: list[ReferenceJob] = []
        for model in self.repo.ready() if models is None else models:
            try:
                late += self._warm(model)
            except Exception as err:  # one model's data must never stop the others
                self._startup_note(model, "preparing the default background", err, when)
        if late:
            self._in_background(lambda: self._late_references(late))

    def _warm(self, model: LoadedModel) -> list[ReferenceJob]:
        """f(background) and drift monitoring for one model; the reference job if it is late.
        Images and text are not monitored: drift is measured per feature of a table."""
        if model.modality.kind != "tabular":
            self._set_drift_status(model, f"off: drift is measured per feature of tabular "
                                   f"models; this model's inputs are read as "
                                   f"{model.modality.kind}")
            return []
        target = resolve_target(model, "", (), "")
        meta, background = self.background(model, DEFAULT_NAME, target)
        self.methods.prefit(model, target, background, lambda t: target_fn(model, t))
        if self.drift is None:  # still fit and time the default method (tree: its speed)
            self._quick_reference(ReferenceJob(model, target, background, background.data[:2],
                                               meta.sha256))
            return []
        rows = drift_reference(model, target_fn(model, target), background)
        job = ReferenceJob(model, target, background,
                           rows.data[:self.settings.drift_reference_rows], meta.sha256)
        reference, status = self._quick_reference(job)
        self.drift.add(model.name, model.version, model.feature_names, target.names, rows,
                       reference, target, status)
        return [job] if status == PENDING else []

    def _quick_reference(self, job: ReferenceJob) -> tuple[Array | None, str]:
        """The attribution reference at the fixed start-up budget, and the drift status:
        active, pending (too slow for start-up: computed later) or why there is none."""
        if job.rows.shape[0] == 0:
            return None, ("input and prediction drift only: SIDELIGHT_DRIFT_REFERENCE_ROWS "
                          "is 0")
        try:
            return self._reference_attributions(job, REFERENCE_BUDGET_S), "active"
        except ResourceExhausted:
            return None, PENDING
        except Exception as err:  # input and prediction drift still work
            return None, self._no_reference(job.model, err)

    def _late_references(self, jobs: list[ReferenceJob]) -> None:
        """References of the models too slow for start-up, sized to each model: per-row
        budgets grow 4x from the start-up one up to the model's default budget (what its
        default method gets per request; at most LATE_ROW_MAX_S) until one fits. Stops when
        the plane is closed."""
        for job in jobs:
            m = job.model
            try:
                reference = self._sized_reference(job)
            except Exception as err:  # input and prediction drift still work
                self._set_drift_status(m, self._no_reference(m, err))
                continue
            if reference is not None and self.drift is not None:
                self.drift.set_reference(m.name, m.version, reference)
                log.info("model %s: attribution-drift reference ready", m.name)

    def _sized_reference(self, job: ReferenceJob) -> Array | None:
        """The reference at the smallest per-row budget that fits; None once closed."""
        cap = min(job.model.config.budget_ms or self.settings.default_budget_ms,
                  self.settings.max_budget_ms, 1e3 * LATE_ROW_MAX_S) / 1e3
        per_row = REFERENCE_BUDGET_S
        while not self._closed.is_set():
            per_row = min(4 * per_row, cap)
            try:
                return self._reference_attributions(job, per_row)
            except ResourceExhausted:
                if per_row >= cap:
                    raise
        return None

    def _in_background(self, work: Callable[[], None]) -> None:
        """Run work off the request path (start-up's late work, uploads' tree tables) in a
        thread that close() stops and waits for."""
        thread = threading.Thread(target=work, daemon=True, name="sidelight-start-up")
        with self._lock:
            if self._closed.is_set():
                return
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def close(self) -> None:
        """Stop start-up's background work and wait for it (a row being explained finishes
        first, at most LATE_ROW_MAX_S): a thread still inside onnxruntime when the
        interpreter exits aborts the process."""
        self.cancel_all("the server is stopping")
        with self._lock:
            self._closed.set()
            self._stopping = True
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(LATE_ROW_MAX_S + 1.0)

    # --- reloads (service/plane/reloader.py) ------------------------------------------------
    def adopt(self, model: LoadedModel) -> None:
        """Prepare a reloaded version before it is swapped in, as start-up does: explain.yaml's
        background stored as 'default', f(background), the trees' tables and drift. What the
        plane noted about the version it replaces is dropped. Never raises."""
        self.forget(model.name, model.version)
        try:
            self._seed(model, refresh=True)
        except Exception as err:  # as at start-up: noted, never raised
            self._startup_note(model, "storing the explain.yaml background", err, "reload")
        self.warm([model], "reload")

    def forget(self, name: str, version: str) -> None:
        """Drop what the plane noted about a version (a reload replaced or removed it); a
        removed version's drift is no longer measured."""
        key = (name, version)
        with self._lock:
            self._notes.pop(key, None)
            self._cold.discard(key)
            for found in [k for k in list(self._unusable) if k[:2] == key]:
                self._unusable.pop(found, None)
        if self.drift is not None and version not in self._versions(name):
            self.drift.remove(name, version)

    def _versions(self, name: str) -> set[str]:
        entry = self.repo.entries.get(name)
        return set() if entry is None else set(entry.versions)

    def _served_drift(self) -> list[DriftSource]:
        """Drift of the version each model serves by default (the newest): the gauges carry
        the model, not the version, so two monitored versions would repeat a series."""
        assert self.drift is not None
        entries = self.repo.entries
        return [s for s in self.drift.sources()
                if s.model in entries and entries[s.model].newest() == s.version]

    def _set_drift_status(self, model: LoadedModel, status: str) -> None:
        if self.drift is not None:
            self.drift.set_status(model.name, model.version, status)

    def _no_reference(self, model: LoadedModel, err: Exception) -> str:
        why = str(err) if isinstance(err, SidelightError) else f"{type(err).__name__}: {err}"
        log.warning("model %s: no attribution-drift reference (%s)", model.name, why)
        return f"input and prediction drift only: no attribution reference ({shorten(why)})"

    def _reference_attributions(self, job: ReferenceJob, per_row_s: float) -> Array:
        """Mean-|phi| over outputs of the reference rows (rows, features), explained with the
        model's default method at `per_row_s` seconds per row, each row on its own clock (a
        row that overran on a busy machine does not starve the next)."""
        m, rows = job.model, job.rows
        choice = self.choose(m.config.method, m, job.target, job.background, job.background_sha,
                             rows.shape[0], per_row_s * rows.shape[0])
        out: list[Explanation] = []
        for x in rows:
            if self._closed.is_set():
                raise Unavailable("the server is stopping")
            out += self._explain_rows(m, x[None], choice.target, job.background,
                                      choice.estimator, ExplainQuery(m.name, ()),
                                      time.monotonic() + per_row_s)
        phi = np.abs(np.stack([e.values for e in out])).mean(axis=1)  # (rows, features)
        if not np.all(np.isfinite(phi)):
            raise FailedPrecondition("the reference attributions are not finite")
        return np.asarray(phi)

    def _startup_note(self, model: LoadedModel, doing: str, err: Exception,
                      when: str = "start-up") -> None:
        """One log line; drift off with the reason; and a note on the version unless the
        cause is the default background (absent, unusable or unreachable: GetModel's notes
        follow the store, and the first explanation that finds one warms the model). `when`:
        start-up or reload."""
        why = shorten(str(err) if isinstance(err, SidelightError)
                      else f"{type(err).__name__}: {err}")
        level = logging.WARNING if isinstance(err, NotFound) else logging.ERROR
        log.log(level, "model %s version %s: %s failed: %s", model.name, model.version, doing,
                why)
        status = f"off: {why}"
        if isinstance(err, NotFound | UnusableBackground | Unavailable):  # none usable (yet)
            self._cold.add((model.name, model.version))
            status = (f"off: no usable default background at {when} ({why}); drift starts "
                      "with the first explanation against one")
        else:
            self._notes.setdefault((model.name, model.version), []).append(
                f"{when}: {doing} failed ({why})")
        self._set_drift_status(model, status)

    def _warm_later(self, model: LoadedModel) -> None:
        """Warm, off the request path, a version that started without a usable default
        background once a request finds one (uploaded, or repaired in Redis)."""
        with self._lock:
            if (model.name, model.version) not in self._cold:
                return
            self._cold.discard((model.name, model.version))

        def run() -> None:
            try:
                self._late_references(self._warm(model))
            except Exception as err:  # as at start-up: noted, never raised
                self._startup_note(model, "preparing the default background", err)

        self._in_background(run)

    def notes(self, model: LoadedModel, default: BackgroundMeta | None) -> tuple[str, ...]:
        """What GetModel tells an operator about a ready version: files left out at load,
        start-up failures, and whether (and how) it has a usable default background."""
        notes = [*model.notes, *self._notes.get((model.name, model.version), ()),
                 *version_notes(self.repo.entries.get(model.name), model.version)]
        rejected = self._unusable.get((model.name, model.version, DEFAULT_NAME))
        if default is None:
            notes.append(f"no background: {HOW_TO_ADD}")
        elif rejected is not None and rejected[0] == default.sha256:
            notes.append(f"stored background 'default' is unusable ({rejected[1]}); upload a "
                         "usable one with PutBackground")
        return tuple(notes)

    def drift_status(self, model: LoadedModel) -> tuple[bool, str]:
        """Whether drift is measured for a version, and "active", "pending" or why not."""
        if self.drift is None:
            return False, DRIFT_OFF
        return self.drift.status(model.name, model.version)

    # --- Explain --------------------------------------------------------------------------
    def explain(self, q: ExplainQuery, control: Control | None = None) -> ExplainResult:
        """Explain every row of the request within its budget; records the outcome metrics.
        `control` lets the caller cancel the call (client gone, server stopping)."""
        control = control or Control(math.inf)
        start, cpu = control.arrived, time.thread_time()
        model_label = q.model if q.model in self.repo.entries else UNKNOWN
        method = q.method.strip().lower() or "auto"
        method_label = method if method in self.methods.known() else UNKNOWN
        code, result = "INTERNAL", None
        self._admit(control)
        try:
            result = self._explain_cached(q, start, control)
            code = "OK"
            return result
        except SidelightError as err:
            code = err.code
            raise
        finally:
            self._leave(control)
            self.metrics.record_call(model_label, method_label, code, time.monotonic() - start,
                                     time.thread_time() - cpu,
                                     None if result is None or not result.rows
                                     else answer_of(result))

    def _admit(self, control: Control) -> None:
        """Shed before any work: while stopping (UNAVAILABLE: another replica will answer) and
        beyond max_in_flight (RESOURCE_EXHAUSTED); each shed is counted by reason."""
        with self._lock:
            if self._stopping:
                self.metrics.rejected.labels("shutdown").inc()
                raise Unavailable("the server is stopping; retry on another replica")
            if self._in_flight >= self.settings.max_in_flight:
                self.metrics.rejected.labels("overload").inc()
                err = ResourceExhausted(f"server busy: {self._in_flight} explanations in flight "
                                        f"(max_in_flight); retry with backoff")
                err.retry_after_s = 0.01
                raise err
            self._in_flight += 1
            self._calls.add(control)

    @contextmanager
    def in_flight(self, control: Control) -> Iterator[None]:
        """A call of another service (Layers, a dataset job) counted in flight like an
        explanation: shed while stopping or past max_in_flight, cancelled by cancel_all."""
        self._admit(control)
        try:
            yield
        finally:
            self._leave(control)

    def explain_admitted(self, q: ExplainQuery, control: Control) -> ExplainResult:
        """Explain within a call already admitted (a dataset job's rows), on the Explain path
        itself (budget, players, method, guard) but with no admission, result cache or
        metrics of its own: the job holds the core and counts as the one call."""
        p = self._prepare(q, time.monotonic(), control)
        return self._explain(p)

    def drain(self) -> None:
        """Refuse new explanations from now on (the calls in flight go on)."""
        with self._lock:
            self._stopping = True

    def cancel_all(self, reason: str) -> None:
        """Cancel every call in flight: each stops at its next yield point."""
        with self._lock:
            calls = list(self._calls)
        for control in calls:
            control.cancel(reason)

    def _admit_work(self, p: Prepared, level: int) -> Ticket:
        """Admission on the model of the work (service/plane/admission.py): shed at once when
        this call's least answer, or an accepted call's, would no longer fit."""
        method = p.query.method or p.model.config.method
        players = p.players.groups_for(p.X[0]).size
        refs = p.background.rows if p.background is not None and \
            p.players.baseline.kind == "background" else 1
        onnx = p.model.onnx
        least = least_seconds(method, players, refs, onnx.rows_per_second,
                              tree=p.model.trees is not None,
                              exact_factor=onnx.wall_factors.get("exact", EXACT_WALL_PRIOR))
        try:
            return self.admission.admit(self._deadline(p), least, p.control,
                                        kind=self.reserve.cell(level, p.budget_s))
        except ResourceExhausted:
            self.metrics.rejected.labels("admission").inc()
            raise

    def _leave(self, control: Control) -> None:
        with self._lock:
            self._in_flight -= 1
            self._calls.discard(control)

    def _prepare(self, q: ExplainQuery, start: float,
                 control: Control | None = None) -> Prepared:
        """Resolve the request once: budget, model, inputs, target, background and players."""
        budget_s, source = self.resolve_budget(q, start)
        model = self.repo.get(q.model, q.version)
        X, layout = assemble(model, q.inputs, self.settings.max_rows_per_request)
        target = resolve_target(model, q.output, q.classes, q.scale)
        if q.target_error < 0 or q.max_evaluations < 0:
            field = "target_error" if q.target_error < 0 else "max_evaluations"
            raise InvalidArgument(f"{field}: must be >= 0")
        kind = (q.baseline or default_baseline(model)).kind
        meta, background = self.background(model, q.background or DEFAULT_NAME, target) \
            if kind in ("background", "mean") else (None, None)
        if background is not None and background.data.shape[1] != layout.elements:
            raise FailedPrecondition(f"background: {background.data.shape[1]} elements per row; "
                                     f"this request's rows have {layout.elements}: use a named "
                                     "baseline (baseline.kind)")
        rows = 1 if kind != "background" or background is None else background.rows
        fits = self._fits(q.method or model.config.method, model, rows,
                          budget_s / X.shape[0])
        players = resolve_players(model, layout, q.groups, q.baseline, fits)
        return Prepared(q, start, budget_s, source, model, X, layout, target, meta, background,
                        players, control)

    @staticmethod
    def _fits(method: str, model: LoadedModel, rows: int, seconds: float) -> Callable[[int], bool]:
        """Whether `method` can afford d players on this model in `seconds` per explained row
        (half of them: the rest is for sampling rounds): sizes the default image grid."""
        affordable = 0.5 * seconds * model.onnx.rows_per_second / max(rows, 1)
        return lambda d: least_rows(method, d) <= affordable

    def _explain(self, p: Prepared) -> ExplainResult:
        """Choose the method and explain every row before the deadline."""
        method = (p.query.method or p.model.config.method).strip().lower()
        if not p.players.plain or method == "occlusion" or method in GRADIENT_METHODS:
            return self._explain_grouped(p)
        q, model, X = p.query, p.model, p.X
        assert p.background is not None and p.meta is not None
        background, meta = p.background, p.meta
        deadline = self._deadline(p)
        if model.trees is not None:
            self._remember_tree_target(model, p.target)
        choice = self.choose(q.method or model.config.method, model, p.target, background,
                             meta.sha256, X.shape[0], deadline - time.monotonic())
        rows = self._explain_rows(model, X, choice.target, background, choice.estimator, q,
                                  deadline, p.control)
        choice, rows = checked(choice, rows, p.target, background, model.onnx.precision,
                               meta.name, lambda c: self._explain_rows(
                                   model, X, c.target, background, c.estimator, q, deadline,
                                   p.control),
                               self.registry["auto"])
        elapsed = 1e3 * (time.monotonic() - p.start)
        return ExplainResult(model.name, model.version, model.feature_names, choice.target, rows,
                             elapsed, 1e3 * p.budget_s, p.source, meta, spread_of(background),
                             X, notes=notes_of(choice, rows), labels=model.feature_names)

    def _explain_grouped(self, p: Prepared) -> ExplainResult:
        """Groups (patches, tokens, blocks, a client's mask) or occlusion windows, against
        the stored background or a named baseline; maps shaped like the inputs."""
        q, model, X, players = p.query, p.model, p.X, p.players
        choice = self._grouped_choice(p)
        job = RowJob(model, target_fn(model, p.target, p.layout), choice.estimator, q.seed,
                     q.max_evaluations, q.target_error, self._deadline(p), p.layout.elements,
                     p.control)
        references = reference_maker(players, p.layout, p.background)
        rows, groups = explain_grouped(job, X, players, references)
        choice, rows = checked(choice, rows, p.target, None, model.onnx.precision,
                               p.meta.name if p.meta else players.baseline.kind,
                               lambda c: explain_grouped(replace(job, estimator=c.estimator), X,
                                                         players, references)[0],
                               self.registry["auto"])
        labels = players.labels if not isinstance(choice.estimator, Occlusion) \
            else choice.estimator.windows.labels()
        row_labels = () if labels else tuple(g.labels for g in groups)
        return ExplainResult(
            model.name, model.version, model.feature_names, choice.target, rows,
            1e3 * (time.monotonic() - p.start), 1e3 * p.budget_s, p.source,
            p.meta or baseline_meta(model, players), spread_of_rows(rows), X,
            notes=notes_of(choice, rows),
            modality=players.modality.kind, grouping=_grouping(players, choice),
            baseline=players.baseline.describe(p.meta.name if p.meta else DEFAULT_NAME),
            labels=labels, row_labels=row_labels, maps=maps_of(rows, groups), layout=p.layout)

    def _grouped_choice(self, p: Prepared) -> Choice:
        """The estimator for grouped players: occlusion's windows, a generic method, or the
        sampler (with a note) for tree and linear, which attribute single features."""
        name = (p.query.method or p.model.config.method).strip().lower() or "auto"
        if name in GRADIENT_METHODS:
            g = self.gradients.choose(name, p.model, p.target, p.query.scale, p.layout,
                                      p.query.gradients)
            return Choice(g.estimator, g.target, g.notes)
        if name == "occlusion":
            windows = occlusion_windows(p.model, p.layout, p.query.occlusion)
            return Choice(Occlusion(windows), p.target)
        if name in ("tree", "linear"):
            ids = next(iter(p.model.onnx.discrete_inputs.items()), None)
            why = _why_not_single(name, ids, p.players)
            return Choice(self.registry["auto"], p.target,
                          (f"method {name} unavailable ({why}); fell back to auto",))
        return Choice(lookup(self.registry, name), p.target)

    def _deadline(self, p: Prepared) -> float:
        """When the estimators must stop: the budget less the reserve measured for what
        follows them at this load (service/plane/reserve.py); fixed once admitted."""
        if p.control is not None and p.control.tail is not None:
            return p.control.tail.stop_at
        return p.start + p.budget_s - self.reserve.seconds(p.budget_s, p.X.shape[0],
                                                           self._in_flight)

    def responded(self, control: Control) -> None:
        """The call's response is built: how far its estimators overran and how long the
        response took after them are measured for the reserve of the calls that follow."""
        if control.tail is not None:
            control.tail.observe(self.reserve)

    def choose(self, method: str, model: LoadedModel, target: Target, background: Background,
               background_sha: str, rows: int, seconds: float) -> Choice:
        """The estimator (and the target it explains) for `rows` rows in `seconds`."""
        def fn(t: Target) -> ModelFn:
            return target_fn(model, t)

        return self.methods.choose(method, model, target, background, fn, background_sha,
                                   rows, seconds)

    def _explain_rows(self, model: LoadedModel, X: Array, target: Target,
                      background: Background, estimator: Estimator, q: ExplainQuery,
                      deadline: float, control: Control | None = None
                      ) -> tuple[Explanation, ...]:
        """One player per feature, rows one after the other (service/plane/rows.py)."""
        job = RowJob(model, target_fn(model, target), estimator, q.seed, q.max_evaluations,
                     q.target_error, deadline, X.shape[1], control)
        return explain_plain(job, X, background)

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
        self.uploads.admit(q.client, data.nbytes)
        stored = self.store.put(meta, data)
        if model.trees is not None:  # tree tables ahead of traffic, off the request path
            self._in_background(lambda: self._prefit(model, name))
        return stored

    def _prefit(self, model: LoadedModel, name: str) -> None:
        """f(background) and the trees' tables of a stored background, for the default target
        and the targets requested lately; a failure is logged (the first request against it
        will say what is wrong)."""
        with self._lock:
            recent = list(self._tree_targets.get((model.name, model.version), {}))
        try:
            targets = dict.fromkeys([resolve_target(model, "", (), ""), *recent])
            for target in targets:
                _, background = self.background(model, name, target)
                self.methods.prefit(model, target, background, lambda t: target_fn(model, t))
        except Exception as err:
            log.warning("model %s: preparing background %r ahead of traffic failed: %s",
                        model.name, name, shorten(str(err)))

    def _remember_tree_target(self, model: LoadedModel, target: Target) -> None:
        """Keep the last TREE_TARGETS targets explained on a tree model, for uploads to fit."""
        with self._lock:
            recent = self._tree_targets.setdefault((model.name, model.version), {})
            if next(reversed(recent), None) == target:  # the usual case: nothing changes
                return
            recent.pop(target, None)
            recent[target] = None
            while len(recent) > TREE_TARGETS:
                recent.pop(next(iter(recent)))

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
        background = build_background(model, data, target, meta.name)
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
        ok = predictions is not None and predictions.ndim == 2 and predictions.shape[0] == rows \
            and bool(np.all(np.isfinite(predictions)))  # else recomputed: a blob is only a cache
        return predictions if ok else None

    # --- result cache -----------------------------------------------------------------------
    def _explain_cached(self, q: ExplainQuery, start: float, control: Control) -> ExplainResult:
        """The stored answer to an identical request (cached=true), else compute (holding a
        core, earliest deadline first) and store a complete answer."""
        p = self._prepare(q, start, control)
        control.deadline, control.cores = p.start + p.budget_s, self.cores
        if not self.results.enabled:
            return self._compute(p)
        key = result_key(p)
        hit = self.results.get(key)
        if hit is not None and find_failure(hit.rows, p.model.onnx.precision, None):
            hit = None  # stored by a replica without the guard: never served
        self.metrics.count_cache("result", "miss" if hit is None else "hit")
        if hit is not None:  # this call's budget and time; the answer's own evaluations
            return replace(hit, X=p.X, cached=True, elapsed_ms=1e3 * (time.monotonic() - start),
                           budget_ms=1e3 * p.budget_s, budget_source=p.source)
        result = self._compute(p)
        if not result.not_reached:  # a partial answer depends on the clock: not kept
            self.results.put(key, replace(result, X=result.X[:0]))
        return result

    def _compute(self, p: Prepared) -> ExplainResult:
        """Admit the work, explain while holding a core (taken at the first model call: the
        method's own refusal comes on arrival), say which rows were not reached."""
        assert p.control is not None
        level = self.reserve.level(self._in_flight)  # one reading for admission and the tail
        ticket = self._admit_work(p, level)
        p.control.tail = Tail(level, p.budget_s, p.X.shape[0], ticket.deadline, ticket.kind)
        try:
            with self.cores.held(p.control, lazily=True):
                result = self._explain(p)
        except ResourceExhausted as err:
            if err.reason:  # the method's own refusal on arrival, under load: a shed too
                self.metrics.rejected.labels(err.reason).inc()
            raise
        finally:
            self.admission.done(ticket)
        p.control.tail.computed_at = time.monotonic()
        self.admission.reached(p.control.tail.kind, bool(result.rows))
        missing = p.X.shape[0] - len(result.rows)
        if not missing:
            return result
        return replace(result, not_reached=missing, notes=(*result.notes, (
            f"{missing} of {p.X.shape[0]} rows not reached: the budget ran out before them "
            "(their status is NOT_REACHED); send them again or raise budget_ms")))

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
        try:
            meta, data = self.store.get(model.name, model.version, name)
        except NotFound:
            if name != DEFAULT_NAME:
                raise
            raise missing_background(model) from None
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
        key = (model.sha256, model.config_sha256, meta.sha256, target.output, target.columns,
               target.scale)
        found = self._cached(key, lambda: self._usable_background(model, meta, data, target))
        if name == DEFAULT_NAME and (model.name, model.version) in self._cold:
            self._warm_later(model)
        return meta, found

    def _usable_background(self, model: LoadedModel, meta: BackgroundMeta, data: Array,
                           target: Target) -> Background:
        """f(background) for the target, once the rows and f on them are found usable; an
        unusable one is remembered (GetModel says so) and refused, never explained against."""
        why = unusable_values(model.onnx, data, model.config.allow_missing)
        background = None if why else self._shared_background(model, meta, data, target)
        if background is not None and not np.all(np.isfinite(background.predictions)):
            row = int(np.argwhere(~np.isfinite(background.predictions))[0, 0])
            why = f"the model's output on row {row} is not finite"
        key = (model.name, model.version, meta.name)
        if background is not None and not why:
            self._unusable.pop(key, None)
            return background
        self._unusable[key] = (meta.sha256, why)
        raise UnusableBackground(f"background: {meta.name!r} of model {model.name!r} version "
                                 f"{model.version} is unusable: {why}; upload a usable one with "
                                 "PutBackground")

    def _cached(self, key: tuple[object, ...], build: Callable[[], Background]) -> Background:
        """Decoded backgrounds per content and target, LRU within background_cache_bytes."""
        return self._backgrounds.get_or_build(key, build)


def no_background(model: LoadedModel) -> str:
    """What Explain says to a model without a default background: both ways of giving one."""
    return (f"background: model {model.name!r} version {model.version} has no background "
            f"'default': {HOW_TO_ADD}")


def missing_background(model: LoadedModel) -> SidelightError:
    """NOT_FOUND when no background was ever given; FAILED_PRECONDITION, with the reason, when
    explain.yaml names a file that was left out at load as unusable."""
    why = next((n for n in model.notes if n.startswith("background file")), None)
    if why is None:
        return NotFound(no_background(model))
    return UnusableBackground(f"background: 'default' of model {model.name!r} version "
                              f"{model.version}: explain.yaml's {why}")


def result_key(p: Prepared) -> str:
    """Everything that decides the answer, hashed (service/result_cache.py): with the players
    (the request's groups, the baseline, occlusion windows) and the inputs' shapes."""
    q, model, target = p.query, p.model, p.target
    meta = (p.meta.name, p.meta.sha256) if p.meta else ("", "")
    return request_key(p.X, model.sha256, model.config_sha256, model.name, model.version,
                       model.feature_names, q.method or model.config.method, target.output,
                       target.columns, target.scale, *meta, q.seed, q.max_evaluations,
                       q.target_error, budget_class(1e3 * p.budget_s), p.layout.shapes,
                       p.players.grouping, p.players.baseline, q.occlusion,
                       groups_digest(q.groups))


def groups_digest(g: GroupRequest) -> str:
    """A request's groups as a short digest (a mask's values included, not its repr)."""
    h = hashlib.sha256(repr((g.input, g.labels, g.patch, g.grid, g.hierarchy)).encode())
    if g.mask is not None:
        h.update(repr((g.mask.dtype.str, g.mask.shape)).encode())
        h.update(np.ascontiguousarray(g.mask).tobytes())
    return h.hexdigest()


def result_nbytes(r: ExplainResult) -> int:
    """What a cached answer holds, its rows measured on the first (the rows of an answer have
    the same shapes): walking every row costs ~15 us a row."""
    if not r.rows:
        return nbytes_of(r)
    return nbytes_of(replace(r, rows=())) + len(r.rows) * nbytes_of(r.rows[0])


def notes_of(choice: Choice, rows: tuple[Explanation, ...]) -> tuple[str, ...]:
    """The method choice's notes, then each distinct note of the rows."""
    return tuple(dict.fromkeys([*choice.notes, *(n for r in rows for n in r.notes)]))


def spread_of_rows(rows: tuple[Explanation, ...]) -> Array:
    """The scale of errors without a background: mean |f(x) - base| per output; 1 where 0
    (and a placeholder when no row was reached: only answered rows are measured)."""
    if not rows:
        return np.ones(1)
    gap = np.mean([np.abs(r.prediction - r.base_values) for r in rows], axis=0)  # (outputs,)
    return np.where(gap > 0, gap, 1.0)


def _why_not_single(name: str, ids: tuple[str, str] | None, players: Players) -> str:
    """Why tree or linear cannot answer a grouped request (the note of the fallback)."""
    if name == "linear" and ids:
        return f"input {ids[0]!r} {ids[1]}: the model takes ids, not real-valued features"
    if players.baseline.kind != "background":
        return f"it explains against background rows, not baseline {players.baseline.kind}"
    if players.modality.kind == "tabular" and players.fixed is not None \
            and players.fixed.identity:
        return "it takes no groups.hierarchy"
    return f"it explains single features, not {players.grouping}"


def baseline_meta(model: LoadedModel, players: Players) -> BackgroundMeta:
    """What the response says of the reference when a named baseline replaced the background:
    one row, no stored data."""
    return BackgroundMeta(model.name, model.version, f"baseline:{players.baseline.kind}", 1,
                          players.layout.elements, "float64", "", 0.0, "baseline", model.sha256)


def _grouping(players: Players, choice: Choice) -> str:
    """The response's grouping: the players, or occlusion's windows."""
    if isinstance(choice.estimator, Occlusion):
        w = choice.estimator.windows
        return (f"{w.count} occlusion windows of {' x '.join(map(str, w.window))} elements, "
                f"strides {' x '.join(map(str, w.strides))}")
    return players.grouping


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


@dataclass(frozen=True)
class ModelSummary:
    """A model version as ListModels / GetModel report it: ready (with its model) or failed."""

    name: str
    version: str
    versions: tuple[str, ...]
    error: str = ""
    model: LoadedModel | None = None
    background_rows: int = 0
    notes: tuple[str, ...] = ()
    drift_active: bool = False
    drift_status: str = ""
    grouping: str = ""
    group_labels: tuple[str, ...] = ()
    baseline: str = ""
    baselines: tuple[str, ...] = ()


def version_notes(entry: ModelEntry | None, version: str) -> list[str]:
    """What a reload left to say about a serving version: its own new files that failed to
    load, and newer versions that failed (this one serves in their place)."""
    if entry is None:
        return []
    notes = [entry.rejected[version]] if version in entry.rejected else []
    return notes + [f"version {v} failed to load ({why}); version {version} serves instead"
                    for v, why in sorted(entry.failures.items())
                    if v != CONFIG and version_key(v) > version_key(version)]


def summarize(plane: DataPlane, name: str, version: str = "") -> ModelSummary:
    """One version of a model (newest by default); a failed version carries its reason."""
    entry = plane.repo.entries.get(name)
    if entry is None:
        plane.repo.get(name)  # raises NOT_FOUND naming the known models
        raise AssertionError("unreachable")
    return _summary(plane, entry, version)


def _summary(plane: DataPlane, entry: ModelEntry, version: str = "") -> ModelSummary:
    """One version of one published entry: a reload swapping the model meanwhile does not
    mix two states of it."""
    name = entry.name
    versions = tuple(sorted({*entry.versions, *entry.failures}))
    version = version or entry.newest() or next(iter(entry.failures), "")
    if version in entry.failures:
        return ModelSummary(name, version, versions, entry.failures[version])
    model = pick(entry, version)
    default = next((m for m in plane.store.list(name)
                    if m.version == model.version and m.name == DEFAULT_NAME), None)
    active, status = plane.drift_status(model)
    players = default_players(model, plane.settings)
    return ModelSummary(name, version, versions, model=model,
                        background_rows=0 if default is None else default.rows,
                        notes=plane.notes(model, default), drift_active=active,
                        drift_status=status, grouping=players.grouping,
                        group_labels=players.labels,
                        baseline=players.baseline.describe(DEFAULT_NAME),
                        baselines=baselines_for(model.modality))


def default_players(model: LoadedModel, settings: Settings) -> Players:
    """The players a request with no groups gets at the model's default budget and method."""
    seconds = (model.config.budget_ms or settings.default_budget_ms) / 1e3
    fits = DataPlane._fits(model.config.method, model, 1, seconds)
    return resolve_players(model, model.onnx.layout, GroupRequest(), None, fits)


def summarize_all(plane: DataPlane) -> list[ModelSummary]:
    """Every model's newest version (or its failure)."""
    entries = plane.repo.entries
    return [_summary(plane, entries[name]) for name in sorted(entries)]

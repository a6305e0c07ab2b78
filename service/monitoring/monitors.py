"""Drift monitors per model version: built at start-up against a reference (explain.yaml's
`drift_reference` rows, else the default background), fed by the data plane after each
explanation (in batches, off the request path), read by the metrics collector at scrape
time. Each version has a status GetModel reports: "active", "pending" (the attribution
reference is still being computed) or why drift is off or partial."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from explainers.base import Array, Background, ModelFn
from service.models.repository import LoadedModel
from service.monitoring.drift import AttributionWindow, DriftMonitor, Reference
from service.monitoring.metrics import Answer, DriftSource

ACTIVE, PENDING = "active", "pending"


@dataclass(frozen=True)
class DriftSettings:
    window_seconds: float = 300.0
    max_features: int = 64
    top_k: int = 5


class DriftMonitors:
    """The monitored model versions; observe() is cheap and thread-safe."""

    def __init__(self, settings: DriftSettings) -> None:
        self.settings = settings
        self._sources: dict[tuple[str, str], DriftSource] = {}
        self._status: dict[tuple[str, str], str] = {}
        self._all_features: dict[tuple[str, str], tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def add(self, model: str, version: str, features: tuple[str, ...], outputs: tuple[str, ...],
            background: Background, reference_phi: Array | None, target: object = None,
            status: str = ACTIVE) -> None:
        """Monitor a model against reference rows (`background`); reference_phi: (rows,
        features) or None, both for the explained `target` (requests for another target feed
        input drift only). `status` is what GetModel reports."""
        s = self.settings
        reference_abs = None if reference_phi is None else np.abs(reference_phi).mean(axis=0)
        monitor = DriftMonitor(
            Reference.build(background.data, weights=background.weights),
            Reference.build(background.predictions, weights=background.weights),
            reference_abs, top_k=s.top_k, window_seconds=s.window_seconds)
        index = exported_features(len(features), reference_abs, s.max_features)
        source = DriftSource(model, version, tuple(features[j] for j in index), index, outputs,
                             monitor, getattr(target, "key", target))
        with self._lock:
            self._sources[(model, version)] = source
            self._status[(model, version)] = status
            self._all_features[(model, version)] = features

    def set_reference(self, model: str, version: str, reference_phi: Array) -> None:
        """Start attribution drift on a monitored version once its reference (rows, features)
        is known; the input and prediction windows keep what they counted."""
        s, key = self.settings, (model, version)
        reference_abs = np.abs(reference_phi).mean(axis=0)  # (features,)
        with self._lock:
            old, features = self._sources[key], self._all_features[key]
            old.monitor.attributions = AttributionWindow(reference_abs, s.top_k, s.window_seconds)
            index = exported_features(len(features), reference_abs, s.max_features)
            self._sources[key] = DriftSource(model, version, tuple(features[j] for j in index),
                                             index, old.outputs, old.monitor, old.target)
            self._status[key] = ACTIVE

    def remove(self, model: str, version: str) -> None:
        """Stop monitoring a version (a reload removed it); unknown versions are ignored."""
        key = (model, version)
        with self._lock:
            self._sources.pop(key, None)
            self._status.pop(key, None)
            self._all_features.pop(key, None)

    def set_status(self, model: str, version: str, status: str) -> None:
        with self._lock:
            self._status[(model, version)] = status

    def status(self, model: str, version: str) -> tuple[bool, str]:
        """Whether drift is measured for this version, and "active", "pending" or why not."""
        with self._lock:
            monitored = (model, version) in self._sources
            return monitored, self._status.get((model, version), "off: not monitored")

    def observe_answers(self, answers: Sequence[Answer]) -> None:
        """Many answered requests at once: one observe per monitor and kind, so a batch costs
        a few vectorised histograms whatever the number of requests."""
        inputs: dict[tuple[str, str], list[Array]] = {}
        explained: dict[tuple[str, str], list[Answer]] = {}
        for a in answers:
            key = (a.model, a.version)
            source = self._sources.get(key)
            if source is None:
                continue
            if a.X.shape[1] != source.monitor.features.reference.features:
                continue  # another input shape than the reference's (symbolic axes)
            if a.target != source.target or a.rows != a.X.shape[0] \
                    or a.values.shape[2] != a.X.shape[1]:  # groups, not features
                inputs.setdefault(key, []).append(a.X)
            else:
                explained.setdefault(key, []).append(a)
        for key, blocks in inputs.items():
            self._sources[key].monitor.observe(np.concatenate(blocks))
        for key, done in explained.items():
            self._sources[key].monitor.observe(
                np.concatenate([a.X for a in done]),
                np.concatenate([a.predictions for a in done]),  # (rows, outputs)
                np.concatenate([a.values for a in done]))  # (rows, outputs, features)

    def sources(self) -> list[DriftSource]:
        with self._lock:
            return list(self._sources.values())


def exported_features(d: int, importance: Array | None, cap: int) -> tuple[int, ...]:
    """Which features get drift labels: all when d <= cap, else the most important ones (by
    reference mean |attribution|), else the first `cap`."""
    if d <= cap:
        return tuple(range(d))
    if importance is None:
        return tuple(range(cap))
    return tuple(sorted(int(j) for j in np.argsort(-importance)[:cap]))


def drift_reference(model: LoadedModel, fn: ModelFn, background: Background) -> Background:
    """The rows drift is measured against, with f on them: explain.yaml's `drift_reference` file
    (a window of traffic the model is known to serve well; read and checked at load, left out
    with a note when unusable), else the default background."""
    rows = model.drift_rows
    return background if rows is None else Background.build(rows, fn(rows))

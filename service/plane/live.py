"""Importance from live traffic: every answered Explain call (the metrics recorder's records,
folded off the request path) feeds a window per model version; GetLiveImportance reads this
replica's window and, when the store is shared (Redis), the other replicas' summaries.

What is counted: rows explained on the model's default target with its default players (one
per feature, or explain.yaml's blocks), cached answers included (they were served). Rows on
another target or with other players are left out (their units or players differ) and the
answer says how many. Tables only: image and text players are not features.

Sharing: each replica writes its summary (service/monitoring/live.py) under
`live:<model>:<version>` (a hash, one entry per replica, expiring a window after its last
write) at most every PUBLISH_EVERY_S while traffic arrives, and before it answers.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np

from explainers.errors import InvalidArgument
from service.monitoring.live import LiveFigures, LiveWindow, Slices, combine, decode, encode
from service.monitoring.metrics import Answer, Record
from service.plane.dataplane import DataPlane, default_players
from service.plane.targets import resolve_target
from service.store.backgrounds import CorruptValue

log = logging.getLogger(__name__)
PUBLISH_EVERY_S = 1.0  # a replica's summary is rewritten at most this often
Key = tuple[str, str]  # (model, version)


@dataclass(frozen=True)
class LiveResult:
    """GetLiveImportance's answer in domain terms."""

    model: str
    version: str
    feature_names: tuple[str, ...]
    figures: LiveFigures
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Expected:
    """What an answer must be to count: the default target and the default players."""

    target: object
    labels: tuple[str, ...]


def replica_id() -> str:
    """This process among the replicas: host, pid and a random suffix (pids repeat in pods)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LiveImportance:
    """Windows of served attributions per model version, shared through the plane's store."""

    def __init__(self, plane: DataPlane, replica: str | None = None) -> None:
        self.plane, self.replica = plane, replica or replica_id()
        self.window_s = plane.settings.drift_window_seconds
        self._windows: dict[Key, LiveWindow] = {}
        self._expected: dict[Key, _Expected | None] = {}
        self._skipped: dict[Key, int] = {}
        self._published: dict[Key, float] = {}
        self._lock = threading.Lock()
        plane.metrics.recorder.subscribe(self._fold)

    # --- fed by the recorder ---------------------------------------------------------------
    def _fold(self, batch: list[Record]) -> None:
        """Observe a batch of answered calls, then share the windows that changed."""
        touched = {self._observe(r[6]) for r in batch if r[0] == "call" and r[6] is not None}
        for key in touched - {None}:
            assert key is not None
            if time.monotonic() - self._published.get(key, -math.inf) >= PUBLISH_EVERY_S:
                self._publish(key)

    def _observe(self, a: Answer) -> Key | None:
        """Count one answer's rows in its version's window, or as skipped."""
        key = (a.model, a.version)
        expected = self._expectation(key)
        if expected is None:
            return None
        fits = a.target == expected.target and a.values.shape[2] == len(expected.labels)
        if not fits or a.values.shape[0] != a.rows:
            with self._lock:
                self._skipped[key] = self._skipped.get(key, 0) + a.rows
            return None
        self._window(key, len(expected.labels)).observe(a.values)
        return key

    def _expectation(self, key: Key) -> _Expected | None:
        """The default target and players of a tabular model version (None otherwise)."""
        if key not in self._expected:
            self._expected[key] = None
            model = self.plane.repo.get(*key)
            if model.modality.kind == "tabular":
                players = default_players(model, self.plane.settings)
                self._expected[key] = _Expected(resolve_target(model, "", (), "").key,
                                                players.labels)
        return self._expected[key]

    def _window(self, key: Key, features: int) -> LiveWindow:
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = LiveWindow(features, self.window_s)
            return window

    # --- shared store ----------------------------------------------------------------------
    def _publish(self, key: Key) -> None:
        """Write this replica's summary of a version, kept for one window."""
        window = self._windows.get(key)
        store = self.plane.store
        if window is None or not store.shared:
            return
        self._published[key] = time.monotonic()
        store.put_member(group_key(key), self.replica, encode(window.slices(self.replica)),
                         self.window_s)

    def _others(self, key: Key, slice_seconds: float) -> tuple[list[Slices], list[str]]:
        """The other replicas' summaries of a version; stale or unreadable ones are left out
        (and stale ones removed), with a note for those that could not be read."""
        store, out, notes, stale = self.plane.store, [], [], []
        for member, blob in store.members(group_key(key)).items():
            if member == self.replica:
                continue
            try:
                part = decode(blob, f"live importance of replica {member!r}")
            except CorruptValue as err:
                log.error("%s", err)
                self.plane.metrics.redis_errors.inc()
                notes.append(f"replica {member!r}: its summary is unreadable and was left out")
                continue
            if time.time() - part.written > self.window_s:
                stale.append(member)
            elif not math.isclose(part.slice_seconds, slice_seconds):
                notes.append(f"replica {member!r}: another SIDELIGHT_DRIFT_WINDOW_SECONDS; "
                             "left out")
            else:
                out.append(part)
        store.drop_members(group_key(key), stale)
        return out, notes

    # --- GetLiveImportance -----------------------------------------------------------------
    def importance(self, model: str, version: str = "", window_s: float = 0.0) -> LiveResult:
        """Mean |attribution| per feature over the last `window_s` seconds (0 = the drift
        window) of this replica's answers and, with a shared store, every replica's."""
        loaded = self.plane.repo.get(model, version)
        if not math.isfinite(window_s) or window_s < 0:
            raise InvalidArgument("window_seconds: must be a finite number >= 0 (0 = the drift "
                                  "window)")
        key = (loaded.name, loaded.version)
        self.plane.metrics.recorder.fold()  # the answers just served count
        expected = self._expectation(key)
        if expected is None:
            empty = LiveFigures(np.zeros(0), np.zeros(0), 0, 0, 0.0)
            return LiveResult(loaded.name, loaded.version, (), empty, (
                f"live importance is kept for tabular models; this model's inputs are read "
                f"as {loaded.modality.kind}",))
        notes = self._window_notes(window_s)
        self._publish(key)
        mine = self._window(key, len(expected.labels))
        others, more = self._others(key, mine.slice_seconds)
        figures = combine([mine.slices(self.replica), *others], mine.now(),
                          window_s or self.window_s, mine.slice_seconds)
        return LiveResult(loaded.name, loaded.version, expected.labels, figures,
                          (*notes, *more, *_few_rows_note(figures.rows),
                           *self._skipped_note(key)))

    def _window_notes(self, window_s: float) -> tuple[str, ...]:
        if window_s <= self.window_s:
            return ()
        return (f"window_seconds: {window_s:g} s asked; the last {self.window_s:g} s are kept "
                "(SIDELIGHT_DRIFT_WINDOW_SECONDS)",)

    def _skipped_note(self, key: Key) -> tuple[str, ...]:
        with self._lock:
            skipped = self._skipped.get(key, 0)
        if not skipped:
            return ()
        return (f"{skipped} row(s) explained on another target or with other players since "
                "start-up are not counted on this replica",)


def _few_rows_note(rows: int) -> tuple[str, ...]:
    """What zeros mean when the window holds too few rows for the figures."""
    if rows == 0:
        return ("no rows were explained in the window: mean_abs and std_errors are 0",)
    if rows == 1:
        return ("one row was explained in the window: its std_errors are unknown (0 here)",)
    return ()


def group_key(key: Key) -> str:
    """Where the replicas' summaries of a model version are kept (under the store's prefix)."""
    return f"live:{key[0]}:{key[1]}"

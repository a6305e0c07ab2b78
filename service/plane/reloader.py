"""Models change without restarts: the repository is looked at every
SIDELIGHT_RELOAD_INTERVAL_SECONDS in a thread the server owns. A model whose files changed and
then stayed the same for one interval (a copy in progress is never loaded half-written) is
loaded beside the serving one, warmed as at start-up, and swapped in; calls in flight finish
on the version object they started with. A version that fails to load leaves the one loaded
before serving, and says so: GetModel's notes, sidelight_model_reloads_total{outcome="failed"}
and one log line. Removed versions and models are unloaded, as Triton's poll mode does, but a
repository that cannot be read or has become empty (a volume gone) unloads nothing."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from service.models.reload import CONFIG, FAILED, LOADED, OUTCOMES, Outcome, Reload, reload_model
from service.models.repository import ModelEntry
from service.models.stamps import ModelStamp, scan_repository, settled
from service.plane.dataplane import DataPlane

log = logging.getLogger(__name__)
CLOSE_WAIT_S = 10.0  # how long close() waits for a reload in progress (a model being loaded)


class Reloader:
    """Looks at the model repository every `interval` seconds and swaps changed models in."""

    def __init__(self, plane: DataPlane, on_swap: Callable[[], None] | None = None) -> None:
        self.plane, self.repo = plane, plane.repo
        self.root = plane.settings.models_dir
        self.interval = plane.settings.reload_interval_seconds
        self._before: dict[str, ModelStamp] = dict(self.repo.stamps)  # the previous look
        self._on_swap = on_swap or (lambda: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreadable = False  # said once per outage, not once per look
        self._zero(self.repo.entries)

    def start(self) -> Reloader:
        """Start looking (nothing when the interval is 0)."""
        if self.interval > 0:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="sidelight-reload")
            self._thread.start()
        return self

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Stop looking and wait for a reload in progress: a thread still inside onnxruntime
        when the interpreter exits aborts the process."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the looking thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # the next look tries again; the thread never dies
                log.exception("model reload: looking at the repository failed")

    def poll(self) -> list[Reload]:
        """One look: reload every model whose files settled on something not loaded."""
        now = scan_repository(self.root)
        if now is None or (not now and self.repo.entries):  # an empty volume: a mount gone
            if not self._unreadable:
                log.error("model reload: the repository %s is %s; serving the models loaded "
                          "so far", self.root, "unreadable" if now is None else "empty")
            self._unreadable = True
            return []
        self._unreadable = False
        names = settled(self.repo.stamps, self._before, now)
        self._before = now
        done = [self._reload(name, now.get(name)) for name in names if not self._stop.is_set()]
        if done:
            self._on_swap()
        return done

    def _reload(self, name: str, stamp: ModelStamp | None) -> Reload:
        """Load, warm, swap in, then report what changed."""
        before = self.repo.entries.get(name)
        found = reload_model(self.root, name, stamp, self.repo.stamps.get(name), before,
                             self.plane.settings, self.plane.method_problem)
        for model in found.loaded:
            self.plane.adopt(model)
        self.repo.publish(name, found.entry, found.stamp)
        self._gauges(name, before, found.entry)
        for outcome in found.outcomes:
            self._report(name, outcome, before)
        return found

    def _gauges(self, name: str, before: ModelEntry | None, after: ModelEntry | None) -> None:
        """sidelight_model_ready for the new entry; versions it no longer has are dropped
        (and forgotten by the plane), so a repaired model stops firing its alert."""
        ready = self.plane.metrics.model_ready
        now = {} if after is None else {**{v: 0 for v in after.failures},
                                        **{v: 1 for v in after.versions}}
        for version in _labels(before) - set(now):
            self.plane.forget(name, version)
            ready.remove(name, version)  # absent: nothing to do
        for version, value in now.items():
            ready.labels(name, version).set(value)
        if before is None:
            self._zero([name])
            self.plane.metrics.initialise([name], self.plane.methods.known())

    def _report(self, name: str, o: Outcome, before: ModelEntry | None) -> None:
        """The counter and one log line per version."""
        self.plane.metrics.model_reloads.labels(name, o.outcome).inc()
        served = before is not None and o.version in before.versions
        if o.outcome == LOADED:
            log.info("model %s version %s %s (sha256 %s)", name, o.version,
                     "reloaded" if served else "loaded", o.detail)
        elif o.outcome == FAILED and o.version == CONFIG:
            log.error("model %s: explain.yaml cannot be used%s: %s", name,
                      ", the versions loaded before go on serving" if before and before.versions
                      else "", o.detail)
        elif o.outcome == FAILED:
            log.error("model %s version %s failed to load%s: %s", name, o.version,
                      ", the file loaded before goes on serving" if served else "", o.detail)
        else:
            log.info("model %s version %s removed from the repository: unloaded", name,
                     o.version)

    def _zero(self, names: Iterable[str]) -> None:
        """Counters at 0 for every outcome, so rate() and alerts see the first one."""
        for name in names:
            for outcome in OUTCOMES:
                self.plane.metrics.model_reloads.labels(name, outcome)


def _labels(entry: ModelEntry | None) -> set[str]:
    """The versions an entry has a sidelight_model_ready series for."""
    return set() if entry is None else {*entry.versions, *entry.failures}

"""Per-client limits on background uploads (count and bytes per window), so one client cannot
fill the store that every replica shares. Kept per replica, in memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from explainers.errors import ResourceExhausted
from service.config import Settings

MAX_CLIENTS = 10_000  # clients tracked at once; past it the oldest window is forgotten


@dataclass
class Window:
    """One client's uploads since `start` (time.monotonic())."""

    start: float
    count: int = 0
    nbytes: int = 0


class UploadQuota:
    """At most `max_count` uploads and `max_bytes` bytes per client per `window_s` seconds (0 =
    no limit). A client's window opens at its first upload after the previous one closed."""

    def __init__(self, max_count: int, max_bytes: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_count, self.max_bytes, self.window_s = max_count, max_bytes, window_s
        self._clock, self._lock = clock, threading.Lock()
        self._windows: dict[str, Window] = {}  # oldest window first

    @classmethod
    def from_settings(cls, s: Settings) -> UploadQuota:
        return cls(s.uploads_per_client, s.upload_bytes_per_client, s.upload_window_seconds)

    def admit(self, client: str, nbytes: int) -> None:
        """Count an upload of `nbytes` by `client`, or RESOURCE_EXHAUSTED naming the limit."""
        with self._lock:
            w = self._window(client)
            if self.max_count and w.count + 1 > self.max_count:
                raise ResourceExhausted(self._refusal(
                    client, w, f"made {w.count} uploads",
                    f"at most {self.max_count} (SIDELIGHT_UPLOADS_PER_CLIENT)"))
            if self.max_bytes and w.nbytes + nbytes > self.max_bytes:
                raise ResourceExhausted(self._refusal(
                    client, w, f"uploaded {w.nbytes} bytes", f"{nbytes} more would pass "
                    f"{self.max_bytes} (SIDELIGHT_UPLOAD_BYTES_PER_CLIENT)"))
            w.count, w.nbytes = w.count + 1, w.nbytes + nbytes

    def _window(self, client: str) -> Window:
        """The client's open window, opening a new one (and forgetting closed ones) as needed."""
        now = self._clock()
        w = self._windows.get(client)
        if w is not None and now - w.start < self.window_s:
            return w
        self._windows.pop(client, None)
        if len(self._windows) >= MAX_CLIENTS:
            self._forget(now)
        w = self._windows[client] = Window(now)
        return w

    def _forget(self, now: float) -> None:
        """Drop closed windows; if every window is open, the oldest one."""
        closed = [c for c, w in self._windows.items() if now - w.start >= self.window_s]
        for c in closed or [next(iter(self._windows))]:
            del self._windows[c]

    def _refusal(self, client: str, w: Window, used: str, limit: str) -> str:
        retry = max(0.0, self.window_s - (self._clock() - w.start))
        return (f"PutBackground: client {client!r} {used} in its current {self.window_s:g} s "
                f"window; {limit}; retry in {retry:.0f} s")

"""Background (reference) datasets by name. The in-memory store is the embedded default; a Redis
store with the same protocol shares them between replicas."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from explainers.base import Array
from explainers.errors import InvalidArgument, NotFound

DEFAULT_NAME = "default"


@dataclass(frozen=True)
class BackgroundMeta:
    """What is known about a stored background without reading its rows."""

    model: str
    version: str
    name: str
    rows: int
    features: int
    dtype: str
    sha256: str
    created: float
    source: str
    model_sha256: str
    feature_names: tuple[str, ...] = ()


def data_sha256(data: Array) -> str:
    """sha256 of the little-endian bytes: the identity of a background's content."""
    little = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
    return hashlib.sha256(little.tobytes()).hexdigest()


def make_meta(model: str, version: str, name: str, data: Array, source: str, model_sha256: str,
              feature_names: tuple[str, ...] = ()) -> BackgroundMeta:
    """Metadata for a float matrix about to be stored."""
    if data.ndim != 2 or data.dtype not in (np.float32, np.float64):
        raise InvalidArgument("background: must be a float32 or float64 [rows, features] matrix")
    return BackgroundMeta(model, version, name, int(data.shape[0]), int(data.shape[1]),
                          str(data.dtype), data_sha256(data), time.time(), source, model_sha256,
                          feature_names)


class BackgroundStore(Protocol):
    """Named backgrounds per model version."""

    def put(self, meta: BackgroundMeta, data: Array) -> BackgroundMeta: ...

    def get(self, model: str, version: str, name: str) -> tuple[BackgroundMeta, Array]: ...

    def head(self, model: str, version: str, name: str) -> BackgroundMeta: ...

    def list(self, model: str = "") -> list[BackgroundMeta]: ...

    def delete(self, model: str, version: str, name: str) -> bool: ...


class MemoryStore:
    """The embedded store: a dict behind a lock; arrays are stored read-only."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str, str], tuple[BackgroundMeta, Array]] = {}
        self._lock = threading.Lock()

    def put(self, meta: BackgroundMeta, data: Array) -> BackgroundMeta:
        frozen = np.array(data, copy=True)
        frozen.setflags(write=False)
        with self._lock:
            self._items[(meta.model, meta.version, meta.name)] = (meta, frozen)
        return meta

    def get(self, model: str, version: str, name: str) -> tuple[BackgroundMeta, Array]:
        with self._lock:
            item = self._items.get((model, version, name))
        if item is None:
            raise NotFound(f"background: no background {name!r} for model {model!r} "
                           f"version {version}")
        return item

    def head(self, model: str, version: str, name: str) -> BackgroundMeta:
        return self.get(model, version, name)[0]

    def list(self, model: str = "") -> list[BackgroundMeta]:
        with self._lock:
            metas = [m for m, _ in self._items.values()]
        return sorted((m for m in metas if not model or m.model == model),
                      key=lambda m: (m.model, m.version, m.name))

    def delete(self, model: str, version: str, name: str) -> bool:
        with self._lock:
            return self._items.pop((model, version, name), None) is not None

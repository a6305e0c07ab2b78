"""Background (reference) datasets by name. The in-memory store is the embedded default; the Redis
store (service/store/redis.py) has the same protocol and shares them between replicas.

Stores also hold small derived blobs (f(background) per target, cached explanations) under
content-addressed keys; the in-memory store keeps none because one process has its own caches."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from explainers.base import Array
from explainers.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    quoted,
)
from explainers.memory import nbytes_of

DEFAULT_NAME = "default"
FLOAT_DTYPES = ("float32", "float64")
DERIVED_TTL_S = 7 * 24 * 3600.0  # derived blobs are content-addressed: the TTL only bounds growth


class CorruptValue(FailedPrecondition):
    """A stored value whose bytes do not match its sha256 or header: reported, never used."""


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
    return hashlib.sha256(little_endian_view(data)).hexdigest()


def little_endian(data: Array) -> bytes:
    """The array's values as C-ordered little-endian bytes (the storage format; never pickle)."""
    return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes()


def little_endian_view(data: Array) -> memoryview | bytes:
    """The same bytes as `little_endian`, without a copy when the array already is C-ordered
    little-endian (uploads are)."""
    if data.flags.c_contiguous and data.dtype == data.dtype.newbyteorder("<"):
        return data.data.cast("B")
    return little_endian(data)


def read_only(data: Array) -> Array:
    """The array itself when nothing can change it (read-only over immutable bytes, as decoded
    uploads and Redis values are), else a read-only copy."""
    base = data.base
    while isinstance(base, np.ndarray):  # views of views: find who owns the memory
        base = base.base
    if not data.flags.writeable and isinstance(base, bytes):
        return data
    out = np.array(data, copy=True)
    out.setflags(write=False)
    return out


def make_meta(model: str, version: str, name: str, data: Array, source: str, model_sha256: str,
              feature_names: tuple[str, ...] = ()) -> BackgroundMeta:
    """Metadata for a float matrix about to be stored."""
    if data.ndim != 2 or data.dtype not in (np.float32, np.float64):
        raise InvalidArgument("background: must be a float32 or float64 [rows, features] matrix")
    return BackgroundMeta(model, version, name, int(data.shape[0]), int(data.shape[1]),
                          str(data.dtype), data_sha256(data), time.time(), source, model_sha256,
                          feature_names)


class BackgroundStore(Protocol):
    """Named backgrounds per model version, plus content-addressed blobs for derived data."""

    shared: bool  # whether other replicas see what this store holds (blobs are worth writing)

    def put(self, meta: BackgroundMeta, data: Array) -> BackgroundMeta: ...

    def get(self, model: str, version: str, name: str) -> tuple[BackgroundMeta, Array]: ...

    def head(self, model: str, version: str, name: str) -> BackgroundMeta: ...

    def list(self, model: str = "") -> list[BackgroundMeta]: ...

    def delete(self, model: str, version: str, name: str) -> bool: ...

    def persisted(self, meta: BackgroundMeta) -> bool:
        """False while this background waits on this replica for its shared store."""
        ...

    def pending(self) -> int:
        """Uploads held locally until the shared store can take them."""
        ...

    def healthy(self) -> bool:
        """Whether the shared store answers (always true in memory)."""
        ...

    def get_blob(self, key: str) -> bytes | None:
        """A derived blob, or None when absent or the store cannot be reached."""
        ...

    def put_blob(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store a derived blob for `ttl_s` seconds; best effort (a cache, not data)."""
        ...

    def put_member(self, key: str, member: str, value: bytes, ttl_s: float) -> None:
        """Set one replica's entry of a shared group (its live-importance summary, say); the
        group lives `ttl_s` seconds after its last write. Best effort."""
        ...

    def members(self, key: str) -> dict[str, bytes]:
        """Every entry of a shared group by member; empty when absent or unreachable."""
        ...

    def drop_members(self, key: str, members: Sequence[str]) -> None:
        """Remove stale entries of a shared group. Best effort."""
        ...

    def close(self) -> None: ...


class MemoryStore:
    """The embedded store: a dict behind a lock; arrays are stored read-only. Backgrounds are
    data, not a cache: past `max_bytes` (SIDELIGHT_BACKGROUND_STORE_BYTES) uploads are refused,
    never evicted."""

    shared = False

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._items: dict[tuple[str, str, str], tuple[BackgroundMeta, Array, int]] = {}
        self._bytes = 0  # sum of the entries' sizes
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored backgrounds (rows, headers and metadata)."""
        return self._bytes

    def put(self, meta: BackgroundMeta, data: Array) -> BackgroundMeta:
        """Store (or replace) a background; RESOURCE_EXHAUSTED when it would not fit."""
        frozen = read_only(data)
        size, key = nbytes_of(meta, frozen), (meta.model, meta.version, meta.name)
        with self._lock:
            old = self._items.get(key)
            used = self._bytes - (old[2] if old else 0)
            if self.max_bytes is not None and used + size > self.max_bytes:
                raise ResourceExhausted(
                    f"background: {meta.name!r} needs {size} bytes and the in-memory store "
                    f"holds {used} of its {self.max_bytes} (SIDELIGHT_BACKGROUND_STORE_BYTES); "
                    "delete backgrounds or raise the limit")
            self._items[key] = (meta, frozen, size)
            self._bytes = used + size
        return meta

    def get(self, model: str, version: str, name: str) -> tuple[BackgroundMeta, Array]:
        with self._lock:
            item = self._items.get((model, version, name))
        if item is None:
            raise NotFound(f"background: no background {quoted(name)} for model {model!r} "
                           f"version {version}")
        return item[0], item[1]

    def head(self, model: str, version: str, name: str) -> BackgroundMeta:
        return self.get(model, version, name)[0]

    def list(self, model: str = "") -> list[BackgroundMeta]:
        with self._lock:
            metas = [m for m, _, _ in self._items.values()]
        return sorted((m for m in metas if not model or m.model == model),
                      key=lambda m: (m.model, m.version, m.name))

    def delete(self, model: str, version: str, name: str) -> bool:
        with self._lock:
            item = self._items.pop((model, version, name), None)
            self._bytes -= item[2] if item else 0
        return item is not None

    def persisted(self, meta: BackgroundMeta) -> bool:
        return True

    def pending(self) -> int:
        return 0

    def healthy(self) -> bool:
        return True

    def get_blob(self, key: str) -> bytes | None:
        return None

    def put_blob(self, key: str, value: bytes, ttl_s: float) -> None:
        return None

    def put_member(self, key: str, member: str, value: bytes, ttl_s: float) -> None:
        return None  # one process: the caller's own figures are all there is

    def members(self, key: str) -> dict[str, bytes]:
        return {}

    def drop_members(self, key: str, members: Sequence[str]) -> None:
        return None

    def close(self) -> None:
        return None


# --- framing of derived blobs ------------------------------------------------------------------
def frame(header: dict[str, object], payload: bytes) -> bytes:
    """One JSON header line (with the payload's sha256) then the payload bytes."""
    head = dict(header, sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload))
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + payload


def unframe(blob: bytes, where: str) -> tuple[dict[str, object], bytes]:
    """Header and payload of a framed blob, or CorruptValue naming `where`."""
    line, sep, payload = blob.partition(b"\n")
    try:
        header = json.loads(line) if sep else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("bytes") != len(payload):
        raise CorruptValue(f"{where}: stored value is truncated or has no valid header")
    if header.get("sha256") != hashlib.sha256(payload).hexdigest():
        raise CorruptValue(f"{where}: stored value does not match its sha256")
    return header, payload


def encode_array(array: Array) -> bytes:
    """A float array as a framed blob: dtype and shape in the header, raw little-endian bytes."""
    if array.dtype.name not in FLOAT_DTYPES:
        raise InvalidArgument(f"blob: {array.dtype} arrays are not stored; use float32/float64")
    return frame({"dtype": array.dtype.name, "shape": list(array.shape)}, little_endian(array))


def decode_array(blob: bytes, where: str) -> Array:
    """The read-only array of a framed blob, verified against its sha256 and shape."""
    header, payload = unframe(blob, where)
    dtype, shape = header.get("dtype"), header.get("shape")
    if dtype not in FLOAT_DTYPES or not isinstance(shape, list) \
            or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise CorruptValue(f"{where}: stored header has no valid dtype and shape")
    little = np.dtype(str(dtype)).newbyteorder("<")
    if little.itemsize * int(np.prod(shape)) != len(payload):
        raise CorruptValue(f"{where}: stored size does not match its shape {shape}")
    out = np.frombuffer(payload, dtype=little).reshape(shape).astype(str(dtype), copy=False)
    out.setflags(write=False)
    return out


def derived_key(kind: str, *parts: object) -> str:
    """A content-addressed key for derived data: `<kind>:<sha256 of the parts>`."""
    text = json.dumps([str(p) for p in parts], separators=(",", ":"))
    return f"{kind}:{hashlib.sha256(text.encode()).hexdigest()}"


def predictions_key(background_sha: str, model_sha: str, *target: object) -> str:
    """Where f(background) for one target is cached: `fbg:<background sha>:<model sha>:<target>`
    (the target's output, columns and scale, hashed)."""
    return f"fbg:{background_sha}:{model_sha}:{derived_key('t', *target)[2:18]}"

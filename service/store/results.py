"""Explanations of identical requests: an in-process LRU with a TTL, shared through the store.

The key (`request_key`) is a sha256 over everything that decides the answer: the model file's
sha256 with the model's name, version and feature names; the validated input matrix (float64
bytes, so FP32/FP64/typed-contents encodings of the same values are one request); the requested
method; the target; the background's name and sha256; the seed; max_evaluations; target_error;
and the budget class (the budget rounded to a power of two in milliseconds).

Policy: every successful answer is cached. With a seed, an answer is a deterministic function of
the key except for how far a sampler got within its budget, and the budget class bounds that: a
cached answer is one the same request could have received. Errors are never cached.

In Redis (`<prefix>result:<sha256>`, with the TTL) a result is framed JSON checked by sha256:
arrays as base64 of little-endian bytes, objects only of an allowlist of frozen dataclasses.
Never pickle.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from explainers.base import Array
from explainers.memory import ByteLru, nbytes_of
from service.store.backgrounds import CorruptValue, frame, little_endian, unframe

log = logging.getLogger(__name__)
T = TypeVar("T")
KEY_FORMAT = 1  # bump when the meaning of a cached answer changes
ARRAY_DTYPES = ("float64", "float32", "int64", "int32", "bool")


class Blobs(Protocol):
    """Where results are shared: a BackgroundStore's blob methods."""

    def get_blob(self, key: str) -> bytes | None: ...

    def put_blob(self, key: str, value: bytes, ttl_s: float) -> None: ...


def budget_class(budget_ms: float) -> int:
    """The budget's nearest power of two in ms: class k holds [2^(k-1/2), 2^(k+1/2)) ms, so
    400 and 700 ms are one class (9) and 300 ms another (8)."""
    return round(math.log2(max(budget_ms, 1e-3)))


def request_key(X: Array, *parts: object) -> str:
    """`result:<sha256>` over the input matrix (rows, features) and the other parts, in order."""
    h = hashlib.sha256(json.dumps([KEY_FORMAT, list(X.shape), [str(p) for p in parts]],
                                  separators=(",", ":")).encode())
    h.update(np.ascontiguousarray(X, dtype="<f8").tobytes())
    return f"result:{h.hexdigest()}"


class ResultCache(Generic[T]):
    """LRU bounded by entries and bytes, with a TTL; misses are looked up in the shared blobs,
    puts written to them."""

    def __init__(self, size: int, ttl_s: float, kind: type[T], types: Iterable[type] = (),
                 shared: Blobs | None = None, clock: Callable[[], float] = time.time,
                 max_bytes: int = 2**62, nbytes: Callable[[T], int] = nbytes_of) -> None:
        self.size, self.ttl_s, self.kind, self.shared = size, ttl_s, kind, shared
        self.max_bytes = max_bytes
        self._clock = clock
        self._codec = Codec((kind, *types))
        self._items: ByteLru[str, tuple[float, T]] = ByteLru(  # key -> (expires, value)
            max_bytes, size, lambda item: nbytes(item[1]))

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        """Bytes held by this process's entries."""
        return self._items.nbytes

    def get(self, key: str) -> T | None:
        """The cached value, from this process first, then from the shared store."""
        if not self.enabled:
            return None
        item = self._items.get(key)
        if item is not None and item[0] > self._clock():
            return item[1]
        if item is not None:
            self._items.pop(key)
        return self._get_shared(key)

    def put(self, key: str, value: T) -> None:
        """Keep the value here and in the shared store, for ttl_s seconds."""
        if not self.enabled:
            return
        self._keep(key, value, self._clock() + self.ttl_s)
        if self.shared is None:
            return
        try:
            blob = frame({"created": self._clock()}, self._codec.encode(value))
        except TypeError as err:  # a field this codec cannot express: share nothing
            log.debug("result not shared: %s", err)
            return
        self.shared.put_blob(key, blob, self.ttl_s)

    def __len__(self) -> int:
        return len(self._items)

    def _keep(self, key: str, value: T, expires: float) -> None:
        self._items.put(key, (expires, value))

    def _get_shared(self, key: str) -> T | None:
        blob = self.shared.get_blob(key) if self.shared is not None else None
        if blob is None:
            return None
        try:
            header, payload = unframe(blob, key)
            value = self._codec.decode(payload, key)
            expires = float(header["created"]) + self.ttl_s  # type: ignore[arg-type]
        except (CorruptValue, KeyError, TypeError, ValueError) as err:
            log.error("result cache: %s", err)
            return None
        if not isinstance(value, self.kind) or expires <= self._clock():
            return None
        self._keep(key, value, expires)
        return value


class Codec:
    """JSON for frozen dataclasses of an allowlist, tuples, numbers, strings and arrays."""

    def __init__(self, types: Iterable[type]) -> None:
        self.types = {t.__name__: t for t in types}

    def encode(self, value: object) -> bytes:
        return json.dumps(self._to(value), separators=(",", ":")).encode()

    def decode(self, payload: bytes, where: str) -> object:
        try:
            return self._from(json.loads(payload))
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptValue(f"{where}: cannot decode ({type(err).__name__}: {err})") from None

    def _to(self, v: object) -> Any:
        if isinstance(v, np.ndarray):
            if v.dtype.name not in ARRAY_DTYPES:
                raise TypeError(f"array of {v.dtype}")
            return {"@a": v.dtype.name, "s": list(v.shape),
                    "b": base64.b64encode(little_endian(v)).decode()}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            if self.types.get(type(v).__name__) is not type(v):
                raise TypeError(f"{type(v).__name__} is not in the allowlist")
            return {"@d": type(v).__name__,
                    "f": {f.name: self._to(getattr(v, f.name)) for f in dataclasses.fields(v)}}
        if isinstance(v, tuple):
            if all(isinstance(x, str) for x in v):  # names: the common case, kept cheap
                return {"@t": list(v)}
            return {"@t": [self._to(x) for x in v]}
        if isinstance(v, np.generic):
            return v.item()
        if v is None or isinstance(v, str | int | float | bool):
            return v
        raise TypeError(f"cannot encode {type(v).__name__}")

    def _from(self, v: Any) -> object:
        if isinstance(v, dict) and "@a" in v:
            return _array(str(v["@a"]), v["s"], base64.b64decode(v["b"], validate=True))
        if isinstance(v, dict) and "@d" in v:
            cls = self.types[str(v["@d"])]
            return cls(**{str(k): self._from(x) for k, x in dict(v["f"]).items()})
        if isinstance(v, dict) and "@t" in v:
            return tuple(self._from(x) for x in v["@t"])
        if v is None or isinstance(v, str | int | float | bool):
            return v
        raise TypeError(f"unexpected {type(v).__name__}")


def _array(dtype: str, shape: list[int], raw: bytes) -> Array:
    """A read-only array from its little-endian bytes (dtype from the allowlist only)."""
    if dtype not in ARRAY_DTYPES:
        raise TypeError(f"array dtype {dtype}")
    out = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    out = out.astype(dtype, copy=False)
    out.setflags(write=False)
    return out

"""Memory accounting for caches: what an object holds in bytes, and an LRU bounded by bytes.

Every cache of the sidecar (decoded backgrounds, f(background), TreeSHAP tables, results) is a
`ByteLru`, so a configured byte limit bounds what it holds whatever its entries look like.
"""

from __future__ import annotations

import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import numpy as np

K = TypeVar("K")
V = TypeVar("V")
_LEAVES = frozenset({str, bytes, int, float, bool, complex, type(None), np.float64,
                     np.float32, np.int64, np.bool_})  # hold nothing else
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
           types.MethodType)  # not part of an entry: never walked


def nbytes_of(*objects: object) -> int:
    """Estimated bytes held by `objects` and everything they reference: arrays by header plus
    data (a view counts its base), containers, dataclasses and plain objects by their
    attributes; each container once, strings and numbers at every reference. Shared objects
    count for every entry that holds them, so a cache bounded by this figure holds at most its
    bound."""
    seen: set[int] = set()
    stack: list[object] = list(objects)
    total = 0
    while stack:
        obj = stack.pop()
        kind = type(obj)
        if kind in _LEAVES:
            total += sys.getsizeof(obj)
            continue
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, tuple | list):
            stack.extend(obj)
        elif isinstance(obj, np.ndarray):
            if obj.base is not None:  # a view: the data belongs to its base
                stack.append(obj.base)
        else:
            stack.extend(_referents(obj))
    return total


def _referents(obj: object) -> Iterator[object]:
    """What `obj` holds that counts towards its size (not its class, module or functions)."""
    if isinstance(obj, dict):
        yield from obj.keys()
        yield from obj.values()
    elif isinstance(obj, set | frozenset):
        yield from obj
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict):
        yield from attributes.values()
    slots = getattr(type(obj), "__slots__", ())
    for name in (slots,) if isinstance(slots, str) else slots:
        if hasattr(obj, name):
            yield getattr(obj, name)


class ByteLru(Generic[K, V]):
    """A thread-safe LRU holding at most `max_bytes` (entry sizes from `size`, measured once on
    insertion) and at most `max_items` entries. A value larger than the bound is not kept."""

    def __init__(self, max_bytes: int, max_items: int | None = None,
                 size: Callable[[V], int] = nbytes_of) -> None:
        self.max_bytes, self.max_items, self._size = max_bytes, max_items, size
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()  # key -> (value, bytes)
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held now (the sum of the entries' measured sizes)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        """The value (now the most recent), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: K, value: V) -> None:
        """Keep the value as the most recent, evicting the oldest until within the bounds."""
        size = self._size(value)
        with self._lock:
            self._drop(key)
            if size > self.max_bytes or self.max_items == 0:
                return
            self._items[key] = (value, size)
            self._bytes += size
            most = sys.maxsize if self.max_items is None else self.max_items
            while self._bytes > self.max_bytes or len(self._items) > most:
                self._drop(next(iter(self._items)))

    def get_or_build(self, key: K, build: Callable[[], V]) -> V:
        """The cached value, or `build()` (run outside the lock) kept for next time."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        value = build()
        self.put(key, value)
        return value

    def pop(self, key: K) -> V | None:
        """Remove and return the value, if present."""
        with self._lock:
            item = self._items.get(key)
            self._drop(key)
        return None if item is None else item[0]

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of the entries, oldest first."""
        with self._lock:
            return [(k, v) for k, (v, _) in self._items.items()]

    def _drop(self, key: K) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[1]

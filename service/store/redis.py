"""Backgrounds in Redis, shared by every replica, each replica keeping verified local copies.

Key schema (`prefix` = SIDELIGHT_REDIS_KEY_PREFIX, default `sidelight:v1:`):

- `<prefix>bg:<model>:<version>:<name>`: a hash written atomically by one Lua script with fields
  `header` (JSON: model, version, name, rows, features, dtype, sha256, created, source,
  model_sha256, feature_names), `data` (raw little-endian float32/float64 bytes, never a pickle),
  `sha256`, `created`, `model_sha256` (the ONNX file the background was stored for).
- `<prefix>bg-index`: set of those keys (ListBackgrounds).
- `<prefix>epoch`: random id created once per Redis dataset. A new id means Redis lost its data
  (restart without persistence, FLUSHALL): replicas then write back the copies they hold.
- `<prefix>fbg:...`, `<prefix>result:...`: derived blobs (f(background), explanations) with a TTL.
- `<prefix>live:<model>:<version>`: a hash, one entry per replica (its live-importance summary,
  service/monitoring/live.py), expiring a window after its last write (`put_member`).

Freshness: a local copy is served without asking Redis for `check_s` seconds after its last
check; the next use reads the 64-byte `sha256` field (one round trip) and moves the data only when
it changed. So a replacement is used by every replica within `check_s` (SIDELIGHT_REDIS_CHECK_MS).

Failure: a failed command marks Redis down. While down, the hot path never touches Redis: it
serves local copies, holds uploads locally (PutBackground answers persisted=false) and refuses
deletes (UNAVAILABLE). A background thread reconnects with backoff (50 ms doubling to 2 s), then
writes held uploads (unless Redis meanwhile got a newer one) and, if the epoch changed, restores
its local copies where Redis has none. Every decoded value is checked against its sha256 and
size; a corrupt one is logged, counted in sidelight_redis_errors and never used.

Full: a Redis at its `maxmemory` is not down. Reads, deletes and the liveness probe (a read of
the epoch) work; an upload that would not fit once every evictable (TTL) key is gone is refused
(RESOURCE_EXHAUSTED naming the limit) before it is sent, and so is one Redis itself refuses
(OOM). Cached blobs are simply not written.

Memory: local copies and held uploads together stay within `local_bytes`
(SIDELIGHT_BACKGROUND_STORE_BYTES), held uploads within half of it.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from explainers.base import Array
from explainers.errors import NotFound, ResourceExhausted, Unavailable, quoted
from explainers.memory import nbytes_of
from service.config import Settings
from service.monitoring.metrics import Metrics
from service.store.backgrounds import (
    FLOAT_DTYPES,
    BackgroundMeta,
    CorruptValue,
    little_endian_view,
    read_only,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
ALWAYS, ABSENT, SEED, NEWER = "always", "absent", "seed", "newer"  # write modes of PUT_SCRIPT
SEED_SOURCE = "explain.yaml"
MIN_BACKOFF_S, MAX_BACKOFF_S, PROBE_S = 0.05, 2.0, 1.0
LOCAL_BYTES = 512 * 1024**2  # SIDELIGHT_BACKGROUND_STORE_BYTES's default at a 2 GiB limit
HEADER_FORMAT = 1

# KEYS: background hash, index set. ARGV: mode, header, data, sha256, created, model_sha256.
# Modes: always; absent (only if no value); seed (unless a value for the same model file exists);
# newer (unless the stored value was created at or after this one). Returns 1 when written.
# HSET is the first write: Redis refuses a script's first write that could grow memory when it
# was over maxmemory as the script started (OOM), and lets every later write through, so a
# DEL before it would let a replacement write past the limit. HSET replaces every field.
PUT_SCRIPT = """
local mode = ARGV[1]
if mode ~= 'always' and redis.call('EXISTS', KEYS[1]) == 1 then
  if mode == 'absent' then return 0 end
  if mode == 'seed' and redis.call('HGET', KEYS[1], 'model_sha256') == ARGV[6] then return 0 end
  if mode == 'newer' then
    local created = tonumber(redis.call('HGET', KEYS[1], 'created') or '')
    if created and created >= tonumber(ARGV[5]) then return 0 end
  end
end
redis.call('HSET', KEYS[1], 'header', ARGV[2], 'data', ARGV[3], 'sha256', ARGV[4],
           'created', ARGV[5], 'model_sha256', ARGV[6])
redis.call('PERSIST', KEYS[1])
redis.call('SADD', KEYS[2], KEYS[1])
return 1
"""


@dataclass(frozen=True)
class RedisOptions:
    """How to reach Redis and how long local copies are trusted."""

    url: str
    prefix: str = "sidelight:v1:"
    timeout_s: float = 1.0
    connect_timeout_s: float = 0.25
    max_connections: int = 32
    tls_ca: str | None = None
    check_s: float = 0.5
    local_size: int = 64
    local_bytes: int = LOCAL_BYTES

    @staticmethod
    def from_settings(s: Settings) -> RedisOptions:
        if not s.redis_url:
            raise ValueError("redis_url is not set")
        return RedisOptions(s.redis_url, s.redis_key_prefix, s.redis_timeout_ms / 1e3,
                            s.redis_connect_timeout_ms / 1e3, s.redis_max_connections,
                            str(s.redis_tls_ca) if s.redis_tls_ca else None,
                            s.redis_check_ms / 1e3, s.background_local_cache,
                            s.background_store_bytes)


def connect(o: RedisOptions) -> redis.Redis:
    """A client over a blocking pool: bounded connections, timeouts, one immediate retry on a
    dropped connection (a pooled socket from before a Redis restart) and none on a timeout, so
    a hung Redis stalls a request at most one timeout. The store's own thread reconnects. AUTH
    and TLS come from the URL."""
    kwargs: dict[str, Any] = {"max_connections": o.max_connections, "timeout": o.timeout_s,
                              "socket_timeout": o.timeout_s,
                              "socket_connect_timeout": o.connect_timeout_s,
                              "retry": Retry(NoBackoff(), 1, (redis.ConnectionError,))}
    if o.tls_ca and o.url.startswith("rediss://"):
        kwargs["ssl_ca_certs"] = o.tls_ca
    return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(o.url, **kwargs))


def masked(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url


class RedisDown(Exception):
    """Internal: one Redis operation failed; callers fall back to local copies."""


class RedisFull(RedisDown):
    """Internal: Redis is at its maxmemory and a write would not fit; the message says why."""


@dataclass
class Local:
    """A verified, decoded background held by this replica."""

    meta: BackgroundMeta
    data: Array  # (rows, features) read-only
    checked: float  # time.monotonic() of the last sha256 check against Redis
    pending: str = ""  # write mode while held for Redis; "" once written
    nbytes: int = field(init=False)  # what holding it costs (rows, metadata)

    def __post_init__(self) -> None:
        self.nbytes = nbytes_of(self.meta, self.data)


class RedisStore:
    """The BackgroundStore protocol over Redis with a local LRU and a pending-writes queue."""

    shared = True

    def __init__(self, options: RedisOptions, metrics: Metrics | None = None,
                 on_state: Callable[[bool], None] | None = None) -> None:
        self.options = options
        self._redis = connect(options)
        self._put_script = self._redis.register_script(PUT_SCRIPT)
        self._metrics, self._on_state = metrics, on_state
        self._index, self._epoch_key = f"{options.prefix}bg-index", f"{options.prefix}epoch"
        self._local: OrderedDict[str, Local] = OrderedDict()
        self._corrupt: dict[str, bytes] = {}  # key -> "sha256@created" of a value found corrupt
        self._lock, self._state_lock = threading.Lock(), threading.Lock()
        self._up: bool | None = None
        self._full = False  # the last write was refused for Redis's maxmemory
        self._epoch: str | None = None
        self._stop, self._wake = threading.Event(), threading.Event()
        self._sync()  # first contact now, so start-up knows whether Redis answers
        self._thread = threading.Thread(target=self._run, name="sidelight-redis", daemon=True)
        self._thread.start()

    def key(self, model: str, version: str, name: str) -> str:
        return f"{self.options.prefix}bg:{model}:{version}:{name}"

    # --- BackgroundStore ------------------------------------------------------------------
    def put(self, meta: BackgroundMeta, data: Array) -> BackgroundMeta:
        """Write to Redis now, or hold it locally (persisted() false) until Redis returns.
        RESOURCE_EXHAUSTED when Redis is full (an explain.yaml seed is held instead)."""
        key, entry = self.key(meta.model, meta.version, meta.name), Local(meta, read_only(data),
                                                                          0.0)
        mode = SEED if meta.source == SEED_SOURCE else ALWAYS
        if self._up:
            try:
                entry.checked = time.monotonic() if self._write(key, entry, mode) else -math.inf
                self._remember(key, entry)
                return meta
            except RedisFull as full:
                if mode != SEED:
                    raise ResourceExhausted(f"background: {full}; delete backgrounds or raise "
                                            "Redis's maxmemory") from None
                return self._hold(key, entry, SEED, f"Redis is full ({full})")
            except RedisDown:
                pass
        return self._hold(key, entry, SEED if mode == SEED else NEWER)

    def get(self, model: str, version: str, name: str) -> tuple[BackgroundMeta, Array]:
        """The local copy while fresh; else validate it by sha256, fetching only on change."""
        key = self.key(model, version, name)
        local = self._peek(key)
        if local is not None and not self._stale(local):
            return self._hit(local)
        if not self._up:
            return self._hit(self._fallback(key, local))
        try:
            sha, created = map(as_bytes, self._call(lambda r: r.hmget(key, ["sha256", "created"])))
            if sha is None and local is not None and self._data_lost():
                return self._hit(local)  # Redis lost its data: keep serving, restore it soon
        except RedisDown:
            return self._hit(self._fallback(key, local))
        if sha is None:
            self._forget(key)
            raise not_found(model, version, name)
        if local is not None and sha == local.meta.sha256.encode():
            local.checked = time.monotonic()
            return self._hit(local)
        return self._fetch(key, local, sha + b"@" + (created or b""), (model, version, name))

    def head(self, model: str, version: str, name: str) -> BackgroundMeta:
        """Metadata from the local copy or Redis's header field (the rows are not moved)."""
        key = self.key(model, version, name)
        local = self._peek(key)
        if local is not None and not self._stale(local):  # fresh, held, or Redis is away
            return local.meta
        if self._up:
            try:
                raw = as_bytes(self._call(lambda r: r.hget(key, "header")))
            except RedisDown:
                pass
            else:
                if raw is None:
                    raise not_found(model, version, name)
                return meta_from_header(raw, key)
        return self._fallback(key, local).meta

    def list(self, model: str = "") -> list[BackgroundMeta]:
        """Every stored background (this replica's copies while Redis is away)."""
        metas: dict[tuple[str, str, str], BackgroundMeta] = {}
        if self._up:
            with contextlib.suppress(RedisDown):
                metas = {(m.model, m.version, m.name): m
                         for m in self._call(lambda r: self._read_index(r, model))}
        with self._lock:
            local = [e for e in self._local.values() if e.pending or not self._up]
        metas.update({(e.meta.model, e.meta.version, e.meta.name): e.meta for e in local})
        return sorted((m for m in metas.values() if not model or m.model == model),
                      key=lambda m: (m.model, m.version, m.name))

    def delete(self, model: str, version: str, name: str) -> bool:
        """Delete in Redis and here; UNAVAILABLE while Redis is away (deletes are not queued)."""
        key = self.key(model, version, name)
        try:
            if not self._up:
                raise RedisDown
            removed = self._call(lambda r: self._delete(r, key))
        except RedisDown:
            raise Unavailable(f"background: Redis is unreachable; cannot delete {name!r} of "
                              f"model {model!r} on every replica, retry later") from None
        local = self._forget(key)
        return bool(removed) or (local is not None and bool(local.pending))

    def persisted(self, meta: BackgroundMeta) -> bool:
        with self._lock:
            entry = self._local.get(self.key(meta.model, meta.version, meta.name))
        return entry is None or not entry.pending

    def pending(self) -> int:
        with self._lock:
            return sum(1 for e in self._local.values() if e.pending)

    def healthy(self) -> bool:
        return bool(self._up)

    def get_blob(self, key: str) -> bytes | None:
        if not self._up:
            return None
        try:
            value = self._call(lambda r: r.get(self.options.prefix + key))
        except RedisDown:
            return None
        return value if isinstance(value, bytes) else None

    def put_blob(self, key: str, value: bytes, ttl_s: float) -> None:
        if not self._up:
            return
        with contextlib.suppress(RedisDown):
            self._call(lambda r: r.set(self.options.prefix + key, value,
                                       px=max(1, int(ttl_s * 1e3))))

    def put_member(self, key: str, member: str, value: bytes, ttl_s: float) -> None:
        """HSET into the group's hash and push its expiry `ttl_s` ahead, in one round trip."""
        if not self._up:
            return
        name = self.options.prefix + key

        def write(r: redis.Redis) -> None:
            with r.pipeline(transaction=True) as pipe:
                pipe.hset(name, member, value)
                pipe.pexpire(name, max(1, int(ttl_s * 1e3)))
                pipe.execute()
        with contextlib.suppress(RedisDown):
            self._call(write)

    def members(self, key: str) -> dict[str, bytes]:
        if not self._up:
            return {}
        try:
            found = self._call(lambda r: r.hgetall(self.options.prefix + key))
        except RedisDown:
            return {}
        return {k.decode(errors="replace"): v for k, v in dict(found).items()
                if isinstance(k, bytes) and isinstance(v, bytes)}

    def drop_members(self, key: str, members: Sequence[str]) -> None:
        if not self._up or not members:
            return
        with contextlib.suppress(RedisDown):
            self._call(lambda r: r.hdel(self.options.prefix + key, *members))

    def close(self) -> None:
        """Stop the reconnect thread and close the pool (held uploads are lost: see pending)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)
        self._redis.connection_pool.disconnect()

    # --- local copies ---------------------------------------------------------------------
    def _peek(self, key: str) -> Local | None:
        with self._lock:
            entry = self._local.get(key)
            if entry is not None:
                self._local.move_to_end(key)
            return entry

    def _stale(self, local: Local) -> bool:
        return bool(self._up) and not local.pending \
            and time.monotonic() - local.checked >= self.options.check_s

    def _remember(self, key: str, entry: Local) -> None:
        """Insert as most recent; evict the oldest copies that are not waiting for Redis until
        at most local_size copies remain and everything held fits local_bytes."""
        with self._lock:
            self._local[key] = entry
            self._local.move_to_end(key)
            copies = [k for k, e in self._local.items() if not e.pending]  # oldest first
            held = sum(e.nbytes for e in self._local.values())
            for n, old in enumerate(copies):
                if len(copies) - n <= self.options.local_size \
                        and held <= self.options.local_bytes:
                    break
                held -= self._local.pop(old).nbytes

    def _forget(self, key: str) -> Local | None:
        with self._lock:
            return self._local.pop(key, None)

    def _hit(self, local: Local) -> tuple[BackgroundMeta, Array]:
        self._count("hit")
        return local.meta, local.data

    def _fallback(self, key: str, local: Local | None) -> Local:
        """The local copy when Redis cannot answer, else UNAVAILABLE."""
        if local is None:
            raise Unavailable(f"background: Redis is unreachable and this replica holds no copy "
                              f"of {key!r}; retry when Redis is back")
        return local

    def _hold(self, key: str, entry: Local, mode: str,
              why: str = "Redis is unreachable") -> BackgroundMeta:
        """Keep an upload locally until Redis can take it; UNAVAILABLE when the held uploads
        would pass half of local_bytes."""
        limit = self.options.local_bytes // 2
        with self._lock:
            waiting = sum(e.nbytes for k, e in self._local.items() if e.pending and k != key)
        if waiting + entry.nbytes > limit:
            raise Unavailable(f"background: {why} and the uploads held for it would take "
                              f"{waiting + entry.nbytes} bytes, past half of "
                              f"SIDELIGHT_BACKGROUND_STORE_BYTES ({limit}); retry later")
        entry.pending, entry.checked = mode, time.monotonic()
        self._remember(key, entry)
        log.warning("%s: background %s held locally until it can be written", why, key)
        self._wake.set()
        return entry.meta

    def _data_lost(self) -> bool:
        """Whether Redis's epoch differs from the one this replica knows (FLUSHALL, a restart
        without persistence); if so, the sync thread is woken to restore the local copies."""
        epoch = as_bytes(self._call(lambda r: r.get(self._epoch_key)))
        lost = epoch is None or epoch.decode() != self._epoch
        if lost:
            self._wake.set()
        return lost

    def _fetch(self, key: str, local: Local | None, token: bytes,
               where: tuple[str, str, str]) -> tuple[BackgroundMeta, Array]:
        """Read and verify the whole value; a corrupt one falls back to the local copy.

        `token` (sha256 and created) identifies the stored write: a value found corrupt is not
        read again until it is rewritten, even with the same content.
        """
        try:
            if self._corrupt.get(key) == token:
                raise CorruptValue(f"background: Redis value {key!r} is corrupt (reported "
                                   "before); upload it again")
            fields = self._call(lambda r: r.hmget(key, ["header", "data", "sha256"]))
            if all(f is None for f in fields):
                self._forget(key)
                raise not_found(*where)
            meta, data = decode_background(fields, key)
        except RedisDown:
            return self._hit(self._fallback(key, local))
        except CorruptValue as err:
            return self._corrupt_fallback(key, local, token, err)
        self._corrupt.pop(key, None)
        self._remember(key, Local(meta, data, time.monotonic()))
        self._count("miss")
        return meta, data

    def _corrupt_fallback(self, key: str, local: Local | None, token: bytes,
                          err: CorruptValue) -> tuple[BackgroundMeta, Array]:
        if self._corrupt.get(key) != token:
            self._corrupt[key] = token
            log.error("%s", err)
            self._error()
        if local is None:
            raise err
        local.checked = time.monotonic()
        return self._hit(local)

    # --- Redis ----------------------------------------------------------------------------
    def _call(self, fn: Callable[[redis.Redis], T]) -> T:
        """Run one operation; failures are counted, and connection failures mark Redis down
        (a full Redis is not down: RedisFull)."""
        try:
            return fn(self._redis)
        except (redis.ConnectionError, redis.TimeoutError) as err:
            self._error()
            self._set_up(False, err)
            raise RedisDown from err
        except redis.exceptions.OutOfMemoryError as err:
            self._error()
            self._note_full(True)
            raise RedisFull(f"Redis refused the write at its maxmemory ({err})") from err
        except redis.RedisError as err:
            self._error()
            log.warning("Redis error: %s: %s", type(err).__name__, err)
            raise RedisDown from err

    def _write(self, key: str, entry: Local, mode: str) -> bool:
        """One atomic script: header, data and index together, or nothing. RedisFull when the
        value does not fit under Redis's maxmemory."""
        m = entry.meta
        args: builtins.list[str | bytes | memoryview] = [
            mode, header_of(m), little_endian_view(entry.data), m.sha256, repr(m.created),
            m.model_sha256]
        size = sum(stored_bytes(len(a)) for a in args)

        def write(r: redis.Redis) -> bool:
            limit = self._check_room(r, key, size)
            try:
                return bool(self._put_script(keys=[key, self._index], args=args, client=r))
            except redis.exceptions.OutOfMemoryError:  # another writer was faster
                raise RedisFull(f"Redis is at its memory limit (maxmemory {limit} bytes) and "
                                f"refused {size} more bytes") from None
        try:
            written = self._call(write)
        except RedisFull:
            self._error()
            self._note_full(True)
            raise
        self._note_full(False)
        return written

    def _check_room(self, r: redis.Redis, key: str, size: int) -> int:
        """Redis's maxmemory (0 = none); RedisFull unless `size` more bytes fit under it once
        Redis has evicted what it may. Kept: Redis's own overhead (client buffers included) and,
        under a volatile-* policy, the backgrounds (but `key`, which is replaced), or under
        noeviction everything. Keys without a TTL of other applications are not seen."""
        info: dict[str, Any] = r.info("memory")
        limit, used = int(info.get("maxmemory", 0)), int(info.get("used_memory", 0))
        if limit <= 0 or used + size <= limit:
            return limit
        if info.get("maxmemory_policy") == "noeviction":
            kept = used
        else:
            kept = int(info.get("used_memory_overhead", 0)) + self._pinned(r, key)
        if kept + size > limit:
            raise RedisFull(f"Redis is at its memory limit (maxmemory {limit} bytes): {size} "
                            f"more bytes do not fit beside the {kept} it cannot evict")
        return limit

    def _pinned(self, r: redis.Redis, key: str) -> int:
        """Bytes of the keys Redis never evicts: every background but `key`, the index, the
        epoch."""
        keys = [k for k in r.smembers(self._index) if k != key.encode()]  # type: ignore[union-attr]
        pipe = r.pipeline(transaction=False)
        for k in [*keys, self._index, self._epoch_key]:
            pipe.memory_usage(k)
        return sum(int(n or 0) for n in pipe.execute())

    def _note_full(self, full: bool) -> None:
        """Log when writes start and stop being refused for Redis's maxmemory."""
        if full != self._full:
            self._full = full
            if full:
                log.warning("Redis at %s is at its maxmemory: uploads are refused and results "
                            "not shared until memory is freed", masked(self.options.url))
            else:
                log.info("Redis at %s takes writes again", masked(self.options.url))

    def _delete(self, r: redis.Redis, key: str) -> int:
        pipe = r.pipeline(transaction=True)
        pipe.delete(key)
        pipe.srem(self._index, key)
        return int(pipe.execute()[0])

    def _read_index(self, r: redis.Redis, model: str) -> builtins.list[BackgroundMeta]:
        keys = sorted(k.decode() for k in r.smembers(self._index))  # type: ignore[union-attr]
        if model:
            keys = [k for k in keys if k.startswith(f"{self.options.prefix}bg:{model}:")]
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.hget(k, "header")
        out = []
        for k, raw in zip(keys, pipe.execute(), strict=True):
            if raw is None:
                r.srem(self._index, k)  # deleted or expired outside Sidelight
                continue
            try:
                out.append(meta_from_header(raw, k))
            except CorruptValue as err:
                log.error("%s", err)
                self._error()
        return out

    def _set_up(self, up: bool, err: Exception | None = None) -> None:
        with self._state_lock:
            changed, self._up = up != self._up, up
        if self._metrics is not None:
            self._metrics.redis_up.set(1 if up else 0)
        if not changed:
            return
        if up:
            log.info("Redis at %s answers", masked(self.options.url))
        else:
            log.warning("Redis at %s unreachable (%s); serving local copies",
                        masked(self.options.url), err)
            self._wake.set()
        if self._on_state is not None:
            self._on_state(up)

    def _error(self) -> None:
        if self._metrics is not None:
            self._metrics.redis_errors.inc()

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.count_cache("background", result)

    # --- reconnecting ---------------------------------------------------------------------
    def _run(self) -> None:
        """Probe every PROBE_S while up; reconnect with exponential backoff while down."""
        failures = 0
        while not self._stop.is_set():
            failures = 0 if self._sync() else failures + 1
            delay = PROBE_S if failures == 0 else min(MIN_BACKOFF_S * 2 ** (failures - 1),
                                                      MAX_BACKOFF_S)
            self._wake.wait(delay)
            self._wake.clear()

    def _sync(self) -> bool:
        """Check the epoch, write held uploads, restore copies after data loss, and only then
        mark Redis up: until the writes are in, requests keep to the local copies (a request
        would otherwise find its background missing and drop the copy) and deletes wait."""
        try:
            epoch = self._call(self._read_epoch)
        except RedisDown as err:
            self._set_up(False, err)
            return False
        lost = self._epoch is not None and epoch != self._epoch
        if lost:
            log.warning("Redis lost its data (new epoch); restoring this replica's copies")
        if not self._flush(restore=lost):
            return False
        self._epoch = epoch
        self._set_up(True)
        return True

    def _read_epoch(self, r: redis.Redis) -> str:
        """The dataset's epoch: a read, so a full Redis answers this liveness probe. Created
        when missing; "" when it cannot be (Redis full)."""
        epoch = r.get(self._epoch_key)
        if epoch is None:
            with contextlib.suppress(redis.exceptions.OutOfMemoryError):
                r.set(self._epoch_key, uuid.uuid4().hex, nx=True)
            epoch = r.get(self._epoch_key)
        return "" if epoch is None else bytes(epoch).decode()  # type: ignore[arg-type]

    def _flush(self, restore: bool) -> bool:
        """Write held uploads (and, after data loss, every local copy Redis lacks)."""
        with self._lock:
            todo = [(k, e, e.pending) for k, e in self._local.items() if e.pending or restore]
        for key, entry, mode in todo:
            try:
                written = self._write(key, entry, mode or ABSENT)
            except RedisFull:
                continue  # held (or not restored) until there is room; Redis is up
            except RedisDown:
                return False
            with self._lock:
                if self._local.get(key) is entry:
                    entry.pending = ""
                    entry.checked = entry.checked if written else -math.inf  # re-read Redis's
            if mode:
                log.info("background %s %s", key, "written to Redis" if written
                         else "superseded in Redis by a newer one")
        return True


def stored_bytes(n: int) -> int:
    """What Redis's allocator (jemalloc: four size classes per doubling) takes for n bytes."""
    step = 1 << max(n.bit_length() - 3, 4)
    return -(-n // step) * step


def as_bytes(value: object) -> bytes | None:
    """A reply as bytes (the client does not decode responses)."""
    return value if isinstance(value, bytes) or value is None else str(value).encode()


def not_found(model: str, version: str, name: str) -> NotFound:
    return NotFound(f"background: no background {quoted(name)} for model {model!r} "
                    f"version {version}")


def header_of(m: BackgroundMeta) -> bytes:
    """The JSON header stored beside the raw bytes."""
    fields = asdict(m)
    fields["feature_names"] = list(m.feature_names)
    return json.dumps({"format": HEADER_FORMAT, "byteorder": "little", **fields},
                      separators=(",", ":")).encode()


def meta_from_header(raw: bytes, key: str) -> BackgroundMeta:
    """Parse and type-check a stored header; anything malformed is a CorruptValue."""
    try:
        h = json.loads(raw)
        meta = BackgroundMeta(
            str(h["model"]), str(h["version"]), str(h["name"]), int(h["rows"]),
            int(h["features"]), str(h["dtype"]), str(h["sha256"]), float(h["created"]),
            str(h["source"]), str(h["model_sha256"]),
            tuple(str(n) for n in h.get("feature_names", [])))
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptValue(f"background: Redis value {key!r} has a malformed header "
                           f"({type(err).__name__}); upload it again") from None
    if meta.dtype not in FLOAT_DTYPES or meta.rows < 1 or meta.features < 1 \
            or not key.endswith(f":{meta.model}:{meta.version}:{meta.name}"):
        raise CorruptValue(f"background: Redis value {key!r} has an inconsistent header; "
                           "upload it again")
    return meta


def decode_background(fields: list[Any], key: str) -> tuple[BackgroundMeta, Array]:
    """Verify header, size and sha256 of a stored background, then view its bytes (no copy)."""
    header, data, sha = fields
    if header is None or data is None or sha is None:
        raise CorruptValue(f"background: Redis value {key!r} is incomplete; upload it again")
    meta = meta_from_header(header, key)
    dtype = np.dtype(meta.dtype).newbyteorder("<")
    if len(data) != meta.rows * meta.features * dtype.itemsize:
        raise CorruptValue(f"background: Redis value {key!r} is truncated ({len(data)} bytes "
                           f"for {meta.rows} x {meta.features} {meta.dtype}); upload it again")
    if hashlib.sha256(data).hexdigest() != meta.sha256 or bytes(sha).decode() != meta.sha256:
        raise CorruptValue(f"background: Redis value {key!r} does not match its sha256; "
                           "upload it again")
    array = np.frombuffer(data, dtype=dtype).reshape(meta.rows, meta.features)
    out = array.astype(meta.dtype, copy=False)  # (rows, features), native byte order
    out.setflags(write=False)
    return meta, out

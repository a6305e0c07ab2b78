"""Bearer-token authentication and roles on the gRPC port.

Tokens come from a file, or a directory of files (a mounted Kubernetes Secret), of lines
`<name> <roles> <token>`, re-read when the files change. Only SHA-256 digests of the tokens are
kept and they are compared in constant time; no token is ever logged or echoed. The health
service stays open: Kubernetes probes carry no token and learn nothing but SERVING."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from explainers.errors import PermissionDenied, SidelightError, Unauthenticated
from service.api.servicer import HANDLER_KINDS, call
from service.config import Settings

log = logging.getLogger(__name__)
EXPLAIN, ADMIN = "explain", "admin"
GRANTS = {EXPLAIN: frozenset({EXPLAIN}), ADMIN: frozenset({EXPLAIN, ADMIN})}  # admin can explain
ADMIN_METHODS = frozenset({"/sidelight.v1.Explainer/PutBackground",
                           "/sidelight.v1.Explainer/DeleteBackground"})
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # probes carry no token
NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
TOKEN = re.compile(r"[\x21-\x7e]{16,4096}")  # printable ASCII without spaces, as metadata allows
RELOAD_EVERY_S = 1.0
LINE_FORMAT = "`<name> <roles> <token>` (roles: explain, admin or explain,admin; a token of " \
              "16-4096 printable ASCII characters)"


@dataclass(frozen=True)
class Client:
    """Who a token belongs to and what it may do."""

    name: str
    roles: frozenset[str]


Entry = tuple[bytes, Client]  # (sha256 of the token, its client): the token itself is not kept


def parse_tokens(text: str, source: str) -> list[Entry]:
    """The entries of one tokens file; ValueError names the line, never its content."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            entries.append(parse_line(fields, f"{source}:{number}"))
    return entries


def parse_line(fields: Sequence[str], where: str) -> Entry:
    """One `<name> <roles> <token>` line."""
    if len(fields) != 3:
        raise ValueError(f"{where}: {len(fields)} fields; expected {LINE_FORMAT}")
    name, roles, token = fields
    if not NAME.fullmatch(name):
        raise ValueError(f"{where}: the name must be 1-64 of A-Z a-z 0-9 . _ @ -")
    if not roles or any(r not in GRANTS for r in roles.split(",")):
        raise ValueError(f"{where}: unknown role; expected {LINE_FORMAT}")
    if not TOKEN.fullmatch(token):
        raise ValueError(f"{where}: the token must be 16-4096 printable ASCII characters")
    granted = frozenset().union(*(GRANTS[r] for r in roles.split(",")))
    return digest(token), Client(name, granted)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def token_files(path: Path) -> list[Path]:
    """The file itself, or a directory's visible regular files (a mounted Secret's keys; its
    `..data` links and timestamped folders start with a dot)."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())


def signature(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when a tokens file is replaced or edited (links followed)."""
    stats = [(f.name, f.stat()) for f in token_files(path)]
    return tuple((name, st.st_ino, st.st_mtime_ns, st.st_size) for name, st in stats)


def read_tokens(path: Path) -> list[Entry]:
    """Every entry under `path`; names and tokens must be unique."""
    entries = [e for f in token_files(path) for e in parse_tokens(f.read_text(), f.name)]
    if len({d for d, _ in entries}) < len(entries):
        raise ValueError(f"{path}: the same token appears twice")
    if len({c.name for _, c in entries}) < len(entries):
        raise ValueError(f"{path}: the same name appears twice")
    return entries


class Tokens:
    """The tokens under a path, re-read (at most every `every_s`) after a file changes. A file
    that cannot be read or parsed keeps the previous tokens and logs why (never a token)."""

    def __init__(self, path: Path, every_s: float = RELOAD_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self._every_s, self._clock = path, every_s, clock
        self._signature = signature(path)
        self._entries = read_tokens(path)  # start-up: an error refuses to start
        if not self._entries:
            raise ValueError(f"{path}: no tokens; expected lines {LINE_FORMAT}")
        self._next = clock() + every_s
        self._lock = threading.Lock()

    def client(self, token: str) -> Client | None:
        """The token's client, or None. Every entry is compared (no early exit)."""
        self._refresh()
        presented, found = digest(token), None
        for known, client in self._entries:
            if hmac.compare_digest(known, presented):
                found = client
        return found

    def _refresh(self) -> None:
        now = self._clock()
        if now < self._next or not self._lock.acquire(blocking=False):
            return
        try:
            self._next = now + self._every_s
            self._reload()
        finally:
            self._lock.release()

    def _reload(self) -> None:
        try:
            current = signature(self.path)
            if current == self._signature:
                return
            self._signature = current  # stat before read: a later write is seen next time
            self._entries = read_tokens(self.path)
        except (OSError, ValueError) as err:
            log.warning("tokens under %s not reloaded, keeping the previous ones: %s",
                        self.path, err)
            return
        log.info("tokens reloaded from %s: %d client(s)", self.path, len(self._entries))


def bearer(metadata: Iterable[Any] | None) -> str:
    """The token of an `authorization: Bearer <token>` metadata entry."""
    values = [str(value) for key, value in metadata or () if key == "authorization"]
    if not values:
        raise Unauthenticated("missing credentials: send the metadata "
                              "`authorization: Bearer <token>`")
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization: expected `Bearer <token>`")
    return token.strip()


def short_name(method: str) -> str:
    return method.rsplit("/", 1)[-1]


class AccessGuard(grpc.ServerInterceptor):  # type: ignore[misc]
    """Every call but health needs a known token (when tokens are configured) with the role
    its method needs: UNAUTHENTICATED without one, PERMISSION_DENIED with the wrong role or
    for admin RPCs switched off. Methods the server does not have stay UNIMPLEMENTED."""

    def __init__(self, tokens: Tokens | None, admin_rpcs: bool) -> None:
        self.tokens, self.admin_rpcs = tokens, admin_rpcs

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        try:
            self.authorize(details.method, details.invocation_metadata)
        except SidelightError as err:
            log.debug("refused %s: %s", details.method, err)
            return refusal(handler, details.method, err)
        return handler

    def authorize(self, method: str, metadata: Iterable[Any] | None) -> Client | None:
        """The caller's client (None when tokens are off), or the error to answer with."""
        client = self.authenticate(metadata)
        admin = method in ADMIN_METHODS
        if admin and not self.admin_rpcs:
            raise PermissionDenied(f"{short_name(method)} is switched off on this server "
                                   "(SIDELIGHT_ADMIN_RPCS=false)")
        need = ADMIN if admin else EXPLAIN
        if client is not None and need not in client.roles:
            raise PermissionDenied(f"{short_name(method)} needs the {need} role; client "
                                   f"{client.name!r} has {', '.join(sorted(client.roles))}")
        return client

    def authenticate(self, metadata: Iterable[Any] | None) -> Client | None:
        if self.tokens is None:
            return None
        client = self.tokens.client(bearer(metadata))
        if client is None:
            raise Unauthenticated("invalid token")
        return client

    def client_id(self, context: grpc.ServicerContext) -> str:
        """Who is calling, for per-client limits: the token's name, else the peer's address."""
        client = self.authenticate(context.invocation_metadata())
        return client.name if client is not None else peer_host(context.peer())


def peer_host(peer: str) -> str:
    """`ipv4:10.0.0.7:53412` -> `ipv4:10.0.0.7` (a client's port changes per connection)."""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class Refused:
    """What a refused call's request decodes to: it is never decoded (a refused upload costs
    no parsing)."""

    __slots__ = ()


REFUSED = Refused()


def refusal(handler: Any, method: str, err: SidelightError) -> Any:
    """A handler of the same kind as `handler` that answers `err` (through servicer.call,
    the one place errors become status codes)."""
    def refuse() -> None:
        raise err

    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        return call(context, short_name(method), refuse)

    make = HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    return make(behavior, request_deserializer=lambda _: REFUSED,
                response_serializer=handler.response_serializer)


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address ("" and 0.0.0.0 are not)."""
    try:
        found = socket.getaddrinfo(host.strip("[]") or None, None, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(str(a[4][0]).split("%")[0]).is_loopback for a in found)


def exposure_problem(s: Settings) -> str | None:
    """Why these settings must not start (a non-loopback address without tokens), or None."""
    if s.tokens_path is not None or s.allow_insecure or is_loopback(s.host):
        return None
    return (f"refusing to serve {s.host} (not a loopback address) without tokens: set "
            "SIDELIGHT_TOKENS_PATH (README, Security), or SIDELIGHT_HOST=127.0.0.1, or "
            "SIDELIGHT_ALLOW_INSECURE=true")

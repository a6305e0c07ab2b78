"""The one error hierarchy. Each class carries the name of its gRPC status code; the servicer maps
them in one place, so the algorithms and the data plane never import gRPC."""

from __future__ import annotations


class SidelightError(Exception):
    """Base class: an error whose message is safe to show to the caller."""

    code = "INTERNAL"
    retry_after_s: float | None = None  # when to try again, sent as trailing metadata
    reason = ""  # why a call was shed before any work (the rejected-calls metric's label)


class InvalidArgument(SidelightError):
    """The request is malformed: the message names the field."""

    code = "INVALID_ARGUMENT"


class NotFound(SidelightError):
    """A model, version or background that does not exist."""

    code = "NOT_FOUND"


class FailedPrecondition(SidelightError):
    """The request is well formed but the system is not in a state to serve it."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(SidelightError):
    """The request needs more than its budget or a configured limit allows."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(SidelightError):
    """A dependency (Redis, a model session) cannot be reached right now; retrying may help."""

    code = "UNAVAILABLE"


class Cancelled(SidelightError):
    """The call was cancelled (the client went away, the server is stopping): work stops at
    its next yield point (between two model calls or chunks)."""

    code = "CANCELLED"


class DeadlineExceeded(SidelightError):
    """The caller's deadline passed before an answer could be produced."""

    code = "DEADLINE_EXCEEDED"


class Unauthenticated(SidelightError):
    """The call carries no credentials, or credentials the server does not know."""

    code = "UNAUTHENTICATED"


class PermissionDenied(SidelightError):
    """The caller is known but may not make this call (its role, or a switched-off RPC)."""

    code = "PERMISSION_DENIED"


ECHO_CHARS = 80  # client text quoted in a message is cut to this many characters


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was: messages that echo what a
    caller sent stay short (gRPC refuses status details over its metadata limit)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def quoted(text: str, limit: int = ECHO_CHARS) -> str:
    """Client text as a message quotes it: repr() of at most `limit` characters."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"

"""Domain errors of m4d: what went wrong, independent of the transport.

The server converts each kind to its gRPC status in one place (`m4d.server.status`);
nothing below the server knows about gRPC.
"""

from __future__ import annotations


class M4Error(Exception):
    """Base of every error a caller should see; the message is shown to the caller."""


class InvalidArgument(M4Error):
    """The request is wrong: unknown task, wrong input kind, empty, too long, bad value."""


class Retryable(M4Error):
    """An error that passes: `retry_after` is when to try again, in seconds (None: no hint)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ResourceExhausted(Retryable):
    """The caller's quota is used up."""


class Unavailable(Retryable):
    """The daemon cannot take the request now: busy, loading, swapping or shutting down."""


class DeadlineExceeded(M4Error):
    """The request's deadline passed before it finished."""


class Cancelled(M4Error):
    """The client cancelled the request."""


class FailedPrecondition(M4Error):
    """An operation on something in the wrong state."""


class NotFound(M4Error):
    """The thing named does not exist, or belongs to another caller (not told apart)."""


class OutOfRange(M4Error):
    """The request does not fit a limit of what it works on, e.g. a session's context window."""


class PermissionDenied(M4Error):
    """The caller is not allowed to do this."""


class Internal(M4Error):
    """A bug or a failure of the model runtime; logged with its traceback."""

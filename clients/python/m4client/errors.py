"""The client's one error type: `M4Error`, raised from `grpc.RpcError`.

Every failed call raises an `M4Error` (or a subclass named after its status code) carrying
the gRPC status code name (`.code`, e.g. "INVALID_ARGUMENT") and the daemon's message
(`.message`). The original `grpc.RpcError` is the exception's `__cause__`.
"""

from __future__ import annotations

from typing import Any

import grpc


class M4Error(Exception):
    """A call to m4d failed; `str()` is "CODE: message"."""

    #: The status code name this class stands for ("" for the base class).
    default_code = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
    ) -> None:
        self.code: str = code or self.default_code
        self.message: str = message
        self.trailing_metadata = trailing_metadata
        super().__init__(f"{self.code}: {message}" if message else self.code)

    @property
    def status_code(self) -> grpc.StatusCode | None:
        """The code as a `grpc.StatusCode`, when it names one."""
        return getattr(grpc.StatusCode, self.code, None)


class InvalidArgumentError(M4Error):
    """Bad input: unknown task, wrong input kind, empty, too long, bad value."""

    default_code = "INVALID_ARGUMENT"


class ResourceExhaustedError(M4Error):
    """The caller's quota is used up; retry later."""

    default_code = "RESOURCE_EXHAUSTED"


class UnavailableError(M4Error):
    """Daemon not reachable, queue full, model loading, swap in progress or shutting down."""

    default_code = "UNAVAILABLE"


class DeadlineExceededError(M4Error):
    """The call's deadline passed before it finished."""

    default_code = "DEADLINE_EXCEEDED"


class CallCancelledError(M4Error):
    """The call was cancelled."""

    default_code = "CANCELLED"


class PermissionDeniedError(M4Error):
    """The caller is not allowed to make this call."""

    default_code = "PERMISSION_DENIED"


class FailedPreconditionError(M4Error):
    """The operation does not fit the daemon's or the image's current state."""

    default_code = "FAILED_PRECONDITION"


_BY_CODE: dict[str, type[M4Error]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgumentError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        CallCancelledError,
        PermissionDeniedError,
        FailedPreconditionError,
    )
}


def from_rpc_error(err: grpc.RpcError) -> M4Error:
    """Convert a failed call's `grpc.RpcError` to an `M4Error` (the caller chains it)."""
    code_fn: Any = getattr(err, "code", None)
    details_fn: Any = getattr(err, "details", None)
    status = code_fn() if callable(code_fn) else None
    name = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
    message = (details_fn() if callable(details_fn) else None) or ""
    trailing_fn: Any = getattr(err, "trailing_metadata", None)
    trailing = trailing_fn() if callable(trailing_fn) else None
    return _BY_CODE.get(name, M4Error)(message, code=name, trailing_metadata=tuple(trailing or ()))

"""The client's one error type: `M4Error`, raised from `grpc.RpcError`.

Every failed call raises an `M4Error` (or a subclass named after its status code) carrying
the gRPC status code name (`.code`, e.g. "INVALID_ARGUMENT") and the daemon's message
(`.message`). The original `grpc.RpcError` is the exception's `__cause__`.
"""

from __future__ import annotations

from typing import Any

import grpc

#: The subclass for each status code that has one (filled as the subclasses are defined).
_BY_CODE: dict[str, type[M4Error]] = {}


class M4Error(Exception):
    """A call to m4d failed; `str()` is "CODE: message"."""

    #: The status code name this class stands for ("UNKNOWN" for the base class).
    default_code = "UNKNOWN"

    def __init_subclass__(cls, code: str = "", **kwargs: Any) -> None:
        """`class XError(M4Error, code="X")`: the class `from_rpc_error` raises for code X."""
        super().__init_subclass__(**kwargs)
        if code:
            cls.default_code = code
            _BY_CODE[code] = cls

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


class InvalidArgumentError(M4Error, code="INVALID_ARGUMENT"):
    """Bad input: unknown task, wrong input kind, empty, too long, bad value."""


class ResourceExhaustedError(M4Error, code="RESOURCE_EXHAUSTED"):
    """The caller's quota is used up; retry later."""


class UnavailableError(M4Error, code="UNAVAILABLE"):
    """Daemon not reachable, queue full, model loading, swap in progress or shutting down."""


class DeadlineExceededError(M4Error, code="DEADLINE_EXCEEDED"):
    """The call's deadline passed before it finished."""


class CallCancelledError(M4Error, code="CANCELLED"):
    """The call was cancelled."""


class PermissionDeniedError(M4Error, code="PERMISSION_DENIED"):
    """The caller is not allowed to make this call."""


class NotFoundError(M4Error, code="NOT_FOUND"):
    """What the call names does not exist (or is another app's, e.g. a session)."""


class OutOfRangeError(M4Error, code="OUT_OF_RANGE"):
    """The call does not fit a limit, e.g. a session's turn its context window."""


class FailedPreconditionError(M4Error, code="FAILED_PRECONDITION"):
    """The operation does not fit the daemon's or the image's current state."""


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

"""Domain errors → gRPC status, in one place.

Handlers are wrapped by `unary` or `streaming`; an M4Error raised anywhere below becomes
its status code and message (an m4image ImageError: the code `m4image.store.status_code_for`
names), and a retry hint travels as the `retry-after-ms` trailer
(and in the message, for people). Anything else is a bug: logged with its traceback and
answered with INTERNAL, the daemon stays up.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from m4image.manifest import ImageError
from m4image.store import status_code_for

from m4d import errors

log = logging.getLogger(__name__)

CODES: dict[type[errors.M4Error], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.Internal: grpc.StatusCode.INTERNAL,
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    if isinstance(error, errors.M4Error):
        code = next((c for cls, c in CODES.items() if isinstance(error, cls)),
                    grpc.StatusCode.INTERNAL)  # subclasses map as their base
        message = str(error)
        retry = error.retry_after if isinstance(error, errors.Retryable) else None
        if retry is not None:
            context.set_trailing_metadata((("retry-after-ms", str(int(retry * 1000))),))
            message = f"{message} (retry after {retry:g} s)"
    elif isinstance(error, ImageError):  # firmware image and store refusals: m4image's mapping
        code, message = getattr(grpc.StatusCode, status_code_for(error)), str(error)
    else:
        log.error("unhandled error in handler", exc_info=error)
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"
    await context.abort(code, message)


async def _answer(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """Ends the call with the status for `error`; an abort already under way passes."""
    if isinstance(error, grpc.aio.AbortError):
        raise error
    await abort(context, error)


def unary(fn: Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
          ) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def handler(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            await _answer(context, exc)
        raise AssertionError("unreachable: abort raises")

    return handler


def streaming(fn: Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]],
              ) -> Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    @functools.wraps(fn)
    async def handler(self: Any, request: Req, context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            await _answer(context, exc)

    return handler

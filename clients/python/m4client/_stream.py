"""Server-streaming calls as iterators that cancel the call when closed or dropped.

`Stream` wraps a sync `grpc` streaming call, `AsyncStream` a `grpc.aio` one. Both convert
each response with a function from `_convert`, turn `grpc.RpcError` into `M4Error`, and
cancel the call on `close()`/`aclose()`, on leaving a `with` block, or when the stream is
garbage-collected (which is what happens when a `for` loop over a temporary stream breaks).
`collect_generation` and `collect_run` fold a stream into one result.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc

from .errors import M4Error, from_rpc_error
from .types import (
    FinishReason,
    GenerationChunk,
    GenerationResult,
    KeywordHit,
    LabelScore,
    ModelInfo,
    RunChunk,
    RunResult,
    TextBox,
    Timings,
    Usage,
    WordPrediction,
)

T = TypeVar("T")


class _Call(Generic[T]):
    """What both streams share: the call, the conversion, and cancelling at most once."""

    def __init__(self, call: Any, convert: Callable[[Any], T]) -> None:
        self._call = call
        self._convert = convert
        self._finished = False

    def cancel(self) -> None:
        """Cancel the call if it is still running; iteration then ends."""
        if not self._finished:
            self._finished = True
            self._call.cancel()

    def _failed(self, exc: grpc.RpcError) -> M4Error:
        self._finished = True
        return from_rpc_error(exc)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter or loop gone: nothing to cancel
            self.cancel()


class Stream(_Call[T]):
    """An iterator over a streaming call's converted responses; closing it cancels the call."""

    def __iter__(self) -> Stream[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        try:
            msg = next(self._call)
        except StopIteration:
            self._finished = True
            raise
        except grpc.RpcError as exc:
            raise self._failed(exc) from exc
        return self._convert(msg)

    close = _Call.cancel

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class AsyncStream(_Call[T]):
    """An async iterator over a `grpc.aio` streaming call; `aclose()` cancels the call."""

    def __aiter__(self) -> AsyncStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._finished:
            raise StopAsyncIteration
        try:
            msg = await self._call.read()
        except grpc.RpcError as exc:
            raise self._failed(exc) from exc
        except asyncio.CancelledError:
            self.cancel()  # the awaiting task was cancelled: the call goes with it
            raise
        if msg is grpc.aio.EOF:
            self._finished = True
            raise StopAsyncIteration
        return self._convert(msg)

    async def aclose(self) -> None:
        """Cancel the call if it is still running."""
        self.cancel()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class _Fold:
    """What a stream's chunks add up to; shared by the generation and run collectors."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish: FinishReason | None = None
        self.usage = Usage()
        self.timings = Timings()
        self.model: ModelInfo | None = None

    def add(self, chunk: GenerationChunk | RunChunk) -> None:
        self.text.append(chunk.text)
        self.finish = chunk.finish_reason or self.finish
        self.usage = chunk.usage or self.usage
        self.timings = chunk.timings or self.timings
        self.model = chunk.model or self.model


def collect_generation(chunks: Iterable[GenerationChunk]) -> GenerationResult:
    """Fold generation chunks into one result."""
    fold = _Fold()
    ids: list[int] = []
    last: GenerationChunk | None = None
    for chunk in chunks:
        fold.add(chunk)
        ids.extend(chunk.token_ids)
        last = chunk
    return GenerationResult(
        "".join(fold.text), fold.finish, fold.usage, fold.timings, fold.model, tuple(ids),
        tool_call=last.tool_call if last else None, session=last.session if last else None,
    )


def collect_run(chunks: Iterable[RunChunk]) -> RunResult:
    """Fold run chunks into one result."""
    fold = _Fold()
    embeddings: list[list[float]] = []
    labels: list[LabelScore] = []
    predictions: list[WordPrediction] = []
    boxes: list[TextBox] = []
    keywords: list[KeywordHit] = []
    source, seconds = "", 0.0
    for chunk in chunks:
        fold.add(chunk)
        embeddings.extend(chunk.embeddings)
        labels.extend(chunk.labels)
        predictions.extend(chunk.predictions)
        boxes.extend(chunk.boxes)
        keywords.extend(chunk.keywords)
        source = chunk.source_text or source
        seconds = chunk.audio_seconds or seconds
    return RunResult(
        "".join(fold.text),
        embeddings,
        labels,
        predictions,
        fold.finish,
        fold.usage,
        fold.timings,
        fold.model,
        boxes,
        keywords,
        source,
        seconds,
    )

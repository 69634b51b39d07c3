"""From the step loop to the servicers: a request's `RequestStream` on the event loop, and
the `Outbox` that carries a step's events to it from the engine's worker thread.

The worker queues the events of a step in the Outbox and flushes them with one
`call_soon_threadsafe` per event loop (not one per token). A stream whose reader is behind
merges its queued text deltas into one message; no other event is merged or reordered.
The stream counts the tokens it holds that its reader has not taken (`undelivered`) and
when the reader last took an event: the engine's backpressure reads both (`backpressure.py`)
and may ask to be woken once the reader is down to a number of tokens (`wake_below`).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable

from m4d.errors import Internal
from m4d.requests import Event, Failed, RequestBase, SourceText, TextDelta

_STREAMING = (TextDelta, SourceText)  # events after which more events follow


class RequestStream:
    """The event loop's end of one request: iterate for events, cancel to stop the work.

    `cancel_request` is the engine's `cancel`: the stream asks the step loop to stop the
    work (cancelling the task that reads the stream does not stop a thread)."""

    def __init__(self, request: RequestBase, cancel_request: Callable[[int], None]) -> None:
        self.request = request
        self._cancel_request = cancel_request
        self._events: collections.deque[Event] = collections.deque()
        self._ready = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.done = False
        # read by the engine's worker thread (plain ints and floats: a step out at worst)
        self.undelivered = 0  # tokens in queued text deltas
        self.last_read = time.monotonic()  # when the reader last took an event
        self.wake_below: int | None = None  # call `wake` once undelivered is down to this
        self.wake: Callable[[], None] | None = None

    def _put(self, event: Event) -> None:  # called on the event loop
        self._events.append(event)
        if isinstance(event, TextDelta):
            self.undelivered += len(event.token_ids)
        self._ready.set()

    def _pop(self) -> Event:
        event = self._events.popleft()
        if isinstance(event, TextDelta):
            self.undelivered -= len(event.token_ids)
        return event

    async def _next(self) -> Event:
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        event = self._take()
        self.last_read = time.monotonic()
        if self.wake_below is not None and self.undelivered <= self.wake_below:
            self.wake_below = None
            if self.wake is not None:
                self.wake()
        return event

    def _take(self) -> Event:
        event = self._pop()
        if isinstance(event, TextDelta) and self._events and isinstance(self._events[0], TextDelta):
            # the reader is behind: the deltas queued so far go out as one message
            texts, ids = [event.text], list(event.token_ids)
            while self._events and isinstance(self._events[0], TextDelta):
                more = self._pop()
                assert isinstance(more, TextDelta)
                texts.append(more.text)
                ids.extend(more.token_ids)
            event = TextDelta("".join(texts), tuple(ids))
        return event

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self.done:
            event = await self._next()
            self.done = not isinstance(event, _STREAMING)
            yield event

    async def result(self) -> Event:
        """The final event of a non-streaming request; raises its error."""
        async for event in self:
            if isinstance(event, Failed):
                raise event.error
            if self.done:
                return event
        raise Internal("request ended without a result")

    def cancel(self) -> None:
        if not self.done:
            self._cancel_request(self.request.id)


def _deliver(batch: list[tuple[RequestStream, Event]]) -> None:
    """On the event loop: hands a step's events to their streams, in order."""
    for stream, event in batch:
        stream._put(event)


class Outbox:
    """The events the worker thread has produced since the last flush, in order."""

    def __init__(self) -> None:
        self._events: list[tuple[RequestStream, Event]] = []

    def __bool__(self) -> bool:
        return bool(self._events)

    def send(self, stream: RequestStream, event: Event) -> None:
        """Queues an event for the next flush."""
        self._events.append((stream, event))

    def flush(self) -> None:
        """Posts the queued events in order: one call_soon_threadsafe per event loop."""
        if not self._events:
            return
        batch, self._events = self._events, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Event]]] = {}
        for item in batch:
            by_loop.setdefault(item[0]._loop, []).append(item)
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

"""A client stream read by a worker thread (admin operations): the store's install reads the
tar as a blocking iterator on a worker thread, while the chunks arrive as gRPC messages on the
event loop. One chunk is asked for at a time, so the upload is paced by the store's writes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from m4d.errors import Cancelled


def pull_chunks(chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop,
                gone: threading.Event,
                received: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """`chunks` as a blocking iterator, for a worker thread (never the event loop's own);
    raises Cancelled once `gone` is set (the caller went away). `received(n)` is told the
    size of each chunk."""

    async def next_chunk() -> bytes | None:
        return await anext(chunks, None)

    while True:
        future = asyncio.run_coroutine_threadsafe(next_chunk(), loop)
        while True:
            if gone.is_set():
                future.cancel()
                raise Cancelled("the transfer was cancelled: the client went away")
            try:
                chunk = future.result(timeout=0.5)
                break
            except concurrent.futures.TimeoutError:
                continue
        if chunk is None:
            return
        if received is not None:
            received(len(chunk))
        yield chunk

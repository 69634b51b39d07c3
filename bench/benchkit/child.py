"""Benchmark helpers (outside the serving pipeline): a child process the bench drives over a
pipe, for load that must not share the bench's event loop or its uid.

The child is spawned (no fork after grpc has started), answers each command with a
`(kind, payload)` pair, and leaves on "exit".
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import Callable
from typing import Any

ANSWER_TIMEOUT = 600.0


class ChildProcess:
    """The parent's handle on a child running `target(*args, child_end_of_the_pipe)`."""

    def __init__(self, name: str, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.name = name
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.proc = context.Process(target=target, args=(*args, child), name=name, daemon=True)
        self.proc.start()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    async def answer(self, expected: str, timeout: float = ANSWER_TIMEOUT) -> Any:
        """The payload of the child's next answer, which must be of kind `expected`."""
        if not await asyncio.to_thread(self.conn.poll, timeout):
            raise RuntimeError(f"{self.name} did not answer")
        kind, payload = self.conn.recv()
        if kind != expected:
            raise RuntimeError(f"{self.name} answered {kind!r}: {payload}")
        return payload

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send("exit")
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join()

"""Sessions: a conversation the daemon keeps, as an object (`Session`, `AsyncSession`).

    with m4.session("You are the notes app's assistant.") as chat:
        print(chat.respond("Remind me what a haiku is.").text)
        print(chat.respond("Write one about tea.").text)  # computes only the new turn
        print(chat.context_tokens, "of", chat.context_window)

The daemon holds the transcript and the KV of what it computed, so each turn sends only the
new message. Leaving the `with` block deletes the session (so does `delete()`); otherwise it
lives until the daemon restarts, usable from any connection of the same app (uid) by its id
(`Client.resume_session`). With tools, a reply may be a `ToolCall` instead of text: answer it
with `tool_result()` and the model goes on from the result.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, TypeVar, Unpack

from . import _calls
from . import types as api
from ._options import TurnOptions
from ._stream import AsyncStream, Stream, collect_generation

T = TypeVar("T")


class _Runs(Protocol):
    """What a session needs of `Client`: starting its calls."""

    def _unary(self, call: _calls.Call[T]) -> T: ...

    def _stream(self, call: _calls.Call[T]) -> Stream[T]: ...


class _AsyncRuns(Protocol):
    """What a session needs of `AsyncClient`."""

    async def _unary(self, call: _calls.Call[T]) -> T: ...

    def _stream(self, call: _calls.Call[T]) -> AsyncStream[T]: ...


class _SessionState:
    """What both kinds of session know between turns: the id and the context use."""

    def __init__(self, info: api.SessionInfo) -> None:
        self.id = info.session_id
        self.task = info.task
        self.context_tokens = info.context_tokens
        self.context_window = info.context_window

    def _seen(self, chunk: api.GenerationChunk) -> api.GenerationChunk:
        if chunk.session is not None:
            self.context_tokens = chunk.session.context_tokens
            self.context_window = chunk.session.context_window
        return chunk

    def _turn(self, message: str | None, result: tuple[str, str] | None,
              options: TurnOptions) -> _calls.Call[api.GenerationChunk]:
        call = _calls.session_turn(self.id, user_message=message, tool_result=result, **options)
        return _calls.Call(call.method, call.request,
                           lambda msg: self._seen(call.convert(msg)), call.timeout)

    @staticmethod
    def _result(call: api.ToolCall | str, content: str) -> tuple[str, str]:
        return (call.call_id if isinstance(call, api.ToolCall) else call, content)

    @property
    def room(self) -> int:
        """Tokens left in the context window."""
        return max(0, self.context_window - self.context_tokens)


class Session(_SessionState):
    """A session on a `Client` (blocking)."""

    def __init__(self, client: _Runs, info: api.SessionInfo) -> None:
        super().__init__(info)
        self._client = client

    def send(self, message: str, **options: Unpack[TurnOptions]) -> Stream[api.GenerationChunk]:
        """The user's next message; the reply streamed (the last chunk carries the context
        and, when the model calls a tool, `tool_call`)."""
        return self._client._stream(self._turn(message, None, options))

    def respond(self, message: str, **options: Unpack[TurnOptions]) -> api.GenerationResult:
        """`send()` run to the end."""
        with self.send(message, **options) as stream:
            return collect_generation(stream)

    def send_tool_result(self, call: api.ToolCall | str, content: str,
                         **options: Unpack[TurnOptions]) -> Stream[api.GenerationChunk]:
        """A tool's result for the call the last reply made; the model's answer streamed."""
        return self._client._stream(self._turn(None, self._result(call, content), options))

    def tool_result(self, call: api.ToolCall | str, content: str,
                    **options: Unpack[TurnOptions]) -> api.GenerationResult:
        """`send_tool_result()` run to the end."""
        with self.send_tool_result(call, content, **options) as stream:
            return collect_generation(stream)

    def info(self) -> api.SessionInfo:
        """The transcript and context use as the daemon has them."""
        info = self._client._unary(_calls.get_session(self.id))
        self.context_tokens = info.context_tokens
        return info

    def clone(self) -> Session:
        """A new session with this one's transcript (its cached KV is shared)."""
        return Session(self._client, self._client._unary(_calls.clone_session(self.id)))

    def delete(self) -> None:
        self._client._unary(_calls.delete_session(self.id))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.delete()


class AsyncSession(_SessionState):
    """A session on an `AsyncClient`; see `Session`."""

    def __init__(self, client: _AsyncRuns, info: api.SessionInfo) -> None:
        super().__init__(info)
        self._client = client

    def send(self, message: str,
             **options: Unpack[TurnOptions]) -> AsyncStream[api.GenerationChunk]:
        return self._client._stream(self._turn(message, None, options))

    async def respond(self, message: str,
                      **options: Unpack[TurnOptions]) -> api.GenerationResult:
        async with self.send(message, **options) as stream:
            return collect_generation([chunk async for chunk in stream])

    def send_tool_result(self, call: api.ToolCall | str, content: str,
                         **options: Unpack[TurnOptions]) -> AsyncStream[api.GenerationChunk]:
        return self._client._stream(self._turn(None, self._result(call, content), options))

    async def tool_result(self, call: api.ToolCall | str, content: str,
                          **options: Unpack[TurnOptions]) -> api.GenerationResult:
        async with self.send_tool_result(call, content, **options) as stream:
            return collect_generation([chunk async for chunk in stream])

    async def info(self) -> api.SessionInfo:
        info = await self._client._unary(_calls.get_session(self.id))
        self.context_tokens = info.context_tokens
        return info

    async def clone(self) -> AsyncSession:
        return AsyncSession(self._client, await self._client._unary(_calls.clone_session(self.id)))

    async def delete(self) -> None:
        await self._client._unary(_calls.delete_session(self.id))

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.delete()

"""The asyncio client: `AsyncClient` (app socket) and `AsyncAdminClient` (admin socket).

The same calls as `m4client.Client` and `AdminClient`, built by the same request core
(`_calls`) and run on a `grpc.aio` channel: unary methods are coroutines, streaming methods
return an `AsyncStream` (iterate with `async for`; leaving `async with` or cancelling the
awaiting task cancels the call on the daemon). Arguments and results are documented on the
sync classes.

    async with AsyncClient() as m4:
        async for chunk in m4.generate("Once upon a time", max_tokens=32):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc
import grpc.aio

from . import _calls
from . import status as adm
from . import types as api
from ._addons import AddonChange, AddonList
from ._calls import Call
from ._images import ImageInfo, ImageList
from ._options import CallOptions, GenerateOptions, InstallOptions, RunOptions
from ._session import AsyncSession
from ._stream import AsyncStream, collect_generation, collect_run
from .errors import UnavailableError, from_rpc_error

T = TypeVar("T")
Self = TypeVar("Self", bound="_AsyncCaller")


class _AsyncCaller(_calls.Caller):
    """Runs `_calls.Call`s on a `grpc.aio` channel; shared by the asyncio clients."""

    def _open(self, target: str, *, options: Sequence[tuple[str, Any]]) -> Any:
        return grpc.aio.insecure_channel(target, options=options)

    async def _unary(self, call: Call[T]) -> T:
        try:
            return call.convert(await self._start(call))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def _stream(self, call: Call[T]) -> AsyncStream[T]:
        return AsyncStream(self._start(call), call.convert)

    async def _run(self, call: Call[api.RunChunk]) -> api.RunResult:
        async with self._stream(call) as stream:
            return collect_run([chunk async for chunk in stream])

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the channel connects; `UnavailableError` after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise UnavailableError(
                f"m4d not reachable at {self.target} within {timeout}s"
            ) from None

    async def close(self) -> None:
        """Close the channel; running calls are cancelled."""
        await self._channel.close()

    async def __aenter__(self: Self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class AsyncClient(_AsyncCaller):
    """Calls the Inference service of m4d from asyncio; see `m4client.Client`."""


    def generate(self, prompt: str,
                 **options: Unpack[GenerateOptions]) -> AsyncStream[api.GenerationChunk]:
        return self._stream(_calls.generate(prompt, **options))

    def chat(self, messages: api.ChatInput,
             **options: Unpack[GenerateOptions]) -> AsyncStream[api.GenerationChunk]:
        return self._stream(_calls.chat(messages, **options))

    async def complete(self, prompt: str, **options: Unpack[GenerateOptions]) -> api.GenerationResult:
        async with self.generate(prompt, **options) as stream:
            return collect_generation([chunk async for chunk in stream])

    async def chat_complete(self, messages: api.ChatInput,
                            **options: Unpack[GenerateOptions]) -> api.GenerationResult:
        async with self.chat(messages, **options) as stream:
            return collect_generation([chunk async for chunk in stream])

    async def embed(self, texts: str | Sequence[str],
                    **options: Unpack[CallOptions]) -> api.EmbedResult:
        return await self._unary(_calls.embed(texts, **options))

    async def classify(self, text: str, labels: Sequence[str] = (),
                       **options: Unpack[CallOptions]) -> api.ClassifyResult:
        return await self._unary(_calls.classify(text, labels, **options))

    async def predict_next(self, text: str, n: int = 0,
                           **options: Unpack[CallOptions]) -> api.PredictNextResult:
        return await self._unary(_calls.predict_next(text, n, **options))

    async def list_tasks(self, *, timeout: float | None = None) -> api.TaskTable:
        return await self._unary(_calls.list_tasks(timeout=timeout))

    async def count_tokens(self, prompt: str | None = None, *,
                           chat: api.ChatInput | None = None, task: str = "",
                           timeout: float | None = None) -> api.TokenCount:
        return await self._unary(_calls.count_tokens(prompt, chat=chat, task=task,
                                                     timeout=timeout))

    async def session(self, instructions: str = "", *, task: str = "",
                      tools: Iterable[api.Tool | Mapping[str, Any]] = (),
                      overflow: api.Overflow | str = api.Overflow.FAIL,
                      timeout: float | None = None) -> AsyncSession:
        return AsyncSession(self, await self._unary(_calls.create_session(
            instructions, task=task, tools=tools, overflow=overflow, timeout=timeout)))

    async def resume_session(self, session_id: str, *,
                             timeout: float | None = None) -> AsyncSession:
        return AsyncSession(self, await self._unary(_calls.get_session(session_id,
                                                                       timeout=timeout)))

    def run(self, task: str, inputs: Mapping[str, api.InputValue],
            **options: Unpack[RunOptions]) -> AsyncStream[api.RunChunk]:
        return self._stream(_calls.run(task, inputs, **options))

    async def run_complete(self, task: str, inputs: Mapping[str, api.InputValue],
                           **options: Unpack[RunOptions]) -> api.RunResult:
        return await self._run(_calls.run(task, inputs, **options))

    async def transcribe(self, audio: api.AudioInput, *, task: str = "transcribe",
                         **options: Unpack[RunOptions]) -> api.RunResult:
        return await self._run(_calls.transcribe(audio, task=task, **options))

    async def spot_keywords(self, audio: api.AudioInput, keywords: Sequence[str], *,
                            task: str = "keyword-spot",
                            **options: Unpack[RunOptions]) -> api.RunResult:
        return await self._run(_calls.spot_keywords(audio, keywords, task=task, **options))

    async def read_text(self, image: api.ImageInput, *, task: str = "ocr",
                        **options: Unpack[RunOptions]) -> api.RunResult:
        return await self._run(_calls.read_text(image, task=task, **options))

    def ask(self, question: str, *, image: api.ImageInput | None = None,
            audio: api.AudioInput | None = None, task: str | None = None,
            **options: Unpack[RunOptions]) -> AsyncStream[api.RunChunk]:
        return self._stream(_calls.ask(question, image=image, audio=audio, task=task,
                                       **options))


class AsyncAdminClient(_AsyncCaller):
    """Calls the Admin service from asyncio; see `m4client.AdminClient`."""

    _admin = True

    async def status(self, *, timeout: float | None = None) -> adm.DaemonStatus:
        return await self._unary(_calls.status(timeout=timeout))

    async def install_image(self, tar_chunks: Iterable[bytes],
                            **options: Unpack[InstallOptions]) -> ImageInfo:
        async with self._stream(_calls.install_image(tar_chunks, **options)) as stream:
            return _calls.installed([answer async for answer in stream])

    async def list_images(self, *, history: bool = False,
                          timeout: float | None = None) -> ImageList:
        return await self._unary(_calls.list_images(history=history, timeout=timeout))

    async def activate_image(self, image: str, *, allow_downgrade: bool = False,
                             now: bool = True, timeout: float | None = None) -> ImageInfo:
        return await self._unary(_calls.activate_image(image, allow_downgrade=allow_downgrade,
                                                       now=now, timeout=timeout))

    async def mark_good(self, image: str = "", *, timeout: float | None = None) -> ImageInfo:
        return await self._unary(_calls.mark_good(image, timeout=timeout))

    async def rollback(self, *, allow_downgrade: bool = False, timeout: float | None = None,
                       ) -> tuple[ImageInfo, ImageInfo | None]:
        return await self._unary(_calls.rollback(allow_downgrade=allow_downgrade,
                                                 timeout=timeout))

    async def remove_image(self, image: str, *, timeout: float | None = None) -> str:
        return await self._unary(_calls.remove_image(image, timeout=timeout))

    async def install_addon(self, tar_chunks: Iterable[bytes], *,
                            timeout: float | None = None) -> AddonChange:
        return await self._unary(_calls.install_addon(tar_chunks, timeout=timeout))

    async def list_addons(self, *, timeout: float | None = None) -> AddonList:
        return await self._unary(_calls.list_addons(timeout=timeout))

    async def remove_addon(self, name: str, *, timeout: float | None = None) -> AddonChange:
        return await self._unary(_calls.remove_addon(name, timeout=timeout))

"""The asyncio client: `AsyncClient` and `AsyncAdminClient` over `grpc.aio`.

The same methods as `m4client.client`, awaited; streaming methods return an `AsyncStream`
(an async iterator) at once, and `aclose()`, leaving `async with`, or dropping the stream
cancels the call. Create the client inside a running event loop.

    async with AsyncClient() as m4:
        async for chunk in m4.generate("Once upon a time", max_tokens=32):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc
import grpc.aio
from m4.admin.v1 import admin_pb2, admin_pb2_grpc
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc

from . import _convert, _images
from ._channel import CHANNEL_OPTIONS, call_metadata, resolve_address
from ._images import ImageInfo, ImageList, InstallProgress
from ._options import GenerateOptions, SamplingOptions
from ._stream import AsyncStream, collect_generation, collect_run
from .errors import M4Error, UnavailableError, from_rpc_error
from .types import (
    Audio,
    ChatMessage,
    ClassifyResult,
    DaemonStatus,
    EmbedResult,
    GenerationChunk,
    GenerationResult,
    Image,
    InputValue,
    PcmAudio,
    PredictNextResult,
    Priority,
    RunChunk,
    RunResult,
    TaskTable,
)

R = TypeVar("R")


class _AsyncBase:
    """Channel, deadline and metadata handling shared by the asyncio clients."""

    def __init__(
        self, address: str | None, *, admin: bool, app_name: str | None, timeout: float | None
    ) -> None:
        self.target = resolve_address(address, admin=admin)
        self.timeout = timeout
        self._metadata = call_metadata(app_name)
        self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

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

    async def __aenter__(self: R) -> R:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class AsyncClient(_AsyncBase):
    """Calls the Inference service of m4d from asyncio; see `m4client.Client` for arguments."""

    def __init__(
        self,
        address: str | None = None,
        *,
        app_name: str | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(address, admin=False, app_name=app_name, timeout=timeout)
        self._stub = pb_grpc.InferenceStub(self._channel)

    def generate(
        self,
        prompt: str,
        *,
        task: str = "",
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        priority: Priority | str | None = None,
        timeout: float | None = None,
    ) -> AsyncStream[GenerationChunk]:
        """Continue `prompt` as is, streamed (iterate with `async for`)."""
        params = _convert.sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
        )
        request = _convert.generate_request(
            prompt=prompt, task=task, params=params, prio=_convert.priority(priority)
        )
        return self._generate(request, timeout)

    def chat(
        self,
        messages: Iterable[ChatMessage | Mapping[str, str]],
        *,
        task: str = "",
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        priority: Priority | str | None = None,
        timeout: float | None = None,
    ) -> AsyncStream[GenerationChunk]:
        """The assistant's next message for a conversation, streamed."""
        params = _convert.sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
        )
        request = _convert.generate_request(
            chat=_convert.chat_messages(messages),
            task=task,
            params=params,
            prio=_convert.priority(priority),
        )
        return self._generate(request, timeout)

    async def complete(self, prompt: str, **options: Unpack[GenerateOptions]) -> GenerationResult:
        """`generate()` run to the end."""
        async with self.generate(prompt, **options) as stream:
            return collect_generation([chunk async for chunk in stream])

    async def chat_complete(
        self,
        messages: Iterable[ChatMessage | Mapping[str, str]],
        **options: Unpack[GenerateOptions],
    ) -> GenerationResult:
        """`chat()` run to the end."""
        async with self.chat(messages, **options) as stream:
            return collect_generation([chunk async for chunk in stream])

    def _generate(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncStream[GenerationChunk]:
        call = self._stub.Generate(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        return AsyncStream(call, _convert.generation_chunk)

    async def embed(
        self,
        texts: str | Sequence[str],
        *,
        task: str = "",
        priority: Priority | str | None = None,
        timeout: float | None = None,
    ) -> EmbedResult:
        """One vector per text (a single string counts as one text)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        request = pb.EmbedRequest(task=task, texts=texts, priority=_convert.priority(priority))
        return _convert.embed_result(await self._unary(self._stub.Embed, request, timeout))

    async def classify(
        self,
        text: str,
        labels: Sequence[str] = (),
        *,
        task: str = "",
        priority: Priority | str | None = None,
        timeout: float | None = None,
    ) -> ClassifyResult:
        """Rank `labels` for `text`, best first."""
        request = pb.ClassifyRequest(
            task=task, text=text, labels=list(labels), priority=_convert.priority(priority)
        )
        return _convert.classify_result(await self._unary(self._stub.Classify, request, timeout))

    async def predict_next(
        self,
        text: str,
        n: int = 0,
        *,
        task: str = "",
        priority: Priority | str | None = None,
        timeout: float | None = None,
    ) -> PredictNextResult:
        """The `n` most likely next words after `text` (0: the daemon's default, 5)."""
        request = pb.PredictNextRequest(
            task=task, text=text, num_predictions=n, priority=_convert.priority(priority)
        )
        response = await self._unary(self._stub.PredictNext, request, timeout)
        return _convert.predict_next_result(response)

    async def list_tasks(self, *, timeout: float | None = None) -> TaskTable:
        """The active image's task table."""
        response = await self._unary(self._stub.ListTasks, pb.ListTasksRequest(), timeout)
        return _convert.task_table(response)

    def run(
        self,
        task: str,
        inputs: Mapping[str, InputValue],
        *,
        num_predictions: int = 0,
        priority: Priority | str | None = None,
        timeout: float | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> AsyncStream[RunChunk]:
        """Run any task by id with named inputs, streamed."""
        request = pb.RunRequest(
            task=task,
            inputs=_convert.run_inputs(inputs),
            sampling=_convert.sampling(**sampling),
            num_predictions=num_predictions,
            priority=_convert.priority(priority),
        )
        call = self._stub.Run(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return AsyncStream(call, _convert.run_chunk)

    async def run_complete(
        self, task: str, inputs: Mapping[str, InputValue], **kwargs: Any
    ) -> RunResult:
        """`run()` to the end."""
        async with self.run(task, inputs, **kwargs) as stream:
            return collect_run([chunk async for chunk in stream])

    # ---- images and audio (tasks of the active image; see `tasks()`) ----------------

    async def transcribe(self, audio: bytes | Audio | PcmAudio, *, task: str = "transcribe",
                   **kwargs: Any) -> RunResult:
        """Speech to text: `result.text` is the transcript (WAV bytes or PcmAudio)."""
        return await self.run_complete(task, _convert.media_inputs(audio=audio), **kwargs)

    async def spot_keywords(self, audio: bytes | Audio | PcmAudio, keywords: Sequence[str], *,
                      task: str = "keyword-spot", **kwargs: Any) -> RunResult:
        """Which keywords were said: `result.keywords`, one hit per keyword, in order."""
        inputs = {**_convert.media_inputs(audio=audio), "keywords": list(keywords)}
        return await self.run_complete(task, inputs, **kwargs)

    async def read_text(self, image: bytes | Image, *, task: str = "ocr", **kwargs: Any) -> RunResult:
        """OCR: `result.text` (lines joined by newlines) and `result.boxes`."""
        return await self.run_complete(task, _convert.media_inputs(image=image), **kwargs)

    def ask(self, question: str, *, image: bytes | Image | None = None,
            audio: bytes | Audio | PcmAudio | None = None, task: str | None = None,
            **kwargs: Any) -> AsyncStream[RunChunk]:
        """A question about an image's text or an audio clip, answered by the backbone and
        streamed; the first chunk's `source_text` is what was read or heard."""
        inputs = {**_convert.media_inputs(image=image, audio=audio), "question": question}
        return self.run(_convert.ask_task(task, image, audio), inputs, **kwargs)


class AsyncAdminClient(_AsyncBase):
    """Calls the Admin service from asyncio (default admin socket, env M4_ADMIN_ADDRESS)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        app_name: str | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(address, admin=True, app_name=app_name, timeout=timeout)
        self._stub = admin_pb2_grpc.AdminStub(self._channel)

    async def status(self, *, timeout: float | None = None) -> DaemonStatus:
        """What the daemon runs and how busy it is."""
        response = await self._unary(self._stub.Status, admin_pb2.StatusRequest(), timeout)
        return _convert.daemon_status(response)

    # ---- firmware images (as AdminClient; the tar is sent from an iterable of chunks) --------

    async def install_image(
        self,
        tar_chunks: Iterable[bytes],
        *,
        total_bytes: int = 0,
        allow_downgrade: bool = False,
        activate: bool = False,
        progress: Callable[[InstallProgress], None] | None = None,
        timeout: float | None = None,
    ) -> ImageInfo:
        """Streams an image tar to the daemon's store; returns the installed image."""
        requests = _images.install_requests(tar_chunks, total_bytes=total_bytes,
                                            allow_downgrade=allow_downgrade, activate=activate)
        try:
            call = self._stub.InstallImage(iter(requests), timeout=self._deadline(timeout),
                                           metadata=self._metadata)
            async for msg in call:
                if msg.HasField("image"):
                    return _images.image_info(msg.image)
                if progress is not None:
                    progress(_images.install_progress(msg.progress))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        raise M4Error("the install stream ended without the installed image", code="INTERNAL")

    async def list_images(self, *, history: bool = False,
                          timeout: float | None = None) -> ImageList:
        """The installed images and the boot state; with `history`, the store's events."""
        msg = await self._unary(self._stub.ListImages,
                                admin_pb2.ListImagesRequest(include_history=history), timeout)
        return _images.image_list(msg)

    async def activate_image(self, image: str, *, allow_downgrade: bool = False,
                             now: bool = True, timeout: float | None = None) -> ImageInfo:
        """Makes an image the trial; `now`: hot-swap to it (see AdminClient.activate_image)."""
        msg = await self._unary(self._stub.ActivateImage, admin_pb2.ActivateImageRequest(
            image=image, allow_downgrade=allow_downgrade, now=now), timeout)
        return _images.image_info(msg.image)

    async def mark_good(self, image: str = "", *, timeout: float | None = None) -> ImageInfo:
        """Marks the trial image the daemon serves good by hand."""
        msg = await self._unary(self._stub.MarkGood, admin_pb2.MarkGoodRequest(image=image),
                                timeout)
        return _images.image_info(msg.image)

    async def rollback(self, *, allow_downgrade: bool = False, timeout: float | None = None,
                       ) -> tuple[ImageInfo, ImageInfo | None]:
        """Hot-swaps back to the previous good image; returns (active, previous)."""
        msg = await self._unary(self._stub.Rollback,
                                admin_pb2.RollbackRequest(allow_downgrade=allow_downgrade),
                                timeout)
        previous = _images.image_info(msg.previous) if msg.HasField("previous") else None
        return _images.image_info(msg.active), previous

    async def remove_image(self, image: str, *, timeout: float | None = None) -> str:
        """Deletes an installed image that is not active, previous or on trial."""
        msg = await self._unary(self._stub.RemoveImage,
                                admin_pb2.RemoveImageRequest(image=image), timeout)
        return str(msg.digest)

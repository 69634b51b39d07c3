"""The synchronous client: `Client` for apps (app socket) and `AdminClient` (admin socket).

A thin layer over the request core (`_calls`): each method builds its `Call` there and runs
it here, blocking: unary calls return the converted answer, streaming methods return a
`Stream` that cancels the call when closed or dropped. `aio.py` is the same over asyncio.

    with Client() as m4:
        for chunk in m4.generate("Once upon a time", max_tokens=32):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc

from . import _calls, _health
from . import status as adm
from . import types as api
from ._addons import AddonChange, AddonList
from ._calls import Call
from ._images import ImageInfo, ImageList
from ._options import CallOptions, GenerateOptions, InstallOptions, RunOptions
from ._session import Session
from ._stream import Stream, collect_generation, collect_run
from .errors import UnavailableError, from_rpc_error

T = TypeVar("T")
Self = TypeVar("Self", bound="_SyncCaller")


class _SyncCaller(_calls.Caller):
    """Runs `_calls.Call`s on a blocking channel; shared by `Client` and `AdminClient`."""

    def _open(self, target: str, *, options: Sequence[tuple[str, Any]]) -> Any:
        return grpc.insecure_channel(target, options=options)

    def _unary(self, call: Call[T]) -> T:
        try:
            return call.convert(self._start(call))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def _stream(self, call: Call[T]) -> Stream[T]:
        return Stream(self._start(call), call.convert)

    def _run(self, call: Call[api.RunChunk]) -> api.RunResult:
        with self._stream(call) as stream:
            return collect_run(stream)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel connects; `UnavailableError` after `timeout` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise UnavailableError(
                f"m4d not reachable at {self.target} within {timeout}s"
            ) from None

    def wait_serving(self, timeout: float | None = None) -> None:
        """Block until the daemon's health says SERVING (model loaded, self-test passed).

        Watches the standard grpc.health.v1 stream, so it wakes on the change, no polling.
        `UnavailableError` after `timeout` seconds.
        """
        try:
            if any(s == _health.SERVING for s in _health.watch(self._channel, timeout)):
                return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise from_rpc_error(exc) from None
        raise UnavailableError(f"m4d at {self.target} was not serving within {timeout}s")

    def close(self) -> None:
        """Close the channel; running streams are cancelled."""
        self._channel.close()

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Client(_SyncCaller):
    """Calls the Inference service of m4d (default `unix:///run/m4/app.sock`, env M4_ADDRESS).

    `address` may be a gRPC target or a socket path; `app_name` is sent as the `m4-app-name`
    metadata (a label; the daemon identifies callers by their uid); `timeout` is the default
    deadline of every call in seconds (None: no deadline), overridable per call. Every
    inference method takes `task` (the task id; "" for the RPC's default), `priority`
    ("system", "foreground", "background") and `timeout`; see `m4client._options`.
    """


    def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> Stream[api.GenerationChunk]:
        """Continue `prompt` as is, streamed. Sampling: max_tokens, temperature, top_p, top_k,
        seed, stop, ignore_eos; None leaves a parameter at the daemon's default."""
        return self._stream(_calls.generate(prompt, **options))

    def chat(self, messages: api.ChatInput,
             **options: Unpack[GenerateOptions]) -> Stream[api.GenerationChunk]:
        """The assistant's next message for a conversation, streamed."""
        return self._stream(_calls.chat(messages, **options))

    def complete(self, prompt: str, **options: Unpack[GenerateOptions]) -> api.GenerationResult:
        """`generate()` run to the end: the whole text, finish reason, usage, timings."""
        with self.generate(prompt, **options) as stream:
            return collect_generation(stream)

    def chat_complete(self, messages: api.ChatInput,
                      **options: Unpack[GenerateOptions]) -> api.GenerationResult:
        """`chat()` run to the end."""
        with self.chat(messages, **options) as stream:
            return collect_generation(stream)

    def embed(self, texts: str | Sequence[str], **options: Unpack[CallOptions]) -> api.EmbedResult:
        """One vector per text (a single string counts as one text)."""
        return self._unary(_calls.embed(texts, **options))

    def classify(self, text: str, labels: Sequence[str] = (),
                 **options: Unpack[CallOptions]) -> api.ClassifyResult:
        """Rank `labels` for `text`, best first (labels may be empty if the task has its own)."""
        return self._unary(_calls.classify(text, labels, **options))

    def predict_next(self, text: str, n: int = 0,
                     **options: Unpack[CallOptions]) -> api.PredictNextResult:
        """The `n` most likely next words after `text` (0: the daemon's default, 5)."""
        return self._unary(_calls.predict_next(text, n, **options))

    def list_tasks(self, *, timeout: float | None = None) -> api.TaskTable:
        """The active image's task table."""
        return self._unary(_calls.list_tasks(timeout=timeout))

    def count_tokens(self, prompt: str | None = None, *, chat: api.ChatInput | None = None,
                     task: str = "", timeout: float | None = None) -> api.TokenCount:
        """The tokens a prompt (or a chat) takes for a generation task, as Generate would
        feed them, and the task's context window."""
        return self._unary(_calls.count_tokens(prompt, chat=chat, task=task, timeout=timeout))

    def session(self, instructions: str = "", *, task: str = "",
                tools: Iterable[api.Tool | Mapping[str, Any]] = (),
                overflow: api.Overflow | str = api.Overflow.FAIL,
                timeout: float | None = None) -> Session:
        """A conversation the daemon keeps (see `m4client.Session`): `instructions` are its
        system message; `tools` the functions the model may call; `overflow` what a turn
        that does not fit the context window does ("fail", or "drop_oldest" turns)."""
        return Session(self, self._unary(_calls.create_session(
            instructions, task=task, tools=tools, overflow=overflow, timeout=timeout)))

    def resume_session(self, session_id: str, *, timeout: float | None = None) -> Session:
        """A session this app made earlier (on any connection), by its id."""
        return Session(self, self._unary(_calls.get_session(session_id, timeout=timeout)))

    def run(self, task: str, inputs: Mapping[str, api.InputValue],
            **options: Unpack[RunOptions]) -> Stream[api.RunChunk]:
        """Run any task by id with named inputs, streamed (see `types.InputValue`); takes
        the sampling options of `generate()` and `num_predictions`."""
        return self._stream(_calls.run(task, inputs, **options))

    def run_complete(self, task: str, inputs: Mapping[str, api.InputValue],
                     **options: Unpack[RunOptions]) -> api.RunResult:
        """`run()` to the end: joined text and every other output."""
        return self._run(_calls.run(task, inputs, **options))

    # ---- images and audio (tasks of the active image; see `list_tasks()`) --------------

    def transcribe(self, audio: api.AudioInput, *, task: str = "transcribe",
                   **options: Unpack[RunOptions]) -> api.RunResult:
        """Speech to text: `result.text` is the transcript (WAV bytes or PcmAudio)."""
        return self._run(_calls.transcribe(audio, task=task, **options))

    def spot_keywords(self, audio: api.AudioInput, keywords: Sequence[str], *,
                      task: str = "keyword-spot", **options: Unpack[RunOptions]) -> api.RunResult:
        """Which keywords were said: `result.keywords`, one hit per keyword, in order."""
        return self._run(_calls.spot_keywords(audio, keywords, task=task, **options))

    def read_text(self, image: api.ImageInput, *, task: str = "ocr",
                  **options: Unpack[RunOptions]) -> api.RunResult:
        """OCR: `result.text` (lines joined by newlines) and `result.boxes`."""
        return self._run(_calls.read_text(image, task=task, **options))

    def ask(self, question: str, *, image: api.ImageInput | None = None,
            audio: api.AudioInput | None = None, task: str | None = None,
            **options: Unpack[RunOptions]) -> Stream[api.RunChunk]:
        """A question about an image's text or an audio clip, answered by the backbone and
        streamed; the first chunk's `source_text` is what was read or heard."""
        return self._stream(_calls.ask(question, image=image, audio=audio, task=task,
                                       **options))


class AdminClient(_SyncCaller):
    """Calls the Admin service (default `unix:///run/m4/admin.sock`, env M4_ADMIN_ADDRESS)."""

    _admin = True

    def status(self, *, timeout: float | None = None) -> adm.DaemonStatus:
        """What the daemon runs and how busy it is."""
        return self._unary(_calls.status(timeout=timeout))

    # ---- firmware images -------------------------------------------------------------

    def install_image(self, tar_chunks: Iterable[bytes],
                      **options: Unpack[InstallOptions]) -> ImageInfo:
        """Streams an image tar (`m4image.tarstream.iter_image_tar`) to the daemon's store;
        `progress` is called with each progress message; returns the installed image."""
        with self._stream(_calls.install_image(tar_chunks, **options)) as stream:
            return _calls.installed(stream)

    def list_images(self, *, history: bool = False, timeout: float | None = None) -> ImageList:
        """The installed images and the boot state; with `history`, the store's events."""
        return self._unary(_calls.list_images(history=history, timeout=timeout))

    def activate_image(self, image: str, *, allow_downgrade: bool = False, now: bool = True,
                       timeout: float | None = None) -> ImageInfo:
        """Makes an image the trial; `now`: hot-swap to it (returns it active once its
        self-test passed), else it is tried at the daemon's next start."""
        return self._unary(_calls.activate_image(image, allow_downgrade=allow_downgrade,
                                                 now=now, timeout=timeout))

    def mark_good(self, image: str = "", *, timeout: float | None = None) -> ImageInfo:
        """Marks the trial image good by hand (`image`: the digest expected on trial)."""
        return self._unary(_calls.mark_good(image, timeout=timeout))

    def rollback(self, *, allow_downgrade: bool = False, timeout: float | None = None,
                 ) -> tuple[ImageInfo, ImageInfo | None]:
        """Hot-swaps back to the previous good image; returns (active, previous)."""
        return self._unary(_calls.rollback(allow_downgrade=allow_downgrade, timeout=timeout))

    def remove_image(self, image: str, *, timeout: float | None = None) -> str:
        """Deletes an installed image that is not active, previous or on trial; its digest."""
        return self._unary(_calls.remove_image(image, timeout=timeout))

    # ---- add-ons ---------------------------------------------------------------------

    def install_addon(self, tar_chunks: Iterable[bytes], *,
                      timeout: float | None = None) -> AddonChange:
        """Streams an add-on tar (`m4image.addon_io.iter_addon_tar`) to the daemon, which
        verifies it against the image it serves and serves its tasks at once."""
        return self._unary(_calls.install_addon(tar_chunks, timeout=timeout))

    def list_addons(self, *, timeout: float | None = None) -> AddonList:
        """The installed add-ons and whether each applies to the image served."""
        return self._unary(_calls.list_addons(timeout=timeout))

    def remove_addon(self, name: str, *, timeout: float | None = None) -> AddonChange:
        """Uninstalls an add-on: its tasks go at once, calls running through it finish."""
        return self._unary(_calls.remove_addon(name, timeout=timeout))

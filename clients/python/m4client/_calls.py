"""The request/response core of both clients: every RPC as a `Call`, built from Python arguments.

The stage between an app's method call and the channel: one function per RPC turns the
method's arguments into the request message (through `_convert` and `_images`) and says
which stub method to call and how each response message becomes a result. `Caller` starts a
`Call` on a channel with its deadline and metadata. `client.py` (sync) and `aio.py`
(asyncio) only wait for what `Caller` started, in their own way; neither builds a request
nor reads a response itself, so the two cannot drift apart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, Unpack

from m4.admin.v1 import admin_pb2, admin_pb2_grpc
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc

from . import _addons, _convert, _images
from . import status as adm
from . import types as api
from ._addons import AddonChange, AddonList
from ._channel import CHANNEL_OPTIONS, call_metadata, resolve_address
from ._images import ImageInfo, ImageList
from ._options import GenerateOptions, InstallOptions, RunOptions, SamplingOptions
from .errors import M4Error

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One RPC, ready to start: the stub method, its request, how a response becomes `T`."""

    method: str  # the stub's method, e.g. "Embed"
    request: Any  # the request message (an iterator of them for InstallImage)
    convert: Callable[[Any], T]
    timeout: float | None = None  # this call's deadline; None: the client's default


class Caller(ABC):
    """A channel to one of m4d's sockets and how a `Call` starts on it; the sync and asyncio
    clients differ only in the channel they open and in how they wait for the answer.

    `address` may be a gRPC target or a socket path (None: the environment's, else the
    default); `app_name` is sent as the `m4-app-name` metadata; `timeout` is the default
    deadline of every call in seconds (None: no deadline), overridable per call.
    """

    #: Whether this client calls the Admin service (the admin socket) or Inference.
    _admin: ClassVar[bool] = False

    def __init__(self, address: str | None = None, *, app_name: str | None = None,
                 timeout: float | None = None) -> None:
        self.target = resolve_address(address, admin=self._admin)
        self.timeout = timeout
        self._metadata = call_metadata(app_name)
        self._channel = self._open(self.target, options=CHANNEL_OPTIONS)
        stub = admin_pb2_grpc.AdminStub if self._admin else pb_grpc.InferenceStub
        self._stub = stub(self._channel)

    @abstractmethod
    def _open(self, target: str, *, options: Sequence[tuple[str, Any]]) -> Any:
        """The channel (grpc or grpc.aio) to `target`."""
        raise NotImplementedError

    def _start(self, call: Call[Any]) -> Any:
        """The stub's answer: a response (sync unary), an awaitable (asyncio unary) or the
        streaming call. Sync unary calls raise `grpc.RpcError` here, the others later."""
        deadline = self.timeout if call.timeout is None else call.timeout
        method = getattr(self._stub, call.method)
        return method(call.request, timeout=deadline, metadata=self._metadata)


# ---------------------------------------------------------------- the Inference service


def _generation(*, prompt: str | None = None, chat: pb.Chat | None = None, task: str = "",
                priority: api.Priority | str | None = None, timeout: float | None = None,
                json_schema: Mapping[str, Any] | str | None = None, regex: str | None = None,
                choices: Sequence[str] | None = None,
                **sampling: Unpack[SamplingOptions]) -> Call[api.GenerationChunk]:
    request = _convert.generate_request(prompt=prompt, chat=chat, task=task,
                                        params=_convert.sampling(**sampling),
                                        prio=_convert.priority(priority))
    fmt = _convert.response_format(json_schema=json_schema, regex=regex, choices=choices)
    if fmt is not None:
        request.response_format.CopyFrom(fmt)
    return Call("Generate", request, _convert.generation_chunk, timeout)


def generate(prompt: str, **options: Unpack[GenerateOptions]) -> Call[api.GenerationChunk]:
    return _generation(prompt=prompt, **options)


def chat(messages: api.ChatInput,
         **options: Unpack[GenerateOptions]) -> Call[api.GenerationChunk]:
    return _generation(chat=_convert.chat_messages(messages), **options)


def embed(texts: str | Sequence[str], *, task: str = "", priority: api.Priority | str | None = None,
          timeout: float | None = None) -> Call[api.EmbedResult]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    request = pb.EmbedRequest(task=task, texts=texts, priority=_convert.priority(priority))
    return Call("Embed", request, _convert.embed_result, timeout)


def classify(text: str, labels: Sequence[str] = (), *, task: str = "", priority: api.Priority | str | None = None,
             timeout: float | None = None) -> Call[api.ClassifyResult]:
    request = pb.ClassifyRequest(task=task, text=text, labels=list(labels),
                                 priority=_convert.priority(priority))
    return Call("Classify", request, _convert.classify_result, timeout)


def predict_next(text: str, n: int = 0, *, task: str = "", priority: api.Priority | str | None = None,
                 timeout: float | None = None) -> Call[api.PredictNextResult]:
    request = pb.PredictNextRequest(task=task, text=text, num_predictions=n,
                                    priority=_convert.priority(priority))
    return Call("PredictNext", request, _convert.predict_next_result, timeout)


def list_tasks(*, timeout: float | None = None) -> Call[api.TaskTable]:
    return Call("ListTasks", pb.ListTasksRequest(), _convert.task_table, timeout)


def count_tokens(prompt: str | None = None, *, chat: api.ChatInput | None = None,
                 task: str = "", timeout: float | None = None) -> Call[api.TokenCount]:
    if (prompt is None) == (chat is None):
        raise ValueError("give either a prompt or a chat")
    request = (pb.CountTokensRequest(task=task, prompt=prompt) if prompt is not None else
               pb.CountTokensRequest(task=task, chat=_convert.chat_messages(chat or [])))
    return Call("CountTokens", request,
                lambda m: api.TokenCount(m.tokens, m.context_window), timeout)


def create_session(instructions: str = "", *, task: str = "",
                   tools: Iterable[api.Tool | Mapping[str, Any]] = (),
                   overflow: api.Overflow | str = api.Overflow.FAIL,
                   timeout: float | None = None) -> Call[api.SessionInfo]:
    request = pb.CreateSessionRequest(task=task, instructions=instructions,
                                      tools=_convert.tools(tools),
                                      overflow=_convert.overflow(overflow))
    return Call("CreateSession", request, _convert.session_info, timeout)


def session_turn(session_id: str, *, user_message: str | None = None,
                 tool_result: tuple[str, str] | None = None,
                 priority: api.Priority | str | None = None, timeout: float | None = None,
                 tool_choice: str = "", json_schema: Mapping[str, Any] | str | None = None,
                 regex: str | None = None, choices: Sequence[str] | None = None,
                 **sampling: Unpack[SamplingOptions]) -> Call[api.GenerationChunk]:
    request = pb.SessionTurnRequest(session_id=session_id, sampling=_convert.sampling(**sampling),
                                    priority=_convert.priority(priority), tool_choice=tool_choice)
    if tool_result is not None:
        request.tool_result.CopyFrom(pb.ToolResult(call_id=tool_result[0],
                                                   content=tool_result[1]))
    else:
        request.user_message = user_message or ""
    fmt = _convert.response_format(json_schema=json_schema, regex=regex, choices=choices)
    if fmt is not None:
        request.response_format.CopyFrom(fmt)
    return Call("SessionTurn", request, _convert.generation_chunk, timeout)


def get_session(session_id: str, *, timeout: float | None = None) -> Call[api.SessionInfo]:
    return Call("GetSession", pb.SessionRef(session_id=session_id), _convert.session_info,
                timeout)


def clone_session(session_id: str, *, timeout: float | None = None) -> Call[api.SessionInfo]:
    return Call("CloneSession", pb.SessionRef(session_id=session_id), _convert.session_info,
                timeout)


def delete_session(session_id: str, *, timeout: float | None = None) -> Call[None]:
    return Call("DeleteSession", pb.SessionRef(session_id=session_id), lambda m: None, timeout)


def run(task: str, inputs: Mapping[str, api.InputValue], *, num_predictions: int = 0,
        priority: api.Priority | str | None = None, timeout: float | None = None,
        **sampling: Unpack[SamplingOptions]) -> Call[api.RunChunk]:
    request = pb.RunRequest(task=task, inputs=_convert.run_inputs(inputs),
                            sampling=_convert.sampling(**sampling),
                            num_predictions=num_predictions,
                            priority=_convert.priority(priority))
    return Call("Run", request, _convert.run_chunk, timeout)


def transcribe(audio: api.AudioInput, *, task: str = "transcribe",
               **options: Unpack[RunOptions]) -> Call[api.RunChunk]:
    return run(task, _convert.media_inputs(audio=audio), **options)


def spot_keywords(audio: api.AudioInput, keywords: Sequence[str], *,
                  task: str = "keyword-spot", **options: Unpack[RunOptions]) -> Call[api.RunChunk]:
    inputs = {**_convert.media_inputs(audio=audio), "keywords": list(keywords)}
    return run(task, inputs, **options)


def read_text(image: api.ImageInput, *, task: str = "ocr",
              **options: Unpack[RunOptions]) -> Call[api.RunChunk]:
    return run(task, _convert.media_inputs(image=image), **options)


def ask(question: str, *, image: api.ImageInput | None = None,
        audio: api.AudioInput | None = None, task: str | None = None,
        **options: Unpack[RunOptions]) -> Call[api.RunChunk]:
    inputs = {**_convert.media_inputs(image=image, audio=audio), "question": question}
    return run(_convert.ask_task(task, image, audio), inputs, **options)


# ---------------------------------------------------------------- the Admin service


def status(*, timeout: float | None = None) -> Call[adm.DaemonStatus]:
    return Call("Status", admin_pb2.StatusRequest(), _convert.daemon_status, timeout)


def install_image(tar_chunks: Iterable[bytes],
                  **options: Unpack[InstallOptions]) -> Call[ImageInfo | None]:
    """A stream of progress (None, after calling `progress`) and then the installed image."""
    progress = options.get("progress")
    requests = _images.install_requests(tar_chunks, total_bytes=options.get("total_bytes", 0),
                                        allow_downgrade=options.get("allow_downgrade", False),
                                        activate=options.get("activate", False))

    def convert(msg: admin_pb2.InstallImageResponse) -> ImageInfo | None:
        if msg.HasField("image"):
            return _images.image_info(msg.image)
        if progress is not None:
            progress(_images.install_progress(msg.progress))
        return None

    return Call("InstallImage", requests, convert, options.get("timeout"))


def installed(answers: Iterable[ImageInfo | None]) -> ImageInfo:
    """The installed image from an `install_image` stream's answers."""
    image = next((a for a in answers if a is not None), None)
    if image is None:
        raise M4Error("the install stream ended without the installed image", code="INTERNAL")
    return image


def list_images(*, history: bool = False, timeout: float | None = None) -> Call[ImageList]:
    request = admin_pb2.ListImagesRequest(include_history=history)
    return Call("ListImages", request, _images.image_list, timeout)


def _image_of(msg: Any) -> ImageInfo:
    return _images.image_info(msg.image)


def activate_image(image: str, *, allow_downgrade: bool = False, now: bool = True,
                   timeout: float | None = None) -> Call[ImageInfo]:
    request = admin_pb2.ActivateImageRequest(image=image, allow_downgrade=allow_downgrade,
                                             now=now)
    return Call("ActivateImage", request, _image_of, timeout)


def mark_good(image: str = "", *, timeout: float | None = None) -> Call[ImageInfo]:
    return Call("MarkGood", admin_pb2.MarkGoodRequest(image=image), _image_of, timeout)


def _rolled_back(msg: admin_pb2.RollbackResponse) -> tuple[ImageInfo, ImageInfo | None]:
    previous = _images.image_info(msg.previous) if msg.HasField("previous") else None
    return _images.image_info(msg.active), previous


def rollback(*, allow_downgrade: bool = False, timeout: float | None = None,
             ) -> Call[tuple[ImageInfo, ImageInfo | None]]:
    request = admin_pb2.RollbackRequest(allow_downgrade=allow_downgrade)
    return Call("Rollback", request, _rolled_back, timeout)


def remove_image(image: str, *, timeout: float | None = None) -> Call[str]:
    request = admin_pb2.RemoveImageRequest(image=image)
    return Call("RemoveImage", request, lambda msg: str(msg.digest), timeout)


def install_addon(tar_chunks: Iterable[bytes], *,
                  timeout: float | None = None) -> Call[AddonChange]:
    """InstallAddon: the add-on tar streamed in, one answer."""
    return Call("InstallAddon", _addons.install_requests(tar_chunks), _addons.installed_addon,
                timeout)


def list_addons(*, timeout: float | None = None) -> Call[AddonList]:
    return Call("ListAddons", admin_pb2.ListAddonsRequest(), _addons.addon_list, timeout)


def remove_addon(name: str, *, timeout: float | None = None) -> Call[AddonChange]:
    return Call("RemoveAddon", admin_pb2.RemoveAddonRequest(name=name), _addons.removed_addon,
                timeout)


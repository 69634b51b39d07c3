"""The client's only protobuf boundary: Python arguments → requests, responses → dataclasses.

Both clients (sync and asyncio) build their requests and read their responses here, so the
public types in `types.py` never see generated code. Values protobuf rejects (a negative
seed, a wrong type) become `InvalidArgumentError` before anything is sent.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from m4.admin.v1 import admin_pb2
from m4.inference.v1 import inference_pb2 as pb

from . import status as adm
from . import types as api
from .errors import InvalidArgumentError

D = TypeVar("D")

_PRIORITY = {
    None: pb.PRIORITY_UNSPECIFIED,
    api.Priority.SYSTEM: pb.PRIORITY_SYSTEM,
    api.Priority.FOREGROUND: pb.PRIORITY_FOREGROUND,
    api.Priority.BACKGROUND: pb.PRIORITY_BACKGROUND,
}
_FINISH = {
    pb.FINISH_REASON_EOS: api.FinishReason.EOS,
    pb.FINISH_REASON_LENGTH: api.FinishReason.LENGTH,
    pb.FINISH_REASON_STOP: api.FinishReason.STOP,
    pb.FINISH_REASON_CONTEXT: api.FinishReason.CONTEXT,
    pb.FINISH_REASON_TOOL_CALL: api.FinishReason.TOOL_CALL,
}
_OVERFLOW = {
    api.Overflow.FAIL: pb.OVERFLOW_FAIL,
    api.Overflow.DROP_OLDEST: pb.OVERFLOW_DROP_OLDEST,
}


# ---------------------------------------------------------------- Python → request messages


def priority(value: api.Priority | str | None) -> int:
    """The protobuf enum value for a priority given as `Priority`, its name or None."""
    try:
        return int(_PRIORITY[api.Priority(value.lower()) if isinstance(value, str) else value])
    except (ValueError, KeyError):
        choices = ", ".join(p.value for p in api.Priority)
        raise InvalidArgumentError(f"priority must be one of {choices} (got {value!r})") from None


def sampling(
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
) -> pb.SamplingParams:
    """SamplingParams; None leaves a field at the daemon's default."""
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    try:
        msg = pb.SamplingParams(top_k=top_k or 0, stop=stops)
        msg.ignore_eos = ignore_eos
        if max_tokens is not None:
            msg.max_tokens = max_tokens
        if temperature is not None:
            msg.temperature = temperature
        if top_p is not None:
            msg.top_p = top_p
        if seed is not None:
            msg.seed = seed
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"bad sampling parameter: {exc}") from None
    return msg


def chat_messages(messages: Iterable[api.ChatMessage | Mapping[str, str]]) -> pb.Chat:
    """A Chat from ChatMessage objects or {"role": ..., "content": ...} dicts."""
    chat = pb.Chat()
    for m in messages:
        if isinstance(m, api.ChatMessage):
            role, content = m.role, m.content
        elif isinstance(m, Mapping) and "role" in m and "content" in m:
            role, content = m["role"], m["content"]
        else:
            raise InvalidArgumentError(
                f"a chat message must be a ChatMessage or a dict with role and content (got {m!r})"
            )
        chat.messages.add(role=str(role), content=str(content))
    return chat


def generate_request(
    *,
    prompt: str | None = None,
    chat: pb.Chat | None = None,
    task: str = "",
    params: pb.SamplingParams,
    prio: int,
) -> pb.GenerateRequest:
    """A GenerateRequest with exactly one of prompt and chat."""
    if chat is not None:
        return pb.GenerateRequest(task=task, chat=chat, sampling=params, priority=prio)
    return pb.GenerateRequest(task=task, prompt=prompt or "", sampling=params, priority=prio)


def response_format(*, json_schema: Mapping[str, Any] | str | None = None,
                    regex: str | None = None,
                    choices: Sequence[str] | None = None) -> pb.ResponseFormat | None:
    """The structured-output format of a generation; None for free text."""
    given = [name for name, v in (("json_schema", json_schema), ("regex", regex),
                                  ("choices", choices)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of json_schema, regex and choices (got {given})")
    if json_schema is not None:
        text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        return pb.ResponseFormat(json_schema=text)
    if regex is not None:
        return pb.ResponseFormat(regex=regex)
    if choices is not None:
        if isinstance(choices, str):
            raise TypeError("choices is a sequence of strings, not one string")
        return pb.ResponseFormat(choices=pb.Choices(values=list(choices)))
    return None


def tools(items: Iterable[api.Tool | Mapping[str, Any]]) -> list[pb.Tool]:
    """Tool messages from `Tool`s or {"name", "description", "parameters"} dicts."""
    out: list[pb.Tool] = []
    for t in items:
        tool = t if isinstance(t, api.Tool) else api.Tool(**t)
        schema = tool.parameters
        out.append(pb.Tool(name=tool.name, description=tool.description,
                           parameters_schema=schema if isinstance(schema, str)
                           else json.dumps(schema)))
    return out


def overflow(value: api.Overflow | str) -> int:
    try:
        return int(_OVERFLOW[api.Overflow(value)])
    except ValueError:
        choices = ", ".join(o.value for o in api.Overflow)
        raise InvalidArgumentError(f"overflow must be one of {choices} (got {value!r})") from None


def media_inputs(*, image: Any = None, audio: Any = None) -> dict[str, Any]:
    """{"image": Image} and/or {"audio": Audio | PcmAudio}; plain bytes are wrapped."""
    out: dict[str, Any] = {}
    if image is not None:
        out["image"] = image if isinstance(image, api.Image) else api.Image(bytes(image))
    if audio is not None:
        out["audio"] = audio if isinstance(audio, api.Audio | api.PcmAudio) else api.Audio(bytes(audio))
    return out


def ask_task(task: str | None, image: Any, audio: Any) -> str:
    if (image is None) == (audio is None):
        raise InvalidArgumentError("ask about one image or one audio clip: give image= or audio=")
    return task or ("ocr-ask" if image is not None else "speech-ask")


def run_inputs(inputs: Mapping[str, Any]) -> list[pb.Input]:
    """Input messages from {name: value}; the value's Python type picks the oneof field."""
    out: list[pb.Input] = []
    for name, value in inputs.items():
        item = pb.Input(name=name)
        if isinstance(value, str):
            item.text = value
        elif isinstance(value, api.Image):
            item.image = value.data
        elif isinstance(value, api.Audio):
            item.audio = value.data
        elif isinstance(value, api.PcmAudio):
            item.pcm.CopyFrom(pb.PcmAudio(data=value.data, sample_rate=value.sample_rate,
                                          encoding=value.encoding, channels=value.channels))
        elif isinstance(value, api.Tensor):
            item.tensor.CopyFrom(pb.Tensor(dtype=value.dtype, shape=value.shape, data=value.data))
        elif isinstance(value, bytes | bytearray | memoryview):
            raise InvalidArgumentError(
                f"input {name!r}: wrap bytes in m4client.Image(...) or m4client.Audio(...)"
            )
        elif hasattr(value, "__array__") and hasattr(value, "dtype"):
            arr = value.astype(value.dtype.newbyteorder("<"), copy=False)
            data = arr.tobytes(order="C")
            item.tensor.CopyFrom(pb.Tensor(dtype=str(arr.dtype.name), shape=arr.shape, data=data))
        elif isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
            item.texts.values.extend(value)
        elif isinstance(value, Sequence):
            item.chat.CopyFrom(chat_messages(value))
        else:
            raise InvalidArgumentError(f"input {name!r}: unsupported value {type(value).__name__}")
        out.append(item)
    return out


# ---------------------------------------------------------------- response messages → Python


def copy(cls: type[D], msg: Any, **converted: Any) -> D:
    """A result dataclass from the message's fields of the same names: scalars as they are,
    repeated scalars as the dataclass's list or tuple. `converted` gives the fields that need
    more (nested messages, enums, `raw`); a field the message lacks keeps its default."""
    values = dict(converted)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in values or f.name == "raw" or not hasattr(msg, f.name):
            continue
        value = getattr(msg, f.name)
        if not isinstance(value, str | bytes | int | float):  # a repeated scalar field
            value = tuple(value) if str(f.type).startswith("tuple") else list(value)
        values[f.name] = value
    return cls(**values)


def model_info(parent: Any) -> api.ModelInfo | None:
    """The ModelInfo of a response, or None when the field is unset."""
    return copy(api.ModelInfo, parent.model) if parent.HasField("model") else None


def _results(msg: Any) -> dict[str, Any]:
    """What every response carries: usage, timings (None when unset), model and itself."""
    return {"usage": copy(api.Usage, msg.usage) if msg.HasField("usage") else None,
            "timings": copy(api.Timings, msg.timings) if msg.HasField("timings") else None,
            "model": model_info(msg), "raw": msg}


def _unary(msg: Any) -> dict[str, Any]:
    """`_results` of a unary response: usage and timings are always set there."""
    return {**_results(msg), "usage": copy(api.Usage, msg.usage),
            "timings": copy(api.Timings, msg.timings)}


def generation_chunk(msg: pb.GenerateResponse) -> api.GenerationChunk:
    return copy(api.GenerationChunk, msg, finish_reason=_FINISH.get(msg.finish_reason),
                tool_call=copy(api.ToolCall, msg.tool_call) if msg.HasField("tool_call") else None,
                session=copy(api.SessionContext, msg.session) if msg.HasField("session") else None,
                **_results(msg))


def session_info(msg: pb.Session) -> api.SessionInfo:
    overflow = next((k for k, v in _OVERFLOW.items() if v == msg.overflow), api.Overflow.FAIL)
    return api.SessionInfo(
        msg.session_id, msg.task, [api.ChatMessage(m.role, m.content) for m in msg.transcript],
        msg.context_tokens, msg.context_window,
        [api.Tool(t.name, t.description, json.loads(t.parameters_schema or "{}"))
         for t in msg.tools], overflow, model_info(msg))


def _labels(items: Iterable[pb.LabelScore]) -> list[api.LabelScore]:
    return [copy(api.LabelScore, x) for x in items]


def _predictions(items: Iterable[pb.WordPrediction]) -> list[api.WordPrediction]:
    return [copy(api.WordPrediction, x) for x in items]


def embed_result(msg: pb.EmbedResponse) -> api.EmbedResult:
    vectors = [list(e.values) for e in msg.embeddings]
    dims = msg.dimensions or (len(vectors[0]) if vectors else 0)
    return api.EmbedResult(vectors, dims, **_unary(msg))


def classify_result(msg: pb.ClassifyResponse) -> api.ClassifyResult:
    return api.ClassifyResult(_labels(msg.labels), **_unary(msg))


def predict_next_result(msg: pb.PredictNextResponse) -> api.PredictNextResult:
    return api.PredictNextResult(_predictions(msg.predictions), **_unary(msg))


def _io(specs: Iterable[pb.IOSpec]) -> tuple[api.IOSpec, ...]:
    return tuple(copy(api.IOSpec, s) for s in specs)


def task_table(msg: pb.ListTasksResponse) -> api.TaskTable:
    tasks = [copy(api.Task, t, inputs=_io(t.inputs), outputs=_io(t.outputs)) for t in msg.tasks]
    return api.TaskTable(tasks, model_info(msg), raw=msg)


def run_chunk(msg: pb.RunResponse) -> api.RunChunk:
    return copy(
        api.RunChunk, msg,
        embeddings=[list(e.values) for e in msg.embeddings],
        labels=_labels(msg.labels),
        predictions=_predictions(msg.predictions),
        finish_reason=_FINISH.get(msg.finish_reason),
        boxes=[api.TextBox(b.text, b.confidence, [(p.x, p.y) for p in b.corners]) for b in msg.boxes],
        keywords=[copy(api.KeywordHit, k) for k in msg.keywords],
        **_results(msg),
    )


def daemon_status(msg: admin_pb2.StatusResponse) -> adm.DaemonStatus:
    try:
        state = admin_pb2.DaemonState.Name(msg.state).removeprefix("DAEMON_STATE_")
    except ValueError:  # a newer daemon's state this client does not know
        state = str(msg.state)
    load = msg.load
    return copy(
        adm.DaemonStatus, msg, state=state,
        components=[copy(adm.ComponentStatus, c) for c in msg.components],
        load=copy(adm.EngineLoad, load, queues={q.priority_class: q.depth for q in load.queues},
                  uid_limits=copy(adm.UidLimits, load.uid_limits))
        if msg.HasField("load") else None,
        uids=[copy(adm.UidUsage, u) for u in msg.uids],
        devices=[copy(adm.DeviceStatus, d) for d in msg.devices],
        memory=copy(adm.MemoryUsage, msg.memory) if msg.HasField("memory") else None,
        raw=msg,
    )

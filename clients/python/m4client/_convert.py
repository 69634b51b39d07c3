"""The client's only protobuf boundary: Python arguments → requests, responses → dataclasses.

Both clients (sync and asyncio) build their requests and read their responses here, so the
public types in `types.py` never see generated code. Values protobuf rejects (a negative
seed, a wrong type) become `InvalidArgumentError` before anything is sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from m4.admin.v1 import admin_pb2
from m4.inference.v1 import inference_pb2 as pb

from .errors import InvalidArgumentError
from .types import (
    Audio,
    ChatMessage,
    ClassifyResult,
    ComponentStatus,
    DaemonStatus,
    DeviceStatus,
    EmbedResult,
    EngineLoad,
    FinishReason,
    GenerationChunk,
    Image,
    IOSpec,
    KeywordHit,
    LabelScore,
    ModelInfo,
    PcmAudio,
    PredictNextResult,
    Priority,
    RunChunk,
    Task,
    TaskTable,
    Tensor,
    TextBox,
    Timings,
    UidUsage,
    Usage,
    WordPrediction,
)

_PRIORITY = {
    None: pb.PRIORITY_UNSPECIFIED,
    Priority.SYSTEM: pb.PRIORITY_SYSTEM,
    Priority.FOREGROUND: pb.PRIORITY_FOREGROUND,
    Priority.BACKGROUND: pb.PRIORITY_BACKGROUND,
}
_FINISH = {
    pb.FINISH_REASON_EOS: FinishReason.EOS,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_CONTEXT: FinishReason.CONTEXT,
}


# ---------------------------------------------------------------- Python → request messages


def priority(value: Priority | str | None) -> int:
    """The protobuf enum value for a priority given as `Priority`, its name or None."""
    try:
        return int(_PRIORITY[Priority(value.lower()) if isinstance(value, str) else value])
    except (ValueError, KeyError):
        choices = ", ".join(p.value for p in Priority)
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


def chat_messages(messages: Iterable[ChatMessage | Mapping[str, str]]) -> pb.Chat:
    """A Chat from ChatMessage objects or {"role": ..., "content": ...} dicts."""
    chat = pb.Chat()
    for m in messages:
        if isinstance(m, ChatMessage):
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


def media_inputs(*, image: Any = None, audio: Any = None) -> dict[str, Any]:
    """{"image": Image} and/or {"audio": Audio | PcmAudio}; plain bytes are wrapped."""
    out: dict[str, Any] = {}
    if image is not None:
        out["image"] = image if isinstance(image, Image) else Image(bytes(image))
    if audio is not None:
        out["audio"] = audio if isinstance(audio, Audio | PcmAudio) else Audio(bytes(audio))
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
        elif isinstance(value, Image):
            item.image = value.data
        elif isinstance(value, Audio):
            item.audio = value.data
        elif isinstance(value, PcmAudio):
            item.pcm.CopyFrom(pb.PcmAudio(data=value.data, sample_rate=value.sample_rate,
                                          encoding=value.encoding, channels=value.channels))
        elif isinstance(value, Tensor):
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


def usage(msg: pb.Usage) -> Usage:
    return Usage(msg.prompt_tokens, msg.completion_tokens, msg.total_tokens)


def timings(msg: pb.Timings) -> Timings:
    return Timings(msg.queue_ms, msg.prefill_ms, msg.decode_ms, msg.first_token_ms, msg.total_ms)


def model_info(parent: Any) -> ModelInfo | None:
    """The ModelInfo of a response, or None when the field is unset."""
    if not parent.HasField("model"):
        return None
    m = parent.model
    return ModelInfo(m.image_name, m.image_version, m.image_digest)


def finish_reason(value: int) -> FinishReason | None:
    return _FINISH.get(value)


def _opt_usage(msg: Any) -> Usage | None:
    return usage(msg.usage) if msg.HasField("usage") else None


def _opt_timings(msg: Any) -> Timings | None:
    return timings(msg.timings) if msg.HasField("timings") else None


def generation_chunk(msg: pb.GenerateResponse) -> GenerationChunk:
    return GenerationChunk(
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=finish_reason(msg.finish_reason),
        usage=_opt_usage(msg),
        timings=_opt_timings(msg),
        model=model_info(msg),
        raw=msg,
    )


def _labels(items: Iterable[pb.LabelScore]) -> list[LabelScore]:
    return [LabelScore(x.label, x.score, x.raw_score) for x in items]


def _predictions(items: Iterable[pb.WordPrediction]) -> list[WordPrediction]:
    return [WordPrediction(x.word, x.probability) for x in items]


def embed_result(msg: pb.EmbedResponse) -> EmbedResult:
    vectors = [list(e.values) for e in msg.embeddings]
    dims = msg.dimensions or (len(vectors[0]) if vectors else 0)
    return EmbedResult(
        vectors, dims, usage(msg.usage), timings(msg.timings), model_info(msg), raw=msg
    )


def classify_result(msg: pb.ClassifyResponse) -> ClassifyResult:
    return ClassifyResult(
        _labels(msg.labels), usage(msg.usage), timings(msg.timings), model_info(msg), raw=msg
    )


def predict_next_result(msg: pb.PredictNextResponse) -> PredictNextResult:
    return PredictNextResult(
        _predictions(msg.predictions),
        usage(msg.usage),
        timings(msg.timings),
        model_info(msg),
        raw=msg,
    )


def _io(spec: pb.IOSpec) -> IOSpec:
    return IOSpec(
        spec.name, spec.kind, spec.dtype, tuple(spec.shape), spec.required, spec.description
    )


def task_table(msg: pb.ListTasksResponse) -> TaskTable:
    tasks = [
        Task(
            id=t.id,
            m4_id=t.m4_id,
            path=t.path,
            description=t.description,
            modules=tuple(t.modules),
            adapter=t.adapter,
            head=t.head,
            labels=tuple(t.labels),
            inputs=tuple(_io(s) for s in t.inputs),
            outputs=tuple(_io(s) for s in t.outputs),
            rpc=t.rpc,
            streaming=t.streaming,
        )
        for t in msg.tasks
    ]
    return TaskTable(tasks, model_info(msg), raw=msg)


def run_chunk(msg: pb.RunResponse) -> RunChunk:
    return RunChunk(
        text=msg.text,
        embeddings=[list(e.values) for e in msg.embeddings],
        labels=_labels(msg.labels),
        predictions=_predictions(msg.predictions),
        finish_reason=finish_reason(msg.finish_reason),
        usage=_opt_usage(msg),
        timings=_opt_timings(msg),
        model=model_info(msg),
        boxes=[TextBox(b.text, b.confidence, [(p.x, p.y) for p in b.corners]) for b in msg.boxes],
        keywords=[KeywordHit(k.keyword, k.detected, k.score, k.heard) for k in msg.keywords],
        source_text=msg.source_text,
        audio_seconds=msg.audio_seconds,
        raw=msg,
    )


def daemon_status(msg: admin_pb2.StatusResponse) -> DaemonStatus:
    try:
        state = admin_pb2.DaemonState.Name(msg.state).removeprefix("DAEMON_STATE_")
    except ValueError:  # a newer daemon's state this client does not know
        state = str(msg.state)
    components = [
        ComponentStatus(c.name, c.kind, c.parameters, c.weight_format, c.compute_dtype, c.device,
                        c.kernels)
        for c in msg.components
    ]
    return DaemonStatus(
        image_name=msg.image_name,
        image_version=msg.image_version,
        image_digest=msg.image_digest,
        daemon_version=msg.daemon_version,
        state=state,
        uptime_seconds=msg.uptime_seconds,
        memory_rss_bytes=msg.memory_rss_bytes,
        requests_in_flight=msg.requests_in_flight,
        requests_total=msg.requests_total,
        requests_cancelled=msg.requests_cancelled,
        requests_rejected=msg.requests_rejected,
        tokens_generated=msg.tokens_generated,
        tokens_prompted=msg.tokens_prompted,
        active_sequences=msg.active_sequences,
        kv_slots=msg.kv_slots,
        components=components,
        threads=msg.threads,
        image_operation=msg.image_operation,
        load=engine_load(msg.load) if msg.HasField("load") else None,
        uids=[uid_usage(u) for u in msg.uids],
        devices=[DeviceStatus(d.name, d.kind, d.description, d.memory_bytes, d.cores,
                              list(d.flags), list(d.components), d.executor)
                 for d in msg.devices],
        raw=msg,
    )


def engine_load(msg: admin_pb2.EngineLoad) -> EngineLoad:
    return EngineLoad(
        queues={q.priority_class: q.depth for q in msg.queues},
        running_sequences=msg.running_sequences, decode_batch_size=msg.decode_batch_size,
        kv_blocks_used=msg.kv_blocks_used, kv_blocks_total=msg.kv_blocks_total,
        decode_tokens_per_second=msg.decode_tokens_per_second, ttft_p50_ms=msg.ttft_p50_ms,
        ttft_p99_ms=msg.ttft_p99_ms, ttft_samples=msg.ttft_samples,
        window_seconds=msg.window_seconds)


def uid_usage(msg: admin_pb2.UidUsage) -> UidUsage:
    return UidUsage(
        uid=msg.uid, user=msg.user, apps=list(msg.apps), requests_ok=msg.requests_ok,
        requests_failed=msg.requests_failed, requests_rejected=msg.requests_rejected,
        tokens_in=msg.tokens_in, tokens_out=msg.tokens_out,
        tokens_per_second=msg.tokens_per_second, in_flight=msg.in_flight, queued=msg.queued,
        priority_class=msg.priority_class)

"""Protobuf ⇄ domain: the one module that turns API messages into validated engine requests
and engine events into API messages.

Validation lives here because this is where a field still has its API name: every
message says which field is wrong, what was received and what is allowed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from m4.inference.v1 import inference_pb2 as pb

from m4d.config import Config
from m4d.errors import InvalidArgument
from m4d.prepare.tokenizer import ChatTemplate, TextTokenizer
from m4d.requests import (
    Caller,
    ClassifyRequest,
    Embeddings,
    EmbedRequest,
    Finished,
    FinishReason,
    GenerateRequest,
    KeywordsHeard,
    MediaInput,
    MediaOp,
    MediaRequest,
    Predictions,
    PredictNextRequest,
    Priority,
    Ranked,
    SamplingParams,
    SourceText,
    TextDelta,
    TextRead,
    Timings,
    Transcribed,
    Usage,
)

DEFAULT_TEMPERATURE = 0.7
MAX_PREDICTIONS = 20
MAX_STOP_STRINGS = 8
MAX_LABELS = 64
MAX_KEYWORDS = 32
SPEECH_SAMPLE_RATE = 16_000  # what the speech encoder (Whisper) reads
# How a media task's head says what it does; cascades (lm_head) answer through the backbone.
_MEDIA_HEADS = {"transcript": MediaOp.TRANSCRIBE, "keyword_match": MediaOp.KEYWORDS,
                "ocr_text": MediaOp.OCR, "lm_head": MediaOp.ANSWER,
                "clip_zero_shot": MediaOp.IMAGE_LABELS, "clip_similarity": MediaOp.IMAGE_RANK,
                "clip_image_embed": MediaOp.IMAGE_EMBED, "sensor_classifier": MediaOp.SENSOR_LABELS}

_PRIORITY = {
    pb.PRIORITY_UNSPECIFIED: Priority.FOREGROUND,
    pb.PRIORITY_SYSTEM: Priority.SYSTEM,
    pb.PRIORITY_FOREGROUND: Priority.FOREGROUND,
    pb.PRIORITY_BACKGROUND: Priority.BACKGROUND,
}
_FINISH = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CONTEXT: pb.FINISH_REASON_CONTEXT,
}


@dataclass(frozen=True)
class ImageInfo:
    name: str
    version: str
    digest: str


class Converter:
    """Validates and converts requests against the active image's tasks and limits."""

    def __init__(self, config: Config, tasks: Sequence[dict[str, Any]], image: ImageInfo,
                 tokenizer: TextTokenizer | None, chat_template: ChatTemplate | None,
                 max_context: int) -> None:
        self.config = config
        self.tasks = {t["id"]: t for t in tasks}
        self.task_list = list(tasks)
        self.image = image
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_context = max_context

    # ---- shared checks -------------------------------------------------------------

    def task(self, task_id: str, rpc: str) -> dict[str, Any]:
        task = self.tasks.get(task_id)
        if task is None:
            raise InvalidArgument(
                f"unknown task {task_id!r}; this image has: {', '.join(sorted(self.tasks))}")
        if rpc != "Run" and task.get("rpc") != rpc:
            raise InvalidArgument(
                f"task {task_id!r} is served by {task.get('rpc')}, not {rpc}; "
                f"call {task.get('rpc')} or Run")
        return task

    def text(self, field: str, value: str) -> str:
        if not value.strip():
            raise InvalidArgument(f"{field} is empty")
        if len(value) > self.config.max_text_chars:
            raise InvalidArgument(
                f"{field} has {len(value)} characters; the limit is {self.config.max_text_chars}")
        return value

    def _tokens(self, field: str, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidArgument("this image has no language backbone")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise InvalidArgument(f"{field} has no tokens")
        return ids

    # ---- Generate ------------------------------------------------------------------

    def generate(self, req: pb.GenerateRequest, caller: Caller,
                 deadline: float | None) -> GenerateRequest:
        which = req.WhichOneof("input")
        if which is None:
            raise InvalidArgument("set either prompt or chat")
        task_id = req.task or ("chat" if which == "chat" else "generate")
        task = self.task(task_id, "Generate")
        if which == "chat":
            prompt = self.render_chat(req.chat.messages)
            field = "chat"
        else:
            prompt = self.apply_template(task, self.text("prompt", req.prompt))
            field = "prompt"
        expected = _input_kind(task)
        if expected and expected != which:
            raise InvalidArgument(f"task {task_id!r} takes a {expected}, not a {which}")
        ids = self._tokens(field, prompt)
        sampling = self.sampling(req.sampling, len(ids))
        return GenerateRequest(task=task_id, priority=_PRIORITY.get(req.priority, Priority.FOREGROUND),
                               caller=caller, deadline=deadline, prompt_ids=ids, sampling=sampling)

    def apply_template(self, task: dict[str, Any], prompt: str) -> str:
        """A task's prompt template: "" passes the text as is; "chat" renders it as one user
        turn with the backbone's chat template; any other string has {prompt} replaced."""
        template = task.get("prompt_template") or ""
        if not template:
            return prompt
        if template == "chat":
            return self.render_chat([pb.ChatMessage(role="user", content=prompt)])
        return template.replace("{prompt}", prompt)

    def render_chat(self, messages: Sequence[pb.ChatMessage]) -> str:
        if not messages:
            raise InvalidArgument("chat has no messages")
        if self.chat_template is None:
            raise InvalidArgument("this image's backbone has no chat template")
        out = []
        for i, m in enumerate(messages):
            if m.role not in ("system", "user", "assistant"):
                raise InvalidArgument(
                    f"chat.messages[{i}].role is {m.role!r}; use system, user or assistant")
            self.text(f"chat.messages[{i}].content", m.content)
            out.append({"role": m.role, "content": m.content})
        return self.chat_template.render(out, add_generation_prompt=True)

    def sampling(self, s: pb.SamplingParams, prompt_tokens: int) -> SamplingParams:
        room = self.max_context - prompt_tokens
        if room <= 0:
            raise InvalidArgument(
                f"the prompt has {prompt_tokens} tokens; the context holds {self.max_context}, "
                "so no room is left to generate")
        if s.HasField("max_tokens"):
            max_tokens = s.max_tokens
        else:
            max_tokens = min(self.config.default_max_tokens, room)
        if max_tokens <= 0:
            raise InvalidArgument(f"max_tokens must be > 0 (got {max_tokens})")
        if max_tokens > room:
            raise InvalidArgument(
                f"max_tokens={max_tokens} does not fit: the prompt has {prompt_tokens} tokens "
                f"and the context holds {self.max_context}; at most {room} can be generated")
        temperature = s.temperature if s.HasField("temperature") else DEFAULT_TEMPERATURE
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0 (got {temperature})")
        top_p = s.top_p if s.HasField("top_p") else 1.0
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1] (got {top_p})")
        if s.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (got {s.top_k}); 0 means no limit")
        if len(s.stop) > MAX_STOP_STRINGS or any(not x for x in s.stop):
            raise InvalidArgument(
                f"stop takes at most {MAX_STOP_STRINGS} non-empty strings (got {list(s.stop)!r})")
        return SamplingParams(
            max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
            top_k=s.top_k, seed=s.seed if s.HasField("seed") else None,
            stop=tuple(s.stop), ignore_eos=s.ignore_eos)

    # ---- Embed, Classify, PredictNext ----------------------------------------------

    def embed(self, req: pb.EmbedRequest, caller: Caller, deadline: float | None) -> EmbedRequest:
        task_id = req.task or "embed"
        self.task(task_id, "Embed")
        texts = self.texts("texts", req.texts, self.config.max_batch_texts)
        return EmbedRequest(task=task_id, priority=_PRIORITY.get(req.priority, Priority.FOREGROUND),
                            caller=caller, deadline=deadline, texts=texts)

    def texts(self, field: str, values: Sequence[str], limit: int) -> list[str]:
        if not values:
            raise InvalidArgument(f"{field} is empty; give at least one text")
        if len(values) > limit:
            raise InvalidArgument(f"{field} has {len(values)} texts; the limit is {limit}")
        return [self.text(f"{field}[{i}]", t) for i, t in enumerate(values)]

    def classify(self, req: pb.ClassifyRequest, caller: Caller,
                 deadline: float | None) -> ClassifyRequest:
        task_id = req.task or "classify"
        task = self.task(task_id, "Classify")
        labels = list(req.labels) or list(task.get("labels") or [])
        if not labels:
            raise InvalidArgument(f"labels is empty; task {task_id!r} needs candidate labels")
        labels = self.texts("labels", labels, MAX_LABELS)
        if len(set(labels)) != len(labels):
            raise InvalidArgument("labels has duplicates")
        return ClassifyRequest(task=task_id, priority=_PRIORITY.get(req.priority, Priority.FOREGROUND),
                               caller=caller, deadline=deadline,
                               text=self.text("text", req.text), labels=labels)

    def predict_next(self, req: pb.PredictNextRequest, caller: Caller,
                     deadline: float | None) -> PredictNextRequest:
        task_id = req.task or "predict-next"
        self.task(task_id, "PredictNext")
        n = req.num_predictions or 5
        if not 0 < n <= MAX_PREDICTIONS:
            raise InvalidArgument(f"num_predictions must be in 1..{MAX_PREDICTIONS} (got {n})")
        text = self.text("text", req.text).rstrip()
        ids = self._tokens("text", text)
        if len(ids) >= self.max_context:
            raise InvalidArgument(
                f"text has {len(ids)} tokens; the context holds {self.max_context}")
        return PredictNextRequest(task=task_id, priority=_PRIORITY.get(req.priority, Priority.FOREGROUND),
                                  caller=caller, deadline=deadline, prompt_ids=ids,
                                  num_predictions=n)

    # ---- Run: any task by id -------------------------------------------------------

    def run(self, req: pb.RunRequest, caller: Caller, deadline: float | None) -> Any:
        task = self.task(req.task, "Run")
        inputs: dict[str, pb.Input] = {}
        for i, item in enumerate(req.inputs):
            if not item.name:
                raise InvalidArgument(f"inputs[{i}] has no name")
            inputs[item.name] = item
        specs = {s["name"]: s for s in task.get("inputs", [])}
        for name in inputs:
            if name not in specs:
                raise InvalidArgument(
                    f"task {req.task!r} has no input {name!r}; it takes: {', '.join(specs)}")
        for name, spec in specs.items():
            if spec.get("required") and name not in inputs:
                raise InvalidArgument(f"task {req.task!r} needs input {name!r} ({spec['kind']})")
            if name in inputs:
                got = inputs[name].WhichOneof("value")
                if got != spec["kind"] and not (spec["kind"] == "audio" and got == "pcm"):
                    raise InvalidArgument(
                        f"input {name!r} of task {req.task!r} must be {spec['kind']}, not {got}")
        if any(s["kind"] in ("image", "audio", "tensor") for s in specs.values()):
            return self.media(task, req, inputs, caller, deadline)
        rpc = task.get("rpc")
        prio = req.priority
        if rpc == "Generate":
            g = pb.GenerateRequest(task=req.task, sampling=req.sampling, priority=prio)
            for item in inputs.values():
                if item.WhichOneof("value") == "chat":
                    g.chat.CopyFrom(item.chat)
                else:
                    g.prompt = item.text
            return self.generate(g, caller, deadline)
        if rpc == "Embed":
            texts = next(iter(inputs.values())).texts.values if inputs else []
            return self.embed(pb.EmbedRequest(task=req.task, texts=texts, priority=prio),
                              caller, deadline)
        if rpc == "Classify":
            return self.classify(pb.ClassifyRequest(
                task=req.task, text=inputs["text"].text if "text" in inputs else "",
                labels=inputs["labels"].texts.values if "labels" in inputs else [],
                priority=prio), caller, deadline)
        if rpc == "PredictNext":
            return self.predict_next(pb.PredictNextRequest(
                task=req.task, text=inputs["text"].text if "text" in inputs else "",
                num_predictions=req.num_predictions, priority=prio), caller, deadline)
        raise InvalidArgument(f"task {req.task!r} cannot run on this daemon (rpc {rpc!r})")

    # ---- image and audio tasks -----------------------------------------------------

    def media(self, task: dict[str, Any], req: pb.RunRequest, inputs: dict[str, pb.Input],
              caller: Caller, deadline: float | None) -> MediaRequest:
        """A task on an image or audio clip: decoded and validated here (the caller runs
        this off the event loop), recognised by the task's first module."""
        op = _MEDIA_HEADS.get(task.get("head", ""))
        if op is None or not task.get("modules"):
            raise InvalidArgument(f"task {task['id']!r} cannot run on this daemon "
                                  f"(head {task.get('head')!r})")
        media: MediaInput | None = None
        for name, item in inputs.items():
            kind = item.WhichOneof("value")
            if kind == "image":
                media = self.image_input(name, item.image)
            elif kind in ("audio", "pcm"):
                media = self.audio_input(name, item)
            elif kind == "tensor":
                media = self.tensor_input(name, item.tensor,
                                          next(s for s in task["inputs"] if s["name"] == name))
        if media is None:
            raise InvalidArgument(f"task {task['id']!r} needs an image, audio or tensor input")
        request = MediaRequest(task=task["id"], priority=_PRIORITY.get(req.priority, Priority.FOREGROUND),
                               caller=caller, deadline=deadline, op=op,
                               module=task["modules"][0], media=media)
        if op is MediaOp.KEYWORDS:
            words = list(inputs["keywords"].texts.values) if "keywords" in inputs else []
            if not words:
                raise InvalidArgument("keywords is empty; give the words to listen for")
            request.keywords = self.texts("keywords", words, MAX_KEYWORDS)
        if op is MediaOp.SENSOR_LABELS:
            request.texts = list(task.get("labels") or [])
        if op in (MediaOp.IMAGE_LABELS, MediaOp.IMAGE_RANK):
            name = "labels" if op is MediaOp.IMAGE_LABELS else "texts"
            given = list(inputs[name].texts.values) if name in inputs else []
            values = given or list(task.get("labels") or [])
            if not values:
                raise InvalidArgument(f"{name} is empty; give the candidate {name}")
            request.texts = self.texts(name, values, MAX_LABELS)
            if len(set(request.texts)) != len(request.texts):
                raise InvalidArgument(f"{name} has duplicates")
            if op is MediaOp.IMAGE_LABELS and "{}" in (task.get("prompt_template") or ""):
                request.label_prompt = task["prompt_template"]
        if op is MediaOp.ANSWER:
            question = inputs["question"].text if "question" in inputs else ""
            request.question = self.text("question", question) if "question" in inputs else ""
            request.prompt_template = task.get("prompt_template") or ""
            if self.tokenizer is None:
                raise InvalidArgument("this image has no language backbone")
            # The prompt is built after recognition; reserve room for it in the context.
            request.sampling = self.sampling(req.sampling, self.max_context // 2)
        return request

    def image_input(self, name: str, data: bytes) -> MediaInput:
        from m4d.prepare.images import decode_image

        if not data:
            raise InvalidArgument(f"input {name!r} is empty; send PNG, JPEG or WebP bytes")
        image = decode_image(data, max_bytes=self.config.max_image_bytes,
                             max_pixels=self.config.max_image_pixels)
        return MediaInput("image", image, hashlib.sha256(data).hexdigest())

    def tensor_input(self, name: str, tensor: pb.Tensor, spec: dict[str, Any]) -> MediaInput:
        from m4d.model.sensor import tensor_from_bytes

        value = tensor_from_bytes(name, tensor.dtype, list(tensor.shape), tensor.data,
                                  spec.get("dtype") or "", list(spec.get("shape") or []))
        digest = hashlib.sha256(f"{tensor.dtype}:{list(tensor.shape)}:".encode()
                                + tensor.data).hexdigest()
        return MediaInput("tensor", value, digest)

    def audio_input(self, name: str, item: pb.Input) -> MediaInput:
        from m4d.prepare.audio import decode_wav, pcm_to_tensor, resample

        limit = self.config.max_audio_seconds
        if item.WhichOneof("value") == "pcm":
            pcm = item.pcm
            if not pcm.data:
                raise InvalidArgument(f"input {name!r} has no PCM samples")
            rate = pcm.sample_rate
            audio = pcm_to_tensor(pcm.data, sample_rate=rate, encoding=pcm.encoding or "s16le",
                                  channels=pcm.channels or 1, max_seconds=limit)
            digest = hashlib.sha256(b"%d:%s:%d:" % (rate, (pcm.encoding or "s16le").encode(),
                                                    pcm.channels or 1) + pcm.data).hexdigest()
        else:
            if not item.audio:
                raise InvalidArgument(f"input {name!r} is empty; send WAV bytes")
            audio, rate = decode_wav(item.audio, max_seconds=limit)
            digest = hashlib.sha256(item.audio).hexdigest()
        seconds = audio.numel() / rate
        if rate != SPEECH_SAMPLE_RATE:
            audio = resample(audio, rate, SPEECH_SAMPLE_RATE)
        return MediaInput("audio", audio, digest, seconds)

    def media_event(self, event: Any) -> pb.RunResponse:
        """Engine events of media tasks → RunResponse."""
        out = pb.RunResponse()
        if isinstance(event, Transcribed):
            out.text = event.text
            out.audio_seconds = event.audio_seconds
        elif isinstance(event, KeywordsHeard):
            out.source_text = event.transcript
            out.audio_seconds = event.audio_seconds
            out.keywords.extend(pb.KeywordHit(keyword=h.keyword, detected=h.detected,
                                              score=h.score, heard=h.heard) for h in event.hits)
        elif isinstance(event, TextRead):
            out.text = event.text
            out.boxes.extend(pb.TextBox(text=b.text, confidence=b.confidence,
                                        corners=[pb.Point(x=x, y=y) for x, y in b.corners])
                             for b in event.boxes)
        elif isinstance(event, SourceText):
            out.source_text = event.text
            out.audio_seconds = event.audio_seconds
            out.model.CopyFrom(self.model_info())
            return out
        else:
            raise TypeError(f"not a media event: {event!r}")
        out.usage.CopyFrom(usage(event.usage))
        out.timings.CopyFrom(timings(event.timings))
        out.model.CopyFrom(self.model_info())
        return out

    # ---- responses -----------------------------------------------------------------

    def model_info(self) -> pb.ModelInfo:
        return pb.ModelInfo(image_name=self.image.name, image_version=self.image.version,
                            image_digest=self.image.digest)

    def delta(self, event: TextDelta) -> pb.GenerateResponse:
        return pb.GenerateResponse(text=event.text, token_ids=list(event.token_ids))

    def finished(self, event: Finished) -> pb.GenerateResponse:
        return pb.GenerateResponse(finish_reason=_FINISH[event.reason], usage=usage(event.usage),
                                   timings=timings(event.timings), model=self.model_info())

    def embeddings(self, event: Embeddings) -> pb.EmbedResponse:
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=v) for v in event.vectors],
            dimensions=event.dimensions, usage=usage(event.usage),
            timings=timings(event.timings), model=self.model_info())

    def ranked(self, event: Ranked) -> pb.ClassifyResponse:
        return pb.ClassifyResponse(
            labels=[pb.LabelScore(label=ls.label, score=ls.score, raw_score=ls.raw_score)
                    for ls in event.labels],
            usage=usage(event.usage), timings=timings(event.timings), model=self.model_info())

    def predictions(self, event: Predictions) -> pb.PredictNextResponse:
        return pb.PredictNextResponse(
            predictions=[pb.WordPrediction(word=p.word, probability=p.probability)
                         for p in event.predictions],
            usage=usage(event.usage), timings=timings(event.timings), model=self.model_info())

    def run_response(self, msg: Any) -> pb.RunResponse:
        """Wraps any of the RPC-specific responses into a RunResponse."""
        out = pb.RunResponse()
        if isinstance(msg, pb.GenerateResponse):
            out.text = msg.text
            out.token_ids.extend(msg.token_ids)
            out.finish_reason = msg.finish_reason
        elif isinstance(msg, pb.EmbedResponse):
            out.embeddings.extend(msg.embeddings)
        elif isinstance(msg, pb.ClassifyResponse):
            out.labels.extend(msg.labels)
        elif isinstance(msg, pb.PredictNextResponse):
            out.predictions.extend(msg.predictions)
        for name in ("usage", "timings", "model"):
            if msg.HasField(name):
                getattr(out, name).CopyFrom(getattr(msg, name))
        return out

    def task_table(self) -> pb.ListTasksResponse:
        out = pb.ListTasksResponse(model=self.model_info())
        for t in self.task_list:
            out.tasks.append(pb.Task(
                id=t["id"], m4_id=t.get("m4_id") or "", path=int(t.get("path", 0)),
                description=t.get("description", ""), modules=t.get("modules", []),
                adapter=t.get("adapter") or "", head=t.get("head") or "",
                labels=t.get("labels") or [], rpc=t.get("rpc", ""),
                streaming=bool(t.get("streaming")),
                inputs=[_io(s) for s in t.get("inputs", [])],
                outputs=[_io(s) for s in t.get("outputs", [])]))
        return out


def _io(spec: dict[str, Any]) -> pb.IOSpec:
    return pb.IOSpec(name=spec["name"], kind=spec.get("kind", ""), dtype=spec.get("dtype") or "",
                     shape=spec.get("shape") or [], required=bool(spec.get("required")),
                     description=spec.get("description", ""))


def _input_kind(task: dict[str, Any]) -> str | None:
    kinds = {s["kind"] for s in task.get("inputs", []) if s.get("kind") in ("text", "chat")}
    if kinds == {"chat"}:
        return "chat"
    if kinds == {"text"}:
        return "prompt"
    return None


def usage(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    total_tokens=u.total_tokens)


def timings(t: Timings) -> pb.Timings:
    return pb.Timings(queue_ms=t.queue_ms, prefill_ms=t.prefill_ms, decode_ms=t.decode_ms,
                      first_token_ms=t.first_token_ms, total_ms=t.total_ms)

"""The served image's tasks: plain values → validated engine requests (no protobuf here).

One `Tasks` per loaded image (its task table, tokenizer, chat template and context length,
with the daemon's limits). The gRPC converter (`m4d.server.convert`) takes each field out
of its message and calls this; the self-test (`m4d.service.selftest`) calls it with the
values of the image's own checks. Every check happens here, once, with the API's field
name in its message: what is wrong, what was received and what is allowed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from m4d.config import Config
from m4d.errors import FailedPrecondition, InvalidArgument
from m4d.prepare.constraints import Grammars, ResponseFormat, bind_spans
from m4d.prepare.tokenizer import ChatTemplate, TextTokenizer
from m4d.requests import (
    Caller,
    ClassifyRequest,
    EmbedRequest,
    GenerateRequest,
    MediaInput,
    MediaOp,
    MediaRequest,
    PredictNextRequest,
    Priority,
    SamplingParams,
)

DEFAULT_TEMPERATURE = 0.7
MAX_PREDICTIONS = 20
MAX_STOP_STRINGS = 8
MAX_LABELS = 64
MAX_KEYWORDS = 32
SPEECH_SAMPLE_RATE = 16_000  # what the speech encoder (Whisper) reads
MEDIA_KINDS = ("image", "audio", "tensor")  # input kinds that make a task a media task
# How a media task's head says what it does; cascades (lm_head) answer through the backbone.
_MEDIA_HEADS = {"transcript": MediaOp.TRANSCRIBE, "keyword_match": MediaOp.KEYWORDS,
                "ocr_text": MediaOp.OCR, "lm_head": MediaOp.ANSWER,
                "clip_zero_shot": MediaOp.IMAGE_LABELS, "clip_similarity": MediaOp.IMAGE_RANK,
                "clip_image_embed": MediaOp.IMAGE_EMBED, "sensor_classifier": MediaOp.SENSOR_LABELS}

Turn = tuple[str, str]  # one chat message: (role, content)
CHAT_ROLES = ("system", "user", "assistant", "tool")  # "tool": a tool's result


@dataclass(frozen=True)
class ImageInfo:
    name: str
    version: str
    digest: str


@dataclass(frozen=True)
class Origin:
    """Who asks, how urgently and until when: what every engine request starts with."""

    caller: Caller
    priority: Priority = Priority.FOREGROUND
    deadline: float | None = None  # time.monotonic() after which the request fails


@dataclass(frozen=True)
class SamplingArgs:
    """Sampling settings as the caller gave them; None (or empty) where not given."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


class Tasks:
    """Validates requests against the active image's tasks and limits, and builds them."""

    def __init__(self, config: Config, tasks: Sequence[dict[str, Any]], image: ImageInfo,
                 tokenizer: TextTokenizer | None, chat_template: ChatTemplate | None,
                 max_context: int, grammars: Grammars | None = None,
                 encoder_window: int = 0, adapters: Sequence[str] = (),
                 adapter_error: str = "", encoder_adapters: Mapping[str, str] | None = None,
                 ) -> None:
        self.config = config
        self.tasks = {t["id"]: t for t in tasks}
        self.task_list = list(tasks)
        self.image = image
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_context = max_context
        self.grammars = grammars
        self.encoder_window = encoder_window  # tokens the text encoder takes (0: none)
        self.image_adapters = frozenset(adapters)  # the backbone adapters the image holds
        self.adapters = set(adapters)  # and those of the add-ons applied (`extend`)
        self.adapter_error = adapter_error  # why adapters cannot run here ("" when they can)
        # add-on -> its task ids, backbone adapters and encoder adapters (`extend`)
        self.owners: dict[str, tuple[list[str], list[str], dict[str, str]]] = {}
        # what a text-encoder task may name as its adapter -> the encoder LoRA it runs with
        self.image_encoder_adapters = dict(encoder_adapters or {})
        self.encoder_adapters = dict(self.image_encoder_adapters)

    def extend(self, owner: str, tasks: Sequence[dict[str, Any]], adapters: Sequence[str],
               encoder_adapters: Mapping[str, str] | None = None) -> None:
        """An add-on's tasks (with the backbone adapters they run with, and its components a
        text-encoder task may name: `encoder_adapters`) join the table, in place of the ones
        it had; each table is swapped in whole, never changed in place."""
        self.withdraw(owner)
        self.owners[owner] = ([t["id"] for t in tasks], list(adapters), dict(encoder_adapters or {}))
        self._rebuild(self.task_list + list(tasks))

    def withdraw(self, owner: str) -> list[str]:
        """An add-on's tasks leave the table (new calls get "unknown task"); their ids."""
        ids = self.owners.pop(owner, ([], [], {}))[0]
        self._rebuild([t for t in self.task_list if t["id"] not in ids])
        return ids

    def _rebuild(self, task_list: list[dict[str, Any]]) -> None:
        self.task_list = task_list
        self.tasks = {t["id"]: t for t in task_list}
        self.adapters = set(self.image_adapters).union(*(a for _, a, _ in self.owners.values()))
        self.encoder_adapters = dict(self.image_encoder_adapters)
        for _, _, more in self.owners.values():
            self.encoder_adapters.update(more)

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

    def texts(self, field: str, values: Sequence[str], limit: int) -> list[str]:
        if not values:
            raise InvalidArgument(f"{field} is empty; give at least one text")
        if len(values) > limit:
            raise InvalidArgument(f"{field} has {len(values)} texts; the limit is {limit}")
        return [self.text(f"{field}[{i}]", t) for i, t in enumerate(values)]

    def tokens(self, field: str, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidArgument("this image has no language backbone")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise InvalidArgument(f"{field} has no tokens")
        return ids

    def context_window(self, task: dict[str, Any]) -> int:
        """Tokens the task's model holds at once: the backbone's context for anything
        that generates, the text encoder's for embedding and classification, else 0."""
        modules = task.get("modules") or []
        if "backbone" in modules:
            return self.max_context
        return self.encoder_window if "text_encoder" in modules else 0

    # ---- generation ----------------------------------------------------------------

    def prompt_text(self, task_id: str, *, prompt: str | None = None,
                    chat: Sequence[Turn] | None = None) -> tuple[dict[str, Any], str]:
        """A generation task and the text its backbone sees: the chat rendered, or the
        prompt through the task's template."""
        which = "chat" if chat is not None else "prompt"
        task = self.task(task_id, "Generate")
        if chat is not None:
            text = self.render_chat(chat)
        else:
            text = self.apply_template(task, self.text("prompt", prompt or ""))
        expected = _input_kind(task)
        if expected and expected != which:
            raise InvalidArgument(f"task {task_id!r} takes a {expected}, not a {which}")
        return task, text

    def prompt_ids(self, task_id: str, *, prompt: str | None = None,
                   chat: Sequence[Turn] | None = None) -> tuple[list[int], int]:
        """(the tokens Generate feeds the backbone, the task's context window)."""
        task, text = self.prompt_text(task_id, prompt=prompt, chat=chat)
        return self.tokens("chat" if chat is not None else "prompt", text), \
            self.context_window(task)

    def count_tokens(self, task_id: str, *, prompt: str | None = None,
                     chat: Sequence[Turn] | None = None) -> tuple[int, int]:
        """(tokens of the prompt as Generate would feed it, the task's context window)."""
        ids, window = self.prompt_ids(task_id, prompt=prompt, chat=chat)
        return len(ids), window

    def generate(self, task_id: str, origin: Origin, *, prompt: str | None = None,
                 chat: Sequence[Turn] | None = None,
                 sampling: SamplingArgs = SamplingArgs(),
                 response_format: ResponseFormat | None = None) -> GenerateRequest:
        """A generation from a prompt or (when `chat` is given) a chat; its output kept to
        `response_format` when one is given."""
        ids, _ = self.prompt_ids(task_id, prompt=prompt, chat=chat)
        source = prompt if prompt is not None else (chat[-1][1] if chat else None)
        return self.request(task_id, origin, ids, sampling, response_format, source=source)

    def request(self, task_id: str, origin: Origin, ids: list[int], sampling: SamplingArgs,
                response_format: ResponseFormat | None = None,
                keep_reply: bool = False, source: str | None = None) -> GenerateRequest:
        """A generation from prompt tokens `ids` (`prompt_ids`); `keep_reply` (a session's
        turn) keeps the KV of the reply too for the next turn."""
        constraint = None
        schema = str(self.tasks[task_id].get("response_schema") or "")
        if response_format is None and schema and self.grammars is not None:
            # the task's own format (its adapter writes it unaided too, less surely); its
            # marked strings are spans of `source` (the prompt, or the chat's last message)
            response_format = ResponseFormat("json_schema", json_schema=bind_spans(schema, source))
        if response_format is not None:
            if self.grammars is None:
                raise InvalidArgument("this image's backbone has no structured output")
            constraint = self.grammars.compile(response_format)
        return GenerateRequest(task=task_id, priority=origin.priority, caller=origin.caller,
                               deadline=origin.deadline, prompt_ids=ids,
                               sampling=self.sampling(sampling, len(ids)), constraint=constraint,
                               keep_reply=keep_reply, adapter=self.adapter(self.tasks[task_id]))

    def adapter(self, task: dict[str, Any]) -> str:
        """The task's LoRA on the backbone ("" for none); refused when this daemon cannot
        serve it (see Runtime.adapter_error)."""
        name = str(task.get("adapter") or "")
        if name and name not in self.adapters:
            raise FailedPrecondition(f"task {task['id']!r} runs with adapter {name!r}, which "
                                     "this image does not hold")
        if name and self.adapter_error:
            raise FailedPrecondition(f"task {task['id']!r} runs with adapter {name!r}: "
                                     f"{self.adapter_error}")
        return name

    def apply_template(self, task: dict[str, Any], prompt: str) -> str:
        """A task's prompt template: "" passes the text as is; "chat" renders it as one user
        turn with the backbone's chat template; a cascade template (``m4d.engine.cascade``,
        e.g. "slu_adapter") renders its chat with the text as the source; any other string
        has {prompt} replaced."""
        from m4d.prepare.prompts import TEMPLATES, answer_messages

        template = task.get("prompt_template") or ""
        if not template:
            return prompt
        if template == "chat":
            return self.render_chat([("user", prompt)])
        if template in TEMPLATES:
            messages = answer_messages(template, prompt, "")
            return self.render_chat([(m["role"], m["content"]) for m in messages])
        return str(template).replace("{prompt}", prompt)

    def render_chat(self, messages: Sequence[Turn]) -> str:
        if not messages:
            raise InvalidArgument("chat has no messages")
        if self.chat_template is None:
            raise InvalidArgument("this image's backbone has no chat template")
        out = []
        for i, (role, content) in enumerate(messages):
            if role not in CHAT_ROLES:
                raise InvalidArgument(
                    f"chat.messages[{i}].role is {role!r}; use system, user, assistant or tool")
            self.text(f"chat.messages[{i}].content", content)
            out.append({"role": role, "content": content})
        return self.chat_template.render(out, add_generation_prompt=True)

    def sampling(self, s: SamplingArgs, prompt_tokens: int) -> SamplingParams:
        room = self.max_context - prompt_tokens
        if room <= 0:
            raise InvalidArgument(
                f"the prompt has {prompt_tokens} tokens; the context holds {self.max_context}, "
                "so no room is left to generate")
        max_tokens = (s.max_tokens if s.max_tokens is not None
                      else min(self.config.default_max_tokens, room))
        if max_tokens <= 0:
            raise InvalidArgument(f"max_tokens must be > 0 (got {max_tokens})")
        if max_tokens > room:
            raise InvalidArgument(
                f"max_tokens={max_tokens} does not fit: the prompt has {prompt_tokens} tokens "
                f"and the context holds {self.max_context}; at most {room} can be generated")
        temperature = s.temperature if s.temperature is not None else DEFAULT_TEMPERATURE
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0 (got {temperature})")
        top_p = s.top_p if s.top_p is not None else 1.0
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1] (got {top_p})")
        if s.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (got {s.top_k}); 0 means no limit")
        if len(s.stop) > MAX_STOP_STRINGS or any(not x for x in s.stop):
            raise InvalidArgument(
                f"stop takes at most {MAX_STOP_STRINGS} non-empty strings (got {list(s.stop)!r})")
        return SamplingParams(
            max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
            top_k=s.top_k, seed=s.seed, stop=s.stop, ignore_eos=s.ignore_eos)

    # ---- Embed, Classify, PredictNext ----------------------------------------------

    def embed(self, task_id: str, origin: Origin, texts: Sequence[str]) -> EmbedRequest:
        task = self.task(task_id, "Embed")
        return EmbedRequest(task=task_id, priority=origin.priority, caller=origin.caller,
                            deadline=origin.deadline,
                            texts=self.texts("texts", texts, self.config.max_batch_texts),
                            encoder_lora=self.encoder_lora(task))

    def encoder_lora(self, task: dict[str, Any]) -> str:
        """The LoRA a text-encoder task runs the encoder with ("" for none): its adapter when
        that is a LoRA on the encoder, or the one its trained head was trained with; refused
        when this image (with its add-ons) does not hold it."""
        name = str(task.get("adapter") or "")
        if not name:
            return ""
        lora = self.encoder_adapters.get(name)
        if lora is None:
            if task.get("head") == "linear_head":
                return ""  # a head the image lacks is refused when the request holds it
            raise FailedPrecondition(f"task {task['id']!r} runs the text encoder with adapter "
                                     f"{name!r}, which is not a LoRA on the text encoder that "
                                     "this image holds")
        if lora and self.encoder_adapters.get(lora) != lora:
            raise FailedPrecondition(f"task {task['id']!r}: its head {name!r} was trained with "
                                     f"the text encoder's LoRA {lora!r}, which this image does "
                                     "not hold")
        return lora

    def classify(self, task_id: str, origin: Origin, text: str,
                 labels: Sequence[str]) -> ClassifyRequest:
        task = self.task(task_id, "Classify")
        own = list(task.get("labels") or [])
        labels = list(labels) or own
        if not labels:
            raise InvalidArgument(f"labels is empty; task {task_id!r} needs candidate labels")
        labels = self.texts("labels", labels, MAX_LABELS)
        if len(set(labels)) != len(labels):
            raise InvalidArgument("labels has duplicates")
        head = str(task.get("adapter") or "") if task.get("head") == "linear_head" else ""
        if head and not set(labels) <= set(own):
            raise InvalidArgument(f"task {task_id!r} is a trained head over its own labels; "
                                  f"these are not among them: "
                                  f"{', '.join(sorted(set(labels) - set(own)))}")
        return ClassifyRequest(task=task_id, priority=origin.priority, caller=origin.caller,
                               deadline=origin.deadline, text=self.text("text", text),
                               labels=labels, head=head, encoder_lora=self.encoder_lora(task))

    def predict_next(self, task_id: str, origin: Origin, text: str,
                     num_predictions: int) -> PredictNextRequest:
        self.task(task_id, "PredictNext")
        n = num_predictions or 5
        if not 0 < n <= MAX_PREDICTIONS:
            raise InvalidArgument(f"num_predictions must be in 1..{MAX_PREDICTIONS} (got {n})")
        ids = self.tokens("text", self.text("text", text).rstrip())
        if len(ids) >= self.max_context:
            raise InvalidArgument(
                f"text has {len(ids)} tokens; the context holds {self.max_context}")
        return PredictNextRequest(task=task_id, priority=origin.priority, caller=origin.caller,
                                  deadline=origin.deadline, prompt_ids=ids, num_predictions=n)

    # ---- Run: any task by id, its inputs by name -----------------------------------

    def check_inputs(self, task: dict[str, Any], kinds: Mapping[str, str | None]) -> bool:
        """Checks the inputs given (name → kind) against the task's; True for a media task."""
        specs = {s["name"]: s for s in task.get("inputs", [])}
        for name in kinds:
            if name not in specs:
                raise InvalidArgument(
                    f"task {task['id']!r} has no input {name!r}; it takes: {', '.join(specs)}")
        for name, spec in specs.items():
            if spec.get("required") and name not in kinds:
                raise InvalidArgument(f"task {task['id']!r} needs input {name!r} ({spec['kind']})")
            if name in kinds:
                got = kinds[name]
                if got != spec["kind"] and not (spec["kind"] == "audio" and got == "pcm"):
                    raise InvalidArgument(
                        f"input {name!r} of task {task['id']!r} must be {spec['kind']}, not {got}")
        return any(s["kind"] in MEDIA_KINDS for s in specs.values())

    def media_op(self, task: dict[str, Any]) -> MediaOp:
        """What a media task does, from its head; refused when this daemon cannot run it."""
        op = _MEDIA_HEADS.get(task.get("head", ""))
        if op is None or not task.get("modules"):
            raise InvalidArgument(f"task {task['id']!r} cannot run on this daemon "
                                  f"(head {task.get('head')!r})")
        return op

    def media(self, task: dict[str, Any], op: MediaOp, media: MediaInput | None,
              origin: Origin, *, lists: Mapping[str, Sequence[str]] | None = None,
              question: str | None = None,
              sampling: SamplingArgs = SamplingArgs()) -> MediaRequest:
        """A task on an image, audio clip or tensor (decoded by `image_input`, `wav_input`,
        `pcm_input` or `tensor_input`), recognised by the task's first module. `lists`: the
        text-list inputs given (keywords, labels, texts); `question`: None when not given."""
        if media is None:
            raise InvalidArgument(f"task {task['id']!r} needs an image, audio or tensor input")
        lists = lists or {}
        request = MediaRequest(task=task["id"], priority=origin.priority, caller=origin.caller,
                               deadline=origin.deadline, op=op, module=task["modules"][0],
                               media=media, adapter=self.adapter(task))
        if op is MediaOp.KEYWORDS:
            words = list(lists.get("keywords", []))
            if not words:
                raise InvalidArgument("keywords is empty; give the words to listen for")
            request.keywords = self.texts("keywords", words, MAX_KEYWORDS)
        if op is MediaOp.SENSOR_LABELS:
            request.texts = list(task.get("labels") or [])
        if op in (MediaOp.IMAGE_LABELS, MediaOp.IMAGE_RANK):
            name = "labels" if op is MediaOp.IMAGE_LABELS else "texts"
            values = list(lists.get(name, [])) or list(task.get("labels") or [])
            if not values:
                raise InvalidArgument(f"{name} is empty; give the candidate {name}")
            request.texts = self.texts(name, values, MAX_LABELS)
            if len(set(request.texts)) != len(request.texts):
                raise InvalidArgument(f"{name} has duplicates")
            if op is MediaOp.IMAGE_LABELS and "{}" in (task.get("prompt_template") or ""):
                request.label_prompt = task["prompt_template"]
        if op is MediaOp.ANSWER:
            request.question = self.text("question", question) if question is not None else ""
            request.prompt_template = task.get("prompt_template") or ""
            request.response_schema = task.get("response_schema") or ""
            if self.tokenizer is None:
                raise InvalidArgument("this image has no language backbone")
            # The prompt is built after recognition; reserve room for it in the context.
            request.sampling = self.sampling(sampling, self.max_context // 2)
        return request

    # ---- media inputs: decoded and checked (call these off the event loop) ---------

    def image_input(self, name: str, data: bytes) -> MediaInput:
        from m4d.prepare.images import decode_image

        if not data:
            raise InvalidArgument(f"input {name!r} is empty; send PNG, JPEG or WebP bytes")
        image = decode_image(data, max_bytes=self.config.max_image_bytes,
                             max_pixels=self.config.max_image_pixels)
        return MediaInput("image", image, hashlib.sha256(data).hexdigest())

    def tensor_input(self, name: str, dtype: str, shape: Sequence[int], data: bytes,
                     spec: dict[str, Any]) -> MediaInput:
        from m4d.model.sensor import tensor_from_bytes

        value = tensor_from_bytes(name, dtype, list(shape), data,
                                  spec.get("dtype") or "", list(spec.get("shape") or []))
        digest = hashlib.sha256(f"{dtype}:{list(shape)}:".encode() + data).hexdigest()
        return MediaInput("tensor", value, digest)

    def wav_input(self, name: str, data: bytes) -> MediaInput:
        from m4d.prepare.audio import decode_wav

        if not data:
            raise InvalidArgument(f"input {name!r} is empty; send WAV bytes")
        audio, rate = decode_wav(data, max_seconds=self.config.max_audio_seconds)
        return _speech(audio, rate, hashlib.sha256(data).hexdigest())

    def pcm_input(self, name: str, data: bytes, sample_rate: int, encoding: str,
                  channels: int) -> MediaInput:
        """Raw samples; an empty encoding means s16le, 0 channels one."""
        from m4d.prepare.audio import pcm_to_tensor

        if not data:
            raise InvalidArgument(f"input {name!r} has no PCM samples")
        encoding, channels = encoding or "s16le", channels or 1
        audio = pcm_to_tensor(data, sample_rate=sample_rate, encoding=encoding,
                              channels=channels, max_seconds=self.config.max_audio_seconds)
        digest = hashlib.sha256(b"%d:%s:%d:" % (sample_rate, encoding.encode(), channels)
                                + data).hexdigest()
        return _speech(audio, sample_rate, digest)


def _speech(audio: Any, rate: int, digest: str) -> MediaInput:
    """Audio at the speech encoder's sample rate; its length in seconds as sent."""
    from m4d.prepare.audio import resample

    seconds = audio.numel() / rate
    if rate != SPEECH_SAMPLE_RATE:
        audio = resample(audio, rate, SPEECH_SAMPLE_RATE)
    return MediaInput("audio", audio, digest, seconds)


def _input_kind(task: dict[str, Any]) -> str | None:
    kinds = {s["kind"] for s in task.get("inputs", []) if s.get("kind") in ("text", "chat")}
    if kinds == {"chat"}:
        return "chat"
    if kinds == {"text"}:
        return "prompt"
    return None

"""Domain requests and the events that stream back from the engine.

The server converts protobuf messages into these types (and back); the engine, the
scheduler and the executor see only these.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from m4d.errors import M4Error

if TYPE_CHECKING:
    import torch


class Priority(enum.IntEnum):
    """Scheduling class; a lower value is served first."""

    SYSTEM = 0
    FOREGROUND = 1
    BACKGROUND = 2


class FinishReason(enum.Enum):
    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"
    CONTEXT = "context"


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings (the server fills the daemon's defaults)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


_ids = itertools.count(1)


def next_request_id() -> int:
    return next(_ids)


@dataclass
class Caller:
    """Who sent a request: the uid comes from the kernel, the app name is only a label."""

    uid: int = -1
    pid: int = 0
    app: str = ""


@dataclass
class RequestBase:
    task: str
    priority: Priority
    caller: Caller
    id: int = field(default_factory=next_request_id)
    arrival: float = field(default_factory=time.monotonic)
    # Absolute time.monotonic() after which the request fails; None for no deadline.
    deadline: float | None = None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass
class GenerateRequest(RequestBase):
    prompt_ids: list[int] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=16))
    constraint: TokenConstraint | None = None  # structured output: which tokens may come next
    keep_reply: bool = False  # a session's turn: its reply's KV goes to the prefix cache too
    adapter: str = ""  # the task's LoRA on the backbone (an image component), "" for none


class TokenConstraint(Protocol):
    """Structured output (a JSON schema, a regex, a list of choices): which tokens may come
    next, told every token that was sampled. One per sequence; the engine calls it on its
    worker thread."""

    def restrict(self, logits: torch.Tensor) -> None:
        """Sets the logits [V] of every token that may not come next to -inf."""

    def consume(self, token: int) -> None:
        """Records a sampled token (one `restrict` allowed)."""

    @property
    def done(self) -> bool:
        """The output is complete: nothing more may follow."""


@dataclass
class EmbedRequest(RequestBase):
    texts: list[str] = field(default_factory=list)
    encoder_lora: str = ""  # the task's LoRA on the text encoder (a component), "" for none


@dataclass
class ClassifyRequest(RequestBase):
    text: str = ""
    labels: list[str] = field(default_factory=list)
    head: str = ""  # a trained task head (an image component) instead of label similarity
    encoder_lora: str = ""  # the text encoder's LoRA (the head's, or the task's), "" for none


@dataclass
class PredictNextRequest(RequestBase):
    prompt_ids: list[int] = field(default_factory=list)
    num_predictions: int = 5


@dataclass
class ScoreRequest(RequestBase):
    """Teacher-forced scoring of `reference` after `prompt_ids` on the served path (chunked
    prefill, then one decode step per token), run when no sequence holds a KV row; the
    self-test's tie check. Not reachable from the gRPC API."""

    prompt_ids: list[int] = field(default_factory=list)
    reference: list[int] = field(default_factory=list)


class MediaOp(enum.Enum):
    """What a media request does once its image or audio is recognised."""

    TRANSCRIBE = "transcribe"  # audio -> transcript
    KEYWORDS = "keywords"      # audio -> transcript -> which caller-given keywords were heard
    OCR = "ocr"                # image -> text boxes in reading order
    ANSWER = "answer"          # audio or image -> recognised text -> the backbone answers (streamed)
    IMAGE_LABELS = "image_labels"  # image -> zero-shot label probabilities (CLIP)
    IMAGE_RANK = "image_rank"      # image -> candidate texts ranked by similarity (CLIP)
    IMAGE_EMBED = "image_embed"    # image -> its embedding in the image-text space (CLIP)
    SENSOR_LABELS = "sensor_labels"  # a sensor window -> the head's label probabilities


@dataclass(frozen=True)
class MediaInput:
    """A decoded, validated image or audio clip."""

    kind: str  # "audio" | "image" | "tensor"
    data: object  # audio: float32 [N] at the model's rate; image: RGB PIL image; tensor: float32
    digest: str  # sha256 of the bytes as sent: equal inputs in one batch are encoded once
    seconds: float = 0.0  # audio length


@dataclass
class MediaRequest(RequestBase):
    """A task on an image or audio clip (M4 paths 1 and 3), run by the component ``module``."""

    op: MediaOp = MediaOp.TRANSCRIBE
    module: str = ""
    media: MediaInput | None = None
    keywords: list[str] = field(default_factory=list)
    keyword_threshold: float = 0.75
    # IMAGE_LABELS / IMAGE_RANK: the labels or candidate texts; label_prompt wraps each label
    texts: list[str] = field(default_factory=list)
    label_prompt: str = "{}"
    # ANSWER: the prompt template id and the caller's question; sampling for the answer.
    prompt_template: str = ""
    response_schema: str = ""  # the task's JSON schema for the answer, "" for the template's
    question: str = ""
    adapter: str = ""  # the answer's LoRA on the backbone, "" for none
    sampling: SamplingParams | None = None


@dataclass(frozen=True)
class Recognised:
    """What a media module made of one input: text, plus boxes for images, tokens for audio.
    The executor's media runtime returns it; the engine turns it into an answer."""

    text: str
    tokens: int = 0
    boxes: tuple[TextBox, ...] = ()
    features: Any = None  # image embedding [E] (CLIP) or projected image tokens [N, D] (path 1)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    """Milliseconds, measured by the engine from the request's arrival."""

    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    first_token_ms: float = 0.0
    total_ms: float = 0.0


# ---- events the engine streams back to a request's queue ----------------------------


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class Failed:
    error: M4Error


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    dimensions: int
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float
    raw_score: float


@dataclass(frozen=True)
class Ranked:
    labels: list[LabelScore]
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class WordPrediction:
    word: str
    probability: float


@dataclass(frozen=True)
class Predictions:
    predictions: list[WordPrediction]
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class Scored:
    """Per reference token: nats below the most likely token (0 = ranked first)."""

    gaps: list[float]


@dataclass(frozen=True)
class TextBox:
    text: str
    confidence: float
    corners: tuple[tuple[int, int], ...]  # 4 corners, clockwise from the top-left


@dataclass(frozen=True)
class TextRead:
    """OCR: the boxes in reading order and their text joined (lines by newlines)."""

    boxes: list[TextBox]
    text: str
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class Transcribed:
    text: str
    audio_seconds: float
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class KeywordHit:
    keyword: str
    detected: bool
    score: float
    heard: str


@dataclass(frozen=True)
class KeywordsHeard:
    hits: list[KeywordHit]
    transcript: str
    audio_seconds: float
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class SourceText:
    """Posted before a cascaded answer streams: what the answer is built on."""

    text: str
    audio_seconds: float = 0.0


Event = (TextDelta | Finished | Failed | Embeddings | Ranked | Predictions | Scored
         | TextRead | Transcribed | KeywordsHeard | SourceText)


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    """A plain softmax over a short list (label scores), stable for large inputs."""
    scaled = [v / temperature for v in values]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]

"""Result and input types of the M4 client: small dataclasses, no protobuf.

This is the public vocabulary of `m4client`. Every result keeps the protobuf message it was
built from in `.raw` (excluded from repr and equality) for callers that need a field this
module does not surface; nothing else here exposes generated code.
"""

from __future__ import annotations

import enum
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar

from .status import (  # noqa: F401 - the Admin service's types, also reached as types.X
    ComponentStatus,
    DaemonStatus,
    DeviceStatus,
    EngineLoad,
    UidLimits,
    UidUsage,
)

if TYPE_CHECKING:
    import numpy as np

T = TypeVar("T")


class Priority(enum.StrEnum):
    """How urgent a call is; the daemon may cap a caller's class."""

    SYSTEM = "system"
    FOREGROUND = "foreground"
    BACKGROUND = "background"


class FinishReason(enum.StrEnum):
    """Why a generation ended."""

    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"
    CONTEXT = "context"
    TOOL_CALL = "tool_call"  # a session's reply that calls a tool (see `ToolCall`)


@dataclass(frozen=True)
class Usage:
    """Tokens consumed and produced by one call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    """Where the time of one call went, in milliseconds, measured by the daemon."""

    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    first_token_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class ModelInfo:
    """The firmware image that produced a response."""

    image_name: str = ""
    image_version: str = ""
    image_digest: str = ""


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat conversation: role is "system", "user", "assistant" or "tool"
    (a tool's result, in a session)."""

    role: str
    content: str


@dataclass(frozen=True, kw_only=True)
class _Answer(ABC, Generic[T]):
    """What a unary inference answer carries besides its items (usage, timings, the image
    that answered); `len()` and iteration go over the items."""

    usage: Usage
    timings: Timings
    model: ModelInfo | None
    raw: Any = field(default=None, repr=False, compare=False)

    @abstractmethod
    def _items(self) -> list[T]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._items())

    def __iter__(self) -> Iterator[T]:
        return iter(self._items())


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed piece of a generation; the last one carries finish_reason and usage."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    model: ModelInfo | None = None
    tool_call: ToolCall | None = None  # sessions, last chunk: the tool the model calls
    session: SessionContext | None = None  # sessions, last chunk: the context after the turn
    raw: Any = field(default=None, repr=False, compare=False)

    @property
    def is_last(self) -> bool:
        """Whether this chunk ends the generation."""
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerationResult:
    """A whole generation: the joined text and what the last chunk reported."""

    text: str
    finish_reason: FinishReason | None
    usage: Usage
    timings: Timings
    model: ModelInfo | None
    token_ids: tuple[int, ...] = ()
    tool_call: ToolCall | None = None  # a session's reply that calls a tool
    session: SessionContext | None = None  # a session's context after the turn


@dataclass(frozen=True)
class EmbedResult(_Answer[list[float]]):
    """One vector per input text, in input order."""

    vectors: list[list[float]]
    dimensions: int

    def _items(self) -> list[list[float]]:
        return self.vectors

    def numpy(self) -> np.ndarray[Any, np.dtype[np.float32]]:
        """The vectors as a float32 array of shape [N, dimensions] (imports numpy lazily)."""
        import numpy as np

        return np.asarray(self.vectors, dtype=np.float32).reshape(len(self.vectors), -1)


@dataclass(frozen=True)
class LabelScore:
    """A label and how well it fits: score is a probability, raw_score what it came from."""

    label: str
    score: float
    raw_score: float = 0.0


@dataclass(frozen=True)
class ClassifyResult(_Answer[LabelScore]):
    """All labels, best first; iterating yields LabelScore, `pairs()` yields (label, score)."""

    labels: list[LabelScore]

    def _items(self) -> list[LabelScore]:
        return self.labels

    def __getitem__(self, index: int) -> LabelScore:
        return self.labels[index]

    @property
    def best(self) -> LabelScore | None:
        """The best label, or None when the daemon returned none."""
        return self.labels[0] if self.labels else None

    def pairs(self) -> list[tuple[str, float]]:
        """The ranking as (label, score) tuples."""
        return [(ls.label, ls.score) for ls in self.labels]

    @property
    def scores(self) -> dict[str, float]:
        """label → score."""
        return {ls.label: ls.score for ls in self.labels}


@dataclass(frozen=True)
class WordPrediction:
    """One predicted next word and its probability."""

    word: str
    probability: float


@dataclass(frozen=True)
class PredictNextResult(_Answer[WordPrediction]):
    """The predicted next words, most likely first."""

    predictions: list[WordPrediction]

    def _items(self) -> list[WordPrediction]:
        return self.predictions

    @property
    def words(self) -> list[str]:
        """Just the words, most likely first."""
        return [p.word for p in self.predictions]


@dataclass(frozen=True)
class IOSpec:
    """One input or output of a task."""

    name: str
    kind: str
    dtype: str = ""
    shape: tuple[int, ...] = ()
    required: bool = False
    description: str = ""


@dataclass(frozen=True)
class Task:
    """One entry of the active image's task table."""

    id: str
    m4_id: str
    path: int
    description: str
    modules: tuple[str, ...]
    adapter: str
    head: str
    labels: tuple[str, ...]
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    rpc: str
    streaming: bool
    context_window: int = 0  # tokens its model holds at once (prompt + output); 0: none
    # the JSON schema its output keeps to (JSON text; enforced by the daemon), "" for free text
    response_schema: str = ""


@dataclass(frozen=True)
class ToolCall:
    """A call the model makes to one of a session's tools; answer it with
    `Session.tool_result(call, ...)`."""

    call_id: str
    name: str
    arguments_json: str  # validates against the tool's parameters schema

    @property
    def arguments(self) -> Any:
        """The arguments, parsed."""
        return json.loads(self.arguments_json)


@dataclass(frozen=True)
class SessionContext:
    """A session's context after a turn."""

    session_id: str
    context_tokens: int  # the conversation's tokens now, the reply included
    context_window: int
    dropped_messages: int = 0  # dropped from the start to fit the turn (overflow drop_oldest)


@dataclass(frozen=True)
class Tool:
    """A function a session offers the model: its name, what it does, and a JSON Schema
    (a dict, or its JSON text) of its arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | str = field(default_factory=lambda: {"type": "object"})


class Overflow(enum.StrEnum):
    """What a session does when a turn does not fit its context window."""

    FAIL = "fail"  # the turn fails (OutOfRangeError)
    DROP_OLDEST = "drop_oldest"  # the oldest turns go; the instructions stay


@dataclass(frozen=True)
class SessionInfo:
    """A session as the daemon holds it (`Session.info()`)."""

    session_id: str
    task: str
    transcript: list[ChatMessage]  # the instructions (system) first
    context_tokens: int
    context_window: int
    tools: list[Tool]
    overflow: Overflow
    model: ModelInfo | None = None


@dataclass(frozen=True)
class TokenCount:
    """A prompt's tokens as the model sees it, and the task's context window."""

    tokens: int
    context_window: int

    @property
    def room(self) -> int:
        """Tokens left to generate after this prompt."""
        return max(0, self.context_window - self.tokens)


@dataclass(frozen=True)
class TaskTable:
    """Every task of the active image and the image it belongs to."""

    tasks: list[Task]
    model: ModelInfo | None
    raw: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def get(self, task_id: str) -> Task | None:
        """The task with this id, or None."""
        return next((t for t in self.tasks if t.id == task_id), None)


@dataclass(frozen=True)
class Image:
    """An encoded image (PNG, JPEG, WebP) as a task input."""

    data: bytes


@dataclass(frozen=True)
class Audio:
    """Encoded audio (WAV) as a task input."""

    data: bytes


@dataclass(frozen=True)
class PcmAudio:
    """Raw PCM samples as a task's audio input: interleaved little-endian `encoding`
    ("s16le" or "f32le") at `sample_rate` Hz (8000 to 48000), `channels` mixed to mono."""

    data: bytes
    sample_rate: int
    encoding: str = "s16le"
    channels: int = 1


@dataclass(frozen=True)
class TextBox:
    """Text found in an image: what it says, how sure the reader is, and where (4 corners,
    clockwise from the top-left, in pixels)."""

    text: str
    confidence: float
    corners: list[tuple[int, int]]


@dataclass(frozen=True)
class KeywordHit:
    """Keyword spotting: whether `keyword` was heard, how well the best-matching stretch of
    the transcript (`heard`) matches it, in [0, 1]."""

    keyword: str
    detected: bool
    score: float
    heard: str


@dataclass(frozen=True)
class Tensor:
    """A dense tensor input: little-endian row-major bytes of `dtype` with `shape`."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


#: Audio as the media methods take it: WAV bytes, `Audio` or `PcmAudio`.
AudioInput: TypeAlias = "bytes | Audio | PcmAudio"
#: An image as the media methods take it: encoded bytes or `Image`.
ImageInput: TypeAlias = "bytes | Image"
#: A conversation: `ChatMessage`s or {"role": ..., "content": ...} dicts.
ChatInput: TypeAlias = "Iterable[ChatMessage | Mapping[str, str]]"
#: What `run()` accepts as one input value: a text, a list of texts, a chat, an image, audio,
#: a Tensor or a numpy array (sent as a tensor).
InputValue: TypeAlias = (
    "str | Sequence[str] | Sequence[ChatMessage | Mapping[str, str]] | Image | Audio | PcmAudio"
    " | Tensor"
    " | np.ndarray[Any, Any]"
)


@dataclass(frozen=True)
class RunChunk:
    """One streamed message of `run()`; which fields are set depends on the task's outputs."""

    text: str = ""
    embeddings: list[list[float]] = field(default_factory=list)
    labels: list[LabelScore] = field(default_factory=list)
    predictions: list[WordPrediction] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    model: ModelInfo | None = None
    boxes: list[TextBox] = field(default_factory=list)
    keywords: list[KeywordHit] = field(default_factory=list)
    source_text: str = ""
    audio_seconds: float = 0.0
    raw: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class RunResult:
    """A whole `run()`: joined text and every other output, with the last usage seen."""

    text: str
    embeddings: list[list[float]]
    labels: list[LabelScore]
    predictions: list[WordPrediction]
    finish_reason: FinishReason | None
    usage: Usage
    timings: Timings
    model: ModelInfo | None
    boxes: list[TextBox] = field(default_factory=list)
    keywords: list[KeywordHit] = field(default_factory=list)
    # What a cascaded task answered from (a transcript, the text of an image).
    source_text: str = ""
    audio_seconds: float = 0.0

"""Result and input types of the M4 client: small dataclasses, no protobuf.

This is the public vocabulary of `m4client`. Every result keeps the protobuf message it was
built from in `.raw` (excluded from repr and equality) for callers that need a field this
module does not surface; nothing else here exposes generated code.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar

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
    """One message of a chat conversation: role is "system", "user" or "assistant"."""

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


@dataclass(frozen=True)
class ComponentStatus:
    """One module of the loaded image."""

    name: str
    kind: str
    parameters: int
    weight_format: str
    compute_dtype: str
    device: str
    kernels: str = ""  # the m4 CPU kernel variant, e.g. "avx2" ("" = torch's kernels)


@dataclass(frozen=True)
class UidUsage:
    """What one caller uid has asked of the daemon (the uid is the kernel's; apps are labels)."""

    uid: int
    user: str  # "" when the uid has no user name
    apps: list[str]
    requests_ok: int
    requests_failed: int
    requests_rejected: int
    tokens_in: int
    tokens_out: int
    tokens_per_second: float  # generated, over the recent window
    in_flight: int
    queued: int
    priority_class: str  # class of its latest request after caps; "" before any
    running: int = 0  # KV slots it holds now
    tokens_in_flight: int = 0  # prompt + max_tokens of its requests in flight
    preempted: int = 0  # times its sequences lost a KV slot and resumed later
    stalled: int = 0  # its streams cancelled because it read nothing for too long


@dataclass(frozen=True)
class UidLimits:
    """The caps every caller uid runs under; 0 means no limit."""

    max_in_flight: int = 0
    max_queued: int = 0
    max_running: int = 0  # KV slots
    max_tokens_in_flight: int = 0


@dataclass(frozen=True)
class EngineLoad:
    """The engine's load right now, and rates over a recent window."""

    queues: dict[str, int]  # priority class -> requests waiting to start
    running_sequences: int
    decode_batch_size: int
    kv_blocks_used: int
    kv_blocks_total: int
    decode_tokens_per_second: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    ttft_samples: int
    window_seconds: float
    uid_limits: UidLimits = UidLimits()
    paused_sequences: int = 0  # waiting for their clients to read (backpressure)


@dataclass(frozen=True)
class DeviceStatus:
    """A device the daemon's machine has, and the components placed on it."""

    name: str
    kind: str
    description: str
    memory_bytes: int
    cores: int
    flags: list[str]
    components: list[str]
    executor: str  # the executor thread running its work, "" when unused


@dataclass(frozen=True)
class DaemonStatus:
    """What the daemon is running and how busy it is (AdminClient.status)."""

    image_name: str
    image_version: str
    image_digest: str
    daemon_version: str
    state: str
    uptime_seconds: float
    memory_rss_bytes: int
    requests_in_flight: int
    requests_total: int
    requests_cancelled: int
    requests_rejected: int
    tokens_generated: int
    tokens_prompted: int
    active_sequences: int
    kv_slots: int
    components: list[ComponentStatus]
    threads: int
    image_operation: str = ""  # the image operation in progress ("" when none)
    load: EngineLoad | None = None  # None while the model loads
    uids: list[UidUsage] = field(default_factory=list)  # lowest uid first
    devices: list[DeviceStatus] = field(default_factory=list)  # cpu first
    requests_stalled: int = 0  # of requests_cancelled: their clients stopped reading
    prefix_cache_tokens: int = 0  # prompt tokens whose KV the prefix cache holds now
    prefix_tokens_reused: int = 0  # prompt tokens taken from it since start
    raw: Any = field(default=None, repr=False, compare=False)

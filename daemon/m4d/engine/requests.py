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

from m4d.errors import M4Error


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


@dataclass
class EmbedRequest(RequestBase):
    texts: list[str] = field(default_factory=list)


@dataclass
class ClassifyRequest(RequestBase):
    text: str = ""
    labels: list[str] = field(default_factory=list)


@dataclass
class PredictNextRequest(RequestBase):
    prompt_ids: list[int] = field(default_factory=list)
    num_predictions: int = 5


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


Event = TextDelta | Finished | Failed | Embeddings | Ranked | Predictions


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    """A plain softmax over a short list (label scores), stable for large inputs."""
    scaled = [v / temperature for v in values]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]

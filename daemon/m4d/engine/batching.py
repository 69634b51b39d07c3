"""The queues of the work beside generation, and which batch of it runs next.

A pure policy like the scheduler: plain data in, a plan out (no torch, no asyncio, no
threads, no clock: the engine passes `now`). Three kinds of work wait here:

- encoder work (Embed, Classify): every queued request that fits in `max_batch_texts` runs
  in one forward pass, oldest first. A partial batch is held up to `encoder_max_wait` for
  more texts, but only while nothing else needs the executor. A batch of background work
  only waits for urgent generation to start and is cut to a slice (`LatencyPolicy`);
- media work (images, audio): the most urgent waiting request's module, with every queued
  request for that module, up to `max_batch_media`, most urgent first;
- one-call work on the backbone (PredictNext, Score): one at a time, in arrival order; a
  Score borrows KV row 0, so it waits until no sequence holds a row.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from m4d.engine.latency import LatencyPolicy, is_urgent
from m4d.requests import (
    ClassifyRequest,
    EmbedRequest,
    MediaRequest,
    PredictNextRequest,
    RequestBase,
    ScoreRequest,
)

EncoderRequest = EmbedRequest | ClassifyRequest
BackboneRequest = PredictNextRequest | ScoreRequest


def encoder_texts(request: EncoderRequest) -> list[str]:
    """The texts an encoder request puts through the encoder."""
    if isinstance(request, EmbedRequest):
        return request.texts
    return [request.text] if request.head else [request.text, *request.labels]


def _num_texts(requests: Iterable[EncoderRequest]) -> int:
    return sum(len(encoder_texts(r)) for r in requests)


@dataclass(frozen=True)
class EncoderPlan:
    batch: list[EncoderRequest] = field(default_factory=list)  # runs now; off the queue
    hold: float = 0.0  # seconds to wait for more texts before planning again

    @property
    def num_texts(self) -> int:
        return _num_texts(self.batch)


class Batcher:
    def __init__(self, latency: LatencyPolicy, *, max_batch_texts: int, max_batch_media: int,
                 encoder_max_wait: float) -> None:
        self.latency = latency
        self.max_batch_texts = max_batch_texts
        self.max_batch_media = max_batch_media
        self.encoder_max_wait = encoder_max_wait  # seconds a partial encoder batch may wait
        self.encoder: collections.deque[EncoderRequest] = collections.deque()
        self.media: collections.deque[MediaRequest] = collections.deque()
        self.backbone: collections.deque[BackboneRequest] = collections.deque()

    # ---- work in and out -----------------------------------------------------------

    def add(self, request: RequestBase) -> bool:
        """Queues a request; False when it is not work of this kind (generation)."""
        if isinstance(request, (EmbedRequest, ClassifyRequest)):
            self.encoder.append(request)
        elif isinstance(request, MediaRequest):
            self.media.append(request)
        elif isinstance(request, (PredictNextRequest, ScoreRequest)):
            self.backbone.append(request)
        else:
            return False
        return True

    def remove(self, request_id: int) -> None:
        """Forgets a request (cancelled, expired or failed) wherever it waits."""
        self.encoder = collections.deque(r for r in self.encoder if r.id != request_id)
        self.media = collections.deque(r for r in self.media if r.id != request_id)
        self.backbone = collections.deque(r for r in self.backbone if r.id != request_id)

    def __bool__(self) -> bool:
        return bool(self.encoder or self.media or self.backbone)

    @property
    def num_waiting(self) -> int:
        """Encoder and media requests waiting: what counts against the engine's queue bound."""
        return len(self.encoder) + len(self.media)

    def requests(self) -> Iterator[RequestBase]:
        """Every waiting request (copies of the queues: safe beside the worker)."""
        yield from list(self.encoder)
        yield from list(self.media)
        yield from list(self.backbone)

    # ---- planning ------------------------------------------------------------------

    def next_encoder(self, now: float, *, busy: bool, urgent_waiting: bool) -> EncoderPlan:
        """The encoder batch to run now, a time to hold the queue for more texts, or
        nothing. `busy`: generation needs the executor; `urgent_waiting`: an urgent
        generation request has not started yet."""
        if not self.encoder:
            return EncoderPlan()
        oldest = self.encoder[0].arrival
        background_only = not any(is_urgent(r.priority) for r in self.encoder)
        if self.latency.defer_encoder(oldest, background_only, urgent_waiting, now):
            return EncoderPlan()  # background texts wait for the urgent request's first step
        if not busy and not self.backbone and _num_texts(self.encoder) < self.max_batch_texts:
            hold = max(0.0, self.encoder_max_wait - (now - oldest))
            if hold > 0:
                return EncoderPlan(hold=hold)
        limit = self.latency.encoder_limit(self.max_batch_texts, background_only, now)
        batch: list[EncoderRequest] = []
        while self.encoder and (not batch or _num_texts([*batch, self.encoder[0]]) <= limit):
            batch.append(self.encoder.popleft())
        return EncoderPlan(batch)

    def next_media(self) -> list[MediaRequest]:
        """The next media batch, taken off the queue: the module of the most urgent (then
        oldest) request, with the other requests for it, most urgent first."""
        if not self.media:
            return []

        def key(request: MediaRequest) -> tuple[int, float]:
            return (request.priority, request.arrival)

        module = min(self.media, key=key).module
        batch = sorted((r for r in self.media if r.module == module),
                       key=key)[:self.max_batch_media]
        taken = {r.id for r in batch}
        self.media = collections.deque(r for r in self.media if r.id not in taken)
        return batch

    def next_backbone(self, rows_in_use: bool) -> BackboneRequest | None:
        """The next one-call backbone request, taken off the queue; None when there is
        none, or when it is a Score and `rows_in_use` (a sequence holds a KV row)."""
        if not self.backbone:
            return None
        if isinstance(self.backbone[0], ScoreRequest) and rows_in_use:
            return None
        return self.backbone.popleft()

"""Encoder work (M4 path 3): embedding and similarity classification, batched together.

Every queued Embed and Classify request that fits in the batch limit runs through the
text encoder in one forward pass: the tasks share the module, so they share the batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from m4d.executor.runtime import Runtime
from m4d.requests import (
    ClassifyRequest,
    Embeddings,
    EmbedRequest,
    Event,
    LabelScore,
    Ranked,
    Timings,
    Usage,
    softmax,
)

# Cosine similarities of MiniLM sit in a narrow band; a low temperature turns them into
# a usable distribution over the labels (the raw cosine is returned too).
SIMILARITY_TEMPERATURE = 0.05


@dataclass
class EncoderWork:
    request: EmbedRequest | ClassifyRequest
    stream: object

    @property
    def texts(self) -> list[str]:
        if isinstance(self.request, EmbedRequest):
            return self.request.texts
        return [self.request.text, *self.request.labels]

    @property
    def num_texts(self) -> int:
        return len(self.texts)


def run_encoder_batch(runtime: Runtime, batch: list[EncoderWork]) -> Iterator[tuple[EncoderWork, Event]]:
    started = time.monotonic()
    texts = [t for work in batch for t in work.texts]
    vectors, counts = runtime.embed(texts)  # [N, D], tokens per text
    end = time.monotonic()
    offset = 0
    for work in batch:
        n = work.num_texts
        vecs, tokens = vectors[offset:offset + n], sum(counts[offset:offset + n])
        offset += n
        arrival = work.request.arrival
        timings = Timings(queue_ms=(started - arrival) * 1e3, prefill_ms=(end - started) * 1e3,
                          total_ms=(end - arrival) * 1e3)
        usage = Usage(prompt_tokens=tokens)
        if isinstance(work.request, EmbedRequest):
            yield work, Embeddings(vecs.tolist(), int(vecs.shape[1]), usage, timings)
        else:
            query, labels = vecs[0], vecs[1:]
            sims = (labels @ query).tolist()  # cosine: the vectors are normalised
            probs = softmax(sims, SIMILARITY_TEMPERATURE)
            ranked = sorted(
                (LabelScore(label, p, s)
                 for label, p, s in zip(work.request.labels, probs, sims, strict=True)),
                key=lambda ls: -ls.score)
            yield work, Ranked(ranked, usage, timings)

"""Encoder work (M4 path 3): embedding and similarity classification, batched together.

The Embed and Classify requests of a batch (`Batcher.next_encoder` picks them) run through
the text encoder in one forward pass: the tasks share the module, so they share the batch,
each text through its request's LoRA on the encoder (or none) inside that one pass. A
request whose LoRA cannot be read fails alone (FAILED_PRECONDITION, with the reason).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from m4d.adapters.lora import AdapterError
from m4d.engine.batching import EncoderRequest, encoder_texts
from m4d.errors import FailedPrecondition
from m4d.executor.runtime import Runtime
from m4d.requests import (
    Embeddings,
    EmbedRequest,
    Event,
    Failed,
    LabelScore,
    Ranked,
    Timings,
    Usage,
    softmax,
)

# Cosine similarities of MiniLM sit in a narrow band; a low temperature turns them into
# a usable distribution over the labels (the raw cosine is returned too).
SIMILARITY_TEMPERATURE = 0.05


def run_encoder_batch(runtime: Runtime, batch: list[EncoderRequest],
                      ) -> Iterator[tuple[EncoderRequest, Event]]:
    """Each request of the batch with its answer, from one forward pass over all texts."""
    started = time.monotonic()
    unreadable = _unreadable_loras(runtime, batch)
    for request in batch:
        if request.encoder_lora in unreadable:
            yield request, Failed(FailedPrecondition(
                f"task {request.task!r}: its LoRA on the text encoder "
                f"{request.encoder_lora!r} cannot be used: {unreadable[request.encoder_lora]}"))
    batch = [r for r in batch if r.encoder_lora not in unreadable]
    per_request = [encoder_texts(r) for r in batch]
    loras = [r.encoder_lora for r, texts in zip(batch, per_request, strict=True) for _ in texts]
    vectors, counts = runtime.embed([t for texts in per_request for t in texts], loras)  # [N, D]
    end = time.monotonic()
    offset = 0
    for request, texts in zip(batch, per_request, strict=True):
        n = len(texts)
        vecs, tokens = vectors[offset:offset + n], sum(counts[offset:offset + n])
        offset += n
        timings = Timings(queue_ms=(started - request.arrival) * 1e3,
                          prefill_ms=(end - started) * 1e3, total_ms=(end - request.arrival) * 1e3)
        usage = Usage(prompt_tokens=tokens)
        if isinstance(request, EmbedRequest):
            yield request, Embeddings(vecs.tolist(), int(vecs.shape[1]), usage, timings)
            continue
        if request.head:  # a trained head (path 3): its logits over the asked labels
            names, logits = runtime.heads.logits(request.head, vecs[:1])
            raw = [float(logits[0, names.index(label)]) for label in request.labels]
            probs = softmax(raw, 1.0)
        else:  # zero-shot: the text's similarity to each label's embedding
            query, labels = vecs[0], vecs[1:]
            raw = (labels @ query).tolist()  # cosine: the vectors are normalised
            probs = softmax(raw, SIMILARITY_TEMPERATURE)
        ranked = sorted((LabelScore(label, p, s)
                         for label, p, s in zip(request.labels, probs, raw, strict=True)),
                        key=lambda ls: -ls.score)
        yield request, Ranked(ranked, usage, timings)


def _unreadable_loras(runtime: Runtime, batch: list[EncoderRequest]) -> dict[str, str]:
    """The batch's encoder LoRAs that cannot be read or do not fit, each with the reason
    (the others are loaded now, for the pass)."""
    names = list(dict.fromkeys(r.encoder_lora for r in batch if r.encoder_lora))
    bad: dict[str, str] = {}
    for name in names:
        try:
            if runtime.encoder_loras is None:
                raise AdapterError("this image has no text encoder")
            runtime.encoder_loras.get(name, keep=names)
        except (AdapterError, OSError) as exc:
            bad[name] = str(exc)
    return bad

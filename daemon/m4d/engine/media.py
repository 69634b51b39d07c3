"""Media work (M4 paths 1 and 3 on images and audio): recognition batched per module, then
either a final answer (transcript, text boxes, keyword hits, CLIP rankings) or a cascade
into the backbone.

Requests that share a module run through it in one batch (`Batcher.next_media` picks
them); the same image or audio sent by several requests of a batch (equal sha256 of the
bytes) is recognised once. A cascaded task (spoken-language understanding, questions about
an image or its text) continues as ordinary generation: `cascade.plan_answer` decides its
prompt, `outcome` builds it on the runtime.
"""

from __future__ import annotations

import functools
import re
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from m4d.engine.cascade import plan_answer
from m4d.errors import InvalidArgument, M4Error
from m4d.prepare.constraints import ResponseFormat
from m4d.requests import (
    Embeddings,
    Event,
    Failed,
    GenerateRequest,
    KeywordHit,
    KeywordsHeard,
    LabelScore,
    MediaOp,
    MediaRequest,
    Ranked,
    Recognised,
    SourceText,
    TextRead,
    Timings,
    Transcribed,
    Usage,
    softmax,
)

if TYPE_CHECKING:
    import torch

    from m4d.executor.runtime import Runtime


# ---- recognition, batched -------------------------------------------------------------


Recognise = Callable[[str, list[Any]], list[Recognised]]


@dataclass(frozen=True)
class BatchResult:
    request: MediaRequest
    recognised: Recognised
    started: float
    ended: float


def run_media_batch(recognise: Recognise, batch: list[MediaRequest]) -> Iterator[BatchResult]:
    """Runs one module over the batch's distinct inputs. All requests share ``module``."""
    module = batch[0].module
    unique: dict[str, int] = {}
    inputs: list[Any] = []
    for request in batch:
        media = request.media
        assert media is not None and request.module == module
        if media.digest not in unique:
            unique[media.digest] = len(inputs)
            inputs.append(media.data)
    started = time.monotonic()
    results = recognise(module, inputs)
    ended = time.monotonic()
    for request in batch:
        assert request.media is not None
        yield BatchResult(request, results[unique[request.media.digest]], started, ended)


def recognise_batch(recognise: Recognise, batch: list[MediaRequest],
                    ) -> tuple[list[BatchResult], list[tuple[MediaRequest, M4Error]]]:
    """Runs a batch: its results, and the requests that failed. A bad input that the model
    finds (an M4Error) fails its own request, not its batch-mates: the batch is run again
    one request at a time."""
    try:
        return list(run_media_batch(recognise, batch)), []
    except M4Error as exc:
        if len(batch) == 1:
            return [], [(batch[0], exc)]
    results: list[BatchResult] = []
    failed: list[tuple[MediaRequest, M4Error]] = []
    for request in batch:
        try:
            results += run_media_batch(recognise, [request])
        except M4Error as one:
            failed.append((request, one))
    return results, failed


class ClipModels(Protocol):
    """What the CLIP heads need of the media runtime."""

    def text_features(self, module: str, texts: list[str]) -> Any: ...

    def logit_scale(self, module: str) -> float: ...


CLIP_OPS = (MediaOp.IMAGE_LABELS, MediaOp.IMAGE_RANK, MediaOp.IMAGE_EMBED)


def recognised_event(result: BatchResult, clip: ClipModels) -> Event:
    """The answer of a task that ends with its recognition (every op but ANSWER)."""
    request = result.request
    if request.op in CLIP_OPS:
        module = request.module
        return clip_event(result, functools.partial(clip.text_features, module),
                          clip.logit_scale(module) if request.op is not MediaOp.IMAGE_EMBED
                          else 1.0)
    return final_event(result)


@dataclass(frozen=True)
class Continuation:
    """A cascade's answer, to run as ordinary generation on the same stream."""

    request: GenerateRequest  # the media request's id, caller, priority and deadline
    prompt_embeds: torch.Tensor | None  # path 1: the prompt with the image's features
    source: SourceText  # posted before the answer streams: what it is built on


def outcome(runtime: Runtime, result: BatchResult) -> Event | Continuation:
    """What a recognised request comes to: its answer (or why it failed), or, for a cascade
    (`cascade.plan_answer` decides its prompt), the generation that answers."""
    request, recognised = result.request, result.recognised
    if request.op is not MediaOp.ANSWER:
        return recognised_event(result, runtime.media)
    features, image = recognised.features, None
    try:
        if features is not None:  # path 1: the image's features are the prompt's
            _, projector = runtime.media.projector_for(request.module)
            image = (int(projector["image_token_id"]), int(features.shape[0]))
        grammars = runtime.grammars
        answer = plan_answer(
            request, recognised.text, tokenizer=runtime.tokenizer,
            template=runtime.chat_template, max_context=runtime.max_context, image=image,
            constrain=None if grammars is None else lambda schema: grammars.compile(
                ResponseFormat("json_schema", json_schema=schema)))
    except InvalidArgument as exc:
        return Failed(exc)
    embeds = None
    if answer.splice_ids is not None and image is not None:
        embeds = runtime.image_prompt(answer.splice_ids, image[0], features)
    seconds = request.media.seconds if request.media else 0.0
    return Continuation(answer.request, embeds, SourceText(recognised.text, seconds))


def final_event(result: BatchResult) -> Event:
    """The answer of a non-cascaded task."""
    request, rec = result.request, result.recognised
    media = request.media
    assert media is not None
    timings = Timings(queue_ms=(result.started - request.arrival) * 1e3,
                      prefill_ms=(result.ended - result.started) * 1e3,
                      total_ms=(time.monotonic() - request.arrival) * 1e3)
    usage = Usage(prompt_tokens=rec.tokens)
    if request.op is MediaOp.TRANSCRIBE:
        return Transcribed(rec.text, media.seconds, usage, timings)
    if request.op is MediaOp.KEYWORDS:
        hits = [spot_keyword(k, rec.text, request.keyword_threshold) for k in request.keywords]
        return KeywordsHeard(hits, rec.text, media.seconds, usage, timings)
    if request.op is MediaOp.OCR:
        return TextRead(list(rec.boxes), rec.text, usage, timings)
    if request.op is MediaOp.SENSOR_LABELS:
        probs = [float(p) for p in rec.features]
        ranked = sorted((LabelScore(label, p, p) for label, p in zip(request.texts, probs,
                                                                     strict=True)),
                        key=lambda ls: -ls.score)
        return Ranked(ranked, usage, timings)
    raise ValueError(f"{request.op} is a cascade, not a final answer")


def clip_event(result: BatchResult, text_features: Callable[[list[str]], Any],
               logit_scale: float) -> Event:
    """Path-3 image heads: the image's embedding, or labels/texts ranked against it.

    Zero-shot labels get CLIP's own probabilities (softmax of the cosine times the
    checkpoint's logit scale) with the cosine as the raw score; retrieval ranks the texts
    by cosine and reports the same probabilities over the candidates."""
    request, image = result.request, result.recognised.features
    timings = Timings(queue_ms=(result.started - request.arrival) * 1e3,
                      prefill_ms=(result.ended - result.started) * 1e3,
                      total_ms=(time.monotonic() - request.arrival) * 1e3)
    if request.op is MediaOp.IMAGE_EMBED:
        vector = image.float().tolist()
        return Embeddings([vector], len(vector), Usage(), timings)
    prompts = [request.label_prompt.format(t) for t in request.texts]
    texts = text_features(prompts)  # [N, E], normalised
    cosines = (texts.float() @ image.float()).tolist()
    probs = softmax([c * logit_scale for c in cosines])
    ranked = sorted((LabelScore(t, p, c) for t, p, c in zip(request.texts, probs, cosines, strict=True)),
                    key=lambda ls: -ls.raw_score)
    return Ranked(ranked, Usage(), timings)


# ---- keyword spotting on a transcript ----------------------------------------------------


def normalise_words(text: str) -> list[str]:
    """Lower case, accents and punctuation removed, split on whitespace."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return re.sub(r"[^\w\s']|_", " ", text).replace("'", "").split()


def similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / the longer length (1.0 for equal strings)."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def spot_keyword(keyword: str, transcript: str, threshold: float) -> KeywordHit:
    """How well the best stretch of the transcript (as many words as the keyword, +-1)
    matches the keyword, spelling-tolerant: ASR writes "e-mail" or "email" alike."""
    target = normalise_words(keyword)
    words = normalise_words(transcript)
    if not target or not words:
        return KeywordHit(keyword, False, 0.0, "")
    joined_target = " ".join(target)
    best, heard = 0.0, ""
    for n in {max(1, len(target) - 1), len(target), len(target) + 1}:
        for i in range(0, max(1, len(words) - n + 1)):
            window = " ".join(words[i:i + n])
            score = max(similarity(window, joined_target),
                        similarity(window.replace(" ", ""), joined_target.replace(" ", "")))
            if score > best:
                best, heard = score, window
    return KeywordHit(keyword, best >= threshold, round(best, 4), heard)

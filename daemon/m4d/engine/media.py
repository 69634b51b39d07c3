"""Media work (M4 paths 1 and 3 on images and audio): recognition batched per module, then
either a final answer (transcript, text boxes, keyword hits) or a cascade into the backbone.

Requests that share a module run through it in one batch; the same image or audio sent by
several requests of a batch (equal sha256 of the bytes) is recognised once. Cascaded tasks
(spoken-language understanding, questions about the text of an image) turn the recognised
text into a chat prompt here and continue as ordinary generation in the scheduler.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from m4d.requests import (
    Embeddings,
    Event,
    KeywordHit,
    KeywordsHeard,
    LabelScore,
    MediaOp,
    MediaRequest,
    Ranked,
    TextRead,
    Timings,
    Transcribed,
    Usage,
    softmax,
)


@dataclass
class MediaWork:
    request: MediaRequest
    stream: object


@dataclass(frozen=True)
class Recognised:
    """What a module made of one input: text, plus boxes for images, tokens for audio."""

    text: str
    tokens: int = 0
    boxes: tuple[Any, ...] = ()
    features: Any = None  # image embedding [E] (CLIP) or projected image tokens [N, D] (path 1)


# ---- recognition, batched -------------------------------------------------------------


Recognise = Callable[[str, list[Any]], list[Recognised]]


@dataclass(frozen=True)
class BatchResult:
    work: MediaWork
    recognised: Recognised
    started: float
    ended: float


def run_media_batch(recognise: Recognise, batch: list[MediaWork]) -> Iterator[BatchResult]:
    """Runs one module over the batch's distinct inputs. All works share ``module``."""
    module = batch[0].request.module
    unique: dict[str, int] = {}
    inputs: list[Any] = []
    for work in batch:
        media = work.request.media
        assert media is not None and work.request.module == module
        if media.digest not in unique:
            unique[media.digest] = len(inputs)
            inputs.append(media.data)
    started = time.monotonic()
    results = recognise(module, inputs)
    ended = time.monotonic()
    for work in batch:
        assert work.request.media is not None
        yield BatchResult(work, results[unique[work.request.media.digest]], started, ended)


def final_event(result: BatchResult) -> Event:
    """The answer of a non-cascaded task."""
    request, rec = result.work.request, result.recognised
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
    request, image = result.work.request, result.recognised.features
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


# ---- cascades: recognised text -> a chat prompt for the backbone -------------------------

_PROMPTS: dict[str, tuple[str, str]] = {
    # Spoken-language understanding (M4 T49 style): transcript -> intent and slots as JSON.
    "slu": (
        "You turn a spoken request into JSON with an \"intent\" (a short snake_case verb "
        "phrase) and \"slots\" (the details, as an object). Reply with the JSON only.",
        "Request: \"{source}\"",
    ),
    # Questions about the text in an image (M4 T21: OCR on rendered text).
    "ocr_qa": (
        "Answer the question using only the text found in an image. Be brief.",
        "Text in the image:\n{source}\n\nQuestion: {question}",
    ),
    # Questions about what was said.
    "speech_qa": (
        "Answer the question using only what the speaker said. Be brief.",
        "The speaker said: \"{source}\"\n\nQuestion: {question}",
    ),
    # Visual question answering (M4 T33): the image's features replace IMAGE_MARKER.
    "vqa": ("", "<image>\n{question}"),
}

# Worked examples before the real turn: a small backbone follows a format it has just seen
# (SmolLM2-135M answers free-form prose to the instruction alone, valid intent JSON after these).
_EXAMPLES: dict[str, tuple[tuple[str, str], ...]] = {
    "slu": (
        ("Set a timer for ten minutes.",
         '{"intent": "set_timer", "slots": {"duration": "ten minutes"}}'),
        ("What will the weather be like in Paris tomorrow?",
         '{"intent": "get_weather", "slots": {"city": "Paris", "date": "tomorrow"}}'),
        ("Play some jazz music in the living room.",
         '{"intent": "play_music", "slots": {"genre": "jazz", "room": "living room"}}'),
    ),
}

IMAGE_MARKER = "<image>"
PROMPT_TEMPLATES = tuple(_PROMPTS)


def answer_messages(template: str, source: str, question: str) -> list[dict[str, str]]:
    """The chat for a cascaded answer; ``template`` is a task's prompt_template."""
    system, user = _PROMPTS[template]
    turn = {"role": "user", "content": user.format(source=source.strip() or "(nothing)",
                                                   question=question.strip())}
    shots = [m for u, a in _EXAMPLES.get(template, ())
             for m in ({"role": "user", "content": user.format(source=u, question="")},
                       {"role": "assistant", "content": a})]
    return ([{"role": "system", "content": system}] if system else []) + shots + [turn]

"""Benchmark suites (outside the serving pipeline): what bench_tasks.py runs per task.

A `Suite` is one row of the table: its items (made offline from `tasks.data`, audio spoken
by espeak-ng and notices rendered in DejaVu fonts before anything is timed), the one call
that runs an item through the daemon (timed, one at a time), and how the answers are
scored. `SUITES` maps a task id to its suite; `BASES` maps a task that runs through an
adapter or head to the same items without it (the base backbone told the task in a
prompt, zero-shot labels on the encoder). A task without a suite gets `latency_only`:
the same input for every call, built from the task's input specs, and no score.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchkit.imports import tests_module

from tasks import data
from tasks.scoring import (
    char_accuracy,
    contains_answer,
    detection_accuracy,
    recall_at_1,
    share,
    top_k_hit,
    words,
)

GREEDY = {"temperature": 0.0}
ANSWER_TOKENS = 32  # generate, chat, speech-ask, ocr-ask, vqa: a short answer fits
COMPLETE_TOKENS = 8  # complete: the expected word comes within a few tokens or not at all
SLU_TOKENS = 48  # understand, speech-understand, as bench_adapters.py
SLU_SEED = 7  # the held-out commands bench_adapters.py scores


@dataclass
class Suite:
    """One row: `call(item)` runs an item through the daemon, `score(answers)` gives one
    value per metric (percent) from all the answers in item order; score None: latency only."""

    metrics: tuple[str, ...]
    items: Sequence[Any]
    call: Callable[[Any], Any]
    score: Callable[[list[Any]], tuple[float, ...]] | None
    n: int  # what the score is over (pairs for retrieval, items otherwise)
    note: str = ""


@dataclass
class Context:
    """What the suites share: the client, the task table, how many items per task, and the
    spoken clips (several speech tasks speak the same sentences)."""

    client: Any
    table: Any  # m4client.TaskTable
    items: int
    _clips: dict[str, bytes] = field(default_factory=dict)

    def take(self, dataset: Sequence[Any]) -> list[Any]:
        return list(dataset[:self.items])

    def clip(self, text: str) -> Any:
        from m4client import Audio

        if text not in self._clips:
            self._clips[text] = tests_module("speech").synthesize(text)
        return Audio(self._clips[text])

    def has(self, task_id: str) -> bool:
        return self.table.get(task_id) is not None


def _percent(*values: float) -> tuple[float, ...]:
    return tuple(100 * v for v in values)


def _text(stream: Any) -> str:
    with stream:
        return "".join(chunk.text for chunk in stream)


def _containment(items: Sequence[tuple[Any, ...]]) -> Callable[[list[str]], tuple[float, ...]]:
    """Scores replies by whether each holds its item's accepted answers (the item's last
    field)."""
    return lambda replies: _percent(share(contains_answer(r, item[-1])
                                          for r, item in zip(replies, items, strict=True)))


# ---------------------------------------------------------------- text tasks


def generate(ctx: Context, task: Any) -> Suite:
    items = ctx.take(data.QUESTIONS)
    return Suite(("answer contains %",), items, lambda item: ctx.client.complete(
        item[0], task=task.id, max_tokens=ANSWER_TOKENS, **GREEDY).text,
        _containment(items), len(items), "known short answers (capitals, sums, colours, facts)")


def chat(ctx: Context, task: Any) -> Suite:
    items = ctx.take(data.QUESTIONS)
    system = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
    return Suite(("answer contains %",), items, lambda item: ctx.client.chat_complete(
        [system, {"role": "user", "content": item[0]}], task=task.id,
        max_tokens=ANSWER_TOKENS, **GREEDY).text,
        _containment(items), len(items), "the generate questions after a system message")


def complete(ctx: Context, task: Any) -> Suite:
    items = ctx.take(data.COMPLETIONS)
    return Suite(("continuation contains %",), items, lambda item: ctx.client.complete(
        item[0], task=task.id, max_tokens=COMPLETE_TOKENS, **GREEDY).text,
        _containment(items), len(items), f"the expected word within {COMPLETE_TOKENS} tokens")


def predict_next(ctx: Context, task: Any) -> Suite:
    items = ctx.take(data.NEXT_WORDS)

    def score(predicted: list[list[str]]) -> tuple[float, ...]:
        pairs = list(zip(predicted, items, strict=True))
        return _percent(share(top_k_hit(p, item[1], 1) for p, item in pairs),
                        share(top_k_hit(p, item[1], 5) for p, item in pairs))

    return Suite(("top-1 %", "top-5 %"), items, lambda item: ctx.client.predict_next(
        item[0], 5, task=task.id).words, score, len(items), "common phrases, one obvious next word")


def embed(ctx: Context, task: Any) -> Suite:
    pairs = ctx.take(data.PARAPHRASES)
    items = [a for a, _ in pairs] + [b for _, b in pairs]  # one sentence per call
    n = len(pairs)
    return Suite(("recall@1 %",), items,
                 lambda text: ctx.client.embed(text, task=task.id).vectors[0],
                 lambda vectors: _percent(recall_at_1(vectors[:n], vectors[n:])), n,
                 f"each sentence's paraphrase the nearest of {n}; one sentence per call")


def classify(ctx: Context, task: Any) -> Suite:
    items = ctx.take(data.TOPIC_TEXTS)
    labels = list(data.TOPICS)
    return Suite(("accuracy %",), items, lambda item: ctx.client.classify(
        item[0], labels, task=task.id).labels[0].label,
        lambda got: _percent(share(g == item[1] for g, item in zip(got, items, strict=True))),
        len(items), f"zero-shot topic of short texts, {len(labels)} labels")


# ---------------------------------------------------------------- commands (T49, intents)


def _commands(ctx: Context) -> list[Any]:
    from m4d.adapters import slu_data

    return list(slu_data.examples("eval", ctx.items, seed=SLU_SEED))


def _slu_score(examples: Sequence[Any]) -> Callable[[list[str]], tuple[float, ...]]:
    from m4d.adapters import slu_data

    def score(outputs: list[str]) -> tuple[float, ...]:
        scored = slu_data.score(outputs, examples)
        return _percent(scored["intent_accuracy"], scored["slot_f1"])

    return score


SLU_METRICS = ("intent %", "slot F1 %")
HELD_OUT = "held-out commands (slu_data eval, phrasings and values never trained on)"


def understand(ctx: Context, task: Any) -> Suite:
    examples = _commands(ctx)
    return Suite(SLU_METRICS, examples, lambda e: ctx.client.complete(
        e.text, task=task.id, max_tokens=SLU_TOKENS, **GREEDY).text,
        _slu_score(examples), len(examples), HELD_OUT)


def _base_slu(ctx: Context, text: str, schema: str) -> str:
    """The base backbone (task `chat`) with the image's SLU prompt (worked examples) told the
    adapter's intents and slots, the adapter task's schema enforced (the template's where
    the task has none): T49 without the adapter, as bench_adapters.py scores it."""
    from m4d.adapters.__main__ import slu_listed_messages
    from m4d.engine.cascade import SCHEMAS
    from m4d.prepare.constraints import bind_spans

    return str(ctx.client.chat_complete(slu_listed_messages(text), task="chat",
                                        max_tokens=SLU_TOKENS, **GREEDY,  # bound as the task's
                                        json_schema=bind_spans(schema, text) if schema
                                        else SCHEMAS["slu"]).text)


def base_understand(ctx: Context, task: Any) -> Suite | None:
    if not ctx.has("chat"):
        return None
    examples = _commands(ctx)
    schema = str(getattr(task, "response_schema", "") or "")
    return Suite(SLU_METRICS, examples, lambda e: _base_slu(ctx, e.text, schema),
                 _slu_score(examples), len(examples),
                 "base backbone (task chat), the SLU prompt with worked examples and the "
                 "intents listed, JSON schema enforced")


def speech_understand(ctx: Context, task: Any) -> Suite:
    examples = _commands(ctx)
    items = [(e, ctx.clip(e.text)) for e in examples]
    return Suite(SLU_METRICS, items, lambda item: _text(ctx.client.run(
        task.id, {"audio": item[1]}, max_tokens=SLU_TOKENS, **GREEDY)),
        _slu_score(examples), len(examples), HELD_OUT + ", spoken by espeak-ng")


def base_speech_understand(ctx: Context, task: Any) -> Suite | None:
    if not (ctx.has("transcribe") and ctx.has("chat")):
        return None
    examples = _commands(ctx)
    items = [(e, ctx.clip(e.text)) for e in examples]
    schema = str(getattr(task, "response_schema", "") or "")

    def call(item: tuple[Any, Any]) -> str:
        return _base_slu(ctx, ctx.client.transcribe(item[1]).text, schema)

    return Suite(SLU_METRICS, items, call, _slu_score(examples), len(examples),
                 "transcribe, then the base backbone with the SLU prompt (as understand's "
                 "base); one call = both")


def _intent_score(examples: Sequence[Any]) -> Callable[[list[str]], tuple[float, ...]]:
    return lambda got: _percent(share(g == e.intent for g, e in zip(got, examples, strict=True)))


def command_intent(ctx: Context, task: Any) -> Suite:
    examples = _commands(ctx)
    return Suite(("intent %",), examples, lambda e: ctx.client.classify(
        e.text, task=task.id).labels[0].label, _intent_score(examples), len(examples),
        HELD_OUT)


def base_command_intent(ctx: Context, task: Any) -> Suite | None:
    if not ctx.has("classify"):
        return None
    examples = _commands(ctx)
    labels = list(task.labels) or sorted({e.intent for e in examples})
    spoken = [label.replace("_", " ") for label in labels]  # "set_timer" -> "set timer"

    def call(e: Any) -> str:
        best = ctx.client.classify(e.text, spoken, task="classify").labels[0].label
        return labels[spoken.index(best)]

    return Suite(("intent %",), examples, call, _intent_score(examples), len(examples),
                 f"zero-shot classify (label similarity) over the head's {len(labels)} labels")


# ---------------------------------------------------------------- speech


def transcribe(ctx: Context, task: Any) -> Suite:
    items = [(sentence, ctx.clip(sentence)) for sentence, _, _ in ctx.take(data.SPOKEN)]

    def score(heard: list[str]) -> tuple[float, ...]:
        return _percent(tests_module("speech").wer([s for s, _ in items], heard))

    return Suite(("WER % (lower is better)",), items,
                 lambda item: ctx.client.transcribe(item[1], task=task.id).text, score,
                 len(items), "espeak-ng sentences, 130 words/min")


def keyword(sentence: str) -> str:
    """The keyword a sentence is listened for: its longest word of letters (the first of
    equals)."""
    return max((w for w in words(sentence) if w.isalpha()), key=len)


def keyword_spot(ctx: Context, task: Any) -> Suite:
    items = []
    for i, (sentence, _, _) in enumerate(ctx.take(data.SPOKEN)):
        absent = data.ABSENT_KEYWORDS[i % len(data.ABSENT_KEYWORDS)]
        items.append((ctx.clip(sentence), keyword(sentence), absent))

    def call(item: tuple[Any, str, str]) -> list[tuple[bool, bool]]:
        hits = {h.keyword: h.detected for h in
                ctx.client.spot_keywords(item[0], [item[1], item[2]], task=task.id).keywords}
        return [(True, hits[item[1]]), (False, hits[item[2]])]

    return Suite(("detection accuracy %",), items, call,
                 lambda decisions: _percent(detection_accuracy(d for pair in decisions
                                                               for d in pair)),
                 len(items), "per clip one word said and one not; 2 decisions per clip")


def speech_ask(ctx: Context, task: Any) -> Suite:
    items = [(ctx.clip(sentence), question, answers)
             for sentence, question, answers in ctx.take(data.SPOKEN)]
    return Suite(("answer contains %",), items, lambda item: _text(ctx.client.ask(
        item[1], audio=item[0], task=task.id, max_tokens=ANSWER_TOKENS, **GREEDY)),
        _containment(items), len(items), "a question about each spoken sentence")


# ---------------------------------------------------------------- images


def _notice(i: int, lines: Sequence[str]) -> Any:
    from m4client import Image

    rendering = tests_module("rendering")
    font, size = rendering.FONTS[i % len(rendering.FONTS)]
    return Image(rendering.render_lines(lines, font, size))


def ocr(ctx: Context, task: Any) -> Suite:
    items = [("\n".join(lines), _notice(i, lines))
             for i, (lines, _, _) in enumerate(ctx.take(data.NOTICES))]
    return Suite(("char accuracy %",), items,
                 lambda item: ctx.client.read_text(item[1], task=task.id).text,
                 lambda read: _percent(char_accuracy([r for r, _ in items], read)), len(items),
                 "notices rendered in DejaVu Sans, Serif and Mono")


def ocr_ask(ctx: Context, task: Any) -> Suite:
    items = [(_notice(i, lines), question, answers)
             for i, (lines, question, answers) in enumerate(ctx.take(data.NOTICES))]
    return Suite(("answer contains %",), items, lambda item: _text(ctx.client.ask(
        item[1], image=item[0], task=task.id, max_tokens=ANSWER_TOKENS, **GREEDY)),
        _containment(items), len(items), "a question about each rendered notice")


def shape(colour: str, kind: str, variant: int = 0) -> Any:
    """A filled shape on white, 224 px: variant 0 large and centred, 1 smaller and off
    centre (the same thing drawn another way)."""
    from m4client import Image
    from PIL import Image as PILImage
    from PIL import ImageDraw

    img = PILImage.new("RGB", (224, 224), "white")
    x0, y0, side = (32, 32, 160) if variant == 0 else (104, 20, 100)
    box = (x0, y0, x0 + side, y0 + side)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x0 + side // 2, y0), (x0 + side, y0 + side), (x0, y0 + side)], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Image(buf.getvalue())


def _top_label(result: Any) -> str:
    return str(result.labels[0].label)


def image_classify(ctx: Context, task: Any) -> Suite:
    items = ctx.take(data.SHAPE_ITEMS)
    labels = [f"{c} {s}" for c, s in data.SHAPE_ITEMS]
    return Suite(("accuracy %",), items, lambda item: _top_label(ctx.client.run_complete(
        task.id, {"image": shape(*item), "labels": labels})),
        lambda got: _percent(share(g == f"{c} {s}" for g, (c, s) in zip(got, items, strict=True))),
        len(items), f"drawn coloured shapes, zero-shot over {len(labels)} colour-shape labels")


def image_text_retrieval(ctx: Context, task: Any) -> Suite:
    items = ctx.take(data.SHAPE_ITEMS)
    captions = [f"a {c} {s}" for c, s in items]
    return Suite(("recall@1 %",), items, lambda item: _top_label(ctx.client.run_complete(
        task.id, {"image": shape(*item), "texts": captions})),
        lambda got: _percent(share(g == c for g, c in zip(got, captions, strict=True))),
        len(items), f"each drawn shape's caption the first of {len(items)}")


def image_embed(ctx: Context, task: Any) -> Suite:
    shapes = ctx.take(data.SHAPE_ITEMS)
    items = [shape(c, s, 0) for c, s in shapes] + [shape(c, s, 1) for c, s in shapes]
    n = len(shapes)
    return Suite(("recall@1 %",), items, lambda image: ctx.client.run_complete(
        task.id, {"image": image}).embeddings[0],
        lambda vectors: _percent(recall_at_1(vectors[:n], vectors[n:])), n,
        f"each shape's other drawing (smaller, off centre) the nearest of {n}; one image per call")


def vqa(ctx: Context, task: Any) -> Suite:
    items = [(shape(c, s), "What colour is the shape?", (c,)) for c, s in ctx.take(data.SHAPE_ITEMS)]
    return Suite(("answer contains %",), items, lambda item: _text(ctx.client.ask(
        item[1], image=item[0], task=task.id, max_tokens=ANSWER_TOKENS, **GREEDY)),
        _containment(items), len(items), "the colour of a drawn shape")


# ---------------------------------------------------------------- no dataset


def latency_only(ctx: Context, task: Any) -> Suite:
    """The same input for every call, from the task's input specs, and no score."""
    from m4client import Image

    inputs: dict[str, Any] = {}
    for spec in task.inputs:
        if spec.kind == "text":
            inputs[spec.name] = "Turn on the kitchen lights."
        elif spec.kind == "texts":
            inputs[spec.name] = ["kitchen lights", "weather"]
        elif spec.kind == "chat":
            inputs[spec.name] = [{"role": "user", "content": "Hello, who are you?"}]
        elif spec.kind == "audio":
            inputs[spec.name] = ctx.clip(data.SPOKEN[0][0])
        elif spec.kind == "image":
            inputs[spec.name] = Image(tests_module("rendering").render_lines(data.NOTICES[0][0]))
        elif spec.kind == "tensor":
            inputs[spec.name] = _zeros(spec)
    options = {"max_tokens": ANSWER_TOKENS, **GREEDY} if task.streaming else {}
    kinds = ", ".join(f"{s.name}: {s.kind}" for s in task.inputs)
    return Suite((), [inputs] * ctx.items,
                 lambda given: ctx.client.run_complete(task.id, given, **options), None,
                 ctx.items, f"no dataset: the same input every call ({kinds})")


def _zeros(spec: Any) -> Any:
    """A zero tensor of the spec's shape, its free dimension the least the description asks
    ("T >= 2"), else 64."""
    import numpy as np

    found = re.search(r">=\s*(\d+)", spec.description)
    free = max(int(found.group(1)) if found else 64, 1)
    shape = [free if d < 0 else d for d in spec.shape] or [1]
    return np.zeros(shape, dtype=spec.dtype or "float32")


# task id -> its suite; a task that runs through an adapter or head -> the same without it
SUITES: dict[str, Callable[[Context, Any], Suite]] = {
    "generate": generate, "chat": chat, "complete": complete, "predict-next": predict_next,
    "embed": embed, "classify": classify, "understand": understand,
    "speech-understand": speech_understand, "command-intent": command_intent,
    "transcribe": transcribe, "keyword-spot": keyword_spot, "speech-ask": speech_ask,
    "ocr": ocr, "ocr-ask": ocr_ask, "image-classify": image_classify,
    "image-text-retrieval": image_text_retrieval, "image-embed": image_embed, "vqa": vqa,
}
BASES: dict[str, Callable[[Context, Any], Suite | None]] = {
    "understand": base_understand, "speech-understand": base_speech_understand,
    "command-intent": base_command_intent,
}
# Why a task of the kinds images have gets no dataset here.
WHY_NO_DATASET: dict[str, str] = {
    "sensor-classify": "its labels are the trained head's own (e.g. IMU activities); no "
                       "honest sensor windows for them can be made offline",
}

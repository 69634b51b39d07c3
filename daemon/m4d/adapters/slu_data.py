"""Spoken-language understanding (M4 T49), the adapter's data: examples, targets and scoring.

The task turns the transcript of a spoken command into JSON with an intent and slots. The
backbone's LoRA learns to write `target(example)`; the text encoder's head learns the intent.
Examples are made here from the templates and slot values of `slu_templates`, never collected:

- "train": training templates filled with training values;
- "val": the training templates kept back from "train" (every `VAL_EVERY`-th of each
  intent's) with training values: the trainer's early stopping watches its loss, so it
  keeps the adapter that words it has not seen serve best, not the one that knows its
  training sentences best;
- "eval": held-out templates with held-out values (the number that counts: phrasings and
  words the adapter never saw);
- "eval_values" / "eval_templates": only the values, or only the templates, held out, to tell
  which of the two the adapter fails to generalise over.

Each example is written as an ASR model would (Whisper: a capitalised sentence with
punctuation, sometimes lowercase without any), and each slot holds the words exactly as they
stand in the text, so the model copies a span. `parse` and `score` read what a model wrote.

    python -m m4d.adapters.slu_data --out DIR [--train N] [--eval N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from m4image.fsutil import atomic_write_bytes

from m4d.adapters.slu_templates import SCHEMA, TEMPLATES
from m4d.adapters.slu_values import VALUES
from m4d.prepare.constraints import SPAN

# split -> (templates held out, values held out)
SPLITS: dict[str, tuple[bool, bool]] = {
    "train": (False, False),
    "val": (False, False),
    "eval": (True, True),
    "eval_values": (False, True),
    "eval_templates": (True, False),
}
INTENTS: tuple[str, ...] = tuple(sorted(SCHEMA))

# How a transcript looks, with its share of examples: "sentence" as Whisper usually writes
# ("Turn off the kitchen light."), "lower" without case or punctuation, "bare" as said
# without the final mark.
_STYLES = ("sentence", "lower", "bare")
_STYLE_WEIGHTS = (6, 3, 1)
_DROP_PUNCT = str.maketrans("", "", ",.?!:;")  # from the template's words, never from values
_TRIES = 10  # draws per example to avoid repeating a text already in the list
VAL_EVERY = 8  # every 8th training template of an intent is the "val" split's


def templates(split: str, intent: str) -> tuple[str, ...]:
    """The phrasings `split` draws from for `intent`."""
    pool = TEMPLATES[intent]
    if SPLITS[split][0]:
        return pool.held_out
    val = split == "val"
    return tuple(t for i, t in enumerate(pool.train) if (i % VAL_EVERY == VAL_EVERY - 1) == val)


@dataclass(frozen=True)
class Example:
    """A transcript and what it means; every slot value occurs in `text` as written."""

    text: str
    intent: str
    slots: dict[str, str]


def fields(template: str) -> list[str]:
    """The slot names a template uses, in order."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def render(template: str, values: Mapping[str, str], intent: str, style: str) -> Example:
    """`template` filled with `values` and written in `style` (one of _STYLES)."""
    pieces: list[tuple[str, str | None]] = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            pieces.append((literal, None))
        if field is not None:
            pieces.append((values[field], field))
    question = template.endswith("?")
    words: list[str] = []
    slots: dict[str, str] = {}
    for i, (piece, slot) in enumerate(pieces):
        if style == "lower":
            piece = piece.lower() if slot else piece.lower().translate(_DROP_PUNCT)
        else:
            if slot is None and i == len(pieces) - 1:
                piece = piece.removesuffix("?")
            if i == 0:
                piece = piece[:1].upper() + piece[1:]
        if slot is not None:
            slots[slot] = piece
        words.append(piece)
    text = "".join(words)
    if style == "sentence":
        text += "?" if question else "."
    return Example(text=text, intent=intent, slots=slots)


def examples(split: str, n: int, seed: int = 0) -> list[Example]:
    """`n` examples of `split` (see SPLITS), every intent in turn (each block of len(INTENTS)
    holds every intent once, in a random order); the same list for the same seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    held_values = SPLITS[split][1]
    rng = random.Random(f"slu/{split}/{seed}")
    out: list[Example] = []
    seen: set[str] = set()
    order: list[str] = []
    for i in range(n):
        if i % len(INTENTS) == 0:
            order = rng.sample(INTENTS, len(INTENTS))
        intent = order[i % len(INTENTS)]
        phrasings = templates(split, intent)
        for _ in range(_TRIES):
            template = rng.choice(phrasings)
            values = {f: rng.choice(VALUES[f].held_out if held_values else VALUES[f].train)
                      for f in fields(template)}
            style = rng.choices(_STYLES, _STYLE_WEIGHTS)[0]
            example = render(template, values, intent, style)
            if example.text not in seen:
                break
        seen.add(example.text)
        out.append(example)
    return out


def target(example: Example) -> str:
    """The JSON the model must write: intent, then slots sorted by name, one line."""
    slots = {k: example.slots[k] for k in sorted(example.slots)}
    return json.dumps({"intent": example.intent, "slots": slots}, ensure_ascii=False,
                      separators=(", ", ": "))


def response_schema(max_value: int = 64) -> dict[str, object]:
    """The JSON schema of `target`: one of the intents, each with only its own slots (in
    `target`'s order: by name), each a string copied from the request (``x-m4-span``:
    the daemon makes it a choice among the request's spans). The task serving the adapter
    enforces it while decoding, so an answer names an intent the adapter knows, never a
    near miss ("cancel_call"), no slot its intent lacks, and no misspelt value
    ("nursary" for "nursery")."""
    def one(intent: str) -> dict[str, object]:
        slots = {s: {"type": "string", "minLength": 1, "maxLength": max_value, SPAN: True}
                 for s in sorted(SCHEMA[intent])}
        return {"type": "object",
                "properties": {"intent": {"const": intent},
                               "slots": {"type": "object", "properties": slots,
                                         "additionalProperties": False}},
                "required": ["intent", "slots"], "additionalProperties": False}
    return {"anyOf": [one(intent) for intent in INTENTS]}


def parse(output: str) -> tuple[str | None, dict[str, str]]:
    """The intent and slots of the first JSON object in `output` (text or code fences around
    it are ignored); (None, {}) when no object parses. Slot values that are numbers or
    booleans become strings; other non-string values are dropped."""
    decoder = json.JSONDecoder()
    start = output.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(output, start)
        except json.JSONDecodeError:
            start = output.find("{", start + 1)
            continue
        intent = obj.get("intent")
        raw = obj.get("slots")
        slots: dict[str, str] = {}
        if isinstance(raw, dict):
            for k, v in raw.items():
                if isinstance(v, str):
                    slots[k] = v
                elif isinstance(v, int | float | bool):
                    slots[k] = json.dumps(v)
        return (intent if isinstance(intent, str) and intent else None), slots
    return None, {}


def _norm(value: str) -> str:
    """A slot value for comparison: case folded, outer spaces and punctuation off, inner
    spaces collapsed."""
    return " ".join(value.strip(string.punctuation + string.whitespace).casefold().split())


def score(outputs: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """How well `outputs` (what the model wrote, one per example) match `examples`.

    - intent_accuracy: the parsed intent equals the example's, over all examples;
    - slot_precision / slot_recall / slot_f1: micro-averaged over (slot, value) pairs, values
      compared by `_norm`; a ratio with nothing to count (no slot predicted, or none
      expected) is 1.0, as nothing in it is wrong;
    - parsed: the share of outputs holding a JSON object with a string intent;
    - n: the number of examples.
    """
    if len(outputs) != len(examples):
        raise ValueError(f"{len(outputs)} outputs for {len(examples)} examples")
    correct = parsed = true_pos = predicted = expected = 0
    for output, example in zip(outputs, examples, strict=True):
        intent, slots = parse(output)
        parsed += intent is not None
        correct += intent == example.intent
        got = {(k, _norm(v)) for k, v in slots.items()}
        want = {(k, _norm(v)) for k, v in example.slots.items()}
        true_pos += len(got & want)
        predicted += len(got)
        expected += len(want)
    n = len(examples)
    precision = true_pos / predicted if predicted else 1.0
    recall = true_pos / expected if expected else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "intent_accuracy": correct / n if n else 0.0,
            "slot_precision": precision, "slot_recall": recall, "slot_f1": f1,
            "parsed": parsed / n if n else 0.0}


def _write_lines(path: Path, records: Iterable[dict[str, object]]) -> int:
    """One JSON record a line, written atomically (nothing at `path` until all are written)."""
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))
    return len(lines)


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> int:
    """The LM-adapter training format, {"input", "output"} (plus intent and slots, for
    scoring); returns the number of records."""
    return _write_lines(Path(path), ({"input": e.text, "output": target(e), "intent": e.intent,
                                      "slots": e.slots} for e in examples))


def write_label_jsonl(path: str | Path, examples: Iterable[Example]) -> int:
    """The classification-head format, {"text", "label"} (label: the intent)."""
    return _write_lines(Path(path), ({"text": e.text, "label": e.intent} for e in examples))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m m4d.adapters.slu_data",
        description="Write the spoken-language-understanding adapter's data: "
        "<split>.jsonl ({input, output}) and <split>.labels.jsonl ({text, label}).")
    parser.add_argument("--out", required=True, type=Path, help="the directory to write into")
    parser.add_argument("--train", type=int, default=8000, help="training examples")
    parser.add_argument("--eval", type=int, default=800, help="examples per evaluation split")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    args = parser.parse_args(argv)
    if args.train < 0 or args.eval < 0:
        parser.error("--train and --eval must be >= 0")
    args.out.mkdir(parents=True, exist_ok=True)
    schema = args.out / "response_schema.json"
    atomic_write_bytes(schema, (json.dumps(response_schema(), indent=1) + "\n").encode())
    print(f"the answers' JSON schema -> {schema}")
    for split in SPLITS:
        data = examples(split, args.train if split == "train" else args.eval, args.seed)
        count = write_jsonl(args.out / f"{split}.jsonl", data)
        write_label_jsonl(args.out / f"{split}.labels.jsonl", data)
        print(f"{split}: {count} examples ({len({e.text for e in data})} distinct), "
              f"{len({e.intent for e in data})} intents -> {args.out / f'{split}.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

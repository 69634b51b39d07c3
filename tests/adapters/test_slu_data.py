"""The spoken-language-understanding adapter's data (m4d.adapters.slu_data): the held-out
phrasings and values never leak into training (checked on the generated text, not on the
pools), the targets parse back, the scores are the ones computed by hand, and the files are
written whole or not at all."""

from __future__ import annotations

import itertools
import json
import re
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from m4d.adapters import slu_data
from m4d.adapters.slu_data import (
    INTENTS,
    SPLITS,
    Example,
    examples,
    fields,
    parse,
    render,
    score,
    target,
    write_jsonl,
)
from m4d.adapters.slu_templates import SCHEMA, TEMPLATES, VALUES

_PUNCT = str.maketrans("", "", ",.?!:;")


def norm(text: str) -> str:
    """Text as compared here: lowercase, no punctuation but apostrophes, single spaces."""
    return " ".join(text.lower().translate(_PUNCT).split())


def template_regex(template: str, held_out: bool | None) -> re.Pattern[str]:
    """A normalised text made from `template`; slots match their values (held-out, train or,
    with None, either), so a different phrasing never matches by a slot swallowing words."""
    parts: list[str] = []
    for literal, field, _, _ in string.Formatter().parse(norm(template)):
        parts.append(re.escape(literal))
        if field is not None:
            pool = VALUES[field]
            values = {None: pool.train + pool.held_out, True: pool.held_out, False: pool.train}
            parts.append("(?:" + "|".join(re.escape(norm(v)) for v in values[held_out]) + ")")
    return re.compile("".join(parts))


def all_texts(held_templates: bool, held_values: bool) -> Iterator[Example]:
    """Every text a split can make (lowercase style: the others differ only in punctuation)."""
    for intent, pool in TEMPLATES.items():
        for template in pool.held_out if held_templates else pool.train:
            names = fields(template)
            choices = [VALUES[f].held_out if held_values else VALUES[f].train for f in names]
            for combo in itertools.product(*choices):
                yield render(template, dict(zip(names, combo, strict=True)), intent, "lower")


def word_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_pools_follow_the_schema() -> None:
    assert set(TEMPLATES) == set(SCHEMA) == set(INTENTS)
    assert 12 <= len(INTENTS) <= 16
    for intent, pool in TEMPLATES.items():
        assert len(pool.train) >= 10 and len(pool.held_out) >= 3, intent
        assert not set(pool.train) & set(pool.held_out), intent
        for template in pool.train + pool.held_out:
            names = fields(template)
            assert len(names) == len(set(names)) and set(names) <= set(SCHEMA[intent]), template
    for slot in {s for slots in SCHEMA.values() for s in slots}:
        pool = VALUES[slot]
        assert len(pool.train) >= 6 and len(pool.held_out) >= 3, slot
        assert not {norm(v) for v in pool.train} & {norm(v) for v in pool.held_out}, slot


def test_held_out_templates_are_other_phrasings() -> None:
    """Not a training template with one word changed: at least two word edits apart."""
    for pool in TEMPLATES.values():
        for held in pool.held_out:
            for seen in pool.train:
                assert word_distance(norm(held).split(), norm(seen).split()) >= 2, (held, seen)


@pytest.fixture(scope="module")
def train_texts() -> list[str]:
    every = [e.text for e in all_texts(held_templates=False, held_values=False)]
    return [norm(t) for t in every + [e.text for e in examples("train", 3000, seed=0)]]


def test_no_held_out_value_in_any_training_text(train_texts: list[str]) -> None:
    held = {norm(v) for pool in VALUES.values() for v in pool.held_out}
    pattern = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, sorted(held))) + r")(?!\w)")
    leaks = {(t, m.group(1)) for t in train_texts if (m := pattern.search(t))}
    assert not leaks


def test_no_held_out_template_in_any_training_text(train_texts: list[str]) -> None:
    held = [template_regex(t, None) for pool in TEMPLATES.values() for t in pool.held_out]
    leaks = [t for t in train_texts if any(r.fullmatch(t) for r in held)]
    assert not leaks


@pytest.mark.parametrize(("split", "held_templates", "held_values"),
                         [("eval", True, True), ("eval_values", False, True),
                          ("eval_templates", True, False)])
def test_eval_splits_hold_out_what_they_say(split: str, held_templates: bool,
                                            held_values: bool) -> None:
    train_regexes = [template_regex(t, None) for pool in TEMPLATES.values() for t in pool.train]
    for example in examples(split, 800, seed=1):
        text = norm(example.text)
        pool = TEMPLATES[example.intent]
        mine = pool.held_out if held_templates else pool.train
        assert any(template_regex(t, held_values).fullmatch(text) for t in mine), example
        if held_templates:
            assert not any(r.fullmatch(text) for r in train_regexes), example
        for slot, value in example.slots.items():
            values = VALUES[slot].held_out if held_values else VALUES[slot].train
            assert norm(value) in {norm(v) for v in values}, example


@pytest.mark.parametrize("split", list(SPLITS))
def test_every_intent_in_every_split(split: str) -> None:
    got = [e.intent for e in examples(split, 3 * len(INTENTS), seed=5)]
    assert all(got.count(intent) == 3 for intent in INTENTS)


def test_targets_round_trip_and_slots_are_spans() -> None:
    for split in SPLITS:
        for example in examples(split, 400, seed=2):
            out = target(example)
            assert parse(out) == (example.intent, example.slots)
            assert list(json.loads(out)["slots"]) == sorted(example.slots)
            assert "\n" not in out
            for value in example.slots.values():
                assert value and value in example.text, example


def test_target_is_canonical() -> None:
    example = Example("Text Mom saying hi.", "send_message", {"message": "hi", "contact": "Mom"})
    assert target(example) == (
        '{"intent": "send_message", "slots": {"contact": "Mom", "message": "hi"}}')
    assert target(Example("Pause.", "pause_music", {})) == '{"intent": "pause_music", "slots": {}}'


def test_surface_looks_like_asr_output() -> None:
    texts = [e.text for e in examples("train", 2000, seed=0)]
    sentences = [t for t in texts if t[0].isupper() and t[-1] in ".?"]
    lower = [t for t in texts if t == t.lower() and not set(t) & set(",.?!")]
    assert len(sentences) >= 0.45 * len(texts) and len(lower) >= 0.2 * len(texts)
    assert any(t.endswith("?") for t in sentences)


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    for split in SPLITS:
        assert examples(split, 200, seed=7) == examples(split, 200, seed=7)
        assert examples(split, 200, seed=7) != examples(split, 200, seed=8)
    assert examples("train", 50, seed=7) == examples("train", 200, seed=7)[:50]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        examples("test", 10, seed=0)
    with pytest.raises(ValueError):
        examples("train", -1, seed=0)
    with pytest.raises(ValueError, match="2 outputs for 1 examples"):
        score(["", ""], [Example("Pause.", "pause_music", {})])


def test_parse_is_lenient() -> None:
    assert parse('Sure:\n```json\n{"intent": "set_timer", "slots": {"duration": "5 minutes"}}\n'
                 '```') == ("set_timer", {"duration": "5 minutes"})
    assert parse('{"intent": "set_brightness", "slots": {"level": 50, "room": ["a"]}}') == (
        "set_brightness", {"level": "50"})
    assert parse('{oops} {"intent": "pause_music"}') == ("pause_music", {})
    assert parse('{"intent": 3, "slots": {"room": "x"}}') == (None, {"room": "x"})
    assert parse('{"intent": "pause_music", "slots": "none"}') == ("pause_music", {})
    assert parse("pause the music") == (None, {})
    assert parse('{"intent": "play_music", "slots": {"genre": "jazz"') == (None, {})
    assert parse("") == (None, {})


def test_score_by_hand() -> None:
    golds = [
        Example("Turn on the kitchen lights.", "turn_on_light", {"room": "kitchen"}),
        Example("Set a timer for ten minutes.", "set_timer", {"duration": "ten minutes"}),
        Example("Text Mom saying I'm running late.", "send_message",
                {"contact": "Mom", "message": "I'm running late"}),
        Example("Pause the music.", "pause_music", {}),
        Example("Weather in Paris tomorrow.", "weather_query",
                {"city": "Paris", "date": "tomorrow"}),
        Example("Set an alarm for 7:30 am.", "set_alarm", {"time": "7:30 am"}),
    ]
    outputs = [
        # intent right, slot right (case and outer punctuation do not count): 1 of 1
        '{"intent": "turn_on_light", "slots": {"room": "Kitchen."}}',
        # intent right (text around the object), slot value wrong: 0 of 1, 1 predicted
        'Sure! ```json\n{"intent": "set_timer", "slots": {"duration": "10 minutes"}}\n```',
        # intent wrong, both slots right: 2 of 2
        '{"intent": "call_contact", "slots": {"contact": " mom ", "message": "I\'m running late"}}',
        # no JSON at all: unparsed, intent wrong, nothing expected, nothing predicted
        "pause the music",
        # cut off: the outer object never closes, the inner one has no intent: 0 of 2
        '{"intent": "weather_query", "slots": {"city": "Paris", "date": "tomorrow"}',
        # intent right, one right slot and one extra; the second object is ignored: 1 of 1, 2 predicted
        '{"intent": "set_alarm", "slots": {"time": "7:30 AM", "room": "bedroom"}} {"intent": "x"}',
    ]
    true_pos, predicted, expected = 1 + 0 + 2 + 0 + 0 + 1, 1 + 1 + 2 + 0 + 0 + 2, 1 + 1 + 2 + 0 + 2 + 1
    precision, recall = true_pos / predicted, true_pos / expected  # 4/6, 4/7
    got = score(outputs, golds)
    assert got["n"] == 6
    assert got["intent_accuracy"] == pytest.approx(3 / 6)
    assert got["parsed"] == pytest.approx(4 / 6)
    assert got["slot_precision"] == pytest.approx(4 / 6) == precision
    assert got["slot_recall"] == pytest.approx(4 / 7) == recall
    assert got["slot_f1"] == pytest.approx(8 / 13)
    assert got["slot_f1"] == pytest.approx(2 * precision * recall / (precision + recall))

    perfect = examples("eval", 100, seed=3)
    assert score([target(e) for e in perfect], perfect) == {
        "n": 100, "intent_accuracy": 1.0, "slot_precision": 1.0, "slot_recall": 1.0,
        "slot_f1": 1.0, "parsed": 1.0}
    # nothing expected, nothing predicted: nothing wrong; all predicted slots wrong: 0
    assert score(["{}"], [Example("Pause.", "pause_music", {})])["slot_f1"] == 1.0
    assert score(['{"intent": "pause_music", "slots": {"room": "x"}}'],
                 [Example("Pause.", "pause_music", {})])["slot_precision"] == 0.0


def _read(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cli_writes_every_split_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    assert slu_data.main(["--out", str(out), "--train", "64", "--eval", "32", "--seed", "3"]) == 0
    names = {f"{s}{kind}.jsonl" for s in SPLITS for kind in ("", ".labels")} | {"response_schema.json"}
    assert {p.name for p in out.iterdir()} == names  # no temporary file left next to them
    printed = capsys.readouterr().out
    assert "train: 64 examples" in printed and "eval: 32 examples" in printed
    for split in SPLITS:
        want = examples(split, 64 if split == "train" else 32, seed=3)
        records = _read(out / f"{split}.jsonl")
        assert records == [{"input": e.text, "output": target(e), "intent": e.intent,
                            "slots": e.slots} for e in want]
        assert _read(out / f"{split}.labels.jsonl") == [
            {"text": e.text, "label": e.intent} for e in want]

    again = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "m4d.adapters.slu_data", "--out", str(again),
                    "--train", "64", "--eval", "32", "--seed", "3"], check=True,
                   capture_output=True)
    for name in names:
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert json.loads((out / "response_schema.json").read_text()) == slu_data.response_schema()


def test_the_response_schema_takes_every_target_and_only_the_schemas_intents_and_slots() -> None:
    import jsonschema  # a dev dependency: installed with the tests

    schema = slu_data.response_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for split in SPLITS:
        for example in examples(split, 2 * len(INTENTS), seed=11):
            validator.validate(json.loads(target(example)))
    for wrong in ({"intent": "cancel_call", "slots": {"time": "noon"}},  # a near miss
                  {"intent": "set_alarm", "slots": {"room": "kitchen"}},  # another intent's slot
                  {"intent": "pause_music", "slots": {}, "extra": 1},
                  {"intent": "set_timer", "slots": {"duration": ""}},
                  {"intent": "set_timer"}):
        assert not validator.is_valid(wrong), wrong


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken() -> Iterator[Example]:
        yield from examples("train", 5, seed=0)
        raise RuntimeError("the generator failed half way")

    path = tmp_path / "train.jsonl"
    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    assert list(tmp_path.iterdir()) == []

    assert write_jsonl(path, examples("train", 3, seed=0)) == 3
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]

"""A task schema's strings marked "x-m4-span" become the choice of the request's spans
(m4d.prepare.constraints.bind_spans): what is offered, what is left alone, and the schema
without a text."""

from __future__ import annotations

import json

import jsonschema
from m4d.prepare.constraints import MAX_SPAN_WORDS, SPAN, bind_spans

SLOT = {"type": "string", "maxLength": 64, SPAN: True}
SCHEMA = {"anyOf": [
    {"type": "object", "properties": {"intent": {"const": "send_message"},
                                      "slots": {"type": "object", "properties": {
                                          "contact": SLOT, "message": SLOT}}}},
    {"type": "object", "properties": {"intent": {"const": "pause_music"},
                                      "note": {"type": "string"}}}]}


def _bound(text: str | None) -> dict:
    return json.loads(bind_spans(json.dumps(SCHEMA), text))


def test_marked_strings_offer_the_spans_as_written() -> None:
    bound = _bound("Text Ana: I'm late, sorry.")
    slots = bound["anyOf"][0]["properties"]["slots"]["properties"]
    choices = slots["contact"]["enum"]
    assert slots["message"] == slots["contact"] == {"enum": choices}
    assert {"Ana", "I'm late, sorry", "Text Ana", "sorry"} <= set(choices)  # inner marks kept
    assert not any(c.endswith((".", ",", ":")) for c in choices)  # outer ones off
    assert "Ana: I'm late, sorry" in choices and "" not in choices
    assert bound["anyOf"][1]["properties"]["note"] == {"type": "string"}  # unmarked: as it was
    validator = jsonschema.Draft202012Validator(bound)
    assert validator.is_valid({"intent": "send_message", "slots": {"contact": "Ana",
                                                                   "message": "I'm late, sorry"}})
    assert not validator.is_valid({"intent": "send_message", "slots": {"contact": "Anna"}})


def test_spans_are_at_most_max_words_long() -> None:
    words = [f"w{i}" for i in range(MAX_SPAN_WORDS + 3)]
    choices = _bound(" ".join(words))["anyOf"][0]["properties"]["slots"]["properties"]["contact"]["enum"]
    assert max(len(c.split()) for c in choices) == MAX_SPAN_WORDS
    n, k = len(words), MAX_SPAN_WORDS
    assert len(choices) == sum(min(k, n - i) for i in range(n))  # every run, once


def test_without_a_text_the_mark_goes_and_the_string_is_free() -> None:
    for text in (None, "", "  ... "):
        slot = _bound(text)["anyOf"][0]["properties"]["slots"]["properties"]["contact"]
        assert slot == {"type": "string", "maxLength": 64}

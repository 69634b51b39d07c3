"""Structured output on the real backbone: a JSON schema, a regex or a list of choices keeps
every generated token inside the format (llguidance's mask applied to the logits before
sampling), in a batch beside free-text rows; the output parses and validates; an invalid or
unsupported format is InvalidArgument before anything runs."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import torch
from m4d.config import Config
from m4d.engine.config import EngineConfig
from m4d.engine.engine import Engine
from m4d.errors import InvalidArgument
from m4d.executor.runtime import Runtime
from m4d.prepare.constraints import ResponseFormat
from m4d.requests import (
    Caller,
    Finished,
    FinishReason,
    GenerateRequest,
    Priority,
    SamplingParams,
    TextDelta,
)
from m4image.verify import verify_image

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "intent": {"enum": ["turn_on_light", "turn_off_light", "set_timer"]},
        "slots": {"type": "object", "properties": {"room": {"type": "string", "maxLength": 16}},
                  "additionalProperties": False}},
     "required": ["intent"], "additionalProperties": False},
    {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4},
]


@pytest.fixture(scope="module")
def runtime(text_image: Path) -> Iterator[Runtime]:
    rt = Runtime(verify_image(text_image), Config(
        image=text_image, kv_slots=4, prefill_chunk=32, step_token_budget=40,
        weight_format="float32", compute_dtype="float32", max_context=512))
    rt.load()
    yield rt


def request(rt: Runtime, prompt: str, fmt: ResponseFormat | None,
            max_tokens: int = 96) -> GenerateRequest:
    assert rt.tokenizer is not None and rt.grammars is not None
    return GenerateRequest(
        task="complete", priority=Priority.FOREGROUND, caller=Caller(uid=1),
        prompt_ids=rt.tokenizer.encode(prompt),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        constraint=rt.grammars.compile(fmt) if fmt is not None else None)


async def run_all(rt: Runtime, requests: list[GenerateRequest]) -> list[tuple[str, Finished]]:
    engine = Engine(rt, EngineConfig(kv_slots=4, token_budget=40, prefill_chunk=32,
                                     max_queue=16, max_batch_texts=4))
    engine.start()

    async def one(r: GenerateRequest) -> tuple[str, Finished]:
        text, end = "", None
        async for event in engine.submit(r):
            if isinstance(event, TextDelta):
                text += event.text
            elif isinstance(event, Finished):
                end = event
        assert end is not None
        return text, end

    try:
        return await asyncio.wait_for(asyncio.gather(*(one(r) for r in requests)), 300)
    finally:
        engine.stop()


def test_json_regex_and_choices_hold_in_one_batch_beside_free_text(runtime: Runtime) -> None:
    formats = [ResponseFormat("json_schema", json_schema=json.dumps(s)) for s in SCHEMAS]
    formats += [ResponseFormat("regex", regex=r"[0-9]{3}-[0-9]{4}"),
                ResponseFormat("choices", choices=("positive", "negative", "neutral"))]
    prompts = ["A person described as JSON:", "Turn off the kitchen light. As JSON:",
               "Some numbers:", "Call me at", "The review 'I loved it' is"]
    reqs = [request(runtime, p, f) for p, f in zip(prompts, formats, strict=True)]
    reqs.append(request(runtime, "The capital of France is", None, max_tokens=12))
    results = asyncio.run(run_all(runtime, reqs))
    for schema, (text, end) in zip(SCHEMAS, results, strict=False):
        assert end.reason in (FinishReason.STOP, FinishReason.EOS), (text, end.reason)
        jsonschema.validate(json.loads(text), schema)
    phone, _ = results[3]
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", phone), phone
    assert results[4][0] in ("positive", "negative", "neutral")
    assert results[5][1].usage.completion_tokens == 12, "the free-text row is unconstrained"


def test_constrained_greedy_output_equals_free_output_where_that_already_fits(
        runtime: Runtime) -> None:
    # greedy free text that happens to match the format: the mask never changes a token
    [(free, _)] = asyncio.run(run_all(runtime, [request(runtime, "1, 2, 3, 4,", None, 6)]))
    [(kept, _)] = asyncio.run(run_all(runtime, [request(
        runtime, "1, 2, 3, 4,", ResponseFormat("choices", choices=(free,)), 6)]))
    assert kept == free


@pytest.mark.parametrize(("fmt", "message"), [
    (ResponseFormat("json_schema", json_schema="{not json"), "not JSON"),
    (ResponseFormat("json_schema", json_schema='{"type": "objectx"}'), "objectx"),
    (ResponseFormat("json_schema", json_schema="[1, 2]"), "must be a JSON object"),
    (ResponseFormat("regex", regex="[a-z"), "unclosed character class"),
    (ResponseFormat("choices", choices=()), "at least one"),
])
def test_an_invalid_format_is_invalid_argument(runtime: Runtime, fmt: ResponseFormat,
                                               message: str) -> None:
    assert runtime.grammars is not None
    with pytest.raises(InvalidArgument, match=message):
        runtime.grammars.compile(fmt)


def test_a_tokenizer_llguidance_cannot_read_still_gets_structured_output(
        tmp_path: Path) -> None:
    # A word-level tokenizer without a decoder (as tiny imported checkpoints have): llguidance's
    # own tokenizer.json reader refuses it, so each token's text stands for its bytes.
    from m4d.prepare.constraints import Grammars
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "yes", "no", "maybe", "{", "}"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    grammars = Grammars(tmp_path / "tokenizer.json", [2], len(words))
    constraint = grammars.compile(ResponseFormat("choices", choices=("yes", "no")))
    logits = torch.zeros(len(words))
    constraint.restrict(logits)
    allowed = {words[i] for i in torch.nonzero(logits > float("-inf")).flatten().tolist()}
    assert allowed == {"yes", "no"}
    constraint.consume(words.index("no"))
    logits = torch.zeros(len(words))
    constraint.restrict(logits)
    assert torch.nonzero(logits > float("-inf")).flatten().tolist() == [2]  # only the end


def test_json_may_start_after_a_space_and_whitespace_runs_are_bounded(runtime: Runtime) -> None:
    assert runtime.grammars is not None and runtime.tokenizer is not None
    fmt = ResponseFormat("json_schema", json_schema=json.dumps(
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}))

    def keeps(text: str) -> bool:
        constraint = runtime.grammars.compile(fmt)
        return all(constraint.matcher.consume_token(t) for t in runtime.tokenizer.encode(text))

    assert keeps(' {"a": "x"}')  # the model's own " {" token
    assert keeps('\n{\n  "a": "x"\n}')  # pretty-printed
    assert not keeps('{"a": "x"\n \n \n')  # a model looping on blank lines is cut off
    assert not keeps('      {"a": "x"}')  # at most 4 characters before the value

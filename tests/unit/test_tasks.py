"""The served image's task table without a model or protobuf: each check names the field,
what came and what is allowed; defaults are filled; Run's inputs are checked by name and
kind. (tests/integration/test_bad_input.py sends the same mistakes through gRPC.)"""

from __future__ import annotations

from typing import Any

import pytest
from m4d.config import Config
from m4d.errors import InvalidArgument
from m4d.requests import Caller, MediaOp, Priority
from m4d.service.tasks import DEFAULT_TEMPERATURE, ImageInfo, Origin, SamplingArgs, Tasks

TASKS: list[dict[str, Any]] = [
    {"id": "generate", "rpc": "Generate", "inputs": [{"name": "prompt", "kind": "text"}]},
    {"id": "chat", "rpc": "Generate", "inputs": [{"name": "chat", "kind": "chat"}]},
    {"id": "embed", "rpc": "Embed"},
    {"id": "transcribe", "rpc": "Run", "head": "transcript", "modules": ["speech"],
     "inputs": [{"name": "audio", "kind": "audio", "required": True}]},
    {"id": "listen", "rpc": "Run", "head": "keyword_match", "modules": ["speech"],
     "inputs": [{"name": "audio", "kind": "audio", "required": True},
                {"name": "keywords", "kind": "texts"}]},
    {"id": "mystery", "rpc": "Run", "head": "oracle", "modules": ["speech"],
     "inputs": [{"name": "audio", "kind": "audio"}]},
]
ORIGIN = Origin(Caller(uid=1000), Priority.BACKGROUND, deadline=12.5)


class WordTokenizer:
    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]


class Template:
    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + " <assistant>"


@pytest.fixture
def tasks() -> Tasks:
    return Tasks(Config(max_text_chars=40), TASKS, ImageInfo("test", "1.0", "ab" * 32),
                 WordTokenizer(), Template(), max_context=64)  # type: ignore[arg-type]


def test_a_prompt_becomes_a_request_with_the_daemons_defaults(tasks: Tasks) -> None:
    request = tasks.generate("generate", ORIGIN, prompt="one two three")
    assert request.prompt_ids == [3, 3, 5]
    assert (request.caller, request.priority, request.deadline) == (
        ORIGIN.caller, Priority.BACKGROUND, 12.5)
    assert request.sampling.max_tokens == 61  # default_max_tokens is 256: the room left
    assert request.sampling.temperature == DEFAULT_TEMPERATURE


def test_a_chat_is_rendered_with_the_template(tasks: Tasks) -> None:
    request = tasks.generate("chat", ORIGIN, chat=[("user", "hi there")],
                             sampling=SamplingArgs(max_tokens=4, temperature=0.0))
    assert request.prompt_ids == [6, 2, 5, 11]  # "<user> hi there <assistant>"
    assert (request.sampling.max_tokens, request.sampling.temperature) == (4, 0.0)


@pytest.mark.parametrize(("call", "message"), [
    (lambda t: t.generate("summarise", ORIGIN, prompt="x"), "unknown task 'summarise'"),
    (lambda t: t.generate("embed", ORIGIN, prompt="x"), "served by Embed, not Generate"),
    (lambda t: t.generate("generate", ORIGIN, prompt="  "), "prompt is empty"),
    (lambda t: t.generate("generate", ORIGIN, prompt="x" * 41), "41 characters; the limit is 40"),
    (lambda t: t.generate("generate", ORIGIN, chat=[("user", "hi")]), "takes a prompt, not a chat"),
    (lambda t: t.generate("chat", ORIGIN, chat=[]), "chat has no messages"),
    (lambda t: t.generate("chat", ORIGIN, chat=[("robot", "hi")]),
     "chat.messages[0].role is 'robot'"),
    (lambda t: t.generate("generate", ORIGIN, prompt="x", sampling=SamplingArgs(max_tokens=64)),
     "max_tokens=64 does not fit"),
    (lambda t: t.generate("generate", ORIGIN, prompt="x", sampling=SamplingArgs(top_p=0.0)),
     "top_p must be in (0, 1]"),
    (lambda t: t.embed("embed", ORIGIN, ["ok", ""]), "texts[1] is empty"),
])
def test_each_mistake_names_its_field(tasks: Tasks, call: Any, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        call(tasks)
    assert message in str(err.value)


def test_run_inputs_are_checked_by_name_and_kind(tasks: Tasks) -> None:
    transcribe = tasks.task("transcribe", "Run")
    assert tasks.check_inputs(transcribe, {"audio": "pcm"})  # raw samples count as audio
    for kinds, message in [({"audio": "audio", "video": "image"}, "has no input 'video'"),
                           ({}, "needs input 'audio' (audio)"),
                           ({"audio": "text"}, "must be audio, not text")]:
        with pytest.raises(InvalidArgument) as err:
            tasks.check_inputs(transcribe, kinds)
        assert message in str(err.value)
    assert not tasks.check_inputs(tasks.task("generate", "Run"), {"prompt": "text"})


def test_media_requests_need_what_their_head_does(tasks: Tasks) -> None:
    with pytest.raises(InvalidArgument, match="cannot run on this daemon"):
        tasks.media_op(tasks.task("mystery", "Run"))
    listen = tasks.task("listen", "Run")
    assert tasks.media_op(listen) is MediaOp.KEYWORDS
    with pytest.raises(InvalidArgument, match="needs an image, audio or tensor input"):
        tasks.media(listen, MediaOp.KEYWORDS, None, ORIGIN)
    with pytest.raises(InvalidArgument, match="keywords is empty"):
        tasks.media(listen, MediaOp.KEYWORDS, object(), ORIGIN)  # type: ignore[arg-type]
    request = tasks.media(listen, MediaOp.KEYWORDS, object(), ORIGIN,  # type: ignore[arg-type]
                          lists={"keywords": ["stop", "go"]})
    assert (request.module, request.keywords, request.priority) == (
        "speech", ["stop", "go"], Priority.BACKGROUND)


SLU_SCHEMA = '{"type": "object", "properties": {"intent": {"enum": ["lights_on", "lights_off"]}}}'
ADAPTER_TASKS: list[dict[str, Any]] = [
    {"id": "understand", "rpc": "Generate", "adapter": "slu", "prompt_template": "slu_adapter",
     "inputs": [{"name": "prompt", "kind": "text"}], "response_schema": SLU_SCHEMA},
    {"id": "command-intent", "rpc": "Classify", "head": "linear_head", "adapter": "intent-head",
     "labels": ["turn_on_light", "turn_off_light"]},
    {"id": "classify", "rpc": "Classify", "head": "similarity"},
]


def _adapter_tasks(adapters: tuple[str, ...] = ("slu",), error: str = "") -> Tasks:
    return Tasks(Config(), ADAPTER_TASKS, ImageInfo("test", "1.0", "ab" * 32), WordTokenizer(),
                 Template(), max_context=64, adapters=adapters,
                 adapter_error=error)  # type: ignore[arg-type]


def test_an_adapter_task_renders_its_template_and_names_its_adapter() -> None:
    request = _adapter_tasks().generate("understand", ORIGIN, prompt="lights off")
    assert request.adapter == "slu"
    # the cascade's adapter template: a system line, then 'Request: "..."' as the user turn
    assert request.prompt_ids == WordTokenizer().encode(
        '<system> Turn the spoken request into JSON. <user> Request: "lights off" <assistant>')


def test_an_adapter_the_image_lacks_or_cannot_run_is_refused_with_the_reason() -> None:
    from m4d.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="adapter 'slu', which this image does not hold"):
        _adapter_tasks(adapters=()).generate("understand", ORIGIN, prompt="lights off")
    with pytest.raises(FailedPrecondition, match="fused decode step"):
        _adapter_tasks(error="adapters run in m4's fused decode step").generate(
            "understand", ORIGIN, prompt="lights off")


def test_a_trained_head_classifies_over_its_own_labels_only() -> None:
    tasks = _adapter_tasks()
    request = tasks.classify("command-intent", ORIGIN, "lights off", [])
    assert request.head == "intent-head" and request.labels == ["turn_on_light", "turn_off_light"]
    assert tasks.classify("command-intent", ORIGIN, "x", ["turn_off_light"]).labels == ["turn_off_light"]
    with pytest.raises(InvalidArgument, match="not among them: dim_light"):
        tasks.classify("command-intent", ORIGIN, "x", ["dim_light"])
    assert tasks.classify("classify", ORIGIN, "x", ["a", "b"]).head == ""


class RecordingGrammars:
    """Stands for m4d.prepare.constraints.Grammars: what it was asked to compile."""

    def __init__(self) -> None:
        self.compiled: list[Any] = []

    def compile(self, fmt: Any) -> object:
        self.compiled.append(fmt)
        return object()


def test_a_task_with_a_response_schema_keeps_to_it_unless_the_caller_gives_one() -> None:
    from m4d.prepare.constraints import ResponseFormat

    tasks = _adapter_tasks()
    tasks.grammars = grammars = RecordingGrammars()  # type: ignore[assignment]
    assert tasks.generate("understand", ORIGIN, prompt="lights off").constraint is not None
    own = ResponseFormat("choices", choices=("yes", "no"))
    tasks.generate("understand", ORIGIN, prompt="lights off", response_format=own)
    assert grammars.compiled == [ResponseFormat("json_schema", json_schema=SLU_SCHEMA), own]
    # a task without one is free text, as before
    free = Tasks(Config(), TASKS, ImageInfo("test", "1.0", "ab" * 32), WordTokenizer(),
                 Template(), max_context=64)  # type: ignore[arg-type]
    free.grammars = grammars  # type: ignore[assignment]
    assert free.generate("generate", ORIGIN, prompt="hi").constraint is None
    assert len(grammars.compiled) == 2


def test_a_task_schemas_marked_strings_are_spans_of_the_prompt() -> None:
    import json

    span = {"type": "object", "properties": {"room": {"type": "string", "x-m4-span": True}}}
    tasks = Tasks(Config(), [{**ADAPTER_TASKS[0], "response_schema": json.dumps(span)}],
                  ImageInfo("test", "1.0", "ab" * 32), WordTokenizer(), Template(), max_context=64,
                  adapters=("slu",))  # type: ignore[arg-type]
    tasks.grammars = grammars = RecordingGrammars()  # type: ignore[assignment]
    tasks.generate("understand", ORIGIN, prompt="lights off in the den")
    room = json.loads(grammars.compiled[0].json_schema)["properties"]["room"]
    assert set(room) == {"enum"} and {"den", "the den", "lights off in the den"} <= set(room["enum"])

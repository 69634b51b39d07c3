"""Sessions' pure parts: the tool box (prompt, grammar, reading a call back) and the gate
that keeps a tool call's text out of the stream."""

from __future__ import annotations

import json

import pytest
from m4d.errors import InvalidArgument
from m4d.service.sessions import ReplyGate, Tool, Toolbox, parse_tool

WEATHER = Tool("get_weather", "The weather in a city.",
               {"type": "object", "properties": {"city": {"type": "string"}}})
TIME = Tool("get_time", "The time now.", {"type": "object"})


def test_a_call_is_held_back_and_text_is_streamed() -> None:
    gate = ReplyGate(calls_possible=True)
    pieces = ["<", "tool_", 'call>{"name": "get_time", ', '"arguments": {}}', "</tool_call>"]
    assert [gate.push(p, [i]) for i, p in enumerate(pieces)] == [("", [])] * len(pieces)
    assert gate.is_call and gate.rest() == ("", [])
    gate = ReplyGate(calls_possible=True)
    assert [gate.push(p, [i]) for i, p in enumerate(["<", "b>bold", " text"])] == \
        [("", []), ("<b>bold", [0, 1]), (" text", [2])]  # held ids go out with their text
    assert not gate.is_call and gate.rest() == ("", [])
    gate = ReplyGate(calls_possible=True)
    assert gate.push("<tool", [7]) == ("", []) and gate.rest() == ("<tool", [7])  # ended early
    gate = ReplyGate(calls_possible=False)
    assert gate.push("<tool_call>", [5]) == ("<tool_call>", [5])


def test_the_toolbox_lists_tools_and_reads_calls_back() -> None:
    box = Toolbox([WEATHER, TIME])
    system = box.system_text("Be brief.")
    assert system.startswith("Be brief.\n\n") and "<tools>" in system
    listed = [json.loads(line) for line in system.split("<tools>\n")[1].split("\n</tools>")[0]
              .splitlines()]
    assert [t["name"] for t in listed] == ["get_weather", "get_time"]
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    assert box.call_in(call) == ("get_weather", '{"city": "Oslo"}')
    assert box.call_in('<tool_call>{"name": "nope", "arguments": {}}</tool_call>') is None
    assert box.call_in("<tool_call>{broken</tool_call>") is None
    assert box.call_in("The weather is fine.") is None
    assert Toolbox([]).system_text("Be brief.") == "Be brief."


def test_tool_choices_and_their_grammars() -> None:
    box = Toolbox([WEATHER, TIME])
    assert box.check_choice("") == "auto" and Toolbox([]).check_choice("") == "none"
    assert box.grammar("none") is None
    auto, required, one = box.grammar("auto"), box.grammar("required"), box.grammar("get_time")
    assert auto is not None and "free" in auto.lark and "get_time" in auto.lark
    assert required is not None and "free" not in required.lark
    assert one is not None and "get_weather" not in one.lark and "get_time" in one.lark
    with pytest.raises(InvalidArgument, match="tool_choice 'sometimes'"):
        box.check_choice("sometimes")
    with pytest.raises(InvalidArgument, match="has no tools"):
        Toolbox([]).check_choice("required")


@pytest.mark.parametrize(("name", "schema", "message"), [
    ("bad name", "{}", "must be 1-64"),
    ("ok", "{nope", "not JSON"),
    ("ok", "[1]", "must be a JSON object"),
])
def test_bad_tools_are_invalid_arguments(name: str, schema: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_tool(name, "", schema, 0)


def test_tool_names_are_unique() -> None:
    with pytest.raises(InvalidArgument, match="unique"):
        Toolbox([TIME, TIME])

"""Sessions through the real daemon on the default image (issue 17): a conversation the
daemon keeps, whose turns compute only their new tokens and answer exactly as re-sending
the history does; clone, delete, overflow, tool calls, ownership by uid, many idle ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from m4client import (
    AdminClient,
    AsyncClient,
    Client,
    FailedPreconditionError,
    FinishReason,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    ResourceExhaustedError,
    Tool,
)

from tests.conftest import DaemonProcess, start_daemon
from tests.integration.test_identity_uid import NOBODY

ROOT = Path(__file__).resolve().parents[2]
INSTRUCTIONS = "You are a helpful assistant on a phone. Answer in one short sentence."
QUESTIONS = ["What is the capital of France?", "And of Italy?", "Which of the two is bigger?"]
GREEDY = {"max_tokens": 24, "temperature": 0.0}
WEATHER = Tool("get_weather", "The weather now in a city.",
               {"type": "object", "properties": {"city": {"type": "string"},
                                                 "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": False})
PER_UID = 110


@pytest.fixture(scope="module")
def daemon(default_image: Path) -> Iterator[DaemonProcess]:
    run = Path(tempfile.mkdtemp(prefix="m4-sessions-", dir="/tmp"))
    run.chmod(0o755)  # another uid must reach app.sock (0666) inside
    d = start_daemon(default_image, run, env={"M4D_SESSIONS_PER_UID": str(PER_UID)})
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(run, ignore_errors=True)


def computed_and_reused(d: DaemonProcess) -> tuple[int, int]:
    with AdminClient(d.admin_address, timeout=30) as admin:
        s = admin.status()
    return s.tokens_prompted, s.prefix_tokens_reused


def test_turns_compute_only_their_new_tokens_and_answer_as_resending_the_history(
        daemon: DaemonProcess) -> None:
    history = [{"role": "system", "content": INSTRUCTIONS}]
    with Client(daemon.address, timeout=120) as m4, m4.session(INSTRUCTIONS) as chat:
        assert chat.context_window > 1000
        for i, question in enumerate(QUESTIONS):
            before = computed_and_reused(daemon)
            reply = chat.respond(question, **GREEDY)
            after = computed_and_reused(daemon)
            computed = after[0] - before[0]
            history.append({"role": "user", "content": question})
            again = m4.chat_complete(history, **GREEDY)  # the stateless way, same tokens
            assert reply.text == again.text, f"turn {i + 1}"
            assert reply.usage.prompt_tokens == again.usage.prompt_tokens
            history.append({"role": "assistant", "content": reply.text})
            assert reply.session is not None and reply.session.session_id == chat.id
            assert reply.session.context_tokens == reply.usage.total_tokens
            assert chat.context_tokens == reply.usage.total_tokens
            if i:  # the history (with the last reply, its partial block too) came from the
                # cache: what is computed is the new turn (the end of the last reply's turn,
                # the question, the template's tokens)
                assert computed < 48, (i, computed, reply.usage.prompt_tokens)
                assert after[1] - before[1] == reply.usage.prompt_tokens - computed
        info = chat.info()
        assert [(m.role, m.content) for m in info.transcript] == \
            [(m["role"], m["content"]) for m in history]


def test_clone_keeps_the_transcript_apart_and_delete_ends_it(daemon: DaemonProcess) -> None:
    with Client(daemon.address, timeout=120) as m4:
        chat = m4.session(INSTRUCTIONS)
        chat.respond(QUESTIONS[0], **GREEDY)
        twin = chat.clone()
        assert twin.id != chat.id
        assert [m.content for m in twin.info().transcript] == \
            [m.content for m in chat.info().transcript]
        twin.respond("Say hello.", **GREEDY)
        assert len(twin.info().transcript) == len(chat.info().transcript) + 2
        chat.delete()
        with pytest.raises(NotFoundError):
            m4.resume_session(chat.id)
        assert m4.resume_session(twin.id).id == twin.id
        twin.delete()


def test_a_cancelled_turn_leaves_the_transcript_as_it_was(daemon: DaemonProcess) -> None:
    with Client(daemon.address, timeout=120) as m4, m4.session(INSTRUCTIONS) as chat:
        chat.respond(QUESTIONS[0], **GREEDY)
        before = chat.info().transcript
        with chat.send("Tell me a very long story.", max_tokens=200) as stream:
            next(iter(stream))
        assert chat.info().transcript == before
        assert chat.respond(QUESTIONS[1], **GREEDY).text  # and the session goes on


def test_one_turn_at_a_time(daemon: DaemonProcess) -> None:
    with Client(daemon.address, timeout=120) as m4, m4.session(INSTRUCTIONS) as chat, \
            chat.send("Tell me a long story.", max_tokens=64) as stream:
        next(iter(stream))
        with pytest.raises(FailedPreconditionError, match="turn in progress"):
            chat.respond("And another?", max_tokens=4)


def test_overflow_fails_with_the_counts_or_drops_the_oldest_turns(daemon: DaemonProcess) -> None:
    with Client(daemon.address, timeout=120) as m4:
        with m4.session(INSTRUCTIONS) as strict:
            strict.respond(QUESTIONS[0], **GREEDY)
            with pytest.raises(OutOfRangeError, match=r"takes \d+ tokens .* holds \d+"):
                strict.respond(QUESTIONS[1], max_tokens=strict.context_window - 10)
            assert len(strict.info().transcript) == 3  # unchanged
        with m4.session(INSTRUCTIONS, overflow="drop_oldest") as rolling:
            for q in QUESTIONS[:2]:
                rolling.respond(q, **GREEDY)
            transcript = [{"role": m.role, "content": m.content}
                          for m in rolling.info().transcript]
            new = {"role": "user", "content": "Thanks!"}
            without_first = m4.count_tokens(chat=[transcript[0], *transcript[3:], new])
            room = without_first.context_window - without_first.tokens
            reply = rolling.respond(new["content"], max_tokens=room, temperature=0.0,
                                    stop=["\n"])
            assert reply.session is not None and reply.session.dropped_messages == 2
            kept = rolling.info().transcript
            assert kept[0].role == "system" and kept[0].content == INSTRUCTIONS
            assert [m.content for m in kept[1:3]] == [QUESTIONS[1], transcript[4]["content"]]
            with pytest.raises(OutOfRangeError, match="even with every earlier turn dropped"):
                rolling.respond("Hi", max_tokens=rolling.context_window)


def test_a_tool_call_round_trip(daemon: DaemonProcess) -> None:
    with Client(daemon.address, timeout=120) as m4, \
            m4.session(INSTRUCTIONS, tools=[WEATHER]) as chat:
        streamed = list(chat.send("What is the weather in Paris?", tool_choice="required",
                                  max_tokens=64, temperature=0.0))
        last = streamed[-1]
        assert last.finish_reason is FinishReason.TOOL_CALL and last.tool_call is not None
        assert "".join(c.text for c in streamed) == "", "a call is not streamed as text"
        call = last.tool_call
        assert call.name == "get_weather"
        jsonschema.validate(call.arguments, WEATHER.parameters)
        with pytest.raises(InvalidArgumentError, match="answers no call"):
            chat.tool_result("call_99", "{}")
        answer = chat.tool_result(call, json.dumps({"temperature": 21, "sky": "sunny"}),
                                  max_tokens=32, temperature=0.0, tool_choice="none")
        assert answer.text and answer.tool_call is None
        assert answer.finish_reason in (FinishReason.EOS, FinishReason.LENGTH)
        roles = [m.role for m in chat.info().transcript]
        assert roles == ["system", "user", "assistant", "tool", "assistant"]
        assert "get_weather" in chat.info().transcript[0].content  # the tools were listed
        auto = chat.respond("Thank you. What is 2 + 2?", max_tokens=32, temperature=0.0)
        assert (auto.tool_call is None) == bool(auto.text), "either an answer or a call"
        with pytest.raises(InvalidArgumentError, match="tool_choice 'get_time'"):
            chat.respond("Hi", tool_choice="get_time")


def test_bad_tools_are_refused_when_the_session_is_made(daemon: DaemonProcess) -> None:
    with Client(daemon.address, timeout=60) as m4:
        with pytest.raises(InvalidArgumentError, match="name"):
            m4.session(tools=[Tool("get weather!", "", {"type": "object"})])
        with pytest.raises(InvalidArgumentError, match="unique"):
            m4.session(tools=[WEATHER, WEATHER])
        with pytest.raises(InvalidArgumentError, match="parameters_schema is not JSON"):
            m4.session(tools=[Tool("t", "", "{oops")])
        with pytest.raises(InvalidArgumentError, match="unknown task"):
            m4.session(task="nope")


def test_another_uid_cannot_see_use_or_delete_a_session(daemon: DaemonProcess) -> None:
    assert os.geteuid() == 0, "this test runs as root: it starts a client as uid 65534"
    with Client(daemon.address, timeout=60) as m4, m4.session(INSTRUCTIONS) as chat:
        done = subprocess.run(
            [sys.executable, "-m", "tests.integration.session_intruder", daemon.address,
             str(NOBODY), chat.id], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        codes = json.loads(done.stdout.strip().splitlines()[-1])
        assert codes == {"uid": NOBODY, "get": "NOT_FOUND", "turn": "NOT_FOUND",
                         "clone": "NOT_FOUND", "delete": "NOT_FOUND"}
        assert m4.resume_session(chat.id).id == chat.id  # still there for its owner


async def test_many_idle_sessions_do_not_stop_new_calls(daemon: DaemonProcess) -> None:
    async with AsyncClient(daemon.address, timeout=120) as m4:
        idle = [await m4.session(f"You are assistant number {i}. " * 20) for i in range(100)]
        for chat in idle[:20]:  # some hold KV in the cache too
            await chat.respond("Hello!", max_tokens=2, temperature=0.0)
        fresh = await m4.chat_complete([{"role": "user", "content": QUESTIONS[0]}], **GREEDY)
        assert "Paris" in fresh.text
        late = await idle[0].respond(QUESTIONS[0], **GREEDY)  # recomputed if evicted
        assert "Paris" in late.text
        more = [await m4.session() for _ in range(PER_UID - 100)]
        with pytest.raises(ResourceExhaustedError, match="sessions_per_uid"):
            await m4.session()
        for chat in idle + more:
            await chat.delete()
        await (await m4.session()).delete()  # room again

"""Sessions: conversations the daemon keeps for the app that made them, with tools.

A session holds its transcript (text: it survives an image update) and the app's choices:
the task, the instructions (the system message, never dropped), the tools and what to do
when the context window fills up. Each turn is the whole transcript as a chat, rendered and
tokenized exactly as a stateless Generate would, so its greedy reply is the one re-sending
the history gives; the work of the history is not redone because the engine keeps each
turn's prompt and reply KV in the prefix cache (`keep_reply`) and the next turn's prompt
starts with those tokens. Idle sessions' KV leaves the cache like any other block (least
recently used) and is recomputed when they come back; nothing of theirs is pinned.

Tools follow the common <tool_call> convention: the system message lists them (as JSON),
and the reply is decoded under a grammar that admits either free text (not starting with
"<") or `<tool_call>{"name": …, "arguments": …}</tool_call>` whose arguments validate
against that tool's schema ("auto"); "required" or a tool's name admits only calls. So a
call always parses; the app gets it typed and answers with a tool-result turn.

A session belongs to its creator's uid (from the kernel); to anyone else it does not exist.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from m4d.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from m4d.prepare.constraints import ResponseFormat
from m4d.requests import GenerateRequest
from m4d.service.tasks import Origin, SamplingArgs, Tasks, Turn

MAX_TOOLS = 32
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_CHOICES = ("auto", "none", "required")  # or a tool's name


class Overflow(enum.Enum):
    FAIL = "fail"  # the turn fails with the counts
    DROP_OLDEST = "drop_oldest"  # the oldest turns go, the instructions stay


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments (an object)

    @property
    def schema_text(self) -> str:
        return json.dumps(self.parameters)


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    name: str
    arguments_json: str


@dataclass(frozen=True)
class TurnInput:
    """One turn as the app sent it: a user message or a tool's result."""

    user_message: str | None = None
    tool_result: tuple[str, str] | None = None  # (call_id, content)
    sampling: SamplingArgs = field(default_factory=SamplingArgs)
    response_format: ResponseFormat | None = None
    tool_choice: str = ""


def parse_tool(name: str, description: str, schema_text: str, i: int) -> Tool:
    where = f"tools[{i}]"
    if not TOOL_NAME.fullmatch(name):
        raise InvalidArgument(f"{where}.name {name!r} must be 1-64 of A-Z a-z 0-9 _ -")
    try:
        parameters = json.loads(schema_text or '{"type": "object"}')
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{where}.parameters_schema is not JSON: {exc}") from None
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"{where}.parameters_schema must be a JSON object")
    return Tool(name, description, parameters)


class Toolbox:
    """A session's tools: how the model is told about them, the grammar of a call, and
    the call read back from a reply."""

    def __init__(self, tools: Sequence[Tool]) -> None:
        if len(tools) > MAX_TOOLS:
            raise InvalidArgument(f"a session takes at most {MAX_TOOLS} tools (got {len(tools)})")
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"tool names must be unique (got {names})")
        self.tools = list(tools)
        self._by_name = {t.name: t for t in tools}

    def system_text(self, instructions: str) -> str:
        """The system message: the instructions, then the tools and how to call one."""
        if not self.tools:
            return instructions
        listed = "\n".join(json.dumps({"name": t.name, "description": t.description,
                                       "parameters": t.parameters}) for t in self.tools)
        return (f"{instructions}\n\n".lstrip() +
                "You can call these tools. To call one, answer with only "
                f'{CALL_OPEN}{{"name": <the tool\'s name>, "arguments": <its arguments>}}'
                f"{CALL_CLOSE}; its result comes back in a message from the tool.\n"
                f"<tools>\n{listed}\n</tools>")

    def check_choice(self, choice: str) -> str:
        """The tool choice, "" read as "auto" ("none" when there are no tools)."""
        choice = choice or ("auto" if self.tools else "none")
        if choice not in TOOL_CHOICES and choice not in self._by_name:
            raise InvalidArgument(
                f"tool_choice {choice!r}: use auto, none, required or one of the session's "
                f"tools ({', '.join(self._by_name) or 'it has none'})")
        if choice != "none" and not self.tools:
            raise InvalidArgument(f"tool_choice {choice!r}, but the session has no tools")
        return choice

    def grammar(self, choice: str) -> ResponseFormat | None:
        """The reply's grammar for a checked tool choice; None: free text."""
        if choice == "none":
            return None
        tools = self.tools if choice in ("auto", "required") else [self._by_name[choice]]
        calls = {"anyOf": [{"type": "object", "properties": {
            "name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
        lark = (f'start: {"call | free" if choice == "auto" else "call"}\n'
                f'call: "{CALL_OPEN}" body "{CALL_CLOSE}"\n'
                f"body: %json {json.dumps(calls)}\n")
        if choice == "auto":
            lark += "free: FREE\nFREE: /[^<][\\s\\S]*/\n"
        return ResponseFormat("lark", lark=lark)

    def call_in(self, text: str) -> tuple[str, str] | None:
        """(name, arguments as JSON) when the reply is a whole tool call."""
        body = text.strip()
        if not (self.tools and body.startswith(CALL_OPEN) and body.endswith(CALL_CLOSE)):
            return None
        try:
            call = json.loads(body[len(CALL_OPEN):-len(CALL_CLOSE)])
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or call.get("name") not in self._by_name:
            return None
        return str(call["name"]), json.dumps(call.get("arguments", {}), ensure_ascii=False)


@dataclass
class Session:
    id: str
    uid: int
    task: str
    instructions: str
    toolbox: Toolbox
    overflow: Overflow
    messages: list[Turn] = field(default_factory=list)  # after the system message
    pending: dict[str, ToolCall] = field(default_factory=dict)  # the last reply's call
    calls_made: int = 0
    busy: bool = False

    def chat(self, messages: Sequence[Turn] | None = None) -> list[Turn]:
        """The conversation as the model sees it: the system message, then `messages`."""
        system = self.toolbox.system_text(self.instructions)
        head: list[Turn] = [("system", system)] if system else []
        return head + list(self.messages if messages is None else messages)


@dataclass
class TurnPlan:
    """A turn ready for the engine; the session changes only when it `commit`s."""

    session: Session
    messages: list[Turn]  # the transcript after the drop, with the new turn
    dropped: int
    request: GenerateRequest
    tool_choice: str
    window: int


@dataclass(frozen=True)
class TurnResult:
    tool_call: ToolCall | None
    context_tokens: int
    window: int
    dropped: int


class Sessions:
    """Every live session, by id; each uid sees only its own."""

    def __init__(self, per_uid: int, reply_reserve: int) -> None:
        self.per_uid = per_uid
        self.reply_reserve = reply_reserve  # tokens a turn without max_tokens keeps free
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, uid: int, tasks: Tasks, *, task: str, instructions: str,
               tools: Sequence[Tool], overflow: Overflow) -> Session:
        task = task or "chat"
        toolbox = Toolbox(tools)
        if instructions:
            tasks.text("instructions", instructions)
        session = Session(secrets.token_hex(12), uid, task, instructions, toolbox, overflow)
        tasks.prompt_ids(task, chat=session.chat([("user", "?")]))  # a chat task?
        if tools:  # every call grammar compiles now, not at the first turn
            if tasks.grammars is None:
                raise InvalidArgument("this image's backbone has no structured output, which "
                                      "tool calls need")
            fmt = toolbox.grammar("auto")
            assert fmt is not None
            tasks.grammars.compile(fmt)
        self._add(session)
        return session

    def _add(self, session: Session) -> None:
        with self._lock:
            held = sum(1 for s in self._sessions.values() if s.uid == session.uid)
            if held >= self.per_uid:
                raise ResourceExhausted(f"uid {session.uid} holds {held} sessions, the most "
                                        "one app may hold (config sessions_per_uid); delete "
                                        "some")
            self._sessions[session.id] = session

    def get(self, uid: int, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.uid != uid:
            raise NotFound(f"no session {session_id!r}")
        return session

    def clone(self, uid: int, session_id: str) -> Session:
        source = self.get(uid, session_id)
        copy = Session(secrets.token_hex(12), uid, source.task, source.instructions,
                       source.toolbox, source.overflow, list(source.messages),
                       dict(source.pending), source.calls_made)
        self._add(copy)
        return copy

    def delete(self, uid: int, session_id: str) -> None:
        self.get(uid, session_id)
        with self._lock:
            self._sessions.pop(session_id, None)

    @contextmanager
    def turn(self, session: Session) -> Iterator[None]:
        """One turn at a time per session."""
        with self._lock:
            if session.busy:
                raise FailedPrecondition(f"session {session.id!r} has a turn in progress")
            session.busy = True
        try:
            yield
        finally:
            session.busy = False

    def context_tokens(self, session: Session, tasks: Tasks) -> tuple[int, int]:
        """(tokens of the transcript, the window)."""
        return tasks.count_tokens(session.task, chat=session.chat() or [("user", "?")])

    def plan(self, session: Session, turn: TurnInput, tasks: Tasks, origin: Origin) -> TurnPlan:
        """The turn's request, after fitting the conversation into the window."""
        new = self._new_messages(session, turn, tasks)
        choice = session.toolbox.check_choice(turn.tool_choice)
        if turn.response_format is not None and choice not in ("none", "auto"):
            raise InvalidArgument(f"response_format and tool_choice {choice!r} exclude each "
                                  "other: a turn either calls a tool or keeps to a format")
        fmt = turn.response_format or session.toolbox.grammar(choice)
        messages, ids, dropped, window = self._fit(session, list(session.messages), new, turn,
                                                   tasks)
        request = tasks.request(session.task, origin, ids, turn.sampling, fmt, keep_reply=True)
        return TurnPlan(session, messages, dropped, request, choice, window)

    def _new_messages(self, session: Session, turn: TurnInput, tasks: Tasks) -> list[Turn]:
        if turn.user_message is not None:
            return [("user", tasks.text("user_message", turn.user_message))]
        if turn.tool_result is None:
            raise InvalidArgument("set either user_message or tool_result")
        call_id, content = turn.tool_result
        tasks.text("tool_result.content", content)
        if call_id not in session.pending:
            raise InvalidArgument(
                f"tool_result.call_id {call_id!r} answers no call of the last reply"
                + (f" (it made {', '.join(session.pending)})" if session.pending else
                   " (it made none)"))
        return [("tool", content)]

    def _fit(self, session: Session, history: list[Turn], new: list[Turn], turn: TurnInput,
             tasks: Tasks) -> tuple[list[Turn], list[int], int, int]:
        """The history (oldest turns dropped as the session allows) with the new turn, such
        that the prompt and the reply's room fit the window; its prompt tokens; how many
        messages were dropped; the window."""
        reserve = turn.sampling.max_tokens or self.reply_reserve
        dropped = 0
        while True:
            ids, window = tasks.prompt_ids(session.task, chat=session.chat(history + new))
            tokens = len(ids)
            if tokens + reserve <= window:
                return history + new, ids, dropped, window
            if session.overflow is Overflow.FAIL or not history:
                raise OutOfRange(
                    f"the session's next turn takes {tokens} tokens and its reply up to "
                    f"{reserve} (max_tokens), but the context window holds {window}"
                    + ("; the session was created to fail on overflow (OVERFLOW_FAIL)"
                       if session.overflow is Overflow.FAIL else
                       ", even with every earlier turn dropped"))
            cut = next((i for i, (role, _) in enumerate(history) if i and role == "user"),
                       len(history))  # the oldest turn: a user message and its answers
            dropped += cut
            history = history[cut:]

    def commit(self, plan: TurnPlan, reply: str, completion_tokens: int) -> TurnResult:
        """The turn finished: the transcript takes it and the reply (a call is kept as the
        model wrote it, so the next turn's tokens start with this one's)."""
        session = plan.session
        session.messages = [*plan.messages, ("assistant", reply)]
        session.pending = {}
        call = None
        found = session.toolbox.call_in(reply) if plan.tool_choice != "none" else None
        if found is not None:
            session.calls_made += 1
            call = ToolCall(f"call_{session.calls_made}", *found)
            session.pending[call.call_id] = call
        return TurnResult(call, len(plan.request.prompt_ids) + completion_tokens, plan.window,
                          plan.dropped)


class ReplyGate:
    """Streams a reply's text (and its token ids) unless it is a tool call: text that may
    still turn out to be `<tool_call>…` is held until it cannot, and a call is never
    streamed as text."""

    def __init__(self, calls_possible: bool) -> None:
        self.text = ""
        self._sent = 0
        self._held: list[int] = []
        self._open = not calls_possible

    def push(self, piece: str, ids: Sequence[int] = ()) -> tuple[str, list[int]]:
        """The text and token ids to stream now ("" and [] while held)."""
        self.text += piece
        self._held += ids
        if not self._open:
            if CALL_OPEN.startswith(self.text) or self.text.startswith(CALL_OPEN):
                return "", []
            self._open = True
        return self._release()

    @property
    def is_call(self) -> bool:
        return not self._open and self.text.startswith(CALL_OPEN)

    def rest(self) -> tuple[str, list[int]]:
        """Held text (and ids) that turned out not to be a call."""
        return ("", []) if self.is_call else self._release()

    def _release(self) -> tuple[str, list[int]]:
        out, ids = self.text[self._sent:], self._held
        self._sent, self._held = len(self.text), []
        return out, ids

"""m4ctl's user verbs on text: generate, chat, embed, classify, predict-next, tasks, wait, run.

Each command takes the parsed arguments, calls the app socket through `m4client.Client`
and prints through `_output`. Streams are used in `with` blocks, so Ctrl-C or a closed
pipe cancels the call on the daemon before m4ctl exits. The verbs on files (transcribe,
keywords, ocr, ask) are in `_media`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from m4client import Audio, ChatMessage, Client, GenerationChunk, Image, M4Error, Stream
from m4client._stream import collect_generation

from . import _output as out
from ._parser import call_flags, command, priority_flag, sampling_flags
from ._tools import UsageError
from ._tools import app_client as client


def register(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Adds the text verbs to m4ctl's subcommands (`parents`: the parser of the global flags)."""
    p = command(sub, "generate", "Continue a prompt; streams text to stdout as it arrives.",
                parents, cmd_generate)
    p.add_argument("prompt", metavar="PROMPT")
    _generation_flags(p, "generate")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--schema", metavar="FILE", help="structured output: a JSON Schema file "
                     "the output validates against (- reads stdin)")
    fmt.add_argument("--regex", metavar="REGEX", help="structured output: a regex (Rust "
                     "syntax) the whole output matches")
    fmt.add_argument("--choices", metavar="A,B,C", help="structured output: exactly one of "
                     "these comma-separated strings")

    p = command(sub, "chat", "Chat with the model in a session the daemon keeps (each turn "
                "computes only its new tokens): interactive on stdin, or one turn with "
                "--message.", parents, cmd_chat)
    p.add_argument("--system", metavar="TEXT", help="system message opening the conversation")
    p.add_argument("--message", "-m", metavar="TEXT", help="send one user message and exit")
    p.add_argument("--session", metavar="ID", help="go on with a session kept earlier "
                   "(--keep); deleted at exit unless --keep again")
    p.add_argument("--keep", action="store_true", help="keep the session in the daemon at "
                   "exit and print its id to stderr (default: delete it)")
    p.add_argument("--overflow", choices=["fail", "drop_oldest"], default="drop_oldest",
                   help="when the context window is full: drop the oldest turns (default) "
                   "or fail the turn")
    _generation_flags(p, "chat")

    p = command(sub, "embed", "Embed texts; prints one line per text (first dims and norm).",
                parents, cmd_embed)
    p.add_argument("texts", nargs="+", metavar="TEXT")
    call_flags(p, task_help="task id (default: embed)")

    p = command(sub, "classify", "Rank labels for a text, best first.", parents, cmd_classify)
    p.add_argument("text", metavar="TEXT")
    p.add_argument("--labels", "-l", action="append", default=[], metavar="A,B,C",
                   help="candidate labels, comma-separated (repeatable; optional if the task "
                   "has labels)")
    call_flags(p, task_help="task id (default: classify)")

    p = command(sub, "predict-next", "Predict the next words after a text (M4 T1).", parents,
                cmd_predict_next)
    p.add_argument("text", metavar="TEXT")
    p.add_argument("-n", type=int, default=0, metavar="N", help="how many words (default 5)")
    call_flags(p, task_help="task id (default: predict-next)")

    command(sub, "tasks", "List the active image's tasks (ADAPTER: the LoRA or head it runs "
            "through; WINDOW: the tokens its model holds; --json gives each task's output "
            "schema).", parents, cmd_tasks)

    p = command(sub, "count-tokens", "Count a prompt's tokens for a generation task, against "
                "its context window.", parents, cmd_count_tokens)
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--task", default="", help="task id (default: generate)")
    command(sub, "wait", "Wait until the daemon serves (model loaded, self-test passed); "
            "--timeout bounds the wait (default 300 s).", parents, cmd_wait)

    p = command(sub, "run", "Run any task by id with named inputs; prints its (streamed) "
                "output.", parents, cmd_run)
    p.add_argument("task", metavar="TASK")
    p.add_argument("--input", "-i", action="append", default=[], dest="inputs",
                   metavar="NAME=VALUE", help="an input (repeatable); NAME=@FILE reads a file")
    p.add_argument("-n", "--num-predictions", type=int, default=0, metavar="N")
    priority_flag(p)
    sampling_flags(p)


def _generation_flags(p: argparse.ArgumentParser, task: str) -> None:
    sampling_flags(p)
    call_flags(p, task_help=f"task id (default: {task})")
    p.add_argument("--stats", action="store_true", help="print usage and timings to stderr")


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling keyword arguments of generate()/chat()/run() from the flags."""
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
    }


def _print_stream(stream: Stream[GenerationChunk], args: argparse.Namespace) -> str:
    """Print a generation as it arrives (text or JSON lines); return the text."""
    chunks: list[GenerationChunk] = []
    with stream:
        for chunk in stream:
            chunks.append(chunk)
            if args.json:
                out.json_line(chunk.raw)
            else:
                out.write(chunk.text)
    if not args.json:
        out.write("\n")
    result = collect_generation(chunks)
    if args.stats:
        out.stats(result.usage, result.timings, result.model, result.finish_reason)
    return result.text


def response_format(args: argparse.Namespace) -> dict[str, Any]:
    """The structured-output keyword argument of generate() from the flags, if any."""
    if args.schema:
        try:
            text = sys.stdin.read() if args.schema == "-" else Path(args.schema).read_text()
        except OSError as exc:
            raise UsageError(f"--schema: cannot read {args.schema}: {exc.strerror}") from None
        return {"json_schema": text}
    if args.regex:
        return {"regex": args.regex}
    if args.choices:
        return {"choices": [c.strip() for c in args.choices.split(",") if c.strip()]}
    return {}


def cmd_generate(args: argparse.Namespace) -> int:
    with client(args) as m4:
        stream = m4.generate(args.prompt, task=args.task, priority=args.priority,
                             **sampling(args), **response_format(args))
        _print_stream(stream, args)
    return 0


def _read_turns(interactive: bool) -> Iterable[str]:
    """User lines until EOF or /exit; a "> " prompt only on a terminal."""
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                out.write("\n")
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        line = line.rstrip("\r\n")
        if line.strip() == "/exit":
            return
        if line.strip():
            yield line


def cmd_chat(args: argparse.Namespace) -> int:
    if args.session and args.system:
        raise UsageError("--system opens a new session; a kept one (--session) has its own")
    interactive = args.message is None and sys.stdin.isatty()
    turns: Iterable[str] = [args.message] if args.message is not None else _read_turns(interactive)
    with client(args) as m4:
        session = (m4.resume_session(args.session) if args.session else
                   m4.session(args.system or "", task=args.task, overflow=args.overflow))
        try:
            for text in turns:
                stream = session.send(text, priority=args.priority, **sampling(args))
                try:
                    _print_stream(stream, args)
                except KeyboardInterrupt:  # the turn is cancelled; the session is as it was
                    if not interactive:
                        raise
                    out.write("\n")  # Ctrl-C at a terminal stops this reply, not the chat
                    continue
                if args.stats:
                    out.err(f"context: {session.context_tokens} of {session.context_window} "
                            "tokens")
        finally:
            if args.keep:
                out.err(f"session: {session.id} (go on with: m4ctl chat --session {session.id})")
            else:
                session.delete()
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    with client(args) as m4:
        result = m4.embed(args.texts, task=args.task, priority=args.priority)
    if args.json:
        out.json_line(result.raw)
        return 0
    for i, (text, vector) in enumerate(zip(args.texts, result.vectors, strict=False)):
        out.write(out.vector_line(i, vector, None if args.quiet else text) + "\n")
    return 0


def _labels(values: list[str]) -> list[str]:
    return [label.strip() for value in values for label in value.split(",") if label.strip()]


def cmd_classify(args: argparse.Namespace) -> int:
    with client(args) as m4:
        result = m4.classify(
            args.text, _labels(args.labels), task=args.task, priority=args.priority
        )
    if args.json:
        out.json_line(result.raw)
    else:
        out.write("".join(line + "\n" for line in out.ranking_lines(result.labels, args.quiet)))
    return 0


def cmd_predict_next(args: argparse.Namespace) -> int:
    with client(args) as m4:
        result = m4.predict_next(args.text, args.n, task=args.task, priority=args.priority)
    if args.json:
        out.json_line(result.raw)
    else:
        lines = out.prediction_lines(result.predictions, args.quiet)
        out.write("".join(line + "\n" for line in lines))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    timeout = args.timeout if args.timeout is not None else 300.0
    with Client(args.address, app_name=args.app_name or None) as m4:
        m4.wait_serving(timeout)
    if not args.quiet:
        out.write(f"m4d at {m4.target} is serving\n")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    with client(args) as m4:
        table = m4.list_tasks()
    if args.json:
        out.json_line(table.raw)
        return 0
    if args.quiet:
        out.write("".join(t.id + "\n" for t in table))
        return 0

    def kind(s: Any) -> str:
        if s.kind == "tensor" and s.dtype:
            return f"tensor<{s.dtype}{list(s.shape) if s.shape else ''}>"
        return str(s.kind)

    def sig(specs: Iterable[Any]) -> str:
        return ", ".join(f"{s.name}:{kind(s)}" + ("" if s.required else "?") for s in specs)

    rows = [("ID", "M4", "PATH", "MODULES", "ADAPTER", "WINDOW", "INPUTS → OUTPUTS")]
    rows += [
        (
            t.id,
            t.m4_id or "-",
            str(t.path),
            ",".join(t.modules) or "-",
            t.adapter or "-",
            str(t.context_window or "-"),
            f"{sig(t.inputs)} → {sig(t.outputs)}" + (" (JSON schema)" if t.response_schema else ""),
        )
        for t in table
    ]
    out.write("".join(line + "\n" for line in out.table(rows)))
    return 0


def cmd_count_tokens(args: argparse.Namespace) -> int:
    with client(args) as m4:
        count = m4.count_tokens(args.prompt, task=args.task)
    if args.json:
        out.json_line({"tokens": count.tokens, "contextWindow": count.context_window})
    else:
        out.write(f"{count.tokens} tokens of {count.context_window} "
                  f"({count.room} left to generate)\n")
    return 0


def _input_kinds(m4: Client, task: str) -> dict[str, str]:
    """The task's input kinds by name, or {} if the task table cannot say."""
    try:
        spec = m4.list_tasks().get(task)
    except M4Error:
        return {}
    return {s.name: s.kind for s in spec.inputs} if spec else {}


def _parse_input(item: str, kinds: dict[str, str]) -> tuple[str, Any]:
    """NAME=VALUE or NAME=@FILE → (name, value), typed by the task's input kind."""
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise UsageError(f"--input expects NAME=VALUE or NAME=@FILE (got {item!r})")
    kind = kinds.get(name, "text")
    data: bytes | None = None
    if value.startswith("@"):
        try:
            data = Path(value[1:]).read_bytes()
        except OSError as exc:
            raise UsageError(f"--input {name}: cannot read {value[1:]}: {exc.strerror}") from None
    if kind in ("image", "audio"):
        if data is None:
            raise UsageError(f"--input {name} is {kind}: pass a file as {name}=@FILE")
        return name, Image(data) if kind == "image" else Audio(data)
    if kind == "tensor":
        raise UsageError(f"--input {name} is a tensor; use the Python client for tensors")
    text = data.decode("utf-8", errors="replace") if data is not None else value
    if kind == "texts":
        sep_char = "\n" if data is not None else ","
        return name, [t.strip() for t in text.split(sep_char) if t.strip()]
    if kind == "chat":
        return name, [ChatMessage("user", text)]
    return name, text


def cmd_run(args: argparse.Namespace) -> int:
    with client(args) as m4:
        kinds = _input_kinds(m4, args.task) if args.inputs else {}
        inputs = dict(_parse_input(item, kinds) for item in args.inputs)
        stream = m4.run(
            args.task,
            inputs,
            num_predictions=args.num_predictions,
            priority=args.priority,
            **sampling(args),
        )
        mid_line = False  # streamed text was written without its final newline
        with stream:
            for chunk in stream:
                if args.json:
                    out.json_line(chunk.raw)
                    continue
                if chunk.text:
                    out.write(chunk.text)
                    mid_line = not chunk.text.endswith("\n")
                lines = [out.vector_line(i, v) for i, v in enumerate(chunk.embeddings)]
                lines += out.ranking_lines(chunk.labels, args.quiet)
                lines += out.prediction_lines(chunk.predictions, args.quiet)
                lines += [f"{k.keyword}\t{'heard' if k.detected else 'not heard'}\t{k.score:.2f}"
                          for k in chunk.keywords]
                if chunk.source_text and not args.quiet:
                    lines.insert(0, f"[source: {chunk.source_text}]")
                if lines:
                    out.write("\n" * mid_line + "".join(line + "\n" for line in lines))
                    mid_line = False
    if mid_line:
        out.write("\n")
    return 0

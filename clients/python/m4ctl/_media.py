"""m4ctl's user verbs on files: transcribe and keywords (WAV or raw PCM), ocr (an image), and
ask (a question about an image's text or a recording), over the app socket.

Files are read here and sent as they are; the daemon decodes them (PNG, JPEG, WebP; WAV or
16-bit PCM with --rate). A file that cannot be read is a usage error (exit code 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m4client import Audio, Image, PcmAudio

from . import _output as out
from ._parser import call_flags, command, sampling_flags
from ._tools import UsageError
from ._tools import app_client as client
from ._user import sampling

RATE_HELP = "FILE is raw 16-bit little-endian mono PCM at HZ, not WAV"


def register(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Adds the file verbs to m4ctl's subcommands (`parents`: the parser of the global flags)."""
    p = command(sub, "transcribe", "Transcribe speech in a WAV file (or raw PCM with --rate).",
                parents, cmd_transcribe)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--rate", type=int, default=0, metavar="HZ", help=RATE_HELP)
    call_flags(p, task_help="task id (default: transcribe)")

    p = command(sub, "keywords", "Which keywords are spoken in a WAV file.", parents,
                cmd_keywords)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--keywords", "-k", action="append", required=True, metavar="A,B,C",
                   help="words or phrases to listen for, comma-separated (repeatable)")
    p.add_argument("--rate", type=int, default=0, metavar="HZ", help=RATE_HELP)
    call_flags(p, task_help="task id (default: keyword-spot)")

    p = command(sub, "ocr", "Read the text in an image (PNG, JPEG, WebP).", parents, cmd_ocr)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--boxes", action="store_true", help="print each text box with its corners")
    call_flags(p, task_help="task id (default: ocr)")

    p = command(sub, "ask", "Ask about the text in an image or about a WAV file; the answer "
                "streams.", parents, cmd_ask)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", metavar="FILE", help="an image whose text is read first")
    source.add_argument("--audio", metavar="FILE", help="a WAV file that is transcribed first")
    p.add_argument("question", metavar="QUESTION")
    p.add_argument("--show-source", action="store_true",
                   help="print what was read or heard before the answer")
    call_flags(p, task_help="task id (default: ocr-ask for --image, speech-ask for --audio)")
    sampling_flags(p)


def _file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _audio(args: argparse.Namespace) -> Audio | PcmAudio:
    data = _file(args.file)
    return PcmAudio(data, args.rate) if args.rate else Audio(data)


def cmd_transcribe(args: argparse.Namespace) -> int:
    with client(args) as m4:
        result = m4.transcribe(_audio(args), task=args.task or "transcribe",
                               priority=args.priority)
    if args.json:
        out.json_line({"text": result.text, "audio_seconds": result.audio_seconds})
    else:
        out.write(result.text + "\n")
    return 0


def cmd_keywords(args: argparse.Namespace) -> int:
    words = [w.strip() for group in args.keywords for w in group.split(",") if w.strip()]
    with client(args) as m4:
        result = m4.spot_keywords(_audio(args), words, task=args.task or "keyword-spot",
                                  priority=args.priority)
    if args.json:
        out.json_line({"transcript": result.source_text,
                       "keywords": [vars(k) for k in result.keywords]})
        return 0
    rows = [("KEYWORD", "HEARD", "SCORE", "MATCH")]
    rows += [(k.keyword, "yes" if k.detected else "no", f"{k.score:.2f}", k.heard or "-")
             for k in result.keywords]
    if not args.quiet:
        out.write(f"transcript: {result.source_text}\n")
    out.write("".join(line + "\n" for line in out.table(rows)))
    return 0


def cmd_ocr(args: argparse.Namespace) -> int:
    with client(args) as m4:
        result = m4.read_text(Image(_file(args.file)), task=args.task or "ocr",
                              priority=args.priority)
    if args.json:
        out.json_line({"text": result.text, "boxes": [
            {"text": b.text, "confidence": round(b.confidence, 4), "corners": b.corners}
            for b in result.boxes]})
    elif args.boxes:
        rows = [("TEXT", "CONF", "CORNERS")]
        rows += [(b.text, f"{b.confidence:.2f}", " ".join(f"{x},{y}" for x, y in b.corners))
                 for b in result.boxes]
        out.write("".join(line + "\n" for line in out.table(rows)))
    else:
        out.write(result.text + "\n")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    image = Image(_file(args.image)) if args.image else None
    audio = Audio(_file(args.audio)) if args.audio else None
    mid_line = False
    with client(args) as m4, m4.ask(args.question, image=image, audio=audio,
                                     task=args.task or None, priority=args.priority,
                                     **sampling(args)) as stream:
        for chunk in stream:
            if args.json:
                out.json_line(chunk.raw)
                continue
            if chunk.source_text and args.show_source:
                out.write(f"[{'read' if image else 'heard'}: {chunk.source_text}]\n")
            if chunk.text:
                out.write(chunk.text)
                mid_line = not chunk.text.endswith("\n")
    if mid_line:
        out.write("\n")
    return 0

"""The command line of m4ctl: global flags, user verbs and admin noun-verbs (argparse).

Global flags are accepted before or after the subcommand (`m4ctl --json tasks` and
`m4ctl tasks --json` mean the same). Parse errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

PROG = "m4ctl"
EXIT_USAGE = 2


class UsageError(Exception):
    """A bad command line found after parsing (exit code 2)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `m4ctl: error: ... (see ... --help)`."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def _global_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The flags every command takes; on subparsers they only override when given."""

    def d(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    g = parser.add_argument_group("global options")
    g.add_argument(
        "--address",
        default=d(None),
        metavar="ADDR",
        help="app socket (gRPC target or path; env M4_ADDRESS, default unix:///run/m4/app.sock)",
    )
    g.add_argument(
        "--admin-address",
        default=d(None),
        metavar="ADDR",
        help="admin socket (env M4_ADMIN_ADDRESS, default unix:///run/m4/admin.sock)",
    )
    g.add_argument(
        "--timeout",
        type=_positive_float,
        default=d(None),
        metavar="SECONDS",
        help="deadline of each call (default: none)",
    )
    g.add_argument(
        "--json",
        action="store_true",
        default=d(False),
        help="print responses as protobuf JSON, one message per line",
    )
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=d(False),
        help="print only the essential output",
    )
    g.add_argument(
        "--app-name",
        default=d(os.environ.get("M4_APP_NAME", PROG)),
        metavar="NAME",
        help="label sent as m4-app-name metadata (default: m4ctl)",
    )


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, metavar="N", help="most tokens to generate")
    g.add_argument("--temperature", type=float, metavar="T", help="0 = greedy")
    g.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, in (0, 1]")
    g.add_argument("--top-k", type=int, metavar="K", help="keep the K likeliest tokens")
    g.add_argument("--seed", type=int, metavar="S", help="sampler seed (reproducible output)")
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop before this string (repeatable)",
    )
    g.add_argument("--ignore-eos", action="store_true", help="generate past end-of-sequence")


def _call_flags(p: argparse.ArgumentParser, *, task_help: str) -> None:
    p.add_argument("--task", default="", help=task_help)
    p.add_argument(
        "--priority",
        choices=("system", "foreground", "background"),
        default=None,
        help="priority class (default: foreground)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole m4ctl command line."""
    parser = Parser(
        prog=PROG,
        description="Use and administer m4d, the daemon serving the on-device M4 model.",
        epilog="Exit codes: 0 ok, 1 call or image error, 2 usage error, 130 interrupted.",
    )
    _global_flags(parser, suppress=False)
    common = Parser(add_help=False)
    _global_flags(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, sub_: argparse._SubParsersAction[Parser] = sub) -> Parser:
        return sub_.add_parser(name, help=help, description=help, parents=[common])

    p = add("generate", "Continue a prompt; streams text to stdout as it arrives.")
    p.add_argument("prompt", metavar="PROMPT")
    _sampling_flags(p)
    _call_flags(p, task_help="task id (default: generate)")
    p.add_argument("--stats", action="store_true", help="print usage and timings to stderr")

    p = add("chat", "Chat with the model: interactive on stdin, or one turn with --message.")
    p.add_argument("--system", metavar="TEXT", help="system message opening the conversation")
    p.add_argument("--message", "-m", metavar="TEXT", help="send one user message and exit")
    _sampling_flags(p)
    _call_flags(p, task_help="task id (default: chat)")
    p.add_argument("--stats", action="store_true", help="print usage and timings to stderr")

    p = add("embed", "Embed texts; prints one line per text (first dims and norm).")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    _call_flags(p, task_help="task id (default: embed)")

    p = add("classify", "Rank labels for a text, best first.")
    p.add_argument("text", metavar="TEXT")
    p.add_argument(
        "--labels",
        "-l",
        action="append",
        default=[],
        metavar="A,B,C",
        help="candidate labels, comma-separated (repeatable; optional if the task has labels)",
    )
    _call_flags(p, task_help="task id (default: classify)")

    p = add("predict-next", "Predict the next words after a text (M4 T1).")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("-n", type=int, default=0, metavar="N", help="how many words (default 5)")
    _call_flags(p, task_help="task id (default: predict-next)")

    p = add("transcribe", "Transcribe speech in a WAV file (or raw PCM with --rate).")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--rate", type=int, default=0, metavar="HZ",
                   help="FILE is raw 16-bit little-endian mono PCM at HZ, not WAV")
    _call_flags(p, task_help="task id (default: transcribe)")

    p = add("keywords", "Which keywords are spoken in a WAV file.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--keywords", "-k", action="append", required=True, metavar="A,B,C",
                   help="words or phrases to listen for, comma-separated (repeatable)")
    p.add_argument("--rate", type=int, default=0, metavar="HZ",
                   help="FILE is raw 16-bit little-endian mono PCM at HZ, not WAV")
    _call_flags(p, task_help="task id (default: keyword-spot)")

    p = add("ocr", "Read the text in an image (PNG, JPEG, WebP).")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--boxes", action="store_true", help="print each text box with its corners")
    _call_flags(p, task_help="task id (default: ocr)")

    p = add("ask", "Ask about the text in an image or about a WAV file; the answer streams.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", metavar="FILE", help="an image whose text is read first")
    source.add_argument("--audio", metavar="FILE", help="a WAV file that is transcribed first")
    p.add_argument("question", metavar="QUESTION")
    p.add_argument("--show-source", action="store_true",
                   help="print what was read or heard before the answer")
    _call_flags(p, task_help="task id (default: ocr-ask for --image, speech-ask for --audio)")
    _sampling_flags(p)

    add("tasks", "List the active image's tasks.")
    add("wait", "Wait until the daemon serves (model loaded, self-test passed); "
        "--timeout bounds the wait (default 300 s).")

    p = add("run", "Run any task by id with named inputs; prints its (streamed) output.")
    p.add_argument("task", metavar="TASK")
    p.add_argument(
        "--input",
        "-i",
        action="append",
        default=[],
        dest="inputs",
        metavar="NAME=VALUE",
        help="an input (repeatable); NAME=@FILE reads a file",
    )
    p.add_argument("-n", "--num-predictions", type=int, default=0, metavar="N")
    p.add_argument(
        "--priority",
        choices=("system", "foreground", "background"),
        default=None,
    )
    _sampling_flags(p)

    add("status", "Show what the daemon runs and how busy it is (admin socket).")

    image = add("image", "Build and verify firmware images.")
    image_sub = image.add_subparsers(dest="image_command", metavar="VERB", required=True)
    p = add("build", "Build a firmware image.", image_sub)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--default", action="store_true", help="the default M4 image")
    kind.add_argument("--gguf", metavar="FILE", help="a Llama-family backbone from a GGUF file")
    kind.add_argument("--hf", metavar="DIR",
                      help="a Llama backbone from a Hugging Face checkpoint folder")
    p.add_argument("--encoder", metavar="DIR",
                   help="a sentence-transformers text encoder folder")
    p.add_argument("--speech", metavar="DIR",
                   help="a Whisper speech model: a CTranslate2 folder (model.bin) or a Hugging "
                   "Face folder")
    p.add_argument("--ocr", metavar="DIR",
                   help="an OCR model: a folder with EasyOCR's craft_mlt_25k.pth and english_g2.pth")
    p.add_argument("--clip", metavar="DIR",
                   help="a Hugging Face CLIP folder (image classification, retrieval, embedding)")
    p.add_argument("--sensor", metavar="DIR",
                   help="a sensor-window classifier head (config.json + model.safetensors)")
    kind.add_argument("--vlm", metavar="DIR",
                      help="a LLaVA (Hugging Face) or MobileVLM folder: vision encoder, projector "
                      "and backbone (image + question -> answer)")
    p.add_argument("--name", default="m4-custom", help="the image's name (not with --default)")
    p.add_argument("--version", default="1.0.0", help="the image's version")
    p.add_argument("--security-version", type=int, default=1,
                   help="the anti-rollback counter")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="image directory")
    p.add_argument("--force", action="store_true", help="replace an existing DIR")
    p = add("verify", "Verify a firmware image directory (signature, then every file).", image_sub)
    p.add_argument("dir", metavar="DIR")
    from . import _image  # image sign, image verify --keys, keys ...

    _image.register(sub, parents=[common])

    from . import _top  # top

    _top.register(sub, parents=[common])

    from . import _doctor  # doctor

    _doctor.register(sub, parents=[common])
    return parser

"""m4ctl entry point: parse, run one command, turn every failure into one line and an exit code.

Exit codes: 0 success; 1 a call or image operation failed (`m4ctl: error: CODE: message`);
2 a usage error; 130 interrupted (Ctrl-C cancels the running call first); 141 stdout closed
early (`m4ctl generate ... | head`), which ends the call quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from m4client import M4Error

from . import _admin, _user
from ._output import err
from ._parser import EXIT_USAGE, PROG, UsageError, build_parser

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

Command = Callable[[argparse.Namespace], int]

COMMANDS: dict[str, Command] = {
    "generate": _user.cmd_generate,
    "chat": _user.cmd_chat,
    "embed": _user.cmd_embed,
    "classify": _user.cmd_classify,
    "predict-next": _user.cmd_predict_next,
    "tasks": _user.cmd_tasks,
    "wait": _user.cmd_wait,
    "run": _user.cmd_run,
    "transcribe": _user.cmd_transcribe,
    "keywords": _user.cmd_keywords,
    "ocr": _user.cmd_ocr,
    "ask": _user.cmd_ask,
    "status": _admin.cmd_status,
    "image build": _admin.cmd_image_build,
    "image verify": _admin.cmd_image_verify,
}


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests): nothing to redirect
        pass
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run m4ctl with `argv` (default: sys.argv[1:]) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    name = args.command + (f" {args.image_command}" if args.command == "image" else "")
    try:
        return (getattr(args, "handler", None) or COMMANDS[name])(args)
    except M4Error as exc:
        err(f"{PROG}: error: {exc}")
        return EXIT_ERROR
    except _admin.ImageToolError as exc:
        err(f"{PROG}: error: {exc}")
        return EXIT_ERROR
    except UsageError as exc:
        err(f"{PROG}: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        err(f"{PROG}: error: {exc}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

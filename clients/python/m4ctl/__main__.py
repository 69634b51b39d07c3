"""m4ctl entry point: build the command line from its nouns, run one command, turn every
failure into one line and an exit code.

One module per noun (or group of verbs) adds its commands with `register()`; each command's
parser carries its function as `handler`, and `main()` calls it: the only dispatch.

Exit codes: 0 success; 1 a call or image operation failed (`m4ctl: error: CODE: message`);
2 a usage error; 130 interrupted (Ctrl-C cancels the running call first); 141 stdout closed
early (`m4ctl generate ... | head`), which ends the call quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from m4client import M4Error

from . import _adapter, _doctor, _image, _keys, _media, _status, _top, _user
from ._output import err
from ._parser import EXIT_USAGE, PROG, root
from ._tools import ToolError, UsageError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

#: The nouns, in the order `m4ctl --help` lists their commands.
NOUNS = (_user, _media, _status, _top, _image, _adapter, _keys, _doctor)


def build_parser() -> argparse.ArgumentParser:
    """The whole m4ctl command line."""
    parser, sub, common = root()
    for noun in NOUNS:
        noun.register(sub, parents=[common])
    return parser


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
    try:
        code: int = args.handler(args)
        return code
    except (M4Error, ToolError) as exc:
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

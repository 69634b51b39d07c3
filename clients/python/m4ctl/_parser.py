"""The pieces of m4ctl's command line every noun uses: the parser class, the global flags, the
sampling and call flags, and `command()`, which adds one command with its handler.

Global flags are accepted before or after the subcommand (`m4ctl --json tasks` and
`m4ctl tasks --json` mean the same). Parse errors print one line and exit 2. Each command's
parser carries its function as `handler`, the one way `m4ctl.__main__` dispatches.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

PROG = "m4ctl"
EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int]
#: The subcommand action of a parser (argparse keeps its class private).
Subparsers = Any


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `m4ctl: error: ... (see ... --help)`."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def global_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The flags every command takes; on subparsers they only override when given."""

    def d(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    g = parser.add_argument_group("global options")
    g.add_argument("--address", default=d(None), metavar="ADDR",
                   help="app socket (gRPC target or path; env M4_ADDRESS, default "
                   "unix:///run/m4/app.sock)")
    g.add_argument("--admin-address", default=d(None), metavar="ADDR",
                   help="admin socket (env M4_ADMIN_ADDRESS, default unix:///run/m4/admin.sock)")
    g.add_argument("--timeout", type=positive_float, default=d(None), metavar="SECONDS",
                   help="deadline of each call (default: none)")
    g.add_argument("--json", action="store_true", default=d(False),
                   help="print responses as protobuf JSON, one message per line")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False),
                   help="print only the essential output")
    g.add_argument("--app-name", default=d(os.environ.get("M4_APP_NAME", PROG)), metavar="NAME",
                   help="label sent as m4-app-name metadata (default: m4ctl)")


def sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, metavar="N", help="most tokens to generate")
    g.add_argument("--temperature", type=float, metavar="T", help="0 = greedy")
    g.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, in (0, 1]")
    g.add_argument("--top-k", type=int, metavar="K", help="keep the K likeliest tokens")
    g.add_argument("--seed", type=int, metavar="S", help="sampler seed (reproducible output)")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop before this string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="generate past end-of-sequence")


def priority_flag(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--priority", choices=("system", "foreground", "background"), default=None,
                   help=help)


def call_flags(p: argparse.ArgumentParser, *, task_help: str) -> None:
    p.add_argument("--task", default="", help=task_help)
    priority_flag(p, "priority class (default: foreground)")


def command(sub: Subparsers, name: str, help: str, parents: Sequence[argparse.ArgumentParser],
            handler: Command | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """Adds `name` to `sub`, with the global flags (`parents`) and its handler."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help,
                                                parents=list(parents), **kwargs)
    if handler is not None:
        p.set_defaults(handler=handler)
    return p


def verbs(noun: argparse.ArgumentParser, name: str) -> Subparsers:
    """The verbs of a noun (`image build`, `keys add`): one of them is required."""
    return noun.add_subparsers(dest=f"{name}_command", metavar="VERB", required=True)


def root() -> tuple[Parser, Subparsers, Parser]:
    """The top-level parser, its subcommands and the parser of the global flags that every
    command takes as a parent."""
    parser = Parser(
        prog=PROG,
        description="Use and administer m4d, the daemon serving the on-device M4 model.",
        epilog="Exit codes: 0 ok, 1 call or image error, 2 usage error, 130 interrupted.",
    )
    global_flags(parser, suppress=False)
    common = Parser(add_help=False)
    global_flags(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    return parser, sub, common

"""What m4ctl's commands share besides the parser: the clients the global flags describe, the
two failures a command raises besides `M4Error`, and the daemon side's tools, imported only
by the commands that need them.

m4ctl ships with the light client (mobilefm-client: grpcio and protobuf only). Building an
image needs torch (`m4d.builder`), and signing, verifying and the keyring need the image
format (`m4image`); both come with the daemon's distribution, `mobilefm`. A command that
needs them imports them through `daemon_side()`, which says what to install when they are
not there, and every other command works without them.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from m4client import AdminClient, Client


class UsageError(Exception):
    """A bad command line found after parsing (exit code 2)."""


class ToolError(Exception):
    """A local tool (image build, sign, verify, keys) failed; the message is the whole story
    (exit code 1)."""


def daemon_side(module: str, command: str) -> ModuleType:
    """`module` of the daemon's distribution, imported now; ToolError naming what to install
    when it is not installed here."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or module
        raise ToolError(
            f"`m4ctl {command}` needs the daemon side of MobileFM (the mobilefm distribution), "
            f"and {missing} is not installed here: install it from a MobileFM clone "
            "(`make setup`, or `pip install ./clients/python .`), or use the m4ctl installed "
            "with m4d") from None


@contextmanager
def tool_errors(*errors: type[Exception]) -> Iterator[None]:
    """Turns the given exceptions (a tool's own errors, whose message says what to do) into
    ToolError, so they end m4ctl with one line and exit code 1."""
    try:
        yield
    except errors as exc:
        raise ToolError(str(exc)) from None


def app_client(args: argparse.Namespace) -> Client:
    """The app-socket client the global flags describe."""
    return Client(args.address, app_name=args.app_name or None, timeout=args.timeout)


def admin_client(args: argparse.Namespace, timeout: float | None = None) -> AdminClient:
    """The admin-socket client the global flags describe (`timeout`: when --timeout is not
    given)."""
    return AdminClient(args.admin_address, app_name=args.app_name or None,
                       timeout=args.timeout or timeout)

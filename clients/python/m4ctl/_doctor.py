"""`m4ctl doctor`: checks an installation of m4d and says how to fix what is wrong.

The operator's first stop: one line per check (`ok`, `warn` or `FAIL`, what was found and
the fix), in the order a request meets them: the configuration, the sockets and whether
the daemon answers on them, the image it serves, the trusted keys, the devices the daemon
runs on, the systemd units and the state directory. Exit 0 when no check failed, 1
otherwise; `--json` prints one JSON object per check. `--root DIR` checks an installation
staged under DIR (a DESTDIR or a container's root) instead of the running system.

It needs only the light client: the checks read files and ask the daemon (gRPC health,
Admin Status), and never import the daemon's code (`_doctor_system`, `_doctor_daemon`,
`_doctor_files`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import _output as out
from ._doctor_daemon import check_accelerators, check_config, check_sockets
from ._doctor_files import check_image, check_keys, check_state_dir, check_units
from ._doctor_system import Check, Context
from ._parser import Parser, command, global_flags

DEFAULT_TIMEOUT = 3.0
DEFAULT_CONFIG = Path("/etc/m4/m4d.toml")
_LABEL = {"ok": "ok", "warn": "warn", "fail": "FAIL"}

CHECKS: tuple[Callable[[Context], Iterable[Check]], ...] = (
    check_config, check_sockets, check_image, check_keys, check_accelerators, check_units,
    check_state_dir,
)


def run_checks(ctx: Context) -> list[Check]:
    """Every check in order; a check that crashes becomes a FAIL line, not a traceback."""
    results: list[Check] = []
    for check in CHECKS:
        try:
            results.extend(check(ctx))
        except Exception as exc:  # a bug or an odd system must not hide the other checks
            name = check.__name__.removeprefix("check_").replace("_", " ")
            results.append(Check(name, "fail", f"the check itself failed: "
                                 f"{type(exc).__name__}: {exc}", "report this as a bug"))
    return results


# ---- command line ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, metavar="FILE",
                   help="the daemon's config file (default /etc/m4/m4d.toml)")
    p.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                   help="check the installation under DIR (a DESTDIR or a container's root)")


DESCRIPTION = ("Check the installation: config, sockets, image, keys, accelerators, units, "
               "state directory; one line per check with the fix.")
EPILOG = "Exit codes: 0 no check failed (warnings allowed), 1 a check failed."


def register(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()
             ) -> argparse.ArgumentParser:
    """Adds `doctor` to m4ctl's subcommands (`parents`: the parser of the global flags)."""
    p = command(sub, "doctor", DESCRIPTION, parents, cmd_doctor, epilog=EPILOG)
    add_arguments(p)
    return p


def cmd_doctor(args: argparse.Namespace) -> int:
    root = Path(getattr(args, "root", None) or "/")
    live = root == Path("/")  # the environment's addresses are the running system's
    ctx = Context(root=root, config_file=getattr(args, "config", None) or DEFAULT_CONFIG,
                  app_address=getattr(args, "address", None) or (
                      os.environ.get("M4_ADDRESS") if live else None),
                  admin_address=getattr(args, "admin_address", None) or (
                      os.environ.get("M4_ADMIN_ADDRESS") if live else None),
                  timeout=getattr(args, "timeout", None) or DEFAULT_TIMEOUT)
    results = run_checks(ctx)
    as_json, quiet = getattr(args, "json", False), getattr(args, "quiet", False)
    for r in results:
        if as_json:
            out.write(json.dumps(asdict(r)) + "\n")
        elif r.status != "ok" or not quiet:
            fix = f" (fix: {r.fix})" if r.fix else ""
            out.write(f"{_LABEL[r.status]:<5} {r.check:<13} {r.detail}{fix}\n")
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "warn", "fail")}
    if not as_json and not quiet:
        out.err(f"m4ctl doctor: {counts['ok']} ok, {counts['warn']} warn, {counts['fail']} FAIL")
    return 1 if counts["fail"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m m4ctl._doctor`: the same command as `m4ctl doctor`."""
    parser = Parser(prog="m4ctl doctor", description=DESCRIPTION, epilog=EPILOG)
    global_flags(parser, suppress=False)
    add_arguments(parser)
    return cmd_doctor(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

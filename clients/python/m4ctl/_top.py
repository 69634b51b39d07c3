"""`m4ctl top`: a live view of the daemon's load over the admin socket.

Each frame comes from one Admin Status call: queues per priority class, the running batch
and KV memory, decode tokens/s and time to first token, the devices, and one row per
caller uid (the kernel's uid, with the app names it sent as labels) with its share of the
recent tokens/s. Plain ANSI (home + clear) on a terminal, frames one after another
otherwise. `--once` prints one frame and exits; `--json` prints one frame as a JSON object
and exits. An unreachable daemon is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from m4client import AdminClient, DaemonStatus, M4Error, UidUsage

from . import _output as out
from ._parser import command
from ._tools import admin_client

DEFAULT_TIMEOUT = 5.0
CLEAR = "\x1b[H\x1b[2J"
BOLD, RESET = "\x1b[1m", "\x1b[0m"
CLASSES = ("system", "foreground", "background")


class TopError(Exception):
    """The daemon cannot be asked (exit code 1, one line)."""


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds (got {text})")
    return value


def register(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Adds `top` to m4ctl's subcommands (`parents`: the parser of the global flags)."""
    p = command(sub, "top", "Live view of queues, the running batch, per-app shares and "
                "tokens/s (admin socket).", parents, cmd_top)
    p.add_argument("--interval", type=_positive, default=1.0, metavar="SECONDS",
                   help="seconds between frames (default 1)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")


def shares(uids: Sequence[UidUsage]) -> dict[int, float]:
    """Each uid's share of the recent tokens/s (of all tokens out when nobody is generating)."""
    rate = sum(u.tokens_per_second for u in uids)
    if rate > 0:
        return {u.uid: u.tokens_per_second / rate for u in uids}
    total = sum(u.tokens_out for u in uids)
    return {u.uid: (u.tokens_out / total if total else 0.0) for u in uids}


def frame_dict(s: DaemonStatus) -> dict[str, Any]:
    """One frame as plain data (what --json prints)."""
    share = shares(s.uids)
    return {
        "time": time.time(),
        "daemon": {"version": s.daemon_version, "state": s.state,
                   "uptime_seconds": s.uptime_seconds, "image": s.image_name,
                   "image_version": s.image_version},
        "requests": {"in_flight": s.requests_in_flight, "total": s.requests_total,
                     "cancelled": s.requests_cancelled, "rejected": s.requests_rejected},
        "load": dataclasses.asdict(s.load) if s.load is not None else None,
        "devices": [{"name": d.name, "components": d.components, "executor": d.executor}
                    for d in s.devices],
        "uids": [dict(dataclasses.asdict(u), share=round(share.get(u.uid, 0.0), 4))
                 for u in s.uids],
    }


def render(s: DaemonStatus, *, color: bool = False) -> str:
    """One frame as text."""
    b, r = (BOLD, RESET) if color else ("", "")
    image = f"{s.image_name} {s.image_version}".strip() or "-"
    lines = [f"{b}m4d {s.daemon_version}{r}  {s.state}  up {out.human_duration(s.uptime_seconds)}"
             f"  image {image}  {time.strftime('%H:%M:%S')}"]
    load = s.load
    if load is None:
        lines.append("the model is loading: no engine yet")
        return "\n".join(lines) + "\n"
    queues = "  ".join(f"{c} {load.queues.get(c, 0)}" for c in CLASSES)
    lines.append(f"queues    {queues}   in flight {s.requests_in_flight}, "
                 f"rejected {s.requests_rejected:,}, cancelled {s.requests_cancelled:,}")
    kv = (f"{load.kv_blocks_used}/{load.kv_blocks_total} KV blocks "
          f"({100 * load.kv_blocks_used / load.kv_blocks_total:.0f}%)"
          if load.kv_blocks_total else "no KV pool")
    lines.append(f"batch     {load.running_sequences} running / {s.kv_slots} rows, "
                 f"last decode step {load.decode_batch_size}, {kv}")
    ttft = (f"TTFT p50 {load.ttft_p50_ms:.0f} ms  p99 {load.ttft_p99_ms:.0f} ms "
            f"(last {load.ttft_samples})" if load.ttft_samples else "TTFT -")
    lines.append(f"rate      {load.decode_tokens_per_second:.1f} tok/s decode "
                 f"({load.window_seconds:g} s window)   {ttft}")
    used = [f"{d.name}: {', '.join(d.components)}" for d in s.devices if d.components]
    if used:
        lines.append("devices   " + "   ".join(used))
    lines.append("")
    share = shares(s.uids)
    rows = [("UID", "USER", "APPS", "CLASS", "INFL", "QUEUED", "OK", "FAIL", "REJ", "TOK_IN",
             "TOK_OUT", "TOK/S", "SHARE")]
    for u in sorted(s.uids, key=lambda u: (-u.tokens_per_second, -u.tokens_out, u.uid)):
        rows.append((str(u.uid), u.user or "-", ",".join(u.apps) or "-",
                     u.priority_class or "-", str(u.in_flight), str(u.queued),
                     str(u.requests_ok), str(u.requests_failed), str(u.requests_rejected),
                     str(u.tokens_in), str(u.tokens_out), f"{u.tokens_per_second:.1f}",
                     f"{100 * share.get(u.uid, 0.0):.0f}%"))
    table = out.table(rows)
    lines.append(f"{b}{table[0]}{r}")
    lines += table[1:] if len(rows) > 1 else ["(no callers yet)"]
    return "\n".join(lines) + "\n"


def _status(admin: AdminClient) -> DaemonStatus:
    try:
        return admin.status()
    except M4Error as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if getattr(exc, "code", "") == "UNAVAILABLE":
            detail = detail.rpartition("error: ")[2] or detail  # the OS's reason, last
            raise TopError(f"m4d is not reachable at {admin.target} ({detail}); is it "
                           "running? (--admin-address or M4_ADMIN_ADDRESS)") from None
        raise TopError(f"status from {admin.target} failed: {detail}") from None


def cmd_top(args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty()
    try:
        with admin_client(args, DEFAULT_TIMEOUT) as admin:
            if args.json:
                out.write(json.dumps(frame_dict(_status(admin))) + "\n")
                return 0
            if args.once:
                out.write(render(_status(admin)))
                return 0
            while True:
                started = time.monotonic()
                text = render(_status(admin), color=tty)
                out.write((CLEAR + text) if tty else (text + "\n"))
                time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    except TopError as exc:
        out.err(f"m4ctl: error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 0

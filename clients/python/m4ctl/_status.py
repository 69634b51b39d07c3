"""`m4ctl status`: what the daemon runs and how busy it is, from one Admin Status call.

The image and the daemon, memory, request and token counters, the components and where they
run, the devices, the engine's load and the use per caller uid. `-q` prints the image and
the state; `--json` the Status message as protobuf JSON. `m4ctl top` shows the same live.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from m4client import DaemonStatus

from . import _output as out
from ._parser import command
from ._tools import admin_client


def register(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Adds `status` to m4ctl's subcommands (`parents`: the parser of the global flags)."""
    command(sub, "status", "Show what the daemon runs and how busy it is (admin socket).",
            parents, cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        s = admin.status()
    if args.json:
        out.json_line(s.raw)
        return 0
    rows = [
        ("image", f"{s.image_name} {s.image_version}".strip() or "-"),
        ("digest", s.image_digest or "-"),
        (
            "daemon",
            f"{s.daemon_version or '?'}, {s.state}, up {out.human_duration(s.uptime_seconds)}",
        ),
        ("memory", f"{out.human_bytes(s.memory_rss_bytes)} RSS, {s.threads} threads"),
        *([] if s.memory is None else [
            ("  weights", f"{out.human_bytes(s.memory.weights_mapped_bytes)} mapped from the "
                          f"image ({out.human_bytes(s.memory.weights_mapped_resident_bytes)} "
                          f"resident), {out.human_bytes(s.memory.weights_converted_bytes)} "
                          "converted at load"),
            ("  kv cache", f"{out.human_bytes(s.memory.kv_resident_bytes)} in use, budget "
                           f"{out.human_bytes(s.memory.kv_budget_bytes)} (reserved "
                           f"{out.human_bytes(s.memory.kv_reserved_bytes)} of address space)"),
            ("  runtime", f"{out.human_bytes(s.memory.runtime_bytes)} (Python, torch, gRPC, "
                          "activations, parked and cached prompt KV)"),
        ]),
        (
            "requests",
            f"{s.requests_in_flight} in flight, {s.requests_total:,} total, "
            f"{s.requests_cancelled:,} cancelled ({s.requests_stalled:,} stalled), "
            f"{s.requests_rejected:,} rejected",
        ),
        ("tokens", f"{s.tokens_generated:,} generated, {s.tokens_prompted:,} prompted, "
                   f"{s.prefix_tokens_reused:,} from the prefix cache "
                   f"({s.prefix_cache_tokens:,} held)"),
        ("sequences", f"{s.active_sequences} active / {s.kv_slots} KV slots"),
    ]
    if args.quiet:
        rows = [rows[0], ("state", s.state)]
    width = max(len(k) for k, _ in rows) + 1
    lines = [f"{k + ':':<{width}} {v}" for k, v in rows]
    if s.components and not args.quiet:
        lines.append("components:")
        comp = [
            (
                c.name,
                c.kind,
                f"{out.human_count(c.parameters)} params",
                f"{c.weight_format}/{c.compute_dtype}" + (f" ({c.kernels})" if c.kernels else ""),
                c.device,
            )
            for c in s.components
        ]
        lines += ["  " + line for line in out.table(comp)]
    if not args.quiet:
        lines += _load_lines(s)
    out.write("".join(line + "\n" for line in lines))
    return 0


def _load_lines(s: DaemonStatus) -> list[str]:
    """Devices and placement, engine load, and per-uid usage (from the same Status)."""
    lines: list[str] = []
    if s.devices:
        lines.append("devices:")
        rows: list[tuple[str, ...]] = [(d.name, d.description or "-",
                 f"{d.cores} cores" if d.cores else out.human_bytes(d.memory_bytes),
                 " ".join(d.flags) or "-",
                 ("runs " + ", ".join(d.components) + f" ({d.executor})") if d.components
                 else "unused")
                for d in s.devices]
        lines += ["  " + line for line in out.table(rows)]
    load = s.load
    if load is not None:
        queues = ", ".join(f"{c} {n}" for c, n in load.queues.items())
        lines.append(f"queues: {queues}")
        lines.append(f"batch: {load.running_sequences} running ({load.paused_sequences} "
                     "paused for their readers), last decode step "
                     f"{load.decode_batch_size}, KV blocks {load.kv_blocks_used}/"
                     f"{load.kv_blocks_total}")
        lines.append(f"rate: {load.decode_tokens_per_second:.1f} tok/s decode over "
                     f"{load.window_seconds:g} s; TTFT p50 {load.ttft_p50_ms:.0f} ms, p99 "
                     f"{load.ttft_p99_ms:.0f} ms ({load.ttft_samples} samples)")
        cap = load.uid_limits

        def limit(n: int) -> str:
            return f"{n:,}" if n else "no limit"

        lines.append(f"per-uid caps: {limit(cap.max_in_flight)} in flight, "
                     f"{limit(cap.max_queued)} queued, {limit(cap.max_running)} KV slots, "
                     f"{limit(cap.max_tokens_in_flight)} tokens in flight")
    if s.uids:
        lines.append("callers:")
        rows = [("uid", "user", "apps", "class", "ok", "failed", "rejected", "tokens in",
                 "tokens out", "tok/s", "in flight", "queued", "slots", "tokens held",
                 "preempted", "stalled")]
        rows += [(str(u.uid), u.user or "-", ",".join(u.apps) or "-", u.priority_class or "-",
                  str(u.requests_ok), str(u.requests_failed), str(u.requests_rejected),
                  f"{u.tokens_in:,}", f"{u.tokens_out:,}", f"{u.tokens_per_second:.1f}",
                  str(u.in_flight), str(u.queued), str(u.running), f"{u.tokens_in_flight:,}",
                  str(u.preempted), str(u.stalled)) for u in s.uids]
        lines += ["  " + line for line in out.table(rows)]
    return lines

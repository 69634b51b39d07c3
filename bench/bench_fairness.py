"""Benchmark (outside the serving pipeline): fairness between apps on a real m4d (issue 15),
measured in one run and printed as one table with the issue's targets.

Starts a real `m4d` subprocess on a temporary socket with the daemon's default settings
(16 KV slots, the default per-uid caps) and drives it from apps that are separate processes
running as separate uids (the bench runs as root; each app drops to its uid before it
connects, so the daemon's SO_PEERCRED identity tells them apart: `fairness.apps`):

1. **Isolation.** App B (uid 65534) sends 16-token requests one at a time, first alone,
   then while app A (uid 10001) floods the same priority class (foreground) with 14 streams
   of 512 tokens, 10 read and restarted as they end, 4 never read; A also floods alone, in
   alternating order over two rounds (`--quick`: one). Targets: B's time to first token p99
   <= 2x its idle p99; A's decode rate (tokens its read streams received per second,
   pooled over the rounds) with B >= 90% of A alone.
2. **Equal share.** Four apps with equal weights flood at once (8 streams of 256 tokens
   each, restarted); Jain's fairness index over the tokens each received in every 10 s
   window. Target: >= 0.95 in every window (min and median reported).
3. **Burst.** 64 calls from four apps at the same instant, each with a 2 s deadline: two
   thirds Generate of 64 tokens, one third Embed of 8 short texts. Targets: every Embed
   succeeds; refused calls (quota, queue, or a deadline they cannot meet) are refused in
   under 50 ms; no accepted call misses its deadline by more than one step (a late
   Generate's missing tokens are the steps it still needed; at the measured step time).
4. **Memory.** 24 unread streams (4 from each of six apps) held 60 s (`--quick`: 20 s)
   while B probes: the daemon's RSS and KV blocks (Admin Status, every second) start / max /
   end, and B's TTFT meanwhile against its idle p99.

Every section records how much CPU other processes used (the machine is shared) and warns
above 10%. `--quick` shortens every section (~2 min instead of ~4). Progress goes to
stderr, the table (or `--json`) to stdout. The sections live in bench/fairness/.

    python bench/bench_fairness.py --image build/images/default [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from benchkit.daemon import Daemon, read_manifest
from benchkit.inputs import distinct_prompts, make_sentences
from benchkit.options import add_image, add_json, add_self_test
from benchkit.report import emit, progress
from fairness import (
    APP_A,
    APP_B,
    BURST_CALLS,
    BURST_TEXTS,
    EQUAL_APPS,
    EQUAL_STREAMS,
    FLOOD_STREAMS,
    FLOOD_TOKENS,
    HOLDERS,
    PROBE_TOKENS,
    UNREAD_STREAMS,
)
from fairness.report import Measurements, render, summarise
from fairness.scenarios import Apps, Inputs, burst, equal_share, isolation, memory
from scheduling.priorities import foreground_prompts

log = progress("bench_fairness")
PROMPT_TOKENS = 32


def make_inputs(tokenizer: Any, probes: int) -> Inputs:
    pool = distinct_prompts(tokenizer, BURST_CALLS, PROMPT_TOKENS)
    per_holder = UNREAD_STREAMS // len(HOLDERS)
    sentences = make_sentences(BURST_CALLS * BURST_TEXTS, seed=3)
    return Inputs(
        flood_prompts=pool[:FLOOD_STREAMS],
        equal_prompts=[pool[i * EQUAL_STREAMS:(i + 1) * EQUAL_STREAMS]
                       for i in range(len(EQUAL_APPS))],
        probe_prompts=foreground_prompts(probes),
        burst_prompts=pool,
        burst_texts=[[" ".join(s.split()[:6]) for s in sentences[i * BURST_TEXTS:
                                                                 (i + 1) * BURST_TEXTS]]
                     for i in range(BURST_CALLS)],
        unread_prompts=[pool[-(i + 1) * per_holder:len(pool) - i * per_holder]
                        for i in range(len(HOLDERS))])


async def measure(args: argparse.Namespace, daemon: Daemon, inputs: Inputs,
                  apps: Apps) -> dict[str, Any]:
    from m4client.aio import AsyncAdminClient

    await apps.up()
    pids = [os.getpid(), daemon.proc.pid, *apps.pids]  # ours: the rest is "other processes"
    async with AsyncAdminClient(daemon.admin_address) as admin:
        status = await admin.status(timeout=10)
    limits = status.load.uid_limits if status.load else None
    config = {"kv_slots": status.kv_slots}
    inputs.kv_slots = status.kv_slots
    if limits is not None:
        config |= {"uid_max_concurrent": limits.max_in_flight,
                   "uid_max_queued": limits.max_queued, "uid_max_running": limits.max_running,
                   "uid_max_tokens_in_flight": limits.max_tokens_in_flight}
        inputs.max_running = limits.max_running or status.kv_slots
    log("warm-up")
    await apps[APP_A].start("flood", prompts=inputs.flood_prompts[:8], max_tokens=FLOOD_TOKENS,
                            unread=0)
    await asyncio.sleep(3.0)
    await apps[APP_A].stop()
    await apps[APP_B].start("probes", prompts=inputs.probe_prompts, max_tokens=PROBE_TOKENS,
                            count=4)
    await apps[APP_B].stop()
    await asyncio.sleep(1.0)

    got: dict[str, Any] = {"config": config, "preempted": {}}
    sections = {
        "isolation": lambda: isolation(apps, inputs, args.probes, args.seconds, args.rounds,
                                       pids),
        "equal": lambda: equal_share(apps, inputs, args.windows, pids),
        "burst": lambda: burst(apps, inputs, pids),
        "memory": lambda: memory(apps, inputs, daemon.admin_address, args.hold, pids)}
    async with AsyncAdminClient(daemon.admin_address) as admin:
        for name, section in sections.items():
            before = await preemptions(admin)
            got[name] = await section()
            got["preempted"][name] = await preemptions(admin) - before
        status = await admin.status(timeout=10)
    got["uids"] = {u.uid: (u.requests_ok, u.requests_failed, u.requests_rejected, u.preempted)
                   for u in status.uids}
    return got


async def preemptions(admin: Any) -> int:
    """Sequences preempted so far, over all uids (Admin Status)."""
    status = await admin.status(timeout=10)
    return sum(u.preempted for u in status.uids)


def run(args: argparse.Namespace) -> Measurements:
    if os.geteuid() != 0:
        raise SystemExit("bench_fairness runs as root: its apps are processes that drop to "
                         "other uids (the daemon tells apps apart by uid)")
    image = args.image.resolve()
    manifest = read_manifest(image)
    inputs = make_inputs(image / manifest["components"]["backbone"]["tokenizer"],
                         max(args.probes, 64))
    with Daemon(image, None, args.self_test, other_uids=True) as daemon:
        log(f"started m4d (pid {daemon.proc.pid}); starting the apps")
        apps = Apps(daemon.address)
        apps.spawn([APP_A, APP_B, *EQUAL_APPS, *HOLDERS])
        try:
            serving = daemon.ready()
            log(str(serving))
            got = asyncio.run(measure(args, daemon, inputs, apps))
        finally:
            apps.close()
    return Measurements(serving.load_s, serving.kernel_variant, serving.failed_checks, **got)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_image(parser)
    parser.add_argument("--quick", action="store_true",
                        help="shorter sections: ~2 min instead of ~4")
    add_self_test(parser)
    add_json(parser)
    args = parser.parse_args(argv)
    args.probes, args.seconds, args.rounds, args.windows, args.hold = (
        (12, 10.0, 1, 2, 20.0) if args.quick else (24, 15.0, 2, 4, 60.0))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    emit(summarise(args, run(args)), render, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark (outside the serving pipeline): bench_fairness.py's four measurements, driving
the apps (`fairness.apps`, one process per uid) from the bench process.

1. `isolation`: B's short requests idle, then A's flood alone, then both (B's time to first
   token, A's decode rate from the tokens its read streams received);
2. `equal_share`: four apps flooding at once, their tokens per window;
3. `burst`: 64 calls with 2 s deadlines from four apps at the same instant;
4. `memory`: unread streams held while another app probes; the daemon's RSS and KV blocks
   sampled from the Admin Status every second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchkit.cpu import OtherCpuMeter
from benchkit.report import alternate, progress

from fairness import (
    APP_A,
    APP_B,
    BURST_CALLS,
    BURST_DEADLINE_S,
    BURST_TOKENS,
    EQUAL_APPS,
    EQUAL_STREAMS,
    EQUAL_TOKENS,
    FLOOD_TOKENS,
    FLOOD_UNREAD,
    HOLDERS,
    PROBE_TOKENS,
    UNREAD_TOKENS,
    WINDOW_S,
)
from fairness.apps import AppProcess
from fairness.jobs import FloodResult, Outcome, Probe

log = progress("bench_fairness")
SETTLE_S = 2.0


@dataclass
class Inputs:
    flood_prompts: list[str]  # A's streams (the first FLOOD_UNREAD are never read)
    equal_prompts: list[list[str]]  # per equal app
    probe_prompts: list[str]
    burst_prompts: list[str]
    burst_texts: list[list[str]]
    unread_prompts: list[list[str]]  # per holder
    kv_slots: int = 16  # the daemon's, once it serves
    max_running: int = 12  # KV slots one uid may hold (uid_max_running)

    def flood_ready(self, read: int, unread: int, apps: int = 1) -> int:
        """How many of an app's read streams decode at once when `apps` apps flood: its
        share of the slots, less what its unread streams hold."""
        share = min(self.max_running, self.kv_slots // apps)
        return max(1, min(read, share - unread - (1 if apps > 1 else 0)))


class Apps:
    """One AppProcess per uid, started on first use and kept for the run."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.procs: dict[int, AppProcess] = {}

    def __getitem__(self, uid: int) -> AppProcess:
        if uid not in self.procs:
            self.procs[uid] = AppProcess(self.address, uid, f"app-{uid}")
        return self.procs[uid]

    def spawn(self, uids: Sequence[int]) -> None:
        for uid in uids:
            self[uid]

    async def up(self) -> None:
        await asyncio.gather(*(p.up() for p in self.procs.values()))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def close(self) -> None:
        for proc in self.procs.values():
            proc.close()


def tokens_between(arrivals: list[tuple[float, int]], t0: float, t1: float) -> int:
    return sum(n for when, n in arrivals if t0 < when <= t1)


# ---------------------------------------------------------------- 1. isolation


@dataclass
class Isolation:
    idle: list[Probe]
    loaded: list[Probe]
    alone_tps: float  # A's read streams, tokens/s, pooled over the rounds
    with_b_tps: float
    floods: dict[str, list[FloodResult]]  # "A alone"/"A with B" -> per round
    window_s: float  # per phase and round
    cpu: dict[str, list[float]]  # phase -> other processes' share, per round


async def isolation(apps: Apps, inputs: Inputs, idle_probes: int, seconds: float, rounds: int,
                    pids: list[int]) -> Isolation:
    """B alone; then per round A alone and A with B (in the other order every other round),
    each for `seconds` after A's streams all decode."""
    a, b = apps[APP_A], apps[APP_B]
    cpu: dict[str, list[float]] = {"B alone": []}
    log(f"1. B alone: {idle_probes} requests of {PROBE_TOKENS} tokens")
    meter = OtherCpuMeter(pids)
    await b.start("probes", prompts=inputs.probe_prompts, max_tokens=PROBE_TOKENS,
                  count=idle_probes)
    idle: list[Probe] = await b.stop()
    cpu["B alone"].append(meter.other_share())
    flood = {"prompts": inputs.flood_prompts, "max_tokens": FLOOD_TOKENS, "unread": FLOOD_UNREAD,
             "ready_after": inputs.flood_ready(len(inputs.flood_prompts) - FLOOD_UNREAD,
                                               FLOOD_UNREAD)}
    floods: dict[str, list[FloodResult]] = {"A alone": [], "A with B": []}
    counted = {phase: [0, 0.0] for phase in floods}  # tokens, seconds
    loaded: list[Probe] = []
    for rep in range(rounds):
        for phase in alternate(("A alone", "A with B"), rep):
            log(f"1. round {rep + 1}/{rounds}, {phase}: {len(inputs.flood_prompts)} streams of "
                f"{FLOOD_TOKENS} tokens ({FLOOD_UNREAD} unread), {seconds:.0f} s")
            await a.start("flood", **flood)
            await asyncio.sleep(SETTLE_S)
            meter = OtherCpuMeter(pids)
            t0 = time.monotonic()
            if phase == "A with B":
                await b.start("probes", prompts=inputs.probe_prompts[rep::2],
                              max_tokens=PROBE_TOKENS, seed=rep + 1)
            await asyncio.sleep(seconds)
            t1 = time.monotonic()
            if phase == "A with B":
                loaded += await b.stop()
            cpu.setdefault(phase, []).append(meter.other_share())
            result: FloodResult = await a.stop()
            floods[phase].append(result)
            counted[phase][0] += tokens_between(result.arrivals, t0, t1)
            counted[phase][1] += t1 - t0
            await asyncio.sleep(SETTLE_S)  # the cancelled streams leave the daemon
    tps = {phase: tokens / secs for phase, (tokens, secs) in counted.items()}
    return Isolation(idle, loaded, tps["A alone"], tps["A with B"], floods, seconds, cpu)


# ---------------------------------------------------------------- 2. equal share


@dataclass
class EqualShare:
    windows: list[dict[int, int]]  # per window: uid -> tokens
    results: dict[int, FloodResult]
    cpu: float


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n sum x^2); 1 when all are equal."""
    squares = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * squares) if squares else 1.0


async def equal_share(apps: Apps, inputs: Inputs, windows: int, pids: list[int]) -> EqualShare:
    log(f"2. {len(EQUAL_APPS)} apps x {EQUAL_STREAMS} streams of {EQUAL_TOKENS} tokens, "
        f"{windows} windows of {WINDOW_S:.0f} s")
    ready = inputs.flood_ready(EQUAL_STREAMS, 0, len(EQUAL_APPS))
    await asyncio.gather(*(apps[uid].start("flood", prompts=prompts, max_tokens=EQUAL_TOKENS,
                                           unread=0, ready_after=ready)
                           for uid, prompts in zip(EQUAL_APPS, inputs.equal_prompts, strict=True)))
    await asyncio.sleep(SETTLE_S)
    meter = OtherCpuMeter(pids)
    t0 = time.monotonic()
    await asyncio.sleep(windows * WINDOW_S + 0.2)
    cpu = meter.other_share()
    results = dict(zip(EQUAL_APPS, await asyncio.gather(*(apps[uid].stop() for uid in EQUAL_APPS)),
                       strict=True))
    await asyncio.sleep(SETTLE_S)
    out = [{uid: tokens_between(r.arrivals, t0 + k * WINDOW_S, t0 + (k + 1) * WINDOW_S)
            for uid, r in results.items()} for k in range(windows)]
    return EqualShare(out, results, cpu)


# ---------------------------------------------------------------- 3. burst


@dataclass
class BurstRun:
    outcomes: list[Outcome]
    at: float
    cpu: float


async def burst(apps: Apps, inputs: Inputs, pids: list[int]) -> BurstRun:
    calls: dict[int, list[tuple[str, Any]]] = {uid: [] for uid in EQUAL_APPS}
    for i in range(BURST_CALLS):  # two thirds Generate, one third Embed, dealt to four apps
        call = (("embed", inputs.burst_texts[i]) if i % 3 == 2
                else ("generate", inputs.burst_prompts[i]))
        calls[EQUAL_APPS[i % len(EQUAL_APPS)]].append(call)
    log(f"3. burst of {BURST_CALLS} calls from {len(EQUAL_APPS)} apps, deadline "
        f"{BURST_DEADLINE_S:g} s")
    at = time.monotonic() + 1.0
    await asyncio.gather(*(apps[uid].start("burst", calls=c, at=at, deadline_s=BURST_DEADLINE_S,
                                           max_tokens=BURST_TOKENS)
                           for uid, c in calls.items()))
    meter = OtherCpuMeter(pids)
    await asyncio.sleep(max(0.0, at - time.monotonic()) + BURST_DEADLINE_S + 0.5)
    cpu = meter.other_share()
    outcomes = [o for got in await asyncio.gather(*(apps[uid].stop() for uid in calls))
                for o in got]
    await asyncio.sleep(SETTLE_S)
    return BurstRun(outcomes, at, cpu)


# ---------------------------------------------------------------- 4. memory


@dataclass
class Sample:
    t: float
    rss_mb: float
    kv_used: int
    kv_total: int
    running: int
    paused: int
    stalled: int
    generated: int
    preempted: int  # over all uids, since the daemon started


@dataclass
class MemoryRun:
    samples: list[Sample]
    probes: list[Probe]
    ended: dict[int, dict[str, int]]  # holder uid -> how its unread streams stood at the end
    seconds: float
    cpu: float
    notes: list[str] = field(default_factory=list)


async def _sample(admin: Any, t0: float) -> Sample:
    s = await admin.status(timeout=10)
    load = s.load
    return Sample(time.monotonic() - t0, s.memory_rss_bytes / 2**20,
                  load.kv_blocks_used if load else 0, load.kv_blocks_total if load else 0,
                  load.running_sequences if load else 0, load.paused_sequences if load else 0,
                  s.requests_stalled, s.tokens_generated, sum(u.preempted for u in s.uids))


async def memory(apps: Apps, inputs: Inputs, admin_address: str, seconds: float,
                 pids: list[int]) -> MemoryRun:
    from m4client.aio import AsyncAdminClient

    holders = HOLDERS[:len(inputs.unread_prompts)]
    n = sum(len(p) for p in inputs.unread_prompts)
    log(f"4. {n} unread streams of {UNREAD_TOKENS} tokens from {len(holders)} apps held "
        f"{seconds:.0f} s; B probes meanwhile")
    samples: list[Sample] = []
    async with AsyncAdminClient(admin_address) as admin:
        t0 = time.monotonic()
        samples.append(await _sample(admin, t0))
        meter = OtherCpuMeter(pids)
        await asyncio.gather(*(apps[uid].start("unread", prompts=prompts,
                                               max_tokens=UNREAD_TOKENS)
                               for uid, prompts in zip(holders, inputs.unread_prompts,
                                                       strict=True)))
        await apps[APP_B].start("probes", prompts=inputs.probe_prompts, max_tokens=PROBE_TOKENS,
                                seed=2)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(1.0, left))
            samples.append(await _sample(admin, t0))
        probes: list[Probe] = await apps[APP_B].stop()
        ended = dict(zip(holders, await asyncio.gather(*(apps[uid].stop() for uid in holders)),
                         strict=True))
        cpu = meter.other_share()
        await asyncio.sleep(SETTLE_S)
        samples.append(await _sample(admin, t0))  # after the streams were cancelled
    return MemoryRun(samples, probes, ended, seconds, cpu)

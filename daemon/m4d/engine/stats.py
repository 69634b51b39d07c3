"""Observability, the counting side: what the engine has done since start (`EngineStats`,
kept by the step loop) and what it is doing now (`EngineSnapshot`, a frozen copy taken
under the engine's lock). Status, metrics and usage read snapshots, never the engine's
fields. No torch, no grpc.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from m4d.requests import Priority

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))  # seconds
MAX_APPS = 8  # app labels kept per uid


@dataclass
class UidUsage:
    """What one caller uid has asked of the engine since start."""

    requests: int = 0  # admitted
    in_flight: int = 0
    rejected: int = 0
    failed: int = 0  # admitted, then cancelled, expired or failed
    tokens_prompted: int = 0  # of its finished requests
    tokens_generated: int = 0
    apps: set[str] = field(default_factory=set)  # labels it sent (a label, never an identity)
    priority: Priority | None = None  # of its latest request, after the uid_max_class cap
    preempted: int = 0  # times one of its sequences lost its KV slot to other work
    stalled: int = 0  # streams cancelled because it read nothing for stall_seconds


@dataclass
class EngineStats:
    """Counters since start. The step loop writes them; snapshots copy them."""

    in_flight: int = 0
    total: int = 0  # requests finished, in any way
    cancelled: int = 0  # by the client or past their deadline
    stalled: int = 0  # of those, streams whose client read nothing for too long
    rejected: int = 0
    tokens_generated: int = 0
    tokens_prompted: int = 0  # every prompt token put in the KV cache, re-prefills too
    preempted: int = 0
    steps: int = 0
    last_batch: int = 0  # sequences in the last decode step
    last_progress: float = field(default_factory=time.monotonic)  # for the watchdog
    per_uid: dict[int, UidUsage] = field(default_factory=dict)
    ttft_counts: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_sum: float = 0.0
    recent_ttft: collections.deque[float] = field(  # seconds, the latest, for percentiles
        default_factory=lambda: collections.deque(maxlen=1000))

    def uid(self, uid: int) -> UidUsage:
        return self.per_uid.setdefault(uid, UidUsage())

    def observe_ttft(self, seconds: float) -> None:
        for i, bound in enumerate(TTFT_BUCKETS):
            if seconds <= bound:
                self.ttft_counts[i] += 1
                break
        self.ttft_sum += seconds
        self.recent_ttft.append(seconds)

    def reject(self, uid: int) -> None:
        self.rejected += 1
        self.uid(uid).rejected += 1

    def admit(self, uid: int, app: str, priority: Priority) -> None:
        self.in_flight += 1
        usage = self.uid(uid)
        usage.requests += 1
        usage.in_flight += 1
        if app and len(usage.apps) < MAX_APPS:
            usage.apps.add(app)
        usage.priority = priority

    def finish(self, uid: int, failed: bool, tokens_in: int, tokens_out: int) -> None:
        """A request of `uid` ended, having used these tokens."""
        self.in_flight -= 1
        self.total += 1
        usage = self.uid(uid)
        usage.in_flight = max(0, usage.in_flight - 1)
        usage.failed += failed
        usage.tokens_prompted += tokens_in
        usage.tokens_generated += tokens_out

    def copy(self) -> EngineStats:
        return dataclasses.replace(
            self, per_uid={uid: dataclasses.replace(u, apps=set(u.apps))
                           for uid, u in dict(self.per_uid).items()},
            ttft_counts=list(self.ttft_counts),
            recent_ttft=collections.deque(list(self.recent_ttft), maxlen=1000))


@dataclass(frozen=True)
class UidLimits:
    """The caps every uid runs under (admission's and the scheduler's); 0: no limit."""

    max_in_flight: int = 0
    max_queued: int = 0
    max_running: int = 0  # KV slots
    max_tokens_in_flight: int = 0


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine at one moment: the one thing Status, metrics and usage read."""

    stats: EngineStats  # a copy: counters since start
    kv_slots: int  # KV rows in all
    active_sequences: int  # sequences holding a KV row
    waiting: int  # requests that cannot start now (the queue depth metric)
    queued: tuple[tuple[int, Priority], ...]  # (uid, priority) of each request not started
    running_tokens: Mapping[int, tuple[int, int]]  # uid -> tokens in, out of running requests
    kv_blocks_used: int
    kv_blocks_total: int
    rows_held: Mapping[int, int] = field(default_factory=dict)  # uid -> KV slots it holds
    paused: int = 0  # sequences waiting for their readers (backpressure)
    tokens_in_flight: Mapping[int, int] = field(default_factory=dict)  # uid -> admitted estimates
    limits: UidLimits = field(default_factory=UidLimits)

    def uid_tokens(self) -> dict[int, tuple[int, int]]:
        """uid -> tokens in, out: its finished requests and its running sequences so far."""
        totals = {uid: (u.tokens_prompted, u.tokens_generated)
                  for uid, u in self.stats.per_uid.items()}
        for uid, (t_in, t_out) in self.running_tokens.items():
            done_in, done_out = totals.get(uid, (0, 0))
            totals[uid] = (done_in + t_in, done_out + t_out)
        return totals

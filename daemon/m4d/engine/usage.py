"""Observability, the engine's side: who uses the model and how busy it is, right now.

`RecentUsage` keeps a short history of token counters (the engine's step loop adds a
snapshot at most every SAMPLE_EVERY seconds), so rates are "tokens per second over the
last WINDOW seconds" and not averages since start. `usage_view(snapshot, recent)` turns an
`EngineSnapshot` into what the Admin Status RPC and `m4ctl top` show, as plain
dataclasses: per uid (requests ok / failed / rejected, tokens in and out, recent tokens/s,
in flight, queued, priority, app labels) and engine-wide (queue depth per priority,
running batch, KV blocks, decode tokens/s, TTFT percentiles). No torch, no grpc: the
servicer converts these to protobuf.
"""

from __future__ import annotations

import collections
import functools
import pwd
import threading
import time
from dataclasses import dataclass, field

from m4d.engine.stats import EngineSnapshot, UidLimits
from m4d.requests import Priority

WINDOW = 10.0  # seconds of history behind a "recent" rate
SAMPLE_EVERY = 0.5  # seconds between samples


@dataclass(frozen=True)
class _Sample:
    t: float
    decode: int  # engine-wide tokens generated
    per_uid: dict[int, tuple[int, int]]  # uid -> (tokens in, tokens out)


class RecentUsage:
    """Counter samples over the last WINDOW seconds."""

    def __init__(self) -> None:
        self._samples: collections.deque[_Sample] = collections.deque()
        self._lock = threading.Lock()  # the step loop adds, the event loop reads

    def due(self, now: float) -> bool:
        """Whether it is time for the next sample (cheap: the step loop asks every step)."""
        return not self._samples or now - self._samples[-1].t >= SAMPLE_EVERY

    def add(self, snapshot: EngineSnapshot, now: float) -> None:
        with self._lock:
            self._samples.append(_sample(snapshot, now))
            while len(self._samples) > 2 and self._samples[1].t <= now - WINDOW:
                self._samples.popleft()

    def base(self, now: float) -> _Sample | None:
        """The oldest sample inside the window (else the newest one), to rate against."""
        with self._lock:
            samples = list(self._samples)
        inside = [s for s in samples if s.t >= now - WINDOW - SAMPLE_EVERY]
        if inside:
            return inside[0]
        return samples[-1] if samples else None


def _sample(snapshot: EngineSnapshot, now: float) -> _Sample:
    return _Sample(now, snapshot.stats.tokens_generated, snapshot.uid_tokens())


@dataclass(frozen=True)
class UidView:
    uid: int
    user: str  # the user name, "" when the uid has none
    apps: list[str]  # app labels it sent (a label, never an identity)
    requests_ok: int
    requests_failed: int  # cancelled, past deadline, or failed after admission
    requests_rejected: int  # refused at admission (busy or quota)
    tokens_in: int
    tokens_out: int
    tokens_per_second: float  # generated, over the last WINDOW seconds
    in_flight: int
    queued: int
    priority: Priority | None  # of its latest request, after the uid_max_class cap
    running: int = 0  # KV slots its sequences hold now
    tokens_in_flight: int = 0  # prompt + max_tokens of its requests in flight
    preempted: int = 0  # times its sequences lost a KV slot to other work
    stalled: int = 0  # its streams cancelled because it read nothing for too long


@dataclass(frozen=True)
class EngineView:
    uids: list[UidView]
    queue_depth: dict[Priority, int]  # requests waiting to start
    running_sequences: int
    decode_batch: int  # sequences in the last decode step
    kv_blocks_used: int
    kv_blocks_total: int
    decode_tokens_per_second: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    ttft_samples: int
    window_seconds: float = WINDOW
    limits: UidLimits = field(default_factory=UidLimits)  # the caps every uid runs under
    paused_sequences: int = 0  # waiting for their readers (backpressure)


@functools.lru_cache(maxsize=256)
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError, ValueError):
        return ""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of `values`; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def usage_view(snapshot: EngineSnapshot, recent: RecentUsage,
               now: float | None = None) -> EngineView:
    """Everything Status shows about load and usage, from a snapshot of the engine."""
    now = time.monotonic() if now is None else now
    current = _sample(snapshot, now)
    base = recent.base(now)
    dt = now - base.t if base is not None else 0.0

    def rate(before: int, after: int) -> float:
        return max(0.0, (after - before) / dt) if dt >= SAMPLE_EVERY / 2 else 0.0

    queued_per_uid = collections.Counter(uid for uid, _ in snapshot.queued)
    depth = dict.fromkeys(Priority, 0) | collections.Counter(p for _, p in snapshot.queued)
    ttft = list(snapshot.stats.recent_ttft)
    rows = []
    for uid, u in sorted(snapshot.stats.per_uid.items()):
        t_in, t_out = current.per_uid.get(uid, (u.tokens_prompted, u.tokens_generated))
        before = base.per_uid.get(uid, (0, 0))[1] if base is not None else t_out
        rows.append(UidView(
            uid=uid, user=user_name(uid) if uid >= 0 else "", apps=sorted(u.apps),
            requests_ok=max(0, u.requests - u.in_flight - u.failed), requests_failed=u.failed,
            requests_rejected=u.rejected, tokens_in=t_in, tokens_out=t_out,
            tokens_per_second=rate(before, t_out), in_flight=u.in_flight,
            queued=min(queued_per_uid.get(uid, 0), u.in_flight), priority=u.priority,
            running=snapshot.rows_held.get(uid, 0),
            tokens_in_flight=snapshot.tokens_in_flight.get(uid, 0), preempted=u.preempted,
            stalled=u.stalled))
    decode_before = base.decode if base is not None else current.decode
    return EngineView(
        uids=rows, queue_depth=depth, running_sequences=snapshot.active_sequences,
        decode_batch=snapshot.stats.last_batch, kv_blocks_used=snapshot.kv_blocks_used,
        kv_blocks_total=snapshot.kv_blocks_total,
        decode_tokens_per_second=rate(decode_before, current.decode),
        ttft_p50_ms=percentile(ttft, 50) * 1e3, ttft_p99_ms=percentile(ttft, 99) * 1e3,
        ttft_samples=len(ttft), limits=snapshot.limits, paused_sequences=snapshot.paused)


__all__ = ["EngineView", "RecentUsage", "UidView", "percentile", "usage_view", "user_name"]

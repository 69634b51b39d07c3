"""Observability, the engine's side: who uses the model and how busy it is, right now.

`RecentUsage` keeps a short history of token counters (sampled by the engine's step loop at
most every SAMPLE_EVERY seconds), so rates are "tokens per second over the last WINDOW
seconds" and not averages since start. `usage_view(engine)` reads everything the Admin
Status RPC and `m4ctl top` show into plain dataclasses: per uid (requests ok / failed /
rejected, tokens in and out, recent tokens/s, in flight, queued, class, app labels) and
engine-wide (queue depth per class, running batch, KV blocks, decode tokens/s, TTFT
percentiles). No torch, no grpc: the servicer converts these to protobuf.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import pwd
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from m4d.engine.engine import Engine

WINDOW = 10.0  # seconds of history behind a "recent" rate
SAMPLE_EVERY = 0.5  # seconds between samples
CLASSES = (0, 1, 2)  # system, foreground, background
KV_BLOCK = 16  # tokens per block when reporting rows as blocks (no KV pool configured)


@dataclass(frozen=True)
class _Sample:
    t: float
    decode: int  # engine-wide tokens generated
    per_uid: dict[int, tuple[int, int]]  # uid -> (tokens in, tokens out)


class RecentUsage:
    """Counter samples over the last WINDOW seconds."""

    def __init__(self) -> None:
        self._samples: collections.deque[_Sample] = collections.deque()

    def maybe_sample(self, engine: Engine, now: float | None = None) -> None:
        """Called by the step loop after each iteration; cheap when it is not time yet."""
        now = time.monotonic() if now is None else now
        if self._samples and now - self._samples[-1].t < SAMPLE_EVERY:
            return
        sample = _totals(engine, now)
        with engine._lock:
            self._samples.append(sample)
            while len(self._samples) > 2 and self._samples[1].t <= now - WINDOW:
                self._samples.popleft()

    def base(self, now: float) -> _Sample | None:
        """The oldest sample inside the window (else the newest one), to rate against."""
        inside = [s for s in list(self._samples) if s.t >= now - WINDOW - SAMPLE_EVERY]
        if inside:
            return inside[0]
        return self._samples[-1] if self._samples else None


def _totals(engine: Engine, now: float) -> _Sample:
    """Per-uid token totals including sequences still running (their tokens so far)."""
    per_uid = {uid: (u.tokens_prompted, u.tokens_generated)
               for uid, u in dict(engine.stats.per_uid).items()}
    for seq in list(dict(engine._sequences).values()):
        uid = seq.request.caller.uid
        t_in, t_out = per_uid.get(uid, (0, 0))
        per_uid[uid] = (t_in + min(seq.prompted, len(seq.request.prompt_ids)),
                        t_out + len(seq.tokens))
    return _Sample(now, engine.stats.tokens_generated, per_uid)


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
    klass: int  # the class of its latest request, after the uid_max_class cap; -1 none yet


@dataclass(frozen=True)
class EngineView:
    uids: list[UidView]
    queue_depth: dict[int, int]  # class -> requests waiting to start
    running_sequences: int
    decode_batch: int  # sequences in the last decode step
    kv_blocks_used: int
    kv_blocks_total: int
    decode_tokens_per_second: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    ttft_samples: int
    window_seconds: float = WINDOW


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


def _waiting(engine: Engine) -> list[tuple[int, int]]:
    """(uid, class) of every request that has not started running."""
    out = [(s.uid, s.priority) for s in list(dict(engine.scheduler._waiting).values())]
    queues: list[Any] = [[r for r, _ in list(engine._inbox)]]
    for name in ("_encoder_queue", "_aux_queue", "_media_queue"):
        items = list(getattr(engine, name, ()))
        queues.append([w[0] if isinstance(w, tuple) else w.request for w in items])
    for requests in queues:
        out.extend((r.caller.uid, int(r.priority)) for r in requests)
    return out


def _kv_blocks(engine: Engine) -> tuple[int, int]:
    kv = engine.scheduler.kv
    if kv.block_size > 1:  # a real pool (config kv_pool_tokens)
        return kv.used, kv.num_blocks
    # no pool: rows are the limit; count each row's cache in blocks of KV_BLOCK tokens
    max_context = int(getattr(engine.runtime, "max_context", 0) or 0)
    total = engine.scheduler.num_rows * -(-max_context // KV_BLOCK)
    used = sum(-(-s.computed // KV_BLOCK) for s in list(dict(engine.scheduler.running).values()))
    return used, total


def usage_view(engine: Engine, recent: RecentUsage, now: float | None = None) -> EngineView:
    """Everything Status shows about load and usage, read from the event loop while the
    step loop runs (copies of its containers: exact to a step or so)."""
    now = time.monotonic() if now is None else now
    current = _totals(engine, now)
    base = recent.base(now)
    dt = now - base.t if base is not None else 0.0

    def rate(before: int, after: int) -> float:
        return max(0.0, (after - before) / dt) if dt >= SAMPLE_EVERY / 2 else 0.0

    waiting = _waiting(engine)
    queued_per_uid = collections.Counter(uid for uid, _ in waiting)
    depth = {c: 0 for c in CLASSES}
    for _, klass in waiting:
        depth[klass] = depth.get(klass, 0) + 1
    with engine._lock:  # a consistent copy; names are looked up after (NSS may be slow)
        per_uid = {uid: dataclasses.replace(u, apps=set(u.apps))
                   for uid, u in engine.stats.per_uid.items()}
        ttft = list(getattr(engine.stats, "recent_ttft", ()))
    rows = []
    for uid, u in sorted(per_uid.items()):
        t_in, t_out = current.per_uid.get(uid, (u.tokens_prompted, u.tokens_generated))
        before = base.per_uid.get(uid, (0, 0))[1] if base is not None else t_out
        failed = getattr(u, "failed", 0)
        rows.append(UidView(
            uid=uid, user=user_name(uid) if uid >= 0 else "", apps=sorted(u.apps),
            requests_ok=max(0, u.requests - u.in_flight - failed), requests_failed=failed,
            requests_rejected=u.rejected, tokens_in=t_in, tokens_out=t_out,
            tokens_per_second=rate(before, t_out), in_flight=u.in_flight,
            queued=min(queued_per_uid.get(uid, 0), u.in_flight),
            klass=getattr(u, "klass", -1)))
    used, total = _kv_blocks(engine)
    decode_before = base.decode if base is not None else current.decode
    return EngineView(
        uids=rows, queue_depth=depth, running_sequences=len(engine.scheduler.running),
        decode_batch=engine.stats.last_batch, kv_blocks_used=used, kv_blocks_total=total,
        decode_tokens_per_second=rate(decode_before, current.decode),
        ttft_p50_ms=percentile(ttft, 50) * 1e3, ttft_p99_ms=percentile(ttft, 99) * 1e3,
        ttft_samples=len(ttft))


__all__ = ["EngineView", "RecentUsage", "UidView", "percentile", "usage_view", "user_name"]

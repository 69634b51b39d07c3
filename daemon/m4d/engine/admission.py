"""Admission control: the gate in front of the engine's queues, answered at submit time.

Pure bookkeeping with the time passed in. `check()` says at once whether a request may
enter: ok; busy (the daemon holds as many requests of that priority as it may →
UNAVAILABLE with a retry hint); or quota (the caller's uid has too many requests in flight,
or has used up its tokens per second → RESOURCE_EXHAUSTED with a retry hint). An admitted
request holds its `Ticket` until `release()`, which the engine calls however it ends.

Per uid: caps on requests in flight, on those of them still waiting to start (queued) and
on the tokens they may use (`estimate_tokens`: prompt + max_tokens, held until release), a
token bucket charged with the same estimate (what a request did not use is refunded on
release), a fair-share weight, and a cap on its priority (`max_priority`, the daemon's
uid_max_class setting: a uid capped at background always runs as background). The cap on
KV slots one uid holds at once (`UidQuota.max_running`) is the scheduler's to keep.

Deadline-aware admission (`too_late`): a generation that cannot finish by its deadline even
if it ran alone, at the measured cost of a decode step, is refused at once with
DEADLINE_EXCEEDED and a hint (more time, or the tokens that fit). Only tokens it will
surely produce count (`sure_tokens`: max_tokens under ignore_eos without stop strings, else
the first), so no call that could have finished is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from m4d.engine.stats import UidLimits
from m4d.errors import DeadlineExceeded, M4Error, ResourceExhausted, Unavailable
from m4d.requests import (
    ClassifyRequest,
    EmbedRequest,
    GenerateRequest,
    MediaRequest,
    PredictNextRequest,
    Priority,
    RequestBase,
)


@dataclass(frozen=True)
class UidQuota:
    max_concurrent: int = 8  # requests in flight
    tokens_per_second: float = 2000.0  # token bucket refill rate
    burst_tokens: float = 8000.0  # token bucket size
    max_queued: int = 16  # requests in flight that have not started (no KV slot, not run)
    max_tokens_in_flight: int = 0  # estimates of the requests in flight, summed; 0: no limit
    max_running: int = 0  # KV slots held at once (the scheduler's cap); 0: no limit


@dataclass
class AdmissionConfig:
    # Requests of each priority the daemon holds at once (waiting + running); absent: no limit.
    priority_limits: dict[int, int] = field(default_factory=lambda: {0: 16, 1: 64, 2: 64})
    quota: UidQuota = field(default_factory=UidQuota)  # every uid's, unless in `quotas`
    quotas: dict[int, UidQuota] = field(default_factory=dict)
    max_priority: dict[int, int] = field(default_factory=dict)  # uid -> most urgent allowed
    weights: dict[int, float] = field(default_factory=dict)  # uid -> fair-share weight (1.0)
    busy_retry_after: float = 0.5  # seconds, the hint when a priority's limit is reached
    concurrent_retry_after: float = 1.0  # seconds, the hint when a uid has too many


@dataclass(frozen=True)
class Decision:
    status: Literal["ok", "busy", "quota"]
    priority: Priority  # the one granted: the one asked for, capped by max_priority
    weight: float = 1.0
    message: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def error(self) -> M4Error | None:
        """The error to answer with: Unavailable when busy, ResourceExhausted over quota."""
        if self.status == "busy":
            return Unavailable(self.message, retry_after=self.retry_after)
        if self.status == "quota":
            return ResourceExhausted(self.message, retry_after=self.retry_after)
        return None


@dataclass(frozen=True)
class Ticket:
    """What an admitted request holds until it ends."""

    uid: int
    priority: Priority
    weight: float  # its uid's fair-share weight
    estimate: int  # the tokens charged to its uid's bucket

    def unused(self, used: int) -> int:
        """Tokens to refund when it used `used`."""
        return max(0, self.estimate - used)


def estimate_tokens(request: RequestBase) -> int:
    """Tokens a request may cost, charged to its uid's token bucket at admission."""
    if isinstance(request, GenerateRequest):
        return len(request.prompt_ids) + request.sampling.max_tokens
    if isinstance(request, PredictNextRequest):
        return len(request.prompt_ids)
    if isinstance(request, EmbedRequest):
        return sum(len(t) for t in request.texts) // 4 + 1
    if isinstance(request, ClassifyRequest):
        return len(request.text) // 4 + 1
    if isinstance(request, MediaRequest):  # recognition, plus the answer of a cascade
        return 256 + (request.sampling.max_tokens if request.sampling else 0)
    return 1


def sure_tokens(request: GenerateRequest) -> int:
    """Tokens a generation will surely produce: max_tokens when nothing can end it sooner
    (ignore_eos, no stop strings), else one (the first token)."""
    sampling = request.sampling
    return sampling.max_tokens if sampling.ignore_eos and not sampling.stop else 1


def too_late(least_seconds: float, remaining: float, per_token: float,
             sure: int) -> DeadlineExceeded | None:
    """Deadline-aware admission: the error for a call that cannot finish in the `remaining`
    seconds even if it ran alone (`least_seconds` for its `sure` tokens, from measured step
    costs: `per_token` seconds a step), with a hint; None when it may."""
    if least_seconds <= remaining:
        return None
    fits = int(remaining / per_token) if per_token > 0 else 0
    hint = f"allow at least {least_seconds:.2f} s"
    if fits >= 1:
        hint += f" or ask for at most {fits} tokens"
    return DeadlineExceeded(
        f"{sure} tokens take at least {least_seconds:.2f} s at this device's measured speed "
        f"and the deadline is in {max(0.0, remaining):.2f} s: refused at once; {hint}")


@dataclass
class _Bucket:
    level: float
    stamp: float


class Admission:
    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()
        self.in_flight: dict[int, int] = {}  # uid -> requests
        self.per_priority: dict[Priority, int] = {}  # requests held
        self.tokens: dict[int, int] = {}  # uid -> estimates of its requests in flight
        self._buckets: dict[int, _Bucket] = {}

    def quota(self, uid: int) -> UidQuota:
        return self.config.quotas.get(uid, self.config.quota)

    def limits(self) -> UidLimits:
        """Every uid's caps (those not in `quotas`), for status."""
        q = self.config.quota
        return UidLimits(q.max_concurrent, q.max_queued, q.max_running, q.max_tokens_in_flight)

    def check(self, uid: int, priority: Priority, est_tokens: int, now: float,
              started: int = 0) -> Decision:
        """Admits the request (and counts it until release) or says why not. `started`: how
        many of the uid's requests in flight have started (the rest are queued)."""
        cfg, quota = self.config, self.quota(uid)
        priority = Priority(max(priority, cfg.max_priority.get(uid, 0)))
        weight = cfg.weights.get(uid, 1.0)

        def refuse(status: Literal["busy", "quota"], retry: float, message: str) -> Decision:
            return Decision(status, priority, weight, message, round(retry, 3))

        in_flight = self.in_flight.get(uid, 0)
        if in_flight >= quota.max_concurrent:
            return refuse("quota", cfg.concurrent_retry_after,
                          f"uid {uid} already has {in_flight} requests in flight (limit "
                          f"{quota.max_concurrent}); retry when one finishes")
        waiting = max(0, in_flight - started)
        if waiting >= quota.max_queued:
            return refuse("quota", cfg.concurrent_retry_after,
                          f"uid {uid} already has {waiting} requests waiting to start (limit "
                          f"{quota.max_queued}); retry when one starts")
        held = self.tokens.get(uid, 0)
        if quota.max_tokens_in_flight and held and held + est_tokens > quota.max_tokens_in_flight:
            return refuse("quota", cfg.concurrent_retry_after,
                          f"uid {uid} has requests in flight for {held} tokens and this one may "
                          f"use {est_tokens} (limit {quota.max_tokens_in_flight} tokens in "
                          "flight); retry when one finishes")
        bucket = self._refill(uid, quota, now)
        cost = min(float(est_tokens), quota.burst_tokens)  # a big request waits for a full bucket
        if bucket.level < cost:
            wait = (cost - bucket.level) / quota.tokens_per_second
            return refuse("quota", wait,
                          f"uid {uid} is over its rate of {quota.tokens_per_second:g} tokens/s; "
                          f"retry in {wait:.1f} s")
        queued, limit = self.per_priority.get(priority, 0), cfg.priority_limits.get(priority)
        if limit is not None and queued >= limit:
            return refuse("busy", cfg.busy_retry_after,
                          f"busy: {queued} {priority.name.lower()} requests are in the daemon "
                          f"(limit {limit}); retry in {cfg.busy_retry_after:g} s")
        bucket.level -= cost
        self.in_flight[uid] = in_flight + 1
        self.tokens[uid] = held + est_tokens
        self.per_priority[priority] = queued + 1
        return Decision("ok", priority, weight)

    def release(self, uid: int, priority: Priority, unused_tokens: int = 0,
                estimate: int = 0) -> None:
        """A request admitted with `priority` and `estimate` tokens ended; refunds the tokens
        it did not use."""
        self.in_flight[uid] = max(0, self.in_flight.get(uid, 0) - 1)
        self.tokens[uid] = max(0, self.tokens.get(uid, 0) - estimate)
        self.per_priority[priority] = max(0, self.per_priority.get(priority, 0) - 1)
        bucket = self._buckets.get(uid)
        if bucket is not None and unused_tokens > 0:
            bucket.level = min(self.quota(uid).burst_tokens, bucket.level + unused_tokens)

    def _refill(self, uid: int, quota: UidQuota, now: float) -> _Bucket:
        bucket = self._buckets.setdefault(uid, _Bucket(quota.burst_tokens, now))
        elapsed = max(0.0, now - bucket.stamp)
        bucket.level = min(quota.burst_tokens, bucket.level + elapsed * quota.tokens_per_second)
        bucket.stamp = max(bucket.stamp, now)
        return bucket

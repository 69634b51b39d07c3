"""Backpressure: a stream whose reader falls behind stops costing decode work.

A pure policy with the time passed in. The engine asks it, before each step, about every
generation sequence with the tokens its `RequestStream` holds that the reader has not
taken yet (`undelivered`) and when the reader last took something. Past `pause_tokens` the
sequence pauses: the scheduler plans no work for it, and its KV slot goes to any waiting
sequence that needs one (it resumes by recompute, like any preempted sequence). It runs
again once the reader has brought the backlog down to `resume_tokens` (half, by default:
hysteresis, so a slow reader does not flip it every step). A paused sequence whose reader
takes nothing for `stall_seconds` is cancelled: a client that never reads does not hold
its request, its quota and its place forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Verdict = Literal["run", "pause", "cancel"]


@dataclass(frozen=True)
class BackpressureConfig:
    pause_tokens: int = 256  # undelivered tokens that pause a sequence; 0: never pause
    stall_seconds: float = 30.0  # a paused sequence whose reader takes nothing this long ends

    @property
    def resume_tokens(self) -> int:
        return self.pause_tokens // 2


def verdict(config: BackpressureConfig, paused_since: float | None, undelivered: int,
            last_read: float, now: float) -> Verdict:
    """What a sequence does this step. `paused_since`: when it paused (None: it runs);
    `last_read`: when its reader last took an event (or when the request came)."""
    if config.pause_tokens <= 0:
        return "run"
    if paused_since is None:
        return "pause" if undelivered >= config.pause_tokens else "run"
    if undelivered <= config.resume_tokens:
        return "run"
    if now - max(paused_since, last_read) >= config.stall_seconds:
        return "cancel"
    return "pause"

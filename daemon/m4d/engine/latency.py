"""The latency policy: how background work yields to urgent work, decided without a model.

Plain data in, a plan out: no torch, no asyncio, no threads, no clock (the engine passes
`now` and the durations it measured). Urgent means a priority above background (system or
foreground). While urgent requests have been arriving within `urgent_window` seconds:

- a background decode batch runs in slices of about `decode_slice_ms` (at least
  MIN_DECODE_SLICE rows, no small tail slice), and the step may end after a slice that
  background rows follow, when an urgent generation request is waiting (`decode_slices`);
- a background encoder batch is cut to about `decode_slice_ms` of texts (`encoder_limit`).

And a background encoder batch waits, at most `encoder_defer_max` seconds, while urgent
generation waits to start (`defer_encoder`). So an urgent request waits for at most one
slice of background work before its prefill runs. The cost of a decode row and of an
encoder text are running averages of what the engine measured (`decoded`, `encoded`);
`least_seconds` turns the first into the least time a generation can take, for
deadline-aware admission.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

from m4d.requests import Priority

# Rows in the smallest decode slice: beyond ~8 rows a CPU decode step costs the same per
# row, so slicing costs background work little.
MIN_DECODE_SLICE = 4
RECENT_ROWS = 32  # decode calls whose cost per row `least_seconds` takes the least of


@dataclass(frozen=True)
class LatencyConfig:
    decode_slice_ms: float = 25.0  # target duration of one slice of background work; 0: never
    encoder_defer_max: float = 0.5  # seconds a background encoder batch may wait for urgent work
    urgent_window: float = 5.0  # seconds after the last urgent request that slicing stays on


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of a step's decode batch, run in one model call."""

    start: int
    stop: int
    may_yield: bool  # background rows follow: the step ends here if urgent generation waits


def is_urgent(priority: Priority) -> bool:
    return priority < Priority.BACKGROUND


def _average(mean: float, sample: float) -> float:
    """A running average that starts at the first sample."""
    return sample if mean <= 0 else 0.8 * mean + 0.2 * sample


class LatencyPolicy:
    def __init__(self, config: LatencyConfig | None = None) -> None:
        self.config = config or LatencyConfig()
        self.last_urgent = -float("inf")  # when the last urgent request arrived
        self.ms_per_row = 0.0  # measured decode time per batch row (0: not yet)
        self.ms_per_text = 0.0  # measured encoder time per text (0: not yet)
        self._recent_rows: collections.deque[float] = collections.deque(maxlen=RECENT_ROWS)

    def arrived(self, priority: Priority, now: float) -> None:
        """A request was admitted with `priority` at `now`."""
        if is_urgent(priority):
            self.last_urgent = now

    def slicing(self, ms_per_item: float, now: float) -> bool:
        """Whether background work runs in slices now: slicing is on, an urgent request came
        within `urgent_window`, and the cost per item (a decode row, an encoder text) is
        known."""
        return (self.config.decode_slice_ms > 0 and ms_per_item > 0
                and now - self.last_urgent < self.config.urgent_window)

    def decode_slices(self, priorities: Sequence[Priority], now: float) -> list[Slice]:
        """The model calls of a decode batch ordered most urgent first (`priorities`, one
        per row): the whole batch at once, or background work in slices. The model's rows
        are independent, so slicing changes no token."""
        n = len(priorities)
        background = [not is_urgent(p) for p in priorities]
        size = n
        if n and background[-1] and self.slicing(self.ms_per_row, now):
            size = max(MIN_DECODE_SLICE, int(self.config.decode_slice_ms / self.ms_per_row))
        slices: list[Slice] = []
        start = 0
        while start < n:
            stop = min(n, start + size)
            if n - stop < size // 2:
                stop = n  # no small tail slice
            slices.append(Slice(start, stop, may_yield=stop < n and background[stop]))
            start = stop
        return slices

    def encoder_limit(self, max_texts: int, background_only: bool, now: float) -> int:
        """Texts in the next encoder batch: cut to a slice when it is background work only
        and slicing is on."""
        if background_only and self.slicing(self.ms_per_text, now):
            return max(1, min(max_texts, int(self.config.decode_slice_ms / self.ms_per_text)))
        return max_texts

    def defer_encoder(self, oldest_arrival: float, background_only: bool,
                      urgent_waiting: bool, now: float) -> bool:
        """Whether a background-only encoder batch waits for urgent generation to start
        (for at most `encoder_defer_max` after its oldest request arrived)."""
        return (background_only and urgent_waiting
                and now - oldest_arrival < self.config.encoder_defer_max)

    def decoded(self, rows: int, seconds: float) -> None:
        """A decode call of `rows` rows took `seconds`."""
        self.ms_per_row = _average(self.ms_per_row, seconds * 1e3 / rows)
        self._recent_rows.append(seconds * 1e3 / rows)

    def least_seconds(self, new_tokens: int) -> float:
        """The least time generating `new_tokens` can take at the measured costs, even
        alone: a model step per token (the first one ends the prefill). A step of b rows
        costs at least one row alone, and one row alone costs at least a row's share of any
        batch (the cheapest of the latest calls), so this is a lower bound; 0 until measured. The
        prompt's prefill is left out: its cost per token depends on the chunk, and an
        average over chunks would not be a lower bound."""
        return new_tokens * self.least_ms_per_row / 1e3

    @property
    def least_ms_per_row(self) -> float:
        """The cheapest row of the last RECENT_ROWS decode calls (0 until measured): unlike
        the average, one slow step (a page fault, a warm-up) cannot raise it."""
        return min(self._recent_rows, default=0.0)

    def encoded(self, texts: int, seconds: float) -> None:
        """An encoder batch of `texts` texts took `seconds`."""
        self.ms_per_text = _average(self.ms_per_text, seconds * 1e3 / max(1, texts))

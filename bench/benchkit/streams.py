"""Benchmark helpers (outside the serving pipeline): Generate calls timed at the client.

`daemon_generate` times one streamed call of the synchronous client (prefill and decode
rates, from this side and from the daemon's `timings`); `run_streams` starts N streams at
once on the asyncio client and reduces them to the aggregate decode rate while all N
decode (see `summarise_streams`).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from m4client.aio import AsyncClient

# One stream, as bench_daemon.py and bench_variants.py measure it: a ~256-token raw prompt,
# 128 greedy tokens.
PROMPT_TOKENS = 256
NEW_TOKENS = 128

# N streams at once, as bench_scheduling.py (section 1) and bench_variants.py measure them:
# distinct ~32-token prompts, 64 greedy tokens each, on the raw-prompt task (no chat
# template: m4d and llama.cpp see the same tokens), on a daemon with KV_SLOTS slots that
# lets this one uid run up to UID_MAX_CONCURRENT calls (streams plus background load).
STREAM_PROMPT_TOKENS = 32
STREAM_NEW_TOKENS = 64
STREAM_TASK = "complete"
KV_SLOTS = 32
UID_MAX_CONCURRENT = 64


# The speed benches repeat their prompts (warm-up, rounds): with m4d's prefix cache on, the
# repeats would be served from it and "prefill" would time a cache copy, not the model.
NO_PREFIX_CACHE = {"M4D_PREFIX_CACHE_TOKENS": "0"}


def streams_daemon_options() -> tuple[list[str], dict[str, str]]:
    """(flags, environment) of an m4d for the N-stream measurement."""
    return (["--kv-slots", str(KV_SLOTS)],
            {"M4D_UID_MAX_CONCURRENT": str(UID_MAX_CONCURRENT), **NO_PREFIX_CACHE})


@dataclass
class GenSample:
    """One generation run. Rates are tokens/s; `*_timings` come from the daemon's report."""

    prompt_tokens: int
    completion_tokens: int
    prefill_tps: float
    decode_tps: float
    prefill_tps_timings: float | None = None
    decode_tps_timings: float | None = None
    client_ttft_ms: float = 0.0
    timings_ms: dict[str, float] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)


def daemon_generate(client: Any, task: str, prompt: str, new_tokens: int) -> GenSample:
    """One streamed Generate call, timed from this side and by the daemon."""
    start = time.perf_counter()
    first = last = 0.0
    ids: list[int] = []
    usage = timings = None
    with client.generate(prompt, task=task, max_tokens=new_tokens, temperature=0.0,
                         ignore_eos=True) as stream:
        for chunk in stream:
            now = time.perf_counter()
            if chunk.token_ids:
                first = first or now
                last = now
                ids.extend(chunk.token_ids)
            usage = chunk.usage or usage
            timings = chunk.timings or timings
    assert usage is not None and timings is not None, "the last message had no usage/timings"
    n_prompt, n_new = usage.prompt_tokens, usage.completion_tokens
    return GenSample(
        prompt_tokens=n_prompt,
        completion_tokens=n_new,
        prefill_tps=n_prompt / (first - start),
        decode_tps=(n_new - 1) / (last - first),
        prefill_tps_timings=n_prompt / (timings.prefill_ms / 1e3),
        decode_tps_timings=(n_new - 1) / (timings.decode_ms / 1e3),
        client_ttft_ms=(first - start) * 1e3,
        timings_ms=asdict(timings),
        token_ids=ids,
    )


@dataclass
class StreamTrace:
    """One Generate stream: when each message with tokens arrived (perf_counter seconds)
    and the daemon's own timings (ms) from the last message."""

    sent: float
    arrivals: list[tuple[float, int]]  # (time, tokens in the message)
    completion_tokens: int
    timings: dict[str, float]
    token_ids: list[int] = field(default_factory=list)

    @property
    def first(self) -> float:
        return self.arrivals[0][0]

    @property
    def last(self) -> float:
        return self.arrivals[-1][0]

    @property
    def ttft_ms(self) -> float:
        return (self.first - self.sent) * 1e3

    @property
    def decode_ms_per_token(self) -> float | None:
        """The daemon's decode time per token after the first."""
        n = self.completion_tokens - 1
        return self.timings["decode_ms"] / n if n > 0 else None


async def generate_once(client: AsyncClient, prompt: str, max_tokens: int, priority: str, *,
                        task: str = STREAM_TASK) -> StreamTrace:
    """One greedy, ignore_eos Generate call on `task`, streamed to the end."""
    sent = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    ids: list[int] = []
    usage = timings = None
    async with client.generate(prompt, task=task, max_tokens=max_tokens, temperature=0.0,
                               ignore_eos=True, priority=priority) as stream:
        async for chunk in stream:
            if chunk.token_ids:
                arrivals.append((time.perf_counter(), len(chunk.token_ids)))
                ids.extend(chunk.token_ids)
            usage = chunk.usage or usage
            timings = chunk.timings or timings
    if usage is None or timings is None or not arrivals:
        raise RuntimeError("a Generate stream ended without tokens, usage or timings")
    return StreamTrace(sent, arrivals, usage.completion_tokens, asdict(timings), ids)


@dataclass
class BatchRun:
    """N concurrent streams started together."""

    streams: int
    aggregate_tps: float  # client: tokens while all N decode / that window
    window_s: float
    window_kind: str  # "all decoding" or "first to last token" (no full overlap)
    end_to_end_tps: float  # all tokens / (last token - first call), prefill included
    timings_tps: float  # N / the daemon's median decode time per token
    completion_tokens: list[int]
    timings_ms: dict[str, float]  # medians over the streams; first_token_max too
    first_ids: list[int]  # stream 0's tokens, to compare greedy outputs
    other_cpu: float = 0.0  # share of the cores other processes used meanwhile


def summarise_streams(start: float, traces: list[StreamTrace]) -> BatchRun:
    """Aggregate decode rate of streams that ran together: the tokens the client received
    while *all* of them were decoding (from the last stream's first token to the first
    stream's last token) over that window; for one stream, (tokens - 1) / (last token -
    first token)."""
    t0, t1 = max(t.first for t in traces), min(t.last for t in traces)
    if t1 - t0 >= 0.2:
        tokens = sum(n for t in traces for when, n in t.arrivals if t0 < when <= t1)
        window, kind = t1 - t0, "all decoding"
    else:  # the first stream ended before the last began: count from first to last token
        t0, t1 = min(t.first for t in traces), max(t.last for t in traces)
        tokens = sum(t.completion_tokens - 1 for t in traces)
        window, kind = t1 - t0, "first to last token"
    per_token = [t.decode_ms_per_token for t in traces if t.decode_ms_per_token]
    timings = {key: statistics.median(t.timings[key] for t in traces)
               for key in traces[0].timings}
    timings["first_token_max_ms"] = max(t.timings["first_token_ms"] for t in traces)
    timings["decode_ms_per_token"] = statistics.median(per_token) if per_token else math.nan
    return BatchRun(
        streams=len(traces),
        aggregate_tps=tokens / window,
        window_s=window,
        window_kind=kind,
        end_to_end_tps=sum(t.completion_tokens for t in traces)
        / (max(t.last for t in traces) - start),
        timings_tps=len(traces) * 1e3 / timings["decode_ms_per_token"],
        completion_tokens=[t.completion_tokens for t in traces],
        timings_ms=timings,
        first_ids=traces[0].token_ids,
    )


async def run_streams(client: AsyncClient, prompts: list[str], max_tokens: int, *,
                      task: str = STREAM_TASK) -> BatchRun:
    """len(prompts) foreground streams at once, one prompt each."""
    start = time.perf_counter()
    traces = await asyncio.gather(*(generate_once(client, p, max_tokens, "foreground",
                                                  task=task) for p in prompts))
    return summarise_streams(start, list(traces))

"""Benchmark (outside the serving pipeline): bench_scheduling.py section 3, dynamic encoder
batching.

Embed sentences/s with many single-sentence calls in flight against one call at a time, the
same sentences per round. Encoder batch sizes are recovered from the daemon's timings: the
texts of one encoder batch share its `prefill_ms`. Calls refused as busy are sent again and
counted.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchkit.cpu import OtherCpuMeter
from benchkit.report import progress

if TYPE_CHECKING:
    from m4client.aio import AsyncClient

log = progress("bench_scheduling")


@dataclass
class EmbedRun:
    """Single-sentence Embed calls; rates are sentences/s."""

    in_flight: int
    sentences: int
    rate: float  # client: sentences / wall time
    encoder_rate: float  # sentences / the daemon's encoder time (sum over its batches)
    batches: int  # encoder batches, recovered from the shared prefill_ms of a batch
    median_queue_ms: float  # the daemon's arrival-to-encoder time per call
    median_total_ms: float  # the daemon's arrival-to-result time per call
    retries: int  # calls refused (busy) and sent again
    other_cpu: float = 0.0  # share of the cores other processes used meanwhile


async def embed_calls(client: AsyncClient, sentences: list[str], in_flight: int,
                      priority: str = "foreground") -> EmbedRun:
    """Embeds every sentence with its own call, `in_flight` calls at a time."""
    from m4client import ResourceExhaustedError, UnavailableError

    todo = collections.deque(sentences)
    prefill_ms: list[float] = []
    queue_ms: list[float] = []
    total_ms: list[float] = []
    retries = 0

    async def worker() -> None:
        nonlocal retries
        while todo:
            sentence = todo.popleft()
            while True:
                try:
                    result = await client.embed([sentence], priority=priority)
                    break
                except (UnavailableError, ResourceExhaustedError):
                    retries += 1
                    await asyncio.sleep(0.005)
            prefill_ms.append(result.timings.prefill_ms)
            queue_ms.append(result.timings.queue_ms)
            total_ms.append(result.timings.total_ms)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    wall = time.perf_counter() - start
    # one call at a time: every call is its own batch; else the texts of one batch share
    # its encoder time exactly
    batch_ms = prefill_ms if in_flight == 1 else list(set(prefill_ms))
    return EmbedRun(in_flight=in_flight, sentences=len(sentences), rate=len(sentences) / wall,
                    encoder_rate=len(sentences) / (sum(batch_ms) / 1e3), batches=len(batch_ms),
                    median_queue_ms=statistics.median(queue_ms),
                    median_total_ms=statistics.median(total_ms), retries=retries)


async def measure_embed(client: AsyncClient, sentences: list[str], in_flight: int,
                        pids: list[int], repeats: int) -> list[tuple[EmbedRun, EmbedRun]]:
    """Section 3: per round, the same sentences one call at a time, then `in_flight`
    calls at a time."""
    embed_runs: list[tuple[EmbedRun, EmbedRun]] = []
    for rep in range(repeats):
        log(f"embed {rep + 1}/{repeats}: 1 call at a time, then {in_flight} in flight")
        meter = OtherCpuMeter(pids)
        one = await embed_calls(client, sentences, 1)
        one.other_cpu = meter.other_share()
        meter = OtherCpuMeter(pids)
        many = await embed_calls(client, sentences, in_flight)
        many.other_cpu = meter.other_share()
        embed_runs.append((one, many))
    return embed_runs

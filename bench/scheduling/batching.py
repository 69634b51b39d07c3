"""Benchmark (outside the serving pipeline): bench_scheduling.py section 1, continuous
batching.

Per round, m4d with 1, 4, 16 and 32 concurrent Generate streams (`benchkit.streams`), and
llama.cpp's single stream in the same round (the order reversed every other round), each
with the share of the CPUs other processes used meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from benchkit.cpu import OtherCpuMeter
from benchkit.llama import LlamaRun, llama_round
from benchkit.report import alternate, progress
from benchkit.streams import STREAM_NEW_TOKENS, BatchRun, run_streams

from scheduling import STREAM_COUNTS

if TYPE_CHECKING:
    from m4client.aio import AsyncClient

log = progress("bench_scheduling")


async def measure_batching(client: AsyncClient, prompts: list[str], llm: Any,
                           llama_ids: list[int], pids: list[int], repeats: int
                           ) -> tuple[list[dict[int, BatchRun]], list[LlamaRun]]:
    """Every stream count and llama.cpp once per round, the order reversed every other
    round."""
    batch_runs: list[dict[int, BatchRun]] = []
    llama_runs: list[LlamaRun] = []
    order: list[int | None] = [1, None, *STREAM_COUNTS[1:]]  # None: llama.cpp
    for rep in range(repeats):
        runs: dict[int, BatchRun] = {}
        for streams in alternate(order, rep):
            if streams is None:
                if llm is not None:
                    log(f"batching {rep + 1}/{repeats}: llama.cpp, 1 stream")
                    llama_runs.append(llama_round(llm, llama_ids, pids, STREAM_NEW_TOKENS))
                continue
            log(f"batching {rep + 1}/{repeats}: m4d, {streams} streams")
            meter = OtherCpuMeter(pids)
            runs[streams] = await run_streams(client, prompts[:streams], STREAM_NEW_TOKENS)
            runs[streams].other_cpu = meter.other_share()
        batch_runs.append(runs)
    return batch_runs, llama_runs

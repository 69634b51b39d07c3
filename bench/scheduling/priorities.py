"""Benchmark (outside the serving pipeline): bench_scheduling.py section 2, priorities.

Foreground time to first token (client: call to the first message that carries a token;
daemon: `timings.first_token_ms`) of sequential short foreground requests, on an idle daemon
and under a saturating background load: PRIORITY_BACKGROUND streams of long generations
restarted as they end, plus a flood of single-sentence background Embed calls. The load runs
in a separate process (another app, with its own event loop), so the probes' timestamps are
not delayed by the load's messages; `LoadProcess` starts and stops it on command.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import statistics
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from benchkit.child import ChildProcess
from benchkit.cpu import OtherCpuMeter
from benchkit.report import alternate, progress
from benchkit.streams import STREAM_TASK, StreamTrace, generate_once

from scheduling import FG_NEW_TOKENS

if TYPE_CHECKING:
    from m4client.aio import AsyncClient

log = progress("bench_scheduling")

FG_QUESTIONS = (
    "What is the capital of France?",
    "Name a colour of the sky.",
    "How many legs does a spider have?",
    "What do bees make?",
    "Which planet is closest to the sun?",
    "What is two plus three?",
    "Name a fruit that is yellow.",
    "What language is spoken in Spain?",
)


def foreground_prompts(count: int) -> list[str]:
    """Short (~10-15 token) distinct questions for the foreground probes."""
    return [f"Question {i + 1}: {FG_QUESTIONS[i % len(FG_QUESTIONS)]} Answer:"
            for i in range(count)]


# ---------------------------------------------------------------- the background load


@dataclass
class LoadSpec:
    """What the background load process runs (picklable: it crosses a process boundary)."""

    address: str
    prompts: list[str]  # one per background stream
    new_tokens: int
    sentences: list[str]
    embed_in_flight: int
    settle_s: float = 1.0


@dataclass
class LoadStats:
    """What one loaded period did, from the load process's side."""

    ramp_s: float  # "start" until every background stream had its first token
    seconds: float  # ready to stop
    stream_tps: float  # background tokens received per second, all streams
    embed_rate: float  # background sentences embedded per second
    encoder_batch_ms: float  # median encoder time per background embed batch
    encoder_batch_texts: float  # mean texts per background embed batch
    errors: dict[str, int]


class BackgroundLoad:
    """Background streams, restarted as they end, and a background Embed flood."""

    def __init__(self, client: AsyncClient, spec: LoadSpec) -> None:
        self.client, self.spec = client, spec
        self.tokens = 0
        self.sentences = 0
        self.batch_ms: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.first = [asyncio.Event() for _ in spec.prompts]
        self.tasks: list[asyncio.Task[None]] = []

    async def _stream(self, i: int) -> None:
        from m4client import M4Error

        while True:
            try:
                async with self.client.generate(
                        self.spec.prompts[i], task=STREAM_TASK, max_tokens=self.spec.new_tokens,
                        temperature=0.0, ignore_eos=True, priority="background") as stream:
                    async for chunk in stream:
                        if chunk.token_ids:
                            self.tokens += len(chunk.token_ids)
                            self.first[i].set()
            except M4Error as exc:
                self.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.05)

    async def _embed(self, j: int) -> None:
        from m4client import M4Error

        sentences = self.spec.sentences
        k = j
        while True:
            k = (k + self.spec.embed_in_flight) % len(sentences)
            try:
                result = await self.client.embed([sentences[k]], priority="background")
            except M4Error as exc:
                self.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.05)
                continue
            self.sentences += 1
            self.batch_ms.append(result.timings.prefill_ms)

    async def start(self) -> float:
        """Starts the load; returns once every stream decodes and the load has settled."""
        started = time.perf_counter()
        self.tasks = [asyncio.create_task(self._stream(i)) for i in range(len(self.spec.prompts))]
        self.tasks += [asyncio.create_task(self._embed(j))
                       for j in range(self.spec.embed_in_flight)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self.first)), timeout=300)
        ramp = time.perf_counter() - started
        await asyncio.sleep(self.spec.settle_s)
        self._mark = (time.perf_counter(), self.tokens, self.sentences, len(self.batch_ms))
        return ramp

    async def stop(self, ramp_s: float) -> LoadStats:
        """Cancels every call (the daemon drops their work) and reports the loaded period."""
        t0, tokens0, sentences0, batches0 = self._mark
        seconds = time.perf_counter() - t0
        tokens, sentences = self.tokens - tokens0, self.sentences - sentences0
        batch_ms = self.batch_ms[batches0:]
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.sleep(self.spec.settle_s)  # let the daemon drop the cancelled work
        distinct = set(batch_ms)
        return LoadStats(
            ramp_s=ramp_s, seconds=seconds, stream_tps=tokens / seconds,
            embed_rate=sentences / seconds,
            encoder_batch_ms=statistics.median(distinct) if distinct else math.nan,
            encoder_batch_texts=len(batch_ms) / len(distinct) if distinct else math.nan,
            errors=dict(self.errors))


def background_load_process(spec: LoadSpec, conn: Connection) -> None:
    """The load process: "start" starts the load and answers ("ready", None) once it runs;
    "stop" stops it and answers ("stopped", LoadStats); "exit" ends the process."""
    asyncio.run(_serve_load_commands(spec, conn))


async def _serve_load_commands(spec: LoadSpec, conn: Connection) -> None:
    from m4client.aio import AsyncClient

    async with AsyncClient(spec.address, app_name="bench-background") as client:
        while (command := await asyncio.to_thread(conn.recv)) != "exit":
            if command != "start":
                raise ValueError(f"unexpected command {command!r}")
            load = BackgroundLoad(client, spec)
            ramp = await load.start()
            conn.send(("ready", None))
            if (command := await asyncio.to_thread(conn.recv)) != "stop":
                raise ValueError(f"expected stop, got {command!r}")
            conn.send(("stopped", await load.stop(ramp)))


class LoadProcess(ChildProcess):
    """The main process's handle on the background load process."""

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__("the background load", background_load_process, (spec,))

    async def _ask(self, command: str, answer: str) -> Any:
        self.conn.send(command)
        return await self.answer(answer)

    async def start(self) -> None:
        await self._ask("start", "ready")

    async def stop(self) -> LoadStats:
        stats: LoadStats = await self._ask("stop", "stopped")
        return stats


async def foreground_probes(client: AsyncClient, prompts: list[str],
                            rng: random.Random) -> list[StreamTrace]:
    """One foreground request at a time, a random 0-50 ms apart (not in step with the
    daemon's steps)."""
    traces = []
    for prompt in prompts:
        await asyncio.sleep(rng.uniform(0.0, 0.05))
        traces.append(await generate_once(client, prompt, FG_NEW_TOKENS, "foreground"))
    return traces


# ---------------------------------------------------------------- the probes


@dataclass
class PriorityRuns:
    idle_probes: list[StreamTrace]
    loaded_probes: list[StreamTrace]
    load_stats: list[LoadStats]
    phase_cpu: dict[str, list[float]]  # "idle"/"loaded" -> other processes' share


async def measure_priorities(client: AsyncClient, load: LoadProcess, requests: int,
                             pids: list[int], repeats: int) -> PriorityRuns:
    """Section 2: per round, a block of foreground probes on the idle daemon and one under
    the background load (in the other order every other round)."""
    rng = random.Random(0)
    per_round = math.ceil(requests / repeats)
    prompts = foreground_prompts(per_round * repeats * 2)
    out = PriorityRuns([], [], [], {"idle": [], "loaded": []})
    for rep in range(repeats):
        for phase in alternate(("idle", "loaded"), rep):
            batch, prompts = prompts[:per_round], prompts[per_round:]
            if phase == "loaded":
                log(f"priorities {rep + 1}/{repeats}: starting the background load")
                await load.start()
            log(f"priorities {rep + 1}/{repeats}: {per_round} foreground requests, {phase}")
            meter = OtherCpuMeter(pids)
            probes = await foreground_probes(client, batch, rng)
            out.phase_cpu[phase].append(meter.other_share())
            if phase == "loaded":
                out.loaded_probes += probes
                out.load_stats.append(await load.stop())
            else:
                out.idle_probes += probes
    return out

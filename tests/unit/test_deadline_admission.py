"""Deadline-aware admission: a generation that cannot finish by its deadline even if it ran
alone, at the measured cost of a decode step, is refused at once (DEADLINE_EXCEEDED, with a
hint); one that might finish is admitted. Pure parts first, then the engine with the fake
runtime of test_engine_resume."""

from __future__ import annotations

import time

import pytest
from m4d.engine.admission import sure_tokens, too_late
from m4d.engine.config import EngineConfig
from m4d.engine.engine import Engine
from m4d.engine.latency import RECENT_ROWS, LatencyPolicy
from m4d.errors import DeadlineExceeded
from m4d.requests import Caller, GenerateRequest, Priority, SamplingParams

from tests.unit.test_engine_resume import FakeRuntime


def request(max_tokens: int, ignore_eos: bool = True, stop: tuple[str, ...] = (),
            deadline: float | None = None) -> GenerateRequest:
    return GenerateRequest(task="generate", priority=Priority.FOREGROUND, caller=Caller(uid=3),
                           prompt_ids=[1, 2, 3], deadline=deadline,
                           sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos,
                                                   stop=stop))


def test_only_tokens_nothing_can_cut_short_are_sure() -> None:
    assert sure_tokens(request(100)) == 100
    assert sure_tokens(request(100, ignore_eos=False)) == 1
    assert sure_tokens(request(100, stop=("\n",))) == 1


def test_least_seconds_is_the_cheapest_recent_row_and_an_outlier_does_not_raise_it() -> None:
    latency = LatencyPolicy()
    assert latency.least_seconds(100) == 0.0, "nothing measured: nothing refused"
    latency.decoded(4, 0.040)  # 10 ms a row
    latency.decoded(1, 0.500)  # one slow step
    assert latency.least_seconds(100) == pytest.approx(1.0)
    for _ in range(RECENT_ROWS):
        latency.decoded(2, 0.040)  # 20 ms a row from now on
    assert latency.least_seconds(100) == pytest.approx(2.0)


def test_too_late_refuses_with_a_hint_and_lets_a_possible_call_through() -> None:
    assert too_late(1.0, remaining=1.0, per_token=0.01, sure=100) is None
    error = too_late(2.0, remaining=0.5, per_token=0.02, sure=100)
    assert isinstance(error, DeadlineExceeded)
    assert "100 tokens take at least 2.00 s" in str(error)
    assert "deadline is in 0.50 s" in str(error)
    assert "allow at least 2.00 s or ask for at most 25 tokens" in str(error)
    assert "ask for at most" not in str(too_late(2.0, remaining=0.001, per_token=0.02, sure=100))


async def test_the_engine_refuses_at_once_what_cannot_finish_and_admits_the_rest() -> None:
    e = Engine(FakeRuntime(), EngineConfig(  # type: ignore[arg-type]
        kv_slots=2, token_budget=18, prefill_chunk=16, max_queue=16, max_batch_texts=4))
    e.start()
    try:
        assert len([_ async for _ in e.submit(request(20))]) > 1  # measures a decode step
        row = e.latency.least_ms_per_row / 1e3
        assert row >= 0.002, "the fake runtime sleeps 2 ms a decode call"
        now = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="refused at once"):
            e.submit(request(1000, deadline=now + 0.5 * 1000 * row))
        assert e.stats.per_uid[3].rejected == 1 and e.stats.in_flight == 0
        # EOS may end it after one token: it might finish, so it is admitted
        maybe = e.submit(request(1000, ignore_eos=False, deadline=now + 0.5 * 1000 * row))
        maybe.cancel()
        ok = e.submit(request(10, deadline=now + 60))
        await ok.result()
    finally:
        e.stop()

"""Goodput under deadlines: the measured step costs, the simulation of held work, and the
admission that refuses at once what would be late (or would make a held call late), so that
a burst finishes some calls in time instead of all of them late. Pure parts first, then the
engine with a fake runtime whose decode step costs more with more rows."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch
from m4d.engine.config import EngineConfig
from m4d.engine.engine import Engine
from m4d.engine.goodput import (
    GoodputConfig,
    StepCosts,
    Work,
    encoder_latest_start,
    finish_times,
    refusal,
)
from m4d.errors import M4Error, Unavailable
from m4d.requests import (
    Caller,
    EmbedRequest,
    Finished,
    GenerateRequest,
    Priority,
    SamplingParams,
)

from tests.unit.test_engine_resume import FakeRuntime


def costs(fixed: float = 0.010, per_row: float = 0.002, per_token: float = 0.001) -> StepCosts:
    c = StepCosts()
    for rows in (1, 4, 16):
        c.decoded(rows, fixed + per_row * rows)
    for tokens in (8, 32):
        c.prefilled(tokens, per_token * tokens)
    return c


def test_step_costs_are_a_line_through_what_was_measured() -> None:
    c = StepCosts()
    assert not c.known and c.decode(8) == 0.0, "nothing measured: no cost, nothing refused"
    c.decoded(1, 0.010)
    assert c.decode(1) == pytest.approx(0.010)
    assert 0.010 < c.decode(16) < 16 * 0.010, "one size measured: scaled by the prior shape"
    c = costs(fixed=0.010, per_row=0.002)
    assert c.decode(8) == pytest.approx(0.026)
    assert c.decode(16) == pytest.approx(0.042)
    assert c.prefill(100) == pytest.approx(0.100)
    c.decoded(16, 0.100)  # a slow step moves the average, not all of it
    assert 0.042 < c.decode(16) < 0.100


def test_the_simulation_runs_rows_together_and_queued_work_takes_freed_rows() -> None:
    c = costs(fixed=0.0, per_row=0.001)  # a step of n rows: n ms
    plan = finish_times([Work(steps=10, must=10, prefill=0, deadline=1.0, running=True),
                         Work(steps=20, must=20, prefill=0, deadline=1.0, running=True)],
                        slots=2, costs=c, now=0.0)
    assert plan.met[0] == pytest.approx(0.020)  # 10 steps × 2 ms
    assert plan.met[1] == pytest.approx(0.030)  # then 10 steps alone × 1 ms
    assert plan.first_free == pytest.approx(0.020)
    # one slot: the queued one waits for the row, then computes its prompt (8 ms)
    plan = finish_times([Work(steps=10, must=10, prefill=0, deadline=1.0, running=True),
                         Work(steps=4, must=5, prefill=8, deadline=1.0)],
                        slots=1, costs=c, now=0.0)
    assert plan.met[1] == pytest.approx(0.010 + 0.008 + 0.004)
    # queued work takes rows most urgent first
    plan = finish_times([Work(steps=5, must=6, prefill=8, deadline=1.0, priority=2),
                         Work(steps=5, must=6, prefill=8, deadline=1.0, priority=0)],
                        slots=1, costs=c, now=0.0)
    assert plan.met[1] < plan.met[0]  # type: ignore[operator]


def burst(n: int, deadline: float, tokens: int = 64) -> tuple[list[Work], list[M4Error]]:
    """`n` generations submitted at once (each checked against those admitted before it)."""
    c, held, refused = costs(), [], []
    for _ in range(n):
        new = Work(steps=tokens - 1, must=tokens, prefill=32, deadline=deadline)
        error = refusal(held, new, slots=16, costs=c, now=0.0, lead=0.0, margin=0.15)
        if error is None:
            held.append(new)
        else:
            refused.append(error)
    return held, refused


def test_a_burst_admits_what_finishes_in_time_and_refuses_the_rest_at_once() -> None:
    held, refused = burst(43, deadline=2.0)
    assert 1 <= len(held) < 16 and len(held) + len(refused) == 43
    plan = finish_times(held, 16, costs(), 0.0)
    assert all(t is not None and t <= 2.0 for t in plan.met), "every admitted call in time"
    assert all(isinstance(e, Unavailable) for e in refused)
    error = refused[0]
    assert "refused at once" in str(error) and "retry in" in str(error)
    assert error.retry_after is not None and error.retry_after > 0
    # one more row would have been late (or made another late): the admission is tight
    more = finish_times([*held, held[0]], 16, costs(), 0.0)
    assert any(t is None or t * 1.15 + costs().decode(len(held) + 1) > 2.0 for t in more.met)
    # more time, more calls
    assert len(burst(43, deadline=4.0)[0]) > len(held)


def test_a_new_call_that_would_make_a_held_call_late_is_refused() -> None:
    c = costs(fixed=0.0, per_row=0.010)  # rows cost: adding one slows the other a lot
    tight = Work(steps=50, must=50, prefill=0, deadline=0.9, running=True)  # 50 × 10 ms
    relaxed = Work(steps=49, must=50, prefill=8, deadline=100.0)
    error = refusal([tight], relaxed, slots=4, costs=c, now=0.0, lead=0.0, margin=0.15)
    assert error is not None and "make 1 accepted calls miss" in str(error)
    # a held call already late anyway does not block others
    hopeless = Work(steps=200, must=200, prefill=0, deadline=0.5, running=True)
    assert refusal([hopeless], relaxed, 4, c, 0.0, 0.0, 0.15) is None


def test_calls_without_deadlines_or_before_any_measurement_are_never_refused() -> None:
    held, _ = burst(10, deadline=2.0)
    assert refusal(held * 4, Work(steps=500, must=0, prefill=8), 16, costs(), 0.0, 0.0,
                   0.15) is None
    assert refusal(held * 4, Work(steps=500, must=500, prefill=8, deadline=1.0), 16,
                   StepCosts(), 0.0, 0.0, 0.15) is None


def test_queued_encoder_work_counts_before_the_generations() -> None:
    new = Work(steps=63, must=64, prefill=32, deadline=2.0)
    c = costs()
    assert refusal([], new, 16, c, 0.0, lead=0.0, margin=0.15) is None
    assert refusal([], new, 16, c, 0.0, lead=1.5, margin=0.15) is not None


class RowCostRuntime(FakeRuntime):
    """A decode step of n rows sleeps 2 + 2·n ms: each row slows the others."""

    def decode(self, rows: list[int], tokens: list[int], positions: list[int],
               adapters: list[str] | None = None) -> torch.Tensor:
        time.sleep(0.002 * len(rows))
        return super().decode(rows, tokens, positions)


def request(max_tokens: int, deadline: float | None) -> GenerateRequest:
    return GenerateRequest(task="generate", priority=Priority.FOREGROUND, caller=Caller(uid=3),
                           prompt_ids=[1, 2, 3, 4], deadline=deadline,
                           sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))


async def test_the_engine_under_a_burst_finishes_what_it_admits_and_refuses_the_rest() -> None:
    e = Engine(RowCostRuntime(), EngineConfig(  # type: ignore[arg-type]
        kv_slots=16, token_budget=64, prefill_chunk=16, max_queue=64, max_batch_texts=4,
        goodput=GoodputConfig(margin=0.5)))  # a third of the time spare: a busy CI machine
    e.start()
    try:
        for rows in (1, 2, 8):  # measure steps of a few batch sizes
            warm = [e.submit(request(20, None)) for _ in range(rows)]
            await asyncio.gather(*(s.result() for s in warm))
        assert e.deadlines.costs.known
        step8 = e.deadlines.costs.decode(8)
        assert step8 > e.deadlines.costs.decode(1), "more rows cost more"
        deadline = time.monotonic() + 60 * step8  # 60 tokens at ~8 rows' step
        streams, refused = [], []
        for _ in range(40):  # all at once, before the worker takes any of them
            try:
                streams.append(e.submit(request(60, deadline)))
            except Unavailable as error:
                refused.append(error)
        assert streams and refused, (len(streams), len(refused))
        assert len(streams) < 16
        results = await asyncio.gather(*(s.result() for s in streams), return_exceptions=True)
        assert all(isinstance(r, Finished) for r in results), results
        assert e.stats.per_uid[3].rejected == len(refused)
    finally:
        e.stop()


def test_encoder_work_with_deadlines_may_start_as_late_as_the_earliest_deadline_allows() -> None:
    # earliest deadline first: the 1.0 s request's 8 texts (80 ms), then the 2.0 s one's
    assert encoder_latest_start([(2.0, 8), (1.0, 8)], per_text=0.010, margin=0.0,
                                safety=0.0) == pytest.approx(0.92)
    # a later deadline can be the binding one when the work before it is long
    assert encoder_latest_start([(1.0, 8), (1.1, 50)], per_text=0.010, margin=0.0,
                                safety=0.05) == pytest.approx(1.1 - 0.58 - 0.05)
    assert encoder_latest_start([(1.0, 8), (None, 1)], 0.010, 0.0, 0.0) is None, \
        "work without a deadline runs now"


class SlowEncoder(RowCostRuntime):
    """An encoder text costs 20 ms: a burst of Embeds is as long as a generation."""

    encoder_device = "cpu"

    def embed(self, texts: list[str], loras: list[str] | None = None) -> tuple[Any, list[int]]:
        time.sleep(0.020 * len(texts))
        return torch.ones(len(texts), 4), [1] * len(texts)


async def test_embeds_with_deadlines_wait_for_deadline_generations_and_both_are_in_time() -> None:
    e = Engine(SlowEncoder(), EngineConfig(  # type: ignore[arg-type]
        kv_slots=16, token_budget=64, prefill_chunk=16, max_queue=64, max_batch_texts=8,
        goodput=GoodputConfig(margin=0.5)))
    e.start()
    try:
        for rows in (1, 4):  # measure decode steps
            await asyncio.gather(*(e.submit(request(20, None)).result() for _ in range(rows)))
        await e.submit(EmbedRequest(task="embed", priority=Priority.FOREGROUND,
                                    caller=Caller(uid=5), texts=["x"])).result()
        now = time.monotonic()
        generations = [e.submit(request(60, now + 3.0)) for _ in range(3)]
        await asyncio.sleep(0.05)  # the generations are decoding
        embeds = [e.submit(EmbedRequest(task="embed", priority=Priority.FOREGROUND,
                                        caller=Caller(uid=5), texts=["a"] * 8, deadline=now + 3.0))
                  for _ in range(4)]  # 4 × 8 texts × 20 ms = 0.64 s of encoder work
        ended: dict[str, float] = {}

        async def finish(name: str, stream: Any) -> None:
            await stream.result()
            ended[name] = time.monotonic() - now

        await asyncio.gather(*(finish(f"g{i}", s) for i, s in enumerate(generations)),
                             *(finish(f"e{i}", s) for i, s in enumerate(embeds)))
        assert max(ended.values()) < 3.0, ended
        # the embeds waited: they ended after the generations, which ran undisturbed
        assert min(ended[f"e{i}"] for i in range(4)) > max(ended[f"g{i}"] for i in range(3))
    finally:
        e.stop()

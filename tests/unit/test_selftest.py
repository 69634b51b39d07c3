"""The self-test's generation check, with a fake model: exact greedy output passes; output
that differs passes only as a near tie (the model, fed the expected output, ranks every
expected token within NEAR_TIE_NATS of its top); and the scoring borrows a KV row only
while no sequence holds one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from m4d.engine.config import EngineConfig
from m4d.engine.engine import Engine
from m4d.requests import (
    Caller,
    GenerateRequest,
    Priority,
    SamplingParams,
    Scored,
    ScoreRequest,
    TextDelta,
)
from m4d.service import selftest
from m4d.service.selftest import NEAR_TIE_NATS, _generation
from m4d.service.tasks import Origin, SamplingArgs
from test_engine_resume import VOCAB, FakeRuntime

PROMPT = [5, 6, 7]


class ScoringRuntime(FakeRuntime):
    """FakeRuntime (greedy output is a hash of the row) that scores references with preset
    gaps and records whether any sequence held a KV row while it scored."""

    def __init__(self, gaps: list[float]) -> None:
        super().__init__()
        self.gaps = gaps
        self.engine: Engine | None = None
        self.scored_with_sequences: list[int] = []

    def reference_gaps(self, prompt_ids: list[int], reference: list[int], row: int) -> list[float]:
        assert self.engine is not None and row == 0
        self.scored_with_sequences.append(len(self.engine.scheduler.seqs))
        self.prefill(row, prompt_ids, 0)  # it really does use the row
        return self.gaps[:len(reference)]


class FakeTasks:
    """The image's task table, as far as a generation check uses it: every prompt is PROMPT."""

    def generate(self, task_id: str, origin: Origin, *, prompt: str | None = None,
                 chat: Any = None, sampling: SamplingArgs) -> GenerateRequest:
        assert sampling.max_tokens is not None and sampling.temperature == 0.0
        return GenerateRequest(task=task_id, priority=Priority.SYSTEM, caller=origin.caller,
                               prompt_ids=list(PROMPT),
                               sampling=SamplingParams(max_tokens=sampling.max_tokens))


def _engine(runtime: ScoringRuntime) -> Engine:
    engine = Engine(runtime, EngineConfig(  # type: ignore[arg-type]
        kv_slots=2, token_budget=18, prefill_chunk=16, max_queue=8, max_batch_texts=4))
    runtime.engine = engine
    return engine


async def _greedy(n: int) -> list[int]:
    """What the fake model generates after PROMPT."""
    runtime = ScoringRuntime([])
    engine = _engine(runtime)
    engine.start()
    try:
        tokens: list[int] = []
        async for event in engine.submit(FakeTasks().generate(
                "complete", selftest.ORIGIN, sampling=SamplingArgs(max_tokens=n, temperature=0.0))):
            if isinstance(event, TextDelta):
                tokens += event.token_ids
        return tokens
    finally:
        engine.stop()


async def _run(expected: list[int], gaps: list[float]) -> tuple[selftest.CheckResult, ScoringRuntime]:
    runtime = ScoringRuntime(gaps)
    engine = _engine(runtime)
    engine.start()
    try:
        check = {"task": "complete", "input": "x", "max_tokens": len(expected),
                 "expected_token_ids": expected, "expected_text": "the reference"}
        result = await _generation("0:complete", check, FakeTasks(), engine)  # type: ignore[arg-type]
        return result, runtime
    finally:
        engine.stop()


@pytest.mark.asyncio
async def test_exact_greedy_output_passes_without_scoring() -> None:
    expected = await _greedy(6)
    result, runtime = await _run(expected, [9.0] * 6)
    assert result.passed, result.detail
    assert "6 greedy tokens match" in result.detail
    assert runtime.scored_with_sequences == []  # no scoring needed


@pytest.mark.asyncio
async def test_a_different_output_within_the_tie_margin_passes_as_a_near_tie() -> None:
    expected = await _greedy(6)
    expected[2] = (expected[2] + 1) % VOCAB  # the model breaks a tie the other way here
    result, runtime = await _run(expected, [0.0, 0.0, NEAR_TIE_NATS * 0.9, 0.0, 0.0, 0.0])
    assert result.passed, result.detail
    assert "differs from token 2" in result.detail and "near tie" in result.detail
    assert f"widest {NEAR_TIE_NATS * 0.9:.3f} at token 2" in result.detail
    assert runtime.scored_with_sequences == [0]


@pytest.mark.asyncio
async def test_a_reference_token_far_below_the_top_fails() -> None:
    expected = await _greedy(6)
    expected[0] = (expected[0] + 1) % VOCAB
    result, _ = await _run(expected, [0.0, 0.1, 0.2, NEAR_TIE_NATS + 0.01, 3.0, 0.0])
    assert not result.passed
    assert "differs from token 0" in result.detail
    assert "token 4 3.00 nats below its top" in result.detail


@pytest.mark.asyncio
async def test_scoring_waits_until_no_sequence_holds_a_kv_row() -> None:
    runtime = ScoringRuntime([0.25, 0.5])
    engine = _engine(runtime)
    engine.start()
    try:
        long = engine.submit(GenerateRequest(
            task="complete", priority=Priority.BACKGROUND, caller=Caller(uid=1000),
            prompt_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=40, ignore_eos=True)))
        first = long.__aiter__()
        assert isinstance(await first.__anext__(), TextDelta)  # it holds a row now
        scored = engine.submit(ScoreRequest(task="complete", priority=Priority.SYSTEM,
                                            caller=selftest.SYSTEM, prompt_ids=PROMPT,
                                            reference=[1, 2]))
        result = await asyncio.wait_for(scored.result(), timeout=30)
        assert isinstance(result, Scored) and result.gaps == [0.25, 0.5]
        assert runtime.scored_with_sequences == [0]  # only after the generation ended
        rest = [e async for e in first]
        assert sum(len(e.token_ids) for e in rest if isinstance(e, TextDelta)) == 39
    finally:
        engine.stop()

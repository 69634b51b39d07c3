"""Encoder calls keep their own budget in each pass of the step loop: however many
generation streams fill the step's token budget, the next encoder batch (up to
max_batch_texts) runs in the same pass, so an Embed waits for about one model step, not
for the generation flood."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch
from m4d.engine.config import EngineConfig
from m4d.engine.engine import Engine
from m4d.requests import Caller, EmbedRequest, GenerateRequest, Priority, SamplingParams

from tests.unit.test_engine_resume import FakeRuntime


class FakeWithEncoder(FakeRuntime):
    encoder_device = "cpu"

    def embed(self, texts: list[str], loras: list[str] | None = None) -> tuple[Any, list[int]]:
        return torch.ones(len(texts), 4), [1] * len(texts)


async def test_an_embed_runs_within_a_step_or_two_of_a_generation_flood() -> None:
    e = Engine(FakeWithEncoder(), EngineConfig(  # type: ignore[arg-type]
        kv_slots=8, token_budget=24, prefill_chunk=16, max_queue=64, max_batch_texts=4))
    e.start()
    try:
        flood = [e.submit(GenerateRequest(
            task="generate", priority=Priority.FOREGROUND, caller=Caller(uid=100 + i),
            prompt_ids=list(range(1, 40)),
            sampling=SamplingParams(max_tokens=400, ignore_eos=True))) for i in range(16)]
        while e.stats.steps < 20:
            await asyncio.sleep(0.01)
        steps, began = e.stats.steps, time.monotonic()
        embed = e.submit(EmbedRequest(task="embed", priority=Priority.FOREGROUND,
                                      caller=Caller(uid=7), texts=["a", "b", "c"]))
        await asyncio.wait_for(embed.result(), timeout=10)
        assert e.stats.steps - steps <= 2, "it waited for generation steps, not its own turn"
        assert time.monotonic() - began < 1.0
        assert e.stats.in_flight > 1, "the flood was still running"
        for stream in flood:
            stream.cancel()
    finally:
        e.stop()

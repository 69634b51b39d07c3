"""Fair-share preemption on the real backbone: a sequence that loses its KV slot to another
uid of its class and is resumed (its KV parked and restored into whatever slot it gets
next, or re-prefilled from prompt + generated tokens when the park budget is 0) streams
exactly the greedy tokens it streams alone.

The real default image's backbone in float32 (so that batching and chunking move logits by
ulps only, far below any argmax gap of these prompts), two KV slots, a small prefill chunk
so a resume spans several chunks; `min_run_tokens` moves the points where uid 1's streams
are preempted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from m4d.config import Config
from m4d.engine.config import EngineConfig
from m4d.engine.engine import Engine
from m4d.executor.runtime import Runtime
from m4d.requests import Caller, Finished, GenerateRequest, Priority, SamplingParams, TextDelta
from m4image.verify import verify_image

SLOTS, CHUNK = 2, 8
# key: (uid, prompt, max_tokens, seconds after the first request)
REQUESTS = {
    1: (1, "The history of the Roman Empire begins with", 48, 0.0),
    2: (1, "A good recipe for bread needs flour, water,", 48, 0.0),
    3: (1, "def quicksort(xs):\n   ", 48, 0.0),
    4: (2, "The capital of France is", 8, 0.3),
    5: (3, "Water boils at a temperature of", 12, 0.6),
}


@pytest.fixture(scope="module")
def runtime(text_image: Path) -> Iterator[Runtime]:
    rt = Runtime(verify_image(text_image), Config(
        image=text_image, kv_slots=SLOTS, prefill_chunk=CHUNK, step_token_budget=CHUNK + SLOTS,
        weight_format="float32", compute_dtype="float32", max_context=512))
    rt.load()
    yield rt


async def serve(rt: Runtime, keys: list[int], min_run_tokens: int,
                park_tokens: int = 0) -> tuple[dict[int, list[int]], int]:
    engine = Engine(rt, EngineConfig(kv_slots=SLOTS, token_budget=CHUNK + SLOTS,
                                     prefill_chunk=CHUNK, max_queue=16, max_batch_texts=4,
                                     min_run_tokens=min_run_tokens, park_tokens=park_tokens))
    engine.start()
    assert rt.tokenizer is not None
    out: dict[int, list[int]] = {}

    async def one(key: int) -> None:
        uid, prompt, max_tokens, after = REQUESTS[key]
        if len(keys) > 1:
            await asyncio.sleep(after)
        request = GenerateRequest(
            task="generate", priority=Priority.FOREGROUND, caller=Caller(uid=uid),
            prompt_ids=rt.tokenizer.encode(prompt),  # type: ignore[union-attr]
            sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        tokens: list[int] = []
        async for event in engine.submit(request):
            if isinstance(event, TextDelta):
                tokens += event.token_ids
            else:
                assert isinstance(event, Finished), event
        out[key] = tokens

    try:
        await asyncio.wait_for(asyncio.gather(*(one(k) for k in keys)), timeout=300)
    finally:
        engine.stop()
    return out, engine.stats.preempted


@pytest.fixture(scope="module")
def alone(runtime: Runtime) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    for key in REQUESTS:
        tokens.update(asyncio.run(serve(runtime, [key], 16))[0])
    return tokens


@pytest.mark.parametrize(("min_run_tokens", "park_tokens"),
                         [(1, 0), (6, 0), (17, 0), (1, 100_000), (6, 100_000), (17, 60)])
async def test_preempted_and_resumed_streams_give_their_greedy_tokens(
        runtime: Runtime, alone: dict[int, list[int]], min_run_tokens: int,
        park_tokens: int) -> None:
    busy, preempted = await serve(runtime, list(REQUESTS), min_run_tokens, park_tokens)
    assert preempted > 0, "uids 2 and 3 should have taken slots from uid 1"
    assert busy == alone

"""The prefix cache on the real backbone: prompts that share a long start (a system prompt)
compute it once; the others copy its blocks into their rows and compute only the rest, and
their greedy tokens are exactly those computed without the cache. Also the served format
(w4a8, the fused decode step) where the CPU has the kernels."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from m4d.config import Config
from m4d.engine.config import EngineConfig
from m4d.engine.engine import Engine
from m4d.engine.prefixes import PrefixCache
from m4d.executor.runtime import Runtime
from m4d.requests import Caller, GenerateRequest, Priority, SamplingParams, TextDelta
from m4image.verify import verify_image

SYSTEM = ("You are the assistant of a small phone. You answer in one short sentence, "
          "politely, without lists, and you never make up facts. ") * 14  # ~400 tokens
QUESTIONS = ["What is the capital of France?", "How many legs has a spider?",
             "What colour is the sky?", "Name a fruit that is yellow."]
CHUNK = 128


@pytest.fixture(scope="module", params=["float32", "w4a8"])
def runtime(text_image: Path, request: pytest.FixtureRequest) -> Iterator[Runtime]:
    rt = Runtime(verify_image(text_image), Config(
        image=text_image, kv_slots=4, prefill_chunk=CHUNK, step_token_budget=CHUNK + 4,
        weight_format=request.param, compute_dtype="float32", max_context=1024))
    rt.load()
    yield rt


def prompts(rt: Runtime) -> list[list[int]]:
    assert rt.chat_template is not None and rt.tokenizer is not None
    return [rt.tokenizer.encode(rt.chat_template.render(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
        add_generation_prompt=True)) for q in QUESTIONS]


def serve(rt: Runtime, cache_tokens: int, sequential: bool) -> tuple[list[list[int]], int, int]:
    """Greedy tokens per prompt, prompt tokens the engine computed, tokens it reused."""
    engine = Engine(rt, EngineConfig(kv_slots=4, token_budget=CHUNK + 4, prefill_chunk=CHUNK,
                                     max_queue=16, max_batch_texts=4,
                                     prefix_cache_tokens=cache_tokens))
    engine.start()

    async def one(ids: list[int]) -> list[int]:
        tokens: list[int] = []
        request = GenerateRequest(task="chat", priority=Priority.FOREGROUND,
                                  caller=Caller(uid=7), prompt_ids=ids,
                                  sampling=SamplingParams(max_tokens=12, temperature=0.0,
                                                          ignore_eos=True))
        async for event in engine.submit(request):
            if isinstance(event, TextDelta):
                tokens += event.token_ids
        return tokens

    async def run() -> list[list[int]]:
        if sequential:
            return [await one(ids) for ids in prompts(rt)]
        first = await one(prompts(rt)[0])  # the others arrive once it is cached
        return [first, *await asyncio.gather(*(one(ids) for ids in prompts(rt)[1:]))]

    try:
        out = asyncio.run(run())
    finally:
        engine.stop()
    return out, engine.stats.tokens_prompted, engine.prefixes.cache.tokens_reused


def test_shared_prefixes_are_computed_once_and_give_the_same_tokens(runtime: Runtime) -> None:
    ids = prompts(runtime)
    shared = next(i for i in range(min(map(len, ids))) if len({p[i] for p in ids}) > 1)
    assert shared > 6 * 64, "the system prompt spans several cache blocks"
    plain, computed_plain, reused_plain = serve(runtime, 0, sequential=True)
    assert reused_plain == 0 and computed_plain == sum(map(len, ids))
    cached, computed, reused = serve(runtime, 4096, sequential=False)
    assert cached == plain, "a restored prefix changes no token"
    blocks = shared // 64 * 64
    assert reused == 3 * blocks
    assert computed == sum(map(len, ids)) - 3 * blocks  # ≈ the prefix once + the questions


def test_the_cache_evicts_least_recently_used_blocks_within_its_budget() -> None:
    cache = PrefixCache(block=4, budget=12)  # three blocks
    saved: list[tuple[int, int]] = []

    def save(start: int, end: int) -> tuple[int, int]:
        saved.append((start, end))
        return (start, end)

    assert cache.insert(list(range(10)), save) == 2  # two full blocks (8 of 10 tokens)
    assert cache.insert([0, 1, 2, 3, 9, 9, 9, 9, 5], save) == 1  # shares the first block
    hit = cache.lookup(list(range(10)))
    assert hit is not None and hit.tokens == 8
    assert cache.insert([7, 7, 7, 7, 1], save) == 1  # evicts the least recently used block
    assert cache.tokens == 12
    loaded: list[tuple[object, int]] = []
    cache.restore(hit, lambda kv, start: loaded.append((kv, start)))
    assert loaded == [((0, 4), 0), ((4, 8), 4)], "pinned blocks were not evicted"
    assert cache.lookup([0, 1, 2, 3, 9, 9, 9, 9, 5]) is not None
    assert cache.lookup([0, 1, 2, 3]) is None, "the last prompt token is always computed"


def test_a_sessions_tail_is_found_under_its_chain_and_counts_its_own_size() -> None:
    cache = PrefixCache(block=4, budget=12)
    saved: list[tuple[int, int]] = []

    def save(start: int, end: int) -> tuple[int, int]:
        saved.append((start, end))
        return (start, end)

    turn = [1, 2, 3, 4, 5, 6]  # a turn's prompt and reply: one block and a tail of two
    assert cache.insert(turn, save, tail=True) == 2 and cache.tokens == 6
    assert saved == [(0, 4), (4, 6)]
    hit = cache.lookup([*turn, 7, 8, 9])  # the next turn starts with it
    assert hit is not None and hit.tokens == 6
    loaded: list[tuple[object, int]] = []
    cache.restore(hit, lambda kv, start: loaded.append((kv, start)))
    assert loaded == [((0, 4), 0), ((4, 6), 4)]
    assert cache.lookup([1, 2, 3, 4, 5, 9, 9]).tokens == 4, "a tail that differs is not used"
    assert cache.lookup([*turn]).tokens == 4, "the last prompt token is always computed"
    assert cache.lookup([9, 9, 9, 9, 5, 6, 7]) is None, "a tail belongs to its chain"
    assert cache.insert([1, 2, 3, 4, 5], save) == 0  # no tail without tail=True


def test_kv_computed_through_an_adapter_is_reused_only_with_that_adapter() -> None:
    """The same prompt through two adapters (or none) has different KV: each chain of blocks
    starts at its own root, tails included."""
    from m4d.engine.prefixes import Prefixes

    cache = PrefixCache(block=4, budget=64)
    saves: list[str] = []

    class Copier:
        def save(self, row: int):  # type: ignore[no-untyped-def]
            return lambda start, end: saves.append(f"{row}:{start}-{end}") or f"{row}:{start}"

        def load(self, row: int):  # type: ignore[no-untyped-def]
            return lambda kv, start: None

    prefixes = Prefixes(cache, Copier())  # type: ignore[arg-type]
    ids = list(range(11))
    prefixes.computed(ids, row=1, adapter="slu")
    assert prefixes.arrived(1, ids) == 0, "the base model must not reuse the adapter's KV"
    assert prefixes.arrived(2, ids, adapter="other") == 0
    assert prefixes.arrived(3, ids, adapter="slu") == 8
    prefixes.computed(ids, row=2, tail=True)  # the base's own chain, with its tail
    assert prefixes.arrived(4, [*ids, 5]) == 11
    assert prefixes.arrived(5, [*ids, 5], adapter="slu") == 8  # the slu chain has no tail
    assert len(saves) == 5  # 2 slu blocks, 2 base blocks and the base tail

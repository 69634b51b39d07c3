"""The engine side of preemption, with a fake runtime whose next token depends on every
token in the KV row: a sequence that is preempted and re-prefilled from prompt + generated
tokens must stream exactly the tokens it streams when it runs alone."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from m4d.engine.config import EngineConfig
from m4d.engine.engine import Engine
from m4d.requests import (
    Caller,
    Finished,
    GenerateRequest,
    Priority,
    SamplingParams,
    TextDelta,
)

VOCAB = 97


class FakeTokenizer:
    eos_id = -1

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return "".join(chr(33 + i % 90) for i in ids)


class FakeRuntime:
    """Rows of token ids stand in for the KV cache; the next token hashes the whole row."""

    device = "cpu"
    tokenizer = FakeTokenizer()
    max_context = 512

    def __init__(self) -> None:
        self.rows: dict[int, list[int]] = {}

    def _next(self, row: int) -> torch.Tensor:
        logits = torch.zeros(VOCAB)
        logits[hash(tuple(self.rows[row])) % VOCAB] = 1.0
        return logits

    def prefill(self, row: int, ids: list[int], start: int, adapter: str = "") -> torch.Tensor:
        cache = self.rows.setdefault(row, [])
        assert len(cache) >= start, f"a chunk at {start} but the row holds {len(cache)}"
        self.rows[row] = cache[:start] + list(ids)
        return self._next(row)

    def park(self, row: int, length: int) -> list[int]:
        assert len(self.rows[row]) >= length, f"parks {length} tokens of {self.rows[row]}"
        return list(self.rows[row][:length])

    def restore(self, row: int, parked: list[int]) -> None:
        self.rows[row] = list(parked)

    def discard_rows(self, rows: list[int]) -> None:
        for row in rows:  # as the real cache: the row's memory is gone, it reads as empty
            self.rows[row] = []

    def decode(self, rows: list[int], tokens: list[int], positions: list[int],
               adapters: list[str] | None = None) -> torch.Tensor:
        time.sleep(0.002)  # long enough for the foreground request to arrive mid-run
        out = []
        for row, token, pos in zip(rows, tokens, positions, strict=True):
            assert len(self.rows[row]) == pos, f"decode at {pos}, row holds {len(self.rows[row])}"
            self.rows[row].append(token)
            out.append(self._next(row))
        return torch.stack(out)


Req = tuple[int, Priority, int, int]  # key, class, prompt length, max_tokens


async def serve(reqs: list[Req], slots: int, kv_tokens: int | None,
                uids: dict[int, int] | None = None,
                min_run_tokens: int = 16, park_tokens: int = 0,
                prompted: list[int] | None = None) -> tuple[dict[int, list[int]], int]:
    """Streams each request (one uid each unless `uids` maps its key to one), 50 ms apart;
    appends to `prompted` the prompt tokens the engine computed."""
    engine = Engine(FakeRuntime(), EngineConfig(  # type: ignore[arg-type]
        kv_slots=slots, token_budget=16 + slots, prefill_chunk=16, max_queue=16,
        max_batch_texts=4, kv_tokens=kv_tokens, min_run_tokens=min_run_tokens,
        park_tokens=park_tokens))
    engine.start()
    out: dict[int, list[int]] = {}

    async def one(key: int, priority: Priority, prompt: int, max_tokens: int) -> None:
        uid = (uids or {}).get(key, 1000 + key)
        request = GenerateRequest(
            task="generate", priority=priority, caller=Caller(uid=uid),
            prompt_ids=[(7 * key + i) % VOCAB for i in range(prompt)],
            sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        tokens: list[int] = []
        async for event in engine.submit(request):
            if isinstance(event, TextDelta):
                tokens += event.token_ids
            else:
                assert isinstance(event, Finished), event
        out[key] = tokens

    try:
        tasks = []
        for r in reqs:
            tasks.append(asyncio.create_task(one(*r)))
            await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    finally:
        engine.stop()
    if prompted is not None:
        prompted.append(engine.stats.tokens_prompted)
    return out, engine.stats.preempted


@pytest.mark.parametrize("park_tokens", [0, 100, 10_000])
@pytest.mark.parametrize("kv_tokens", [None, 200])
async def test_preempted_sequences_resume_to_the_same_tokens(kv_tokens: int | None,
                                                             park_tokens: int) -> None:
    reqs: list[Req] = [(1, Priority.BACKGROUND, 40, 120), (2, Priority.BACKGROUND, 33, 120),
                       (3, Priority.FOREGROUND, 20, 30), (4, Priority.SYSTEM, 50, 20)]
    alone: dict[int, list[int]] = {}
    for r in reqs:
        alone.update((await serve([r], slots=4, kv_tokens=None))[0])
    prompted: list[int] = []
    busy, preempted = await serve(reqs, slots=2, kv_tokens=kv_tokens, park_tokens=park_tokens,
                                  prompted=prompted)
    assert preempted > 0, "the foreground requests should have preempted background work"
    assert busy == alone
    prompts = sum(r[2] for r in reqs)
    if park_tokens == 0:  # recompute: the preempted re-prefill prompt + generated tokens
        assert prompted[0] > prompts
    elif park_tokens == 10_000:  # every preempted sequence's KV was kept: no prompt twice
        assert prompted[0] == prompts


@pytest.mark.parametrize("min_run", [1, 5, 23])
async def test_fair_share_preemption_in_one_class_resumes_to_the_same_tokens(
        min_run: int) -> None:
    # uid 1 holds both rows with long streams; uids 2 and 3 (same class) take rows from it
    # at different points of its streams (min_run moves the preemption point)
    fg = Priority.FOREGROUND
    reqs: list[Req] = [(1, fg, 20, 150), (2, fg, 37, 150), (3, fg, 5, 150),
                       (4, fg, 12, 10), (5, fg, 40, 25)]
    uids = {1: 1, 2: 1, 3: 1, 4: 2, 5: 3}
    alone: dict[int, list[int]] = {}
    for r in reqs:
        alone.update((await serve([r], slots=2, kv_tokens=None))[0])
    for park_tokens in (0, 10_000):
        busy, preempted = await serve(reqs, slots=2, kv_tokens=None, uids=uids,
                                      min_run_tokens=min_run, park_tokens=park_tokens)
        assert preempted > 0, "uids 2 and 3 should have taken rows from uid 1"
        assert busy == alone, f"park_tokens={park_tokens}"

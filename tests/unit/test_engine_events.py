"""How the engine's events reach a client, without a model.

1. A background decode batch cut short by a foreground request that arrives mid-batch: the
   foreground request's first token goes out before the postponed background rows decode,
   and no background token changes.
2. `RequestStream` merges the text deltas a slow reader has queued, and nothing else.
3. `Sequence` sends its first token at once, with empty text when the text is held back.

No sleeping to make things happen: the foreground request is submitted from inside the
fake runtime's decode call (the worker waits until the event loop has taken it), and the
slicing is forced by the engine's constructor arguments (a tiny `decode_slice_ms`, a huge
`urgent_window`).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from m4d.engine.config import EngineConfig
from m4d.engine.engine import Engine
from m4d.engine.latency import LatencyConfig
from m4d.engine.sequence import Sequence
from m4d.engine.stream import RequestStream
from m4d.errors import Cancelled, Internal
from m4d.requests import (
    Caller,
    Event,
    Failed,
    Finished,
    FinishReason,
    GenerateRequest,
    Priority,
    SamplingParams,
    SourceText,
    TextDelta,
    Timings,
    Usage,
)
from test_engine_resume import VOCAB, FakeRuntime

# ---- 1. a background decode batch cut short by a foreground request ------------------


class RecordingRuntime(FakeRuntime):
    """FakeRuntime (the next token hashes the row's own tokens, and it checks that every
    decode feeds the position the row has reached), recording the calls it gets, with a
    hook that runs on the worker thread at the start of each decode call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.on_decode: Callable[[list[int]], None] | None = None
        self.on_prefill: Callable[[int, int], None] | None = None

    def prefill(self, row: int, ids: list[int], start: int, adapter: str = "") -> Any:
        if self.on_prefill is not None:
            self.on_prefill(row, start)
        self.calls.append(("prefill", (row,)))
        return super().prefill(row, ids, start)

    def decode(self, rows: list[int], tokens: list[int], positions: list[int],
               adapters: list[str] | None = None) -> Any:
        if self.on_decode is not None:
            self.on_decode(rows)
        self.calls.append(("decode", tuple(rows)))
        return super().decode(rows, tokens, positions)


NUM_BG = 12  # background rows: slices of 4 (the engine's smallest slice) → 3 slices a step
BG_PROMPT, BG_TOKENS = 10, 24
FG_KEY, WARM_KEY = 50, 60


def _request(key: int, priority: Priority, prompt: int, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(
        task="generate", priority=priority, caller=Caller(uid=1000 + key),
        prompt_ids=[(7 * key + i) % VOCAB for i in range(prompt)],
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))


async def _collect(stream: RequestStream, tokens: list[int] | None = None) -> list[int]:
    tokens = [] if tokens is None else tokens  # filled as the deltas arrive
    async for event in stream:
        if isinstance(event, TextDelta):
            tokens += event.token_ids
        else:
            assert isinstance(event, Finished), event
    return tokens


def _engine(runtime: RecordingRuntime) -> Engine:
    slots = NUM_BG + 1
    return Engine(runtime, EngineConfig(  # type: ignore[arg-type]
        kv_slots=slots, token_budget=16 + slots, prefill_chunk=16, max_queue=32,
        max_batch_texts=4, latency=LatencyConfig(
            decode_slice_ms=1e-6,  # every sliced batch runs in slices of 4 rows
            urgent_window=1e6)))  # once an urgent request has come, slicing stays on


async def _run_background(interrupt: bool) -> dict[str, Any]:
    """Serves NUM_BG background requests; with `interrupt`, a foreground request is
    submitted while the first slice of a fully sliced 12-row background batch runs."""
    runtime = RecordingRuntime()
    engine = _engine(runtime)
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {"fired": False, "violations": []}
    last_step = [-1]

    async def submit_fg() -> None:  # on the event loop, called from the worker thread
        stream = engine.submit(_request(FG_KEY, Priority.FOREGROUND, 6, 8))
        out["fg_id"] = stream.request.id
        out["fg_live"] = []
        out["fg_task"] = asyncio.create_task(_collect(stream, out["fg_live"]))

    async def fg_has_first_token() -> bool:  # runs after every delivery posted before it
        stream = engine._streams.get(out["fg_id"])
        queued = stream is not None and any(isinstance(e, TextDelta) for e in stream._events)
        return queued or bool(out["fg_live"])  # in the stream, or already read from it

    def on_decode(rows: list[int]) -> None:  # on the worker thread
        if out["fired"] and "fg_seen_before_postponed" not in out and any(
                engine.scheduler.seqs[sid].row in rows for sid in out["postponed"]
                if sid in engine.scheduler.seqs):
            # the postponed rows are about to decode: has the foreground request's first
            # token already been posted to the event loop (not just queued)?
            out["fg_seen_before_postponed"] = asyncio.run_coroutine_threadsafe(
                fg_has_first_token(), loop).result(timeout=30)
        if engine.stats.steps == last_step[0]:
            return  # a later slice of the same step
        last_step[0] = engine.stats.steps
        running = engine.scheduler.running
        # bookkeeping at the first decode call of a step: every decoding row has been
        # charged exactly for the tokens it has (a postponed row must not be charged)
        for s in running.values():
            if s.prefilling:
                continue
            have = len(engine._sequences[s.id].tokens)
            if s.generated != have or s.computed != s.prompt_len + have - 1:
                out["violations"].append((s.id, s.generated, s.computed, have))
        if not interrupt or out["fired"]:
            return
        if (len(running) < NUM_BG or len(rows) >= len(running)  # not a slice
                or any(s.prefilling or s.generated < 3 for s in running.values())):
            return
        out["first_slice_len"] = len(rows)
        out["fired"] = True
        # the rows this slice leaves to later, and how many tokens they have now
        out["postponed"] = {s.id: len(engine._sequences[s.id].tokens)
                            for s in running.values() if s.row not in rows}
        out["cut_call"] = len(runtime.calls)  # the index this decode call will get
        asyncio.run_coroutine_threadsafe(submit_fg(), loop).result(timeout=30)

    runtime.on_decode = on_decode
    engine.start()
    try:
        # an earlier urgent request: from now on (urgent_window) background decode is sliced
        await asyncio.wait_for(_collect(engine.submit(
            _request(WARM_KEY, Priority.FOREGROUND, 4, 2))), timeout=30)
        streams = {key: engine.submit(_request(key, Priority.BACKGROUND, BG_PROMPT, BG_TOKENS))
                   for key in range(NUM_BG)}
        out["bg_ids"] = {key: s.request.id for key, s in streams.items()}
        results = await asyncio.wait_for(
            asyncio.gather(*(_collect(s) for s in streams.values())), timeout=60)
        out["bg"] = dict(zip(streams, results, strict=True))
        if "fg_task" in out:
            out["fg"] = await asyncio.wait_for(out["fg_task"], timeout=30)
        else:  # the same foreground request alone, for comparison
            out["fg"] = await asyncio.wait_for(_collect(engine.submit(
                _request(FG_KEY, Priority.FOREGROUND, 6, 8))), timeout=30)
    finally:
        engine.stop()
    out["calls"] = runtime.calls
    return out


async def test_foreground_arriving_mid_batch_cuts_background_decode(
        monkeypatch: pytest.MonkeyPatch) -> None:
    delivered: list[tuple[int, Event]] = []  # every event, in the order streams receive it
    put = RequestStream._put

    def recording_put(self: RequestStream, event: Event) -> None:
        delivered.append((self.request.id, event))
        put(self, event)

    monkeypatch.setattr(RequestStream, "_put", recording_put)

    alone = await _run_background(interrupt=False)
    busy = await _run_background(interrupt=True)

    assert busy["fired"], "the 12-row background batch was never decoded in slices"
    assert busy["first_slice_len"] == 4, "a tiny decode_slice_ms gives the smallest slice"
    postponed = busy["postponed"]
    assert len(postponed) == NUM_BG - 4

    # the step ended after the first slice: the next model call is the foreground prefill,
    # and the postponed rows decode only after it
    calls = busy["calls"]
    cut = busy["cut_call"]
    assert calls[cut][0] == "decode" and len(calls[cut][1]) == 4
    assert calls[cut + 1][0] == "prefill", f"after the cut slice came {calls[cut + 1]}"
    fg_row = calls[cut + 1][1][0]
    first_fg_decode = next(i for i, c in enumerate(calls) if c[0] == "decode" and fg_row in c[1])
    assert first_fg_decode > cut + 1

    # the foreground request's first token was posted to its stream before the postponed
    # rows decoded, and reached it before any postponed row's next token
    assert busy["fg_seen_before_postponed"] is True
    fg_id = busy["fg_id"]
    fg_first = next(i for i, (rid, e) in enumerate(delivered)
                    if rid == fg_id and isinstance(e, TextDelta))
    assert delivered[fg_first][1].token_ids == (busy["fg"][0],)
    for sid, had in postponed.items():
        count = 0
        for i, (rid, event) in enumerate(delivered):
            if rid == sid and isinstance(event, TextDelta):
                count += len(event.token_ids)
                if count > had:
                    assert i > fg_first, (
                        f"request {sid} got token {had + 1} before the foreground request's "
                        "first token")
                    break
        else:
            pytest.fail(f"request {sid} never got its token {had + 1}")

    # postponed rows were not charged for the step they sat out, and no token changed
    assert busy["violations"] == [] and alone["violations"] == []
    assert busy["bg"] == alone["bg"]
    assert all(len(t) == BG_TOKENS for t in busy["bg"].values())
    assert busy["fg"] == alone["fg"] and len(busy["fg"]) == 8


async def test_urgent_prompt_chunk_runs_and_posts_before_a_background_chunk() -> None:
    """A foreground request admitted while a long background prompt is being prefilled:
    in the step that holds both prompt chunks, the foreground chunk runs first and its
    first token is posted before the background chunk runs."""
    runtime = RecordingRuntime()
    engine = _engine(runtime)
    loop = asyncio.get_running_loop()
    seen: dict[str, Any] = {"live": []}
    order: list[tuple[int, int]] = []  # (request id, chunk start) of each prefill

    async def submit_fg() -> None:
        stream = engine.submit(_request(FG_KEY, Priority.FOREGROUND, 6, 4))
        seen["fg_id"] = stream.request.id
        seen["fg_task"] = asyncio.create_task(_collect(stream, seen["live"]))

    async def fg_has_first_token() -> bool:
        return bool(seen["live"]) or any(
            isinstance(e, TextDelta) for e in engine._streams[seen["fg_id"]]._events)

    def on_prefill(row: int, start: int) -> None:  # on the worker thread
        sid = next(s.id for s in engine.scheduler.running.values() if s.row == row)
        order.append((sid, start))
        if sid == seen.get("bg_id") and start == 0:
            asyncio.run_coroutine_threadsafe(submit_fg(), loop).result(timeout=30)
        elif sid == seen.get("bg_id") and start == 16:
            seen["fg_first_before_bg_chunk"] = asyncio.run_coroutine_threadsafe(
                fg_has_first_token(), loop).result(timeout=30)

    runtime.on_prefill = on_prefill
    engine.start()
    try:
        bg = engine.submit(_request(3, Priority.BACKGROUND, 48, 4))  # 3 chunks of 16
        seen["bg_id"] = bg.request.id
        bg_tokens = await asyncio.wait_for(_collect(bg), timeout=30)
        fg_tokens = await asyncio.wait_for(seen["fg_task"], timeout=30)
    finally:
        engine.stop()
    fg_id, bg_id = seen["fg_id"], bg.request.id
    assert order == [(bg_id, 0), (fg_id, 0), (bg_id, 16), (bg_id, 32)]
    assert seen["fg_first_before_bg_chunk"] is True
    assert len(bg_tokens) == 4 and len(fg_tokens) == 4


# ---- 2. RequestStream merges queued text deltas --------------------------------------


class _NoEngine:
    def cancel(self, request_id: int) -> None:
        raise AssertionError("not expected")


def _stream() -> RequestStream:
    return RequestStream(_request(1, Priority.FOREGROUND, 3, 8), _NoEngine().cancel)


def _finished() -> Finished:
    return Finished(FinishReason.LENGTH, Usage(3, 5), Timings())


async def _read_all(stream: RequestStream) -> list[Event]:
    return [e async for e in stream]


async def test_queued_deltas_reach_a_slow_reader_as_one() -> None:
    stream = _stream()
    for event in (TextDelta("Hel", (1,)), TextDelta("", (2,)), TextDelta("lo", (3, 4)),
                  TextDelta(" w", (5,)), _finished()):
        stream._put(event)
    assert await _read_all(stream) == [TextDelta("Hello w", (1, 2, 3, 4, 5)), _finished()]
    assert stream.done


async def test_non_delta_events_are_never_merged_or_reordered() -> None:
    stream = _stream()
    failed = Failed(Cancelled("cancelled by the client"))  # errors compare by identity
    events: list[Event] = [
        SourceText("one", 1.5), SourceText("two", 0.0),  # two in a row: both kept
        TextDelta("a", (1,)), TextDelta("b", (2,)),
        SourceText("three"),  # splits the deltas around it
        TextDelta("c", (3,)), TextDelta("d", (4,)), TextDelta("e", (5, 6)),
        failed,
        TextDelta("after the end", (9,)),  # never read: the stream ended with Failed
    ]
    for event in events:
        stream._put(event)
    assert await _read_all(stream) == [
        SourceText("one", 1.5), SourceText("two", 0.0),
        TextDelta("ab", (1, 2)),
        SourceText("three"),
        TextDelta("cde", (3, 4, 5, 6)),
        failed,
    ]


async def test_a_reader_that_keeps_up_gets_each_delta() -> None:
    stream = _stream()
    it = stream.__aiter__()
    stream._put(TextDelta("x", (1,)))
    assert await anext(it) == TextDelta("x", (1,))
    stream._put(TextDelta("y", (2,)))
    assert await anext(it) == TextDelta("y", (2,))  # nothing queued behind it: not merged
    stream._put(TextDelta("z", (3,)))
    stream._put(TextDelta("!", (4,)))
    failed = Failed(Internal("boom"))
    stream._put(failed)
    assert await anext(it) == TextDelta("z!", (3, 4))
    assert await anext(it) == failed
    with pytest.raises(StopAsyncIteration):
        await anext(it)


async def test_result_raises_a_failed_event_behind_merged_deltas() -> None:
    stream = _stream()
    stream._put(TextDelta("p", (1,)))
    stream._put(TextDelta("q", (2,)))
    stream._put(Failed(Cancelled("gone")))
    with pytest.raises(Cancelled):
        await stream.result()


async def test_engine_deltas_queued_for_a_slow_reader_arrive_merged() -> None:
    """Through the real worker: a reader that reads nothing until the request has ended
    gets all its tokens in one delta, then Finished; the ids are those a fast reader gets."""
    runtime = RecordingRuntime()
    engine = _engine(runtime)
    engine.start()
    try:
        fast = await asyncio.wait_for(_collect(engine.submit(
            _request(7, Priority.FOREGROUND, 5, 12))), timeout=30)
        slow = engine.submit(_request(7, Priority.FOREGROUND, 5, 12))
        for _ in range(3000):  # until the worker has posted the final event
            if slow._events and isinstance(slow._events[-1], Finished):
                break
            await asyncio.sleep(0.01)
        events = await _read_all(slow)
    finally:
        engine.stop()
    assert len(fast) == 12
    assert len(events) == 2, events
    delta, end = events
    assert isinstance(delta, TextDelta) and isinstance(end, Finished)
    assert delta.token_ids == tuple(fast)
    assert delta.text == runtime.tokenizer.decode(fast)
    assert end.usage.completion_tokens == 12


# ---- 3. Sequence sends its first token at once ---------------------------------------


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255); 256 is EOS."""

    eos_id = 256

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def _feed(ids: list[int], stop: tuple[str, ...] = (), max_tokens: int = 100,
          ) -> tuple[list[TextDelta | None], Finished | None]:
    """Each token's delta (None: nothing sent for it), and the finish if one came."""
    request = GenerateRequest(task="generate", priority=Priority.FOREGROUND, caller=Caller(),
                              prompt_ids=[1, 2, 3],
                              sampling=SamplingParams(max_tokens=max_tokens, stop=stop))
    seq = Sequence(request, stream=None, tokenizer=ByteTokenizer())  # type: ignore[arg-type]
    deltas: list[TextDelta | None] = []
    for token in ids:
        delta, finished = seq.add_token(token, max_context=10_000)
        deltas.append(delta)
        if finished is not None:
            return deltas, finished
    return deltas, None


def _joined(deltas: list[TextDelta | None]) -> tuple[str, list[int]]:
    sent = [d for d in deltas if d is not None]
    return "".join(d.text for d in sent), list(itertools.chain.from_iterable(
        d.token_ids for d in sent))


@pytest.mark.parametrize("text", ["é and more", "🚀 lift-off", "東京"])
def test_first_token_that_is_part_of_a_utf8_character_goes_out_at_once(text: str) -> None:
    tok = ByteTokenizer()
    ids = [*tok.encode(text), tok.eos_id]
    deltas, finished = _feed(ids)
    assert deltas[0] == TextDelta("", (ids[0],)), "the first token waited for its character"
    width = len(text[0].encode("utf-8"))
    # the rest of the character's bytes: nothing (not the first token), then the character
    assert deltas[1:width - 1] == [None] * (width - 2)
    assert deltas[width - 1] == TextDelta(text[0], tuple(ids[1:width]))
    assert all("\ufffd" not in d.text for d in deltas if d is not None)
    streamed, sent_ids = _joined(deltas)
    assert streamed == text == tok.decode(ids)
    assert sent_ids == ids[:-1]  # every id exactly once, in order (EOS is not streamed)
    assert finished is not None and finished.reason is FinishReason.EOS


def test_first_token_that_may_begin_a_stop_string_goes_out_at_once() -> None:
    tok = ByteTokenizer()
    ids = [*tok.encode("<x> is not a stop"), tok.eos_id]
    deltas, finished = _feed(ids, stop=("<|end|>",))
    assert deltas[0] == TextDelta("", (ord("<"),))
    assert deltas[1] is not None and deltas[1].text == "<x"  # no longer a stop prefix
    streamed, sent_ids = _joined(deltas)
    assert streamed == "<x> is not a stop"
    assert sent_ids == ids[:-1]
    assert finished is not None and finished.reason is FinishReason.EOS


def test_first_token_held_for_a_stop_string_that_then_completes() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("<|end|>tail")
    deltas, finished = _feed(ids, stop=("<|end|>",))
    assert deltas[0] == TextDelta("", (ord("<"),))
    assert deltas[1:6] == [None] * 5  # held: later tokens are not sent at once
    streamed, sent_ids = _joined(deltas)
    assert streamed == ""  # the stop string is never streamed
    assert sent_ids == ids[:7]
    assert finished is not None and finished.reason is FinishReason.STOP


def test_first_token_with_plain_text_is_sent_as_is() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("ok")
    deltas, finished = _feed(ids, max_tokens=2)
    assert deltas == [TextDelta("o", (ord("o"),)), TextDelta("k", (ord("k"),))]
    assert finished is not None and finished.reason is FinishReason.LENGTH


def test_only_the_first_token_is_forced_out() -> None:
    """A later token whose text is held back sends nothing until the text is complete."""
    tok = ByteTokenizer()
    ids = tok.encode("a🚀b")
    deltas, _ = _feed(ids, max_tokens=len(ids))
    assert deltas[0] == TextDelta("a", (ord("a"),))
    assert deltas[1:4] == [None, None, None]
    assert deltas[4] == TextDelta("🚀", tuple(ids[1:5]))
    assert _joined(deltas) == ("a🚀b", ids)


# ---- 4. background encoder batches cut to a slice while urgent requests come -------------


class TimedEncoder:
    """An encoder that costs 1 ms per text (it sleeps: the cost the engine measures) and
    records the size of every batch it runs."""

    device = encoder_device = "cpu"
    tokenizer = None
    max_context = 64

    def __init__(self) -> None:
        self.batches: list[int] = []

    def embed(self, texts: list[str], loras: list[str] | None = None) -> tuple[Any, list[int]]:
        import time

        import torch

        time.sleep(0.001 * len(texts))
        self.batches.append(len(texts))
        return torch.ones(len(texts), 4), [1] * len(texts)


def _encoder_batches(urgent_window: float) -> list[int]:
    """One foreground Embed (marks urgency, measures the encoder), then 24 one-text
    background Embeds queued while the worker is held, so it sees all of them at once."""
    from m4d.requests import EmbedRequest

    runtime = TimedEncoder()
    engine = Engine(runtime, EngineConfig(  # type: ignore[arg-type]
        kv_slots=2, token_budget=64, prefill_chunk=32, max_queue=64, max_batch_texts=16,
        latency=LatencyConfig(decode_slice_ms=5.0, urgent_window=urgent_window)))

    def embed(priority: Priority, uid: int) -> RequestStream:  # one uid each: under its quota
        return engine.submit(EmbedRequest(task="embed", priority=priority,
                                          caller=Caller(uid=uid), texts=[f"text {uid}"]))

    async def run() -> None:
        await embed(Priority.FOREGROUND, 999).result()
        with engine._lock:  # the worker takes its inbox under this (re-entrant) lock
            streams = [embed(Priority.BACKGROUND, 1000 + i) for i in range(24)]
        await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)), timeout=30)

    engine.start()
    try:
        asyncio.run(run())
    finally:
        engine.stop()
    assert runtime.batches[0] == 1 and sum(runtime.batches[1:]) == 24
    return runtime.batches[1:]


def test_background_encoder_batches_are_sliced_while_urgent_requests_come() -> None:
    # ~1 ms per text and 5 ms slices: a few texts per batch, never the full 16
    sliced = _encoder_batches(urgent_window=1e6)
    assert max(sliced) <= 8 and len(sliced) >= 3, sliced
    # with no urgent request lately the encoder batches as much as it may
    assert _encoder_batches(urgent_window=0.0) == [16, 8]

"""The engine's pure policies beside the scheduler, without a model or a clock: which
encoder, media or backbone work runs next (`Batcher`), and how background work yields to
urgent work (`LatencyPolicy`: decode slices, encoder slices and deferral)."""

from __future__ import annotations

import pytest
from m4d.engine.batching import Batcher, encoder_texts
from m4d.engine.latency import LatencyConfig, LatencyPolicy, Slice
from m4d.requests import (
    Caller,
    ClassifyRequest,
    EmbedRequest,
    GenerateRequest,
    MediaOp,
    MediaRequest,
    PredictNextRequest,
    Priority,
    ScoreRequest,
)

SYS, FG, BG = Priority.SYSTEM, Priority.FOREGROUND, Priority.BACKGROUND


def latency(slice_ms: float = 20.0, window: float = 5.0, defer: float = 0.5,
            ms_per_row: float = 0.0, ms_per_text: float = 0.0) -> LatencyPolicy:
    policy = LatencyPolicy(LatencyConfig(decode_slice_ms=slice_ms, urgent_window=window,
                                         encoder_defer_max=defer))
    policy.ms_per_row, policy.ms_per_text = ms_per_row, ms_per_text
    return policy


# ---- LatencyPolicy: decode slices --------------------------------------------------------


def test_a_batch_runs_whole_without_a_recent_urgent_request() -> None:
    policy = latency(ms_per_row=1.0)
    assert policy.decode_slices([BG] * 12, now=100.0) == [Slice(0, 12, False)]
    policy.arrived(BG, now=99.0)  # background arrivals do not count
    assert policy.decode_slices([BG] * 12, now=100.0) == [Slice(0, 12, False)]
    policy.arrived(FG, now=90.0)  # urgent, but longer ago than urgent_window
    assert policy.decode_slices([BG] * 12, now=100.0) == [Slice(0, 12, False)]


def test_background_decode_is_sliced_while_urgent_requests_come() -> None:
    policy = latency(slice_ms=20.0, ms_per_row=5.0)  # 4 rows per 20 ms slice
    policy.arrived(FG, now=99.0)
    assert policy.decode_slices([BG] * 12, now=100.0) == [
        Slice(0, 4, True), Slice(4, 8, True), Slice(8, 12, False)]
    # urgent rows come first in the batch: the step may only end where background begins
    assert policy.decode_slices([FG, FG, FG, FG, BG, BG, BG, BG, BG], now=100.0) == [
        Slice(0, 4, True), Slice(4, 9, False)]  # no tail slice of 1 row: it joins the last
    assert policy.decode_slices([FG] * 8 + [SYS], now=100.0) == [Slice(0, 9, False)]


@pytest.mark.parametrize(("slice_ms", "ms_per_row", "rows"), [
    (20.0, 1.0, 20),  # 20 rows of 1 ms fill a slice
    (20.0, 50.0, 4),  # never fewer than MIN_DECODE_SLICE rows
    (1e-6, 1.0, 4),
])
def test_slice_size_follows_the_measured_row_cost(slice_ms: float, ms_per_row: float,
                                                  rows: int) -> None:
    policy = latency(slice_ms=slice_ms, ms_per_row=ms_per_row)
    policy.arrived(SYS, now=0.0)
    slices = policy.decode_slices([BG] * 64, now=1.0)
    assert slices[0] == Slice(0, rows, True)
    assert [s.start for s in slices[1:]] == [s.stop for s in slices[:-1]]
    assert slices[-1].stop == 64 and not slices[-1].may_yield
    assert all(s.stop - s.start >= rows // 2 for s in slices)


def test_no_slicing_when_off_or_the_cost_is_unknown() -> None:
    for policy in (latency(slice_ms=0.0, ms_per_row=1.0), latency(ms_per_row=0.0)):
        policy.arrived(FG, now=0.0)
        assert policy.decode_slices([BG] * 16, now=1.0) == [Slice(0, 16, False)]
    assert latency().decode_slices([], now=0.0) == []


def test_measured_costs_are_running_averages() -> None:
    policy = latency()
    policy.decoded(rows=4, seconds=0.008)
    assert policy.ms_per_row == pytest.approx(2.0)  # the first sample as it is
    policy.decoded(rows=2, seconds=0.012)
    assert policy.ms_per_row == pytest.approx(0.8 * 2.0 + 0.2 * 6.0)
    policy.encoded(texts=0, seconds=0.003)  # no division by zero
    assert policy.ms_per_text == pytest.approx(3.0)


# ---- LatencyPolicy and Batcher: encoder batches ----------------------------------------


def embed(rid: int, priority: Priority = BG, texts: int = 1, arrival: float = 0.0,
          ) -> EmbedRequest:
    return EmbedRequest(task="embed", priority=priority, caller=Caller(uid=1000), id=rid,
                        arrival=arrival, texts=[f"t{rid}.{i}" for i in range(texts)])


def batcher(policy: LatencyPolicy | None = None, max_texts: int = 8, max_media: int = 3,
            wait: float = 0.002) -> Batcher:
    return Batcher(policy or latency(), max_batch_texts=max_texts, max_batch_media=max_media,
                   encoder_max_wait=wait)


def test_encoder_texts_of_a_classification_are_the_text_and_its_labels() -> None:
    request = ClassifyRequest(task="classify", priority=FG, caller=Caller(), text="hi",
                              labels=["a", "b"])
    assert encoder_texts(request) == ["hi", "a", "b"]


def test_a_partial_encoder_batch_is_held_only_while_the_executor_is_idle() -> None:
    b = batcher(wait=0.010)
    b.add(embed(1, arrival=1.000))
    plan = b.next_encoder(1.004, busy=False, urgent_waiting=False)
    assert plan.batch == [] and plan.hold == pytest.approx(0.006)
    assert len(b.encoder) == 1, "holding takes nothing off the queue"
    assert b.next_encoder(1.004, busy=True, urgent_waiting=False).batch[0].id == 1
    b.add(embed(2, arrival=1.0))
    b.add(PredictNextRequest(task="predict", priority=BG, caller=Caller(), id=3))
    assert [r.id for r in b.next_encoder(1.0, busy=False, urgent_waiting=False).batch] == [2]
    assert b.next_backbone(rows_in_use=False) is not None
    b.add(embed(4, arrival=1.0))
    assert b.next_encoder(1.011, busy=False, urgent_waiting=False).batch[0].id == 4  # waited


def test_a_full_encoder_batch_runs_at_once_and_never_over_the_limit() -> None:
    b = batcher(max_texts=8)
    for rid, texts in ((1, 3), (2, 4), (3, 2), (4, 9)):
        b.add(embed(rid, texts=texts))
    first = b.next_encoder(0.0, busy=False, urgent_waiting=False)
    assert [r.id for r in first.batch] == [1, 2] and first.num_texts == 7 and first.hold == 0
    assert [r.id for r in b.next_encoder(0.0, busy=True, urgent_waiting=False).batch] == [3]
    # one request bigger than the limit still runs, alone
    assert [r.id for r in b.next_encoder(0.0, busy=True, urgent_waiting=False).batch] == [4]
    assert not b and b.next_encoder(0.0, busy=True, urgent_waiting=False).batch == []


def test_background_encoder_work_defers_to_urgent_generation_for_a_while() -> None:
    b = batcher(latency(defer=0.5))
    b.add(embed(1, BG, arrival=10.0))
    assert b.next_encoder(10.1, busy=True, urgent_waiting=True).batch == []  # deferred
    assert b.next_encoder(10.1, busy=True, urgent_waiting=False).batch[0].id == 1
    b.add(embed(2, BG, arrival=10.0))
    assert b.next_encoder(10.6, busy=True, urgent_waiting=True).batch[0].id == 2  # waited enough
    b.add(embed(3, BG, arrival=10.0))
    b.add(embed(4, FG, arrival=10.0))  # urgent texts in the queue: nothing waits
    assert [r.id for r in b.next_encoder(10.1, busy=True, urgent_waiting=True).batch] == [3, 4]


def test_background_encoder_batches_are_cut_to_a_slice_while_urgent_requests_come() -> None:
    policy = latency(slice_ms=10.0, ms_per_text=3.0)  # 3 texts per 10 ms slice
    b = batcher(policy, max_texts=16)
    for rid in range(6):
        b.add(embed(rid))
    assert len(b.next_encoder(0.0, busy=True, urgent_waiting=False).batch) == 6  # no urgency
    for rid in range(6):
        b.add(embed(rid))
    policy.arrived(FG, now=0.0)
    assert len(b.next_encoder(1.0, busy=True, urgent_waiting=False).batch) == 3
    b.add(embed(9, FG))  # an urgent text in the batch: not cut
    assert len(b.next_encoder(1.0, busy=True, urgent_waiting=False).batch) == 4


# ---- Batcher: media and backbone work, the queues --------------------------------------


def media(rid: int, module: str, priority: Priority = FG, arrival: float = 0.0) -> MediaRequest:
    return MediaRequest(task="t", priority=priority, caller=Caller(), id=rid, arrival=arrival,
                        op=MediaOp.TRANSCRIBE, module=module)


def test_a_media_batch_is_the_most_urgent_requests_module_most_urgent_first() -> None:
    b = batcher(max_media=3)
    for request in (media(1, "ocr", FG, 0.0), media(2, "speech", BG, 0.1),
                    media(3, "speech", FG, 0.3), media(4, "ocr", BG, 0.2),
                    media(5, "speech", SYS, 0.4), media(6, "speech", FG, 0.2),
                    media(7, "speech", BG, 0.0)):
        b.add(request)
    assert [r.id for r in b.next_media()] == [5, 6, 3]  # speech: the system request leads
    assert [r.id for r in b.next_media()] == [1, 4]  # ocr: its foreground request is oldest
    assert [r.id for r in b.next_media()] == [7, 2]
    assert b.next_media() == []


def test_a_score_waits_for_free_kv_rows_and_holds_the_backbone_queue() -> None:
    b = batcher()
    score = ScoreRequest(task="score", priority=SYS, caller=Caller(), id=1)
    predict = PredictNextRequest(task="predict", priority=FG, caller=Caller(), id=2)
    b.add(score)
    b.add(predict)
    assert b.next_backbone(rows_in_use=True) is None
    assert b.next_backbone(rows_in_use=False) is score
    assert b.next_backbone(rows_in_use=True) is predict
    assert b.next_backbone(rows_in_use=False) is None


def test_queues_add_remove_and_count() -> None:
    b = batcher()
    assert not b.add(GenerateRequest(task="g", priority=FG, caller=Caller()))
    assert b.add(embed(1)) and b.add(media(2, "speech")) and b.add(
        PredictNextRequest(task="p", priority=FG, caller=Caller(), id=3))
    assert b.num_waiting == 2, "backbone calls do not count against the queue bound"
    assert sorted(r.id for r in b.requests()) == [1, 2, 3]
    for rid in (1, 2, 3):
        b.remove(rid)
    assert not b and b.num_waiting == 0

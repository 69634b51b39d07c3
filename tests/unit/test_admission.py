"""Admission control: bounded class queues, per-uid concurrency and token-rate quotas,
class caps; each refusal says which status and when to retry."""

from __future__ import annotations

import pytest
from m4d.engine.admission import Admission, AdmissionConfig, UidQuota
from m4d.errors import ResourceExhausted, Unavailable
from m4d.requests import Priority

SYS, FG, BG = Priority.SYSTEM, Priority.FOREGROUND, Priority.BACKGROUND


def test_ok_then_quota_on_concurrent_requests() -> None:
    adm = Admission(AdmissionConfig(quota=UidQuota(max_concurrent=2)))
    assert adm.check(1000, FG, 10, now=0.0).ok
    assert adm.check(1000, FG, 10, now=0.0).ok
    d = adm.check(1000, FG, 10, now=0.0)
    assert d.status == "quota" and "2 requests in flight" in d.message
    assert isinstance(d.error(), ResourceExhausted) and d.retry_after == 1.0
    assert adm.check(2000, FG, 10, now=0.0).ok, "another uid is not affected"
    adm.release(1000, FG)
    assert adm.check(1000, FG, 10, now=0.0).ok


def test_token_bucket_limits_rate_and_says_when_to_retry() -> None:
    quota = UidQuota(max_concurrent=100, tokens_per_second=100.0, burst_tokens=300.0)
    adm = Admission(AdmissionConfig(quota=quota))
    assert adm.check(7, FG, 200, now=0.0).ok
    d = adm.check(7, FG, 200, now=0.0)  # 100 left, needs 200: 1 s at 100 tokens/s
    assert d.status == "quota" and d.retry_after == pytest.approx(1.0)
    assert "100 tokens/s" in d.message and isinstance(d.error(), ResourceExhausted)
    assert not adm.check(7, FG, 200, now=0.9).ok
    assert adm.check(7, FG, 200, now=1.0).ok
    assert adm.check(7, FG, 10_000, now=10.0).ok, "a request above the burst waits for a full bucket"
    assert not adm.check(7, FG, 1, now=10.0).ok


def test_unused_tokens_are_refunded_on_release() -> None:
    quota = UidQuota(max_concurrent=100, tokens_per_second=1.0, burst_tokens=100.0)
    adm = Admission(AdmissionConfig(quota=quota))
    assert adm.check(7, FG, 100, now=0.0).ok
    assert not adm.check(7, FG, 50, now=0.0).ok
    adm.release(7, FG, unused_tokens=60)  # it stopped early
    assert adm.check(7, FG, 50, now=0.0).ok


def test_full_class_queue_is_busy_not_quota() -> None:
    adm = Admission(AdmissionConfig(priority_limits={FG: 2, BG: 1}))
    assert adm.check(1, FG, 1, 0.0).ok and adm.check(2, FG, 1, 0.0).ok
    d = adm.check(3, FG, 1, 0.0)
    assert d.status == "busy" and d.retry_after == 0.5
    assert "2 foreground requests" in d.message and isinstance(d.error(), Unavailable)
    assert adm.check(3, BG, 1, 0.0).ok, "each class has its own bound"
    assert adm.check(3, SYS, 1, 0.0).ok, "a class without a limit is unbounded"
    adm.release(1, FG)
    assert adm.check(3, FG, 1, 0.0).ok


def test_max_priority_caps_a_uid() -> None:
    adm = Admission(AdmissionConfig(max_priority={10123: BG}, weights={10123: 0.5},
                                    priority_limits={BG: 1}))
    d = adm.check(10123, SYS, 1, 0.0)
    assert d.ok and d.priority == BG and d.weight == 0.5 and d.error() is None
    assert adm.per_priority == {BG: 1}
    assert adm.check(10123, FG, 1, 0.0).status == "busy", "counted against background"
    assert adm.check(1, SYS, 1, 0.0).priority == SYS, "other uids keep their class"


def test_refusals_take_nothing() -> None:
    adm = Admission(AdmissionConfig(priority_limits={FG: 0},
                                    quota=UidQuota(tokens_per_second=1.0, burst_tokens=10.0)))
    for _ in range(5):
        assert adm.check(1, FG, 10, 0.0).status == "busy"
    assert adm.in_flight.get(1, 0) == 0
    assert adm.check(1, BG, 10, 0.0).ok, "the bucket was not charged by the refusals"


def test_queued_requests_per_uid_are_capped_not_the_running_ones() -> None:
    adm = Admission(AdmissionConfig(quota=UidQuota(max_concurrent=100, max_queued=2)))
    assert adm.check(5, FG, 10, 0.0).ok and adm.check(5, FG, 10, 0.0).ok
    d = adm.check(5, FG, 10, 0.0, started=0)
    assert d.status == "quota" and isinstance(d.error(), ResourceExhausted)
    assert "2 requests waiting to start (limit 2)" in d.message and d.retry_after == 1.0
    assert adm.check(5, FG, 10, 0.0, started=1).ok, "one of them runs: one may queue"
    assert adm.check(6, FG, 10, 0.0).ok, "another uid is not affected"


def test_tokens_in_flight_per_uid_are_capped_and_freed_on_release() -> None:
    adm = Admission(AdmissionConfig(quota=UidQuota(max_concurrent=100,
                                                   max_tokens_in_flight=1000)))
    assert adm.check(5, FG, 2000, 0.0).ok, "a uid with nothing in flight is always admitted"
    d = adm.check(5, FG, 1, 0.0)
    assert d.status == "quota" and "limit 1000 tokens in flight" in d.message
    assert isinstance(d.error(), ResourceExhausted) and d.retry_after == 1.0
    adm.release(5, FG, estimate=2000)
    assert adm.check(5, FG, 600, 0.0).ok and adm.check(5, FG, 400, 0.0).ok
    assert not adm.check(5, FG, 1, 0.0).ok
    assert adm.tokens[5] == 1000
    adm.release(5, FG, unused_tokens=500, estimate=600)
    assert adm.check(5, FG, 600, 0.0).ok and adm.tokens[5] == 1000


def test_limits_for_status_are_the_default_quotas() -> None:
    quota = UidQuota(max_concurrent=32, max_queued=16, max_running=12, max_tokens_in_flight=8192)
    limits = Admission(AdmissionConfig(quota=quota)).limits()
    assert (limits.max_in_flight, limits.max_queued, limits.max_running,
            limits.max_tokens_in_flight) == (32, 16, 12, 8192)

"""Recent rates and percentiles behind Status and `m4ctl top`, from engine snapshots, with
the clock passed in."""

from __future__ import annotations

import itertools

from m4d.engine.stats import EngineSnapshot, EngineStats
from m4d.engine.usage import SAMPLE_EVERY, WINDOW, RecentUsage, percentile, usage_view
from m4d.requests import Priority


def snapshot(stats: EngineStats | None = None,
             running: dict[int, tuple[int, int]] | None = None,
             queued: tuple[tuple[int, Priority], ...] = ()) -> EngineSnapshot:
    """A snapshot with these counters and these running sequences' tokens (uid -> in, out)."""
    return EngineSnapshot(stats=stats or EngineStats(), kv_slots=4, active_sequences=0,
                          waiting=0, queued=queued, running_tokens=running or {},
                          kv_blocks_used=0, kv_blocks_total=0)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) == 0.0


def test_samples_are_spaced_and_kept_for_the_window() -> None:
    recent = RecentUsage()
    for i in range(100):
        now = i * 0.1
        if recent.due(now):  # asked every 0.1 s: kept every SAMPLE_EVERY
            recent.add(snapshot(), now)
    kept = list(recent._samples)
    assert all(b.t - a.t >= SAMPLE_EVERY - 1e-9 for a, b in itertools.pairwise(kept))
    assert kept[-1].t - kept[0].t <= WINDOW + SAMPLE_EVERY
    base = recent.base(now=9.9)
    assert base is not None and base.t <= 9.9 - WINDOW + 2 * SAMPLE_EVERY


def test_rates_count_running_sequences_per_uid() -> None:
    recent, stats = RecentUsage(), EngineStats()
    stats.uid(1000).tokens_generated = 100  # finished requests
    recent.add(snapshot(stats, running={1000: (10, 5)}), now=0.0)
    assert recent._samples[-1].per_uid[1000] == (10, 105)
    stats.tokens_generated = 40
    recent.add(snapshot(stats, running={1000: (10, 45)}), now=2.0)
    first, last = recent._samples[0], recent._samples[-1]
    assert (last.per_uid[1000][1] - first.per_uid[1000][1]) / (last.t - first.t) == 20.0
    assert last.decode == 40


def test_recent_ttft_keeps_the_latest_thousand() -> None:
    stats = EngineStats()
    for i in range(1500):
        stats.observe_ttft(i / 1000)
    assert len(stats.recent_ttft) == 1000 and stats.recent_ttft[0] == 0.5
    assert sum(stats.ttft_counts) == 1500


def test_the_view_reads_only_the_snapshot() -> None:
    stats = EngineStats()
    stats.admit(1000, "mail", Priority.BACKGROUND)
    stats.admit(1000, "mail", Priority.BACKGROUND)
    stats.finish(1000, failed=False, tokens_in=7, tokens_out=3)
    stats.reject(1000)
    stats.observe_ttft(0.2)
    recent = RecentUsage()
    recent.add(snapshot(stats), now=0.0)
    view = usage_view(snapshot(stats, running={1000: (4, 20)},
                               queued=((1000, Priority.BACKGROUND),)), recent, now=2.0)
    (row,) = view.uids
    assert (row.requests_ok, row.requests_failed, row.requests_rejected) == (1, 0, 1)
    assert (row.tokens_in, row.tokens_out, row.in_flight, row.queued) == (11, 23, 1, 1)
    assert row.tokens_per_second == 10.0 and row.apps == ["mail"]
    assert row.priority is Priority.BACKGROUND
    assert view.queue_depth == {Priority.SYSTEM: 0, Priority.FOREGROUND: 0,
                                Priority.BACKGROUND: 1}
    assert view.ttft_samples == 1 and view.ttft_p50_ms == 200.0


def test_uid_slots_tokens_in_flight_preemptions_and_limits_are_shown() -> None:
    from m4d.engine.stats import UidLimits

    stats = EngineStats()
    stats.admit(7, "", Priority.FOREGROUND)
    stats.uid(7).preempted = 2
    stats.uid(7).stalled = 1
    snap = EngineSnapshot(stats=stats, kv_slots=4, active_sequences=1, waiting=0, queued=(),
                          running_tokens={}, kv_blocks_used=0, kv_blocks_total=0,
                          rows_held={7: 1}, tokens_in_flight={7: 300},
                          limits=UidLimits(32, 16, 12, 8192), paused=3)
    view = usage_view(snap, RecentUsage(), now=1.0)
    (u,) = view.uids
    assert (u.running, u.tokens_in_flight, u.preempted, u.stalled) == (1, 300, 2, 1)
    assert view.limits == UidLimits(32, 16, 12, 8192) and view.paused_sequences == 3

"""Recent rates and percentiles behind Status and `m4ctl top`, with the clock passed in."""

from __future__ import annotations

import itertools
import threading
from types import SimpleNamespace

from m4d.engine.engine import EngineStats
from m4d.engine.usage import SAMPLE_EVERY, WINDOW, RecentUsage, percentile


def fake_engine() -> SimpleNamespace:
    return SimpleNamespace(stats=EngineStats(), _sequences={}, _lock=threading.Condition())


def running(uid: int, prompt: int, prompted: int, generated: int) -> SimpleNamespace:
    request = SimpleNamespace(caller=SimpleNamespace(uid=uid), prompt_ids=[1] * prompt)
    return SimpleNamespace(request=request, prompted=prompted, tokens=[7] * generated)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) == 0.0


def test_samples_are_spaced_and_kept_for_the_window() -> None:
    engine, recent = fake_engine(), RecentUsage()
    for i in range(100):
        recent.maybe_sample(engine, now=i * 0.1)  # every 0.1 s: kept every SAMPLE_EVERY
    kept = list(recent._samples)
    assert all(b.t - a.t >= SAMPLE_EVERY - 1e-9 for a, b in itertools.pairwise(kept))
    assert kept[-1].t - kept[0].t <= WINDOW + SAMPLE_EVERY
    base = recent.base(now=9.9)
    assert base is not None and base.t <= 9.9 - WINDOW + 2 * SAMPLE_EVERY


def test_rates_count_running_sequences_per_uid() -> None:
    engine, recent = fake_engine(), RecentUsage()
    engine.stats.uid(1000).tokens_generated = 100  # finished requests
    engine._sequences = {1: running(1000, prompt=10, prompted=10, generated=5)}
    recent.maybe_sample(engine, now=0.0)
    assert recent._samples[-1].per_uid[1000] == (10, 105)
    engine._sequences = {1: running(1000, prompt=10, prompted=10, generated=45)}
    engine.stats.tokens_generated = 40
    recent.maybe_sample(engine, now=2.0)
    first, last = recent._samples[0], recent._samples[-1]
    assert (last.per_uid[1000][1] - first.per_uid[1000][1]) / (last.t - first.t) == 20.0
    assert last.decode == 40


def test_recent_ttft_keeps_the_latest_thousand() -> None:
    stats = EngineStats()
    for i in range(1500):
        stats.observe_ttft(i / 1000)
    assert len(stats.recent_ttft) == 1000 and stats.recent_ttft[0] == 0.5
    assert sum(stats.ttft_counts) == 1500

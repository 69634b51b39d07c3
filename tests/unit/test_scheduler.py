"""The scheduler as a pure policy, without a model: budgets, rows, order, chunking."""

from __future__ import annotations

import pytest

from m4d.engine.scheduler import Scheduler, SeqState


def seq(i: int, prompt: int, priority: int = 1, arrival: float | None = None,
        max_new: int = 8) -> SeqState:
    return SeqState(id=i, priority=priority, arrival=float(i) if arrival is None else arrival,
                    prompt_len=prompt, max_new_tokens=max_new)


def run(s: Scheduler, steps: int) -> list:
    plans = []
    for _ in range(steps):
        plan = s.schedule()
        assert plan.num_tokens <= s.token_budget
        rows = [r for _, r in plan.decode] + [c.row for c in plan.prefill]
        assert len(set(rows)) == len(rows), "a row is used twice in one step"
        assert all(0 <= r < s.num_rows for r in rows)
        s.update(plan)
        plans.append(plan)
    return plans


def test_long_prompt_is_chunked_and_decoders_keep_running() -> None:
    s = Scheduler(num_rows=4, token_budget=67, max_waiting=8, chunk_size=63)
    s.add(seq(1, prompt=10))
    plan = s.schedule()
    s.update(plan)
    assert [c.length for c in plan.prefill] == [10] and plan.prefill[0].last
    s.add(seq(2, prompt=300))
    lengths = []
    for _ in range(6):
        plan = s.schedule()
        s.update(plan)
        assert (1, plan.decode[0][1]) in plan.decode, "the running stream decodes every step"
        lengths += [c.length for c in plan.prefill if c.seq_id == 2]
        assert plan.num_tokens <= 64
    assert sum(lengths) == 300 and max(lengths) == 63


def test_rows_are_limited_and_freed_on_finish() -> None:
    s = Scheduler(num_rows=2, token_budget=100, max_waiting=8)
    for i in range(1, 5):
        s.add(seq(i, prompt=5))
    run(s, 2)
    assert set(s.running) == {1, 2}
    s.finish(1)
    plan = s.schedule()
    assert [c.seq_id for c in plan.prefill] == [3]
    assert plan.prefill[0].row in (0, 1)


def test_priority_class_is_admitted_first() -> None:
    s = Scheduler(num_rows=1, token_budget=100, max_waiting=8)
    s.add(seq(1, prompt=4, priority=2, arrival=0.0))
    s.add(seq(2, prompt=4, priority=0, arrival=1.0))
    plan = s.schedule()
    assert [c.seq_id for c in plan.prefill] == [2]


def test_finished_while_waiting_is_skipped() -> None:
    s = Scheduler(num_rows=1, token_budget=100, max_waiting=8)
    s.add(seq(1, prompt=4))
    s.add(seq(2, prompt=4))
    s.finish(1)
    plan = s.schedule()
    assert [c.seq_id for c in plan.prefill] == [2]
    assert s.num_waiting == 0


def test_waiting_queue_bound() -> None:
    s = Scheduler(num_rows=1, token_budget=10, max_waiting=2)
    s.add(seq(1, prompt=4))
    assert s.can_accept()
    s.add(seq(2, prompt=4))
    assert not s.can_accept()


def chunk_starts(s: Scheduler, seq_id: int, steps: int = 200) -> list[int]:
    starts = []
    for _ in range(steps):
        plan = s.schedule()
        starts += [c.start for c in plan.prefill if c.seq_id == seq_id]
        s.update(plan)
        if seq_id in s.seqs and not s.seqs[seq_id].prefilling:
            break
    return starts


def test_chunk_boundaries_do_not_depend_on_load() -> None:
    alone = Scheduler(num_rows=4, token_budget=40, max_waiting=8, chunk_size=16)
    alone.add(seq(9, prompt=70))
    busy = Scheduler(num_rows=4, token_budget=40, max_waiting=8, chunk_size=16)
    for i in range(3):
        busy.add(seq(i, prompt=30 + i, max_new=100))
    busy.add(seq(9, prompt=70, arrival=10.0))
    assert chunk_starts(alone, 9) == chunk_starts(busy, 9) == [0, 16, 32, 48, 64]


def test_budget_must_hold_a_chunk_beside_every_decoder() -> None:
    with pytest.raises(ValueError, match="must hold a prefill chunk"):
        Scheduler(num_rows=8, token_budget=20, max_waiting=4, chunk_size=16)


@pytest.mark.parametrize(("budget", "chunk"), [(4, 1), (10, 7), (40, 33)])
def test_budget_never_exceeded_under_load(budget: int, chunk: int) -> None:
    s = Scheduler(num_rows=3, token_budget=budget, max_waiting=50, chunk_size=chunk)
    for i in range(10):
        s.add(seq(i, prompt=5 + 13 * i))
    plans = run(s, 40)
    assert any(p.decode for p in plans)

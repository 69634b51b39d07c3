"""Fair share over KV rows, without a model: a uid that holds more than its share of rows
gives one back (by preemption) when another uid of the same class waits; after a minimum
run, never two uids trading a row back and forth; shares converge to the weights.

Issue 15: one app with two dozen long streams held every row until they finished, and a
second app's 8-token request got no answer for 90 s.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from m4d.engine.policy import FairPolicy, PriorityPolicy, QueuePolicy
from m4d.engine.scheduler import Scheduler

from tests.unit.test_scheduler import BACKGROUND, FOREGROUND, Sim, seq

A, B, C = 10, 11, 12


def rows_of(s: Scheduler) -> Counter[int]:
    return Counter(q.uid for q in s.running.values())


def flooded(rows: int = 4, streams: int = 24, min_run: int = 4,
            policy: QueuePolicy | None = None) -> Sim:
    """uid A holds every row with long streams, more of them waiting; each has run a while."""
    s = Scheduler(num_rows=rows, token_budget=16 + rows, max_waiting=100, chunk_size=16,
                  policy=policy or FairPolicy(), min_run_tokens=min_run)
    sim = Sim(s)
    for i in range(1, streams + 1):
        sim.add(seq(i, 10, FOREGROUND, uid=A, max_new=10_000))
    for _ in range(rows + min_run + 2):
        sim.step()
    assert rows_of(s) == {A: rows}
    return sim


def test_a_waiting_uid_takes_a_row_from_the_uid_over_its_share() -> None:
    sim = flooded()
    s = sim.s
    computed = {i: q.computed for i, q in s.running.items()}
    sim.add(seq(100, 10, FOREGROUND, uid=B, max_new=8))
    # B joins at A's virtual time (no banked credit), so A's older waiting requests head the
    # queue for one step; once A is charged for that step, B is the head
    assert not sim.step().preempted
    plan = sim.step()
    assert len(plan.preempted) == 1
    victim = plan.preempted[0]
    assert s.seqs[victim].uid == A
    assert computed[victim] == min(computed.values()), "the cheapest to recompute goes"
    assert [c.seq_id for c in plan.prefill] == [100], "the waiting uid gets the row at once"
    assert rows_of(s) == {A: 3, B: 1}
    while 100 not in sim.done:
        assert not sim.step().preempted, "one row is enough for one request"
    assert sim.done[100] - sim.now < 0.5


def test_the_issue_scenario_the_short_request_finishes_within_its_own_length() -> None:
    # 16 rows, 24 long streams of uid A; uid B asks for 8 tokens: done in one step in the
    # queue (see above), 1 prefill and 7 decode steps
    sim = flooded(rows=16, streams=24, min_run=16)
    arrived = sim.now
    sim.add(seq(100, 12, FOREGROUND, uid=B, max_new=8))
    for _ in range(9):
        sim.step()
    assert 100 in sim.done and sim.done[100] - arrived <= 9 * sim.dt


def test_sequences_are_not_movable_before_their_minimum_run() -> None:
    # B already holds a row: its second request waits until A's sequences ran 10 tokens
    s = Scheduler(num_rows=4, token_budget=40, max_waiting=100, chunk_size=16,
                  min_run_tokens=10)
    sim = Sim(s)
    for i in (1, 2, 5):
        sim.add(seq(i, 10, FOREGROUND, uid=A, max_new=1000))
    sim.add(seq(4, 10, FOREGROUND, uid=B, max_new=1000))
    sim.step()  # prefill: each has 1 token
    sim.add(seq(3, 10, FOREGROUND, uid=B, max_new=8))
    waited = 0
    while not sim.step().preempted and waited < 50:
        waited += 1
    assert waited == 9 and 3 in s.running, "B waits until A's sequences ran 10 tokens, no more"


def test_an_app_holding_no_row_does_not_wait_for_the_minimum_run() -> None:
    # B holds nothing: A's sequences are movable once past their prefill (3 chunks of 16)
    s = Scheduler(num_rows=2, token_budget=34, max_waiting=100, chunk_size=16,
                  min_run_tokens=10)
    sim = Sim(s)
    sim.add(seq(1, 40, FOREGROUND, uid=A, max_new=1000))
    sim.add(seq(2, 40, FOREGROUND, uid=A, max_new=1000))
    sim.step()  # A's first chunks
    sim.add(seq(3, 10, FOREGROUND, uid=B, max_new=8))
    moved = [sim.step().preempted for _ in range(3)]
    assert moved[:2] == [[], []], "a sequence in its prefill is not moved"
    assert len(moved[2]) == 1 and 3 in s.running, "then B gets a row, not 10 tokens later"


def test_a_resumed_sequence_gets_a_full_minimum_run_again() -> None:
    sim = flooded(rows=2, min_run=6)
    sim.add(seq(100, 10, FOREGROUND, uid=B, max_new=1000))
    sim.add(seq(101, 10, FOREGROUND, uid=B, max_new=1000))
    sim.add(seq(102, 10, FOREGROUND, uid=C, max_new=1000))
    moved: dict[int, list[int]] = {}
    for step in range(200):
        for victim in sim.step().preempted:
            moved.setdefault(victim, []).append(step)
    assert moved
    for victim, steps in moved.items():  # resumed: a prefill step, then 6 tokens at least
        assert all(b - a > 6 for a, b in itertools.pairwise(steps)), (victim, steps)


def test_equal_shares_do_not_trade_rows() -> None:
    # two uids with 2 rows each and deep queues: nobody is over a share, nobody moves
    s = Scheduler(num_rows=4, token_budget=20, max_waiting=100, chunk_size=16, min_run_tokens=1)
    sim = Sim(s)
    for i in range(1, 3):
        sim.add(seq(i, 10, FOREGROUND, uid=A, max_new=10_000))
        sim.add(seq(10 + i, 10, FOREGROUND, uid=B, max_new=10_000))
    sim.step()
    for i in range(3, 20):
        sim.add(seq(i, 10, FOREGROUND, uid=A, max_new=10_000))
        sim.add(seq(10 + i * 10, 10, FOREGROUND, uid=B, max_new=10_000))
    for _ in range(500):
        assert not sim.step().preempted
    assert rows_of(s) == {A: 2, B: 2}


@pytest.mark.parametrize(("weights", "expected"), [
    ({A: 1.0, B: 1.0}, {A: 4, B: 4}),
    ({A: 1.0, B: 1.0, C: 1.0}, None),  # 8 rows in thirds: 3, 3, 2 in some order
    ({A: 1.0, B: 3.0}, {A: 2, B: 6}),
])
def test_rows_converge_to_the_weighted_shares(weights: dict[int, float],
                                              expected: dict[int, int] | None) -> None:
    sim = flooded(rows=8, streams=30, min_run=4)
    s = sim.s
    for i in range(30):
        for uid, w in weights.items():
            if uid != A:
                sim.add(seq(1000 * uid + i, 10, FOREGROUND, uid=uid, weight=w, max_new=10_000))
    for q in s.seqs.values():
        q.weight = weights[q.uid]
    preempted = 0
    for _ in range(100):
        preempted += len(sim.step().preempted)
    shares = rows_of(s)
    if expected is None:
        assert sorted(shares.values()) == [2, 3, 3]
    else:
        assert shares == expected
    settled = sum(len(sim.step().preempted) for _ in range(500))
    assert settled == 0, "once shares are met, nothing moves"
    assert preempted <= 8, "each row moved at most once on the way"


def test_only_the_fair_policy_preempts_within_a_class() -> None:
    for policy in (QueuePolicy(), PriorityPolicy()):
        sim = flooded(policy=policy)
        sim.add(seq(100, 10, FOREGROUND, uid=B, max_new=8))
        assert not any(sim.step().preempted for _ in range(50))
        assert 100 not in sim.s.running


def test_a_more_urgent_class_preempts_at_once_and_a_less_urgent_never() -> None:
    sim = flooded(min_run=1000)  # same-class work is never movable here
    sim.add(seq(100, 10, BACKGROUND, uid=B, max_new=8))
    assert not any(sim.step().preempted for _ in range(20))
    sim.add(seq(101, 10, 0, uid=C, max_new=8))
    plan = sim.step()
    assert len(plan.preempted) == 1 and 101 in sim.s.running


def test_kv_memory_victims_follow_the_share_too() -> None:
    # memory, not rows, is short: B's long prompt needs two of A's sequences' blocks
    from m4d.engine.kvpool import KVPool

    s = Scheduler(num_rows=8, token_budget=24, max_waiting=100, chunk_size=16,
                  kv=KVPool(16 * 8, 16), min_run_tokens=2)
    sim = Sim(s)
    for i in range(1, 5):
        sim.add(seq(i, 20, FOREGROUND, uid=A, max_new=12))  # 32 tokens: 2 blocks each
    while len(s.running) < 4 or any(q.prefilling for q in s.running.values()):
        sim.step()
    for _ in range(3):
        sim.step()
    assert s.kv.free == 0
    sim.add(seq(100, 30, FOREGROUND, uid=B, max_new=2))  # first chunk: one block
    plan = sim.step()
    assert len(plan.preempted) == 1 and s.seqs[plan.preempted[0]].uid == A
    assert 100 in s.running


def test_a_uid_at_its_slot_cap_is_passed_over_not_blocking_others() -> None:
    caps = {A: 2}
    s = Scheduler(num_rows=4, token_budget=20, max_waiting=100, chunk_size=16,
                  max_running=lambda uid: caps.get(uid, 0))
    sim = Sim(s)
    for i in range(1, 7):
        sim.add(seq(i, 10, FOREGROUND, uid=A, max_new=10_000))
    sim.add(seq(100, 10, FOREGROUND, uid=B, max_new=10_000))
    for _ in range(3):
        sim.step()
    assert rows_of(s) == {A: 2, B: 1}, "A stops at 2 slots; B is not held up behind A's queue"
    assert len(s.running) < s.num_rows
    for _ in range(100):
        sim.step()
    assert rows_of(s)[A] == 2


def test_fair_share_preemption_respects_the_slot_cap() -> None:
    # B may hold 1 slot: it takes one from A, never a second, however over its share A is
    sim = flooded(rows=4, min_run=2)
    sim.s.max_running = lambda uid: 1 if uid == B else 0
    for i in range(5):
        sim.add(seq(100 + i, 10, FOREGROUND, uid=B, max_new=10_000))
    for _ in range(200):
        sim.step()
    assert rows_of(sim.s) == {A: 3, B: 1}


def test_at_its_cap_a_uid_swaps_its_own_less_urgent_or_paused_work_for_urgent_work() -> None:
    s = Scheduler(num_rows=4, token_budget=20, max_waiting=100, chunk_size=16,
                  max_running=lambda uid: 1)
    sim = Sim(s)
    sim.add(seq(1, 10, BACKGROUND, uid=A, max_new=10_000))
    sim.step()
    sim.add(seq(2, 10, FOREGROUND, uid=A, max_new=10_000))
    plan = sim.step()
    assert plan.preempted == [1] and set(s.running) == {2}, "foreground replaces background"
    sim.add(seq(3, 10, FOREGROUND, uid=A, max_new=10_000))
    for _ in range(20):
        assert not sim.step().preempted, "the same class does not swap"
    s.seqs[2].paused = True
    plan = sim.step()
    assert plan.preempted == [2] and set(s.running) == {3}, "a paused one gives its row"

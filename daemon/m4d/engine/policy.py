"""Queue policies: the order in which waiting generation sequences get a KV row.

A policy is a small object the scheduler consults; it never touches rows, memory or the
plan. `order(waiting, now)` returns the waiting queue head first, each sequence with the
priority it would run with (after aging); `priority(seq)` is the priority it was submitted
with as the policy sees it (system, foreground, background; one for all under fcfs), which
decides whom it may preempt. The scheduler tells it `admitted(seq, now)`, every token
served (`charge`, prefill and decode alike) and when a uid that had no work gets some
(`activate`). `victims(head, running, movable)` names the running sequences of the head's
class that the head may take a row from (fair share over rows, not only over queue order).

Aging is per priority, not per request: a priority moves up one level for every `aging`
seconds it has had work waiting without admitting any. A priority that is being served
never ages, so aging cannot undo fair share inside it (per-request aging would: the uid
with the deepest queue always has the oldest requests), while a starved priority always
gets through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from m4d.requests import Priority


class Queued(Protocol):
    """What a policy reads of a sequence (SeqState has all of it)."""

    id: int
    priority: Priority
    arrival: float
    uid: int
    weight: float
    computed: int  # tokens in its KV cache: what a preemption throws away
    admit_no: int  # admission counter: higher was admitted later


Q = TypeVar("Q", bound=Queued)


class QueuePolicy:
    """First come, first served: one priority for everyone, so nothing preempts anything."""

    name = "fcfs"

    def priority(self, seq: Queued) -> Priority:
        return Priority.SYSTEM

    def order(self, waiting: Sequence[Q], now: float) -> list[tuple[Priority, Q]]:
        return [(Priority.SYSTEM, s) for s in sorted(waiting, key=lambda s: (s.arrival, s.id))]

    def admitted(self, seq: Queued, now: float) -> None:
        pass

    def activate(self, seq: Queued, active_uids: set[int]) -> None:
        pass

    def charge(self, seq: Queued, tokens: int) -> None:
        pass

    def victims(self, head: Queued, running: Sequence[Q], movable: Callable[[Q], bool]) -> list[Q]:
        """Running sequences of the head's class it may preempt, in the order to preempt
        them (none: only a more urgent class preempts)."""
        return []


class PriorityPolicy(QueuePolicy):
    """Priority first (aged when `aging` seconds is given), then arrival."""

    name = "priority"

    def __init__(self, aging: float | None = None) -> None:
        if aging is not None and aging <= 0:
            raise ValueError(f"aging must be a positive number of seconds, not {aging}")
        self.aging = aging
        self._last_admit: dict[Priority, float] = {}  # when it last admitted a sequence

    def priority(self, seq: Queued) -> Priority:
        return seq.priority

    def aged(self, waiting: Sequence[Queued], now: float) -> dict[Priority, Priority]:
        """Each waiting priority after aging: one level up per `aging` seconds starved."""
        since: dict[Priority, float] = {}
        for s in waiting:
            since[s.priority] = min(since.get(s.priority, s.arrival), s.arrival)
        if self.aging is None:
            return {p: p for p in since}
        aging = self.aging
        return {p: Priority(max(0, p - int(max(0.0, now - max(t, self._last_admit.get(p, t)))
                                           // aging)))
                for p, t in since.items()}

    def tiebreak(self, seq: Queued) -> float:
        return 0.0

    def order(self, waiting: Sequence[Q], now: float) -> list[tuple[Priority, Q]]:
        aged = self.aged(waiting, now)
        keyed = sorted(waiting, key=lambda s: (aged[s.priority], self.tiebreak(s), s.arrival, s.id))
        return [(aged[s.priority], s) for s in keyed]

    def admitted(self, seq: Queued, now: float) -> None:
        self._last_admit[seq.priority] = now


class FairPolicy(PriorityPolicy):
    """Priority (aged), then weighted fair share between uids, then arrival.

    Each uid has a virtual time: the tokens it was served divided by its weight. The uid
    furthest behind goes first, so saturating uids get tokens in proportion to their
    weights. A uid that was idle restarts at the least virtual time of the busy uids: idle
    time is not saved up as credit.
    """

    name = "fair"

    def __init__(self, aging: float | None = 5.0) -> None:
        super().__init__(aging)
        self.vtime: dict[int, float] = {}

    def tiebreak(self, seq: Queued) -> float:
        return self.vtime.get(seq.uid, 0.0)

    def activate(self, seq: Queued, active_uids: set[int]) -> None:
        busy = [self.vtime.get(u, 0.0) for u in active_uids]
        floor = min(busy) if busy else max(self.vtime.values(), default=0.0)
        self.vtime[seq.uid] = max(self.vtime.get(seq.uid, 0.0), floor)

    def charge(self, seq: Queued, tokens: int) -> None:
        self.vtime[seq.uid] = self.vtime.get(seq.uid, 0.0) + tokens / max(seq.weight, 1e-6)

    def victims(self, head: Queued, running: Sequence[Q], movable: Callable[[Q], bool]) -> list[Q]:
        """Fair share over rows: while some other uid holds more rows per unit of weight
        than the head's uid would after taking one more (rows/weight > (mine + 1)/my weight),
        one of that uid's movable sequences (cheapest to recompute, then the latest
        admitted) may go, the uid furthest over its share first. The strict inequality is
        the hysteresis between uids: at equal shares nobody preempts anybody, so two uids
        never trade a row back and forth; `movable` (a minimum run since admission) is the
        hysteresis in time."""
        rows: dict[int, int] = {}
        weight: dict[int, float] = {head.uid: max(head.weight, 1e-6)}
        for s in running:
            rows[s.uid] = rows.get(s.uid, 0) + 1
            weight[s.uid] = max(s.weight, 1e-6)
        mine = (rows.get(head.uid, 0) + 1) / weight[head.uid]
        candidates = {u: sorted((s for s in running if s.uid == u and movable(s)),
                                key=lambda s: (-s.computed, s.admit_no))  # pop() = cheapest
                      for u in rows if u != head.uid}
        chosen: list[Q] = []
        while True:
            over = [u for u, c in candidates.items() if c and rows[u] / weight[u] > mine]
            if not over:
                return chosen
            uid = max(over, key=lambda u: (rows[u] / weight[u], -u))
            chosen.append(candidates[uid].pop())
            rows[uid] -= 1


def make_policy(name: str, **options: float | None) -> QueuePolicy:
    """"fcfs", "priority" (strict priorities; aging only if given) or "fair" (the default:
    priorities aged every 5 s of starvation, weighted fair share per uid)."""
    policies: dict[str, type[QueuePolicy]] = {
        "fcfs": QueuePolicy, "priority": PriorityPolicy, "fair": FairPolicy}
    if name not in policies:
        raise ValueError(f"unknown queue policy {name!r}; choose one of {sorted(policies)}")
    return policies[name](**options)

"""The generation scheduler: a pure policy that decides what runs in each model step.

Plain data in, a plan out: no torch, no grpc, no asyncio, no clock (the engine passes
`now`). Each step has a token budget; every running sequence that has finished its prefill
decodes one token, and what is left of the budget goes to prompt chunks cut at fixed
multiples of chunk_size (chunked prefill), so a long prompt never stalls other streams.

Four limits are never exceeded: the token budget, the KV rows, the KV memory pool
(`KVPool`) and the rows one uid may hold (`max_running`). Waiting sequences are admitted
into free rows in the queue policy's order (`policy.py`); a uid at its cap is passed over,
unless the head may take the row of one of its uid's own paused or less urgent sequences.
A step runs in this order:

1. deadlines: expired sequences, waiting or running, leave at once (`plan.expired`);
2. running sequences, most urgent first (run_priority, then admission order), get their decode
   token or next prompt chunk; one that needs KV memory may preempt those after it;
3. waiting sequences are admitted head first; when the head finds no row or no memory, it
   may preempt running work of a strictly lower priority (latest admitted first), then
   running work of its own priority that the queue policy names (`QueuePolicy.victims`:
   under fair share, sequences of the uid furthest over its share of rows). A sequence of
   the head's own priority is only movable once it has generated `min_run_tokens` since it
   was (re)admitted, so no sequence is thrashed step after step; for a head whose uid holds
   no row at all, once it is past its prefill (a starved app does not wait for the others'
   fresh sequences).

A paused sequence (its reader is behind: `backpressure.py`) gets no work and does not
leave the queue, and it is the first to give its row to a waiting sequence.

A sequence whose prompt starts with blocks the prefix cache holds (`cached`, set by the
engine at arrival) counts them as computed: when it gets a row the engine copies them in
(`plan.prefixed`) and its first chunk starts after them.

A preempted sequence loses its row and memory and waits again (`plan.preempted`). While
the park budget (`park_tokens`) has room, its KV stays: the engine copies it out of the
row before the step runs (`plan.parked`) and back into the row it is given when it is
admitted again (`plan.restored`), and it goes on decoding where it stopped. Otherwise it
keeps only its generated tokens and resumes by re-prefilling prompt + generated tokens
(recompute). Either way greedy decoding resumes to the same tokens.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from m4d.engine.kvpool import KVCapacityError, KVPool
from m4d.engine.policy import QueuePolicy, make_policy
from m4d.requests import Priority

__all__ = ["KVCapacityError", "PrefillChunk", "Scheduler", "SeqState", "StepPlan"]


@dataclass
class SeqState:
    """The scheduler's view of one generation sequence."""

    id: int
    priority: Priority  # as submitted (after the uid's cap); lower is more urgent
    arrival: float
    prompt_len: int
    max_new_tokens: int
    computed: int = 0  # tokens in the KV cache: prompt, then generated tokens fed back
    generated: int = 0  # tokens sampled so far
    row: int | None = None  # KV cache row while running
    uid: int = -1  # the caller, for fair share
    weight: float = 1.0  # the caller's share within its priority
    deadline: float | None = None  # monotonic seconds; expires when now >= deadline
    resumed: int = 0  # generated tokens to re-prefill after a preemption
    run_priority: Priority = Priority.SYSTEM  # admitted with (after aging), while running
    admit_no: int = 0  # admission counter: higher was admitted later
    preemptions: int = 0
    admitted_at: int = 0  # `generated` when it was last admitted: its run so far is the rest
    paused: bool = False  # its reader is behind (backpressure): no work, its row may go
    parked: int = 0  # tokens of its KV the engine keeps aside while it waits (preempted)
    cached: int = 0  # prompt tokens the prefix cache restores when it first gets a row

    @property
    def prefill_len(self) -> int:
        """Tokens to put in the cache before decoding: the prompt (+ generated, resumed)."""
        return self.prompt_len + self.resumed

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prefill_len


@dataclass(frozen=True)
class PrefillChunk:
    seq_id: int
    row: int
    start: int  # first position of the chunk in prompt + generated tokens
    length: int
    last: bool  # the chunk ends the prefill: sample the next token from it


@dataclass
class StepPlan:
    decode: list[tuple[int, int]] = field(default_factory=list)  # (seq_id, row)
    prefill: list[PrefillChunk] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)  # lost their row: wait again
    # (seq_id, row, tokens): copy the KV out of the row before the step (preempted, parked)
    parked: list[tuple[int, int, int]] = field(default_factory=list)
    # (seq_id, row): copy its parked KV into the row before the step (admitted again)
    restored: list[tuple[int, int]] = field(default_factory=list)
    # (seq_id, row): copy its cached prompt prefix into the row before the step (admitted)
    prefixed: list[tuple[int, int]] = field(default_factory=list)
    expired: list[int] = field(default_factory=list)  # deadline passed: already forgotten

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.length for c in self.prefill)


class Scheduler:
    """Owns KV rows, KV memory and the waiting queue; the engine reports tokens and ends."""

    def __init__(self, num_rows: int, token_budget: int, max_waiting: int,
                 chunk_size: int | None = None, *, policy: QueuePolicy | str = "fair",
                 kv: KVPool | None = None, min_run_tokens: int = 16,
                 max_running: Callable[[int], int] | None = None,
                 park_tokens: int = 0) -> None:
        chunk_size = chunk_size or max(1, token_budget - num_rows)
        if token_budget < chunk_size + num_rows:
            raise ValueError(
                f"token_budget ({token_budget}) must hold a prefill chunk ({chunk_size}) "
                f"beside a decode token for every row ({num_rows})")
        self.num_rows = num_rows
        self.token_budget = token_budget
        self.chunk_size = chunk_size
        self.max_waiting = max_waiting
        self.min_run_tokens = min_run_tokens  # before a sequence of the same class may preempt it
        self.max_running = max_running or (lambda uid: 0)  # uid -> KV rows it may hold; 0: all
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.kv = kv if kv is not None else KVPool(1 << 62, 1)  # default: rows are the limit
        self.park_tokens = park_tokens  # KV tokens of preempted sequences kept aside, at most
        self.parked_tokens = 0
        self._free_rows = list(range(num_rows - 1, -1, -1))  # pop() gives the lowest
        self._vacated: list[int] = []  # rows given up since `take_vacated`
        self._waiting: dict[int, SeqState] = {}
        self._admitted = 0
        self._now = 0.0
        self.seqs: dict[int, SeqState] = {}
        self.running: dict[int, SeqState] = {}

    # ---- requests in and out -------------------------------------------------------

    def can_accept(self) -> bool:
        return len(self._waiting) < self.max_waiting

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting(self) -> list[SeqState]:
        """The sequences waiting for a row (new or preempted), as a copy."""
        return list(dict(self._waiting).values())

    def rows_held(self) -> dict[int, int]:
        """uid -> KV rows its sequences hold (safe to call from another thread)."""
        return dict(collections.Counter(s.uid for s in list(dict(self.running).values())))

    def add(self, seq: SeqState) -> None:
        """Queues a sequence; raises KVCapacityError (a ValueError) if it could never fit."""
        if seq.prompt_len < 1:
            raise ValueError(f"request {seq.id} has an empty prompt")
        self.kv.check_fits(seq.id, seq.prompt_len + seq.max_new_tokens)
        seq.computed = max(seq.computed, seq.cached)  # the cached prefix counts as computed
        active = {s.uid for s in self.seqs.values()}
        if seq.uid not in active:
            self.policy.activate(seq, active)
        self.seqs[seq.id] = seq
        self._waiting[seq.id] = seq

    def finish(self, seq_id: int) -> None:
        """Forget a sequence (done, cancelled or failed): its row and memory are free now."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        self._waiting.pop(seq_id, None)
        self._release(seq)
        self.parked_tokens -= seq.parked
        seq.parked = 0

    def _release(self, seq: SeqState) -> None:
        if self.running.pop(seq.id, None) is not None and seq.row is not None:
            self._free_rows.append(seq.row)
            self._free_rows.sort(reverse=True)
            self._vacated.append(seq.row)
        seq.row = None
        self.kv.release(seq.id)

    def take_vacated(self) -> list[int]:
        """Rows whose sequence ended or was preempted since the last call (a row may since
        have gone to another sequence: its memory is given back before that one writes)."""
        rows, self._vacated = self._vacated, []
        return rows

    # ---- planning ------------------------------------------------------------------

    def schedule(self, now: float | None = None) -> StepPlan:
        """Plans one step at `now` (monotonic seconds; the last one seen if None)."""
        if now is not None:
            self._now = now
        now = self._now
        plan = StepPlan()
        for seq in list(self.seqs.values()):
            if seq.deadline is not None and now >= seq.deadline:
                self.finish(seq.id)
                plan.expired.append(seq.id)

        order = sorted(self.running.values(), key=self._run_key)
        for prefill in (False, True):  # decode tokens first, then prompt chunks
            for seq in order:
                if seq.id not in self.running or seq.prefilling != prefill or seq.paused:
                    continue
                n = self._next_chunk(seq) if prefill else 1
                later = sorted((s for s in self.running.values()
                                if self._run_key(s) > self._run_key(seq)),
                               key=self._run_key, reverse=True)
                if n <= self._left(plan) and self._make_room(plan, seq, seq.computed + n, later):
                    self._plan(plan, seq, n)

        held = collections.Counter(s.uid for s in self.running.values())
        for priority, seq in self.policy.order(list(self._waiting.values()), now):
            if seq.id in plan.preempted or seq.paused:
                continue  # not back in the same step it was pushed out, nor while paused
            n = self._next_chunk(seq) if seq.prefilling else 1
            if 0 < self.max_running(seq.uid) <= held[seq.uid]:
                own = self._own_victim(seq)
                if own is None or n > self._left(plan):
                    continue  # its uid holds all the rows it may: the next one's turn
                self._preempt(plan, own)  # a swap within the uid's own rows
                held[seq.uid] -= 1
            if n > self._left(plan) or not self._make_room(
                    plan, seq, seq.computed + n, self._victims(seq), need_row=True):
                break  # strict queue order: nobody overtakes the head
            del self._waiting[seq.id]
            seq.row = self._free_rows.pop()
            if seq.parked:
                plan.restored.append((seq.id, seq.row))
                self.parked_tokens -= seq.parked
                seq.parked = 0
            if seq.cached:
                plan.prefixed.append((seq.id, seq.row))
                seq.cached = 0
            seq.admitted_at = seq.generated
            held[seq.uid] += 1
            seq.run_priority = priority
            self.policy.admitted(seq, now)
            self._admitted += 1
            seq.admit_no = self._admitted
            self.running[seq.id] = seq
            self._plan(plan, seq, n)
        return plan

    def _victims(self, head: SeqState) -> list[SeqState]:
        """Whom a waiting head may preempt, in order: paused sequences (they hold a row
        for nothing), a lower priority (latest admitted of the lowest first), then those of
        its own priority the queue policy gives up."""
        cls = self.policy.priority(head)
        active = [s for s in self.running.values() if not s.paused]
        paused = sorted((s for s in self.running.values() if s.paused),
                        key=self._run_key, reverse=True)
        lower = sorted((s for s in active if s.run_priority > cls), key=self._run_key,
                       reverse=True)
        same = [s for s in active if s.run_priority == cls]
        starved = all(s.uid != head.uid for s in self.running.values())
        movable = self._movable_by_starved if starved else self._movable
        return paused + lower + self.policy.victims(head, same, movable)

    def _own_victim(self, head: SeqState) -> SeqState | None:
        """For a head whose uid is at its row cap: the uid's own running sequence it may
        take the row of (paused first, then a lower priority, latest admitted), if any."""
        cls = self.policy.priority(head)
        own = [s for s in self.running.values()
               if s.uid == head.uid and (s.paused or s.run_priority > cls)]
        return max(own, key=lambda s: (s.paused, self._run_key(s)), default=None)

    def _movable(self, seq: SeqState) -> bool:
        return not seq.prefilling and seq.generated - seq.admitted_at >= self.min_run_tokens

    def _movable_by_starved(self, seq: SeqState) -> bool:
        """For a head whose uid holds no row at all: any sequence past its prefill (it has
        given its first token), so an app never waits for other apps' fresh sequences to
        run `min_run_tokens` (measured: 1.5 s behind 24 streams opened at once)."""
        return not seq.prefilling

    def _run_key(self, seq: SeqState) -> tuple[int, int]:
        return (seq.run_priority, seq.admit_no)

    def _left(self, plan: StepPlan) -> int:
        return self.token_budget - plan.num_tokens

    def _next_chunk(self, seq: SeqState) -> int:
        """The next prefill chunk: up to the next multiple of chunk_size."""
        end = min(seq.prefill_len, (seq.computed // self.chunk_size + 1) * self.chunk_size)
        return end - seq.computed

    def _make_room(self, plan: StepPlan, seq: SeqState, tokens: int, victims: list[SeqState],
                   need_row: bool = False) -> bool:
        """Makes the cache hold `tokens` of `seq` (and gives it a row), preempting as few
        victims as possible, in their order. False, with nothing preempted or taken, when
        even all the victims would not be enough."""
        blocks = self.kv.needed(seq.id, tokens)
        rows = 1 if need_row else 0
        chosen: list[SeqState] = []
        freed_blocks = freed_rows = 0
        for victim in victims:
            if blocks <= self.kv.free + freed_blocks and rows <= len(self._free_rows) + freed_rows:
                break
            chosen.append(victim)
            freed_blocks += self.kv.held(victim.id)
            freed_rows += 1
        if blocks > self.kv.free + freed_blocks or rows > len(self._free_rows) + freed_rows:
            return False
        for victim in chosen:
            self._preempt(plan, victim)
        taken = self.kv.grow(seq.id, tokens)
        assert taken
        return True

    def _preempt(self, plan: StepPlan, seq: SeqState) -> None:
        row = seq.row
        self._release(seq)
        plan.decode = [d for d in plan.decode if d[0] != seq.id]
        plan.prefill = [c for c in plan.prefill if c.seq_id != seq.id]
        plan.preempted.append(seq.id)
        if row is not None and 0 < seq.computed <= self.park_tokens - self.parked_tokens:
            plan.parked.append((seq.id, row, seq.computed))  # keeps computed: no re-prefill
            seq.parked = seq.computed
            self.parked_tokens += seq.computed
        else:
            seq.resumed = seq.generated
            seq.computed = 0
        seq.preemptions += 1
        self._waiting[seq.id] = seq

    def _plan(self, plan: StepPlan, seq: SeqState, n: int) -> None:
        assert seq.row is not None
        if not seq.prefilling:
            plan.decode.append((seq.id, seq.row))
            return
        plan.prefill.append(PrefillChunk(seq.id, seq.row, seq.computed, n,
                                         last=seq.computed + n == seq.prefill_len))

    def kv_blocks(self, max_context: int, block: int = 16) -> tuple[int, int]:
        """KV memory (blocks used, blocks in all) for status. Without a pool rows are the
        limit: each row's cache is counted in blocks of `block` tokens of `max_context`."""
        if self.kv.block_size > 1:  # a real pool (config kv_pool_tokens)
            return self.kv.used, self.kv.num_blocks
        running = list(dict(self.running).values())
        return (sum(-(-s.computed // block) for s in running),
                self.num_rows * -(-max_context // block))

    def kv_capacity(self, max_context: int) -> int:
        """Tokens of KV the sequences may hold at once: the pool's, else every row's."""
        return self.kv.capacity if self.kv.block_size > 1 else self.num_rows * max_context

    def update(self, plan: StepPlan) -> None:
        """Records that a plan ran: chunks are cached, decoders fed a token and got one."""
        for chunk in plan.prefill:
            seq = self.seqs.get(chunk.seq_id)
            if seq is not None:
                seq.computed += chunk.length
                seq.generated += int(chunk.last)
                self.policy.charge(seq, chunk.length)
        for seq_id, _ in plan.decode:
            seq = self.seqs.get(seq_id)
            if seq is not None:
                seq.computed += 1
                seq.generated += 1
                self.policy.charge(seq, 1)

"""The generation scheduler: a pure policy that decides what runs in each model step.

Plain data in, a plan out: no torch, no grpc, no asyncio. Each step has a token budget;
every running sequence that has finished its prompt decodes one token, and what is left of
the budget goes to prompt chunks (chunked prefill), so a long prompt never stalls the
other streams. Waiting sequences are admitted into free KV rows by the queue policy
(priority class first, then arrival).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class SeqState:
    """The scheduler's view of one generation sequence."""

    id: int
    priority: int  # lower is more urgent
    arrival: float
    prompt_len: int
    max_new_tokens: int
    computed: int = 0  # prompt tokens already in the KV cache
    generated: int = 0  # tokens sampled so far
    row: int | None = None  # KV cache row while running

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_len


@dataclass(frozen=True)
class PrefillChunk:
    seq_id: int
    row: int
    start: int  # first prompt position of the chunk
    length: int
    last: bool  # the chunk ends the prompt: sample the first token from it


@dataclass
class StepPlan:
    decode: list[tuple[int, int]] = field(default_factory=list)  # (seq_id, row)
    prefill: list[PrefillChunk] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.length for c in self.prefill)


class Scheduler:
    """Owns KV rows and the waiting queue; the engine reports tokens and finishes."""

    def __init__(self, num_rows: int, token_budget: int, max_waiting: int,
                 chunk_size: int | None = None) -> None:
        chunk_size = chunk_size or max(1, token_budget - num_rows)
        if token_budget < chunk_size + num_rows:
            raise ValueError(
                f"token_budget ({token_budget}) must hold a prefill chunk ({chunk_size}) "
                f"beside a decode token for every row ({num_rows})")
        self.num_rows = num_rows
        self.token_budget = token_budget
        self.chunk_size = chunk_size
        self.max_waiting = max_waiting
        self._free_rows = list(range(num_rows - 1, -1, -1))  # pop() gives the lowest
        self._waiting: list[tuple[int, float, int]] = []  # heap of (priority, arrival, id)
        self.seqs: dict[int, SeqState] = {}
        self.running: dict[int, SeqState] = {}

    # ---- requests in and out -------------------------------------------------------

    def can_accept(self) -> bool:
        return len(self._waiting) < self.max_waiting

    def add(self, seq: SeqState) -> None:
        self.seqs[seq.id] = seq
        heapq.heappush(self._waiting, (seq.priority, seq.arrival, seq.id))

    def finish(self, seq_id: int) -> None:
        """Forget a sequence (done, cancelled or failed) and free its KV row at once."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        if self.running.pop(seq_id, None) is not None and seq.row is not None:
            self._free_rows.append(seq.row)
            self._free_rows.sort(reverse=True)
        # a waiting entry is skipped lazily in schedule()

    @property
    def num_waiting(self) -> int:
        return sum(1 for _, _, i in self._waiting if i in self.seqs and i not in self.running)

    # ---- planning ------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.token_budget
        for seq in self.running.values():
            if not seq.prefilling and budget > 0:
                assert seq.row is not None
                plan.decode.append((seq.id, seq.row))
                budget -= 1
        for seq in sorted(self.running.values(), key=lambda s: (s.priority, s.arrival)):
            if seq.prefilling and self._next_chunk(seq) <= budget:
                budget -= self._plan_chunk(plan, seq)
        while self._free_rows and self._waiting:
            seq_id = self._waiting[0][2]
            seq = self.seqs.get(seq_id)
            if seq is None:
                heapq.heappop(self._waiting)  # finished while waiting
                continue
            if self._next_chunk(seq) > budget:
                break
            heapq.heappop(self._waiting)
            seq.row = self._free_rows.pop()
            self.running[seq.id] = seq
            budget -= self._plan_chunk(plan, seq)
        return plan

    def _next_chunk(self, seq: SeqState) -> int:
        """The next prompt chunk: up to the next multiple of chunk_size."""
        end = min(seq.prompt_len, (seq.computed // self.chunk_size + 1) * self.chunk_size)
        return end - seq.computed

    def _plan_chunk(self, plan: StepPlan, seq: SeqState) -> int:
        assert seq.row is not None
        length = self._next_chunk(seq)
        plan.prefill.append(
            PrefillChunk(seq.id, seq.row, seq.computed, length,
                         last=seq.computed + length == seq.prompt_len)
        )
        return length

    def update(self, plan: StepPlan) -> None:
        """Records that a plan ran: prompt chunks are cached, decoders got a token."""
        for chunk in plan.prefill:
            seq = self.seqs.get(chunk.seq_id)
            if seq is not None:
                seq.computed += chunk.length
                if chunk.last:
                    seq.generated += 1
        for seq_id, _ in plan.decode:
            seq = self.seqs.get(seq_id)
            if seq is not None:
                seq.generated += 1

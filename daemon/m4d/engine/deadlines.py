"""Deadline-aware admission, the engine's side: what a generation with a deadline is checked
against when it is submitted, and the measurements that check uses.

Two checks, cheapest first:

1. alone (`admission.too_late`): its sure tokens at the cheapest measured row cost do not fit
   before the deadline: DEADLINE_EXCEEDED, no load could help;
2. under load (`goodput.refusal`): the held work, as the worker last published it plus the
   requests submitted since, leaves it no time or would be made late by it: UNAVAILABLE with
   the time until a row frees.

The worker publishes the work it holds after each pass (`publish`) and measures its passes
(`passed`) and prompt chunks (`StepCosts.prefilled`); the event loop reads the published list
under the engine's lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from m4d.engine.admission import sure_tokens, too_late
from m4d.engine.goodput import GoodputConfig, StepCosts, Work, refusal
from m4d.engine.latency import LatencyPolicy
from m4d.engine.scheduler import SeqState
from m4d.engine.sequence import Sequence
from m4d.errors import M4Error
from m4d.requests import GenerateRequest


class Deadlines:
    def __init__(self, config: GoodputConfig, latency: LatencyPolicy, slots: int) -> None:
        self.config = config
        self.latency = latency
        self.slots = slots
        self.costs = StepCosts()
        self.held: list[Work] = []  # as of the worker's last pass
        self.taken: list[GenerateRequest] = []  # taken from the inbox since

    def expected(self, request: GenerateRequest) -> int:
        """Tokens a generation is expected to produce: max_tokens when only that ends it,
        else the average length of those that ended by themselves (capped by max_tokens)."""
        sampling = request.sampling
        if sure_tokens(request) == sampling.max_tokens:
            return sampling.max_tokens
        length = self.costs.length or self.config.default_length
        return max(1, min(sampling.max_tokens, round(length)))

    def work(self, request: GenerateRequest, state: SeqState | None = None) -> Work:
        generated = state.generated if state is not None else 0
        computed = state.computed if state is not None else 0
        prefill = state.prefill_len if state is not None else len(request.prompt_ids)
        left = max(0, self.expected(request) - generated)
        return Work(steps=max(0, left - (1 if computed < prefill else 0)),
                    must=max(0, sure_tokens(request) - generated) if request.deadline else 0,
                    prefill=max(0, prefill - computed), deadline=request.deadline,
                    running=state is not None and state.row is not None,
                    priority=int(request.priority))

    def publish(self, states: Mapping[int, SeqState], sequences: Mapping[int, Sequence]) -> None:
        """The worker's pass is over: the work it holds now (call under the engine's lock)."""
        self.held = [self.work(seq.request, states[rid]) for rid, seq in sequences.items()
                     if rid in states]
        self.taken = []

    def passed(self, rows: int, seconds: float, only_decode: bool) -> None:
        """A worker pass that decoded `rows` rows took `seconds`; it counts as a decode step
        when it ran nothing else (no prompt chunk, encoder, media or backbone work)."""
        if only_decode:
            self.costs.decoded(rows, seconds)

    def check(self, request: GenerateRequest, pending: Iterable[GenerateRequest],
              encoder_texts: int, now: float) -> M4Error | None:
        """The error to refuse `request` with, or None to admit it. `pending`: generations
        submitted but not yet in a published pass; `encoder_texts`: texts queued for the
        encoder, which run before the held generations' next steps."""
        if request.deadline is None:
            return None
        sure = sure_tokens(request)
        late = too_late(self.latency.least_seconds(sure), request.deadline - now,
                        self.latency.least_ms_per_row / 1e3, sure)
        if late is not None or not self.config.enabled:
            return late
        held = self.held + [self.work(r) for r in [*self.taken, *pending]]
        lead = encoder_texts * self.latency.ms_per_text / 1e3
        return refusal(held, self.work(request), self.slots, self.costs, now, lead,
                       self.config.margin)

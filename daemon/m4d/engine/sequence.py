"""One generation sequence as the engine runs it: its tokens, its streamed text, how it ends.

Turns sampled token ids into text deltas: incremental detokenization (never a broken
UTF-8 character), stop strings (never streamed, even when they arrive split over several
tokens), end-of-sequence, max_tokens and the context limit. The first token is always sent
at once, with empty text when its text is still held back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from m4d.executor.sampling import make_generator
from m4d.prepare.tokenizer import IncrementalDecoder, TextTokenizer
from m4d.requests import (
    Finished,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    TextDelta,
    Timings,
    Usage,
)

if TYPE_CHECKING:
    from m4d.engine.stream import RequestStream


class Sequence:
    def __init__(self, request: GenerateRequest, stream: RequestStream | None,
                 tokenizer: TextTokenizer | None,
                 prompt_embeds: torch.Tensor | None = None) -> None:
        assert tokenizer is not None
        self.request = request
        self.stream = stream  # None only in tests that drive a Sequence by hand
        self.prompt_embeds = prompt_embeds  # path 1: the prompt with image features [S', D]
        self.params: SamplingParams = request.sampling
        self.constraint = request.constraint  # structured output, or None
        self.generator: torch.Generator | None = make_generator(request.sampling)
        self.eos_id = tokenizer.eos_id
        self.decoder = IncrementalDecoder(tokenizer)
        self.tokens: list[int] = []
        self.prompted = 0  # prompt (and re-prefilled) tokens put into the KV cache
        self.paused_since: float | None = None  # its reader is behind (backpressure) since
        self._held = ""  # text held back because it may be the start of a stop string
        self._held_ids: list[int] = []
        self._start = 0.0
        self._first_token = 0.0

    @property
    def last_token(self) -> int:
        return self.tokens[-1]

    @property
    def tokens_in(self) -> int:
        """Prompt tokens put in the KV cache so far (a re-prefill does not count again)."""
        return min(self.prompted, len(self.request.prompt_ids))

    @property
    def next_position(self) -> int:
        """The position of last_token, which the next decode step feeds."""
        return len(self.request.prompt_ids) + len(self.tokens) - 1

    def chunk_ids(self, start: int, length: int) -> list[int]:
        """A prefill chunk's token ids: the prompt, then (when a preempted sequence
        resumes) its generated tokens."""
        return (self.request.prompt_ids + self.tokens)[start:start + length]

    def chunk_embeds(self, start: int, length: int,
                     embed: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """A prefill chunk of a path-1 sequence as embeddings: the spliced prompt, then
        (when a preempted sequence resumes) its generated tokens, embedded by `embed`."""
        embeds = self.prompt_embeds  # [S', D]
        assert embeds is not None
        n = embeds.shape[0]
        head = embeds[start:start + length]
        if start + length <= n:
            return head
        tail = embed(self.tokens[max(0, start - n):start + length - n])
        return torch.cat([head, tail.to(head.dtype)]) if head.shape[0] else tail

    def started(self, now: float) -> None:
        self._start = now

    def prefilled(self, now: float) -> None:
        self._first_token = now

    def add_token(self, token: int, max_context: int) -> tuple[TextDelta | None, Finished | None]:
        """Records a sampled token; returns the text to stream and, at the end, the finish."""
        self.tokens.append(token)
        if token == self.eos_id and (not self.params.ignore_eos or self.constraint is not None):
            return self._flush(), self._finished(FinishReason.EOS)  # a format allows it when complete
        if self.constraint is not None:
            self.constraint.consume(token)
            if self.constraint.done:  # the format is complete: nothing may follow
                self._held += self.decoder.push(token) + self.decoder.flush()
                self._held_ids.append(token)
                return self._flush(), self._finished(FinishReason.STOP)
        self._held += self.decoder.push(token)
        self._held_ids.append(token)
        stop_at = self._find_stop()
        if stop_at is not None:
            self._held = self._held[:stop_at]
            return self._flush(), self._finished(FinishReason.STOP)
        if len(self.tokens) >= self.params.max_tokens:
            self._held += self.decoder.flush()
            return self._flush(), self._finished(FinishReason.LENGTH)
        if len(self.request.prompt_ids) + len(self.tokens) >= max_context:
            self._held += self.decoder.flush()
            return self._flush(), self._finished(FinishReason.CONTEXT)
        keep = self._holdback()
        if keep == len(self._held):
            if len(self.tokens) == 1:
                # the first token leaves at once even when its text is not complete yet
                # (part of a UTF-8 character or of a stop string): time to first token is
                # the model's, not one more decode step's
                ids, self._held_ids = self._held_ids, []
                return TextDelta("", tuple(ids)), None
            return None, None
        text, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        ids, self._held_ids = self._held_ids, []
        return TextDelta(text, tuple(ids)), None

    def _find_stop(self) -> int | None:
        found = [i for s in self.params.stop if (i := self._held.find(s)) >= 0]
        return min(found) if found else None

    def _holdback(self) -> int:
        """Length of the longest suffix of the held text that could begin a stop string."""
        best = 0
        for stop in self.params.stop:
            for n in range(min(len(stop) - 1, len(self._held)), best, -1):
                if self._held.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _flush(self) -> TextDelta | None:
        if not self._held and not self._held_ids:
            return None
        delta = TextDelta(self._held, tuple(self._held_ids))
        self._held, self._held_ids = "", []
        return delta

    def _finished(self, reason: FinishReason) -> Finished:
        end = time.monotonic()
        arrival = self.request.arrival
        first = self._first_token or end
        timings = Timings(
            queue_ms=(self._start - arrival) * 1e3 if self._start else 0.0,
            prefill_ms=(first - self._start) * 1e3 if self._start else 0.0,
            decode_ms=(end - first) * 1e3,
            first_token_ms=(first - arrival) * 1e3,
            total_ms=(end - arrival) * 1e3,
        )
        usage = Usage(prompt_tokens=len(self.request.prompt_ids),
                      completion_tokens=len(self.tokens))
        return Finished(reason, usage, timings)


def tokens_per_uid(sequences: Iterable[Sequence]) -> dict[int, tuple[int, int]]:
    """uid -> tokens in (prompt in the KV cache) and out (generated) of these sequences."""
    totals: dict[int, tuple[int, int]] = {}
    for seq in sequences:
        t_in, t_out = totals.get(seq.request.caller.uid, (0, 0))
        totals[seq.request.caller.uid] = (t_in + seq.tokens_in, t_out + len(seq.tokens))
    return totals


def constrain(seqs: list[Sequence], logits: torch.Tensor) -> None:
    """Structured output: forbids, in each constrained row, the tokens its format does not
    allow next (the rows' logits are their own: changed in place)."""
    with torch.inference_mode():  # the runtime's logits are inference tensors
        for row, seq in enumerate(seqs):
            if seq.constraint is not None:
                seq.constraint.restrict(logits[row])

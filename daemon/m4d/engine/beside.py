"""The engine's work beside generation: encoder batches (here or on another device's
executor), media recognition (and the cascades it starts), one-call backbone work.

A base class of `Engine`, kept apart so the step loop reads on its own; it runs on the
worker thread and ends requests through the engine's `_finish` and `_add_sequence`.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

import torch

from m4d.engine.backbone import run_backbone
from m4d.engine.batching import Batcher, EncoderRequest, encoder_texts
from m4d.engine.deadlines import Deadlines
from m4d.engine.encoder import run_encoder_batch
from m4d.engine.goodput import encoder_latest_start
from m4d.engine.latency import LatencyPolicy, is_urgent
from m4d.engine.media import Continuation, outcome, recognise_batch
from m4d.engine.scheduler import Scheduler
from m4d.engine.stats import EngineStats
from m4d.engine.stream import Outbox, RequestStream
from m4d.executor.runtime import Runtime
from m4d.executor.workers import DeviceExecutor
from m4d.requests import Event, Failed, GenerateRequest, RequestBase

ENCODER_SAFETY = 0.05  # seconds, beside two decode steps, that deferred encoder work starts early


class BesideGeneration:
    # the engine's, set in its __init__
    runtime: Runtime
    batcher: Batcher
    scheduler: Scheduler
    latency: LatencyPolicy
    deadlines: Deadlines
    stats: EngineStats
    executors: dict[str, DeviceExecutor]
    _lock: threading.Condition
    _inbox: collections.deque[tuple[RequestBase, RequestStream]]
    _cancels: set[int]
    _urgent_inbox: int
    _offloaded: collections.deque[tuple[EncoderRequest, Event]]
    _streams: dict[int, RequestStream]
    _outbox: Outbox
    _finish: Callable[[int, Event], None]
    _add_sequence: Callable[[GenerateRequest, RequestStream, torch.Tensor | None], None]

    def _run_encoder(self) -> None:
        if not self.batcher.encoder or self._encoder_waits():
            return
        urgent_waiting = bool(self._urgent_inbox) or any(
            is_urgent(s.priority) and s.computed == 0 for s in self.scheduler.seqs.values())
        plan = self.batcher.next_encoder(time.monotonic(), busy=bool(self.scheduler.seqs),
                                         urgent_waiting=urgent_waiting)
        if plan.hold > 0:
            with self._lock:  # a new request notifies; otherwise the wait times out
                if not self._inbox and not self._cancels:
                    self._lock.wait(timeout=plan.hold)
            return  # the loop comes back with whatever arrived meanwhile
        if not plan.batch:
            return
        executor = self.executors.get(str(getattr(self.runtime, "encoder_device", "")))
        if executor is not None:  # the encoder is on another device: its executor runs it
            executor.submit(lambda: self._post_offloaded(list(run_encoder_batch(
                self.runtime, plan.batch))))
            return
        started = time.monotonic()
        for request, event in run_encoder_batch(self.runtime, plan.batch):
            self._answered(request.id, event)
        self.latency.encoded(plan.num_texts, time.monotonic() - started)

    def _encoder_waits(self) -> bool:
        """Encoder work with deadlines waits while generations with deadlines run, until
        the latest moment that still ends it in time (`goodput.encoder_latest_start`)."""
        if not any(w.running and w.must for w in self.deadlines.held):
            return False
        costs = self.deadlines.costs
        start = encoder_latest_start(
            [(r.deadline, len(encoder_texts(r))) for r in self.batcher.encoder],
            self.latency.ms_per_text / 1e3, self.deadlines.config.margin,
            safety=2 * costs.decode(self.scheduler.num_rows) + ENCODER_SAFETY)
        return start is not None and time.monotonic() < start

    def _post_offloaded(self, results: list[tuple[EncoderRequest, Event]]) -> None:
        """On another device's executor: hands a batch's results back to the step loop."""
        with self._lock:
            self._offloaded.extend(results)
            self._lock.notify()

    def _collect_offloaded(self) -> None:
        with self._lock:
            results = list(self._offloaded)
            self._offloaded.clear()
        for request, event in results:
            self._answered(request.id, event)

    def _answered(self, rid: int, event: Event) -> None:
        """Ends one-call work (encoder, backbone): its prompt tokens count as processed."""
        usage = getattr(event, "usage", None)
        if usage is not None:
            self.stats.tokens_prompted += usage.prompt_tokens
        self._finish(rid, event)

    def _run_backbone(self) -> None:
        request = self.batcher.next_backbone(rows_in_use=bool(self.scheduler.seqs))
        if request is not None:
            self._answered(request.id, run_backbone(self.runtime, request))

    def _run_media(self) -> None:
        batch = self.batcher.next_media()
        if not batch:
            return
        results, failed = recognise_batch(self.runtime.media.recognise, batch)
        for request, error in failed:
            self._finish(request.id, Failed(error))
        for result in results:
            rid = result.request.id
            if rid not in self._streams:
                continue  # cancelled meanwhile
            answer = outcome(self.runtime, result)
            if isinstance(answer, Continuation):  # a cascade: generation on the same stream
                self._outbox.send(self._streams[rid], answer.source)
                self._add_sequence(answer.request, self._streams[rid], answer.prompt_embeds)
            else:
                self._finish(rid, answer)

"""The engine: the one owner of serving state, and the executor loop that drives the model.

Servicers call `submit()` from the event loop and read a `RequestStream`; the engine's
worker thread takes requests from its inbox, asks the scheduler what to run, runs it on
the runtime (torch, never on the event loop), and posts events back to the streams: the
events of a step go to the loop in one `call_soon_threadsafe` (not one per token), and a
stream whose reader is behind merges its queued text deltas into one. Cancellation and
deadlines are checked every step: a cancelled sequence leaves its KV row before the next
step runs.

Latency of urgent work under a background load: a step runs its prompt chunks before its
decode batch and sends their first tokens at once; while more urgent requests have been
arriving lately, a background decode batch runs in slices of about `decode_slice_ms`, and
the step ends early (the rest of the batch decodes in the next one) when a more urgent
request arrives; a background encoder batch waits (at most `encoder_defer_max`) while more
urgent generation waits to start, and is cut to about `decode_slice_ms` of texts. So an
urgent request waits for at most one such slice before its prefill runs. (Beyond ~8 rows a
decode step costs the same per row on CPU, so slices cost background work little.)
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from m4d.engine.admission import Admission, AdmissionConfig
from m4d.engine.encoder import EncoderWork, run_encoder_batch
from m4d.engine.kvpool import KVCapacityError, KVPool
from m4d.engine.media import (
    IMAGE_MARKER,
    MediaWork,
    Recognised,
    answer_messages,
    clip_event,
    final_event,
    run_media_batch,
)
from m4d.engine.policy import QueuePolicy
from m4d.engine.scheduler import Scheduler, SeqState
from m4d.engine.sequence import Sequence
from m4d.engine.usage import RecentUsage
from m4d.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    M4Error,
    Unavailable,
)
from m4d.executor.runtime import Runtime
from m4d.executor.sampling import sample
from m4d.executor.workers import DeviceExecutor, executors_for
from m4d.requests import (
    ClassifyRequest,
    EmbedRequest,
    Event,
    Failed,
    GenerateRequest,
    MediaOp,
    MediaRequest,
    Predictions,
    PredictNextRequest,
    Priority,
    RequestBase,
    Scored,
    ScoreRequest,
    SourceText,
    TextDelta,
    Timings,
    Usage,
    WordPrediction,
)

log = logging.getLogger(__name__)


@dataclass
class UidUsage:
    """What one caller uid has asked of the engine since start."""

    requests: int = 0
    in_flight: int = 0
    rejected: int = 0
    tokens_prompted: int = 0
    tokens_generated: int = 0
    apps: set[str] = field(default_factory=set)  # labels it sent (at most 8 kept)
    failed: int = 0  # admitted, then cancelled, expired or failed
    klass: int = -1  # class of its latest request, after the uid_max_class cap


TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))  # seconds


@dataclass
class EngineStats:
    in_flight: int = 0
    total: int = 0
    cancelled: int = 0
    rejected: int = 0
    tokens_generated: int = 0
    tokens_prompted: int = 0
    preempted: int = 0
    steps: int = 0
    active_sequences: int = 0
    last_progress: float = field(default_factory=time.monotonic)
    last_batch: int = 0  # sequences in the last decode step
    per_uid: dict[int, UidUsage] = field(default_factory=dict)
    ttft_counts: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_sum: float = 0.0
    recent_ttft: collections.deque[float] = field(  # seconds, the latest, for percentiles
        default_factory=lambda: collections.deque(maxlen=1000))

    def uid(self, uid: int) -> UidUsage:
        return self.per_uid.setdefault(uid, UidUsage())

    def observe_ttft(self, seconds: float) -> None:
        for i, bound in enumerate(TTFT_BUCKETS):
            if seconds <= bound:
                self.ttft_counts[i] += 1
                break
        self.ttft_sum += seconds
        self.recent_ttft.append(seconds)


_STREAMING = (TextDelta, SourceText)  # events after which more events follow


class RequestStream:
    """The event loop's end of one request: iterate for events, cancel to stop the work."""

    def __init__(self, engine: Engine, request: RequestBase) -> None:
        self._engine = engine
        self.request = request
        self._events: collections.deque[Event] = collections.deque()
        self._ready = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.done = False

    def _post(self, event: Event) -> None:  # called on the worker thread
        self._loop.call_soon_threadsafe(self._put, event)

    def _put(self, event: Event) -> None:  # called on the event loop
        self._events.append(event)
        self._ready.set()

    async def _next(self) -> Event:
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        event = self._events.popleft()
        if isinstance(event, TextDelta) and self._events and isinstance(self._events[0], TextDelta):
            # the reader is behind: the deltas queued so far go out as one message
            texts, ids = [event.text], list(event.token_ids)
            while self._events and isinstance(self._events[0], TextDelta):
                more = self._events.popleft()
                assert isinstance(more, TextDelta)
                texts.append(more.text)
                ids.extend(more.token_ids)
            event = TextDelta("".join(texts), tuple(ids))
        return event

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self.done:
            event = await self._next()
            self.done = not isinstance(event, _STREAMING)
            yield event

    async def result(self) -> Event:
        """The final event of a non-streaming request; raises its error."""
        async for event in self:
            if isinstance(event, Failed):
                raise event.error
            if self.done:
                return event
        raise Internal("request ended without a result")

    def cancel(self) -> None:
        if not self.done:
            self._engine.cancel(self.request.id)


def _deliver(batch: list[tuple[RequestStream, Event]]) -> None:
    """On the event loop: hands a step's events to their streams, in order."""
    for stream, event in batch:
        stream._put(event)


def _estimate(request: RequestBase) -> int:
    """Tokens a request may cost, charged to its uid's token bucket at admission."""
    if isinstance(request, GenerateRequest):
        return len(request.prompt_ids) + request.sampling.max_tokens
    if isinstance(request, PredictNextRequest):
        return len(request.prompt_ids)
    if isinstance(request, EmbedRequest):
        return sum(len(t) for t in request.texts) // 4 + 1
    if isinstance(request, ClassifyRequest):
        return len(request.text) // 4 + 1
    if isinstance(request, MediaRequest):  # recognition, plus the answer of a cascade
        return 256 + (request.sampling.max_tokens if request.sampling else 0)
    return 1


@dataclass
class _Ticket:
    """What a request holds in admission until it ends."""

    uid: int
    klass: int
    weight: float
    estimate: int


class Engine:
    def __init__(self, runtime: Runtime, *, kv_slots: int, token_budget: int, prefill_chunk: int,
                 max_queue: int, max_batch_texts: int, policy: QueuePolicy | str = "fair",
                 kv_tokens: int | None = None, kv_block: int = 16,
                 admission: AdmissionConfig | None = None,
                 encoder_max_wait: float = 0.002, max_batch_media: int = 8,
                 decode_slice_ms: float = 25.0, encoder_defer_max: float = 0.5,
                 urgent_window: float = 5.0) -> None:
        self.runtime = runtime
        kv = KVPool(kv_tokens, kv_block) if kv_tokens else None
        self.scheduler = Scheduler(kv_slots, token_budget, max_queue, prefill_chunk,
                                   policy=policy, kv=kv)
        self.admission = Admission(admission)
        self._tickets: dict[int, _Ticket] = {}
        self.max_queue = max_queue
        self.max_batch_texts = max_batch_texts
        self.encoder_max_wait = encoder_max_wait  # seconds a partial encoder batch may wait
        # Latency of urgent work beside background work (see the module docstring): the
        # target duration of one slice of a background decode batch (0: never slice), the
        # longest a background encoder batch waits for urgent generation to start, and how
        # long after the last urgent request background decode keeps being sliced.
        self.decode_slice_ms = decode_slice_ms
        self.encoder_defer_max = encoder_defer_max
        self.urgent_window = urgent_window
        self._last_urgent = -float("inf")  # monotonic time the last urgent request arrived
        self._urgent_inbox = 0  # urgent generation requests in the inbox (under the lock)
        self._ms_per_row = 0.0  # running estimate of decode time per batch row
        self._ms_per_text = 0.0  # running estimate of encoder time per text
        self._outbox: list[tuple[RequestStream, Event]] = []  # events of the current step
        self.max_batch_media = max_batch_media
        self.stats = EngineStats()
        self._lock = threading.Condition()
        self._inbox: collections.deque[tuple[RequestBase, RequestStream]] = collections.deque()
        self._cancels: set[int] = set()
        self._streams: dict[int, RequestStream] = {}
        self._sequences: dict[int, Sequence] = {}
        self._encoder_queue: collections.deque[EncoderWork] = collections.deque()
        self._aux_queue: collections.deque[
            tuple[PredictNextRequest | ScoreRequest, RequestStream]] = collections.deque()
        self._media_queue: collections.deque[MediaWork] = collections.deque()
        self._prompt_embeds: dict[int, Any] = {}  # path-1 sequences: spliced prompt [S', D]
        self._stopping = False
        self._thread: threading.Thread | None = None
        # one executor per device in use besides the step loop's (config `placement`)
        self.executors: dict[str, DeviceExecutor] = executors_for(runtime)
        self._offloaded: collections.deque[tuple[EncoderWork, Event]] = collections.deque()
        self.recent = RecentUsage()  # token counters over the last seconds, for Status
        self.frozen = threading.Event()  # tests freeze the worker to check the watchdog
        self.on_idle: Callable[[], None] | None = None  # called on the worker thread

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"m4-executor-{self.runtime.device}")
        self._thread.start()
        for executor in self.executors.values():
            executor.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for executor in self.executors.values():
            executor.stop()

    # ---- the event loop's side ---------------------------------------------------------

    def submit(self, request: RequestBase) -> RequestStream:
        """Queues a request; raises Unavailable at once when the queue is full."""
        stream = RequestStream(self, request)
        with self._lock:
            if self._stopping:
                raise Unavailable("the daemon is shutting down; retry on the next start",
                                  retry_after=5.0)
            waiting = self._num_waiting()
            if waiting >= self.max_queue:
                self.stats.rejected += 1
                self.stats.uid(request.caller.uid).rejected += 1
                raise Unavailable(
                    f"busy: {waiting} requests are waiting (limit {self.max_queue}); "
                    "retry shortly", retry_after=0.5)
            uid, estimate = request.caller.uid, _estimate(request)
            decision = self.admission.check(uid, int(request.priority), estimate,
                                            time.monotonic())
            error = decision.error()
            if error is not None:
                self.stats.rejected += 1
                self.stats.uid(uid).rejected += 1
                raise error
            usage = self.stats.uid(uid)
            usage.requests += 1
            usage.in_flight += 1
            if request.caller.app and len(usage.apps) < 8:
                usage.apps.add(request.caller.app)
            request.priority = Priority(decision.klass)  # max_class may lower it
            usage.klass = decision.klass
            self._tickets[request.id] = _Ticket(uid, decision.klass, decision.weight, estimate)
            if request.priority < Priority.BACKGROUND:
                self._last_urgent = time.monotonic()
                self._urgent_inbox += isinstance(request, GenerateRequest)
            self._inbox.append((request, stream))
            self._streams[request.id] = stream
            self.stats.in_flight += 1
            self._lock.notify()
        return stream

    def _num_waiting(self) -> int:
        """Requests that cannot start now: generations beyond the free KV rows (whether
        the worker has picked them up yet or not) and queued encoder work. Read from the
        event loop while the worker runs: an estimate good to a request or two."""
        free_rows = self.scheduler.num_rows - len(self.scheduler.running)
        generations = sum(isinstance(r, GenerateRequest) for r, _ in self._inbox)
        others = len(self._inbox) - generations
        pending = generations + self.scheduler.num_waiting
        return (max(0, pending - free_rows) + others + len(self._encoder_queue)
                + len(self._media_queue))

    def cancel(self, request_id: int) -> None:
        with self._lock:
            if request_id in self._streams:
                self._cancels.add(request_id)
                self._lock.notify()

    # ---- the worker thread ---------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._inbox or self._cancels or self.scheduler.seqs
                    or self._encoder_queue or self._aux_queue or self._offloaded or self._media_queue)

    def _run(self) -> None:
        log.info("executor started", extra={"device": str(self.runtime.device)})
        while True:
            while self.frozen.is_set():  # test hook: a stuck worker makes no progress
                time.sleep(0.05)
            with self._lock:
                while not self._has_work() and not self._stopping and not self.frozen.is_set():
                    self._lock.wait(timeout=1.0)
                    self.stats.last_progress = time.monotonic()  # idle is healthy
                if self._stopping and not self._has_work():
                    return
                inbox = list(self._inbox)
                self._inbox.clear()
                self._urgent_inbox = 0
                cancels = set(self._cancels)
                self._cancels.clear()
            try:
                self._admit(inbox)
                self._expire(cancels)
                self._flush_events()
                self._step()
                self._flush_events()
                self._run_encoder()
                self._flush_events()
                self._run_media()
                self._run_aux()
                self._collect_offloaded()
            except Exception as exc:  # a runtime failure must not kill the daemon
                log.exception("executor step failed")
                self._fail_all(Internal(f"model step failed: {exc}"))
            self._flush_events()
            self.stats.last_progress = time.monotonic()
            self.recent.maybe_sample(self)

    def _send(self, stream: RequestStream, event: Event) -> None:
        """Queues an event for the next flush (worker thread)."""
        self._outbox.append((stream, event))

    def _flush_events(self) -> None:
        """Posts the queued events in order: one call_soon_threadsafe per event loop."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Event]]] = {}
        for item in batch:
            by_loop.setdefault(item[0]._loop, []).append(item)
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _admit(self, inbox: list[tuple[RequestBase, RequestStream]]) -> None:
        for request, stream in inbox:
            if isinstance(request, GenerateRequest):
                ticket = self._tickets.get(request.id)
                try:
                    self.scheduler.add(SeqState(
                        id=request.id, priority=int(request.priority), arrival=request.arrival,
                        prompt_len=len(request.prompt_ids),
                        max_new_tokens=request.sampling.max_tokens,
                        uid=request.caller.uid, weight=ticket.weight if ticket else 1.0,
                        deadline=request.deadline))
                except KVCapacityError as exc:
                    self._finish(request.id, Failed(InvalidArgument(str(exc))))
                    continue
                self._sequences[request.id] = Sequence(request, stream, self.runtime.tokenizer)
            elif isinstance(request, (EmbedRequest, ClassifyRequest)):
                self._encoder_queue.append(EncoderWork(request, stream))
            elif isinstance(request, (PredictNextRequest, ScoreRequest)):
                self._aux_queue.append((request, stream))
            elif isinstance(request, MediaRequest):
                self._media_queue.append(MediaWork(request, stream))
            else:
                self._finish(request.id, Failed(Internal(f"unknown request {request!r}")))

    def _expire(self, cancels: set[int]) -> None:
        now = time.monotonic()
        for rid in cancels:
            if rid in self._streams:
                self.stats.cancelled += 1
                log.info("request cancelled by client", extra={"request": rid})
                self._finish(rid, Failed(Cancelled("cancelled by the client")))
        for rid, stream in list(self._streams.items()):
            # generation deadlines are the scheduler's: they come back in plan.expired
            if rid not in self.scheduler.seqs and stream.request.expired(now):
                self.stats.cancelled += 1
                log.info("request deadline exceeded", extra={"request": rid})
                self._finish(rid, Failed(DeadlineExceeded(
                    "the deadline passed before the request finished")))

    def _finish(self, rid: int, event: Event) -> None:
        """Ends a request: frees its KV row and queue entries, posts the last event."""
        stream = self._streams.pop(rid, None)
        self.scheduler.finish(rid)
        seq = self._sequences.pop(rid, None)
        ticket = self._tickets.pop(rid, None)
        if stream is None:
            return
        self._encoder_queue = collections.deque(
            w for w in self._encoder_queue if w.request.id != rid)
        self._aux_queue = collections.deque(w for w in self._aux_queue if w[0].id != rid)
        self._media_queue = collections.deque(w for w in self._media_queue if w.request.id != rid)
        self._prompt_embeds.pop(rid, None)
        with self._lock:
            if ticket is not None:
                used = (len(seq.request.prompt_ids) + len(seq.tokens) if seq is not None
                        else ticket.estimate)
                self.admission.release(ticket.uid, ticket.klass,
                                       unused_tokens=max(0, ticket.estimate - used))
            self.stats.in_flight -= 1
            self.stats.total += 1
            idle = self.stats.in_flight == 0
            usage = self.stats.uid(stream.request.caller.uid)
            usage.in_flight = max(0, usage.in_flight - 1)
            usage.failed += isinstance(event, Failed)
            if seq is not None:
                usage.tokens_prompted += min(seq.prompted, len(seq.request.prompt_ids))
                usage.tokens_generated += len(seq.tokens)
            elif hasattr(event, "usage"):
                usage.tokens_prompted += event.usage.prompt_tokens
        self._send(stream, event)
        if idle and self.on_idle is not None:
            self.on_idle()

    def _fail_all(self, error: M4Error) -> None:
        for rid in list(self._streams):
            self._finish(rid, Failed(error))

    # ---- generation ----------------------------------------------------------------

    def _step(self) -> None:
        now = time.monotonic()
        plan = self.scheduler.schedule(now)
        for rid in plan.expired:  # already out of the scheduler: fail them
            self.stats.cancelled += 1
            log.info("request deadline exceeded", extra={"request": rid})
            self._finish(rid, Failed(DeadlineExceeded(
                "the deadline passed before the request finished")))
        for rid in plan.preempted:  # lost its KV row: a later chunk re-prefills it
            self.stats.preempted += 1
            log.info("sequence preempted", extra={"request": rid})
        self.stats.active_sequences = len(self.scheduler.running)
        if plan.empty:
            return
        self.stats.last_batch = len(plan.decode)
        # prompt chunks first, most urgent class first: a new request's first token leaves
        # before the other chunks and the decode batch run
        ranks = {sid: s.rank for sid, s in self.scheduler.seqs.items()}
        for chunk in sorted(plan.prefill, key=lambda c: ranks.get(c.seq_id, 0)):
            if self._outbox and ranks.get(chunk.seq_id, 0) >= Priority.BACKGROUND:
                self._flush_events()  # the urgent first tokens go out before background work
            seq = self._sequences[chunk.seq_id]
            resumed = bool(seq.tokens)  # preempted before: re-prefills prompt + generated
            if chunk.start == 0 and not resumed:
                seq.started(now)
            if chunk.seq_id in self._prompt_embeds:  # path 1: image features among the tokens
                logits = self.runtime.prefill_embeds(
                    chunk.row, self._chunk_embeds(seq, chunk.start, chunk.length), chunk.start)
            else:
                ids = (seq.request.prompt_ids + seq.tokens)[chunk.start:chunk.start + chunk.length]
                logits = self.runtime.prefill(chunk.row, ids, chunk.start)
            self.stats.tokens_prompted += chunk.length
            seq.prompted += chunk.length
            if chunk.last:
                if not resumed:
                    first = time.monotonic()
                    seq.prefilled(first)
                    self.stats.observe_ttft(first - seq.request.arrival)
                token = sample(logits[None], [seq.params], [seq.generator])[0]
                self._on_token(seq, token)
        if plan.prefill:
            self._flush_events()
        if plan.decode:
            done = self._decode(plan.decode)
            del plan.decode[done:]  # not run: they decode in the next step, uncharged
        self.scheduler.update(plan)
        self.stats.steps += 1

    def _decode(self, decode: list[tuple[int, int]]) -> int:
        """Runs a step's decode batch; returns how many of its rows (from the front) ran.

        The batch is ordered most urgent first. While urgent (foreground or system)
        requests have been arriving within `urgent_window`, background rows run in slices
        of about `decode_slice_ms`, and the rest of the batch is left for the next step
        when an urgent generation request arrives meanwhile. The model's rows are
        independent, so slicing changes no token."""
        seqs = [self._sequences[sid] for sid, _ in decode]
        background = [self.scheduler.seqs[sid].rank >= Priority.BACKGROUND for sid, _ in decode]
        size = len(decode)
        if background[-1] and self._slicing(self._ms_per_row):
            size = max(4, int(self.decode_slice_ms / self._ms_per_row))
        done = 0
        while done < len(decode):
            stop = min(len(decode), done + size)
            if len(decode) - stop < size // 2:
                stop = len(decode)  # no small tail slice
            batch = seqs[done:stop]
            started = time.monotonic()
            logits = self.runtime.decode(
                [row for _, row in decode[done:stop]],
                [s.last_token for s in batch],
                [s.next_position for s in batch])
            tokens = sample(logits, [s.params for s in batch], [s.generator for s in batch])
            per_row = (time.monotonic() - started) * 1e3 / len(batch)
            self._ms_per_row = per_row if self._ms_per_row <= 0 else (
                0.8 * self._ms_per_row + 0.2 * per_row)
            for seq, token in zip(batch, tokens, strict=True):
                self._on_token(seq, token)
            done = stop
            if done < len(decode) and background[done] and self._urgent_inbox:
                break  # an urgent request waits: its prefill goes before the rest
        return done

    def _slicing(self, ms_per_item: float) -> bool:
        """Whether background work runs in slices of about `decode_slice_ms` now: slicing is
        on, urgent requests came within `urgent_window`, and the work's cost per item (a
        decode row, an encoder text) has been measured."""
        return (self.decode_slice_ms > 0 and ms_per_item > 0
                and time.monotonic() - self._last_urgent < self.urgent_window)

    def _on_token(self, seq: Sequence, token: int) -> None:
        self.stats.tokens_generated += 1
        delta, finished = seq.add_token(token, self.runtime.max_context)
        if delta is not None and seq.stream is not None:
            self._send(seq.stream, delta)
        if finished is not None:
            self._finish(seq.request.id, finished)

    # ---- encoder and auxiliary work ------------------------------------------------

    def _encoder_hold(self) -> float:
        """Seconds to hold a partial encoder batch for more texts (dynamic batching): only
        while nothing else needs the executor and the oldest request is younger than
        encoder_max_wait; 0 means run now."""
        if not self._encoder_queue or self.scheduler.seqs or self._aux_queue:
            return 0.0
        if sum(w.num_texts for w in self._encoder_queue) >= self.max_batch_texts:
            return 0.0
        age = time.monotonic() - self._encoder_queue[0].request.arrival
        return max(0.0, self.encoder_max_wait - age)

    def _urgent_generation_waiting(self) -> bool:
        """A foreground or system generation is in the inbox or waits for its first chunk."""
        return bool(self._urgent_inbox) or any(
            s.priority < Priority.BACKGROUND and s.computed == 0
            for s in self.scheduler.seqs.values())

    def _run_encoder(self) -> None:
        if not self._encoder_queue:
            return
        oldest = self._encoder_queue[0].request.arrival
        if (time.monotonic() - oldest < self.encoder_defer_max
                and all(w.request.priority >= Priority.BACKGROUND for w in self._encoder_queue)
                and self._urgent_generation_waiting()):
            return  # background texts wait for the urgent request's first step
        hold = self._encoder_hold()
        if hold > 0:
            with self._lock:  # a new request notifies; otherwise the wait times out
                if not self._inbox and not self._cancels:
                    self._lock.wait(timeout=hold)
            return  # the loop comes back with whatever arrived meanwhile
        limit = self.max_batch_texts
        if self._slicing(self._ms_per_text) and all(
                w.request.priority >= Priority.BACKGROUND for w in self._encoder_queue):
            limit = max(1, min(limit, int(self.decode_slice_ms / self._ms_per_text)))
        batch: list[EncoderWork] = []
        texts = 0
        while self._encoder_queue and (
                not batch or texts + self._encoder_queue[0].num_texts <= limit):
            work = self._encoder_queue.popleft()
            batch.append(work)
            texts += work.num_texts
        executor = self.executors.get(str(getattr(self.runtime, "encoder_device", "")))
        if executor is not None:  # the encoder is on another device: its executor runs it
            executor.submit(lambda: self._post_offloaded(list(run_encoder_batch(
                self.runtime, batch))))
            return
        started = time.monotonic()
        for work, event in run_encoder_batch(self.runtime, batch):
            if not isinstance(event, Failed):
                self.stats.tokens_prompted += event.usage.prompt_tokens  # type: ignore[union-attr]
            self._finish(work.request.id, event)
        per_text = (time.monotonic() - started) * 1e3 / max(1, texts)
        self._ms_per_text = per_text if self._ms_per_text <= 0 else (
            0.8 * self._ms_per_text + 0.2 * per_text)

    def _run_media(self) -> None:
        """One batch of image or audio work: the most urgent waiting request's module, with
        every queued request for that module up to max_batch_media, most urgent first."""
        if not self._media_queue:
            return
        first = min(self._media_queue, key=lambda w: (w.request.priority, w.request.arrival))
        module = first.request.module
        batch = sorted((w for w in self._media_queue if w.request.module == module),
                       key=lambda w: (w.request.priority, w.request.arrival))[:self.max_batch_media]
        taken = {w.request.id for w in batch}
        self._media_queue = collections.deque(
            w for w in self._media_queue if w.request.id not in taken)
        try:
            results = list(run_media_batch(self.runtime.media.recognise, batch))
        except M4Error as exc:  # a bad input found by the model: fail it, not its batch-mates
            if len(batch) == 1:
                self._finish(batch[0].request.id, Failed(exc))
                return
            results = []
            for work in batch:
                try:
                    results += run_media_batch(self.runtime.media.recognise, [work])
                except M4Error as one:
                    self._finish(work.request.id, Failed(one))
        for result in results:
            request = result.work.request
            if request.id not in self._streams:
                continue  # cancelled meanwhile
            if request.op is MediaOp.ANSWER:
                self._start_answer(request, result.work.stream, result.recognised)
            elif request.op in (MediaOp.IMAGE_LABELS, MediaOp.IMAGE_RANK, MediaOp.IMAGE_EMBED):
                media = self.runtime.media
                self._finish(request.id, clip_event(
                    result, functools.partial(media.text_features, module),
                    media.logit_scale(module) if request.op is not MediaOp.IMAGE_EMBED else 1.0))
            else:
                self._finish(request.id, final_event(result))

    def _start_answer(self, request: MediaRequest, stream: Any, recognised: Recognised) -> None:
        """A cascade's second half: the recognised text and the question become a chat
        prompt, and the request continues as ordinary generation on the same stream."""
        source = recognised.text
        tokenizer, template = self.runtime.tokenizer, self.runtime.chat_template
        if tokenizer is None or request.sampling is None:
            self._finish(request.id, Failed(InvalidArgument(
                f"task {request.task!r} needs a language backbone")))
            return
        messages = answer_messages(request.prompt_template, source, request.question)
        text = (template.render(messages, add_generation_prompt=True) if template is not None
                else "\n".join(m["content"] for m in messages) + "\n")
        embeds = None
        if recognised.features is not None:  # path 1: the image's features are the prompt's
            _, projector = self.runtime.media.projector_for(request.module)
            image_token = int(projector["image_token_id"])
            before, _, after = text.partition(IMAGE_MARKER)
            ids = [*tokenizer.encode(before), image_token, *tokenizer.encode(after)]
            embeds = self.runtime.image_prompt(ids, image_token, recognised.features)
            at = ids.index(image_token)  # one id per position, for counting and resume
            ids = ids[:at] + [image_token] * int(recognised.features.shape[0]) + ids[at + 1:]
        else:
            ids = tokenizer.encode(text)
        room = self.runtime.max_context - len(ids)
        if room <= 0:
            self._finish(request.id, Failed(InvalidArgument(
                f"the recognised text makes a {len(ids)}-token prompt; the context holds "
                f"{self.runtime.max_context}")))
            return
        sampling = dataclasses.replace(request.sampling,
                                       max_tokens=min(request.sampling.max_tokens, room))
        generate = GenerateRequest(task=request.task, priority=request.priority,
                                   caller=request.caller, id=request.id, arrival=request.arrival,
                                   deadline=request.deadline, prompt_ids=ids, sampling=sampling)
        media = request.media
        self._send(stream, SourceText(source, media.seconds if media else 0.0))
        ticket = self._tickets.get(request.id)
        try:
            self.scheduler.add(SeqState(
                id=request.id, priority=int(request.priority), arrival=request.arrival,
                prompt_len=len(ids), max_new_tokens=sampling.max_tokens,
                uid=request.caller.uid, weight=ticket.weight if ticket else 1.0,
                deadline=request.deadline))
        except KVCapacityError as exc:
            self._finish(request.id, Failed(InvalidArgument(str(exc))))
            return
        self._sequences[request.id] = Sequence(generate, stream, tokenizer)
        if embeds is not None:
            self._prompt_embeds[request.id] = embeds

    def _chunk_embeds(self, seq: Sequence, start: int, length: int) -> Any:
        """A prefill chunk of a path-1 sequence as embeddings: the spliced prompt, then (when
        a preempted sequence resumes) its generated tokens' embeddings."""
        embeds = self._prompt_embeds[seq.request.id]  # [S', D]
        n = embeds.shape[0]
        head = embeds[start:start + length]
        if start + length <= n:
            return head
        tail = self.runtime.token_embeddings(seq.tokens[max(0, start - n):start + length - n])
        return torch.cat([head, tail.to(head.dtype)]) if head.shape[0] else tail

    def _post_offloaded(self, results: list[tuple[EncoderWork, Event]]) -> None:
        """On another device's executor: hands a batch's results back to the step loop."""
        with self._lock:
            self._offloaded.extend(results)
            self._lock.notify()

    def _collect_offloaded(self) -> None:
        with self._lock:
            results = list(self._offloaded)
            self._offloaded.clear()
        for work, event in results:
            if not isinstance(event, Failed):
                self.stats.tokens_prompted += event.usage.prompt_tokens  # type: ignore[union-attr]
            self._finish(work.request.id, event)

    def _run_aux(self) -> None:
        if not self._aux_queue:
            return
        request = self._aux_queue[0][0]
        if isinstance(request, ScoreRequest):
            if self.scheduler.seqs:  # it borrows KV row 0: wait until no sequence holds a row
                return
            self._aux_queue.popleft()
            self._finish(request.id, Scored(self.runtime.reference_gaps(
                request.prompt_ids, request.reference, row=0)))
            return
        self._aux_queue.popleft()
        started = time.monotonic()
        words = self.runtime.next_words(request.prompt_ids, request.num_predictions)
        end = time.monotonic()
        self.stats.tokens_prompted += len(request.prompt_ids)
        timings = Timings(queue_ms=(started - request.arrival) * 1e3,
                          prefill_ms=(end - started) * 1e3,
                          total_ms=(end - request.arrival) * 1e3)
        self._finish(request.id, Predictions(
            [WordPrediction(w, p) for w, p in words],
            Usage(prompt_tokens=len(request.prompt_ids)), timings))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.stats.__dict__, kv_slots=self.scheduler.num_rows,
                        active_sequences=len(self.scheduler.running),
                        waiting=self._num_waiting(),
                        per_uid={uid: dataclasses.replace(u, apps=set(u.apps))
                                 for uid, u in self.stats.per_uid.items()},
                        ttft_counts=list(self.stats.ttft_counts))

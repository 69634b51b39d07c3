"""The engine: the one owner of serving state, and the step loop that drives the model.

Servicers call `submit()` from the event loop and read a `RequestStream`; the worker
thread takes requests from the inbox, asks the policies what to run, runs it on the
runtime (torch, never on the event loop) and posts the events through an `Outbox`. A pass:

1. admit the inbox: generation to the `Scheduler`, the other work to the `Batcher`;
2. cancel and expire: a cancelled sequence leaves its KV row before the next step runs;
3. one generation step (the scheduler's `StepPlan`): prompt chunks, most urgent first, their
   first tokens posted before any background work runs; then the decode batch, in the
   slices the `LatencyPolicy` plans: while urgent requests have been arriving lately, a
   background batch runs in slices of about `decode_slice_ms`, and the step ends early (the
   rest decodes in the next one) when urgent generation arrives. So an urgent request waits
   for at most one slice of background work before its prefill runs;
4. the next encoder batch, media batch and backbone call (the `Batcher`'s plans; a
   background encoder batch defers to urgent generation and is cut to a slice too);
5. the encoder batches that other devices' executors have run.

At submit, a generation with a deadline is checked against the work the engine holds
(`deadlines.py`, `goodput.py`): refused at once when it, or a call already held, would
finish late. A preempted sequence's KV is parked aside while the park budget allows and put
back into whatever row it gets next (`plan.parked`, `plan.restored`).

Before each step, backpressure (`backpressure.py`): a sequence whose stream holds too many
tokens its reader has not taken pauses (the scheduler plans nothing for it and may give its
row away); the stream wakes the loop when its reader catches up; one whose reader takes
nothing for too long is cancelled.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable

import torch

from m4d.engine.admission import Admission, Ticket, estimate_tokens
from m4d.engine.backpressure import verdict
from m4d.engine.batching import Batcher, EncoderRequest, encoder_texts
from m4d.engine.beside import BesideGeneration
from m4d.engine.config import EngineConfig
from m4d.engine.deadlines import Deadlines
from m4d.engine.kvpool import KVCapacityError, KVPool
from m4d.engine.latency import LatencyPolicy, is_urgent
from m4d.engine.prefixes import KVCopier, PrefixCache, Prefixes
from m4d.engine.scheduler import PrefillChunk, Scheduler, SeqState
from m4d.engine.sequence import Sequence, constrain, tokens_per_uid
from m4d.engine.stats import EngineSnapshot, EngineStats
from m4d.engine.stream import Outbox, RequestStream
from m4d.engine.usage import RecentUsage
from m4d.errors import Cancelled, DeadlineExceeded, Internal, InvalidArgument, M4Error, Unavailable
from m4d.executor.adapters import holding, release
from m4d.executor.memory import trim_heap
from m4d.executor.runtime import ParkedKV, Runtime
from m4d.executor.sampling import sample
from m4d.executor.workers import DeviceExecutor, executors_for
from m4d.requests import (
    ClassifyRequest,
    EmbedRequest,
    Event,
    Failed,
    Finished,
    FinishReason,
    GenerateRequest,
    RequestBase,
)

log = logging.getLogger(__name__)

# The step loop's thread runs at this nice value (the kernels' helper threads run at 10), so
# that the event loop (admission, refusals, streaming the tokens) is scheduled first when
# both want a core: its work is short and every app waits on it.
WORKER_NICE = 5


class Engine(BesideGeneration):
    def __init__(self, runtime: Runtime, config: EngineConfig) -> None:
        self.runtime = runtime
        self.config = config
        kv = KVPool(config.kv_tokens, config.kv_block) if config.kv_tokens else None
        self.admission = Admission(config.admission)
        self.scheduler = Scheduler(config.kv_slots, config.token_budget, config.max_queue,
                                   config.prefill_chunk, policy=config.policy, kv=kv,
                                   min_run_tokens=config.min_run_tokens,
                                   max_running=lambda uid: self.admission.quota(uid).max_running,
                                   park_tokens=config.park_tokens)
        self.latency = LatencyPolicy(config.latency)
        self.deadlines = Deadlines(config.goodput, self.latency, config.kv_slots)
        self.prefixes = Prefixes(PrefixCache(config.prefix_block, config.prefix_cache_tokens),
                                 KVCopier(runtime))
        self.batcher = Batcher(self.latency, max_batch_texts=config.max_batch_texts,
                               max_batch_media=config.max_batch_media,
                               encoder_max_wait=config.encoder_max_wait)
        self.stats = EngineStats()
        self.recent = RecentUsage()  # token counters over the last seconds, for Status
        # one executor per device in use besides the step loop's (config `placement`)
        self.executors: dict[str, DeviceExecutor] = executors_for(runtime)
        self.on_idle: Callable[[], None] | None = None  # called on the worker thread
        # shared with the event loop and the other executors, under the lock
        self._lock = threading.Condition()
        self._inbox: collections.deque[tuple[RequestBase, RequestStream]] = collections.deque()
        self._urgent_inbox = 0  # urgent generation requests in the inbox
        self._cancels: set[int] = set()
        self._woken = False  # a paused stream's reader caught up
        self._planned = True  # the last step planned work
        self._offloaded: collections.deque[tuple[EncoderRequest, Event]] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # per request, from submit() until it ends
        self._streams: dict[int, RequestStream] = {}
        self._tickets: dict[int, Ticket] = {}
        self._sequences: dict[int, Sequence] = {}  # generation, once admitted
        self._parked: dict[int, ParkedKV] = {}  # preempted sequences' KV, kept by the runtime
        self._trim_due = False  # the last request ended: the heap's free pages go back
        self._outbox = Outbox()  # the events of the current step

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
        """Queues a request (its adapter or head held until it ends); refusals raise at once."""
        stream = RequestStream(request, self.cancel)
        stream.wake = self._wake
        uid = request.caller.uid
        with self._lock, holding(self.runtime, request):
            if self._stopping:
                raise Unavailable("the daemon is shutting down; retry on the next start",
                                  retry_after=5.0)
            waiting = self._num_waiting()
            if waiting >= self.config.max_queue:
                self.stats.reject(uid)
                raise Unavailable(
                    f"busy: {waiting} requests are waiting (limit {self.config.max_queue}); "
                    "retry shortly", retry_after=0.5)
            now, estimate = time.monotonic(), estimate_tokens(request)
            if isinstance(request, GenerateRequest):
                generations, texts = self._inbox_work()
                late = self.deadlines.check(request, generations, texts, now)
                if late is not None:
                    self.stats.reject(uid)
                    raise late
            decision = self.admission.check(uid, request.priority, estimate, now,
                                            started=self.scheduler.rows_held().get(uid, 0))
            error = decision.error()
            if error is not None:
                self.stats.reject(uid)
                raise error
            request.priority = decision.priority  # max_priority may lower it
            self.stats.admit(uid, request.caller.app, request.priority)
            self._tickets[request.id] = Ticket(uid, request.priority, decision.weight, estimate)
            self.latency.arrived(request.priority, now)
            if is_urgent(request.priority) and isinstance(request, GenerateRequest):
                self._urgent_inbox += 1
            self._inbox.append((request, stream))
            self._streams[request.id] = stream
            self._lock.notify()
        return stream

    def _num_waiting(self) -> int:
        """Requests that cannot start now: generations beyond the free KV rows (whether
        the worker has picked them up yet or not) and queued encoder and media work. Read
        from the event loop while the worker runs: an estimate good to a request or two."""
        free_rows = self.scheduler.num_rows - len(self.scheduler.running)
        generations = sum(isinstance(r, GenerateRequest) for r, _ in self._inbox)
        pending = generations + self.scheduler.num_waiting
        return (max(0, pending - free_rows) + len(self._inbox) - generations
                + self.batcher.num_waiting)

    def _inbox_work(self) -> tuple[list[GenerateRequest], int]:
        """The generations in the inbox, and the encoder texts queued (inbox and batcher)."""
        requests = [r for r, _ in self._inbox] + list(self.batcher.encoder)
        return ([r for r in requests if isinstance(r, GenerateRequest)],
                sum(len(encoder_texts(r)) for r in requests
                    if isinstance(r, (EmbedRequest, ClassifyRequest))))

    def cancel(self, request_id: int) -> None:
        with self._lock:
            if request_id in self._streams:
                self._cancels.add(request_id)
                self._lock.notify()

    def _wake(self) -> None:
        with self._lock:
            self._woken = True
            self._lock.notify()

    def snapshot(self) -> EngineSnapshot:
        """The engine now, for Status, metrics and usage (exact to a step or so)."""
        sequences = list(dict(self._sequences).values())
        used, total = self.scheduler.kv_blocks(int(getattr(self.runtime, "max_context", 0) or 0))
        with self._lock:
            requests = [r for r, _ in self._inbox] + list(self.batcher.requests())
            return EngineSnapshot(
                stats=self.stats.copy(), kv_slots=self.scheduler.num_rows,
                active_sequences=len(self.scheduler.running), waiting=self._num_waiting(),
                queued=tuple([(s.uid, s.priority) for s in self.scheduler.waiting]
                             + [(r.caller.uid, r.priority) for r in requests]),
                running_tokens=tokens_per_uid(sequences), kv_blocks_used=used,
                kv_blocks_total=total, rows_held=self.scheduler.rows_held(),
                paused=sum(s.paused_since is not None for s in sequences),
                tokens_in_flight={u: t for u, t in self.admission.tokens.items() if t},
                limits=self.admission.limits())

    # ---- the worker thread: the loop -----------------------------------------------

    def _has_work(self) -> bool:
        """Work a pass can do now. Sequences count while the last step planned work: when it
        planned none (paused for their readers, or at their uid's slot cap) only an event
        (a request, a cancel, a reader catching up) or the wait's timeout changes that."""
        return bool(self._inbox or self._cancels or (self.scheduler.seqs and self._planned)
                    or self.batcher or self._offloaded or self._woken)

    def _run(self) -> None:
        log.info("executor started", extra={"device": str(self.runtime.device)})
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
        except OSError as exc:  # not Linux's per-thread nice: run at the process's
            log.warning("could not lower the step loop's priority: %s", exc)
        while True:
            with self._lock:
                while not self._has_work() and not self._stopping:
                    timed_out = not self._lock.wait(timeout=1.0)
                    self.stats.last_progress = time.monotonic()  # idle is healthy
                    if timed_out and self.scheduler.seqs:
                        break  # idle sequences: a pass checks stalled readers and deadlines
                if self._stopping and not self._has_work() and not self.scheduler.seqs:
                    return
                inbox = list(self._inbox)
                self.deadlines.taken.extend(self._inbox_work()[0])
                self._inbox.clear()
                self._urgent_inbox = 0
                cancels = set(self._cancels)
                self._cancels.clear()
                self._woken = False
            started, prompted, generated = (time.monotonic(), self.stats.tokens_prompted,
                                            self.stats.tokens_generated)
            try:
                self._admit(inbox)
                self._expire(cancels)
                self._backpressure()
                self._outbox.flush()
                self._step()
                self._outbox.flush()
                self._run_encoder()
                self._outbox.flush()
                self._run_media()
                self._run_backbone()
                self._collect_offloaded()
                self._vacate(trim=True)  # the rows of sequences that ended in this pass
            except Exception as exc:  # a runtime failure must not kill the daemon
                log.exception("executor step failed")
                self._fail_all(Internal(f"model step failed: {exc}"))
            self._outbox.flush()
            now = time.monotonic()
            self.deadlines.passed(self.stats.tokens_generated - generated, now - started,
                                  only_decode=self.stats.tokens_prompted == prompted)
            with self._lock:
                self.deadlines.publish(self.scheduler.seqs, self._sequences)
            self.stats.last_progress = now
            if self.recent.due(now):
                self.recent.add(self.snapshot(), now)

    def _admit(self, inbox: list[tuple[RequestBase, RequestStream]]) -> None:
        for request, stream in inbox:
            if isinstance(request, GenerateRequest):
                self._add_sequence(request, stream)
            elif not self.batcher.add(request):
                self._finish(request.id, Failed(Internal(f"unknown request {request!r}")))

    def _add_sequence(self, request: GenerateRequest, stream: RequestStream,
                      prompt_embeds: torch.Tensor | None = None) -> None:
        ticket = self._tickets.get(request.id)
        cached = 0 if prompt_embeds is not None else self.prefixes.arrived(
            request.id, request.prompt_ids, request.adapter)
        self._sequences[request.id] = seq = Sequence(request, stream, self.runtime.tokenizer,
                                                     prompt_embeds)
        seq.prompted = cached
        try:
            self.scheduler.add(SeqState(
                id=request.id, priority=request.priority, arrival=request.arrival,
                prompt_len=len(request.prompt_ids), max_new_tokens=request.sampling.max_tokens,
                uid=request.caller.uid, weight=ticket.weight if ticket else 1.0,
                deadline=request.deadline, cached=cached))
        except KVCapacityError as exc:
            self._finish(request.id, Failed(InvalidArgument(str(exc))))

    def _expire(self, cancels: set[int]) -> None:
        for rid in cancels:
            if rid in self._streams:
                self.stats.cancelled += 1
                log.info("request cancelled by client", extra={"request": rid})
                self._finish(rid, Failed(Cancelled("cancelled by the client")))
        now = time.monotonic()
        for rid, stream in list(self._streams.items()):
            # generation deadlines are the scheduler's: they come back in plan.expired
            if rid not in self.scheduler.seqs and stream.request.expired(now):
                self._deadline_passed(rid)

    def _backpressure(self) -> None:
        """Pauses the sequences whose readers are behind, resumes those that caught up and
        cancels those whose readers stalled (or all paused ones, when stopping)."""
        now, config = time.monotonic(), self.config.backpressure
        for rid, seq in list(self._sequences.items()):
            state, stream = self.scheduler.seqs.get(rid), seq.stream
            if state is None or stream is None:
                continue
            since = seq.paused_since
            action = verdict(config, since, stream.undelivered, stream.last_read, now)
            if action == "cancel" or (self._stopping and action == "pause"):
                self.stats.cancelled += 1
                self.stats.stalled += 1
                self.stats.uid(seq.request.caller.uid).stalled += 1
                log.info("stream stalled: cancelled", extra={"request": rid})
                self._finish(rid, Failed(Cancelled(
                    f"the client took none of the {stream.undelivered} tokens waiting for it "
                    f"for {config.stall_seconds:g} s; the stream is cancelled")))
            elif (action == "pause") != (since is not None):
                state.paused = action == "pause"
                seq.paused_since = now if state.paused else None
                stream.wake_below = config.resume_tokens if state.paused else None

    def _deadline_passed(self, rid: int) -> None:
        self.stats.cancelled += 1
        log.info("request deadline exceeded", extra={"request": rid})
        self._finish(rid, Failed(DeadlineExceeded(
            "the deadline passed before the request finished")))

    def _finish(self, rid: int, event: Event) -> None:
        """Ends a request: frees its KV row, queue entry and ticket, posts its last event."""
        stream = self._streams.pop(rid, None)
        seq = self._sequences.pop(rid, None)
        if seq is not None and seq.request.keep_reply and isinstance(event, Finished):
            self._keep_reply(rid, seq)
        self.scheduler.finish(rid)
        ticket = self._tickets.pop(rid, None)
        self._parked.pop(rid, None)
        self.prefixes.forget(rid)
        if stream is None:
            return
        release(self.runtime, stream.request)  # an add-on's component may go once unheld
        self.batcher.remove(rid)
        if seq is not None:
            tokens_in, tokens_out = seq.tokens_in, len(seq.tokens)
            used = len(seq.request.prompt_ids) + len(seq.tokens)
        else:
            usage = getattr(event, "usage", None)
            tokens_in, tokens_out = (usage.prompt_tokens if usage is not None else 0), 0
            used = ticket.estimate if ticket is not None else 0
        with self._lock:
            if ticket is not None:
                self.admission.release(ticket.uid, ticket.priority, ticket.unused(used),
                                       ticket.estimate)
            self.stats.finish(stream.request.caller.uid, isinstance(event, Failed),
                              tokens_in, tokens_out)
            idle = self.stats.in_flight == 0
        self._trim_due = self._trim_due or idle
        self._outbox.send(stream, event)
        if idle and self.on_idle is not None:
            self.on_idle()

    def _keep_reply(self, rid: int, seq: Sequence) -> None:
        """A session's turn ended: the KV of its prompt and reply, still in its row, goes to
        the prefix cache, so the next turn (which starts with both) computes only its own."""
        state = self.scheduler.seqs.get(rid)
        if state is None or state.row is None or seq.prompt_embeds is not None:
            return
        self.prefixes.computed((seq.request.prompt_ids + seq.tokens)[:state.computed], state.row,
                               tail=True, adapter=seq.request.adapter)

    def _fail_all(self, error: M4Error) -> None:
        for rid in list(self._streams):
            self._finish(rid, Failed(error))

    # ---- generation ----------------------------------------------------------------

    def _step(self) -> None:
        now = time.monotonic()
        plan = self.scheduler.schedule(now)
        for rid in plan.expired:  # already out of the scheduler: fail them
            self._deadline_passed(rid)
        for rid in plan.preempted:  # lost its KV row: parked, or re-prefilled later
            self.stats.preempted += 1
            self.stats.uid(self.scheduler.seqs[rid].uid).preempted += 1
            log.info("sequence preempted", extra={"request": rid})
        for rid, row, tokens in plan.parked:  # out of the rows before anything overwrites them
            self._parked[rid] = self.runtime.park(row, tokens)
        self._vacate()  # before the restores and prefills below write into reused rows
        for rid, row in plan.restored:
            self.runtime.restore(row, self._parked.pop(rid))
        for rid, row in plan.prefixed:  # a cached prompt prefix: its first chunk is after it
            self.prefixes.admitted(rid, row)
        self._planned = not plan.empty
        if plan.empty:
            return
        self.stats.last_batch = len(plan.decode)
        if plan.prefill:
            self._prefill(plan.prefill, now)
            self._outbox.flush()
        if plan.decode:
            done = self._decode(plan.decode)
            del plan.decode[done:]  # not run: they decode in the next step, uncharged
        self.scheduler.update(plan)
        self.stats.steps += 1

    def _vacate(self, trim: bool = False) -> None:
        """KV rows no sequence holds any more give their memory back (with `trim`, once
        the last request has ended, the heap's free pages too)."""
        rows = self.scheduler.take_vacated()
        if rows:
            self.runtime.discard_rows(rows)
        if trim and self._trim_due and not self._has_work():
            self._trim_due = False
            trim_heap()

    def _prefill(self, chunks: list[PrefillChunk], now: float) -> None:
        """Runs a step's prompt chunks, most urgent first: a new request's first token
        goes out before the other chunks and the decode batch run."""
        priorities = {sid: s.run_priority for sid, s in self.scheduler.seqs.items()}
        for chunk in sorted(chunks, key=lambda c: priorities[c.seq_id]):
            if self._outbox and not is_urgent(priorities[chunk.seq_id]):
                self._outbox.flush()  # the urgent first tokens go out before background work
            seq = self._sequences[chunk.seq_id]
            resumed = bool(seq.tokens)  # preempted before: re-prefills prompt + generated
            if chunk.start == 0 and not resumed:
                seq.started(now)
            started, adapter = time.monotonic(), seq.request.adapter
            if seq.prompt_embeds is not None:  # path 1: image features among the tokens
                logits = self.runtime.prefill_embeds(chunk.row, seq.chunk_embeds(
                    chunk.start, chunk.length, self.runtime.token_embeddings), chunk.start, adapter)
            else:
                logits = self.runtime.prefill(
                    chunk.row, seq.chunk_ids(chunk.start, chunk.length), chunk.start, adapter)
            self.stats.tokens_prompted += chunk.length
            seq.prompted += chunk.length
            self.deadlines.costs.prefilled(chunk.length, time.monotonic() - started)
            if chunk.last:
                if not resumed:
                    first = time.monotonic()
                    seq.prefilled(first)
                    self.stats.observe_ttft(first - seq.request.arrival)
                    if seq.prompt_embeds is None:
                        self.prefixes.computed(seq.request.prompt_ids, chunk.row, adapter=adapter)
                logits = logits[None]
                constrain([seq], logits)
                self._on_token(seq, sample(logits, [seq.params], [seq.generator])[0])

    def _decode(self, decode: list[tuple[int, int]]) -> int:
        """Runs a step's decode batch (most urgent first) in the slices the latency policy
        plans; returns how many of its rows, from the front, ran: the step ends early when
        an urgent generation request arrives while background rows are left."""
        seqs = [self._sequences[sid] for sid, _ in decode]
        priorities = [self.scheduler.seqs[sid].run_priority for sid, _ in decode]
        done = 0
        for piece in self.latency.decode_slices(priorities, time.monotonic()):
            batch = seqs[piece.start:piece.stop]
            started = time.monotonic()
            logits = self.runtime.decode([row for _, row in decode[piece.start:piece.stop]],
                                         [s.last_token for s in batch],
                                         [s.next_position for s in batch],
                                         [s.request.adapter for s in batch])
            constrain(batch, logits)
            tokens = sample(logits, [s.params for s in batch], [s.generator for s in batch])
            self.latency.decoded(len(batch), time.monotonic() - started)
            for seq, token in zip(batch, tokens, strict=True):
                self._on_token(seq, token)
            done = piece.stop
            if piece.may_yield and self._urgent_inbox:
                break  # an urgent request waits: its prefill goes before the rest
        return done

    def _on_token(self, seq: Sequence, token: int) -> None:
        self.stats.tokens_generated += 1
        delta, finished = seq.add_token(token, self.runtime.max_context)
        if delta is not None and seq.stream is not None:
            self._outbox.send(seq.stream, delta)
        if finished is not None:
            if finished.reason in (FinishReason.EOS, FinishReason.STOP):
                self.deadlines.costs.ended(len(seq.tokens))
            self._finish(seq.request.id, finished)

"""Goodput under deadlines: whether a generation can still finish in time, decided at submit.

A burst of calls with deadlines is served best by finishing some of them in time and
refusing the rest at once, not by starting all of them and finishing none: every row added
to a decode batch slows every other row. So a generation with a deadline is admitted only
when a simulation of the work the engine holds says that it, and every call already held
that would have met its deadline, still will:

- the work held (`Work`): each sequence's decode steps left, the tokens it must have by its
  deadline, the prompt tokens it has still to compute, whether it holds a KV row; queued
  sequences take rows as they free, most urgent first;
- the costs (`StepCosts`), measured by the engine as it runs: a decode step by batch rows
  (a line fitted to running averages per row count), a prompt chunk by tokens;
- the simulation (`finish_times`): prefill when a sequence takes a row, then decode steps
  of all rows together until the next one ends; `lead` seconds of other work (queued encoder
  texts) first.

Encoder work (Embed, Classify) is cheap per call but not in a burst: 20 calls of 8 texts
take a CPU half a second. While generations with deadlines run, encoder requests that have
deadlines of their own wait, earliest deadline first, until the last moment that still lets
every one of them finish in time (`encoder_latest_start`); those without a deadline run at
once. So neither kind makes the other late when both fit.

A call that cannot finish even alone fails with DEADLINE_EXCEEDED; one that cannot finish
because of the work ahead of it (or would make a held call late) fails with UNAVAILABLE and
the time until that work frees a row. Plain data and arithmetic: no torch, no clock, no
threads (the engine passes `now`).

What a sequence will cost is known only when nothing but max_tokens can end it (ignore_eos,
no stop strings); otherwise its length is the running average of the generations that
ended by themselves, capped by max_tokens, and it must produce only its first token in time.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from m4d.errors import M4Error, Unavailable

# Before two batch sizes have been measured, a decode step of n rows is scaled from the one
# measured by this shape (a ~135M model on a 2-core x86 CPU: 1 row ~10 ms, 16 rows ~40 ms).
PRIOR_FIXED_SHARE = 0.8
RECENT_PREFILLS = 64  # prompt chunks the prefill line is fitted to


@dataclass(frozen=True)
class GoodputConfig:
    enabled: bool = True
    margin: float = 0.15  # planned time × (1 + margin) + one step must fit before the deadline
    default_length: int = 64  # tokens a generation is expected to take before any has ended


@dataclass(frozen=True)
class Work:
    """One generation as the simulation sees it."""

    steps: int  # decode steps it holds a row for, at most (after its first token)
    must: int  # tokens it must have by `deadline` (0: not checked)
    prefill: int  # prompt tokens still to compute; the last of them yields its first token
    deadline: float | None = None  # monotonic seconds
    running: bool = False  # holds a KV row now
    priority: int = 1  # queued work takes free rows most urgent first, then in order


def _average(mean: float | None, sample: float) -> float:
    return sample if mean is None else 0.8 * mean + 0.2 * sample


class StepCosts:
    """The engine's measured costs: a decode step by rows, a prompt chunk by tokens."""

    def __init__(self) -> None:
        self._decode: dict[int, float] = {}  # rows -> running average of a step's seconds
        self._prefills: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=RECENT_PREFILLS)
        self.length: float | None = None  # tokens of generations that ended by themselves
        self._decode_line: tuple[float, float] | None = None  # fitted on demand, until a sample
        self._prefill_line: tuple[float, float] | None = None

    @property
    def known(self) -> bool:
        return bool(self._decode)

    def decoded(self, rows: int, seconds: float) -> None:
        """A pass that only decoded `rows` rows took `seconds`."""
        if rows > 0:
            self._decode[rows] = _average(self._decode.get(rows), seconds)
            self._decode_line = None

    def prefilled(self, tokens: int, seconds: float) -> None:
        """A prompt chunk of `tokens` tokens (and its first token's sampling) took `seconds`."""
        if tokens > 0:
            self._prefills.append((tokens, seconds))
            self._prefill_line = None

    def ended(self, tokens: int) -> None:
        """A generation ended by itself (end of sequence or a stop string) after `tokens`."""
        self.length = _average(self.length, float(tokens))

    def decode(self, rows: int) -> float:
        """Seconds a decode step of `rows` rows takes (0 until one was measured)."""
        if rows in self._decode or not self._decode:
            return self._decode.get(rows, 0.0)
        if len(self._decode) == 1:
            (n, seconds), = self._decode.items()
            return seconds * _prior_shape(rows) / _prior_shape(n)
        if self._decode_line is None:
            self._decode_line = _line(list(self._decode.items()))
        fixed, per_row = self._decode_line
        return fixed + per_row * rows

    def prefill(self, tokens: int) -> float:
        """Seconds computing a prompt of `tokens` tokens takes (one decode step until a
        prompt was measured)."""
        if not self._prefills:
            return self.decode(1)
        if self._prefill_line is None:
            self._prefill_line = _line(list(self._prefills))
        fixed, per_token = self._prefill_line
        return fixed + per_token * tokens


def _prior_shape(rows: int) -> float:
    return PRIOR_FIXED_SHARE + (1 - PRIOR_FIXED_SHARE) * rows


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares y = a + b·x, with a, b ≥ 0 (through the origin when every x is the same)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0, mean_y / mean_x
    slope = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in points) / var)
    fixed = mean_y - slope * mean_x
    if fixed < 0:
        return 0.0, mean_y / mean_x
    return fixed, slope


@dataclass(frozen=True)
class Plan:
    """What the simulation says: when each piece of work has its `must` tokens (None when
    not checked) and when the first row frees."""

    met: list[float | None]
    first_free: float | None


def finish_times(work: Sequence[Work], slots: int, costs: StepCosts, now: float,
                 lead: float = 0.0) -> Plan:
    """Runs the held work forward from `now` + `lead` at the measured costs."""
    t = now + lead
    steps = [w.steps for w in work]
    made = [0] * len(work)
    met: list[float | None] = [None] * len(work)
    first_free: float | None = None
    active = [i for i, w in enumerate(work) if w.running]
    queue = [(w.priority, i) for i, w in enumerate(work) if not w.running]
    heapq.heapify(queue)
    prefilled = [not w.prefill for w in work]

    def produce(i: int, tokens: int) -> None:
        made[i] += tokens
        if work[i].must and met[i] is None and made[i] >= work[i].must:
            met[i] = t

    while active or queue:
        while queue and len(active) < slots:
            active.append(heapq.heappop(queue)[1])
        for i in active:
            if not prefilled[i]:  # prefill runs before the decode batch; it makes one token
                t += costs.prefill(work[i].prefill)
                prefilled[i] = True
                produce(i, 1)
        active = [i for i in active if steps[i] > 0]
        if len(active) < slots and queue:
            first_free = t if first_free is None else first_free
            continue
        if not active:
            break
        due = [work[i].must - made[i] for i in active if met[i] is None and work[i].must]
        run = min([steps[i] for i in active] + [d for d in due if d > 0])
        t += run * costs.decode(len(active))
        for i in active:
            steps[i] -= run
            produce(i, run)
        if any(steps[i] == 0 for i in active) and first_free is None:
            first_free = t
    return Plan(met, first_free)


def fits(deadline: float, done: float | None, now: float, step: float, margin: float) -> bool:
    """Whether work done at `done` (planned) meets `deadline`, with the margin and one step."""
    return done is not None and now + (done - now) * (1 + margin) + step <= deadline


def refusal(held: Sequence[Work], new: Work, slots: int, costs: StepCosts, now: float,
            lead: float, margin: float) -> M4Error | None:
    """Unavailable (with a retry hint) when the held work leaves `new` no time to meet its
    deadline, or `new` would make a held call late that would otherwise be in time; None
    when it may be admitted (or nothing has been measured yet)."""
    if new.deadline is None or not new.must or not costs.known:
        return None
    before = finish_times(held, slots, costs, now, lead)
    after = finish_times([*held, new], slots, costs, now, lead)
    step = costs.decode(min(slots, len(held) + 1))
    late_new = not fits(new.deadline, after.met[-1], now, step, margin)
    broken = sum(
        1 for w, was, will in zip(held, before.met, after.met, strict=False)
        if w.deadline is not None and w.must and fits(w.deadline, was, now, step, margin)
        and not fits(w.deadline, will, now, step, margin))
    if not late_new and not broken:
        return None
    retry = max(0.05, (before.first_free or now) - now)
    running = sum(w.running for w in held)
    if late_new:
        planned = (after.met[-1] or now) - now
        why = (f"with the {running} generations running and {len(held) - running} queued "
               f"ahead of it, its {new.must} tokens would take about {planned:.2f} s")
    else:
        why = f"running it as well would make {broken} accepted calls miss their deadlines"
    return Unavailable(
        f"busy: {why}, and its deadline is in {new.deadline - now:.2f} s: refused at once; "
        f"retry in {retry:.2f} s, or allow more time", retry_after=round(retry, 3))


def encoder_latest_start(requests: Sequence[tuple[float | None, int]], per_text: float,
                         margin: float, safety: float) -> float | None:
    """The latest time queued encoder requests, (deadline, texts) each, can start and still
    all end by their deadlines when run one after another earliest deadline first, at
    `per_text` seconds a text (× 1 + margin), `safety` seconds early; None when one has no
    deadline (it runs now)."""
    if any(deadline is None for deadline, _ in requests):
        return None
    latest, spent = float("inf"), 0.0
    for deadline, texts in sorted(requests, key=lambda r: r[0] or 0.0):
        assert deadline is not None
        spent += texts * per_text * (1 + margin)
        latest = min(latest, deadline - spent - safety)
    return latest

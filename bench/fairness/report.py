"""Benchmark (outside the serving pipeline): bench_fairness.py's summary, from the four
measurements to one table (measure, unit, value, baseline, ratio, target, met) and notes.
"""

from __future__ import annotations

import argparse
import collections
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from benchkit.cpu import CONTENTION_WARNING
from benchkit.report import median, num, pct, ratio, render_table, stamp

from fairness import (
    APP_A,
    APP_B,
    BURST_DEADLINE_S,
    EQUAL_APPS,
    TARGET_JAIN,
    TARGET_LATE_STEPS,
    TARGET_REFUSAL_MS,
    TARGET_RSS_GROWTH,
    TARGET_THROUGHPUT,
    TARGET_TTFT_RATIO,
    WINDOW_S,
)
from fairness.jobs import Outcome, Probe
from fairness.scenarios import BurstRun, EqualShare, Isolation, MemoryRun, jain


@dataclass
class Measurements:
    load_s: float
    kernel_variant: str
    failed_checks: list[str]
    config: dict[str, Any]  # the daemon's caps, from Status
    preempted: dict[str, int]  # section -> sequences preempted during it
    uids: dict[int, tuple[int, int, int, int]]  # the daemon's: uid -> ok, failed, rejected,
    # preempted
    isolation: Isolation
    equal: EqualShare
    burst: BurstRun
    memory: MemoryRun


def ttfts(probes: list[Probe]) -> list[float]:
    return [p.ttft_ms for p in probes if p.ttft_ms is not None]


def refused(o: Outcome) -> bool:
    """Refused at admission (not run): quota, queue full, or a deadline it cannot meet."""
    return o.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE") or (
        o.code == "DEADLINE_EXCEEDED" and "refused at once" in o.message)


def classify(o: Outcome) -> str:
    if o.code == "OK":
        return "late" if o.ended - o.sent > BURST_DEADLINE_S + 0.005 else "ok"
    if refused(o):
        return "refused"
    return "late" if o.code == "DEADLINE_EXCEEDED" else f"error {o.code}"


def missing_steps(o: Outcome) -> int:
    """How many model steps a late call still needed at its deadline: its missing tokens
    (one per decode step), or one encoder batch for an Embed."""
    return max(1, o.wanted - o.tokens) if o.kind == "generate" else 1


def step_ms(outcomes: list[Outcome]) -> float | None:
    """Client ms per token while the burst's generations decoded (the step time)."""
    per = [(o.token_times[-1] - o.token_times[0]) * 1e3 / (o.tokens - 1)
           for o in outcomes if o.kind == "generate" and len(o.token_times) >= 2]
    return statistics.median(per) if per else None


def summarise(args: argparse.Namespace, m: Measurements) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []

    def row(measure: str, unit: str, value: float | str | None, baseline: float | None = None,
            baseline_is: str = "", target: str = "", met: bool | None = None,
            ratio_: float | None = None) -> None:
        rows.append({"measure": measure, "unit": unit, "value": value, "baseline": baseline,
                     "ratio": ratio_, "target": target, "met": met, "baseline_is": baseline_is})

    iso = m.isolation
    idle_p99, loaded_p99 = pct(ttfts(iso.idle), 99), pct(ttfts(iso.loaded), 99)
    r = ratio(loaded_p99, idle_p99)
    row("1. B TTFT p50, A flooding", "ms", pct(ttfts(iso.loaded), 50), pct(ttfts(iso.idle), 50),
        "B alone", ratio_=ratio(pct(ttfts(iso.loaded), 50), pct(ttfts(iso.idle), 50)))
    row("1. B TTFT p99, A flooding", "ms", loaded_p99, idle_p99, "B alone",
        f"<= {TARGET_TTFT_RATIO:g}x", None if r is None else r <= TARGET_TTFT_RATIO, r)
    r = ratio(iso.with_b_tps, iso.alone_tps)
    row("1. A decode rate, B probing", "tok/s", iso.with_b_tps, iso.alone_tps, "A alone",
        f">= {TARGET_THROUGHPUT:.0%}", None if r is None else r >= TARGET_THROUGHPUT, r)

    eq = m.equal
    indexes = [jain([w.get(uid, 0) for uid in EQUAL_APPS]) for w in eq.windows]
    low = min(indexes) if indexes else None
    row(f"2. Jain index, 4 equal apps, min of {len(indexes)} x {WINDOW_S:g} s", "",
        low, target=f">= {TARGET_JAIN:g}",
        met=None if low is None else low >= TARGET_JAIN)
    row("2. Jain index, median window", "", median(indexes))

    outcomes = m.burst.outcomes
    kinds = collections.Counter(classify(o) for o in outcomes)
    embeds = [o for o in outcomes if o.kind == "embed"]
    embeds_ok = sum(o.code == "OK" for o in embeds)
    row("3. burst: Embed calls that succeeded", "calls", f"{embeds_ok}/{len(embeds)}",
        target="all", met=embeds_ok == len(embeds))
    refusals = [(o.ended - o.sent) * 1e3 for o in outcomes if classify(o) == "refused"]
    worst_refusal = max(refusals) if refusals else None
    row("3. burst: slowest refusal", "ms",
        worst_refusal if worst_refusal is not None else "none refused",
        target=f"< {TARGET_REFUSAL_MS:g} ms",
        met=None if worst_refusal is None else worst_refusal < TARGET_REFUSAL_MS)
    step = step_ms(outcomes)
    late = [o for o in outcomes if classify(o) == "late"]
    worst_steps = max((missing_steps(o) for o in late), default=0)
    row("3. burst: ok / refused / late", "calls",
        f"{kinds['ok']} / {kinds['refused']} / {kinds['late']}")
    row("3. burst: worst lateness (steps left)", "steps", float(worst_steps),
        target=f"<= {TARGET_LATE_STEPS:g}", met=worst_steps <= TARGET_LATE_STEPS)
    row("3. burst: worst lateness at the step time", "ms",
        worst_steps * step if step is not None else None, step, "step time (client)",
        ratio_=float(worst_steps) if step is not None else None)

    mem = m.memory
    during = mem.samples[:-1]  # the last sample is after the streams were cancelled
    rss = [s.rss_mb for s in during]
    kv = [s.kv_used for s in during]
    row("4. daemon RSS start / max / end", "MiB",
        f"{rss[0]:.0f} / {max(rss):.0f} / {rss[-1]:.0f}",
        target=f"max <= start + {TARGET_RSS_GROWTH:.0%}",
        met=max(rss) <= rss[0] * (1 + TARGET_RSS_GROWTH))
    row("4. KV blocks used start / max / end", "blocks",
        f"{kv[0]} / {max(kv)} / {kv[-1]} of {during[0].kv_total}",
        target="<= pool", met=max(kv) <= during[0].kv_total)
    failed = sum(p.ttft_ms is None for p in mem.probes)
    row("4. B requests served, unread streams held", "calls",
        f"{len(mem.probes) - failed}/{len(mem.probes)}", target="all",
        met=bool(mem.probes) and not failed)
    mem_p99 = pct(ttfts(mem.probes), 99)
    r = ratio(mem_p99, idle_p99)
    row("4. B TTFT p99, unread streams held", "ms", mem_p99, idle_p99, "B alone",
        f"<= {TARGET_TTFT_RATIO:g}x (as 1.)", None if r is None else r <= TARGET_TTFT_RATIO, r)

    return {**stamp(), "image": str(args.image), "config": m.config, "rows": rows,
            "notes": notes(args, m, indexes, kinds, refusals, late, step),
            "jain_windows": [{"tokens": {str(k): v for k, v in w.items()}, "jain": j}
                             for w, j in zip(eq.windows, indexes, strict=True)],
            "burst": [asdict(o) | {"class": classify(o)} for o in outcomes],
            "memory_samples": [asdict(s) for s in mem.samples],
            "probes": {"idle": [asdict(p) for p in iso.idle],
                       "flooded": [asdict(p) for p in iso.loaded],
                       "unread_held": [asdict(p) for p in mem.probes]}}


def notes(args: argparse.Namespace, m: Measurements, indexes: list[float],
          kinds: collections.Counter[str], refusals: list[float], late: list[Outcome],
          step: float | None) -> list[str]:
    iso, eq, mem = m.isolation, m.equal, m.memory
    out = [f"m4d serving after {m.load_s:.1f} s, kernel variant {m.kernel_variant}, failed "
           f"self-test checks: {m.failed_checks or 'none'}; caps: " +
           ", ".join(f"{k} {v}" for k, v in m.config.items()),
           "sequences preempted (fair share) per section: " +
           ", ".join(f"{k} {v}" for k, v in m.preempted.items()),
           "the daemon's Status per uid at the end (requests ok / failed / rejected, "
           "preempted): " + ", ".join(f"{uid} {ok}/{failed}/{rejected}, {pre}"
                                      for uid, (ok, failed, rejected, pre) in m.uids.items())]
    cpu = {**{f"1. {k}": max(v) for k, v in iso.cpu.items()}, "2.": eq.cpu,
           "3.": m.burst.cpu, "4.": mem.cpu}
    busy = [k for k, v in cpu.items() if v > CONTENTION_WARNING]
    out.append("other processes' share of the CPUs (worst round): " + ", ".join(
        f"{k} {v:.0%}" for k, v in cpu.items()) + (
        f" - WARNING: above {CONTENTION_WARNING:.0%} in {', '.join(busy)}" if busy else ""))
    out.append(f"1. A = uid {APP_A}, B = uid {APP_B}; B: {len(iso.idle)} requests alone, "
               f"{len(iso.loaded)} during A's flood ({len(iso.floods['A alone'])} rounds of "
               f"{iso.window_s:.0f} s per phase, alternating); TTFT = call to the "
               "first message with a token. B's daemon first_token_ms p50/p99 alone "
               f"{num(pct([p.first_token_ms for p in iso.idle], 50), 0)}/"
               f"{num(pct([p.first_token_ms for p in iso.idle], 99), 0)}, flooded "
               f"{num(pct([p.first_token_ms for p in iso.loaded], 50), 0)}/"
               f"{num(pct([p.first_token_ms for p in iso.loaded], 99), 0)}; B failures: "
               f"{sum(p.ttft_ms is None for p in iso.idle + iso.loaded)}")
    for name, results in iso.floods.items():
        flood_refused = sum((collections.Counter(r.refused) for r in results),
                            collections.Counter())
        out.append(
            f"1. {name}: decode rate = tokens its read streams received / window, pooled over "
            f"the rounds; {sum(r.completed for r in results)} read streams completed, refused "
            f"{dict(flood_refused) or 'never'} (retried after the hint, median "
            f"{num(median([h for r in results for h in r.retry_hints_ms]), 0)} ms), errors "
            f"{[r.errors for r in results if r.errors] or 'none'}, unread streams at the end: "
            f"{[r.unread_ended for r in results]}")
    out.append("2. tokens per window per uid: " + "; ".join(
        ", ".join(f"{uid}: {w.get(uid, 0)}" for uid in EQUAL_APPS) + f" (J {j:.3f})"
        for w, j in zip(eq.windows, indexes, strict=True)))
    refused_codes = collections.Counter(
        o.code for o in m.burst.outcomes if classify(o) == "refused")
    gen_late = [o for o in late if o.kind == "generate"]
    by_daemon = sum("deadline passed" in o.message for o in late)
    late_embed_ms = [(o.ended - o.sent) * 1e3 for o in late if o.kind == "embed"]
    out.append(
        f"3. {len(m.burst.outcomes)} calls: {dict(kinds)}; late: {len(gen_late)} Generate, "
        f"{len(late_embed_ms)} Embed (ended after {num(median(late_embed_ms), 0)} ms, median), "
        f"DEADLINE_EXCEEDED from the daemon {by_daemon}, from the client's own deadline "
        f"{len(late) - by_daemon}; refused by code "
        f"{dict(refused_codes) or 'none'}, refusal ms median {num(median(refusals), 1)} "
        f"p90 {num(pct(refusals, 90), 1)}; "
        f"late Generate calls had {num(median([o.tokens for o in gen_late]), 0)} of their "
        f"tokens (median) at the deadline; step time = client ms per token of the burst's "
        f"Generate streams, median {num(step, 1)} ms; daemon decode ms/token of those that "
        f"finished {num(median([o.decode_ms_per_token for o in m.burst.outcomes]), 1)}")
    paused = max(s.paused for s in mem.samples)
    gen = mem.samples[-2].generated - mem.samples[0].generated
    out.append(f"4. {sum(sum(e.values()) for e in mem.ended.values())} unread streams held "
               f"{mem.seconds:.0f} s; their state at the end: "
               f"{dict(sum((collections.Counter(e) for e in mem.ended.values()), collections.Counter()))}; "
               f"most paused at once {paused}, stalled (cancelled) "
               f"{mem.samples[-2].stalled - mem.samples[0].stalled}; the daemon generated {gen} "
               f"tokens meanwhile; B: {len(mem.probes)} requests from the moment the streams "
               f"opened, TTFT p50 {num(pct(ttfts(mem.probes), 50), 0)} ms, the first "
               f"{num(mem.probes[0].ttft_ms if mem.probes else None, 0)} ms (daemon queue "
               f"{num(mem.probes[0].queue_ms if mem.probes else None, 0)} ms), the others' p99 "
               f"{num(pct(ttfts(mem.probes[1:]), 99), 0)} ms, daemon queue_ms p50 "
               f"{num(pct([p.queue_ms for p in mem.probes], 50), 0)}; preemptions meanwhile "
               f"{mem.samples[-2].preempted - mem.samples[0].preempted}; after cancelling: RSS "
               f"{mem.samples[-1].rss_mb:.0f} MiB, KV blocks {mem.samples[-1].kv_used}")
    return out


def render(result: dict[str, Any]) -> str:
    header = ["measure", "unit", "value", "baseline", "ratio", "target", "met", "baseline is"]
    rows = []
    for r in result["rows"]:
        value = r["value"] if isinstance(r["value"], str) else num(
            r["value"], 3 if r["unit"] == "" else 1)
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        rows.append([r["measure"], r["unit"], value, num(r["baseline"]), num(r["ratio"], 2),
                     r["target"], met, r["baseline_is"]])
    title = f"m4d fairness (issue 15), {result['date']}, image {result['image']}"
    return render_table([title], header, rows, range(2, 5), result["notes"])

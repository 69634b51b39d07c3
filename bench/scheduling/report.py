"""Benchmark (outside the serving pipeline): bench_scheduling.py's summary, from the three
sections' measurements to one table of rows (measure, m4d at the client and by its own
timings, baseline, ratio, target, met) and its notes.

Sections 1 and 3 are summarised over the *quiet* rounds (no measurement of the round above
CONTENTION_WARNING), or over all rounds with a warning when none was quiet: llama.cpp's
spinning threads drop to a tenth of their speed while another process holds a core, which
would flatter every ratio against it. Section 2 pools its probes over all rounds. Ratios are
taken within a round (median of the per-round ratios) so slow drift cancels.
"""

from __future__ import annotations

import argparse
import collections
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

from benchkit.cpu import CONTENTION_WARNING, quiet_rounds
from benchkit.llama import LLAMA_RUNS_PER_ROUND, LlamaRun
from benchkit.report import leading_agreement, median, num, pct, ratio, render_table, stamp
from benchkit.streams import (
    KV_SLOTS,
    STREAM_NEW_TOKENS,
    UID_MAX_CONCURRENT,
    BatchRun,
    StreamTrace,
)

from scheduling import STREAM_COUNTS, TARGET_TTFT_P99, TARGET_VS_LLAMA
from scheduling.embed import EmbedRun
from scheduling.priorities import LoadStats


@dataclass
class Measurements:
    """Everything one run measured, before it is summarised."""

    load_s: float
    failed_checks: list[str]
    kernel_variant: str  # as the daemon logged it
    llama_label: str
    batch_runs: list[dict[int, BatchRun]]  # per round: streams -> run
    llama_runs: list[LlamaRun]  # per round (empty without llama.cpp)
    embed_runs: list[tuple[EmbedRun, EmbedRun]]  # per round: (1 at a time, many in flight)
    idle_probes: list[StreamTrace]
    loaded_probes: list[StreamTrace]
    load_stats: list[LoadStats]
    other_cpu: dict[str, float]  # section -> share of all cores other processes used
    phase_cpu: dict[str, list[float]]  # "idle"/"loaded" -> the same, per probe period


def summarise(args: argparse.Namespace, m: Measurements) -> dict[str, Any]:
    """Medians, ratios, targets and notes, as one JSON-able dict."""
    everything = m
    m, selection, quiet_batching = clean_rounds(m)
    rows: list[dict[str, Any]] = []

    def row(measure: str, unit: str, client: float | None, timings: float | None,
            baseline: float | None, ratio_: float | None, baseline_is: str,
            target: str = "", met: bool | None = None) -> None:
        rows.append({"measure": measure, "unit": unit, "m4d_client": client,
                     "m4d_timings": timings, "baseline": baseline, "ratio": ratio_,
                     "target": target, "met": met, "baseline_is": baseline_is})

    # 1. continuous batching
    runs = m.batch_runs
    agg = {n: [r[n].aggregate_tps for r in runs] for n in STREAM_COUNTS}
    tim = {n: [r[n].timings_tps for r in runs] for n in STREAM_COUNTS}
    llama = [r.decode_tps for r in m.llama_runs]
    for n in STREAM_COUNTS:
        per_round = [r[n].aggregate_tps / r[1].aggregate_tps for r in runs]
        row(f"decode, {n} stream{'s' if n > 1 else ''} (aggregate)", "tok/s", median(agg[n]),
            median(tim[n]), median(agg[1]), median(per_round), "m4d, 1 stream")
    row("llama.cpp decode, 1 stream", "tok/s", None, None, median(llama), None,
        m.llama_label or "llama.cpp not available")
    vs_llama = ([r[16].aggregate_tps / ll.decode_tps for r, ll in zip(runs, m.llama_runs,
                                                                        strict=False)]
                if m.llama_runs else [])
    r16 = median(vs_llama)
    row("decode, 16 streams vs llama.cpp 1 stream", "tok/s", median(agg[16]), median(tim[16]),
        median(llama), r16, "llama.cpp, 1 stream", f">= {TARGET_VS_LLAMA:g}x",
        None if r16 is None or not quiet_batching else r16 >= TARGET_VS_LLAMA)

    # 2. priorities: foreground time to first token
    idle_c = [t.ttft_ms for t in m.idle_probes]
    load_c = [t.ttft_ms for t in m.loaded_probes]
    idle_d = [t.timings["first_token_ms"] for t in m.idle_probes]
    load_d = [t.timings["first_token_ms"] for t in m.loaded_probes]
    for q in (50, 99):
        row(f"fg TTFT p{q}, idle", "ms", pct(idle_c, q), pct(idle_d, q), None, None, "")
        r = ratio(pct(load_c, q), pct(idle_c, q))
        target = f"<= {TARGET_TTFT_P99:g}x" if q == 99 else ""
        row(f"fg TTFT p{q}, background load", "ms", pct(load_c, q), pct(load_d, q),
            pct(idle_c, q), r, "idle daemon (client)", target,
            None if q != 99 or r is None else r <= TARGET_TTFT_P99)

    # 3. dynamic batching
    one = [e[0] for e in m.embed_runs]
    many = [e[1] for e in m.embed_runs]
    row("embed, 1 sentence/call, 1 at a time", "sent/s", median([e.rate for e in one]),
        median([e.encoder_rate for e in one]), None, None, "")
    row(f"embed, 1 sentence/call, {args.embed_in_flight} in flight", "sent/s",
        median([e.rate for e in many]), median([e.encoder_rate for e in many]),
        median([e.rate for e in one]),
        median([b.rate / a.rate for a, b in m.embed_runs]), "1 call at a time")

    notes = contention_notes(everything) + selection + summary_notes(args, m)
    return {
        **stamp(),
        "image": str(args.image),
        "daemon_threads": args.threads if args.threads is not None
        else max(1, (os.cpu_count() or 1) - 1),
        "llama_threads": args.llama_threads,
        "weight_format": args.weight_format or "daemon default",
        "kernel_threads": args.kernel_threads if args.kernel_threads is not None
        else "daemon default",
        "kernel_variant": m.kernel_variant,
        "llama_cpp": m.llama_label,
        "kv_slots": KV_SLOTS,
        "repeats": args.repeats,
        "other_cpu_share": m.other_cpu,
        "rows": rows,
        "notes": notes,
        "samples": {
            "batching": [{str(n): _batch_dict(r) for n, r in runs_.items()}
                         for runs_ in everything.batch_runs],
            "llama_cpp": [asdict(r) | {"token_ids": None} for r in everything.llama_runs],
            "embed": [{"one_at_a_time": asdict(a), "in_flight": asdict(b)}
                      for a, b in everything.embed_runs],
            "fg_idle": [_probe_dict(t) for t in everything.idle_probes],
            "fg_loaded": [_probe_dict(t) for t in everything.loaded_probes],
            "background_load": [asdict(s) for s in everything.load_stats],
        },
    }


def round_contention(m: Measurements) -> tuple[list[float], list[float]]:
    """The worst share of the CPUs other processes used in any measurement of each round:
    (batching rounds, embed rounds)."""
    batching = []
    for i, runs in enumerate(m.batch_runs):
        shares = [r.other_cpu for r in runs.values()]
        if i < len(m.llama_runs):
            shares += m.llama_runs[i].runs_other_cpu
        batching.append(max(shares))
    embed = [max(one.other_cpu, many.other_cpu) for one, many in m.embed_runs]
    return batching, embed


def clean_rounds(m: Measurements) -> tuple[Measurements, list[str], bool]:
    """The measurements to summarise for sections 1 and 3: the rounds in which other
    processes stayed within CONTENTION_WARNING in every measurement, or every round when
    none did. Section 2 pools its probes over all rounds. Returns notes saying which, and
    whether section 1 had a quiet round (without one, its llama.cpp ratio means nothing)."""
    batching, embed = round_contention(m)
    keep_b, keep_e = quiet_rounds(batching), quiet_rounds(embed)
    notes = []
    for name, keep, total in (("batching", keep_b, len(batching)), ("embed", keep_e, len(embed))):
        if not keep:
            notes.append(f"WARNING: no {name} round ran on a quiet machine; its rows use all "
                         f"{total} rounds and are unreliable" + (
                             " (met '?': llama.cpp was slowed by the other processes)"
                             if name == "batching" else ""))
        elif len(keep) < total:
            notes.append(f"{name} rows use the {len(keep)} of {total} rounds in which other "
                         f"processes stayed within {CONTENTION_WARNING:.0%} of the CPUs "
                         f"(rounds {', '.join(str(i + 1) for i in keep)})")
    quiet_batching = bool(keep_b)
    keep_b = keep_b or list(range(len(batching)))
    keep_e = keep_e or list(range(len(embed)))
    return replace(
        m, batch_runs=[m.batch_runs[i] for i in keep_b],
        llama_runs=[m.llama_runs[i] for i in keep_b if i < len(m.llama_runs)],
        embed_runs=[m.embed_runs[i] for i in keep_e]), notes, quiet_batching


def contention_notes(m: Measurements) -> list[str]:
    """How busy the shared machine was, over every round."""
    notes: list[str] = []
    busy = {k: v for k, v in m.other_cpu.items() if v > CONTENTION_WARNING}
    if busy:
        notes.append("WARNING: other processes used " + ", ".join(
            f"{v:.0%} of the CPUs during '{k}'" for k, v in busy.items())
            + "; the machine was shared, so absolute numbers and ratios are unreliable "
            "(llama.cpp's spinning threads suffer most: a tenth of their speed)")

    def worst(shares: list[float]) -> str:
        return f"{max(shares):.0%}" if shares else "-"

    batching, embed = round_contention(m)
    notes.append(
        "other processes' share of the CPUs per round: batching "
        + " / ".join(f"{c:.0%}" for c in batching) + ", embed "
        + " / ".join(f"{c:.0%}" for c in embed) + "; per measurement, worst round: m4d "
        + ", ".join(f"{n} stream{'s' if n > 1 else ''} "
                    f"{worst([r[n].other_cpu for r in m.batch_runs])}" for n in STREAM_COUNTS)
        + f"; llama.cpp runs {worst([o for r in m.llama_runs for o in r.runs_other_cpu])}; "
        f"embed 1 at a time {worst([e[0].other_cpu for e in m.embed_runs])}, in flight "
        f"{worst([e[1].other_cpu for e in m.embed_runs])}; fg idle "
        f"{worst(m.phase_cpu['idle'])}, fg loaded {worst(m.phase_cpu['loaded'])}")
    return notes


def summary_notes(args: argparse.Namespace, m: Measurements) -> list[str]:
    """Where the time went, from the daemon's own timings."""
    notes: list[str] = []
    threads = args.threads if args.threads is not None else \
        f"default = {max(1, (os.cpu_count() or 1) - 1)}"
    notes.append(
        f"m4d serving {m.load_s:.1f} s after start (--kv-slots {KV_SLOTS}, "
        f"M4D_UID_MAX_CONCURRENT={UID_MAX_CONCURRENT}, --threads {threads}, --self-test "
        f"{args.self_test}, failed checks: {', '.join(m.failed_checks) or 'none'}); "
        f"{args.repeats} alternating rounds; kernel variant {m.kernel_variant}")
    m4d_threads = args.threads or max(1, (os.cpu_count() or 1) - 1)
    if m4d_threads != args.llama_threads:
        notes.append(
            f"threads differ: llama.cpp computes with {args.llama_threads}, m4d with "
            f"{m4d_threads} torch thread(s) (its event loop and gRPC use the rest); for a "
            f"like-for-like llama.cpp ratio run with --threads {args.llama_threads} or "
            f"--llama-threads {m4d_threads}")

    # 1. batching: per-step cost and the prefill stagger
    parts = []
    for n in STREAM_COUNTS:
        t = [r[n].timings_ms for r in m.batch_runs]
        parts.append(
            f"{n}: {median([x['decode_ms_per_token'] for x in t]):.1f} ms/step, "
            f"first token median {median([x['first_token_ms'] for x in t]):.0f} / last "
            f"{median([x['first_token_max_ms'] for x in t]):.0f} ms (queue "
            f"{median([x['queue_ms'] for x in t]):.0f})")
    notes.append("m4d decode timings per stream count (daemon, medians over streams and "
                 "rounds): " + "; ".join(parts))
    kinds = {r[n].window_kind for r in m.batch_runs for n in STREAM_COUNTS}
    windows = {n: median([r[n].window_s for r in m.batch_runs]) for n in STREAM_COUNTS}
    short = [str(r[n].streams) for r in m.batch_runs for n in STREAM_COUNTS
             if any(c != STREAM_NEW_TOKENS for c in r[n].completion_tokens)]
    e2e = {n: median([r[n].end_to_end_tps for r in m.batch_runs]) for n in STREAM_COUNTS}
    notes.append(
        "aggregate = tokens received while all streams decode / that window (median window "
        + ", ".join(f"{n}: {w:.2f} s" for n, w in windows.items())
        + f"; window kinds: {', '.join(sorted(kinds))}); end to end incl. prefill and "
        "admission: " + ", ".join(f"{n}: {v:.1f}" for n, v in e2e.items()) + " tok/s"
        + (f"; WARNING: streams ended early at {', '.join(short)}" if short else ""))
    if m.llama_runs:
        ours = m.batch_runs[0][1].first_ids
        same = leading_agreement(ours, m.llama_runs[0].token_ids)
        batched = leading_agreement(ours, m.batch_runs[0][32].first_ids)
        notes.append(
            f"llama.cpp {args.llama_threads} threads, {LLAMA_RUNS_PER_ROUND} runs per round: "
            + " / ".join(", ".join(f"{x:.1f}" for x in r.runs_tps) for r in m.llama_runs)
            + f" tok/s; prompt 0 greedy output: m4d 1 stream vs llama.cpp identical for the "
            f"first {same} of {STREAM_NEW_TOKENS} tokens, m4d 1 vs 32 streams for {batched}")
    else:
        notes.append(f"llama.cpp: {m.llama_label}")

    # 2. priorities: queue / prefill / first token, idle against loaded
    def split(traces: list[StreamTrace]) -> str:
        def q(key: str) -> str:
            v = [t.timings[key] for t in traces]
            return f"{key.removesuffix('_ms')} {pct(v, 50):.0f}/{pct(v, 99):.0f}"
        client = [t.ttft_ms for t in traces]
        return (f"{q('queue_ms')}, {q('prefill_ms')}, {q('first_token_ms')}, client TTFT "
                f"{pct(client, 50):.0f}/{pct(client, 99):.0f}, n={len(traces)}")

    notes.append(f"fg TTFT breakdown in ms, p50/p99 (daemon: queue = arrival to its prefill "
                 f"step, prefill = that step incl. the batch it joins): idle: "
                 f"{split(m.idle_probes)}; loaded: {split(m.loaded_probes)}")
    if m.load_stats:
        s = m.load_stats
        errors: collections.Counter[str] = collections.Counter()
        for x in s:
            errors.update(x.errors)
        notes.append(
            f"background load ({args.bg_streams} PRIORITY_BACKGROUND streams of "
            f"{args.bg_tokens} tokens, restarted; {args.bg_embed_in_flight} background "
            f"single-sentence Embed calls in flight), per loaded period: "
            f"{median([x.stream_tps for x in s]):.1f} tok/s "
            f"(≈ {args.bg_streams * 1e3 / median([x.stream_tps for x in s]):.0f} ms per "
            f"decode step), {median([x.embed_rate for x in s]):.0f} sent/s in encoder "
            f"batches of {median([x.encoder_batch_texts for x in s]):.1f} texts taking "
            f"{median([x.encoder_batch_ms for x in s]):.1f} ms; ramp-up "
            f"{median([x.ramp_s for x in s]):.1f} s; errors {dict(errors) or 'none'}")

    # 3. embed
    one = [e[0] for e in m.embed_runs]
    many = [e[1] for e in m.embed_runs]
    notes.append(
        f"embed ({args.embed_sentences} sentences per run), daemon ms per call, median: "
        f"1 at a time: queue {median([e.median_queue_ms for e in one]):.1f}, arrival to "
        f"result {median([e.median_total_ms for e in one]):.1f}; {args.embed_in_flight} in "
        f"flight: {median([e.sentences / e.batches for e in many]):.1f} texts per encoder "
        f"batch, queue {median([e.median_queue_ms for e in many]):.1f}, arrival to result "
        f"{median([e.median_total_ms for e in many]):.1f}; "
        f"{sum(e.retries for e in many)} calls refused as busy and retried; 'm4d timings' = "
        "sentences / encoder time")
    return notes


def _batch_dict(run_: BatchRun) -> dict[str, Any]:
    d = asdict(run_)
    d.pop("first_ids")
    return d


def _probe_dict(trace: StreamTrace) -> dict[str, Any]:
    return {"client_ttft_ms": trace.ttft_ms, "completion_tokens": trace.completion_tokens,
            **trace.timings}


# ---------------------------------------------------------------- output


def render(result: dict[str, Any]) -> str:
    header = ["measure", "unit", "m4d client", "m4d timings", "baseline", "ratio", "target",
              "met", "baseline is"]
    rows = []
    for r in result["rows"]:
        met = ("yes" if r["met"] else "NO") if r["met"] is not None else (
            "?" if r["target"] and r["ratio"] is not None else "")
        rows.append([r["measure"], r["unit"], num(r["m4d_client"]), num(r["m4d_timings"]),
                     num(r["baseline"]), num(r["ratio"], 2), r["target"], met,
                     r["baseline_is"]])
    title = (f"m4d scheduling, {result['date']}, image {result['image']}, kv_slots "
             f"{result['kv_slots']}, weight format {result.get('weight_format', 'daemon default')}, "
             f"m4d {result['daemon_threads']} torch thread(s), llama.cpp "
             f"{result['llama_threads']} threads")
    return render_table([title], header, rows, range(2, 6), result["notes"])

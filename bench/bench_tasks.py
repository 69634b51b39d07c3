"""bench_tasks: every task of the active image on offline data, accuracy and latency per task,
base against adapter where both exist (issue 16, part 5; in the spirit of eAIBench).

Starts a real m4d on the image, asks it for its task table (ListTasks) and, for every task
in it, runs a small dataset made offline (`tasks.data`, `m4d.adapters.slu_data`; speech
spoken by espeak-ng, notices rendered in DejaVu fonts, shapes drawn) through the task one
call at a time: the task's metric on the answers, and the latency of each call at the
client (p50, p95; one untimed warm-up call first, as a task's adapter or model part may
load on first use). A task that runs through an adapter or head gets a second row,
"base": the same items without it (the base backbone told the task in a prompt, zero-shot
labels on the encoder). A task without a dataset still gets its row, latency only, and a
warning. The suites are in bench/tasks/.

    python bench/bench_tasks.py --image build/images/default [--items N] [--tasks a,b] [--json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from benchkit.cpu import CONTENTION_WARNING, OtherCpuMeter
from benchkit.daemon import Daemon
from benchkit.options import daemon_bench_main
from benchkit.report import num, progress, render_table, stamp
from tasks.scoring import percentile
from tasks.suites import BASES, SUITES, WHY_NO_DATASET, Context, Suite, latency_only

log = progress("bench_tasks")
SAMPLES = 3  # answers per row kept in the JSON, to see what was scored


def run_suite(suite: Suite) -> dict[str, Any]:
    """One untimed warm-up call, then every item one call at a time, timed at the client;
    the score of the answers. A failed warm-up is reported and the row goes on; an error in
    a timed call ends the row (reported, the other rows still run)."""
    started = time.perf_counter()
    warm_up: dict[str, Any] = {}
    try:
        suite.call(suite.items[0])
    except Exception as exc:  # e.g. a part that fails to load on first use: a finding
        log(f"ERROR in the warm-up call: {type(exc).__name__}: {exc}")
        warm_up["warm_up_error"] = f"{type(exc).__name__}: {exc}"
    warm_up["warm_up_ms"] = 1e3 * (time.perf_counter() - started)
    try:
        answers, ms = [], []
        for item in suite.items:
            started = time.perf_counter()
            answers.append(suite.call(item))
            ms.append(1e3 * (time.perf_counter() - started))
        scores = suite.score(answers) if suite.score is not None else ()
    except Exception as exc:  # a broken task is a finding, not the end of the bench
        log(f"ERROR: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}", "metrics": list(suite.metrics),
                **warm_up}
    return {"metrics": dict(zip(suite.metrics, scores, strict=True)), "n": suite.n,
            "calls": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            **warm_up, "note": suite.note,
            "samples": [a for a in answers[:SAMPLES] if _readable(a)]}


def _readable(answer: Any) -> bool:
    """A text or a list of words (not a vector), worth keeping as a sample."""
    return isinstance(answer, str) or (isinstance(answer, list)
                                       and all(isinstance(a, str) for a in answer))


def describe(task: Any) -> dict[str, Any]:
    return {"task": task.id, "m4_id": task.m4_id, "path": task.path,
            "modules": list(task.modules), "adapter": task.adapter}


def prepared(make: Callable[[], Suite | None]) -> Suite | dict[str, Any] | None:
    """The suite `make` prepares, or the error row if preparing it failed (espeak-ng
    missing, a helper that does not import)."""
    try:
        return make()
    except Exception as exc:  # as run_suite: reported, the other rows still run
        log(f"ERROR preparing: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}", "metrics": []}


def task_rows(ctx: Context, task: Any) -> list[dict[str, Any]]:
    """The task's row and, when it runs through an adapter or head, its base row."""
    log(f"{task.id}: preparing")
    suite = prepared(lambda: SUITES.get(task.id, latency_only)(ctx, task))
    row = {**describe(task), "side": "task", "dataset": task.id in SUITES}
    if isinstance(suite, Suite):
        log(f"{task.id}: {len(suite.items)} calls")
    rows = [{**row, **(run_suite(suite) if isinstance(suite, Suite) else suite or {})}]
    if not (task.adapter and task.id in BASES):
        return rows
    base = prepared(lambda: BASES[task.id](ctx, task))
    row = {**describe(task), "adapter": "", "side": "base", "dataset": True}
    if base is None:
        return [*rows, {**row, "skipped": "the base needs tasks this image does not have"}]
    if isinstance(base, Suite):
        log(f"{task.id} base: {len(base.items)} calls")
    return [*rows, {**row, **(run_suite(base) if isinstance(base, Suite) else base)}]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from m4client import Client

    if args.items < 1:
        raise SystemExit("--items must be at least 1")
    out: dict[str, Any] = {**stamp(), "image": str(args.image), "items": args.items}
    started = time.monotonic()
    with Daemon(args.image, None, args.self_test) as daemon:
        serving = daemon.ready()
        log(str(serving))
        with Client(daemon.address, app_name="bench_tasks", timeout=600) as client:
            table = client.list_tasks()
            out["model"] = table.model.image_name if table.model else ""
            out["tasks_in_image"] = [t.id for t in table]
            wanted = args.tasks.split(",") if args.tasks else [t.id for t in table]
            unknown = [w for w in wanted if table.get(w) is None]
            if unknown:
                raise SystemExit(f"no task {', '.join(unknown)} in the image; it has "
                                 f"{', '.join(t.id for t in table)}")
            out["no_dataset"] = {t: WHY_NO_DATASET.get(t, "a task this bench does not know")
                                 for t in wanted if t not in SUITES}
            for task_id, why in out["no_dataset"].items():
                log(f"WARNING: NO DATASET for task {task_id!r}: latency only ({why})")
            meter = OtherCpuMeter([daemon.proc.pid, os.getpid()])
            ctx = Context(client, table, args.items)
            out["rows"] = [row for task_id in wanted for row in task_rows(ctx, table.get(task_id))]
            out["other_cpu_share"] = meter.other_share()
    out["kernel_variant"] = serving.kernel_variant
    out["failed_self_test_checks"] = serving.failed_checks
    out["seconds"] = time.monotonic() - started
    return out


def cells(row: dict[str, Any]) -> list[str]:
    base = row["side"] == "base"
    head = ["  base" if base else row["task"], row["m4_id"] or "-", str(row["path"]),
            "+".join(row["modules"]), row["adapter"] or "-"]
    if "skipped" in row:
        return [*head, "-", "skipped", "-", "-", "-"]
    if "error" in row:
        return [*head, " / ".join(row["metrics"]) or "-", "ERROR", "-", "-", "-"]
    metrics = row["metrics"]
    return [*head, " / ".join(metrics) if row["dataset"] else "NO DATASET",
            " / ".join(num(v) for v in metrics.values()) or "-", str(row["n"]),
            num(row["p50_ms"], 0), num(row["p95_ms"], 0)]


def render(r: dict[str, Any]) -> str:
    rows = r["rows"]
    notes = []
    for row in rows:
        name = row["task"] + (" base" if row["side"] == "base" else "")
        if "error" in row:
            notes.append(f"{name}: ERROR {row['error']}")
        elif "skipped" in row:
            notes.append(f"{name}: skipped, {row['skipped']}")
        else:
            notes.append(f"{name}: {row['note']}; warm-up call {num(row['warm_up_ms'], 0)} ms")
        if "warm_up_error" in row:
            notes.append(f"{name}: WARM-UP CALL FAILED: {row['warm_up_error']}")
    for task_id, why in r["no_dataset"].items():
        notes.append(f"NO DATASET for {task_id}: latency only ({why})")
    share = r["other_cpu_share"]
    notes.append(f"other processes' share of the CPUs over the run: {100 * share:.0f}%"
                 + (" (BUSY: latencies are inflated)" if share > CONTENTION_WARNING else ""))
    notes.append(f"kernel variant {r['kernel_variant']}; failed self-test checks: "
                 f"{', '.join(r['failed_self_test_checks']) or 'none'}; {r['seconds']:.0f} s")
    return render_table(
        [f"Every task of {r['model'] or r['image']} on offline data, {r['date']} "
         f"(up to {r['items']} items per task; latency per call, one at a time, at the client)"],
        ["task", "M4 id", "path", "modules", "adapter", "metric", "score", "n", "p50 ms",
         "p95 ms"],
        [cells(row) for row in rows], {2, 6, 7, 8, 9}, notes)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=16,
                        help="items per task (at most each dataset's 32; default 16: the SLU "
                             "commands then hold each of their 16 intents once)")
    parser.add_argument("--tasks", default="",
                        help="comma-separated task ids to run (default: every task of the image)")


def main(argv: list[str] | None = None) -> int:
    return daemon_bench_main(__doc__.split("\n\n")[0], measure, render, argv, add_options)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark (outside the serving pipeline): m4d on each of its CPU kernel variants against
llama.cpp built for the same instruction set, in one run and one table.

m4's kernels have one variant per instruction set (avx512vnni, avxvnni, avx2, scalar on x86),
all computing the same numbers. For every x86 variant this CPU runs, a child process (this
script with `--one VARIANT`) starts m4d with that variant forced (M4_KERNEL_VARIANT, see
benchkit.daemon.kernel_variant_env) and loads the llama_cpp build for the same instruction set
from its own directory (`--llama-native`, `--llama-avxvnni`, `--llama-avx2`: directories made with
`pip install --no-deps --target DIR <wheel>`), then measures, alternating m4d and llama.cpp
within the child:

* **one stream**, as bench_daemon.py does (m4d `--threads 2`, llama.cpp 2 threads): a
  ~256-token raw prompt, 128 greedy tokens, ignore_eos; prefill tok/s = prompt tokens / time
  to the first token, decode tok/s = (tokens - 1) / (last token - first token), at the
  client for m4d and around `eval()` for llama.cpp.
* **16 streams**, as bench_scheduling.py's section 1 does (m4d with its default threads,
  `--kv-slots 32`): 16 Generate streams of 64 tokens on distinct ~32-token prompts, the
  aggregate rate while all 16 decode, against llama.cpp's single stream on prompt 0 (median
  of 3 back-to-back runs per round).

Pairs: avx512vnni against the native build, avxvnni against a build for AVX2 with AVX-VNNI
and without AVX-512 (the native one if that directory is missing), avx2 against the AVX2
build; scalar
(the slow reference every variant is tested against: ~30 s per 256-token prefill) gets one
round of one stream only, against the AVX2 build, and no targets. The issue's targets: one
stream >= 1.5x llama.cpp, prefill >= 2x, 16 streams >= 5x llama.cpp's single stream. Ratios
are medians of the per-round ratios. Every round records the CPU share other processes used
(`/proc`); each row uses the rounds in which that stayed within 10 % (all of them, with a
warning, if none did). Progress goes to stderr, the table (or `--json`) to stdout. About 4
minutes with the default 3 rounds on a quiet machine; `--quick` (1 round, no scalar) about 2.

    python bench/bench_variants.py --image build/images/default \\
        [--llama-native /work/llama-py/native] [--llama-avxvnni /work/llama-py/avxvnni] \\
        [--llama-avx2 /work/llama-py/avx2] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchkit.cpu import OtherCpuMeter, quiet_rounds
from benchkit.daemon import Daemon, read_manifest
from benchkit.inputs import backbone_gguf, build_prompt, distinct_prompts, raw_prompt_task
from benchkit.llama import llama_generate, llama_round, load_llama, use_llama_cpp
from benchkit.options import add_image, add_json
from benchkit.report import emit, median, num, progress, render_table, stamp
from benchkit.streams import (
    NEW_TOKENS,
    NO_PREFIX_CACHE,
    PROMPT_TOKENS,
    STREAM_NEW_TOKENS,
    STREAM_PROMPT_TOKENS,
    daemon_generate,
    run_streams,
    streams_daemon_options,
)

X86_VARIANTS = ("avx512vnni", "avxvnni", "avx2", "scalar")  # best first, as m4d ranks them
BUILD_FOR = {"avx512vnni": "native", "avxvnni": "avxvnni", "avx2": "avx2", "scalar": "avx2"}
ONE_STREAM_ONLY = {"scalar"}
STREAMS = 16
THREADS = 2  # llama.cpp's threads, and m4d's --threads in the one-stream daemon
TARGETS = {"decode": 1.5, "prefill": 2.0, "streams": 5.0}  # m4d / llama.cpp, at least
CHILD_TIMEOUT = 900.0

log = progress("bench_variants")


# ---------------------------------------------------------------- one variant (child)


def measure_variant(args: argparse.Namespace) -> dict[str, Any]:
    """Everything for one variant, in this process: one stream, then 16 streams."""
    import llama_cpp

    image = args.image.resolve()
    manifest = read_manifest(image)
    tokenizer = image / manifest["components"]["backbone"]["tokenizer"]
    llm, llama_label = load_llama(backbone_gguf(manifest), THREADS)
    if llm is None:
        raise SystemExit(llama_label)
    out: dict[str, Any] = {
        "variant": args.one, "llama_cpp": llama_label,
        "llama_system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
    }

    # one stream, as bench_daemon.py
    from m4client import Client

    prompt = build_prompt(tokenizer, PROMPT_TOKENS)
    task = raw_prompt_task(manifest)
    prompt_ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    daemon = Daemon(image, THREADS, "warn", kernel_variant=args.one, env=NO_PREFIX_CACHE)
    with daemon, Client(daemon.address, app_name="bench-variants") as m4:
        serving = daemon.ready(m4)
        out["one"] = {**asdict(serving), "m4d": [], "llama": [], "other_cpu": []}
        log(f"{args.one}: one stream, m4d serving after {serving.load_s:.1f} s "
            f"({serving.kernel_variant})")
        daemon_generate(m4, task, prompt, 16)
        llama_generate(llm, prompt_ids, 16)
        pids = [os.getpid(), daemon.proc.pid]
        for rep in range(args.repeats):
            log(f"{args.one}: one stream {rep + 1}/{args.repeats}: m4d, llama.cpp")
            meter = OtherCpuMeter(pids)
            a = daemon_generate(m4, task, prompt, NEW_TOKENS)
            b = llama_generate(llm, prompt_ids, NEW_TOKENS)
            out["one"]["other_cpu"].append(meter.other_share())
            for key, s in (("m4d", a), ("llama", b)):
                out["one"][key].append({"prefill": s.prefill_tps, "decode": s.decode_tps,
                                        "prompt_tokens": s.prompt_tokens,
                                        "token_ids": s.token_ids})
    if args.one in ONE_STREAM_ONLY:
        return out

    # 16 streams, as bench_scheduling.py's section 1
    from m4client.aio import AsyncClient

    prompts = distinct_prompts(tokenizer, STREAMS, STREAM_PROMPT_TOKENS)
    llama_ids = llm.tokenize(prompts[0].encode(), add_bos=False, special=False)
    flags, env = streams_daemon_options()
    daemon = Daemon(image, None, "warn", kernel_variant=args.one, args=flags, env=env)

    async def streams() -> dict[str, Any]:
        pids = [os.getpid(), daemon.proc.pid]
        got: dict[str, Any] = {"m4d": [], "llama": [], "llama_runs": [], "other_cpu": [],
                               "step_ms": []}
        async with AsyncClient(daemon.address, app_name="bench-variants") as client:
            await run_streams(client, prompts, 8)  # warm-up
            llama_generate(llm, llama_ids, 8)
            for rep in range(args.repeats):
                log(f"{args.one}: {STREAMS} streams {rep + 1}/{args.repeats}: m4d, llama.cpp")
                meter = OtherCpuMeter(pids)
                run = await run_streams(client, prompts, STREAM_NEW_TOKENS)
                other = meter.other_share()
                ll = llama_round(llm, llama_ids, pids, STREAM_NEW_TOKENS)
                got["m4d"].append(run.aggregate_tps)
                got["step_ms"].append(run.timings_ms["decode_ms_per_token"])
                got["llama"].append(ll.decode_tps)
                got["llama_runs"].append(ll.runs_tps)
                got["other_cpu"].append(max(other, *ll.runs_other_cpu))
        return got

    with daemon:
        serving = daemon.ready()
        log(f"{args.one}: {STREAMS} streams, m4d serving after {serving.load_s:.1f} s "
            f"({serving.kernel_variant})")
        out["streams"] = {**asdict(serving), **asyncio.run(streams())}
    return out


# ---------------------------------------------------------------- the run (parent)


def runnable_x86_variants() -> list[str]:
    """The x86 kernel variants this CPU runs, best first ([] without the kernels)."""
    from m4d.model import kernels

    return [v for v in kernels.runnable_variants() if v in X86_VARIANTS]


def run_child(args: argparse.Namespace, variant: str, llama_dir: Path | None) -> dict[str, Any]:
    repeats = 1 if variant in ONE_STREAM_ONLY else args.repeats
    command = [sys.executable, str(Path(__file__).resolve()), "--one", variant,
               "--image", str(args.image), "--repeats", str(repeats)]
    if llama_dir is not None:
        command += ["--llama-cpp", str(llama_dir)]
    started = time.monotonic()
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False,
                          timeout=CHILD_TIMEOUT)
    if proc.returncode != 0:
        raise SystemExit(f"the {variant} run failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(proc.stdout)
    result["seconds"] = time.monotonic() - started
    result["build"] = BUILD_FOR[variant]
    return result


def per_round_ratio(a: list[float], b: list[float]) -> float | None:
    return median([x / y for x, y in zip(a, b, strict=True) if y])


def rounds_to_use(section: dict[str, Any], name: str, notes: list[str]) -> list[int]:
    """The rounds of a section in which other processes stayed within CONTENTION_WARNING
    (llama.cpp's spinning threads drop to a tenth of their speed while another process holds
    a core, which would flatter every ratio), or all of them, with a warning, if none did."""
    others = section["other_cpu"]
    keep = quiet_rounds(others)
    shares = " / ".join(f"{o:.0%}" for o in others)
    if not keep:
        notes.append(f"WARNING: {name}: no quiet round (other processes used {shares} of the "
                     "CPUs); its row uses every round and is unreliable")
        return list(range(len(others)))
    if len(keep) < len(others):
        notes.append(f"{name}: {len(keep)} of {len(others)} rounds quiet (other processes "
                     f"{shares}); the row uses rounds {', '.join(str(i + 1) for i in keep)}")
    return keep


def summarise(args: argparse.Namespace, children: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    notes: list[str] = []
    for c in children:
        one = c["one"]
        row: dict[str, Any] = {"variant": c["variant"], "llama_cpp": c["build"]}
        keep = rounds_to_use(one, f"{c['variant']} one stream", notes)
        for key in ("decode", "prefill"):
            a = [one["m4d"][i][key] for i in keep]
            b = [one["llama"][i][key] for i in keep]
            row[key] = {"m4d": median(a), "llama": median(b), "ratio": per_round_ratio(a, b)}
        if "streams" in c:
            s = c["streams"]
            keep = rounds_to_use(s, f"{c['variant']} {STREAMS} streams", notes)
            a, b = [s["m4d"][i] for i in keep], [s["llama"][i] for i in keep]
            row["streams"] = {"m4d": median(a), "llama": median(b),
                              "ratio": per_round_ratio(a, b),
                              "step_ms": median([s["step_ms"][i] for i in keep])}
        if c["variant"] not in ONE_STREAM_ONLY:
            row["met"] = {k: (row[k]["ratio"] or 0) >= TARGETS[k]
                          for k in TARGETS if k in row}
        rows.append(row)
        others = one["other_cpu"] + c.get("streams", {}).get("other_cpu", [])
        checks = sorted(set(one["failed_checks"]
                            + c.get("streams", {}).get("failed_checks", [])))
        notes.append(
            f"{c['variant']}: m4d kernel variant {one['kernel_variant']}; llama.cpp "
            f"{c['llama_cpp']}; other processes' share of the CPUs, worst round "
            f"{max(others):.0%}; failed self-test checks: {', '.join(checks) or 'none'}; "
            f"{c['seconds']:.0f} s")
        if "streams" in c:
            s = c["streams"]
            notes.append(
                f"{c['variant']}: {STREAMS}-stream decode step in the daemon "
                f"{median(s['step_ms']):.1f} ms (median); llama.cpp runs per round: "
                + " / ".join(", ".join(f"{x:.1f}" for x in r) for r in s["llama_runs"])
                + " tok/s")
    first = [c["one"]["m4d"][0]["token_ids"] for c in children]
    llama_ids = {c["build"]: c["one"]["llama"][0]["token_ids"] for c in children}
    notes.append(
        f"m4d greedy tokens ({NEW_TOKENS}, one stream): "
        + ("identical on every variant" if all(ids == first[0] for ids in first)
           else "DIFFER between variants: " + ", ".join(
               f"{c['variant']} {'=' if ids == first[0] else '!='} {children[0]['variant']}"
               for c, ids in zip(children, first, strict=True)))
        + "; llama.cpp builds: " + ("identical" if len({tuple(v) for v in llama_ids.values()})
                                    == 1 else "differ") + " to each other")
    return {
        **stamp(),
        "image": str(args.image),
        "repeats": args.repeats,
        "cpu_flags": cpu_flags(),
        "targets": TARGETS,
        "rows": rows,
        "notes": notes,
        "children": [_without_ids(c) for c in children],
    }


def _without_ids(child: dict[str, Any]) -> dict[str, Any]:
    one = dict(child["one"])
    for key in ("m4d", "llama"):
        one[key] = [{k: v for k, v in s.items() if k != "token_ids"} for s in one[key]]
    return {**child, "one": one}


def cpu_flags() -> str:
    """The SIMD flags of /proc/cpuinfo that the variants and the builds care about."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith(("flags", "Features"))), [])
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx_vnni", "avx512_bf16", "amx_int8", "asimddp")
    return " ".join(f for f in flags if f in wanted) or "none of " + " ".join(wanted)


def render(result: dict[str, Any]) -> str:
    header = ["variant", "llama.cpp", "1 stream m4d", "llama.cpp", "ratio", "prefill m4d",
              "llama.cpp", "ratio", f"{STREAMS} streams m4d", "llama.cpp 1 stream", "ratio"]

    def ratio(cell: dict[str, Any] | None, key: str, met: dict[str, bool] | None) -> str:
        if cell is None:
            return "-"
        mark = "" if met is None else (" ok" if met[key] else " NO")
        return f"{num(cell['ratio'], 2)}x{mark}"

    rows = []
    for r in result["rows"]:
        met = r.get("met")
        s = r.get("streams")
        rows.append([r["variant"], r["llama_cpp"],
                     num(r["decode"]["m4d"]), num(r["decode"]["llama"]),
                     ratio(r["decode"], "decode", met),
                     num(r["prefill"]["m4d"]), num(r["prefill"]["llama"]),
                     ratio(r["prefill"], "prefill", met),
                     num(s["m4d"] if s else None), num(s["llama"] if s else None),
                     ratio(s, "streams", met)])
    t = result["targets"]
    titles = [f"m4d per kernel variant vs llama.cpp for the same instruction set, "
              f"{result['date']}, image {result['image']}, {result['repeats']} rounds, scalar 1 "
              f"(tok/s; targets: 1 stream >= {t['decode']:g}x, prefill >= {t['prefill']:g}x, "
              f"{STREAMS} streams >= {t['streams']:g}x llama.cpp's single stream)",
              f"CPU flags: {result['cpu_flags']}"]
    return render_table(titles, header, rows, range(2, len(header)), result["notes"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_image(parser)
    parser.add_argument("--llama-native", type=Path, default=Path("/work/llama-py/native"),
                        help="llama_cpp built for this CPU (GGML_NATIVE), a pip --target "
                             "directory; '-' = the installed llama-cpp-python "
                             "(default /work/llama-py/native)")
    parser.add_argument("--llama-avx2", type=Path, default=Path("/work/llama-py/avx2"),
                        help="llama_cpp built for AVX2 without AVX-512, a pip --target "
                             "directory (default /work/llama-py/avx2)")
    parser.add_argument("--llama-avxvnni", type=Path, default=Path("/work/llama-py/avxvnni"),
                        help="llama_cpp built for AVX2 with AVX-VNNI, without AVX-512, a pip "
                             "--target directory (default /work/llama-py/avxvnni; the native "
                             "build where it does not exist)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants (default: every x86 variant this CPU "
                             "runs)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating rounds per measurement (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="1 round and no scalar run (about 2 minutes)")
    add_json(parser)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child
    parser.add_argument("--llama-cpp", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quick:
        args.repeats = 1
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    read_manifest(args.image)  # SystemExit now if there is no image

    if args.one:  # child: one variant, JSON on stdout
        use_llama_cpp(args.llama_cpp)
        print(json.dumps(measure_variant(args)))
        return 0

    runnable = runnable_x86_variants()
    if args.variants:
        variants = args.variants.split(",")
        bad = [v for v in variants if v not in runnable]
        if bad:
            parser.error(f"this CPU does not run {', '.join(bad)} (it runs: "
                         f"{', '.join(runnable) or 'no m4 kernels'})")
    else:
        variants = [v for v in runnable if not (args.quick and v in ONE_STREAM_ONLY)]
    if not variants:
        raise SystemExit("m4's x86 kernels are not available here (python -m "
                         "m4d.model.kernels build)")
    dirs = {"native": None if str(args.llama_native) == "-" else args.llama_native,
            "avx2": args.llama_avx2}
    dirs["avxvnni"] = args.llama_avxvnni if args.llama_avxvnni.is_dir() else dirs["native"]
    log(f"variants {', '.join(variants)}; llama.cpp builds: "
        + ", ".join(f"{k} {v or 'installed'}" for k, v in dirs.items()))
    children = []
    for variant in variants:
        log(f"== {variant} against the {BUILD_FOR[variant]} llama.cpp build")
        children.append(run_child(args, variant, dirs[BUILD_FOR[variant]]))
    emit(summarise(args, children), render, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

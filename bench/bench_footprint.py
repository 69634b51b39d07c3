"""m4d's memory and start-up (issue 19), through real daemons on the default image.

1. Start: `--starts` fresh daemons (default 3), each timed from exec to ready as it logs it
   (`since_exec`, with its per-phase seconds), then the time to first token of a request
   sent the moment health says SERVING.
2. Idle: the Admin Status memory by part once the daemon has answered a request and
   settled (3 s later), against the baseline of a Python process that imported torch and
   grpc plus the image's size on disk. Target: idle RSS <= 1.25x that.
3. Load: 16 streams of 256 tokens at once, Status sampled every 0.2 s (RSS, KV in RAM),
   then 2 s after they end. Target: back to idle within 5 %.
4. Hot swap: a daemon on an image store holding two signed images that share every file
   (versions 1.0.0 and 1.1.0 of the default image, as the store gets them: each installed
   through the admin socket, so each is its own copy on disk); its peak RSS (the kernel's
   VmHWM, reset before) while `m4ctl image activate 1.1.0` swaps, against its idle RSS.
   Target: <= 1.3x.

The page cache is warm (the files were read before): a start right after boot also reads
the image from flash.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchkit.daemon import Daemon
from benchkit.inputs import distinct_prompts
from benchkit.options import daemon_bench_main
from benchkit.report import num, progress, render_table, stamp
from benchkit.streams import run_streams

log = progress("bench_footprint")
MiB = 1 << 20
STREAMS, STREAM_TOKENS = 16, 256


def baseline_rss() -> int:
    """RSS of this venv's Python after `import torch, grpc`: what any torch daemon costs."""
    code = ("import torch, grpc\n"
            "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status')"
            " if l.startswith('VmRSS')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def ready_line(daemon: Daemon, timeout: float = 120) -> dict[str, Any]:
    """since_exec and phases from the daemon's `ready` log line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in daemon.log_path.read_text(errors="replace").splitlines():
            m = re.search(r": ready .*since_exec=([\d.]+) phases=(\{.*?\})", line)
            if m:
                return {"since_exec": float(m.group(1)), "phases": ast.literal_eval(m.group(2))}
        time.sleep(0.05)
    raise RuntimeError(f"no ready line:\n{daemon.log_tail()}")


def memory(admin: Any) -> dict[str, int]:
    m = admin.status().memory
    return {k: getattr(m, k) for k in (
        "rss_bytes", "weights_mapped_bytes", "weights_mapped_resident_bytes",
        "weights_converted_bytes", "kv_resident_bytes", "kv_reserved_bytes", "kv_budget_bytes",
        "runtime_bytes")}


def first_token_ms(address: str) -> float:
    from m4client import Client

    with Client(address, timeout=60) as m4:
        sent = time.monotonic()
        for chunk in m4.generate("The capital of France is", max_tokens=4):
            if chunk.token_ids:
                return (time.monotonic() - sent) * 1e3
    raise RuntimeError("no token came")


def starts(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for i in range(args.starts):
        with Daemon(args.image.resolve(), None, args.self_test) as daemon:
            daemon.wait_serving()
            ttft = first_token_ms(daemon.address)
            run = dict(ready_line(daemon), first_token_ms=ttft)
            log(f"start {i + 1}: ready {run['since_exec']:.2f} s after exec, first token "
                f"{ttft:.0f} ms")
            runs.append(run)
    return runs


class Sampler(threading.Thread):
    """Admin Status memory every `period` s until stopped."""

    def __init__(self, admin: Any, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.admin, self.period, self.samples = admin, period, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append(memory(self.admin))
            self.done.wait(self.period)


def idle_and_load(args: argparse.Namespace) -> dict[str, Any]:
    from m4client import AdminClient
    from m4client.aio import AsyncClient

    image = args.image.resolve()
    tokenizer = image / json.loads((image / "manifest.json").read_bytes())[
        "components"]["backbone"]["tokenizer"]
    prompts = distinct_prompts(tokenizer, STREAMS, 32)
    with Daemon(image, None, args.self_test) as daemon, \
            AdminClient(daemon.admin_address, timeout=30) as admin:
        daemon.wait_serving()
        first_token_ms(daemon.address)  # idle = served once: the weights' pages in use
        time.sleep(3)
        idle = memory(admin)
        log(f"idle: {idle['rss_bytes'] / MiB:.0f} MiB RSS")
        sampler = Sampler(admin)
        sampler.start()

        async def load() -> Any:
            async with AsyncClient(daemon.address, app_name="bench-footprint") as client:
                return await run_streams(client, prompts, STREAM_TOKENS)

        batch = asyncio.run(load())
        sampler.done.set()
        sampler.join()
        time.sleep(2)
        after = memory(admin)
        log(f"{STREAMS} streams: peak {max(s['rss_bytes'] for s in sampler.samples) / MiB:.0f}"
            f" MiB; after {after['rss_bytes'] / MiB:.0f} MiB")
        return {"idle": idle, "during": sampler.samples, "after": after,
                "tokens": sum(batch.completion_tokens)}


def signed_copy(src: Path, dst: Path, key: Path, version: str) -> Path:
    """`src` as image `version` at `dst` (files hard-linked), signed with `key`."""
    from m4image.sign import sign_image

    data = json.loads((src / "manifest.json").read_bytes())
    data["version"] = version
    for rel in data["files"]:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(src / rel, dst / rel)
    (dst / "manifest.json").write_bytes(
        (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode())
    sign_image(dst, key)
    return dst


def vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def swap(args: argparse.Namespace) -> dict[str, Any]:
    from m4client import AdminClient
    from m4image.keys import Keyring
    from m4image.sign import generate_keypair

    with tempfile.TemporaryDirectory(prefix="m4bench-swap-") as tmp:
        root = Path(tmp)
        pair = generate_keypair(root / "dev")
        Keyring(root / "keys").add(pair.public_key)
        src = args.image.resolve()
        v1 = signed_copy(src, root / "v1", pair.private_key, "1.0.0")
        v2 = signed_copy(src, root / "v2", pair.private_key, "1.1.0")
        store = ["--state-dir", str(root / "state"), "--keys-dir", str(root / "keys")]
        with Daemon(v1, None, args.self_test, args=store) as daemon, \
                AdminClient(daemon.admin_address, timeout=300) as admin:
            daemon.wait_serving()

            def m4ctl(*words: str) -> None:
                subprocess.run([sys.executable, "-m", "m4ctl", "--admin-address",
                                daemon.admin_address, *words], check=True,
                               capture_output=True, timeout=600)

            m4ctl("image", "install", str(v2))
            first_token_ms(daemon.address)
            time.sleep(3)
            idle = memory(admin)
            pid = daemon.proc.pid
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            sampler = Sampler(admin, 0.1)
            sampler.start()
            started = time.monotonic()
            m4ctl("image", "activate", "1.1.0")
            seconds = time.monotonic() - started
            time.sleep(3)
            sampler.done.set()
            sampler.join()
            peak = vm(pid, "VmHWM")
            after = memory(admin)
            log(f"swap: idle {idle['rss_bytes'] / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, "
                f"after {after['rss_bytes'] / MiB:.0f} MiB, activate {seconds:.1f} s")
            shutil.rmtree(root / "state", ignore_errors=True)
            return {"idle": idle, "peak_rss_bytes": peak, "after": after,
                    "activate_s": seconds, "during": sampler.samples}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    base = baseline_rss()
    size = tree_bytes(args.image.resolve())
    log(f"baseline torch+grpc {base / MiB:.0f} MiB, image {size / MiB:.0f} MiB")
    result: dict[str, Any] = {**stamp(), "image": str(args.image), "baseline_rss_bytes": base,
                              "image_bytes": size, "cpu_flags": cpu_flags()}
    result["starts"] = starts(args)
    result["load"] = idle_and_load(args)
    if not args.no_swap:
        result["swap"] = swap(args)
    return result


def cpu_flags() -> list[str]:
    wanted = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile"}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return sorted(wanted & set(line.split(":", 1)[1].split()))
    return []


def render(r: dict[str, Any]) -> str:
    mib = lambda b: f"{b / MiB:,.0f}"  # noqa: E731
    starts_s = [s["since_exec"] for s in r["starts"]]
    mid = sorted(r["starts"], key=lambda s: s["since_exec"])[len(r["starts"]) // 2]
    idle, after = r["load"]["idle"], r["load"]["after"]
    during = r["load"]["during"]
    peak = max(s["rss_bytes"] for s in during) if during else 0
    kv_peak = max(s["kv_resident_bytes"] for s in during) if during else 0
    limit = 1.25 * (r["baseline_rss_bytes"] + r["image_bytes"])
    rows = [
        ["start: exec to ready (median of starts)", "s", num(statistics.median(starts_s), 2),
         "<= 3 (AVX-512), 5 (AVX2)", ", ".join(f"{s:.2f}" for s in starts_s)],
        ["start: first token after ready", "ms", num(mid["first_token_ms"], 0), "",
         "the median start's"],
        ["idle RSS", "MiB", mib(idle["rss_bytes"]),
         f"<= {mib(limit)} (1.25 x (baseline {mib(r['baseline_rss_bytes'])} + image "
         f"{mib(r['image_bytes'])}))", "met" if idle["rss_bytes"] <= limit else "NOT MET"],
        ["idle: weights mapped (resident)", "MiB",
         f"{mib(idle['weights_mapped_bytes'])} ({mib(idle['weights_mapped_resident_bytes'])})",
         "", "views of the image's files"],
        ["idle: weights converted at load", "MiB", mib(idle["weights_converted_bytes"]), "",
         "packed for the kernels, cast to the compute dtype"],
        ["idle: KV in RAM / budget / reserved", "MiB",
         f"{mib(idle['kv_resident_bytes'])} / {mib(idle['kv_budget_bytes'])} / "
         f"{mib(idle['kv_reserved_bytes'])}", "", ""],
        ["idle: runtime", "MiB", mib(idle["runtime_bytes"]), "", "Python, torch, gRPC, ..."],
        [f"{STREAMS} x {STREAM_TOKENS} tokens: peak RSS (KV in RAM)", "MiB",
         f"{mib(peak)} ({mib(kv_peak)})", "", f"{r['load']['tokens']} tokens"],
        ["after they end: RSS (KV in RAM)", "MiB",
         f"{mib(after['rss_bytes'])} ({mib(after['kv_resident_bytes'])})",
         f"<= {mib(idle['rss_bytes'] * 1.05)} (idle + 5 %)",
         "met" if after["rss_bytes"] <= idle["rss_bytes"] * 1.05 else "NOT MET"],
    ]
    if "swap" in r:
        s = r["swap"]
        ratio = s["peak_rss_bytes"] / s["idle"]["rss_bytes"]
        rows += [
            ["hot swap: idle RSS before", "MiB", mib(s["idle"]["rss_bytes"]), "", ""],
            ["hot swap: peak RSS (VmHWM) / idle", "MiB", f"{mib(s['peak_rss_bytes'])} "
             f"({ratio:.2f}x)", "<= 1.3x", "met" if ratio <= 1.3 else "NOT MET"],
            ["hot swap: RSS after", "MiB", mib(s["after"]["rss_bytes"]), "",
             f"activate took {s['activate_s']:.1f} s"],
        ]
    phases = ", ".join(f"{k} {v:.2f}" for k, v in mid["phases"].items())
    return render_table(
        [f"m4d footprint (issue 19), {r['date']}, image {r['image']}, "
         f"CPU flags: {' '.join(r['cpu_flags'])}"],
        ["measure", "unit", "value", "target", "note"], rows, {2},
        [f"phases of the median start (s): {phases}",
         "the page cache is warm: a start right after boot also reads the image from flash"])


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--starts", type=int, default=3, help="fresh daemons to time (3)")
    parser.add_argument("--no-swap", action="store_true", help="skip the hot-swap section")


def main(argv: list[str] | None = None) -> int:
    return daemon_bench_main(__doc__.split("\n\n")[0], measure, render, argv, add_options)


if __name__ == "__main__":
    sys.exit(main())

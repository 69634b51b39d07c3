"""Benchmark (caller identity stage): what the PeerRelay costs per call and per connection.

A server subprocess (uvloop, grpc.aio, a fake Inference servicer that resolves the caller
with `caller_from_context` on every call and answers ListTasks with ~100 bytes) listens
twice: directly on its backend socket, and through a `PeerRelay` on a public socket. This
process calls both with a grpc.aio client (uvloop), alternating direct / relay
`--repeats` times, and prints one table of medians with the ratio relay / direct:

* unary round trip, 1 in flight: p50 and p99 latency (ms), calls/s;
* unary, 16 in flight on one channel: calls/s;
* connect: a new channel (own connection) + its first call, p50 (ms): the relay's extra
  connect() and SO_PEERCRED read are paid once per connection, not per call;
* server CPU per call (µs, user + system time of the server process from /proc over each
  timed phase): what the relay costs the daemon's cores. On a shared machine this is
  steadier than wall-clock rates, which other processes disturb.

The servicer asserts the identity it resolved (uid -1 direct, our uid through the relay),
so a broken relay cannot produce a fast number. Progress to stderr, table (or --json) to
stdout.

    python bench/bench_identity.py [--seconds 2] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import uvloop
from benchkit.cpu import OtherCpuMeter, process_cpu_seconds
from benchkit.options import add_json
from benchkit.report import alternate, progress
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc
from m4d.server.identity import caller_from_context
from m4d.server.relay import PeerRelay
from m4d.server.sockets import private_dir

PAYLOAD = "x" * 100
IN_FLIGHT = 16
CONNECTS = 40

log = progress("bench_identity")


# ---------------------------------------------------------------- the server subprocess


class Servicer(pb_grpc.InferenceServicer):  # type: ignore[misc]
    def __init__(self, relay: PeerRelay) -> None:
        self.relay = relay

    async def ListTasks(self, request: pb.ListTasksRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        caller = caller_from_context(context, self.relay)
        return pb.ListTasksResponse(tasks=[pb.Task(id=str(caller.uid), description=PAYLOAD)])


async def serve(root: Path) -> None:
    backend = private_dir(root / ".m4d-private") / "app.sock"
    relay = PeerRelay(root / "app.sock", backend, name="app")
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(Servicer(relay), server)
    server.add_insecure_port(relay.backend_target)
    await server.start()
    await relay.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps({"direct": f"unix://{backend}", "relay": f"unix://{root / 'app.sock'}"}),
          flush=True)
    await stop.wait()
    await asyncio.gather(server.stop(0.5), relay.stop(1.0))


# ---------------------------------------------------------------- the client


@dataclass
class Sample:
    p50_ms: float
    p99_ms: float
    calls_per_s_1: float
    calls_per_s_16: float
    connect_p50_ms: float
    cpu_us_per_call_1: float
    cpu_us_per_call_16: float


def check(reply: pb.ListTasksResponse, uid: int) -> None:
    got = int(reply.tasks[0].id)
    if got != uid:
        raise RuntimeError(f"the server resolved uid {got}, expected {uid}")


async def measure(address: str, uid: int, seconds: float, server_pid: int) -> Sample:
    request = pb.ListTasksRequest()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for _ in range(200):  # warm-up
            check(await stub.ListTasks(request), uid)
        latencies: list[float] = []
        cpu0 = process_cpu_seconds(server_pid)
        start = time.perf_counter()
        end = start + seconds
        while (now := time.perf_counter()) < end:
            check(await stub.ListTasks(request), uid)
            latencies.append(time.perf_counter() - now)
        one = len(latencies) / (time.perf_counter() - start)
        cpu1 = process_cpu_seconds(server_pid)

        count = 0

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < end16:
                check(await stub.ListTasks(request), uid)
                count += 1
        start16 = time.perf_counter()
        end16 = start16 + seconds
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        sixteen = count / (time.perf_counter() - start16)
        cpu16 = process_cpu_seconds(server_pid)

    connects: list[float] = []
    for _ in range(CONNECTS):
        t0 = time.perf_counter()
        async with grpc.aio.insecure_channel(
                address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            check(await pb_grpc.InferenceStub(channel).ListTasks(request), uid)
        connects.append(time.perf_counter() - t0)

    latencies.sort()
    return Sample(p50_ms=1e3 * latencies[len(latencies) // 2],
                  p99_ms=1e3 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
                  calls_per_s_1=one, calls_per_s_16=sixteen,
                  connect_p50_ms=1e3 * statistics.median(connects),
                  cpu_us_per_call_1=1e6 * (cpu1 - cpu0) / len(latencies),
                  cpu_us_per_call_16=1e6 * (cpu16 - cpu1) / count)


async def run_client(addresses: dict[str, str], seconds: float, repeats: int,
                     server_pid: int) -> dict[str, list[Sample]]:
    uids = {"direct": -1, "relay": os.getuid()}
    samples: dict[str, list[Sample]] = {"direct": [], "relay": []}
    for r in range(repeats):
        for name in alternate(("direct", "relay"), r):
            log(f"repeat {r + 1}/{repeats}: {name}")
            samples[name].append(
                await measure(addresses[name], uids[name], seconds, server_pid))
    return samples


def table(samples: dict[str, list[Sample]], other_share: float) -> str:
    def med(name: str, key: str) -> float:
        return float(statistics.median(float(getattr(s, key)) for s in samples[name]))

    rows = [("unary p50, 1 in flight (ms)", "p50_ms", "{:.3f}"),
            ("unary p99, 1 in flight (ms)", "p99_ms", "{:.3f}"),
            ("calls/s, 1 in flight", "calls_per_s_1", "{:,.0f}"),
            (f"calls/s, {IN_FLIGHT} in flight", "calls_per_s_16", "{:,.0f}"),
            ("new connection + first call p50 (ms)", "connect_p50_ms", "{:.3f}"),
            ("server CPU per call, 1 in flight (µs)", "cpu_us_per_call_1", "{:.0f}"),
            (f"server CPU per call, {IN_FLIGHT} in flight (µs)", "cpu_us_per_call_16",
             "{:.0f}")]
    out = ["| measure | direct | relay | relay / direct |", "| --- | --- | --- | --- |"]
    for label, key, fmt in rows:
        d, r = med("direct", key), med("relay", key)
        out.append(f"| {label} | {fmt.format(d)} | {fmt.format(r)} | {r / d:.2f} |")
    n = len(samples["direct"])
    out.append("")
    out.append(f"medians of {n} alternating runs; other processes used "
               f"{100 * other_share:.0f}% of the cores meanwhile")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="length of each timed phase (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs (default 3)")
    add_json(parser)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args(argv)
    if args.serve is not None:
        uvloop.run(serve(args.serve))
        return 0

    with tempfile.TemporaryDirectory(prefix="m4-bench-identity-") as tmp:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", tmp],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            addresses = json.loads(proc.stdout.readline())
            meter = OtherCpuMeter([os.getpid(), proc.pid])
            samples = uvloop.run(run_client(addresses, args.seconds, args.repeats, proc.pid))
            other = meter.other_share()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    if args.json:
        result: dict[str, Any] = {k: [asdict(s) for s in v] for k, v in samples.items()}
        result["other_share"] = other
        print(json.dumps(result, indent=2))
    else:
        print(table(samples, other))
    return 0


if __name__ == "__main__":
    sys.exit(main())

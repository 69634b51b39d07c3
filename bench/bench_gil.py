"""Benchmark: what a busy event loop costs the model step when both share one interpreter.

In m4d the engine's worker thread runs the decoder while the event loop thread serves gRPC.
torch releases the GIL inside each kernel, but the Python between the ~1500 ops of a decode
step needs it back, and a loop thread in the middle of its Python work holds it. This script
times the in-process decode step (SmolLM2-135M from the image, 1 torch thread) quiet and
beside a Python thread that is busy in bursts, at two GIL switch intervals, with the layers
run eagerly (one Python call per op) and as m4d runs them (``LayerStack``: one TorchScript
call, which drops the GIL for the whole loop), and prints one table of step times and
ratios to the quiet eager step.

    python bench/bench_gil.py --image build/images/default [--format int4] [--batches 1,16]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch
from benchkit.daemon import read_manifest
from benchkit.options import add_image
from m4d.model.layer_stack import LayerStack
from m4d.model.llama import Llama, LlamaConfig, load_llama

# (busy microseconds, then sleep microseconds): ~13% and ~29% of a core in pure Python
LOADS = ((300, 2000), (2000, 5000))
SWITCH_INTERVALS = (0.005, 0.0005)  # CPython's default, and a tenth of it


def step_ms(model: Llama, batch: int, steps: int = 8) -> float:
    """Median time of one cached decode step of `batch` rows at position 100."""
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1),
                           generator=torch.Generator().manual_seed(batch))
    pos = torch.full((batch, 1), 100)
    model(tokens, pos, None, last_only=True)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model(tokens, pos, None, last_only=True)
        times.append(time.perf_counter() - started)
    return sorted(times)[steps // 2] * 1e3


class BusyPython(threading.Thread):
    """Pure-Python work in bursts, like an event loop handling a burst of messages."""

    def __init__(self, busy_us: int, sleep_us: int) -> None:
        super().__init__(daemon=True)
        self.busy_s, self.sleep_s = busy_us / 1e6, sleep_us / 1e6
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            started = time.perf_counter()
            while time.perf_counter() - started < self.busy_s:
                sum(i * i for i in range(50))
            time.sleep(self.sleep_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_image(ap)
    ap.add_argument("--format", default="int4", help="weight format (default int4)")
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    spec = read_manifest(args.image)["components"]["backbone"]
    model = load_llama(args.image / spec["weights"], LlamaConfig.from_dict(spec["config"]),
                       weight_format=args.format, compute_dtype=torch.bfloat16)
    model.setup_caches(32, 512, torch.bfloat16)
    if not model.scripted:
        raise SystemExit("the layers could not be scripted (see the log); nothing to compare")
    scripted = model.__dict__["_stack"]
    default_switch = sys.getswitchinterval()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        quiet = None
        for layers, stack in (("eager", LayerStack(model.layers)), ("scripted", scripted)):
            model.__dict__["_stack"] = stack
            ms = step_ms(model, batch)
            quiet = quiet or ms
            rows.append((batch, layers, "quiet", "-", ms, ms / quiet))
            for switch in SWITCH_INTERVALS:
                sys.setswitchinterval(switch)
                for busy_us, sleep_us in LOADS:
                    load = BusyPython(busy_us, sleep_us)
                    load.start()
                    ms = step_ms(model, batch)
                    load.done.set()
                    load.join()
                    rows.append((batch, layers, f"busy {busy_us} us / sleep {sleep_us} us",
                                 f"{switch * 1e3:g} ms", ms, ms / quiet))
            sys.setswitchinterval(default_switch)
    print(f"decode step, {args.format} weights, 1 torch thread (ms, median of 8; x = vs the "
          "quiet eager step of the same rows)")
    print(f"{'rows':>4}  {'layers':<8}  {'other Python thread':<28}  {'switch':>7}  "
          f"{'step ms':>8}  {'x':>5}")
    for batch, layers, load_name, switch_name, ms, ratio in rows:
        print(f"{batch:>4}  {layers:<8}  {load_name:<28}  {switch_name:>7}  {ms:>8.1f}  "
              f"{ratio:>5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark (outside the serving pipeline): m4's GEMM kernels in process, per kernel variant,
weight kind and batch rows, on SmolLM2-135M's linear shapes.

For kernel work: the daemon-level tables (bench_variants.py) mix the GEMMs with attention,
sampling and streaming; this one times `torch.ops.m4.block_linear` alone. Each cell is the
best of `--rounds` timed runs of ~0.2 s (the machine is shared: the best run is the one least
disturbed) in GFLOP/s (2 per multiply-add of the float linear it stands for), and the last
columns compare each variant with the first one. The weights are random blocks of each kind
on the model's shapes, together 44 MB per kind (q/k/v, o, gate/up, down of one layer, and the
LM head 49,152 x 576): a one-row GEMM streams them from memory as the model's do, larger
batches reuse each tile from the cache.

    python bench/bench_kernels.py [--variants avx512vnni,avx2] [--kinds q4_f16,q5_f16] [--json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from benchkit.cpu import OtherCpuMeter
from benchkit.options import add_json
from benchkit.report import emit, num, progress, render_table, stamp
from m4d.model import kernels
from m4d.model.block_linear import BlockLinear, q4_1_linear, q8_0_linear
from m4d.model.qtensors import pack_int4

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576))  # SmolLM2's [N, K]
KINDS = ("q4_f16", "q5_f16", "q8_f16")
ROWS = (1, 16, 64)
THREADS = 2
log = progress("bench_kernels")


def make_linear(kind: str, n: int, k: int, rng: np.random.Generator) -> BlockLinear:
    """A linear of `kind` on random blocks: Q4_1 nibbles, Q5_0-range or Q8_0-range bytes."""
    d = torch.from_numpy((rng.random((n, k // 32)) * 0.01 + 1e-4).astype(np.float16))
    if kind == "q4_f16":
        q = rng.integers(0, 16, (n, k)).astype(np.uint8)
        return q4_1_linear(torch.from_numpy(pack_int4(q)), d, -d)
    low, high = (-16, 16) if kind == "q5_f16" else (-127, 128)
    lin = q8_0_linear(torch.from_numpy(rng.integers(low, high, (n, k)).astype(np.int8)), d)
    assert lin.kind == kind
    return lin


def time_linears(linears: list[BlockLinear], rows: int, rounds: int) -> float:
    """GFLOP/s of all `linears` one after another on `rows` rows (best of `rounds`)."""
    xs = [torch.randn(rows, lin.in_features) for lin in linears]
    flops = 2.0 * rows * sum(lin.in_features * lin.out_features for lin in linears)
    for lin, x in zip(linears, xs, strict=True):  # warm-up
        lin(x)
    best = 0.0
    for _ in range(rounds):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.2:
            for lin, x in zip(linears, xs, strict=True):
                lin(x)
            runs += 1
        best = max(best, flops * runs / (time.perf_counter() - start) / 1e9)
    return best


def measure(variants: list[str], kinds: list[str], rounds: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {**stamp(), "threads": THREADS, "rows": list(ROWS),
                              "cpu_features": kernels.cpu_features(), "gflops": {}}
    meter = OtherCpuMeter([os.getpid()])
    before = kernels.variant()
    try:
        for kind in kinds:
            linears = [make_linear(kind, n, k, rng) for n, k in SHAPES]
            for variant in variants:
                kernels.select(variant)
                log(f"{kind} on {variant}")
                result["gflops"][f"{variant} {kind}"] = [time_linears(linears, m, rounds) for m in ROWS]
    finally:
        kernels.select(before)
    result["other_cpu_share"] = meter.other_share()
    result["variants"], result["kinds"] = variants, kinds
    return result


def render(result: dict[str, Any]) -> str:
    variants, rows = result["variants"], result["rows"]
    first = variants[0]
    header = ["variant", "kind", *(f"{m} rows GF/s" for m in rows),
              *(f"{m} rows / {first}" for m in rows)]
    table = []
    for kind in result["kinds"]:
        base = result["gflops"][f"{first} {kind}"]
        for variant in variants:
            g = result["gflops"][f"{variant} {kind}"]
            table.append([variant, kind, *(num(v) for v in g),
                          *(f"{v / b:.2f}x" for v, b in zip(g, base, strict=True))])
    titles = [f"m4 GEMM kernels in process, {result['date']}, {result['threads']} threads, "
              f"SmolLM2-135M's linear shapes (best of rounds; GFLOP/s of the float linear)",
              f"CPU features: {' '.join(result['cpu_features'])}"]
    notes = [f"other processes' share of the CPUs meanwhile: {result['other_cpu_share']:.0%}"]
    return render_table(titles, header, table, range(2, len(header)), notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=None,
                        help="comma-separated kernel variants (default: every one this CPU "
                             "runs but scalar)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated weight kinds (default {','.join(KINDS)})")
    parser.add_argument("--rounds", type=int, default=3)
    add_json(parser)
    args = parser.parse_args(argv)
    if not kernels.load():
        raise SystemExit("m4's kernels are not built (python -m m4d.model.kernels build)")
    runnable = kernels.runnable_variants()
    variants = args.variants.split(",") if args.variants else [v for v in runnable if v != "scalar"]
    bad = [v for v in variants if v not in runnable]
    if bad:
        parser.error(f"this CPU does not run {', '.join(bad)} (it runs {', '.join(runnable)})")
    kinds = args.kinds.split(",")
    if any(k not in KINDS for k in kinds):
        parser.error(f"--kinds takes {', '.join(KINDS)}")
    torch.set_num_threads(THREADS)
    kernels.set_threads(THREADS)
    emit(measure(variants, kinds, args.rounds), render, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

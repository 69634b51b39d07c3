"""bench_adapters: M4's task adapters (issue 16), per task accuracy and the cost of adapters in
the batch.

1. Accuracy per task on held-out data (phrasings and slot values the adapter never saw,
   made by ``m4d.adapters.slu_data``), through a real m4d on the image: the SLU adapter on
   typed commands (task ``understand``) and on espeak-ng speech (``speech-understand``,
   Whisper first), against the base backbone with the prompt the image used before
   (worked examples, the same JSON schema enforced while decoding); the intent head on
   the text encoder (``command-intent``) against zero-shot label similarity (``classify``).
2. Decode throughput with adapters in the batch: 16 rows of the fused w4a8 step over the
   real SmolLM2 weights, all base against spread over 4 rank-8 adapters (all linears) and the
   base, in the same run (alternating), as tokens per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchkit.daemon import Daemon, read_manifest
from benchkit.options import daemon_bench_main
from benchkit.report import num, progress, render_table, stamp

log = progress("bench_adapters")


def _base_understand(client: Any, text: str, schema: str) -> str:
    """The base backbone with the image's SLU prompt (worked examples) told the adapter's
    intents and slots, the schema enforced: T49 without the adapter, scored fairly."""
    from m4d.adapters.__main__ import slu_listed_messages
    from m4d.engine.cascade import SCHEMAS
    from m4d.prepare.constraints import bind_spans

    messages = slu_listed_messages(text)  # the schema bound to the text, as the task's is
    result = client.chat_complete(messages, task="chat", temperature=0, max_tokens=48,
                                  json_schema=bind_spans(schema, text) if schema else SCHEMAS["slu"])
    return str(result.text)


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from m4client import Audio, Client
    from m4d.adapters import slu_data

    examples = slu_data.examples("eval", args.examples, seed=7)
    spoken = examples[:args.spoken]
    out: dict[str, Any] = {}
    with Daemon(args.image, None, args.self_test) as daemon:
        daemon.ready()
        with Client(daemon.address, timeout=600) as client:
            def timed(fn: Any) -> tuple[list[Any], float]:
                started = time.monotonic()
                with ThreadPoolExecutor(4) as pool:
                    results = list(pool.map(fn, examples if fn is not speak else spoken))
                return results, (time.monotonic() - started) / max(len(results), 1)

            def adapter(e: slu_data.Example) -> str:
                return str(client.complete(e.text, task="understand", temperature=0, max_tokens=48).text)

            def base(e: slu_data.Example) -> str:
                return _base_understand(client, e.text, schema)

            def speak(e: slu_data.Example) -> str:
                from tests import speech

                chunks = list(client.run("speech-understand", {"audio": Audio(speech.synthesize(e.text))},
                                         temperature=0, max_tokens=48))
                return "".join(c.text for c in chunks)

            def head(e: slu_data.Example) -> str:
                return str(client.classify(e.text, task="command-intent").labels[0].label)

            labels = sorted({e.intent for e in examples})
            schema = {t.id: t for t in client.list_tasks()}["understand"].response_schema

            def zero_shot(e: slu_data.Example) -> str:
                ranked = client.classify(e.text, [lab.replace("_", " ") for lab in labels], task="classify")
                return ranked.labels[0].label.replace(" ", "_")

            for name, fn in (("understand: adapter", adapter), ("understand: base prompt", base),
                             ("speech-understand: adapter", speak)):
                log(f"{name} on {len(examples if fn is not speak else spoken)} held-out commands")
                answers, per_call = timed(fn)
                scored = slu_data.score(answers, examples if fn is not speak else spoken)
                out[name] = {**scored, "seconds_per_call": per_call}
            for name, fn in (("command-intent: head", head), ("classify: zero-shot", zero_shot)):
                log(f"{name} on {len(examples)} held-out commands")
                answers, per_call = timed(fn)
                out[name] = {"intent_accuracy": sum(a == e.intent for a, e in zip(answers, examples, strict=True))
                             / len(examples), "n": len(examples), "seconds_per_call": per_call}
    return out


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from m4d.adapters.lora import decode_tensors, sizes_for
    from m4d.adapters.modules import new_lora
    from m4d.model import kernels
    from m4d.model.llama import LlamaConfig, load_llama

    threads = kernels.set_threads(0)  # as the daemon: one kernel thread per core
    manifest = read_manifest(args.image)
    spec = manifest["components"]["backbone"]
    cfg = LlamaConfig.from_dict(spec["config"])
    model = load_llama(args.image / spec["weights"], cfg, weight_format="w4a8",
                       compute_dtype=torch.float32)
    model.setup_caches(16, 512)
    sizes = sizes_for(cfg)
    bank: list[torch.Tensor] = []
    for i in range(4):
        lora = new_lora(model, 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj"], seed=i)
        for pair in lora.pairs.values():
            pair.b = torch.randn(pair.b.shape) * 0.01
        bank += decode_tensors(lora, cfg.n_layers, sizes, dtype=torch.bfloat16, spans=True)  # as served
    ids = torch.tensor([(i % 5) - 1 for i in range(16)])  # 4 adapters and the base, spread
    rows = torch.arange(16)
    tokens = torch.randint(0, cfg.vocab_size, (16, 1))
    results: dict[str, list[float]] = {"base only": [], "4 adapters + base": []}
    for round_ in range(args.rounds):
        for name in (list(results) if round_ % 2 == 0 else list(results)[::-1]):
            lora = (bank, ids) if name != "base only" else None
            pos = torch.full((16, 1), 100)
            started = time.perf_counter()
            for step in range(args.steps):
                model(tokens, pos + step, rows=rows, lora=lora)
            results[name].append(16 * args.steps / (time.perf_counter() - started))
    return {**{name: statistics.median(v) for name, v in results.items()},
            "kernel_threads": threads, "variant": kernels.variant()}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {**stamp(), "image": str(args.image)}
    out["throughput"] = throughput(args)
    if not args.skip_accuracy:
        out["accuracy"] = accuracy(args)
    out["manifest"] = {n: c.get("metrics") for n, c in read_manifest(args.image)["components"].items()
                       if c["kind"] in ("lora", "head")}
    return out


def render(r: dict[str, Any]) -> str:
    t = r["throughput"]
    lines = [render_table(
        [f"Decode throughput, 16 rows of the fused w4a8 step ({t['variant']}, "
         f"{t['kernel_threads']} kernel threads; same run, alternating)"],
        ["batch", "tok/s", "vs base only"],
        [[name, num(t[name]), num(t[name] / t["base only"], 2)]
         for name in ("base only", "4 adapters + base")],
        {1, 2}, [])]
    if "accuracy" in r:
        rows = []
        for name, s in r["accuracy"].items():
            rows.append([name, num(100 * s["intent_accuracy"]),
                         num(100 * s["slot_f1"]) if "slot_f1" in s else "-",
                         str(int(s["n"])), num(1e3 * s["seconds_per_call"], 0)])
        lines.append(render_table(
            ["Held-out accuracy through m4d (phrasings and values never trained on)"],
            ["task", "intent %", "slot F1 %", "n", "ms/call (4 at once)"], rows, {1, 2, 3, 4}, []))
    lines.append("manifest metrics: " + json.dumps(r["manifest"]))
    return "\n\n".join(lines)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--examples", type=int, default=160, help="held-out commands scored")
    parser.add_argument("--spoken", type=int, default=32, help="of them also spoken (espeak-ng)")
    parser.add_argument("--steps", type=int, default=20, help="decode steps per timing")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--skip-accuracy", action="store_true")


def main(argv: list[str] | None = None) -> int:
    return daemon_bench_main(__doc__.split("\n\n")[0], measure, render, argv, add_options)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.speech (espeak-ng)
    sys.exit(main())

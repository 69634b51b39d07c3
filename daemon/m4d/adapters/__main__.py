"""``python -m m4d.adapters train``: a backbone LoRA trained on this CPU from a JSONL file;
``python -m m4d.adapters head``: a linear head on the text encoder (tooling for device makers).

    python -m m4d.adapters train --image build/images/default --template slu_adapter \\
        --data train.jsonl --eval eval.jsonl --scorer slu --out firmware_image/adapters/slu

Writes a PEFT folder (``adapter_config.json``, ``adapter_model.safetensors``) and
``metrics.json`` (the training report and, with ``--eval``, the held-out evaluation: greedy
answers of the base prompt and of the adapter, scored by ``--scorer``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from m4image.fsutil import atomic_write_bytes

from m4d.adapters.lora import AdapterError, Lora
from m4d.adapters.modules import attach, detach
from m4d.adapters.train import (
    Backbone,
    TrainSettings,
    load_backbone,
    prompt_ids,
    read_pairs,
    train_lora,
)
from m4d.model.llama import greedy_generate
from m4d.prepare.prompts import answer_messages


def _bar(label: str) -> Callable[[int, int, float], None]:
    started = time.monotonic()

    def show(done: int, total: int, loss: float) -> None:
        width = 30
        filled = width * done // max(total, 1)
        rate = (time.monotonic() - started) / max(done, 1)
        print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
              f"loss {loss:.3f} eta {rate * (total - done):.0f}s", end="", file=sys.stderr, flush=True)
        if done == total:
            print(file=sys.stderr)
    return show


def slu_listed_messages(text: str) -> list[dict[str, str]]:
    """The base backbone's fairest SLU prompt: the image's (worked examples) plus the intents
    and slots the adapter was trained on, so its answers can be scored by name."""
    from m4d.adapters.slu_templates import SCHEMA

    messages = answer_messages("slu", text, "")
    listed = "; ".join(f"{intent} ({', '.join(slots) or 'no slots'})" for intent, slots in SCHEMA.items())
    messages[0]["content"] += f" Use one of these intents, with these slots: {listed}."
    return messages


def generate(backbone: Backbone, template: str, inputs: Sequence[str], lora: Lora | None,
             max_tokens: int = 48, progress: Callable[[int, int, float], None] | None = None) -> list[str]:
    """Greedy answers (float32 base, the adapter attached in torch when given); template
    "slu_listed": ``slu_listed_messages``."""
    model, tok = backbone.model, backbone.tokenizer
    if lora is not None:
        attach(model, lora)
    try:
        outs = []
        for i, text in enumerate(inputs):
            if template == "slu_listed":
                ids = tok.encode(backbone.chat.render(slu_listed_messages(text), add_generation_prompt=True))
            else:
                ids = prompt_ids(backbone, template, text)
            outs.append(tok.decode(greedy_generate(model, ids, max_tokens, tok.eos_id)))
            if progress is not None:
                progress(i + 1, len(inputs), 0.0)
        return outs
    finally:
        if lora is not None:
            detach(model)


def score(scorer: str, outputs: Sequence[str], pairs: Sequence[tuple[str, str]],
          records: Sequence[dict[str, Any]]) -> dict[str, float]:
    if scorer == "slu":
        from m4d.adapters import slu_data

        examples = [slu_data.Example(r["input"], r["intent"], dict(r["slots"])) for r in records]
        return slu_data.score(outputs, examples)
    exact = sum(o.strip() == p[1].strip() for o, p in zip(outputs, pairs, strict=True))
    return {"exact_match": exact / len(pairs), "n": float(len(pairs))}


def train_command(args: argparse.Namespace) -> int:
    from m4d.adapters.lora import write_peft

    settings = TrainSettings(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                             targets=tuple(args.targets.split(",")),
                             lr=args.lr, batch=args.batch, max_steps=args.steps, seed=args.seed,
                             threads=args.threads)
    backbone = load_backbone(args.image)
    pairs = read_pairs(args.data)
    print(f"training a rank-{settings.rank} LoRA on {len(pairs)} examples "
          f"({', '.join(settings.targets)})", file=sys.stderr)
    lora, report = train_lora(backbone, args.template, pairs, settings, progress=_bar("train"))
    metrics: dict[str, Any] = {"train": {**report.__dict__, "settings": settings.__dict__}}
    if args.eval is not None:
        records = [json.loads(line) for line in args.eval.read_text().splitlines() if line.strip()]
        records = records[:args.eval_limit] if args.eval_limit else records
        held = [(str(r["input"]), str(r["output"])) for r in records]
        inputs = [p[0] for p in held]
        tuned = generate(backbone, args.template, inputs, lora, progress=_bar("eval adapter"))
        metrics["eval"] = {"adapter": score(args.scorer, tuned, held, records)}
        if args.base_template:
            base = generate(backbone, args.base_template, inputs, None, progress=_bar("eval base"))
            metrics["eval"]["base"] = score(args.scorer, base, held, records)
        metrics["eval"]["examples"] = len(held)
        print(json.dumps(metrics["eval"], indent=2))
    write_peft(args.out, lora)
    atomic_write_bytes(args.out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _encoder_vectors(image: Path, texts: Sequence[str]) -> torch.Tensor:
    """The image's text encoder's pooled vectors for `texts`, as the daemon computes them."""
    from tokenizers import Tokenizer

    from m4d.model.bert import BertConfig, embed_with_counts, load_bert

    spec = json.loads((image / "manifest.json").read_text())["components"]["text_encoder"]
    model = load_bert(image / spec["weights"], BertConfig.from_dict(spec["config"]))
    tokenizer = Tokenizer.from_file(str(image / spec["tokenizer"]))
    with torch.inference_mode():
        vectors, _ = embed_with_counts(model, tokenizer, list(texts), int(spec.get("max_seq_len", 256)),
                                       normalize=bool(spec.get("normalize", True)))
    return vectors.float()


def head_command(args: argparse.Namespace) -> int:
    """A linear head on the text encoder from {"text", "label"} lines; held-out accuracy
    against zero-shot classification by label similarity (what the image does without it)."""
    from m4d.adapters.heads import accuracy, train_head, write_head

    def read(path: Path) -> list[dict[str, str]]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    train = read(args.data)
    head = train_head(_encoder_vectors(args.image, [r["text"] for r in train]),
                      [r["label"] for r in train], seed=args.seed)
    metrics: dict[str, Any] = {"train": {"examples": len(train), "labels": head.labels}}
    if args.eval is not None:
        held = read(args.eval)
        vectors = _encoder_vectors(args.image, [r["text"] for r in held])
        expected = [r["label"] for r in held]
        tuned = [head.labels[i] for i in head.logits(vectors).argmax(-1).tolist()]
        label_vectors = _encoder_vectors(args.image, [lab.replace("_", " ") for lab in head.labels])
        zero_shot = [head.labels[i] for i in (vectors @ label_vectors.T).argmax(-1).tolist()]
        metrics["eval"] = {"head": {"accuracy": accuracy(tuned, expected), "n": len(held)},
                           "base": {"accuracy": accuracy(zero_shot, expected), "n": len(held)},
                           "examples": len(held)}
        print(json.dumps(metrics["eval"], indent=2))
    write_head(args.out, head)
    atomic_write_bytes(args.out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m4d.adapters")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a backbone LoRA from a JSONL file of input/output pairs")
    t.add_argument("--image", type=Path, required=True, help="the base image directory")
    t.add_argument("--template", required=True, help="the task's prompt template (e.g. slu_adapter)")
    t.add_argument("--data", type=Path, required=True, help="training JSONL: {\"input\", \"output\"}")
    t.add_argument("--eval", type=Path, help="held-out JSONL, scored at the end")
    t.add_argument("--eval-limit", type=int, default=0, help="score only the first N held-out examples")
    t.add_argument("--scorer", default="exact", choices=["exact", "slu"])
    t.add_argument("--base-template", default="", help="also score the base model with this template")
    t.add_argument("--out", type=Path, required=True, help="the PEFT folder to write")
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout while training")
    t.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0)
    h = sub.add_parser("head", help="train a linear head on the text encoder from JSONL text/label lines")
    h.add_argument("--image", type=Path, required=True, help="the base image directory")
    h.add_argument("--data", type=Path, required=True, help="training JSONL: {\"text\", \"label\"}")
    h.add_argument("--eval", type=Path, help="held-out JSONL, scored at the end")
    h.add_argument("--out", type=Path, required=True, help="the head folder to write")
    h.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        return head_command(args) if args.command == "head" else train_command(args)
    except (AdapterError, OSError) as exc:  # bad data or files: one line, what to fix
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m m4d.adapters train``: a backbone LoRA trained on this CPU from a JSONL file;
``python -m m4d.adapters head``: a head on the text encoder (linear, or with ``--hidden H`` a
small MLP), with ``--lora-rank R`` a LoRA on the encoder trained with it (tooling for device
makers).

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
                             patience=args.patience, dtype=args.dtype,
                             threads=args.threads)
    backbone = load_backbone(args.image)
    pairs = read_pairs(args.data)
    print(f"training a rank-{settings.rank} LoRA on {len(pairs)} examples "
          f"({', '.join(settings.targets)})", file=sys.stderr)
    validation = read_pairs(args.val) if args.val is not None else []
    lora, report = train_lora(backbone, args.template, pairs, settings, progress=_bar("train"),
                              validation=validation)
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


def head_command(args: argparse.Namespace) -> int:
    """A head on the text encoder from {"text", "label"} lines (linear, or an MLP with
    `--hidden`), with `--lora-rank` a LoRA on the encoder trained with it
    (``m4d.adapters.encoder_lora``); held-out accuracy against the frozen-encoder head, the
    linear frozen-encoder head (for an MLP) and zero-shot classification by label similarity
    (what the image does without it)."""
    from m4d.adapters.encoder_lora import (
        STORE_DTYPE,
        EncoderTrainSettings,
        load_encoder,
        predict,
        read_labelled,
        train_encoder_head,
        vectors,
    )
    from m4d.adapters.heads import accuracy, train_head, write_head
    from m4d.adapters.lora import write_peft

    if args.threads:
        torch.set_num_threads(args.threads)
    encoder, train = load_encoder(args.image), read_labelled(args.data)
    train_vectors, train_labels = vectors(encoder, [t for t, _ in train]), [y for _, y in train]
    frozen = train_head(train_vectors, train_labels, seed=args.seed, hidden=args.hidden,
                        activation=args.activation)
    head, lora, lora_out = frozen, None, args.lora_out or args.out.with_name(f"{args.out.name}-lora")
    metrics: dict[str, Any] = {"train": {"examples": len(train), "labels": frozen.labels,
                                         "hidden": args.hidden}}
    if args.hidden:
        metrics["train"]["activation"] = args.activation
    if args.lora_rank:
        settings = EncoderTrainSettings(
            rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
            dropout=args.lora_dropout, targets=tuple(args.lora_targets.split(",")), lr=args.lr,
            head_lr=args.lr, batch=args.batch, max_epochs=args.epochs, patience=args.patience,
            seed=args.seed, threads=args.threads, hidden=args.hidden)
        print(f"training a rank-{settings.rank} LoRA on the text encoder with the head on "
              f"{len(train)} examples ({', '.join(settings.targets)})", file=sys.stderr)
        validation = read_labelled(args.val) if args.val is not None else []
        lora, head, report = train_encoder_head(encoder, train, settings, validation,
                                                progress=_bar("train"), frozen=frozen)
        head.lora = lora_out.name  # the component the builder makes of the PEFT folder
        metrics["train"]["lora"] = {**report.__dict__, "settings": settings.__dict__}
    if args.eval is not None:
        held = read_labelled(args.eval)
        texts, expected = [t for t, _ in held], [y for _, y in held]
        plain = vectors(encoder, texts)
        label_vectors = vectors(encoder, [lab.replace("_", " ") for lab in frozen.labels])
        zero_shot = [frozen.labels[i] for i in (plain @ label_vectors.T).argmax(-1).tolist()]
        scores = {"head": accuracy(predict(frozen, plain), expected),
                  "base": accuracy(zero_shot, expected)}
        if lora is not None:  # the head through its LoRA (as served), and the frozen one
            scores = {"head": accuracy(predict(head, vectors(encoder, texts, lora)), expected),
                      "frozen_head": scores["head"], "base": scores["base"]}
        if args.hidden:  # what the MLP adds over the linear head (both on the frozen encoder)
            linear = train_head(train_vectors, train_labels, seed=args.seed)
            scores["linear_head"] = accuracy(predict(linear, plain), expected)
        metrics["eval"] = {**{k: {"accuracy": v, "n": len(held)} for k, v in scores.items()},
                           "examples": len(held)}
        print(json.dumps(metrics["eval"], indent=2))
    if lora is not None:
        write_peft(lora_out, lora, dtype=STORE_DTYPE)
        atomic_write_bytes(lora_out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
        print(f"wrote {lora_out}", file=sys.stderr)
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
    t.add_argument("--val", type=Path, help="validation JSONL for early stopping, best worded "
                   "apart from --data (default: a tenth of --data held out)")
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
    t.add_argument("--patience", type=int, default=3,
                   help="evaluations without a better validation loss before stopping")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="the matmuls' dtype (auto: bfloat16 where the CPU has bf16 arithmetic)")
    h = sub.add_parser("head", help="train a head (linear, or a small MLP) on the text encoder "
                       "from JSONL text/label lines")
    h.add_argument("--image", type=Path, required=True, help="the base image directory")
    h.add_argument("--data", type=Path, required=True, help="training JSONL: {\"text\", \"label\"}")
    h.add_argument("--eval", type=Path, help="held-out JSONL, scored at the end")
    h.add_argument("--out", type=Path, required=True, help="the head folder to write")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    h.add_argument("--hidden", type=int, default=0, help="the head's hidden layer width "
                   "(0: a linear head; else an MLP with one hidden layer)")
    h.add_argument("--activation", default="gelu", choices=["gelu", "relu"],
                   help="the hidden layer's activation")
    h.add_argument("--lora-rank", type=int, default=0, help="train a LoRA of this rank on the "
                   "text encoder with the head (0: the head alone, on the frozen encoder)")
    h.add_argument("--lora-out", type=Path, help="the LoRA's PEFT folder (default: OUT-lora); "
                   "the head names it as the component it runs with")
    h.add_argument("--lora-alpha", type=float, default=0.0, help="(default: twice the rank)")
    h.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout while training")
    h.add_argument("--lora-targets", default="query,key,value,dense",
                   help="the encoder linears to adapt (dense: attention output, FFN in and out)")
    h.add_argument("--val", type=Path, help="validation JSONL for early stopping, best worded "
                   "apart from --data (default: a tenth of --data held out)")
    h.add_argument("--lr", type=float, default=1e-3)
    h.add_argument("--batch", type=int, default=32)
    h.add_argument("--epochs", type=float, default=6.0, help="at most this many passes over --data")
    h.add_argument("--patience", type=int, default=4,
                   help="evaluations (every 50 steps) without a better validation accuracy "
                   "before stopping")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        return head_command(args) if args.command == "head" else train_command(args)
    except (AdapterError, OSError) as exc:  # bad data or files: one line, what to fix
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
